//! CONNECT: authentication (decided outside the state machine), negotiation, attaching the
//! session, and CONNACK.

use super::{Attachment, AuthSlot, CloseReason, Connection};
use crate::auth::{Access, AuthDecision, ConnectInfo, PendingAuth, Principal};
use crate::broker::NEVER_EXPIRES;
use crate::message::Message;
use crate::session::{ConnectionInfo, PendingWill};
use crate::topic::TopicName;
use raftmq_codec::{
    ByteStr, ConnAck, ConnAckProperties, Connect, Packet, ProtocolVersion, PublishProperties, QoS,
    ReasonCode,
};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

/// A CONNECT whose authentication is being decided outside the state machine.
pub(super) struct AwaitingAuth {
    pub(super) connect: Connect,
    pub(super) client_id: ByteStr,
    pub(super) assigned: Option<ByteStr>,
    /// Behind a mutex only so that `Connection` stays `Sync` (the future need not be).
    pub(super) future: parking_lot::Mutex<Option<PendingAuth>>,
    /// Packets that arrived meanwhile, handled once the decision is in.
    pub(super) held: VecDeque<Packet>,
}

impl Connection {
    /// Makes the coming CONNECT be refused with `code` (the server is over a connection limit
    /// or overloaded): CONNACK `code` to MQTT 5 clients, its 3.x return code to others.
    pub fn refuse(&mut self, code: ReasonCode) {
        self.refusal = Some(code);
    }

    /// The authentication decision the caller must await (once; see
    /// [`crate::auth::AuthDecision::Pending`]), then report with [`Self::handle_auth_result`].
    pub fn take_pending_auth(&mut self) -> Option<PendingAuth> {
        self.awaiting_auth_mut()
            .and_then(|a| a.future.get_mut().take())
    }

    /// Whether CONNECT waits for an authentication decision.
    pub fn is_awaiting_auth(&self) -> bool {
        matches!(self.auth.as_deref(), Some(AuthSlot::Awaiting(_)))
    }

    /// The asynchronous authentication decision for the pending CONNECT: continues it (and
    /// handles the packets that arrived meanwhile) or refuses it.
    pub fn handle_auth_result(
        &mut self,
        result: Result<Principal, raftmq_codec::ReasonCode>,
        now: Instant,
    ) {
        let Some(awaiting) = self.take_awaiting_auth() else {
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
                    None,
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

    pub(super) fn refuse_auth(&mut self, code: ReasonCode, now: Instant) {
        self.broker.stats().auth_failed(code);
        self.refuse_connect(code, now);
    }

    /// For the CONNACK of a session that was not in memory: now that the claim committed,
    /// loads the session from the replicated state and reports it present if found.
    pub(super) fn finish_attach(&mut self, packet: &mut Packet) -> bool {
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

    pub(super) fn handle_connect(&mut self, c: Connect, now: Instant) {
        self.version = c.protocol;
        let v5 = c.protocol.is_v5();
        let cfg = self.broker.config().clone();
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
        // A connection the server made itself: no authentication. Its client ids are reserved.
        if matches!(self.auth.as_deref(), Some(AuthSlot::Trusted(_))) {
            if let Some(AuthSlot::Trusted(mut principal)) = self.auth.take().map(|b| *b) {
                principal.client_id = client_id.to_string();
                return self.finish_connect(c, client_id, assigned, principal, None, now);
            }
        } else if client_id.starts_with(super::RESERVED_CLIENT_ID_PREFIX) {
            return self.refuse_connect(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID, now);
        }
        // Enhanced authentication (§4.12): the method's exchange decides instead.
        if let Some(method) = c.properties.authentication_method.clone() {
            return self.start_enhanced(c, client_id, assigned, method, now);
        }
        let info = ConnectInfo {
            client_id: &client_id,
            username: c.username.as_deref(),
            password: c.password.as_ref(),
            peer_addr: self.peer,
            cert_identity: self.cert_identity.as_deref(),
        };
        match self.broker.authenticator().authenticate(&info) {
            AuthDecision::Allow(principal) => {
                self.finish_connect(c, client_id, assigned, principal, None, now)
            }
            AuthDecision::Deny(code) => self.refuse_auth(code, now),
            AuthDecision::Pending(future) => {
                self.auth = Some(Box::new(AuthSlot::Awaiting(AwaitingAuth {
                    connect: c,
                    client_id,
                    assigned,
                    future: parking_lot::Mutex::new(Some(future)),
                    held: VecDeque::new(),
                })))
            }
        }
    }

    /// The part of CONNECT handling after authentication accepted the client.
    pub(super) fn finish_connect(
        &mut self,
        c: Connect,
        client_id: ByteStr,
        assigned: Option<ByteStr>,
        principal: Principal,
        auth_data: Option<bytes::Bytes>,
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
            // The method of an enhanced authentication and its last data ([MQTT-4.12.0-5]).
            if let Some(method) = &c.properties.authentication_method {
                props.authentication_method = Some(method.clone());
                props.authentication_data = auth_data;
            }
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
        let connack = Packet::ConnAck(ConnAck {
            session_present: attached.session_present,
            reason_code: ReasonCode::SUCCESS,
            properties: props,
        });
        self.load_after_connack = attached.load_after_commit;
        let loaded_at_once = attached.load_after_commit
            && attached.commit.result() == Some(Ok(()))
            && self.pending.is_none();
        attached.session.set_connection_info(
            attached.epoch,
            ConnectionInfo {
                // The authenticated name (a token's claim, a certificate's identity, the SCRAM
                // user), not whatever CONNECT said.
                username: principal.username.clone(),
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
        if loaded_at_once {
            // The claim and the read already completed: released now, as `handle_commits`
            // would release it.
            self.release(connack, now);
        } else {
            self.emit(connack, Some(attached.commit));
        }
        if attached.session_present {
            self.resend_inflight(now);
        }
    }

    /// `secs` limited to the configured maximum session expiry.
    pub(super) fn cap_session_expiry(&self, secs: u32) -> u32 {
        let cap = self.broker.config().max_session_expiry.0.as_secs();
        match u32::try_from(cap) {
            Ok(0) => secs,
            Ok(cap) => secs.min(cap),
            Err(_) => secs,
        }
    }

    pub(super) fn refuse_connect(&mut self, code: ReasonCode, _now: Instant) {
        self.out.push_back(Packet::ConnAck(ConnAck {
            session_present: false,
            reason_code: code,
            properties: ConnAckProperties::default(),
        }));
        self.closed = Some(CloseReason::ConnectRefused(code));
    }
}
