//! The listener: accepts clients up to `limits.max_clients`, runs a [`Connection`] for each, and
//! shuts down gracefully — stop accepting, let connections finish their in-flight replies.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::cache::store::Store;
use crate::cache::Cache;
use crate::command::named_query::NamedQuery;
use crate::config::Config;
use crate::connection::Connection;
use crate::db::Db;
use crate::invalidation::Invalidation;
use crate::metrics::{inc, Metrics};
use crate::protocol::Limits;
use crate::upstream::Upstream;

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

/// Everything connections share.
pub struct Shared {
    pub config: Config,
    pub limits: Limits,
    pub upstream: Upstream,
    pub cache: Cache,
    pub db: Db,
    pub metrics: Arc<Metrics>,
    /// Named queries by uppercased command name.
    pub named: HashMap<String, Arc<NamedQuery>>,
    pub invalidation: Invalidation,
    /// Client users (`default` always exists).
    pub users: crate::acl::Users,
    /// Valkey's command table, for permission checks.
    pub acl: crate::acl::Acl,
    listening: watch::Sender<bool>,
    next_id: AtomicU64,
}

impl Shared {
    pub fn new(config: Config) -> Result<Shared, StartError> {
        let setup = |e: &dyn std::fmt::Display| StartError::Setup(e.to_string());
        let metrics = Arc::new(Metrics::default());
        let store = Store::new(&config.valkey, &config.cache.meta_prefix).map_err(|e| setup(&e))?;
        let mut named = HashMap::new();
        for q in config.named_queries() {
            let nq =
                NamedQuery::from_config(&q, config.cache.default_ttl, config.cache.negative_ttl)
                    .map_err(|e| StartError::Setup(format!("query {}: {e}", q.command)))?;
            named.insert(nq.name.clone(), Arc::new(nq));
        }
        let users = crate::acl::Users::from_config(&config.auth)
            .map_err(|(k, m)| StartError::Setup(format!("{k}: {m}")))?;
        Ok(Shared {
            users,
            acl: crate::acl::Acl::default(),
            limits: config.protocol_limits(),
            upstream: Upstream::new(&config.valkey).map_err(|e| setup(&e))?,
            cache: Cache::new(store, Arc::clone(&metrics), &config.cache),
            invalidation: Invalidation::new(&config.invalidation, &named),
            listening: watch::Sender::new(false),
            db: Db::new(&config.postgres).map_err(|e| setup(&e))?,
            metrics,
            named,
            next_id: AtomicU64::new(1),
            config,
        })
    }

    /// Whether the invalidation listener is connected and listening.
    pub fn set_listening(&self, on: bool) {
        self.listening.send_replace(on);
    }

    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// Waits (at most `limit`) until the invalidation listener is listening, so no entry is
    /// stored while writes could go unheard — in particular not just before the listener's
    /// first flush, which would throw it away. Returns at once when invalidation is off.
    pub async fn wait_listening(&self, limit: Duration) {
        if !self.config.invalidation.enabled || self.is_listening() {
            return;
        }
        let mut rx = self.listening.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|on| *on)).await;
    }

    /// The `# Cachefront` INFO section.
    pub fn info_section(&self) -> String {
        let mut s = self
            .metrics
            .info_section(self.db.pool_status(), self.is_listening());
        let (entries, bytes) = self.cache.l1.usage();
        let tracking = u8::from(self.upstream.tracking.current().0 != 0);
        s.push_str(&format!(
            "l1_entries:{entries}\r\nl1_bytes:{bytes}\r\nl1_tracking:{tracking}\r\n"
        ));
        s
    }

    /// The Prometheus exposition: counters, gauges, histograms.
    pub fn prometheus(&self) -> String {
        let (size, available) = self.db.pool_status();
        let (entries, bytes) = self.cache.l1.usage();
        let gauges = [
            (
                "connected_clients",
                "Client connections open",
                self.metrics.connections_current.load(Ordering::Relaxed) as f64,
            ),
            (
                "db_pool_size",
                "PostgreSQL pool connections open",
                size as f64,
            ),
            (
                "db_pool_available",
                "PostgreSQL pool connections idle",
                available as f64,
            ),
            (
                "upstream_shared_connections",
                "Shared pipelined connections to Valkey per protocol",
                self.config.valkey.pool_size as f64,
            ),
            ("l1_entries", "Entries in the in-process L1", entries as f64),
            ("l1_bytes", "Bytes held by the in-process L1", bytes as f64),
            (
                "l1_tracking_up",
                "1 while Valkey client tracking keeps the L1 coherent",
                f64::from(u8::from(self.upstream.tracking.current().0 != 0)),
            ),
            (
                "invalidation_listening",
                "1 while listening for PostgreSQL change notifications",
                f64::from(u8::from(self.is_listening())),
            ),
        ];
        self.metrics.prometheus(&gauges)
    }

    /// Client ids start at 1 and are never reused, like Valkey's.
    pub fn next_client_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

pub struct Server {
    listener: TcpListener,
    shared: Arc<Shared>,
    metrics_task: Option<tokio::task::JoinHandle<()>>,
}

/// How long shutdown waits for connections to finish their replies.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

impl Server {
    /// Binds the listen address (port 0 picks a free port) and prepares the shared state.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let addr = config.listen.clone();
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| StartError::Listen { addr, source })?;
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
        let shared = Arc::new(Shared::new(config)?);
        shared.upstream.warm_up();
        // Briefly: learn Valkey's version for HELLO; a Valkey that is down does not hold us up.
        let until = tokio::time::Instant::now() + Duration::from_secs(1);
        while shared.upstream.server_version().is_empty() && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if shared.users.any_restricted() {
            // Permission checks need Valkey's command table; fetch it now, not at first need.
            let s = Arc::clone(&shared);
            tokio::spawn(async move {
                if let Err(e) = s.acl.table(&s.upstream).await {
                    tracing::warn!(error = %e, "cannot load Valkey's command table yet; will retry at first need");
                }
            });
        }
        let metrics_task = metrics_listener
            .map(|l| tokio::spawn(crate::prometheus::serve(l, Arc::clone(&shared))));
        Ok(Server {
            listener,
            shared,
            metrics_task,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Protected mode: without a password, a client from outside loopback gets Valkey's
    /// DENIED reply and nothing else.
    fn refuse(&self, stream: &tokio::net::TcpStream) -> Option<&'static str> {
        let auth = &self.shared.config.auth;
        if !auth.protected_mode || !self.shared.users.default_authed() {
            return None;
        }
        let peer = stream.peer_addr().ok()?;
        if peer.ip().is_loopback() {
            return None;
        }
        Some("-DENIED cachefront is running in protected mode because protected mode is enabled and no password is set for the default user. In this mode connections are only accepted from the loopback interface. Set auth.requirepass, or disable protected mode with auth.protected_mode = false.\r\n")
    }

    /// Accepts clients until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let listener_task = tokio::spawn(crate::invalidation::run(Arc::clone(&self.shared)));
        if self.shared.cache.l1.enabled() {
            let l1 = Arc::clone(&self.shared.cache.l1);
            self.shared
                .upstream
                .start_tracking(Arc::new(move |ev| l1.on_tracking(ev)));
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let live = Arc::new(AtomicUsize::new(0));
        let max = self.shared.config.limits.max_clients;
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = &mut shutdown => break,
            };
            let (mut stream, _) = match accepted {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if let Some(reason) = self.refuse(&stream) {
                inc(&self.shared.metrics.rejected_connections);
                tokio::spawn(async move {
                    let _ = stream.write_all(reason.as_bytes()).await;
                });
                continue;
            }
            if live.load(Ordering::Relaxed) >= max {
                inc(&self.shared.metrics.rejected_connections);
                tokio::spawn(async move {
                    let _ = stream
                        .write_all(b"-ERR max number of clients reached\r\n")
                        .await;
                });
                continue;
            }
            live.fetch_add(1, Ordering::Relaxed);
            let shared = Arc::clone(&self.shared);
            let live = Arc::clone(&live);
            let stop = stop_rx.clone();
            tokio::spawn(async move {
                inc(&shared.metrics.connections_total);
                inc(&shared.metrics.connections_current);
                Connection::new(Arc::clone(&shared), stream, stop)
                    .run()
                    .await;
                shared
                    .metrics
                    .connections_current
                    .fetch_sub(1, Ordering::Relaxed);
                live.fetch_sub(1, Ordering::Relaxed);
            });
        }
        drop(self.listener);
        let _ = stop_tx.send(true);
        let deadline = tokio::time::Instant::now() + DRAIN_DEADLINE;
        while live.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        listener_task.abort();
        if let Some(t) = &self.metrics_task {
            t.abort();
        }
        tracing::info!(remaining = live.load(Ordering::Relaxed), "shut down");
    }
}

/// A server running in the background (tests, embedding): its address, and a handle that
/// shuts it down when dropped.
pub struct Running {
    pub addr: SocketAddr,
    pub shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
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
    let shared = server.shared();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    Ok(Running {
        addr,
        shared,
        stop: Some(stop),
        task: Some(task),
    })
}
