//! TLS with rustls (ring provider): the client-facing TLS listener (`[tls]`, optionally
//! requiring client certificates) and TLS to an upstream Valkey (`valkey.url = "rediss://…"`).
//!
//! [`Stream`] lets the rest of the code hold a plain TCP stream or a TLS one without boxing
//! trait objects: a plain connection stays a bare `TcpStream`. Writers over a [`Stream`] must
//! `flush` after `write_all`: rustls may keep the last records buffered until then.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::{Config, ConfigError, TlsConfig, ValkeyConfig, ValkeyUrl};

/// A client connection: plain TCP, or TLS over TCP.
pub type ClientStream = Stream<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>;

/// A connection to the upstream Valkey: plain TCP, or TLS over TCP.
pub type UpstreamStream = Stream<TcpStream, Box<tokio_rustls::client::TlsStream<TcpStream>>>;

/// Either of two streams; reads and writes go straight to the one held.
#[derive(Debug)]
pub enum Stream<P, T> {
    Plain(P),
    Tls(T),
}

impl<P, T> Stream<P, T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }
}

impl<P: AsyncRead + Unpin, T: AsyncRead + Unpin> AsyncRead for Stream<P, T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<P: AsyncWrite + Unpin, T: AsyncWrite + Unpin> AsyncWrite for Stream<P, T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// The crypto provider every TLS configuration here uses.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes ring the process-wide default provider, for the TLS configurations the `redis`
/// crate builds itself. Harmless when called again.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The TLS files the configuration names can be read and parsed — the listener's certificate,
/// key and CA, and for TLS to Valkey the CA and the client certificate and key — so a bad file
/// stops the start, and
/// `--check-config`, with the key named. (`Config::validate` has checked the settings.)
pub fn check_config(config: &Config) -> Result<(), ConfigError> {
    if config.tls.enabled() {
        server_config(&config.tls)?;
    }
    let valkey = &config.valkey;
    match ValkeyUrl::parse(&valkey.url) {
        // Everything a connection to Valkey will use: the CA, the client certificate and its
        // key, and whether they fit.
        Ok(url) if url.tls => {
            UpstreamTls::new(&url.host, valkey, url.insecure || valkey.tls_insecure).map(drop)
        }
        _ => Ok(()),
    }
}

fn invalid(key: &str, msg: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        msg: msg.into(),
    }
}

fn read_file(key: &str, path: &str) -> Result<Vec<u8>, ConfigError> {
    if path.is_empty() {
        return Err(invalid(key, "must be set"));
    }
    std::fs::read(path).map_err(|e| invalid(key, format!("cannot read {path}: {e}")))
}

/// Every certificate in a PEM file (at least one).
pub fn load_certs(key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let pem = read_file(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key, format!("{path}: not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(invalid(
            key,
            format!("{path}: no certificate (expected PEM \"BEGIN CERTIFICATE\")"),
        ));
    }
    Ok(certs)
}

/// The private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(key: &str, path: &str) -> Result<PrivateKeyDer<'static>, ConfigError> {
    let pem = read_file(key, path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| invalid(key, format!("{path}: no usable PEM private key ({e})")))
}

/// A trust store of the CA certificates in a PEM file.
pub fn load_roots(key: &str, path: &str) -> Result<RootCertStore, ConfigError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(key, path)? {
        roots
            .add(cert)
            .map_err(|e| invalid(key, format!("{path}: not a usable CA certificate ({e})")))?;
    }
    Ok(roots)
}

/// The listener's rustls configuration from `[tls]`: certificate chain and key, and with
/// `ca_file` client certificates signed by that CA (required with `require_client_cert`,
/// otherwise optional but verified when presented).
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, ConfigError> {
    let certs = load_certs("tls.cert_file", &cfg.cert_file)?;
    let key = load_key("tls.key_file", &cfg.key_file)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| invalid("tls", e.to_string()))?;
    let builder = if cfg.ca_file.is_empty() {
        if cfg.require_client_cert {
            return Err(invalid(
                "tls.require_client_cert",
                "needs tls.ca_file (the CA that signs client certificates)",
            ));
        }
        builder.with_no_client_auth()
    } else {
        let roots = Arc::new(load_roots("tls.ca_file", &cfg.ca_file)?);
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider());
        let verifier = if cfg.require_client_cert {
            verifier
        } else {
            verifier.allow_unauthenticated()
        };
        let verifier = verifier
            .build()
            .map_err(|e| invalid("tls.ca_file", e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let config = builder
        .with_single_cert(certs, key)
        .map_err(|e| invalid("tls.key_file", format!("does not fit tls.cert_file: {e}")))?;
    Ok(Arc::new(config))
}

/// TLS towards the upstream Valkey: a connector and the name its certificate must carry.
#[derive(Clone)]
pub struct UpstreamTls {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: ServerName<'static>,
    pub insecure: bool,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl UpstreamTls {
    /// For `host` (from `valkey.url`; also sent as SNI unless it is an IP address): trust the
    /// CAs in `valkey.tls_ca_file`, or the system's when it is empty; or nothing at all when
    /// `insecure`. Presents `valkey.tls_cert_file` when set (mutual TLS).
    pub fn new(
        host: &str,
        valkey: &ValkeyConfig,
        insecure: bool,
    ) -> Result<UpstreamTls, ConfigError> {
        let ca_file = valkey.tls_ca_file.as_str();
        let server_name = ServerName::try_from(host.to_string()).map_err(|e| {
            invalid(
                "valkey.url",
                format!("'{host}' is not a TLS server name ({e})"),
            )
        })?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid("valkey.url", e.to_string()))?;
        let builder = if insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
        } else {
            let roots = if ca_file.is_empty() {
                system_roots()?
            } else {
                load_roots("valkey.tls_ca_file", ca_file)?
            };
            builder.with_root_certificates(roots)
        };
        let config = match client_auth(valkey)? {
            Some((certs, key)) => builder.with_client_auth_cert(certs, key).map_err(|e| {
                invalid(
                    "valkey.tls_key_file",
                    format!("does not fit valkey.tls_cert_file: {e}"),
                )
            })?,
            None => builder.with_no_client_auth(),
        };
        Ok(UpstreamTls {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name,
            insecure,
        })
    }
}

impl UpstreamTls {
    /// The same trust (CA, verification on or off) for another server of a cluster: its
    /// certificate must carry `host`, the name or address the slot map (or a redirect) gave for
    /// it, which is also sent as SNI unless it is an IP address. A host that is no valid TLS
    /// name keeps the configured name (the handshake then says whether it fits).
    pub fn for_host(&self, host: &str) -> UpstreamTls {
        let server_name =
            ServerName::try_from(host.to_string()).unwrap_or_else(|_| self.server_name.clone());
        UpstreamTls {
            server_name,
            ..self.clone()
        }
    }
}

/// The certificate and key cachefront presents to Valkey (`valkey.tls_cert_file`,
/// `valkey.tls_key_file`), if set.
type ClientAuth = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

fn client_auth(valkey: &ValkeyConfig) -> Result<Option<ClientAuth>, ConfigError> {
    if valkey.tls_cert_file.is_empty() {
        return Ok(None);
    }
    let certs = load_certs("valkey.tls_cert_file", &valkey.tls_cert_file)?;
    let key = load_key("valkey.tls_key_file", &valkey.tls_key_file)?;
    Ok(Some((certs, key)))
}

/// The operating system's trusted CAs (as the `redis` crate uses them too).
fn system_roots() -> Result<RootCertStore, ConfigError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default();
        return Err(invalid(
            "valkey.tls_ca_file",
            format!("not set, and no system CA certificates could be loaded{why}"),
        ));
    }
    Ok(roots)
}

/// `valkey.tls_insecure`: accepts any certificate (signatures are still checked, so the
/// handshake itself is sound; the peer's identity is not).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
