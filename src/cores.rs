//! Thread per core: clients are served on `threads` threads, each running its own
//! single-threaded tokio runtime, and a client stays on the thread it was given for its whole
//! life.
//!
//! Why: a pass-through request crosses from the client's task to a shared upstream connection
//! and back. On a work-stealing runtime those two tasks sit on different threads about half the
//! time, so each request pays thread wake-ups (futex calls, run-queue handoffs) and the shared
//! connection collects fewer requests per write to Valkey, which costs kernel time on both
//! sides. On one thread per core, each core has its own shared upstream connections (see
//! `upstream::Upstream`): a request goes from the client's task to its core's connection and
//! back without leaving the thread, and the connection's writer runs after every client that
//! became readable in the same turn of the event loop, so their requests share one write, as
//! in Valkey's own event loop or twemproxy's.
//!
//! Everything else (the accept loop, invalidation, the lease, metrics, the verifier) runs on
//! the process's main runtime, which needs few threads.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    /// The index of the core whose thread this is; `usize::MAX` on any other thread.
    static CORE: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The core the calling thread serves, if it is one of the cores' threads.
pub fn current() -> Option<usize> {
    CORE.with(|c| Some(c.get()).filter(|&i| i != usize::MAX))
}

/// How many cores `threads` (the config's `threads`) means; 0: one per CPU but one, at
/// least one.
///
/// Why one fewer than the CPUs: every client thread keeps a CPU busy under load, and the
/// process needs CPU besides them — its main runtime (accepting, invalidation, the lease,
/// metrics), the kernel's network work for every socket, and usually Valkey or the
/// application on the same host. A thread per CPU makes them all take turns: on 2 CPUs
/// shared with Valkey and the load generator, two client threads served one-request clients
/// at 0.80–0.93 of Valkey direct, one thread at 1.05–1.13, with fewer context switches and
/// more requests per write to Valkey (`docs/benchmarks.md`). Valkey's own advice for its
/// I/O threads is the same: leave at least one core spare.
pub fn count(threads: usize) -> usize {
    match threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1)),
        n => n,
    }
}

/// The cores' threads, stopped when dropped (each drops its runtime, and with it what still
/// runs there — by then the server has waited for its clients).
pub struct Cores {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
    next: AtomicUsize,
}

impl Cores {
    /// Starts `n` cores (at least one), named `cachefront-core-<i>`.
    pub fn start(n: usize) -> std::io::Result<Cores> {
        let mut handles = Vec::with_capacity(n.max(1));
        let mut stops = Vec::with_capacity(n.max(1));
        for index in 0..n.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("cachefront-core-{index}"))
                .spawn(move || {
                    CORE.with(|c| c.set(index));
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
        }
        Ok(Cores {
            handles,
            stops,
            next: AtomicUsize::new(0),
        })
    }

    /// The core for the next client: round robin, so clients spread evenly.
    pub fn next(&self) -> &Handle {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        &self.handles[i]
    }

    /// Every core's runtime.
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }

    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }
}

impl Drop for Cores {
    fn drop(&mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clients go round the cores, and code running on a core knows which one it is on;
    /// any other thread is on none.
    #[test]
    fn clients_go_round_the_cores_and_each_knows_its_own() {
        let cores = Cores::start(2).expect("two cores");
        assert_eq!(cores.len(), 2);
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (tx, rx) = std::sync::mpsc::channel();
            cores.next().spawn(async move {
                let _ = tx.send(current());
            });
            seen.push(rx.recv().expect("the task ran"));
        }
        assert_eq!(seen, [Some(0), Some(1), Some(0), Some(1)]);
        assert_eq!(current(), None);
        assert_eq!(count(3), 3);
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(
            count(0),
            (cpus - 1).max(1),
            "one per CPU but one, at least one"
        );
    }
}
