//! What `raftmq serve` says when its data dir was written by a release it cannot read (RFC
//! 0002, section 10): the node does not start, exits with status 78 (`EX_CONFIG`), writes
//! nothing to the data dir, and names the data dir and the way out.

use std::path::Path;

use raftmq_store::StoreError;

/// Exit status of a refused data dir (`EX_CONFIG` of sysexits.h: a configuration the operator
/// must change, not a crash to restart from).
pub const EXIT_INCOMPATIBLE_DATA_DIR: u8 = 78;

/// The store format of the single-group releases: one Raft group, keys without a shard prefix.
const SINGLE_GROUP_FORMAT: u32 = 1;

/// The message for a start that failed with `error`, if it failed because the store in
/// `data_dir` was written in a format this release does not read.
pub fn refusal(error: &anyhow::Error, data_dir: &Path) -> Option<String> {
    error
        .chain()
        .find_map(|cause| match cause.downcast_ref::<StoreError>() {
            Some(StoreError::IncompatibleFormat {
                found, supported, ..
            }) => Some(message(data_dir, *found, *supported)),
            _ => None,
        })
}

fn message(data_dir: &Path, found: u32, supported: u32) -> String {
    let dir = data_dir.display();
    if found == SINGLE_GROUP_FORMAT {
        // RFC 0002 section 10 names `raftmq data export` / `raftmq data import` as the way
        // out; they arrive with step 2, and this message names them then.
        format!(
            "data dir {dir} was written by a single-group release (store format 1);\n\
             this release keeps sharded state (format {supported}) and cannot open it.\n\
             It cannot export it either (`raftmq data export` comes with a later release):\n\
             keep running the single-group release on {dir}, or move {dir} aside to start \
             this node empty.\n\
             See docs/operations.md#upgrading-to-sharded-state"
        )
    } else {
        format!(
            "data dir {dir} was written in store format {found}, and this release reads only \
             format {supported} (a newer release wrote it?);\n\
             run the release that wrote it, or move {dir} aside to start this node empty.\n\
             See docs/operations.md#upgrading-to-sharded-state"
        )
    }
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
    fn a_format_1_data_dir_is_refused_naming_it_and_the_way_out() {
        let text = refusal(&incompatible(1), Path::new("/var/lib/raftmq")).expect("refused");
        assert_eq!(
            text,
            "data dir /var/lib/raftmq was written by a single-group release (store format 1);\n\
             this release keeps sharded state (format 2) and cannot open it.\n\
             It cannot export it either (`raftmq data export` comes with a later release):\n\
             keep running the single-group release on /var/lib/raftmq, or move \
             /var/lib/raftmq aside to start this node empty.\n\
             See docs/operations.md#upgrading-to-sharded-state"
        );
        let newer = refusal(&incompatible(3), Path::new("/data")).expect("refused");
        assert!(
            newer.contains("data dir /data was written in store format 3"),
            "{newer}"
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
