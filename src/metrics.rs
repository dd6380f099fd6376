//! Counters, stored gauges and latency histograms, each named once here (the counters and
//! gauges in the `declare_metrics!` list); `INFO`'s `# Cachefront` section and the Prometheus
//! endpoint (`metrics.listen`) both render them from that list, so their names cannot drift.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, Ordering::Relaxed};
use std::time::Duration;

/// How many ways each [`Counter`] and [`Histogram`] is split.
///
/// Why: a hit or a forwarded request adds to a handful of counters and histograms. Were each
/// one atomic, every core would write the same few cache lines for every request, and each
/// write would wait for the line to come over from the core that wrote it last (a sampling
/// profile of pipelined `EMP.GET` hits on two cores: about 8 % of the process's time in those
/// adds, which instruction counts never show). Split, each thread adds to lines of its own,
/// and only a reader — INFO, Prometheus, the status page — sums the parts.
const SHARDS: usize = 8;

thread_local! {
    /// This thread's part of every split tally, drawn in turn on first use (`SHARDS`
    /// before): threads that count at once (the cores', see `cores`) get different ones.
    /// A plain cell with a constant start, so reading it is one load, with no check of
    /// whether it was set up.
    static SHARD: std::cell::Cell<usize> = const { std::cell::Cell::new(SHARDS) };
}

fn shard() -> usize {
    SHARD.with(|s| match s.get() {
        drawn if drawn < SHARDS => drawn,
        _ => {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let drawn = NEXT.fetch_add(1, Relaxed) % SHARDS;
            s.set(drawn);
            drawn
        }
    })
}

/// One part of a [`Counter`], on a cache line of its own.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Line(AtomicU64);

/// A relaxed tally split over [`SHARDS`] cache lines (see there). Its value is the wrapping
/// sum of the parts, so a gauge counted up on one thread and down on another reads right.
#[derive(Debug, Default)]
pub struct Counter([Line; SHARDS]);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0[shard()].0.fetch_add(n, Relaxed);
    }

    pub fn sub(&self, n: u64) {
        self.0[shard()].0.fetch_sub(n, Relaxed);
    }

    /// The value (the ordering is accepted for the atomics' sake: each part is read relaxed).
    pub fn load(&self, _: Ordering) -> u64 {
        self.0
            .iter()
            .fold(0u64, |sum, l| sum.wrapping_add(l.0.load(Relaxed)))
    }

    /// Sets the value (for gauges set from one place; an add racing it may be lost).
    pub fn store(&self, v: u64, _: Ordering) {
        for (i, l) in self.0.iter().enumerate() {
            l.0.store(if i == 0 { v } else { 0 }, Relaxed);
        }
    }
}

/// Upper bounds of the latency buckets, in microseconds (the last bucket is +Inf).
pub const BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// A fixed-bucket latency histogram of relaxed atomics, split like a [`Counter`]: recording
/// is two adds to this thread's part, no lock.
#[derive(Debug, Default)]
pub struct Histogram {
    parts: [HistogramPart; SHARDS],
}

/// One thread's part of a [`Histogram`]: exactly two cache lines of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
struct HistogramPart {
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BUCKETS_US.len());
        let part = &self.parts[shard()];
        part.buckets[i].fetch_add(1, Relaxed);
        part.sum_us.fetch_add(us, Relaxed);
    }

    /// Observations in bucket `i`.
    fn bucket(&self, i: usize) -> u64 {
        self.parts.iter().map(|p| p.buckets[i].load(Relaxed)).sum()
    }

    /// Observations in each bucket, in order.
    fn buckets(&self) -> impl Iterator<Item = u64> + '_ {
        (0..=BUCKETS_US.len()).map(|i| self.bucket(i))
    }

    pub fn count(&self) -> u64 {
        self.buckets().sum()
    }

    /// The sum of the observations, in microseconds.
    pub fn sum_us(&self) -> u64 {
        self.parts.iter().map(|p| p.sum_us.load(Relaxed)).sum()
    }

    /// The bucket bound under which `q` of the observations fall (an upper estimate).
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let want = (total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, b) in self.buckets().enumerate() {
            seen += b;
            if seen >= want {
                return Some(BUCKETS_US.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        None
    }

    fn prometheus(&self, out: &mut String, name: &str, family: &str) {
        let mut cum = 0;
        for (i, b) in self.buckets().enumerate() {
            cum += b;
            let le = match BUCKETS_US.get(i) {
                Some(us) => format!("{}", *us as f64 / 1e6),
                None => "+Inf".to_string(),
            };
            out.push_str(&format!(
                "{name}_bucket{{family=\"{family}\",le=\"{le}\"}} {cum}\n"
            ));
        }
        out.push_str(&format!(
            "{name}_sum{{family=\"{family}\"}} {}\n{name}_count{{family=\"{family}\"}} {cum}\n",
            self.sum_us() as f64 / 1e6
        ));
    }
}

/// One query's figures: a named query's, or one SQL.CACHED text's in [`TopQueries`]. The
/// read path adds to them with relaxed atomics only (no lock, no allocation), like the
/// process-wide counters.
#[derive(Debug)]
pub struct QueryStats {
    /// The Prometheus label: the named query's command (`EMP.GET`), or `sql:` and the first
    /// 12 hex digits of the SHA-256 of an SQL.CACHED text (its key without parameters).
    pub label: String,
    /// The command that runs it: the named query's name, or `SQL.CACHED`.
    pub command: String,
    pub sql: std::sync::Arc<str>,
    /// For a text in [`TopQueries`]: its hash there (0 for a named query).
    hash: u64,
    /// Reads answered by a lookup (the L1 or Valkey).
    pub hits: Counter,
    /// Reads answered by a fill (queried, waited for another's fill, negative entries,
    /// degraded or fail-open reads).
    pub misses: Counter,
    /// Reads whose reply was an error.
    pub errors: Counter,
    /// Entries stored.
    pub fills: Counter,
    /// Bytes of the values stored.
    pub fill_bytes: Counter,
    /// Entries stored TTL-only (also in `fills`).
    pub ttl_only_fills: Counter,
    pub hit_latency: Histogram,
    pub miss_latency: Histogram,
}

impl QueryStats {
    /// Fresh figures for a named query.
    pub fn named(command: &str, sql: std::sync::Arc<str>) -> QueryStats {
        QueryStats::new(command.to_string(), command.to_string(), sql, 0)
    }

    fn new(label: String, command: String, sql: std::sync::Arc<str>, hash: u64) -> QueryStats {
        QueryStats {
            label,
            command,
            sql,
            hash,
            hits: Counter::default(),
            misses: Counter::default(),
            errors: Counter::default(),
            fills: Counter::default(),
            fill_bytes: Counter::default(),
            ttl_only_fills: Counter::default(),
            hit_latency: Histogram::default(),
            miss_latency: Histogram::default(),
        }
    }

    /// One read, answered by a lookup (`hit`) or a fill, `error` if its reply was one.
    pub fn observe(&self, hit: bool, error: bool, took: Duration) {
        if error {
            inc(&self.errors);
        } else if hit {
            inc(&self.hits);
            self.hit_latency.observe(took);
        } else {
            inc(&self.misses);
            self.miss_latency.observe(took);
        }
    }

    /// One entry stored, `bytes` long.
    pub fn filled(&self, bytes: usize, ttl_only: bool) {
        inc(&self.fills);
        add(&self.fill_bytes, bytes as u64);
        if ttl_only {
            inc(&self.ttl_only_fills);
        }
    }

    /// Reads so far: how much it is used (what [`TopQueries`] keeps the busiest by).
    pub fn reads(&self) -> u64 {
        self.hits.load(Relaxed) + self.misses.load(Relaxed) + self.errors.load(Relaxed)
    }

    /// Hits over hits and misses, 0 before the first.
    pub fn hit_ratio(&self) -> f64 {
        let (h, m) = (self.hits.load(Relaxed), self.misses.load(Relaxed));
        if h + m == 0 {
            0.0
        } else {
            h as f64 / (h + m) as f64
        }
    }
}

/// How many slots a text may occupy in [`TopQueries`] (its probe window): a lookup reads at
/// most this many, and a new text evicts the least used of them.
const TOP_WINDOW: usize = 8;

/// The SQL.CACHED texts with the most reads, in a fixed number of slots (`metrics.top_queries`),
/// so memory stays bounded however many distinct texts clients send: at most `capacity`
/// [`QueryStats`] (about 500 bytes each) plus their texts (at most `sql.max_sql_bytes` each).
///
/// A text's slots are the [`TOP_WINDOW`] after its hash; a lookup compares hashes and texts
/// there, loading each slot lock-free (`ArcSwap`), so counting a read of a known text takes
/// no lock and allocates nothing. A text not found takes an empty slot of its window, or
/// evicts the least-read one (a one-off text then gives way to the next one-off, while busy
/// texts keep their slots). An evicted text's figures are dropped; reads in flight finish
/// counting into them, never into its successor's.
pub struct TopQueries {
    slots: Box<[arc_swap::ArcSwapOption<QueryStats>]>,
    hasher: foldhash::fast::RandomState,
}

impl std::fmt::Debug for TopQueries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TopQueries({} slots)", self.slots.len())
    }
}

impl Default for TopQueries {
    fn default() -> Self {
        TopQueries::new(0)
    }
}

impl TopQueries {
    /// A table of `capacity` slots; 0 keeps nothing.
    pub fn new(capacity: usize) -> TopQueries {
        TopQueries {
            slots: (0..capacity)
                .map(|_| arc_swap::ArcSwapOption::empty())
                .collect(),
            hasher: foldhash::fast::RandomState::default(),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The figures of `sql`, taking a slot for it if it has none; `label` names a new one
    /// (called only then, so a known text allocates nothing). `None` with no slots.
    pub fn entry(
        &self,
        sql: &str,
        label: impl FnOnce() -> String,
    ) -> Option<std::sync::Arc<QueryStats>> {
        use std::hash::BuildHasher;
        let n = self.slots.len();
        if n == 0 {
            return None;
        }
        let hash = self.hasher.hash_one(sql);
        let start = (hash % n as u64) as usize;
        let window = TOP_WINDOW.min(n);
        let mut label = Some(label);
        let mut made: Option<String> = None;
        // A lost race for the victim slot looks again (the winner may be this same text).
        for _ in 0..3 {
            let mut victim: Option<(usize, u64)> = None;
            for i in 0..window {
                let idx = (start + i) % n;
                let slot = self.slots[idx].load();
                let used = match &*slot {
                    Some(s) if s.hash == hash && *s.sql == *sql => {
                        return Some(std::sync::Arc::clone(s))
                    }
                    // An empty slot is taken before any kept text is evicted.
                    Some(s) => s.reads().saturating_add(1),
                    None => 0,
                };
                if victim.is_none_or(|(_, least)| used < least) {
                    victim = Some((idx, used));
                }
            }
            let (idx, _) = victim?;
            let current = self.slots[idx].load_full();
            if made.is_none() {
                made = label.take().map(|l| l());
            }
            let stats = std::sync::Arc::new(QueryStats::new(
                made.clone().unwrap_or_default(),
                "SQL.CACHED".to_string(),
                std::sync::Arc::from(sql),
                hash,
            ));
            let before =
                self.slots[idx].compare_and_swap(&current, Some(std::sync::Arc::clone(&stats)));
            let swapped = match (&*before, &current) {
                (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            };
            if swapped {
                return Some(stats);
            }
        }
        None
    }

    /// The texts kept now, busiest first.
    pub fn snapshot(&self) -> Vec<std::sync::Arc<QueryStats>> {
        let mut v: Vec<_> = self.slots.iter().filter_map(|s| s.load_full()).collect();
        v.sort_by_key(|s| std::cmp::Reverse(s.reads()));
        v
    }
}

/// One slow fill, as `CACHEFRONT.SLOWLOG GET` shows it.
#[derive(Debug, Clone)]
pub struct SlowFill {
    pub id: u64,
    /// Unix time, seconds.
    pub at: u64,
    pub duration_us: u64,
    /// The command that missed (`EMP.GET`, `SQL.CACHED` …).
    pub command: String,
    pub key: String,
    /// The SQL, shortened; only this command shows it (logs never carry SQL text).
    pub sql: String,
}

/// The most recent slow fills, newest first, like Valkey's SLOWLOG.
#[derive(Debug, Default)]
pub struct SlowLog {
    entries: std::sync::Mutex<std::collections::VecDeque<SlowFill>>,
    next_id: AtomicU64,
}

impl SlowLog {
    pub fn record(&self, max_len: usize, mut fill: SlowFill) {
        fill.id = self.next_id.fetch_add(1, Relaxed);
        let mut e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.push_front(fill);
        e.truncate(max_len);
    }

    /// The newest `n` entries.
    pub fn get(&self, n: usize) -> Vec<SlowFill> {
        let e = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        e.iter().take(n).cloned().collect()
    }

    pub fn len(&self) -> usize {
        self.entries.lock().map(|e| e.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn reset(&self) {
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

/// Latency per command family.
#[derive(Debug, Default)]
pub struct Latency {
    /// Cached commands answered from the L1 or Valkey.
    pub hit: Histogram,
    /// Cached commands that had to be filled (lookup, query, store).
    pub miss: Histogram,
    /// Commands passed through to Valkey over a shared connection.
    pub passthrough: Histogram,
    /// PostgreSQL queries of fills.
    pub db_query: Histogram,
}

impl Latency {
    /// Each family's name and histogram, in INFO order.
    pub fn families(&self) -> [(&'static str, &Histogram); 4] {
        [
            ("hit", &self.hit),
            ("miss", &self.miss),
            ("passthrough", &self.passthrough),
            ("db_query", &self.db_query),
        ]
    }
}

/// Whether a declared metric only grows (`_total` in Prometheus) or goes up and down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
}

/// What the INFO rows that are computed rather than stored (`hit_ratio`, `db_pool` …) are
/// computed from, besides the counters.
pub struct InfoContext {
    /// PostgreSQL pool: connections open, connections idle.
    pub db_pool: (usize, usize),
    /// Whether the invalidation listener is connected.
    pub listening: bool,
}

/// Renders one computed INFO row.
pub type InfoRow = fn(&Metrics, &InfoContext) -> String;

/// One declared counter or gauge: everything INFO and Prometheus say about it.
pub struct MetricDef {
    /// The `Metrics` field that holds it.
    pub field: &'static str,
    pub kind: Kind,
    /// Prometheus name without the `cachefront_` prefix and `_total` suffix.
    pub name: &'static str,
    /// INFO field name; the Prometheus name unless Valkey's INFO has its own.
    pub info: &'static str,
    /// Prometheus `# HELP` text, without the final full stop.
    pub help: &'static str,
    /// Computed INFO rows shown right after this one, so INFO keeps its documented order.
    pub info_after: &'static [(&'static str, InfoRow)],
}

/// The first of its literals: the INFO name when a row gives one, else the Prometheus name.
macro_rules! first_of {
    ($first:literal $(, $rest:literal)*) => {
        $first
    };
}

/// Declares every stored counter and gauge once, as
/// `Kind field: "name" [info "info_name"], "help" [then { "row" => fn, … }];`, in INFO
/// order, and generates from that one list the `Metrics` fields (split [`Counter`]s, so
/// call sites keep `inc(&metrics.hits)`), [`DECLARED`] (names and help texts) and
/// `Metrics::atomics` (the values, in the same order). INFO and Prometheus both render from
/// these, so a counter cannot be added to one and forgotten in the other, and its names are
/// written down once. Fields that are not counters (`latency`, `slowlog`) go in `extra`.
macro_rules! declare_metrics {
    (
        declared {
            $(
                $(#[$doc:meta])*
                $kind:ident $field:ident: $name:literal $(info $info:literal)?, $help:literal
                    $(then { $($row:literal => $row_fn:path),* $(,)? })?;
            )*
        }
        extra {
            $( $(#[$xdoc:meta])* $xfield:ident: $xty:ty, )*
        }
    ) => {
        /// Process-wide counters and gauges. Split relaxed tallies ([`Counter`]): each is
        /// independent, and incrementing one is a single relaxed add to this thread's part.
        #[derive(Debug, Default)]
        pub struct Metrics {
            $( $(#[$doc])* pub $field: Counter, )*
            $( $(#[$xdoc])* pub $xfield: $xty, )*
        }

        /// Every stored counter and gauge, in INFO order (Prometheus lists counters, then
        /// gauges, each in this order).
        pub const DECLARED: &[MetricDef] = &[
            $(
                MetricDef {
                    field: stringify!($field),
                    kind: Kind::$kind,
                    name: $name,
                    info: first_of!($($info,)? $name),
                    help: $help,
                    info_after: &[$($(($row, $row_fn as InfoRow)),*)?],
                },
            )*
        ];

        impl Metrics {
            /// The atomic behind each entry of [`DECLARED`], in the same order.
            fn atomics(&self) -> [&Counter; DECLARED.len()] {
                [$(&self.$field),*]
            }
        }
    };
}

declare_metrics! {
    declared {
        /// Cached commands answered from Valkey.
        Counter hits: "hits", "Cached commands answered from the cache";
        /// Cached commands that found no entry.
        Counter misses: "misses", "Cached commands that found no entry"
            then { "hit_ratio" => hit_ratio };
        /// Entries stored after a miss.
        Counter fills: "fills", "Entries stored after a miss";
        /// Misses that waited for another client's fill of the same key instead of querying.
        Counter coalesced_waits: "coalesced_waits", "Misses that waited for another request's fill";
        /// Queries sent to PostgreSQL.
        Counter db_queries: "db_queries", "Queries sent to PostgreSQL";
        /// Queries PostgreSQL failed or could not be reached for.
        Counter db_errors: "db_errors", "Queries PostgreSQL failed or could not be reached for";
        /// Cached commands answered straight from PostgreSQL because Valkey was unavailable.
        Counter fail_open: "fail_open",
            "Cached commands answered from PostgreSQL because Valkey was unavailable";
        /// Upstream (Valkey) failures seen by any command.
        Counter upstream_errors: "upstream_errors", "Valkey failures seen";
        /// Cache entries dropped by invalidation.
        Counter invalidations: "invalidations", "Cache entries dropped by invalidation";
        /// Fills not stored because a write invalidated their tables while they read.
        Counter stale_fill_rejections: "stale_fill_rejections",
            "Fills not stored because a write raced them";
        /// Error replies sent to clients.
        Counter errors: "errors", "Error replies sent to clients";
        /// Commands passed through to Valkey.
        Counter passthrough: "passthrough_commands", "Commands passed through to Valkey";
        /// Client connections open now (set by the per-client guard in `server`).
        Gauge connections_current: "connected_clients", "Client connections open";
        /// Client connections accepted since start. INFO uses Valkey's own field name.
        Counter connections_total: "connections_received" info "total_connections_received",
            "Client connections accepted";
        /// Connections refused because `limits.max_clients` was reached.
        Counter rejected_connections: "rejected_connections",
            "Client connections refused (max clients, protected mode)"
            then { "db_pool" => db_pool, "invalidation_listening" => invalidation_listening };
        /// Change notifications received from PostgreSQL.
        Counter notifications: "notifications", "Change notifications received from PostgreSQL";
        /// Times the invalidation listener (re)connected.
        Counter listener_reconnects: "listener_reconnects",
            "Times the invalidation listener (re)connected";
        /// Times this instance took the invalidation lease (at start too) and so became the one
        /// of the instances sharing its Valkey that applies changes; each flushes everything.
        Counter invalidation_takeovers: "invalidation_takeovers",
            "Times this instance took the invalidation lease (each followed by a flush of every table)";
        /// Cached reads under `CACHEFRONT.AFTER` that had to wait for the fleet's applied
        /// invalidations to reach their position.
        Counter read_after_waits: "read_after_waits",
            "Cached reads under CACHEFRONT.AFTER that waited for invalidations to be applied";
        /// Of those, the ones refused with `-TRYAGAIN` because the wait passed its bound.
        Counter read_after_timeouts: "read_after_timeouts",
            "Cached reads under CACHEFRONT.AFTER refused because invalidations were not applied in time";
        /// Barriers this instance committed in PostgreSQL so the applier would record how far
        /// it has applied (one serves every read waiting at the time).
        Counter read_after_barriers: "read_after_barriers",
            "Read-your-writes barriers committed in PostgreSQL by this instance";
        /// Hot entries refreshed before expiry (XFetch).
        Counter early_refreshes: "early_refreshes", "Hot entries refreshed before expiry";
        /// Fills that took their key's fill lease in Valkey: this instance queried for every
        /// instance sharing the Valkey (`cache.fill_lease_ms`, see `cache::fleet`).
        Counter fleet_fill_leases: "fleet_fill_leases",
            "Fills that took the key's fleet-wide fill lease and queried for every instance";
        /// Fills that found another instance filling the key and waited for it instead of
        /// querying.
        Counter fleet_fill_waits: "fleet_fill_waits",
            "Fills that waited for another instance's fill of the same key";
        /// Fills that waited for other instances' fills longer than two lease terms and
        /// queried themselves.
        Counter fleet_fill_wait_timeouts: "fleet_fill_wait_timeouts",
            "Fills that gave up waiting for another instance's fill and queried themselves";
        /// Clients disconnected for holding more unread replies than
        /// `limits.client_output_buffer_limit` allows.
        Counter output_limit_disconnects: "client_output_limit_disconnects",
            "Clients disconnected for passing their output buffer limit";
        /// Hits answered from the in-process L1 (also counted in `hits`).
        Counter l1_hits: "l1_hits", "Hits answered from the in-process L1";
        /// L1 items looked up again by one read in the last eighth of their life, while the
        /// other reads kept hitting them (see `l1::Hit::renew`).
        Counter l1_renewals: "l1_renewals",
            "L1 items renewed by one read's lookup before their life ended";
        /// Reads that missed the L1 while a lookup of the same entry was in flight and took
        /// its reply instead of sending their own (also counted in `hits`; see `cache::flight`).
        Counter l1_shared_lookups: "l1_shared_lookups",
            "Reads that missed the L1 and took the reply of a lookup of the same entry already in flight";
        /// Misses answered with a stale value because PostgreSQL failed.
        Counter stale_served: "stale_served",
            "Misses answered with a stale value because PostgreSQL failed";
        /// TLS handshakes with clients that failed or timed out.
        Counter tls_handshake_failures: "tls_handshake_failures",
            "TLS handshakes with clients that failed or timed out";
        /// Fill queries a read replica answered (`postgres.replicas`).
        Counter replica_fills: "replica_fills", "Fill queries a read replica answered";
        /// Fill queries the primary answered although replicas are configured: none had replayed
        /// a write the fill must see, none was within the lag bound, or none was up.
        Counter replica_fallbacks: "replica_fallbacks",
            "Fill queries the primary answered because no read replica had caught up or was up";
        /// Fill queries the primary answered after the replica chosen failed as a server (also
        /// counted in `replica_fallbacks`).
        Counter replica_errors: "replica_errors",
            "Fill queries the primary answered after the read replica chosen failed";
        /// Pass-through reads a Valkey Cluster replica was sent and answered
        /// (`valkey.read_from_replicas`).
        Counter cluster_replica_reads: "cluster_replica_reads",
            "Pass-through reads answered by a Valkey Cluster replica (valkey.read_from_replicas)";
        /// Pass-through reads that could have gone to a replica but went to the primary: the
        /// shard had no healthy replica, or the replica chosen failed the read.
        Counter cluster_replica_fallbacks: "cluster_replica_fallbacks",
            "Pass-through reads the primary answered because its shard had no healthy replica or the replica failed";
        /// Cached commands answered from PostgreSQL because an invalidation of their tables could
        /// not be applied yet (the cache was bypassed; nothing stored).
        Counter degraded_reads: "degraded_reads",
            "Cached commands answered from PostgreSQL because an invalidation of their tables is pending";
        /// Tables with an invalidation not yet applied (set by the listener).
        Gauge invalidation_pending: "invalidation_pending_tables",
            "Tables with an invalidation not yet applied";
        /// Attempts to apply an invalidation that Valkey refused or did not answer (retried).
        Counter invalidation_failures: "invalidation_failures",
            "Attempts to apply an invalidation that failed and will be retried";
        /// cachefront meta keys of the wrong type replaced by an invalidation.
        Counter meta_repairs: "meta_repairs",
            "cachefront meta keys of the wrong type replaced by an invalidation";
        /// Entries stored for queries PostgreSQL cannot fully track, under the operator's
        /// TTL-only opt-in (`sql.ttl_only`, a query's `ttl_only`): fresh only by expiry.
        Counter ttl_only_fills: "ttl_only_fills",
            "Entries stored TTL-only: their dependencies cannot be tracked, so they are fresh only by expiry";
        /// Cached commands answered from PostgreSQL, nothing stored, because a table they read
        /// does not report its writes yet (its trigger install or publication failed; retried).
        Counter unwatched_reads: "unwatched_reads",
            "Cached commands answered from PostgreSQL because a table they read does not report its writes yet";
        /// Attempts to make a table report its writes (triggers, publication) that failed.
        Counter watch_failures: "watch_failures",
            "Attempts to install a table's invalidation triggers (or publish it) that failed and will be retried";
        /// Cached entries the verification sampler compared with PostgreSQL to a verdict
        /// (equal, or a mismatch); see `cache::verify`.
        Counter verify_checks: "verify_checks",
            "Cached entries the verification sampler compared with PostgreSQL";
        /// Cached entries found to differ from PostgreSQL with no invalidation on its way, and
        /// dropped. A healthy deployment shows 0.
        Counter verify_mismatches: "verify_mismatches",
            "Cached entries found to differ from PostgreSQL with no invalidation pending (dropped)";
        /// Checks that reached no verdict: the entry was gone or changed, an invalidation moved
        /// its versions, its tables were degraded, the listener was down, or a query failed.
        Counter verify_skipped: "verify_skipped",
            "Verification checks that reached no verdict (entry changed or gone, invalidation pending, query failed)";
        /// Queries the verification sampler sent to PostgreSQL (not in `db_queries`).
        Counter verify_queries: "verify_queries",
            "Queries the verification sampler sent to PostgreSQL";
        /// TTL-only entries (not kept fresh by invalidation) found to differ from PostgreSQL:
        /// expected, kept until their TTL, not mismatches.
        Counter verify_ttl_only_stale: "verify_ttl_only_stale",
            "TTL-only entries found to differ from PostgreSQL (expected; kept until their TTL)";
    }
    extra {
        latency: Latency,
        slowlog: SlowLog,
    }
}

/// INFO `hit_ratio`: hits over cached commands, 0 before the first.
fn hit_ratio(m: &Metrics, _: &InfoContext) -> String {
    m.hit_ratio()
}

/// INFO `db_pool`: both pool figures on one line (Prometheus has a gauge for each).
fn db_pool(_: &Metrics, cx: &InfoContext) -> String {
    format!("size={},available={}", cx.db_pool.0, cx.db_pool.1)
}

/// INFO `invalidation_listening`: 1 while the change listener is connected.
fn invalidation_listening(_: &Metrics, cx: &InfoContext) -> String {
    u8::from(cx.listening).to_string()
}

/// Adds one to a counter.
pub fn inc(c: &Counter) {
    c.add(1);
}

/// Adds `n` to a counter.
pub fn add(c: &Counter, n: u64) {
    c.add(n);
}

impl Metrics {
    /// Hits over cached commands, 0 before the first, as INFO's `hit_ratio` shows it (four
    /// decimals); the status page shows this same text.
    pub fn hit_ratio(&self) -> String {
        let hits = self.hits.load(Relaxed);
        let misses = self.misses.load(Relaxed);
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        format!("{ratio:.4}")
    }

    /// Each declared counter or gauge with its current value, in declaration order.
    pub fn declared(&self) -> impl Iterator<Item = (&'static MetricDef, u64)> + '_ {
        DECLARED
            .iter()
            .zip(self.atomics())
            .map(|(d, a)| (d, a.load(Relaxed)))
    }

    /// The Prometheus text exposition (version 0.0.4): counters, declared gauges, `gauges`
    /// computed by the caller (pools, L1, listener), and the latency histograms.
    pub fn prometheus(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(8192);
        for (d, v) in self.declared().filter(|(d, _)| d.kind == Kind::Counter) {
            let (name, help) = (d.name, d.help);
            out.push_str(&format!(
                "# HELP cachefront_{name}_total {help}.\n# TYPE cachefront_{name}_total counter\ncachefront_{name}_total {v}\n"
            ));
        }
        let declared_gauges = self
            .declared()
            .filter(|(d, _)| d.kind == Kind::Gauge)
            // As f64, like the caller's gauges, so both print alike.
            .map(|(d, v)| (d.name, d.help, v as f64));
        let callers = gauges.iter().copied();
        for (name, help, v) in declared_gauges.chain(callers) {
            out.push_str(&format!(
                "# HELP cachefront_{name} {help}.\n# TYPE cachefront_{name} gauge\ncachefront_{name} {v}\n"
            ));
        }
        let name = "cachefront_latency_seconds";
        out.push_str(&format!(
            "# HELP {name} Latency by command family (hit, miss, passthrough, db_query).\n# TYPE {name} histogram\n"
        ));
        for (family, h) in self.latency.families() {
            h.prometheus(&mut out, name, family);
        }
        out
    }

    /// `latency_<family>:count=…,p50_us=…,p99_us=…` lines for INFO.
    fn latency_info(&self) -> Vec<(String, String)> {
        self.latency
            .families()
            .iter()
            .map(|(f, h)| {
                let q = |x| {
                    h.quantile_us(x)
                        .map(|v| v.to_string())
                        .unwrap_or_else(|| "-".into())
                };
                (
                    format!("latency_{f}"),
                    format!("count={},p50_us={},p99_us={}", h.count(), q(0.5), q(0.99)),
                )
            })
            .collect()
    }

    /// The `# Cachefront` INFO section, CRLF-separated like Valkey's own sections.
    pub fn info_section(&self, db_pool: (usize, usize), listening: bool) -> String {
        let cx = InfoContext { db_pool, listening };
        let mut out = String::from("# Cachefront\r\n");
        let mut row = |k: &str, v: &str| {
            out.push_str(k);
            out.push(':');
            out.push_str(v);
            out.push_str("\r\n");
        };
        row("cachefront_version", env!("CARGO_PKG_VERSION"));
        for (d, v) in self.declared() {
            row(d.info, &v.to_string());
            for (k, f) in d.info_after {
                row(k, &f(self, &cx));
            }
        }
        for (k, v) in self.latency_info() {
            row(&k, &v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    /// A tally added to on many threads reads as the sum of every add, and a gauge counted
    /// up on some threads and down on others as the difference (its parts wrap).
    #[test]
    fn a_split_counter_reads_as_the_sum_of_every_threads_adds() {
        let c = Arc::new(Counter::default());
        let h = Arc::new(Histogram::default());
        let threads: Vec<_> = (0..SHARDS as u64 + 3)
            .map(|i| {
                let (c, h) = (Arc::clone(&c), Arc::clone(&h));
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.add(i + 1);
                        h.observe(Duration::from_micros(i * 100));
                    }
                    if i % 2 == 1 {
                        c.sub(1000 * (i + 1));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("a counting thread");
        }
        let kept: u64 = (0..SHARDS as u64 + 3)
            .filter(|i| i % 2 == 0)
            .map(|i| 1000 * (i + 1))
            .sum();
        assert_eq!(c.load(Relaxed), kept);
        assert_eq!(h.count(), 1000 * (SHARDS as u64 + 3));
        assert_eq!(
            h.sum_us(),
            (0..SHARDS as u64 + 3).map(|i| 1000 * i * 100).sum::<u64>()
        );
        c.store(7, Relaxed);
        assert_eq!(c.load(Relaxed), 7);
    }

    /// Metrics with every declared atomic at a value of its own, so a row showing another
    /// metric's value is caught too.
    fn distinct() -> Metrics {
        let m = Metrics::default();
        for (i, a) in m.atomics().iter().enumerate() {
            a.store(1000 + i as u64, Relaxed);
        }
        m
    }

    /// Derived from the one declaration: a metric added there must show in both outputs
    /// under its names, with its value and help text; and nothing is rendered that is not
    /// declared (or one of the computed rows).
    #[test]
    fn every_declared_metric_is_in_info_and_prometheus() {
        let m = distinct();
        let info = m.info_section((7, 3), true);
        let prom = m.prometheus(&[]);
        for (d, v) in m.declared() {
            assert!(
                info.contains(&format!("\r\n{}:{v}\r\n", d.info)),
                "{} missing from INFO:\n{info}",
                d.field
            );
            let (name, help) = (d.name, d.help);
            let expected = match d.kind {
                Kind::Counter => format!(
                    "# HELP cachefront_{name}_total {help}.\n# TYPE cachefront_{name}_total counter\ncachefront_{name}_total {v}\n"
                ),
                Kind::Gauge => format!(
                    "# HELP cachefront_{name} {help}.\n# TYPE cachefront_{name} gauge\ncachefront_{name} {v}\n"
                ),
            };
            assert!(
                prom.contains(&expected),
                "{} missing from Prometheus:\n{prom}",
                d.field
            );
        }
        let computed: usize = DECLARED.iter().map(|d| d.info_after.len()).sum();
        let latency = m.latency.families().len();
        // `# Cachefront`, `cachefront_version`, the declared, computed and latency rows.
        let rows = 2 + DECLARED.len() + computed + latency;
        assert_eq!(info.split_terminator("\r\n").count(), rows, "{info}");
        // One family per declared metric, plus the latency histogram.
        let families = prom.matches("# TYPE ").count();
        assert_eq!(families, DECLARED.len() + 1, "{prom}");
    }

    /// No two metrics share a name in either output, and names and help texts are valid in
    /// the Prometheus text format.
    #[test]
    fn declared_names_are_unique_and_valid() {
        let mut info = HashSet::from(["cachefront_version"]);
        let mut prom = HashSet::new();
        for d in DECLARED {
            assert!(info.insert(d.info), "INFO field {} twice", d.info);
            for (row, _) in d.info_after {
                assert!(info.insert(row), "INFO field {row} twice");
            }
            assert!(prom.insert(d.name), "Prometheus name {} twice", d.name);
            assert!(
                d.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                d.name
            );
            assert!(
                !d.help.ends_with('.') && !d.help.contains('\n'),
                "{}",
                d.help
            );
        }
    }

    /// However many distinct texts arrive, the table keeps at most its capacity, and a busy
    /// text is not evicted by one-off ones.
    #[test]
    fn top_queries_are_bounded_and_keep_the_busy() {
        let top = TopQueries::new(16);
        let busy = top
            .entry("SELECT busy", || "sql:busy".into())
            .expect("kept");
        for _ in 0..5 {
            busy.observe(true, false, Duration::from_micros(10));
        }
        for i in 0..1000 {
            let s = top
                .entry(&format!("SELECT {i}"), || format!("sql:{i}"))
                .expect("kept");
            s.observe(false, false, Duration::from_micros(100));
        }
        let kept = top.snapshot();
        assert!(kept.len() <= 16, "{}", kept.len());
        assert_eq!(kept[0].label, "sql:busy");
        let again = top.entry("SELECT busy", || panic!("known: no new label"));
        assert!(again.is_some_and(|s| Arc::ptr_eq(&s, &busy)));
        assert!(TopQueries::new(0).entry("x", String::new).is_none());
    }

    #[test]
    fn computed_info_rows() {
        let m = Metrics::default();
        let info = m.info_section((7, 3), true);
        assert!(info.contains("\r\nhit_ratio:0.0000\r\n"), "{info}");
        assert!(
            info.contains("\r\ndb_pool:size=7,available=3\r\n"),
            "{info}"
        );
        assert!(info.contains("\r\ninvalidation_listening:1\r\n"), "{info}");
        m.hits.store(1, Relaxed);
        m.misses.store(2, Relaxed);
        let info = m.info_section((0, 0), false);
        assert!(info.contains("\r\nhit_ratio:0.3333\r\n"), "{info}");
        assert!(info.contains("\r\ninvalidation_listening:0\r\n"), "{info}");
    }
}
