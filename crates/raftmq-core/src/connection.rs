//! The per-connection protocol state machine (sans-IO).
//!
//! The server's connection task feeds it decoded packets ([`Connection::handle_packet`]),
//! decode errors, session wake-ups ([`Connection::pump`]) and the time; it drains packets to
//! send with [`Connection::poll_transmit`] and closes the socket once [`Connection::is_closed`]
//! and everything was written. No I/O and no clock here: `now` is always an argument.

use crate::auth::{Access, AuthDecision, ConnectInfo, PendingAuth, Principal};
use crate::broker::{Broker, DetachKind, NEVER_EXPIRES, TakenOver};
use crate::durability::{Commit, StateChange};
use crate::message::{Delivery, Message};
use crate::session::{ConnectionInfo, Outgoing, OutgoingEntry, PendingWill, Session, SubEntry};
use crate::stats::DropReason;
use crate::topic::TopicName;
use ahash::HashMap;
use raftmq_codec::{
    ByteStr, ConnAck, ConnAckProperties, Connect, DecodeError, Disconnect, Packet, PacketId,
    ProtocolVersion, PubResponse, Publish, PublishProperties, QoS, ReasonCode, ReasonProperties,
    SubAck, Subscribe, UnsubAck, Unsubscribe, encoded_len,
};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// How long a new connection may take to send CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Packets a client may send after CONNECT while its authentication is still being decided;
/// one more closes the connection.
pub const MAX_PACKETS_BEFORE_AUTH: usize = 256;

/// A CONNECT whose authentication is being decided outside the state machine.
struct AwaitingAuth {
    connect: Connect,
    client_id: ByteStr,
    assigned: Option<ByteStr>,
    /// Behind a mutex only so that `Connection` stays `Sync` (the future need not be).
    future: parking_lot::Mutex<Option<PendingAuth>>,
    /// Packets that arrived meanwhile, handled once the decision is in.
    held: VecDeque<Packet>,
}

/// Queues of packets up to this many slots are freed once empty: an idle connection keeps no
/// allocation for the CONNACK or PINGRESP it sent (a slot is a whole `Packet`, a few hundred
/// bytes), while a queue that grew under load is kept for the next burst.
const QUEUE_SLOTS_KEPT: usize = 8;

/// Frees `queue`'s allocation if it is empty and small (see [`QUEUE_SLOTS_KEPT`]).
fn release_if_small<T>(queue: &mut VecDeque<T>) {
    if queue.is_empty() && queue.capacity() > 0 && queue.capacity() <= QUEUE_SLOTS_KEPT {
        *queue = VecDeque::new();
    }
}

/// Frees a boxed queue that is empty and small, box and all (see [`release_if_small`]).
#[allow(clippy::box_collection)] // the boxed queues of `Connection`
fn release_boxed_if_small<T>(queue: &mut Option<Box<VecDeque<T>>>) {
    if queue
        .as_ref()
        .is_some_and(|q| q.is_empty() && q.capacity() <= QUEUE_SLOTS_KEPT)
    {
        *queue = None;
    }
}

/// Why the connection closed (for logs and metrics).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// The peer closed the network connection.
    TransportClosed,
    /// CONNECT was refused with this code.
    ConnectRefused(ReasonCode),
    /// A protocol violation or malformed packet, with the reason code.
    ProtocolViolation(ReasonCode),
    /// No packet within 1.5 × keep alive (or no CONNECT in time).
    KeepAliveTimeout,
    /// Another connection took over the session.
    TakenOver,
    /// The server is shutting down or draining.
    ServerShutdown,
    /// Durable storage could not commit (no quorum): the client should retry later.
    StorageUnavailable,
    /// Disconnected by an administrator (the admin API's kick).
    Kicked,
}

struct Attachment {
    session: Arc<Session>,
    epoch: u64,
    client_id: ByteStr,
    principal: Principal,
}

/// Server→client topic aliases: topics get aliases 1..=max in first-use order, never evicted.
#[derive(Default)]
struct OutboundAliases {
    max: u16,
    /// Allocated at the first alias.
    by_topic: Option<Box<HashMap<ByteStr, u16>>>,
}

impl OutboundAliases {
    /// `(alias, already_known_by_client)` for `topic`, or `None` when aliases are off or full.
    /// A new alias is only recorded by [`Self::commit`], once the packet introducing it is sent.
    fn alias_for(&self, topic: &ByteStr) -> Option<(u16, bool)> {
        if self.max == 0 {
            return None;
        }
        let known = self.by_topic.as_deref();
        if let Some(a) = known.and_then(|m| m.get(topic)) {
            return Some((*a, true));
        }
        let next = u16::try_from(known.map_or(0, |m| m.len()) + 1)
            .ok()
            .filter(|n| *n <= self.max)?;
        Some((next, false))
    }

    /// Records that the client learnt `alias` for `topic` (a PUBLISH carrying both was sent).
    fn commit(&mut self, topic: &ByteStr, alias: u16) {
        self.by_topic
            .get_or_insert_default()
            .entry(topic.clone())
            .or_insert(alias);
    }
}

/// One client connection's protocol state.
pub struct Connection {
    broker: Arc<Broker>,
    peer: Option<SocketAddr>,
    version: ProtocolVersion,
    attachment: Option<Attachment>,
    /// The CONNACK waiting in `pending` must first load the session from the replicated state
    /// ([`Broker::finish_attach`]).
    load_after_connack: bool,
    out: VecDeque<Packet>,
    /// Packets waiting for a durable commit, in order; once anything waits, everything after it
    /// waits too, so the client sees acknowledgements and deliveries in protocol order. Boxed,
    /// like the other rarely used parts: every idle connection carries this struct.
    #[allow(clippy::box_collection)] // 8 bytes instead of 32 in every idle connection
    pending: Option<Box<VecDeque<Pending>>>,
    /// In-flight messages of a resumed session not yet resent because the client's Receive
    /// Maximum is smaller than their number; resent in order as acknowledgements free the window.
    #[allow(clippy::box_collection)] // 8 bytes instead of 32 in every idle connection
    resend_backlog: Option<Box<VecDeque<u16>>>,
    closed: Option<CloseReason>,
    created_at: Instant,
    last_received: Instant,
    /// Keep alive in seconds (0: none), as granted in CONNACK.
    keep_alive: u16,
    /// Client's Receive Maximum: QoS 1/2 PUBLISH we may have unacknowledged.
    client_receive_max: u16,
    /// Client's Maximum Packet Size.
    client_max_packet: u32,
    request_problem_info: bool,
    /// Session Expiry Interval from CONNECT (DISCONNECT may not raise it from 0).
    connect_expiry: u32,
    /// Client→server topic aliases, allocated at the first one.
    inbound_aliases: Option<Box<HashMap<u16, ByteStr>>>,
    outbound_aliases: OutboundAliases,
    /// Identity from a verified client certificate.
    cert_identity: Option<Box<str>>,
    /// Set when the server refuses this connection (a connection limit): CONNECT is answered
    /// with this reason code.
    refusal: Option<ReasonCode>,
    /// A CONNECT waiting for an asynchronous authentication decision (boxed: rare, and large
    /// next to the rest of an idle connection's state).
    awaiting_auth: Option<Box<AwaitingAuth>>,
    /// Per-client publish rate and bandwidth limits, if configured (boxed, like the alias maps:
    /// most connections never need them, and every idle connection carries this struct).
    limits: Option<Box<crate::limits::PublishLimits>>,
    /// Set while this client is not read from because a subscriber it publishes to has its
    /// queue past the pause mark (backpressure; boxed: rare).
    paused: Option<Box<Pause>>,
}

/// Backpressure on a publishing client: the congested session it waits for, the congestion
/// episode that paused it, and until when.
#[derive(Debug)]
struct Pause {
    session: Arc<Session>,
    episode: u64,
    until: Instant,
}

impl Connection {
    /// A new connection from `peer`, accepted at `now`.
    pub fn new(broker: Arc<Broker>, peer: Option<SocketAddr>, now: Instant) -> Self {
        let cfg = broker.config();
        let limits = (cfg.max_publish_rate > 0 || cfg.max_publish_bandwidth.0 > 0)
            .then(|| Box::new(crate::limits::PublishLimits::new(cfg, now)));
        Connection {
            broker,
            peer,
            version: ProtocolVersion::V3_1_1,
            attachment: None,
            load_after_connack: false,
            out: VecDeque::new(),
            pending: None,
            resend_backlog: None,
            closed: None,
            created_at: now,
            last_received: now,
            keep_alive: 0,
            client_receive_max: u16::MAX,
            client_max_packet: u32::MAX,
            request_problem_info: true,
            connect_expiry: 0,
            inbound_aliases: None,
            outbound_aliases: OutboundAliases::default(),
            cert_identity: None,
            refusal: None,
            awaiting_auth: None,
            limits,
            paused: None,
        }
    }

    /// Makes the coming CONNECT be refused with `code` (the server is over a connection limit
    /// or overloaded): CONNACK `code` to MQTT 5 clients, its 3.x return code to others.
    pub fn refuse(&mut self, code: ReasonCode) {
        self.refusal = Some(code);
    }

    /// The authentication decision the caller must await (once; see
    /// [`crate::auth::AuthDecision::Pending`]), then report with [`Self::handle_auth_result`].
    pub fn take_pending_auth(&mut self) -> Option<PendingAuth> {
        self.awaiting_auth
            .as_mut()
            .and_then(|a| a.future.get_mut().take())
    }

    /// Whether CONNECT waits for an authentication decision.
    pub fn is_awaiting_auth(&self) -> bool {
        self.awaiting_auth.is_some()
    }

    /// The asynchronous authentication decision for the pending CONNECT: continues it (and
    /// handles the packets that arrived meanwhile) or refuses it.
    pub fn handle_auth_result(
        &mut self,
        result: Result<Principal, raftmq_codec::ReasonCode>,
        now: Instant,
    ) {
        let Some(awaiting) = self.awaiting_auth.take().map(|a| *a) else {
            return;
        };
        if self.closed.is_some() {
            return;
        }
        match result {
            Err(code) => self.refuse_auth(code, now),
            Ok(principal) => {
                self.finish_connect(
                    awaiting.connect,
                    awaiting.client_id,
                    awaiting.assigned,
                    principal,
                    now,
                );
                for packet in awaiting.held {
                    if self.closed.is_some() {
                        break;
                    }
                    self.handle_packet(packet, now);
                }
            }
        }
    }

    fn refuse_auth(&mut self, code: ReasonCode, now: Instant) {
        self.broker.stats().auth_failed(code);
        self.refuse_connect(code, now);
    }

    /// Sets the identity taken from a verified client certificate (before CONNECT).
    pub fn set_cert_identity(&mut self, identity: Option<String>) {
        self.cert_identity = identity.map(String::into_boxed_str);
    }

    /// The negotiated protocol version (3.1.1 until CONNECT arrives).
    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// The maximum packet size this connection accepts from the client.
    pub fn max_incoming_packet_size(&self) -> u32 {
        u32::try_from(self.broker.config().max_packet_size.0).unwrap_or(u32::MAX)
    }

    /// The client's address, when the transport knows it.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.peer
    }

    /// The client identifier, once CONNECT is accepted.
    pub fn client_id(&self) -> Option<&ByteStr> {
        self.attachment.as_ref().map(|a| &a.client_id)
    }

    /// The attached session (to await its notifications).
    pub fn session(&self) -> Option<&Arc<Session>> {
        self.attachment.as_ref().map(|a| &a.session)
    }

    /// Ready when the attached session has news for this connection: deliveries queued, or the
    /// session taken over (then [`Self::pump`] closes the connection). Pending before CONNECT.
    pub fn poll_session(&self, cx: &mut Context<'_>) -> Poll<()> {
        // Before CONNACK, [`Self::pump`] does nothing, and a fenced-off session is always
        // ready: waiting on it would spin. The CONNACK's commit comes first either way (then a
        // takeover meanwhile is noticed).
        if matches!(self.pending_front(), Some(p) if matches!(p.packet, Packet::ConnAck(_))) {
            return Poll::Pending;
        }
        match &self.attachment {
            Some(att) => att.session.poll_notified(att.epoch, cx),
            None => Poll::Pending,
        }
    }

    /// True while the client must not be read from: a subscriber it published to has its
    /// queue past the pause mark (`mqtt.backpressure_max_pause`). Everything else (deliveries
    /// to this client, timers, commits) goes on; reading resumes once [`Self::poll_room`] is
    /// ready (then call [`Self::handle_room`]) or the pause runs out ([`Self::handle_timeout`]).
    pub fn reading_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// Ready when the session this connection's reading waits for has room again (or went
    /// offline, or counts as stalled), and as soon as this client has messages in flight
    /// itself (their acknowledgements must be read: a client waiting for a queue that its own
    /// unread acknowledgements keep full, directly or through other clients, would wait for
    /// nothing). Ready at once when reading is not paused. A new delivery to this client wakes
    /// the connection through [`Self::poll_session`], and this is asked again.
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(p) = &self.paused else {
            return Poll::Ready(());
        };
        if self
            .attachment
            .as_ref()
            .is_some_and(|a| a.session.awaits_acknowledgements())
        {
            return Poll::Ready(());
        }
        p.session
            .poll_room(self.broker.queue_limits(), p.episode, cx)
    }

    /// [`Self::poll_room`] was ready: reading resumes.
    pub fn handle_room(&mut self) {
        self.paused = None;
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.closed
    }

    /// True once the connection must be closed (after sending what [`Self::poll_transmit`] yields).
    pub fn is_closed(&self) -> bool {
        self.closed.is_some()
    }

    /// The next packet to send.
    pub fn poll_transmit(&mut self) -> Option<Packet> {
        let packet = self.out.pop_front();
        if packet.is_none() {
            release_if_small(&mut self.out);
        }
        packet
    }

    /// The commit that the oldest held-back packet waits for; the caller awaits it and then
    /// calls [`Self::handle_commits`].
    pub fn pending_commit(&self) -> Option<Commit> {
        self.pending_front().map(|p| p.commit.clone())
    }

    /// The first packet waiting for a commit.
    fn pending_front(&self) -> Option<&Pending> {
        self.pending.as_deref().and_then(VecDeque::front)
    }

    /// Releases held-back packets whose commits completed. A failed commit (storage
    /// unavailable, no quorum) closes the connection without the acknowledgement: v5 clients
    /// get CONNACK 0x88 or DISCONNECT 0x89 and retry later, nothing is acknowledged that is not
    /// durable.
    pub fn handle_commits(&mut self, now: Instant) {
        while let Some(head) = self.pending_front() {
            match head.commit.result() {
                None => return,
                Some(Ok(())) => {
                    if let Some(mut p) = self.pending.as_mut().and_then(|q| q.pop_front()) {
                        let resumed = self.finish_attach(&mut p.packet);
                        self.out.push_back(p.packet);
                        if resumed {
                            self.resend_inflight(now);
                        }
                    }
                    release_boxed_if_small(&mut self.pending);
                }
                Some(Err(_)) => {
                    // Refused: the held-back deliveries are dropped with the acknowledgement.
                    let connack = matches!(head.packet, Packet::ConnAck(_));
                    self.pending = None;
                    if connack {
                        if std::mem::take(&mut self.load_after_connack)
                            && let Some(att) = self.attachment.take()
                        {
                            // A session made up for this attachment: nothing to record.
                            self.broker.abandon_attach(&att.session, att.epoch);
                        }
                        self.detach(DetachKind::Normal, now);
                        // MQTT 5: send the client to a node that may commit (0x9C Use another
                        // server, with a Server Reference), else 0x88 Server unavailable.
                        let reference = self
                            .version
                            .is_v5()
                            .then(|| self.broker.redirect())
                            .flatten();
                        return match reference {
                            Some(reference) => {
                                self.out.push_back(Packet::ConnAck(ConnAck {
                                    session_present: false,
                                    reason_code: ReasonCode::USE_ANOTHER_SERVER,
                                    properties: ConnAckProperties {
                                        server_reference: Some(reference),
                                        ..ConnAckProperties::default()
                                    },
                                }));
                                self.closed = Some(CloseReason::ConnectRefused(
                                    ReasonCode::USE_ANOTHER_SERVER,
                                ));
                            }
                            None => self.refuse_connect(ReasonCode::SERVER_UNAVAILABLE, now),
                        };
                    }
                    if self.attachment.is_some()
                        && self.version.is_v5()
                        && let Some(reference) = self.broker.redirect()
                    {
                        let mut disconnect = Disconnect::with_code(ReasonCode::USE_ANOTHER_SERVER);
                        disconnect.properties.server_reference = Some(reference);
                        self.out.push_back(Packet::Disconnect(disconnect));
                        self.closed = Some(CloseReason::StorageUnavailable);
                        return self.detach(DetachKind::Abnormal, now);
                    }
                    return self.close(
                        CloseReason::StorageUnavailable,
                        Some(ReasonCode::SERVER_BUSY),
                        now,
                    );
                }
            }
        }
    }

    /// For the CONNACK of a session that was not in memory: now that the claim committed,
    /// loads the session from the replicated state and reports it present if found.
    fn finish_attach(&mut self, packet: &mut Packet) -> bool {
        let Packet::ConnAck(connack) = packet else {
            return false;
        };
        if !std::mem::take(&mut self.load_after_connack) {
            return false;
        }
        let Some(att) = &self.attachment else {
            return false;
        };
        let resumed = self.broker.finish_attach(&att.session, att.epoch);
        connack.session_present = resumed;
        resumed
    }

    /// Sends `packet` once `commit` (if any) and everything queued before it have completed.
    fn emit(&mut self, packet: Packet, commit: Option<Commit>) {
        let commit = commit.filter(|c| c.result() != Some(Ok(())));
        match commit {
            None if self.pending_front().is_none() => self.out.push_back(packet),
            commit => self.pending.get_or_insert_default().push_back(Pending {
                commit: commit.unwrap_or_else(Commit::ready),
                packet,
            }),
        }
    }

    /// Packets waiting to be sent.
    pub fn pending_transmit(&self) -> usize {
        self.out.len()
    }

    /// When [`Self::handle_timeout`] must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed.is_some() {
            return None;
        }
        let keep_alive = match (&self.attachment, self.keep_alive) {
            (None, _) => Some(self.created_at + CONNECT_TIMEOUT),
            (Some(_), 0) => None,
            (Some(_), secs) => {
                let ka = Duration::from_secs(secs.into());
                Some(self.last_received + ka + ka / 2)
            }
        };
        let pause = self.paused.as_ref().map(|p| p.until);
        pause.into_iter().chain(keep_alive).min()
    }

    /// Ends a pause that ran out (the subscriber it waited for counts as stalled from now on);
    /// closes the connection if the client missed its keep alive (or never sent CONNECT).
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(p) = self.paused.take_if(|p| now >= p.until)
            && p.session.give_up(p.episode)
        {
            self.broker
                .stats()
                .backpressure_timeouts
                .fetch_add(1, Relaxed);
        }
        if let Some(deadline) = self.poll_timeout()
            && now >= deadline
        {
            self.close(
                CloseReason::KeepAliveTimeout,
                Some(ReasonCode::KEEP_ALIVE_TIMEOUT),
                now,
            );
        }
    }

    /// The network connection ended (EOF or error).
    pub fn handle_transport_closed(&mut self, now: Instant) {
        if self.closed.is_none() {
            self.out.clear();
            self.closed = Some(CloseReason::TransportClosed);
            self.detach(DetachKind::Abnormal, now);
        }
    }

    /// The server is draining (handing its clients to other nodes): a v5 client is told
    /// DISCONNECT 0x9C Use another server with `server_reference` when one is given, else 0x8B
    /// Server shutting down; a 3.x client is just closed. Acknowledgements still held back for a
    /// commit are dropped (the caller waits for pending commits first, within its deadline).
    pub fn handle_drain(&mut self, server_reference: Option<ByteStr>, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if self.attachment.is_some() && self.version.is_v5() {
            let code = if server_reference.is_some() {
                ReasonCode::USE_ANOTHER_SERVER
            } else {
                ReasonCode::SERVER_SHUTTING_DOWN
            };
            let mut disconnect = Disconnect::with_code(code);
            disconnect.properties.server_reference = server_reference;
            self.out.push_back(Packet::Disconnect(disconnect));
        }
        self.closed = Some(CloseReason::ServerShutdown);
        self.detach(DetachKind::Abnormal, now);
    }

    /// The server is shutting down: tell v5 clients why, and close.
    pub fn handle_shutdown(&mut self, code: ReasonCode, now: Instant) {
        self.close(CloseReason::ServerShutdown, Some(code), now);
    }

    /// The decoder rejected the client's bytes.
    pub fn handle_decode_error(&mut self, err: &DecodeError, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if self.attachment.is_none() {
            if let DecodeError::UnsupportedProtocolVersion(level) = err {
                // MQTT 3.1.1 §3.1.2.2 / MQTT 5 §3.1.2.2: answer in the format the client expects.
                let version = if *level >= 5 {
                    ProtocolVersion::V5
                } else {
                    ProtocolVersion::V3_1_1
                };
                self.version = version;
                self.refuse_connect(ReasonCode::UNSUPPORTED_PROTOCOL_VERSION, now);
            } else {
                self.closed = Some(CloseReason::ProtocolViolation(err.reason_code()));
            }
            return;
        }
        self.close(
            CloseReason::ProtocolViolation(err.reason_code()),
            Some(err.reason_code()),
            now,
        );
    }

    /// Handles one packet from the client.
    pub fn handle_packet(&mut self, packet: Packet, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        self.last_received = now;
        if let Some(awaiting) = &mut self.awaiting_auth {
            if awaiting.held.len() >= MAX_PACKETS_BEFORE_AUTH {
                // No CONNACK yet, so nothing to tell the client: just close.
                self.awaiting_auth = None;
                self.closed = Some(CloseReason::ProtocolViolation(ReasonCode::QUOTA_EXCEEDED));
            } else {
                awaiting.held.push_back(packet);
            }
            return;
        }
        if self.attachment.is_none() {
            match packet {
                Packet::Connect(c) => match self.refusal {
                    Some(code) => {
                        self.version = c.protocol;
                        self.refuse_connect(code, now);
                    }
                    None => self.handle_connect(*c, now),
                },
                // The first packet must be CONNECT (§3.1): close without a reply.
                _ => self.closed = Some(CloseReason::ProtocolViolation(ReasonCode::PROTOCOL_ERROR)),
            }
            return;
        }
        let result = match packet {
            Packet::Publish(p) => self.handle_publish(p, now),
            Packet::PubAck(r) => self.handle_puback(r),
            Packet::PubRec(r) => self.handle_pubrec(r),
            Packet::PubRel(r) => self.handle_pubrel(r),
            Packet::PubComp(r) => self.handle_pubcomp(r),
            Packet::Subscribe(s) => self.handle_subscribe(s, now),
            Packet::Unsubscribe(u) => self.handle_unsubscribe(u),
            Packet::PingReq => {
                self.emit(Packet::PingResp, None);
                Ok(())
            }
            Packet::Disconnect(d) => {
                self.handle_disconnect(d, now);
                return;
            }
            // A second CONNECT, enhanced authentication (unsupported), or a server-only packet.
            Packet::Connect(_)
            | Packet::Auth(_)
            | Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp => Err(Violation::Code(ReasonCode::PROTOCOL_ERROR)),
        };
        match result {
            Ok(()) => {}
            Err(Violation::Code(code)) => {
                self.close(CloseReason::ProtocolViolation(code), Some(code), now)
            }
            Err(Violation::TakenOver) => self.taken_over(),
        }
    }

    fn handle_connect(&mut self, c: Connect, now: Instant) {
        self.version = c.protocol;
        let v5 = c.protocol.is_v5();
        let cfg = self.broker.config().clone();
        if c.properties.authentication_method.is_some() {
            return self.refuse_connect(ReasonCode::BAD_AUTHENTICATION_METHOD, now);
        }
        // Client identifier (§3.1.3.1).
        let mut assigned = None;
        let client_id = if c.client_id.is_empty() {
            let allowed = cfg.allow_empty_client_id
                && c.protocol != ProtocolVersion::V3_1
                && (v5 || c.clean_start);
            if !allowed {
                return self.refuse_connect(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, now);
            }
            let id = self.broker.assign_client_id();
            assigned = Some(id.clone());
            id
        } else {
            // Copied out of the read buffer: the id lives as long as the session and must not
            // keep the connection's whole read buffer allocated.
            ByteStr::from(c.client_id.as_str())
        };
        let info = ConnectInfo {
            client_id: &client_id,
            username: c.username.as_deref(),
            password: c.password.as_ref(),
            peer_addr: self.peer,
            cert_identity: self.cert_identity.as_deref(),
        };
        match self.broker.authenticator().authenticate(&info) {
            AuthDecision::Allow(principal) => {
                self.finish_connect(c, client_id, assigned, principal, now)
            }
            AuthDecision::Deny(code) => self.refuse_auth(code, now),
            AuthDecision::Pending(future) => {
                self.awaiting_auth = Some(Box::new(AwaitingAuth {
                    connect: c,
                    client_id,
                    assigned,
                    future: parking_lot::Mutex::new(Some(future)),
                    held: VecDeque::new(),
                }))
            }
        }
    }

    /// The part of CONNECT handling after authentication accepted the client.
    fn finish_connect(
        &mut self,
        c: Connect,
        client_id: ByteStr,
        assigned: Option<ByteStr>,
        principal: Principal,
        now: Instant,
    ) {
        let v5 = c.protocol.is_v5();
        let cfg = self.broker.config().clone();
        // Will (§3.1.2.5).
        let will = match &c.will {
            None => None,
            Some(w) => {
                if TopicName::new(&w.topic, self.broker.topic_limits()).is_err() {
                    return self.refuse_connect(ReasonCode::TOPIC_NAME_INVALID, now);
                }
                if w.qos.as_u8() > cfg.max_qos {
                    return self.refuse_connect(ReasonCode::QOS_NOT_SUPPORTED, now);
                }
                if w.retain && !cfg.retain_available {
                    return self.refuse_connect(ReasonCode::RETAIN_NOT_SUPPORTED, now);
                }
                let access = Access::Publish {
                    topic: &w.topic,
                    qos: w.qos,
                    retain: w.retain,
                };
                if !self.broker.authorize(&principal, access) {
                    return self.refuse_connect(ReasonCode::NOT_AUTHORIZED, now);
                }
                let p = &w.properties;
                let message = Message {
                    topic: w.topic.clone(),
                    payload: w.payload.clone(),
                    qos: w.qos,
                    retain: w.retain,
                    properties: PublishProperties {
                        payload_format_indicator: p.payload_format_indicator,
                        content_type: p.content_type.clone(),
                        response_topic: p.response_topic.clone(),
                        correlation_data: p.correlation_data.clone(),
                        user_properties: p.user_properties.clone(),
                        ..Default::default()
                    },
                    expires_at: None,
                    received_at: now,
                    origin: Some(client_id.clone()),
                };
                Some(PendingWill {
                    message: Arc::new(message),
                    delay_secs: p.will_delay_interval.unwrap_or(0),
                    message_expiry_secs: p.message_expiry_interval,
                })
            }
        };
        // Session expiry (§3.1.2.11): 3.x clean session 0 means "until cleaned".
        let requested_expiry = if v5 {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            NEVER_EXPIRES
        };
        let expiry = self.cap_session_expiry(requested_expiry);
        // Keep alive (§3.1.2.10): the server may impose its own via Server Keep Alive (v5).
        let max_ka = u16::try_from(cfg.max_keep_alive.0.as_secs()).unwrap_or(u16::MAX);
        let mut server_keep_alive = None;
        let keep_alive = if v5 && max_ka > 0 && (c.keep_alive == 0 || c.keep_alive > max_ka) {
            server_keep_alive = Some(max_ka);
            max_ka
        } else {
            c.keep_alive
        };
        self.keep_alive = keep_alive;
        self.client_receive_max = c.properties.receive_maximum.unwrap_or(u16::MAX);
        self.client_max_packet = c.properties.maximum_packet_size.unwrap_or(u32::MAX);
        self.request_problem_info = c.properties.request_problem_information.unwrap_or(true);
        self.outbound_aliases.max = if v5 {
            c.properties.topic_alias_maximum.unwrap_or(0)
        } else {
            0
        };
        self.connect_expiry = expiry;

        let attached = self
            .broker
            .attach(&client_id, c.clean_start, expiry, will, now);
        let mut props = ConnAckProperties::default();
        if v5 {
            props.assigned_client_identifier = assigned;
            props.receive_maximum = Some(cfg.receive_maximum);
            props.maximum_packet_size = u32::try_from(cfg.max_packet_size.0).ok();
            props.topic_alias_maximum = Some(cfg.topic_alias_maximum);
            props.server_keep_alive = server_keep_alive;
            if expiry != requested_expiry {
                props.session_expiry_interval = Some(expiry);
            }
            if cfg.max_qos < 2 {
                props.maximum_qos = QoS::from_u8(cfg.max_qos);
            }
            if !cfg.retain_available {
                props.retain_available = Some(false);
            }
            if !cfg.wildcard_subscriptions {
                props.wildcard_subscription_available = Some(false);
            }
            if !cfg.subscription_identifiers {
                props.subscription_identifiers_available = Some(false);
            }
            if !cfg.shared_subscriptions {
                props.shared_subscription_available = Some(false);
            }
        }
        self.emit(
            Packet::ConnAck(ConnAck {
                session_present: attached.session_present,
                reason_code: ReasonCode::SUCCESS,
                properties: props,
            }),
            Some(attached.commit),
        );
        self.load_after_connack = attached.load_after_commit;
        attached.session.set_connection_info(
            attached.epoch,
            ConnectionInfo {
                username: c.username.as_deref().map(str::to_owned),
                peer: self.peer,
                protocol_level: match c.protocol {
                    ProtocolVersion::V3_1 => 3,
                    ProtocolVersion::V3_1_1 => 4,
                    ProtocolVersion::V5 => 5,
                },
                clean_start: c.clean_start,
            },
        );
        self.attachment = Some(Attachment {
            session: attached.session,
            epoch: attached.epoch,
            client_id,
            principal,
        });
        if attached.session_present {
            self.resend_inflight(now);
        }
    }

    /// `secs` limited to the configured maximum session expiry.
    fn cap_session_expiry(&self, secs: u32) -> u32 {
        let cap = self.broker.config().max_session_expiry.0.as_secs();
        match u32::try_from(cap) {
            Ok(0) => secs,
            Ok(cap) => secs.min(cap),
            Err(_) => secs,
        }
    }

    fn refuse_connect(&mut self, code: ReasonCode, _now: Instant) {
        self.out.push_back(Packet::ConnAck(ConnAck {
            session_present: false,
            reason_code: code,
            properties: ConnAckProperties::default(),
        }));
        self.closed = Some(CloseReason::ConnectRefused(code));
    }

    /// Resends unacknowledged messages after a session is resumed (§4.4): PUBLISH with DUP,
    /// and PUBREL for those already released, in their original order.
    fn resend_inflight(&mut self, now: Instant) {
        let Some(att) = &self.attachment else { return };
        let session = att.session.clone();
        let mut entries: Vec<(u16, OutgoingEntry)> = {
            let Ok(st) = session.lock_attached(att.epoch) else {
                return;
            };
            st.outgoing.iter().map(|(id, e)| (*id, e.clone())).collect()
        };
        entries.sort_by_key(|(_, e)| e.seq);
        // Never more unacknowledged than the client's (possibly smaller) Receive Maximum.
        let window = self.window();
        for (i, (id, entry)) in entries.into_iter().enumerate() {
            if i < window {
                self.resend(id, entry.state, now);
            } else {
                self.resend_backlog.get_or_insert_default().push_back(id);
            }
        }
    }

    fn resend(&mut self, id: u16, state: Outgoing, now: Instant) {
        let Some(pid) = PacketId::new(id) else { return };
        match state {
            Outgoing::Publish(d) => {
                if !self.transmit_publish(&d, Some(pid), true, now) {
                    // The client's new Maximum Packet Size is smaller: drop it (§3.1.2.25).
                    self.broker.stats().dropped(DropReason::TooLarge, 1);
                    self.complete_outgoing(id);
                }
            }
            Outgoing::Released(_) => self.emit(Packet::PubRel(PubResponse::success(pid)), None),
        }
    }

    /// QoS 1/2 messages that may be unacknowledged towards the client at once.
    fn window(&self) -> usize {
        usize::from(
            self.client_receive_max
                .min(self.broker.config().max_inflight),
        )
    }

    /// Moves queued deliveries into the transmit queue, as far as the client's receive window
    /// allows, at most `budget` of them. Also notices a session takeover. Returns true when
    /// more deliveries are ready (budget exhausted).
    ///
    /// The caller pumps after every batch of input (packets change the window; a SUBSCRIBE
    /// queues retained messages) and whenever the session is notified.
    pub fn pump(&mut self, now: Instant, budget: usize) -> bool {
        if self.closed.is_some()
            || matches!(self.pending_front(), Some(p) if matches!(p.packet, Packet::ConnAck(_)))
        {
            // Nothing is delivered before CONNACK.
            return false;
        }
        let Some(att) = &self.attachment else {
            return false;
        };
        let session = att.session.clone();
        let epoch = att.epoch;
        let mut sent_records = Vec::new();
        let window = self.window();
        let broker = self.broker.clone();
        let stats = broker.stats();
        let mut moved = 0;
        let mut batch: Vec<(Delivery, Option<PacketId>)> = Vec::new();
        let mut resends = Vec::new();
        let relieved = {
            let Ok(mut st) = session.lock_attached(epoch) else {
                self.taken_over();
                return false;
            };
            if let Some(code) = st.kick.take() {
                drop(st);
                self.close(CloseReason::Kicked, Some(code), now);
                return false;
            }
            // Held-back resends go first, as the window allows.
            let backlog = self.resend_backlog.as_ref().map_or(0, |b| b.len());
            let mut on_wire = st.outgoing.len().saturating_sub(backlog);
            while on_wire < window {
                let Some(id) = self.resend_backlog.as_mut().and_then(|b| b.pop_front()) else {
                    // Empty (or never needed): the rare backlog's memory goes.
                    self.resend_backlog = None;
                    break;
                };
                if let Some(entry) = st.outgoing.get(&id) {
                    resends.push((id, entry.state.clone()));
                    on_wire += 1;
                }
            }
            while moved < budget {
                let Some(front) = st.queue.front() else { break };
                if front.message.is_expired(now) {
                    st.queue.pop_front();
                    stats.messages_queued.fetch_sub(1, Relaxed);
                    stats.dropped(DropReason::Expired, 1);
                    continue;
                }
                let pid = if front.qos == QoS::AtMostOnce {
                    None
                } else {
                    let inflight = st.outgoing.len();
                    if inflight >= window {
                        break;
                    }
                    match st.allocate_packet_id() {
                        Some(pid) => Some(pid),
                        None => break,
                    }
                };
                let Some(d) = st.queue.pop_front() else { break };
                stats.messages_queued.fetch_sub(1, Relaxed);
                if let Some(pid) = pid {
                    if let Some(id) = d.durable {
                        sent_records.push(StateChange::MessageSent {
                            client_id: session.client_id().clone(),
                            id,
                            packet_id: pid.get(),
                        });
                    }
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.outgoing.insert(
                        pid.get(),
                        OutgoingEntry {
                            seq,
                            state: Outgoing::Publish(d.clone()),
                        },
                    );
                    stats.messages_inflight.fetch_add(1, Relaxed);
                }
                batch.push((d, pid));
                moved += 1;
            }
            session.relieve(&mut st, broker.queue_limits().resume_at)
        };
        // Publishers paused for this queue read again.
        for w in relieved {
            w.wake();
        }
        for (id, state) in resends {
            self.resend(id, state, now);
        }
        let more = moved == budget && budget != usize::MAX;
        // Packet ids of durable deliveries are recorded so a resumed session resends them with
        // the same ids (§4.4). QoS 1 does not wait (a lost record only costs a duplicate, which
        // QoS 1 allows). A stored QoS 2 PUBLISH waits for its record: sent before it and the
        // node lost, the session elsewhere would send the message again under a new packet id,
        // which a receiver cannot recognise as a duplicate (exactly once).
        let sent = broker.propose(sent_records);
        let latency = (!batch.is_empty())
            .then(|| metrics::histogram!(crate::stats::DELIVERY_LATENCY_SECONDS));
        for (d, pid) in batch {
            let hold = (d.qos == QoS::ExactlyOnce && d.durable.is_some()).then(|| sent.clone());
            if self.transmit_publish_after(&d, pid, false, now, hold) {
                if let Some(h) = &latency {
                    h.record(
                        now.saturating_duration_since(d.message.received_at)
                            .as_secs_f64(),
                    );
                }
                stats.messages_sent[usize::from(d.qos.as_u8())].fetch_add(1, Relaxed);
                stats
                    .bytes_sent
                    .fetch_add(d.message.payload.len() as u64, Relaxed);
            } else {
                // Too large for the client (MQTT 5 §3.1.2.25): drop it as if delivered.
                stats.dropped(DropReason::TooLarge, 1);
                if let Some(pid) = pid {
                    self.complete_outgoing(pid.get());
                }
            }
        }
        more
    }

    /// Whether `packet` respects the client's Maximum Packet Size (measured in place: no copy).
    fn fits(&self, packet: &Packet) -> bool {
        self.client_max_packet == u32::MAX
            || u32::try_from(encoded_len(packet, self.version))
                .is_ok_and(|l| l <= self.client_max_packet)
    }

    /// Queues the PUBLISH for `d` unless it exceeds the client's Maximum Packet Size (then
    /// returns false and sends nothing, leaving the topic alias state untouched).
    fn transmit_publish(
        &mut self,
        d: &Delivery,
        packet_id: Option<PacketId>,
        dup: bool,
        now: Instant,
    ) -> bool {
        self.transmit_publish_after(d, packet_id, dup, now, None)
    }

    /// [`Self::transmit_publish`], held back (with everything after it) until `commit`.
    fn transmit_publish_after(
        &mut self,
        d: &Delivery,
        packet_id: Option<PacketId>,
        dup: bool,
        now: Instant,
        commit: Option<Commit>,
    ) -> bool {
        let packet = Packet::Publish(self.publish_packet(d, packet_id, dup, now));
        if !self.fits(&packet) {
            return false;
        }
        if let Packet::Publish(p) = &packet
            && let Some(alias) = p.properties.topic_alias
            && !p.topic.is_empty()
        {
            self.outbound_aliases.commit(&p.topic, alias);
        }
        self.emit(packet, commit);
        true
    }

    fn publish_packet(
        &self,
        d: &Delivery,
        packet_id: Option<PacketId>,
        dup: bool,
        now: Instant,
    ) -> Publish {
        let m = &d.message;
        let mut topic = m.topic.clone();
        let properties = if self.version.is_v5() {
            let mut p = m.properties.clone();
            p.message_expiry_interval = m.remaining_expiry(now);
            p.subscription_identifiers = d.subscription_ids.to_vec();
            if let Some((alias, known)) = self.outbound_aliases.alias_for(&m.topic) {
                p.topic_alias = Some(alias);
                if known {
                    topic = ByteStr::default();
                }
            }
            p
        } else {
            PublishProperties::default()
        };
        Publish {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic,
            packet_id,
            properties,
            payload: m.payload.clone(),
        }
    }

    fn attachment(&self) -> Result<&Attachment, Violation> {
        self.attachment
            .as_ref()
            .ok_or(Violation::Code(ReasonCode::PROTOCOL_ERROR))
    }

    fn handle_publish(&mut self, p: Publish, now: Instant) -> Result<(), Violation> {
        let cfg = self.broker.config();
        let v5 = self.version.is_v5();
        // Per-client rate and bandwidth (token buckets): over the limit closes the connection.
        if let Some(limits) = &mut self.limits
            && let Err(exceeded) = limits.check(p.topic.len() + p.payload.len(), now)
        {
            self.broker.stats().limit_exceeded(exceeded.limit());
            return Err(Violation::Code(exceeded.reason_code()));
        }
        if p.qos.as_u8() > cfg.max_qos {
            return Err(Violation::Code(ReasonCode::QOS_NOT_SUPPORTED));
        }
        if p.retain && !cfg.retain_available {
            return Err(Violation::Code(ReasonCode::RETAIN_NOT_SUPPORTED));
        }
        if !p.properties.subscription_identifiers.is_empty() {
            return Err(Violation::Code(ReasonCode::PROTOCOL_ERROR));
        }
        // Topic alias (§3.3.2.3.4).
        let topic = match p.properties.topic_alias {
            Some(alias) if v5 => {
                if alias == 0 || alias > cfg.topic_alias_maximum {
                    return Err(Violation::Code(ReasonCode::TOPIC_ALIAS_INVALID));
                }
                if p.topic.is_empty() {
                    match self.inbound_aliases.as_ref().and_then(|a| a.get(&alias)) {
                        Some(t) => t.clone(),
                        None => return Err(Violation::Code(ReasonCode::PROTOCOL_ERROR)),
                    }
                } else {
                    self.inbound_aliases
                        .get_or_insert_default()
                        .insert(alias, p.topic.clone());
                    p.topic.clone()
                }
            }
            _ if p.topic.is_empty() => return Err(Violation::Code(ReasonCode::PROTOCOL_ERROR)),
            _ => p.topic.clone(),
        };
        let pid = p.packet_id;
        let topic_ok = TopicName::new(&topic, self.broker.topic_limits()).is_ok();
        let format_ok = p.properties.payload_format_indicator != Some(true)
            || std::str::from_utf8(&p.payload).is_ok();
        let att = self.attachment()?;
        let allowed = !topic.starts_with("$SYS")
            && self.broker.authorize(
                &att.principal,
                Access::Publish {
                    topic: &topic,
                    qos: p.qos,
                    retain: p.retain,
                },
            );
        let refusal = if !topic_ok {
            Some(ReasonCode::TOPIC_NAME_INVALID)
        } else if !format_ok {
            Some(ReasonCode::PAYLOAD_FORMAT_INVALID)
        } else if !allowed {
            self.broker.stats().publish_denied.fetch_add(1, Relaxed);
            Some(ReasonCode::NOT_AUTHORIZED)
        } else {
            None
        };
        let stats = self.broker.stats();
        stats.messages_received[usize::from(p.qos.as_u8())].fetch_add(1, Relaxed);
        stats
            .bytes_received
            .fetch_add(p.payload.len() as u64, Relaxed);

        // QoS 2: a PUBLISH whose packet id is still awaiting PUBREL is a duplicate: not routed
        // again, just acknowledged again (method B, §4.3.3) once what the first one recorded is
        // durable. If that failed, nothing was acknowledged: it is routed as new.
        let mut record_qos2 = None;
        if p.qos == QoS::ExactlyOnce {
            let pid = pid.ok_or(Violation::Code(ReasonCode::PROTOCOL_ERROR))?;
            let (session, epoch) = (att.session.clone(), att.epoch);
            let mut st = session.lock_attached(epoch)?;
            match st.incoming_qos2.get(&pid.get()) {
                Some(first) if !matches!(first.result(), Some(Err(_))) => {
                    let first = first.clone();
                    drop(st);
                    self.emit(Packet::PubRec(PubResponse::success(pid)), Some(first));
                    return Ok(());
                }
                Some(_) => {
                    st.incoming_qos2.remove(&pid.get());
                }
                None => {}
            }
            if refusal.is_none() || !v5 {
                if st.incoming_qos2.len() >= usize::from(cfg.receive_maximum) {
                    return Err(Violation::Code(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED));
                }
                // Recorded below with the commit of what routing it records (a refused message
                // records nothing: ready).
                record_qos2 = Some((session.clone(), epoch, pid.get()));
            }
        }
        let mut reason = ReasonCode::SUCCESS;
        let mut commit = None;
        let mut recorded = Commit::ready();
        if let Some(code) = refusal {
            reason = code;
        } else {
            let mut properties = p.properties;
            let expiry = properties.message_expiry_interval.take();
            properties.topic_alias = None;
            let message = Message {
                topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties,
                expires_at: expiry.map(|s| now + Duration::from_secs(s.into())),
                received_at: now,
                origin: Some(att.client_id.clone()),
            };
            let incoming_qos2 = pid
                .filter(|_| p.qos == QoS::ExactlyOnce)
                .map(|pid| (&*att.session, pid.get()));
            let routed = self.broker.route(Arc::new(message), incoming_qos2, now);
            if routed.offered == 0 {
                reason = ReasonCode::NO_MATCHING_SUBSCRIBERS;
            }
            // Only reported with backpressure on (a non-zero pause). A client with messages
            // in flight is not paused (see `poll_room`).
            if let Some((session, episode)) = routed.congested
                && self.paused.is_none()
                && !att.session.awaits_acknowledgements()
            {
                self.broker.stats().publishers_paused.fetch_add(1, Relaxed);
                self.paused = Some(Box::new(Pause {
                    session,
                    episode,
                    until: now + cfg.backpressure_max_pause.0,
                }));
            }
            recorded = routed.store;
            commit = Some(routed.commit);
        }
        if let Some((session, epoch, id)) = record_qos2
            && let Ok(mut st) = session.lock_attached(epoch)
        {
            st.incoming_qos2.insert(id, recorded);
        }
        let ack = |pid| PubResponse {
            packet_id: pid,
            reason_code: if v5 { reason } else { ReasonCode::SUCCESS },
            properties: ReasonProperties::default(),
        };
        match (p.qos, pid) {
            (QoS::AtMostOnce, _) => {}
            (QoS::AtLeastOnce, Some(pid)) => self.emit(Packet::PubAck(ack(pid)), commit),
            (QoS::ExactlyOnce, Some(pid)) => self.emit(Packet::PubRec(ack(pid)), commit),
            (_, None) => return Err(Violation::Code(ReasonCode::PROTOCOL_ERROR)),
        }
        Ok(())
    }

    fn handle_pubrel(&mut self, r: PubResponse) -> Result<(), Violation> {
        let att = self.attachment()?;
        let existed = {
            let mut st = att.session.lock_attached(att.epoch)?;
            st.incoming_qos2.remove(&r.packet_id.get()).is_some()
        };
        if existed && att.session.is_durable() {
            self.broker
                .propose(vec![StateChange::IncomingQos2Completed {
                    client_id: att.client_id.clone(),
                    packet_id: r.packet_id.get(),
                }]);
        }
        let reason = if existed || !self.version.is_v5() {
            ReasonCode::SUCCESS
        } else {
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
        };
        let comp = Packet::PubComp(PubResponse {
            packet_id: r.packet_id,
            reason_code: reason,
            properties: ReasonProperties::default(),
        });
        self.emit(comp, None);
        Ok(())
    }

    fn handle_puback(&mut self, r: PubResponse) -> Result<(), Violation> {
        let att = self.attachment()?;
        let mut st = att.session.lock_attached(att.epoch)?;
        let id = r.packet_id.get();
        if matches!(st.outgoing.get(&id), Some(OutgoingEntry { state: Outgoing::Publish(d), .. }) if d.qos == QoS::AtLeastOnce)
            && let Some(OutgoingEntry {
                state: Outgoing::Publish(d),
                ..
            }) = st.outgoing.remove(&id)
        {
            drop(st);
            self.broker.stats().messages_inflight.fetch_sub(1, Relaxed);
            self.record_acked(d.durable);
        }
        Ok(())
    }

    fn handle_pubrec(&mut self, r: PubResponse) -> Result<(), Violation> {
        let att = self.attachment()?;
        let id = r.packet_id.get();
        let mut released = None;
        let known = {
            let mut st = att.session.lock_attached(att.epoch)?;
            match st.outgoing.get_mut(&id) {
                Some(e) if matches!(&e.state, Outgoing::Publish(d) if d.qos == QoS::ExactlyOnce) => {
                    self.broker.stats().messages_inflight.fetch_sub(1, Relaxed);
                    let durable = match &e.state {
                        Outgoing::Publish(d) => d.durable,
                        Outgoing::Released(_) => None,
                    };
                    if !r.reason_code.is_success() {
                        // The client refused the message: the exchange ends here (§4.3.3).
                        st.outgoing.remove(&id);
                        drop(st);
                        self.record_acked(durable);
                        return Ok(());
                    }
                    e.state = Outgoing::Released(durable);
                    released = durable;
                    true
                }
                Some(e) => matches!(e.state, Outgoing::Released(_)),
                None => false,
            }
        };
        // PUBREL for a stored message waits until "released" is durable: after a restart the
        // session must resend PUBREL, not the PUBLISH (exactly once).
        let commit = released.map(|id| {
            self.broker.propose(vec![StateChange::MessageReleased {
                client_id: att.client_id.clone(),
                id,
            }])
        });
        let reason = if known || !self.version.is_v5() {
            ReasonCode::SUCCESS
        } else {
            ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
        };
        let rel = Packet::PubRel(PubResponse {
            packet_id: r.packet_id,
            reason_code: reason,
            properties: ReasonProperties::default(),
        });
        self.emit(rel, commit);
        Ok(())
    }

    fn handle_pubcomp(&mut self, r: PubResponse) -> Result<(), Violation> {
        let att = self.attachment()?;
        let mut st = att.session.lock_attached(att.epoch)?;
        let id = r.packet_id.get();
        if let Some(OutgoingEntry {
            state: Outgoing::Released(durable),
            ..
        }) = st.outgoing.get(&id)
        {
            let durable = *durable;
            st.outgoing.remove(&id);
            drop(st);
            self.record_acked(durable);
        }
        Ok(())
    }

    /// Records that a stored message is done for this session (not awaited: a lost record
    /// only means a redelivery after a crash).
    fn record_acked(&self, durable: Option<crate::durability::MessageId>) {
        if let (Some(id), Some(att)) = (durable, &self.attachment) {
            self.broker.propose(vec![StateChange::MessageAcked {
                client_id: att.client_id.clone(),
                id,
            }]);
        }
    }

    fn complete_outgoing(&mut self, id: u16) {
        let Some(att) = &self.attachment else { return };
        let removed = att
            .session
            .lock_attached(att.epoch)
            .ok()
            .and_then(|mut st| st.outgoing.remove(&id));
        if let Some(entry) = removed {
            let durable = match entry.state {
                Outgoing::Publish(d) => {
                    self.broker.stats().messages_inflight.fetch_sub(1, Relaxed);
                    d.durable
                }
                Outgoing::Released(durable) => durable,
            };
            self.record_acked(durable);
        }
    }

    fn handle_subscribe(&mut self, s: Subscribe, now: Instant) -> Result<(), Violation> {
        let cfg = self.broker.config();
        let v5 = self.version.is_v5();
        let sub_id = s.properties.subscription_identifier;
        if sub_id.is_some() && !cfg.subscription_identifiers {
            return Err(Violation::Code(
                ReasonCode::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
            ));
        }
        let att = self.attachment()?;
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut changes = Vec::new();
        for f in &s.filters {
            // No Local on a shared subscription is a Protocol Error (§3.8.3.1).
            if v5 && f.options.no_local && f.filter.starts_with("$share/") {
                return Err(Violation::Code(ReasonCode::PROTOCOL_ERROR));
            }
            let subscribed = self
                .broker
                .subscribe(
                    &att.session,
                    att.epoch,
                    &att.principal,
                    &f.filter,
                    SubEntry {
                        options: f.options,
                        subscription_id: sub_id,
                    },
                    now,
                )
                .map_err(|TakenOver| Violation::TakenOver)?;
            codes.push(subscribed.code);
            changes.extend(subscribed.change);
        }
        let commit = self.broker.propose(changes);
        let ack = Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            properties: ReasonProperties::default(),
            reason_codes: codes,
        });
        self.emit(ack, Some(commit));
        Ok(())
    }

    fn handle_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), Violation> {
        let att = self.attachment()?;
        let mut codes = Vec::with_capacity(u.filters.len());
        let mut changes = Vec::new();
        for f in &u.filters {
            let (existed, change) = self
                .broker
                .unsubscribe(&att.session, att.epoch, f)
                .map_err(|TakenOver| Violation::TakenOver)?;
            changes.extend(change);
            codes.push(if existed {
                ReasonCode::SUCCESS
            } else {
                ReasonCode::NO_SUBSCRIPTION_EXISTED
            });
        }
        let commit = self.broker.propose(changes);
        let ack = Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            properties: ReasonProperties::default(),
            reason_codes: codes,
        });
        self.emit(ack, Some(commit));
        Ok(())
    }

    fn handle_disconnect(&mut self, d: Disconnect, now: Instant) {
        if let Some(secs) = d.properties.session_expiry_interval {
            // Raising the expiry from 0 at DISCONNECT is a Protocol Error (§3.14.2.2.2).
            if self.connect_expiry == 0 && secs != 0 {
                return self.close(
                    CloseReason::ProtocolViolation(ReasonCode::PROTOCOL_ERROR),
                    Some(ReasonCode::PROTOCOL_ERROR),
                    now,
                );
            }
            let secs = self.cap_session_expiry(secs);
            if let Some(att) = &self.attachment
                && self
                    .broker
                    .set_session_expiry(&att.session, att.epoch, secs)
                    .is_err()
            {
                return self.taken_over();
            }
        }
        let kind = if d.reason_code == ReasonCode::DISCONNECT_WITH_WILL_MESSAGE {
            DetachKind::WithWill
        } else if d.reason_code == ReasonCode::NORMAL_DISCONNECTION {
            DetachKind::Normal
        } else {
            DetachKind::Abnormal
        };
        self.closed = Some(CloseReason::ClientDisconnect);
        self.detach(kind, now);
    }

    /// Closes the connection from the server side, telling a v5 client why.
    fn close(&mut self, reason: CloseReason, code: Option<ReasonCode>, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if let (true, true, Some(code)) = (self.attachment.is_some(), self.version.is_v5(), code) {
            self.out
                .push_back(Packet::Disconnect(Disconnect::with_code(code)));
        }
        self.closed = Some(reason);
        self.detach(DetachKind::Abnormal, now);
    }

    /// The session was taken over: say so (v5) and close without touching the session.
    fn taken_over(&mut self) {
        if self.closed.is_some() {
            return;
        }
        self.out.clear();
        self.pending = None;
        // A session discarded by an administrator says so rather than "taken over".
        let kicked = self.attachment.as_ref().and_then(|a| a.session.take_kick());
        if self.version.is_v5() {
            let mut disconnect =
                Disconnect::with_code(kicked.unwrap_or(ReasonCode::SESSION_TAKEN_OVER));
            if kicked == Some(ReasonCode::USE_ANOTHER_SERVER) {
                // Fenced because this node lost touch with the cluster: name another member.
                disconnect.properties.server_reference = self.broker.redirect();
            }
            self.out.push_back(Packet::Disconnect(disconnect));
        }
        self.closed = Some(if kicked.is_some() {
            CloseReason::Kicked
        } else {
            CloseReason::TakenOver
        });
        self.attachment = None;
    }

    fn detach(&mut self, kind: DetachKind, now: Instant) {
        if let Some(att) = self.attachment.take() {
            self.broker.detach(&att.session, att.epoch, kind, now);
        }
    }
}

/// A packet held back until its commit.
struct Pending {
    commit: Commit,
    packet: Packet,
}

enum Violation {
    Code(ReasonCode),
    TakenOver,
}

impl From<TakenOver> for Violation {
    fn from(TakenOver: TakenOver) -> Self {
        Violation::TakenOver
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MqttConfig;
    use raftmq_codec::{ConnectProperties, decode, encode};

    /// A 3.1.1 clean-session CONNECT of `client_id`, decoded from the wire the way the server
    /// does it: its strings are slices of the read buffer.
    fn decoded_connect(client_id: &str) -> (Packet, bytes::Bytes) {
        let connect = Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V3_1_1,
            clean_start: true,
            keep_alive: 60,
            client_id: client_id.into(),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties::default(),
        }));
        let mut wire = bytes::BytesMut::with_capacity(512);
        encode(&connect, ProtocolVersion::V3_1_1, &mut wire).expect("encodable");
        let packet = decode(&mut wire, ProtocolVersion::V3_1_1, u32::MAX)
            .expect("well formed")
            .expect("complete");
        let buffer = match &packet {
            Packet::Connect(c) => c.client_id.as_bytes().clone(),
            _ => unreachable!(),
        };
        (packet, buffer)
    }

    #[test]
    fn idle_connection_keeps_neither_its_packet_queue_nor_the_connect_buffer() {
        let broker = Arc::new(Broker::new(MqttConfig::default()));
        let now = Instant::now();
        let mut conn = Connection::new(broker, None, now);
        let (connect, wire) = decoded_connect("sensor-17");
        conn.handle_packet(connect, now);
        assert!(matches!(conn.poll_transmit(), Some(Packet::ConnAck(_))));
        assert!(conn.poll_transmit().is_none());
        assert_eq!(conn.out.capacity(), 0, "the CONNACK's queue slot is freed");
        // The session's client id owns its bytes instead of pinning the read buffer.
        let id = conn.client_id().expect("connected");
        assert_eq!(id.as_str(), "sensor-17");
        assert_ne!(id.as_str().as_ptr(), wire.as_ptr());
    }

    #[test]
    fn only_small_empty_queues_are_released() {
        let mut small: VecDeque<u8> = VecDeque::with_capacity(4);
        release_if_small(&mut small);
        assert_eq!(small.capacity(), 0);
        let mut busy: VecDeque<u8> = VecDeque::with_capacity(4);
        busy.push_back(1);
        release_if_small(&mut busy);
        assert!(
            busy.capacity() >= 4,
            "a queue holding packets is left alone"
        );
        let mut large: VecDeque<u8> = VecDeque::with_capacity(1024);
        release_if_small(&mut large);
        assert!(large.capacity() >= 1024, "a queue grown under load is kept");
    }
}
