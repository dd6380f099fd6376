//! cachefront's own commands, each declared once: its name, arity, ACL categories, `COMMAND`
//! docs and handler. Dispatch, the permission check, `COMMAND` / `COMMAND DOCS`, the refusals
//! inside MULTI and on a subscribed connection, and the names a named query may not take all
//! read this table, so adding a command is one entry here and its handler.
//!
//! Named queries (`EMP.GET` and `[[query]]`) are declared once too, in the configuration; they
//! share [`NAMED_QUERY_CATEGORIES`].

use std::borrow::Cow;
use std::sync::Arc;

use super::introspection::ArgDoc;
use super::{introspection, queries, read_after, sql_cached, sql_invalidate, Action, Context};
use crate::protocol::Request;
use crate::session::Session;

/// Runs a command whose arity has been checked.
type Run = fn(&Arc<Context>, &mut Session, &Request) -> Action;

/// One of cachefront's own commands.
pub struct OwnCommand {
    /// Uppercase, as clients send it in any case.
    pub name: &'static str,
    /// Valkey's convention: `n` exactly n arguments (the name counted), `-n` at least n.
    pub arity: i64,
    /// ACL categories, as `[[auth.users]]` rules see them.
    pub categories: &'static [&'static str],
    /// `COMMAND DOCS` group and summary.
    pub group: &'static str,
    pub summary: &'static str,
    pub arguments: &'static [ArgDoc],
    pub run: Run,
}

impl OwnCommand {
    /// Whether `argc` arguments (the name included) fit the arity; Valkey answers a wrong
    /// arity before it looks at permissions or arguments.
    pub fn arity_ok(&self, argc: usize) -> bool {
        crate::upstream::commands::arity_ok(self.arity, argc)
    }
}

/// The categories of every named query: they only read.
pub const NAMED_QUERY_CATEGORIES: &[&str] = &["@read", "@cachefront"];

const fn arg(name: &'static str, kind: &'static str) -> ArgDoc {
    ArgDoc {
        name: Cow::Borrowed(name),
        kind,
        token: None,
        optional: false,
        multiple: false,
    }
}

/// An optional argument that follows its `token` (`EX <seconds>`), once or repeated.
const fn after(
    token: &'static str,
    name: &'static str,
    kind: &'static str,
    multiple: bool,
) -> ArgDoc {
    ArgDoc {
        name: Cow::Borrowed(name),
        kind,
        token: Some(token),
        optional: true,
        multiple,
    }
}

/// A required argument that may repeat.
const fn many(name: &'static str, kind: &'static str) -> ArgDoc {
    ArgDoc {
        name: Cow::Borrowed(name),
        kind,
        token: None,
        optional: false,
        multiple: true,
    }
}

pub static OWN: &[OwnCommand] = &[
    OwnCommand {
        name: "SQL.CACHED",
        arity: -2,
        categories: &["@read", "@cachefront"],
        group: "generic",
        summary: "Run a read-only query through the cache; the result is a JSON array of rows",
        arguments: &[
            arg("query", "string"),
            after("EX", "seconds", "integer", false),
            after("PARAMS", "param", "string", true),
        ],
        run: |ctx, session, req| sql_cached::dispatch(ctx, session, req),
    },
    OwnCommand {
        name: "SQL.INVALIDATE",
        arity: -2,
        categories: &["@admin", "@dangerous", "@cachefront"],
        group: "generic",
        summary: "Drop every cached entry read from the given tables",
        arguments: &[many("table", "string")],
        run: |ctx, _, req| sql_invalidate::dispatch(ctx, req),
    },
    OwnCommand {
        name: "CACHEFRONT.AFTER",
        arity: -2,
        categories: &["@read", "@fast", "@connection", "@cachefront"],
        group: "connection",
        summary: "Read your writes: this connection's cached reads answer only once every invalidation committed up to a PostgreSQL WAL position (SELECT pg_current_wal_lsn() after the commit) is applied, waiting at most TIMEOUT ms (else -TRYAGAIN)",
        arguments: &[
            arg("lsn", "string"),
            after("TIMEOUT", "milliseconds", "integer", false),
        ],
        run: |ctx, session, req| read_after::dispatch(ctx, session, req),
    },
    OwnCommand {
        name: "CACHEFRONT.SLOWLOG",
        arity: -2,
        categories: &["@admin", "@slow", "@dangerous", "@cachefront"],
        group: "server",
        summary: "Show, count or clear the fills slower than metrics.slow_fill_ms",
        arguments: &[arg("subcommand", "string")],
        run: |ctx, _, req| introspection::slowlog(ctx, req),
    },
    OwnCommand {
        name: "CACHEFRONT.EXPLAIN",
        arity: -2,
        categories: &["@read", "@slow", "@cachefront"],
        group: "server",
        summary: "Show how a query (SQL.CACHED text or named query with its arguments) would be cached, without running it: key, dependencies, whether and why not",
        arguments: &[
            arg("query-or-command", "string"),
            after("EX", "seconds", "integer", false),
            after("PARAMS", "param", "string", true),
        ],
        run: |ctx, session, req| queries::explain(ctx, session, req),
    },
    OwnCommand {
        name: "CACHEFRONT.QUERIES",
        arity: -1,
        categories: &["@admin", "@slow", "@dangerous", "@cachefront"],
        group: "server",
        summary: "Every named query and the busiest SQL.CACHED texts with their hits, misses, fills, latencies, dependencies and freshness",
        arguments: &[after("COUNT", "count", "integer", false)],
        run: |ctx, _, req| queries::queries(ctx, req),
    },
];

/// The own command called `name` (uppercase).
pub fn own(name: &[u8]) -> Option<&'static OwnCommand> {
    OWN.iter().find(|c| c.name.as_bytes() == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arity_follows_valkeys_convention() {
        let sql_cached = own(b"SQL.CACHED").map(|c| c.arity_ok(1));
        assert_eq!(sql_cached, Some(false));
        assert!(OWN.iter().all(|c| c.arity_ok(2)));
        assert!(own(b"CACHEFRONT.QUERIES").is_some_and(|c| c.arity_ok(1)));
    }

    #[test]
    fn own_commands_are_namespaced_uppercase_and_in_cachefronts_category() {
        for c in OWN {
            assert!(c.name.contains('.'), "{}", c.name);
            assert_eq!(c.name, c.name.to_ascii_uppercase());
            assert!(c.categories.contains(&"@cachefront"), "{}", c.name);
            assert!(own(c.name.as_bytes()).is_some());
        }
        assert!(own(b"GET").is_none());
    }
}
