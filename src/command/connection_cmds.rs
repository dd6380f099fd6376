//! Connection-level commands cachefront answers itself: PING, ECHO, HELLO, AUTH, QUIT, RESET,
//! SELECT and CLIENT.

use bytes::Bytes;
use std::sync::Arc;

use super::Context;
use super::{wrong_args, Action, Route, StateChange, Transform};
use crate::error::Refusal;
use crate::protocol::request::parse_i64_strict;
use crate::protocol::{Proto, Reply, Request};
use crate::session::{ReplyMode, Session};

/// Commands an unauthenticated client may send.
pub fn allowed_before_auth(name: &[u8]) -> bool {
    matches!(name, b"AUTH" | b"HELLO" | b"QUIT" | b"RESET")
}

pub fn dispatch(ctx: &Arc<Context>, session: &mut Session, name: &[u8], req: Request) -> Action {
    match name {
        // While a long command (a script…) may hold Valkey, PING asks Valkey: the client
        // sees its -BUSY, as it would directly, instead of a PONG that says all is well.
        b"PING" if ctx.upstream.long_in_flight() => Action::Forward {
            req,
            route: Route::Any,
            transform: Transform::None,
        },
        b"PING" => match req.args.len() {
            1 => Action::Reply(Reply::Simple("PONG")),
            2 => Action::Reply(Reply::Bulk(req.args[1].clone())),
            _ => Action::Reply(wrong_args(&req)),
        },
        b"ECHO" => match req.args.len() {
            2 => Action::Reply(Reply::Bulk(req.args[1].clone())),
            _ => Action::Reply(wrong_args(&req)),
        },
        b"QUIT" => Action::Close(Reply::ok()),
        b"RESET" => Action::Reset,
        b"AUTH" => Action::Reply(auth(ctx, session, &req)),
        b"HELLO" => hello(ctx, session, &req),
        _ => select(ctx, session, req),
    }
}

/// CLIENT subcommands answered by cachefront itself (they describe cachefront's client, not
/// the Valkey connection behind it).
pub fn is_local_client_subcommand(req: &Request) -> bool {
    req.args.get(1).is_some_and(|s| {
        [
            &b"ID"[..],
            b"GETNAME",
            b"SETNAME",
            b"SETINFO",
            b"INFO",
            b"REPLY",
        ]
        .iter()
        .any(|l| s.eq_ignore_ascii_case(l))
    })
}

/// `ERR wrong number of arguments for 'client|<sub>' command`, as Valkey names subcommands.
fn wrong_sub_args(sub: &[u8]) -> Reply {
    Refusal::WrongArity(format!(
        "client|{}",
        String::from_utf8_lossy(sub).to_ascii_lowercase()
    ))
    .reply()
}

/// AUTH / HELLO AUTH: logs the client in as `user` if the password matches (WRONGPASS
/// otherwise); see [`crate::acl::Users::authenticate`].
fn check_password(
    ctx: &Context,
    session: &mut Session,
    user: &[u8],
    pass: &[u8],
) -> Result<(), Reply> {
    let u = ctx.users.authenticate(user, pass)?;
    session.user = u;
    session.authed = true;
    Ok(())
}

fn auth(ctx: &Context, session: &mut Session, req: &Request) -> Reply {
    let (user, pass) = match req.args.len() {
        2 if ctx.users.default_user().nopass => {
            return Refusal::AuthWithoutPassword.reply();
        }
        2 => (&b"default"[..], &req.args[1][..]),
        3 => (&req.args[1][..], &req.args[2][..]),
        1 => return wrong_args(req),
        _ => return Refusal::Syntax.reply(),
    };
    match check_password(ctx, session, user, pass) {
        Ok(()) => Reply::ok(),
        Err(r) => r,
    }
}

/// `HELLO [proto] [AUTH u p] [SETNAME n]`. The reply is cachefront's. A protocol switch while
/// Valkey holds state for the client (a selected database, watched keys, subscriptions,
/// tracking) also switches its dedicated connection: `HELLO <proto>` goes there, and the
/// client sees Valkey's refusal if there is one, else cachefront's reply.
fn hello(ctx: &Context, session: &mut Session, req: &Request) -> Action {
    let proto = match hello_proto(session, req) {
        Ok(p) => p,
        Err(r) => return Action::Reply(r),
    };
    let switch_upstream = proto != session.proto && session.needs_dedicated();
    let reply = match hello_local(ctx, session, req, proto, !switch_upstream) {
        Ok(r) => r,
        Err(r) => return Action::Reply(r),
    };
    if !switch_upstream {
        return Action::Reply(reply);
    }
    Action::Forward {
        req: Request::from_args([
            Bytes::from_static(b"HELLO"),
            Bytes::from(proto.number().to_string()),
        ]),
        route: Route::Dedicated(StateChange::Proto(proto)),
        transform: Transform::Replace(reply.into_bytes(proto)),
    }
}

/// The protocol HELLO asks for (the current one when it names none).
fn hello_proto(session: &Session, req: &Request) -> Result<Proto, Reply> {
    match req.args.get(1) {
        None => Ok(session.proto),
        Some(v) => match parse_i64_strict(v) {
            Some(2) => Ok(Proto::Resp2),
            Some(3) => Ok(Proto::Resp3),
            Some(_) => Err(Refusal::NoProto.reply()),
            None => Err(Refusal::BadProtoVersion.reply()),
        },
    }
}

/// HELLO's options and reply; `set_proto` switches the session's protocol here (otherwise the
/// forwarded HELLO does it).
fn hello_local(
    ctx: &Context,
    session: &mut Session,
    req: &Request,
    proto: Proto,
    set_proto: bool,
) -> Result<Reply, Reply> {
    let mut i = if req.args.len() > 1 { 2 } else { 1 };
    let mut name = None;
    let mut login = None;
    while i < req.args.len() {
        let opt = &req.args[i];
        if opt.eq_ignore_ascii_case(b"AUTH") && i + 2 < req.args.len() {
            match ctx.users.authenticate(&req.args[i + 1], &req.args[i + 2]) {
                Ok(u) => login = Some(u),
                Err(r) => return Err(r),
            }
            i += 3;
        } else if opt.eq_ignore_ascii_case(b"SETNAME") && i + 1 < req.args.len() {
            match valid_name(&req.args[i + 1]) {
                Ok(n) => name = Some(n),
                Err(r) => return Err(r),
            }
            i += 2;
        } else {
            return Err(Refusal::HelloOption(String::from_utf8_lossy(opt).into_owned()).reply());
        }
    }
    if !session.authed && login.is_none() {
        return Err(Refusal::HelloNoAuth.reply());
    }
    session.authed = true;
    if let Some(u) = login {
        session.user = u;
    }
    if set_proto {
        session.proto = proto;
    }
    if let Some(n) = name {
        session.name = n;
    }
    let version = ctx.upstream.server_version();
    Ok(Reply::Map(vec![
        (Reply::text("server"), Reply::text("valkey")),
        (
            Reply::text("version"),
            Reply::text(if version.is_empty() {
                "8.0.0"
            } else {
                &version
            }),
        ),
        (Reply::text("proto"), Reply::Int(proto.number())),
        (Reply::text("id"), Reply::Int(session.id as i64)),
        (Reply::text("mode"), Reply::text("standalone")),
        (Reply::text("role"), Reply::text("master")),
        (Reply::text("modules"), Reply::Array(Vec::new())),
    ]))
}

/// Valkey's rule for client names: printable ASCII without spaces; empty clears the name.
fn valid_name(raw: &Bytes) -> Result<Option<String>, Reply> {
    if raw.iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
        return Err(Refusal::BadClientName.reply());
    }
    Ok((!raw.is_empty()).then(|| String::from_utf8_lossy(raw).into_owned()))
}

fn select(ctx: &Arc<Context>, session: &mut Session, req: Request) -> Action {
    if req.args.len() != 2 {
        return Action::Reply(wrong_args(&req));
    }
    let Some(db) = parse_i64_strict(&req.args[1]) else {
        return Action::Reply(Refusal::NotAnInteger.reply());
    };
    if db == 0 && !session.needs_dedicated() {
        return Action::Reply(Reply::ok());
    }
    if db != 0 && ctx.upstream.cluster.is_some() {
        // A client's keys span every node: another database would need a selected
        // connection per node. Refused, as a cluster without numbered databases does.
        return Action::Reply(Refusal::SelectInCluster.reply());
    }
    Action::Forward {
        req,
        route: Route::Dedicated(StateChange::Select(db)),
        transform: Transform::None,
    }
}

/// `CLIENT …`: identity subcommands are local (cachefront's clients are not Valkey's);
/// tracking and similar state go to the client's dedicated Valkey connection.
pub fn client(ctx: &Arc<Context>, session: &mut Session, req: Request) -> Action {
    let Some(sub) = req.args.get(1) else {
        return Action::Reply(wrong_args(&req));
    };
    let sub = sub.to_ascii_uppercase();
    let n = req.args.len();
    let reply = match sub.as_slice() {
        b"ID" | b"GETNAME" | b"INFO" if n != 2 => wrong_sub_args(&sub),
        b"SETNAME" if n != 3 => wrong_sub_args(&sub),
        b"SETINFO" if n != 4 => wrong_sub_args(&sub),
        b"ID" => Reply::Int(session.id as i64),
        b"GETNAME" => match &session.name {
            Some(n) => Reply::text(n),
            None => Reply::Nil,
        },
        b"SETNAME" => match valid_name(&req.args[2]) {
            Ok(n) => {
                session.name = n;
                Reply::ok()
            }
            Err(r) => r,
        },
        b"SETINFO" => setinfo(session, &req.args[2], &req.args[3]),
        b"INFO" => Reply::Verbatim(Bytes::from(client_info(session))),
        b"REPLY" if n != 3 => wrong_sub_args(&sub),
        b"REPLY" => match req.args[2].to_ascii_uppercase().as_slice() {
            // The connection drops the replies (see `connection::muted`); this one too, for
            // OFF and SKIP.
            b"ON" => set_reply_mode(session, ReplyMode::On),
            b"OFF" => set_reply_mode(session, ReplyMode::Off),
            b"SKIP" => set_reply_mode(session, ReplyMode::Skip),
            _ => Refusal::Syntax.reply(),
        },
        b"KILL" => Refusal::ClientKill.reply(),
        b"UNBLOCK" => return unblock(ctx, req),
        b"TRACKING" => return tracking(ctx, req),
        b"NO-EVICT" | b"NO-TOUCH" => {
            return Action::Forward {
                req,
                route: Route::Dedicated(StateChange::Pin),
                transform: Transform::None,
            }
        }
        b"CACHING" | b"TRACKINGINFO" | b"GETREDIR" => {
            return Action::Forward {
                req,
                route: Route::Dedicated(StateChange::None),
                transform: Transform::None,
            }
        }
        _ => {
            return Action::Forward {
                req,
                route: Route::Any,
                transform: Transform::None,
            }
        }
    };
    Action::Reply(reply)
}

/// `CLIENT REPLY ON|OFF|SKIP`, kept as Valkey keeps it: `SKIP` while replies are off changes
/// nothing, and each mode holds from the next command on.
fn set_reply_mode(session: &mut Session, mode: ReplyMode) -> Reply {
    session.reply_asked = Some(mode);
    if !(mode == ReplyMode::Skip && session.reply_mode == ReplyMode::Off) {
        session.reply_mode = mode;
    }
    Reply::ok()
}

/// `CLIENT UNBLOCK <id>`: the id is a cachefront client's; a blocked client waits on its
/// dedicated connection, whose Valkey id is what Valkey needs.
fn unblock(ctx: &Arc<Context>, req: Request) -> Action {
    let target = req.args.get(2).and_then(|a| parse_i64_strict(a));
    let Some(target) = target else {
        return Action::Forward {
            req,
            route: Route::Any,
            transform: Transform::None,
        };
    };
    match ctx.upstream.upstream_id_of(target.max(0) as u64) {
        Some(up) => {
            let mut args = req.args.clone();
            args[2] = Bytes::from(up.to_string());
            Action::Forward {
                req: Request::from_args(args),
                route: Route::Any,
                transform: Transform::None,
            }
        }
        // Not blocked on a connection of its own: nothing to unblock, as Valkey answers.
        None => Action::Reply(Reply::Int(0)),
    }
}

fn setinfo(session: &mut Session, attr: &[u8], value: &Bytes) -> Reply {
    if value.iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
        return Refusal::BadClientInfo(String::from_utf8_lossy(attr).to_ascii_lowercase()).reply();
    }
    let v = Some(String::from_utf8_lossy(value).into_owned());
    if attr.eq_ignore_ascii_case(b"LIB-NAME") {
        session.lib_name = v;
    } else if attr.eq_ignore_ascii_case(b"LIB-VER") {
        session.lib_ver = v;
    } else {
        return Refusal::UnknownOption(String::from_utf8_lossy(attr).into_owned()).reply();
    }
    Reply::ok()
}

fn client_info(s: &Session) -> String {
    format!(
        "id={} addr={} name={} db={} multi={} user={} resp={} lib-name={} lib-ver={}\n",
        s.id,
        s.addr,
        s.name.as_deref().unwrap_or(""),
        s.db,
        if s.in_multi { 0 } else { -1 },
        s.user.name,
        s.proto.number(),
        s.lib_name.as_deref().unwrap_or(""),
        s.lib_ver.as_deref().unwrap_or(""),
    )
}

/// `CLIENT TRACKING on|off …`. A `REDIRECT <id>` names a cachefront client; Valkey needs the
/// id of that client's own upstream connection, so the argument is rewritten.
fn tracking(ctx: &Arc<Context>, req: Request) -> Action {
    let on = match req.args.get(2).map(|a| a.to_ascii_lowercase()) {
        Some(a) if a == b"on" => true,
        Some(a) if a == b"off" => false,
        _ => {
            return Action::Forward {
                req,
                route: Route::Dedicated(StateChange::None),
                transform: Transform::None,
            }
        }
    };
    if on && ctx.upstream.cluster.is_some() {
        // Tracking lives on one node's connection, and this client's reads go to every
        // node: its client-side cache would miss invalidations. Refused rather than stale.
        return Action::Reply(Refusal::TrackingInCluster.reply());
    }
    let mut args = req.args.clone();
    let mut rewritten = false;
    let mut i = 3;
    while i < args.len() {
        if args[i].eq_ignore_ascii_case(b"REDIRECT") && i + 1 < args.len() {
            let target = parse_i64_strict(&args[i + 1]).filter(|&t| t > 0);
            match target.and_then(|t| ctx.upstream.upstream_id_of(t as u64)) {
                Some(up) => {
                    args[i + 1] = Bytes::from(up.to_string());
                    rewritten = true;
                }
                None => return Action::Reply(Refusal::NoRedirectClient.reply()),
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    let req = if rewritten {
        Request::from_args(args)
    } else {
        req
    };
    Action::Forward {
        req,
        route: Route::Dedicated(StateChange::Tracking(on)),
        transform: Transform::None,
    }
}

/// `ACL WHOAMI` is answered here (the client's cachefront user); the rest of ACL would act
/// on Valkey's own users, which is not what a cachefront client means: refused.
pub fn acl(session: &Session, req: &Request) -> Action {
    let Some(sub) = req.args.get(1) else {
        return Action::Reply(wrong_args(req));
    };
    if sub.eq_ignore_ascii_case(b"WHOAMI") {
        return Action::Reply(if req.args.len() == 2 {
            Reply::bulk(Bytes::from(session.user.name.clone()))
        } else {
            Refusal::WrongArity("acl|whoami".into()).reply()
        });
    }
    Action::Reply(Refusal::AclSubcommand(String::from_utf8_lossy(sub).to_ascii_uppercase()).reply())
}
