//! MQTT 5 enhanced authentication (§4.12): the AUTH exchange before CONNACK and
//! re-authentication after it. The method's logic is the authenticator's
//! ([`crate::auth::AuthExchange`]); this module keeps the protocol's order and reason codes.

use super::{AuthSlot, CloseReason, Connection};
use crate::auth::{AuthExchange, ConnectInfo, ExchangeStep};
use bytes::Bytes;
use raftmq_codec::{Auth, AuthProperties, ByteStr, Connect, Packet, ReasonCode};
use std::time::Instant;

/// The enhanced authentication state of a connection whose CONNECT named a method.
pub(super) struct Enhanced {
    /// The Authentication Method of CONNECT: every AUTH must carry the same.
    pub(super) method: ByteStr,
    /// The exchange in progress, if any.
    pub(super) exchange: Option<Box<dyn AuthExchange>>,
    /// The CONNECT that waits for the exchange to finish (before CONNACK).
    pub(super) connect: Option<(Connect, ByteStr, Option<ByteStr>)>,
}

impl Connection {
    /// A CONNECT with an Authentication Method: starts the exchange, or refuses an unknown
    /// method with 0x8C.
    pub(super) fn start_enhanced(
        &mut self,
        c: Connect,
        client_id: ByteStr,
        assigned: Option<ByteStr>,
        method: ByteStr,
        now: Instant,
    ) {
        let info = ConnectInfo {
            client_id: &client_id,
            username: c.username.as_deref(),
            password: c.password.as_ref(),
            peer_addr: self.peer,
            cert_identity: self.cert_identity.as_deref(),
        };
        let Some(exchange) = self.broker.authenticator().start_exchange(&method, &info) else {
            return self.refuse_connect(ReasonCode::BAD_AUTHENTICATION_METHOD, now);
        };
        let data = c.properties.authentication_data.clone();
        self.auth = Some(Box::new(AuthSlot::Enhanced(Enhanced {
            method,
            exchange: Some(exchange),
            connect: Some((c, client_id, assigned)),
        })));
        self.exchange_step(data, now);
    }

    /// An AUTH from the client: the next step of the exchange before CONNACK (0x18), or the
    /// start of a re-authentication after it (0x19). Anything else is a Protocol Error.
    pub(super) fn handle_auth(&mut self, auth: Auth, now: Instant) {
        let connected = self.attachment.is_some();
        let expected = match self.enhanced() {
            // Before CONNACK an exchange is always in progress; after it, 0x18 answers ours and
            // 0x19 starts a new one.
            Some(e) if e.exchange.is_some() => Some(ReasonCode::CONTINUE_AUTHENTICATION),
            Some(_) if connected => Some(ReasonCode::RE_AUTHENTICATE),
            _ => None,
        };
        let same_method = self.enhanced().is_some_and(|e| {
            auth.properties.authentication_method.as_deref() == Some(e.method.as_str())
        });
        if expected != Some(auth.reason_code) || !same_method {
            return self.auth_protocol_error(now);
        }
        if auth.reason_code == ReasonCode::RE_AUTHENTICATE {
            let Some((method, client_id)) = self
                .enhanced()
                .zip(self.attachment.as_ref())
                .map(|(e, a)| (e.method.clone(), a.client_id.clone()))
            else {
                return self.auth_protocol_error(now);
            };
            let username = self
                .attachment
                .as_ref()
                .and_then(|a| a.principal.username.clone());
            let info = ConnectInfo {
                client_id: &client_id,
                username: username.as_deref(),
                password: None,
                peer_addr: self.peer,
                cert_identity: self.cert_identity.as_deref(),
            };
            let exchange = self.broker.authenticator().start_exchange(&method, &info);
            match (exchange, self.enhanced_mut()) {
                (Some(exchange), Some(e)) => e.exchange = Some(exchange),
                // The method is no longer offered (configuration changed): not authorized.
                _ => return self.reauth_failed(ReasonCode::NOT_AUTHORIZED, now),
            }
        }
        self.exchange_step(auth.properties.authentication_data, now);
    }

    /// Hands the client's data to the exchange and acts on its answer.
    fn exchange_step(&mut self, data: Option<Bytes>, now: Instant) {
        let Some(e) = self.enhanced_mut() else {
            return;
        };
        let Some(exchange) = e.exchange.as_mut() else {
            return;
        };
        let step = exchange.step(data.as_deref());
        let method = e.method.clone();
        let connect = if matches!(step, ExchangeStep::Continue(_)) {
            None
        } else {
            e.exchange = None;
            e.connect.take()
        };
        match step {
            ExchangeStep::Continue(data) => {
                let packet = auth_packet(ReasonCode::CONTINUE_AUTHENTICATION, method, Some(data));
                if self.attachment.is_some() {
                    self.emit(packet, None);
                } else {
                    self.out.push_back(packet);
                }
            }
            ExchangeStep::Success { principal, data } => {
                if let Some((c, client_id, assigned)) = connect {
                    return self.finish_connect(c, client_id, assigned, principal, data, now);
                }
                let Some(att) = self.attachment.as_mut() else {
                    return;
                };
                // Re-authentication renews the credentials of the same user: another user
                // would inherit a session whose subscriptions were authorized for the first.
                if att.principal.username != principal.username {
                    return self.reauth_failed(ReasonCode::NOT_AUTHORIZED, now);
                }
                att.principal = principal;
                self.emit(auth_packet(ReasonCode::SUCCESS, method, data), None);
            }
            ExchangeStep::Failure(code) => {
                if connect.is_some() {
                    self.auth = None;
                    self.refuse_auth(code, now);
                } else {
                    self.reauth_failed(code, now);
                }
            }
        }
    }

    /// A failed re-authentication closes the connection with DISCONNECT `code`
    /// ([MQTT-4.12.1-2]).
    fn reauth_failed(&mut self, code: ReasonCode, now: Instant) {
        self.broker.stats().auth_failed(code);
        self.close(CloseReason::ReauthFailed(code), Some(code), now);
    }

    /// An AUTH that does not fit the exchange: CONNACK 0x82 before CONNACK, DISCONNECT 0x82
    /// after it.
    pub(super) fn auth_protocol_error(&mut self, now: Instant) {
        let code = ReasonCode::PROTOCOL_ERROR;
        if self.attachment.is_some() {
            self.close(CloseReason::ProtocolViolation(code), Some(code), now);
        } else {
            self.auth = None;
            self.refuse_connect(code, now);
        }
    }

    /// Whether a CONNECT waits for the enhanced authentication exchange to finish.
    pub(super) fn is_exchanging(&self) -> bool {
        self.attachment.is_none() && self.enhanced().is_some_and(|e| e.connect.is_some())
    }
}

fn auth_packet(code: ReasonCode, method: ByteStr, data: Option<Bytes>) -> Packet {
    Packet::Auth(Auth {
        reason_code: code,
        properties: AuthProperties {
            authentication_method: Some(method),
            authentication_data: data,
            ..AuthProperties::default()
        },
    })
}
