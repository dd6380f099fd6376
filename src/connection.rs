//! One client connection: read requests, dispatch, and write replies strictly in request order.
//!
//! Replies wait in an ordered queue of slots. A slot is ready at once (local commands), or
//! waits for a shared upstream connection, a fill task, or the client's dedicated upstream
//! connection. Only the front slot is ever written, so pipelined replies can complete out of
//! order internally and still leave in order — and a reply can only reach the client whose
//! slot it fills.

use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::cache::read::{Begin, Pending, Step};
use crate::cache::CacheStatus;
use crate::command::{self, Action, Route, StateChange, Transform};
use crate::command::{Context, LiveView};
use crate::error::{Error, Refusal};
use crate::metrics::inc;
use crate::metrics::QueryStats;
use crate::protocol::request::Parsed;
use crate::protocol::{Proto, Reply, Request, RequestParser};
use crate::session::{ReplyMode, Session};
use crate::tls::ClientStream;
use crate::upstream::cluster::Owner;
use crate::upstream::{reply_lost, Inbox, LongMark, RawConn, ReplyBudget, ReplyRx};

mod queue;
mod run;
use queue::{Out, Queued, ReplyQueue};
use run::Run;

/// A reply position in the output queue.
enum Slot {
    /// A command's reply, ready (dropped on the way out while `CLIENT REPLY` says so).
    Ready(Bytes),
    /// Something that is not a reply (a pub/sub message, a RESP3 push): always sent.
    Push(Bytes),
    /// A pass-through reply from a shared connection.
    Upstream {
        rx: Answer,
        transform: Transform,
        proto: Proto,
        started: Instant,
    },
    /// A cached command's lookup in Valkey; its reply goes to `Cache::finish`, which answers
    /// the hit or turns the slot into a `Read` fill.
    Lookup {
        rx: ReplyRx,
        pending: Pending,
        started: Instant,
    },
    /// A cached read's fill, timed from when the read began.
    Read {
        task: JoinHandle<(Reply, CacheStatus)>,
        proto: Proto,
        started: Instant,
        /// The query's figures, which count the read when it ends.
        stats: Option<Arc<QueryStats>>,
    },
    /// Local work.
    Task(JoinHandle<Reply>, Proto),
    /// Waiting for the next reply on the dedicated connection; with a pending read, that reply
    /// is a cached command's lookup.
    Dedicated {
        transform: Transform,
        proto: Proto,
        reset: bool,
        lookup: Option<Pending>,
        /// EXEC: the state changes of the commands it runs, applied per successful reply.
        exec: Option<Vec<StateChange>>,
        /// Held while a long command (a script…) waits for its reply.
        _long: Option<LongMark>,
    },
}

/// Where a pass-through reply comes from: a request's own channel, or the inbox of the
/// run it was sent in (see `connection::run`).
enum Answer {
    One(ReplyRx),
    Inbox(Arc<Inbox>),
}

impl Queued for Slot {
    fn into_out(self) -> Result<Out, Slot> {
        match self {
            Slot::Ready(b) => Ok(Out::Reply(b)),
            Slot::Push(b) => Ok(Out::Push(b)),
            waiting => Err(waiting),
        }
    }

    fn is_out(&self) -> bool {
        matches!(self, Slot::Ready(_) | Slot::Push(_))
    }

    fn ready_len(&self) -> Option<usize> {
        match self {
            Slot::Ready(b) | Slot::Push(b) => Some(b.len()),
            _ => None,
        }
    }
}

/// What woke the connection up.
enum Event {
    Client(ClientIo),
    Front(FrontDone),
    Dedicated(DedicatedIo),
    Shutdown,
    /// The client passed an output limit (hard), or its soft limit's grace ran out.
    OutputLimit,
}

enum FrontDone {
    Upstream(crate::error::Result<Bytes>),
    Joined(Reply),
    /// A cached read's fill finished.
    Read(Reply, CacheStatus),
}

/// The client's own upstream connection, while it needs one.
struct Dedicated {
    conn: RawConn,
    wbuf: BytesMut,
    /// `Dedicated` slots still waiting for their reply.
    pending: usize,
    /// Of those, the last ones whose commands are still in `wbuf`, not yet cleared to go.
    unsent: usize,
    /// Bytes at the front of `wbuf` cleared to go (see `flush_dedicated`). The socket takes
    /// them as it can, from `serve`'s select, so that a client pipelining thousands of
    /// commands never stops the loop that reads Valkey's replies and the client's requests.
    cleared: usize,
    /// Bytes were written since the last flush (TLS keeps them until flushed).
    unflushed: bool,
    /// Subscription counts from Valkey's confirmations: (channels + patterns, shard channels).
    subs: (i64, i64),
    /// Replies to drop: commands cachefront sent itself (a cluster transaction's MULTI).
    swallow: usize,
    /// The Valkey ACL twin it is logged in as (a restricted user's; see `acl::Mirror`).
    as_user: Option<String>,
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
    ctx: Arc<Context>,
    /// Plain TCP or TLS; reads and writes take turns in `serve`, so it is never split.
    stream: ClientStream,
    inbuf: BytesMut,
    outbuf: BytesMut,
    parser: RequestParser,
    session: Session,
    /// Replies in request order (and whether `CLIENT REPLY` drops each).
    outq: ReplyQueue<Slot>,
    ded: Option<Dedicated>,
    /// Pass-through requests read since the last were handed to the shared connection.
    run: Run,
    /// Cluster: MULTI was answered locally and opens on the node of the next command.
    deferred_multi: bool,
    /// The command being applied now is muted (its reply, if written at once, is dropped).
    muting: bool,
    /// Bytes of replies held for this client and not yet written: charged where each reply
    /// comes into being (a shared connection's reader, or here), released once written.
    budget: Arc<ReplyBudget>,
    /// Since when the client has been over its soft output limit.
    soft_since: Option<Instant>,
    /// Since when replies have waited for the client to read (its write timeout runs).
    write_stalled: Option<tokio::time::Instant>,
    /// Bytes were written since the last flush (TLS keeps them until flushed).
    unflushed: bool,
    closing: bool,
    /// Resolves when the server begins to shut down (see [`Stop`]).
    stop: Stop,
    /// The configuration in force, checked for a reload once per request, not loaded anew.
    live: LiveView,
}

/// The server's shutdown signal as one client sees it. A pending `watch::changed()` takes
/// the channel's waiter lock each time it is polled — one lock shared by every client on
/// every core, taken on every turn of every client's loop. So the waiter is made once and
/// polled again only when the channel has changed (a lock-free version check) or the task's
/// waker is not the one it registered.
struct Stop {
    changed: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    probe: watch::Receiver<bool>,
    armed: Option<std::task::Waker>,
}

impl Stop {
    fn new(shutdown: watch::Receiver<bool>) -> Stop {
        let probe = shutdown.clone();
        Stop {
            changed: Box::pin(async move {
                let mut shutdown = shutdown;
                let _ = shutdown.changed().await;
            }),
            probe,
            armed: None,
        }
    }

    fn poll(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        let registered = self.armed.as_ref().is_some_and(|w| w.will_wake(cx.waker()));
        // A closed channel counts as changed: the waiter then completes, as it always did.
        if registered && !self.probe.has_changed().unwrap_or(true) {
            return std::task::Poll::Pending;
        }
        let polled = self.changed.as_mut().poll(cx);
        if polled.is_pending() {
            self.armed = Some(cx.waker().clone());
        }
        polled
    }

    /// Resolves once the server is shutting down.
    fn wait(&mut self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| self.poll(cx))
    }
}

impl Connection {
    /// A client on `stream`, from `peer` (for `CLIENT LIST`-style reporting).
    pub fn new(
        ctx: Arc<Context>,
        stream: ClientStream,
        peer: Option<std::net::SocketAddr>,
        shutdown: watch::Receiver<bool>,
    ) -> Connection {
        let addr = peer.map(|a| a.to_string()).unwrap_or_default();
        let id = ctx.next_client_id();
        let budget = Arc::new(ReplyBudget::default());
        let authed = ctx.users.default_authed();
        let user = Arc::clone(ctx.users.default_user());
        let live = ctx.live.view();
        Connection {
            ctx,
            stream,
            // Buffers grow with use: 10,000 idle clients must not cost 32 KiB each.
            inbuf: BytesMut::new(),
            outbuf: BytesMut::new(),
            parser: RequestParser::default(),
            session: Session::new(id, addr, user, authed),
            outq: ReplyQueue::new(Arc::clone(&budget)),
            ded: None,
            run: Run::default(),
            deferred_multi: false,
            muting: false,
            budget,
            soft_since: None,
            write_stalled: None,
            unflushed: false,
            closing: false,
            stop: Stop::new(shutdown),
            live,
        }
    }

    /// Serves the client until it leaves, misbehaves, or the server shuts down.
    ///
    /// Boxed: an `async fn` keeps its by-value arguments twice in its future (the argument
    /// and the local it is moved into, rust-lang/rust#62958), so a `Connection` taken by
    /// value made every client's task hold two of them, idle clients' included.
    pub async fn run(mut self: Box<Self>) {
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
        let max_pipeline = self.ctx.config().limits.max_pipeline;
        let write_limit = Duration::from_millis(self.ctx.config().limits.client_write_timeout_ms);
        loop {
            let held = self.process_input().await;
            self.drain_ready();
            self.flush_dedicated();
            let soft_deadline = self.check_output_limit()?;
            self.write_now()?;
            if self.closing && self.outq.is_empty() && self.all_written() {
                return Ok(());
            }
            let can_read = !self.closing && self.outq.len() < max_pipeline;
            if held && can_read {
                // Requests already read wait at the pipeline limit, and their turn has come:
                // nothing would wake the loop for bytes it already holds.
                continue;
            }
            if can_read && self.inbuf.capacity() - self.inbuf.len() < 512 {
                // Small until the client sends more than small requests.
                let grow = if self.inbuf.capacity() < 4096 {
                    1024
                } else {
                    16 * 1024
                };
                self.inbuf.reserve(grow);
            }
            let idle_deadline = self.idle_limit().map(|d| tokio::time::Instant::now() + d);
            let write_deadline = self.write_stalled.map(|t| t + write_limit);
            // Timers without a deadline are not polled at all. In a fixed order rather than
            // a random one (a random draw per poll, twice a request for a client that sends
            // one at a time): what must end the loop first, then the front reply before more
            // input — reading never starves, since the requests whose replies keep the front
            // busy are the client's own, and finite — then the timers.
            let event = tokio::select! {
                biased;
                _ = self.stop.wait(), if !self.closing => Event::Shutdown,
                _ = self.budget.wait_exceeded() => Event::OutputLimit,
                f = front_event(&mut self.outq) => Event::Front(f),
                io = client_io(&mut self.stream, &mut self.inbuf, &self.outbuf, self.unflushed, can_read) => Event::Client(io),
                io = dedicated_io(&mut self.ded) => Event::Dedicated(io),
                _ = sleep_until_some(soft_deadline), if soft_deadline.is_some() => Event::OutputLimit,
                _ = sleep_until_some(write_deadline), if write_deadline.is_some() => return Err(write_timeout()),
                _ = sleep_until_some(idle_deadline), if idle_deadline.is_some() => {
                    tracing::debug!(client = self.session.id, "idle timeout");
                    return Ok(());
                }
            };
            match event {
                Event::Client(ClientIo::Read(Ok(0))) => return Ok(()),
                Event::Client(ClientIo::Read(Ok(_))) => {}
                Event::Client(ClientIo::Wrote(r)) => self.wrote(r)?,
                Event::Client(ClientIo::Flushed(r)) => {
                    r?;
                    self.unflushed = false;
                }
                Event::Client(ClientIo::Read(Err(e))) => return Err(e),
                Event::Front(done) => self.resolve_front(done, Instant::now()),
                Event::Dedicated(DedicatedIo::Read(r)) => self.on_dedicated_read(r),
                Event::Dedicated(DedicatedIo::Wrote(r)) => self.dedicated_wrote(r),
                Event::Dedicated(DedicatedIo::Flushed(r)) => self.dedicated_flushed(r),
                Event::Shutdown => self.closing = true,
                Event::OutputLimit => {
                    self.check_output_limit()?;
                }
            }
        }
    }

    /// Writes what the client socket takes now, without waiting: replies leave as soon as
    /// they are ready, and the rest goes out from `serve`'s select while requests are still
    /// read.
    fn write_now(&mut self) -> std::io::Result<()> {
        while !self.outbuf.is_empty() {
            match futures::FutureExt::now_or_never(self.stream.write(&self.outbuf)) {
                Some(r) => self.wrote(r)?,
                None => break,
            }
        }
        if self.outbuf.is_empty() && self.unflushed {
            if let Some(r) = futures::FutureExt::now_or_never(self.stream.flush()) {
                r?;
                self.unflushed = false;
            }
        }
        // The write timeout runs while anything is unwritten, a TLS flush included, and
        // starts again at each write that makes progress (`wrote`).
        if self.all_written() {
            self.write_stalled = None;
        } else if self.write_stalled.is_none() {
            self.write_stalled = Some(tokio::time::Instant::now());
        }
        Ok(())
    }

    /// Accounts for a write to the client: the bytes leave the output buffer and the budget,
    /// and the client's write timeout starts again.
    fn wrote(&mut self, r: std::io::Result<usize>) -> std::io::Result<()> {
        let n = r?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        self.outbuf.advance(n);
        self.budget.release(n);
        self.unflushed = true;
        self.write_stalled = None;
        Ok(())
    }

    /// Every reply buffered has reached the socket (and, over TLS, left the TLS layer).
    fn all_written(&self) -> bool {
        self.outbuf.is_empty() && !self.unflushed
    }

    /// Applies the output limit of the client's class (normal, pubsub, or replica for MONITOR,
    /// as in Valkey): an error past the hard limit, or past the soft one for its grace period;
    /// otherwise when the soft limit's grace ends, if it is running.
    fn check_output_limit(&mut self) -> std::io::Result<Option<Instant>> {
        let limits = &self.live.load().config().limits.client_output_buffer_limit;
        let class = if self.session.monitor {
            limits.replica
        } else if self.session.subscribed {
            limits.pubsub
        } else {
            limits.normal
        };
        self.budget.set_hard_limit(class.hard as usize);
        let held = self.budget.held() as u64;
        if self.budget.is_exceeded() || (class.hard != 0 && held > class.hard) {
            return Err(self.output_limit_error());
        }
        if class.soft == 0 || held <= class.soft {
            self.soft_since = None;
            return Ok(None);
        }
        let since = *self.soft_since.get_or_insert_with(Instant::now);
        let deadline = since + Duration::from_secs(class.soft_secs);
        if Instant::now() >= deadline {
            return Err(self.output_limit_error());
        }
        Ok(Some(deadline))
    }

    fn output_limit_error(&self) -> std::io::Error {
        inc(&self.ctx.metrics.output_limit_disconnects);
        tracing::warn!(
            client = self.session.id,
            addr = %self.session.addr,
            held = self.budget.held(),
            "client closed for passing its output buffer limit (limits.client_output_buffer_limit)"
        );
        std::io::Error::other("client output buffer limit reached")
    }

    /// A reply enters the output queue: it is charged to the client's budget.
    fn ready(&self, b: Bytes) -> Slot {
        self.charged(Slot::Ready(b))
    }

    /// Something that is not a reply to a command (a message, a push), charged likewise.
    fn push(&self, b: Bytes) -> Slot {
        self.charged(Slot::Push(b))
    }

    /// Charges a slot that has just become ready (others are charged when they do).
    fn charged(&self, s: Slot) -> Slot {
        self.outq.charged(s)
    }

    /// How long this client may stay idle now: `limits.timeout_secs`, unless it waits on
    /// something (replies in flight or not yet read, subscriptions, a blocking command) —
    /// Valkey exempts those; a client slow to read is `client_write_timeout_ms`'s concern.
    fn idle_limit(&mut self) -> Option<std::time::Duration> {
        let secs = self.live.load().config().limits.timeout_secs;
        let busy = !self.outq.is_empty()
            || !self.all_written()
            || self.session.streaming()
            || self.ded.is_some();
        (secs > 0 && !busy).then(|| std::time::Duration::from_secs(secs))
    }

    /// Parses and dispatches every complete request buffered, up to the pipeline limit.
    /// Returns whether it stopped at that limit rather than at the end of the input (the
    /// rest is taken once replies have left: see `serve`).
    async fn process_input(&mut self) -> bool {
        let (limits, max_pipeline) = {
            let live = self.live.load();
            (live.limits(), live.config().limits.max_pipeline)
        };
        while !self.closing && self.outq.len() < max_pipeline {
            match self
                .parser
                .parse(&mut self.inbuf, &limits, self.session.authed)
            {
                Ok(Parsed::Request(req)) => {
                    let slots = self.outq.len();
                    let before = self.session.reply_mode;
                    if before == ReplyMode::Skip {
                        // SKIP covers this one command; one it sets again covers the next.
                        self.session.reply_mode = ReplyMode::On;
                    }
                    let live = self.live.load();
                    let action = command::dispatch(&self.ctx, live, &mut self.session, req);
                    self.muting = self.mutes(before);
                    self.apply(action).await;
                    self.command_done(slots);
                }
                Ok(Parsed::Incomplete) => {
                    self.send_run();
                    return false;
                }
                Err(e) => {
                    let slot = self.ready(crate::error::protocol_error(&e));
                    self.outq.push_back(slot);
                    self.outq.command_reply(false);
                    self.closing = true;
                }
            }
        }
        self.send_run();
        !self.closing
    }

    /// A command was applied: the reply slot it added (if any; `slots` were there before)
    /// is muted or not as `CLIENT REPLY` said.
    fn command_done(&mut self, slots: usize) {
        if self.outq.len() > slots {
            self.outq.command_reply(self.muting);
        }
        self.muting = false;
    }

    /// Hands the run of pass-through requests gathered so far to the shared connection.
    fn send_run(&mut self) {
        if let Some(run) = self.run.take() {
            let up = &self.ctx.upstream;
            up.forward_run(self.session.id, run.proto, run.raw, run.owed, &self.budget);
        }
    }

    /// Whether the reply of the command just dispatched is dropped (`CLIENT REPLY`), given the
    /// reply mode `before` it: `CLIENT REPLY ON` is answered, `OFF` and `SKIP` are not, as in
    /// Valkey; any other command gets no reply while replies are off or skipped. A refused
    /// `CLIENT REPLY` asked for nothing, so it is judged by the mode as it was. (`RESET` turns
    /// replies back on before answering, in `reset`.)
    fn mutes(&mut self, before: ReplyMode) -> bool {
        match self.session.reply_asked.take() {
            Some(ReplyMode::On) => false,
            Some(_) => true,
            None => before != ReplyMode::On,
        }
    }

    fn push_reply(&mut self, r: Reply) {
        if let Reply::Raw(b) = r {
            let slot = self.ready(b);
            self.outq.push_back(slot);
            return;
        }
        if self.outq.is_empty() {
            // Nothing is waiting before it: straight into the output buffer, no slot needed.
            if r.is_error() {
                inc(&self.ctx.metrics.errors);
            }
            if self.muting {
                return;
            }
            let before = self.outbuf.len();
            r.encode(self.session.proto, &mut self.outbuf);
            self.budget.charge(self.outbuf.len() - before);
            return;
        }
        let mut b = BytesMut::new();
        r.encode(self.session.proto, &mut b);
        let slot = self.ready(b.freeze());
        self.outq.push_back(slot);
    }

    async fn apply(&mut self, action: Action) {
        if self.joins_run_now(&action) {
            // The usual pass-through request, without `forward`'s future.
            self.join_action(action);
            return;
        }
        if !matches!(action, Action::Forward { .. }) {
            // Whatever this is may reach Valkey (or wait): the requests before it go first.
            self.send_run();
        }
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
                _ => {
                    let live = self.live.load();
                    let checked =
                        command::dispatch_checked(&self.ctx, live, &mut self.session, req);
                    if self.joins_run_now(&checked) {
                        self.join_action(checked);
                        return;
                    }
                    checked
                }
            },
            a => a,
        };
        match action {
            Action::Check { .. } => self.push_reply(Refusal::CheckFailed.reply()),
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
            Action::Read(begin, stats) => self.read(begin, stats).await,
            Action::Task(fut) => {
                let h = tokio::spawn(fut);
                self.outq.push_back(Slot::Task(h, self.session.proto));
            }
            Action::Reset => self.reset().await,
        }
    }

    /// A cached read as the cache began it: an L1 hit is a reply now, a lookup is sent, a
    /// fill (the cache bypassed) runs as a task.
    async fn read(&mut self, begin: Begin, stats: Option<Arc<QueryStats>>) {
        match begin {
            Begin::Hit(frame) => {
                self.observe_read(CacheStatus::L1Hit, Duration::ZERO, stats.as_deref());
                self.push_reply(Reply::Raw(frame));
            }
            // Boxed: only a read that missed the L1 sends a lookup, and inline its state
            // would size every client's task (an L1 hit never awaits it).
            Begin::Lookup(l) => Box::pin(self.lookup(l.request, l.pending)).await,
            Begin::Fill(fill) => {
                let (proto, now) = (self.session.proto, Instant::now());
                let slot = self.read_step(Step::Fill(fill), proto, now, stats);
                self.outq.push_back(slot);
            }
        }
    }

    /// Times a cached read by how it was answered: a lookup alone as a hit, a fill as a miss;
    /// in the process-wide histograms and in its query's figures.
    fn observe_read(&self, status: CacheStatus, took: Duration, stats: Option<&QueryStats>) {
        let latency = &self.ctx.metrics.latency;
        let hit = status.is_hit();
        if hit {
            latency.hit.observe(took);
        } else {
            latency.miss.observe(took);
        }
        if let Some(s) = stats {
            s.observe(hit, status == CacheStatus::Error, took);
        }
    }

    /// The slot for a cached read's next step: a hit is a ready reply (not yet charged), a
    /// fill runs as a task.
    fn read_step(
        &self,
        step: Step,
        proto: Proto,
        started: Instant,
        stats: Option<Arc<QueryStats>>,
    ) -> Slot {
        match step {
            Step::Reply(frame, status) => {
                self.observe_read(status, started.elapsed(), stats.as_deref());
                Slot::Ready(frame)
            }
            Step::Fill(fill) => Slot::Read {
                task: tokio::spawn(fill),
                proto,
                started,
                stats,
            },
        }
    }

    /// Sends a cached command's lookup, in request order. While the client holds a dedicated
    /// connection on the cache's database, the lookup goes there too, behind the client's own
    /// writes (untracked: its hit does not enter the L1).
    async fn lookup(&mut self, request: Bytes, pending: Pending) {
        let (request, pending) = pending.sendable(request, self.outq.is_empty());
        let cache_db = self.ctx.upstream.endpoint().db;
        let streaming = self.session.streaming();
        let same_node = |ded: &Dedicated| match &self.ctx.upstream.cluster {
            Some(c) => c.addr_for_key(pending.key().as_bytes()).as_deref() == Some(&ded.conn.addr),
            None => true,
        };
        match self.ded.as_mut() {
            Some(ded)
                if !streaming
                    && ded.as_user.is_none()
                    && self.session.db == cache_db
                    && ded.conn.proto == pending.proto()
                    && same_node(ded) =>
            {
                let (request, pending) = pending.plain();
                ded.wbuf.extend_from_slice(&request);
                ded.pending += 1;
                ded.unsent += 1;
                self.outq.push_back(Slot::Dedicated {
                    transform: Transform::None,
                    proto: pending.proto(),
                    reset: false,
                    lookup: Some(pending),
                    exec: None,
                    _long: None,
                });
            }
            _ => {
                let up = &self.ctx.upstream;
                let (id, proto) = (self.session.id, pending.proto());
                let mut pending = pending;
                let tee = pending.tee();
                let tracked = pending.wants_tracking().then(|| {
                    let key = pending.key().as_bytes();
                    up.send_tracked(id, proto, request.clone(), key, &self.budget, tee)
                });
                let started = Instant::now();
                let (rx, pending) = match tracked.flatten() {
                    Some(rx) => (rx, pending),
                    None => {
                        let key = pending.key().as_bytes();
                        let rx = up.send_key(id, proto, request, key, &self.budget).await;
                        (rx, pending.untracked())
                    }
                };
                self.outq.push_back(Slot::Lookup {
                    rx,
                    pending,
                    started,
                });
            }
        }
    }

    /// Whether a request the client may send on any connection goes on its dedicated one:
    /// one of the client's protocol that is logged in as it needs, or with replies pending.
    fn holds_dedicated(&self) -> bool {
        let proto = self.session.proto;
        let held = self.ded.as_ref().is_some_and(|d| d.conn.proto == proto);
        if held && !self.ded_logged_in_as_user() && !self.session.needs_dedicated() {
            // The client logged in as another user since: a connection of the right login.
            return self.ded.as_ref().is_some_and(|d| d.pending > 0);
        }
        held
    }

    /// A pass-through request that does not join the client's run (see
    /// [`Connection::joins_run_now`], asked before this is reached).
    async fn forward(&mut self, req: Request, route: Route, transform: Transform) {
        inc(&self.ctx.metrics.passthrough);
        let proto = self.session.proto;
        let mut held = self.holds_dedicated();
        match self.cluster_forward(&req, route, &transform, held) {
            ClusterStep::Done => return,
            ClusterStep::Shared => held = false,
            ClusterStep::Continue => {}
        }
        self.send_run();
        if route == Route::Any && !held {
            let rx = self
                .ctx
                .upstream
                .forward(self.session.id, proto, &req, &self.budget)
                .await;
            self.outq.push_back(Slot::Upstream {
                rx: Answer::One(rx),
                transform,
                proto,
                started: Instant::now(),
            });
            return;
        }
        if !held {
            // Boxed: connecting (TLS included) is a large future, and every idle client's
            // task would otherwise be sized for it.
            if let Err(e) = Box::pin(self.acquire_dedicated(&req.args)).await {
                if matches!(e, Error::Upstream(_)) {
                    inc(&self.ctx.metrics.upstream_errors);
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
        if route == Route::AsUser && !self.ded_logged_in_as_user() {
            if self.session.in_multi {
                self.session.multi_failed = true;
            }
            self.push_reply(Refusal::NoTwin.reply());
            return;
        }
        let change = match route {
            Route::Dedicated(c) => c,
            Route::Any | Route::AsUser => StateChange::None,
        };
        let mut exec = None;
        if change == StateChange::EndMulti && req.name().eq_ignore_ascii_case(b"EXEC") {
            exec = Some(std::mem::take(&mut self.session.queued));
        }
        self.apply_state_change(change);
        let streaming = self.session.streaming();
        let Some(ded) = self.ded.as_mut() else { return };
        ded.wbuf.extend_from_slice(&req.raw);
        if !streaming {
            ded.pending += 1;
            ded.unsent += 1;
            self.outq.push_back(Slot::Dedicated {
                transform,
                proto,
                reset: false,
                lookup: None,
                exec,
                _long: self.ctx.upstream.long_mark(&req.raw),
            });
        } else if let Transform::Replace(ours) = transform {
            // HELLO while subscribed (RESP3): Valkey's reply is the next frame that is not a
            // push; the client gets cachefront's own instead.
            ded.swallow += 1;
            self.budget.charge(ours.len());
            self.outq.push_back(Slot::Ready(ours));
        }
    }

    /// Whether `action` is a pass-through request that joins the client's run (see
    /// `connection::run`; looked at, not moved: every other action goes on as it is): one
    /// for a shared connection, on a single server, that is not long work (Valkey may be
    /// busy with that for long, and the shared connection must know it is).
    fn joins_run_now(&self, action: &Action) -> bool {
        matches!(action, Action::Forward { req, route, .. }
            if *route == Route::Any
                && self.ctx.upstream.runs()
                && !self.holds_dedicated()
                && !crate::upstream::is_long_name(req.name()))
    }

    /// Adds a pass-through request that joins the run ([`Connection::joins_run_now`]) to it.
    fn join_action(&mut self, action: Action) {
        if let Action::Forward { req, transform, .. } = action {
            inc(&self.ctx.metrics.passthrough);
            self.join_run(req.raw, transform, self.session.proto);
        }
    }

    /// Adds a pass-through request's encoding to the client's run.
    fn join_run(&mut self, raw: bytes::Bytes, transform: Transform, proto: Proto) {
        if !self.run.takes(proto) {
            self.send_run();
        }
        let (inbox, started) = self.run.add(raw, proto);
        self.outq.push_back(Slot::Upstream {
            rx: Answer::Inbox(inbox),
            transform,
            proto,
            started,
        });
    }

    /// Whether the dedicated connection is logged in as the session's user would need: its
    /// Valkey ACL twin for a restricted user, cachefront's own login otherwise.
    fn ded_logged_in_as_user(&self) -> bool {
        let restricted = !self.session.user.unrestricted();
        self.ded.as_ref().is_some_and(|d| match &d.as_user {
            Some(name) => restricted && *name == crate::acl::mirror_name(&self.session.user.name),
            None => !restricted,
        })
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
        let Some(cluster) = self.ctx.upstream.cluster.as_ref() else {
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
                    Refusal::ExecAbort.reply()
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
            self.push_reply(Refusal::CrossSlot.reply());
            return ClusterStep::Done;
        }
        ClusterStep::Shared
    }

    async fn acquire_dedicated(&mut self, args: &[Bytes]) -> Result<(), Error> {
        if let Some(old) = self.ded.take() {
            // Held in another protocol after HELLO.
            let quiet = old.pending == 0 && old.wbuf.is_empty();
            self.ctx.upstream.release(self.session.id, old.conn, quiet);
        }
        let user = &self.session.user;
        let mirror = (!user.unrestricted()).then(|| {
            let salt = self.ctx.upstream.endpoint().password.clone();
            user.mirror(
                self.ctx.upstream.command_table_now().as_deref(),
                salt.unwrap_or_default().as_bytes(),
            )
        });
        let login = mirror.as_ref().map(|m| crate::upstream::Login {
            user: &m.name,
            password: &m.secret,
            setup: &m.setuser,
        });
        let (conn, logged_in) = self
            .ctx
            .upstream
            .dedicated_as(self.session.proto, self.session.id, args, login.as_ref())
            .await?;
        let as_user = mirror.filter(|_| logged_in).map(|m| m.name);
        self.ded = Some(Dedicated {
            conn,
            wbuf: BytesMut::new(),
            pending: 0,
            unsent: 0,
            cleared: 0,
            unflushed: false,
            subs: (0, 0),
            swallow: 0,
            as_user,
        });
        Ok(())
    }

    fn apply_state_change(&mut self, change: StateChange) {
        self.session.apply(change);
        if let (StateChange::Proto(p), Some(d)) = (change, self.ded.as_mut()) {
            d.conn.proto = p;
        }
    }

    /// RESET: Valkey must reset the dedicated connection too (its +RESET is the reply);
    /// without one, the reply is ours.
    async fn reset(&mut self) {
        let authed = self.ctx.users.default_authed();
        let proto = self.session.proto;
        self.session
            .reset(Arc::clone(self.ctx.users.default_user()), authed);
        // Replies are back on (`CLIENT REPLY ON`), RESET's own included, as in Valkey.
        self.muting = false;
        self.deferred_multi = false;
        match self.ded.as_mut() {
            Some(ded) => {
                ded.conn.proto = Proto::Resp2;
                ded.wbuf.extend_from_slice(b"*1\r\n$5\r\nRESET\r\n");
                ded.pending += 1;
                ded.unsent += 1;
                self.outq.push_back(Slot::Dedicated {
                    transform: Transform::None,
                    proto,
                    reset: true,
                    lookup: None,
                    exec: None,
                    _long: None,
                });
            }
            None => self.push_reply(Reply::Simple("RESET")),
        }
    }

    /// Sends what is queued for the dedicated connection — but only once every command sent
    /// earlier over a shared connection has been answered: two connections give no ordering,
    /// and a client's `SET k 1` must reach Valkey before its `MULTI … EXEC` that reads k.
    /// Commands sent over a shared connection *after* the queued ones (a cluster client's
    /// command for another node) do not hold them back: they wait behind them in the reply
    /// queue, so waiting for them would wait forever.
    fn flush_dedicated(&mut self) {
        let Some(ded) = self.ded.as_ref().filter(|d| d.cleared < d.wbuf.len()) else {
            return self.write_dedicated_now();
        };
        let sent = self
            .outq
            .iter()
            .filter(|s| matches!(s, Slot::Dedicated { .. }))
            .count()
            .saturating_sub(ded.unsent);
        let mut dedicated_seen = 0;
        let waiting_on_shared = self
            .outq
            .iter()
            .take_while(|s| {
                let is_ded = matches!(s, Slot::Dedicated { .. });
                dedicated_seen += usize::from(is_ded);
                !(is_ded && dedicated_seen > sent)
            })
            .any(|s| {
                matches!(
                    s,
                    Slot::Upstream { .. }
                        | Slot::Lookup { .. }
                        | Slot::Read { .. }
                        | Slot::Task(..)
                )
            });
        if let Some(ded) = self.ded.as_mut().filter(|_| !waiting_on_shared) {
            ded.cleared = ded.wbuf.len();
            ded.unsent = 0;
        }
        self.write_dedicated_now();
    }

    /// Writes what the dedicated connection's socket takes now, without waiting; the rest
    /// goes out from `serve`'s select.
    fn write_dedicated_now(&mut self) {
        loop {
            let Some(d) = self.ded.as_mut() else { return };
            let r = if d.cleared > 0 {
                let wrote =
                    futures::FutureExt::now_or_never(d.conn.stream.write(&d.wbuf[..d.cleared]));
                match wrote {
                    Some(r) => DedicatedIo::Wrote(r),
                    None => return,
                }
            } else if d.unflushed {
                match futures::FutureExt::now_or_never(d.conn.stream.flush()) {
                    Some(r) => DedicatedIo::Flushed(r),
                    None => return,
                }
            } else {
                return;
            };
            match r {
                DedicatedIo::Wrote(r) => self.dedicated_wrote(r),
                DedicatedIo::Flushed(r) => self.dedicated_flushed(r),
                DedicatedIo::Read(_) => return,
            }
        }
    }

    fn dedicated_wrote(&mut self, r: std::io::Result<usize>) {
        let Some(d) = self.ded.as_mut() else { return };
        match r {
            Ok(n) if n > 0 => {
                d.wbuf.advance(n);
                d.cleared -= n;
                d.unflushed = true;
            }
            Ok(_) => self.dedicated_lost(Error::upstream("Valkey stopped taking commands")),
            Err(e) => {
                self.dedicated_lost(Error::upstream(format!("connection to Valkey lost: {e}")))
            }
        }
    }

    fn dedicated_flushed(&mut self, r: std::io::Result<()>) {
        match r {
            Ok(()) => {
                if let Some(d) = self.ded.as_mut() {
                    d.unflushed = false;
                }
            }
            Err(e) => {
                self.dedicated_lost(Error::upstream(format!("connection to Valkey lost: {e}")))
            }
        }
    }

    /// Moves every reply that is ready at the front of the queue into the output buffer,
    /// settling the front slot's work as it completes.
    fn drain_ready(&mut self) {
        // Read once for every reply settled here (a pipeline's come together).
        let mut now = None;
        loop {
            let errors = self.outq.drain_front(&mut self.outbuf);
            if errors > 0 {
                // A counter every connection shares: not written on the turns that add nothing.
                crate::metrics::add(&self.ctx.metrics.errors, errors as u64);
            }
            match front_done(&mut self.outq) {
                Some(done) => self.resolve_front(done, *now.get_or_insert_with(Instant::now)),
                None => break,
            }
        }
        if matches!(self.outq.front(), Some(Slot::Read { .. })) {
            self.settle_answered_lookups();
        }
    }

    /// While a fill holds up the front of the queue, settles the lookups behind it whose
    /// replies have come (a pipeline's arrive together): a hit becomes its ready reply, a
    /// miss starts its fill now. So a client's pipelined misses fill side by side rather than
    /// each waiting for the one ahead to be answered; replies still leave in request order.
    fn settle_answered_lookups(&mut self) {
        for i in 1..self.outq.len() {
            let Some(Slot::Lookup { rx, .. }) = self.outq.get_mut(i) else {
                continue;
            };
            let r = match rx.try_recv() {
                Ok(r) => r,
                Err(tokio::sync::oneshot::error::TryRecvError::Empty) => continue,
                Err(_) => Err(reply_lost()),
            };
            let Slot::Lookup {
                pending, started, ..
            } = std::mem::replace(&mut self.outq[i], Slot::Ready(Bytes::new()))
            else {
                continue;
            };
            // As at the front: the shared connection charged the frame; what replaces it is
            // charged anew.
            self.release_shared(&r);
            let settled = self.looked_up(pending, r, started);
            self.outq[i] = self.charged(settled);
        }
    }

    /// Turns the front slot's completed work into a ready reply (or, for a cache miss, a fill);
    /// `now`: when it was found completed, for its latency.
    fn resolve_front(&mut self, done: FrontDone, now: Instant) {
        let Some(front) = self.outq.pop_front() else {
            return;
        };
        // A shared connection charged the frame it read: passed on as it came, the charge
        // stands; whatever replaces it is charged anew.
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
                    inc(&self.ctx.metrics.upstream_errors);
                }
                self.ctx
                    .metrics
                    .latency
                    .passthrough
                    .observe(now.saturating_duration_since(started));
                match (transform, r) {
                    // Passed on as it came: it leaves now, the front slot with it.
                    (Transform::None, Ok(frame)) => {
                        if self.outq.send_front_reply(&frame, &mut self.outbuf) {
                            inc(&self.ctx.metrics.errors);
                        }
                        return;
                    }
                    (transform, r) => {
                        self.release_shared(&r);
                        self.ready(transform.apply(&self.ctx, proto, r).into_bytes(proto))
                    }
                }
            }
            (
                Slot::Lookup {
                    pending, started, ..
                },
                FrontDone::Upstream(r),
            ) => {
                self.release_shared(&r);
                let s = self.looked_up(pending, r, started);
                self.charged(s)
            }
            (Slot::Task(_, proto), FrontDone::Joined(reply)) => self.ready(reply.into_bytes(proto)),
            (
                Slot::Read {
                    proto,
                    started,
                    stats,
                    ..
                },
                FrontDone::Read(reply, status),
            ) => {
                let took = now.saturating_duration_since(started);
                self.observe_read(status, took, stats.as_deref());
                self.ready(reply.into_bytes(proto))
            }
            (other, done) => {
                if let FrontDone::Upstream(r) = &done {
                    self.release_shared(r);
                }
                other
            }
        };
        self.outq.push_front(next);
    }

    /// Releases what a shared connection charged for the frame it read.
    fn release_shared(&self, r: &crate::error::Result<Bytes>) {
        if let Ok(f) = r {
            self.budget.release(f.len());
        }
    }

    /// A lookup's reply (or the failure to get one), through the cache's decision: the hit,
    /// or the fill that answers.
    fn looked_up(
        &self,
        pending: Pending,
        r: crate::error::Result<Bytes>,
        started: Instant,
    ) -> Slot {
        let proto = pending.proto();
        let stats = pending.stats().cloned();
        let step = self.ctx.cache.finish(pending, r);
        self.read_step(step, proto, started, stats)
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
        if !is_push && ded.swallow > 0 {
            ded.swallow -= 1;
            return;
        }
        let frame = match &self.ctx.upstream.cluster {
            Some(c) if crate::upstream::mux::parse_redirect(&frame).is_some() => {
                // The slot moved while this connection is bound to its node.
                c.refresh_soon();
                Refusal::TryAgain.frame()
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
                        let slot = self.push(frame);
                        self.outq.insert(i, slot);
                        return;
                    }
                }
                ded.pending -= 1;
                let filled = match self.outq.remove(i) {
                    Some(Slot::Dedicated {
                        lookup: Some(pending),
                        ..
                    }) => {
                        let s = self.looked_up(pending, Ok(frame), Instant::now());
                        self.charged(s)
                    }
                    Some(Slot::Dedicated {
                        transform,
                        proto,
                        exec,
                        ..
                    }) => {
                        if let Some(queued) = exec {
                            self.exec_ran(queued, &frame);
                        }
                        self.ready(
                            transform
                                .apply(&self.ctx, proto, Ok(frame))
                                .into_bytes(proto),
                        )
                    }
                    Some(other) => other,
                    None => return,
                };
                self.outq.insert(i, filled);
            }
            Some(i) => {
                let slot = self.push(frame);
                self.outq.insert(i, slot)
            }
            None => {
                let slot = self.push(frame);
                self.outq.push_back(slot)
            }
        }
    }

    /// EXEC's reply arrived: the state changes of the commands that succeeded take effect. A
    /// subscription entered this way puts the client in subscribed mode, as in Valkey.
    fn exec_ran(&mut self, queued: Vec<StateChange>, frame: &[u8]) {
        let Some(items) = crate::protocol::scan::array_elements(frame) else {
            return; // nil (a WATCHed key changed) or an error: nothing ran
        };
        let ok: Vec<bool> = items
            .iter()
            .map(|i| !matches!(i.first(), Some(b'-') | Some(b'!')))
            .collect();
        let was_subscribed = self.session.subscribed;
        self.session.apply_exec(queued, &ok);
        let Some(ded) = self.ded.as_mut() else { return };
        if self.session.subscribed && !was_subscribed {
            for item in &items {
                match subscription_counts(item) {
                    Some((SubKind::Regular, n)) => ded.subs.0 = n,
                    Some((SubKind::Shard, n)) => ded.subs.1 = n,
                    None => {}
                }
            }
            if ded.subs == (0, 0) {
                // Confirmed out of band (RESP3 pushes): counted as they come.
                ded.subs.0 = 1;
            }
        }
    }

    /// The dedicated connection failed: waiting commands get the error. If Valkey held state
    /// for the client (transaction, subscriptions, tracking, database), that state is gone, so
    /// the client is disconnected after its replies, as it would be by a Valkey restart.
    fn dedicated_lost(&mut self, e: Error) {
        let Some(ded) = self.ded.take() else { return };
        self.ctx.upstream.forget(self.session.id);
        inc(&self.ctx.metrics.upstream_errors);
        tracing::warn!(client = self.session.id, error = %e, "dedicated upstream connection lost");
        let reply = e.to_reply();
        for i in 0..self.outq.len() {
            let filled = match &mut self.outq[i] {
                Slot::Dedicated { lookup, proto, .. } => match lookup.take() {
                    // A lookup that lost its connection is answered from PostgreSQL.
                    Some(pending) => self.looked_up(pending, Err(e.clone()), Instant::now()),
                    None => Slot::Ready(reply.to_bytes(*proto)),
                },
                _ => continue,
            };
            let filled = self.charged(filled);
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
                self.ctx.upstream.release(self.session.id, d.conn, true);
            }
        }
    }

    fn finish(&mut self) {
        if let Some(d) = self.ded.take() {
            let quiet = d.pending == 0 && d.wbuf.is_empty();
            self.ctx.upstream.release(self.session.id, d.conn, quiet);
        }
        self.ctx.upstream.forget(self.session.id);
    }
}

fn write_timeout() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "client did not read its replies (limits.client_write_timeout_ms)",
    )
}

fn joined(r: Result<Reply, tokio::task::JoinError>) -> Reply {
    r.unwrap_or_else(|e| {
        tracing::error!(error = %e, "command task failed");
        Refusal::Internal.reply()
    })
}

/// A cached read's finished fill; a fill task that failed is an internal error.
fn read_joined(r: Result<(Reply, CacheStatus), tokio::task::JoinError>) -> FrontDone {
    match r {
        Ok((reply, status)) => FrontDone::Read(reply, status),
        Err(e) => {
            tracing::error!(error = %e, "cache fill task failed");
            FrontDone::Read(Refusal::Internal.reply(), CacheStatus::Error)
        }
    }
}

/// What the client socket did.
enum ClientIo {
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
    Flushed(std::io::Result<()>),
}

/// Waits until the client socket makes progress either way: replies are written while
/// requests are still read. A client may pipeline without reading its replies (Valkey reads it
/// all the same); if we stopped reading until it read, each side would wait on the other's
/// full buffer. What it may leave unread is bounded by its output limit instead.
fn client_io<'a>(
    stream: &'a mut ClientStream,
    inbuf: &'a mut BytesMut,
    outbuf: &'a [u8],
    unflushed: bool,
    can_read: bool,
) -> impl std::future::Future<Output = ClientIo> + 'a {
    use std::task::Poll;
    use tokio::io::AsyncWrite;
    std::future::poll_fn(move |cx| {
        let mut s = std::pin::Pin::new(&mut *stream);
        if !outbuf.is_empty() {
            if let Poll::Ready(r) = s.as_mut().poll_write(cx, outbuf) {
                return Poll::Ready(ClientIo::Wrote(r));
            }
        } else if unflushed {
            if let Poll::Ready(r) = s.as_mut().poll_flush(cx) {
                return Poll::Ready(ClientIo::Flushed(r));
            }
        }
        if can_read {
            if let Poll::Ready(r) = tokio_util::io::poll_read_buf(s, cx, inbuf) {
                return Poll::Ready(ClientIo::Read(r));
            }
        }
        Poll::Pending
    })
}

/// Sleeps until the deadline, if there is one; forever otherwise.
async fn sleep_until_some<T: Into<tokio::time::Instant>>(deadline: Option<T>) {
    match deadline {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// The front slot's work, if it has completed (without waiting).
fn front_done(outq: &mut VecDeque<Slot>) -> Option<FrontDone> {
    match outq.front_mut()? {
        Slot::Upstream {
            rx: Answer::Inbox(inbox),
            ..
        } => inbox.try_take().map(FrontDone::Upstream),
        Slot::Upstream {
            rx: Answer::One(rx),
            ..
        }
        | Slot::Lookup { rx, .. } => match rx.try_recv() {
            Ok(r) => Some(FrontDone::Upstream(r)),
            Err(tokio::sync::oneshot::error::TryRecvError::Empty) => None,
            Err(_) => Some(FrontDone::Upstream(Err(reply_lost()))),
        },
        Slot::Task(h, ..) if h.is_finished() => {
            futures::FutureExt::now_or_never(h).map(|r| FrontDone::Joined(joined(r)))
        }
        Slot::Read { task, .. } if task.is_finished() => {
            futures::FutureExt::now_or_never(task).map(read_joined)
        }
        _ => None,
    }
}

/// Waits for the front slot's work to complete (never, if it is not waiting on anything).
async fn front_event(outq: &mut VecDeque<Slot>) -> FrontDone {
    match outq.front_mut() {
        Some(Slot::Upstream {
            rx: Answer::Inbox(inbox),
            ..
        }) => FrontDone::Upstream(std::future::poll_fn(|cx| inbox.poll_take(cx)).await),
        Some(Slot::Upstream {
            rx: Answer::One(rx),
            ..
        })
        | Some(Slot::Lookup { rx, .. }) => {
            FrontDone::Upstream(rx.await.unwrap_or_else(|_| Err(reply_lost())))
        }
        Some(Slot::Task(h, ..)) => FrontDone::Joined(joined(h.await)),
        Some(Slot::Read { task, .. }) => read_joined(task.await),
        _ => std::future::pending().await,
    }
}

/// What the dedicated connection's socket did.
enum DedicatedIo {
    Read(std::io::Result<usize>),
    Wrote(std::io::Result<usize>),
    Flushed(std::io::Result<()>),
}

/// Writes the dedicated connection's cleared bytes and reads its replies, whichever the socket
/// is ready for first: a full send buffer never stops the replies from being read.
fn dedicated_io(
    ded: &mut Option<Dedicated>,
) -> impl std::future::Future<Output = DedicatedIo> + '_ {
    use std::task::Poll;
    use tokio::io::AsyncWrite;
    std::future::poll_fn(move |cx| {
        let Some(d) = ded.as_mut() else {
            return Poll::Pending;
        };
        let mut s = std::pin::Pin::new(&mut d.conn.stream);
        if d.cleared > 0 {
            if let Poll::Ready(r) = s.as_mut().poll_write(cx, &d.wbuf[..d.cleared]) {
                return Poll::Ready(DedicatedIo::Wrote(r));
            }
        } else if d.unflushed {
            if let Poll::Ready(r) = s.as_mut().poll_flush(cx) {
                return Poll::Ready(DedicatedIo::Flushed(r));
            }
        }
        if d.conn.rbuf.capacity() - d.conn.rbuf.len() < 4096 {
            d.conn.rbuf.reserve(16 * 1024);
        }
        match tokio_util::io::poll_read_buf(s, cx, &mut d.conn.rbuf) {
            Poll::Ready(r) => Poll::Ready(DedicatedIo::Read(r)),
            Poll::Pending => Poll::Pending,
        }
    })
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
    let items = crate::protocol::value::decode(frame)?.into_array()?;
    let kind = String::from_utf8_lossy(items.first()?.bytes()?).to_ascii_lowercase();
    let count = items.get(2)?.int()?;
    match kind.as_str() {
        "subscribe" | "psubscribe" | "unsubscribe" | "punsubscribe" => {
            Some((SubKind::Regular, count))
        }
        "ssubscribe" | "sunsubscribe" => Some((SubKind::Shard, count)),
        _ => None,
    }
}
#[cfg(test)]
mod tests {
    /// A context from the default configuration (nothing connects until asked).
    fn context() -> std::sync::Arc<crate::command::Context> {
        std::sync::Arc::new(
            crate::command::Context::new(crate::config::Config::default()).expect("context"),
        )
    }

    async fn listener() -> tokio::net::TcpListener {
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
    }

    /// Every client's task is sized for the largest state its future can be in, idle clients
    /// included (10,000 of them is a target): the rare large states (connecting a dedicated
    /// connection, cluster routing, a TLS handshake, a lookup) are boxed so that they cost
    /// only while they run, and the connection itself is held once, in a box of its own.
    /// Boxing the rare states took this from 4,656 bytes to 2,968; holding the connection
    /// once (it was in the future twice) and boxing the lookup, to 1,792 (future and
    /// connection together).
    #[tokio::test]
    async fn an_idle_clients_task_stays_small() {
        let (ctx, l) = (context(), listener().await);
        let _client = tokio::net::TcpStream::connect(l.local_addr().expect("address"))
            .await
            .expect("connect");
        let (s, _) = l.accept().await.expect("accept");
        let (_tx, rx) = tokio::sync::watch::channel(false);
        let conn = super::Connection::new(ctx, super::ClientStream::Plain(s), None, rx);
        let size = std::mem::size_of_val(&Box::new(conn).run()) + size_of::<super::Connection>();
        assert!(
            size <= 2 * 1024,
            "a client's future and connection: {size} bytes"
        );
    }

    /// An idle client's loop, parked with the shutdown signal registered once (see `Stop`),
    /// still wakes when the server starts to shut down, and ends; so does the loop of a
    /// client that connects after the signal was given.
    #[tokio::test]
    async fn an_idle_client_ends_when_the_server_shuts_down() {
        use std::time::Duration;
        let (ctx, l) = (context(), listener().await);
        let addr = l.local_addr().expect("address");
        let (tx, rx) = tokio::sync::watch::channel(false);
        let mut clients = Vec::new();
        let mut runs = Vec::new();
        for _ in 0..2 {
            clients.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
            let (s, _) = l.accept().await.expect("accept");
            let conn = super::Connection::new(
                std::sync::Arc::clone(&ctx),
                super::ClientStream::Plain(s),
                None,
                rx.clone(),
            );
            runs.push(tokio::spawn(Box::new(conn).run()));
            if runs.len() == 1 {
                // The first one has parked on its select before the signal.
                tokio::time::sleep(Duration::from_millis(50)).await;
                assert!(!runs[0].is_finished());
                tx.send(true).expect("signal");
            }
        }
        for run in runs {
            tokio::time::timeout(Duration::from_secs(5), run)
                .await
                .expect("ended on shutdown")
                .expect("no panic");
        }
    }
}
