//! What `raftmq serve` says when its data dir holds a store it cannot run on (RFC 0002, section
//! 10): the node does not start, exits with status 78 (`EX_CONFIG`), and the message names the
//! data dir and the way out.
//!
//! A store written by a single-group release (format 1) is not refused: `RaftNode::start`
//! migrates it to format 2 first (`raftmq_cluster::upgrade`). What remains refused is a store of
//! an unknown (newer) format, untouched, and a migration that failed or cannot run, which fails
//! closed: the format-1 store stays as it was and the next start resumes.

use std::path::Path;

use raftmq_cluster::node::NodeError;
use raftmq_store::StoreError;

/// Exit status of a refused data dir, or of a failed migration (`EX_CONFIG` of sysexits.h: a
/// state the operator must look at, not a crash to restart from).
pub const EXIT_INCOMPATIBLE_DATA_DIR: u8 = 78;

/// The store format of the single-group releases: one Raft group, keys without a shard prefix.
const SINGLE_GROUP_FORMAT: u32 = 1;

const SEE: &str = "See docs/operations.md#upgrading-to-sharded-state";

/// The message for a start that failed with `error`, if it failed because the store in
/// `data_dir` is in a format this release does not read, or its migration failed, or it
/// belongs to a cluster created with another `cluster.shards`.
pub fn refusal(error: &anyhow::Error, data_dir: &Path) -> Option<String> {
    error.chain().find_map(|cause| {
        // A data dir of a cluster created with another shard count: the message names
        // `cluster.shards` and both values.
        if let Some(e @ NodeError::ShardCount { .. }) = cause.downcast_ref::<NodeError>() {
            return Some(e.to_string());
        }
        match cause.downcast_ref::<StoreError>() {
            Some(StoreError::IncompatibleFormat {
                found, supported, ..
            }) => Some(incompatible(data_dir, *found, *supported)),
            Some(StoreError::Migration { step, source, .. }) => {
                Some(migration_failed(data_dir, step, source))
            }
            Some(StoreError::MigrationBlocked { detail, .. }) => Some(format!(
                "data dir {} cannot be migrated from store format 1 to format 2: {detail}\n\
                 Nothing was written to it.\n{SEE}",
                data_dir.display()
            )),
            _ => None,
        }
    })
}

fn incompatible(data_dir: &Path, found: u32, supported: u32) -> String {
    let dir = data_dir.display();
    if found == SINGLE_GROUP_FORMAT {
        // `RaftNode::start` migrates format 1 before it opens the store: only a store opened
        // some other way gets here.
        format!(
            "data dir {dir} was written by a single-group release (store format 1) and was not \
             migrated to format {supported};\n\
             start `raftmq serve` on it to migrate it.\n{SEE}"
        )
    } else {
        format!(
            "data dir {dir} was written in store format {found}, and this release reads only \
             format {supported} (a newer release wrote it?);\n\
             run the release that wrote it, or move {dir} aside to start this node empty.\n{SEE}"
        )
    }
}

fn migration_failed(data_dir: &Path, step: &str, source: &StoreError) -> String {
    let dir = data_dir.display();
    // The store's errors name their cause in their own message.
    let cause = source.to_string();
    format!(
        "data dir {dir}: migrating its store from format 1 (single-group release) to format 2 \
         failed while {step}: {cause}\n\
         Nothing was lost: the format-1 store is as it was (a copy that completed is kept), and \
         the next start resumes the migration from its last synced chunk.\n\
         Fix the cause (disk space: the migration needs as much free space as {dir}/raft \
         takes) and start again, or run the single-group release on it.\n{SEE}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    fn incompatible(found: u32) -> anyhow::Error {
        let store = Err::<(), _>(StoreError::IncompatibleFormat {
            path: "/var/lib/raftmq/raft".into(),
            found,
            supported: 2,
        });
        store
            .context("starting the raft node in /var/lib/raftmq")
            .expect_err("an error")
    }

    #[test]
    fn an_unknown_format_is_refused_naming_the_data_dir_and_the_way_out() {
        let text = refusal(&incompatible(3), Path::new("/var/lib/raftmq")).expect("refused");
        assert_eq!(
            text,
            "data dir /var/lib/raftmq was written in store format 3, and this release reads only \
             format 2 (a newer release wrote it?);\n\
             run the release that wrote it, or move /var/lib/raftmq aside to start this node \
             empty.\n\
             See docs/operations.md#upgrading-to-sharded-state"
        );
        // Format 1 reaches the refusal only if something opened the store without migrating.
        let single = refusal(&incompatible(1), Path::new("/data")).expect("refused");
        assert!(
            single.contains("start `raftmq serve` on it to migrate it"),
            "{single}"
        );
    }

    #[test]
    fn a_failed_migration_names_the_data_dir_the_step_and_the_cause() {
        let failed = Err::<(), _>(StoreError::Migration {
            path: "/var/lib/raftmq/raft".into(),
            step: "copying column family `sessions`".to_owned(),
            source: Box::new(StoreError::InjectedFault { op: "write" }),
        })
        .context("starting the raft node in /var/lib/raftmq")
        .expect_err("an error");
        let text = refusal(&failed, Path::new("/var/lib/raftmq")).expect("refused");
        assert!(
            text.starts_with(
                "data dir /var/lib/raftmq: migrating its store from format 1 (single-group \
                 release) to format 2 failed while copying column family `sessions`: injected \
                 write fault\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("the next start resumes the migration"),
            "{text}"
        );

        let blocked = anyhow::anyhow!(StoreError::MigrationBlocked {
            path: "/data/raft".into(),
            detail: "/data/raft.format-1 exists".to_owned(),
        });
        let text = refusal(&blocked, Path::new("/data")).expect("refused");
        assert!(
            text.starts_with(
                "data dir /data cannot be migrated from store format 1 to format 2: \
                 /data/raft.format-1 exists\nNothing was written to it."
            ),
            "{text}"
        );
    }

    #[test]
    fn other_start_errors_are_not_a_refusal() {
        let other = anyhow::anyhow!(StoreError::MissingColumnFamily("raft_log"));
        assert_eq!(refusal(&other, Path::new("/data")), None);
        assert_eq!(
            refusal(&anyhow::anyhow!("bind failed"), Path::new("/data")),
            None
        );
    }
}
