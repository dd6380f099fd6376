//! A Valkey Cluster as the upstream: every pass-through command goes to the primary that owns
//! its keys' slot, so clients keep talking to one address as if it were a single Valkey.
//!
//! - The slot map comes from `CLUSTER SLOTS` (at start, every few seconds, and at once after a
//!   redirect). Key positions come from the cluster's own `COMMAND` table (`COMMAND GETKEYS`
//!   for commands whose keys move), so modules and new commands route correctly.
//! - `-MOVED` replies update the map and the request is sent again to the named node; `-ASK`
//!   sends it once to the importing node after `ASKING`. Clients never see either.
//! - Keys in different slots get Valkey's own `-CROSSSLOT` error, without a round trip.
//! - Commands about the whole keyspace (`FLUSHALL`, `DBSIZE`, `KEYS`, `SCAN`, script and
//!   function loading) run on every primary and their replies are combined.
//! - With `valkey.read_from_replicas`, read-only pass-through commands on keys go to a replica
//!   of the slot's primary (connections that sent `READONLY`); the primary answers when the
//!   shard has no healthy replica, or when the replica chosen fails. Everything else — writes,
//!   and every request of cachefront's own cache — stays on primaries.
//! - With `rediss://`, every node connection is TLS, each checked against the name or address
//!   the slot map gives for that node.

use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

use super::commands::{CommandTable, TableCell};
use super::conn::{connect, Endpoint};
use super::mux::{LongWork, Mux, Redirect, ReplyBudget, ReplyRx};
use super::tracking::{TrackingEvent, TrackingState};
use crate::error::{Error, Refusal, Result};
use crate::metrics::{inc, Metrics};
use crate::protocol::request::encode_multibulk;
use crate::protocol::value::{decode, Value};
use crate::protocol::Proto;

/// Number of hash slots in a Valkey Cluster.
pub const SLOTS: usize = 16384;
/// A slot no node serves (yet).
const UNASSIGNED: u16 = u16::MAX;
/// Redirects followed for one request before its error is returned as is.
const MAX_HOPS: u8 = 5;
/// How often the slot map is refreshed when nothing prompts it.
const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// How long a replica that failed a read is passed over before it is tried again.
const REPLICA_RETRY: Duration = Duration::from_secs(2);

/// The hash slot of a key, hash tags included (`{user1}:a` and `{user1}:b` share one).
pub fn slot_of(key: &[u8]) -> u16 {
    redis_protocol::redis_keyslot(key)
}

/// One node (a primary, or a replica serving reads) and the shared pipelined connections to it.
pub struct Node {
    pub addr: String,
    pub endpoint: Arc<Endpoint>,
    shared2: Vec<Mux>,
    shared3: Vec<Mux>,
    /// The node's own tracking connection for the L1 (tracking redirects stay on one node).
    tracking: Arc<TrackingState>,
    tracking_started: AtomicBool,
    /// A replica: until when it is passed over after a failed read (ms on [`clock_ms`]).
    failed_until: AtomicU64,
}

impl Node {
    fn start_tracking(&self, on: &OnTracking) {
        if !self.tracking_started.swap(true, Ordering::AcqRel) {
            tokio::spawn(super::tracking::run(
                Arc::clone(&self.endpoint),
                Arc::clone(&self.tracking),
                Arc::clone(on),
            ));
        }
    }

    fn mux(&self, proto: Proto, lane: u64) -> &Mux {
        let pool = match proto {
            Proto::Resp2 => &self.shared2,
            Proto::Resp3 => &self.shared3,
        };
        &pool[(lane % pool.len() as u64) as usize]
    }

    pub fn server_version(&self) -> String {
        Mux::any_version(self.shared2.iter().chain(&self.shared3))
    }

    /// A replica that may serve reads now: not failed within [`REPLICA_RETRY`].
    fn serving(&self) -> bool {
        self.failed_until.load(Ordering::Relaxed) <= clock_ms()
    }

    /// A replica's read failed: the primary answers its reads for a while.
    fn mark_failed(&self) {
        let until = clock_ms() + REPLICA_RETRY.as_millis() as u64;
        self.failed_until.store(until, Ordering::Relaxed);
    }
}

/// Milliseconds since the first call: a cheap shared clock for [`Node::failed_until`].
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Which primary serves each slot, and the replicas of each primary.
struct Topology {
    slots: Vec<u16>,
    /// Sorted by address, so `SCAN` cursors name the same node between refreshes.
    nodes: Vec<Arc<Node>>,
    /// `replicas[i]`: the healthy replicas of `nodes[i]` as the cluster last listed them
    /// (empty unless `valkey.read_from_replicas`).
    replicas: Vec<Vec<Arc<Node>>>,
}

impl Topology {
    fn node_for(&self, slot: u16) -> Option<&Arc<Node>> {
        self.index_for(slot).and_then(|i| self.nodes.get(i))
    }

    fn index_for(&self, slot: u16) -> Option<usize> {
        match self.slots.get(slot as usize) {
            Some(&i) if i != UNASSIGNED => Some(i as usize),
            _ => None,
        }
    }

    /// A replica of `slot`'s primary that may serve a read now (`lane` spreads clients over
    /// them), if there is one.
    fn replica_for(&self, slot: u16, lane: u64) -> Option<&Arc<Node>> {
        let replicas = self.replicas.get(self.index_for(slot)?)?;
        let n = replicas.len();
        (0..n)
            .map(|k| &replicas[((lane as usize) + k) % n])
            .find(|r| r.serving())
    }
}

/// The node a command's keys belong to.
pub enum Owner {
    /// Keyless, or not known without asking Valkey.
    Unknown,
    Node(String),
    /// Keys in different slots.
    CrossSlot,
}

/// Where a command must go.
enum Target {
    Slot(u16),
    /// A read-only command on keys of one slot: a replica may answer it (see
    /// `valkey.read_from_replicas`).
    Read(u16),
    Any,
    CrossSlot,
    /// Keys known only to Valkey (`COMMAND GETKEYS`); `read`: a read-only command (see
    /// [`Target::Read`]).
    Movable {
        read: bool,
    },
    Fanout(Fanout),
}

/// How replies from every primary are combined.
#[derive(Clone, Copy)]
enum Fanout {
    /// The first error, else the first reply (FLUSHALL, SCRIPT LOAD…).
    Same,
    /// Integers added (DBSIZE).
    Sum,
    /// Arrays concatenated (KEYS).
    Concat,
    /// One node after another, the node's index carried in the cursor (SCAN).
    Scan,
}

/// Receives every node's tracking invalidations (the L1's handler).
type OnTracking = Arc<dyn Fn(TrackingEvent) + Send + Sync>;

pub struct Cluster {
    base: Arc<Endpoint>,
    seeds: Vec<String>,
    pool_size: usize,
    on_tracking: OnceLock<OnTracking>,
    topo: RwLock<Arc<Topology>>,
    ready: watch::Sender<bool>,
    redirects: mpsc::UnboundedSender<Redirect>,
    refresh_now: tokio::sync::Notify,
    table: Arc<TableCell>,
    moved: AtomicU64,
    ask: AtomicU64,
    refreshes: AtomicU64,
    /// Long requests in flight anywhere (see [`LongWork`]): while one runs, silent nodes wait.
    long: Arc<LongWork>,
    /// `valkey.read_from_replicas`.
    replica_reads: bool,
    /// Why the last slot map load failed (cleared by a success): what clients are told while
    /// no map could be loaded, e.g. a TLS handshake refused.
    last_error: std::sync::Mutex<Option<Error>>,
    metrics: Arc<Metrics>,
}

/// Figures for INFO and Prometheus.
pub struct ClusterStats {
    pub nodes: u64,
    /// Replicas serving reads (`valkey.read_from_replicas`; 0 without).
    pub replicas: u64,
    pub slots_served: u64,
    pub moved: u64,
    pub ask: u64,
    pub refreshes: u64,
}

impl Cluster {
    /// Starts the slot-map and redirect tasks; the map loads in the background.
    pub fn start(
        base: Arc<Endpoint>,
        seeds: Vec<String>,
        (pool_size, replica_reads): (usize, bool),
        (long, table): (Arc<LongWork>, Arc<TableCell>),
        metrics: Arc<Metrics>,
    ) -> Arc<Cluster> {
        let (redirects, rx) = mpsc::unbounded_channel();
        let cluster = Arc::new(Cluster {
            base,
            seeds,
            pool_size: pool_size.max(1),
            on_tracking: OnceLock::new(),
            topo: RwLock::new(Arc::new(Topology {
                slots: vec![UNASSIGNED; SLOTS],
                nodes: Vec::new(),
                replicas: Vec::new(),
            })),
            ready: watch::channel(false).0,
            redirects,
            refresh_now: tokio::sync::Notify::new(),
            table,
            moved: AtomicU64::new(0),
            ask: AtomicU64::new(0),
            refreshes: AtomicU64::new(0),
            long,
            replica_reads,
            last_error: std::sync::Mutex::new(None),
            metrics,
        });
        tokio::spawn(refresher(Arc::downgrade(&cluster)));
        tokio::spawn(redirector(Arc::downgrade(&cluster), rx));
        cluster
    }

    pub fn stats(&self) -> ClusterStats {
        let topo = self.topology();
        ClusterStats {
            nodes: topo.nodes.len() as u64,
            replicas: topo.replicas.iter().map(|r| r.len() as u64).sum(),
            slots_served: topo.slots.iter().filter(|&&s| s != UNASSIGNED).count() as u64,
            moved: self.moved.load(Ordering::Relaxed),
            ask: self.ask.load(Ordering::Relaxed),
            refreshes: self.refreshes.load(Ordering::Relaxed),
        }
    }

    fn topology(&self) -> Arc<Topology> {
        Arc::clone(&self.topo.read().unwrap_or_else(|p| p.into_inner()))
    }

    fn command_table(&self) -> Option<Arc<CommandTable>> {
        self.table.get()
    }

    /// Every primary, in address order.
    pub fn nodes(&self) -> Vec<Arc<Node>> {
        self.topology().nodes.clone()
    }

    /// Waits until the slot map is loaded (or the connect timeout passes).
    async fn wait_ready(&self) -> Result<()> {
        let mut rx = self.ready.subscribe();
        let limit = self.base.connect_timeout;
        let ok = matches!(
            tokio::time::timeout(limit, rx.wait_for(|r| *r)).await,
            Ok(Ok(_))
        );
        if ok {
            return Ok(());
        }
        let why = self
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|e| format!(": {}", e.to_string().trim_start_matches("UPSTREAM ")))
            .unwrap_or_default();
        Err(Error::upstream(format!(
            "CLUSTERDOWN cachefront has not been able to load the cluster's slot map{why}"
        )))
    }

    /// Sends a request for one key's slot (cachefront's own lookups). Awaits only while the
    /// slot map is not loaded yet; the request is queued before this returns, so a client's
    /// requests reach each node in the order it sent them.
    pub async fn send_key(
        &self,
        lane: u64,
        proto: Proto,
        raw: Bytes,
        key: &[u8],
        budget: Option<&Arc<ReplyBudget>>,
    ) -> ReplyRx {
        match self.ready_now().await {
            Ok(topo) => {
                let t = Target::Slot(slot_of(key));
                self.dispatch(&topo, t, (lane, budget), proto, raw, &[])
            }
            Err(e) => ready(Err(e)),
        }
    }

    /// Sends one of cachefront's own requests (the cache store's) to the node serving `key`'s
    /// slot, on connection `lane` of protocol `proto`; see [`super::Upstream::send_own_on`].
    pub async fn send_own(&self, lane: u64, proto: Proto, raw: Bytes, key: &[u8]) -> ReplyRx {
        match self.ready_now().await {
            Ok(topo) => match topo.node_for(slot_of(key)) {
                Some(node) => node.mux(proto, lane).send_own(raw, lane),
                None => ready(Ok(Refusal::ClusterDown.frame())),
            },
            Err(e) => ready(Err(e)),
        }
    }

    /// Sends a keyless request to some primary (`lane` spreads them).
    pub async fn send_any(&self, lane: u64, proto: Proto, raw: Bytes) -> ReplyRx {
        match self.ready_now().await {
            Ok(topo) => self.dispatch(&topo, Target::Any, (lane, None), proto, raw, &[]),
            Err(e) => ready(Err(e)),
        }
    }

    /// Forwards a client's command to the node(s) its keys say. What routing needs from
    /// Valkey (the slot map and command table at first, `COMMAND GETKEYS` for movable keys)
    /// is awaited here, by the client's own connection, so its commands stay in order; the
    /// command itself is queued before this returns.
    pub async fn forward(
        &self,
        lane: u64,
        proto: Proto,
        args: &[Bytes],
        raw: Bytes,
        budget: Option<&Arc<ReplyBudget>>,
    ) -> ReplyRx {
        match self.resolve(lane, args).await {
            Ok((t, topo)) => self.dispatch(&topo, t, (lane, budget), proto, raw, args),
            Err(e) => ready(Err(e)),
        }
    }

    /// The slot map, waited for if it is not loaded yet.
    async fn ready_now(&self) -> Result<Arc<Topology>> {
        let topo = self.topology();
        if !topo.nodes.is_empty() {
            return Ok(topo);
        }
        self.wait_ready().await?;
        Ok(self.topology())
    }

    /// Where `args` must go, asking Valkey only what the command table cannot say, and the
    /// slot map to find it in (read once on the usual path; again after anything awaited).
    async fn resolve(&self, lane: u64, args: &[Bytes]) -> Result<(Target, Arc<Topology>)> {
        let topo = self.ready_now().await?;
        let table = match self.command_table() {
            Some(t) => t,
            None => self.table_loaded(lane).await?,
        };
        match target(&table, args) {
            Target::Movable { read } => {
                let t = match self.movable_target(lane, args).await? {
                    Target::Slot(s) if read => Target::Read(s),
                    t => t,
                };
                Ok((t, self.topology()))
            }
            t => Ok((t, topo)),
        }
    }

    /// Queues the request where `t` says, now; a fan-out's replies are combined on a task.
    /// A single node's reply is charged to the client's budget (a fan-out's parts are not:
    /// they are combined first).
    fn dispatch(
        &self,
        topo: &Topology,
        t: Target,
        (lane, budget): (u64, Option<&Arc<ReplyBudget>>),
        proto: Proto,
        raw: Bytes,
        args: &[Bytes],
    ) -> ReplyRx {
        let node = match t {
            Target::Slot(s) => topo.node_for(s),
            Target::Read(s) => {
                let primary = topo.node_for(s);
                if !self.replica_reads {
                    primary
                } else if let (Some(replica), Some(primary)) = (topo.replica_for(s, lane), primary)
                {
                    return self.read_on_replica(replica, primary, (lane, budget), proto, raw);
                } else {
                    inc(&self.metrics.cluster_replica_fallbacks);
                    primary
                }
            }
            Target::Any | Target::Movable { .. } => topo
                .nodes
                .get((lane % topo.nodes.len().max(1) as u64) as usize),
            Target::CrossSlot => return ready(Ok(Refusal::CrossSlot.frame())),
            Target::Fanout(how) => return fanout(&topo.nodes, how, lane, proto, raw, args),
        };
        match node {
            Some(node) => node.mux(proto, lane).send_for(raw, lane, budget),
            // What a node says for a slot nobody serves.
            None => ready(Ok(Refusal::ClusterDown.frame())),
        }
    }

    /// Sends a read to `replica`; if the replica fails it (no connection, no answer in time,
    /// or an answer saying it cannot serve: see [`replica_cannot_serve`]), the replica is
    /// passed over for [`REPLICA_RETRY`] and the read goes to `primary`, so a dead replica
    /// costs a client one slower read, not an error. (Read-only commands can be sent twice.)
    /// A `-MOVED` from the replica — the slot moved — is followed like any other: to the new
    /// primary, with a refresh of the map.
    fn read_on_replica(
        &self,
        replica: &Arc<Node>,
        primary: &Arc<Node>,
        (lane, budget): (u64, Option<&Arc<ReplyBudget>>),
        proto: Proto,
        raw: Bytes,
    ) -> ReplyRx {
        let first = replica.mux(proto, lane).send_for(raw.clone(), lane, budget);
        let (tx, rx) = oneshot::channel();
        let (replica, primary) = (Arc::clone(replica), Arc::clone(primary));
        let (budget, metrics) = (budget.cloned(), Arc::clone(&self.metrics));
        tokio::spawn(async move {
            let reply = match await_reply(first).await {
                Ok(frame) if !replica_cannot_serve(&frame) => {
                    inc(&metrics.cluster_replica_reads);
                    Ok(frame)
                }
                Err(e) if e == super::mux::over_limit() => Err(e),
                failed => {
                    let why = match &failed {
                        Ok(frame) => {
                            // Not for the client: the primary's answer replaces it.
                            if let Some(b) = &budget {
                                b.release(frame.len());
                            }
                            String::from_utf8_lossy(frame).trim().to_string()
                        }
                        Err(e) => e.to_string(),
                    };
                    tracing::warn!(replica = %replica.addr, error = %why, "a replica failed a read; the primary answers");
                    replica.mark_failed();
                    inc(&metrics.cluster_replica_fallbacks);
                    let again = primary
                        .mux(proto, lane)
                        .send_for(raw, lane, budget.as_ref());
                    await_reply(again).await
                }
            };
            let _ = tx.send(reply);
        });
        rx
    }

    /// The node a stateful client's dedicated connection should go to: the one serving the
    /// keys of the command that needs it, or any for a keyless one.
    pub async fn node_for_command(
        self: &Arc<Self>,
        lane: u64,
        args: &[Bytes],
    ) -> Result<Arc<Node>> {
        let (t, topo) = self.resolve(lane, args).await?;
        let node = match t {
            Target::Slot(s) | Target::Read(s) => topo.node_for(s),
            // The client's mistake, worded as Valkey words it.
            Target::CrossSlot => return Err(Refusal::CrossSlot.into()),
            _ => topo
                .nodes
                .get((lane % topo.nodes.len().max(1) as u64) as usize),
        };
        node.cloned()
            .ok_or_else(|| Error::upstream("CLUSTERDOWN Hash slot not served"))
    }

    /// Which node serves `args`' keys, as far as known without asking Valkey.
    pub fn owner_of(&self, args: &[Bytes]) -> Owner {
        let Some(table) = self.command_table() else {
            return Owner::Unknown;
        };
        match target(&table, args) {
            Target::Slot(s) | Target::Read(s) => match self.topology().node_for(s) {
                Some(n) => Owner::Node(n.addr.clone()),
                None => Owner::Unknown,
            },
            Target::CrossSlot => Owner::CrossSlot,
            _ => Owner::Unknown,
        }
    }

    /// The address serving one key's slot.
    pub fn addr_for_key(&self, key: &[u8]) -> Option<String> {
        self.topology()
            .node_for(slot_of(key))
            .map(|n| n.addr.clone())
    }

    /// Asks for a refresh of the slot map (after a redirect on a dedicated connection).
    pub fn refresh_soon(&self) {
        self.refresh_now.notify_one();
    }

    async fn table_loaded(&self, lane: u64) -> Result<Arc<CommandTable>> {
        if let Some(t) = self.command_table() {
            return Ok(t);
        }
        let raw = self
            .request(
                Target::Any,
                lane,
                Bytes::from_static(b"*1\r\n$7\r\nCOMMAND\r\n"),
            )
            .await?;
        self.table
            .set_from(&raw)
            .ok_or_else(|| Error::upstream("the cluster's COMMAND reply could not be read"))
    }

    /// `COMMAND GETKEYS`: the keys of a command whose key positions depend on its arguments.
    async fn movable_target(&self, lane: u64, args: &[Bytes]) -> Result<Target> {
        let mut q = vec![
            Bytes::from_static(b"COMMAND"),
            Bytes::from_static(b"GETKEYS"),
        ];
        q.extend(args.iter().cloned());
        let raw = self
            .request(Target::Any, lane, encode_multibulk(&q))
            .await?;
        if raw.first() == Some(&b'-') {
            // No keys in these arguments: any node answers (and reports any argument error).
            return Ok(Target::Any);
        }
        let Some(keys) = decode(&raw).and_then(Value::into_array) else {
            return Err(Error::upstream("unexpected COMMAND GETKEYS reply"));
        };
        let slots = keys.iter().filter_map(|k| k.bytes().map(slot_of));
        Ok(same_slot(slots))
    }

    /// One request to where `t` says, awaited (RESP2).
    async fn request(&self, t: Target, lane: u64, raw: Bytes) -> Result<Bytes> {
        let topo = self.topology();
        await_reply(self.dispatch(&topo, t, (lane, None), Proto::Resp2, raw, &[])).await
    }

    /// Loads the slot map from any node that answers and swaps it in.
    async fn refresh(&self) -> Result<()> {
        let mut candidates: Vec<String> = self
            .topology()
            .nodes
            .iter()
            .map(|n| n.addr.clone())
            .collect();
        candidates.extend(self.seeds.iter().cloned());
        let mut last = Error::upstream("no cluster node configured");
        for addr in candidates {
            match self.slots_from(&addr).await {
                Ok(map) => {
                    self.refreshes.fetch_add(1, Ordering::Relaxed);
                    self.install(map);
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn slots_from(&self, addr: &str) -> Result<Vec<SlotRange>> {
        let ep = self.base.at(addr);
        let mut conn = connect(&ep, Proto::Resp2).await?;
        conn.write_all(b"*2\r\n$7\r\nCLUSTER\r\n$5\r\nSLOTS\r\n")
            .await
            .map_err(|e| Error::upstream(format!("cannot write to Valkey at {addr}: {e}")))?;
        let raw = tokio::time::timeout(ep.command_timeout, conn.read_frame())
            .await
            .map_err(|_| Error::upstream(format!("CLUSTER SLOTS timed out at {addr}")))??;
        parse_slots(&raw, addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr))
    }

    /// Swaps in the map of `ranges`, keeping the nodes (and their connections) already known.
    fn install(&self, ranges: Vec<SlotRange>) {
        let old = self.topology();
        let mut addrs: Vec<String> = ranges.iter().map(|r| r.primary.clone()).collect();
        addrs.sort();
        addrs.dedup();
        let nodes: Vec<Arc<Node>> = addrs
            .iter()
            .map(|a| match old.nodes.iter().find(|n| &n.addr == a) {
                Some(n) => Arc::clone(n),
                None => self.new_node(a, false),
            })
            .collect();
        let replicas: Vec<Vec<Arc<Node>>> = addrs
            .iter()
            .map(|a| self.replicas_of(&old, &ranges, a))
            .collect();
        let index: HashMap<&str, u16> = addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (a.as_str(), i as u16))
            .collect();
        let mut slots = vec![UNASSIGNED; SLOTS];
        for r in &ranges {
            for s in r.from..=r.to.min(SLOTS as u16 - 1) {
                slots[s as usize] = index[r.primary.as_str()];
            }
        }
        *self.topo.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Topology {
            slots,
            nodes,
            replicas,
        });
        self.ready.send_replace(true);
    }

    /// The replicas listed for `primary` (none unless replica reads are on), reusing the ones
    /// already known with their connections.
    fn replicas_of(&self, old: &Topology, ranges: &[SlotRange], primary: &str) -> Vec<Arc<Node>> {
        if !self.replica_reads {
            return Vec::new();
        }
        let mut addrs: Vec<&String> = ranges
            .iter()
            .filter(|r| r.primary == primary)
            .flat_map(|r| &r.replicas)
            .collect();
        addrs.sort();
        addrs.dedup();
        addrs
            .into_iter()
            .map(
                |a| match old.replicas.iter().flatten().find(|n| &n.addr == a) {
                    Some(n) => Arc::clone(n),
                    None => self.new_node(a, true),
                },
            )
            .collect()
    }

    /// A node's shared connections (opened on first use); `replica`: a replica serving reads,
    /// whose connections send `READONLY`.
    fn new_node(&self, addr: &str, replica: bool) -> Arc<Node> {
        let endpoint = Arc::new(if replica {
            self.base.replica_at(addr)
        } else {
            self.base.at(addr)
        });
        let tracking = Arc::new(TrackingState::default());
        let long = &self.long;
        let recovered = Arc::new(super::mux::Recovered::default());
        let spawn = |proto| {
            (0..self.pool_size)
                .map(|_| {
                    Mux::spawn(
                        Arc::clone(&endpoint),
                        proto,
                        Arc::clone(&tracking),
                        Some(self.redirects.clone()),
                        (Arc::clone(long), Arc::clone(&recovered)),
                    )
                })
                .collect::<Vec<_>>()
        };
        let node = Arc::new(Node {
            addr: addr.to_string(),
            shared2: spawn(Proto::Resp2),
            shared3: spawn(Proto::Resp3),
            endpoint,
            tracking,
            tracking_started: AtomicBool::new(false),
            failed_until: AtomicU64::new(0),
        });
        if let (Some(on), false) = (self.on_tracking.get(), replica) {
            node.start_tracking(on);
        }
        node
    }

    /// Starts tracking on every node, now and as nodes join, for the L1.
    pub fn start_tracking(&self, on_event: OnTracking) {
        let on = self.on_tracking.get_or_init(|| on_event);
        for node in self.nodes() {
            node.start_tracking(on);
        }
    }

    /// True while every known node's tracking connection is up.
    pub fn tracking_up(&self) -> bool {
        let nodes = self.nodes();
        !nodes.is_empty() && nodes.iter().all(|n| n.tracking.current().0 != 0)
    }

    /// A tracked lookup for the L1 on the key's node, or `None` while that node's tracking
    /// connection is down (or the map is not loaded): then nothing read may enter the L1.
    pub fn send_tracked(
        &self,
        lane: u64,
        proto: Proto,
        raw: Bytes,
        key: &[u8],
        budget: Option<&Arc<ReplyBudget>>,
    ) -> Option<ReplyRx> {
        let topo = self.topology();
        let node = topo.node_for(slot_of(key))?;
        if self.on_tracking.get().is_none() || node.tracking.current().0 == 0 {
            return None;
        }
        Some(node.mux(proto, lane).send_tracked(raw, lane, budget, None))
    }

    /// Follows a redirect: sends `job` to `addr`, and for a `-MOVED` records that the slot now
    /// lives there (a full refresh follows). The job is queued *before* the map changes, so a
    /// later command of the client for that slot cannot overtake it.
    fn redirect(&self, slot: Option<u16>, addr: &str, job: super::mux::Job) {
        let mut guard = self.topo.write().unwrap_or_else(|p| p.into_inner());
        let known = guard.nodes.iter().position(|n| n.addr == addr);
        if let (Some(i), None) = (known, slot) {
            guard.nodes[i].resend_job(job);
            return;
        }
        let mut topo = Topology {
            slots: guard.slots.clone(),
            nodes: guard.nodes.clone(),
            replicas: guard.replicas.clone(),
        };
        let i = known.unwrap_or_else(|| {
            topo.nodes.push(self.new_node(addr, false));
            topo.replicas.push(Vec::new());
            topo.nodes.len() - 1
        });
        topo.nodes[i].resend_job(job);
        if let Some(slot) = slot {
            topo.slots[slot as usize] = i as u16;
        }
        *guard = Arc::new(topo);
    }

    /// Any node's Valkey version, once a handshake has completed.
    pub fn server_version(&self) -> String {
        self.topology()
            .nodes
            .iter()
            .map(|n| n.server_version())
            .find(|v| !v.is_empty())
            .unwrap_or_default()
    }

    /// Opens the shared connections once the map is known (a PING each), to the primaries and
    /// to the replicas serving reads.
    pub fn warm_up(self: &Arc<Self>) {
        let c = Arc::clone(self);
        tokio::spawn(async move {
            if c.wait_ready().await.is_err() {
                return;
            }
            let _ = c.table_loaded(0).await;
            let topo = c.topology();
            for node in topo.nodes.iter().chain(topo.replicas.iter().flatten()) {
                for mux in node.shared2.iter().chain(&node.shared3) {
                    drop(mux.send(Bytes::from_static(b"*1\r\n$4\r\nPING\r\n")));
                }
            }
        });
    }
}

/// A replica's reply saying it cannot serve reads now — still loading a full sync
/// (`-LOADING`), or cut off from its primary with `replica-serve-stale-data no`
/// (`-MASTERDOWN`): the primary answers instead.
fn replica_cannot_serve(frame: &[u8]) -> bool {
    frame.starts_with(b"-LOADING") || frame.starts_with(b"-MASTERDOWN")
}

/// Queues the request on every primary now, and combines their replies on a task.
fn fanout(
    nodes: &[Arc<Node>],
    how: Fanout,
    lane: u64,
    proto: Proto,
    raw: Bytes,
    args: &[Bytes],
) -> ReplyRx {
    if let Fanout::Scan = how {
        return scan(nodes, lane, proto, args);
    }
    let (tx, rx) = oneshot::channel();
    let rxs: Vec<ReplyRx> = nodes
        .iter()
        .map(|n| n.mux(proto, lane).send_lane(raw.clone(), lane))
        .collect();
    tokio::spawn(async move {
        let _ = tx.send(combine(how, rxs).await);
    });
    rx
}

async fn combine(how: Fanout, rxs: Vec<ReplyRx>) -> Result<Bytes> {
    let mut replies = Vec::with_capacity(rxs.len());
    for rx in rxs {
        replies.push(await_reply(rx).await?);
    }
    if let Some(err) = replies.iter().find(|r| r.first() == Some(&b'-')) {
        return Ok(err.clone());
    }
    Ok(match how {
        Fanout::Sum => {
            let total: i64 = replies.iter().filter_map(|r| parse_int(r)).sum();
            Bytes::from(format!(":{total}\r\n"))
        }
        Fanout::Concat => concat_arrays(&replies),
        Fanout::Same | Fanout::Scan => replies.into_iter().next().unwrap_or_default(),
    })
}

fn ready(r: Result<Bytes>) -> ReplyRx {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(r);
    rx
}

async fn await_reply(rx: ReplyRx) -> Result<Bytes> {
    rx.await.map_err(|_| super::reply_lost())?
}

/// Keeps the slot map current: at start (retrying until a node answers), every few seconds,
/// and at once when a redirect shows it is out of date.
async fn refresher(cluster: std::sync::Weak<Cluster>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(c) = cluster.upgrade() else { return };
        let outcome = c.refresh().await;
        *c.last_error.lock().unwrap_or_else(|p| p.into_inner()) = outcome.clone().err();
        let wait = match outcome {
            Ok(()) => {
                backoff = Duration::from_millis(50);
                REFRESH_EVERY
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot load the cluster's slot map; retrying");
                backoff = (backoff * 2).min(Duration::from_secs(2));
                backoff
            }
        };
        let notified = async {
            c.refresh_now.notified().await;
            // Redirects come in bursts during a migration: one refresh for the burst.
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        tokio::select! {
            _ = notified => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Sends redirected requests where Valkey said.
async fn redirector(cluster: std::sync::Weak<Cluster>, mut rx: mpsc::UnboundedReceiver<Redirect>) {
    while let Some(mut r) = rx.recv().await {
        let Some(c) = cluster.upgrade() else { return };
        if r.job.hops >= MAX_HOPS {
            let msg = format!("TRYAGAIN too many cluster redirects for slot {}", r.slot);
            r.job.reply.fail(&Error::upstream(msg));
            continue;
        }
        r.job.hops += 1;
        if std::mem::take(&mut r.job.tracked) {
            // A tracked L1 lookup going elsewhere: the new node may not track it yet, so the
            // L1 starts over rather than take in a value nobody would invalidate. Redirects
            // are rare (slot migrations).
            if let Some(on) = c.on_tracking.get() {
                on(TrackingEvent::Flush);
            }
        }
        let addr = if r.addr.starts_with(':') {
            // An empty host: the node that answered, which shares the seed's host here.
            let host = c
                .base
                .addr
                .rsplit_once(':')
                .map(|(h, _)| h)
                .unwrap_or("127.0.0.1");
            format!("{host}{}", r.addr)
        } else {
            r.addr.clone()
        };
        if r.ask {
            c.ask.fetch_add(1, Ordering::Relaxed);
            r.job.asking = true;
            c.redirect(None, &addr, r.job);
        } else {
            c.moved.fetch_add(1, Ordering::Relaxed);
            c.refresh_soon();
            c.redirect(Some(r.slot), &addr, r.job);
        }
    }
}

impl Node {
    /// Sends a redirected request on this node's connection of the same protocol.
    fn resend_job(&self, job: super::mux::Job) {
        let pool = if job.resp3 {
            &self.shared3
        } else {
            &self.shared2
        };
        pool[(job.lane % pool.len() as u64) as usize].resend(job);
    }
}

/// Where `args` must go, from the command table.
fn target(table: &CommandTable, args: &[Bytes]) -> Target {
    let name = args.first().map(|a| &a[..]).unwrap_or_default();
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    let sub_is = |subs: &[&[u8]]| {
        args.get(1)
            .is_some_and(|a| subs.iter().any(|s| a.eq_ignore_ascii_case(s)))
    };
    if is(b"FLUSHALL") || is(b"FLUSHDB") {
        return Target::Fanout(Fanout::Same);
    }
    if is(b"DBSIZE") {
        return Target::Fanout(Fanout::Sum);
    }
    if is(b"KEYS") {
        return Target::Fanout(Fanout::Concat);
    }
    if is(b"SCAN") {
        return Target::Fanout(Fanout::Scan);
    }
    if (is(b"SCRIPT") && sub_is(&[b"LOAD", b"FLUSH"]))
        || (is(b"FUNCTION") && sub_is(&[b"LOAD", b"FLUSH", b"DELETE", b"RESTORE"]))
    {
        return Target::Fanout(Fanout::Same);
    }
    let Ok(info) = table.lookup(args) else {
        return Target::Any;
    };
    // Only the table's `readonly` commands: never a write, a script, a blocking command
    // (those take a dedicated connection anyway) or a keyless one.
    let read = info.readonly && !info.writes && !is_script(name);
    if info.movable {
        return Target::Movable { read };
    }
    match same_slot(info.legacy_keys(args).map(|k| slot_of(k))) {
        Target::Slot(s) if read => Target::Read(s),
        t => t,
    }
}

fn is_script(name: &[u8]) -> bool {
    super::SCRIPT_COMMANDS
        .iter()
        .any(|c| c.eq_ignore_ascii_case(name))
}

fn same_slot(mut slots: impl Iterator<Item = u16>) -> Target {
    let Some(first) = slots.next() else {
        return Target::Any;
    };
    if slots.all(|s| s == first) {
        Target::Slot(first)
    } else {
        Target::CrossSlot
    }
}

/// One range of `CLUSTER SLOTS`: its slots, its primary and the replicas listed with it.
/// Valkey lists only replicas that can serve (not failed, not still loading their first sync).
#[derive(Debug, PartialEq)]
struct SlotRange {
    from: u16,
    to: u16,
    primary: String,
    replicas: Vec<String>,
}

/// `CLUSTER SLOTS` → its ranges. An empty host means the node that answered (`host`).
fn parse_slots(raw: &[u8], host: &str) -> Result<Vec<SlotRange>> {
    let bad = || Error::upstream("unexpected CLUSTER SLOTS reply (is valkey.cluster a cluster?)");
    if raw.first() == Some(&b'-') {
        return Err(Error::upstream(format!(
            "CLUSTER SLOTS refused: {}",
            String::from_utf8_lossy(&raw[1..]).trim()
        )));
    }
    let ranges = decode(raw).and_then(Value::into_array).ok_or_else(bad)?;
    let text = |v: &Value| v.bytes().map(|b| String::from_utf8_lossy(b).to_string());
    // `[ip, port, id, …]` → `ip:port`.
    let addr = |node: &Value| -> Option<String> {
        let node = node.array()?;
        let ip = node.first().and_then(text).unwrap_or_default();
        let port = node.get(1).and_then(Value::int)?;
        let ip = if ip.is_empty() || ip == "?" {
            host.to_string()
        } else {
            ip
        };
        Some(format!("{ip}:{port}"))
    };
    let mut out = Vec::new();
    for r in &ranges {
        let f = r.array().ok_or_else(bad)?;
        let (Some(from), Some(to), Some(primary)) = (
            f.first().and_then(Value::int),
            f.get(1).and_then(Value::int),
            f.get(2).and_then(addr),
        ) else {
            return Err(bad());
        };
        out.push(SlotRange {
            from: from as u16,
            to: to as u16,
            primary,
            replicas: f.iter().skip(3).filter_map(addr).collect(),
        });
    }
    if out.is_empty() {
        return Err(Error::upstream("CLUSTERDOWN the cluster serves no slots"));
    }
    Ok(out)
}

fn parse_int(frame: &[u8]) -> Option<i64> {
    std::str::from_utf8(frame.strip_prefix(b":")?)
        .ok()?
        .trim_end()
        .parse()
        .ok()
}

/// Concatenates array replies (`*n\r\n` + n complete frames each).
fn concat_arrays(replies: &[Bytes]) -> Bytes {
    let mut total = 0usize;
    let mut bodies = BytesMut::new();
    for r in replies {
        let Some(nl) = r.iter().position(|&b| b == b'\n') else {
            continue;
        };
        let n: usize = std::str::from_utf8(&r[1..nl])
            .ok()
            .and_then(|s| s.trim_end().parse().ok())
            .unwrap_or(0);
        total += n;
        bodies.extend_from_slice(&r[nl + 1..]);
    }
    let mut out = BytesMut::with_capacity(bodies.len() + 16);
    out.extend_from_slice(format!("*{total}\r\n").as_bytes());
    out.extend_from_slice(&bodies);
    out.freeze()
}

/// Node index bits at the bottom of a cachefront `SCAN` cursor.
const SCAN_NODE_BITS: u32 = 10;

/// `SCAN` across primaries: the cursor is the node's own cursor shifted left, with the node's
/// index in the low bits; a node's end (cursor 0) moves on to the next node.
fn scan(nodes: &[Arc<Node>], lane: u64, proto: Proto, args: &[Bytes]) -> ReplyRx {
    let cursor = args
        .get(1)
        .and_then(|c| std::str::from_utf8(c).ok())
        .and_then(|c| c.parse::<u64>().ok());
    let idx = cursor.map(|c| (c & ((1 << SCAN_NODE_BITS) - 1)) as usize);
    let (Some(cursor), Some(idx)) = (cursor, idx.filter(|&i| i < nodes.len())) else {
        return ready(Ok(Refusal::InvalidCursor.frame()));
    };
    let ask = move |node: &Node, node_cursor: u64| {
        let mut q = args.to_vec();
        q[1] = Bytes::from(node_cursor.to_string());
        node.mux(proto, lane).send_lane(encode_multibulk(&q), lane)
    };
    // The first node is asked now, in the client's order; later ones as their turn comes.
    let first = ask(&nodes[idx], cursor >> SCAN_NODE_BITS);
    let (nodes, args) = (nodes.to_vec(), args.to_vec());
    let (tx, rx) = oneshot::channel();
    tokio::spawn(async move {
        let _ = tx.send(scan_on(&nodes, idx, first, lane, proto, &args).await);
    });
    rx
}

/// Awaits a node's SCAN reply and rewrites its cursor; an exhausted node with nothing to
/// show moves straight on to the next one.
async fn scan_on(
    nodes: &[Arc<Node>],
    mut idx: usize,
    mut pending: ReplyRx,
    lane: u64,
    proto: Proto,
    args: &[Bytes],
) -> Result<Bytes> {
    loop {
        let reply = await_reply(pending).await?;
        let Some((next, keys)) = split_scan_reply(&reply) else {
            return Ok(reply);
        };
        let (next_idx, next_cursor) = if next == 0 { (idx + 1, 0) } else { (idx, next) };
        let ours = if next_idx >= nodes.len() {
            0
        } else {
            (next_cursor << SCAN_NODE_BITS) | next_idx as u64
        };
        if next == 0 && ours != 0 && keys.starts_with(b"*0\r\n") {
            idx = next_idx;
            let mut q = args.to_vec();
            q[1] = Bytes::from_static(b"0");
            pending = nodes[idx]
                .mux(proto, lane)
                .send_lane(encode_multibulk(&q), lane);
            continue;
        }
        let c = ours.to_string();
        let mut out = BytesMut::with_capacity(keys.len() + 32);
        out.extend_from_slice(format!("*2\r\n${}\r\n{c}\r\n", c.len()).as_bytes());
        out.extend_from_slice(keys);
        return Ok(out.freeze());
    }
}

/// `*2\r\n$<n>\r\n<cursor>\r\n<keys array>` → (cursor, keys array frame).
fn split_scan_reply(reply: &Bytes) -> Option<(u64, &[u8])> {
    let rest = reply.strip_prefix(b"*2\r\n$")?;
    let nl = rest.iter().position(|&b| b == b'\n')?;
    let len: usize = std::str::from_utf8(&rest[..nl])
        .ok()?
        .trim_end()
        .parse()
        .ok()?;
    let body = rest.get(nl + 1..)?;
    let cursor: u64 = std::str::from_utf8(body.get(..len)?).ok()?.parse().ok()?;
    Some((cursor, body.get(len + 2..)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_follow_hash_tags() {
        // Test vectors from the Valkey Cluster specification.
        assert_eq!(slot_of(b"123456789"), 12739);
        assert_eq!(
            slot_of(b"{user1000}.following"),
            slot_of(b"{user1000}.followers")
        );
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_eq!(slot_of(b"foo{{bar}}zap"), slot_of(b"{bar"));
        assert_eq!(slot_of(b"foo{bar}{zap}"), slot_of(b"bar"));
    }

    #[test]
    fn arrays_concatenate() {
        let a = Bytes::from_static(b"*1\r\n$1\r\na\r\n");
        let b = Bytes::from_static(b"*2\r\n$1\r\nb\r\n$1\r\nc\r\n");
        let e = Bytes::from_static(b"*0\r\n");
        assert_eq!(
            &concat_arrays(&[a, e, b])[..],
            b"*3\r\n$1\r\na\r\n$1\r\nb\r\n$1\r\nc\r\n"
        );
    }

    #[test]
    fn scan_replies_split() {
        let r = Bytes::from_static(b"*2\r\n$2\r\n17\r\n*1\r\n$1\r\nk\r\n");
        let (c, keys) = split_scan_reply(&r).unwrap();
        assert_eq!(c, 17);
        assert_eq!(keys, b"*1\r\n$1\r\nk\r\n");
    }

    #[test]
    fn replicas_that_cannot_serve_are_recognised() {
        assert!(replica_cannot_serve(
            b"-LOADING Valkey is loading the dataset in memory\r\n"
        ));
        assert!(replica_cannot_serve(b"-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.\r\n"));
        assert!(!replica_cannot_serve(b"$-1\r\n"));
        assert!(!replica_cannot_serve(
            b"-WRONGTYPE Operation against a key\r\n"
        ));
    }

    #[test]
    fn slot_ranges_carry_their_replicas() {
        let raw = b"*2\r\n\
*4\r\n:0\r\n:99\r\n*3\r\n$9\r\n127.0.0.1\r\n:7000\r\n$2\r\nid\r\n\
*3\r\n$0\r\n\r\n:7003\r\n$2\r\nid\r\n\
*3\r\n:100\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:7001\r\n$2\r\nid\r\n";
        let ranges = parse_slots(raw, "10.0.0.9").unwrap();
        assert_eq!(
            ranges,
            [
                SlotRange {
                    from: 0,
                    to: 99,
                    primary: "127.0.0.1:7000".into(),
                    // An empty host: the node that answered.
                    replicas: vec!["10.0.0.9:7003".into()],
                },
                SlotRange {
                    from: 100,
                    to: 16383,
                    primary: "127.0.0.1:7001".into(),
                    replicas: vec![],
                },
            ]
        );
    }

    #[test]
    fn redirects_parse() {
        use super::super::mux::parse_redirect;
        assert_eq!(
            parse_redirect(b"-MOVED 3999 127.0.0.1:6381\r\n"),
            Some((false, 3999, "127.0.0.1:6381".into()))
        );
        assert_eq!(
            parse_redirect(b"-ASK 12 10.0.0.2:7000\r\n"),
            Some((true, 12, "10.0.0.2:7000".into()))
        );
        assert_eq!(parse_redirect(b"-MOVED 99999 h:1\r\n"), None);
        assert_eq!(parse_redirect(b"-ERR MOVED\r\n"), None);
    }
}
