//! Opening the single RocksDB instance shared by the log store and the state database.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use openraft::RaftTypeConfig;
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, Options, WriteOptions};

use crate::error::StoreError;
use crate::layout::{
    CF_DEFAULT, FORMAT_KEY, FORMAT_VERSION, MESSAGE_IDS_KEY, SHARD_COUNT_KEY, all_cf_names,
};
use crate::log_store::LogStore;
use crate::migrate::{Migration, MigrationOutcome};
use crate::state::StateDb;
use crate::syncer::WalSyncer;

/// Tunables for [`Store::open_with`]. `StoreConfig::default()` is what [`Store::open`] uses.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreConfig {
    /// Upper bound on SST files RocksDB keeps open (the broker's process limit is 20,000
    /// descriptors and client connections need most of them).
    pub max_open_files: i32,
    /// Once the live WAL files exceed this size RocksDB flushes the column families that pin the
    /// oldest WAL, so a rarely written column family cannot make the WAL grow without bound.
    pub max_total_wal_size: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            max_open_files: 1024,
            max_total_wal_size: 256 * 1024 * 1024,
        }
    }
}

/// The one RocksDB instance of a node, shared by the Raft logs and the state machine states of
/// every shard.
pub(crate) struct Inner {
    /// Declared first, so it is dropped first: its drop syncs what is pending and joins the
    /// thread, which holds the other reference to `db`.
    pub(crate) syncer: WalSyncer,
    pub(crate) db: Arc<DB>,
    pub(crate) path: PathBuf,
    /// While set, every sync of the syncer fails ([`Store::inject_sync_faults`]).
    sync_faults: Arc<AtomicBool>,
}

impl Inner {
    /// Looks up a column family handle; every name used by this crate is created at open.
    pub(crate) fn cf(&self, name: &'static str) -> Result<&ColumnFamily, StoreError> {
        self.db
            .cf_handle(name)
            .ok_or(StoreError::MissingColumnFamily(name))
    }
}

/// Write options for writes that must be on stable storage when they return (`fsync`).
///
/// Because every column family shares one write-ahead log, a synced write also makes every
/// earlier (unsynced) write durable: this is what lets state machine writes skip the `fsync`.
pub(crate) fn sync_write_options() -> WriteOptions {
    let mut opts = WriteOptions::default();
    opts.set_sync(true);
    opts
}

/// Handle to an open store: cheap to clone, the database closes when the last handle (including
/// every [`LogStore`] and [`StateDb`] made from it) is dropped.
///
/// Every Raft group of the node (shard `0` the metadata group, `1..=S` the data shards) keeps
/// its log and its state in this one database, under keys prefixed with its shard id: get a
/// group's handles with [`Store::log_store`] and [`Store::state_db`].
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (creating if missing) the store in directory `path` with the default config.
    ///
    /// Fails if another process (or another `Store` in this process) holds the database open.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        Store::open_with(path, &StoreConfig::default())
    }

    /// Opens (creating if missing) the store in directory `path`.
    ///
    /// A database written in another format (in particular format 1, the single-group layout
    /// without shard prefixes) is refused with [`StoreError::IncompatibleFormat`] before
    /// anything is written to it: its format is read from a read-only open first.
    pub fn open_with(path: impl AsRef<Path>, config: &StoreConfig) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db_opts = db_options(config);

        let mut names: Vec<String> = all_cf_names().into_iter().map(String::from).collect();
        // RocksDB refuses to open a database without naming all of its column families: keep
        // opening stores that a newer version extended (it fails below if the DB is absent,
        // which is fine: then there is nothing to list).
        if let Ok(existing) = DB::list_cf(&db_opts, &path) {
            probe_format(&db_opts, &path)?;
            for name in existing {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
        } else if DB::list_cf(&db_opts, crate::migrate::staging_path(&path)?).is_ok() {
            // A migration stopped between its two renames: creating an empty store here would
            // hide the migrated one.
            return Err(StoreError::MigrationBlocked {
                path,
                detail: "no store there, but the copy of an unfinished migration next to it: \
                         `Store::migrate_format_1` finishes it"
                    .to_owned(),
            });
        }
        let descriptors = names
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(name, cf_options()));
        let db = DB::open_cf_descriptors(&db_opts, &path, descriptors).map_err(|source| {
            StoreError::Open {
                path: path.clone(),
                source,
            }
        })?;

        let db = Arc::new(db);
        check_format(&db, &path)?;
        let sync_faults = Arc::new(AtomicBool::new(false));
        let syncer = WalSyncer::start({
            let db = Arc::clone(&db);
            let faults = Arc::clone(&sync_faults);
            move || sync_wal(&db, &faults)
        })?;
        Ok(Store {
            inner: Arc::new(Inner {
                syncer,
                db,
                path,
                sync_faults,
            }),
        })
    }

    /// Migrates the format-1 store at `path` (written by a single-group release) to format 2,
    /// every key going to `migration`'s shard: see the crate docs ("Migration from format
    /// 1") for how, and why a crash at any point is safe. Call it before [`Store::open`], which
    /// refuses format 1.
    ///
    /// Returns [`MigrationOutcome::NotNeeded`] when there is no store at `path` or it is in
    /// format 2 already; refuses any other format with [`StoreError::IncompatibleFormat`]
    /// (nothing written). Any failure is a [`StoreError::Migration`] naming the step (or
    /// [`StoreError::MigrationBlocked`] when nothing was written): the store at `path` is then
    /// still the format-1 one, and a new call resumes the copy.
    pub fn migrate_format_1(
        path: impl AsRef<Path>,
        config: &StoreConfig,
        migration: Migration<'_>,
    ) -> Result<MigrationOutcome, StoreError> {
        crate::migrate::migrate(path.as_ref(), config, migration)
    }

    /// The Raft log store (`RaftLogStorage` + `RaftLogReader`) of shard `shard` for type
    /// config `C`: its keys are prefixed with the shard id, so the logs of several groups
    /// share the store without seeing each other.
    ///
    /// Make one per shard (and clone it): two log stores of the same shard would be two
    /// writers of one log.
    pub fn log_store<C: RaftTypeConfig>(&self, shard: u32) -> LogStore<C> {
        LogStore::new(Arc::clone(&self.inner), shard)
    }

    /// The state machine database of shard `shard` (keys prefixed with the shard id, which it
    /// adds on writes and strips on reads: its users see the keys they wrote).
    pub fn state_db(&self, shard: u32) -> StateDb {
        StateDb::new(Arc::clone(&self.inner), shard)
    }

    /// The number of data shards recorded in this store ([`Store::record_shard_count`]), `None`
    /// when none was recorded (a new store, or one written before the count was recorded).
    pub fn shard_count(&self) -> Result<Option<u32>, StoreError> {
        self.read_fixed::<4>(SHARD_COUNT_KEY, "the recorded shard count")
            .map(|raw| raw.map(u32::from_be_bytes))
    }

    /// Records the number of data shards of the cluster this store belongs to (durable when it
    /// returns). The store only keeps it: refusing a start with another count is the caller's.
    pub fn record_shard_count(&self, count: u32) -> Result<(), StoreError> {
        self.write_synced(SHARD_COUNT_KEY, &count.to_be_bytes())
    }

    /// The bound below which this node's processes may have given out message ids
    /// ([`Store::reserve_message_ids`]; 0 when none was reserved).
    pub fn message_ids_reserved(&self) -> Result<u64, StoreError> {
        self.read_fixed::<8>(MESSAGE_IDS_KEY, "the reserved message ids")
            .map(|raw| raw.map_or(0, u64::from_be_bytes))
    }

    /// Records that message ids below `upto` may be given out (durable when it returns): a
    /// later process of the node starts at or above it.
    pub fn reserve_message_ids(&self, upto: u64) -> Result<(), StoreError> {
        self.write_synced(MESSAGE_IDS_KEY, &upto.to_be_bytes())
    }

    /// A value of `N` bytes under `key` in the `default` column family, if there is one (a
    /// value of another length is corrupt: `what` names it in the error).
    fn read_fixed<const N: usize>(
        &self,
        key: &[u8],
        what: &'static str,
    ) -> Result<Option<[u8; N]>, StoreError> {
        let cf = self.inner.cf(CF_DEFAULT)?;
        let raw = self
            .inner
            .db
            .get_cf(cf, key)
            .map_err(StoreError::backend("get"))?;
        raw.map(|raw| {
            <[u8; N]>::try_from(raw.as_slice()).map_err(|_| StoreError::CorruptValue {
                what,
                detail: format!("{} bytes instead of {N}", raw.len()),
            })
        })
        .transpose()
    }

    /// Writes `value` under `key` in the `default` column family, durable when it returns.
    fn write_synced(&self, key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        let cf = self.inner.cf(CF_DEFAULT)?;
        self.inner
            .db
            .put_cf_opt(cf, key, value, &sync_write_options())
            .map_err(StoreError::backend("write"))
    }

    /// While `on`, every sync of the write-ahead log fails, as an `fsync` error of a failing
    /// disk would: every log write waiting for it (appends, votes, truncations, purges, of
    /// every shard) fails. For tests of the paths that must fail closed; off unless a test
    /// turns it on.
    pub fn inject_sync_faults(&self, on: bool) {
        self.inner.sync_faults.store(on, Ordering::Relaxed);
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Bytes the database occupies on disk: SST files plus the memtables and WAL-backed data
    /// not yet flushed (RocksDB's `total-sst-files-size` and `cur-size-all-mem-tables`, summed
    /// over column families).
    pub fn disk_usage(&self) -> u64 {
        let mut total = 0u64;
        for name in all_cf_names() {
            let Ok(cf) = self.inner.cf(name) else {
                continue;
            };
            for prop in [
                "rocksdb.total-sst-files-size",
                "rocksdb.cur-size-all-mem-tables",
            ] {
                if let Ok(Some(v)) = self.inner.db.property_int_value_cf(cf, prop) {
                    total = total.saturating_add(v);
                }
            }
        }
        total
    }

    /// Exports [`STORE_SIZE_BYTES`](crate::STORE_SIZE_BYTES) (call periodically).
    pub fn export_metrics(&self) {
        metrics::gauge!(crate::STORE_SIZE_BYTES).set(self.disk_usage() as f64);
    }
}

pub(crate) fn db_options(config: &StoreConfig) -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_open_files(config.max_open_files);
    opts.set_max_total_wal_size(config.max_total_wal_size);
    opts.set_compression_type(DBCompressionType::Lz4);
    // Smooth background write-back instead of large bursts at flush/compaction time.
    opts.set_bytes_per_sync(1024 * 1024);
    // RocksDB's own info log (`LOG` files in the directory): bounded.
    opts.set_keep_log_file_num(4);
    opts.set_max_log_file_size(16 * 1024 * 1024);
    opts
}

pub(crate) fn cf_options() -> Options {
    let mut opts = Options::default();
    opts.set_compression_type(DBCompressionType::Lz4);
    opts
}

/// One sync of the shared write-ahead log: every write made before it is durable once it
/// returns `Ok` (the [`WalSyncer`]'s sync).
fn sync_wal(db: &DB, faults: &AtomicBool) -> Result<(), StoreError> {
    if faults.load(Ordering::Relaxed) {
        return Err(StoreError::InjectedFault { op: "WAL sync" });
    }
    let result = db.flush_wal(true).map_err(StoreError::backend("flush WAL"));
    // A slow disk (tests only): the sync, and every log write waiting for it, takes longer.
    crate::faults::stall_synced_write();
    result
}

/// The format version stamped in a database, `None` in a fresh one.
pub(crate) fn read_format(found: Option<Vec<u8>>) -> Option<u32> {
    // A marker that is not 4 bytes is no format this build knows: reported as version 0.
    found.map(|raw| {
        <[u8; 4]>::try_from(raw.as_slice())
            .map(u32::from_be_bytes)
            .unwrap_or(0)
    })
}

fn incompatible(path: &Path, found: u32) -> StoreError {
    StoreError::IncompatibleFormat {
        path: path.to_path_buf(),
        found,
        supported: FORMAT_VERSION,
    }
}

/// Refuses an existing database written in another format, reading its marker through a
/// read-only open of the `default` column family: a refused data dir is left as it was (only
/// RocksDB's own info log, `LOG`, records the attempt).
fn probe_format(opts: &Options, path: &Path) -> Result<(), StoreError> {
    let db = DB::open_cf_for_read_only(opts, path, [CF_DEFAULT], false).map_err(|source| {
        StoreError::Open {
            path: path.to_path_buf(),
            source,
        }
    })?;
    let cf = db
        .cf_handle(CF_DEFAULT)
        .ok_or(StoreError::MissingColumnFamily(CF_DEFAULT))?;
    let found = db
        .get_cf(cf, FORMAT_KEY)
        .map_err(StoreError::backend("get"))?;
    match read_format(found) {
        Some(found) if found != FORMAT_VERSION => Err(incompatible(path, found)),
        // A database without a marker was created but never stamped (a crash right after its
        // creation): it holds nothing, `check_format` stamps it.
        _ => Ok(()),
    }
}

/// Stamps a fresh database with [`FORMAT_VERSION`] and refuses one written in another format.
fn check_format(db: &DB, path: &Path) -> Result<(), StoreError> {
    let cf = db
        .cf_handle(CF_DEFAULT)
        .ok_or(StoreError::MissingColumnFamily(CF_DEFAULT))?;
    let found = db
        .get_cf(cf, FORMAT_KEY)
        .map_err(StoreError::backend("get"))?;
    match read_format(found) {
        None => db
            .put_cf_opt(
                cf,
                FORMAT_KEY,
                FORMAT_VERSION.to_be_bytes(),
                &sync_write_options(),
            )
            .map_err(StoreError::backend("write")),
        Some(found) if found == FORMAT_VERSION => Ok(()),
        Some(found) => Err(incompatible(path, found)),
    }
}
