//! Counters, named once here; `INFO`'s `# Cachefront` section renders them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

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
}

/// Adds one to a counter.
pub fn inc(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Adds `n` to a counter.
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

impl Metrics {
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
            ("l1_hits", g(&self.l1_hits).to_string()),
        ];
        let mut out = String::from("# Cachefront\r\n");
        for (k, v) in rows {
            out.push_str(k);
            out.push(':');
            out.push_str(&v);
            out.push_str("\r\n");
        }
        out
    }
}
