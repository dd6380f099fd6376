//! Read-your-writes: how far the fleet's applied invalidations reach, as a PostgreSQL WAL
//! position, and waiting for it to reach a client's token (`CACHEFRONT.AFTER`).
//!
//! **The watermark.** `<meta_prefix>{lease}:applied` in Valkey holds a position *W* such that
//! every transaction whose commit record ends at or before *W* has had its invalidations
//! applied to Valkey. Only the applier writes it — after applying, never before — and only
//! ever raises it (a script compares; see `cache::store`), so every instance reads the same
//! guarantee:
//! - WAL source: the stream delivers transactions in commit order, each with the end of its
//!   commit record. Once everything received up to a commit ending at *E* is applied, *W* = *E*.
//! - triggers source: NOTIFYs reach the listener in the order PostgreSQL queued them, and a
//!   transaction queues them before it writes its commit record. A *barrier* — a NOTIFY whose
//!   payload is the WAL insert position *B* read inside its own transaction
//!   (`Db::notify_barrier`) — is therefore received after the notifications of every
//!   transaction whose commit ends at or before *B*; once those are applied, *W* = *B*.
//!
//! **Waiting.** A read under a token *T* waits until *W* ≥ *T*. Nothing may be committing, so
//! *W* need not move by itself: a waiting instance commits a barrier (a NOTIFY, or a
//! transactional logical message with the WAL source), whose commit comes after *T*, and
//! polls the watermark until it passes the barrier. One barrier at a time serves every read
//! of the instance waiting then; barriers are committed only while some read waits beyond
//! what is known.
//!
//! **Why no stale answer follows.** With *W* ≥ *T*, the versions of everything the token's
//! transaction wrote were bumped (and its entries dropped) after it committed; an entry in
//! Valkey now was stored by a fill whose versions were read after that bump (the no-stale-fill
//! check, `cache::store`), so it read PostgreSQL after the commit. What such a read must still
//! avoid is in-process state older than the bump: the L1, a fill in flight that may have read
//! before it, a stale-if-error value — `Cache::begin_after` skips all three.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use super::{lock, Listener};
use crate::cache::store::Store;
use crate::config::ChangeSource;
use crate::db::DbError;
use crate::metrics::inc;

/// The watermark's name beside the lease (`<meta_prefix>{lease}:applied`).
const NAME: &str = "applied";

/// The prefix of the WAL source's barrier messages (apart from `cachefront`, which carries
/// DDL and heartbeats: these stand for no change).
pub(super) const BARRIER_PREFIX: &str = "cachefront.sync";

/// How often a waiting instance reads the watermark in Valkey.
const POLL: Duration = Duration::from_millis(1);

/// How long a barrier is waited for before another is committed (one may be lost with the
/// applier's connection).
const ROUND: Duration = Duration::from_millis(250);

/// The least time between two barriers of this instance, so a token no barrier can reach
/// (one from the future) costs a few hundred small transactions a second at worst.
const MIN_GAP: Duration = Duration::from_millis(5);

/// The watermark as this process knows it, and the reads waiting for it.
pub struct Applied {
    /// The highest watermark seen (read in Valkey, or written by this process).
    known: watch::Sender<u64>,
    /// The tokens reads wait for now, with how many wait for each.
    waiting: Mutex<BTreeMap<u64, usize>>,
    /// A read started waiting.
    wake: Notify,
}

impl Default for Applied {
    fn default() -> Self {
        Applied {
            known: watch::Sender::new(0),
            waiting: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
        }
    }
}

/// Counts a read as waiting for its token for as long as it waits (also if it is dropped).
struct Waiting<'a> {
    applied: &'a Applied,
    lsn: u64,
}

impl<'a> Waiting<'a> {
    fn new(applied: &'a Applied, lsn: u64) -> Waiting<'a> {
        *lock(&applied.waiting).entry(lsn).or_default() += 1;
        Waiting { applied, lsn }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiting = lock(&self.applied.waiting);
        if let Some(n) = waiting.get_mut(&self.lsn) {
            *n -= 1;
            if *n == 0 {
                waiting.remove(&self.lsn);
            }
        }
    }
}

impl Applied {
    /// The highest watermark this process has seen.
    pub fn known(&self) -> u64 {
        *self.known.borrow()
    }

    /// A watermark seen or written: kept if higher.
    fn learn(&self, lsn: u64) {
        self.known.send_if_modified(|w| {
            let higher = lsn > *w;
            if higher {
                *w = lsn;
            }
            higher
        });
    }

    /// Waits at most `limit` until every change committed up to `lsn` is applied to Valkey.
    /// True if so; false if the wait passed its bound.
    pub async fn wait(&self, lsn: u64, limit: Duration) -> bool {
        if self.known() >= lsn {
            return true;
        }
        let _waiting = Waiting::new(self, lsn);
        let mut rx = self.known.subscribe();
        self.wake.notify_one();
        tokio::time::timeout(limit, rx.wait_for(|w| *w >= lsn))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Whether a read waits beyond what is known.
    fn behind(&self) -> bool {
        let highest = lock(&self.waiting).last_key_value().map(|(lsn, _)| *lsn);
        highest.is_some_and(|lsn| lsn > self.known())
    }

    /// The applier has applied every change committed up to `lsn`: raises the watermark in
    /// Valkey (and here). A failure only delays waiting reads: the next commit or barrier
    /// raises it again.
    pub(super) async fn publish(&self, store: &Store, lsn: u64) {
        match store.raise_applied(&store.lease_key(NAME), lsn).await {
            Ok(()) => self.learn(lsn),
            Err(e) => {
                tracing::debug!(error = %e, "cannot record how far invalidations are applied")
            }
        }
    }

    /// Reads the watermark in Valkey.
    async fn refresh(&self, store: &Store) {
        match store.applied(&store.lease_key(NAME)).await {
            Ok(lsn) => self.learn(lsn),
            Err(e) => tracing::debug!(error = %e, "cannot read how far invalidations are applied"),
        }
    }
}

/// Serves the reads waiting for the watermark, until the process ends: while one waits beyond
/// what is known, commits a barrier and polls the watermark until it passes the barrier.
pub(super) async fn run(l: Listener) {
    let applied = &l.invalidation.applied;
    let mut last_barrier: Option<Instant> = None;
    loop {
        while !applied.behind() {
            tokio::select! {
                _ = applied.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
        // The watermark may already be there (another instance's barrier, a commit).
        applied.refresh(&l.cache.store).await;
        if !applied.behind() {
            continue;
        }
        if let Some(at) = last_barrier {
            tokio::time::sleep_until(at + MIN_GAP).await;
        }
        last_barrier = Some(Instant::now());
        let barrier = match commit_barrier(&l).await {
            Ok(b) => b,
            Err(e) => {
                tracing::debug!(error = %e, "cannot commit a read-your-writes barrier");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        inc(&l.invalidation.metrics.read_after_barriers);
        let give_up = Instant::now() + ROUND;
        while applied.behind() && applied.known() < barrier && Instant::now() < give_up {
            tokio::time::sleep(POLL).await;
            applied.refresh(&l.cache.store).await;
        }
    }
}

/// Commits a barrier through the configured change source; returns its position.
async fn commit_barrier(l: &Listener) -> Result<u64, DbError> {
    let cfg = &l.invalidation.cfg;
    match cfg.source {
        ChangeSource::Triggers => l.db.notify_barrier(&cfg.channel).await,
        ChangeSource::Wal => l.db.message_barrier(BARRIER_PREFIX).await,
    }
}

/// The position a barrier notification carries (`{"sync":"16/B374D848"}`), if the payload
/// is one.
pub(super) fn barrier_of(payload: &str) -> Option<u64> {
    if !payload.starts_with("{\"sync\"") {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    crate::db::replicas::parse_lsn(v.get("sync")?.as_str()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn barrier_payloads() {
        assert_eq!(
            barrier_of(r#"{"sync":"16/B374D848"}"#),
            Some(0x16_B374_D848)
        );
        assert_eq!(barrier_of(r#"{"sync":"nope"}"#), None);
        assert_eq!(barrier_of(r#"{"o":16384}"#), None);
    }

    #[tokio::test]
    async fn a_wait_ends_when_the_watermark_passes_it() {
        let applied = std::sync::Arc::new(Applied::default());
        assert!(applied.wait(0, Duration::ZERO).await);
        assert!(!applied.wait(10, Duration::from_millis(5)).await);
        assert!(lock(&applied.waiting).is_empty());
        let a = std::sync::Arc::clone(&applied);
        let waiter = tokio::spawn(async move { a.wait(10, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(applied.behind());
        applied.learn(9);
        assert!(applied.behind());
        applied.learn(11);
        assert!(!applied.behind(), "known passed every token waited for");
        assert!(waiter.await.expect("waiter"));
        applied.learn(3);
        assert_eq!(applied.known(), 11);
    }
}
