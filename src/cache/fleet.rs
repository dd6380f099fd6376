//! One database query per cold key across every cachefront instance sharing a Valkey.
//!
//! In-process coalescing (`coalesce`) leaves one fill per key per process; this makes it one
//! per fleet. The fill's first step in Valkey (`Store::prefill_leased`, one Lua script, so
//! atomic) reads the entry and, only if it is absent, takes the key's *fill lease*
//! (`<prefix>f:<key>`, in the entry's slot on a cluster) with `SET NX PX cache.fill_lease_ms`
//! and a random token. Then:
//! - the holder queries PostgreSQL as before; its store script (versions checked as always)
//!   deletes the lease if it still holds it and — if a waiter marked the lease (below) —
//!   `PUBLISH`es the entry key on `<prefix>fills`. A fill that stores nothing (it failed, was refused as stale, found no
//!   row to cache) releases the lease the same way, so waiters retry at once — one that found
//!   no row leaves `norow:<its token>` in the lease, which is the answer of the waiters that
//!   saw that token holding it (as for a fill joined in-process), and nobody else's;
//! - an instance finding the lease held marks it awaited (`<token>+w`, in the same script)
//!   and waits: woken by that message (one subscribed
//!   connection per process dispatches it to the waiting key), or at the latest when the
//!   lease's remaining time runs out or every [`Fleet::poll`] (a lost message costs latency,
//!   nothing else; the message only ever means "look again", so one a client publishes costs
//!   a look, never an answer). Then it runs the same step again: the entry is there
//!   (answered, no query), or the lease is gone without one (the holder died and its lease expired, or its
//!   fill stored nothing) and it takes the lease and fills itself.
//!
//! A waiter gives up waiting after two lease terms ([`Fleet::patience`]: the holder's, and
//! a successor's if the holder died) and fills without a lease — correctness over
//! coalescing. Every store, with or without a lease, still checks the versions it read
//! before its query, so no stale value lands whoever fills.

use rand::Rng;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

use crate::upstream::subscriber::Heard;

/// Fleet-wide fill coalescing of one process: its lease length and the keys it waits on.
#[derive(Debug)]
pub struct Fleet {
    /// `cache.fill_lease_ms`; zero: off.
    lease: Duration,
    /// Keys this process waits on, each with a channel woken when something is heard of it.
    waiting: Mutex<HashMap<String, watch::Sender<()>>>,
}

impl Fleet {
    pub fn new(lease_ms: u64) -> Fleet {
        Fleet {
            lease: Duration::from_millis(lease_ms),
            waiting: Mutex::new(HashMap::new()),
        }
    }

    /// Whether fills take a lease at all (`cache.fill_lease_ms` > 0).
    pub fn enabled(&self) -> bool {
        !self.lease.is_zero()
    }

    /// The lease's length.
    pub fn lease_ms(&self) -> u64 {
        self.lease.as_millis() as u64
    }

    /// The longest a waiter goes without looking again, in case a message was lost: a tenth
    /// of the lease, between 10 and 200 ms.
    pub fn poll(&self) -> Duration {
        (self.lease / 10).clamp(Duration::from_millis(10), Duration::from_millis(200))
    }

    /// How long a fill waits for other instances' leases before it fills without one: the
    /// holder's term, one successor's (a holder that died is replaced when its lease
    /// expires), and a poll.
    pub fn patience(&self) -> Duration {
        self.lease * 2 + self.poll()
    }

    /// A fresh token naming one fill's hold of a lease (compare-and-delete checks it):
    /// [`TOKEN_LEN`] hex digits.
    pub fn token() -> String {
        format!("{:032x}", rand::thread_rng().gen::<u128>())
    }

    /// The message announcing that a fill of `entry` ended: the entry key. It only ever means
    /// "look again" — what a waiter then answers comes from Valkey's meta keys, which clients
    /// cannot write, so a message a client publishes on the channel costs a look, nothing else.
    pub fn announcement(entry: &str) -> String {
        entry.to_string()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, watch::Sender<()>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts listening for `key`'s fill landing — before looking in Valkey, so a message
    /// arriving between the look and the wait is not missed.
    pub fn listen(self: &Arc<Self>, key: &str) -> Listener {
        let rx = self
            .lock()
            .entry(key.to_string())
            .or_insert_with(|| watch::channel(()).0)
            .subscribe();
        Listener {
            fleet: Arc::clone(self),
            key: key.to_string(),
            rx,
        }
    }

    /// What the subscribed connection heard: a fill of the key landed (or its lease was
    /// given up); or it (re)subscribed, having perhaps missed messages, so every waiter looks.
    pub fn heard(&self, heard: Heard) {
        let map = self.lock();
        match heard {
            Heard::Message(announcement) => {
                let key = std::str::from_utf8(&announcement).ok();
                if let Some(tx) = key.and_then(|k| map.get(k)) {
                    tx.send_replace(());
                }
            }
            Heard::Subscribed => {
                for tx in map.values() {
                    tx.send_replace(());
                }
            }
        }
    }

    /// Keys waited on now (for tests).
    pub fn waiting(&self) -> usize {
        self.lock().len()
    }
}

/// One wait for a key's fill; stops listening when dropped.
pub struct Listener {
    fleet: Arc<Fleet>,
    key: String,
    rx: watch::Receiver<()>,
}

impl Listener {
    /// Returns once something was heard of the key's fill since [`Fleet::listen`] (or the
    /// last wait), or after `limit`: either way, the caller looks in Valkey again.
    pub async fn wait(&mut self, limit: Duration) {
        if let Ok(Ok(())) = tokio::time::timeout(limit, self.rx.changed()).await {
            self.rx.borrow_and_update();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut map = self.fleet.lock();
        // This receiver still counts: the last one out removes the key.
        if map
            .get(&self.key)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            map.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Instant;

    #[tokio::test]
    async fn a_message_for_the_key_wakes_its_listener_even_if_it_came_first() {
        let f = Arc::new(Fleet::new(5000));
        let mut l = f.listen("employee:1");
        let heard = |key: &str| f.heard(Heard::Message(Bytes::from(Fleet::announcement(key))));
        heard("employee:2");
        let t = Instant::now();
        l.wait(Duration::from_millis(50)).await;
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "not its key: waits"
        );
        heard("employee:1");
        let t = Instant::now();
        l.wait(Duration::from_secs(5)).await;
        assert!(t.elapsed() < Duration::from_secs(1), "woken at once");
        let t = Instant::now();
        l.wait(Duration::from_millis(50)).await;
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "nothing new: waits"
        );
        f.heard(Heard::Subscribed);
        let t = Instant::now();
        l.wait(Duration::from_secs(5)).await;
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "a resubscription wakes all"
        );
        let second = f.listen("employee:1");
        drop(l);
        assert_eq!(f.waiting(), 1, "another listener remains");
        drop(second);
        assert_eq!(f.waiting(), 0);
    }

    #[test]
    fn the_poll_and_the_patience_follow_the_lease() {
        let f = Fleet::new(6000);
        assert_eq!(f.poll(), Duration::from_millis(200));
        assert_eq!(f.patience(), Duration::from_millis(12_200));
        assert_eq!(Fleet::new(100).poll(), Duration::from_millis(10));
        assert!(!Fleet::new(0).enabled());
        assert_ne!(Fleet::token(), Fleet::token());
    }
}
