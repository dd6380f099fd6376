//! TLS, against real servers: cachefront's TLS listener (rustls) with a rustls client and
//! redis-cli, mutual TLS, handshake limits; and TLS to the upstream Valkey through stunnel
//! (a real TLS server in front of the test Valkey), for every kind of upstream connection.

mod common;

use common::services::{postgres, TestDb, Valkey};
use common::tls::{client_config, connect_tls, Pki, Stunnel, TlsRaw};
use common::{config_for, Raw, Stack};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn p(path: &std::path::Path) -> String {
    path.display().to_string()
}

/// A TLS listener on a free port beside the plain one, with the PKI's server certificate.
fn tls_on(cfg: &mut cachefront::config::Config, pki: &Pki) {
    cfg.tls.listen = "127.0.0.1:0".into();
    cfg.tls.cert_file = p(&pki.server_cert);
    cfg.tls.key_file = p(&pki.server_key);
}

fn tls_port(s: &Stack) -> u16 {
    s.proxy.tls_addr.expect("TLS listener").port()
}

async fn tls_client(s: &Stack, pki: &Pki) -> TlsRaw<common::tls::ClientTls> {
    let stream = connect_tls(tls_port(s), "localhost", client_config(&pki.ca, None))
        .await
        .expect("TLS handshake with cachefront");
    TlsRaw::new(stream)
}

fn handshake_failures(s: &Stack) -> u64 {
    s.proxy
        .shared
        .metrics
        .tls_handshake_failures
        .load(Ordering::Relaxed)
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_listener_serves_clients_beside_plain_tcp() {
    let pki = Pki::generate();
    let s = Stack::start_with(|c| tls_on(c, &pki)).await;
    assert_ne!(tls_port(&s), s.proxy_port());

    let mut c = tls_client(&s, &pki).await;
    assert_eq!(c.call(&[b"PING"]).await, "+PONG\r\n");
    assert_eq!(
        c.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    assert_eq!(c.call(&[b"SET", b"tls:k", b"v1"]).await, "+OK\r\n");
    assert_eq!(c.call(&[b"GET", b"tls:k"]).await, "$2\r\nv1\r\n");
    // A pipeline in one write: replies in order.
    c.send(b"*1\r\n$4\r\nPING\r\n*2\r\n$4\r\nINCR\r\n$5\r\ntls:n\r\n*2\r\n$7\r\nEMP.GET\r\n$1\r\n2\r\n*2\r\n$4\r\nINCR\r\n$5\r\ntls:n\r\n")
        .await
        .expect("send pipeline");
    assert_eq!(c.frame().await, "+PONG\r\n");
    assert_eq!(c.frame().await, ":1\r\n");
    assert_eq!(c.frame().await, "$9\r\nBob Smith\r\n");
    assert_eq!(c.frame().await, ":2\r\n");
    // A reply larger than one TLS record arrives whole.
    let big = vec![b'x'; 100_000];
    assert_eq!(c.call(&[b"SET", b"tls:big", &big]).await, "+OK\r\n");
    let reply = c.call(&[b"GET", b"tls:big"]).await;
    assert_eq!(reply.len(), 100_000 + "$100000\r\n\r\n".len());

    // Plain TCP still works, on the other port, on the same data.
    let mut plain = s.raw().await;
    assert_eq!(plain.call(&[b"GET", b"tls:k"]).await, "$2\r\nv1\r\n");
    assert_eq!(
        plain.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );

    // QUIT over TLS: +OK, then a clean close.
    assert_eq!(c.call(&[b"QUIT"]).await, "+OK\r\n");
    assert!(c.try_frame().await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_tcp_on_the_tls_port_is_served_nothing() {
    let pki = Pki::generate();
    let s = Stack::start_with(|c| tls_on(c, &pki)).await;
    let before = handshake_failures(&s);
    let mut raw = Raw::connect(tls_port(&s)).await;
    raw.send(b"*1\r\n$4\r\nPING\r\n").await;
    let got = raw.drain(500).await;
    assert!(!got.contains("PONG"), "served over plain TCP: {got:?}");
    assert!(raw.closed().await, "the TLS port kept a plain client open");
    let deadline = Instant::now() + Duration::from_secs(2);
    while handshake_failures(&s) == before {
        assert!(Instant::now() < deadline, "handshake failure not counted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let info = tls_client(&s, &pki)
        .await
        .call(&[b"INFO", b"cachefront"])
        .await;
    assert!(info.contains("tls_handshake_failures:1"), "{info}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_does_not_trust_the_server_fails_the_handshake() {
    let pki = Pki::generate();
    let s = Stack::start_with(|c| tls_on(c, &pki)).await;
    let err = connect_tls(
        tls_port(&s),
        "localhost",
        client_config(&pki.other_ca, None),
    )
    .await
    .expect_err("handshake with an untrusted certificate");
    assert!(err.to_string().contains("certificate"), "{err}");
    // Right CA, wrong name.
    let err = connect_tls(
        tls_port(&s),
        "elsewhere.example",
        client_config(&pki.ca, None),
    )
    .await
    .expect_err("handshake with the wrong server name");
    assert!(err.to_string().contains("certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_requires_a_certificate_from_the_ca() {
    let pki = Pki::generate();
    let s = Stack::start_with(|c| {
        tls_on(c, &pki);
        c.tls.ca_file = p(&pki.ca);
        c.tls.require_client_cert = true;
    })
    .await;
    let port = tls_port(&s);

    // No certificate: TLS 1.3 completes the client's side, then the server refuses it; the
    // first command gets no reply.
    let refused = match connect_tls(port, "localhost", client_config(&pki.ca, None)).await {
        Err(_) => true,
        Ok(stream) => TlsRaw::new(stream).try_call(&[b"PING"]).await.is_err(),
    };
    assert!(refused, "a client without a certificate was served");

    // A certificate from another CA: refused too.
    let stranger = client_config(
        &pki.ca,
        Some((&pki.other_client_cert, &pki.other_client_key)),
    );
    let refused = match connect_tls(port, "localhost", stranger).await {
        Err(_) => true,
        Ok(stream) => TlsRaw::new(stream).try_call(&[b"PING"]).await.is_err(),
    };
    assert!(refused, "a client with a foreign certificate was served");

    // Signed by the CA: served.
    let good = client_config(&pki.ca, Some((&pki.client_cert, &pki.client_key)));
    let mut c = TlsRaw::new(
        connect_tls(port, "localhost", good)
            .await
            .expect("mTLS handshake"),
    );
    assert_eq!(
        c.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    assert!(handshake_failures(&s) >= 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_handshake_holds_its_slot_only_until_the_timeout() {
    let pki = Pki::generate();
    let s = Stack::start_with(|c| {
        tls_on(c, &pki);
        c.tls.handshake_timeout_ms = 300;
        c.limits.max_clients = 1;
    })
    .await;
    // Opens TCP on the TLS port and says nothing: it holds the only slot…
    let mut staller = Raw::connect(tls_port(&s)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut second = tls_client(&s, &pki).await;
    assert_eq!(
        second.call(&[b"PING"]).await,
        "-ERR max number of clients reached\r\n"
    );
    // …until the handshake timeout closes it.
    let started = Instant::now();
    assert!(staller.closed().await);
    assert!(started.elapsed() < Duration::from_secs(3));
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let mut c = tls_client(&s, &pki).await;
        match c.try_call(&[b"PING"]).await {
            Ok(r) if r == "+PONG\r\n" => break,
            other => assert!(Instant::now() < deadline, "slot never freed: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(handshake_failures(&s) >= 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_only_opens_no_plain_listener() {
    let pki = Pki::generate();
    let s = Stack::start_with(|c| {
        tls_on(c, &pki);
        c.tls.only = true;
        c.listen = "this is not used".into();
    })
    .await;
    assert_eq!(Some(s.proxy.addr), s.proxy.tls_addr);
    let mut c = tls_client(&s, &pki).await;
    assert_eq!(c.call(&[b"PING"]).await, "+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_cli_speaks_tls_to_cachefront() {
    let supports_tls = std::process::Command::new("redis-cli")
        .arg("--help")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout).contains("--tls")
                || String::from_utf8_lossy(&o.stderr).contains("--tls")
        })
        .unwrap_or(false);
    if !supports_tls {
        eprintln!("redis-cli without TLS support here: skipped");
        return;
    }
    let pki = Pki::generate();
    let s = Stack::start_with(|c| tls_on(c, &pki)).await;
    let port = tls_port(&s).to_string();
    let ca = p(&pki.ca);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("redis-cli")
            .args([
                "--tls",
                "--cacert",
                &ca,
                "--sni",
                "localhost",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "EMP.GET",
                "1",
            ])
            .output()
            .expect("run redis-cli")
    })
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "Alice Johnson",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bad_tls_files_are_refused_with_the_key_named() {
    use cachefront::config::Config;
    let pki = Pki::generate();
    let base = |extra: &str| {
        format!(
            "[tls]\nlisten = \"127.0.0.1:0\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n{extra}",
            p(&pki.server_cert),
            p(&pki.server_key)
        )
    };
    // Parsed, then checked as at start (the files are read by `server::check_config`).
    let check = |text: &str| {
        Config::from_toml_with_env(text, Vec::new())
            .and_then(|c| cachefront::server::check_config(&c))
    };
    assert!(check(&base("")).is_ok());
    let err = |text: String| check(&text).expect_err("refused").to_string();
    let missing = base("").replace(&p(&pki.server_cert), "/nonexistent/cert.pem");
    assert!(err(missing).starts_with("tls.cert_file: cannot read /nonexistent/cert.pem"));
    let not_pem = base("").replace(&p(&pki.server_cert), "/etc/hostname");
    assert!(err(not_pem).starts_with("tls.cert_file:"));
    // A key that is not the certificate's.
    let wrong_key = base("").replace(&p(&pki.server_key), &p(&pki.client_key));
    assert!(err(wrong_key).starts_with("tls.key_file:"));
    let key_is_cert = base("").replace(&p(&pki.server_key), &p(&pki.ca));
    assert!(err(key_is_cert).starts_with("tls.key_file:"));
    assert!(err(base("require_client_cert = true\n")).starts_with("tls.require_client_cert:"));
    assert!(err(base("ca_file = \"/nonexistent/ca.pem\"\n")).starts_with("tls.ca_file:"));
    assert!(err("[tls]\nonly = true\n".into()).starts_with("tls.only:"));
    assert!(err("[valkey]\ntls_ca_file = \"/x.pem\"\n".into()).starts_with("valkey.tls_ca_file:"));
    let bad_ca =
        "[valkey]\nurl = \"rediss://127.0.0.1:1\"\ntls_ca_file = \"/nonexistent/ca.pem\"\n"
            .to_string();
    assert!(err(bad_ca).starts_with("valkey.tls_ca_file:"));
    // A client certificate for Valkey: with its key, with TLS, readable, and fitting its key.
    let upstream = |extra: &str| {
        format!(
            "[valkey]\nurl = \"rediss://127.0.0.1:1\"\ntls_ca_file = \"{}\"\n{extra}",
            p(&pki.ca)
        )
    };
    let cert = format!("tls_cert_file = \"{}\"\n", p(&pki.client_cert));
    let key = |k: &std::path::Path| format!("tls_key_file = \"{}\"\n", p(k));
    assert!(check(&upstream(&(cert.clone() + &key(&pki.client_key)))).is_ok());
    assert!(err(upstream(&cert)).starts_with("valkey.tls_key_file:"));
    assert!(err(upstream(&key(&pki.client_key))).starts_with("valkey.tls_cert_file:"));
    let plain = format!("[valkey]\n{cert}{}", key(&pki.client_key));
    assert!(err(plain).starts_with("valkey.tls_cert_file:"));
    let wrong = err(upstream(&(cert.clone() + &key(&pki.server_key))));
    assert!(wrong.starts_with("valkey.tls_key_file:"), "{wrong}");
    let missing = upstream(
        &(cert.replace(&p(&pki.client_cert), "/nonexistent/c.pem") + &key(&pki.client_key)),
    );
    assert!(err(missing).starts_with("valkey.tls_cert_file: cannot read"));

    // --check-config says the same.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(
        &file,
        base("").replace(&p(&pki.server_key), &p(&pki.client_key)),
    )
    .unwrap();
    let out = common::cachefront_cmd()
        .arg("--config")
        .arg(&file)
        .arg("--check-config")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tls.key_file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let good = dir.path().join("good.toml");
    std::fs::write(&good, base("")).unwrap();
    let out = common::run_ok(
        common::cachefront_cmd()
            .arg("--config")
            .arg(&good)
            .arg("--check-config"),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("tls.listen 127.0.0.1:0"));
}

// ---------------------------------------------------------------------------------------
// TLS to the upstream Valkey
// ---------------------------------------------------------------------------------------

/// cachefront → (TLS) → stunnel → Valkey, and a fresh database.
struct TlsUpstream {
    proxy: cachefront::server::Running,
    stunnel: Stunnel,
    valkey: Valkey,
    _db: TestDb,
    _pki: Pki,
}

impl TlsUpstream {
    async fn start(tweak: impl FnOnce(&mut cachefront::config::Config, &Pki)) -> TlsUpstream {
        let pki = Pki::generate();
        let valkey = Valkey::start();
        let stunnel = Stunnel::start(&pki, valkey.port());
        let db = tokio::task::spawn_blocking(|| postgres().fresh_db())
            .await
            .expect("fresh db");
        let mut cfg = config_for(&valkey, &db);
        cfg.valkey.url = stunnel.url();
        cfg.valkey.tls_ca_file = p(&pki.ca);
        tweak(&mut cfg, &pki);
        cfg.validate().expect("test config is valid");
        let proxy = cachefront::server::spawn(cfg)
            .await
            .expect("cachefront starts");
        TlsUpstream {
            proxy,
            stunnel,
            valkey,
            _db: db,
            _pki: pki,
        }
    }

    async fn raw(&self) -> Raw {
        Raw::connect(self.proxy.addr.port()).await
    }

    /// A plain client straight to Valkey, behind stunnel.
    async fn valkey_raw(&self) -> Raw {
        Raw::connect(self.valkey.port()).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_upstream_connection_speaks_tls() {
    let t = TlsUpstream::start(|_, _| {}).await;
    let mut c = t.raw().await;
    let mut v = t.valkey_raw().await;

    // Shared pipelined connections.
    assert_eq!(c.call(&[b"SET", b"up:k", b"v"]).await, "+OK\r\n");
    assert_eq!(c.call(&[b"GET", b"up:k"]).await, "$1\r\nv\r\n");
    assert_eq!(v.call(&[b"GET", b"up:k"]).await, "$1\r\nv\r\n");

    // The cache store (its requests ride the shared connections): a miss fills Valkey, then hits.
    let m = &t.proxy.shared.metrics;
    assert_eq!(
        c.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    assert_eq!(m.misses.load(Ordering::Relaxed), 1);
    assert_eq!(m.fills.load(Ordering::Relaxed), 1);
    assert_eq!(
        v.call(&[b"GET", b"employee:1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    assert_eq!(
        c.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    assert_eq!(m.hits.load(Ordering::Relaxed), 1);

    // Dedicated connections: a transaction…
    assert_eq!(c.call(&[b"MULTI"]).await, "+OK\r\n");
    assert_eq!(c.call(&[b"INCR", b"up:n"]).await, "+QUEUED\r\n");
    assert_eq!(c.call(&[b"INCR", b"up:n"]).await, "+QUEUED\r\n");
    assert_eq!(c.call(&[b"EXEC"]).await, "*2\r\n:1\r\n:2\r\n");
    assert_eq!(v.call(&[b"GET", b"up:n"]).await, "$1\r\n2\r\n");

    // …and a subscription.
    let mut sub = t.raw().await;
    assert_eq!(
        sub.call(&[b"SUBSCRIBE", b"news"]).await,
        "*3\r\n$9\r\nsubscribe\r\n$4\r\nnews\r\n:1\r\n"
    );
    assert_eq!(c.call(&[b"PUBLISH", b"news", b"hello"]).await, ":1\r\n");
    assert_eq!(
        sub.frame().await,
        "*3\r\n$7\r\nmessage\r\n$4\r\nnews\r\n$5\r\nhello\r\n"
    );

    // The L1's tracking connection.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let info = c.call(&[b"INFO", b"cachefront"]).await;
        if info.contains("l1_tracking:1") {
            break;
        }
        assert!(Instant::now() < deadline, "tracking never came up: {info}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Tracking works through it: a change made straight in Valkey drops the L1 copy.
    for _ in 0..50 {
        c.call(&[b"EMP.GET", b"1"]).await;
        if m.l1_hits.load(Ordering::Relaxed) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(
        m.l1_hits.load(Ordering::Relaxed) > 0,
        "never served from L1"
    );
    assert_eq!(
        v.call(&[b"SET", b"employee:1", b"Changed"]).await,
        "+OK\r\n"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while c.call(&[b"EMP.GET", b"1"]).await != "$7\r\nChanged\r\n" {
        assert!(Instant::now() < deadline, "L1 not invalidated over TLS");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // And the connections really are TLS: stunnel saw them.
    assert!(
        t.stunnel.log().contains("accepted connection"),
        "{}",
        t.stunnel.log()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_certificate_for_valkey_that_requires_one() {
    let pki = Pki::generate();
    let valkey = Valkey::start();
    let stunnel = Stunnel::start_mtls(&pki, valkey.port());
    let db = tokio::task::spawn_blocking(|| postgres().fresh_db())
        .await
        .expect("fresh db");
    let start = |cert: Option<(&std::path::Path, &std::path::Path)>| {
        let mut cfg = config_for(&valkey, &db);
        cfg.valkey.url = stunnel.url();
        cfg.valkey.tls_ca_file = p(&pki.ca);
        if let Some((c, k)) = cert {
            cfg.valkey.tls_cert_file = p(c);
            cfg.valkey.tls_key_file = p(k);
        }
        cfg.validate().expect("test config is valid");
        cachefront::server::spawn(cfg)
    };
    // Presenting the CA's client certificate: served.
    let with = start(Some((&pki.client_cert, &pki.client_key)))
        .await
        .expect("cachefront starts");
    let mut c = Raw::connect(with.addr.port()).await;
    assert_eq!(c.call(&[b"SET", b"m:k", b"v"]).await, "+OK\r\n");
    assert_eq!(c.call(&[b"GET", b"m:k"]).await, "$1\r\nv\r\n");
    assert_eq!(
        c.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    assert_eq!(with.shared.metrics.fills.load(Ordering::Relaxed), 1);
    // Without one, or with a stranger's: refused by Valkey's TLS side, a prompt -UPSTREAM.
    for cert in [None, Some((&pki.other_client_cert, &pki.other_client_key))] {
        let without = start(cert.map(|(c, k)| (c.as_path(), k.as_path())))
            .await
            .expect("cachefront starts");
        let mut c = Raw::connect(without.addr.port()).await;
        let started = Instant::now();
        let reply = c.call(&[b"GET", b"m:k"]).await;
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(reply.starts_with("-UPSTREAM"), "{reply}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_untrusted_upstream_certificate_is_a_prompt_upstream_error() {
    let t = TlsUpstream::start(|c, pki| c.valkey.tls_ca_file = p(&pki.other_ca)).await;
    let mut c = t.raw().await;
    let started = Instant::now();
    let reply = c.call(&[b"GET", b"k"]).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert!(reply.starts_with("-UPSTREAM"), "{reply}");
    assert!(reply.contains("certificate"), "{reply}");
    let reply = c.call(&[b"MULTI"]).await;
    assert!(
        reply.starts_with("-UPSTREAM") && reply.contains("certificate"),
        "{reply}"
    );
    // Cached commands fail open to PostgreSQL.
    assert_eq!(
        c.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_insecure_skips_verification() {
    let t = TlsUpstream::start(|c, _| {
        c.valkey.tls_ca_file = String::new();
        c.valkey.tls_insecure = true;
    })
    .await;
    let mut c = t.raw().await;
    assert_eq!(c.call(&[b"SET", b"k", b"v"]).await, "+OK\r\n");
    assert_eq!(c.call(&[b"GET", b"k"]).await, "$1\r\nv\r\n");
    assert_eq!(
        c.call(&[b"EMP.GET", b"1"]).await,
        "$13\r\nAlice Johnson\r\n"
    );
    assert_eq!(t.proxy.shared.metrics.fills.load(Ordering::Relaxed), 1);
}
