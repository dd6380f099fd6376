//! Per-query introspection: `CACHEFRONT.EXPLAIN` (what a query would be cached as, without
//! running it), `CACHEFRONT.QUERIES` (each named query's and the busiest SQL.CACHED texts'
//! figures) and the same figures as Prometheus series with bounded labels.
//!
//! The figures are counted on the read path (`metrics::QueryStats`: a named query's are its
//! own, an SQL.CACHED text's are in `metrics::TopQueries`); dependencies come from
//! PostgreSQL's resolution (`invalidation::Resolution`), by name for people.

use bytes::Bytes;
use futures::FutureExt;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::named_query::{self, NamedQuery};
use super::sql_cached;
use super::{wrong_args, Action, Context};
use crate::cache::key::sql_key;
use crate::config::SqlMode;
use crate::db::sql::{check_read_only, SqlError};
use crate::error::Refusal;
use crate::invalidation::Resolution;
use crate::metrics::{Histogram, QueryStats};
use crate::protocol::request::{encode_multibulk, parse_i64_strict};
use crate::protocol::{Reply, Request};
use crate::session::Session;

/// A refusal's text as a reason (without its `ERR ` prefix).
fn reason(r: Refusal) -> String {
    let s = r.to_string();
    s.strip_prefix("ERR ").map(str::to_string).unwrap_or(s)
}

/// What `CACHEFRONT.EXPLAIN` was asked about.
enum Target {
    Named {
        query: Arc<NamedQuery>,
        /// Validated, canonical argument texts.
        args: Vec<String>,
    },
    Sql {
        sql: String,
        params: Vec<String>,
        ttl: u64,
        /// Why SQL.CACHED would refuse it before asking PostgreSQL, if it would.
        refused: Option<String>,
        /// The SQL parser could not read it: PostgreSQL's verdict decides the reason.
        unparsed: Option<String>,
    },
}

impl Target {
    fn sql(&self) -> &str {
        match self {
            Target::Named { query, .. } => &query.sql,
            Target::Sql { sql, .. } => sql,
        }
    }
}

/// `CACHEFRONT.EXPLAIN <query> [EX s] [PARAMS p…]` or `CACHEFRONT.EXPLAIN <COMMAND> <args…>`
/// for a named query: the key, whether and why (not) it can be cached, its dependencies as
/// PostgreSQL resolves them, its row binding, TTL, whether its tables report their writes and
/// whether the entry is cached now. The query itself never runs; resolving it may ask
/// PostgreSQL, as a miss would.
pub fn explain(ctx: &Arc<Context>, session: &Session, req: &Request) -> Action {
    let target = match target(ctx, req) {
        Ok(t) => t,
        Err(r) => return Action::Reply(r),
    };
    let config = ctx.config();
    let key = match &target {
        Target::Named { query, args } => query.key.render(args),
        Target::Sql { sql, params, .. } => sql_key(&config.sql.key_prefix, sql.as_bytes(), params),
    };
    if !session.user.key_allowed(key.as_bytes()) {
        return Action::Reply(Refusal::NoPermKey.reply());
    }
    let ttl_only = match &target {
        Target::Named { query, .. } => query.ttl_only,
        Target::Sql { .. } => config.sql.ttl_only,
    };
    let negative_ttl = match &target {
        Target::Named { query, .. } => query.negative_ttl,
        Target::Sql { .. } => Some(config.sql.negative_ttl).filter(|&t| t > 0),
    };
    let ctx = Arc::clone(ctx);
    Action::Task(
        async move {
            let report = Report::of(&ctx, target, key, ttl_only, negative_ttl).await;
            report.reply()
        }
        .boxed(),
    )
}

/// The query a request names: a named query with checked arguments, or an SQL.CACHED text
/// with SQL.CACHED's own checks done (their refusal kept as the reason it is not cacheable).
fn target(ctx: &Context, req: &Request) -> Result<Target, Reply> {
    let first = req.args.get(1).ok_or_else(|| wrong_args(req))?;
    let name = std::str::from_utf8(first)
        .ok()
        .map(str::to_ascii_uppercase)
        .unwrap_or_default();
    if let Some(q) = ctx.named().get(name.as_bytes()).cloned() {
        let given = &req.args[2..];
        if given.len() != q.args.len() {
            return Err(Refusal::WrongArity(q.name.to_ascii_lowercase()).reply());
        }
        let mut args = Vec::with_capacity(given.len());
        for (i, (t, raw)) in q.args.iter().zip(given).enumerate() {
            match named_query::validate(*t, raw) {
                Some(v) => args.push(v.into_owned()),
                None => return Err(q.invalid_arg(i, raw).reply()),
            }
        }
        return Ok(Target::Named { query: q, args });
    }
    let p = sql_cached::parse(req)?;
    let sql = std::str::from_utf8(&p.query)
        .map_err(|_| Refusal::QueryNotUtf8.reply())?
        .to_string();
    let config = ctx.config();
    let cfg = &config.sql;
    let mut unparsed = None;
    let refused = if cfg.mode == SqlMode::Off {
        Some(reason(Refusal::SqlOff))
    } else if p.query.len() > cfg.max_sql_bytes {
        Some(reason(Refusal::QueryTooLong(cfg.max_sql_bytes)))
    } else if cfg.mode == SqlMode::Allowlist && !cfg.allowlist.contains(&sql) {
        Some(reason(Refusal::NotAllowlisted))
    } else {
        match check_read_only(&sql) {
            Ok(_) => None,
            Err(SqlError::NotReadOnly(why)) => {
                Some(format!("{} ({why})", reason(Refusal::NotReadOnly)))
            }
            Err(SqlError::Parse(why)) => {
                unparsed = Some(why);
                None
            }
        }
    };
    Ok(Target::Sql {
        sql,
        params: p.params,
        ttl: p.ttl.unwrap_or(config.cache.default_ttl),
        refused,
        unparsed,
    })
}

/// What `CACHEFRONT.EXPLAIN` replies.
#[derive(Default)]
struct Report {
    command: String,
    key: String,
    sql: String,
    args: Vec<String>,
    ttl: u64,
    negative_ttl: Option<u64>,
    /// Why it cannot be cached, if it cannot.
    refused: Option<String>,
    /// Why it is cached TTL-only, if it is.
    ttl_only_because: Option<String>,
    /// `invalidated`, `row-keyed`, `ttl-only`, or `none` (not cached).
    freshness: &'static str,
    dependencies: Vec<String>,
    /// Each table among the dependencies and whether it reports its writes.
    tables: Vec<(String, &'static str)>,
    row_key: Option<String>,
    cached: Option<bool>,
}

impl Report {
    async fn of(
        ctx: &Arc<Context>,
        target: Target,
        key: String,
        ttl_only: bool,
        negative_ttl: Option<u64>,
    ) -> Report {
        let mut r = Report {
            key,
            sql: target.sql().to_string(),
            negative_ttl,
            freshness: "none",
            ..Report::default()
        };
        match &target {
            Target::Named { query, args } => {
                r.command = query.name.clone();
                r.args = args.clone();
                r.ttl = query.ttl;
            }
            Target::Sql {
                params,
                ttl,
                refused,
                unparsed,
                ..
            } => {
                r.command = "SQL.CACHED".into();
                r.args = params.clone();
                r.ttl = *ttl;
                r.refused = refused.clone();
                if let Some(why) = unparsed {
                    r.refused = Some(match ctx.db.prepare_only(&r.sql).await {
                        Err(e) => crate::error::Error::from(e).to_string(),
                        Ok(()) => reason(Refusal::NotAnalysable(why.clone())),
                    });
                }
            }
        }
        r.cached = cached(ctx, &r.key).await;
        if r.refused.is_none() {
            r.resolve(ctx, &target, ttl_only).await;
        }
        r
    }

    /// PostgreSQL's resolution of the query (and of a row-keyed query's key table): its
    /// dependencies, and whether and how it is kept fresh.
    async fn resolve(&mut self, ctx: &Arc<Context>, target: &Target, ttl_only: bool) {
        let inv = &ctx.invalidation;
        let res = match within(ctx, inv.resolve(&ctx.db, target.sql())).await {
            Ok(res) => res,
            Err(e) => {
                self.refused = Some(e);
                return;
            }
        };
        self.dependencies = names(&res);
        self.tables = tables(ctx, &res);
        if let Some(why) = &res.untrackable {
            if ttl_only {
                self.freshness = "ttl-only";
                self.ttl_only_because = Some(why.clone());
            } else {
                self.refused = Some(match target {
                    Target::Named { query, .. } => {
                        reason(Refusal::UntrackableNamed(query.name.clone(), why.clone()))
                    }
                    Target::Sql { .. } => reason(Refusal::UntrackableSql(why.clone())),
                });
            }
            return;
        }
        self.freshness = "invalidated";
        let Target::Named { query, args } = target else {
            return;
        };
        let Some(rk) = &query.row_key else {
            return;
        };
        match within(ctx, inv.resolve_table(&ctx.db, &rk.table)).await {
            Ok(Some((oid, family))) => {
                let table = family
                    .names
                    .iter()
                    .find(|(o, _)| *o == oid)
                    .map(|(_, n)| n.clone())
                    .unwrap_or_else(|| rk.table.clone());
                let value = args.get(rk.arg).cloned().unwrap_or_default();
                self.row_key = Some(format!("{table}.{} = {value}", rk.column));
                self.freshness = "row-keyed";
                for t in tables(ctx, &family) {
                    if !self.tables.contains(&t) {
                        self.tables.push(t);
                    }
                }
            }
            Ok(None) => {
                self.freshness = "none";
                self.refused = Some(format!(
                    "relation \"{}\" (the query's key_column table) does not exist",
                    rk.table
                ));
            }
            Err(e) => {
                self.freshness = "none";
                self.refused = Some(e);
            }
        }
    }

    fn reply(self) -> Reply {
        let text = |s: &str| Reply::text(s);
        let opt = |s: Option<String>| s.map(|s| Reply::text(&s)).unwrap_or(Reply::Nil);
        let cacheable = self.refused.is_none();
        Reply::Map(vec![
            (text("command"), text(&self.command)),
            (text("key"), text(&self.key)),
            (text("sql"), text(&self.sql)),
            (
                text("args"),
                Reply::Array(self.args.iter().map(|a| text(a)).collect()),
            ),
            (text("cacheable"), Reply::Int(i64::from(cacheable))),
            (text("reason"), opt(self.refused.or(self.ttl_only_because))),
            (text("freshness"), text(self.freshness)),
            (
                text("dependencies"),
                Reply::Array(self.dependencies.iter().map(|d| text(d)).collect()),
            ),
            (
                text("tables"),
                Reply::Map(
                    self.tables
                        .iter()
                        .map(|(t, state)| (text(t), text(state)))
                        .collect(),
                ),
            ),
            (text("row_key"), opt(self.row_key)),
            (text("ttl"), Reply::Int(self.ttl as i64)),
            (
                text("negative_ttl"),
                self.negative_ttl
                    .map(|t| Reply::Int(t as i64))
                    .unwrap_or(Reply::Nil),
            ),
            (
                text("cached"),
                self.cached
                    .map(|c| Reply::Int(i64::from(c)))
                    .unwrap_or(Reply::Nil),
            ),
        ])
    }
}

/// Runs a resolution within the database deadline; its failure as a reason.
async fn within<T>(
    ctx: &Context,
    f: impl std::future::Future<Output = crate::error::Result<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(ctx.db.deadline(), f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("database unavailable: no answer while resolving the query".into()),
    }
}

/// The dependencies' names, schema-qualified as PostgreSQL gives them.
fn names(res: &Resolution) -> Vec<String> {
    res.names.iter().map(|(_, n)| n.clone()).collect()
}

/// Each table of a resolution by name, with whether it reports its writes.
fn tables(ctx: &Context, res: &Resolution) -> Vec<(String, &'static str)> {
    res.tables
        .iter()
        .map(|oid| {
            let name = res
                .names
                .iter()
                .find(|(o, _)| o == oid)
                .map(|(_, n)| n.clone())
                .unwrap_or_else(|| oid.to_string());
            (name, ctx.invalidation.watch_state(*oid))
        })
        .collect()
}

/// Whether Valkey holds the entry now (`EXISTS`); `None` if Valkey did not say.
async fn cached(ctx: &Context, key: &str) -> Option<bool> {
    let req = encode_multibulk(&[
        Bytes::from_static(b"EXISTS"),
        Bytes::copy_from_slice(key.as_bytes()),
    ]);
    match ctx.upstream.call(req, key.as_bytes()).await {
        Ok(frame) if &frame[..] == b":1\r\n" => Some(true),
        Ok(frame) if &frame[..] == b":0\r\n" => Some(false),
        _ => None,
    }
}

/// `CACHEFRONT.QUERIES [COUNT n]`: every named query, then the `n` busiest SQL.CACHED texts
/// kept (all of them, at most `metrics.top_queries`, without `COUNT`), each with its reads,
/// fills, latencies, dependencies and how it is kept fresh.
pub fn queries(ctx: &Arc<Context>, req: &Request) -> Action {
    let count = match req.args.len() {
        1 => usize::MAX,
        3 if req.args[1].eq_ignore_ascii_case(b"COUNT") => match parse_i64_strict(&req.args[2]) {
            Some(n) if n >= 0 => n as usize,
            _ => return Action::Reply(Refusal::NotAnInteger.reply()),
        },
        _ => return Action::Reply(Refusal::Syntax.reply()),
    };
    let listed = listed(ctx, count);
    let ctx = Arc::clone(ctx);
    Action::Task(
        async move {
            let mut out = Vec::with_capacity(listed.len());
            for q in listed {
                let res = within(&ctx, ctx.invalidation.resolve(&ctx.db, &q.stats.sql)).await;
                out.push(q.reply(&ctx, res));
            }
            Reply::Array(out)
        }
        .boxed(),
    )
}

/// One query as `CACHEFRONT.QUERIES` and the metrics list it.
pub(super) struct Listed {
    pub(super) stats: Arc<QueryStats>,
    /// Whether it may be cached TTL-only (`ttl_only` on the query, `sql.ttl_only`).
    pub(super) ttl_only: bool,
    pub(super) row_keyed: bool,
}

/// Every named query (by name), then the `count` busiest SQL.CACHED texts.
pub(super) fn listed(ctx: &Context, count: usize) -> Vec<Listed> {
    let mut named: Vec<Arc<NamedQuery>> = ctx.named().values().cloned().collect();
    named.sort_by(|a, b| a.name.cmp(&b.name));
    let sql_ttl_only = ctx.config().sql.ttl_only;
    named
        .iter()
        .map(|q| Listed {
            stats: Arc::clone(&q.stats),
            ttl_only: q.ttl_only,
            row_keyed: q.row_key.is_some(),
        })
        .chain(
            ctx.top_queries
                .snapshot()
                .into_iter()
                .take(count)
                .map(|stats| Listed {
                    stats,
                    ttl_only: sql_ttl_only,
                    row_keyed: false,
                }),
        )
        .collect()
}

impl Listed {
    /// How its entries are kept fresh, from its resolution.
    pub(super) fn freshness(&self, res: &Result<Arc<Resolution>, String>) -> String {
        match res {
            Err(e) => format!("unresolved: {e}"),
            Ok(r) => match (&r.untrackable, self.ttl_only) {
                (Some(_), true) => "ttl-only".into(),
                (Some(why), false) => format!("refused: {why}"),
                (None, _) if self.row_keyed => "row-keyed".into(),
                (None, _) => "invalidated".into(),
            },
        }
    }

    fn reply(&self, ctx: &Context, res: Result<Arc<Resolution>, String>) -> Reply {
        let s = &self.stats;
        let text = |s: &str| Reply::text(s);
        let int = |v: u64| Reply::Int(v as i64);
        let quantile = |h: &Histogram, q: f64| h.quantile_us(q).map(int).unwrap_or(Reply::Nil);
        let (deps, last) = match &res {
            Ok(r) => (
                Reply::Array(names(r).iter().map(|n| text(n)).collect()),
                ctx.invalidation.last_invalidated(&r.deps),
            ),
            Err(_) => (Reply::Array(Vec::new()), None),
        };
        Reply::Map(vec![
            (text("query"), text(&s.label)),
            (text("command"), text(&s.command)),
            (text("sql"), text(&s.sql)),
            (text("hits"), int(s.hits.load(Relaxed))),
            (text("misses"), int(s.misses.load(Relaxed))),
            (text("errors"), int(s.errors.load(Relaxed))),
            (text("hit_ratio"), text(&format!("{:.4}", s.hit_ratio()))),
            (text("hit_p50_us"), quantile(&s.hit_latency, 0.5)),
            (text("hit_p99_us"), quantile(&s.hit_latency, 0.99)),
            (text("miss_p50_us"), quantile(&s.miss_latency, 0.5)),
            (text("miss_p99_us"), quantile(&s.miss_latency, 0.99)),
            (text("fills"), int(s.fills.load(Relaxed))),
            (text("fill_bytes"), int(s.fill_bytes.load(Relaxed))),
            (text("ttl_only_fills"), int(s.ttl_only_fills.load(Relaxed))),
            (text("dependencies"), deps),
            (text("freshness"), text(&self.freshness(&res))),
            (
                text("last_invalidation_ms"),
                last.map(int).unwrap_or(Reply::Nil),
            ),
        ])
    }
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// A per-query counter: its name (without `cachefront_` and `_total`), help, and value.
type Counter = (&'static str, &'static str, fn(&QueryStats) -> u64);

/// The per-query series for the Prometheus endpoint: one `query` label per named query and
/// per SQL.CACHED text kept (so at most `metrics.top_queries` + named queries series per
/// name). Dependencies are those already resolved: a scrape never asks PostgreSQL.
pub fn prometheus(ctx: &Context, out: &mut String) {
    let listed = listed(ctx, usize::MAX);
    let counters: [Counter; 6] = [
        (
            "query_hits",
            "Reads of the query answered by a lookup (L1 or Valkey)",
            |s| s.hits.load(Relaxed),
        ),
        (
            "query_misses",
            "Reads of the query answered by a fill",
            |s| s.misses.load(Relaxed),
        ),
        (
            "query_errors",
            "Reads of the query answered with an error",
            |s| s.errors.load(Relaxed),
        ),
        ("query_fills", "Entries of the query stored", |s| {
            s.fills.load(Relaxed)
        }),
        (
            "query_fill_bytes",
            "Bytes of the query's entries stored",
            |s| s.fill_bytes.load(Relaxed),
        ),
        (
            "query_ttl_only_fills",
            "Entries of the query stored TTL-only",
            |s| s.ttl_only_fills.load(Relaxed),
        ),
    ];
    for (name, help, value) in counters {
        let _ = writeln!(
            out,
            "# HELP cachefront_{name}_total {help}.\n# TYPE cachefront_{name}_total counter"
        );
        for q in &listed {
            let _ = writeln!(
                out,
                "cachefront_{name}_total{{query=\"{}\"}} {}",
                label(&q.stats.label),
                value(&q.stats)
            );
        }
    }
    let name = "cachefront_query_latency_seconds";
    let _ = writeln!(out, "# HELP {name} Latency of the query's reads, by result (hit, miss); quantiles are bucket upper bounds.\n# TYPE {name} summary");
    for q in &listed {
        let l = label(&q.stats.label);
        for (result, h) in [
            ("hit", &q.stats.hit_latency),
            ("miss", &q.stats.miss_latency),
        ] {
            for quantile in [0.5, 0.99] {
                let v = h
                    .quantile_us(quantile)
                    .map(|us| format!("{}", us as f64 / 1e6))
                    .unwrap_or_else(|| "NaN".into());
                let _ = writeln!(
                    out,
                    "{name}{{query=\"{l}\",result=\"{result}\",quantile=\"{quantile}\"}} {v}"
                );
            }
            let _ = writeln!(
                out,
                "{name}_sum{{query=\"{l}\",result=\"{result}\"}} {}",
                h.sum_us() as f64 / 1e6
            );
            let _ = writeln!(
                out,
                "{name}_count{{query=\"{l}\",result=\"{result}\"}} {}",
                h.count()
            );
        }
    }
    let known: Vec<(&Listed, Arc<Resolution>)> = listed
        .iter()
        .filter_map(|q| ctx.invalidation.known(&q.stats.sql).map(|r| (q, r)))
        .collect();
    let name = "cachefront_query_last_invalidation_timestamp_seconds";
    let _ = writeln!(out, "# HELP {name} When an invalidation of any of the query's dependencies was last applied (Unix time).\n# TYPE {name} gauge");
    for (q, r) in &known {
        if let Some(ms) = ctx.invalidation.last_invalidated(&r.deps) {
            let _ = writeln!(
                out,
                "{name}{{query=\"{}\"}} {}",
                label(&q.stats.label),
                ms as f64 / 1e3
            );
        }
    }
    let name = "cachefront_query_ttl_only";
    let _ = writeln!(out, "# HELP {name} 1 if the query's entries are kept TTL-only (PostgreSQL cannot track what it reads), 0 if invalidated on write.\n# TYPE {name} gauge");
    for (q, r) in &known {
        let v = u8::from(r.untrackable.is_some());
        let _ = writeln!(out, "{name}{{query=\"{}\"}} {v}", label(&q.stats.label));
    }
}
