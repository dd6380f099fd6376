//! Several cachefront instances on one Valkey and one database (issue 12, part 6): each
//! change is applied to Valkey once per fleet, by the holder of the invalidation lease; the
//! other instances' L1s follow through tracking; when the holder goes, another takes over
//! within the stated bound and flushes what it cannot vouch for. Both change sources.

mod common;

use cachefront::config::Config;
use cachefront::server::Running;
use common::fresh::set_source;
use common::services::{postgres, TestDb, Valkey};
use common::*;
use std::collections::BTreeMap;
use std::time::Duration;

/// The commands an invalidation runs in Valkey, compared between 1 and 3 instances.
const COUNTED: [&str; 5] = ["evalsha", "eval", "incr", "del", "unlink"];

/// Instances of one fleet: one Valkey, one database, cachefronts in front of both.
struct Fleet {
    valkey: Valkey,
    db: TestDb,
    nodes: Vec<Option<Running>>,
    source: &'static str,
    lease_ms: u64,
}

fn tweak(source: &str, lease_ms: u64) -> impl Fn(&mut Config) + '_ {
    move |c: &mut Config| {
        set_source(c, source);
        c.invalidation.lease_ms = lease_ms;
    }
}

impl Fleet {
    async fn start(source: &'static str, n: usize, lease_ms: u64) -> Fleet {
        let stack = Stack::start_with(tweak(source, lease_ms)).await;
        let mut nodes = Vec::new();
        for _ in 1..n {
            nodes.push(Some(stack.another(tweak(source, lease_ms)).await));
        }
        let Stack { valkey, db, proxy } = stack;
        nodes.insert(0, Some(proxy));
        let f = Fleet {
            valkey,
            db,
            nodes,
            source,
            lease_ms,
        };
        f.settled().await;
        f
    }

    /// Starts one more instance on the fleet's Valkey and database.
    async fn grow(&mut self) {
        let mut cfg = config_for(&self.valkey, &self.db);
        tweak(self.source, self.lease_ms)(&mut cfg);
        let node = cachefront::server::spawn(cfg)
            .await
            .expect("cachefront starts");
        self.nodes.push(Some(node));
        self.settled().await;
    }

    fn live(&self) -> impl Iterator<Item = (usize, &Running)> {
        self.nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.as_ref().map(|n| (i, n)))
    }

    fn url(node: &Running) -> String {
        format!("redis://127.0.0.1:{}", node.addr.port())
    }

    async fn info(node: &Running) -> String {
        info_cachefront(&mut connect(&Self::url(node)).await).await
    }

    /// The instances holding the lease, as their INFO says.
    async fn holders(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, n) in self.live() {
            if info_field(&Self::info(n).await, "invalidation_lease_holder") == "1" {
                out.push(i);
            }
        }
        out
    }

    /// Waits until every instance listens and exactly one holds the lease — the one whose
    /// id the lease key in Valkey holds — and returns it.
    async fn settled(&self) -> usize {
        let mut holder = usize::MAX;
        eventually("every instance listening, one lease holder", async || {
            for (_, n) in self.live() {
                if info_field(&Self::info(n).await, "invalidation_listening") != "1" {
                    return false;
                }
            }
            let h = self.holders().await;
            if h.len() != 1 {
                return false;
            }
            holder = h[0];
            true
        })
        .await;
        let key: Option<String> = redis::cmd("GET")
            .arg("cachefront:{lease}:invalidation")
            .query_async(&mut self.valkey_client().await)
            .await
            .expect("GET the lease");
        let node = self.nodes[holder].as_ref().expect("a live holder");
        assert_eq!(
            key.as_deref(),
            Some(node.shared.invalidation.lease().id()),
            "the lease in Valkey names the instance that says it holds it"
        );
        holder
    }

    async fn valkey_client(&self) -> redis::aio::MultiplexedConnection {
        connect(&self.valkey.url()).await
    }

    fn psql(&self, sql: &str) -> String {
        postgres().psql(self.db.name(), sql)
    }

    /// `EMP.GET 1` and the guide's join through every instance (each fills or hits, and
    /// keeps what it read in its L1).
    async fn read_all(&self) -> Vec<(Option<String>, String)> {
        let mut out = Vec::new();
        for (_, n) in self.live() {
            let mut c = connect(&Self::url(n)).await;
            out.push((
                emp_get(&mut c, 1).await,
                sql_cached(&mut c, GUIDE_QUERY).await,
            ));
        }
        out
    }

    /// Runs `sql`, then waits until the holder has dropped employee 1 and the join from
    /// Valkey, and a little longer (another instance applying too would have by then).
    async fn write_and_wait_applied(&self, sql: &str) {
        let mut v = self.valkey_client().await;
        self.psql(sql);
        eventually("the write's invalidation applied in Valkey", async || {
            let n: i64 = redis::cmd("EXISTS")
                .arg("employee:1")
                .arg(GUIDE_QUERY_KEY)
                .query_async(&mut v)
                .await
                .expect("EXISTS");
            n == 0
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// Valkey's call counts of [`COUNTED`] since the last reset.
    async fn command_counts(&self) -> BTreeMap<&'static str, u64> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.valkey_client().await)
            .await
            .expect("INFO commandstats");
        COUNTED
            .iter()
            .map(|&c| {
                let calls = info
                    .lines()
                    .find_map(|l| l.strip_prefix(&format!("cmdstat_{c}:calls=")))
                    .and_then(|rest| rest.split(',').next()?.parse().ok())
                    .unwrap_or(0);
                (c, calls)
            })
            .collect()
    }

    async fn reset_stats(&self) {
        let ok: String = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut self.valkey_client().await)
            .await
            .expect("CONFIG RESETSTAT");
        assert_eq!(ok, "OK");
    }

    /// Fills through every instance, resets Valkey's statistics, writes employee 1's name
    /// and returns what the write cost in Valkey once applied.
    async fn counts_for_one_update(&self, name: &str) -> BTreeMap<&'static str, u64> {
        self.read_all().await;
        self.reset_stats().await;
        self.write_and_wait_applied(&format!(
            "UPDATE employees SET name = '{name}' WHERE id = 1"
        ))
        .await;
        self.command_counts().await
    }

    /// Every instance answers `name` for employee 1, in `EMP.GET 1` and in the join.
    async fn all_fresh(&self, name: &str) {
        for (i, n) in self.live() {
            let mut c = connect(&Self::url(n)).await;
            eventually(&format!("instance {i} answers {name}"), async || {
                emp_get(&mut c, 1).await.as_deref() == Some(name)
                    && sql_cached(&mut c, GUIDE_QUERY).await.contains(name)
            })
            .await;
        }
    }
}

/// One UPDATE costs Valkey the same commands whether 1 or 3 instances share it, and every
/// instance answers fresh after it.
async fn once_per_fleet(source: &'static str) {
    // A long lease: no renewal script runs while the counts are taken.
    let mut fleet = Fleet::start(source, 1, 60_000).await;
    // Loads the scripts into Valkey, so neither measurement pays the first EVAL.
    fleet.read_all().await;
    fleet
        .write_and_wait_applied("UPDATE employees SET name = 'Alice J.' WHERE id = 1")
        .await;
    let one = fleet.counts_for_one_update("Alice One").await;
    fleet.all_fresh("Alice One").await;

    fleet.grow().await;
    fleet.grow().await;
    let holder = fleet.settled().await;
    let three = fleet.counts_for_one_update("Alice Three").await;
    fleet.all_fresh("Alice Three").await;

    println!("source={source} Valkey commands per UPDATE (row-keyed EMP.GET 1 + the guide's join cached): 1 instance {one:?}; 3 instances {three:?} (holder: instance {holder})");
    assert_eq!(
        one, three,
        "3 instances must cost Valkey what 1 does per write"
    );
    assert!(
        one["evalsha"] + one["eval"] >= 1,
        "the invalidation ran: {one:?}"
    );
    let takeovers: u64 = {
        let mut sum = 0;
        for (_, n) in fleet.live() {
            sum += info_field(&Fleet::info(n).await, "invalidation_takeovers")
                .parse::<u64>()
                .expect("a count");
        }
        sum
    };
    assert_eq!(takeovers, 1, "only the first instance ever took the lease");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn triggers_apply_each_change_once_per_fleet() {
    once_per_fleet("triggers").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wal_applies_each_change_once_per_fleet() {
    once_per_fleet("wal").await;
}

/// Takes the current holder out — gracefully (it releases the lease) or as a crash (the lease
/// expires) — and returns how long until another instance held it.
async fn take_holder_out(fleet: &mut Fleet, crash: bool) -> (usize, Duration) {
    let old = fleet.settled().await;
    let node = fleet.nodes[old].take().expect("the holder is live");
    let stop = tokio::spawn(async move {
        if crash {
            node.crash().await
        } else {
            node.shutdown().await
        }
    });
    let mut new = usize::MAX;
    let took = eventually("another instance holds the lease", async || {
        let h = fleet.holders().await;
        match h.as_slice() {
            [one] => {
                new = *one;
                true
            }
            _ => false,
        }
    })
    .await;
    stop.await.expect("the old holder stops");
    assert_ne!(new, old);
    (new, took)
}

async fn takeover(source: &'static str) {
    let lease_ms = 600;
    let bound = Duration::from_millis(lease_ms + lease_ms / 3);
    // Polling INFO of two instances, and a loaded two-core machine.
    let slack = Duration::from_millis(700);
    let mut fleet = Fleet::start(source, 3, lease_ms).await;
    fleet.read_all().await;

    let (first, released) = take_holder_out(&mut fleet, false).await;
    fleet.psql("UPDATE employees SET name = 'Alice After Release' WHERE id = 1");
    fleet.all_fresh("Alice After Release").await;
    fleet.read_all().await;

    let (second, expired) = take_holder_out(&mut fleet, true).await;
    fleet.psql("UPDATE employees SET name = 'Alice After Crash' WHERE id = 1");
    fleet.all_fresh("Alice After Crash").await;
    let info = Fleet::info(fleet.nodes[second].as_ref().expect("live")).await;
    assert_eq!(info_field(&info, "invalidation_takeovers"), "1", "{info}");
    assert_eq!(info_field(&info, "invalidation_lease_holder"), "1");
    println!("source={source} lease_ms={lease_ms}: takeover after a graceful shutdown {released:?} (instance {first}), after a crash {expired:?} (instance {second}); bound {bound:?}");
    assert!(
        expired <= bound + slack,
        "a crashed holder's lease is taken over within lease_ms + lease_ms/3 (+{slack:?}): took {expired:?}"
    );
    assert!(released <= bound + slack, "took {released:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn triggers_takeover_when_the_holder_goes() {
    takeover("triggers").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wal_takeover_when_the_holder_goes() {
    takeover("wal").await;
}
