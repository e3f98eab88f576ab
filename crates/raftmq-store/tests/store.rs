//! raftmq-store integration tests: openraft's storage test suite run against [`LogStore`] and a
//! minimal key/value state machine over [`StateDb`], plus restart durability, snapshot streams,
//! log truncation/purge semantics and the state database API. [`shards`]: several shards (Raft
//! groups) in one store, the WAL syncer, and the refusal of a format-1 data dir by `open`;
//! [`migrate`]: its migration to format 2.

#[path = "store/shards.rs"]
mod shards;

#[path = "store/migrate.rs"]
mod migrate;

use std::collections::BTreeMap;
use std::io::{self, Cursor, Read};
use std::ops::Bound;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftLogStorage, RaftLogStorageExt, RaftStateMachine, Snapshot};
use openraft::testing::{StoreBuilder, Suite, log_id};
use openraft::{
    BasicNode, Entry, EntryPayload, ErrorSubject, ErrorVerb, LogId, LogState, OptionalSend,
    RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError, StoredMembership, Vote,
};
use raftmq_store::{SnapshotFormatError, StateBatch, StateCf, StateDb, Store, StoreError};
use serde::{Deserialize, Serialize};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Test type config and state machine
// ---------------------------------------------------------------------------------------------

/// Application request of the test state machine: set `key` to `value`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Req {
    key: String,
    value: String,
}

/// Response: the previous value of the key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resp {
    previous: Option<String>,
}

openraft::declare_raft_types!(
    /// Type config of the tests.
    pub TC:
        D = Req,
        R = Resp,
        NodeId = u64,
        Node = BasicNode,
        Entry = Entry<TC>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The test state machine keeps its key/value pairs in this column family.
const KV: StateCf = StateCf::Retained;
const META_APPLIED: &[u8] = b"last_applied";
const META_MEMBERSHIP: &[u8] = b"membership";

type Membership = StoredMembership<u64, BasicNode>;

#[derive(Clone)]
struct StoredSnapshot {
    meta: SnapshotMeta<u64, BasicNode>,
    data: Vec<u8>,
}

/// A key/value state machine persisted in [`StateDb`]: every `apply` is one atomic batch that
/// carries the last applied log id, snapshots are [`StateDb`] snapshot streams.
struct TestSm {
    db: StateDb,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    snapshot_seq: Arc<AtomicU64>,
}

impl TestSm {
    fn new(db: StateDb) -> Self {
        TestSm {
            db,
            current: Arc::default(),
            snapshot_seq: Arc::default(),
        }
    }
}

fn json<T: Serialize>(value: &T) -> io::Result<Vec<u8>> {
    Ok(serde_json::to_vec(value)?)
}

fn from_json<T: for<'de> Deserialize<'de>>(raw: &[u8]) -> io::Result<T> {
    Ok(serde_json::from_slice(raw)?)
}

fn sm_read(e: io::Error) -> StorageError<u64> {
    StorageError::from_io_error(ErrorSubject::StateMachine, ErrorVerb::Read, e)
}

fn sm_write(e: io::Error) -> StorageError<u64> {
    StorageError::from_io_error(ErrorSubject::StateMachine, ErrorVerb::Write, e)
}

/// Reads last applied log id and membership through `get` (live database or snapshot).
fn read_applied(
    get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, StoreError>,
) -> io::Result<(Option<LogId<u64>>, Membership)> {
    let applied = match get(META_APPLIED).map_err(io::Error::other)? {
        Some(raw) => from_json(&raw)?,
        None => None,
    };
    let membership = match get(META_MEMBERSHIP).map_err(io::Error::other)? {
        Some(raw) => from_json(&raw)?,
        None => Membership::default(),
    };
    Ok((applied, membership))
}

impl RaftStateMachine<TC> for TestSm {
    type SnapshotBuilder = TestSnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<u64>>, Membership), StorageError<u64>> {
        read_applied(|key| self.db.get(StateCf::SmMeta, key)).map_err(sm_read)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Resp>, StorageError<u64>>
    where
        I: IntoIterator<Item = Entry<TC>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = StateBatch::new();
        // Values written earlier in this batch (not yet visible in the database).
        let mut pending: BTreeMap<String, String> = BTreeMap::new();
        let mut replies = Vec::new();
        let mut last_applied = None;
        for entry in entries {
            match entry.payload {
                EntryPayload::Blank => replies.push(Resp::default()),
                EntryPayload::Normal(req) => {
                    let previous = match pending.get(&req.key) {
                        Some(value) => Some(value.clone()),
                        None => self
                            .db
                            .get(KV, req.key.as_bytes())
                            .map_err(StoreError::read_state_machine)?
                            .map(|raw| String::from_utf8_lossy(&raw).into_owned()),
                    };
                    batch.put(KV, req.key.as_bytes(), req.value.as_bytes());
                    pending.insert(req.key, req.value);
                    replies.push(Resp { previous });
                }
                EntryPayload::Membership(membership) => {
                    let stored = Membership::new(Some(entry.log_id), membership);
                    batch.put(
                        StateCf::SmMeta,
                        META_MEMBERSHIP,
                        json(&stored).map_err(sm_write)?,
                    );
                    replies.push(Resp::default());
                }
            }
            last_applied = Some(entry.log_id);
        }
        if last_applied.is_some() {
            batch.put(
                StateCf::SmMeta,
                META_APPLIED,
                json(&last_applied).map_err(sm_write)?,
            );
            self.db
                .write(batch)
                .map_err(StoreError::write_state_machine)?;
        }
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> TestSnapshotBuilder {
        TestSnapshotBuilder {
            db: self.db.clone(),
            current: Arc::clone(&self.current),
            snapshot_seq: Arc::clone(&self.snapshot_seq),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<u64>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<u64, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<u64>> {
        let data = snapshot.into_inner();
        self.db
            .import_snapshot(data.as_slice())
            .map_err(StoreError::write_snapshot)?;
        *self.current.lock().expect("snapshot lock") = Some(StoredSnapshot {
            meta: meta.clone(),
            data,
        });
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TC>>, StorageError<u64>> {
        let current = self.current.lock().expect("snapshot lock").clone();
        Ok(current.map(|stored| Snapshot {
            meta: stored.meta,
            snapshot: Box::new(Cursor::new(stored.data)),
        }))
    }
}

struct TestSnapshotBuilder {
    db: StateDb,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    snapshot_seq: Arc<AtomicU64>,
}

impl RaftSnapshotBuilder<TC> for TestSnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TC>, StorageError<u64>> {
        let (meta, data) = {
            let snapshot = self.db.snapshot();
            // Metadata read from the same snapshot as the data: always consistent.
            let (last_log_id, last_membership) =
                read_applied(|key| snapshot.get(StateCf::SmMeta, key)).map_err(sm_read)?;
            let mut data = Vec::new();
            snapshot
                .export(&mut data)
                .map_err(StoreError::read_snapshot)?;
            let seq = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
            let snapshot_id = format!("{}-{seq}", last_log_id.as_ref().map_or(0, |id| id.index));
            let meta = SnapshotMeta {
                last_log_id,
                last_membership,
                snapshot_id,
            };
            (meta, data)
        };
        *self.current.lock().expect("snapshot lock") = Some(StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        });
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// openraft's storage test suite
// ---------------------------------------------------------------------------------------------

struct Builder;

impl StoreBuilder<TC, raftmq_store::LogStore<TC>, TestSm, TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(TempDir, raftmq_store::LogStore<TC>, TestSm), StorageError<u64>> {
        let dir = tempfile::tempdir()
            .map_err(|e| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        let store = Store::open(dir.path())
            .map_err(|e| e.into_storage_error(ErrorSubject::Store, ErrorVerb::Read))?;
        Ok((
            dir,
            store.log_store::<TC>(1),
            TestSm::new(store.state_db(1)),
        ))
    }
}

/// Runs every test of `openraft::testing::Suite` (each on a fresh store; it creates its own
/// runtimes, so this is a plain `#[test]`).
#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn open(dir: &TempDir) -> Store {
    Store::open(dir.path()).expect("open store")
}

fn normal(term: u64, index: u64, key: &str, value: &str) -> Entry<TC> {
    Entry {
        log_id: log_id(term, 0, index),
        payload: EntryPayload::Normal(Req {
            key: key.to_owned(),
            value: value.to_owned(),
        }),
    }
}

fn blank(term: u64, index: u64) -> Entry<TC> {
    Entry {
        log_id: log_id(term, 0, index),
        payload: EntryPayload::Blank,
    }
}

/// Log ids of the entries in `range`.
async fn ids(
    log: &mut raftmq_store::LogStore<TC>,
    range: (Bound<u64>, Bound<u64>),
) -> Vec<(u64, u64)> {
    log.try_get_log_entries(range)
        .await
        .expect("read log")
        .iter()
        .map(|e| (e.log_id.leader_id.term, e.log_id.index))
        .collect()
}

type Dump = BTreeMap<(StateCf, Vec<u8>), Vec<u8>>;

/// Every pair of every state column family.
fn dump(db: &StateDb) -> Dump {
    let mut all = BTreeMap::new();
    for cf in StateCf::ALL {
        for item in db.scan_prefix(cf, b"") {
            let (key, value) = item.expect("scan");
            all.insert((cf, key), value);
        }
    }
    all
}

/// Fills every state column family with awkward keys (empty, all-0xFF, binary) and values
/// (empty, 1 MiB); returns the number of pairs written.
fn fill(db: &StateDb, tag: &str) -> usize {
    let mut batch = StateBatch::new();
    let mut count = 0;
    for cf in StateCf::ALL {
        batch.put(cf, Vec::new(), format!("{tag}-empty-key"));
        batch.put(cf, vec![0xFFu8; 3], Vec::new());
        batch.put(cf, vec![0x00u8, 0x01, 0xFF, 0x00], format!("{tag}-binary"));
        count += 3;
        for i in 0..300u32 {
            let mut key = b"item/".to_vec();
            key.extend_from_slice(&i.to_be_bytes());
            batch.put(cf, key, format!("{tag}-{cf}-{i}").repeat(4));
            count += 1;
        }
    }
    batch.put(StateCf::Messages, b"big".to_vec(), vec![0xA5u8; 1 << 20]);
    count += 1;
    db.write(batch).expect("fill");
    count
}

// ---------------------------------------------------------------------------------------------
// Log store
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn reopen_keeps_vote_log_committed_and_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(&dir);
        // The database is locked while open: a second open fails cleanly.
        let second = Store::open(dir.path());
        assert!(matches!(second, Err(StoreError::Open { .. })), "{second:?}");

        let mut log = store.log_store::<TC>(1);
        log.save_vote(&Vote::new(3, 1)).await.expect("vote");
        log.blocking_append((0..=5).map(|i| normal(1, i, &format!("k{i}"), &format!("v{i}"))))
            .await
            .expect("append");
        log.purge(log_id(1, 0, 1)).await.expect("purge");
        log.save_committed(Some(log_id(1, 0, 4)))
            .await
            .expect("committed");

        let mut sm = TestSm::new(store.state_db(1));
        let entries = log.try_get_log_entries(2..=4).await.expect("read");
        let replies = sm.apply(entries).await.expect("apply");
        assert_eq!(replies.len(), 3);
        // `store`, `log` and `sm` are dropped here: the database closes.
    }

    let store = open(&dir);
    let mut log = store.log_store::<TC>(1);
    assert_eq!(log.read_vote().await.expect("vote"), Some(Vote::new(3, 1)));
    assert_eq!(
        log.get_log_state().await.expect("log state"),
        LogState {
            last_purged_log_id: Some(log_id(1, 0, 1)),
            last_log_id: Some(log_id(1, 0, 5)),
        }
    );
    assert_eq!(
        log.read_committed().await.expect("committed"),
        Some(log_id(1, 0, 4))
    );
    let entries = log.try_get_log_entries(..).await.expect("read");
    assert_eq!(entries.len(), 4);
    for (entry, index) in entries.iter().zip(2..) {
        assert_eq!(entry.log_id, log_id(1, 0, index));
        assert!(
            entry.payload == normal(1, index, &format!("k{index}"), &format!("v{index}")).payload
        );
    }

    let mut sm = TestSm::new(store.state_db(1));
    let (applied, _) = sm.applied_state().await.expect("applied");
    assert_eq!(applied, Some(log_id(1, 0, 4)));
    let db = store.state_db(1);
    assert_eq!(db.get(KV, b"k3").expect("get"), Some(b"v3".to_vec()));
    assert_eq!(db.get(KV, b"k5").expect("get"), None, "never applied");
}

#[tokio::test]
async fn truncate_and_purge_semantics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let mut log = store.log_store::<TC>(1);
    let all = (Bound::Unbounded, Bound::Unbounded);

    log.blocking_append((1..=10).map(|i| blank(1, i)))
        .await
        .expect("append");
    assert_eq!(ids(&mut log, all).await.len(), 10);

    // Range bounds.
    let got = ids(&mut log, (Bound::Included(5), Bound::Unbounded)).await;
    assert_eq!(got.first(), Some(&(1, 5)));
    assert_eq!(got.len(), 6);
    assert_eq!(
        ids(&mut log, (Bound::Unbounded, Bound::Included(2))).await,
        vec![(1, 1), (1, 2)]
    );
    assert_eq!(
        ids(&mut log, (Bound::Excluded(4), Bound::Excluded(6))).await,
        vec![(1, 5)]
    );
    assert!(
        ids(&mut log, (Bound::Included(6), Bound::Excluded(6)))
            .await
            .is_empty()
    );
    assert!(
        ids(&mut log, (Bound::Included(9), Bound::Excluded(3)))
            .await
            .is_empty()
    );
    assert!(
        ids(&mut log, (Bound::Excluded(u64::MAX), Bound::Unbounded))
            .await
            .is_empty()
    );
    assert_eq!(
        ids(&mut log, (Bound::Included(10), Bound::Included(u64::MAX))).await,
        vec![(1, 10)]
    );

    // Truncate [7, ∞): conflicting entries gone, no hole.
    log.truncate(log_id(1, 0, 7)).await.expect("truncate");
    assert_eq!(
        ids(&mut log, all).await,
        (1..=6).map(|i| (1, i)).collect::<Vec<_>>()
    );
    assert_eq!(
        log.get_log_state().await.expect("state").last_log_id,
        Some(log_id(1, 0, 6))
    );
    // Truncating past the end is a no-op.
    log.truncate(log_id(1, 0, 50)).await.expect("truncate");
    assert_eq!(ids(&mut log, all).await.len(), 6);

    // New leader's entries replace the truncated ones.
    log.blocking_append([blank(2, 7), blank(2, 8)])
        .await
        .expect("append");
    assert_eq!(
        ids(&mut log, (Bound::Included(6), Bound::Unbounded)).await,
        vec![(1, 6), (2, 7), (2, 8)]
    );

    // Purge (-∞, 3].
    log.purge(log_id(1, 0, 3)).await.expect("purge");
    assert_eq!(
        ids(&mut log, all).await,
        vec![(1, 4), (1, 5), (1, 6), (2, 7), (2, 8)]
    );
    assert_eq!(
        log.get_log_state().await.expect("state"),
        LogState {
            last_purged_log_id: Some(log_id(1, 0, 3)),
            last_log_id: Some(log_id(2, 0, 8)),
        }
    );
    // The log reader sees the same log.
    let mut reader = log.get_log_reader().await;
    assert_eq!(
        reader.try_get_log_entries(0..5).await.expect("read").len(),
        1
    );

    // Purge beyond the last entry (after installing a snapshot): empty log, last = purged.
    log.purge(log_id(2, 0, 20)).await.expect("purge");
    assert!(ids(&mut log, all).await.is_empty());
    assert_eq!(
        log.get_log_state().await.expect("state"),
        LogState {
            last_purged_log_id: Some(log_id(2, 0, 20)),
            last_log_id: Some(log_id(2, 0, 20)),
        }
    );
    log.blocking_append([blank(3, 21)]).await.expect("append");
    assert_eq!(
        log.get_log_state().await.expect("state").last_log_id,
        Some(log_id(3, 0, 21))
    );

    // An empty append still reports completion.
    log.blocking_append(std::iter::empty())
        .await
        .expect("empty append");

    // Committed can be cleared again.
    log.save_committed(Some(log_id(3, 0, 21)))
        .await
        .expect("committed");
    log.save_committed(None).await.expect("committed");
    assert_eq!(log.read_committed().await.expect("committed"), None);
}

// ---------------------------------------------------------------------------------------------
// State database
// ---------------------------------------------------------------------------------------------

#[test]
fn state_batches_and_scans() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let db = store.state_db(1);
    let scan = |cf: StateCf, prefix: &[u8]| -> Vec<Vec<u8>> {
        db.scan_prefix(cf, prefix)
            .map(|item| item.expect("scan").0)
            .collect()
    };

    let mut batch = StateBatch::new();
    for key in [
        &[0x01u8][..],
        &[0x01, 0x00],
        &[0x01, 0xFF],
        &[0x01, 0xFF, 0x07],
        &[0x02],
        &[0xFF],
        &[0xFF, 0x00],
        &[0xFF, 0xFF, 0xFF],
    ] {
        batch.put(StateCf::Subscriptions, key, key);
    }
    batch.put(StateCf::Sessions, b"c1", b"session");
    assert_eq!(batch.len(), 9);
    db.write(batch).expect("write");

    assert_eq!(scan(StateCf::Subscriptions, b"").len(), 8);
    assert_eq!(
        scan(StateCf::Subscriptions, &[0x01, 0xFF]),
        vec![vec![0x01, 0xFF], vec![0x01, 0xFF, 0x07]]
    );
    assert_eq!(
        scan(StateCf::Subscriptions, &[0xFF]),
        vec![vec![0xFF], vec![0xFF, 0x00], vec![0xFF, 0xFF, 0xFF]]
    );
    assert_eq!(
        db.last_with_prefix(StateCf::Subscriptions, &[0x01])
            .expect("last")
            .map(|(k, _)| k),
        Some(vec![0x01, 0xFF, 0x07])
    );
    assert_eq!(
        db.last_with_prefix(StateCf::Subscriptions, &[0x03])
            .expect("last"),
        None
    );
    let range: Vec<_> = db
        .scan_range(StateCf::Subscriptions, &[0x01, 0x00], Some(&[0x02u8][..]))
        .map(|item| item.expect("scan").0)
        .collect();
    assert_eq!(
        range,
        vec![vec![0x01, 0x00], vec![0x01, 0xFF], vec![0x01, 0xFF, 0x07]]
    );
    // Column families are separate key spaces.
    assert_eq!(scan(StateCf::Sessions, b""), vec![b"c1".to_vec()]);
    assert_eq!(db.get(StateCf::Retained, b"c1").expect("get"), None);

    // One atomic batch mixing every operation, across column families, applied in order.
    let mut batch = StateBatch::new();
    batch
        .delete_range(StateCf::Subscriptions, [0x01u8, 0x00], [0x01u8, 0xFF, 0x00])
        .put(StateCf::Subscriptions, [0xFFu8, 0xFF, 0xFF, 0x01], b"new")
        // No successor for 0xFF: must also cover the key put just above.
        .delete_prefix(StateCf::Subscriptions, [0xFFu8])
        .put(StateCf::Subscriptions, [0xFFu8, 0x10], b"after")
        .delete(StateCf::Sessions, b"c1")
        .put(StateCf::Sessions, b"c2", b"session");
    db.write_sync(batch).expect("write");
    assert_eq!(
        scan(StateCf::Subscriptions, b""),
        vec![
            vec![0x01],
            vec![0x01, 0xFF, 0x07],
            vec![0x02],
            vec![0xFF, 0x10]
        ]
    );
    assert_eq!(scan(StateCf::Sessions, b""), vec![b"c2".to_vec()]);

    let mut batch = StateBatch::new();
    batch.clear(StateCf::Subscriptions);
    db.write(batch).expect("write");
    assert!(scan(StateCf::Subscriptions, b"").is_empty());
    db.sync().expect("sync");
}

#[test]
fn snapshot_round_trip_restores_identical_state() {
    let source_dir = tempfile::tempdir().expect("tempdir");
    let source = open(&source_dir).state_db(1);
    let written = fill(&source, "src");
    let original = dump(&source);
    assert_eq!(original.len(), written);

    let bytes = source.export_snapshot_to_vec().expect("export");
    assert_eq!(&bytes[..8], b"RMQSNAP\0");

    // Every way of producing the stream yields the same bytes.
    let mut chunked = Vec::new();
    let mut stream = source.snapshot().into_stream().with_chunk_size(4096);
    let mut chunks = 0;
    while let Some(chunk) = stream.next_chunk().expect("chunk") {
        chunked.extend_from_slice(&chunk);
        chunks += 1;
    }
    assert!(chunks > 10, "{chunks} chunks");
    assert_eq!(stream.stats().records, written as u64);
    assert_eq!(stream.stats().bytes, bytes.len() as u64);
    assert_eq!(chunked, bytes);
    let mut read = Vec::new();
    source
        .snapshot()
        .into_stream()
        .with_chunk_size(1)
        .read_to_end(&mut read)
        .expect("read");
    assert_eq!(read, bytes);

    let target_dir = tempfile::tempdir().expect("tempdir");
    let target = open(&target_dir).state_db(1);
    let stats = target.import_snapshot(bytes.as_slice()).expect("import");
    assert_eq!(stats.records, written as u64);
    assert_eq!(stats.bytes, bytes.len() as u64);
    assert_eq!(dump(&target), original);
    // Exporting the imported state gives the same stream again.
    assert_eq!(target.export_snapshot_to_vec().expect("export"), bytes);
}

#[test]
fn import_replaces_instead_of_merging() {
    let source_dir = tempfile::tempdir().expect("tempdir");
    let source = open(&source_dir).state_db(1);
    let mut batch = StateBatch::new();
    batch.put(StateCf::Sessions, b"only-in-source", b"1").put(
        StateCf::Retained,
        b"shared",
        b"source",
    );
    source.write(batch).expect("write");
    let bytes = source.export_snapshot_to_vec().expect("export");

    let target_dir = tempfile::tempdir().expect("tempdir");
    let target = open(&target_dir).state_db(1);
    fill(&target, "old");
    let mut batch = StateBatch::new();
    batch.put(StateCf::Retained, b"shared", b"target");
    target.write(batch).expect("write");

    target.import_snapshot(bytes.as_slice()).expect("import");
    assert_eq!(dump(&target), dump(&source));
    assert_eq!(dump(&target).len(), 2);

    // An empty snapshot empties the state.
    let empty_dir = tempfile::tempdir().expect("tempdir");
    let empty = open(&empty_dir)
        .state_db(1)
        .export_snapshot_to_vec()
        .expect("export");
    target.import_snapshot(empty.as_slice()).expect("import");
    assert!(dump(&target).is_empty());
}

#[test]
fn invalid_snapshot_is_rejected_without_touching_state() {
    let source_dir = tempfile::tempdir().expect("tempdir");
    let source = open(&source_dir).state_db(1);
    let mut batch = StateBatch::new();
    for i in 0..50u32 {
        batch.put(StateCf::Sessions, i.to_be_bytes(), vec![i as u8; 40]);
    }
    source.write(batch).expect("write");
    let good = source.export_snapshot_to_vec().expect("export");

    let target_dir = tempfile::tempdir().expect("tempdir");
    let target = open(&target_dir).state_db(1);
    fill(&target, "keep");
    let before = dump(&target);

    let reject = |bytes: &[u8]| -> StoreError {
        let err = target
            .import_snapshot(bytes)
            .expect_err("invalid snapshot imported");
        assert!(dump(&target) == before, "state changed by a failed import");
        err
    };
    let format_error = |err: StoreError| match err {
        StoreError::Snapshot(e) => e,
        other => panic!("expected a snapshot format error, got {other:?}"),
    };

    for len in [
        0,
        5,
        12,
        13,
        100,
        good.len() / 2,
        good.len() - 4,
        good.len() - 1,
    ] {
        assert_eq!(
            format_error(reject(&good[..len])),
            SnapshotFormatError::Truncated,
            "truncated to {len}"
        );
    }

    let mut bad_magic = good.clone();
    bad_magic[0] ^= 0xFF;
    assert_eq!(
        format_error(reject(&bad_magic)),
        SnapshotFormatError::BadMagic
    );

    let mut version = good.clone();
    version[8..10].copy_from_slice(&2u16.to_be_bytes());
    assert_eq!(
        format_error(reject(&version)),
        SnapshotFormatError::UnsupportedVersion(2)
    );

    // A flipped bit in a value is caught by the checksum.
    let mut flipped = good.clone();
    let value_byte = 12 + 1 + 1 + 4 + 4 + 4 + 10;
    flipped[value_byte] ^= 0x01;
    assert!(matches!(
        format_error(reject(&flipped)),
        SnapshotFormatError::ChecksumMismatch { .. }
    ));

    // Unknown column family id in the first record.
    let mut unknown_cf = good.clone();
    unknown_cf[13] = 42;
    assert_eq!(
        format_error(reject(&unknown_cf)),
        SnapshotFormatError::UnknownColumnFamily(42)
    );

    let mut trailing = good.clone();
    trailing.push(0);
    assert_eq!(
        format_error(reject(&trailing)),
        SnapshotFormatError::TrailingData
    );

    target
        .import_snapshot(good.as_slice())
        .expect("valid import");
    assert_eq!(dump(&target), dump(&source));
}

#[test]
fn concurrent_writes_during_export_are_not_in_the_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(&dir).state_db(1);
    let key = |i: u32| format!("key/{i:06}").into_bytes();
    let mut batch = StateBatch::new();
    for cf in StateCf::ALL {
        for i in 0..2_000u32 {
            batch.put(cf, key(i), format!("v0-{i}"));
        }
    }
    db.write(batch).expect("write");
    let expected = dump(&db);

    let snapshot = db.snapshot();
    let mut stream = snapshot.into_stream().with_chunk_size(2048);
    let mut bytes = Vec::new();
    std::thread::scope(|scope| {
        // A concurrent writer rewriting, deleting and adding keys everywhere.
        let writer_db = db.clone();
        let writer = scope.spawn(move || {
            for round in 1..=200u32 {
                let mut batch = StateBatch::new();
                for cf in StateCf::ALL {
                    let i = round * 7 % 2_000;
                    batch
                        .put(cf, key(i), format!("writer-{round}"))
                        .delete(cf, key((i + 1) % 2_000))
                        .put(cf, format!("a-before/{round}"), b"new")
                        .put(cf, format!("z-after/{round}"), b"new");
                }
                writer_db.write(batch).expect("concurrent write");
            }
        });

        // Between chunks (when the stream re-seeks), also write in the part of the key space
        // already streamed and in the part still to come.
        let mut n = 0u32;
        while let Some(chunk) = stream.next_chunk().expect("chunk") {
            bytes.extend_from_slice(&chunk);
            n += 1;
            let mut batch = StateBatch::new();
            for cf in StateCf::ALL {
                batch
                    .delete_range(cf, key(n * 3), key(n * 3 + 2))
                    .put(cf, key(1_999 - n % 2_000), b"interleaved")
                    .put(cf, format!("key/{n:06}/x"), b"inserted");
            }
            db.write(batch).expect("interleaved write");
        }
        writer.join().expect("writer thread");
    });

    assert_ne!(dump(&db), expected, "the writes did happen");
    let target_dir = tempfile::tempdir().expect("tempdir");
    let target = open(&target_dir).state_db(1);
    let stats = target.import_snapshot(bytes.as_slice()).expect("import");
    assert_eq!(stats.records, expected.len() as u64);
    assert_eq!(dump(&target), expected);
}

// ---------------------------------------------------------------------------------------------
// Opening
// ---------------------------------------------------------------------------------------------

#[test]
fn open_checks_format_and_tolerates_unknown_column_families() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open(&dir));

    // A newer version added a column family: still opens.
    {
        let mut opts = rocksdb::Options::default();
        opts.create_missing_column_families(true);
        let mut names = rocksdb::DB::list_cf(&opts, dir.path()).expect("list");
        names.push("from_the_future".to_owned());
        let db = rocksdb::DB::open_cf(&opts, dir.path(), &names).expect("raw open");
        drop(db);
    }
    let store = open(&dir);
    let mut batch = StateBatch::new();
    batch.put(StateCf::SmMeta, b"k", b"v");
    store.state_db(1).write(batch).expect("write");
    drop(store);

    // A different on-disk format version is refused.
    {
        let opts = rocksdb::Options::default();
        let names = rocksdb::DB::list_cf(&opts, dir.path()).expect("list");
        let db = rocksdb::DB::open_cf(&opts, dir.path(), &names).expect("raw open");
        db.put(b"raftmq_store_format", 3u32.to_be_bytes())
            .expect("put");
    }
    match Store::open(dir.path()) {
        Err(StoreError::IncompatibleFormat {
            found, supported, ..
        }) => {
            assert_eq!((found, supported), (3, 2));
        }
        other => panic!("expected IncompatibleFormat, got {other:?}"),
    }

    // Errors convert into openraft's storage error.
    let err = StoreError::MissingColumnFamily("x").read_state_machine::<u64>();
    assert!(err.to_string().contains("column family"), "{err}");
}
