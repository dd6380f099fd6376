//! The listeners: accept clients — plain TCP on `listen`, TLS on `tls.listen`, or both — up to
//! `limits.max_clients` in all, run a [`Connection`] for each, and shut down gracefully — stop
//! accepting, let connections finish their in-flight replies.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::command::Context;
use crate::config::{Config, ConfigError};
use crate::connection::Connection;
use crate::error::Refusal;
use crate::invalidation::Listener;
use crate::metrics::{inc, Metrics};
use crate::tls::Stream;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Setup(String),
}

/// The checks of a configuration that need the domain objects it describes: users, TLS
/// files, named queries. `Config::validate` checks the rest on the config's own data; each
/// layer checks its own part here, so config stays a leaf. Run at start, by
/// `--check-config`, and on reload.
pub fn check_config(config: &Config) -> Result<(), ConfigError> {
    config.validate()?;
    crate::tls::check_config(config)?;
    crate::acl::check_config(&config.auth)?;
    crate::command::check_queries(config)
}

/// The server's shared state: the commands' context, which it builds from the configuration
/// and reloads. Derefs to the context, so what connections see is reachable here too.
pub struct Shared {
    ctx: Arc<Context>,
}

impl std::ops::Deref for Shared {
    type Target = Context;
    fn deref(&self) -> &Context {
        &self.ctx
    }
}

impl Shared {
    /// Builds the context from a checked configuration (see [`check_config`]).
    pub fn new(config: Config) -> Result<Shared, StartError> {
        let ctx = Context::new(config).map_err(StartError::Setup)?;
        Ok(Shared { ctx: Arc::new(ctx) })
    }

    /// The context connections run with.
    pub fn context(&self) -> Arc<Context> {
        Arc::clone(&self.ctx)
    }

    /// What the invalidation listener works with.
    fn listener(&self) -> Listener {
        Listener {
            invalidation: Arc::clone(&self.ctx.invalidation),
            db: self.ctx.db.clone(),
            cache: Arc::clone(&self.ctx.cache),
        }
    }

    /// `SIGHUP`: applies a new configuration's named queries, TTLs, SQL settings and limits
    /// without touching connections. Settings that need a restart (listen addresses, Valkey,
    /// PostgreSQL, TLS, metrics, invalidation, users, L1, refresh and fill lease settings) keep their
    /// running values; their names are returned so the operator is told.
    pub fn reload(&self, new: Config) -> Result<Vec<&'static str>, String> {
        check_config(&new).map_err(|e| e.to_string())?;
        let old = self.config();
        let mut next = new;
        let mut kept = Vec::new();
        macro_rules! keep {
            ($($field:ident).+, $name:literal) => {
                if serde_json::to_value(&next.$($field).+).ok() != serde_json::to_value(&old.$($field).+).ok() {
                    kept.push($name);
                    next.$($field).+ = old.$($field).+.clone();
                }
            };
        }
        keep!(listen, "listen");
        keep!(log_format, "log_format");
        keep!(threads, "threads");
        keep!(valkey, "valkey");
        keep!(postgres, "postgres");
        keep!(auth, "auth");
        keep!(invalidation, "invalidation");
        keep!(verify, "verify");
        keep!(metrics, "metrics");
        keep!(tls, "tls");
        keep!(cache.meta_prefix, "cache.meta_prefix");
        keep!(cache.ttl_jitter, "cache.ttl_jitter");
        keep!(cache.early_refresh_beta, "cache.early_refresh_beta");
        keep!(cache.early_refresh_keys, "cache.early_refresh_keys");
        keep!(cache.l1_max_bytes, "cache.l1_max_bytes");
        keep!(cache.l1_ttl_ms, "cache.l1_ttl_ms");
        keep!(cache.stale_if_error_secs, "cache.stale_if_error_secs");
        keep!(cache.fill_lease_ms, "cache.fill_lease_ms");
        let mut named = crate::cache::named::build(&next)?;
        crate::cache::named::keep_stats(&mut named, &self.named());
        self.invalidation.set_named(&named);
        self.live.replace(next, named);
        // Statements may have changed under the same text-keyed caches: start them afresh.
        self.sql_checks.invalidate_all();
        // A named query may now fill its keys differently: the sampler re-runs only fills
        // made under the new definitions.
        self.cache.verify.clear();
        Ok(kept)
    }

    /// The Prometheus exposition: counters, gauges, histograms. Stored counters and gauges
    /// come from `metrics::DECLARED`, computed gauges from `Context::computed`.
    pub fn prometheus(&self) -> String {
        let gauges: Vec<_> = self
            .computed()
            .iter()
            .filter_map(|c| c.gauge.map(|(name, help)| (name, help, c.value as f64)))
            .collect();
        let mut out = self.metrics.prometheus(&gauges);
        if let Some(c) = &self.upstream.cluster {
            let st = c.stats();
            for (name, kind, help, v) in [
                (
                    "cluster_nodes",
                    "gauge",
                    "Primaries in the cluster's slot map",
                    st.nodes,
                ),
                (
                    "cluster_replicas",
                    "gauge",
                    "Replicas serving reads (valkey.read_from_replicas)",
                    st.replicas,
                ),
                (
                    "cluster_slots_served",
                    "gauge",
                    "Hash slots with a known primary",
                    st.slots_served,
                ),
                (
                    "cluster_moved_total",
                    "counter",
                    "MOVED redirects followed",
                    st.moved,
                ),
                (
                    "cluster_ask_total",
                    "counter",
                    "ASK redirects followed",
                    st.ask,
                ),
                (
                    "cluster_map_refreshes_total",
                    "counter",
                    "Slot map loads",
                    st.refreshes,
                ),
            ] {
                out.push_str(&format!(
                    "# HELP cachefront_{name} {help}\n# TYPE cachefront_{name} {kind}\ncachefront_{name} {v}\n"
                ));
            }
        }
        if let Some(set) = self.db.replicas() {
            out.push_str(&set.prometheus());
        }
        crate::command::queries::prometheus(self, &mut out);
        out
    }
}

pub struct Server {
    /// Plain TCP clients; `None` with `tls.only`.
    listener: Option<TcpListener>,
    tls: Option<TlsListener>,
    shared: Arc<Shared>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
    /// The threads clients are served on (see `crate::cores`).
    cores: crate::cores::Cores,
}

/// The TLS listener and what its handshakes need.
struct TlsListener {
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
}

/// How long shutdown waits for connections to finish their replies.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

async fn bind_listener(addr: &str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// The next client of `listener`; never, without one.
async fn accept_on(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Runs the server side of a TLS handshake within `limit`; a failure is logged (debug) and
/// counted, and gives `None`.
async fn handshake(
    shared: &Shared,
    acceptor: &tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    limit: Duration,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let why = match tokio::time::timeout(limit, acceptor.accept(stream)).await {
        Ok(Ok(s)) => return Some(s),
        Ok(Err(e)) => e.to_string(),
        Err(_) => format!("no handshake within {} ms", limit.as_millis()),
    };
    inc(&shared.metrics.tls_handshake_failures);
    tracing::debug!(%peer, error = %why, "TLS handshake failed");
    None
}

impl Server {
    /// Binds the listen address (port 0 picks a free port) and prepares the shared state.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        check_config(&config)?;
        crate::tls::install_default_provider();
        let listener = match config.tls.only {
            true => None,
            false => Some(bind_listener(&config.listen).await?),
        };
        let tls = match config.tls.enabled() {
            false => None,
            true => {
                let server_config = crate::tls::server_config(&config.tls)
                    .map_err(|e| StartError::Setup(e.to_string()))?;
                Some(TlsListener {
                    listener: bind_listener(&config.tls.listen).await?,
                    acceptor: tokio_rustls::TlsAcceptor::from(server_config),
                    handshake_timeout: Duration::from_millis(config.tls.handshake_timeout_ms),
                })
            }
        };
        let metrics_listener = match config.metrics.listen.as_str() {
            "" => None,
            addr => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| StartError::Listen {
                        addr: addr.to_string(),
                        source,
                    })?,
            ),
        };
        let cores = crate::cores::Cores::start(crate::cores::count(config.threads))
            .map_err(|e| StartError::Setup(format!("cannot start the client threads: {e}")))?;
        let shared = Arc::new(Shared::new(config)?);
        shared.upstream.warm_up();
        for core in cores.handles() {
            let s = Arc::clone(&shared);
            core.spawn(async move { s.upstream.warm_up() });
        }
        // Briefly: learn Valkey's version for HELLO; a Valkey that is down does not hold us up.
        let until = tokio::time::Instant::now() + Duration::from_secs(1);
        while shared.upstream.server_version().is_empty() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if shared.users.any_restricted() {
            // Permission checks need Valkey's command table; fetch it now, not at first need.
            let s = Arc::clone(&shared);
            tokio::spawn(async move {
                if let Err(e) = s.upstream.command_table().await {
                    tracing::warn!(error = %e, "cannot load Valkey's command table yet; will retry at first need");
                }
            });
        }
        let metrics_task = metrics_listener.map(|l| {
            let s = Arc::clone(&shared);
            let metrics: crate::prometheus::Render = Arc::new(move || s.prometheus());
            let ctx = shared.context();
            let status: crate::prometheus::RenderJson = Arc::new(move || {
                let ctx = Arc::clone(&ctx);
                Box::pin(async move { crate::command::status::status_json(&ctx).await })
            });
            let endpoints = crate::prometheus::Endpoints { metrics, status };
            tokio::spawn(crate::prometheus::serve(l, endpoints))
        });
        Ok(Server {
            listener,
            tls,
            shared,
            metrics_task,
            cores,
        })
    }

    /// How many threads serve clients (the config's `threads`, see `crate::cores::count`).
    pub fn threads(&self) -> usize {
        self.cores.len()
    }

    /// The plain TCP address; with `tls.only`, the TLS one.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .as_ref()
            .or(self.tls.as_ref().map(|t| &t.listener))
            .and_then(|l| l.local_addr().ok())
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    /// The TLS listener's address, if there is one.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|t| t.listener.local_addr().ok())
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Protected mode: without a password, a client from outside loopback gets Valkey's
    /// DENIED reply and nothing else.
    fn refuse(&self, peer: SocketAddr) -> Option<Refusal> {
        let config = self.shared.config();
        let auth = &config.auth;
        if !auth.protected_mode || !self.shared.users.default_authed() {
            return None;
        }
        if peer.ip().is_loopback() {
            return None;
        }
        Some(Refusal::ProtectedMode)
    }

    /// `limits.tcp_keepalive_secs`: probes after that long idle, then every third of it.
    fn keepalive(&self, stream: &TcpStream) {
        let secs = self.shared.config().limits.tcp_keepalive_secs;
        if secs == 0 {
            return;
        }
        let ka = socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(secs))
            .with_interval(Duration::from_secs((secs / 3).max(1)));
        if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
            tracing::debug!(error = %e, "cannot set TCP keepalive");
        }
    }

    /// The verification sampler (`cache::verify`), with what it needs to know of the
    /// invalidation listener.
    fn verifier(&self) -> impl Future<Output = ()> + Send + 'static {
        let config = self.shared.config();
        let ctx = self.shared.context();
        let term = self.shared.context();
        let gate = crate::cache::verify::Gate {
            tracked: config.invalidation.enabled,
            live: Box::new(move || ctx.is_listening()),
            term: Box::new(move || term.invalidation.lease().applying_term()),
            handover: self.shared.invalidation.lease().handover(),
        };
        let cache = Arc::clone(&self.shared.cache);
        crate::cache::verify::run(cache, config.verify.clone(), gate)
    }

    /// Accepts clients until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let listener_task = tokio::spawn(crate::invalidation::run(self.shared.listener()));
        let replicas_task = tokio::spawn(crate::db::replicas::run(self.shared.db.clone()));
        let verify_task = tokio::spawn(self.verifier());
        let fleet_task = self.shared.cache.start_fleet();
        if self.shared.cache.l1.enabled() {
            let l1 = Arc::clone(&self.shared.cache.l1);
            self.shared
                .upstream
                .start_tracking(Arc::new(move |ev| l1.on_tracking(ev)));
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        // Every client task, alive or in its TLS handshake: its slot is released when the task
        // ends, however it ends (a panic included), and shutdown waits on it.
        let clients = TaskTracker::new();
        let max = self.shared.config().limits.max_clients;
        tokio::pin!(shutdown);
        loop {
            let (accepted, is_tls) = tokio::select! {
                a = accept_on(self.listener.as_ref()) => (a, false),
                a = accept_on(self.tls.as_ref().map(|t| &t.listener)) => (a, true),
                _ = &mut shutdown => break,
            };
            let (stream, peer) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            stream.set_nodelay(true).ok();
            self.keepalive(&stream);
            let tls = match (&self.tls, is_tls) {
                (Some(t), true) => Some((t.acceptor.clone(), t.handshake_timeout)),
                _ => None,
            };
            let refusal = self
                .refuse(peer)
                .or_else(|| (clients.len() >= max).then_some(Refusal::MaxClients));
            if let Some(reason) = refusal.map(|r| r.frame()) {
                inc(&self.shared.metrics.rejected_connections);
                let shared = Arc::clone(&self.shared);
                tokio::spawn(async move {
                    match tls {
                        None => {
                            let mut stream = stream;
                            let _ = stream.write_all(&reason).await;
                        }
                        // The reason goes over TLS, so the handshake comes first; the whole
                        // exchange is bounded by the handshake timeout.
                        Some((acceptor, limit)) => {
                            let _ = tokio::time::timeout(limit, async {
                                let hs = handshake(&shared, &acceptor, stream, peer, limit).await;
                                if let Some(mut s) = hs {
                                    let _ = s.write_all(&reason).await;
                                    let _ = s.shutdown().await;
                                }
                            })
                            .await;
                        }
                    }
                });
                continue;
            }
            // A client in its TLS handshake holds a slot too, at most for the handshake timeout.
            let shared = Arc::clone(&self.shared);
            let stop = stop_rx.clone();
            // The client moves to its core: its socket is registered with that core's reactor.
            let stream = match stream.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot hand an accepted client to a core");
                    continue;
                }
            };
            self.cores.next().spawn(clients.track_future(async move {
                let stream = match TcpStream::from_std(stream) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot register an accepted client");
                        return;
                    }
                };
                let stream = match tls {
                    None => Some(Stream::Plain(stream)),
                    // Boxed: the handshake's state is large and gone once it ends; inline, it
                    // would size every client's task, idle ones included.
                    Some((acceptor, limit)) => {
                        Box::pin(handshake(&shared, &acceptor, stream, peer, limit))
                            .await
                            .map(|s| Stream::Tls(Box::new(s)))
                    }
                };
                if let Some(stream) = stream {
                    inc(&shared.metrics.connections_total);
                    let _open = OpenClient::new(&shared.metrics);
                    Box::new(Connection::new(shared.context(), stream, Some(peer), stop))
                        .run()
                        .await;
                }
            }));
        }
        drop(self.listener);
        drop(self.tls);
        let _ = stop_tx.send(true);
        clients.close();
        let _ = tokio::time::timeout(DRAIN_DEADLINE, clients.wait()).await;
        listener_task.abort();
        // Another instance takes over at once, not when the lease expires.
        self.shared
            .invalidation
            .lease()
            .release(&self.shared.cache.store)
            .await;
        replicas_task.abort();
        verify_task.abort();
        if let Some(t) = fleet_task {
            t.abort();
        }
        // Its records hold the commands' context, which holds the cache that holds them.
        self.shared.cache.verify.clear();
        if let Some(t) = &self.metrics_task {
            t.abort();
        }
        tracing::info!(remaining = clients.len(), "shut down");
    }
}

/// One open client in `connections_current`, for as long as it lives: counted down on drop,
/// so a connection task that panics cannot leave the gauge (or anything read from it) high.
struct OpenClient(Arc<Metrics>);

impl OpenClient {
    fn new(metrics: &Arc<Metrics>) -> OpenClient {
        inc(&metrics.connections_current);
        OpenClient(Arc::clone(metrics))
    }
}

impl Drop for OpenClient {
    fn drop(&mut self) {
        self.0.connections_current.sub(1);
    }
}

/// A server running in the background (tests, embedding): its address, and a handle that
/// shuts it down when dropped.
pub struct Running {
    /// The plain TCP address (with `tls.only`, the TLS one).
    pub addr: SocketAddr,
    /// The TLS listener's address, if there is one.
    pub tls_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Shuts down as a crash would leave Valkey: the invalidation lease is not released, so
    /// another instance takes over only when it expires (for tests of the takeover).
    pub async fn crash(self) {
        self.shared.invalidation.lease().abandon();
        self.shutdown().await
    }

    /// Shuts down gracefully and waits for the drain.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Binds and runs a server on the current runtime.
pub async fn spawn(config: Config) -> Result<Running, StartError> {
    let server = Server::bind(config).await?;
    let addr = server.local_addr();
    let tls_addr = server.tls_addr();
    let shared = server.shared();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Ok(Running {
        addr,
        tls_addr,
        shared,
        stop: Some(stop),
        task: Some(task),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses, then runs every check, as the binary does at start.
    fn checked(text: &str) -> Result<Config, ConfigError> {
        let c = Config::from_toml_with_env(text, Vec::new())?;
        check_config(&c).map(|()| c)
    }

    #[test]
    fn named_queries_are_validated() {
        let bad = r#"
[[query]]
command = "X.GET"
sql = "SELECT name FROM employees WHERE id = $2"
key = "x:{1}"
args = ["int"]
"#;
        let e = checked(bad).unwrap_err().to_string();
        assert!(e.contains("query[0] (X.GET)"), "{e}");
        let write = bad.replace(
            "SELECT name FROM employees WHERE id = $2",
            "DELETE FROM employees WHERE id = $1",
        );
        assert!(checked(&write).is_err());
        let shadow = bad.replace("$2", "$1").replace("X.GET", "GET");
        let e = checked(&shadow).unwrap_err().to_string();
        assert!(e.contains("namespaced"), "{e}");
        let own = bad.replace("$2", "$1").replace("X.GET", "SQL.CACHED");
        let e = checked(&own).unwrap_err().to_string();
        assert!(e.contains("is a built-in command"), "{e}");
        let key = bad.replace("$2", "$1").replace("x:{1}", "x:{3}");
        let e = checked(&key).unwrap_err().to_string();
        assert!(e.contains("key"), "{e}");
        assert!(checked(&bad.replace("$2", "$1")).is_ok());
    }
}
