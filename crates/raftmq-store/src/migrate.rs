//! Migration of a store written by the single-group releases (format 1: keys without a shard
//! prefix) to format 2 (every key behind its shard's prefix), on the first start of a sharded
//! release: [`Store::migrate_format_1`](crate::Store::migrate_format_1).
//!
//! # Design: copy into a sibling store, then swap directories
//!
//! The format-1 store at `path` is never written to (beyond what RocksDB's own open does:
//! replaying its WAL; its keys and values stay those of format 1). Every key is copied, under
//! its format-2 key, into a new store at `path.migrating` (`<name>.migrating` next to it), in
//! chunks of about [`Migration::chunk_bytes`]: each chunk is one synced write batch that also
//! records the cursor (column family and last format-1 key copied), so a new start resumes after
//! the last chunk. The staging store is stamped format 2 last, in one synced batch with the
//! removal of the cursor. Then `path` is renamed to `path.format-1` and `path.migrating` to
//! `path`, the parent directory synced after each rename.
//!
//! Every crash point leaves either the untouched format-1 store at `path` (plus a partial
//! staging store, resumed by the next start), or a complete format-2 staging store whose rename
//! the next start finishes. Nothing ever opens a half-migrated store: the format-2 marker is
//! written last, and [`Store::open`](crate::Store::open) refuses format 1. No format-1 key has
//! to be told apart from a format-2 key in the same column family (the state keys are opaque
//! bytes, so in place they could not always be), and memory is bounded by one chunk whatever the
//! size of the store. The cost: the disk must hold the store twice while it runs, and the
//! format-1 copy stays at `path.format-1` (a backup the old release can run on) until the
//! operator removes it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options, ReadOptions, WriteBatch};

use crate::db::{StoreConfig, cf_options, db_options, read_format, sync_write_options};
use crate::error::StoreError;
use crate::layout::{
    CF_DEFAULT, CF_RAFT_LOG, FORMAT_KEY, FORMAT_VERSION, all_cf_names, key_successor, log_key,
    prefixed, shard_prefix,
};

/// The store format of the single-group releases.
pub(crate) const FORMAT_SINGLE_GROUP: u32 = 1;

/// Key in `default` of the staging store: how far the copy went (see [`Cursor`]).
const CURSOR_KEY: &[u8] = b"raftmq_migration_cursor";

/// Default [`Migration::chunk_bytes`]: 4 MiB of keys and values per synced write batch.
pub const DEFAULT_MIGRATION_CHUNK_BYTES: usize = 4 * 1024 * 1024;

/// Rewrites the value of the format-1 log entry at an index: `Ok(None)` keeps it as it is.
type RewriteFn<'a> = dyn FnMut(u64, &[u8]) -> Result<Option<Vec<u8>>, String> + 'a;

/// How to migrate a format-1 store: the shard its keys go to, how log entries change, and who
/// hears about the progress.
pub struct Migration<'a> {
    shard: u32,
    rewrite_log_entry: Box<RewriteFn<'a>>,
    on_event: Box<dyn FnMut(&MigrationEvent) + 'a>,
    chunk_bytes: usize,
    fail_after_chunks: Option<u64>,
}

impl<'a> Migration<'a> {
    /// Every key of the format-1 store goes to shard `shard` (the one data group), log entries
    /// keep their values, no progress is reported, chunks of
    /// [`DEFAULT_MIGRATION_CHUNK_BYTES`].
    pub fn new(shard: u32) -> Self {
        Migration {
            shard,
            rewrite_log_entry: Box::new(|_, _| Ok(None)),
            on_event: Box::new(|_| {}),
            chunk_bytes: DEFAULT_MIGRATION_CHUNK_BYTES,
            fail_after_chunks: None,
        }
    }

    /// Log entry values (opaque to this crate) that embed something format 2 changed: `rewrite`
    /// gets the index and the format-1 value and returns the format-2 value (`Ok(None)`: the
    /// same). An `Err` fails the migration (the format-1 store stays as it is).
    pub fn rewrite_log_entries(
        mut self,
        rewrite: impl FnMut(u64, &[u8]) -> Result<Option<Vec<u8>>, String> + 'a,
    ) -> Self {
        self.rewrite_log_entry = Box::new(rewrite);
        self
    }

    /// Called when the copy starts and after every chunk (the caller rate-limits its logs).
    pub fn on_event(mut self, on_event: impl FnMut(&MigrationEvent) + 'a) -> Self {
        self.on_event = Box::new(on_event);
        self
    }

    /// Bytes of keys and values per synced write batch (at least one key per batch).
    pub fn chunk_bytes(mut self, bytes: usize) -> Self {
        self.chunk_bytes = bytes.max(1);
        self
    }

    /// Tests only: the migration fails (as a crash would stop it) once `chunks` chunks were
    /// written by this call.
    pub fn fail_after_chunks(mut self, chunks: u64) -> Self {
        self.fail_after_chunks = Some(chunks);
        self
    }
}

impl std::fmt::Debug for Migration<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("shard", &self.shard)
            .field("chunk_bytes", &self.chunk_bytes)
            .field("fail_after_chunks", &self.fail_after_chunks)
            .finish_non_exhaustive()
    }
}

/// What a migration reports while it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MigrationEvent {
    /// The copy starts (or resumes).
    Started {
        /// The format-1 store.
        path: PathBuf,
        /// Where the format-2 copy is made.
        staging: PathBuf,
        /// RocksDB's estimate of the keys of the format-1 store.
        estimated_keys: u64,
        /// Bytes of the format-1 store (SST files and memtables).
        estimated_bytes: u64,
        /// Keys an interrupted migration had already copied (0 on a first start).
        resumed_keys: u64,
    },
    /// A chunk was written and synced.
    Progress {
        /// Keys copied so far (resumed ones included).
        keys: u64,
        /// Bytes of keys and values copied so far.
        bytes: u64,
        /// The column family being copied.
        cf: &'static str,
    },
}

/// What [`Store::migrate_format_1`](crate::Store::migrate_format_1) did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MigrationOutcome {
    /// No store at the path yet, or a store already in format 2 (or never stamped): nothing to
    /// do.
    NotNeeded,
    /// The store was migrated; it is format 2 now.
    Migrated(MigrationReport),
}

/// Counts of a finished migration.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct MigrationReport {
    /// Keys copied (all runs, if it was resumed).
    pub keys: u64,
    /// Bytes of keys and values copied (all runs).
    pub bytes: u64,
    /// Log entries whose value was rewritten (all runs).
    pub log_entries_rewritten: u64,
    /// Chunks written by this run.
    pub chunks: u64,
    /// Whether this run finished a migration an earlier start had begun.
    pub resumed: bool,
    /// Time this run took.
    pub duration: Duration,
    /// Where the format-1 store was moved (`<path>.format-1`).
    pub backup: PathBuf,
}

/// `<path>` with `suffix` appended to its last component.
fn sibling(path: &Path, suffix: &str) -> Result<PathBuf, StoreError> {
    let name = path
        .file_name()
        .ok_or_else(|| StoreError::MigrationBlocked {
            path: path.to_path_buf(),
            detail: "the store path has no directory name".to_owned(),
        })?;
    let mut name = OsString::from(name);
    name.push(suffix);
    Ok(path.with_file_name(name))
}

/// The staging directory of a migration of the store at `path` (`<path>.migrating`).
pub(crate) fn staging_path(path: &Path) -> Result<PathBuf, StoreError> {
    sibling(path, ".migrating")
}

/// Where the format-1 store goes once migrated (`<path>.format-1`).
pub(crate) fn backup_path(path: &Path) -> Result<PathBuf, StoreError> {
    sibling(path, ".format-1")
}

/// Wraps `source` as the failure of `step` of the migration of `path`.
fn failed(path: &Path, step: impl Into<String>) -> impl FnOnce(StoreError) -> StoreError {
    let path = path.to_path_buf();
    let step = step.into();
    move |source| StoreError::Migration {
        path,
        step,
        source: Box::new(source),
    }
}

/// The format marker of the store at `path`, read through a read-only open of `default`.
pub(crate) fn read_marker(opts: &Options, path: &Path) -> Result<Option<u32>, StoreError> {
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
    Ok(read_format(found))
}

/// `fsync` of a directory, so that a rename in it is durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::Io)
}

fn rename(from: &Path, to: &Path) -> Result<(), StoreError> {
    std::fs::rename(from, to).map_err(StoreError::Io)?;
    sync_dir(to.parent().unwrap_or(Path::new(".")))
}

/// How far the copy went: stored in the staging store with every chunk.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Cursor {
    keys: u64,
    bytes: u64,
    rewritten: u64,
    /// The column family of the last key copied and that key (format 1), if any.
    last: Option<(String, Vec<u8>)>,
}

impl Cursor {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for n in [self.keys, self.bytes, self.rewritten] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        if let Some((cf, key)) = &self.last {
            // Column family names are short (checked when the cursor is made).
            out.push(u8::try_from(cf.len()).unwrap_or(u8::MAX));
            out.extend_from_slice(cf.as_bytes());
            out.extend_from_slice(key);
        }
        out
    }

    fn decode(raw: &[u8]) -> Option<Cursor> {
        let num = |i: usize| -> Option<u64> {
            Some(u64::from_be_bytes(
                raw.get(i * 8..i * 8 + 8)?.try_into().ok()?,
            ))
        };
        let (keys, bytes, rewritten) = (num(0)?, num(1)?, num(2)?);
        let rest = raw.get(24..)?;
        let last = match rest.split_first() {
            None => None,
            Some((&len, rest)) => {
                let len = usize::from(len);
                let cf = std::str::from_utf8(rest.get(..len)?).ok()?.to_owned();
                Some((cf, rest.get(len..)?.to_vec()))
            }
        };
        Some(Cursor {
            keys,
            bytes,
            rewritten,
            last,
        })
    }
}

/// See [`Store::migrate_format_1`](crate::Store::migrate_format_1).
pub(crate) fn migrate(
    path: &Path,
    config: &StoreConfig,
    mut migration: Migration<'_>,
) -> Result<MigrationOutcome, StoreError> {
    let started = Instant::now();
    let staging = staging_path(path)?;
    let backup = backup_path(path)?;
    let opts = db_options(config);

    if DB::list_cf(&opts, path).is_err() {
        // No store at `path`. A crash between the two renames leaves the finished copy in the
        // staging directory and the format-1 store in the backup: finish the swap.
        if DB::list_cf(&opts, &staging).is_ok() {
            let marker = read_marker(&opts, &staging).map_err(failed(
                path,
                format!("reading the staging store {}", staging.display()),
            ))?;
            if marker != Some(FORMAT_VERSION) || !backup.exists() {
                return Err(StoreError::MigrationBlocked {
                    path: path.to_path_buf(),
                    detail: format!(
                        "no store there, but an unfinished migration in {} (format {marker:?}); \
                         if {} holds the format-1 store, move it back to {} and start again",
                        staging.display(),
                        backup.display(),
                        path.display()
                    ),
                });
            }
            rename(&staging, path).map_err(failed(
                path,
                format!("renaming {} to {}", staging.display(), path.display()),
            ))?;
            return Ok(MigrationOutcome::Migrated(MigrationReport {
                keys: 0,
                bytes: 0,
                log_entries_rewritten: 0,
                chunks: 0,
                resumed: true,
                duration: started.elapsed(),
                backup,
            }));
        }
        return Ok(MigrationOutcome::NotNeeded);
    }

    match read_marker(&opts, path).map_err(failed(path, "reading the format marker"))? {
        None => return Ok(MigrationOutcome::NotNeeded),
        Some(FORMAT_VERSION) => return Ok(MigrationOutcome::NotNeeded),
        Some(FORMAT_SINGLE_GROUP) => {}
        Some(found) => {
            return Err(StoreError::IncompatibleFormat {
                path: path.to_path_buf(),
                found,
                supported: FORMAT_VERSION,
            });
        }
    }
    if backup.exists() {
        return Err(StoreError::MigrationBlocked {
            path: path.to_path_buf(),
            detail: format!(
                "{} exists (the format-1 copy of an earlier migration?): move it elsewhere and \
                 start again",
                backup.display()
            ),
        });
    }

    let report = copy(path, &staging, &opts, &mut migration)?;
    rename(path, &backup).map_err(failed(
        path,
        format!("renaming {} to {}", path.display(), backup.display()),
    ))?;
    rename(&staging, path).map_err(failed(
        path,
        format!("renaming {} to {}", staging.display(), path.display()),
    ))?;
    Ok(MigrationOutcome::Migrated(MigrationReport {
        duration: started.elapsed(),
        backup,
        ..report
    }))
}

/// Copies the format-1 store at `path` into the format-2 store at `staging` (resuming a copy
/// an earlier start began), stamped format 2 once complete. Both closed on return.
fn copy(
    path: &Path,
    staging: &Path,
    opts: &Options,
    migration: &mut Migration<'_>,
) -> Result<MigrationReport, StoreError> {
    let started = Instant::now();
    let known = all_cf_names();
    let names = DB::list_cf(opts, path)
        .map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })
        .map_err(failed(path, "listing the column families"))?;
    if let Some(unknown) = names.iter().find(|name| !known.contains(&name.as_str())) {
        return Err(StoreError::MigrationBlocked {
            path: path.to_path_buf(),
            detail: format!(
                "column family `{unknown}` is not one of a single-group release's: this release \
                 cannot tell how to migrate it"
            ),
        });
    }

    // Read-write, so that the store is locked against a process of the old release.
    let old = DB::open_cf_descriptors(
        opts,
        path,
        names
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(name, cf_options())),
    )
    .map_err(|source| StoreError::Open {
        path: path.to_path_buf(),
        source,
    })
    .map_err(failed(path, "opening the format-1 store"))?;
    let new = DB::open_cf_descriptors(
        opts,
        staging,
        known
            .iter()
            .map(|name| ColumnFamilyDescriptor::new(*name, cf_options())),
    )
    .map_err(|source| StoreError::Open {
        path: staging.to_path_buf(),
        source,
    })
    .map_err(failed(
        path,
        format!("opening the staging store {}", staging.display()),
    ))?;
    let new_default = new
        .cf_handle(CF_DEFAULT)
        .ok_or(StoreError::MissingColumnFamily(CF_DEFAULT))?;

    let step = format!("reading the staging store {}", staging.display());
    let marker = read_format(
        new.get_cf(new_default, FORMAT_KEY)
            .map_err(StoreError::backend("get"))
            .map_err(failed(path, step.clone()))?,
    );
    let raw_cursor = new
        .get_cf(new_default, CURSOR_KEY)
        .map_err(StoreError::backend("get"))
        .map_err(failed(path, step.clone()))?;
    let cursor = match &raw_cursor {
        None => Cursor::default(),
        Some(raw) => Cursor::decode(raw).ok_or_else(|| {
            failed(path, step.clone())(StoreError::CorruptKey {
                cf: CF_DEFAULT,
                detail: "the migration cursor cannot be decoded".to_owned(),
            })
        })?,
    };
    let resumed = raw_cursor.is_some() || marker.is_some();
    if marker == Some(FORMAT_VERSION) {
        // Complete: only the renames were left to do.
        return Ok(MigrationReport {
            keys: cursor.keys,
            bytes: cursor.bytes,
            log_entries_rewritten: cursor.rewritten,
            chunks: 0,
            resumed,
            duration: started.elapsed(),
            backup: PathBuf::new(),
        });
    }
    if let Some(found) = marker {
        return Err(StoreError::MigrationBlocked {
            path: path.to_path_buf(),
            detail: format!(
                "the staging store {} is stamped format {found}: move it elsewhere and start \
                 again",
                staging.display()
            ),
        });
    }

    // Nothing but the format marker lives in `default` of a format-1 store.
    let old_default = old
        .cf_handle(CF_DEFAULT)
        .ok_or(StoreError::MissingColumnFamily(CF_DEFAULT))?;
    for item in old.iterator_cf(old_default, IteratorMode::Start) {
        let (key, _) = item
            .map_err(StoreError::backend("iterate"))
            .map_err(failed(path, "reading column family `default`"))?;
        if *key != *FORMAT_KEY {
            return Err(StoreError::MigrationBlocked {
                path: path.to_path_buf(),
                detail: format!(
                    "column family `default` holds key {:?}, which a single-group release never \
                     wrote",
                    String::from_utf8_lossy(&key)
                ),
            });
        }
    }

    let mut estimated_keys = 0u64;
    let mut estimated_bytes = 0u64;
    for name in &names {
        if let Some(cf) = old.cf_handle(name) {
            let prop = |p: &str| old.property_int_value_cf(cf, p).ok().flatten();
            estimated_keys += prop("rocksdb.estimate-num-keys").unwrap_or(0);
            estimated_bytes += prop("rocksdb.total-sst-files-size").unwrap_or(0)
                + prop("rocksdb.cur-size-all-mem-tables").unwrap_or(0);
        }
    }
    (migration.on_event)(&MigrationEvent::Started {
        path: path.to_path_buf(),
        staging: staging.to_path_buf(),
        estimated_keys,
        estimated_bytes,
        resumed_keys: cursor.keys,
    });

    let prefix = shard_prefix(migration.shard);
    let snapshot = old.snapshot();
    let mut cursor = cursor;
    let mut chunks = 0u64;
    // The column families after `default`, in a fixed order; the cursor's one is where a
    // resumed copy starts.
    let order: Vec<&'static str> = known
        .iter()
        .copied()
        .filter(|name| *name != CF_DEFAULT)
        .collect();
    let skip = match &cursor.last {
        Some((cf, _)) => order.iter().position(|name| name == cf).ok_or_else(|| {
            failed(path, step.clone())(StoreError::CorruptKey {
                cf: CF_DEFAULT,
                detail: format!("the migration cursor names column family `{cf}`"),
            })
        })?,
        None => 0,
    };
    for &name in &order[skip..] {
        let step = format!("copying column family `{name}`");
        let Some(old_cf) = old.cf_handle(name) else {
            // A format-1 store always has them all; one never created holds nothing.
            continue;
        };
        let new_cf = new
            .cf_handle(name)
            .ok_or(StoreError::MissingColumnFamily(name))?;
        let from = match &cursor.last {
            Some((cf, key)) if cf == name => key_successor(key),
            _ => Vec::new(),
        };
        let mut read_opts = ReadOptions::default();
        read_opts.fill_cache(false);
        read_opts.set_snapshot(&snapshot);
        let iter = old.iterator_cf_opt(
            old_cf,
            read_opts,
            IteratorMode::From(&from, rocksdb::Direction::Forward),
        );
        let mut batch = WriteBatch::default();
        let mut batch_bytes = 0usize;
        let mut pending = cursor.clone();
        for item in iter {
            let (key, value) = item
                .map_err(StoreError::backend("iterate"))
                .map_err(failed(path, step.clone()))?;
            let (new_key, new_value) = if name == CF_RAFT_LOG {
                let index = <[u8; 8]>::try_from(&*key)
                    .map(u64::from_be_bytes)
                    .map_err(|_| {
                        failed(path, step.clone())(StoreError::CorruptKey {
                            cf: CF_RAFT_LOG,
                            detail: format!("a format-1 log key of {} bytes, not 8", key.len()),
                        })
                    })?;
                let rewritten = (migration.rewrite_log_entry)(index, &value).map_err(|reason| {
                    failed(path, step.clone())(StoreError::LogEntryRewrite { index, reason })
                })?;
                if rewritten.is_some() {
                    pending.rewritten += 1;
                }
                (
                    log_key(migration.shard, index).to_vec(),
                    rewritten.unwrap_or_else(|| value.to_vec()),
                )
            } else {
                (prefixed(&prefix, &key), value.to_vec())
            };
            batch.put_cf(new_cf, &new_key, &new_value);
            batch_bytes += key.len() + value.len();
            pending.keys += 1;
            pending.bytes += (key.len() + value.len()) as u64;
            pending.last = Some((name.to_owned(), key.to_vec()));
            if batch_bytes >= migration.chunk_bytes {
                write_chunk(&new, batch, &pending).map_err(failed(path, step.clone()))?;
                batch = WriteBatch::default();
                batch_bytes = 0;
                cursor = pending.clone();
                chunks += 1;
                (migration.on_event)(&MigrationEvent::Progress {
                    keys: cursor.keys,
                    bytes: cursor.bytes,
                    cf: name,
                });
                if migration.fail_after_chunks == Some(chunks) {
                    return Err(failed(path, step)(StoreError::InjectedFault {
                        op: "migration chunk",
                    }));
                }
            }
        }
        if !batch.is_empty() {
            write_chunk(&new, batch, &pending).map_err(failed(path, step.clone()))?;
            cursor = pending;
            chunks += 1;
            (migration.on_event)(&MigrationEvent::Progress {
                keys: cursor.keys,
                bytes: cursor.bytes,
                cf: name,
            });
            if migration.fail_after_chunks == Some(chunks) {
                return Err(failed(path, step)(StoreError::InjectedFault {
                    op: "migration chunk",
                }));
            }
        }
    }

    // Complete: the format-2 marker, last and synced.
    let mut batch = WriteBatch::default();
    batch.delete_cf(new_default, CURSOR_KEY);
    batch.put_cf(new_default, FORMAT_KEY, FORMAT_VERSION.to_be_bytes());
    new.write_opt(batch, &sync_write_options())
        .map_err(StoreError::backend("write"))
        .map_err(failed(path, "stamping the staging store format 2"))?;
    // Into SST files (compressed), so that the first open of the migrated store does not
    // replay the whole copy from the WAL.
    for name in &known {
        let cf = new
            .cf_handle(name)
            .ok_or(StoreError::MissingColumnFamily(name))?;
        new.flush_cf(cf)
            .map_err(StoreError::backend("flush"))
            .map_err(failed(path, "flushing the staging store"))?;
    }
    drop(snapshot);
    drop(old);
    drop(new);
    Ok(MigrationReport {
        keys: cursor.keys,
        bytes: cursor.bytes,
        log_entries_rewritten: cursor.rewritten,
        chunks,
        resumed,
        duration: started.elapsed(),
        backup: PathBuf::new(),
    })
}

/// One chunk and the cursor after it, in one synced batch.
fn write_chunk(new: &DB, mut batch: WriteBatch, cursor: &Cursor) -> Result<(), StoreError> {
    let default = new
        .cf_handle(CF_DEFAULT)
        .ok_or(StoreError::MissingColumnFamily(CF_DEFAULT))?;
    batch.put_cf(default, CURSOR_KEY, cursor.encode());
    new.write_opt(batch, &sync_write_options())
        .map_err(StoreError::backend("write"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_bad_ones_are_refused() {
        for cursor in [
            Cursor::default(),
            Cursor {
                keys: 7,
                bytes: 1 << 40,
                rewritten: 3,
                last: Some(("session_messages".to_owned(), vec![0, 1, 0xFF])),
            },
            Cursor {
                keys: 1,
                bytes: 2,
                rewritten: 0,
                last: Some(("raft_log".to_owned(), Vec::new())),
            },
        ] {
            assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
        }
        assert_eq!(Cursor::decode(&[0; 23]), None);
        let mut bad = Cursor::default().encode();
        bad.extend_from_slice(&[9, b'a']);
        assert_eq!(Cursor::decode(&bad), None);
    }

    #[test]
    fn sibling_paths() {
        let path = Path::new("/var/lib/raftmq/raft");
        assert_eq!(
            staging_path(path).expect("path"),
            Path::new("/var/lib/raftmq/raft.migrating")
        );
        assert_eq!(
            backup_path(path).expect("path"),
            Path::new("/var/lib/raftmq/raft.format-1")
        );
        assert!(staging_path(Path::new("/")).is_err());
    }
}
