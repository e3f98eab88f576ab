//! A node's Raft groups: opening the store, starting openraft (one group per data shard,
//! [`crate::groups`]), deterministic bootstrap and joining, readiness and status.
//!
//! Bootstrap: a node with no seeds, or node 1 (StatefulSet ordinal 0), initializes every group
//! with itself as the only voter when its store is empty. Every other node keeps asking its
//! seeds to add it to every group (`ClusterService.Join`, per group: the group's leader adds it
//! as a learner, waits until it has caught up, then promotes it to voter). A node restarted
//! with its data dir needs neither: memberships and votes are on disk, so a whole-cluster cold
//! restart recovers by itself. The data group (shard 1) drives everything else: readiness,
//! the lease, the feed, proposals and declarations.

use crate::convert::WallClock;
use crate::convert::change_from_proto;
use crate::durability::RaftDurability;
use crate::groups::{Groups, ShardStatus};
use crate::network::{ClusterTls, Faults};
use crate::peers::PeerPool;
use crate::state_machine::{Applied, Feed, StateMachine};
use crate::types::{ClusterNode, DATA_SHARD, NodeId, Raft};
use openraft::{Config, ServerState, SnapshotPolicy};
use raftmq_core::Broker;
use raftmq_core::shard::ShardCount;
use raftmq_store::{Store, StoreError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// How this node takes part in the cluster.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub node_id: NodeId,
    /// host:port peers use to reach this node's cluster gRPC endpoint.
    pub advertise_addr: String,
    /// host:port of this node's MQTT listener (shared with peers for redirects).
    pub mqtt_addr: String,
    /// Cluster addresses of other nodes to join through.
    pub seeds: Vec<String>,
    /// Where the Raft log and state live.
    pub data_dir: PathBuf,
    /// Raft timing and log compaction.
    pub tuning: RaftTuning,
    /// Fault injection on this node's outgoing Raft traffic (tests only).
    pub faults: Faults,
    /// Mutual TLS for every outgoing cluster connection (Raft, join, forwarded proposals,
    /// membership changes, live forwarding); `None`: plain gRPC. The cluster endpoint this
    /// node serves must be configured to match (`raftmq_server::ClusterServer::bind`).
    pub tls: Option<ClusterTls>,
    /// `cluster.shards`: the number of data groups, fixed when the cluster is created (recorded
    /// in the store at the first start; a start with another count is refused).
    pub shards: ShardCount,
}

impl NodeOptions {
    /// Options for node `node_id` with default tuning and no fault injection.
    pub fn new(
        node_id: NodeId,
        advertise_addr: String,
        mqtt_addr: String,
        seeds: Vec<String>,
        data_dir: PathBuf,
    ) -> Self {
        NodeOptions {
            node_id,
            advertise_addr,
            mqtt_addr,
            seeds,
            data_dir,
            tuning: RaftTuning::default(),
            faults: None,
            tls: None,
            shards: ShardCount::ONE,
        }
    }
}

/// Raft timing and log compaction settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RaftTuning {
    /// Leader heartbeat period, ms.
    pub heartbeat_ms: u64,
    /// A follower that hears no leader for a random time in [min, max) ms starts an election.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Build a snapshot (and compact the log) after this many entries since the last one.
    pub snapshot_every: u64,
    /// Log entries kept behind a snapshot, so a briefly lagging follower catches up from the
    /// log instead of a full snapshot.
    pub keep_after_snapshot: u64,
    /// A shard other than shard 1 with nothing appended for this long stops its heartbeats
    /// ([`crate::quiesce`]); 0: never. Only with more than one shard.
    pub quiesce_after_ms: u64,
}

impl Default for RaftTuning {
    fn default() -> Self {
        RaftTuning {
            heartbeat_ms: 200,
            election_timeout_min_ms: 1000,
            election_timeout_max_ms: 2000,
            snapshot_every: 10_000,
            keep_after_snapshot: 1_000,
            quiesce_after_ms: crate::quiesce::QUIESCE_AFTER.as_millis() as u64,
        }
    }
}

/// Errors starting the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("opening the store")]
    Store(#[from] StoreError),
    #[error("invalid Raft configuration")]
    Config(#[from] openraft::ConfigError),
    #[error("starting Raft")]
    Raft(#[from] openraft::error::Fatal<NodeId>),
    #[error("reading the Raft log")]
    Storage(#[from] openraft::StorageError<NodeId>),
    /// The configured shard count is not the one the data dir's cluster was created with.
    #[error(
        "cluster.shards is {configured}, but the data dir {} belongs to a cluster created with \
         cluster.shards = {recorded}: the shard count is fixed when a cluster is created (set \
         cluster.shards = {recorded}, or start on an empty data dir to create a new cluster)",
        data_dir.display()
    )]
    ShardCount {
        configured: u32,
        recorded: u32,
        data_dir: PathBuf,
    },
    #[error("initializing the cluster")]
    Initialize(
        #[from]
        openraft::error::RaftError<NodeId, openraft::error::InitializeError<NodeId, ClusterNode>>,
    ),
    /// The stored state could not be read: the node refuses to start rather than serve clients
    /// without the sessions it holds (the data is left as it is).
    #[error("cannot read the stored state in {}", data_dir.display())]
    Unreadable { data_dir: PathBuf },
}

/// How long a membership change may take (adding a node waits for it to catch up).
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a membership change failed.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("node {0} is not a member of the cluster")]
    UnknownNode(NodeId),
    #[error("node {0} is the only member: removing it would destroy the cluster")]
    LastNode(NodeId),
    #[error("no leader is known (no quorum?); try again later")]
    NoLeader,
    #[error("the membership change did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the leader refused the change: {0}")]
    Rpc(String),
}

/// A running Raft node.
pub struct RaftNode {
    /// The data group (shard 1): the state the broker reads, proposals, declarations.
    pub raft: Raft,
    /// Every data group, shard 1 included ([`crate::groups`]).
    groups: Arc<Groups>,
    /// The node's channels to its peers, shared by every group.
    pool: Arc<PeerPool>,
    shard_metrics_task: tokio::task::JoinHandle<()>,
    pub durability: Arc<RaftDurability>,
    pub node_id: NodeId,
    faults: Faults,
    tls: Option<ClusterTls>,
    feed: Feed,
    feed_task: Option<tokio::task::JoinHandle<()>>,
    forward: crate::forward::ForwardGrpc,
    forward_task: Option<tokio::task::JoinHandle<()>>,
    liveness_task: Option<tokio::task::JoinHandle<()>>,
    /// Replaces a leader whose process is gone ([`crate::election`]).
    election_task: Option<tokio::task::JoinHandle<()>>,
    /// Settles the wills of this node's previous process (`settle_predecessor`).
    settle_task: Option<tokio::task::JoinHandle<()>>,
    /// Quiesces idle shards and sends node heartbeats ([`crate::quiesce`]; several shards).
    quiesce_task: Option<tokio::task::JoinHandle<()>>,
    /// The forwarding links (once forwarding started): which peers are reachable.
    hub: Option<Arc<crate::forward::ForwardHub>>,
    join_task: Option<tokio::task::JoinHandle<()>>,
    metrics_task: tokio::task::JoinHandle<()>,
    /// When a leader last reached this node (recorded by the Raft service).
    contact: Arc<crate::grpc::LeaderContact>,
    /// How far the log is mirrored into the broker (once [`RaftNode::feed_broker`] ran).
    mirrored: Option<crate::forward::MirrorProgress>,
    /// Set by the feed when a snapshot install made it let go of the persistent sessions held
    /// here: the liveness task takes back those this node still owns, as after a self-fence.
    reload: Arc<std::sync::atomic::AtomicBool>,
    /// The last declaration of this node down applied when this process started.
    declared_at_start: u64,
}

pub const RAFT_TERM: &str = "raftmq_raft_term";
pub const RAFT_IS_LEADER: &str = "raftmq_raft_is_leader";
pub const RAFT_LEADER_ID: &str = "raftmq_raft_leader_id";
pub const RAFT_LAST_LOG_INDEX: &str = "raftmq_raft_last_log_index";
pub const RAFT_LAST_APPLIED_INDEX: &str = "raftmq_raft_last_applied_index";
pub const RAFT_SNAPSHOT_INDEX: &str = "raftmq_raft_snapshot_index";
pub const RAFT_VOTERS: &str = "raftmq_raft_voters";
pub const RAFT_LEADER_CHANGES_TOTAL: &str = "raftmq_raft_leader_changes_total";

/// Copies openraft's metrics into the registry every second (bounded labels: none).
async fn export_metrics(raft: Raft, store: Store) {
    let mut rx = raft.metrics();
    let mut size_exported = tokio::time::Instant::now();
    store.export_metrics();
    let mut last_leader = None;
    loop {
        {
            let m = rx.borrow_and_update();
            metrics::gauge!(RAFT_TERM).set(m.current_term as f64);
            metrics::gauge!(RAFT_IS_LEADER)
                .set(f64::from(u8::from(m.state == ServerState::Leader)));
            metrics::gauge!(RAFT_LEADER_ID).set(m.current_leader.unwrap_or(0) as f64);
            metrics::gauge!(RAFT_LAST_LOG_INDEX).set(m.last_log_index.unwrap_or(0) as f64);
            metrics::gauge!(RAFT_LAST_APPLIED_INDEX)
                .set(m.last_applied.map_or(0, |l| l.index) as f64);
            metrics::gauge!(RAFT_SNAPSHOT_INDEX).set(m.snapshot.map_or(0, |l| l.index) as f64);
            metrics::gauge!(RAFT_VOTERS)
                .set(m.membership_config.membership().voter_ids().count() as f64);
            if m.current_leader != last_leader {
                if m.current_leader.is_some() {
                    metrics::counter!(RAFT_LEADER_CHANGES_TOTAL).increment(1);
                }
                last_leader = m.current_leader;
            }
        }
        if size_exported.elapsed() >= Duration::from_secs(10) {
            store.export_metrics();
            size_exported = tokio::time::Instant::now();
        }
        tokio::select! {
            changed = rx.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// A leader without a quorum acknowledgement for this long reports not-ready.
const QUORUM_STALE_MS: u64 = 3_000;

/// Whether a node in state `m` can commit durable writes: as leader, a quorum acknowledged it
/// recently (openraft keeps a cut-off leader as leader); as follower or learner, a leader is
/// known.
fn can_commit(m: &openraft::RaftMetrics<NodeId, ClusterNode>) -> bool {
    match m.state {
        ServerState::Leader => m
            .millis_since_quorum_ack
            .is_some_and(|ms| ms < QUORUM_STALE_MS),
        ServerState::Follower | ServerState::Learner => m.current_leader.is_some(),
        _ => false,
    }
}

/// What `GET /api/v1/cluster` reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterStatus {
    pub node_id: NodeId,
    pub state: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: Option<u64>,
    pub last_applied: Option<u64>,
    pub voters: Vec<NodeId>,
    pub nodes: BTreeMap<NodeId, ClusterNode>,
    pub healthy: bool,
    /// `cluster.shards`.
    pub shard_count: u32,
    /// Every data group as this node sees it.
    pub shards: Vec<ShardStatus>,
}

#[allow(
    clippy::result_large_err,
    reason = "openraft's error type, returned once at startup"
)]
pub(crate) fn raft_config(t: &RaftTuning) -> Result<Config, openraft::ConfigError> {
    Config {
        cluster_name: "raftmq".into(),
        heartbeat_interval: t.heartbeat_ms,
        election_timeout_min: t.election_timeout_min_ms,
        election_timeout_max: t.election_timeout_max_ms,
        install_snapshot_timeout: 10_000,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(t.snapshot_every),
        max_in_snapshot_log_to_keep: t.keep_after_snapshot,
        // Bounds one AppendEntries (each entry is a group-commit batch): see MAX_MESSAGE_BYTES.
        max_payload_entries: 64,
        ..Default::default()
    }
    .validate()
}

impl RaftNode {
    /// Opens the store under `data_dir/raft`, starts Raft and bootstraps or joins as needed.
    ///
    /// A store written by a single-group release (format 1) is migrated to format 2 first
    /// ([`crate::upgrade::migrate_store`], on a blocking thread: it copies the whole store).
    pub async fn start(opts: NodeOptions) -> Result<RaftNode, NodeError> {
        let store_path = opts.data_dir.join("raft");
        let migrated = {
            let path = store_path.clone();
            tokio::task::spawn_blocking(move || crate::upgrade::migrate_store(&path)).await
        };
        match migrated {
            Ok(outcome) => drop(outcome?),
            Err(join) => {
                return Err(NodeError::Store(StoreError::Migration {
                    path: store_path,
                    step: "running the migration thread".to_owned(),
                    source: Box::new(StoreError::Io(std::io::Error::other(join.to_string()))),
                }));
            }
        }
        let store = Store::open(&store_path)?;
        let shards = crate::groups::settle_shard_count(&store, opts.shards, &opts.data_dir).await?;
        if shards.get() > 1 {
            warn!(
                shards = shards.get(),
                "cluster.shards > 1 is a preview: the durable path over several shards is not \
                 yet proven under failures (docs/cluster.md, docs/reliability.md); use 1 in \
                 production"
            );
        }
        let pool = Arc::new(PeerPool::new(opts.tls.clone()));
        let config = Arc::new(raft_config(&opts.tuning)?);
        // Every group's state machine reports to one feed (the broker's mirror of all shards).
        let feed = crate::state_machine::Feed::default();
        let mut handles = Vec::new();
        let mut rafts = Vec::new();
        let mut declared_at_start = 0;
        for shard in shards.shards() {
            let state_machine =
                StateMachine::open_with_feed(store.state_db(shard.get()), feed.clone())?;
            // The batcher learns from the applying state machine which fences of its batches
            // held.
            let fence_notes = state_machine.fence_notes().clone();
            fence_notes.set_owner(opts.node_id);
            let reader = StateMachine::open(store.state_db(shard.get()))?;
            if shard == DATA_SHARD {
                // Whether this node's previous process was declared down is told by a
                // declaration applied after what that process had applied (see
                // `settle_predecessor`).
                declared_at_start =
                    reader
                        .declared_down_at(opts.node_id)
                        .map_err(|_| NodeError::Unreadable {
                            data_dir: opts.data_dir.clone(),
                        })?;
            }
            let raft = crate::groups::start_group(
                shard,
                opts.node_id,
                config.clone(),
                pool.clone(),
                opts.faults.clone(),
                &store,
                state_machine,
            )
            .await?;
            rafts.push(raft.clone());
            handles.push(crate::durability::ShardHandle {
                raft,
                fence_notes,
                reader,
            });
        }
        let raft = rafts[0].clone();
        let groups = Arc::new(Groups::new(rafts));
        let me = ClusterNode {
            cluster_addr: opts.advertise_addr.clone(),
            mqtt_addr: opts.mqtt_addr.clone(),
        };
        // Every group has its membership on disk once this node bootstrapped or joined it: one
        // without is new here (or its bootstrap or join was interrupted).
        let uninitialized = crate::groups::uninitialized(&groups).await;
        let mut join_task = None;
        if !uninitialized.is_empty() {
            if opts.seeds.is_empty() || opts.node_id == 1 {
                info!(
                    node_id = opts.node_id,
                    shards = shards.get(),
                    "initializing a new cluster"
                );
                crate::groups::initialize(&groups, &uninitialized, opts.node_id, &me).await?;
            } else {
                // The seed list may name this node too (a StatefulSet lists every pod).
                let seeds: Vec<String> = opts
                    .seeds
                    .iter()
                    .filter(|s| **s != opts.advertise_addr)
                    .cloned()
                    .collect();
                join_task = Some(tokio::spawn(crate::groups::join_loop(
                    crate::groups::Joiner {
                        groups: groups.clone(),
                        node_id: opts.node_id,
                        me,
                        seeds,
                        tls: opts.tls.clone(),
                    },
                )));
            }
        }
        let durability = RaftDurability::start(
            handles,
            Some(store.clone()),
            opts.node_id,
            WallClock::now(),
            opts.faults.clone(),
            opts.tls.clone(),
        )
        .map_err(|_| NodeError::Unreadable {
            data_dir: opts.data_dir.clone(),
        })?;
        let metrics_task = tokio::spawn(export_metrics(raft.clone(), store.clone()));
        let shard_metrics_task = tokio::spawn(crate::groups::export_shard_metrics(groups.clone()));
        let quiesce_task = (shards.get() > 1 && opts.tuning.quiesce_after_ms > 0).then(|| {
            tokio::spawn(crate::quiesce::run(
                groups.clone(),
                opts.node_id,
                pool.clone(),
                opts.faults.clone(),
                Duration::from_millis(opts.tuning.quiesce_after_ms),
            ))
        });
        Ok(RaftNode {
            raft,
            groups,
            pool,
            shard_metrics_task,
            durability,
            node_id: opts.node_id,
            faults: opts.faults.clone(),
            tls: opts.tls,
            feed,
            feed_task: None,
            forward: crate::forward::ForwardGrpc::default(),
            forward_task: None,
            hub: None,
            liveness_task: None,
            election_task: None,
            settle_task: None,
            quiesce_task,
            join_task,
            metrics_task,
            contact: Arc::default(),
            mirrored: None,
            reload: Arc::default(),
            declared_at_start,
        })
    }

    /// Waits until this node can serve from complete state: in every shard, a leader is
    /// known and a read barrier (an empty batch committed through the leader) has been applied
    /// locally, so everything committed before it (including entries this node missed while
    /// down) is in the local state machines. Returns false on timeout.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        for (shard, raft) in self.groups.iter() {
            if !self.shard_ready(shard, raft, deadline).await {
                return false;
            }
        }
        true
    }

    async fn shard_ready(
        &self,
        shard: crate::types::ShardId,
        raft: &Raft,
        deadline: tokio::time::Instant,
    ) -> bool {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let leader = raft
            .wait(Some(left))
            .metrics(|m| m.current_leader.is_some(), "leader known")
            .await;
        if leader.is_err() {
            return false;
        }
        let barrier = crate::convert::encode_shard_batch(shard, &[], &WallClock::now());
        loop {
            if let Ok(index) = crate::durability::commit(
                raft,
                shard,
                barrier.clone(),
                &self.faults,
                self.tls.as_ref(),
            )
            .await
            {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                return raft
                    .wait(Some(left))
                    .metrics(
                        |m| m.last_applied.is_some_and(|l| l.index >= index),
                        "read barrier applied",
                    )
                    .await
                    .is_ok();
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether durable writes can commit now: as leader, a quorum acknowledged it recently
    /// (openraft keeps a leader that lost its quorum as leader); as follower or learner, a
    /// leader is known. Drives `/readyz`.
    pub fn is_ready(&self) -> bool {
        can_commit(&self.raft.metrics().borrow())
    }

    /// A snapshot of the node's Raft status.
    /// The MQTT address of another member to send clients to when this node cannot serve
    /// them durably (MQTT 5 Server Reference): the leader this node knows, else another
    /// member, preferring members whose forwarding stream is up (a leader that just died is
    /// still "the leader" here until the election).
    pub fn redirect_target(&self) -> Option<String> {
        let m = self.raft.metrics().borrow().clone();
        let me = m.id;
        let reachable = |id: NodeId| self.hub.as_ref().is_none_or(|h| h.down_for(id).is_none());
        let mut candidates: Vec<(bool, bool, NodeId, String)> = m
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, n)| **id != me && !n.mqtt_addr.is_empty())
            .map(|(id, n)| {
                (
                    reachable(*id),
                    m.current_leader == Some(*id),
                    *id,
                    n.mqtt_addr.clone(),
                )
            })
            .collect();
        // Reachable first, then the leader, then by id (stable).
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(&b.2)));
        candidates.into_iter().next().map(|(_, _, _, addr)| addr)
    }

    pub fn status(&self) -> ClusterStatus {
        let m = self.raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        ClusterStatus {
            node_id: m.id,
            state: format!("{:?}", m.state),
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            last_applied: m.last_applied.map(|l| l.index),
            voters: membership.voter_ids().collect(),
            nodes: membership.nodes().map(|(id, n)| (*id, n.clone())).collect(),
            healthy: can_commit(&m),
            shard_count: self.groups.count(),
            shards: self.groups.status(),
        }
    }

    /// Every data group of this node (shard 1 is [`RaftNode::raft`]).
    pub fn groups(&self) -> &Arc<Groups> {
        &self.groups
    }

    /// The node's channels to its peers, shared by every group.
    pub fn peer_pool(&self) -> &Arc<PeerPool> {
        &self.pool
    }

    /// Adds node `node_id` (reachable at `node`) to the cluster: to every group, as a learner
    /// first, promoted to voter once it has caught up. Runs on each group's leader, found by
    /// following redirects from this node. Idempotent: adding a member again only (re)promotes
    /// it, and completes the groups an interrupted call left.
    pub async fn add_node(&self, node_id: NodeId, node: ClusterNode) -> Result<(), AdminError> {
        let start = self.own_cluster_addr()?;
        crate::groups::add_to_every_group(&self.groups, start, self.tls.as_ref(), node_id, node)
            .await
    }

    /// Removes node `node_id` from the voters and then from the membership of every group
    /// (scale-in), the data group last. The remaining voters must still form a quorum.
    pub async fn remove_node(&self, node_id: NodeId) -> Result<(), AdminError> {
        let members = self.status().nodes;
        if !members.contains_key(&node_id) {
            return Err(AdminError::UnknownNode(node_id));
        }
        if members.len() == 1 {
            return Err(AdminError::LastNode(node_id));
        }
        let start = self.own_cluster_addr()?;
        crate::groups::remove_from_every_group(&self.groups, start, self.tls.as_ref(), node_id)
            .await
    }

    /// This node's cluster address, where membership changes start looking for a leader.
    fn own_cluster_addr(&self) -> Result<String, AdminError> {
        let me = self.status();
        me.nodes
            .get(&me.node_id)
            .map(|n| n.cluster_addr.clone())
            .ok_or(AdminError::NoLeader)
    }

    /// The log index up to which the broker fed by [`RaftNode::feed_broker`] has mirrored the
    /// applied state (0 before).
    pub fn mirrored_index(&self) -> u64 {
        self.mirrored_index_of(DATA_SHARD)
    }

    /// [`RaftNode::mirrored_index`] of shard `shard`'s log.
    pub fn mirrored_index_of(&self, shard: crate::types::ShardId) -> u64 {
        let Some(i) = usize::try_from(shard.get())
            .ok()
            .and_then(|s| s.checked_sub(1))
        else {
            return 0;
        };
        self.mirrored
            .as_ref()
            .map_or(0, |w| w.borrow().get(i).copied().unwrap_or(0))
    }

    /// Mirrors into `broker` what other nodes commit (retained messages, session claims: see
    /// [`Broker::apply_replicated`]), in log order, from now on. Call it before
    /// [`Broker::recover`] so nothing applied in between is missed (mirroring is idempotent).
    pub fn feed_broker(&mut self, broker: Arc<Broker>) {
        let Some(mut rx) = self.feed.subscribe() else {
            warn!("the applied-change feed already has a listener");
            return;
        };
        let me = self.node_id;
        let clock = WallClock::now();
        let durability = self.durability.clone();
        // How far each shard's log is mirrored into the broker (`[i]`: shard `i + 1`;
        // forwarded messages may wait for it).
        let shards = usize::try_from(self.groups.count()).unwrap_or(1);
        let (progress, watching) = tokio::sync::watch::channel(vec![0u64; shards]);
        self.mirrored = Some(watching.clone());
        self.forward.set_mirror_progress(watching);
        let groups = self.groups.clone();
        let reload = self.reload.clone();
        // The deliveries kept from this node's own commits reported failed are queued while
        // their batch is applied: before any later commit of this node completes and queues
        // its own deliveries (their order), not later through this task.
        let own = broker.clone();
        self.feed
            .on_own_stored(me, move |stored| own.own_stored_applied(stored));
        self.feed_task = Some(tokio::spawn(async move {
            // The log index of the last declaration of this node the broker has seen (one
            // inside a snapshot installed here is seen only through the state).
            let mut declared_seen = durability.declared_down_at();
            while let Some(applied) = rx.recv().await {
                match applied {
                    Applied::Progress { shard, index } => {
                        advance(&progress, shard, index);
                    }
                    Applied::Batch {
                        shard,
                        index,
                        batch,
                    } => {
                        // This node's own batches are in its broker already (the deliveries
                        // of its commits reported failed were queued during the apply:
                        // `on_own_stored` above).
                        if batch.origin_node != me {
                            let mut changes: Vec<_> = batch
                                .changes
                                .into_iter()
                                .filter_map(|c| change_from_proto(c, &clock).ok())
                                .collect();
                            let declared_here = changes.iter().any(
                                |c| matches!(c, raftmq_core::durability::StateChange::NodeDown { node, .. } if *node == me),
                            );
                            if shard != DATA_SHARD.get() {
                                // Declarations are the control shard's to mirror; one in
                                // another shard gave that shard's sessions of the node to
                                // the declaring node.
                                changes.retain(|c| {
                                    !matches!(
                                        c,
                                        raftmq_core::durability::StateChange::NodeDown { .. }
                                    )
                                });
                                if declared_here {
                                    let count = groups.shard_count();
                                    let fenced =
                                        broker.fence_durable_sessions_where(None, |client_id| {
                                            raftmq_core::shard::shard_of(
                                                client_id.as_bytes(),
                                                count,
                                            )
                                            .get()
                                                == shard
                                        });
                                    // Those it still owns elsewhere are taken back after a
                                    // barrier, as when a quorum is regained.
                                    reload.store(true, std::sync::atomic::Ordering::SeqCst);
                                    warn!(
                                        shard,
                                        fenced,
                                        "this node was declared down in a shard: its sessions \
                                         there let go of"
                                    );
                                }
                            } else if declared_here {
                                declared_seen = index;
                                // Declared in the control shard: the broker lets go of every
                                // session below. Those of shards where the declaration was
                                // void are still this node's: taken back after a barrier.
                                if groups.count() > 1 {
                                    reload.store(true, std::sync::atomic::Ordering::SeqCst);
                                }
                            }
                            broker.apply_replicated(index, &changes, std::time::Instant::now());
                        }
                        advance(&progress, shard, index);
                    }
                    Applied::SnapshotInstalled { shard } => {
                        // The shard's whole state was replaced: take its retained messages
                        // and the subscriptions of its persistent sessions not held here from
                        // it (the other shards' are untouched). Retried until the store can be
                        // read: the mirror stays as it was meanwhile (logged as an error each
                        // time).
                        let shard_id = crate::types::ShardId::new(shard);
                        let count = groups.shard_count();
                        let in_shard =
                            move |key: &[u8]| raftmq_core::shard::shard_of(key, count) == shard_id;
                        let recovered = loop {
                            match durability.mirror_image_of(shard_id) {
                                Ok(image) => break image,
                                Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                            }
                        };
                        let now = std::time::Instant::now();
                        let index = groups
                            .get(crate::types::ShardId::new(shard))
                            .map_or(0, |raft| {
                                raft.metrics().borrow().last_applied.map_or(0, |l| l.index)
                            });
                        // Declared down in the part of the control shard's log the snapshot
                        // replaced: what applying that declaration does here (every
                        // persistent session let go of, the wills of sessionless connections
                        // left to the declaring node) is done now.
                        let declared = durability.declared_down_at();
                        if shard == DATA_SHARD.get()
                            && declared != u64::MAX
                            && declared > declared_seen
                        {
                            declared_seen = declared;
                            warn!(
                                declared,
                                "snapshot installed: this node was declared down meanwhile"
                            );
                            broker.apply_replicated(
                                index,
                                &[raftmq_core::durability::StateChange::NodeDown {
                                    node: me,
                                    seen: 0,
                                    wills: durability.declared_wills(),
                                }],
                                now,
                            );
                        }
                        // The sessions of the shard held here missed what the compacted part
                        // of its log did to them (a claim through another node, messages
                        // stored for them): let go of every one, as on a self-fence
                        // (connected clients are sent elsewhere and resume from the
                        // replicated state), and take back those this node still owns once a
                        // barrier commits (the liveness task, as when a quorum is regained).
                        let fenced = broker.fence_durable_sessions_where(
                            Some(raftmq_codec::ReasonCode::USE_ANOTHER_SERVER),
                            |client_id| in_shard(client_id.as_bytes()),
                        );
                        if fenced > 0 {
                            reload.store(true, std::sync::atomic::Ordering::SeqCst);
                            warn!(
                                fenced,
                                "snapshot installed: persistent sessions held here let go of, \
                                 to be taken back from the new state"
                            );
                        }
                        broker.replace_retained_where(recovered.retained, |topic| {
                            in_shard(topic.as_bytes())
                        });
                        broker.replace_remote_subscriptions_where(
                            recovered.remote_subscriptions,
                            |client_id| in_shard(client_id.as_bytes()),
                        );
                        advance(&progress, shard, index);
                    }
                }
            }
        }));
    }

    /// The gRPC services this node serves on its cluster address: Raft, cluster
    /// administration and live forwarding.
    pub fn grpc_routes(&self) -> tonic::service::Routes {
        self.raft_routes().add_service(self.forward.service())
    }

    /// The Raft and cluster administration services alone (every group), without live
    /// forwarding.
    pub fn raft_routes(&self) -> tonic::service::Routes {
        crate::grpc::routes_with(self.groups.clone(), Some(self.contact.clone()))
    }

    /// Starts live forwarding between `broker` and the other members' brokers (see
    /// [`crate::forward`]).
    pub fn start_forwarding(&mut self, broker: Arc<Broker>) {
        self.forward.set_broker(broker.clone());
        let (hub, task) = crate::forward::ForwardHub::start(
            self.raft.clone(),
            self.node_id,
            broker.clone(),
            self.tls.clone(),
            self.faults.clone(),
        );
        self.forward_task = Some(task);
        self.hub = Some(hub.clone());
        // Every shard replaces a dead leader at once, not after its election timeout.
        let (groups, me, watch) = (self.groups.clone(), self.node_id, hub.clone());
        self.election_task = Some(tokio::spawn(async move {
            let each = groups.iter().map(|(_, raft)| {
                crate::election::replace_dead_leader(raft.clone(), me, watch.clone())
            });
            futures_util::future::join_all(each).await;
        }));
        self.settle_task = Some(tokio::spawn(settle_predecessor(
            self.durability.clone(),
            broker.clone(),
            self.declared_at_start,
        )));
        self.liveness_task = Some(tokio::spawn(declare_down_nodes(
            self.groups.clone(),
            self.node_id,
            self.durability.clone(),
            hub,
            broker,
            self.contact.clone(),
            self.reload.clone(),
        )));
    }

    /// Stops Raft (the store is closed when the last handle drops).
    pub async fn shutdown(mut self) {
        for t in [
            self.forward_task.take(),
            self.liveness_task.take(),
            self.election_task.take(),
            self.settle_task.take(),
            self.quiesce_task.take(),
        ]
        .into_iter()
        .flatten()
        {
            t.abort();
        }
        if let Some(t) = self.feed_task.take() {
            t.abort();
        }
        if let Some(t) = self.join_task.take() {
            t.abort();
        }
        self.metrics_task.abort();
        self.shard_metrics_task.abort();
        self.groups.shutdown_others().await;
        if let Err(e) = self.raft.shutdown().await {
            warn!(error = %e, "raft shutdown failed");
        }
    }
}

/// A member whose forwarding stream has been down this long is declared down by the leader.
pub const NODE_DOWN_AFTER: Duration = Duration::from_secs(10);

/// A member whose cluster port has refused every connection this long is declared down by the
/// leader without waiting for [`NODE_DOWN_AFTER`]: nothing listens there, so its process is
/// gone and can serve no session (its MQTT listeners live in the same process). A process
/// restarted on the same data dir meanwhile applies the `NodeDown` naming it and lets go of
/// the sessions it restored, as on any declaration. A partition or a hung process never looks
/// like this (connections time out, or are accepted), so the self-fencing margin below is
/// unaffected.
pub const DEAD_AFTER_REFUSED: Duration = Duration::from_millis(1500);

/// A node that could not commit for this long lets go of its persistent sessions (its clients
/// are sent elsewhere with 0x9C Use another server) before the rest of the cluster may declare
/// it down ([`NODE_DOWN_AFTER`]) and adopt them: a partitioned node never serves a session the
/// majority has handed to someone else.
pub const SELF_FENCE_AFTER: Duration = Duration::from_secs(5);

// A node notices it cannot commit QUORUM_STALE_MS after it last heard from a quorum (a leader)
// or from a leader (a follower: `grpc::LeaderContact`), and counts its time without one from
// that last contact, so it fences itself SELF_FENCE_AFTER after it, plus the liveness tick's
// lateness. The cluster declares it down NODE_DOWN_AFTER after its forwarding stream went down,
// which is no earlier than that last contact: the margin left is for a loaded machine.
const FENCE_MARGIN_MS: u128 = 3_000;
const _: () = assert!(
    SELF_FENCE_AFTER.as_millis() + 2 * LIVENESS_TICK.as_millis() + FENCE_MARGIN_MS
        < NODE_DOWN_AFTER.as_millis()
);

pub const SELF_FENCES_TOTAL: &str = "raftmq_cluster_self_fences_total";

pub const NODES_DECLARED_DOWN_TOTAL: &str = "raftmq_cluster_nodes_declared_down_total";
pub const SESSIONS_ADOPTED_TOTAL: &str = "raftmq_cluster_sessions_adopted_total";
/// Wills of a dead node's sessionless connections published by the node that declared it down.
pub const DEAD_NODE_WILLS_TOTAL: &str = "raftmq_cluster_dead_node_wills_total";

/// On the leader: declares down, by a committed `NodeDown`, every member whose stream has been
/// down for [`NODE_DOWN_AFTER`] (or whose cluster port has refused connections for
/// [`DEAD_AFTER_REFUSED`]: its process is gone), then adopts its persistent sessions into `broker` (offline,
/// their wills and expiry timers running here). Once a declared node's stream is back, a later
/// failure is declared again.
async fn declare_down_nodes(
    groups: Arc<Groups>,
    me: NodeId,
    durability: Arc<RaftDurability>,
    hub: Arc<crate::forward::ForwardHub>,
    broker: Arc<Broker>,
    contact: Arc<crate::grpc::LeaderContact>,
    reload: Arc<std::sync::atomic::AtomicBool>,
) {
    use raftmq_core::durability::{Durability, StateChange};
    let mut declared: std::collections::HashSet<NodeId> = std::collections::HashSet::new();
    // Per member being declared down: the shards whose declaration has not committed yet
    // (tried again each tick; the shards where it committed are not declared twice).
    let mut pending: std::collections::HashMap<NodeId, Vec<crate::types::ShardId>> =
        std::collections::HashMap::new();
    let mut lease = Lease::default();
    // The last applied log index when this node last fenced itself.
    let mut fenced_at = 0u64;
    let raft = groups.data().clone();
    // Per member: the index of its last batch seen here in each shard, and since when they
    // are the last.
    let mut last_proposed: std::collections::HashMap<NodeId, (Vec<u64>, std::time::Instant)> =
        std::collections::HashMap::new();
    // Sessions given to this node by a committed NodeDown that it could not read yet: adopted
    // on a later tick, never dropped.
    let mut adoption_pending = false;
    loop {
        tokio::time::sleep(LIVENESS_TICK).await;
        // The feed let go of the sessions held here (a snapshot installed): taken back below as
        // when a quorum is regained, once a barrier commits.
        if reload.swap(false, std::sync::atomic::Ordering::SeqCst) {
            lease.fenced = true;
        }
        if adoption_pending {
            match durability.sessions_owned_by(me) {
                Ok(orphans) => {
                    adoption_pending = false;
                    let adopted = broker.adopt_sessions_read_at(
                        log_images("adopting", orphans),
                        std::time::Instant::now(),
                    );
                    metrics::counter!(SESSIONS_ADOPTED_TOTAL).increment(adopted as u64);
                    warn!(
                        adopted,
                        "persistent sessions of a node declared down adopted here"
                    );
                }
                Err(_) => warn!("the adopted sessions cannot be read yet; trying again"),
            }
        }
        let (leader, members): (bool, Vec<NodeId>) = {
            let m = raft.metrics().borrow().clone();
            let now = std::time::Instant::now();
            // A cut-off leader can tell when it last heard from a quorum: its time without one
            // counts from then, not from when `can_commit` turned false QUORUM_STALE_MS later,
            // so it lets go of its sessions well before the majority may declare it down.
            // A follower (or candidate) counts from the last time a leader reached it: openraft
            // keeps naming the leader for up to a lease and an election timeout after that.
            let (can, cut_off_since) = if m.state == ServerState::Leader {
                let since = m
                    .millis_since_quorum_ack
                    .and_then(|ms| now.checked_sub(Duration::from_millis(ms)));
                (can_commit(&m), since)
            } else {
                let last = contact.last();
                let silent = last.is_some_and(|t| {
                    now.saturating_duration_since(t) >= Duration::from_millis(QUORUM_STALE_MS)
                });
                (can_commit(&m) && !silent, last)
            };
            match lease.observe_since(can, now, cut_off_since) {
                LeaseEvent::Lost => {
                    let code = Some(raftmq_codec::ReasonCode::USE_ANOTHER_SERVER);
                    let fenced = broker.fence_durable_sessions(code);
                    // Connections with a will and no stored session close too; their wills
                    // wait for the outcome (published by whoever declares this node down, or
                    // here once the quorum is back if nobody did).
                    let handed = broker.hand_over_sessionless_wills(code);
                    fenced_at = m.last_applied.map_or(0, |l| l.index);
                    metrics::counter!(SELF_FENCES_TOTAL).increment(1);
                    warn!(
                        fenced,
                        wills = handed,
                        "no quorum for {SELF_FENCE_AFTER:?}: persistent sessions released, \
                         their clients sent to other nodes"
                    );
                }
                LeaseEvent::Regained => {
                    // Take back the sessions this node still owns once everything committed
                    // meanwhile is applied here (the barrier): those the cluster adopted while
                    // this node was away are no longer listed as its own.
                    // A store that cannot be read leaves the lease fenced: tried again next tick.
                    // Messages stored meanwhile for the sessions to restore are kept for them
                    // from before the barrier (see `Broker::begin_adoption`).
                    broker.begin_adoption();
                    if durability.propose(Vec::new()).await.is_ok()
                        && let Ok(owned) = durability.sessions_owned_by(me)
                    {
                        let restored = broker.adopt_sessions_read_at(
                            log_images("adopting", owned),
                            std::time::Instant::now(),
                        );
                        // Everything committed before the barrier is applied here: whether this
                        // node was declared down meanwhile is known.
                        let outcome = durability.wills_outcome_since(fenced_at);
                        let declared = outcome != raftmq_core::broker::WillsOutcome::Kept;
                        let wills =
                            broker.settle_handed_over_wills(&outcome, std::time::Instant::now());
                        lease.restored();
                        info!(
                            restored,
                            declared, wills, "quorum regained; persistent sessions restored"
                        );
                    } else {
                        broker.end_adoption();
                    }
                }
                LeaseEvent::None => {}
            }
            (
                m.state == ServerState::Leader && can_commit(&m),
                m.membership_config
                    .membership()
                    .nodes()
                    .map(|(id, _)| *id)
                    .filter(|id| *id != me)
                    .collect(),
            )
        };
        declared.retain(|n| members.contains(n) && hub.down_for(*n).is_some());
        pending.retain(|n, _| members.contains(n) && hub.down_for(*n).is_some());
        // A node whose batches still commit is in touch with a quorum, whatever its forwarding
        // stream says (a partition healing, say): never declared down. Its silence in the log
        // counts like its stream's (watched on every node, so a new leader knows it too).
        let now = std::time::Instant::now();
        last_proposed.retain(|n, _| members.contains(n));
        for &node in &members {
            let proposed = durability.last_proposed_by(node);
            if last_proposed
                .get(&node)
                .is_none_or(|(indexes, _)| *indexes != proposed)
            {
                last_proposed.insert(node, (proposed, now));
            }
        }
        if !leader {
            continue;
        }
        for node in members {
            let quiet = last_proposed
                .get(&node)
                .map_or(Duration::ZERO, |(_, since)| now.duration_since(*since));
            let gone = hub
                .refused_for(node)
                .is_some_and(|r| r >= DEAD_AFTER_REFUSED && quiet >= DEAD_AFTER_REFUSED)
                || hub
                    .down_for(node)
                    .is_some_and(|d| d >= NODE_DOWN_AFTER && quiet >= NODE_DOWN_AFTER);
            if declared.contains(&node) || !gone {
                continue;
            }
            broker.begin_adoption();
            // The wills of its sessionless connections this node knows of, published here once
            // the declaration commits; the node publishes those it held beyond them.
            let wills = broker.peer_will_ids(node);
            // One declaration per shard, each decided on what this node has applied of that
            // shard so far: void there if the node proposes anything in it that commits first
            // (it is back; see `NodeDown.seen`). The control shard's decides the wills.
            let shards = pending
                .remove(&node)
                .unwrap_or_else(|| groups.iter().map(|(shard, _)| shard).collect());
            let mut proposed = Vec::new();
            for shard in shards {
                let Some(group) = groups.get(shard) else {
                    continue;
                };
                let seen = group.metrics().borrow().last_applied.map_or(0, |l| l.index);
                let before = durability.declared_at_in(shard, node);
                let commit = durability.propose_to(
                    shard,
                    vec![StateChange::NodeDown {
                        node,
                        seen,
                        wills: Some(wills.clone()),
                    }],
                );
                proposed.push((shard, before, commit));
            }
            let mut held = Vec::new();
            let mut failed = Vec::new();
            for (shard, before, commit) in proposed {
                if commit.await.is_err() {
                    failed.push(shard);
                } else if durability.declared_at_in(shard, node) != before {
                    held.push(shard);
                }
            }
            if failed.is_empty() {
                declared.insert(node);
            } else {
                // Those shards are tried again next tick; the others are not declared twice.
                pending.insert(node, failed.clone());
            }
            if held.is_empty() {
                if !failed.is_empty() {
                    if !adoption_pending {
                        broker.end_adoption();
                    }
                    continue;
                }
                // Void: the node proposed after `seen`; it keeps its sessions and wills.
                info!(node, "declaration void: the node is back");
                if !adoption_pending {
                    broker.end_adoption();
                }
                continue;
            }
            metrics::counter!(NODES_DECLARED_DOWN_TOTAL).increment(1);
            if held.contains(&DATA_SHARD) {
                // The wills of its sessionless connections: this node declared it, so this
                // node publishes them (the others drop them when they apply the NodeDown).
                let wills = broker.publish_wills_of(node, &wills, std::time::Instant::now());
                metrics::counter!(DEAD_NODE_WILLS_TOTAL).increment(wills as u64);
                metrics::gauge!(crate::forward::FORWARD_PEER_WILLS, "peer" => node.to_string())
                    .set(0.0);
            } else if !failed.contains(&DATA_SHARD) {
                info!(
                    node,
                    shards = held.len(),
                    "declaration held in some shards only: the node keeps its wills"
                );
            }
            match durability.sessions_owned_by(me) {
                Ok(orphans) => {
                    let adopted = broker.adopt_sessions_read_at(
                        log_images("adopting", orphans),
                        std::time::Instant::now(),
                    );
                    metrics::counter!(SESSIONS_ADOPTED_TOTAL).increment(adopted as u64);
                    warn!(
                        node,
                        adopted, "node declared down; its persistent sessions adopted here"
                    );
                }
                Err(_) => {
                    adoption_pending = true;
                    warn!(node, "node declared down; its sessions cannot be read yet");
                }
            }
        }
    }
}

/// Settles the wills of this node's previous process that its peers send it (see
/// `Broker::predecessor_wills`): once a barrier commits, everything committed before this
/// process started is applied here, so a declaration of the previous process down is known
/// (applied after `declared_at_start`). Retried until the barrier commits.
async fn settle_predecessor(
    durability: Arc<RaftDurability>,
    broker: Arc<Broker>,
    declared_at_start: u64,
) {
    use raftmq_core::durability::Durability;
    loop {
        if durability.propose(Vec::new()).await.is_ok() {
            let outcome = durability.wills_outcome_since(declared_at_start);
            let declared = outcome != raftmq_core::broker::WillsOutcome::Kept;
            let published = broker.settle_predecessor_wills(outcome, std::time::Instant::now());
            metrics::counter!(crate::forward::PREDECESSOR_WILLS_TOTAL).increment(published as u64);
            if published > 0 || declared {
                info!(
                    published,
                    declared, "wills of the previous process of this node settled"
                );
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Logs (at debug) each stored session about to be adopted or restored here: which client,
/// and how many of its messages were sent and released (to follow sessions in chaos runs).
fn log_images(
    what: &str,
    images: Vec<(raftmq_core::durability::SessionImage, u64)>,
) -> Vec<(raftmq_core::durability::SessionImage, u64)> {
    for (image, read_at) in &images {
        tracing::debug!(
            client_id = %image.client_id,
            messages = image.messages.len(),
            sent = image.messages.iter().filter(|m| m.packet_id.is_some()).count(),
            released = image.messages.iter().filter(|m| m.released).count(),
            read_at,
            "{what} a stored session"
        );
    }
    images
}

/// Moves the mirrored-log watch of `shard` forward to `index` (never back), waking the
/// forwarded messages that wait for it.
fn advance(progress: &tokio::sync::watch::Sender<Vec<u64>>, shard: u32, index: u64) {
    progress.send_if_modified(|all| {
        let Some(i) = usize::try_from(shard)
            .ok()
            .and_then(|s| s.checked_sub(1))
            .and_then(|s| all.get_mut(s))
        else {
            return false;
        };
        std::mem::replace(i, index.max(*i)) < index
    });
}

/// How often liveness (dead members, this node's own lease) is checked.
const LIVENESS_TICK: Duration = Duration::from_millis(500);

/// Tracks whether this node has been able to commit recently (see [`SELF_FENCE_AFTER`]).
#[derive(Debug, Default)]
struct Lease {
    /// Since when it could not commit (`None`: it can).
    lost_since: Option<std::time::Instant>,
    /// Sessions were released and are not restored yet.
    fenced: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum LeaseEvent {
    None,
    /// Could not commit for [`SELF_FENCE_AFTER`]: release the persistent sessions.
    Lost,
    /// Can commit again after [`LeaseEvent::Lost`]: restore them (then call `restored`;
    /// until then every observation that can commit reports this again).
    Regained,
}

impl Lease {
    #[cfg(test)]
    fn observe(&mut self, can_commit: bool, now: std::time::Instant) -> LeaseEvent {
        self.observe_since(can_commit, now, None)
    }

    /// [`Lease::observe`], where `since` (if known) is when the node last could commit.
    fn observe_since(
        &mut self,
        can_commit: bool,
        now: std::time::Instant,
        since: Option<std::time::Instant>,
    ) -> LeaseEvent {
        if can_commit {
            self.lost_since = None;
            return if self.fenced {
                LeaseEvent::Regained
            } else {
                LeaseEvent::None
            };
        }
        let since = *self.lost_since.get_or_insert(since.unwrap_or(now).min(now));
        if !self.fenced && now.duration_since(since) >= SELF_FENCE_AFTER {
            self.fenced = true;
            return LeaseEvent::Lost;
        }
        LeaseEvent::None
    }

    fn restored(&mut self) {
        self.fenced = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// A cut-off leader notices only QUORUM_STALE_MS after its last quorum acknowledgement
    /// that it cannot commit, but its time without a quorum counts from that acknowledgement:
    /// it fences itself SELF_FENCE_AFTER after it, well before the majority's NODE_DOWN_AFTER.
    #[test]
    fn a_cut_off_leader_counts_its_lease_from_its_last_quorum_acknowledgement() {
        let mut lease = Lease::default();
        let acked = Instant::now();
        let noticed = acked + Duration::from_millis(QUORUM_STALE_MS);
        assert_eq!(
            lease.observe_since(false, noticed, Some(acked)),
            LeaseEvent::None
        );
        assert_eq!(
            lease.observe_since(false, acked + SELF_FENCE_AFTER, Some(acked)),
            LeaseEvent::Lost,
            "fenced SELF_FENCE_AFTER after the last acknowledgement"
        );
        assert!(SELF_FENCE_AFTER + 2 * LIVENESS_TICK < NODE_DOWN_AFTER - Duration::from_secs(3));
        // A hint in the future (clock skew between the two readings) counts as now.
        let mut lease = Lease::default();
        let now = Instant::now();
        assert_eq!(
            lease.observe_since(false, now, Some(now + SELF_FENCE_AFTER)),
            LeaseEvent::None
        );
        assert_eq!(
            lease.observe_since(false, now + SELF_FENCE_AFTER, None),
            LeaseEvent::Lost
        );
    }

    #[test]
    fn the_lease_fences_once_after_the_grace_and_restores_once_quorum_is_back() {
        let mut lease = Lease::default();
        let t0 = Instant::now();
        assert_eq!(lease.observe(true, t0), LeaseEvent::None);
        assert_eq!(lease.observe(false, t0), LeaseEvent::None);
        // A short loss (an election) does nothing.
        assert_eq!(
            lease.observe(false, t0 + SELF_FENCE_AFTER / 2),
            LeaseEvent::None
        );
        assert_eq!(lease.observe(true, t0 + SELF_FENCE_AFTER), LeaseEvent::None);
        let t1 = t0 + SELF_FENCE_AFTER * 2;
        assert_eq!(lease.observe(false, t1), LeaseEvent::None);
        assert_eq!(
            lease.observe(false, t1 + SELF_FENCE_AFTER),
            LeaseEvent::Lost
        );
        assert_eq!(
            lease.observe(false, t1 + SELF_FENCE_AFTER * 3),
            LeaseEvent::None
        );
        // Regained until the sessions are restored (a failed barrier retries).
        let t2 = t1 + SELF_FENCE_AFTER * 4;
        assert_eq!(lease.observe(true, t2), LeaseEvent::Regained);
        assert_eq!(lease.observe(true, t2), LeaseEvent::Regained);
        lease.restored();
        assert_eq!(lease.observe(true, t2), LeaseEvent::None);
    }
}
