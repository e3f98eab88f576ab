//! The broker: everything the connections of one node share.
//!
//! [`Broker`] holds the session registry, the subscription index, the retained messages and
//! the timers of disconnected sessions, and routes every publish to the sessions that want it.
//! It is split by concern; the single-node broker is everything outside `cluster/`:
//!
//! - `sessions` — attach (resume, takeover, clean start), detach (wills, expiry), ending and
//!   unloading sessions;
//! - `subscriptions` — SUBSCRIBE/UNSUBSCRIBE of one filter;
//! - `routing` — the delivery pass of a publish (overlapping and shared subscriptions,
//!   queueing after a commit);
//! - `retained` — retained messages within their limits;
//! - `timers` — delayed wills and session expiry;
//! - `recovery` — sessions restored from durable storage (start-up, or a stored session
//!   resumed here);
//! - `admin` — listings and actions of the admin API;
//! - `cluster` — what a node of a cluster adds: live forwarding to peers, the mirror of the
//!   replicated state (other nodes' persistent subscriptions, their committed changes, adopted
//!   and fenced sessions). On a single node it holds nothing and costs a few empty checks.
//!
//! **Lock order** (never take them the other way round): registry (`sessions`) → session →
//! index shard; the timer heap, the route tables and the live-delivery marks are leaves (never
//! held while taking another). Routing takes index read locks only while collecting matches,
//! then locks each target session on its own.
//!
//! **Fencing.** A connection's operations on its session go through
//! [`Session::lock_attached`], granted only for the epoch the connection attached with. Only
//! code in this module can lock a session regardless of its epoch ([`Unfenced`]): takeover,
//! fencing, timers and listings, which decide epochs themselves.

use crate::auth::{Access, AllowAll, Authenticator, Authorizer, Principal};
use crate::config::MqttConfig;
use crate::durability::{Commit, Durability, Fence, InMemory, SessionLoad, StateChange};
use crate::index::SubscriptionIndex;
use crate::message::Message;
use crate::retained::RetainedIndex;
use crate::session::{QueueLimits, Session, SubEntry};
use crate::stats::BrokerStats;
use crate::topic::TopicLimits;
use ahash::HashMap;
use parking_lot::Mutex;
use raftmq_codec::{ByteStr, ReasonCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

mod admin;
mod cluster;
mod recovery;
mod retained;
mod routing;
mod sessions;
mod subscriptions;
mod timers;
pub use admin::{ClientSummary, Kicked, SubscriptionSummary};
pub use cluster::{
    CLAIM_CLOCK_TOLERANCE, ENDED_WILLS_KEPT, Forwarder, Redirect, WillsAnnouncement, WillsOutcome,
};
pub use routing::Publisher;
use timers::Timers;

/// Proof that the caller is the broker: lets it lock a session whatever its epoch
/// ([`Session::lock_unfenced`]). Only this module and its children can make one, so a
/// connection can only reach its session through [`Session::lock_attached`].
#[derive(Clone, Copy)]
pub(crate) struct Unfenced(());

/// The one [`Unfenced`] token.
const UNFENCED: Unfenced = Unfenced(());

/// Session Expiry Interval meaning "never expires".
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// The operation was attempted by a connection whose session was taken over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("session taken over by another connection")]
pub struct TakenOver;

/// Result of attaching a connection to a session.
#[derive(Debug)]
pub struct Attached {
    pub session: Arc<Session>,
    /// The fencing token of this attachment.
    pub epoch: u64,
    /// Whether an existing session was resumed.
    pub session_present: bool,
    /// Resolves when the attachment is durable (CONNACK waits for it).
    pub commit: Commit,
    /// The session was not in memory and the client asked to resume it: `commit` then covers
    /// the claim and the read of the stored session (it may have been created through another
    /// node; the durability layer reads it off the caller's thread), and once it succeeded
    /// [`Broker::finish_attach`] restores what was read.
    pub load_after_commit: bool,
}

/// Result of routing a publish.
#[derive(Debug)]
pub struct Routed {
    /// Sessions the message was offered to.
    pub offered: usize,
    /// Resolves when the message is durable for every persistent session it was offered to
    /// (and its retained change recorded); the publisher's PUBACK/PUBREC waits for it.
    pub commit: Commit,
    /// The part of `commit` that records state (the message stored for persistent sessions,
    /// the retained change, the publisher's QoS 2 packet id), without the forwarding
    /// acknowledgements: once it succeeded the message is handled, even if a peer missed it.
    /// Deliveries held back for it (to offline persistent sessions; for a client's QoS 2
    /// PUBLISH, to every local session) are queued when it succeeds, whatever becomes of the
    /// publisher's connection, and dropped if it fails: a refused publish leaves nothing behind
    /// to be delivered or to fill the queue while the publisher retries.
    pub store: Commit,
    /// A connected session (not the publisher's own) whose queue is past the pause mark, with
    /// its congestion episode: the publisher should not be read from until it has room
    /// ([`Session::poll_room`]).
    pub congested: Option<(Arc<Session>, u64)>,
}

/// Result of one topic filter of a SUBSCRIBE.
#[derive(Debug)]
pub struct Subscribed {
    /// SUBACK reason code (the granted QoS on success).
    pub code: ReasonCode,
    /// The durable record to propose (persistent sessions only).
    pub change: Option<StateChange>,
}

/// How a connection ended, for will handling.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DetachKind {
    /// DISCONNECT with reason 0x00: discard the will.
    Normal,
    /// DISCONNECT with reason 0x04: publish the will now.
    WithWill,
    /// Network closed, protocol error, keep-alive timeout, server shutdown: the will is
    /// published after its delay (or when the session ends, if sooner).
    Abnormal,
}

/// The broker: everything shared by all connections of one node.
pub struct Broker {
    config: MqttConfig,
    topic_limits: TopicLimits,
    queue_limits: QueueLimits,
    index: SubscriptionIndex<Arc<Session>, SubEntry>,
    /// What a node of a cluster knows of the others (empty on a single node).
    cluster: cluster::ClusterState,
    retained: RetainedIndex<Arc<Message>>,
    /// Payload bytes of the retained messages stored.
    retained_bytes: AtomicU64,
    sessions: Mutex<HashMap<ByteStr, Arc<Session>>>,
    /// Stored sessions being read for a connection that resumes them here (by client id,
    /// with the attachment's epoch): a leaf lock.
    loading: Mutex<HashMap<ByteStr, (u64, SessionLoad)>>,
    timers: Mutex<Timers>,
    authenticator: Arc<dyn Authenticator>,
    authorizer: Arc<dyn Authorizer>,
    durability: Arc<dyn Durability>,
    stats: Arc<BrokerStats>,
    assigned_ids: AtomicU64,
    /// Source of session epochs. Broker-wide, so an epoch is never reused even by a new
    /// session object with the same client id (a stale timer must not match it).
    epochs: AtomicU64,
    id_prefix: String,
    rng: AtomicU64,
    node_id: u64,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// A broker that accepts everyone (see [`Broker::with_auth`]).
    pub fn new(config: MqttConfig) -> Self {
        Self::with_auth(config, Arc::new(AllowAll), Arc::new(AllowAll), 1)
    }

    /// A broker with the given authentication and authorization, on node `node_id` (used to
    /// make assigned client ids unique across a cluster).
    pub fn with_auth(
        config: MqttConfig,
        authenticator: Arc<dyn Authenticator>,
        authorizer: Arc<dyn Authorizer>,
        node_id: u64,
    ) -> Self {
        let topic_limits = TopicLimits {
            max_levels: config.max_topic_levels,
            max_len: config.max_topic_length,
        };
        let queue_limits = QueueLimits::new(
            config.max_queued_messages,
            config.queue_overflow,
            config.queue_qos0_offline,
            !config.backpressure_max_pause.0.is_zero(),
        );
        Broker {
            index: SubscriptionIndex::new(config.index_shards),
            cluster: cluster::ClusterState::new(config.index_shards),
            retained: RetainedIndex::new(),
            retained_bytes: AtomicU64::new(0),
            sessions: Mutex::new(HashMap::default()),
            loading: Mutex::new(HashMap::default()),
            timers: Mutex::new(Timers::default()),
            authenticator,
            authorizer,
            durability: Arc::new(InMemory::default()),
            stats: Arc::new(BrokerStats::default()),
            assigned_ids: AtomicU64::new(0),
            epochs: AtomicU64::new(0),
            id_prefix: format!("raftmq-{node_id}-"),
            rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15 ^ node_id),
            node_id,
            topic_limits,
            queue_limits,
            config,
        }
    }

    /// Starts this broker's session epochs above `base`. A clustered node passes a value that
    /// grows with wall-clock time, so that the epochs of a restarted node never repeat those of
    /// its earlier run: the replicated state checks fenced changes against the claim's
    /// `(node, epoch)` ([`Fence`]), and a late change of the earlier run must not match.
    pub fn with_epoch_base(self, base: u64) -> Self {
        self.epochs.store(base, Relaxed);
        self
    }

    /// Uses `durability` for persistent state (the default, [`InMemory`], keeps nothing).
    /// Call [`Broker::recover`] afterwards to load what it holds.
    pub fn with_durability(mut self, durability: Arc<dyn Durability>) -> Self {
        self.durability = durability;
        self
    }

    /// Proposes `changes` (nothing to do when empty).
    pub fn propose(&self, mut changes: Vec<StateChange>) -> Commit {
        // Records of messages delivered live ahead of their `MessageStored` follow it later.
        self.cluster.live.hold_back(&mut changes);
        if changes.is_empty() {
            Commit::ready()
        } else {
            self.durability.propose(changes)
        }
    }

    /// [`Self::propose`] under `fence` (see [`Fence`]): for changes made on behalf of one
    /// connection (or one disconnected session), which must not take effect once another
    /// connection has claimed the session.
    pub fn propose_fenced(&self, fence: Fence, mut changes: Vec<StateChange>) -> Commit {
        self.cluster.live.hold_back(&mut changes);
        if changes.is_empty() {
            Commit::ready()
        } else {
            self.durability.propose_fenced(fence, changes)
        }
    }

    /// [`Self::propose`] or [`Self::propose_fenced`] for changes made by the connection
    /// `chain` (client id, epoch): see [`Durability::propose_chained`].
    pub fn propose_chained(
        &self,
        chain: (ByteStr, u64),
        fence: Option<Fence>,
        mut changes: Vec<StateChange>,
    ) -> Commit {
        self.cluster.live.hold_back(&mut changes);
        if changes.is_empty() {
            Commit::ready()
        } else {
            self.durability.propose_chained(chain, fence, changes)
        }
    }

    /// The protocol settings.
    pub fn config(&self) -> &MqttConfig {
        &self.config
    }

    /// Topic length/level limits derived from the config.
    pub fn topic_limits(&self) -> &TopicLimits {
        &self.topic_limits
    }

    /// Queue length limits and backpressure marks derived from the config.
    pub fn queue_limits(&self) -> &QueueLimits {
        &self.queue_limits
    }

    /// Counters and gauges.
    pub fn stats(&self) -> &BrokerStats {
        &self.stats
    }

    /// The authenticator.
    pub fn authenticator(&self) -> &dyn Authenticator {
        &*self.authenticator
    }

    /// Whether `principal` may perform `access`.
    pub fn authorize(&self, principal: &Principal, access: Access<'_>) -> bool {
        self.authorizer.authorize(principal, access)
    }

    /// Whether each message delivered to `principal` must be authorized
    /// ([`Authorizer::checks_delivery`]).
    pub fn checks_delivery(&self, principal: &Principal) -> bool {
        self.authorizer.checks_delivery(principal)
    }

    /// A fresh client identifier for a client that connected with an empty one.
    pub fn assign_client_id(&self) -> ByteStr {
        let n = self.assigned_ids.fetch_add(1, Relaxed);
        let salt = self.next_random() & 0xFFFF_FFFF;
        ByteStr::from(format!("{}{n:x}-{salt:08x}", self.id_prefix))
    }

    /// A fencing token never handed out before.
    fn next_epoch(&self) -> u64 {
        self.epochs.fetch_add(1, Relaxed) + 1
    }

    fn next_random(&self) -> u64 {
        // splitmix64 over an atomic counter: cheap, lock-free, reproducible per node id.
        let mut z = self.rng.fetch_add(0x9E37_79B9_7F4A_7C15, Relaxed);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Number of sessions (online and offline).
    pub fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    /// The session of `client_id`, if one exists.
    pub fn session(&self, client_id: &str) -> Option<Arc<Session>> {
        self.sessions.lock().get(client_id).cloned()
    }

    /// All sessions (for admin listings).
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.sessions.lock().values().cloned().collect()
    }

    /// Number of subscriptions in the index.
    pub fn subscription_count(&self) -> usize {
        self.index.len()
    }

    /// Number of retained messages.
    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// Payload bytes of the retained messages stored.
    pub fn retained_bytes(&self) -> u64 {
        self.retained_bytes.load(Relaxed)
    }
}
