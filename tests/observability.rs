//! Metrics: the Prometheus endpoint, INFO's latency lines, and two cachefront instances
//! sharing one Valkey staying coherent.

mod common;

use common::services::free_port;
use common::{config_for, Raw, Stack};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_endpoint_and_info_latency() {
    let port = free_port();
    let s = Stack::start_with(|c| c.metrics.listen = format!("127.0.0.1:{port}")).await;
    let mut raw = s.raw().await;
    for _ in 0..3 {
        raw.call(&[b"EMP.GET", b"1"]).await;
    }
    raw.call(&[b"SET", b"a", b"b"]).await;
    let body = common::http_get(port, "/metrics").await;
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(
        body.contains("# TYPE cachefront_hits_total counter\ncachefront_hits_total 2\n"),
        "{body}"
    );
    assert!(body.contains("cachefront_misses_total 1\n"), "{body}");
    assert!(body.contains("cachefront_db_queries_total 1\n"), "{body}");
    assert!(
        body.contains("cachefront_passthrough_commands_total 1\n"),
        "{body}"
    );
    assert!(
        body.contains("cachefront_latency_seconds_count{family=\"hit\"} 2\n"),
        "{body}"
    );
    assert!(
        body.contains("cachefront_latency_seconds_count{family=\"miss\"} 1\n"),
        "{body}"
    );
    assert!(
        body.contains("cachefront_latency_seconds_bucket{family=\"passthrough\",le=\"+Inf\"} 1\n"),
        "{body}"
    );
    assert!(body.contains("cachefront_db_pool_size "), "{body}");
    assert!(common::http_get(port, "/nope")
        .await
        .starts_with("HTTP/1.1 404"));
    let info = raw.call(&[b"INFO", b"cachefront"]).await;
    assert!(info.contains("latency_hit:count=2,p50_us="), "{info}");
    assert!(info.contains("latency_db_query:count=1,"), "{info}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_sharing_one_valkey_stay_coherent() {
    let a = Stack::start().await;
    let b = cachefront::server::spawn(config_for(&a.valkey, &a.db))
        .await
        .unwrap();
    let wait_ready = |shared: std::sync::Arc<cachefront::server::Shared>| async move {
        let t = Instant::now();
        while shared.upstream.tracking.current().0 == 0 || !shared.is_listening() {
            assert!(t.elapsed() < Duration::from_secs(5));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    wait_ready(a.proxy.shared.clone()).await;
    wait_ready(b.shared.clone()).await;
    let mut ra = a.raw().await;
    let mut rb = Raw::connect(b.addr.port()).await;
    // Both have employee 1 in their L1.
    for _ in 0..3 {
        assert_eq!(
            ra.call(&[b"EMP.GET", b"1"]).await,
            "$13\r\nAlice Johnson\r\n"
        );
        assert_eq!(
            rb.call(&[b"EMP.GET", b"1"]).await,
            "$13\r\nAlice Johnson\r\n"
        );
    }
    // A write through instance B reaches instance A's L1 (through Valkey's tracking).
    assert_eq!(
        rb.call(&[b"SET", b"employee:1", b"Changed Via B"]).await,
        "+OK\r\n"
    );
    let t = Instant::now();
    while ra.call(&[b"EMP.GET", b"1"]).await != "$13\r\nChanged Via B\r\n" {
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "instance A still serves the old value"
        );
    }
    eprintln!("instance A saw B's write after {:?}", t.elapsed());
    // A database write reaches both.
    a.pg()
        .await
        .execute(
            "UPDATE employees SET name = 'Alice Cooper' WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    for r in [&mut ra, &mut rb] {
        let t = Instant::now();
        while r.call(&[b"EMP.GET", b"1"]).await != "$12\r\nAlice Cooper\r\n" {
            assert!(
                t.elapsed() < Duration::from_secs(2),
                "an instance still serves the old value"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_fills_are_kept_for_cachefront_slowlog() {
    let s = Stack::start_with(|c| {
        c.metrics.slow_fill_ms = 0; // every fill counts as slow
        c.metrics.slowlog_max_len = 2;
    })
    .await;
    let mut raw = s.raw().await;
    assert_eq!(raw.call(&[b"CACHEFRONT.SLOWLOG", b"LEN"]).await, ":0\r\n");
    raw.call(&[b"EMP.GET", b"1"]).await; // miss: a fill
    raw.call(&[b"EMP.GET", b"1"]).await; // hit: not a fill
    assert_eq!(raw.call(&[b"CACHEFRONT.SLOWLOG", b"LEN"]).await, ":1\r\n");
    let got = raw.call(&[b"CACHEFRONT.SLOWLOG", b"GET"]).await;
    assert!(got.starts_with("*1\r\n*6\r\n:0\r\n:"), "{got}");
    assert!(
        got.contains("*3\r\n$7\r\nEMP.GET\r\n$10\r\nemployee:1\r\n$40\r\nSELECT name FROM employees WHERE id = $1\r\n"),
        "{got}"
    );
    raw.call(&[b"SQL.CACHED", b"SELECT 1 AS a"]).await;
    raw.call(&[b"SQL.CACHED", b"SELECT 2 AS b"]).await;
    // Bounded, newest first.
    assert_eq!(raw.call(&[b"CACHEFRONT.SLOWLOG", b"LEN"]).await, ":2\r\n");
    let got = raw.call(&[b"CACHEFRONT.SLOWLOG", b"GET", b"1"]).await;
    assert!(got.contains("SELECT 2 AS b"), "{got}");
    assert!(raw
        .call(&[b"CACHEFRONT.SLOWLOG", b"GET", b"-5"])
        .await
        .starts_with("-ERR count should be greater than or equal to -1"));
    assert!(raw
        .call(&[b"CACHEFRONT.SLOWLOG", b"NOPE"])
        .await
        .starts_with("-ERR unknown subcommand"));
    assert_eq!(
        raw.call(&[b"CACHEFRONT.SLOWLOG", b"RESET"]).await,
        "+OK\r\n"
    );
    assert_eq!(raw.call(&[b"CACHEFRONT.SLOWLOG", b"LEN"]).await, ":0\r\n");
}
