//! [`RaftDurability`]: the core's [`Durability`] implemented by proposing batches through Raft.
//!
//! Shards: each proposal is split over the shards its changes belong to ([`crate::split`]):
//! a session's changes go to its client id's shard, a stored message to the shard of each of
//! its target sessions (stored once per shard), a retained message to its topic's shard. The
//! commit of the proposal resolves once every part committed, and says where each did
//! ([`Commit::log_positions`]). A fenced proposal spanning shards (a persistent publisher's
//! QoS 2 PUBLISH for sessions elsewhere) is gated: its part in the publisher's shard commits
//! first, recording the packet id with the message id, and only then are the other parts
//! proposed, de-duplicated by message id, so that a resend stores the message again where it
//! is missing and nowhere twice. A connection's later proposals wait behind a pending gate, so
//! its changes reach every shard in the order it made them.
//!
//! Group commit, per shard: proposals from all connections go into the shard's queue; its
//! batcher task takes everything waiting, encodes it as one `raftmq.state.v1.Batch` and writes
//! it as one log entry, so the cost is one consensus round per batch, not per message, and the
//! order of proposals (hence of each connection's changes) is the order in the shard's log. On a follower the batch is
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

use crate::convert::{ProposalContext, WallClock, change_to_proto_with};
use crate::forward::connection_refused;
use crate::network::{ClusterTls, Faults, cluster_client, pass_forwarded};
use crate::split::{Part, Split, split};
use crate::state_machine::{FenceNotes, StateMachine};
use crate::types::{NodeId, Raft, Request, ShardId};
use metrics::{counter, histogram};
use openraft::error::{ClientWriteError, RaftError};
use parking_lot::Mutex;
use prost::Message as _;
use raftmq_codec::ByteStr;
use raftmq_core::durability::{
    Commit, CommitHandle, Durability, DurabilityError, Fence, LogPositions, MessageId, Recovered,
    SessionImage, SessionLoad, StateChange,
};
use raftmq_core::shard::{ShardCount, shard_of};
use raftmq_proto::state;
use raftmq_proto::state::change::Change as ProtoChange;
use std::collections::{HashMap, VecDeque};
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
/// Parts of a gated proposal refused unproposed because its gate committed later than
/// [`REST_DEADLINE`] after the proposal.
pub const GATED_PARTS_EXPIRED_TOTAL: &str = "raftmq_raft_gated_parts_expired_total";
/// Proposals split over more than one shard (each part is proposed to its shard's batcher).
pub const SPLIT_PROPOSALS_TOTAL: &str = "raftmq_raft_split_proposals_total";

/// One shard's part of a proposal, queued for that shard's batcher.
struct Proposal {
    changes: Vec<state::Change>,
    handle: CommitHandle,
    fence: Option<Fence>,
    /// The connection that made it (client id, epoch), if one did: see `Broken`.
    chain: Option<(ByteStr, u64)>,
    /// The ordinal of its fence in the batch it was folded into.
    fence_ordinal: Option<u32>,
    /// Refused unproposed after this (the parts of a gated proposal: see [`REST_DEADLINE`]).
    not_after: Option<Instant>,
}

/// How long after a gated proposal was made its other parts may still be proposed. Once its
/// gate committed late (its node paused or cut off meanwhile) its client may have resent the
/// message through another node, which stored it everywhere and completed the exchange; the
/// shards drop a settled message's de-duplication record some time after that
/// (`state_machine::published::SETTLED_GRACE_MS`), so a part proposed arbitrarily late could
/// store the message a second time. Refused instead: the client resends it.
pub const REST_DEADLINE: Duration = Duration::from_secs(10);

/// A part ready to go: its shard's batcher (index `shard - 1`) and the proposal.
type Ready = (usize, Proposal);

/// Durable broker state through Raft: one batcher per shard, and the router that splits each
/// proposal over them (see [`crate::split`]).
pub struct RaftDurability {
    router: Arc<Router>,
    ids: MessageIds,
    node_id: NodeId,
    /// This node's state machine of each shard (`readers[i]` is shard `i + 1`), for reads.
    readers: Vec<StateMachine>,
    clock: WallClock,
    /// The de-duplication records of QoS 2 exchanges opened through this node, for PUBREL.
    intents: Intents,
}

/// Open QoS 2 exchanges whose message was stored with de-duplication (several shards): the
/// message id and its shards per (client id, packet id), as proposed, so that PUBREL settles
/// them without reading the session's receipt from the store. An exchange opened elsewhere (a
/// session taken over or loaded after a restart) is not here: PUBREL reads its receipt then.
/// Bounded: two generations of at most [`Intents::GENERATION`] entries; when the newer is full
/// the older is dropped (those exchanges are read from the store at PUBREL, as above).
#[derive(Default)]
struct Intents(Mutex<[HashMap<(ByteStr, u16), Intent>; 2]>);

/// A message id and the shards that record it.
type Intent = (u64, Vec<u32>);

impl Intents {
    const GENERATION: usize = 1 << 15;

    fn insert(&self, key: (ByteStr, u16), intent: Intent) {
        let mut gens = self.0.lock();
        if gens[0].len() >= Self::GENERATION {
            gens[1] = std::mem::take(&mut gens[0]);
        }
        gens[1].remove(&key);
        gens[0].insert(key, intent);
    }

    fn take(&self, key: &(ByteStr, u16)) -> Option<Intent> {
        let mut gens = self.0.lock();
        let found = gens[0].remove(key);
        found.or_else(|| gens[1].remove(key))
    }
}

/// The batchers of every shard, and the proposals of connections held back behind a gate.
struct Router {
    batchers: Vec<mpsc::UnboundedSender<Proposal>>,
    count: ShardCount,
    /// Per connection with a gated proposal pending: its proposals not sent yet, in order.
    chains: Mutex<HashMap<(ByteStr, u64), VecDeque<Held>>>,
    /// The batchers' record of connections with a failed proposal (`Broken`).
    broken: Arc<Mutex<Broken>>,
}

/// A proposal of a connection held back until the gated proposals before it are through.
struct Held {
    /// Its gate, not sent yet (sent when it reaches the head of the queue).
    gate: Option<Ready>,
    /// The commit of its gate once sent (`None`: not gated).
    gate_commit: Option<Commit>,
    /// The parts sent once the gate committed (dropped, so failed, if it did not).
    rest: Vec<Ready>,
}

impl std::fmt::Debug for RaftDurability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaftDurability")
            .field("node_id", &self.node_id)
            .field("shards", &self.router.count.get())
            .finish_non_exhaustive()
    }
}

/// Message ids are `node_id << 48 | n`: unique cluster-wide without coordination.
fn id_base(node_id: NodeId) -> u64 {
    node_id << 48
}

/// Ids reserved in the store at a time (one synced write per this many messages).
const ID_BLOCK: u64 = 1 << 20;

/// This node's message ids, never given out twice, not even by a later process: a shard
/// records the ids of QoS 2 messages stored across shards and skips a second store of one
/// (`state_machine::published`), so an id given again would drop a new message as a copy of
/// an old one. Ids are handed out below a bound recorded in the store beforehand
/// ([`Store::reserve_message_ids`]), and a new process starts at that bound.
struct MessageIds {
    next: AtomicU64,
    /// Ids below this are reserved in the store.
    reserved: AtomicU64,
    store: Option<raftmq_store::Store>,
    reserving: Mutex<()>,
}

/// Reservations of message ids that could not be written to the store.
pub const MESSAGE_ID_RESERVE_FAILURES_TOTAL: &str = "raftmq_message_id_reserve_failures_total";

impl MessageIds {
    /// Starting at the bound the store records (and above `at_least`).
    fn new(
        store: Option<raftmq_store::Store>,
        at_least: u64,
    ) -> Result<MessageIds, DurabilityError> {
        let reserved = match &store {
            Some(store) => store.message_ids_reserved().map_err(|e| {
                error!(error = %e, "cannot read the reserved message ids");
                DurabilityError::Storage
            })?,
            None => 0,
        };
        let next = at_least.max(reserved);
        // Nothing is reserved for this process yet: its first id reserves a block.
        Ok(MessageIds {
            next: AtomicU64::new(next),
            reserved: AtomicU64::new(if store.is_some() { next } else { u64::MAX }),
            store,
            reserving: Mutex::new(()),
        })
    }

    /// Never below `at_least` from now on.
    fn raise(&self, at_least: u64) {
        self.next.fetch_max(at_least, Ordering::Relaxed);
    }

    fn next(&self) -> MessageId {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if id >= self.reserved.load(Ordering::Acquire) {
            let _one = self.reserving.lock();
            if id >= self.reserved.load(Ordering::Acquire)
                && let Some(store) = &self.store
            {
                let upto = id.saturating_add(ID_BLOCK);
                match store.reserve_message_ids(upto) {
                    Ok(()) => self.reserved.store(upto, Ordering::Release),
                    Err(e) => {
                        // Given out all the same: a store that cannot write cannot append this
                        // node's log either; counted, and tried again with the next id.
                        counter!(MESSAGE_ID_RESERVE_FAILURES_TOTAL).increment(1);
                        error!(error = %e, "cannot reserve message ids in the store");
                    }
                }
            }
        }
        MessageId(id)
    }
}

/// One shard's group as the durability layer uses it: its Raft handle, the fence notes of
/// its state machine, and a reader of that state machine.
pub struct ShardHandle {
    pub raft: Raft,
    pub fence_notes: FenceNotes,
    pub reader: StateMachine,
}

impl RaftDurability {
    /// Starts one batcher per shard on the current tokio runtime; `shards[i]` is shard `i + 1`.
    /// Each reader reads its shard's local state machine (for [`Durability::recover`] and
    /// session loads); `clock` maps `Instant`s to wall-clock time in commands. `faults` applies
    /// to proposals forwarded to a leader (tests; `None` in production); `tls` secures the
    /// connection to the leader.
    pub fn start(
        shards: Vec<ShardHandle>,
        store: Option<raftmq_store::Store>,
        node_id: NodeId,
        clock: WallClock,
        faults: Faults,
        tls: Option<ClusterTls>,
    ) -> Result<Arc<Self>, DurabilityError> {
        let count = u32::try_from(shards.len())
            .ok()
            .and_then(ShardCount::new)
            .ok_or(DurabilityError::Storage)?;
        let broken = Arc::new(Mutex::new(Broken::default()));
        let mut batchers = Vec::with_capacity(shards.len());
        let mut readers = Vec::with_capacity(shards.len());
        let mut tasks = Vec::with_capacity(shards.len());
        for (i, handle) in shards.into_iter().enumerate() {
            let (tx, rx) = mpsc::unbounded_channel();
            batchers.push(tx);
            // Reads made for the broker (recovery, session loads) go through their own handle,
            // so a test can make them fail while the Raft state machine keeps applying.
            readers.push(handle.reader.with_own_faults());
            let shard = ShardId::new(u32::try_from(i + 1).unwrap_or(u32::MAX));
            tasks.push((shard, handle.raft, rx, handle.fence_notes));
        }
        let durability = Arc::new(RaftDurability {
            router: Arc::new(Router {
                batchers,
                count,
                chains: Mutex::default(),
                broken: broken.clone(),
            }),
            ids: MessageIds::new(store, id_base(node_id) + 1)?,
            node_id,
            readers,
            clock: clock.clone(),
            intents: Intents::default(),
        });
        // Never reuse an id this node gave to a message that is still stored.
        let recovered = durability.read_state()?;
        durability.seed_ids(&recovered);
        for (shard, raft, rx, fence_notes) in tasks {
            tokio::spawn(batcher(
                Batcher {
                    raft,
                    shard,
                    node_id,
                    fence_notes,
                    faults: faults.clone(),
                    tls: tls.clone(),
                    broken: broken.clone(),
                },
                rx,
            ));
        }
        Ok(durability)
    }

    /// The number of shards proposals are split over.
    pub fn shard_count(&self) -> ShardCount {
        self.router.count
    }

    /// The reader of the control shard: shard 1, where node-down declarations, their wills
    /// and the node's liveness are decided until the metadata group exists.
    fn control(&self) -> &StateMachine {
        &self.readers[0]
    }

    /// The reader of shard `shard` (1-based), if there is one.
    fn reader(&self, shard: ShardId) -> Option<&StateMachine> {
        self.readers
            .get(usize::try_from(shard.get()).ok()?.checked_sub(1)?)
    }

    /// The reader of the shard of session `client_id`.
    fn reader_of(&self, client_id: &str) -> &StateMachine {
        let shard = shard_of(client_id.as_bytes(), self.router.count);
        self.reader(shard).unwrap_or_else(|| self.control())
    }

    /// The log index of the last `NodeDown` applied in the control shard that declared this
    /// node down (0: never). A store that cannot be read answers "declared" (`u64::MAX`): the
    /// caller then drops what it would otherwise publish a second time.
    pub fn declared_down_at(&self) -> u64 {
        self.declared_at(self.node_id)
    }

    /// What became of this node's sessionless wills, judged by the declarations of it applied
    /// in the control shard after log index `since`: not declared, declared with the wills the
    /// declaring node published, or unknown (the store cannot be read: the caller drops them).
    pub fn wills_outcome_since(&self, since: u64) -> raftmq_core::broker::WillsOutcome {
        use raftmq_core::broker::WillsOutcome;
        let at = self.declared_down_at();
        if at == u64::MAX {
            return WillsOutcome::Unknown;
        }
        if at <= since {
            return WillsOutcome::Kept;
        }
        match self.control().declared_wills(self.node_id) {
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
        self.control()
            .declared_wills(self.node_id)
            .ok()
            .flatten()
            .map(|ids| ids.into_iter().map(ByteStr::from).collect())
    }

    /// The log index of the last batch `node` proposed in each shard that was applied here
    /// (`[i]` is shard `i + 1`; 0: none, or the store cannot be read).
    pub fn last_proposed_by(&self, node: NodeId) -> Vec<u64> {
        self.readers
            .iter()
            .map(|r| r.last_proposed_by(node).unwrap_or(0))
            .collect()
    }

    /// The log index of the last `NodeDown` applied in the control shard that declared `node`
    /// down (0: never; `u64::MAX` when the store cannot be read).
    pub fn declared_at(&self, node: NodeId) -> u64 {
        self.declared_at_in(crate::types::DATA_SHARD, node)
    }

    /// [`RaftDurability::declared_at`] in shard `shard`.
    pub fn declared_at_in(&self, shard: ShardId, node: NodeId) -> u64 {
        let Some(reader) = self.reader(shard) else {
            return u64::MAX;
        };
        reader.declared_down_at(node).unwrap_or_else(|e| {
            error!(error = %e, node, "cannot read whether a node was declared down");
            u64::MAX
        })
    }

    /// Proposes `changes` to shard `shard` alone, unsplit (a declaration, whose `seen` names
    /// that shard's log).
    pub fn propose_to(&self, shard: ShardId, changes: Vec<StateChange>) -> Commit {
        let ctx = ProposalContext {
            node_id: self.node_id,
            now: Some(Instant::now()),
        };
        let part = Part {
            shard,
            changes: changes
                .iter()
                .map(|c| change_to_proto_with(c, &self.clock, &ctx))
                .collect(),
        };
        let (ready, commit) = proposal(part, None, None);
        self.router.send(ready);
        commit
    }

    /// Hands a proposal to the batchers of the shards it touches.
    fn submit(
        &self,
        fence: Option<Fence>,
        chain: Option<(ByteStr, u64)>,
        changes: Vec<StateChange>,
    ) -> Commit {
        // A connection's fenced changes are chained too.
        let chain = chain.or_else(|| match &fence {
            Some(Fence::Attached { client_id, epoch }) => Some((client_id.clone(), *epoch)),
            _ => None,
        });
        let ctx = ProposalContext {
            node_id: self.node_id,
            now: Some(Instant::now()),
        };
        let settle = self.settlements(&changes);
        let split = split(
            &changes,
            fence.as_ref(),
            self.router.count,
            &self.clock,
            &ctx,
        );
        if self.router.count.get() > 1 {
            self.note_parts(&split, chain.as_ref());
        }
        if split.parts.len() > 1 {
            counter!(SPLIT_PROPOSALS_TOTAL).increment(1);
        }
        let mut gate = None;
        let mut rest = Vec::with_capacity(split.parts.len());
        let mut commits = Vec::with_capacity(split.parts.len());
        for (i, part) in split.parts.into_iter().enumerate() {
            // Only the part in the fence's shard carries the fence (the session is there).
            let fenced = fence
                .clone()
                .filter(|f| crate::split::fence_shard(f, self.router.count) == part.shard);
            let (ready, commit) = proposal(part, fenced, chain.clone());
            commits.push(commit);
            if Some(i) == split.gate {
                gate = Some(ready);
            } else {
                rest.push(ready);
            }
        }
        let commit = Commit::all(commits);
        if gate.is_some() {
            let not_after = Instant::now() + REST_DEADLINE;
            for (_, p) in &mut rest {
                p.not_after = Some(not_after);
            }
        }
        self.router.route(chain, gate, rest);
        if !settle.is_empty() {
            let router = self.router.clone();
            let clock = self.clock.clone();
            commit.on_complete(move |result| {
                if result.is_ok() {
                    router.settle(settle, clock.to_unix_ms(Instant::now()));
                }
            });
        }
        commit
    }

    /// Keeps the de-duplication records the parts of a split proposal open (`Intents`; a
    /// receipt without one closes what its packet id had), and logs what they store at debug
    /// level (chaos replays).
    fn note_parts(&self, split: &Split, chain: Option<&(ByteStr, u64)>) {
        let logged = tracing::enabled!(tracing::Level::DEBUG);
        for part in &split.parts {
            for c in &part.changes {
                match &c.change {
                    Some(ProtoChange::MessageStored(m)) if logged => debug!(
                        diag = "store",
                        id = m.id,
                        shard = part.shard.get(),
                        dedupe = m.dedupe,
                        gated = split.gate.is_some(),
                        targets = ?m.targets.iter().map(|t| t.client_id.as_str()).collect::<Vec<_>>(),
                        chain = ?chain,
                    ),
                    Some(ProtoChange::IncomingQos2Received(r)) => {
                        if logged {
                            debug!(
                                diag = "qos2",
                                client = r.client_id,
                                pid = r.packet_id,
                                id = r.message_id,
                                shard = part.shard.get(),
                                chain = ?chain,
                            );
                        }
                        let Ok(packet_id) = u16::try_from(r.packet_id) else {
                            continue;
                        };
                        let key = (ByteStr::from(r.client_id.as_str()), packet_id);
                        if r.message_id == 0 {
                            self.intents.take(&key);
                        } else {
                            self.intents.insert(key, (r.message_id, r.shards.clone()));
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// For the QoS 2 exchanges `changes` complete (`IncomingQos2Completed`) whose message was
    /// stored with de-duplication: the shards and ids whose records to drop once they commit.
    fn settlements(&self, changes: &[StateChange]) -> Vec<(ShardId, u64)> {
        if self.router.count.get() == 1 {
            return Vec::new();
        }
        let mut settle = Vec::new();
        for change in changes {
            let StateChange::IncomingQos2Completed {
                client_id,
                packet_id,
            } = change
            else {
                continue;
            };
            if let Some((id, shards)) = self.intents.take(&(client_id.clone(), *packet_id)) {
                settle.extend(shards.into_iter().map(|s| (ShardId::new(s), id)));
                continue;
            }
            match self.reader_of(client_id).qos2_intent(client_id, *packet_id) {
                Ok(Some(intent)) => settle.extend(
                    intent
                        .shards
                        .iter()
                        .map(|&s| (ShardId::new(s), intent.message_id)),
                ),
                Ok(None) => {}
                // Left to the de-duplication horizon.
                Err(e) => warn!(error = %e, %client_id, "cannot read a QoS 2 receipt to settle"),
            }
        }
        settle
    }

    /// Whether shard `shard` keeps the de-duplication record of stored message `id` (a QoS 2
    /// exchange still open, or settled within its grace; see `state_machine::published`).
    /// False when it cannot be read.
    pub fn dedupe_recorded(&self, shard: ShardId, id: u64) -> bool {
        self.dedupe_expiry(shard, id).is_some()
    }

    /// When shard `shard`'s de-duplication record of stored message `id` expires (wall-clock
    /// ms), if it keeps one (`None` too when it cannot be read).
    pub fn dedupe_expiry(&self, shard: ShardId, id: u64) -> Option<u64> {
        self.reader(shard)
            .and_then(|r| r.published_expiry(id).ok().flatten())
    }

    /// While `on`, every read this durability layer makes of the local state fails, as a
    /// failing disk would make it (tests of the paths that must fail closed); the Raft state
    /// machine's own reads are not affected.
    pub fn inject_read_faults(&self, on: bool) {
        for reader in &self.readers {
            reader.inject_read_faults(on);
        }
    }

    /// The stored persistent sessions that node `node` owns (last claimed through it, or
    /// adopted by it), each with the log index (of its shard) it was read at. An error when
    /// any of them cannot be read: the caller retries rather than adopt part of them.
    pub fn sessions_owned_by(
        &self,
        node: NodeId,
    ) -> Result<Vec<(SessionImage, u64)>, DurabilityError> {
        let mut sessions = Vec::new();
        for reader in &self.readers {
            let owners = reader.session_owners().map_err(|e| {
                error!(error = %e, "cannot read the owners of the stored sessions");
                DurabilityError::Storage
            })?;
            for (client_id, _) in owners.into_iter().filter(|(_, owner)| *owner == node) {
                match reader.session_image(&client_id, &self.clock) {
                    Ok(found) => {
                        sessions.extend(found.map(|(image, read_at, _)| (image, read_at)));
                    }
                    Err(e) => {
                        error!(error = %e, client_id, "cannot read a stored session");
                        return Err(DurabilityError::Storage);
                    }
                }
            }
        }
        Ok(sessions)
    }

    /// The whole replicated state as this node's state machines have it (every session,
    /// whoever owns it).
    pub fn replicated_state(&self) -> Result<Recovered, DurabilityError> {
        self.read_state()
    }

    /// What the broker mirrors after shard `shard`'s state was replaced wholesale (a Raft
    /// snapshot installed here): its retained messages, and the subscriptions of **every**
    /// stored persistent session of the shard, whoever owns it. The broker keeps those of the
    /// sessions it does not hold in memory: a session this node owns but has let go of (fenced
    /// while cut off from the quorum, not yet restored) is routed to through them like any
    /// other; leaving it out would make a publish here match nothing (PUBACK 0x10) and lose
    /// the message.
    pub fn mirror_image_of(&self, shard: ShardId) -> Result<Recovered, DurabilityError> {
        let reader = self.reader(shard).ok_or(DurabilityError::Storage)?;
        let mut recovered = self.read_shard(reader)?;
        recovered.remote_subscriptions = subscriptions_of(std::mem::take(&mut recovered.sessions));
        Ok(recovered)
    }

    /// Every shard's state, one after the other (each read from a consistent snapshot of its
    /// shard).
    fn read_state(&self) -> Result<Recovered, DurabilityError> {
        let mut all = Recovered::default();
        for reader in &self.readers {
            let shard = self.read_shard(reader)?;
            all.sessions.extend(shard.sessions);
            all.retained.extend(shard.retained);
        }
        Ok(all)
    }

    /// One shard's state, read from a consistent snapshot of it.
    fn read_shard(&self, reader: &StateMachine) -> Result<Recovered, DurabilityError> {
        reader.recovered(&self.clock).map_err(|e| {
            error!(error = %e, shard = reader.shard(), "cannot read the replicated state");
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
        self.ids.raise(max + 1);
    }
}

/// A proposal of `part`, and its commit.
fn proposal(part: Part, fence: Option<Fence>, chain: Option<(ByteStr, u64)>) -> (Ready, Commit) {
    let (commit, handle) = Commit::pending();
    let index = usize::try_from(part.shard.get().saturating_sub(1)).unwrap_or(usize::MAX);
    let proposal = Proposal {
        changes: part.changes,
        handle,
        fence,
        chain,
        fence_ordinal: None,
        not_after: None,
    };
    ((index, proposal), commit)
}

impl Router {
    /// Hands a part to its shard's batcher.
    fn send(&self, (index, proposal): Ready) {
        match self.batchers.get(index) {
            Some(tx) => {
                if let Err(mpsc::error::SendError(p)) = tx.send(proposal) {
                    // The batcher is gone (shutting down): nothing can become durable.
                    p.handle.complete(Err(DurabilityError::Unavailable));
                }
            }
            None => proposal.handle.complete(Err(DurabilityError::Unavailable)),
        }
    }

    /// Whether the parts `rest` of a gated proposal, whose gate just committed, are past their
    /// deadline ([`REST_DEADLINE`]): then they are refused unproposed (dropped, their waiters
    /// fail), and `chain`'s later proposals with them (its client resends in order).
    fn expired(&self, chain: Option<&(ByteStr, u64)>, rest: &[Ready]) -> bool {
        let now = Instant::now();
        if !rest
            .iter()
            .any(|(_, p)| p.not_after.is_some_and(|t| now > t))
        {
            return false;
        }
        counter!(GATED_PARTS_EXPIRED_TOTAL).increment(rest.len() as u64);
        warn!(
            "a QoS 2 publish whose record committed too late is not stored in its other shards \
             (its client resends it)"
        );
        if let Some(chain) = chain {
            self.broken.lock().insert(chain.clone(), now);
        }
        true
    }

    /// Sends a split proposal: at once when nothing of its connection is held back and it
    /// has no gate; otherwise behind what is held back, its gate first (see `Held`).
    fn route(
        self: &Arc<Self>,
        chain: Option<(ByteStr, u64)>,
        gate: Option<Ready>,
        rest: Vec<Ready>,
    ) {
        if gate.is_none() && self.count.get() == 1 {
            // One shard: nothing is ever gated, so nothing is held back.
            rest.into_iter().for_each(|r| self.send(r));
            return;
        }
        let Some(chain) = chain else {
            // Not a connection's (a timer's): nothing of the same origin to keep in order.
            match gate {
                None => rest.into_iter().for_each(|r| self.send(r)),
                Some(gate) => self.gated(gate, rest),
            }
            return;
        };
        let mut chains = self.chains.lock();
        match chains.get_mut(&chain) {
            Some(queue) => {
                queue.push_back(Held {
                    gate,
                    gate_commit: None,
                    rest,
                });
            }
            None if gate.is_none() => {
                drop(chains);
                rest.into_iter().for_each(|r| self.send(r));
                return;
            }
            None => {
                chains.insert(
                    chain.clone(),
                    VecDeque::from([Held {
                        gate,
                        gate_commit: None,
                        rest,
                    }]),
                );
            }
        }
        drop(chains);
        self.drain(chain);
    }

    /// A gated proposal of no connection: its gate, then the rest once the gate committed.
    fn gated(self: &Arc<Self>, gate: Ready, rest: Vec<Ready>) {
        let (commit, handle) = Commit::pending();
        let (index, mut proposal) = gate;
        let own = std::mem::replace(&mut proposal.handle, handle);
        self.send((index, proposal));
        let router = self.clone();
        let gate_commit = commit.clone();
        commit.on_complete(move |result| {
            own.complete_at(result, gate_commit.log_positions().unwrap_or_default());
            if result.is_ok() && !router.expired(None, &rest) {
                rest.into_iter().for_each(|r| router.send(r));
            }
        });
    }

    /// Sends what is held back for `chain`, in order, as far as the gates allow.
    fn drain(self: &Arc<Self>, chain: (ByteStr, u64)) {
        let mut chains = self.chains.lock();
        loop {
            let Some(queue) = chains.get_mut(&chain) else {
                return;
            };
            let Some(head) = queue.front_mut() else {
                chains.remove(&chain);
                return;
            };
            if let Some((index, mut proposal)) = head.gate.take() {
                // Its gate's own commit is watched through a second handle: the gate's
                // waiter completes with it, then the queue moves on.
                let (watch, handle) = Commit::pending();
                let own = std::mem::replace(&mut proposal.handle, handle);
                head.gate_commit = Some(watch.clone());
                self.send((index, proposal));
                drop(chains);
                let router = self.clone();
                let positions = watch.clone();
                watch.on_complete(move |result| {
                    own.complete_at(result, positions.log_positions().unwrap_or_default());
                    router.drain(chain);
                });
                return;
            }
            match head.gate_commit.as_ref().map(Commit::result) {
                Some(None) => return,
                Some(Some(Err(_))) => {
                    // The gate failed: the rest is never proposed (its waiters fail as their
                    // handles drop), and the connection's later proposals are refused by the
                    // batchers (`Broken`).
                    queue.pop_front();
                }
                Some(Some(Ok(()))) | None => {
                    if let Some(held) = queue.pop_front()
                        && !self.expired(Some(&chain), &held.rest)
                    {
                        held.rest.into_iter().for_each(|r| self.send(r));
                    }
                }
            }
        }
    }

    /// Proposes, without waiting, that the shards drop the de-duplication records of QoS 2
    /// exchanges completed at `at_ms` (after a grace, see `PublishSettled`).
    fn settle(&self, settle: Vec<(ShardId, u64)>, at_ms: u64) {
        let mut by_shard: std::collections::BTreeMap<ShardId, Vec<u64>> = Default::default();
        for (shard, id) in settle {
            by_shard.entry(shard).or_default().push(id);
        }
        for (shard, ids) in by_shard {
            let part = Part {
                shard,
                changes: vec![state::Change {
                    change: Some(ProtoChange::PublishSettled(state::PublishSettled {
                        ids,
                        at_ms,
                    })),
                }],
            };
            let (ready, commit) = proposal(part, None, None);
            self.send(ready);
            drop(commit);
        }
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
        self.ids.next()
    }

    /// The state this node restores at start-up: retained messages, and the persistent
    /// sessions it owns (last claimed through it, or of unknown owner). Sessions claimed
    /// through other nodes stay theirs; this node loads one only when its client connects here
    /// ([`Durability::load_session`]).
    fn recover(&self) -> Result<Recovered, DurabilityError> {
        let mut recovered = self.read_state()?;
        self.seed_ids(&recovered);
        let mut owners = HashMap::new();
        for reader in &self.readers {
            owners.extend(reader.session_owners().map_err(|e| {
                error!(error = %e, "cannot read the owners of the stored sessions");
                DurabilityError::Storage
            })?);
        }
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

    /// Reads the session from its shard once `claim` committed, on tokio's blocking pool (a
    /// RocksDB read must not stall the connection task or a runtime worker). Nothing to resume
    /// also when the session was created by the claim this load follows (one claim applied).
    /// A failed read fails the load with [`DurabilityError::Storage`]: the client is refused
    /// and the stored session kept.
    fn shard_of(&self, client_id: &[u8]) -> u32 {
        shard_of(client_id, self.router.count).get()
    }

    fn shards(&self) -> u32 {
        self.router.count.get()
    }

    fn load_session(&self, client_id: &ByteStr, claim: Commit) -> SessionLoad {
        let (load, handle) = SessionLoad::pending();
        let reader = self.reader_of(client_id).clone();
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
                            diag = "load",
                            client_id,
                            ids = ?image.messages.iter().map(|m| m.id.0).collect::<Vec<_>>(),
                            qos2 = ?image.incoming_qos2,
                            reroute = ?image.qos2_reroute,
                        );
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

/// What one shard's batcher works with.
struct Batcher {
    raft: Raft,
    shard: ShardId,
    node_id: NodeId,
    fence_notes: FenceNotes,
    faults: Faults,
    tls: Option<ClusterTls>,
    /// Shared by every shard's batcher of the node: a connection whose proposal failed in one
    /// shard has its later proposals refused in all.
    broken: Arc<Mutex<Broken>>,
}

async fn batcher(b: Batcher, mut rx: mpsc::UnboundedReceiver<Proposal>) {
    let mut batch = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_PROPOSALS_PER_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        // The later proposals of a connection one of whose proposals failed are refused
        // unproposed (see `Broken`), and so are parts of a gated proposal past their deadline.
        {
            let mut broken = b.broken.lock();
            let now = Instant::now();
            batch.retain_mut(|p| {
                let expired = p.not_after.is_some_and(|t| now > t);
                if !expired && !broken.contains(p.chain.as_ref()) {
                    return true;
                }
                if expired {
                    // A failure of the connection's like any other: its later proposals wait
                    // for its resend.
                    if let Some(chain) = p.chain.take() {
                        broken.insert(chain, now);
                    }
                    counter!(GATED_PARTS_EXPIRED_TOTAL).increment(1);
                    warn!(
                        shard = b.shard.get(),
                        "a part of a QoS 2 publish whose record committed too late is refused \
                         (its client resends it)"
                    );
                } else {
                    counter!(CHAIN_REFUSED_TOTAL).increment(1);
                }
                let (_, handle) = Commit::pending();
                std::mem::replace(&mut p.handle, handle)
                    .complete(Err(DurabilityError::Unavailable));
                false
            });
        }
        if batch.is_empty() {
            continue;
        }
        histogram!(PROPOSALS_PER_BATCH).record(batch.len() as f64);
        let mut changes: Vec<state::Change> = Vec::new();
        let mut fences = Vec::new();
        for p in &mut batch {
            let first = changes.len();
            changes.append(&mut p.changes);
            if let Some(fence) = p.fence.take() {
                fences.push(crate::convert::fence_to_proto(
                    &crate::convert::FencedRange {
                        fence,
                        first: u32::try_from(first).unwrap_or(u32::MAX),
                        count: u32::try_from(changes.len() - first).unwrap_or(u32::MAX),
                    },
                ));
                // Remembered as the ordinal of its fence in the batch.
                p.fence_ordinal = Some(fences.len() as u32 - 1);
            }
        }
        let has_fences = !fences.is_empty();
        let bytes = state::Batch {
            shard_id: u64::from(b.shard.get()),
            changes,
            origin_node: b.node_id,
            fences,
        }
        .encode_to_vec();
        let started = Instant::now();
        let result = match commit(&b.raft, b.shard, bytes, &b.faults, b.tls.as_ref()).await {
            // Read your writes: complete only once this node's state machine has the batch
            // (a follower applies it a little after the leader), so a session loaded right
            // after its claim committed reflects everything before the claim.
            Ok(index) => applied_locally(&b.raft, index).await.map(|()| index),
            Err(e) => Err(e),
        };
        histogram!(COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        if result.is_err() {
            counter!(COMMIT_FAILURES_TOTAL).increment(1);
        }
        // Which fences did not hold (`None`: not known here; see `FenceNotes::take`).
        let failed = match result {
            Ok(index) if has_fences => b.fence_notes.take(index),
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
                b.broken.lock().insert(chain, now);
            }
            let positions: LogPositions = result
                .ok()
                .map(|index| LogPositions::from_slice(&[(b.shard.get(), index)]))
                .unwrap_or_default();
            p.handle.complete_at(outcome, positions);
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
    shard: ShardId,
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
                    shard,
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
#[allow(clippy::too_many_arguments)]
async fn forward_leg(
    me: NodeId,
    shard: ShardId,
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
        let result = forward(&leader_addr, shard, batch, tls.as_ref()).await;
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
    shard: ShardId,
    batch: Vec<u8>,
    tls: Option<&ClusterTls>,
) -> Result<u64, Forwarded> {
    let Ok(mut client) = cluster_client(leader_addr, tls) else {
        return Err(Forwarded::Failed);
    };
    let mut req = tonic::Request::new(raftmq_proto::raft::ProposeRequest {
        shard_id: u64::from(shard.get()),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A router over `n` shards whose batchers are plain channels the test reads.
    fn router(n: u32) -> (Arc<Router>, Vec<mpsc::UnboundedReceiver<Proposal>>) {
        let (batchers, receivers) = (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        let router = Arc::new(Router {
            batchers,
            count: ShardCount::new(n).expect("valid"),
            chains: Mutex::default(),
            broken: Arc::default(),
        });
        (router, receivers)
    }

    #[test]
    fn an_open_qos2_intent_is_taken_once_and_the_older_generation_goes_when_the_newer_fills() {
        let intents = Intents::default();
        let key = |pid: u16| (ByteStr::from("c"), pid);
        intents.insert(key(1), (7, vec![1, 3]));
        assert_eq!(intents.take(&key(1)), Some((7, vec![1, 3])));
        assert_eq!(intents.take(&key(1)), None, "taken once");
        // Packet ids 0.. fill the newer generation; the next insert retires it.
        for pid in 0..u16::try_from(Intents::GENERATION).expect("fits") {
            intents.insert(key(pid), (u64::from(pid), vec![2]));
        }
        intents.insert((ByteStr::from("d"), 1), (1, vec![2]));
        assert_eq!(
            intents.take(&key(5)),
            Some((5, vec![2])),
            "kept one generation more"
        );
        for pid in 0..u16::try_from(Intents::GENERATION).expect("fits") {
            intents.insert((ByteStr::from("e"), pid), (1, vec![2]));
        }
        intents.insert((ByteStr::from("f"), 1), (1, vec![2]));
        assert_eq!(intents.take(&key(6)), None, "dropped with its generation");
        assert!(intents.take(&(ByteStr::from("d"), 1)).is_some());
        // A packet id opened again replaces its older intent.
        intents.insert((ByteStr::from("f"), 1), (9, vec![4]));
        assert_eq!(intents.take(&(ByteStr::from("f"), 1)), Some((9, vec![4])));
        assert_eq!(intents.take(&(ByteStr::from("f"), 1)), None);
    }

    /// A part for shard `shard` whose one change names `tag` (a client id), and its commit.
    fn part(shard: u32, tag: &str) -> (Ready, Commit) {
        let change = state::Change {
            change: Some(ProtoChange::SessionEnded(state::SessionEnded {
                client_id: tag.to_owned(),
            })),
        };
        proposal(
            Part {
                shard: ShardId::new(shard),
                changes: vec![change],
            },
            None,
            None,
        )
    }

    /// The tags of the proposals waiting in a batcher's queue.
    fn queued(rx: &mut mpsc::UnboundedReceiver<Proposal>) -> Vec<(String, Proposal)> {
        let mut out = Vec::new();
        while let Ok(p) = rx.try_recv() {
            let tag = match &p.changes[0].change {
                Some(ProtoChange::SessionEnded(e)) => e.client_id.clone(),
                _ => String::new(),
            };
            out.push((tag, p));
        }
        out
    }

    fn tags(q: &[(String, Proposal)]) -> Vec<&str> {
        q.iter().map(|(t, _)| t.as_str()).collect()
    }

    /// A connection's gated proposal sends its gate alone; its other parts, and every later
    /// proposal of the connection (gated or not), wait until the gate committed, then go in
    /// the order they were made. Another connection is not held up.
    #[test]
    fn a_gated_proposal_holds_back_the_connections_later_proposals_until_its_gate_commits() {
        let (router, mut rx) = router(3);
        let chain = Some((ByteStr::from("pub"), 1));
        // Proposal 1: gate in shard 1, rest in shard 2.
        let (gate1, gate1_commit) = part(1, "p1-gate");
        let (rest1, _) = part(2, "p1-rest");
        router.route(chain.clone(), Some(gate1), vec![rest1]);
        // Proposal 2, not gated: shards 1 and 3.
        let (a2, _) = part(1, "p2-a");
        let (b2, _) = part(3, "p2-b");
        router.route(chain.clone(), None, vec![a2, b2]);
        // Another connection's proposal to shard 2 goes at once.
        let (other, _) = part(2, "other");
        router.route(Some((ByteStr::from("else"), 1)), None, vec![other]);
        let mut first = queued(&mut rx[0]);
        assert_eq!(tags(&first), vec!["p1-gate"], "the gate alone");
        assert_eq!(tags(&queued(&mut rx[1])), vec!["other"]);
        assert!(queued(&mut rx[2]).is_empty());
        // The gate commits: the rest of 1, then 2, in order.
        let (_, gate) = first.remove(0);
        gate.handle
            .complete_at(Ok(()), LogPositions::from_slice(&[(1, 10)]));
        assert_eq!(gate1_commit.result(), Some(Ok(())));
        assert_eq!(
            gate1_commit.log_positions().expect("positions").as_slice(),
            &[(1, 10)],
            "the gate's own commit says where it committed"
        );
        assert_eq!(tags(&queued(&mut rx[1])), vec!["p1-rest"]);
        assert_eq!(tags(&queued(&mut rx[0])), vec!["p2-a"]);
        assert_eq!(tags(&queued(&mut rx[2])), vec!["p2-b"]);
        assert!(router.chains.lock().is_empty(), "nothing left held back");
    }

    /// A gate that fails never lets its other parts through: their waiters fail, and the
    /// connection's next proposals are sent (to be refused by the batchers' `Broken`).
    #[test]
    fn the_rest_of_a_proposal_whose_gate_committed_too_late_is_refused_with_the_chain() {
        let (router, mut rx) = router(2);
        let chain = Some((ByteStr::from("pub"), 1));
        let (gate, _) = part(1, "gate");
        let (mut rest, rest_commit) = part(2, "rest");
        // Its node was paused past the deadline while the gate was out.
        rest.1.not_after = Some(Instant::now() - Duration::from_millis(1));
        router.route(chain.clone(), Some(gate), vec![rest]);
        let (later, _) = part(2, "later");
        router.route(chain.clone(), None, vec![later]);
        let (_, gate) = queued(&mut rx[0]).remove(0);
        gate.handle.complete(Ok(()));
        assert_eq!(
            tags(&queued(&mut rx[1])),
            vec!["later"],
            "the rest is not proposed (the later proposal goes to its batcher, which refuses it)"
        );
        assert_eq!(
            rest_commit.result(),
            Some(Err(DurabilityError::Unavailable))
        );
        assert!(
            router.broken.lock().contains(chain.as_ref()),
            "the connection's later proposals are refused"
        );
        // Within the deadline the rest goes.
        let (router, mut rx) = self::router(2);
        let (gate, _) = part(1, "gate");
        let (mut rest, _) = part(2, "rest");
        rest.1.not_after = Some(Instant::now() + Duration::from_secs(60));
        router.route(chain, Some(gate), vec![rest]);
        let (_, gate) = queued(&mut rx[0]).remove(0);
        gate.handle.complete(Ok(()));
        assert_eq!(tags(&queued(&mut rx[1])), vec!["rest"]);
    }

    #[test]
    fn the_rest_of_a_proposal_whose_gate_failed_is_never_proposed() {
        let (router, mut rx) = router(2);
        let chain = Some((ByteStr::from("pub"), 1));
        let (gate, gate_commit) = part(1, "gate");
        let (rest, rest_commit) = part(2, "rest");
        let whole = Commit::all(vec![gate_commit, rest_commit.clone()]);
        router.route(chain.clone(), Some(gate), vec![rest]);
        let (later, _) = part(2, "later");
        router.route(chain, None, vec![later]);
        let (_, gate) = queued(&mut rx[0]).remove(0);
        gate.handle.complete(Err(DurabilityError::Unavailable));
        assert_eq!(tags(&queued(&mut rx[1])), vec!["later"]);
        assert_eq!(
            rest_commit.result(),
            Some(Err(DurabilityError::Unavailable))
        );
        assert_eq!(whole.result(), Some(Err(DurabilityError::Unavailable)));
    }
}
