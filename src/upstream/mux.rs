//! A shared, pipelined connection to Valkey: requests from many clients go out in one stream
//! and replies come back in the same order, so each is matched to its sender by position.
//!
//! Each `Mux` is one actor task that owns its socket and reconnects by itself. A connection
//! that errors or stops answering within the command timeout is dropped with every request
//! still pending on it failed — a late reply can then never be matched to the wrong request.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};

use super::conn::{connect, Endpoint, RawConn};
use super::inbox::{Owed, ReplyTo};
use super::tracking::TrackingState;
use crate::error::{Error, Result};
use crate::protocol::Proto;

/// The reply to one forwarded request: the raw frame, or why there is none.
pub type ReplyRx = oneshot::Receiver<Result<Bytes>>;

/// Shown a request's reply as the shared connection reads it, before the requester gets it
/// (the cache's lookups that other reads wait for, see `cache::flight`); dropped unshown if
/// the request gets no reply.
pub type Tee = Box<dyn FnOnce(&Bytes) + Send>;

/// What a client holds in replies not yet written to its socket, against its output limit
/// (Valkey's `client-output-buffer-limit`). Replies are charged where they come into being —
/// here, by the shared connection that reads them, before they are handed over — so a client
/// that pipelines many large reads without reading replies is cut off at the limit, not after
/// the proxy has buffered them all. The client's connection releases bytes as it writes them.
#[derive(Debug, Default)]
pub struct ReplyBudget {
    held: AtomicUsize,
    /// The hard limit in bytes (0: none).
    hard: AtomicUsize,
    over: AtomicBool,
    /// The client's connection task, woken when a limit is passed. A waker slot rather than a
    /// `Notify`: the connection polls it on every turn of its loop, and registering again
    /// with the same waker costs two atomics, no lock and no allocation.
    exceeded: futures::task::AtomicWaker,
}

impl ReplyBudget {
    /// Adds `n` bytes; false (and the budget marked exceeded) if that passes the hard limit.
    pub fn charge(&self, n: usize) -> bool {
        let held = self.held.fetch_add(n, Ordering::Relaxed) + n;
        let hard = self.hard.load(Ordering::Relaxed);
        if hard != 0 && held > hard {
            self.mark_exceeded();
            return false;
        }
        true
    }

    /// `n` bytes were written to the client (or dropped).
    pub fn release(&self, n: usize) {
        let _ = self
            .held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |h| {
                Some(h.saturating_sub(n))
            });
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    pub fn set_hard_limit(&self, bytes: usize) {
        self.hard.store(bytes, Ordering::Relaxed);
    }

    /// The client is to be disconnected (a limit was passed).
    pub fn mark_exceeded(&self) {
        self.over.store(true, Ordering::Release);
        self.exceeded.wake();
    }

    pub fn is_exceeded(&self) -> bool {
        self.over.load(Ordering::Acquire)
    }

    /// Resolves once a limit has been passed.
    pub fn wait_exceeded(&self) -> impl std::future::Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.exceeded.register(cx.waker());
            match self.is_exceeded() {
                true => std::task::Poll::Ready(()),
                false => std::task::Poll::Pending,
            }
        })
    }
}

/// Requests in flight to one Valkey server that can keep it busy for long (see [`is_long`]).
/// Valkey runs one command at a time: while such a request runs, every connection to it is
/// silent, and that silence is not a dead connection. Counted by [`LongMark`]s, so a request
/// that is answered, failed or dropped in any way stops counting.
#[derive(Debug, Default)]
pub struct LongWork(AtomicUsize);

impl LongWork {
    pub fn busy(&self) -> bool {
        self.0.load(Ordering::Relaxed) > 0
    }

    /// A mark for `raw` if it is a long request.
    pub fn mark_if_long(self: &Arc<Self>, raw: &[u8]) -> Option<LongMark> {
        is_long(raw).then(|| {
            self.0.fetch_add(1, Ordering::Relaxed);
            LongMark(Arc::clone(self))
        })
    }
}

/// One long request in flight; counted until dropped.
pub struct LongMark(Arc<LongWork>);

impl Drop for LongMark {
    fn drop(&mut self) {
        self.0 .0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Commands besides scripts ([`super::SCRIPT_COMMANDS`]) that can legitimately keep Valkey busy
/// past the command timeout: DEBUG (SLEEP), whole-keyspace and bulk commands.
const LONG_COMMANDS: &[&[u8]] = &[
    b"DEBUG",
    b"KEYS",
    b"FLUSHALL",
    b"FLUSHDB",
    b"SAVE",
    b"MIGRATE",
    b"SORT",
    b"SORT_RO",
    b"SUNIONSTORE",
    b"SINTERSTORE",
    b"SDIFFSTORE",
    b"ZUNIONSTORE",
    b"ZINTERSTORE",
    b"ZDIFFSTORE",
    b"FUNCTION",
    b"SCRIPT",
];

/// Whether an encoded request (`*N\r\n$L\r\nNAME…`) is a script or one of [`LONG_COMMANDS`].
/// Asked of every request a client sends through a shared connection, so the name is found
/// by hand, without UTF-8 checks or searching.
fn is_long(raw: &[u8]) -> bool {
    command_name(raw).is_some_and(is_long_name)
}

/// Whether a command of this name is a script or one of [`LONG_COMMANDS`] (any case).
pub fn is_long_name(name: &[u8]) -> bool {
    let is = |c: &&[u8]| c.eq_ignore_ascii_case(name);
    LONG_LENGTHS.checked_shr(name.len() as u32).unwrap_or(0) & 1 != 0
        && (LONG_COMMANDS.iter().any(is) || super::SCRIPT_COMMANDS.iter().any(is))
}

/// The lengths of the names [`is_long`] looks for, one bit each: most commands (`GET`,
/// `SET`, `HGET`…) are ruled out by their length alone.
const LONG_LENGTHS: u32 = lengths(LONG_COMMANDS) | lengths(super::SCRIPT_COMMANDS);

const fn lengths(names: &[&[u8]]) -> u32 {
    let mut bits = 0u32;
    let mut i = 0;
    while i < names.len() {
        bits |= 1 << names[i].len();
        i += 1;
    }
    bits
}

/// The command name of an encoded request, if it is at most 16 bytes long (no longer name
/// is of interest).
fn command_name(raw: &[u8]) -> Option<&[u8]> {
    let rest = raw.strip_prefix(b"*")?;
    let count_end = rest.iter().position(|&b| b == b'\r')?;
    let rest = rest.get(count_end..)?.strip_prefix(b"\r\n$")?;
    let mut len = 0usize;
    let mut digits = 0;
    for &b in rest.iter().take_while(|b| b.is_ascii_digit()) {
        len = len * 10 + usize::from(b - b'0');
        digits += 1;
        if len > 16 {
            return None;
        }
    }
    if digits == 0 {
        return None;
    }
    rest.get(digits..)?.strip_prefix(b"\r\n")?.get(..len)
}

/// The error a request gets when its client passed its output limit (the client is being
/// disconnected; nobody reads it).
pub fn over_limit() -> Error {
    Error::upstream("client output buffer limit reached")
}

pub struct Job {
    /// One encoded request, or a client's run of them (see [`Mux::send_run`]).
    pub raw: Bytes,
    pub reply: ReplyTo,
    /// Send as a tracked read (`CLIENT CACHING yes` first) — cachefront's L1 lookups.
    pub tracked: bool,
    /// Cluster: precede with `ASKING` (the slot is being imported by this node).
    pub asking: bool,
    /// Cluster: the client's lane (kept for a redirected resend) and redirects so far.
    pub lane: u64,
    pub hops: u8,
    /// Cluster: the protocol of the connection it was sent on (a resend uses the same).
    pub resp3: bool,
    /// Charged with the reply's size when it arrives (a client's own request).
    pub budget: Option<Arc<ReplyBudget>>,
    /// cachefront's own request (the cache store's): never counted as long work (see
    /// [`LongWork`]), so it is held to the command timeout as the store always was, and a
    /// store script in flight does not stop a dead Valkey from being noticed.
    pub own: bool,
    /// Shown the reply first (see [`Tee`]).
    pub tee: Option<Tee>,
}

/// Cluster: a request Valkey answered with `-MOVED` or `-ASK`, to be sent again elsewhere.
pub struct Redirect {
    pub ask: bool,
    pub slot: u16,
    pub addr: String,
    pub job: Job,
}

/// Tells the shared connections to one server that one of them just connected, so those
/// waiting out a reconnect backoff try again at once: after Valkey comes back, every
/// connection (the cache store's included) works as soon as any does.
#[derive(Debug, Default)]
pub struct Recovered(tokio::sync::Notify);

impl Recovered {
    fn announce(&self) {
        self.0.notify_waiters();
    }
}

/// Handle to one shared connection actor.
pub struct Mux {
    tx: mpsc::UnboundedSender<Job>,
    /// Valkey's version as last seen in a handshake.
    version: Arc<Mutex<String>>,
}

/// A reply slot: `None` for commands cachefront adds itself, whose replies are dropped.
type Pending = Option<Waiter>;

/// Who waits for a reply. In a cluster the request is kept too, to resend it on a redirect.
struct Waiter {
    reply: ReplyTo,
    resend: Option<Resend>,
    budget: Option<Arc<ReplyBudget>>,
    /// Held while a long request waits (see [`LongWork`]).
    _long: Option<LongMark>,
    tee: Option<Tee>,
}

/// What a redirected request needs to be sent again.
struct Resend {
    raw: Bytes,
    lane: u64,
    hops: u8,
    tracked: bool,
    own: bool,
}

const CACHING_YES: &[u8] = b"*3\r\n$6\r\nCLIENT\r\n$7\r\nCACHING\r\n$3\r\nyes\r\n";

/// Largest batch of requests written in one go.
const MAX_BATCH: usize = 64 * 1024;
/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Mux {
    /// Starts the actor. With `redirects` (cluster mode), `-MOVED`/`-ASK` replies are not
    /// delivered but handed there with the request, to be sent to the right node.
    /// `recovered` is shared by every shared connection to the same server.
    pub fn spawn(
        ep: Arc<Endpoint>,
        proto: Proto,
        tracking: Arc<TrackingState>,
        redirects: Option<mpsc::UnboundedSender<Redirect>>,
        (long, recovered): (Arc<LongWork>, Arc<Recovered>),
    ) -> Mux {
        let (tx, rx) = mpsc::unbounded_channel();
        let version = Arc::new(Mutex::new(String::new()));
        let ctx = Ctx {
            ep,
            proto,
            version: Arc::clone(&version),
            tracking,
            redirects,
            long,
            recovered,
        };
        tokio::spawn(actor(ctx, rx));
        Mux { tx, version }
    }

    /// Sends a request again (after a cluster redirect), keeping its reply channel.
    pub fn resend(&self, job: Job) {
        self.push(job);
    }

    /// Queues a request for `lane` (cluster mode: kept for a possible redirect).
    pub fn send_lane(&self, raw: Bytes, lane: u64) -> ReplyRx {
        self.enqueue(raw, false, lane, None, None)
    }

    /// Queues `raw` (one encoded command) and returns where its reply will arrive.
    pub fn send(&self, raw: Bytes) -> ReplyRx {
        self.enqueue(raw, false, 0, None, None)
    }

    /// Queues one of cachefront's own requests (see [`Job::own`]) for `lane`.
    pub fn send_own(&self, raw: Bytes, lane: u64) -> ReplyRx {
        let (reply, rx) = oneshot::channel();
        self.push(Job {
            raw,
            reply: ReplyTo::One(reply),
            tracked: false,
            asking: false,
            lane,
            hops: 0,
            resp3: false,
            budget: None,
            own: true,
            tee: None,
        });
        rx
    }

    /// A client's request: its reply is charged to the client's `budget`.
    pub fn send_for(&self, raw: Bytes, lane: u64, budget: Option<&Arc<ReplyBudget>>) -> ReplyRx {
        self.enqueue(raw, false, lane, budget.cloned(), None)
    }

    /// [`send_for`](Self::send_for) a read whose keys Valkey tracks, for the L1 (see
    /// `upstream::tracking`); `tee`, if any, is shown its reply first.
    pub fn send_tracked(
        &self,
        raw: Bytes,
        lane: u64,
        budget: Option<&Arc<ReplyBudget>>,
        tee: Option<Tee>,
    ) -> ReplyRx {
        self.enqueue(raw, true, lane, budget.cloned(), tee)
    }

    fn enqueue(
        &self,
        raw: Bytes,
        tracked: bool,
        lane: u64,
        budget: Option<Arc<ReplyBudget>>,
        tee: Option<Tee>,
    ) -> ReplyRx {
        let (reply, rx) = oneshot::channel();
        self.push(Job {
            raw,
            reply: ReplyTo::One(reply),
            tracked,
            asking: false,
            lane,
            hops: 0,
            resp3: false,
            budget,
            own: false,
            tee,
        });
        rx
    }

    /// A client's run of pass-through requests, encoded one after another in `raw`, as one
    /// job: its replies go to `owed`'s inbox in order (see `upstream::inbox`). None of them
    /// may be long work (see [`is_long`]): a run is not looked at for it.
    pub fn send_run(&self, raw: Bytes, owed: Owed, lane: u64, budget: &Arc<ReplyBudget>) {
        self.push(Job {
            raw,
            reply: ReplyTo::Many(owed),
            tracked: false,
            asking: false,
            lane,
            hops: 0,
            resp3: false,
            budget: Some(Arc::clone(budget)),
            own: false,
            tee: None,
        });
    }

    /// Hands a job to the actor, or fails it if the actor is gone.
    fn push(&self, job: Job) {
        if let Err(mpsc::error::SendError(job)) = self.tx.send(job) {
            job.reply
                .fail(&Error::upstream("cachefront is shutting down"));
        }
    }

    pub fn server_version(&self) -> String {
        self.version.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// The version the first of `muxes` to complete a handshake saw.
    pub fn any_version<'a>(muxes: impl IntoIterator<Item = &'a Mux>) -> String {
        muxes
            .into_iter()
            .map(Mux::server_version)
            .find(|v| !v.is_empty())
            .unwrap_or_default()
    }
}

/// What one actor works with.
struct Ctx {
    ep: Arc<Endpoint>,
    proto: Proto,
    version: Arc<Mutex<String>>,
    tracking: Arc<TrackingState>,
    redirects: Option<mpsc::UnboundedSender<Redirect>>,
    /// Long requests in flight to this server, on any of its connections.
    long: Arc<LongWork>,
    /// Shared with the server's other shared connections (see [`Recovered`]).
    recovered: Arc<Recovered>,
}

async fn actor(ctx: Ctx, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let ep = &ctx.ep;
    let mut backoff = Duration::from_millis(50);
    loop {
        // Connect only when there is work, so an idle proxy holds no upstream connections
        // it does not need and a dead Valkey costs nothing while nobody asks.
        let Some(first) = jobs.recv().await else {
            return;
        };
        match connect(ep, ctx.proto).await {
            Ok(conn) => {
                backoff = Duration::from_millis(50);
                ctx.recovered.announce();
                if let Ok(mut v) = ctx.version.lock() {
                    v.clone_from(&conn.server_version);
                }
                let outcome = serve(conn, first, &mut jobs, &ctx).await;
                if let Err(e) = outcome {
                    tracing::warn!(error = %e, addr = %ep.addr, "shared upstream connection dropped");
                } else {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach Valkey; failing requests until it is back");
                first.reply.fail(&e);
                fail_for(&mut jobs, backoff, &e, &ctx.recovered).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Fails every request arriving during `period`: while Valkey is unreachable, clients get a
/// prompt `-UPSTREAM` instead of waiting on connect timeouts. Ends early when another
/// connection to the server has connected: Valkey is back.
async fn fail_for(
    jobs: &mut mpsc::UnboundedReceiver<Job>,
    period: Duration,
    e: &Error,
    recovered: &Recovered,
) {
    let until = tokio::time::Instant::now() + period;
    let back = recovered.0.notified();
    tokio::pin!(back);
    loop {
        tokio::select! {
            job = tokio::time::timeout_at(until, jobs.recv()) => match job {
                Ok(Some(job)) => job.reply.fail(e),
                Ok(None) | Err(_) => return,
            },
            () = &mut back => return,
        }
    }
}

/// Runs one live connection until it fails (`Err`) or the pool is dropped (`Ok`).
async fn serve(
    mut conn: RawConn,
    first: Job,
    jobs: &mut mpsc::UnboundedReceiver<Job>,
    ctx: &Ctx,
) -> Result<()> {
    let timeout = ctx.ep.command_timeout;
    let keep = ctx.redirects.is_some();
    let mut pending: VecDeque<Pending> = VecDeque::new();
    // The tracking generation this connection's `CLIENT TRACKING` points at (0: none).
    let mut tracked_gen = 0u64;
    let mut wbuf = BytesMut::with_capacity(16 * 1024);
    // A run's replies read together, on their way to its inbox (see [`deliver`]).
    let mut batch = Vec::new();
    let mut last_progress = Instant::now();
    let mut ticker = tokio::time::interval((timeout / 4).max(Duration::from_millis(20)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = Some(first);
    let result: Result<()> = loop {
        if let Some(job) = next.take() {
            if pending.is_empty() {
                last_progress = Instant::now();
            }
            // This job and whatever else is already queued, up to a batch.
            let mut job = Some(job);
            let mut yielded = false;
            loop {
                while let Some(j) = job.take() {
                    push_job(j, &mut wbuf, &mut pending, &mut tracked_gen, ctx, keep);
                    if wbuf.len() < MAX_BATCH {
                        job = jobs.try_recv().ok();
                    }
                }
                // A lone request: let the other clients' tasks that are ready run first, so
                // their requests share this write (one syscall here, one read in Valkey).
                if yielded || wbuf.len() >= MAX_BATCH {
                    break;
                }
                yielded = true;
                tokio::task::yield_now().await;
                job = jobs.try_recv().ok();
                if job.is_none() {
                    break;
                }
            }
            if let Err(e) = conn.write_all(&wbuf).await {
                break Err(Error::upstream(format!("write to Valkey failed: {e}")));
            }
            wbuf.clear();
        }
        tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => next = Some(job),
                None => break Ok(()),
            },
            read = conn.stream.read_buf(&mut conn.rbuf) => match read {
                Ok(0) => break Err(Error::upstream("Valkey closed the connection")),
                Ok(_) => {
                    last_progress = Instant::now();
                    let redirects = ctx.redirects.as_ref();
                    if let Err(e) = deliver(&mut conn, &mut pending, redirects, &mut batch) {
                        break Err(e);
                    }
                }
                Err(e) => break Err(Error::upstream(format!("read from Valkey failed: {e}"))),
            },
            _ = ticker.tick() => {
                // Silent while a long command runs (here or on another connection) is busy,
                // not dead: the requests wait as they would on Valkey itself.
                if !pending.is_empty() && last_progress.elapsed() > timeout && !ctx.long.busy() {
                    break Err(Error::upstream(format!(
                        "Valkey did not answer within {} ms", timeout.as_millis()
                    )));
                }
            }
        }
    };
    if let Err(e) = &result {
        for w in pending.drain(..).flatten() {
            w.reply.fail(e);
        }
    }
    result
}

/// Appends a job to the write buffer. A tracked read first (re)points this connection's
/// tracking at the current tracking connection if needed, then opts the read in; the replies
/// to those added commands are dropped.
fn push_job(
    job: Job,
    wbuf: &mut BytesMut,
    pending: &mut VecDeque<Pending>,
    tracked_gen: &mut u64,
    ctx: &Ctx,
    keep: bool,
) {
    let tracking = &*ctx.tracking;
    if job.asking {
        wbuf.extend_from_slice(b"*1\r\n$6\r\nASKING\r\n");
        pending.push_back(None);
    }
    if job.tracked {
        let (generation, redirect) = tracking.current();
        if generation != 0 {
            if *tracked_gen != generation {
                let on = crate::protocol::request::encode_multibulk(&[
                    Bytes::from_static(b"CLIENT"),
                    Bytes::from_static(b"TRACKING"),
                    Bytes::from_static(b"on"),
                    Bytes::from_static(b"REDIRECT"),
                    Bytes::from(redirect.to_string()),
                    Bytes::from_static(b"OPTIN"),
                ]);
                wbuf.extend_from_slice(&on);
                pending.push_back(None);
                *tracked_gen = generation;
            }
            wbuf.extend_from_slice(CACHING_YES);
            pending.push_back(None);
        }
    }
    wbuf.extend_from_slice(&job.raw);
    // A run never holds long work (see `Mux::send_run`): nothing of it to look at.
    let long = match (job.own, &job.reply) {
        (true, _) | (_, ReplyTo::Many(_)) => None,
        _ => ctx.long.mark_if_long(&job.raw),
    };
    let resend = keep.then_some(Resend {
        raw: job.raw,
        lane: job.lane,
        hops: job.hops,
        tracked: job.tracked,
        own: job.own,
    });
    pending.push_back(Some(Waiter {
        reply: job.reply,
        resend,
        budget: job.budget,
        _long: long,
        tee: job.tee,
    }));
}

/// Hands every complete buffered frame to the oldest waiting request — or, for a cluster
/// redirect, the request to the router. A run's replies read together are
/// gathered in `batch` (kept by the connection, empty between calls) and reach its inbox
/// together — before its last reply, or when the read is used up, or when a bad frame ends
/// the connection — so a pipeline's replies cost one lock and one wake-up per read, not one
/// each.
fn deliver(
    conn: &mut RawConn,
    pending: &mut VecDeque<Pending>,
    redirects: Option<&mpsc::UnboundedSender<Redirect>>,
    batch: &mut Vec<Result<Bytes>>,
) -> Result<()> {
    let result = deliver_frames(conn, pending, redirects, batch);
    if let Some(Some(w)) = pending.front_mut() {
        w.reply.give_batch(batch);
    }
    result
}

fn deliver_frames(
    conn: &mut RawConn,
    pending: &mut VecDeque<Pending>,
    redirects: Option<&mpsc::UnboundedSender<Redirect>>,
    batch: &mut Vec<Result<Bytes>>,
) -> Result<()> {
    while let Some(frame) = conn.next_buffered()? {
        if frame.first() == Some(&b'>') {
            // An out-of-band push on a shared connection (nothing here subscribes or tracks):
            // never let it be taken for someone's reply.
            continue;
        }
        // A run's replies but its last are gathered for its inbox; the last ends its waiter.
        if let Some(Some(w)) = pending.front_mut() {
            if w.reply.owed() > batch.len() + 1 {
                batch.push(charged(w.budget.as_deref(), frame));
                continue;
            }
            w.reply.give_batch(batch);
        }
        match pending.pop_front() {
            Some(Some(w)) => answer(w, frame, redirects, conn.proto),
            Some(None) => {
                if frame.first() == Some(&b'-') {
                    tracing::debug!(reply = %String::from_utf8_lossy(&frame), "tracking setup refused");
                }
            }
            None => return Err(Error::upstream("unexpected reply from Valkey")),
        }
    }
    Ok(())
}

/// Gives `frame` to its waiter — or, when it is a cluster redirect, the request to the
/// router. Only a cluster's connections keep requests for that: a single server's replies are
/// never parsed for one.
fn answer(
    w: Waiter,
    frame: Bytes,
    redirects: Option<&mpsc::UnboundedSender<Redirect>>,
    proto: Proto,
) {
    let redirect = match (redirects, w.resend) {
        (Some(tx), Some(r)) => parse_redirect(&frame).map(|to| (tx, r, to)),
        _ => None,
    };
    let Some((tx, r, (ask, slot, addr))) = redirect else {
        if let Some(tee) = w.tee {
            tee(&frame);
        }
        deliver_charged(w.reply, w.budget.as_deref(), frame);
        return;
    };
    let job = Job {
        raw: r.raw,
        reply: w.reply,
        tracked: r.tracked,
        asking: false,
        lane: r.lane,
        hops: r.hops,
        resp3: proto == Proto::Resp3,
        budget: w.budget,
        own: r.own,
        // A redirected read is not waited for: whoever waited reads on its own.
        tee: None,
    };
    if let Err(mpsc::error::SendError(r)) = tx.send(Redirect {
        ask,
        slot,
        addr,
        job,
    }) {
        r.job.reply.answer(Ok(frame));
    }
}

/// Hands `frame` over, charged to the client's budget; past the client's limit the frame is
/// dropped here, so a client that does not read cannot make the proxy hold its replies.
fn deliver_charged(reply: ReplyTo, budget: Option<&ReplyBudget>, frame: Bytes) {
    reply.answer(charged(budget, frame));
}

/// `frame`, charged to the client's budget — or, past the client's limit, the error that
/// stands for it.
fn charged(budget: Option<&ReplyBudget>, frame: Bytes) -> Result<Bytes> {
    let len = frame.len();
    match budget {
        Some(b) if !b.charge(len) => {
            b.release(len);
            Err(over_limit())
        }
        _ => Ok(frame),
    }
}

/// `-MOVED 3999 127.0.0.1:6381` or `-ASK 3999 127.0.0.1:6381` → (ask, slot, address).
pub fn parse_redirect(frame: &[u8]) -> Option<(bool, u16, String)> {
    let (ask, rest) = if let Some(r) = frame.strip_prefix(b"-MOVED ") {
        (false, r)
    } else {
        (true, frame.strip_prefix(b"-ASK ")?)
    };
    let text = std::str::from_utf8(rest).ok()?.trim_end();
    let (slot, addr) = text.split_once(' ')?;
    let slot: u16 = slot.parse().ok().filter(|s| *s < 16384)?;
    Some((ask, slot, addr.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(args: &[&[u8]]) -> Bytes {
        crate::protocol::Request::from_args(args.iter().copied()).raw
    }

    /// Scripts and the listed long commands are found whatever their case; everything else,
    /// a name longer than any of them, and anything not a well-formed request are not.
    #[test]
    fn long_requests_are_told_by_their_name() {
        for long in [
            &[b"debug".as_slice(), b"sleep", b"1"][..],
            &[b"EVALSHA", b"abc", b"0"],
            &[b"FLUSHALL"],
            &[b"Keys", b"*"],
            &[b"sunionstore", b"d", b"a", b"b"],
        ] {
            assert!(is_long(&encoded(long)), "{long:?}");
        }
        for short in [
            &[b"GET".as_slice(), b"k"][..],
            &[b"SET", b"k", b"v"],
            &[b"DEBUGX"],
            &[b"a-command-name-over-sixteen-bytes"],
        ] {
            assert!(!is_long(&encoded(short)), "{short:?}");
        }
        for malformed in [
            &b"KEYS *\r\n"[..],
            b"*1\r\n$4\r\nKEY",
            b"*1\r\n$\r\nKEYS\r\n",
            b"*1\r\n$99999999999999999999\r\n",
            b"*1",
            b"",
        ] {
            assert!(!is_long(malformed), "{malformed:?}");
        }
        assert_eq!(command_name(&encoded(&[b"KEYS", b"*"])), Some(&b"KEYS"[..]));
    }
}
