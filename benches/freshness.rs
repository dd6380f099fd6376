//! Freshness under load, measured end to end on real servers (started by this bench):
//!
//! 1. **Freshness lag** — from the COMMIT of an UPDATE by a plain PostgreSQL client to the first
//!    read through cachefront that returns the new value; p50/p99 over 1,000 updates while
//!    readers keep EMP.GET busy; once per change source (`invalidation.source`: triggers, wal).
//! 2. **Hit ratio under writes** — 100 updates per second to random employees while readers
//!    fetch a hot set of 10,000 employees through EMP.GET.
//!
//! Run: `cargo bench --bench freshness` (needs what scripts/deps.sh installs).
//! Options via env: FRESHNESS_UPDATES (1000), HITRATIO_SECS (10),
//! FRESHNESS_SOURCES (`triggers,wal`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `cargo bench` passes `--bench`; under `cargo test` the bench only smoke-tests itself.
fn full_run() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn readers(
    url: String,
    n: usize,
    ids: u64,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<u64>> {
    (0..n)
        .map(|r| {
            let url = url.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut c = redis::Client::open(url)
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap();
                let mut i = r as u64 * 7919;
                let mut done = 0;
                while !stop.load(Ordering::Relaxed) {
                    let id = 1 + (i * 2_654_435_761) % ids;
                    let _: Option<String> = redis::cmd("EMP.GET")
                        .arg(id)
                        .query_async(&mut c)
                        .await
                        .unwrap();
                    i += 1;
                    done += 1;
                }
                done
            })
        })
        .collect()
}

/// A stack whose invalidation reads changes from `source`, with 100,000 more employees.
async fn stack(source: &str) -> common::Stack {
    let change_source = match source {
        "wal" => cachefront::config::ChangeSource::Wal,
        "triggers" => cachefront::config::ChangeSource::Triggers,
        other => panic!("unknown change source {other} (triggers, wal)"),
    };
    let s = common::Stack::start_with(|c| c.invalidation.source = change_source).await;
    eprintln!("{source}: loading 100,000 generated employees…");
    s.psql("INSERT INTO employees (name, job_title, dept_id) SELECT 'Employee ' || g, 'Engineer', 1 + g % 5 FROM generate_series(1, 100000) g; ANALYZE employees");
    let shared = s.proxy.shared.clone();
    while !shared.is_listening() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s
}

/// Commit-to-fresh-answer lag of `updates` single-row UPDATEs under read load. The writer
/// commits with `synchronous_commit = on`, PostgreSQL's default (the test server runs with it
/// off): logical decoding sends only WAL that is flushed, so under `off` the WAL source
/// would wait for the WAL writer (`wal_writer_delay`, 200 ms by default) on every commit.
async fn freshness_lag(s: &common::Stack, source: &str) {
    let pg = s.pg().await;
    pg.batch_execute("SET synchronous_commit = on")
        .await
        .unwrap();
    let mut probe = redis::Client::open(s.proxy_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let updates = env_or("FRESHNESS_UPDATES", if full_run() { 1000 } else { 50 });
    let stop = Arc::new(AtomicBool::new(false));
    let load = readers(s.proxy_url(), 8, 1000, stop.clone()).await;
    let mut lags = Vec::with_capacity(updates as usize);
    for u in 0..updates {
        let id = 1 + (u * 7) % 1000;
        let _: Option<String> = redis::cmd("EMP.GET")
            .arg(id)
            .query_async(&mut probe)
            .await
            .unwrap();
        let name = format!("renamed {u}");
        pg.execute(
            "UPDATE employees SET name = $1 WHERE id = $2",
            &[&name, &(id as i32)],
        )
        .await
        .unwrap();
        let committed = Instant::now();
        loop {
            let got: Option<String> = redis::cmd("EMP.GET")
                .arg(id)
                .query_async(&mut probe)
                .await
                .unwrap();
            if got.as_deref() == Some(name.as_str()) {
                break;
            }
            assert!(
                committed.elapsed() < Duration::from_secs(5),
                "employee {id} never refreshed"
            );
        }
        lags.push(committed.elapsed());
    }
    stop.store(true, Ordering::Relaxed);
    let mut reads = 0;
    for h in load {
        reads += h.await.unwrap();
    }
    lags.sort();
    println!(
        "freshness lag ({source}) over {updates} updates ({reads} concurrent reads): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        percentile(&lags, 0.50).as_secs_f64() * 1e3,
        percentile(&lags, 0.99).as_secs_f64() * 1e3,
        lags.last().unwrap().as_secs_f64() * 1e3
    );
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let sources = std::env::var("FRESHNESS_SOURCES").unwrap_or_else(|_| "triggers,wal".into());
    let mut last = None;
    for source in sources.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let s = stack(source).await;
        freshness_lag(&s, source).await;
        last = Some(s);
    }
    let Some(s) = last else {
        return;
    };
    let pg = s.pg().await;

    // 2. Hit ratio under writes: warm the hot set, then measure.
    let hot = 10_000u64;
    let mut warm = common::Raw::connect(s.proxy_port()).await;
    let mut batch = Vec::new();
    for id in 1..=hot {
        batch.extend_from_slice(
            &cachefront::protocol::Request::from_args([&b"EMP.GET"[..], id.to_string().as_bytes()])
                .raw,
        );
    }
    warm.send(&batch).await;
    for _ in 1..=hot {
        warm.frame().await;
    }
    let m = &s.proxy.shared.metrics;
    let (h0, m0) = (
        m.hits.load(Ordering::Relaxed),
        m.misses.load(Ordering::Relaxed),
    );
    let secs = env_or("HITRATIO_SECS", if full_run() { 10 } else { 1 });
    let stop = Arc::new(AtomicBool::new(false));
    let load = readers(s.proxy_url(), 16, hot, stop.clone()).await;
    let started = Instant::now();
    let mut writes = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while started.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        writes += 1;
        let id = 1 + (writes * 2_654_435_761) % 100_000;
        pg.execute(
            "UPDATE employees SET name = name || '.' WHERE id = $1",
            &[&(id as i32)],
        )
        .await
        .unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for h in load {
        h.await.unwrap();
    }
    let (h1, m1) = (
        m.hits.load(Ordering::Relaxed),
        m.misses.load(Ordering::Relaxed),
    );
    let (hits, misses) = (h1 - h0, m1 - m0);
    println!(
        "hit ratio under {:.0} updates/s over {secs} s, hot set {hot}: {:.3}% ({hits} hits, {misses} misses)",
        writes as f64 / started.elapsed().as_secs_f64(),
        100.0 * hits as f64 / (hits + misses).max(1) as f64
    );
}
