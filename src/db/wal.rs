//! Committed changes read from PostgreSQL's logical replication: the `wal` change source.
//!
//! [`WalStream`] opens a replication connection, creates a *temporary* logical slot with the
//! `pgoutput` plugin on it, and streams every committed change to the tables of one
//! publication, transaction by transaction in commit order, each ended by its commit LSN.
//! Nothing is installed on application tables. A temporary slot belongs to its session:
//! PostgreSQL drops it when the connection ends, however it ends, so a crashed cachefront
//! leaves no slot holding WAL back. The price is that changes committed while no stream was
//! open are never seen: whoever opens a new stream must first drop what it can no longer
//! vouch for, exactly as after a lost NOTIFY listener.
//!
//! The transport is the `pgwire-replication` crate (connection, authentication, the
//! replication sub-protocol, keepalives and standby status feedback); the `pgoutput`
//! messages it carries are decoded by [`pgoutput`](super::pgoutput).
//!
//! The publication is managed on an ordinary connection ([`ensure_publication`],
//! [`publish_tables`], [`drop_publication`]). A publication that publishes UPDATE and DELETE
//! makes PostgreSQL refuse UPDATE and DELETE on a member table that has no replica identity,
//! so tables are added one by one, each only after [`replica_identity_problem`] found none.
//!
//! Bounds: one message (one row change) may take at most [`WalLimits::max_message_bytes`];
//! a larger one is refused before it is read and the stream is lost (the caller then drops
//! everything, which is correct, and the next stream starts past that row). At most
//! [`WalLimits::buffer_events`] undelivered messages wait between the connection and the
//! reader, and the relations known are those the publication has sent.
//!
//! Needs PostgreSQL 13 or later (partitioned tables in publications, `pg_partition_tree`),
//! `wal_level = logical`, a free replication slot and walsender, and a user with the
//! REPLICATION attribute who owns the published tables.
//!
//! TLS: cachefront's PostgreSQL connections are plain (`NoTls`, see [`Db`](super::Db)), and
//! so is this one: `sslmode=disable` and `prefer` connect without TLS, as the pool does;
//! `sslmode=require` is refused, as the pool refuses it.

use bytes::Bytes;
use pgwire_replication::{
    Lsn, PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig,
};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_postgres::Client;

use super::pgoutput::{self, Message};
use super::DbError;
use crate::config::PostgresConfig;

pub use super::pgoutput::Cell;

/// A relation as the stream describes it (PostgreSQL's Relation message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationRef {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// The columns of every row the stream sends for it, in order.
    pub columns: Vec<String>,
    /// Per column: part of the replica identity key (all of them under REPLICA IDENTITY FULL).
    /// In an old row that is only the key, the other columns are [`Cell::Null`].
    pub key: Vec<bool>,
}

/// One event of the stream. Changes arrive grouped by transaction, in commit order; each
/// transaction's changes are followed by its [`WalEvent::Commit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WalEvent {
    /// One row changed. `old` is present for UPDATE/DELETE when the replica identity sent it
    /// — the key columns (see [`RelationRef::key`]) when an UPDATE changed the key and for
    /// every DELETE, the whole row under REPLICA IDENTITY FULL — and `new` for
    /// INSERT/UPDATE (with [`Cell::Unchanged`] for TOASTed values an UPDATE left alone).
    /// A partition's rows arrive under the partition's own name, not its parent's.
    Change {
        relation: Arc<RelationRef>,
        old: Option<Vec<Cell>>,
        new: Option<Vec<Cell>>,
    },
    /// TRUNCATE of these relations (one statement; partitions named one by one).
    Truncate { relations: Vec<Arc<RelationRef>> },
    /// `pg_logical_emit_message(transactional, prefix, content)`: a transactional message
    /// arrives inside its transaction, before its Commit; a non-transactional one as soon as
    /// PostgreSQL decodes it, outside any transaction.
    Message {
        transactional: bool,
        prefix: String,
        content: Bytes,
    },
    /// The transaction's commit; everything since the last Commit belongs to it. `lsn` is
    /// the commit record's position (strictly increasing along the stream), `end_lsn` the
    /// position just past it — what [`WalStream::applied`] takes.
    Commit { lsn: u64, end_lsn: u64 },
}

/// How much a stream may hold in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalLimits {
    /// The largest single message accepted: one row change (a row with all its values, old
    /// and new), or one logical message. A larger one loses the stream.
    pub max_message_bytes: usize,
    /// Messages read ahead of [`WalStream::next`] (each at most `max_message_bytes`).
    pub buffer_events: usize,
}

impl Default for WalLimits {
    /// 64 MiB per row change (a row with a few very large values still fits) and 32
    /// messages read ahead: a pathological worst case of about 2 GiB, typically kilobytes.
    fn default() -> Self {
        WalLimits {
            max_message_bytes: 64 << 20,
            buffer_events: 32,
        }
    }
}

/// How often the position [`WalStream::applied`] confirmed is reported to PostgreSQL at
/// most (so it may recycle WAL), and how long an idle stream waits before reporting anyway.
const STATUS_INTERVAL: Duration = Duration::from_secs(1);
const IDLE_WAKEUP: Duration = Duration::from_secs(10);

/// Longest a slot name may be (PostgreSQL's NAMEDATALEN - 1), and the random suffix's length
/// (`_` and 16 hex digits).
const MAX_NAME: usize = 63;
const SUFFIX_LEN: usize = 17;

/// The `application_name` of the replication connection, so `pg_stat_replication` shows
/// whose walsender it is.
const APPLICATION_NAME: &str = "cachefront-wal";

/// Advisory lock class taken (with the publication name's hash) while a publication's
/// definition or membership changes, so concurrent cachefront instances take turns.
const PUBLICATION_LOCK: i32 = 0x6366_7770; // "cfwp"

/// A logical replication stream of one publication from a temporary slot.
pub struct WalStream {
    session: Session,
    slot: String,
    start_lsn: u64,
    /// Relations by OID, as the stream last described them.
    relations: HashMap<u32, Arc<RelationRef>>,
}

impl WalStream {
    /// Connects a replication connection, creates a TEMPORARY logical slot (`pgoutput`)
    /// named `<slot_prefix>_<random>`, and starts streaming from the slot's consistent
    /// point for `publication` (which must exist: [`ensure_publication`]). Within the query
    /// deadline (`connect_timeout_ms` + 2 × `statement_timeout_ms` + 1 s): a new slot waits
    /// for the transactions running when it is created, so a long one fails the start.
    pub async fn start(
        cfg: &PostgresConfig,
        slot_prefix: &str,
        publication: &str,
    ) -> Result<WalStream, DbError> {
        Self::start_with(cfg, slot_prefix, publication, WalLimits::default()).await
    }

    /// [`start`](Self::start) with memory bounds of the caller's choosing.
    pub async fn start_with(
        cfg: &PostgresConfig,
        slot_prefix: &str,
        publication: &str,
        limits: WalLimits,
    ) -> Result<WalStream, DbError> {
        check_name("slot prefix", slot_prefix, MAX_NAME - SUFFIX_LEN)?;
        check_name("publication", publication, MAX_NAME)?;
        let slot = format!("{slot_prefix}_{:016x}", rand::random::<u64>());
        let rcfg = replication_config(cfg, &slot, publication, limits)?;
        let deadline =
            Duration::from_millis(cfg.connect_timeout_ms + cfg.statement_timeout_ms * 2 + 1000);
        // Dropped before it finishes (timeout or the caller's cancellation), the session
        // is aborted, and the server drops the slot with it.
        match tokio::time::timeout(deadline, open(rcfg, &slot, publication)).await {
            Ok(Ok((session, start_lsn))) => Ok(WalStream {
                session,
                slot,
                start_lsn,
                relations: HashMap::new(),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(DbError::Unavailable(format!(
                "the replication slot {slot} was not ready within {} ms (a new slot waits for the transactions already running)",
                deadline.as_millis()
            ))),
        }
    }

    /// The slot's consistent point: every transaction committed after it is streamed.
    pub fn start_lsn(&self) -> u64 {
        self.start_lsn
    }

    /// The temporary slot's name.
    pub fn slot(&self) -> &str {
        &self.slot
    }

    /// The next event. An error means the stream is lost (the connection, the server, or a
    /// message over the size limit or not understood): drop this stream. Cancel-safe: a
    /// call dropped before it returns loses nothing.
    pub async fn next(&mut self) -> Result<WalEvent, DbError> {
        loop {
            let event = match self.session.client.recv().await {
                Ok(Some(event)) => event,
                Ok(None) => return Err(lost("PostgreSQL ended the replication stream")),
                Err(e) => return Err(wire_error(e, "the replication stream failed")),
            };
            let data = match event {
                ReplicationEvent::XLogData { data, .. } => data,
                ReplicationEvent::Commit { lsn, end_lsn, .. } => {
                    return Ok(WalEvent::Commit {
                        lsn: lsn.as_u64(),
                        end_lsn: end_lsn.as_u64(),
                    })
                }
                ReplicationEvent::Message {
                    transactional,
                    prefix,
                    content,
                    ..
                } => {
                    return Ok(WalEvent::Message {
                        transactional,
                        prefix,
                        content,
                    })
                }
                ReplicationEvent::StoppedAt { .. } => {
                    return Err(lost("the replication stream stopped"))
                }
                // Keepalives are answered by the transport; Begin carries nothing we need.
                ReplicationEvent::KeepAlive { .. } | ReplicationEvent::Begin { .. } => continue,
            };
            if let Some(event) = self.decode(&data)? {
                return Ok(event);
            }
        }
    }

    /// Confirms everything up to `lsn` (a [`WalEvent::Commit`]'s `end_lsn`) was applied,
    /// so PostgreSQL may recycle the WAL before it. Reported within a second; an older
    /// position than one already confirmed changes nothing.
    pub fn applied(&mut self, lsn: u64) {
        self.session.client.update_applied_lsn(Lsn::from_u64(lsn));
    }

    /// Turns one `pgoutput` message into an event, or remembers what it describes (`None`).
    fn decode(&mut self, data: &Bytes) -> Result<Option<WalEvent>, DbError> {
        let message = pgoutput::decode(data).map_err(|e| lost(&e.to_string()))?;
        Ok(Some(match message {
            Message::Relation(r) => {
                let relation = RelationRef {
                    oid: r.oid,
                    key: r.columns.iter().map(|c| c.key).collect(),
                    columns: r.columns.into_iter().map(|c| c.name).collect(),
                    schema: r.schema,
                    name: r.name,
                };
                self.relations.insert(r.oid, Arc::new(relation));
                return Ok(None);
            }
            Message::Insert { relation, new } => self.change(relation, None, Some(new))?,
            Message::Update { relation, old, new } => {
                self.change(relation, old.map(|(_, row)| row), Some(new))?
            }
            Message::Delete { relation, old } => self.change(relation, Some(old.1), None)?,
            Message::Truncate { relations, .. } => WalEvent::Truncate {
                relations: relations
                    .iter()
                    .map(|&oid| self.relation(oid))
                    .collect::<Result<_, _>>()?,
            },
            // The transport turns these into events of their own; here for completeness.
            Message::Commit { lsn, end_lsn, .. } => WalEvent::Commit { lsn, end_lsn },
            Message::Message {
                transactional,
                prefix,
                content,
                ..
            } => WalEvent::Message {
                transactional,
                prefix,
                content,
            },
            Message::Begin { .. } | Message::Type { .. } | Message::Origin { .. } => {
                return Ok(None)
            }
        }))
    }

    /// A row change of `oid`, its rows checked against the relation's columns.
    fn change(
        &self,
        oid: u32,
        old: Option<Vec<Cell>>,
        new: Option<Vec<Cell>>,
    ) -> Result<WalEvent, DbError> {
        let relation = self.relation(oid)?;
        for row in old.iter().chain(new.iter()) {
            if row.len() != relation.columns.len() {
                return Err(lost(&format!(
                    "a row of {} has {} columns, its Relation message {}",
                    qualified(&relation.schema, &relation.name),
                    row.len(),
                    relation.columns.len()
                )));
            }
        }
        Ok(WalEvent::Change { relation, old, new })
    }

    fn relation(&self, oid: u32) -> Result<Arc<RelationRef>, DbError> {
        self.relations.get(&oid).cloned().ok_or_else(|| {
            lost(&format!(
                "a change to relation {oid} arrived before its Relation message"
            ))
        })
    }
}

/// The replication client, aborted if dropped before replication started: a session still
/// creating its slot may be waiting on the server, and a graceful stop would wait with it.
/// Once started, dropping it stops the stream gracefully (the client's own `Drop`).
struct Session {
    client: ReplicationClient,
    started: bool,
}

impl Drop for Session {
    fn drop(&mut self) {
        if !self.started {
            self.client.abort();
        }
    }
}

/// Connects, checks the publication, creates the slot and starts replication from it; the
/// slot's consistent point.
async fn open(
    rcfg: ReplicationConfig,
    slot: &str,
    publication: &str,
) -> Result<(Session, u64), DbError> {
    let client = ReplicationClient::connect_gated(rcfg)
        .await
        .map_err(|e| wire_error(e, "cannot open a replication connection"))?;
    let mut session = Session {
        client,
        started: false,
    };
    // Names were checked by `check_name`: nothing in them needs quoting.
    let rows = session
        .client
        .simple_query(&format!(
            "SELECT 1 FROM pg_catalog.pg_publication WHERE pubname = '{publication}'"
        ))
        .await
        .map_err(|e| wire_error(e, "cannot open a replication connection"))?;
    if rows.is_empty() {
        return Err(DbError::Other(format!(
            "publication {publication} does not exist (it is created by ensure_publication)"
        )));
    }
    let rows = session
        .client
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {slot} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT"
        ))
        .await
        .map_err(|e| wire_error(e, "cannot create a replication slot"))?;
    let start_lsn = consistent_point(&rows)?;
    session
        .client
        .start()
        .await
        .map_err(|e| wire_error(e, "cannot start replication"))?;
    session
        .client
        .wait_started()
        .await
        .map_err(|e| wire_error(e, "cannot start replication"))?;
    session.started = true;
    Ok((session, start_lsn))
}

/// The `consistent_point` column of CREATE_REPLICATION_SLOT's answer.
fn consistent_point(rows: &[pgwire_replication::QueryRow]) -> Result<u64, DbError> {
    let text = rows
        .first()
        .and_then(|row| row.get(1))
        .and_then(|cell| cell.as_ref())
        .and_then(|b| std::str::from_utf8(b).ok());
    let lsn = text.and_then(|t| Lsn::parse(t).ok());
    lsn.map(Lsn::as_u64).ok_or_else(|| {
        DbError::Other(format!(
            "CREATE_REPLICATION_SLOT answered without a consistent point ({text:?})"
        ))
    })
}

/// The replication connection's settings, from `postgres.url` and cachefront's session
/// settings (the same DateStyle, TimeZone … as the pool, so values render the same).
fn replication_config(
    cfg: &PostgresConfig,
    slot: &str,
    publication: &str,
    limits: WalLimits,
) -> Result<ReplicationConfig, DbError> {
    let pg = super::pg_config(&cfg.url, cfg)?;
    if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err(DbError::Other(
            "postgres.url asks for sslmode=require, but cachefront connects to PostgreSQL without TLS".into(),
        ));
    }
    let host = match (pg.get_hostaddrs().first(), pg.get_hosts().first()) {
        (Some(addr), _) => addr.to_string(),
        (None, Some(tokio_postgres::config::Host::Tcp(h))) => h.clone(),
        (None, Some(tokio_postgres::config::Host::Unix(p))) => p
            .to_str()
            .ok_or_else(|| {
                DbError::Other("postgres.url: the socket directory is not UTF-8".into())
            })?
            .to_string(),
        (None, None) => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    let user = pg
        .get_user()
        .ok_or_else(|| DbError::Other("postgres.url names no user".into()))?;
    let password = match pg.get_password() {
        Some(p) => std::str::from_utf8(p)
            .map_err(|_| DbError::Other("postgres.url: the password is not UTF-8".into()))?,
        None => "",
    };
    let database = pg.get_dbname().unwrap_or(user);
    let mut rcfg = ReplicationConfig::new(host, user, password, database, slot, publication)
        .with_port(port)
        .with_tls(TlsConfig::disabled())
        .with_application_name(APPLICATION_NAME)
        .with_max_message_size(limits.max_message_bytes)
        .with_buffer_size(limits.buffer_events.max(1))
        .with_status_interval(STATUS_INTERVAL)
        .with_wakeup_interval(IDLE_WAKEUP);
    if let Some(options) = pg.get_options() {
        rcfg = rcfg.with_options(options);
    }
    Ok(rcfg)
}

/// Refuses a slot or publication name that would need quoting: replication commands and
/// the `publication_names` option take them bare, and bare they would be case-folded.
fn check_name(what: &str, name: &str, max: usize) -> Result<(), DbError> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= max;
    if ok {
        Ok(())
    } else {
        Err(DbError::Other(format!(
            "the {what} {name:?} must be lower-case letters, digits and _ (not first), at most {max} characters"
        )))
    }
}

/// A lost stream, saying why.
fn lost(why: &str) -> DbError {
    DbError::Other(format!("logical replication stream lost: {why}"))
}

/// The transport's error as a database error: PostgreSQL's own errors keep their SQLSTATE,
/// a connection failure is `Unavailable`, and a refused oversized row says which limit.
fn wire_error(e: PgWireError, context: &str) -> DbError {
    match e {
        PgWireError::Server(text) => match text.rsplit_once(" (SQLSTATE ") {
            Some((message, code)) if code.ends_with(')') => DbError::Query {
                code: code.trim_end_matches(')').to_string(),
                message: format!("{context}: {message}"),
            },
            _ => DbError::Other(format!("{context}: {text}")),
        },
        PgWireError::MessageTooLarge {
            payload_bytes,
            limit_bytes,
        } => lost(&format!(
            "a change of {payload_bytes} bytes is over the {limit_bytes}-byte limit for one row"
        )),
        e if e.is_io() || e.is_transient() => DbError::Unavailable(format!("{context}: {e}")),
        e => DbError::Other(format!("{context}: {e}")),
    }
}

/// `schema.name` as cachefront names relations: each part bare if it is a plain lower-case
/// identifier, else double-quoted with `"` doubled (the rule of `db::deps::qualified`).
fn qualified(schema: &str, name: &str) -> String {
    fn part(p: &str) -> String {
        let mut chars = p.chars();
        let bare = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '$');
        if bare {
            p.to_string()
        } else {
            format!("\"{}\"", p.replace('"', "\"\""))
        }
    }
    format!("{}.{}", part(schema), part(name))
}

/// Creates `publication` if it does not exist — with no tables, publishing INSERT, UPDATE,
/// DELETE and TRUNCATE, partitions' changes under their own names — or brings an existing
/// one to those settings. Idempotent, and safe to run from several instances at once. A
/// publication `FOR ALL TABLES` of the same name is refused: it would have PostgreSQL refuse
/// UPDATE and DELETE on every table without a replica identity.
pub async fn ensure_publication(client: &Client, publication: &str) -> Result<(), DbError> {
    check_name("publication", publication, MAX_NAME)?;
    // One statement, so it is one transaction: the advisory lock is held until it ends and
    // nothing is left half done if the caller gives up on it.
    let sql = format!(
        r#"DO $cachefront$
DECLARE
    p pg_catalog.pg_publication;
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock({PUBLICATION_LOCK}, pg_catalog.hashtext('{publication}'));
    SELECT * INTO p FROM pg_catalog.pg_publication WHERE pubname = '{publication}';
    IF NOT FOUND THEN
        CREATE PUBLICATION {publication}
            WITH (publish = 'insert, update, delete, truncate', publish_via_partition_root = false);
    ELSIF p.puballtables THEN
        RAISE EXCEPTION 'publication % publishes all tables; cachefront needs a publication of its own', '{publication}';
    ELSIF NOT (p.pubinsert AND p.pubupdate AND p.pubdelete AND p.pubtruncate) OR p.pubviaroot THEN
        ALTER PUBLICATION {publication}
            SET (publish = 'insert, update, delete, truncate', publish_via_partition_root = false);
    END IF;
END
$cachefront$"#
    );
    client.batch_execute(&sql).await?;
    Ok(())
}

/// Adds the tables `oids` to `publication`, those not in it yet: a partitioned table as
/// itself (its partitions, present and future, publish under their own names), any other
/// table alone (`ONLY`: inheritance children are named by their own OIDs). OIDs that name
/// no relation any more are skipped — nothing is left to watch. Idempotent, and safe to run
/// from several instances at once. Check each table with [`replica_identity_problem`] first.
pub async fn publish_tables(
    client: &Client,
    publication: &str,
    oids: &[u32],
) -> Result<(), DbError> {
    check_name("publication", publication, MAX_NAME)?;
    if oids.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = oids.iter().map(u32::to_string).collect();
    let sql = format!(
        r#"DO $cachefront$
DECLARE
    r record;
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock({PUBLICATION_LOCK}, pg_catalog.hashtext('{publication}'));
    FOR r IN
        SELECT c.relkind, n.nspname, c.relname
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = ANY ('{{{list}}}'::pg_catalog.oid[])
          AND NOT EXISTS (
              SELECT 1 FROM pg_catalog.pg_publication_rel pr
              JOIN pg_catalog.pg_publication p ON p.oid = pr.prpubid
              WHERE p.pubname = '{publication}' AND pr.prrelid = c.oid)
        ORDER BY c.oid
    LOOP
        EXECUTE pg_catalog.format('ALTER PUBLICATION {publication} ADD TABLE %s%I.%I',
            CASE WHEN r.relkind = 'p' THEN '' ELSE 'ONLY ' END, r.nspname, r.relname);
    END LOOP;
END
$cachefront$"#,
        list = list.join(",")
    );
    client.batch_execute(&sql).await?;
    Ok(())
}

/// Drops `publication` if it exists.
pub async fn drop_publication(client: &Client, publication: &str) -> Result<(), DbError> {
    check_name("publication", publication, MAX_NAME)?;
    client
        .batch_execute(&format!("DROP PUBLICATION IF EXISTS {publication}"))
        .await?;
    Ok(())
}

/// Why the table `oid` must not be added to a publication that publishes UPDATE and DELETE,
/// if it must not: PostgreSQL would then refuse the application's UPDATE and DELETE on it
/// (no primary key under REPLICA IDENTITY DEFAULT, REPLICA IDENTITY NOTHING, or an identity
/// index that is gone), or its changes would never reach the stream (not a table, unlogged,
/// temporary, a system catalog, a foreign partition). For a partitioned table, each of its
/// partitions is checked, since that is where PostgreSQL checks. `None`: safe to publish.
pub async fn replica_identity_problem(
    client: &Client,
    oid: u32,
) -> Result<Option<String>, DbError> {
    const SQL: &str = "\
        SELECT c.oid, c.relkind::text, c.relpersistence::text, n.nspname, c.relname,
               c.relreplident::text,
               EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                       WHERE i.indrelid = c.oid AND i.indisprimary),
               EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                       WHERE i.indrelid = c.oid AND i.indisreplident)
        FROM pg_catalog.pg_class c
        JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
        WHERE c.oid = $1
           OR c.oid IN (SELECT relid FROM pg_catalog.pg_partition_tree($1::pg_catalog.regclass)
                        WHERE isleaf)
        ORDER BY c.oid = $1 DESC, c.oid";
    let rows = client.query(SQL, &[&oid]).await?;
    let Some(target) = rows.first().map(RelInfo::from_row) else {
        return Ok(Some(format!("relation {oid} does not exist")));
    };
    if target.oid != oid {
        return Ok(Some(format!("relation {oid} does not exist")));
    }
    if let Some(why) = target.unpublishable() {
        return Ok(Some(why));
    }
    if target.kind == "p" {
        for leaf in rows.iter().skip(1).map(RelInfo::from_row) {
            let why = leaf.unpublishable().or_else(|| leaf.identity_problem());
            if let Some(why) = why {
                return Ok(Some(format!("partition of {}: {why}", target.name)));
            }
        }
        return Ok(None);
    }
    Ok(target.identity_problem())
}

/// What [`replica_identity_problem`] reads of one relation.
struct RelInfo {
    oid: u32,
    kind: String,
    persistence: String,
    /// Qualified, as cachefront names relations.
    name: String,
    identity: String,
    has_primary_key: bool,
    has_identity_index: bool,
}

impl RelInfo {
    fn from_row(row: &tokio_postgres::Row) -> RelInfo {
        let schema: String = row.get(3);
        let name: String = row.get(4);
        RelInfo {
            oid: row.get(0),
            kind: row.get(1),
            persistence: row.get(2),
            name: qualified(&schema, &name),
            identity: row.get(5),
            has_primary_key: row.get(6),
            has_identity_index: row.get(7),
        }
    }

    /// Why this relation's changes could not reach a publication at all.
    fn unpublishable(&self) -> Option<String> {
        let name = &self.name;
        if self.oid < 16384
            || name.starts_with("pg_catalog.")
            || name.starts_with("information_schema.")
        {
            return Some(format!("system catalog {name} cannot be published"));
        }
        match self.kind.as_str() {
            "r" | "p" => {}
            "f" => {
                return Some(format!(
                    "foreign table {name}: its changes are not in this server's WAL"
                ))
            }
            "v" => return Some(format!("{name} is a view; publish the tables it reads")),
            "m" => return Some(format!("materialized view {name} cannot be published")),
            other => return Some(format!("{name} (relkind {other}) is not a table")),
        }
        match self.persistence.as_str() {
            "u" => Some(format!(
                "unlogged table {name}: its changes are not written to the WAL"
            )),
            "t" => Some(format!("temporary table {name} cannot be published")),
            _ => None,
        }
    }

    /// Why PostgreSQL would refuse UPDATE and DELETE on this table once it is published.
    fn identity_problem(&self) -> Option<String> {
        let name = &self.name;
        let refuse = "so PostgreSQL would refuse its UPDATE and DELETE once it is in a publication";
        match self.identity.as_str() {
            "d" if !self.has_primary_key => Some(format!(
                "table {name} has no primary key (REPLICA IDENTITY DEFAULT), {refuse}; add a primary key or set REPLICA IDENTITY FULL"
            )),
            "n" => Some(format!("table {name} has REPLICA IDENTITY NOTHING, {refuse}")),
            "i" if !self.has_identity_index => Some(format!(
                "table {name} has REPLICA IDENTITY USING INDEX but the index is gone, {refuse}"
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_need_no_quoting_only() {
        assert!(check_name("publication", "cachefront", 63).is_ok());
        assert!(check_name("publication", "_cf_2", 63).is_ok());
        for bad in ["", "Cachefront", "2cf", "a-b", "a b", "a'b", "é"] {
            assert!(check_name("publication", bad, 63).is_err(), "{bad:?}");
        }
        assert!(check_name("slot prefix", &"a".repeat(47), 46).is_err());
    }

    #[test]
    fn qualified_names_follow_the_contract() {
        assert_eq!(qualified("public", "employees"), "public.employees");
        assert_eq!(
            qualified("Sales", "Order Lines"),
            "\"Sales\".\"Order Lines\""
        );
        assert_eq!(qualified("s", "a\"b"), "s.\"a\"\"b\"");
    }

    #[test]
    fn server_errors_keep_their_sqlstate() {
        let e = wire_error(
            PgWireError::Server("replication slot \"x\" already exists (SQLSTATE 42710)".into()),
            "cannot create a replication slot",
        );
        assert_eq!(e.code(), Some("42710"));
        assert_eq!(
            e.to_string(),
            "cannot create a replication slot: replication slot \"x\" already exists (SQLSTATE 42710)"
        );
        let e = wire_error(
            PgWireError::MessageTooLarge {
                payload_bytes: 10,
                limit_bytes: 5,
            },
            "x",
        );
        assert!(e.to_string().contains("over the 5-byte limit"), "{e}");
    }

    #[test]
    fn the_consistent_point_is_read() {
        let row = vec![
            Some(Bytes::from_static(b"s")),
            Some(Bytes::from_static(b"1/2A")),
            None,
            Some(Bytes::from_static(b"pgoutput")),
        ];
        assert_eq!(consistent_point(&[row]).ok(), Some((1 << 32) + 0x2A));
        assert!(consistent_point(&[]).is_err());
    }
}
