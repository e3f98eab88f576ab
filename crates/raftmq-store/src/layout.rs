//! Column family names, ids and key encodings (see the crate docs for the full table).

/// Column family holding the Raft log: key = shard prefix ‖ big-endian `u64` index, value =
/// postcard entry.
pub(crate) const CF_RAFT_LOG: &str = "raft_log";
/// Column family holding Raft metadata (vote, last purged log id, committed log id).
pub(crate) const CF_RAFT_META: &str = "raft_meta";
/// RocksDB's mandatory default column family; holds only node-wide markers: the store format
/// and the shard count the cluster was created with.
pub(crate) const CF_DEFAULT: &str = "default";

/// Key in `raft_meta` (after the shard prefix): the last saved vote.
pub(crate) const META_VOTE: &[u8] = b"vote";
/// Key in `raft_meta` (after the shard prefix): the last purged log id.
pub(crate) const META_LAST_PURGED: &[u8] = b"last_purged_log_id";
/// Key in `raft_meta` (after the shard prefix): the last saved committed log id.
pub(crate) const META_COMMITTED: &[u8] = b"committed";

/// Key in `default`: the on-disk format version (big-endian `u32`).
pub(crate) const FORMAT_KEY: &[u8] = b"raftmq_store_format";
/// The on-disk format version written and understood by this build: 2, every key starts with
/// its shard's 4-byte prefix. Version 1 (one Raft group, keys without a prefix) is refused.
pub(crate) const FORMAT_VERSION: u32 = 2;

/// Key in `default`: the number of data shards of the cluster this store belongs to
/// (big-endian `u32`), recorded when the node first starts on it and fixed afterwards.
pub(crate) const SHARD_COUNT_KEY: &[u8] = b"raftmq_shard_count";

/// Key in `default`: the message ids this node has reserved (big-endian `u64`: every id it
/// gave out, in any of its processes, is below it), so that a restarted process never gives
/// out an id again.
pub(crate) const MESSAGE_IDS_KEY: &[u8] = b"raftmq_message_ids_reserved";

/// Length of the shard prefix of every key of `raft_log`, `raft_meta` and the state column
/// families.
pub(crate) const SHARD_PREFIX_LEN: usize = 4;

/// The column families of the replicated state machine, managed through [`StateDb`].
///
/// The numeric id (`as u8`) is part of the snapshot format and must never be reused or
/// renumbered; the name is the RocksDB column family name and must never change either.
///
/// [`StateDb`]: crate::StateDb
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum StateCf {
    /// Client sessions, keyed by client id.
    Sessions = 1,
    /// Subscriptions, keyed by client id then topic filter.
    Subscriptions = 2,
    /// Stored QoS 1/2 message bodies.
    Messages = 3,
    /// Per-session queues / in-flight references to `messages`.
    SessionMessages = 4,
    /// Retained messages, keyed by topic.
    Retained = 5,
    /// State machine metadata (last applied log id, membership, ...).
    SmMeta = 6,
}

impl StateCf {
    /// Every state column family, in snapshot order (ascending id).
    pub const ALL: [StateCf; 6] = [
        StateCf::Sessions,
        StateCf::Subscriptions,
        StateCf::Messages,
        StateCf::SessionMessages,
        StateCf::Retained,
        StateCf::SmMeta,
    ];

    /// The RocksDB column family name.
    pub const fn name(self) -> &'static str {
        match self {
            StateCf::Sessions => "sessions",
            StateCf::Subscriptions => "subscriptions",
            StateCf::Messages => "messages",
            StateCf::SessionMessages => "session_messages",
            StateCf::Retained => "retained",
            StateCf::SmMeta => "sm_meta",
        }
    }

    /// The stable id used in snapshot streams.
    pub const fn id(self) -> u8 {
        self as u8
    }

    /// Inverse of [`StateCf::id`].
    pub const fn from_id(id: u8) -> Option<StateCf> {
        match id {
            1 => Some(StateCf::Sessions),
            2 => Some(StateCf::Subscriptions),
            3 => Some(StateCf::Messages),
            4 => Some(StateCf::SessionMessages),
            5 => Some(StateCf::Retained),
            6 => Some(StateCf::SmMeta),
            _ => None,
        }
    }
}

impl std::fmt::Display for StateCf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Every column family `Store::open` creates.
pub(crate) fn all_cf_names() -> Vec<&'static str> {
    let mut names = vec![CF_DEFAULT, CF_RAFT_LOG, CF_RAFT_META];
    names.extend(StateCf::ALL.iter().map(|cf| cf.name()));
    names
}

/// The key prefix of every key of shard `shard`: its id, big-endian (so a shard's keys are one
/// contiguous range, and shards sort by id).
pub(crate) const fn shard_prefix(shard: u32) -> [u8; SHARD_PREFIX_LEN] {
    shard.to_be_bytes()
}

/// `prefix ‖ key`.
pub(crate) fn prefixed(prefix: &[u8; SHARD_PREFIX_LEN], key: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(SHARD_PREFIX_LEN + key.len());
    out.extend_from_slice(prefix);
    out.extend_from_slice(key);
    out
}

/// Key of a log entry of shard `shard`: the shard prefix then the index, both big-endian, so
/// that byte order is numeric order within the shard.
pub(crate) fn log_key(shard: u32, index: u64) -> [u8; SHARD_PREFIX_LEN + 8] {
    let mut key = [0u8; SHARD_PREFIX_LEN + 8];
    key[..SHARD_PREFIX_LEN].copy_from_slice(&shard_prefix(shard));
    key[SHARD_PREFIX_LEN..].copy_from_slice(&index.to_be_bytes());
    key
}

/// Smallest key strictly greater than every key starting with `prefix`, or `None` when no
/// such key exists (`prefix` is empty or all `0xFF`): then the range is unbounded above.
pub(crate) fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last != u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// Smallest key strictly greater than `key` (`key` followed by a zero byte).
pub(crate) fn key_successor(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_unique() {
        for cf in StateCf::ALL {
            assert_eq!(StateCf::from_id(cf.id()), Some(cf));
        }
        assert_eq!(StateCf::from_id(0), None);
        assert_eq!(StateCf::from_id(7), None);
        let names = all_cf_names();
        let mut dedup = names.clone();
        dedup.sort_unstable();
        dedup.dedup();
        assert_eq!(names.len(), dedup.len());
    }

    #[test]
    fn successors() {
        assert_eq!(prefix_successor(b""), None);
        assert_eq!(prefix_successor(&[0xFF, 0xFF]), None);
        assert_eq!(prefix_successor(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_successor(&[1, 0xFF]), Some(vec![2]));
        assert_eq!(key_successor(b"a"), b"a\0".to_vec());
        assert!(log_key(1, 1) < log_key(1, 256));
        assert!(log_key(1, u64::MAX) < log_key(2, 0));
        assert_eq!(log_key(0x0102_0304, 5)[..4], [1, 2, 3, 4]);
        assert_eq!(prefixed(&shard_prefix(1), b"k"), [0, 0, 0, 1, b'k']);
    }
}
