//! raftmq-store: the node's persistent storage — the Raft logs and the bytes of the replicated
//! state machines of every Raft group (shard) of the node — in one RocksDB instance.
//!
//! # What this crate owns
//!
//! * [`Store`]: opens the database directory ([`Store::open`]) and hands out handles per shard:
//!   [`Store::log_store`] and [`Store::state_db`] take the shard id (a `u32`: `0` for the
//!   metadata group, `1..=S` for the data shards; the store gives ids no meaning).
//! * [`LogStore<C>`]: openraft 0.9's `RaftLogStorage<C>` + `RaftLogReader<C>` of one shard,
//!   generic over the Raft type config `C`.
//! * [`StateDb`]: a small key/value API (column family, key, value as bytes) for one shard's
//!   replicated state machine, which lives in another crate: point reads, ordered
//!   prefix/range scans, atomic [`StateBatch`]es, consistent [`StateSnapshot`]s, and snapshot
//!   export/import as a versioned byte stream ([`SnapshotStream`]).
//! * The WAL syncer: one thread that makes the log writes of every shard durable with one
//!   `fsync` of the shared write-ahead log (see Durability).
//! * [`StoreError`], convertible into openraft's `StorageError`.
//!
//! **This is the only crate of the workspace that links RocksDB**; no RocksDB type appears in its
//! public API (apart from the `#[source]` of [`StoreError`]). It must never contain broker
//! logic: it knows nothing about MQTT, sessions or topics beyond the *names* of the state column
//! families. Key layouts and value encodings of the state column families belong to the state
//! machine crate; here they are opaque bytes.
//!
//! # Column families (store format 2)
//!
//! Every key of `raft_log`, `raft_meta` and the state column families starts with its
//! shard's id as a 4-byte big-endian integer (`shard`, below), so each shard's keys are one
//! contiguous range: the shards share the column families (and the WAL) without seeing each
//! other. A [`StateDb`] adds the prefix on writes and strips it on reads.
//!
//! | column family | key | value | owner |
//! |---|---|---|---|
//! | `default` | `raftmq_store_format` | format version, `u32` big-endian (currently 2) | [`Store`] |
//! | `raft_log` | shard ‖ log index, `u64` big-endian (12 bytes, so byte order = index order) | postcard of `C::Entry` | [`LogStore`] |
//! | `raft_meta` | shard ‖ `vote` | postcard of `Vote<NodeId>` | [`LogStore`] |
//! | `raft_meta` | shard ‖ `last_purged_log_id` | postcard of `LogId<NodeId>` | [`LogStore`] |
//! | `raft_meta` | shard ‖ `committed` | postcard of `Option<LogId<NodeId>>` | [`LogStore`] |
//! | `sessions` | shard ‖ opaque | opaque | [`StateDb`], [`StateCf::Sessions`] (id 1) |
//! | `subscriptions` | shard ‖ opaque | opaque | [`StateDb`], [`StateCf::Subscriptions`] (id 2) |
//! | `messages` | shard ‖ opaque | opaque | [`StateDb`], [`StateCf::Messages`] (id 3) |
//! | `session_messages` | shard ‖ opaque | opaque | [`StateDb`], [`StateCf::SessionMessages`] (id 4) |
//! | `retained` | shard ‖ opaque | opaque | [`StateDb`], [`StateCf::Retained`] (id 5) |
//! | `sm_meta` | shard ‖ opaque | opaque | [`StateDb`], [`StateCf::SmMeta`] (id 6) |
//!
//! Keys of every column family are compared bytewise (RocksDB's default comparator), so
//! big-endian integers sort numerically. All column families use LZ4 compression and share one
//! write-ahead log. The database is opened with `create_if_missing`,
//! `create_missing_column_families` and at most [`StoreConfig::max_open_files`] (default 1024)
//! open SST files.
//!
//! **Format 1** (the single-group releases: the same column families, keys without a shard
//! prefix) is refused by [`Store::open`] with [`StoreError::IncompatibleFormat`] (`found: 1`),
//! as is any other format: an existing database's marker is read through a read-only open
//! first, so nothing is written to a refused data dir (RocksDB's info log `LOG` excepted).
//!
//! # Migration from format 1
//!
//! [`Store::migrate_format_1`] turns a format-1 store into format 2, every key going to one
//! shard (the caller's [`Migration`]): a `raft_log` key (8 bytes) becomes the 12-byte log key
//! of that shard, every other key gets the shard prefix, values are copied byte for byte except
//! log entries the caller's rewrite changes (their encoding is the caller's). It copies into
//! `<path>.migrating` in synced chunks, each recording a resume cursor, stamps the copy format 2
//! last, then renames `<path>` to `<path>.format-1` and the copy to `<path>`. A crash at any
//! point leaves the format-1 store (resumed by the next call) or a finished copy (whose renames
//! the next call completes); see `migrate.rs` for why it copies instead of rewriting in place.
//!
//! # Durability
//!
//! Raft log writes (appends, votes, truncations, purges) are written to the WAL without
//! `fsync` (readable at once), and the store's **WAL syncer** thread makes them durable: it
//! takes every write waiting, syncs the shared WAL once (`flush_wal(true)`), and completes
//! them all, in order: an append's openraft `LogFlushed` callback fires from there, and
//! `save_vote`, `truncate` and `purge` await it before they return. A write is never reported
//! durable before a sync that started after it returned; a failed sync fails every write it
//! covered (openraft stops the groups concerned, as on any storage error). Writes that arrive
//! during a sync wait for the next one: group commit across every shard, with no timer, so the
//! node's fsync rate is bounded by the fsync latency whatever the number of shards, and no
//! runtime worker ever waits for an `fsync`.
//!
//! State writes ([`StateDb::write`]) go to the WAL without `fsync` either: they survive a
//! process crash, and since the WAL is shared, the next sync makes them durable too — in
//! particular before a purge removes the log entries that could rebuild them (a purge awaits
//! its sync). A state machine that stores its last applied log id in the same [`StateBatch`]
//! as the effects of that entry is therefore always consistent after a restart.
//! [`StateDb::write_sync`] and [`StateDb::sync`] exist for callers that need more.
//!
//! For tests, [`inject_disk_faults`] makes every sync of the WAL syncer slower while a file
//! asks for it (a stalled `fsync`; the `cluster.disk_faults_file` setting), and
//! [`Store::inject_sync_faults`] makes them fail.
//!
//! # Snapshot stream format (version 1)
//!
//! A snapshot of one shard's state column families is a byte stream that can be cut into
//! chunks at any byte (the receiver concatenates them), e.g. to be streamed over gRPC. Keys are
//! written without the shard prefix, so the stream of a shard's state does not depend on the
//! shard it was taken from, and installing it ([`StateDb::import_snapshot`]) replaces the
//! state of the receiving handle's shard only:
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
//! the whole stream before replacing the shard's state atomically (its old keys are deleted,
//! not merged).
//! A new format gets a new version number; readers reject versions they do not know.

mod codec;
mod db;
mod error;
mod faults;
mod layout;
mod log_store;
mod migrate;
mod snapshot;
mod state;
mod syncer;

pub use db::{Store, StoreConfig};
pub use error::{SnapshotFormatError, StoreError};
pub use faults::inject_disk_faults;
pub use layout::StateCf;
pub use log_store::LogStore;
pub use migrate::{
    DEFAULT_MIGRATION_CHUNK_BYTES, Migration, MigrationEvent, MigrationOutcome, MigrationReport,
};
pub use snapshot::{
    DEFAULT_CHUNK_SIZE, SNAPSHOT_FORMAT_VERSION, SNAPSHOT_MAGIC, SnapshotStats, SnapshotStream,
    StateSnapshot,
};
pub use state::{BatchOp, KeyValue, StateBatch, StateDb, StateIter};

/// Time of one RocksDB write batch (histogram), by `kind`: `log_append` (Raft log entries,
/// written to the WAL; the WAL syncer makes them durable) or `state` (one applied entry's
/// state machine changes).
pub const STORE_WRITE_SECONDS: &str = "raftmq_store_write_seconds";
/// Bytes the store occupies (SST files and memtables, all column families).
pub const STORE_SIZE_BYTES: &str = "raftmq_store_size_bytes";
/// Time of one sync (`fsync`) of the write-ahead log by the WAL syncer (histogram).
pub const WAL_SYNC_SECONDS: &str = "raftmq_store_wal_sync_seconds";
/// Log writes (appends, votes, truncations, purges, of every shard) made durable by one sync
/// of the WAL syncer (histogram): the group commit across shards.
pub const WAL_WRITES_PER_BATCH: &str = "raftmq_store_wal_writes_per_batch";
/// Syncs of the write-ahead log that failed (counter); each failed every write it covered.
pub const WAL_SYNC_FAILURES_TOTAL: &str = "raftmq_store_wal_sync_failures_total";
