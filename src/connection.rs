//! One client connection: read requests, dispatch, and write replies strictly in request order.
//!
//! Replies wait in an ordered queue of slots. A slot is ready at once (local commands), or
//! waits for a shared upstream connection, a fill task, or the client's dedicated upstream
//! connection. Only the front slot is ever written, so pipelined replies can complete out of
//! order internally and still leave in order — and a reply can only reach the client whose
//! slot it fills.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::l1::Ticket;
use crate::command::{self, fill, Action, FillPlan, Route, StateChange, Transform};
use crate::config::ReplyKind;
use crate::error::Error;
use crate::metrics::inc;
use crate::protocol::request::Parsed;
use crate::protocol::{Proto, Reply, Request, RequestParser};
use crate::server::Shared;
use crate::session::Session;
use crate::tls::ClientStream;
use crate::upstream::cluster::Owner;
use crate::upstream::{RawConn, ReplyRx};

/// A reply position in the output queue.
enum Slot {
    Ready(Bytes),
    /// A pass-through reply from a shared connection.
    Upstream {
        rx: ReplyRx,
        transform: Transform,
        proto: Proto,
        started: Instant,
    },
    /// A cached command's lookup; a miss turns it into a `Task`. With a ticket, the lookup
    /// was tracked and a hit may enter the L1.
    Lookup {
        rx: ReplyRx,
        plan: Box<FillPlan>,
        ticket: Option<Ticket>,
        started: Instant,
    },
    /// Local work; with a start time, a cache miss being filled (timed as such).
    Task(JoinHandle<Reply>, Proto, Option<Instant>),
    /// Waiting for the next reply on the dedicated connection; with a plan, that reply is a
    /// cached command's lookup.
    Dedicated {
        transform: Transform,
        proto: Proto,
        reset: bool,
        plan: Option<Box<FillPlan>>,
    },
}

/// What woke the connection up.
enum Event {
    ClientRead(std::io::Result<usize>),
    Front(FrontDone),
    DedicatedRead(std::io::Result<usize>),
    Shutdown,
}

enum FrontDone {
    Upstream(crate::error::Result<Bytes>),
    Joined(Reply),
}

/// The client's own upstream connection, while it needs one.
struct Dedicated {
    conn: RawConn,
    wbuf: BytesMut,
    /// `Dedicated` slots still waiting for their reply.
    pending: usize,
    /// False once the connection carried state we would have to undo (SELECT, tracking,
    /// subscriptions…): it is closed instead of reused.
    reusable: bool,
    /// Subscription counts from Valkey's confirmations: (channels + patterns, shard channels).
    subs: (i64, i64),
    /// Replies to drop: commands cachefront sent itself (a cluster transaction's MULTI).
    swallow: usize,
}

/// What the cluster rules decided for a forwarded command.
enum ClusterStep {
    /// Answered already.
    Done,
    /// Over the shared connections, though a dedicated one is held.
    Shared,
    Continue,
}

pub struct Connection {
    shared: Arc<Shared>,
    /// Plain TCP or TLS; reads and writes take turns in `serve`, so it is never split.
    stream: ClientStream,
    inbuf: BytesMut,
    outbuf: BytesMut,
    parser: RequestParser,
    session: Session,
    outq: VecDeque<Slot>,
    ded: Option<Dedicated>,
    /// Cluster: MULTI was answered locally and opens on the node of the next command.
    deferred_multi: bool,
    closing: bool,
    shutdown: watch::Receiver<bool>,
}

impl Connection {
    /// A client on `stream`, from `peer` (for `CLIENT LIST`-style reporting).
    pub fn new(
        shared: Arc<Shared>,
        stream: ClientStream,
        peer: Option<std::net::SocketAddr>,
        shutdown: watch::Receiver<bool>,
    ) -> Connection {
        let addr = peer.map(|a| a.to_string()).unwrap_or_default();
        let id = shared.next_client_id();
        let authed = shared.users.default_authed();
        let user = Arc::clone(shared.users.default_user());
        Connection {
            shared,
            stream,
            // Buffers grow with use: 10,000 idle clients must not cost 32 KiB each.
            inbuf: BytesMut::new(),
            outbuf: BytesMut::new(),
            parser: RequestParser::default(),
            session: Session::new(id, addr, user, authed),
            outq: VecDeque::new(),
            ded: None,
            deferred_multi: false,
            closing: false,
            shutdown,
        }
    }

    /// Serves the client until it leaves, misbehaves, or the server shuts down.
    pub async fn run(mut self) {
        if let Err(e) = self.serve().await {
            tracing::debug!(client = self.session.id, error = %e, "connection ended");
        }
        self.finish();
        if self.stream.is_tls() {
            // close_notify, so the client sees a clean end rather than a truncation.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await;
        }
    }

    async fn serve(&mut self) -> std::io::Result<()> {
        let max_pipeline = self.shared.config().limits.max_pipeline;
        loop {
            self.process_input().await;
            self.drain_ready();
            self.flush_dedicated().await;
            if !self.outbuf.is_empty() {
                let limit = std::time::Duration::from_millis(
                    self.shared.config().limits.client_write_timeout_ms,
                );
                let write = async {
                    self.stream.write_all(&self.outbuf).await?;
                    self.stream.flush().await
                };
                match tokio::time::timeout(limit, write).await {
                    Ok(r) => r?,
                    Err(_) => {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "client did not read its replies (limits.client_write_timeout_ms)",
                        ))
                    }
                }
                self.outbuf.clear();
            }
            if self.closing && self.outq.is_empty() {
                return Ok(());
            }
            let can_read = !self.closing && self.outq.len() < max_pipeline;
            if can_read && self.inbuf.capacity() - self.inbuf.len() < 512 {
                // Small until the client sends more than small requests.
                let grow = if self.inbuf.capacity() < 4096 {
                    1024
                } else {
                    16 * 1024
                };
                self.inbuf.reserve(grow);
            }
            let idle_limit = self.idle_limit();
            let event = tokio::select! {
                r = self.stream.read_buf(&mut self.inbuf), if can_read => Event::ClientRead(r),
                _ = async {
                    match idle_limit {
                        Some(d) => tokio::time::sleep(d).await,
                        None => std::future::pending().await,
                    }
                } => {
                    tracing::debug!(client = self.session.id, "idle timeout");
                    return Ok(());
                }
                f = front_event(&mut self.outq) => Event::Front(f),
                r = read_dedicated(&mut self.ded) => Event::DedicatedRead(r),
                _ = self.shutdown.changed(), if !self.closing => Event::Shutdown,
            };
            match event {
                Event::ClientRead(Ok(0)) => return Ok(()),
                Event::ClientRead(Ok(_)) => {}
                Event::ClientRead(Err(e)) => return Err(e),
                Event::Front(done) => self.resolve_front(done),
                Event::DedicatedRead(r) => self.on_dedicated_read(r),
                Event::Shutdown => self.closing = true,
            }
        }
    }

    /// How long this client may stay idle now: `limits.timeout_secs`, unless it waits on
    /// something (replies in flight, subscriptions, a blocking command) — Valkey exempts those.
    fn idle_limit(&self) -> Option<std::time::Duration> {
        let secs = self.shared.config().limits.timeout_secs;
        let busy = !self.outq.is_empty() || self.session.streaming() || self.ded.is_some();
        (secs > 0 && !busy).then(|| std::time::Duration::from_secs(secs))
    }

    /// Parses and dispatches every complete request buffered, up to the pipeline limit.
    async fn process_input(&mut self) {
        let limits = self.shared.limits();
        let max_pipeline = self.shared.config().limits.max_pipeline;
        while !self.closing && self.outq.len() < max_pipeline {
            match self
                .parser
                .parse(&mut self.inbuf, &limits, self.session.authed)
            {
                Ok(Parsed::Request(req)) => {
                    let action = command::dispatch(&self.shared, &mut self.session, req);
                    self.apply(action).await;
                }
                Ok(Parsed::Incomplete) => return,
                Err(e) => {
                    self.outq
                        .push_back(Slot::Ready(Bytes::from(e.reply_bytes())));
                    self.closing = true;
                }
            }
        }
    }

    fn push_reply(&mut self, r: Reply) {
        if let Reply::Raw(b) = r {
            self.outq.push_back(Slot::Ready(b));
            return;
        }
        if self.outq.is_empty() {
            // Nothing is waiting before it: straight into the output buffer, no slot needed.
            if r.is_error() {
                inc(&self.shared.metrics.errors);
            }
            r.encode(self.session.proto, &mut self.outbuf);
            return;
        }
        let mut b = BytesMut::new();
        r.encode(self.session.proto, &mut b);
        self.outq.push_back(Slot::Ready(b.freeze()));
    }

    async fn apply(&mut self, action: Action) {
        let action = match action {
            Action::Check { req, verdict } => match verdict.await {
                crate::acl::Check::Deny(r) => {
                    if self.session.in_multi {
                        // As in Valkey: a command refused while queuing aborts the EXEC.
                        self.session.multi_failed = true;
                    }
                    self.push_reply(r);
                    return;
                }
                _ => command::dispatch_checked(&self.shared, &mut self.session, req),
            },
            a => a,
        };
        match action {
            Action::Check { .. } => self.push_reply(Reply::err("ERR permission check failed")),
            Action::Reply(r) => self.push_reply(r),
            Action::Close(r) => {
                self.push_reply(r);
                self.closing = true;
            }
            Action::Forward {
                req,
                route,
                transform,
            } => self.forward(req, route, transform).await,
            Action::Cached { lookup, plan } => self.lookup(lookup, plan).await,
            Action::Task(fut) => {
                let h = tokio::spawn(fut);
                self.outq.push_back(Slot::Task(h, self.session.proto, None));
            }
            Action::Reset => self.reset().await,
        }
    }

    /// Sends a cached command's lookup. While the client holds a dedicated connection on the
    /// cache's database, the lookup goes there too, behind the client's own writes.
    async fn lookup(&mut self, lookup: Bytes, plan: Box<FillPlan>) {
        let l1 = &self.shared.cache.l1;
        let cache_db = self.shared.upstream.endpoint().db;
        let streaming = self.session.streaming();
        let same_node = |ded: &Dedicated| match &self.shared.upstream.cluster {
            Some(c) => c.addr_for_key(plan.entry.key.as_bytes()).as_deref() == Some(&ded.conn.addr),
            None => true,
        };
        match self.ded.as_mut() {
            Some(ded)
                if !streaming
                    && self.session.db == cache_db
                    && ded.conn.proto == plan.proto
                    && same_node(ded) =>
            {
                ded.wbuf.extend_from_slice(&lookup);
                ded.pending += 1;
                self.outq.push_back(Slot::Dedicated {
                    transform: Transform::None,
                    proto: plan.proto,
                    reset: false,
                    plan: Some(plan),
                });
            }
            _ => {
                let up = &self.shared.upstream;
                let ticket = l1.enabled().then(|| l1.ticket(&plan.entry.key));
                let tracked = ticket.and_then(|_| {
                    let key = plan.entry.key.as_bytes();
                    up.send_tracked(self.session.id, plan.proto, lookup.clone(), key)
                });
                let started = Instant::now();
                let slot = match tracked {
                    Some(rx) => Slot::Lookup {
                        rx,
                        plan,
                        ticket,
                        started,
                    },
                    None => Slot::Lookup {
                        rx: up
                            .send_key(
                                self.session.id,
                                plan.proto,
                                lookup,
                                plan.entry.key.as_bytes(),
                            )
                            .await,
                        plan,
                        ticket: None,
                        started,
                    },
                };
                self.outq.push_back(slot);
            }
        }
    }

    async fn forward(&mut self, req: Request, route: Route, transform: Transform) {
        inc(&self.shared.metrics.passthrough);
        let proto = self.session.proto;
        let mut held = self.ded.as_ref().is_some_and(|d| d.conn.proto == proto);
        match self.cluster_forward(&req, route, &transform, held) {
            ClusterStep::Done => return,
            ClusterStep::Shared => held = false,
            ClusterStep::Continue => {}
        }
        if route == Route::Any && !held {
            let rx = self
                .shared
                .upstream
                .forward(self.session.id, proto, &req)
                .await;
            self.outq.push_back(Slot::Upstream {
                rx,
                transform,
                proto,
                started: Instant::now(),
            });
            return;
        }
        if !held {
            if let Err(e) = self.acquire_dedicated(&req.args).await {
                if matches!(e, Error::Upstream(_)) {
                    inc(&self.shared.metrics.upstream_errors);
                }
                if self.session.in_multi {
                    // As in Valkey: a command refused while queuing aborts the EXEC.
                    self.session.multi_failed = true;
                }
                self.push_reply(e.to_reply());
                return;
            }
            if std::mem::take(&mut self.deferred_multi) {
                if let Some(ded) = self.ded.as_mut() {
                    // The transaction opens on the node of its first command.
                    ded.wbuf.extend_from_slice(b"*1\r\n$5\r\nMULTI\r\n");
                    ded.swallow += 1;
                }
            }
        }
        if let Route::Dedicated(change) = route {
            self.apply_state_change(change);
        }
        let streaming = self.session.streaming();
        let Some(ded) = self.ded.as_mut() else { return };
        ded.wbuf.extend_from_slice(&req.raw);
        if !streaming {
            ded.pending += 1;
            self.outq.push_back(Slot::Dedicated {
                transform,
                proto,
                reset: false,
                plan: None,
            });
        }
    }

    /// Cluster rules before a command is forwarded (none without a cluster). A transaction
    /// opens lazily, on the node of its first command; a command for another node than the
    /// dedicated connection's fails inside a transaction (as Valkey's CROSSSLOT would) and
    /// goes over the shared connections otherwise.
    fn cluster_forward(
        &mut self,
        req: &Request,
        route: Route,
        transform: &Transform,
        held: bool,
    ) -> ClusterStep {
        let Some(cluster) = self.shared.upstream.cluster.as_ref() else {
            return ClusterStep::Continue;
        };
        if !held {
            if route == Route::Dedicated(StateChange::Multi) {
                self.apply_state_change(StateChange::Multi);
                self.deferred_multi = true;
                self.push_reply(Reply::ok());
                return ClusterStep::Done;
            }
            if self.deferred_multi && route == Route::Dedicated(StateChange::EndMulti) {
                // Nothing reached Valkey: answer as it would for an empty transaction.
                self.deferred_multi = false;
                let reply = if *transform == Transform::ExecAbort {
                    Reply::err("EXECABORT Transaction discarded because of previous errors.")
                } else if req.name().eq_ignore_ascii_case(b"EXEC") {
                    Reply::Array(Vec::new())
                } else {
                    Reply::ok()
                };
                self.apply_state_change(StateChange::EndMulti);
                self.push_reply(reply);
                return ClusterStep::Done;
            }
            return ClusterStep::Continue;
        }
        let here = self.ded.as_ref().map(|d| d.conn.addr.as_str());
        let elsewhere = match cluster.owner_of(&req.args) {
            Owner::CrossSlot => true,
            Owner::Node(addr) => Some(addr.as_str()) != here,
            Owner::Unknown => false,
        };
        if !elsewhere {
            return ClusterStep::Continue;
        }
        if self.session.in_multi || route != Route::Any {
            if self.session.in_multi {
                self.session.multi_failed = true;
            }
            self.push_reply(Reply::err(
                "CROSSSLOT Keys in request don't hash to the same slot",
            ));
            return ClusterStep::Done;
        }
        ClusterStep::Shared
    }

    async fn acquire_dedicated(&mut self, args: &[Bytes]) -> Result<(), Error> {
        if let Some(old) = self.ded.take() {
            // Held in another protocol after HELLO: it may not be reused.
            self.shared
                .upstream
                .release(self.session.id, old.conn, false);
        }
        let conn = self
            .shared
            .upstream
            .dedicated(self.session.proto, self.session.id, args)
            .await?;
        self.ded = Some(Dedicated {
            conn,
            wbuf: BytesMut::new(),
            pending: 0,
            reusable: true,
            subs: (0, 0),
            swallow: 0,
        });
        Ok(())
    }

    fn apply_state_change(&mut self, change: StateChange) {
        let s = &mut self.session;
        let sticky = match change {
            StateChange::None => false,
            StateChange::Multi => {
                s.in_multi = true;
                s.multi_failed = false;
                false
            }
            StateChange::EndMulti => {
                s.in_multi = false;
                s.multi_failed = false;
                s.watching = false;
                false
            }
            StateChange::Watch => {
                s.watching = true;
                false
            }
            StateChange::Unwatch => {
                s.watching = false;
                false
            }
            StateChange::Subscribe => {
                s.subscribed = true;
                true
            }
            StateChange::Monitor => {
                s.monitor = true;
                true
            }
            StateChange::Select(db) => {
                s.db = db;
                true
            }
            StateChange::Tracking(on) => {
                s.tracking = on;
                true
            }
            StateChange::Pin => {
                s.pinned = true;
                true
            }
        };
        if sticky {
            if let Some(d) = self.ded.as_mut() {
                d.reusable = false;
            }
        }
    }

    /// RESET: Valkey must reset the dedicated connection too (its +RESET is the reply);
    /// without one, the reply is ours.
    async fn reset(&mut self) {
        let authed = self.shared.users.default_authed();
        let proto = self.session.proto;
        self.session
            .reset(Arc::clone(self.shared.users.default_user()), authed);
        self.deferred_multi = false;
        match self.ded.as_mut() {
            Some(ded) => {
                // RESET also returns Valkey's connection to RESP2: never reuse it.
                ded.reusable = false;
                ded.wbuf.extend_from_slice(b"*1\r\n$5\r\nRESET\r\n");
                ded.pending += 1;
                self.outq.push_back(Slot::Dedicated {
                    transform: Transform::None,
                    proto,
                    reset: true,
                    plan: None,
                });
            }
            None => self.push_reply(Reply::Simple("RESET")),
        }
    }

    /// Sends what is queued for the dedicated connection — but only once every command sent
    /// earlier over a shared connection has been answered: two connections give no ordering,
    /// and a client's `SET k 1` must reach Valkey before its `MULTI … EXEC` that reads k.
    async fn flush_dedicated(&mut self) {
        if self.ded.as_ref().is_none_or(|d| d.wbuf.is_empty()) {
            return;
        }
        let waiting_on_shared = self.outq.iter().any(|s| {
            matches!(
                s,
                Slot::Upstream { .. } | Slot::Lookup { .. } | Slot::Task(..)
            )
        });
        let Some(ded) = self.ded.as_mut() else { return };
        if waiting_on_shared {
            return;
        }
        let r = ded.conn.write_all(&ded.wbuf).await;
        ded.wbuf.clear();
        if let Err(e) = r {
            self.dedicated_lost(Error::upstream(format!("connection to Valkey lost: {e}")));
        }
    }

    /// Moves every reply that is ready at the front of the queue into the output buffer.
    fn drain_ready(&mut self) {
        while let Some(front) = self.outq.front_mut() {
            let done = match front {
                Slot::Ready(_) => None,
                Slot::Upstream { rx, .. } | Slot::Lookup { rx, .. } => match rx.try_recv() {
                    Ok(r) => Some(FrontDone::Upstream(r)),
                    Err(tokio::sync::oneshot::error::TryRecvError::Empty) => break,
                    Err(_) => Some(FrontDone::Upstream(Err(dropped()))),
                },
                Slot::Task(h, ..) if h.is_finished() => match futures::FutureExt::now_or_never(h) {
                    Some(r) => Some(FrontDone::Joined(joined(r))),
                    None => break,
                },
                Slot::Task(..) | Slot::Dedicated { .. } => break,
            };
            if let Some(done) = done {
                self.resolve_front(done);
                continue;
            }
            if let Some(Slot::Ready(b)) = self.outq.pop_front() {
                if matches!(b.first(), Some(b'-') | Some(b'!')) {
                    inc(&self.shared.metrics.errors);
                }
                self.outbuf.extend_from_slice(&b);
            }
        }
    }

    /// Turns the front slot's completed work into a ready reply (or, for a cache miss, a fill).
    fn resolve_front(&mut self, done: FrontDone) {
        let Some(front) = self.outq.pop_front() else {
            return;
        };
        let next = match (front, done) {
            (
                Slot::Upstream {
                    transform,
                    proto,
                    started,
                    ..
                },
                FrontDone::Upstream(r),
            ) => {
                if r.is_err() {
                    inc(&self.shared.metrics.upstream_errors);
                }
                self.shared
                    .metrics
                    .latency
                    .passthrough
                    .observe(started.elapsed());
                Slot::Ready(transform.apply(&self.shared, proto, r).into_bytes(proto))
            }
            (
                Slot::Lookup {
                    plan,
                    ticket,
                    started,
                    ..
                },
                FrontDone::Upstream(r),
            ) => self.looked_up(*plan, r, ticket, started),
            (Slot::Task(_, proto, started), FrontDone::Joined(reply)) => {
                if let Some(t) = started {
                    self.shared.metrics.latency.miss.observe(t.elapsed());
                }
                Slot::Ready(reply.into_bytes(proto))
            }
            (other, _) => other,
        };
        self.outq.push_front(next);
    }

    /// A lookup's answer: the entry itself on a hit; otherwise a fill (from PostgreSQL alone
    /// if Valkey failed).
    fn looked_up(
        &self,
        plan: FillPlan,
        r: crate::error::Result<Bytes>,
        ticket: Option<Ticket>,
        started: Instant,
    ) -> Slot {
        // A hit of a degraded entry is not served: the reply may predate an invalidation
        // not yet applied (see `Cache::bypasses`); the fill answers from PostgreSQL.
        let bypass = self.shared.cache.bypasses(&plan.entry);
        match r {
            Ok(frame) if fill::is_hit(&frame) && !bypass => {
                inc(&self.shared.metrics.hits);
                self.shared.metrics.latency.hit.observe(started.elapsed());
                if let Some(t) = ticket.filter(|_| !frame.starts_with(b"-")) {
                    let hash = plan.kind == ReplyKind::Hash;
                    let deps = plan.entry.l1_deps();
                    self.shared.cache.l1.insert(
                        &plan.entry.key,
                        hash,
                        plan.proto,
                        frame.clone(),
                        deps,
                        t,
                    );
                }
                self.maybe_refresh_early(plan);
                Slot::Ready(frame)
            }
            r => {
                let via_cache = r.is_ok();
                if bypass {
                    // Counted as a degraded read by the fill.
                } else if via_cache {
                    inc(&self.shared.metrics.misses);
                } else {
                    inc(&self.shared.metrics.upstream_errors);
                }
                let proto = plan.proto;
                Slot::Task(
                    tokio::spawn(fill::run(Arc::clone(&self.shared), plan, via_cache)),
                    proto,
                    Some(started),
                )
            }
        }
    }

    /// XFetch: now and then a hit starts a background refresh of an entry close to expiry.
    fn maybe_refresh_early(&self, plan: FillPlan) {
        if self.shared.cache.should_refresh_early(&plan.entry.key) {
            inc(&self.shared.metrics.early_refreshes);
            fill::refresh_in_background(Arc::clone(&self.shared), plan);
        }
    }

    fn on_dedicated_read(&mut self, r: std::io::Result<usize>) {
        match r {
            Ok(0) => self.dedicated_lost(Error::upstream("Valkey closed the connection")),
            Err(e) => {
                self.dedicated_lost(Error::upstream(format!("connection to Valkey lost: {e}")))
            }
            Ok(_) => loop {
                let next = match self.ded.as_mut() {
                    Some(d) => d.conn.next_buffered(),
                    None => return,
                };
                match next {
                    Ok(Some(frame)) => self.route_dedicated_frame(frame),
                    Ok(None) => break,
                    Err(e) => return self.dedicated_lost(e),
                }
            },
        }
        self.maybe_release();
    }

    /// Gives a frame from the dedicated connection its place: the reply to the oldest waiting
    /// command, or — for pushes, pub/sub messages and MONITOR lines — out of band, ahead of
    /// the replies still to come.
    fn route_dedicated_frame(&mut self, frame: Bytes) {
        let Some(ded) = self.ded.as_mut() else { return };
        let is_push = ded.conn.proto == Proto::Resp3 && frame.first() == Some(&b'>');
        if !is_push && ded.swallow > 0 && !self.session.streaming() {
            ded.swallow -= 1;
            return;
        }
        let frame = match &self.shared.upstream.cluster {
            Some(c) if crate::upstream::mux::parse_redirect(&frame).is_some() => {
                // The slot moved while this connection is bound to its node.
                c.refresh_soon();
                Bytes::from_static(b"-TRYAGAIN the key's slot moved to another node; retry\r\n")
            }
            _ => frame,
        };
        if self.session.subscribed {
            if let Some(counts) = subscription_counts(&frame) {
                match counts {
                    (SubKind::Regular, n) => ded.subs.0 = n,
                    (SubKind::Shard, n) => ded.subs.1 = n,
                }
                if ded.subs == (0, 0) {
                    self.session.subscribed = false;
                }
            }
        }
        let first_waiting = self
            .outq
            .iter()
            .position(|s| matches!(s, Slot::Dedicated { .. }));
        let out_of_band = is_push || self.session.streaming();
        match first_waiting {
            Some(i) if !out_of_band => {
                if let Some(Slot::Dedicated { reset: true, .. }) = self.outq.get(i) {
                    if &frame[..] != b"+RESET\r\n" {
                        // A message that was already on its way before RESET took effect.
                        self.outq.insert(i, Slot::Ready(frame));
                        return;
                    }
                }
                ded.pending -= 1;
                let filled = match self.outq.remove(i) {
                    Some(Slot::Dedicated {
                        plan: Some(plan), ..
                    }) => self.looked_up(*plan, Ok(frame), None, Instant::now()),
                    Some(Slot::Dedicated {
                        transform, proto, ..
                    }) => Slot::Ready(
                        transform
                            .apply(&self.shared, proto, Ok(frame))
                            .into_bytes(proto),
                    ),
                    Some(other) => other,
                    None => return,
                };
                self.outq.insert(i, filled);
            }
            Some(i) => self.outq.insert(i, Slot::Ready(frame)),
            None => self.outq.push_back(Slot::Ready(frame)),
        }
    }

    /// The dedicated connection failed: waiting commands get the error. If Valkey held state
    /// for the client (transaction, subscriptions, tracking, database), that state is gone, so
    /// the client is disconnected after its replies, as it would be by a Valkey restart.
    fn dedicated_lost(&mut self, e: Error) {
        let Some(ded) = self.ded.take() else { return };
        self.shared.upstream.forget(self.session.id);
        inc(&self.shared.metrics.upstream_errors);
        tracing::warn!(client = self.session.id, error = %e, "dedicated upstream connection lost");
        let reply = e.to_reply();
        for i in 0..self.outq.len() {
            let filled = match &mut self.outq[i] {
                Slot::Dedicated { plan, proto, .. } => match plan.take() {
                    // A lookup that lost its connection is answered from PostgreSQL.
                    Some(plan) => self.looked_up(*plan, Err(e.clone()), None, Instant::now()),
                    None => Slot::Ready(reply.to_bytes(*proto)),
                },
                _ => continue,
            };
            self.outq[i] = filled;
        }
        let stateful = self.session.needs_dedicated();
        drop(ded);
        if stateful {
            self.closing = true;
        }
    }

    /// Gives the dedicated connection back once nothing waits on it and no state needs it.
    fn maybe_release(&mut self) {
        let idle = self
            .ded
            .as_ref()
            .is_some_and(|d| d.pending == 0 && d.wbuf.is_empty());
        if idle && !self.session.needs_dedicated() {
            if let Some(d) = self.ded.take() {
                self.shared
                    .upstream
                    .release(self.session.id, d.conn, d.reusable);
            }
        }
    }

    fn finish(&mut self) {
        if let Some(d) = self.ded.take() {
            let clean = d.reusable && d.pending == 0 && !self.session.needs_dedicated();
            self.shared.upstream.release(self.session.id, d.conn, clean);
        }
        self.shared.upstream.forget(self.session.id);
    }
}

fn dropped() -> Error {
    Error::upstream("connection to Valkey lost before the reply arrived")
}

fn joined(r: Result<Reply, tokio::task::JoinError>) -> Reply {
    r.unwrap_or_else(|e| {
        tracing::error!(error = %e, "command task failed");
        Reply::err("ERR internal error while running the command")
    })
}

/// Waits for the front slot's work to complete (never, if it is not waiting on anything).
async fn front_event(outq: &mut VecDeque<Slot>) -> FrontDone {
    match outq.front_mut() {
        Some(Slot::Upstream { rx, .. }) | Some(Slot::Lookup { rx, .. }) => {
            FrontDone::Upstream(rx.await.unwrap_or_else(|_| Err(dropped())))
        }
        Some(Slot::Task(h, ..)) => FrontDone::Joined(joined(h.await)),
        _ => std::future::pending().await,
    }
}

async fn read_dedicated(ded: &mut Option<Dedicated>) -> std::io::Result<usize> {
    match ded.as_mut() {
        Some(d) => {
            if d.conn.rbuf.capacity() - d.conn.rbuf.len() < 4096 {
                d.conn.rbuf.reserve(16 * 1024);
            }
            d.conn.stream.read_buf(&mut d.conn.rbuf).await
        }
        None => std::future::pending().await,
    }
}

enum SubKind {
    Regular,
    Shard,
}

/// For a (un)subscribe confirmation, which count it reports and the count.
fn subscription_counts(frame: &[u8]) -> Option<(SubKind, i64)> {
    if frame.len() > 4096 || !(frame.starts_with(b"*3\r\n") || frame.starts_with(b">3\r\n")) {
        return None;
    }
    use redis_protocol::resp3::types::{OwnedFrame, Resp3Frame};
    let (decoded, _) = redis_protocol::resp3::decode::complete::decode(frame).ok()??;
    let items = match decoded {
        OwnedFrame::Array { data, .. } | OwnedFrame::Push { data, .. } => data,
        _ => return None,
    };
    let kind = items.first()?.to_string()?.to_ascii_lowercase();
    let count = match items.get(2)? {
        OwnedFrame::Number { data, .. } => *data,
        _ => return None,
    };
    match kind.as_str() {
        "subscribe" | "psubscribe" | "unsubscribe" | "punsubscribe" => {
            Some((SubKind::Regular, count))
        }
        "ssubscribe" | "sunsubscribe" => Some((SubKind::Shard, count)),
        _ => None,
    }
}
