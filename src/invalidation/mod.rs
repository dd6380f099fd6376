//! Keeping cached entries fresh when PostgreSQL data changes — by any client of the database.
//!
//! What each cached query depends on is resolved by PostgreSQL itself ([`resolve`], over
//! `db::deps`), and every table among it is made to report its writes before an entry is
//! stored. Committed changes arrive from one of two sources: statement triggers that NOTIFY
//! (`db::triggers`; a listening connection merges each notification into the pending work of
//! its table, see [`pending`]) or the logical replication stream ([`wal`]). DDL arrives from
//! the DDL event trigger through either. An applier turns pending work into invalidations in
//! Valkey, each table on its own. Whenever the change stream is (re)established — including
//! at start — every table ever cached is invalidated, because changes made while nobody
//! received them are lost.
//!
//! An invalidation Valkey refuses (out of memory, down) never blocks the others and is never
//! dropped: its table becomes *degraded* — its reads bypass the cache and answer from
//! PostgreSQL (`Cache::bypasses`) — and it is retried with backoff until it applies, which
//! ends the degraded state. Meta keys of the wrong type are repaired by the scripts
//! themselves (see `cache::store`).
//!
//! Several instances sharing one Valkey apply each change once (see [`lease`]): every
//! instance runs its consumer — it keeps its own resolutions and prepared statements fresh —
//! but only the lease holder applies changes to Valkey (and only its fills may read replicas);
//! the others drop what they heard, and the next holder flushes everything when it takes over.

use futures::StreamExt;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::AsyncMessage;

use tokio::sync::watch;

use crate::cache::coalesce::Coalescer;
use crate::cache::named::{Named, NamedQuery};
use crate::cache::{Cache, Version};
use crate::config::{ChangeSource, InvalidationConfig};
use crate::db::triggers;
use crate::db::{Db, DbError};
use crate::error::Result;
use crate::metrics::{inc, Metrics};
pub use applied::Applied;
pub use lease::Lease;
use pending::{Change, Pending, Work};
pub use resolve::{Resolution, Untrackable};

mod applied;
mod lease;
pub mod pending;
mod resolve;
mod wal;

/// A named query whose key is one row's key value, as seen from one table of the key
/// table's family (the key table itself, its partitions or children, its ancestors).
#[derive(Clone)]
struct RowBinding {
    /// The key table's OID: the row versions live under it.
    row_table: String,
    column: String,
    query: Arc<NamedQuery>,
}

/// What the invalidation side knows: what each cached query depends on (as PostgreSQL
/// resolved it), which tables report their writes, which named queries are keyed by which
/// column, and whether the listener is listening.
pub struct Invalidation {
    cfg: InvalidationConfig,
    metrics: Arc<Metrics>,
    /// The named queries in force (their dependencies are resolved when the listener starts).
    named: Mutex<Named>,
    /// Row-keyed named queries, by the OID of each table whose writes carry their rows.
    bindings: Mutex<Arc<HashMap<String, Vec<RowBinding>>>>,
    /// Whether the listener is connected and listening.
    listening: watch::Sender<bool>,
    /// Whether it hears every committed change (with the WAL source, only the lease holder
    /// streams them; the others hear DDL only).
    hearing: AtomicBool,
    /// Which of the instances sharing this Valkey applies changes to it.
    lease: Lease,
    /// How far the fleet's applied invalidations reach (read-your-writes, see [`applied`]).
    applied: Applied,
    /// Query texts (and key table names) → what PostgreSQL resolved them to. Emptied by any
    /// DDL, so the next fill asks again; a failure is never kept. Looked up on every fill:
    /// hashed with foldhash, seeded per process, which costs a fraction of SipHash on a
    /// query's text.
    resolutions: Mutex<HashMap<String, Arc<Resolution>, foldhash::fast::RandomState>>,
    /// Bumped with every emptying of `resolutions`: a resolution that raced a DDL is not kept.
    generation: AtomicU64,
    /// Resolutions being asked, by query text: concurrent misses share one.
    resolving: Arc<Coalescer<Arc<Resolution>>>,
    /// Tables whose triggers this process has checked (with the key columns then bound).
    watched: Mutex<HashSet<u32>>,
    /// Tables whose triggers could not be installed, and when that was last tried.
    unwatched: Mutex<HashMap<u32, Instant>>,
    /// Why the DDL event trigger is not in place (`None` while it is, or before the check).
    ddl_hook_missing: Mutex<Option<String>>,
    /// When each table's last invalidation was applied (Unix milliseconds), by OID; at most
    /// [`MAX_LAST_INVALIDATED`] tables (then forgotten and started afresh).
    last_invalidated: Mutex<HashMap<String, u64>>,
}

/// Most tables whose last invalidation time is kept.
const MAX_LAST_INVALIDATED: usize = 100_000;

impl Invalidation {
    pub fn new(cfg: &InvalidationConfig, named: &Named, metrics: Arc<Metrics>) -> Invalidation {
        Invalidation {
            cfg: cfg.clone(),
            metrics,
            named: Mutex::new(named.clone()),
            bindings: Mutex::new(Arc::new(HashMap::new())),
            listening: watch::Sender::new(false),
            hearing: AtomicBool::new(false),
            lease: Lease::new(cfg.lease_ms),
            applied: Applied::default(),
            resolutions: Mutex::new(HashMap::default()),
            generation: AtomicU64::new(0),
            resolving: Arc::new(Coalescer::default()),
            watched: Mutex::new(HashSet::new()),
            unwatched: Mutex::new(HashMap::new()),
            ddl_hook_missing: Mutex::new(None),
            last_invalidated: Mutex::new(HashMap::new()),
        }
    }

    /// After a reload: the named queries now in force. Their bindings are made again as
    /// they are resolved, and tables are checked again for the key columns then bound.
    pub fn set_named(&self, named: &Named) {
        *lock(&self.named) = named.clone();
        *lock(&self.bindings) = Arc::new(HashMap::new());
        lock(&self.watched).clear();
    }

    /// An invalidation of `table` (an OID) was applied now.
    fn note_invalidated(&self, table: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut map = lock(&self.last_invalidated);
        if map.len() >= MAX_LAST_INVALIDATED && !map.contains_key(table) {
            map.clear();
        }
        map.insert(table.to_string(), now);
    }

    /// When an invalidation of any of `deps` (OIDs) was last applied, in Unix milliseconds.
    pub fn last_invalidated(&self, deps: &[String]) -> Option<u64> {
        let map = lock(&self.last_invalidated);
        deps.iter().filter_map(|d| map.get(d).copied()).max()
    }

    /// Whether the listener is connected and listening.
    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    /// `on`: listening; `hearing`: to every committed change, not DDL only.
    fn set_listening(&self, on: bool, hearing: bool) {
        self.hearing.store(on && hearing, Ordering::Release);
        self.listening.send_replace(on);
    }

    /// Whether this process hears every committed change and applies it, so its fills may
    /// read a replica that has replayed what their versions require (`command::fill::must_see`):
    /// only the lease holder does. Another instance's fill can read a version the holder has
    /// just bumped before this process heard of the write; on a replica that has not replayed
    /// it, it would store old rows under the new version, and no invalidation of this process
    /// would follow to drop them. So the other instances' fills read the primary.
    pub fn sees_changes(&self) -> bool {
        self.is_listening() && self.hearing.load(Ordering::Acquire) && self.lease.holding()
    }

    /// The invalidation lease: whether this instance applies changes to Valkey.
    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Waits at most `limit` until every change committed in PostgreSQL up to the WAL
    /// position `lsn` has been applied to Valkey, by whichever instance applies (see
    /// [`applied`]). True if so, false past the bound.
    pub async fn wait_applied(&self, lsn: u64, limit: Duration) -> bool {
        if self.applied.known() >= lsn {
            return true;
        }
        inc(&self.metrics.read_after_waits);
        let reached = self.applied.wait(lsn, limit).await;
        if !reached {
            inc(&self.metrics.read_after_timeouts);
        }
        reached
    }

    /// At start, waits (at most `limit`) until the listener is listening: an entry stored
    /// just before the listener's first flush would be thrown away by it. Later outages
    /// don't wait: what is stored while the listener is down is flushed when it comes back,
    /// and a database that is down should fail misses fast, not after a wait.
    pub async fn wait_listening(&self, limit: Duration) {
        if !self.cfg.enabled
            || self.is_listening()
            || self.metrics.listener_reconnects.load(Ordering::Relaxed) > 0
        {
            return;
        }
        let mut rx = self.listening.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|on| *on)).await;
    }

    fn bindings(&self) -> Arc<HashMap<String, Vec<RowBinding>>> {
        Arc::clone(&lock(&self.bindings))
    }

    /// Key columns whose values notifications for the table `oid` must carry.
    fn key_columns(&self, oid: u32) -> Vec<String> {
        let cols: BTreeSet<String> = self
            .bindings()
            .get(&oid.to_string())
            .map(|b| b.iter().map(|b| b.column.clone()).collect())
            .unwrap_or_default();
        cols.into_iter().collect()
    }

    /// Binds a row-keyed query to every table of its key table's family (`family`, which
    /// includes `row_table`): their notifications carry the key column, and a change there is
    /// a change of the row under `row_table`. Tables newly bound are checked again, so their
    /// triggers carry the column. Binding again as before changes nothing.
    fn bind_rows(&self, query: &Arc<NamedQuery>, row_table: u32, family: &[u32]) {
        let Some(rk) = &query.row_key else { return };
        let row_table = row_table.to_string();
        let mut bindings = lock(&self.bindings);
        let bound_to = |t: &str| {
            bindings.get(t).is_some_and(|list| {
                list.iter()
                    .any(|b| b.query.name == query.name && b.row_table == row_table)
            })
        };
        let already: usize = bindings
            .values()
            .flatten()
            .filter(|b| b.query.name == query.name)
            .count();
        if already == family.len() && family.iter().all(|t| bound_to(&t.to_string())) {
            return;
        }
        let mut next: HashMap<String, Vec<RowBinding>> = HashMap::new();
        for (t, list) in bindings.iter() {
            let kept = list
                .iter()
                .filter(|b| b.query.name != query.name)
                .map(RowBinding::clone)
                .collect();
            next.insert(t.clone(), kept);
        }
        let mut watched = lock(&self.watched);
        for oid in family {
            next.entry(oid.to_string()).or_default().push(RowBinding {
                row_table: row_table.clone(),
                column: rk.column.clone(),
                query: Arc::clone(query),
            });
            watched.remove(oid);
        }
        next.retain(|_, v| !v.is_empty());
        *bindings = Arc::new(next);
    }

    /// Installs the DDL hook, and resolves and watches every named query plus
    /// `invalidation.tables`, so their tables report writes before the first miss.
    pub async fn install_configured(self: &Arc<Self>, db: &Db) -> Result<()> {
        self.install_ddl_hook(db).await;
        let named: Vec<Arc<NamedQuery>> = lock(&self.named).values().cloned().collect();
        let mut first_error = None;
        for q in named {
            if let Err(e) = self.prepare_named(db, &q).await {
                tracing::warn!(command = %q.name, error = %e, "cannot resolve a named query's dependencies yet");
                first_error.get_or_insert(e);
            }
        }
        for name in &self.cfg.tables {
            match self.resolve_table(db, name).await {
                Ok(Some((_, res))) => {
                    self.watch(db, &res).await;
                }
                Ok(None) => {
                    tracing::warn!(table = %name, "invalidation.tables names a relation PostgreSQL does not know")
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Resolves a named query (and its key table) and makes its tables report writes.
    async fn prepare_named(self: &Arc<Self>, db: &Db, q: &Arc<NamedQuery>) -> Result<()> {
        let res = self.resolve(db, &q.sql).await?;
        if let Some((_, family)) = self.key_table(db, q).await? {
            self.watch(db, &family).await;
        }
        self.watch(db, &res).await;
        Ok(())
    }

    /// Installs the DDL event trigger if it is missing (and `install_triggers` is on); notes
    /// why it is not there otherwise.
    async fn install_ddl_hook(&self, db: &Db) {
        let result = async {
            let mut client = db.client().await?;
            if self.cfg.install_triggers {
                triggers::install_ddl_hook(&mut client, &self.cfg).await?;
            }
            triggers::ddl_hook_installed(&client).await
        }
        .await;
        let missing = match result {
            Ok(true) => None,
            Ok(false) => Some("not installed (run `cachefront triggers install` as a superuser)".to_string()),
            Err(e) => Some(format!("cannot install it: {e} (it needs a superuser; run `cachefront triggers install` as one)")),
        };
        if let Some(why) = &missing {
            tracing::error!(reason = %why, "the DDL event trigger is not in place: DDL on cached tables is not seen, and materialized views are not cached");
        }
        *lock(&self.ddl_hook_missing) = missing;
    }

    /// For INFO: why the DDL hook is missing, if it is.
    pub fn ddl_hook_missing(&self) -> Option<String> {
        lock(&self.ddl_hook_missing).clone()
    }

    /// Entry keys (and negative-cache markers) of row-keyed named queries for these rows.
    fn row_entry_keys(
        &self,
        cache: &Cache,
        bound: &[&RowBinding],
        column: &str,
        values: &[String],
    ) -> Vec<String> {
        let mut keys = Vec::new();
        for b in bound.iter().filter(|b| b.column == column) {
            for v in values {
                let key = b.query.key_for_row(v);
                keys.push(cache.store.negative_key(&key));
                keys.push(key);
            }
        }
        keys
    }
}

/// Locks a mutex, whatever a panicking holder left (every value here stays consistent).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A notification's payload: a table's change (`o`: its OID; `k`: key column values) or a
/// DDL statement's (`ddl`: the OIDs it touched, or `"all"`). Anything else — a payload of
/// an older cachefront's triggers, a NOTIFY by someone else on the channel — cannot be
/// attributed, so it is taken as "anything may have changed".
fn parse_payload(payload: &str) -> Change {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(payload) else {
        return Change::All;
    };
    if let Some(ddl) = v.get("ddl") {
        return match ddl.as_array() {
            Some(oids) => Change::Ddl(oids.iter().filter_map(oid_text).collect()),
            None => Change::All,
        };
    }
    let Some(table) = v.get("o").and_then(oid_text) else {
        return Change::All;
    };
    let Some(keys) = v.get("k").and_then(|k| k.as_object()) else {
        return Change::Table(table);
    };
    let keys = keys
        .iter()
        .map(|(col, vals)| {
            let vals = vals
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter(|x| !x.is_null())
                        .map(|x| match x {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect()
                })
                .unwrap_or_default();
            (col.clone(), vals)
        })
        .collect();
    Change::Rows { table, keys }
}

/// An OID in a payload (a number, or its text), as the text cache keys use.
fn oid_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => s.parse::<u32>().ok(),
        other => other.as_u64().and_then(|o| u32::try_from(o).ok()),
    }
    .map(|o| o.to_string())
}

/// Notifications received and not yet applied: the connection's driver merges them in as
/// they arrive, the applier takes them all at once. Bounded (see [`pending`]), so a Valkey
/// that refuses writes costs memory per table, not per change.
///
/// With the work, the WAL position it reaches: every change committed up to it was received
/// before (or with) this work — taken and put back together, so a position is published
/// only once everything received before it is applied (see [`applied`]).
#[derive(Default)]
struct Queue {
    pending: Mutex<Queued>,
    wake: tokio::sync::Notify,
}

#[derive(Default)]
struct Queued {
    work: Pending,
    reached: u64,
}

impl Queue {
    fn with<R>(&self, f: impl FnOnce(&mut Pending) -> R) -> R {
        f(&mut lock(&self.pending).work)
    }

    fn push(&self, change: Change) {
        self.with(|p| p.add(change));
        self.wake.notify_one();
    }

    /// Everything committed up to `lsn` has been received (a commit on the stream, a barrier
    /// notification).
    fn reach(&self, lsn: u64) {
        let mut q = lock(&self.pending);
        q.reached = q.reached.max(lsn);
    }

    fn take(&self) -> (Pending, u64) {
        let mut q = lock(&self.pending);
        (std::mem::take(&mut q.work), std::mem::take(&mut q.reached))
    }

    fn put_back(&self, failed: Pending, reached: u64) {
        let mut q = lock(&self.pending);
        q.work.merge(failed);
        q.reached = q.reached.max(reached);
    }

    fn len(&self) -> usize {
        self.with(|p| p.len())
    }
}

/// When to try failed invalidations again: 20 ms after the first failure, doubling to 1 s;
/// back to 20 ms once everything applied.
struct Retry {
    at: Option<tokio::time::Instant>,
    backoff: Duration,
}

const RETRY_MIN: Duration = Duration::from_millis(20);
const RETRY_MAX: Duration = Duration::from_secs(1);

impl Retry {
    fn new() -> Retry {
        Retry {
            at: None,
            backoff: RETRY_MIN,
        }
    }

    fn failed(&mut self) {
        self.at = Some(tokio::time::Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(RETRY_MAX);
    }

    fn succeeded(&mut self) {
        self.at = None;
        self.backoff = RETRY_MIN;
    }

    /// Resolves when a retry is due; never while none is.
    async fn due(&self) {
        match self.at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    }
}

/// Applies one table's pending work: the table's own versions and entries, and, where the
/// table belongs to a row-keyed query's key table family (a partition, a child, a parent),
/// the same change under the key table, where the row versions of its entries live.
async fn apply_work(l: &Listener, table: &str, work: &Work) -> Result<u64> {
    let bindings = l.invalidation.bindings();
    let bound: Vec<&RowBinding> = bindings.get(table).into_iter().flatten().collect();
    let mut row_tables: Vec<&str> = bound.iter().map(|b| b.row_table.as_str()).collect();
    row_tables.sort();
    row_tables.dedup();
    match work {
        Work::Table => {
            let mut tables = vec![table.to_string()];
            tables.extend(row_tables.iter().map(|t| t.to_string()));
            tables.sort();
            tables.dedup();
            l.cache.invalidate(&tables).await
        }
        Work::Rows(columns) => {
            let mut total = 0;
            let mut targets = row_tables.clone();
            if !targets.contains(&table) {
                targets.push(table);
            }
            for target in targets {
                let here: Vec<&RowBinding> = bound
                    .iter()
                    .copied()
                    .filter(|b| b.row_table == target)
                    .collect();
                for (column, values) in columns {
                    let values: Vec<String> = values.iter().cloned().collect();
                    let entry_keys = l
                        .invalidation
                        .row_entry_keys(&l.cache, &here, column, &values);
                    total += l
                        .cache
                        .invalidate_rows(target, column, &values, &entry_keys)
                        .await?;
                }
                if columns.is_empty() {
                    total += l.cache.invalidate(&[target.to_string()]).await?;
                }
            }
            Ok(total)
        }
    }
}

/// Applies everything in `batch`, each table on its own (concurrently), so one that fails
/// holds up no other. Tables that failed become degraded — their reads bypass the cache —
/// and are returned to be retried; tables that applied stop being degraded.
async fn apply_batch(l: &Listener, mut batch: Pending) -> Pending {
    if batch.all && !expand_all(l, &mut batch).await {
        return batch;
    }
    let flushed_all = std::mem::take(&mut batch.all);
    let attempts = batch.tables.into_iter().map(|(table, work)| async move {
        let r = apply_work(l, &table, &work).await;
        (table, work, r)
    });
    let mut failed = Pending::default();
    for (table, work, r) in futures::future::join_all(attempts).await {
        match r {
            Ok(n) => {
                tracing::debug!(table = %table, dropped = n, "invalidated");
                l.invalidation.note_invalidated(&table);
                l.cache.recovered(&table);
            }
            Err(e) => {
                tracing::debug!(table = %table, error = %e, "cannot apply an invalidation yet; will retry");
                inc(&l.metrics().invalidation_failures);
                l.cache.degrade(&table, &e);
                failed.add_work(table, work);
            }
        }
    }
    if flushed_all {
        l.cache.recovered_all();
    }
    failed
}

/// Turns "flush every table" into table-wide work for every table any instance ever cached
/// from, and every table degraded now (its own pending work may have been lost with the
/// connection). False if the registry cannot be read: everything stays degraded.
async fn expand_all(l: &Listener, batch: &mut Pending) -> bool {
    let registered = match l.cache.store.registered_tables().await {
        Ok(t) => t,
        Err(e) => {
            inc(&l.metrics().invalidation_failures);
            l.cache.degrade_all(&e);
            return false;
        }
    };
    let (_, degraded) = l.cache.degraded.snapshot();
    let mut tables = std::mem::take(&mut batch.tables);
    for t in registered.into_iter().chain(degraded) {
        tables.insert(t, Work::Table);
    }
    batch.tables = tables;
    true
}

/// What the listener works with, handed over by the server: the invalidation state, the
/// database it listens to, and the cache it drops entries from.
#[derive(Clone)]
pub struct Listener {
    pub invalidation: Arc<Invalidation>,
    pub db: Db,
    pub cache: Arc<Cache>,
}

impl Listener {
    fn metrics(&self) -> &Metrics {
        &self.invalidation.metrics
    }
}

/// Runs the listener until the process ends — connect, LISTEN, flush what may have been
/// missed, apply notifications; on any failure, reconnect with backoff — beside the task
/// that keeps the invalidation lease (see [`lease`]).
pub async fn run(l: Listener) {
    if !l.invalidation.cfg.enabled {
        return;
    }
    tokio::join!(lease::run(l.clone()), applied::run(l.clone()), consume(&l));
}

/// The change consumer: one connection after the other, until the process ends.
async fn consume(l: &Listener) {
    let max = Duration::from_millis(l.invalidation.cfg.reconnect_max_ms);
    let mut backoff = Duration::from_millis(50);
    loop {
        let served = match l.invalidation.cfg.source {
            ChangeSource::Triggers => listen_once(l).await,
            ChangeSource::Wal => wal::run_once(l).await,
        };
        // Changes go unheard until it is back: an instance that hears them should apply.
        l.invalidation
            .lease()
            .resign(&l.cache.store, "the change consumer was lost")
            .await;
        match served {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) => {
                tracing::warn!(error = %e, "invalidation listener disconnected; reconnecting")
            }
        }
        inc(&l.metrics().listener_reconnects);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(max);
    }
}

async fn listen_once(l: &Listener) -> std::result::Result<(), DbError> {
    let (client, mut connection) = l.db.connect_dedicated().await?;
    let queue = Arc::new(Queue::default());
    let metrics = Arc::clone(&l.invalidation.metrics);
    let invalidation = Arc::clone(&l.invalidation);
    let db = l.db.clone();
    let to_apply = Arc::clone(&queue);
    let mut driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    if let Some(lsn) = applied::barrier_of(n.payload()) {
                        to_apply.reach(lsn);
                        to_apply.wake.notify_one();
                        continue;
                    }
                    inc(&metrics.notifications);
                    let change = parse_payload(n.payload());
                    if matches!(change, Change::All) {
                        tracing::warn!(payload = %n.payload(), "unattributable invalidation notification; flushing everything");
                    }
                    if invalidation.received(&change) {
                        db.schema_changed();
                    }
                    to_apply.push(change);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "invalidation connection failed");
                    return;
                }
            }
        }
    });
    let result = serve(l, &client, &queue, &mut driver).await;
    driver.abort();
    // What was not applied is flushed after reconnecting, with everything else.
    result
}

async fn serve(
    l: &Listener,
    client: &tokio_postgres::Client,
    queue: &Queue,
    driver: &mut tokio::task::JoinHandle<()>,
) -> std::result::Result<(), DbError> {
    let channel = triggers::quote_ident(&l.invalidation.cfg.channel);
    client.batch_execute(&format!("LISTEN {channel}")).await?;
    let mut retry = Retry::new();
    begin_serving(l, client, queue, &mut retry).await?;
    let mut heartbeat = tokio::time::interval(Duration::from_secs(2));
    let mut lease = l.invalidation.lease().subscribe();
    let result = loop {
        tokio::select! {
            _ = queue.wake.notified() => {}
            _ = retry.due() => {}
            // Taken: flush; lost: stop applying.
            _ = lease.changed() => {}
            _ = &mut *driver => break Err(DbError::Unavailable("notification stream ended".into())),
            _ = heartbeat.tick() => {
                // A silent network failure would otherwise leave us deaf without knowing it.
                let ping = tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1")).await;
                match ping {
                    Ok(Ok(_)) => continue,
                    Ok(Err(e)) => break Err(e.into()),
                    Err(_) => break Err(DbError::Unavailable("listener heartbeat timed out".into())),
                }
            }
        }
        if let Err(e) = apply_queued(l, client, queue, &mut retry).await {
            break Err(e);
        }
    };
    l.invalidation.set_listening(false, false);
    result
}

/// Once changes are being received (LISTEN issued, or the stream started): makes the
/// configured tables report writes, forgets resolutions (DDL may have gone unheard), then —
/// if this instance holds the invalidation lease, which it tries to take here so a lone
/// instance starts as it always did — flushes everything, as anything written before this
/// moment may have been missed, and says the listener is listening. An instance that does
/// not hold the lease leaves flushing to the holder (a new holder flushes when it takes over).
async fn begin_serving(
    l: &Listener,
    client: &tokio_postgres::Client,
    queue: &Queue,
    retry: &mut Retry,
) -> std::result::Result<(), DbError> {
    if l.invalidation.received(&Change::All) {
        l.db.schema_changed();
    }
    if let Err(e) = l.invalidation.install_configured(&l.db).await {
        tracing::warn!(error = %e, "cannot make the configured tables report their writes yet");
    }
    let lease = l.invalidation.lease();
    if !lease.holding() {
        lease.acquire(&l.cache.store, l.metrics()).await;
    }
    if lease.holding() {
        // A reconnecting holder flushes as a new one does.
        lease.flushed(0);
    }
    apply_queued(l, client, queue, retry).await?;
    l.invalidation.set_listening(true, true);
    Ok(())
}

/// Takes everything queued (new changes and earlier failures alike) and applies it; what
/// fails goes back in the queue, retried after a backoff or with the next notification.
/// Only the lease holder applies; it begins each term with a flush of everything.
async fn apply_queued(
    l: &Listener,
    client: &tokio_postgres::Client,
    queue: &Queue,
    retry: &mut Retry,
) -> std::result::Result<(), DbError> {
    let lease = l.invalidation.lease();
    if !lease.holding() {
        skip_queued(l, queue, retry);
        return Ok(());
    }
    let flush = lease.flush_due();
    if flush.is_some() {
        // With read replicas, fills after the flush must not read a replica that has not
        // replayed those writes: every fill must see the position of now (see
        // `db::replicas`).
        if let Some(set) = l.db.replicas() {
            set.raise_all(l.db.wal_insert_lsn(client).await?);
        }
        queue.with(Pending::flush_all);
    }
    let (batch, reached) = queue.take();
    let mut all_applied = true;
    if !batch.is_empty() {
        // Before any version is bumped. If the position cannot be read, reconnecting
        // flushes everything, these tables included.
        if let Err(e) = require_seen(l, client, &batch).await {
            queue.put_back(batch, reached);
            return Err(e);
        }
        let failed = apply_batch(l, batch).await;
        if failed.is_empty() {
            retry.succeeded();
        } else {
            queue.put_back(failed, reached);
            all_applied = false;
            retry.failed();
        }
    }
    // Everything received up to `reached` was in this batch or applied before it.
    if all_applied && reached > 0 {
        l.invalidation
            .applied
            .publish(&l.cache.store, reached)
            .await;
    }
    // A flush that fails leaves every read bypassing the cache until it is applied, so the
    // term's applier is in place either way; the other instances hear of it once it applied.
    if let Some(term) = flush {
        lease.flushed(term);
    }
    let pending = queue.len() as u64;
    // Everything applied since the term began, its flush included: the other instances may
    // trust the cache again.
    if pending == 0 {
        lease.mark_flushed(&l.cache.store).await;
    }
    l.metrics()
        .invalidation_pending
        .store(pending, Ordering::Relaxed);
    Ok(())
}

/// Another instance holds the lease: it applies what was queued (or, taking over, flushes
/// everything), so this one drops it. (What this process itself needs of a change — its
/// resolutions forgotten on DDL — was done on receipt; its fills read the primary, see
/// [`Invalidation::sees_changes`].) What it could not apply while it held the lease stays
/// degraded until a holder's term flush has reached Valkey (`lease::follow_fleet`).
fn skip_queued(l: &Listener, queue: &Queue, retry: &mut Retry) {
    drop(queue.take());
    retry.succeeded();
    l.metrics().invalidation_pending.store(0, Ordering::Relaxed);
}

/// With read replicas: fills that will check a version this batch bumps must see the
/// primary's WAL as of now, which includes the writes that sent them (see `db::replicas`).
/// Mirrors what [`apply_work`] bumps: a table's version and epoch, or a table's version and
/// its rows' versions; a flush of everything, every version.
async fn require_seen(
    l: &Listener,
    client: &tokio_postgres::Client,
    batch: &Pending,
) -> std::result::Result<(), DbError> {
    let Some(set) = l.db.replicas() else {
        return Ok(());
    };
    if batch.tables.is_empty() && !batch.all {
        return Ok(());
    }
    let lsn = l.db.wal_insert_lsn(client).await?;
    if batch.all {
        set.raise_all(lsn);
    }
    for (table, work) in &batch.tables {
        match work {
            Work::Table => set.raise(Version::of_table(table), lsn),
            Work::Rows(columns) => {
                set.raise([Version::Table(table)], lsn);
                for (column, values) in columns {
                    set.raise(
                        values.iter().map(|value| Version::Row {
                            table,
                            column,
                            value,
                        }),
                        lsn,
                    );
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads() {
        assert_eq!(
            parse_payload(r#"{"o":16384,"k":{"id":[7,8,null],"code":["a"]}}"#),
            Change::Rows {
                table: "16384".into(),
                keys: vec![
                    ("id".into(), vec!["7".into(), "8".into()]),
                    ("code".into(), vec!["a".into()])
                ]
            }
        );
        assert_eq!(
            parse_payload(r#"{"o":16384}"#),
            Change::Table("16384".into())
        );
        assert_eq!(
            parse_payload(r#"{"ddl":[1,2]}"#),
            Change::Ddl(vec!["1".into(), "2".into()])
        );
        assert_eq!(parse_payload(r#"{"ddl":"all"}"#), Change::All);
        // An older cachefront's payload, or anyone's NOTIFY: cannot be attributed.
        assert_eq!(
            parse_payload(r#"{"s":"public","t":"employees"}"#),
            Change::All
        );
        assert_eq!(parse_payload("nope"), Change::All);
    }
}
