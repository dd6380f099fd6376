//! Freshness: writes by any PostgreSQL client drop exactly the entries they can have changed.

mod common;

use common::{
    emp_get as emp, info_cachefront, info_field, sql_cached, Stack, GUIDE_QUERY, GUIDE_QUERY_KEY,
};
use redis::AsyncCommands;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// How soon a write must reach the cache in these tests.
const FRESH: Duration = Duration::from_secs(3);

async fn exists(v: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    v.exists(key).await.unwrap()
}

async fn listening(s: &Stack) {
    let shared = s.proxy.shared.clone();
    common::eventually_within(FRESH, "listener up", || {
        let shared = shared.clone();
        async move { shared.is_listening() }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_update_by_another_client_is_seen_and_other_rows_stay_cached() {
    let s = Stack::start().await;
    listening(&s).await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    assert_eq!(emp(&mut c, 2).await.as_deref(), Some("Bob Smith"));
    assert_eq!(emp(&mut c, 3).await.as_deref(), Some("Charlie Brown"));
    let pg = s.pg().await;
    pg.execute(
        "UPDATE employees SET name = 'Robert Smith' WHERE id = 2",
        &[],
    )
    .await
    .unwrap();
    common::eventually_within(FRESH, "employee:2 dropped", || {
        let mut v = v.clone();
        async move { !exists(&mut v, "employee:2").await }
    })
    .await;
    assert_eq!(emp(&mut c, 2).await.as_deref(), Some("Robert Smith"));
    // Precision: employee 3 was not touched and is still cached.
    assert!(exists(&mut v, "employee:3").await);
    assert!(s.proxy.shared.metrics.notifications.load(Ordering::Relaxed) >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn joins_are_dropped_per_table() {
    let s = Stack::start().await;
    listening(&s).await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    let _: String = redis::cmd("SQL.CACHED")
        .arg(GUIDE_QUERY)
        .query_async(&mut c)
        .await
        .unwrap();
    let _: String = emp(&mut c, 1).await.unwrap();
    let pg = s.pg().await;
    pg.execute("UPDATE departments SET name = 'Money' WHERE id = 1", &[])
        .await
        .unwrap();
    common::eventually_within(FRESH, "join dropped", || {
        let mut v = v.clone();
        async move { !exists(&mut v, GUIDE_QUERY_KEY).await }
    })
    .await;
    // EMP.GET does not read departments.
    assert!(exists(&mut v, "employee:1").await);
    let json: String = redis::cmd("SQL.CACHED")
        .arg(GUIDE_QUERY)
        .query_async(&mut c)
        .await
        .unwrap();
    assert!(json.contains(r#""department_name": "Money""#), "{json}");
    // A change to any employee drops the join too (it reads every row).
    pg.execute("UPDATE employees SET job_title = 'CFO' WHERE id = 1", &[])
        .await
        .unwrap();
    common::eventually_within(FRESH, "join dropped again", || {
        let mut v = v.clone();
        async move { !exists(&mut v, GUIDE_QUERY_KEY).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_committed_writes_invalidate() {
    let s = Stack::start().await;
    listening(&s).await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    assert_eq!(emp(&mut c, 4).await.as_deref(), Some("Diana Evans"));
    let mut pg = s.pg().await;
    let tx = pg.transaction().await.unwrap();
    tx.execute(
        "UPDATE employees SET name = 'Diana Prince' WHERE id = 4",
        &[],
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        exists(&mut v, "employee:4").await,
        "uncommitted write must not invalidate"
    );
    assert_eq!(emp(&mut c, 4).await.as_deref(), Some("Diana Evans"));
    tx.rollback().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        exists(&mut v, "employee:4").await,
        "rolled back write must not invalidate"
    );
    let tx = pg.transaction().await.unwrap();
    tx.execute(
        "UPDATE employees SET name = 'Diana Prince' WHERE id = 4",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    common::eventually_within(FRESH, "dropped on commit", || {
        let mut v = v.clone();
        async move { !exists(&mut v, "employee:4").await }
    })
    .await;
    assert_eq!(emp(&mut c, 4).await.as_deref(), Some("Diana Prince"));
}

#[tokio::test(flavor = "multi_thread")]
async fn big_statements_fall_back_to_the_whole_table() {
    let s = Stack::start_with(|c| c.invalidation.max_rows_per_notification = 2).await;
    listening(&s).await;
    let mut c = s.client().await;
    let v = s.valkey_client().await;
    for id in 1..=5 {
        emp(&mut c, id).await.unwrap();
    }
    let pg = s.pg().await;
    // Three rows: over the limit of 2, so one table-wide notification.
    pg.execute(
        "UPDATE employees SET job_title = job_title || '!' WHERE id IN (1, 2, 3)",
        &[],
    )
    .await
    .unwrap();
    common::eventually_within(FRESH, "all employee entries dropped", || {
        let mut v = v.clone();
        async move {
            let mut any = false;
            for id in 1..=5 {
                any |= exists(&mut v, &format!("employee:{id}")).await;
            }
            !any
        }
    })
    .await;
    // TRUNCATE is table-wide too.
    emp(&mut c, 1).await.unwrap();
    pg.batch_execute("TRUNCATE employees").await.unwrap();
    common::eventually_within(FRESH, "dropped by truncate", || {
        let mut v = v.clone();
        async move { !exists(&mut v, "employee:1").await }
    })
    .await;
    assert_eq!(emp(&mut c, 1).await, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn many_writes_in_one_transaction_send_few_notifications() {
    let s = Stack::start_with(|c| c.invalidation.max_notifications_per_transaction = 10).await;
    listening(&s).await;
    let mut c = s.client().await;
    emp(&mut c, 1).await.unwrap();
    let before = s.proxy.shared.metrics.notifications.load(Ordering::Relaxed);
    let mut pg = s.pg().await;
    let tx = pg.transaction().await.unwrap();
    for i in 0..500 {
        tx.execute(
            "UPDATE employees SET job_title = $1 WHERE id = 1",
            &[&format!("t{i}")],
        )
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    let v = s.valkey_client().await;
    common::eventually_within(FRESH, "dropped", || {
        let mut v = v.clone();
        async move { !exists(&mut v, "employee:1").await }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let got = s.proxy.shared.metrics.notifications.load(Ordering::Relaxed) - before;
    // 10 row-level ones, then one table-wide (PostgreSQL folds the identical rest).
    assert!(got <= 11, "{got} notifications for one transaction");
}

#[tokio::test(flavor = "multi_thread")]
async fn inserts_invalidate_negative_entries() {
    let s = Stack::start_with(|c| c.cache.negative_ttl = 60).await;
    listening(&s).await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    assert_eq!(emp(&mut c, 6).await, None);
    assert!(
        exists(&mut v, "cachefront:n:employee:6").await,
        "negative entry stored"
    );
    // The marker is not under the entry's key: a hand-written reader sees a plain miss.
    assert!(!exists(&mut v, "employee:6").await);
    assert_eq!(emp(&mut c, 6).await, None);
    let q = s.proxy.shared.metrics.db_queries.load(Ordering::Relaxed);
    assert_eq!(q, 1, "the second lookup was answered by the negative entry");
    let pg = s.pg().await;
    pg.execute(
        "INSERT INTO employees (id, name, job_title, dept_id) VALUES (6, 'Fiona Green', 'Analyst', 1)",
        &[],
    )
    .await
    .unwrap();
    common::eventually_within(FRESH, "negative entry dropped", || {
        let mut v = v.clone();
        async move { !exists(&mut v, "cachefront:n:employee:6").await }
    })
    .await;
    assert_eq!(emp(&mut c, 6).await.as_deref(), Some("Fiona Green"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_listener_connection_drops_what_it_may_have_missed() {
    let s = Stack::start().await;
    listening(&s).await;
    let mut c = s.client().await;
    let v = s.valkey_client().await;
    emp(&mut c, 5).await.unwrap();
    let _: String = redis::cmd("SQL.CACHED")
        .arg(GUIDE_QUERY)
        .query_async(&mut c)
        .await
        .unwrap();
    let reconnects = s
        .proxy
        .shared
        .metrics
        .listener_reconnects
        .load(Ordering::Relaxed);
    // Kill the listening connection from the server side.
    s.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE 'LISTEN%' OR (application_name = 'cachefront' AND query = 'SELECT 1' AND datname = current_database())");
    let shared = s.proxy.shared.clone();
    common::eventually_within(FRESH, "listener reconnected", || {
        let shared = shared.clone();
        async move {
            shared.metrics.listener_reconnects.load(Ordering::Relaxed) > reconnects
                && shared.is_listening()
        }
    })
    .await;
    common::eventually_within(FRESH, "entries flushed after reconnect", || {
        let mut v = v.clone();
        async move { !exists(&mut v, "employee:5").await && !exists(&mut v, GUIDE_QUERY_KEY).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn views_depend_on_their_tables() {
    let s = Stack::start().await;
    s.psql("CREATE VIEW staff_view AS SELECT e.name, d.name AS dept FROM employees e JOIN departments d ON d.id = e.dept_id");
    listening(&s).await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    let q = "SELECT name, dept FROM staff_view ORDER BY name";
    let _: String = redis::cmd("SQL.CACHED")
        .arg(q)
        .query_async(&mut c)
        .await
        .unwrap();
    let key = cachefront::cache::key::sql_key("", q.as_bytes(), &[] as &[&str]);
    let deps: Vec<String> = v
        .smembers(format!("cachefront:d:{}", s.oid("departments")))
        .await
        .unwrap();
    assert_eq!(deps, vec![key.clone()]);
    s.pg()
        .await
        .execute("UPDATE departments SET name = 'Ops' WHERE id = 3", &[])
        .await
        .unwrap();
    common::eventually_within(FRESH, "view entry dropped", || {
        let mut v = v.clone();
        let key = key.clone();
        async move { !exists(&mut v, &key).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn writers_and_readers_end_consistent() {
    let s = Stack::start().await;
    s.psql("INSERT INTO employees (name, job_title, dept_id) SELECT 'E' || g, 'T', 1 + g % 5 FROM generate_series(6, 205) g");
    listening(&s).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for r in 0..8 {
        let url = s.proxy_url();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = common::connect(&url).await;
            let mut i = r;
            while !stop.load(Ordering::Relaxed) {
                let id = 1 + (i * 37) % 205;
                let _: Option<String> = redis::cmd("EMP.GET")
                    .arg(id)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                i += 1;
            }
        }));
    }
    let pg = s.pg().await;
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        n += 1;
        let id = 1 + (n * 13) % 205;
        pg.execute(
            "UPDATE employees SET name = $1 WHERE id = $2",
            &[&format!("N{n}"), &(id as i32)],
        )
        .await
        .unwrap();
    }
    // Writes stop; readers go on a little, so entries are cached again after the last writes
    // (a stale entry, if any, would keep being served and so stay cached too).
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // Let the last notifications arrive, then compare every cached entry with the database.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut v = s.valkey_client().await;
    let rows = pg
        .query("SELECT id, name FROM employees", &[])
        .await
        .unwrap();
    let mut checked = 0;
    for row in rows {
        let id: i32 = row.get(0);
        let name: String = row.get(1);
        let cached: Option<String> = v.get(format!("employee:{id}")).await.unwrap();
        if let Some(cached) = cached {
            assert_eq!(cached, name, "employee:{id} is stale");
            checked += 1;
        }
    }
    assert!(checked > 0, "some entries were cached");
    eprintln!("{n} updates, {checked} cached entries all fresh");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_thousand_concurrent_misses_make_one_query() {
    // Counts every run of the query: the verification sampler's would count too.
    let s = Stack::start_with(|c| c.verify.per_second = 0).await;
    listening(&s).await;
    let count_sql = "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = current_database() AND s.query = 'SELECT name FROM employees WHERE id = $1'";
    let pg = s.pg().await;
    let before: i64 = pg.query_one(count_sql, &[]).await.unwrap().get(0);
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(1000));
    let mut tasks = Vec::new();
    for _ in 0..1000 {
        let port = s.proxy_port();
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let mut raw = common::Raw::connect(port).await;
            barrier.wait().await;
            raw.call(&[b"EMP.GET", b"1"]).await
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), "$13\r\nAlice Johnson\r\n");
    }
    let after: i64 = pg.query_one(count_sql, &[]).await.unwrap().get(0);
    assert_eq!(
        after - before,
        1,
        "PostgreSQL ran the query once for 1,000 concurrent misses"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hot_entries_are_refreshed_before_they_expire() {
    let s = Stack::start_with(|c| c.cache.early_refresh_beta = 1e12).await;
    listening(&s).await;
    let mut c = s.client().await;
    emp(&mut c, 1).await.unwrap();
    emp(&mut c, 1).await.unwrap();
    let m = &s.proxy.shared.metrics;
    common::eventually_within(FRESH, "early refresh ran", || async {
        m.early_refreshes.load(Ordering::Relaxed) >= 1 && m.db_queries.load(Ordering::Relaxed) >= 2
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ttl_jitter_spreads_expiry() {
    let s = Stack::start_with(|c| c.cache.ttl_jitter = 0.5).await;
    listening(&s).await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    let mut ttls = std::collections::BTreeSet::new();
    for i in 0..20 {
        let _: String = redis::cmd("SQL.CACHED")
            .arg(format!("SELECT {i} AS n"))
            .query_async(&mut c)
            .await
            .unwrap();
        let key = cachefront::cache::key::sql_key(
            "",
            format!("SELECT {i} AS n").as_bytes(),
            &[] as &[&str],
        );
        let ttl: i64 = v.ttl(&key).await.unwrap();
        assert!((1800..=3600).contains(&ttl), "{ttl}");
        ttls.insert(ttl);
    }
    assert!(ttls.len() > 5, "jitter spreads TTLs: {ttls:?}");
}

#[test]
fn triggers_subcommand_installs_and_removes_idempotently() {
    let db = common::services::postgres().fresh_db();
    let run = |action: &str| {
        common::run_ok(
            common::cachefront_cmd()
                .args(["triggers", action])
                .env("CACHEFRONT_POSTGRES_URL", db.url())
                .env("RUST_LOG", "error"),
        );
    };
    let count = || {
        common::services::postgres().psql(
            db.name(),
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'cachefront%'",
        )
    };
    run("install");
    run("install");
    assert_eq!(
        count(),
        "4",
        "four triggers on employees (insert, update, delete, truncate)"
    );
    run("remove");
    assert_eq!(count(), "0");
}

/// A field of `INFO cachefront`, as a client sees it.
async fn info_value(c: &mut redis::aio::MultiplexedConnection, name: &str) -> String {
    info_field(&info_cachefront(c).await, name).to_string()
}

/// A fill whose meta keys someone else overwrote with the wrong type — a row version that is
/// a hash, a registry set that is a string — answers from PostgreSQL and stores nothing
/// (storing an entry its invalidation could not find, or whose version it could not check,
/// would let it go stale); once the keys are gone, the next miss stores again.
#[tokio::test(flavor = "multi_thread")]
async fn a_fill_with_meta_keys_of_the_wrong_type_stores_nothing() {
    let s = Stack::start().await;
    listening(&s).await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    let employees = s.oid("employees");
    let registry = format!("cachefront:k:{employees}");
    let version = format!("cachefront:r:{employees}:id:3");
    let _: () = v.set(&registry, "not a set").await.unwrap();
    let _: () = v.hset(&version, "x", "1").await.unwrap();
    for bad in [&registry, &version] {
        assert_eq!(emp(&mut c, 3).await.as_deref(), Some("Charlie Brown"));
        assert!(!exists(&mut v, "employee:3").await, "stored past {bad}");
        let _: () = v.del(bad).await.unwrap();
    }
    assert_eq!(emp(&mut c, 3).await.as_deref(), Some("Charlie Brown"));
    assert!(exists(&mut v, "employee:3").await, "stored once repaired");
}

/// Meta keys of the wrong type, written straight to Valkey by someone else, neither stall
/// invalidation nor leave stale entries: the scripts repair them, the read is fresh, and a
/// change to another table is applied promptly meanwhile.
#[tokio::test(flavor = "multi_thread")]
async fn corrupted_meta_keys_do_not_stop_invalidation() {
    const DEPTS: &str = "SELECT name FROM departments ORDER BY id";
    let s = Stack::start().await;
    listening(&s).await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    assert_eq!(emp(&mut c, 2).await.as_deref(), Some("Bob Smith"));
    let depts = sql_cached(&mut c, DEPTS).await;
    assert!(!depts.contains("Money"), "{depts}");
    // A hash where a version counter lives, and a plain string where a row version lives.
    let employees = s.oid("employees");
    let _: () = v
        .hset(format!("cachefront:v:{employees}"), "x", "1")
        .await
        .unwrap();
    let _: () = v
        .set(format!("cachefront:r:{employees}:id:2"), "garbage")
        .await
        .unwrap();
    let pg = s.pg().await;
    let rename = "UPDATE employees SET name = 'Robert Smith' WHERE id = 2";
    pg.batch_execute(rename).await.unwrap();
    let started = Instant::now();
    common::eventually_within(FRESH, "the fresh name", || {
        let mut c = c.clone();
        async move { emp(&mut c, 2).await.as_deref() == Some("Robert Smith") }
    })
    .await;
    eprintln!("fresh value read {:?} after the update", started.elapsed());
    pg.execute("UPDATE departments SET name = 'Money' WHERE id = 1", &[])
        .await
        .unwrap();
    let started = Instant::now();
    common::eventually_within(FRESH, "the other table's change applied", || {
        let mut v = v.clone();
        async move {
            !exists(
                &mut v,
                &cachefront::cache::key::sql_key("", DEPTS.as_bytes(), &[] as &[&[u8]]),
            )
            .await
        }
    })
    .await;
    eprintln!(
        "other table invalidated {:?} after its update",
        started.elapsed()
    );
    common::eventually_within(FRESH, "not degraded", || {
        let mut c = c.clone();
        async move { info_value(&mut c, "invalidation_degraded").await == "0" }
    })
    .await;
    assert!(
        info_value(&mut c, "meta_repairs")
            .await
            .parse::<u64>()
            .unwrap()
            >= 2
    );
    // The repaired keys work again: the entry is filled and stored, then hit.
    common::eventually_within(FRESH, "employee:2 stored again", || {
        let mut c = c.clone();
        let mut v = v.clone();
        async move {
            emp(&mut c, 2).await;
            exists(&mut v, "employee:2").await
        }
    })
    .await;
    let stored: String = v.get("employee:2").await.unwrap();
    assert_eq!(stored, "Robert Smith");
}
