//! Authentication and authorization traits. The broker asks; implementations decide.
//! They are synchronous and must be cheap: anything slow (an HTTP callout) sits behind a cache
//! in its implementation.

use bytes::Bytes;
use raftmq_codec::{QoS, ReasonCode};
use std::net::SocketAddr;

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
}

/// Decides whether a client may connect.
pub trait Authenticator: Send + Sync + 'static {
    /// `Ok(principal)` to accept; `Err(reason)` (e.g. 0x86 bad user name or password, 0x87 not
    /// authorized, 0x8A banned) to refuse.
    fn authenticate(&self, info: &ConnectInfo<'_>) -> Result<Principal, ReasonCode>;
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
}

/// Decides whether a principal may publish to or subscribe to a topic.
pub trait Authorizer: Send + Sync + 'static {
    fn authorize(&self, principal: &Principal, access: Access<'_>) -> bool;
}

/// Accepts everyone and allows everything (the default for a local development broker).
#[derive(Clone, Copy, Debug, Default)]
pub struct AllowAll;

impl Authenticator for AllowAll {
    fn authenticate(&self, info: &ConnectInfo<'_>) -> Result<Principal, ReasonCode> {
        Ok(Principal {
            username: info.username.map(str::to_owned),
            client_id: info.client_id.to_owned(),
        })
    }
}

impl Authorizer for AllowAll {
    fn authorize(&self, _: &Principal, _: Access<'_>) -> bool {
        true
    }
}
