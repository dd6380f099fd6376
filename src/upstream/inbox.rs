//! Where a shared connection puts a client's pass-through replies.
//!
//! Why: a pipelining client's requests used to travel to the shared connection one job each,
//! every one with a reply channel of its own (an allocation, a job through the actor's
//! queue, a waiter, a wake-up): at 16 requests a read, that hand-off cost about as much as
//! parsing and forwarding them. A client's run of pass-through requests read together now
//! travels as one job, and its replies come back, in order, through one [`Inbox`] the
//! client keeps for as long as it speaks the same protocol (the same shared connection, so
//! the same order). Each request keeps its own slot in the client's reply queue; a slot
//! waiting on an inbox takes the inbox's next reply.

use bytes::Bytes;
use futures::task::AtomicWaker;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// Why a request got no reply: the shared connection let it go unanswered.
pub fn reply_lost() -> Error {
    Error::upstream("connection to Valkey lost before the reply arrived")
}

/// A client's replies from one shared connection, in the order its requests were sent.
#[derive(Default)]
pub struct Inbox {
    replies: Mutex<VecDeque<Result<Bytes>>>,
    waker: AtomicWaker,
}

impl Inbox {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Result<Bytes>>> {
        // Nothing under the lock can panic halfway through a change.
        self.replies.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn put(&self, reply: Result<Bytes>) {
        self.lock().push_back(reply);
        self.waker.wake();
    }

    /// Puts several replies at once: one lock and one wake-up for all of them.
    fn put_all(&self, replies: impl Iterator<Item = Result<Bytes>>) {
        self.lock().extend(replies);
        self.waker.wake();
    }

    /// The next reply, if it has come.
    pub fn try_take(&self) -> Option<Result<Bytes>> {
        self.lock().pop_front()
    }

    /// The next reply, once it has come.
    pub fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Result<Bytes>> {
        if let Some(r) = self.try_take() {
            return Poll::Ready(r);
        }
        self.waker.register(cx.waker());
        // A reply put between the first look and the registration woke nobody.
        match self.try_take() {
            Some(r) => Poll::Ready(r),
            None => Poll::Pending,
        }
    }
}

/// Replies a job owes an inbox. Dropped while it still owes some (the job was never sent,
/// or its connection ended without them), it gives each the [`reply_lost`] error: every
/// slot waiting on the inbox gets a reply, and later replies never shift onto the wrong
/// slot.
pub struct Owed {
    inbox: Arc<Inbox>,
    count: u32,
}

impl Owed {
    pub fn new(inbox: Arc<Inbox>, count: u32) -> Owed {
        Owed { inbox, count }
    }

    fn give(&mut self, reply: Result<Bytes>) {
        if self.count > 0 {
            self.count -= 1;
            self.inbox.put(reply);
        }
    }

    /// Gives the replies in `batch` (as many as are owed), emptying it.
    fn give_all(&mut self, batch: &mut Vec<Result<Bytes>>) {
        let n = batch.len().min(self.count as usize);
        if n > 0 {
            self.count -= n as u32;
            self.inbox.put_all(batch.drain(..n));
        }
        batch.clear();
    }

    /// Gives every reply still owed the error `e`.
    fn fail_rest(&mut self, e: &Error) {
        while self.count > 0 {
            self.give(Err(e.clone()));
        }
    }
}

impl Drop for Owed {
    fn drop(&mut self) {
        if self.count > 0 {
            self.fail_rest(&reply_lost());
        }
    }
}

/// Where a job's replies go.
pub enum ReplyTo {
    /// The one reply of one request.
    One(oneshot::Sender<Result<Bytes>>),
    /// The replies of a client's run of requests sent as one job, in order.
    Many(Owed),
}

impl ReplyTo {
    /// Gives the last (or only) reply owed.
    pub fn answer(self, reply: Result<Bytes>) {
        match self {
            ReplyTo::One(tx) => {
                let _ = tx.send(reply);
            }
            ReplyTo::Many(mut owed) => owed.give(reply),
        }
    }

    /// Gives every reply still owed the error `e`.
    pub fn fail(self, e: &Error) {
        match self {
            ReplyTo::One(tx) => {
                let _ = tx.send(Err(e.clone()));
            }
            ReplyTo::Many(mut owed) => owed.fail_rest(e),
        }
    }

    /// How many replies are still owed: a run's count, one for a single request.
    pub fn owed(&self) -> usize {
        match self {
            ReplyTo::One(_) => 1,
            ReplyTo::Many(owed) => owed.count as usize,
        }
    }

    /// Gives a run replies read together (not its last, see [`ReplyTo::owed`]), emptying
    /// `batch`: they reach the inbox under one lock, with one wake-up.
    pub fn give_batch(&mut self, batch: &mut Vec<Result<Bytes>>) {
        match self {
            ReplyTo::Many(owed) => owed.give_all(batch),
            ReplyTo::One(_) => batch.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(s: &'static str) -> Result<Bytes> {
        Ok(Bytes::from_static(s.as_bytes()))
    }

    fn taken(inbox: &Inbox) -> Vec<String> {
        std::iter::from_fn(|| inbox.try_take())
            .map(|r| match r {
                Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                Err(e) => format!("error: {e}"),
            })
            .collect()
    }

    /// A run's replies arrive in order, batches of them and the last through `answer`; a
    /// batch longer than what is owed gives only what is owed.
    #[test]
    fn a_runs_replies_arrive_in_order() {
        let inbox = Arc::new(Inbox::default());
        let mut to = ReplyTo::Many(Owed::new(Arc::clone(&inbox), 4));
        let mut batch = vec![frame("+a")];
        to.give_batch(&mut batch);
        assert_eq!(to.owed(), 3);
        batch.extend([frame("+b"), frame("+c")]);
        to.give_batch(&mut batch);
        assert!(batch.is_empty());
        assert_eq!(to.owed(), 1);
        to.answer(frame("+d"));
        assert_eq!(taken(&inbox), ["+a", "+b", "+c", "+d"]);
        let mut over = ReplyTo::Many(Owed::new(Arc::clone(&inbox), 1));
        let mut batch = vec![frame("+e"), frame("+f")];
        over.give_batch(&mut batch);
        assert!(batch.is_empty());
        assert_eq!((over.owed(), taken(&inbox)), (0, vec!["+e".to_string()]));
    }

    /// A run dropped or failed partway still gives every slot a reply: the ones owed get
    /// the error, so nothing later shifts onto them.
    #[test]
    fn a_run_ended_early_owes_nothing() {
        let inbox = Arc::new(Inbox::default());
        let mut dropped = ReplyTo::Many(Owed::new(Arc::clone(&inbox), 3));
        dropped.give_batch(&mut vec![frame("+a")]);
        drop(dropped);
        let failed = ReplyTo::Many(Owed::new(Arc::clone(&inbox), 2));
        failed.fail(&Error::upstream("Valkey closed the connection"));
        let got = taken(&inbox);
        assert_eq!(got.len(), 5, "{got:?}");
        assert_eq!(got[0], "+a");
        assert!(got[1].contains("lost before the reply"), "{got:?}");
        assert!(got[3].contains("closed the connection"), "{got:?}");
    }
}
