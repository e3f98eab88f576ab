//! The gRPC services a node exposes to its peers: `RaftService` (openraft's RPCs, dispatched
//! to the group of each request's `shard_id`) and `ClusterService` (forwarded proposals, and
//! join and leave of one group). The server crate serves them on the
//! cluster address; this module only implements them.

use crate::groups::Groups;
use crate::network::MAX_MESSAGE_BYTES;
use crate::raft_proto as conv;
use crate::types::{ClusterNode, DATA_SHARD, NodeId, Raft, Request, ShardId};
use openraft::ChangeMembers;
use openraft::error::{ClientWriteError, RaftError};
use raftmq_proto::raft as pb;
use raftmq_proto::raft::cluster_service_server::{ClusterService, ClusterServiceServer};
use raftmq_proto::raft::raft_service_server::{RaftService, RaftServiceServer};
use std::collections::BTreeSet;
use std::sync::Arc;
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

/// Both services of a node running the data group only, ready to be served.
pub fn routes(raft: Raft) -> tonic::service::Routes {
    routes_with(Arc::new(Groups::new(vec![raft])), None)
}

/// Both services of a node running `groups`: each Raft request goes to the group of its
/// `shard_id` (a shard the node does not run answers `NOT_FOUND`). Every accepted contact from
/// a leader of the data group is recorded in `contact` (it drives this node's lease).
pub fn routes_with(
    groups: Arc<Groups>,
    contact: Option<Arc<LeaderContact>>,
) -> tonic::service::Routes {
    let raft_service = RaftServiceServer::new(RaftGrpc {
        groups: groups.clone(),
        contact,
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES)
    .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let cluster_service = ClusterServiceServer::new(ClusterGrpc { groups })
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    tonic::service::Routes::new(raft_service).add_service(cluster_service)
}

/// Runs `change` in a task of its own and waits for it: dropping the wait (the caller gave up)
/// leaves the change running to its end.
async fn detached(
    change: impl Future<Output = Result<(), Status>> + Send + 'static,
) -> Result<(), Status> {
    tokio::spawn(change).await.map_err(to_status)?
}

/// The message of the `UNAVAILABLE` answer to a membership change of a group whose leader
/// this node does not know (the caller retries; the admin API answers 503).
pub const NO_LEADER: &str = "no leader is known for this group (an election, or no quorum)";

/// The answer to a request for a shard this node runs no group of.
fn unknown_shard(shard_id: u64) -> Status {
    Status::not_found(format!("this node runs no Raft group of shard {shard_id}"))
}

struct RaftGrpc {
    groups: Arc<Groups>,
    contact: Option<Arc<LeaderContact>>,
}

impl RaftGrpc {
    fn group(&self, shard_id: u64) -> Result<(ShardId, &Raft), Status> {
        self.groups
            .by_wire_id(shard_id)
            .ok_or_else(|| unknown_shard(shard_id))
    }

    /// A Raft message of `shard` arrived: a shard quiesced here is awake again.
    fn wake(&self, shard: ShardId, raft: &Raft) {
        self.groups.quiet().woken(shard, raft);
    }

    /// Records a contact from the data group's leader (the other groups do not drive the
    /// lease).
    fn touch(&self, shard: ShardId) {
        if shard == DATA_SHARD
            && let Some(contact) = &self.contact
        {
            contact.touch();
        }
    }
}

#[tonic::async_trait]
impl RaftService for RaftGrpc {
    async fn vote(
        &self,
        req: GrpcRequest<pb::VoteRequest>,
    ) -> Result<Response<pb::VoteResponse>, Status> {
        let (shard, raft) = self.group(req.get_ref().shard_id)?;
        self.wake(shard, raft);
        let req = conv::vote_request_from_pb(req.get_ref()).map_err(bad_request)?;
        let resp = raft.vote(req).await.map_err(to_status)?;
        Ok(Response::new(conv::vote_response_to_pb(&resp)))
    }

    async fn append_entries(
        &self,
        req: GrpcRequest<pb::AppendEntriesRequest>,
    ) -> Result<Response<pb::AppendEntriesResponse>, Status> {
        let (shard, raft) = self.group(req.get_ref().shard_id)?;
        self.wake(shard, raft);
        let req = conv::append_request_from_pb(req.get_ref()).map_err(bad_request)?;
        let resp = raft.append_entries(req).await.map_err(to_status)?;
        if !matches!(resp, openraft::raft::AppendEntriesResponse::HigherVote(_)) {
            self.touch(shard);
        }
        Ok(Response::new(conv::append_response_to_pb(&resp)))
    }

    async fn install_snapshot(
        &self,
        req: GrpcRequest<pb::InstallSnapshotRequest>,
    ) -> Result<Response<pb::InstallSnapshotResponse>, Status> {
        let (shard, raft) = self.group(req.get_ref().shard_id)?;
        self.wake(shard, raft);
        let req = conv::snapshot_request_from_pb(req.get_ref()).map_err(bad_request)?;
        let vote = req.vote;
        let resp = raft.install_snapshot(req).await.map_err(to_status)?;
        if resp.vote <= vote {
            self.touch(shard);
        }
        Ok(Response::new(conv::snapshot_response_to_pb(&resp)))
    }

    async fn heartbeat(
        &self,
        req: GrpcRequest<pb::NodeHeartbeat>,
    ) -> Result<Response<pb::NodeHeartbeatAck>, Status> {
        self.groups.quiet().heard_from(req.get_ref().from);
        Ok(Response::new(pb::NodeHeartbeatAck {}))
    }

    async fn quiesce(
        &self,
        req: GrpcRequest<pb::QuiesceRequest>,
    ) -> Result<Response<pb::QuiesceResponse>, Status> {
        let (shard, raft) = self.group(req.get_ref().shard_id)?;
        let quiesced = self.groups.quiet().on_quiesce(shard, raft, req.get_ref());
        Ok(Response::new(pb::QuiesceResponse { quiesced }))
    }
}

struct ClusterGrpc {
    groups: Arc<Groups>,
}

impl ClusterGrpc {
    /// The group a cluster administration request names: 0 (senders from before the field, and
    /// forwarded proposals) is the data group.
    fn group(&self, shard_id: u64) -> Result<&Raft, Status> {
        let shard_id = if shard_id == 0 {
            u64::from(DATA_SHARD.get())
        } else {
            shard_id
        };
        self.groups
            .by_wire_id(shard_id)
            .map(|(_, raft)| raft)
            .ok_or_else(|| unknown_shard(shard_id))
    }
}

/// A group's leader as a redirect names it: its id and addresses.
type LeaderHint = (Option<u64>, Option<pb::Node>);

/// The current leader of `raft`'s group, as protobuf, for redirects.
fn leader(raft: &Raft) -> LeaderHint {
    let metrics = raft.metrics().borrow().clone();
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

/// Where a membership change of `raft`'s group must go: `Ok(None)` when this node leads it,
/// `Ok(Some(leader))` to redirect, an error when no leader is known (the caller retries).
fn redirect(raft: &Raft) -> Result<Option<LeaderHint>, Status> {
    let (leader_id, leader) = leader(raft);
    match leader_id {
        Some(id) if id == raft.metrics().borrow().id => Ok(None),
        Some(_) => Ok(Some((leader_id, leader))),
        None => Err(Status::unavailable(NO_LEADER)),
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterGrpc {
    async fn propose(
        &self,
        req: GrpcRequest<pb::ProposeRequest>,
    ) -> Result<Response<pb::ProposeResponse>, Status> {
        let req = req.into_inner();
        let raft = self.group(req.shard_id)?;
        let batch = req.batch.to_vec();
        match raft.client_write(Request { batch }).await {
            Ok(resp) => Ok(Response::new(pb::ProposeResponse {
                committed: true,
                leader_id: None,
                leader: None,
                log_index: resp.log_id.index,
            })),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                let (leader_id, leader) = leader(raft);
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
        let raft = self.group(req.shard_id)?;
        if req.shards != 0 && req.shards != self.groups.count() {
            return Err(Status::failed_precondition(format!(
                "node {} has cluster.shards = {}, but this cluster was created with \
                 cluster.shards = {}: the shard count is fixed when a cluster is created",
                req.node_id,
                req.shards,
                self.groups.count()
            )));
        }
        if let Some((leader_id, leader)) = redirect(raft)? {
            return Ok(Response::new(pb::JoinResponse { leader_id, leader }));
        }
        let node: ClusterNode = req
            .node
            .as_ref()
            .map(conv::node_from_pb)
            .unwrap_or_default();
        let shard = req.shard_id;
        let (known, voter) = {
            let m = raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            (
                membership.get_node(&req.node_id).is_some(),
                membership
                    .get_joint_config()
                    .iter()
                    .all(|config| config.contains(&req.node_id)),
            )
        };
        if voter {
            // Already a voter of every configuration: nothing to change (a retried join).
            return Ok(Response::new(pb::JoinResponse {
                leader_id: None,
                leader: None,
            }));
        }
        let node_id = req.node_id;
        let raft = raft.clone();
        // In a task of its own: a caller that gives up (or stops) does not cut the change off
        // between its two membership entries (a joint configuration left behind).
        detached(async move {
            if !known {
                info!(node_id, shard, addr = %node.cluster_addr, "adding node as learner");
                // Blocks until the learner has caught up.
                raft.add_learner(node_id, node, true)
                    .await
                    .map_err(to_status)?;
            }
            // From a joint configuration that includes the node (a change cut off earlier),
            // this only finishes it.
            let voters: BTreeSet<NodeId> = [node_id].into();
            raft.change_membership(ChangeMembers::AddVoterIds(voters), false)
                .await
                .map_err(to_status)?;
            info!(node_id, shard, "node promoted to voter");
            Ok(())
        })
        .await?;
        Ok(Response::new(pb::JoinResponse {
            leader_id: None,
            leader: None,
        }))
    }

    async fn leave(
        &self,
        req: GrpcRequest<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let req = req.into_inner();
        let node_id = req.node_id;
        let raft = self.group(req.shard_id)?;
        if let Some((leader_id, leader)) = redirect(raft)? {
            return Ok(Response::new(pb::LeaveResponse { leader_id, leader }));
        }
        let ids: BTreeSet<NodeId> = [node_id].into();
        let (voter, member) = {
            let m = raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            (
                membership.voter_ids().any(|id| id == node_id),
                membership.get_node(&node_id).is_some(),
            )
        };
        let raft = raft.clone();
        // In a task of its own, as a join.
        detached(async move {
            if voter {
                raft.change_membership(ChangeMembers::RemoveVoters(ids.clone()), false)
                    .await
                    .map_err(to_status)?;
            }
            // Removing a voter without retaining it removes the node too; a learner is left.
            let still = raft
                .metrics()
                .borrow()
                .membership_config
                .membership()
                .get_node(&node_id)
                .is_some();
            if member && still {
                raft.change_membership(ChangeMembers::RemoveNodes(ids), false)
                    .await
                    .map_err(to_status)?;
            }
            Ok(())
        })
        .await?;
        info!(node_id, shard = req.shard_id, "node removed from the group");
        Ok(Response::new(pb::LeaveResponse {
            leader_id: None,
            leader: None,
        }))
    }
}
