//! tim: an io_uring thread-per-core instant-messaging engine.
//!
//! Where things are (bytes → frame → operation → state):
//! - [`frame`]: the 8-byte header, padding, aligned read buffers, rkyv encode/validated access;
//! - [`protocol`]: frame kinds, message types, the delivery stamp, error codes (docs/PROTOCOL.md);
//! - [`transport`]: bytes on a socket ↔ whole frames (today [`transport::tcp`]);
//! - [`json`]: the JSON mapping of protocol v1 (WebSocket text messages ↔ frames, request ids);
//! - [`session`]: a connection's login state and queues, and its requests
//!   ([`session::requests`]), whatever the transport;
//! - [`envelope`]: everything that crosses between shards, in one enum;
//! - [`placement`]: key → partition → owner;
//! - [`cluster`]: nodes, membership, node links and the envelopes on them;
//! - [`roles`]: the owner roles as state machines without I/O — [`roles::UserOwner`] (sessions,
//!   device limits, tokens, fan-out to sessions), [`roles::ConvOwner`] (sequence, resend dedup);
//! - [`commit`]: the commit pipeline's per-partition queues (group commit);
//! - [`shard`]: one core's runtime — executes the roles' effects: mesh routing, sessions,
//!   timeouts, store work, the committers, delivery cursors;
//! - [`sim`]: the seeded deterministic simulation of several shards' roles, clients and a
//!   faulty store;
//! - [`notify`]: a single-threaded multi-waiter notification;
//! - [`guard`]: per-connection and per-address budgets of costly requests;
//! - [`auth`]: names, passwords (argon2id), one-shot tokens;
//! - [`store`]: the storage boundary and the in-memory (no-data) backend;
//! - [`sockio`]: batched `sendmsg` writes of queued frames;
//! - [`workers`]: two thread pools for blocking work (password hashing; store calls);
//! - [`config`]: the TOML config and every limit;
//! - [`server`]: start and graceful stop;
//! - [`clock`]: wall-clock milliseconds, as stamped;
//! - [`client`]: a blocking Rust client for protocol v1 (tests, tools);
//! - [`chat`]: `tim chat`, a terminal client (interactive, send, watch, history) on [`client`].
//!
//! The per-core runtime (executors, mesh, partition map) is the `tim-shards` crate.

pub mod admin;
pub mod auth;
pub mod backpressure;
pub mod chat;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod commit;
pub mod config;
pub mod envelope;
pub mod frame;
pub mod guard;
pub mod json;
pub mod metrics;
pub mod notify;
pub mod placement;
pub mod protocol;
pub mod roles;
pub mod roster;
pub mod server;
pub mod session;
pub mod shard;
pub mod sim;
pub mod sockio;
pub mod store;
pub mod transport;
pub mod workers;
