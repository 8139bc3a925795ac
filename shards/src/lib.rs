//! tim-shards: the per-core runtime. It knows nothing about chat.
//!
//! - [`runtime`]: one pinned monoio executor per core, io_uring with DEFER_TASKRUN + SINGLE_ISSUER +
//!   COOP_TASKRUN, falling back to the epoll driver where io_uring is unavailable.
//! - [`mesh`]: a bounded lock-free queue per ordered pair of shards, drained in batches; a sender
//!   wakes a receiver only when it is parked, and a receiver spins briefly before parking.
//! - [`partition`]: key → partition → shard, as plain functions.
//! - [`listener`]: a per-shard SO_REUSEPORT TCP listener.
//! - [`panic`]: a panic on any thread aborts the process instead of leaving it half alive.

pub mod listener;
pub mod mesh;
pub mod panic;
pub mod partition;
pub mod runtime;

pub use mesh::{yield_now, Mesh, MeshPort, SendError};
pub use panic::abort_on_panic;
pub use partition::{mix64, partition_of, shard_of, shard_of_partition, PARTITIONS};
pub use runtime::{start, Driver, DriverKind, RuntimeConfig, ShardContext, Shards};
