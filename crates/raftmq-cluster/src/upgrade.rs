//! The first start of a sharded release on a data dir of a single-group release: its store
//! (format 1) is migrated to format 2, the one data group's keys going to shard
//! [`DATA_SHARD`] ([`migrate_store`], called by [`RaftNode::start`](crate::node::RaftNode::start)).
//!
//! Besides the keys (the store's business), one thing format 2 changed is inside the values:
//! a log entry's `raftmq.state.v1.Batch` names its shard, written as 0 (the field left out) by
//! the single-group releases and as [`SHARD_ID`] since, and the state machine skips a batch of
//! another shard. [`rewrite_single_group_entry`] sets it in every entry that has a batch, so an
//! entry of the old log that is applied after the upgrade (committed but not yet applied, or
//! replicated to a follower that lags) still takes effect. Every other value (vote, committed
//! and purged log ids, the state column families, blank and membership entries) is copied byte
//! for byte: none embeds a shard id or a stored key with its prefix.

use std::path::Path;
use std::time::{Duration, Instant};

use openraft::EntryPayload;
use prost::Message as _;
use raftmq_store::{Migration, MigrationEvent, MigrationOutcome, Store, StoreConfig, StoreError};
use tracing::info;

use crate::convert::{SHARD_ID, decode_batch};
use crate::types::{DATA_SHARD, Entry, Request};

/// How often a long migration logs its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Migrates the store at `path` (`data_dir/raft`) from format 1 if it is in format 1 (or a
/// migration of it was interrupted), logging what it does; a no-op otherwise. Blocking: runs
/// the whole copy on the calling thread.
pub fn migrate_store(path: &Path) -> Result<MigrationOutcome, StoreError> {
    migrate_store_with(path, Migration::new(DATA_SHARD.get()))
}

/// [`migrate_store`] with `migration`'s chunk size and test hooks (its shard, rewrite and event
/// callback are set here).
pub fn migrate_store_with(
    path: &Path,
    migration: Migration<'_>,
) -> Result<MigrationOutcome, StoreError> {
    let mut last_log = Instant::now();
    let migration = migration
        .rewrite_log_entries(rewrite_single_group_entry)
        .on_event(|event| match event {
            MigrationEvent::Started {
                path,
                staging,
                estimated_keys,
                estimated_bytes,
                resumed_keys,
            } => {
                info!(
                    staging = %staging.display(),
                    resumed_keys,
                    "migrating data dir {} from format 1 to format 2 (about {estimated_keys} \
                     keys, {} KiB){}",
                    path.display(),
                    estimated_bytes / 1024,
                    if *resumed_keys > 0 {
                        ", resuming an interrupted migration"
                    } else {
                        ""
                    }
                );
                last_log = Instant::now();
            }
            MigrationEvent::Progress { keys, bytes, cf }
                if last_log.elapsed() >= PROGRESS_EVERY =>
            {
                info!(keys, bytes, cf, "migrating the store: {keys} keys copied");
                last_log = Instant::now();
            }
            _ => {}
        });
    let outcome = Store::migrate_format_1(path, &StoreConfig::default(), migration)?;
    if let MigrationOutcome::Migrated(report) = &outcome {
        info!(
            keys = report.keys,
            bytes = report.bytes,
            log_entries_rewritten = report.log_entries_rewritten,
            chunks = report.chunks,
            resumed = report.resumed,
            duration_ms = report.duration.as_millis() as u64,
            backup = %report.backup.display(),
            "migrated data dir {} to format 2: {} keys in {:?}; the format-1 store was kept in {} \
             (the previous release can run on it; remove it once this release runs well)",
            path.display(),
            report.keys,
            report.duration,
            report.backup.display()
        );
    }
    Ok(outcome)
}

/// The format-2 value of the format-1 log entry `raw` at `index` (`None`: the same).
///
/// A normal entry whose batch names shard 0 (every batch a single-group release wrote) gets
/// `shard_id = `[`SHARD_ID`] appended to its batch: a protobuf field may come in any order and
/// the last occurrence of a scalar wins, so the rest of the batch stays byte for byte what it
/// was. A batch that cannot be decoded, or that names another shard than 0 or [`SHARD_ID`],
/// stays as it is: both releases skip it. A batch that already names [`SHARD_ID`] cannot come
/// from a single-group release (it skipped it; this one would apply it): refused.
pub fn rewrite_single_group_entry(index: u64, raw: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let entry: Entry =
        postcard::from_bytes(raw).map_err(|e| format!("cannot decode the entry: {e}"))?;
    if entry.log_id.index != index {
        return Err(format!(
            "the entry under index {index} has log id {}",
            entry.log_id
        ));
    }
    let EntryPayload::Normal(request) = &entry.payload else {
        return Ok(None);
    };
    let Ok(batch) = decode_batch(&request.batch) else {
        return Ok(None);
    };
    match batch.shard_id {
        0 => {}
        SHARD_ID => {
            return Err(format!(
                "its batch already names shard {SHARD_ID}: not written by a single-group release"
            ));
        }
        _ => return Ok(None),
    }
    let mut bytes = request.batch.clone();
    // Only `shard_id` (every other field at its default, left out).
    let field = raftmq_proto::state::Batch {
        shard_id: SHARD_ID,
        ..Default::default()
    };
    bytes.extend_from_slice(&field.encode_to_vec());
    match decode_batch(&bytes) {
        Ok(check) if check.shard_id == SHARD_ID && check.changes == batch.changes => {}
        _ => return Err("the rewritten batch does not decode to the same changes".to_owned()),
    }
    let entry = Entry {
        log_id: entry.log_id,
        payload: EntryPayload::Normal(Request { batch: bytes }),
    };
    postcard::to_stdvec(&entry)
        .map(Some)
        .map_err(|e| format!("cannot encode the entry: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::convert::{WallClock, encode_batch};
    use openraft::testing::log_id;
    use raftmq_core::durability::StateChange;

    fn entry(index: u64, payload: EntryPayload<crate::types::TypeConfig>) -> Vec<u8> {
        postcard::to_stdvec(&Entry {
            log_id: log_id(3, 1, index),
            payload,
        })
        .expect("encode")
    }

    fn single_group_batch() -> Vec<u8> {
        let mut batch = decode_batch(&encode_batch(
            &[StateChange::RetainedCleared {
                topic: "a/b".into(),
            }],
            &WallClock::now(),
        ))
        .expect("decode");
        batch.shard_id = 0;
        batch.origin_node = 2;
        batch.encode_to_vec()
    }

    #[test]
    fn a_single_group_batch_gets_the_data_shard_and_keeps_its_bytes() {
        let old = single_group_batch();
        let raw = entry(5, EntryPayload::Normal(Request { batch: old.clone() }));
        let new = rewrite_single_group_entry(5, &raw)
            .expect("rewrite")
            .expect("changed");
        let new: Entry = postcard::from_bytes(&new).expect("decode");
        assert_eq!(new.log_id, log_id(3, 1, 5));
        let EntryPayload::Normal(request) = new.payload else {
            panic!("not a normal entry");
        };
        assert!(request.batch.starts_with(&old));
        let (batch, before) = (
            decode_batch(&request.batch).expect("batch"),
            decode_batch(&old).expect("batch"),
        );
        assert_eq!(batch.shard_id, SHARD_ID);
        assert_eq!(
            (batch.changes, batch.origin_node, batch.fences),
            (before.changes, before.origin_node, before.fences)
        );
    }

    #[test]
    fn other_entries_stay_and_impossible_ones_are_refused() {
        let blank = entry(1, EntryPayload::Blank);
        assert_eq!(rewrite_single_group_entry(1, &blank), Ok(None));
        let garbage = entry(
            2,
            EntryPayload::Normal(Request {
                batch: vec![0xFF, 0xFF, 0xFF],
            }),
        );
        assert_eq!(rewrite_single_group_entry(2, &garbage), Ok(None));
        let mut other = decode_batch(&single_group_batch()).expect("decode");
        other.shard_id = 7;
        let other = entry(
            3,
            EntryPayload::Normal(Request {
                batch: other.encode_to_vec(),
            }),
        );
        assert_eq!(rewrite_single_group_entry(3, &other), Ok(None));

        let sharded = entry(
            4,
            EntryPayload::Normal(Request {
                batch: encode_batch(&[], &WallClock::now()),
            }),
        );
        assert!(rewrite_single_group_entry(4, &sharded).is_err());
        assert!(
            rewrite_single_group_entry(9, &blank).is_err(),
            "index mismatch"
        );
        assert!(rewrite_single_group_entry(1, b"\xFF\xFF").is_err());
        assert!(rewrite_single_group_entry(1, b"").is_err());
    }
}
