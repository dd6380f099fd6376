//! cachefront in front of a Valkey Cluster as managed services run it: three primaries and
//! three replicas, every node reachable only through TLS (stunnel in front of each node,
//! requiring a client certificate; the nodes announcing the TLS ports with
//! `cluster-announce-client-port`), `rediss://` URLs, the test CA and client certificate; with
//! and without `valkey.read_from_replicas`.
//!
//! One cluster (12 processes) serves the whole file: one test, in steps.

mod common;

use cachefront::config::Config;
use cachefront::server::Running;
use common::cluster::{node_conn, ValkeyCluster};
use common::services::{postgres, TestDb, Valkey};
use common::tls::{Pki, Stunnel};
use common::{call_line, info_field, Raw};
use std::time::{Duration, Instant};

/// The cluster, a TLS terminator per node, the PKI and a database.
struct TlsCluster {
    cluster: ValkeyCluster,
    stunnels: Vec<Stunnel>,
    pki: Pki,
    db: TestDb,
}

impl TlsCluster {
    fn start() -> TlsCluster {
        let pki = Pki::generate();
        let cluster = ValkeyCluster::start_with_replicas(3, 1);
        let stunnels: Vec<Stunnel> = cluster
            .nodes
            .iter()
            .map(|n| Stunnel::start_mtls(&pki, n.port()))
            .collect();
        let ports: Vec<u16> = stunnels.iter().map(Stunnel::port).collect();
        cluster.announce_client_ports(&ports);
        let db = postgres().fresh_db();
        TlsCluster {
            cluster,
            stunnels,
            pki,
            db,
        }
    }

    /// cachefront over TLS to the cluster (one seed: the rest is discovered), trusting `ca`.
    async fn proxy(&self, ca: &std::path::Path, replica_reads: bool) -> Running {
        let seed = format!("rediss://127.0.0.1:{}", self.stunnels[0].port());
        let mut cfg = Config {
            listen: "127.0.0.1:0".into(),
            ..Default::default()
        };
        cfg.valkey.url = seed.clone();
        cfg.valkey.cluster = vec![seed];
        cfg.valkey.tls_ca_file = ca.display().to_string();
        cfg.valkey.tls_cert_file = self.pki.client_cert.display().to_string();
        cfg.valkey.tls_key_file = self.pki.client_key.display().to_string();
        cfg.valkey.read_from_replicas = replica_reads;
        cfg.postgres.url = self.db.url();
        cfg.postgres.pool_size = 4;
        cfg.validate().expect("valid config");
        cachefront::server::spawn(cfg)
            .await
            .expect("cachefront starts")
    }

    fn primaries(&self) -> &[Valkey] {
        &self.cluster.nodes[..self.cluster.primaries]
    }

    /// `CONFIG RESETSTAT` on every node: command counts start from 0.
    fn reset_stats(&self) {
        for n in &self.cluster.nodes {
            let _: () = redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query(&mut node_conn(&n.addr()))
                .expect("CONFIG RESETSTAT");
        }
    }
}

/// How many times `node` ran `command` since its last `CONFIG RESETSTAT`.
fn calls(node: &Valkey, command: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut node_conn(&node.addr()))
        .expect("INFO commandstats");
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().expect("calls"))
}

fn sum_calls<'a>(nodes: impl IntoIterator<Item = &'a Valkey>, command: &str) -> u64 {
    nodes.into_iter().map(|n| calls(n, command)).sum()
}

/// Clients of `node` whose connection said `READONLY` (flag `r` in `CLIENT LIST`).
fn readonly_clients(node: &Valkey) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut node_conn(&node.addr()))
        .expect("CLIENT LIST");
    list.lines()
        .filter(|l| {
            l.split(' ')
                .find_map(|f| f.strip_prefix("flags="))
                .is_some_and(|f| f.contains('r'))
        })
        .count()
}

/// Keys matching `pattern` on one node, read there directly (no TLS: the node's own port).
fn keys_on(node: &Valkey, pattern: &str) -> usize {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query(&mut node_conn(&node.addr()))
        .expect("KEYS");
    keys.len()
}

fn direct(node: &Valkey, args: &[&str]) -> redis::Value {
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query(&mut node_conn(&node.addr()))
        .expect("command on a node")
}

/// One command line's reply, without the final CRLF.
async fn q(r: &mut Raw, line: &str) -> String {
    let mut reply = call_line(r, line).await;
    reply.truncate(reply.len().saturating_sub(2));
    reply
}

async fn stat(r: &mut Raw, field: &str) -> u64 {
    let info = r.call(&[b"INFO", b"cachefront"]).await;
    info_field(&info, field).trim().parse().expect("a number")
}

const KEYS: usize = 300;
const SLOTS: usize = 16384;

/// `s:<n>` keys, one hashing to each slot.
fn one_key_per_slot() -> Vec<String> {
    let mut by_slot: Vec<Option<String>> = vec![None; SLOTS];
    let mut missing = SLOTS;
    let mut n = 0u64;
    while missing > 0 {
        let key = format!("s:{n}");
        let slot = cachefront::upstream::cluster::slot_of(key.as_bytes()) as usize;
        if by_slot[slot].is_none() {
            by_slot[slot] = Some(key);
            missing -= 1;
        }
        n += 1;
    }
    by_slot.into_iter().flatten().collect()
}

/// Sends `command(key)` for every key, pipelined in batches, and checks each reply is
/// `reply(key)`.
async fn pipelined(
    r: &mut Raw,
    keys: &[String],
    command: impl Fn(&str) -> String,
    reply: impl Fn(&str) -> String,
) {
    for batch in keys.chunks(512) {
        let mut out = Vec::new();
        for k in batch {
            out.extend(common::encode_line(&command(k)));
        }
        r.send(&out).await;
        for k in batch {
            assert_eq!(r.frame().await, reply(k), "{}", command(k));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_with_replicas() {
    let t = tokio::task::spawn_blocking(TlsCluster::start)
        .await
        .expect("cluster");
    let off = t.proxy(&t.pki.ca, false).await;
    let mut a = Raw::connect(off.addr.port()).await;

    // 1. Pass-through over TLS, every primary: writes land on the slot owners.
    for i in 0..KEYS {
        assert_eq!(q(&mut a, &format!("SET k:{i} v{i}")).await, "+OK");
    }
    let per_primary: Vec<usize> = t.primaries().iter().map(|p| keys_on(p, "k:*")).collect();
    assert_eq!(per_primary.iter().sum::<usize>(), KEYS, "{per_primary:?}");
    assert!(per_primary.iter().all(|&n| n > 0), "{per_primary:?}");
    assert!(q(&mut a, "XADD st:1 1-1 f v").await.contains("1-1"));
    // The replicas have them too, in a moment.
    let replicas_have = |pattern: &str| -> usize {
        t.cluster
            .replicas()
            .iter()
            .map(|r| keys_on(r, pattern))
            .sum()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while replicas_have("k:*") < KEYS || replicas_have("st:*") < 1 {
        assert!(Instant::now() < deadline, "replicas did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // 2. Replica reads off: every read on a primary, none on a replica.
    t.reset_stats();
    let started = Instant::now();
    for i in 0..KEYS {
        assert_eq!(
            q(&mut a, &format!("GET k:{i}")).await,
            format!("${}\r\nv{i}", format!("v{i}").len())
        );
    }
    let off_took = started.elapsed();
    assert_eq!(sum_calls(t.cluster.replicas(), "get"), 0);
    // (Primaries also serve cachefront's own background reads: at least ours.)
    assert!(sum_calls(t.primaries(), "get") >= KEYS as u64);

    // Not even a connection to a replica.
    for r in t.cluster.replicas() {
        assert_eq!(readonly_clients(r), 0);
    }

    // 3. Replica reads on: the same reads, all answered by replicas (each of the three), over
    // connections that said READONLY.
    let on = t.proxy(&t.pki.ca, true).await;
    let mut b = Raw::connect(on.addr.port()).await;
    t.reset_stats();
    let before = stat(&mut b, "cluster_replica_reads").await;
    let started = Instant::now();
    for i in 0..KEYS {
        assert_eq!(
            q(&mut b, &format!("GET k:{i}")).await,
            format!("${}\r\nv{i}", format!("v{i}").len())
        );
    }
    let on_took = started.elapsed();
    let on_replicas: Vec<u64> = t
        .cluster
        .replicas()
        .iter()
        .map(|r| calls(r, "get"))
        .collect();
    let on_primaries = sum_calls(t.primaries(), "get");
    println!(
        "replica reads on: {KEYS} GETs → replicas {on_replicas:?}, primaries {on_primaries} \
         ({on_took:?} one after another; {off_took:?} with replica reads off)"
    );
    assert_eq!(
        on_replicas.iter().sum::<u64>(),
        KEYS as u64,
        "{on_replicas:?}"
    );
    assert!(on_replicas.iter().all(|&n| n > 0), "{on_replicas:?}");
    assert!(on_primaries < 5, "only cachefront's own background reads");
    assert_eq!(stat(&mut b, "cluster_replica_fallbacks").await, 0);
    assert_eq!(
        stat(&mut b, "cluster_replica_reads").await - before,
        KEYS as u64
    );
    assert_eq!(stat(&mut b, "cluster_replicas").await, 3);
    for r in t.cluster.replicas() {
        assert!(readonly_clients(r) > 0);
    }
    assert_eq!(
        stat(&mut a, "cluster_replicas").await,
        0,
        "none without replica reads"
    );
    // Other read-only commands too; writes and transactions stay on primaries.
    t.reset_stats();
    assert_eq!(q(&mut b, "STRLEN k:1").await, ":2");
    assert_eq!(q(&mut b, "EXISTS k:2").await, ":1");
    // Keys found by `COMMAND GETKEYS` (a non-blocking XREAD).
    assert!(q(&mut b, "XREAD COUNT 1 STREAMS st:1 0")
        .await
        .contains("1-1"));
    assert_eq!(q(&mut b, "SET w:1 x").await, "+OK");
    assert_eq!(q(&mut b, "INCR w:n").await, ":1");
    assert_eq!(q(&mut b, "MULTI").await, "+OK");
    assert_eq!(q(&mut b, "GET k:3").await, "+QUEUED");
    assert_eq!(q(&mut b, "EXEC").await, "*1\r\n$2\r\nv3");
    assert_eq!(sum_calls(t.cluster.replicas(), "strlen"), 1);
    assert_eq!(sum_calls(t.cluster.replicas(), "exists"), 1);
    assert_eq!(sum_calls(t.cluster.replicas(), "xread"), 1);
    assert!(sum_calls(t.primaries(), "set") >= 1);
    assert!(sum_calls(t.primaries(), "get") >= 1, "the GET inside MULTI");
    assert_eq!(sum_calls(t.cluster.replicas(), "get"), 0);

    // 3b. Every slot: a key in each of the 16384, written through the replica-reading proxy
    // (to the primaries), then read back through it (from the replicas), pipelined.
    let slot_keys = one_key_per_slot();
    pipelined(
        &mut b,
        &slot_keys,
        |k| format!("SET {k} {k}"),
        |_| "+OK\r\n".into(),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while replicas_have("s:*") < SLOTS {
        assert!(Instant::now() < deadline, "replicas did not catch up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.reset_stats();
    let (reads, fallbacks) = (
        stat(&mut b, "cluster_replica_reads").await,
        stat(&mut b, "cluster_replica_fallbacks").await,
    );
    let started = Instant::now();
    pipelined(
        &mut b,
        &slot_keys,
        |k| format!("GET {k}"),
        |k| format!("${}\r\n{k}\r\n", k.len()),
    )
    .await;
    let took = started.elapsed();
    let by_replicas = sum_calls(t.cluster.replicas(), "get");
    let counted = stat(&mut b, "cluster_replica_reads").await - reads;
    println!(
        "every slot: {SLOTS} GETs pipelined in {took:?}; {by_replicas} answered by replicas \
         ({:.1} %), cachefront counted {counted}, fallbacks {}",
        100.0 * by_replicas as f64 / SLOTS as f64,
        stat(&mut b, "cluster_replica_fallbacks").await - fallbacks
    );
    assert_eq!(by_replicas, SLOTS as u64);
    assert_eq!(counted, SLOTS as u64);
    assert_eq!(
        t.primaries()
            .iter()
            .map(|p| keys_on(p, "s:*"))
            .sum::<usize>(),
        SLOTS
    );

    // 4. The staleness rule, shown: a replica that has not applied a write yet answers with
    // what it had. (`CLIENT PAUSE … WRITE` on a replica holds back its replication stream;
    // reads go on.)
    let owner = t.cluster.owner("k:7");
    let idx = t
        .primaries()
        .iter()
        .position(|p| p.port() == owner.port())
        .expect("a primary");
    let replica = t.cluster.replicas_of(idx)[0];
    direct(replica, &["CLIENT", "PAUSE", "10000", "WRITE"]);
    assert_eq!(q(&mut a, "SET k:7 new").await, "+OK");
    assert_eq!(
        q(&mut a, "GET k:7").await,
        "$3\r\nnew",
        "the primary has it"
    );
    assert_eq!(
        q(&mut b, "GET k:7").await,
        "$2\r\nv7",
        "the replica does not yet"
    );
    direct(replica, &["CLIENT", "UNPAUSE"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while q(&mut b, "GET k:7").await != "$3\r\nnew" {
        assert!(Instant::now() < deadline, "the replica never caught up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 5. The cache stays on primaries, replica reads or not: entries written there, lookups
    // read there.
    t.reset_stats();
    for _ in 0..20 {
        assert_eq!(q(&mut b, "EMP.GET 1").await, "$13\r\nAlice Johnson");
    }
    let emp = t.cluster.owner("employee:1");
    assert_eq!(
        direct(emp, &["GET", "employee:1"]),
        redis::Value::BulkString(b"Alice Johnson".to_vec())
    );
    assert_eq!(stat(&mut b, "fills").await, 1);
    assert_eq!(
        sum_calls(t.cluster.replicas(), "get"),
        0,
        "no cache lookup on a replica"
    );

    // 6. MOVED: a slot moves while both proxies still map it to its old primary (and its
    // replica); each follows the redirect to the new owner's TLS port.
    let mut moved_b = 0;
    for tag in ["m1", "m2", "m3"] {
        let key = format!("{{{tag}}}k");
        assert_eq!(q(&mut a, &format!("SET {key} here")).await, "+OK");
        let from = t.cluster.owner(&key);
        let to = t
            .primaries()
            .iter()
            .find(|n| n.port() != from.port())
            .expect("another primary");
        let slot = cachefront::upstream::cluster::slot_of(key.as_bytes());
        t.cluster.migrate_slot(slot, from, to, None, true);
        assert_eq!(q(&mut b, &format!("GET {key}")).await, "$4\r\nhere");
        assert_eq!(q(&mut a, &format!("GET {key}")).await, "$4\r\nhere");
        moved_b = stat(&mut b, "cluster_moved").await;
        if moved_b > 0 && stat(&mut a, "cluster_moved").await > 0 {
            break;
        }
    }
    println!("MOVED followed: {moved_b} by the replica-reading proxy");
    assert!(moved_b > 0, "MOVED followed by the replica-reading proxy");
    assert!(stat(&mut a, "cluster_moved").await > 0);

    // 7. Every node was reached over TLS only: each TLS terminator served cachefront.
    for (node, s) in t.cluster.nodes.iter().zip(&t.stunnels) {
        assert!(
            s.log().contains("accepted connection"),
            "no TLS connection to the node on {}",
            node.port()
        );
    }

    // 8. An untrusted certificate: a prompt, clear error.
    let wrong = t.proxy(&t.pki.other_ca, false).await;
    let mut w = Raw::connect(wrong.addr.port()).await;
    let started = Instant::now();
    let reply = w.call(&[b"GET", b"k:1"]).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    println!(
        "wrong CA, after {:?}: {}",
        started.elapsed(),
        reply.trim_end()
    );
    assert!(reply.starts_with("-UPSTREAM"), "{reply}");
    assert!(reply.contains("certificate"), "{reply}");

    // 9. Nodes announced by name (`cluster-preferred-endpoint-type hostname`): each node's
    // certificate is checked for that name (sent as SNI), reads still reach the replicas.
    for n in &t.cluster.nodes {
        direct(
            n,
            &["CONFIG", "SET", "cluster-announce-hostname", "localhost"],
        );
        direct(
            n,
            &[
                "CONFIG",
                "SET",
                "cluster-preferred-endpoint-type",
                "hostname",
            ],
        );
    }
    t.cluster.wait_slots_named("localhost");
    let by_name = {
        let seed = format!("rediss://localhost:{}", t.stunnels[1].port());
        let mut cfg = Config {
            listen: "127.0.0.1:0".into(),
            ..Default::default()
        };
        cfg.valkey.url = seed.clone();
        cfg.valkey.cluster = vec![seed];
        cfg.valkey.tls_ca_file = t.pki.ca.display().to_string();
        cfg.valkey.tls_cert_file = t.pki.client_cert.display().to_string();
        cfg.valkey.tls_key_file = t.pki.client_key.display().to_string();
        cfg.valkey.read_from_replicas = true;
        cfg.postgres.url = t.db.url();
        cfg.validate().expect("valid config");
        cachefront::server::spawn(cfg)
            .await
            .expect("cachefront starts")
    };
    let mut n = Raw::connect(by_name.addr.port()).await;
    t.reset_stats();
    for i in (0..KEYS).step_by(10) {
        let want = if i == 7 {
            "new".to_string()
        } else {
            format!("v{i}")
        };
        assert_eq!(
            q(&mut n, &format!("GET k:{i}")).await,
            format!("${}\r\n{want}", want.len())
        );
    }
    assert_eq!(q(&mut n, "SET named x").await, "+OK");
    assert_eq!(sum_calls(t.cluster.replicas(), "get"), (KEYS / 10) as u64);
    assert_eq!(
        stat(&mut n, "cluster_replica_reads").await,
        (KEYS / 10) as u64
    );

    // 10. A replica dies: its reads fall back to the primary, and every read still answers.
    let mut cluster = t.cluster;
    let dead = cluster.primaries + idx;
    tokio::task::block_in_place(|| cluster.nodes[dead].kill());
    let fallbacks = stat(&mut b, "cluster_replica_fallbacks").await;
    let started = Instant::now();
    for i in 0..KEYS {
        let want = if i == 7 {
            "new".to_string()
        } else {
            format!("v{i}")
        };
        assert_eq!(
            q(&mut b, &format!("GET k:{i}")).await,
            format!("${}\r\n{want}", want.len())
        );
    }
    let fell_back = stat(&mut b, "cluster_replica_fallbacks").await - fallbacks;
    println!(
        "replica of primary {idx} killed: {KEYS} GETs answered in {:?}, {fell_back} by the primary",
        started.elapsed()
    );
    assert!(fell_back > 0);
}
