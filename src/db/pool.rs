//! PostgreSQL connection pools: one per core for the queries clients wait on, one for the
//! rest, and a pooled session that is cleaned after every use.
//!
//! **Per core.** A tokio-postgres connection is driven by a task on the runtime that opened
//! it. A fill's query on a connection opened on another thread crosses threads twice (the
//! request to the connection's task, the rows back), and on a small machine each crossing is a
//! thread wake-up that costs about as much as the round trip to PostgreSQL itself. So each
//! core (see `cores`) opens and uses connections of its own, like its Valkey connections;
//! anything that runs off the cores (invalidation, catalog work, the verifier) uses the main
//! pool.
//!
//! **Cleaned after a client's SQL, off the client's path.** Whatever a query leaves on its
//! session — a session advisory lock (which no rollback releases), a setting, a LISTEN, a
//! cursor, a temporary table — must not reach the next user of the connection. A [`Pooled`]
//! connection that ran SQL a client wrote (SQL.CACHED), or anything else not known to be the
//! operator's, goes back to its pool only through [`CLEAN`]: when it is dropped, a task of its
//! own runs the cleaning and only then lets the pool have it back; a connection whose cleaning
//! fails or does not finish within the deadline is closed instead. So a client's query can
//! never see what another client's left, and the client that ran the query has its answer one
//! round trip sooner than if the cleaning ran when the connection is next handed out.
//!
//! A connection that ran only the operator's SQL (a named query's statement from the
//! configuration, [`Author::Operator`]) goes straight back, as a transaction-mode pooler hands
//! a server connection on: its text passed the same read-only checks as a client's, its
//! arguments are only ever parameters, and whatever it could still leave on a session the
//! operator's own SQL put there for every caller alike. The cleaning is seven statements that
//! PostgreSQL parses and runs, as many as the fill's own query and then some: skipping it for
//! named queries is half of PostgreSQL's work per miss.

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};
use std::ops::{Deref, DerefMut};
use std::sync::OnceLock;
use std::time::Duration;
use tokio_postgres::NoTls;

use super::DbError;
use crate::config::PostgresConfig;

/// What every session is returned to before it goes back to a pool: `DISCARD ALL` without
/// `DEALLOCATE ALL` and `DISCARD PLANS`, so the prepared statements (and the statement cache
/// that names them) survive. `RESET ALL` returns settings to the connection's own startup
/// options (statement timeout, DateStyle …), not to the server's defaults.
pub const CLEAN: &str = "CLOSE ALL; SET SESSION AUTHORIZATION DEFAULT; RESET ALL; UNLISTEN *; \
     SELECT pg_advisory_unlock_all(); DISCARD TEMP; DISCARD SEQUENCES";

/// A pool of connections made with `pg`, opened on demand, `size` at most. Recycling only
/// checks that a connection is still open: [`Pooled`] cleans it before it comes back.
pub fn build(
    pg: &tokio_postgres::Config,
    cfg: &PostgresConfig,
    size: usize,
) -> Result<Pool, DbError> {
    let mgr = Manager::from_config(
        pg.clone(),
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let timeout = Some(Duration::from_millis(cfg.connect_timeout_ms));
    Pool::builder(mgr)
        .max_size(size.max(1))
        .runtime(Runtime::Tokio1)
        .wait_timeout(timeout)
        .create_timeout(timeout)
        .recycle_timeout(timeout)
        .build()
        .map_err(|e| DbError::Other(e.to_string()))
}

/// The primary's pools: the main one, and one per core made on the core's first use.
pub struct Pools {
    main: Pool,
    per_core: Box<[OnceLock<Pool>]>,
    per_core_size: usize,
    pg: tokio_postgres::Config,
    cfg: PostgresConfig,
}

impl Pools {
    /// `postgres.pool_size` connections for the main pool, and as many again split across
    /// `cores` pools (rounded up per core).
    pub fn new(
        pg: &tokio_postgres::Config,
        cfg: &PostgresConfig,
        cores: usize,
    ) -> Result<Pools, DbError> {
        Ok(Pools {
            main: build(pg, cfg, cfg.pool_size)?,
            per_core: (0..cores).map(|_| OnceLock::new()).collect(),
            per_core_size: cfg.pool_size.div_ceil(cores.max(1)),
            pg: pg.clone(),
            cfg: cfg.clone(),
        })
    }

    /// The calling thread's pool: its core's, or the main one off the cores.
    pub fn here(&self) -> Result<&Pool, DbError> {
        let Some(cell) = crate::cores::current().and_then(|i| self.per_core.get(i)) else {
            return Ok(&self.main);
        };
        if let Some(pool) = cell.get() {
            return Ok(pool);
        }
        let pool = build(&self.pg, &self.cfg, self.per_core_size)?;
        Ok(cell.get_or_init(|| pool))
    }

    /// Every pool made so far.
    pub fn all(&self) -> impl Iterator<Item = &Pool> {
        std::iter::once(&self.main).chain(self.per_core.iter().filter_map(OnceLock::get))
    }
}

/// Who wrote the SQL a pooled connection is handed out to run, which decides whether the
/// session is cleaned before its next user (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Author {
    /// A named query's statement, from the configuration: handed on as it is.
    Operator,
    /// A client's SQL, or cachefront's own catalog and maintenance work: cleaned.
    Anyone,
}

/// A pooled connection that is cleaned before any other user gets it, unless it ran only the
/// operator's SQL and its use finished (see [`Pooled::finished`] and the module doc).
pub struct Pooled {
    object: Option<Object>,
    /// How long the cleaning may take before the connection is closed instead.
    deadline: Duration,
    author: Author,
}

impl Pooled {
    /// A connection for any SQL: cleaned after use.
    pub fn new(object: Object, deadline: Duration) -> Pooled {
        Pooled::for_author(object, deadline, Author::Anyone)
    }

    /// A connection for SQL by `author`.
    pub fn for_author(object: Object, deadline: Duration, author: Author) -> Pooled {
        Pooled {
            object: Some(object),
            deadline,
            author,
        }
    }

    /// Gives the connection back once its use has finished (every query answered): straight
    /// to its pool if it ran only the operator's SQL, else through the cleaning. A use that did
    /// not finish — abandoned half way, its query maybe still running — never comes here: the
    /// connection is dropped, and cleaned once the session is free.
    pub fn finished(mut self) {
        if self.author == Author::Operator {
            drop(self.object.take());
        }
    }

    /// Closes the connection instead of returning it: a query is still running on it (its
    /// deadline passed, or the rest of an abandoned result is on its way).
    pub fn close(mut self) {
        drop(Unclean(self.object.take()));
    }
}

impl Deref for Pooled {
    type Target = Object;
    fn deref(&self) -> &Object {
        // Only `close` and `drop` take the object, and both consume the wrapper.
        self.object.as_ref().expect("a pooled connection in use")
    }
}

impl DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Object {
        self.object.as_mut().expect("a pooled connection in use")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let Some(object) = self.object.take() else {
            return;
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(clean(object, self.deadline));
            }
            // No runtime to clean it on: it is not reused.
            Err(_) => drop(Unclean(Some(object))),
        }
    }
}

/// Cleans `object` and lets its pool have it back; closes it if that fails, overruns or the
/// task is dropped before it finishes (its runtime shutting down). It first lets the tasks
/// already woken run: the one that just used the connection usually has more to send (a
/// fill's store), which should not wait behind the cleaning.
async fn clean(object: Object, deadline: Duration) {
    let mut unclean = Unclean(Some(object));
    tokio::task::yield_now().await;
    let Some(object) = unclean.0.as_ref() else {
        return;
    };
    match tokio::time::timeout(deadline, object.batch_execute(CLEAN)).await {
        // Back to the pool.
        Ok(Ok(())) => drop(unclean.0.take()),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not clean a pooled PostgreSQL session; closing it")
        }
        Err(_) => tracing::warn!("cleaning a pooled PostgreSQL session overran; closing it"),
    }
}

/// A connection not known to be clean: closed, never returned to its pool, when dropped.
struct Unclean(Option<Object>);

impl Drop for Unclean {
    fn drop(&mut self) {
        if let Some(object) = self.0.take() {
            drop(Object::take(object));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Code on a core gets its core's pool — the same one each time, made on first use —
    /// and code off the cores the main pool. No connection is opened to find out.
    #[test]
    fn each_core_has_a_pool_of_its_own() {
        let cfg = PostgresConfig {
            url: "postgres://nobody@127.0.0.1:1/none".into(),
            pool_size: 5,
            ..PostgresConfig::default()
        };
        let pg = super::super::pg_config(&cfg.url, &cfg).expect("config");
        let pools = std::sync::Arc::new(Pools::new(&pg, &cfg, 2).expect("pools"));
        let main = pools.here().expect("main") as *const Pool as usize;
        let cores = crate::cores::Cores::start(2).expect("cores");
        let mut seen = Vec::new();
        for _ in 0..4 {
            let (tx, rx) = std::sync::mpsc::channel();
            let pools = std::sync::Arc::clone(&pools);
            cores.next().spawn(async move {
                let pool = pools.here().expect("a core's pool");
                let _ = tx.send((pool as *const Pool as usize, pool.status().max_size));
            });
            seen.push(rx.recv().expect("an answer"));
        }
        assert!(seen.iter().all(|&(p, _)| p != main), "{seen:?}");
        assert_eq!(seen[0], seen[2], "a core keeps its pool");
        assert_eq!(seen[1], seen[3], "a core keeps its pool");
        assert_ne!(seen[0].0, seen[1].0, "each core has its own");
        assert!(
            seen.iter().all(|&(_, size)| size == 3),
            "5 split over 2 cores: {seen:?}"
        );
        assert_eq!(pools.all().count(), 3);
    }
}
