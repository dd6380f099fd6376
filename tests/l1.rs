//! The in-process L1: hits without a round trip, kept coherent by Valkey's client tracking,
//! by writes passed through cachefront, and by invalidations from PostgreSQL.

mod common;

use common::{emp_get as emp, Stack};
use redis::AsyncCommands;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

async fn tracking_up(s: &Stack) {
    let shared = &s.proxy.shared;
    common::eventually_within(
        Duration::from_secs(5),
        "the tracking connection",
        async || shared.upstream.tracking.current().0 != 0 && shared.is_listening(),
    )
    .await;
}

fn l1_hits(s: &Stack) -> u64 {
    s.proxy.shared.metrics.l1_hits.load(Ordering::Relaxed)
}

/// Reads `EMP.GET id` until a read is served from the L1. (A fill whose lookup was a tracked
/// `GET` — the first, before the query's tables are known — makes Valkey report the key as
/// changed when it stores; that notice can land after the next lookup's insert and drop it
/// once, so the first L1 hit may take a few reads.)
async fn warm_l1(s: &Stack, c: &mut redis::aio::MultiplexedConnection, id: i64) {
    until_l1_hit(s, c, id, None).await;
}

/// Reads `EMP.GET id` — which must answer `want`, if given — until a read is served from the
/// L1 (5 s at most).
async fn until_l1_hit(
    s: &Stack,
    c: &mut redis::aio::MultiplexedConnection,
    id: i64,
    want: Option<&str>,
) {
    common::eventually_within(Duration::from_secs(5), "a hit from the L1", async || {
        let before = l1_hits(s);
        let got = emp(c, id).await;
        if let Some(want) = want {
            assert_eq!(got.as_deref(), Some(want));
        }
        l1_hits(s) > before
    })
    .await;
}

/// Reads EMP.GET until it returns `want` (2 s at most); returns how long it took.
async fn until_value(c: &mut redis::aio::MultiplexedConnection, id: i64, want: &str) -> Duration {
    common::eventually_within(Duration::from_secs(2), want, async || {
        emp(c, id).await.as_deref() == Some(want)
    })
    .await
}

/// A number from Valkey's `INFO <section>`: the line starting with `prefix`, up to a comma;
/// `None` if there is no such line.
async fn info_number(
    v: &mut redis::aio::MultiplexedConnection,
    section: &str,
    prefix: &str,
) -> Option<u64> {
    let info: String = redis::cmd("INFO")
        .arg(section)
        .query_async(v)
        .await
        .expect("INFO");
    info.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .and_then(|n| n.split(',').next()?.trim().parse().ok())
}

/// How many keys Valkey tracks for its clients (`INFO stats`).
async fn tracked_keys(v: &mut redis::aio::MultiplexedConnection) -> u64 {
    info_number(v, "stats", "tracking_total_keys:")
        .await
        .expect("tracking_total_keys in INFO stats")
}

/// Valkey tracks for the L1 only what the L1 may hold: a miss's lookup, which is also its
/// fill's first step, leaves no key tracked — not the absent entry, not its versions, not
/// the fill lease — so neither taking the lease, nor the fill's own store, nor a later
/// version bump sends cachefront an invalidation; the next lookup, a hit, tracks its entry.
#[tokio::test(flavor = "multi_thread")]
async fn a_miss_tracks_nothing_and_a_hit_only_its_entry() {
    let s = Stack::start().await;
    tracking_up(&s).await;
    let mut c = s.client().await;
    // Resolves EMP.GET's query: from here its lookups are their fills' first steps.
    assert_eq!(emp(&mut c, 1).await.as_deref(), Some("Alice Johnson"));
    let mut v = s.valkey_client().await;
    let base = tracked_keys(&mut v).await;
    for id in 2..=5 {
        assert!(emp(&mut c, id).await.is_some(), "employee {id}");
    }
    assert_eq!(tracked_keys(&mut v).await, base, "misses track nothing");
    for id in 2..=5 {
        assert!(emp(&mut c, id).await.is_some(), "employee {id}");
    }
    assert_eq!(
        tracked_keys(&mut v).await,
        base + 4,
        "each hit tracks its entry alone"
    );
}

/// An instance that did not fill an entry — another instance of the fleet did, or this one
/// restarted since — serves its hits from its L1 too: its first hit from Valkey has the query
/// resolved in the background (the L1 drops items by their tables, so it holds only entries
/// whose tables it knows), without a query for the entry itself.
#[tokio::test(flavor = "multi_thread")]
async fn hits_of_an_entry_another_instance_filled_reach_the_l1() {
    let s = Stack::start().await;
    let b = s.another(|_| {}).await;
    let b_url = format!("redis://127.0.0.1:{}", b.addr.port());
    let sql = "SELECT name FROM employees WHERE id = 3";
    let mut on_a = s.client().await;
    let filled: String = redis::cmd("SQL.CACHED")
        .arg(sql)
        .query_async(&mut on_a)
        .await
        .expect("SQL.CACHED on the instance that fills");
    let mut on_b = common::connect(&b_url).await;
    let m = &b.shared.metrics;
    common::eventually(
        "the other instance serves the entry from its L1",
        async || {
            let got: String = redis::cmd("SQL.CACHED")
                .arg(sql)
                .query_async(&mut on_b)
                .await
                .expect("SQL.CACHED on the other instance");
            assert_eq!(got, filled);
            m.l1_hits.load(Ordering::Relaxed) > 0
        },
    )
    .await;
    assert_eq!(
        m.db_queries.load(Ordering::Relaxed),
        0,
        "the other instance read the entry, never PostgreSQL"
    );
}

/// Hits of entries the application wrote itself (the guide's `SETEX employee:<id>`) reach
/// the L1 without any miss in this process — which is what used to load the lookup script:
/// on a Valkey without it (new, restarted, `SCRIPT FLUSH`), the first lookup that finds it
/// missing loads it, and from then on the lookups are tracked again.
#[tokio::test(flavor = "multi_thread")]
async fn hits_reach_the_l1_on_a_valkey_that_never_saw_a_miss() {
    let s = Stack::start().await;
    tracking_up(&s).await;
    let mut v = s.valkey_client().await;
    for id in 1..=2 {
        let _: () = v
            .set_ex(
                format!("employee:{id}"),
                format!("Written by hand {id}"),
                600,
            )
            .await
            .unwrap();
    }
    let mut c = s.client().await;
    let m = &s.proxy.shared.metrics;
    until_l1_hit(&s, &mut c, 1, Some("Written by hand 1")).await;
    // The scripts gone (a `SCRIPT FLUSH`, as after a restart with persistence): hits of a
    // key not in the L1 yet still reach it.
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut v)
        .await
        .unwrap();
    until_l1_hit(&s, &mut c, 2, Some("Written by hand 2")).await;
    assert_eq!(m.misses.load(Ordering::Relaxed), 0, "nothing but hits");
    assert_eq!(m.db_queries.load(Ordering::Relaxed), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn hits_are_served_from_memory() {
    let s = Stack::start().await;
    tracking_up(&s).await;
    let mut c = s.client().await;
    assert_eq!(emp(&mut c, 1).await.as_deref(), Some("Alice Johnson")); // miss
    warm_l1(&s, &mut c, 1).await;
    let before = l1_hits(&s);
    for _ in 0..10 {
        assert_eq!(emp(&mut c, 1).await.as_deref(), Some("Alice Johnson"));
    }
    assert_eq!(l1_hits(&s) - before, 10);
    let info = s.proxy.shared.info_section();
    assert!(
        info.contains("l1_entries:1\r\n") && info.contains("l1_tracking:1\r\n"),
        "{info}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_through_cachefront_is_seen_by_the_next_read() {
    let s = Stack::start().await;
    tracking_up(&s).await;
    let mut c = s.client().await;
    warm_l1(&s, &mut c, 2).await;
    let _: () = c.set("employee:2", "Written Through").await.unwrap();
    // No waiting: the very next read must not come from the old L1 entry.
    assert_eq!(emp(&mut c, 2).await.as_deref(), Some("Written Through"));
    // Another client's write through cachefront too.
    let mut other = s.client().await;
    let _: () = other.set("employee:2", "Second Writer").await.unwrap();
    assert_eq!(emp(&mut c, 2).await.as_deref(), Some("Second Writer"));
    let _: i64 = other.del("employee:2").await.unwrap();
    assert_eq!(emp(&mut c, 2).await.as_deref(), Some("Bob Smith"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_write_straight_to_valkey_reaches_the_l1_through_tracking() {
    let s = Stack::start().await;
    tracking_up(&s).await;
    let mut c = s.client().await;
    warm_l1(&s, &mut c, 3).await;
    let mut v = s.valkey_client().await;
    let _: () = v.set("employee:3", "Changed In Valkey").await.unwrap();
    let took = until_value(&mut c, 3, "Changed In Valkey").await;
    eprintln!("tracking invalidation reached the L1 in {took:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_database_write_reaches_the_l1() {
    let s = Stack::start().await;
    tracking_up(&s).await;
    let mut c = s.client().await;
    warm_l1(&s, &mut c, 4).await;
    s.pg()
        .await
        .execute("UPDATE employees SET name = 'Diana Ross' WHERE id = 4", &[])
        .await
        .unwrap();
    until_value(&mut c, 4, "Diana Ross").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn losing_the_tracking_connection_flushes_the_l1() {
    let s = Stack::start().await;
    tracking_up(&s).await;
    let mut c = s.client().await;
    warm_l1(&s, &mut c, 5).await;
    assert_eq!(s.proxy.shared.cache.l1.usage().0, 1);
    let (generation, tracking_id) = s.proxy.shared.upstream.tracking.current();
    // Kill cachefront's tracking connection (the one subscribed to __redis__:invalidate; not
    // the one subscribed to fill announcements).
    let mut v = s.valkey_client().await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(tracking_id)
        .query_async(&mut v)
        .await
        .unwrap();
    assert_eq!(killed, 1);
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (g, _) = s.proxy.shared.upstream.tracking.current();
        if g != 0 && g != generation {
            break;
        }
        assert!(Instant::now() < deadline, "tracking did not come back");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(s.proxy.shared.cache.l1.usage().0, 0, "flushed whole");
    // And it is coherent again with the new tracking connection.
    warm_l1(&s, &mut c, 5).await;
    let _: () = v.set("employee:5", "After Reconnect").await.unwrap();
    until_value(&mut c, 5, "After Reconnect").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_l1_is_bounded_in_bytes() {
    let s = Stack::start_with(|c| c.cache.l1_max_bytes = 20_000).await;
    tracking_up(&s).await;
    let mut c = s.client().await;
    for i in 0..300 {
        let q = format!("SELECT {i} AS n, repeat('x', 200) AS pad");
        for _ in 0..2 {
            let _: String = redis::cmd("SQL.CACHED")
                .arg(&q)
                .query_async(&mut c)
                .await
                .unwrap();
        }
    }
    let (entries, bytes) = s.proxy.shared.cache.l1.usage();
    assert!(bytes <= 20_000, "{bytes} bytes in {entries} entries");
    assert!(entries > 10, "{entries}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_clients_share_a_few_upstream_connections() {
    let s = Stack::start().await;
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let port = s.proxy_port();
        tasks.push(tokio::spawn(async move {
            let mut raw = common::Raw::connect(port).await;
            let k = format!("k{i}");
            assert_eq!(raw.call(&[b"SET", k.as_bytes(), b"v"]).await, "+OK\r\n");
            assert_eq!(raw.call(&[b"GET", k.as_bytes()]).await, "$1\r\nv\r\n");
            raw
        }));
    }
    let mut open = Vec::new();
    for t in tasks {
        open.push(t.await.unwrap());
    }
    let mut v = s.valkey_client().await;
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(&mut v)
        .await
        .unwrap();
    let connected: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Shared pools (2 per protocol), tracking, cachefront's own store connection, this client.
    assert!(
        connected <= 12,
        "{connected} upstream connections for 1,000 clients"
    );
    drop(open);
}

/// Tracked lookups Valkey received: each is preceded by `CLIENT CACHING yes` (counting the
/// lookup commands themselves would count the early lookup script's own reads too).
async fn lookups_in_valkey(v: &mut redis::aio::MultiplexedConnection) -> u64 {
    // No line yet: none received.
    info_number(v, "commandstats", "cmdstat_client|caching:calls=")
        .await
        .unwrap_or(0)
}

/// Makes Valkey answer nothing for `secs` (`DEBUG SLEEP`), from a task that ends when it
/// answers again; returns once the sleep has surely begun.
async fn valkey_busy(s: &Stack, secs: &'static str) -> tokio::task::JoinHandle<()> {
    let mut sleeper = s.valkey_client().await;
    let sleep = tokio::spawn(async move {
        let _: redis::Value = redis::cmd("DEBUG")
            .arg("SLEEP")
            .arg(secs)
            .query_async(&mut sleeper)
            .await
            .expect("DEBUG SLEEP");
    });
    tokio::time::sleep(Duration::from_millis(20)).await;
    sleep
}

/// A hot item never ends: read every 10 ms for four seconds (its life is 1.6 s), it is
/// looked up again only by renewals — one read each time the last eighth of its life starts,
/// while the reads around it hit — never by a read that found it gone (then, under a
/// pipelined load, every read meanwhile would have waited for that lookup).
#[tokio::test(flavor = "multi_thread")]
async fn a_hot_item_is_renewed_before_its_life_ends() {
    let s = Stack::start_with(|c| {
        c.verify.enabled = false;
        c.cache.l1_ttl_ms = 1600;
    })
    .await;
    tracking_up(&s).await;
    let mut c = s.client().await;
    warm_l1(&s, &mut c, 1).await;
    let mut v = s.valkey_client().await;
    let renewals = || s.proxy.shared.metrics.l1_renewals.load(Ordering::Relaxed);
    let (lookups_before, renewals_before) = (lookups_in_valkey(&mut v).await, renewals());
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        assert_eq!(emp(&mut c, 1).await.as_deref(), Some("Alice Johnson"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let lookups = lookups_in_valkey(&mut v).await - lookups_before;
    let renewed = renewals() - renewals_before;
    assert!(renewed >= 2, "renewed {renewed} times in 4 s");
    assert_eq!(lookups, renewed, "every lookup was a renewal");
}

/// Forty clients reading an entry the L1 does not hold, at once, while Valkey is busy: the
/// first read's lookup is in flight when the others miss the L1, and they wait for its reply
/// instead of sending forty lookups — each gets the entry.
#[tokio::test(flavor = "multi_thread")]
async fn reads_missing_the_l1_together_send_one_lookup() {
    // The verification sampler reads entries too: off, so Valkey counts cachefront's reads.
    let s = Stack::start_with(|c| c.verify.enabled = false).await;
    tracking_up(&s).await;
    let mut c = s.client().await;
    assert_eq!(emp(&mut c, 1).await.as_deref(), Some("Alice Johnson"));
    let shared = &s.proxy.shared;
    shared.cache.l1.clear();
    let mut clients = Vec::new();
    for _ in 0..40 {
        clients.push(s.raw().await);
    }
    let mut v = s.valkey_client().await;
    let before = lookups_in_valkey(&mut v).await;
    let shared_before = shared.metrics.l1_shared_lookups.load(Ordering::Relaxed);
    // Valkey answers nothing for 300 ms: every read below reaches cachefront meanwhile.
    let sleep = valkey_busy(&s, "0.3").await;
    for r in clients.iter_mut() {
        r.cmd(&[b"EMP.GET", b"1"]).await;
    }
    for r in clients.iter_mut() {
        assert_eq!(r.frame().await, "$13\r\nAlice Johnson\r\n");
    }
    sleep.await.expect("slept");
    let sent = lookups_in_valkey(&mut v).await - before;
    let shared_now = shared.metrics.l1_shared_lookups.load(Ordering::Relaxed) - shared_before;
    assert_eq!(sent, 1, "one lookup for forty reads ({shared_now} shared)");
    assert_eq!(shared_now, 39);
}

/// A read waiting for another client's lookup is answered when Valkey's reply arrives, not
/// when that client's own queue gets to it: a slow query the other client pipelined ahead of
/// its lookup holds up nobody else.
#[tokio::test(flavor = "multi_thread")]
async fn a_shared_lookup_is_not_held_up_by_its_clients_queue() {
    let s = Stack::start().await;
    tracking_up(&s).await;
    let mut c = s.client().await;
    assert_eq!(emp(&mut c, 1).await.as_deref(), Some("Alice Johnson"));
    s.proxy.shared.cache.l1.clear();
    let mut slow = s.raw().await.patient(Duration::from_secs(30));
    // Valkey answers nothing for 100 ms, so the lookup below is still in flight when the
    // other client asks.
    let sleep = valkey_busy(&s, "0.1").await;
    // A query of a second or more, then the lookup of employee 1 behind it.
    slow.cmd(&[
        b"SQL.CACHED",
        b"SELECT pg_catalog.count(*) AS n FROM generate_series(1, 12000000)",
    ])
    .await;
    slow.cmd(&[b"EMP.GET", b"1"]).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let mut other = s.raw().await;
    let shared = || {
        s.proxy
            .shared
            .metrics
            .l1_shared_lookups
            .load(Ordering::Relaxed)
    };
    let shared_before = shared();
    let started = Instant::now();
    assert_eq!(
        other.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    let took = started.elapsed();
    assert_eq!(
        shared() - shared_before,
        1,
        "it waited for the slow client's lookup"
    );
    let first = slow.frame().await;
    let slow_took = started.elapsed();
    assert!(first.contains("12000000"), "{first}");
    assert_eq!(slow.frame().await, "$13\r\nAlice Johnson\r\n");
    sleep.await.expect("slept");
    assert!(
        took * 4 < slow_took,
        "the other client waited {took:?}; the slow query took {slow_took:?}"
    );
}
