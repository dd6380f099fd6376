//! The status page's figures (`GET /status.json` on `metrics.listen`; the page at `/` polls
//! it): hit ratio and latencies, the busiest queries, invalidation, verification, upstream
//! health and the degraded states. Every figure is read from where INFO and Prometheus read
//! it (`Metrics`, `Context::computed`, the per-query figures), none is defined here; this
//! only picks and groups them, and serde writes the JSON.

use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

use super::queries::listed;
use super::Context;
use crate::metrics::Histogram;
use crate::protocol::Proto;

/// How many of the busiest queries the page lists.
const BUSIEST: usize = 10;

/// How long the health check waits for Valkey's `PONG`.
const PING_LIMIT: Duration = Duration::from_millis(500);

/// Everything the status page shows, as one JSON object.
#[derive(Serialize)]
pub struct Status {
    pub version: &'static str,
    /// Milliseconds since the Unix epoch when these figures were read.
    pub now_ms: u64,
    /// INFO's `hit_ratio`, the same text.
    pub hit_ratio: String,
    /// Latency per family (hit, miss, passthrough, db_query), as INFO's `latency_*` rows,
    /// in their order.
    pub latency: Vec<Latency>,
    /// Every declared counter and gauge by its INFO name (`hits`, `notifications`,
    /// `verify_mismatches` …), then the computed figures that INFO shows.
    pub figures: BTreeMap<&'static str, u64>,
    pub health: Health,
    pub degraded: Degraded,
    /// The busiest queries, most reads first.
    pub queries: Vec<Query>,
}

/// One latency family: observations, their total, and bucket-bound quantiles.
#[derive(Serialize)]
pub struct Latency {
    pub family: &'static str,
    pub count: u64,
    pub sum_us: u64,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
}

impl Latency {
    fn of(family: &'static str, h: &Histogram) -> Latency {
        Latency {
            family,
            count: h.count(),
            sum_us: h.sum_us(),
            p50_us: h.quantile_us(0.5),
            p99_us: h.quantile_us(0.99),
        }
    }
}

/// Whether what cachefront depends on is there.
#[derive(Serialize)]
pub struct Health {
    /// Valkey answered a `PING` within [`PING_LIMIT`] just now.
    pub valkey_up: bool,
    pub valkey_version: String,
    pub db_pool_size: usize,
    pub db_pool_available: usize,
    /// The invalidation listener is connected and listening.
    pub listening: bool,
    /// This instance holds the invalidation lease (it applies changes for the fleet).
    pub lease_holder: bool,
    /// The L1's tracking connection is up.
    pub l1_tracking: bool,
}

/// The states in which cached reads bypass the cache, or changes go unseen.
#[derive(Serialize)]
pub struct Degraded {
    /// Every cached read bypasses the cache until a pending flush is applied.
    pub all: bool,
    /// Tables (OIDs) with an invalidation not applied yet: their reads bypass the cache.
    pub tables: Vec<String>,
    /// Tables (OIDs) whose triggers could not be installed: their reads go to PostgreSQL.
    pub unwatched_tables: Vec<u32>,
    /// Why the DDL event trigger is not in place; `None` while it is.
    pub ddl_hook_missing: Option<String>,
}

/// One query's figures, as `CACHEFRONT.QUERIES` lists them.
#[derive(Serialize)]
pub struct Query {
    /// Its label: the named query's command, or `sql:<hash>`.
    pub query: String,
    pub command: String,
    pub sql: String,
    pub hits: u64,
    pub misses: u64,
    pub errors: u64,
    pub hit_ratio: String,
    pub hit_p50_us: Option<u64>,
    pub hit_p99_us: Option<u64>,
    pub miss_p50_us: Option<u64>,
    pub miss_p99_us: Option<u64>,
    pub fills: u64,
}

/// Whether Valkey answers a `PING` now.
async fn valkey_up(ctx: &Context) -> bool {
    let ping = bytes::Bytes::from_static(b"*1\r\n$4\r\nPING\r\n");
    let asked = async {
        let rx = ctx.upstream.send(0, Proto::Resp2, ping).await;
        crate::upstream::reply_of(rx).await
    };
    matches!(
        tokio::time::timeout(PING_LIMIT, asked).await,
        Ok(Ok(reply)) if reply.starts_with(b"+PONG")
    )
}

/// The busiest queries (named and SQL.CACHED alike), most reads first.
fn busiest(ctx: &Context) -> Vec<Query> {
    let mut all = listed(ctx, usize::MAX);
    all.sort_by_key(|q| std::cmp::Reverse(q.stats.reads()));
    all.into_iter()
        .take(BUSIEST)
        .map(|q| {
            let s = &q.stats;
            let load = |a: &crate::metrics::Counter| a.load(std::sync::atomic::Ordering::Relaxed);
            Query {
                query: s.label.clone(),
                command: s.command.clone(),
                sql: s.sql.to_string(),
                hits: load(&s.hits),
                misses: load(&s.misses),
                errors: load(&s.errors),
                hit_ratio: format!("{:.4}", s.hit_ratio()),
                hit_p50_us: s.hit_latency.quantile_us(0.5),
                hit_p99_us: s.hit_latency.quantile_us(0.99),
                miss_p50_us: s.miss_latency.quantile_us(0.5),
                miss_p99_us: s.miss_latency.quantile_us(0.99),
                fills: load(&s.fills),
            }
        })
        .collect()
}

/// The figures now.
pub async fn status(ctx: &Context) -> Status {
    let valkey_up = valkey_up(ctx).await;
    let mut figures: BTreeMap<&'static str, u64> =
        ctx.metrics.declared().map(|(d, v)| (d.info, v)).collect();
    figures.extend(
        ctx.computed()
            .iter()
            .filter_map(|c| c.info.or(c.gauge.map(|g| g.0)).map(|n| (n, c.value))),
    );
    let (db_pool_size, db_pool_available) = ctx.db.pool_status();
    let (all, tables) = ctx.cache.degraded.snapshot();
    Status {
        version: env!("CARGO_PKG_VERSION"),
        now_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        hit_ratio: ctx.metrics.hit_ratio(),
        latency: ctx
            .metrics
            .latency
            .families()
            .iter()
            .map(|(f, h)| Latency::of(f, h))
            .collect(),
        figures,
        health: Health {
            valkey_up,
            valkey_version: ctx.upstream.server_version(),
            db_pool_size,
            db_pool_available,
            listening: ctx.is_listening(),
            lease_holder: ctx.invalidation.lease().holding(),
            l1_tracking: ctx.upstream.tracking_up(),
        },
        degraded: Degraded {
            all,
            tables,
            unwatched_tables: ctx.invalidation.unwatched(),
            ddl_hook_missing: ctx.invalidation.ddl_hook_missing(),
        },
        queries: busiest(ctx),
    }
}

/// The figures now, as the JSON `/status.json` serves.
pub async fn status_json(ctx: &Context) -> String {
    let s = status(ctx).await;
    serde_json::to_string(&s).unwrap_or_else(|e| {
        // Serializing plain strings and numbers cannot fail; say so if it ever does.
        serde_json::json!({ "error": e.to_string() }).to_string()
    })
}
