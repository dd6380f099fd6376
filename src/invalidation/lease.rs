//! Once per fleet: of the cachefront instances sharing one Valkey, only the one holding a
//! lease in Valkey applies changes to it, so the invalidation load on Valkey does not grow
//! with the number of instances.
//!
//! The lease is one key (`<meta_prefix>{lease}:invalidation`, beside `…:flushed`,) holding the holder's random
//! instance id: taken with `SET key id NX PX lease_ms`, extended every `lease_ms / 3` with a
//! compare-and-extend script, given up with a compare-and-delete on shutdown or when the
//! holder's change consumer is lost. Every instance keeps its consumer running (see the
//! parent module); only the holder applies what it hears.
//!
//! **The holder stops before its lease can expire.** Valkey starts a lease's `lease_ms` when
//! it runs the command, after the holder sent it; the holder counts from when it sent it,
//! and takes the lease for lost `lease_ms / 5` before that ([`Lease::holding`] compares the
//! clock, so no task has to run for it to turn false). So when another instance can take the
//! lease, the previous holder has already stopped applying: at most both apply for a moment,
//! which is harmless (an invalidation applied twice drops nothing more), and never neither
//! without a flush to follow.
//!
//! A holder whose renewal Valkey answered too late (so it stopped applying) takes its own
//! lease back with the compare-and-extend as soon as Valkey answers again, instead of waiting
//! for it to expire — as a new term, with the flush that every term begins with.
//!
//! **A new holder flushes everything.** It cannot vouch for what was committed while nobody
//! applied (the previous holder dead, or its lease lost), so each term begins with a flush of
//! every table, as when a listener (re)connects. After a holder dies, changes wait at most
//! until its lease expires (`lease_ms` after its last renewal) plus one attempt period
//! (`lease_ms / 3`) of the next instance, then everything is flushed.
//!
//! **No round trip per change.** Whether this instance holds the lease is a local check of
//! the time the last renewal was sent; only the renewal task talks to Valkey.

use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::{lock, Listener};
use crate::cache::store::Store;
use crate::metrics::{inc, Metrics};

/// The lease's name under `<meta_prefix>lease:`.
const NAME: &str = "invalidation";

/// How long giving the lease up may take at shutdown.
const RELEASE_LIMIT: Duration = Duration::from_secs(1);

/// The invalidation lease as this instance sees it.
pub struct Lease {
    /// This process's id, the lease's value while it holds it.
    id: String,
    /// `invalidation.lease_ms`.
    ms: u64,
    state: Mutex<State>,
    /// Flipped with every take and loss: wakes the consumer and the renewal task.
    held: watch::Sender<bool>,
    /// The term whose flush the consumer has applied (see [`Lease::applying_term`]).
    flushed_term: AtomicU64,
    /// The term whose flush the other instances were told of ([`Lease::mark_flushed`]).
    marked_term: AtomicU64,
    /// Set by [`Lease::abandon`]: never take, renew or release the lease again.
    abandoned: AtomicBool,
    /// The last term ended because Valkey did not answer in time, so the key may still hold
    /// this process's id (a renewal that arrived late extended it): then it is taken back
    /// with a compare-and-extend, not left to expire first.
    maybe_ours: AtomicBool,
    /// The mark of the last term flush this process wrote (as holder) or acted upon (see
    /// [`follow_fleet`]).
    mark: Mutex<Option<Bytes>>,
}

#[derive(Default)]
struct State {
    /// When the request that last took or extended the lease was sent; `None` while not held.
    since: Option<Instant>,
    /// Counts the times this process took the lease.
    term: u64,
}

impl Lease {
    pub fn new(lease_ms: u64) -> Lease {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        Lease {
            id: format!("{:016x}{:016x}", rng.gen::<u64>(), rng.gen::<u64>()),
            ms: lease_ms,
            state: Mutex::new(State::default()),
            held: watch::Sender::new(false),
            flushed_term: AtomicU64::new(0),
            marked_term: AtomicU64::new(0),
            abandoned: AtomicBool::new(false),
            maybe_ours: AtomicBool::new(false),
            mark: Mutex::new(None),
        }
    }

    /// This process's instance id (the lease's value while it holds it).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// How often the holder extends the lease, and another instance tries to take it.
    pub fn period(&self) -> Duration {
        Duration::from_millis(self.ms / 3)
    }

    /// How long before the lease could expire in Valkey the holder takes it for lost.
    fn margin(&self) -> Duration {
        Duration::from_millis(self.ms / 5)
    }

    /// How much later than usual a change can reach Valkey while this process does not
    /// apply: a dead holder's lease runs out, and the next instance's attempt follows.
    pub fn handover(&self) -> Duration {
        Duration::from_millis(self.ms) + self.period()
    }

    /// When a lease taken or extended by a request sent at `since` is taken for lost.
    fn lost_at(&self, since: Instant) -> Instant {
        since + Duration::from_millis(self.ms) - self.margin()
    }

    /// Whether this process holds the lease now, so applies changes: a local check, no
    /// round trip. Turns false on its own before the lease could expire.
    pub fn holding(&self) -> bool {
        lock(&self.state)
            .since
            .is_some_and(|since| Instant::now() < self.lost_at(since))
    }

    /// The current term if this process holds the lease and has flushed everything since
    /// taking it (so every change committed since is applied by it); 0 otherwise.
    pub fn applying_term(&self) -> u64 {
        let term = lock(&self.state).term;
        if self.holding() && self.flushed_term.load(Ordering::Acquire) == term {
            term
        } else {
            0
        }
    }

    /// The term whose flush is still to be applied, if this process holds the lease.
    pub(super) fn flush_due(&self) -> Option<u64> {
        let term = lock(&self.state).term;
        (self.holding() && self.flushed_term.load(Ordering::Acquire) != term).then_some(term)
    }

    /// The consumer applied the flush that begins `term`.
    pub(super) fn flushed(&self, term: u64) {
        self.flushed_term.store(term, Ordering::Release);
    }

    /// Once per term, when everything since it began — its flush included — reached Valkey:
    /// says so to the other instances (see [`follow_fleet`]), which may then serve from the
    /// cache whatever they bypassed.
    pub(super) async fn mark_flushed(&self, store: &Store) {
        let term = self.applying_term();
        if term == 0 || self.marked_term.load(Ordering::Acquire) == term {
            return;
        }
        let mark = format!("{}:{term}", self.id);
        let key = store.lease_key(NAME);
        match store.lease_mark_flushed(&key, &mark).await {
            Ok(()) => {
                self.marked_term.store(term, Ordering::Release);
                *lock(&self.mark) = Some(Bytes::from(mark));
            }
            Err(e) => tracing::debug!(error = %e, "cannot record the term's flush in Valkey"),
        }
    }

    /// Wakes on every take and loss.
    pub(super) fn subscribe(&self) -> watch::Receiver<bool> {
        self.held.subscribe()
    }

    /// Tries to take the lease (`SET NX PX`); true if this process took it now. A process
    /// that holds it already gets false (its key exists), and keeps it.
    pub(super) async fn acquire(&self, store: &Store, metrics: &Metrics) -> bool {
        if self.abandoned.load(Ordering::Acquire) {
            return false;
        }
        let key = store.lease_key(NAME);
        let sent = Instant::now();
        let take = async {
            if store.lease_acquire(&key, &self.id, self.ms).await? {
                return Ok(true);
            }
            if !self.maybe_ours.load(Ordering::Acquire) {
                return Ok(false);
            }
            let ours = store.lease_renew(&key, &self.id, self.ms).await?;
            self.maybe_ours.store(false, Ordering::Release);
            Ok::<bool, crate::error::Error>(ours)
        };
        match tokio::time::timeout(self.period(), take).await {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return false,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot try to take the invalidation lease");
                return false;
            }
            Err(_) => return false,
        }
        let term = {
            let mut st = lock(&self.state);
            st.since = Some(sent);
            st.term += 1;
            st.term
        };
        inc(&metrics.invalidation_takeovers);
        self.held.send_replace(true);
        tracing::info!(
            instance = %self.id,
            term,
            "took the invalidation lease: this instance applies changes to Valkey (after flushing everything)"
        );
        true
    }

    /// The renewal of `term`, sent at `sent`, succeeded.
    fn renewed(&self, term: u64, sent: Instant) {
        let mut st = lock(&self.state);
        if st.term == term && st.since.is_some() {
            st.since = Some(sent);
        }
    }

    /// `term` is over: stop applying.
    fn lose(&self, term: u64, why: &str) {
        let was = {
            let mut st = lock(&self.state);
            let was = st.term == term && st.since.is_some();
            if was {
                st.since = None;
            }
            was
        };
        if was {
            self.held.send_replace(false);
            tracing::warn!(instance = %self.id, reason = why, "lost the invalidation lease: another instance applies changes to Valkey");
        }
    }

    /// `term` is over because Valkey did not extend it in time: the key may still be ours.
    fn timed_out(&self, term: u64) {
        self.maybe_ours.store(true, Ordering::Release);
        self.lose(term, "Valkey did not extend it in time");
    }

    /// Stops applying and gives the lease up (the change consumer was lost: another instance,
    /// whose consumer works, should apply).
    pub(super) async fn resign(&self, store: &Store, why: &str) {
        let (term, held) = {
            let st = lock(&self.state);
            (st.term, st.since.is_some())
        };
        if !held {
            return;
        }
        self.lose(term, why);
        self.give_up(store).await;
    }

    /// Deletes the lease in Valkey if it is still this process's.
    async fn give_up(&self, store: &Store) {
        if self.abandoned.load(Ordering::Acquire) {
            return;
        }
        let key = store.lease_key(NAME);
        let released = tokio::time::timeout(RELEASE_LIMIT, store.lease_release(&key, &self.id));
        if let Ok(Err(e)) = released.await {
            tracing::debug!(error = %e, "cannot release the invalidation lease; it expires");
        }
    }

    /// At shutdown: stops applying and releases the lease, so another instance takes over at
    /// once instead of after it expires.
    pub async fn release(&self, store: &Store) {
        let term = lock(&self.state).term;
        self.lose(term, "shutting down");
        self.give_up(store).await;
    }

    /// Stops applying and never touches the lease again, leaving it to expire: how a
    /// crashed process leaves it (for tests of the takeover).
    pub fn abandon(&self) {
        self.abandoned.store(true, Ordering::Release);
        let term = lock(&self.state).term;
        self.lose(term, "abandoned");
    }

    fn held_since(&self) -> Option<(u64, Instant)> {
        let st = lock(&self.state);
        st.since.map(|since| (st.term, since))
    }
}

/// Keeps the lease: while held, extends it every period until that fails (taken for lost at
/// the latest when it could expire); while not, tries to take it every period — and at once
/// when the change consumer starts listening — if the consumer is listening (an instance
/// that cannot hear changes must not be the one to apply them).
pub(super) async fn run(l: Listener) {
    let lease = l.invalidation.lease();
    let store = &l.cache.store;
    let mut listening = l.invalidation.listening.subscribe();
    // A starting instance gives its own consumer up to a lease length to come up (and take
    // the lease if it is free) before it judges the fleet: nobody holding the lease for those
    // few milliseconds is its own start, not a fleet without an applier.
    let _ = tokio::time::timeout(
        Duration::from_millis(lease.ms),
        listening.wait_for(|on| *on),
    )
    .await;
    loop {
        if lease.abandoned.load(Ordering::Acquire) {
            return;
        }
        match lease.held_since() {
            Some((term, since)) => renew(lease, store, term, since).await,
            None => {
                if l.invalidation.is_listening() && lease.acquire(store, l.metrics()).await {
                    continue;
                }
                follow_fleet(&l, lease).await;
                // Again after a period, or as soon as the consumer's state changes.
                tokio::select! {
                    _ = tokio::time::sleep(lease.period()) => {}
                    _ = listening.changed() => {}
                }
            }
        }
    }
}

/// What an instance that does not apply changes must know of the one that does. While no
/// instance holds the lease (its holder died or lost it; Valkey refuses writes), changes are
/// not applied, so nothing cached can be vouched for: every cached read bypasses the cache
/// (`Cache::degrade_all`). That lasts until a holder has applied the flush that begins its
/// term — its mark in Valkey changes — which also covers whatever this instance itself
/// failed to apply while it held the lease. Checked every period (one `MGET`).
async fn follow_fleet(l: &Listener, lease: &Lease) {
    let key = l.cache.store.lease_key(NAME);
    let state = tokio::time::timeout(lease.period(), l.cache.store.lease_state(&key)).await;
    match state {
        Ok(Ok((Some(_), mark))) => {
            let newer = mark.is_some() && *lock(&lease.mark) != mark;
            if newer {
                let (_, tables) = l.cache.degraded.snapshot();
                for t in &tables {
                    l.cache.recovered(t);
                }
                l.cache.recovered_all();
                *lock(&lease.mark) = mark;
            }
        }
        Ok(Ok((None, _))) => l.cache.degrade_all(&crate::error::Error::upstream(
            "no cachefront instance holds the invalidation lease: changes are not being applied",
        )),
        Ok(Err(e)) => l.cache.degrade_all(&e),
        Err(_) => l.cache.degrade_all(&crate::error::Error::upstream(
            "Valkey did not say who holds the invalidation lease",
        )),
    }
}

/// One renewal of `term` (taken or last extended by a request sent at `since`), a period
/// after `since`; retried until the lease is taken for lost, which the holder then is.
async fn renew(lease: &Lease, store: &Store, term: u64, since: Instant) {
    tokio::time::sleep_until(since + lease.period()).await;
    let lost_at = lease.lost_at(since);
    let key = store.lease_key(NAME);
    let retry = (lease.period() / 4).max(Duration::from_millis(5));
    loop {
        if lease.held_since().map(|(t, _)| t) != Some(term) {
            return;
        }
        let sent = Instant::now();
        let call = store.lease_renew(&key, &lease.id, lease.ms);
        match tokio::time::timeout_at(lost_at, call).await {
            Ok(Ok(true)) => return lease.renewed(term, sent),
            Ok(Ok(false)) => return lease.lose(term, "it expired, or another instance took it"),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "cannot extend the invalidation lease; retrying");
                if Instant::now() + retry >= lost_at {
                    tokio::time::sleep_until(lost_at).await;
                    return lease.timed_out(term);
                }
                tokio::time::sleep(retry).await;
            }
            Err(_) => return lease.timed_out(term),
        }
    }
}
