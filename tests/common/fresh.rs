//! Support for the freshness tests (`tests/freshness.rs`, issue 12): choosing the change
//! source, TTL-only caching, stacks that start on a schema of their own, and comparing what
//! cachefront answers with what PostgreSQL answers for the same SQL.
//!
//! Settings that a branch may not have yet (`invalidation.source`, `sql.ttl_only`, a named
//! query's `ttl_only`) are set by name through the configuration's own serde form, in
//! one place each, so the tests compile and run on any branch and pick them up as soon as
//! they exist: a build without the field panics with a message naming it.

use super::{Raw, Stack};
use cachefront::config::{Config, NamedQueryConfig};
use std::time::Duration;

/// How soon a committed change must show in the answers. The SPEC targets 100 ms; tests
/// allow 2 s so they stay robust on a loaded two-core machine.
pub const FRESH: Duration = Duration::from_secs(2);

/// The change sources every freshness test runs against.
pub fn sources() -> [&'static str; 2] {
    ["triggers", "wal"]
}

/// Sets `key` in `section` of `cfg` to `value`, through the configuration's serde form
/// (so a field this build does not have is reported, not silently ignored).
fn set_field(cfg: &mut Config, section: &str, key: &str, value: toml::Value) -> Result<(), String> {
    let mut doc = toml::Value::try_from(&*cfg).map_err(|e| format!("serialize config: {e}"))?;
    let table = doc
        .as_table_mut()
        .ok_or("config is not a table")?
        .entry(section)
        .or_insert_with(|| toml::Value::Table(Default::default()));
    table
        .as_table_mut()
        .ok_or_else(|| format!("[{section}] is not a table"))?
        .insert(key.to_string(), value);
    let new: Config = doc.clone().try_into().map_err(|e| format!("{e}"))?;
    // Nothing else may change on the way through serde.
    if toml::Value::try_from(&new).ok().as_ref() != Some(&doc) {
        return Err("the configuration does not round-trip through TOML".into());
    }
    *cfg = new;
    Ok(())
}

/// Makes `cfg` use the change source `source` (`"triggers"` or `"wal"`).
///
/// A build without `invalidation.source` has only triggers: then `"triggers"` changes
/// nothing and `"wal"` panics (its tests are `#[ignore]`d until the field is merged).
pub fn set_source(cfg: &mut Config, source: &str) {
    assert!(sources().contains(&source), "unknown source {source}");
    match set_field(cfg, "invalidation", "source", source.into()) {
        Ok(()) => {}
        Err(_) if source == "triggers" => {}
        Err(e) => panic!("needs invalidation.source = {source:?}, which this build lacks: {e}"),
    }
}

/// `sql.ttl_only = true`: SQL.CACHED caches queries it cannot keep fresh, until their TTL.
pub fn set_sql_ttl_only(cfg: &mut Config) {
    set_field(cfg, "sql", "ttl_only", true.into())
        .unwrap_or_else(|e| panic!("needs sql.ttl_only, which this build lacks: {e}"));
}

/// A named query from its `[[query]]` TOML table (fields this build lacks are reported).
pub fn named(toml_table: &str) -> NamedQueryConfig {
    toml::from_str(toml_table).unwrap_or_else(|e| panic!("[[query]] {toml_table}: {e}"))
}

/// A schema whose `slow_name(emp)` answers employee `emp`'s name, or NULL if there is none,
/// after `sleep_ms` either way: a query slow on purpose. The sleep is the outer side of a
/// left join, so PostgreSQL runs it before it looks for the row (a plain join may find no
/// row first and never sleep, which made "no row" answers instant). cachefront refuses
/// `pg_sleep` in a query's own text, not in the body of an SQL-standard function it calls
/// (whose tables it still tracks).
pub fn slow_name_schema(sleep_ms: u64) -> String {
    format!(
        "CREATE FUNCTION slow_name(emp int) RETURNS text LANGUAGE sql STABLE \
         BEGIN ATOMIC SELECT e.name FROM (SELECT pg_sleep({})) AS s \
         LEFT JOIN employees AS e ON e.id = emp; END",
        sleep_ms as f64 / 1000.0
    )
}

/// `SLOW.NAME <id>`: the named query calling `slow_name` (see [`slow_name_schema`]).
pub fn slow_name_query() -> NamedQueryConfig {
    named(
        r#"
command = "SLOW.NAME"
sql = "SELECT slow_name($1)"
key = "slowname:{1}"
args = ["int"]
"#,
    )
}

/// A named query with `ttl_only = true` (cached until its TTL even if it cannot be kept fresh).
pub fn named_ttl_only(toml_table: &str) -> NamedQueryConfig {
    toml::from_str(&format!("{toml_table}\nttl_only = true"))
        .unwrap_or_else(|e| panic!("needs a query's ttl_only, which this build lacks: {e}"))
}

/// A stack whose fresh database first runs `schema` (so named queries can read its tables
/// from the start), then cachefront with `tweak` applied.
pub async fn stack_on(schema: &str, tweak: impl FnOnce(&mut Config)) -> Stack {
    let valkey = super::services::Valkey::start();
    let schema = schema.to_string();
    let db = tokio::task::spawn_blocking(move || {
        let pg = super::services::postgres();
        let db = pg.fresh_db();
        if !schema.is_empty() {
            pg.psql(db.name(), &schema);
        }
        db
    })
    .await
    .expect("fresh db");
    let mut cfg = super::config_for(&valkey, &db);
    tweak(&mut cfg);
    selftest_ttl(&mut cfg);
    cfg.validate().expect("test config is valid");
    let proxy = cachefront::server::spawn(cfg)
        .await
        .expect("cachefront starts");
    let s = Stack { valkey, db, proxy };
    ready(&s).await;
    s
}

/// `FRESHNESS_SELFTEST_TTL=<secs>` (1): every entry lives only that long and the L1 is off,
/// so a cache that ignores every change still answers fresh within [`FRESH`]. Checks the
/// tests' own logic (a step that fails then is a test bug, not a stale cache); never set in CI.
fn selftest_ttl(cfg: &mut Config) {
    let Some(ttl) = selftest_ttl_secs() else {
        return;
    };
    eprintln!("FRESHNESS_SELFTEST_TTL={ttl}: entries expire after {ttl} s, L1 off");
    cfg.cache.default_ttl = ttl;
    cfg.cache.l1_max_bytes = 0;
    if cfg.cache.negative_ttl > 0 {
        cfg.cache.negative_ttl = ttl;
    }
    for q in &mut cfg.queries {
        q.ttl = q.ttl.map(|_| ttl);
        q.negative_ttl = q.negative_ttl.map(|_| ttl);
    }
}

/// `FRESHNESS_SELFTEST_TTL`, if set (see [`selftest_ttl`]).
pub fn selftest_ttl_secs() -> Option<u64> {
    std::env::var("FRESHNESS_SELFTEST_TTL")
        .ok()
        .and_then(|v| v.parse().ok())
}

/// Waits until the change source is live (the listener listens), so fills are kept.
pub async fn ready(s: &Stack) {
    let shared = s.proxy.shared.clone();
    super::eventually_within(Duration::from_secs(10), "change source up", || {
        let shared = shared.clone();
        async move { shared.is_listening() }
    })
    .await;
}

/// An answer: rows as (column, text value) pairs, or an error's text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Rows(Vec<Vec<(String, Option<String>)>>),
    /// A value reply of a named query (`reply = "value"`): one text, or nil.
    Value(Option<String>),
    Error(String),
}

impl Answer {
    pub fn is_error(&self) -> bool {
        matches!(self, Answer::Error(_))
    }

    /// True if `self` (cachefront's answer) is what PostgreSQL answered (`pg`): the same rows
    /// and values, or both errors with PostgreSQL's message in cachefront's.
    pub fn same_as_pg(&self, pg: &Answer) -> bool {
        match (self, pg) {
            (Answer::Error(ours), Answer::Error(theirs)) => ours.contains(theirs.as_str()),
            (Answer::Value(v), Answer::Rows(rows)) => {
                *v == rows
                    .first()
                    .and_then(|r| r.first())
                    .and_then(|c| c.1.clone())
            }
            (a, b) => a == b,
        }
    }
}

/// The text PostgreSQL shows for a JSON value rendered by cachefront (numbers and strings
/// as their text, null as None); `true`/`false` as PostgreSQL's `t`/`f`.
fn json_text(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Bool(b) => Some(if *b { "t" } else { "f" }.to_string()),
        other => Some(other.to_string()),
    }
}

/// A JSON array of objects (cachefront's `reply = "json"` form) as [`Answer::Rows`].
pub fn json_rows(json: &str) -> Answer {
    let v: serde_json::Value = match serde_json::from_str(json) {
        Ok(v) => v,
        Err(e) => return Answer::Error(format!("not JSON ({e}): {json}")),
    };
    let Some(rows) = v.as_array() else {
        return Answer::Error(format!("not a JSON array: {json}"));
    };
    Answer::Rows(
        rows.iter()
            .map(|r| {
                r.as_object()
                    .map(|o| o.iter().map(|(k, v)| (k.clone(), json_text(v))).collect())
                    .unwrap_or_default()
            })
            .collect(),
    )
}

/// A RESP reply frame (bulk JSON, nil or error) as an [`Answer`]; `json` says whether a bulk
/// reply is a JSON document or a plain value.
pub fn frame_answer(frame: &str, json: bool) -> Answer {
    if let Some(err) = frame.strip_prefix('-') {
        return Answer::Error(err.trim_end().to_string());
    }
    if frame == "_\r\n" || frame == "$-1\r\n" {
        return Answer::Value(None);
    }
    let body = frame
        .strip_prefix('$')
        .and_then(|r| r.split_once("\r\n"))
        .map(|(_, b)| b.strip_suffix("\r\n").unwrap_or(b));
    match body {
        Some(b) if json => json_rows(b),
        Some(b) => Answer::Value(Some(b.to_string())),
        None => Answer::Error(format!("unexpected reply {frame:?}")),
    }
}

/// What PostgreSQL itself answers for `sql` (simple query protocol, values as text).
pub async fn pg_answer(pg: &tokio_postgres::Client, sql: &str) -> Answer {
    match pg.simple_query(sql).await {
        Ok(msgs) => Answer::Rows(
            msgs.iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                        r.columns()
                            .iter()
                            .enumerate()
                            .map(|(i, c)| (c.name().to_string(), r.get(i).map(str::to_string)))
                            .collect(),
                    ),
                    _ => None,
                })
                .collect(),
        ),
        Err(e) => Answer::Error(
            e.as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string()),
        ),
    }
}

/// `SQL.CACHED sql` through cachefront, as an [`Answer`].
pub async fn cached(raw: &mut Raw, sql: &str) -> Answer {
    frame_answer(&raw.call(&[b"SQL.CACHED", sql.as_bytes()]).await, true)
}

/// The raw reply frame of `SQL.CACHED sql`.
pub async fn cached_frame(raw: &mut Raw, sql: &str) -> String {
    raw.call(&[b"SQL.CACHED", sql.as_bytes()]).await
}

/// A named query's reply (`args[0]` is the command) as an [`Answer`].
pub async fn named_call(raw: &mut Raw, args: &[&str], json: bool) -> Answer {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    frame_answer(&raw.call(&args).await, json)
}

/// The Valkey key SQL.CACHED stores `sql` under (no key prefix, no params).
pub fn sql_key(sql: &str) -> String {
    cachefront::cache::key::sql_key("", sql.as_bytes(), &[] as &[&str])
}

/// Whether `key` exists in the stack's own Valkey.
pub async fn in_valkey(s: &Stack, key: &str) -> bool {
    let mut v = Raw::connect(s.valkey.port()).await;
    let reply = v.call(&[b"EXISTS", key.as_bytes()]).await;
    reply == ":1\r\n"
}

/// Waits (≤ [`FRESH`]) until `key` is stored in Valkey: proves a test's read was cached,
/// so the freshness that follows is the cache's, not a cache that never stored anything.
pub async fn stored(s: &Stack, key: &str, what: &str) {
    super::eventually_within(FRESH, &format!("{what} stored under {key}"), || async {
        in_valkey(s, key).await
    })
    .await;
}

/// A field of `INFO cachefront`, if this build has it.
pub async fn info_opt(raw: &mut Raw, field: &str) -> Option<String> {
    let info = raw.call(&[b"INFO", b"cachefront"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}
