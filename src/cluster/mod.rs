//! The cluster: equal nodes with no central one, each owning the partitions rendezvous hashing
//! gives it over the live members, carrying the shards' envelopes to each other over
//! authenticated, encrypted links.
//!
//! - [`node`]: membership (SWIM), the links, the gateway between shards and links, tables;
//! - [`link`]: one link: TCP, the Noise handshake under the cluster secret, records;
//! - [`wire`]: envelopes ↔ bytes on a node link (rkyv records, batched).

pub mod link;
pub mod node;
pub mod wire;
