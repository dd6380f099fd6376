//! cachefront: a server that speaks the Valkey/Redis protocol, answers database reads from a
//! cache kept in an upstream Valkey, goes to PostgreSQL only on a miss, and passes every other
//! command through to Valkey unchanged.
//!
//! # Layout
//! Data flows one way: **connection → command → cache → upstream (Valkey) / db (PostgreSQL)**.
//! - [`server`] accepts clients; [`connection`] runs one client: frames in, replies out, in order.
//! - [`protocol`] parses requests (Valkey's rules and limits), encodes replies, finds frame ends.
//! - [`command`] holds one file per command family; `dispatch` turns a request into an action.
//! - [`cache`] is the read-through cache: keys, coalesced fills, the versioned store in Valkey
//!   (one server, or per-slot generations on a cluster).
//! - [`upstream`] is Valkey for pass-through: shared pipelined and dedicated connections, slot
//!   routing to a Valkey Cluster, and Valkey's one command table.
//! - [`db`] is PostgreSQL: pool, read replicas, read-only execution, SQL checks, rows as JSON,
//!   triggers.
//! - [`invalidation`] listens for PostgreSQL's change notifications and drops what changed.
//! - [`tls`] is rustls for the TLS listener and for TLS to Valkey.
//! - [`acl`] is who may run what: users, passwords, command and key permissions.
//! - [`config`], [`error`], [`metrics`], [`session`] are what the others share;
//!   [`prometheus`] serves the metrics over HTTP.

pub mod acl;
pub mod cache;
pub mod command;
pub mod config;
pub mod connection;
pub mod db;
pub mod error;
pub mod invalidation;
pub mod metrics;
pub mod prometheus;
pub mod protocol;
pub mod server;
pub mod session;
pub mod tls;
pub mod upstream;
