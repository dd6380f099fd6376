//! Checks the test fixtures themselves (tests/common/services.rs): real valkey-server and
//! PostgreSQL processes start, answer, die and come back as the other tests expect.

mod common;

use common::services::{self, Valkey};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn raw_ping(port: u16) -> std::io::Result<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"*1\r\n$4\r\nPING\r\n")?;
    let mut buf = [0u8; 7];
    s.read_exact(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[test]
fn valkey_starts_kills_restarts() {
    let mut v = Valkey::start();
    assert_eq!(v.url(), format!("redis://127.0.0.1:{}", v.port()));
    assert_eq!(raw_ping(v.port()).unwrap(), "+PONG\r\n");

    v.kill();
    assert!(
        TcpStream::connect(("127.0.0.1", v.port())).is_err(),
        "port still open after kill"
    );

    let port = v.port();
    v.restart();
    assert_eq!(v.port(), port);
    assert_eq!(raw_ping(v.port()).unwrap(), "+PONG\r\n");
}

#[test]
fn valkey_pause_resume() {
    let v = Valkey::start();
    v.pause();
    let mut s = TcpStream::connect(("127.0.0.1", v.port())).unwrap(); // the kernel accepts
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    s.write_all(b"*1\r\n$4\r\nPING\r\n").unwrap();
    let mut buf = [0u8; 7];
    assert!(s.read_exact(&mut buf).is_err(), "a paused server answered");
    v.resume();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"+PONG\r\n");
}

#[test]
fn two_valkeys_differ() {
    let a = Valkey::start();
    let b = Valkey::start();
    assert_ne!(a.port(), b.port());
    let a_port = a.port();
    drop(a);
    assert!(raw_ping(a_port).is_err(), "a dropped Valkey still answers");
    assert_eq!(raw_ping(b.port()).unwrap(), "+PONG\r\n");
}

async fn count_employees(url: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"));
    tokio::spawn(conn);
    client
        .query_one("SELECT count(*) FROM employees", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_dbs_in_parallel() {
    let pg = services::postgres();
    let (a, b) = tokio::join!(
        tokio::task::spawn_blocking(|| services::postgres().fresh_db()),
        tokio::task::spawn_blocking(|| services::postgres().fresh_db()),
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.name, b.name);
    assert_eq!(a.url(), pg.url_for(&a.name));
    assert_eq!(count_employees(&a.url()).await, 5);
    assert_eq!(count_employees(&b.url()).await, 5);

    // Isolation: a write in one database does not show in the other.
    let (client, conn) = tokio_postgres::connect(&a.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    client
        .execute("DELETE FROM employees WHERE id = 1", &[])
        .await
        .unwrap();
    assert_eq!(count_employees(&a.url()).await, 4);
    assert_eq!(count_employees(&b.url()).await, 5);
    drop(client);

    let name = a.name.clone();
    drop(a);
    let left = pg.psql(
        "postgres",
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
    );
    assert_eq!(left, "0", "dropped TestDb left its database behind");
}

#[test]
fn fresh_db_from_sync_test() {
    let db = services::postgres().fresh_db();
    let n = services::postgres().psql(&db.name, "SELECT name FROM employees WHERE id = 1");
    assert_eq!(n, "Alice Johnson");
}

#[test]
fn private_postgres_kill_and_restart() {
    let pg = services::start_private_postgres();
    let db = pg.fresh_db();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    assert_eq!(rt.block_on(count_employees(&db.url())), 5);

    pg.kill();
    assert!(!pg.is_running());
    assert!(TcpStream::connect(("127.0.0.1", pg.port())).is_err());

    pg.restart();
    assert!(pg.is_running());
    assert_eq!(rt.block_on(count_employees(&db.url())), 5);

    pg.stop();
    assert!(!pg.is_running());
    pg.restart();
    assert_eq!(rt.block_on(count_employees(&db.url())), 5);
}
