//! Placement: key → partition → owner, in one place.
//!
//! Every user and conversation hashes to one of [`PARTITIONS`] partitions; each partition has
//! exactly one owner, today a shard of this process. Roles ask [`Placement`] where a key lives
//! and address envelopes to the answer, so that an owner can later become (node, shard) without
//! any role knowing whether its peer is on the same core, another core or another machine.
//!
//! Key types: [`Placement`], [`Owner`].

use tim_shards::{mix64, partition_of, PARTITIONS};

use crate::{envelope::SessionRef, store::UserId};

/// The owner of a partition: the shard that holds its keys' live state.
pub type Owner = usize;

/// Where keys live, for a process of `shards` shards.
#[derive(Clone, Copy, Debug)]
pub struct Placement {
    shards: usize,
}

impl Placement {
    pub fn new(shards: usize) -> Placement {
        assert!(shards > 0, "at least one shard");
        Placement { shards }
    }

    pub fn shards(&self) -> usize {
        self.shards
    }

    /// The owner of a partition.
    #[inline]
    pub fn owner_of_partition(&self, partition: u32) -> Owner {
        debug_assert!(partition < PARTITIONS);
        tim_shards::shard_of_partition(partition, self.shards)
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
        session.shard()
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
    Placement::new(shards).user(user)
}

/// The shard owning a 1:1 conversation (see [`Placement::conv`]).
#[inline]
pub fn conv_shard(key: (UserId, UserId), shards: usize) -> usize {
    Placement::new(shards).conv(key)
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
            assert_eq!(p.user(u), tim_shards::shard_of(mix64(u), 3));
            seen[p.user(u)] += 1;
            let k = direct_key(u, u * 7);
            assert_eq!(p.conv(k), tim_shards::shard_of(conv_hash(k), 3));
        }
        assert!(seen.iter().all(|&n| n > 500), "{seen:?}");
        assert_eq!(direct_key(9, 2), (2, 9));
    }
}
