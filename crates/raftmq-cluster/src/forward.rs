//! Live forwarding between nodes (`raftmq.forward.v1`): each node keeps one long-lived gRPC
//! stream to every other member. On it the node announces the filters it has local subscribers
//! for (a full set when the stream opens, then deltas), and sends, in batches, the messages
//! published on it that match the peer's announced filters. The peer acknowledges cumulatively;
//! unacknowledged messages are resent after a reconnect and the receiver drops sequence numbers
//! it has already handled, so a retry never delivers twice.
//!
//! This is the fast path, which never waits for consensus: QoS 0, deliveries to non-persistent
//! sessions, and QoS 1 to connected persistent sessions. QoS 1/2 messages for persistent
//! sessions of other nodes are also stored through Raft before the publisher's acknowledgement
//! (see `Broker::apply_replicated`); the forwarded copy carries the stored id, so a QoS 1
//! message reaches a connected persistent session once, by whichever copy arrives first, and
//! QoS 2 only through the log. Memory is bounded: a peer that cannot keep up or cannot be
//! reached has its queue capped and the excess dropped and counted.

use crate::convert::{
    WallClock, message_from_proto, message_to_proto, will_from_proto, will_to_proto,
};
use crate::network::{ClusterTls, Fault, Faults, MAX_MESSAGE_BYTES, channel};
use crate::types::{NodeId, Raft};
use metrics::counter;
use parking_lot::Mutex;
use raftmq_codec::{ByteStr, QoS};
use raftmq_core::durability::{Commit, CommitHandle, LogPositions, MessageId};
use raftmq_core::message::Message;
use raftmq_core::session::PendingWill;
use raftmq_core::{Broker, Forwarder};
use raftmq_proto::forward as pb;
use raftmq_proto::forward::forward_service_client::ForwardServiceClient;
use raftmq_proto::forward::forward_service_server::{ForwardService, ForwardServiceServer};
use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info};

/// Messages waiting for one peer's stream; beyond this they are dropped and counted.
const PEER_QUEUE: usize = 16_384;
/// Messages sent to one peer and not yet acknowledged, kept for a resend after a reconnect.
const MAX_UNACKED: usize = 65_536;
/// Most messages per `Deliveries` frame.
const MAX_BATCH: usize = 512;
/// How often a link checks whether this node's routes changed.
const ROUTE_CHECK: Duration = Duration::from_millis(20);
/// How often the membership is checked for peers to link to.
const MEMBERSHIP_CHECK: Duration = Duration::from_millis(500);
/// How long a queue opened for a peer that is not (yet) in this node's view of the membership
/// is kept (see [`ForwardHub::forward`]): a member this node has not applied yet is in it well
/// within this; past it the queued messages are dropped and counted (`reason="no_link"`).
const EARLY_LINK_GRACE: Duration = Duration::from_secs(10);
/// A peer that has not acknowledged a message for this long is treated as unreachable: the
/// stream is closed (its publishers stop waiting, what was sent is resent after a reconnect),
/// so a hung peer whose connection stays open cannot hold publishers up.
pub const FORWARD_ACK_TIMEOUT: Duration = Duration::from_secs(10);

pub const FORWARDED_TOTAL: &str = "raftmq_forward_messages_total";
pub const FORWARD_DROPPED_TOTAL: &str = "raftmq_forward_dropped_total";
pub const FORWARD_RECONNECTS_TOTAL: &str = "raftmq_forward_reconnects_total";
pub const FORWARD_RECEIVED_TOTAL: &str = "raftmq_forward_received_total";
pub const FORWARD_DUPLICATES_TOTAL: &str = "raftmq_forward_duplicates_total";
/// Wills of a peer's sessionless connections this node holds (published if that peer is
/// declared down by this node).
pub const FORWARD_PEER_WILLS: &str = "raftmq_forward_peer_wills";
pub const FORWARD_RESEND_OVERFLOW_TOTAL: &str = "raftmq_forward_resend_overflow_total";
pub const FORWARD_ACK_TIMEOUTS_TOTAL: &str = "raftmq_forward_ack_timeouts_total";
/// Queues opened for a peer on its first message, before the membership check had linked to
/// it (the peer announced routes first: it joined, or this node started, a moment ago).
pub const FORWARD_EARLY_LINKS_TOTAL: &str = "raftmq_forward_early_links_total";
/// Wills of this node's previous process (it restarted before being declared down) that it
/// published, as its peers reported them.
pub const PREDECESSOR_WILLS_TOTAL: &str = "raftmq_cluster_predecessor_wills_total";
/// Forwarded messages that had to wait, on the sending or the receiving side, for the
/// publisher's previous stored message (see [`ORDER_WAIT`]).
pub const FORWARD_ORDER_WAITS_TOTAL: &str = "raftmq_forward_order_waits_total";
/// Of those, the waits given up after [`ORDER_WAIT`] (the message went on unordered).
pub const FORWARD_ORDER_WAIT_TIMEOUTS_TOTAL: &str = "raftmq_forward_order_wait_timeouts_total";

/// Most a forwarded message waits to keep its publisher's order: on the sending side for the
/// commit of the publisher's previous stored message (to learn its log index), on the
/// receiving side for that index to be applied there. Past it the message goes on (a commit
/// that slow, or a receiver that far behind, is a failure the log's copy still covers).
pub const ORDER_WAIT: Duration = Duration::from_secs(2);

/// One message for a peer.
struct Outgoing {
    message: Arc<Message>,
    plain: bool,
    shared: Vec<Arc<str>>,
    stored: Option<MessageId>,
    /// The commit of the same publisher's previous stored message: the receiver delivers
    /// this one only after applying it (see `pb::Forwarded::after_index`).
    after: Option<Commit>,
    /// Resolved when the peer acknowledges it (QoS 1/2 while the link is up).
    ack: Option<CommitHandle>,
}

/// What goes to one peer's stream, in order.
enum Item {
    Message(Outgoing),
    /// A client connected here with a session that is not stored (see `Forwarder::claim`).
    Claim(pb::Claim),
}

/// A message sent and not yet acknowledged (kept for a resend after a reconnect).
struct Unacked {
    frame: pb::Forwarded,
    ack: Option<CommitHandle>,
    /// When it was (re)sent.
    sent_at: tokio::time::Instant,
}

/// The sending side: one queue and one stream task per peer.
pub struct ForwardHub {
    node_id: NodeId,
    tls: Option<ClusterTls>,
    /// Fault injection (tests): a link whose traffic is dropped is not opened, or is closed.
    faults: Faults,
    incarnation: u64,
    clock: WallClock,
    links: Mutex<HashMap<NodeId, mpsc::Sender<Item>>>,
    /// Queues opened by [`ForwardHub::forward`] for peers that announced routes before the
    /// membership check linked to them, with when; the check starts their links (lock order:
    /// `links`, then `early`).
    early: Mutex<HashMap<NodeId, (mpsc::Receiver<Item>, std::time::Instant)>>,
    /// Wakes the membership check (a queue was opened early).
    wake: tokio::sync::Notify,
    /// Since when each peer's stream has been down (absent: up, or never tried).
    down_since: Mutex<HashMap<NodeId, std::time::Instant>>,
    /// Since when every attempt to reach each peer was actively refused (nothing listens on
    /// its cluster port: its process is gone). Cleared by an open stream or another failure.
    refused_since: Mutex<HashMap<NodeId, std::time::Instant>>,
}

impl std::fmt::Debug for ForwardHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardHub")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl Forwarder for ForwardHub {
    fn forward(
        &self,
        node: u64,
        message: &Arc<Message>,
        plain: bool,
        shared: Vec<Arc<str>>,
        stored: Option<MessageId>,
        after: Option<&Commit>,
    ) -> Commit {
        // QoS 1/2 over a working link: the publisher's acknowledgement waits for the peer's.
        // Over a link that is down there is nobody to wait for (its subscribers' connections
        // are gone with it, or it comes back and gets the message then): no waiting.
        let mut links = self.links.lock();
        // A peer that announced routes before the membership check linked to it (it joined, or
        // this node started, a moment ago) gets its queue now; the check links to it at once
        // (and drops the queue if the peer never shows up in the membership).
        let tx = links.entry(node).or_insert_with(|| self.open_early(node));
        let (commit, ack) = if message.qos != QoS::AtMostOnce && self.down_for(node).is_none() {
            let (commit, handle) = Commit::pending();
            (commit, Some(handle))
        } else {
            (Commit::ready(), None)
        };
        let sent = tx.try_send(Item::Message(Outgoing {
            message: message.clone(),
            plain,
            shared,
            stored,
            after: after.cloned(),
            ack,
        }));
        drop(links);
        // A message that could not be queued drops its handle: its commit fails and the
        // publisher is not acknowledged (it retries), so no QoS 1/2 message is lost here.
        if sent.is_err() {
            counter!(FORWARD_DROPPED_TOTAL, "peer" => node.to_string(), "reason" => "queue_full")
                .increment(1);
        }
        commit
    }

    fn claim(&self, client_id: &ByteStr, at: std::time::Instant) {
        let claim = pb::Claim {
            client_id: client_id.to_string(),
            at_unix_ms: self.clock.to_unix_ms(at),
        };
        // Queued even while a link is (re)connecting: it goes out once the stream is up (a
        // late claim is harmless, the receiver compares times).
        for (peer, tx) in self.links.lock().iter() {
            if tx.try_send(Item::Claim(claim.clone())).is_err() {
                counter!(FORWARD_DROPPED_TOTAL, "peer" => peer.to_string(), "reason" => "queue_full")
                    .increment(1);
            }
        }
    }
}

impl ForwardHub {
    /// Starts forwarding for `broker` on node `node_id`: links to every other member of the
    /// Raft membership (checked periodically), and installs itself as the broker's forwarder.
    /// `tls` secures the streams to peers.
    pub fn start(
        raft: Raft,
        node_id: NodeId,
        broker: Arc<Broker>,
        tls: Option<ClusterTls>,
        faults: Faults,
    ) -> (Arc<ForwardHub>, tokio::task::JoinHandle<()>) {
        let hub = Arc::new(ForwardHub::new(node_id, tls, faults));
        broker.set_forwarder(hub.clone());
        let handle = hub.clone();
        let task = tokio::spawn(async move {
            let mut tasks: HashMap<NodeId, tokio::task::JoinHandle<()>> = HashMap::new();
            loop {
                let members: HashMap<NodeId, String> = raft
                    .metrics()
                    .borrow()
                    .membership_config
                    .membership()
                    .nodes()
                    .filter(|(id, _)| **id != node_id)
                    .map(|(id, n)| (*id, n.cluster_addr.clone()))
                    .collect();
                for (peer, addr) in &members {
                    if tasks.contains_key(peer) {
                        continue;
                    }
                    let rx = hub.queue_for(*peer);
                    info!(peer, addr, "forwarding link to peer");
                    tasks.insert(
                        *peer,
                        tokio::spawn(link(hub.clone(), *peer, addr.clone(), rx, broker.clone())),
                    );
                }
                let gone: Vec<NodeId> = tasks
                    .keys()
                    .filter(|id| !members.contains_key(id))
                    .copied()
                    .collect();
                for peer in gone {
                    hub.links.lock().remove(&peer);
                    hub.down_since.lock().remove(&peer);
                    if let Some(task) = tasks.remove(&peer) {
                        task.abort();
                    }
                    broker.forget_peer(peer);
                }
                hub.drop_stale_early(&members, std::time::Instant::now());
                // Checked again after a while, or at once when a queue was opened early.
                tokio::select! {
                    _ = tokio::time::sleep(MEMBERSHIP_CHECK) => {}
                    _ = hub.wake.notified() => {}
                }
            }
        });
        (handle, task)
    }

    /// A hub of node `node_id` with no links yet.
    fn new(node_id: NodeId, tls: Option<ClusterTls>, faults: Faults) -> ForwardHub {
        ForwardHub {
            node_id,
            tls,
            faults,
            incarnation: incarnation(),
            clock: WallClock::now(),
            links: Mutex::new(HashMap::new()),
            early: Mutex::new(HashMap::new()),
            wake: tokio::sync::Notify::new(),
            down_since: Mutex::new(HashMap::new()),
            refused_since: Mutex::new(HashMap::new()),
        }
    }

    /// Opens the queue for `node` before its link exists (see [`ForwardHub::forward`]); the
    /// link counts as down until its stream opens, like any link being connected.
    /// Returns the queue's sending side, for the caller (which holds `links`) to record.
    fn open_early(&self, node: NodeId) -> mpsc::Sender<Item> {
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        self.early
            .lock()
            .insert(node, (rx, std::time::Instant::now()));
        self.down_since
            .lock()
            .entry(node)
            .or_insert_with(std::time::Instant::now);
        counter!(FORWARD_EARLY_LINKS_TOTAL, "peer" => node.to_string()).increment(1);
        self.wake.notify_one();
        tx
    }

    /// The queue a new link to `peer` sends from: the one opened early, if any, else a new one.
    fn queue_for(&self, peer: NodeId) -> mpsc::Receiver<Item> {
        let mut links = self.links.lock();
        if let Some((rx, _)) = self.early.lock().remove(&peer) {
            return rx;
        }
        let (tx, rx) = mpsc::channel(PEER_QUEUE);
        links.insert(peer, tx);
        self.down_since
            .lock()
            .insert(peer, std::time::Instant::now());
        rx
    }

    /// Drops the queues opened early for nodes still not in `members` after
    /// [`EARLY_LINK_GRACE`], counting what they held.
    fn drop_stale_early(&self, members: &HashMap<NodeId, String>, now: std::time::Instant) {
        let mut links = self.links.lock();
        let mut early = self.early.lock();
        let stale: Vec<NodeId> = early
            .iter()
            .filter(|(id, (_, at))| {
                !members.contains_key(id) && now.saturating_duration_since(*at) > EARLY_LINK_GRACE
            })
            .map(|(id, _)| *id)
            .collect();
        for node in stale {
            links.remove(&node);
            self.down_since.lock().remove(&node);
            if let Some((mut rx, _)) = early.remove(&node) {
                let mut dropped = 0u64;
                while rx.try_recv().is_ok() {
                    dropped += 1;
                }
                counter!(FORWARD_DROPPED_TOTAL, "peer" => node.to_string(), "reason" => "no_link")
                    .increment(dropped);
            }
        }
    }

    /// How long the stream to `peer` has been down, if it is (the liveness signal used to
    /// declare a node down).
    pub fn down_for(&self, peer: NodeId) -> Option<Duration> {
        self.down_since.lock().get(&peer).map(|t| t.elapsed())
    }

    fn mark(&self, peer: NodeId, up: bool) {
        let mut down = self.down_since.lock();
        if up {
            down.remove(&peer);
            self.refused_since.lock().remove(&peer);
        } else {
            down.entry(peer).or_insert_with(std::time::Instant::now);
        }
    }

    /// How long every attempt to reach `peer` has been refused outright (connection refused:
    /// no process listens on its cluster port), if they are.
    pub fn refused_for(&self, peer: NodeId) -> Option<Duration> {
        self.refused_since.lock().get(&peer).map(|t| t.elapsed())
    }

    /// Records the outcome of a failed attempt to open the stream to `peer`.
    fn attempt_failed(&self, peer: NodeId, refused: bool) {
        let mut since = self.refused_since.lock();
        if refused {
            since.entry(peer).or_insert_with(std::time::Instant::now);
        } else {
            since.remove(&peer);
        }
    }

    /// Whether fault injection cuts this node off from `peer` now.
    fn cut_off(&self, peer: NodeId) -> bool {
        self.faults
            .as_ref()
            .is_some_and(|f| f.fault(self.node_id, peer) == Fault::Drop)
    }

    fn frame(&self, body: pb::frame::Body) -> pb::Frame {
        pb::Frame {
            from_node: self.node_id,
            incarnation: self.incarnation,
            body: Some(body),
        }
    }
}

/// A number that differs between runs of this process (sequence numbers restart with it).
fn incarnation() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ u64::from(std::process::id()).rotate_left(32)
}

/// The stream to one peer, reconnected until the peer leaves the membership.
async fn link(
    hub: Arc<ForwardHub>,
    peer: NodeId,
    addr: String,
    mut rx: mpsc::Receiver<Item>,
    broker: Arc<Broker>,
) {
    let mut unacked: VecDeque<Unacked> = VecDeque::new();
    // What was still queued when a stream broke: sent first on the next one (never dropped
    // for a reconnect; bounded by the queue it came from).
    let mut carried: VecDeque<Item> = VecDeque::new();
    let mut seq = 0u64;
    let mut backoff = Duration::from_millis(100);
    let mut first = true;
    loop {
        if !first {
            counter!(FORWARD_RECONNECTS_TOTAL, "peer" => peer.to_string()).increment(1);
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
        first = false;
        if hub.cut_off(peer) {
            hub.attempt_failed(peer, false);
            continue;
        }
        let Ok(ch) = channel(&addr, hub.tls.as_ref()) else {
            continue;
        };
        let mut client = ForwardServiceClient::new(ch)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (out, frames) = mpsc::channel::<pb::Frame>(64);
        // Routes first, then the wills of this node's sessionless connections, in full.
        let (mut generation, routes) = broker.local_routes();
        let mut announced: HashSet<Arc<str>> = routes.iter().cloned().collect();
        let full = pb::frame::Body::Routes(pb::Routes {
            full: true,
            added: routes.iter().map(|r| r.to_string()).collect(),
            removed: Vec::new(),
        });
        if out.send(hub.frame(full)).await.is_err() {
            continue;
        }
        let (mut wills_generation, wills) = broker.local_wills();
        let mut wills_announced: HashSet<ByteStr> =
            wills.iter().map(|(id, _)| id.clone()).collect();
        let full = pb::frame::Body::Wills(pb::Wills {
            full: true,
            registered: wills
                .iter()
                .map(|(id, will)| registered_will(id, will, &hub.clock))
                .collect(),
            released: Vec::new(),
            ended_settled: broker.predecessor_settled(),
        });
        if out.send(hub.frame(full)).await.is_err() {
            continue;
        }
        // Then the wills of the peer's previous process, if it restarted (it publishes them).
        let mut ended_generation = broker.ended_wills_generation();
        if let Some(body) = ended_wills(&broker, peer, &hub.clock)
            && out.send(hub.frame(body)).await.is_err()
        {
            continue;
        }
        let frames = futures_util::stream::unfold(frames, |mut rx| async move {
            rx.recv().await.map(|f| (f, rx))
        });
        let mut acks = match client.stream(frames).await {
            Ok(resp) => resp.into_inner(),
            Err(status) => {
                debug!(peer, %status, "forwarding stream refused");
                hub.attempt_failed(peer, connection_refused(&status));
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        // Then, on the open stream (more frames than its buffer may wait), whatever the peer
        // has not acknowledged yet, and what the last stream left queued.
        let resent_at = tokio::time::Instant::now();
        for u in unacked.iter_mut() {
            u.sent_at = resent_at;
        }
        let resend: Vec<pb::Forwarded> = unacked.iter().map(|u| u.frame.clone()).collect();
        let mut broken = false;
        for chunk in resend.chunks(MAX_BATCH) {
            let body = pb::frame::Body::Deliveries(pb::Deliveries {
                messages: chunk.to_vec(),
            });
            if out.send(hub.frame(body)).await.is_err() {
                broken = true;
                break;
            }
        }
        while !broken && !carried.is_empty() {
            let batch: Vec<Item> = carried.drain(..carried.len().min(MAX_BATCH)).collect();
            broken = send_batch(&hub, peer, &out, batch, &mut seq, &mut unacked)
                .await
                .is_err();
        }
        // A stream that broke while the backlog went out goes straight to the reconnect.
        if !broken {
            hub.mark(peer, true);
            let mut tick = tokio::time::interval(ROUTE_CHECK);
            loop {
                tokio::select! {
                    next = rx.recv() => {
                        let Some(first) = next else { return };
                        let mut batch = vec![first];
                        while batch.len() < MAX_BATCH {
                            match rx.try_recv() {
                                Ok(o) => batch.push(o),
                                Err(_) => break,
                            }
                        }
                        if send_batch(&hub, peer, &out, batch, &mut seq, &mut unacked).await.is_err() {
                            break;
                        }
                    }
                    ack = acks.message() => match ack {
                        Ok(Some(ack)) => {
                            while unacked.front().is_some_and(|u| u.frame.seq <= ack.up_to_seq) {
                                if let Some(u) = unacked.pop_front()
                                    && let Some(handle) = u.ack
                                {
                                    handle.complete(Ok(()));
                                }
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    _ = tick.tick() => {
                        if hub.cut_off(peer) {
                            break;
                        }
                        if unacked.front().is_some_and(|u| u.sent_at.elapsed() > FORWARD_ACK_TIMEOUT) {
                            info!(peer, "no acknowledgement from peer for {FORWARD_ACK_TIMEOUT:?}; closing the stream");
                            counter!(FORWARD_ACK_TIMEOUTS_TOTAL, "peer" => peer.to_string()).increment(1);
                            break;
                        }
                        if broker.ended_wills_generation() != ended_generation {
                            ended_generation = broker.ended_wills_generation();
                            if let Some(body) = ended_wills(&broker, peer, &hub.clock)
                                && out.send(hub.frame(body)).await.is_err()
                            {
                                break;
                            }
                        }
                        if broker.wills_generation() != wills_generation {
                            let (g, wills) = broker.local_wills();
                            wills_generation = g;
                            let now: HashSet<ByteStr> = wills.iter().map(|(id, _)| id.clone()).collect();
                            let registered = wills
                                .iter()
                                .filter(|(id, _)| !wills_announced.contains(id))
                                .map(|(id, will)| registered_will(id, will, &hub.clock))
                                .collect();
                            let released = wills_announced
                                .difference(&now)
                                .map(|id| id.to_string())
                                .collect();
                            wills_announced = now;
                            let body = pb::frame::Body::Wills(pb::Wills {
                                full: false,
                                registered,
                                released,
                                ended_settled: broker.predecessor_settled(),
                            });
                            if out.send(hub.frame(body)).await.is_err() {
                                break;
                            }
                        }
                        if broker.route_generation() == generation {
                            continue;
                        }
                        let (g, routes) = broker.local_routes();
                        generation = g;
                        let now: HashSet<Arc<str>> = routes.into_iter().collect();
                        let added = now.difference(&announced).map(|r| r.to_string()).collect();
                        let removed = announced.difference(&now).map(|r| r.to_string()).collect();
                        announced = now;
                        let body = pb::frame::Body::Routes(pb::Routes { full: false, added, removed });
                        if out.send(hub.frame(body)).await.is_err() {
                            break;
                        }
                    }
                }
            }
        }
        hub.mark(peer, false);
        // Publishers do not wait on a broken link: what was sent is resent after a reconnect,
        // and what was still queued is carried over to the next stream (sent after the
        // resends), so a reconnect loses nothing this node acknowledged.
        for u in &mut unacked {
            if let Some(ack) = u.ack.take() {
                ack.complete(Ok(()));
            }
        }
        carry_over(&mut rx, &mut carried);
        debug!(
            peer,
            carried = carried.len(),
            "forwarding stream closed; reconnecting"
        );
    }
}

/// Moves what is still queued in `rx` (a stream just broke) to the end of `carried`, in order,
/// completing the publishers' acknowledgements (they do not wait on a broken link).
fn carry_over(rx: &mut mpsc::Receiver<Item>, carried: &mut VecDeque<Item>) {
    while let Ok(mut item) = rx.try_recv() {
        if let Item::Message(o) = &mut item
            && let Some(ack) = o.ack.take()
        {
            ack.complete(Ok(()));
        }
        carried.push_back(item);
    }
}

/// Sends one batch of queued items to `peer` on the stream `out`: its messages as one
/// `Deliveries` frame (numbered from `seq`, kept in `unacked` for a resend), its claims as one
/// `Claims` frame. `Err` if the stream is gone.
async fn send_batch(
    hub: &ForwardHub,
    peer: NodeId,
    out: &mpsc::Sender<pb::Frame>,
    batch: Vec<Item>,
    seq: &mut u64,
    unacked: &mut VecDeque<Unacked>,
) -> Result<(), ()> {
    let mut messages = Vec::with_capacity(batch.len());
    let mut claims = Vec::new();
    for item in batch {
        let o = match item {
            Item::Message(o) => o,
            Item::Claim(c) => {
                claims.push(c);
                continue;
            }
        };
        *seq += 1;
        let after = after_positions(o.after).await;
        let frame = pb::Forwarded {
            seq: *seq,
            message: Some(message_to_proto(&o.message, &hub.clock)),
            plain: o.plain,
            shared: o.shared.iter().map(|s| s.to_string()).collect(),
            stored_id: o.stored.map_or(0, |id| id.0),
            // Shard 1's index for receivers of before shards; every shard's in `after`.
            after_index: after
                .iter()
                .find(|(shard, _)| *shard == crate::types::DATA_SHARD.get())
                .map_or(0, |(_, index)| *index),
            after: after
                .iter()
                .map(|&(shard, index)| pb::ShardIndex { shard, index })
                .collect(),
        };
        messages.push(frame.clone());
        unacked.push_back(Unacked {
            frame,
            ack: o.ack,
            sent_at: tokio::time::Instant::now(),
        });
    }
    counter!(FORWARDED_TOTAL, "peer" => peer.to_string()).increment(messages.len() as u64);
    while unacked.len() > MAX_UNACKED {
        // Sent, but no longer resendable after a reconnect.
        if let Some(u) = unacked.pop_front()
            && let Some(ack) = u.ack
        {
            ack.complete(Ok(()));
        }
        counter!(FORWARD_RESEND_OVERFLOW_TOTAL, "peer" => peer.to_string()).increment(1);
    }
    if !messages.is_empty() {
        let body = pb::frame::Body::Deliveries(pb::Deliveries { messages });
        out.send(hub.frame(body)).await.map_err(|_| ())?;
    }
    if !claims.is_empty() {
        let body = pb::frame::Body::Claims(pb::Claims { claims });
        out.send(hub.frame(body)).await.map_err(|_| ())?;
    }
    Ok(())
}

/// Where the commit `after` (of the publisher's previous stored message) landed in the logs of
/// the shards it went to, waiting up to [`ORDER_WAIT`] for it to resolve; nothing if there is
/// nothing to wait for (no such message, it failed, or it took too long).
async fn after_positions(after: Option<Commit>) -> LogPositions {
    let Some(after) = after else {
        return LogPositions::new();
    };
    if after.result().is_none() {
        counter!(FORWARD_ORDER_WAITS_TOTAL).increment(1);
        if tokio::time::timeout(ORDER_WAIT, after.clone())
            .await
            .is_err()
        {
            counter!(FORWARD_ORDER_WAIT_TIMEOUTS_TOTAL).increment(1);
        }
    }
    after.log_positions().unwrap_or_default()
}

/// How far each shard's log is mirrored into this node's broker (`[i]`: shard `i + 1`).
pub type MirrorProgress = tokio::sync::watch::Receiver<Vec<u64>>;

/// Whether `mirrored` (per shard) has reached every position of `after`.
fn reached(mirrored: &[u64], after: &[(u32, u64)]) -> bool {
    after.iter().all(|&(shard, index)| {
        index == 0
            || usize::try_from(shard)
                .ok()
                .and_then(|s| s.checked_sub(1))
                .and_then(|s| mirrored.get(s))
                // A shard this node does not run cannot be waited for.
                .is_none_or(|m| *m >= index)
    })
}

/// The positions a received frame names: every shard's (`after`), or shard 1's index alone
/// (senders of before shards).
fn frame_after(f: &pb::Forwarded) -> LogPositions {
    if f.after.is_empty() {
        LogPositions::from_slice(&[(crate::types::DATA_SHARD.get(), f.after_index)])
    } else {
        f.after.iter().map(|p| (p.shard, p.index)).collect()
    }
}

/// Waits until this node has mirrored each shard's log up to its position in `after` (see
/// [`ForwardGrpc::set_mirror_progress`]), for at most [`ORDER_WAIT`].
async fn mirrored(progress: Option<&MirrorProgress>, after: &[(u32, u64)]) {
    let Some(progress) = progress else { return };
    if reached(&progress.borrow(), after) {
        return;
    }
    counter!(FORWARD_ORDER_WAITS_TOTAL).increment(1);
    let mut progress = progress.clone();
    let reached = tokio::time::timeout(ORDER_WAIT, progress.wait_for(|m| reached(m, after))).await;
    if !matches!(reached, Ok(Ok(_))) {
        counter!(FORWARD_ORDER_WAIT_TIMEOUTS_TOTAL).increment(1);
    }
}

/// The receiving side, served on the cluster port. Refuses streams until the broker exists.
#[derive(Clone, Default)]
pub struct ForwardGrpc {
    inner: Arc<Receiver>,
}

#[derive(Default)]
struct Receiver {
    broker: OnceLock<Arc<Broker>>,
    clock: OnceLock<WallClock>,
    /// How far this node has mirrored the replicated log into its broker.
    progress: OnceLock<MirrorProgress>,
    /// Per sending node: its incarnation and the last sequence number handled.
    seen: Mutex<HashMap<NodeId, (u64, u64)>>,
}

impl std::fmt::Debug for ForwardGrpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ForwardGrpc").finish_non_exhaustive()
    }
}

impl ForwardGrpc {
    /// Starts accepting forwarded messages for `broker`.
    pub fn set_broker(&self, broker: Arc<Broker>) {
        let _ = self.inner.clock.set(WallClock::now());
        let _ = self.inner.broker.set(broker);
    }

    /// How far the applied-change feed has mirrored the log into the broker: a forwarded
    /// message with an `after_index` waits for it (see `pb::Forwarded::after_index`).
    pub fn set_mirror_progress(&self, progress: MirrorProgress) {
        let _ = self.inner.progress.set(progress);
    }

    /// The gRPC service.
    pub fn service(&self) -> ForwardServiceServer<ForwardGrpc> {
        ForwardServiceServer::new(self.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

type AckStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<pb::Ack, tonic::Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ForwardService for ForwardGrpc {
    type StreamStream = AckStream;

    async fn stream(
        &self,
        req: tonic::Request<tonic::Streaming<pb::Frame>>,
    ) -> Result<tonic::Response<AckStream>, tonic::Status> {
        let (Some(broker), Some(clock)) = (self.inner.broker.get(), self.inner.clock.get()) else {
            return Err(tonic::Status::unavailable("broker not started yet"));
        };
        let (broker, clock) = (broker.clone(), clock.clone());
        let inner = self.inner.clone();
        let mut frames = req.into_inner();
        let (tx, rx) = mpsc::channel::<Result<pb::Ack, tonic::Status>>(64);
        tokio::spawn(async move {
            while let Ok(Some(frame)) = frames.message().await {
                let from = frame.from_node;
                match frame.body {
                    Some(pb::frame::Body::Routes(r)) => broker.apply_peer_routes(
                        from,
                        r.full,
                        r.added.into_iter().map(Arc::from).collect(),
                        r.removed.into_iter().map(Arc::from).collect(),
                    ),
                    Some(pb::frame::Body::Deliveries(d)) => {
                        let mut last = {
                            let mut seen = inner.seen.lock();
                            let entry = seen.entry(from).or_insert((frame.incarnation, 0));
                            if entry.0 != frame.incarnation {
                                *entry = (frame.incarnation, 0);
                            }
                            entry.1
                        };
                        for f in d.messages {
                            if f.seq <= last {
                                counter!(FORWARD_DUPLICATES_TOTAL).increment(1);
                                continue;
                            }
                            last = f.seq;
                            let after = frame_after(&f);
                            let Some(message) = f.message else { continue };
                            let Ok(message) = message_from_proto(message, &clock) else {
                                continue;
                            };
                            counter!(FORWARD_RECEIVED_TOTAL).increment(1);
                            let shared: Vec<Arc<str>> =
                                f.shared.into_iter().map(Arc::from).collect();
                            let stored = (f.stored_id != 0).then_some(MessageId(f.stored_id));
                            mirrored(inner.progress.get(), &after).await;
                            broker.deliver_forwarded(Arc::new(message), f.plain, &shared, stored);
                        }
                        if let Some(entry) = inner.seen.lock().get_mut(&from)
                            && entry.0 == frame.incarnation
                        {
                            entry.1 = entry.1.max(last);
                        }
                        if tx.send(Ok(pb::Ack { up_to_seq: last })).await.is_err() {
                            return;
                        }
                    }
                    Some(pb::frame::Body::Wills(w)) => {
                        let registered = wills_from_proto(w.registered, &clock);
                        let released = w.released.into_iter().map(ByteStr::from).collect();
                        broker.apply_peer_wills(
                            from,
                            raftmq_core::broker::WillsAnnouncement {
                                incarnation: frame.incarnation,
                                full: w.full,
                                registered,
                                released,
                                ended_settled: w.ended_settled,
                            },
                            std::time::Instant::now(),
                        );
                        metrics::gauge!(FORWARD_PEER_WILLS, "peer" => from.to_string())
                            .set(broker.peer_will_count(from) as f64);
                    }
                    Some(pb::frame::Body::EndedWills(e)) => {
                        let wills = wills_from_proto(e.wills, &clock);
                        let published = broker.predecessor_wills(wills, std::time::Instant::now());
                        counter!(PREDECESSOR_WILLS_TOTAL).increment(published as u64);
                    }
                    Some(pb::frame::Body::Claims(c)) => {
                        let now = std::time::Instant::now();
                        for claim in c.claims {
                            let at = clock.to_instant(claim.at_unix_ms);
                            broker.claimed_elsewhere(&ByteStr::from(claim.client_id), at, now);
                        }
                    }
                    None => {}
                }
            }
        });
        let acks =
            futures_util::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|a| (a, rx)) },
            );
        Ok(tonic::Response::new(Box::pin(acks)))
    }
}

/// The `EndedWills` frame for `peer`, if its previous process left wills this node holds.
fn ended_wills(broker: &Broker, peer: NodeId, clock: &WallClock) -> Option<pb::frame::Body> {
    let (incarnation, wills) = broker.ended_wills_of(peer, std::time::Instant::now())?;
    Some(pb::frame::Body::EndedWills(pb::EndedWills {
        incarnation,
        wills: wills
            .iter()
            .map(|(id, will)| registered_will(id, will, clock))
            .collect(),
    }))
}

/// Wills as a peer announced them (those that do not decode are skipped).
fn wills_from_proto(
    wills: Vec<pb::RegisteredWill>,
    clock: &WallClock,
) -> Vec<(ByteStr, PendingWill)> {
    wills
        .into_iter()
        .filter_map(|r| {
            let will = will_from_proto(r.will?, clock).ok()?;
            Some((ByteStr::from(r.client_id), will))
        })
        .collect()
}

/// A will of a sessionless connection, as announced to peers.
fn registered_will(
    client_id: &ByteStr,
    will: &PendingWill,
    clock: &WallClock,
) -> pb::RegisteredWill {
    pb::RegisteredWill {
        client_id: client_id.to_string(),
        will: Some(will_to_proto(will, clock)),
    }
}

/// Whether a failed call never reached a process: the connection was refused (nothing listens
/// on the address), as opposed to a timeout, a reset or a refusal by the peer itself.
pub(crate) fn connection_refused(status: &tonic::Status) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::ConnectionRefused
        {
            return true;
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(qos: QoS) -> Arc<Message> {
        Arc::new(Message {
            topic: ByteStr::from("work/1"),
            payload: bytes::Bytes::from_static(b"m"),
            qos,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            received_at: std::time::Instant::now(),
            origin: None,
        })
    }

    fn queued(rx: &mut mpsc::Receiver<Item>) -> usize {
        let mut n = 0;
        while rx.try_recv().is_ok() {
            n += 1;
        }
        n
    }

    /// A peer can announce its routes before this node's membership check has linked to it
    /// (it joined, or this node started, a moment ago): a message for it then waits in a queue
    /// that the link, once started, sends from; it is not dropped.
    #[tokio::test]
    async fn a_message_for_a_peer_not_linked_yet_waits_for_the_link() {
        let hub = ForwardHub::new(1, None, None);
        let shared = vec![Arc::<str>::from("$share/g/work/#")];
        let commit = hub.forward(
            3,
            &message(QoS::AtLeastOnce),
            false,
            shared.clone(),
            None,
            None,
        );
        // The link counts as down until its stream opens: the publisher does not wait.
        assert!(
            commit.result().is_some(),
            "a publisher waits on a link not started"
        );
        assert!(hub.down_for(3).is_some());
        hub.forward(3, &message(QoS::AtMostOnce), true, Vec::new(), None, None);
        // The membership check starts the link on the queue opened early.
        let mut rx = hub.queue_for(3);
        hub.forward(3, &message(QoS::AtMostOnce), true, Vec::new(), None, None);
        assert_eq!(
            queued(&mut rx),
            3,
            "every message for the peer is in its link's queue"
        );
        assert!(hub.early.lock().is_empty());
        // A peer the check links to first gets a queue of its own, as before.
        let mut rx2 = hub.queue_for(2);
        hub.forward(2, &message(QoS::AtMostOnce), true, Vec::new(), None, None);
        assert_eq!(queued(&mut rx2), 1);
    }

    /// What is queued when a stream breaks is kept, in order (claims too), for the next
    /// stream, and the publishers waiting on it are acknowledged.
    #[tokio::test]
    async fn what_is_queued_when_a_stream_breaks_is_carried_over_in_order() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut commits = Vec::new();
        for n in 0..3u8 {
            let (commit, handle) = Commit::pending();
            commits.push(commit);
            let mut m = (*message(QoS::AtLeastOnce)).clone();
            m.payload = bytes::Bytes::from(vec![n]);
            let o = Outgoing {
                message: Arc::new(m),
                plain: true,
                shared: Vec::new(),
                stored: None,
                after: None,
                ack: Some(handle),
            };
            assert!(tx.try_send(Item::Message(o)).is_ok());
        }
        let claim = pb::Claim {
            client_id: "c".into(),
            at_unix_ms: 1,
        };
        assert!(tx.try_send(Item::Claim(claim)).is_ok());
        let mut carried = VecDeque::new();
        carry_over(&mut rx, &mut carried);
        assert!(commits.iter().all(|c| matches!(c.result(), Some(Ok(())))));
        let payloads: Vec<u8> = carried
            .iter()
            .filter_map(|i| match i {
                Item::Message(o) => Some(o.message.payload[0]),
                Item::Claim(_) => None,
            })
            .collect();
        assert_eq!(payloads, [0, 1, 2]);
        assert!(matches!(carried.back(), Some(Item::Claim(_))));
        assert!(rx.try_recv().is_err(), "left in the queue");
    }

    /// A queue opened early for a node that never shows up in the membership is dropped
    /// after [`EARLY_LINK_GRACE`], and only then; a member's is kept.
    #[tokio::test]
    async fn an_early_queue_for_a_node_that_never_joins_is_dropped_after_a_grace() {
        let hub = ForwardHub::new(1, None, None);
        hub.forward(9, &message(QoS::AtMostOnce), true, Vec::new(), None, None);
        hub.forward(3, &message(QoS::AtMostOnce), true, Vec::new(), None, None);
        let members: HashMap<NodeId, String> = [(2, String::new()), (3, String::new())].into();
        let now = std::time::Instant::now();
        hub.drop_stale_early(&members, now);
        assert_eq!(hub.early.lock().len(), 2, "dropped within the grace");
        hub.drop_stale_early(&members, now + EARLY_LINK_GRACE + Duration::from_secs(1));
        assert!(!hub.links.lock().contains_key(&9));
        assert!(hub.down_for(9).is_none());
        assert!(
            hub.links.lock().contains_key(&3),
            "a member's early queue was dropped"
        );
        assert_eq!(queued(&mut hub.queue_for(3)), 1);
    }

    /// The receiving side holds a forwarded message back until the log is mirrored up to its
    /// `after_index`, and no longer than [`ORDER_WAIT`].
    #[tokio::test(start_paused = true)]
    async fn a_forwarded_message_waits_until_the_log_is_mirrored_up_to_its_index() {
        let (progress, watching) = tokio::sync::watch::channel(vec![5u64, 3]);
        // Already mirrored, nothing to wait for, or no feed: at once.
        let start = tokio::time::Instant::now();
        mirrored(Some(&watching), &[(1, 5), (2, 3)]).await;
        mirrored(Some(&watching), &[(1, 0)]).await;
        mirrored(Some(&watching), &[]).await;
        mirrored(None, &[(1, 9)]).await;
        assert_eq!(start.elapsed(), Duration::ZERO);
        // Behind in one shard: until the feed gets there in that shard.
        let waiting = tokio::spawn({
            let watching = watching.clone();
            async move {
                mirrored(Some(&watching), &[(1, 7), (2, 4)]).await;
                tokio::time::Instant::now()
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        progress.send_replace(vec![7, 3]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "delivered before shard 2 was mirrored up to index 4"
        );
        progress.send_replace(vec![7, 4]);
        let done = waiting.await.expect("the waiting task");
        assert_eq!(done - start, Duration::from_millis(600));
        // A feed that never gets there: given up after ORDER_WAIT.
        let start = tokio::time::Instant::now();
        mirrored(Some(&watching), &[(2, 100)]).await;
        assert_eq!(start.elapsed(), ORDER_WAIT);
        // A frame of a sender from before shards names shard 1 alone.
        let old = pb::Forwarded {
            after_index: 9,
            ..Default::default()
        };
        assert_eq!(frame_after(&old).as_slice(), &[(1, 9)]);
    }

    /// The sending side names where the previous stored message committed, waiting for a
    /// pending commit at most [`ORDER_WAIT`]; a failed one names nothing.
    #[tokio::test(start_paused = true)]
    async fn a_forwarded_message_names_where_the_previous_stored_message_committed() {
        assert!(after_positions(None).await.is_empty());
        assert!(after_positions(Some(Commit::ready())).await.is_empty());
        let (pending, handle) = Commit::pending();
        let naming = tokio::spawn(after_positions(Some(pending)));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!naming.is_finished(), "named before the commit resolved");
        handle.complete_at(Ok(()), LogPositions::from_slice(&[(1, 42)]));
        assert_eq!(
            naming.await.expect("the naming task").as_slice(),
            &[(1, 42)]
        );
        // A commit split over shards names each shard's position.
        let (a, ha) = Commit::pending();
        let (b, hb) = Commit::pending();
        let both = Commit::all(vec![a, b]);
        ha.complete_at(Ok(()), LogPositions::from_slice(&[(3, 7)]));
        hb.complete_at(Ok(()), LogPositions::from_slice(&[(1, 40)]));
        assert_eq!(
            after_positions(Some(both)).await.as_slice(),
            &[(1, 40), (3, 7)]
        );
        let failed = Commit::failed(raftmq_core::durability::DurabilityError::Unavailable);
        assert!(after_positions(Some(failed)).await.is_empty());
        let (never, _handle) = Commit::pending();
        let start = tokio::time::Instant::now();
        assert!(after_positions(Some(never)).await.is_empty());
        assert_eq!(start.elapsed(), ORDER_WAIT);
    }
}
