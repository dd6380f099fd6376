//! Hostile input: Valkey's protocol-error cases (tests/unit/protocol.tcl) not covered by
//! tests/protocol.rs, many idle half-requests, slowloris, invalid UTF-8, deep nesting, SQL
//! injection against EMP.GET, write attempts through SQL.CACHED — and the same writes sent
//! to the database layer directly, past the SQL parser, to show PostgreSQL still refuses them.

mod common;

use common::protocol_error;

use common::{Raw, Stack};
use std::time::{Duration, Instant};

/// The employees table as text, to compare before and after an attack.
fn employees(s: &Stack) -> String {
    s.psql("SELECT id, name, dept_id, job_title FROM employees ORDER BY id")
}

fn employee_count(s: &Stack) -> String {
    s.psql("SELECT count(*) FROM employees").trim().to_string()
}

// -------------------------------------------------------------------------------------------
// Valkey's protocol.tcl
// -------------------------------------------------------------------------------------------

/// "Check CRLF when parsing the querybuf": a `\r` not followed by `\n` (or bulk data not
/// followed by CRLF) is `invalid CRLF in request` in Valkey; a header line with junk before
/// its CRLF is an invalid length. Texts checked against valkey-server 9.1.
#[tokio::test]
async fn crlf_checks_like_valkey() {
    let s = Stack::start().await;
    let ok: &[u8] = b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n";
    let mut raw = s.raw().await;
    raw.send(ok).await;
    assert_eq!(raw.frame().await, "+OK\r\n");
    let cases: &[(&[u8], &str)] = &[
        // `*3` followed by something other than CRLF.
        (
            b"*3x\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n",
            "invalid multibulk length",
        ),
        (
            b"*3\rx$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n",
            "invalid CRLF in request",
        ),
        (
            b"*3xx$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n",
            "invalid multibulk length",
        ),
        // `$3` followed by something other than CRLF.
        (
            b"*3\r\n$3x\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n",
            "invalid bulk length",
        ),
        (
            b"*3\r\n$3\rxSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n",
            "invalid CRLF in request",
        ),
        (
            b"*3\r\n$3xxSET\r\n$3\r\nkey\r\n$5\r\nvalue\r\n",
            "invalid bulk length",
        ),
        // `SET` not followed by CRLF.
        (
            b"*3\r\n$3\r\nSET\rx$3\r\nkey\r\n$5\r\nvalue\r\n",
            "invalid CRLF in request",
        ),
        (
            b"*3\r\n$3\r\nSETx\n$3\r\nkey\r\n$5\r\nvalue\r\n",
            "invalid CRLF in request",
        ),
        (
            b"*3\r\n$3\r\nSETxx$3\r\nkey\r\n$5\r\nvalue\r\n",
            "invalid CRLF in request",
        ),
        // `key` not followed by CRLF.
        (
            b"*3\r\n$3\r\nSET\r\n$3\r\nkeyx\n$5\r\nvalue\r\n",
            "invalid CRLF in request",
        ),
        (
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\rx$5\r\nvalue\r\n",
            "invalid CRLF in request",
        ),
        (
            b"*3\r\n$3\r\nSET\r\n$3\r\nkeyxx$5\r\nvalue\r\n",
            "invalid CRLF in request",
        ),
        // `$5` followed by something other than CRLF.
        (
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5x\nvalue\r\n",
            "invalid bulk length",
        ),
        (
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\rxvalue\r\n",
            "invalid CRLF in request",
        ),
        (
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5xxvalue\r\n",
            "invalid bulk length",
        ),
        // `value` not followed by CRLF.
        (
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvaluex\n",
            "invalid CRLF in request",
        ),
        (
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvalue\rx",
            "invalid CRLF in request",
        ),
        (
            b"*3\r\n$3\r\nSET\r\n$3\r\nkey\r\n$5\r\nvaluexx",
            "invalid CRLF in request",
        ),
    ];
    let mut wrong = Vec::new();
    for (bytes, msg) in cases {
        let mut raw = s.raw().await;
        raw.send(bytes).await;
        let got = raw.frame().await;
        let want = format!("-ERR Protocol error: {msg}\r\n");
        if got != want {
            wrong.push(format!(
                "{:?}: want {want:?}, got {got:?}",
                String::from_utf8_lossy(bytes)
            ));
        } else {
            assert!(raw.closed().await, "must close after {got:?}");
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// "Protocol desync regression test": a stray byte then more than 64 KiB without a newline is
/// a protocol error, not a request waiting forever.
#[tokio::test]
async fn protocol_desync_regressions() {
    let s = Stack::start().await;
    let cases: &[(&[u8], &str)] = &[
        (b"\x00", "too big inline request"),
        (b"*\x00", "too big mbulk count string"),
        (b"$\x00", "too big inline request"),
        (b"*1\r\n$\x00", "too big bulk count string"),
    ];
    let payload = vec![b'A'; 1024];
    for (prefix, msg) in cases {
        let mut raw = s.raw().await;
        raw.send(prefix).await;
        let mut sent = 0;
        while sent <= 64 * 1024 {
            if tokio::io::AsyncWriteExt::write_all(&mut raw.stream, &payload)
                .await
                .is_err()
            {
                break;
            }
            sent += payload.len();
        }
        assert_eq!(
            raw.frame().await,
            format!("-ERR Protocol error: {msg}\r\n"),
            "prefix {prefix:?}"
        );
        assert!(raw.closed().await);
    }
    let mut other = s.raw().await;
    assert_eq!(other.call(&[b"PING"]).await, "+PONG\r\n");
}

/// "Unbalanced single/double quotes": the pipelined PING after it is never run.
#[tokio::test]
async fn unbalanced_quotes_stop_the_pipeline() {
    let s = Stack::start().await;
    protocol_error(
        &s,
        b"set foo 'b'a'r\r\nping\r\n",
        "unbalanced quotes in request",
    )
    .await;
    protocol_error(
        &s,
        b"set foo \"b\"a\"r\r\nping\r\n",
        "unbalanced quotes in request",
    )
    .await;
    // Empty-query and negative-length cases, pipelined with a command.
    let mut raw = s.raw().await;
    raw.send(b"\r\n*1\r\n$4\r\nping\r\n*-10\r\n*1\r\n$4\r\nping\r\n*0\r\nPING\r\n")
        .await;
    for _ in 0..3 {
        assert_eq!(raw.frame().await, "+PONG\r\n");
    }
}

/// "Mixing quoted and unquoted strings" (valkey-server 9.1 answers OK and test-value).
#[tokio::test]
async fn mixing_quoted_and_unquoted_strings() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    raw.send(b"set \"\"\"tes\"t-'k'e\"y\" \"test\"'-'value\r\nget test'-'key\r\n")
        .await;
    assert_eq!(raw.frame().await, "+OK\r\n");
    assert_eq!(raw.frame().await, "$10\r\ntest-value\r\n");
}

/// What follows `expected '$', got` is the byte itself, with CR/LF shown as a space, as
/// valkey-server 9.1 replies.
#[tokio::test]
async fn unexpected_header_byte_is_shown_like_valkey() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    raw.send(b"*1\r\n\r\n").await;
    assert_eq!(
        raw.frame().await,
        "-ERR Protocol error: expected '$', got ' '\r\n"
    );
    let mut raw = s.raw().await;
    raw.send(b"*1\r\n\xff\r\n").await;
    assert_eq!(
        raw.frame_bytes().await,
        b"-ERR Protocol error: expected '$', got '\xff'\r\n"
    );
}

// -------------------------------------------------------------------------------------------
// Resource exhaustion
// -------------------------------------------------------------------------------------------

fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// 2,000 clients each send a header (`*1\r\n$100\r\n`) and nothing more. Other clients are
/// still answered, and cachefront (in this process) grows by well under 100 MB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_header_only_connections() {
    raise_fd_limit(16_384);
    let s = Stack::start().await;
    let mut normal = s.raw().await;
    assert_eq!(normal.call(&[b"PING"]).await, "+PONG\r\n");
    let before = common::rss_bytes();
    let mut idle = Vec::with_capacity(2_000);
    for i in 0..2_000 {
        let mut r = Raw::connect(s.proxy_port()).await;
        r.send(b"*1\r\n$100\r\n").await;
        idle.push(r);
        if i % 250 == 0 {
            let t = Instant::now();
            assert_eq!(
                normal.call(&[b"EMP.GET", b"1"]).await,
                "$13\r\nAlice Johnson\r\n"
            );
            assert!(t.elapsed() < Duration::from_secs(1), "slow answer");
        }
    }
    // Let the server read every header.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(normal.call(&[b"PING"]).await, "+PONG\r\n");
    let mut fresh = s.raw().await;
    assert_eq!(
        fresh.call(&[b"ECHO", b"still here"]).await,
        "$10\r\nstill here\r\n"
    );
    let after = common::rss_bytes();
    let growth = after.saturating_sub(before);
    println!(
        "RSS before {before} B, after {after} B: growth {growth} B for 2000 header-only \
         connections = {} B per connection (both socket ends and the test's own clients included)",
        growth / 2_000
    );
    assert!(growth < 100 * 1024 * 1024, "RSS grew by {growth} bytes");
    // The idle clients are still waiting, not dropped: completing one request works.
    let last = idle.last_mut().unwrap();
    last.send(&[b'x'; 100]).await;
    last.send(b"\r\n").await;
    assert!(last.frame().await.starts_with("-ERR unknown command"));
}

/// A client sending one byte every 50 ms does not hold up anyone else.
#[tokio::test]
async fn slowloris_does_not_hold_others_up() {
    let s = Stack::start().await;
    let mut slow = s.raw().await;
    let port = s.proxy_port();
    let others = tokio::spawn(async move {
        let mut fast = Raw::connect(port).await;
        let mut worst = Duration::ZERO;
        for i in 0..20 {
            let t = Instant::now();
            let id = (1 + i % 5).to_string();
            let r = fast.call(&[b"EMP.GET", id.as_bytes()]).await;
            assert!(r.starts_with('$'), "{r}");
            assert_eq!(fast.call(&[b"PING"]).await, "+PONG\r\n");
            worst = worst.max(t.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        worst
    });
    let req = b"*2\r\n$4\r\nECHO\r\n$5\r\nhello\r\n";
    for b in req {
        slow.send(&[*b]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let worst = others.await.unwrap();
    assert!(
        worst < Duration::from_millis(250),
        "others waited {worst:?} for a reply"
    );
    assert_eq!(slow.frame().await, "$5\r\nhello\r\n");
}

/// `*1\r\n` ten thousand times: nested arrays are not a request; the first nested header is a
/// protocol error, nothing recurses.
#[tokio::test]
async fn deeply_nested_arrays_are_a_protocol_error() {
    let s = Stack::start().await;
    let mut bytes = b"*1\r\n".repeat(10_000);
    bytes.extend_from_slice(b"$4\r\nPING\r\n");
    protocol_error(&s, &bytes, "expected '$', got '*'").await;
    // Byte-exact too when split so that the nested headers arrive one by one.
    let mut raw = s.raw().await;
    for chunk in bytes.chunks(7).take(3) {
        // The server may already have answered and closed.
        let _ = tokio::io::AsyncWriteExt::write_all(&mut raw.stream, chunk).await;
    }
    assert_eq!(
        raw.frame().await,
        "-ERR Protocol error: expected '$', got '*'\r\n"
    );
    let mut other = s.raw().await;
    assert_eq!(other.call(&[b"PING"]).await, "+PONG\r\n");
}

// -------------------------------------------------------------------------------------------
// Invalid UTF-8 and injection
// -------------------------------------------------------------------------------------------

#[tokio::test]
async fn invalid_utf8_in_names_keys_queries_and_ids() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    // Command name: Valkey's own unknown-command error, connection kept.
    let r = raw.call(&[b"\xff\xfeGET", b"k"]).await;
    assert!(r.starts_with("-ERR unknown command"), "{r}");
    let r = raw.call(&[b"EMP.\xc3\x28", b"1"]).await;
    assert!(r.starts_with("-ERR unknown command"), "{r}");
    // Keys: stored and read back byte for byte.
    assert_eq!(
        raw.call(&[b"SET", b"k\xc3\x28\xa0", b"v\xff"]).await,
        "+OK\r\n"
    );
    raw.cmd(&[b"GET", b"k\xc3\x28\xa0"]).await;
    assert_eq!(raw.frame_bytes().await, b"$2\r\nv\xff\r\n");
    // SQL.CACHED: refused before it reaches the parser or the database.
    assert_eq!(
        raw.call(&[b"SQL.CACHED", b"SELECT '\xff' AS x"]).await,
        "-ERR SQL.CACHED query must be valid UTF-8 text\r\n"
    );
    assert_eq!(
        raw.call(&[
            b"SQL.CACHED",
            b"SELECT $1::text AS x",
            b"PARAMS",
            b"\xc0\xaf"
        ])
        .await,
        "-ERR SQL.CACHED parameters must be valid UTF-8 text\r\n"
    );
    // EMP.GET: an invalid id, shown lossily; CR/LF in the id cannot break the reply.
    assert_eq!(
        raw.call(&[b"EMP.GET", b"1\xff"]).await,
        "-ERR invalid employee id '1\u{fffd}'\r\n"
    );
    assert_eq!(
        raw.call(&[b"EMP.GET", b"1\r\n+OK"]).await,
        "-ERR invalid employee id '1  +OK'\r\n"
    );
    assert_eq!(
        raw.call(&[b"EMP.GET", b"1\x00"]).await,
        "-ERR invalid employee id '1\0'\r\n"
    );
    assert_eq!(raw.call(&[b"PING"]).await, "+PONG\r\n");
}

#[tokio::test]
async fn emp_get_is_not_injectable() {
    let s = Stack::start().await;
    let before = employees(&s);
    let mut raw = s.raw().await;
    for id in [
        "1; DROP TABLE employees",
        "1 OR 1=1",
        "' OR ''='",
        "1) OR (1=1",
        "1 UNION SELECT version()",
        "0x1",
        " 1",
        "1e0",
        "99999999999999999999",
    ] {
        assert_eq!(
            raw.call(&[b"EMP.GET", id.as_bytes()]).await,
            format!("-ERR invalid employee id '{id}'\r\n"),
            "id {id:?}"
        );
    }
    // Nothing was cached under an attacker-chosen key either.
    let mut v = s.valkey_client().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("employee:*")
        .query_async(&mut v)
        .await
        .unwrap();
    assert!(keys.is_empty(), "{keys:?}");
    assert_eq!(employee_count(&s), "5");
    assert_eq!(employees(&s), before);
}

/// Statements that write, or smuggle a write past a naive check. SQL.CACHED must refuse each
/// one with the SPEC's error.
const WRITE_ATTEMPTS: &[&str] = &[
    "DELETE FROM employees",
    "UPDATE employees SET name = 'x'",
    "INSERT INTO employees (name, dept_id, job_title) VALUES ('x', 1, 'y')",
    "TRUNCATE employees",
    "DROP TABLE employees",
    "CREATE TABLE evil (a int)",
    "ALTER TABLE employees DROP COLUMN name",
    "SELECT 1; DELETE FROM employees",
    "SELECT 1; DELETE FROM employees;",
    "SELECT $$;$$; DELETE FROM employees",
    "SELECT $x$ $$ ; $x$; DELETE FROM employees",
    "SELECT 1 /* ; */ ; DELETE FROM employees",
    "SELECT 1 /* /* nested */ ; */ ; DELETE FROM employees",
    "SELECT 1 --\n; DELETE FROM employees",
    "SELECT 'a\\'; DELETE FROM employees; --'",
    "VALUES (1); DELETE FROM employees",
    "WITH d AS (DELETE FROM employees RETURNING *) SELECT * FROM d",
    "WITH u AS (UPDATE employees SET name = 'x' RETURNING id) SELECT count(*) FROM u",
    "WITH i AS (INSERT INTO departments (name) VALUES ('x') RETURNING id) SELECT * FROM i",
    "SELECT * FROM employees FOR UPDATE",
    "SELECT * FROM employees FOR SHARE",
    "SELECT * INTO copy_of_employees FROM employees",
    "SELECT nextval('employees_id_seq')",
    "SELECT setval('employees_id_seq', 1)",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
    "SELECT pg_cancel_backend(1)",
    "SELECT pg_sleep(5)",
    "SELECT pg_advisory_lock(1)",
    "SELECT lo_import('/etc/passwd')",
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT * FROM dblink('dbname=staff', 'DELETE FROM employees') AS t(a text)",
    "COPY employees TO STDOUT",
    "COPY employees FROM STDIN",
    "COPY (SELECT 1) TO PROGRAM 'touch /tmp/cachefront-pwned'",
    "SET ROLE postgres",
    "SET statement_timeout = 0",
    "RESET ALL",
    "BEGIN",
    "COMMIT",
    "EXPLAIN ANALYZE DELETE FROM employees",
    "DO $$BEGIN DELETE FROM employees; END$$",
    "CALL some_procedure()",
    "LOCK TABLE employees",
    "PREPARE p AS DELETE FROM employees",
    "EXECUTE p",
    "LISTEN x",
    "NOTIFY x",
    "VACUUM employees",
    "GRANT ALL ON employees TO PUBLIC",
];

#[tokio::test]
async fn sql_cached_refuses_writes_and_smuggling() {
    let s = Stack::start().await;
    let before = employees(&s);
    let mut raw = s.raw().await;
    let mut wrong = Vec::new();
    for sql in WRITE_ATTEMPTS {
        let r = raw.call(&[b"SQL.CACHED", sql.as_bytes()]).await;
        if !r.starts_with("-ERR SQL.CACHED accepts a single read-only query") {
            wrong.push(format!("{sql:?} -> {r:?}"));
        }
    }
    assert!(
        !std::path::Path::new("/tmp/cachefront-pwned").exists(),
        "COPY TO PROGRAM ran"
    );
    assert_eq!(employee_count(&s), "5");
    assert_eq!(employees(&s), before);
    assert_eq!(raw.call(&[b"PING"]).await, "+PONG\r\n");
    assert!(
        wrong.is_empty(),
        "not refused as the SPEC says:\n{}",
        wrong.join("\n")
    );
}

/// Several statements that sqlparser cannot read go to PostgreSQL's parser for a better
/// message; PostgreSQL refuses them, but the reply should still be the SPEC's `-ERR`.
#[tokio::test]
async fn unparseable_multi_statement_gets_the_spec_error() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    let r = raw
        .call(&[b"SQL.CACHED", b"TABLE employees; DELETE FROM employees"])
        .await;
    assert_eq!(employee_count(&s), "5");
    assert!(
        r.starts_with("-ERR SQL.CACHED accepts a single read-only query"),
        "{r}"
    );
}

/// A query over 64 KiB (sql.max_sql_bytes) is refused before parsing: this one would take the
/// parser deep into nested parentheses.
#[tokio::test]
async fn very_long_sql_is_refused_before_parsing() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    let sql = format!("SELECT {}1{}", "(".repeat(40_000), ")".repeat(40_000));
    let t = Instant::now();
    assert_eq!(
        raw.call(&[b"SQL.CACHED", sql.as_bytes()]).await,
        "-ERR SQL.CACHED query is longer than sql.max_sql_bytes (65536 bytes)\r\n"
    );
    assert!(t.elapsed() < Duration::from_secs(1));
    let sql = format!("SELECT 1 AS x /*{}*/", "a".repeat(70 * 1024));
    assert_eq!(
        raw.call(&[b"SQL.CACHED", sql.as_bytes()]).await,
        "-ERR SQL.CACHED query is longer than sql.max_sql_bytes (65536 bytes)\r\n"
    );
    // Just under the limit, but too deep for the parser: an error reply, no crash.
    let sql = format!("SELECT {}1{}", "(".repeat(30_000), ")".repeat(30_000));
    let r = raw.call(&[b"SQL.CACHED", sql.as_bytes()]).await;
    assert!(r.starts_with('-'), "{}", &r[..r.len().min(200)]);
    assert_eq!(raw.call(&[b"PING"]).await, "+PONG\r\n");
}

/// Functions with side effects that are not on the parser's deny list, run by SQL.CACHED in a
/// READ ONLY transaction. None of them may leave a trace.
#[tokio::test]
async fn side_effect_functions_outside_the_deny_list() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    let slots_before = s.psql("SELECT count(*) FROM pg_replication_slots");
    let r = raw
        .call(&[
            b"SQL.CACHED",
            b"SELECT pg_create_physical_replication_slot('cachefront_hostile_slot')",
        ])
        .await;
    let slots_after = s.psql("SELECT count(*) FROM pg_replication_slots");
    if slots_after != slots_before {
        s.psql("SELECT pg_drop_replication_slot('cachefront_hostile_slot')");
    }
    assert_eq!(
        slots_after, slots_before,
        "a replication slot was created: {r}"
    );
    assert!(
        r.starts_with("-ERR SQL.CACHED accepts a single read-only query"),
        "{r}"
    );
    let r = raw.call(&[b"SQL.CACHED", b"SELECT pg_stat_reset()"]).await;
    assert!(
        r.starts_with("-ERR SQL.CACHED accepts a single read-only query"),
        "{r}"
    );
}

// -------------------------------------------------------------------------------------------
// The database layers alone
// -------------------------------------------------------------------------------------------

/// SQL.CACHED's limits with `max_rows` rows and the default result bytes.
fn limits(max_rows: usize) -> cachefront::db::ResultLimits {
    cachefront::db::ResultLimits {
        max_rows,
        max_bytes: 64 << 20,
    }
}

/// The JSON text of a query's result.
fn json_text(r: &cachefront::db::QueryResult) -> String {
    match &r.rows {
        cachefront::db::Rows::Json { text, .. } => String::from_utf8_lossy(text).into_owned(),
        cachefront::db::Rows::First(_) => panic!("SQL.CACHED results are JSON"),
    }
}

/// The writes SQL.CACHED's parser refuses, sent straight to `Db::query_read_only` as if the
/// parser had let them through: PostgreSQL refuses each one, in the READ ONLY transaction
/// (SQLSTATE 25006; 0A000 for a write inside a function) or because a prepared statement
/// holds one command (SQLSTATE 42601).
#[tokio::test]
async fn database_layers_refuse_writes_without_the_parser() {
    let s = Stack::start().await;
    let before = employees(&s);
    let mut cfg = common::config_for(&s.valkey, &s.db);
    cfg.postgres.pool_size = 2;
    let db = cachefront::db::Db::new(&cfg.postgres).expect("db");
    // Sanity: the same path runs a read.
    let ok = db
        .query_read_only("SELECT count(*) AS n FROM employees", &[], limits(100), 0)
        .await
        .expect("a read runs");
    assert_eq!(ok.rows.len(), 1);
    let writes = [
        "DELETE FROM employees",
        "UPDATE employees SET name = 'x'",
        "INSERT INTO employees (name, dept_id, job_title) VALUES ('x', 1, 'y')",
        "TRUNCATE employees",
        "DROP TABLE employees",
        "CREATE TABLE evil (a int)",
        "ALTER TABLE employees DROP COLUMN name",
        "SELECT 1; DELETE FROM employees",
        "SELECT $$;$$; DELETE FROM employees",
        "SELECT 1 /* ; */ ; DELETE FROM employees",
        "SELECT 1 --\n; DELETE FROM employees",
        "WITH d AS (DELETE FROM employees RETURNING *) SELECT * FROM d",
        "WITH u AS (UPDATE employees SET name = 'x' RETURNING id) SELECT count(*) FROM u",
        "SELECT * FROM employees FOR UPDATE",
        "SELECT * INTO copy_of_employees FROM employees",
        "SELECT nextval('employees_id_seq')",
        "SELECT setval('employees_id_seq', 1)",
        "SELECT query_to_xml('DELETE FROM employees RETURNING id', true, true, '')",
        "DO $$BEGIN DELETE FROM employees; END$$",
        "COPY employees FROM '/etc/hostname'",
        "EXPLAIN ANALYZE DELETE FROM employees",
    ];
    let mut wrong = Vec::new();
    for sql in writes {
        match db.query_read_only(sql, &[], limits(100), 0).await {
            Ok(r) => wrong.push(format!("{sql:?} ran ({} rows)", r.rows.len())),
            Err(e) => {
                let text = e.to_string();
                // 0A000: PostgreSQL refuses a write inside a function it runs read-only.
                let ok = matches!(e.code(), Some("25006") | Some("0A000"))
                    || text.contains("cannot insert multiple commands into a prepared statement");
                if !ok {
                    wrong.push(format!("{sql:?} failed otherwise: {text}"));
                }
            }
        }
    }
    assert_eq!(employee_count(&s), "5");
    assert_eq!(employees(&s), before);
    assert_eq!(
        s.psql("SELECT count(*) FROM pg_class WHERE relname IN ('evil', 'copy_of_employees')")
            .trim(),
        "0"
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// Past the parser, statements a READ ONLY transaction does allow. A session setting must not
/// outlive the query on the pooled connection (the transaction is rolled back), and no
/// server-side file may be written (the role layer: cachefront connects as the read-only role
/// docs/security.md describes, not as a superuser).
#[tokio::test]
async fn database_layers_alone_leave_no_trace() {
    let s = Stack::start().await;
    s.psql(
        "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'cachefront_ro') THEN CREATE ROLE cachefront_ro LOGIN; END IF; END $$; \
         GRANT SELECT ON ALL TABLES IN SCHEMA public TO cachefront_ro",
    );
    let mut cfg = common::config_for(&s.valkey, &s.db);
    cfg.postgres.url = format!(
        "postgres://cachefront_ro@127.0.0.1:{}/{}",
        s.db.port(),
        s.db.name()
    );
    cfg.postgres.pool_size = 1;
    let db = cachefront::db::Db::new(&cfg.postgres).expect("db");
    let show = |name: &'static str| {
        let db = db.clone();
        async move {
            let r = db
                .query_read_only(
                    &format!("SELECT current_setting('{name}') AS v"),
                    &[],
                    limits(10),
                    0,
                )
                .await
                .expect("read a setting");
            json_text(&r)
        }
    };
    let timeout_before = show("statement_timeout").await;
    let ro_before = show("default_transaction_read_only").await;
    let role_before = show("role").await;
    for sql in [
        "SET statement_timeout = 0",
        "SET default_transaction_read_only = off",
        "SET ROLE NONE",
        "SELECT set_config('statement_timeout', '0', false)",
    ] {
        let _ = db.query_read_only(sql, &[], limits(100), 0).await;
    }
    let mut traces = Vec::new();
    if show("statement_timeout").await != timeout_before {
        traces.push("statement_timeout changed on the pooled connection");
    }
    if show("default_transaction_read_only").await != ro_before {
        traces.push("default_transaction_read_only changed on the pooled connection");
    }
    if show("role").await != role_before {
        traces.push("role changed on the pooled connection");
    }
    let path = "/tmp/cachefront-hostile-copy";
    let _ = std::fs::remove_file(path);
    let _ = db
        .query_read_only(&format!("COPY (SELECT 1) TO '{path}'"), &[], limits(100), 0)
        .await;
    if std::path::Path::new(path).exists() {
        let _ = std::fs::remove_file(path);
        traces.push("COPY TO wrote a server-side file");
    }
    assert!(traces.is_empty(), "{traces:?}");
}
