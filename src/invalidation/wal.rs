//! The second change source (`invalidation.source = "wal"`): PostgreSQL's logical
//! replication stream, read from a temporary slot (see `db::wal`). Nothing is installed on
//! application tables: every committed INSERT/UPDATE/DELETE/TRUNCATE/COPY on a published table
//! arrives in commit order, whoever made it and under any `session_replication_role`; DDL
//! arrives as the logical message the DDL event trigger writes. A transaction's changes are
//! applied when its commit arrives, and the slot is told how far they were applied.
//!
//! Like the listener, a lost stream is a lost guarantee: the temporary slot dies with its
//! connection, so the next stream starts after a gap, and everything is flushed when it
//! begins (the same path as the listener's reconnect).
//!
//! One slot per database, not per instance: only the holder of the invalidation lease (see
//! `super::lease`) streams. The other instances LISTEN on `invalidation.channel`, where the
//! DDL event trigger notifies in both sources, so their resolutions follow DDL; they do not
//! hear row changes, so their fills read the primary, never a replica
//! (`Invalidation::sees_changes`). An instance that takes the lease over starts a stream,
//! which flushes everything as every stream's start does.

use futures::StreamExt;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::AsyncMessage;

use super::pending::Change;
use super::{apply_queued, begin_serving, parse_payload, Listener, Queue, Retry, RowBinding};
use crate::db::triggers;
use crate::db::wal::{Cell, RelationRef, WalEvent};
use crate::db::DbError;
use crate::metrics::inc;

/// Slot names: `cachefront_<random>`, temporary, one per stream.
const SLOT_PREFIX: &str = "cachefront";

/// The prefix of the logical messages the DDL event trigger writes (and of heartbeats).
const MESSAGE_PREFIX: &str = "cachefront";

/// Commits applied together at most, when the stream has more ready: a busy stream still
/// reaches Valkey promptly.
const MAX_COMMITS_PER_APPLY: usize = 64;

/// How often a heartbeat is written through the WAL, and how many may be missing before the
/// stream is taken for lost (a connection that died silently sends nothing).
const HEARTBEAT: Duration = Duration::from_secs(2);
const HEARTBEATS_MISSED: u64 = 3;

/// The WAL source as this instance's role requires, until a connection is lost: the lease
/// holder streams, the others follow DDL; a change of role changes the connection.
pub(super) async fn run_once(l: &Listener) -> Result<(), DbError> {
    let lease = l.invalidation.lease();
    loop {
        if !lease.holding() {
            lease.acquire(&l.cache.store, l.metrics()).await;
        }
        if lease.holding() {
            stream_once(l).await?;
        } else {
            follow_ddl(l).await?;
        }
    }
}

/// Runs one stream until it is lost (an error) or this instance no longer holds the lease.
pub(super) async fn stream_once(l: &Listener) -> Result<(), DbError> {
    let (client, connection) = l.db.connect_dedicated().await?;
    let driver = tokio::spawn(connection);
    let result = serve(l, &client).await;
    driver.abort();
    result
}

async fn serve(l: &Listener, client: &tokio_postgres::Client) -> Result<(), DbError> {
    let publication = l.invalidation.cfg.publication.clone();
    crate::db::wal::ensure_publication(client, &publication).await?;
    let mut stream = l.db.change_stream(SLOT_PREFIX, &publication).await?;
    let queue = Queue::default();
    let mut retry = Retry::new();
    // Streaming from the slot's start: what committed before it may have been missed.
    begin_serving(l, client, &queue, &mut retry).await?;
    let mut txn: Vec<Change> = Vec::new();
    let mut commits = 0usize;
    let mut applied_to = stream.start_lsn();
    let mut beats = Heartbeats::default();
    let mut ticker = tokio::time::interval(HEARTBEAT);
    let mut lease = l.invalidation.lease().subscribe();
    let result = loop {
        tokio::select! {
            biased;
            event = stream.next() => {
                match event {
                    Ok(WalEvent::Commit { end_lsn, .. }) => {
                        inc(&l.metrics().notifications);
                        for change in txn.drain(..) {
                            queue.with(|p| p.add(change));
                        }
                        // Published as the fleet's watermark once applied (`applied`).
                        queue.reach(end_lsn);
                        applied_to = end_lsn;
                        commits += 1;
                        if commits < MAX_COMMITS_PER_APPLY {
                            continue;
                        }
                    }
                    Ok(event) => {
                        changes_of(l, event, &mut beats, &mut txn);
                        continue;
                    }
                    Err(e) => break Err(e),
                }
            }
            // Nothing more ready on the stream: apply what the commits so far brought.
            _ = std::future::ready(()), if commits > 0 => {}
            _ = retry.due() => {}
            _ = lease.changed() => {}
            _ = ticker.tick() => {
                if let Err(e) = beats.beat(client).await {
                    break Err(e);
                }
                continue;
            }
        }
        if !l.invalidation.lease().holding() {
            // The next holder streams from a slot of its own, and flushes first.
            break Ok(());
        }
        commits = 0;
        if let Err(e) = apply_queued(l, client, &queue, &mut retry).await {
            break Err(e);
        }
        if queue.len() == 0 {
            stream.applied(applied_to);
        }
    };
    l.invalidation.set_listening(false, false);
    result
}

/// While another instance streams: LISTEN where the DDL event trigger notifies, so this
/// process forgets its resolutions on DDL like the holder. Returns when this instance holds
/// the lease, or with the error that lost the connection.
async fn follow_ddl(l: &Listener) -> Result<(), DbError> {
    let (client, mut connection) = l.db.connect_dedicated().await?;
    let invalidation = Arc::clone(&l.invalidation);
    let db = l.db.clone();
    let mut driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(m) = messages.next().await {
            match m {
                Ok(AsyncMessage::Notification(n)) => {
                    // A triggers-source barrier (another instance's configuration) is no change.
                    if super::applied::barrier_of(n.payload()).is_some() {
                        continue;
                    }
                    if invalidation.received(&parse_payload(n.payload())) {
                        db.schema_changed();
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "DDL notification connection failed");
                    return;
                }
            }
        }
    });
    let result = follow(l, &client, &mut driver).await;
    driver.abort();
    if result.is_err() {
        l.invalidation.set_listening(false, false);
    }
    result
}

async fn follow(
    l: &Listener,
    client: &tokio_postgres::Client,
    driver: &mut tokio::task::JoinHandle<()>,
) -> Result<(), DbError> {
    let channel = triggers::quote_ident(&l.invalidation.cfg.channel);
    client.batch_execute(&format!("LISTEN {channel}")).await?;
    // DDL before the LISTEN went unheard.
    if l.invalidation.received(&Change::All) {
        l.db.schema_changed();
    }
    if let Err(e) = l.invalidation.install_configured(&l.db).await {
        tracing::warn!(error = %e, "cannot make the configured tables report their writes yet");
    }
    l.invalidation.set_listening(true, false);
    let lease = l.invalidation.lease();
    let mut taken = lease.subscribe();
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    loop {
        if lease.holding() {
            return Ok(());
        }
        tokio::select! {
            _ = taken.changed() => {}
            _ = &mut *driver => return Err(DbError::Unavailable("notification stream ended".into())),
            _ = heartbeat.tick() => {
                let ping = tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1")).await;
                match ping {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(e.into()),
                    Err(_) => return Err(DbError::Unavailable("DDL listener heartbeat timed out".into())),
                }
            }
        }
    }
}

/// Heartbeats written through the WAL and seen coming back.
#[derive(Default)]
struct Heartbeats {
    sent: u64,
    seen: u64,
}

impl Heartbeats {
    /// Writes the next heartbeat; an error if too many are missing.
    async fn beat(&mut self, client: &tokio_postgres::Client) -> Result<(), DbError> {
        if self.sent > self.seen + HEARTBEATS_MISSED {
            return Err(DbError::Unavailable(
                "the change stream stopped delivering heartbeats".into(),
            ));
        }
        self.sent += 1;
        let content = format!("hb:{}", self.sent);
        client
            .execute(
                "SELECT pg_logical_emit_message(false, $1, $2)",
                &[&MESSAGE_PREFIX, &content],
            )
            .await?;
        Ok(())
    }

    /// A heartbeat came back through the stream.
    fn seen(&mut self, content: &str) -> bool {
        match content.strip_prefix("hb:").and_then(|n| n.parse().ok()) {
            Some(n) => {
                self.seen = self.seen.max(n);
                true
            }
            None => false,
        }
    }
}

/// The changes one stream event stands for, added to its transaction's.
fn changes_of(l: &Listener, event: WalEvent, beats: &mut Heartbeats, txn: &mut Vec<Change>) {
    match event {
        WalEvent::Change { relation, old, new } => txn.push(row_change(l, &relation, old, new)),
        WalEvent::Truncate { relations } => {
            txn.extend(relations.iter().map(|r| Change::Table(r.oid.to_string())))
        }
        WalEvent::Message {
            prefix, content, ..
        } if prefix == MESSAGE_PREFIX => {
            let text = String::from_utf8_lossy(&content);
            if beats.seen(&text) {
                return;
            }
            let change = parse_payload(&text);
            if l.invalidation.received(&change) {
                l.db.schema_changed();
            }
            txn.push(change);
        }
        WalEvent::Message { .. } | WalEvent::Commit { .. } => {}
    }
}

/// One row's change: the table, with the key values of the row-keyed queries bound to it —
/// or the whole table when the stream cannot say a key's old value (a key column outside the
/// replica identity, an unchanged TOASTed value).
fn row_change(
    l: &Listener,
    relation: &RelationRef,
    old: Option<Vec<Cell>>,
    new: Option<Vec<Cell>>,
) -> Change {
    let table = relation.oid.to_string();
    let bindings = l.invalidation.bindings();
    let Some(bound) = bindings.get(&table) else {
        return Change::Table(table);
    };
    match key_values(relation, bound, old.as_deref(), new.as_deref()) {
        Some(keys) => Change::Rows { table, keys },
        None => Change::Table(table),
    }
}

/// The values of each bound key column among the old and new row; `None` if one of them
/// cannot be known.
fn key_values(
    relation: &RelationRef,
    bound: &[RowBinding],
    old: Option<&[Cell]>,
    new: Option<&[Cell]>,
) -> Option<Vec<(String, Vec<String>)>> {
    let mut keys: HashMap<&str, Vec<String>> = HashMap::new();
    for b in bound {
        let i = relation.columns.iter().position(|c| *c == b.column)?;
        let in_identity = relation.key.get(i).copied().unwrap_or(false);
        let values = keys.entry(b.column.as_str()).or_default();
        // The new row has every column (an unchanged TOASTed one excepted).
        if let Some(row) = new {
            match row.get(i)? {
                Cell::Text(v) => values.push(v.clone()),
                Cell::Null => {}
                Cell::Unchanged => return None,
            }
        }
        // The old value: sent for identity columns when they changed (or always, with
        // REPLICA IDENTITY FULL, where every column is in the identity). Outside the identity
        // it is never sent, and the stream does not say whether a row without an old image
        // was inserted or updated: a change of such a column cannot be attributed to a row.
        if !in_identity {
            return None;
        }
        if let Some(row) = old {
            match row.get(i)? {
                Cell::Text(v) => values.push(v.clone()),
                Cell::Null => {}
                Cell::Unchanged => return None,
            }
        }
    }
    Some(
        keys.into_iter()
            .map(|(c, mut v)| {
                v.sort();
                v.dedup();
                (c.to_string(), v)
            })
            .collect(),
    )
}
