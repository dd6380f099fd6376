//! The read path of a cached command, in one place: the L1, the decision on Valkey's lookup
//! reply (hit, miss, error, degraded), hit counting, the L1 insert, early refresh (XFetch)
//! and the coalesced fill — each decided here and nowhere else.
//!
//! A read is two steps, so the connection can pipeline lookups: [`Cache::begin`] answers from
//! the L1 or says what to send to Valkey; the connection sends it over the shared connection
//! in request order, and hands the reply to [`Cache::finish`], which answers the hit or gives
//! the fill to run. Every answer comes with its [`CacheStatus`].
//!
//! What a fill queries is the command's business (it sits above the cache): it comes in as a
//! [`Plan`] whose [`Source`] resolves the entry's tables and loads from PostgreSQL.

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::FutureExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::flight::{Boarding, Departed, Landing, Leader, Reading};
use super::l1::{self, Ticket};
use super::store::{FillLease, Store};
use super::{Cache, CacheStatus, Deps, Early, Entry, FillOptions, Tracking, Value};
use crate::config::ReplyKind;
use crate::error::{Error, Result};
use crate::metrics::inc;
use crate::protocol::request::encode_multibulk;
use crate::protocol::{Proto, Reply};
use crate::upstream::Tee;

/// The database side of a fill, which the command supplies: resolving an entry's tables needs
/// the invalidation layer and querying needs the command's source, both above the cache.
pub trait Source: Send + Sync + 'static {
    /// The entry ready for a fill through the cache (its tables resolved and notifying),
    /// before any version is read.
    fn prepare(self: Arc<Self>, entry: Entry) -> BoxFuture<'static, Result<Entry>>;
    /// Queries PostgreSQL. `deps`: the versions the fill checks, when it goes through the
    /// cache; `None` when the answer comes straight from PostgreSQL.
    fn load(self: Arc<Self>, deps: Option<Deps>) -> BoxFuture<'static, Result<Value>>;
    /// A fill by this request queried PostgreSQL and took `took` (for the slow-fill log).
    fn filled(&self, took: Duration);
    /// The command and its SQL text, for the verification sampler's report of a mismatch
    /// (`cache::verify` shortens the text).
    fn query(&self) -> (&str, &str);
    /// About how many bytes this source holds of its own (arguments, an SQL text not shared
    /// with a named query), so the verification registry can be bounded in bytes.
    fn size(&self) -> usize;
}

/// Everything a miss needs; built by the command only when a read needs it (an L1 hit never
/// builds one, unless early refresh picks it).
pub struct Plan {
    pub entry: Entry,
    pub kind: ReplyKind,
    /// The client's protocol when it asked.
    pub proto: Proto,
    /// The client's lane (its id), while its requests take the shared connections (not a
    /// dedicated one): which of them they take.
    pub lane: Option<u64>,
    /// Seconds to remember "no such row", if at all.
    pub negative_ttl: Option<u64>,
    pub source: Arc<dyn Source>,
    /// The query's figures (`CACHEFRONT.QUERIES`), if it has them: fills count there.
    pub stats: Option<Arc<crate::metrics::QueryStats>>,
}

/// How a read starts.
pub enum Begin {
    /// Answered from the L1 ([`CacheStatus::L1Hit`]).
    Hit(Bytes),
    /// Send `request` to Valkey, then give its reply to [`Cache::finish`].
    Lookup(Lookup),
    /// The cache is bypassed (an invalidation of the entry's tables is pending): this fill
    /// answers from PostgreSQL.
    Fill(Fill),
}

/// A fill to run: the reply and how it was answered.
pub type Fill = BoxFuture<'static, (Reply, CacheStatus)>;

/// A lookup to send to Valkey.
pub struct Lookup {
    /// `GET` or `HGETALL` of the entry key.
    pub request: Bytes,
    pub pending: Pending,
}

/// A lookup sent, waiting for its reply.
pub struct Pending {
    plan: Box<Plan>,
    /// Taken before the lookup was sent, while the L1 is on: a hit may then enter the L1
    /// (only if the lookup was tracked, see [`Pending::untracked`]).
    ticket: Option<Ticket>,
    /// The lease asked for, when the lookup was the fill's first step (see
    /// [`Cache::early_lookup`]).
    early: Option<Box<Asked>>,
    /// Reads of the same entry may wait for this lookup's reply, until it is sent in a way
    /// they cannot share (see `flight`).
    flight: Option<Box<Leader>>,
}

/// The fill lease an early lookup asked for, until its reply says what became of it. Given
/// up if the lookup is dropped unanswered (the client left, the connection to Valkey
/// failed): the script may have taken it, and nobody else would give it up before it expires.
struct Asked {
    lease: Option<FillLease>,
    store: Store,
}

impl Asked {
    /// The reply came: whoever reads it decides.
    fn answered(mut self) -> Option<FillLease> {
        self.lease.take()
    }
}

impl Drop for Asked {
    fn drop(&mut self) {
        if let Some(lease) = self.lease.take() {
            super::give_up(self.store.clone(), lease);
        }
    }
}

impl Pending {
    /// The entry key looked up (for routing in a cluster).
    pub fn key(&self) -> &str {
        &self.plan.entry.key
    }

    /// The protocol the reply is in.
    pub fn proto(&self) -> Proto {
        self.plan.proto
    }

    /// The query's figures, for the connection to count the read in.
    pub fn stats(&self) -> Option<&Arc<crate::metrics::QueryStats>> {
        self.plan.stats.as_ref()
    }

    /// Whether Valkey should track the key read, so the hit can enter the L1.
    pub fn wants_tracking(&self) -> bool {
        self.ticket.is_some()
    }

    /// The lookup went untracked (tracking unavailable): Valkey will not report changes of
    /// the key, so its hit must not enter the L1.
    pub fn untracked(mut self) -> Pending {
        self.ticket = None;
        self.flight = None;
        self
    }

    /// What the shared connection shows this lookup's reply to, for the reads waiting for
    /// it (see `flight`); they are let go if it is not shown.
    pub fn tee(&mut self) -> Option<Tee> {
        self.flight.take().map(|l| l.into_tee())
    }

    /// The lookup goes on the client's dedicated connection, behind its own commands (which
    /// may be a transaction's, queued rather than run): a plain, untracked `GET`/`HGETALL`,
    /// never the fill's first step.
    pub fn plain(mut self) -> (Bytes, Pending) {
        self.ticket = None;
        self.flight = None;
        self.plain_lookup()
    }

    /// `request` as the client's connection may send it: the fill's first step takes the
    /// key's fill lease, so its reply must be read at once — the connection reads replies in
    /// request order, and a fill ahead of it could be waiting for that very lease. So only a
    /// lookup with nothing ahead of it (`alone`) is the fill's first step; any other is a
    /// plain `GET`.
    pub fn sendable(self, request: Bytes, alone: bool) -> (Bytes, Pending) {
        match self.early.is_some() && !alone {
            true => self.plain_lookup(),
            false => (request, self),
        }
    }

    /// The plain lookup, the first step (never sent) forgotten.
    fn plain_lookup(mut self) -> (Bytes, Pending) {
        let _ = self.early.take().map(|a| a.answered());
        if let Some(leader) = self.flight.as_mut() {
            leader.reading = Reading::Frame;
        }
        (lookup_request(&self.plan.entry.key, self.plan.kind), self)
    }
}

/// What a lookup's reply leads to.
pub enum Step {
    /// A hit: the frame as Valkey sent it.
    Reply(Bytes, CacheStatus),
    /// A miss (or a hit that may not be served): the fill that answers.
    Fill(Fill),
}

/// How a fill reaches its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Through the cache's fill protocol; `refresh`: an early refresh that queries even
    /// though the entry exists.
    Cache { refresh: bool },
    /// A read that must reflect every change applied so far (`Cache::begin_after`): through
    /// the fill protocol, but joining no fill in flight and serving no stale-if-error value.
    Fresh,
    /// Valkey failed: straight from PostgreSQL, nothing stored.
    Direct,
}

/// Whether the lookup reply found an entry (`GET` not nil, `HGETALL` not empty). An error
/// frame is not empty either: callers that must tell it apart check for `-` first.
pub fn is_hit(frame: &[u8]) -> bool {
    !matches!(
        frame,
        b"$-1\r\n" | b"_\r\n" | b"*0\r\n" | b"%0\r\n" | b"*-1\r\n"
    )
}

/// The lookup command for an entry of `kind`.
fn lookup_request(key: &str, kind: ReplyKind) -> Bytes {
    let cmd: &'static [u8] = match kind {
        ReplyKind::Hash => b"HGETALL",
        ReplyKind::Value | ReplyKind::Json => b"GET",
    };
    encode_multibulk(&[
        Bytes::from_static(cmd),
        Bytes::copy_from_slice(key.as_bytes()),
    ])
}

impl Cache {
    /// Starts a read of `key`: straight to PostgreSQL while an invalidation of its tables is
    /// pending (see [`Cache::bypasses`]), else the L1, else a lookup in Valkey. `plan` builds
    /// the miss plan for the key; it is called only when needed, so a hot L1 hit costs a hash
    /// lookup, not a miss's allocations.
    pub fn begin(
        self: &Arc<Self>,
        key: &str,
        kind: ReplyKind,
        proto: Proto,
        plan: impl FnOnce(String) -> Plan,
    ) -> Begin {
        self.begin_at(key, kind, proto, Instant::now(), plan)
    }

    /// [`Cache::begin`] at `now` (tests read at chosen points of an L1 item's life).
    fn begin_at(
        self: &Arc<Self>,
        key: &str,
        kind: ReplyKind,
        proto: Proto,
        now: Instant,
        plan: impl FnOnce(String) -> Plan,
    ) -> Begin {
        if self.degraded.any() {
            return self.begin_planned(plan(key.to_owned()));
        }
        let hash = kind == ReplyKind::Hash;
        let Some(hit) = self.l1.get_at(key, hash, proto, now) else {
            let ticket = self.ticket(key);
            return self.missed(plan(key.to_owned()), ticket);
        };
        let due = hit.fresh.is_some_and(|f| self.refresh_due(key, f, now));
        let renewal = match hit.renew && !hash {
            true => self.renewal(key),
            false => None,
        };
        let Some((ticket, departed)) = renewal else {
            self.hit(CacheStatus::L1Hit, due, || plan(key.to_owned()));
            return Begin::Hit(hit.frame);
        };
        let plan = plan(key.to_owned());
        if !self.shareable(&plan) {
            self.hit(CacheStatus::L1Hit, due, || plan);
            return Begin::Hit(hit.frame);
        }
        inc(&self.metrics.l1_renewals);
        self.lookup(plan, Some(ticket), Some(departed))
    }

    /// The renewal of an L1 item whose renewal is due, if no lookup of its entry is in
    /// flight: this read looks the entry up (its tracked reply renews the item, and reads
    /// missing the L1 meanwhile wait for it), while the reads after it keep hitting the item.
    fn renewal(self: &Arc<Self>, key: &str) -> Option<(Ticket, Departed)> {
        let ticket = self.l1.ticket(key);
        self.flights.renew(key, ticket).map(|d| (ticket, d))
    }

    /// A read that missed the L1, with the key's L1 ticket: it waits for the lookup of its
    /// entry in flight, or sends its own — which later reads may wait for, when they can
    /// share it (see [`Cache::shareable`]).
    fn missed(self: &Arc<Self>, plan: Plan, ticket: Option<Ticket>) -> Begin {
        match ticket.filter(|_| self.shareable(&plan)) {
            Some(t) => match self.flights.board(&plan.entry.key, t) {
                Boarding::Joined(landing) => Begin::Fill(self.await_landing(landing, plan)),
                Boarding::Leads(departed) => self.lookup(plan, ticket, Some(departed)),
            },
            None => self.lookup(plan, ticket, None),
        }
    }

    /// A read waiting for the lookup of its entry already in flight (see `flight`): that
    /// lookup's hit, or else a lookup of its own (counted, and filled on a miss, as any).
    fn await_landing(self: &Arc<Self>, landing: Landing, plan: Plan) -> Fill {
        let cache = Arc::clone(self);
        async move {
            match landing.await {
                Ok(frame) => {
                    inc(&cache.metrics.l1_shared_lookups);
                    cache.hit(CacheStatus::Hit, false, || plan);
                    (Reply::Raw(frame), CacheStatus::Hit)
                }
                // Boxed apart: a fill is a large future, and every waiter's would be
                // allocated and copied at its size — hundreds of them each time a hot item
                // left the L1 — for the rare waiter let go.
                Err(_) => Box::pin(cache.lookup_again(plan)).await,
            }
        }
        .boxed()
    }

    /// [`Cache::begin`] once the plan is built (something is degraded: its entry decides).
    fn begin_planned(self: &Arc<Self>, plan: Plan) -> Begin {
        if self.bypasses(&plan.entry) {
            return Begin::Fill(self.fill_task(plan, Mode::Cache { refresh: false }));
        }
        let key = &plan.entry.key;
        let now = Instant::now();
        if let Some(hit) = self
            .l1
            .get_at(key, plan.kind == ReplyKind::Hash, plan.proto, now)
        {
            let due = hit.fresh.is_some_and(|f| self.refresh_due(key, f, now));
            self.hit(CacheStatus::L1Hit, due, || plan);
            return Begin::Hit(hit.frame);
        }
        let ticket = self.ticket(key);
        self.missed(plan, ticket)
    }

    /// The L1 ticket a lookup of `key` is sent with, while the L1 is on.
    fn ticket(&self, key: &str) -> Option<Ticket> {
        self.l1.enabled().then(|| self.l1.ticket(key))
    }

    /// Starts a read that must reflect every change committed up to a point: `ready`
    /// resolves once every invalidation up to it has been applied to Valkey, or with the
    /// error to answer. Then the entry is read through the fill protocol (its existing value,
    /// or a query stored only if no invalidation raced it). The L1 is skipped — it learns of
    /// invalidations after Valkey does — and so are fills in flight (one may have read
    /// PostgreSQL before the write) and stale-if-error values.
    pub fn begin_after(
        self: &Arc<Self>,
        plan: Plan,
        ready: BoxFuture<'static, Result<()>>,
    ) -> Begin {
        let cache = Arc::clone(self);
        Begin::Fill(
            async move {
                match ready.await {
                    Ok(()) => fill(cache, plan, Mode::Fresh, None).await,
                    Err(e) => (e.to_reply(), CacheStatus::Error),
                }
            }
            .boxed(),
        )
    }

    /// The lookup to send for a miss of the L1, with the L1 ticket taken before it leaves;
    /// `departed`: it is the entry's flight, which other reads wait for.
    fn lookup(&self, plan: Plan, ticket: Option<Ticket>, departed: Option<Departed>) -> Begin {
        let (request, early) = match self.early_lookup(&plan) {
            Some((request, lease)) => {
                let store = self.store.clone();
                let asked = Asked {
                    lease: Some(lease),
                    store,
                };
                (request, Some(Box::new(asked)))
            }
            None => (lookup_request(&plan.entry.key, plan.kind), None),
        };
        let flight = departed.map(|d| self.leader(d, &plan, early.is_some()));
        Begin::Lookup(Lookup {
            request,
            pending: Pending {
                plan: Box::new(plan),
                ticket,
                early,
                flight,
            },
        })
    }

    /// Whether reads of `plan`'s entry may share one lookup: a string entry's (its frame is
    /// the same in either protocol) whose hit may enter the L1 (its dependencies resolved),
    /// while nothing is degraded.
    fn shareable(&self, plan: &Plan) -> bool {
        plan.kind != ReplyKind::Hash
            && plan.entry.deps.tracking != Tracking::Unresolved
            && !self.degraded.any()
    }

    /// The flight `departed` of `plan`'s lookup, with what it takes to hand the reply over.
    /// `early`: the lookup is the early lookup script.
    fn leader(&self, departed: Departed, plan: &Plan, early: bool) -> Box<Leader> {
        let reading = match early {
            true => Reading::Early {
                store: self.store.clone(),
                negative: plan.negative_ttl.is_some(),
            },
            false => Reading::Frame,
        };
        Box::new(Leader {
            departed,
            l1: Arc::clone(&self.l1),
            degraded: Arc::clone(&self.degraded),
            reading,
        })
    }

    /// The lookup that is also its fill's first step, when it can be: the fill script's
    /// read of the entry, its versions and negative marker, taking the key's fill lease only
    /// if both are absent (see `store::PREFILL_LUA`). A hit costs Valkey a script instead of
    /// a `GET` in the same round trip; a miss saves the round trip its fill would have spent
    /// on that read. Only where the fill will use it: a string entry whose tables this process
    /// has resolved (their versions are known), on a single server, fleet coalescing on, the
    /// client speaking RESP2 (the hit is forwarded as the script's bulk reply).
    fn early_lookup(&self, plan: &Plan) -> Option<(Bytes, FillLease)> {
        let eligible = self.fleet.enabled()
            && plan.kind != ReplyKind::Hash
            && plan.proto == Proto::Resp2
            && matches!(
                plan.entry.deps.tracking,
                Tracking::Tracked | Tracking::TtlOnly
            )
            && !self.bypasses(&plan.entry);
        if !eligible {
            return None;
        }
        let key = &plan.entry.key;
        let lease = self.store.fill_lease(key, self.fleet.lease_ms());
        let negative_key = plan.negative_ttl.map(|_| self.store.negative_key(key));
        let request = self
            .store
            .early_lookup(&plan.entry, negative_key.as_deref(), &lease)?;
        Some((request, lease))
    }

    /// A lookup's reply (or the failure to get one): the entry itself on a hit — kept in the
    /// L1 if the lookup was tracked; otherwise the fill that answers (from PostgreSQL alone if
    /// Valkey failed).
    pub fn finish(self: &Arc<Self>, pending: Pending, reply: Result<Bytes>) -> Step {
        // A flight still here was never shown the reply: its waiters are let go.
        let Pending {
            plan,
            ticket,
            early,
            flight: _,
        } = pending;
        if let Some(asked) = early {
            return self.finish_early(plan, ticket, *asked, reply);
        }
        // A hit of a degraded entry is not served: the reply may predate an invalidation
        // not yet applied (see `Cache::bypasses`); the fill answers from PostgreSQL.
        let bypass = self.bypasses(&plan.entry);
        match reply {
            // Valkey refused the lookup (WRONGTYPE on a key the application wrote itself, a
            // permission): its error is the answer, passed on as sent — neither a hit nor a miss.
            // (The connection counts it with every error reply it sends.)
            Ok(frame) if frame.starts_with(b"-") => Step::Reply(frame, CacheStatus::Error),
            Ok(frame) if is_hit(&frame) && !bypass => self.served(plan, ticket, frame),
            Ok(_) => {
                if !bypass {
                    inc(&self.metrics.misses);
                } // else counted as a degraded read by the fill
                Step::Fill(self.fill_task(*plan, Mode::Cache { refresh: false }))
            }
            Err(_) => {
                if !bypass {
                    inc(&self.metrics.upstream_errors);
                }
                Step::Fill(self.fill_task(*plan, Mode::Direct))
            }
        }
    }

    /// A hit from Valkey: kept in the L1 if the lookup was tracked, and answered.
    fn served(self: &Arc<Self>, plan: Box<Plan>, ticket: Option<Ticket>, frame: Bytes) -> Step {
        // The L1 drops items by their dependencies: only resolved ones may enter.
        let resolved = plan.entry.deps.tracking != Tracking::Unresolved;
        if ticket.is_some() && !resolved {
            self.resolve_for_l1(&plan);
        }
        if let Some(t) = ticket.filter(|_| resolved) {
            let entry = &plan.entry;
            let hash = plan.kind == ReplyKind::Hash;
            let item = l1::Item {
                frame: frame.clone(),
                deps: entry.l1_deps(),
                fresh: self.freshness(&entry.key),
            };
            self.l1.insert(&entry.key, hash, plan.proto, item, t);
        }
        let due = self.should_refresh_early(&plan.entry.key);
        self.hit(CacheStatus::Hit, due, || *plan);
        Step::Reply(frame, CacheStatus::Hit)
    }

    /// Resolves the query of a hit whose dependencies this process does not know — another
    /// instance filled the entry, or this one restarted since — in the background, as its
    /// fill would have: until then none of its hits may enter the L1, and none fills it
    /// while it stays in Valkey. One resolution per query at a time; one that fails (the
    /// database is down) is tried again by a later hit.
    fn resolve_for_l1(self: &Arc<Self>, plan: &Plan) {
        let sql = plan.source.query().1;
        let mut resolving = self.resolving();
        if resolving.contains(sql) {
            return;
        }
        let sql = sql.to_owned();
        resolving.insert(sql.clone());
        drop(resolving);
        let (cache, source, entry) = (
            Arc::clone(self),
            Arc::clone(&plan.source),
            plan.entry.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = source.prepare(entry).await {
                tracing::debug!(error = %e, "could not resolve a query for the L1");
            }
            cache.resolving().remove(&sql);
        });
    }

    fn resolving(&self) -> std::sync::MutexGuard<'_, std::collections::HashSet<String>> {
        self.resolving.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// [`Cache::finish`] for a lookup that was its fill's first step: a hit is answered as
    /// any; a miss fills with what the lookup read (its versions, the lease it took). A
    /// Valkey without the script yet (`-NOSCRIPT`) is asked again with a plain `GET`.
    fn finish_early(
        self: &Arc<Self>,
        plan: Box<Plan>,
        ticket: Option<Ticket>,
        asked: Asked,
        reply: Result<Bytes>,
    ) -> Step {
        let bypass = self.bypasses(&plan.entry);
        let frame = match reply {
            Ok(frame) => frame,
            // The script may have run: dropping `asked` gives its lease up.
            Err(_) => {
                if !bypass {
                    inc(&self.metrics.upstream_errors);
                }
                return Step::Fill(self.fill_task(*plan, Mode::Direct));
            }
        };
        // From here the reply says what became of the lease.
        let Some(lease) = asked.answered() else {
            return Step::Fill(self.fill_task(*plan, Mode::Direct));
        };
        if frame.starts_with(b"-NOSCRIPT") {
            self.store.lookup_script_missing();
            return Step::Fill(Arc::clone(self).lookup_again(*plan).boxed());
        }
        if frame.starts_with(b"-") {
            // Valkey refused the read (WRONGTYPE on a key the application wrote itself): its
            // error is the answer, as for a `GET`. The script writes nothing before it reads.
            return Step::Reply(frame, CacheStatus::Error);
        }
        let prefill = match self.store.early_reply(&frame, plan.negative_ttl.is_some()) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "unexpected reply to a lookup; answering from PostgreSQL");
                super::give_up(self.store.clone(), lease);
                if !bypass {
                    inc(&self.metrics.upstream_errors);
                }
                return Step::Fill(self.fill_task(*plan, Mode::Direct));
            }
        };
        if let (Some(Value::String(v)), false) = (&prefill.existing, bypass) {
            let frame = Reply::Bulk(v.clone()).to_bytes(Proto::Resp2);
            return self.served(plan, ticket, frame);
        }
        if !bypass {
            inc(&self.metrics.misses);
        }
        let deps = plan.entry.deps.clone();
        let early = Early::new(prefill, lease, deps, self.store.clone());
        Step::Fill(self.fill_with(*plan, Mode::Cache { refresh: false }, Some(early)))
    }

    /// The lookup of `plan` with a plain `GET` — after Valkey said it lacks the early lookup's
    /// script (a new or restarted server; the script is being loaded for the next lookups,
    /// see `Store::lookup_script_missing`), or for a read let go by the lookup it waited for:
    /// a hit is answered (untracked: not kept in the L1), a miss fills.
    async fn lookup_again(self: Arc<Self>, plan: Plan) -> (Reply, CacheStatus) {
        let bypass = self.bypasses(&plan.entry);
        match self.store.get(&plan.entry.key).await {
            Ok(Some(v)) if !bypass => {
                let due = self.should_refresh_early(&plan.entry.key);
                self.hit(CacheStatus::Hit, due, || plan);
                (Reply::Bulk(v), CacheStatus::Hit)
            }
            Ok(_) => {
                if !bypass {
                    inc(&self.metrics.misses);
                }
                fill(self, plan, Mode::Cache { refresh: false }, None).await
            }
            Err(_) => {
                if !bypass {
                    inc(&self.metrics.upstream_errors);
                }
                fill(self, plan, Mode::Direct, None).await
            }
        }
    }

    /// Counts a hit (the one place hits are counted) and, if `due`, starts an early refresh
    /// of an entry close to expiry (XFetch, see [`Cache::should_refresh_early`]).
    fn hit(self: &Arc<Self>, status: CacheStatus, due: bool, plan: impl FnOnce() -> Plan) {
        inc(&self.metrics.hits);
        if status == CacheStatus::L1Hit {
            inc(&self.metrics.l1_hits);
        }
        if due {
            inc(&self.metrics.early_refreshes);
            // Replies to nobody: the entry is stored again before it expires.
            tokio::spawn(self.fill_task(plan(), Mode::Cache { refresh: true }));
        }
    }

    /// The fill of `plan`, as a task-ready future.
    fn fill_task(self: &Arc<Self>, plan: Plan, mode: Mode) -> Fill {
        self.fill_with(plan, mode, None)
    }

    /// [`fill_task`](Self::fill_task), with what an early lookup already read.
    fn fill_with(self: &Arc<Self>, plan: Plan, mode: Mode, early: Option<Early>) -> Fill {
        fill(Arc::clone(self), plan, mode, early).boxed()
    }
}

/// Answers a miss: through the cache's coalesced fill protocol, or straight from PostgreSQL
/// when Valkey failed. A fill that queried PostgreSQL itself is timed for the slow-fill log.
async fn fill(
    cache: Arc<Cache>,
    plan: Plan,
    mode: Mode,
    early: Option<Early>,
) -> (Reply, CacheStatus) {
    let Plan {
        entry,
        kind,
        proto,
        lane,
        negative_ttl,
        source,
        stats,
    } = plan;
    let started = Instant::now();
    let result = match mode {
        Mode::Direct => load_direct(&cache, Arc::clone(&source)).await,
        Mode::Cache { .. } | Mode::Fresh => match Arc::clone(&source).prepare(entry).await {
            Ok(entry) => {
                let deps = entry.deps.clone();
                let load = Arc::clone(&source);
                let hash = kind == ReplyKind::Hash;
                let opts = FillOptions {
                    negative_ttl,
                    hash,
                    refresh: mode == (Mode::Cache { refresh: true }),
                    fresh: mode == Mode::Fresh,
                    sample: cache.verify.enabled().then(|| super::verify::Origin {
                        source: Arc::clone(&source),
                        hash,
                    }),
                    stats,
                    // An early refresh answers nobody: its store need not be in anyone's order.
                    lane: lane
                        .filter(|_| cache.reply_before_store)
                        .filter(|_| mode != Mode::Cache { refresh: true })
                        .map(|l| (l, proto)),
                    early,
                };
                cache.fill(entry, opts, move || load.load(Some(deps))).await
            }
            // Resolving asked PostgreSQL (a missing table, a syntax error): its error counts.
            Err(e) => {
                if matches!(e, Error::Db(_)) {
                    inc(&cache.metrics.db_errors);
                }
                Err(e)
            }
        },
    };
    if let Ok((_, CacheStatus::Miss | CacheStatus::FailOpen)) = &result {
        source.filled(started.elapsed());
    }
    match result {
        Ok((value, status)) => (render(value, kind), status),
        Err(e) => (e.to_reply(), CacheStatus::Error),
    }
}

/// Valkey is unavailable: the value comes straight from PostgreSQL and nothing is stored.
async fn load_direct(cache: &Cache, source: Arc<dyn Source>) -> Result<(Value, CacheStatus)> {
    let m = &cache.metrics;
    inc(&m.fail_open);
    inc(&m.db_queries);
    source
        .load(None)
        .await
        .inspect_err(|e| {
            if !matches!(e, Error::Client(_)) {
                inc(&m.db_errors)
            }
        })
        .map(|v| (v, CacheStatus::FailOpen))
}

/// The reply for a filled value, in the command's reply kind.
pub fn render(value: Value, kind: ReplyKind) -> Reply {
    match value {
        Value::Absent if kind == ReplyKind::Json => Reply::Bulk(Bytes::from_static(b"[]")),
        Value::Absent => Reply::Nil,
        Value::String(b) => Reply::Bulk(b),
        Value::Hash(fields) => Reply::Map(
            fields
                .into_iter()
                .map(|(k, v)| (Reply::Bulk(Bytes::from(k)), Reply::Bulk(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    //! The read path's decisions, with no server: Valkey's address refuses connections, the
    //! lookup replies are canned and the source is a fake that counts its loads.

    use super::*;
    use crate::cache::store::Store;
    use crate::cache::Freshness;
    use crate::config::{CacheConfig, ValkeyConfig};
    use crate::metrics::Metrics;
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    /// A source answering `value`, counting its loads.
    struct Fake {
        value: Value,
        loads: AtomicUsize,
    }

    impl Source for Fake {
        fn prepare(self: Arc<Self>, entry: Entry) -> BoxFuture<'static, Result<Entry>> {
            async move { Ok(entry) }.boxed()
        }
        fn load(self: Arc<Self>, _deps: Option<Deps>) -> BoxFuture<'static, Result<Value>> {
            self.loads.fetch_add(1, Relaxed);
            let v = self.value.clone();
            async move { Ok(v) }.boxed()
        }
        fn filled(&self, _took: Duration) {}
        fn query(&self) -> (&str, &str) {
            ("FAKE.GET", "SELECT 'fake'")
        }
        fn size(&self) -> usize {
            0
        }
    }

    /// A cache that looks up with `GET`/`HGETALL` (fleet coalescing off, so no lookup is
    /// a fill's first step; see [`early_cache`]).
    fn cache() -> (Arc<Cache>, Arc<Metrics>) {
        cache_with(&CacheConfig {
            fill_lease_ms: 0,
            ..CacheConfig::default()
        })
    }

    /// A cache as configured by default: string lookups of resolved queries from RESP2
    /// clients are their fill's first step.
    fn early_cache() -> (Arc<Cache>, Arc<Metrics>) {
        cache_with(&CacheConfig::default())
    }

    /// A cache whose Valkey is nowhere (port 1 refuses), and its metrics.
    fn cache_with(cfg: &CacheConfig) -> (Arc<Cache>, Arc<Metrics>) {
        let valkey = ValkeyConfig {
            url: "redis://127.0.0.1:1".into(),
            connect_timeout_ms: 200,
            ..ValkeyConfig::default()
        };
        let metrics = Arc::new(Metrics::default());
        let upstream =
            crate::upstream::Upstream::new(&valkey, Arc::clone(&metrics), 0).expect("upstream");
        let store = Store::new(Arc::new(upstream), "cf:");
        let cache = Cache::new(store, Arc::clone(&metrics), cfg);
        (Arc::new(cache), metrics)
    }

    fn fake(value: Value) -> Arc<Fake> {
        Arc::new(Fake {
            value,
            loads: AtomicUsize::new(0),
        })
    }

    /// A plan for `key` depending on `table`, loading from `source`.
    fn plan(key: String, table: &str, source: &Arc<Fake>) -> Plan {
        Plan {
            entry: Entry {
                key,
                ttl: 60,
                deps: Deps {
                    tables: vec![table.to_string()],
                    row: None,
                    tracking: Tracking::Tracked,
                },
            },
            kind: ReplyKind::Value,
            proto: Proto::Resp2,
            lane: None,
            negative_ttl: None,
            source: Arc::clone(source) as Arc<dyn Source>,
            stats: None,
        }
    }

    fn begin(cache: &Arc<Cache>, key: &str, source: &Arc<Fake>) -> Begin {
        cache.begin(key, ReplyKind::Value, Proto::Resp2, |k| {
            plan(k, "emp", source)
        })
    }

    fn lookup(b: Begin) -> Lookup {
        match b {
            Begin::Lookup(l) => l,
            _ => panic!("expected a lookup"),
        }
    }

    /// Runs a step that must be a fill.
    async fn filled(step: Step) -> (Reply, CacheStatus) {
        match step {
            Step::Fill(f) => tokio::time::timeout(Duration::from_secs(10), f)
                .await
                .expect("the fill ends"),
            Step::Reply(..) => panic!("expected a fill"),
        }
    }

    fn count(c: &crate::metrics::Counter) -> u64 {
        c.load(Relaxed)
    }

    const FRAME: &[u8] = b"$5\r\nalice\r\n";

    /// Puts `frame` in the L1 under `key`, as a tracked hit would.
    fn in_l1(cache: &Cache, key: &str, frame: &'static [u8]) {
        let t = cache.l1.ticket(key);
        let deps = Arc::new(crate::cache::l1::ItemDeps {
            tables: vec!["emp".into()],
            row_table: None,
        });
        let item = crate::cache::l1::Item {
            frame: Bytes::from_static(frame),
            deps,
            fresh: cache.freshness(key),
        };
        cache.l1.insert(key, false, Proto::Resp2, item, t);
    }

    #[tokio::test]
    async fn an_l1_hit_answers_at_once_and_builds_no_plan() {
        let (cache, m) = cache();
        in_l1(&cache, "emp:1", FRAME);
        let b = cache.begin("emp:1", ReplyKind::Value, Proto::Resp2, |_| {
            panic!("an L1 hit builds no plan")
        });
        assert!(matches!(b, Begin::Hit(f) if f == FRAME));
        assert_eq!((count(&m.hits), count(&m.l1_hits)), (1, 1));
    }

    #[tokio::test]
    async fn an_l1_miss_sends_the_lookup_of_its_kind() {
        let (cache, _) = cache();
        let src = fake(Value::Absent);
        let l = lookup(begin(&cache, "emp:1", &src));
        assert_eq!(&l.request[..], b"*2\r\n$3\r\nGET\r\n$5\r\nemp:1\r\n");
        assert!(l.pending.wants_tracking(), "the L1 is on: tracked");
        assert_eq!(l.pending.key(), "emp:1");
        let hash = cache.begin("h:1", ReplyKind::Hash, Proto::Resp3, |k| Plan {
            kind: ReplyKind::Hash,
            proto: Proto::Resp3,
            ..plan(k, "emp", &src)
        });
        assert!(lookup(hash).request.starts_with(b"*2\r\n$7\r\nHGETALL\r\n"));
    }

    /// The fill script's reply to an early lookup: the entry `value` (a hit) or none (a
    /// miss, the lease taken), no version bumped yet.
    fn early_reply(value: Option<&str>) -> Bytes {
        let (entry, state) = match value {
            Some(v) => (format!("${}\r\n{v}\r\n", v.len()), 0),
            None => ("$-1\r\n".to_string(), 1),
        };
        Bytes::from(format!(
            "*6\r\n*1\r\n$-1\r\n{entry}:0\r\n:{state}\r\n:0\r\n$0\r\n\r\n"
        ))
    }

    /// With fleet coalescing on, a RESP2 client's string lookup of a resolved query is the
    /// fill script; its hit is answered as the entry's bulk string and kept in the L1; its
    /// miss fills with what the script read (no second read: Valkey is unreachable here, and
    /// the answer still comes from the source, failed open on the store). Other lookups stay
    /// plain: RESP3, hashes, a query whose tables are not resolved yet. A Valkey without the
    /// script is asked again.
    #[tokio::test]
    async fn a_lookup_can_be_its_fills_first_step() {
        let (cache, m) = early_cache();
        let src = fake(Value::String(Bytes::from_static(b"alice")));
        let l = lookup(begin(&cache, "emp:1", &src));
        assert!(
            l.request.starts_with(b"*") && l.request.windows(7).any(|w| w == b"EVALSHA"),
            "{:?}",
            l.request
        );
        let step = cache.finish(l.pending, Ok(early_reply(Some("alice"))));
        assert!(matches!(step, Step::Reply(f, CacheStatus::Hit) if f == FRAME));
        assert_eq!(
            cache
                .l1
                .get("emp:1", false, Proto::Resp2)
                .map(|h| h.frame)
                .as_deref(),
            Some(FRAME)
        );

        let l = lookup(begin(&cache, "emp:2", &src));
        let (reply, status) = filled(cache.finish(l.pending, Ok(early_reply(None)))).await;
        assert_eq!(reply, Reply::Bulk(Bytes::from_static(b"alice")));
        assert_eq!(status, CacheStatus::FailOpen);
        assert_eq!((count(&m.hits), count(&m.misses)), (1, 1));

        let plain = |proto, kind, tracking| {
            let b = cache.begin("emp:3", kind, proto, |k| {
                let mut p = plan(k, "emp", &src);
                (p.proto, p.kind, p.entry.deps.tracking) = (proto, kind, tracking);
                p
            });
            lookup(b).request
        };
        let get = b"*2\r\n$3\r\nGET\r\n$5\r\nemp:3\r\n";
        assert_eq!(
            &plain(Proto::Resp3, ReplyKind::Value, Tracking::Tracked)[..],
            get
        );
        assert_eq!(
            &plain(Proto::Resp2, ReplyKind::Value, Tracking::Unresolved)[..],
            get
        );
        assert!(plain(Proto::Resp2, ReplyKind::Hash, Tracking::Tracked)
            .starts_with(b"*2\r\n$7\r\nHGETALL"));

        let l = lookup(begin(&cache, "emp:4", &src));
        let noscript = Bytes::from_static(b"-NOSCRIPT No matching script.\r\n");
        assert!(matches!(
            cache.finish(l.pending, Ok(noscript)),
            Step::Fill(_)
        ));
    }

    #[tokio::test]
    async fn a_valkey_hit_is_served_and_enters_the_l1_if_tracked() {
        let (cache, m) = cache();
        let src = fake(Value::Absent);
        let l = lookup(begin(&cache, "emp:1", &src));
        let step = cache.finish(l.pending, Ok(Bytes::from_static(FRAME)));
        assert!(matches!(step, Step::Reply(f, CacheStatus::Hit) if f == FRAME));
        assert_eq!((count(&m.hits), count(&m.l1_hits)), (1, 0));
        let again = cache.l1.get("emp:1", false, Proto::Resp2).map(|h| h.frame);
        assert_eq!(again.as_deref(), Some(FRAME), "kept in the L1");

        let l = lookup(begin(&cache, "emp:2", &src));
        let step = cache.finish(l.pending.untracked(), Ok(Bytes::from_static(FRAME)));
        assert!(matches!(step, Step::Reply(_, CacheStatus::Hit)));
        assert_eq!(
            cache.l1.get("emp:2", false, Proto::Resp2).map(|h| h.frame),
            None,
            "untracked"
        );
        assert_eq!(src.loads.load(Relaxed), 0);
    }

    #[tokio::test]
    async fn an_error_reply_is_passed_on_but_not_kept() {
        let (cache, m) = cache();
        let src = fake(Value::Absent);
        let l = lookup(begin(&cache, "emp:1", &src));
        let wrongtype = Bytes::from_static(b"-WRONGTYPE wrong kind of value\r\n");
        let step = cache.finish(l.pending, Ok(wrongtype.clone()));
        assert!(matches!(step, Step::Reply(f, CacheStatus::Error) if f == wrongtype));
        assert_eq!(
            cache.l1.get("emp:1", false, Proto::Resp2).map(|h| h.frame),
            None
        );
        assert_eq!((count(&m.hits), count(&m.misses)), (0, 0));
    }

    /// A miss fills; with Valkey unreachable for the fill's own reads, the value comes from
    /// the source and nothing is stored (fail-open).
    #[tokio::test]
    async fn a_miss_fills_from_the_source() {
        let (cache, m) = cache();
        let src = fake(Value::String(Bytes::from_static(b"alice")));
        for nil in [&b"$-1\r\n"[..], b"_\r\n", b"*0\r\n", b"%0\r\n"] {
            let l = lookup(begin(&cache, "emp:1", &src));
            let step = cache.finish(l.pending, Ok(Bytes::copy_from_slice(nil)));
            assert!(matches!(step, Step::Fill(_)), "{nil:?} is a miss");
        }
        assert_eq!(count(&m.misses), 4);
        let l = lookup(begin(&cache, "emp:1", &src));
        let (reply, status) =
            filled(cache.finish(l.pending, Ok(Bytes::from_static(b"$-1\r\n")))).await;
        assert_eq!(reply, Reply::Bulk(Bytes::from_static(b"alice")));
        assert_eq!(status, CacheStatus::FailOpen);
        assert_eq!(src.loads.load(Relaxed), 1);
        assert_eq!(count(&m.hits), 0);
    }

    /// Valkey failing the lookup: answered from PostgreSQL alone, counted as such.
    #[tokio::test]
    async fn a_failed_lookup_answers_from_the_source() {
        let (cache, m) = cache();
        let src = fake(Value::Absent);
        let l = lookup(begin(&cache, "emp:1", &src));
        let lost = Err(Error::upstream("connection lost"));
        let (reply, status) = filled(cache.finish(l.pending, lost)).await;
        assert_eq!((reply, status), (Reply::Nil, CacheStatus::FailOpen));
        assert_eq!(count(&m.upstream_errors), 1);
        assert_eq!((count(&m.fail_open), count(&m.db_queries)), (1, 1));
        assert_eq!(count(&m.misses), 0);
    }

    /// "No such row" is nil, or `[]` for JSON (what a negative entry answers too).
    #[test]
    fn an_absent_value_renders_by_kind() {
        assert_eq!(render(Value::Absent, ReplyKind::Value), Reply::Nil);
        assert_eq!(
            render(Value::Absent, ReplyKind::Json),
            Reply::Bulk(Bytes::from_static(b"[]"))
        );
    }

    /// While an invalidation of its table is pending, a read skips the L1 and Valkey (even
    /// a hit that was already looked up) and is answered from the source.
    #[tokio::test]
    async fn a_degraded_entry_bypasses_the_cache() {
        let (cache, m) = cache();
        let src = fake(Value::String(Bytes::from_static(b"bob")));
        let before = lookup(begin(&cache, "emp:1", &src));
        in_l1(&cache, "emp:1", FRAME);
        cache.degrade("emp", &Error::upstream("down"));
        let (reply, status) = match begin(&cache, "emp:1", &src) {
            Begin::Fill(f) => f.await,
            _ => panic!("a degraded entry bypasses the cache"),
        };
        assert_eq!(reply, Reply::Bulk(Bytes::from_static(b"bob")));
        assert_eq!(status, CacheStatus::Degraded);
        let step = cache.finish(before.pending, Ok(Bytes::from_static(FRAME)));
        assert_eq!(filled(step).await.1, CacheStatus::Degraded);
        assert_eq!(count(&m.hits), 0, "no hit while degraded");
        assert_eq!(count(&m.degraded_reads), 2);
        // Another table's entries still use the cache.
        let other = cache.begin("dept:1", ReplyKind::Value, Proto::Resp2, |k| {
            plan(k, "dept", &src)
        });
        assert!(matches!(other, Begin::Lookup(_)));
    }

    /// An L1 item in the last eighth of its life: the first read looks the entry up again
    /// (tracked, as the entry's flight), every read meanwhile still hits the item, and the
    /// lookup's reply renews it — it is served past the end of its first life.
    #[tokio::test]
    async fn one_read_renews_an_l1_item_while_the_others_hit() {
        let (cache, m) = cache();
        let src = fake(Value::String(Bytes::from_static(b"alice")));
        in_l1(&cache, "emp:1", FRAME);
        let read = |at: Instant| {
            cache.begin_at("emp:1", ReplyKind::Value, Proto::Resp2, at, |k| {
                plan(k, "emp", &src)
            })
        };
        let life = Duration::from_millis(CacheConfig::default().l1_ttl_ms);
        let start = Instant::now();
        assert!(matches!(read(start + life / 2), Begin::Hit(_)));
        let due = start + life - life / 16;
        let renewing = lookup(read(due));
        assert_eq!(count(&m.l1_renewals), 1);
        assert!(renewing.pending.wants_tracking());
        for _ in 0..3 {
            assert!(matches!(read(due), Begin::Hit(f) if f == FRAME));
        }
        assert_eq!((count(&m.l1_hits), count(&m.l1_renewals)), (4, 1));
        let step = cache.finish(renewing.pending, Ok(Bytes::from_static(b"$3\r\nbob\r\n")));
        assert!(matches!(step, Step::Reply(..)));
        assert!(matches!(read(Instant::now()), Begin::Hit(f) if f == b"$3\r\nbob\r\n"[..]));
        assert!(cache.flights.is_empty());
    }

    /// Reads that miss the L1 while a lookup of the same entry is in flight wait for it: the
    /// lookup's hit, shown as the shared connection reads it, answers them all (one lookup,
    /// not one each). An invalidation of the key before the reply lets a waiter go to read on
    /// its own, as does a lookup sent in a way its reply is not shown (untracked).
    #[tokio::test]
    async fn reads_missing_the_l1_share_the_lookup_in_flight() {
        let (cache, m) = cache();
        let src = fake(Value::String(Bytes::from_static(b"alice")));
        let mut first = lookup(begin(&cache, "emp:1", &src));
        let Begin::Fill(second) = begin(&cache, "emp:1", &src) else {
            panic!("the second read waits for the first's lookup");
        };
        let tee = first
            .pending
            .tee()
            .expect("a tracked lookup is shown its reply");
        tee(&Bytes::from_static(FRAME));
        let (reply, status) = second.await;
        assert_eq!(reply, Reply::Raw(Bytes::from_static(FRAME)));
        assert_eq!(status, CacheStatus::Hit);
        assert_eq!(count(&m.l1_shared_lookups), 1);
        assert_eq!(src.loads.load(Relaxed), 0);
        assert!(cache.flights.is_empty());

        // Invalidated in between: the waiter reads on its own (here: a miss, so it fills).
        let mut first = lookup(begin(&cache, "emp:2", &src));
        let Begin::Fill(second) = begin(&cache, "emp:2", &src) else {
            panic!("the second read waits for the first's lookup");
        };
        cache.l1.invalidate_key(b"emp:2");
        let tee = first.pending.tee().expect("shown its reply");
        tee(&Bytes::from_static(b"$3\r\nold\r\n"));
        let (reply, _) = second.await;
        assert_ne!(reply, Reply::Raw(Bytes::from_static(b"$3\r\nold\r\n")));
        assert_eq!(count(&m.l1_shared_lookups), 1);

        // Untracked: nobody can wait for it.
        let first = lookup(begin(&cache, "emp:3", &src));
        let Begin::Fill(second) = begin(&cache, "emp:3", &src) else {
            panic!("the second read waits for the first's lookup");
        };
        let _untracked = first.pending.untracked();
        let (reply, _) = second.await;
        assert_ne!(
            reply,
            Reply::Raw(Bytes::from_static(FRAME)),
            "read on its own"
        );
        assert_eq!(count(&m.l1_shared_lookups), 1);
        assert_eq!(
            src.loads.load(Relaxed),
            2,
            "each let-go read loaded on its own"
        );
        assert!(cache.flights.is_empty());
    }

    /// XFetch's odds at their ends: an entry whose expiry is further off than the longest
    /// lead any draw can give is never due (and nothing is claimed); one past expiry always
    /// is; and a lead too long to represent (a huge beta) counts as reaching expiry instead
    /// of overflowing.
    #[tokio::test]
    async fn early_refresh_is_never_due_far_from_expiry_and_always_past_it() {
        let now = Instant::now();
        let delta = Duration::from_millis(10);
        let far = Freshness {
            // 708.4 fills' time is the longest lead: 7.08 s here.
            expires: now + Duration::from_secs(8),
            delta,
        };
        let (cache, _) = cache();
        cache.recent.insert("emp:1".to_string(), far);
        assert!((0..10_000).all(|_| !cache.refresh_due("emp:1", far, now)));
        assert_eq!(cache.recent.get("emp:1"), Some(far), "nothing claimed");
        let past = Freshness {
            expires: now,
            delta,
        };
        cache.recent.insert("emp:2".to_string(), past);
        assert!(cache.refresh_due("emp:2", past, now));
        let (huge, _) = cache_with(&CacheConfig {
            fill_lease_ms: 0,
            early_refresh_beta: 1e300,
            ..CacheConfig::default()
        });
        huge.recent.insert("emp:1".to_string(), far);
        assert!(huge.refresh_due("emp:1", far, now));
    }

    /// A hit close to expiry starts one background refresh (XFetch) — an L1 hit too.
    #[tokio::test]
    async fn a_hit_near_expiry_refreshes_early() {
        let (cache, m) = cache();
        let src = fake(Value::String(Bytes::from_static(b"alice")));
        let due = Freshness {
            expires: Instant::now(),
            delta: Duration::from_secs(1),
        };
        cache.recent.insert("emp:1".to_string(), due);
        in_l1(&cache, "emp:1", FRAME);
        assert!(matches!(begin(&cache, "emp:1", &src), Begin::Hit(_)));
        assert_eq!(count(&m.early_refreshes), 1);
        assert!(matches!(begin(&cache, "emp:1", &src), Begin::Hit(_)));
        assert_eq!(count(&m.early_refreshes), 1, "once per expiry window");
        let deadline = Instant::now() + Duration::from_secs(10);
        while src.loads.load(Relaxed) == 0 {
            assert!(Instant::now() < deadline, "the refresh never queried");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}
