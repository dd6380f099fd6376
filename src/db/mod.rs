//! PostgreSQL: a pool, read-only execution, and rows rendered as the SPEC's JSON.

pub mod rows;
pub mod sql;
pub mod triggers;

use bytes::{BufMut, BytesMut};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures::{pin_mut, TryStreamExt};
use postgres_types::{Format, IsNull, ToSql, Type};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio_postgres::{NoTls, Row, Statement};

use crate::config::PostgresConfig;

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

/// Rows plus the column names to show for them.
pub struct QueryResult {
    pub names: Vec<String>,
    pub rows: Vec<Row>,
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
    pool: Pool,
    breaker: Arc<Breaker>,
    /// Longest a query may take from our side (twice the statement timeout + 1 s: the server's
    /// own timeout should always fire first).
    deadline: Duration,
    /// For connections outside the pool (the invalidation listener).
    pg: tokio_postgres::Config,
}

impl Db {
    /// Builds the pool; connections are opened on demand, so a database that is down at start
    /// does not stop cachefront from serving hits.
    pub fn new(cfg: &PostgresConfig) -> Result<Db, DbError> {
        let mut pg: tokio_postgres::Config = cfg
            .url
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
        let mgr = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let timeout = Some(Duration::from_millis(cfg.connect_timeout_ms));
        let pool = Pool::builder(mgr)
            .max_size(cfg.pool_size)
            .runtime(Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build()
            .map_err(|e| DbError::Other(e.to_string()))?;
        Ok(Db {
            pool,
            pg,
            breaker: Arc::new(Breaker::default()),
            deadline: Duration::from_millis(cfg.statement_timeout_ms * 2 + 1000),
        })
    }

    /// A pooled connection, unless the circuit breaker is open.
    async fn get(&self) -> Result<deadpool_postgres::Object, DbError> {
        self.breaker.check()?;
        let r = self.pool.get().await.map_err(DbError::from);
        self.breaker.record(&r);
        r
    }

    /// A pooled connection, for catalog queries and trigger maintenance.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, DbError> {
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

    /// Runs `work` on a pooled connection within the query deadline (see `deadline`). A connection that does not answer in time — a partitioned or hung
    /// server the statement timeout cannot reach — is taken out of the pool, not reused.
    async fn with_deadline<T, F>(&self, work: F) -> Result<T, DbError>
    where
        F: for<'a> FnOnce(
            &'a mut deadpool_postgres::Object,
        ) -> futures::future::BoxFuture<'a, Result<T, DbError>>,
    {
        let mut client = self.get().await?;
        match tokio::time::timeout(self.deadline, work(&mut client)).await {
            Ok(r) => r,
            Err(_) => {
                drop(deadpool_postgres::Object::take(client));
                let e = Err(DbError::Unavailable(format!(
                    "no answer from PostgreSQL within {} ms",
                    self.deadline.as_millis()
                )));
                self.breaker.record(&e);
                e
            }
        }
    }

    /// Runs a named query's statement with its (already validated) arguments.
    pub async fn query_params(&self, sql: &str, args: &[String]) -> Result<QueryResult, DbError> {
        let (sql, args) = (sql.to_string(), args.to_vec());
        self.with_deadline(move |client| {
            Box::pin(async move {
                let stmt = client.prepare_cached(&sql).await?;
                let params: Vec<TextParam> = args.iter().map(|a| TextParam(a)).collect();
                let rows = client.query(&stmt, &as_dyn(&params)).await?;
                Ok(QueryResult {
                    names: column_names(&stmt),
                    rows,
                })
            })
        })
        .await
    }

    /// Runs a client's query for SQL.CACHED in a READ ONLY transaction, at most `max_rows` rows.
    pub async fn query_read_only(
        &self,
        sql: &str,
        params: &[String],
        max_rows: usize,
    ) -> Result<QueryResult, DbError> {
        let (sql, params) = (sql.to_string(), params.to_vec());
        self.with_deadline(move |client| {
            Box::pin(async move { read_only(client, &sql, &params, max_rows).await })
        })
        .await
    }

    /// Asks PostgreSQL to parse `sql` without running it: a clearer error for a query our own
    /// parser could not read. `Ok` means PostgreSQL accepts what the parser did not.
    pub async fn prepare_only(&self, sql: &str) -> Result<(), DbError> {
        let sql = sql.to_string();
        self.with_deadline(move |client| {
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
        let s = self.pool.status();
        (s.size, s.available)
    }
}

async fn read_only(
    client: &mut deadpool_postgres::Object,
    sql: &str,
    params: &[String],
    max_rows: usize,
) -> Result<QueryResult, DbError> {
    let stmt = client.prepare_cached(sql).await?;
    let names = column_names(&stmt);
    let stmt = match wrap_for_text_casts(sql, &stmt) {
        Some(wrapped) => client.prepare_cached(&wrapped).await?,
        None => stmt,
    };
    let tx = client.build_transaction().read_only(true).start().await?;
    let text: Vec<TextParam> = params.iter().map(|p| TextParam(p)).collect();
    let stream = tx
        .query_raw(&stmt, text.iter().map(|p| p as &(dyn ToSql + Sync)))
        .await?;
    pin_mut!(stream);
    let mut rows = Vec::new();
    while let Some(row) = stream.try_next().await? {
        if rows.len() == max_rows {
            return Err(DbError::Invalid(format!(
                "ERR result has more than {max_rows} rows (sql.max_rows); add a LIMIT"
            )));
        }
        rows.push(row);
    }
    // Rolled back, not committed: a read needs no commit, and a rollback also undoes any
    // session change a statement could have made (`SET`, locks) should one get past the
    // parser — defence in depth behind the checks in `db::sql`.
    tx.rollback().await?;
    Ok(QueryResult { names, rows })
}

fn as_dyn<'a>(params: &'a [TextParam<'a>]) -> Vec<&'a (dyn ToSql + Sync)> {
    params.iter().map(|p| p as &(dyn ToSql + Sync)).collect()
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
