//! `COMMAND` and `INFO`: Valkey's answers with cachefront's own commands and counters added,
//! so tools like valkey-cli show hints for `EMP.GET` and monitoring sees one server.

use bytes::{Bytes, BytesMut};
use std::borrow::Cow;
use std::sync::Arc;

use super::Context;
use super::{Action, Route, Transform};
use crate::config::{ArgType, ReplyKind};
use crate::error::Refusal;
use crate::error::Result;
use crate::protocol::{FrameScanner, Proto, Reply, Request};
use crate::session::Session;

/// How one of cachefront's commands describes itself.
pub struct CommandDoc {
    pub name: String,
    pub arity: i64,
    pub summary: String,
    pub group: &'static str,
    pub arguments: Vec<ArgDoc>,
    /// ACL categories, as `[[auth.users]]` rules see them.
    pub categories: &'static [&'static str],
}

#[derive(Clone)]
pub struct ArgDoc {
    pub name: Cow<'static, str>,
    pub kind: &'static str,
    pub token: Option<&'static str>,
    pub optional: bool,
    pub multiple: bool,
}

fn arg(name: &str, kind: &'static str) -> ArgDoc {
    ArgDoc {
        name: Cow::Owned(name.to_string()),
        kind,
        token: None,
        optional: false,
        multiple: false,
    }
}

/// The docs of every command cachefront serves itself (named queries included).
pub fn own_commands(ctx: &Context) -> Vec<CommandDoc> {
    let mut out: Vec<CommandDoc> = super::table::OWN
        .iter()
        .map(|c| CommandDoc {
            name: c.name.to_ascii_lowercase(),
            arity: c.arity,
            summary: c.summary.to_string(),
            group: c.group,
            arguments: c.arguments.to_vec(),
            categories: c.categories,
        })
        .collect();
    for q in ctx.named().values() {
        out.push(CommandDoc {
            name: q.name.to_ascii_lowercase(),
            arity: q.args.len() as i64 + 1,
            summary: q.summary.clone(),
            group: match q.reply {
                ReplyKind::Hash => "hash",
                _ => "string",
            },
            arguments: q
                .args
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    arg(
                        &q.arg_name(i).replace(' ', "-"),
                        match t {
                            ArgType::Int => "integer",
                            ArgType::Float => "double",
                            _ => "string",
                        },
                    )
                })
                .collect(),
            categories: super::table::NAMED_QUERY_CATEGORIES,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The `COMMAND INFO` entry (Valkey 7+ layout) for one of our commands.
fn info_entry(d: &CommandDoc) -> Reply {
    Reply::Array(vec![
        Reply::text(&d.name),
        Reply::Int(d.arity),
        Reply::Array(vec![Reply::Simple(if d.categories.contains(&"@read") {
            "readonly"
        } else {
            "write"
        })]),
        Reply::Int(0),
        Reply::Int(0),
        Reply::Int(0),
        Reply::Array(d.categories.iter().map(|c| Reply::Simple(c)).collect()),
        Reply::Array(vec![]),
        Reply::Array(vec![]),
        Reply::Array(vec![]),
    ])
}

/// The `COMMAND DOCS` value for one of our commands.
fn docs_entry(d: &CommandDoc) -> Reply {
    let args = d
        .arguments
        .iter()
        .map(|a| {
            let mut m = vec![
                (Reply::text("name"), Reply::text(&a.name)),
                (Reply::text("type"), Reply::text(a.kind)),
            ];
            if let Some(t) = a.token {
                m.push((Reply::text("token"), Reply::text(t)));
            }
            let mut flags = Vec::new();
            if a.optional {
                flags.push(Reply::Simple("optional"));
            }
            if a.multiple {
                flags.push(Reply::Simple("multiple"));
            }
            if !flags.is_empty() {
                m.push((Reply::text("flags"), Reply::Array(flags)));
            }
            Reply::Map(m)
        })
        .collect();
    Reply::Map(vec![
        (Reply::text("summary"), Reply::text(&d.summary)),
        (Reply::text("since"), Reply::text(env!("CARGO_PKG_VERSION"))),
        (Reply::text("group"), Reply::text(d.group)),
        (Reply::text("complexity"), Reply::text("O(1) on a hit")),
        (Reply::text("arguments"), Reply::Array(args)),
    ])
}

pub fn command(ctx: &Arc<Context>, _session: &mut Session, req: Request) -> Action {
    let sub = req.args.get(1).map(|s| s.to_ascii_uppercase());
    let names: Vec<String> = req
        .args
        .iter()
        .skip(2)
        .map(|a| String::from_utf8_lossy(a).to_ascii_lowercase())
        .collect();
    let transform = match sub.as_deref() {
        None => Transform::CommandAll,
        Some(b"COUNT") => Transform::CommandCount,
        Some(b"INFO") if names.is_empty() => Transform::CommandAll,
        Some(b"INFO") => {
            let own = own_commands(ctx);
            Transform::CommandInfo(
                names
                    .iter()
                    .map(|n| own.iter().any(|d| &d.name == n).then(|| n.clone()))
                    .collect(),
            )
        }
        Some(b"DOCS") => Transform::CommandDocs(names),
        Some(b"LIST") if req.args.len() == 2 => Transform::CommandList,
        _ => Transform::None,
    };
    Action::Forward {
        req,
        route: Route::Any,
        transform,
    }
}

/// Splits an aggregate reply (`*N`, `%N`) into its header byte, count and element frames.
fn split_aggregate(raw: &Bytes) -> Option<(u8, usize, Vec<Bytes>)> {
    let kind = *raw.first()?;
    if kind != b'*' && kind != b'%' {
        return None;
    }
    let nl = raw.iter().position(|&b| b == b'\n')?;
    let n: usize = std::str::from_utf8(&raw[1..nl - 1]).ok()?.parse().ok()?;
    let count = if kind == b'%' { n * 2 } else { n };
    let mut pos = nl + 1;
    let mut items = Vec::with_capacity(count.min(4096));
    for _ in 0..count {
        let len = FrameScanner::default().scan(&raw[pos..]).ok()??;
        items.push(raw.slice(pos..pos + len));
        pos += len;
    }
    Some((kind, n, items))
}

fn encode_aggregate(kind: u8, n: usize, items: impl IntoIterator<Item = Bytes>) -> Bytes {
    let mut out = BytesMut::new();
    out.extend_from_slice(&[kind]);
    out.extend_from_slice(n.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    for i in items {
        out.extend_from_slice(&i);
    }
    out.freeze()
}

/// Adds cachefront's entries to Valkey's `COMMAND …` reply.
pub fn merge_command(ctx: &Arc<Context>, proto: Proto, t: &Transform, raw: Bytes) -> Reply {
    let own = own_commands(ctx);
    let enc = |r: Reply| r.to_bytes(proto);
    if let Transform::CommandCount = t {
        return match std::str::from_utf8(
            raw.get(1..raw.len().saturating_sub(2)).unwrap_or_default(),
        )
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        {
            Some(n) if raw.first() == Some(&b':') => Reply::Int(n + own.len() as i64),
            _ => Reply::Raw(raw),
        };
    }
    let Some((kind, n, items)) = split_aggregate(&raw) else {
        return Reply::Raw(raw);
    };
    let merged = match t {
        Transform::CommandAll => {
            let extra: Vec<Bytes> = own.iter().map(|d| enc(info_entry(d))).collect();
            encode_aggregate(kind, n + extra.len(), items.into_iter().chain(extra))
        }
        Transform::CommandList => {
            let extra: Vec<Bytes> = own.iter().map(|d| enc(Reply::text(&d.name))).collect();
            encode_aggregate(kind, n + extra.len(), items.into_iter().chain(extra))
        }
        Transform::CommandInfo(ours) => {
            let items = items.into_iter().zip(ours).map(|(item, mine)| {
                match mine
                    .as_ref()
                    .and_then(|m| own.iter().find(|d| &d.name == m))
                {
                    Some(d) => enc(info_entry(d)),
                    None => item,
                }
            });
            encode_aggregate(kind, n, items.collect::<Vec<_>>())
        }
        Transform::CommandDocs(names) => {
            let extra: Vec<&CommandDoc> = own
                .iter()
                .filter(|d| names.is_empty() || names.contains(&d.name))
                .collect();
            let mut extra_items = Vec::new();
            for d in &extra {
                extra_items.push(enc(Reply::text(&d.name)));
                extra_items.push(enc(docs_entry(d)));
            }
            let added = if kind == b'%' {
                extra.len()
            } else {
                extra.len() * 2
            };
            encode_aggregate(kind, n + added, items.into_iter().chain(extra_items))
        }
        _ => raw,
    };
    Reply::Raw(merged)
}

/// Sections of INFO that include cachefront's own.
fn wants_ours(args: &[Bytes]) -> bool {
    args.is_empty()
        || args.iter().any(|a| {
            ["all", "everything", "default", "cachefront"]
                .iter()
                .any(|s| a.eq_ignore_ascii_case(s.as_bytes()))
        })
}

pub fn info(ctx: &Arc<Context>, session: &mut Session, req: Request) -> Action {
    let args = &req.args[1..];
    if !wants_ours(args) {
        return Action::Forward {
            req,
            route: Route::Any,
            transform: Transform::None,
        };
    }
    if args.len() == 1 && args[0].eq_ignore_ascii_case(b"cachefront") {
        let text = ctx.info_section();
        return Action::Reply(info_reply(session.proto, text));
    }
    Action::Forward {
        req,
        route: Route::Any,
        transform: Transform::Info,
    }
}

fn info_reply(proto: Proto, text: String) -> Reply {
    match proto {
        Proto::Resp2 => Reply::Bulk(Bytes::from(text)),
        Proto::Resp3 => Reply::Verbatim(Bytes::from(text)),
    }
}

/// Valkey's INFO text followed by `# Cachefront`; if Valkey is down, ours alone plus a note.
pub fn merge_info(ctx: &Arc<Context>, proto: Proto, upstream: Result<Bytes>) -> Reply {
    let ours = ctx.info_section();
    let text = match upstream {
        Ok(raw) => match body_of_text_reply(&raw) {
            Some(body) => {
                let mut s = String::from_utf8_lossy(body).into_owned();
                if !s.ends_with("\r\n") {
                    s.push_str("\r\n");
                }
                s.push_str("\r\n");
                s.push_str(&ours);
                s
            }
            None => return Reply::Raw(raw),
        },
        Err(e) => format!("# Upstream\r\nupstream_error:{e}\r\n\r\n{ours}"),
    };
    info_reply(proto, text)
}

/// The text inside a bulk (`$`) or verbatim (`=`) reply.
fn body_of_text_reply(raw: &[u8]) -> Option<&[u8]> {
    let nl = raw.iter().position(|&b| b == b'\n')?;
    let body = raw.get(nl + 1..raw.len().checked_sub(2)?)?;
    match raw.first()? {
        b'$' => Some(body),
        b'=' => body.get(4..),
        _ => None,
    }
}

/// `CACHEFRONT.SLOWLOG GET [count] | LEN | RESET | HELP`: fills that took at least
/// `metrics.slow_fill_ms`, newest first, in the shape of Valkey's SLOWLOG entries (id, unix
/// time, microseconds, [command, key, SQL], two empty client fields).
pub fn slowlog(ctx: &Arc<Context>, req: &Request) -> Action {
    let log = &ctx.metrics.slowlog;
    let sub = req.args.get(1).map(|s| s.to_ascii_uppercase());
    let reply = match (sub.as_deref(), req.args.len()) {
        (Some(b"GET"), 2 | 3) => {
            let n = match req.args.get(2) {
                None => 10,
                Some(a) => match crate::protocol::request::parse_i64_strict(a) {
                    Some(-1) => usize::MAX,
                    Some(n) if n >= 0 => n as usize,
                    _ => {
                        return Action::Reply(Refusal::NegativeCount.reply())
                    }
                },
            };
            Reply::Array(
                log.get(n)
                    .into_iter()
                    .map(|e| {
                        Reply::Array(vec![
                            Reply::Int(e.id as i64),
                            Reply::Int(e.at as i64),
                            Reply::Int(e.duration_us as i64),
                            Reply::Array(vec![
                                Reply::text(&e.command),
                                Reply::text(&e.key),
                                Reply::text(&e.sql),
                            ]),
                            Reply::text(""),
                            Reply::text(""),
                        ])
                    })
                    .collect(),
            )
        }
        (Some(b"LEN"), 2) => Reply::Int(log.len() as i64),
        (Some(b"RESET"), 2) => {
            log.reset();
            Reply::ok()
        }
        (Some(b"HELP"), 2) => Reply::Array(
            [
                "CACHEFRONT.SLOWLOG <subcommand>. Subcommands are:",
                "GET [<count>]    The newest <count> slow fills (default 10, -1 for all).",
                "LEN              How many slow fills are kept.",
                "RESET            Forget them.",
                "Fills taking metrics.slow_fill_ms or more are kept (metrics.slowlog_max_len at most).",
            ]
            .iter()
            .map(|l| Reply::Simple(l))
            .collect(),
        ),
        (Some(s), _) => Refusal::UnknownSubcommand(
            String::from_utf8_lossy(s).to_ascii_lowercase(),
            "CACHEFRONT.SLOWLOG",
        )
        .reply(),
        (None, _) => super::wrong_args(req),
    };
    Action::Reply(reply)
}
