//! The wire, byte for byte: Valkey's protocol-error cases and texts, inline commands,
//! pipelining, and limits checked before anything of a declared size is allocated.

mod common;

use common::protocol_error;

use common::{Raw, Stack};

#[tokio::test]
async fn valkeys_protocol_error_cases() {
    let s = Stack::start().await;
    protocol_error(&s, b"*3000000000\r\n", "invalid multibulk length").await;
    protocol_error(&s, b"*1048577\r\n", "invalid multibulk length").await;
    protocol_error(&s, b"*x\r\n", "invalid multibulk length").await;
    protocol_error(
        &s,
        b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\nfooz\r\n",
        "expected '$', got 'f'",
    )
    .await;
    protocol_error(
        &s,
        b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$-10\r\n",
        "invalid bulk length",
    )
    .await;
    protocol_error(
        &s,
        b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$2000000000\r\n",
        "invalid bulk length",
    )
    .await;
    protocol_error(
        &s,
        b"*3\r\n$3\r\nSET\r\n$1\r\nx\r\n$blabla\r\n",
        "invalid bulk length",
    )
    .await;
    protocol_error(&s, b"*1\r\nfoo\r\n", "expected '$', got 'f'").await;
    protocol_error(
        &s,
        b"SET \"unterminated\r\n",
        "unbalanced quotes in request",
    )
    .await;
    // Nested arrays are not a request.
    protocol_error(&s, b"*1\r\n*1\r\n$4\r\nPING\r\n", "expected '$', got '*'").await;
    // Header lines and inline commands are limited to 64 KiB.
    let mut long = b"*".to_vec();
    long.extend(std::iter::repeat_n(b'1', 70 * 1024));
    protocol_error(&s, &long, "too big mbulk count string").await;
    let inline = vec![b'a'; 70 * 1024];
    protocol_error(&s, &inline, "too big inline request").await;
}

#[tokio::test]
async fn empty_and_negative_requests_are_skipped() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    raw.send(b"\r\n\r\n*-10\r\n*0\r\n   \r\nPING\r\n").await;
    assert_eq!(raw.frame().await, "+PONG\r\n");
}

#[tokio::test]
async fn inline_commands_work_like_valkey() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    raw.send(b"PING\r\n").await;
    assert_eq!(raw.frame().await, "+PONG\r\n");
    raw.send(b"SET greeting \"hello world\\n\"\nGET greeting\r\n")
        .await;
    assert_eq!(raw.frame().await, "+OK\r\n");
    assert_eq!(raw.frame().await, "$12\r\nhello world\n\r\n");
    raw.send(b"EMP.GET 3\r\n").await;
    assert_eq!(raw.frame().await, "$13\r\nCharlie Brown\r\n");
    raw.send(b"ping x y z\r\n").await;
    assert_eq!(
        raw.frame().await,
        "-ERR wrong number of arguments for 'ping' command\r\n"
    );
}

#[tokio::test]
async fn a_bad_command_never_closes_the_connection() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    let r = raw.call(&[b"NOSUCHCOMMAND", b"x"]).await;
    assert!(r.starts_with("-ERR unknown command 'NOSUCHCOMMAND'"), "{r}");
    assert!(raw
        .call(&[b"GET"])
        .await
        .starts_with("-ERR wrong number of arguments"));
    assert!(raw
        .call(&[b"EMP.GET", b"nope"])
        .await
        .starts_with("-ERR invalid employee id"));
    assert!(raw
        .call(&[b"SQL.CACHED", b"DELETE FROM employees"])
        .await
        .starts_with("-ERR"));
    assert_eq!(raw.call(&[b"PING"]).await, "+PONG\r\n");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    let mut batch = Vec::new();
    for i in 0..300 {
        let k = format!("k{i}");
        let v = format!("v{i}");
        batch.extend_from_slice(
            &cachefront::protocol::Request::from_args([b"SET", k.as_bytes(), v.as_bytes()]).raw,
        );
        batch.extend_from_slice(b"PING\r\n");
        batch.extend_from_slice(
            &cachefront::protocol::Request::from_args([b"GET", k.as_bytes()]).raw,
        );
        batch.extend_from_slice(
            &cachefront::protocol::Request::from_args([
                &b"EMP.GET"[..],
                (1 + i % 5).to_string().as_bytes(),
            ])
            .raw,
        );
    }
    raw.send(&batch).await;
    let names = [
        "Alice Johnson",
        "Bob Smith",
        "Charlie Brown",
        "Diana Evans",
        "Ethan Williams",
    ];
    for i in 0..300 {
        assert_eq!(raw.frame().await, "+OK\r\n");
        assert_eq!(raw.frame().await, "+PONG\r\n");
        let v = format!("v{i}");
        assert_eq!(raw.frame().await, format!("${}\r\n{v}\r\n", v.len()));
        let n = names[i % 5];
        assert_eq!(raw.frame().await, format!("${}\r\n{n}\r\n", n.len()));
    }
}

#[tokio::test]
async fn a_request_split_into_single_bytes_is_parsed() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    for b in b"*2\r\n$7\r\nEMP.GET\r\n$1\r\n2\r\n" {
        raw.send(&[*b]).await;
    }
    assert_eq!(raw.frame().await, "$9\r\nBob Smith\r\n");
}

#[tokio::test]
async fn huge_declared_lengths_allocate_nothing() {
    let s = Stack::start().await;
    // A bulk declared at just under 512 MB: accepted as a header, nothing reserved for it.
    let mut raw = s.raw().await;
    raw.send(b"*2\r\n$3\r\nGET\r\n$536870000\r\nabc").await;
    // Meanwhile other clients are served.
    let mut other = s.raw().await;
    assert_eq!(other.call(&[b"PING"]).await, "+PONG\r\n");
    drop(raw);
    // Many connections that each declare a huge bulk cost only what they send.
    let mut many = Vec::new();
    for _ in 0..200 {
        let mut r = Raw::connect(s.proxy_port()).await;
        r.send(b"*1\r\n$536870000\r\n").await;
        many.push(r);
    }
    assert_eq!(other.call(&[b"PING"]).await, "+PONG\r\n");
}

#[tokio::test]
async fn query_buffer_limit_closes_the_client() {
    let s = Stack::start_with(|c| c.limits.max_query_buffer = 1024 * 1024).await;
    let mut raw = s.raw().await;
    raw.send(b"*2\r\n$3\r\nGET\r\n$2000000\r\n").await;
    let chunk = vec![b'x'; 64 * 1024];
    let mut closed = false;
    for _ in 0..40 {
        if tokio::io::AsyncWriteExt::write_all(&mut raw.stream, &chunk)
            .await
            .is_err()
        {
            closed = true;
            break;
        }
    }
    assert!(closed || raw.closed().await);
    let mut other = s.raw().await;
    assert_eq!(other.call(&[b"PING"]).await, "+PONG\r\n");
}

#[tokio::test]
async fn binary_and_invalid_utf8_arguments_pass_through() {
    let s = Stack::start().await;
    let mut raw = s.raw().await;
    assert_eq!(
        raw.call(&[b"SET", b"\xff\x00key", b"\x00\xfe\r\n"]).await,
        "+OK\r\n"
    );
    raw.cmd(&[b"GET", b"\xff\x00key"]).await;
    assert_eq!(raw.frame_bytes().await, b"$4\r\n\x00\xfe\r\n\r\n");
}

/// A pipeline longer than `limits.max_pipeline`, all of it read at once: cachefront stops
/// taking requests while the limit's worth of replies is pending and takes the rest as soon
/// as they have left, even when nothing more arrives to wake it — the client waits for its
/// replies, and local ones (`ECHO`) leave with no reply from Valkey to wait for. Then the
/// same with pass-through requests (`GET`) mixed in.
#[tokio::test]
async fn a_pipeline_past_the_limit_is_answered_whole() {
    let s = Stack::start_with(|c| c.limits.max_pipeline = 8).await;
    let mut shared = s.raw().await;
    // Then on a connection of its own (another database), whose replies come in together.
    let mut own = s.raw().await;
    assert_eq!(own.call(&[b"SELECT", b"9"]).await, "+OK\r\n");
    for (on_own, every_other_a_get) in [(false, false), (false, true), (true, true)] {
        let raw = if on_own { &mut own } else { &mut shared };
        let get = |i: usize| every_other_a_get && i % 2 == 1;
        let mut pipeline = Vec::new();
        for i in 0..100 {
            let word = i.to_string();
            let (name, arg) = match get(i) {
                false => ("ECHO", word.as_str()),
                true => ("GET", "no-such-key-past-the-limit"),
            };
            pipeline.extend_from_slice(
                format!(
                    "*2\r\n${}\r\n{name}\r\n${}\r\n{arg}\r\n",
                    name.len(),
                    arg.len()
                )
                .as_bytes(),
            );
        }
        raw.send(&pipeline).await;
        for i in 0..100 {
            let want = match get(i) {
                false => format!("${}\r\n{i}\r\n", i.to_string().len()),
                true => "$-1\r\n".to_string(),
            };
            assert_eq!(raw.frame().await, want, "reply {i}");
        }
    }
}
