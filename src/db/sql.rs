//! What SQL cachefront agrees to run, and which tables a query reads.
//!
//! The parser is the first of several layers (the others: PostgreSQL's own refusal of several
//! statements in one prepared statement, a READ ONLY transaction, a statement timeout, and the
//! role cachefront connects as). It accepts one read-only query and nothing else.

use sqlparser::ast::{Expr, ObjectName, Query, SetExpr, Statement, TableFactor, Visit, Visitor};
use sqlparser::dialect::PostgreSqlDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer};
use std::collections::BTreeSet;
use std::ops::ControlFlow;

/// Why a query was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SqlError {
    /// The parser could not read it; PostgreSQL may know better (see `db::Db::explain_parse_failure`).
    #[error("could not parse the query: {0}")]
    Parse(String),
    #[error("not a single read-only query: {0}")]
    NotReadOnly(String),
}

/// Functions a cached read must not call, by the reason each is refused. A name matches the
/// function's own name (any schema, any case); an entry ending in `*` matches by prefix.
///
/// The READ ONLY transaction already stops writes to tables, but not these: some run SQL
/// handed to them as text — which the parser never sees, so none of its checks (nor the
/// dependency tracking that invalidates the entry) would apply to it; some change the state
/// of the session or the server in ways a READ ONLY transaction allows and a rollback does
/// not undo (session advisory locks, notifications, sequences, backends, replication); some
/// hold the connection; some reach files on the database server.
const DENIED: &[(&str, &[&str])] = &[
    (
        "runs SQL given to it as text",
        &[
            "query_to_xml*",
            "query_to_xmlschema",
            "cursor_to_xml*",
            "table_to_xml*",
            "schema_to_xml*",
            "database_to_xml*",
            "dblink*",
            "ts_stat",
            "ts_rewrite",
            "crosstab*",
            "connectby",
            "pg_background*",
        ],
    ),
    (
        "changes session or server state",
        &[
            "set_config",
            "setseed",
            "pg_advisory*",
            "pg_try_advisory*",
            "pg_notify",
            "nextval",
            "setval",
            "txid_current",
            "pg_current_xact_id",
            "pg_export_snapshot",
            "pg_import_system_collations",
            "pg_cancel_backend",
            "pg_terminate_backend",
            "pg_reload_conf",
            "pg_rotate_logfile*",
            "pg_switch_wal",
            "pg_promote",
            "pg_create_*",
            "pg_drop_*",
            "pg_copy_*",
            "pg_replication_*",
            "pg_logical_*",
            "pg_stat_reset*",
            "pg_stat_statements_reset",
            "pg_stat_clear_snapshot",
            "pg_stat_force_next_flush",
            "pg_start_backup",
            "pg_stop_backup",
            "pg_backup_*",
            "pg_wal_replay_*",
            "pg_log_backend*",
            "pg_prewarm",
            "lo_*",
            "loread",
            "lowrite",
        ],
    ),
    ("holds the connection", &["pg_sleep*"]),
    (
        "reads the database server's files",
        &["pg_read_*", "pg_ls_*", "pg_stat_file", "pg_file_*"],
    ),
];

/// Why `name` (a function's own name, without schema) may not be called, if it may not.
fn denied_because(name: &str) -> Option<&'static str> {
    let name = name.to_ascii_lowercase();
    DENIED.iter().find_map(|(why, names)| {
        names
            .iter()
            .any(|n| match n.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => name == *n,
            })
            .then_some(*why)
    })
}

/// The verdict of [`check_read_only`] on a query text: accepted, or why it was refused.
/// (What an accepted query reads is PostgreSQL's to say: `db::deps`.)
pub type Verdict = Result<(), SqlError>;

/// Parses `sql` and checks that it is exactly one read-only query.
pub fn check_read_only(sql: &str) -> Result<Analysis, SqlError> {
    if has_unicode_escaped_identifier(sql) {
        return Err(SqlError::NotReadOnly(
            "Unicode-escaped identifier (U&\"…\")".into(),
        ));
    }
    let stmts = match Parser::parse_sql(&PostgreSqlDialect {}, sql) {
        Ok(s) => s,
        Err(e) => match table_shorthand(sql) {
            // `TABLE t` is `SELECT * FROM t`; the parser does not know the short form.
            Some(name) => {
                Parser::parse_sql(&PostgreSqlDialect {}, &format!("SELECT * FROM {name}"))
                    .map_err(|_| SqlError::Parse(e.to_string()))?
            }
            None => return Err(SqlError::Parse(e.to_string())),
        },
    };
    let [stmt] = stmts.as_slice() else {
        return Err(SqlError::NotReadOnly(format!("{} statements", stmts.len())));
    };
    let Statement::Query(query) = stmt else {
        return Err(SqlError::NotReadOnly("not a query".into()));
    };
    let mut v = Checker::default();
    if let ControlFlow::Break(why) = stmt.visit(&mut v) {
        return Err(SqlError::NotReadOnly(why));
    }
    check_query(query)?;
    let tables = v
        .relations
        .difference(&v.cte_names)
        .cloned()
        .collect::<BTreeSet<_>>();
    Ok(Analysis {
        tables: tables.into_iter().collect(),
    })
}

/// Whether `sql` holds a `U&"…"` identifier. The parser reads it as `U & "…"`, so the name
/// it checks (`"pg\005fsleep"`) is not the one PostgreSQL resolves (`pg_sleep`): a function
/// or table could hide behind escapes. PostgreSQL reads `U&"` only with nothing between the
/// three characters, which is what is looked for.
fn has_unicode_escaped_identifier(sql: &str) -> bool {
    let Ok(tokens) = Tokenizer::new(&PostgreSqlDialect {}, sql).tokenize() else {
        return false; // the parser reports it
    };
    tokens.windows(3).any(|w| match w {
        [Token::Word(u), Token::Ampersand, Token::Word(id)] => {
            u.quote_style.is_none()
                && u.value.eq_ignore_ascii_case("u")
                && id.quote_style == Some('"')
        }
        _ => false,
    })
}

/// The relation name of `TABLE name [;]`, if that is the whole statement.
fn table_shorthand(sql: &str) -> Option<&str> {
    let t = sql.trim().trim_end_matches(';').trim_end();
    let (kw, rest) = t.split_at(t.find(char::is_whitespace)?);
    let name = rest.trim();
    let simple = name
        .chars()
        .all(|c| c.is_alphanumeric() || matches!(c, '_' | '.' | '"' | '$'));
    (kw.eq_ignore_ascii_case("TABLE") && !name.is_empty() && simple).then_some(name)
}

/// What the checker learned about an accepted query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Analysis {
    /// Tables (or views) read, normalised by [`normalize_table`], sorted, without CTE names.
    pub tables: Vec<String>,
}

fn check_query(q: &Query) -> Result<(), SqlError> {
    if !q.locks.is_empty() {
        return Err(SqlError::NotReadOnly(
            "row locking (FOR UPDATE/SHARE)".into(),
        ));
    }
    if q.for_clause.is_some() {
        return Err(SqlError::NotReadOnly("FOR clause".into()));
    }
    if let Some(with) = &q.with {
        for cte in &with.cte_tables {
            check_query(&cte.query)?;
        }
    }
    check_set_expr(&q.body)
}

fn check_set_expr(body: &SetExpr) -> Result<(), SqlError> {
    match body {
        SetExpr::Select(s) => {
            if s.into.is_some() {
                return Err(SqlError::NotReadOnly(
                    "SELECT … INTO creates a table".into(),
                ));
            }
            Ok(())
        }
        SetExpr::Query(q) => check_query(q),
        SetExpr::SetOperation { left, right, .. } => {
            check_set_expr(left)?;
            check_set_expr(right)
        }
        SetExpr::Values(_) | SetExpr::Table(_) => Ok(()),
        SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_) => Err(
            SqlError::NotReadOnly("data-modifying statement in a query".into()),
        ),
    }
}

/// Walks the whole tree: nested statements, relations, CTE names, function calls.
#[derive(Default)]
struct Checker {
    relations: BTreeSet<String>,
    cte_names: BTreeSet<String>,
}

impl Visitor for Checker {
    type Break = String;

    fn pre_visit_statement(&mut self, s: &Statement) -> ControlFlow<String> {
        match s {
            Statement::Query(_) => ControlFlow::Continue(()),
            _ => ControlFlow::Break("data-modifying or utility statement".into()),
        }
    }

    fn pre_visit_query(&mut self, q: &Query) -> ControlFlow<String> {
        if let Some(with) = &q.with {
            for cte in &with.cte_tables {
                self.cte_names.insert(normalize_ident(&cte.alias.name));
            }
        }
        if let Err(e) = check_query(q) {
            return ControlFlow::Break(e.to_string());
        }
        if let SetExpr::Table(t) = q.body.as_ref() {
            if let Some(name) = &t.table_name {
                self.relations.insert(name.to_ascii_lowercase());
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_table_factor(&mut self, t: &TableFactor) -> ControlFlow<String> {
        match t {
            TableFactor::Function { name, .. } => deny_function(name),
            // `FROM f(args)` parses as a table with arguments: a set-returning function.
            TableFactor::Table {
                name,
                args: Some(_),
                ..
            } => deny_function(name),
            _ => ControlFlow::Continue(()),
        }
    }

    fn pre_visit_relation(&mut self, rel: &ObjectName) -> ControlFlow<String> {
        if let Some(t) = normalize_table(rel) {
            self.relations.insert(t);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, e: &Expr) -> ControlFlow<String> {
        if let Expr::Function(f) = e {
            return deny_function(&f.name);
        }
        ControlFlow::Continue(())
    }
}

/// Refuses a call of a function in [`DENIED`], wherever in the query it is (select list,
/// FROM, LATERAL, CTEs, subqueries, arguments of other calls).
fn deny_function(name: &ObjectName) -> ControlFlow<String> {
    let Some(own) = name.0.last().and_then(|p| p.as_ident()) else {
        // A name part that is not an identifier: nothing to match it against, so refuse.
        return ControlFlow::Break(format!("function {name} cannot be checked"));
    };
    match denied_because(&own.value) {
        Some(why) => ControlFlow::Break(format!("function {name} {why}")),
        None => ControlFlow::Continue(()),
    }
}

fn normalize_ident(i: &sqlparser::ast::Ident) -> String {
    if i.quote_style.is_some() {
        i.value.clone()
    } else {
        i.value.to_ascii_lowercase()
    }
}

/// A table's identity for invalidation: its unqualified name, folded like PostgreSQL folds
/// unquoted identifiers. Dropping the schema makes `public.employees` and `employees` the same
/// dependency; two schemas with a same-named table invalidate each other, which costs a miss,
/// never a stale read.
pub fn normalize_table(name: &ObjectName) -> Option<String> {
    name.0
        .last()
        .and_then(|p| p.as_ident())
        .map(normalize_ident)
}

/// Normalises a table name given as text (SQL.INVALIDATE arguments, notifications).
pub fn normalize_table_text(name: &str) -> String {
    let last = name.rsplit('.').next().unwrap_or(name).trim();
    if last.len() >= 2 && last.starts_with('"') && last.ends_with('"') {
        last[1..last.len() - 1].replace("\"\"", "\"")
    } else {
        last.to_ascii_lowercase()
    }
}

/// The `$n` parameter numbers used in `sql`.
pub fn placeholders(sql: &str) -> Result<BTreeSet<usize>, String> {
    let tokens = Tokenizer::new(&PostgreSqlDialect {}, sql)
        .tokenize()
        .map_err(|e| e.to_string())?;
    let mut out = BTreeSet::new();
    for t in tokens {
        if let Token::Placeholder(p) = t {
            if let Some(n) = p.strip_prefix('$').and_then(|n| n.parse().ok()) {
                out.insert(n);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tables(sql: &str) -> Vec<String> {
        check_read_only(sql).unwrap().tables
    }

    #[test]
    fn accepts_reads_and_finds_their_tables() {
        let guide = "SELECT employees.name AS employee_name, departments.name AS department_name, employees.job_title FROM employees INNER JOIN departments ON employees.dept_id = departments.id;";
        assert_eq!(tables(guide), vec!["departments", "employees"]);
        assert_eq!(tables("SELECT 1"), Vec::<String>::new());
        assert_eq!(tables("VALUES (1), (2)"), Vec::<String>::new());
        assert_eq!(tables("TABLE employees"), vec!["employees"]);
        assert_eq!(
            tables("WITH e AS (SELECT * FROM public.Employees) SELECT * FROM e WHERE dept_id IN (SELECT id FROM \"Departments\")"),
            vec!["Departments", "employees"]
        );
        assert_eq!(
            tables("SELECT a FROM x UNION SELECT b FROM s.y"),
            vec!["x", "y"]
        );
        assert_eq!(
            tables("SELECT (SELECT count(*) FROM departments) AS n, e.* FROM employees e WHERE EXISTS (SELECT 1 FROM z)"),
            vec!["departments", "employees", "z"]
        );
    }

    #[test]
    fn refuses_anything_that_writes() {
        for sql in [
            "DELETE FROM employees",
            "UPDATE employees SET name = 'x'",
            "INSERT INTO employees (name) VALUES ('x')",
            "SELECT 1; SELECT 2",
            "SELECT 1; DROP TABLE employees",
            "WITH d AS (DELETE FROM employees RETURNING *) SELECT * FROM d",
            "SELECT * FROM employees FOR UPDATE",
            "SELECT * INTO copy FROM employees",
            "SELECT pg_sleep(10)",
            "SELECT set_config('default_transaction_read_only', 'off', false)",
            "SELECT * FROM dblink('x', 'y') AS t(a int)",
            "SELECT nextval('employees_id_seq')",
            "SELECT pg_create_physical_replication_slot('x')",
            "SELECT pg_catalog.pg_stat_reset()",
            "SELECT pg_advisory_lock(1)",
            "SELECT lo_unlink(1)",
            "CREATE TABLE x (a int)",
            "SET statement_timeout = 0",
            "COPY employees TO '/tmp/x'",
            "BEGIN",
        ] {
            assert!(check_read_only(sql).is_err(), "accepted {sql}");
        }
    }

    /// Every route to a denied function: nested in another call's arguments, in FROM (as a
    /// table function or `ROWS FROM`), in LATERAL, in CTEs and subqueries, in clauses other
    /// than the select list, schema-qualified, quoted, in any case.
    #[test]
    fn refuses_denied_functions_anywhere() {
        for sql in [
            "SELECT query_to_xml('select pg_advisory_lock(1)', true, false, '')",
            "SELECT query_to_xml_and_xmlschema('select 1', true, false, '')",
            "SELECT query_to_xmlschema('select 1', true, false, '')",
            "SELECT cursor_to_xml('c', 1, true, false, '')",
            "SELECT table_to_xml('employees', true, false, '')",
            "SELECT table_to_xmlschema('employees', true, false, '')",
            "SELECT schema_to_xml('public', true, false, '')",
            "SELECT database_to_xml(true, false, '')",
            "SELECT * FROM ts_stat('SELECT to_tsvector(name) FROM employees')",
            "SELECT * FROM crosstab('SELECT 1, 2, 3') AS t(a int, b int)",
            "SELECT pg_try_advisory_lock(1)",
            "SELECT pg_advisory_xact_lock(1)",
            "SELECT pg_notify('c', 'x')",
            "SELECT txid_current()",
            "SELECT pg_export_snapshot()",
            "SELECT pg_import_system_collations('pg_catalog')",
            "SELECT pg_terminate_backend(1)",
            "SELECT pg_cancel_backend(1)",
            "SELECT pg_reload_conf()",
            "SELECT pg_logical_emit_message(true, 'p', 'x')",
            "SELECT pg_read_file('/etc/passwd')",
            "SELECT pg_read_binary_file('/etc/passwd')",
            "SELECT * FROM pg_ls_dir('.')",
            "SELECT pg_stat_file('x')",
            "SELECT pg_sleep_for('1 minute')",
            "SELECT loread(0, 1)",
            "SELECT lo_import('/etc/passwd')",
            "SELECT setval('s', 1)",
            // Nested, in FROM, LATERAL, CTEs, subqueries and other clauses.
            "SELECT length(query_to_xml('select 1', true, false, '')::text)",
            "SELECT * FROM query_to_xml('select 1', true, false, '') AS x",
            "SELECT * FROM ROWS FROM (query_to_xml('select 1', true, false, '')) AS x",
            "SELECT * FROM employees e, LATERAL (SELECT pg_advisory_lock(e.id)) l",
            "SELECT * FROM employees e CROSS JOIN LATERAL pg_advisory_lock(e.id) l",
            "WITH x AS (SELECT pg_advisory_lock(1)) SELECT * FROM x",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE pg_sleep(1) IS NULL) SELECT * FROM r",
            "SELECT (SELECT pg_advisory_lock(1)) AS l",
            "SELECT 1 WHERE EXISTS (SELECT pg_advisory_lock(1))",
            "SELECT name FROM employees ORDER BY pg_advisory_lock(id)",
            "SELECT dept_id FROM employees GROUP BY dept_id HAVING pg_advisory_lock(1) IS NOT NULL",
            "SELECT CASE WHEN true THEN pg_advisory_lock(1) END",
            "SELECT count(*) FILTER (WHERE pg_advisory_lock(1) IS NULL) FROM employees",
            "SELECT 1 UNION SELECT pg_advisory_lock(1)",
            "VALUES (pg_advisory_lock(1))",
            // Qualified, quoted, in any case.
            "SELECT pg_catalog.query_to_xml('select 1', true, false, '')",
            "SELECT \"pg_advisory_lock\"(1)",
            "SELECT PG_ADVISORY_LOCK(1)",
            "SELECT Query_To_Xml('select 1', true, false, '')",
            "SELECT U&\"pg\\005fadvisory_lock\"(1)",
            "SELECT u&\"pg_sleep\"(1)",
            "SELECT * FROM U&\"employee\\0073\"",
        ] {
            assert!(check_read_only(sql).is_err(), "accepted {sql}");
        }
    }

    /// The deny set names functions, not fragments: ordinary functions that share a prefix
    /// stay allowed.
    #[test]
    fn accepts_ordinary_functions() {
        for sql in [
            "SELECT lower(name), length(name), log(2), now(), current_setting('TimeZone') FROM employees",
            "SELECT to_char(now(), 'YYYY'), pg_relation_size('employees'), pg_stat_get_numscans(1)",
            "SELECT lpad('x', 3), pg_typeof(1), txid_snapshot_xmin(txid_current_snapshot())",
            "SELECT u & \"x\" FROM (SELECT 1 AS u, 3 AS \"x\") t",
            "SELECT * FROM generate_series(1, 3) AS g, LATERAL unnest(ARRAY[g]) AS u",
        ] {
            assert!(check_read_only(sql).is_ok(), "refused {sql}: {:?}", check_read_only(sql));
        }
    }

    #[test]
    fn finds_placeholders() {
        assert_eq!(
            placeholders("SELECT $1, '$2', $3")
                .unwrap()
                .into_iter()
                .collect::<Vec<_>>(),
            vec![1, 3]
        );
    }

    #[test]
    fn normalizes_table_text() {
        assert_eq!(normalize_table_text("public.Employees"), "employees");
        assert_eq!(normalize_table_text("\"Mixed\""), "Mixed");
    }
}
