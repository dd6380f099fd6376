//! The database side of a cached command: what a miss queries in PostgreSQL, the tables it
//! must resolve first, and the slow-fill log. The cache's read path (`cache::read`) decides
//! when any of it runs.

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;

use super::named_query::NamedQuery;
use super::Action;
use super::Context;
use crate::cache::named::RowKey;
use crate::cache::read::{self, Plan};
use crate::cache::{Deps, Entry, Tracking, Value};
use crate::config::ReplyKind;
use crate::db::{Collect, DbError, QueryResult, ResultLimits, Rows, Served};
use crate::error::{Error, Refusal, Result};
use crate::invalidation::Untrackable;
use crate::metrics::{inc, QueryStats};
use crate::protocol::Proto;
use crate::session::Session;

/// Where a cached command's value comes from.
pub enum Source {
    Named {
        query: Arc<NamedQuery>,
        /// Validated, canonical argument texts.
        args: Vec<String>,
    },
    Sql {
        sql: String,
        params: Vec<String>,
    },
}

/// The database side of one cached command's fill, handed to the cache's read path: resolving
/// the entry's tables, the query, the slow-fill log.
pub struct Load {
    ctx: Arc<Context>,
    source: Source,
    kind: ReplyKind,
    /// The entry key, for the slow-fill log.
    key: String,
}

/// The plan of a cached read of `entry` from `source`, for a client speaking `proto` on
/// `lane` (see [`shared_lane`]). The entry's dependencies are what this process already
/// resolved for the query, if anything (see [`known_deps`]); the fill resolves them for sure
/// before reading any version.
pub fn plan(
    ctx: &Arc<Context>,
    mut entry: Entry,
    source: Source,
    kind: ReplyKind,
    (proto, lane): (Proto, Option<u64>),
    stats: Option<Arc<QueryStats>>,
) -> Plan {
    let negative_ttl = match &source {
        Source::Named { query, .. } => query.negative_ttl,
        Source::Sql { .. } => {
            let ttl = ctx.config().sql.negative_ttl;
            (ttl > 0).then_some(ttl)
        }
    };
    entry.deps = known_deps(ctx, &source);
    let load = Load {
        ctx: Arc::clone(ctx),
        source,
        kind,
        key: entry.key.clone(),
    };
    Plan {
        entry,
        kind,
        proto,
        lane,
        negative_ttl,
        source: Arc::new(load),
        stats,
    }
}

/// The client's lane while its requests go over the shared connections: not while it holds a
/// dedicated one (a transaction, a subscription, another database …) or is a restricted user,
/// whose commands Valkey checks on a connection logged in as that user.
pub fn shared_lane(session: &Session) -> Option<u64> {
    (session.user.unrestricted() && !session.needs_dedicated()).then_some(session.id)
}

impl Source {
    fn sql(&self) -> &str {
        match self {
            Source::Named { query, .. } => &query.sql,
            Source::Sql { sql, .. } => sql,
        }
    }

    /// For a row-keyed named query: the query, its key binding and this entry's key value.
    fn row(&self) -> Option<(&Arc<NamedQuery>, &RowKey, &str)> {
        match self {
            Source::Named { query, args } => {
                let rk = query.row_key.as_ref()?;
                Some((
                    query,
                    rk,
                    args.get(rk.arg).map(String::as_str).unwrap_or_default(),
                ))
            }
            Source::Sql { .. } => None,
        }
    }

    /// Whether the operator opted into TTL-only caching for this query.
    fn ttl_only(&self, ctx: &Context) -> bool {
        match self {
            Source::Named { query, .. } => query.ttl_only,
            Source::Sql { .. } => ctx.config().sql.ttl_only,
        }
    }

    /// The refusal of a query PostgreSQL cannot fully track.
    fn untrackable(&self, why: Untrackable) -> Error {
        match self {
            Source::Named { query, .. } => Refusal::UntrackableNamed(query.name.clone(), why.0),
            Source::Sql { .. } => Refusal::UntrackableSql(why.0),
        }
        .into()
    }
}

/// An entry's dependencies from what this process has already resolved, without asking
/// PostgreSQL: unresolved if it has not (then a hit neither enters the L1 nor passes while
/// anything is degraded; the fill resolves).
fn known_deps(ctx: &Context, source: &Source) -> Deps {
    let inv = &ctx.invalidation;
    let Some(res) = inv.known(source.sql()) else {
        return Deps::default();
    };
    let row = match source.row() {
        None => None,
        Some((_, rk, value)) => match inv.known_table(&rk.table) {
            Some((oid, family)) => Some((oid, family, rk.column.as_str(), value)),
            None => return Deps::default(),
        },
    };
    let row = row
        .as_ref()
        .map(|(oid, f, c, v)| (*oid, f.as_ref(), *c, *v));
    inv.deps_for(&res, row, source.ttl_only(ctx))
        .unwrap_or_default()
}

impl read::Source for Load {
    fn prepare(self: Arc<Self>, entry: Entry) -> BoxFuture<'static, Result<Entry>> {
        async move { prepare(&self.ctx, &self.source, entry).await }.boxed()
    }

    fn load(self: Arc<Self>, deps: Option<Deps>) -> BoxFuture<'static, Result<Value>> {
        // What replicas must have replayed is judged on the versions the fill checks.
        async move { load(&self.ctx, &self.source, self.kind, deps.as_ref()).await }.boxed()
    }

    fn filled(&self, took: std::time::Duration) {
        record_if_slow(&self.ctx, &self.source, &self.key, took);
    }

    fn query(&self) -> (&str, &str) {
        match &self.source {
            Source::Named { query, .. } => (&query.name, &query.sql),
            Source::Sql { sql, .. } => ("SQL.CACHED", sql),
        }
    }

    fn size(&self) -> usize {
        let strings = |v: &[String]| v.iter().map(|s| s.len() + 24).sum::<usize>();
        self.key.len()
            + match &self.source {
                // The SQL text is the named query's, shared.
                Source::Named { args, .. } => strings(args),
                Source::Sql { sql, params } => sql.len() + strings(params),
            }
    }
}

/// The one route of a cached command: the cache's read path, which answers from the L1, says
/// what to look up in Valkey, or fills. `plan` builds the miss plan for the entry key; the
/// cache calls it only when needed, so a hot hit builds none. `stats`: the query's figures,
/// which the connection counts the read in.
///
/// Under a read-your-writes floor (`CACHEFRONT.AFTER`), the read first waits for the fleet's
/// applied invalidations to reach it, then reads past the L1 (`Cache::begin_after`).
pub fn route(
    ctx: &Arc<Context>,
    session: &Session,
    key: &str,
    kind: ReplyKind,
    stats: Option<Arc<QueryStats>>,
    plan: impl FnOnce(String) -> Plan,
) -> Action {
    let begin = match session.read_after {
        None => ctx.cache.begin(key, kind, session.proto, plan),
        Some(after) => ctx
            .cache
            .begin_after(plan(key.to_owned()), super::read_after::ready(ctx, after)),
    };
    Action::Read(begin, stats)
}

/// Keeps a fill of `key` from `source` in `CACHEFRONT.SLOWLOG` if it took
/// `metrics.slow_fill_ms` or more. The log line names the command and key, never the SQL
/// text. The entry is made only for a slow fill: every other fill pays one comparison.
fn record_if_slow(ctx: &Context, source: &Source, key: &str, took: std::time::Duration) {
    let config = ctx.config();
    if took < std::time::Duration::from_millis(config.metrics.slow_fill_ms) {
        return;
    }
    let (command, sql) = match source {
        Source::Named { query, .. } => (query.name.as_str(), &*query.sql),
        Source::Sql { sql, .. } => ("SQL.CACHED", sql.as_str()),
    };
    tracing::warn!(command, key, ms = took.as_millis() as u64, "slow fill");
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    ctx.metrics.slowlog.record(
        config.metrics.slowlog_max_len,
        crate::metrics::SlowFill {
            id: 0,
            at,
            duration_us: took.as_micros() as u64,
            command: command.to_string(),
            key: key.to_string(),
            sql: sql.chars().take(256).collect(),
        },
    );
}

/// Resolves what the entry depends on (PostgreSQL's analysis of the query, see
/// `db::deps`) and makes sure every table among it reports its writes, before any version
/// is read. A query PostgreSQL cannot fully track is refused unless the operator opted into
/// TTL-only caching for it.
async fn prepare(ctx: &Context, source: &Source, mut entry: Entry) -> Result<Entry> {
    ctx.wait_listening(std::time::Duration::from_millis(
        ctx.config().postgres.connect_timeout_ms,
    ))
    .await;
    let resolving = async {
        let inv = &ctx.invalidation;
        let res = inv.resolve(&ctx.db, source.sql()).await?;
        let row = match source.row() {
            None => None,
            Some((query, rk, value)) => {
                let Some((oid, family)) = inv.key_table(&ctx.db, query).await? else {
                    return Err(Error::db(format!(
                        "relation \"{}\" (the query's key_column table) does not exist",
                        rk.table
                    )));
                };
                Some((oid, family, rk.column.as_str(), value))
            }
        };
        let row_ref = row
            .as_ref()
            .map(|(oid, f, c, v)| (*oid, f.as_ref(), *c, *v));
        let mut deps = inv
            .deps_for(&res, row_ref, source.ttl_only(ctx))
            .map_err(|why| source.untrackable(why))?;
        if deps.tracking == Tracking::Tracked {
            let family_watched = match &row {
                Some((_, family, ..)) => inv.watch(&ctx.db, family).await,
                None => true,
            };
            if !(inv.watch(&ctx.db, &res).await && family_watched) {
                deps.tracking = Tracking::Unwatched;
            }
        }
        Ok(deps)
    };
    entry.deps = tokio::time::timeout(ctx.db.deadline(), resolving)
        .await
        .map_err(|_| {
            Error::db("database unavailable: no answer while resolving the query's dependencies")
        })??;
    Ok(entry)
}

/// Queries PostgreSQL for a fill. `deps`: the versions the fill checked (read before this
/// runs), when known.
async fn load(
    ctx: &Context,
    source: &Source,
    kind: ReplyKind,
    deps: Option<&Deps>,
) -> Result<Value> {
    let must_see = must_see(ctx, deps);
    let limits = result_limits(ctx);
    let result = match source {
        Source::Named { query, args } => {
            let collect = match kind {
                ReplyKind::Json => Collect::Json(ResultLimits {
                    max_rows: usize::MAX,
                    ..limits
                }),
                ReplyKind::Value | ReplyKind::Hash => Collect::FirstRow,
            };
            ctx.db
                .query_params(&query.sql, args, collect, must_see)
                .await
                .map_err(|e| named_error(query, args, e))?
        }
        Source::Sql { sql, params } => {
            let r = ctx
                .db
                .query_read_only(sql, params, limits, must_see)
                .await?;
            count_served(ctx, r.served);
            if r.rows.is_empty() {
                // Answered as `[]`; remembered only as a negative entry (sql.negative_ttl).
                return Ok(Value::Absent);
            }
            return Ok(shape(r, kind));
        }
    };
    count_served(ctx, result.served);
    Ok(shape(result, kind))
}

/// The caps a JSON result is read within (`sql.max_rows`, `sql.max_result_bytes`).
fn result_limits(ctx: &Context) -> ResultLimits {
    let sql = &ctx.config().sql;
    ResultLimits {
        max_rows: sql.max_rows,
        max_bytes: sql.max_result_bytes,
    }
}

/// The WAL position a replica must have replayed to answer a fill that checks the versions
/// of `deps` (see `db::replicas`); 0 without replicas. Without known versions (a fill
/// answered straight from PostgreSQL), everything any fill must see. While the invalidation
/// listener is down, writes go unheard and no requirement is raised for them: the primary
/// answers every fill until it is back (and has flushed what it missed). So it does on an
/// instance that does not hold the invalidation lease: only the holder applies changes, so
/// only its requirements are raised before the versions they guard are bumped (see
/// `Invalidation::sees_changes`).
fn must_see(ctx: &Context, deps: Option<&Deps>) -> u64 {
    let Some(set) = ctx.db.replicas() else {
        return 0;
    };
    if ctx.config().invalidation.enabled && !ctx.invalidation.sees_changes() {
        return u64::MAX;
    }
    match deps {
        Some(d) => set.required_for(d.versions()),
        None => set.latest(),
    }
}

/// Which server answered, for the replica counters.
fn count_served(ctx: &Context, served: Served) {
    let m = &ctx.metrics;
    match served {
        Served::Primary => {}
        Served::Replica => inc(&m.replica_fills),
        Served::PrimaryReplicasBehind => inc(&m.replica_fallbacks),
        Served::PrimaryAfterReplicaError => {
            inc(&m.replica_errors);
            inc(&m.replica_fallbacks);
        }
    }
}

/// PostgreSQL's verdict on an argument's type (bad text, out of range) is the client's error.
fn named_error(q: &NamedQuery, args: &[String], e: DbError) -> Error {
    match e.code() {
        Some("22P02") | Some("22003") | Some("22007") | Some("22008") => {
            if args.len() == 1 {
                q.invalid_arg(0, args[0].as_bytes()).into()
            } else {
                Refusal::InvalidArgs(q.name.clone(), e.to_string()).into()
            }
        }
        _ => e.into(),
    }
}

/// Turns rows into the value a reply kind stores. JSON arrives rendered (and checked against
/// the limits) by the database layer; the other kinds use the first row.
fn shape(result: QueryResult, kind: ReplyKind) -> Value {
    let QueryResult { names, rows, .. } = result;
    let first = match rows {
        Rows::Json { text, .. } => return Value::String(Bytes::from(text)),
        Rows::First(first) => first,
    };
    let Some(row) = first else {
        return Value::Absent;
    };
    match kind {
        ReplyKind::Hash => Value::Hash(
            names
                .iter()
                .enumerate()
                .filter_map(|(i, n)| {
                    crate::db::rows::cell_text(&row, i).map(|v| (n.clone(), Bytes::from(v)))
                })
                .collect(),
        ),
        ReplyKind::Value | ReplyKind::Json => match crate::db::rows::cell_text(&row, 0) {
            Some(s) => Value::String(Bytes::from(s)),
            None => Value::Absent,
        },
    }
}
