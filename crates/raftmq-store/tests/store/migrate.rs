//! The migration of a format-1 store (single-group releases, keys without a shard prefix) to
//! format 2 ([`Store::migrate_format_1`]): on the store `raftmq serve` of the last single-group
//! commit wrote (`tests/fixtures/format-1`, see the README there) and on synthetic ones; every
//! key lands under shard 1 with its value, an interrupted migration resumes to the same result,
//! a crash between the directory renames is finished, and what cannot be migrated fails closed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use raftmq_store::{Migration, MigrationEvent, MigrationOutcome, MigrationReport};

use super::*;

/// The raft type config of the broker as far as the stored bytes go (`raftmq_cluster::types`:
/// `Request { batch }`, `ClusterNode { cluster_addr, mqtt_addr }`), to read the fixture's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixtureReq {
    batch: Vec<u8>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FixtureNode {
    cluster_addr: String,
    mqtt_addr: String,
}

openraft::declare_raft_types!(
    /// The broker's type config, for reading the fixture's log entries.
    pub FixtureTc:
        D = FixtureReq,
        R = (),
        NodeId = u64,
        Node = FixtureNode,
        Entry = Entry<FixtureTc>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

type RawDump = BTreeMap<String, Vec<(Vec<u8>, Vec<u8>)>>;

/// Every key and value of every column family of the store at `path`, read as raw RocksDB.
fn raw_dump(path: &Path) -> RawDump {
    let opts = rocksdb::Options::default();
    let names = rocksdb::DB::list_cf(&opts, path).expect("list");
    let db = rocksdb::DB::open_cf_for_read_only(&opts, path, &names, false).expect("open");
    names
        .iter()
        .map(|name| {
            let cf = db.cf_handle(name).expect("cf");
            let pairs = db
                .iterator_cf(cf, rocksdb::IteratorMode::Start)
                .map(|item| {
                    let (k, v) = item.expect("iterate");
                    (k.into_vec(), v.into_vec())
                })
                .collect();
            (name.clone(), pairs)
        })
        .collect()
}

fn marker(path: &Path) -> Option<Vec<u8>> {
    let dump = raw_dump(path);
    dump["default"]
        .iter()
        .find(|(k, _)| k == b"raftmq_store_format")
        .map(|(_, v)| v.clone())
}

/// What a format-1 dump becomes in format 2, shard 1, values unchanged.
fn expected_format_2(old: &RawDump) -> RawDump {
    old.iter()
        .map(|(name, pairs)| {
            let pairs = if name == "default" {
                vec![(b"raftmq_store_format".to_vec(), 2u32.to_be_bytes().to_vec())]
            } else {
                let mut pairs: Vec<_> = pairs
                    .iter()
                    .map(|(k, v)| {
                        let mut key = 1u32.to_be_bytes().to_vec();
                        key.extend_from_slice(k);
                        (key, v.clone())
                    })
                    .collect();
                pairs.sort();
                pairs
            };
            (name.clone(), pairs)
        })
        .collect()
}

/// A copy of the committed fixture in a new temp dir, at `<tmp>/raft`.
fn fixture_copy() -> (TempDir, PathBuf) {
    let fixture = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/format-1"
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("raft");
    std::fs::create_dir(&path).expect("mkdir");
    for (name, content) in shards::files(fixture) {
        std::fs::write(path.join(name), content).expect("copy fixture");
    }
    (dir, path)
}

fn migrated(outcome: Result<MigrationOutcome, StoreError>) -> MigrationReport {
    match outcome {
        Ok(MigrationOutcome::Migrated(report)) => report,
        other => panic!("expected a migration, got {other:?}"),
    }
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().expect("name").to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

#[tokio::test]
async fn the_single_group_releases_store_migrates_to_shard_1() {
    let (_dir, path) = fixture_copy();
    let old = raw_dump(&path);
    assert_eq!(marker(&path), Some(1u32.to_be_bytes().to_vec()));
    let value = |cf: &str, key: &[u8]| -> Vec<u8> {
        old[cf]
            .iter()
            .find(|(k, _)| k == key)
            .unwrap_or_else(|| panic!("{cf} {key:?} in the fixture"))
            .1
            .clone()
    };
    // What the README says the fixture holds.
    let log_keys: Vec<Vec<u8>> = old["raft_log"].iter().map(|(k, _)| k.clone()).collect();
    assert_eq!(
        log_keys,
        (0..=7u64)
            .map(|i| i.to_be_bytes().to_vec())
            .collect::<Vec<_>>()
    );
    let session = value("sessions", b"fixture-sub");
    let retained = value("retained", b"fixture/retained");
    let vote = value("raft_meta", b"vote");
    assert!(
        retained.windows(16).any(|w| w == b"kept by format 1"),
        "{retained:?}"
    );
    let queued = |dump: &RawDump| {
        dump["messages"]
            .iter()
            .filter(|(_, v)| v.windows(22).any(|w| w == b"queued for fixture-sub"))
            .count()
    };
    assert_eq!(queued(&old), 1);
    assert!(
        old["session_messages"]
            .iter()
            .any(|(k, _)| k.starts_with(b"fixture-sub")),
        "{:?}",
        old["session_messages"]
    );

    let mut events = Vec::new();
    let report = migrated(Store::migrate_format_1(
        &path,
        &Default::default(),
        Migration::new(1).on_event(|e| events.push(e.clone())),
    ));
    let total: usize = old
        .iter()
        .filter(|(name, _)| *name != "default")
        .map(|(_, pairs)| pairs.len())
        .sum();
    assert_eq!(report.keys, total as u64);
    assert!(!report.resumed);
    assert_eq!(report.log_entries_rewritten, 0);
    assert_eq!(report.backup, sibling(&path, ".format-1"));
    assert!(
        matches!(events.first(), Some(MigrationEvent::Started { resumed_keys: 0, estimated_keys, .. }) if *estimated_keys > 0),
        "{events:?}"
    );
    assert!(
        matches!(events.last(), Some(MigrationEvent::Progress { keys, .. }) if *keys == total as u64)
    );

    // Every key under shard 1, every value as it was; the format-1 store kept next to it.
    assert_eq!(raw_dump(&path), expected_format_2(&old));
    assert_eq!(raw_dump(&report.backup), old);
    assert!(!sibling(&path, ".migrating").exists());
    assert!(matches!(
        Store::migrate_format_1(&path, &Default::default(), Migration::new(1)),
        Ok(MigrationOutcome::NotNeeded)
    ));

    // Readable through the shard-1 handles.
    let store = Store::open(&path).expect("open the migrated store");
    let mut log = store.log_store::<FixtureTc>(1);
    let state = log.get_log_state().await.expect("log state");
    assert_eq!(state.last_log_id.map(|id| id.index), Some(7));
    assert_eq!(state.last_purged_log_id, None);
    let entries = log.try_get_log_entries(0..8).await.expect("entries");
    assert_eq!(
        entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
        (0..=7).collect::<Vec<_>>()
    );
    assert_eq!(
        log.read_vote().await.expect("vote"),
        Some(postcard::from_bytes(&vote).expect("format-1 vote"))
    );
    let db = store.state_db(1);
    assert_eq!(
        db.get(StateCf::Sessions, b"fixture-sub").expect("get"),
        Some(session)
    );
    assert_eq!(
        db.get(StateCf::Retained, b"fixture/retained").expect("get"),
        Some(retained)
    );
    assert_eq!(
        db.scan_prefix(StateCf::SessionMessages, b"fixture-sub")
            .count(),
        old["session_messages"]
            .iter()
            .filter(|(k, _)| k.starts_with(b"fixture-sub"))
            .count()
    );
    let messages: Vec<_> = db
        .scan_prefix(StateCf::Messages, b"")
        .map(|item| item.expect("scan"))
        .collect();
    assert_eq!(messages, old["messages"]);
    // Nothing in shard 0 or 2.
    for other in [0, 2] {
        assert_eq!(dump(&store.state_db(other)).len(), 0);
        let mut log = store.log_store::<FixtureTc>(other);
        assert_eq!(log.get_log_state().await.expect("state").last_log_id, None);
    }
}

/// Migrates a copy of the fixture, failing after `fail_after` chunks (of one key each) on the
/// first tries: each failure leaves the format-1 store as it was, the next call resumes.
#[test]
fn an_interrupted_migration_resumes_to_the_same_store() {
    let (_straight_dir, straight) = fixture_copy();
    let expected = expected_format_2(&raw_dump(&straight));
    migrated(Store::migrate_format_1(
        &straight,
        &Default::default(),
        Migration::new(1),
    ));
    assert_eq!(raw_dump(&straight), expected);

    let (_dir, path) = fixture_copy();
    let old = raw_dump(&path);
    let mut resumed_from = Vec::new();
    for fail_after in [1, 3] {
        let err = Store::migrate_format_1(
            &path,
            &Default::default(),
            Migration::new(1)
                .chunk_bytes(1)
                .fail_after_chunks(fail_after)
                .on_event(|e| {
                    if let MigrationEvent::Started { resumed_keys, .. } = e {
                        resumed_from.push(*resumed_keys);
                    }
                }),
        )
        .expect_err("injected failure");
        match &err {
            StoreError::Migration {
                path: failed,
                step,
                source,
            } => {
                assert_eq!(failed, &path);
                assert_eq!(step, "copying column family `raft_log`");
                assert!(
                    matches!(**source, StoreError::InjectedFault { .. }),
                    "{source:?}"
                );
            }
            other => panic!("expected a migration error, got {other:?}"),
        }
        assert!(err.to_string().contains("raft_log"), "{err}");
        // The store is still format 1, refused by `open`, the copy waits next to it.
        assert_eq!(raw_dump(&path), old);
        assert!(sibling(&path, ".migrating").exists());
        assert!(!sibling(&path, ".format-1").exists());
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::IncompatibleFormat { found: 1, .. })
        ));
    }
    assert_eq!(resumed_from, [0, 1]);

    let report = migrated(Store::migrate_format_1(
        &path,
        &Default::default(),
        Migration::new(1).chunk_bytes(1),
    ));
    assert!(report.resumed);
    let total: usize = old
        .iter()
        .filter(|(name, _)| *name != "default")
        .map(|(_, pairs)| pairs.len())
        .sum();
    assert_eq!(report.keys, total as u64);
    // 1 chunk of one key by the first try, 3 by the second.
    assert_eq!(report.chunks, total as u64 - 4);
    assert_eq!(raw_dump(&path), expected);
    assert_eq!(raw_dump(&report.backup), old);
}

/// The two renames that end a migration, interrupted: before the first one (the copy is
/// complete and stamped) and between them (no store at the path).
#[test]
fn a_migration_stopped_around_its_renames_is_finished_by_the_next_call() {
    let (_dir, path) = fixture_copy();
    let old = raw_dump(&path);
    let expected = expected_format_2(&old);
    migrated(Store::migrate_format_1(
        &path,
        &Default::default(),
        Migration::new(1),
    ));
    let staging = sibling(&path, ".migrating");
    let backup = sibling(&path, ".format-1");

    // Between the renames: the format-1 store moved away, the copy not yet in place.
    std::fs::rename(&path, &staging).expect("rename");
    match Store::open(&path) {
        Err(StoreError::MigrationBlocked { path: blocked, .. }) => assert_eq!(blocked, path),
        other => panic!("expected MigrationBlocked, got {other:?}"),
    }
    assert!(!path.exists(), "open created nothing");
    let report = migrated(Store::migrate_format_1(
        &path,
        &Default::default(),
        Migration::new(1),
    ));
    assert!(report.resumed);
    assert_eq!(raw_dump(&path), expected);
    assert_eq!(raw_dump(&backup), old);

    // Before the first rename: the copy stamped format 2, the format-1 store still in place.
    std::fs::rename(&path, &staging).expect("rename");
    std::fs::rename(&backup, &path).expect("rename");
    let report = migrated(Store::migrate_format_1(
        &path,
        &Default::default(),
        Migration::new(1),
    ));
    assert!(report.resumed);
    assert_eq!(report.chunks, 0);
    assert_eq!(raw_dump(&path), expected);
    assert_eq!(raw_dump(&backup), old);
    drop(Store::open(&path).expect("open"));
}

#[test]
fn log_entries_go_through_the_rewrite_and_a_refused_one_fails_closed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("raft");
    shards::write_format_1_store(&path);
    let old = raw_dump(&path);

    let err = Store::migrate_format_1(
        &path,
        &Default::default(),
        Migration::new(1).rewrite_log_entries(|index, _| {
            if index == 3 {
                Err("not this one".to_owned())
            } else {
                Ok(None)
            }
        }),
    )
    .expect_err("refused entry");
    assert!(
        err.to_string().contains("log entry 3: not this one"),
        "{err}"
    );
    assert_eq!(raw_dump(&path), old);

    let report = migrated(Store::migrate_format_1(
        &path,
        &Default::default(),
        Migration::new(1).rewrite_log_entries(|index, raw| {
            Ok((index == 2).then(|| {
                let mut raw = raw.to_vec();
                raw.push(0xAA);
                raw
            }))
        }),
    ));
    assert_eq!(report.log_entries_rewritten, 1);
    let mut expected = expected_format_2(&old);
    for (key, value) in expected.get_mut("raft_log").expect("raft_log") {
        if key[4..] == 2u64.to_be_bytes() {
            value.push(0xAA);
        }
    }
    assert_eq!(raw_dump(&path), expected);
}

#[test]
fn what_cannot_be_migrated_is_refused_untouched() {
    // A format this release does not know.
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("raft");
    {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db = rocksdb::DB::open(&opts, &path).expect("raw open");
        db.put(b"raftmq_store_format", 3u32.to_be_bytes())
            .expect("put");
    }
    let before = shards::files(&path);
    match Store::migrate_format_1(&path, &Default::default(), Migration::new(1)) {
        Err(StoreError::IncompatibleFormat {
            found, supported, ..
        }) => assert_eq!((found, supported), (3, 2)),
        other => panic!("expected IncompatibleFormat, got {other:?}"),
    }
    assert_eq!(shards::files(&path), before);
    assert!(!sibling(&path, ".migrating").exists());

    // A format-1 store whose backup name is taken.
    let (_dir, path) = fixture_copy();
    let before = shards::files(&path);
    std::fs::create_dir(sibling(&path, ".format-1")).expect("mkdir");
    match Store::migrate_format_1(&path, &Default::default(), Migration::new(1)) {
        Err(StoreError::MigrationBlocked { detail, .. }) => {
            assert!(detail.contains("raft.format-1 exists"), "{detail}");
        }
        other => panic!("expected MigrationBlocked, got {other:?}"),
    }
    assert_eq!(shards::files(&path), before);
    assert!(!sibling(&path, ".migrating").exists());

    // Nothing there, or already format 2: nothing to do.
    let empty = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        Store::migrate_format_1(
            empty.path().join("raft"),
            &Default::default(),
            Migration::new(1)
        ),
        Ok(MigrationOutcome::NotNeeded)
    ));
    drop(open(&empty));
    assert!(matches!(
        Store::migrate_format_1(empty.path(), &Default::default(), Migration::new(1)),
        Ok(MigrationOutcome::NotNeeded)
    ));
}
