//! The broker configuration: the model, its layers and its validation.
//!
//! Every layer is a [`toml::Table`]; they are merged in order of precedence
//!
//! 1. the defaults ([`Config::default`] serialized),
//! 2. the TOML file (`--config`),
//! 3. the environment (`RAFTMQ_<SECTION>__<KEY>`, see [`env_layer`]),
//! 4. the command-line flags (see [`crate::cli::ServeArgs::layer`]),
//!
//! and the merged table is checked and deserialized once by [`Config::check`], which reports
//! every problem it finds (unknown keys, type errors, invalid values) rather than the first.
//!
//! This module holds the model; `layers` builds and merges the layers, `check` validates the
//! merged table.

use raftmq_core::config::{ConfigProblem, MqttConfig};
use raftmq_server::auth::AuthConfig;
use raftmq_server::bridge::BridgeConfig;
use raftmq_server::{DrainConfig, HttpConfig, LimitsConfig, ListenersConfig, TlsConfig};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

mod check;
mod layers;
#[cfg(test)]
mod tests;

pub use layers::{
    Layer, default_table, env_layer, load, overlay, parse_env_value, read_file, resolve,
};

/// Prefix of every environment variable the broker reads.
pub const ENV_PREFIX: &str = "RAFTMQ_";

/// Environment variables read by command-line flags (through clap) that are not
/// `RAFTMQ_<SECTION>__<KEY>` names; the environment layer leaves them alone. (`RAFTMQ_NODE_ID`
/// and `RAFTMQ_DATA_DIR` are read by both, with the same meaning.)
pub const FLAG_ONLY_ENV_VARS: &[&str] = &[
    "RAFTMQ_CONFIG",
    "RAFTMQ_MQTT_ADDR",
    "RAFTMQ_HTTP_ADDR",
    "RAFTMQ_CLUSTER_ADDR",
    "RAFTMQ_SEEDS",
    "RAFTMQ_LOG_FORMAT",
    "RAFTMQ_LOG_LEVEL",
    "RAFTMQ_NODE_ID_FROM_ORDINAL",
    // `raftmq ctl --token` (set in the broker's container for the Helm preStop hook).
    "RAFTMQ_ADMIN_TOKEN",
];

/// Address keys that may be set to `"none"` (or `""`) to disable what they configure.
pub const DISABLEABLE_ADDRS: &[&str] = &["listeners.tcp", "http.addr"];

/// The whole broker configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's id in the cluster (at least 1).
    pub node_id: u64,
    /// Where the node keeps its state.
    pub data_dir: PathBuf,
    /// MQTT listeners.
    pub listeners: ListenersConfig,
    /// Certificates of the TLS listeners.
    pub tls: TlsConfig,
    /// Connection limits and overload protection.
    pub limits: LimitsConfig,
    /// The HTTP endpoint (metrics, health, admin API).
    pub http: HttpConfig,
    /// Draining before shutdown.
    pub drain: DrainConfig,
    /// Cluster membership.
    pub cluster: ClusterConfig,
    /// MQTT protocol and session settings.
    pub mqtt: MqttConfig,
    /// Authentication and authorization.
    pub auth: AuthConfig,
    /// Logging.
    pub log: LogConfig,
    /// Bridges to other MQTT brokers (`[[bridges]]` tables, see docs/bridges.md).
    pub bridges: Vec<BridgeConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: 1,
            data_dir: PathBuf::from("./data"),
            listeners: ListenersConfig::default(),
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
            http: HttpConfig::default(),
            drain: DrainConfig::default(),
            cluster: ClusterConfig::default(),
            mqtt: MqttConfig::default(),
            auth: AuthConfig::default(),
            log: LogConfig::default(),
            bridges: Vec::new(),
        }
    }
}

/// Cluster membership (the `[cluster]` section).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Address the cluster (Raft and gossip) listener binds.
    pub addr: SocketAddr,
    /// `host:port` other nodes use to reach this one, when it differs from `addr`.
    pub advertise_addr: Option<String>,
    /// `host:port` of nodes to contact when joining; empty for a single node.
    pub seeds: Vec<String>,
    /// Number of data shards (Raft groups of the durable state), `1..=1024`; fixed when the
    /// cluster is created (recorded in the data dir, a start with another value is refused).
    pub shards: u32,
    /// Whether idle shards other than shard 1 stop their Raft heartbeats (with `shards > 1`).
    pub quiesce_idle_shards: bool,
    /// This node's certificate chain (PEM) for mutual TLS between nodes; with `tls_key_file`
    /// and `tls_ca_file` it turns mTLS on for all cluster traffic.
    pub tls_cert_file: Option<PathBuf>,
    /// The private key of `tls_cert_file` (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// CA certificates (PEM) every node's certificate must chain to.
    pub tls_ca_file: Option<PathBuf>,
    /// Tests only: a file describing a network partition between nodes (see the docs).
    pub faults_file: Option<PathBuf>,
    /// Tests only: a file whose number of milliseconds stalls every synced Raft log write.
    pub disk_faults_file: Option<PathBuf>,
}

impl ClusterConfig {
    /// The certificate, key and CA files when cluster mTLS is configured (all three are set;
    /// [`ClusterConfig::validate`] reports a partial configuration).
    pub fn tls_files(&self) -> Option<(&Path, &Path, &Path)> {
        Some((
            self.tls_cert_file.as_deref()?,
            self.tls_key_file.as_deref()?,
            self.tls_ca_file.as_deref()?,
        ))
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 7946)),
            advertise_addr: None,
            seeds: Vec::new(),
            shards: 1,
            quiesce_idle_shards: true,
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            faults_file: None,
            disk_faults_file: None,
        }
    }
}

/// Logging (the `[log]` section).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Output format.
    pub format: LogFormat,
    /// An `EnvFilter` directive such as `info` or `info,raftmq_server=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info,openraft=warn".to_owned(),
        }
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl LogFormat {
    /// The name used in the config file and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Every problem found in a configuration; displays one `key: problem` per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidConfig(pub Vec<ConfigProblem>);

impl fmt::Display for InvalidConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.len();
        write!(
            f,
            "invalid configuration ({n} problem{})",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.0 {
            write!(f, "\n  {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for InvalidConfig {}
