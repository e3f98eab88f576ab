//! [`RaftDurability`]: the core's [`Durability`] implemented by proposing batches through Raft.
//!
//! Group commit: proposals from all connections go into one queue; a single batcher task takes
//! everything waiting, encodes it as one `raftmq.state.v1.Batch` and writes it as one log entry,
//! so the cost is one consensus round per batch, not per message, and the order of proposals
//! (hence of each connection's changes) is the order in the log. On a follower the batch is
//! forwarded to the leader's `ClusterService.Propose`. A batch that cannot commit within
//! [`COMMIT_TIMEOUT`] (no quorum, no leader) fails with `Unavailable`: the broker refuses the
//! acknowledgement and the client retries later.
//!
//! Such a failure is not always a batch that did not commit: a write that timed out may sit in
//! a follower's log and be committed by the next leader, a forwarded batch whose reply was lost
//! may have committed at the leader. The connection is closed without its acknowledgement, and
//! the client resends through a new connection, whose claim (`SessionOpened`) is committed
//! before anything else of it. Proposals made for a connection are **fenced** by its claim
//! ([`Durability::propose_fenced`], `Batch.fences`): the state machine applies them only while
//! that claim is the session's latest. So a late copy is either applied before the new claim
//! (and the new connection loads it: a resent QoS 2 PUBLISH finds its packet id recorded and is
//! not stored twice) or dropped. A fenced proposal whose fence did not hold completes with
//! `Unavailable` (its connection has been taken over), as does one whose outcome this node
//! cannot read back.

use crate::convert::{FencedRange, ProposalContext, WallClock, encode_fenced_batch};
use crate::forward::connection_refused;
use crate::network::{ClusterTls, Faults, cluster_client, pass_forwarded};
use crate::state_machine::{FenceNotes, StateMachine};
use crate::types::{NodeId, Raft, Request};
use metrics::{counter, histogram};
use openraft::error::{ClientWriteError, RaftError};
use raftmq_codec::ByteStr;
use raftmq_core::durability::{
    Commit, CommitHandle, Durability, DurabilityError, Fence, MessageId, Recovered, SessionImage,
    SessionLoad, StateChange,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{debug, error, warn};

/// How long a batch may take to commit before its waiters are told storage is unavailable.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most proposals folded into one log entry.
const MAX_PROPOSALS_PER_BATCH: usize = 1024;

pub const PROPOSALS_PER_BATCH: &str = "raftmq_raft_proposals_per_batch";
pub const COMMIT_SECONDS: &str = "raftmq_raft_commit_seconds";
pub const COMMIT_FAILURES_TOTAL: &str = "raftmq_raft_commit_failures_total";
/// Fenced proposals of this node that committed but did not take effect: their session had
/// been claimed by another connection by the time they were applied.
pub const FENCED_PROPOSALS_TOTAL: &str = "raftmq_raft_fenced_proposals_total";
/// Proposals refused unproposed because an earlier one of the same connection failed.
pub const CHAIN_REFUSED_TOTAL: &str = "raftmq_raft_chain_refused_total";

struct Proposal {
    changes: Vec<StateChange>,
    handle: CommitHandle,
    fence: Option<Fence>,
    /// The connection that made it (client id, epoch), if one did: see `Broken`.
    chain: Option<(ByteStr, u64)>,
    /// The ordinal of its fence in the batch it was folded into.
    fence_ordinal: Option<u32>,
}

/// Durable broker state through Raft.
pub struct RaftDurability {
    tx: mpsc::UnboundedSender<Proposal>,
    next_id: AtomicU64,
    node_id: NodeId,
    reader: StateMachine,
    clock: WallClock,
}

impl std::fmt::Debug for RaftDurability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftDurability")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

/// Message ids are `node_id << 48 | n`: unique cluster-wide without coordination.
fn id_base(node_id: NodeId) -> u64 {
    node_id << 48
}

impl RaftDurability {
    /// Starts the batcher on the current tokio runtime. `reader` reads the local state machine
    /// (for [`Durability::recover`]); `clock` maps `Instant`s to wall-clock time in commands.
    /// `faults` applies to proposals forwarded to the leader (tests; `None` in production);
    /// `tls` secures the connection to the leader.
    pub fn start(
        raft: Raft,
        node_id: NodeId,
        reader: StateMachine,
        fence_notes: FenceNotes,
        clock: WallClock,
        faults: Faults,
        tls: Option<ClusterTls>,
    ) -> Result<Arc<Self>, DurabilityError> {
        // Reads made for the broker (recovery, session loads) go through their own handle, so
        // a test can make them fail while the Raft state machine keeps applying.
        let reader = reader.with_own_faults();
        let (tx, rx) = mpsc::unbounded_channel();
        let durability = Arc::new(RaftDurability {
            tx,
            next_id: AtomicU64::new(id_base(node_id) + 1),
            node_id,
            reader,
            clock: clock.clone(),
        });
        // Never reuse an id this node gave to a message that is still stored.
        let recovered = durability.read_state()?;
        durability.seed_ids(&recovered);
        tokio::spawn(batcher(raft, node_id, rx, fence_notes, clock, faults, tls));
        Ok(durability)
    }

    /// The log index of the last `NodeDown` applied here that declared this node down (0:
    /// never). A store that cannot be read answers "declared" (`u64::MAX`): the caller then
    /// drops what it would otherwise publish a second time.
    pub fn declared_down_at(&self) -> u64 {
        self.declared_at(self.node_id)
    }

    /// What became of this node's sessionless wills, judged by the declarations of it applied
    /// after log index `since`: not declared, declared with the wills the declaring node
    /// published, or unknown (the store cannot be read: the caller drops them).
    pub fn wills_outcome_since(&self, since: u64) -> raftmq_core::broker::WillsOutcome {
        use raftmq_core::broker::WillsOutcome;
        let at = self.declared_down_at();
        if at == u64::MAX {
            return WillsOutcome::Unknown;
        }
        if at <= since {
            return WillsOutcome::Kept;
        }
        match self.reader.declared_wills(self.node_id) {
            Ok(Some(ids)) => WillsOutcome::Declared(ids.into_iter().map(ByteStr::from).collect()),
            // Declared by an older version, which listed nothing: it published all it knew.
            Ok(None) => WillsOutcome::Unknown,
            Err(e) => {
                error!(error = %e, "cannot read which wills the declaration of this node listed");
                WillsOutcome::Unknown
            }
        }
    }

    /// The client ids the last declaration of this node down listed (`None` if it listed none,
    /// or the store cannot be read: then every will is dropped, never published twice).
    pub fn declared_wills(&self) -> Option<Vec<ByteStr>> {
        self.reader
            .declared_wills(self.node_id)
            .ok()
            .flatten()
            .map(|ids| ids.into_iter().map(ByteStr::from).collect())
    }

    /// The log index of the last batch `node` proposed that was applied here (0: none, or the
    /// store cannot be read).
    pub fn last_proposed_by(&self, node: NodeId) -> u64 {
        self.reader.last_proposed_by(node).unwrap_or(0)
    }

    /// The log index of the last `NodeDown` applied here that declared `node` down (0: never;
    /// `u64::MAX` when the store cannot be read).
    pub fn declared_at(&self, node: NodeId) -> u64 {
        self.reader.declared_down_at(node).unwrap_or_else(|e| {
            error!(error = %e, node, "cannot read whether a node was declared down");
            u64::MAX
        })
    }

    /// Hands a proposal to the batcher.
    fn submit(
        &self,
        fence: Option<Fence>,
        chain: Option<(ByteStr, u64)>,
        changes: Vec<StateChange>,
    ) -> Commit {
        let (commit, handle) = Commit::pending();
        // A connection's fenced changes are chained too.
        let chain = chain.or_else(|| match &fence {
            Some(Fence::Attached { client_id, epoch }) => Some((client_id.clone(), *epoch)),
            _ => None,
        });
        let proposal = Proposal {
            changes,
            handle,
            fence,
            chain,
            fence_ordinal: None,
        };
        if let Err(mpsc::error::SendError(p)) = self.tx.send(proposal) {
            // The batcher is gone (shutting down): nothing can become durable.
            p.handle.complete(Err(DurabilityError::Unavailable));
        }
        commit
    }

    /// While `on`, every read this durability layer makes of the local state fails, as a
    /// failing disk would make it (tests of the paths that must fail closed); the Raft state
    /// machine's own reads are not affected.
    pub fn inject_read_faults(&self, on: bool) {
        self.reader.inject_read_faults(on);
    }

    /// The stored persistent sessions that node `node` owns (last claimed through it, or
    /// adopted by it), each with the log index it was read at. An error when any of them
    /// cannot be read: the caller retries rather than adopt part of them.
    pub fn sessions_owned_by(
        &self,
        node: NodeId,
    ) -> Result<Vec<(SessionImage, u64)>, DurabilityError> {
        let owners = self.reader.session_owners().map_err(|e| {
            error!(error = %e, "cannot read the owners of the stored sessions");
            DurabilityError::Storage
        })?;
        let mut sessions = Vec::new();
        for (client_id, _) in owners.into_iter().filter(|(_, owner)| *owner == node) {
            match self.reader.session_image(&client_id, &self.clock) {
                Ok(found) => sessions.extend(found.map(|(image, read_at, _)| (image, read_at))),
                Err(e) => {
                    error!(error = %e, client_id, "cannot read a stored session");
                    return Err(DurabilityError::Storage);
                }
            }
        }
        Ok(sessions)
    }

    /// The whole replicated state as this node's state machine has it (every session,
    /// whoever owns it).
    pub fn replicated_state(&self) -> Result<Recovered, DurabilityError> {
        self.read_state()
    }

    /// What the broker mirrors after the state was replaced wholesale (a Raft snapshot
    /// installed here): the retained messages, and the subscriptions of **every** stored
    /// persistent session, whoever owns it. The broker keeps those of the sessions it does
    /// not hold in memory: a session this node owns but has let go of (fenced while cut off
    /// from the quorum, not yet restored) is routed to through them like any other; leaving
    /// it out would make a publish here match nothing (PUBACK 0x10) and lose the message.
    pub fn mirror_image(&self) -> Result<Recovered, DurabilityError> {
        let mut recovered = self.read_state()?;
        recovered.remote_subscriptions = subscriptions_of(std::mem::take(&mut recovered.sessions));
        Ok(recovered)
    }

    fn read_state(&self) -> Result<Recovered, DurabilityError> {
        self.reader.recovered(&self.clock).map_err(|e| {
            error!(error = %e, "cannot read the replicated state");
            DurabilityError::Storage
        })
    }

    fn seed_ids(&self, recovered: &Recovered) {
        let base = id_base(self.node_id);
        let max = recovered
            .sessions
            .iter()
            .flat_map(|s| s.messages.iter().map(|m| m.id.0))
            .filter(|id| id >> 48 == self.node_id)
            .max()
            .unwrap_or(base);
        self.next_id.fetch_max(max + 1, Ordering::Relaxed);
    }
}

impl Durability for RaftDurability {
    fn propose(&self, changes: Vec<StateChange>) -> Commit {
        self.submit(None, None, changes)
    }

    fn propose_fenced(&self, fence: Fence, changes: Vec<StateChange>) -> Commit {
        self.submit(Some(fence), None, changes)
    }

    fn propose_chained(
        &self,
        chain: (ByteStr, u64),
        fence: Option<Fence>,
        changes: Vec<StateChange>,
    ) -> Commit {
        self.submit(fence, Some(chain), changes)
    }

    fn next_message_id(&self) -> MessageId {
        MessageId(self.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// The state this node restores at start-up: retained messages, and the persistent
    /// sessions it owns (last claimed through it, or of unknown owner). Sessions claimed
    /// through other nodes stay theirs; this node loads one only when its client connects here
    /// ([`Durability::load_session`]).
    fn recover(&self) -> Result<Recovered, DurabilityError> {
        let mut recovered = self.read_state()?;
        self.seed_ids(&recovered);
        let owners = self.reader.session_owners().map_err(|e| {
            error!(error = %e, "cannot read the owners of the stored sessions");
            DurabilityError::Storage
        })?;
        let (mine, theirs): (Vec<_>, Vec<_>) = std::mem::take(&mut recovered.sessions)
            .into_iter()
            .partition(|s| {
                owners
                    .get(s.client_id.as_str())
                    .is_none_or(|&owner| owner == 0 || owner == self.node_id)
            });
        recovered.sessions = mine;
        recovered.remote_subscriptions = subscriptions_of(theirs);
        Ok(recovered)
    }

    /// Reads the session once `claim` committed, on tokio's blocking pool (a RocksDB read
    /// must not stall the connection task or a runtime worker). Nothing to resume also when
    /// the session was created by the claim this load follows (one claim applied). A failed
    /// read fails the load with [`DurabilityError::Storage`]: the client is refused and the
    /// stored session kept.
    fn load_session(&self, client_id: &ByteStr, claim: Commit) -> SessionLoad {
        let (load, handle) = SessionLoad::pending();
        let reader = self.reader.clone();
        let clock = self.clock.clone();
        let client_id = client_id.to_string();
        tokio::spawn(async move {
            if let Err(e) = claim.await {
                return handle.complete(Err(e));
            }
            let read = tokio::task::spawn_blocking(move || {
                match reader.session_image(&client_id, &clock) {
                    Ok(Some((_, upto, 1))) => {
                        debug!(client_id, upto, "session load: created by this claim");
                        Ok(None)
                    }
                    Ok(None) => Ok(None),
                    Ok(Some((image, upto, claims))) => {
                        debug!(
                            client_id,
                            upto,
                            claims,
                            messages = image.messages.len(),
                            sent = image.messages.iter().filter(|m| m.packet_id.is_some()).count(),
                            released = image.messages.iter().filter(|m| m.released).count(),
                            "session load"
                        );
                        Ok(Some((image, upto)))
                    }
                    Err(e) => {
                        error!(error = %e, client_id, "cannot read a stored session; its client is refused");
                        Err(DurabilityError::Storage)
                    }
                }
            })
            .await
            .unwrap_or(Err(DurabilityError::Storage));
            handle.complete(read);
        });
        load
    }
}

/// The subscriptions of `sessions`, as `(client id, filter as subscribed, options)`.
fn subscriptions_of(
    sessions: Vec<SessionImage>,
) -> Vec<(ByteStr, Arc<str>, raftmq_core::session::SubEntry)> {
    sessions
        .into_iter()
        .flat_map(|s| {
            let client_id = s.client_id;
            s.subscriptions
                .into_iter()
                .map(move |(filter, entry)| (client_id.clone(), filter, entry))
        })
        .collect()
}

async fn batcher(
    raft: Raft,
    node_id: NodeId,
    mut rx: mpsc::UnboundedReceiver<Proposal>,
    fence_notes: FenceNotes,
    clock: WallClock,
    faults: Faults,
    tls: Option<ClusterTls>,
) {
    let mut batch = Vec::new();
    let mut broken = Broken::default();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_PROPOSALS_PER_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        // The later proposals of a connection one of whose proposals failed are refused
        // unproposed (see `Broken`).
        batch.retain_mut(|p| {
            if !broken.contains(p.chain.as_ref()) {
                return true;
            }
            counter!(CHAIN_REFUSED_TOTAL).increment(1);
            let (_, handle) = Commit::pending();
            std::mem::replace(&mut p.handle, handle).complete(Err(DurabilityError::Unavailable));
            false
        });
        if batch.is_empty() {
            continue;
        }
        histogram!(PROPOSALS_PER_BATCH).record(batch.len() as f64);
        let mut changes: Vec<StateChange> = Vec::new();
        let mut fences = Vec::new();
        for p in &mut batch {
            let first = changes.len();
            changes.append(&mut p.changes);
            if let Some(fence) = p.fence.take() {
                fences.push(FencedRange {
                    fence,
                    first: u32::try_from(first).unwrap_or(u32::MAX),
                    count: u32::try_from(changes.len() - first).unwrap_or(u32::MAX),
                });
                // Remembered as the ordinal of its fence in the batch.
                p.fence_ordinal = Some(fences.len() as u32 - 1);
            }
        }
        let ctx = ProposalContext {
            node_id,
            now: Some(std::time::Instant::now()),
        };
        let bytes = encode_fenced_batch(&changes, &fences, &clock, &ctx);
        let started = Instant::now();
        let result = match commit(&raft, bytes, &faults, tls.as_ref()).await {
            // Read your writes: complete only once this node's state machine has the batch
            // (a follower applies it a little after the leader), so a session loaded right
            // after its claim committed reflects everything before the claim.
            Ok(index) => applied_locally(&raft, index).await.map(|()| index),
            Err(e) => Err(e),
        };
        histogram!(COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        if result.is_err() {
            counter!(COMMIT_FAILURES_TOTAL).increment(1);
        }
        // Which fences did not hold (`None`: not known here; see `FenceNotes::take`).
        let failed = match result {
            Ok(index) if !fences.is_empty() => fence_notes.take(index),
            _ => Some(Vec::new()),
        };
        let now = Instant::now();
        for p in batch.drain(..) {
            let outcome = match (result, p.fence_ordinal) {
                (Err(e), _) => Err(e),
                (Ok(_), None) => Ok(()),
                (Ok(_), Some(ordinal)) => match &failed {
                    Some(failed) if !failed.contains(&ordinal) => Ok(()),
                    Some(_) => {
                        counter!(FENCED_PROPOSALS_TOTAL).increment(1);
                        Err(DurabilityError::Unavailable)
                    }
                    // Committed, but whether it took effect cannot be read back here.
                    None => Err(DurabilityError::Unavailable),
                },
            };
            if outcome.is_err()
                && let Some(chain) = p.chain
            {
                broken.insert(chain, now);
            }
            let index = result.ok();
            p.handle.complete_at(outcome, index);
        }
    }
}

/// Connections (client id, epoch) one of whose proposals failed. What a connection proposes
/// must take effect in order, as a prefix: a failed proposal (its client resends, or its
/// connection closes and the session is loaded again elsewhere) must not be followed by a later
/// one that commits, or a later message would be stored before an earlier one (a subscriber
/// gets them inverted), or a later delivery recorded as sent while an earlier one is not (a
/// resumed session resends the later one first). The batcher proposes one batch at a time, so a
/// connection's later proposals are still queued when an earlier one fails: they are refused
/// without being proposed. Entries are dropped after [`Broken::KEEP`] (a connection whose
/// proposal failed is closed by its broker long before).
#[derive(Default)]
struct Broken {
    chains: std::collections::HashMap<(ByteStr, u64), Instant>,
}

impl Broken {
    const KEEP: Duration = Duration::from_secs(60);

    fn contains(&self, chain: Option<&(ByteStr, u64)>) -> bool {
        // Empty but after failures: no hashing of a client id per proposal.
        !self.chains.is_empty() && chain.is_some_and(|c| self.chains.contains_key(c))
    }

    fn insert(&mut self, chain: (ByteStr, u64), now: Instant) {
        self.chains
            .retain(|_, since| now.saturating_duration_since(*since) < Self::KEEP);
        self.chains.insert(chain, now);
    }
}

/// Waits until this node has applied log index `index`.
async fn applied_locally(raft: &Raft, index: u64) -> Result<(), DurabilityError> {
    raft.wait(Some(COMMIT_TIMEOUT))
        .applied_index_at_least(Some(index), "batch applied locally")
        .await
        .map(|_| ())
        .map_err(|e| {
            warn!(error = %e, index, "a committed batch was not applied locally in time");
            DurabilityError::Unavailable
        })
}

/// Commits `batch` through the leader (forwarding when this node is not it), within
/// [`COMMIT_TIMEOUT`]. Returns the log index it was committed at.
///
/// While no leader is known (an election is on), and when the leader's process is gone (its
/// cluster port refuses the forward: nothing was delivered), the batch waits for the next
/// leader instead of failing: a leader that died costs the clients an election, not a
/// reconnection. Every other failure may have left the batch in a log, and is reported as
/// `Unavailable` without a retry (see the module docs).
pub(crate) async fn commit(
    raft: &Raft,
    batch: Vec<u8>,
    faults: &Faults,
    tls: Option<&ClusterTls>,
) -> Result<u64, DurabilityError> {
    let deadline = tokio::time::Instant::now() + COMMIT_TIMEOUT;
    loop {
        let write = tokio::time::timeout_at(
            deadline,
            raft.client_write(Request {
                batch: batch.clone(),
            }),
        )
        .await;
        let unavailable = match write {
            Ok(Ok(resp)) => return Ok(resp.log_id.index),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                let (Some(leader_id), Some(leader)) = (f.leader_id, f.leader_node) else {
                    // Nothing was sent: wait for an election to end, then try again.
                    wait_for_leader(raft, None, deadline).await?;
                    continue;
                };
                let me = raft.metrics().borrow().id;
                let sent = forward_leg(
                    me,
                    leader_id,
                    leader.cluster_addr,
                    batch.clone(),
                    faults,
                    tls,
                    deadline,
                )
                .await;
                match sent {
                    Ok(index) => return Ok(index),
                    Err(Forwarded::Refused) => {
                        // Its process is gone and nothing was delivered: wait for another.
                        wait_for_leader(raft, Some(leader_id), deadline).await?;
                        continue;
                    }
                    Err(Forwarded::Failed) => return Err(DurabilityError::Unavailable),
                }
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!("no commit within {COMMIT_TIMEOUT:?} (no quorum?)"),
        };
        warn!(error = %unavailable, "durable write failed");
        return Err(DurabilityError::Unavailable);
    }
}

/// Waits until a leader other than `not` is known, at the latest until `deadline`.
async fn wait_for_leader(
    raft: &Raft,
    not: Option<NodeId>,
    deadline: tokio::time::Instant,
) -> Result<(), DurabilityError> {
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    raft.wait(Some(left))
        .metrics(
            |m| m.current_leader.is_some() && m.current_leader != not,
            "a leader to forward to",
        )
        .await
        .map(|_| ())
        .map_err(|_| {
            warn!(timeout = ?COMMIT_TIMEOUT, "no leader: durable write refused");
            DurabilityError::Unavailable
        })
}

/// Why a forwarded batch did not commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Forwarded {
    /// The leader's cluster port refused the connection: nothing was delivered.
    Refused,
    /// It may have been delivered (and may still commit), or the leader refused it.
    Failed,
}

/// Forwards `batch` from node `me` to the leader, giving up at `deadline`. The request runs on
/// its own task, as on a real network: one the proposer gave up on may still reach the leader
/// and commit (fencing keeps such a late copy from acting on a session claimed since; see the
/// module docs).
async fn forward_leg(
    me: NodeId,
    leader_id: NodeId,
    leader_addr: String,
    batch: Vec<u8>,
    faults: &Faults,
    tls: Option<&ClusterTls>,
    deadline: tokio::time::Instant,
) -> Result<u64, Forwarded> {
    let faults = faults.clone();
    let tls = tls.cloned();
    let request = tokio::spawn(async move {
        if pass_forwarded(&faults, me, leader_id).await.is_err() {
            return Err(Forwarded::Failed);
        }
        let result = forward(&leader_addr, batch, tls.as_ref()).await;
        if pass_forwarded(&faults, leader_id, me).await.is_err() {
            warn!(
                leader = leader_id,
                "the reply to a forwarded durable write was lost"
            );
            return Err(Forwarded::Failed);
        }
        result
    });
    match tokio::time::timeout_at(deadline, request).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(Forwarded::Failed),
        Err(_) => {
            warn!(leader = leader_id, timeout = ?COMMIT_TIMEOUT, "forwarded durable write timed out");
            Err(Forwarded::Failed)
        }
    }
}

async fn forward(
    leader_addr: &str,
    batch: Vec<u8>,
    tls: Option<&ClusterTls>,
) -> Result<u64, Forwarded> {
    let Ok(mut client) = cluster_client(leader_addr, tls) else {
        return Err(Forwarded::Failed);
    };
    let mut req = tonic::Request::new(raftmq_proto::raft::ProposeRequest {
        shard_id: 0,
        batch: batch.into(),
    });
    req.set_timeout(COMMIT_TIMEOUT);
    match client.propose(req).await {
        Ok(resp) if resp.get_ref().committed => Ok(resp.get_ref().log_index),
        Ok(_) => Err(Forwarded::Failed),
        Err(status) if connection_refused(&status) => {
            debug!(
                leader = leader_addr,
                "the leader's cluster port refused a durable write"
            );
            Err(Forwarded::Refused)
        }
        Err(status) => {
            warn!(leader = leader_addr, %status, "forwarding a durable write to the leader failed");
            Err(Forwarded::Failed)
        }
    }
}
