//! Pass-through to Valkey: every command cachefront does not serve itself must behave exactly
//! as against Valkey — same reply bytes, same connection state, no reply ever reaching the
//! wrong client. Most tests run one command sequence through cachefront and straight to the
//! test's Valkey and compare the replies byte for byte.

mod common;

use common::{flushall, same_as_valkey_from_empty, Raw, Stack};
use redis::AsyncCommands;
use std::time::{Duration, Instant};

/// Waits until Valkey reports `n` blocked clients.
async fn wait_blocked(s: &Stack, n: usize) {
    let mut v = Raw::connect(s.valkey.port()).await;
    let want = format!("blocked_clients:{n}\r\n");
    common::eventually_within(Duration::from_secs(5), &want, async || {
        v.call(&[b"INFO", b"clients"]).await.contains(&want)
    })
    .await;
}

const DATA_TYPES: &[&str] = &[
    "SET k v",
    "GET k",
    "GET missing",
    "DEL k missing",
    "GET k",
    "INCR n",
    "INCR n",
    "INCRBYFLOAT f 1.5",
    "HSET h a 1 b 2",
    "HGET h a",
    "HGET h zz",
    "HGETALL h",
    "HGETALL nohash",
    "RPUSH l a b c",
    "LRANGE l 0 -1",
    "LRANGE nolist 0 -1",
    "LPOP nolist",
    "ZADD z 1.5 m 2 n",
    "ZSCORE z m",
    "ZSCORE z nomember",
    "ZRANGE z 0 -1 WITHSCORES",
    "SADD s x",
    "SMEMBERS s",
    "SISMEMBER s x",
    "CONFIG GET maxmemory",
    "TYPE l",
    "EXISTS k h l",
    "GET l",
    "SET k v EX 100",
    "TTL k",
    "OBJECT ENCODING n",
    "GETEX nokey",
    "SET",
    "NOSUCHCMD a b",
];

#[tokio::test]
async fn data_commands_match_valkey_in_resp2() {
    let s = Stack::start().await;
    let r = same_as_valkey_from_empty(&s, DATA_TYPES).await;
    // A few spot checks that the comparison compared something meaningful.
    assert_eq!(r[1], "$1\r\nv\r\n");
    assert_eq!(r[11], "*4\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$1\r\n2\r\n");
    assert_eq!(r[14], "*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n");
    assert!(r[27].starts_with("-WRONGTYPE"), "{}", r[27]);
}

#[tokio::test]
async fn data_commands_match_valkey_in_resp3() {
    let s = Stack::start().await;
    let mut cmds = vec!["HELLO 3"];
    cmds.extend_from_slice(DATA_TYPES);
    let r = same_as_valkey_from_empty(&s, &cmds).await;
    assert!(r[0].starts_with("%"), "{}", r[0]);
    // Maps, doubles, sets and RESP3 nulls reach the client as Valkey sent them.
    assert_eq!(r[3], "_\r\n");
    assert_eq!(r[12], "%2\r\n$1\r\na\r\n$1\r\n1\r\n$1\r\nb\r\n$1\r\n2\r\n");
    assert_eq!(r[19], ",1.5\r\n");
    assert_eq!(r[23], "~1\r\n$1\r\nx\r\n");
    assert_eq!(r[25], "%1\r\n$9\r\nmaxmemory\r\n$1\r\n0\r\n");
}

#[tokio::test]
async fn resp2_and_resp3_clients_side_by_side() {
    let s = Stack::start().await;
    let mut v = s.valkey_client().await;
    let _: redis::Value = v.hset_multiple("h", &[("a", "1")]).await.unwrap();
    let mut r2 = s.raw().await;
    let mut r3 = s.raw().await;
    assert!(r3.call(&[b"HELLO", b"3"]).await.starts_with("%7\r\n"));
    for _ in 0..20 {
        // Written without waiting so both protocols are in flight at once.
        r2.cmd(&[b"HGETALL", b"h"]).await;
        r3.cmd(&[b"HGETALL", b"h"]).await;
        assert_eq!(r2.frame().await, "*2\r\n$1\r\na\r\n$1\r\n1\r\n");
        assert_eq!(r3.frame().await, "%1\r\n$1\r\na\r\n$1\r\n1\r\n");
    }
}

#[tokio::test]
async fn one_megabyte_values_pass_both_ways() {
    let s = Stack::start().await;
    let mut c = s.client().await;
    let mut v = s.valkey_client().await;
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let _: () = c.set("big", big.as_slice()).await.unwrap();
    let stored: Vec<u8> = v.get("big").await.unwrap();
    assert!(stored == big, "Valkey holds what the client wrote");
    let back: Vec<u8> = c.get("big").await.unwrap();
    assert!(back == big, "the client reads back what it wrote");
    // Written straight to Valkey, read through cachefront, byte-exact on the wire.
    let big2: Vec<u8> = big.iter().rev().copied().collect();
    let _: () = v.set("big2", big2.as_slice()).await.unwrap();
    let mut raw = s.raw().await;
    let mut expect = format!("${}\r\n", big2.len()).into_bytes();
    expect.extend_from_slice(&big2);
    expect.extend_from_slice(b"\r\n");
    raw.cmd(&[b"GET", b"big2"]).await;
    assert!(raw.frame_bytes().await == expect);
    // And the connection is still in step afterwards.
    assert_eq!(raw.call(&[b"STRLEN", b"big"]).await, ":1048576\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_pipelined_mixed_commands_come_back_in_order() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    let mut buf = Vec::new();
    let mut expect = Vec::new();
    let mut counter = 0;
    for i in 0..1000 {
        let k = format!("p{i}");
        let val = format!("value-{i}");
        let (cmd, reply): (Vec<Vec<u8>>, String) = match i % 7 {
            0 => (
                vec![b"SET".to_vec(), k.clone().into_bytes(), val.clone().into()],
                "+OK\r\n".into(),
            ),
            1 => {
                let prev = format!("value-{}", i - 1);
                (
                    vec![b"GET".to_vec(), format!("p{}", i - 1).into_bytes()],
                    format!("${}\r\n{prev}\r\n", prev.len()),
                )
            }
            2 => (vec![b"PING".to_vec()], "+PONG\r\n".into()),
            3 => (
                vec![b"ECHO".to_vec(), val.clone().into()],
                format!("${}\r\n{val}\r\n", val.len()),
            ),
            4 => (
                vec![b"EMP.GET".to_vec(), b"1".to_vec()],
                "$13\r\nAlice Johnson\r\n".into(),
            ),
            5 => {
                counter += 1;
                (
                    vec![b"INCR".to_vec(), b"counter".to_vec()],
                    format!(":{counter}\r\n"),
                )
            }
            _ => (
                vec![b"GET".to_vec(), format!("nothing{i}").into_bytes()],
                "$-1\r\n".into(),
            ),
        };
        buf.extend_from_slice(&cachefront::protocol::Request::from_args(&cmd).raw);
        expect.push(reply);
    }
    raw.send(&buf).await;
    for (i, want) in expect.iter().enumerate() {
        assert_eq!(&raw.frame().await, want, "reply #{i}");
    }
    assert_eq!(raw.drain(50).await, "", "nothing more");
}

#[tokio::test]
async fn multi_exec_and_discard_match_valkey() {
    let s = Stack::start().await;
    let r = same_as_valkey_from_empty(
        &s,
        &[
            "MULTI",
            "SET a 1",
            "INCR a",
            "GET a",
            "PING",
            "ECHO hi",
            "EXEC",
            "GET a",
            "MULTI",
            "SET b 1",
            "DISCARD",
            "GET b",
            "EXEC",
            "DISCARD",
            "MULTI",
            "MULTI",
            "INCR a b c",
            "SET b 2",
            "EXEC",
            "GET b",
            "MULTI",
            "INCR b",
            "LPUSH b x",
            "EXEC",
            "WATCH a",
            "MULTI",
            "WATCH a",
            "EXEC",
        ],
    )
    .await;
    assert_eq!(
        &r[..7],
        [
            "+OK\r\n",
            "+QUEUED\r\n",
            "+QUEUED\r\n",
            "+QUEUED\r\n",
            "+QUEUED\r\n",
            "+QUEUED\r\n",
            "*5\r\n+OK\r\n:2\r\n$1\r\n2\r\n+PONG\r\n$2\r\nhi\r\n"
        ]
    );
    assert_eq!(r[10], "+OK\r\n");
    assert_eq!(r[11], "$-1\r\n");
    assert_eq!(
        r[18],
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
}

#[tokio::test]
async fn transactions_in_resp3_match_valkey() {
    let s = Stack::start().await;
    let r = same_as_valkey_from_empty(
        &s,
        &[
            "HELLO 3",
            "HSET h f 1",
            "MULTI",
            "HGETALL h",
            "ZADD z 2.5 m",
            "ZSCORE z m",
            "GET nothing",
            "EXEC",
        ],
    )
    .await;
    assert_eq!(
        r[7],
        "*4\r\n%1\r\n$1\r\nf\r\n$1\r\n1\r\n:1\r\n,2.5\r\n_\r\n"
    );
}

/// WATCH, then a conflicting write from another client: EXEC returns nil.
async fn watch_conflict(watcher_port: u16, writer_port: u16, resp3: bool) -> Vec<String> {
    let mut a = Raw::connect(watcher_port).await;
    let mut b = Raw::connect(writer_port).await;
    let mut out = Vec::new();
    if resp3 {
        a.call(&[b"HELLO", b"3"]).await;
    }
    out.push(a.call(&[b"SET", b"w", b"1"]).await);
    out.push(a.call(&[b"WATCH", b"w"]).await);
    out.push(a.call(&[b"GET", b"w"]).await);
    out.push(b.call(&[b"SET", b"w", b"2"]).await);
    out.push(a.call(&[b"MULTI"]).await);
    out.push(a.call(&[b"SET", b"w", b"3"]).await);
    out.push(a.call(&[b"EXEC"]).await);
    out.push(a.call(&[b"GET", b"w"]).await);
    // Without a conflict the transaction runs.
    out.push(a.call(&[b"WATCH", b"w"]).await);
    out.push(a.call(&[b"MULTI"]).await);
    out.push(a.call(&[b"SET", b"w", b"4"]).await);
    out.push(a.call(&[b"EXEC"]).await);
    out.push(b.call(&[b"GET", b"w"]).await);
    // UNWATCH drops the watch: a later conflict no longer aborts.
    out.push(a.call(&[b"WATCH", b"w"]).await);
    out.push(a.call(&[b"UNWATCH"]).await);
    out.push(b.call(&[b"SET", b"w", b"5"]).await);
    out.push(a.call(&[b"MULTI"]).await);
    out.push(a.call(&[b"INCR", b"w"]).await);
    out.push(a.call(&[b"EXEC"]).await);
    out
}

#[tokio::test]
async fn watch_then_conflicting_write_aborts_exec() {
    let s = Stack::start().await;
    let (p, v) = (s.proxy_port(), s.valkey.port());
    for resp3 in [false, true] {
        flushall(&s).await;
        let ours = watch_conflict(p, p, resp3).await;
        flushall(&s).await;
        let theirs = watch_conflict(v, v, resp3).await;
        assert_eq!(ours, theirs, "resp3={resp3}");
        let nil = if resp3 { "_\r\n" } else { "*-1\r\n" };
        assert_eq!(ours[6], nil, "EXEC after a conflicting write");
        assert_eq!(ours[7], "$1\r\n2\r\n");
        assert_eq!(ours[11], "*1\r\n+OK\r\n");
        assert_eq!(ours[18], "*1\r\n:6\r\n");
    }
    // The conflicting write may also come straight to Valkey.
    flushall(&s).await;
    let mixed = watch_conflict(p, v, false).await;
    assert_eq!(mixed[6], "*-1\r\n");
}

#[tokio::test]
async fn cachefront_commands_inside_multi_abort_the_transaction() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    let refused: [&[&[u8]]; 3] = [
        &[b"EMP.GET", b"1"],
        &[b"SQL.CACHED", b"SELECT 1"],
        &[b"SQL.INVALIDATE", b"employees"],
    ];
    for cmd in refused {
        assert_eq!(raw.call(&[b"MULTI"]).await, "+OK\r\n");
        assert_eq!(raw.call(&[b"SET", b"x", b"1"]).await, "+QUEUED\r\n");
        let err = raw.call(cmd).await;
        let name = String::from_utf8_lossy(cmd[0]).into_owned();
        assert!(
            err.starts_with("-ERR ") && err.contains(&name) && err.contains("MULTI"),
            "a clear error naming {name}: {err}"
        );
        assert_eq!(raw.call(&[b"SET", b"y", b"1"]).await, "+QUEUED\r\n");
        assert_eq!(
            raw.call(&[b"EXEC"]).await,
            "-EXECABORT Transaction discarded because of previous errors.\r\n"
        );
        // Nothing queued ran, and the connection is out of the transaction.
        assert_eq!(raw.call(&[b"EXISTS", b"x", b"y"]).await, ":0\r\n");
        assert_eq!(raw.call(&[b"EXEC"]).await, "-ERR EXEC without MULTI\r\n");
    }
    // Outside a transaction they work again.
    assert_eq!(
        raw.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    // DISCARD after a refused command discards normally.
    raw.call(&[b"MULTI"]).await;
    raw.call(&[b"EMP.GET", b"2"]).await;
    assert_eq!(raw.call(&[b"DISCARD"]).await, "+OK\r\n");
    raw.call(&[b"MULTI"]).await;
    raw.call(&[b"SET", b"z", b"1"]).await;
    assert_eq!(raw.call(&[b"EXEC"]).await, "*1\r\n+OK\r\n");
}

#[tokio::test]
async fn client_identity_commands_inside_multi_are_refused() {
    // CLIENT SETNAME/ID describe cachefront's client, not the Valkey connection a transaction
    // runs on, so they cannot be queued: refused clearly, and EXEC aborts as in Valkey.
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    assert_eq!(raw.call(&[b"MULTI"]).await, "+OK\r\n");
    let r = raw.call(&[b"CLIENT", b"SETNAME", b"txname"]).await;
    assert!(
        r.starts_with("-ERR CLIENT SETNAME is not allowed inside MULTI"),
        "{r}"
    );
    assert_eq!(raw.call(&[b"SET", b"k", b"v"]).await, "+QUEUED\r\n");
    assert_eq!(
        raw.call(&[b"EXEC"]).await,
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(raw.call(&[b"CLIENT", b"GETNAME"]).await, "$-1\r\n");
    assert_eq!(raw.call(&[b"GET", b"k"]).await, "$-1\r\n");
    // Outside a transaction they work as usual.
    assert_eq!(
        raw.call(&[b"CLIENT", b"SETNAME", b"txname"]).await,
        "+OK\r\n"
    );
    assert_eq!(raw.call(&[b"CLIENT", b"GETNAME"]).await, "$6\r\ntxname\r\n");
}

#[tokio::test]
async fn pipelined_transaction_with_surrounding_commands() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    let mut buf = Vec::new();
    for c in [
        "SET before 1",
        "MULTI",
        "INCR before",
        "EMP.GET 3",
        "EXEC",
        "MULTI",
        "INCR before",
        "PING",
        "EXEC",
        "EMP.GET 3",
        "GET before",
    ] {
        buf.extend_from_slice(&common::encode_line(c));
    }
    raw.send(&buf).await;
    let mut got = Vec::new();
    for _ in 0..11 {
        got.push(raw.frame().await);
    }
    assert_eq!(got[0], "+OK\r\n");
    assert_eq!(got[1], "+OK\r\n");
    assert_eq!(got[2], "+QUEUED\r\n");
    assert!(got[3].starts_with("-ERR EMP.GET"), "{}", got[3]);
    assert_eq!(
        got[4],
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(&got[5..8], ["+OK\r\n", "+QUEUED\r\n", "+QUEUED\r\n"]);
    assert_eq!(got[8], "*2\r\n:2\r\n+PONG\r\n");
    assert_eq!(got[9], "$13\r\nCharlie Brown\r\n");
    assert_eq!(got[10], "$1\r\n2\r\n");
}

/// Valkey runs one connection's commands in order. A write pipelined ahead of a command that
/// needs a connection of the client's own (MULTI, BLPOP, WATCH…) must run before it.
#[tokio::test]
async fn pipelined_write_then_transaction_keeps_order() {
    let s = Stack::start().await;
    for i in 0..30 {
        let k = format!("ord{i}");
        let k = k.as_str();
        let watch_first = i % 2 == 1;
        let mut cmds = vec![vec!["SET", k, "1"]];
        if watch_first {
            cmds.push(vec!["WATCH", k]);
        }
        cmds.extend([vec!["MULTI"], vec!["INCR", k], vec!["EXEC"], vec!["GET", k]]);
        let mut buf = Vec::new();
        for c in &cmds {
            buf.extend_from_slice(&cachefront::protocol::Request::from_args(c).raw);
        }
        let mut raw = s.raw().await;
        raw.send(&buf).await;
        let mut got = Vec::new();
        for _ in 0..cmds.len() {
            got.push(raw.frame().await);
        }
        let mut want = vec!["+OK\r\n"];
        if watch_first {
            want.push("+OK\r\n");
        }
        want.extend(["+OK\r\n", "+QUEUED\r\n", "*1\r\n:2\r\n", "$1\r\n2\r\n"]);
        assert_eq!(got, want, "round {i}: {cmds:?}");
    }
}

/// A subscriber on `sub_port`, a publisher on `pub_port`: everything the subscriber and the
/// publisher receive, in order. Ends back in normal mode.
async fn pubsub_transcript(sub_port: u16, pub_port: u16) -> Vec<String> {
    let mut sub = Raw::connect(sub_port).await;
    let mut publ = Raw::connect(pub_port).await;
    let mut out = Vec::new();
    out.push(sub.call(&[b"SET", b"k", b"v"]).await);
    out.push(sub.call(&[b"SUBSCRIBE", b"ch", b"other"]).await);
    out.push(sub.frame().await);
    out.push(publ.call(&[b"PUBLISH", b"ch", b"hello"]).await);
    out.push(sub.frame().await);
    out.push(sub.call(&[b"PSUBSCRIBE", b"p*"]).await);
    out.push(publ.call(&[b"PUBLISH", b"pa", b"x"]).await);
    out.push(sub.frame().await);
    out.push(sub.call(&[b"SSUBSCRIBE", b"sch"]).await);
    out.push(publ.call(&[b"SPUBLISH", b"sch", b"shard"]).await);
    out.push(sub.frame().await);
    out.push(sub.call(&[b"PING"]).await);
    out.push(sub.call(&[b"PING", b"arg"]).await);
    out.push(sub.call(&[b"GET", b"k"]).await);
    out.push(sub.call(&[b"UNSUBSCRIBE", b"ch"]).await);
    out.push(publ.call(&[b"PUBLISH", b"ch", b"unheard"]).await);
    out.push(publ.call(&[b"PUBLISH", b"other", b"heard"]).await);
    out.push(sub.frame().await);
    out.push(sub.call(&[b"UNSUBSCRIBE"]).await);
    out.push(sub.call(&[b"PUNSUBSCRIBE"]).await);
    // Still subscribed to a shard channel: still in subscribed mode.
    out.push(sub.call(&[b"GET", b"k"]).await);
    out.push(sub.call(&[b"SUNSUBSCRIBE", b"sch"]).await);
    // Back to normal.
    out.push(sub.call(&[b"GET", b"k"]).await);
    out.push(sub.call(&[b"PING"]).await);
    out.push(publ.call(&[b"PUBLISH", b"ch", b"nobody"]).await);
    out.push(sub.drain(50).await);
    out
}

#[tokio::test]
async fn pubsub_in_resp2_matches_valkey() {
    let s = Stack::start().await;
    let (p, v) = (s.proxy_port(), s.valkey.port());
    let ours = pubsub_transcript(p, p).await;
    let theirs = pubsub_transcript(v, v).await;
    assert_eq!(ours, theirs);
    assert_eq!(
        ours[4],
        "*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n"
    );
    assert_eq!(ours[11], "*2\r\n$4\r\npong\r\n$0\r\n\r\n");
    assert_eq!(ours[22], "$1\r\nv\r\n");
    // Published straight on Valkey, received through cachefront.
    let mixed = pubsub_transcript(p, v).await;
    assert_eq!(mixed, theirs);
    // cachefront's own commands are refused in subscribed mode, in Valkey's words.
    let mut sub = s.raw().await;
    sub.call(&[b"SUBSCRIBE", b"ch"]).await;
    assert_eq!(
        sub.call(&[b"EMP.GET", b"1"]).await,
        "-ERR Can't execute 'emp.get': only (P|S)SUBSCRIBE / (P|S)UNSUBSCRIBE / PING / QUIT / RESET are allowed in this context\r\n"
    );
    assert_eq!(
        sub.call(&[b"UNSUBSCRIBE"]).await,
        "*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:0\r\n"
    );
    assert_eq!(
        sub.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
}

#[tokio::test]
async fn pubsub_in_resp3_uses_pushes_like_valkey() {
    let s = Stack::start().await;
    async fn transcript(sub_port: u16, pub_port: u16) -> Vec<String> {
        let mut sub = Raw::connect(sub_port).await;
        let mut publ = Raw::connect(pub_port).await;
        sub.call(&[b"HELLO", b"3"]).await;
        let mut out = vec![sub.call(&[b"SUBSCRIBE", b"ch"]).await];
        out.push(publ.call(&[b"PUBLISH", b"ch", b"m1"]).await);
        out.push(sub.frame().await);
        // RESP3 allows any command while subscribed.
        out.push(sub.call(&[b"SET", b"k", b"v"]).await);
        out.push(sub.call(&[b"GET", b"k"]).await);
        out.push(sub.call(&[b"PING"]).await);
        out.push(sub.call(&[b"PSUBSCRIBE", b"c*"]).await);
        out.push(publ.call(&[b"PUBLISH", b"ch", b"m2"]).await);
        out.push(sub.frame().await);
        out.push(sub.frame().await);
        out.push(sub.call(&[b"UNSUBSCRIBE"]).await);
        out.push(sub.call(&[b"PUNSUBSCRIBE"]).await);
        out.push(sub.call(&[b"GET", b"nothing"]).await);
        out.push(sub.drain(50).await);
        out
    }
    let (p, v) = (s.proxy_port(), s.valkey.port());
    let ours = transcript(p, p).await;
    let theirs = transcript(v, v).await;
    assert_eq!(ours, theirs);
    assert_eq!(ours[0], ">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n");
    assert_eq!(ours[2], ">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nm1\r\n");
    assert_eq!(ours[12], "_\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_subscribers_each_get_their_own_messages() {
    let s = Stack::start().await;
    let mut subs = Vec::new();
    for i in 0..10 {
        let mut r = s.raw().await;
        let ch = format!("chan{i}");
        let reply = r.call(&[b"SUBSCRIBE", ch.as_bytes()]).await;
        assert!(reply.ends_with(":1\r\n"), "{reply}");
        subs.push(r);
    }
    let mut c = s.client().await;
    for round in 0..5 {
        for i in 0..10 {
            let n: i64 = c
                .publish(format!("chan{i}"), format!("m{round}-{i}"))
                .await
                .unwrap();
            assert_eq!(n, 1);
        }
    }
    for (i, sub) in subs.iter_mut().enumerate() {
        let ch = format!("chan{i}");
        for round in 0..5 {
            let m = format!("m{round}-{i}");
            assert_eq!(
                sub.frame().await,
                format!(
                    "*3\r\n$7\r\nmessage\r\n${}\r\n{ch}\r\n${}\r\n{m}\r\n",
                    ch.len(),
                    m.len()
                )
            );
        }
        assert_eq!(sub.drain(20).await, "");
    }
}

#[tokio::test]
async fn blpop_is_unblocked_by_another_client() {
    let s = Stack::start().await;
    let mut a = s.raw().await;
    let mut b = s.raw().await;
    // A blocks; a command pipelined behind BLPOP waits for it, as on Valkey.
    a.cmd(&[b"BLPOP", b"q", b"5"]).await;
    a.cmd(&[b"PING"]).await;
    wait_blocked(&s, 1).await;
    assert_eq!(a.drain(50).await, "", "nothing before the push");
    assert_eq!(b.call(&[b"LPUSH", b"q", b"x"]).await, ":1\r\n");
    assert_eq!(a.frame().await, "*2\r\n$1\r\nq\r\n$1\r\nx\r\n");
    assert_eq!(a.frame().await, "+PONG\r\n");
    // The connection is back to normal afterwards.
    assert_eq!(a.call(&[b"SET", b"after", b"1"]).await, "+OK\r\n");
    assert_eq!(a.call(&[b"GET", b"after"]).await, "$1\r\n1\r\n");
    wait_blocked(&s, 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_client_does_not_hold_up_others() {
    let s = Stack::start().await;
    let mut blocked = Vec::new();
    for i in 0..5 {
        let mut r = s.raw().await;
        r.cmd(&[b"BLPOP", format!("bq{i}").as_bytes(), b"10"]).await;
        blocked.push(r);
    }
    wait_blocked(&s, 5).await;
    let mut c = s.client().await;
    let started = Instant::now();
    for i in 0..200 {
        let _: () = c.set(format!("k{i}"), i).await.unwrap();
        let v: i64 = c.get(format!("k{i}")).await.unwrap();
        assert_eq!(v, i);
    }
    let name: String = redis::cmd("EMP.GET")
        .arg(2)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(name, "Bob Smith");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "other clients were held up: {:?}",
        started.elapsed()
    );
    for (i, r) in blocked.iter_mut().enumerate() {
        let q = format!("bq{i}");
        let _: i64 = c.rpush(&q, "go").await.unwrap();
        assert_eq!(r.frame().await, format!("*2\r\n$3\r\n{q}\r\n$2\r\ngo\r\n"));
    }
}

#[tokio::test]
async fn blocking_timeouts_match_valkey() {
    let s = Stack::start().await;
    let r = same_as_valkey_from_empty(
        &s,
        &[
            "BLPOP none 0.05",
            "BRPOP none 0.05",
            "BZPOPMIN none 0.05",
            "XREAD BLOCK 50 STREAMS st $",
            "BLMOVE none dst LEFT RIGHT 0.05",
            "BLPOP none notanumber",
            "HELLO 3",
            "BLPOP none 0.05",
            "XREAD BLOCK 50 STREAMS st $",
            "PING",
        ],
    )
    .await;
    assert_eq!(r[0], "*-1\r\n");
    assert_eq!(r[3], "*-1\r\n");
    assert_eq!(r[7], "_\r\n");
}

#[tokio::test]
async fn xread_block_is_woken_by_xadd() {
    let s = Stack::start().await;
    let mut a = s.raw().await;
    let mut b = s.raw().await;
    a.cmd(&[b"XREAD", b"BLOCK", b"5000", b"STREAMS", b"st", b"$"])
        .await;
    wait_blocked(&s, 1).await;
    assert_eq!(
        b.call(&[b"XADD", b"st", b"1-1", b"f", b"v"]).await,
        "$3\r\n1-1\r\n"
    );
    assert_eq!(
        a.frame().await,
        "*1\r\n*2\r\n$2\r\nst\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    // XREAD without BLOCK, and with a key named "block", are plain commands.
    assert_eq!(
        a.call(&[b"XREAD", b"COUNT", b"1", b"STREAMS", b"st", b"0"])
            .await,
        "*1\r\n*2\r\n$2\r\nst\r\n*1\r\n*2\r\n$3\r\n1-1\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    assert_eq!(
        a.call(&[b"XREAD", b"STREAMS", b"block", b"0"]).await,
        "*-1\r\n"
    );
}

#[tokio::test]
async fn select_switches_database_for_that_client_only() {
    let s = Stack::start().await;
    let mut a = s.raw().await;
    let mut other = s.raw().await;
    let mut v = Raw::connect(s.valkey.port()).await;
    assert_eq!(a.call(&[b"SELECT", b"1"]).await, "+OK\r\n");
    assert_eq!(a.call(&[b"SET", b"k", b"in-db1"]).await, "+OK\r\n");
    assert_eq!(a.call(&[b"GET", b"k"]).await, "$6\r\nin-db1\r\n");
    // Really in db 1 on Valkey, not in db 0.
    assert_eq!(v.call(&[b"GET", b"k"]).await, "$-1\r\n");
    assert_eq!(v.call(&[b"SELECT", b"1"]).await, "+OK\r\n");
    assert_eq!(v.call(&[b"GET", b"k"]).await, "$6\r\nin-db1\r\n");
    // Another cachefront client is still on db 0.
    assert_eq!(other.call(&[b"GET", b"k"]).await, "$-1\r\n");
    assert_eq!(other.call(&[b"SET", b"k", b"in-db0"]).await, "+OK\r\n");
    assert_eq!(a.call(&[b"GET", b"k"]).await, "$6\r\nin-db1\r\n");
    // Cached commands keep working for a client on another database.
    assert_eq!(
        a.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    // Back to db 0.
    assert_eq!(a.call(&[b"SELECT", b"0"]).await, "+OK\r\n");
    assert_eq!(a.call(&[b"GET", b"k"]).await, "$6\r\nin-db0\r\n");
    // EMP.GET's cache entry went to the cache's database, not to db 1.
    assert_eq!(v.call(&[b"DBSIZE"]).await, ":1\r\n");
}

#[tokio::test]
async fn select_errors_match_valkey() {
    let s = Stack::start().await;
    same_as_valkey_from_empty(
        &s,
        &[
            "SELECT 99",
            "SET k v",
            "SELECT abc",
            "SELECT -1",
            "SELECT",
            "SELECT 1 2",
            "SELECT 2",
            "GET k",
            "SELECT 0",
            "GET k",
        ],
    )
    .await;
}

/// RESP3 tracking on the same connection: GET, then a write elsewhere, then an invalidation push.
async fn tracking_resp3(port: u16, writer_port: u16) -> Vec<String> {
    let mut a = Raw::connect(port).await;
    let mut w = Raw::connect(writer_port).await;
    a.call(&[b"HELLO", b"3"]).await;
    let mut out = vec![a.call(&[b"CLIENT", b"TRACKING", b"on"]).await];
    out.push(a.call(&[b"GET", b"tk"]).await);
    out.push(w.call(&[b"SET", b"tk", b"1"]).await);
    out.push(a.frame().await);
    // Pipelined: own write invalidates own read key; push and replies in Valkey's order.
    out.push(a.call(&[b"GET", b"tk"]).await);
    a.cmd(&[b"SET", b"tk", b"2"]).await;
    a.cmd(&[b"GET", b"zz"]).await;
    a.cmd(&[b"PING"]).await;
    for _ in 0..4 {
        out.push(a.frame().await);
    }
    out.push(a.call(&[b"CLIENT", b"TRACKING", b"off"]).await);
    out.push(a.call(&[b"GET", b"tk"]).await);
    out.push(w.call(&[b"SET", b"tk", b"3"]).await);
    out.push(a.call(&[b"PING"]).await);
    out.push(a.drain(50).await);
    out
}

#[tokio::test]
async fn client_tracking_resp3_delivers_invalidation_pushes() {
    let s = Stack::start().await;
    let (p, v) = (s.proxy_port(), s.valkey.port());
    let ours = tracking_resp3(p, p).await;
    flushall(&s).await;
    let theirs = tracking_resp3(v, v).await;
    assert_eq!(ours, theirs);
    assert_eq!(ours[3], ">2\r\n$10\r\ninvalidate\r\n*1\r\n$2\r\ntk\r\n");
    // A write straight on Valkey invalidates too.
    flushall(&s).await;
    let mixed = tracking_resp3(p, v).await;
    assert_eq!(mixed, theirs);
}

/// RESP2 tracking with REDIRECT to a client subscribed to `__redis__:invalidate`.
async fn tracking_redirect(port: u16, writer_port: u16) -> Vec<String> {
    let mut a = Raw::connect(port).await;
    let mut b = Raw::connect(port).await;
    let mut w = Raw::connect(writer_port).await;
    let id = b.call(&[b"CLIENT", b"ID"]).await;
    let id = id
        .trim_start_matches(':')
        .trim_end_matches("\r\n")
        .to_string();
    let mut out = vec![
        b.call(&[b"SUBSCRIBE", b"__redis__:invalidate"]).await,
        a.call(&[b"CLIENT", b"TRACKING", b"on", b"REDIRECT", id.as_bytes()])
            .await,
        a.call(&[b"GET", b"k"]).await,
        w.call(&[b"SET", b"k", b"v"]).await,
        b.frame().await,
        a.call(&[b"GET", b"k"]).await,
        a.call(&[b"SET", b"k", b"v2"]).await,
        b.frame().await,
    ];
    // A redirect to a client that does not exist.
    out.push(
        a.call(&[b"CLIENT", b"TRACKING", b"on", b"REDIRECT", b"987654"])
            .await,
    );
    out.push(a.drain(50).await);
    out.push(b.drain(50).await);
    out
}

#[tokio::test]
async fn client_tracking_redirect_in_resp2() {
    let s = Stack::start().await;
    let (p, v) = (s.proxy_port(), s.valkey.port());
    let ours = tracking_redirect(p, p).await;
    flushall(&s).await;
    let theirs = tracking_redirect(v, v).await;
    assert_eq!(ours, theirs);
    assert_eq!(
        ours[4],
        "*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$1\r\nk\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_never_see_each_others_replies() {
    let s = Stack::start().await;
    let mut tasks = Vec::new();
    for t in 0..50 {
        let url = s.proxy_url();
        tasks.push(tokio::spawn(async move {
            let mut c = common::connect(&url).await;
            for i in 0..100 {
                let (k, v) = (format!("k_{t}_{i}"), format!("v_{t}_{i}"));
                if t % 10 == 0 {
                    // Some clients use transactions (dedicated connections) meanwhile.
                    let (ok, got, n): (String, String, i64) = redis::pipe()
                        .atomic()
                        .set(&k, &v)
                        .get(&k)
                        .incr(format!("ctr_{t}"), 1)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    assert_eq!((ok.as_str(), got.as_str(), n), ("OK", v.as_str(), i + 1));
                } else {
                    let _: () = c.set(&k, &v).await.unwrap();
                    let got: String = c.get(&k).await.unwrap();
                    assert_eq!(got, v, "client {t} got someone else's value");
                }
            }
        }));
    }
    // Raw pipelining clients at the same time, in both protocols.
    for t in 0..6 {
        let port = s.proxy_port();
        tasks.push(tokio::spawn(async move {
            let mut r = Raw::connect(port).await;
            if t % 2 == 1 {
                assert!(r.call(&[b"HELLO", b"3"]).await.starts_with("%7"));
            }
            for round in 0..20 {
                let mut buf = Vec::new();
                for i in 0..10 {
                    let (k, v) = (format!("r_{t}_{round}_{i}"), format!("w_{t}_{round}_{i}"));
                    for c in [
                        vec![b"SET".to_vec(), k.clone().into(), v.clone().into()],
                        vec![b"GET".to_vec(), k.into()],
                        vec![b"ECHO".to_vec(), v.into()],
                    ] {
                        buf.extend_from_slice(&cachefront::protocol::Request::from_args(&c).raw);
                    }
                }
                r.send(&buf).await;
                for i in 0..10 {
                    let v = format!("w_{t}_{round}_{i}");
                    let bulk = format!("${}\r\n{v}\r\n", v.len());
                    assert_eq!(r.frame().await, "+OK\r\n");
                    assert_eq!(r.frame().await, bulk);
                    assert_eq!(r.frame().await, bulk);
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn monitor_sees_other_clients_commands() {
    let s = Stack::start().await;
    let mut m = s.raw().await;
    assert_eq!(m.call(&[b"MONITOR"]).await, "+OK\r\n");
    let mut c = s.raw().await;
    assert_eq!(c.call(&[b"SET", b"mon", b"itor"]).await, "+OK\r\n");
    // cachefront's own upstream handshakes may show up first; the client's SET must follow.
    let mut seen = Vec::new();
    loop {
        let line = m.frame().await;
        assert!(is_monitor_line(&line), "{line}");
        if line.contains("\"SET\" \"mon\" \"itor\"") {
            break;
        }
        seen.push(line);
        assert!(seen.len() < 10, "no SET among {seen:?}");
    }
    // So may cachefront's background commands (a client thread's tracking connection still
    // subscribing, a lease renewal) between the SET and QUIT's reply: monitor lines all.
    m.cmd(&[b"QUIT"]).await;
    loop {
        let line = m.frame().await;
        if line == "+OK\r\n" {
            break;
        }
        assert!(
            is_monitor_line(&line),
            "neither a monitor line nor QUIT's reply: {line}"
        );
    }
    assert!(m.closed().await);
}

/// A line of Valkey's `MONITOR` stream: `+<seconds>.<micros> [<db> <client>] "<command>" …`.
fn is_monitor_line(line: &str) -> bool {
    line.strip_prefix('+')
        .and_then(|l| l.split_once(' '))
        .is_some_and(|(at, rest)| at.parse::<f64>().is_ok() && rest.starts_with('['))
}
