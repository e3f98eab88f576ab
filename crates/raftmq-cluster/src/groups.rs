//! The Raft groups of a node (RFC 0002, step 2): one openraft [`Raft`] per data shard
//! `1..=S`, every node a replica of every shard (RF = N until placement exists), all of them
//! over the node's one store and its one [`PeerPool`].
//!
//! Shard 1 ([`DATA_SHARD`]) does everything the single group did (the state machine the broker
//! reads, its feed, proposals, forwarding, node-down declarations); the other groups run the
//! same state machine type but receive no proposals yet, only their membership. Group 0 stays
//! reserved for the metadata group.
//!
//! This module holds what concerns every group at once: starting them, the shard count fixed at
//! cluster creation ([`settle_shard_count`]), bootstrap, joining and leaving every group
//! (idempotent and resumable: a join interrupted after some groups completes on retry), the
//! per-shard status of the admin API and the per-node shard metrics.

use crate::network::{ClusterTls, Faults, Network, cluster_client};
use crate::node::{ADMIN_TIMEOUT, AdminError, NodeError};
use crate::peers::PeerPool;
use crate::state_machine::StateMachine;
use crate::types::{ClusterNode, NodeId, Raft, ShardId, TypeConfig};
use openraft::{ServerState, storage::RaftLogStorage as _};
use raftmq_core::shard::ShardCount;
use raftmq_proto::raft as pb;
use raftmq_store::Store;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Data groups this node leads (per node; bounded: no labels).
pub const SHARD_LEADERS: &str = "raftmq_shard_leaders";
/// Data groups this node is a voter of (per node; bounded: no labels).
pub const SHARD_REPLICAS: &str = "raftmq_shard_replicas";

/// Every data group of the node, shard `1..=S` in order.
#[derive(Clone)]
pub struct Groups {
    /// `rafts[i]` is shard `i + 1`.
    rafts: Vec<Raft>,
    /// Which shards are quiesced here ([`crate::quiesce`]).
    quiet: Arc<crate::quiesce::Quiet>,
}

impl std::fmt::Debug for Groups {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Groups")
            .field("shards", &self.rafts.len())
            .finish_non_exhaustive()
    }
}

/// One shard as this node sees it (`GET /api/v1/cluster`, `shards`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ShardStatus {
    pub id: u32,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    pub last_applied: Option<u64>,
}

impl Groups {
    /// The groups of shards `1..=rafts.len()`, in that order; `rafts` must not be empty.
    pub fn new(rafts: Vec<Raft>) -> Groups {
        assert!(!rafts.is_empty(), "a node runs at least the data group");
        Groups {
            rafts,
            quiet: Arc::default(),
        }
    }

    /// What this node knows of quiesced shards ([`crate::quiesce`]).
    pub fn quiet(&self) -> &Arc<crate::quiesce::Quiet> {
        &self.quiet
    }

    /// The number of data shards `S`.
    pub fn count(&self) -> u32 {
        u32::try_from(self.rafts.len()).unwrap_or(u32::MAX)
    }

    /// The number of data shards, as the shard hash takes it.
    pub fn shard_count(&self) -> raftmq_core::shard::ShardCount {
        raftmq_core::shard::ShardCount::new(self.count())
            .unwrap_or(raftmq_core::shard::ShardCount::ONE)
    }

    /// The group of shard `shard`, if this node runs it.
    pub fn get(&self, shard: ShardId) -> Option<&Raft> {
        let index = usize::try_from(shard.get().checked_sub(1)?).ok()?;
        self.rafts.get(index)
    }

    /// The group of a shard id as carried in a request (`u64` on the wire).
    pub fn by_wire_id(&self, shard_id: u64) -> Option<(ShardId, &Raft)> {
        let shard = ShardId::new(u32::try_from(shard_id).ok()?);
        self.get(shard).map(|raft| (shard, raft))
    }

    /// The data group, shard 1.
    pub fn data(&self) -> &Raft {
        &self.rafts[0]
    }

    /// Every group with its shard id, in shard order.
    pub fn iter(&self) -> impl Iterator<Item = (ShardId, &Raft)> {
        (1u32..).map(ShardId::new).zip(self.rafts.iter())
    }

    /// Every shard as this node sees it.
    pub fn status(&self) -> Vec<ShardStatus> {
        self.iter()
            .map(|(shard, raft)| {
                let m = raft.metrics().borrow().clone();
                let membership = m.membership_config.membership();
                let voters: Vec<NodeId> = membership.voter_ids().collect();
                ShardStatus {
                    id: shard.get(),
                    leader: m.current_leader,
                    term: m.current_term,
                    learners: membership
                        .nodes()
                        .map(|(id, _)| *id)
                        .filter(|id| !voters.contains(id))
                        .collect(),
                    voters,
                    last_applied: m.last_applied.map(|l| l.index),
                }
            })
            .collect()
    }

    /// (groups this node leads, groups it is a voter of).
    pub fn leaders_and_replicas(&self) -> (usize, usize) {
        let mut leaders = 0;
        let mut replicas = 0;
        for (_, raft) in self.iter() {
            let m = raft.metrics().borrow().clone();
            leaders += usize::from(m.state == ServerState::Leader);
            replicas += usize::from(is_voter(&m, m.id));
        }
        (leaders, replicas)
    }

    /// Stops every group but the data group (the node stops that one itself).
    pub(crate) async fn shutdown_others(&self) {
        for (shard, raft) in self.iter().skip(1) {
            if let Err(e) = raft.shutdown().await {
                warn!(%shard, error = %e, "raft shutdown failed");
            }
        }
    }
}

/// Whether `node` is a voter of every configuration of the group's membership: a joint
/// configuration whose old half lacks it (a join cut off between its two entries) does not
/// count, so the join is asked again and finishes it.
fn is_voter(m: &openraft::RaftMetrics<NodeId, ClusterNode>, node: NodeId) -> bool {
    let joint = m.membership_config.membership().get_joint_config();
    !joint.is_empty() && joint.iter().all(|config| config.contains(&node))
}

/// The shard count of the cluster the store at `data_dir` belongs to, checked against the
/// configured one: recorded in the store at the first start (the cluster's creation for the
/// bootstrap node), fixed afterwards. A store written before the count was recorded (by the
/// single-group release, migrated, or by a node of step 1) holds one data group, so its count
/// is one. A start whose configuration disagrees is refused, naming `cluster.shards` and both
/// values, unless no group has any Raft state in the store yet (a node whose join was refused
/// for its count, say): nothing depends on the recorded value then, and it is replaced.
pub(crate) async fn settle_shard_count(
    store: &Store,
    configured: ShardCount,
    data_dir: &Path,
) -> Result<ShardCount, NodeError> {
    let recorded = match store.shard_count()? {
        Some(n) => Some(n),
        None if holds_state(store, 1).await? => Some(1),
        None => None,
    };
    match recorded {
        Some(n) if n == configured.get() => {
            if store.shard_count()?.is_none() {
                store.record_shard_count(n)?;
            }
        }
        Some(n) if !holds_state(store, n).await? => {
            info!(
                recorded = n,
                configured = configured.get(),
                "no Raft state in the data dir yet: recording the configured cluster.shards"
            );
            store.record_shard_count(configured.get())?;
        }
        Some(n) => {
            return Err(NodeError::ShardCount {
                configured: configured.get(),
                recorded: n,
                data_dir: data_dir.to_path_buf(),
            });
        }
        None => {
            info!(
                shards = configured.get(),
                "new data dir: recording cluster.shards"
            );
            store.record_shard_count(configured.get())?;
        }
    }
    Ok(configured)
}

/// Whether the store holds any Raft state (a vote, log entries, a purge) of shards `1..=n`.
async fn holds_state(store: &Store, n: u32) -> Result<bool, NodeError> {
    for shard in 1..=n {
        // Read only, before the group's Raft starts (dropped before then).
        let mut log = store.log_store::<TypeConfig>(shard);
        let state = log.get_log_state().await?;
        if state.last_log_id.is_some()
            || state.last_purged_log_id.is_some()
            || log.read_vote().await?.is_some()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Starts the Raft of data shard `shard` on `store`, applying with `state_machine`, talking to
/// peers through `pool`.
pub(crate) async fn start_group(
    shard: ShardId,
    node_id: NodeId,
    config: Arc<openraft::Config>,
    pool: Arc<PeerPool>,
    faults: Faults,
    store: &Store,
    state_machine: StateMachine,
) -> Result<Raft, NodeError> {
    Ok(Raft::new(
        node_id,
        config,
        Network::new(shard, node_id, pool).with_faults(faults),
        store.log_store::<TypeConfig>(shard.get()),
        state_machine,
    )
    .await?)
}

/// The groups that have no membership yet on this node (a new node, or one whose bootstrap or
/// join was interrupted).
pub(crate) async fn uninitialized(groups: &Groups) -> Vec<ShardId> {
    let mut out = Vec::new();
    for (shard, raft) in groups.iter() {
        if !raft.is_initialized().await.unwrap_or(false) {
            out.push(shard);
        }
    }
    out
}

/// Bootstrap: initializes each of `shards` with this node as its only voter.
pub(crate) async fn initialize(
    groups: &Groups,
    shards: &[ShardId],
    node_id: NodeId,
    me: &ClusterNode,
) -> Result<(), NodeError> {
    for &shard in shards {
        if let Some(raft) = groups.get(shard) {
            raft.initialize(BTreeMap::from([(node_id, me.clone())]))
                .await?;
        }
    }
    Ok(())
}

/// How this node asks to join.
pub(crate) struct Joiner {
    pub groups: Arc<Groups>,
    pub node_id: NodeId,
    pub me: ClusterNode,
    pub seeds: Vec<String>,
    pub tls: Option<ClusterTls>,
}

/// Asks the seeds (or the leaders they point to) to add this node to every group, until it is
/// a voter of all of them. Groups are joined concurrently; a group already joined is not asked
/// again, so an interrupted join completes where it stopped.
pub(crate) async fn join_loop(j: Joiner) {
    let count = j.groups.count();
    loop {
        let pending: Vec<(ShardId, Raft)> = j
            .groups
            .iter()
            .filter(|(_, raft)| !is_voter(&raft.metrics().borrow(), j.node_id))
            .map(|(shard, raft)| (shard, raft.clone()))
            .collect();
        if pending.is_empty() {
            info!(node_id = j.node_id, shards = count, "joined the cluster");
            return;
        }
        let attempts = pending.into_iter().map(|(shard, raft)| {
            let req = pb::JoinRequest {
                node_id: j.node_id,
                node: Some(pb::Node {
                    cluster_addr: j.me.cluster_addr.clone(),
                    mqtt_addr: j.me.mqtt_addr.clone(),
                }),
                shard_id: u64::from(shard.get()),
                shards: count,
            };
            let seeds = &j.seeds;
            let tls = j.tls.as_ref();
            let node_id = j.node_id;
            async move {
                if join_group(req, seeds, tls).await {
                    // The leader promoted it: wait until this node has learnt so, rather than
                    // asking again.
                    let _ = raft
                        .wait(Some(Duration::from_secs(5)))
                        .metrics(|m| is_voter(m, node_id), "a voter of the group")
                        .await;
                }
            }
        });
        futures_util::future::join_all(attempts).await;
        if j.groups
            .iter()
            .any(|(_, raft)| !is_voter(&raft.metrics().borrow(), j.node_id))
        {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// One round of asking to join one group: each seed, following the leader it names (a few
/// hops). True when a leader accepted (added and promoted this node).
async fn join_group(req: pb::JoinRequest, seeds: &[String], tls: Option<&ClusterTls>) -> bool {
    for seed in seeds {
        let mut addr = seed.clone();
        for _ in 0..4 {
            let Ok(mut client) = cluster_client(&addr, tls) else {
                break;
            };
            match tokio::time::timeout(ADMIN_TIMEOUT, client.join(req.clone())).await {
                Ok(Ok(resp)) => match resp.into_inner().leader {
                    Some(leader) => addr = leader.cluster_addr,
                    None => {
                        info!(node_id = req.node_id, shard = req.shard_id, via = %addr, "join accepted");
                        return true;
                    }
                },
                Ok(Err(status)) => {
                    warn!(shard = req.shard_id, via = %addr, %status, "join attempt failed");
                    break;
                }
                Err(_) => {
                    warn!(shard = req.shard_id, via = %addr, "join attempt timed out");
                    break;
                }
            }
        }
    }
    false
}

/// Runs a membership RPC of group `shard` against its leader: starting at `start` (this node's
/// cluster address), following the leader address each non-leader answers with, a few hops at
/// most.
pub(crate) async fn on_group_leader<F, Fut>(
    start: String,
    tls: Option<&ClusterTls>,
    call: F,
) -> Result<(), AdminError>
where
    F: Fn(pb::cluster_service_client::ClusterServiceClient<tonic::transport::Channel>) -> Fut,
    Fut: Future<Output = Result<Option<String>, tonic::Status>>,
{
    let mut addr = start;
    for _ in 0..4 {
        let client = cluster_client(&addr, tls).map_err(|e| AdminError::Rpc(e.to_string()))?;
        let call = tokio::time::timeout(ADMIN_TIMEOUT, call(client))
            .await
            .map_err(|_| AdminError::Timeout(ADMIN_TIMEOUT))?;
        match call {
            Ok(None) => return Ok(()),
            Ok(Some(leader)) => addr = leader,
            Err(status)
                if status.code() == tonic::Code::Unavailable
                    && status.message() == crate::grpc::NO_LEADER =>
            {
                return Err(AdminError::NoLeader);
            }
            Err(status) => return Err(AdminError::Rpc(status.message().to_owned())),
        }
    }
    Err(AdminError::NoLeader)
}

/// Adds node `node_id` to every group (as `RaftNode::add_node`): concurrently, each through
/// its leader; idempotent, so a retry completes what an interrupted call left.
pub(crate) async fn add_to_every_group(
    groups: &Groups,
    start: String,
    tls: Option<&ClusterTls>,
    node_id: NodeId,
    node: ClusterNode,
) -> Result<(), AdminError> {
    let calls = groups.iter().map(|(shard, _)| {
        let req = pb::JoinRequest {
            node_id,
            node: Some(pb::Node {
                cluster_addr: node.cluster_addr.clone(),
                mqtt_addr: node.mqtt_addr.clone(),
            }),
            shard_id: u64::from(shard.get()),
            // The node checks its own count when it asks to join.
            shards: 0,
        };
        on_group_leader(start.clone(), tls, move |mut client| {
            let req = req.clone();
            async move {
                client
                    .join(req)
                    .await
                    .map(|r| r.into_inner().leader.map(|l| l.cluster_addr))
            }
        })
    });
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .collect()
}

/// Removes node `node_id` from every group (as `RaftNode::remove_node`): the data group last,
/// so a removal interrupted midway still finds the node a member there and can be retried
/// (removing it from a group it already left is a no-op).
pub(crate) async fn remove_from_every_group(
    groups: &Groups,
    start: String,
    tls: Option<&ClusterTls>,
    node_id: NodeId,
) -> Result<(), AdminError> {
    let shards: Vec<ShardId> = groups.iter().map(|(shard, _)| shard).collect();
    for shard in shards.into_iter().rev() {
        let req = pb::LeaveRequest {
            node_id,
            shard_id: u64::from(shard.get()),
        };
        on_group_leader(start.clone(), tls, move |mut client| async move {
            client
                .leave(req)
                .await
                .map(|r| r.into_inner().leader.map(|l| l.cluster_addr))
        })
        .await?;
    }
    Ok(())
}

/// Exports [`SHARD_LEADERS`] and [`SHARD_REPLICAS`] every second, until aborted.
pub(crate) async fn export_shard_metrics(groups: Arc<Groups>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (leaders, replicas) = groups.leaders_and_replicas();
        metrics::gauge!(SHARD_LEADERS).set(leaders as f64);
        metrics::gauge!(SHARD_REPLICAS).set(replicas as f64);
    }
}
