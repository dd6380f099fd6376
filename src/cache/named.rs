//! Named query definitions: what a `[[query]]` (or the built-in `EMP.GET`) becomes once
//! checked — its SQL, key template, TTLs, and the tables and key column it depends on. They
//! live in the cache layer because both the read path (`command`) and invalidation need them,
//! and invalidation must not import `command`.

use std::collections::HashMap;
use std::sync::Arc;

use crate::cache::key::KeyTemplate;
use crate::config::{ArgType, Config, NamedQueryConfig, ReplyKind};
use crate::error::Refusal;

/// Named queries in force, by uppercased command name. Looked up for every request whose
/// name has a dot: foldhash, seeded per process, costs a fraction of SipHash on short names,
/// and the name is kept as bytes, so the request's own bytes look it up without a UTF-8 check.
pub type Named = HashMap<Box<[u8]>, Arc<NamedQuery>, foldhash::fast::RandomState>;

/// Builds every named query of a configuration; an error names the query.
pub fn build(config: &Config) -> Result<Named, String> {
    let mut named = Named::default();
    for q in config.named_queries() {
        let nq = NamedQuery::from_config(&q, config.cache.default_ttl, config.cache.negative_ttl)
            .map_err(|e| format!("query {}: {e}", q.command))?;
        named.insert(nq.name.as_bytes().into(), Arc::new(nq));
    }
    Ok(named)
}

/// After a reload: each named query whose name and SQL did not change keeps the figures it
/// had, so a reload does not reset `CACHEFRONT.QUERIES`.
pub fn keep_stats(next: &mut Named, old: &Named) {
    for (name, q) in next.iter_mut() {
        let Some(before) = old.get(name).filter(|b| b.sql == q.sql) else {
            continue;
        };
        if let Some(q) = Arc::get_mut(q) {
            q.stats = Arc::clone(&before.stats);
        }
    }
}

/// The checks of one query's definition that need the SQL analyser and the key template
/// parser (config.rs checks the rest on its own data): placeholders within the declared
/// args, read-only SQL, a valid key, and a `key_column` whose table the SQL reads and whose
/// argument is the only one the key uses.
pub fn check(q: &NamedQueryConfig) -> Result<(), String> {
    let n = q.args.len();
    let placeholders = crate::db::sql::placeholders(&q.sql).map_err(|e| format!("sql: {e}"))?;
    if placeholders.iter().any(|&p| p == 0 || p > n) {
        return Err(format!(
            "sql uses a parameter beyond the {n} declared args (args = [...])"
        ));
    }
    let tables = crate::db::sql::check_read_only(&q.sql)
        .map_err(|e| format!("sql: {e}"))?
        .tables;
    let tpl = KeyTemplate::parse(&q.key, n).map_err(|e| format!("key: {e}"))?;
    // config.rs has checked that key_column is table.column and key_arg is in range.
    if let Some((table, _)) = q.key_column.as_ref().and_then(|kc| kc.split_once('.')) {
        if !tables.contains(&crate::db::sql::normalize_table_text(table)) {
            return Err(format!("key_column table {table} is not read by the sql"));
        }
        let arg = q.key_arg.unwrap_or(1);
        if tpl.args_used().iter().any(|&a| a + 1 != arg) {
            return Err("with key_column, the key may use only the key argument".into());
        }
    }
    Ok(())
}

/// A named query, ready to serve.
#[derive(Debug)]
pub struct NamedQuery {
    /// Uppercased command name.
    pub name: String,
    /// Its statement: the operator's (see `db::OperatorSql`).
    pub sql: crate::db::OperatorSql,
    pub key: KeyTemplate,
    pub ttl: u64,
    pub reply: ReplyKind,
    pub args: Vec<ArgType>,
    pub arg_names: Vec<String>,
    pub summary: String,
    /// When entries stand for one row each (`key_column`): which table, column and argument.
    pub row_key: Option<RowKey>,
    /// Cache it until its TTL only if PostgreSQL cannot report everything it reads.
    pub ttl_only: bool,
    /// Seconds to remember "no row", if at all.
    pub negative_ttl: Option<u64>,
    /// Its reads, fills and latencies (`CACHEFRONT.QUERIES`, the per-query metrics): kept
    /// across a reload that leaves its name and SQL alone (see [`keep_stats`]).
    pub stats: Arc<crate::metrics::QueryStats>,
}

/// A named query's binding of one argument to one table column.
#[derive(Debug, Clone)]
pub struct RowKey {
    /// The table as the configuration names it; PostgreSQL resolves it (`search_path`).
    pub table: String,
    pub column: String,
    /// 0-based argument index.
    pub arg: usize,
}

impl NamedQuery {
    /// Builds from (already validated) config.
    pub fn from_config(
        c: &NamedQueryConfig,
        default_ttl: u64,
        default_negative_ttl: u64,
    ) -> Result<NamedQuery, String> {
        crate::db::sql::check_read_only(&c.sql).map_err(|e| e.to_string())?;
        let row_key = c.key_column.as_ref().and_then(|kc| {
            let (t, col) = kc.split_once('.')?;
            Some(RowKey {
                table: t.trim().to_string(),
                column: crate::db::sql::normalize_table_text(col),
                arg: c.key_arg.unwrap_or(1) - 1,
            })
        });
        let name = c.command.to_ascii_uppercase();
        let sql = crate::db::OperatorSql::from_config(&c.sql);
        Ok(NamedQuery {
            stats: Arc::new(crate::metrics::QueryStats::named(&name, sql.shared())),
            name,
            sql,
            key: KeyTemplate::parse(&c.key, c.args.len())?,
            ttl: c.ttl.unwrap_or(default_ttl),
            reply: c.reply,
            args: c.args.clone(),
            arg_names: c.arg_names.clone(),
            summary: if c.summary.is_empty() {
                format!("Named query: {}", c.sql)
            } else {
                c.summary.clone()
            },
            row_key,
            ttl_only: c.ttl_only,
            negative_ttl: c
                .negative_ttl
                .or((default_negative_ttl > 0).then_some(default_negative_ttl)),
        })
    }

    /// The entry key for the row whose key column has `value` (row-keyed queries only use
    /// the key argument in their template).
    pub fn key_for_row(&self, value: &str) -> String {
        let n = self.args.len().max(1);
        let mut args = vec![""; n];
        if let Some(r) = &self.row_key {
            if let Some(slot) = args.get_mut(r.arg) {
                *slot = value;
            }
        }
        self.key.render(&args)
    }

    /// The noun used for argument `i` in error messages ("employee id").
    pub fn arg_name(&self, i: usize) -> String {
        self.arg_names
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("argument {} for {}", i + 1, self.name))
    }

    /// `ERR invalid <what> '<value>'`, the value shortened so a huge argument cannot make a huge reply.
    pub fn invalid_arg(&self, i: usize, value: &[u8]) -> Refusal {
        let shown: String = String::from_utf8_lossy(value).chars().take(128).collect();
        Refusal::InvalidArg(self.arg_name(i).to_string(), shown)
    }
}
