//! The gRPC services a node exposes to its peers: `RaftService` (openraft's RPCs) and
//! `ClusterService` (forwarded proposals, join, leave). The server crate serves them on the
//! cluster address; this module only implements them.

use crate::network::MAX_MESSAGE_BYTES;
use crate::raft_proto as conv;
use crate::types::{ClusterNode, NodeId, Raft, Request};
use openraft::ChangeMembers;
use openraft::error::{ClientWriteError, RaftError};
use raftmq_proto::raft as pb;
use raftmq_proto::raft::cluster_service_server::{ClusterService, ClusterServiceServer};
use raftmq_proto::raft::raft_service_server::{RaftService, RaftServiceServer};
use std::collections::BTreeSet;
use tonic::{Request as GrpcRequest, Response, Status};
use tracing::info;

/// The one place where errors become `tonic::Status`.
fn to_status(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn bad_request(e: conv::WireError) -> Status {
    Status::invalid_argument(e.to_string())
}

/// When this node last heard from a leader it follows: an AppendEntries or InstallSnapshot
/// it accepted (not one it refused for a higher vote). A cut-off follower knows from it how
/// long it has been without one (see `node.rs`, the lease), which openraft's metrics do not
/// tell: a follower keeps naming its leader until the leader lease and an election timeout
/// have passed (up to 4 s, and 4 s more after a refused election).
#[derive(Debug)]
pub struct LeaderContact {
    base: std::time::Instant,
    /// Milliseconds after `base`, plus one (0: never).
    last: std::sync::atomic::AtomicU64,
}

impl Default for LeaderContact {
    fn default() -> Self {
        LeaderContact {
            base: std::time::Instant::now(),
            last: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl LeaderContact {
    /// Records a contact now.
    pub fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last
            .fetch_max(ms + 1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The last contact, if any.
    pub fn last(&self) -> Option<std::time::Instant> {
        match self.last.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            ms => Some(self.base + std::time::Duration::from_millis(ms - 1)),
        }
    }
}

/// Both services of a node, ready to be served.
pub fn routes(raft: Raft) -> tonic::service::Routes {
    routes_with(raft, None)
}

/// [`routes`], recording every accepted contact from a leader in `contact`.
pub fn routes_with(
    raft: Raft,
    contact: Option<std::sync::Arc<LeaderContact>>,
) -> tonic::service::Routes {
    let raft_service = RaftServiceServer::new(RaftGrpc {
        raft: raft.clone(),
        contact,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let cluster_service = ClusterServiceServer::new(ClusterGrpc { raft })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::service::Routes::new(raft_service).add_service(cluster_service)
}

struct RaftGrpc {
    raft: Raft,
    contact: Option<std::sync::Arc<LeaderContact>>,
}

#[tonic::async_trait]
impl RaftService for RaftGrpc {
    async fn vote(
        &self,
        req: GrpcRequest<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        let req = conv::vote_request_from_pb(req.get_ref()).map_err(bad_request)?;
        let resp = self.raft.vote(req).await.map_err(to_status)?;
        Ok(Response::new(conv::vote_response_to_pb(&resp)))
    }

    async fn append_entries(
        &self,
        req: GrpcRequest<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        let req = conv::append_request_from_pb(req.get_ref()).map_err(bad_request)?;
        let resp = self.raft.append_entries(req).await.map_err(to_status)?;
        if let Some(contact) = &self.contact
            && !matches!(resp, openraft::raft::AppendEntriesResponse::HigherVote(_))
        {
            contact.touch();
        }
        Ok(Response::new(conv::append_response_to_pb(&resp)))
    }

    async fn install_snapshot(
        &self,
        req: GrpcRequest<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        let req = conv::snapshot_request_from_pb(req.get_ref()).map_err(bad_request)?;
        let vote = req.vote;
        let resp = self.raft.install_snapshot(req).await.map_err(to_status)?;
        if let Some(contact) = &self.contact
            && resp.vote <= vote
        {
            contact.touch();
        }
        Ok(Response::new(conv::snapshot_response_to_pb(&resp)))
    }
}

struct ClusterGrpc {
    raft: Raft,
}

impl ClusterGrpc {
    /// The current leader, as protobuf, for redirects.
    fn leader(&self) -> (Option<u64>, Option<pb::Node>) {
        let metrics = self.raft.metrics().borrow().clone();
        let leader = metrics.current_leader;
        let node = leader.and_then(|id| {
            metrics
                .membership_config
                .membership()
                .get_node(&id)
                .map(|n| pb::Node {
                    cluster_addr: n.cluster_addr.clone(),
                    mqtt_addr: n.mqtt_addr.clone(),
                })
        });
        (leader, node)
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterGrpc {
    async fn propose(
        &self,
        req: GrpcRequest<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        let batch = req.into_inner().batch.to_vec();
        match self.raft.client_write(Request { batch }).await {
            Ok(resp) => Ok(Response::new(pb::ProposeResponse {
                committed: true,
                leader_id: None,
                leader: None,
                log_index: resp.log_id.index,
            })),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                let (leader_id, leader) = self.leader();
                Ok(Response::new(pb::ProposeResponse {
                    committed: false,
                    leader_id,
                    leader,
                    log_index: 0,
                }))
            }
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn join(
        &self,
        req: GrpcRequest<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let req = req.into_inner();
        let node: ClusterNode = req
            .node
            .as_ref()
            .map(conv::node_from_pb)
            .unwrap_or_default();
        let (leader_id, leader) = self.leader();
        if leader_id != Some(self.raft_id()) {
            return Ok(Response::new(pb::JoinResponse { leader_id, leader }));
        }
        let known = self
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .get_node(&req.node_id)
            .is_some();
        if !known {
            info!(node_id = req.node_id, addr = %node.cluster_addr, "adding node as learner");
            // Blocks until the learner has caught up.
            self.raft
                .add_learner(req.node_id, node, true)
                .await
                .map_err(to_status)?;
        }
        let voters: BTreeSet<NodeId> = [req.node_id].into();
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(voters), false)
            .await
            .map_err(to_status)?;
        info!(node_id = req.node_id, "node promoted to voter");
        Ok(Response::new(pb::JoinResponse {
            leader_id: None,
            leader: None,
        }))
    }

    async fn leave(
        &self,
        req: GrpcRequest<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let node_id = req.into_inner().node_id;
        let (leader_id, leader) = self.leader();
        if leader_id != Some(self.raft_id()) {
            return Ok(Response::new(pb::LeaveResponse { leader_id, leader }));
        }
        let ids: BTreeSet<NodeId> = [node_id].into();
        self.raft
            .change_membership(ChangeMembers::RemoveVoters(ids.clone()), false)
            .await
            .map_err(to_status)?;
        self.raft
            .change_membership(ChangeMembers::RemoveNodes(ids), false)
            .await
            .map_err(to_status)?;
        info!(node_id, "node removed from the cluster");
        Ok(Response::new(pb::LeaveResponse {
            leader_id: None,
            leader: None,
        }))
    }
}

impl ClusterGrpc {
    fn raft_id(&self) -> NodeId {
        self.raft.metrics().borrow().id
    }
}
