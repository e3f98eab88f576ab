//! Listener, TLS, connection limit and HTTP settings (`[listeners]`, `[tls]`, `[limits]` and
//! `[http]` sections).

use raftmq_core::config::{ByteSize, ConfigProblem, DurationStr};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// MQTT listeners.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ListenersConfig {
    /// Plain TCP MQTT listener address (`--mqtt-addr`); omit to disable.
    pub tcp: Option<SocketAddr>,
    /// MQTT over TLS listener address (usually port 8883); needs `[tls]`.
    pub tls: Option<SocketAddr>,
    /// MQTT over WebSocket listener address (usually port 8083).
    pub ws: Option<SocketAddr>,
    /// MQTT over secure WebSocket listener address (usually port 8084); needs `[tls]`.
    pub wss: Option<SocketAddr>,
    /// HTTP path of the WebSocket endpoint.
    pub ws_path: String,
    /// Listeners that expect a PROXY protocol (v1 or v2) header before anything else.
    pub proxy_protocol: Vec<ListenerKind>,
    /// Time a new connection gets for its PROXY header and TLS/WebSocket handshakes.
    pub handshake_timeout: DurationStr,
}

impl Default for ListenersConfig {
    fn default() -> Self {
        Self {
            tcp: Some(SocketAddr::from(([0, 0, 0, 0], 1883))),
            tls: None,
            ws: None,
            wss: None,
            ws_path: "/mqtt".to_owned(),
            proxy_protocol: Vec::new(),
            handshake_timeout: DurationStr(Duration::from_secs(10)),
        }
    }
}

/// The kinds of MQTT listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerKind {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
    /// WebSocket.
    Ws,
    /// WebSocket over TLS.
    Wss,
}

impl ListenerKind {
    /// Every kind, in a fixed order.
    pub const ALL: [ListenerKind; 4] = [Self::Tcp, Self::Tls, Self::Ws, Self::Wss];

    /// The name used in the configuration, logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Tls => "tls",
            Self::Ws => "ws",
            Self::Wss => "wss",
        }
    }

    /// Whether the listener speaks TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Self::Tls | Self::Wss)
    }

    /// Whether the listener speaks WebSocket.
    pub fn is_websocket(self) -> bool {
        matches!(self, Self::Ws | Self::Wss)
    }
}

impl ListenersConfig {
    /// The address configured for `kind`.
    pub fn addr(&self, kind: ListenerKind) -> Option<SocketAddr> {
        match kind {
            ListenerKind::Tcp => self.tcp,
            ListenerKind::Tls => self.tls,
            ListenerKind::Ws => self.ws,
            ListenerKind::Wss => self.wss,
        }
    }

    /// Every problem with the values, keys prefixed with `prefix`.
    pub fn validate(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut out = Vec::new();
        if !self.ws_path.starts_with('/') {
            out.push(problem(
                format!("{prefix}ws_path"),
                "must start with `/` (e.g. \"/mqtt\")",
            ));
        }
        if self.handshake_timeout.0.is_zero() {
            out.push(problem(
                format!("{prefix}handshake_timeout"),
                "must be more than 0s",
            ));
        }
        let mut seen: Vec<(ListenerKind, SocketAddr)> = Vec::new();
        for kind in ListenerKind::ALL {
            let Some(addr) = self.addr(kind) else {
                continue;
            };
            if addr.port() != 0
                && let Some((other, _)) = seen.iter().find(|(_, a)| *a == addr)
            {
                out.push(problem(
                    format!("{prefix}{}", kind.as_str()),
                    format!("{addr} is also the address of {prefix}{}", other.as_str()),
                ));
            }
            seen.push((kind, addr));
        }
        out
    }
}

/// Whether a TLS listener asks clients for a certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// No client certificate is requested.
    #[default]
    None,
    /// A certificate is requested; when one is sent it must verify against `ca_file`.
    Optional,
    /// A certificate verifying against `ca_file` is required.
    Required,
}

/// The lowest TLS version accepted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    V1_3,
}

/// What a verified client certificate contributes to authentication (`cert_identity`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CertIdentitySource {
    /// Nothing.
    None,
    /// The subject's Common Name.
    #[default]
    Cn,
    /// The whole subject, as an RFC 4514 string (`CN=device-1,O=Example`).
    Subject,
}

/// Certificates of the TLS and secure WebSocket listeners (the `[tls]` section).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain (leaf first).
    pub cert_file: Option<PathBuf>,
    /// PEM file with the server private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// PEM file with the CA certificates that client certificates must chain to.
    pub ca_file: Option<PathBuf>,
    /// Whether clients must present a certificate.
    pub client_auth: ClientAuth,
    /// Lowest TLS version accepted.
    pub min_version: TlsVersion,
    /// What of a verified client certificate is passed to authentication.
    pub identity: CertIdentitySource,
    /// How often the files are checked for changes (0 disables polling; SIGHUP reloads too).
    pub reload_interval: DurationStr,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_file: None,
            key_file: None,
            ca_file: None,
            client_auth: ClientAuth::None,
            min_version: TlsVersion::V1_2,
            identity: CertIdentitySource::Cn,
            reload_interval: DurationStr(Duration::from_secs(5)),
        }
    }
}

impl TlsConfig {
    /// Every problem with the values, keys prefixed with `prefix`. (That a TLS listener has
    /// certificates is checked when they are loaded, at startup.)
    pub fn validate(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut out = Vec::new();
        if self.client_auth != ClientAuth::None && self.ca_file.is_none() {
            out.push(problem(
                format!("{prefix}ca_file"),
                "required when client_auth is \"optional\" or \"required\"",
            ));
        }
        out
    }
}

/// Connection limits and overload protection (the `[limits]` section).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Most open client connections on this node (0 = unlimited).
    pub max_connections: usize,
    /// Most open client connections per listener (0 = unlimited).
    pub max_connections_per_listener: usize,
    /// New connections per second per listener (0 = unlimited).
    pub connect_rate: u32,
    /// Connections a listener accepts at once before `connect_rate` applies (the token bucket's
    /// size; 0 = `connect_rate`).
    pub connect_burst: u32,
    /// A client that accepts none of our bytes for this long is disconnected.
    pub write_stall_timeout: DurationStr,
    /// Resident memory of the process above which new connections are refused (0 = off).
    pub max_memory: ByteSize,
    /// Messages queued in all sessions above which new connections are refused (0 = off).
    pub max_queued_messages: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 0,
            max_connections_per_listener: 0,
            connect_rate: 0,
            connect_burst: 0,
            write_stall_timeout: DurationStr(Duration::from_secs(30)),
            max_memory: ByteSize(0),
            max_queued_messages: 0,
        }
    }
}

impl LimitsConfig {
    /// Every problem with the values, keys prefixed with `prefix`.
    pub fn validate(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut out = Vec::new();
        if self.write_stall_timeout.0.is_zero() {
            out.push(problem(
                format!("{prefix}write_stall_timeout"),
                "must be more than 0s",
            ));
        }
        out
    }
}

fn problem(key: String, problem: impl Into<String>) -> ConfigProblem {
    ConfigProblem {
        key,
        problem: problem.into(),
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
