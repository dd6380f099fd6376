//! Client compatibility matrix: real Redis/Valkey client libraries and tools, each through
//! its own API, against cachefront — plain commands, a pipeline of 100+ commands,
//! MULTI/EXEC, pub/sub, RESP3 where the client has it, and cachefront's own commands
//! (`EMP.GET`, `SQL.CACHED`) through the client's generic command call.
//!
//! | client            | where                          | RESP3                       |
//! |-------------------|--------------------------------|-----------------------------|
//! | redis-py          | tests/clients/py_client.py     | `protocol=3`                |
//! | valkey-py         | tests/clients/py_client.py     | `protocol=3`                |
//! | ioredis (Node.js) | tests/clients/node_client.js   | not supported by ioredis    |
//! | redis-rs          | this file                      | `?protocol=resp3`           |
//! | redis-cli         | this file                      | `-3`                        |
//!
//! Every client is required: one that is not installed fails its test with a message naming
//! scripts/deps.sh, which installs them all (Python packages through pip, ioredis through
//! `npm ci --prefix tests/clients`, redis-cli from Debian's redis-tools).

mod common;

use common::Stack;
use futures::StreamExt;
use redis::{AsyncCommands, PushKind, Value};
use std::collections::BTreeMap;
use std::fmt::{Debug, Display};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const EMP_1: &str = "Alice Johnson";
const SQL: &str = "SELECT id, name FROM employees ORDER BY id LIMIT 2";
const SQL_JSON: &str = r#"[{"id": 1, "name": "Alice Johnson"}, {"id": 2, "name": "Bob Smith"}]"#;
/// A client program gets this long to run all of its checks.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(60);

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

// --- external client programs ----------------------------------------------------------

/// Runs `program args…` (a client program given cachefront's port) and asserts it passed,
/// showing everything it printed either way.
async fn run_client_program(label: &str, program: &str, args: &[String]) {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let child = cmd.output();
    let out = match tokio::time::timeout(PROGRAM_TIMEOUT, child).await {
        Err(_) => panic!("{label}: `{program} {args:?}` did not finish within {PROGRAM_TIMEOUT:?}"),
        Ok(Err(e)) => panic!(
            "{label}: cannot run `{program}` ({e}); install the test clients with scripts/deps.sh"
        ),
        Ok(Ok(out)) => out,
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "{label} failed ({}); missing packages are installed by scripts/deps.sh\n\
         --- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status
    );
}

async fn run_py_client(library: &str) {
    let s = Stack::start().await;
    let script = clients_dir().join("py_client.py");
    run_client_program(
        &format!("{library}-py"),
        "python3",
        &[
            script.to_string_lossy().into_owned(),
            library.to_string(),
            s.proxy_port().to_string(),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_py() {
    run_py_client("redis").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn valkey_py() {
    run_py_client("valkey").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ioredis() {
    let dir = clients_dir();
    match std::process::Command::new("node").arg("--version").output() {
        Ok(o) if o.status.success() => {}
        other => panic!(
            "Node.js (`node`) is needed for the ioredis client check and was not found \
             ({other:?}); run scripts/deps.sh"
        ),
    }
    assert!(
        dir.join("node_modules/ioredis/package.json").exists(),
        "ioredis is not installed in {}: run scripts/deps.sh (it runs `npm ci --prefix tests/clients`)",
        dir.join("node_modules").display()
    );
    let s = Stack::start().await;
    run_client_program(
        "ioredis",
        "node",
        &[
            dir.join("node_client.js").to_string_lossy().into_owned(),
            s.proxy_port().to_string(),
        ],
    )
    .await;
}

// --- in-process checks: one line per check, all failures reported together -------------

struct Checks {
    label: &'static str,
    failures: Vec<String>,
}

impl Checks {
    fn new(label: &'static str) -> Checks {
        Checks {
            label,
            failures: Vec::new(),
        }
    }

    fn pass(&self, name: &str) {
        println!("ok   [{}] {name}", self.label);
    }

    fn fail(&mut self, name: &str, why: String) {
        let line = format!("FAIL [{}] {name}: {why}", self.label);
        println!("{line}");
        self.failures.push(line);
    }

    /// `got` must be Ok(expected).
    fn check<T: PartialEq + Debug, E: Display>(
        &mut self,
        name: &str,
        got: Result<T, E>,
        expected: T,
    ) {
        match got {
            Ok(v) if v == expected => self.pass(name),
            Ok(v) => self.fail(name, format!("expected {expected:?}, got {v:?}")),
            Err(e) => self.fail(name, format!("expected {expected:?}, got error {e}")),
        }
    }

    /// `got` must be an error whose message contains `needle`.
    fn check_err<T: Debug, E: Display>(&mut self, name: &str, got: Result<T, E>, needle: &str) {
        match got {
            Err(e) if e.to_string().contains(needle) => self.pass(name),
            Err(e) => self.fail(name, format!("expected an error with {needle:?}, got {e}")),
            Ok(v) => self.fail(
                name,
                format!("expected an error with {needle:?}, got {v:?}"),
            ),
        }
    }

    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{}: {} check(s) failed:\n{}",
            self.label,
            self.failures.len(),
            self.failures.join("\n")
        );
        println!("[{}] all checks passed", self.label);
    }
}

// --- redis-rs ---------------------------------------------------------------------------

async fn redis_rs_checks(port: u16, resp3: bool, c: &mut Checks) {
    let tag = if resp3 { "RESP3" } else { "RESP2" };
    let url = if resp3 {
        format!("redis://127.0.0.1:{port}/?protocol=resp3")
    } else {
        format!("redis://127.0.0.1:{port}/")
    };
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut con = match client.get_multiplexed_async_connection().await {
        Ok(con) => con,
        Err(e) => return c.fail(&format!("{tag} connect"), e.to_string()),
    };
    c.pass(&format!("{tag} connect"));
    let mut publisher = client.get_multiplexed_async_connection().await.unwrap();
    let k = format!("cf:redisrs:{tag}");
    let name = |what: &str| format!("{tag} {what}");

    // Plain commands.
    c.check(&name("SET"), con.set(format!("{k}:s"), "v1").await, ());
    c.check(
        &name("GET"),
        con.get(format!("{k}:s")).await,
        Some("v1".to_string()),
    );
    c.check(
        &name("GET missing"),
        con.get(format!("{k}:nope")).await,
        None::<String>,
    );
    c.check(
        &name("HSET a"),
        con.hset(format!("{k}:h"), "a", "1").await,
        1,
    );
    c.check(
        &name("HSET b"),
        con.hset(format!("{k}:h"), "b", "2").await,
        1,
    );
    c.check(
        &name("HGETALL"),
        con.hgetall(format!("{k}:h")).await,
        BTreeMap::from([
            ("a".to_string(), "1".to_string()),
            ("b".to_string(), "2".to_string()),
        ]),
    );
    // The reply's shape on the wire: a RESP3 map, or a flat RESP2 array.
    let raw: redis::RedisResult<Value> = redis::cmd("HGETALL")
        .arg(format!("{k}:h"))
        .query_async(&mut con)
        .await;
    match raw {
        Ok(Value::Map(m)) if resp3 && m.len() == 2 => c.pass(&name("HGETALL is a map")),
        Ok(Value::Array(a)) if !resp3 && a.len() == 4 => c.pass(&name("HGETALL is an array")),
        other => c.fail(&name("HGETALL reply type"), format!("got {other:?}")),
    }
    c.check(
        &name("INCR"),
        redis::cmd("INCR")
            .arg(format!("{k}:n"))
            .query_async(&mut con)
            .await,
        1i64,
    );
    c.check(
        &name("INCR again"),
        con.incr(format!("{k}:n"), 1).await,
        2i64,
    );
    c.check(
        &name("DEL"),
        con.del(&[format!("{k}:s"), format!("{k}:h"), format!("{k}:n")])
            .await,
        3i64,
    );

    // cachefront's own commands through the generic command API.
    c.check(
        &name("EMP.GET 1"),
        redis::cmd("EMP.GET").arg(1).query_async(&mut con).await,
        Some(EMP_1.to_string()),
    );
    c.check(
        &name("EMP.GET 999"),
        redis::cmd("EMP.GET").arg(999).query_async(&mut con).await,
        None::<String>,
    );
    c.check(
        &name("EMP.GET 999 is nil"),
        redis::cmd("EMP.GET").arg(999).query_async(&mut con).await,
        Value::Nil,
    );
    c.check_err(
        &name("EMP.GET abc"),
        redis::cmd("EMP.GET")
            .arg("abc")
            .query_async::<Option<String>>(&mut con)
            .await,
        "invalid employee id",
    );
    c.check(
        &name("SQL.CACHED"),
        redis::cmd("SQL.CACHED")
            .arg(SQL)
            .query_async(&mut con)
            .await,
        SQL_JSON.to_string(),
    );

    // A pipeline of 204 commands, cachefront's mixed in.
    let mut pipe = redis::pipe();
    for i in 0..100 {
        pipe.set(format!("{k}:p:{i}"), i);
    }
    pipe.cmd("EMP.GET").arg(1);
    for i in 0..100 {
        pipe.get(format!("{k}:p:{i}"));
    }
    pipe.cmd("SQL.CACHED").arg(SQL);
    pipe.cmd("EMP.GET").arg(999);
    pipe.incr(format!("{k}:p:99"), 1);
    let mut expected: Vec<Option<String>> = vec![Some("OK".into()); 100];
    expected.push(Some(EMP_1.into()));
    expected.extend((0..100).map(|i| Some(i.to_string())));
    expected.extend([Some(SQL_JSON.into()), None, Some("100".into())]);
    c.check(
        &name("pipeline of 204 commands"),
        pipe.query_async::<Vec<Option<String>>>(&mut con).await,
        expected,
    );

    // MULTI/EXEC.
    let tx: redis::RedisResult<(String, i64, String, i64, i64)> = redis::pipe()
        .atomic()
        .set(format!("{k}:tx"), "a")
        .append(format!("{k}:tx"), "bc")
        .get(format!("{k}:tx"))
        .cmd("INCR")
        .arg(format!("{k}:txn"))
        .incr(format!("{k}:txn"), 41)
        .query_async(&mut con)
        .await;
    c.check(
        &name("MULTI/EXEC"),
        tx,
        ("OK".to_string(), 3, "abc".to_string(), 1, 42),
    );
    // The spec: cachefront's own commands inside MULTI are refused with a clear error.
    c.check_err(
        &name("EMP.GET inside MULTI refused"),
        redis::pipe()
            .atomic()
            .set(format!("{k}:tx2"), "x")
            .cmd("EMP.GET")
            .arg(1)
            .query_async::<Value>(&mut con)
            .await,
        "not allowed inside MULTI",
    );

    // Pub/sub: RESP2 through a dedicated PubSub connection, RESP3 through pushes on a
    // multiplexed connection.
    let chan = format!("{k}:chan");
    let got = if resp3 {
        resp3_pubsub(&client, &mut publisher, &chan).await
    } else {
        resp2_pubsub(&client, &mut publisher, &chan).await
    };
    c.check(
        &name("pub/sub"),
        got,
        (1, chan.clone(), "hello".to_string()),
    );

    // The connection is still in order after all of the above.
    c.check(
        &name("EMP.GET 1 at the end"),
        redis::cmd("EMP.GET").arg(1).query_async(&mut con).await,
        EMP_1.to_string(),
    );
}

/// (receivers, channel, payload) of a message published while subscribed (RESP2).
async fn resp2_pubsub(
    client: &redis::Client,
    publisher: &mut redis::aio::MultiplexedConnection,
    chan: &str,
) -> Result<(i64, String, String), String> {
    let mut sub = client.get_async_pubsub().await.map_err(|e| e.to_string())?;
    sub.subscribe(chan).await.map_err(|e| e.to_string())?;
    let receivers: i64 = publisher
        .publish(chan, "hello")
        .await
        .map_err(|e| e.to_string())?;
    let msg = tokio::time::timeout(Duration::from_secs(5), sub.on_message().next())
        .await
        .map_err(|_| "no message within 5 s".to_string())?
        .ok_or("subscription stream ended")?;
    let payload: String = msg.get_payload().map_err(|e| e.to_string())?;
    Ok((receivers, msg.get_channel_name().to_string(), payload))
}

/// The same in RESP3: SUBSCRIBE on a multiplexed connection, the message arrives as a push.
async fn resp3_pubsub(
    client: &redis::Client,
    publisher: &mut redis::aio::MultiplexedConnection,
    chan: &str,
) -> Result<(i64, String, String), String> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let config = redis::AsyncConnectionConfig::new().set_push_sender(tx);
    let mut sub = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| e.to_string())?;
    sub.subscribe(chan).await.map_err(|e| e.to_string())?;
    let receivers: i64 = publisher
        .publish(chan, "hello")
        .await
        .map_err(|e| e.to_string())?;
    // RESP3 allows ordinary commands on the subscribed connection.
    let ping: String = redis::cmd("PING")
        .query_async(&mut sub)
        .await
        .map_err(|e| format!("PING while subscribed: {e}"))?;
    if ping != "PONG" {
        return Err(format!("PING while subscribed replied {ping:?}"));
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let push = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .map_err(|_| "no message push within 5 s".to_string())?
            .ok_or("push channel closed")?;
        if push.kind != PushKind::Message {
            continue; // the subscribe confirmation
        }
        let msg = redis::Msg::from_push_info(push.clone())
            .ok_or_else(|| format!("not a message push: {push:?}"))?;
        let payload: String = msg.get_payload().map_err(|e| e.to_string())?;
        return Ok((receivers, msg.get_channel_name().to_string(), payload));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_rs() {
    let s = Stack::start().await;
    let mut c = Checks::new("redis-rs");
    redis_rs_checks(s.proxy_port(), false, &mut c).await;
    redis_rs_checks(s.proxy_port(), true, &mut c).await;
    c.finish();
}

// --- redis-cli --------------------------------------------------------------------------

/// Runs redis-cli against `port` with `args`, feeding `stdin`; returns its stdout, or why not.
fn redis_cli(port: u16, args: &[&str], stdin: &[u8]) -> Result<String, String> {
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run redis-cli ({e}); scripts/deps.sh installs it (Debian redis-tools)")
        });
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!(
            "redis-cli {args:?} exited with {}: {stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A command encoded as RESP, for `redis-cli --pipe`.
fn resp(args: &[String]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n{a}\r\n", a.len()).as_bytes());
    }
    out
}

fn redis_cli_checks(port: u16, c: &mut Checks) {
    let k = "cf:rediscli";
    let cli = |args: &[&str]| redis_cli(port, args, b"");
    // Formatted output (what a person sees in a terminal) shows reply types.
    let fmt = |args: &[&str]| {
        let mut all = vec!["--no-raw"];
        all.extend_from_slice(args);
        redis_cli(port, &all, b"")
    };
    let s = format!("{k}:s");
    let h = format!("{k}:h");
    let n = format!("{k}:n");

    // Plain commands.
    c.check("SET", fmt(&["SET", &s, "v1"]), "OK\n".into());
    c.check("GET", fmt(&["GET", &s]), "\"v1\"\n".into());
    c.check(
        "HSET",
        fmt(&["HSET", &h, "a", "1", "b", "2"]),
        "(integer) 2\n".into(),
    );
    c.check(
        "HGETALL",
        fmt(&["HGETALL", &h]),
        "1) \"a\"\n2) \"1\"\n3) \"b\"\n4) \"2\"\n".into(),
    );
    c.check("INCR", fmt(&["INCR", &n]), "(integer) 1\n".into());
    c.check("DEL", fmt(&["DEL", &s, &h, &n]), "(integer) 3\n".into());
    c.check("GET after DEL", fmt(&["GET", &s]), "(nil)\n".into());

    // cachefront's own commands.
    c.check(
        "EMP.GET 1",
        fmt(&["EMP.GET", "1"]),
        format!("\"{EMP_1}\"\n"),
    );
    c.check(
        "EMP.GET 1 --raw",
        cli(&["EMP.GET", "1"]),
        format!("{EMP_1}\n"),
    );
    c.check("EMP.GET 999", fmt(&["EMP.GET", "999"]), "(nil)\n".into());
    c.check(
        "EMP.GET abc",
        fmt(&["EMP.GET", "abc"]),
        "(error) ERR invalid employee id 'abc'\n".into(),
    );
    c.check(
        "SQL.CACHED",
        cli(&["SQL.CACHED", SQL]),
        format!("{SQL_JSON}\n"),
    );

    // redis-cli's pipelining: --pipe sends raw RESP and counts the replies.
    let mut input = Vec::new();
    for i in 0..100 {
        input.extend(resp(&["SET".into(), format!("{k}:p:{i}"), i.to_string()]));
    }
    input.extend(resp(&["EMP.GET".into(), "1".into()]));
    for i in 0..100 {
        input.extend(resp(&["GET".into(), format!("{k}:p:{i}")]));
    }
    input.extend(resp(&["SQL.CACHED".into(), SQL.into()]));
    input.extend(resp(&["EMP.GET".into(), "999".into()]));
    input.extend(resp(&["INCR".into(), format!("{k}:p:99")]));
    let piped = redis_cli(port, &["--pipe"], &input);
    c.check(
        "--pipe of 204 commands",
        piped.map(|o| o.lines().last().unwrap_or_default().to_string()),
        "errors: 0, replies: 204".into(),
    );
    c.check(
        "--pipe wrote in order",
        fmt(&["GET", &format!("{k}:p:99")]),
        "\"100\"\n".into(),
    );

    // MULTI/EXEC: several commands on one connection from stdin.
    let tx = format!(
        "MULTI\nSET {k}:tx a\nAPPEND {k}:tx bc\nGET {k}:tx\nINCR {k}:txn\nINCRBY {k}:txn 41\nEXEC\n"
    );
    c.check(
        "MULTI/EXEC",
        redis_cli(port, &["--no-raw"], tx.as_bytes()),
        "OK\nQUEUED\nQUEUED\nQUEUED\nQUEUED\nQUEUED\n\
         1) OK\n2) (integer) 3\n3) \"abc\"\n4) (integer) 1\n5) (integer) 42\n"
            .into(),
    );
    c.check(
        "EMP.GET inside MULTI refused",
        redis_cli(
            port,
            &["--no-raw"],
            format!("MULTI\nSET {k}:tx2 x\nEMP.GET 1\nEXEC\n").as_bytes(),
        )
        .map(|o| {
            o.contains("(error) ERR EMP.GET is not allowed inside MULTI") && o.contains("EXECABORT")
        }),
        true,
    );

    // Pub/sub: `redis-cli SUBSCRIBE` in the background, PUBLISH from another redis-cli.
    c.check(
        "pub/sub",
        redis_cli_pubsub(port, &format!("{k}:chan")),
        true,
    );

    // RESP3 (-3: HELLO 3 at connect).
    let fmt3 = |args: &[&str]| {
        let mut all = vec!["-3", "--no-raw"];
        all.extend_from_slice(args);
        redis_cli(port, &all, b"")
    };
    c.check(
        "RESP3 HSET",
        fmt3(&["HSET", &h, "a", "1", "b", "2"]),
        "(integer) 2\n".into(),
    );
    c.check(
        "RESP3 HGETALL is a map",
        fmt3(&["HGETALL", &h]),
        "1# \"a\" => \"1\"\n2# \"b\" => \"2\"\n".into(),
    );
    c.check(
        "RESP3 EMP.GET 1",
        fmt3(&["EMP.GET", "1"]),
        format!("\"{EMP_1}\"\n"),
    );
    c.check(
        "RESP3 EMP.GET 999",
        fmt3(&["EMP.GET", "999"]),
        "(nil)\n".into(),
    );
    c.check(
        "RESP3 EMP.GET abc",
        fmt3(&["EMP.GET", "abc"]),
        "(error) ERR invalid employee id 'abc'\n".into(),
    );
    c.check(
        "RESP3 SQL.CACHED",
        redis_cli(port, &["-3", "SQL.CACHED", SQL], b""),
        format!("{SQL_JSON}\n"),
    );
}

/// True if a background `redis-cli SUBSCRIBE` receives what another redis-cli publishes.
fn redis_cli_pubsub(port: u16, chan: &str) -> Result<bool, String> {
    let mut sub = Command::new("redis-cli")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "SUBSCRIBE",
            chan,
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run redis-cli ({e}); run scripts/deps.sh"))?;
    let (tx, rx) = mpsc::channel();
    let stdout = sub.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut lines = Vec::new();
    let wait_for = |want: &[&str], lines: &mut Vec<String>| -> Result<(), String> {
        let start = lines.len();
        while !lines[start..].ends_with(&want.iter().map(|s| s.to_string()).collect::<Vec<_>>()) {
            match rx.recv_timeout(Duration::from_secs(5)) {
                Ok(l) => lines.push(l),
                Err(_) => return Err(format!("waited 5 s for {want:?}; have {lines:?}")),
            }
        }
        Ok(())
    };
    let result = (|| {
        // Raw (non-terminal) output: one line per element of each push.
        wait_for(&["subscribe", chan, "1"], &mut lines)?;
        let published = redis_cli(port, &["PUBLISH", chan, "hello"], b"")?;
        if published != "1\n" {
            return Err(format!(
                "PUBLISH replied {published:?}, expected 1 receiver"
            ));
        }
        wait_for(&["message", chan, "hello"], &mut lines)?;
        Ok(true)
    })();
    let _ = sub.kill();
    let _ = sub.wait();
    result
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cli_tool() {
    let s = Stack::start().await;
    let port = s.proxy_port();
    let run = tokio::task::spawn_blocking(move || {
        let mut c = Checks::new("redis-cli");
        redis_cli_checks(port, &mut c);
        c.finish();
    });
    if let Err(e) = run.await {
        std::panic::resume_unwind(e.into_panic());
    }
}
