//! An application that caches by hand exactly as the guide does (tests/interop/guide_app.py:
//! valkey-py + psycopg2) and cachefront share one Valkey: what either caches, the other serves.

mod common;

use common::{services::free_port, Stack, GUIDE_JOIN_JSON, GUIDE_QUERY, GUIDE_QUERY_KEY};
use std::process::Command;
use std::sync::atomic::Ordering;

/// Runs the guide's application against `valkey_port`; `pg` is its database URL (a dead one
/// proves it answered from the cache).
fn app(valkey_port: u16, pg: &str, args: &[&str]) -> String {
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/interop/guide_app.py"
        ))
        .args(["--valkey-port", &valkey_port.to_string(), "--pg-dsn", pg])
        .args(args)
        .output()
        .expect("python3 runs (scripts/deps.sh installs it, valkey and psycopg2)");
    assert!(
        out.status.success(),
        "guide_app {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .trim_end_matches('\n')
        .to_string()
}

/// A PostgreSQL URL nobody listens on.
fn dead_pg() -> String {
    format!("postgres://postgres@127.0.0.1:{}/staff", free_port())
}

fn sql_file(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("guide.sql");
    std::fs::write(&path, GUIDE_QUERY).unwrap();
    path.to_string_lossy().into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn what_the_app_caches_cachefront_serves() {
    let s = Stack::start().await;
    let db = s.db.url();
    let vport = s.valkey.port();
    let dir = tempfile::tempdir().unwrap();
    let file = sql_file(&dir);
    let (name, json, key) = tokio::task::spawn_blocking(move || {
        (
            app(vport, &db, &["emp", "2"]),
            app(vport, &db, &["query", &file]),
            app(vport, &db, &["sha", &file]),
        )
    })
    .await
    .unwrap();
    assert_eq!(name, "Bob Smith");
    assert_eq!(key, GUIDE_QUERY_KEY);
    // json.dumps output: exactly what cachefront renders for the same rows.
    assert_eq!(json, GUIDE_JOIN_JSON);
    let mut c = s.client().await;
    let served: String = redis::cmd("EMP.GET")
        .arg(2)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(served, "Bob Smith");
    let served: String = redis::cmd("SQL.CACHED")
        .arg(GUIDE_QUERY)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(served, GUIDE_JOIN_JSON);
    let m = &s.proxy.shared.metrics;
    assert_eq!(m.hits.load(Ordering::Relaxed), 2);
    assert_eq!(
        m.db_queries.load(Ordering::Relaxed),
        0,
        "cachefront never asked PostgreSQL"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn what_cachefront_caches_the_app_serves() {
    let s = Stack::start().await;
    let mut c = s.client().await;
    assert!(common::emp_get(&mut c, 3).await.is_some());
    common::sql_cached(&mut c, GUIDE_QUERY).await;
    let vport = s.valkey.port();
    let dir = tempfile::tempdir().unwrap();
    let file = sql_file(&dir);
    // The app's database is unreachable: it can only answer from the cache.
    let (name, json) = tokio::task::spawn_blocking(move || {
        let pg = dead_pg();
        (
            app(vport, &pg, &["emp", "3"]),
            app(vport, &pg, &["query", &file]),
        )
    })
    .await
    .unwrap();
    assert_eq!(name, "Charlie Brown");
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        rows,
        serde_json::from_str::<serde_json::Value>(GUIDE_JOIN_JSON).unwrap()
    );
    assert_eq!(json, GUIDE_JOIN_JSON);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_app_can_use_cachefront_as_its_valkey() {
    let s = Stack::start().await;
    let db = s.db.url();
    let pport = s.proxy_port();
    let dir = tempfile::tempdir().unwrap();
    let file = sql_file(&dir);
    // Cache by hand *through* cachefront (pass-through GET/SETEX)...
    let (name, json) = tokio::task::spawn_blocking(move || {
        (
            app(pport, &db, &["emp", "5"]),
            app(pport, &db, &["query", &file]),
        )
    })
    .await
    .unwrap();
    assert_eq!(name, "Ethan Williams");
    assert_eq!(json, GUIDE_JOIN_JSON);
    // ...and cachefront's own commands find those entries.
    let mut c = s.client().await;
    let served: String = redis::cmd("EMP.GET")
        .arg(5)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(served, "Ethan Williams");
    let m = &s.proxy.shared.metrics;
    assert_eq!(m.hits.load(Ordering::Relaxed), 1);
    assert_eq!(m.db_queries.load(Ordering::Relaxed), 0);
}
