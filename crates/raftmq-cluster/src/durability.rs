//! [`RaftDurability`]: the core's [`Durability`] implemented by proposing batches through Raft.
//!
//! Group commit: proposals from all connections go into one queue; a single batcher task takes
//! everything waiting, encodes it as one `raftmq.state.v1.Batch` and writes it as one log entry,
//! so the cost is one consensus round per batch, not per message, and the order of proposals
//! (hence of each connection's changes) is the order in the log. On a follower the batch is
//! forwarded to the leader's `ClusterService.Propose`. A batch that cannot commit within
//! [`COMMIT_TIMEOUT`] (no quorum, no leader) fails with `Unavailable`: the broker refuses the
//! acknowledgement and the client retries later.

use crate::convert::{ProposalContext, WallClock, encode_batch_with};
use crate::network::{ClusterTls, Faults, cluster_client, pass};
use crate::state_machine::StateMachine;
use crate::types::{NodeId, Raft, Request};
use metrics::{counter, histogram};
use openraft::error::{ClientWriteError, RaftError};
use raftmq_codec::ByteStr;
use raftmq_core::durability::{
    Commit, CommitHandle, Durability, DurabilityError, MessageId, Recovered, SessionImage,
    SessionLoad, StateChange,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{error, warn};

/// How long a batch may take to commit before its waiters are told storage is unavailable.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most proposals folded into one log entry.
const MAX_PROPOSALS_PER_BATCH: usize = 1024;

pub const PROPOSALS_PER_BATCH: &str = "raftmq_raft_proposals_per_batch";
pub const COMMIT_SECONDS: &str = "raftmq_raft_commit_seconds";
pub const COMMIT_FAILURES_TOTAL: &str = "raftmq_raft_commit_failures_total";

struct Proposal {
    changes: Vec<StateChange>,
    handle: CommitHandle,
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
        tokio::spawn(batcher(raft, node_id, rx, clock, faults, tls));
        Ok(durability)
    }

    /// While `on`, every read this durability layer makes of the local state fails, as a
    /// failing disk would make it (tests of the paths that must fail closed); the Raft state
    /// machine's own reads are not affected.
    pub fn inject_read_faults(&self, on: bool) {
        self.reader.inject_read_faults(on);
    }

    /// The stored persistent sessions that node `node` owns (last claimed through it, or
    /// adopted by it). An error when any of them cannot be read: the caller retries rather
    /// than adopt part of them.
    pub fn sessions_owned_by(&self, node: NodeId) -> Result<Vec<SessionImage>, DurabilityError> {
        let owners = self.reader.session_owners().map_err(|e| {
            error!(error = %e, "cannot read the owners of the stored sessions");
            DurabilityError::Storage
        })?;
        let mut sessions = Vec::new();
        for (client_id, _) in owners.into_iter().filter(|(_, owner)| *owner == node) {
            match self.reader.session_image(&client_id, &self.clock) {
                Ok(found) => sessions.extend(found.map(|(image, _, _)| image)),
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
        let (commit, handle) = Commit::pending();
        if let Err(mpsc::error::SendError(p)) = self.tx.send(Proposal { changes, handle }) {
            // The batcher is gone (shutting down): nothing can become durable.
            p.handle.complete(Err(DurabilityError::Unavailable));
        }
        commit
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
        recovered.remote_subscriptions = theirs
            .into_iter()
            .flat_map(|s| {
                let client_id = s.client_id;
                s.subscriptions
                    .into_iter()
                    .map(move |(filter, entry)| (client_id.clone(), filter, entry))
            })
            .collect();
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
                    Ok(Some((_, _, 1))) | Ok(None) => Ok(None),
                    Ok(Some((image, upto, _))) => Ok(Some((image, upto))),
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

async fn batcher(
    raft: Raft,
    node_id: NodeId,
    mut rx: mpsc::UnboundedReceiver<Proposal>,
    clock: WallClock,
    faults: Faults,
    tls: Option<ClusterTls>,
) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_PROPOSALS_PER_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        histogram!(PROPOSALS_PER_BATCH).record(batch.len() as f64);
        let changes: Vec<StateChange> = batch
            .iter_mut()
            .flat_map(|p| std::mem::take(&mut p.changes))
            .collect();
        let ctx = ProposalContext {
            node_id,
            now: Some(std::time::Instant::now()),
        };
        let bytes = encode_batch_with(&changes, &clock, &ctx);
        let started = Instant::now();
        let result = match commit(&raft, bytes, &faults, tls.as_ref()).await {
            // Read your writes: complete only once this node's state machine has the batch
            // (a follower applies it a little after the leader), so a session loaded right
            // after its claim committed reflects everything before the claim.
            Ok(index) => applied_locally(&raft, index).await,
            Err(e) => Err(e),
        };
        histogram!(COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        if result.is_err() {
            counter!(COMMIT_FAILURES_TOTAL).increment(1);
        }
        for p in batch.drain(..) {
            p.handle.complete(result);
        }
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

/// Commits `batch` through the leader (forwarding when this node is not it). Returns the log
/// index it was committed at.
pub(crate) async fn commit(
    raft: &Raft,
    batch: Vec<u8>,
    faults: &Faults,
    tls: Option<&ClusterTls>,
) -> Result<u64, DurabilityError> {
    let write = tokio::time::timeout(
        COMMIT_TIMEOUT,
        raft.client_write(Request {
            batch: batch.clone(),
        }),
    )
    .await;
    match write {
        Ok(Ok(resp)) => Ok(resp.log_id.index),
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            let (Some(leader_id), Some(leader)) = (f.leader_id, f.leader_node) else {
                warn!("no leader known: durable write refused");
                return Err(DurabilityError::Unavailable);
            };
            let me = raft.metrics().borrow().id;
            if pass(faults, me, leader_id).await.is_err() {
                return Err(DurabilityError::Unavailable);
            }
            let result = forward(&leader.cluster_addr, batch, tls).await;
            if pass(faults, leader_id, me).await.is_err() {
                return Err(DurabilityError::Unavailable);
            }
            result
        }
        Ok(Err(e)) => {
            warn!(error = %e, "durable write failed");
            Err(DurabilityError::Unavailable)
        }
        Err(_) => {
            warn!(timeout = ?COMMIT_TIMEOUT, "durable write timed out (no quorum?)");
            Err(DurabilityError::Unavailable)
        }
    }
}

async fn forward(
    leader_addr: &str,
    batch: Vec<u8>,
    tls: Option<&ClusterTls>,
) -> Result<u64, DurabilityError> {
    let Ok(mut client) = cluster_client(leader_addr, tls) else {
        return Err(DurabilityError::Unavailable);
    };
    let mut req = tonic::Request::new(raftmq_proto::raft::ProposeRequest {
        shard_id: 0,
        batch: batch.into(),
    });
    req.set_timeout(COMMIT_TIMEOUT);
    match client.propose(req).await {
        Ok(resp) if resp.get_ref().committed => Ok(resp.get_ref().log_index),
        Ok(_) => Err(DurabilityError::Unavailable),
        Err(status) => {
            warn!(leader = leader_addr, %status, "forwarding a durable write to the leader failed");
            Err(DurabilityError::Unavailable)
        }
    }
}
