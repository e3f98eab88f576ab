//! Listener and HTTP settings (`[listeners]` and `[http]` sections).

use raftmq_core::config::DurationStr;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::time::Duration;

/// MQTT listeners.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenersConfig {
    /// Plain TCP MQTT listener address (`--mqtt-addr`); omit to disable.
    pub tcp: Option<SocketAddr>,
}

impl Default for ListenersConfig {
    fn default() -> Self {
        Self {
            tcp: Some(SocketAddr::from(([0, 0, 0, 0], 1883))),
        }
    }
}

/// The HTTP endpoint serving metrics, health and the admin API.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Address of the HTTP endpoint (`--http-addr`); omit to disable.
    pub addr: Option<SocketAddr>,
    /// Bearer token required by the admin API (`/api/v1/...`); unset leaves it open.
    pub admin_token: Option<String>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: Some(SocketAddr::from(([0, 0, 0, 0], 9100))),
            admin_token: None,
        }
    }
}

/// How a node hands its clients off before it stops (the `[drain]` section).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DrainConfig {
    /// Longest a drain waits for outstanding commits and writes before closing connections.
    pub timeout: DurationStr,
    /// Sent to MQTT 5 clients as Server Reference with DISCONNECT 0x9C (Use another server);
    /// unset: DISCONNECT 0x8B (Server shutting down).
    pub server_reference: Option<String>,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self {
            timeout: DurationStr(Duration::from_secs(10)),
            server_reference: None,
        }
    }
}
