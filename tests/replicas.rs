//! Read replicas (`postgres.replicas`) against real streaming replicas (`pg_basebackup -R`
//! of this test binary's PostgreSQL, hot standbys on ports of their own): fills go to a
//! caught-up replica; a write a replica has not replayed is never missed, also when the
//! replica's address suddenly leads to a server further behind; the lag bound; a replica
//! that hangs or dies.
//!
//! Which server answered is asked of PostgreSQL itself: `pg_is_in_recovery()` is true only
//! on a standby. Every wait is a poll with a generous deadline; nothing is timed.

mod common;

use common::faultproxy::{FaultProxy, Mode};
use common::services::{postgres, Postgres, TestDb, Valkey};
use common::{config_for, emp_get as emp, info_cachefront as info, info_field, Stack};
use redis::aio::MultiplexedConnection;
use redis::AsyncCommands;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

const PATIENCE: Duration = Duration::from_secs(30);

/// A fresh database, then `n` replicas of the server holding it (so they have it too).
async fn db_and_replicas(n: usize) -> (TestDb, Vec<Postgres>) {
    tokio::task::spawn_blocking(move || {
        let db = postgres().fresh_db();
        let replicas = (0..n).map(|_| postgres().start_replica()).collect();
        (db, replicas)
    })
    .await
    .expect("database and replicas")
}

/// cachefront on `db`, with the replica URLs (to `db` on those ports) and settings given.
async fn start(
    db: TestDb,
    replica_ports: &[u16],
    tweak: impl FnOnce(&mut cachefront::config::Config),
) -> Stack {
    let valkey = Valkey::start();
    let mut cfg = config_for(&valkey, &db);
    cfg.postgres.replicas = replica_ports
        .iter()
        .map(|p| format!("postgres://postgres@127.0.0.1:{p}/{}", db.name()))
        .collect();
    cfg.postgres.replica_poll_ms = 20;
    cfg.postgres.replica_max_lag_ms = 60_000;
    // These tests count each fill's replica, fallback and error: the verification sampler's
    // own reads of the replicas would add to them.
    cfg.verify.per_second = 0;
    tweak(&mut cfg);
    cfg.validate().expect("test config is valid");
    let proxy = cachefront::server::spawn(cfg)
        .await
        .expect("cachefront starts");
    let s = Stack { valkey, db, proxy };
    let shared = s.proxy.shared.clone();
    common::eventually_within(PATIENCE, "invalidation listener up", || {
        let shared = shared.clone();
        async move { shared.is_listening() }
    })
    .await;
    s
}

static PROBE: AtomicU64 = AtomicU64::new(0);

/// One fill (a key never used before) of a query that touches no table, so no write ever
/// holds it back: true if a standby answered it, false if the primary did.
async fn standby_answers(c: &mut MultiplexedConnection) -> bool {
    let n = PROBE.fetch_add(1, Ordering::Relaxed);
    let json: String = redis::cmd("SQL.CACHED")
        .arg("SELECT pg_is_in_recovery() AS standby, $1::int AS n")
        .arg("PARAMS")
        .arg(n)
        .query_async(c)
        .await
        .expect("SQL.CACHED");
    match json.as_str() {
        j if j == format!(r#"[{{"standby": true, "n": {n}}}]"#) => true,
        j if j == format!(r#"[{{"standby": false, "n": {n}}}]"#) => false,
        other => panic!("unexpected answer {other}"),
    }
}

/// `key=value` of the `replica<i>:` line.
fn replica_field(info: &str, i: usize, key: &str) -> String {
    info_field(info, &format!("replica{i}"))
        .split(',')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key} for replica{i} in {info}"))
        .to_string()
}

fn lsn(text: &str) -> u64 {
    cachefront::db::replicas::parse_lsn(text).unwrap_or_else(|| panic!("not an LSN: {text}"))
}

fn counter(
    s: &Stack,
    which: fn(&cachefront::metrics::Metrics) -> &cachefront::metrics::Counter,
) -> u64 {
    which(&s.proxy.shared.metrics).load(Ordering::Relaxed)
}

fn replica_fills(m: &cachefront::metrics::Metrics) -> &cachefront::metrics::Counter {
    &m.replica_fills
}

fn replica_fallbacks(m: &cachefront::metrics::Metrics) -> &cachefront::metrics::Counter {
    &m.replica_fallbacks
}

fn replica_errors(m: &cachefront::metrics::Metrics) -> &cachefront::metrics::Counter {
    &m.replica_errors
}

/// The name column of employee `id` as `server` sees it.
fn name_on(server: &Postgres, db: &TestDb, id: i64) -> String {
    server.psql(
        db.name(),
        &format!("SELECT name FROM employees WHERE id = {id}"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn fills_go_to_a_caught_up_replica() {
    let (db, replicas) = db_and_replicas(1).await;
    let replica = &replicas[0];
    let s = start(db, &[replica.port()], |_| {}).await;
    let mut c = s.client().await;
    common::eventually_within(PATIENCE, "a fill answered by the replica", || {
        let mut c = c.clone();
        async move { standby_answers(&mut c).await }
    })
    .await;
    let before = counter(&s, replica_fills);
    assert!(standby_answers(&mut c).await);
    assert_eq!(emp(&mut c, 3).await.as_deref(), Some("Charlie Brown"));
    assert_eq!(counter(&s, replica_fills), before + 2);
    // A hit asks nobody.
    assert_eq!(emp(&mut c, 3).await.as_deref(), Some("Charlie Brown"));
    assert_eq!(counter(&s, replica_fills), before + 2);

    let text = info(&mut c).await;
    assert_eq!(info_field(&text, "replica_fills"), (before + 2).to_string());
    let addr = format!("127.0.0.1:{}/{}", replica.port(), s.db.name());
    assert_eq!(replica_field(&text, 0, "addr"), addr, "{text}");
    assert_eq!(replica_field(&text, 0, "up"), "1", "{text}");
    assert_eq!(replica_field(&text, 0, "within_lag"), "1", "{text}");
    let metrics = s.proxy.shared.prometheus();
    assert!(
        metrics.contains(&format!("cachefront_replica_fills_total {}\n", before + 2)),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("cachefront_replica_up{{replica=\"{addr}\"}} 1\n")),
        "{metrics}"
    );
}

/// The heart of it: with the replica well within the lag bound but paused just before a
/// write, a fill of what the write changed must come from the primary — the replica still
/// holds the old row — while fills of anything else keep going to the replica.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_the_replica_has_not_replayed_is_read_from_the_primary() {
    let (db, replicas) = db_and_replicas(1).await;
    let replica = &replicas[0];
    let s = start(db, &[replica.port()], |_| {}).await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    common::eventually_within(PATIENCE, "a fill answered by the replica", || {
        let mut c = c.clone();
        async move { standby_answers(&mut c).await }
    })
    .await;
    let by_id = "SELECT name FROM employees WHERE id = 1";
    assert_eq!(emp(&mut c, 1).await.as_deref(), Some("Alice Johnson"));
    let json: String = redis::cmd("SQL.CACHED")
        .arg(by_id)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(json, r#"[{"name": "Alice Johnson"}]"#);

    replica.pause_replay();
    s.psql("UPDATE employees SET name = 'Alicia Johnson' WHERE id = 1");
    common::eventually_within(PATIENCE, "employee:1 invalidated", || {
        let mut v = v.clone();
        async move { !v.exists::<_, bool>("employee:1").await.unwrap() }
    })
    .await;
    assert_eq!(
        name_on(replica, &s.db, 1),
        "Alice Johnson",
        "the replica must lag"
    );

    let (fills, fallbacks) = (counter(&s, replica_fills), counter(&s, replica_fallbacks));
    assert_eq!(emp(&mut c, 1).await.as_deref(), Some("Alicia Johnson"));
    let stored: Option<String> = v.get("employee:1").await.unwrap();
    assert_eq!(stored.as_deref(), Some("Alicia Johnson"));
    let json: String = redis::cmd("SQL.CACHED")
        .arg(by_id)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(json, r#"[{"name": "Alicia Johnson"}]"#);
    assert_eq!(counter(&s, replica_fallbacks), fallbacks + 2);
    assert_eq!(counter(&s, replica_fills), fills);

    // Another row, and a query of no table, depend on nothing the write changed: the paused
    // replica (well within the 60 s bound) still answers them.
    assert_eq!(emp(&mut c, 4).await.as_deref(), Some("Diana Evans"));
    assert!(standby_answers(&mut c).await);
    assert_eq!(counter(&s, replica_fills), fills + 2);

    // Replaying again, the replica catches up and fills of the changed row go back to it.
    replica.resume_replay();
    common::eventually_within(
        PATIENCE,
        "the changed row filled by the replica again",
        || {
            let (mut c, mut v) = (c.clone(), v.clone());
            let s = &s;
            async move {
                // Dropped behind cachefront's back: no invalidation, nothing required anew.
                let _: i64 = v.del("employee:1").await.unwrap();
                let before = counter(s, replica_fills);
                assert_eq!(emp(&mut c, 1).await.as_deref(), Some("Alicia Johnson"));
                counter(s, replica_fills) == before + 1
            }
        },
    )
    .await;
}

/// Paused with a write after it — in a table no entry depends on, so nothing is required
/// anew — the replica falls out of the lag bound once that write is older than the bound,
/// and every fill goes to the primary until it replays again.
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_beyond_the_lag_bound_is_not_used() {
    let (db, replicas) = db_and_replicas(1).await;
    let replica = &replicas[0];
    let s = start(db, &[replica.port()], |c| {
        c.postgres.replica_max_lag_ms = 300;
    })
    .await;
    let mut c = s.client().await;
    // Created now: DDL is a change cachefront hears (and requires replicas to replay).
    s.psql("CREATE TABLE lag_probe (x int)");
    common::eventually_within(PATIENCE, "a fill answered by the replica", || {
        let mut c = c.clone();
        async move { standby_answers(&mut c).await }
    })
    .await;
    replica.pause_replay();
    let required = lsn(info_field(&info(&mut c).await, "replica_required_lsn"));
    s.psql("INSERT INTO lag_probe VALUES (1)");
    common::eventually_within(PATIENCE, "a fill answered by the primary", || {
        let mut c = c.clone();
        async move { !standby_answers(&mut c).await }
    })
    .await;
    let text = info(&mut c).await;
    assert_eq!(replica_field(&text, 0, "up"), "1", "{text}");
    assert_eq!(replica_field(&text, 0, "within_lag"), "0", "{text}");
    assert!(
        replica_field(&text, 0, "lag_bytes").parse::<u64>().unwrap() > 0,
        "{text}"
    );
    // Not the requirement of a write: nothing this cachefront caches was written.
    assert_eq!(lsn(info_field(&text, "replica_required_lsn")), required);
    assert!(counter(&s, replica_fallbacks) >= 1);

    replica.resume_replay();
    common::eventually_within(PATIENCE, "a fill answered by the replica again", || {
        let mut c = c.clone();
        async move { standby_answers(&mut c).await }
    })
    .await;
}

/// A replica whose link hangs takes a fill down with it only until the deadline; the fill
/// is then answered by the primary. A killed replica costs nothing at all.
#[tokio::test(flavor = "multi_thread")]
async fn a_hung_or_dead_replica_hands_its_fills_to_the_primary() {
    let (db, replicas) = db_and_replicas(1).await;
    let mut replicas = replicas;
    let replica = replicas.pop().expect("a replica");
    let link = FaultProxy::start(replica.port()).await;
    let s = start(db, &[link.port], |c| {
        // A deadline of 2 s (twice the statement timeout + 1 s).
        c.postgres.statement_timeout_ms = 500;
    })
    .await;
    let mut c = s.client().await;
    common::eventually_within(PATIENCE, "a fill answered by the replica", || {
        let mut c = c.clone();
        async move { standby_answers(&mut c).await }
    })
    .await;

    // Silent: the fill picks the replica (up at the last poll), hears nothing until the
    // deadline, and is answered by the primary.
    link.set(Mode::Blackhole);
    // A raw connection: it waits 5 s for a reply (redis-rs gives up after 500 ms).
    let mut raw = s.raw().await;
    assert_eq!(
        raw.call(&[b"EMP.GET", b"5"]).await,
        "$14\r\nEthan Williams\r\n"
    );
    assert_eq!(counter(&s, replica_errors), 1);
    // Marked down: the next fills go straight to the primary.
    assert!(!standby_answers(&mut c).await);
    assert_eq!(counter(&s, replica_errors), 1);

    link.set(Mode::Pass);
    common::eventually_within(PATIENCE, "the replica answering again", || {
        let mut c = c.clone();
        async move { standby_answers(&mut c).await }
    })
    .await;

    let replica = tokio::task::spawn_blocking(move || {
        replica.kill();
        replica
    })
    .await
    .unwrap();
    for id in [1, 2, 4] {
        assert!(emp(&mut c, id).await.is_some());
    }
    assert!(!standby_answers(&mut c).await);
    let text = info(&mut c).await;
    assert_eq!(replica_field(&text, 0, "up"), "0", "{text}");
    drop(replica);
}

/// The poll alone is not trusted: here the replica's address starts leading to another
/// standby — paused before a write — right after a poll saw the first one past that write.
/// The fill's own check on its connection finds the new server behind, and the primary
/// answers. (Polls are 5 s apart, so no poll comes in between.)
#[tokio::test(flavor = "multi_thread")]
async fn a_replica_found_behind_by_the_fills_own_check_is_not_used() {
    let (db, replicas) = db_and_replicas(2).await;
    let (ahead, behind) = (&replicas[0], &replicas[1]);
    let link = FaultProxy::start(ahead.port()).await;
    let s = start(db, &[link.port], |c| {
        c.postgres.replica_poll_ms = 5000;
    })
    .await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    common::eventually_within(PATIENCE, "a fill answered by the replica", || {
        let mut c = c.clone();
        async move { standby_answers(&mut c).await }
    })
    .await;
    assert_eq!(emp(&mut c, 1).await.as_deref(), Some("Alice Johnson"));

    behind.pause_replay();
    s.psql("UPDATE employees SET name = 'Alicia Johnson' WHERE id = 1");
    common::eventually_within(PATIENCE, "employee:1 invalidated", || {
        let mut v = v.clone();
        async move { !v.exists::<_, bool>("employee:1").await.unwrap() }
    })
    .await;
    let required = lsn(info_field(&info(&mut c).await, "replica_required_lsn"));
    // An idle primary's insert position can sit just past a page header that no replayed
    // record ends at; any later record carries the replica past it.
    s.psql("CREATE TABLE wal_tick (x int); INSERT INTO wal_tick VALUES (1)");
    // Polls come every 5 s here (so that the check below sees the fill's own reading before
    // the next poll). In full runs this wait has run out twice without the poll ever seeing
    // the replica past the write: each second without it writes another record (should the
    // replica's replay rest just short of `required`), and running out prints what the polls
    // saw, so that a third time says why.
    let started = std::time::Instant::now();
    let mut nudged = std::time::Instant::now();
    loop {
        let text = info(&mut c).await;
        if lsn(&replica_field(&text, 0, "replay_lsn")) >= required {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE * 3,
            "no poll saw the replica past {required:X}; the primary is at {}; INFO: {text}",
            s.psql("SELECT pg_current_wal_insert_lsn()")
        );
        if nudged.elapsed() >= Duration::from_secs(1) {
            s.psql("INSERT INTO wal_tick VALUES (1)");
            nudged = std::time::Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    link.retarget(behind.port());
    link.cut();
    // Let cachefront's side notice that its pooled connections are gone (otherwise a fill
    // could meet a dead connection rather than the server behind: a different path).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        name_on(behind, &s.db, 1),
        "Alice Johnson",
        "the new server must lag"
    );
    let (fills, fallbacks) = (counter(&s, replica_fills), counter(&s, replica_fallbacks));
    assert_eq!(emp(&mut c, 1).await.as_deref(), Some("Alicia Johnson"));
    let stored: Option<String> = v.get("employee:1").await.unwrap();
    assert_eq!(stored.as_deref(), Some("Alicia Johnson"));
    assert_eq!(counter(&s, replica_fallbacks), fallbacks + 1);
    assert_eq!(counter(&s, replica_fills), fills);
    assert_eq!(counter(&s, replica_errors), 0, "found behind, not failed");
    // What the fill's check saw, until the next poll sees the same.
    let text = info(&mut c).await;
    assert!(
        lsn(&replica_field(&text, 0, "replay_lsn")) < required,
        "{text}"
    );
    behind.resume_replay();
}
