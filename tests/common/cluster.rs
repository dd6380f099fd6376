//! A real Valkey Cluster for tests: `n` primaries (valkey-server in cluster mode on free
//! ports of 127.0.0.1), slots split evenly, joined with CLUSTER MEET. Dropped → all killed.

use super::services::Valkey;
use std::time::{Duration, Instant};

pub struct ValkeyCluster {
    pub nodes: Vec<Valkey>,
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
        let mut buses = Vec::new();
        let nodes: Vec<Valkey> = (0..n)
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
        for (i, node) in nodes.iter().enumerate() {
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
        let cluster = ValkeyCluster { nodes };
        cluster.wait_ok();
        cluster
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

    /// `host:port` of every node, for `valkey.cluster`.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.addr()).collect()
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
        for node in &self.nodes {
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
