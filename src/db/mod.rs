//! PostgreSQL: a pool, read-only execution, and rows rendered as the SPEC's JSON.

pub mod deps;
pub mod pgoutput;
pub mod pool;
pub mod replicas;
pub mod rows;
pub mod sql;
pub mod triggers;
pub mod wal;

use bytes::{BufMut, BytesMut};
use futures::{pin_mut, TryStreamExt};
use pool::{Author, Pooled, Pools};
use postgres_types::{Format, IsNull, ToSql, Type};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio_postgres::{NoTls, Row, Statement};

use crate::config::PostgresConfig;
use crate::error::Refusal;
use replicas::{Replica, Replicas, REPLAY_CHECK};

/// A database failure, with PostgreSQL's own message when it has one.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("{message} (SQLSTATE {code})")]
    Query { code: String, message: String },
    #[error("{0}")]
    Other(String),
    /// The client's input was refused by PostgreSQL's type checks (full `ERR …` text).
    #[error("{0}")]
    Invalid(String),
    /// The result passed `sql.max_rows` or `sql.max_result_bytes` (full `ERR …` text). The
    /// query was abandoned mid-stream, and its connection is discarded rather than reused.
    #[error("{0}")]
    TooLarge(String),
}

impl DbError {
    /// The SQLSTATE, when PostgreSQL sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            DbError::Query { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Which side a database failure is on: the client's input (its text is the whole reply), or
/// PostgreSQL (`-DBERR`). Here, so the error module below needs to know nothing of databases.
impl From<DbError> for crate::error::Error {
    fn from(e: DbError) -> crate::error::Error {
        match e {
            DbError::Invalid(msg) | DbError::TooLarge(msg) => crate::error::Error::Client(msg),
            other => crate::error::Error::Db(other.to_string()),
        }
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(e: tokio_postgres::Error) -> DbError {
        match e.as_db_error() {
            Some(db) => DbError::Query {
                code: db.code().code().to_string(),
                message: db.message().to_string(),
            },
            None if e.is_closed() => DbError::Unavailable(with_causes(&e)),
            None => DbError::Other(with_causes(&e)),
        }
    }
}

/// The error and its causes ("error connecting to server: Connection refused"), since the
/// top-level text alone rarely says what went wrong.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !msg.contains(&text) {
            msg.push_str(": ");
            msg.push_str(&text);
        }
        source = s.source();
    }
    msg
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(e: deadpool_postgres::PoolError) -> DbError {
        match e {
            // No SQLSTATE: the connection itself could not be made.
            deadpool_postgres::PoolError::Backend(e) if e.as_db_error().is_none() => {
                DbError::Unavailable(with_causes(&e))
            }
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            other => DbError::Unavailable(with_causes(&other)),
        }
    }
}

/// A parameter sent in PostgreSQL's text format, so PostgreSQL itself parses it as whatever
/// type the statement expects — the same rules a hand-written `%s` parameter would meet.
#[derive(Debug)]
pub struct TextParam<'a>(pub &'a str);

impl ToSql for TextParam<'_> {
    fn to_sql(
        &self,
        _ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        out.put_slice(self.0.as_bytes());
        Ok(IsNull::No)
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }

    fn encode_format(&self, _ty: &Type) -> Format {
        Format::Text
    }

    postgres_types::to_sql_checked!();
}

/// What a fill keeps of its query's rows — decided before the query runs, because rows are
/// consumed as they arrive from PostgreSQL and nothing else of them is ever held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Collect {
    /// The first row only (`reply = "value"` / `"hash"`); the others are read and dropped.
    FirstRow,
    /// Every row, rendered to JSON as it arrives, within these limits.
    Json(ResultLimits),
}

/// Caps on a JSON result, enforced while it is read: the query is abandoned at the first row
/// that passes one, so memory stays near `max_bytes` whatever the query returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultLimits {
    /// `sql.max_rows`.
    pub max_rows: usize,
    /// `sql.max_result_bytes`: the whole JSON text, brackets included.
    pub max_bytes: usize,
}

/// A query's rows, as [`Collect`] asked for them.
#[derive(Debug)]
pub enum Rows {
    /// The first row, if there was one.
    First(Option<Row>),
    /// The JSON array of all rows (SPEC "JSON rows") and how many rows it holds.
    Json { text: Vec<u8>, rows: usize },
}

impl Rows {
    /// How many rows the result holds (at most 1 for [`Rows::First`]).
    pub fn len(&self) -> usize {
        match self {
            Rows::First(r) => usize::from(r.is_some()),
            Rows::Json { rows, .. } => *rows,
        }
    }

    /// Whether the query returned no row.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// SQL text the operator wrote: a named query's statement, from the configuration. Only it
/// runs on a pooled session that is handed on without the cleaning (see [`pool`]); a
/// client's text never becomes one. Built where the configuration is read, nowhere else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorSql(Arc<str>);

impl OperatorSql {
    /// The statement of a named query in the configuration.
    pub fn from_config(sql: &str) -> OperatorSql {
        OperatorSql(Arc::from(sql))
    }

    /// The text, shared (the per-query figures keep it).
    pub fn shared(&self) -> Arc<str> {
        Arc::clone(&self.0)
    }
}

impl std::ops::Deref for OperatorSql {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

/// Rows plus the column names to show for them.
pub struct QueryResult {
    pub names: Vec<String>,
    pub rows: Rows,
    /// Which server answered.
    pub served: Served,
}

/// Which server answered a fill's query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// The primary, with no replicas configured.
    Primary,
    /// A read replica.
    Replica,
    /// The primary, because no replica had replayed far enough (behind a write the fill must
    /// see, beyond the lag bound) or none was up.
    PrimaryReplicasBehind,
    /// The primary, after the replica chosen failed (the connection, or the server).
    PrimaryAfterReplicaError,
}

/// What one attempt of a fill's query gave: rows, or — on a replica — the news that the
/// replica had not replayed what the fill must see (its replay position, if it has one).
enum Attempt {
    Done(QueryResult),
    Behind(Option<u64>),
}

/// Stops hammering a PostgreSQL that keeps failing: after three connection failures in a
/// row, requests fail at once for a cool-down that doubles (100 ms up to 5 s) while failures
/// continue; the first request after it is let through to probe, and a success closes it.
#[derive(Debug, Default)]
struct Breaker {
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which requests fail fast.
    open_until: AtomicU64,
    epoch: OnceLock<Instant>,
}

impl Breaker {
    fn now_ms(&self) -> u64 {
        self.epoch.get_or_init(Instant::now).elapsed().as_millis() as u64
    }

    fn check(&self) -> Result<(), DbError> {
        let until = self.open_until.load(Ordering::Acquire);
        let now = self.now_ms();
        if now < until {
            return Err(DbError::Unavailable(format!(
                "PostgreSQL failed {} times in a row; not trying again for {} ms",
                self.failures.load(Ordering::Relaxed),
                until - now
            )));
        }
        Ok(())
    }

    fn record<T>(&self, r: &Result<T, DbError>) {
        match r {
            Err(DbError::Unavailable(_)) => {
                let f = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
                if f >= 3 {
                    let cool = (100u64 << (f - 3).min(6)).min(5000);
                    self.open_until
                        .store(self.now_ms() + cool, Ordering::Release);
                }
            }
            _ => {
                if self.failures.swap(0, Ordering::AcqRel) != 0 {
                    self.open_until.store(0, Ordering::Release);
                }
            }
        }
    }
}

/// The database side: a connection pool and the ways cachefront queries.
#[derive(Clone)]
pub struct Db {
    /// The primary's pools (see [`pool`]).
    pools: Arc<Pools>,
    breaker: Arc<Breaker>,
    /// Longest a query may take from our side (twice the statement timeout + 1 s: the server's
    /// own timeout should always fire first).
    deadline: Duration,
    /// For connections outside the pool (the invalidation listener).
    pg: tokio_postgres::Config,
    /// `postgres.replicas`; `None` when there are none, so nothing about them costs anything.
    replicas: Option<Arc<Replicas>>,
    /// The settings it was built from (the WAL change stream connects with them).
    cfg: Arc<PostgresConfig>,
}

/// The connection settings of `url`, with cachefront's session settings (the same for the
/// primary and every replica, so a fill renders the same wherever it runs).
fn pg_config(url: &str, cfg: &PostgresConfig) -> Result<tokio_postgres::Config, DbError> {
    let mut pg: tokio_postgres::Config = url
        .parse()
        .map_err(|e: tokio_postgres::Error| DbError::Other(e.to_string()))?;
    pg.connect_timeout(Duration::from_millis(cfg.connect_timeout_ms));
    pg.application_name("cachefront");
    let mut options = pg.get_options().unwrap_or_default().to_string();
    options.push_str(&format!(
        " -c statement_timeout={} -c DateStyle=ISO -c IntervalStyle=iso_8601 -c TimeZone=UTC -c bytea_output=hex -c client_min_messages=warning",
        cfg.statement_timeout_ms
    ));
    pg.options(options.trim());
    Ok(pg)
}

/// `host:port/dbname` of a connection config: how logs and INFO name a server, without the
/// password a URL may carry.
fn server_name(pg: &tokio_postgres::Config) -> String {
    let host = match pg.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = pg.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", pg.get_dbname().unwrap_or(""))
}

impl Db {
    /// Builds the pools; connections are opened on demand, so a database that is down at
    /// start does not stop cachefront from serving hits.
    pub fn new(cfg: &PostgresConfig) -> Result<Db, DbError> {
        Db::with_cores(cfg, 0)
    }

    /// [`Db::new`] for a process serving clients on `cores` threads (see `cores`): each
    /// core's fills use connections of its own (see [`pool`]).
    pub fn with_cores(cfg: &PostgresConfig, cores: usize) -> Result<Db, DbError> {
        let pg = pg_config(&cfg.url, cfg)?;
        let pools = Arc::new(Pools::new(&pg, cfg, cores)?);
        let replicas = if cfg.replicas.is_empty() {
            None
        } else {
            let mut members = Vec::with_capacity(cfg.replicas.len());
            for url in &cfg.replicas {
                let rpg = pg_config(url, cfg)?;
                members.push(Replica::new(
                    pool::build(&rpg, cfg, cfg.pool_size)?,
                    server_name(&rpg),
                ));
            }
            Some(Arc::new(Replicas::new(
                members,
                Duration::from_millis(cfg.replica_max_lag_ms),
                Duration::from_millis(cfg.replica_poll_ms),
            )))
        };
        Ok(Db {
            pools,
            pg,
            breaker: Arc::new(Breaker::default()),
            deadline: Duration::from_millis(cfg.statement_timeout_ms * 2 + 1000),
            replicas,
            cfg: Arc::new(cfg.clone()),
        })
    }

    /// A logical replication stream from the primary (see [`wal`]) for `publication`, on a
    /// temporary slot named `<slot_prefix>_<random>`.
    pub async fn change_stream(
        &self,
        slot_prefix: &str,
        publication: &str,
    ) -> Result<wal::WalStream, DbError> {
        wal::WalStream::start(&self.cfg, slot_prefix, publication).await
    }

    /// The read replicas, if any are configured.
    pub fn replicas(&self) -> Option<&Arc<Replicas>> {
        self.replicas.as_ref()
    }

    /// The primary's WAL insert position, read on `client`: what the invalidation listener
    /// raises the requirements of the versions it is about to bump to (see [`replicas`]) —
    /// the commit records of the writes it was told about are behind it. The *insert*
    /// position, not `pg_current_wal_lsn()` (written) or the flushed one: a transaction
    /// committed with `synchronous_commit = off` is visible, and notifies, before its commit
    /// record is written out.
    pub async fn wal_insert_lsn(&self, client: &tokio_postgres::Client) -> Result<u64, DbError> {
        let read = client.simple_query("SELECT pg_current_wal_insert_lsn()::text");
        let messages = tokio::time::timeout(self.deadline, read)
            .await
            .map_err(|_| {
                DbError::Unavailable("no answer while reading the primary's WAL position".into())
            })??;
        replicas::lsn_of(&messages)?
            .ok_or_else(|| DbError::Other("the primary reported no WAL position".into()))
    }

    /// [`wal_insert_lsn`](Self::wal_insert_lsn) on a pooled connection of the primary.
    pub async fn wal_insert_lsn_pooled(&self) -> Result<u64, DbError> {
        let client = self.get().await?;
        self.wal_insert_lsn(&client).await
    }

    /// A read-your-writes barrier for the triggers source (`invalidation::applied`): commits,
    /// in a transaction of its own, a NOTIFY on `channel` carrying the WAL insert position read
    /// in it, and returns that position. Every transaction whose commit record ends at or
    /// before it queued its notifications before this one's (PostgreSQL queues a
    /// transaction's notifications before it writes its commit record), and a listener
    /// receives notifications in queue order: once the listener has applied everything it
    /// received before this one, every such transaction's changes are applied.
    pub async fn notify_barrier(&self, channel: &str) -> Result<u64, DbError> {
        const SQL: &str = "WITH b AS (SELECT pg_current_wal_insert_lsn()::text AS lsn) \
             SELECT b.lsn, pg_notify($1, json_build_object('sync', b.lsn)::text) FROM b";
        self.barrier(SQL, channel).await
    }

    /// A read-your-writes barrier for the WAL source: a transactional logical message with
    /// `prefix`, committed on its own, so it reaches the change stream as a transaction whose
    /// commit lies after everything committed before it. Returns the message's position (its
    /// commit ends after it). Committed synchronously whatever `synchronous_commit` says:
    /// the stream carries only WAL flushed to disk, and an asynchronous commit's is flushed
    /// by the WAL writer up to `wal_writer_delay` later — so this also pushes out every
    /// asynchronous commit before it.
    pub async fn message_barrier(&self, prefix: &str) -> Result<u64, DbError> {
        const SQL: &str = "SELECT pg_logical_emit_message(true, $1, 'sync')::text \
             FROM set_config('synchronous_commit', 'on', true)";
        self.barrier(SQL, prefix).await
    }

    /// Runs a barrier statement (one text parameter, a position as text in its first
    /// column) on a pooled connection of the primary, within the query deadline.
    async fn barrier(&self, sql: &str, arg: &str) -> Result<u64, DbError> {
        let run = async {
            let client = self.get().await?;
            let statement = client.prepare_cached(sql).await?;
            let row = client.query_one(&statement, &[&arg]).await?;
            let text: String = row.try_get(0)?;
            replicas::parse_lsn(&text)
                .ok_or_else(|| DbError::Other(format!("not a WAL position: {text}")))
        };
        tokio::time::timeout(self.deadline, run)
            .await
            .map_err(|_| DbError::Unavailable("no answer while committing a barrier".into()))?
    }

    /// A pooled connection, unless the circuit breaker is open.
    /// The calling thread's pool (its core's, see [`pool`]); cleaned after use.
    async fn get(&self) -> Result<Pooled, DbError> {
        self.get_for(Author::Anyone).await
    }

    /// [`get`](Self::get), for SQL by `author` (which decides whether it is cleaned after).
    async fn get_for(&self, author: Author) -> Result<Pooled, DbError> {
        self.breaker.check()?;
        let r = match self.pools.here() {
            Ok(pool) => pool.get().await.map_err(DbError::from),
            Err(e) => Err(e),
        };
        self.breaker.record(&r);
        r.map(|object| Pooled::for_author(object, self.deadline, author))
    }

    /// A pooled connection, for catalog queries and trigger maintenance.
    pub async fn client(&self) -> Result<Pooled, DbError> {
        self.get().await
    }

    /// A connection of its own (not pooled): the invalidation listener keeps it for LISTEN.
    pub async fn connect_dedicated(
        &self,
    ) -> Result<
        (
            tokio_postgres::Client,
            tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
        ),
        DbError,
    > {
        Ok(self.pg.connect(NoTls).await?)
    }

    /// Runs `work` on a pooled connection of the primary within the query deadline (see
    /// `deadline`). A connection that does not answer in time — a partitioned or hung server
    /// the statement timeout cannot reach — is taken out of the pool, not reused.
    async fn with_deadline<T, F>(&self, author: Author, work: F) -> Result<T, DbError>
    where
        F: for<'a> FnOnce(
            &'a mut deadpool_postgres::Object,
        ) -> futures::future::BoxFuture<'a, Result<T, DbError>>,
    {
        let client = self.get_for(author).await?;
        self.deadline_on(client, Some(&self.breaker), work).await
    }

    /// `work` on `client` within the deadline; a connection that overruns it is discarded
    /// (and the overrun counted by `breaker`, if given).
    async fn deadline_on<T, F>(
        &self,
        mut client: Pooled,
        breaker: Option<&Breaker>,
        work: F,
    ) -> Result<T, DbError>
    where
        F: for<'a> FnOnce(
            &'a mut deadpool_postgres::Object,
        ) -> futures::future::BoxFuture<'a, Result<T, DbError>>,
    {
        match tokio::time::timeout(self.deadline, work(&mut client)).await {
            Ok(Err(e @ DbError::TooLarge(_))) => {
                // The rest of an abandoned result is still on its way; closing the connection
                // ends the query on the server too, and nobody waits behind it.
                client.close();
                Err(e)
            }
            Ok(r) => {
                client.finished();
                r
            }
            Err(_) => {
                client.close();
                let e = Err(DbError::Unavailable(format!(
                    "no answer from PostgreSQL within {} ms",
                    self.deadline.as_millis()
                )));
                if let Some(b) = breaker {
                    b.record(&e);
                }
                e
            }
        }
    }

    /// A DDL statement may have changed what a prepared statement returns (PostgreSQL then
    /// refuses it: "cached plan must not change result type"): every pooled connection, of
    /// the primary and the replicas, forgets its prepared statements and prepares again.
    pub fn schema_changed(&self) {
        for pool in self.pools.all() {
            pool.manager().statement_caches.clear();
        }
        if let Some(set) = &self.replicas {
            for r in &set.members {
                r.pool.manager().statement_caches.clear();
            }
        }
    }

    /// Runs a fill's query: on a replica that has replayed WAL position `must_see` and is
    /// within the lag bound (see [`replicas`]), else on the primary. A replica that turns out
    /// to be behind, or fails as a server rather than on the query, hands the query to the
    /// primary (once).
    async fn fill_query<F>(
        &self,
        must_see: u64,
        author: Author,
        work: F,
    ) -> Result<QueryResult, DbError>
    where
        F: for<'a> Fn(
            &'a mut deadpool_postgres::Object,
            Option<u64>,
        ) -> futures::future::BoxFuture<'a, Result<Attempt, DbError>>,
    {
        match self.fill_query_once(must_see, author, &work).await {
            // A DDL statement ran before its notification arrived: prepare again, once.
            Err(e) if e.code() == Some("0A000") => {
                self.schema_changed();
                self.fill_query_once(must_see, author, &work).await
            }
            other => other,
        }
    }

    async fn fill_query_once<F>(
        &self,
        must_see: u64,
        author: Author,
        work: &F,
    ) -> Result<QueryResult, DbError>
    where
        F: for<'a> Fn(
            &'a mut deadpool_postgres::Object,
            Option<u64>,
        ) -> futures::future::BoxFuture<'a, Result<Attempt, DbError>>,
    {
        let Some(set) = &self.replicas else {
            return self.on_primary(author, work, Served::Primary).await;
        };
        let Some(replica) = set.pick(must_see) else {
            return self
                .on_primary(author, work, Served::PrimaryReplicasBehind)
                .await;
        };
        let attempt = match replica.pool.get().await {
            Ok(client) => {
                let client = Pooled::for_author(client, self.deadline, author);
                // Nothing to check while nothing is required.
                self.deadline_on(client, None, |c| {
                    work(c, (must_see > 0).then_some(must_see))
                })
                .await
            }
            Err(e) => Err(e.into()),
        };
        match attempt {
            Ok(Attempt::Done(mut r)) => {
                r.served = Served::Replica;
                Ok(r)
            }
            Ok(Attempt::Behind(replay)) => {
                tracing::debug!(replica = %replica.name, required = %replicas::format_lsn(must_see), "replica behind a write the fill must see");
                replica.note_replay(replay);
                self.on_primary(author, work, Served::PrimaryReplicasBehind)
                    .await
            }
            Err(e) if replicas::replica_trouble(&e) => {
                tracing::warn!(replica = %replica.name, error = %e, "fill failed on a read replica; retrying on the primary");
                replica.mark_down();
                self.on_primary(author, work, Served::PrimaryAfterReplicaError)
                    .await
            }
            Err(e) => Err(e),
        }
    }

    async fn on_primary<F>(
        &self,
        author: Author,
        work: &F,
        served: Served,
    ) -> Result<QueryResult, DbError>
    where
        F: for<'a> Fn(
            &'a mut deadpool_postgres::Object,
            Option<u64>,
        ) -> futures::future::BoxFuture<'a, Result<Attempt, DbError>>,
    {
        match self.with_deadline(author, |c| work(c, None)).await? {
            Attempt::Done(mut r) => {
                r.served = served;
                Ok(r)
            }
            // Replay is checked only on replicas; the primary is never behind itself.
            Attempt::Behind(_) => Err(DbError::Other("replay check on the primary".into())),
        }
    }

    /// Runs a named query's statement with its (already validated) arguments — a fill, so on
    /// a read replica that has replayed WAL position `must_see` if one may answer it (0: no
    /// requirement; always 0 without replicas). Rows are kept as `collect` says.
    pub async fn query_params(
        &self,
        sql: &OperatorSql,
        args: &[String],
        collect: Collect,
        must_see: u64,
    ) -> Result<QueryResult, DbError> {
        self.fill_query(must_see, Author::Operator, |client, check| {
            // The text shared, not copied: this runs on every fill.
            let (sql, args) = (sql.clone(), args.to_vec());
            Box::pin(async move {
                let stmt = prepare_bounded(client, &sql).await?;
                let params: Vec<TextParam> = args.iter().map(|a| TextParam(a)).collect();
                let c: &tokio_postgres::Client = client;
                let query = c.query_raw(&stmt, as_dyn(&params));
                let stream = match check {
                    None => query.await?,
                    Some(required) => {
                        let (replay, stream) = checked(c, query).await?;
                        if replay.is_none_or(|r| r < required) {
                            return Ok(Attempt::Behind(replay));
                        }
                        stream
                    }
                };
                let names = column_names(&stmt);
                let rows = collect_rows(stream, &names, stmt.columns(), collect).await?;
                Ok(Attempt::Done(QueryResult {
                    names,
                    rows,
                    served: Served::Primary,
                }))
            })
        })
        .await
    }

    /// Runs a client's query for SQL.CACHED in a READ ONLY transaction, rendering its rows to
    /// JSON within `limits` as they arrive — a fill, so on a read replica as
    /// [`query_params`](Self::query_params) says.
    pub async fn query_read_only(
        &self,
        sql: &str,
        params: &[String],
        limits: ResultLimits,
        must_see: u64,
    ) -> Result<QueryResult, DbError> {
        self.fill_query(must_see, Author::Anyone, |client, check| {
            let (sql, params) = (sql.to_string(), params.to_vec());
            Box::pin(async move { read_only(client, &sql, &params, limits, check).await })
        })
        .await
    }

    /// Asks PostgreSQL to parse `sql` without running it: a clearer error for a query our own
    /// parser could not read. `Ok` means PostgreSQL accepts what the parser did not.
    pub async fn prepare_only(&self, sql: &str) -> Result<(), DbError> {
        let sql = sql.to_string();
        self.with_deadline(Author::Anyone, move |client| {
            Box::pin(async move {
                client.prepare(&sql).await?;
                Ok(())
            })
        })
        .await
    }

    /// Longest a database operation may take from cachefront's side.
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Pool gauges for INFO: (size, available).
    pub fn pool_status(&self) -> (usize, usize) {
        self.pools.all().fold((0, 0), |(size, available), pool| {
            let s = pool.status();
            (size + s.size, available + s.available)
        })
    }
}

async fn read_only(
    client: &mut deadpool_postgres::Object,
    sql: &str,
    params: &[String],
    limits: ResultLimits,
    check: Option<u64>,
) -> Result<Attempt, DbError> {
    let stmt = prepare_bounded(client, sql).await?;
    let names = column_names(&stmt);
    let stmt = match wrap_for_text_casts(sql, &stmt) {
        Some(wrapped) => prepare_bounded(client, &wrapped).await?,
        None => stmt,
    };
    let mut builder = client.build_transaction().read_only(true);
    if check.is_some() {
        // Each statement its own snapshot, so the query's is taken after the replay check
        // (under REPEATABLE READ the snapshot would be the check's, taken before it reads).
        builder = builder.isolation_level(tokio_postgres::IsolationLevel::ReadCommitted);
    }
    let tx = builder.start().await?;
    let text: Vec<TextParam> = params.iter().map(|p| TextParam(p)).collect();
    let query = tx.query_raw(&stmt, as_dyn(&text));
    let stream = match check {
        None => query.await?,
        Some(required) => {
            let (replay, stream) = checked(tx.client(), query).await?;
            if replay.is_none_or(|r| r < required) {
                drop(stream);
                tx.rollback().await?;
                return Ok(Attempt::Behind(replay));
            }
            stream
        }
    };
    let rows = collect_rows(stream, &names, stmt.columns(), Collect::Json(limits)).await?;
    // Rolled back, not committed: a read needs no commit, and a rollback also undoes any
    // session change a statement could have made (`SET`, locks) should one get past the
    // parser — defence in depth behind the checks in `db::sql`.
    tx.rollback().await?;
    Ok(Attempt::Done(QueryResult {
        names,
        rows,
        served: Served::Primary,
    }))
}

/// Most statements one pooled connection keeps prepared. Every distinct query text a client
/// sends through SQL.CACHED would otherwise stay prepared — in cachefront and in the
/// PostgreSQL backend — for the life of the connection.
pub const MAX_PREPARED_PER_CONNECTION: usize = 256;

/// `prepare_cached`, within [`MAX_PREPARED_PER_CONNECTION`]: a connection whose cache is
/// full forgets all its statements first (each is closed on the server once its last user
/// drops it). deadpool's cache cannot evict one entry by age, and a full reset only costs
/// a re-prepare (one round trip) of the statements still in use, never a wrong result.
async fn prepare_bounded(
    client: &deadpool_postgres::Object,
    sql: &str,
) -> Result<Statement, DbError> {
    let cache = &client.statement_cache;
    if cache.size() >= MAX_PREPARED_PER_CONNECTION {
        cache.clear();
    }
    Ok(client.prepare_cached(sql).await?)
}

/// Reads a query's rows as `collect` says, one at a time as they arrive. For JSON, each row
/// is rendered and dropped before the next is read, and the read stops — with the SPEC's
/// clear error — at the first row that would take the text past `limits`: memory follows
/// the limit, not the size of the result.
async fn collect_rows(
    stream: tokio_postgres::RowStream,
    names: &[String],
    columns: &[tokio_postgres::Column],
    collect: Collect,
) -> Result<Rows, DbError> {
    pin_mut!(stream);
    let limits = match collect {
        Collect::Json(limits) => limits,
        Collect::FirstRow => {
            let first = stream.try_next().await?;
            // A finished stream must not be polled again (it reports a closed connection).
            if first.is_some() {
                while stream.try_next().await?.is_some() {}
            }
            return Ok(Rows::First(first));
        }
    };
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut json = rows::JsonRows::new(&names, columns).with_limit(limits.max_bytes);
    while let Some(row) = stream.try_next().await? {
        if json.rows() == limits.max_rows {
            return Err(too_many_rows(limits.max_rows));
        }
        // The closing `]` counts: the finished text must fit.
        if json.len() + json.min_added_len(&row) + 1 > limits.max_bytes {
            return Err(too_many_bytes(limits.max_bytes));
        }
        json.push(&row);
        if json.len() + 1 > limits.max_bytes {
            return Err(too_many_bytes(limits.max_bytes));
        }
    }
    let rows = json.rows();
    Ok(Rows::Json {
        text: json.finish(),
        rows,
    })
}

fn too_many_rows(max_rows: usize) -> DbError {
    DbError::TooLarge(Refusal::TooManyRows(max_rows).to_string())
}

fn too_many_bytes(max_bytes: usize) -> DbError {
    DbError::TooLarge(Refusal::TooManyBytes(max_bytes).to_string())
}

/// Runs `query` right behind a read of the replica's replay position, in one pipeline (no
/// extra round trip): the check is sent first — `simple_query_raw` returns once it is
/// queued — so PostgreSQL runs it before the query, and the query's snapshot includes
/// everything replayed by then. Both answers are read together, so neither can hold up the
/// other.
async fn checked<T>(
    client: &tokio_postgres::Client,
    query: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<(Option<u64>, T), DbError> {
    let check = client.simple_query_raw(REPLAY_CHECK).await?;
    let (messages, out) = futures::future::try_join(check.try_collect::<Vec<_>>(), query).await?;
    Ok((replicas::lsn_of(&messages)?, out))
}

fn as_dyn<'a>(
    params: &'a [TextParam<'a>],
) -> impl ExactSizeIterator<Item = &'a (dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync))
}

fn column_names(stmt: &Statement) -> Vec<String> {
    stmt.columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect()
}

/// When some columns have types the renderer cannot decode from binary, wraps the query so
/// PostgreSQL casts just those columns to text (by position, so duplicate or odd column names
/// don't matter): `SELECT q.c1, q.c2::text FROM (<sql>) AS q(c1, c2)`.
fn wrap_for_text_casts(sql: &str, stmt: &Statement) -> Option<String> {
    let cols = stmt.columns();
    if cols.iter().all(|c| rows::decodes_natively(c.type_())) {
        return None;
    }
    let inner = sql.trim_end().trim_end_matches(';');
    let select: Vec<String> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if rows::decodes_natively(c.type_()) {
                format!("q.c{i}")
            } else {
                format!("q.c{i}::{}", rows::text_cast(c.type_()))
            }
        })
        .collect();
    let aliases: Vec<String> = (0..cols.len()).map(|i| format!("c{i}")).collect();
    Some(format!(
        "SELECT {} FROM (\n{inner}\n) AS q({})",
        select.join(", "),
        aliases.join(", ")
    ))
}
