//! openraft `RaftLogStorage` / `RaftLogReader` on RocksDB, one per shard.
//!
//! # Blocking
//!
//! RocksDB calls are made directly from the async methods, not through `spawn_blocking`:
//! openraft 0.9 calls the log store from its own core task and waits for each call anyway
//! (log I/O must be serialized), the calls are short (one batched write, one seek, or one
//! bounded scan), and a hop to the blocking pool would add a thread switch plus an allocation to
//! every append. No call waits for an `fsync` on a runtime worker: writes go to the WAL without
//! one, and the store's WAL syncer thread makes them durable, one `fsync` for every shard's
//! writes at once. `append` returns as soon as its entries are readable and reports them
//! durable later, through openraft's `LogFlushed` callback, from the syncer thread;
//! `save_vote`, `truncate` and `purge` await the syncer before they return.

use std::fmt;
use std::fmt::Debug;
use std::io;
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::async_runtime::AsyncOneshotSendExt;
use openraft::storage::{LogFlushed, RaftLogStorage};
use openraft::{
    AsyncRuntime, ErrorSubject, ErrorVerb, LogId, LogState, OptionalSend, RaftLogId, RaftLogReader,
    RaftTypeConfig, StorageError, Vote,
};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch, WriteOptions};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::codec::{decode, encode};
use crate::db::Inner;
use crate::error::StoreError;
use crate::layout::{
    CF_RAFT_LOG, CF_RAFT_META, META_COMMITTED, META_LAST_PURGED, META_VOTE, SHARD_PREFIX_LEN,
    log_key, prefix_successor, prefixed, shard_prefix,
};

/// Raft log storage of one shard for type config `C`, in the `raft_log` and `raft_meta`
/// column families under the shard's key prefix.
///
/// Cheap to clone; the clone is also the [`RaftLogReader`] handed to replication tasks.
/// Entries (`C::Entry`) and metadata are encoded with postcard.
pub struct LogStore<C: RaftTypeConfig> {
    inner: Arc<Inner>,
    shard: u32,
    _config: PhantomData<fn() -> C>,
}

impl<C: RaftTypeConfig> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        LogStore {
            inner: Arc::clone(&self.inner),
            shard: self.shard,
            _config: PhantomData,
        }
    }
}

impl<C: RaftTypeConfig> fmt::Debug for LogStore<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LogStore")
            .field("path", &self.inner.path)
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

type StorageResult<T, C> = Result<T, StorageError<<C as RaftTypeConfig>::NodeId>>;

impl<C: RaftTypeConfig> LogStore<C> {
    pub(crate) fn new(inner: Arc<Inner>, shard: u32) -> Self {
        LogStore {
            inner,
            shard,
            _config: PhantomData,
        }
    }

    /// The shard whose log this is.
    pub fn shard(&self) -> u32 {
        self.shard
    }

    fn meta_key(&self, key: &[u8]) -> Vec<u8> {
        prefixed(&shard_prefix(self.shard), key)
    }

    /// Read options bounding an iteration to this shard's log entries.
    fn shard_read_options(&self) -> ReadOptions {
        let mut opts = ReadOptions::default();
        let prefix = shard_prefix(self.shard);
        opts.set_iterate_lower_bound(prefix.to_vec());
        if let Some(end) = prefix_successor(&prefix) {
            opts.set_iterate_upper_bound(end);
        }
        opts
    }

    /// Waits until every write made so far is durable: one sync of the shared WAL by the
    /// store's syncer thread (shared with the other writers waiting then).
    async fn durable(&self) -> Result<(), StoreError> {
        let (tx, rx) = C::AsyncRuntime::oneshot();
        self.inner.syncer.submit(Box::new(move |result| {
            // The receiver is gone only if the caller's future was dropped: nobody to tell.
            let _ = tx.send(result);
        }));
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::WalSync(e)),
            Err(_) => Err(StoreError::SyncerStopped),
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
            .get_pinned_cf(cf, self.meta_key(key))
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
            .put_cf_opt(cf, self.meta_key(key), raw, opts)
            .map_err(StoreError::backend("write"))
    }

    /// Log id of the entry with the highest index, if any entry is present.
    fn last_entry_log_id(&self) -> Result<Option<LogId<C::NodeId>>, StoreError> {
        let cf = self.inner.cf(CF_RAFT_LOG)?;
        match self
            .inner
            .db
            .iterator_cf_opt(cf, self.shard_read_options(), IteratorMode::End)
            .next()
        {
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
        let mut opts = self.shard_read_options();
        if let Some(end) = end {
            opts.set_iterate_upper_bound(log_key(self.shard, end).to_vec());
        }
        let start_key = log_key(self.shard, start);
        let iter = self.inner.db.iterator_cf_opt(
            cf,
            opts,
            IteratorMode::From(&start_key, Direction::Forward),
        );

        let mut entries = Vec::new();
        for item in iter {
            let (key, value) = item.map_err(StoreError::backend("iterate"))?;
            let index = decode_log_key(self.shard, &key)?;
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
            let key = log_key(self.shard, entry.get_log_id().index);
            batch.put_cf(cf, key, encode("log entry", &entry)?);
        }
        if batch.is_empty() {
            return Ok(());
        }
        // One write for the whole append, readable when it returns; made durable by the
        // syncer (the caller hands it the callback).
        let started = std::time::Instant::now();
        let result = self
            .inner
            .db
            .write_opt(batch, &WriteOptions::default())
            .map_err(StoreError::backend("write"));
        metrics::histogram!(crate::STORE_WRITE_SECONDS, "kind" => "log_append")
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// Deletes every entry with index >= `since` (not yet durable when it returns).
    fn truncate_since(&self, since: u64) -> Result<(), StoreError> {
        let cf = self.inner.cf(CF_RAFT_LOG)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            cf,
            log_key(self.shard, since),
            log_key(self.shard, u64::MAX),
        );
        batch.delete_cf(cf, log_key(self.shard, u64::MAX));
        self.inner
            .db
            .write_opt(batch, &WriteOptions::default())
            .map_err(StoreError::backend("write"))
    }

    /// Records `log_id` as last purged and deletes every entry with index <= `log_id.index`,
    /// atomically (so a crash cannot leave a hole between the purged id and the first entry).
    /// Not yet durable when it returns.
    fn purge_upto(&self, log_id: &LogId<C::NodeId>) -> Result<(), StoreError> {
        let log_cf = self.inner.cf(CF_RAFT_LOG)?;
        let meta_cf = self.inner.cf(CF_RAFT_META)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            meta_cf,
            self.meta_key(META_LAST_PURGED),
            encode("last purged log id", log_id)?,
        );
        let first = log_key(self.shard, 0);
        match log_id.index.checked_add(1) {
            Some(end) => batch.delete_range_cf(log_cf, first, log_key(self.shard, end)),
            None => {
                batch.delete_range_cf(log_cf, first, log_key(self.shard, u64::MAX));
                batch.delete_cf(log_cf, log_key(self.shard, u64::MAX));
            }
        }
        self.inner
            .db
            .write_opt(batch, &WriteOptions::default())
            .map_err(StoreError::backend("write"))
    }
}

/// The index of the log entry of shard `shard` stored under `key`.
fn decode_log_key(shard: u32, key: &[u8]) -> Result<u64, StoreError> {
    let corrupt = || StoreError::CorruptKey {
        cf: CF_RAFT_LOG,
        detail: format!(
            "expected shard {shard} and an index (12 bytes), found {} bytes {key:02x?}",
            key.len()
        ),
    };
    let (prefix, index) = key.split_at_checked(SHARD_PREFIX_LEN).ok_or_else(corrupt)?;
    if prefix != shard_prefix(shard) {
        return Err(corrupt());
    }
    <[u8; 8]>::try_from(index)
        .map(u64::from_be_bytes)
        .map_err(|_| corrupt())
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
        let result = match self.write_meta(META_VOTE, "vote", vote, &WriteOptions::default()) {
            Ok(()) => self.durable().await,
            Err(e) => Err(e),
        };
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
        // update in a power cut is harmless, and it rides along with the next WAL sync.
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
                // Readable now; durable once the syncer's next sync returned, which reports it.
                self.inner.syncer.submit(Box::new(move |result| {
                    callback.log_io_completed(
                        result.map_err(|e| io::Error::other(StoreError::WalSync(e))),
                    );
                }));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(io::Error::other(e.to_string())));
                Err(e.into_storage_error(ErrorSubject::Logs, ErrorVerb::Write))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId<C::NodeId>) -> StorageResult<(), C> {
        let result = match self.truncate_since(log_id.index) {
            Ok(()) => self.durable().await,
            Err(e) => Err(e),
        };
        result.map_err(|e| e.into_storage_error(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }

    async fn purge(&mut self, log_id: LogId<C::NodeId>) -> StorageResult<(), C> {
        // Durable before it returns: besides the log, the sync makes every earlier state
        // machine write durable (one shared WAL), which must hold before the log that could
        // rebuild that state is gone.
        let result = match self.purge_upto(&log_id) {
            Ok(()) => self.durable().await,
            Err(e) => Err(e),
        };
        result.map_err(|e| e.into_storage_error(ErrorSubject::Log(log_id), ErrorVerb::Delete))
    }
}
