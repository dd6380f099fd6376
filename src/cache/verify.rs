//! Continuous verification: a background sampler re-reads a few cached entries from
//! PostgreSQL and compares them with what Valkey holds. A mismatch is counted
//! (`verify_mismatches`), logged with the key and the query, and the entry dropped from Valkey
//! and the L1. A healthy deployment shows 0; that number is the proof users can watch.
//!
//! **What is sampled.** The [`Registry`] keeps the most recent fills this process stored
//! (bounded in count and bytes: `verify.registry_entries`, `verify.registry_bytes`), each with
//! what re-running it needs: the entry (key, TTL, dependencies), whether it is a hash or a
//! negative marker, and the command's [`Source`], which loads and shapes the value exactly as
//! the fill did (JSON text, value string, hash fields). A refill of a key replaces its record.
//! Picks are uniform over the records.
//!
//! **Why a mismatch is never a false alarm under concurrent writes.** A write commits, then
//! its invalidation reaches Valkey a few milliseconds later; a sampler reading PostgreSQL in
//! between sees new rows while Valkey still holds the old value, legitimately. So a check
//! ([`check`]) is:
//!
//! 1. read the entry's versions, then the entry (one round trip, in that order): `V1`, `B1`;
//! 2. query PostgreSQL: `P`. `P = B1`: verified.
//! 3. Otherwise wait `verify.grace_ms`, longer than a committed write takes to reach Valkey,
//!    and read again: `V2`, `B2`. Unless `V2 = V1` and `B2 = B1` (and the listener was up and
//!    the entry's tables not degraded, at both reads), no verdict: something is on its way.
//! 4. Query again: `P2`. `P2 = B1`: no verdict (the difference did not last: a query whose
//!    answer varies by itself). Otherwise a mismatch.
//!
//! The argument: say `B1` was stored by a fill `F` under the fill protocol, and `P ≠ B1`
//! because of a committed write `W` that `F`'s snapshot missed. `W` committed before `P`'s
//! snapshot. Its invalidation bumps one of the entry's versions (table, epoch, row, or the
//! cluster generation), then deletes the entry. It cannot have run before `F` read its
//! versions (`F`'s snapshot, taken after, would include `W`); not between that and `F`'s store
//! (the store would have been refused); not between the store and step 1 (the entry would be
//! gone, or restored by a later fill — then take that fill as `F`). So it runs after `V1` was
//! read, and — the invalidation bound — within the grace of `W`'s commit, hence before step 3:
//! `V2 ≠ V1`. Contrapositive: versions unchanged over the grace and the same bytes still
//! cached, while PostgreSQL disagrees twice, means a write whose invalidation did not reach the
//! entry, or bytes written outside the fill protocol. Either is what this exists to catch.
//! A degraded table (its invalidation failing, see `cache::degraded`) and a listener that is
//! down (writes unheard; its reconnection flushes) are the two ways the bound is known not to
//! hold: checks then reach no verdict. A read replica answers only if it has replayed what the
//! entry's versions require, as for a fill (`command::fill::must_see`).
//! With several instances sharing one Valkey, only the holder of the invalidation lease
//! applies changes, and when it dies its changes wait until another instance takes the lease
//! over and flushes everything (which bumps every version): the bound is then the grace plus
//! that handover ([`Gate::handover`]), so an instance that does not apply waits that much
//! longer, and a check during which this instance's lease term changed reaches no verdict.
//!
//! **What is not a mismatch.** TTL-only entries (cached without invalidation: with
//! `invalidation.enabled = false`, or marked so by [`ttl_only`]) are expected to go stale:
//! a difference is counted in `verify_ttl_only_stale` and the entry kept until its TTL.
//! Negative markers ("no such row") are checked like values: the expected answer is no row.
//!
//! **Clients are not disturbed.** One task at `verify.per_second` checks, at most
//! [`MAX_IN_FLIGHT`] at once (a suspected mismatch waits out its grace without holding up the
//! rest); it loads through the command's source — the normal pool, deadline and replica choice
//! — never through the fill coalescer, so it neither joins nor delays a client's fill. Its
//! queries count in `verify_queries`, not `db_queries`.

use rand::Rng;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::read::Source;
use super::{Cache, Entry, Value};
use crate::config::VerifyConfig;
use crate::metrics::inc;

/// Most checks running at once: a check that suspects a mismatch waits out its grace.
pub const MAX_IN_FLIGHT: usize = 8;

/// How much of a query's text a mismatch's log line carries.
const LOGGED_SQL_CHARS: usize = 200;

/// What a record costs beyond its strings (the record, its `Arc`s, the index entry).
const RECORD_OVERHEAD: usize = 160;

/// Where a fill's value came from: what the fill options carry into the registry.
pub struct Origin {
    pub source: Arc<dyn Source>,
    /// Stored as a hash (`HGETALL` reads it back).
    pub hash: bool,
}

/// One fill this process stored, and how to re-run it.
pub struct Sample {
    /// Numbered in recording order; a refill of the key supersedes older numbers.
    seq: u64,
    /// The registry's generation when recorded ([`Registry::clear`] starts a new one).
    generation: u64,
    /// The entry key (for a negative marker, the key it stands for) and its dependencies as
    /// the fill checked them.
    pub entry: Entry,
    /// A "no such row" marker, not a value.
    pub negative: bool,
    pub hash: bool,
    source: Arc<dyn Source>,
    size: usize,
}

/// The most recent fills of this process, bounded in count and bytes; picks are uniform.
pub struct Registry {
    /// Whether anything is recorded at all (`verify` on).
    on: AtomicBool,
    inner: Mutex<Ring>,
}

#[derive(Default)]
struct Ring {
    /// Oldest first, ascending `seq`.
    items: VecDeque<Arc<Sample>>,
    /// Entry key → `seq` of its newest record.
    newest: HashMap<String, u64>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    next_seq: u64,
    generation: u64,
}

impl Default for Registry {
    /// Off: records nothing.
    fn default() -> Self {
        Registry {
            on: AtomicBool::new(false),
            inner: Mutex::new(Ring::default()),
        }
    }
}

impl Registry {
    pub fn new(cfg: &VerifyConfig) -> Registry {
        Registry {
            on: AtomicBool::new(cfg.active()),
            inner: Mutex::new(Ring {
                max_entries: cfg.registry_entries,
                max_bytes: cfg.registry_bytes,
                ..Ring::default()
            }),
        }
    }

    /// Whether fills are recorded (one atomic load on the fill path).
    pub fn enabled(&self) -> bool {
        self.on.load(Relaxed)
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A fill stored `entry` (a negative marker if `negative`): remember it, dropping the
    /// oldest records past the bounds.
    pub fn record(&self, entry: Entry, negative: bool, origin: Origin) {
        if !self.enabled() {
            return;
        }
        let size = RECORD_OVERHEAD
            + 2 * entry.key.len()
            + entry.tables().iter().map(|t| t.len() + 24).sum::<usize>()
            + entry
                .deps
                .row
                .as_ref()
                .map_or(0, |r| r.column.len() + r.value.len())
            + origin.source.size();
        let mut ring = self.ring();
        if size > ring.max_bytes {
            return;
        }
        let seq = ring.next_seq;
        ring.next_seq += 1;
        ring.newest.insert(entry.key.clone(), seq);
        let generation = ring.generation;
        ring.items.push_back(Arc::new(Sample {
            seq,
            generation,
            entry,
            negative,
            hash: origin.hash,
            source: origin.source,
            size,
        }));
        ring.bytes += size;
        while ring.items.len() > ring.max_entries || ring.bytes > ring.max_bytes {
            let Some(old) = ring.items.pop_front() else {
                break;
            };
            ring.unindex(&old);
        }
    }

    /// A record picked uniformly at random; records a refill has superseded are dropped on
    /// the way (a few tries per pick).
    pub fn pick(&self) -> Option<Arc<Sample>> {
        let mut ring = self.ring();
        let mut rng = rand::thread_rng();
        for _ in 0..8 {
            if ring.items.is_empty() {
                return None;
            }
            let i = rng.gen_range(0..ring.items.len());
            let s = &ring.items[i];
            if ring.newest.get(&s.entry.key) == Some(&s.seq) {
                return Some(Arc::clone(s));
            }
            if let Some(stale) = ring.items.remove(i) {
                ring.bytes -= stale.size;
            }
        }
        None
    }

    /// Whether `s` is still the newest record of its key (no refill by this process, no
    /// [`Registry::clear`] since).
    fn current(&self, s: &Sample) -> bool {
        let ring = self.ring();
        ring.generation == s.generation && ring.newest.get(&s.entry.key) == Some(&s.seq)
    }

    /// Drops `s` (its entry is gone, or was found wrong and dropped).
    fn forget(&self, s: &Sample) {
        let mut ring = self.ring();
        if let Ok(i) = ring.items.binary_search_by_key(&s.seq, |x| x.seq) {
            if let Some(old) = ring.items.remove(i) {
                ring.unindex(&old);
            }
        }
    }

    /// Forgets every record: at shutdown (a record holds its command's context) and on a
    /// reload (a named query may have changed under its key).
    pub fn clear(&self) {
        let mut ring = self.ring();
        ring.items.clear();
        ring.newest.clear();
        ring.bytes = 0;
        ring.generation += 1;
    }

    /// How many records are kept.
    pub fn len(&self) -> usize {
        self.ring().items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Ring {
    /// Accounts for a record taken out of `items`.
    fn unindex(&mut self, old: &Sample) {
        self.bytes -= old.size;
        if self.newest.get(&old.entry.key) == Some(&old.seq) {
            self.newest.remove(&old.entry.key);
        }
    }
}

/// Entries cached without invalidation (the operator's TTL-only opt-in), which are expected
/// to go stale until their TTL. `invalidation.enabled = false` makes every entry so (see
/// [`Gate::tracked`]).
fn ttl_only(entry: &Entry) -> bool {
    entry.deps.tracking == super::Tracking::TtlOnly
}

/// What the sampler asks of the invalidation side, which sits above the cache: the server
/// supplies it.
pub struct Gate {
    /// Whether writes invalidate entries at all (`invalidation.enabled`); without, every
    /// entry is TTL-only.
    pub tracked: bool,
    /// Whether the change listener is up now: while it is not, writes go unheard (its
    /// reconnection flushes), so no verdict is possible.
    pub live: Box<dyn Fn() -> bool + Send + Sync>,
    /// Of the instances sharing this Valkey, the one holding the invalidation lease applies
    /// changes: while this process does (and has flushed since taking it), its term, else 0.
    /// A check's verdict needs the same term at both reads.
    pub term: Box<dyn Fn() -> u64 + Send + Sync>,
    /// While another instance applies, how much later than usual a change may reach Valkey
    /// (its lease running out when it dies, and the takeover): added to the grace.
    pub handover: Duration,
}

/// How one check ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Valkey holds what PostgreSQL answers.
    Verified,
    /// It does not, and no invalidation is on its way: counted, logged, dropped.
    Mismatch,
    /// A TTL-only entry differs (expected): counted apart, kept.
    TtlOnlyStale,
    /// No verdict, and why.
    Skipped(&'static str),
    /// The entry is no longer cached (expired, invalidated): forgotten, not counted.
    Gone,
}

/// Runs the sampler until aborted: `cfg.per_second` picks a second, each checked on a task of
/// its own, at most [`MAX_IN_FLIGHT`] at once (a tick finding them all busy is skipped). The
/// checks end with this future (a `JoinSet`), and the registry is cleared when it ends.
pub async fn run(cache: Arc<Cache>, cfg: VerifyConfig, gate: Gate) {
    if !cfg.active() {
        return;
    }
    let _clear = ClearOnDrop(Arc::clone(&cache.verify));
    let gate = Arc::new(gate);
    let grace = Duration::from_millis(cfg.grace_ms);
    let period = Duration::from_secs_f64(1.0 / cfg.per_second as f64);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut checks = tokio::task::JoinSet::new();
    tracing::info!(
        per_second = cfg.per_second,
        grace_ms = cfg.grace_ms,
        "verification sampler started"
    );
    loop {
        tick.tick().await;
        while checks.try_join_next().is_some() {}
        if checks.len() >= MAX_IN_FLIGHT {
            continue;
        }
        let Some(sample) = cache.verify.pick() else {
            continue;
        };
        let (cache, gate) = (Arc::clone(&cache), Arc::clone(&gate));
        checks.spawn(async move {
            let outcome = check(&cache, &sample, grace, &gate).await;
            tally(&cache, &sample, outcome);
        });
    }
}

/// Clears the registry when the sampler ends, however it ends (aborted at shutdown): its
/// records hold the commands' context, which holds the cache.
struct ClearOnDrop(Arc<Registry>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.clear();
    }
}

/// Counts an outcome, and forgets a record whose entry is gone.
fn tally(cache: &Cache, s: &Sample, outcome: Outcome) {
    let m = &cache.metrics;
    match outcome {
        Outcome::Verified => inc(&m.verify_checks),
        Outcome::Mismatch => {
            inc(&m.verify_checks);
            inc(&m.verify_mismatches);
        }
        Outcome::TtlOnlyStale => {
            inc(&m.verify_checks);
            inc(&m.verify_ttl_only_stale);
        }
        Outcome::Skipped(why) => {
            inc(&m.verify_skipped);
            tracing::debug!(key = %s.entry.key, why, "verification: no verdict");
        }
        Outcome::Gone => cache.verify.forget(s),
    }
}

/// The key the sample's value is stored under (the marker's, for a negative entry).
fn stored_key(cache: &Cache, s: &Sample) -> String {
    if s.negative {
        cache.store.negative_key(&s.entry.key)
    } else {
        s.entry.key.clone()
    }
}

/// What Valkey holds for the sample: its versions, and its value as a fill would have
/// produced it (`Value::Absent` for a negative marker), `None` if it is not cached.
async fn cached(cache: &Cache, s: &Sample) -> crate::error::Result<(Vec<String>, Option<Value>)> {
    let negative_key = s.negative.then(|| stored_key(cache, s));
    let p = cache
        .store
        .current(&s.entry, s.hash, negative_key.as_deref())
        .await?;
    let value = match s.negative {
        true => p.negative.then_some(Value::Absent),
        false => p.existing,
    };
    Ok((p.versions, value))
}

/// PostgreSQL's answer now, shaped as a fill stores it; counted in `verify_queries`.
async fn fresh(cache: &Cache, s: &Sample) -> crate::error::Result<Value> {
    inc(&cache.metrics.verify_queries);
    Arc::clone(&s.source).load(Some(s.entry.deps.clone())).await
}

/// Whether a cached value and a fresh one are the same entry. Hash fields compare as a set
/// (Valkey does not keep their order; a repeated column name keeps its last value, as
/// `HSET` does); a hash with no field is no entry, like a fill that stores nothing.
pub fn same(cached: &Value, fresh: &Value) -> bool {
    fn fields(v: &Value) -> Option<BTreeMap<&str, &[u8]>> {
        match v {
            Value::Hash(f) => Some(f.iter().map(|(k, v)| (k.as_str(), &v[..])).collect()),
            _ => None,
        }
    }
    let empty = |v: &Value| matches!(v, Value::Hash(f) if f.is_empty());
    match (cached, fresh) {
        (Value::Hash(_), Value::Hash(_)) => fields(cached) == fields(fresh),
        (Value::Absent, f) => *f == Value::Absent || empty(f),
        (c, f) => c == f,
    }
}

/// Whether the entry can be judged now: the listener up and its tables not degraded.
fn judgeable(cache: &Cache, s: &Sample, gate: &Gate) -> bool {
    !gate.tracked || ((gate.live)() && !cache.bypasses(&s.entry))
}

/// One check of one sample (see the module doc for why each step is there).
pub async fn check(cache: &Cache, s: &Sample, grace: Duration, gate: &Gate) -> Outcome {
    if !judgeable(cache, s, gate) {
        return Outcome::Skipped("the listener is down or the entry's tables are degraded");
    }
    let (versions, held) = match cached(cache, s).await {
        Ok((v, Some(held))) => (v, held),
        Ok((_, None)) => return Outcome::Gone,
        Err(_) => return Outcome::Skipped("Valkey did not answer"),
    };
    let Ok(answer) = fresh(cache, s).await else {
        return Outcome::Skipped("PostgreSQL did not answer");
    };
    if same(&held, &answer) {
        return Outcome::Verified;
    }
    if !gate.tracked || ttl_only(&s.entry) {
        return Outcome::TtlOnlyStale;
    }
    let term = (gate.term)();
    let wait = if term == 0 {
        grace + gate.handover
    } else {
        grace
    };
    tokio::time::sleep(wait).await;
    if !judgeable(cache, s, gate) {
        return Outcome::Skipped("the listener is down or the entry's tables are degraded");
    }
    if (gate.term)() != term {
        return Outcome::Skipped("the invalidation lease changed hands");
    }
    match cached(cache, s).await {
        Ok((v, Some(again))) if v == versions && same(&again, &held) => {}
        Ok(_) => return Outcome::Skipped("an invalidation or a fill changed the entry"),
        Err(_) => return Outcome::Skipped("Valkey did not answer"),
    }
    if !cache.verify.current(s) {
        return Outcome::Skipped("refilled or reloaded meanwhile");
    }
    let Ok(again) = fresh(cache, s).await else {
        return Outcome::Skipped("PostgreSQL did not answer");
    };
    if same(&held, &again) {
        return Outcome::Skipped("the difference did not last");
    }
    drop_wrong(cache, s).await;
    Outcome::Mismatch
}

/// A mismatch: logged with the key and the query, then the entry dropped from the L1 and
/// Valkey, so the next read fills it afresh.
async fn drop_wrong(cache: &Cache, s: &Sample) {
    let (command, sql) = s.source.query();
    let sql: String = sql
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(LOGGED_SQL_CHARS)
        .collect();
    let key = stored_key(cache, s);
    cache.l1.invalidate_key(s.entry.key.as_bytes());
    cache.recent.invalidate(&s.entry.key);
    let dropped = cache.store.unlink(&key).await;
    cache.l1.invalidate_key(s.entry.key.as_bytes());
    cache.verify.forget(s);
    tracing::error!(
        key = %key,
        command = %command,
        query = %sql,
        negative = s.negative,
        dropped = ?dropped,
        "verification: the cached entry differs from PostgreSQL and no invalidation is on its way; dropped"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Deps;
    use bytes::Bytes;
    use futures::future::BoxFuture;
    use futures::FutureExt;

    struct Nothing(usize);

    impl Source for Nothing {
        fn prepare(
            self: Arc<Self>,
            entry: Entry,
        ) -> BoxFuture<'static, crate::error::Result<Entry>> {
            async move { Ok(entry) }.boxed()
        }
        fn load(
            self: Arc<Self>,
            _deps: Option<Deps>,
        ) -> BoxFuture<'static, crate::error::Result<Value>> {
            async { Ok(Value::Absent) }.boxed()
        }
        fn filled(&self, _took: Duration) {}
        fn query(&self) -> (&str, &str) {
            ("X.GET", "SELECT 1")
        }
        fn size(&self) -> usize {
            self.0
        }
    }

    fn entry(key: &str) -> Entry {
        Entry {
            key: key.into(),
            ttl: 60,
            deps: Deps {
                tables: vec!["16384".into()],
                row: None,
                tracking: super::super::Tracking::Tracked,
            },
        }
    }

    fn origin(size: usize) -> Origin {
        Origin {
            source: Arc::new(Nothing(size)),
            hash: false,
        }
    }

    fn registry(entries: usize, bytes: usize) -> Registry {
        Registry::new(&VerifyConfig {
            registry_entries: entries,
            registry_bytes: bytes,
            ..VerifyConfig::default()
        })
    }

    #[test]
    fn the_registry_keeps_the_newest_within_its_bounds() {
        let r = registry(3, 1 << 20);
        for i in 0..10 {
            r.record(entry(&format!("k:{i}")), false, origin(0));
        }
        assert_eq!(r.len(), 3);
        let keys: Vec<_> = r.ring().items.iter().map(|s| s.entry.key.clone()).collect();
        assert_eq!(keys, ["k:7", "k:8", "k:9"]);
        let r = registry(1000, 4096);
        for i in 0..10 {
            r.record(entry(&format!("k:{i}")), false, origin(1000));
        }
        assert!(r.ring().bytes <= 4096);
        assert_eq!(r.len(), 3, "about 1.2 KB each");
        r.record(entry("huge"), false, origin(10_000));
        assert_eq!(r.len(), 3, "a record larger than the bound is not kept");
    }

    #[test]
    fn a_refill_supersedes_and_picks_are_current() {
        let r = registry(100, 1 << 20);
        r.record(entry("a"), false, origin(0));
        let first = r.pick().expect("one record");
        r.record(entry("a"), false, origin(0));
        assert!(!r.current(&first), "superseded by the refill");
        for _ in 0..20 {
            let s = r.pick().expect("the newest record");
            assert!(r.current(&s));
        }
        assert_eq!(r.len(), 1, "the superseded record was dropped by a pick");
        let s = r.pick().unwrap();
        r.forget(&s);
        assert!(r.is_empty() && r.pick().is_none());
        r.record(entry("b"), false, origin(0));
        let b = r.pick().unwrap();
        r.clear();
        assert!(!r.current(&b) && r.is_empty());
    }

    #[test]
    fn picks_are_spread_over_the_records() {
        let r = registry(100, 1 << 20);
        for i in 0..4 {
            r.record(entry(&format!("k:{i}")), false, origin(0));
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(r.pick().unwrap().entry.key.clone());
        }
        assert_eq!(seen.len(), 4);
    }

    #[test]
    fn off_records_nothing() {
        let r = Registry::new(&VerifyConfig {
            per_second: 0,
            ..VerifyConfig::default()
        });
        r.record(entry("a"), false, origin(0));
        assert!(r.is_empty());
        let r = Registry::default();
        r.record(entry("a"), false, origin(0));
        assert!(r.is_empty());
    }

    #[test]
    fn values_compare_as_stored() {
        let s = |t: &'static str| Value::String(Bytes::from_static(t.as_bytes()));
        let h = |f: &[(&str, &'static str)]| {
            Value::Hash(
                f.iter()
                    .map(|(k, v)| (k.to_string(), Bytes::from_static(v.as_bytes())))
                    .collect(),
            )
        };
        assert!(same(&s("a"), &s("a")));
        assert!(!same(&s("a"), &s("b")));
        assert!(!same(&s("a"), &Value::Absent));
        assert!(same(
            &h(&[("a", "1"), ("b", "2")]),
            &h(&[("b", "2"), ("a", "1")])
        ));
        assert!(!same(&h(&[("a", "1")]), &h(&[("a", "1"), ("b", "2")])));
        assert!(same(&Value::Absent, &Value::Absent));
        assert!(same(&Value::Absent, &h(&[])), "an all-NULL row: no entry");
        assert!(!same(&Value::Absent, &s("a")));
    }
}
