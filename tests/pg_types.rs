//! The JSON renderer (src/db/rows.rs) against a real PostgreSQL: one test per type family,
//! exact output, and cross-checks against PostgreSQL's own text output.

mod common;

use cachefront::db::rows::{cell_text, decodes_natively, text_cast, write_rows_json};
use common::services::{postgres, TestDb};
use std::process::Command;
use std::sync::OnceLock;
use tokio_postgres::{Client, NoTls};

/// One database per test process, with the extra types these tests use.
fn db() -> &'static TestDb {
    static DB: OnceLock<TestDb> = OnceLock::new();
    DB.get_or_init(|| {
        let db = postgres().fresh_db();
        postgres().psql(
            db.name(),
            "CREATE TYPE mood AS ENUM ('sad', 'happy', 'so \"so\"');
             CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
             CREATE DOMAIN tags AS text[];
             CREATE TYPE pair AS (a int, b text);
             CREATE EXTENSION IF NOT EXISTS citext;",
        );
        postgres().psql(
            db.name(),
            &format!("ALTER DATABASE {} SET lc_monetary = 'C'", db.name()),
        );
        db
    })
}

async fn client() -> Client {
    let url = tokio::task::spawn_blocking(|| db().url()).await.unwrap();
    let (c, conn) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    c
}

/// Runs `sql` and renders it; also checks that the output is valid JSON with one object per row.
async fn json(c: &Client, sql: &str) -> String {
    let stmt = c.prepare(sql).await.unwrap();
    let names: Vec<String> = stmt
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let rows = c.query(&stmt, &[]).await.unwrap();
    render(&names, &rows)
}

fn render(names: &[String], rows: &[tokio_postgres::Row]) -> String {
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut out = b"junk-before:".to_vec();
    write_rows_json(&names, rows, &mut out);
    let out = out.split_off("junk-before:".len());
    let v: serde_json::Value = serde_json::from_slice(&out)
        .unwrap_or_else(|e| panic!("invalid JSON {e}: {}", String::from_utf8_lossy(&out)));
    let arr = v.as_array().expect("array");
    assert_eq!(arr.len(), rows.len());
    assert!(arr.iter().all(|r| r.is_object()));
    String::from_utf8(out).unwrap()
}

/// As the caller will: columns this module cannot decode are cast with text_cast().
async fn json_cast(c: &Client, sql: &str) -> String {
    let stmt = c.prepare(sql).await.unwrap();
    let names: Vec<String> = stmt
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let sql = if stmt.columns().iter().all(|c| decodes_natively(c.type_())) {
        sql.to_string()
    } else {
        let cols: Vec<String> = stmt
            .columns()
            .iter()
            .enumerate()
            .map(|(i, col)| {
                if decodes_natively(col.type_()) {
                    format!("c{i}")
                } else {
                    format!("c{i}::{}", text_cast(col.type_()))
                }
            })
            .collect();
        let aliases: Vec<String> = (0..cols.len()).map(|i| format!("c{i}")).collect();
        format!(
            "SELECT {} FROM ({sql}) AS _q({})",
            cols.join(", "),
            aliases.join(", ")
        )
    };
    let rows = c.query(&sql, &[]).await.unwrap();
    render(&names, &rows)
}

/// For `SELECT v, v::text ...`: cell_text of column 0 must equal PostgreSQL's own text of it
/// (after `fix`). Returns the number of rows checked.
async fn crosscheck(c: &Client, sql: &str, fix: impl Fn(String) -> String) -> usize {
    let rows = c.query(sql, &[]).await.unwrap();
    for row in &rows {
        let pg: Option<String> = row.get(1);
        assert_eq!(cell_text(row, 0), pg.map(&fix), "{sql}");
    }
    assert!(!rows.is_empty());
    rows.len()
}

#[tokio::test]
async fn rows_shape_names_and_empty() {
    let c = client().await;
    assert_eq!(
        json(
            &c,
            "SELECT * FROM (VALUES (1, 'Alice'), (2, 'Bob')) t(id, name)"
        )
        .await,
        r#"[{"id": 1, "name": "Alice"}, {"id": 2, "name": "Bob"}]"#
    );
    assert_eq!(json(&c, "SELECT 1 AS a WHERE false").await, "[]");
    // names come from the caller, not from the result
    let rows = c
        .query("SELECT 1::int4 AS x, 'y'::text AS x2", &[])
        .await
        .unwrap();
    let mut out = Vec::new();
    write_rows_json(&["wanted \"name\"", "é"], &rows, &mut out);
    assert_eq!(
        String::from_utf8(out).unwrap(),
        r#"[{"wanted \"name\"": 1, "\u00e9": "y"}]"#
    );
    // duplicate names behave like a Python dict built from the row
    assert_eq!(
        json(&c, "SELECT 1 AS a, 2 AS b, 3 AS a").await,
        r#"[{"a": 3, "b": 2}]"#
    );
    // no names given: falls back to the column names
    let mut out = Vec::new();
    write_rows_json(&[], &rows, &mut out);
    assert_eq!(String::from_utf8(out).unwrap(), r#"[{"x": 1, "x2": "y"}]"#);
}

#[tokio::test]
async fn integers() {
    let c = client().await;
    assert_eq!(
        json(
            &c,
            "SELECT 1::int2 AS a, (-32768)::int2 AS b, 32767::int2 AS b2, 2147483647::int4 AS c, (-2147483648)::int4 AS c2,
                    (-9223372036854775808)::int8 AS d, 9223372036854775807::int8 AS e, 4294967295::oid AS f,
                    NULL::int4 AS g, 0::int8 AS h"
        )
        .await,
        r#"[{"a": 1, "b": -32768, "b2": 32767, "c": 2147483647, "c2": -2147483648, "d": -9223372036854775808, "e": 9223372036854775807, "f": 4294967295, "g": null, "h": 0}]"#
    );
}

#[tokio::test]
async fn floats() {
    let c = client().await;
    assert_eq!(
        json(
            &c,
            "SELECT 0.1::float8 AS a, 1e16::float8 AS b, 1e-5::float8 AS c, 'NaN'::float8 AS d, 'Infinity'::float8 AS e,
                    '-Infinity'::float8 AS f, '-0'::float8 AS g, 1.5::float8 AS h, 100::float8 AS i, 1e15::float8 AS j,
                    0.0001::float8 AS k, 123.456::float8 AS l, 1.7976931348623157e308::float8 AS m, 5e-324::float8 AS n,
                    (1::float8 / 3) AS o, NULL::float8 AS p"
        )
        .await,
        r#"[{"a": 0.1, "b": 1e+16, "c": 1e-05, "d": "NaN", "e": "Infinity", "f": "-Infinity", "g": -0.0, "h": 1.5, "i": 100.0, "j": 1000000000000000.0, "k": 0.0001, "l": 123.456, "m": 1.7976931348623157e+308, "n": 5e-324, "o": 0.3333333333333333, "p": null}]"#
    );
    assert_eq!(
        json(&c, "SELECT 1.1::real AS a, 0.1::real AS b, 'NaN'::real AS c, '-Infinity'::real AS d, 3.4028235e38::real AS e, 1e-45::real AS f, 16777216::real AS g, NULL::real AS h").await,
        r#"[{"a": 1.1, "b": 0.1, "c": "NaN", "d": "-Infinity", "e": 3.4028235e+38, "f": 1e-45, "g": 16777216.0, "h": null}]"#
    );
}

#[tokio::test]
async fn numerics() {
    let c = client().await;
    assert_eq!(
        json(
            &c,
            "SELECT 0::numeric AS a, 0.00::numeric AS b, -1.5::numeric AS c, 1e30::numeric AS d, 'NaN'::numeric AS e,
                    'Infinity'::numeric AS f, '-Infinity'::numeric AS g, 123456789.000100::numeric AS h,
                    0.000001234::numeric AS i, 1e-20::numeric AS j, -0.5::numeric AS k,
                    12345678901234567890.12345678901234567890::numeric AS l, 10000::numeric AS m, 1.10::numeric(10,4) AS n,
                    NULL::numeric AS o"
        )
        .await,
        r#"[{"a": "0", "b": "0.00", "c": "-1.5", "d": "1000000000000000000000000000000", "e": "NaN", "f": "Infinity", "g": "-Infinity", "h": "123456789.000100", "i": "0.000001234", "j": "0.00000000000000000001", "k": "-0.5", "l": "12345678901234567890.12345678901234567890", "m": "10000", "n": "1.1000", "o": null}]"#
    );
    let n = crosscheck(
        &c,
        "SELECT v, v::text FROM (
            SELECT round(((random() - 0.5) * 10 ^ (g % 40 - 20))::numeric, g % 25) * (10::numeric ^ (g % 7 * 9)) AS v FROM generate_series(1, 3000) g
            UNION ALL SELECT (g::numeric / 7) ^ (g % 5) FROM generate_series(1, 500) g
            UNION ALL SELECT 10::numeric ^ g FROM generate_series(-30, 30) g
            UNION ALL SELECT -(10::numeric ^ g) - 1 FROM generate_series(-30, 30) g
            UNION ALL VALUES (0.0000), (-0.0001), (99999999), (100000000), ('NaN'), (NULL)) s",
        |s| s,
    )
    .await;
    assert!(n > 3500);
}

#[tokio::test]
async fn booleans() {
    let c = client().await;
    assert_eq!(
        json(&c, "SELECT true AS t, false AS f, NULL::bool AS n").await,
        r#"[{"t": true, "f": false, "n": null}]"#
    );
}

#[tokio::test]
async fn text_types() {
    let c = client().await;
    assert_eq!(
        json(
            &c,
            r#"SELECT E'say "hi"\n\ttab \\ back / é 😀 \x01\x7f\r\b\f' AS a, 'ab'::varchar(10) AS b, 'ab'::char(5) AS c,
                      'pg_class'::name AS d, 'x'::"char" AS e, 'lit' AS f, '<a>x &amp; y</a>'::xml AS g,
                      'MiXeD'::citext AS h, ''::text AS i, NULL::text AS j, ''::"char" AS k, 'ü' AS l"#
        )
        .await,
        r#"[{"a": "say \"hi\"\n\ttab \\ back / \u00e9 \ud83d\ude00 \u0001\u007f\r\b\f", "b": "ab", "c": "ab   ", "d": "pg_class", "e": "x", "f": "lit", "g": "<a>x &amp; y</a>", "h": "MiXeD", "i": "", "j": null, "k": "", "l": "\u00fc"}]"#
    );
    // "char" with the high bit set prints as octal, like PostgreSQL
    crosscheck(&c, r#"SELECT v, v::text FROM (SELECT g::"char" AS v FROM generate_series(1, 127) g UNION ALL SELECT '\351'::"char") s"#, |s| s).await;
}

#[tokio::test]
async fn uuids() {
    let c = client().await;
    assert_eq!(
        json(&c, "SELECT 'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11'::uuid AS u, '00000000-0000-0000-0000-000000000000'::uuid AS z, NULL::uuid AS n").await,
        r#"[{"u": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", "z": "00000000-0000-0000-0000-000000000000", "n": null}]"#
    );
    crosscheck(
        &c,
        "SELECT v, v::text FROM (SELECT md5(g::text)::uuid AS v FROM generate_series(1, 200) g) s",
        |s| s,
    )
    .await;
}

#[tokio::test]
async fn dates_and_times() {
    let c = client().await;
    c.batch_execute("SET TimeZone = 'Asia/Kolkata'; SET DateStyle = 'SQL, DMY'")
        .await
        .unwrap();
    assert_eq!(
        json(
            &c,
            "SELECT '2024-01-02'::date AS a, 'infinity'::date AS b, '-infinity'::date AS c, '0044-03-15 BC'::date AS d,
                    '4713-01-01 BC'::date AS e, '5874897-12-31'::date AS f, '1999-12-31'::date AS g, '2000-02-29'::date AS h,
                    '0001-01-01'::date AS i, NULL::date AS j"
        )
        .await,
        r#"[{"a": "2024-01-02", "b": "infinity", "c": "-infinity", "d": "-0043-03-15", "e": "-4712-01-01", "f": "5874897-12-31", "g": "1999-12-31", "h": "2000-02-29", "i": "0001-01-01", "j": null}]"#
    );
    assert_eq!(
        json(
            &c,
            "SELECT '03:04:05'::time AS a, '03:04:05.123456'::time AS b, '03:04:05.1'::time AS c, '24:00:00'::time AS d,
                    '00:00:00'::time AS e, '03:04:05+02'::timetz AS f, '03:04:05.5-05:30'::timetz AS g,
                    '23:59:59.999999+00'::timetz AS h, NULL::time AS i"
        )
        .await,
        r#"[{"a": "03:04:05", "b": "03:04:05.123456", "c": "03:04:05.1", "d": "24:00:00", "e": "00:00:00", "f": "03:04:05+02:00", "g": "03:04:05.5-05:30", "h": "23:59:59.999999+00:00", "i": null}]"#
    );
    assert_eq!(
        json(
            &c,
            "SELECT '2024-01-02 03:04:05'::timestamp AS a, '2024-01-02 03:04:05.5'::timestamp AS b,
                    '1970-01-01 00:00:00.000001'::timestamp AS c, '1999-12-31 23:59:59.999999'::timestamp AS d,
                    'infinity'::timestamp AS e, '-infinity'::timestamp AS f, '0044-03-15 12:00:00 BC'::timestamp AS g,
                    '2024-01-02 03:04:05+02'::timestamptz AS h, '2024-06-30 23:59:59.25-07'::timestamptz AS i,
                    'infinity'::timestamptz AS j, '294276-12-31 23:59:59.999999'::timestamp AS k, NULL::timestamptz AS l"
        )
        .await,
        r#"[{"a": "2024-01-02T03:04:05", "b": "2024-01-02T03:04:05.5", "c": "1970-01-01T00:00:00.000001", "d": "1999-12-31T23:59:59.999999", "e": "infinity", "f": "-infinity", "g": "-0043-03-15T12:00:00", "h": "2024-01-02T01:04:05+00:00", "i": "2024-07-01T06:59:59.25+00:00", "j": "infinity", "k": "294276-12-31T23:59:59.999999", "l": null}]"#
    );
    // against PostgreSQL's own ISO output, over a wide range (AD years)
    c.batch_execute("SET DateStyle = 'ISO, YMD'; SET TimeZone = 'UTC'")
        .await
        .unwrap();
    crosscheck(&c, "SELECT v, v::text FROM (SELECT date '0001-01-01' + g * 37 AS v FROM generate_series(0, 98000) g) s", |s| s).await;
    crosscheck(
        &c,
        "SELECT v, v::text FROM (SELECT timestamp '2000-01-01' + (random() - 0.5) * interval '1400000 days' AS v FROM generate_series(1, 3000) g) s",
        |s| s.replacen(' ', "T", 1),
    )
    .await;
    crosscheck(
        &c,
        "SELECT v, v::text FROM (SELECT timestamptz '2000-01-01 00:00+00' + (random() - 0.5) * interval '100000 days' AS v FROM generate_series(1, 1000) g) s",
        |s| s.replacen(' ', "T", 1) + ":00",
    )
    .await;
    crosscheck(&c, "SELECT v, v::text FROM (SELECT (random() * interval '24 hours')::time AS v FROM generate_series(1, 1000) g) s", |s| s).await;
}

#[tokio::test]
async fn intervals() {
    let c = client().await;
    assert_eq!(
        json(
            &c,
            "SELECT '1 year 2 months 3 days 4 hours 5 minutes 6.5 seconds'::interval AS a, '0'::interval AS b,
                    '-1 day'::interval AS c, '-1.5 seconds'::interval AS d, '1 mon -1 day'::interval AS e,
                    '100 hours'::interval AS f, '0.000001 sec'::interval AS g, '-1 year -2 mons +3 days -04:05:06.789'::interval AS h,
                    NULL::interval AS i"
        )
        .await,
        r#"[{"a": "P1Y2M3DT4H5M6.5S", "b": "PT0S", "c": "P-1D", "d": "PT-1.5S", "e": "P1M-1D", "f": "PT100H", "g": "PT0.000001S", "h": "P-1Y-2M3DT-4H-5M-6.789S", "i": null}]"#
    );
    c.batch_execute("SET IntervalStyle = iso_8601")
        .await
        .unwrap();
    crosscheck(
        &c,
        "SELECT v, v::text FROM (
            SELECT make_interval(g % 30 - 15, g % 13 - 6, 0, g % 45 - 20, g % 50 - 25, g % 61 - 30, ((g * 7919) % 2000000 - 1000000) / 1e6::float8) AS v
              FROM generate_series(1, 2000) g
            UNION ALL VALUES ('178000000 years'::interval), ('-178000000 years'), ('2147483647 days'), ('-2562047788 hours'),
                             ('0.5 sec'), ('-0.5 sec'), ('1 min -0.5 sec'), ('12 mons'), ('-13 mons')) s",
        |s| s,
    )
    .await;
}

#[tokio::test]
async fn byteas() {
    let c = client().await;
    assert_eq!(
        json(&c, r"SELECT '\x0a0b'::bytea AS a, ''::bytea AS b, decode('00ff7f', 'hex') AS c, NULL::bytea AS d").await,
        r#"[{"a": "\\x0a0b", "b": "\\x", "c": "\\x00ff7f", "d": null}]"#
    );
}

#[tokio::test]
async fn arrays() {
    let c = client().await;
    assert_eq!(
        json(
            &c,
            r#"SELECT '{{1,2},{3,4}}'::int[] AS a, ARRAY['a', NULL, 'b"c']::text[] AS b, '{}'::int[] AS c,
                      '[0:1]={5,6}'::int[] AS d, ARRAY[1.5, 'NaN']::numeric[] AS e, ARRAY[1.5, 'NaN', 1e16]::float8[] AS f,
                      '{{{1},{2}},{{3},{NULL}}}'::int8[] AS g, ARRAY['{"a":1}'::json, 'null'] AS h, ARRAY[NULL]::int[] AS i,
                      ARRAY[true, false] AS j, ARRAY['2024-01-02'::date, 'infinity'] AS k,
                      ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid] AS l, '{"x y","é"}'::varchar[] AS m,
                      ARRAY['\x01'::bytea] AS n, ARRAY['1 day'::interval] AS o, NULL::int[] AS p, '{{NULL,NULL}}'::text[] AS q"#
        )
        .await,
        r#"[{"a": [[1, 2], [3, 4]], "b": ["a", null, "b\"c"], "c": [], "d": [5, 6], "e": ["1.5", "NaN"], "f": [1.5, "NaN", 1e+16], "g": [[[1], [2]], [[3], [null]]], "h": [{"a": 1}, null], "i": [null], "j": [true, false], "k": ["2024-01-02", "infinity"], "l": ["a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"], "m": ["x y", "\u00e9"], "n": ["\\x01"], "o": ["P1D"], "p": null, "q": [[null, null]]}]"#
    );
}

#[tokio::test]
async fn json_and_jsonb() {
    let c = client().await;
    assert_eq!(
        json(
            &c,
            r#"SELECT '{"a": {"b": [1, 2.50, "x"]},   "c": null}'::json AS a,
                      '{"b":1,"a":{"c":[true]}}'::jsonb AS b,
                      '{"k":1, "k":2, "j": 0}'::json AS c,
                      '"é"'::json AS d,
                      '{"é": "😀\u00e9\n"}'::jsonb AS e,
                      '[1e2, 1.0, -0, 12345678901234567890123]'::jsonb AS f,
                      '[1e2, 1.0, -0, 12345678901234567890123]'::json AS g,
                      '[]'::jsonb AS h, '{}'::json AS i, 'null'::jsonb AS j, NULL::jsonb AS k"#
        )
        .await,
        r#"[{"a": {"a": {"b": [1, 2.5, "x"]}, "c": null}, "b": {"a": {"c": [true]}, "b": 1}, "c": {"k": 2, "j": 0}, "d": "\u00e9", "e": {"\u00e9": "\ud83d\ude00\u00e9\n"}, "f": [100, 1.0, 0, 12345678901234567890123], "g": [100.0, 1.0, 0, 12345678901234567890123], "h": [], "i": {}, "j": null, "k": null}]"#
    );
    let rows = c
        .query("SELECT '{\"a\":[1,{\"b\":\"c\"}]}'::jsonb", &[])
        .await
        .unwrap();
    assert_eq!(
        cell_text(&rows[0], 0).as_deref(),
        Some(r#"{"a": [1, {"b": "c"}]}"#)
    );
}

#[tokio::test]
async fn network_types() {
    let c = client().await;
    assert_eq!(
        json(
            &c,
            "SELECT '192.168.0.1'::inet AS a, '192.168.0.1/24'::inet AS b, '192.168.0.0/24'::cidr AS c, '10.0.0.1/32'::cidr AS d,
                    '::1'::inet AS e, '2001:db8::1/64'::inet AS f, 'fe80::/10'::cidr AS g, '::ffff:1.2.3.4'::inet AS h,
                    '08:00:2b:01:02:03'::macaddr AS i, '08:00:2b:01:02:03:04:05'::macaddr8 AS j, NULL::inet AS k"
        )
        .await,
        r#"[{"a": "192.168.0.1", "b": "192.168.0.1/24", "c": "192.168.0.0/24", "d": "10.0.0.1/32", "e": "::1", "f": "2001:db8::1/64", "g": "fe80::/10", "h": "::ffff:1.2.3.4", "i": "08:00:2b:01:02:03", "j": "08:00:2b:01:02:03:04:05", "k": null}]"#
    );
    crosscheck(
        &c,
        // format('%s') uses the output function; inet::text would always append the mask length
        "SELECT v, format('%s', v) FROM (VALUES ('::'::inet), ('1::'), ('1:0:0:2::3'), ('0:0:1::'), ('1:0:0:1:0:0:0:1'), ('::1.2.3.4'),
                ('::ffff:0.0.0.0'), ('1:2:3:4:5:6:7:8'), ('0:0:0:0:0:1:0:0'), ('::ffff:1:2'), ('0:0:0:0:1::'), ('::1/128'),
                ('::0.0.0.2'), ('abcd:ef01::ffff:1.2.3.4'), ('::1.2.3.4/120'), ('0.0.0.0/0'), ('255.255.255.255')) s(v)",
        |s| s,
    )
    .await;
    crosscheck(
        &c,
        "SELECT v::cidr, v::cidr::text FROM (VALUES ('::'::inet), ('10.0.0.0/8'), ('2001:db8::/32'), ('::ffff:1.2.3.4'), ('1.2.3.4')) s(v)",
        |s| s,
    )
    .await;
}

#[tokio::test]
async fn enums_and_domains() {
    let c = client().await;
    let stmt = c.prepare("SELECT 'happy'::mood AS m, 5::posint AS p, ARRAY['sad', 'so \"so\"']::mood[] AS ma, ARRAY[1, 2]::posint[] AS pa, ARRAY['x']::tags AS t").await.unwrap();
    assert!(stmt.columns().iter().all(|c| decodes_natively(c.type_())));
    assert_eq!(
        json(&c, "SELECT 'happy'::mood AS m, 5::posint AS p, ARRAY['sad', 'so \"so\"']::mood[] AS ma, ARRAY[1, 2]::posint[] AS pa, ARRAY['x']::tags AS t, NULL::mood AS n").await,
        r#"[{"m": "happy", "p": 5, "ma": ["sad", "so \"so\""], "pa": [1, 2], "t": ["x"], "n": null}]"#
    );
}

#[tokio::test]
async fn other_types_go_through_the_text_cast() {
    let c = client().await;
    let sql = r#"SELECT 1.5::money AS a, point(1, 2) AS b, int4range(1, 5) AS c, ROW(1, 'a')::pair AS d, B'101' AS e,
                      'a b'::tsvector AS f, '0/16B3748'::pg_lsn AS g, ARRAY[1::money, 2::money] AS h,
                      ARRAY[int4range(1, 2), NULL] AS i, 'pg_class'::regclass AS j, '42'::xid AS k, 7 AS l,
                      ARRAY[ROW(2, 'b"')::pair] AS m, NULL::point AS n"#;
    let stmt = c.prepare(sql).await.unwrap();
    let native: Vec<bool> = stmt
        .columns()
        .iter()
        .map(|c| decodes_natively(c.type_()))
        .collect();
    assert_eq!(
        native,
        [
            false, false, false, false, false, false, false, false, false, false, false, true,
            false, false
        ]
    );
    let casts: Vec<&str> = stmt
        .columns()
        .iter()
        .map(|c| text_cast(c.type_()))
        .collect();
    assert_eq!(casts[7], "text[]");
    assert_eq!(casts[8], "text[]");
    assert_eq!(casts[12], "text[]");
    assert_eq!(casts[0], "text");
    assert_eq!(
        json_cast(&c, sql).await,
        r#"[{"a": "$1.50", "b": "(1,2)", "c": "[1,5)", "d": "(1,a)", "e": "101", "f": "'a' 'b'", "g": "0/16B3748", "h": ["$1.00", "$2.00"], "i": ["[1,2)", null], "j": "pg_class", "k": "42", "l": 7, "m": ["(2,\"b\"\"\")"], "n": null}]"#
    );
    // a caller that forgot the cast gets null for those cells, never a panic or invalid JSON
    assert_eq!(
        json(&c, "SELECT point(1, 2) AS p, 1 AS one").await,
        r#"[{"p": null, "one": 1}]"#
    );
}

#[tokio::test]
async fn cell_text_is_unquoted() {
    let c = client().await;
    let rows = c
        .query(
            r#"SELECT E'a\"b\né' AS t, 42 AS i, NULL::text AS n, 'NaN'::float8 AS f, 1.50::numeric AS num, '{1,2}'::int[] AS a,
                     '\x0a'::bytea AS b, '2024-01-02 03:04:05'::timestamp AS ts, true AS bo, '{{"x"}}'::text[] AS ta,
                     '[1,2]'::json AS j, 0.1::float8 AS f2"#,
            &[],
        )
        .await
        .unwrap();
    let r = &rows[0];
    let got: Vec<Option<String>> = (0..13).map(|i| cell_text(r, i)).collect();
    let want: Vec<Option<&str>> = vec![
        Some("a\"b\né"),
        Some("42"),
        None,
        Some("NaN"),
        Some("1.50"),
        Some("[1, 2]"),
        Some(r"\x0a"),
        Some("2024-01-02T03:04:05"),
        Some("true"),
        Some(r#"[["x"]]"#),
        Some("[1, 2]"),
        Some("0.1"),
        None, // out of range
    ];
    assert_eq!(
        got,
        want.into_iter()
            .map(|o| o.map(String::from))
            .collect::<Vec<_>>()
    );
}

#[tokio::test]
async fn every_family_yields_valid_json() {
    let c = client().await;
    let sql = r#"SELECT g AS id, g::int2 AS i2, g::int8 * 1000000000000 AS i8, g / 7.0 AS num, g / 7.0::float8 AS f8,
                        (g / 7.0)::real AS f4, g % 2 = 0 AS b, repeat(chr(abs(g) % 200 + 1) || '😀"\', g % 5) AS t,
                        md5(g::text)::uuid AS u, date '2000-01-01' + g * 1000 - 400000 AS d,
                        timestamp '2000-01-01' + g * interval '77777 minutes 1.234567 sec' AS ts,
                        timestamptz '2000-01-01 00:00+00' - g * interval '1 day 0.5 sec' AS tz,
                        make_interval(0, g, 0, -g, g, 0, g / 3.0) AS iv, decode(md5(g::text), 'hex') AS by,
                        ARRAY[g, NULL, -g] AS arr, json_build_object('g', g, 's', chr(g + 400), 'f', g / 3.0) AS j,
                        jsonb_build_array(g, g::text, g / 4.0, NULL) AS jb, ('10.0.' || abs(g) % 256 || '.1/24')::inet AS ip,
                        CASE WHEN g % 3 = 0 THEN NULL ELSE 'happy'::mood END AS m, (abs(g) % 2 + 1)::posint AS p,
                        make_time(abs(g) % 24, abs(g) % 60, abs(g) % 60 + 0.25) AS tm, '12:00+03'::timetz AS ttz
                   FROM generate_series(-300, 300) g"#;
    let rows = c.query(sql, &[]).await.unwrap();
    let stmt = c.prepare(sql).await.unwrap();
    assert!(stmt.columns().iter().all(|c| decodes_natively(c.type_())));
    let names: Vec<String> = stmt
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    let out = render(&names, &rows);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 601);
    assert!(
        v[0]["b"].is_boolean()
            && v[0]["num"].is_string()
            && v[0]["arr"].is_array()
            && v[0]["j"].is_object()
    );
    // each row alone too
    for (i, row) in rows.iter().enumerate() {
        let one = render(&names, std::slice::from_ref(row));
        let v1: serde_json::Value = serde_json::from_str(&one).unwrap();
        assert_eq!(v1[0], v[i]);
    }
}

#[tokio::test]
async fn matches_python_json_dumps_byte_for_byte() {
    let python = Command::new("python3").arg("--version").output();
    assert!(
        python.map(|o| o.status.success()).unwrap_or(false),
        "python3 is required (scripts/deps.sh installs it)"
    );
    let c = client().await;
    let sql = r#"SELECT * FROM (VALUES
            (1, E'Al"ice\n', true, NULL::int4, 0.1::float8, 1.1::real, 9223372036854775807::int8),
            (2, E'B\\ob é😀\x01\x7f\t/', false, 7, 1e16, 0.5, -1),
            (3, '', NULL, NULL, 1e-5, 3.4028235e38, 0),
            (4, E'\u2028\ufeff ü', true, -2147483648, '-0'::float8, '-0'::real, NULL),
            (5, 'x', false, 0, 1.7976931348623157e308, 1e-45, 1),
            (6, 'y', true, 1, 5e-324, 16777216, 2),
            (7, 'z', true, 2, 1234567890123456.7, 0.1, 3),
            (8, 'w', true, 3, 0.3333333333333333, 100, 4),
            (9, 'v', true, 4, 1e22, 1e10, 5),
            (10, 'u', true, 5, 123.456, 2.5, 6)
        ) t(id, name, ok, maybe, f, r, big)"#;
    let out = json(&c, sql).await;
    let py = r#"
import json, sys
rows = [
    (1, 'Al"ice\n', True, None, 0.1, float('1.1'), 9223372036854775807),
    (2, 'B\\ob \u00e9\U0001F600\x01\x7f\t/', False, 7, 1e16, float('0.5'), -1),
    (3, '', None, None, 1e-5, float('3.4028235e38'), 0),
    (4, '\u2028\ufeff \u00fc', True, -2147483648, -0.0, float('-0'), None),
    (5, 'x', False, 0, 1.7976931348623157e308, float('1e-45'), 1),
    (6, 'y', True, 1, 5e-324, float('16777216'), 2),
    (7, 'z', True, 2, 1234567890123456.7, float('0.1'), 3),
    (8, 'w', True, 3, 0.3333333333333333, float('100'), 4),
    (9, 'v', True, 4, 1e22, float('1e+10'), 5),
    (10, 'u', True, 5, 123.456, float('2.5'), 6),
]
names = ['id', 'name', 'ok', 'maybe', 'f', 'r', 'big']
sys.stdout.write(json.dumps([dict(zip(names, r)) for r in rows]))
"#;
    let res = Command::new("python3").arg("-c").arg(py).output().unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    assert_eq!(out, String::from_utf8(res.stdout).unwrap());

    // embedded json: Python's json.dumps(json.loads(text)) for the same documents
    let docs = [
        r#"{"a": {"b": [1, 2.50, "x\u00e9"]}, "c": null, "a": 5, "d": [1e2, -0, 1E-7, 0.1e1, 123456789012345678901234567890]}"#,
        r#"[true, false, null, "\ud83d\ude00\/\b", {}, [], {"": ""}, 1.7976931348623157e308]"#,
    ];
    for doc in docs {
        let lit = doc.replace('\'', "''");
        let out = json(&c, &format!("SELECT '{lit}'::json AS j")).await;
        let py = "import json,sys; sys.stdout.write(json.dumps([{'j': json.loads(sys.argv[1])}]))";
        let res = Command::new("python3")
            .args(["-c", py, doc])
            .output()
            .unwrap();
        assert!(
            res.status.success(),
            "{}",
            String::from_utf8_lossy(&res.stderr)
        );
        assert_eq!(out, String::from_utf8(res.stdout).unwrap());
    }
}
