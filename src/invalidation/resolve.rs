//! What each cached query depends on, as PostgreSQL resolves it (see `db::deps`), and making
//! sure every table among its dependencies reports its writes before an entry is stored.
//!
//! Resolutions are remembered per query text until the next DDL statement anywhere in the
//! database (or a change that cannot be attributed), then asked again. A resolution that
//! raced such a change is not kept: the DDL also bumps the versions of what it touched, so a
//! fill that used it cannot store either (see `cache::store`). Failures are never kept: a
//! table created after a query on it failed is found on the next miss.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pending::Change;
use super::{lock, Invalidation};
use crate::cache::named::NamedQuery;
use crate::cache::{Deps, RowDep, Tracking};
use crate::config::ChangeSource;
use crate::db::deps::{self, RelKind, Resolved};
use crate::db::{triggers, wal, Db};
use crate::error::{Error, Result};
use crate::metrics::inc;

/// Most resolutions kept; past it they are all forgotten (and asked again as needed).
const MAX_RESOLUTIONS: usize = 10_000;

/// How long after a failed trigger install a table is tried again.
const WATCH_RETRY: Duration = Duration::from_secs(5);

/// A query's dependencies as this process knows them.
#[derive(Debug)]
pub struct Resolution {
    /// OIDs (as text) of every relation and function an entry of the query depends on.
    pub deps: Vec<String>,
    /// The tables among them: they must report their writes.
    pub tables: Vec<u32>,
    /// Why PostgreSQL cannot report everything the query reads, if it cannot.
    pub untrackable: Option<String>,
    /// For a relation resolved by name: its OID.
    pub relation: Option<u32>,
    /// Every relation and function of `deps` with its name as PostgreSQL gives it
    /// (`quote_ident(schema).quote_ident(name)`, functions with their argument types), by
    /// name: for people (`CACHEFRONT.EXPLAIN`, `CACHEFRONT.QUERIES`), never for identity.
    pub names: Vec<(u32, String)>,
}

/// A query whose freshness cannot be kept, and why (the command layer words the refusal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Untrackable(pub String);

impl Resolution {
    fn of(r: Resolved, ddl_hook_missing: Option<&str>) -> Resolution {
        let mut untrackable: Vec<String> = r.untrackable.into_iter().collect();
        if let Some(why) = ddl_hook_missing {
            for m in r.relations.iter().filter(|m| m.kind == RelKind::MatView) {
                untrackable.push(format!(
                    "materialized view {} changes only by REFRESH, which cachefront sees through its DDL event trigger, and that is {why}",
                    m.name
                ));
            }
        }
        let mut deps: Vec<String> = r.relations.iter().map(|m| m.oid.to_string()).collect();
        deps.extend(r.functions.iter().map(|(oid, _)| oid.to_string()));
        deps.sort();
        deps.dedup();
        let mut names: Vec<(u32, String)> = r
            .relations
            .iter()
            .map(|m| (m.oid, m.name.clone()))
            .chain(r.functions.iter().cloned())
            .collect();
        names.sort_by(|a, b| a.1.cmp(&b.1));
        names.dedup();
        Resolution {
            names,
            deps,
            tables: r
                .relations
                .iter()
                .filter(|m| m.kind == RelKind::Table)
                .map(|m| m.oid)
                .collect(),
            untrackable: (!untrackable.is_empty()).then(|| untrackable.join("; ")),
            relation: None,
        }
    }
}

impl Invalidation {
    /// The resolution of `sql` if this process has one, without asking PostgreSQL.
    pub fn known(&self, sql: &str) -> Option<Arc<Resolution>> {
        lock(&self.resolutions).get(sql).cloned()
    }

    /// What `sql` depends on: remembered, or asked of PostgreSQL (whose errors — a missing
    /// table, a syntax error — are the client's answer). Concurrent misses of one text after
    /// a DDL share one resolution, as they share one fill.
    pub async fn resolve(self: &Arc<Self>, db: &Db, sql: &str) -> Result<Arc<Resolution>> {
        if let Some(r) = self.known(sql) {
            return Ok(r);
        }
        let this = Arc::clone(self);
        let (db, text) = (db.clone(), sql.to_string());
        let work = async move { this.resolve_now(&db, &text).await };
        self.resolving.run(sql, work).await.0
    }

    /// Asks PostgreSQL, again if a DDL statement was seen meanwhile.
    async fn resolve_now(&self, db: &Db, sql: &str) -> Result<Arc<Resolution>> {
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            let mut client = db.client().await.map_err(Error::from)?;
            let resolved = deps::resolve_query(&mut client, sql)
                .await
                .map_err(Error::from)?;
            let res = Arc::new(Resolution::of(resolved, self.ddl_hook_missing().as_deref()));
            if self.remember(sql, &res, generation) {
                return Ok(res);
            }
        }
    }

    /// A relation by name (`search_path` applies) with its family, for a row-keyed query's
    /// key table and `invalidation.tables`: its OID and resolution, `None` if there is none.
    pub async fn resolve_table(
        &self,
        db: &Db,
        name: &str,
    ) -> Result<Option<(u32, Arc<Resolution>)>> {
        if let Some(found) = self.known_table(name) {
            return Ok(Some(found));
        }
        let key = table_key(name);
        loop {
            let generation = self.generation.load(Ordering::Acquire);
            let client = db.client().await.map_err(Error::from)?;
            let Some((oid, resolved)) = deps::resolve_relation(&client, name)
                .await
                .map_err(Error::from)?
            else {
                return Ok(None);
            };
            let mut res = Resolution::of(resolved, None);
            res.relation = Some(oid);
            let res = Arc::new(res);
            if self.remember(&key, &res, generation) {
                return Ok(Some((oid, res)));
            }
        }
    }

    /// The key table of a row-keyed named query, resolved, with the query bound to its
    /// family (see `Invalidation::bind_rows`) if it was not yet.
    pub async fn key_table(
        &self,
        db: &Db,
        query: &Arc<NamedQuery>,
    ) -> Result<Option<(u32, Arc<Resolution>)>> {
        let Some(rk) = &query.row_key else {
            return Ok(None);
        };
        let found = self.resolve_table(db, &rk.table).await?;
        if let Some((oid, family)) = &found {
            self.bind_rows(query, *oid, &family.tables);
        }
        Ok(found)
    }

    /// A key table's resolution if this process has one, without asking PostgreSQL.
    pub fn known_table(&self, name: &str) -> Option<(u32, Arc<Resolution>)> {
        let r = self.known(&table_key(name))?;
        r.relation.map(|oid| (oid, r))
    }

    /// Keeps a resolution unless a DDL statement was seen since it began (then it must be
    /// asked again).
    fn remember(&self, sql: &str, res: &Arc<Resolution>, generation: u64) -> bool {
        let mut map = lock(&self.resolutions);
        if self.generation.load(Ordering::Acquire) != generation {
            return false;
        }
        if map.len() >= MAX_RESOLUTIONS {
            map.clear();
        }
        map.insert(sql.to_string(), Arc::clone(res));
        true
    }

    /// A change arrived (before it is applied): after DDL, or a change that cannot be
    /// attributed, every resolution is asked again. True if the schema may have changed.
    pub(super) fn received(&self, change: &Change) -> bool {
        match change {
            // The DDL may have dropped or disabled a table's triggers: checked again before
            // the next fill that depends on the table is stored.
            Change::Ddl(objects) => {
                let mut watched = lock(&self.watched);
                for o in objects {
                    if let Ok(oid) = o.parse::<u32>() {
                        watched.remove(&oid);
                    }
                }
            }
            Change::All => lock(&self.watched).clear(),
            Change::Table(_) | Change::Rows { .. } => return false,
        }
        let mut map = lock(&self.resolutions);
        self.generation.fetch_add(1, Ordering::AcqRel);
        map.clear();
        true
    }

    /// Makes every table of `res` report its writes (installing triggers when
    /// `install_triggers` is on, checking them once per process otherwise). False if a table
    /// does not yet: its install failed, now or less than [`WATCH_RETRY`] ago (then it is
    /// tried again); the failure is logged and counted.
    pub async fn watch(&self, db: &Db, res: &Resolution) -> bool {
        if !self.cfg.enabled {
            return true;
        }
        let mut all = true;
        for &oid in &res.tables {
            if lock(&self.watched).contains(&oid) {
                continue;
            }
            if lock(&self.unwatched)
                .get(&oid)
                .is_some_and(|at| at.elapsed() < WATCH_RETRY)
            {
                all = false;
                continue;
            }
            match self.watch_table(db, oid).await {
                Ok(()) => {
                    lock(&self.unwatched).remove(&oid);
                    lock(&self.watched).insert(oid);
                }
                Err(e) => {
                    inc(&self.metrics.watch_failures);
                    tracing::error!(table_oid = oid, error = %e, "cannot make this table report its writes; reads depending on it answer from PostgreSQL until it can (retried; or run `cachefront triggers install` as the table owner)");
                    lock(&self.unwatched).insert(oid, Instant::now());
                    all = false;
                }
            }
        }
        all
    }

    /// One table: its triggers installed (or, with installs off, found in place); with the
    /// WAL source, added to the publication — unless PostgreSQL would then refuse the
    /// application's UPDATE and DELETE on it (no replica identity), which is never risked.
    async fn watch_table(&self, db: &Db, oid: u32) -> Result<()> {
        let mut client = db.client().await.map_err(Error::from)?;
        if self.cfg.source == ChangeSource::Wal {
            wal::ensure_publication(&client, &self.cfg.publication)
                .await
                .map_err(Error::from)?;
            if let Some(why) = wal::replica_identity_problem(&client, oid)
                .await
                .map_err(Error::from)?
            {
                return Err(Error::Db(format!(
                    "not published for the WAL change source: {why}"
                )));
            }
            return wal::publish_tables(&client, &self.cfg.publication, &[oid])
                .await
                .map_err(Error::from);
        }
        let cols = self.key_columns(oid);
        if self.cfg.install_triggers {
            triggers::install(&mut client, &self.cfg, oid, &cols)
                .await
                .map_err(Error::from)
        } else if triggers::installed(&client, oid, &cols)
            .await
            .map_err(Error::from)?
        {
            Ok(())
        } else {
            Err(Error::Db(
                "its invalidation triggers are not installed and invalidation.install_triggers is off".into(),
            ))
        }
    }

    /// Whether `table` reports its writes, as far as this process knows, without asking:
    /// `watched` (checked or installed), `unwatched` (its install failed; retried),
    /// `unchecked` (the next fill that needs it checks it), or `off` (invalidation disabled).
    pub fn watch_state(&self, table: u32) -> &'static str {
        if !self.cfg.enabled {
            "off"
        } else if lock(&self.watched).contains(&table) {
            "watched"
        } else if lock(&self.unwatched).contains_key(&table) {
            "unwatched"
        } else {
            "unchecked"
        }
    }

    /// Tables whose writes are not reported yet (for INFO), by OID.
    pub fn unwatched(&self) -> Vec<u32> {
        let mut v: Vec<u32> = lock(&self.unwatched).keys().copied().collect();
        v.sort();
        v
    }

    /// The dependencies of an entry of a query resolved as `res`; `row`: for a row-keyed
    /// query, its key table's OID and resolution (its family), column and the row's key.
    /// `ttl_only`: the operator's opt-in to caching an untrackable query until its TTL.
    pub fn deps_for(
        &self,
        res: &Resolution,
        row: Option<(u32, &Resolution, &str, &str)>,
        ttl_only: bool,
    ) -> std::result::Result<Deps, Untrackable> {
        if let Some(why) = &res.untrackable {
            if !ttl_only {
                return Err(Untrackable(why.clone()));
            }
            return Ok(Deps {
                tables: Vec::new(),
                row: None,
                tracking: Tracking::TtlOnly,
            });
        }
        let (tables, row) = match row {
            None => (res.deps.clone(), None),
            Some((oid, family, column, value)) => (
                res.deps
                    .iter()
                    .filter(|d| !family.deps.contains(d))
                    .cloned()
                    .collect(),
                Some(RowDep {
                    table: oid.to_string(),
                    column: column.to_string(),
                    value: value.to_string(),
                }),
            ),
        };
        Ok(Deps {
            tables,
            row,
            tracking: Tracking::Tracked,
        })
    }
}

/// The resolutions map's key for a table named `name`: apart from any SQL text (which cannot
/// hold a NUL). Looked up on every fill of a row-keyed entry, so joined without `format!`.
fn table_key(name: &str) -> String {
    ["\0table\0", name].concat()
}
