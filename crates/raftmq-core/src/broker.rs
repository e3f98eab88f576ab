//! The broker's shared state: session registry, subscription index, retained messages, timers
//! for delayed wills and session expiry, and routing of a publish to the sessions that want it.
//!
//! Lock order (never take them the other way round): registry → session → index shard.
//! Routing takes index read locks only while collecting matches, then locks each target
//! session on its own.

use crate::auth::{Access, AllowAll, Authenticator, Authorizer, Principal};
use crate::config::{MqttConfig, SharedStrategy};
use crate::durability::{
    Commit, DetachRecord, Durability, InMemory, MessageId, Recovered, SessionImage, StateChange,
    StoredTarget,
};
use crate::index::{Match, SubscriptionIndex};
use crate::limits::Limit;
use crate::message::{Delivery, Message};
use crate::retained::RetainedIndex;
use crate::session::{
    Enqueued, Outgoing, OutgoingEntry, PendingWill, QueueLimits, Session, SessionState, SubEntry,
    SubscriptionRecord,
};
use crate::stats::BrokerStats;
use crate::topic::{ParsedFilter, TopicLimits, TopicName, parse_subscription};
use ahash::HashMap;
use parking_lot::Mutex;
use raftmq_codec::{ByteStr, QoS, ReasonCode, RetainHandling, SubscriptionOptions};
use smallvec::SmallVec;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

mod admin;
mod live;
pub use admin::{ClientSummary, Kicked, SubscriptionSummary};

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
    /// The session was not in memory and the client asked to resume it: once `commit` has
    /// succeeded, [`Broker::finish_attach`] loads it from the replicated state (it may have been
    /// created through another node).
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

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Will,
    Expire,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Instant,
    kind: TimerKind,
    client_id: ByteStr,
    epoch: u64,
}

#[derive(Default)]
struct Timers {
    heap: BinaryHeap<Reverse<Timer>>,
    waker: Option<Waker>,
    /// A timer earlier than all others was scheduled since [`Broker::poll_timers_changed`]
    /// last reported Ready.
    changed: bool,
}

/// Plain (non-shared) subscriptions of persistent sessions owned by other nodes, by client id.
struct RemoteSubscriptions {
    index: SubscriptionIndex<ByteStr, SubEntry>,
    by_client: Mutex<HashMap<ByteStr, Vec<crate::topic::TopicFilter>>>,
}

impl RemoteSubscriptions {
    fn new(shards: usize) -> Self {
        RemoteSubscriptions {
            index: SubscriptionIndex::new(shards),
            by_client: Mutex::new(HashMap::default()),
        }
    }

    /// Records `client_id`'s subscription to `filter` (as subscribed). Shared subscriptions
    /// are not mirrored (see docs/cluster.md).
    fn add(&self, client_id: &ByteStr, filter: &str, entry: SubEntry, limits: &TopicLimits) {
        let Ok(parsed) = parse_subscription(filter, limits) else {
            return;
        };
        if parsed.share_group.is_some() {
            return;
        }
        let previous = self
            .index
            .subscribe(&parsed.filter, None, client_id.clone(), entry);
        if previous.is_none() {
            self.by_client
                .lock()
                .entry(client_id.clone())
                .or_default()
                .push(parsed.filter);
        }
    }

    fn remove(&self, client_id: &ByteStr, filter: &str, limits: &TopicLimits) {
        let Ok(parsed) = parse_subscription(filter, limits) else {
            return;
        };
        if parsed.share_group.is_some() {
            return;
        }
        self.index.unsubscribe(&parsed.filter, None, client_id);
        let mut by_client = self.by_client.lock();
        if let Some(filters) = by_client.get_mut(client_id) {
            filters.retain(|f| f.as_str() != parsed.filter.as_str());
            if filters.is_empty() {
                by_client.remove(client_id);
            }
        }
    }

    /// Forgets every subscription of `client_id`.
    fn clear(&self, client_id: &ByteStr) {
        let Some(filters) = self.by_client.lock().remove(client_id) else {
            return;
        };
        for filter in filters {
            self.index.unsubscribe(&filter, None, client_id);
        }
    }
}

/// Live forwarding to other nodes (implemented by the cluster layer, which owns the streams).
/// Must not block: implementations queue and count what they cannot take.
pub trait Forwarder: Send + Sync + 'static {
    /// Sends `message` to node `node`, for its ordinary subscribers if `plain`, and for one
    /// member of each shared subscription in `shared` (`$share/<group>/<filter>`). For QoS 1/2
    /// the returned commit resolves when the peer acknowledged it (the publisher's PUBACK waits
    /// for it: backpressure instead of loss); it fails when the message could not be queued.
    /// `stored`: the id under which this node stores the message (QoS 1/2) for persistent
    /// sessions held by other nodes, so the peer can deliver it to them at once and skip the
    /// replicated copy (see [`Broker::deliver_forwarded`]).
    fn forward(
        &self,
        node: u64,
        message: &Arc<Message>,
        plain: bool,
        shared: Vec<Arc<str>>,
        stored: Option<MessageId>,
    ) -> Commit;

    /// Tells every peer that `client_id` connected here at `at` with a session that is not
    /// stored (so no claim goes through the replicated log): a peer still holding an older
    /// connection or session for it ends them ([`Broker::claimed_elsewhere`]). Best effort.
    fn claim(&self, client_id: &ByteStr, at: Instant) {
        let _ = (client_id, at);
    }
}

/// Where this node's subscribers are (announced to peers), and where the peers' are.
struct Routes {
    /// Filters (as subscribed, `$share/...` included) with local subscribers: reference counts.
    local: Mutex<HashMap<Arc<str>, usize>>,
    /// Bumped on every change of `local`'s key set.
    generation: AtomicU64,
    /// Filters each peer announced, and the same as an index (keys: node ids).
    peers: Mutex<HashMap<u64, std::collections::HashSet<Arc<str>>>>,
    /// Values: the filter as announced (`$share/...` included), handed back to the peer.
    peer_index: SubscriptionIndex<u64, Arc<str>>,
    forwarder: std::sync::OnceLock<Arc<dyn Forwarder>>,
    /// Where MQTT 5 clients are sent when this node cannot commit (`Server Reference`).
    redirect: std::sync::OnceLock<Redirect>,
}

/// Names another server for a client this node cannot serve durably (e.g. no quorum).
pub type Redirect = Arc<dyn Fn() -> Option<String> + Send + Sync>;

impl Routes {
    fn new(shards: usize) -> Self {
        Routes {
            local: Mutex::new(HashMap::default()),
            generation: AtomicU64::new(0),
            peers: Mutex::new(HashMap::default()),
            peer_index: SubscriptionIndex::new(shards),
            forwarder: std::sync::OnceLock::new(),
            redirect: std::sync::OnceLock::new(),
        }
    }

    /// A local subscription to `key` was added (`+1`) or removed (`-1`). `$SYS` filters are
    /// per node and never announced.
    fn local_ref(&self, key: &Arc<str>, add: bool) {
        if key.starts_with("$SYS") {
            return;
        }
        let mut local = self.local.lock();
        if add {
            let count = local.entry(key.clone()).or_insert(0);
            *count += 1;
            if *count == 1 {
                self.generation.fetch_add(1, Relaxed);
            }
        } else if let Some(count) = local.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                local.remove(key);
                self.generation.fetch_add(1, Relaxed);
            }
        }
    }

    fn peer_add(&self, node: u64, key: &Arc<str>, limits: &TopicLimits) {
        if let Ok(parsed) = parse_subscription(key, limits) {
            self.peer_index.subscribe(
                &parsed.filter,
                parsed.share_group.as_deref(),
                node,
                key.clone(),
            );
        }
    }

    fn peer_remove(&self, node: u64, key: &Arc<str>, limits: &TopicLimits) {
        if let Ok(parsed) = parse_subscription(key, limits) {
            self.peer_index
                .unsubscribe(&parsed.filter, parsed.share_group.as_deref(), &node);
        }
    }
}

/// Which subscribers a routing pass serves.
#[derive(Clone, Copy)]
enum Scope<'a> {
    /// A publish received here: every local subscriber, peers with matching routes, and
    /// persistent sessions owned by other nodes (stored for them). `hold`: every local
    /// delivery waits for the commit (a client's QoS 2 PUBLISH).
    Origin { hold: bool },
    /// A message another node forwarded: local ordinary subscribers if `plain`, one local
    /// member of each listed shared subscription. Persistent sessions that the origin stored
    /// it for (under `stored`) get it live if connected and QoS 1 (once: the replicated copy
    /// is skipped), else through the replicated log.
    Forwarded {
        plain: bool,
        shared: &'a [Arc<str>],
        stored: Option<MessageId>,
    },
}

/// The broker: everything shared by all connections of one node.
pub struct Broker {
    config: MqttConfig,
    topic_limits: TopicLimits,
    queue_limits: QueueLimits,
    index: SubscriptionIndex<Arc<Session>, SubEntry>,
    /// Subscriptions of persistent sessions owned by other nodes (mirrored from the replicated
    /// log): QoS 1/2 messages published here are stored for them before the PUBACK.
    remote: RemoteSubscriptions,
    routes: Routes,
    retained: RetainedIndex<Arc<Message>>,
    /// Payload bytes of the retained messages stored.
    retained_bytes: AtomicU64,
    sessions: Mutex<HashMap<ByteStr, Arc<Session>>>,
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
    /// Stored QoS 1 messages delivered live to sessions here before their commit.
    live: live::LiveStored,
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
            remote: RemoteSubscriptions::new(config.index_shards),
            routes: Routes::new(config.index_shards),
            retained: RetainedIndex::new(),
            retained_bytes: AtomicU64::new(0),
            sessions: Mutex::new(HashMap::default()),
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
            live: live::LiveStored::default(),
            topic_limits,
            queue_limits,
            config,
        }
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
        self.live.hold_back(&mut changes);
        if changes.is_empty() {
            Commit::ready()
        } else {
            self.durability.propose(changes)
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

    /// Attaches a connection to the session of `client_id`: resumes it (clean start false and
    /// one exists), or replaces/creates it. A connection still attached to it is fenced off and
    /// woken so it closes with Session Taken Over.
    pub fn attach(
        &self,
        client_id: &ByteStr,
        clean_start: bool,
        expiry_secs: u32,
        will: Option<PendingWill>,
        now: Instant,
    ) -> Attached {
        let mut wills_to_publish = Vec::new();
        let mut changes = Vec::new();
        let attached = {
            let mut registry = self.sessions.lock();
            let resumed = match registry.get(client_id) {
                Some(existing) => {
                    let mut st = existing.state.lock();
                    let was_durable = existing.is_durable();
                    if st.online {
                        self.stats.takeovers.fetch_add(1, Relaxed);
                        self.stats.sessions_online.fetch_sub(1, Relaxed);
                        existing.set_online(&mut st, false);
                    }
                    // The previous connection's will (still attached, or waiting for its delay):
                    // due now if it has no delay or if clean start ends its session; otherwise
                    // cancelled, as the session got a new connection within the delay
                    // (MQTT 5 §3.1.2.5, §3.1.3.2.2).
                    if let Some(w) = st.will.take().filter(|w| w.delay_secs == 0 || clean_start) {
                        wills_to_publish.push(w);
                    }
                    st.epoch = self.next_epoch();
                    st.kick = None;
                    Session::notify(&mut st);
                    if clean_start {
                        self.discard_locked(existing, &mut st);
                        if was_durable {
                            existing.set_durable(false);
                            if expiry_secs == 0 {
                                changes.push(StateChange::SessionEnded {
                                    client_id: client_id.clone(),
                                });
                            }
                        }
                        None
                    } else {
                        drop(st);
                        Some(existing.clone())
                    }
                }
                None => None,
            };
            let session_present = resumed.is_some();
            let session = match resumed {
                Some(s) => s,
                None => {
                    let s = Arc::new(Session::new(client_id.clone(), expiry_secs));
                    if registry.insert(client_id.clone(), s.clone()).is_none() {
                        self.stats.sessions_total.fetch_add(1, Relaxed);
                    }
                    s
                }
            };
            let mut st = session.state.lock();
            st.epoch = self.next_epoch();
            st.notified = false;
            st.waker = None;
            st.kick = None;
            st.expiry_secs = expiry_secs;
            st.disconnected_at = None;
            st.attached_at = Some(now);
            session.set_online(&mut st, true);
            self.stats.sessions_online.fetch_add(1, Relaxed);
            let epoch = st.epoch;
            // A persistent session (or one that was, resumed with expiry 0 for this connection)
            // is recorded, with its will, before CONNACK.
            if expiry_secs > 0 || session.is_durable() {
                // A clean start ends the stored session, and with it its subscriptions. Otherwise
                // they stay remote until the session is loaded here (`finish_attach`): until
                // then publishes here must still be stored for it.
                if clean_start {
                    self.remote.clear(client_id);
                }
                session.set_durable(true);
                changes.push(StateChange::SessionOpened {
                    client_id: client_id.clone(),
                    epoch,
                    clean_start,
                    expiry_secs,
                    will: will.clone(),
                });
            }
            st.will = will;
            drop(st);
            Attached {
                session,
                epoch,
                session_present,
                commit: Commit::ready(),
                load_after_commit: !session_present && !clean_start,
            }
        };
        let attached = Attached {
            commit: self.propose(changes),
            ..attached
        };
        // Nothing goes through the log for a session that is not stored: tell the other nodes
        // (outside the registry lock).
        if !attached.session.is_durable()
            && let Some(forwarder) = self.routes.forwarder.get()
        {
            forwarder.claim(client_id, now);
        }
        for w in wills_to_publish {
            self.publish_will(w, now);
        }
        attached
    }

    /// Detaches the connection holding `epoch`. No-op if the session was taken over since.
    pub fn detach(&self, session: &Arc<Session>, epoch: u64, kind: DetachKind, now: Instant) {
        let mut publish_now = None;
        {
            let mut registry = self.sessions.lock();
            let mut st = session.state.lock();
            if st.epoch != epoch || !st.online {
                return;
            }
            session.set_online(&mut st, false);
            self.stats.sessions_online.fetch_sub(1, Relaxed);
            st.waker = None;
            st.disconnected_at = Some(now);
            match kind {
                DetachKind::Normal => st.will = None,
                DetachKind::WithWill => publish_now = st.will.take(),
                DetachKind::Abnormal => {}
            }
            if st.expiry_secs == 0 {
                // The session ends with the connection: a pending will goes out now.
                if let Some(w) = st.will.take() {
                    publish_now = Some(w);
                }
                self.discard_locked(session, &mut st);
                drop(st);
                self.remove_from_registry(&mut registry, session);
                if session.is_durable() {
                    session.set_durable(false);
                    drop(registry);
                    self.propose(vec![StateChange::SessionEnded {
                        client_id: session.client_id().clone(),
                    }]);
                }
            } else {
                let client_id = session.client_id().clone();
                let mut timers = Vec::new();
                if let Some(w) = &st.will {
                    if w.delay_secs == 0 {
                        publish_now = st.will.take();
                    } else if w.delay_secs < st.expiry_secs {
                        let at = now + Duration::from_secs(u64::from(w.delay_secs));
                        timers.push(Timer {
                            at,
                            kind: TimerKind::Will,
                            client_id: client_id.clone(),
                            epoch,
                        });
                    }
                }
                if st.expiry_secs != NEVER_EXPIRES {
                    let at = now + Duration::from_secs(u64::from(st.expiry_secs));
                    timers.push(Timer {
                        at,
                        kind: TimerKind::Expire,
                        client_id,
                        epoch,
                    });
                }
                let record = StateChange::SessionDetached {
                    client_id: session.client_id().clone(),
                    epoch,
                    how: if publish_now.is_some() {
                        DetachRecord::WillPublished
                    } else if st.will.is_some() {
                        DetachRecord::Abnormal
                    } else {
                        DetachRecord::Normal
                    },
                    expiry_secs: st.expiry_secs,
                };
                drop(st);
                drop(registry);
                if session.is_durable() {
                    self.propose(vec![record]);
                }
                self.schedule(timers);
            }
        }
        if let Some(w) = publish_now {
            self.publish_will(w, now);
        }
    }

    /// Changes the expiry of the session attached with `epoch` (MQTT 5 DISCONNECT property).
    pub fn set_session_expiry(
        &self,
        session: &Session,
        epoch: u64,
        secs: u32,
    ) -> Result<(), TakenOver> {
        let mut st = session.state.lock();
        if st.epoch != epoch {
            return Err(TakenOver);
        }
        st.expiry_secs = secs;
        Ok(())
    }

    fn remove_from_registry(
        &self,
        registry: &mut HashMap<ByteStr, Arc<Session>>,
        session: &Arc<Session>,
    ) {
        if registry
            .get(session.client_id())
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            registry.remove(session.client_id());
            self.stats.sessions_total.fetch_sub(1, Relaxed);
        }
    }

    /// Removes a session's subscriptions and messages (its state lock held).
    /// Takes `session` (locked as `st`) out of this node: offline, fenced (its connection, if
    /// any, closes on its next poll), emptied and out of the registry. Records nothing.
    fn unload_locked(
        &self,
        registry: &mut HashMap<ByteStr, Arc<Session>>,
        session: &Arc<Session>,
        mut st: parking_lot::MutexGuard<'_, SessionState>,
    ) {
        if st.online {
            self.stats.sessions_online.fetch_sub(1, Relaxed);
            session.set_online(&mut st, false);
        }
        st.epoch = self.next_epoch();
        Session::notify(&mut st);
        self.discard_locked(session, &mut st);
        drop(st);
        self.remove_from_registry(registry, session);
    }

    fn discard_locked(&self, session: &Arc<Session>, st: &mut SessionState) {
        for (key, rec) in st.subscriptions.drain() {
            if self
                .index
                .unsubscribe(&rec.filter, rec.share_group.as_deref(), session)
                .is_some()
            {
                self.routes.local_ref(&key, false);
            }
        }
        self.stats
            .messages_queued
            .fetch_sub(st.queue.len() as i64, Relaxed);
        st.queue.clear();
        let inflight = st
            .outgoing
            .values()
            .filter(|o| matches!(o.state, Outgoing::Publish(_)))
            .count();
        self.stats
            .messages_inflight
            .fetch_sub(inflight as i64, Relaxed);
        st.outgoing.clear();
        st.incoming_qos2.clear();
    }

    fn schedule(&self, new: Vec<Timer>) {
        if new.is_empty() {
            return;
        }
        let mut t = self.timers.lock();
        let earliest = t.heap.peek().map(|Reverse(t)| t.at);
        let mut wake = false;
        for timer in new {
            wake |= earliest.is_none_or(|e| timer.at < e);
            t.heap.push(Reverse(timer));
        }
        if wake {
            t.changed = true;
            if let Some(w) = t.waker.take() {
                w.wake();
            }
        }
    }

    /// When [`Broker::handle_timeout`] next has work (a will delay or session expiry).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.lock().heap.peek().map(|Reverse(t)| t.at)
    }

    /// Ready (once) when a timer earlier than all others was scheduled since the last time it
    /// was Ready: the caller must ask [`Broker::poll_timeout`] again. Registers the waker
    /// otherwise.
    pub fn poll_timers_changed(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut t = self.timers.lock();
        if std::mem::take(&mut t.changed) {
            return Poll::Ready(());
        }
        t.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Runs due timers: publishes delayed wills and ends expired sessions.
    pub fn handle_timeout(&self, now: Instant) {
        loop {
            let timer = {
                let mut t = self.timers.lock();
                match t.heap.peek() {
                    Some(Reverse(timer)) if timer.at <= now => t.heap.pop().map(|Reverse(t)| t),
                    _ => None,
                }
            };
            let Some(timer) = timer else { break };
            let publish;
            {
                let mut registry = self.sessions.lock();
                let Some(session) = registry.get(&timer.client_id).cloned() else {
                    continue;
                };
                let mut st = session.state.lock();
                if st.epoch != timer.epoch || st.online {
                    continue;
                }
                let client_id = session.client_id().clone();
                let record = match timer.kind {
                    TimerKind::Will => {
                        publish = st.will.take();
                        publish
                            .is_some()
                            .then_some(StateChange::WillPublished { client_id })
                    }
                    TimerKind::Expire => {
                        publish = st.will.take();
                        self.discard_locked(&session, &mut st);
                        drop(st);
                        self.remove_from_registry(&mut registry, &session);
                        Some(StateChange::SessionEnded { client_id })
                    }
                };
                if let Some(record) = record.filter(|_| session.is_durable()) {
                    if timer.kind == TimerKind::Expire {
                        session.set_durable(false);
                    }
                    drop(registry);
                    self.propose(vec![record]);
                }
            }
            if let Some(w) = publish {
                self.publish_will(w, now);
            }
        }
    }

    fn publish_will(&self, will: PendingWill, now: Instant) {
        self.stats.wills_published.fetch_add(1, Relaxed);
        self.publish(will.into_message(now), now);
    }

    /// Routes a message to every matching session and applies its RETAIN flag, without
    /// waiting for durability (wills, `$SYS`, administrative publishes). Returns the number of
    /// sessions it was offered to.
    pub fn publish(&self, message: Arc<Message>, now: Instant) -> usize {
        self.route(message, None, now).offered
    }

    /// Queues `deferred` deliveries now.
    fn deliver_committed(&self, deferred: Vec<(Arc<Session>, Delivery)>) {
        for (session, delivery) in deferred {
            session.enqueue(delivery, &self.queue_limits, &self.stats);
        }
    }

    /// Queues `deferred` deliveries once `commit` succeeds (in commit order: the durability
    /// layer resolves commits in the order they were proposed), drops them if it fails.
    fn deliver_after(&self, commit: &Commit, deferred: Vec<(Arc<Session>, Delivery)>) {
        if deferred.is_empty() {
            return;
        }
        match commit.result() {
            Some(Ok(())) => self.deliver_committed(deferred),
            Some(Err(_)) => {}
            None => {
                let (limits, stats) = (self.queue_limits, self.stats.clone());
                commit.on_complete(move |result| {
                    if result.is_ok() {
                        for (session, delivery) in deferred {
                            session.enqueue(delivery, &limits, &stats);
                        }
                    }
                });
            }
        }
    }

    /// Routes a message published by a client. QoS 1/2 deliveries to persistent sessions are
    /// stored once (one [`StateChange::MessageStored`] for all of them) and a retained change is
    /// recorded; `incoming_qos2` (the publisher's session and packet id, for a new QoS 2
    /// PUBLISH) is recorded when that session is persistent. The returned commit covers all of it.
    pub fn route(
        &self,
        message: Arc<Message>,
        incoming_qos2: Option<(&Session, u16)>,
        now: Instant,
    ) -> Routed {
        let mut changes = Vec::new();
        if let Some((publisher, packet_id)) = incoming_qos2.filter(|(s, _)| s.is_durable()) {
            changes.push(StateChange::IncomingQos2Received {
                client_id: publisher.client_id().clone(),
                packet_id,
            });
        }
        // `$SYS/...` statistics are regenerated every interval: never worth a durable write.
        let durable_retain = !message.topic.starts_with("$SYS/");
        if message.retain
            && self.config.retain_available
            && self.store_retained(&message)
            && durable_retain
        {
            changes.push(if message.payload.is_empty() {
                StateChange::RetainedCleared {
                    topic: message.topic.clone(),
                }
            } else {
                StateChange::RetainedSet {
                    message: message.clone(),
                }
            });
        }
        let mut deferred = Vec::new();
        let mut acks = Vec::new();
        // A client's QoS 2 PUBLISH reaches local sessions only once it is recorded: if the
        // commit fails, the client sends it again and it is routed again, which must not
        // deliver it twice.
        let hold = incoming_qos2.is_some();
        let mut congested = None;
        let offered = self.deliver(
            &message,
            &mut changes,
            &mut deferred,
            &mut acks,
            Scope::Origin { hold },
            &mut congested,
        );
        let _ = now;
        let store = self.propose(changes);
        match incoming_qos2 {
            // A client's QoS 2 messages reach local sessions in the order it sent them: each
            // waits for its own commit and for the previous one's to settle (not to succeed:
            // a refused one must not hold this one's back for good).
            Some((publisher, _)) => {
                let mut st = publisher.state.lock();
                let after = Commit::all(vec![store.clone(), st.last_qos2.settled()]);
                st.last_qos2 = after.clone();
                drop(st);
                self.deliver_after(&after, deferred);
            }
            None => self.deliver_after(&store, deferred),
        }
        acks.push(store.clone());
        Routed {
            offered,
            commit: Commit::all(acks),
            store,
            congested,
        }
    }

    fn deliver(
        &self,
        message: &Arc<Message>,
        changes: &mut Vec<StateChange>,
        deferred: &mut Vec<(Arc<Session>, Delivery)>,
        acks: &mut Vec<Commit>,
        scope: Scope<'_>,
        congested: &mut Option<(Arc<Session>, u64)>,
    ) -> usize {
        // (session, subscription, through a shared subscription)
        let mut targets: SmallVec<[(Arc<Session>, SubEntry, bool); 8]> = SmallVec::new();
        let origin = message.origin.as_ref();
        let forwarding = matches!(scope, Scope::Origin { .. })
            && !self.routes.peer_index.is_empty()
            && !message.topic.starts_with("$SYS/");
        // Shared subscriptions with members here: served here (local first), not forwarded.
        let mut local_groups: SmallVec<[(String, String); 2]> = SmallVec::new();
        self.index.for_each_match(&message.topic, |m| match m {
            Match::Plain { key, value, .. } => {
                let wanted = match scope {
                    Scope::Origin { .. } => true,
                    Scope::Forwarded { plain, .. } => plain,
                };
                if wanted && !(value.options.no_local && origin == Some(key.client_id())) {
                    targets.push((key.clone(), *value, false));
                }
            }
            Match::Shared {
                group,
                filter,
                members,
                cursor,
            } => {
                let wanted = match scope {
                    Scope::Origin { .. } => true,
                    Scope::Forwarded { shared, .. } => {
                        shared.iter().any(|k| is_share_key(k, group, filter))
                    }
                };
                if !wanted {
                    return;
                }
                if forwarding {
                    local_groups.push((group.to_owned(), filter.to_owned()));
                }
                if let Some((key, value)) = self.pick_shared(members, cursor) {
                    targets.push((key.clone(), *value, true));
                }
            }
        });
        let mut stored: Option<(MessageId, Vec<StoredTarget>)> = None;
        let mut offered = match scope {
            Scope::Origin { .. } => self.store_for_remote(message, &targets, &mut stored, deferred),
            Scope::Forwarded { .. } => 0,
        };
        if forwarding {
            let stored_id = stored.as_ref().map(|(id, _)| *id);
            self.forward_to_peers(message, &local_groups, stored_id, acks);
        }
        if targets.is_empty() {
            if offered == 0 {
                self.stats.messages_unrouted.fetch_add(1, Relaxed);
            } else if let Some((id, targets)) = stored {
                changes.push(StateChange::MessageStored {
                    id,
                    message: message.clone(),
                    targets,
                });
            }
            return offered;
        }
        if targets.len() > 1 {
            targets.sort_unstable_by_key(|(s, _, _)| Arc::as_ptr(s) as usize);
        }
        let mut i = 0;
        while i < targets.len() {
            // Overlapping subscriptions of one session: one delivery, highest QoS, every
            // subscription identifier (MQTT 5 §3.3.4).
            let (session, first, first_shared) = &targets[i];
            let mut qos = first.options.qos;
            let mut retain_as_published = first.options.retain_as_published;
            let mut ids: SmallVec<[u32; 2]> = first.subscription_id.into_iter().collect();
            let mut via_shared = *first_shared;
            let mut j = i + 1;
            while j < targets.len() && Arc::ptr_eq(&targets[j].0, session) {
                let e = &targets[j].1;
                qos = qos.max(e.options.qos);
                retain_as_published |= e.options.retain_as_published;
                ids.extend(e.subscription_id);
                via_shared |= targets[j].2;
                j += 1;
            }
            let qos = qos.min(message.qos);
            let retain = message.retain && retain_as_published;
            // Forwarded QoS 1/2 for a persistent session here: the origin stored it for that
            // session (its ordinary subscriptions are mirrored there), and the replicated log
            // queues it here. A connected session gets QoS 1 now, without waiting for the
            // commit, and the replicated copy is then skipped (or this one, if the log was
            // faster); QoS 2 waits for the log (see `live`).
            if let Scope::Forwarded { stored, .. } = scope
                && qos != QoS::AtMostOnce
                && session.is_durable()
                && !via_shared
            {
                if let Some(id) = stored
                    && qos == QoS::AtLeastOnce
                    && session.is_online()
                {
                    let delivery = Delivery {
                        qos,
                        retain,
                        subscription_ids: ids,
                        message: message.clone(),
                        durable: Some(id),
                    };
                    offered += usize::from(self.deliver_stored_live(session, delivery, id));
                }
                i = j;
                continue;
            }
            // QoS 1/2 for a persistent session: stored once, referenced by each such session.
            let durable = (qos != QoS::AtMostOnce && session.is_durable()).then(|| {
                stored
                    .get_or_insert_with(|| (self.durability.next_message_id(), Vec::new()))
                    .0
            });
            let target = durable.map(|_| StoredTarget {
                client_id: session.client_id().clone(),
                qos,
                retain,
                subscription_ids: ids.clone(),
            });
            let delivery = Delivery {
                qos,
                retain,
                subscription_ids: ids,
                message: message.clone(),
                durable,
            };
            let hold = matches!(scope, Scope::Origin { hold: true });
            // A client waiting for its own queue would never read the acknowledgements that
            // drain it. A shared subscription's member only pauses the publisher if it was
            // crowded before (`pick_shared` prefers members that are not: all were).
            let may_pause = congested.is_none()
                && origin != Some(session.client_id())
                && (!via_shared || session.is_crowded());
            if hold || (durable.is_some() && !session.is_online()) {
                // Offline and persistent: nobody can receive it before the commit anyway; or a
                // client's QoS 2 PUBLISH: delivered once recorded (and its publisher waits for
                // a congested queue as for the others).
                if hold
                    && may_pause
                    && let Some(episode) = session.congestion(&self.queue_limits)
                {
                    *congested = Some((session.clone(), episode));
                }
                offered += 1;
                if let (Some(target), Some((_, targets))) = (target, stored.as_mut()) {
                    targets.push(target);
                }
                deferred.push((session.clone(), delivery));
            } else {
                let result = session.enqueue(delivery, &self.queue_limits, &self.stats);
                if result.is_queued() {
                    offered += 1;
                    if let (Some(target), Some((_, targets))) = (target, stored.as_mut()) {
                        targets.push(target);
                    }
                }
                if let Enqueued::Congested { episode, .. } = result
                    && may_pause
                {
                    *congested = Some((session.clone(), episode));
                }
            }
            i = j;
        }
        if let Some((id, targets)) = stored.filter(|(_, t)| !t.is_empty()) {
            changes.push(StateChange::MessageStored {
                id,
                message: message.clone(),
                targets,
            });
        }
        offered
    }

    fn pick_shared<'a>(
        &self,
        members: &'a [(Arc<Session>, SubEntry)],
        cursor: &std::sync::atomic::AtomicUsize,
    ) -> Option<&'a (Arc<Session>, SubEntry)> {
        let n = members.len();
        if n == 0 {
            return None;
        }
        let start = match self.config.shared_strategy {
            SharedStrategy::RoundRobin => cursor.fetch_add(1, Relaxed) % n,
            SharedStrategy::Random => (self.next_random() % n as u64) as usize,
        };
        // Prefer a member that is connected and keeps up (a slow member's queue must not hold
        // up the publisher while others have room), then any connected one; fall back to
        // queueing for an offline one.
        let turn = |k| &members[(start + k) % n];
        (0..n)
            .map(turn)
            .find(|(s, _)| s.is_online() && !s.is_crowded())
            .or_else(|| (0..n).map(turn).find(|(s, _)| s.is_online()))
            .or(members.get(start))
    }

    /// Applies a RETAIN publish to the retained store. Returns whether anything changed.
    ///
    /// The broker's own `$SYS/...` statistics are never refused by the retained limits and not
    /// counted in [`Broker::retained_bytes`]: clients' retained messages cannot crowd them out.
    /// Removes the retained message of `topic`, keeping the byte count right; returns it.
    fn remove_retained(&self, topic: &str) -> Option<Arc<Message>> {
        let old = self.retained.remove(topic)?;
        if !topic.starts_with("$SYS/") {
            self.retained_bytes
                .fetch_sub(old.payload.len() as u64, Relaxed);
        }
        Some(old)
    }

    fn store_retained(&self, message: &Arc<Message>) -> bool {
        let limited = !message.topic.starts_with("$SYS/");
        if message.payload.is_empty() {
            return self.remove_retained(&message.topic).is_some();
        }
        let Ok(topic) = TopicName::new(&message.topic, &self.topic_limits) else {
            return false;
        };
        let existing = self.retained.get(&message.topic);
        let max = self.config.max_retained_messages;
        if limited && max > 0 && self.retained.len() >= max && existing.is_none() {
            self.stats.limit_exceeded(Limit::RetainedMessages);
            return false;
        }
        let max_bytes = self.config.max_retained_bytes.0;
        let old_len = existing.map_or(0, |m| m.payload.len() as u64);
        let new_len = message.payload.len() as u64;
        if limited
            && max_bytes > 0
            && self
                .retained_bytes
                .load(Relaxed)
                .saturating_sub(old_len)
                .saturating_add(new_len)
                > max_bytes
        {
            self.stats.limit_exceeded(Limit::RetainedBytes);
            return false;
        }
        let old = self.retained.set(&topic, message.clone());
        if limited {
            if let Some(old) = old {
                self.retained_bytes
                    .fetch_sub(old.payload.len() as u64, Relaxed);
            }
            self.retained_bytes.fetch_add(new_len, Relaxed);
        }
        true
    }

    /// Queues the forwarded copy of stored QoS 1 message `id` for a connected persistent
    /// session here, unless its replicated copy was queued first (see `live`). Returns whether
    /// it was queued.
    fn deliver_stored_live(
        &self,
        session: &Arc<Session>,
        delivery: Delivery,
        id: MessageId,
    ) -> bool {
        let (copy, released) = self.live.forwarded(id, session.client_id());
        drop(self.propose(released));
        if copy == live::Copy::Skip {
            return false;
        }
        if session
            .enqueue(delivery, &self.queue_limits, &self.stats)
            .is_queued()
        {
            return true;
        }
        drop(self.propose(self.live.not_queued(id, session.client_id())));
        false
    }

    /// Forwards `message` to the peers whose routes match its topic: every peer with ordinary
    /// subscribers, and for each shared subscription with no member here, one peer holding
    /// members (round robin).
    fn forward_to_peers(
        &self,
        message: &Arc<Message>,
        local_groups: &[(String, String)],
        stored: Option<MessageId>,
        acks: &mut Vec<Commit>,
    ) {
        let Some(forwarder) = self.routes.forwarder.get() else {
            return;
        };
        /// Per peer: (node, deliver to its ordinary subscribers, shared subscriptions).
        type PerNode = SmallVec<[(u64, bool, Vec<Arc<str>>); 4]>;
        let mut per_node: PerNode = SmallVec::new();
        fn slot(per_node: &mut PerNode, node: u64) -> usize {
            match per_node.iter().position(|(n, _, _)| *n == node) {
                Some(i) => i,
                None => {
                    per_node.push((node, false, Vec::new()));
                    per_node.len() - 1
                }
            }
        }
        self.routes
            .peer_index
            .for_each_match(&message.topic, |m| match m {
                Match::Plain { key, .. } => {
                    let i = slot(&mut per_node, *key);
                    per_node[i].1 = true;
                }
                Match::Shared {
                    group,
                    filter,
                    members,
                    cursor,
                } => {
                    if local_groups.iter().any(|(g, f)| g == group && f == filter)
                        || members.is_empty()
                    {
                        return;
                    }
                    let pick = &members[cursor.fetch_add(1, Relaxed) % members.len()];
                    let i = slot(&mut per_node, pick.0);
                    per_node[i].2.push(pick.1.clone());
                }
            });
        for (node, plain, shared) in per_node {
            acks.push(forwarder.forward(node, message, plain, shared, stored));
        }
    }

    /// Installs how to name another server (MQTT 5 Server Reference) for clients whose
    /// durable work this node cannot commit (once; later calls are ignored).
    pub fn set_redirect(&self, redirect: Redirect) {
        let _ = self.routes.redirect.set(redirect);
    }

    /// Another server for a client this node cannot serve durably right now, if one is known.
    pub fn redirect(&self) -> Option<ByteStr> {
        self.routes
            .redirect
            .get()
            .and_then(|r| r())
            .map(ByteStr::from)
    }

    /// Installs the live forwarding to other nodes (once; later calls are ignored).
    pub fn set_forwarder(&self, forwarder: Arc<dyn Forwarder>) {
        let _ = self.routes.forwarder.set(forwarder);
    }

    /// The filters this node has local subscribers for, with the generation they are at
    /// ([`Broker::route_generation`]), to announce to peers.
    pub fn local_routes(&self) -> (u64, Vec<Arc<str>>) {
        let local = self.routes.local.lock();
        (
            self.routes.generation.load(Relaxed),
            local.keys().cloned().collect(),
        )
    }

    /// Changes whenever the set of [`Broker::local_routes`] changes.
    pub fn route_generation(&self) -> u64 {
        self.routes.generation.load(Relaxed)
    }

    /// Applies a route announcement from peer `node`: its full set of filters (`full`), or
    /// filters added and removed since its last announcement.
    pub fn apply_peer_routes(
        &self,
        node: u64,
        full: bool,
        added: Vec<Arc<str>>,
        removed: Vec<Arc<str>>,
    ) {
        let mut peers = self.routes.peers.lock();
        let known = peers.entry(node).or_default();
        if full {
            let new: std::collections::HashSet<Arc<str>> = added.iter().cloned().collect();
            for old in known.iter().filter(|k| !new.contains(*k)) {
                self.routes.peer_remove(node, old, &self.topic_limits);
            }
            for key in new.iter().filter(|k| !known.contains(*k)) {
                self.routes.peer_add(node, key, &self.topic_limits);
            }
            *known = new;
            return;
        }
        for key in removed {
            if known.remove(&key) {
                self.routes.peer_remove(node, &key, &self.topic_limits);
            }
        }
        for key in added {
            if known.insert(key.clone()) {
                self.routes.peer_add(node, &key, &self.topic_limits);
            }
        }
    }

    /// Drops every route of peer `node` (it left the cluster).
    pub fn forget_peer(&self, node: u64) {
        self.apply_peer_routes(node, true, Vec::new(), Vec::new());
        self.routes.peers.lock().remove(&node);
    }

    /// Delivers a message another node forwarded (see [`Scope::Forwarded`]); never forwards
    /// it again nor stores it for sessions of other nodes. Returns how many sessions it was
    /// offered to.
    pub fn deliver_forwarded(
        &self,
        message: Arc<Message>,
        plain: bool,
        shared: &[Arc<str>],
        stored: Option<MessageId>,
    ) -> usize {
        let mut changes = Vec::new();
        let mut deferred = Vec::new();
        let offered = self.deliver(
            &message,
            &mut changes,
            &mut deferred,
            &mut Vec::new(),
            Scope::Forwarded {
                plain,
                shared,
                stored,
            },
            &mut None,
        );
        // Stores for local persistent members of shared subscriptions: nobody waits on them.
        drop(self.propose(changes));
        self.deliver_committed(deferred);
        offered
    }

    /// Adds to `stored` a target for every persistent session owned by another node that
    /// subscribes to the topic of QoS 1/2 `message` (overlapping subscriptions: one target,
    /// highest QoS, every subscription identifier). Returns how many.
    fn store_for_remote(
        &self,
        message: &Arc<Message>,
        local: &[(Arc<Session>, SubEntry, bool)],
        stored: &mut Option<(MessageId, Vec<StoredTarget>)>,
        deferred: &mut Vec<(Arc<Session>, Delivery)>,
    ) -> usize {
        if message.qos == QoS::AtMostOnce || self.remote.index.is_empty() {
            return 0;
        }
        let origin = message.origin.as_ref();
        let mut matches: SmallVec<[(ByteStr, SubEntry); 4]> = SmallVec::new();
        self.remote.index.for_each_match(&message.topic, |m| {
            if let Match::Plain { key, value, .. } = m
                && !(value.options.no_local && origin == Some(key))
            {
                matches.push((key.clone(), *value));
            }
        });
        if matches.is_empty() {
            return 0;
        }
        matches.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        let mut count = 0;
        let mut i = 0;
        while i < matches.len() {
            let (client_id, first) = &matches[i];
            let mut qos = first.options.qos;
            let mut retain_as_published = first.options.retain_as_published;
            let mut ids: SmallVec<[u32; 2]> = first.subscription_id.into_iter().collect();
            let mut j = i + 1;
            while j < matches.len() && matches[j].0 == *client_id {
                let e = &matches[j].1;
                qos = qos.max(e.options.qos);
                retain_as_published |= e.options.retain_as_published;
                ids.extend(e.subscription_id);
                j += 1;
            }
            let qos = qos.min(message.qos);
            // A session this pass already serves through the local index is not stored twice
            // (a session being loaded here is in neither index for a moment: its remote
            // entries stay until the load, see `finish_attach`).
            let served_here = local.iter().any(|(s, _, _)| s.client_id() == client_id);
            if qos != QoS::AtMostOnce && !served_here {
                let (id, targets) =
                    stored.get_or_insert_with(|| (self.durability.next_message_id(), Vec::new()));
                let retain = message.retain && retain_as_published;
                // A session being loaded here right now: the replicated log will not queue
                // this node's own batch for it, and its load may have been read before the
                // commit; queue it once committed (the load skips ids already queued).
                if let Some(session) = self.sessions.lock().get(client_id).cloned()
                    && session.is_durable()
                {
                    deferred.push((
                        session,
                        Delivery {
                            qos,
                            retain,
                            subscription_ids: ids.clone(),
                            message: message.clone(),
                            durable: Some(*id),
                        },
                    ));
                }
                targets.push(StoredTarget {
                    client_id: client_id.clone(),
                    qos,
                    retain,
                    subscription_ids: ids,
                });
                count += 1;
            }
            i = j;
        }
        count
    }

    /// Retained messages matching `filter`, as deliveries for a subscription with `options`.
    fn retained_deliveries(
        &self,
        filter: &str,
        options: &SubscriptionOptions,
        subscription_id: Option<u32>,
        now: Instant,
    ) -> Vec<Delivery> {
        self.retained
            .matching(filter, self.config.max_queued_messages)
            .into_iter()
            .filter(|(_, m)| !m.is_expired(now))
            .map(|(_, m)| Delivery {
                qos: options.qos.min(m.qos),
                retain: true,
                subscription_ids: subscription_id.into_iter().collect(),
                message: m,
                durable: None,
            })
            .collect()
    }

    /// Retained message stored for `topic`.
    pub fn retained(&self, topic: &str) -> Option<Arc<Message>> {
        self.retained.get(topic)
    }

    /// Handles one topic filter of a SUBSCRIBE for the session attached with `epoch`: validates,
    /// authorizes, records it and queues the matching retained messages. Returns the SUBACK
    /// reason code (the granted QoS on success).
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        epoch: u64,
        principal: &Principal,
        filter: &str,
        requested: SubEntry,
        now: Instant,
    ) -> Result<Subscribed, TakenOver> {
        let refuse = |code| Ok(Subscribed { code, change: None });
        let SubEntry {
            options,
            subscription_id,
        } = requested;
        let parsed = match parse_subscription(filter, &self.topic_limits) {
            Ok(p) => p,
            Err(_) => return refuse(ReasonCode::TOPIC_FILTER_INVALID),
        };
        if parsed.share_group.is_some() && !self.config.shared_subscriptions {
            return refuse(ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED);
        }
        if !self.config.wildcard_subscriptions && parsed.filter.contains(['+', '#']) {
            return refuse(ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED);
        }
        let granted = options
            .qos
            .min(QoS::from_u8(self.config.max_qos).unwrap_or(QoS::ExactlyOnce));
        if !self.authorize(
            principal,
            Access::Subscribe {
                filter,
                qos: granted,
            },
        ) {
            self.stats.subscribe_denied.fetch_add(1, Relaxed);
            return refuse(ReasonCode::NOT_AUTHORIZED);
        }
        let options = SubscriptionOptions {
            qos: granted,
            ..options
        };
        let entry = SubEntry {
            options,
            subscription_id,
        };
        let key: Arc<str> = Arc::from(filter);
        let existed = {
            let mut st = session.state.lock();
            if st.epoch != epoch {
                return Err(TakenOver);
            }
            let max = self.config.max_subscriptions_per_client;
            if max > 0 && st.subscriptions.len() >= max && !st.subscriptions.contains_key(&key) {
                self.stats.limit_exceeded(Limit::Subscriptions);
                return refuse(ReasonCode::QUOTA_EXCEEDED);
            }
            self.add_subscription(session, &mut st, key, parsed.clone(), entry)
        };
        // Retained messages are not sent for shared subscriptions (MQTT 5 §4.8.2).
        let send_retained = parsed.share_group.is_none()
            && match options.retain_handling {
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendIfNew => !existed,
                RetainHandling::DoNotSend => false,
            };
        if send_retained {
            for d in self.retained_deliveries(&parsed.filter, &options, subscription_id, now) {
                session.enqueue(d, &self.queue_limits, &self.stats);
            }
        }
        let change = session.is_durable().then(|| StateChange::Subscribed {
            client_id: session.client_id().clone(),
            filter: Arc::from(filter),
            entry,
        });
        Ok(Subscribed {
            code: ReasonCode(granted.as_u8()),
            change,
        })
    }

    /// Adds (or replaces) a subscription in the index and in the session (its lock held).
    /// Returns whether it replaced an existing one.
    fn add_subscription(
        &self,
        session: &Arc<Session>,
        st: &mut SessionState,
        key: Arc<str>,
        parsed: ParsedFilter,
        entry: SubEntry,
    ) -> bool {
        let replaced = self
            .index
            .subscribe(
                &parsed.filter,
                parsed.share_group.as_deref(),
                session.clone(),
                entry,
            )
            .is_some();
        if !replaced {
            self.routes.local_ref(&key, true);
        }
        let rec = SubscriptionRecord {
            filter: parsed.filter,
            share_group: parsed.share_group,
            entry,
        };
        st.subscriptions.insert(key, rec).is_some()
    }

    /// Removes one subscription. Returns whether it existed, and the durable record to
    /// propose (persistent sessions only).
    pub fn unsubscribe(
        &self,
        session: &Arc<Session>,
        epoch: u64,
        filter: &str,
    ) -> Result<(bool, Option<StateChange>), TakenOver> {
        let mut st = session.state.lock();
        if st.epoch != epoch {
            return Err(TakenOver);
        }
        match st.subscriptions.remove_entry(filter) {
            Some((key, rec)) => {
                if self
                    .index
                    .unsubscribe(&rec.filter, rec.share_group.as_deref(), session)
                    .is_some()
                {
                    self.routes.local_ref(&key, false);
                }
                let change = session.is_durable().then(|| StateChange::Unsubscribed {
                    client_id: session.client_id().clone(),
                    filter: key,
                });
                Ok((true, change))
            }
            None => Ok((false, None)),
        }
    }

    /// Rebuilds the broker from its durable storage at start-up: persistent sessions come back
    /// offline with their subscriptions, queued and in-flight messages (in-flight ones keep
    /// their packet ids, so they are resent as the protocol requires) and incoming QoS 2 state;
    /// retained messages come back too. Will and expiry timers restart from `now`. Returns the
    /// number of sessions recovered.
    pub fn recover(&self, now: Instant) -> usize {
        let Recovered {
            sessions,
            retained,
            remote_subscriptions,
        } = self.durability.recover();
        for message in retained {
            self.store_retained(&message);
        }
        for (client_id, filter, entry) in remote_subscriptions {
            self.remote
                .add(&client_id, &filter, entry, &self.topic_limits);
        }
        let count = sessions.len();
        for image in sessions {
            self.restore_offline(image, now);
        }
        count
    }

    /// Adopts persistent sessions whose node was declared down (`StateChange::NodeDown`
    /// committed through this node): they come back here offline, as after a restart, and
    /// their wills and expiry run here. Sessions already in memory are left alone. Returns how
    /// many were adopted.
    pub fn adopt_sessions(&self, sessions: Vec<SessionImage>, now: Instant) -> usize {
        let mut adopted = 0;
        for image in sessions {
            if self.sessions.lock().contains_key(&image.client_id) {
                continue;
            }
            let client_id = image.client_id.clone();
            self.restore_offline(image, now);
            self.remote.clear(&client_id);
            adopted += 1;
        }
        adopted
    }

    /// Puts a stored session back in memory, offline, with its will and expiry timers
    /// starting at `now`.
    fn restore_offline(&self, image: SessionImage, now: Instant) {
        let session = Arc::new(Session::new(image.client_id.clone(), image.expiry_secs));
        session.set_durable(true);
        let mut st = session.state.lock();
        st.epoch = self.next_epoch();
        st.disconnected_at = Some(now);
        let epoch = st.epoch;
        let will = image.will.clone();
        let expiry_secs = image.expiry_secs;
        let client_id = image.client_id.clone();
        self.restore_locked(&session, &mut st, image);
        let mut timers = Vec::new();
        if let Some(w) = &will {
            let at = now + Duration::from_secs(u64::from(w.delay_secs));
            timers.push(Timer {
                at,
                kind: TimerKind::Will,
                client_id: client_id.clone(),
                epoch,
            });
        }
        st.will = will;
        if expiry_secs != NEVER_EXPIRES {
            let at = now + Duration::from_secs(u64::from(expiry_secs));
            timers.push(Timer {
                at,
                kind: TimerKind::Expire,
                client_id: client_id.clone(),
                epoch,
            });
        }
        drop(st);
        if self.sessions.lock().insert(client_id, session).is_none() {
            self.stats.sessions_total.fetch_add(1, Relaxed);
        }
        self.schedule(timers);
    }

    /// Fills `session` (locked as `st`) with the subscriptions, queued and in-flight messages
    /// and incoming QoS 2 state of `image`. In-flight messages keep their packet ids.
    fn restore_locked(&self, session: &Arc<Session>, st: &mut SessionState, image: SessionImage) {
        for (key, entry) in image.subscriptions {
            let Ok(parsed) = parse_subscription(&key, &self.topic_limits) else {
                continue;
            };
            self.add_subscription(session, st, key, parsed, entry);
        }
        // Stored messages the applied-change feed already queued for this session (committed
        // between its attach here and the load) are not queued twice.
        let present: std::collections::HashSet<MessageId> = st
            .queue
            .iter()
            .filter_map(|d| d.durable)
            .chain(st.outgoing.values().filter_map(|o| match &o.state {
                Outgoing::Publish(d) => d.durable,
                Outgoing::Released(id) => *id,
            }))
            .collect();
        for stored in image.messages {
            if present.contains(&stored.id) {
                continue;
            }
            let delivery = Delivery {
                qos: stored.target.qos,
                retain: stored.target.retain,
                subscription_ids: stored.target.subscription_ids,
                message: stored.message,
                durable: Some(stored.id),
            };
            match stored
                .packet_id
                .filter(|id| *id != 0 && !st.outgoing.contains_key(id))
            {
                Some(id) => {
                    let state = if stored.released {
                        Outgoing::Released(Some(stored.id))
                    } else {
                        self.stats.messages_inflight.fetch_add(1, Relaxed);
                        Outgoing::Publish(delivery)
                    };
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.outgoing.insert(id, OutgoingEntry { seq, state });
                    st.next_packet_id = id.checked_add(1).unwrap_or(1);
                }
                None => {
                    self.stats.messages_queued.fetch_add(1, Relaxed);
                    st.queue.push_back(delivery);
                }
            }
        }
        st.incoming_qos2.extend(
            image
                .incoming_qos2
                .into_iter()
                .map(|id| (id, Commit::ready())),
        );
    }

    /// Completes an attachment whose session was not in memory ([`Attached::load_after_commit`]):
    /// once the claim committed, loads the session from the replicated state, if it exists
    /// there. Returns whether a session was resumed (CONNACK's session present). Does nothing
    /// if the connection was fenced in the meantime.
    pub fn finish_attach(&self, session: &Arc<Session>, epoch: u64) -> bool {
        let Some((image, upto)) = self.durability.load_session(session.client_id()) else {
            return false;
        };
        let mut st = session.state.lock();
        if st.epoch != epoch {
            return false;
        }
        st.replicated_upto = upto;
        // The connection's own will and expiry stay as its CONNECT set them.
        self.restore_locked(session, &mut st, image);
        // Its subscriptions are local from now on (removed from the remote index only once
        // they are in the local one, so no publish in between finds neither).
        self.remote.clear(session.client_id());
        Session::notify(&mut st);
        true
    }

    /// Undoes an attachment whose claim could not commit, for a session that was not in memory
    /// before it ([`Attached::load_after_commit`]): the empty session created for it is
    /// dropped, so a later connection here loads the stored session instead of resuming an
    /// empty one. Instead of detaching the connection: nothing is recorded.
    pub fn abandon_attach(&self, session: &Arc<Session>, epoch: u64) {
        let mut registry = self.sessions.lock();
        let mut st = session.state.lock();
        if st.epoch != epoch {
            return;
        }
        st.will = None;
        session.set_durable(false);
        self.unload_locked(&mut registry, session, st);
    }

    /// Mirrors changes that another node committed (the applied-change feed of a cluster, in
    /// log order): retained messages set or cleared anywhere are served here; a session claimed
    /// by another node's connection is fenced here (its connection closes with Session Taken
    /// Over) and forgotten, as its new owner holds it; a session ended elsewhere is forgotten
    /// if no connection holds it here. Changes this node proposed itself must not be passed.
    ///
    /// Persistent subscriptions of sessions owned elsewhere are mirrored too, so QoS 1/2
    /// messages published here are stored for them; and a stored message committed through
    /// another node for a session owned here is queued for it. `index` is the log index of the
    /// batch.
    pub fn apply_replicated(&self, index: u64, changes: &[StateChange], now: Instant) {
        for change in changes {
            match change {
                StateChange::RetainedSet { message } => {
                    self.store_retained(message);
                }
                StateChange::RetainedCleared { topic } => {
                    self.remove_retained(topic);
                }
                StateChange::SessionOpened {
                    client_id,
                    clean_start,
                    ..
                } => {
                    if *clean_start {
                        self.remote.clear(client_id);
                    }
                    if let Some(will) = self.forget_session(client_id, true, !*clean_start) {
                        self.publish_will(will, now);
                    }
                }
                StateChange::SessionEnded { client_id } => {
                    self.remote.clear(client_id);
                    self.forget_session(client_id, false, false);
                }
                StateChange::Subscribed {
                    client_id,
                    filter,
                    entry,
                } if !self.owns(client_id) => {
                    self.remote
                        .add(client_id, filter, *entry, &self.topic_limits);
                }
                StateChange::Unsubscribed { client_id, filter } => {
                    self.remote.remove(client_id, filter, &self.topic_limits);
                }
                StateChange::MessageStored {
                    id,
                    message,
                    targets,
                } => self.queue_replicated(index, *id, message, targets),
                StateChange::NodeDown { node } if *node != self.node_id => {
                    // Its routes are stale until it comes back and announces them again.
                    self.forget_peer(*node);
                }
                StateChange::NodeDown { .. } => {
                    // This node was declared down (it was cut off, its sessions were adopted
                    // elsewhere): it can no longer prove it owns any persistent session.
                    self.fence_durable_sessions(None);
                }
                _ => {}
            }
        }
    }

    /// Lets go of every persistent session held here, because this node can no longer prove
    /// it owns them (it was declared down, or it has been out of touch with a quorum long
    /// enough that the cluster may declare it down and adopt them). Connected clients are
    /// disconnected with `code` (MQTT 5; with a Server Reference for 0x9C Use another server;
    /// `None`: 0x8E Session taken over); no will is published here (the adopting node publishes it), and the sessions'
    /// subscriptions are kept as those of sessions held elsewhere. Returns how many.
    pub fn fence_durable_sessions(&self, code: Option<ReasonCode>) -> usize {
        let durable: Vec<Arc<Session>> = self
            .sessions
            .lock()
            .values()
            .filter(|s| s.is_durable())
            .cloned()
            .collect();
        let mut fenced = 0;
        for session in durable {
            {
                let mut st = session.state.lock();
                if st.online && st.kick.is_none() {
                    st.kick = code;
                }
                // Its will belongs to whichever node adopts the session.
                st.will = None;
            }
            drop(self.forget_session(session.client_id(), true, true));
            fenced += 1;
        }
        fenced
    }

    /// A client with id `client_id` connected to another node at `at` (that node's claim, see
    /// [`Forwarder::claim`]): a session here that is older ends (its connection is closed with
    /// Session Taken Over; the old connection's will is published as on any takeover by a
    /// session that is not resumed). A newer one is kept. Returns whether one ended.
    pub fn claimed_elsewhere(&self, client_id: &ByteStr, at: Instant, now: Instant) -> bool {
        let registry = self.sessions.lock();
        let Some(session) = registry.get(client_id).cloned() else {
            return false;
        };
        let mut st = session.state.lock();
        let since = if st.online {
            st.attached_at
        } else {
            st.disconnected_at
        };
        // Clocks of two processes, even on one host, agree only to a few milliseconds: a
        // session here counts as newer only when clearly so.
        if since.is_some_and(|t| t > at + CLAIM_CLOCK_TOLERANCE) {
            return false;
        }
        if st.online {
            self.stats.takeovers.fetch_add(1, Relaxed);
        }
        let will = st.will.take();
        drop(self.end_locked(registry, &session, st));
        if let Some(will) = will {
            self.publish_will(will, now);
        }
        true
    }

    /// Whether the session of `client_id` lives on this node.
    fn owns(&self, client_id: &ByteStr) -> bool {
        self.sessions.lock().contains_key(client_id)
    }

    /// Queues a message stored through another node for the targets that are sessions of this
    /// node (unless it came with the session's load).
    fn queue_replicated(
        &self,
        index: u64,
        id: MessageId,
        message: &Arc<Message>,
        targets: &[StoredTarget],
    ) {
        let mut release = Vec::new();
        for target in targets {
            let session = self.sessions.lock().get(&target.client_id).cloned();
            let here = session.filter(|s| s.is_durable());
            // A QoS 1 copy forwarded live by the publishing node may have been delivered
            // already (or may still come, for a connected session). Batches replicated here
            // were all proposed by other nodes.
            let expect_forward =
                target.qos == QoS::AtLeastOnce && here.as_ref().is_some_and(|s| s.is_online());
            let (copy, held) = self.live.replicated(id, &target.client_id, expect_forward);
            release.extend(held);
            let Some(session) = here else { continue };
            if copy == live::Copy::Skip || session.state.lock().replicated_upto >= index {
                continue;
            }
            let delivery = Delivery {
                qos: target.qos,
                retain: target.retain,
                subscription_ids: target.subscription_ids.iter().copied().collect(),
                message: message.clone(),
                durable: Some(id),
            };
            session.enqueue(delivery, &self.queue_limits, &self.stats);
        }
        drop(self.propose(release));
    }

    /// Replaces the mirrored subscriptions of sessions owned by other nodes (after the durable
    /// state was replaced wholesale, e.g. a Raft snapshot installed on a lagging node).
    pub fn replace_remote_subscriptions(&self, subscriptions: Vec<(ByteStr, Arc<str>, SubEntry)>) {
        let clients: Vec<ByteStr> = self.remote.by_client.lock().keys().cloned().collect();
        for client_id in clients {
            self.remote.clear(&client_id);
        }
        for (client_id, filter, entry) in subscriptions {
            if !self.owns(&client_id) {
                self.remote
                    .add(&client_id, &filter, entry, &self.topic_limits);
            }
        }
    }

    /// Replaces every retained message with `retained` (after the durable state was replaced
    /// wholesale, e.g. a Raft snapshot installed on a lagging node).
    pub fn replace_retained(&self, retained: Vec<Arc<Message>>) {
        let keep: std::collections::HashSet<&str> =
            retained.iter().map(|m| m.topic.as_str()).collect();
        let mut stale = Vec::new();
        self.retained.for_each(|topic, _| {
            // `$SYS` topics are this node's own statistics, never replicated.
            if !keep.contains(topic.as_str()) && !topic.as_str().starts_with("$SYS/") {
                stale.push(topic.as_str().to_owned());
            }
        });
        for topic in stale {
            self.remove_retained(&topic);
        }
        for message in &retained {
            self.store_retained(message);
        }
    }

    /// Drops the in-memory session of `client_id` without recording anything (its durable
    /// state now belongs to another node). With `fence`, a connection attached to it is told
    /// it was taken over; without, an attached session is kept.
    /// With `keep_subscriptions`, its persistent subscriptions are mirrored as remote ones.
    ///
    /// Returns the will of a fenced connection that is due now, as on a local takeover: when
    /// it has no delay, or the new connection started clean (MQTT 5 §3.1.2.5, §3.1.3.2.2).
    fn forget_session(
        &self,
        client_id: &ByteStr,
        fence: bool,
        keep_subscriptions: bool,
    ) -> Option<PendingWill> {
        let mut registry = self.sessions.lock();
        let session = registry.get(client_id).cloned()?;
        let mut st = session.state.lock();
        if st.online {
            if !fence {
                return None;
            }
            self.stats.takeovers.fetch_add(1, Relaxed);
        }
        // The session lives on elsewhere: its persistent subscriptions now belong to a remote
        // owner (a clean start there ends them, and its SessionOpened clears them again).
        if keep_subscriptions && session.is_durable() {
            for (key, rec) in &st.subscriptions {
                self.remote
                    .add(client_id, key, rec.entry, &self.topic_limits);
            }
        }
        // A will still pending here (connected, or waiting for its delay) is this node's to
        // publish if due now; otherwise the new connection cancels it.
        let will = st
            .will
            .take()
            .filter(|w| fence && (w.delay_secs == 0 || !keep_subscriptions));
        session.set_durable(false);
        self.unload_locked(&mut registry, &session, st);
        will
    }

    /// Ends a session by administrative action (kicks its connection if online).
    pub fn remove_session(&self, client_id: &str) -> bool {
        self.end_session(client_id).is_some()
    }

    /// Like [`Broker::remove_session`], returning the commit of the session's end (`None` when
    /// there was no session).
    pub fn end_session(&self, client_id: &str) -> Option<Commit> {
        let registry = self.sessions.lock();
        let session = registry.get(client_id).cloned()?;
        let mut st = session.state.lock();
        if st.online && st.kick.is_none() {
            st.kick = Some(ReasonCode::ADMINISTRATIVE_ACTION);
        }
        st.will = None;
        Some(self.end_locked(registry, &session, st))
    }

    /// Takes `session` (locked as `st`) out of this node ([`Broker::unload_locked`]) and, if
    /// it was stored, ends it in the durable state too (dropping any of its subscriptions still
    /// mirrored as those of a session held elsewhere, as during a load).
    fn end_locked(
        &self,
        mut registry: parking_lot::MutexGuard<'_, HashMap<ByteStr, Arc<Session>>>,
        session: &Arc<Session>,
        st: parking_lot::MutexGuard<'_, SessionState>,
    ) -> Commit {
        let durable = session.is_durable();
        session.set_durable(false);
        self.unload_locked(&mut registry, session, st);
        drop(registry);
        if !durable {
            return Commit::ready();
        }
        self.remote.clear(session.client_id());
        self.propose(vec![StateChange::SessionEnded {
            client_id: session.client_id().clone(),
        }])
    }
}

/// How much later than a claim from another node a local session must have started to be
/// kept ([`Broker::claimed_elsewhere`]).
pub const CLAIM_CLOCK_TOLERANCE: Duration = Duration::from_millis(100);

/// Whether `key` is `$share/{group}/{filter}`.
fn is_share_key(key: &str, group: &str, filter: &str) -> bool {
    key.strip_prefix("$share/")
        .and_then(|rest| rest.strip_prefix(group))
        .and_then(|rest| rest.strip_prefix('/'))
        == Some(filter)
}
