//! What one client connection remembers between commands.

use std::sync::Arc;

use crate::acl::User;
use crate::protocol::Proto;

/// How a forwarded command changes what Valkey remembers for the client's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateChange {
    None,
    Multi,
    EndMulti,
    Watch,
    Unwatch,
    Subscribe,
    Monitor,
    Select(i64),
    Tracking(bool),
    /// `HELLO 2|3` on the dedicated connection.
    Proto(Proto),
    /// State cachefront does not model (READONLY, CLIENT NO-EVICT…): the connection stays
    /// the client's until it leaves or RESETs.
    Pin,
}

/// `CLIENT REPLY ON|OFF|SKIP`, kept by cachefront: the client's replies are dropped on their
/// way out (never the messages and pushes that are not replies, as in Valkey).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    On,
    Off,
    /// The next command's reply is dropped, then replies are on again.
    Skip,
}

/// Per-client state. Modes that live on the Valkey side (transaction, watches, subscriptions,
/// tracking, selected database) are mirrored here so the connection knows when it needs a
/// dedicated upstream connection and when it can give it back.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub addr: String,
    pub proto: Proto,
    pub name: Option<String>,
    pub lib_name: Option<String>,
    pub lib_ver: Option<String>,
    pub authed: bool,
    /// The user the client is (or will be, once authenticated) logged in as.
    pub user: Arc<User>,
    pub db: i64,
    pub in_multi: bool,
    /// A command was refused while queuing: EXEC must fail with EXECABORT, as in Valkey.
    pub multi_failed: bool,
    pub watching: bool,
    pub subscribed: bool,
    pub monitor: bool,
    pub tracking: bool,
    /// What each command queued in the open transaction will change once EXEC runs it, in
    /// queue order (the order of EXEC's reply).
    pub queued: Vec<StateChange>,
    /// `CLIENT REPLY`: whether replies reach the client.
    pub reply_mode: ReplyMode,
    /// The mode a `CLIENT REPLY` in the command being run asked for: its own reply is sent
    /// only for `ON` (see `Connection::mutes`). Taken once the command is dispatched.
    pub reply_asked: Option<ReplyMode>,
    /// Upstream state cachefront does not model (READONLY, CLIENT NO-EVICT…): keep the
    /// dedicated connection for the life of the client.
    pub pinned: bool,
    /// `CACHEFRONT.AFTER`: the floor of this connection's cached reads, if set.
    pub read_after: Option<ReadAfter>,
}

/// A connection's read-your-writes floor (`CACHEFRONT.AFTER <lsn> [TIMEOUT <ms>]`): its cached
/// reads answer only once every invalidation committed up to `lsn` is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAfter {
    /// A PostgreSQL WAL position (`pg_lsn` as a number).
    pub lsn: u64,
    /// How long a read waits for it, in milliseconds; `None`: the configured default
    /// (`invalidation.read_after_timeout_ms`).
    pub timeout_ms: Option<u64>,
}

impl Session {
    pub fn new(id: u64, addr: String, user: Arc<User>, authed: bool) -> Session {
        Session {
            id,
            addr,
            proto: Proto::Resp2,
            name: None,
            lib_name: None,
            lib_ver: None,
            authed,
            user,
            db: 0,
            in_multi: false,
            multi_failed: false,
            watching: false,
            subscribed: false,
            monitor: false,
            tracking: false,
            queued: Vec::new(),
            reply_mode: ReplyMode::On,
            reply_asked: None,
            pinned: false,
            read_after: None,
        }
    }

    /// True while Valkey holds state for this client on its dedicated connection.
    pub fn needs_dedicated(&self) -> bool {
        self.in_multi
            || self.watching
            || self.subscribed
            || self.monitor
            || self.tracking
            || self.pinned
            || self.db != 0
    }

    /// Records what a forwarded command changes on the dedicated connection. Inside a
    /// transaction Valkey only queues the command: its change is kept for EXEC (see
    /// [`Session::apply_exec`]) instead of being applied now.
    pub fn apply(&mut self, change: StateChange) {
        match change {
            StateChange::Multi => {
                self.in_multi = true;
                self.multi_failed = false;
                self.queued.clear();
            }
            StateChange::EndMulti => {
                self.in_multi = false;
                self.multi_failed = false;
                self.watching = false;
                self.queued.clear();
            }
            _ if self.in_multi => self.queued.push(change),
            change => self.take_effect(change),
        }
    }

    /// EXEC ran the transaction: `ok[i]` says whether its i-th command succeeded. Each
    /// successful command's change takes effect now, as it did in Valkey (`SELECT`, `SUBSCRIBE`
    /// or `CLIENT TRACKING` queued in MULTI change the connection once EXEC runs them).
    pub fn apply_exec(&mut self, queued: Vec<StateChange>, ok: &[bool]) {
        for (change, ok) in queued.into_iter().zip(ok) {
            if *ok {
                self.take_effect(change);
            }
        }
    }

    fn take_effect(&mut self, change: StateChange) {
        match change {
            StateChange::None | StateChange::Multi | StateChange::EndMulti => {}
            StateChange::Watch => self.watching = true,
            StateChange::Unwatch => self.watching = false,
            StateChange::Subscribe => self.subscribed = true,
            StateChange::Monitor => self.monitor = true,
            StateChange::Select(db) => self.db = db,
            StateChange::Tracking(on) => self.tracking = on,
            StateChange::Proto(p) => self.proto = p,
            StateChange::Pin => self.pinned = true,
        }
    }

    /// True while only pub/sub-style traffic flows (replies and messages interleave).
    pub fn streaming(&self) -> bool {
        self.subscribed || self.monitor
    }

    /// `RESET`: back to a fresh connection's state (authentication too, as in Valkey: the
    /// client is `default` again, authenticated only if `default` needs no password).
    pub fn reset(&mut self, default_user: Arc<User>, authed: bool) {
        *self = Session::new(
            self.id,
            std::mem::take(&mut self.addr),
            default_user,
            authed,
        );
    }
}
