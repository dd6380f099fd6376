//! Read replicas (`postgres.replicas`): which streaming replica, if any, may answer a fill.
//!
//! A replica answers a fill only if it is **caught up on every write the fill must see** and
//! **within the lag bound**; otherwise the primary answers.
//!
//! - *Writes a fill must see.* The invalidation listener, before it bumps versions in Valkey
//!   for a batch of change notifications, reads the primary's WAL insert position and
//!   [raises](Replicas::raise) the requirement of each version it is about to bump to it (the
//!   notification arrives after the writing transaction committed, so that position is at
//!   or past its commit record). A fill reads its versions before it queries, so a fill that
//!   saw a bumped version also sees the raised requirement, and reads only a replica that has
//!   replayed that far. A fill that read the versions *before* the bump stores nothing after
//!   it (the versions no longer match), as without replicas. So replicas cannot bring back a
//!   stale fill. Requirements are kept per version (a table's, its epoch, a row's — hashed
//!   into a fixed set of slots, where a collision only makes a fill stricter), so steady
//!   writes to one table, or one row, keep only the fills that depend on it on the primary.
//! - *Checked twice.* The poller's last reading of a replica's replay position picks the
//!   replica; then the fill's own connection reads `pg_last_wal_replay_lsn()` again, in the
//!   same pipeline just before the fill's query, and the result is used only if that position
//!   is still at or past the requirement. The poll alone is not proof: a replica that restarts
//!   opens for reads at its consistency point, which can be behind what it had replayed, and
//!   one URL may lead to different servers over time (DNS, a load balancer).
//! - *Lag bound.* Every `replica_poll_ms` the poller samples the primary's flushed WAL
//!   position and each replica's replay position. A replica is within the bound while it has
//!   replayed what the primary had flushed `replica_max_lag_ms` ago (before enough samples
//!   exist: the oldest one). This bounds how old an answer for a never-written key can be.
//!
//! A replica that fails (a poll, or a fill's connection) is not used until a poll succeeds
//! again; the fill it failed is retried on the primary.
//!
//! What this does not promise: requirements live in this process, so with several instances
//! on one Valkey a fill here can read a version another instance bumped before this
//! instance's listener has the same notification; that listener then drops what the fill
//! stored, as for any invalidation. And the insert position can be ahead of anything a
//! replica can have (WAL not flushed yet, or a position just past a page header); fills
//! needing it go to the primary until more WAL is flushed — a matter of freshness of the
//! routing, never of the answer.

use deadpool_postgres::Pool;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_postgres::SimpleQueryMessage;

use super::{Db, DbError};

/// Read on a fill's replica connection right before its query (see the module docs).
pub(super) const REPLAY_CHECK: &str = "SELECT pg_last_wal_replay_lsn()::text";

/// `"16/B374D848"` (PostgreSQL's `pg_lsn` text) as a number: `0x16_B374_D848`.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u32::from_str_radix(hi, 16).ok()?;
    let lo = u32::from_str_radix(lo, 16).ok()?;
    Some((u64::from(hi) << 32) | u64::from(lo))
}

/// A position as PostgreSQL writes it (`16/B374D848`).
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// The first column of the first row of a simple query's answer, as an LSN. `None` for NULL
/// (e.g. `pg_last_wal_replay_lsn()` on a server that is not a standby) or no row.
pub(super) fn lsn_of(messages: &[SimpleQueryMessage]) -> Result<Option<u64>, DbError> {
    let Some(text) = messages.iter().find_map(|m| match m {
        SimpleQueryMessage::Row(r) => Some(r.get(0)),
        _ => None,
    }) else {
        return Ok(None);
    };
    match text {
        None => Ok(None),
        Some(t) => parse_lsn(t)
            .map(Some)
            .ok_or_else(|| DbError::Other(format!("unreadable WAL position '{t}'"))),
    }
}

/// One replica: its pool and what the last poll found.
pub struct Replica {
    pub(super) pool: Pool,
    /// `host:port/dbname`, for logs and INFO (never the password).
    pub name: String,
    /// Replay position of the last successful poll (or of a fill's own check, if lower).
    replay: AtomicU64,
    /// The last poll answered (and the replica is a standby) and no fill has failed on it since.
    up: AtomicBool,
    /// Within `replica_max_lag_ms` at the last poll.
    within_lag: AtomicBool,
    /// Bytes of WAL the primary had flushed and the replica had not replayed, at the last poll.
    lag_bytes: AtomicU64,
    /// Roughly how long ago the primary flushed the oldest WAL the replica had not replayed.
    lag_ms: AtomicU64,
}

impl Replica {
    pub(super) fn new(pool: Pool, name: String) -> Replica {
        Replica {
            pool,
            name,
            replay: AtomicU64::new(0),
            up: AtomicBool::new(false),
            within_lag: AtomicBool::new(false),
            lag_bytes: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
        }
    }

    /// Whether this replica may answer a fill that must see everything up to `required`.
    fn usable(&self, required: u64) -> bool {
        self.up.load(Ordering::Acquire)
            && self.within_lag.load(Ordering::Acquire)
            && self.replay.load(Ordering::Acquire) >= required
    }

    /// A fill's connection failed: not used again until a poll succeeds.
    pub(super) fn mark_down(&self) {
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(replica = %self.name, "read replica failed; fills go elsewhere until it answers a poll");
        }
    }

    /// A fill's own check found the replica behind what it needed (e.g. after a restart).
    pub(super) fn note_replay(&self, replay: Option<u64>) {
        match replay {
            Some(lsn) => self.replay.store(lsn, Ordering::Release),
            None => self.mark_down(),
        }
    }
}

/// What the last polls found about one replica.
pub struct ReplicaStatus {
    pub name: String,
    pub up: bool,
    pub within_lag: bool,
    pub replay_lsn: u64,
    pub lag_bytes: u64,
    pub lag_ms: u64,
}

/// One per-replica gauge's value.
type GaugeOf = fn(&ReplicaStatus) -> f64;

/// How many requirement slots versions are hashed into (8 bytes each).
const SLOTS: usize = 4096;

/// The replicas, the write positions fills must see, and the primary's recent positions.
pub struct Replicas {
    pub(super) members: Vec<Replica>,
    /// Per slot of versions: the primary's WAL insert position when one of them was last
    /// bumped. Only ever raised.
    slots: Box<[AtomicU64]>,
    /// What every fill must see (raised when notifications may have been missed).
    floor: AtomicU64,
    /// The highest requirement of all.
    latest: AtomicU64,
    /// (when, primary's flushed WAL position), oldest first; see [`Replicas::note_primary`].
    history: Mutex<VecDeque<(Instant, u64)>>,
    next: AtomicUsize,
    max_lag: Duration,
    poll: Duration,
}

impl Replicas {
    pub(super) fn new(members: Vec<Replica>, max_lag: Duration, poll: Duration) -> Replicas {
        Replicas {
            members,
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            floor: AtomicU64::new(0),
            latest: AtomicU64::new(0),
            history: Mutex::new(VecDeque::new()),
            next: AtomicUsize::new(0),
            max_lag,
            poll,
        }
    }

    fn slot<K: Hash>(&self, key: &K) -> &AtomicU64 {
        // SipHash with fixed keys: the same slot for the same key throughout the process.
        let mut h = std::hash::DefaultHasher::new();
        key.hash(&mut h);
        &self.slots[(h.finish() % SLOTS as u64) as usize]
    }

    /// Fills that check any of `versions` must from now on see WAL position `lsn`. Called
    /// before those versions are bumped (see the module docs).
    pub fn raise<K: Hash>(&self, versions: impl IntoIterator<Item = K>, lsn: u64) {
        for v in versions {
            self.slot(&v).fetch_max(lsn, Ordering::SeqCst);
        }
        self.latest.fetch_max(lsn, Ordering::SeqCst);
    }

    /// Every fill from now on must see WAL position `lsn`.
    pub fn raise_all(&self, lsn: u64) {
        self.floor.fetch_max(lsn, Ordering::SeqCst);
        self.latest.fetch_max(lsn, Ordering::SeqCst);
    }

    /// The WAL position a fill that checks `versions` must see. Read after the fill read
    /// those versions.
    pub fn required_for<K: Hash>(&self, versions: impl IntoIterator<Item = K>) -> u64 {
        versions
            .into_iter()
            .map(|v| self.slot(&v).load(Ordering::SeqCst))
            .fold(self.floor.load(Ordering::SeqCst), u64::max)
    }

    /// The highest position any fill must see: for a fill whose versions are not known.
    pub fn latest(&self) -> u64 {
        self.latest.load(Ordering::SeqCst)
    }

    /// A replica that may answer a fill needing `required`, taking turns among those that may.
    pub(super) fn pick(&self, required: u64) -> Option<&Replica> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| &self.members[(start + k) % n])
            .find(|r| r.usable(required))
    }

    /// Records a sample of the primary's flushed position. Keeps the newest sample at least
    /// `max_lag` old (the one the bound compares with) and everything newer.
    fn note_primary(&self, at: Instant, lsn: u64) {
        let mut h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.push_back((at, lsn));
        if let Some(cutoff) = at.checked_sub(self.max_lag) {
            while h.len() >= 2 && h[1].0 <= cutoff {
                h.pop_front();
            }
        }
    }

    /// Whether `replay` is within the lag bound at `now`, the bytes and (roughly) the time it
    /// is behind. Without any sample of the primary, it is not.
    fn judge(&self, now: Instant, replay: u64) -> (bool, u64, u64) {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        let Some(&(_, newest)) = h.back() else {
            return (false, 0, 0);
        };
        let bound = match now.checked_sub(self.max_lag) {
            Some(cutoff) => h.iter().rev().find(|(t, _)| *t <= cutoff).or(h.front()),
            None => h.front(),
        };
        let within = bound.is_some_and(|&(_, lsn)| replay >= lsn);
        let lag_ms = h.iter().find(|(_, lsn)| *lsn > replay).map_or(0, |(t, _)| {
            now.saturating_duration_since(*t).as_millis() as u64
        });
        (within, newest.saturating_sub(replay), lag_ms)
    }

    /// INFO's lines about replicas: the highest position fills have been required to see,
    /// then one `replica<i>:` line per replica.
    pub fn info_lines(&self) -> String {
        let mut s = format!("replica_required_lsn:{}\r\n", format_lsn(self.latest()));
        for (i, r) in self.status().iter().enumerate() {
            s.push_str(&format!(
                "replica{i}:addr={},up={},within_lag={},replay_lsn={},lag_bytes={},lag_ms={}\r\n",
                r.name,
                u8::from(r.up),
                u8::from(r.within_lag),
                format_lsn(r.replay_lsn),
                r.lag_bytes,
                r.lag_ms
            ));
        }
        s
    }

    /// Prometheus gauges per replica, labelled `replica="host:port/dbname"`.
    pub fn prometheus(&self) -> String {
        let status = self.status();
        let gauges: [(&str, &str, GaugeOf); 3] = [
            (
                "replica_up",
                "1 while the read replica may answer fills (it answered the last poll)",
                |r| f64::from(u8::from(r.up)),
            ),
            (
                "replica_lag_bytes",
                "WAL the primary had flushed and the read replica had not replayed, at the last poll",
                |r| r.lag_bytes as f64,
            ),
            (
                "replica_lag_seconds",
                "Roughly how long ago the primary flushed the oldest WAL the read replica had not replayed",
                |r| r.lag_ms as f64 / 1000.0,
            ),
        ];
        let mut out = String::new();
        for (name, help, value) in gauges {
            out.push_str(&format!(
                "# HELP cachefront_{name} {help}.\n# TYPE cachefront_{name} gauge\n"
            ));
            for r in &status {
                let label = r
                    .name
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                out.push_str(&format!(
                    "cachefront_{name}{{replica=\"{label}\"}} {}\n",
                    value(r)
                ));
            }
        }
        out
    }

    /// What the last polls found, per replica.
    pub fn status(&self) -> Vec<ReplicaStatus> {
        self.members
            .iter()
            .map(|r| ReplicaStatus {
                name: r.name.clone(),
                up: r.up.load(Ordering::Acquire),
                within_lag: r.within_lag.load(Ordering::Acquire),
                replay_lsn: r.replay.load(Ordering::Acquire),
                lag_bytes: r.lag_bytes.load(Ordering::Relaxed),
                lag_ms: r.lag_ms.load(Ordering::Relaxed),
            })
            .collect()
    }
}

/// Whether a replica's failure says more about the replica than about the query, so the
/// fill is retried on the primary: the connection failed or timed out, the server is
/// shutting down or starting, too many connections, the database is not (yet) there, or
/// the query was cancelled by a conflict with recovery (SQLSTATE 40001 on a standby).
pub(super) fn replica_trouble(e: &DbError) -> bool {
    match e {
        DbError::Unavailable(_) | DbError::Other(_) => true,
        DbError::Query { code, .. } => {
            code.starts_with("08")
                || code.starts_with("57P")
                || matches!(code.as_str(), "40001" | "53300" | "3D000")
        }
        DbError::Invalid(_) | DbError::TooLarge(_) => false,
    }
}

/// Polls the primary and every replica until the task is dropped (started with the server).
pub async fn run(db: Db) {
    let Some(set) = db.replicas.clone() else {
        return;
    };
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(sample_primary(db.clone(), Arc::clone(&set)));
    for i in 0..set.members.len() {
        tasks.spawn(watch_replica(db.clone(), Arc::clone(&set), i));
    }
    while tasks.join_next().await.is_some() {}
}

fn ticker(every: Duration) -> tokio::time::Interval {
    let mut t = tokio::time::interval(every);
    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    t
}

/// One WAL position, read with `sql` on `client` within the query deadline (a connection
/// that overruns it is discarded, not returned to the pool with a request stuck on it).
async fn read_lsn(
    db: &Db,
    client: super::pool::Pooled,
    sql: &'static str,
) -> Result<Option<u64>, DbError> {
    db.deadline_on(client, None, |c| {
        Box::pin(async move { lsn_of(&c.simple_query(sql).await?) })
    })
    .await
}

/// Every `replica_poll_ms`: the primary's flushed WAL position — what a replica can have
/// received — into the history the lag bound is judged against.
async fn sample_primary(db: Db, set: Arc<Replicas>) {
    let mut tick = ticker(set.poll);
    let mut failing = false;
    loop {
        tick.tick().await;
        let read = match db.client().await {
            Ok(client) => read_lsn(&db, client, "SELECT pg_current_wal_flush_lsn()::text").await,
            Err(e) => Err(e),
        };
        match read {
            Ok(Some(lsn)) => {
                set.note_primary(Instant::now(), lsn);
                failing = false;
            }
            other => {
                if !failing {
                    let why = match other {
                        Err(e) => e.to_string(),
                        Ok(_) => "no position".into(),
                    };
                    tracing::warn!(error = %why, "cannot read the primary's WAL position; replica lag is judged on older samples");
                }
                failing = true;
            }
        }
    }
}

/// Every `replica_poll_ms`: one replica's replay position, and whether it is within the bound.
async fn watch_replica(db: Db, set: Arc<Replicas>, i: usize) {
    let mut tick = ticker(set.poll);
    let r = &set.members[i];
    let mut was_up = None;
    loop {
        tick.tick().await;
        let read = match r.pool.get().await {
            Ok(client) => {
                let client = super::pool::Pooled::new(client, db.deadline());
                read_lsn(&db, client, REPLAY_CHECK).await
            }
            Err(e) => Err(e.into()),
        };
        let replay = match read {
            Ok(Some(lsn)) => Ok(lsn),
            Ok(None) => Err("not a standby (pg_last_wal_replay_lsn() is NULL)".to_string()),
            Err(e) => Err(e.to_string()),
        };
        match replay {
            Ok(lsn) => {
                let (within, lag_bytes, lag_ms) = set.judge(Instant::now(), lsn);
                r.replay.store(lsn, Ordering::Release);
                r.within_lag.store(within, Ordering::Release);
                r.lag_bytes.store(lag_bytes, Ordering::Relaxed);
                r.lag_ms.store(lag_ms, Ordering::Relaxed);
                r.up.store(true, Ordering::Release);
                if was_up != Some(true) {
                    tracing::info!(replica = %r.name, replay = %format_lsn(lsn), "read replica answering");
                }
                was_up = Some(true);
            }
            Err(why) => {
                r.up.store(false, Ordering::Release);
                if was_up != Some(false) {
                    tracing::warn!(replica = %r.name, error = %why, "read replica not usable");
                }
                was_up = Some(false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_text_round_trips() {
        assert_eq!(parse_lsn("16/B374D848"), Some((0x16 << 32) | 0xB374_D848));
        assert_eq!(parse_lsn("0/0"), Some(0));
        assert_eq!(parse_lsn("FFFFFFFF/FFFFFFFF"), Some(u64::MAX));
        assert_eq!(format_lsn((0x16 << 32) | 0xB374_D848), "16/B374D848");
        assert_eq!(format_lsn(0x0300_0060), "0/3000060");
        for bad in ["", "16", "16/", "/1", "x/1", "1/100000000", "1/2/3"] {
            assert_eq!(parse_lsn(bad), None, "{bad}");
        }
        // Ordered as numbers, not as text.
        assert!(parse_lsn("0/A0000000") > parse_lsn("0/9FFFFFFF"));
        assert!(parse_lsn("1/0") > parse_lsn("0/FFFFFFFF"));
    }

    fn set(max_lag_ms: u64) -> Replicas {
        Replicas::new(
            Vec::new(),
            Duration::from_millis(max_lag_ms),
            Duration::from_millis(10),
        )
    }

    #[test]
    fn lag_bound_compares_with_the_sample_max_lag_old() {
        let s = set(1000);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // No sample: not within.
        assert!(!s.judge(at(0), 500).0);
        s.note_primary(at(0), 100);
        // Only younger samples than the bound: the oldest one counts.
        assert!(s.judge(at(10), 100).0);
        assert!(!s.judge(at(10), 99).0);
        s.note_primary(at(500), 200);
        s.note_primary(at(1000), 300);
        s.note_primary(at(1500), 400);
        // At 1600 the bound is the sample of 500 (the newest at least 1000 ms old): 200.
        assert_eq!(s.judge(at(1600), 200), (true, 200, 600));
        assert_eq!(s.judge(at(1600), 199), (false, 201, 1100));
        assert!(s.judge(at(2100), 300).0);
        assert!(!s.judge(at(2100), 299).0);
        // Caught up: no lag at all.
        assert_eq!(s.judge(at(2100), 400), (true, 0, 0));
    }

    #[test]
    fn history_keeps_one_sample_past_the_bound() {
        let s = set(100);
        let t0 = Instant::now();
        for i in 0..50u64 {
            s.note_primary(t0 + Duration::from_millis(10 * i), i);
        }
        let h = s.history.lock().unwrap();
        // Newest at 490 ms; cutoff 390 ms: the sample of 390 ms and the ten after it.
        assert_eq!(h.len(), 11);
        assert_eq!(h.front().map(|s| s.1), Some(39));
    }

    #[test]
    fn requirements_only_rise_and_stay_with_their_versions() {
        let s = set(100);
        assert_eq!(s.required_for(["v:a"]), 0);
        s.raise(["v:a"], 10);
        s.raise(["v:a"], 5);
        assert_eq!(s.required_for(["v:a"]), 10);
        assert_eq!(s.required_for(["v:a", "v:b"]), 10);
        s.raise(["v:b", "v:c"], 20);
        assert_eq!(s.required_for(["v:a", "v:b"]), 20);
        assert_eq!(s.latest(), 20);
        // Some key other than a, b and c that shares no slot with them.
        let other = (0..)
            .map(|i| format!("v:x{i}"))
            .find(|k| {
                ["v:a", "v:b", "v:c"]
                    .iter()
                    .all(|o| !std::ptr::eq(s.slot(o), s.slot(k)))
            })
            .unwrap();
        assert_eq!(s.required_for([other.as_str()]), 0);
        s.raise_all(15);
        assert_eq!(s.required_for([other.as_str()]), 15);
        assert_eq!(s.required_for(["v:a"]), 15);
        assert_eq!(s.required_for(["v:b"]), 20);
        assert_eq!(s.latest(), 20);
    }

    #[test]
    fn which_failures_go_to_the_primary() {
        let q = |code: &str| DbError::Query {
            code: code.into(),
            message: String::new(),
        };
        assert!(replica_trouble(&DbError::Unavailable("down".into())));
        assert!(replica_trouble(&q("57P01")));
        assert!(replica_trouble(&q("08006")));
        assert!(replica_trouble(&q("40001")));
        assert!(replica_trouble(&q("3D000")));
        assert!(!replica_trouble(&q("42703")));
        assert!(!replica_trouble(&q("22P02")));
        assert!(!replica_trouble(&q("57014")));
        assert!(!replica_trouble(&DbError::Invalid(
            "ERR too many rows".into()
        )));
    }
}
