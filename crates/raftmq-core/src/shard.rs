//! Shards of the durable state (RFC 0002, sections 3.1 and 3.2): which Raft group a client's
//! session or a retained topic belongs to.
//!
//! The durable state is split into `S` data shards with ids `1..=S`, each its own Raft group;
//! group id 0 is the metadata group. A key (a client id, a retained message's topic) lives in
//! shard [`shard_of`]`(key, S) = 1 + mix(fnv1a64(key)) mod S`, where `fnv1a64` is FNV-1a 64 and
//! `mix` the 64-bit finalizer of MurmurHash3.
//!
//! **This function is frozen**: it decides where data lives on disk and across the cluster, so
//! changing it (or [`hash`]) would misplace every stored session. The unit tests pin its output
//! on golden vectors that must never change.
//!
//! Until the sharded cluster lands, one data group holds everything: [`ShardId::FIRST_DATA`].

use std::fmt;
use std::num::NonZeroU32;

/// FNV-1a 64 offset basis.
const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64 prime.
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The id of a Raft group of the durable state: 0 is the metadata group, `1..=S` the data
/// shards. Stored as the 4-byte big-endian prefix of every key of the group in the node's
/// store, and as `shard_id` in the group's messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(u32);

impl ShardId {
    /// The metadata group (members, shard map, node-down decisions).
    pub const METADATA: ShardId = ShardId(0);
    /// The first data shard; until the cluster is sharded, the one data group.
    pub const FIRST_DATA: ShardId = ShardId(1);

    /// The shard with id `id` (0 is the metadata group).
    pub const fn new(id: u32) -> ShardId {
        ShardId(id)
    }

    /// The numeric id.
    pub const fn get(self) -> u32 {
        self.0
    }

    /// Whether this is the metadata group (id 0).
    pub const fn is_metadata(self) -> bool {
        self.0 == 0
    }
}

impl fmt::Display for ShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<ShardId> for u32 {
    fn from(id: ShardId) -> u32 {
        id.0
    }
}

impl From<ShardId> for u64 {
    fn from(id: ShardId) -> u64 {
        u64::from(id.0)
    }
}

/// The number of data shards `S` of a cluster: `1..=`[`ShardCount::MAX`], fixed when the cluster
/// is created (`cluster.shards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ShardCount(NonZeroU32);

impl ShardCount {
    /// The largest shard count a cluster may be created with.
    pub const MAX: u32 = 1024;
    /// The default shard count (RFC 0002, section 3.1).
    pub const DEFAULT: ShardCount = ShardCount(NonZeroU32::new(64).expect("64 is not zero"));
    /// One data shard: what a node runs until the cluster is sharded.
    pub const ONE: ShardCount = ShardCount(NonZeroU32::MIN);

    /// `Some` when `count` is in `1..=MAX`.
    pub const fn new(count: u32) -> Option<ShardCount> {
        match NonZeroU32::new(count) {
            Some(n) if count <= Self::MAX => Some(ShardCount(n)),
            _ => None,
        }
    }

    /// The count.
    pub const fn get(self) -> u32 {
        self.0.get()
    }

    /// The data shards, `1..=S` in order.
    pub fn shards(self) -> impl Iterator<Item = ShardId> {
        (1..=self.get()).map(ShardId)
    }
}

impl Default for ShardCount {
    fn default() -> Self {
        ShardCount::DEFAULT
    }
}

/// FNV-1a 64 of `bytes`.
const fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash = FNV_OFFSET_BASIS;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(FNV_PRIME);
        i += 1;
    }
    hash
}

/// The 64-bit finalizer of MurmurHash3 (`fmix64`): spreads FNV's poorly mixed low bits.
const fn mix(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// The frozen shard hash of a key: `mix(fnv1a64(key))`. Client ids and topics are hashed as
/// the UTF-8 bytes the client sent, without normalisation.
pub const fn hash(key: &[u8]) -> u64 {
    mix(fnv1a64(key))
}

/// The data shard of `key` among `shards`: `1 + hash(key) mod S`.
pub const fn shard_of(key: &[u8], shards: ShardCount) -> ShardId {
    // The remainder is below S <= MAX, so it fits a u32 and `1 +` cannot overflow.
    ShardId(1 + (hash(key) % shards.0.get() as u64) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 0002, section 3.2. These values must never change: they decide where stored
    /// sessions and retained messages live.
    #[test]
    fn golden_vectors_never_change() {
        let s64 = ShardCount::new(64).expect("valid");
        let s128 = ShardCount::new(128).expect("valid");
        let vectors: [(&str, u64, u32, u32); 4] = [
            ("", 0xefd0_1f60_ba99_2926, 39, 39),
            ("client-1", 0xf93b_d2c1_6ac6_882d, 46, 46),
            ("sensor/42", 0x982e_3382_5b38_d8a4, 37, 37),
            ("gerät-7", 0xcd24_8509_245b_c2c1, 2, 66),
        ];
        for (key, h, in64, in128) in vectors {
            assert_eq!(hash(key.as_bytes()), h, "hash of {key:?}");
            assert_eq!(
                shard_of(key.as_bytes(), s64),
                ShardId::new(in64),
                "{key:?}, S=64"
            );
            assert_eq!(
                shard_of(key.as_bytes(), s128),
                ShardId::new(in128),
                "{key:?}, S=128"
            );
        }
        assert_eq!(fnv1a64(b""), FNV_OFFSET_BASIS);
    }

    #[test]
    fn sequential_ids_spread_evenly() {
        // RFC 0002, 3.2: 100,000 sequential ids over 64 shards, 1,446 to 1,671 per shard.
        let mut counts = [0u32; 64];
        for i in 1..=100_000u32 {
            let shard = shard_of(format!("device-{i:06}").as_bytes(), ShardCount::DEFAULT);
            counts[(shard.get() - 1) as usize] += 1;
        }
        assert_eq!(counts.iter().min(), Some(&1_446));
        assert_eq!(counts.iter().max(), Some(&1_671));
    }

    #[test]
    fn every_key_lands_in_a_data_shard() {
        for count in [1, 2, 7, 64, ShardCount::MAX] {
            let shards = ShardCount::new(count).expect("valid");
            for key in ["", "a", "client-1", "\u{0}", "🦀/topic/#"] {
                let shard = shard_of(key.as_bytes(), shards);
                assert!(!shard.is_metadata());
                assert!((1..=count).contains(&shard.get()), "{key:?} in {count}");
            }
        }
        assert_eq!(
            shard_of(b"anything", ShardCount::ONE),
            ShardId::FIRST_DATA,
            "one shard holds everything"
        );
    }

    #[test]
    fn shard_counts_are_validated() {
        assert_eq!(ShardCount::new(0), None);
        assert_eq!(ShardCount::new(ShardCount::MAX + 1), None);
        assert_eq!(ShardCount::new(u32::MAX), None);
        assert_eq!(ShardCount::new(1), Some(ShardCount::ONE));
        assert_eq!(ShardCount::default().get(), 64);
        let all: Vec<u32> = ShardCount::new(3)
            .expect("valid")
            .shards()
            .map(ShardId::get)
            .collect();
        assert_eq!(all, [1, 2, 3]);
    }

    #[test]
    fn ids() {
        assert!(ShardId::METADATA.is_metadata());
        assert!(!ShardId::FIRST_DATA.is_metadata());
        assert_eq!(u64::from(ShardId::new(7)), 7);
        assert_eq!(u32::from(ShardId::new(7)), 7);
        assert_eq!(ShardId::new(12).to_string(), "12");
    }
}
