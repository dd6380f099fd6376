//! What cachefront installs in PostgreSQL so that every committed change reaches it.
//!
//! - On each table a cached query depends on: statement-level AFTER triggers with transition
//!   tables, one notification per statement, sent only when the transaction commits, naming
//!   the table by OID and carrying the distinct values of the key columns row-keyed queries
//!   bind to. They are `ENABLE ALWAYS`, so writes under `session_replication_role = replica`
//!   (pg_restore, logical replication apply, bulk loaders) are reported too. A statement
//!   touching too many rows, a TRUNCATE, a transaction past its notification budget, or a key
//!   column that is no longer there (renamed, dropped) sends a table-wide notification: the
//!   function names no column in SQL, so no later ALTER can make it fail the application's
//!   write.
//! - Once per database: an event trigger (`ddl_command_end`, `sql_drop`, also `ENABLE
//!   ALWAYS`) that reports the relations and functions a DDL statement touched, with their
//!   partition/inheritance ancestors and descendants: ALTER, DROP, RENAME, ATTACH/DETACH
//!   PARTITION, CREATE OR REPLACE VIEW/FUNCTION, REFRESH MATERIALIZED VIEW. It needs a
//!   superuser; without it DDL is not seen (reported in INFO as `invalidation_ddl_hook:0`).
//!   Dropping or disabling one of cachefront's table triggers is reported the same way, so
//!   the next miss puts it back before anything is stored.
//!   Temporary objects are left out: no cached answer can depend on another session's.
//!
//! Both notify on commit, so nothing is reported for a rolled-back transaction. A
//! transaction that has notified cannot be prepared (`PREPARE TRANSACTION` fails with
//! PostgreSQL's "cannot PREPARE a transaction that has executed LISTEN, UNLISTEN, or NOTIFY"):
//! applications using two-phase commit on cached tables need `invalidation.source = "wal"`,
//! which installs nothing on their tables.
//!
//! Every install is idempotent and takes its locks only when something differs; `cachefront
//! triggers remove` removes all of it.

use tokio_postgres::Client;

use super::DbError;
use crate::config::InvalidationConfig;

/// Serialises cachefront's own DDL across instances (trigger installs, removal).
const ADVISORY_LOCK: i64 = 727130481;

/// The table triggers, by name, event and transition tables.
const TABLE_TRIGGERS: [(&str, &str, &str); 4] = [
    (
        "cachefront_ins",
        "INSERT",
        "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT",
    ),
    (
        "cachefront_upd",
        "UPDATE",
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT",
    ),
    (
        "cachefront_del",
        "DELETE",
        "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT",
    ),
    ("cachefront_trunc", "TRUNCATE", "FOR EACH STATEMENT"),
];

/// The event triggers, by name and event.
const EVENT_TRIGGERS: [(&str, &str); 2] = [
    ("cachefront_ddl", "ddl_command_end"),
    ("cachefront_drop", "sql_drop"),
];

pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The body of the table trigger function. Key values are read through `to_jsonb(row)`, so
/// a key column that no longer exists yields "not present" (→ table-wide), never an error.
fn change_function_body(cfg: &InvalidationConfig) -> String {
    format!(
        r#"
DECLARE
  sent int := coalesce(nullif(current_setting('cachefront.sent', true), ''), '0')::int;
  keys jsonb := '{{}}'::jsonb;
  col text;
  vals jsonb;
  n bigint;
  present boolean;
  payload text;
BEGIN
  IF TG_OP <> 'TRUNCATE' AND TG_NARGS > 0 AND sent < {max_notes} THEN
    FOREACH col IN ARRAY TG_ARGV LOOP
      IF TG_OP = 'INSERT' THEN
        SELECT count(*), bool_and(j ? col), jsonb_agg(DISTINCT j -> col) INTO n, present, vals
          FROM (SELECT to_jsonb(r) AS j FROM new_rows r) s;
      ELSIF TG_OP = 'DELETE' THEN
        SELECT count(*), bool_and(j ? col), jsonb_agg(DISTINCT j -> col) INTO n, present, vals
          FROM (SELECT to_jsonb(r) AS j FROM old_rows r) s;
      ELSE
        SELECT count(*), bool_and(j ? col), jsonb_agg(DISTINCT j -> col) INTO n, present, vals
          FROM (SELECT to_jsonb(r) AS j FROM old_rows r UNION ALL SELECT to_jsonb(r) FROM new_rows r) s;
      END IF;
      IF n = 0 THEN RETURN NULL; END IF;
      IF n > {max_rows} OR NOT present THEN keys := NULL; EXIT; END IF;
      keys := keys || jsonb_build_object(col, vals);
    END LOOP;
  ELSE
    keys := NULL;
  END IF;
  IF keys IS NOT NULL THEN
    payload := json_build_object('o', TG_RELID::bigint, 'k', keys)::text;
  END IF;
  IF payload IS NULL OR octet_length(payload) > 7900 THEN
    payload := json_build_object('o', TG_RELID::bigint)::text;
  END IF;
  PERFORM set_config('cachefront.sent', (sent + 1)::text, true);
  PERFORM pg_notify({channel}, payload);
  RETURN NULL;
END
"#,
        max_notes = cfg.max_notifications_per_transaction,
        max_rows = cfg.max_rows_per_notification,
        channel = quote_literal(&cfg.channel),
    )
}

/// The body of the DDL event trigger function. With `wal_level = logical` it also writes the
/// same payload to the WAL as a transactional logical message, for the WAL change source.
fn ddl_function_body(cfg: &InvalidationConfig) -> String {
    format!(
        r#"
DECLARE
  objs oid[];
  payload text;
BEGIN
  -- cachefront's own installs change no answer.
  IF current_setting('cachefront.installing', true) = 'on' THEN RETURN; END IF;
  IF TG_EVENT = 'sql_drop' THEN
    -- Dropped relations and functions, and the tables whose cachefront triggers were dropped
    -- (their writes would otherwise go unreported from now on).
    SELECT array_agg(DISTINCT o) INTO objs FROM (
        SELECT objid AS o FROM pg_event_trigger_dropped_objects()
         WHERE classid IN ('pg_class'::regclass, 'pg_proc'::regclass) AND NOT is_temporary
      UNION
        SELECT to_regclass(quote_ident(address_names[1]) || '.' || quote_ident(address_names[2]))::oid
          FROM pg_event_trigger_dropped_objects()
         WHERE object_type = 'trigger' AND address_names[3] LIKE 'cachefront\_%'
    ) d WHERE o IS NOT NULL;
  ELSE
    SELECT array_agg(DISTINCT objid) INTO objs FROM pg_event_trigger_ddl_commands()
     WHERE classid IN ('pg_class'::regclass, 'pg_proc'::regclass)
       AND coalesce(schema_name, '') NOT LIKE 'pg\_temp%';
  END IF;
  IF objs IS NULL THEN RETURN; END IF;
  WITH RECURSIVE up(oid) AS (
      SELECT unnest(objs)
    UNION SELECT i.inhparent FROM pg_inherits i JOIN up ON i.inhrelid = up.oid
  ), down(oid) AS (
      SELECT unnest(objs)
    UNION SELECT i.inhrelid FROM pg_inherits i JOIN down ON i.inhparent = down.oid
  )
  SELECT array_agg(oid) INTO objs FROM (SELECT oid FROM up UNION SELECT oid FROM down) s;
  payload := json_build_object('ddl', objs::bigint[])::text;
  IF octet_length(payload) > 7900 THEN
    payload := '{{"ddl":"all"}}';
  END IF;
  PERFORM pg_notify({channel}, payload);
  IF current_setting('wal_level') = 'logical' THEN
    PERFORM pg_logical_emit_message(true, 'cachefront', payload);
  END IF;
END
"#,
        channel = quote_literal(&cfg.channel),
    )
}

/// Creates or replaces a function in schema `cachefront` when its body differs from ours.
async fn ensure_function(
    client: &mut Client,
    name: &str,
    returns: &str,
    body: &str,
) -> Result<(), DbError> {
    let current = client
        .query_opt(
            "SELECT p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
              WHERE n.nspname = 'cachefront' AND p.proname = $1",
            &[&name],
        )
        .await?;
    if current.is_some_and(|r| r.get::<_, String>(0) == body) {
        return Ok(());
    }
    let sql = format!(
        "SELECT pg_advisory_xact_lock({ADVISORY_LOCK});
         SET LOCAL cachefront.installing = 'on';
         CREATE SCHEMA IF NOT EXISTS cachefront;
         CREATE OR REPLACE FUNCTION cachefront.{name}() RETURNS {returns} LANGUAGE plpgsql AS $fn${body}$fn$;"
    );
    let tx = client.transaction().await?;
    tx.batch_execute(&sql).await?;
    tx.commit().await?;
    Ok(())
}

/// The table's name as SQL can use it, or `None` if it no longer exists.
async fn table_sql(client: &Client, oid: u32) -> Result<Option<String>, DbError> {
    let row = client
        .query_opt(
            "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
               FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
            &[&oid],
        )
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// Whether the table carries all four triggers, enabled ALWAYS, with these key columns.
pub async fn installed(client: &Client, oid: u32, key_columns: &[String]) -> Result<bool, DbError> {
    let rows = client
        .query(
            "SELECT t.tgname::text, t.tgenabled::text, encode(t.tgargs, 'escape')
               FROM pg_trigger t WHERE t.tgrelid = $1 AND t.tgname LIKE 'cachefront\\_%'",
            &[&oid],
        )
        .await?;
    let ok = |name: &str, want_args: bool| {
        rows.iter().any(|r| {
            let args: String = r.get(2);
            // tgargs is NUL-terminated arguments; `encode(…, 'escape')` shows NUL as \000.
            let args: Vec<&str> = args.split("\\000").filter(|s| !s.is_empty()).collect();
            r.get::<_, String>(0) == name
                && r.get::<_, String>(1) == "A"
                && (!want_args || args == key_columns)
        })
    };
    Ok(TABLE_TRIGGERS
        .iter()
        .all(|(name, event, _)| ok(name, *event != "TRUNCATE")))
}

/// Installs (or updates) the triggers on the table `oid` for `key_columns`. Idempotent: a
/// table whose triggers already match is left alone, so no lock is taken needlessly. A table
/// that no longer exists is not an error (nothing can be written to it).
pub async fn install(
    client: &mut Client,
    cfg: &InvalidationConfig,
    oid: u32,
    key_columns: &[String],
) -> Result<(), DbError> {
    ensure_function(
        client,
        "notify_change",
        "trigger",
        &change_function_body(cfg),
    )
    .await?;
    if installed(client, oid, key_columns).await? {
        return Ok(());
    }
    let Some(t) = table_sql(client, oid).await? else {
        return Ok(());
    };
    let args = key_columns
        .iter()
        .map(|c| quote_literal(c))
        .collect::<Vec<_>>()
        .join(", ");
    let mut sql = format!(
        "SELECT pg_advisory_xact_lock({ADVISORY_LOCK});\nSET LOCAL cachefront.installing = 'on';\n"
    );
    for (name, event, refs) in TABLE_TRIGGERS {
        let args = if event == "TRUNCATE" { "" } else { &args };
        sql.push_str(&format!(
            "DROP TRIGGER IF EXISTS {name} ON {t};
             CREATE TRIGGER {name} AFTER {event} ON {t} {refs} EXECUTE FUNCTION cachefront.notify_change({args});
             ALTER TABLE {t} ENABLE ALWAYS TRIGGER {name};\n"
        ));
    }
    let tx = client.transaction().await?;
    tx.batch_execute(&sql).await?;
    tx.commit().await?;
    Ok(())
}

/// Whether the DDL event triggers are in place and enabled ALWAYS.
pub async fn ddl_hook_installed(client: &Client) -> Result<bool, DbError> {
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_event_trigger
              WHERE evtname IN ('cachefront_ddl', 'cachefront_drop') AND evtenabled = 'A'",
            &[],
        )
        .await?
        .get(0);
    Ok(n == EVENT_TRIGGERS.len() as i64)
}

/// Installs (or updates) the DDL event triggers. Needs a superuser: PostgreSQL's own error
/// says so otherwise.
pub async fn install_ddl_hook(
    client: &mut Client,
    cfg: &InvalidationConfig,
) -> Result<(), DbError> {
    ensure_function(
        client,
        "notify_ddl",
        "event_trigger",
        &ddl_function_body(cfg),
    )
    .await?;
    if ddl_hook_installed(client).await? {
        return Ok(());
    }
    let mut sql = format!(
        "SELECT pg_advisory_xact_lock({ADVISORY_LOCK});\nSET LOCAL cachefront.installing = 'on';\n"
    );
    for (name, event) in EVENT_TRIGGERS {
        sql.push_str(&format!(
            "DROP EVENT TRIGGER IF EXISTS {name};
             CREATE EVENT TRIGGER {name} ON {event} EXECUTE FUNCTION cachefront.notify_ddl();
             ALTER EVENT TRIGGER {name} ENABLE ALWAYS;\n"
        ));
    }
    let tx = client.transaction().await?;
    tx.batch_execute(&sql).await?;
    tx.commit().await?;
    Ok(())
}

/// Removes every cachefront trigger, the event triggers, the functions and their schema.
/// Returns how many tables had triggers.
pub async fn remove_all(client: &mut Client) -> Result<usize, DbError> {
    let names: Vec<String> = TABLE_TRIGGERS.iter().map(|t| t.0.to_string()).collect();
    let rows = client
        .query(
            "SELECT DISTINCT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
               FROM pg_trigger t
               JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE t.tgname = ANY($1)",
            &[&names],
        )
        .await?;
    let tables: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let mut sql = format!(
        "SELECT pg_advisory_xact_lock({ADVISORY_LOCK});\nSET LOCAL cachefront.installing = 'on';\n"
    );
    for t in &tables {
        for name in &names {
            sql.push_str(&format!("DROP TRIGGER IF EXISTS {name} ON {t};\n"));
        }
    }
    for (name, _) in EVENT_TRIGGERS {
        sql.push_str(&format!("DROP EVENT TRIGGER IF EXISTS {name};\n"));
    }
    sql.push_str(
        "DROP FUNCTION IF EXISTS cachefront.notify_change();
         DROP FUNCTION IF EXISTS cachefront.notify_ddl();
         DROP SCHEMA IF EXISTS cachefront;\n",
    );
    let tx = client.transaction().await?;
    tx.batch_execute(&sql).await?;
    tx.commit().await?;
    Ok(tables.len())
}
