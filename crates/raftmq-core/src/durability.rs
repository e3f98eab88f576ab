//! The seam between the broker's in-memory state and durable (replicated) storage.
//!
//! The broker keeps all state in memory for speed and reports every change that a persistent
//! session or a retained message must survive as a [`StateChange`] to a [`Durability`]
//! implementation, which returns a [`Commit`]. Acknowledgements that promise durability wait for
//! that commit: CONNACK for a persistent session, SUBACK/UNSUBACK on one, PUBACK/PUBREC for a
//! QoS 1/2 message that a persistent session will receive or that sets a retained message, and
//! PUBREL towards a persistent subscriber. Everything else (QoS 0, clean sessions, online
//! delivery) never waits.
//!
//! [`InMemory`] commits at once and remembers nothing (a single node without a data dir). The
//! Raft-replicated RocksDB store implements the same trait; on start-up the broker is rebuilt
//! from [`Durability::recover`].
//!
//! Messages are stored once, under a [`MessageId`], and referenced by every session that needs
//! them: fan-out to many persistent sessions is one stored message, not one copy per session.

use crate::message::Message;
use crate::session::SubEntry;
use parking_lot::Mutex;
use raftmq_codec::{ByteStr, QoS};
use smallvec::SmallVec;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};

/// Identifies a stored message cluster-wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub u64);

/// A delivery of a stored message to one persistent session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTarget {
    pub client_id: ByteStr,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: SmallVec<[u32; 2]>,
}

/// A will as stored with its session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WillRecord {
    pub message: Arc<Message>,
    pub delay_secs: u32,
    pub message_expiry_secs: Option<u32>,
}

impl WillRecord {
    /// The will as the message to publish at `now`: its expiry counts from publication
    /// (MQTT 5 §3.1.3.2.4).
    pub fn into_message(self, now: std::time::Instant) -> Arc<Message> {
        let mut message = Arc::unwrap_or_clone(self.message);
        message.received_at = now;
        message.expires_at = self
            .message_expiry_secs
            .map(|s| now + std::time::Duration::from_secs(s.into()));
        Arc::new(message)
    }
}

/// How a session's connection ended, as recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetachRecord {
    /// Normal DISCONNECT: the will is discarded.
    Normal,
    /// The will is (or was) published.
    WillPublished,
    /// Abnormal end: the will waits for its delay.
    Abnormal,
}

/// One change of durable state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StateChange {
    /// A connection attached to the persistent session of `client_id` (creating it, or replacing
    /// it when `clean_start`). `epoch` is the attachment's fencing token.
    SessionOpened {
        client_id: ByteStr,
        epoch: u64,
        clean_start: bool,
        expiry_secs: u32,
        will: Option<WillRecord>,
    },
    /// The connection of `client_id` ended; expiry counts from here.
    SessionDetached {
        client_id: ByteStr,
        epoch: u64,
        how: DetachRecord,
        expiry_secs: u32,
    },
    /// The session ended (expired, replaced by a clean session, or removed).
    SessionEnded {
        client_id: ByteStr,
    },
    Subscribed {
        client_id: ByteStr,
        filter: Arc<str>,
        entry: SubEntry,
    },
    Unsubscribed {
        client_id: ByteStr,
        filter: Arc<str>,
    },
    /// A delayed will was published (it must not be published again after recovery).
    WillPublished {
        client_id: ByteStr,
    },
    /// A message to deliver to persistent sessions, stored once for all of them.
    MessageStored {
        id: MessageId,
        message: Arc<Message>,
        targets: Vec<StoredTarget>,
    },
    /// A stored message was sent to a session under `packet_id` (redeliveries reuse it).
    MessageSent {
        client_id: ByteStr,
        id: MessageId,
        packet_id: u16,
    },
    /// A session acknowledged a stored message (PUBACK, or PUBCOMP for QoS 2).
    MessageAcked {
        client_id: ByteStr,
        id: MessageId,
    },
    /// A session answered PUBREC for a stored QoS 2 message: PUBREL is next on redelivery.
    MessageReleased {
        client_id: ByteStr,
        id: MessageId,
    },
    /// A persistent session received QoS 2 `packet_id` from its client (PUBREC sent).
    /// `message_id`: the id the message is stored under for persistent sessions, if any. A
    /// store that cannot record the message atomically with this change (its sessions live in
    /// other shards) keeps the id, and a resent PUBLISH is stored again under it
    /// ([`SessionImage::qos2_reroute`]); the store then keeps it from being stored twice.
    IncomingQos2Received {
        client_id: ByteStr,
        packet_id: u16,
        message_id: Option<MessageId>,
    },
    /// The client's PUBREL completed that exchange.
    IncomingQos2Completed {
        client_id: ByteStr,
        packet_id: u16,
    },
    RetainedSet {
        message: Arc<Message>,
    },
    RetainedCleared {
        topic: ByteStr,
    },
    /// Node `node` was declared down: the proposing node adopts the persistent sessions it
    /// owned (ownership is not part of [`Recovered`]: no effect on this model). Void if `node`
    /// proposed anything committed after log index `seen` (the declaring node's view when it
    /// decided; 0: unconditional): it is back, and keeps its sessions and wills.
    NodeDown {
        node: u64,
        seen: u64,
        /// The client ids of the node's sessionless wills the declaring node publishes (the
        /// node publishes the others it held: see `Broker::settle_handed_over_wills`). `None`:
        /// a declaring node of an older version, which listed nothing (the node drops all).
        wills: Option<Vec<ByteStr>>,
    },
}

/// Why a change could not be made durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurabilityError {
    /// No quorum, no leader, or the outcome is unknown: refuse with Server Unavailable (or send
    /// the client to another node), retry later.
    #[error("durable storage unavailable")]
    Unavailable,
    /// This node's store failed to read or write: the stored data is kept as it is and the
    /// client is refused (CONNACK 0x80 Unspecified error; 3.1.1 return code 3).
    #[error("the local store failed")]
    Storage,
}

/// Where a change committed: `(shard, log index)` for each replicated log it went to (one
/// entry for a single log; several when a change was split over shards), shard ids ascending.
pub type LogPositions = SmallVec<[(u32, u64); 2]>;

/// Merges `more` into `into`: per shard, the higher index.
fn merge_positions(into: &mut LogPositions, more: &[(u32, u64)]) {
    for &(shard, index) in more {
        match into.binary_search_by_key(&shard, |(s, _)| *s) {
            Ok(at) => into[at].1 = into[at].1.max(index),
            Err(at) => into.insert(at, (shard, index)),
        }
    }
}

#[derive(Debug, Default)]
struct CommitInner {
    result: Option<Result<(), DurabilityError>>,
    /// Where the change was committed in the replicated logs, when the implementation says.
    positions: LogPositions,
    wakers: SmallVec<[Waker; 1]>,
}

/// Completion of a [`Durability::propose`]: a future that any number of clones can await.
#[derive(Clone, Debug)]
pub struct Commit(Option<Arc<Mutex<CommitInner>>>);

/// Resolves a pending [`Commit`].
#[derive(Debug)]
pub struct CommitHandle(Arc<Mutex<CommitInner>>);

impl Commit {
    /// An already committed change.
    pub fn ready() -> Commit {
        Commit(None)
    }

    /// A commit resolved later through the returned handle.
    pub fn pending() -> (Commit, CommitHandle) {
        let inner = Arc::new(Mutex::new(CommitInner::default()));
        (Commit(Some(inner.clone())), CommitHandle(inner))
    }

    /// The result, if known.
    pub fn result(&self) -> Option<Result<(), DurabilityError>> {
        match &self.0 {
            None => Some(Ok(())),
            Some(inner) => inner.lock().result,
        }
    }

    /// Where in the replicated logs the change committed, once it has (`None` while pending,
    /// after a failure, or when the implementation has no log; a combined commit
    /// ([`Commit::all`]) has the positions of all its parts).
    pub fn log_positions(&self) -> Option<LogPositions> {
        let inner = self.0.as_ref()?.lock();
        match inner.result {
            Some(Ok(())) if !inner.positions.is_empty() => Some(inner.positions.clone()),
            _ => None,
        }
    }

    /// Polls for the result, registering the waker.
    pub fn poll_result(&self, cx: &mut Context<'_>) -> Poll<Result<(), DurabilityError>> {
        let Some(inner) = &self.0 else {
            return Poll::Ready(Ok(()));
        };
        let mut inner = inner.lock();
        match inner.result {
            Some(r) => Poll::Ready(r),
            None => {
                if !inner.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                    inner.wakers.push(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Commit {
    /// A commit that already failed with `error`.
    pub fn failed(error: DurabilityError) -> Commit {
        let (commit, handle) = Commit::pending();
        handle.complete(Err(error));
        commit
    }

    /// Resolves when all of `parts` have: `Ok` if they all succeeded, else the first error
    /// seen. Needs no executor: the parts' completions drive it.
    pub fn all(parts: Vec<Commit>) -> Commit {
        // Parts already committed are left out, unless they say where (their positions are
        // the combined commit's too).
        let mut parts: Vec<Commit> = parts
            .into_iter()
            .filter(|c| c.result() != Some(Ok(())) || c.log_positions().is_some())
            .collect();
        match parts.len() {
            0 => Commit::ready(),
            1 => parts.pop().unwrap_or_else(Commit::ready),
            _ => {
                let (commit, handle) = Commit::pending();
                let joiner = Arc::new(Joiner {
                    parts,
                    handle: Mutex::new(Some(handle)),
                });
                joiner.check();
                commit
            }
        }
    }
}

impl Commit {
    /// Runs `f` with the result once the commit resolves (at once if it has), on the thread
    /// that resolves it. Needs no executor.
    pub fn on_complete(&self, f: impl FnOnce(Result<(), DurabilityError>) + Send + 'static) {
        if let Some(result) = self.result() {
            f(result);
            return;
        }
        let waiter = Arc::new(OnComplete {
            commit: self.clone(),
            f: Mutex::new(Some(f)),
        });
        waiter.check();
    }
}

impl Commit {
    /// Resolves `Ok` once this one resolves, whatever its result (to order work after it
    /// without inheriting its failure).
    pub fn settled(&self) -> Commit {
        if self.result().is_some() {
            return Commit::ready();
        }
        let (commit, handle) = Commit::pending();
        self.on_complete(move |_| handle.complete(Ok(())));
        commit
    }
}

/// Drives [`Commit::on_complete`].
struct OnComplete<F> {
    commit: Commit,
    f: Mutex<Option<F>>,
}

impl<F: FnOnce(Result<(), DurabilityError>) + Send + 'static> OnComplete<F> {
    fn check(self: &Arc<Self>) {
        let waker = Waker::from(self.clone());
        let mut cx = Context::from_waker(&waker);
        if let Poll::Ready(result) = self.commit.poll_result(&mut cx)
            && let Some(f) = self.f.lock().take()
        {
            f(result);
        }
    }
}

impl<F: FnOnce(Result<(), DurabilityError>) + Send + 'static> std::task::Wake for OnComplete<F> {
    fn wake(self: Arc<Self>) {
        self.check();
    }
}

/// Drives [`Commit::all`]: woken by each part's completion.
struct Joiner {
    parts: Vec<Commit>,
    handle: Mutex<Option<CommitHandle>>,
}

impl Joiner {
    fn check(self: &Arc<Self>) {
        let waker = Waker::from(self.clone());
        let mut cx = Context::from_waker(&waker);
        let mut pending = false;
        for part in &self.parts {
            match part.poll_result(&mut cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    if let Some(h) = self.handle.lock().take() {
                        h.complete(Err(e));
                    }
                    return;
                }
                Poll::Pending => pending = true,
            }
        }
        if !pending && let Some(h) = self.handle.lock().take() {
            let mut positions = LogPositions::new();
            for part in &self.parts {
                if let Some(p) = part.log_positions() {
                    merge_positions(&mut positions, &p);
                }
            }
            h.complete_at(Ok(()), positions);
        }
    }
}

impl std::task::Wake for Joiner {
    fn wake(self: Arc<Self>) {
        self.check();
    }
}

impl Future for Commit {
    type Output = Result<(), DurabilityError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.poll_result(cx)
    }
}

impl CommitHandle {
    /// Resolves the commit and wakes its waiters.
    pub fn complete(self, result: Result<(), DurabilityError>) {
        self.complete_at(result, LogPositions::new());
    }

    /// [`CommitHandle::complete`], saying where in the replicated logs the change committed
    /// (see [`Commit::log_positions`]).
    pub fn complete_at(self, result: Result<(), DurabilityError>, positions: LogPositions) {
        let wakers = {
            let mut inner = self.0.lock();
            inner.result = Some(result);
            inner.positions = positions;
            std::mem::take(&mut inner.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }
}

impl Drop for CommitHandle {
    fn drop(&mut self) {
        // A handle dropped without an answer must not leave its waiters hanging.
        let wakers = {
            let mut inner = self.0.lock();
            if inner.result.is_some() {
                return;
            }
            inner.result = Some(Err(DurabilityError::Unavailable));
            std::mem::take(&mut inner.wakers)
        };
        wakers.into_iter().for_each(Waker::wake);
    }
}

/// A persistent session as recovered from durable storage.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SessionImage {
    pub client_id: ByteStr,
    pub expiry_secs: u32,
    pub subscriptions: Vec<(Arc<str>, SubEntry)>,
    /// Stored messages not yet acknowledged, in delivery order.
    pub messages: Vec<StoredDelivery>,
    /// Incoming QoS 2 packet ids awaiting PUBREL.
    pub incoming_qos2: Vec<u16>,
    /// Of those, the ones whose message may not be stored for every session yet (it went to
    /// several shards, and the proposer did not learn that all of them committed): a resent
    /// PUBLISH with that packet id is stored again under the same message id, which the
    /// store de-duplicates, instead of being only acknowledged.
    pub qos2_reroute: Vec<(u16, MessageId)>,
    pub will: Option<WillRecord>,
}

/// A stored message pending for one session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredDelivery {
    pub id: MessageId,
    pub message: Arc<Message>,
    pub target: StoredTarget,
    /// The packet id it was sent with, if it was sent.
    pub packet_id: Option<u16>,
    /// PUBREC received (QoS 2): PUBREL is what gets resent.
    pub released: bool,
}

/// Durable state as recovered at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    pub sessions: Vec<SessionImage>,
    pub retained: Vec<Arc<Message>>,
    /// Subscriptions of persistent sessions that another node owns (claimed through it): not
    /// restored here, but messages published here must be stored for them. `(client id,
    /// filter as subscribed, options)`.
    pub remote_subscriptions: Vec<(ByteStr, Arc<str>, SubEntry)>,
}

/// The condition a fenced proposal takes effect under: the session named still belongs to
/// what made the proposal. Checked where the changes are applied, in log order, so a proposal
/// that commits late (its proposer gave up on it, or never learned that it committed) cannot
/// act on a session that a newer connection has claimed since: whatever is applied before the
/// claim is in the state the new connection loads, whatever comes after it is dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fence {
    /// Made by the connection attached with `epoch` (its `SessionOpened`), on the proposing
    /// node: applies only while that claim is the session's latest.
    Attached { client_id: ByteStr, epoch: u64 },
    /// Made for a disconnected session owned by the proposing node (its delayed will, its
    /// expiry), by the timer set for `epoch`: applies while the session is still owned by that
    /// node and either offline or still held by `epoch` (whose detach may not have been
    /// recorded), not once another connection has claimed it.
    Offline { client_id: ByteStr, epoch: u64 },
}

/// Durable storage for broker state.
pub trait Durability: Send + Sync + 'static {
    /// Records `changes` (in order, atomically as a batch); the commit resolves once they are
    /// durable. Implementations batch concurrent proposals (group commit).
    fn propose(&self, changes: Vec<StateChange>) -> Commit;

    /// [`Self::propose`] under `fence`: the changes take effect only if the fence holds when
    /// they are applied; if it does not, none of them does and the commit fails
    /// ([`DurabilityError::Unavailable`]: the proposer's connection has been taken over).
    /// The default (a store only this node writes, where the broker's own locks already
    /// order claims and changes) ignores the fence.
    fn propose_fenced(&self, fence: Fence, changes: Vec<StateChange>) -> Commit {
        let _ = fence;
        self.propose(changes)
    }

    /// [`Self::propose`] (or [`Self::propose_fenced`] with `fence`) for a change one
    /// connection made without a fence (a QoS 1 PUBLISH): `chain` names the connection (its
    /// client id and epoch), as a [`Fence::Attached`] does. Once one proposal of a connection
    /// failed, an implementation that can fail refuses its later ones without proposing them,
    /// so what one connection proposed takes effect in order, as a prefix: never a later
    /// message stored while an earlier one, which its client will resend, was not (MQTT 4.6
    /// order). The default has nothing that fails out of order and ignores the chain.
    fn propose_chained(
        &self,
        chain: (ByteStr, u64),
        fence: Option<Fence>,
        changes: Vec<StateChange>,
    ) -> Commit {
        let _ = chain;
        match fence {
            Some(fence) => self.propose_fenced(fence, changes),
            None => self.propose(changes),
        }
    }

    /// A fresh, never reused message id.
    fn next_message_id(&self) -> MessageId;

    /// The durable state, to rebuild the broker at start-up. An error means the store could
    /// not be read: the broker must not start (never "start empty" over stored sessions).
    fn recover(&self) -> Result<Recovered, DurabilityError>;

    /// Reads the stored state of one persistent session once `claim` (the connection's
    /// `SessionOpened`) has committed, when this node can read durable state written by
    /// others (a cluster node loading a session its client created elsewhere). The read
    /// reflects everything committed before the claim; it must not block the caller (a
    /// connection task): implementations read off the async runtime and complete the
    /// returned load, which fails with the claim's error or [`DurabilityError::Storage`].
    /// The default: nothing stored elsewhere to load.
    fn load_session(&self, _client_id: &ByteStr, claim: Commit) -> SessionLoad {
        SessionLoad::after(claim, None)
    }

    /// The shard whose log holds session `client_id`'s state: the log the index a session
    /// load reflects is of, and the one of a commit's [`Commit::log_positions`] that stored
    /// anything for the session. The default: one log, shard 1.
    fn shard_of(&self, _client_id: &[u8]) -> u32 {
        1
    }

    /// How many shards (logs) the state is split over. With one, a message's store and a
    /// later claim go through one log in order, so the checks that only several shards need
    /// are skipped.
    fn shards(&self) -> u32 {
        1
    }
}

/// The stored session found by [`Durability::load_session`], with the log index it reflects
/// (`None`: nothing to resume).
pub type LoadedSession = Option<(SessionImage, u64)>;

/// A session being read from durable storage after its claim: [`Self::commit`] resolves when
/// the claim committed and the read is done (or failed); then [`Self::take`] gives the image.
#[derive(Clone, Debug)]
pub struct SessionLoad {
    commit: Commit,
    slot: Arc<Mutex<LoadedSession>>,
}

/// Completes a pending [`SessionLoad`].
#[derive(Debug)]
pub struct SessionLoadHandle {
    handle: CommitHandle,
    slot: Arc<Mutex<LoadedSession>>,
}

impl SessionLoad {
    /// A load completed by the returned handle.
    pub fn pending() -> (SessionLoad, SessionLoadHandle) {
        let (commit, handle) = Commit::pending();
        let slot = Arc::new(Mutex::new(None));
        (
            SessionLoad {
                commit,
                slot: slot.clone(),
            },
            SessionLoadHandle { handle, slot },
        )
    }

    /// A load that completes with `found` once `claim` has (and fails as it fails).
    pub fn after(claim: Commit, found: LoadedSession) -> SessionLoad {
        SessionLoad {
            commit: claim,
            slot: Arc::new(Mutex::new(found)),
        }
    }

    /// Resolves when the claim committed and the session was read.
    pub fn commit(&self) -> Commit {
        self.commit.clone()
    }

    /// The session read (once [`Self::commit`] succeeded), taken once.
    pub fn take(&self) -> LoadedSession {
        self.slot.lock().take()
    }
}

impl SessionLoadHandle {
    /// Completes the load with what was read, or the error that prevented it.
    pub fn complete(self, result: Result<LoadedSession, DurabilityError>) {
        let result = result.map(|found| *self.slot.lock() = found);
        self.handle.complete(result);
    }
}

/// No durability: every change commits at once and nothing survives the process.
#[derive(Debug, Default)]
pub struct InMemory {
    next_id: AtomicU64,
}

impl Durability for InMemory {
    fn propose(&self, _changes: Vec<StateChange>) -> Commit {
        Commit::ready()
    }

    fn next_message_id(&self) -> MessageId {
        MessageId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn recover(&self) -> Result<Recovered, DurabilityError> {
        Ok(Recovered::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct Flag(std::sync::atomic::AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn pending_commit_wakes_its_waiter_when_completed() {
        let (commit, handle) = Commit::pending();
        let flag = Arc::new(Flag(false.into()));
        let waker = Waker::from(flag.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(commit.poll_result(&mut cx).is_pending());
        handle.complete(Ok(()));
        assert!(flag.0.load(Ordering::SeqCst));
        assert_eq!(commit.poll_result(&mut cx), Poll::Ready(Ok(())));
        assert_eq!(commit.clone().result(), Some(Ok(())));
    }

    #[test]
    fn dropped_handle_fails_the_commit() {
        let (commit, handle) = Commit::pending();
        drop(handle);
        assert_eq!(commit.result(), Some(Err(DurabilityError::Unavailable)));
    }
}

/// The durable state as a pure function of the [`StateChange`]s applied to it, in order: the
/// reference semantics of the replicated state machine. Deterministic (no clock, no randomness).
/// Messages are held once, with the number of sessions still referencing them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateImage {
    sessions: std::collections::BTreeMap<ByteStr, ImageSession>,
    messages: std::collections::BTreeMap<MessageId, (Arc<Message>, usize)>,
    retained: std::collections::BTreeMap<ByteStr, Arc<Message>>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ImageSession {
    expiry_secs: u32,
    subscriptions: std::collections::BTreeMap<Arc<str>, SubEntry>,
    /// In delivery order.
    deliveries: Vec<ImageDelivery>,
    incoming_qos2: std::collections::BTreeSet<u16>,
    will: Option<WillRecord>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ImageDelivery {
    id: MessageId,
    target: StoredTarget,
    packet_id: Option<u16>,
    released: bool,
}

impl StateImage {
    /// Applies one change.
    pub fn apply(&mut self, change: &StateChange) {
        match change {
            StateChange::SessionOpened {
                client_id,
                clean_start,
                expiry_secs,
                will,
                ..
            } => {
                if *clean_start {
                    self.end_session(client_id);
                }
                let s = self.sessions.entry(client_id.clone()).or_default();
                s.expiry_secs = *expiry_secs;
                s.will = will.clone();
            }
            StateChange::SessionDetached {
                client_id,
                how,
                expiry_secs,
                ..
            } => {
                if let Some(s) = self.sessions.get_mut(client_id) {
                    s.expiry_secs = *expiry_secs;
                    if *how != DetachRecord::Abnormal {
                        s.will = None;
                    }
                }
            }
            StateChange::SessionEnded { client_id } => self.end_session(client_id),
            StateChange::WillPublished { client_id } => {
                if let Some(s) = self.sessions.get_mut(client_id) {
                    s.will = None;
                }
            }
            StateChange::Subscribed {
                client_id,
                filter,
                entry,
            } => {
                if let Some(s) = self.sessions.get_mut(client_id) {
                    s.subscriptions.insert(filter.clone(), *entry);
                }
            }
            StateChange::Unsubscribed { client_id, filter } => {
                if let Some(s) = self.sessions.get_mut(client_id) {
                    s.subscriptions.remove(filter);
                }
            }
            StateChange::MessageStored {
                id,
                message,
                targets,
            } => {
                let mut refs = 0;
                for target in targets {
                    if let Some(s) = self.sessions.get_mut(&target.client_id) {
                        s.deliveries.push(ImageDelivery {
                            id: *id,
                            target: target.clone(),
                            packet_id: None,
                            released: false,
                        });
                        refs += 1;
                    }
                }
                if refs > 0 {
                    self.messages.insert(*id, (message.clone(), refs));
                }
            }
            StateChange::MessageSent {
                client_id,
                id,
                packet_id,
            } => {
                if let Some(d) = self.delivery_mut(client_id, *id) {
                    d.packet_id = Some(*packet_id);
                }
            }
            StateChange::MessageReleased { client_id, id } => {
                if let Some(d) = self.delivery_mut(client_id, *id) {
                    d.released = true;
                }
            }
            StateChange::MessageAcked { client_id, id } => {
                let removed = self.sessions.get_mut(client_id).and_then(|s| {
                    let pos = s.deliveries.iter().position(|d| d.id == *id)?;
                    Some(s.deliveries.remove(pos))
                });
                if removed.is_some() {
                    self.release_message(*id);
                }
            }
            // The re-route id is the store's business (kept only when it could not store the
            // message atomically with this record): not part of this model.
            StateChange::IncomingQos2Received {
                client_id,
                packet_id,
                ..
            } => {
                if let Some(s) = self.sessions.get_mut(client_id) {
                    s.incoming_qos2.insert(*packet_id);
                }
            }
            StateChange::IncomingQos2Completed {
                client_id,
                packet_id,
            } => {
                if let Some(s) = self.sessions.get_mut(client_id) {
                    s.incoming_qos2.remove(packet_id);
                }
            }
            StateChange::RetainedSet { message } => {
                self.retained.insert(message.topic.clone(), message.clone());
            }
            StateChange::RetainedCleared { topic } => {
                self.retained.remove(topic);
            }
            StateChange::NodeDown { .. } => {}
        }
    }

    fn delivery_mut(&mut self, client_id: &ByteStr, id: MessageId) -> Option<&mut ImageDelivery> {
        self.sessions
            .get_mut(client_id)?
            .deliveries
            .iter_mut()
            .find(|d| d.id == id)
    }

    fn release_message(&mut self, id: MessageId) {
        if let Some((_, refs)) = self.messages.get_mut(&id) {
            *refs -= 1;
            if *refs == 0 {
                self.messages.remove(&id);
            }
        }
    }

    fn end_session(&mut self, client_id: &ByteStr) {
        if let Some(s) = self.sessions.remove(client_id) {
            for d in s.deliveries {
                self.release_message(d.id);
            }
        }
    }

    /// Number of stored messages (each counted once, however many sessions reference it).
    pub fn stored_messages(&self) -> usize {
        self.messages.len()
    }

    /// The state in the form the broker recovers from.
    pub fn recovered(&self) -> Recovered {
        let sessions = self
            .sessions
            .iter()
            .map(|(client_id, s)| SessionImage {
                client_id: client_id.clone(),
                expiry_secs: s.expiry_secs,
                subscriptions: s
                    .subscriptions
                    .iter()
                    .map(|(f, e)| (f.clone(), *e))
                    .collect(),
                messages: s
                    .deliveries
                    .iter()
                    .filter_map(|d| {
                        let (message, _) = self.messages.get(&d.id)?;
                        Some(StoredDelivery {
                            id: d.id,
                            message: message.clone(),
                            target: d.target.clone(),
                            packet_id: d.packet_id,
                            released: d.released,
                        })
                    })
                    .collect(),
                incoming_qos2: s.incoming_qos2.iter().copied().collect(),
                qos2_reroute: Vec::new(),
                will: s.will.clone(),
            })
            .collect();
        Recovered {
            remote_subscriptions: Vec::new(),
            sessions,
            retained: self.retained.values().cloned().collect(),
        }
    }
}

/// Durability that keeps a [`StateImage`] in memory: state survives rebuilding the broker in the
/// same process (tests, embedding), not a process restart. Commits at once.
#[derive(Debug, Default)]
pub struct MemoryDurability {
    image: Mutex<StateImage>,
    next_id: AtomicU64,
}

impl MemoryDurability {
    /// A copy of the current state.
    pub fn image(&self) -> StateImage {
        self.image.lock().clone()
    }
}

impl Durability for MemoryDurability {
    fn propose(&self, changes: Vec<StateChange>) -> Commit {
        let mut image = self.image.lock();
        for change in &changes {
            image.apply(change);
        }
        Commit::ready()
    }

    fn next_message_id(&self) -> MessageId {
        MessageId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }

    fn recover(&self) -> Result<Recovered, DurabilityError> {
        Ok(self.image.lock().recovered())
    }
}
