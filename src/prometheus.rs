//! The metrics listener (`metrics.listen`, off by default): a small HTTP/1.1 server, one
//! request per connection, with three routes — `GET /metrics` (the Prometheus exposition),
//! `GET /` (the status page: static HTML whose inline script draws what `/status.json` says)
//! and `GET /status.json`. What the routes show is rendered by the server and handed in, so
//! this module needs to know nothing above it.

use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Longest request head accepted; anything larger is refused.
const MAX_HEAD: usize = 8 * 1024;

/// The Prometheus exposition text, rendered at each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The status page's figures as JSON, rendered at each poll (it may ask Valkey whether it
/// is up, hence a future).
pub type RenderJson = Arc<dyn Fn() -> BoxFuture<'static, String> + Send + Sync>;

/// What the listener serves.
#[derive(Clone)]
pub struct Endpoints {
    pub metrics: Render,
    pub status: RenderJson,
}

/// The status page's parts: static, no external asset, so it works with no network. The
/// script fills the page with `textContent` only (never as HTML), so a query text holding `<`
/// shows as text.
const PAGE_HEAD: &str = include_str!("status_page/head.html");
const PAGE_STYLE: &str = include_str!("status_page/page.css");
const PAGE_BODY: &str = include_str!("status_page/body.html");
const PAGE_SCRIPT: &str = include_str!("status_page/page.js");

/// The status page and its `Content-Security-Policy`, built once: the policy allows exactly
/// the page's own inline style and script (by their SHA-256) and fetches from its own origin,
/// nothing else (no external script, style, image, font, frame or form target).
fn page() -> &'static (String, String) {
    static PAGE: OnceLock<(String, String)> = OnceLock::new();
    PAGE.get_or_init(|| {
        let html = format!(
            "{PAGE_HEAD}<style>{PAGE_STYLE}</style>\n</head>\n{PAGE_BODY}<script>{PAGE_SCRIPT}</script>\n</body>\n</html>\n"
        );
        let csp = format!(
            "default-src 'none'; script-src '{}'; style-src '{}'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            csp_hash(PAGE_SCRIPT),
            csp_hash(PAGE_STYLE)
        );
        (html, csp)
    })
}

/// A CSP source of an inline element's exact text: `sha256-<base64 of its SHA-256>`.
fn csp_hash(text: &str) -> String {
    format!("sha256-{}", base64(&Sha256::digest(text.as_bytes())))
}

/// Standard base64 with padding (only the CSP hashes need it).
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Serves the endpoints until the task is dropped.
pub async fn serve(listener: TcpListener, endpoints: Endpoints) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let endpoints = endpoints.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &endpoints)).await;
        });
    }
}

/// One response: status line, content type, extra headers, body.
struct Response {
    status: &'static str,
    content_type: &'static str,
    headers: String,
    body: String,
}

/// The route a request line asks for (`GET <path> …`), query string ignored.
fn route(line: &[u8]) -> Option<&[u8]> {
    let rest = line.strip_prefix(b"GET ")?;
    let path = rest.split(|&b| b == b' ').next().unwrap_or_default();
    Some(path.split(|&b| b == b'?').next().unwrap_or_default())
}

async fn respond(line: &[u8], endpoints: &Endpoints) -> Response {
    let text = |status, body: String| Response {
        status,
        content_type: "text/plain; version=0.0.4; charset=utf-8",
        headers: String::new(),
        body,
    };
    match route(line) {
        Some(b"/metrics") => text("200 OK", (endpoints.metrics)()),
        Some(b"/status.json") => Response {
            status: "200 OK",
            content_type: "application/json",
            headers: "Cache-Control: no-store\r\n".into(),
            body: (endpoints.status)().await,
        },
        Some(b"/") => {
            let (html, csp) = page();
            Response {
                status: "200 OK",
                content_type: "text/html; charset=utf-8",
                headers: format!(
                    "Content-Security-Policy: {csp}\r\nX-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n"
                ),
                body: html.clone(),
            }
        }
        _ => text(
            "404 Not Found",
            "not found: try /metrics, /status.json or /\n".to_string(),
        ),
    }
}

async fn answer(mut stream: TcpStream, endpoints: &Endpoints) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() + n > MAX_HEAD {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let r = respond(line, endpoints).await;
    let response = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\n{}Content-Length: {}\r\nConnection: close\r\n\r\n{}",
        r.status,
        r.content_type,
        r.headers,
        r.body.len(),
        r.body
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn routes_ignore_the_query_string() {
        assert_eq!(route(b"GET /metrics HTTP/1.1"), Some(&b"/metrics"[..]));
        assert_eq!(route(b"GET /?x=1 HTTP/1.1"), Some(&b"/"[..]));
        assert_eq!(route(b"POST / HTTP/1.1"), None);
    }
}
