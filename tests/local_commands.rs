//! Commands cachefront answers itself (PING, ECHO, HELLO, AUTH, QUIT, RESET, CLIENT …) and the
//! introspection it merges with Valkey's (COMMAND, INFO). A client must not be able to tell
//! them from Valkey's: most tests run one sequence through cachefront and straight to a Valkey
//! and compare the replies byte for byte.

mod common;

use common::{call_line as call, same_as, same_as_valkey};

use common::services::Valkey;
use common::{Raw, Stack};
use std::process::Command;

/// The integer of a `:n` reply.
fn int(reply: &str) -> i64 {
    reply
        .strip_prefix(':')
        .and_then(|r| r.strip_suffix("\r\n"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not an integer reply: {reply:?}"))
}

/// The element count in an aggregate reply's header (`*n` / `%n`).
fn count(reply: &str) -> usize {
    let end = reply.find("\r\n").expect("header");
    reply[1..end].parse().expect("count")
}

#[tokio::test]
async fn ping_and_echo_match_valkey() {
    let s = Stack::start().await;
    let r = same_as_valkey(
        &s,
        &[
            "PING",
            "PING hi",
            "PING \"\"",
            "PING a b",
            "ping",
            "ECHO x",
            "Echo \"two words\"",
            "ECHO \"\"",
            "ECHO",
            "ECHO a b",
            "HELLO 3",
            "PING",
            "PING hi",
            "ECHO x",
        ],
    )
    .await;
    assert_eq!(r[0], "+PONG\r\n");
    assert_eq!(r[1], "$2\r\nhi\r\n");
    assert_eq!(r[6], "$9\r\ntwo words\r\n");
    assert_eq!(
        r[8],
        "-ERR wrong number of arguments for 'echo' command\r\n"
    );
}

#[tokio::test]
async fn hello_switches_protocol_like_valkey() {
    let s = Stack::start().await;
    let r = same_as_valkey(
        &s,
        &[
            "GET nothing",
            "HELLO 3",
            "GET nothing",
            "HELLO 4",
            "GET nothing",
            "HELLO 1",
            "HELLO abc",
            "HELLO 3 FOO",
            "HELLO 3 SETNAME",
            "HELLO 3 SETNAME \"a b\"",
            "HELLO 2",
            "GET nothing",
            "HELLO 3 SETNAME x",
            "CLIENT GETNAME",
            "HELLO",
            "HELLO 2 SETNAME y",
            "CLIENT GETNAME",
            "GET nothing",
        ],
    )
    .await;
    assert_eq!(r[2], "_\r\n");
    assert_eq!(r[3], "-NOPROTO unsupported protocol version\r\n");
    assert_eq!(r[4], "_\r\n", "a refused HELLO leaves the protocol alone");
    assert_eq!(r[11], "$-1\r\n");
    assert_eq!(r[13], "$1\r\nx\r\n");
    assert!(r[14].starts_with("%7\r\n"), "{}", r[14]);
    assert_eq!(r[16], "$1\r\ny\r\n");
}

#[tokio::test]
async fn hello_reply_describes_the_server_like_valkey() {
    let s = Stack::start().await;
    let mut ours = s.raw().await;
    let mut theirs = Raw::connect(s.valkey.port()).await;
    let id = int(&ours.call(&[b"CLIENT", b"ID"]).await);
    for proto in [&b"2"[..], b"3"] {
        let a = ours.call(&[b"HELLO", proto]).await;
        let b = theirs.call(&[b"HELLO", proto]).await;
        // Same fields in the same order, same values except the connection id and the modules.
        let cut = |r: &str| r[..r.find("$2\r\nid\r\n").expect("id field")].to_string();
        assert_eq!(cut(&a), cut(&b), "HELLO {proto:?}");
        assert!(
            a.contains(&format!("$2\r\nid\r\n:{id}\r\n$4\r\nmode\r\n$10\r\nstandalone\r\n$4\r\nrole\r\n$6\r\nmaster\r\n$7\r\nmodules\r\n")),
            "{a}"
        );
    }
}

#[tokio::test]
async fn quit_replies_ok_then_closes() {
    let s = Stack::start().await;
    for port in [s.proxy_port(), s.valkey.port()] {
        let mut r = Raw::connect(port).await;
        assert_eq!(r.call(&[b"QUIT"]).await, "+OK\r\n");
        assert!(r.closed().await, "closed after QUIT (port {port})");
        // Pipelined: replies before QUIT are sent, nothing after it is run.
        let mut r = Raw::connect(port).await;
        r.send(b"*1\r\n$4\r\nPING\r\n*1\r\n$4\r\nQUIT\r\n*3\r\n$3\r\nSET\r\n$5\r\nafter\r\n$1\r\n1\r\n")
            .await;
        assert_eq!(r.drain(300).await, "+PONG\r\n+OK\r\n");
        assert!(r.closed().await);
        let mut check = Raw::connect(s.valkey.port()).await;
        assert_eq!(check.call(&[b"EXISTS", b"after"]).await, ":0\r\n");
    }
    // Inside a transaction and in subscribed mode too.
    let mut r = s.raw().await;
    r.call(&[b"MULTI"]).await;
    r.call(&[b"SET", b"inmulti", b"1"]).await;
    assert_eq!(r.call(&[b"QUIT"]).await, "+OK\r\n");
    assert!(r.closed().await);
    let mut r = s.raw().await;
    r.call(&[b"SUBSCRIBE", b"ch"]).await;
    assert_eq!(r.call(&[b"QUIT"]).await, "+OK\r\n");
    assert!(r.closed().await);
    let mut check = Raw::connect(s.valkey.port()).await;
    assert_eq!(check.call(&[b"EXISTS", b"inmulti"]).await, ":0\r\n");
}

/// RESET from each mode, with another client writing/publishing where it matters.
async fn reset_transcript(port: u16) -> Vec<String> {
    let mut a = Raw::connect(port).await;
    let mut other = Raw::connect(port).await;
    let mut out = Vec::new();
    for line in [
        // Protocol and name.
        "HELLO 3",
        "CLIENT SETNAME n",
        "RESET",
        "GET nothing",
        "CLIENT GETNAME",
        // Transaction.
        "MULTI",
        "SET x 1",
        "RESET",
        "EXEC",
        "GET x",
        // Watch.
        "WATCH w",
        "RESET",
    ] {
        out.push(call(&mut a, line).await);
    }
    out.push(call(&mut other, "SET w changed").await);
    for line in ["MULTI", "SET w mine", "EXEC", "GET w"] {
        out.push(call(&mut a, line).await);
    }
    // Selected database.
    for line in ["SELECT 1", "SET dbk 1", "RESET", "GET dbk"] {
        out.push(call(&mut a, line).await);
    }
    // Subscribed mode, RESP2 then RESP3.
    for hello in ["HELLO 2", "HELLO 3"] {
        call(&mut a, hello).await;
        out.push(call(&mut a, "SUBSCRIBE ch").await);
        out.push(call(&mut a, "RESET").await);
        out.push(call(&mut a, "GET nothing").await);
        out.push(call(&mut other, "PUBLISH ch unheard").await);
    }
    // Tracking.
    for line in ["HELLO 3", "CLIENT TRACKING on", "GET tk", "RESET", "GET tk"] {
        out.push(call(&mut a, line).await);
    }
    out.push(call(&mut other, "SET tk 1").await);
    out.push(call(&mut a, "PING").await);
    out.push(a.drain(50).await);
    out
}

#[tokio::test]
async fn reset_leaves_every_mode_like_valkey() {
    let s = Stack::start().await;
    let ours = reset_transcript(s.proxy_port()).await;
    let mut v = Raw::connect(s.valkey.port()).await;
    v.call(&[b"FLUSHALL"]).await;
    let theirs = reset_transcript(s.valkey.port()).await;
    // Index 0 and 29 are HELLO 3 replies (they hold the connection id).
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        if i == 0 || i == 29 {
            assert!(a.starts_with('%') && b.starts_with('%'));
        } else {
            assert_eq!(a, b, "step {i}");
        }
    }
    assert_eq!(ours.len(), theirs.len());
    assert_eq!(ours[2], "+RESET\r\n");
    assert_eq!(ours[3], "$-1\r\n", "RESET goes back to RESP2");
    assert_eq!(ours[8], "-ERR EXEC without MULTI\r\n");
    assert_eq!(ours[15], "*1\r\n+OK\r\n", "RESET dropped the watch");
}

#[tokio::test]
async fn client_ids_are_distinct_and_increasing() {
    let s = Stack::start().await;
    let mut conns = Vec::new();
    let mut last = 0;
    for _ in 0..5 {
        let mut r = s.raw().await;
        let id = int(&r.call(&[b"CLIENT", b"ID"]).await);
        assert!(id > last, "{id} after {last}");
        assert_eq!(int(&r.call(&[b"client", b"id"]).await), id, "stable");
        last = id;
        conns.push(r);
    }
    // HELLO reports the same id, and RESET keeps it (as in Valkey).
    let r = &mut conns[0];
    let id = int(&r.call(&[b"CLIENT", b"ID"]).await);
    let hello = r.call(&[b"HELLO", b"3"]).await;
    assert!(hello.contains(&format!("$2\r\nid\r\n:{id}\r\n")), "{hello}");
    assert_eq!(r.call(&[b"RESET"]).await, "+RESET\r\n");
    assert_eq!(int(&r.call(&[b"CLIENT", b"ID"]).await), id);
}

#[tokio::test]
async fn client_names_and_lib_info_match_valkey() {
    let s = Stack::start().await;
    let r = same_as_valkey(
        &s,
        &[
            "CLIENT GETNAME",
            "CLIENT SETNAME foo",
            "CLIENT GETNAME",
            "CLIENT SETNAME \"a b\"",
            "CLIENT GETNAME",
            "CLIENT SETNAME \"\"",
            "CLIENT GETNAME",
            "client setname Bar",
            "CLIENT GETNAME",
            "CLIENT SETINFO lib-name x",
            "CLIENT SETINFO LIB-VER 1.0",
            "CLIENT SETINFO lib-name \"a b\"",
            "CLIENT SETINFO bogus x",
            "HELLO 3",
            "CLIENT GETNAME",
            "CLIENT SETNAME \"\"",
            "CLIENT GETNAME",
        ],
    )
    .await;
    assert_eq!(r[2], "$3\r\nfoo\r\n");
    assert_eq!(
        r[3],
        "-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    );
    assert_eq!(r[6], "$-1\r\n");
    assert_eq!(r[9], "+OK\r\n");
    assert_eq!(r[16], "_\r\n");
    // CLIENT INFO describes the cachefront client.
    let mut c = s.raw().await;
    call(&mut c, "CLIENT SETNAME me").await;
    call(&mut c, "CLIENT SETINFO lib-name mylib").await;
    call(&mut c, "CLIENT SETINFO lib-ver 2.1").await;
    let id = int(&c.call(&[b"CLIENT", b"ID"]).await);
    let info = call(&mut c, "CLIENT INFO").await;
    for field in [
        format!("id={id} "),
        " name=me ".into(),
        " lib-name=mylib ".into(),
        " lib-ver=2.1".into(),
    ] {
        assert!(info.contains(&field), "{field:?} in {info}");
    }
}

#[tokio::test]
async fn client_subcommand_arity_errors_match_valkey() {
    let s = Stack::start().await;
    same_as_valkey(
        &s,
        &[
            "CLIENT SETNAME",
            "CLIENT SETNAME a b",
            "CLIENT SETINFO lib-name",
            "CLIENT GETNAME extra",
            "CLIENT ID extra",
            "CLIENT",
        ],
    )
    .await;
}

#[tokio::test]
async fn auth_without_a_password_configured_matches_valkey() {
    let s = Stack::start().await;
    let r = same_as_valkey(&s, &["AUTH foo", "AUTH", "GET k", "HELLO 3 AUTH", "PING"]).await;
    assert_eq!(
        r[0],
        "-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n"
    );
}

#[tokio::test]
async fn auth_with_username_without_a_password_configured_matches_valkey() {
    // The default user has no password: Valkey accepts any password given with a username.
    let s = Stack::start().await;
    same_as_valkey(
        &s,
        &[
            "AUTH default anything",
            "HELLO 3 AUTH default anything",
            "AUTH nosuchuser x",
            "AUTH a b c",
        ],
    )
    .await;
}

const AUTH_SEQUENCE: &[&str] = &[
    "GET k",
    "PING",
    "EMP.GET 1",
    "CLIENT ID",
    "HELLO 3",
    "AUTH wrong",
    "AUTH default wrong",
    "AUTH nouser secret",
    "HELLO 3 AUTH default wrong",
    "GET k",
    "AUTH secret",
    "SET k v",
    "GET k",
    "RESET",
    "GET k",
    "AUTH default secret",
    "GET k",
    "RESET",
    "HELLO 3 AUTH default secret",
    "GET nothing",
    "RESET",
    "HELLO 3 auth default secret SETNAME after-auth",
    "CLIENT GETNAME",
];

#[tokio::test]
async fn requirepass_gates_every_command_like_valkey() {
    let s = Stack::start_with(|c| c.auth.requirepass = "secret".into()).await;
    // A Valkey with the same password to compare with (the test's Valkey stays open for
    // cachefront's own upstream connections).
    let reference = Valkey::start();
    let mut admin = Raw::connect(reference.port()).await;
    assert_eq!(
        admin
            .call(&[b"CONFIG", b"SET", b"requirepass", b"secret"])
            .await,
        "+OK\r\n"
    );
    let r = same_as(&s, reference.port(), AUTH_SEQUENCE).await;
    assert_eq!(r[0], "-NOAUTH Authentication required.\r\n");
    assert_eq!(r[2], "-NOAUTH Authentication required.\r\n");
    assert_eq!(
        r[5],
        "-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    );
    assert_eq!(r[10], "+OK\r\n");
    assert_eq!(r[12], "$1\r\nv\r\n");
    assert_eq!(
        r[14], "-NOAUTH Authentication required.\r\n",
        "RESET logs out"
    );
    assert_eq!(r[19], "_\r\n");
    assert_eq!(r[22], "$10\r\nafter-auth\r\n");
    // QUIT is allowed before AUTH.
    let mut q = s.raw().await;
    assert_eq!(q.call(&[b"QUIT"]).await, "+OK\r\n");
    assert!(q.closed().await);
    // redis-rs with the password in the URL.
    let url = format!("redis://:secret@127.0.0.1:{}", s.proxy_port());
    let mut c = common::connect(&url).await;
    let name: String = redis::cmd("EMP.GET")
        .arg(2)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(name, "Bob Smith");
}

/// cachefront's own commands plus the default configuration's named query (`EMP.GET`).
fn own_count() -> i64 {
    cachefront::command::table::OWN.len() as i64 + 1
}

#[tokio::test]
async fn command_count_adds_cachefronts_own_commands() {
    let s = Stack::start().await;
    let mut ours = s.raw().await;
    let mut theirs = Raw::connect(s.valkey.port()).await;
    let n = int(&theirs.call(&[b"COMMAND", b"COUNT"]).await);
    assert!(n > 100, "{n}");
    assert_eq!(
        int(&ours.call(&[b"COMMAND", b"COUNT"]).await),
        n + own_count()
    );

    // COMMAND: Valkey's table, then ours.
    let all_v = theirs.call(&[b"COMMAND"]).await;
    let all = ours.call(&[b"COMMAND"]).await;
    assert_eq!(count(&all_v), n as usize);
    assert_eq!(count(&all), n as usize + own_count() as usize);
    let body_v = &all_v[all_v.find("\r\n").unwrap() + 2..];
    let body = &all[all.find("\r\n").unwrap() + 2..];
    assert!(
        body.starts_with(body_v),
        "Valkey's entries first, unchanged"
    );
    let extra = &body[body_v.len()..];
    for name in [
        "emp.get",
        "sql.cached",
        "sql.invalidate",
        "cachefront.slowlog",
        "cachefront.explain",
        "cachefront.queries",
        "cachefront.after",
    ] {
        assert!(
            extra.contains(&format!("*10\r\n${}\r\n{name}\r\n", name.len())),
            "{name} in {extra}"
        );
    }

    // COMMAND LIST (which also names subcommands) too.
    let list_v = theirs.call(&[b"COMMAND", b"LIST"]).await;
    let list = ours.call(&[b"COMMAND", b"LIST"]).await;
    assert_eq!(count(&list), count(&list_v) + own_count() as usize);
    assert!(list.contains("$7\r\nemp.get\r\n"));
}

#[tokio::test]
async fn command_info_and_docs_describe_emp_get() {
    let s = Stack::start().await;
    let mut ours = s.raw().await;
    let mut theirs = Raw::connect(s.valkey.port()).await;
    let info = ours.call(&[b"COMMAND", b"INFO", b"emp.get"]).await;
    assert!(
        info.starts_with("*1\r\n*10\r\n$7\r\nemp.get\r\n:2\r\n"),
        "{info}"
    );
    assert_eq!(
        ours.call(&[b"COMMAND", b"INFO", b"EMP.GET"]).await,
        info,
        "names are case-insensitive"
    );
    // Mixed with Valkey's own and unknown names, in the order asked.
    let get_v = theirs.call(&[b"COMMAND", b"INFO", b"get"]).await;
    let nosuch_v = theirs.call(&[b"COMMAND", b"INFO", b"nosuch"]).await;
    let mixed = ours
        .call(&[b"COMMAND", b"INFO", b"get", b"emp.get", b"nosuch"])
        .await;
    let expect = format!("*3\r\n{}{}{}", &get_v[4..], &info[4..], &nosuch_v[4..]);
    assert_eq!(mixed, expect);

    let docs = ours.call(&[b"COMMAND", b"DOCS", b"emp.get"]).await;
    assert!(docs.starts_with("*2\r\n$7\r\nemp.get\r\n*"), "{docs}");
    assert!(docs.contains("$7\r\nsummary\r\n$"), "{docs}");
    // Docs of Valkey's commands are Valkey's, untouched.
    assert_eq!(
        ours.call(&[b"COMMAND", b"DOCS", b"get"]).await,
        theirs.call(&[b"COMMAND", b"DOCS", b"get"]).await
    );
    // RESP3: a map.
    ours.call(&[b"HELLO", b"3"]).await;
    let docs3 = ours.call(&[b"COMMAND", b"DOCS", b"emp.get"]).await;
    assert!(
        docs3.starts_with("%1\r\n$7\r\nemp.get\r\n%") && docs3.contains("$7\r\nsummary\r\n"),
        "{docs3}"
    );
    let info3 = ours.call(&[b"COMMAND", b"INFO", b"emp.get"]).await;
    assert!(
        info3.starts_with("*1\r\n*10\r\n$7\r\nemp.get\r\n:2\r\n"),
        "{info3}"
    );
    // Other subcommands pass through.
    theirs.call(&[b"HELLO", b"3"]).await;
    for args in [
        &[&b"COMMAND"[..], b"GETKEYS", b"SET", b"a", b"b"][..],
        &[b"COMMAND", b"NOSUCH"],
        &[b"COMMAND", b"COUNT", b"extra"],
    ] {
        assert_eq!(ours.call(args).await, theirs.call(args).await, "{args:?}");
    }
}

#[tokio::test]
async fn info_merges_valkeys_sections_with_cachefronts() {
    let s = Stack::start().await;
    let mut ours = s.raw().await;
    let mut theirs = Raw::connect(s.valkey.port()).await;
    let all = ours.call(&[b"INFO"]).await;
    assert!(all.starts_with('$'), "{all}");
    for section in [
        "# Server\r\n",
        "# Clients\r\n",
        "# Keyspace\r\n",
        "# Cachefront\r\n",
    ] {
        assert!(all.contains(section), "{section} in {all}");
    }
    assert!(
        all.contains("redis_version:") && all.contains("hits:"),
        "{all}"
    );
    let ours_only = ours.call(&[b"INFO", b"cachefront"]).await;
    assert!(ours_only.contains("# Cachefront\r\n"), "{ours_only}");
    assert!(!ours_only.contains("# Server"), "{ours_only}");
    for section in [&b"keyspace"[..], b"server", b"CLIENTS"] {
        let r = ours.call(&[b"INFO", section]).await;
        assert!(!r.contains("# Cachefront"), "{r}");
        assert!(r.starts_with('$') && r.contains("\r\n# "), "{r}");
    }
    ours.call(&[b"SET", b"a", b"b"]).await;
    let ks = ours.call(&[b"INFO", b"keyspace"]).await;
    assert!(ks.contains("# Keyspace\r\ndb0:keys="), "{ks}");
    for arg in [&b"all"[..], b"everything", b"default"] {
        let r = ours.call(&[b"INFO", arg]).await;
        assert!(r.contains("# Server") && r.contains("# Cachefront"), "{r}");
    }
    let both = ours.call(&[b"INFO", b"server", b"cachefront"]).await;
    assert!(
        both.contains("# Server") && both.contains("# Cachefront") && !both.contains("# Clients"),
        "{both}"
    );
    // RESP3: the same kind of reply Valkey gives.
    ours.call(&[b"HELLO", b"3"]).await;
    theirs.call(&[b"HELLO", b"3"]).await;
    for args in [
        &[&b"INFO"[..]][..],
        &[b"INFO", b"cachefront"],
        &[b"INFO", b"server"],
    ] {
        let a = ours.call(args).await;
        let b = theirs.call(&[b"INFO", b"server"]).await;
        assert_eq!(a.as_bytes()[0], b.as_bytes()[0], "{args:?}: {a}");
    }
}

#[tokio::test]
async fn unknown_commands_and_bad_arity_get_valkeys_errors() {
    let s = Stack::start().await;
    let r = same_as_valkey(
        &s,
        &[
            "FOOBAR a b",
            "foobar",
            "NOSUCH \"with space\" x",
            "GET",
            "SET k",
            "CONFIG",
            "CONFIG NOSUCH",
            "OBJECT",
            "PING",
        ],
    )
    .await;
    assert_eq!(
        r[0],
        "-ERR unknown command 'FOOBAR', with args beginning with: 'a' 'b' \r\n"
    );
}

#[tokio::test]
async fn inline_commands_match_valkey() {
    let s = Stack::start().await;
    async fn run(port: u16) -> Vec<String> {
        let mut r = Raw::connect(port).await;
        let mut out = Vec::new();
        for line in [
            &b"PING\r\n"[..],
            b"SET k \"a b\"\r\n",
            b"GET k\r\n",
            b"ECHO 'x y'\r\n",
            b"set q \"tab\\there\"\r\n",
            b"GET q\r\n",
            b"PING\n",
            b"EXISTS k q nothing\r\n",
            b"\r\n",
            b"PING hello\r\n",
        ] {
            r.send(line).await;
            if line != b"\r\n" {
                out.push(r.frame().await);
            }
        }
        // Several inline commands in one write.
        r.send(b"PING\r\nECHO one\r\nGET k\r\n").await;
        for _ in 0..3 {
            out.push(r.frame().await);
        }
        out.push(r.drain(30).await);
        out
    }
    let ours = run(s.proxy_port()).await;
    let theirs = run(s.valkey.port()).await;
    assert_eq!(ours, theirs);
    assert_eq!(ours[0], "+PONG\r\n");
    assert_eq!(ours[2], "$3\r\na b\r\n");
    assert_eq!(ours[5], "$8\r\ntab\there\r\n");
    // And cachefront's own commands inline.
    let mut r = s.raw().await;
    r.send(b"EMP.GET 1\r\n").await;
    assert_eq!(r.frame().await, "$13\r\nAlice Johnson\r\n");
}

/// Runs redis-cli against `port`; `None` if it is not installed.
fn redis_cli(port: u16, args: &[&str]) -> Option<String> {
    let bin = ["/usr/bin/redis-cli", "/usr/local/bin/redis-cli"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let out = Command::new(bin)
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .expect("run redis-cli");
    assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test]
async fn redis_cli_talks_to_cachefront() {
    let s = Stack::start().await;
    let port = s.proxy_port();
    let vport = s.valkey.port();
    tokio::task::spawn_blocking(move || {
        let Some(pong) = redis_cli(port, &["PING"]) else {
            eprintln!("redis-cli not installed (scripts/deps.sh installs it); skipping");
            return;
        };
        assert_eq!(pong, "PONG\n");
        assert_eq!(
            redis_cli(port, &["EMP.GET", "1"]).unwrap(),
            "Alice Johnson\n"
        );
        assert_eq!(
            redis_cli(port, &["--no-raw", "EMP.GET", "999"]).unwrap(),
            "(nil)\n"
        );
        assert_eq!(redis_cli(port, &["SET", "a", "b"]).unwrap(), "OK\n");
        assert_eq!(redis_cli(port, &["GET", "a"]).unwrap(), "b\n");
        assert_eq!(redis_cli(vport, &["GET", "a"]).unwrap(), "b\n");
        // RESP3 and a multi-command session on stdin-less eval of several args.
        assert_eq!(
            redis_cli(port, &["-3", "--no-raw", "HGETALL", "nohash"]).unwrap(),
            redis_cli(vport, &["-3", "--no-raw", "HGETALL", "nohash"]).unwrap()
        );
        assert_eq!(
            redis_cli(port, &["--no-raw", "COMMAND", "COUNT"]).unwrap(),
            format!(
                "(integer) {}\n",
                redis_cli(vport, &["COMMAND", "COUNT"])
                    .unwrap()
                    .trim()
                    .parse::<i64>()
                    .unwrap()
                    + own_count()
            )
        );
    })
    .await
    .unwrap();
}
