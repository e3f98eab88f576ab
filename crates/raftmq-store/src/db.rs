//! Opening the single RocksDB instance shared by the log store and the state database.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::RaftTypeConfig;
use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType, Options, WriteOptions};

use crate::error::StoreError;
use crate::layout::{CF_DEFAULT, FORMAT_KEY, FORMAT_VERSION, all_cf_names};
use crate::log_store::LogStore;
use crate::state::StateDb;

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

/// The one RocksDB instance of a node, shared by the Raft log and the state machine state.
pub(crate) struct Inner {
    pub(crate) db: DB,
    pub(crate) path: PathBuf,
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
    pub fn open_with(path: impl AsRef<Path>, config: &StoreConfig) -> Result<Store, StoreError> {
        let path = path.as_ref().to_path_buf();
        let db_opts = db_options(config);

        let mut names: Vec<String> = all_cf_names().into_iter().map(String::from).collect();
        // RocksDB refuses to open a database without naming all of its column families: keep
        // opening stores that a newer version extended (it fails below if the DB is absent,
        // which is fine: then there is nothing to list).
        if let Ok(existing) = DB::list_cf(&db_opts, &path) {
            for name in existing {
                if !names.contains(&name) {
                    names.push(name);
                }
            }
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

        let inner = Inner { db, path };
        check_format(&inner)?;
        Ok(Store {
            inner: Arc::new(inner),
        })
    }

    /// The Raft log store (`RaftLogStorage` + `RaftLogReader`) for type config `C`.
    ///
    /// All log stores of one `Store` share the same column families: make one per node.
    pub fn log_store<C: RaftTypeConfig>(&self) -> LogStore<C> {
        LogStore::new(Arc::clone(&self.inner))
    }

    /// The state machine database.
    pub fn state_db(&self) -> StateDb {
        StateDb::new(Arc::clone(&self.inner))
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

fn db_options(config: &StoreConfig) -> Options {
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

fn cf_options() -> Options {
    let mut opts = Options::default();
    opts.set_compression_type(DBCompressionType::Lz4);
    opts
}

/// Stamps a fresh database with [`FORMAT_VERSION`] and refuses one written in another format.
fn check_format(inner: &Inner) -> Result<(), StoreError> {
    let cf = inner.cf(CF_DEFAULT)?;
    match inner
        .db
        .get_cf(cf, FORMAT_KEY)
        .map_err(StoreError::backend("get"))?
    {
        None => inner
            .db
            .put_cf_opt(
                cf,
                FORMAT_KEY,
                FORMAT_VERSION.to_be_bytes(),
                &sync_write_options(),
            )
            .map_err(StoreError::backend("write")),
        Some(raw) => {
            let found = <[u8; 4]>::try_from(raw.as_slice())
                .map(u32::from_be_bytes)
                .unwrap_or(0);
            if found == FORMAT_VERSION {
                Ok(())
            } else {
                Err(StoreError::IncompatibleFormat {
                    path: inner.path.clone(),
                    found,
                    supported: FORMAT_VERSION,
                })
            }
        }
    }
}
