//! `SQL.CACHED <query> [EX <seconds>] [PARAMS <p>…]`: the guide's query result caching as a
//! command — the result as a JSON array of rows, under the SHA-256 of the query text.

use bytes::Bytes;
use futures::FutureExt;
use std::sync::Arc;

use super::fill::{plan, route, Source};
use super::Context;
use super::{wrong_args, Action};
use crate::cache::key::sql_key;
use crate::cache::{Deps, Entry};
use crate::config::{ReplyKind, SqlMode};
use crate::db::sql::{check_read_only, SqlError};
use crate::error::Refusal;
use crate::protocol::request::parse_i64_strict;
use crate::protocol::{Reply, Request};
use crate::session::Session;

pub(super) struct Parsed {
    pub query: Bytes,
    pub ttl: Option<u64>,
    pub params: Vec<String>,
}

pub(super) fn parse(req: &Request) -> Result<Parsed, Reply> {
    // The arity is checked before dispatch (`command::table`); this only keeps it total.
    let Some(query) = req.args.get(1) else {
        return Err(wrong_args(req));
    };
    let mut p = Parsed {
        query: query.clone(),
        ttl: None,
        params: Vec::new(),
    };
    let mut i = 2;
    while i < req.args.len() {
        let opt = &req.args[i];
        if opt.eq_ignore_ascii_case(b"EX") && p.ttl.is_none() {
            let secs = req
                .args
                .get(i + 1)
                .and_then(|s| parse_i64_strict(s))
                .filter(|&s| s > 0)
                .ok_or_else(|| Refusal::InvalidExpire.reply())?;
            p.ttl = Some(secs as u64);
            i += 2;
        } else if opt.eq_ignore_ascii_case(b"PARAMS") {
            for raw in &req.args[i + 1..] {
                let s = std::str::from_utf8(raw)
                    .ok()
                    .filter(|s| !s.contains('\0'))
                    .ok_or_else(|| Refusal::ParamsNotUtf8.reply())?;
                p.params.push(s.to_string());
            }
            i = req.args.len();
        } else {
            return Err(Refusal::Syntax.reply());
        }
    }
    Ok(p)
}

pub fn dispatch(ctx: &Arc<Context>, session: &Session, req: &Request) -> Action {
    let config = ctx.config();
    let cfg = &config.sql;
    if cfg.mode == SqlMode::Off {
        return Action::Reply(Refusal::SqlOff.reply());
    }
    let p = match parse(req) {
        Ok(p) => p,
        Err(r) => return Action::Reply(r),
    };
    if p.query.len() > cfg.max_sql_bytes {
        return Action::Reply(Refusal::QueryTooLong(cfg.max_sql_bytes).reply());
    }
    let Ok(sql) = std::str::from_utf8(&p.query) else {
        return Action::Reply(Refusal::QueryNotUtf8.reply());
    };
    if cfg.mode == SqlMode::Allowlist && !cfg.allowlist.iter().any(|a| a == sql) {
        return Action::Reply(Refusal::NotAllowlisted.reply());
    }
    let checked = ctx
        .sql_checks
        .get_with_by_ref(sql, || check_read_only(sql).map(|_| ()));
    match checked {
        Ok(()) => {}
        Err(SqlError::NotReadOnly(why)) => {
            tracing::debug!(reason = %why, "SQL.CACHED refused");
            return Action::Reply(Refusal::NotReadOnly.reply());
        }
        Err(SqlError::Parse(why)) => return explain_parse_failure(ctx, sql.to_string(), why),
    }
    let key = sql_key(&cfg.key_prefix, &p.query, &p.params);
    if !session.user.key_allowed(key.as_bytes()) {
        return Action::Reply(Refusal::NoPermKey.reply());
    }
    let ttl = p.ttl.unwrap_or(config.cache.default_ttl);
    // Counted among the busiest texts (a known text: a hash and a compare, no allocation).
    let stats = ctx.top_queries.entry(sql, || sql_label(sql));
    let plan_stats = stats.clone();
    route(ctx, session, &key, ReplyKind::Json, stats, |key| {
        let entry = Entry {
            key,
            ttl: ctx.cache.jittered_ttl(ttl),
            deps: Deps::default(),
        };
        let source = Source::Sql {
            sql: sql.to_string(),
            params: p.params,
        };
        plan(
            ctx,
            entry,
            source,
            ReplyKind::Json,
            (session.proto, super::fill::shared_lane(session)),
            plan_stats,
        )
    })
}

/// The label of an SQL.CACHED text in `CACHEFRONT.QUERIES` and the per-query metrics:
/// `sql:` and the first 12 hex digits of the SHA-256 of the text — the start of its key
/// without parameters (and without `sql.key_prefix`).
pub fn sql_label(sql: &str) -> String {
    let hex = sql_key("", sql.as_bytes(), &[] as &[&[u8]]);
    format!("sql:{}", &hex[..12])
}

/// Our parser could not read the query. PostgreSQL's own error is the most useful answer for
/// a typo; if PostgreSQL can parse it, we still refuse (we could not tell what it reads).
fn explain_parse_failure(ctx: &Arc<Context>, sql: String, why: String) -> Action {
    let ctx = Arc::clone(ctx);
    Action::Task(
        async move {
            match ctx.db.prepare_only(&sql).await {
                // Several statements: PostgreSQL says so (42601); the SPEC's answer is ours.
                Err(e) if e.to_string().contains("cannot insert multiple commands") => {
                    Refusal::NotReadOnly.reply()
                }
                Err(e) => crate::error::Error::from(e).to_reply(),
                Ok(()) => Refusal::NotAnalysable(why).reply(),
            }
        }
        .boxed(),
    )
}
