//! EMP.GET and named queries against real Valkey and PostgreSQL.

mod common;

use common::Stack;
use redis::AsyncCommands;

#[tokio::test]
async fn miss_then_hit_with_the_guides_key_and_ttl() {
    let s = Stack::start().await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    let name: Option<String> = redis::cmd("EMP.GET")
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(name.as_deref(), Some("Alice Johnson"));
    // Stored where the guide stores it, with its TTL.
    let stored: Option<String> = v.get("employee:1").await.unwrap();
    assert_eq!(stored.as_deref(), Some("Alice Johnson"));
    let ttl: i64 = v.ttl("employee:1").await.unwrap();
    assert!((3590..=3600).contains(&ttl), "ttl {ttl}");
    // A hit is served from Valkey: change the cached value behind cachefront's back.
    let _: () = v.set("employee:1", "From Cache").await.unwrap();
    let hit: String = redis::cmd("EMP.GET")
        .arg(1)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(hit, "From Cache");
    let info: String = redis::cmd("INFO")
        .arg("cachefront")
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(
        info.contains("hits:1\r\n") && info.contains("misses:1\r\n"),
        "{info}"
    );
}

#[tokio::test]
async fn unknown_id_is_nil_and_not_cached() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    assert_eq!(raw.call(&[b"EMP.GET", b"999"]).await, "$-1\r\n");
    assert_eq!(raw.call(&[b"EMP.GET", b"-5"]).await, "$-1\r\n");
    let mut v = s.valkey_client().await;
    let exists: bool = v.exists("employee:999").await.unwrap();
    assert!(!exists);
}

#[tokio::test]
async fn invalid_ids_are_refused_without_a_query() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    for bad in [
        &b"abc"[..],
        b"1.5",
        b"01",
        b"+1",
        b" 1",
        b"",
        b"99999999999999999999",
    ] {
        let reply = raw.call(&[b"EMP.GET", bad]).await;
        assert_eq!(
            reply,
            format!(
                "-ERR invalid employee id '{}'\r\n",
                String::from_utf8_lossy(bad)
            )
        );
    }
    // In range for i64 but not for the int4 column: PostgreSQL's type check, same message.
    assert_eq!(
        raw.call(&[b"EMP.GET", b"9999999999"]).await,
        "-ERR invalid employee id '9999999999'\r\n"
    );
    assert_eq!(
        raw.call(&[b"EMP.GET"]).await,
        "-ERR wrong number of arguments for 'emp.get' command\r\n"
    );
    assert_eq!(
        raw.call(&[b"EMP.GET", b"1", b"2"]).await,
        "-ERR wrong number of arguments for 'emp.get' command\r\n"
    );
    // The connection is still usable.
    assert_eq!(raw.call(&[b"EMP.GET", b"2"]).await, "$9\r\nBob Smith\r\n");
    let info = s.proxy.shared.info_section();
    assert!(info.contains("db_queries:2\r\n"), "{info}");
}

#[tokio::test]
async fn hash_named_query_from_config_toml() {
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml")).unwrap();
    let file_cfg = cachefront::config::Config::from_toml_with_env(&text, Vec::new()).unwrap();
    let s = Stack::start_with(|c| c.queries = file_cfg.queries.clone()).await;
    let mut raw = s.raw().await;
    let expect = "*6\r\n$4\r\nname\r\n$13\r\nCharlie Brown\r\n$9\r\njob_title\r\n$17\r\nSoftware Engineer\r\n$10\r\ndepartment\r\n$2\r\nIT\r\n";
    assert_eq!(raw.call(&[b"EMP.PROFILE", b"3"]).await, expect);
    // Stored as a hash at the template's key; the hit comes back through HGETALL.
    let mut v = s.valkey_client().await;
    let job: String = v.hget("employee:3:profile", "job_title").await.unwrap();
    assert_eq!(job, "Software Engineer");
    assert_eq!(raw.call(&[b"EMP.PROFILE", b"3"]).await, expect);
    // RESP3 clients get a map.
    raw.call(&[b"HELLO", b"3"]).await;
    let r3 = raw.call(&[b"EMP.PROFILE", b"3"]).await;
    assert!(r3.starts_with("%3\r\n"), "{r3}");
    assert_eq!(raw.call(&[b"EMP.PROFILE", b"42"]).await, "_\r\n");
    let info = s.proxy.shared.info_section();
    assert!(info.contains("hits:2\r\n"), "{info}");
}

#[tokio::test]
async fn resp3_nil_and_values() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    let hello = raw.call(&[b"HELLO", b"3"]).await;
    assert!(hello.starts_with("%7\r\n"), "{hello}");
    assert_eq!(raw.call(&[b"EMP.GET", b"404"]).await, "_\r\n");
    assert_eq!(
        raw.call(&[b"EMP.GET", b"5"]).await,
        "$14\r\nEthan Williams\r\n"
    );
    assert_eq!(
        raw.call(&[b"EMP.GET", b"5"]).await,
        "$14\r\nEthan Williams\r\n"
    );
}

#[tokio::test]
async fn concurrent_misses_make_one_query() {
    let s = Stack::start().await;
    let mut handles = Vec::new();
    for _ in 0..50 {
        let url = s.proxy_url();
        handles.push(tokio::spawn(async move {
            let mut c = common::connect(&url).await;
            let n: String = redis::cmd("EMP.GET")
                .arg(4)
                .query_async(&mut c)
                .await
                .unwrap();
            n
        }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap(), "Diana Evans");
    }
    let m = &s.proxy.shared.metrics;
    let q = m.db_queries.load(std::sync::atomic::Ordering::Relaxed);
    let hits = m.hits.load(std::sync::atomic::Ordering::Relaxed);
    let waits = m.coalesced_waits.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(
        q, 1,
        "one query for 50 concurrent reads (hits {hits}, waits {waits})"
    );
}

/// `cache.reply_before_store`: a miss is answered before Valkey confirms its store, which is
/// already queued on the client's own connection to Valkey — so what the client sends next
/// through cachefront finds the entry, in both protocols; the fills are counted once Valkey
/// confirms them. A restricted user's commands take a connection of their own (logged in as
/// that user), so its misses wait for the store as they always did.
#[tokio::test]
async fn a_reply_before_the_store_keeps_the_clients_order() {
    let s = Stack::start_with(|c| {
        c.cache.reply_before_store = true;
        c.auth.users = vec![cachefront::config::UserConfig {
            name: "app".into(),
            password: Some("apppw".into()),
            passwords: Vec::new(),
            commands: vec!["@cachefront".into(), "get".into(), "ttl".into()],
            keys: vec!["employee:*".into()],
            enabled: true,
        }];
    })
    .await;
    let mut resp2 = s.raw().await;
    let mut resp3 = s.raw().await;
    let _ = resp3.call(&[b"HELLO", b"3"]).await;
    let mut restricted = s.raw().await;
    assert_eq!(
        restricted.call(&[b"AUTH", b"app", b"apppw"]).await,
        "+OK\r\n"
    );
    for (c, id, name) in [
        (&mut resp2, "1", "Alice Johnson"),
        (&mut resp3, "2", "Bob Smith"),
        (&mut restricted, "3", "Charlie Brown"),
    ] {
        let key = format!("employee:{id}");
        let want = format!("${}\r\n{name}\r\n", name.len());
        assert_eq!(
            c.call(&[b"EMP.GET", id.as_bytes()]).await,
            want,
            "EMP.GET {id}"
        );
        assert_eq!(
            c.call(&[b"GET", key.as_bytes()]).await,
            want,
            "GET {key} next"
        );
        let ttl = c.call(&[b"TTL", key.as_bytes()]).await;
        assert!(ttl.starts_with(":35") || ttl.starts_with(":36"), "{ttl}");
    }
    let mut info = s.raw().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let text = info.call(&[b"INFO", b"cachefront"]).await;
        if text.contains("\r\nfills:3\r\n") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{text}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A client's pipelined misses fill side by side: five misses of a query that takes 600 ms,
/// sent in one pipeline, are answered — in order, each its own row — in about one query's
/// time, not five (each fill used to start only once the reply ahead of it had left).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_misses_fill_side_by_side() {
    const SLEEP_MS: u64 = 600;
    let s = common::fresh::stack_on(&common::fresh::slow_name_schema(SLEEP_MS), |c| {
        // Enough PostgreSQL sessions on each core for the five fills at once.
        c.postgres.pool_size = 20;
        c.queries.push(common::fresh::slow_name_query());
    })
    .await;
    // redis-rs gives up on a reply after 500 ms by default.
    let cfg = redis::AsyncConnectionConfig::new()
        .set_response_timeout(Some(std::time::Duration::from_secs(30)));
    let mut c = redis::Client::open(s.proxy_url())
        .expect("URL")
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .expect("connect");
    // Resolves the query (one miss), so the pipeline below is all fills.
    let _: Option<String> = redis::cmd("SLOW.NAME")
        .arg(6)
        .query_async(&mut c)
        .await
        .expect("SLOW.NAME answers");
    let mut pipe = redis::pipe();
    for id in 1..=5 {
        pipe.cmd("SLOW.NAME").arg(id);
    }
    let started = std::time::Instant::now();
    let names: Vec<Option<String>> = pipe.query_async(&mut c).await.expect("the pipeline");
    let took = started.elapsed();
    assert_eq!(
        names,
        [
            "Alice Johnson",
            "Bob Smith",
            "Charlie Brown",
            "Diana Evans",
            "Ethan Williams"
        ]
        .map(|n| Some(n.to_string()))
    );
    assert!(
        took < std::time::Duration::from_millis(2 * SLEEP_MS),
        "five pipelined misses took {took:?}: one after another"
    );
}
