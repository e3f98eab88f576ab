//! Consistent state snapshots and the versioned snapshot stream (format in the crate docs).

use std::fmt;
use std::io::{self, BufReader, Read, Write};

use rocksdb::{DB, Direction, IteratorMode, ReadOptions, SnapshotWithThreadMode, WriteBatch};

use crate::db::{Inner, sync_write_options};
use crate::error::{SnapshotFormatError, StoreError};
use crate::layout::{StateCf, key_successor, prefix_successor};
use crate::state::{StateDb, StateIter, range_read_options, unprefixed};

/// First bytes of every snapshot stream.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"RMQSNAP\0";
/// The snapshot format version written by this build (and the only one it reads).
pub const SNAPSHOT_FORMAT_VERSION: u16 = 1;
/// Default size of the chunks produced by [`SnapshotStream`].
pub const DEFAULT_CHUNK_SIZE: usize = 256 * 1024;

const TAG_END: u8 = 0x00;
const TAG_RECORD: u8 = 0x01;

/// Size and record count of an exported or imported snapshot stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Key/value records in the stream.
    pub records: u64,
    /// Total bytes of the stream, header and trailer included.
    pub bytes: u64,
}

/// A consistent, read-only, point-in-time view of every state column family of one shard.
///
/// Taking it is cheap and does not block writers; while it lives RocksDB keeps the data it
/// sees (so do not keep one for hours). Read the snapshot's own state machine metadata through
/// [`StateSnapshot::get`] to label an exported stream consistently with its content.
pub struct StateSnapshot<'a> {
    inner: &'a Inner,
    snap: SnapshotWithThreadMode<'a, DB>,
    /// The handle it was taken from (for its injected read faults).
    db: &'a StateDb,
}

impl fmt::Debug for StateSnapshot<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StateSnapshot")
            .field("sequence", &self.snap.sequence_number())
            .finish_non_exhaustive()
    }
}

impl StateDb {
    /// A consistent view of this shard's whole state as of now.
    pub fn snapshot(&self) -> StateSnapshot<'_> {
        StateSnapshot {
            inner: &self.inner,
            snap: self.inner.db.snapshot(),
            db: self,
        }
    }

    /// Writes a snapshot stream of the current state to `out` (taken under one consistent
    /// snapshot: concurrent writes are neither blocked nor included).
    pub fn export_snapshot<W: Write>(&self, out: W) -> Result<SnapshotStats, StoreError> {
        self.snapshot().export(out)
    }

    /// [`StateDb::export_snapshot`] into memory.
    pub fn export_snapshot_to_vec(&self) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        self.export_snapshot(&mut out)?;
        Ok(out)
    }

    /// Replaces this shard's entire state (every [`StateCf`]) with the content of a snapshot
    /// stream; other shards are not touched.
    ///
    /// The stream is read and verified (magic, version, record count, CRC-32) completely before
    /// anything is written; then one synced write batch deletes every existing key of the
    /// shard and inserts the snapshot's records under the shard's prefix, so the state is
    /// either untouched (on any error) or exactly the snapshot's. The batch holds the whole
    /// snapshot in memory.
    ///
    /// Must not run concurrently with other writes to the state column families (the Raft state
    /// machine serializes `install_snapshot` with `apply`).
    pub fn import_snapshot<R: Read>(&self, input: R) -> Result<SnapshotStats, StoreError> {
        let mut wb = WriteBatch::default();
        // The deletions come first in the batch: no key of its own to cover.
        let nothing_put = Default::default();
        for cf in StateCf::ALL {
            self.delete_stored_prefix(&mut wb, cf, &self.prefix, &nothing_put)?;
        }
        let stats = decode_stream(self, input, &mut wb)?;
        self.inner
            .db
            .write_opt(wb, &sync_write_options())
            .map_err(StoreError::backend("write"))?;
        Ok(stats)
    }
}

impl<'a> StateSnapshot<'a> {
    /// The value of `key` in `cf` as of the snapshot.
    pub fn get(&self, cf: StateCf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let handle = self.db.cf_for_read(cf)?;
        self.snap
            .get_cf(handle, self.db.stored_key(key))
            .map_err(StoreError::backend("get"))
    }

    /// Every pair of `cf` whose key starts with `prefix`, as of the snapshot.
    pub fn scan_prefix(&self, cf: StateCf, prefix: &[u8]) -> StateIter<'_> {
        match self.db.cf_for_read(cf) {
            Ok(handle) => {
                let prefix = self.db.stored_key(prefix);
                let end = prefix_successor(&prefix);
                StateIter::new(self.snap.iterator_cf_opt(
                    handle,
                    range_read_options(end.as_deref()),
                    IteratorMode::From(&prefix, Direction::Forward),
                ))
            }
            Err(e) => StateIter::failed(e),
        }
    }

    /// Writes the snapshot stream to `out`.
    pub fn export<W: Write>(&self, mut out: W) -> Result<SnapshotStats, StoreError> {
        let mut encoder = Encoder::new(DEFAULT_CHUNK_SIZE);
        while let Some(chunk) = encoder.next_chunk(self)? {
            out.write_all(&chunk)?;
        }
        out.flush()?;
        Ok(encoder.stats)
    }

    /// Turns the snapshot into a stream of chunks (for gRPC streaming, files...).
    pub fn into_stream(self) -> SnapshotStream<'a> {
        SnapshotStream {
            snapshot: self,
            encoder: Encoder::new(DEFAULT_CHUNK_SIZE),
            pending: Vec::new(),
            pos: 0,
        }
    }
}

/// The snapshot stream of a [`StateSnapshot`], produced lazily chunk by chunk.
///
/// Use [`SnapshotStream::next_chunk`] to get whole chunks, or `Read` it as bytes. Chunks are
/// cut at record boundaries once they reach the chunk size, so a chunk can exceed it by one
/// record; the receiver must treat the chunks as one byte stream (concatenate them).
pub struct SnapshotStream<'a> {
    snapshot: StateSnapshot<'a>,
    encoder: Encoder,
    pending: Vec<u8>,
    pos: usize,
}

impl fmt::Debug for SnapshotStream<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnapshotStream")
            .field("snapshot", &self.snapshot)
            .field("stats", &self.encoder.stats)
            .finish_non_exhaustive()
    }
}

impl SnapshotStream<'_> {
    /// Sets the target chunk size in bytes (default [`DEFAULT_CHUNK_SIZE`], minimum 1).
    #[must_use]
    pub fn with_chunk_size(mut self, chunk_size: usize) -> Self {
        self.encoder.chunk_size = chunk_size.max(1);
        self
    }

    /// The next chunk of the stream, `None` after the last one.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, StoreError> {
        if self.pos < self.pending.len() {
            let rest = self.pending.split_off(self.pos);
            self.pending.clear();
            self.pos = 0;
            return Ok(Some(rest));
        }
        self.encoder.next_chunk(&self.snapshot)
    }

    /// Records and bytes produced so far (the totals once the last chunk was returned).
    pub fn stats(&self) -> SnapshotStats {
        self.encoder.stats
    }
}

impl Read for SnapshotStream<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        while self.pos >= self.pending.len() {
            match self.encoder.next_chunk(&self.snapshot) {
                Ok(Some(chunk)) => {
                    self.pending = chunk;
                    self.pos = 0;
                }
                Ok(None) => return Ok(0),
                Err(StoreError::Io(e)) => return Err(e),
                Err(e) => return Err(io::Error::other(e)),
            }
        }
        let n = buf.len().min(self.pending.len() - self.pos);
        buf[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

enum Phase {
    Header,
    Records {
        cf_index: usize,
        /// Last key written from the current column family, to resume after.
        resume_after: Option<Vec<u8>>,
    },
    Done,
}

/// Produces the stream chunk by chunk. Each chunk opens a fresh iterator on the snapshot
/// positioned after the last key written, so no iterator outlives a call (no self-reference).
struct Encoder {
    phase: Phase,
    chunk_size: usize,
    crc: crc32fast::Hasher,
    stats: SnapshotStats,
}

impl Encoder {
    fn new(chunk_size: usize) -> Self {
        Encoder {
            phase: Phase::Header,
            chunk_size,
            crc: crc32fast::Hasher::new(),
            stats: SnapshotStats::default(),
        }
    }

    fn next_chunk(&mut self, snapshot: &StateSnapshot<'_>) -> Result<Option<Vec<u8>>, StoreError> {
        let mut out = Vec::with_capacity(self.chunk_size.min(DEFAULT_CHUNK_SIZE) + 64);
        loop {
            match &mut self.phase {
                Phase::Done => return Ok(None),
                Phase::Header => {
                    out.extend_from_slice(&SNAPSHOT_MAGIC);
                    out.extend_from_slice(&SNAPSHOT_FORMAT_VERSION.to_be_bytes());
                    out.extend_from_slice(&0u16.to_be_bytes());
                    self.phase = Phase::Records {
                        cf_index: 0,
                        resume_after: None,
                    };
                }
                Phase::Records {
                    cf_index,
                    resume_after,
                } => {
                    let Some(&cf) = StateCf::ALL.get(*cf_index) else {
                        out.push(TAG_END);
                        out.extend_from_slice(&self.stats.records.to_be_bytes());
                        self.crc.update(&out);
                        let crc = self.crc.clone().finalize();
                        out.extend_from_slice(&crc.to_be_bytes());
                        self.stats.bytes += out.len() as u64;
                        self.phase = Phase::Done;
                        return Ok(Some(out));
                    };
                    let handle = snapshot.inner.cf(cf.name())?;
                    let mut opts = ReadOptions::default();
                    // A bulk scan: do not evict the hot working set from the block cache.
                    opts.fill_cache(false);
                    // This shard's keys only.
                    if let Some(end) = snapshot.db.shard_end() {
                        opts.set_iterate_upper_bound(end);
                    }
                    let start = resume_after
                        .as_deref()
                        .map_or_else(|| snapshot.db.prefix.to_vec(), key_successor);
                    let iter = snapshot.snap.iterator_cf_opt(
                        handle,
                        opts,
                        IteratorMode::From(&start, Direction::Forward),
                    );
                    let mut chunk_full = false;
                    for item in iter {
                        let (key, value) = item.map_err(StoreError::backend("iterate"))?;
                        write_record(&mut out, cf, &unprefixed(&key), &value)?;
                        self.stats.records += 1;
                        if out.len() >= self.chunk_size {
                            *resume_after = Some(key.into_vec());
                            chunk_full = true;
                            break;
                        }
                    }
                    if chunk_full {
                        self.crc.update(&out);
                        self.stats.bytes += out.len() as u64;
                        return Ok(Some(out));
                    }
                    *cf_index += 1;
                    *resume_after = None;
                }
            }
        }
    }
}

fn write_record(
    out: &mut Vec<u8>,
    cf: StateCf,
    key: &[u8],
    value: &[u8],
) -> Result<(), StoreError> {
    let key_len =
        u32::try_from(key.len()).map_err(|_| SnapshotFormatError::RecordTooLarge(key.len()))?;
    let value_len =
        u32::try_from(value.len()).map_err(|_| SnapshotFormatError::RecordTooLarge(value.len()))?;
    out.push(TAG_RECORD);
    out.push(cf.id());
    out.extend_from_slice(&key_len.to_be_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&value_len.to_be_bytes());
    out.extend_from_slice(value);
    Ok(())
}

/// A reader that feeds every byte it returns into a CRC-32.
struct CrcReader<R> {
    inner: R,
    crc: crc32fast::Hasher,
}

impl<R: Read> Read for CrcReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.crc.update(&buf[..n]);
        Ok(n)
    }
}

/// Maps an unexpected end of input to [`SnapshotFormatError::Truncated`].
fn read_err(e: io::Error) -> StoreError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        SnapshotFormatError::Truncated.into()
    } else {
        StoreError::Io(e)
    }
}

fn read_array<const N: usize>(r: &mut impl Read) -> Result<[u8; N], StoreError> {
    let mut buf = [0u8; N];
    r.read_exact(&mut buf).map_err(read_err)?;
    Ok(buf)
}

fn read_bytes(r: &mut impl Read) -> Result<Vec<u8>, StoreError> {
    let len = u32::from_be_bytes(read_array(r)?);
    let mut buf = Vec::new();
    // `take` + `read_to_end` grows the buffer with the data actually present instead of
    // trusting a (possibly corrupt) length for one big allocation.
    r.take(u64::from(len))
        .read_to_end(&mut buf)
        .map_err(read_err)?;
    if buf.len() != len as usize {
        return Err(SnapshotFormatError::Truncated.into());
    }
    Ok(buf)
}

/// Parses and verifies a whole stream, adding its records to `wb` under `db`'s shard prefix.
fn decode_stream<R: Read>(
    db: &StateDb,
    input: R,
    wb: &mut WriteBatch,
) -> Result<SnapshotStats, StoreError> {
    let mut r = CrcReader {
        inner: BufReader::new(input),
        crc: crc32fast::Hasher::new(),
    };
    let magic: [u8; 8] = read_array(&mut r)?;
    if magic != SNAPSHOT_MAGIC {
        return Err(SnapshotFormatError::BadMagic.into());
    }
    let version = u16::from_be_bytes(read_array(&mut r)?);
    if version != SNAPSHOT_FORMAT_VERSION {
        return Err(SnapshotFormatError::UnsupportedVersion(version).into());
    }
    let flags = u16::from_be_bytes(read_array(&mut r)?);
    if flags != 0 {
        return Err(SnapshotFormatError::UnsupportedFlags(flags).into());
    }
    let mut bytes: u64 = 12;
    let mut records: u64 = 0;
    loop {
        let [tag] = read_array(&mut r)?;
        match tag {
            TAG_RECORD => {
                let [cf_id] = read_array(&mut r)?;
                let cf = StateCf::from_id(cf_id)
                    .ok_or(SnapshotFormatError::UnknownColumnFamily(cf_id))?;
                let key = read_bytes(&mut r)?;
                let value = read_bytes(&mut r)?;
                bytes += 10 + key.len() as u64 + value.len() as u64;
                records += 1;
                wb.put_cf(db.inner.cf(cf.name())?, db.stored_key(&key), value);
            }
            TAG_END => {
                let expected_records = u64::from_be_bytes(read_array(&mut r)?);
                let actual_crc = r.crc.clone().finalize();
                // The checksum itself is not part of the checksummed bytes.
                let expected_crc = u32::from_be_bytes(read_array(&mut r.inner)?);
                bytes += 13;
                if expected_crc != actual_crc {
                    return Err(SnapshotFormatError::ChecksumMismatch {
                        expected: expected_crc,
                        actual: actual_crc,
                    }
                    .into());
                }
                if expected_records != records {
                    return Err(SnapshotFormatError::RecordCountMismatch {
                        expected: expected_records,
                        actual: records,
                    }
                    .into());
                }
                if !at_eof(&mut r.inner)? {
                    return Err(SnapshotFormatError::TrailingData.into());
                }
                return Ok(SnapshotStats { records, bytes });
            }
            other => return Err(SnapshotFormatError::UnknownRecordTag(other).into()),
        }
    }
}

fn at_eof(r: &mut impl Read) -> Result<bool, StoreError> {
    let mut probe = [0u8; 1];
    loop {
        match r.read(&mut probe) {
            Ok(n) => return Ok(n == 0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(StoreError::Io(e)),
        }
    }
}
