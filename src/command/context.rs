//! What commands work with: the narrow context the server hands each connection, instead of
//! the server itself. It holds the services (Valkey, the cache, PostgreSQL, invalidation,
//! users, metrics) and the part of the configuration `SIGHUP` can replace. The server builds
//! it from the configuration and keeps only its own concerns (listeners, reload, shutdown).

use arc_swap::{ArcSwap, Guard};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::acl::Users;
use crate::cache::named::Named;
use crate::cache::Cache;
use crate::config::Config;
use crate::db::Db;
use crate::invalidation::Invalidation;
use crate::metrics::Metrics;
use crate::protocol::Limits;
use crate::upstream::Upstream;

/// Everything commands and connections share.
pub struct Context {
    /// What `SIGHUP` can change.
    pub live: Live,
    /// Shared with the cache store, which sends its own requests through it.
    pub upstream: Arc<Upstream>,
    pub cache: Arc<Cache>,
    pub db: Db,
    pub metrics: Arc<Metrics>,
    pub invalidation: Arc<Invalidation>,
    /// Client users (`default` always exists).
    pub users: Users,
    /// SQL.CACHED texts already seen: their verdict and their hashed form (parsing and
    /// hashing are the costly parts of a hit otherwise); bounded in bytes
    /// (`sql_cached::TEXT_CACHE_BYTES`).
    pub sql_checks: super::sql_cached::Texts,
    /// Client ids start at 1 and are never reused, like Valkey's.
    pub client_ids: ClientIds,
    /// The busiest SQL.CACHED texts' figures (`metrics.top_queries` of them at most).
    pub top_queries: crate::metrics::TopQueries,
}

/// The configuration in force and what is built from it, replaced whole on reload so a
/// command sees one consistent version. Read for every request by every connection: an
/// `ArcSwap` load touches no shared cache line (a lock, or an `Arc` count, would be written by
/// every reader on every core), and a connection keeps a [`LiveView`], which costs a pointer
/// comparison while nothing was reloaded.
pub struct Live(Arc<ArcSwap<LiveParts>>);

/// One connection's view of the [`Live`] configuration: `load` compares one pointer with the
/// one it holds and fetches the new version only after a reload, where each `ArcSwap` load
/// would cost a hundred-odd instructions — several of them on every request.
pub type LiveView = arc_swap::Cache<Arc<ArcSwap<LiveParts>>, Arc<LiveParts>>;

/// The configuration in force, held for as long as a command needs one consistent version.
pub struct ConfigRef(Guard<Arc<LiveParts>>);

impl std::ops::Deref for ConfigRef {
    type Target = Config;
    fn deref(&self) -> &Config {
        &self.0.config
    }
}

/// The named queries in force, held like [`ConfigRef`].
pub struct NamedRef(Guard<Arc<LiveParts>>);

impl std::ops::Deref for NamedRef {
    type Target = Named;
    fn deref(&self) -> &Named {
        &self.0.named
    }
}

/// One version of the configuration, its named queries and protocol limits.
pub struct LiveParts {
    config: Arc<Config>,
    named: Arc<Named>,
    limits: Limits,
}

impl LiveParts {
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Named queries by uppercased command name.
    pub fn named(&self) -> &Named {
        &self.named
    }

    /// Protocol limits for the request parser.
    pub fn limits(&self) -> Limits {
        self.limits
    }
}

impl Live {
    pub fn new(config: Config, named: Named) -> Live {
        Live(Arc::new(ArcSwap::new(Self::parts(config, named))))
    }

    /// A view for one connection (see [`LiveView`]).
    pub fn view(&self) -> LiveView {
        arc_swap::Cache::new(Arc::clone(&self.0))
    }

    fn parts(config: Config, named: Named) -> Arc<LiveParts> {
        Arc::new(LiveParts {
            limits: config.protocol_limits(),
            config: Arc::new(config),
            named: Arc::new(named),
        })
    }

    fn get(&self) -> Guard<Arc<LiveParts>> {
        self.0.load()
    }

    /// Puts a new configuration and its named queries in force (the server's reload).
    pub fn replace(&self, config: Config, named: Named) {
        self.0.store(Self::parts(config, named));
    }
}

/// Hands out client ids.
pub struct ClientIds(AtomicU64);

impl Default for ClientIds {
    fn default() -> Self {
        ClientIds(AtomicU64::new(1))
    }
}

impl Context {
    /// Builds the services from a checked configuration (see `server::check_config`).
    /// Nothing connects here — Valkey's connections open on first use and PostgreSQL's pool on
    /// demand — so cachefront starts while either is down, and commands can be tried without
    /// servers. Needs a Tokio runtime (the shared connections' tasks start idle).
    pub fn new(config: Config) -> Result<Context, String> {
        let metrics = Arc::new(Metrics::default());
        let upstream = Arc::new(
            Upstream::new(
                &config.valkey,
                Arc::clone(&metrics),
                crate::cores::count(config.threads),
            )
            .map_err(|e| e.to_string())?,
        );
        let store =
            crate::cache::store::Store::new(Arc::clone(&upstream), &config.cache.meta_prefix);
        let named = crate::cache::named::build(&config)?;
        let users = Users::from_config(&config.auth).map_err(|(k, m)| format!("{k}: {m}"))?;
        let invalidation = Invalidation::new(&config.invalidation, &named, Arc::clone(&metrics));
        Ok(Context {
            users,
            upstream,
            cache: Arc::new(
                Cache::new(store, Arc::clone(&metrics), &config.cache).with_verify(&config.verify),
            ),
            invalidation: Arc::new(invalidation),
            sql_checks: super::sql_cached::text_cache(),
            db: Db::with_cores(&config.postgres, crate::cores::count(config.threads))
                .map_err(|e| e.to_string())?,
            metrics,
            client_ids: ClientIds::default(),
            top_queries: crate::metrics::TopQueries::new(config.metrics.top_queries),
            live: Live::new(config, named),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> ConfigRef {
        ConfigRef(self.live.get())
    }

    /// Named queries by uppercased command name.
    pub fn named(&self) -> NamedRef {
        NamedRef(self.live.get())
    }

    /// Protocol limits for the request parser.
    pub fn limits(&self) -> Limits {
        self.live.get().limits
    }

    /// Client ids start at 1 and are never reused, like Valkey's.
    pub fn next_client_id(&self) -> u64 {
        self.client_ids.0.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether the invalidation listener is connected and listening.
    pub fn is_listening(&self) -> bool {
        self.invalidation.is_listening()
    }

    /// Before a fill, at start: see `Invalidation::wait_listening`.
    pub async fn wait_listening(&self, limit: Duration) {
        self.invalidation.wait_listening(limit).await
    }

    /// The figures computed when asked (pools, L1, degraded mode), in INFO order; each is
    /// named here once for both INFO and Prometheus.
    pub fn computed(&self) -> [Computed; 13] {
        let (size, available) = self.db.pool_status();
        let (entries, bytes) = self.cache.l1.usage();
        let (all, degraded) = self.cache.degraded.snapshot();
        let c = |info, gauge, value: u64| Computed { info, gauge, value };
        let flag = |b: bool| u64::from(b);
        [
            // INFO shows the pool as one `db_pool` row (see `metrics`).
            c(
                None,
                Some(("db_pool_size", "PostgreSQL pool connections open")),
                size as u64,
            ),
            c(
                None,
                Some(("db_pool_available", "PostgreSQL pool connections idle")),
                available as u64,
            ),
            c(
                None,
                Some((
                    "upstream_shared_connections",
                    "Shared pipelined connections to Valkey per protocol",
                )),
                self.config().valkey.pool_size as u64,
            ),
            c(
                Some("l1_entries"),
                Some(("l1_entries", "Entries in the in-process L1")),
                entries,
            ),
            c(
                Some("l1_bytes"),
                Some(("l1_bytes", "Bytes held by the in-process L1")),
                bytes,
            ),
            c(
                Some("l1_tracking"),
                Some((
                    "l1_tracking_up",
                    "1 while Valkey client tracking keeps the L1 coherent",
                )),
                flag(self.upstream.tracking_up()),
            ),
            // INFO has this row earlier, beside `db_pool` (see `metrics`).
            c(
                None,
                Some((
                    "invalidation_listening",
                    "1 while listening for PostgreSQL change notifications",
                )),
                flag(self.is_listening()),
            ),
            c(
                Some("invalidation_lease_holder"),
                Some((
                    "invalidation_lease_holder",
                    "1 while this instance holds the invalidation lease: of the instances sharing its Valkey, it applies changes",
                )),
                flag(self.invalidation.lease().holding()),
            ),
            c(
                Some("invalidation_degraded"),
                None,
                flag(all || !degraded.is_empty()),
            ),
            c(
                Some("invalidation_degraded_all"),
                Some((
                    "invalidation_degraded_all",
                    "1 while every cached read bypasses the cache until a pending flush is applied",
                )),
                flag(all),
            ),
            c(
                Some("invalidation_degraded_tables"),
                Some((
                    "invalidation_degraded_tables",
                    "Tables whose reads bypass the cache until a pending invalidation is applied",
                )),
                degraded.len() as u64,
            ),
            c(
                Some("invalidation_ddl_hook"),
                Some((
                    "invalidation_ddl_hook",
                    "1 while the DDL event trigger reports schema changes (0: DDL on cached tables is not seen)",
                )),
                flag(self.invalidation.ddl_hook_missing().is_none()),
            ),
            c(
                Some("invalidation_unwatched_tables"),
                Some((
                    "invalidation_unwatched_tables",
                    "Tables whose triggers could not be installed: reads depending on them answer from PostgreSQL",
                )),
                self.invalidation.unwatched().len() as u64,
            ),
        ]
    }

    /// The `# Cachefront` INFO section. It is rendered here, beside the parts it reads,
    /// because the INFO command needs it; the server renders Prometheus from `computed`.
    pub fn info_section(&self) -> String {
        let mut s = self
            .metrics
            .info_section(self.db.pool_status(), self.is_listening());
        for c in self.computed() {
            if let Some(name) = c.info {
                s.push_str(&format!("{name}:{}\r\n", c.value));
            }
        }
        if let Some(c) = &self.upstream.cluster {
            let st = c.stats();
            s.push_str(&format!(
                "cluster_nodes:{}\r\ncluster_slots_served:{}\r\ncluster_replicas:{}\r\ncluster_moved:{}\r\ncluster_ask:{}\r\ncluster_map_refreshes:{}\r\n",
                st.nodes, st.slots_served, st.replicas, st.moved, st.ask, st.refreshes
            ));
        }
        if let Some(set) = self.db.replicas() {
            s.push_str(&set.info_lines());
        }
        s
    }
}

/// One figure of `Context::computed`: where it shows, and its value now.
pub struct Computed {
    /// INFO field, shown after the latency rows; `None`: Prometheus only.
    pub info: Option<&'static str>,
    /// Prometheus gauge name (without `cachefront_`) and help; `None`: INFO only.
    pub gauge: Option<(&'static str, &'static str)>,
    pub value: u64,
}
