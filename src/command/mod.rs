//! Commands: each family parses its own arguments and says what the connection should do.
//!
//! `dispatch` never blocks: it returns an [`Action`] — a reply now, a command to forward, a
//! cached lookup, or a task — and the connection keeps replies in request order.

pub mod connection_cmds;
pub mod context;
pub mod fill;
pub mod introspection;
pub mod named_query;
pub mod passthrough;
pub mod queries;
pub mod read_after;
pub mod sql_cached;
pub mod sql_invalidate;
pub mod status;
pub mod table;

use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;

use crate::acl;
use crate::config::{Config, ConfigError};
use crate::error::Refusal;
use crate::protocol::{Reply, Request};
use crate::session::Session;
pub use context::{Context, LiveParts, LiveView};
pub use passthrough::{Route, StateChange, Transform};

/// What the connection does with one request.
pub enum Action {
    /// Reply now.
    Reply(Reply),
    /// Reply, then close the connection (QUIT).
    Close(Reply),
    /// Send to Valkey; the reply goes back (transformed if asked).
    Forward {
        req: Request,
        route: Route,
        transform: Transform,
    },
    /// A cached command's read, as the cache began it: answered from the L1, a lookup to send
    /// to Valkey (in request order) and hand back to `Cache::finish`, or a fill to run; with
    /// the query's figures, which count it (`CACHEFRONT.QUERIES`).
    Read(
        crate::cache::read::Begin,
        Option<Arc<crate::metrics::QueryStats>>,
    ),
    /// Local work that needs to await (database, cachefront's own Valkey writes).
    Task(BoxFuture<'static, Reply>),
    /// `RESET`: drop upstream state and the dedicated connection.
    Reset,
    /// A permission check that needs Valkey (its command table, `COMMAND GETKEYS`): await the
    /// verdict, then run `req` through [`dispatch_checked`] — or reply the refusal.
    Check {
        req: Request,
        verdict: BoxFuture<'static, crate::acl::Check>,
    },
}

/// Whether `name` is one of cachefront's own commands, which a named query may not take
/// (Valkey's names cannot be taken either: a named query's name has a dot).
pub fn is_reserved_name(name: &str) -> bool {
    table::own(name.to_ascii_uppercase().as_bytes()).is_some()
}

/// The named queries' checks that need more than the config's own data: a name that is not
/// one of cachefront's own commands, then their SQL and key (`cache::named::check`). An
/// error names the query, as `Config::validate` does.
pub fn check_queries(config: &Config) -> Result<(), ConfigError> {
    for (i, q) in config.queries.iter().enumerate() {
        let invalid = |msg| ConfigError::Invalid {
            key: format!("query[{i}] ({})", q.command),
            msg,
        };
        if is_reserved_name(&q.command) {
            return Err(invalid(format!(
                "command {} is a built-in command",
                q.command
            )));
        }
        crate::cache::named::check(q).map_err(invalid)?;
    }
    Ok(())
}

/// A command's name uppercased on the stack (names are short; longer ones are never ours, and
/// read as empty): made once per request, for every step that tells commands apart.
struct Upper {
    buf: [u8; 32],
    len: usize,
}

impl Upper {
    fn of(req: &Request) -> Upper {
        let name = req.name();
        let mut buf = [0u8; 32];
        let len = match buf.get_mut(..name.len()) {
            Some(to) => {
                to.copy_from_slice(name);
                to.make_ascii_uppercase();
                name.len()
            }
            None => 0,
        };
        Upper { buf, len }
    }

    fn name(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// `ERR wrong number of arguments for '<cmd>' command`, Valkey's wording.
pub fn wrong_args(req: &Request) -> Reply {
    Refusal::WrongArity(req.name_lossy().to_ascii_lowercase()).reply()
}

/// Decides what to do with `req`: authentication and permissions first, as Valkey does.
/// `live`: the configuration in force, as the connection last saw it (see `LiveView`).
pub fn dispatch(
    ctx: &Arc<Context>,
    live: &LiveParts,
    session: &mut Session,
    req: Request,
) -> Action {
    let upper = Upper::of(&req);
    let name = upper.name();
    if !session.authed && !connection_cmds::allowed_before_auth(name) {
        return Action::Reply(Refusal::NoAuth.reply());
    }
    let config = live.config();
    if config
        .auth
        .deny_commands
        .iter()
        .any(|d| d.as_bytes().eq_ignore_ascii_case(name))
    {
        return Action::Reply(acl::noperm_command(
            &session.user.name,
            &req.name_lossy().to_ascii_lowercase(),
        ));
    }
    // Any client's command that names a key under cachefront's own prefix is checked, so no
    // client can write cachefront's metadata (invalidation depends on it).
    let meta = acl::meta_guard(config.cache.meta_prefix.as_bytes(), &req.args);
    // AUTH, HELLO, QUIT and RESET are open to every user, as in Valkey.
    if (!session.user.unrestricted() || meta.is_some())
        && !connection_cmds::allowed_before_auth(name)
    {
        match permission(ctx, live, session, name, &req, meta) {
            acl::Check::Allow => {}
            acl::Check::Deny(r) => {
                if session.in_multi {
                    session.multi_failed = true;
                }
                return Action::Reply(r);
            }
            acl::Check::Ask => {
                let verdict = acl::resolve(
                    UpstreamOf(Arc::clone(ctx)),
                    meta.map(<[u8]>::to_vec),
                    Arc::clone(&session.user),
                    session.id,
                    req.clone(),
                )
                .boxed();
                return Action::Check { req, verdict };
            }
        }
    }
    dispatch_named(ctx, live, session, name, req)
}

/// The Valkey client inside the context, for the permission checks that must ask Valkey
/// (they know the upstream layer, not the commands).
#[derive(Clone)]
struct UpstreamOf(Arc<Context>);

impl std::ops::Deref for UpstreamOf {
    type Target = crate::upstream::Upstream;
    fn deref(&self) -> &crate::upstream::Upstream {
        &self.0.upstream
    }
}

/// The user's permission for `req`. cachefront's own commands are checked here (their key
/// when they have computed it); Valkey's against Valkey's command table.
fn permission(
    ctx: &Arc<Context>,
    live: &LiveParts,
    session: &Session,
    name: &[u8],
    req: &Request,
    meta: Option<&[u8]>,
) -> acl::Check {
    let argc = req.args.len();
    let own: Option<(String, &[&str], bool)> = match table::own(name) {
        Some(c) => Some((c.name.to_ascii_lowercase(), c.categories, c.arity_ok(argc))),
        None => live.named().get(name).map(|q| {
            (
                q.name.to_ascii_lowercase(),
                table::NAMED_QUERY_CATEGORIES,
                argc == q.args.len() + 1,
            )
        }),
    };
    match own {
        // A wrong arity is answered first, as Valkey does.
        Some((_, _, false)) => acl::Check::Allow,
        Some((full, cats, true)) => {
            if session.user.command_allowed(&full, cats) {
                acl::Check::Allow
            } else {
                acl::Check::Deny(acl::noperm_command(&session.user.name, &full))
            }
        }
        None => {
            let table = ctx.upstream.command_table_now();
            acl::check(table.as_deref(), &session.user, &req.args, meta)
        }
    }
}

/// Decides what to do with `req` once it may run.
pub fn dispatch_checked(
    ctx: &Arc<Context>,
    live: &LiveParts,
    session: &mut Session,
    req: Request,
) -> Action {
    let upper = Upper::of(&req);
    dispatch_named(ctx, live, session, upper.name(), req)
}

/// [`dispatch_checked`] with the name already uppercased.
fn dispatch_named(
    ctx: &Arc<Context>,
    live: &LiveParts,
    session: &mut Session,
    name: &[u8],
    req: Request,
) -> Action {
    if session.streaming() {
        return passthrough::in_subscribed_mode(ctx, session, name, req);
    }
    if session.in_multi {
        ctx.cache.l1.note_command(name, &req.args);
        return passthrough::in_transaction(ctx, session, name, req);
    }
    if let Some(c) = table::own(name) {
        return match c.arity_ok(req.args.len()) {
            true => (c.run)(ctx, session, &req),
            false => Action::Reply(wrong_args(&req)),
        };
    }
    match name {
        b"PING" | b"ECHO" | b"HELLO" | b"AUTH" | b"QUIT" | b"RESET" | b"SELECT" => {
            connection_cmds::dispatch(ctx, session, name, req)
        }
        b"CLIENT" => connection_cmds::client(ctx, session, req),
        b"ACL" => connection_cmds::acl(session, &req),
        b"COMMAND" => introspection::command(ctx, session, req),
        b"INFO" => introspection::info(ctx, session, req),
        // Named queries are namespaced (`EMP.GET`): a name without a dot is never one.
        _ => match name
            .contains(&b'.')
            .then(|| live.named().get(name))
            .flatten()
        {
            Some(q) => named_query::dispatch(ctx, session, q, &req),
            None => {
                ctx.cache.l1.note_command(name, &req.args);
                passthrough::dispatch(session, name, req, ctx.upstream.cluster.is_some())
            }
        },
    }
}

#[cfg(test)]
mod tests {
    //! `dispatch` with a context built from the default configuration: nothing connects (the
    //! addresses refuse connections), so these run with no server.

    use super::*;
    use crate::cache::read::Begin;
    use crate::protocol::Proto;

    /// A context whose Valkey and PostgreSQL are nowhere (port 1 refuses).
    fn context(tweak: impl FnOnce(&mut Config)) -> Arc<Context> {
        let mut config = Config::default();
        config.valkey.url = "redis://127.0.0.1:1".into();
        config.postgres.url = "postgres://cachefront@127.0.0.1:1/none".into();
        tweak(&mut config);
        Arc::new(Context::new(config).expect("context"))
    }

    fn session(ctx: &Context) -> Session {
        let user = Arc::clone(ctx.users.default_user());
        Session::new(1, "test".into(), user, ctx.users.default_authed())
    }

    fn run(ctx: &Arc<Context>, session: &mut Session, args: &[&[u8]]) -> Action {
        let live = ctx.live.view().load().clone();
        dispatch(
            ctx,
            &live,
            session,
            Request::from_args(args.iter().copied()),
        )
    }

    /// The reply of an action that must be answered at once.
    fn reply(action: Action) -> Reply {
        match action {
            Action::Reply(r) => r,
            _ => panic!("expected a reply now"),
        }
    }

    fn arity(name: &str) -> Reply {
        Refusal::WrongArity(name.into()).reply()
    }

    #[tokio::test]
    async fn nothing_but_auth_before_auth() {
        let ctx = context(|c| c.auth.requirepass = "secret".into());
        let mut s = session(&ctx);
        for args in [&[&b"GET"[..], b"k"][..], &[b"EMP.GET", b"1"], &[b"PING"]] {
            assert_eq!(reply(run(&ctx, &mut s, args)), Refusal::NoAuth.reply());
        }
        assert!(!matches!(
            run(&ctx, &mut s, &[b"AUTH", b"wrong"]),
            Action::Forward { .. }
        ));
    }

    #[tokio::test]
    async fn own_commands_check_their_arity() {
        let ctx = context(|_| {});
        let mut s = session(&ctx);
        assert_eq!(
            reply(run(&ctx, &mut s, &[b"SQL.CACHED"])),
            arity("sql.cached")
        );
        assert_eq!(reply(run(&ctx, &mut s, &[b"emp.get"])), arity("emp.get"));
        assert_eq!(
            reply(run(&ctx, &mut s, &[b"EMP.GET", b"1", b"2"])),
            arity("emp.get")
        );
    }

    #[tokio::test]
    async fn sql_cached_refusals() {
        let off = context(|c| c.sql.mode = crate::config::SqlMode::Off);
        let mut s = session(&off);
        let select: &[&[u8]] = &[b"SQL.CACHED", b"SELECT 1"];
        assert_eq!(reply(run(&off, &mut s, select)), Refusal::SqlOff.reply());

        let ctx = context(|_| {});
        let mut s = session(&ctx);
        let delete: &[&[u8]] = &[b"SQL.CACHED", b"DELETE FROM employees"];
        assert_eq!(
            reply(run(&ctx, &mut s, delete)),
            Refusal::NotReadOnly.reply()
        );
        let ex: &[&[u8]] = &[b"SQL.CACHED", b"SELECT 1", b"EX", b"0"];
        assert_eq!(reply(run(&ctx, &mut s, ex)), Refusal::InvalidExpire.reply());
    }

    #[tokio::test]
    async fn a_named_query_refuses_a_bad_argument() {
        let ctx = context(|_| {});
        let mut s = session(&ctx);
        let named = ctx.named();
        let q = named.get(&b"EMP.GET"[..]).expect("the built-in EMP.GET");
        let bad = reply(run(&ctx, &mut s, &[b"EMP.GET", b"abc"]));
        assert_eq!(bad, q.invalid_arg(0, b"abc").reply());
        assert!(bad.is_error());
    }

    /// A cached command on a cold cache starts its read: a lookup to send, nothing sent yet.
    #[tokio::test]
    async fn a_named_query_begins_a_lookup() {
        let ctx = context(|_| {});
        let mut s = session(&ctx);
        match run(&ctx, &mut s, &[b"EMP.GET", b"1"]) {
            Action::Read(Begin::Lookup(l), _) => {
                assert!(l.request.starts_with(b"*2\r\n$3\r\nGET\r\n"));
                assert_eq!(l.pending.proto(), Proto::Resp2);
            }
            _ => panic!("expected a lookup"),
        }
    }

    /// Inside MULTI, cachefront's own commands cannot be queued in Valkey: refused, and the
    /// EXEC that follows aborts.
    #[tokio::test]
    async fn own_commands_are_refused_in_multi() {
        let ctx = context(|_| {});
        let mut s = session(&ctx);
        s.in_multi = true;
        for (args, name) in [
            (&[&b"SQL.CACHED"[..], b"SELECT 1"][..], "SQL.CACHED"),
            (&[b"EMP.GET", b"1"], "EMP.GET"),
        ] {
            s.multi_failed = false;
            let r = reply(run(&ctx, &mut s, args));
            assert_eq!(r, Refusal::NotInMulti(name.into()).reply());
            assert!(s.multi_failed, "{name} aborts the EXEC");
        }
    }

    #[tokio::test]
    async fn a_plain_get_is_forwarded() {
        let ctx = context(|_| {});
        let mut s = session(&ctx);
        match run(&ctx, &mut s, &[b"get", b"k"]) {
            Action::Forward {
                req,
                route,
                transform,
            } => {
                assert_eq!(req.args.len(), 2);
                assert!(route == Route::Any && transform == Transform::None);
            }
            _ => panic!("expected a forward"),
        }
    }
}
