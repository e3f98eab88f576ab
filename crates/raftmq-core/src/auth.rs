//! Authentication and authorization traits. The broker asks; implementations decide.
//!
//! Both are called synchronously by the sans-IO [`crate::Connection`] and must be cheap. An
//! authenticator that needs to wait (a key-derivation function, an HTTP callout) answers
//! [`AuthDecision::Pending`] with a future; the connection never polls it, it hands it to the
//! caller (the server's connection task, see [`crate::Connection::take_pending_auth`]), which
//! awaits it and reports the result with [`crate::Connection::handle_auth_result`]. The core
//! stays free of I/O and of any async runtime.

use bytes::Bytes;
use raftmq_codec::{QoS, ReasonCode};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

/// Who is connecting, as far as the transport and CONNECT tell.
#[derive(Clone, Debug)]
pub struct ConnectInfo<'a> {
    pub client_id: &'a str,
    pub username: Option<&'a str>,
    pub password: Option<&'a Bytes>,
    pub peer_addr: Option<SocketAddr>,
    /// Identity from a verified client certificate, when the listener provides one.
    pub cert_identity: Option<&'a str>,
}

/// The identity a connection runs as after authentication.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Principal {
    pub username: Option<String>,
    pub client_id: String,
    /// Rules given by the authentication backend for this connection (e.g. by an HTTP
    /// callout); when set, they replace the broker-wide ACL for it.
    pub acl: Option<std::sync::Arc<crate::acl::Acl>>,
    /// When the credentials stop being valid (a token's `exp`): the connection is closed then
    /// (DISCONNECT 0xA0 Maximum connect time to MQTT 5 clients). The authenticator turns the
    /// credential's wall-clock expiry into this instant; the core only compares it with `now`.
    pub valid_until: Option<std::time::Instant>,
}

/// An owned copy of [`ConnectInfo`], for decisions taken asynchronously.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuthRequest {
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub peer_addr: Option<SocketAddr>,
    pub cert_identity: Option<String>,
}

impl From<&ConnectInfo<'_>> for AuthRequest {
    fn from(info: &ConnectInfo<'_>) -> Self {
        AuthRequest {
            client_id: info.client_id.to_owned(),
            username: info.username.map(str::to_owned),
            password: info.password.cloned(),
            peer_addr: info.peer_addr,
            cert_identity: info.cert_identity.map(str::to_owned),
        }
    }
}

/// An authentication decision still being made (the caller awaits it; the core never polls).
pub type PendingAuth = Pin<Box<dyn Future<Output = Result<Principal, ReasonCode>> + Send>>;

/// What an [`Authenticator`] answers.
pub enum AuthDecision {
    /// Accept, running as this principal.
    Allow(Principal),
    /// Refuse with this CONNACK code (0x86 bad user name or password, 0x87 not authorized,
    /// 0x8A banned, 0x88 server unavailable...).
    Deny(ReasonCode),
    /// The decision needs waiting: the connection's owner awaits the future (which must bound
    /// its own duration) and hands the result back.
    Pending(PendingAuth),
}

impl std::fmt::Debug for AuthDecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthDecision::Allow(p) => f.debug_tuple("Allow").field(p).finish(),
            AuthDecision::Deny(c) => f.debug_tuple("Deny").field(c).finish(),
            AuthDecision::Pending(_) => f.write_str("Pending"),
        }
    }
}

impl From<Result<Principal, ReasonCode>> for AuthDecision {
    fn from(r: Result<Principal, ReasonCode>) -> Self {
        match r {
            Ok(p) => AuthDecision::Allow(p),
            Err(c) => AuthDecision::Deny(c),
        }
    }
}

/// Decides whether a client may connect.
pub trait Authenticator: Send + Sync + 'static {
    /// Accept, refuse, or (for a slow check) answer later; see [`AuthDecision`].
    fn authenticate(&self, info: &ConnectInfo<'_>) -> AuthDecision;

    /// Starts an MQTT 5 enhanced authentication exchange (§4.12) with the Authentication
    /// Method `method`, for a CONNECT or a re-authentication. `None` (the default): the method
    /// is not supported and the CONNECT is refused with 0x8C Bad authentication method.
    fn start_exchange(
        &self,
        _method: &str,
        _info: &ConnectInfo<'_>,
    ) -> Option<Box<dyn AuthExchange>> {
        None
    }
}

/// What one step of an enhanced authentication exchange answers.
#[derive(Debug)]
pub enum ExchangeStep {
    /// More is needed: the server sends AUTH 0x18 Continue authentication with this
    /// Authentication Data and waits for the client's AUTH.
    Continue(Bytes),
    /// Authenticated: CONNACK 0x00 (or AUTH 0x00 after a re-authentication) carries `data` as
    /// its Authentication Data.
    Success {
        principal: Principal,
        data: Option<Bytes>,
    },
    /// Refused with this reason code (CONNACK, or DISCONNECT during a re-authentication).
    Failure(ReasonCode),
}

/// One enhanced authentication exchange in progress (e.g. a SCRAM conversation). Each step is
/// synchronous and must be cheap (no key derivation on the server side: SCRAM stores derived
/// keys).
pub trait AuthExchange: Send + Sync {
    /// The client's Authentication Data (from CONNECT, then from each AUTH), if any.
    fn step(&mut self, data: Option<&[u8]>) -> ExchangeStep;
}

/// What a client asks to do with a topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access<'a> {
    Publish {
        topic: &'a str,
        qos: QoS,
        retain: bool,
    },
    Subscribe {
        filter: &'a str,
        qos: QoS,
    },
    /// A message to `topic` is about to be delivered to the principal's session (asked only
    /// when [`Authorizer::checks_delivery`] says so).
    Receive {
        topic: &'a str,
    },
}

/// Decides whether a principal may publish to or subscribe to a topic.
pub trait Authorizer: Send + Sync + 'static {
    fn authorize(&self, principal: &Principal, access: Access<'_>) -> bool;

    /// Whether each message delivered to `principal` must be authorized
    /// ([`Access::Receive`]): an ACL that grants broad subscriptions and withholds the denied
    /// topics message by message. Asked once per batch of deliveries; `false` (the default)
    /// costs nothing per message.
    fn checks_delivery(&self, _principal: &Principal) -> bool {
        false
    }
}

/// Accepts everyone and allows everything (the default for a local development broker).
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl Authenticator for AllowAll {
    fn authenticate(&self, info: &ConnectInfo<'_>) -> AuthDecision {
        AuthDecision::Allow(Principal {
            username: info.username.map(str::to_owned),
            client_id: info.client_id.to_owned(),
            acl: None,
            valid_until: None,
        })
    }
}

impl Authorizer for AllowAll {
    fn authorize(&self, _: &Principal, _: Access<'_>) -> bool {
        true
    }
}
