//! Isolation between clients, by construction: a dedicated Valkey connection is reset before
//! anyone else gets it, state entered inside MULTI is tracked as Valkey tracks it, protocol
//! switches reach the dedicated connection, and a client that does not read its replies is
//! cut off at its output limit instead of growing the process.

mod common;

use common::{Raw, Stack};
use std::time::Duration;

/// The reproduction from the issue: a client subscribes inside a transaction and leaves. Its
/// dedicated connection, still subscribed in Valkey, must not reach anyone else: 20 clients
/// each running BLPOP (which needs a dedicated connection) get Valkey's nil, never the
/// subscribed-context refusal or a published message.
#[tokio::test]
async fn a_connection_subscribed_through_exec_never_reaches_another_client() {
    let s = Stack::start().await;
    for round in 0..5 {
        let mut bad = s.raw().await;
        assert_eq!(bad.call(&[b"MULTI"]).await, "+OK\r\n");
        assert_eq!(bad.call(&[b"SUBSCRIBE", b"ch"]).await, "+QUEUED\r\n");
        let exec = bad.call(&[b"EXEC"]).await;
        assert!(
            exec.starts_with("*1\r\n*3\r\n$9\r\nsubscribe\r\n"),
            "{exec}"
        );
        // Valkey now holds the connection in subscribed mode, and so does cachefront.
        let r = bad.call(&[b"GET", b"k"]).await;
        assert!(r.starts_with("-ERR Can't execute 'get'"), "{r}");
        assert_eq!(bad.call(&[b"PING"]).await, "*2\r\n$4\r\npong\r\n$0\r\n\r\n");
        bad.call(&[b"QUIT"]).await;
        drop(bad);

        let mut tasks = Vec::new();
        for _ in 0..20 {
            let port = s.proxy_port();
            tasks.push(tokio::spawn(async move {
                let mut c = Raw::connect(port).await;
                let mut got = Vec::new();
                for _ in 0..5 {
                    got.push(c.call(&[b"BLPOP", b"q-isolation", b"0.05"]).await);
                }
                got
            }));
        }
        let mut publisher = s.raw().await;
        publisher.call(&[b"PUBLISH", b"ch", b"secret"]).await;
        for t in tasks {
            for reply in t.await.unwrap() {
                assert_eq!(
                    reply, "*-1\r\n",
                    "round {round}: another client's state leaked"
                );
            }
        }
    }
}

/// Commands refused outside a transaction are refused inside one too (the EXEC then fails
/// with EXECABORT, as Valkey does for a command refused while queuing).
#[tokio::test]
async fn commands_refused_outside_multi_are_refused_inside() {
    let s = Stack::start().await;
    let mut c = s.raw().await;
    for cmd in [
        &[&b"CLIENT"[..], b"REPLY", b"OFF"][..],
        &[b"CLIENT", b"KILL", b"ID", b"1"],
        &[b"SYNC"],
    ] {
        assert_eq!(c.call(&[b"MULTI"]).await, "+OK\r\n");
        let r = c.call(cmd).await;
        assert!(r.starts_with("-ERR"), "{cmd:?}: {r}");
        let r = c.call(&[b"EXEC"]).await;
        assert!(r.starts_with("-EXECABORT"), "{cmd:?}: {r}");
    }
    // The connection is still fine, and replies still come one per command.
    assert_eq!(c.call(&[b"SET", b"a", b"1"]).await, "+OK\r\n");
    assert_eq!(c.call(&[b"GET", b"a"]).await, "$1\r\n1\r\n");
}

/// SELECT queued in MULTI changes the database once EXEC runs it, as in Valkey; one that fails
/// inside EXEC changes nothing.
#[tokio::test]
async fn select_inside_multi_takes_effect_at_exec() {
    let s = Stack::start().await;
    let mut c = s.raw().await;
    assert_eq!(c.call(&[b"MULTI"]).await, "+OK\r\n");
    assert_eq!(c.call(&[b"SELECT", b"3"]).await, "+QUEUED\r\n");
    assert_eq!(c.call(&[b"EXEC"]).await, "*1\r\n+OK\r\n");
    assert_eq!(c.call(&[b"SET", b"in3", b"x"]).await, "+OK\r\n");
    let mut v = Raw::connect(s.valkey.port()).await;
    assert_eq!(v.call(&[b"SELECT", b"3"]).await, "+OK\r\n");
    assert_eq!(v.call(&[b"GET", b"in3"]).await, "$1\r\nx\r\n");
    assert_eq!(v.call(&[b"SELECT", b"0"]).await, "+OK\r\n");
    assert_eq!(v.call(&[b"EXISTS", b"in3"]).await, ":0\r\n");

    // A SELECT that fails inside EXEC leaves the database as it was.
    assert_eq!(c.call(&[b"MULTI"]).await, "+OK\r\n");
    assert_eq!(c.call(&[b"SELECT", b"99999"]).await, "+QUEUED\r\n");
    let r = c.call(&[b"EXEC"]).await;
    assert!(r.starts_with("*1\r\n-ERR"), "{r}");
    assert_eq!(c.call(&[b"GET", b"in3"]).await, "$1\r\nx\r\n");
}

/// A connection that carried state (another database, tracking, CLIENT NO-EVICT, a name set
/// on Valkey's side) comes back to the next client as a fresh one.
#[tokio::test]
async fn dedicated_connections_are_reset_before_reuse() {
    let s = Stack::start_with(|c| c.valkey.idle_dedicated = 1).await;
    let mut a = s.raw().await;
    assert_eq!(a.call(&[b"SELECT", b"2"]).await, "+OK\r\n");
    assert_eq!(a.call(&[b"SET", b"k", b"db2"]).await, "+OK\r\n");
    assert_eq!(a.call(&[b"WATCH", b"k"]).await, "+OK\r\n");
    assert_eq!(a.call(&[b"SELECT", b"0"]).await, "+OK\r\n");
    assert_eq!(a.call(&[b"UNWATCH"]).await, "+OK\r\n");
    a.call(&[b"QUIT"]).await;
    drop(a);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The one idle connection is reused: it must be in database 0, with no watch and no
    // transaction left behind.
    let mut b = s.raw().await;
    assert_eq!(b.call(&[b"SET", b"k", b"db0"]).await, "+OK\r\n");
    assert_eq!(b.call(&[b"WATCH", b"k"]).await, "+OK\r\n");
    assert_eq!(b.call(&[b"MULTI"]).await, "+OK\r\n");
    assert_eq!(b.call(&[b"GET", b"k"]).await, "+QUEUED\r\n");
    assert_eq!(b.call(&[b"EXEC"]).await, "*1\r\n$3\r\ndb0\r\n");
    assert_eq!(b.call(&[b"CLIENT", b"GETNAME"]).await, "$-1\r\n");
}

/// HELLO switches the protocol whatever state the client holds: after SELECT, after WATCH,
/// and in RESP3 subscribed mode (where Valkey allows any command).
#[tokio::test]
async fn hello_switches_protocol_at_any_point() {
    let s = Stack::start().await;
    let mut c = s.raw().await;
    assert_eq!(c.call(&[b"SELECT", b"1"]).await, "+OK\r\n");
    assert_eq!(c.call(&[b"HSET", b"h", b"f", b"v"]).await, ":1\r\n");
    let hello = c.call(&[b"HELLO", b"3"]).await;
    assert!(hello.starts_with("%7\r\n"), "{hello}");
    // A RESP3 map from the dedicated connection, still on database 1.
    assert_eq!(
        c.call(&[b"HGETALL", b"h"]).await,
        "%1\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    assert_eq!(c.call(&[b"WATCH", b"h"]).await, "+OK\r\n");
    let hello = c.call(&[b"HELLO", b"2"]).await;
    assert!(hello.starts_with("*14\r\n"), "{hello}");
    assert_eq!(
        c.call(&[b"HGETALL", b"h"]).await,
        "*2\r\n$1\r\nf\r\n$1\r\nv\r\n"
    );
    assert_eq!(c.call(&[b"MULTI"]).await, "+OK\r\n");
    assert_eq!(c.call(&[b"GET", b"x"]).await, "+QUEUED\r\n");
    assert_eq!(c.call(&[b"EXEC"]).await, "*1\r\n$-1\r\n");

    // RESP3 subscribed mode: HELLO 2 is allowed and the messages turn into RESP2 arrays.
    let mut sub = s.raw().await;
    assert!(sub.call(&[b"HELLO", b"3"]).await.starts_with("%7"));
    let r = sub.call(&[b"SUBSCRIBE", b"news"]).await;
    assert!(r.starts_with(">3\r\n$9\r\nsubscribe"), "{r}");
    let hello = sub.call(&[b"HELLO", b"2"]).await;
    assert!(hello.starts_with("*14\r\n"), "{hello}");
    let mut p = s.raw().await;
    assert_eq!(p.call(&[b"PUBLISH", b"news", b"hi"]).await, ":1\r\n");
    assert_eq!(
        sub.frame().await,
        "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$2\r\nhi\r\n"
    );
    // RESP2 subscribed mode now: only the subscription commands.
    let r = sub.call(&[b"GET", b"x"]).await;
    assert!(r.starts_with("-ERR Can't execute 'get'"), "{r}");
}

/// The reproduction from the issue: 400 pipelined GETs of a 1 MiB value on a connection that
/// never reads. The client is cut off at its output limit, and the process does not grow by
/// the 400 MiB it asked for.
#[tokio::test]
async fn a_client_that_never_reads_is_cut_off_at_its_output_limit() {
    let s = Stack::start_with(|c| {
        c.limits.client_output_buffer_limit =
            cachefront::config::OutputBufferLimits::try_from("normal 16mb 0 0".to_string())
                .unwrap();
    })
    .await;
    let mut v = s.valkey_client().await;
    let big = vec![b'x'; 1 << 20];
    let _: () = redis::cmd("SET")
        .arg("big")
        .arg(&big)
        .query_async(&mut v)
        .await
        .unwrap();
    let rss_before = common::rss_bytes() / 1024;
    let mut hog = s.raw().await;
    let mut pipeline = Vec::new();
    for _ in 0..400 {
        pipeline.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$3\r\nbig\r\n");
    }
    hog.send(&pipeline).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown_mb = (common::rss_bytes() / 1024).saturating_sub(rss_before) / 1024;
    assert!(hog.closed().await, "the client was not disconnected");
    assert!(grown_mb < 200, "RSS grew by {grown_mb} MB");
    // Everyone else is served as before, and the disconnect is counted.
    let mut c = s.raw().await;
    assert_eq!(c.call(&[b"SET", b"a", b"1"]).await, "+OK\r\n");
    let info = c.call(&[b"INFO", b"cachefront"]).await;
    assert!(info.contains("client_output_limit_disconnects:1"), "{info}");
}

/// A client may send its whole pipeline before reading a reply, as Valkey's own suite does
/// (10,000 EVALs, then 10,000 reads). cachefront keeps reading requests while replies wait,
/// over shared connections and the client's own dedicated one alike: the requests and the
/// replies are each far more than the socket buffers hold, so if it stopped reading until the
/// client read, each side would wait for the other forever.
#[tokio::test]
async fn a_client_that_writes_everything_before_reading_is_served() {
    let s = Stack::start().await;
    let value = vec![b'v'; 64 * 1024];
    let mut pipeline = Vec::new();
    for i in 0..300 {
        let args: Vec<&[u8]> = if i % 2 == 0 {
            vec![b"ECHO", &value]
        } else {
            vec![b"EVAL", b"return ARGV[1]", b"0", &value]
        };
        pipeline.extend_from_slice(&cachefront::protocol::Request::from_args(args).raw);
    }
    let mut c = s.raw().await;
    tokio::time::timeout(Duration::from_secs(30), c.send(&pipeline))
        .await
        .expect("cachefront stopped reading a client whose replies were waiting");
    for i in 0..300 {
        let reply = c.frame_bytes().await;
        assert!(
            reply.starts_with(b"$65536\r\n") && reply.len() == 65536 + 10,
            "reply {i}: {:?}",
            String::from_utf8_lossy(&reply[..reply.len().min(60)])
        );
    }
}

/// A subscriber that does not read is held to the pubsub class's limit, not the normal one.
#[tokio::test]
async fn a_subscriber_that_never_reads_is_cut_off_at_the_pubsub_limit() {
    let s = Stack::start_with(|c| {
        c.limits.client_output_buffer_limit = cachefront::config::OutputBufferLimits::try_from(
            "normal 0 0 0 pubsub 1mb 0 0".to_string(),
        )
        .unwrap();
    })
    .await;
    let mut sub = s.raw().await;
    assert!(sub
        .call(&[b"SUBSCRIBE", b"firehose"])
        .await
        .contains("subscribe"));
    // Small socket buffers would make this slow; the messages are big instead.
    let msg = vec![b'm'; 256 * 1024];
    let mut p = s.valkey_client().await;
    for _ in 0..200 {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("firehose")
            .arg(&msg)
            .query_async(&mut p)
            .await
            .unwrap();
    }
    assert!(sub.closed().await, "the subscriber was not disconnected");
}

/// No client can write, rename or delete cachefront's own keys (they drive invalidation),
/// directly or as a script's declared keys; reading them, and values that merely look like
/// them, are fine. A key-restricted user gets the same.
#[tokio::test]
async fn clients_cannot_write_cachefronts_own_keys() {
    let s = Stack::start().await;
    let mut c = s.raw().await;
    // A fill creates the table's metadata.
    assert_eq!(
        c.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    let refused: &[&[&[u8]]] = &[
        &[b"SET", b"cachefront:v:employees", b"junk"],
        &[b"DEL", b"cachefront:v:employees"],
        &[b"UNLINK", b"x", b"cachefront:e:employees"],
        &[b"RENAME", b"cachefront:v:employees", b"elsewhere"],
        &[b"RENAME", b"elsewhere", b"cachefront:v:employees"],
        &[b"SADD", b"cachefront:k:employees", b"m"],
        &[b"MSET", b"a", b"1", b"cachefront:v:departments", b"2"],
        &[b"EXPIRE", b"cachefront:v:employees", b"1"],
        &[
            b"EVAL",
            b"return redis.call('SET', KEYS[1], 'x')",
            b"1",
            b"cachefront:v:employees",
        ],
    ];
    for cmd in refused {
        let r = c.call(cmd).await;
        assert!(
            r.starts_with("-NOPERM cachefront's own keys"),
            "{cmd:?}: {r}"
        );
    }
    let allowed: &[&[&[u8]]] = &[
        &[b"TYPE", b"cachefront:v:employees"],
        &[b"SET", b"plain", b"cachefront:v:employees"],
        &[b"EXISTS", b"cachefront:v:employees"],
        &[
            b"EVAL_RO",
            b"return redis.call('GET', KEYS[1])",
            b"1",
            b"cachefront:v:employees",
        ],
    ];
    for cmd in allowed {
        let r = c.call(cmd).await;
        assert!(!r.starts_with('-'), "{cmd:?}: {r}");
    }
    // Inside MULTI the refusal aborts the transaction.
    assert_eq!(c.call(&[b"MULTI"]).await, "+OK\r\n");
    let r = c.call(&[b"DEL", b"cachefront:v:employees"]).await;
    assert!(r.starts_with("-NOPERM"), "{r}");
    assert!(c.call(&[b"EXEC"]).await.starts_with("-EXECABORT"));
    // The metadata is intact: an UPDATE still invalidates.
    s.psql("UPDATE employees SET name = 'Alicia' WHERE id = 1");
    common::eventually("the UPDATE invalidating employee:1", async || {
        c.call(&[b"EMP.GET", b"1"]).await == "$6\r\nAlicia\r\n"
    })
    .await;
}

/// One slow command on a shared connection (`DEBUG SLEEP` longer than the command timeout, a
/// long script) does not fail other clients' requests: they wait, as they would on Valkey,
/// and a script can be killed through cachefront as through Valkey.
#[tokio::test]
async fn a_slow_command_does_not_fail_other_clients() {
    let s = Stack::start_with(|c| {
        c.valkey.command_timeout_ms = 300;
        c.valkey.pool_size = 1;
    })
    .await;
    let mut v = Raw::connect(s.valkey.port()).await;
    assert_eq!(v.call(&[b"SET", b"k", b"v"]).await, "+OK\r\n");
    let port = s.proxy_port();
    let sleeper = tokio::spawn(async move {
        let mut c = Raw::connect(port).await;
        c.call(&[b"DEBUG", b"SLEEP", b"1"]).await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut others = Vec::new();
    for _ in 0..5 {
        others.push(tokio::spawn(async move {
            let mut c = Raw::connect(port).await;
            c.call(&[b"GET", b"k"]).await
        }));
    }
    assert_eq!(sleeper.await.unwrap(), "+OK\r\n");
    for o in others {
        assert_eq!(o.await.unwrap(), "$1\r\nv\r\n");
    }

    // A script past Valkey's busy threshold: others get Valkey's -BUSY (not a cachefront
    // timeout), and SCRIPT KILL from another client stops it.
    assert_eq!(
        v.call(&[b"CONFIG", b"SET", b"busy-reply-threshold", b"100"])
            .await,
        "+OK\r\n"
    );
    let looper = tokio::spawn(async move {
        let mut c = Raw::connect(port).await;
        c.call(&[b"EVAL", b"while true do end", b"0"]).await
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut c = s.raw().await;
    let r = c.call(&[b"GET", b"k"]).await;
    assert!(r.starts_with("-BUSY"), "{r}");
    // PING asks Valkey while it may be busy, as the client would see directly.
    let r = c.call(&[b"PING"]).await;
    assert!(r.starts_with("-BUSY"), "{r}");
    assert_eq!(c.call(&[b"SCRIPT", b"KILL"]).await, "+OK\r\n");
    let r = looper.await.unwrap();
    assert!(r.contains("Script killed"), "{r}");
    assert_eq!(c.call(&[b"GET", b"k"]).await, "$1\r\nv\r\n");
}

/// `CLIENT REPLY OFF|SKIP|ON` is kept by cachefront as Valkey keeps it: replies are dropped
/// (whatever connection answers them), messages and RESP3 pushes still arrive.
/// The transitions between `CLIENT REPLY` modes, byte for byte as Valkey answers them: SKIP
/// while OFF changes nothing, SKIP after SKIP skips one more command, ON after SKIP is
/// answered, RESET turns replies back on and is answered.
#[tokio::test]
async fn client_reply_transitions_match_valkey() {
    let s = Stack::start().await;
    let mut batch = Vec::new();
    for line in [
        "SET k v",
        "CLIENT REPLY OFF",
        "CLIENT REPLY SKIP",
        "GET k",
        "CLIENT REPLY ON",
        "GET k",
        "CLIENT REPLY SKIP",
        "CLIENT REPLY SKIP",
        "GET k",
        "ECHO one",
        "CLIENT REPLY SKIP",
        "CLIENT REPLY ON",
        "ECHO two",
        "CLIENT REPLY OFF",
        "RESET",
        "ECHO three",
    ] {
        batch.extend(common::encode_line(line));
    }
    let mut ours = s.raw().await;
    ours.send(&batch).await;
    let mut theirs = Raw::connect(s.valkey.port()).await;
    theirs.send(&batch).await;
    let (ours, theirs) = (ours.drain(300).await, theirs.drain(300).await);
    assert_eq!(ours, theirs);
    assert!(theirs.ends_with("$5\r\nthree\r\n"), "{theirs:?}");
}

#[tokio::test]
async fn client_reply_modes_like_valkey() {
    let s = Stack::start().await;
    let mut c = s.raw().await;
    let mut batch = Vec::new();
    for line in [
        "CLIENT REPLY OFF",
        "SET a 1",
        "GET a",
        "EMP.GET 1",
        "MULTI",
        "SET b 2",
        "EXEC",
        "BLPOP nothing 0.01",
        "CLIENT REPLY ON",
        "GET a",
        "CLIENT REPLY SKIP",
        "GET b",
        "GET a",
    ] {
        batch.extend(common::encode_line(line));
    }
    c.send(&batch).await;
    assert_eq!(c.frame().await, "+OK\r\n");
    assert_eq!(c.frame().await, "$1\r\n1\r\n");
    assert_eq!(c.frame().await, "$1\r\n1\r\n");
    assert_eq!(c.drain(200).await, "");
    assert_eq!(c.call(&[b"GET", b"b"]).await, "$1\r\n2\r\n");
    assert_eq!(
        c.call(&[b"CLIENT", b"REPLY", b"MAYBE"]).await,
        "-ERR syntax error\r\n"
    );

    // RESP3: the subscription's confirmation and the messages are pushes, not replies.
    let mut sub = s.raw().await;
    assert!(sub.call(&[b"HELLO", b"3"]).await.starts_with("%7"));
    sub.cmd(&[b"CLIENT", b"REPLY", b"OFF"]).await;
    let r = sub.call(&[b"SUBSCRIBE", b"ch"]).await;
    assert!(r.starts_with(">3\r\n$9\r\nsubscribe"), "{r}");
    let mut p = s.raw().await;
    assert_eq!(p.call(&[b"PUBLISH", b"ch", b"hi"]).await, ":1\r\n");
    assert_eq!(
        sub.frame().await,
        ">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n"
    );
}
