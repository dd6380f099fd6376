//! Counters and latency histograms, named once here; `INFO`'s `# Cachefront` section and the
//! Prometheus endpoint (`metrics.listen`) both render them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Upper bounds of the latency buckets, in microseconds (the last bucket is +Inf).
pub const BUCKETS_US: [u64; 14] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000,
];

/// A fixed-bucket latency histogram of relaxed atomics: recording is two adds, no lock.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [AtomicU64; 15],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let us = d.as_micros().min(u64::MAX as u128) as u64;
        let i = BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(BUCKETS_US.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Relaxed)).sum()
    }

    /// The bucket bound under which `q` of the observations fall (an upper estimate).
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let want = (total as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Relaxed);
            if seen >= want {
                return Some(BUCKETS_US.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        None
    }

    fn prometheus(&self, out: &mut String, name: &str, family: &str) {
        let mut cum = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            cum += b.load(Relaxed);
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
            self.sum_us.load(Relaxed) as f64 / 1e6
        ));
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
    fn families(&self) -> [(&'static str, &Histogram); 4] {
        [
            ("hit", &self.hit),
            ("miss", &self.miss),
            ("passthrough", &self.passthrough),
            ("db_query", &self.db_query),
        ]
    }
}

/// Process-wide counters. Plain relaxed atomics: each is an independent tally.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Cached commands answered from Valkey.
    pub hits: AtomicU64,
    /// Cached commands that found no entry.
    pub misses: AtomicU64,
    /// Entries stored after a miss.
    pub fills: AtomicU64,
    /// Misses that waited for another client's fill of the same key instead of querying.
    pub coalesced_waits: AtomicU64,
    /// Queries sent to PostgreSQL.
    pub db_queries: AtomicU64,
    /// Queries PostgreSQL failed or could not be reached for.
    pub db_errors: AtomicU64,
    /// Cached commands answered straight from PostgreSQL because Valkey was unavailable.
    pub fail_open: AtomicU64,
    /// Upstream (Valkey) failures seen by any command.
    pub upstream_errors: AtomicU64,
    /// Cache entries dropped by invalidation.
    pub invalidations: AtomicU64,
    /// Fills not stored because a write invalidated their tables while they read.
    pub stale_fill_rejections: AtomicU64,
    /// Error replies sent to clients.
    pub errors: AtomicU64,
    /// Commands passed through to Valkey.
    pub passthrough: AtomicU64,
    /// Client connections accepted since start.
    pub connections_total: AtomicU64,
    /// Client connections open now.
    pub connections_current: AtomicU64,
    /// Connections refused because `limits.max_clients` was reached.
    pub rejected_connections: AtomicU64,
    /// Change notifications received from PostgreSQL.
    pub notifications: AtomicU64,
    /// Times the invalidation listener (re)connected.
    pub listener_reconnects: AtomicU64,
    /// Hot entries refreshed before expiry (XFetch).
    pub early_refreshes: AtomicU64,
    /// Hits answered from the in-process L1 (also counted in `hits`).
    pub l1_hits: AtomicU64,
    /// Misses answered with a stale value because PostgreSQL failed.
    pub stale_served: AtomicU64,
    /// TLS handshakes with clients that failed or timed out.
    pub tls_handshake_failures: AtomicU64,
    /// Fill queries a read replica answered (`postgres.replicas`).
    pub replica_fills: AtomicU64,
    /// Fill queries the primary answered although replicas are configured: none had replayed
    /// a write the fill must see, none was within the lag bound, or none was up.
    pub replica_fallbacks: AtomicU64,
    /// Fill queries the primary answered after the replica chosen failed as a server (also
    /// counted in `replica_fallbacks`).
    pub replica_errors: AtomicU64,
    /// Clients disconnected for holding more unread replies than
    /// `limits.client_output_buffer_limit` allows.
    pub output_limit_disconnects: AtomicU64,
    /// Cached commands answered from PostgreSQL because an invalidation of their tables could
    /// not be applied yet (the cache was bypassed; nothing stored).
    pub degraded_reads: AtomicU64,
    /// Attempts to apply an invalidation that Valkey refused or did not answer (retried).
    pub invalidation_failures: AtomicU64,
    /// cachefront meta keys of the wrong type replaced by an invalidation.
    pub meta_repairs: AtomicU64,
    /// Tables with an invalidation not yet applied (a gauge, set by the listener).
    pub invalidation_pending: AtomicU64,
    pub latency: Latency,
    pub slowlog: SlowLog,
}

/// Help texts for the Prometheus exposition, by counter name.
const COUNTERS: &[(&str, &str)] = &[
    ("hits", "Cached commands answered from the cache"),
    ("misses", "Cached commands that found no entry"),
    ("fills", "Entries stored after a miss"),
    (
        "coalesced_waits",
        "Misses that waited for another request's fill",
    ),
    ("db_queries", "Queries sent to PostgreSQL"),
    (
        "db_errors",
        "Queries PostgreSQL failed or could not be reached for",
    ),
    (
        "fail_open",
        "Cached commands answered from PostgreSQL because Valkey was unavailable",
    ),
    ("upstream_errors", "Valkey failures seen"),
    ("invalidations", "Cache entries dropped by invalidation"),
    (
        "stale_fill_rejections",
        "Fills not stored because a write raced them",
    ),
    ("errors", "Error replies sent to clients"),
    ("passthrough_commands", "Commands passed through to Valkey"),
    ("connections_received", "Client connections accepted"),
    (
        "rejected_connections",
        "Client connections refused (max clients, protected mode)",
    ),
    (
        "notifications",
        "Change notifications received from PostgreSQL",
    ),
    (
        "listener_reconnects",
        "Times the invalidation listener (re)connected",
    ),
    ("early_refreshes", "Hot entries refreshed before expiry"),
    ("l1_hits", "Hits answered from the in-process L1"),
    (
        "stale_served",
        "Misses answered with a stale value because PostgreSQL failed",
    ),
    (
        "tls_handshake_failures",
        "TLS handshakes with clients that failed or timed out",
    ),
    ("replica_fills", "Fill queries a read replica answered"),
    (
        "replica_fallbacks",
        "Fill queries the primary answered because no read replica had caught up or was up",
    ),
    (
        "replica_errors",
        "Fill queries the primary answered after the read replica chosen failed",
    ),
    (
        "client_output_limit_disconnects",
        "Clients disconnected for passing their output buffer limit",
    ),
    (
        "degraded_reads",
        "Cached commands answered from PostgreSQL because an invalidation of their tables is pending",
    ),
    (
        "invalidation_failures",
        "Attempts to apply an invalidation that failed and will be retried",
    ),
    (
        "meta_repairs",
        "cachefront meta keys of the wrong type replaced by an invalidation",
    ),
];

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

impl Metrics {
    fn counter(&self, name: &str) -> u64 {
        let c = match name {
            "hits" => &self.hits,
            "misses" => &self.misses,
            "fills" => &self.fills,
            "coalesced_waits" => &self.coalesced_waits,
            "db_queries" => &self.db_queries,
            "db_errors" => &self.db_errors,
            "fail_open" => &self.fail_open,
            "upstream_errors" => &self.upstream_errors,
            "invalidations" => &self.invalidations,
            "stale_fill_rejections" => &self.stale_fill_rejections,
            "errors" => &self.errors,
            "passthrough_commands" => &self.passthrough,
            "connections_received" => &self.connections_total,
            "rejected_connections" => &self.rejected_connections,
            "notifications" => &self.notifications,
            "listener_reconnects" => &self.listener_reconnects,
            "early_refreshes" => &self.early_refreshes,
            "l1_hits" => &self.l1_hits,
            "stale_served" => &self.stale_served,
            "tls_handshake_failures" => &self.tls_handshake_failures,
            "replica_fills" => &self.replica_fills,
            "replica_fallbacks" => &self.replica_fallbacks,
            "replica_errors" => &self.replica_errors,
            "client_output_limit_disconnects" => &self.output_limit_disconnects,
            "degraded_reads" => &self.degraded_reads,
            "invalidation_failures" => &self.invalidation_failures,
            "meta_repairs" => &self.meta_repairs,
            _ => return 0,
        };
        c.load(Relaxed)
    }

    /// The Prometheus text exposition (version 0.0.4): counters, `gauges` given by the
    /// caller (pools, L1, listener), and the latency histograms.
    pub fn prometheus(&self, gauges: &[(&str, &str, f64)]) -> String {
        let mut out = String::with_capacity(8192);
        for (name, help) in COUNTERS {
            out.push_str(&format!(
                "# HELP cachefront_{name}_total {help}.\n# TYPE cachefront_{name}_total counter\ncachefront_{name}_total {}\n",
                self.counter(name)
            ));
        }
        for (name, help, v) in gauges {
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
        let g = |c: &AtomicU64| c.load(Relaxed);
        let hits = g(&self.hits);
        let misses = g(&self.misses);
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        let rows: Vec<(&str, String)> = vec![
            ("cachefront_version", env!("CARGO_PKG_VERSION").to_string()),
            ("hits", hits.to_string()),
            ("misses", misses.to_string()),
            ("hit_ratio", format!("{ratio:.4}")),
            ("fills", g(&self.fills).to_string()),
            ("coalesced_waits", g(&self.coalesced_waits).to_string()),
            ("db_queries", g(&self.db_queries).to_string()),
            ("db_errors", g(&self.db_errors).to_string()),
            ("fail_open", g(&self.fail_open).to_string()),
            ("upstream_errors", g(&self.upstream_errors).to_string()),
            ("invalidations", g(&self.invalidations).to_string()),
            (
                "stale_fill_rejections",
                g(&self.stale_fill_rejections).to_string(),
            ),
            ("errors", g(&self.errors).to_string()),
            ("passthrough_commands", g(&self.passthrough).to_string()),
            (
                "connected_clients",
                g(&self.connections_current).to_string(),
            ),
            (
                "total_connections_received",
                g(&self.connections_total).to_string(),
            ),
            (
                "rejected_connections",
                g(&self.rejected_connections).to_string(),
            ),
            (
                "db_pool",
                format!("size={},available={}", db_pool.0, db_pool.1),
            ),
            ("invalidation_listening", u8::from(listening).to_string()),
            ("notifications", g(&self.notifications).to_string()),
            (
                "listener_reconnects",
                g(&self.listener_reconnects).to_string(),
            ),
            ("early_refreshes", g(&self.early_refreshes).to_string()),
            (
                "client_output_limit_disconnects",
                g(&self.output_limit_disconnects).to_string(),
            ),
            ("l1_hits", g(&self.l1_hits).to_string()),
            ("stale_served", g(&self.stale_served).to_string()),
            (
                "tls_handshake_failures",
                g(&self.tls_handshake_failures).to_string(),
            ),
            ("replica_fills", g(&self.replica_fills).to_string()),
            ("replica_fallbacks", g(&self.replica_fallbacks).to_string()),
            ("replica_errors", g(&self.replica_errors).to_string()),
            ("degraded_reads", g(&self.degraded_reads).to_string()),
            (
                "invalidation_pending_tables",
                g(&self.invalidation_pending).to_string(),
            ),
            (
                "invalidation_failures",
                g(&self.invalidation_failures).to_string(),
            ),
            ("meta_repairs", g(&self.meta_repairs).to_string()),
        ];
        let mut out = String::from("# Cachefront\r\n");
        let latency = self.latency_info();
        let rows = rows
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .chain(latency);
        for (k, v) in rows {
            out.push_str(&k);
            out.push(':');
            out.push_str(&v);
            out.push_str("\r\n");
        }
        out
    }
}
