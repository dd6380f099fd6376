//! The wire: client requests in, replies out, and frame boundaries in what Valkey sends back.
//!
//! Requests are parsed by our own [`request::RequestParser`] because Valkey's request grammar is
//! narrower than RESP (only arrays of bulk strings, plus inline commands) and comes with limits
//! and error texts clients have come to rely on. Replies from Valkey are never re-encoded: the
//! [`scan::FrameScanner`] finds where each one ends so it can be forwarded byte for byte.
//! redis-protocol decodes frames where we need to look inside one ([`value`]: the command
//! table, slot maps, subscription confirmations, `INFO`/`COMMAND` merging) and serves as the
//! oracle in the scanner's tests.

pub mod reply;
pub mod request;
pub mod scan;
pub mod value;

pub use reply::{Proto, Reply};
pub use request::{Limits, ProtocolError, Request, RequestParser};
pub use scan::{FrameScanner, ScanError};
pub use value::Value;
