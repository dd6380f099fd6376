//! The NOTIFY triggers that tell cachefront which rows changed.
//!
//! Statement-level AFTER triggers with transition tables: one notification per statement,
//! sent by PostgreSQL only when the transaction commits, carrying the distinct values of the
//! table's key columns among the old and new rows. A statement touching too many rows, a
//! TRUNCATE, or a transaction past its notification budget sends a table-wide notification
//! instead (and PostgreSQL folds identical notifications within a transaction).

use tokio_postgres::Client;

use super::DbError;
use crate::config::InvalidationConfig;

/// A table as PostgreSQL knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TableRef {
    pub schema: String,
    pub name: String,
}

impl TableRef {
    fn sql(&self) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(&self.name))
    }
}

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Base tables behind a relation name visible on the search path: the table itself, or for a
/// view, every table it reads (recursively). Empty if there is no such relation.
pub async fn resolve(client: &Client, name: &str) -> Result<Vec<TableRef>, DbError> {
    const SQL: &str = "
        WITH RECURSIVE rels(oid) AS (
            SELECT c.oid FROM pg_class c WHERE c.relname = $1 AND pg_table_is_visible(c.oid)
          UNION
            SELECT d.refobjid FROM rels r
              JOIN pg_rewrite w ON w.ev_class = r.oid
              JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = w.oid
                              AND d.refclassid = 'pg_class'::regclass AND d.refobjid <> r.oid
        )
        SELECT n.nspname::text, c.relname::text FROM rels
          JOIN pg_class c ON c.oid = rels.oid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE c.relkind IN ('r', 'p', 'm', 'f')";
    let rows = client.query(SQL, &[&name]).await?;
    Ok(rows
        .iter()
        .map(|r| TableRef {
            schema: r.get(0),
            name: r.get(1),
        })
        .collect())
}

fn function_sql(cfg: &InvalidationConfig) -> String {
    format!(
        r#"
CREATE SCHEMA IF NOT EXISTS cachefront;
CREATE OR REPLACE FUNCTION cachefront.notify_change() RETURNS trigger
LANGUAGE plpgsql AS $fn$
DECLARE
  sent int := coalesce(nullif(current_setting('cachefront.sent', true), ''), '0')::int;
  keys jsonb := '{{}}'::jsonb;
  col text;
  vals jsonb;
  n bigint;
  payload text;
BEGIN
  IF TG_OP <> 'TRUNCATE' AND TG_NARGS > 0 AND sent < {max_notes} THEN
    FOREACH col IN ARRAY TG_ARGV LOOP
      IF TG_OP = 'INSERT' THEN
        EXECUTE format('SELECT count(*), jsonb_agg(DISTINCT %1$I) FROM new_rows', col) INTO n, vals;
      ELSIF TG_OP = 'DELETE' THEN
        EXECUTE format('SELECT count(*), jsonb_agg(DISTINCT %1$I) FROM old_rows', col) INTO n, vals;
      ELSE
        EXECUTE format('SELECT count(*), jsonb_agg(DISTINCT k) FROM (SELECT %1$I AS k FROM old_rows UNION ALL SELECT %1$I FROM new_rows) s', col) INTO n, vals;
      END IF;
      IF n = 0 THEN RETURN NULL; END IF;
      IF n > {max_rows} THEN keys := NULL; EXIT; END IF;
      keys := keys || jsonb_build_object(col, vals);
    END LOOP;
  ELSE
    keys := NULL;
  END IF;
  IF keys IS NOT NULL THEN
    payload := json_build_object('s', TG_TABLE_SCHEMA, 't', TG_TABLE_NAME, 'k', keys)::text;
  END IF;
  IF payload IS NULL OR octet_length(payload) > 7900 THEN
    payload := json_build_object('s', TG_TABLE_SCHEMA, 't', TG_TABLE_NAME)::text;
  END IF;
  PERFORM set_config('cachefront.sent', (sent + 1)::text, true);
  PERFORM pg_notify({channel}, payload);
  RETURN NULL;
END
$fn$;
"#,
        max_notes = cfg.max_notifications_per_transaction,
        max_rows = cfg.max_rows_per_notification,
        channel = quote_literal(&cfg.channel),
    )
}

/// The trigger arguments currently installed on `table`, if cachefront's triggers are there.
async fn installed_args(client: &Client, table: &TableRef) -> Result<Option<Vec<String>>, DbError> {
    let rows = client
        .query(
            "SELECT encode(t.tgargs, 'escape') FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = $1 AND c.relname = $2 AND t.tgname = 'cachefront_upd'",
            &[&table.schema, &table.name],
        )
        .await?;
    Ok(rows.first().map(|r| {
        let raw: String = r.get(0);
        // tgargs is NUL-terminated arguments; `encode(…, 'escape')` shows NUL as \000.
        raw.split("\\000")
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    }))
}

/// Installs (or updates) the triggers on `table` for `key_columns`. Idempotent: a table whose
/// triggers already carry these columns is left alone, so no lock is taken needlessly.
pub async fn install(
    client: &mut Client,
    cfg: &InvalidationConfig,
    table: &TableRef,
    key_columns: &[String],
) -> Result<(), DbError> {
    if installed_args(client, table).await?.as_deref() == Some(key_columns) {
        return Ok(());
    }
    let args = key_columns
        .iter()
        .map(|c| quote_literal(c))
        .collect::<Vec<_>>()
        .join(", ");
    let t = table.sql();
    let mut sql = String::from("SELECT pg_advisory_xact_lock(727130481);\n");
    sql.push_str(&function_sql(cfg));
    for (name, event, refs) in [
        (
            "cachefront_ins",
            "INSERT",
            "REFERENCING NEW TABLE AS new_rows",
        ),
        (
            "cachefront_upd",
            "UPDATE",
            "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
        ),
        (
            "cachefront_del",
            "DELETE",
            "REFERENCING OLD TABLE AS old_rows",
        ),
    ] {
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {name} ON {t};\nCREATE TRIGGER {name} AFTER {event} ON {t} {refs} FOR EACH STATEMENT EXECUTE FUNCTION cachefront.notify_change({args});\n"
        ));
    }
    sql.push_str(&format!(
        "DROP TRIGGER IF EXISTS cachefront_trunc ON {t};\nCREATE TRIGGER cachefront_trunc AFTER TRUNCATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION cachefront.notify_change();\n"
    ));
    let tx = client.transaction().await?;
    tx.batch_execute(&sql).await?;
    tx.commit().await?;
    Ok(())
}

/// Removes every cachefront trigger, the function and its schema.
pub async fn remove_all(client: &mut Client) -> Result<usize, DbError> {
    let rows = client
        .query(
            "SELECT DISTINCT n.nspname::text, c.relname::text FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE t.tgname IN ('cachefront_ins', 'cachefront_upd', 'cachefront_del', 'cachefront_trunc')",
            &[],
        )
        .await?;
    let tables: Vec<TableRef> = rows
        .iter()
        .map(|r| TableRef {
            schema: r.get(0),
            name: r.get(1),
        })
        .collect();
    let mut sql = String::from("SELECT pg_advisory_xact_lock(727130481);\n");
    for t in &tables {
        for name in [
            "cachefront_ins",
            "cachefront_upd",
            "cachefront_del",
            "cachefront_trunc",
        ] {
            sql.push_str(&format!("DROP TRIGGER IF EXISTS {name} ON {};\n", t.sql()));
        }
    }
    sql.push_str(
        "DROP FUNCTION IF EXISTS cachefront.notify_change();\nDROP SCHEMA IF EXISTS cachefront;\n",
    );
    let tx = client.transaction().await?;
    tx.batch_execute(&sql).await?;
    tx.commit().await?;
    Ok(tables.len())
}
