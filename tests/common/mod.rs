//! Shared test support: real servers (services.rs) plus cachefront running in-process on
//! port 0, and a raw RESP client for byte-exact assertions.
#![allow(dead_code)]

pub mod cluster;
pub mod faultproxy;
pub mod fresh;
pub mod services;
pub mod tls;

use bytes::BytesMut;
use cachefront::config::Config;
use cachefront::protocol::FrameScanner;
use cachefront::server::Running;
use services::{postgres, TestDb, Valkey};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A throwaway Valkey, a fresh copy of the staff database and a cachefront in front of both.
pub struct Stack {
    pub valkey: Valkey,
    pub db: TestDb,
    pub proxy: Running,
}

/// The config a test's cachefront runs with: its own Valkey and database, port 0.
pub fn config_for(valkey: &Valkey, db: &TestDb) -> Config {
    let mut c = Config {
        listen: "127.0.0.1:0".into(),
        ..Default::default()
    };
    c.valkey.url = valkey.url();
    c.postgres.url = db.url();
    c.postgres.pool_size = 4;
    // Two client threads whatever the machine, so clients on different threads — their own
    // shared connections, L1 copies and pools — are what every test runs against.
    c.threads = 2;
    c
}

impl Stack {
    pub async fn start() -> Stack {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> Stack {
        let valkey = Valkey::start();
        let db = tokio::task::spawn_blocking(|| postgres().fresh_db())
            .await
            .expect("fresh db");
        let mut cfg = config_for(&valkey, &db);
        tweak(&mut cfg);
        cfg.validate().expect("test config is valid");
        let proxy = cachefront::server::spawn(cfg)
            .await
            .expect("cachefront starts");
        Stack { valkey, db, proxy }
    }

    /// Another cachefront on this stack's Valkey and database — one more instance of a fleet
    /// sharing them — with the stack's defaults changed by `tweak`.
    pub async fn another(&self, tweak: impl FnOnce(&mut Config)) -> Running {
        let mut cfg = config_for(&self.valkey, &self.db);
        tweak(&mut cfg);
        cfg.validate().expect("test config is valid");
        cachefront::server::spawn(cfg)
            .await
            .expect("another cachefront starts")
    }

    pub fn proxy_port(&self) -> u16 {
        self.proxy.addr.port()
    }

    pub fn proxy_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.proxy_port())
    }

    /// A redis-rs connection to cachefront.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        connect(&self.proxy_url()).await
    }

    /// A redis-rs connection straight to the test's Valkey.
    pub async fn valkey_client(&self) -> redis::aio::MultiplexedConnection {
        connect(&self.valkey.url()).await
    }

    pub async fn raw(&self) -> Raw {
        Raw::connect(self.proxy_port()).await
    }

    /// Runs SQL in the test's database (psql), returning its unaligned output.
    pub fn psql(&self, sql: &str) -> String {
        postgres().psql(self.db.name(), sql)
    }

    /// The OID of a relation, as cachefront's meta keys name it (`cachefront:v:<oid>`).
    pub fn oid(&self, relation: &str) -> String {
        self.psql(&format!("SELECT '{relation}'::regclass::oid"))
            .trim()
            .to_string()
    }

    /// A tokio-postgres client on the test's database.
    pub async fn pg(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.db.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to postgres");
        tokio::spawn(conn);
        client
    }
}

/// A redis-rs connection to `url` (cachefront or a Valkey).
pub async fn connect(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .expect("redis URL")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

/// A raw RESP connection: send exact bytes, read exact frames.
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
    /// How long a reply may take before the test fails (a hang guard, not a speed check).
    patience: Duration,
}

impl Raw {
    pub async fn connect(port: u16) -> Raw {
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        Raw {
            stream,
            buf: BytesMut::new(),
            patience: Duration::from_secs(5),
        }
    }

    /// Waits up to `patience` for each reply instead of 5 s: for requests whose work grows
    /// with a loaded machine (a large result in a debug build).
    pub fn patient(mut self, patience: Duration) -> Raw {
        self.patience = patience;
        self
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    /// Sends a command as multibulk.
    pub async fn cmd(&mut self, args: &[&[u8]]) {
        let raw = cachefront::protocol::Request::from_args(args.iter().copied()).raw;
        self.send(&raw).await;
    }

    /// Reads one complete frame (within the patience, 5 s unless set), as text for easy
    /// asserts.
    pub async fn frame(&mut self) -> String {
        String::from_utf8_lossy(&self.frame_bytes().await).into_owned()
    }

    pub async fn frame_bytes(&mut self) -> Vec<u8> {
        let mut scanner = FrameScanner::default();
        loop {
            if let Some(n) = scanner.scan(&self.buf).expect("well-formed reply") {
                return self.buf.split_to(n).to_vec();
            }
            let n = tokio::time::timeout(self.patience, self.stream.read_buf(&mut self.buf))
                .await
                .unwrap_or_else(|_| panic!("no reply within {:?}", self.patience))
                .expect("read");
            assert!(
                n > 0,
                "connection closed while waiting for a reply; have {:?}",
                self.buf
            );
        }
    }

    /// Sends a command and returns its reply.
    pub async fn call(&mut self, args: &[&[u8]]) -> String {
        self.cmd(args).await;
        self.frame().await
    }

    /// True if the server closes the connection (after any buffered bytes) within 5 s.
    pub async fn closed(&mut self) -> bool {
        let mut sink = [0u8; 1024];
        loop {
            match tokio::time::timeout(Duration::from_secs(5), self.stream.read(&mut sink)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
                Err(_) => return false,
            }
        }
    }

    /// Reads whatever arrives within `ms` milliseconds.
    pub async fn drain(&mut self, ms: u64) -> String {
        let mut out = std::mem::take(&mut self.buf).to_vec();
        let mut sink = [0u8; 4096];
        while let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(ms), self.stream.read(&mut sink)).await
        {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&sink[..n]);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

/// The guide's join query, byte for byte as its Python code holds it.
pub const GUIDE_QUERY: &str = "   \nSELECT   \n    employees.name AS employee_name,   \n    departments.name AS department_name,  \n    employees.job_title \nFROM  \n    employees  \nINNER JOIN  \n    departments   \nON \n    employees.dept_id = departments.id;   \n";

/// hashlib.sha256(GUIDE_QUERY.encode()).hexdigest()
pub const GUIDE_QUERY_KEY: &str =
    "c6260e61202726451f2251e2051e50764a29e212db01aa5c7119b413d54e2b40";

/// The guide's join result as json.dumps writes it.
pub const GUIDE_JOIN_JSON: &str = r#"[{"employee_name": "Alice Johnson", "department_name": "Finance", "job_title": "Accountant"}, {"employee_name": "Bob Smith", "department_name": "Human Resources", "job_title": "HR Manager"}, {"employee_name": "Charlie Brown", "department_name": "IT", "job_title": "Software Engineer"}, {"employee_name": "Diana Evans", "department_name": "Sales", "job_title": "Sales Representative"}, {"employee_name": "Ethan Williams", "department_name": "Marketing", "job_title": "Marketing Specialist"}]"#;

/// Splits a command line into words at spaces; `"…"` groups a word (`""` is an empty word).
pub fn words(line: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut started = false;
    for ch in line.chars() {
        match ch {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            ' ' if !quoted => {
                if started {
                    out.push(std::mem::take(&mut cur).into_bytes());
                }
                started = false;
            }
            c => {
                cur.push(c);
                started = true;
            }
        }
    }
    if started {
        out.push(cur.into_bytes());
    }
    out
}

/// A command line (see [`words`]) encoded as a multibulk request.
pub fn encode_line(line: &str) -> Vec<u8> {
    let w = words(line);
    cachefront::protocol::Request::from_args(w.iter().map(Vec::as_slice))
        .raw
        .to_vec()
}

/// Sends one command line and returns its reply.
pub async fn call_line(r: &mut Raw, line: &str) -> String {
    r.send(&encode_line(line)).await;
    r.frame().await
}

/// Sends `cmds` one at a time on a fresh connection to `port`, returning each reply.
pub async fn replies(port: u16, cmds: &[&str]) -> Vec<String> {
    let mut r = Raw::connect(port).await;
    let mut out = Vec::new();
    for c in cmds {
        out.push(call_line(&mut r, c).await);
    }
    out
}

/// Sends `bytes` to a fresh connection and expects `-ERR Protocol error: <msg>` then a close.
pub async fn protocol_error(s: &Stack, bytes: &[u8], msg: &str) {
    let mut raw = s.raw().await;
    raw.send(bytes).await;
    assert_eq!(
        raw.frame().await,
        format!("-ERR Protocol error: {msg}\r\n"),
        "{:?}",
        String::from_utf8_lossy(bytes)
    );
    assert!(
        raw.closed().await,
        "connection must close after a protocol error"
    );
}

/// Asserts that cachefront's replies (`ours`) to `cmds` are Valkey's (`theirs`) byte for
/// byte; a successful `HELLO` reply, which holds the connection id, only by its type.
pub fn assert_same_replies(cmds: &[&str], ours: &[String], theirs: &[String]) {
    for (i, cmd) in cmds.iter().enumerate() {
        if cmd.to_ascii_uppercase().starts_with("HELLO") && !theirs[i].starts_with('-') {
            assert_eq!(ours[i].as_bytes()[0], theirs[i].as_bytes()[0], "{cmd}");
            continue;
        }
        assert_eq!(ours[i], theirs[i], "reply to `{cmd}` (command #{i})");
    }
}

/// Runs `cmds` on a fresh connection to cachefront and to `valkey_port`, asserting identical
/// replies ([`assert_same_replies`]); returns cachefront's.
pub async fn same_as(s: &Stack, valkey_port: u16, cmds: &[&str]) -> Vec<String> {
    let ours = replies(s.proxy_port(), cmds).await;
    let theirs = replies(valkey_port, cmds).await;
    assert_same_replies(cmds, &ours, &theirs);
    ours
}

/// Polls `check` every 10 ms until it is true; panics naming `what` after `patience`.
/// Returns how long it took.
pub async fn eventually_within(
    patience: Duration,
    what: &str,
    mut check: impl AsyncFnMut() -> bool,
) -> Duration {
    let started = std::time::Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < patience,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    started.elapsed()
}

/// [`eventually_within`] 10 s.
pub async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) -> Duration {
    eventually_within(Duration::from_secs(10), what, check).await
}

/// Runs `cmds` on cachefront and straight on the stack's own Valkey, asserting identical
/// replies ([`same_as`]); returns cachefront's.
pub async fn same_as_valkey(s: &Stack, cmds: &[&str]) -> Vec<String> {
    same_as(s, s.valkey.port(), cmds).await
}

/// Empties the test's Valkey (straight, not through cachefront).
pub async fn flushall(s: &Stack) {
    let mut v = Raw::connect(s.valkey.port()).await;
    assert_eq!(v.call(&[b"FLUSHALL"]).await, "+OK\r\n");
}

/// [`same_as_valkey`], each side starting from an empty Valkey (for commands that write).
pub async fn same_as_valkey_from_empty(s: &Stack, cmds: &[&str]) -> Vec<String> {
    flushall(s).await;
    let ours = replies(s.proxy_port(), cmds).await;
    flushall(s).await;
    let theirs = replies(s.valkey.port(), cmds).await;
    assert_same_replies(cmds, &ours, &theirs);
    ours
}

/// `EMP.GET id` on a redis-rs connection.
pub async fn emp_get(c: &mut redis::aio::MultiplexedConnection, id: i64) -> Option<String> {
    redis::cmd("EMP.GET")
        .arg(id)
        .query_async(c)
        .await
        .expect("EMP.GET")
}

/// `SQL.CACHED query` on a redis-rs connection.
pub async fn sql_cached(c: &mut redis::aio::MultiplexedConnection, query: &str) -> String {
    redis::cmd("SQL.CACHED")
        .arg(query)
        .query_async(c)
        .await
        .expect("SQL.CACHED")
}

/// `INFO cachefront` on a redis-rs connection, as a client sees it.
pub async fn info_cachefront(c: &mut redis::aio::MultiplexedConnection) -> String {
    redis::cmd("INFO")
        .arg("cachefront")
        .query_async(c)
        .await
        .expect("INFO")
}

/// The value of `field` in INFO's text (`field:value` lines).
pub fn info_field<'a>(info: &'a str, field: &str) -> &'a str {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in {info}"))
}

/// A `/proc/<pid>/status` field (`VmRSS`, `VmHWM`) in bytes.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("status field");
    kb * 1024
}

/// This test process's resident set (cachefront runs in it), in bytes.
pub fn rss_bytes() -> u64 {
    proc_status_bytes(std::process::id(), "VmRSS")
}

/// The cachefront binary of this build, as a command to give arguments to.
pub fn cachefront_cmd() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_cachefront"))
}

/// Runs `cmd` to its end, asserting that it succeeded (its stderr is the failure message).
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd.output().expect("run cachefront");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `GET path` over HTTP/1.1 from 127.0.0.1:`port`; the whole response, head included (the
/// metrics listener answers one request per connection and closes it).
pub async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}
