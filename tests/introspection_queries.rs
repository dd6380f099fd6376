//! Per-query introspection on real servers: `CACHEFRONT.EXPLAIN` (key, dependencies as
//! PostgreSQL resolves them, whether and why a query can be cached, without running it),
//! `CACHEFRONT.QUERIES` (figures per named query and per busiest SQL.CACHED text, bounded) and
//! the same figures as Prometheus series.

mod common;

use common::services::free_port;
use common::{eventually, Stack, GUIDE_JOIN_JSON, GUIDE_QUERY, GUIDE_QUERY_KEY};
use redis::Value;
use std::collections::HashMap;

type Conn = redis::aio::MultiplexedConnection;

fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Nil => "nil".into(),
        other => panic!("not a scalar: {other:?}"),
    }
}

fn texts(v: &Value) -> Vec<String> {
    match v {
        Value::Array(items) => items.iter().map(text).collect(),
        other => panic!("not an array: {other:?}"),
    }
}

/// A map reply (a flat array in RESP2) by field name.
fn map(v: &Value) -> HashMap<String, Value> {
    match v {
        Value::Array(items) => items
            .chunks(2)
            .map(|p| (text(&p[0]), p[1].clone()))
            .collect(),
        Value::Map(m) => m.iter().map(|(k, v)| (text(k), v.clone())).collect(),
        other => panic!("not a map: {other:?}"),
    }
}

async fn explain(c: &mut Conn, args: &[&str]) -> HashMap<String, Value> {
    let v: Value = redis::cmd("CACHEFRONT.EXPLAIN")
        .arg(args)
        .query_async(c)
        .await
        .unwrap_or_else(|e| panic!("EXPLAIN {args:?}: {e}"));
    map(&v)
}

fn field(m: &HashMap<String, Value>, f: &str) -> String {
    text(m.get(f).unwrap_or_else(|| panic!("no {f} in {m:?}")))
}

fn deps(m: &HashMap<String, Value>) -> Vec<String> {
    texts(&m["dependencies"])
}

#[tokio::test(flavor = "multi_thread")]
async fn explain_names_key_dependencies_and_refusals() {
    let s = Stack::start().await;
    let mut c = s.client().await;

    // The guide's join: both tables, schema-qualified, cacheable, not cached yet.
    let e = explain(&mut c, &[GUIDE_QUERY]).await;
    assert_eq!(field(&e, "command"), "SQL.CACHED");
    assert_eq!(field(&e, "key"), GUIDE_QUERY_KEY);
    assert_eq!(field(&e, "cacheable"), "1", "{e:?}");
    assert_eq!(field(&e, "reason"), "nil");
    assert_eq!(field(&e, "freshness"), "invalidated");
    assert_eq!(deps(&e), ["public.departments", "public.employees"]);
    assert_eq!(field(&e, "ttl"), "3600");
    assert_eq!(field(&e, "cached"), "0");
    assert_eq!(field(&e, "row_key"), "nil");
    // Once filled: cached, and its tables report their writes.
    common::sql_cached(&mut c, GUIDE_QUERY).await;
    let e = explain(&mut c, &[GUIDE_QUERY, "EX", "60"]).await;
    assert_eq!(field(&e, "cached"), "1");
    assert_eq!(field(&e, "ttl"), "60");
    let tables = map(&e["tables"]);
    assert_eq!(text(&tables["public.employees"]), "watched", "{tables:?}");
    assert_eq!(text(&tables["public.departments"]), "watched", "{tables:?}");

    // A CTE named like a table is not the table.
    let cte = "WITH employees AS (SELECT id, name FROM departments) SELECT name FROM employees";
    let e = explain(&mut c, &[cte]).await;
    assert_eq!(deps(&e), ["public.departments"], "{e:?}");
    assert_eq!(field(&e, "cacheable"), "1");

    // A schema-qualified table, and one named like a public table in another schema.
    s.psql(
        "CREATE SCHEMA hr; CREATE TABLE hr.employees (id int PRIMARY KEY, name text);
         CREATE TABLE hr.staff (id int PRIMARY KEY, name text)",
    );
    let e = explain(
        &mut c,
        &["SELECT name FROM hr.staff WHERE id = $1", "PARAMS", "1"],
    )
    .await;
    assert_eq!(deps(&e), ["hr.staff"], "{e:?}");
    assert_eq!(texts(&e["args"]), ["1"]);
    let e = explain(&mut c, &["SELECT count(*) FROM hr.employees"]).await;
    assert_eq!(deps(&e), ["hr.employees"], "{e:?}");

    // A plpgsql function: PostgreSQL cannot say what it reads, so it is refused, and why.
    s.psql(
        "CREATE FUNCTION public.headcount(d integer) RETURNS bigint LANGUAGE plpgsql AS
         $$ BEGIN RETURN (SELECT count(*) FROM employees WHERE dept_id = d); END $$",
    );
    let e = explain(&mut c, &["SELECT public.headcount(1)"]).await;
    assert_eq!(field(&e, "cacheable"), "0", "{e:?}");
    assert_eq!(field(&e, "freshness"), "none");
    let why = field(&e, "reason");
    assert!(
        why.contains("function public.headcount(d integer) is written in plpgsql")
            && why.contains("sql.ttl_only"),
        "{why}"
    );

    // A write is refused with SQL.CACHED's reason, and never runs.
    let e = explain(&mut c, &["DELETE FROM employees"]).await;
    assert_eq!(field(&e, "cacheable"), "0");
    assert!(
        field(&e, "reason").starts_with("SQL.CACHED accepts a single read-only query"),
        "{e:?}"
    );
    assert_eq!(deps(&e), Vec::<String>::new());
    assert_eq!(s.psql("SELECT count(*) FROM employees").trim(), "5");

    // A named query with its argument: its key, its row binding, its TTL.
    let e = explain(&mut c, &["emp.get", "3"]).await;
    assert_eq!(field(&e, "command"), "EMP.GET");
    assert_eq!(field(&e, "key"), "employee:3");
    assert_eq!(texts(&e["args"]), ["3"]);
    assert_eq!(field(&e, "cacheable"), "1", "{e:?}");
    assert_eq!(field(&e, "freshness"), "row-keyed");
    assert_eq!(field(&e, "row_key"), "public.employees.id = 3");
    assert_eq!(deps(&e), ["public.employees"]);
    assert_eq!(field(&e, "sql"), "SELECT name FROM employees WHERE id = $1");
    assert_eq!(field(&e, "cached"), "0");
    // Its arguments are checked as the command checks them.
    let bad: redis::RedisResult<Value> = redis::cmd("CACHEFRONT.EXPLAIN")
        .arg("EMP.GET")
        .arg("abc")
        .query_async(&mut c)
        .await;
    assert!(
        bad.unwrap_err().to_string().contains("invalid employee id"),
        "bad argument"
    );
    let arity: redis::RedisResult<Value> = redis::cmd("CACHEFRONT.EXPLAIN")
        .arg("EMP.GET")
        .query_async(&mut c)
        .await;
    assert!(arity
        .unwrap_err()
        .to_string()
        .contains("wrong number of arguments"));

    // A map in RESP3.
    let mut raw = s.raw().await;
    raw.call(&[b"HELLO", b"3"]).await;
    let r = raw.call(&[b"CACHEFRONT.EXPLAIN", b"SELECT 1"]).await;
    assert!(r.starts_with("%13\r\n"), "{r}");
}

async fn queries(c: &mut Conn, count: Option<usize>) -> Vec<HashMap<String, Value>> {
    let mut cmd = redis::cmd("CACHEFRONT.QUERIES");
    if let Some(n) = count {
        cmd.arg("COUNT").arg(n);
    }
    let v: Value = cmd.query_async(c).await.expect("QUERIES");
    match v {
        Value::Array(items) => items.iter().map(map).collect(),
        other => panic!("{other:?}"),
    }
}

fn by_label<'a>(list: &'a [HashMap<String, Value>], label: &str) -> &'a HashMap<String, Value> {
    list.iter()
        .find(|q| field(q, "query") == label)
        .unwrap_or_else(|| panic!("no {label} in {list:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn queries_count_reads_and_stay_bounded() {
    const TOP: usize = 16;
    let port = free_port();
    let s = Stack::start_with(|c| {
        c.metrics.listen = format!("127.0.0.1:{port}");
        c.metrics.top_queries = TOP;
    })
    .await;
    let mut c = s.client().await;
    // EMP.GET: 2 misses (ids 1 and 2), 2 hits. The guide's join: 1 miss, 3 hits.
    for id in [1, 1, 1, 2] {
        common::emp_get(&mut c, id).await;
    }
    for _ in 0..4 {
        assert_eq!(
            common::sql_cached(&mut c, GUIDE_QUERY).await,
            GUIDE_JOIN_JSON
        );
    }
    let guide = format!("sql:{}", &GUIDE_QUERY_KEY[..12]);

    let list = queries(&mut c, None).await;
    let emp = by_label(&list, "EMP.GET");
    assert_eq!(field(emp, "command"), "EMP.GET");
    assert_eq!(
        ["hits", "misses", "errors", "fills"].map(|f| field(emp, f)),
        ["2", "2", "0", "2"],
        "{emp:?}"
    );
    assert_eq!(field(emp, "hit_ratio"), "0.5000");
    for f in ["hit_p50_us", "hit_p99_us", "miss_p50_us", "miss_p99_us"] {
        assert!(field(emp, f).parse::<u64>().is_ok(), "{f}: {emp:?}");
    }
    assert_eq!(
        field(emp, "fill_bytes"),
        ("Alice Johnson".len() + "Bob Smith".len()).to_string()
    );
    assert_eq!(deps(emp), ["public.employees"]);
    assert_eq!(field(emp, "freshness"), "row-keyed");
    let join = by_label(&list, &guide);
    assert_eq!(field(join, "command"), "SQL.CACHED");
    assert_eq!(field(join, "sql"), GUIDE_QUERY);
    assert_eq!(
        ["hits", "misses", "fills"].map(|f| field(join, f)),
        ["3", "1", "1"],
        "{join:?}"
    );
    assert_eq!(field(join, "fill_bytes"), GUIDE_JOIN_JSON.len().to_string());
    assert_eq!(deps(join), ["public.departments", "public.employees"]);
    assert_eq!(field(join, "freshness"), "invalidated");
    assert_eq!(field(join, "last_invalidation_ms"), "nil");

    // A write: the last invalidation of a dependency shows on both.
    s.psql("UPDATE employees SET job_title = job_title WHERE id = 2");
    eventually("the invalidation is reported", async || {
        let list = queries(&mut c, None).await;
        field(by_label(&list, "EMP.GET"), "last_invalidation_ms") != "nil"
            && field(by_label(&list, &guide), "last_invalidation_ms") != "nil"
    })
    .await;

    // Prometheus: the same figures, one series per query.
    let body = common::http_get(port, "/metrics").await;
    for line in [
        "cachefront_query_hits_total{query=\"EMP.GET\"} 2\n".to_string(),
        "cachefront_query_misses_total{query=\"EMP.GET\"} 2\n".to_string(),
        "cachefront_query_fills_total{query=\"EMP.GET\"} 2\n".to_string(),
        format!("cachefront_query_hits_total{{query=\"{guide}\"}} 3\n"),
        format!(
            "cachefront_query_fill_bytes_total{{query=\"{guide}\"}} {}\n",
            GUIDE_JOIN_JSON.len()
        ),
        "cachefront_query_latency_seconds_count{query=\"EMP.GET\",result=\"hit\"} 2\n".to_string(),
        format!("cachefront_query_latency_seconds_count{{query=\"{guide}\",result=\"miss\"}} 1\n"),
        format!("cachefront_query_ttl_only{{query=\"{guide}\"}} 0\n"),
    ] {
        assert!(body.contains(&line), "missing {line}in:\n{body}");
    }
    assert!(
        body.contains(
            "cachefront_query_latency_seconds{query=\"EMP.GET\",result=\"hit\",quantile=\"0.99\"} "
        ),
        "{body}"
    );
    assert!(
        body.contains("cachefront_query_last_invalidation_timestamp_seconds{query=\"EMP.GET\"} "),
        "{body}"
    );

    // Every series the Grafana dashboard reads is exported.
    let dashboard = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana-cachefront.json"),
    )
    .expect("the dashboard");
    serde_json::from_str::<serde_json::Value>(&dashboard).expect("the dashboard is JSON");
    for (i, _) in dashboard.match_indices("cachefront_") {
        let name: String = dashboard[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.len() > "cachefront_".len() {
            assert!(
                body.contains(&format!("\n{name}")),
                "{name} is not exported"
            );
        }
    }

    // 1,000 distinct texts: at most TOP are kept; the busy guide query keeps its place.
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let url = s.proxy_url();
            tokio::spawn(async move {
                let mut c = common::connect(&url).await;
                for i in (t..1000).step_by(4) {
                    let q = format!("SELECT {i} AS n");
                    assert_eq!(
                        common::sql_cached(&mut c, &q).await,
                        format!("[{{\"n\": {i}}}]")
                    );
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("client task");
    }
    let list = queries(&mut c, None).await;
    let sql: Vec<_> = list
        .iter()
        .filter(|q| field(q, "command") == "SQL.CACHED")
        .collect();
    assert!(
        sql.len() <= TOP && sql.len() > TOP / 2,
        "{} kept",
        sql.len()
    );
    assert_eq!(field(sql[0], "query"), guide, "busiest first");
    assert_eq!(field(sql[0], "hits"), "3");
    let named = list.len() - sql.len();
    assert_eq!(queries(&mut c, Some(2)).await.len(), named + 2);
    let body = common::http_get(port, "/metrics").await;
    let series = body
        .lines()
        .filter(|l| l.starts_with("cachefront_query_hits_total{"))
        .count();
    assert!(series <= TOP + named, "{series} series");
    assert!(series > named);
}
