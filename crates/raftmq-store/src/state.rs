//! The state machine database: named column families, point reads, ordered scans and atomic
//! batches, without exposing any RocksDB type.

use std::fmt;
use std::sync::Arc;

use rocksdb::{DB, DBIteratorWithThreadMode, Direction, IteratorMode, ReadOptions, WriteBatch};

use crate::db::{Inner, sync_write_options};
use crate::error::StoreError;
use crate::layout::{SHARD_PREFIX_LEN, StateCf, prefix_successor, prefixed, shard_prefix};

/// Handle to one shard's state machine column families (see [`StateCf`]). Cheap to clone.
///
/// Every key it writes is stored behind the shard's 4-byte prefix, and every key it reads is
/// returned without it: the state of one shard never sees another's, and a scan, a prefix
/// deletion or a snapshot covers this shard only. Reads see the latest committed writes.
/// [`StateDb::write`] is atomic across column families.
#[derive(Clone)]
pub struct StateDb {
    pub(crate) inner: Arc<Inner>,
    shard: u32,
    pub(crate) prefix: [u8; SHARD_PREFIX_LEN],
    /// Read faults injected into this handle and its clones ([`StateDb::with_own_faults`]).
    faults: Arc<std::sync::atomic::AtomicBool>,
}

impl fmt::Debug for StateDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateDb")
            .field("path", &self.inner.path)
            .field("shard", &self.shard)
            .finish_non_exhaustive()
    }
}

/// A `(key, value)` pair read from a state column family.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// One operation of a [`StateBatch`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum BatchOp {
    /// Insert or overwrite `key`.
    Put {
        /// Column family.
        cf: StateCf,
        /// Key.
        key: Vec<u8>,
        /// Value.
        value: Vec<u8>,
    },
    /// Delete `key` (no-op if absent).
    Delete {
        /// Column family.
        cf: StateCf,
        /// Key.
        key: Vec<u8>,
    },
    /// Delete every key in `[from, to)`.
    DeleteRange {
        /// Column family.
        cf: StateCf,
        /// First key deleted.
        from: Vec<u8>,
        /// First key kept.
        to: Vec<u8>,
    },
    /// Delete every key starting with `prefix` (all keys if `prefix` is empty).
    DeletePrefix {
        /// Column family.
        cf: StateCf,
        /// Key prefix.
        prefix: Vec<u8>,
    },
}

/// An atomic group of writes for [`StateDb::write`]: all of them land or none does, and they
/// apply in order (a later operation wins over an earlier one on the same key).
///
/// Building a batch needs no database, so apply logic can produce batches as plain values and
/// be unit tested on them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StateBatch {
    ops: Vec<BatchOp>,
}

impl StateBatch {
    /// An empty batch.
    pub fn new() -> Self {
        StateBatch::default()
    }

    /// Inserts or overwrites `key` in `cf`.
    pub fn put(
        &mut self,
        cf: StateCf,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.ops.push(BatchOp::Put {
            cf,
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Deletes `key` from `cf`.
    pub fn delete(&mut self, cf: StateCf, key: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(BatchOp::Delete {
            cf,
            key: key.into(),
        });
        self
    }

    /// Deletes every key `k` of `cf` with `from <= k < to` (a single range tombstone).
    pub fn delete_range(
        &mut self,
        cf: StateCf,
        from: impl Into<Vec<u8>>,
        to: impl Into<Vec<u8>>,
    ) -> &mut Self {
        self.ops.push(BatchOp::DeleteRange {
            cf,
            from: from.into(),
            to: to.into(),
        });
        self
    }

    /// Deletes every key of `cf` that starts with `prefix`.
    pub fn delete_prefix(&mut self, cf: StateCf, prefix: impl Into<Vec<u8>>) -> &mut Self {
        self.ops.push(BatchOp::DeletePrefix {
            cf,
            prefix: prefix.into(),
        });
        self
    }

    /// Deletes every key of `cf`.
    pub fn clear(&mut self, cf: StateCf) -> &mut Self {
        self.delete_prefix(cf, Vec::new())
    }

    /// The operations, in order.
    pub fn ops(&self) -> &[BatchOp] {
        &self.ops
    }

    /// Number of operations.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// `true` if the batch has no operation.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

impl Extend<BatchOp> for StateBatch {
    fn extend<T: IntoIterator<Item = BatchOp>>(&mut self, iter: T) {
        self.ops.extend(iter);
    }
}

/// Iterator over `(key, value)` pairs of a scan, in ascending key order (keys without the
/// shard prefix).
///
/// Borrows the [`StateDb`] (or [`StateSnapshot`](crate::StateSnapshot)) it came from; a scan
/// of the live database may or may not see writes made while it runs, a scan of a snapshot
/// never does.
pub struct StateIter<'a> {
    iter: Option<DBIteratorWithThreadMode<'a, DB>>,
    error: Option<StoreError>,
}

impl<'a> StateIter<'a> {
    /// Iterates `iter`, which must stay within one shard's keys (its prefix is stripped).
    pub(crate) fn new(iter: DBIteratorWithThreadMode<'a, DB>) -> Self {
        StateIter {
            iter: Some(iter),
            error: None,
        }
    }

    pub(crate) fn failed(error: StoreError) -> Self {
        StateIter {
            iter: None,
            error: Some(error),
        }
    }
}

/// `key` without its shard prefix (a stored key is never shorter than the prefix: every
/// key of a state column family is written with one).
pub(crate) fn unprefixed(key: &[u8]) -> Vec<u8> {
    key.get(SHARD_PREFIX_LEN..).unwrap_or_default().to_vec()
}

impl Iterator for StateIter<'_> {
    type Item = Result<KeyValue, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(error) = self.error.take() {
            return Some(Err(error));
        }
        let item = self.iter.as_mut()?.next()?;
        Some(match item {
            Ok((key, value)) => Ok((unprefixed(&key), value.into_vec())),
            Err(e) => {
                self.iter = None;
                Err(StoreError::Backend {
                    op: "iterate",
                    source: e,
                })
            }
        })
    }
}

impl fmt::Debug for StateIter<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateIter")
            .field("done", &self.iter.is_none())
            .finish_non_exhaustive()
    }
}

/// Read options bounding a forward scan to `[from, to)`.
pub(crate) fn range_read_options(to: Option<&[u8]>) -> ReadOptions {
    let mut opts = ReadOptions::default();
    if let Some(to) = to {
        opts.set_iterate_upper_bound(to.to_vec());
    }
    opts
}

impl StateDb {
    pub(crate) fn new(inner: Arc<Inner>, shard: u32) -> Self {
        StateDb {
            inner,
            shard,
            prefix: shard_prefix(shard),
            faults: Arc::default(),
        }
    }

    /// The shard whose state this handle reads and writes.
    pub fn shard(&self) -> u32 {
        self.shard
    }

    /// A handle to the same shard whose read faults ([`StateDb::inject_read_faults`]) are its
    /// own (shared with its clones only), so a test can fail one reader's reads while the rest
    /// of the node (the Raft state machine's apply) reads normally.
    pub fn with_own_faults(&self) -> StateDb {
        StateDb::new(self.inner.clone(), self.shard)
    }

    /// `key` as stored: behind this shard's prefix.
    pub(crate) fn stored_key(&self, key: &[u8]) -> Vec<u8> {
        prefixed(&self.prefix, key)
    }

    /// The first stored key after every key of this shard (`None`: the last possible shard,
    /// unbounded above).
    pub(crate) fn shard_end(&self) -> Option<Vec<u8>> {
        prefix_successor(&self.prefix)
    }

    /// While `on`, every read of the state through this handle (live or through a snapshot)
    /// fails with [`StoreError::InjectedFault`], as a failing disk would make it: for tests of
    /// the paths that must fail closed. Off unless a test turns it on; writes are not
    /// affected.
    pub fn inject_read_faults(&self, on: bool) {
        self.faults.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// The column family `cf`, for a read: fails while read faults are injected.
    pub(crate) fn cf_for_read(&self, cf: StateCf) -> Result<&rocksdb::ColumnFamily, StoreError> {
        if self.faults.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(StoreError::InjectedFault { op: "read" });
        }
        self.inner.cf(cf.name())
    }

    /// The value of `key` in `cf`.
    pub fn get(&self, cf: StateCf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let handle = self.cf_for_read(cf)?;
        self.inner
            .db
            .get_cf(handle, self.stored_key(key))
            .map_err(StoreError::backend("get"))
    }

    /// Every pair of `cf` whose key starts with `prefix` (everything for an empty prefix).
    pub fn scan_prefix(&self, cf: StateCf, prefix: &[u8]) -> StateIter<'_> {
        let from = self.stored_key(prefix);
        let to = prefix_successor(&from);
        self.scan_stored(cf, &from, to)
    }

    /// Every pair of `cf` with `from <= key < to` (`to = None`: up to the shard's last key).
    pub fn scan_range(&self, cf: StateCf, from: &[u8], to: Option<&[u8]>) -> StateIter<'_> {
        let to = match to {
            Some(to) => Some(self.stored_key(to)),
            None => self.shard_end(),
        };
        self.scan_stored(cf, &self.stored_key(from), to)
    }

    /// Every pair of `cf` with stored keys in `[from, to)`, both within this shard.
    fn scan_stored(&self, cf: StateCf, from: &[u8], to: Option<Vec<u8>>) -> StateIter<'_> {
        match self.cf_for_read(cf) {
            Ok(handle) => StateIter::new(self.inner.db.iterator_cf_opt(
                handle,
                range_read_options(to.as_deref()),
                IteratorMode::From(from, Direction::Forward),
            )),
            Err(e) => StateIter::failed(e),
        }
    }

    /// The pair with the greatest key starting with `prefix`, e.g. to find the last sequence
    /// number of a queue.
    pub fn last_with_prefix(
        &self,
        cf: StateCf,
        prefix: &[u8],
    ) -> Result<Option<KeyValue>, StoreError> {
        let handle = self.cf_for_read(cf)?;
        let prefix = self.stored_key(prefix);
        let mut opts = range_read_options(prefix_successor(&prefix).as_deref());
        opts.set_iterate_lower_bound(prefix);
        match self
            .inner
            .db
            .iterator_cf_opt(handle, opts, IteratorMode::End)
            .next()
        {
            None => Ok(None),
            Some(Ok((key, value))) => Ok(Some((unprefixed(&key), value.into_vec()))),
            Some(Err(e)) => Err(StoreError::Backend {
                op: "iterate",
                source: e,
            }),
        }
    }

    /// Applies `batch` atomically. It is written to the WAL but not `fsync`ed: a process crash
    /// loses nothing, a power cut may lose the latest batches.
    ///
    /// That is enough for a Raft state machine that stores its last applied log id in the same
    /// batch: the state is always consistent with that id, and Raft re-applies the entries after
    /// it from the log. The WAL syncer's syncs make the shared WAL durable, including every
    /// earlier state write, before the log entries that could rebuild the state are purged.
    /// Use [`StateDb::write_sync`] when the caller needs durability on return.
    pub fn write(&self, batch: StateBatch) -> Result<(), StoreError> {
        let wb = self.to_write_batch(batch)?;
        let started = std::time::Instant::now();
        let result = self
            .inner
            .db
            .write(wb)
            .map_err(StoreError::backend("write"));
        metrics::histogram!(crate::STORE_WRITE_SECONDS, "kind" => "state")
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// Like [`StateDb::write`], durable (`fsync`ed) when it returns.
    pub fn write_sync(&self, batch: StateBatch) -> Result<(), StoreError> {
        let wb = self.to_write_batch(batch)?;
        self.inner
            .db
            .write_opt(wb, &sync_write_options())
            .map_err(StoreError::backend("write"))
    }

    /// Makes every write so far durable (`fsync` of the shared WAL, on the calling thread).
    pub fn sync(&self) -> Result<(), StoreError> {
        self.inner
            .db
            .flush_wal(true)
            .map_err(StoreError::backend("flush WAL"))
    }

    /// The batch as a RocksDB write batch, every key behind this shard's prefix.
    fn to_write_batch(&self, batch: StateBatch) -> Result<WriteBatch, StoreError> {
        let mut wb = WriteBatch::default();
        // Greatest key put so far in this batch, per column family: a prefix delete that must
        // look up the last existing key also has to cover keys the batch itself added.
        let mut max_put: [Option<Vec<u8>>; StateCf::ALL.len()] = Default::default();
        for op in batch.ops {
            match op {
                BatchOp::Put { cf, key, value } => {
                    let key = self.stored_key(&key);
                    wb.put_cf(self.inner.cf(cf.name())?, &key, value);
                    let slot = &mut max_put[usize::from(cf.id() - 1)];
                    if slot.as_ref().is_none_or(|max| *max < key) {
                        *slot = Some(key);
                    }
                }
                BatchOp::Delete { cf, key } => {
                    wb.delete_cf(self.inner.cf(cf.name())?, self.stored_key(&key));
                }
                BatchOp::DeleteRange { cf, from, to } => {
                    wb.delete_range_cf(
                        self.inner.cf(cf.name())?,
                        self.stored_key(&from),
                        self.stored_key(&to),
                    );
                }
                BatchOp::DeletePrefix { cf, prefix } => {
                    let prefix = self.stored_key(&prefix);
                    self.delete_stored_prefix(&mut wb, cf, &prefix, &max_put)?;
                }
            }
        }
        Ok(wb)
    }

    /// Adds to `wb` the deletion of every stored key of `cf` starting with `prefix` (a stored
    /// key: this shard's prefix included). `max_put`: the greatest key the batch itself puts,
    /// per column family (only needed for the last shard, whose range is unbounded above).
    pub(crate) fn delete_stored_prefix(
        &self,
        wb: &mut WriteBatch,
        cf: StateCf,
        prefix: &[u8],
        max_put: &[Option<Vec<u8>>; StateCf::ALL.len()],
    ) -> Result<(), StoreError> {
        match prefix_successor(prefix) {
            Some(end) => {
                wb.delete_range_cf(self.inner.cf(cf.name())?, prefix, end.as_slice());
                Ok(())
            }
            None => {
                let batch_max = max_put[usize::from(cf.id() - 1)].as_deref();
                self.delete_all_from(wb, cf, prefix, batch_max)
            }
        }
    }

    /// Adds to `wb` the deletion of every key `>= from` in `cf`: a range tombstone up to the
    /// greatest such key (in the database or `batch_max`) plus a point tombstone for that key.
    ///
    /// The greatest key is read now, so a concurrent writer could add a greater one before `wb`
    /// is written; state machine writes are serialized by the state machine, so that is not a
    /// concern for this crate's callers.
    pub(crate) fn delete_all_from(
        &self,
        wb: &mut WriteBatch,
        cf: StateCf,
        from: &[u8],
        batch_max: Option<&[u8]>,
    ) -> Result<(), StoreError> {
        let handle = self.inner.cf(cf.name())?;
        let mut opts = ReadOptions::default();
        opts.set_iterate_lower_bound(from.to_vec());
        let db_max = match self
            .inner
            .db
            .iterator_cf_opt(handle, opts, IteratorMode::End)
            .next()
        {
            None => None,
            Some(Ok((key, _))) => Some(key.into_vec()),
            Some(Err(e)) => {
                return Err(StoreError::Backend {
                    op: "iterate",
                    source: e,
                });
            }
        };
        let batch_max = batch_max.filter(|key| *key >= from).map(<[u8]>::to_vec);
        if let Some(last) = std::cmp::max(db_max, batch_max) {
            wb.delete_range_cf(handle, from, last.as_slice());
            wb.delete_cf(handle, last);
        }
        Ok(())
    }
}
