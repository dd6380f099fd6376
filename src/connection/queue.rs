//! The ordered reply queue: the rule that replies leave in request order, whatever order
//! their work completes in, kept apart from the I/O so it can be tested on its own.
//!
//! The connection places slots (a command's reply, a push ahead of the replies still to come)
//! and settles the front one when its work is done; the queue decides what leaves and when:
//! only ready slots at the front, a reply muted by `CLIENT REPLY` dropped (and its bytes
//! released from the client's output budget), each ready reply charged to that budget when
//! it comes into being.

use bytes::{Bytes, BytesMut};
use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use crate::upstream::ReplyBudget;

/// What a slot holds once it can leave.
pub enum Out {
    /// A command's reply (dropped while muted).
    Reply(Bytes),
    /// Something that is not a reply (a pub/sub message, a RESP3 push): always sent.
    Push(Bytes),
}

/// A slot as the queue sees it: ready to leave, or still waiting.
pub trait Queued: Sized {
    /// The slot's bytes if it is ready; the slot itself while it waits.
    fn into_out(self) -> Result<Out, Self>;
    /// Whether [`Queued::into_out`] would give bytes (a look, without taking).
    fn is_out(&self) -> bool;
    /// The bytes of a ready slot, to charge to the budget.
    fn ready_len(&self) -> Option<usize>;
}

/// Slots in request order, whether each command reply is muted, and the client's budget.
pub struct ReplyQueue<S> {
    slots: VecDeque<S>,
    /// For each command reply in the queue (not pushes), in order: whether `CLIENT REPLY`
    /// drops it.
    muted: VecDeque<bool>,
    /// Bytes of replies held for this client and not yet written.
    budget: Arc<ReplyBudget>,
}

/// Placing slots is the connection's (a push goes ahead of the dedicated replies still to
/// come, a settled slot replaces its waiting one); what leaves is the queue's.
impl<S> Deref for ReplyQueue<S> {
    type Target = VecDeque<S>;
    fn deref(&self) -> &VecDeque<S> {
        &self.slots
    }
}

impl<S> DerefMut for ReplyQueue<S> {
    fn deref_mut(&mut self) -> &mut VecDeque<S> {
        &mut self.slots
    }
}

impl<S: Queued> ReplyQueue<S> {
    pub fn new(budget: Arc<ReplyBudget>) -> Self {
        ReplyQueue {
            slots: VecDeque::new(),
            muted: VecDeque::new(),
            budget,
        }
    }

    /// The budget replies are charged to.
    #[cfg(test)]
    pub fn budget(&self) -> &Arc<ReplyBudget> {
        &self.budget
    }

    /// Charges a slot that has just become ready: a reply counts against the client's output
    /// limit from the moment it exists (a waiting slot is charged when it becomes ready).
    pub fn charged(&self, slot: S) -> S {
        if let Some(n) = slot.ready_len() {
            self.budget.charge(n);
        }
        slot
    }

    /// The front slot — already taken off by the caller — completed with `reply`, charged
    /// and final: it leaves at once, into `out` or dropped while muted, as [`drain_front`]
    /// would have sent it had the slot been put back ready (a pass-through reply, the
    /// commonest, is spared that round). Returns whether it is an error reply, for the
    /// error counter.
    ///
    /// [`drain_front`]: Self::drain_front
    pub fn send_front_reply(&mut self, reply: &[u8], out: &mut BytesMut) -> bool {
        if self.muted.pop_front().unwrap_or(false) {
            self.budget.release(reply.len());
        } else {
            out.extend_from_slice(reply);
        }
        matches!(reply.first(), Some(b'-') | Some(b'!'))
    }

    /// A command added its reply slot (the last one): whether that reply is dropped.
    pub fn command_reply(&mut self, muted: bool) {
        self.muted.push_back(muted);
    }

    /// Moves the ready slots at the front into `out`, in order, up to the first that waits.
    /// A muted reply is dropped and its bytes released from the budget. Returns how many
    /// error replies left the queue (for the error counter).
    pub fn drain_front(&mut self, out: &mut BytesMut) -> usize {
        let mut errors = 0;
        while self.slots.front().is_some_and(Queued::is_out) {
            let Some(slot) = self.slots.pop_front() else {
                break;
            };
            match slot.into_out() {
                Ok(Out::Reply(b)) => {
                    errors += usize::from(matches!(b.first(), Some(b'-') | Some(b'!')));
                    if self.muted.pop_front().unwrap_or(false) {
                        self.budget.release(b.len());
                    } else {
                        out.extend_from_slice(&b);
                    }
                }
                Ok(Out::Push(b)) => out.extend_from_slice(&b),
                Err(waiting) => {
                    self.slots.push_front(waiting);
                    break;
                }
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot of the tests: ready, a push, or waiting for work number n.
    #[derive(Debug, PartialEq)]
    enum Slot {
        Ready(Bytes),
        Push(Bytes),
        Waiting(u32),
    }

    impl Queued for Slot {
        fn into_out(self) -> Result<Out, Self> {
            match self {
                Slot::Ready(b) => Ok(Out::Reply(b)),
                Slot::Push(b) => Ok(Out::Push(b)),
                w => Err(w),
            }
        }
        fn is_out(&self) -> bool {
            !matches!(self, Slot::Waiting(_))
        }
        fn ready_len(&self) -> Option<usize> {
            match self {
                Slot::Ready(b) | Slot::Push(b) => Some(b.len()),
                Slot::Waiting(_) => None,
            }
        }
    }

    fn queue() -> ReplyQueue<Slot> {
        ReplyQueue::new(Arc::new(ReplyBudget::default()))
    }

    fn ready(s: &'static str) -> Slot {
        Slot::Ready(Bytes::from_static(s.as_bytes()))
    }

    /// A command's slot, as the connection adds it: charged if ready, muted or not.
    fn command(q: &mut ReplyQueue<Slot>, slot: Slot, muted: bool) {
        let slot = q.charged(slot);
        q.push_back(slot);
        q.command_reply(muted);
    }

    /// Work `n` completed: its slot becomes ready (and is charged then).
    fn complete(q: &mut ReplyQueue<Slot>, n: u32, reply: &'static str) {
        let i = q
            .iter()
            .position(|s| *s == Slot::Waiting(n))
            .expect("waiting slot");
        q[i] = q.charged(ready(reply));
    }

    #[test]
    fn replies_completed_out_of_order_leave_in_order() {
        let mut q = queue();
        let mut out = BytesMut::new();
        command(&mut q, Slot::Waiting(1), false);
        command(&mut q, Slot::Waiting(2), false);
        command(&mut q, ready("+c\r\n"), false);
        complete(&mut q, 2, "+b\r\n");
        assert_eq!(q.drain_front(&mut out), 0);
        assert!(out.is_empty(), "the first reply is not there yet");
        complete(&mut q, 1, "+a\r\n");
        q.drain_front(&mut out);
        assert_eq!(&out[..], b"+a\r\n+b\r\n+c\r\n");
        assert!(q.is_empty());
        assert_eq!(
            q.budget().held(),
            out.len(),
            "released once written, not here"
        );
    }

    #[test]
    fn pushes_interleave_where_they_are_placed() {
        let mut q = queue();
        let mut out = BytesMut::new();
        command(&mut q, Slot::Waiting(1), false);
        let push = q.charged(Slot::Push(Bytes::from_static(b">2\r\n+m\r\n+1\r\n")));
        q.push_front(push);
        command(&mut q, ready("+b\r\n"), false);
        q.drain_front(&mut out);
        assert_eq!(
            &out[..],
            b">2\r\n+m\r\n+1\r\n",
            "the push leaves ahead of the wait"
        );
        complete(&mut q, 1, "+a\r\n");
        q.drain_front(&mut out);
        assert_eq!(&out[..], b">2\r\n+m\r\n+1\r\n+a\r\n+b\r\n");
    }

    /// A front slot settled with its final reply leaves at once, in order with what the
    /// queue drains after it, dropped and released while muted.
    #[test]
    fn a_settled_front_reply_leaves_at_once() {
        let mut q = queue();
        let mut out = BytesMut::new();
        command(&mut q, Slot::Waiting(1), false);
        command(&mut q, Slot::Waiting(2), true);
        command(&mut q, ready("+c\r\n"), false);
        for (reply, error) in [("-ERR a\r\n", true), ("+b\r\n", false)] {
            q.budget().charge(reply.len());
            assert!(matches!(q.pop_front(), Some(Slot::Waiting(_))));
            assert_eq!(q.send_front_reply(reply.as_bytes(), &mut out), error);
        }
        q.drain_front(&mut out);
        assert_eq!(&out[..], b"-ERR a\r\n+c\r\n");
        assert_eq!(q.budget().held(), out.len(), "the muted reply released");
    }

    #[test]
    fn muted_replies_are_dropped_and_released() {
        let mut q = queue();
        let mut out = BytesMut::new();
        command(&mut q, ready("+a\r\n"), false);
        command(&mut q, Slot::Waiting(1), true);
        command(&mut q, ready("-ERR c\r\n"), true);
        // A push is never muted, and takes no muted flag.
        let push = q.charged(Slot::Push(Bytes::from_static(b"+p\r\n")));
        q.push_back(push);
        command(&mut q, ready("+d\r\n"), false);
        complete(&mut q, 1, "+bb\r\n");
        assert_eq!(q.drain_front(&mut out), 1, "a muted error still counts");
        assert_eq!(&out[..], b"+a\r\n+p\r\n+d\r\n");
        assert_eq!(q.budget().held(), out.len(), "muted bytes released");
    }
}
