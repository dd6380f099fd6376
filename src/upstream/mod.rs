//! Valkey as the pass-through target: shared pipelined connections for stateless commands, and
//! dedicated connections for clients that enter a stateful mode (MULTI, WATCH, SUBSCRIBE,
//! blocking commands, SELECT, CLIENT TRACKING).
//!
//! Callers see two operations — `send` on the shared pool and `dedicated`/`release` — so the
//! strategy behind them can change without touching commands. With `valkey.cluster`, the same
//! operations route by hash slot (see `cluster`).

pub mod cluster;
pub mod commands;
pub mod conn;
pub mod inbox;
pub mod mux;
pub mod subscriber;
pub mod tracking;

use bytes::Bytes;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use crate::config::{cluster_seed, ValkeyConfig};
use crate::error::Result;
use crate::metrics::Metrics;
use crate::protocol::{Proto, Request};
pub use cluster::Cluster;
pub use conn::{Endpoint, Login, RawConn};
pub use inbox::{reply_lost, Inbox, Owed};
pub use mux::{is_long_name, LongMark, Mux, ReplyBudget, ReplyRx, Tee};
pub use tracking::{TrackingEvent, TrackingState};

/// Valkey's script and function commands.
pub const SCRIPT_COMMANDS: &[&[u8]] = &[
    b"EVAL",
    b"EVALSHA",
    b"EVAL_RO",
    b"EVALSHA_RO",
    b"FCALL",
    b"FCALL_RO",
];

pub struct Upstream {
    endpoint: Arc<Endpoint>,
    /// Shared connections for tasks that run on no core (the main runtime's: invalidation,
    /// the lease, the verifier; and everything in tests that serve no clients).
    main: Pool,
    /// Each core's own shared connections, made by the first request there, so their tasks
    /// run on that core's thread (see `crate::cores`).
    per_core: Vec<std::sync::OnceLock<Pool>>,
    /// Shared connections per protocol on each core.
    per_core_size: usize,
    recovered: Arc<mux::Recovered>,
    /// Dedicated connections returned clean (see [`conn::reset`]), ready for another client.
    idle: Arc<Mutex<Vec<RawConn>>>,
    max_idle: usize,
    /// cachefront client id → the upstream id of the dedicated connection it holds, so
    /// `CLIENT TRACKING … REDIRECT <id>` can name the right Valkey connection.
    dedicated_ids: Mutex<HashMap<u64, i64>>,
    /// (node, user) pairs whose Valkey ACL user has been set up by this process.
    logins_set_up: Mutex<HashSet<(String, String)>>,
    pub tracking: Arc<TrackingState>,
    /// Set when the upstream is a Valkey Cluster: requests route by slot through it.
    pub cluster: Option<Arc<Cluster>>,
    /// Valkey's command table, loaded once (by the first that needs it) and shared by routing
    /// and permission checks.
    commands: Arc<commands::TableCell>,
    /// Long requests in flight (shared and dedicated connections alike): while one runs,
    /// Valkey's silence on the shared connections is not taken for a dead server.
    long: Arc<mux::LongWork>,
}

/// Shared connections to one server, per protocol.
struct Pool {
    resp2: Vec<Mux>,
    resp3: Vec<Mux>,
}

impl Pool {
    /// `size` connections per protocol, on the calling thread's runtime; each connects when
    /// first used.
    fn spawn(
        size: usize,
        endpoint: &Arc<Endpoint>,
        tracking: &Arc<TrackingState>,
        (long, recovered): (&Arc<mux::LongWork>, &Arc<mux::Recovered>),
    ) -> Pool {
        let spawn = |proto| {
            (0..size)
                .map(|_| {
                    let shared = (Arc::clone(long), Arc::clone(recovered));
                    Mux::spawn(
                        Arc::clone(endpoint),
                        proto,
                        Arc::clone(tracking),
                        None,
                        shared,
                    )
                })
                .collect::<Vec<_>>()
        };
        Pool {
            resp2: spawn(Proto::Resp2),
            resp3: spawn(Proto::Resp3),
        }
    }

    /// The connection of `lane` (a client keeps its lane, so its requests keep their order).
    fn pick(&self, lane: u64, proto: Proto) -> &Mux {
        let pool = match proto {
            Proto::Resp2 => &self.resp2,
            Proto::Resp3 => &self.resp3,
        };
        &pool[(lane % pool.len() as u64) as usize]
    }
}

impl Upstream {
    /// The upstream for `cores` cores (`crate::cores`; 0 when clients run on no core).
    pub fn new(cfg: &ValkeyConfig, metrics: Arc<Metrics>, cores: usize) -> Result<Upstream> {
        let endpoint = Arc::new(Endpoint::from_config(cfg)?);
        if endpoint.tls.as_ref().is_some_and(|t| t.insecure) {
            tracing::warn!(
                addr = %endpoint.addr,
                "INSECURE: TLS to Valkey accepts ANY certificate (valkey.tls_insecure or #insecure); \
                 anyone in the network path can impersonate Valkey. Use valkey.tls_ca_file instead."
            );
        }
        let tracking = Arc::new(TrackingState::default());
        let long = Arc::new(mux::LongWork::default());
        let commands = Arc::new(commands::TableCell::default());
        let cluster = (!cfg.cluster.is_empty()).then(|| {
            let seeds = cfg.cluster.iter().map(|s| cluster_seed(s).1).collect();
            let shared = (Arc::clone(&long), Arc::clone(&commands));
            let pools = (cfg.pool_size, cfg.read_from_replicas);
            Cluster::start(Arc::clone(&endpoint), seeds, pools, shared, metrics)
        });
        // In a cluster the per-node connections live in `cluster`; none to a single address.
        let per_proto = if cluster.is_some() { 0 } else { cfg.pool_size };
        let recovered = Arc::new(mux::Recovered::default());
        let main = Pool::spawn(per_proto, &endpoint, &tracking, (&long, &recovered));
        // The pool's connections are split between the cores: fewer connections, each
        // carrying more requests per write.
        let per_core_size = per_proto.div_ceil(cores.max(1));
        Ok(Upstream {
            main,
            per_core: (0..cores).map(|_| std::sync::OnceLock::new()).collect(),
            per_core_size,
            recovered,
            endpoint,
            idle: Arc::new(Mutex::new(Vec::new())),
            max_idle: cfg.idle_dedicated,
            dedicated_ids: Mutex::new(HashMap::new()),
            logins_set_up: Mutex::new(HashSet::new()),
            tracking,
            cluster,
            long,
            commands,
        })
    }

    fn mux(&self, lane: u64, proto: Proto) -> &Mux {
        self.pool().pick(lane, proto)
    }

    /// The calling thread's pool: its core's own, made here on first use (so the connections'
    /// tasks are spawned on that core), or the main one.
    fn pool(&self) -> &Pool {
        match crate::cores::current().and_then(|i| self.per_core.get(i)) {
            Some(cell) => cell.get_or_init(|| {
                let shared = (&self.long, &self.recovered);
                Pool::spawn(self.per_core_size, &self.endpoint, &self.tracking, shared)
            }),
            None => &self.main,
        }
    }

    /// Forwards a client's pass-through command: to the shared connection of its lane, or in a
    /// cluster to the node serving its keys.
    /// Both queue the request before they return (in a cluster, after awaiting what routing
    /// needs), so a client's requests keep their order.
    /// The reply is charged to the client's `budget` (its output limit) as it arrives.
    pub async fn forward(
        &self,
        lane: u64,
        proto: Proto,
        req: &Request,
        budget: &Arc<ReplyBudget>,
    ) -> ReplyRx {
        match &self.cluster {
            // Boxed: routing may wait for the slot map, and the clients' tasks that await this
            // would otherwise all be sized for the cluster's futures.
            Some(c) => {
                Box::pin(c.forward(lane, proto, &req.args, req.raw.clone(), Some(budget))).await
            }
            None => self
                .mux(lane, proto)
                .send_for(req.raw.clone(), lane, Some(budget)),
        }
    }

    /// Whether a client's pass-through requests may travel in runs (see `inbox`): on a
    /// single server, where they all take the shared connection of the client's lane; a
    /// cluster routes each by its keys.
    pub fn runs(&self) -> bool {
        self.cluster.is_none()
    }

    /// Sends a client's run of pass-through requests, encoded back to back in `raw`, on the
    /// shared connection of its lane (single server only, see [`Upstream::runs`]); their
    /// replies go to `owed`'s inbox, in order, each charged to the client's `budget`.
    pub fn forward_run(
        &self,
        lane: u64,
        proto: Proto,
        raw: Bytes,
        owed: Owed,
        budget: &Arc<ReplyBudget>,
    ) {
        self.mux(lane, proto).send_run(raw, owed, lane, budget);
    }

    /// Sends one of cachefront's own single-key requests (a cache lookup) for a client.
    pub async fn send_key(
        &self,
        lane: u64,
        proto: Proto,
        raw: Bytes,
        key: &[u8],
        budget: &Arc<ReplyBudget>,
    ) -> ReplyRx {
        match &self.cluster {
            Some(c) => Box::pin(c.send_key(lane, proto, raw, key, Some(budget))).await,
            None => self.mux(lane, proto).send_for(raw, lane, Some(budget)),
        }
    }

    /// Forwards one stateless command over a shared connection. A client always uses the
    /// same one (`lane`, e.g. its id), so its commands reach Valkey in the order it sent them.
    pub async fn send(&self, lane: u64, proto: Proto, raw: Bytes) -> ReplyRx {
        match &self.cluster {
            Some(c) => c.send_any(lane, proto, raw).await,
            None => self.mux(lane, proto).send(raw),
        }
    }

    /// Sends one of cachefront's own requests (the cache store's) about `key` on a shared RESP2
    /// connection: the one `key`'s slot picks, on the node serving that slot in a cluster. So
    /// requests about one key, sent one after another, go out in order and pipelined on one
    /// connection (one round trip), and they share the pass-through's reconnects, timeouts and
    /// TLS. Queued before this returns (in a cluster, once the slot map is loaded).
    pub async fn send_own(&self, raw: Bytes, key: &[u8]) -> ReplyRx {
        let lane = u64::from(cluster::slot_of(key));
        self.send_own_on((lane, Proto::Resp2), raw, key).await
    }

    /// [`send_own`](Self::send_own) on a client's shared connection (`lane` and protocol, as
    /// its own requests go; on the node serving `key` in a cluster) instead of the key's: it
    /// goes out ahead of whatever that client sends next.
    pub async fn send_own_on(
        &self,
        (lane, proto): (u64, Proto),
        raw: Bytes,
        key: &[u8],
    ) -> ReplyRx {
        match &self.cluster {
            Some(c) => c.send_own(lane, proto, raw, key).await,
            None => self.mux(lane, proto).send_own(raw, lane),
        }
    }

    /// [`send_own`](Self::send_own), awaited: the raw reply frame (an error frame is a reply
    /// too), or why there is none.
    pub async fn call(&self, raw: Bytes, key: &[u8]) -> Result<Bytes> {
        reply_of(self.send_own(raw, key).await).await
    }

    /// A tracked lookup for the L1 on the client's shared connection, or `None` while the
    /// tracking connection is down (then nothing read may enter the L1).
    /// `tee` is shown the reply as it arrives (single server only; see [`Tee`]).
    pub fn send_tracked(
        &self,
        lane: u64,
        proto: Proto,
        raw: Bytes,
        key: &[u8],
        budget: &Arc<ReplyBudget>,
        tee: Option<Tee>,
    ) -> Option<ReplyRx> {
        if let Some(c) = &self.cluster {
            // `tee` is dropped unshown: on a cluster, nobody waits for another's lookup.
            return c.send_tracked(lane, proto, raw, key, Some(budget));
        }
        if self.tracking.current().0 == 0 {
            return None;
        }
        Some(
            self.mux(lane, proto)
                .send_tracked(raw, lane, Some(budget), tee),
        )
    }

    /// True while the L1's tracking connection(s) are up.
    pub fn tracking_up(&self) -> bool {
        match &self.cluster {
            Some(c) => c.tracking_up(),
            None => self.tracking.current().0 != 0,
        }
    }

    /// Starts the tracking connection; `on_event` receives its invalidations.
    pub fn start_tracking(&self, on_event: Arc<dyn Fn(TrackingEvent) + Send + Sync>) {
        if let Some(c) = &self.cluster {
            c.start_tracking(on_event);
            return;
        }
        tokio::spawn(tracking::run(
            Arc::clone(&self.endpoint),
            Arc::clone(&self.tracking),
            on_event,
        ));
    }

    /// Keeps a connection of cachefront's own subscribed to `channel` (in a cluster, on any
    /// node) and reports what it hears to `on`, until the returned task is aborted.
    pub fn subscribe(
        &self,
        channel: String,
        on: Arc<dyn Fn(subscriber::Heard) + Send + Sync>,
    ) -> tokio::task::JoinHandle<()> {
        let target = match &self.cluster {
            Some(c) => subscriber::Target::Cluster(Arc::clone(c)),
            None => subscriber::Target::Single(Arc::clone(&self.endpoint)),
        };
        tokio::spawn(subscriber::run(target, channel, on))
    }

    /// A connection of the client's own, logged in as `login` if given (see [`conn::log_in`];
    /// the second value says whether that worked). In a cluster it goes to the node serving
    /// `args`' keys (the command that needs it).
    pub async fn dedicated_as(
        &self,
        proto: Proto,
        client_id: u64,
        args: &[Bytes],
        login: Option<&Login<'_>>,
    ) -> Result<(RawConn, bool)> {
        let mut conn = self.dedicated(proto, client_id, args).await?;
        let Some(login) = login else {
            return Ok((conn, false));
        };
        let key = (conn.addr.clone(), login.user.to_string());
        let setup = !self
            .logins_set_up
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key);
        let ep = self.endpoint.at(&conn.addr);
        match conn::log_in(&mut conn, login, setup, &ep).await {
            Ok(()) => {
                self.logins_set_up
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key);
                Ok((conn, true))
            }
            Err(e) => {
                tracing::warn!(user = login.user, error = %e, "cannot log a dedicated connection in as the client's Valkey ACL twin");
                // The connection's state is unknown after a failed exchange: a fresh one.
                drop(conn);
                let conn = self.dedicated(proto, client_id, args).await?;
                Ok((conn, false))
            }
        }
    }

    /// A connection of the client's own, from the idle set or newly opened. In a cluster it
    /// goes to the node serving `args`' keys (the command that needs it).
    pub async fn dedicated(&self, proto: Proto, client_id: u64, args: &[Bytes]) -> Result<RawConn> {
        let node = match &self.cluster {
            Some(c) => Some(c.node_for_command(client_id, args).await?),
            None => None,
        };
        let endpoint = node.as_ref().map_or(&self.endpoint, |n| &n.endpoint);
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let mut found = None;
            while let Some(pos) = idle
                .iter()
                .rposition(|c| c.proto == proto && c.addr == endpoint.addr)
            {
                let mut c = idle.swap_remove(pos);
                if !c.is_closed() {
                    found = Some(c);
                    break;
                }
            }
            found
        };
        let conn = match reused {
            Some(c) => c,
            None => conn::connect(endpoint, proto).await?,
        };
        self.dedicated_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(client_id, conn.upstream_id);
        Ok(conn)
    }

    /// Gives back a dedicated connection. `quiet` says no reply is still due on it (nothing
    /// sent and unanswered, nothing buffered unsent); otherwise it is closed. A quiet one is
    /// reset in the background ([`conn::reset`]) and joins the idle set only once Valkey has
    /// confirmed the reset: whatever state the last client left on it (a transaction, a
    /// subscription entered through EXEC, tracking, CLIENT REPLY OFF, another database or
    /// protocol), the next client gets a fresh connection. Any doubt closes it instead.
    pub fn release(&self, client_id: u64, conn: RawConn, quiet: bool) {
        self.forget(client_id);
        if !quiet || self.max_idle == 0 {
            return;
        }
        let ep = if conn.addr == self.endpoint.addr {
            Arc::clone(&self.endpoint)
        } else {
            Arc::new(self.endpoint.at(&conn.addr))
        };
        let idle = Arc::clone(&self.idle);
        let max_idle = self.max_idle;
        tokio::spawn(async move {
            let mut conn = conn;
            match conn::reset(&mut conn, &ep).await {
                Ok(()) => {
                    let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
                    if idle.len() < max_idle {
                        idle.push(conn);
                    }
                }
                Err(e) => {
                    tracing::debug!(error = %e, "dedicated connection closed instead of reused")
                }
            }
        });
    }

    /// Drops the client's registration (it no longer holds a dedicated connection).
    pub fn forget(&self, client_id: u64) {
        self.dedicated_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&client_id);
    }

    /// The Valkey-side id of the dedicated connection held by cachefront client `client_id`.
    pub fn upstream_id_of(&self, client_id: u64) -> Option<i64> {
        self.dedicated_ids
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&client_id)
            .copied()
    }

    /// Opens the calling thread's shared connections now (a PING each; on a core, that core's)
    /// instead of on first use, so the first clients don't pay for the handshakes and HELLO
    /// can report Valkey's version.
    pub fn warm_up(&self) {
        if let Some(c) = self
            .cluster
            .as_ref()
            .filter(|_| crate::cores::current().is_none())
        {
            c.warm_up();
        }
        let pool = self.pool();
        for mux in pool.resp2.iter().chain(&pool.resp3) {
            drop(mux.send(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n")));
        }
    }

    /// Valkey's version, once any shared connection has completed a handshake.
    pub fn server_version(&self) -> String {
        if let Some(c) = &self.cluster {
            return c.server_version();
        }
        Mux::any_version(self.main.resp2.iter().chain(&self.main.resp3))
    }

    /// Counts `raw` as a long request while the returned mark lives, if it is one (a script
    /// or similar sent on a dedicated connection; see [`mux::LongWork`]).
    pub fn long_mark(&self, raw: &[u8]) -> Option<mux::LongMark> {
        self.long.mark_if_long(raw)
    }

    /// Valkey's command table, loaded now if nobody has yet (retried at the next call if that
    /// fails).
    pub async fn command_table(&self) -> Result<Arc<commands::CommandTable>> {
        if let Some(t) = self.commands.get() {
            return Ok(t);
        }
        let raw = self
            .send(
                0,
                Proto::Resp2,
                Bytes::from_static(b"*1\r\n$7\r\nCOMMAND\r\n"),
            )
            .await
            .await
            .map_err(|_| crate::error::Error::upstream("connection lost"))??;
        self.commands.set_from(&raw).ok_or_else(|| {
            crate::error::Error::upstream("Valkey's COMMAND reply could not be read")
        })
    }

    /// Valkey's command table if it is loaded.
    pub fn command_table_now(&self) -> Option<Arc<commands::CommandTable>> {
        self.commands.get()
    }

    /// True while a long request (see [`mux::LongWork`]) is in flight: Valkey may be busy.
    pub fn long_in_flight(&self) -> bool {
        self.long.busy()
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }
}

/// The reply a queued request gets; a dropped sender means its connection went away first.
pub async fn reply_of(rx: ReplyRx) -> Result<Bytes> {
    rx.await.map_err(|_| reply_lost())?
}
