//! openraft `RaftLogStorage` / `RaftLogReader` on RocksDB.
//!
//! # Blocking
//!
//! RocksDB calls are made directly from the async methods, not through `spawn_blocking`:
//! openraft 0.9 calls the log store from its own core task and waits for each call anyway
//! (log I/O must be serialized), the calls are short (one batched write, one seek, or one
//! bounded scan), and a hop to the blocking pool would add a thread switch plus an allocation to
//! every append. The one potentially slow call is the `fsync` of `append`/`save_vote`
//! (typically 0.1–2 ms on SSDs): it holds one runtime worker for that time, which is the cost
//! of durability openraft would wait for in any case. The broker therefore runs Raft on a
//! multi-threaded runtime.

use std::fmt;
use std::fmt::Debug;
use std::io;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    ErrorSubject, ErrorVerb, LogId, LogState, OptionalSend, RaftLogId, RaftLogReader,
    RaftTypeConfig, StorageError, Vote,
};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch, WriteOptions};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{decode, encode};
use crate::db::{Inner, sync_write_options};
use crate::error::StoreError;
use crate::layout::{
    CF_RAFT_LOG, CF_RAFT_META, META_COMMITTED, META_LAST_PURGED, META_VOTE, log_key,
};

/// Raft log storage for type config `C`, in the `raft_log` and `raft_meta` column families.
///
/// Cheap to clone; the clone is also the [`RaftLogReader`] handed to replication tasks.
/// Entries (`C::Entry`) and metadata are encoded with postcard.
pub struct LogStore<C: RaftTypeConfig> {
    inner: Arc<Inner>,
    _config: PhantomData<fn() -> C>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        LogStore {
            inner: Arc::clone(&self.inner),
            _config: PhantomData,
        }
    }
}

impl<C: RaftTypeConfig> fmt::Debug for LogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

type StorageResult<T, C> = Result<T, StorageError<<C as RaftTypeConfig>::NodeId>>;

impl<C: RaftTypeConfig> LogStore<C> {
    pub(crate) fn new(inner: Arc<Inner>) -> Self {
        LogStore {
            inner,
            _config: PhantomData,
        }
    }

    fn read_meta<T: DeserializeOwned>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<T>, StoreError> {
        let cf = self.inner.cf(CF_RAFT_META)?;
        match self
            .inner
            .db
            .get_pinned_cf(cf, key)
            .map_err(StoreError::backend("get"))?
        {
            Some(raw) => decode(what, &raw).map(Some),
            None => Ok(None),
        }
    }

    fn write_meta<T: Serialize>(
        &self,
        key: &[u8],
        what: &'static str,
        value: &T,
        opts: &WriteOptions,
    ) -> Result<(), StoreError> {
        let cf = self.inner.cf(CF_RAFT_META)?;
        let raw = encode(what, value)?;
        self.inner
            .db
            .put_cf_opt(cf, key, raw, opts)
            .map_err(StoreError::backend("write"))
    }

    /// Log id of the entry with the highest index, if any entry is present.
    fn last_entry_log_id(&self) -> Result<Option<LogId<C::NodeId>>, StoreError> {
        let cf = self.inner.cf(CF_RAFT_LOG)?;
        match self.inner.db.iterator_cf(cf, IteratorMode::End).next() {
            None => Ok(None),
            Some(item) => {
                let (_, value) = item.map_err(StoreError::backend("iterate"))?;
                let entry: C::Entry = decode("log entry", &value)?;
                Ok(Some(entry.get_log_id().clone()))
            }
        }
    }

    /// Entries with index in `range`, in index order; absent indexes are skipped.
    fn entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<C::Entry>, StoreError> {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => match s.checked_add(1) {
                Some(s) => s,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        // `None`: no upper bound (also for `..=u64::MAX`).
        let end = match range.end_bound() {
            Bound::Included(&e) => e.checked_add(1),
            Bound::Excluded(&e) => Some(e),
            Bound::Unbounded => None,
        };
        if end.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }

        let cf = self.inner.cf(CF_RAFT_LOG)?;
        let mut opts = ReadOptions::default();
        if let Some(end) = end {
            opts.set_iterate_upper_bound(log_key(end).to_vec());
        }
        let start_key = log_key(start);
        let iter = self.inner.db.iterator_cf_opt(
            cf,
            opts,
            IteratorMode::From(&start_key, Direction::Forward),
        );

        let mut entries = Vec::new();
        for item in iter {
            let (key, value) = item.map_err(StoreError::backend("iterate"))?;
            let index = decode_log_key(&key)?;
            let entry: C::Entry = decode("log entry", &value)?;
            if entry.get_log_id().index != index {
                return Err(StoreError::CorruptKey {
                    cf: CF_RAFT_LOG,
                    detail: format!("key index {index} holds entry {}", entry.get_log_id().index),
                });
            }
            entries.push(entry);
        }
        Ok(entries)
    }

    fn log_state(&self) -> Result<LogState<C>, StoreError> {
        let last_purged_log_id: Option<LogId<C::NodeId>> =
            self.read_meta(META_LAST_PURGED, "last purged log id")?;
        let last_entry = self.last_entry_log_id()?;
        // Purging never leaves entries at or below the purged id, so the last entry (if any)
        // is newer; `max` only guards against a store that says otherwise.
        let last_log_id = match (last_entry, &last_purged_log_id) {
            (Some(entry), Some(purged)) => Some(std::cmp::max(entry, purged.clone())),
            (entry, purged) => entry.or_else(|| purged.clone()),
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    fn append_entries(
        &self,
        entries: impl IntoIterator<Item = C::Entry>,
    ) -> Result<(), StoreError> {
        let cf = self.inner.cf(CF_RAFT_LOG)?;
        let mut batch = WriteBatch::default();
        for entry in entries {
            let key = log_key(entry.get_log_id().index);
            batch.put_cf(cf, key, encode("log entry", &entry)?);
        }
        if batch.is_empty() {
            return Ok(());
        }
        // One synced write for the whole append: durable once it returns.
        let started = std::time::Instant::now();
        let result = self
            .inner
            .db
            .write_opt(batch, &sync_write_options())
            .map_err(StoreError::backend("write"));
        crate::faults::stall_synced_write();
        metrics::histogram!(crate::STORE_WRITE_SECONDS, "kind" => "log_append")
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// Deletes every entry with index >= `since`.
    fn truncate_since(&self, since: u64) -> Result<(), StoreError> {
        let cf = self.inner.cf(CF_RAFT_LOG)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, log_key(since), log_key(u64::MAX));
        batch.delete_cf(cf, log_key(u64::MAX));
        let result = self
            .inner
            .db
            .write_opt(batch, &sync_write_options())
            .map_err(StoreError::backend("write"));
        crate::faults::stall_synced_write();
        result
    }

    /// Records `log_id` as last purged and deletes every entry with index <= `log_id.index`,
    /// atomically (so a crash cannot leave a hole between the purged id and the first entry).
    fn purge_upto(&self, log_id: &LogId<C::NodeId>) -> Result<(), StoreError> {
        let log_cf = self.inner.cf(CF_RAFT_LOG)?;
        let meta_cf = self.inner.cf(CF_RAFT_META)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            meta_cf,
            META_LAST_PURGED,
            encode("last purged log id", log_id)?,
        );
        match log_id.index.checked_add(1) {
            Some(end) => batch.delete_range_cf(log_cf, log_key(0), log_key(end)),
            None => {
                batch.delete_range_cf(log_cf, log_key(0), log_key(u64::MAX));
                batch.delete_cf(log_cf, log_key(u64::MAX));
            }
        }
        // Synced: besides the log, this makes every earlier state machine write durable (one
        // shared WAL), which must hold before the log that could rebuild that state is gone.
        let result = self
            .inner
            .db
            .write_opt(batch, &sync_write_options())
            .map_err(StoreError::backend("write"));
        crate::faults::stall_synced_write();
        result
    }
}

fn decode_log_key(key: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(key)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::CorruptKey {
            cf: CF_RAFT_LOG,
            detail: format!("expected 8 bytes, found {}", key.len()),
        })
}

impl<C: RaftTypeConfig> RaftLogReader<C> for LogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<C::Entry>, C> {
        self.entries(range)
            .map_err(|e| e.into_storage_error(ErrorSubject::Logs, ErrorVerb::Read))
    }
}

impl<C: RaftTypeConfig> RaftLogStorage<C> for LogStore<C> {
    type LogReader = LogStore<C>;

    async fn get_log_state(&mut self) -> StorageResult<LogState<C>, C> {
        self.log_state()
            .map_err(|e| e.into_storage_error(ErrorSubject::Logs, ErrorVerb::Read))
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<C::NodeId>) -> StorageResult<(), C> {
        let result = self.write_meta(META_VOTE, "vote", vote, &sync_write_options());
        crate::faults::stall_synced_write();
        result.map_err(|e| e.into_storage_error(ErrorSubject::Vote, ErrorVerb::Write))
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<C::NodeId>>, C> {
        self.read_meta(META_VOTE, "vote")
            .map_err(|e| e.into_storage_error(ErrorSubject::Vote, ErrorVerb::Read))
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<C::NodeId>>,
    ) -> StorageResult<(), C> {
        // Not synced: `committed` only lets a restart re-apply up to it sooner; losing the last
        // update in a power cut is harmless, and it rides along with the next synced write.
        self.write_meta(
            META_COMMITTED,
            "committed log id",
            &committed,
            &WriteOptions::default(),
        )
        .map_err(|e| e.into_storage_error(ErrorSubject::Store, ErrorVerb::Write))
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<C::NodeId>>, C> {
        let committed: Option<Option<LogId<C::NodeId>>> = self
            .read_meta(META_COMMITTED, "committed log id")
            .map_err(|e| e.into_storage_error(ErrorSubject::Store, ErrorVerb::Read))?;
        Ok(committed.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> StorageResult<(), C>
    where
        I: IntoIterator<Item = C::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        match self.append_entries(entries) {
            Ok(()) => {
                // The write was synced: the entries are durable, report it now.
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(e.into_storage_error(ErrorSubject::Logs, ErrorVerb::Write))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> StorageResult<(), C> {
        self.truncate_since(log_id.index)
            .map_err(|e| e.into_storage_error(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> StorageResult<(), C> {
        self.purge_upto(&log_id)
            .map_err(|e| e.into_storage_error(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }
}
