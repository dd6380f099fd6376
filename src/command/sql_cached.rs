//! `SQL.CACHED <query> [EX <seconds>] [PARAMS <p>…]`: the guide's query result caching as a
//! command — the result as a JSON array of rows, under the SHA-256 of the query text.

use bytes::Bytes;
use futures::FutureExt;
use std::sync::Arc;

use super::fill::{plan, route, Source};
use super::Context;
use super::{wrong_args, Action};
use crate::cache::key::SqlText;
use crate::cache::{Deps, Entry};
use crate::config::{ReplyKind, SqlMode};
use crate::db::sql::{check_read_only, SqlError, Verdict};
use crate::error::Refusal;
use crate::protocol::request::parse_i64_strict;
use crate::protocol::{Reply, Request};
use crate::session::Session;

/// What is known of an `SQL.CACHED` text once seen: whether it may run, and the text hashed
/// for its keys.
#[derive(Clone)]
pub struct Seen {
    verdict: Verdict,
    text: Arc<SqlText>,
}

impl Seen {
    fn of(sql: &str) -> Seen {
        Seen {
            verdict: check_read_only(sql).map(|_| ()),
            text: Arc::new(SqlText::new(sql.as_bytes())),
        }
    }

    fn size(&self) -> usize {
        let why = match &self.verdict {
            Ok(()) => 0,
            Err(SqlError::Parse(why) | SqlError::NotReadOnly(why)) => why.len(),
        };
        why + self.text.size()
    }
}

/// The texts seen, by text (see [`text_cache`]).
pub type Texts = moka::sync::Cache<String, Seen, foldhash::fast::RandomState>;

/// Bytes of query text (and what is known of each) [`text_cache`] keeps: a hit need not be
/// parsed or hashed again, and distinct texts from clients cannot grow it past this — by
/// count alone, 10,000 texts of `sql.max_sql_bytes` (64 KiB) would be 640 MiB.
pub const TEXT_CACHE_BYTES: u64 = 16 << 20;

/// The texts seen, bounded in bytes by [`TEXT_CACHE_BYTES`] (moka evicts the least useful
/// first). Looked up on every `SQL.CACHED`: foldhash, seeded per process, not SipHash.
pub fn text_cache() -> Texts {
    moka::sync::Cache::builder()
        .max_capacity(TEXT_CACHE_BYTES)
        .weigher(|sql: &String, seen: &Seen| {
            u32::try_from(sql.len() + seen.size() + 64).unwrap_or(u32::MAX)
        })
        .build_with_hasher(foldhash::fast::RandomState::default())
}

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
    let seen = ctx.sql_checks.get_with_by_ref(sql, || Seen::of(sql));
    match seen.verdict {
        Ok(()) => {}
        Err(SqlError::NotReadOnly(why)) => {
            tracing::debug!(reason = %why, "SQL.CACHED refused");
            return Action::Reply(Refusal::NotReadOnly.reply());
        }
        Err(SqlError::Parse(why)) => return explain_parse_failure(ctx, sql.to_string(), why),
    }
    let key = seen.text.key(&cfg.key_prefix, &p.params);
    if !session.user.key_allowed(key.as_bytes()) {
        return Action::Reply(Refusal::NoPermKey.reply());
    }
    let ttl = p.ttl.unwrap_or(config.cache.default_ttl);
    // Counted among the busiest texts (a known text: a hash and a compare, no allocation).
    let stats = ctx.top_queries.entry(sql, || label(seen.text.digest()));
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
/// `sql:` and the first 12 hex digits of the SHA-256 of the text (`digest`) — the start of
/// its key without parameters (and without `sql.key_prefix`).
fn label(digest: &str) -> String {
    format!("sql:{}", &digest[..12])
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Distinct long texts cannot grow the text cache past its byte bound.
    #[test]
    fn the_text_cache_is_bounded_in_bytes() {
        let cache = text_cache();
        let padding = "x".repeat(64 * 1024);
        for i in 0..1000 {
            let sql = format!("SELECT {i} -- {padding}");
            cache.insert(sql.clone(), Seen::of(&sql));
        }
        cache.run_pending_tasks();
        assert!(cache.weighted_size() <= TEXT_CACHE_BYTES);
        assert!(cache.entry_count() < 1000);
    }

    /// A text seen once keys its entries as the key scheme says, with or without parameters.
    #[test]
    fn a_seen_text_keys_as_the_scheme_says() {
        let sql = "SELECT name FROM employees WHERE id = $1";
        let seen = Seen::of(sql);
        assert!(seen.verdict.is_ok());
        let key = crate::cache::key::sql_key;
        assert_eq!(
            seen.text.key("p:", &["4"]),
            key("p:", sql.as_bytes(), &["4"])
        );
        assert_eq!(
            seen.text.key("", &[] as &[&str]),
            key("", sql.as_bytes(), &[] as &[&str])
        );
        assert_eq!(
            label(seen.text.digest()),
            format!("sql:{}", &seen.text.digest()[..12])
        );
    }
}
