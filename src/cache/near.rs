//! Each thread's own copies of the L1's hottest items, so that a hit shares no memory another
//! core writes.
//!
//! Why: the L1 is one table for every core. A hit on it takes its shard's read lock and clones
//! the item's frame and dependencies — five or six atomic writes to cache lines every other
//! core writes too. When many clients on several cores read the same hot entry, each of those
//! writes waits for the line to come over from the other core: a sampling profile of pipelined
//! `EMP.GET 1` hits put about an eighth of the process's time there, which instruction counts
//! never show. A thread that hits an item keeps a copy of it here — its own bytes, its own
//! reference count — and serves the next hits from the copy, reading only two epochs that
//! change when something is invalidated.
//!
//! Coherence follows from the L1's own rule: an item carries the [`Ticket`] its lookup was
//! sent with, and entered the L1 only because no invalidation bumped those epochs before it
//! landed. A copy is served only while the epochs still equal that ticket — any later
//! invalidation of its key, flush or table-wide invalidation makes it unusable at once — and
//! only until the item's renewal is due, so it never outlives what the L1 itself would serve,
//! and renewals still start from the L1.
//!
//! The table is direct-mapped and small (a slot per key hash; a key the L1 serves twice in a
//! row at its slot takes it), so it needs no eviction and holds at most [`SLOTS`] frames of at
//! most [`MAX_FRAME`] bytes per thread.

use bytes::Bytes;
use std::cell::RefCell;
use std::time::Instant;

use super::l1::{Freshness, Ticket};

/// Slots per thread.
pub const SLOTS: usize = 256;

/// Largest frame copied: a copy is for small, hot items, and bounds the table's memory.
pub const MAX_FRAME: usize = 4096;

/// One copied item.
struct Kept {
    /// The L1 it was copied from (tests and embedders may run several in one process).
    owner: u64,
    key: Box<[u8]>,
    frame: Bytes,
    fresh: Option<Freshness>,
    /// The epochs its lookup was sent with: the copy is good while they are current.
    ticket: Ticket,
    /// When the item's renewal is due: from then on, reads go to the L1.
    renews: Instant,
}

/// A slot: its copy, and the hash of the last key the L1 served at this slot without one.
#[derive(Default)]
struct Slot {
    copy: Option<Kept>,
    candidate: u64,
}

thread_local! {
    static TABLE: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

/// A copy's slot for a key of hash `h`.
fn slot(h: u64) -> usize {
    // The low bits pick the L1's epoch stripe; the slot takes the high ones.
    ((h >> 32) as usize) % SLOTS
}

/// This thread's copy of `key` from L1 `owner`, if it is still good at `now` with the epochs
/// `current` (read only when a copy of the key is there).
pub fn get(
    owner: u64,
    key: &[u8],
    h: u64,
    now: Instant,
    current: impl FnOnce() -> Ticket,
) -> Option<(Bytes, Option<Freshness>)> {
    TABLE.with(|t| {
        let t = t.borrow();
        let c = t.get(slot(h))?.copy.as_ref()?;
        let good = c.owner == owner && *c.key == *key && now < c.renews && c.ticket == current();
        good.then(|| (c.frame.clone(), c.fresh))
    })
}

/// The L1 just served `key` (hash `h`) to this thread, from an item whose lookup was sent with
/// `ticket` (still current) and whose renewal is due at `renews`. The second time in a row a
/// slot sees the same key served this way, the item is copied (its frame too, so that no
/// other core shares its reference count): a key read once in a while, or a working set
/// too wide for the table, costs a comparison, not a copy per read.
pub fn served(
    owner: u64,
    key: &[u8],
    h: u64,
    frame: &[u8],
    fresh: Option<Freshness>,
    (ticket, renews): (Ticket, Instant),
) {
    if frame.len() > MAX_FRAME {
        return;
    }
    TABLE.with(|t| {
        let mut t = t.borrow_mut();
        if t.is_empty() {
            t.resize_with(SLOTS, Slot::default);
        }
        let Some(s) = t.get_mut(slot(h)) else {
            return;
        };
        if s.candidate != h {
            s.candidate = h;
            return;
        }
        s.copy = Some(Kept {
            owner,
            key: key.into(),
            frame: Bytes::copy_from_slice(frame),
            fresh,
            ticket,
            renews,
        });
    });
}
