//! The partition map: every key hashes to one of [`PARTITIONS`] partitions, and every partition is
//! owned by exactly one shard. Both steps are plain functions so that any shard (and, later, any
//! node) computes the same owner without asking anyone.

/// Number of partitions. A power of two, fixed for the life of a deployment: stored data is placed
/// by it.
pub const PARTITIONS: u32 = 4096;
const _: () = assert!(PARTITIONS.is_power_of_two());

/// A fast, well-mixing 64-bit finalizer (splitmix64). Ids are often sequential; this spreads them.
#[inline]
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The partition of an already-mixed key hash.
#[inline]
pub fn partition_of(key_hash: u64) -> u32 {
    (key_hash >> 32) as u32 & (PARTITIONS - 1)
}

/// The shard that owns a partition when `shards` shards run.
#[inline]
pub fn shard_of_partition(partition: u32, shards: usize) -> usize {
    debug_assert!(shards > 0);
    partition as usize % shards
}

/// key hash → partition → shard.
#[inline]
pub fn shard_of(key_hash: u64, shards: usize) -> usize {
    shard_of_partition(partition_of(key_hash), shards)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sequential ids spread evenly over partitions and shards.
    #[test]
    fn spreads_sequential_ids() {
        let shards = 3;
        let mut per_shard = vec![0u32; shards];
        let mut per_partition = vec![0u32; PARTITIONS as usize];
        let n = 400_000u64;
        for id in 1..=n {
            let h = mix64(id);
            per_partition[partition_of(h) as usize] += 1;
            per_shard[shard_of(h, shards)] += 1;
        }
        let expect = n as f64 / shards as f64;
        for c in per_shard {
            assert!((c as f64 - expect).abs() / expect < 0.02, "shard count {c}");
        }
        let expect_p = n as f64 / PARTITIONS as f64;
        assert!(per_partition.iter().all(|&c| (c as f64) > expect_p * 0.6));
    }

    /// The map is a pure function: the same key always lands on the same shard.
    #[test]
    fn stable() {
        for id in 0..1000u64 {
            assert_eq!(shard_of(mix64(id), 4), shard_of(mix64(id), 4));
            assert!(shard_of(mix64(id), 4) < 4);
        }
    }
}
