//! cachefront: a server that speaks the Valkey/Redis protocol, answers database reads from a
//! cache kept in an upstream Valkey, goes to PostgreSQL only on a miss, and passes every other
//! command through to Valkey unchanged.
//!
//! # Layout
//! Data flows one way: **connection → command → cache → upstream (Valkey) / db (PostgreSQL)**.
//! The modules form layers, each importing only lower ones (checked by `tests/layers.rs`):
//! - [`server`] accepts clients, builds everything from the config, reloads, shuts down;
//!   [`connection`] runs one client: frames in, replies out, in order.
//! - [`command`] holds one file per command family; `dispatch` turns a request into an
//!   action, with a [`command::Context`] rather than the server.
//! - [`invalidation`] listens for PostgreSQL's change notifications and drops what changed.
//! - [`cache`] is the read-through cache: keys, L1, coalesced fills, the versioned store in
//!   Valkey (one server, or per-slot generations on a cluster), named query definitions; its
//!   read path (`cache::read`) owns every decision of a cached read.
//! - [`session`] is per-client state; [`acl`] is who may run what: users, passwords, command
//!   and key permissions.
//! - [`upstream`] is Valkey for pass-through: shared pipelined and dedicated connections, slot
//!   routing to a Valkey Cluster, and Valkey's one command table. [`db`] is PostgreSQL: pool,
//!   read replicas, read-only execution, SQL checks, rows as JSON, triggers.
//! - [`tls`] is rustls for the TLS listener and for TLS to Valkey; [`prometheus`] serves the
//!   metrics and the status page over HTTP; [`cores`] are the threads clients are served on.
//! - [`config`], [`error`], [`metrics`] are pure data the others share; [`protocol`] parses
//!   requests (Valkey's rules and limits), encodes replies, finds frame ends.

pub mod acl;
pub mod cache;
pub mod command;
pub mod config;
pub mod connection;
pub mod cores;
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
