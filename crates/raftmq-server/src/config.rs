//! Listener and HTTP settings (`[listeners]` and `[http]` sections).

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

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
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            addr: Some(SocketAddr::from(([0, 0, 0, 0], 9100))),
        }
    }
}
