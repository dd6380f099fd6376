//! Tables whose invalidation could not be applied yet (Valkey refusing writes, down, or a
//! meta key that cannot be repaired in one go): while a table is here, its cached entries may
//! be stale, so reads of it bypass the cache — neither Valkey nor the L1 answers, and fills
//! are not stored — until the invalidation is applied.
//!
//! The read path asks [`Degraded::covers`] once per cached command; it costs one relaxed
//! atomic load while nothing is degraded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{Entry, Tracking};

/// The degraded tables; "everything" while a flush of every table is pending and failing.
#[derive(Default)]
pub struct Degraded {
    /// Fast path: true iff `tables` is non-empty or `all` is set.
    any: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    tables: HashMap<String, Instant>,
    /// Since when every table is degraded (a flush of all of them is pending).
    all: Option<Instant>,
}

impl Inner {
    fn any(&self) -> bool {
        self.all.is_some() || !self.tables.is_empty()
    }
}

impl Degraded {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether anything is degraded: the hot path's first (and usually only) check.
    pub fn any(&self) -> bool {
        self.any.load(Ordering::Acquire)
    }

    /// Whether a read of `entry` must bypass the cache (see `Cache::bypasses`). An entry
    /// whose dependencies this process has not resolved yet might read anything degraded.
    pub fn bypasses(&self, entry: &Entry) -> bool {
        self.any()
            && (entry.deps.tracking == Tracking::Unresolved
                || self.covers(
                    entry
                        .deps
                        .tables
                        .iter()
                        .chain(entry.deps.row.as_ref().map(|r| &r.table))
                        .map(String::as_str),
                ))
    }

    /// Whether an entry read from `names` must bypass the cache.
    pub fn covers<'a>(&self, mut names: impl Iterator<Item = &'a str>) -> bool {
        if !self.any() {
            return false;
        }
        let inner = self.lock();
        inner.all.is_some() || names.any(|n| inner.tables.contains_key(n))
    }

    /// Marks `table` degraded; true if it was not already (the caller logs the change once).
    pub fn enter(&self, table: &str) -> bool {
        let mut inner = self.lock();
        let new = !inner.tables.contains_key(table);
        if new {
            inner.tables.insert(table.to_string(), Instant::now());
        }
        self.any.store(true, Ordering::Release);
        new
    }

    /// Marks every table degraded; true if not already.
    pub fn enter_all(&self) -> bool {
        let mut inner = self.lock();
        let new = inner.all.is_none();
        inner.all.get_or_insert_with(Instant::now);
        self.any.store(true, Ordering::Release);
        new
    }

    /// `table`'s invalidation was applied: how long it was degraded, if it was.
    pub fn leave(&self, table: &str) -> Option<Duration> {
        let mut inner = self.lock();
        let left = inner.tables.remove(table).map(|since| since.elapsed());
        self.any.store(inner.any(), Ordering::Release);
        left
    }

    /// The flush of every table was applied: how long everything was degraded, if it was.
    pub fn leave_all(&self) -> Option<Duration> {
        let mut inner = self.lock();
        let left = inner.all.take().map(|s| s.elapsed());
        self.any.store(inner.any(), Ordering::Release);
        left
    }

    /// For INFO: whether everything is degraded, and the degraded tables, sorted.
    pub fn snapshot(&self) -> (bool, Vec<String>) {
        let inner = self.lock();
        let mut tables: Vec<String> = inner.tables.keys().cloned().collect();
        tables.sort();
        (inner.all.is_some(), tables)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_covered_until_they_leave() {
        let d = Degraded::default();
        assert!(!d.covers(["employees"].into_iter()));
        assert!(d.enter("employees"));
        assert!(!d.enter("employees"), "entered once");
        assert!(d.covers(["departments", "employees"].into_iter()));
        assert!(!d.covers(["departments"].into_iter()));
        assert!(d.leave("employees").is_some());
        assert!(d.leave("employees").is_none());
        assert!(!d.any());
        assert!(d.enter_all());
        assert!(d.covers(["departments"].into_iter()));
        assert!(d.leave_all().is_some());
        assert!(!d.any());
    }
}
