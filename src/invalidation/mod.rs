//! Keeping cached entries fresh when PostgreSQL data changes — by any client of the database.
//!
//! Triggers (see `db::triggers`) send a NOTIFY on commit naming the table and, for tables that
//! row-keyed named queries read, the changed rows' key values. A listening connection turns
//! each notification into an invalidation in Valkey, in commit order, retrying until Valkey
//! takes it. Whenever the listening connection is (re)established — including at start —
//! every table ever cached is invalidated, because notifications sent while nobody listened
//! are lost.

use futures::StreamExt;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_postgres::AsyncMessage;

use crate::cache::Version;
use crate::command::named_query::NamedQuery;
use crate::config::InvalidationConfig;
use crate::db::triggers::{self, TableRef};
use crate::db::{Db, DbError};
use crate::error::{Error, Result};
use crate::metrics::inc;
use crate::server::Shared;

/// A named query whose key is one row's key value.
struct RowBinding {
    column: String,
    query: Arc<NamedQuery>,
}

/// What the invalidation side knows: which tables have triggers, how names resolve, and which
/// named queries are keyed by which column.
pub struct Invalidation {
    cfg: InvalidationConfig,
    /// Row-keyed named queries by table.
    bindings: Mutex<Arc<HashMap<String, Vec<RowBinding>>>>,
    /// Relation name → the base tables behind it (itself, or a view's tables).
    resolved: Mutex<HashMap<String, Vec<TableRef>>>,
    /// Tables whose triggers this process has installed or checked.
    triggered: Mutex<HashSet<TableRef>>,
}

impl Invalidation {
    pub fn new(cfg: &InvalidationConfig, named: &HashMap<String, Arc<NamedQuery>>) -> Invalidation {
        Invalidation {
            cfg: cfg.clone(),
            bindings: Mutex::new(Arc::new(row_bindings(named))),
            resolved: Mutex::new(HashMap::new()),
            triggered: Mutex::new(HashSet::new()),
        }
    }

    /// After a reload: the row-keyed named queries now in force. Tables whose key columns
    /// changed get their triggers checked again on next use.
    pub fn set_named(&self, named: &HashMap<String, Arc<NamedQuery>>) {
        *self.bindings.lock().unwrap_or_else(|p| p.into_inner()) = Arc::new(row_bindings(named));
        self.triggered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
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
    pub async fn install_configured(
        &self,
        db: &Db,
        named: &HashMap<String, Arc<NamedQuery>>,
    ) -> Result<()> {
        let mut names: Vec<String> = named.values().flat_map(|q| q.all_tables()).collect();
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

    /// Entry keys (and negative-cache markers) of row-keyed named queries for these rows.
    fn row_entry_keys(
        &self,
        shared: &Shared,
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
                keys.push(shared.cache.store.negative_key(&key));
                keys.push(key);
            }
        }
        keys
    }
}

/// Row-keyed named queries by the table their key column belongs to.
fn row_bindings(named: &HashMap<String, Arc<NamedQuery>>) -> HashMap<String, Vec<RowBinding>> {
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

/// One parsed notification.
#[derive(Debug, PartialEq)]
enum Change {
    Table(String),
    Rows {
        table: String,
        /// column → distinct key values (as text).
        keys: Vec<(String, Vec<String>)>,
    },
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

/// Applies one change to the cache, retrying until Valkey accepts it: an invalidation must
/// never be dropped, and later ones wait so they apply in commit order.
async fn apply(shared: &Shared, change: &Change) {
    let mut backoff = Duration::from_millis(20);
    loop {
        let r = match change {
            Change::Table(t) => shared.cache.invalidate(std::slice::from_ref(t)).await,
            Change::Rows { table, keys } => apply_rows(shared, table, keys).await,
        };
        match r {
            Ok(n) => {
                tracing::debug!(?change, dropped = n, "invalidated");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, ?change, "cannot apply an invalidation yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn apply_rows(shared: &Shared, table: &str, keys: &[(String, Vec<String>)]) -> Result<u64> {
    let mut total = 0;
    for (column, values) in keys {
        let entry_keys = shared
            .invalidation
            .row_entry_keys(shared, table, column, values);
        total += shared
            .cache
            .invalidate_rows(table, column, values, &entry_keys)
            .await?;
    }
    Ok(total)
}

/// Runs the listener until the process ends: connect, LISTEN, flush what may have been missed,
/// apply notifications; on any failure, reconnect with backoff.
pub async fn run(shared: Arc<Shared>) {
    if !shared.config().invalidation.enabled {
        return;
    }
    let max = Duration::from_millis(shared.config().invalidation.reconnect_max_ms);
    let mut backoff = Duration::from_millis(50);
    loop {
        match listen_once(&shared).await {
            Ok(()) => backoff = Duration::from_millis(50),
            Err(e) => {
                tracing::warn!(error = %e, "invalidation listener disconnected; reconnecting")
            }
        }
        inc(&shared.metrics.listener_reconnects);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(max);
    }
}

async fn listen_once(shared: &Arc<Shared>) -> std::result::Result<(), DbError> {
    let (client, mut connection) = shared.db.connect_dedicated().await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        return;
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
    let result = serve(shared, &client, &mut rx).await;
    driver.abort();
    result
}

async fn serve(
    shared: &Arc<Shared>,
    client: &tokio_postgres::Client,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
) -> std::result::Result<(), DbError> {
    let channel = triggers::quote_ident(&shared.config().invalidation.channel);
    client.batch_execute(&format!("LISTEN {channel}")).await?;
    if let Err(e) = shared
        .invalidation
        .install_configured(&shared.db, &shared.named())
        .await
    {
        tracing::warn!(error = %e, "cannot install configured invalidation triggers yet");
    }
    // Listening now: anything written before this moment may have been missed. With read
    // replicas, fills after the flush must not read a replica that has not replayed those
    // writes: every fill must see the position of now (see `db::replicas`).
    if let Some(set) = shared.db.replicas() {
        set.raise_all(shared.db.wal_insert_lsn(client).await?);
    }
    flush_all(shared).await;
    shared.set_listening(true);
    let mut heartbeat = tokio::time::interval(Duration::from_secs(2));
    let result = loop {
        tokio::select! {
            payload = rx.recv() => match payload {
                Some(p) => {
                    // Everything already delivered is one batch: one WAL position read for all.
                    let mut batch = vec![p];
                    while let Ok(p) = rx.try_recv() {
                        batch.push(p);
                    }
                    let changes: Vec<Change> = batch
                        .iter()
                        .filter_map(|p| {
                            inc(&shared.metrics.notifications);
                            let change = parse_payload(p);
                            if change.is_none() {
                                tracing::warn!(payload = %p, "unreadable invalidation notification");
                            }
                            change
                        })
                        .collect();
                    // Before any version is bumped. If the position cannot be read,
                    // reconnecting flushes everything, these tables included.
                    if let Err(e) = require_seen(shared, client, &changes).await {
                        break Err(e);
                    }
                    for change in &changes {
                        apply(shared, change).await;
                    }
                }
                None => break Err(DbError::Unavailable("notification stream ended".into())),
            },
            _ = heartbeat.tick() => {
                // A silent network failure would otherwise leave us deaf without knowing it.
                let ping = tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1")).await;
                match ping {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => break Err(e.into()),
                    Err(_) => break Err(DbError::Unavailable("listener heartbeat timed out".into())),
                }
            }
        }
    };
    shared.set_listening(false);
    result
}

/// With read replicas: fills that will check a version these changes bump must see the
/// primary's WAL as of now, which includes the writes that sent them (see `db::replicas`).
/// Mirrors what [`apply`] bumps: a table's version and epoch, or a table's version and its
/// rows' versions.
async fn require_seen(
    shared: &Shared,
    client: &tokio_postgres::Client,
    changes: &[Change],
) -> std::result::Result<(), DbError> {
    let Some(set) = shared.db.replicas() else {
        return Ok(());
    };
    if changes.is_empty() {
        return Ok(());
    }
    let lsn = shared.db.wal_insert_lsn(client).await?;
    for change in changes {
        match change {
            Change::Table(t) => set.raise(Version::of_table(t), lsn),
            Change::Rows { table, keys } => {
                set.raise([Version::Table(table)], lsn);
                for (column, values) in keys {
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

/// Table-wide invalidation of every table any instance ever cached from.
async fn flush_all(shared: &Shared) {
    let tables = loop {
        match shared.cache.store.registered_tables().await {
            Ok(t) => break t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the table registry from Valkey; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    if !tables.is_empty() {
        apply_all(shared, tables).await;
    }
}

async fn apply_all(shared: &Shared, tables: Vec<String>) {
    for t in tables {
        apply(shared, &Change::Table(t)).await;
    }
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
