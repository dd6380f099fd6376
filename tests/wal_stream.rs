//! The logical replication change stream (`db::wal`) on a real PostgreSQL: every kind of
//! committed write arrives, in commit order, and nothing else; publishing a table never
//! breaks the application's writes to another; the temporary slot goes with its stream.

mod common;

use bytes::Bytes;
use cachefront::config::PostgresConfig;
use cachefront::db::wal::{
    drop_publication, ensure_publication, publish_tables, replica_identity_problem, Cell, WalEvent,
    WalLimits, WalStream,
};
use common::services::{postgres, TestDb};
use futures::SinkExt;
use std::time::{Duration, Instant};
use tokio_postgres::Client;

const PUBLICATION: &str = "cachefront";
/// How long an expected event may take.
const WAIT: Duration = Duration::from_secs(15);

async fn connect(db: &TestDb) -> Client {
    let (client, conn) = tokio_postgres::connect(&db.url(), tokio_postgres::NoTls)
        .await
        .expect("connect to postgres");
    tokio::spawn(conn);
    client
}

fn config(db: &TestDb) -> PostgresConfig {
    PostgresConfig {
        url: db.url(),
        ..Default::default()
    }
}

async fn oid(client: &Client, table: &str) -> u32 {
    client
        .query_one("SELECT $1::text::regclass::oid", &[&table])
        .await
        .expect("table oid")
        .get(0)
}

fn psql(db: &TestDb, sql: &str) -> String {
    postgres().psql(db.name(), sql)
}

/// The events of the next transaction that has any, and its commit (`lsn`, `end_lsn`).
async fn next_txn(stream: &mut WalStream) -> (Vec<WalEvent>, u64, u64) {
    let mut events = Vec::new();
    loop {
        let event = tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("an event in time")
            .expect("the stream is up");
        match event {
            WalEvent::Commit { lsn, end_lsn } if !events.is_empty() => {
                return (events, lsn, end_lsn)
            }
            WalEvent::Commit { .. } => {}
            other => events.push(other),
        }
    }
}

/// A change as (relation name, old row, new row), for comparing.
type Row = Option<Vec<Cell>>;

fn change(event: &WalEvent) -> (&str, &Row, &Row) {
    match event {
        WalEvent::Change { relation, old, new } => (relation.name.as_str(), old, new),
        other => panic!("not a change: {other:?}"),
    }
}

fn text(v: &str) -> Cell {
    Cell::Text(v.into())
}

/// An employees row as the stream sends it (id, name, job_title, dept_id).
fn employee(id: &str, name: &str, job: &str, dept: &str) -> Row {
    Some(vec![text(id), text(name), text(job), text(dept)])
}

/// The slot exists, or not (it may take a moment to go after its connection closed).
async fn wait_slot(client: &Client, slot: &str, present: bool) {
    let started = Instant::now();
    loop {
        let n: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("read pg_replication_slots")
            .get(0);
        if (n == 1) == present {
            return;
        }
        assert!(
            started.elapsed() < WAIT,
            "slot {slot} still {}",
            if present { "missing" } else { "there" }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_committed_write_arrives_in_commit_order() {
    let db = postgres().fresh_db();
    let client = connect(&db).await;
    psql(
        &db,
        "CREATE TABLE events (id int, region text, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
         CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
         CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
         ALTER TABLE employees ALTER job_title DROP NOT NULL;",
    );
    // Twice: both are idempotent.
    for _ in 0..2 {
        ensure_publication(&client, PUBLICATION).await.unwrap();
    }
    let employees = oid(&client, "employees").await;
    let events = oid(&client, "events").await;
    for table in [employees, events] {
        assert_eq!(
            replica_identity_problem(&client, table).await.unwrap(),
            None
        );
    }
    for _ in 0..2 {
        publish_tables(&client, PUBLICATION, &[employees, events])
            .await
            .unwrap();
    }
    let members = psql(
        &db,
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_publication_tables WHERE pubname = 'cachefront'",
    );
    assert_eq!(members, "employees,events_eu,events_us");

    let mut stream = WalStream::start(&config(&db), "cftest", PUBLICATION)
        .await
        .unwrap();
    let slot = stream.slot().to_string();
    assert!(slot.starts_with("cftest_"), "{slot}");
    let temporary = psql(
        &db,
        &format!("SELECT temporary, plugin FROM pg_replication_slots WHERE slot_name = '{slot}'"),
    );
    assert_eq!(temporary, "t|pgoutput");
    let mut last_commit = stream.start_lsn();
    assert!(last_commit > 0);
    let mut commit = |lsn: u64, end_lsn: u64| {
        assert!(lsn > last_commit, "commit LSNs increase");
        assert!(end_lsn > lsn);
        last_commit = lsn;
    };

    // A wait given up on loses nothing.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), stream.next())
            .await
            .is_err(),
        "nothing written yet"
    );

    // INSERT
    psql(
        &db,
        "INSERT INTO employees (id, name, job_title, dept_id) VALUES (10, 'Zed', 'Tester', 1)",
    );
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    assert_eq!(txn.len(), 1);
    let (name, old, new) = change(&txn[0]);
    assert_eq!(name, "employees");
    assert_eq!(*old, None);
    assert_eq!(*new, employee("10", "Zed", "Tester", "1"));
    let WalEvent::Change { relation, .. } = &txn[0] else {
        unreachable!()
    };
    assert_eq!(relation.schema, "public");
    assert_eq!(relation.oid, employees);
    assert_eq!(relation.columns, ["id", "name", "job_title", "dept_id"]);
    assert_eq!(relation.key, [true, false, false, false]);
    stream.applied(end);

    // UPDATE of a non-key column: no old row under REPLICA IDENTITY DEFAULT.
    psql(&db, "UPDATE employees SET job_title = 'Lead' WHERE id = 1");
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    let (name, old, new) = change(&txn[0]);
    assert_eq!((name, old), ("employees", &None));
    assert_eq!(*new, employee("1", "Alice Johnson", "Lead", "1"));

    // UPDATE of the key: the old key arrives, the other old columns as NULL.
    psql(&db, "UPDATE employees SET id = 100 WHERE id = 2");
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    let (_, old, new) = change(&txn[0]);
    assert_eq!(
        *old,
        Some(vec![text("2"), Cell::Null, Cell::Null, Cell::Null])
    );
    assert_eq!(*new, employee("100", "Bob Smith", "HR Manager", "2"));

    // DELETE: the old key.
    psql(&db, "DELETE FROM employees WHERE id = 3");
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    let (_, old, new) = change(&txn[0]);
    assert_eq!(
        *old,
        Some(vec![text("3"), Cell::Null, Cell::Null, Cell::Null])
    );
    assert_eq!(*new, None);

    // COPY FROM STDIN: one change per row, one transaction.
    let sink = client
        .copy_in::<_, Bytes>("COPY employees (id, name, job_title, dept_id) FROM STDIN")
        .await
        .unwrap();
    futures::pin_mut!(sink);
    sink.send(Bytes::from_static(
        b"20\tCopy One\tLoader\t1\n21\tCopy Two\t\\N\t2\n",
    ))
    .await
    .unwrap();
    sink.finish().await.unwrap();
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    assert_eq!(txn.len(), 2);
    assert_eq!(
        *change(&txn[0]).2,
        employee("20", "Copy One", "Loader", "1")
    );
    assert_eq!(
        *change(&txn[1]).2,
        Some(vec![text("21"), text("Copy Two"), Cell::Null, text("2")])
    );

    // A write under session_replication_role = replica (pg_restore, bulk loaders).
    psql(
        &db,
        "SET session_replication_role = replica; UPDATE employees SET name = 'Ethan W' WHERE id = 5",
    );
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    assert_eq!(
        *change(&txn[0]).2,
        employee("5", "Ethan W", "Marketing Specialist", "5")
    );

    // A rolled-back transaction sends nothing: the next transaction is the one after it.
    psql(
        &db,
        "BEGIN; INSERT INTO employees (id, name, job_title, dept_id) VALUES (30, 'Ghost', 'None', 1); ROLLBACK",
    );
    psql(
        &db,
        "INSERT INTO employees (id, name, job_title, dept_id) VALUES (31, 'After', 'Rollback', 1)",
    );
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    assert_eq!(txn.len(), 1);
    assert_eq!(*change(&txn[0]).2, employee("31", "After", "Rollback", "1"));

    // A transactional logical message arrives inside its transaction, in order.
    psql(
        &db,
        "BEGIN;
         INSERT INTO employees (id, name, job_title, dept_id) VALUES (40, 'Msg', 'Before', 1);
         SELECT pg_logical_emit_message(true, 'cachefront', 'x');
         COMMIT",
    );
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    assert_eq!(txn.len(), 2);
    assert_eq!(change(&txn[0]).0, "employees");
    assert_eq!(
        txn[1],
        WalEvent::Message {
            transactional: true,
            prefix: "cachefront".into(),
            content: Bytes::from_static(b"x"),
        }
    );
    psql(
        &db,
        "SELECT pg_logical_emit_message(true, 'cachefront', 'alone')",
    );
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    assert!(
        matches!(&txn[..], [WalEvent::Message { content, .. }] if content == "alone"),
        "{txn:?}"
    );

    // A partitioned table: written through the parent and through a partition, the
    // changes name the partition.
    psql(&db, "INSERT INTO events VALUES (1, 'eu')");
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    assert_eq!(change(&txn[0]).0, "events_eu");
    assert_eq!(*change(&txn[0]).2, Some(vec![text("1"), text("eu")]));
    psql(&db, "INSERT INTO events_us VALUES (2, 'us')");
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    assert_eq!(change(&txn[0]).0, "events_us");
    // A row moved between partitions: a delete from one, an insert into the other.
    psql(&db, "UPDATE events SET region = 'us' WHERE id = 1");
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    let names: Vec<&str> = txn.iter().map(|e| change(e).0).collect();
    assert_eq!(names, ["events_eu", "events_us"]);

    // Several writes in one transaction arrive together, before its commit.
    psql(
        &db,
        "BEGIN;
         UPDATE employees SET dept_id = 3 WHERE id = 4;
         INSERT INTO events VALUES (3, 'eu');
         COMMIT",
    );
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    let names: Vec<&str> = txn.iter().map(|e| change(e).0).collect();
    assert_eq!(names, ["employees", "events_eu"]);

    // TRUNCATE, of a table and of a partitioned table (its partitions are named).
    psql(&db, "TRUNCATE employees");
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    let WalEvent::Truncate { relations } = &txn[0] else {
        panic!("not a truncate: {txn:?}")
    };
    let names: Vec<&str> = relations.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["employees"]);
    psql(&db, "TRUNCATE events");
    let (txn, lsn, end) = next_txn(&mut stream).await;
    commit(lsn, end);
    let WalEvent::Truncate { relations } = &txn[0] else {
        panic!("not a truncate: {txn:?}")
    };
    let mut names: Vec<&str> = relations.iter().map(|r| r.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["events_eu", "events_us"]);

    // What was confirmed applied reaches the slot.
    stream.applied(end);
    let started = Instant::now();
    loop {
        let confirmed: i64 = client
            .query_one(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .unwrap()
            .get(0);
        if confirmed as u64 >= end {
            break;
        }
        assert!(started.elapsed() < WAIT, "confirmed_flush_lsn not advanced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The temporary slot goes with the stream.
    drop(stream);
    wait_slot(&client, &slot, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn publishing_a_table_never_breaks_writes_to_another() {
    let db = postgres().fresh_db();
    let client = connect(&db).await;
    psql(
        &db,
        "CREATE TABLE nopk (a int, b text);
         INSERT INTO nopk VALUES (1, 'x');
         CREATE TABLE withpk (id int PRIMARY KEY, v text);
         CREATE TABLE nothing (id int PRIMARY KEY) ; ALTER TABLE nothing REPLICA IDENTITY NOTHING;
         CREATE TABLE full_ident (a int); ALTER TABLE full_ident REPLICA IDENTITY FULL;
         CREATE TABLE by_index (a int NOT NULL); CREATE UNIQUE INDEX by_index_a ON by_index (a);
         ALTER TABLE by_index REPLICA IDENTITY USING INDEX by_index_a;
         CREATE TABLE parted (id int, k int) PARTITION BY RANGE (id);
         CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (10);
         CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);
         CREATE VIEW a_view AS SELECT * FROM withpk;
         CREATE SCHEMA \"Odd\"; CREATE TABLE \"Odd\".\"No Key\" (a int);",
    );
    let problem = |table: &'static str| {
        let client = &client;
        async move {
            let oid = oid(client, table).await;
            replica_identity_problem(client, oid).await.unwrap()
        }
    };
    let nopk = problem("nopk")
        .await
        .expect("a table without a primary key");
    assert!(
        nopk.contains("public.nopk has no primary key") && nopk.contains("UPDATE and DELETE"),
        "{nopk}"
    );
    assert_eq!(problem("withpk").await, None);
    assert!(problem("nothing")
        .await
        .unwrap()
        .contains("REPLICA IDENTITY NOTHING"));
    assert_eq!(problem("full_ident").await, None);
    assert_eq!(problem("by_index").await, None);
    psql(&db, "DROP INDEX by_index_a");
    assert!(problem("by_index").await.unwrap().contains("index is gone"));
    let parted = problem("parted").await.expect("a partition without a key");
    assert!(parted.contains("public.parted_1"), "{parted}");
    assert!(problem("scratch").await.unwrap().contains("unlogged"));
    assert!(problem("a_view").await.unwrap().contains("view"));
    assert!(problem("pg_class")
        .await
        .unwrap()
        .contains("system catalog"));
    let odd = problem("\"Odd\".\"No Key\"").await.unwrap();
    assert!(odd.contains("\"Odd\".\"No Key\""), "{odd}");
    assert_eq!(
        replica_identity_problem(&client, 999_999).await.unwrap(),
        Some("relation 999999 does not exist".into())
    );
    psql(&db, "ALTER TABLE parted ADD PRIMARY KEY (id)");
    assert_eq!(problem("parted").await, None);

    // Publishing the table with a key leaves the one without alone.
    ensure_publication(&client, PUBLICATION).await.unwrap();
    let withpk = oid(&client, "withpk").await;
    publish_tables(&client, PUBLICATION, &[withpk])
        .await
        .unwrap();
    client
        .execute("UPDATE nopk SET b = 'y' WHERE a = 1", &[])
        .await
        .expect("UPDATE on the table without a key still works");
    client
        .execute("UPDATE withpk SET v = 'y'", &[])
        .await
        .unwrap();

    // What the check guards against: published, the table without a key refuses UPDATE.
    ensure_publication(&client, "elsewhere").await.unwrap();
    let nopk_oid = oid(&client, "nopk").await;
    publish_tables(&client, "elsewhere", &[nopk_oid])
        .await
        .unwrap();
    let refused = client
        .execute("UPDATE nopk SET b = 'z' WHERE a = 1", &[])
        .await
        .expect_err("PostgreSQL refuses it");
    assert_eq!(
        refused.code(),
        Some(&tokio_postgres::error::SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE)
    );
    drop_publication(&client, "elsewhere").await.unwrap();
    drop_publication(&client, "elsewhere").await.unwrap();
    client
        .execute("UPDATE nopk SET b = 'z' WHERE a = 1", &[])
        .await
        .expect("works again once the publication is gone");

    // Several instances publishing at once: each table is added once, nobody fails.
    let parted = oid(&client, "parted").await;
    let full = oid(&client, "full_ident").await;
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(connect(&db).await);
    }
    let tables = [full, parted, withpk];
    let results = futures::future::join_all(
        clients
            .iter()
            .map(|c| publish_tables(c, PUBLICATION, &tables)),
    )
    .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let members = psql(
        &db,
        "SELECT string_agg(prrelid::regclass::text, ',' ORDER BY prrelid::regclass::text)
         FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid WHERE pubname = 'cachefront'",
    );
    assert_eq!(members, "full_ident,parted,withpk");
}

#[tokio::test(flavor = "multi_thread")]
async fn publications_are_brought_to_cachefronts_settings() {
    let db = postgres().fresh_db();
    let client = connect(&db).await;
    psql(
        &db,
        "CREATE PUBLICATION odd WITH (publish = 'insert', publish_via_partition_root = true)",
    );
    ensure_publication(&client, "odd").await.unwrap();
    let settings = psql(
        &db,
        "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot FROM pg_publication WHERE pubname = 'odd'",
    );
    assert_eq!(settings, "t|t|t|t|f");

    psql(&db, "CREATE PUBLICATION everything FOR ALL TABLES");
    let e = ensure_publication(&client, "everything")
        .await
        .expect_err("a publication of all tables is refused");
    assert!(e.to_string().contains("publishes all tables"), "{e}");

    for bad in ["Odd", "a-b", "x'; DROP TABLE employees; --"] {
        let e = ensure_publication(&client, bad).await.expect_err(bad);
        assert!(e.to_string().contains("lower-case"), "{e}");
    }

    // A stream needs its publication.
    let e = match WalStream::start(&config(&db), "cftest", "missing").await {
        Ok(_) => panic!("a missing publication is refused"),
        Err(e) => e,
    };
    assert!(
        e.to_string().contains("publication missing does not exist"),
        "{e}"
    );
    assert_eq!(
        psql(&db, "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'cftest%' AND database = current_database()"),
        "0",
        "no slot is left behind"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_over_the_limit_loses_the_stream() {
    let db = postgres().fresh_db();
    let client = connect(&db).await;
    ensure_publication(&client, PUBLICATION).await.unwrap();
    let employees = oid(&client, "employees").await;
    publish_tables(&client, PUBLICATION, &[employees])
        .await
        .unwrap();
    psql(&db, "ALTER TABLE employees ALTER name TYPE text");
    let limits = WalLimits {
        max_message_bytes: 64 * 1024,
        buffer_events: 4,
    };
    let mut stream = WalStream::start_with(&config(&db), "cftest", PUBLICATION, limits)
        .await
        .unwrap();
    let slot = stream.slot().to_string();

    psql(
        &db,
        "INSERT INTO employees (name, job_title, dept_id) VALUES ('small', 'x', 1)",
    );
    let (txn, _, _) = next_txn(&mut stream).await;
    assert_eq!(txn.len(), 1);

    // A value stored out of line (TOAST) that an UPDATE leaves alone is not sent.
    psql(
        &db,
        "INSERT INTO employees (id, name, job_title, dept_id)
         SELECT 50, string_agg(md5(i::text), ''), 'toasted', 1 FROM generate_series(1, 600) i",
    );
    let (txn, _, _) = next_txn(&mut stream).await;
    assert!(
        matches!(&change(&txn[0]).2, Some(row) if matches!(&row[1], Cell::Text(t) if t.len() == 19_200)),
        "the whole value when inserted"
    );
    psql(
        &db,
        "UPDATE employees SET job_title = 'still' WHERE id = 50",
    );
    let (txn, _, _) = next_txn(&mut stream).await;
    assert_eq!(
        *change(&txn[0]).2,
        Some(vec![text("50"), Cell::Unchanged, text("still"), text("1")])
    );

    // Random text, so PostgreSQL cannot compress it under the limit.
    psql(
        &db,
        "INSERT INTO employees (name, job_title, dept_id)
         SELECT string_agg(md5(i::text), ''), 'big', 1 FROM generate_series(1, 10000) i",
    );
    let e = loop {
        match tokio::time::timeout(WAIT, stream.next())
            .await
            .expect("in time")
        {
            Ok(WalEvent::Commit { .. }) => {}
            Ok(other) => panic!("the big row arrived: {other:?}"),
            Err(e) => break e,
        }
    };
    assert!(e.to_string().contains("over the 65536-byte limit"), "{e}");
    drop(stream);
    wait_slot(&client, &slot, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_connection_is_an_error() {
    let db = postgres().fresh_db();
    let client = connect(&db).await;
    ensure_publication(&client, PUBLICATION).await.unwrap();
    let mut stream = WalStream::start(&config(&db), "cftest", PUBLICATION)
        .await
        .unwrap();
    let slot = stream.slot().to_string();
    psql(
        &db,
        &format!(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ),
    );
    let e = tokio::time::timeout(WAIT, stream.next())
        .await
        .expect("in time")
        .expect_err("the stream is lost");
    assert!(e.to_string().contains("terminat"), "{e}");
    wait_slot(&client, &slot, false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_start_given_up_on_leaves_no_slot() {
    let db = postgres().fresh_db();
    let client = connect(&db).await;
    ensure_publication(&client, PUBLICATION).await.unwrap();
    // A new slot waits for the transactions running when it is created.
    let blocker = connect(&db).await;
    blocker
        .batch_execute("BEGIN; SELECT pg_current_xact_id()")
        .await
        .unwrap();
    let cfg = config(&db);
    let start = WalStream::start(&cfg, "cfgiveup", PUBLICATION);
    assert!(
        tokio::time::timeout(Duration::from_millis(1000), start)
            .await
            .is_err(),
        "the slot waits for the open transaction"
    );
    blocker.batch_execute("COMMIT").await.unwrap();
    let started = Instant::now();
    loop {
        let left = psql(
            &db,
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE 'cfgiveup%'",
        );
        if left == "0" {
            break;
        }
        assert!(
            started.elapsed() < WAIT,
            "the abandoned slot is still there"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
