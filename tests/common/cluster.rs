//! A real Valkey Cluster for tests: `n` primaries (valkey-server in cluster mode on free
//! ports of 127.0.0.1), slots split evenly, joined with CLUSTER MEET, optionally with replicas
//! (CLUSTER REPLICATE). Dropped → all killed.

use super::services::Valkey;
use std::time::{Duration, Instant};

pub struct ValkeyCluster {
    /// The primaries, then the replicas (`replicas[i]` replicates `nodes[i % primaries]`).
    pub nodes: Vec<Valkey>,
    /// How many of `nodes` are primaries (the first ones).
    pub primaries: usize,
}

/// A synchronous connection to one node (fixtures and assertions).
pub fn node_conn(addr: &str) -> redis::Connection {
    redis::Client::open(format!("redis://{addr}"))
        .expect("node url")
        .get_connection()
        .expect("connect to a cluster node")
}

impl ValkeyCluster {
    /// Starts `n` primaries and waits (≤ 30 s) until every node reports `cluster_state:ok`.
    pub fn start(n: usize) -> ValkeyCluster {
        ValkeyCluster::start_with_replicas(n, 0)
    }

    /// Starts `n` primaries with `per` replicas each, and waits (≤ 30 s) until the cluster is
    /// ok and every primary lists its replicas in `CLUSTER SLOTS` (they have synced).
    pub fn start_with_replicas(n: usize, per: usize) -> ValkeyCluster {
        let mut buses = Vec::new();
        let nodes: Vec<Valkey> = (0..n * (1 + per))
            .map(|_| {
                // The bus port is given: the default (port + 10000) does not exist for ports
                // above 55535, which free_port() may return.
                let bus = super::services::free_port().to_string();
                buses.push(bus.clone());
                Valkey::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-port",
                    &bus,
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "3000",
                ])
            })
            .collect();
        for (i, node) in nodes.iter().take(n).enumerate() {
            let from = i * 16384 / n;
            let to = (i + 1) * 16384 / n - 1;
            let mut c = node_conn(&node.addr());
            let _: () = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(from)
                .arg(to)
                .query(&mut c)
                .expect("CLUSTER ADDSLOTSRANGE");
        }
        let mut first = node_conn(&nodes[0].addr());
        for (node, bus) in nodes.iter().zip(&buses).skip(1) {
            let _: () = redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(node.port())
                .arg(bus)
                .query(&mut first)
                .expect("CLUSTER MEET");
        }
        let cluster = ValkeyCluster {
            nodes,
            primaries: n,
        };
        cluster.wait_ok();
        if per > 0 {
            let ids: Vec<String> = cluster.nodes[..n]
                .iter()
                .map(|p| cluster.node_id(p))
                .collect();
            for (j, replica) in cluster.nodes[n..].iter().enumerate() {
                let mut c = node_conn(&replica.addr());
                let _: () = redis::cmd("CLUSTER")
                    .arg("REPLICATE")
                    .arg(&ids[j % n])
                    .query(&mut c)
                    .expect("CLUSTER REPLICATE");
            }
            cluster.wait_replicas_listed(per);
        }
        cluster
    }

    /// The replicas of primary `i`.
    pub fn replicas_of(&self, i: usize) -> Vec<&Valkey> {
        self.nodes[self.primaries..]
            .iter()
            .enumerate()
            .filter(|(j, _)| j % self.primaries == i)
            .map(|(_, r)| r)
            .collect()
    }

    /// Every replica.
    pub fn replicas(&self) -> &[Valkey] {
        &self.nodes[self.primaries..]
    }

    /// Waits until every node's `CLUSTER SLOTS` lists `per` replicas with each range.
    pub fn wait_replicas_listed(&self, per: usize) {
        self.wait_slots("every primary's replicas listed", |ranges| {
            ranges.iter().all(|r| r.len() == 3 + per)
        });
    }

    /// Sets `cluster-announce-client-port` of node `i` to `ports[i]` (the port clients must
    /// use, e.g. a TLS terminator's; replication and the bus keep the real ports), and waits
    /// until every node's `CLUSTER SLOTS` shows only those ports.
    pub fn announce_client_ports(&self, ports: &[u16]) {
        for (node, port) in self.nodes.iter().zip(ports) {
            let mut c = node_conn(&node.addr());
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg("cluster-announce-client-port")
                .arg(port)
                .query(&mut c)
                .expect("CONFIG SET cluster-announce-client-port");
        }
        self.wait_slots("announced client ports everywhere", |ranges| {
            ranges.iter().flat_map(|r| &r[2..]).all(|n| match n {
                redis::Value::Array(f) => {
                    matches!(f.get(1), Some(redis::Value::Int(p)) if ports.contains(&(*p as u16)))
                }
                _ => false,
            })
        });
    }

    /// Waits until every node's `CLUSTER SLOTS` names every node `host`.
    pub fn wait_slots_named(&self, host: &str) {
        self.wait_slots(&format!("nodes named {host}"), |ranges| {
            ranges.iter().flat_map(|r| &r[2..]).all(|n| match n {
                redis::Value::Array(f) => {
                    matches!(f.first(), Some(redis::Value::BulkString(h)) if h == host.as_bytes())
                }
                _ => false,
            })
        });
    }

    /// Waits (≤ 30 s) until `ok` holds for the `CLUSTER SLOTS` ranges of every node.
    fn wait_slots(&self, what: &str, ok: impl Fn(&[Vec<redis::Value>]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let all = self.nodes.iter().all(|n| {
                let mut c = node_conn(&n.addr());
                let v: redis::Value = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query(&mut c)
                    .unwrap_or(redis::Value::Nil);
                let redis::Value::Array(ranges) = v else {
                    return false;
                };
                let ranges: Vec<Vec<redis::Value>> = ranges
                    .into_iter()
                    .filter_map(|r| match r {
                        redis::Value::Array(f) => Some(f),
                        _ => None,
                    })
                    .collect();
                !ranges.is_empty() && ok(&ranges)
            });
            if all {
                return;
            }
            assert!(Instant::now() < deadline, "cluster: not {what} within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every node sees all slots served and every node known.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self.nodes.iter().all(|n| {
                let mut c = node_conn(&n.addr());
                let info: String = redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query(&mut c)
                    .unwrap_or_default();
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{}", self.nodes.len()))
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not converge in 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `host:port` of every primary, for `valkey.cluster`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes[..self.primaries]
            .iter()
            .map(|n| n.addr())
            .collect()
    }

    /// The node serving `key`'s slot.
    pub fn owner(&self, key: &str) -> &Valkey {
        let mut c = node_conn(&self.nodes[0].addr());
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query(&mut c)
            .expect("CLUSTER KEYSLOT");
        let id = self.id_of_slot(slot);
        self.nodes
            .iter()
            .find(|n| self.node_id(n) == id)
            .expect("a node serves the slot")
    }

    /// The cluster node id of `node`.
    pub fn node_id(&self, node: &Valkey) -> String {
        let mut c = node_conn(&node.addr());
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut c)
            .expect("CLUSTER MYID")
    }

    fn id_of_slot(&self, slot: u16) -> String {
        let mut c = node_conn(&self.nodes[0].addr());
        let shards: redis::Value = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query(&mut c)
            .expect("CLUSTER SLOTS");
        let redis::Value::Array(ranges) = shards else {
            panic!("CLUSTER SLOTS: {shards:?}")
        };
        for r in ranges {
            let redis::Value::Array(f) = r else { continue };
            let (
                Some(redis::Value::Int(a)),
                Some(redis::Value::Int(b)),
                Some(redis::Value::Array(p)),
            ) = (f.first(), f.get(1), f.get(2))
            else {
                continue;
            };
            if (*a..=*b).contains(&(slot as i64)) {
                if let Some(redis::Value::BulkString(id)) = p.get(2) {
                    return String::from_utf8_lossy(id).into_owned();
                }
            }
        }
        panic!("no node serves slot {slot}")
    }

    /// Moves `slot` (and its keys) from node `from` to node `to`, the way `valkey-cli
    /// --cluster reshard` does. `before_keys` runs after both sides are marked
    /// migrating/importing and before any key moves (to observe ASK redirects);
    /// `keys_to_move` limits which keys move before the hand-over (None: all).
    pub fn migrate_slot(
        &self,
        slot: u16,
        from: &Valkey,
        to: &Valkey,
        keys_to_move: Option<&[&str]>,
        finish: bool,
    ) {
        let (from_id, to_id) = (self.node_id(from), self.node_id(to));
        let mut src = node_conn(&from.addr());
        let mut dst = node_conn(&to.addr());
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&from_id)
            .query(&mut dst)
            .expect("SETSLOT IMPORTING");
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&to_id)
            .query(&mut src)
            .expect("SETSLOT MIGRATING");
        let keys: Vec<String> = match keys_to_move {
            Some(k) => k.iter().map(|s| s.to_string()).collect(),
            None => redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(1000)
                .query(&mut src)
                .expect("GETKEYSINSLOT"),
        };
        for k in &keys {
            let _: () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(to.port())
                .arg(k)
                .arg(0)
                .arg(5000)
                .query(&mut src)
                .expect("MIGRATE");
        }
        if !finish {
            return;
        }
        // The primaries; each passes the new owner on to its replicas.
        for node in &self.nodes[..self.primaries] {
            let mut c = node_conn(&node.addr());
            let _: () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&to_id)
                .query(&mut c)
                .expect("SETSLOT NODE");
        }
    }
}
