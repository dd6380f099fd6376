//! What a query reads, as PostgreSQL itself resolves it.
//!
//! Guessing dependencies from the SQL text goes wrong as soon as a schema is not the simple
//! case: a CTE named like a table, a schema off the `search_path`, partitions, inheritance,
//! functions. So cachefront asks PostgreSQL. The query becomes the body of a temporary
//! SQL-standard function (`BEGIN ATOMIC`), which PostgreSQL parses and analyses like any
//! query and whose dependencies it records in `pg_depend`, by OID; the transaction is rolled
//! back, so nothing stays behind and the query never runs. From there the catalogs give the
//! closure: a view's own dependencies (`pg_rewrite`), a table's partitions and inheritance
//! children and its ancestors (a write through either reaches the other), and the bodies of
//! SQL-standard functions it calls. What PostgreSQL does not track — a function in plpgsql or
//! with a string body, a foreign table, a sequence, a system catalog — makes the query
//! *untrackable*, with the reason named.

use std::collections::{BTreeMap, BTreeSet};
use tokio_postgres::Client;

use super::triggers::quote_ident;
use super::DbError;

/// The relation kinds a dependency can have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelKind {
    /// An ordinary or partitioned table: writes to it are reported by triggers or the WAL.
    Table,
    /// A view: only DDL changes it (its tables are dependencies of their own).
    View,
    /// A materialized view: changes only by `REFRESH`, seen through the DDL event trigger.
    MatView,
}

/// One relation a query depends on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    /// `quote_ident(schema).quote_ident(name)`, for people.
    pub name: String,
    pub kind: RelKind,
}

/// Everything a query depends on, by OID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Relations, closed over views, partitions and inheritance (both directions).
    pub relations: Vec<Relation>,
    /// SQL-standard functions it calls (directly or through views or other such functions):
    /// replacing one changes the answers.
    pub functions: Vec<(u32, String)>,
    /// Why PostgreSQL cannot say everything the query reads, if it cannot.
    pub untrackable: Option<String>,
}

/// What functions (SQL-standard bodies, and the probe) read: relations and functions.
const FUNCTION_DEPS: &str = "
    SELECT d.refclassid = 'pg_proc'::regclass, d.refobjid FROM pg_depend d
     WHERE d.classid = 'pg_proc'::regclass AND d.objid = ANY($1)
       AND d.refclassid IN ('pg_class'::regclass, 'pg_proc'::regclass)
       AND d.deptype = 'n' AND d.refobjid <> d.objid";

/// What views read: the dependencies of their rewrite rules.
const VIEW_DEPS: &str = "
    SELECT d.refclassid = 'pg_proc'::regclass, d.refobjid
      FROM pg_rewrite w
      JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = w.oid
     WHERE w.ev_class = ANY($1) AND d.refobjid <> w.ev_class
       AND d.refclassid IN ('pg_class'::regclass, 'pg_proc'::regclass)
       AND d.deptype = 'n'";

/// A table's ancestors and descendants (partitions and inheritance children): a write to a
/// child changes what its parents show, and a write through a parent may land in it.
const FAMILY: &str = "
    WITH RECURSIVE up(oid) AS (
        SELECT unnest($1::oid[])
      UNION SELECT i.inhparent FROM pg_inherits i JOIN up ON i.inhrelid = up.oid
    ), down(oid) AS (
        SELECT unnest($1::oid[])
      UNION SELECT i.inhrelid FROM pg_inherits i JOIN down ON i.inhparent = down.oid
    )
    SELECT false, oid FROM up UNION SELECT false, oid FROM down";

/// The text a probe function's body gets: the query without a trailing `;` (the body adds
/// its own), on lines of its own so a trailing `--` comment cannot swallow the end.
fn probe_sql(sql: &str, arg_types: &[String]) -> String {
    let body = sql.trim_end().trim_end_matches(';');
    format!(
        "CREATE FUNCTION pg_temp.cachefront_probe({}) RETURNS SETOF record LANGUAGE sql BEGIN ATOMIC\n{body}\n;\nEND",
        arg_types.join(", ")
    )
}

/// A parameter type as SQL can name it (`pg_catalog."int4"`).
fn type_name(t: &tokio_postgres::types::Type) -> String {
    format!("{}.{}", quote_ident(t.schema()), quote_ident(t.name()))
}

/// Resolves what `sql` reads. PostgreSQL's own error (a missing table, a syntax error) is
/// returned as such; nothing is remembered here, so a table created later is found then.
pub async fn resolve_query(client: &mut Client, sql: &str) -> Result<Resolved, DbError> {
    let tx = client.transaction().await?;
    let stmt = tx.prepare(sql).await?;
    let types: Vec<String> = stmt.params().iter().map(type_name).collect();
    // One statement through the extended protocol: PostgreSQL refuses a text that would
    // smuggle a second one in after the function.
    tx.execute(probe_sql(sql, &types).as_str(), &[]).await?;
    let probe: u32 = tx
        .query_one(
            "SELECT p.oid FROM pg_proc p
              WHERE p.proname = 'cachefront_probe' AND p.pronamespace = pg_my_temp_schema()",
            &[],
        )
        .await?
        .get(0);
    let mut walk = Walk::default();
    walk.follow(&tx, FUNCTION_DEPS, &[probe]).await?;
    let resolved = walk.close(&tx).await;
    // Nothing of the probe may stay: roll back whatever happened.
    let _ = tx.rollback().await;
    resolved
}

/// Resolves one relation by name (as the `search_path` finds it): `None` if there is none.
/// For the key table of a row-keyed query and `SQL.INVALIDATE`.
pub async fn resolve_relation(
    client: &Client,
    name: &str,
) -> Result<Option<(u32, Resolved)>, DbError> {
    let row = client
        .query_one("SELECT to_regclass($1)::oid", &[&name])
        .await?;
    let Some(oid) = row.get::<_, Option<u32>>(0) else {
        return Ok(None);
    };
    let mut walk = Walk::default();
    walk.push(false, oid);
    Ok(Some((oid, walk.close(client).await?)))
}

/// The closure being computed: OIDs to look at, and what was found.
#[derive(Default)]
struct Walk {
    todo_rels: BTreeSet<u32>,
    todo_fns: BTreeSet<u32>,
    seen_rels: BTreeSet<u32>,
    seen_fns: BTreeSet<u32>,
    relations: BTreeMap<u32, Relation>,
    functions: BTreeMap<u32, String>,
    untrackable: Vec<String>,
}

impl Walk {
    /// A dependency to look at: a function (`is_fn`) or a relation.
    fn push(&mut self, is_fn: bool, oid: u32) {
        if is_fn {
            if self.seen_fns.insert(oid) {
                self.todo_fns.insert(oid);
            }
        } else if self.seen_rels.insert(oid) {
            self.todo_rels.insert(oid);
        }
    }

    /// Runs `sql` (rows: is it a function, its OID) on `oids` and follows every row.
    async fn follow<C: tokio_postgres::GenericClient>(
        &mut self,
        c: &C,
        sql: &str,
        oids: &[u32],
    ) -> Result<(), DbError> {
        if oids.is_empty() {
            return Ok(());
        }
        for r in c.query(sql, &[&oids]).await? {
            self.push(r.get(0), r.get(1));
        }
        Ok(())
    }

    /// Follows dependencies until nothing new turns up.
    async fn close<C: tokio_postgres::GenericClient>(mut self, c: &C) -> Result<Resolved, DbError> {
        while !self.todo_rels.is_empty() || !self.todo_fns.is_empty() {
            let fns: Vec<u32> = std::mem::take(&mut self.todo_fns).into_iter().collect();
            if !fns.is_empty() {
                self.functions_step(c, &fns).await?;
            }
            let rels: Vec<u32> = std::mem::take(&mut self.todo_rels).into_iter().collect();
            if !rels.is_empty() {
                self.relations_step(c, &rels).await?;
            }
        }
        self.untrackable.sort();
        self.untrackable.dedup();
        Ok(Resolved {
            relations: self.relations.into_values().collect(),
            functions: self.functions.into_iter().collect(),
            untrackable: (!self.untrackable.is_empty()).then(|| self.untrackable.join("; ")),
        })
    }

    /// Functions: an SQL-standard body is followed; C and internal functions read no tables
    /// (not through anything PostgreSQL or cachefront can see); any other body is opaque.
    async fn functions_step<C: tokio_postgres::GenericClient>(
        &mut self,
        c: &C,
        oids: &[u32],
    ) -> Result<(), DbError> {
        let rows = c
            .query(
                "SELECT p.oid, quote_ident(n.nspname) || '.' || quote_ident(p.proname)
                        || '(' || pg_get_function_identity_arguments(p.oid) || ')',
                        l.lanname::text, p.prosqlbody IS NOT NULL
                   FROM pg_proc p
                   JOIN pg_namespace n ON n.oid = p.pronamespace
                   JOIN pg_language l ON l.oid = p.prolang
                  WHERE p.oid = ANY($1)",
                &[&oids],
            )
            .await?;
        let mut bodies = Vec::new();
        for r in &rows {
            let (oid, name, lang, atomic): (u32, String, String, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            if atomic {
                self.functions.insert(oid, name);
                bodies.push(oid);
            } else if lang != "c" && lang != "internal" {
                self.untrackable.push(format!(
                    "function {name} is written in {lang}; PostgreSQL does not track what it reads (a LANGUAGE sql function with a BEGIN ATOMIC body is tracked)"
                ));
            }
        }
        self.follow(c, FUNCTION_DEPS, &bodies).await
    }

    /// Relations: kept by kind; a view adds what its rule reads, a table its ancestors and
    /// descendants.
    async fn relations_step<C: tokio_postgres::GenericClient>(
        &mut self,
        c: &C,
        oids: &[u32],
    ) -> Result<(), DbError> {
        let rows = c
            .query(
                "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname),
                        c.relkind::text,
                        n.nspname IN ('pg_catalog', 'information_schema', 'pg_toast')
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE c.oid = ANY($1)",
                &[&oids],
            )
            .await?;
        let mut views = Vec::new();
        let mut tables = Vec::new();
        for r in &rows {
            let (oid, name, relkind, system): (u32, String, String, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            if system {
                self.untrackable.push(format!(
                    "system catalog {name}: cachefront cannot see its changes"
                ));
                continue;
            }
            let kind = match relkind.as_str() {
                "r" | "p" => RelKind::Table,
                "v" => RelKind::View,
                "m" => RelKind::MatView,
                "f" => {
                    self.untrackable.push(format!(
                        "foreign table {name}: its changes happen outside this database"
                    ));
                    continue;
                }
                "S" => {
                    self.untrackable.push(format!(
                        "sequence {name}: its changes are not reported as writes"
                    ));
                    continue;
                }
                // Indexes, composite types, TOAST: no rows of their own to change.
                _ => continue,
            };
            match kind {
                RelKind::View => views.push(oid),
                RelKind::Table => tables.push(oid),
                RelKind::MatView => {}
            }
            self.relations.insert(oid, Relation { oid, name, kind });
        }
        self.follow(c, VIEW_DEPS, &views).await?;
        self.follow(c, FAMILY, &tables).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_keeps_the_query_apart_from_its_frame() {
        let s = probe_sql("SELECT 1; \n", &[]);
        assert!(s.contains("ATOMIC\nSELECT 1\n;\nEND"), "{s}");
        let s = probe_sql("SELECT $1 -- trailing", &["pg_catalog.\"int4\"".into()]);
        assert!(s.contains("(pg_catalog.\"int4\")"), "{s}");
        assert!(s.contains("-- trailing\n;\nEND"), "{s}");
    }
}
