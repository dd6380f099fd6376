//! Concurrent misses on one key share one fill.
//!
//! The fill runs as its own task, so a client that disconnects mid-fill cancels nothing: the
//! others still get the answer, and the entry is still stored. The task removes its map entry
//! when done, so a later miss starts a fresh fill.

use futures::future::{BoxFuture, FutureExt, Shared};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

type SharedFill<T> = Shared<BoxFuture<'static, Result<T>>>;

/// In-flight fills by key.
pub struct Coalescer<T: Clone + Send + Sync + 'static> {
    inflight: Mutex<HashMap<String, SharedFill<T>>>,
}

impl<T: Clone + Send + Sync + 'static> Default for Coalescer<T> {
    fn default() -> Self {
        Coalescer {
            inflight: Mutex::new(HashMap::new()),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Coalescer<T> {
    /// Runs `fill` for `key` unless one is already running, then waits for that one.
    /// Returns the result and whether this caller waited on someone else's fill.
    pub async fn run<F>(self: &Arc<Self>, key: &str, fill: F) -> (Result<T>, bool)
    where
        F: Future<Output = Result<T>> + Send + 'static,
    {
        let (shared, waited) = {
            // A std mutex: held only for a map lookup or insert, never across an await.
            let mut map = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            match map.get(key) {
                Some(f) => (f.clone(), true),
                None => {
                    let this = Arc::clone(self);
                    let owned_key = key.to_string();
                    let task = tokio::spawn(async move {
                        let r = fill.await;
                        this.inflight
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .remove(&owned_key);
                        r
                    });
                    let f = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(Error::upstream(format!("fill task failed: {e}")))
                        })
                    }
                    .boxed()
                    .shared();
                    map.insert(key.to_string(), f.clone());
                    (f, false)
                }
            }
        };
        (shared.await, waited)
    }

    /// Fills in flight now (for tests and INFO).
    pub fn inflight(&self) -> usize {
        self.inflight.lock().map(|m| m.len()).unwrap_or(0)
    }
}
