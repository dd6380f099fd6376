//! A client's run of pass-through requests: the requests read together that go to the
//! shared connection of its lane, gathered while the client's input is parsed and handed
//! over as one job when it ends (see `upstream::inbox` for why). A run ends before anything
//! else the client asked for is sent anywhere — a cache lookup, a dedicated connection's
//! command, local work that may reach Valkey — so every request still reaches Valkey in the
//! order the client sent it.

use bytes::{Bytes, BytesMut};
use std::sync::Arc;
use std::time::Instant;

use crate::protocol::Proto;
use crate::upstream::{Inbox, Owed};

/// The run being gathered, and the inbox its replies come back to: boxed, made when the
/// client first passes a request through, so an idle client's task stays small (see
/// `connection::tests::an_idle_clients_task_stays_small`).
#[derive(Default)]
pub struct Run(Option<Box<Gathering>>);

#[derive(Default)]
struct Gathering {
    /// The run's first request: a run of one is handed over as it was read, without a copy.
    first: Option<Bytes>,
    /// Every request of the run, back to back, once it has two or more.
    all: BytesMut,
    count: u32,
    /// When the run began: its requests' pass-through latency starts there.
    started: Option<Instant>,
    /// The inbox for replies on the shared connection of the client's protocol; a new one
    /// when the protocol changes (another shared connection, so another order).
    inbox: Option<(Proto, Arc<Inbox>)>,
}

/// A run ready to be handed over.
pub struct Gathered {
    pub raw: Bytes,
    pub owed: Owed,
    pub proto: Proto,
}

impl Run {
    /// Whether a request in `proto` can join the run (else the run must be handed over
    /// first: its replies come back on another connection).
    pub fn takes(&self, proto: Proto) -> bool {
        self.0.as_ref().is_none_or(|g| g.takes(proto))
    }

    /// Adds a request; returns the inbox its reply will reach and when the run began.
    pub fn add(&mut self, raw: Bytes, proto: Proto) -> (Arc<Inbox>, Instant) {
        self.0.get_or_insert_with(Box::default).add(raw, proto)
    }

    /// The run gathered so far, if any, leaving none.
    pub fn take(&mut self) -> Option<Gathered> {
        self.0.as_mut()?.take()
    }
}

impl Gathering {
    fn takes(&self, proto: Proto) -> bool {
        self.count == 0 || self.inbox.as_ref().is_some_and(|(p, _)| *p == proto)
    }

    fn add(&mut self, raw: Bytes, proto: Proto) -> (Arc<Inbox>, Instant) {
        match self.count {
            0 => self.first = Some(raw),
            1 => {
                let first = self.first.take().unwrap_or_default();
                // Room for a pipeline of such requests: one allocation per run, usually.
                let mut all = BytesMut::with_capacity((first.len() + raw.len()) * 8);
                all.extend_from_slice(&first);
                all.extend_from_slice(&raw);
                self.all = all;
            }
            _ => self.all.extend_from_slice(&raw),
        }
        self.count += 1;
        let started = *self.started.get_or_insert_with(Instant::now);
        let inbox = match &self.inbox {
            Some((p, inbox)) if *p == proto => Arc::clone(inbox),
            _ => {
                let inbox = Arc::new(Inbox::default());
                self.inbox = Some((proto, Arc::clone(&inbox)));
                inbox
            }
        };
        (inbox, started)
    }

    fn take(&mut self) -> Option<Gathered> {
        let count = std::mem::take(&mut self.count);
        self.started = None;
        let (proto, inbox) = self.inbox.as_ref().filter(|_| count > 0)?;
        let raw = match count {
            1 => self.first.take().unwrap_or_default(),
            _ => std::mem::take(&mut self.all).freeze(),
        };
        Some(Gathered {
            raw,
            owed: Owed::new(Arc::clone(inbox), count),
            proto: *proto,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &'static str) -> Bytes {
        Bytes::from_static(s.as_bytes())
    }

    #[test]
    fn a_run_hands_over_its_requests_back_to_back_once() {
        let mut run = Run::default();
        assert!(run.take().is_none(), "nothing gathered");
        let (a, _) = run.add(req("*1\r\n$4\r\nPING\r\n"), Proto::Resp2);
        let (b, _) = run.add(req("*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"), Proto::Resp2);
        assert!(Arc::ptr_eq(&a, &b), "one inbox per protocol");
        assert!(
            !run.takes(Proto::Resp3),
            "another protocol ends the run first"
        );
        let g = run.take().expect("a run");
        assert_eq!(
            &g.raw[..],
            b"*1\r\n$4\r\nPING\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        );
        assert!(run.take().is_none(), "handed over once");
        let (c, _) = run.add(req("*1\r\n$4\r\nPING\r\n"), Proto::Resp2);
        assert!(Arc::ptr_eq(&a, &c), "the inbox outlives the run");
        assert_eq!(
            &run.take().expect("a run of one").raw[..],
            b"*1\r\n$4\r\nPING\r\n"
        );
        let (d, _) = run.add(req("*1\r\n$4\r\nPING\r\n"), Proto::Resp3);
        assert!(!Arc::ptr_eq(&a, &d), "a new protocol, a new inbox");
    }
}
