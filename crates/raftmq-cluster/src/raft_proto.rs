//! Conversions between openraft's RPC types and the `raftmq.raft.v1` protobuf messages (the
//! versioned wire format of the Raft transport). Missing required fields in a message from a
//! peer become a [`WireError`], never a panic.

use crate::types::{
    ClusterNode, Entry, LogId, NodeId, SnapshotMeta, StoredMembership, TypeConfig, Vote,
};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{CommittedLeaderId, EntryPayload, Membership};
use raftmq_proto::raft as pb;
use std::collections::{BTreeMap, BTreeSet};

/// A protobuf message from a peer lacks a required field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed raft message: missing {0}")]
pub struct WireError(pub &'static str);

pub(crate) fn log_id_to_pb(id: &LogId) -> pb::LogId {
    pb::LogId {
        term: id.leader_id.term,
        leader_id: id.leader_id.node_id,
        index: id.index,
    }
}

pub(crate) fn log_id_from_pb(id: &pb::LogId) -> LogId {
    LogId::new(CommittedLeaderId::new(id.term, id.leader_id), id.index)
}

fn opt_log_id_from_pb(id: &Option<pb::LogId>) -> Option<LogId> {
    id.as_ref().map(log_id_from_pb)
}

pub(crate) fn vote_to_pb(v: &Vote) -> pb::Vote {
    pb::Vote {
        term: v.leader_id.term,
        node_id: v.leader_id.node_id,
        committed: v.committed,
    }
}

pub(crate) fn vote_from_pb(v: &Option<pb::Vote>) -> Result<Vote, WireError> {
    let v = v.as_ref().ok_or(WireError("vote"))?;
    Ok(if v.committed {
        Vote::new_committed(v.term, v.node_id)
    } else {
        Vote::new(v.term, v.node_id)
    })
}

fn node_to_pb(n: &ClusterNode) -> pb::Node {
    pb::Node {
        cluster_addr: n.cluster_addr.clone(),
        mqtt_addr: n.mqtt_addr.clone(),
    }
}

pub(crate) fn node_from_pb(n: &pb::Node) -> ClusterNode {
    ClusterNode {
        cluster_addr: n.cluster_addr.clone(),
        mqtt_addr: n.mqtt_addr.clone(),
    }
}

fn membership_to_pb(m: &Membership<NodeId, ClusterNode>) -> pb::Membership {
    pb::Membership {
        configs: m
            .get_joint_config()
            .iter()
            .map(|c| pb::NodeIds {
                ids: c.iter().copied().collect(),
            })
            .collect(),
        nodes: m.nodes().map(|(id, n)| (*id, node_to_pb(n))).collect(),
    }
}

fn membership_from_pb(m: &pb::Membership) -> Membership<NodeId, ClusterNode> {
    let configs: Vec<BTreeSet<NodeId>> = m
        .configs
        .iter()
        .map(|c| c.ids.iter().copied().collect())
        .collect();
    let nodes: BTreeMap<NodeId, ClusterNode> = m
        .nodes
        .iter()
        .map(|(id, n)| (*id, node_from_pb(n)))
        .collect();
    Membership::new(configs, nodes)
}

fn stored_membership_to_pb(m: &StoredMembership) -> pb::StoredMembership {
    pb::StoredMembership {
        log_id: m.log_id().as_ref().map(log_id_to_pb),
        membership: Some(membership_to_pb(m.membership())),
    }
}

fn stored_membership_from_pb(
    m: &Option<pb::StoredMembership>,
) -> Result<StoredMembership, WireError> {
    let m = m.as_ref().ok_or(WireError("last_membership"))?;
    let membership = m.membership.as_ref().ok_or(WireError("membership"))?;
    Ok(StoredMembership::new(
        opt_log_id_from_pb(&m.log_id),
        membership_from_pb(membership),
    ))
}

fn entry_to_pb(e: &Entry) -> pb::Entry {
    let payload = match &e.payload {
        EntryPayload::Blank => pb::entry::Payload::Blank(pb::Empty {}),
        EntryPayload::Normal(req) => pb::entry::Payload::Normal(req.batch.clone().into()),
        EntryPayload::Membership(m) => pb::entry::Payload::Membership(membership_to_pb(m)),
    };
    pb::Entry {
        log_id: Some(log_id_to_pb(&e.log_id)),
        payload: Some(payload),
    }
}

fn entry_from_pb(e: &pb::Entry) -> Result<Entry, WireError> {
    let log_id = log_id_from_pb(e.log_id.as_ref().ok_or(WireError("entry.log_id"))?);
    let payload = match e.payload.as_ref().ok_or(WireError("entry.payload"))? {
        pb::entry::Payload::Blank(_) => EntryPayload::Blank,
        pb::entry::Payload::Normal(b) => {
            EntryPayload::Normal(crate::types::Request { batch: b.to_vec() })
        }
        pb::entry::Payload::Membership(m) => EntryPayload::Membership(membership_from_pb(m)),
    };
    Ok(Entry { log_id, payload })
}

pub(crate) fn vote_request_to_pb(shard_id: u64, r: &VoteRequest<NodeId>) -> pb::VoteRequest {
    pb::VoteRequest {
        shard_id,
        vote: Some(vote_to_pb(&r.vote)),
        last_log_id: r.last_log_id.as_ref().map(log_id_to_pb),
    }
}

pub(crate) fn vote_request_from_pb(r: &pb::VoteRequest) -> Result<VoteRequest<NodeId>, WireError> {
    Ok(VoteRequest {
        vote: vote_from_pb(&r.vote)?,
        last_log_id: opt_log_id_from_pb(&r.last_log_id),
    })
}

pub(crate) fn vote_response_to_pb(r: &VoteResponse<NodeId>) -> pb::VoteResponse {
    pb::VoteResponse {
        vote: Some(vote_to_pb(&r.vote)),
        vote_granted: r.vote_granted,
        last_log_id: r.last_log_id.as_ref().map(log_id_to_pb),
    }
}

pub(crate) fn vote_response_from_pb(
    r: &pb::VoteResponse,
) -> Result<VoteResponse<NodeId>, WireError> {
    Ok(VoteResponse {
        vote: vote_from_pb(&r.vote)?,
        vote_granted: r.vote_granted,
        last_log_id: opt_log_id_from_pb(&r.last_log_id),
    })
}

pub(crate) fn append_request_to_pb(
    shard_id: u64,
    r: &AppendEntriesRequest<TypeConfig>,
) -> pb::AppendEntriesRequest {
    pb::AppendEntriesRequest {
        shard_id,
        vote: Some(vote_to_pb(&r.vote)),
        prev_log_id: r.prev_log_id.as_ref().map(log_id_to_pb),
        entries: r.entries.iter().map(entry_to_pb).collect(),
        leader_commit: r.leader_commit.as_ref().map(log_id_to_pb),
    }
}

pub(crate) fn append_request_from_pb(
    r: &pb::AppendEntriesRequest,
) -> Result<AppendEntriesRequest<TypeConfig>, WireError> {
    Ok(AppendEntriesRequest {
        vote: vote_from_pb(&r.vote)?,
        prev_log_id: opt_log_id_from_pb(&r.prev_log_id),
        entries: r
            .entries
            .iter()
            .map(entry_from_pb)
            .collect::<Result<_, _>>()?,
        leader_commit: opt_log_id_from_pb(&r.leader_commit),
    })
}

pub(crate) fn append_response_to_pb(
    r: &AppendEntriesResponse<NodeId>,
) -> pb::AppendEntriesResponse {
    use pb::append_entries_response::Result as R;
    let result = match r {
        AppendEntriesResponse::Success => R::Success(pb::Empty {}),
        AppendEntriesResponse::PartialSuccess(m) => R::PartialSuccess(pb::PartialSuccess {
            matching: m.as_ref().map(log_id_to_pb),
        }),
        AppendEntriesResponse::Conflict => R::Conflict(pb::Empty {}),
        AppendEntriesResponse::HigherVote(v) => R::HigherVote(vote_to_pb(v)),
    };
    pb::AppendEntriesResponse {
        result: Some(result),
    }
}

pub(crate) fn append_response_from_pb(
    r: &pb::AppendEntriesResponse,
) -> Result<AppendEntriesResponse<NodeId>, WireError> {
    use pb::append_entries_response::Result as R;
    Ok(
        match r
            .result
            .as_ref()
            .ok_or(WireError("append_entries.result"))?
        {
            R::Success(_) => AppendEntriesResponse::Success,
            R::PartialSuccess(p) => {
                AppendEntriesResponse::PartialSuccess(opt_log_id_from_pb(&p.matching))
            }
            R::Conflict(_) => AppendEntriesResponse::Conflict,
            R::HigherVote(v) => AppendEntriesResponse::HigherVote(vote_from_pb(&Some(*v))?),
        },
    )
}

pub(crate) fn snapshot_meta_to_pb(m: &SnapshotMeta) -> pb::SnapshotMeta {
    pb::SnapshotMeta {
        last_log_id: m.last_log_id.as_ref().map(log_id_to_pb),
        last_membership: Some(stored_membership_to_pb(&m.last_membership)),
        snapshot_id: m.snapshot_id.clone(),
    }
}

fn snapshot_meta_from_pb(m: &Option<pb::SnapshotMeta>) -> Result<SnapshotMeta, WireError> {
    let m = m.as_ref().ok_or(WireError("snapshot meta"))?;
    Ok(SnapshotMeta {
        last_log_id: opt_log_id_from_pb(&m.last_log_id),
        last_membership: stored_membership_from_pb(&m.last_membership)?,
        snapshot_id: m.snapshot_id.clone(),
    })
}

pub(crate) fn snapshot_request_to_pb(
    shard_id: u64,
    r: &InstallSnapshotRequest<TypeConfig>,
) -> pb::InstallSnapshotRequest {
    pb::InstallSnapshotRequest {
        shard_id,
        vote: Some(vote_to_pb(&r.vote)),
        meta: Some(snapshot_meta_to_pb(&r.meta)),
        offset: r.offset,
        data: r.data.clone().into(),
        done: r.done,
    }
}

pub(crate) fn snapshot_request_from_pb(
    r: &pb::InstallSnapshotRequest,
) -> Result<InstallSnapshotRequest<TypeConfig>, WireError> {
    Ok(InstallSnapshotRequest {
        vote: vote_from_pb(&r.vote)?,
        meta: snapshot_meta_from_pb(&r.meta)?,
        offset: r.offset,
        data: r.data.to_vec(),
        done: r.done,
    })
}

pub(crate) fn snapshot_response_to_pb(
    r: &InstallSnapshotResponse<NodeId>,
) -> pb::InstallSnapshotResponse {
    pb::InstallSnapshotResponse {
        vote: Some(vote_to_pb(&r.vote)),
    }
}

pub(crate) fn snapshot_response_from_pb(
    r: &pb::InstallSnapshotResponse,
) -> Result<InstallSnapshotResponse<NodeId>, WireError> {
    Ok(InstallSnapshotResponse {
        vote: vote_from_pb(&r.vote)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Request;

    fn lid(term: u64, node: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, node), index)
    }

    #[test]
    fn append_entries_round_trip_through_protobuf() {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            1,
            ClusterNode {
                cluster_addr: "a:1".into(),
                mqtt_addr: "a:2".into(),
            },
        );
        nodes.insert(
            2,
            ClusterNode {
                cluster_addr: "b:1".into(),
                mqtt_addr: "b:2".into(),
            },
        );
        let membership = Membership::new(vec![[1, 2].into()], nodes);
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(3, 1),
            prev_log_id: Some(lid(2, 1, 9)),
            entries: vec![
                Entry {
                    log_id: lid(3, 1, 10),
                    payload: EntryPayload::Blank,
                },
                Entry {
                    log_id: lid(3, 1, 11),
                    payload: EntryPayload::Normal(Request {
                        batch: vec![1, 2, 3],
                    }),
                },
                Entry {
                    log_id: lid(3, 1, 12),
                    payload: EntryPayload::Membership(membership),
                },
            ],
            leader_commit: Some(lid(3, 1, 10)),
        };
        let back = append_request_from_pb(&append_request_to_pb(0, &req)).expect("decodes");
        assert_eq!(back.vote, req.vote);
        assert_eq!(back.prev_log_id, req.prev_log_id);
        assert_eq!(back.entries, req.entries);
        assert_eq!(back.leader_commit, req.leader_commit);
        for resp in [
            AppendEntriesResponse::Success,
            AppendEntriesResponse::PartialSuccess(Some(lid(1, 2, 3))),
            AppendEntriesResponse::PartialSuccess(None),
            AppendEntriesResponse::Conflict,
            AppendEntriesResponse::HigherVote(Vote::new(7, 2)),
        ] {
            assert_eq!(
                append_response_from_pb(&append_response_to_pb(&resp)),
                Ok(resp)
            );
        }
    }

    #[test]
    fn vote_round_trip_and_missing_fields_are_errors() {
        let req = VoteRequest {
            vote: Vote::new(4, 2),
            last_log_id: Some(lid(3, 1, 5)),
        };
        assert_eq!(vote_request_from_pb(&vote_request_to_pb(0, &req)), Ok(req));
        let resp = VoteResponse {
            vote: Vote::new_committed(4, 2),
            vote_granted: true,
            last_log_id: None,
        };
        assert_eq!(vote_response_from_pb(&vote_response_to_pb(&resp)), Ok(resp));
        assert_eq!(
            vote_request_from_pb(&pb::VoteRequest::default()),
            Err(WireError("vote"))
        );
        assert!(append_response_from_pb(&pb::AppendEntriesResponse::default()).is_err());
    }
}
