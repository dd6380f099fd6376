//! The read-through cache: look up, and on a miss fill once, from PostgreSQL, without ever
//! storing a value a concurrent write has made stale.

pub mod coalesce;
pub mod key;
pub mod store;

use bytes::Bytes;
use std::future::Future;
use std::sync::Arc;

use crate::error::Result;
use crate::metrics::{inc, Metrics};
use coalesce::Coalescer;
use store::Store;

/// One cache entry's identity and what it depends on.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    /// Seconds.
    pub ttl: u64,
    /// Tables the value was read from (normalised names); their writes drop the entry.
    pub tables: Vec<String>,
}

/// What a fill produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// No row: nothing to cache.
    Absent,
    String(Bytes),
    Hash(Vec<(String, Bytes)>),
}

/// Where a reply came from, for INFO and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    /// Filled by this request.
    Miss,
    /// Filled by a concurrent request this one waited for.
    Coalesced,
    /// Valkey was unavailable; answered straight from PostgreSQL.
    FailOpen,
}

/// Cache operations shared by every connection.
pub struct Cache {
    pub store: Store,
    coalescer: Arc<Coalescer<(Value, CacheStatus)>>,
    metrics: Arc<Metrics>,
}

impl Cache {
    pub fn new(store: Store, metrics: Arc<Metrics>) -> Cache {
        Cache {
            store,
            coalescer: Arc::new(Coalescer::default()),
            metrics,
        }
    }

    /// Fills `entry` after a miss: one `load` per key however many clients miss at once.
    pub async fn fill<F, Fut>(&self, entry: Entry, load: F) -> Result<(Value, CacheStatus)>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = Result<Value>> + Send + 'static,
    {
        let store = self.store.clone();
        let metrics = Arc::clone(&self.metrics);
        let key = entry.key.clone();
        let fill = async move { fill_once(store, metrics, entry, load).await };
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

    /// Drops every entry depending on `tables`.
    pub async fn invalidate(&self, tables: &[String]) -> Result<u64> {
        let n = self.store.invalidate(tables).await?;
        crate::metrics::add(&self.metrics.invalidations, n);
        Ok(n)
    }
}

/// The fill protocol: versions, query, conditional store.
async fn fill_once<F, Fut>(
    store: Store,
    metrics: Arc<Metrics>,
    entry: Entry,
    load: F,
) -> Result<(Value, CacheStatus)>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Value>> + Send + 'static,
{
    let versions = store.versions(&entry.tables).await;
    inc(&metrics.db_queries);
    let value = load().await.inspect_err(|_| inc(&metrics.db_errors))?;
    let versions = match versions {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "valkey unavailable; answering from PostgreSQL");
            inc(&metrics.fail_open);
            inc(&metrics.upstream_errors);
            return Ok((value, CacheStatus::FailOpen));
        }
    };
    if value != Value::Absent {
        match store.store(&entry, &value, &versions).await {
            Ok(true) => inc(&metrics.fills),
            Ok(false) => inc(&metrics.stale_fill_rejections),
            Err(e) => {
                tracing::warn!(error = %e, key = %entry.key, "could not store a filled entry");
                inc(&metrics.upstream_errors);
                inc(&metrics.fail_open);
                return Ok((value, CacheStatus::FailOpen));
            }
        }
    }
    Ok((value, CacheStatus::Miss))
}
