//! `CACHEFRONT.AFTER <lsn> [TIMEOUT <ms>]`: read-your-writes for a connection. An application
//! that has just committed a write reads `SELECT pg_current_wal_lsn()` (or
//! `pg_current_wal_insert_lsn()`) and passes it; from then on this connection's cached reads
//! (named queries, `SQL.CACHED`) answer only once every invalidation committed up to that
//! position has been applied to Valkey by the fleet — waiting for it at most the timeout,
//! then refused with `-TRYAGAIN` (see `invalidation::applied` for the guarantee).

use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;
use std::time::Duration;

use super::{Action, Context};
use crate::config::MAX_READ_AFTER_TIMEOUT_MS;
use crate::db::replicas::{format_lsn, parse_lsn};
use crate::error::{Refusal, Result};
use crate::protocol::request::parse_i64_strict;
use crate::protocol::{Reply, Request};
use crate::session::{ReadAfter, Session};

/// Sets (raises) the connection's floor. A floor is never lowered — a connection may carry
/// several writers' tokens — until `RESET`; `TIMEOUT` replaces the wait bound.
pub fn dispatch(ctx: &Arc<Context>, session: &mut Session, req: &Request) -> Action {
    if !ctx.config().invalidation.enabled {
        return Action::Reply(Refusal::AfterWithoutInvalidation.reply());
    }
    let Some(raw) = req.args.get(1) else {
        return Action::Reply(super::wrong_args(req));
    };
    let Some(lsn) = parse_token(raw) else {
        let shown: String = String::from_utf8_lossy(raw).chars().take(64).collect();
        return Action::Reply(Refusal::InvalidLsn(shown).reply());
    };
    let timeout_ms = match &req.args[2..] {
        [] => session.read_after.and_then(|a| a.timeout_ms),
        [opt, ms] if opt.eq_ignore_ascii_case(b"TIMEOUT") => {
            match parse_i64_strict(ms)
                .and_then(|ms| u64::try_from(ms).ok())
                .filter(|&ms| ms <= MAX_READ_AFTER_TIMEOUT_MS)
            {
                Some(ms) => Some(ms),
                None => {
                    return Action::Reply(
                        Refusal::InvalidAfterTimeout(MAX_READ_AFTER_TIMEOUT_MS).reply(),
                    )
                }
            }
        }
        _ => return Action::Reply(Refusal::Syntax.reply()),
    };
    let lsn = session.read_after.map_or(lsn, |a| a.lsn.max(lsn));
    session.read_after = Some(ReadAfter { lsn, timeout_ms });
    Action::Reply(Reply::ok())
}

/// A WAL position as PostgreSQL writes it (`16/B374D848`): one to eight hex digits on each
/// side of the slash, nothing else.
fn parse_token(raw: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(raw).ok()?;
    let (hi, lo) = text.split_once('/')?;
    let part_ok = |p: &str| (1..=8).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_hexdigit());
    if !(part_ok(hi) && part_ok(lo)) {
        return None;
    }
    parse_lsn(text)
}

/// What a read under `after` waits for before it reads: every invalidation committed up to
/// its position applied, within its bound; past it, `-TRYAGAIN`.
pub(super) fn ready(ctx: &Arc<Context>, after: ReadAfter) -> BoxFuture<'static, Result<()>> {
    let ms = after
        .timeout_ms
        .unwrap_or(ctx.config().invalidation.read_after_timeout_ms);
    let ctx = Arc::clone(ctx);
    async move {
        if ctx
            .invalidation
            .wait_applied(after.lsn, Duration::from_millis(ms))
            .await
        {
            Ok(())
        } else {
            Err(Refusal::NotAppliedYet(format_lsn(after.lsn), ms).into())
        }
    }
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert_eq!(parse_token(b"0/16B3748"), Some(0x16B_3748));
        assert_eq!(parse_token(b"16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(parse_token(b"FFFFFFFF/FFFFFFFF"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"0",
            b"/1",
            b"1/",
            b"+1/1",
            b"1/ 1",
            b" 1/1",
            b"1/1/1",
            b"123456789/0",
            b"g/0",
            b"0x1/0",
            b"\xff/0",
        ] {
            assert_eq!(parse_token(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
