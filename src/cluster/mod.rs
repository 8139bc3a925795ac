//! The cluster: equal nodes with no central one, each owning the partitions rendezvous hashing
//! gives it over the live members, carrying the shards' envelopes to each other over
//! authenticated, encrypted links.
//!
//! - [`wire`]: envelopes ↔ bytes on a node link (rkyv records, batched).

pub mod wire;
