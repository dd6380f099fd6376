//! The read-through cache: look up, and on a miss fill once, from PostgreSQL, without ever
//! storing a value a concurrent write has made stale.

pub mod cluster_store;
pub mod coalesce;
pub mod degraded;
pub mod fleet;
pub mod flight;
pub mod key;
pub mod l1;
pub mod named;
mod near;
pub mod read;
mod resp;
pub mod store;
pub mod verify;

use bytes::Bytes;
use futures::future::BoxFuture;
use rand::Rng;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::CacheConfig;
use crate::error::Result;
use crate::metrics::{add, inc, Metrics};
use coalesce::Coalescer;
use degraded::Degraded;
use store::{FillLease, LeaseState, Prefill, Store};

/// What an entry was read from, so writes there drop it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deps {
    /// Relations and functions (by OID, as PostgreSQL resolved them; see `db::deps`) any
    /// change to which drops the entry.
    pub tables: Vec<String>,
    /// The one row (of a keyed table) the entry stands for: only that row's changes, or a
    /// table-wide event, drop it.
    pub row: Option<RowDep>,
    /// Whether and how the entry is kept fresh.
    pub tracking: Tracking,
}

/// How an entry is kept fresh. Decided by the invalidation layer when it resolves the
/// entry's query, before any version is read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Tracking {
    /// Not resolved yet in this process (a plan built before PostgreSQL was asked): `tables`
    /// are unknown, so nothing may be decided from them.
    #[default]
    Unresolved,
    /// Every dependency reports its changes: invalidated on write.
    Tracked,
    /// PostgreSQL cannot say everything the query reads, and the operator opted into
    /// caching it anyway: no dependencies, fresh only by its TTL.
    TtlOnly,
    /// A table it reads does not report its writes yet (installing its triggers failed; it
    /// is retried): answered from PostgreSQL and not stored.
    Unwatched,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowDep {
    pub table: String,
    pub column: String,
    pub value: String,
}

/// One version counter in Valkey (see [`store`]): a table's, a table's epoch, or one row's.
/// A fill checks those of its entry ([`Deps::versions`]); an invalidation bumps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version<'a> {
    Table(&'a str),
    Epoch(&'a str),
    Row {
        table: &'a str,
        column: &'a str,
        value: &'a str,
    },
}

impl Version<'_> {
    /// Bumped by a table-wide invalidation of `table`.
    pub fn of_table(table: &str) -> [Version<'_>; 2] {
        [Version::Table(table), Version::Epoch(table)]
    }
}

impl Deps {
    /// The versions a fill of these dependencies checks: each table's, and for a row-keyed
    /// entry its table's epoch and its row's.
    pub fn versions(&self) -> Vec<Version<'_>> {
        let mut v: Vec<Version<'_>> = self.tables.iter().map(|t| Version::Table(t)).collect();
        if let Some(r) = &self.row {
            v.push(Version::Epoch(&r.table));
            v.push(Version::Row {
                table: &r.table,
                column: &r.column,
                value: &r.value,
            });
        }
        v
    }
}

/// One cache entry's identity and what it depends on.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    /// Seconds.
    pub ttl: u64,
    pub deps: Deps,
}

impl Entry {
    /// Its dependencies as the L1 keeps them.
    pub fn l1_deps(&self) -> Arc<l1::ItemDeps> {
        Arc::new(l1::ItemDeps {
            tables: self.deps.tables.clone(),
            row_table: self.deps.row.as_ref().map(|r| r.table.clone()),
        })
    }

    /// Every table the entry depends on, row-keyed or not.
    pub fn tables(&self) -> Vec<String> {
        let mut t = self.deps.tables.clone();
        if let Some(r) = &self.deps.row {
            t.push(r.table.clone());
        }
        t
    }
}

/// What a fill produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// No row: nothing to cache (unless negative caching is on).
    Absent,
    String(Bytes),
    Hash(Vec<(String, Bytes)>),
}

impl Value {
    /// Bytes of data it stores (a hash's field names and values).
    pub fn size(&self) -> usize {
        match self {
            Value::Absent => 0,
            Value::String(b) => b.len(),
            Value::Hash(f) => f.iter().map(|(k, v)| k.len() + v.len()).sum(),
        }
    }
}

/// How a cached read was answered: returned with every reply of the read path
/// ([`read`]), which the connection times by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// From the in-process L1.
    L1Hit,
    /// From Valkey's lookup.
    Hit,
    /// "No such row", remembered by a negative entry (found by the fill, not the lookup).
    NegativeHit,
    /// Filled by this request.
    Miss,
    /// Filled by a concurrent request this one waited for.
    Coalesced,
    /// Valkey was unavailable; answered straight from PostgreSQL.
    FailOpen,
    /// PostgreSQL failed; answered with the last value filled, within `stale_if_error_secs`.
    Stale,
    /// An invalidation of the entry's tables is pending (see [`degraded`]); answered from
    /// PostgreSQL, nothing stored.
    Degraded,
    /// The read failed; the reply is the error.
    Error,
}

impl CacheStatus {
    /// Answered by a lookup alone (the L1 or Valkey), without a fill: timed as a hit.
    pub fn is_hit(self) -> bool {
        matches!(self, CacheStatus::L1Hit | CacheStatus::Hit)
    }
}

pub use l1::Freshness;

/// The entries this instance filled, with their [`Freshness`] (for early refresh).
type Recent = moka::sync::Cache<String, Freshness, foldhash::fast::RandomState>;

/// Cache operations shared by every connection.
pub struct Cache {
    pub store: Store,
    pub l1: Arc<l1::L1>,
    /// Tracked lookups in flight, which reads missing the L1 may wait for (see `flight`).
    pub flights: Arc<flight::Flights>,
    coalescer: Arc<Coalescer<(Value, CacheStatus)>>,
    metrics: Arc<Metrics>,
    recent: Recent,
    early_refresh_beta: f64,
    ttl_jitter: f64,
    /// Tables already recorded in Valkey's registry by this process.
    registered: Mutex<std::collections::HashSet<String>>,
    /// Queries being resolved so that their hits may enter the L1 (see
    /// `read::Cache::resolve_for_l1`), by SQL text: one resolution each at a time.
    resolving: Mutex<std::collections::HashSet<String>>,
    /// Last filled values, served if PostgreSQL fails (`cache.stale_if_error_secs`).
    stale: Option<moka::sync::Cache<String, Value>>,
    /// Tables whose pending invalidation could not be applied yet: their reads bypass the
    /// cache (see [`Cache::bypasses`]).
    pub degraded: Arc<Degraded>,
    /// The recent fills the verification sampler picks from (see [`verify`]).
    pub verify: Arc<verify::Registry>,
    /// Fleet-wide coalescing: the fill lease and this process's waits on other instances'
    /// fills (see [`fleet`]).
    pub fleet: Arc<fleet::Fleet>,
    /// `cache.reply_before_store`: a miss on a client's shared connection is answered
    /// without waiting for its store (see [`FillOptions::lane`]).
    pub reply_before_store: bool,
}

/// How a miss should be filled.
pub struct FillOptions {
    /// Seconds to remember "no such row", if at all.
    pub negative_ttl: Option<u64>,
    /// The entry is a hash (else a string).
    pub hash: bool,
    /// An early refresh: query even though the entry exists.
    pub refresh: bool,
    /// A read after a write (`Cache::begin_after`): joins no fill in flight (it may have
    /// read PostgreSQL before the write) and serves no stale-if-error value.
    pub fresh: bool,
    /// Where the value comes from, for the verification registry (`None`: not sampled).
    pub sample: Option<verify::Origin>,
    /// The query's figures, which count what is stored (`CACHEFRONT.QUERIES`).
    pub stats: Option<Arc<crate::metrics::QueryStats>>,
    /// The shared connection of the client that asked (its lane and protocol), while its
    /// requests go there: the store goes out there, ahead of the client's next request, and
    /// the answer does not wait for it. `None`: on the key's own connection, and the answer
    /// waits (the client's next request may take another way to Valkey).
    pub lane: Option<(u64, crate::protocol::Proto)>,
    /// The fill's first step, if the lookup took it (see `read::Cache::early_lookup`).
    pub early: Option<Early>,
}

/// What a lookup that was its fill's first step read (see `read::Cache::early_lookup`), and
/// the lease it asked for. A fill that does not use it — it joined another fill in flight,
/// its entry turned out not to be cached through Valkey, or its tables resolved to other
/// versions — drops it, and a lease it took is then given up: no lease outlives its fill.
pub struct Early {
    prefill: Option<Prefill>,
    lease: Option<FillLease>,
    /// The dependencies of the entry it read the versions of: the versions a fill reads
    /// follow from them (see `Deps::versions`).
    deps: Deps,
    store: Store,
}

impl Early {
    pub fn new(prefill: Prefill, lease: FillLease, deps: Deps, store: Store) -> Early {
        Early {
            prefill: Some(prefill),
            lease: Some(lease),
            deps,
            store,
        }
    }

    /// What it read and its lease, for a fill of an entry of dependencies `deps` — or `None`
    /// (and the lease given up) if it read the versions of others.
    fn take_for(mut self, deps: &Deps) -> Option<(Prefill, FillLease)> {
        if self.deps.tables != deps.tables || self.deps.row != deps.row {
            return None;
        }
        self.prefill.take().zip(self.lease.take())
    }
}

impl Drop for Early {
    fn drop(&mut self) {
        let taken = self
            .prefill
            .as_ref()
            .is_some_and(|p| p.lease == LeaseState::Taken);
        if let Some(lease) = self.lease.take().filter(|_| taken) {
            give_up(self.store.clone(), lease);
        }
    }
}

/// Gives up a fill lease nobody will use, on a task of its own (from a `drop`): only if this
/// token still holds it, announcing it so that waiters look again.
pub(crate) fn give_up(store: Store, lease: FillLease) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(async move {
            if let Err(e) = store.release_fill_lease(&lease, false).await {
                tracing::debug!(error = %e, key = %lease.entry, "could not give up an unused fill lease; it expires");
            }
        });
    }
}

/// The largest `-ln r` XFetch can draw, `r` being at least the smallest positive `f64`
/// (`-ln(f64::MIN_POSITIVE)` = 708.39…), rounded up.
const LONGEST_DRAW: f64 = 708.4;

impl Cache {
    pub fn new(store: Store, metrics: Arc<Metrics>, cfg: &CacheConfig) -> Cache {
        Cache {
            store,
            l1: Arc::new(l1::L1::new(
                cfg.l1_max_bytes,
                Duration::from_millis(cfg.l1_ttl_ms),
            )),
            flights: Arc::default(),
            coalescer: Arc::new(Coalescer::default()),
            metrics,
            recent: moka::sync::Cache::builder()
                .max_capacity(cfg.early_refresh_keys)
                // Looked up on every hit from Valkey: foldhash, not SipHash.
                .build_with_hasher(foldhash::fast::RandomState::default()),
            early_refresh_beta: cfg.early_refresh_beta,
            ttl_jitter: cfg.ttl_jitter,
            registered: Mutex::new(Default::default()),
            resolving: Mutex::new(Default::default()),
            stale: (cfg.stale_if_error_secs > 0).then(|| {
                moka::sync::Cache::builder()
                    .max_capacity(cfg.early_refresh_keys)
                    .time_to_live(Duration::from_secs(cfg.stale_if_error_secs))
                    .build()
            }),
            degraded: Arc::default(),
            verify: Arc::default(),
            fleet: Arc::new(fleet::Fleet::new(cfg.fill_lease_ms)),
            reply_before_store: cfg.reply_before_store,
        }
    }

    /// Starts listening for other instances' fills landing (the one subscribed connection
    /// that wakes this process's waits, see [`fleet`]), if fleet-wide coalescing is on.
    /// The caller aborts the task at shutdown.
    pub fn start_fleet(&self) -> Option<tokio::task::JoinHandle<()>> {
        if !self.fleet.enabled() {
            return None;
        }
        let fleet = Arc::clone(&self.fleet);
        Some(self.store.upstream().subscribe(
            self.store.fill_channel(),
            Arc::new(move |heard| fleet.heard(heard)),
        ))
    }

    /// Keeps recent fills for the verification sampler, within `cfg`'s bounds (without this,
    /// none are kept).
    pub fn with_verify(mut self, cfg: &crate::config::VerifyConfig) -> Cache {
        self.verify = Arc::new(verify::Registry::new(cfg));
        self
    }

    /// The one decision whether a read of `entry` may use the cache at all: not while an
    /// invalidation of any of its tables is pending, because its entry — in Valkey or the L1
    /// — may be stale. Every hit (L1 or Valkey) and every store asks this; while nothing is
    /// degraded it is one atomic load.
    pub fn bypasses(&self, entry: &Entry) -> bool {
        self.degraded.bypasses(entry)
    }

    /// An invalidation of `table` could not be applied: its reads bypass the cache until
    /// [`Cache::recovered`]. Logs once.
    pub fn degrade(&self, table: &str, why: &crate::error::Error) {
        if self.degraded.enter(table) {
            tracing::warn!(table = %table, error = %why, "cannot apply an invalidation; reads of this table bypass the cache until it is applied");
        }
        // After entering: an L1 insert racing this sees the table degraded or is dropped here.
        self.l1.invalidate_tables(&[table.to_string()], true);
    }

    /// Like [`Cache::degrade`], for every table (a flush of all of them is pending).
    pub fn degrade_all(&self, why: &crate::error::Error) {
        if self.degraded.enter_all() {
            tracing::warn!(error = %why, "cannot flush the cache after (re)connecting to PostgreSQL; every cached read bypasses the cache until it is done");
        }
        self.l1.clear();
    }

    /// `table`'s pending invalidation was applied: its reads use the cache again.
    pub fn recovered(&self, table: &str) {
        if let Some(took) = self.degraded.leave(table) {
            tracing::info!(table = %table, degraded_ms = took.as_millis() as u64, "invalidation applied; reads of this table use the cache again");
        }
    }

    /// The flush of every table was applied.
    pub fn recovered_all(&self) {
        if let Some(took) = self.degraded.leave_all() {
            tracing::info!(
                degraded_ms = took.as_millis() as u64,
                "cache flushed; cached reads use the cache again"
            );
        }
    }

    /// `ttl` shortened by up to `cache.ttl_jitter` of itself, so entries filled together do not
    /// all expire together.
    pub fn jittered_ttl(&self, ttl: u64) -> u64 {
        if self.ttl_jitter <= 0.0 || ttl < 2 {
            return ttl;
        }
        let max_cut = (ttl as f64 * self.ttl_jitter) as u64;
        ttl - rand::thread_rng().gen_range(0..=max_cut.min(ttl - 1))
    }

    /// Probabilistic early expiration (XFetch): true, now and then, for an entry close to
    /// expiry — the closer and the slower its fill, the likelier — so one request refreshes a
    /// hot key before it expires instead of every request missing at once when it does.
    pub fn should_refresh_early(&self, key: &str) -> bool {
        if self.early_refresh_beta <= 0.0 {
            return false;
        }
        self.recent
            .get(key)
            .is_some_and(|f| self.refresh_due(key, f, Instant::now()))
    }

    /// [`should_refresh_early`](Self::should_refresh_early) for an entry whose freshness the
    /// caller already holds (an L1 item's copy), at `now`: the record is consulted only when
    /// due. The draw is skipped while even the longest lead it can give (`-ln` of the smallest
    /// positive draw, about 708 fills' time) would not reach expiry — the same odds, without a
    /// random number and a logarithm on nearly every hit.
    pub fn refresh_due(&self, key: &str, f: Freshness, now: Instant) -> bool {
        if self.early_refresh_beta <= 0.0 {
            return false;
        }
        let reaches = |draw: f64| {
            // A lead too long to represent reaches any expiry (a huge `early_refresh_beta`).
            Duration::try_from_secs_f64(f.delta.as_secs_f64() * self.early_refresh_beta * draw)
                .ok()
                .and_then(|lead| now.checked_add(lead))
                .is_none_or(|t| t >= f.expires)
        };
        if !reaches(LONGEST_DRAW) {
            return false;
        }
        let r: f64 = rand::thread_rng().gen_range(f64::MIN_POSITIVE..1.0);
        reaches(-r.ln()) && self.claim_refresh(key, f)
    }

    /// One refresh per expiry window: the request that removes the fill's record refreshes;
    /// any other request due at the same time, or holding a copy of an older fill's, does not.
    fn claim_refresh(&self, key: &str, seen: Freshness) -> bool {
        self.recent.get(key) == Some(seen) && self.recent.remove(key).is_some()
    }

    /// What this instance knows of `key`'s freshness (it filled the entry), for an L1 copy.
    pub(crate) fn freshness(&self, key: &str) -> Option<Freshness> {
        match self.early_refresh_beta > 0.0 {
            true => self.recent.get(key),
            false => None,
        }
    }

    /// Fills `entry` after a miss: one `load` per key however many clients miss at once.
    pub async fn fill<F, Fut>(
        &self,
        entry: Entry,
        opts: FillOptions,
        load: F,
    ) -> Result<(Value, CacheStatus)>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Value>> + Send + 'static,
    {
        if self.bypasses(&entry) {
            inc(&self.metrics.degraded_reads);
            return self.read_uncached(entry, opts.fresh, load).await;
        }
        // A read after a write cannot vouch for a TTL-only entry (no invalidation reaches it):
        // it answers from PostgreSQL, as an unwatched read does.
        let ttl_only_fresh = opts.fresh && entry.deps.tracking == Tracking::TtlOnly;
        if ttl_only_fresh
            || matches!(
                entry.deps.tracking,
                Tracking::Unresolved | Tracking::Unwatched
            )
        {
            inc(&self.metrics.unwatched_reads);
            return self.read_uncached(entry, opts.fresh, load).await;
        }
        self.register(&entry.tables()).await;
        let ctx = FillCtx {
            store: self.store.clone(),
            metrics: Arc::clone(&self.metrics),
            recent: self.recent.clone(),
            stale: self.stale.clone(),
            degraded: Arc::clone(&self.degraded),
            verify: Arc::clone(&self.verify),
            fleet: Arc::clone(&self.fleet),
        };
        if opts.fresh {
            return ctx.fill_once(entry, opts, load).await;
        }
        let key = entry.key.clone();
        // Boxed: the fill is a deep future (lookup, query, store), which the coalescer's task
        // would otherwise carry by value, copied whole at each step of its way in.
        let fill = Box::pin(async move { ctx.fill_once(entry, opts, load).await });
        let (result, waited) = self.coalescer.run(&key, fill).await;
        if waited {
            inc(&self.metrics.coalesced_waits);
            return result.map(|(v, s)| {
                let s = if s == CacheStatus::Miss {
                    CacheStatus::Coalesced
                } else {
                    s
                };
                (v, s)
            });
        }
        result
    }

    /// A read of an entry the cache cannot vouch for (degraded, or not watched): from
    /// PostgreSQL, stored nowhere. Concurrent reads of one key still share one query (under
    /// a key of their own, apart from fills) — unless `fresh` (a read after a write, which
    /// must not take a query that may have started before the write).
    async fn read_uncached<F, Fut>(
        &self,
        entry: Entry,
        fresh: bool,
        load: F,
    ) -> Result<(Value, CacheStatus)>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Value>> + Send + 'static,
    {
        let metrics = Arc::clone(&self.metrics);
        let read = async move {
            inc(&metrics.db_queries);
            let value = load().await.inspect_err(|e| {
                if !matches!(e, crate::error::Error::Client(_)) {
                    inc(&metrics.db_errors);
                }
            })?;
            Ok((value, CacheStatus::Degraded))
        };
        if fresh {
            return read.await;
        }
        let key = format!("\0degraded\0{}", entry.key);
        self.coalescer.run(&key, read).await.0
    }

    /// Records tables in Valkey's registry (once per process), so a lost notification channel
    /// knows what to flush.
    async fn register(&self, tables: &[String]) {
        let new: Vec<String> = {
            let known = self.registered.lock().unwrap_or_else(|p| p.into_inner());
            tables
                .iter()
                .filter(|t| !known.contains(*t))
                .cloned()
                .collect()
        };
        if new.is_empty() {
            return;
        }
        if self.store.register_tables(&new).await.is_ok() {
            self.registered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .extend(new);
        }
    }

    /// Table-wide invalidation.
    pub async fn invalidate(&self, tables: &[String]) -> Result<u64> {
        self.l1.invalidate_tables(tables, true);
        let dropped = self.store.invalidate_tables(tables).await?;
        self.note_repairs(tables, dropped.repaired);
        let n = dropped.entries;
        add(&self.metrics.invalidations, n);
        for t in tables {
            tracing::debug!(table = %t, dropped = n, "table invalidated");
        }
        Ok(n)
    }

    /// Row-level invalidation (see [`Store::invalidate_rows`]).
    pub async fn invalidate_rows(
        &self,
        table: &str,
        column: &str,
        values: &[String],
        entry_keys: &[String],
    ) -> Result<u64> {
        for k in entry_keys {
            self.recent.invalidate(k);
            self.l1.invalidate_key(k.as_bytes());
        }
        self.l1.invalidate_tables(&[table.to_string()], false);
        let dropped = self
            .store
            .invalidate_rows(table, column, values, entry_keys)
            .await?;
        self.note_repairs(&[table.to_string()], dropped.repaired);
        add(&self.metrics.invalidations, dropped.entries);
        Ok(dropped.entries)
    }

    /// Meta keys of the wrong type were replaced by an invalidation: something other than
    /// cachefront wrote them. A replaced registry set had lost the names of its entries, which
    /// then only expire by their TTL — say so loudly.
    fn note_repairs(&self, tables: &[String], repaired: u64) {
        if repaired > 0 {
            add(&self.metrics.meta_repairs, repaired);
            tracing::warn!(tables = ?tables, repaired, "replaced cachefront meta keys of the wrong type (written by something other than cachefront); entries a replaced registry set listed expire only by TTL");
        }
    }
}

/// What a fill task carries (it outlives the request that started it).
struct FillCtx {
    store: Store,
    metrics: Arc<Metrics>,
    recent: Recent,
    stale: Option<moka::sync::Cache<String, Value>>,
    degraded: Arc<Degraded>,
    verify: Arc<verify::Registry>,
    fleet: Arc<fleet::Fleet>,
}

impl FillCtx {
    /// The fill protocol: versions (and the key's fill lease), query, conditional store.
    /// A lease this fill took and no store script gave up is given up here, however the
    /// fill ended, so other instances' waiters need not wait for it to expire.
    async fn fill_once<F, Fut>(
        self,
        entry: Entry,
        mut opts: FillOptions,
        load: F,
    ) -> Result<(Value, CacheStatus)>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Value>> + Send + 'static,
    {
        let negative_key = opts
            .negative_ttl
            .map(|_| self.store.negative_key(&entry.key));
        // A read that found another fill's lease is old news by the time this fill runs (that
        // fill may have landed since, and its announcement come and gone): it reads again.
        let early = opts
            .early
            .take()
            .and_then(|e| e.take_for(&entry.deps))
            .filter(|(read, _)| !matches!(read.lease, LeaseState::Held(..)));
        let (first, lease) = match early {
            Some((read, lease)) => (Some(read), Some(lease)),
            // An early refresh runs while the entry exists: nobody waits for it.
            None => (
                None,
                (self.fleet.enabled() && !opts.refresh)
                    .then(|| self.store.fill_lease(&entry.key, self.fleet.lease_ms())),
            ),
        };
        let prefill = self
            .prefill(
                &entry,
                &opts,
                negative_key.as_deref(),
                lease.as_ref(),
                first,
            )
            .await;
        let held = lease.filter(|_| matches!(&prefill, Ok(p) if p.lease == LeaseState::Taken));
        if held.is_some() {
            inc(&self.metrics.fleet_fill_leases);
        }
        let store = self.store.clone();
        let result =
            Box::pin(self.query_and_store(entry, opts, load, negative_key, prefill, held.as_ref()))
                .await;
        if let Some(l) = held.filter(|l| !l.released()) {
            // No row and nothing cached (no negative caching): the waiters' answer too.
            let no_row = matches!(&result, Ok((Value::Absent, CacheStatus::Miss)));
            if let Err(e) = store.release_fill_lease(&l, no_row).await {
                tracing::debug!(error = %e, key = %l.entry, "could not give up a fill lease; it expires");
            }
        }
        result
    }

    /// What a fill reads before querying, waiting while another instance holds the key's
    /// fill lease (see [`fleet`]): until that fill lands (its entry is then returned), the
    /// lease is gone (this fill takes it) or [`fleet::Fleet::patience`] runs out (this fill
    /// goes on without one).
    /// A read under a floor (`opts.fresh`) waits the same way but never takes a holder's
    /// no-row answer: that fill may have read PostgreSQL before the write the floor stands
    /// for (an entry it stored is another matter: its versions were checked).
    /// `first`: the first read, if the lookup made it (see [`Early`]).
    async fn prefill(
        &self,
        entry: &Entry,
        opts: &FillOptions,
        negative_key: Option<&str>,
        lease: Option<&FillLease>,
        mut first: Option<Prefill>,
    ) -> Result<Prefill> {
        let hash = opts.hash;
        let Some(lease) = lease else {
            return match first {
                Some(read) => Ok(read),
                None => self.store.prefill(entry, hash, negative_key).await,
            };
        };
        let deadline = Instant::now() + self.fleet.patience();
        let mut waited = false;
        // The holder last seen: if its fill found no row, that is this fill's answer too.
        let mut waited_for = String::new();
        loop {
            let mut listener = self.fleet.listen(&entry.key);
            let patient = Instant::now() < deadline;
            let asked = patient.then_some((lease, waited_for.as_str()));
            let prefill = match first.take() {
                Some(read) => Ok(read),
                None => {
                    self.store
                        .prefill_leased(entry, hash, negative_key, asked)
                        .await
                }
            };
            let (left, holder) = match &prefill {
                Ok(Prefill {
                    lease: LeaseState::Held(left, holder),
                    ..
                }) => (*left, holder.clone()),
                _ => {
                    if waited && !patient {
                        inc(&self.metrics.fleet_fill_wait_timeouts);
                    }
                    return prefill;
                }
            };
            if !waited {
                waited = true;
                inc(&self.metrics.fleet_fill_waits);
            }
            // Woken by the fill landing; else look again when the lease runs out, or
            // after a poll in case the message was lost.
            let until_expiry = left + Duration::from_millis(1);
            let limit = until_expiry
                .min(self.fleet.poll())
                .min(deadline.saturating_duration_since(Instant::now()));
            listener.wait(limit).await;
            if !opts.fresh {
                waited_for = holder;
            }
        }
    }

    /// The rest of a fill once its versions are read: the query and the conditional store
    /// (which gives `lease` up).
    async fn query_and_store<F, Fut>(
        self,
        entry: Entry,
        opts: FillOptions,
        load: F,
        negative_key: Option<String>,
        prefill: Result<Prefill>,
        lease: Option<&FillLease>,
    ) -> Result<(Value, CacheStatus)>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Value>> + Send + 'static,
    {
        if let Ok(p) = &prefill {
            // Stored by a fill that finished between this request's lookup and now (another
            // instance's, perhaps after this one waited for it).
            if let Some(v) = p.existing.as_ref().filter(|_| !opts.refresh) {
                if opts.fresh {
                    // A read after a write found the entry: a hit.
                    inc(&self.metrics.hits);
                    return Ok((v.clone(), CacheStatus::Hit));
                }
                inc(&self.metrics.coalesced_waits);
                return Ok((v.clone(), CacheStatus::Coalesced));
            }
            if p.negative {
                return Ok((Value::Absent, CacheStatus::NegativeHit));
            }
            if p.lease == LeaseState::NoRow {
                inc(&self.metrics.coalesced_waits);
                return Ok((Value::Absent, CacheStatus::Coalesced));
            }
            if opts.fresh {
                // Its lookup was the prefill (`Cache::begin_after`): counted as a miss here.
                inc(&self.metrics.misses);
            }
        }
        let started = Instant::now();
        inc(&self.metrics.db_queries);
        let value = match Box::pin(load()).await {
            Ok(v) => v,
            Err(e) if matches!(e, crate::error::Error::Client(_)) => return Err(e),
            Err(e) => {
                inc(&self.metrics.db_errors);
                // Stale-if-error: the last value this process filled, if recent enough (never
                // for a read after a write, which must not see older than the write).
                let stale = self.stale.as_ref().filter(|_| !opts.fresh);
                if let Some(v) = stale.and_then(|s| s.get(&entry.key)) {
                    tracing::debug!(key = %entry.key, error = %e, "serving a stale value");
                    inc(&self.metrics.stale_served);
                    return Ok((v, CacheStatus::Stale));
                }
                return Err(e);
            }
        };
        if let (Some(s), false) = (&self.stale, value == Value::Absent) {
            s.insert(entry.key.clone(), value.clone());
        }
        let delta = started.elapsed();
        self.metrics.latency.db_query.observe(delta);
        let versions = match prefill {
            Ok(p) => p.versions,
            Err(e) => {
                tracing::warn!(error = %e, "valkey unavailable; answering from PostgreSQL");
                inc(&self.metrics.fail_open);
                inc(&self.metrics.upstream_errors);
                return Ok((value, CacheStatus::FailOpen));
            }
        };
        // Recorded for the sampler once stored: the entry key, even for a negative marker.
        let sampled = opts.sample.map(|o| (o, entry.clone()));
        let (target, stored_value) = match (&value, negative_key, opts.negative_ttl) {
            (Value::Absent, Some(nk), Some(ttl)) => (
                Entry {
                    key: nk,
                    ttl,
                    deps: entry.deps.clone(),
                },
                Value::String(Bytes::new()),
            ),
            (Value::Absent, _, _) => return Ok((value, CacheStatus::Miss)),
            // A row whose columns are all NULL: nothing to store in a hash.
            (Value::Hash(f), _, _) if f.is_empty() => return Ok((value, CacheStatus::Miss)),
            _ => (entry, value.clone()),
        };
        if self.degraded.bypasses(&target) {
            // Its tables became degraded while it read: the invalidation it may have missed
            // is not applied yet, so this value must not be served from the cache.
            inc(&self.metrics.stale_fill_rejections);
            return Ok((value, CacheStatus::Degraded));
        }
        // The store goes out now. On the client's own shared connection it is ahead of
        // whatever the client sends next, so the answer need not wait for Valkey's reply: how
        // the store went is counted when that comes (see `landed`). Otherwise the answer waits.
        let queued = self
            .store
            .queue_store(&target, &stored_value, &versions, lease, opts.lane)
            .await;
        let landing = Landing {
            size: stored_value.size(),
            target,
            sampled,
            stats: opts.stats,
            started,
            delta,
            // The store script gives the lease up; `landed` does if the script did not run.
            lease: lease.map(FillLease::handoff),
        };
        if opts.lane.is_none() {
            return Ok((value, self.landed(queued, landing).await));
        }
        tokio::spawn(self.landed(queued, landing));
        Ok((value, CacheStatus::Miss))
    }

    /// How a fill's store went, once Valkey answers: counted, remembered for early refresh
    /// and the verification sampler — or, if the script did not run, its lease given up. The
    /// fill's status: a miss, or failed open if nothing could be stored.
    async fn landed(
        self,
        queued: BoxFuture<'static, Result<bool>>,
        landing: Landing,
    ) -> CacheStatus {
        let Landing {
            target,
            size,
            sampled,
            stats,
            started,
            delta,
            lease,
        } = landing;
        match queued.await {
            Ok(true) => {
                inc(&self.metrics.fills);
                let ttl_only = target.deps.tracking == Tracking::TtlOnly;
                if ttl_only {
                    inc(&self.metrics.ttl_only_fills);
                }
                if let Some(stats) = &stats {
                    stats.filled(size, ttl_only);
                }
                if let Some((origin, entry)) = sampled {
                    let negative = target.key != entry.key;
                    self.verify.record(entry, negative, origin);
                }
                self.recent.insert(
                    target.key,
                    Freshness {
                        expires: started + Duration::from_secs(target.ttl),
                        delta,
                    },
                );
            }
            Ok(false) => inc(&self.metrics.stale_fill_rejections),
            Err(e) => {
                tracing::warn!(error = %e, key = %target.key, "could not store a filled entry");
                inc(&self.metrics.upstream_errors);
                inc(&self.metrics.fail_open);
                if let Some(l) = lease {
                    if let Err(e) = self.store.release_fill_lease(&l, false).await {
                        tracing::debug!(error = %e, key = %l.entry, "could not give up a fill lease; it expires");
                    }
                }
                return CacheStatus::FailOpen;
            }
        }
        CacheStatus::Miss
    }
}

/// What [`FillCtx::landed`] needs of a fill whose store it waits for.
struct Landing {
    target: Entry,
    /// The stored value's size, for the query's figures.
    size: usize,
    sampled: Option<(verify::Origin, Entry)>,
    stats: Option<Arc<crate::metrics::QueryStats>>,
    started: Instant,
    delta: Duration,
    /// A copy of the fill's lease, if it held one (see [`FillLease::handoff`]).
    lease: Option<FillLease>,
}
