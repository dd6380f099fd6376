//! Commands cachefront does not serve itself, and how each must travel to Valkey.
//!
//! Stateless commands share pipelined connections. Commands that leave state on the Valkey
//! connection, or block it, need a connection of the client's own; the connection layer keeps
//! it while the session says the state lasts.

use bytes::Bytes;
use std::sync::Arc;

use super::Context;
use super::{introspection, Action};
use crate::error::Refusal;
use crate::protocol::{Proto, Reply, Request};
use crate::session::Session;
use crate::upstream::SCRIPT_COMMANDS;

/// Which connection a forwarded command takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// The client's dedicated connection if it holds one, else a shared one.
    Any,
    /// A dedicated connection (acquired if needed), applying this change to the session.
    Dedicated(StateChange),
    /// A dedicated connection logged in as the client's Valkey ACL twin ([`crate::acl::Mirror`]):
    /// a restricted user's command that reaches keys no argument names (scripts, SORT BY/GET).
    AsUser,
}

pub use crate::session::StateChange;

/// What to do with Valkey's reply before it reaches the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transform {
    None,
    /// EXEC after a refused command: Valkey ran DISCARD; the client sees EXECABORT.
    ExecAbort,
    /// INFO: append the `# Cachefront` section.
    Info,
    /// `COMMAND` / `COMMAND INFO` with no names: append cachefront's entries.
    CommandAll,
    /// `COMMAND COUNT`: add cachefront's commands.
    CommandCount,
    /// `COMMAND INFO names…`: fill in the entries Valkey does not know (positions given).
    CommandInfo(Vec<Option<String>>),
    /// `COMMAND DOCS [names…]`: append docs of cachefront's commands among `names` (all if empty).
    CommandDocs(Vec<String>),
    /// `COMMAND LIST`: append cachefront's command names.
    CommandList,
    /// The client gets these bytes (cachefront's own reply, encoded) unless Valkey refused
    /// the command: `HELLO` forwarded to switch the dedicated connection's protocol.
    Replace(Bytes),
    /// Ran as this user's Valkey ACL twin: Valkey's refusals name the twin; the client sees
    /// its own user name, as Valkey would show it.
    AsUser(String),
}

impl Transform {
    /// Applies the transform to Valkey's reply (or failure).
    pub fn apply(
        &self,
        ctx: &Arc<Context>,
        proto: Proto,
        reply: crate::error::Result<Bytes>,
    ) -> Reply {
        match (self, reply) {
            (Transform::Info, r) => introspection::merge_info(ctx, proto, r),
            (_, Err(e)) => e.to_reply(),
            (Transform::None, Ok(raw)) => Reply::Raw(raw),
            (Transform::Replace(_), Ok(raw)) if matches!(raw.first(), Some(b'-') | Some(b'!')) => {
                Reply::Raw(raw)
            }
            (Transform::Replace(ours), Ok(_)) => Reply::Raw(ours.clone()),
            (Transform::AsUser(user), Ok(raw)) => Reply::Raw(untwin(user, raw)),
            (Transform::ExecAbort, Ok(_)) => Refusal::ExecAbort.reply(),
            (t, Ok(raw)) => introspection::merge_command(ctx, proto, t, raw),
        }
    }
}

/// Valkey's error naming the twin of `user`, with `user` instead.
fn untwin(user: &str, raw: Bytes) -> Bytes {
    let twin = crate::acl::mirror_name(user);
    if raw.first() != Some(&b'-') || !raw.windows(twin.len()).any(|w| w == twin.as_bytes()) {
        return raw;
    }
    Bytes::from(
        String::from_utf8_lossy(&raw)
            .replace(&twin, user)
            .into_bytes(),
    )
}

/// Commands that can block the connection they run on.
const BLOCKING: &[&[u8]] = &[
    b"BLPOP",
    b"BRPOP",
    b"BRPOPLPUSH",
    b"BLMOVE",
    b"BLMPOP",
    b"BZPOPMIN",
    b"BZPOPMAX",
    b"BZMPOP",
    b"WAIT",
    b"WAITAOF",
];

const SUBSCRIBE_FAMILY: &[&[u8]] = &[
    b"SUBSCRIBE",
    b"PSUBSCRIBE",
    b"SSUBSCRIBE",
    b"UNSUBSCRIBE",
    b"PUNSUBSCRIBE",
    b"SUNSUBSCRIBE",
];

fn forward(req: Request, route: Route) -> Action {
    Action::Forward {
        req,
        route,
        transform: Transform::None,
    }
}

fn has_block_option(req: &Request) -> bool {
    req.args
        .iter()
        .skip(1)
        .take_while(|a| !a.eq_ignore_ascii_case(b"STREAMS"))
        .any(|a| a.eq_ignore_ascii_case(b"BLOCK"))
}

/// Routes a pass-through command (name already uppercased) in normal mode.
/// `cluster`: the upstream is a Valkey Cluster.
pub fn dispatch(session: &Session, name: &[u8], req: Request, cluster: bool) -> Action {
    let route = match name {
        b"MULTI" => Route::Dedicated(StateChange::Multi),
        b"WATCH" => Route::Dedicated(StateChange::Watch),
        b"UNWATCH" if session.watching => Route::Dedicated(StateChange::Unwatch),
        b"EXEC" | b"DISCARD" if session.watching => Route::Dedicated(StateChange::None),
        b"MONITOR" => Route::Dedicated(StateChange::Monitor),
        b"READONLY" | b"READWRITE" | b"ASKING" => Route::Dedicated(StateChange::Pin),
        b"XREAD" | b"XREADGROUP" if has_block_option(&req) => Route::Dedicated(StateChange::None),
        b"SYNC" | b"PSYNC" | b"REPLCONF" => return Action::Reply(Refusal::Replication.reply()),
        n if SUBSCRIBE_FAMILY.contains(&n) => Route::Dedicated(StateChange::Subscribe),
        n if BLOCKING.contains(&n) => Route::Dedicated(StateChange::None),
        // Valkey answers them while a script runs; a shared connection may be the one the
        // script holds.
        b"SCRIPT" | b"FUNCTION" if is_kill(&req) => Route::Dedicated(StateChange::None),
        // A script may run long: on the client's own connection it holds up nobody else's
        // requests (on a shared one, everything queued behind it would wait too). The client
        // keeps that connection, as it would have one of its own on Valkey: handing it back
        // after every script would cost a reset per script. In a cluster the connection is to
        // one node, so it is given back (the client's other commands go to every node).
        n if SCRIPT_COMMANDS.contains(&n) && session.user.unrestricted() => {
            Route::Dedicated(if cluster {
                StateChange::None
            } else {
                StateChange::Pin
            })
        }
        n if reaches_unnamed_keys(n) && !session.user.unrestricted() => {
            return Action::Forward {
                req,
                route: Route::AsUser,
                transform: Transform::AsUser(session.user.name.clone()),
            }
        }
        _ => Route::Any,
    };
    forward(req, route)
}

/// Scripts and functions, and SORT (whose BY/GET patterns name keys): commands that can reach
/// keys none of their arguments name.
fn reaches_unnamed_keys(name: &[u8]) -> bool {
    SCRIPT_COMMANDS.contains(&name) || name == b"SORT" || name == b"SORT_RO"
}

fn is_kill(req: &Request) -> bool {
    req.args
        .get(1)
        .is_some_and(|s| s.eq_ignore_ascii_case(b"KILL"))
}

/// In a transaction every command is queued by Valkey, except cachefront's own, which cannot
/// be: they are refused and, as Valkey does for a command refused while queuing, the EXEC that
/// follows fails with EXECABORT.
///
/// Every other command is routed exactly as it would be outside the transaction
/// ([`queue`]), so a command refused outside MULTI (`CLIENT KILL`, `CLIENT REPLY`, `SYNC` …) is
/// refused inside it too, and a command that changes the connection (`SUBSCRIBE`, `SELECT`,
/// `CLIENT TRACKING` …) is recorded in the session, to take effect when EXEC runs it.
pub fn in_transaction(
    ctx: &Arc<Context>,
    session: &mut Session,
    name: &[u8],
    req: Request,
) -> Action {
    match name {
        b"EXEC" if session.multi_failed => Action::Forward {
            req: Request::from_args([&b"DISCARD"[..]]),
            route: Route::Dedicated(StateChange::EndMulti),
            transform: Transform::ExecAbort,
        },
        b"EXEC" | b"DISCARD" => forward(req, Route::Dedicated(StateChange::EndMulti)),
        b"QUIT" => Action::Close(Reply::ok()),
        b"RESET" => Action::Reset,
        // Valkey answers these itself: queued (PING, ECHO, INFO, COMMAND), or refused inside
        // a transaction (MULTI, WATCH).
        b"MULTI" | b"WATCH" | b"PING" | b"ECHO" | b"INFO" | b"COMMAND" => {
            forward(req, Route::Dedicated(StateChange::None))
        }
        b"CLIENT" if !super::connection_cmds::is_local_client_subcommand(&req) => {
            let outside = super::connection_cmds::client(ctx, session, req);
            queue(session, outside)
        }
        b"SELECT" => {
            let outside = super::connection_cmds::dispatch(ctx, session, name, req);
            queue(session, outside)
        }
        _ if is_own_or_local(ctx, name) => refuse_in_multi(session, &req),
        _ => {
            let cluster = ctx.upstream.cluster.is_some();
            queue(session, dispatch(session, name, req, cluster))
        }
    }
}

/// cachefront's own commands and the connection commands it answers itself (HELLO, AUTH,
/// ACL, CLIENT ID/SETNAME …): none of them can be queued in Valkey's transaction.
fn is_own_or_local(ctx: &Arc<Context>, name: &[u8]) -> bool {
    matches!(name, b"HELLO" | b"AUTH" | b"ACL" | b"CLIENT") || is_own(ctx, name)
}

/// cachefront's own commands and named queries: answered by cachefront, never by Valkey.
fn is_own(ctx: &Arc<Context>, name: &[u8]) -> bool {
    super::table::own(name).is_some() || ctx.named().contains_key(name)
}

fn refuse_in_multi(session: &mut Session, req: &Request) -> Action {
    session.multi_failed = true;
    let mut what = req.name_lossy().to_ascii_uppercase();
    if what == "CLIENT" {
        if let Some(sub) = req.args.get(1) {
            what = format!(
                "CLIENT {}",
                String::from_utf8_lossy(sub).to_ascii_uppercase()
            );
        }
    }
    Action::Reply(Refusal::NotInMulti(what.to_string()).reply())
}

/// Turns what a command would do outside a transaction into what it does inside one: a
/// forwarded command is queued on the dedicated connection (its state change kept for EXEC);
/// an error stays an error and makes EXEC fail, as in Valkey; anything answered locally
/// cannot be queued and is refused.
fn queue(session: &mut Session, outside: Action) -> Action {
    match outside {
        Action::Forward { req, route, .. } => {
            let route = match route {
                Route::Any => Route::Dedicated(StateChange::None),
                r => r,
            };
            // Valkey's reply here is +QUEUED; the command's own comes within EXEC's.
            forward(req, route)
        }
        Action::Reply(r) if r.is_error() => {
            session.multi_failed = true;
            Action::Reply(r)
        }
        _ => {
            session.multi_failed = true;
            Action::Reply(Refusal::LocalInMulti.reply())
        }
    }
}

/// In subscribed (or MONITOR) mode Valkey's replies and messages interleave on the dedicated
/// connection, so everything goes there in order; only QUIT and RESET are handled here.
pub fn in_subscribed_mode(
    ctx: &Arc<Context>,
    session: &mut Session,
    name: &[u8],
    req: Request,
) -> Action {
    match name {
        b"QUIT" => Action::Close(Reply::ok()),
        b"RESET" => Action::Reset,
        // RESP3 allows every command while subscribed; HELLO switches the protocol there.
        b"HELLO" if session.proto == Proto::Resp3 => {
            super::connection_cmds::dispatch(ctx, session, name, req)
        }
        b"HELLO" | b"AUTH" | b"ACL" => not_in_subscribed(session, &req),
        n if is_own(ctx, n) => not_in_subscribed(session, &req),
        n if SUBSCRIBE_FAMILY.contains(&n) => {
            forward(req, Route::Dedicated(StateChange::Subscribe))
        }
        _ => forward(req, Route::Dedicated(StateChange::None)),
    }
}

fn not_in_subscribed(session: &Session, req: &Request) -> Action {
    let name = req.name_lossy();
    Action::Reply(
        match session.proto {
            Proto::Resp2 => Refusal::Subscribed(name.to_ascii_lowercase()),
            Proto::Resp3 => Refusal::SubscribedResp3(name.to_ascii_uppercase()),
        }
        .reply(),
    )
}
