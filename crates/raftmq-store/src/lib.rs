//! raftmq-store: the node's persistent storage — the Raft log and the bytes of the replicated
//! state machine — in one RocksDB instance.
//!
//! # What this crate owns
//!
//! * [`Store`]: opens the database directory ([`Store::open`]) and hands out the two handles.
//! * [`LogStore<C>`]: openraft 0.9's `RaftLogStorage<C>` + `RaftLogReader<C>`, generic over the
//!   Raft type config `C`.
//! * [`StateDb`]: a small key/value API (column family, key, value as bytes) for the replicated
//!   state machine, which lives in another crate: point reads, ordered prefix/range scans, atomic
//!   [`StateBatch`]es, consistent [`StateSnapshot`]s, and snapshot export/import as a versioned
//!   byte stream ([`SnapshotStream`]).
//! * [`StoreError`], convertible into openraft's `StorageError`.
//!
//! **This is the only crate of the workspace that links RocksDB**; no RocksDB type appears in its
//! public API (apart from the `#[source]` of [`StoreError`]). It must never contain broker
//! logic: it knows nothing about MQTT, sessions or topics beyond the *names* of the state column
//! families. Key layouts and value encodings of the state column families belong to the state
//! machine crate; here they are opaque bytes.
//!
//! # Column families
//!
//! | column family | key | value | owner |
//! |---|---|---|---|
//! | `default` | `raftmq_store_format` | format version, `u32` big-endian (currently 1) | [`Store`] |
//! | `raft_log` | log index, `u64` big-endian (8 bytes, so byte order = index order) | postcard of `C::Entry` | [`LogStore`] |
//! | `raft_meta` | `vote` | postcard of `Vote<NodeId>` | [`LogStore`] |
//! | `raft_meta` | `last_purged_log_id` | postcard of `LogId<NodeId>` | [`LogStore`] |
//! | `raft_meta` | `committed` | postcard of `Option<LogId<NodeId>>` | [`LogStore`] |
//! | `sessions` | opaque | opaque | [`StateDb`], [`StateCf::Sessions`] (id 1) |
//! | `subscriptions` | opaque | opaque | [`StateDb`], [`StateCf::Subscriptions`] (id 2) |
//! | `messages` | opaque | opaque | [`StateDb`], [`StateCf::Messages`] (id 3) |
//! | `session_messages` | opaque | opaque | [`StateDb`], [`StateCf::SessionMessages`] (id 4) |
//! | `retained` | opaque | opaque | [`StateDb`], [`StateCf::Retained`] (id 5) |
//! | `sm_meta` | opaque | opaque | [`StateDb`], [`StateCf::SmMeta`] (id 6) |
//!
//! Keys of every column family are compared bytewise (RocksDB's default comparator), so
//! big-endian integers sort numerically. All column families use LZ4 compression and share one
//! write-ahead log. The database is opened with `create_if_missing`,
//! `create_missing_column_families` and at most [`StoreConfig::max_open_files`] (default 1024)
//! open SST files.
//!
//! # Durability
//!
//! Log appends, votes, truncation and purges are synced (`fsync`) before they return (appends
//! call openraft's `LogFlushed` callback only then). State writes ([`StateDb::write`]) go to
//! the WAL without `fsync`: they survive a process crash, and since the WAL is shared, the next
//! synced log write makes them durable too — in particular before a purge removes the log
//! entries that could rebuild them. A state machine that stores its last applied log id in the
//! same [`StateBatch`] as the effects of that entry is therefore always consistent after a
//! restart. [`StateDb::write_sync`] and [`StateDb::sync`] exist for callers that need more.
//!
//! For tests, [`inject_disk_faults`] makes every synced log write slower while a file asks for
//! it (a stalled `fsync`; the `cluster.disk_faults_file` setting).
//!
//! # Snapshot stream format (version 1)
//!
//! A snapshot of the state column families is a byte stream that can be cut into chunks at any
//! byte (the receiver concatenates them), e.g. to be streamed over gRPC:
//!
//! ```text
//! header  = magic "RMQSNAP\0" (8 bytes) | version u16 = 1 | flags u16 = 0
//! record  = 0x01 | cf id u8 | key length u32 | key | value length u32 | value
//! trailer = 0x00 | record count u64 | CRC-32 u32
//! stream  = header record* trailer
//! ```
//!
//! All integers are big-endian. The column family id is [`StateCf::id`] (1..=6). Records come
//! in ascending column family id, then ascending key order. The CRC-32 (IEEE) covers every byte
//! of the stream before it (header, records, the trailer's tag and count). Nothing may follow
//! the trailer. A stream is produced from one RocksDB snapshot ([`StateDb::snapshot`]), so it
//! is consistent and writes continue while it is built; [`StateDb::import_snapshot`] verifies
//! the whole stream before replacing the state atomically (old keys are deleted, not merged).
//! A new format gets a new version number; readers reject versions they do not know.

mod codec;
mod db;
mod error;
mod faults;
mod layout;
mod log_store;
mod snapshot;
mod state;

pub use db::{Store, StoreConfig};
pub use error::{SnapshotFormatError, StoreError};
pub use faults::inject_disk_faults;
pub use layout::StateCf;
pub use log_store::LogStore;
pub use snapshot::{
    DEFAULT_CHUNK_SIZE, SNAPSHOT_FORMAT_VERSION, SNAPSHOT_MAGIC, SnapshotStats, SnapshotStream,
    StateSnapshot,
};
pub use state::{BatchOp, KeyValue, StateBatch, StateDb, StateIter};

/// Time of one RocksDB write batch (histogram), by `kind`: `log_append` (Raft log entries,
/// fsynced) or `state` (one applied entry's state machine changes).
pub const STORE_WRITE_SECONDS: &str = "raftmq_store_write_seconds";
/// Bytes the store occupies (SST files and memtables, all column families).
pub const STORE_SIZE_BYTES: &str = "raftmq_store_size_bytes";
