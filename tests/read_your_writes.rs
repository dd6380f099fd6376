//! Read-your-writes (issue 14, part 5): after a commit, an application reads
//! `pg_current_wal_lsn()`, passes it with `CACHEFRONT.AFTER`, and every cached read that
//! follows — on any instance of the fleet — reflects at least that write, under a concurrent
//! write load and concurrent cached readers (which keep refilling the cache and the L1 with
//! whatever they read). Both change sources; two instances, reads alternating between them.
//! Also: a token no applier reaches (bounded wait, then `-TRYAGAIN`), and garbage tokens
//! (a clear error, nothing lost).
//!
//! Run with `--nocapture` for the figures (waits p50/p99, answers checked, stale answers).

mod common;

use cachefront::server::Running;
use common::fresh::set_source;
use common::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The token an application passes after its commit: the WAL insert position, valid
/// whatever its `synchronous_commit`.
async fn token(pg: &tokio_postgres::Client) -> String {
    pg.query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .expect("token")
        .get(0)
}

/// Writes checked per source.
const WRITES: usize = 300;

const SQL: &str = "SELECT name FROM employees WHERE id = 1";

/// A redis-rs connection that waits for a reply as long as the slowest read may take here
/// (redis-rs gives up after 500 ms by default).
async fn patient(url: &str) -> redis::aio::MultiplexedConnection {
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    redis::Client::open(url)
        .expect("redis URL")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

fn url(node: &Running) -> String {
    format!("redis://127.0.0.1:{}", node.addr.port())
}

/// Waits until both instances listen and one of them holds the invalidation lease.
async fn settled(nodes: &[&Running]) {
    eventually("every instance listening, one lease holder", async || {
        let mut holders = 0;
        for n in nodes {
            let info = info_cachefront(&mut connect(&url(n)).await).await;
            if info_field(&info, "invalidation_listening") != "1" {
                return false;
            }
            holders += usize::from(info_field(&info, "invalidation_lease_holder") == "1");
        }
        holders == 1
    })
    .await;
}

/// A bulk string reply's text; `None` for nil.
fn bulk(frame: &str) -> Option<String> {
    if frame == "$-1\r\n" {
        return None;
    }
    let (_, rest) = frame
        .split_once("\r\n")
        .unwrap_or_else(|| panic!("a bulk string: {frame:?}"));
    assert!(frame.starts_with('$'), "a bulk string: {frame:?}");
    Some(rest.strip_suffix("\r\n").unwrap_or(rest).to_string())
}

/// The percentile `p` (0–100) of sorted durations, in milliseconds.
fn pct(sorted: &[Duration], p: usize) -> f64 {
    let i = ((sorted.len() * p).div_ceil(100)).saturating_sub(1);
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

async fn under_load(source: &'static str) {
    let stack = Stack::start_with(|c| set_source(c, source)).await;
    let other = stack.another(|c| set_source(c, source)).await;
    settled(&[&stack.proxy, &other]).await;
    let urls = [stack.proxy_url(), url(&other)];

    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    // The write load: other rows of the same table, as fast as PostgreSQL takes them.
    {
        let pg = stack.pg().await;
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = 2 + (n % 5) as i32;
                pg.execute(
                    "UPDATE employees SET job_title = $1 WHERE id = $2",
                    &[&format!("load-{n}"), &id],
                )
                .await
                .expect("load write");
                n += 1;
            }
            n
        }));
    }
    // Readers without a floor on both instances: they refill the cache and the L1 with
    // whatever they read, racing every write.
    for u in &urls {
        let mut c = patient(u).await;
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _: Option<String> = redis::cmd("EMP.GET")
                    .arg(1)
                    .query_async(&mut c)
                    .await
                    .expect("EMP.GET");
                let _: String = redis::cmd("SQL.CACHED")
                    .arg(SQL)
                    .query_async(&mut c)
                    .await
                    .expect("SQL.CACHED");
                n += 1;
            }
            n
        }));
    }

    // Two writers: one committing synchronously, whose token is `pg_current_wal_lsn()`; one
    // committing asynchronously (the test server's default), whose commit record may not be
    // written yet when the commit returns, so its token is `pg_current_wal_insert_lsn()`.
    let sync_writer = stack.pg().await;
    sync_writer
        .batch_execute("SET synchronous_commit = on")
        .await
        .expect("SET synchronous_commit");
    let async_writer = stack.pg().await;
    let writers = [
        (&sync_writer, "SELECT pg_current_wal_lsn()::text"),
        (&async_writer, "SELECT pg_current_wal_insert_lsn()::text"),
    ];
    // Raw connections, so each reply's arrival can be timed.
    let mut readers = [
        Raw::connect(stack.proxy_port()).await,
        Raw::connect(other.addr.port()).await,
    ];
    let mut plain = [patient(&urls[0]).await, patient(&urls[1]).await];
    let mut waits = Vec::with_capacity(WRITES);
    let mut totals = Vec::with_capacity(WRITES);
    let mut unfloored = Vec::with_capacity(WRITES);
    let (mut checked, mut stale) = (0usize, 0usize);
    for i in 0..WRITES {
        let name = format!("w-{source}-{i}");
        let (writer, token) = writers[(i / 2) % 2];
        writer
            .execute("UPDATE employees SET name = $1 WHERE id = 1", &[&name])
            .await
            .expect("write");
        let lsn: String = writer.query_one(token, &[]).await.expect("token").get(0);
        // Written through one instance's database, read through the other half the time.
        // One pipeline: the floor, a read of a cached constant (its reply comes when the wait
        // is over: a hit), then the two reads of the row written.
        let r = &mut readers[i % 2];
        let started = Instant::now();
        let mut pipeline = encode_line(&format!("CACHEFRONT.AFTER {lsn}"));
        pipeline.extend(encode_line("SQL.CACHED \"SELECT 1 AS one\""));
        pipeline.extend(encode_line("EMP.GET 1"));
        pipeline.extend(encode_line(&format!("SQL.CACHED \"{SQL}\"")));
        r.send(&pipeline).await;
        assert_eq!(r.frame().await, "+OK\r\n");
        let one = r.frame().await;
        waits.push(started.elapsed());
        assert!(one.ends_with("[{\"one\": 1}]\r\n"), "{one}");
        let emp = bulk(&r.frame().await);
        let json = bulk(&r.frame().await).unwrap_or_else(|| panic!("SQL.CACHED after {lsn}"));
        totals.push(started.elapsed());
        // The same reads without a floor, for comparison (they may be stale: not checked).
        let started = Instant::now();
        let _: (Option<String>, String) = redis::pipe()
            .cmd("EMP.GET")
            .arg(1)
            .cmd("SQL.CACHED")
            .arg(SQL)
            .query_async(&mut plain[i % 2])
            .await
            .expect("reads without a floor");
        unfloored.push(started.elapsed());
        checked += 2;
        if emp.as_deref() != Some(name.as_str()) {
            stale += 1;
            eprintln!("stale EMP.GET after {lsn}: {emp:?}, wrote {name}");
        }
        let got: serde_json::Value = serde_json::from_str(&json).expect("JSON rows");
        if got != serde_json::json!([{ "name": name }]) {
            stale += 1;
            eprintln!("stale SQL.CACHED after {lsn}: {json}, wrote {name}");
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut counts = Vec::new();
    for t in tasks {
        counts.push(t.await.expect("task"));
    }
    waits.sort();
    totals.sort();
    unfloored.sort();
    let mut info = String::new();
    for u in &urls {
        let i = info_cachefront(&mut connect(u).await).await;
        info.push_str(&format!(
            "[waited {} timeouts {} barriers {}] ",
            info_field(&i, "read_after_waits"),
            info_field(&i, "read_after_timeouts"),
            info_field(&i, "read_after_barriers"),
        ));
    }
    eprintln!(
        "read-your-writes, source {source}, 2 instances: waits p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; \
         with the two reads (fills) p50 {:.2} ms, p99 {:.2} ms \
         (the two reads without a floor: p50 {:.2} ms, p99 {:.2} ms); \
         answers checked {checked}, stale answers: {stale}; load writes {}, unfloored reads {} + {}; {info}",
        pct(&waits, 50),
        pct(&waits, 99),
        pct(&waits, 100),
        pct(&totals, 50),
        pct(&totals, 99),
        pct(&unfloored, 50),
        pct(&unfloored, 99),
        counts[0],
        counts[1],
        counts[2],
    );
    assert_eq!(stale, 0, "every answer reflects its own write");
    assert_eq!(checked, 2 * WRITES);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_reflects_its_write_triggers() {
    under_load("triggers").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_reflects_its_write_wal() {
    under_load("wal").await;
}

/// A token no applier reaches: the read waits its bound, then `-TRYAGAIN` naming the position
/// and the wait; the connection goes on. Garbage tokens: a clear error, and the floor the
/// connection had is kept (a pipelined read still waits for it, and is answered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_wait_and_bad_tokens() {
    let stack = Stack::start_with(|c| c.invalidation.read_after_timeout_ms = 300).await;
    settled(&[&stack.proxy]).await;
    let mut r = stack.raw().await;
    assert_eq!(
        call_line(&mut r, "EMP.GET 1").await,
        "$13\r\nAlice Johnson\r\n"
    );

    // From the future: the configured bound, then TRYAGAIN.
    assert_eq!(
        call_line(&mut r, "CACHEFRONT.AFTER FFFFFFFF/0").await,
        "+OK\r\n"
    );
    let started = Instant::now();
    let reply = call_line(&mut r, "EMP.GET 1").await;
    let waited = started.elapsed();
    assert_eq!(
        reply,
        "-TRYAGAIN cachefront has not applied invalidations up to FFFFFFFF/0 yet (waited 300 ms)\r\n"
    );
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    // The connection's own bound.
    assert_eq!(
        call_line(&mut r, "CACHEFRONT.AFTER FFFFFFFF/0 TIMEOUT 50").await,
        "+OK\r\n"
    );
    let reply = call_line(&mut r, "SQL.CACHED \"SELECT 1 AS one\"").await;
    assert!(
        reply.starts_with("-TRYAGAIN") && reply.contains("(waited 50 ms)"),
        "{reply}"
    );
    // A floor is never lowered by a later, older token; RESET clears it.
    assert_eq!(call_line(&mut r, "CACHEFRONT.AFTER 0/0").await, "+OK\r\n");
    assert!(call_line(&mut r, "EMP.GET 1")
        .await
        .starts_with("-TRYAGAIN"));
    assert_eq!(call_line(&mut r, "RESET").await, "+RESET\r\n");
    assert_eq!(
        call_line(&mut r, "EMP.GET 1").await,
        "$13\r\nAlice Johnson\r\n"
    );

    // Garbage: refused, naming the token and the expected form. (The test server commits
    // asynchronously, so tokens here are `pg_current_wal_insert_lsn()`: `pg_current_wal_lsn()`
    // may still be before such a commit — a run that used it once answered the old name.)
    let pg = stack.pg().await;
    let lsn = token(&pg).await;
    assert_eq!(
        call_line(&mut r, &format!("CACHEFRONT.AFTER {lsn}")).await,
        "+OK\r\n"
    );
    for bad in ["nope", "0x16/0", "1/2/3", "-1/0", "123456789/0", "1/"] {
        let reply = call_line(&mut r, &format!("CACHEFRONT.AFTER {bad}")).await;
        assert_eq!(
            reply,
            format!("-ERR invalid LSN '{bad}': expected a PostgreSQL WAL position as text (X/Y in hex), e.g. the result of SELECT pg_current_wal_lsn() after the commit\r\n")
        );
    }
    for (line, want) in [
        ("CACHEFRONT.AFTER 0/1 TIMEOUT -1", "-ERR invalid TIMEOUT"),
        (
            "CACHEFRONT.AFTER 0/1 TIMEOUT 600001",
            "-ERR invalid TIMEOUT",
        ),
        ("CACHEFRONT.AFTER 0/1 WAIT 5", "-ERR syntax error"),
        ("CACHEFRONT.AFTER", "-ERR wrong number of arguments"),
    ] {
        let reply = call_line(&mut r, line).await;
        assert!(reply.starts_with(want), "{line}: {reply}");
    }
    // Nothing lost: the valid floor still holds, and a write after it is read.
    pg.execute("UPDATE employees SET name = 'Alicia' WHERE id = 1", &[])
        .await
        .expect("write");
    let lsn = token(&pg).await;
    r.send(&encode_line(&format!("CACHEFRONT.AFTER {lsn}")))
        .await;
    r.send(&encode_line("CACHEFRONT.AFTER garbage")).await;
    r.send(&encode_line("EMP.GET 1")).await;
    assert_eq!(r.frame().await, "+OK\r\n");
    assert!(r.frame().await.starts_with("-ERR invalid LSN 'garbage'"));
    assert_eq!(r.frame().await, "$6\r\nAlicia\r\n");
    // Inside MULTI it is refused like every cachefront command.
    assert_eq!(call_line(&mut r, "MULTI").await, "+OK\r\n");
    assert!(call_line(&mut r, "CACHEFRONT.AFTER 0/1")
        .await
        .starts_with("-ERR CACHEFRONT.AFTER is not allowed inside MULTI"));
    assert!(call_line(&mut r, "EXEC").await.starts_with("-EXECABORT"));

    let info = info_cachefront(&mut stack.client().await).await;
    assert!(
        info_field(&info, "read_after_timeouts")
            .parse::<u64>()
            .unwrap_or(0)
            >= 3
    );
}

/// Without invalidation there is nothing to wait for: refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_without_invalidation() {
    let stack = Stack::start_with(|c| c.invalidation.enabled = false).await;
    let mut r = stack.raw().await;
    assert_eq!(
        call_line(&mut r, "CACHEFRONT.AFTER 0/1").await,
        "-ERR CACHEFRONT.AFTER needs invalidation, which is off on this server (invalidation.enabled = false)\r\n"
    );
}

/// An entry cached TTL-only is reached by no invalidation: under a floor it is answered from
/// PostgreSQL (stored nowhere), while a read without one still gets the cached value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_only_entries_are_read_from_postgres_under_a_floor() {
    const PLPGSQL: &str =
        "CREATE FUNCTION headcount_pl(d int) RETURNS bigint LANGUAGE plpgsql STABLE
        AS $$ BEGIN RETURN (SELECT count(*) FROM employees WHERE dept_id = d); END $$;";
    let s = common::fresh::stack_on(PLPGSQL, common::fresh::set_sql_ttl_only).await;
    settled(&[&s.proxy]).await;
    let sql = "SELECT headcount_pl(1) AS n";
    let mut c = s.client().await;
    assert_eq!(sql_cached(&mut c, sql).await, r#"[{"n": 1}]"#);
    let pg = s.pg().await;
    pg.execute(
        "INSERT INTO employees (name, job_title, dept_id) VALUES ('Zoe', 'Clerk', 1)",
        &[],
    )
    .await
    .expect("write");
    let lsn = token(&pg).await;
    // Cached until its TTL: a read without a floor still sees the old count.
    assert_eq!(sql_cached(&mut c, sql).await, r#"[{"n": 1}]"#);
    let mut floored = s.client().await;
    let _: () = redis::cmd("CACHEFRONT.AFTER")
        .arg(&lsn)
        .query_async(&mut floored)
        .await
        .expect("CACHEFRONT.AFTER");
    assert_eq!(sql_cached(&mut floored, sql).await, r#"[{"n": 2}]"#);
    assert_eq!(
        sql_cached(&mut c, sql).await,
        r#"[{"n": 1}]"#,
        "nothing stored"
    );
}

/// The instance applying changes crashes (its lease left to expire): a read under a floor on
/// the survivor waits for the takeover — the new holder flushes, then raises the watermark —
/// and reflects the write made meanwhile, within `lease_ms + lease_ms / 3` plus the wait.
async fn takeover(source: &'static str) {
    let lease_ms = 600;
    let tweak = move |c: &mut cachefront::config::Config| {
        set_source(c, source);
        c.invalidation.lease_ms = lease_ms;
        c.invalidation.read_after_timeout_ms = 5000;
    };
    let stack = Stack::start_with(tweak).await;
    let other = stack.another(tweak).await;
    settled(&[&stack.proxy, &other]).await;
    let Stack { valkey, db, proxy } = stack;
    let mut nodes = [Some(proxy), Some(other)];
    let holder = nodes
        .iter()
        .position(|n| {
            n.as_ref()
                .is_some_and(|n| n.shared.invalidation.lease().holding())
        })
        .expect("a holder");
    let survivor = nodes[1 - holder].take().expect("the other instance");
    let mut c = connect(&url(&survivor)).await;
    assert_eq!(emp_get(&mut c, 1).await.as_deref(), Some("Alice Johnson"));

    nodes[holder].take().expect("the holder").crash().await;
    let (pg, conn) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .expect("connect to postgres");
    tokio::spawn(conn);
    pg.execute(
        "UPDATE employees SET name = 'After the crash' WHERE id = 1",
        &[],
    )
    .await
    .expect("write");
    let lsn = token(&pg).await;
    // A raw client: redis-rs gives up on a reply sooner than the wait may take.
    let mut r = Raw::connect(survivor.addr.port()).await;
    let started = Instant::now();
    r.send(&encode_line(&format!("CACHEFRONT.AFTER {lsn}")))
        .await;
    r.send(&encode_line("EMP.GET 1")).await;
    assert_eq!(r.frame().await, "+OK\r\n");
    let name = r.frame().await;
    let took = started.elapsed();
    eprintln!("source {source}: read after a write during a takeover answered in {took:?}");
    assert_eq!(name, "$15\r\nAfter the crash\r\n");
    assert!(took < Duration::from_millis(5000), "{took:?}");
    drop(valkey);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_delays_but_never_breaks_it_triggers() {
    takeover("triggers").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_delays_but_never_breaks_it_wal() {
    takeover("wal").await;
}
