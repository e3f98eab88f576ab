//! The error type of this crate and its conversion into openraft's `StorageError`.

use std::path::PathBuf;

use openraft::{AnyError, ErrorSubject, ErrorVerb, NodeId, StorageError, StorageIOError};

/// Everything that can go wrong in the store.
///
/// RocksDB and codec errors are kept as `#[source]` so that the full chain is reported; callers
/// outside this crate only need `Display`/`Error` and never have to name a RocksDB type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database could not be opened (locked by another process, corrupt, no permission...).
    #[error("cannot open the store at {}: {source}", path.display())]
    Open {
        /// Directory of the database.
        path: PathBuf,
        /// The RocksDB error.
        #[source]
        source: rocksdb::Error,
    },

    /// A RocksDB operation failed.
    #[error("RocksDB {op} failed: {source}")]
    Backend {
        /// What the store was doing, e.g. `"write"`, `"get"`, `"iterate"`.
        op: &'static str,
        /// The RocksDB error.
        #[source]
        source: rocksdb::Error,
    },

    /// A fault injected by a test ([`crate::StateDb::inject_read_faults`]).
    #[error("injected {op} fault")]
    InjectedFault {
        /// The operation that was made to fail.
        op: &'static str,
    },

    /// A column family that `Store::open` always creates is missing (a bug, never expected).
    #[error("column family `{0}` is missing")]
    MissingColumnFamily(&'static str),

    /// The on-disk layout was written by an incompatible version of this crate.
    #[error(
        "the store at {} has format version {found}, this build supports version {supported}",
        path.display()
    )]
    IncompatibleFormat {
        /// Directory of the database.
        path: PathBuf,
        /// The version found on disk.
        found: u32,
        /// The version this build reads and writes.
        supported: u32,
    },

    /// Migrating a format-1 store to format 2 failed at `step`
    /// ([`Store::migrate_format_1`](crate::Store::migrate_format_1)). The format-1 store is
    /// left as it was (or, once the copy is complete, the next start finishes the renames); a
    /// new start resumes the copy.
    #[error(
        "migrating the store at {} from format 1 to format 2 failed while {step}: {source}",
        path.display()
    )]
    Migration {
        /// Directory of the (format-1) store.
        path: PathBuf,
        /// What the migration was doing.
        step: String,
        /// Why it failed.
        #[source]
        source: Box<StoreError>,
    },

    /// A format-1 store this build will not migrate as it is found; nothing was written.
    #[error("cannot migrate the store at {} to format 2: {detail}", path.display())]
    MigrationBlocked {
        /// Directory of the store.
        path: PathBuf,
        /// Why, and what to do.
        detail: String,
    },

    /// The rewrite of a format-1 log entry refused it.
    #[error("log entry {index}: {reason}")]
    LogEntryRewrite {
        /// Index of the entry.
        index: u64,
        /// Why it cannot be migrated.
        reason: String,
    },

    /// The sync of the write-ahead log that was to make a log write durable failed (the same
    /// error for every write it covered).
    #[error("syncing the write-ahead log failed: {0}")]
    WalSync(#[source] std::sync::Arc<StoreError>),

    /// The WAL syncer ended before it made a write durable (the store is closing).
    #[error("the WAL syncer stopped")]
    SyncerStopped,

    /// A value could not be serialized.
    #[error("cannot encode {what}: {source}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The codec error.
        #[source]
        source: postcard::Error,
    },

    /// A stored value could not be deserialized (corruption or incompatible type config).
    #[error("cannot decode {what}: {source}")]
    Decode {
        /// What was being decoded.
        what: &'static str,
        /// The codec error.
        #[source]
        source: postcard::Error,
    },

    /// A stored key does not have the expected shape (e.g. a log key that is not 8 bytes).
    #[error("corrupt key in column family `{cf}`: {detail}")]
    CorruptKey {
        /// Column family name.
        cf: &'static str,
        /// What is wrong.
        detail: String,
    },

    /// A stored value does not have the expected shape (e.g. a shard count that is not 4
    /// bytes).
    #[error("corrupt value of {what}: {detail}")]
    CorruptValue {
        /// What the value is.
        what: &'static str,
        /// What is wrong.
        detail: String,
    },

    /// A snapshot stream is not valid; nothing was imported.
    #[error("invalid snapshot stream: {0}")]
    Snapshot(#[from] SnapshotFormatError),

    /// Reading or writing a snapshot stream failed.
    #[error("snapshot stream I/O failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a snapshot stream was rejected by `StateDb::import_snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotFormatError {
    /// The stream does not start with the snapshot magic.
    #[error("bad magic (not a raftmq state snapshot)")]
    BadMagic,
    /// The stream uses a format version this build cannot read.
    #[error("unsupported snapshot format version {0}")]
    UnsupportedVersion(u16),
    /// Reserved header flags are set.
    #[error("unsupported snapshot flags {0:#06x}")]
    UnsupportedFlags(u16),
    /// A record names an unknown column family id.
    #[error("unknown column family id {0}")]
    UnknownColumnFamily(u8),
    /// A record starts with an unknown tag.
    #[error("unknown record tag {0:#04x}")]
    UnknownRecordTag(u8),
    /// The stream ended before the end record.
    #[error("truncated stream")]
    Truncated,
    /// The end record's count does not match the records read.
    #[error("record count mismatch: trailer says {expected}, read {actual}")]
    RecordCountMismatch {
        /// Count stored in the trailer.
        expected: u64,
        /// Records actually read.
        actual: u64,
    },
    /// The CRC-32 of the stream does not match the trailer.
    #[error("checksum mismatch: trailer says {expected:#010x}, computed {actual:#010x}")]
    ChecksumMismatch {
        /// Checksum stored in the trailer.
        expected: u32,
        /// Checksum computed over the bytes read.
        actual: u32,
    },
    /// Bytes follow the end record.
    #[error("trailing data after the end record")]
    TrailingData,
    /// A key or value is too long to be encoded (over `u32::MAX` bytes).
    #[error("record too large to encode ({0} bytes)")]
    RecordTooLarge(usize),
}

impl StoreError {
    pub(crate) fn backend(op: &'static str) -> impl FnOnce(rocksdb::Error) -> Self {
        move |source| StoreError::Backend { op, source }
    }

    /// Converts into openraft's storage error, tagged with what was being done.
    ///
    /// openraft treats any `StorageError` as fatal for the Raft node (it shuts down rather than
    /// risk diverging state), which is the right reaction to a failing disk.
    pub fn into_storage_error<NID: NodeId>(
        self,
        subject: ErrorSubject<NID>,
        verb: ErrorVerb,
    ) -> StorageError<NID> {
        StorageIOError::new(subject, verb, AnyError::new(&self)).into()
    }

    /// Shorthand for a failed state machine read.
    pub fn read_state_machine<NID: NodeId>(self) -> StorageError<NID> {
        self.into_storage_error(ErrorSubject::StateMachine, ErrorVerb::Read)
    }

    /// Shorthand for a failed state machine write.
    pub fn write_state_machine<NID: NodeId>(self) -> StorageError<NID> {
        self.into_storage_error(ErrorSubject::StateMachine, ErrorVerb::Write)
    }

    /// Shorthand for a failed snapshot read (building or streaming one).
    pub fn read_snapshot<NID: NodeId>(self) -> StorageError<NID> {
        self.into_storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Read)
    }

    /// Shorthand for a failed snapshot write (installing one).
    pub fn write_snapshot<NID: NodeId>(self) -> StorageError<NID> {
        self.into_storage_error(ErrorSubject::Snapshot(None), ErrorVerb::Write)
    }
}
