//! tim: an io_uring thread-per-core instant-messaging engine.
//!
//! Where things are (bytes → frame → operation → state):
//! - [`frame`]: the 8-byte header, padding, aligned read buffers, rkyv encode/validated access;
//! - [`protocol`]: frame kinds, message types, the delivery stamp, error codes (docs/PROTOCOL.md);
//! - [`conn`]: a connection's reader and writer tasks and its [`conn::Session`];
//! - [`envelope`]: everything that crosses between shards, in one enum;
//! - [`shard`]: one core's state — sessions, user and conversation partitions, dedup, routing;
//! - [`auth`]: names, passwords (argon2id), one-shot tokens;
//! - [`store`]: the storage boundary and the in-memory (no-data) backend;
//! - [`sockio`]: batched `sendmsg` writes of queued frames;
//! - [`workers`]: threads for blocking work (password hashing, store calls);
//! - [`config`]: the TOML config and every limit;
//! - [`server`]: start and graceful stop;
//! - [`client`]: a blocking Rust client for protocol v1 (tests, tools).
//!
//! The per-core runtime (executors, mesh, partition map) is the `tim-shards` crate.

pub mod auth;
pub mod client;
pub mod config;
pub mod conn;
pub mod envelope;
pub mod frame;
pub mod protocol;
pub mod server;
pub mod shard;
pub mod sockio;
pub mod store;
pub mod workers;
