//! The in-process L1: cachefront's own entries (named queries, SQL.CACHED) kept in memory,
//! bounded in bytes, so a hot hit needs no round trip to Valkey at all.
//!
//! Coherence: Valkey's client-side caching reports every change of a key cachefront read into
//! the L1 (see `upstream::tracking`); writes passed through cachefront and invalidations from
//! PostgreSQL are applied here directly as well, before the next read can see them. A value
//! enters the L1 only if no invalidation touched its key between the lookup being sent and
//! its reply arriving (a per-key-stripe epoch, checked before and after inserting; an
//! invalidation bumps it before removing), and the whole L1 is flushed whenever
//! tracking restarts or is lost. Entries also live at most `cache.l1_ttl_ms`, which bounds how
//! far past Valkey's own expiry an entry can be served.

use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::near;
use crate::protocol::Proto;
use crate::upstream::TrackingEvent;

const STRIPES: usize = 1024;

/// What the L1 keeps for an entry: the reply frame as Valkey sent it, what it was read from,
/// and its [`Freshness`] if this instance filled it.
#[derive(Clone)]
pub struct Item {
    pub frame: Bytes,
    pub deps: Arc<ItemDeps>,
    pub fresh: Option<Freshness>,
}

/// An [`Item`] as stored: with when its renewal is due, the last eighth of its
/// `cache.l1_ttl_ms` (an instant, not its start, so a hit before then compares two instants
/// instead of working out a duration); `None`: a life too long for the clock to name, which
/// never ends.
#[derive(Clone)]
struct Stored {
    item: Item,
    renews: Option<Instant>,
    /// The epochs its lookup was sent with, which it entered under: a thread's copy of it is
    /// good while they are current (see `cache::near`).
    ticket: Ticket,
}

/// An item weighs its key, its frame and a fixed overhead, so `l1_max_bytes` bounds memory.
#[derive(Clone)]
struct Weight;

impl quick_cache::Weighter<Bytes, Stored> for Weight {
    fn weight(&self, key: &Bytes, v: &Stored) -> u64 {
        (key.len() + v.item.frame.len() + 96) as u64
    }
}

/// Items by L1 key (see [`L1::slot_key`]). quick_cache rather than moka: a hit here is the
/// whole of a hot read's cache work, and quick_cache's is a shard's read lock and one probe,
/// where moka's also queued every read for its eviction policy and ran that queue
/// (callgrind, pipelined `EMP.GET` hits: about 800 of 5,000 instructions a request). Its
/// eviction (S3-FIFO-like) needs no background work; the time to live is checked on read.
type Items = quick_cache::sync::Cache<Bytes, Stored, Weight, foldhash::fast::RandomState>;

/// What the L1 expects to hold at first (it grows past this as needed): small, so an idle
/// proxy does not carry a large table.
const INITIAL_ITEMS: usize = 4096;

/// Shards of the L1, each with a lock of its own and an equal share of `l1_max_bytes`, which
/// bounds one item: fixed, not one per CPU, so an item up to a sixteenth of the L1 is kept
/// however many cores the machine has.
const SHARDS: usize = 16;

/// When an entry this instance stored expires in Valkey and how long its fill took: what
/// early refresh (XFetch, `Cache::should_refresh_early`) weighs. An L1 item carries a copy,
/// taken when it entered, so a hit from the L1 needs no second lookup to weigh it (a refill
/// of the entry drops the item, so the copy cannot outlive the fill it describes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Freshness {
    pub expires: Instant,
    pub delta: Duration,
}

/// An L1 hit: the reply frame, its entry's [`Freshness`] if this instance filled it, and
/// whether the item is in the last eighth of its life, when one read should look it up
/// again so that it is renewed before it ends (see `Cache::begin`).
pub struct Hit {
    pub frame: Bytes,
    pub fresh: Option<Freshness>,
    pub renew: bool,
}

/// What an L1 item was read from (mirrors `cache::Deps`).
#[derive(Debug, Default)]
pub struct ItemDeps {
    /// Any change to these tables drops the item.
    pub tables: Vec<String>,
    /// The item stands for one row of this table: only table-wide events drop it by table.
    pub row_table: Option<String>,
}

/// A lookup in flight: what the epochs were when it was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    global: u64,
    stripe: u64,
}

pub struct L1 {
    items: Items,
    /// Tells this L1's copies in `cache::near` from another's (tests run several at once).
    id: u64,
    /// `cache.l1_ttl_ms` but its last eighth: when an item's renewal is due. The items of
    /// hot entries are looked up again then, by one read, while every other read still
    /// hits: they never all end at once, under a load that would otherwise send hundreds of
    /// reads to wait for one lookup each time an item ends.
    renewal: Duration,
    /// The last eighth of `cache.l1_ttl_ms`: how long an item is served once its renewal is
    /// due (the item's life is `renewal + grace`, the longest an item is served).
    grace: Duration,
    /// Bumped by flushes.
    global: AtomicU64,
    /// Bumped by invalidations of keys hashing to the stripe.
    stripes: Box<[AtomicU64]>,
    /// Whether any hash-kind entry was ever stored (its keys carry a protocol suffix).
    hashes: AtomicBool,
    enabled: bool,
    /// Longest key a lookup was ever sent for: longer arguments of a write cannot be L1 keys,
    /// so a 1 MB `SET` value is never hashed.
    max_key_len: AtomicUsize,
}

/// Commands that never change a key: they leave the L1 alone.
const READ_ONLY: &[&[u8]] = &[
    b"GET",
    b"MGET",
    b"HGET",
    b"HGETALL",
    b"HMGET",
    b"HKEYS",
    b"HVALS",
    b"HLEN",
    b"HEXISTS",
    b"EXISTS",
    b"TTL",
    b"PTTL",
    b"TYPE",
    b"STRLEN",
    b"GETRANGE",
    b"LRANGE",
    b"LLEN",
    b"LINDEX",
    b"SMEMBERS",
    b"SISMEMBER",
    b"SCARD",
    b"ZRANGE",
    b"ZSCORE",
    b"ZCARD",
    b"ZRANK",
    b"SCAN",
    b"KEYS",
    b"DBSIZE",
    b"PING",
    b"ECHO",
    b"INFO",
    b"TIME",
    b"PUBLISH",
    b"EXPIRETIME",
    b"PEXPIRETIME",
    b"OBJECT",
    b"MEMORY",
    b"XRANGE",
    b"XLEN",
    b"XREAD",
];

impl L1 {
    pub fn new(max_bytes: u64, ttl: Duration) -> L1 {
        let ttl = ttl.max(Duration::from_millis(1));
        let options = quick_cache::OptionsBuilder::new()
            .estimated_items_capacity(INITIAL_ITEMS)
            .weight_capacity(max_bytes.max(1))
            .shards(SHARDS)
            .build();
        let items = match options {
            Ok(options) => Items::with_options(
                options,
                Weight,
                // Every hit hashes its key: foldhash (seeded per process), not SipHash.
                foldhash::fast::RandomState::default(),
                Default::default(),
            ),
            // Every field is set above; kept total all the same.
            Err(_) => Items::with(
                INITIAL_ITEMS,
                max_bytes.max(1),
                Weight,
                foldhash::fast::RandomState::default(),
                Default::default(),
            ),
        };
        static IDS: AtomicU64 = AtomicU64::new(1);
        L1 {
            items,
            id: IDS.fetch_add(1, Ordering::Relaxed),
            renewal: ttl - ttl / 8,
            grace: ttl / 8,
            global: AtomicU64::new(0),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            hashes: AtomicBool::new(false),
            enabled: max_bytes > 0,
            max_key_len: AtomicUsize::new(0),
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The L1 key: the entry key, plus the protocol for hashes (whose frames differ).
    fn slot_key(key: &[u8], hash: bool, proto: Proto) -> Bytes {
        if !hash {
            return Bytes::copy_from_slice(key);
        }
        let mut k = Vec::with_capacity(key.len() + 3);
        k.extend_from_slice(key);
        k.extend_from_slice(if proto == Proto::Resp3 {
            b"\0h3"
        } else {
            b"\0h2"
        });
        Bytes::from(k)
    }

    /// FNV-1a of a key: cheap, and only spreads keys over stripes and near slots.
    fn hash(key: &[u8]) -> u64 {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in key {
            h = (h ^ *b as u64).wrapping_mul(0x100000001b3);
        }
        h
    }

    fn stripe(key: &[u8]) -> usize {
        Self::stripe_of(Self::hash(key))
    }

    fn stripe_of(h: u64) -> usize {
        (h as usize) % STRIPES
    }

    /// The epochs now, for a key of hash `h`.
    fn current(&self, h: u64) -> Ticket {
        Ticket {
            global: self.global.load(Ordering::SeqCst),
            stripe: self.stripes[Self::stripe_of(h)].load(Ordering::SeqCst),
        }
    }

    /// The cached reply frame for an entry, if present.
    pub fn get(&self, key: &str, hash: bool, proto: Proto) -> Option<Hit> {
        self.get_at(key, hash, proto, Instant::now())
    }

    /// [`get`](Self::get) with the time already read: a hit reads the clock once for the
    /// item's age and its early-refresh weighing.
    pub fn get_at(&self, key: &str, hash: bool, proto: Proto, now: Instant) -> Option<Hit> {
        if !self.enabled {
            return None;
        }
        if hash {
            let stored = self
                .items
                .get(&Self::slot_key(key.as_bytes(), hash, proto))?;
            return Self::hit_of(stored, now, self.grace);
        }
        // A plain key is its own L1 key, and may have a copy on this thread.
        let key = key.as_bytes();
        let h = Self::hash(key);
        if let Some((frame, fresh)) = near::get(self.id, key, h, now, || self.current(h)) {
            return Some(Hit {
                frame,
                fresh,
                renew: false,
            });
        }
        let stored = self.items.get(key)?;
        let (ticket, renews) = (stored.ticket, stored.renews);
        let hit = Self::hit_of(stored, now, self.grace)?;
        if let Some(renews) = renews.filter(|_| !hit.renew && ticket == self.current(h)) {
            near::served(self.id, key, h, &hit.frame, hit.fresh, (ticket, renews));
        }
        Some(hit)
    }

    /// The hit an item gives at `now`: `None` once its life (renewal, then `grace`) is over.
    fn hit_of(stored: Stored, now: Instant, grace: Duration) -> Option<Hit> {
        let renew = match stored.renews {
            Some(at) if now >= at => {
                if at.checked_add(grace).is_some_and(|ends| now >= ends) {
                    return None;
                }
                true
            }
            _ => false,
        };
        Some(Hit {
            frame: stored.item.frame,
            fresh: stored.item.fresh,
            renew,
        })
    }

    /// Taken when a lookup is sent; an insert with it succeeds only if nothing invalidated
    /// the key meanwhile.
    pub fn ticket(&self, key: &str) -> Ticket {
        self.max_key_len.fetch_max(key.len() + 3, Ordering::AcqRel);
        Ticket {
            global: self.global.load(Ordering::SeqCst),
            stripe: self.stripes[Self::stripe(key.as_bytes())].load(Ordering::SeqCst),
        }
    }

    /// Stores a reply Valkey gave for a tracked lookup, with its entry's freshness if known.
    pub fn insert(&self, key: &str, hash: bool, proto: Proto, item: Item, t: Ticket) {
        self.insert_at(key, hash, proto, item, t, Instant::now());
    }

    /// [`insert`](Self::insert) at `now`, from which the item's life is counted (as
    /// [`get_at`](Self::get_at) is served at a given instant: tests set the clock).
    fn insert_at(&self, key: &str, hash: bool, proto: Proto, item: Item, t: Ticket, now: Instant) {
        if !self.enabled {
            return;
        }
        if self.ticket(key) != t {
            return;
        }
        if hash {
            self.hashes.store(true, Ordering::Release);
        }
        let slot = Self::slot_key(key.as_bytes(), hash, proto);
        let renews = now.checked_add(self.renewal);
        self.items.insert(
            slot.clone(),
            Stored {
                item,
                renews,
                ticket: t,
            },
        );
        // An invalidation may have run between the check and the insert; it bumped the
        // epoch before removing, so looking again after inserting catches it.
        if self.ticket(key) != t {
            self.items.remove(&slot);
        }
    }

    /// Drops every form of `key`. Lock-free, and cheap for keys the L1 does not hold: every
    /// write passed through cachefront calls it for each of its arguments.
    pub fn invalidate_key(&self, key: &[u8]) {
        if !self.enabled {
            return;
        }
        self.stripes[Self::stripe(key)].fetch_add(1, Ordering::SeqCst);
        if self.items.contains_key(key) {
            self.items.remove(key);
        }
        if self.hashes.load(Ordering::Acquire) {
            for proto in [Proto::Resp2, Proto::Resp3] {
                self.items.remove(&Self::slot_key(key, true, proto));
            }
        }
    }

    /// Drops everything.
    pub fn clear(&self) {
        self.global.fetch_add(1, Ordering::SeqCst);
        self.items.clear();
    }

    /// Drops the entries read from any of `tables`: every entry for a table-wide event
    /// (`rows_too`), else only those depending on the whole table (a row change drops its
    /// row-keyed entries by key).
    pub fn invalidate_tables(&self, tables: &[String], rows_too: bool) {
        if !self.enabled {
            return;
        }
        self.global.fetch_add(1, Ordering::SeqCst);
        self.items.retain(|_, v| {
            let deps = &v.item.deps;
            let hit = deps.tables.iter().any(|t| tables.contains(t))
                || (rows_too && deps.row_table.as_ref().is_some_and(|t| tables.contains(t)));
            !hit
        });
    }

    /// Applies what the tracking connection reported.
    pub fn on_tracking(&self, ev: TrackingEvent) {
        match ev {
            TrackingEvent::Keys(keys) => keys.iter().for_each(|k| self.invalidate_key(k)),
            TrackingEvent::Flush => self.clear(),
        }
    }

    /// A command passed through to Valkey: if it can write, drop what it may write, so this
    /// cachefront's next read sees the write even before Valkey's own notice arrives.
    pub fn note_command(&self, name: &[u8], args: &[Bytes]) {
        if !self.enabled || READ_ONLY.contains(&name) {
            return;
        }
        match name {
            b"FLUSHALL" | b"FLUSHDB" | b"SWAPDB" | b"RESTORE" | b"MOVE" | b"COPY" => self.clear(),
            _ => {
                let max = self.max_key_len.load(Ordering::Acquire);
                args.iter()
                    .skip(1)
                    .filter(|a| a.len() <= max)
                    .for_each(|a| self.invalidate_key(a))
            }
        }
    }

    /// (entries, bytes) for INFO.
    pub fn usage(&self) -> (u64, u64) {
        (self.items.len() as u64, self.items.weight())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> Item {
        Item {
            frame: Bytes::from_static(b"$5\r\nalice\r\n"),
            deps: Arc::new(ItemDeps {
                tables: vec!["emp".into()],
                row_table: None,
            }),
            fresh: None,
        }
    }

    /// `key` stored at `at`: its life counts from there, whatever time the test took.
    fn stored(l1: &L1, key: &str, at: Instant) {
        let t = l1.ticket(key);
        l1.insert_at(key, false, Proto::Resp2, item(), t, at);
    }

    #[test]
    fn an_item_is_served_until_its_life_ends() {
        let l1 = L1::new(1 << 20, Duration::from_millis(1000));
        let now = Instant::now();
        stored(&l1, "emp:1", now);
        assert!(l1.get_at("emp:1", false, Proto::Resp2, now).is_some());
        let late = now + Duration::from_millis(1001);
        assert!(l1.get_at("emp:1", false, Proto::Resp2, late).is_none());
    }

    #[test]
    fn an_item_asks_for_renewal_in_the_last_eighth_of_its_life() {
        let l1 = L1::new(1 << 20, Duration::from_millis(800));
        let now = Instant::now();
        stored(&l1, "emp:1", now);
        let renew = |at: Duration| {
            l1.get_at("emp:1", false, Proto::Resp2, now + at)
                .map(|h| h.renew)
        };
        assert_eq!(renew(Duration::ZERO), Some(false));
        assert_eq!(renew(Duration::from_millis(690)), Some(false));
        assert_eq!(renew(Duration::from_millis(701)), Some(true));
        assert_eq!(renew(Duration::from_millis(790)), Some(true));
        assert_eq!(renew(Duration::from_millis(801)), None);
    }

    /// Whether the hit at `now` came from this thread's copy: a copy's frame is its own
    /// allocation, the L1's is the item's.
    fn from_copy(l1: &L1, key: &str, now: Instant) -> Option<bool> {
        l1.get_at(key, false, Proto::Resp2, now)
            .map(|h| h.frame.as_ptr() != item().frame.as_ptr())
    }

    /// The second L1 hit in a row copies the item to the thread; every kind of invalidation,
    /// and the item's renewal coming due, stops the copy from being served at once.
    #[test]
    fn a_threads_copy_is_served_only_while_nothing_invalidated_it() {
        let l1 = L1::new(1 << 20, Duration::from_millis(800));
        let now = Instant::now();
        let invalidations: [&dyn Fn(&L1); 4] = [
            &|l1| l1.invalidate_key(b"emp:1"),
            &|l1| l1.clear(),
            &|l1| l1.invalidate_tables(&["other".into()], true),
            &|l1| l1.on_tracking(TrackingEvent::Keys(vec![Bytes::from_static(b"emp:1")])),
        ];
        for invalidate in invalidations {
            stored(&l1, "emp:1", now);
            assert_eq!(from_copy(&l1, "emp:1", now), Some(false));
            from_copy(&l1, "emp:1", now);
            assert_eq!(from_copy(&l1, "emp:1", now), Some(true));
            invalidate(&l1);
            // Gone from the L1, or (another table's invalidation) kept there but with
            // epochs that moved: either way never served from the copy again.
            assert_ne!(from_copy(&l1, "emp:1", now), Some(true));
            assert_ne!(from_copy(&l1, "emp:1", now), Some(true));
            l1.clear();
        }
        stored(&l1, "emp:1", now);
        for _ in 0..3 {
            from_copy(&l1, "emp:1", now);
        }
        assert_eq!(from_copy(&l1, "emp:1", now), Some(true));
        // Due for renewal: the L1 answers (and asks for it).
        let due = now + Duration::from_millis(750);
        let hit = l1.get_at("emp:1", false, Proto::Resp2, due);
        assert!(hit.is_some_and(|h| h.renew));
        // Another L1 in the same thread never sees this one's copy.
        let other = L1::new(1 << 20, Duration::from_millis(800));
        assert!(other.get_at("emp:1", false, Proto::Resp2, now).is_none());
    }

    #[test]
    fn a_life_too_long_for_the_clock_never_ends() {
        let l1 = L1::new(1 << 20, Duration::MAX);
        let now = Instant::now();
        stored(&l1, "emp:1", now);
        let far = now + Duration::from_secs(100 * 365 * 24 * 3600);
        assert!(l1.get_at("emp:1", false, Proto::Resp2, far).is_some());
    }
}
