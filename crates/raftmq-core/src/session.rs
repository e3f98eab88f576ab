//! Sessions: the state that outlives a network connection (MQTT 5 §4.1).
//!
//! A [`Session`] is shared between the broker's registry, the subscription index (as the
//! subscriber key) and the connection currently attached to it. Every field lives behind one
//! mutex; publishers lock it briefly to enqueue a delivery, the attached connection locks it to
//! drain the queue and to record acknowledgements.
//!
//! **Fencing.** Each attach increments the session's `epoch`. A connection holds the epoch it
//! attached with and reaches the session's state only through [`Session::lock_attached`],
//! which refuses once the epoch moved on: a connection whose session was taken over can no
//! longer deliver or acknowledge anything, and no code outside the broker can forget the check
//! (the unchecked [`Session::lock_unfenced`] needs a token only the broker can make).

use crate::broker::{TakenOver, Unfenced};
use crate::config::OverflowPolicy;
use crate::message::Delivery;
use crate::stats::{BrokerStats, DropReason};
use parking_lot::{Mutex, MutexGuard};
use raftmq_codec::{ByteStr, PacketId, QoS, SubscriptionOptions};
use std::collections::HashMap;
use std::collections::VecDeque;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Instant;

/// Hashes a session's maps with one random seed per process. ahash's `RandomState` would keep
/// 32 bytes of seeds in each of a session's three maps, on every session, even when the maps
/// are empty, as they are for most (idle) clients.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ProcessSeed;

impl BuildHasher for ProcessSeed {
    type Hasher = ahash::AHasher;

    fn build_hasher(&self) -> ahash::AHasher {
        static SEED: std::sync::LazyLock<ahash::RandomState> =
            std::sync::LazyLock::new(ahash::RandomState::new);
        SEED.build_hasher()
    }
}

/// The value stored in the subscription index for one subscription.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubEntry {
    pub options: SubscriptionOptions,
    pub subscription_id: Option<u32>,
}

/// A subscription as the session remembers it (to list, resume and remove it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionRecord {
    pub filter: crate::topic::TopicFilter,
    pub share_group: Option<Arc<str>>,
    pub entry: SubEntry,
}

/// A message sent to the client and not yet completely acknowledged.
#[derive(Clone, Debug)]
pub(crate) enum Outgoing {
    /// PUBLISH QoS 1/2 awaiting PUBACK/PUBREC.
    Publish(Delivery),
    /// PUBREL sent, awaiting PUBCOMP (with the stored message's id, if it is durable).
    Released(Option<crate::durability::MessageId>),
}

#[derive(Clone, Debug)]
pub(crate) struct OutgoingEntry {
    /// Send order, so redelivery after reconnect keeps the original order.
    pub seq: u64,
    pub state: Outgoing,
}

/// What the connection attached to a session said in CONNECT (for the admin API).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub username: Option<String>,
    /// The client's network address.
    pub peer: Option<std::net::SocketAddr>,
    /// Protocol level: 3 (3.1), 4 (3.1.1) or 5.
    pub protocol_level: u8,
    /// Clean Start (clean session for 3.x).
    pub clean_start: bool,
}

/// A will waiting to be published (the same record that durable storage keeps).
pub use crate::durability::WillRecord as PendingWill;

/// Mutable session state (behind [`Session`]'s lock).
#[derive(Debug)]
pub(crate) struct SessionState {
    /// Incremented by every attach; the fencing token.
    pub epoch: u64,
    /// Whether a connection is attached.
    pub online: bool,
    /// Set by publishers and by takeover; cleared when the connection polls.
    pub notified: bool,
    pub waker: Option<Waker>,
    /// Session Expiry Interval in seconds (`u32::MAX` = never).
    pub expiry_secs: u32,
    /// Keyed by the full filter as subscribed (including `$share/group/`).
    pub subscriptions: HashMap<Arc<str>, SubscriptionRecord, ProcessSeed>,
    /// Deliveries waiting for the client (and for in-flight window room).
    pub queue: VecDeque<Delivery>,
    /// Messages towards the client awaiting acknowledgement, by packet id.
    pub outgoing: HashMap<u16, OutgoingEntry, ProcessSeed>,
    pub next_packet_id: u16,
    pub next_seq: u64,
    /// QoS 2 packet ids received from the client, PUBREL not yet received, each with the
    /// commit of what its PUBLISH recorded (the message stored, the id recorded): a resent
    /// PUBLISH is acknowledged only once that commit succeeded, and routed again if it failed
    /// (nothing was recorded, so nothing was acknowledged).
    pub incoming_qos2: HashMap<u16, crate::durability::Commit, ProcessSeed>,
    /// Of those, loaded from the store: the ones whose message a resent PUBLISH stores again,
    /// under this id (see [`crate::durability::SessionImage::qos2_reroute`]). Removed once
    /// such a store commits.
    pub qos2_reroute: HashMap<u16, crate::durability::MessageId, ProcessSeed>,
    /// What the deliveries of the client's latest QoS 2 PUBLISH wait for (the next one's wait
    /// for it too, so they arrive in order).
    pub last_qos2: crate::durability::Commit,
    /// The commit of the client's latest PUBLISH that was stored through the log: peers
    /// deliver its next messages only after it (see `Forwarder::forward`). `None` until this
    /// node stores one for the session (a new connection, or a session loaded or moved here):
    /// its previous message may have gone through another node.
    pub last_stored: Option<crate::durability::Commit>,
    /// The will of the attached connection, or a will waiting for its delay after disconnect.
    pub will: Option<PendingWill>,
    /// When the session was disconnected (to compute the will and expiry deadlines).
    pub disconnected_at: Option<Instant>,
    /// When the attached (or last) connection attached.
    pub attached_at: Option<Instant>,
    /// The attached (or last) connection's CONNECT details.
    pub connection: Option<ConnectionInfo>,
    /// Set by an administrative kick: the attached connection closes, telling a v5 client this
    /// reason code (instead of Session Taken Over when the session was also discarded).
    pub kick: Option<raftmq_codec::ReasonCode>,
    /// The replicated log index the session was loaded at (a session created through another
    /// node, [`crate::Broker::finish_attach`]): stored messages committed up to it came with
    /// the load, so the applied-change feed must not queue them again. 0 otherwise.
    pub replicated_upto: u64,
    /// Stored messages the applied-change feed queued while the session's load was pending,
    /// with the log index of the batch that stored each: those at or below the load's index
    /// are covered by the loaded image (in it, or acknowledged already) and are dropped when
    /// it is restored (see `Broker::restore_locked`).
    pub fed_while_loading: Vec<(crate::durability::MessageId, u64)>,
    /// Set while the queue is past the pause mark (backpressure): the publishers waiting for
    /// room. Boxed: rare, and every idle session carries this struct.
    pub congestion: Option<Box<Congestion>>,
}

/// A connected session whose queue passed the pause mark ([`QueueLimits::pause_at`]): the
/// publishing connections waiting until it is down to the resume mark, and whether one of them
/// waited the longest pause (the subscriber then counts as stalled: nobody waits for it again
/// until its queue has drained to the resume mark).
///
/// Each congestion is an *episode* with a process-unique number: a publisher waits for the
/// episode that paused it, so one woken when it ended, but slow to run, does not wait for (or
/// give up on) the next one, which the publishers woken before it may already have started.
#[derive(Debug)]
pub(crate) struct Congestion {
    episode: u64,
    waiters: Vec<Waker>,
    stalled: bool,
}

impl Congestion {
    fn new() -> Box<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Box::new(Congestion {
            episode: NEXT.fetch_add(1, Ordering::Relaxed),
            waiters: Vec::new(),
            stalled: false,
        })
    }
}

/// A session, shared by reference. Equality and hashing are by identity (two sessions with the
/// same client id at different times are different sessions).
#[derive(Debug)]
pub struct Session {
    client_id: ByteStr,
    online: AtomicBool,
    /// Recorded in durable storage (a persistent session): its changes are proposed.
    durable: AtomicBool,
    /// Mirrors `SessionState::congestion.is_some()` (lock-free, for picking a shared
    /// subscription's member; may be momentarily stale).
    crowded: AtomicBool,
    /// Reached through [`Session::lock_attached`] (a connection) or
    /// [`Session::lock_unfenced`] (the broker).
    state: Mutex<SessionState>,
}

/// A session's state, locked.
pub(crate) type SessionGuard<'a> = MutexGuard<'a, SessionState>;

impl PartialEq for Session {
    fn eq(&self, other: &Self) -> bool {
        std::ptr::eq(self, other)
    }
}
impl Eq for Session {}
impl Hash for Session {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self as *const Session as usize).hash(h)
    }
}

/// What happened to a delivery offered to a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Enqueued {
    Queued,
    /// The session is connected and its queue is past the pause mark: the publisher should
    /// wait for room in this congestion `episode` ([`Session::poll_room`]). `queued` is false
    /// when the queue was full and the delivery dropped (counted).
    Congested {
        queued: bool,
        episode: u64,
    },
    Dropped(DropReason),
}

impl Enqueued {
    /// Whether the delivery is in the queue.
    pub fn is_queued(self) -> bool {
        matches!(self, Self::Queued | Self::Congested { queued: true, .. })
    }
}

/// Limits applied when enqueueing.
#[derive(Clone, Copy, Debug)]
pub struct QueueLimits {
    pub max_queued: usize,
    pub overflow: OverflowPolicy,
    pub queue_qos0_offline: bool,
    /// Queue length from which a connected session asks its publishers to wait (0: never).
    pub pause_at: usize,
    /// Queue length down to which they wait.
    pub resume_at: usize,
}

impl QueueLimits {
    /// The limits for a queue of `max_queued`, with backpressure (`pause`) or without.
    pub fn new(
        max_queued: usize,
        overflow: OverflowPolicy,
        queue_qos0_offline: bool,
        pause: bool,
    ) -> Self {
        // Half full: room left for what paused publishers had already sent; a quarter: a
        // burst's worth still queued when they resume, so the subscriber never runs dry.
        let pause_at = if pause && max_queued >= 2 {
            max_queued / 2
        } else {
            0
        };
        QueueLimits {
            max_queued,
            overflow,
            queue_qos0_offline,
            pause_at,
            resume_at: max_queued / 4,
        }
    }
}

impl Session {
    pub(crate) fn new(client_id: ByteStr, expiry_secs: u32) -> Self {
        Session {
            client_id,
            online: AtomicBool::new(false),
            durable: AtomicBool::new(false),
            crowded: AtomicBool::new(false),
            state: Mutex::new(SessionState {
                epoch: 0,
                online: false,
                notified: false,
                waker: None,
                expiry_secs,
                subscriptions: HashMap::default(),
                queue: VecDeque::new(),
                outgoing: HashMap::default(),
                next_packet_id: 1,
                next_seq: 0,
                incoming_qos2: Default::default(),
                qos2_reroute: Default::default(),
                last_qos2: crate::durability::Commit::ready(),
                last_stored: None,
                will: None,
                disconnected_at: None,
                attached_at: None,
                connection: None,
                kick: None,
                replicated_upto: 0,
                fed_while_loading: Vec::new(),
                congestion: None,
            }),
        }
    }

    /// Locks the state on behalf of the connection attached with `epoch`: refused with
    /// [`TakenOver`] once another attach, a takeover, a fence or an unload has moved the epoch
    /// on. Every operation a connection makes on its session goes through here.
    pub(crate) fn lock_attached(&self, epoch: u64) -> Result<SessionGuard<'_>, TakenOver> {
        let st = self.state.lock();
        if st.epoch == epoch {
            Ok(st)
        } else {
            Err(TakenOver)
        }
    }

    /// Locks the state whatever its epoch, for the broker's own work on the registry
    /// (attaching, takeover, fencing, adoption, listings), which decides epochs itself.
    pub(crate) fn lock_unfenced(&self, _broker: Unfenced) -> SessionGuard<'_> {
        self.state.lock()
    }

    /// The reason code an administrator or a fence left for the connection that was attached
    /// (it closes with it instead of Session Taken Over), taken once. Read after the epoch
    /// moved on, by the connection that lost the session.
    pub(crate) fn take_kick(&self) -> Option<raftmq_codec::ReasonCode> {
        self.state.lock().kick.take()
    }

    /// The session's client identifier.
    pub fn client_id(&self) -> &ByteStr {
        &self.client_id
    }

    /// Whether a connection is attached (lock-free; may be momentarily stale).
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Relaxed)
    }

    /// Whether the session is recorded in durable storage.
    pub fn is_durable(&self) -> bool {
        self.durable.load(Ordering::Relaxed)
    }

    pub(crate) fn set_durable(&self, durable: bool) {
        self.durable.store(durable, Ordering::Relaxed);
    }

    pub(crate) fn set_online(&self, state: &mut SessionState, online: bool) {
        state.online = online;
        self.online.store(online, Ordering::Relaxed);
        if !online {
            // Nobody drains the queue now: publishers waiting for it go on.
            for w in self.end_congestion(state) {
                w.wake();
            }
        }
    }

    /// Records the CONNECT details of the connection attached with `epoch`.
    pub fn set_connection_info(&self, epoch: u64, info: ConnectionInfo) {
        if let Ok(mut st) = self.lock_attached(epoch) {
            st.connection = Some(info);
        }
    }

    /// Number of subscriptions.
    pub fn subscription_count(&self) -> usize {
        self.state.lock().subscriptions.len()
    }

    /// The subscriptions, sorted by filter (for admin listings and tests).
    pub fn subscriptions(&self) -> Vec<SubscriptionRecord> {
        let mut subs: Vec<_> = self.state.lock().subscriptions.values().cloned().collect();
        subs.sort_by(|a, b| (&a.share_group, &a.filter).cmp(&(&b.share_group, &b.filter)));
        subs
    }

    /// (queued, in flight) message counts.
    pub fn queue_depth(&self) -> (usize, usize) {
        let s = self.state.lock();
        (s.queue.len(), s.outgoing.len())
    }

    /// Offers a delivery. Wakes the attached connection.
    pub fn enqueue(
        &self,
        delivery: Delivery,
        limits: &QueueLimits,
        stats: &BrokerStats,
    ) -> Enqueued {
        let mut s = self.state.lock();
        self.enqueue_locked(&mut s, delivery, limits, stats)
    }

    /// Whether the session's state was loaded from the log at index `index` or later (of the
    /// session's shard): then whatever its shard stored for it up to `index` is in the loaded
    /// image, or was acknowledged.
    pub fn loaded_from_at_least(&self, index: u64) -> bool {
        self.state.lock().replicated_upto >= index
    }

    /// Queues a stored message that the applied-change feed brought, committed in the batch
    /// at log index `index`, unless the session's state was loaded from at least that index
    /// (then it is in the loaded image already, or was acknowledged). While the session's
    /// load is still pending (`loading`), the index is remembered with it, so the restore can
    /// drop it if the load covers it. Checked and queued under one lock. Whether it was
    /// queued.
    pub fn enqueue_replicated(
        &self,
        delivery: Delivery,
        index: u64,
        loading: bool,
        limits: &QueueLimits,
        stats: &BrokerStats,
    ) -> bool {
        let mut s = self.state.lock();
        if s.replicated_upto >= index {
            return false;
        }
        if loading && let Some(id) = delivery.durable {
            s.fed_while_loading.push((id, index));
        }
        self.enqueue_locked(&mut s, delivery, limits, stats)
            .is_queued()
    }

    fn enqueue_locked(
        &self,
        s: &mut SessionState,
        delivery: Delivery,
        limits: &QueueLimits,
        stats: &BrokerStats,
    ) -> Enqueued {
        if !s.online && delivery.qos == QoS::AtMostOnce && !limits.queue_qos0_offline {
            stats.dropped(DropReason::Offline, 1);
            return Enqueued::Dropped(DropReason::Offline);
        }
        let congested = self.congest(s, limits, 1);
        if s.queue.len() >= limits.max_queued {
            match limits.overflow {
                OverflowPolicy::DropNew => {
                    stats.dropped(DropReason::QueueFull, 1);
                    return match congested {
                        Some(episode) => Enqueued::Congested {
                            queued: false,
                            episode,
                        },
                        None => Enqueued::Dropped(DropReason::QueueFull),
                    };
                }
                OverflowPolicy::DropOldest => {
                    if s.queue.pop_front().is_some() {
                        stats.dropped(DropReason::QueueFull, 1);
                        stats.messages_queued.fetch_sub(1, Ordering::Relaxed);
                    }
                }
            }
        }
        s.queue.push_back(delivery);
        stats.messages_queued.fetch_add(1, Ordering::Relaxed);
        Self::notify(s);
        match congested {
            Some(episode) => Enqueued::Congested {
                queued: true,
                episode,
            },
            None => Enqueued::Queued,
        }
    }

    /// Offers a stored delivery unless this session already has that stored message (queued
    /// or in flight), e.g. restored from a read of the replicated state made after it was
    /// stored.
    pub(crate) fn enqueue_stored_once(
        &self,
        delivery: Delivery,
        limits: &QueueLimits,
        stats: &BrokerStats,
    ) -> Enqueued {
        if let Some(id) = delivery.durable {
            let st = self.state.lock();
            let present = st.queue.iter().any(|d| d.durable == Some(id))
                || st.outgoing.values().any(|o| match &o.state {
                    Outgoing::Publish(d) => d.durable == Some(id),
                    Outgoing::Released(released) => *released == Some(id),
                });
            if present {
                return Enqueued::Queued;
            }
        }
        self.enqueue(delivery, limits, stats)
    }

    /// Ready when a publisher paused for congestion `episode` of this session may read
    /// again: the episode ended (the queue is down to the resume mark, or the session went
    /// offline) or counts as stalled. Registers the waker otherwise.
    pub fn poll_room(&self, limits: &QueueLimits, episode: u64, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.state.lock();
        let s = &mut *s;
        let blocked = s.online && s.queue.len() > limits.resume_at;
        match s.congestion.as_deref_mut() {
            Some(c) if blocked && !c.stalled && c.episode == episode => {
                if !c.waiters.iter().any(|w| w.will_wake(cx.waker())) {
                    c.waiters.push(cx.waker().clone());
                }
                Poll::Pending
            }
            _ => Poll::Ready(()),
        }
    }

    /// A publisher waited the longest pause for congestion `episode` of this session: if it
    /// is still going on, the session counts as stalled (no publisher waits for it) until its
    /// queue drains to the resume mark, and the other waiters are woken. Returns whether it
    /// was (false: the episode had ended meanwhile).
    pub fn give_up(&self, episode: u64) -> bool {
        let waiters = {
            let mut s = self.state.lock();
            match s.congestion.as_deref_mut() {
                Some(c) if c.episode == episode && !c.stalled => {
                    c.stalled = true;
                    std::mem::take(&mut c.waiters)
                }
                _ => return false,
            }
        };
        for w in waiters {
            w.wake();
        }
        true
    }

    /// Whether the queue is past the pause mark (lock-free; may be momentarily stale).
    pub fn is_crowded(&self) -> bool {
        self.crowded.load(Ordering::Relaxed)
    }

    /// The current congestion episode, started now if the session is connected, its queue
    /// holds `pause_at` messages or more (`extra` counts a delivery about to be queued) and
    /// it does not count as stalled. `None`: publishers need not wait.
    fn congest(&self, s: &mut SessionState, limits: &QueueLimits, extra: usize) -> Option<u64> {
        if limits.pause_at == 0 || !s.online || s.queue.len() + extra < limits.pause_at {
            return None;
        }
        let c = s.congestion.get_or_insert_with(|| {
            self.crowded.store(true, Ordering::Relaxed);
            Congestion::new()
        });
        (!c.stalled).then_some(c.episode)
    }

    /// Ends the congestion once the queue is down to `resume_at`: the publishers to wake.
    pub(crate) fn relieve(&self, s: &mut SessionState, resume_at: usize) -> Vec<Waker> {
        if s.congestion.is_some() && s.queue.len() <= resume_at {
            self.end_congestion(s)
        } else {
            Vec::new()
        }
    }

    /// Ends the congestion, if any: the publishers to wake.
    fn end_congestion(&self, s: &mut SessionState) -> Vec<Waker> {
        self.crowded.store(false, Ordering::Relaxed);
        s.congestion.take().map(|c| c.waiters).unwrap_or_default()
    }

    /// For a delivery that will be queued later (held back for a commit): the congestion
    /// episode its publisher should wait for, as [`Self::enqueue`] would report it.
    pub fn congestion(&self, limits: &QueueLimits) -> Option<u64> {
        let mut s = self.state.lock();
        self.congest(&mut s, limits, 0)
    }

    /// Whether messages sent to the client await its acknowledgement. Such a client is never
    /// paused by backpressure: reading its acknowledgements is what drains its own queue, and
    /// another client may be waiting for that.
    pub fn awaits_acknowledgements(&self) -> bool {
        !self.state.lock().outgoing.is_empty()
    }

    pub(crate) fn notify(s: &mut SessionState) {
        if !s.notified {
            s.notified = true;
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        }
    }

    /// Ready when the session has news for the connection attached with `epoch` (messages
    /// queued, or the session was taken over). Registers the waker otherwise.
    ///
    /// Only the connection holding the current epoch registers its waker: a fenced-off
    /// connection is always ready (its next operation notices the takeover), so it can neither
    /// steal the waker slot from the new connection nor consume its notification.
    pub fn poll_notified(&self, epoch: u64, cx: &mut Context<'_>) -> Poll<()> {
        let mut s = self.state.lock();
        if s.epoch != epoch {
            return Poll::Ready(());
        }
        if s.notified {
            s.notified = false;
            Poll::Ready(())
        } else {
            match &s.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => s.waker = Some(cx.waker().clone()),
            }
            Poll::Pending
        }
    }
}

impl SessionState {
    /// Allocates a packet id not in use by an outgoing message.
    pub(crate) fn allocate_packet_id(&mut self) -> Option<PacketId> {
        if self.outgoing.len() >= usize::from(u16::MAX) {
            return None;
        }
        loop {
            let id = self.next_packet_id;
            self.next_packet_id = if id == u16::MAX { 1 } else { id + 1 };
            if !self.outgoing.contains_key(&id) {
                return PacketId::new(id);
            }
        }
    }
}
