//! Continuous verification (`cache::verify`) on real servers: a wrong entry is found, counted,
//! logged and dropped; a write storm raises no false alarm; the settings are checked.

mod common;

use cachefront::config::{NamedQueryConfig, ReplyKind};
use common::{emp_get, info_cachefront, info_field, sql_cached, Stack, GUIDE_QUERY};
use redis::AsyncCommands;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// What cachefront logged in this test binary (every test's server shares the subscriber).
fn logs() -> &'static Mutex<Vec<u8>> {
    static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(|| Capture)
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        Mutex::new(Vec::new())
    })
}

struct Capture;

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        logs()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged() -> String {
    String::from_utf8_lossy(&logs().lock().unwrap_or_else(|p| p.into_inner())).into_owned()
}

/// One stack at a time: the storm test measures freshness on two shared CPUs.
async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

async fn listening(s: &Stack) {
    let shared = s.proxy.shared.clone();
    common::eventually("listener up", || {
        let shared = shared.clone();
        async move { shared.is_listening() }
    })
    .await;
}

fn count(
    s: &Stack,
    f: impl Fn(&cachefront::metrics::Metrics) -> &cachefront::metrics::Counter,
) -> u64 {
    f(&s.proxy.shared.metrics).load(Relaxed)
}

/// A hash and a JSON named query beside the built-in `EMP.GET`, so every stored shape is
/// checked.
fn queries() -> Vec<NamedQueryConfig> {
    let base = cachefront::config::builtin_emp_get();
    vec![
        NamedQueryConfig {
            command: "EMP.ROW".into(),
            sql: "SELECT name, job_title FROM employees WHERE id = $1".into(),
            key: "emprow:{1}".into(),
            reply: ReplyKind::Hash,
            summary: String::new(),
            ..base.clone()
        },
        NamedQueryConfig {
            command: "DEPT.STAFF".into(),
            sql: "SELECT id, name FROM employees WHERE dept_id = $1 ORDER BY id".into(),
            key: "deptstaff:{1}".into(),
            reply: ReplyKind::Json,
            key_column: None,
            summary: String::new(),
            ..base
        },
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_entry_is_found_counted_logged_and_dropped() {
    logs();
    let _one = serial().await;
    let s = Stack::start_with(|c| {
        c.verify.per_second = 50;
        c.verify.grace_ms = 300;
    })
    .await;
    listening(&s).await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    assert_eq!(emp_get(&mut c, 1).await.as_deref(), Some("Alice Johnson"));
    common::eventually("the right entry verified", || async {
        count(&s, |m| &m.verify_checks) > 0
    })
    .await;
    assert_eq!(count(&s, |m| &m.verify_mismatches), 0);

    let _: () = v.set("employee:1", "wrong").await.unwrap();
    common::eventually("the wrong entry found", || async {
        count(&s, |m| &m.verify_mismatches) == 1
    })
    .await;
    let held: Option<String> = v.get("employee:1").await.unwrap();
    assert_eq!(held, None, "dropped from Valkey");
    assert_eq!(emp_get(&mut c, 1).await.as_deref(), Some("Alice Johnson"));
    let info = info_cachefront(&mut c).await;
    assert_eq!(info_field(&info, "verify_mismatches"), "1");
    assert!(info_field(&info, "verify_checks").parse::<u64>().unwrap() >= 2);
    let logs = logged();
    let line = logs
        .lines()
        .find(|l| l.contains("verification:") && l.contains("key=employee:1"))
        .unwrap_or_else(|| panic!("no mismatch logged for employee:1 in:\n{logs}"));
    assert!(
        line.contains("command=EMP.GET") && line.contains("SELECT name FROM employees"),
        "{line}"
    );
    // Refilled right, it stays verified.
    let before = count(&s, |m| &m.verify_checks);
    common::eventually("checked again", || async {
        count(&s, |m| &m.verify_checks) > before + 5
    })
    .await;
    assert_eq!(count(&s, |m| &m.verify_mismatches), 1);
    let prom = s.proxy.shared.prometheus();
    assert!(
        prom.contains("cachefront_verify_mismatches_total 1"),
        "{prom}"
    );
}

/// Every stored shape is compared as a fill stores it, a negative marker included, and each
/// one overwritten in Valkey is found.
#[tokio::test(flavor = "multi_thread")]
async fn hashes_json_and_negative_entries_are_checked() {
    logs();
    let _one = serial().await;
    let s = Stack::start_with(|c| {
        c.verify.per_second = 100;
        c.verify.grace_ms = 300;
        c.cache.negative_ttl = 600;
        c.queries = queries();
    })
    .await;
    listening(&s).await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    let row: std::collections::HashMap<String, String> = redis::cmd("EMP.ROW")
        .arg(2)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(row["name"], "Bob Smith");
    let staff: String = redis::cmd("DEPT.STAFF")
        .arg(3)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(staff.contains("Charlie Brown"), "{staff}");
    assert_eq!(emp_get(&mut c, 99).await, None, "a negative marker");
    assert!(v
        .exists::<_, bool>("cachefront:n:employee:99")
        .await
        .unwrap());
    common::eventually("all three verified a few times", || async {
        count(&s, |m| &m.verify_checks) >= 20
    })
    .await;
    assert_eq!(count(&s, |m| &m.verify_mismatches), 0);

    // A field changed, and the JSON text changed.
    let _: () = v.hset("emprow:2", "job_title", "CEO").await.unwrap();
    let _: () = v.set("deptstaff:3", "[]").await.unwrap();
    common::eventually("both found", || async {
        count(&s, |m| &m.verify_mismatches) == 2
    })
    .await;
    assert!(!v.exists::<_, bool>("emprow:2").await.unwrap());
    assert!(!v.exists::<_, bool>("deptstaff:3").await.unwrap());
    // A row inserted that no trigger reports: the trigger dropped in a session that passes
    // itself off as cachefront's own install, so the DDL event trigger keeps quiet too.
    // The marker is stale, and only the verifier can tell.
    let pg = s.pg().await;
    pg.batch_execute(
        "SET cachefront.installing = 'on'; DROP TRIGGER cachefront_ins ON employees; RESET cachefront.installing",
    )
    .await
    .unwrap();
    pg.execute(
        "INSERT INTO employees (id, name, job_title, dept_id) VALUES (99, 'Zed', 'Intern', 1)",
        &[],
    )
    .await
    .unwrap();
    common::eventually("the stale marker found", || async {
        count(&s, |m| &m.verify_mismatches) == 3
    })
    .await;
    assert!(!v
        .exists::<_, bool>("cachefront:n:employee:99")
        .await
        .unwrap());
    assert_eq!(emp_get(&mut c, 99).await.as_deref(), Some("Zed"));
}

/// Writers update rows while readers keep the cache full and the sampler checks at a high
/// rate: every difference it sees is a write whose invalidation is on its way, and none may
/// count.
#[tokio::test(flavor = "multi_thread")]
async fn a_write_storm_raises_no_false_alarm() {
    logs();
    let _one = serial().await;
    let s = Stack::start_with(|c| {
        c.verify.per_second = 400;
        c.queries = queries();
    })
    .await;
    listening(&s).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let reads = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for w in 0..3u64 {
        let pg = s.pg().await;
        let (stop, writes) = (Arc::clone(&stop), Arc::clone(&writes));
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                n += 1;
                let id = ((n * 7 + w) % 5 + 1) as i32;
                let name = format!("Writer {w} #{n}");
                let sql = match n % 4 {
                    0 => "UPDATE employees SET job_title = $1 WHERE id = $2",
                    1 => "UPDATE departments SET name = $1 WHERE id = $2",
                    _ => "UPDATE employees SET name = $1 WHERE id = $2",
                };
                pg.execute(sql, &[&name, &id]).await.unwrap();
                writes.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for r in 0..4u64 {
        let mut c = s.client().await;
        let (stop, reads) = (Arc::clone(&stop), Arc::clone(&reads));
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Relaxed) {
                n += 1;
                let id = ((n + r) % 5 + 1) as i64;
                match n % 4 {
                    0 => {
                        sql_cached(&mut c, GUIDE_QUERY).await;
                    }
                    1 => {
                        let _: std::collections::HashMap<String, String> = redis::cmd("EMP.ROW")
                            .arg(id)
                            .query_async(&mut c)
                            .await
                            .unwrap();
                    }
                    2 => {
                        let _: String = redis::cmd("DEPT.STAFF")
                            .arg(id)
                            .query_async(&mut c)
                            .await
                            .unwrap();
                    }
                    _ => {
                        emp_get(&mut c, id).await;
                    }
                }
                reads.fetch_add(1, Relaxed);
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(10)).await;
    stop.store(true, Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // Checks that suspected a difference finish their grace.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (checks, mismatches, skipped, queries) = (
        count(&s, |m| &m.verify_checks),
        count(&s, |m| &m.verify_mismatches),
        count(&s, |m| &m.verify_skipped),
        count(&s, |m| &m.verify_queries),
    );
    eprintln!(
        "{:?}: {} writes, {} reads; verify: {checks} checks, {mismatches} mismatches, {skipped} skipped, {queries} queries",
        started.elapsed(),
        writes.load(Relaxed),
        reads.load(Relaxed),
    );
    assert!(writes.load(Relaxed) > 100 && reads.load(Relaxed) > 100);
    assert!(checks > 100, "{checks} checks");
    assert!(
        skipped > 0,
        "the storm made some checks wait for invalidations"
    );
    assert_eq!(mismatches, 0, "{}", logged());
}

#[tokio::test(flavor = "multi_thread")]
async fn per_second_zero_turns_it_off() {
    logs();
    let _one = serial().await;
    let s = Stack::start_with(|c| c.verify.per_second = 0).await;
    listening(&s).await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    assert_eq!(emp_get(&mut c, 1).await.as_deref(), Some("Alice Johnson"));
    assert!(s.proxy.shared.cache.verify.is_empty(), "nothing recorded");
    let _: () = v.set("employee:1", "wrong").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&s, |m| &m.verify_checks), 0);
    assert_eq!(count(&s, |m| &m.verify_queries), 0);
    let held: Option<String> = v.get("employee:1").await.unwrap();
    assert_eq!(held.as_deref(), Some("wrong"));
}

#[test]
fn bad_settings_are_refused_with_the_key_named() {
    for (var, value, key) in [
        ("CACHEFRONT_VERIFY_PER_SECOND", "5000", "verify.per_second"),
        ("CACHEFRONT_VERIFY_PER_SECOND", "often", "verify.per_second"),
        ("CACHEFRONT_VERIFY_GRACE_MS", "0", "verify.grace_ms"),
        (
            "CACHEFRONT_VERIFY_REGISTRY_ENTRIES",
            "0",
            "verify.registry_entries",
        ),
        (
            "CACHEFRONT_VERIFY_REGISTRY_BYTES",
            "1",
            "verify.registry_bytes",
        ),
        ("CACHEFRONT_VERIFY_ENABLED", "maybe", "verify.enabled"),
    ] {
        let out = common::cachefront_cmd()
            .arg("--check-config")
            .env(var, value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(key),
            "{var}={value}: {err}"
        );
    }
    let out = common::cachefront_cmd()
        .arg("--check-config")
        .env("CACHEFRONT_VERIFY_PER_SECOND", "0")
        .output()
        .unwrap();
    assert!(out.status.success(), "0 turns it off");
}
