//! TLS test support: a throwaway PKI made at test time with rcgen, rustls clients, and
//! stunnel (a real TLS server, OpenSSL) in front of a plain test Valkey — the valkey-server
//! the tests use is built without TLS.
//!
//! * [`Pki::generate`]: a CA, a server certificate for `localhost` / `127.0.0.1` signed by it,
//!   a client certificate signed by it, and a second, unrelated CA with its own client
//!   certificate (for "untrusted" cases). PEM files in a temp dir removed on drop.
//! * [`client_config`] / [`TlsRaw`]: a tokio-rustls client for byte-exact RESP.
//! * [`Stunnel::start`]: TLS on a free 127.0.0.1 port, forwarded to a plain backend port.
//!   Dropped → killed.
#![allow(dead_code)]

use bytes::BytesMut;
use cachefront::protocol::FrameScanner;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::services::free_port;

/// PEM files of a test PKI.
pub struct Pki {
    dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing the server uses.
    pub other_ca: PathBuf,
    /// A client certificate signed by `other_ca`.
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
}

fn ca(name: &str) -> (rcgen::Certificate, Issuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("ca key");
    let cert = params.self_signed(&key).expect("self-signed ca");
    (cert, Issuer::new(params, key))
}

fn leaf(
    name: &str,
    sans: Vec<SanType>,
    usage: ExtendedKeyUsagePurpose,
    issuer: &Issuer<'static, KeyPair>,
) -> (String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("leaf params");
    params.subject_alt_names = sans;
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let key = KeyPair::generate().expect("leaf key");
    let cert = params.signed_by(&key, issuer).expect("sign leaf");
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    pub fn generate() -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("cachefront-test-pki-")
            .tempdir()
            .expect("pki temp dir");
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).expect("write pem");
            p
        };
        let (ca_cert, issuer) = ca("cachefront test CA");
        let (server_cert, server_key) = leaf(
            "localhost",
            vec![
                SanType::DnsName("localhost".try_into().expect("dns name")),
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ],
            ExtendedKeyUsagePurpose::ServerAuth,
            &issuer,
        );
        let (client_cert, client_key) = leaf(
            "test client",
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            &issuer,
        );
        let (other_cert, other_issuer) = ca("some other CA");
        let (other_client_cert, other_client_key) = leaf(
            "stranger",
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            &other_issuer,
        );
        Pki {
            ca: write("ca.pem", &ca_cert.pem()),
            server_cert: write("server.pem", &server_cert),
            server_key: write("server.key", &server_key),
            client_cert: write("client.pem", &client_cert),
            client_key: write("client.key", &client_key),
            other_ca: write("other-ca.pem", &other_cert.pem()),
            other_client_cert: write("other-client.pem", &other_client_cert),
            other_client_key: write("other-client.key", &other_client_key),
            dir,
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

/// A rustls client trusting the CA in `ca`, presenting `cert` (certificate, key) if given.
pub fn client_config(ca: &Path, cert: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
    let roots = cachefront::tls::load_roots("test ca", path_str(ca)).expect("load test ca");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let config = match cert {
        Some((c, k)) => builder
            .with_client_auth_cert(
                cachefront::tls::load_certs("cert", path_str(c)).expect("client cert"),
                cachefront::tls::load_key("key", path_str(k)).expect("client key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

pub type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

/// Connects with TLS to 127.0.0.1:`port`, expecting the certificate to name `server_name`.
pub async fn connect_tls(
    port: u16,
    server_name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<ClientTls> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
        .map_err(std::io::Error::other)?;
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// A raw RESP connection over any stream (TLS here): send exact bytes, read exact frames.
pub struct TlsRaw<S> {
    pub stream: S,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> TlsRaw<S> {
    pub fn new(stream: S) -> TlsRaw<S> {
        TlsRaw {
            stream,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    pub async fn cmd(&mut self, args: &[&[u8]]) -> std::io::Result<()> {
        let raw = cachefront::protocol::Request::from_args(args.iter().copied()).raw;
        self.send(&raw).await
    }

    /// Reads one complete frame (5 s timeout); an error if the connection ends first.
    pub async fn try_frame(&mut self) -> std::io::Result<String> {
        let mut scanner = FrameScanner::default();
        loop {
            if let Some(n) = scanner
                .scan(&self.buf)
                .map_err(|e| std::io::Error::other(e.to_string()))?
            {
                return Ok(String::from_utf8_lossy(&self.buf.split_to(n)).into_owned());
            }
            let n =
                tokio::time::timeout(Duration::from_secs(5), self.stream.read_buf(&mut self.buf))
                    .await
                    .map_err(|_| std::io::Error::other("no reply within 5 s"))??;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed",
                ));
            }
        }
    }

    pub async fn frame(&mut self) -> String {
        self.try_frame().await.expect("reply")
    }

    pub async fn call(&mut self, args: &[&[u8]]) -> String {
        self.cmd(args).await.expect("send");
        self.frame().await
    }

    /// Sends a command and reads its reply, as one fallible step.
    pub async fn try_call(&mut self, args: &[&[u8]]) -> std::io::Result<String> {
        self.cmd(args).await?;
        self.try_frame().await
    }
}

/// `stunnel4` or `stunnel` on PATH.
pub fn stunnel_bin() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in ["stunnel4", "stunnel"] {
        if let Some(p) = std::env::split_paths(&path)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
        {
            return p;
        }
    }
    panic!("stunnel not found: run scripts/deps.sh (it installs Debian's stunnel4)")
}

/// stunnel serving TLS (the PKI's server certificate) on a free 127.0.0.1 port, forwarding
/// each connection to 127.0.0.1:`backend`. Dropped → killed.
pub struct Stunnel {
    port: u16,
    child: Child,
    log: PathBuf,
}

impl Stunnel {
    pub fn start(pki: &Pki, backend: u16) -> Stunnel {
        Stunnel::start_with(pki, backend, "")
    }

    /// Like [`start`](Self::start), and requiring a client certificate signed by the PKI's CA
    /// (mutual TLS).
    pub fn start_mtls(pki: &Pki, backend: u16) -> Stunnel {
        let extra = format!(
            "verifyChain = yes\nrequireCert = yes\nCAfile = {}\n",
            pki.ca.display()
        );
        Stunnel::start_with(pki, backend, &extra)
    }

    fn start_with(pki: &Pki, backend: u16, extra: &str) -> Stunnel {
        let mut last = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let conf = pki.dir().join(format!("stunnel-{port}-{attempt}.conf"));
            let log = pki.dir().join(format!("stunnel-{port}-{attempt}.log"));
            std::fs::write(
                &conf,
                format!(
                    "foreground = yes\npid =\noutput = {log}\ndebug = 5\n\n[valkey]\n\
                     accept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{backend}\n\
                     cert = {cert}\nkey = {key}\n{extra}",
                    log = log.display(),
                    cert = pki.server_cert.display(),
                    key = pki.server_key.display(),
                ),
            )
            .expect("write stunnel.conf");
            let mut cmd = Command::new(stunnel_bin());
            cmd.arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    // Gone with the test process, even if it is killed.
                    libc::prctl(
                        libc::PR_SET_PDEATHSIG,
                        libc::SIGKILL as libc::c_ulong,
                        0,
                        0,
                        0,
                    );
                    Ok(())
                });
            }
            let mut child = cmd.spawn().expect("spawn stunnel");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!(
                        "stunnel exited ({status}): {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                    break;
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Stunnel { port, child, log };
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    last = "stunnel did not listen within 10 s".into();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("stunnel did not start: {last}");
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `rediss://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Stunnel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
