//! Keeping cached entries fresh when PostgreSQL data changes — by any client of the database.
//!
//! Triggers (see `db::triggers`) send a NOTIFY on commit naming the table and, for tables that
//! row-keyed named queries read, the changed rows' key values. A listening connection merges
//! each notification into the pending work of its table (see [`pending`]), and an applier
//! turns that into invalidations in Valkey, each table on its own. Whenever the listening
//! connection is (re)established — including at start — every table ever cached is
//! invalidated, because notifications sent while nobody listened are lost.
//!
//! An invalidation Valkey refuses (out of memory, down) never blocks the others and is never
//! dropped: its table becomes *degraded* — its reads bypass the cache and answer from
//! PostgreSQL (`Cache::bypasses`) — and it is retried with backoff until it applies, which
//! ends the degraded state. Meta keys of the wrong type are repaired by the scripts
//! themselves (see `cache::store`).

use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::AsyncMessage;

use tokio::sync::watch;

use crate::cache::named::{Named, NamedQuery};
use crate::cache::{Cache, Version};
use crate::config::InvalidationConfig;
use crate::db::triggers::{self, TableRef};
use crate::db::{Db, DbError};
use crate::error::{Error, Result};
use crate::metrics::{inc, Metrics};
use pending::{Change, Pending, Work};

pub mod pending;

/// A named query whose key is one row's key value.
struct RowBinding {
    column: String,
    query: Arc<NamedQuery>,
}

/// What the invalidation side knows: which tables have triggers, how names resolve, which
/// named queries are keyed by which column, and whether the listener is listening.
pub struct Invalidation {
    cfg: InvalidationConfig,
    metrics: Arc<Metrics>,
    /// Row-keyed named queries by table.
    bindings: Mutex<Arc<HashMap<String, Vec<RowBinding>>>>,
    /// Every table the named queries read (their triggers are installed up front).
    named_tables: Mutex<Vec<String>>,
    /// Whether the listener is connected and listening.
    listening: watch::Sender<bool>,
    /// Relation name → the base tables behind it (itself, or a view's tables).
    resolved: Mutex<HashMap<String, Vec<TableRef>>>,
    /// Tables whose triggers this process has installed or checked.
    triggered: Mutex<HashSet<TableRef>>,
}

impl Invalidation {
    pub fn new(cfg: &InvalidationConfig, named: &Named, metrics: Arc<Metrics>) -> Invalidation {
        Invalidation {
            cfg: cfg.clone(),
            metrics,
            bindings: Mutex::new(Arc::new(row_bindings(named))),
            named_tables: Mutex::new(named_tables(named)),
            listening: watch::Sender::new(false),
            resolved: Mutex::new(HashMap::new()),
            triggered: Mutex::new(HashSet::new()),
        }
    }

    /// After a reload: the named queries now in force. Tables whose key columns changed get
    /// their triggers checked again on next use.
    pub fn set_named(&self, named: &Named) {
        *self.bindings.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(row_bindings(named));
        *self.named_tables.lock().unwrap_or_else(|p| p.into_inner()) = named_tables(named);
        self.triggered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Whether the listener is connected and listening.
    pub fn is_listening(&self) -> bool {
        *self.listening.borrow()
    }

    fn set_listening(&self, on: bool) {
        self.listening.send_replace(on);
    }

    /// At start, waits (at most `limit`) until the listener is listening: an entry stored
    /// just before the listener's first flush would be thrown away by it. Later outages
    /// don't wait: what is stored while the listener is down is flushed when it comes back,
    /// and a database that is down should fail misses fast, not after a wait.
    pub async fn wait_listening(&self, limit: Duration) {
        if !self.cfg.enabled
            || self.is_listening()
            || self
                .metrics
                .listener_reconnects
                .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        {
            return;
        }
        let mut rx = self.listening.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|on| *on)).await;
    }

    fn bindings(&self) -> Arc<HashMap<String, Vec<RowBinding>>> {
        Arc::clone(&self.bindings.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Key columns whose values notifications for `table` must carry.
    fn key_columns(&self, table: &str) -> Vec<String> {
        let mut cols: Vec<String> = self
            .bindings()
            .get(table)
            .map(|b| b.iter().map(|b| b.column.clone()).collect())
            .unwrap_or_default();
        cols.sort();
        cols.dedup();
        cols
    }

    /// Before a fill: turns the relation names a query reads into the base tables to depend
    /// on (a view becomes its tables) and makes sure those tables notify. Names PostgreSQL
    /// does not know are kept as they are.
    pub async fn prepare(&self, db: &Db, names: &[String]) -> Result<Vec<String>> {
        if !self.cfg.enabled || names.is_empty() {
            return Ok(names.to_vec());
        }
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            let cached = self
                .resolved
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .cloned();
            let tables = match cached {
                Some(t) => t,
                None => {
                    let client = db.client().await.map_err(Error::from)?;
                    let t = triggers::resolve(&client, name)
                        .await
                        .map_err(Error::from)?;
                    self.resolved
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.clone(), t.clone());
                    t
                }
            };
            if tables.is_empty() {
                out.push(name.clone());
            }
            for t in tables {
                self.ensure_triggers(db, &t).await?;
                out.push(crate::db::sql::normalize_table_text(
                    &triggers::quote_ident(&t.name),
                ));
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Installs the table's triggers once per process (when `install_triggers` is on).
    async fn ensure_triggers(&self, db: &Db, table: &TableRef) -> Result<()> {
        if !self.cfg.install_triggers
            || self
                .triggered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(table)
        {
            return Ok(());
        }
        let mut client = db.client().await.map_err(Error::from)?;
        let cols = self.key_columns(&table.name);
        if let Err(e) = triggers::install(&mut client, &self.cfg, table, &cols).await {
            // Without triggers the entries still expire by TTL; say so loudly, once.
            tracing::error!(table = %table.name, error = %e, "cannot install invalidation triggers; entries of this table will only expire by TTL (run `cachefront triggers install` as the table owner)");
        } else {
            tracing::info!(table = %table.name, key_columns = ?cols, "invalidation triggers in place");
        }
        self.triggered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(table.clone());
        Ok(())
    }

    /// Installs triggers for every table named queries read plus `invalidation.tables`.
    pub async fn install_configured(&self, db: &Db) -> Result<()> {
        let mut names = self
            .named_tables
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        names.extend(
            self.cfg
                .tables
                .iter()
                .map(|t| crate::db::sql::normalize_table_text(t)),
        );
        names.sort();
        names.dedup();
        self.prepare(db, &names).await.map(|_| ())
    }

    /// Other names entries may carry for `table` before resolution: relations (views) this
    /// process resolved to it. Their reads bypass the cache with it while it is degraded.
    fn aliases(&self, table: &str) -> Vec<String> {
        let resolved = self.resolved.lock().unwrap_or_else(|p| p.into_inner());
        resolved
            .iter()
            .filter(|(name, tables)| {
                name.as_str() != table
                    && tables.iter().any(|t| {
                        crate::db::sql::normalize_table_text(&triggers::quote_ident(&t.name))
                            == table
                    })
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Entry keys (and negative-cache markers) of row-keyed named queries for these rows.
    fn row_entry_keys(
        &self,
        cache: &Cache,
        table: &str,
        column: &str,
        values: &[String],
    ) -> Vec<String> {
        let mut keys = Vec::new();
        let bindings = self.bindings();
        for b in bindings.get(table).into_iter().flatten() {
            if b.column != column {
                continue;
            }
            for v in values {
                let key = b.query.key_for_row(v);
                keys.push(cache.store.negative_key(&key));
                keys.push(key);
            }
        }
        keys
    }
}

/// Every table the named queries read.
fn named_tables(named: &Named) -> Vec<String> {
    named.values().flat_map(|q| q.all_tables()).collect()
}

/// Row-keyed named queries by the table their key column belongs to.
fn row_bindings(named: &Named) -> HashMap<String, Vec<RowBinding>> {
    let mut bindings: HashMap<String, Vec<RowBinding>> = HashMap::new();
    for q in named.values() {
        if let Some(r) = &q.row_key {
            bindings
                .entry(r.table.clone())
                .or_default()
                .push(RowBinding {
                    column: r.column.clone(),
                    query: Arc::clone(q),
                });
        }
    }
    bindings
}

fn parse_payload(payload: &str) -> Option<Change> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    let table = crate::db::sql::normalize_table_text(&triggers::quote_ident(v.get("t")?.as_str()?));
    let Some(keys) = v.get("k").and_then(|k| k.as_object()) else {
        return Some(Change::Table(table));
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
    Some(Change::Rows { table, keys })
}

/// Notifications received and not yet applied: the connection's driver merges them in as
/// they arrive, the applier takes them all at once. Bounded (see [`pending`]), so a Valkey
/// that refuses writes costs memory per table, not per change.
#[derive(Default)]
struct Queue {
    pending: Mutex<Pending>,
    wake: tokio::sync::Notify,
}

impl Queue {
    fn with<R>(&self, f: impl FnOnce(&mut Pending) -> R) -> R {
        f(&mut self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn push(&self, change: Change) {
        self.with(|p| p.add(change));
        self.wake.notify_one();
    }

    fn take(&self) -> Pending {
        self.with(std::mem::take)
    }

    fn put_back(&self, failed: Pending) {
        self.with(|p| p.merge(failed));
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

/// Applies one table's pending work.
async fn apply_work(l: &Listener, table: &str, work: &Work) -> Result<u64> {
    match work {
        Work::Table => l.cache.invalidate(&[table.to_string()]).await,
        Work::Rows(columns) => {
            let mut total = 0;
            for (column, values) in columns {
                let values: Vec<String> = values.iter().cloned().collect();
                let entry_keys = l
                    .invalidation
                    .row_entry_keys(&l.cache, table, column, &values);
                total += l
                    .cache
                    .invalidate_rows(table, column, &values, &entry_keys)
                    .await?;
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
                l.cache.recovered(&table);
            }
            Err(e) => {
                tracing::debug!(table = %table, error = %e, "cannot apply an invalidation yet; will retry");
                inc(&l.metrics().invalidation_failures);
                let aliases = l.invalidation.aliases(&table);
                l.cache.degrade(&table, aliases, &e);
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

/// Runs the listener until the process ends: connect, LISTEN, flush what may have been missed,
/// apply notifications; on any failure, reconnect with backoff.
pub async fn run(l: Listener) {
    if !l.invalidation.cfg.enabled {
        return;
    }
    let max = Duration::from_millis(l.invalidation.cfg.reconnect_max_ms);
    let mut backoff = Duration::from_millis(50);
    loop {
        match listen_once(&l).await {
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
    let to_apply = Arc::clone(&queue);
    let mut driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    inc(&metrics.notifications);
                    match parse_payload(n.payload()) {
                        Some(change) => to_apply.push(change),
                        None => {
                            tracing::warn!(payload = %n.payload(), "unreadable invalidation notification")
                        }
                    }
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
    if let Err(e) = l.invalidation.install_configured(&l.db).await {
        tracing::warn!(error = %e, "cannot install configured invalidation triggers yet");
    }
    // Listening now: anything written before this moment may have been missed. With read
    // replicas, fills after the flush must not read a replica that has not replayed those
    // writes: every fill must see the position of now (see `db::replicas`).
    if let Some(set) = l.db.replicas() {
        set.raise_all(l.db.wal_insert_lsn(client).await?);
    }
    queue.with(Pending::flush_all);
    let mut retry = Retry::new();
    // A flush that fails leaves every read bypassing the cache, so listening may begin.
    apply_queued(l, client, queue, &mut retry).await?;
    l.invalidation.set_listening(true);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(2));
    let result = loop {
        tokio::select! {
            _ = queue.wake.notified() => {}
            _ = retry.due() => {}
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
    l.invalidation.set_listening(false);
    result
}

/// Takes everything queued (new changes and earlier failures alike) and applies it; what
/// fails goes back in the queue, retried after a backoff or with the next notification.
async fn apply_queued(
    l: &Listener,
    client: &tokio_postgres::Client,
    queue: &Queue,
    retry: &mut Retry,
) -> std::result::Result<(), DbError> {
    let batch = queue.take();
    if !batch.is_empty() {
        // Before any version is bumped. If the position cannot be read, reconnecting
        // flushes everything, these tables included.
        require_seen(l, client, &batch).await?;
        let failed = apply_batch(l, batch).await;
        if failed.is_empty() {
            retry.succeeded();
        } else {
            queue.put_back(failed);
            retry.failed();
        }
    }
    let pending = queue.len() as u64;
    l.metrics()
        .invalidation_pending
        .store(pending, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// With read replicas: fills that will check a version this batch bumps must see the
/// primary's WAL as of now, which includes the writes that sent them (see `db::replicas`).
/// Mirrors what [`apply_work`] bumps: a table's version and epoch, or a table's version and
/// its rows' versions. A flush of everything was covered when listening began.
async fn require_seen(
    l: &Listener,
    client: &tokio_postgres::Client,
    batch: &Pending,
) -> std::result::Result<(), DbError> {
    let Some(set) = l.db.replicas() else {
        return Ok(());
    };
    if batch.tables.is_empty() {
        return Ok(());
    }
    let lsn = l.db.wal_insert_lsn(client).await?;
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
            parse_payload(r#"{"s":"public","t":"employees","k":{"id":[7,8,null]}}"#),
            Some(Change::Rows {
                table: "employees".into(),
                keys: vec![("id".into(), vec!["7".into(), "8".into()])]
            })
        );
        assert_eq!(
            parse_payload(r#"{"s":"public","t":"Mixed"}"#),
            Some(Change::Table("Mixed".into()))
        );
        assert_eq!(parse_payload("nope"), None);
    }
}
