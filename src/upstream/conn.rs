//! One raw connection to Valkey (TCP, or TLS over TCP for `rediss://`), set up for a client
//! protocol version.

use bytes::{Bytes, BytesMut};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::{ValkeyConfig, ValkeyUrl};
use crate::error::{Error, Result};
use crate::protocol::request::encode_multibulk;
use crate::protocol::value::{decode, Value};
use crate::protocol::{FrameScanner, Proto};
use crate::tls::{Stream, UpstreamStream, UpstreamTls};

/// Where the upstream Valkey is and how to log in to it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub addr: String,
    pub username: Option<String>,
    pub password: Option<String>,
    pub db: i64,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    /// TLS settings, for a `rediss://` URL.
    pub tls: Option<UpstreamTls>,
    /// A cluster replica serving reads: the handshake sends `READONLY`, so the replica answers
    /// reads of its primary's slots instead of redirecting them.
    pub readonly: bool,
}

impl Endpoint {
    /// The same login, timeouts and TLS trust at another node of a cluster; with TLS, that
    /// node's certificate must name the host in `addr` (see [`UpstreamTls::for_host`]).
    pub fn at(&self, addr: &str) -> Endpoint {
        Endpoint {
            addr: addr.to_string(),
            tls: self.tls.as_ref().map(|t| t.for_host(host_of(addr))),
            readonly: false,
            ..self.clone()
        }
    }

    /// [`at`](Self::at) a replica, for reads (`READONLY` in the handshake).
    pub fn replica_at(&self, addr: &str) -> Endpoint {
        Endpoint {
            readonly: true,
            ..self.at(addr)
        }
    }

    /// Where `valkey.url` points, with its login, the timeouts and TLS settings.
    pub fn from_config(cfg: &ValkeyConfig) -> Result<Endpoint> {
        let url =
            ValkeyUrl::parse(&cfg.url).map_err(|e| Error::client(format!("valkey.url: {e}")))?;
        let tls = match url.tls {
            true => Some(
                UpstreamTls::new(&url.host, cfg, url.insecure || cfg.tls_insecure)
                    .map_err(|e| Error::client(e.to_string()))?,
            ),
            false => None,
        };
        Ok(Endpoint {
            addr: url.addr(),
            username: url.username,
            password: url.password,
            db: url.db,
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            command_timeout: Duration::from_millis(cfg.command_timeout_ms),
            tls,
            readonly: false,
        })
    }
}

/// The host of `host:port` (an IPv6 address without its brackets).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// A connection after the handshake.
pub struct RawConn {
    pub stream: UpstreamStream,
    /// Bytes read past the handshake replies (normally none).
    pub rbuf: BytesMut,
    pub scanner: FrameScanner,
    pub proto: Proto,
    /// Valkey's own id for this connection (from HELLO), for `CLIENT TRACKING … REDIRECT`.
    pub upstream_id: i64,
    /// Valkey's version (from HELLO).
    pub server_version: String,
    /// The node's `host:port` (a cluster's dedicated connections serve one node's slots).
    pub addr: String,
}

impl RawConn {
    /// Reads until one complete frame is buffered and returns it.
    pub async fn read_frame(&mut self) -> Result<Bytes> {
        loop {
            if let Some(n) = self
                .scanner
                .scan(&self.rbuf)
                .map_err(|e| Error::upstream(e.to_string()))?
            {
                return Ok(self.rbuf.split_to(n).freeze());
            }
            let read = self
                .stream
                .read_buf(&mut self.rbuf)
                .await
                .map_err(|e| Error::upstream(format!("connection to Valkey lost: {e}")))?;
            if read == 0 {
                return Err(Error::upstream("connection to Valkey closed"));
            }
        }
    }

    /// Takes the next complete frame already buffered, if any.
    pub fn next_buffered(&mut self) -> Result<Option<Bytes>> {
        match self.scanner.scan(&self.rbuf) {
            Ok(Some(n)) => Ok(Some(self.rbuf.split_to(n).freeze())),
            Ok(None) => Ok(None),
            Err(e) => Err(Error::upstream(e.to_string())),
        }
    }

    /// True if the peer has closed (checked without blocking) — for idle connections before reuse.
    pub fn is_closed(&mut self) -> bool {
        let mut probe = [0u8; 1];
        match &mut self.stream {
            Stream::Plain(s) => match s.try_read(&mut probe) {
                Ok(0) => true,
                Ok(_) => true, // unsolicited bytes on an idle connection: don't trust it
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            },
            // TLS: one poll of a read that must not complete. Records that carry no data
            // (session tickets, key updates) are consumed by rustls and leave it pending; a
            // close_notify, EOF or error completes it.
            Stream::Tls(s) => {
                let mut buf = tokio::io::ReadBuf::new(&mut probe);
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                std::pin::Pin::new(s.as_mut())
                    .poll_read(&mut cx, &mut buf)
                    .is_ready()
            }
        }
    }

    /// Writes all of `buf` and flushes it (TLS keeps records buffered until a flush).
    pub async fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(buf).await?;
        self.stream.flush().await
    }
}

/// Opens a connection and runs the handshake: `HELLO <proto> [AUTH …]`, then `SELECT` if the URL
/// names a database. Everything within the connect timeout.
pub async fn connect(ep: &Endpoint, proto: Proto) -> Result<RawConn> {
    tokio::time::timeout(
        ep.connect_timeout + ep.command_timeout,
        connect_inner(ep, proto),
    )
    .await
    .map_err(|_| Error::upstream(format!("timed out connecting to Valkey at {}", ep.addr)))?
}

async fn connect_inner(ep: &Endpoint, proto: Proto) -> Result<RawConn> {
    let stream = tokio::time::timeout(ep.connect_timeout, TcpStream::connect(&ep.addr))
        .await
        .map_err(|_| Error::upstream(format!("timed out connecting to Valkey at {}", ep.addr)))?
        .map_err(|e| Error::upstream(format!("cannot connect to Valkey at {}: {e}", ep.addr)))?;
    stream.set_nodelay(true).ok();
    let stream = match &ep.tls {
        None => Stream::Plain(stream),
        Some(tls) => Stream::Tls(Box::new(
            tls.connector
                .connect(tls.server_name.clone(), stream)
                .await
                .map_err(|e| {
                    Error::upstream(format!(
                        "TLS handshake with Valkey at {} failed: {e}",
                        ep.addr
                    ))
                })?,
        )),
    };
    let mut conn = RawConn {
        stream,
        rbuf: BytesMut::with_capacity(16 * 1024),
        scanner: FrameScanner::default(),
        proto,
        upstream_id: 0,
        server_version: String::new(),
        addr: ep.addr.clone(),
    };
    conn.write_all(&handshake(ep, proto))
        .await
        .map_err(|e| Error::upstream(format!("cannot write to Valkey: {e}")))?;
    read_handshake(&mut conn, ep).await?;
    Ok(conn)
}

/// `HELLO <proto> [AUTH …]`, then `SELECT` if the URL names a database, and `READONLY` for a
/// replica serving reads: what puts a fresh (or just `RESET`) connection into the state
/// cachefront expects.
fn handshake(ep: &Endpoint, proto: Proto) -> BytesMut {
    let mut hello: Vec<Bytes> = vec![
        Bytes::from_static(b"HELLO"),
        Bytes::from(proto.number().to_string()),
    ];
    if let Some(pw) = &ep.password {
        hello.push(Bytes::from_static(b"AUTH"));
        hello.push(Bytes::from(
            ep.username.clone().unwrap_or_else(|| "default".into()),
        ));
        hello.push(Bytes::from(pw.clone()));
    }
    let mut out = BytesMut::new();
    out.extend_from_slice(&encode_multibulk(&hello));
    if ep.db != 0 {
        out.extend_from_slice(&encode_multibulk(&[
            Bytes::from_static(b"SELECT"),
            Bytes::from(ep.db.to_string()),
        ]));
    }
    if ep.readonly {
        out.extend_from_slice(b"*1\r\n$8\r\nREADONLY\r\n");
    }
    out
}

/// Reads the replies to [`handshake`], failing on any refusal.
async fn read_handshake(conn: &mut RawConn, ep: &Endpoint) -> Result<()> {
    let hello_reply = conn.read_frame().await?;
    let (id, version) = parse_hello(&hello_reply)?;
    conn.upstream_id = id;
    conn.server_version = version;
    if ep.db != 0 {
        let r = conn.read_frame().await?;
        if r.first() == Some(&b'-') {
            return Err(Error::upstream(format!(
                "SELECT {} refused by Valkey: {}",
                ep.db,
                String::from_utf8_lossy(&r).trim()
            )));
        }
    }
    if ep.readonly {
        let r = conn.read_frame().await?;
        if r.first() == Some(&b'-') {
            return Err(Error::upstream(format!(
                "READONLY refused by the replica at {}: {}",
                ep.addr,
                String::from_utf8_lossy(&r).trim()
            )));
        }
    }
    Ok(())
}

/// Another Valkey user to log a dedicated connection in as, and the command that creates or
/// updates that user (sent once per node, before the first login there).
pub struct Login<'a> {
    pub user: &'a str,
    pub password: &'a str,
    pub setup: &'a [Bytes],
}

/// Logs `conn` in as `login.user`, first running `login.setup` if `setup` says so. The
/// connection's replies are read before this returns, so nothing the client sends can run
/// before the login took effect.
pub async fn log_in(
    conn: &mut RawConn,
    login: &Login<'_>,
    setup: bool,
    ep: &Endpoint,
) -> Result<()> {
    let mut out = BytesMut::new();
    if setup {
        out.extend_from_slice(&encode_multibulk(login.setup));
    }
    out.extend_from_slice(&encode_multibulk(&[
        Bytes::from_static(b"AUTH"),
        Bytes::from(login.user.to_string()),
        Bytes::from(login.password.to_string()),
    ]));
    let work = async {
        conn.write_all(&out)
            .await
            .map_err(|e| Error::upstream(format!("cannot write to Valkey: {e}")))?;
        let replies = if setup { 2 } else { 1 };
        for _ in 0..replies {
            let r = conn.read_frame().await?;
            if r.first() != Some(&b'+') {
                return Err(Error::upstream(format!(
                    "Valkey refused to set up or log in as {}: {}",
                    login.user,
                    String::from_utf8_lossy(&r).trim()
                )));
            }
        }
        Ok(())
    };
    tokio::time::timeout(ep.command_timeout, work)
        .await
        .map_err(|_| Error::upstream("Valkey did not answer the login in time"))?
}

/// Most bytes of leftovers (messages, pushes already on their way) skipped before `+RESET`.
const RESET_SKIP_LIMIT: usize = 4 * 1024 * 1024;

/// Returns a dedicated connection to the state of a fresh one before anyone else may use it:
/// `RESET` (Valkey drops MULTI, WATCH, subscriptions, tracking, CLIENT REPLY mode, the selected
/// database, the name, the login and the protocol), the handshake again, and an `ECHO` of a
/// random token. Whatever the last client left on the connection, it is clean afterwards; the
/// token proves every reply of the sequence was read — none can be left for the next user.
/// Any surprise is an error, and the caller closes the connection.
pub async fn reset(conn: &mut RawConn, ep: &Endpoint) -> Result<()> {
    tokio::time::timeout(ep.command_timeout, reset_inner(conn, ep))
        .await
        .map_err(|_| Error::upstream("Valkey did not answer RESET in time"))?
}

async fn reset_inner(conn: &mut RawConn, ep: &Endpoint) -> Result<()> {
    let token = format!("cachefront-reset-{:016x}", rand::random::<u64>());
    let mut out = BytesMut::from(&b"*1\r\n$5\r\nRESET\r\n"[..]);
    out.extend_from_slice(&handshake(ep, conn.proto));
    out.extend_from_slice(&encode_multibulk(&[
        Bytes::from_static(b"ECHO"),
        Bytes::from(token.clone()),
    ]));
    conn.write_all(&out)
        .await
        .map_err(|e| Error::upstream(format!("cannot write to Valkey: {e}")))?;
    let mut skipped = 0usize;
    loop {
        let frame = conn.read_frame().await?;
        if &frame[..] == b"+RESET\r\n" {
            break;
        }
        skipped += frame.len();
        if skipped > RESET_SKIP_LIMIT {
            return Err(Error::upstream("too much unread data before RESET"));
        }
    }
    read_handshake(conn, ep).await?;
    let echoed = conn.read_frame().await?;
    let expected = format!("${}\r\n{token}\r\n", token.len());
    if echoed[..] != *expected.as_bytes() || !conn.rbuf.is_empty() {
        return Err(Error::upstream(
            "unexpected reply while resetting a connection",
        ));
    }
    Ok(())
}

/// Pulls `id` and `version` out of a HELLO reply (a map in RESP3, a flat array in RESP2).
fn parse_hello(frame: &[u8]) -> Result<(i64, String)> {
    if frame.first() == Some(&b'-') {
        return Err(Error::upstream(format!(
            "Valkey refused the handshake: {}",
            String::from_utf8_lossy(&frame[1..]).trim()
        )));
    }
    let text = |v: &Value| match v {
        Value::Int(n) => n.to_string(),
        v => String::from_utf8_lossy(v.bytes().unwrap_or_default()).into_owned(),
    };
    let pairs: Vec<(String, String)> = match decode(frame) {
        Some(Value::Map(m)) => m.iter().map(|(k, v)| (text(k), text(v))).collect(),
        Some(Value::Array(items)) => items
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (text(&c[0]), text(&c[1])))
            .collect(),
        _ => Vec::new(),
    };
    if pairs.is_empty() {
        return Err(Error::upstream(format!(
            "unexpected HELLO reply from Valkey: {}",
            String::from_utf8_lossy(&frame[..frame.len().min(64)]).trim()
        )));
    }
    let get = |k: &str| pairs.iter().find(|(a, _)| a == k).map(|(_, b)| b.clone());
    let id = get("id").and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((id, get("version").unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each node of a cluster is checked for its own name, with the same trust settings.
    #[test]
    fn every_node_is_checked_for_its_own_name() {
        let cfg = ValkeyConfig {
            url: "rediss://seed.example:6380".into(),
            tls_insecure: true,
            ..ValkeyConfig::default()
        };
        let base = Endpoint::from_config(&cfg).unwrap();
        let name = |ep: &Endpoint| {
            let tls = ep.tls.as_ref().unwrap();
            assert!(tls.insecure, "trust settings carried over");
            format!("{:?}", tls.server_name)
        };
        assert!(name(&base).contains("seed.example"), "{}", name(&base));
        let node = base.at("node-2.example:6380");
        assert!(name(&node).contains("node-2.example"), "{}", name(&node));
        assert!(!node.readonly);
        let ip = base.replica_at("10.0.0.3:6380");
        assert!(name(&ip).contains("[10, 0, 0, 3]"), "{}", name(&ip));
        assert!(ip.readonly);
        let v6 = base.at("[::1]:6380");
        assert!(name(&v6).starts_with("IpAddress(V6"), "{}", name(&v6));
        // Without TLS nothing changes but the address.
        let plain = Endpoint::from_config(&ValkeyConfig::default()).unwrap();
        assert!(plain.at("h:1").tls.is_none());
    }
}
