//! SIGHUP: named queries, TTLs, SQL settings and limits change without dropping connections.

mod common;

use common::{config_for, Raw, Stack};
use std::time::{Duration, Instant};

const TITLE_QUERY: &str = r#"
[[query]]
command = "EMP.TITLE"
sql = "SELECT job_title FROM employees WHERE id = $1"
key = "employee:{1}:title"
ttl = 60
args = ["int"]
arg_names = ["employee id"]
key_column = "employees.id"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn reload_applies_queries_ttls_and_limits_in_place() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    let before = raw.call(&[b"EMP.TITLE", b"1"]).await;
    assert!(before.starts_with("-ERR unknown command"), "{before}");
    let mut next = config_for(&s.valkey, &s.db);
    next.queries = cachefront::config::Config::from_toml_with_env(TITLE_QUERY, Vec::new())
        .unwrap()
        .queries;
    next.cache.default_ttl = 120;
    next.sql.max_sql_bytes = 100;
    next.valkey.pool_size = 7; // needs a restart: kept, and said so
    let kept = s.proxy.shared.reload(next).unwrap();
    assert_eq!(kept, vec!["valkey"]);
    // The same connection now has the new command, and EMP.GET still works.
    assert_eq!(
        raw.call(&[b"EMP.TITLE", b"1"]).await,
        "$10\r\nAccountant\r\n"
    );
    assert_eq!(raw.call(&[b"EMP.GET", b"2"]).await, "$9\r\nBob Smith\r\n");
    // The new default TTL and SQL limit apply.
    raw.call(&[b"SQL.CACHED", b"SELECT 1 AS one"]).await;
    let key = cachefront::cache::key::sql_key("", b"SELECT 1 AS one", &[] as &[&str]);
    let mut v = Raw::connect(s.valkey.port()).await;
    let ttl: i64 = v.call(&[b"TTL", key.as_bytes()]).await[1..]
        .trim()
        .parse()
        .unwrap();
    assert!((110..=120).contains(&ttl), "{ttl}");
    let long = format!("SELECT 1 AS x -- {}", "y".repeat(200));
    assert!(raw
        .call(&[b"SQL.CACHED", long.as_bytes()])
        .await
        .contains("sql.max_sql_bytes (100 bytes)"));
    assert_eq!(
        s.proxy.shared.config().valkey.pool_size,
        2,
        "restart-only setting kept"
    );
    // Row-level invalidation knows the new query's keys.
    s.pg()
        .await
        .execute("UPDATE employees SET job_title = 'CFO' WHERE id = 1", &[])
        .await
        .unwrap();
    let t = Instant::now();
    while raw.call(&[b"EMP.TITLE", b"1"]).await != "$3\r\nCFO\r\n" {
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "the reloaded query was not invalidated"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_bad_reload_keeps_the_running_configuration() {
    let s = Stack::start().await;
    let mut bad = config_for(&s.valkey, &s.db);
    bad.queries = cachefront::config::Config::from_toml_with_env(TITLE_QUERY, Vec::new())
        .unwrap()
        .queries;
    bad.queries[0].sql = "DELETE FROM employees WHERE id = $1".into();
    assert!(s.proxy.shared.reload(bad).is_err());
    let mut raw = s.raw().await;
    assert_eq!(
        raw.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
}

#[test]
fn sighup_reloads_the_binary_without_dropping_connections() {
    let valkey = common::services::Valkey::start();
    let db = common::services::postgres().fresh_db();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(&path, "").unwrap();
    let port = common::services::free_port();
    let mut child = common::cachefront_cmd()
        .arg("--config")
        .arg(&path)
        .env("CACHEFRONT_LISTEN", format!("127.0.0.1:{port}"))
        .env("CACHEFRONT_VALKEY_URL", valkey.url())
        .env("CACHEFRONT_POSTGRES_URL", db.url())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let result = rt.block_on(async {
        let t = Instant::now();
        let mut raw = loop {
            if let Ok(s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                drop(s);
                break Raw::connect(port).await;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "cachefront did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(raw
            .call(&[b"EMP.TITLE", b"2"])
            .await
            .starts_with("-ERR unknown command"));
        std::fs::write(&path, TITLE_QUERY).unwrap();
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(child.id() as i32, libc::SIGHUP) };
        let t = Instant::now();
        loop {
            let r = raw.call(&[b"EMP.TITLE", b"2"]).await;
            if r == "$10\r\nHR Manager\r\n" {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(5), "not reloaded: {r}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        raw.call(&[b"PING"]).await
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(result, "+PONG\r\n");
}
