//! What one client connection remembers between commands.

use std::sync::Arc;

use crate::acl::User;
use crate::protocol::Proto;

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
    /// Upstream state cachefront does not model (READONLY, CLIENT NO-EVICT…): keep the
    /// dedicated connection for the life of the client.
    pub pinned: bool,
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
            pinned: false,
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
