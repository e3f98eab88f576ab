//! The per-connection protocol state machine (sans-IO).
//!
//! The server's connection task feeds it decoded packets ([`Connection::handle_packet`]),
//! decode errors, session wake-ups ([`Connection::pump`]) and the time; it drains packets to
//! send with [`Connection::poll_transmit`] and closes the socket once [`Connection::is_closed`]
//! and everything was written. No I/O and no clock here: `now` is always an argument.

use crate::auth::Principal;
use crate::broker::{Broker, DetachKind, TakenOver};
use crate::durability::{Commit, DurabilityError, Fence};
use crate::session::Session;
use ahash::HashMap;
use raftmq_codec::{
    ByteStr, ConnAck, ConnAckProperties, DecodeError, Disconnect, Packet, ProtocolVersion,
    ReasonCode, ReasonProperties,
};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

mod connect;
mod enhanced;
mod inbound;
mod outbound;
use connect::AwaitingAuth;
use enhanced::Enhanced;
use outbound::OutboundAliases;

/// How long a new connection may take to send CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Packets a client may send after CONNECT while its authentication is still being decided;
/// one more closes the connection.
pub const MAX_PACKETS_BEFORE_AUTH: usize = 256;

/// Removes the properties a server may leave out of a packet that is too large for the client
/// (MQTT 5 §3.1.2.11.4): Reason String and User Properties.
fn strip_diagnostics(packet: &mut Packet) {
    let (reason, user) = match packet {
        Packet::ConnAck(p) => (
            &mut p.properties.reason_string,
            &mut p.properties.user_properties,
        ),
        Packet::Disconnect(p) => (
            &mut p.properties.reason_string,
            &mut p.properties.user_properties,
        ),
        Packet::Auth(p) => (
            &mut p.properties.reason_string,
            &mut p.properties.user_properties,
        ),
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            diagnostics(&mut r.properties)
        }
        Packet::SubAck(a) => diagnostics(&mut a.properties),
        Packet::UnsubAck(a) => diagnostics(&mut a.properties),
        // A PUBLISH that does not fit was never queued (its user properties are the
        // publisher's, forwarded unaltered); the others carry no diagnostics.
        Packet::Publish(_)
        | Packet::Connect(_)
        | Packet::Subscribe(_)
        | Packet::Unsubscribe(_)
        | Packet::PingReq
        | Packet::PingResp => return,
    };
    *reason = None;
    user.clear();
}

/// The diagnostic properties of an acknowledgement.
fn diagnostics(
    p: &mut ReasonProperties,
) -> (&mut Option<ByteStr>, &mut raftmq_codec::UserProperties) {
    (&mut p.reason_string, &mut p.user_properties)
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
    /// The credentials expired while connected (a token's `exp`, [`Principal::valid_until`]).
    CredentialsExpired,
    /// A re-authentication (MQTT 5 AUTH 0x19) failed with this reason code.
    ReauthFailed(ReasonCode),
}

/// The rarely used authentication state of a connection. The two never meet: a CONNECT with
/// an Authentication Method is decided by its exchange, never by a pending decision.
/// Client ids starting with this are the server's own (a bridge's local session): a network
/// client asking for one is refused (CONNACK 0x85 Client Identifier not valid), so none can take
/// such a session over.
pub const RESERVED_CLIENT_ID_PREFIX: &str = "$bridge/";

enum AuthSlot {
    /// A CONNECT waiting for an asynchronous authentication decision.
    Awaiting(AwaitingAuth),
    /// MQTT 5 enhanced authentication: the method of CONNECT and the exchange in progress.
    Enhanced(Enhanced),
    /// Set before CONNECT by the connection's owner for a connection made inside the server
    /// (a bridge's local side, see [`Connection::trust`]): CONNECT skips authentication and
    /// runs as this principal (its client id is the CONNECT's).
    Trusted(Principal),
}

impl Connection {
    fn awaiting_auth_mut(&mut self) -> Option<&mut AwaitingAuth> {
        match self.auth.as_deref_mut() {
            Some(AuthSlot::Awaiting(a)) => Some(a),
            _ => None,
        }
    }

    /// The pending decision, taken out.
    fn take_awaiting_auth(&mut self) -> Option<AwaitingAuth> {
        match self.auth.take().map(|b| *b) {
            Some(AuthSlot::Awaiting(a)) => Some(a),
            other => {
                self.auth = other.map(Box::new);
                None
            }
        }
    }

    fn enhanced(&self) -> Option<&Enhanced> {
        match self.auth.as_deref() {
            Some(AuthSlot::Enhanced(e)) => Some(e),
            _ => None,
        }
    }

    fn enhanced_mut(&mut self) -> Option<&mut Enhanced> {
        match self.auth.as_deref_mut() {
            Some(AuthSlot::Enhanced(e)) => Some(e),
            _ => None,
        }
    }
}

struct Attachment {
    session: Arc<Session>,
    epoch: u64,
    client_id: ByteStr,
    principal: Principal,
}

impl Attachment {
    /// The fence of changes this connection makes to its session's durable state: they take
    /// effect only while its claim is the session's latest.
    fn fence(&self) -> Fence {
        Fence::Attached {
            client_id: self.client_id.clone(),
            epoch: self.epoch,
        }
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
    /// A CONNECT waiting for an asynchronous authentication decision, or the state of MQTT 5
    /// enhanced authentication (boxed: rare, and large next to the rest of an idle
    /// connection's state).
    auth: Option<Box<AuthSlot>>,
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
            auth: None,
            limits,
            paused: None,
        }
    }

    /// Makes the coming CONNECT skip authentication and run as `principal` (its `client_id`
    /// replaced by the CONNECT's): for connections the server makes itself (a bridge's local
    /// side), never for a network client. Authorization (the ACL) still applies to it.
    pub fn trust(&mut self, principal: Principal) {
        self.auth = Some(Box::new(AuthSlot::Trusted(principal)));
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
    ///
    /// Nothing larger than the client's Maximum Packet Size leaves ([MQTT-3.1.2-24]): a packet
    /// that is too large loses its Reason String and User Properties (MQTT 5 §3.1.2.11.4), and
    /// if it still does not fit, the connection closes without it or anything after it.
    pub fn poll_transmit(&mut self) -> Option<Packet> {
        let Some(mut packet) = self.out.pop_front() else {
            release_if_small(&mut self.out);
            return None;
        };
        // A PUBLISH was measured when it was queued (`transmit_publish`): not again here.
        if matches!(packet, Packet::Publish(_)) || self.fits(&packet) {
            return Some(packet);
        }
        strip_diagnostics(&mut packet);
        if self.fits(&packet) {
            return Some(packet);
        }
        self.out.clear();
        self.pending = None;
        // The time of the last input: this is called between inputs, without a clock.
        let now = self.last_received;
        self.close(
            CloseReason::ProtocolViolation(ReasonCode::PACKET_TOO_LARGE),
            None,
            now,
        );
        None
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
                    if let Some(p) = self.pending.as_mut().and_then(|q| q.pop_front()) {
                        self.release(p.packet, now);
                    }
                    release_boxed_if_small(&mut self.pending);
                }
                Some(Err(error)) => {
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
                        if error == DurabilityError::Storage {
                            // The stored session could not be read: refused, its data kept.
                            return self.refuse_connect(ReasonCode::UNSPECIFIED_ERROR, now);
                        }
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

    /// Sends a packet whose commit succeeded. A CONNACK that completes the load of a stored
    /// session restores it first (setting Session Present) and resends its in-flight messages
    /// after it.
    fn release(&mut self, mut packet: Packet, now: Instant) {
        let resumed = self.finish_attach(&mut packet);
        self.out.push_back(packet);
        if resumed {
            self.resend_inflight(now);
        }
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
        let pause = self.paused.as_ref().map(|p| p.until);
        pause
            .into_iter()
            .chain(self.keep_alive_deadline())
            .chain(self.credentials_deadline())
            .min()
    }

    /// When the credentials the connection runs with expire.
    fn credentials_deadline(&self) -> Option<Instant> {
        self.attachment.as_ref()?.principal.valid_until
    }

    /// When the client must have sent CONNECT or its next packet.
    fn keep_alive_deadline(&self) -> Option<Instant> {
        match (&self.attachment, self.keep_alive) {
            (None, _) => Some(self.created_at + CONNECT_TIMEOUT),
            (Some(_), 0) => None,
            (Some(_), secs) => {
                let ka = Duration::from_secs(secs.into());
                Some(self.last_received + ka + ka / 2)
            }
        }
    }

    /// Ends a pause that ran out (the subscriber it waited for counts as stalled from now on);
    /// closes the connection if the client missed its keep alive (or never sent CONNECT), or
    /// when its credentials expired (DISCONNECT 0xA0 Maximum connect time to MQTT 5 clients:
    /// the time the credentials allowed is over; a client reconnects with fresh ones).
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.closed.is_some() {
            return;
        }
        if self.credentials_deadline().is_some_and(|d| now >= d) {
            return self.close(
                CloseReason::CredentialsExpired,
                Some(ReasonCode::MAXIMUM_CONNECT_TIME),
                now,
            );
        }
        if let Some(p) = self.paused.take_if(|p| now >= p.until)
            && p.session.give_up(p.episode)
        {
            self.broker
                .stats()
                .backpressure_timeouts
                .fetch_add(1, Relaxed);
        }
        if let Some(deadline) = self.keep_alive_deadline()
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
        if let Some(awaiting) = self.awaiting_auth_mut() {
            if awaiting.held.len() >= MAX_PACKETS_BEFORE_AUTH {
                // No CONNACK yet, so nothing to tell the client: just close.
                self.auth = None;
                self.closed = Some(CloseReason::ProtocolViolation(ReasonCode::QUOTA_EXCEEDED));
            } else {
                awaiting.held.push_back(packet);
            }
            return;
        }
        if self.is_exchanging() {
            // Only AUTH or DISCONNECT until CONNACK ([MQTT-3.1.2-30]).
            match packet {
                Packet::Auth(a) => self.handle_auth(a, now),
                Packet::Disconnect(_) => {
                    self.auth = None;
                    self.closed = Some(CloseReason::ClientDisconnect);
                }
                _ => self.auth_protocol_error(now),
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
            Packet::Auth(a) => {
                self.handle_auth(a, now);
                return;
            }
            // A second CONNECT or a server-only packet.
            Packet::Connect(_)
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
    use raftmq_codec::{Connect, ConnectProperties, decode, encode};

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
