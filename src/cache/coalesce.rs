//! Concurrent misses on one key share one fill.
//!
//! The fill runs as its own task, so a client that disconnects mid-fill cancels nothing: the
//! others still get the answer, and the entry is still stored. The task removes its map entry
//! through a guard that runs however the task ends — done, panicked or dropped with the
//! runtime — so no key is ever left pointing at a fill that will not come back; a later miss
//! starts a fresh fill.
//!
//! Waiters per key are bounded ([`DEFAULT_MAX_WAITERS`]): a request arriving when that many
//! already wait is answered at once with a `-UPSTREAM` error saying so, rather than piling
//! onto PostgreSQL (which is what coalescing protects) or queueing without end.

use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

type SharedFill<T> = Shared<BoxFuture<'static, Result<T>>>;

/// Requests that may wait on one key's fill at once (the leader not counted). Far above any
/// real stampede on one key; past it, something is wrong with the fill and more waiters only
/// hold memory and client connections.
pub const DEFAULT_MAX_WAITERS: usize = 10_000;

/// One fill in flight.
struct InFlight<T: Clone + Send + Sync + 'static> {
    /// Tells this fill apart from a later one of the same key, so a guard removes only its own.
    id: u64,
    fill: SharedFill<T>,
    waiters: Arc<AtomicUsize>,
}

/// In-flight fills by key.
pub struct Coalescer<T: Clone + Send + Sync + 'static> {
    inflight: Mutex<HashMap<String, InFlight<T>>>,
    next_id: AtomicU64,
    max_waiters: usize,
}

impl<T: Clone + Send + Sync + 'static> Default for Coalescer<T> {
    fn default() -> Self {
        Coalescer::with_max_waiters(DEFAULT_MAX_WAITERS)
    }
}

/// Removes a fill's map entry when dropped: at the end of the fill task, including by panic
/// or cancellation.
struct Release<T: Clone + Send + Sync + 'static> {
    owner: Arc<Coalescer<T>>,
    key: String,
    id: u64,
}

impl<T: Clone + Send + Sync + 'static> Drop for Release<T> {
    fn drop(&mut self) {
        let mut map = self.owner.lock();
        if map.get(&self.key).is_some_and(|f| f.id == self.id) {
            map.remove(&self.key);
        }
    }
}

/// Counts a waiter for as long as it waits (also if its request is dropped while waiting).
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<T: Clone + Send + Sync + 'static> Coalescer<T> {
    /// A coalescer that lets at most `max_waiters` requests wait on one key's fill.
    pub fn with_max_waiters(max_waiters: usize) -> Self {
        Coalescer {
            inflight: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            max_waiters,
        }
    }

    /// A std mutex: held only for a map lookup, insert or remove, never across an await.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, InFlight<T>>> {
        self.inflight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `fill` for `key` unless one is already running, then waits for that one.
    /// Returns the result and whether this caller waited on someone else's fill.
    pub async fn run<F>(self: &Arc<Self>, key: &str, fill: F) -> (Result<T>, bool)
    where
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let (shared, waiting) = {
            let mut map = self.lock();
            match map.get(key) {
                Some(f) => {
                    // Not run: let go of what it holds now (an early lookup's fill lease,
                    // which the fill joined may be waiting for), not when that fill ends.
                    drop(fill);
                    if f.waiters.fetch_add(1, Ordering::Relaxed) >= self.max_waiters {
                        f.waiters.fetch_sub(1, Ordering::Relaxed);
                        return (Err(self.full()), true);
                    }
                    (f.fill.clone(), Some(Waiting(Arc::clone(&f.waiters))))
                }
                None => {
                    let f = self.start(key, fill);
                    map.insert(key.to_string(), f.0);
                    (f.1, None)
                }
            }
        };
        let result = shared.await;
        (result, waiting.is_some())
    }

    /// Spawns the fill task (its guard releases the key) and the shared handle waiters join.
    fn start<F>(self: &Arc<Self>, key: &str, fill: F) -> (InFlight<T>, SharedFill<T>)
    where
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let release = Release {
            owner: Arc::clone(self),
            key: key.to_string(),
            id,
        };
        let task = tokio::spawn(async move {
            let _release = release;
            fill.await
        });
        let shared = async move {
            task.await.unwrap_or_else(|e| {
                tracing::error!(error = %e, "a cache fill task failed");
                Err(Error::upstream(format!("fill task failed: {e}")))
            })
        }
        .boxed()
        .shared();
        let entry = InFlight {
            id,
            fill: shared.clone(),
            waiters: Arc::new(AtomicUsize::new(0)),
        };
        (entry, shared)
    }

    /// The answer to a request arriving when the key's waiters are at the bound.
    fn full(&self) -> Error {
        Error::upstream(format!(
            "too many requests ({}) are waiting for this entry's fill; retry",
            self.max_waiters
        ))
    }

    /// Fills in flight now (for tests and INFO).
    pub fn inflight(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn coalescer(max_waiters: usize) -> Arc<Coalescer<u32>> {
        Arc::new(Coalescer::with_max_waiters(max_waiters))
    }

    /// A fill that panics releases its key: waiters get an error (not a hang) and the next
    /// request fills afresh.
    #[tokio::test]
    async fn a_panicking_fill_leaves_the_key_usable() {
        let c = coalescer(8);
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let leader = {
            let c = Arc::clone(&c);
            tokio::spawn(async move {
                c.run("k", async move {
                    let _ = wait.await;
                    panic!("fill blew up");
                })
                .await
            })
        };
        while c.inflight() == 0 {
            tokio::task::yield_now().await;
        }
        let waiter = {
            let c = Arc::clone(&c);
            tokio::spawn(async move { c.run("k", async { Ok(1) }).await })
        };
        tokio::task::yield_now().await;
        let _ = go.send(());
        let limit = Duration::from_secs(5);
        let (r, waited) = tokio::time::timeout(limit, leader).await.unwrap().unwrap();
        assert!(r.is_err() && !waited, "{r:?}");
        let (r, _) = tokio::time::timeout(limit, waiter).await.unwrap().unwrap();
        assert!(r.is_err(), "the waiter gets the failure: {r:?}");
        assert_eq!(c.inflight(), 0, "the key was released");
        let (r, waited) = c.run("k", async { Ok(7) }).await;
        assert_eq!((r, waited), (Ok(7), false));
    }

    /// The request that started a fill going away does not strand the key either.
    #[tokio::test]
    async fn a_dropped_leader_leaves_the_key_usable() {
        let c = coalescer(8);
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let leader = c.run("k", async move {
            let _ = wait.await;
            Ok(1)
        });
        let dropped = tokio::time::timeout(Duration::from_millis(20), leader).await;
        assert!(dropped.is_err(), "the leader was dropped mid-fill");
        let _ = go.send(());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while c.inflight() != 0 {
            assert!(tokio::time::Instant::now() < deadline, "key never released");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let (r, waited) = c.run("k", async { Ok(2) }).await;
        assert_eq!((r, waited), (Ok(2), false));
    }

    /// Past the bound, a request is answered at once with an error instead of waiting.
    #[tokio::test]
    async fn waiters_are_bounded() {
        let c = coalescer(2);
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let mut joined = Vec::new();
        {
            let c = Arc::clone(&c);
            joined.push(tokio::spawn(async move {
                c.run("k", async move {
                    let _ = wait.await;
                    Ok(3)
                })
                .await
            }));
        }
        while c.inflight() == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..2 {
            let c = Arc::clone(&c);
            joined.push(tokio::spawn(
                async move { c.run("k", async { Ok(0) }).await },
            ));
        }
        // Let both waiters register before the third arrives.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (r, _) = c.run("k", async { Ok(0) }).await;
        let e = r.expect_err("the third waiter is refused");
        assert!(
            e.to_string().starts_with("UPSTREAM too many requests"),
            "{e}"
        );
        let _ = go.send(());
        for j in joined {
            assert_eq!(j.await.unwrap().0, Ok(3));
        }
    }
}
