//! Placement: key → partition → owner, in one place.
//!
//! Every user, conversation, group and room hashes to one of [`PARTITIONS`] partitions; each
//! partition has exactly one owner, an [`Owner`]: a shard of a node. On a single node every
//! partition belongs to this node and goes to shard `partition % shards`. In a cluster a
//! [`Table`] says which node owns each partition: rendezvous hashing over the live nodes (the
//! node with the highest `hash(partition, node)` wins), so when a node leaves only its own
//! partitions move, and every node that sees the same members computes the same table without
//! asking anyone. Within the owning node the partition goes to shard `partition % its shards`.
//!
//! Roles ask [`Placement`] where a key lives and address envelopes to the answer; no role knows
//! whether its peer is on the same core, another core or another machine.
//!
//! Key types: [`Placement`], [`Owner`], [`Table`], [`NodeId`].

use std::sync::Arc;

use tim_shards::{mix64, partition_of, PARTITIONS};

use crate::store::UserId;

/// A node of the cluster (`[cluster] node_id`); 0 on a single node.
pub type NodeId = u16;

/// Node ids a cluster may use: 1..=NODE_ID_MAX (they go into message ids and session refs).
pub const NODE_ID_MAX: NodeId = 63;

/// Shards per node in a cluster at most (node and shard share a message id's 12 generator
/// bits).
pub const CLUSTER_SHARDS_MAX: usize = 64;

/// A session anywhere in the cluster: its node in the top 6 bits, its shard in the next 10, a
/// shard-local id below (48 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionRef(pub u64);

impl SessionRef {
    pub const NONE: SessionRef = SessionRef(u64::MAX);

    /// Session `local` of shard `shard` of node 0 (a single node).
    pub fn new(shard: usize, local: u64) -> SessionRef {
        SessionRef::on(0, shard, local)
    }

    /// Session `local` of shard `shard` of node `node`.
    pub fn on(node: NodeId, shard: usize, local: u64) -> SessionRef {
        debug_assert!(node <= NODE_ID_MAX && shard < 1 << 10 && local < 1 << 48);
        SessionRef(((node as u64) << 58) | ((shard as u64) << 48) | local)
    }

    #[inline]
    pub fn node(self) -> NodeId {
        (self.0 >> 58) as NodeId
    }

    #[inline]
    pub fn shard(self) -> usize {
        ((self.0 >> 48) & 0x3ff) as usize
    }

    /// The shard holding the session, as an owner.
    #[inline]
    pub fn owner(self) -> Owner {
        Owner::new(self.node(), self.shard())
    }
}

/// The owner of a partition: the shard (of a node) that holds its keys' live state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    pub node: NodeId,
    pub shard: u16,
}

impl Owner {
    pub const fn new(node: NodeId, shard: usize) -> Owner {
        Owner { node, shard: shard as u16 }
    }

    #[inline]
    pub fn shard(self) -> usize {
        self.shard as usize
    }
}

/// Which node owns each partition, for one view of the cluster's live members.
#[derive(Clone, Debug)]
pub struct Table {
    /// Rises with every change this node has seen (logs and status show it).
    pub epoch: u64,
    /// The live nodes and their shard counts, by id.
    pub nodes: Vec<(NodeId, u16)>,
    owners: Box<[Owner]>,
}

impl Table {
    /// The table for `nodes` (live nodes with their shard counts; at least one).
    pub fn new(epoch: u64, nodes: &[(NodeId, u16)]) -> Table {
        assert!(!nodes.is_empty() && nodes.iter().all(|&(_, s)| s > 0));
        let mut nodes = nodes.to_vec();
        nodes.sort_unstable();
        nodes.dedup_by_key(|n| n.0);
        let owners = (0..PARTITIONS)
            .map(|p| {
                let &(node, shards) =
                    nodes.iter().max_by_key(|&&(n, _)| rendezvous(p, n)).expect("at least one node");
                Owner::new(node, tim_shards::shard_of_partition(p, shards as usize))
            })
            .collect();
        Table { epoch, nodes, owners }
    }

    /// The owner of a partition.
    #[inline]
    pub fn owner(&self, partition: u32) -> Owner {
        self.owners[partition as usize]
    }

    /// Partitions each node owns.
    pub fn counts(&self) -> Vec<(NodeId, usize)> {
        self.nodes.iter().map(|&(n, _)| (n, self.owners.iter().filter(|o| o.node == n).count())).collect()
    }
}

/// The latest table of this node, where its shards look when they suspect theirs is old: the
/// gateway stores a table here before it tells the shards, so a shard that gets an envelope
/// placed by a newer table than its own finds that table at once (no envelope is forwarded by
/// a table its sender had already left behind).
#[derive(Default)]
pub struct SharedTable {
    epoch: std::sync::atomic::AtomicU64,
    table: std::sync::Mutex<Option<Arc<Table>>>,
}

impl SharedTable {
    /// Publish `table` (its epoch above every earlier one's).
    pub fn set(&self, table: Arc<Table>) {
        let mut t = self.table.lock().expect("not poisoned");
        *t = Some(table.clone());
        self.epoch.store(table.epoch, std::sync::atomic::Ordering::Release);
    }

    /// The latest table, if its epoch is above `seen`.
    pub fn newer_than(&self, seen: u64) -> Option<Arc<Table>> {
        if self.epoch.load(std::sync::atomic::Ordering::Acquire) <= seen {
            return None;
        }
        // A copy of its own per shard: placement lookups never share a cache line across cores.
        self.table.lock().expect("not poisoned").as_ref().map(|t| Arc::new((**t).clone()))
    }
}

/// The rendezvous weight of `node` for `partition`.
#[inline]
fn rendezvous(partition: u32, node: NodeId) -> u64 {
    mix64(mix64(partition as u64 ^ 0x7061_7274_6974_696f) ^ ((node as u64) << 32 | 0x6e6f_6465))
}

/// Where keys live, seen from one node of `shards` shards.
#[derive(Clone, Debug)]
pub struct Placement {
    me: NodeId,
    shards: usize,
    /// `None` on a single node: every partition is this node's.
    table: Option<Arc<Table>>,
}

impl Placement {
    /// A single node of `shards` shards.
    pub fn new(shards: usize) -> Placement {
        assert!(shards > 0, "at least one shard");
        Placement { me: 0, shards, table: None }
    }

    /// Node `me` of a cluster, placing by `table`.
    pub fn clustered(me: NodeId, shards: usize, table: Arc<Table>) -> Placement {
        assert!(shards > 0, "at least one shard");
        Placement { me, shards, table: Some(table) }
    }

    /// This node.
    pub fn node(&self) -> NodeId {
        self.me
    }

    /// This node's shards.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The table's epoch (0 on a single node).
    pub fn epoch(&self) -> u64 {
        self.table.as_ref().map_or(0, |t| t.epoch)
    }

    pub fn table(&self) -> Option<&Arc<Table>> {
        self.table.as_ref()
    }

    /// Shard `shard` of this node.
    #[inline]
    pub fn local(&self, shard: usize) -> Owner {
        Owner::new(self.me, shard)
    }

    /// Whether `owner` is a shard of this node.
    #[inline]
    pub fn is_local(&self, owner: Owner) -> bool {
        owner.node == self.me
    }

    /// The owner of a partition.
    #[inline]
    pub fn owner_of_partition(&self, partition: u32) -> Owner {
        debug_assert!(partition < PARTITIONS);
        match &self.table {
            None => Owner::new(self.me, tim_shards::shard_of_partition(partition, self.shards)),
            Some(t) => t.owner(partition),
        }
    }

    /// The owner of a user's live state (sessions, tokens).
    #[inline]
    pub fn user(&self, user: UserId) -> Owner {
        self.owner_of_partition(partition_of(mix64(user)))
    }

    /// The owner of a 1:1 conversation (sequence, resend dedup).
    #[inline]
    pub fn conv(&self, key: (UserId, UserId)) -> Owner {
        self.owner_of_partition(partition_of(conv_hash(key)))
    }

    /// The owner of a group: its state and its messages' conversation `(0, group)`, so that
    /// the group owner and that conversation's owner are one shard.
    #[inline]
    pub fn group(&self, group: u64) -> Owner {
        self.conv(crate::store::group_conv(group))
    }

    /// The owner of a live room.
    #[inline]
    pub fn room(&self, room: u64) -> Owner {
        self.owner_of_partition(partition_of(mix64(room ^ ROOM_SALT)))
    }

    /// The shard that holds a session (its connection never leaves it).
    #[inline]
    pub fn session(&self, session: SessionRef) -> Owner {
        Owner::new(session.node(), session.shard())
    }
}

/// Keeps a room's placement independent of a user's with the same number.
const ROOM_SALT: u64 = 0x726f_6f6d_5f73_616c;

/// The key of a 1:1 conversation: its two users, smaller first.
#[inline]
pub fn direct_key(a: UserId, b: UserId) -> (UserId, UserId) {
    if a <= b {
        (a, b)
    } else {
        (b, a)
    }
}

/// The hash that places a 1:1 conversation (on a shard, and on a store partition).
#[inline]
pub fn conv_hash(key: (UserId, UserId)) -> u64 {
    mix64(key.0 ^ mix64(key.1))
}

/// The shard owning a user's live state (see [`Placement::user`]).
#[inline]
pub fn user_shard(user: UserId, shards: usize) -> usize {
    Placement::new(shards).user(user).shard()
}

/// The shard owning a 1:1 conversation (see [`Placement::conv`]).
#[inline]
pub fn conv_shard(key: (UserId, UserId), shards: usize) -> usize {
    Placement::new(shards).conv(key).shard()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Placement agrees with the runtime's partition map and spreads keys over every shard.
    #[test]
    fn placement_matches_partition_map() {
        let p = Placement::new(3);
        let mut seen = [0usize; 3];
        for u in 1..3000u64 {
            assert_eq!(p.user(u).shard(), tim_shards::shard_of(mix64(u), 3));
            seen[p.user(u).shard()] += 1;
            let k = direct_key(u, u * 7);
            assert_eq!(p.conv(k).shard(), tim_shards::shard_of(conv_hash(k), 3));
        }
        assert!(seen.iter().all(|&n| n > 500), "{seen:?}");
        assert_eq!(direct_key(9, 2), (2, 9));
    }

    /// Rendezvous tables: partitions spread evenly over nodes, each node's shards all used,
    /// and a node's loss moves only that node's partitions.
    #[test]
    fn rendezvous_moves_only_the_lost_nodes_partitions() {
        let three = Table::new(1, &[(1, 2), (2, 2), (3, 4)]);
        let counts = three.counts();
        for &(n, c) in &counts {
            assert!((c as f64 - 4096.0 / 3.0).abs() < 150.0, "node {n}: {c} partitions");
        }
        let shards_of_3: std::collections::BTreeSet<u16> =
            (0..PARTITIONS).map(|p| three.owner(p)).filter(|o| o.node == 3).map(|o| o.shard).collect();
        assert_eq!(shards_of_3.len(), 4);
        let two = Table::new(2, &[(1, 2), (3, 4)]);
        for p in 0..PARTITIONS {
            let (before, after) = (three.owner(p), two.owner(p));
            if before.node != 2 {
                assert_eq!(before, after, "partition {p} moved though its node stayed");
            } else {
                assert_ne!(after.node, 2);
            }
        }
        // The same members in another order give the same table.
        let again = Table::new(9, &[(3, 4), (2, 2), (1, 2)]);
        assert!((0..PARTITIONS).all(|p| again.owner(p) == three.owner(p)));
        let c = Placement::clustered(2, 2, Arc::new(three));
        assert_eq!(c.node(), 2);
        assert!(c.is_local(c.local(1)));
    }
}
