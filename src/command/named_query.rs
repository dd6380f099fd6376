//! Named queries: `EMP.GET` and every `[[query]]` in config.toml — a command name bound to a
//! parameterised SQL statement, a key template, a TTL and a reply kind. Their definitions are
//! `cache::named`; this is the command: argument checks and the cached read.

use bytes::Bytes;
use smallvec::SmallVec;
use std::borrow::Cow;
use std::sync::Arc;

use super::fill::{plan, route, Source};
use super::Context;
use super::{wrong_args, Action};
pub use crate::cache::named::{NamedQuery, RowKey};
use crate::cache::{Deps, Entry};
use crate::config::ArgType;
use crate::error::Refusal;
use crate::protocol::request::parse_i64_strict;
use crate::protocol::Request;
use crate::session::Session;

/// Checks one argument against its declared type; returns its canonical text.
pub(super) fn validate(t: ArgType, raw: &Bytes) -> Option<Cow<'_, str>> {
    let s = std::str::from_utf8(raw).ok()?;
    if s.contains('\0') {
        return None;
    }
    match t {
        // The strict parse accepts only the canonical form, so the text itself is the value.
        ArgType::Int => parse_i64_strict(raw).map(|_| Cow::Borrowed(s)),
        ArgType::Float => s
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && !s.starts_with(['+', ' ']) && !s.ends_with(' '))
            .map(|_| Cow::Borrowed(s)),
        ArgType::Bool => match s.to_ascii_lowercase().as_str() {
            "true" | "t" | "1" | "yes" | "on" => Some(Cow::Borrowed("true")),
            "false" | "f" | "0" | "no" | "off" => Some(Cow::Borrowed("false")),
            _ => None,
        },
        ArgType::Text => Some(Cow::Borrowed(s)),
    }
}

pub fn dispatch(
    ctx: &Arc<Context>,
    session: &Session,
    q: &Arc<NamedQuery>,
    req: &Request,
) -> Action {
    if req.args.len() != q.args.len() + 1 {
        return Action::Reply(wrong_args(req));
    }
    // Borrowed from the request and kept inline: a hit allocates nothing for them.
    let mut args: SmallVec<[Cow<'_, str>; 4]> = SmallVec::new();
    for (i, (t, raw)) in q.args.iter().zip(&req.args[1..]).enumerate() {
        match validate(*t, raw) {
            Some(v) => args.push(v),
            None => return Action::Reply(q.invalid_arg(i, raw).reply()),
        }
    }
    q.key.with_rendered(&args, |key| {
        if !session.user.key_allowed(key.as_bytes()) {
            return Action::Reply(Refusal::NoPermKey.reply());
        }
        read(ctx, session, q, key, &args)
    })
}

/// Reads the entry `key` of `q` with `args` (validated, allowed): from the cache, or through
/// its fill.
fn read(
    ctx: &Arc<Context>,
    session: &Session,
    q: &Arc<NamedQuery>,
    key: &str,
    args: &[Cow<'_, str>],
) -> Action {
    let kind = q.reply;
    let client = (session.proto, super::fill::shared_lane(session));
    let stats = Some(Arc::clone(&q.stats));
    route(ctx, session, key, kind, stats, |key| {
        // Arguments stay borrowed on the hit path; a miss copies them into its plan.
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let entry = Entry {
            key,
            ttl: ctx.cache.jittered_ttl(q.ttl),
            deps: Deps::default(),
        };
        let source = Source::Named {
            query: Arc::clone(q),
            args,
        };
        plan(ctx, entry, source, kind, client, Some(Arc::clone(&q.stats)))
    })
}
