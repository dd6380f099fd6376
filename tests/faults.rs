//! Faults: Valkey killed, paused or restarted; PostgreSQL killed; clients that stop reading
//! or go idle; shutdown with replies in flight. No crash, no reply to the wrong client, and
//! recovery within a stated time.

mod common;

use common::services::{postgres, start_private_postgres, Valkey};
use common::{config_for, Raw, Stack};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Calls until `want(reply)` holds; returns how long it took (fails after `limit`).
async fn until(
    raw: &mut Raw,
    args: &[&[u8]],
    limit: Duration,
    want: impl Fn(&str) -> bool,
) -> Duration {
    let what = format!(
        "the wanted reply to {:?}",
        args.iter()
            .map(|a| String::from_utf8_lossy(a))
            .collect::<Vec<_>>()
    );
    common::eventually_within(limit, &what, async || want(&raw.call(args).await)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn valkey_killed_and_restarted_empty() {
    let mut s = Stack::start().await;
    let mut raw = s.raw().await;
    assert_eq!(raw.call(&[b"SET", b"k", b"v"]).await, "+OK\r\n");
    assert_eq!(
        raw.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    s.valkey.kill();
    // Pass-through fails promptly with -UPSTREAM; cached commands answer from PostgreSQL.
    let started = Instant::now();
    let r = raw.call(&[b"GET", b"k"]).await;
    assert!(r.starts_with("-UPSTREAM"), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(raw.call(&[b"EMP.GET", b"2"]).await, "$9\r\nBob Smith\r\n");
    assert!(s.proxy.shared.metrics.fail_open.load(Ordering::Relaxed) >= 1);
    s.valkey.restart();
    let took = until(
        &mut raw,
        &[b"SET", b"k", b"again"],
        Duration::from_secs(5),
        |r| r == "+OK\r\n",
    )
    .await;
    eprintln!("pass-through recovered {took:?} after Valkey came back");
    assert_eq!(raw.call(&[b"GET", b"k"]).await, "$5\r\nagain\r\n");
    // The cache works again too: misses are stored in the new, empty Valkey.
    let mut v = s.valkey_client().await;
    let started = Instant::now();
    loop {
        assert_eq!(
            raw.call(&[b"EMP.GET", b"3"]).await,
            "$13\r\nCharlie Brown\r\n"
        );
        let stored: Option<String> = redis::AsyncCommands::get(&mut v, "employee:3")
            .await
            .unwrap();
        if stored.as_deref() == Some("Charlie Brown") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "fills never stored again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "fills stored again {:?} after pass-through recovered",
        started.elapsed()
    );
}

/// The cache's own writes share the pass-through's connections: once a pass-through command
/// works after Valkey comes back, the very next miss is stored, not refused by a second
/// client that is still reconnecting on its own schedule. (A pass-through `SET`, not `PING`,
/// which cachefront answers itself.)
#[tokio::test(flavor = "multi_thread")]
async fn a_fill_works_as_soon_as_pass_through_does_after_a_valkey_restart() {
    let mut s = Stack::start().await;
    let mut raw = s.raw().await;
    assert_eq!(
        raw.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    s.valkey.kill();
    // Misses while Valkey is down are answered from PostgreSQL and stored nowhere.
    assert_eq!(raw.call(&[b"EMP.GET", b"2"]).await, "$9\r\nBob Smith\r\n");
    assert_eq!(
        raw.call(&[b"EMP.GET", b"3"]).await,
        "$13\r\nCharlie Brown\r\n"
    );
    s.valkey.restart();
    until(
        &mut raw,
        &[b"SET", b"k", b"v"],
        Duration::from_secs(5),
        |r| r == "+OK\r\n",
    )
    .await;
    let metrics = &s.proxy.shared.metrics;
    let (fills, fail_open) = (
        metrics.fills.load(Ordering::Relaxed),
        metrics.fail_open.load(Ordering::Relaxed),
    );
    assert_eq!(
        raw.call(&[b"EMP.GET", b"4"]).await,
        "$11\r\nDiana Evans\r\n"
    );
    assert_eq!(metrics.fail_open.load(Ordering::Relaxed), fail_open);
    assert_eq!(metrics.fills.load(Ordering::Relaxed), fills + 1);
    let mut v = s.valkey_client().await;
    let stored: Option<String> = redis::AsyncCommands::get(&mut v, "employee:4")
        .await
        .unwrap();
    assert_eq!(stored.as_deref(), Some("Diana Evans"));
}

#[tokio::test(flavor = "multi_thread")]
async fn valkey_paused_fails_fast_and_no_reply_goes_astray() {
    let s = Stack::start_with(|c| c.valkey.command_timeout_ms = 500).await;
    let mut a = s.raw().await;
    let mut b = s.raw().await;
    assert_eq!(a.call(&[b"SET", b"a", b"from-a"]).await, "+OK\r\n");
    assert_eq!(b.call(&[b"SET", b"b", b"from-b"]).await, "+OK\r\n");
    s.valkey.pause();
    let started = Instant::now();
    a.cmd(&[b"GET", b"a"]).await;
    b.cmd(&[b"GET", b"b"]).await;
    let ra = a.frame().await;
    let rb = b.frame().await;
    assert!(
        ra.starts_with("-UPSTREAM") && rb.starts_with("-UPSTREAM"),
        "{ra} {rb}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    s.valkey.resume();
    // The late replies to the timed-out requests were discarded with their connection:
    // each client now gets exactly its own answers.
    until(&mut a, &[b"GET", b"a"], Duration::from_secs(5), |r| {
        r == "$6\r\nfrom-a\r\n"
    })
    .await;
    for _ in 0..20 {
        assert_eq!(a.call(&[b"GET", b"a"]).await, "$6\r\nfrom-a\r\n");
        assert_eq!(b.call(&[b"GET", b"b"]).await, "$6\r\nfrom-b\r\n");
    }
}

/// A client's pipeline read in one go goes to Valkey as one run (`connection::run`), its
/// replies back through one inbox: cut off by a lost connection, every request of it is
/// still answered — the ones Valkey never answered with an error — and the client's next
/// pipeline gets exactly its own replies, in order.
#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_cut_off_by_a_lost_connection_answers_every_request() {
    let s = Stack::start_with(|c| c.valkey.command_timeout_ms = 500).await;
    let mut a = s.raw().await;
    assert_eq!(a.call(&[b"SET", b"a", b"from-a"]).await, "+OK\r\n");
    let pipeline = |n: usize| {
        let mut bytes = Vec::new();
        for i in 0..n {
            let key = if i % 2 == 0 { "a" } else { "missing" };
            bytes.extend_from_slice(
                format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len()).as_bytes(),
            );
        }
        bytes
    };
    s.valkey.pause();
    a.send(&pipeline(20)).await;
    for i in 0..20 {
        let r = a.frame().await;
        assert!(r.starts_with("-UPSTREAM"), "reply {i}: {r}");
    }
    s.valkey.resume();
    until(&mut a, &[b"GET", b"a"], Duration::from_secs(5), |r| {
        r == "$6\r\nfrom-a\r\n"
    })
    .await;
    a.send(&pipeline(20)).await;
    for i in 0..20 {
        let want = if i % 2 == 0 {
            "$6\r\nfrom-a\r\n"
        } else {
            "$-1\r\n"
        };
        assert_eq!(a.frame().await, want, "reply {i}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn postgres_killed_hits_served_misses_fail_fast_and_recover() {
    let pg = start_private_postgres();
    let db = pg.fresh_db();
    let valkey = Valkey::start();
    let mut cfg = config_for(&valkey, &db);
    cfg.postgres.connect_timeout_ms = 500;
    let proxy = cachefront::server::spawn(cfg).await.unwrap();
    let mut raw = Raw::connect(proxy.addr.port()).await;
    let listening = Instant::now();
    while !proxy.shared.is_listening() {
        assert!(listening.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        raw.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    pg.kill();
    // Hits are still served.
    assert_eq!(
        raw.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    // Misses fail within the deadline, with a DBERR.
    let mut errors = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        let r = raw.call(&[b"EMP.GET", b"2"]).await;
        assert!(r.starts_with("-DBERR"), "{r}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        errors.push(r);
    }
    // After repeated failures the breaker answers at once instead of reconnecting each time.
    assert!(
        errors.iter().any(|e| e.contains("not trying again")),
        "{errors:?}"
    );
    pg.restart();
    let took = until(
        &mut raw,
        &[b"EMP.GET", b"2"],
        Duration::from_secs(15),
        |r| r == "$9\r\nBob Smith\r\n",
    )
    .await;
    eprintln!("misses recovered {took:?} after PostgreSQL came back");
    drop(db);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_is_dropped_and_others_carry_on() {
    let s = Stack::start_with(|c| c.limits.client_write_timeout_ms = 300).await;
    let mut v = s.valkey_client().await;
    let big = "x".repeat(1024 * 1024);
    let _: () = redis::AsyncCommands::set(&mut v, "big", &big)
        .await
        .unwrap();
    let mut lazy = s.raw().await;
    let get = cachefront::protocol::Request::from_args([&b"GET"[..], b"big"]).raw;
    for _ in 0..64 {
        lazy.send(&get).await;
    }
    let mut other = s.raw().await;
    assert_eq!(other.call(&[b"PING"]).await, "+PONG\r\n");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        lazy.closed().await,
        "a client that never reads is disconnected"
    );
    assert_eq!(other.call(&[b"PING"]).await, "+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_clients_time_out_like_valkey() {
    let s = Stack::start_with(|c| c.limits.timeout_secs = 1).await;
    let mut idle = s.raw().await;
    assert_eq!(idle.call(&[b"PING"]).await, "+PONG\r\n");
    let mut subscriber = s.raw().await;
    subscriber.cmd(&[b"SUBSCRIBE", b"news"]).await;
    subscriber.frame().await;
    let started = Instant::now();
    assert!(idle.closed().await);
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    // Subscribers are exempt, as in Valkey.
    let mut publisher = s.raw().await;
    assert_eq!(
        publisher.call(&[b"PUBLISH", b"news", b"hi"]).await,
        ":1\r\n"
    );
    assert!(subscriber.frame().await.contains("hi"));
}

#[tokio::test(flavor = "multi_thread")]
async fn denied_commands_get_noperm() {
    let s = Stack::start_with(|c| c.auth.deny_commands = vec!["FLUSHALL".into(), "config".into()])
        .await;
    let mut raw = s.raw().await;
    assert_eq!(
        raw.call(&[b"flushall"]).await,
        "-NOPERM User default has no permissions to run the 'flushall' command\r\n"
    );
    assert!(raw
        .call(&[b"CONFIG", b"GET", b"maxmemory"])
        .await
        .starts_with("-NOPERM"));
    assert_eq!(raw.call(&[b"PING"]).await, "+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_replies_in_flight() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    // A slow reply in flight (a 300 ms query) when shutdown starts.
    raw.cmd(&[
        b"SQL.CACHED",
        b"SELECT pg_catalog.count(*) AS n FROM generate_series(1, 3000000)",
    ])
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let Stack { proxy, valkey, db } = s;
    let stop = tokio::spawn(proxy.shutdown());
    let r = raw.frame().await;
    assert!(r.contains(r#"[{"n": 3000000}]"#), "{r}");
    assert!(raw.closed().await, "closed after the reply");
    stop.await.unwrap();
    drop((valkey, db));
    let _ = postgres();
}

/// Clients that each write and read back their own key in a loop, counting answers that are
/// neither theirs nor an error: a reply that reached the wrong client.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(u64, u64, u64)>>,
}

impl Load {
    fn start(port: u16, clients: usize) -> Load {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|i| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let mut raw = Raw::connect(port).await;
                    let (mut ok, mut errors, mut wrong) = (0u64, 0u64, 0u64);
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let key = format!("load:{i}");
                        let val = format!("{i}-{n}");
                        let set = raw.call(&[b"SET", key.as_bytes(), val.as_bytes()]).await;
                        let get = raw.call(&[b"GET", key.as_bytes()]).await;
                        if set.starts_with('-') || get.starts_with('-') {
                            errors += 1;
                        } else if get == format!("${}\r\n{val}\r\n", val.len()) {
                            ok += 1;
                        } else {
                            wrong += 1;
                        }
                    }
                    (ok, errors, wrong)
                })
            })
            .collect();
        Load { stop, tasks }
    }

    /// Stops the clients; returns (good round trips, errors, wrong replies).
    async fn finish(self) -> (u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        let mut t = (0, 0, 0);
        for h in self.tasks {
            let (a, b, c) = h.await.unwrap();
            t = (t.0 + a, t.1 + b, t.2 + c);
        }
        t
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_silent_and_broken_links_to_valkey() {
    let valkey = Valkey::start();
    let db = postgres().fresh_db();
    let link = common::faultproxy::FaultProxy::start(valkey.port()).await;
    let mut cfg = config_for(&valkey, &db);
    cfg.valkey.url = format!("redis://127.0.0.1:{}", link.port);
    cfg.valkey.command_timeout_ms = 300;
    cfg.valkey.connect_timeout_ms = 300;
    let proxy = cachefront::server::spawn(cfg).await.unwrap();
    let port = proxy.addr.port();
    let load = Load::start(port, 8);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut probe = Raw::connect(port).await;
    for (name, mode) in [
        (
            "slow",
            common::faultproxy::Mode::Delay(Duration::from_millis(800)),
        ),
        ("silent", common::faultproxy::Mode::Blackhole),
    ] {
        link.set(mode);
        // Pass-through fails within the command timeout instead of hanging…
        let started = Instant::now();
        let r = probe.call(&[b"GET", b"probe"]).await;
        assert!(r.starts_with("-UPSTREAM"), "{name}: {r}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{name}: {:?}",
            started.elapsed()
        );
        // …and cached commands fall back to PostgreSQL.
        assert_eq!(
            probe.call(&[b"EMP.GET", b"2"]).await,
            "$9\r\nBob Smith\r\n",
            "{name}"
        );
        link.set(common::faultproxy::Mode::Pass);
        let took = until(
            &mut probe,
            &[b"SET", b"probe", b"x"],
            Duration::from_secs(5),
            |r| r == "+OK\r\n",
        )
        .await;
        eprintln!("{name} link: recovered {took:?} after the link healed");
    }
    // Broken: every connection cut at once, then new ones refused for a moment.
    link.cut();
    link.set(common::faultproxy::Mode::Refuse);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(probe
        .call(&[b"GET", b"probe"])
        .await
        .starts_with("-UPSTREAM"));
    link.set(common::faultproxy::Mode::Pass);
    let took = until(
        &mut probe,
        &[b"GET", b"probe"],
        Duration::from_secs(5),
        |r| r == "$1\r\nx\r\n",
    )
    .await;
    eprintln!("cut link: recovered {took:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, errors, wrong) = load.finish().await;
    eprintln!(
        "load during link faults: {ok} good round trips, {errors} errors, {wrong} wrong replies"
    );
    assert_eq!(wrong, 0, "a reply reached the wrong client");
    assert!(ok > 50, "the load made progress ({ok})");
    // Data Valkey acknowledged is there.
    let mut direct = Raw::connect(valkey.port()).await;
    assert_eq!(direct.call(&[b"GET", b"probe"]).await, "$1\r\nx\r\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_and_partitioned_postgres() {
    let valkey = Valkey::start();
    let db = postgres().fresh_db();
    let link = common::faultproxy::FaultProxy::start(db.port()).await;
    let mut cfg = config_for(&valkey, &db);
    cfg.postgres.url = format!("postgres://postgres@127.0.0.1:{}/{}", link.port, db.name());
    cfg.postgres.statement_timeout_ms = 500;
    cfg.postgres.connect_timeout_ms = 500;
    cfg.cache.stale_if_error_secs = 60;
    let proxy = cachefront::server::spawn(cfg).await.unwrap();
    let mut raw = Raw::connect(proxy.addr.port()).await;
    let t = Instant::now();
    while !proxy.shared.is_listening() {
        assert!(t.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        raw.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    assert_eq!(
        raw.call(&[b"EMP.GET", b"3"]).await,
        "$13\r\nCharlie Brown\r\n"
    );
    // Drop employee 3 from the cache so the next read must query (stale-if-error can serve it).
    let mut direct = Raw::connect(valkey.port()).await;
    direct.call(&[b"DEL", b"employee:3"]).await;
    link.set(common::faultproxy::Mode::Blackhole);
    // Hits are still served.
    assert_eq!(
        raw.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    // A miss with no stale copy fails within the deadline.
    let started = Instant::now();
    let r = raw.call(&[b"EMP.GET", b"2"]).await;
    assert!(r.starts_with("-DBERR"), "{r}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    // A miss with a recent stale copy is answered with it (stale-if-error).
    assert_eq!(
        raw.call(&[b"EMP.GET", b"3"]).await,
        "$13\r\nCharlie Brown\r\n"
    );
    assert!(proxy.shared.metrics.stale_served.load(Ordering::Relaxed) >= 1);
    link.set(common::faultproxy::Mode::Pass);
    link.cut();
    let took = until(
        &mut raw,
        &[b"EMP.GET", b"2"],
        Duration::from_secs(15),
        |r| r == "$9\r\nBob Smith\r\n",
    )
    .await;
    eprintln!("misses recovered {took:?} after the PostgreSQL link healed");
}

/// `INFO cachefront` as cachefront reports it.
fn info(s: &Stack, name: &str) -> String {
    common::info_field(&s.proxy.shared.info_section(), name).to_string()
}

/// A Valkey out of memory refuses the invalidation of a write: the table's reads come fresh
/// from PostgreSQL (counted) while its stale entry sits in Valkey; other tables are still hit;
/// once Valkey takes writes again the invalidation applies by itself and hits resume.
#[tokio::test(flavor = "multi_thread")]
async fn valkey_out_of_memory_degrades_the_written_table_until_it_recovers() {
    let s = Stack::start().await;
    common::eventually_within(Duration::from_secs(5), "listener up", async || {
        s.proxy.shared.is_listening()
    })
    .await;
    let mut raw = s.raw().await;
    let depts: &[&[u8]] = &[b"SQL.CACHED", b"SELECT name FROM departments ORDER BY id"];
    let charlie = "$13\r\nCharlie Brown\r\n";
    assert_eq!(raw.call(&[b"EMP.GET", b"3"]).await, charlie);
    let depts_before = raw.call(depts).await;
    let mut v = s.valkey_client().await;
    let admin = v.clone();
    let config = |k: &'static str, val: &'static str| {
        let mut v = admin.clone();
        async move {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg(k)
                .arg(val)
                .query_async(&mut v)
                .await
                .unwrap();
        }
    };
    config("maxmemory-policy", "noeviction").await;
    config("maxmemory", "1").await;
    s.pg()
        .await
        .execute(
            "UPDATE employees SET name = 'Charles Brown' WHERE id = 3",
            &[],
        )
        .await
        .unwrap();
    let took = common::eventually_within(Duration::from_secs(3), "degraded", async || {
        info(&s, "invalidation_degraded") == "1"
    })
    .await;
    eprintln!("degraded {took:?} after the write");
    assert_eq!(info(&s, "invalidation_degraded_tables"), "1");
    // The stale entry is still in Valkey, but not served.
    let stale: String = redis::AsyncCommands::get(&mut v, "employee:3")
        .await
        .unwrap();
    assert_eq!(stale, "Charlie Brown");
    let m = &s.proxy.shared.metrics;
    let before = m.degraded_reads.load(Ordering::Relaxed);
    for _ in 0..3 {
        assert_eq!(
            raw.call(&[b"EMP.GET", b"3"]).await,
            "$13\r\nCharles Brown\r\n"
        );
    }
    assert_eq!(m.degraded_reads.load(Ordering::Relaxed), before + 3);
    // Another table's entries are still served from the cache.
    let hits = m.hits.load(Ordering::Relaxed);
    assert_eq!(raw.call(depts).await, depts_before);
    assert_eq!(m.hits.load(Ordering::Relaxed), hits + 1);
    config("maxmemory", "0").await;
    let took = common::eventually_within(Duration::from_secs(5), "recovered", async || {
        info(&s, "invalidation_degraded") == "0"
    })
    .await;
    eprintln!("recovered {took:?} after Valkey took writes again");
    assert_eq!(info(&s, "invalidation_pending_tables"), "0");
    let stale: Option<String> = redis::AsyncCommands::get(&mut v, "employee:3")
        .await
        .unwrap();
    assert_eq!(stale, None, "the invalidation was applied");
    // Hits resume: a fill is stored, then served.
    assert_eq!(
        raw.call(&[b"EMP.GET", b"3"]).await,
        "$13\r\nCharles Brown\r\n"
    );
    let hits = m.hits.load(Ordering::Relaxed);
    assert_eq!(
        raw.call(&[b"EMP.GET", b"3"]).await,
        "$13\r\nCharles Brown\r\n"
    );
    assert_eq!(m.hits.load(Ordering::Relaxed), hits + 1);
}
