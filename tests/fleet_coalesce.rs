//! One database query per cold key across several cachefront instances (issue 14, part 4):
//! misses on one key spread over three instances sharing one Valkey and one PostgreSQL make
//! one query, as PostgreSQL itself counts it (`pg_stat_statements`); and when the instance
//! holding the key's fill lease dies mid-fill, the others still answer, correctly, once its
//! lease expires, with exactly one more query; and a write racing the leased fill leaves no
//! stale entry.

mod common;

use cachefront::config::Config;
use cachefront::server::Running;
use common::fresh::{slow_name_query, slow_name_schema, stack_on};
use common::services::{free_port, postgres, TestDb};
use common::*;
use std::time::{Duration, Instant};

/// How long the fill's query takes: long enough that every miss overlaps it, and that the
/// lease holder can be killed while it runs.
const SLEEP_MS: u64 = 1000;

/// The slow function's schema (see `common::fresh::slow_name_schema`).
fn schema() -> String {
    slow_name_schema(SLEEP_MS)
}

/// Every instance's settings: the slow query, a fill lease of `lease_ms`, and nothing that
/// queries on its own (the verification sampler, early refresh) so PostgreSQL's count is the
/// fills' alone.
fn tweak(lease_ms: u64) -> impl Fn(&mut Config) {
    move |c: &mut Config| {
        c.queries.push(slow_name_query());
        c.cache.fill_lease_ms = lease_ms;
        c.cache.early_refresh_beta = 0.0;
        c.verify.enabled = false;
        c.postgres.pool_size = 8;
    }
}

/// A connection to `url` whose requests may wait as long as a fill (redis-rs gives up after
/// 500 ms by default).
async fn patient(url: &str) -> redis::aio::MultiplexedConnection {
    let cfg =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    redis::Client::open(url)
        .expect("URL")
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .unwrap_or_else(|e| panic!("connect to {url}: {e}"))
}

fn url(node: &Running) -> String {
    format!("redis://127.0.0.1:{}", node.addr.port())
}

/// The calls PostgreSQL counted of the slow query in `db` (`pg_stat_statements`).
fn pg_calls(db: &TestDb) -> i64 {
    let pg = postgres();
    let loaded = pg.psql(
        db.name(),
        "SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'",
    );
    assert_eq!(
        loaded.trim(),
        "1",
        "pg_stat_statements is needed: the test PostgreSQL preloads it when its library is installed (postgresql-contrib)"
    );
    pg.psql(
        db.name(),
        "SELECT coalesce(sum(calls), 0)::int8 FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
         WHERE d.datname = current_database() AND s.query = 'SELECT slow_name($1)'",
    )
    .trim()
    .parse()
    .expect("a count")
}

/// The name PostgreSQL holds for employee `id`.
fn name_of(db: &TestDb, id: i64) -> String {
    postgres()
        .psql(
            db.name(),
            &format!("SELECT name FROM employees WHERE id = {id}"),
        )
        .trim()
        .to_string()
}

/// An INFO cachefront counter of `node`.
async fn counter(node_url: &str, field: &str) -> u64 {
    let info = info_cachefront(&mut connect(node_url).await).await;
    info_field(&info, field).parse().expect("a count")
}

/// The INFO counters the tests compare.
const FIELDS: [&str; 8] = [
    "fills",
    "upstream_errors",
    "misses",
    "hits",
    "db_queries",
    "fleet_fill_leases",
    "fleet_fill_waits",
    "fleet_fill_wait_timeouts",
];

/// [`FIELDS`], each summed over `urls`.
async fn totals(urls: &[String]) -> std::collections::BTreeMap<&'static str, u64> {
    let mut out = std::collections::BTreeMap::new();
    for u in urls {
        let info = info_cachefront(&mut connect(u).await).await;
        for f in FIELDS {
            let n: u64 = info_field(&info, f).parse().expect("a count");
            *out.entry(f).or_insert(0) += n;
        }
    }
    out
}

/// What [`FIELDS`] counted over `urls` since `before` (taken by [`totals`]).
async fn since(
    urls: &[String],
    before: &std::collections::BTreeMap<&'static str, u64>,
) -> std::collections::BTreeMap<&'static str, u64> {
    let mut now = totals(urls).await;
    for (f, n) in now.iter_mut() {
        *n -= before[f];
    }
    now
}

/// `SLOW.NAME id` on `c`, with how long it took.
async fn slow_name(
    mut c: redis::aio::MultiplexedConnection,
    id: i64,
) -> (redis::RedisResult<Option<String>>, Duration) {
    let t = Instant::now();
    let r = redis::cmd("SLOW.NAME").arg(id).query_async(&mut c).await;
    (r, t.elapsed())
}

/// Waits until a fill holds the lease of `SLOW.NAME id`'s entry.
async fn until_leased(valkey: &mut redis::aio::MultiplexedConnection, id: i64) {
    let lease = format!("cachefront:f:slowname:{id}");
    eventually("a fill holds the lease", async || {
        let n: i64 = redis::cmd("EXISTS")
            .arg(&lease)
            .query_async(valkey)
            .await
            .expect("EXISTS");
        n == 1
    })
    .await;
}

/// Two instances on one Valkey and PostgreSQL (6 s fill leases), both having resolved the
/// slow query; the second instance runs as long as the value returned for it is kept.
async fn two_warm_instances() -> (Stack, Running, [String; 2]) {
    let stack = stack_on(&schema(), tweak(6000)).await;
    let b = stack.another(tweak(6000)).await;
    let urls = [stack.proxy_url(), url(&b)];
    warm(&urls).await;
    (stack, b, urls)
}

/// Has every instance resolve the slow query (each fills a key of its own, at once), so
/// the misses measured next all reach their fills together.
async fn warm(urls: &[String]) {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, u) in urls.iter().enumerate() {
        tasks.spawn(slow_name(patient(u).await, 9000 + i as i64));
    }
    while let Some(done) = tasks.join_next().await {
        let (reply, _) = done.expect("a warm-up task");
        reply.expect("the warm-up answers");
    }
}

/// 1,000 concurrent misses on one key, spread over three instances: one query, counted by
/// PostgreSQL; every answer right.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_misses_over_three_instances_make_one_query() {
    thousand_misses(6000).await;
}

/// With `cache.fill_lease_ms = 0`, coalescing is per process again: one query per instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_the_fill_lease_each_instance_queries() {
    thousand_misses(0).await;
}

/// 1,000 concurrent misses of one key over three instances with fill leases of `lease_ms`
/// (0: off): one query for the fleet, or one per instance without leases.
async fn thousand_misses(lease_ms: u64) {
    const MISSES: usize = 1000;
    // One request per connection: a connection answers its requests in order, so misses
    // pipelined on one connection would not all overlap the fill.
    const CONNECTIONS_PER_INSTANCE: usize = MISSES / 3 + 1;
    let stack = stack_on(&schema(), tweak(lease_ms)).await;
    let b = stack.another(tweak(lease_ms)).await;
    let c = stack.another(tweak(lease_ms)).await;
    let urls = [stack.proxy_url(), url(&b), url(&c)];
    warm(&urls).await;
    let want = name_of(&stack.db, 1);
    let before = pg_calls(&stack.db);
    let base = totals(&urls).await;
    if lease_ms > 0 {
        let mut v = stack.valkey_client().await;
        eventually(
            "every instance subscribed to the fill announcements",
            async || {
                let (_, n): (String, i64) = redis::cmd("PUBSUB")
                    .arg("NUMSUB")
                    .arg("cachefront:fills")
                    .query_async(&mut v)
                    .await
                    .expect("PUBSUB NUMSUB");
                n == 3
            },
        )
        .await;
    }

    let mut conns = Vec::new();
    for u in &urls {
        for _ in 0..CONNECTIONS_PER_INSTANCE {
            conns.push(patient(u).await);
        }
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..MISSES {
        tasks.spawn(slow_name(conns[i % conns.len()].clone(), 1));
    }
    let mut times = Vec::new();
    while let Some(done) = tasks.join_next().await {
        let (reply, took) = done.expect("a request task");
        assert_eq!(reply.expect("SLOW.NAME answers"), Some(want.clone()));
        times.push(took);
    }
    let wall = started.elapsed();
    times.sort();

    let calls = pg_calls(&stack.db) - before;
    let d = since(&urls, &base).await;
    let (misses, hits, queries) = (d["misses"], d["hits"], d["db_queries"]);
    let (leases, waits) = (d["fleet_fill_leases"], d["fleet_fill_waits"]);
    let timeouts = d["fleet_fill_wait_timeouts"];
    println!(
        "fleet coalescing (fill_lease_ms={lease_ms}): {MISSES} concurrent misses of one key over 3 instances ({} connections): \
         pg_stat_statements calls={calls}; INFO over the fleet: misses={misses} hits={hits} db_queries={queries} \
         fleet_fill_leases={leases} fleet_fill_waits={waits} fleet_fill_wait_timeouts={timeouts}; \
         answers p50={:?} max={:?}, all {MISSES} in {wall:?} (query sleeps {SLEEP_MS} ms)",
        conns.len(),
        times[times.len() / 2],
        times[times.len() - 1],
    );
    assert_eq!(
        misses as usize, MISSES,
        "every request missed (they overlapped the fill)"
    );
    assert_eq!(timeouts, 0);
    assert_eq!(d["upstream_errors"], 0, "every store script ran clean");
    if lease_ms == 0 {
        assert_eq!(calls, 3, "per-process coalescing: one query per instance");
        assert_eq!((queries, leases, waits), (3, 0, 0));
        return;
    }
    assert_eq!(
        calls, 1,
        "PostgreSQL ran the query once for the whole fleet"
    );
    assert_eq!(queries, 1, "one instance queried");
    assert_eq!(leases, 1, "one fill lease taken");
    // The other two instances each waited once; the holder's own at most once more (see
    // `misses_of_a_missing_row_make_one_query`).
    assert!((2..=3).contains(&waits), "fleet_fill_waits={waits}");
}

/// Writes `cfg` as a TOML file in `dir` and starts the cachefront binary on it: an instance
/// that can really be killed (SIGKILL), unlike the in-process ones.
fn spawn_process(cfg: &Config, dir: &std::path::Path) -> (std::process::Child, String) {
    let port = free_port();
    let mut cfg = cfg.clone();
    cfg.listen = format!("127.0.0.1:{port}");
    let text = toml::to_string(&toml::Value::try_from(&cfg).expect("config as TOML"))
        .expect("config text");
    let path = dir.join("holder.toml");
    std::fs::write(&path, text).expect("write the config");
    let child = cachefront_cmd()
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start cachefront");
    (child, format!("redis://127.0.0.1:{port}"))
}

/// Kills its process if the test ends early.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The instance holding the fill lease dies mid-fill (SIGKILL): the instances waiting for
/// it answer once its lease expires, correctly, with exactly one more query between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_lease_holder_dies_mid_fill_the_others_answer() {
    const LEASE_MS: u64 = 3000;
    const WAITERS_PER_INSTANCE: usize = 50;
    let stack = stack_on(&schema(), tweak(LEASE_MS)).await;
    let b = stack.another(tweak(LEASE_MS)).await;
    let survivors = [stack.proxy_url(), url(&b)];
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut cfg = config_for(&stack.valkey, &stack.db);
    tweak(LEASE_MS)(&mut cfg);
    let (child, holder_url) = spawn_process(&cfg, dir.path());
    let holder = Killed(child);
    let mut holder_conn = None;
    eventually("the holder process answers", async || {
        let cfg =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
        match redis::Client::open(holder_url.as_str())
            .expect("URL")
            .get_multiplexed_async_connection_with_config(&cfg)
            .await
        {
            Ok(mut c) => {
                let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut c).await;
                holder_conn = Some(c);
                pong.is_ok()
            }
            Err(_) => false,
        }
    })
    .await;
    warm(&[
        survivors[0].clone(),
        survivors[1].clone(),
        holder_url.clone(),
    ])
    .await;
    let want = name_of(&stack.db, 2);
    let before = pg_calls(&stack.db);
    let base = totals(&survivors).await;
    let mut valkey = stack.valkey_client().await;
    let lease_key = "cachefront:f:slowname:2";

    // The process misses first and takes the lease.
    let first = tokio::spawn(slow_name(holder_conn.expect("connected"), 2));
    eventually("the process holds the fill lease", async || {
        let n: i64 = redis::cmd("EXISTS")
            .arg(lease_key)
            .query_async(&mut valkey)
            .await
            .expect("EXISTS");
        n == 1
    })
    .await;
    let leased_at = Instant::now();

    // The other two miss the same key and wait for it.
    let mut waiting = tokio::task::JoinSet::new();
    for u in &survivors {
        for _ in 0..WAITERS_PER_INSTANCE {
            waiting.spawn(slow_name(patient(u).await, 2));
        }
    }
    eventually("both survivors wait for the holder's fill", async || {
        for u in &survivors {
            if counter(u, "fleet_fill_waits").await == 0 {
                return false;
            }
        }
        true
    })
    .await;

    // Killed mid-fill: its query has not returned, nothing is stored, its lease remains.
    let entry: Option<String> = redis::cmd("GET")
        .arg("slowname:2")
        .query_async(&mut valkey)
        .await
        .expect("GET");
    let lease_left: i64 = redis::cmd("PTTL")
        .arg(lease_key)
        .query_async(&mut valkey)
        .await
        .expect("PTTL");
    drop(holder);
    let killed = Instant::now();
    assert!(
        leased_at.elapsed() < Duration::from_millis(SLEEP_MS),
        "the holder was killed before its query could end"
    );
    assert_eq!(entry, None, "nothing stored before the kill");
    assert!(lease_left > 0, "the dead holder's lease is still there");
    let (first_reply, _) = first.await.expect("the holder's client task");
    assert!(first_reply.is_err(), "the killed holder never answered");

    let mut since_kill = Vec::new();
    while let Some(done) = waiting.join_next().await {
        let (reply, _) = done.expect("a request task");
        assert_eq!(reply.expect("SLOW.NAME answers"), Some(want.clone()));
        since_kill.push(killed.elapsed());
    }
    let slowest = since_kill.iter().max().copied().unwrap_or_default();
    let fastest = since_kill.iter().min().copied().unwrap_or_default();

    // The dead holder's statement runs to its end in PostgreSQL (nobody reads its answer):
    // wait for it before counting.
    tokio::time::sleep(Duration::from_millis(SLEEP_MS)).await;
    let calls = pg_calls(&stack.db) - before;
    let d = since(&survivors, &base).await;
    let (queries, leases) = (d["db_queries"], d["fleet_fill_leases"]);
    let timeouts = d["fleet_fill_wait_timeouts"];
    let bound = Duration::from_millis(LEASE_MS + SLEEP_MS);
    // A loaded two-core machine.
    let slack = Duration::from_millis(1000);
    println!(
        "fleet coalescing, holder killed mid-fill (lease_ms={LEASE_MS}, query {SLEEP_MS} ms, lease left at the kill {lease_left} ms): \
         {} waiters on 2 instances answered {fastest:?}..{slowest:?} after the kill (bound: lease + query = {bound:?}); \
         pg_stat_statements calls={calls} (the dead holder's own, which PostgreSQL finished, + the survivors'); \
         survivors' db_queries={queries} fleet_fill_leases={leases} fleet_fill_wait_timeouts={timeouts}",
        since_kill.len()
    );
    assert_eq!(since_kill.len(), 2 * WAITERS_PER_INSTANCE);
    assert!(
        slowest <= bound + slack,
        "answered within the lease and one query (+{slack:?}): {slowest:?}"
    );
    assert_eq!(queries, 1, "exactly one more query, by one survivor");
    assert_eq!(leases, 1, "one survivor took the expired lease");
    assert_eq!(timeouts, 0);
    assert_eq!(
        calls, 2,
        "PostgreSQL ran the dead holder's query and exactly one more"
    );
    let _ = b;
}

/// Misses of a row that does not exist (negative caching off, so nothing is cached): the
/// instances that waited take the holder's "no row" as their answer instead of querying in
/// turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn misses_of_a_missing_row_make_one_query() {
    const MISSES: usize = 90;
    let stack = stack_on(&schema(), tweak(6000)).await;
    let b = stack.another(tweak(6000)).await;
    let c = stack.another(tweak(6000)).await;
    let urls = [stack.proxy_url(), url(&b), url(&c)];
    warm(&urls).await;
    let before = pg_calls(&stack.db);
    let base = totals(&urls).await;
    // One request per connection (see `thousand_misses`): nothing is cached, so a request
    // queued behind another on its connection would miss again after the fill.
    let mut conns = Vec::new();
    for u in &urls {
        for _ in 0..MISSES / 3 {
            conns.push(patient(u).await);
        }
    }
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..MISSES {
        tasks.spawn(slow_name(conns[i % conns.len()].clone(), 9999));
    }
    while let Some(done) = tasks.join_next().await {
        let (reply, _) = done.expect("a request task");
        assert_eq!(reply.expect("SLOW.NAME answers"), None);
    }
    let calls = pg_calls(&stack.db) - before;
    let waits = since(&urls, &base).await["fleet_fill_waits"];
    println!("fleet coalescing, {MISSES} misses of a missing row over 3 instances: pg_stat_statements calls={calls}, fleet_fill_waits={waits}");
    assert_eq!(calls, 1, "one query for the fleet");
    // The other two instances each waited once. The holder's own may have waited once too:
    // its lookups read the entry and take the lease in one step, so the lookup that took it
    // can reach its fill after another of the instance's misses already started one — which
    // then waits for the lease until the first gives it up (and joins nothing).
    assert!((2..=3).contains(&waits), "fleet_fill_waits={waits}");
}

/// A client cannot put words in a fill's mouth: while instance A fills a key, a client
/// reads the lease (its holder's token is no secret: clients may read any key) and publishes
/// every announcement it could forge on the fill channel, and tries to write a "no row"
/// answer into the lease. The waiting instance still answers the row, not nil: messages only
/// make it look again, and the meta keys where answers live refuse clients' writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_forging_announcements_changes_no_answer() {
    let (stack, _b, urls) = two_warm_instances().await;
    let id = 5;
    let expected = name_of(&stack.db, id);
    assert!(!expected.is_empty(), "employee {id} exists");
    let holder = tokio::spawn(slow_name(patient(&urls[0]).await, id));
    let lease_key = format!("cachefront:f:slowname:{id}");
    let mut hostile = connect(&urls[1]).await;
    let token = loop {
        let t: Option<String> = redis::cmd("GET")
            .arg(&lease_key)
            .query_async(&mut hostile)
            .await
            .expect("GET of the lease");
        if let Some(t) = t {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let waiter = tokio::spawn(slow_name(patient(&urls[1]).await, id));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let key = format!("slowname:{id}");
    for forged in [
        key.clone(),
        format!("a{token}{key}"),
        format!("norow:{token}"),
    ] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg("cachefront:fills")
            .arg(&forged)
            .query_async(&mut hostile)
            .await
            .expect("PUBLISH passes through");
    }
    let write: redis::RedisResult<()> = redis::cmd("SET")
        .arg(&lease_key)
        .arg(format!("norow:{token}"))
        .query_async(&mut hostile)
        .await;
    assert!(
        write.is_err(),
        "clients cannot write cachefront's meta keys"
    );
    let (reply, _) = waiter.await.expect("the waiter's task");
    assert_eq!(reply.expect("SLOW.NAME answers"), Some(expected.clone()));
    let (reply, _) = holder.await.expect("the holder's task");
    assert_eq!(reply.expect("SLOW.NAME answers"), Some(expected));
}

/// The same on a three-primary Valkey Cluster: the lease lives in the entry's slot and the
/// announcement reaches every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn misses_over_three_instances_on_a_cluster_make_one_query() {
    const MISSES: usize = 300;
    const PER_INSTANCE: usize = MISSES / 3;
    let cluster = tokio::task::spawn_blocking(|| common::cluster::ValkeyCluster::start(3))
        .await
        .expect("cluster");
    let db = tokio::task::spawn_blocking(|| {
        let pg = postgres();
        let db = pg.fresh_db();
        pg.psql(db.name(), &schema());
        db
    })
    .await
    .expect("fresh db");
    let mut nodes = Vec::new();
    for seed in cluster.seeds() {
        let mut cfg = Config {
            listen: "127.0.0.1:0".into(),
            ..Default::default()
        };
        cfg.valkey.cluster = vec![seed];
        cfg.postgres.url = db.url();
        tweak(6000)(&mut cfg);
        cfg.validate().expect("valid config");
        nodes.push(
            cachefront::server::spawn(cfg)
                .await
                .expect("cachefront starts"),
        );
    }
    let urls: Vec<String> = nodes.iter().map(url).collect();
    warm(&urls).await;
    let want = name_of(&db, 3);
    let before = pg_calls(&db);
    let base = totals(&urls).await;
    let mut conns = Vec::new();
    for u in &urls {
        for _ in 0..PER_INSTANCE {
            conns.push(patient(u).await);
        }
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..MISSES {
        tasks.spawn(slow_name(conns[i % conns.len()].clone(), 3));
    }
    let mut slowest = Duration::ZERO;
    while let Some(done) = tasks.join_next().await {
        let (reply, took) = done.expect("a request task");
        assert_eq!(reply.expect("SLOW.NAME answers"), Some(want.clone()));
        slowest = slowest.max(took);
    }
    let calls = pg_calls(&db) - before;
    let d = since(&urls, &base).await;
    let (leases, waits) = (d["fleet_fill_leases"], d["fleet_fill_waits"]);
    println!(
        "fleet coalescing on a 3-primary cluster: {MISSES} misses over 3 instances: pg_stat_statements calls={calls}, \
         fleet_fill_leases={leases} fleet_fill_waits={waits}, slowest answer {slowest:?}, all in {:?}",
        started.elapsed()
    );
    assert_eq!(calls, 1, "one query for the fleet");
    assert_eq!(leases, 1);
    assert_eq!(
        (d["fills"], d["upstream_errors"]),
        (1, 0),
        "one clean store"
    );
    assert!(
        slowest < Duration::from_millis(SLEEP_MS + 2000),
        "the waiters were woken, not timed out: {slowest:?}"
    );
}

/// The no-stale-fill guarantee with a lease: a write committed while the holder queries makes
/// its store refused (its versions moved); the refusal gives the lease up, and the waiting
/// instance fills again, from after the write — the entry holds the new name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_during_the_leased_fill_is_not_stored_and_the_waiter_refills() {
    let (stack, _b, urls) = two_warm_instances().await;
    let old = name_of(&stack.db, 4);
    let before = pg_calls(&stack.db);
    let mut valkey = stack.valkey_client().await;

    let holder = tokio::spawn(slow_name(patient(&urls[0]).await, 4));
    until_leased(&mut valkey, 4).await;
    let waiter = tokio::spawn(slow_name(patient(&urls[1]).await, 4));
    eventually("the second instance waits for it", async || {
        counter(&urls[1], "fleet_fill_waits").await >= 1
    })
    .await;
    stack.psql("UPDATE employees SET name = 'Dora Fresh' WHERE id = 4");

    let (first, _) = holder.await.expect("the holder's task");
    let (second, _) = waiter.await.expect("the waiter's task");
    let first = first.expect("answered");
    let second = second.expect("answered");
    let stored: Option<String> = redis::cmd("GET")
        .arg("slowname:4")
        .query_async(&mut valkey)
        .await
        .expect("GET");
    let rejections = counter(&urls[0], "stale_fill_rejections").await;
    let calls = pg_calls(&stack.db) - before;
    println!(
        "fleet coalescing, a write during the leased fill: holder answered {first:?} (its query began before the write), \
         waiter {second:?}, entry {stored:?}, holder's stale_fill_rejections={rejections}, pg_stat_statements calls={calls}"
    );
    assert_eq!(
        first.as_deref(),
        Some(old.as_str()),
        "read before the write"
    );
    assert_eq!(rejections, 1, "the holder's store was refused");
    assert_eq!(second.as_deref(), Some("Dora Fresh"), "the waiter refilled");
    assert_eq!(stored.as_deref(), Some("Dora Fresh"), "no stale entry");
    assert_eq!(calls, 2);
}

/// Only an awaited fill is announced: a miss nobody else waits for publishes nothing on the
/// fill channel (no message for Valkey to fan out to every instance, per miss), while a fill
/// another instance waits for is announced exactly once, and the waiter answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_a_fill_somebody_waits_for_is_announced() {
    use futures::StreamExt;
    let (stack, _b, urls) = two_warm_instances().await;
    let valkey = redis::Client::open(stack.valkey.url()).expect("URL");
    let mut sub = valkey.get_async_pubsub().await.expect("subscribe");
    sub.subscribe("cachefront:fills").await.expect("SUBSCRIBE");
    let mut heard = sub.on_message();

    let (reply, _) = slow_name(patient(&urls[0]).await, 3).await;
    assert_eq!(
        reply.expect("SLOW.NAME answers"),
        Some(name_of(&stack.db, 3))
    );
    let early = tokio::time::timeout(Duration::from_millis(500), heard.next()).await;
    assert!(
        early.is_err(),
        "an uncontended fill announced itself: {:?}",
        early.ok().flatten().map(|m| m.get_payload::<String>())
    );

    let holder = tokio::spawn(slow_name(patient(&urls[0]).await, 4));
    until_leased(&mut stack.valkey_client().await, 4).await;
    let waiter = tokio::spawn(slow_name(patient(&urls[1]).await, 4));
    let message = tokio::time::timeout(Duration::from_secs(10), heard.next())
        .await
        .expect("the awaited fill is announced")
        .expect("the subscription is open");
    assert_eq!(
        message.get_payload::<String>().expect("a text payload"),
        "slowname:4"
    );
    let want = Some(name_of(&stack.db, 4));
    for task in [holder, waiter] {
        let (reply, _) = task.await.expect("a request task");
        assert_eq!(reply.expect("SLOW.NAME answers"), want);
    }
    let again = tokio::time::timeout(Duration::from_millis(500), heard.next()).await;
    assert!(again.is_err(), "announced once");
}
