//! Lookups in flight: a read that misses the L1 while a tracked lookup of the same entry is
//! on its way to Valkey waits for that lookup's reply instead of sending its own.
//!
//! Why: when a hot entry leaves the L1 (its time to live, an invalidation, the first read
//! after a start), every request for it misses the L1 until the first lookup's reply puts it
//! back — hundreds of lookup scripts to Valkey for one key under a pipelined load, each
//! costing this process far more than the hits around it.
//!
//! What a waiter gets is what the L1 would have given it had the reply arrived as it asked:
//! it joins only a lookup sent since the last invalidation of the key this process knows of
//! (the L1's ticket then is the lookup's), and receives the reply only if the key is still
//! not invalidated when the reply arrives — the L1's own condition for keeping it. In any
//! other case (a miss, an error, an untracked or abandoned lookup, an invalidation in
//! between, anything degraded) the waiter is let go and reads on its own.
//!
//! The reply is handed over where the shared connection reads it (a [`Tee`]), not where the
//! leading client's connection gets to it: that client's own queue — a slow query pipelined
//! ahead of its lookup — must never hold up another client's read.

use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::oneshot;

use super::degraded::Degraded;
use super::l1::{Ticket, L1};
use super::store::Store;
use super::Value;
use crate::protocol::{Proto, Reply};
use crate::upstream::Tee;

type Map = HashMap<String, Flight, foldhash::fast::RandomState>;

/// The tracked lookups of string entries in flight, by entry key (a string entry's frame
/// is the same whatever the client's protocol, so every reader of the key may share it).
#[derive(Default)]
pub struct Flights {
    map: Mutex<Map>,
    next_id: AtomicU64,
}

/// One lookup in flight and the reads waiting for its reply.
struct Flight {
    id: u64,
    ticket: Ticket,
    waiters: Vec<oneshot::Sender<Bytes>>,
}

/// A waiter's end: the frame, or closed when it must read on its own.
pub type Landing = oneshot::Receiver<Bytes>;

/// What [`Flights::board`] made of a read.
pub enum Boarding {
    /// It waits for the lookup in flight.
    Joined(Landing),
    /// Its own lookup is the flight: it must send it.
    Leads(Departed),
}

impl Flights {
    fn lock(&self) -> MutexGuard<'_, Map> {
        // Nothing under the lock can panic halfway through a change; a poisoned map is whole.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A read of entry `key` that missed the L1, with the key's L1 ticket `now`: it joins
    /// the lookup of the entry in flight, if there is one and nothing invalidated the key
    /// since it was sent; otherwise its own lookup departs as the entry's flight, which
    /// later reads may join until its [`Departed`] lands or is dropped (it takes the place
    /// of a flight sent before an invalidation, whose waiters then read on their own). One
    /// step under the lock: reads missing the L1 together on several cores never both find
    /// no flight and both send a lookup.
    pub fn board(self: &Arc<Self>, key: &str, now: Ticket) -> Boarding {
        let mut map = self.lock();
        if let Some(flight) = map.get_mut(key).filter(|f| f.ticket == now) {
            let (tx, rx) = oneshot::channel();
            flight.waiters.push(tx);
            return Boarding::Joined(rx);
        }
        Boarding::Leads(self.depart(&mut map, key, now))
    }

    /// A read of an L1 item whose renewal is due (see `l1::Hit::renew`): its lookup departs
    /// as the entry's flight unless a lookup of the entry is already in flight, whatever its
    /// ticket. One step under the lock, so one read renews the item while the others keep
    /// hitting it; `None`: this read is one of those.
    pub fn renew(self: &Arc<Self>, key: &str, now: Ticket) -> Option<Departed> {
        let mut map = self.lock();
        if map.contains_key(key) {
            return None;
        }
        Some(self.depart(&mut map, key, now))
    }

    /// Makes a new lookup of `key` its flight, in place of any older one.
    fn depart(self: &Arc<Self>, map: &mut Map, key: &str, now: Ticket) -> Departed {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let flight = Flight {
            id,
            ticket: now,
            waiters: Vec::new(),
        };
        map.insert(key.to_owned(), flight);
        Departed {
            flights: Arc::clone(self),
            key: key.to_owned(),
            id,
        }
    }

    /// Lookups in flight (for tests).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the flight `id` of `key` out, if it is still there.
    fn take(&self, key: &str, id: u64) -> Option<Flight> {
        let mut map = self.lock();
        match map.get(key) {
            Some(f) if f.id == id => map.remove(key),
            _ => None,
        }
    }
}

/// A lookup that others may be waiting for. Dropped without landing, it lets them go.
pub struct Departed {
    flights: Arc<Flights>,
    key: String,
    id: u64,
}

impl Departed {
    /// The lookup found `frame`. `current`: the key's L1 ticket now; the waiters get the
    /// frame only if it is still the one the lookup was sent with.
    pub fn land(self, frame: &Bytes, current: Ticket) {
        let Some(flight) = self.flights.take(&self.key, self.id) else {
            return;
        };
        if flight.ticket != current {
            return;
        }
        for w in flight.waiters {
            let _ = w.send(frame.clone());
        }
    }
}

/// How a lookup's reply holds its entry.
pub enum Reading {
    /// The reply is the entry's frame (`GET`, `HGETALL`).
    Frame,
    /// The reply is the early lookup script's (see `Cache::early_lookup`); `negative`:
    /// whether it asked for the negative marker.
    Early { store: Store, negative: bool },
}

/// The lookup others may wait for, with what it takes to hand its reply over.
pub struct Leader {
    pub departed: Departed,
    pub l1: Arc<L1>,
    pub degraded: Arc<Degraded>,
    pub reading: Reading,
}

impl Leader {
    /// Hands the entry in `raw` (the lookup's reply as Valkey sent it) to the waiters, on
    /// the L1's condition; lets them go if there is none, or if anything is degraded (a hit
    /// might then predate an invalidation not yet applied).
    pub fn land(self, raw: &Bytes) {
        if self.degraded.any() || raw.starts_with(b"-") {
            return;
        }
        let frame = match &self.reading {
            Reading::Frame => super::read::is_hit(raw).then(|| raw.clone()),
            Reading::Early { store, negative } => match store.early_reply(raw, *negative) {
                Ok(p) => match p.existing {
                    Some(Value::String(v)) => Some(Reply::Bulk(v).to_bytes(Proto::Resp2)),
                    _ => None,
                },
                Err(_) => None,
            },
        };
        if let Some(frame) = frame {
            let now = self.l1.ticket(&self.departed.key);
            self.departed.land(&frame, now);
        }
    }

    /// What the shared connection shows the reply to.
    pub fn into_tee(self) -> Tee {
        Box::new(move |raw: &Bytes| self.land(raw))
    }
}

impl Drop for Departed {
    fn drop(&mut self) {
        // Landed already, or replaced: nothing left. Otherwise the waiters read on their own.
        drop(self.flights.take(&self.key, self.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::l1::L1;
    use std::time::Duration;

    fn l1() -> L1 {
        L1::new(1 << 20, Duration::from_secs(1))
    }

    /// A read of `key` missing the L1 now.
    fn board(flights: &Arc<Flights>, l1: &L1, key: &str) -> Boarding {
        flights.board(key, l1.ticket(key))
    }

    fn leads(b: Boarding) -> Departed {
        match b {
            Boarding::Leads(d) => d,
            Boarding::Joined(_) => panic!("joined a flight, expected to lead one"),
        }
    }

    fn joined(b: Boarding) -> Landing {
        match b {
            Boarding::Joined(l) => l,
            Boarding::Leads(_) => panic!("led a flight, expected to join one"),
        }
    }

    /// Readers that join a lookup get its frame when it lands; the flight is gone after.
    #[test]
    fn waiters_get_the_frame_the_lookup_found() {
        let (l1, flights) = (l1(), Arc::new(Flights::default()));
        let sent = leads(board(&flights, &l1, "emp:1"));
        let mut a = joined(board(&flights, &l1, "emp:1"));
        let mut b = joined(board(&flights, &l1, "emp:1"));
        drop(leads(board(&flights, &l1, "emp:2")));
        sent.land(&Bytes::from_static(b"$5\r\nalice\r\n"), l1.ticket("emp:1"));
        assert_eq!(a.try_recv().ok().as_deref(), Some(&b"$5\r\nalice\r\n"[..]));
        assert_eq!(b.try_recv().ok().as_deref(), Some(&b"$5\r\nalice\r\n"[..]));
        assert!(flights.is_empty());
    }

    /// An invalidation of the key after the lookup left: the next read leads a lookup of its
    /// own, and those who joined before are let go rather than given what the first read.
    #[test]
    fn an_invalidation_in_between_lets_the_waiters_go() {
        let (l1, flights) = (l1(), Arc::new(Flights::default()));
        let sent = leads(board(&flights, &l1, "emp:1"));
        let mut early = joined(board(&flights, &l1, "emp:1"));
        l1.invalidate_key(b"emp:1");
        let after = leads(board(&flights, &l1, "emp:1"));
        sent.land(&Bytes::from_static(b"$3\r\nold\r\n"), l1.ticket("emp:1"));
        assert!(
            early.try_recv().is_err(),
            "let go, not served what was invalidated"
        );
        assert_eq!(flights.len(), 1, "the lookup sent after stays");
        drop(after);
        assert!(flights.is_empty());
    }

    /// A lookup dropped unanswered, or replaced by a newer one, lets its waiters go; the
    /// older one's end never removes the newer flight.
    #[test]
    fn an_abandoned_or_replaced_lookup_lets_its_waiters_go() {
        let (l1, flights) = (l1(), Arc::new(Flights::default()));
        let first = leads(board(&flights, &l1, "emp:1"));
        let mut w1 = joined(board(&flights, &l1, "emp:1"));
        l1.invalidate_key(b"emp:1");
        let second = leads(board(&flights, &l1, "emp:1"));
        assert!(w1.try_recv().is_err(), "replaced: let go");
        let mut w2 = joined(board(&flights, &l1, "emp:1"));
        drop(first);
        assert_eq!(flights.len(), 1, "the newer flight stays");
        drop(second);
        assert!(w2.try_recv().is_err(), "abandoned: let go");
        assert!(flights.is_empty());
    }

    /// An item due for renewal: the first read's lookup departs, the reads after it do not
    /// (they hit), and reads missing the L1 meanwhile join that lookup; once it has landed,
    /// the next due read renews again.
    #[test]
    fn one_read_renews_an_item_at_a_time() {
        let (l1, flights) = (l1(), Arc::new(Flights::default()));
        let renewing = flights.renew("emp:1", l1.ticket("emp:1")).expect("departs");
        assert!(flights.renew("emp:1", l1.ticket("emp:1")).is_none());
        let mut waiting = joined(board(&flights, &l1, "emp:1"));
        assert!(
            flights.renew("emp:2", l1.ticket("emp:2")).is_some(),
            "another key renews on its own"
        );
        renewing.land(&Bytes::from_static(b"$5\r\nalice\r\n"), l1.ticket("emp:1"));
        assert_eq!(
            waiting.try_recv().ok().as_deref(),
            Some(&b"$5\r\nalice\r\n"[..])
        );
        assert!(flights.renew("emp:1", l1.ticket("emp:1")).is_some());
    }

    /// Reads on two threads missing the L1 at once: exactly one leads, the other joins.
    #[test]
    fn reads_boarding_together_make_one_flight() {
        for _ in 0..200 {
            let (l1, flights) = (Arc::new(l1()), Arc::new(Flights::default()));
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let reads: Vec<_> = (0..2)
                .map(|_| {
                    let (l1, flights, barrier) =
                        (Arc::clone(&l1), Arc::clone(&flights), Arc::clone(&barrier));
                    std::thread::spawn(move || {
                        barrier.wait();
                        board(&flights, &l1, "emp:1")
                    })
                })
                .collect();
            // Both boardings are held until counted: a flight dropped early would end.
            let boarded: Vec<Boarding> = reads
                .into_iter()
                .map(|r| r.join().expect("a read"))
                .collect();
            let led = boarded
                .iter()
                .filter(|b| matches!(b, Boarding::Leads(_)))
                .count();
            assert_eq!(led, 1, "one lookup for two reads");
        }
    }
}
