//! A shared, pipelined connection to Valkey: requests from many clients go out in one stream
//! and replies come back in the same order, so each is matched to its sender by position.
//!
//! Each `Mux` is one actor task that owns its socket and reconnects by itself. A connection
//! that errors or stops answering within the command timeout is dropped with every request
//! still pending on it failed — a late reply can then never be matched to the wrong request.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};

use super::conn::{connect, Endpoint, RawConn};
use super::tracking::TrackingState;
use crate::error::{Error, Result};
use crate::protocol::Proto;

/// The reply to one forwarded request: the raw frame, or why there is none.
pub type ReplyRx = oneshot::Receiver<Result<Bytes>>;

struct Job {
    raw: Bytes,
    reply: oneshot::Sender<Result<Bytes>>,
    /// Send as a tracked read (`CLIENT CACHING yes` first) — cachefront's L1 lookups.
    tracked: bool,
}

/// Handle to one shared connection actor.
pub struct Mux {
    tx: mpsc::UnboundedSender<Job>,
    /// Valkey's version as last seen in a handshake.
    version: Arc<Mutex<String>>,
}

/// A reply slot: `None` for commands cachefront adds itself, whose replies are dropped.
type Pending = Option<oneshot::Sender<Result<Bytes>>>;

const CACHING_YES: &[u8] = b"*3\r\n$6\r\nCLIENT\r\n$7\r\nCACHING\r\n$3\r\nyes\r\n";

/// Largest batch of requests written in one go.
const MAX_BATCH: usize = 64 * 1024;
/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

impl Mux {
    pub fn spawn(ep: Arc<Endpoint>, proto: Proto, tracking: Arc<TrackingState>) -> Mux {
        let (tx, rx) = mpsc::unbounded_channel();
        let version = Arc::new(Mutex::new(String::new()));
        tokio::spawn(actor(ep, proto, rx, Arc::clone(&version), tracking));
        Mux { tx, version }
    }

    /// Queues `raw` (one encoded command) and returns where its reply will arrive.
    pub fn send(&self, raw: Bytes) -> ReplyRx {
        self.enqueue(raw, false)
    }

    /// Like `send`, but Valkey tracks the keys read, for the L1 (see `upstream::tracking`).
    pub fn send_tracked(&self, raw: Bytes) -> ReplyRx {
        self.enqueue(raw, true)
    }

    fn enqueue(&self, raw: Bytes, tracked: bool) -> ReplyRx {
        let (reply, rx) = oneshot::channel();
        if let Err(mpsc::error::SendError(job)) = self.tx.send(Job {
            raw,
            reply,
            tracked,
        }) {
            let _ = job
                .reply
                .send(Err(Error::upstream("cachefront is shutting down")));
        }
        rx
    }

    pub fn server_version(&self) -> String {
        self.version.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

async fn actor(
    ep: Arc<Endpoint>,
    proto: Proto,
    mut jobs: mpsc::UnboundedReceiver<Job>,
    version: Arc<Mutex<String>>,
    tracking: Arc<TrackingState>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        // Connect only when there is work, so an idle proxy holds no upstream connections
        // it does not need and a dead Valkey costs nothing while nobody asks.
        let Some(first) = jobs.recv().await else {
            return;
        };
        match connect(&ep, proto).await {
            Ok(conn) => {
                backoff = Duration::from_millis(50);
                if let Ok(mut v) = version.lock() {
                    v.clone_from(&conn.server_version);
                }
                let outcome = serve(conn, first, &mut jobs, ep.command_timeout, &tracking).await;
                if let Err(e) = outcome {
                    tracing::warn!(error = %e, addr = %ep.addr, "shared upstream connection dropped");
                } else {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reach Valkey; failing requests until it is back");
                let _ = first.reply.send(Err(e.clone()));
                fail_for(&mut jobs, backoff, &e).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Fails every request arriving during `period`: while Valkey is unreachable, clients get a
/// prompt `-UPSTREAM` instead of waiting on connect timeouts.
async fn fail_for(jobs: &mut mpsc::UnboundedReceiver<Job>, period: Duration, e: &Error) {
    let until = tokio::time::Instant::now() + period;
    loop {
        match tokio::time::timeout_at(until, jobs.recv()).await {
            Ok(Some(job)) => {
                let _ = job.reply.send(Err(e.clone()));
            }
            Ok(None) | Err(_) => return,
        }
    }
}

/// Runs one live connection until it fails (`Err`) or the pool is dropped (`Ok`).
async fn serve(
    mut conn: RawConn,
    first: Job,
    jobs: &mut mpsc::UnboundedReceiver<Job>,
    timeout: Duration,
    tracking: &TrackingState,
) -> Result<()> {
    let mut pending: VecDeque<Pending> = VecDeque::new();
    // The tracking generation this connection's `CLIENT TRACKING` points at (0: none).
    let mut tracked_gen = 0u64;
    let mut wbuf = BytesMut::with_capacity(16 * 1024);
    let mut last_progress = Instant::now();
    let mut ticker = tokio::time::interval((timeout / 4).max(Duration::from_millis(20)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut next = Some(first);
    let result: Result<()> = loop {
        if let Some(job) = next.take() {
            if pending.is_empty() {
                last_progress = Instant::now();
            }
            push_job(job, &mut wbuf, &mut pending, &mut tracked_gen, tracking);
            while wbuf.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => push_job(job, &mut wbuf, &mut pending, &mut tracked_gen, tracking),
                    Err(_) => break,
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
                    if let Err(e) = deliver(&mut conn, &mut pending) {
                        break Err(e);
                    }
                }
                Err(e) => break Err(Error::upstream(format!("read from Valkey failed: {e}"))),
            },
            _ = ticker.tick() => {
                if !pending.is_empty() && last_progress.elapsed() > timeout {
                    break Err(Error::upstream(format!(
                        "Valkey did not answer within {} ms", timeout.as_millis()
                    )));
                }
            }
        }
    };
    if let Err(e) = &result {
        for reply in pending.drain(..).flatten() {
            let _ = reply.send(Err(e.clone()));
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
    tracking: &TrackingState,
) {
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
    pending.push_back(Some(job.reply));
}

/// Hands every complete buffered frame to the oldest waiting request.
fn deliver(conn: &mut RawConn, pending: &mut VecDeque<Pending>) -> Result<()> {
    while let Some(frame) = conn.next_buffered()? {
        if frame.first() == Some(&b'>') {
            // An out-of-band push on a shared connection (nothing here subscribes or tracks):
            // never let it be taken for someone's reply.
            continue;
        }
        match pending.pop_front() {
            Some(Some(reply)) => {
                let _ = reply.send(Ok(frame));
            }
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
