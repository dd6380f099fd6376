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

/// Functions with side effects (or that stall a connection, or reach outside the database)
/// that a cached read must not call — even though some are allowed in a READ ONLY transaction.
const DENIED_FUNCTIONS: &[&str] = &[
    "pg_sleep",
    "pg_sleep_for",
    "pg_sleep_until",
    "set_config",
    "setseed",
    "pg_notify",
    "nextval",
    "setval",
    "txid_current",
    "pg_current_xact_id",
    "pg_cancel_backend",
    "pg_terminate_backend",
    "pg_reload_conf",
    "pg_rotate_logfile",
    "pg_stat_file",
    "pg_switch_wal",
    "pg_create_restore_point",
    "pg_promote",
    "pg_start_backup",
    "pg_stop_backup",
    "pg_import_system_collations",
];

/// Function name prefixes of the same kind (families: advisory locks, replication slots and
/// origins, statistics resets, backups, large objects, server files, dblink…).
const DENIED_PREFIXES: &[&str] = &[
    "dblink",
    "pg_advisory",
    "pg_try_advisory",
    "pg_create_",
    "pg_drop_",
    "pg_copy_",
    "pg_replication_",
    "pg_logical_",
    "pg_stat_reset",
    "pg_stat_statements_reset",
    "pg_backup_",
    "pg_wal_replay_",
    "pg_log_backend",
    "pg_read_",
    "pg_ls_",
    "pg_file_",
    "lo_",
];

/// Parses `sql` and checks that it is exactly one read-only query.
pub fn check_read_only(sql: &str) -> Result<Analysis, SqlError> {
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

fn deny_function(name: &ObjectName) -> ControlFlow<String> {
    let full = name
        .0
        .iter()
        .filter_map(|p| p.as_ident())
        .map(normalize_ident)
        .collect::<Vec<_>>()
        .join(".");
    let last = full.rsplit('.').next().unwrap_or_default();
    if DENIED_FUNCTIONS.contains(&last)
        || DENIED_PREFIXES
            .iter()
            .any(|p| full.starts_with(p) || last.starts_with(p))
    {
        return ControlFlow::Break(format!("function {full} is not allowed"));
    }
    ControlFlow::Continue(())
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
