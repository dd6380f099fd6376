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
    let started = Instant::now();
    loop {
        let r = raw.call(args).await;
        if want(&r) {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "still {r:?} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
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
