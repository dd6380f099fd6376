//! The read path in-process, on real servers this bench starts (criterion;
//! `cargo bench --bench read_path`): rendering the guide's join rows as JSON, an L1 lookup,
//! and EMP.GET / SQL.CACHED hits through a running cachefront over loopback, beside GET on
//! Valkey directly.

#[path = "../tests/common/mod.rs"]
mod common;

use cachefront::db::rows::write_rows_json;
use cachefront::protocol::Proto;
use criterion::{black_box, Criterion};
use std::time::Duration;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let s = rt.block_on(common::Stack::start());
    let mut c = Criterion::default()
        .sample_size(20)
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_secs(1))
        .configure_from_args();

    // JSON rendering of the guide's join (5 rows, 3 text columns) and of 1,000 wider rows.
    let (names, rows, wide_names, wide) = rt.block_on(async {
        let pg = s.pg().await;
        let stmt = pg.prepare(common::GUIDE_QUERY).await.unwrap();
        let names: Vec<String> = stmt.columns().iter().map(|c| c.name().to_string()).collect();
        let rows = pg.query(&stmt, &[]).await.unwrap();
        let wide_sql = "SELECT g AS id, 'name ' || g AS name, g * 1.5 AS score, g % 2 = 0 AS even, now() AS at, ARRAY[g, g + 1] AS pair FROM generate_series(1, 1000) g";
        let ws = pg.prepare(wide_sql).await.unwrap();
        let wide_names: Vec<String> = ws.columns().iter().map(|c| c.name().to_string()).collect();
        let wide = pg.query(&ws, &[]).await.unwrap();
        (names, rows, wide_names, wide)
    });
    let n: Vec<&str> = names.iter().map(String::as_str).collect();
    let wn: Vec<&str> = wide_names.iter().map(String::as_str).collect();
    c.bench_function("json/guide_join_5_rows", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(1024);
            write_rows_json(&n, black_box(&rows), &mut out);
            out
        })
    });
    c.bench_function("json/1000_rows_6_columns", |b| {
        b.iter(|| {
            let mut out = Vec::with_capacity(128 * 1024);
            write_rows_json(&wn, black_box(&wide), &mut out);
            out
        })
    });

    // An L1 lookup (the whole of a hot hit's cache work).
    let l1 = s.proxy.shared.cache.l1.clone();
    let ticket = l1.ticket("employee:1");
    let item = cachefront::cache::l1::Item {
        frame: bytes::Bytes::from_static(b"$13\r\nAlice Johnson\r\n"),
        deps: std::sync::Arc::default(),
        fresh: None,
    };
    l1.insert("employee:1", false, Proto::Resp2, item, ticket);
    c.bench_function("l1/get_hit", |b| {
        b.iter(|| l1.get(black_box("employee:1"), false, Proto::Resp2))
    });

    // Round trips over loopback, one request at a time.
    let mut proxy = rt.block_on(s.raw());
    let mut valkey = rt.block_on(common::Raw::connect(s.valkey.port()));
    rt.block_on(async {
        proxy.call(&[b"EMP.GET", b"1"]).await;
        proxy
            .call(&[b"SQL.CACHED", common::GUIDE_QUERY.as_bytes()])
            .await;
        valkey.call(&[b"SET", b"plain", b"Alice Johnson"]).await;
    });
    c.bench_function("roundtrip/cachefront_emp_get_hit", |b| {
        b.iter(|| rt.block_on(proxy.call(&[b"EMP.GET", b"1"])))
    });
    c.bench_function("roundtrip/cachefront_sql_cached_hit", |b| {
        b.iter(|| rt.block_on(proxy.call(&[b"SQL.CACHED", common::GUIDE_QUERY.as_bytes()])))
    });
    c.bench_function("roundtrip/cachefront_passthrough_get", |b| {
        b.iter(|| rt.block_on(proxy.call(&[b"GET", b"plain"])))
    });
    c.bench_function("roundtrip/valkey_get", |b| {
        b.iter(|| rt.block_on(valkey.call(&[b"GET", b"plain"])))
    });
    c.final_summary();
    drop(proxy);
    drop(valkey);
    drop(s);
}
