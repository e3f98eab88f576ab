//! Several shards (Raft groups) in one store (RFC 0002, section 6.5): the logs and states of
//! shards sharing the column families never see each other, the WAL syncer makes every shard's
//! log writes durable and fails them all when a sync fails, a shard's snapshot replaces that
//! shard only, and `Store::open` refuses a data dir written in format 1 (one group, no shard
//! prefixes) untouched: it is migrated first (`super::migrate`).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicU32;

use super::*;

// ---------------------------------------------------------------------------------------------
// openraft's storage suite on shards of one store
// ---------------------------------------------------------------------------------------------

/// Builds every store of the suite as a new shard of one shared [`Store`]: counting up from 1
/// or down from `u32::MAX` (the last shard, whose key range is unbounded above). Each case thus
/// runs next to the shards of the cases before it, full of entries, votes and state.
struct ShardBuilder {
    store: Store,
    next: Arc<AtomicU32>,
    up: bool,
}

impl StoreBuilder<TC, raftmq_store::LogStore<TC>, TestSm, ()> for ShardBuilder {
    async fn build(&self) -> Result<((), raftmq_store::LogStore<TC>, TestSm), StorageError<u64>> {
        let shard = if self.up {
            self.next.fetch_add(1, Ordering::Relaxed)
        } else {
            self.next.fetch_sub(1, Ordering::Relaxed)
        };
        Ok((
            (),
            self.store.log_store::<TC>(shard),
            TestSm::new(self.store.state_db(shard)),
        ))
    }
}

/// The whole suite twice at the same time on one store, on two threads: every case on its own
/// shard while the other thread's cases write to theirs (one WAL, one syncer).
#[test]
fn openraft_storage_suite_on_two_interleaved_shards_of_one_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let up = ShardBuilder {
        store: store.clone(),
        next: Arc::new(AtomicU32::new(1)),
        up: true,
    };
    let down = ShardBuilder {
        store: store.clone(),
        next: Arc::new(AtomicU32::new(u32::MAX)),
        up: false,
    };
    std::thread::scope(|scope| {
        let low = scope.spawn(|| Suite::test_all(up).map_err(|e| e.to_string()));
        let high = scope.spawn(|| Suite::test_all(down).map_err(|e| e.to_string()));
        low.join()
            .expect("suite thread")
            .expect("suite on shards 1, 2, ...");
        high.join()
            .expect("suite thread")
            .expect("suite on shards u32::MAX, u32::MAX - 1, ...");
    });
}

// ---------------------------------------------------------------------------------------------
// Isolation
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_logs_of_two_shards_do_not_see_each_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let all = (Bound::Unbounded, Bound::Unbounded);
    // The metadata group, two neighbours and the last possible shard.
    let mut logs: Vec<_> = [0, 1, 2, u32::MAX]
        .into_iter()
        .map(|shard| store.log_store::<TC>(shard))
        .collect();
    for (n, log) in (1u64..).zip(logs.iter_mut()) {
        log.save_vote(&Vote::new(n, n)).await.expect("vote");
        log.blocking_append((1..=5 * n).map(|i| blank(n, i)))
            .await
            .expect("append");
        log.save_committed(Some(log_id(n, 0, n)))
            .await
            .expect("committed");
    }
    // Shard 1 (the second log) truncates and purges; nobody else is affected.
    logs[1].truncate(log_id(2, 0, 8)).await.expect("truncate");
    logs[1].purge(log_id(2, 0, 3)).await.expect("purge");

    drop(logs);
    drop(store);
    let store = open(&dir);
    for (n, shard) in (1u64..).zip([0, 1, 2, u32::MAX]) {
        let mut log = store.log_store::<TC>(shard);
        assert_eq!(log.shard(), shard);
        assert_eq!(log.read_vote().await.expect("vote"), Some(Vote::new(n, n)));
        assert_eq!(
            log.read_committed().await.expect("committed"),
            Some(log_id(n, 0, n))
        );
        let state = log.get_log_state().await.expect("state");
        let entries = ids(&mut log, all).await;
        if shard == 1 {
            assert_eq!(state.last_purged_log_id, Some(log_id(2, 0, 3)));
            assert_eq!(state.last_log_id, Some(log_id(2, 0, 7)));
            assert_eq!(entries, (4..=7).map(|i| (2, i)).collect::<Vec<_>>());
        } else {
            assert_eq!(state.last_purged_log_id, None, "shard {shard}");
            assert_eq!(
                state.last_log_id,
                Some(log_id(n, 0, 5 * n)),
                "shard {shard}"
            );
            assert_eq!(
                entries,
                (1..=5 * n).map(|i| (n, i)).collect::<Vec<_>>(),
                "shard {shard}"
            );
        }
    }
    // A shard never written to is empty.
    let mut fresh = store.log_store::<TC>(3);
    assert_eq!(fresh.read_vote().await.expect("vote"), None);
    assert_eq!(
        fresh.get_log_state().await.expect("state"),
        LogState::default()
    );
    assert!(ids(&mut fresh, all).await.is_empty());
}

#[test]
fn the_states_of_two_shards_do_not_see_each_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let shards = [0, 1, 2, u32::MAX];
    let dbs: Vec<StateDb> = shards.iter().map(|&s| store.state_db(s)).collect();
    let mut dumps = Vec::new();
    for (db, shard) in dbs.iter().zip(shards) {
        assert_eq!(db.shard(), shard);
        fill(db, &format!("shard-{shard}"));
        dumps.push(dump(db));
    }
    // The same keys, each shard with its own values.
    for (db, shard) in dbs.iter().zip(shards) {
        assert_eq!(
            db.get(StateCf::Sessions, b"").expect("get"),
            Some(format!("shard-{shard}-empty-key").into_bytes())
        );
        let (key, _) = db
            .last_with_prefix(StateCf::Retained, b"")
            .expect("last")
            .expect("a key");
        assert_eq!(key, vec![0xFF; 3], "the greatest key of shard {shard}");
        assert_eq!(
            db.scan_range(StateCf::Messages, b"item/", None).count(),
            301,
            "300 items and `big`, nothing of another shard"
        );
    }

    // Shards 1 and u32::MAX (whose range is unbounded above) clear everything, shard 2 one
    // prefix; shard 0 is untouched.
    for i in [1, 3] {
        let mut batch = StateBatch::new();
        for cf in StateCf::ALL {
            batch.clear(cf);
        }
        // Put after a clear in the same batch: kept.
        batch.put(StateCf::SmMeta, b"after", b"clear");
        dbs[i].write(batch).expect("clear");
        assert_eq!(
            dump(&dbs[i]),
            BTreeMap::from([((StateCf::SmMeta, b"after".to_vec()), b"clear".to_vec())])
        );
    }
    let mut batch = StateBatch::new();
    batch.delete_prefix(StateCf::Subscriptions, b"item/");
    dbs[2].write(batch).expect("delete prefix");
    let mut expected = dumps[2].clone();
    expected.retain(|(cf, key), _| !(*cf == StateCf::Subscriptions && key.starts_with(b"item/")));
    assert_eq!(dump(&dbs[2]), expected);
    assert_eq!(dump(&dbs[0]), dumps[0], "shard 0 untouched");
    assert_eq!(
        dump(&store.state_db(7)),
        Dump::new(),
        "an unused shard is empty"
    );
}

// ---------------------------------------------------------------------------------------------
// Snapshots per shard
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_snapshot_of_shard_1_installs_without_touching_shard_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let (one, two) = (store.state_db(1), store.state_db(2));
    fill(&one, "one-old");
    fill(&two, "two");
    let mut log_two = store.log_store::<TC>(2);
    log_two
        .blocking_append((1..=3).map(|i| blank(1, i)))
        .await
        .expect("append");
    let two_before = dump(&two);

    // The stream is the shard's state without the prefix: the same content in shard 1 of
    // another store, or in any other shard, streams the same bytes.
    let source_dir = tempfile::tempdir().expect("tempdir");
    let source_store = open(&source_dir);
    let source = source_store.state_db(1);
    let written = fill(&source, "new");
    let bytes = source.export_snapshot_to_vec().expect("export");
    let elsewhere = source_store.state_db(9);
    elsewhere
        .import_snapshot(bytes.as_slice())
        .expect("import into shard 9");
    assert_eq!(
        elsewhere.export_snapshot_to_vec().expect("export"),
        bytes,
        "a snapshot does not depend on the shard it was taken from"
    );
    assert_eq!(dump(&source), dump(&elsewhere));

    let stats = one.import_snapshot(bytes.as_slice()).expect("import");
    assert_eq!(stats.records, written as u64);
    assert_eq!(dump(&one), dump(&source), "shard 1 is the snapshot's state");
    assert_eq!(dump(&two), two_before, "shard 2's state untouched");
    assert_eq!(
        ids(&mut log_two, (Bound::Unbounded, Bound::Unbounded)).await,
        [(1, 1), (1, 2), (1, 3)],
        "shard 2's log untouched"
    );
    // A snapshot of shard 2 holds shard 2's keys only.
    let two_bytes = two.export_snapshot_to_vec().expect("export");
    let check_dir = tempfile::tempdir().expect("tempdir");
    let check = open(&check_dir).state_db(1);
    let stats = check.import_snapshot(two_bytes.as_slice()).expect("import");
    assert_eq!(stats.records, two_before.len() as u64);
    assert_eq!(dump(&check), two_before);

    // An empty snapshot empties shard 1 only.
    let empty_dir = tempfile::tempdir().expect("tempdir");
    let empty = open(&empty_dir)
        .state_db(1)
        .export_snapshot_to_vec()
        .expect("export");
    one.import_snapshot(empty.as_slice()).expect("import");
    assert!(dump(&one).is_empty());
    assert_eq!(dump(&two), two_before);
}

// ---------------------------------------------------------------------------------------------
// The WAL syncer
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_failed_wal_sync_fails_every_log_write_waiting_for_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let mut one = store.log_store::<TC>(1);
    let mut two = store.log_store::<TC>(2);
    let mut two_meta = two.clone();
    one.blocking_append([blank(1, 1)])
        .await
        .expect("a healthy sync");

    store.inject_sync_faults(true);
    let vote = Vote::new(4, 2);
    let (append_one, append_two, vote) = tokio::join!(
        one.blocking_append([blank(1, 2)]),
        two.blocking_append([blank(1, 1)]),
        two_meta.save_vote(&vote),
    );
    for (what, result) in [
        ("append to shard 1", append_one),
        ("append to shard 2", append_two),
        ("vote of shard 2", vote),
        ("truncation", one.truncate(log_id(1, 0, 2)).await),
        ("purge", one.purge(log_id(1, 0, 1)).await),
    ] {
        let err = result.expect_err(what);
        assert!(
            err.to_string().contains("injected WAL sync fault"),
            "{what}: {err}"
        );
    }

    // The disk is healthy again: log writes are durable again.
    store.inject_sync_faults(false);
    two.blocking_append([blank(2, 2)])
        .await
        .expect("append after the fault");
    two.save_vote(&Vote::new(5, 2)).await.expect("vote");
    assert_eq!(two.read_vote().await.expect("vote"), Some(Vote::new(5, 2)));
}

/// Many shards appending at once through the one syncer (their appends share its syncs), and
/// every append is durable: all of it is there after the store is reopened.
#[test]
fn appends_of_many_shards_at_once_are_all_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_time()
        .build()
        .expect("runtime");
    {
        let store = open(&dir);
        runtime.block_on(async {
            let tasks: Vec<_> = (1..=16u32)
                .map(|shard| {
                    let mut log = store.log_store::<TC>(shard);
                    tokio::spawn(async move {
                        for i in 1..=20 {
                            log.blocking_append([blank(u64::from(shard), i)])
                                .await
                                .expect("append");
                        }
                    })
                })
                .collect();
            for task in tasks {
                tokio::time::timeout(std::time::Duration::from_secs(60), task)
                    .await
                    .expect("appends finish in time")
                    .expect("append task");
            }
        });
    }
    let store = open(&dir);
    runtime.block_on(async {
        for shard in 1..=16u32 {
            let mut log = store.log_store::<TC>(shard);
            let term = u64::from(shard);
            assert_eq!(
                ids(&mut log, (Bound::Unbounded, Bound::Unbounded)).await,
                (1..=20).map(|i| (term, i)).collect::<Vec<_>>()
            );
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Format 1
// ---------------------------------------------------------------------------------------------

/// Writes a store as the single-group release did (format 1): the same column families, the
/// format marker 1, and keys without a shard prefix (log entries under their bare 8-byte
/// index, the vote under `vote`, state keys as the state machine made them). Left in the WAL,
/// not flushed, as after a crash.
pub(super) fn write_format_1_store(path: &Path) {
    let mut opts = rocksdb::Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    let names = [
        "default",
        "raft_log",
        "raft_meta",
        "sessions",
        "subscriptions",
        "messages",
        "session_messages",
        "retained",
        "sm_meta",
    ];
    let db = rocksdb::DB::open_cf(&opts, path, names).expect("raw open");
    let cf = |name| db.cf_handle(name).expect("column family");
    db.put(b"raftmq_store_format", 1u32.to_be_bytes())
        .expect("put");
    for i in 1..=3u64 {
        let entry = postcard::to_stdvec(&blank(1, i)).expect("encode");
        db.put_cf(cf("raft_log"), i.to_be_bytes(), entry)
            .expect("put");
    }
    let vote = postcard::to_stdvec(&Vote::<u64>::new(1, 1)).expect("encode");
    db.put_cf(cf("raft_meta"), b"vote", vote).expect("put");
    db.put_cf(cf("sessions"), b"client-1", b"record")
        .expect("put");
    db.flush_wal(true).expect("sync");
}

/// Every file of `dir` but RocksDB's info log (`LOG`, `LOG.old.*`), with its content.
pub(super) fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|entry| entry.expect("dir entry"))
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with("LOG"))
        .map(|entry| {
            (
                entry.file_name().to_string_lossy().into_owned(),
                std::fs::read(entry.path()).expect("read file"),
            )
        })
        .collect()
}

#[test]
fn a_format_1_store_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    write_format_1_store(dir.path());
    let before = files(dir.path());
    assert!(
        before.keys().any(|name| name.ends_with(".log")),
        "{before:?}"
    );

    for _ in 0..2 {
        match Store::open(dir.path()) {
            Err(StoreError::IncompatibleFormat {
                path,
                found,
                supported,
            }) => {
                assert_eq!((found, supported), (1, 2));
                assert_eq!(path, dir.path());
            }
            other => panic!("expected IncompatibleFormat, got {other:?}"),
        }
        assert_eq!(
            files(dir.path()),
            before,
            "nothing written to the refused store"
        );
    }

    // Still the single-group release's store, as it left it.
    let opts = rocksdb::Options::default();
    let names = rocksdb::DB::list_cf(&opts, dir.path()).expect("list");
    let db = rocksdb::DB::open_cf_for_read_only(&opts, dir.path(), &names, false).expect("open");
    assert_eq!(
        db.get(b"raftmq_store_format").expect("get"),
        Some(1u32.to_be_bytes().to_vec())
    );
    let log = db.cf_handle("raft_log").expect("raft_log");
    assert!(db.get_cf(log, 2u64.to_be_bytes()).expect("get").is_some());
}

#[test]
fn a_new_store_is_stamped_with_format_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    drop(open(&dir));
    let opts = rocksdb::Options::default();
    let names = rocksdb::DB::list_cf(&opts, dir.path()).expect("list");
    let db = rocksdb::DB::open_cf_for_read_only(&opts, dir.path(), &names, false).expect("open");
    assert_eq!(
        db.get(b"raftmq_store_format").expect("get"),
        Some(2u32.to_be_bytes().to_vec())
    );
    drop(db);
    drop(open(&dir));
}

/// The bound on a node's message ids survives the store being closed and opened again (a
/// restarted process starts above every id the previous one could have given out), and a
/// store that never reserved any says 0.
#[test]
fn reserved_message_ids_survive_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(&dir);
        assert_eq!(store.message_ids_reserved().expect("read"), 0);
        store
            .reserve_message_ids((3 << 48) + 1_048_577)
            .expect("reserve");
    }
    let store = open(&dir);
    assert_eq!(
        store.message_ids_reserved().expect("read"),
        (3 << 48) + 1_048_577
    );
}
