//! Freshness by construction (issue 12): on schemas real applications have, every cached
//! answer is either fresh — what PostgreSQL itself answers for the same SQL, within
//! [`FRESH`] of the commit — or a clear refusal; never a stale one.
//!
//! Each test starts its own stack on a fresh copy of the staff database, creates the schema
//! it needs, caches queries (checking that they really were stored in Valkey), changes the
//! data or the schema through PostgreSQL — never through cachefront — and waits for
//! cachefront's answer to equal PostgreSQL's. Classes that depend on the change source run
//! once per source ([`common::fresh::sources`]): `<class>::triggers` and `<class>::wal`.
//!
//! The last test is a randomized audit: writers mix DML and DDL over partitioned, inherited,
//! schema-qualified, view- and function-backed tables while readers hammer cached queries;
//! afterwards no cached answer may differ from PostgreSQL's. `FRESHNESS_SEED` picks its
//! seed (printed), `FRESHNESS_AUDIT_SECS` its length (20 s).

mod common;

use common::fresh::{
    frame_answer, info_opt, named, pg_answer, set_source, sql_key, stack_on, Answer, FRESH,
};
use common::{Raw, Stack};
use std::time::{Duration, Instant};
use tokio_postgres::Client;

/// Runs a class once per change source: `$class::triggers` and `$class::wal`
/// (`common::fresh::set_source`).
macro_rules! per_source {
    ($($class:ident),* $(,)?) => {$(
        mod $class {
            #[tokio::test(flavor = "multi_thread")]
            async fn triggers() {
                super::$class("triggers").await
            }

            #[tokio::test(flavor = "multi_thread")]
            async fn wal() {
                super::$class("wal").await
            }
        }
    )*};
}

per_source!(
    cte_named_like_its_table,
    schema_not_on_search_path,
    partitioned_table,
    inheritance,
    views_and_their_redefinition,
    sql_function_with_begin_atomic,
    table_created_after_a_failed_read,
    writes_under_replication_role_replica,
    truncate_and_copy,
    ddl_add_and_drop_column,
    ddl_rename,
    ddl_drop_table,
    ddl_refresh_materialized_view,
    writes_still_work_after_a_key_column_is_renamed,
    prepare_transaction,
    triggers_remove_takes_everything,
    a_table_that_cannot_report_writes_is_not_cached,
    a_lost_change_stream_flushes_what_it_cannot_vouch_for,
    randomized_audit,
);

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A cached read: SQL.CACHED or a named query, with the SQL PostgreSQL answers it by and the
/// Valkey key it is stored under.
#[derive(Clone, Debug)]
struct Q {
    args: Vec<String>,
    json: bool,
    pg_sql: String,
    key: String,
}

impl Q {
    /// `SQL.CACHED sql`.
    fn sql(sql: &str) -> Q {
        Q {
            args: vec!["SQL.CACHED".into(), sql.into()],
            json: true,
            pg_sql: sql.into(),
            key: sql_key(sql),
        }
    }

    /// A named query with `reply = "json"`: `args` (command first), answered like `pg_sql`.
    fn json(args: &[&str], pg_sql: &str, key: &str) -> Q {
        Q {
            args: args.iter().map(|a| a.to_string()).collect(),
            json: true,
            pg_sql: pg_sql.into(),
            key: key.into(),
        }
    }

    /// A named query with `reply = "value"`: the first column of the first row of `pg_sql`.
    fn value(args: &[&str], pg_sql: &str, key: &str) -> Q {
        Q {
            json: false,
            ..Q::json(args, pg_sql, key)
        }
    }

    fn label(&self) -> String {
        let mut l = self.args.join(" ");
        l.truncate(160);
        l
    }

    /// cachefront's answer.
    async fn ours(&self, raw: &mut Raw) -> Answer {
        let args: Vec<&[u8]> = self.args.iter().map(|a| a.as_bytes()).collect();
        frame_answer(&raw.call(&args).await, self.json)
    }
}

/// Runs SQL through a client of the database (not cachefront); panics on failure.
async fn write(pg: &Client, sql: &str) {
    pg.batch_execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"));
}

/// Polls (every 10 ms, at most [`FRESH`]) until cachefront answers `q` as PostgreSQL does;
/// panics with both answers otherwise. Returns how long it took.
async fn settle(raw: &mut Raw, pg: &Client, q: &Q, after: &str) -> Duration {
    let started = Instant::now();
    loop {
        let ours = q.ours(raw).await;
        let theirs = pg_answer(pg, &q.pg_sql).await;
        if ours.same_as_pg(&theirs) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < FRESH,
            "STALE: `{}` after {after}: not PostgreSQL's answer within {FRESH:?}\n  cachefront: {ours:?}\n  PostgreSQL: {theirs:?}",
            q.label()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Every one of `qs` answers what PostgreSQL answers, within [`FRESH`] of `after`.
async fn fresh(raw: &mut Raw, pg: &Client, qs: &[&Q], after: &str) {
    for q in qs {
        let took = settle(raw, pg, q, after).await;
        eprintln!("fresh after {took:?}: `{}` after {after}", q.label());
    }
}

/// Reads each of `qs` through cachefront (PostgreSQL's answer) and waits until it is stored
/// in Valkey, so what follows tests the cache, not a cache that never stored anything.
async fn cache(s: &Stack, raw: &mut Raw, pg: &Client, qs: &[&Q]) {
    for q in qs {
        settle(raw, pg, q, "the first read").await;
        // A fill that raced the invalidation of an earlier write is rightly not stored
        // (no stale fill); reading again fills again.
        let started = Instant::now();
        while !common::fresh::in_valkey(s, &q.key).await {
            assert!(
                started.elapsed() < FRESH,
                "timed out waiting for: {} stored under {}",
                q.label(),
                q.key
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
            let _ = q.ours(raw).await;
        }
    }
}

/// The stack for `source` on `schema`, with named queries given as `[[query]]` TOML tables.
async fn stack(source: &str, schema: &str, queries: &[&str]) -> Stack {
    let source = source.to_string();
    let queries: Vec<_> = queries.iter().map(|q| named(q)).collect();
    stack_on(schema, move |c| {
        set_source(c, &source);
        c.queries.extend(queries);
    })
    .await
}

// ---------------------------------------------------------------------------------------
// 1. A CTE named like the table it reads
// ---------------------------------------------------------------------------------------

const CTE: &str =
    "WITH employees AS (SELECT * FROM employees WHERE dept_id = 1) SELECT name FROM employees ORDER BY id";

/// The CTE hides the table's name from a parse of the text, not from PostgreSQL.
async fn cte_named_like_its_table(source: &str) {
    let s = stack(
        source,
        "",
        &[&format!(
            "command = \"EMP.DEPT1\"\nsql = \"{CTE}\"\nkey = \"dept1:names\"\nreply = \"json\""
        )],
    )
    .await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let sql = Q::sql(CTE);
    let named = Q::json(&["EMP.DEPT1"], CTE, "dept1:names");
    cache(&s, &mut raw, &pg, &[&sql, &named]).await;
    write(
        &pg,
        "UPDATE employees SET name = 'Alicia Johnson' WHERE id = 1",
    )
    .await;
    fresh(&mut raw, &pg, &[&sql, &named], "UPDATE employees").await;
    write(
        &pg,
        "INSERT INTO employees (name, job_title, dept_id) VALUES ('Fiona Green', 'Analyst', 1)",
    )
    .await;
    fresh(&mut raw, &pg, &[&sql, &named], "INSERT INTO employees").await;
}

// ---------------------------------------------------------------------------------------
// 2. A schema that is not on search_path, and a same-named table in public
// ---------------------------------------------------------------------------------------

const TWO_ITEMS: &str = "
CREATE SCHEMA app;
CREATE TABLE app.items (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE public.items (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO app.items VALUES (1, 'app-one'), (2, 'app-two');
INSERT INTO public.items VALUES (1, 'pub-one'), (2, 'pub-two');";

/// `app.items` and `public.items` are different tables: a write to either makes the queries
/// on it fresh by itself (without a write to the other one).
async fn schema_not_on_search_path(source: &str) {
    let s = stack(
        source,
        TWO_ITEMS,
        &[
            "command = \"APP.ITEM\"\nsql = \"SELECT name FROM app.items WHERE id = $1\"\nkey = \"app:item:{1}\"\nargs = [\"int\"]",
            "command = \"PUB.ITEM\"\nsql = \"SELECT name FROM items WHERE id = $1\"\nkey = \"pub:item:{1}\"\nargs = [\"int\"]\nkey_column = \"items.id\"",
        ],
    )
    .await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let app = Q::sql("SELECT id, name FROM app.items ORDER BY id");
    let app_named = Q::value(
        &["APP.ITEM", "1"],
        "SELECT name FROM app.items WHERE id = 1",
        "app:item:1",
    );
    let public = Q::sql("SELECT id, name FROM items ORDER BY id");
    let public_qualified = Q::sql("SELECT id, name FROM public.items ORDER BY id");
    let public_named = Q::value(
        &["PUB.ITEM", "1"],
        "SELECT name FROM public.items WHERE id = 1",
        "pub:item:1",
    );
    let all = [&app, &app_named, &public, &public_qualified, &public_named];
    cache(&s, &mut raw, &pg, &all).await;
    write(&pg, "UPDATE app.items SET name = 'app-uno' WHERE id = 1").await;
    fresh(&mut raw, &pg, &[&app, &app_named], "UPDATE app.items").await;
    write(&pg, "UPDATE public.items SET name = 'pub-uno' WHERE id = 1").await;
    fresh(
        &mut raw,
        &pg,
        &[&public, &public_qualified, &public_named],
        "UPDATE public.items",
    )
    .await;
    write(&pg, "INSERT INTO app.items VALUES (3, 'app-three')").await;
    fresh(&mut raw, &pg, &all, "INSERT INTO app.items").await;
}

// ---------------------------------------------------------------------------------------
// 3. Partitioned tables
// ---------------------------------------------------------------------------------------

const EVENTS: &str = "
CREATE TABLE events (id int NOT NULL, region text NOT NULL, n int NOT NULL, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
CREATE TABLE events_asia (id int NOT NULL, region text NOT NULL, n int NOT NULL, PRIMARY KEY (id, region));
INSERT INTO events VALUES (1, 'eu', 10), (2, 'us', 20), (3, 'eu', 30);
INSERT INTO events_asia VALUES (4, 'asia', 40);";

const EVENT_TOTALS: &str =
    "SELECT region, count(*) AS events, sum(n) AS total FROM events GROUP BY region ORDER BY region";

/// Writes through a partition reach queries on the parent; writes through the parent reach
/// queries on a partition; ATTACH/DETACH PARTITION change the parent's answer.
async fn partitioned_table(source: &str) {
    let s = stack(
        source,
        EVENTS,
        &[&format!(
            "command = \"EVENTS.TOTALS\"\nsql = \"{EVENT_TOTALS}\"\nkey = \"events:totals\"\nreply = \"json\""
        )],
    )
    .await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let parent = Q::sql(EVENT_TOTALS);
    let parent_named = Q::json(&["EVENTS.TOTALS"], EVENT_TOTALS, "events:totals");
    let eu = Q::sql("SELECT id, n FROM events_eu ORDER BY id");
    let asia = Q::sql("SELECT id, region, n FROM events_asia ORDER BY id");
    cache(&s, &mut raw, &pg, &[&parent, &parent_named, &eu, &asia]).await;

    write(&pg, "UPDATE events_eu SET n = n + 1 WHERE id = 1").await;
    fresh(
        &mut raw,
        &pg,
        &[&parent, &parent_named, &eu],
        "UPDATE through the partition",
    )
    .await;
    write(&pg, "UPDATE events SET n = n + 100 WHERE region = 'eu'").await;
    fresh(
        &mut raw,
        &pg,
        &[&eu, &parent, &parent_named],
        "UPDATE through the parent",
    )
    .await;
    write(&pg, "INSERT INTO events VALUES (5, 'eu', 50)").await;
    fresh(
        &mut raw,
        &pg,
        &[&eu, &parent],
        "INSERT routed to the partition",
    )
    .await;
    write(&pg, "DELETE FROM events WHERE id = 3").await;
    fresh(&mut raw, &pg, &[&eu, &parent], "DELETE through the parent").await;

    write(
        &pg,
        "ALTER TABLE events ATTACH PARTITION events_asia FOR VALUES IN ('asia')",
    )
    .await;
    fresh(&mut raw, &pg, &[&parent, &parent_named], "ATTACH PARTITION").await;
    // events_asia is a partition now: a write through the parent reaches its entry too.
    cache(&s, &mut raw, &pg, &[&asia]).await;
    write(&pg, "UPDATE events SET n = n + 1 WHERE region = 'asia'").await;
    fresh(
        &mut raw,
        &pg,
        &[&asia, &parent],
        "UPDATE through the parent of a partition attached after start",
    )
    .await;
    write(&pg, "ALTER TABLE events DETACH PARTITION events_us").await;
    fresh(&mut raw, &pg, &[&parent, &parent_named], "DETACH PARTITION").await;
    write(&pg, "TRUNCATE events").await;
    fresh(
        &mut raw,
        &pg,
        &[&parent, &parent_named, &eu, &asia],
        "TRUNCATE of the parent",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 4. Inheritance
// ---------------------------------------------------------------------------------------

const VEHICLES: &str = "
CREATE TABLE vehicles (id int PRIMARY KEY, name text NOT NULL);
CREATE TABLE cars (doors int NOT NULL DEFAULT 4, PRIMARY KEY (id)) INHERITS (vehicles);
INSERT INTO vehicles VALUES (1, 'cart');
INSERT INTO cars VALUES (2, 'sedan', 4);";

/// A write to the child reaches queries on the parent (and the other way round).
async fn inheritance(source: &str) {
    let all_vehicles = "SELECT id, name FROM vehicles ORDER BY id";
    let s = stack(
        source,
        VEHICLES,
        &[&format!(
            "command = \"VEHICLES.ALL\"\nsql = \"{all_vehicles}\"\nkey = \"vehicles:all\"\nreply = \"json\""
        )],
    )
    .await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let parent = Q::sql(all_vehicles);
    let parent_named = Q::json(&["VEHICLES.ALL"], all_vehicles, "vehicles:all");
    let child = Q::sql("SELECT id, name, doors FROM cars ORDER BY id");
    let only = Q::sql("SELECT id, name FROM ONLY vehicles ORDER BY id");
    cache(&s, &mut raw, &pg, &[&parent, &parent_named, &child, &only]).await;

    write(&pg, "INSERT INTO cars VALUES (3, 'coupe', 2)").await;
    fresh(
        &mut raw,
        &pg,
        &[&parent, &parent_named, &child],
        "INSERT INTO the child",
    )
    .await;
    write(&pg, "UPDATE cars SET name = 'hatchback' WHERE id = 2").await;
    fresh(
        &mut raw,
        &pg,
        &[&parent, &parent_named, &child],
        "UPDATE of the child",
    )
    .await;
    write(&pg, "UPDATE vehicles SET name = upper(name)").await;
    fresh(
        &mut raw,
        &pg,
        &[&child, &parent, &only],
        "UPDATE through the parent (reaching the child's rows)",
    )
    .await;
    write(&pg, "DELETE FROM vehicles WHERE id = 3").await;
    fresh(
        &mut raw,
        &pg,
        &[&child, &parent],
        "DELETE through the parent",
    )
    .await;
    write(&pg, "ALTER TABLE cars NO INHERIT vehicles").await;
    fresh(
        &mut raw,
        &pg,
        &[&parent, &parent_named, &only],
        "ALTER TABLE cars NO INHERIT",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 5. Views, views over views, CREATE OR REPLACE VIEW
// ---------------------------------------------------------------------------------------

const VIEWS: &str = "
CREATE VIEW low_depts AS SELECT id, name, dept_id FROM employees WHERE dept_id <= 3;
CREATE VIEW low_names AS SELECT id, name FROM low_depts WHERE id <> 2;";

/// A view's entries follow its tables, and its own definition.
async fn views_and_their_redefinition(source: &str) {
    let names = "SELECT name FROM low_names ORDER BY name";
    let s = stack(
        source,
        VIEWS,
        &[&format!(
            "command = \"STAFF.LOW\"\nsql = \"{names}\"\nkey = \"staff:low\"\nreply = \"json\""
        )],
    )
    .await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let over = Q::sql(names);
    let over_named = Q::json(&["STAFF.LOW"], names, "staff:low");
    let view = Q::sql("SELECT id, name FROM low_depts ORDER BY id");
    let all = [&over, &over_named, &view];
    cache(&s, &mut raw, &pg, &all).await;

    write(
        &pg,
        "UPDATE employees SET name = 'Charles Brown' WHERE id = 3",
    )
    .await;
    fresh(&mut raw, &pg, &all, "UPDATE of the table under both views").await;
    write(
        &pg,
        "CREATE OR REPLACE VIEW low_depts AS SELECT id, name, dept_id FROM employees WHERE dept_id >= 3",
    )
    .await;
    fresh(&mut raw, &pg, &all, "CREATE OR REPLACE VIEW (inner view)").await;
    write(
        &pg,
        "CREATE OR REPLACE VIEW low_names AS SELECT id, name FROM low_depts WHERE id <> 4",
    )
    .await;
    fresh(
        &mut raw,
        &pg,
        &[&over, &over_named],
        "CREATE OR REPLACE VIEW (outer view)",
    )
    .await;
    // Redefined to read another table: the entries now follow that one.
    write(
        &pg,
        "CREATE OR REPLACE VIEW low_depts AS SELECT id, name::varchar(50) AS name, id AS dept_id FROM departments",
    )
    .await;
    fresh(
        &mut raw,
        &pg,
        &all,
        "CREATE OR REPLACE VIEW onto departments",
    )
    .await;
    cache(&s, &mut raw, &pg, &all).await;
    write(&pg, "UPDATE departments SET name = 'Money' WHERE id = 1").await;
    fresh(
        &mut raw,
        &pg,
        &all,
        "UPDATE of the table a redefined view now reads",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 6. Functions that read tables
// ---------------------------------------------------------------------------------------

const FUNCTIONS: &str = "
CREATE FUNCTION headcount(d int) RETURNS bigint LANGUAGE sql STABLE
BEGIN ATOMIC SELECT count(*) FROM employees WHERE dept_id = d; END;
CREATE FUNCTION headcount_pl(d int) RETURNS bigint LANGUAGE plpgsql STABLE
AS $$ BEGIN RETURN (SELECT count(*) FROM employees WHERE dept_id = d); END $$;";

const SQL_REFUSAL_PREFIX: &str = "-ERR SQL.CACHED cannot keep this query fresh: ";
const SQL_REFUSAL_SUFFIX: &str =
    " (set sql.ttl_only = true to cache such queries until their TTL)\r\n";

/// A SQL-standard function body's dependencies are PostgreSQL's: its entries follow the
/// table it reads, and its own redefinition.
async fn sql_function_with_begin_atomic(source: &str) {
    let s = stack(
        source,
        FUNCTIONS,
        &["command = \"DEPT.HEADCOUNT\"\nsql = \"SELECT headcount($1) AS n\"\nkey = \"headcount:{1}\"\nargs = [\"int\"]"],
    )
    .await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let sql = Q::sql("SELECT headcount(1) AS n");
    let named = Q::value(
        &["DEPT.HEADCOUNT", "1"],
        "SELECT headcount(1) AS n",
        "headcount:1",
    );
    cache(&s, &mut raw, &pg, &[&sql, &named]).await;
    write(
        &pg,
        "INSERT INTO employees (name, job_title, dept_id) VALUES ('Fiona Green', 'Analyst', 1)",
    )
    .await;
    fresh(
        &mut raw,
        &pg,
        &[&sql, &named],
        "INSERT into the table the function reads",
    )
    .await;
    write(&pg, "UPDATE employees SET dept_id = 1 WHERE id = 2").await;
    fresh(
        &mut raw,
        &pg,
        &[&sql, &named],
        "UPDATE of the table the function reads",
    )
    .await;
    write(
        &pg,
        "CREATE OR REPLACE FUNCTION headcount(d int) RETURNS bigint LANGUAGE sql STABLE
         BEGIN ATOMIC SELECT count(*) FROM employees WHERE dept_id <> d; END",
    )
    .await;
    fresh(&mut raw, &pg, &[&sql, &named], "CREATE OR REPLACE FUNCTION").await;
}

/// A plpgsql function's reads are invisible to PostgreSQL's dependency tracking: refused,
/// with the contract's text, and nothing stored.
#[tokio::test(flavor = "multi_thread")]
async fn plpgsql_function_is_refused_with_its_reason() {
    let s = stack(
        "triggers",
        FUNCTIONS,
        &["command = \"PL.HEADCOUNT\"\nsql = \"SELECT headcount_pl($1) AS n\"\nkey = \"plheadcount:{1}\"\nargs = [\"int\"]"],
    )
    .await;
    let mut raw = s.raw().await;
    let sql = "SELECT headcount_pl(1) AS n";
    let reply = raw.call(&[b"SQL.CACHED", sql.as_bytes()]).await;
    assert!(
        reply.starts_with(SQL_REFUSAL_PREFIX) && reply.ends_with(SQL_REFUSAL_SUFFIX),
        "SQL.CACHED on a plpgsql function: {reply:?}"
    );
    assert!(
        reply.contains("headcount_pl") && reply.contains("plpgsql"),
        "the reason names the function and its language: {reply:?}"
    );
    assert!(!common::fresh::in_valkey(&s, &sql_key(sql)).await);
    let reply = raw.call(&[b"PL.HEADCOUNT", b"1"]).await;
    assert!(
        reply.starts_with("-ERR PL.HEADCOUNT cannot keep its query fresh: ")
            && reply.ends_with(" (set ttl_only = true on the query to cache it until its TTL)\r\n")
            && reply.contains("headcount_pl")
            && reply.contains("plpgsql"),
        "named query on a plpgsql function: {reply:?}"
    );
    assert!(!common::fresh::in_valkey(&s, "plheadcount:1").await);
}

/// With TTL-only caching opted into, the same queries are cached (until their TTL) and
/// counted as such.
#[tokio::test(flavor = "multi_thread")]
async fn plpgsql_function_is_cached_when_ttl_only() {
    let query = common::fresh::named_ttl_only(
        "command = \"PL.HEADCOUNT\"\nsql = \"SELECT headcount_pl($1) AS n\"\nkey = \"plheadcount:{1}\"\nargs = [\"int\"]",
    );
    let s = stack_on(FUNCTIONS, |c| {
        common::fresh::set_sql_ttl_only(c);
        c.queries.push(query);
    })
    .await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let sql = Q::sql("SELECT headcount_pl(1) AS n");
    let named = Q::value(
        &["PL.HEADCOUNT", "1"],
        "SELECT headcount_pl(1) AS n",
        "plheadcount:1",
    );
    cache(&s, &mut raw, &pg, &[&sql, &named]).await;
    let fills = info_opt(&mut raw, "ttl_only_fills")
        .await
        .expect("INFO cachefront has ttl_only_fills");
    assert!(
        fills.parse::<u64>().expect("a count") >= 2,
        "ttl_only_fills:{fills}"
    );
}

// ---------------------------------------------------------------------------------------
// 7. A table created after cachefront first saw a query on it fail
// ---------------------------------------------------------------------------------------

/// A migration after start: the failed read is not remembered, and the new table's writes
/// reach its entries.
async fn table_created_after_a_failed_read(source: &str) {
    let notes = "SELECT id, body FROM notes ORDER BY id";
    let s = stack(
        source,
        "",
        &[&format!(
            "command = \"NOTES.ALL\"\nsql = \"{notes}\"\nkey = \"notes:all\"\nreply = \"json\""
        )],
    )
    .await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let sql = Q::sql(notes);
    let named = Q::json(&["NOTES.ALL"], notes, "notes:all");
    for q in [&sql, &named] {
        let ours = q.ours(&mut raw).await;
        assert!(
            ours.is_error() && ours.same_as_pg(&pg_answer(&pg, notes).await),
            "`{}` before the table exists: {ours:?}",
            q.label()
        );
    }
    write(
        &pg,
        "CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL); INSERT INTO notes VALUES (1, 'first')",
    )
    .await;
    cache(&s, &mut raw, &pg, &[&sql, &named]).await;
    write(&pg, "UPDATE notes SET body = 'changed' WHERE id = 1").await;
    fresh(
        &mut raw,
        &pg,
        &[&sql, &named],
        "UPDATE of a table created after start",
    )
    .await;
    write(&pg, "INSERT INTO notes VALUES (2, 'second')").await;
    fresh(
        &mut raw,
        &pg,
        &[&sql, &named],
        "INSERT into a table created after start",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 7b. cachefront's own triggers dropped or disabled
// ---------------------------------------------------------------------------------------

/// Dropping or disabling one of cachefront's triggers is DDL like any other: the entries of
/// the table go, and the next miss puts the trigger back before it stores anything, so later
/// writes are reported again.
#[tokio::test(flavor = "multi_thread")]
async fn a_dropped_or_disabled_trigger_is_put_back() {
    let s = stack("triggers", "", &[]).await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let bob = Q::value(
        &["EMP.GET", "2"],
        "SELECT name FROM employees WHERE id = 2",
        "employee:2",
    );
    let all = Q::sql("SELECT id, name FROM employees ORDER BY id");
    for (ddl, dml) in [
        (
            "DROP TRIGGER cachefront_upd ON employees",
            "UPDATE employees SET name = 'Robert Smith' WHERE id = 2",
        ),
        (
            "ALTER TABLE employees DISABLE TRIGGER cachefront_upd",
            "UPDATE employees SET name = 'Bobby Smith' WHERE id = 2",
        ),
    ] {
        cache(&s, &mut raw, &pg, &[&bob, &all]).await;
        write(&pg, ddl).await;
        // The DDL's invalidation drops the table's entries (asynchronously: a read before it
        // lands is a hit, which reinstalls nothing) ...
        for q in [&bob, &all] {
            common::eventually_within(FRESH, &format!("{} dropped after {ddl}", q.key), || async {
                !common::fresh::in_valkey(&s, &q.key).await
            })
            .await;
        }
        // ... and the next miss puts the trigger back before it stores.
        cache(&s, &mut raw, &pg, &[&bob, &all]).await;
        let enabled = s.psql(
            "SELECT tgenabled FROM pg_trigger WHERE tgname = 'cachefront_upd' AND tgrelid = 'employees'::regclass",
        );
        assert_eq!(enabled.trim(), "A", "after {ddl}");
        write(&pg, dml).await;
        fresh(&mut raw, &pg, &[&bob, &all], ddl).await;
    }
}

// ---------------------------------------------------------------------------------------
// 7c. A table that cannot report its writes; a lost change stream
// ---------------------------------------------------------------------------------------

/// cachefront runs as a role that owns nothing and is no superuser: it cannot put triggers on
/// the table (nor publish it, nor install the DDL event trigger). Its reads are answered
/// fresh from PostgreSQL and stored nowhere, the failure is reported, and once the role may,
/// the next miss after the retry delay makes the table report its writes and caches again.
async fn a_table_that_cannot_report_writes_is_not_cached(source: &str) {
    let role = format!("reader_{}", std::process::id());
    let source = source.to_string();
    let schema = format!(
        "DO $$ BEGIN CREATE ROLE {role} LOGIN REPLICATION; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         CREATE TABLE gauges (id int PRIMARY KEY, v int NOT NULL);
         INSERT INTO gauges VALUES (1, 10);
         GRANT SELECT ON gauges TO {role};
         DO $$ BEGIN EXECUTE format('GRANT CREATE, TEMP ON DATABASE %I TO {role}', current_database()); END $$;"
    );
    let s = stack_on(&schema, {
        let role = role.clone();
        move |c| {
            set_source(c, &source);
            c.postgres.url = c.postgres.url.replacen("postgres@", &format!("{role}@"), 1);
        }
    })
    .await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let q = Q::sql("SELECT id, v FROM gauges ORDER BY id");
    for round in 0..3 {
        settle(&mut raw, &pg, &q, "an unwatched read").await;
        assert!(
            !common::fresh::in_valkey(&s, &q.key).await,
            "stored although the table cannot report writes (round {round})"
        );
        write(&pg, "UPDATE gauges SET v = v + 1 WHERE id = 1").await;
        fresh(&mut raw, &pg, &[&q], "a write to an unwatched table").await;
    }
    let info = raw.call(&[b"INFO", b"cachefront"]).await;
    let field = |name: &str| {
        common::info_field(&info, name)
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("{name} in {info}"))
    };
    assert!(field("invalidation_unwatched_tables") >= 1, "{info}");
    assert!(field("watch_failures") >= 1, "{info}");
    assert!(field("unwatched_reads") >= 3, "{info}");
    assert_eq!(field("invalidation_ddl_hook"), 0, "{info}");
    // The role may now: the next miss after the retry delay installs, then caches.
    write(&pg, &format!("ALTER TABLE gauges OWNER TO {role}")).await;
    let started = Instant::now();
    while !common::fresh::in_valkey(&s, &q.key).await {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "never cached once the table could report its writes"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = q.ours(&mut raw).await;
    }
    write(&pg, "UPDATE gauges SET v = v + 1 WHERE id = 1").await;
    fresh(&mut raw, &pg, &[&q], "a write once watched").await;
}

/// The change stream is cut from the server side (the LISTEN connection, or the WAL
/// sender): what was written while nobody received it cannot be vouched for, so everything
/// cached is flushed when the stream is back.
async fn a_lost_change_stream_flushes_what_it_cannot_vouch_for(source: &str) {
    let s = stack(source, "", &[]).await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let bob = Q::value(
        &["EMP.GET", "2"],
        "SELECT name FROM employees WHERE id = 2",
        "employee:2",
    );
    let all = Q::sql("SELECT id, name FROM employees ORDER BY id");
    cache(&s, &mut raw, &pg, &[&bob, &all]).await;
    let reconnects = s
        .proxy
        .shared
        .metrics
        .listener_reconnects
        .load(std::sync::atomic::Ordering::Relaxed);
    // The listener's connection (triggers) or the WAL sender and its companion (wal).
    s.psql(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
          WHERE pid <> pg_backend_pid() AND application_name LIKE 'cachefront%'
            AND (query LIKE 'LISTEN%' OR backend_type = 'walsender' OR query LIKE '%pg_logical_emit_message%' OR query = 'SELECT 1')",
    );
    let shared = s.proxy.shared.clone();
    let cut = Instant::now();
    common::eventually_within(Duration::from_secs(20), "the change stream back", || {
        let shared = shared.clone();
        async move {
            shared
                .metrics
                .listener_reconnects
                .load(std::sync::atomic::Ordering::Relaxed)
                > reconnects
                && shared.is_listening()
        }
    })
    .await;
    eprintln!(
        "{source}: the change stream back {:?} after the cut",
        cut.elapsed()
    );
    common::eventually_within(FRESH, "everything flushed", || async {
        !common::fresh::in_valkey(&s, &bob.key).await
            && !common::fresh::in_valkey(&s, &all.key).await
    })
    .await;
    // And it works again.
    cache(&s, &mut raw, &pg, &[&bob, &all]).await;
    write(
        &pg,
        "UPDATE employees SET name = 'Robert Smith' WHERE id = 2",
    )
    .await;
    fresh(
        &mut raw,
        &pg,
        &[&bob, &all],
        "a write after the stream came back",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 8. session_replication_role = replica
// ---------------------------------------------------------------------------------------

/// pg_restore, logical replication apply and bulk loaders write as `replica`: their writes
/// reach the cache too.
async fn writes_under_replication_role_replica(source: &str) {
    let source = source.to_string();
    let s = stack_on("", move |c| {
        set_source(c, &source);
        c.cache.negative_ttl = 60;
    })
    .await;
    let pg = s.pg().await;
    let replica = s.pg().await;
    write(&replica, "SET session_replication_role = replica").await;
    let mut raw = s.raw().await;
    let all = Q::sql("SELECT id, name FROM employees ORDER BY id");
    let bob = Q::value(
        &["EMP.GET", "2"],
        "SELECT name FROM employees WHERE id = 2",
        "employee:2",
    );
    let sixth = Q::value(
        &["EMP.GET", "6"],
        "SELECT name FROM employees WHERE id = 6",
        "cachefront:n:employee:6",
    );
    cache(&s, &mut raw, &pg, &[&all, &bob, &sixth]).await;
    write(
        &replica,
        "UPDATE employees SET name = 'Robert Smith' WHERE id = 2",
    )
    .await;
    fresh(&mut raw, &pg, &[&bob, &all], "UPDATE as replica").await;
    write(
        &replica,
        "INSERT INTO employees (id, name, job_title, dept_id) VALUES (6, 'Fiona Green', 'Analyst', 1)",
    )
    .await;
    fresh(&mut raw, &pg, &[&sixth, &all], "INSERT as replica").await;
    write(&replica, "DELETE FROM employees WHERE id = 6").await;
    fresh(&mut raw, &pg, &[&sixth, &all], "DELETE as replica").await;
    cache(&s, &mut raw, &pg, &[&all, &bob]).await;
    write(&replica, "TRUNCATE employees").await;
    fresh(&mut raw, &pg, &[&bob, &all], "TRUNCATE as replica").await;
}

// ---------------------------------------------------------------------------------------
// 9. TRUNCATE and COPY
// ---------------------------------------------------------------------------------------

const LEDGER: &str = "
CREATE TABLE ledger (id int PRIMARY KEY, amount int NOT NULL);
INSERT INTO ledger VALUES (1, 10), (2, 20);";

/// Rows `COPY … FROM STDIN` through tokio-postgres's `copy_in`.
async fn copy_in(pg: &Client, copy: &str, data: &str) {
    use futures::SinkExt;
    let sink = pg
        .copy_in::<_, bytes::Bytes>(copy)
        .await
        .unwrap_or_else(|e| panic!("{copy}: {e:?}"));
    futures::pin_mut!(sink);
    sink.send(bytes::Bytes::from(data.to_string()))
        .await
        .expect("COPY data");
    let n = sink.finish().await.expect("COPY finishes");
    assert_eq!(n as usize, data.lines().count());
}

/// COPY and TRUNCATE are writes like the others.
async fn truncate_and_copy(source: &str) {
    let source = source.to_string();
    let s = stack_on(LEDGER, move |c| {
        set_source(c, &source);
        c.queries.push(named(
            "command = \"LEDGER.AMOUNT\"\nsql = \"SELECT amount FROM ledger WHERE id = $1\"\nkey = \"ledger:{1}\"\nargs = [\"int\"]\nkey_column = \"ledger.id\"\nnegative_ttl = 60",
        ));
    })
    .await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let totals = Q::sql("SELECT count(*) AS n, coalesce(sum(amount), 0) AS total FROM ledger");
    let rows = Q::sql("SELECT id, amount FROM ledger ORDER BY id");
    let first = Q::value(
        &["LEDGER.AMOUNT", "1"],
        "SELECT amount FROM ledger WHERE id = 1",
        "ledger:1",
    );
    let third = Q::value(
        &["LEDGER.AMOUNT", "3"],
        "SELECT amount FROM ledger WHERE id = 3",
        "cachefront:n:ledger:3",
    );
    cache(&s, &mut raw, &pg, &[&totals, &rows, &first, &third]).await;
    copy_in(&pg, "COPY ledger (id, amount) FROM STDIN", "3\t30\n4\t40\n").await;
    fresh(
        &mut raw,
        &pg,
        &[&totals, &rows, &third],
        "COPY ledger FROM STDIN",
    )
    .await;
    cache(&s, &mut raw, &pg, &[&totals, &rows, &first]).await;
    write(&pg, "TRUNCATE ledger").await;
    fresh(
        &mut raw,
        &pg,
        &[&totals, &rows, &first, &third],
        "TRUNCATE ledger",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 10. DDL on a dependency
// ---------------------------------------------------------------------------------------

const GADGETS: &str = "
CREATE TABLE gadgets (id int PRIMARY KEY, name text NOT NULL);
INSERT INTO gadgets VALUES (1, 'lever'), (2, 'pulley');";

/// `SELECT *` gets a new column at once, loses a dropped one, and writes after the ALTER
/// still reach it.
async fn ddl_add_and_drop_column(source: &str) {
    let star = "SELECT * FROM gadgets ORDER BY id";
    let s = stack(
        source,
        GADGETS,
        &[&format!(
            "command = \"GADGETS.ALL\"\nsql = \"{star}\"\nkey = \"gadgets:all\"\nreply = \"json\""
        )],
    )
    .await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let sql = Q::sql(star);
    let named = Q::json(&["GADGETS.ALL"], star, "gadgets:all");
    cache(&s, &mut raw, &pg, &[&sql, &named]).await;
    write(
        &pg,
        "ALTER TABLE gadgets ADD COLUMN color text NOT NULL DEFAULT 'red'",
    )
    .await;
    fresh(&mut raw, &pg, &[&sql, &named], "ALTER TABLE ADD COLUMN").await;
    write(&pg, "UPDATE gadgets SET color = 'blue' WHERE id = 2").await;
    fresh(&mut raw, &pg, &[&sql, &named], "UPDATE of the added column").await;
    write(&pg, "ALTER TABLE gadgets DROP COLUMN color").await;
    fresh(&mut raw, &pg, &[&sql, &named], "ALTER TABLE DROP COLUMN").await;
    write(&pg, "ALTER TABLE gadgets ALTER COLUMN id TYPE bigint").await;
    fresh(&mut raw, &pg, &[&sql, &named], "ALTER COLUMN TYPE").await;
    write(&pg, "INSERT INTO gadgets VALUES (3, 'wedge')").await;
    fresh(&mut raw, &pg, &[&sql, &named], "INSERT after the ALTERs").await;
}

/// After a RENAME the old query errors as PostgreSQL does (or answers what PostgreSQL
/// answers: a new table of the old name); the renamed table's own entries stay fresh.
async fn ddl_rename(source: &str) {
    let s = stack(source, GADGETS, &[]).await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let named_cols = Q::sql("SELECT id, name FROM gadgets ORDER BY id");
    let star = Q::sql("SELECT * FROM gadgets ORDER BY id");
    cache(&s, &mut raw, &pg, &[&named_cols, &star]).await;
    write(&pg, "ALTER TABLE gadgets RENAME COLUMN name TO label").await;
    fresh(&mut raw, &pg, &[&named_cols, &star], "RENAME COLUMN").await;
    assert!(named_cols.ours(&mut raw).await.is_error());
    write(&pg, "ALTER TABLE gadgets RENAME TO widgets").await;
    fresh(&mut raw, &pg, &[&named_cols, &star], "RENAME TO").await;
    assert!(star.ours(&mut raw).await.is_error());
    let renamed = Q::sql("SELECT id, label FROM widgets ORDER BY id");
    cache(&s, &mut raw, &pg, &[&renamed]).await;
    write(&pg, "UPDATE widgets SET label = 'crank' WHERE id = 1").await;
    fresh(&mut raw, &pg, &[&renamed], "UPDATE of the renamed table").await;
    write(
        &pg,
        "CREATE TABLE gadgets (id int PRIMARY KEY, name text NOT NULL); INSERT INTO gadgets VALUES (9, 'spring')",
    )
    .await;
    fresh(
        &mut raw,
        &pg,
        &[&named_cols, &star],
        "a new table of the old name",
    )
    .await;
    cache(&s, &mut raw, &pg, &[&named_cols]).await;
    write(&pg, "UPDATE gadgets SET name = 'coil' WHERE id = 9").await;
    fresh(
        &mut raw,
        &pg,
        &[&named_cols, &star],
        "UPDATE of the new table of the old name",
    )
    .await;
}

/// DROP TABLE: an error, not the cached answer; a table created again under the name is
/// followed like any other.
async fn ddl_drop_table(source: &str) {
    let all = "SELECT id, name FROM gadgets ORDER BY id";
    let s = stack(
        source,
        GADGETS,
        &[&format!(
            "command = \"GADGETS.ALL\"\nsql = \"{all}\"\nkey = \"gadgets:all\"\nreply = \"json\""
        )],
    )
    .await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let sql = Q::sql(all);
    let named = Q::json(&["GADGETS.ALL"], all, "gadgets:all");
    cache(&s, &mut raw, &pg, &[&sql, &named]).await;
    write(&pg, "DROP TABLE gadgets").await;
    fresh(&mut raw, &pg, &[&sql, &named], "DROP TABLE").await;
    assert!(sql.ours(&mut raw).await.is_error());
    write(
        &pg,
        "CREATE TABLE gadgets (id int PRIMARY KEY, name text NOT NULL); INSERT INTO gadgets VALUES (7, 'cam')",
    )
    .await;
    cache(&s, &mut raw, &pg, &[&sql, &named]).await;
    write(&pg, "UPDATE gadgets SET name = 'gear' WHERE id = 7").await;
    fresh(
        &mut raw,
        &pg,
        &[&sql, &named],
        "UPDATE of the table created again",
    )
    .await;
}

/// REFRESH MATERIALIZED VIEW: the refreshed data, or a refusal that gives the reason.
async fn ddl_refresh_materialized_view(source: &str) {
    let s = stack(
        source,
        "CREATE MATERIALIZED VIEW dept_sizes AS SELECT dept_id, count(*) AS n FROM employees GROUP BY dept_id",
        &[],
    )
    .await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let sql = "SELECT dept_id, n FROM dept_sizes ORDER BY dept_id";
    let first = raw.call(&[b"SQL.CACHED", sql.as_bytes()]).await;
    if first.starts_with("-ERR SQL.CACHED cannot keep this query fresh: ") {
        eprintln!("materialized view refused: {first:?}");
        assert!(first.ends_with(SQL_REFUSAL_SUFFIX), "{first:?}");
        assert!(
            first.contains("dept_sizes"),
            "the reason names it: {first:?}"
        );
        return;
    }
    let q = Q::sql(sql);
    cache(&s, &mut raw, &pg, &[&q]).await;
    write(
        &pg,
        "INSERT INTO employees (name, job_title, dept_id) VALUES ('Fiona Green', 'Analyst', 1)",
    )
    .await;
    // The matview has not changed yet: the cached answer is still PostgreSQL's.
    fresh(&mut raw, &pg, &[&q], "a write under the unrefreshed view").await;
    cache(&s, &mut raw, &pg, &[&q]).await;
    write(&pg, "REFRESH MATERIALIZED VIEW dept_sizes").await;
    fresh(&mut raw, &pg, &[&q], "REFRESH MATERIALIZED VIEW").await;
    write(&pg, "DROP MATERIALIZED VIEW dept_sizes").await;
    fresh(&mut raw, &pg, &[&q], "DROP MATERIALIZED VIEW").await;
}

// ---------------------------------------------------------------------------------------
// 11. The triggers never break the application
// ---------------------------------------------------------------------------------------

/// EMP.GET binds to employees.id; renaming that column must not make the application's
/// writes fail, and EMP.GET then errors as PostgreSQL does rather than answer from cache.
async fn writes_still_work_after_a_key_column_is_renamed(source: &str) {
    let s = stack(source, "", &[]).await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let alice = Q::value(
        &["EMP.GET", "1"],
        "SELECT name FROM employees WHERE id = 1",
        "employee:1",
    );
    cache(&s, &mut raw, &pg, &[&alice]).await;
    write(&pg, "ALTER TABLE employees RENAME COLUMN id TO emp_id").await;
    for sql in [
        "UPDATE employees SET name = 'Alicia Johnson' WHERE emp_id = 1",
        "INSERT INTO employees (name, job_title, dept_id) VALUES ('Fiona Green', 'Analyst', 1)",
        "DELETE FROM employees WHERE name = 'Fiona Green'",
        "TRUNCATE employees",
    ] {
        if let Err(e) = pg.batch_execute(sql).await {
            panic!("the application's write fails after RENAME COLUMN id: {sql}: {e:?}");
        }
    }
    fresh(&mut raw, &pg, &[&alice], "RENAME COLUMN id TO emp_id").await;
    assert!(alice.ours(&mut raw).await.is_error());
    write(
        &pg,
        "INSERT INTO employees (name, job_title, dept_id) VALUES ('Gus Hill', 'Clerk', 2)",
    )
    .await;
    let all = Q::sql("SELECT emp_id, name FROM employees ORDER BY emp_id");
    cache(&s, &mut raw, &pg, &[&all]).await;
    write(&pg, "UPDATE employees SET name = 'Gustav Hill'").await;
    fresh(&mut raw, &pg, &[&all], "UPDATE after the rename").await;
}

/// Every Markdown file the user reads: README and docs/ (not docs/testing.md, which
/// describes these tests rather than cachefront).
fn user_docs() -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut text = std::fs::read_to_string(root.join("README.md")).unwrap_or_default();
    for e in std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .flatten()
    {
        if e.path().extension().is_some_and(|x| x == "md") && e.file_name() != "testing.md" {
            text.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    text
}

/// PREPARE TRANSACTION on a table cachefront watches: either it works and COMMIT PREPARED
/// reaches the cache, or PostgreSQL refuses it with its own clear error (a NOTIFY cannot be
/// prepared) — and then the documentation says so. Never silent.
async fn prepare_transaction(source: &str) {
    let s = stack(source, "", &[]).await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let charlie = Q::value(
        &["EMP.GET", "3"],
        "SELECT name FROM employees WHERE id = 3",
        "employee:3",
    );
    let all = Q::sql("SELECT id, name FROM employees ORDER BY id");
    cache(&s, &mut raw, &pg, &[&charlie, &all]).await;
    let prepared = pg
        .batch_execute(
            "BEGIN; UPDATE employees SET name = 'Charles Brown' WHERE id = 3; PREPARE TRANSACTION 'cachefront_test_2pc'",
        )
        .await;
    match prepared {
        Ok(()) => {
            eprintln!("{source}: PREPARE TRANSACTION succeeded");
            // Prepared, not committed: PostgreSQL still answers the old name.
            fresh(&mut raw, &pg, &[&charlie, &all], "PREPARE TRANSACTION").await;
            write(&pg, "COMMIT PREPARED 'cachefront_test_2pc'").await;
            fresh(&mut raw, &pg, &[&charlie, &all], "COMMIT PREPARED").await;
            let Answer::Value(name) = charlie.ours(&mut raw).await else {
                panic!("EMP.GET 3 is a value")
            };
            assert_eq!(name.as_deref(), Some("Charles Brown"));
        }
        Err(e) => {
            let msg = e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string());
            eprintln!("{source}: PREPARE TRANSACTION refused by PostgreSQL: {msg}");
            assert!(
                msg.contains("PREPARE") && msg.contains("NOTIFY"),
                "PostgreSQL's refusal names the reason: {msg}"
            );
            assert!(
                user_docs().contains("PREPARE TRANSACTION"),
                "PREPARE TRANSACTION fails on tables with cachefront's triggers ({msg}); \
                 the documentation must say so"
            );
            // The failed PREPARE rolled the transaction back: nothing changed.
            let _ = pg.batch_execute("ROLLBACK").await;
            fresh(
                &mut raw,
                &pg,
                &[&charlie, &all],
                "a refused PREPARE TRANSACTION",
            )
            .await;
        }
    }
}

/// Counts what cachefront installed in the database: triggers on tables (by name or by
/// function), event triggers, functions and the `cachefront` schema.
fn installed(db: &common::services::TestDb) -> (u64, u64, u64, u64) {
    let count = |sql: &str| -> u64 {
        common::services::postgres()
            .psql(db.name(), sql)
            .parse()
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    };
    let cf_funcs = "SELECT p.oid FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
                     WHERE n.nspname = 'cachefront' OR p.proname ILIKE 'cachefront%'";
    (
        count(&format!(
            "SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal
               AND (tgname ILIKE 'cachefront%' OR tgfoid IN ({cf_funcs}))"
        )),
        count(&format!(
            "SELECT count(*) FROM pg_event_trigger
              WHERE evtname ILIKE '%cachefront%' OR evtfoid IN ({cf_funcs})"
        )),
        count(&format!("SELECT count(*) FROM ({cf_funcs}) f")),
        count("SELECT count(*) FROM pg_namespace WHERE nspname = 'cachefront'"),
    )
}

/// `cachefront triggers remove` takes away everything cachefront installed — event trigger
/// included — and the application works on without it.
async fn triggers_remove_takes_everything(source: &str) {
    let s = stack(source, &format!("{TWO_ITEMS}{EVENTS}{VIEWS}"), &[]).await;
    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let reads = [
        Q::value(
            &["EMP.GET", "1"],
            "SELECT name FROM employees WHERE id = 1",
            "employee:1",
        ),
        Q::sql("SELECT id, name FROM app.items ORDER BY id"),
        Q::sql(EVENT_TOTALS),
        Q::sql("SELECT id, n FROM events_eu ORDER BY id"),
        Q::sql("SELECT name FROM low_names ORDER BY name"),
    ];
    cache(&s, &mut raw, &pg, &reads.iter().collect::<Vec<_>>()).await;
    let before = installed(&s.db);
    eprintln!("{source}: installed (triggers, event triggers, functions, schemas) = {before:?}");
    if source == "wal" {
        assert_eq!(before.0, 0, "the WAL source installs nothing on tables");
    } else {
        assert!(before.0 > 0, "triggers were installed: {before:?}");
        // The contract: the triggers source sees DDL through a database event trigger.
        assert!(
            before.1 > 0,
            "an event trigger for DDL was installed: {before:?}"
        );
    }
    // Removal is done with cachefront stopped (it would put its triggers back on next use).
    let Stack { valkey, db, proxy } = s;
    proxy.shutdown().await;
    drop(valkey);
    for _ in 0..2 {
        common::run_ok(
            common::cachefront_cmd()
                .args(["triggers", "remove"])
                .env("CACHEFRONT_POSTGRES_URL", db.url())
                .env("RUST_LOG", "error"),
        );
    }
    assert_eq!(installed(&db), (0, 0, 0, 0), "left after `triggers remove`");
    for sql in [
        "UPDATE employees SET name = 'Alicia Johnson' WHERE id = 1",
        "UPDATE app.items SET name = 'x' WHERE id = 1",
        "INSERT INTO events VALUES (9, 'eu', 9)",
        "CREATE TABLE after_removal (id int); DROP TABLE after_removal",
        "ALTER TABLE app.items ADD COLUMN spare int",
    ] {
        if let Err(e) = pg.batch_execute(sql).await {
            panic!("after `triggers remove`: {sql}: {e:?}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// 12. The randomized freshness audit
// ---------------------------------------------------------------------------------------

const AUDIT_SCHEMA: &str = "
CREATE TABLE sales (id int NOT NULL, region text NOT NULL, amount int NOT NULL, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE sales_eu PARTITION OF sales FOR VALUES IN ('eu');
CREATE TABLE sales_us PARTITION OF sales FOR VALUES IN ('us');
CREATE TABLE sales_asia (id int NOT NULL, region text NOT NULL CHECK (region = 'asia'), amount int NOT NULL, PRIMARY KEY (id, region));
INSERT INTO sales SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, g * 3 % 100 FROM generate_series(1, 40) g;
INSERT INTO sales_asia SELECT g, 'asia', g * 7 % 100 FROM generate_series(41, 45) g;
CREATE TABLE animals (id int PRIMARY KEY, name text NOT NULL, legs int NOT NULL);
CREATE TABLE birds (wingspan int NOT NULL DEFAULT 30, PRIMARY KEY (id)) INHERITS (animals);
INSERT INTO animals SELECT g, 'animal' || g, 4 FROM generate_series(1, 10) g;
INSERT INTO birds SELECT g, 'bird' || g, 2, g FROM generate_series(11, 15) g;
CREATE SCHEMA app;
CREATE TABLE app.items (id int PRIMARY KEY, name text NOT NULL, qty int NOT NULL);
CREATE TABLE public.items (id int PRIMARY KEY, name text NOT NULL, qty int NOT NULL);
INSERT INTO app.items SELECT g, 'app' || g, g FROM generate_series(1, 10) g;
INSERT INTO public.items SELECT g, 'pub' || g, g FROM generate_series(1, 10) g;
CREATE VIEW big_sales AS SELECT id, region, amount FROM sales WHERE amount > 50;
CREATE FUNCTION region_total(r text) RETURNS bigint LANGUAGE sql STABLE
BEGIN ATOMIC SELECT coalesce(sum(amount), 0) FROM sales WHERE region = r; END;
CREATE FUNCTION animal_count() RETURNS bigint LANGUAGE sql STABLE
BEGIN ATOMIC SELECT count(*) FROM animals; END;";

/// The audit's SQL.CACHED reads; each has an ORDER BY that makes its answer deterministic.
const AUDIT_QUERIES: [&str; 20] = [
    "SELECT id, region, amount FROM sales ORDER BY id, region",
    "SELECT region, count(*) AS n, sum(amount) AS total FROM sales GROUP BY region ORDER BY region",
    "SELECT id, amount FROM sales_eu ORDER BY id, amount",
    "SELECT id, amount FROM sales_us ORDER BY id, amount",
    "SELECT id, region, amount FROM sales_asia ORDER BY id, amount",
    "SELECT id, region, amount FROM big_sales ORDER BY id, region, amount",
    "SELECT count(*) AS n FROM big_sales",
    "SELECT region_total('eu') AS eu, region_total('us') AS us, region_total('asia') AS asia",
    "SELECT id, name, legs FROM animals ORDER BY id, name",
    "SELECT id, name, wingspan FROM birds ORDER BY id, name",
    "SELECT id, name FROM ONLY animals ORDER BY id, name",
    "SELECT animal_count() AS n",
    "SELECT * FROM app.items ORDER BY id",
    "SELECT id, qty FROM app.items WHERE qty > 5 ORDER BY id",
    "SELECT id, name, qty FROM items ORDER BY id",
    "WITH items AS (SELECT * FROM app.items) SELECT count(*) AS n, sum(qty) AS q FROM items",
    "SELECT a.name, i.qty FROM animals a JOIN app.items i ON i.id = a.id ORDER BY a.name, i.qty",
    "SELECT s.region, count(*) AS n FROM sales s JOIN big_sales b ON b.id = s.id GROUP BY s.region ORDER BY s.region",
    "SELECT max(id) AS m, min(amount) AS lo FROM sales",
    "SELECT count(*) AS n FROM animals WHERE legs = 2",
];

const AUDIT_REGION: &str = "SELECT id, amount FROM sales WHERE region = $1 ORDER BY id, amount";

/// The audit's reads: the SQL.CACHED ones and named queries over the same tables.
fn audit_reads() -> Vec<Q> {
    let mut qs: Vec<Q> = AUDIT_QUERIES.iter().map(|q| Q::sql(q)).collect();
    for region in ["eu", "us", "asia"] {
        qs.push(Q::json(
            &["AUDIT.REGION", region],
            &AUDIT_REGION.replace("$1", &format!("'{region}'")),
            &format!("audit:region:{region}"),
        ));
    }
    qs.push(Q::json(
        &["AUDIT.ITEMS"],
        "SELECT * FROM app.items ORDER BY id",
        "audit:items",
    ));
    qs
}

/// One random write of the audit, drawn from the writer's seeded generator (the sequence of
/// kinds is the seed's; the ids depend on how the two writers interleave): its SQL (a COPY
/// as `COPY …` plus its data), and whether it is DDL. Weights: ~75 % DML (a tenth of it as
/// `replica`), ~23 % DDL.
fn audit_write(
    rng: &mut rand::rngs::StdRng,
    next_id: &std::sync::atomic::AtomicI32,
) -> (String, Option<String>, bool) {
    use rand::Rng;
    use std::sync::atomic::Ordering::Relaxed;
    let top = next_id.load(Relaxed);
    match rng.gen_range(0..100) {
        0..=14 => {
            let region = if rng.gen_bool(0.5) { "eu" } else { "us" };
            (format!("INSERT INTO sales VALUES ({}, '{region}', {})", next_id.fetch_add(1, Relaxed), rng.gen_range(0..100)), None, false)
        }
        15..=26 => (format!("UPDATE sales SET amount = {} WHERE id = {}", rng.gen_range(0..100), some_id(rng, top)), None, false),
        27..=32 => (format!("UPDATE sales_eu SET amount = amount + 7 WHERE id % 5 = {}", rng.gen_range(0..5)), None, false),
        33..=36 => (format!("DELETE FROM sales WHERE id = {}", some_id(rng, top)), None, false),
        37..=41 => (format!("INSERT INTO sales_asia VALUES ({}, 'asia', {})", next_id.fetch_add(1, Relaxed), rng.gen_range(0..100)), None, false),
        42..=46 => (format!("INSERT INTO birds VALUES ({}, 'bird', 2, {})", next_id.fetch_add(1, Relaxed), rng.gen_range(1..90)), None, false),
        47..=50 => (format!("UPDATE birds SET wingspan = wingspan + 1 WHERE id % 3 = {}", rng.gen_range(0..3)), None, false),
        51..=54 => (format!("INSERT INTO animals VALUES ({}, 'animal', {})", next_id.fetch_add(1, Relaxed), rng.gen_range(2..5)), None, false),
        55..=57 => (format!("UPDATE animals SET legs = {} WHERE id = {}", rng.gen_range(2..5), some_id(rng, top)), None, false),
        58..=59 => (format!("DELETE FROM animals WHERE id = {}", some_id(rng, top)), None, false),
        60..=65 => (format!("UPDATE app.items SET qty = {} WHERE id = {}", rng.gen_range(0..20), rng.gen_range(1..12)), None, false),
        66..=67 => (format!("INSERT INTO app.items VALUES ({}, 'new', {}) ON CONFLICT DO NOTHING", next_id.fetch_add(1, Relaxed), rng.gen_range(0..20)), None, false),
        68..=70 => (format!("UPDATE items SET qty = qty + 1 WHERE id = {}", rng.gen_range(1..11)), None, false),
        71..=74 => (
            format!(
                "BEGIN; SET LOCAL session_replication_role = replica; UPDATE sales SET amount = {} WHERE id = {}; UPDATE app.items SET qty = qty + 1 WHERE id = {}; UPDATE birds SET legs = 2 WHERE id = {}; COMMIT",
                rng.gen_range(0..100), some_id(rng, top), rng.gen_range(1..11), some_id(rng, top)
            ),
            None,
            false,
        ),
        75..=76 => {
            let (a, b) = (next_id.fetch_add(1, Relaxed), next_id.fetch_add(1, Relaxed));
            ("COPY birds (id, name, legs, wingspan) FROM STDIN".into(), Some(format!("{a}\tcopied\t2\t11\n{b}\tcopied\t2\t12\n")), false)
        }
        77..=80 => (format!("ALTER TABLE app.items ADD COLUMN IF NOT EXISTS spare int DEFAULT {}", rng.gen_range(0..9)), None, true),
        81..=84 => ("ALTER TABLE app.items DROP COLUMN IF EXISTS spare".into(), None, true),
        85..=87 => ("ALTER TABLE sales ATTACH PARTITION sales_asia FOR VALUES IN ('asia')".into(), None, true),
        88..=90 => ("ALTER TABLE sales DETACH PARTITION sales_asia".into(), None, true),
        91..=94 => (
            format!("CREATE OR REPLACE VIEW big_sales AS SELECT id, region, amount FROM sales WHERE amount > {}", [20, 50, 80][rng.gen_range(0..3)]),
            None,
            true,
        ),
        95..=96 => (
            format!(
                "CREATE OR REPLACE FUNCTION animal_count() RETURNS bigint LANGUAGE sql STABLE BEGIN ATOMIC SELECT count(*) FROM animals WHERE legs >= {}; END",
                rng.gen_range(0..3)
            ),
            None,
            true,
        ),
        _ => (["TRUNCATE birds", "TRUNCATE app.items", "TRUNCATE sales_us"][rng.gen_range(0..3)].into(), None, true),
    }
}

/// An id likely to exist: one of the seeded rows (1–45) or one inserted since (1000–`top`).
fn some_id(rng: &mut rand::rngs::StdRng, top: i32) -> i32 {
    use rand::Rng;
    if top <= 1000 || rng.gen_bool(0.5) {
        rng.gen_range(1..=45)
    } else {
        rng.gen_range(1000..top)
    }
}

/// What the audit counted.
#[derive(Default, Debug)]
struct AuditCounts {
    writes: u64,
    ddl: u64,
    failed_writes: u64,
    reads: u64,
    read_errors: u64,
}

/// Writers mix DML and DDL over partitioned, inherited, schema-qualified, view- and
/// function-backed tables while readers hammer cached reads; once writes stop (and 200 ms
/// have passed), every read answers what PostgreSQL answers, and `verify_mismatches` (where
/// INFO has it) stays 0 throughout.
async fn randomized_audit(source: &str) {
    use rand::{Rng, SeedableRng};
    use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering::Relaxed};
    use std::sync::{Arc, Mutex};
    let seed: u64 = std::env::var("FRESHNESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_240_612);
    let secs: u64 = std::env::var("FRESHNESS_AUDIT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    eprintln!("freshness audit ({source}): FRESHNESS_SEED={seed} FRESHNESS_AUDIT_SECS={secs}");
    let started = Instant::now();
    let s = stack(
        source,
        AUDIT_SCHEMA,
        &[
            &format!("command = \"AUDIT.REGION\"\nsql = \"{AUDIT_REGION}\"\nkey = \"audit:region:{{1}}\"\nargs = [\"text\"]\nreply = \"json\""),
            "command = \"AUDIT.ITEMS\"\nsql = \"SELECT * FROM app.items ORDER BY id\"\nkey = \"audit:items\"\nreply = \"json\"",
        ],
    )
    .await;
    let reads = Arc::new(audit_reads());
    let next_id = Arc::new(AtomicI32::new(1000));
    let writing = Arc::new(AtomicBool::new(true));
    let reading = Arc::new(AtomicBool::new(true));
    let counts = Arc::new(Mutex::new(AuditCounts::default()));
    let read_errors = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let write_errors = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
    let verify_max = Arc::new(AtomicU64::new(0));
    let verify_seen = Arc::new(AtomicBool::new(false));

    let mut writers = Vec::new();
    for w in 0..2u64 {
        let pg = s.pg().await;
        let (next_id, writing, counts, write_errors) = (
            next_id.clone(),
            writing.clone(),
            counts.clone(),
            write_errors.clone(),
        );
        writers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(w));
            while writing.load(Relaxed) {
                let (sql, copy, ddl) = audit_write(&mut rng, &next_id);
                let result: Result<(), tokio_postgres::Error> = match &copy {
                    Some(data) => {
                        let run = async {
                            use futures::SinkExt;
                            let sink = pg.copy_in::<_, bytes::Bytes>(sql.as_str()).await?;
                            futures::pin_mut!(sink);
                            sink.send(bytes::Bytes::from(data.clone())).await?;
                            sink.finish().await
                        };
                        run.await.map(|_| ())
                    }
                    None => {
                        let r = pg.batch_execute(&sql).await;
                        if r.is_err() {
                            // A failed statement inside BEGIN … COMMIT leaves it open.
                            let _ = pg.batch_execute("ROLLBACK").await;
                        }
                        r
                    }
                };
                let ok = result.is_ok();
                if let Err(e) = result {
                    let msg = e.as_db_error().map(|d| d.message().to_string());
                    let mut op: String = sql.chars().take(40).collect();
                    op.push_str(&format!("…: {}", msg.unwrap_or_else(|| e.to_string())));
                    write_errors.lock().unwrap().insert(op);
                }
                {
                    let mut c = counts.lock().unwrap();
                    if ok {
                        c.writes += 1;
                        c.ddl += u64::from(ddl);
                    } else {
                        c.failed_writes += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    let mut readers = Vec::new();
    for r in 0..4u64 {
        let mut raw = s.raw().await;
        let (reads, reading, counts, read_errors) = (
            reads.clone(),
            reading.clone(),
            counts.clone(),
            read_errors.clone(),
        );
        readers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (0x5eed << 8) ^ r);
            while reading.load(Relaxed) {
                let q = &reads[rng.gen_range(0..reads.len())];
                let answer = q.ours(&mut raw).await;
                let mut c = counts.lock().unwrap();
                c.reads += 1;
                if let Answer::Error(e) = answer {
                    c.read_errors += 1;
                    read_errors.lock().unwrap().insert(e);
                }
            }
        }));
    }
    let monitor = {
        let mut raw = s.raw().await;
        let (reading, verify_max, verify_seen) =
            (reading.clone(), verify_max.clone(), verify_seen.clone());
        tokio::spawn(async move {
            while reading.load(Relaxed) {
                if let Some(v) = info_opt(&mut raw, "verify_mismatches").await {
                    verify_seen.store(true, Relaxed);
                    verify_max.fetch_max(v.parse().unwrap_or(u64::MAX), Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(secs)).await;
    writing.store(false, Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    // Writes have stopped; readers go on for 200 ms, so that stale entries, if any, would
    // be kept warm and served.
    tokio::time::sleep(Duration::from_millis(200)).await;
    reading.store(false, Relaxed);
    for r in readers {
        r.await.expect("reader");
    }
    monitor.await.expect("monitor");
    if let Some(ttl) = common::fresh::selftest_ttl_secs() {
        // Self-test of the audit's own logic: every entry has expired by now.
        tokio::time::sleep(Duration::from_millis(ttl * 1000 + 100)).await;
    }

    let pg = s.pg().await;
    let mut raw = s.raw().await;
    let mut differences = Vec::new();
    let mut cached_at_check = 0;
    for q in reads.iter() {
        cached_at_check += usize::from(common::fresh::in_valkey(&s, &q.key).await);
        let ours = q.ours(&mut raw).await;
        let theirs = pg_answer(&pg, &q.pg_sql).await;
        if !ours.same_as_pg(&theirs) {
            differences.push(format!(
                "`{}`\n  cachefront: {ours:?}\n  PostgreSQL: {theirs:?}",
                q.label()
            ));
        }
    }
    if let Some(v) = info_opt(&mut raw, "verify_mismatches").await {
        verify_seen.store(true, Relaxed);
        verify_max.fetch_max(v.parse().unwrap_or(u64::MAX), Relaxed);
    }
    let c = counts.lock().unwrap();
    let verify = if verify_seen.load(Relaxed) {
        verify_max.load(Relaxed).to_string()
    } else {
        "absent".into()
    };
    eprintln!(
        "freshness audit ({source}) seed={seed}: writes={} (ddl={}, failed={}) reads={} (errors={}) \
         comparisons={} (cached at check: {cached_at_check}) differences={} verify_mismatches={verify} in {:?}",
        c.writes,
        c.ddl,
        c.failed_writes,
        c.reads,
        c.read_errors,
        reads.len(),
        differences.len(),
        started.elapsed()
    );
    for e in read_errors.lock().unwrap().iter().take(10) {
        eprintln!("  read error during the storm: {e}");
    }
    for e in write_errors.lock().unwrap().iter().take(20) {
        eprintln!("  failed write (tolerated): {e}");
    }
    assert!(c.writes > 100 && c.ddl > 5, "the storm wrote: {c:?}");
    assert!(c.reads > 100, "the readers read: {c:?}");
    assert!(
        differences.is_empty(),
        "{} of {} cached reads differ from PostgreSQL after writes stopped (FRESHNESS_SEED={seed}):\n{}",
        differences.len(),
        reads.len(),
        differences.join("\n")
    );
    if verify_seen.load(Relaxed) {
        assert_eq!(
            verify_max.load(Relaxed),
            0,
            "verify_mismatches during the audit"
        );
    }
}
