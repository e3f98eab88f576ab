//! The `[[bridges]]` settings: one table per bridge, checked key by key.

use raftmq_core::config::{ConfigProblem, DurationStr};
use raftmq_core::topic::{TopicFilter, TopicLimits, TopicName};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// One bridge to another MQTT broker (a `[[bridges]]` table). See `docs/bridges.md`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BridgeConfig {
    /// Unique name: the metric label, the admin API's key, part of the default client ids.
    pub name: String,
    /// The remote broker, `host:port`.
    pub address: String,
    /// Client id at the remote broker (default `raftmq-bridge-<name>`).
    pub client_id: Option<String>,
    /// User name at the remote broker.
    pub username: Option<String>,
    /// Password at the remote broker (prefer `password_file`).
    pub password: Option<String>,
    /// File holding the password at the remote broker (trailing white space ignored).
    pub password_file: Option<PathBuf>,
    /// MQTT version spoken to the remote broker.
    pub mqtt_version: BridgeMqttVersion,
    /// Filters of local topics forwarded to the remote broker (local → remote).
    pub forward: Vec<String>,
    /// Filters subscribed to at the remote broker, published locally (remote → local).
    pub subscribe: Vec<String>,
    /// Highest QoS carried in either direction (messages above it are downgraded).
    pub qos: u8,
    /// Prefix of the local topics (added to `forward` filters and to topics received).
    pub local_prefix: String,
    /// Prefix of the remote topics (added to `subscribe` filters and to topics forwarded).
    pub remote_prefix: String,
    /// Keep alive towards the remote broker.
    pub keep_alive: DurationStr,
    /// Session expiry at the remote broker (MQTT 5) and of the bridge's local session.
    pub session_expiry: DurationStr,
    /// Start a clean session at the remote broker on every connect.
    pub clean_start: bool,
    /// Most QoS 1/2 messages in flight in each direction.
    pub max_inflight: u16,
    /// First delay before reconnecting after a failure (doubled each failure).
    pub reconnect_min: DurationStr,
    /// Longest delay between reconnection attempts.
    pub reconnect_max: DurationStr,
    /// Longest wait for the TCP/TLS connection and the CONNACK of the remote broker.
    pub connect_timeout: DurationStr,
    /// Connect with TLS.
    pub tls: bool,
    /// PEM file with the CA certificates the remote broker's certificate must chain to.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file with a client certificate chain (mutual TLS).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file with the client certificate's private key.
    pub tls_key_file: Option<PathBuf>,
    /// User name the bridge's local side runs as for the ACL (messages it publishes locally and
    /// the filters it subscribes to locally).
    pub local_username: Option<String>,
}

impl Default for BridgeConfig {
    fn default() -> Self {
        Self {
            name: String::new(),
            address: String::new(),
            client_id: None,
            username: None,
            password: None,
            password_file: None,
            mqtt_version: BridgeMqttVersion::V5,
            forward: Vec::new(),
            subscribe: Vec::new(),
            qos: 1,
            local_prefix: String::new(),
            remote_prefix: String::new(),
            keep_alive: DurationStr(Duration::from_secs(60)),
            session_expiry: DurationStr(Duration::from_secs(3600)),
            clean_start: false,
            max_inflight: 64,
            reconnect_min: DurationStr(Duration::from_secs(1)),
            reconnect_max: DurationStr(Duration::from_secs(30)),
            connect_timeout: DurationStr(Duration::from_secs(10)),
            tls: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            local_username: None,
        }
    }
}

/// The MQTT version a bridge speaks to its remote broker.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum BridgeMqttVersion {
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.0.
    #[default]
    #[serde(rename = "5")]
    V5,
}

/// Every key of a `[[bridges]]` table with its default (`None`: unset by default) and meaning,
/// for `docs/bridges.md` (a test keeps the two in step).
pub const BRIDGE_KEYS: &[(&str, &str)] = &[
    ("name", "required"),
    ("address", "required"),
    ("client_id", "\"raftmq-bridge-<name>\""),
    ("username", "unset"),
    ("password", "unset"),
    ("password_file", "unset"),
    ("mqtt_version", "\"5\""),
    ("forward", "[]"),
    ("subscribe", "[]"),
    ("qos", "1"),
    ("local_prefix", "\"\""),
    ("remote_prefix", "\"\""),
    ("keep_alive", "\"60s\""),
    ("session_expiry", "\"1h\""),
    ("clean_start", "false"),
    ("max_inflight", "64"),
    ("reconnect_min", "\"1s\""),
    ("reconnect_max", "\"30s\""),
    ("connect_timeout", "\"10s\""),
    ("tls", "false"),
    ("tls_ca_file", "unset"),
    ("tls_cert_file", "unset"),
    ("tls_key_file", "unset"),
    ("local_username", "unset"),
];

/// Longest session expiry MQTT can express.
const MAX_EXPIRY: Duration = Duration::from_secs(u32::MAX as u64);

impl BridgeConfig {
    /// The client id used at the remote broker.
    pub fn remote_client_id(&self) -> String {
        self.client_id
            .clone()
            .unwrap_or_else(|| format!("raftmq-bridge-{}", self.name))
    }

    /// The client id of the bridge's session in the local broker. Ids starting with
    /// [`raftmq_core::RESERVED_CLIENT_ID_PREFIX`] are refused to network clients, so none can
    /// take this session over.
    pub fn local_client_id(&self) -> String {
        format!("$bridge/{}", self.name)
    }

    /// `(host, port)` of `address`, once validated.
    pub fn host_port(&self) -> Option<(String, u16)> {
        let (host, port) = self.address.rsplit_once(':')?;
        let port: u16 = port.parse().ok().filter(|p| *p != 0)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (!host.is_empty()).then(|| (host.to_owned(), port))
    }

    /// The local filter subscribed to for the `forward` entry `filter`.
    pub fn local_filter(&self, filter: &str) -> String {
        format!("{}{filter}", self.local_prefix)
    }

    /// The remote filter subscribed to for the `subscribe` entry `filter`.
    pub fn remote_filter(&self, filter: &str) -> String {
        format!("{}{filter}", self.remote_prefix)
    }

    /// The remote topic a local message on `topic` is forwarded to (`None`: not under
    /// `local_prefix`).
    pub fn to_remote(&self, topic: &str) -> Option<String> {
        let rest = topic.strip_prefix(self.local_prefix.as_str())?;
        Some(format!("{}{rest}", self.remote_prefix))
    }

    /// The local topic a remote message on `topic` is published to (`None`: not under
    /// `remote_prefix`).
    pub fn to_local(&self, topic: &str) -> Option<String> {
        let rest = topic.strip_prefix(self.remote_prefix.as_str())?;
        Some(format!("{}{rest}", self.local_prefix))
    }

    /// Every problem with the values, keys prefixed with `prefix` (e.g. `bridges[0].`).
    pub fn validate(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut out = Vec::new();
        let mut bad = |key: &str, problem: String| {
            out.push(ConfigProblem {
                key: format!("{prefix}{key}"),
                problem,
            })
        };
        if self.name.is_empty() {
            bad("name", "required (a unique name for the bridge)".into());
        } else if !self
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            bad(
                "name",
                format!(
                    "`{}`: only letters, digits, `-`, `_` and `.` are allowed",
                    self.name
                ),
            );
        }
        if self.address.is_empty() {
            bad(
                "address",
                "required (host:port of the remote broker)".into(),
            );
        } else if self.host_port().is_none() || self.address.contains(char::is_whitespace) {
            bad(
                "address",
                format!("`{}` is not host:port (port 1-65535)", self.address),
            );
        }
        if let Some(id) = &self.client_id
            && (id.is_empty() || id.len() > 65_535)
        {
            bad("client_id", "must be 1 to 65535 bytes".into());
        }
        if self.password.is_some() && self.password_file.is_some() {
            bad(
                "password",
                "set either password or password_file, not both".into(),
            );
        }
        if (self.password.is_some() || self.password_file.is_some()) && self.username.is_none() {
            bad(
                "username",
                "required when a password is set (MQTT sends no password without a user name)"
                    .into(),
            );
        }
        if self.qos > 2 {
            bad("qos", "must be 0, 1 or 2".into());
        }
        if self.forward.is_empty() && self.subscribe.is_empty() {
            bad(
                "forward",
                "the bridge carries nothing: give forward and/or subscribe filters".into(),
            );
        }
        let limits = TopicLimits::default();
        for (key, value) in [
            ("local_prefix", &self.local_prefix),
            ("remote_prefix", &self.remote_prefix),
        ] {
            if !value.is_empty() && TopicName::new(value, &limits).is_err() {
                bad(
                    key,
                    format!("`{value}` must be a topic prefix without wildcards"),
                );
            } else if value.starts_with('$') {
                bad(key, format!("`{value}`: a prefix may not start with `$`"));
            }
        }
        for (key, filters, local) in [
            ("forward", &self.forward, true),
            ("subscribe", &self.subscribe, false),
        ] {
            for f in filters {
                let full = if local {
                    self.local_filter(f)
                } else {
                    self.remote_filter(f)
                };
                if f.starts_with("$share/") {
                    bad(key, format!("`{f}`: shared subscriptions are not allowed"));
                } else if let Err(e) = TopicFilter::new(&full, &limits) {
                    bad(key, format!("`{full}` is not a valid topic filter: {e}"));
                }
            }
        }
        // MQTT 3.1.1 has no no-local: a forwarded message the bridge's own subscription matches
        // would come straight back. Refused rather than looped.
        if self.mqtt_version == BridgeMqttVersion::V311 {
            'outer: for f in &self.forward {
                let sent = self.remote_filter(f);
                for s in &self.subscribe {
                    let received = self.remote_filter(s);
                    if filters_overlap(&sent, &received) {
                        bad(
                            "subscribe",
                            format!(
                                "`{received}` at the remote broker matches topics forwarded there \
                                 (`{sent}`): MQTT 3.1.1 has no no-local, so they would loop back; \
                                 use mqtt_version = \"5\" or disjoint filters/prefixes"
                            ),
                        );
                        break 'outer;
                    }
                }
            }
        }
        for (key, d, min) in [
            ("keep_alive", self.keep_alive.0, Duration::from_secs(1)),
            (
                "connect_timeout",
                self.connect_timeout.0,
                Duration::from_secs(1),
            ),
            (
                "reconnect_min",
                self.reconnect_min.0,
                Duration::from_millis(100),
            ),
        ] {
            if d < min {
                bad(key, format!("must be at least {min:?}"));
            }
        }
        if self.keep_alive.0 > Duration::from_secs(65_535) {
            bad("keep_alive", "must be at most 65535s".into());
        }
        if self.reconnect_max.0 < self.reconnect_min.0 {
            bad("reconnect_max", "must be at least reconnect_min".into());
        }
        if self.session_expiry.0 > MAX_EXPIRY {
            bad("session_expiry", "must be at most 4294967295s".into());
        }
        if self.session_expiry.0.is_zero() && !self.clean_start {
            bad(
                "session_expiry",
                "must be more than 0s (the bridge's messages are queued in its session while it \
                 is disconnected)"
                    .into(),
            );
        }
        if self.max_inflight == 0 {
            bad("max_inflight", "must be at least 1".into());
        }
        if self.tls {
            if self.tls_ca_file.is_none() {
                bad(
                    "tls_ca_file",
                    "required when tls = true (e.g. the system bundle \
                     /etc/ssl/certs/ca-certificates.crt)"
                        .into(),
                );
            }
            if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
                bad(
                    "tls_key_file",
                    "tls_cert_file and tls_key_file go together".into(),
                );
            }
        } else {
            for (key, set) in [
                ("tls_ca_file", self.tls_ca_file.is_some()),
                ("tls_cert_file", self.tls_cert_file.is_some()),
                ("tls_key_file", self.tls_key_file.is_some()),
            ] {
                if set {
                    bad(key, "only used with tls = true".into());
                }
            }
        }
        out
    }
}

/// Every problem with a list of bridges (each validated, names unique), keys `bridges[i].…`.
pub fn validate_bridges(bridges: &[BridgeConfig]) -> Vec<ConfigProblem> {
    let mut out = Vec::new();
    for (i, b) in bridges.iter().enumerate() {
        out.extend(b.validate(&format!("bridges[{i}].")));
        if !b.name.is_empty() && bridges[..i].iter().any(|o| o.name == b.name) {
            out.push(ConfigProblem {
                key: format!("bridges[{i}].name"),
                problem: format!("`{}` is the name of another bridge", b.name),
            });
        }
        let id = b.remote_client_id();
        if let Some(j) = bridges[..i]
            .iter()
            .position(|o| o.address == b.address && o.remote_client_id() == id)
        {
            out.push(ConfigProblem {
                key: format!("bridges[{i}].client_id"),
                problem: format!(
                    "`{id}` is also the client id of bridges[{j}] at the same address: they \
                     would take each other's session over"
                ),
            });
        }
    }
    out
}

/// Whether some topic name matches both filters (MQTT wildcard rules).
pub fn filters_overlap(a: &str, b: &str) -> bool {
    fn go(a: &[&str], b: &[&str]) -> bool {
        match (a.first(), b.first()) {
            (Some(&"#"), _) | (_, Some(&"#")) => true,
            (None, None) => true,
            (None, _) | (_, None) => false,
            (Some(x), Some(y)) => (*x == "+" || *y == "+" || x == y) && go(&a[1..], &b[1..]),
        }
    }
    let a: Vec<&str> = a.split('/').collect();
    let b: Vec<&str> = b.split('/').collect();
    go(&a, &b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bridge() -> BridgeConfig {
        BridgeConfig {
            name: "cloud".into(),
            address: "mqtt.example.com:1883".into(),
            forward: vec!["sensors/#".into()],
            subscribe: vec!["commands/#".into()],
            ..BridgeConfig::default()
        }
    }

    fn keys(problems: &[ConfigProblem]) -> Vec<&str> {
        problems.iter().map(|p| p.key.as_str()).collect()
    }

    #[test]
    fn a_minimal_bridge_is_valid() {
        assert_eq!(bridge().validate("bridges[0]."), vec![]);
        assert_eq!(
            bridge().host_port(),
            Some(("mqtt.example.com".into(), 1883))
        );
        assert_eq!(bridge().remote_client_id(), "raftmq-bridge-cloud");
    }

    #[test]
    fn bad_values_are_reported_by_key() {
        let b = BridgeConfig {
            name: "a b".into(),
            address: "nohost".into(),
            qos: 3,
            forward: vec!["a/#/b".into()],
            password: Some("x".into()),
            reconnect_max: DurationStr(Duration::from_millis(10)),
            tls_ca_file: Some("/ca".into()),
            ..BridgeConfig::default()
        };
        let p = b.validate("bridges[2].");
        assert_eq!(
            keys(&p),
            [
                "bridges[2].name",
                "bridges[2].address",
                "bridges[2].username",
                "bridges[2].qos",
                "bridges[2].forward",
                "bridges[2].reconnect_max",
                "bridges[2].tls_ca_file"
            ],
            "{p:?}"
        );
        let empty = BridgeConfig::default().validate("");
        assert_eq!(keys(&empty), ["name", "address", "forward"], "{empty:?}");
    }

    #[test]
    fn mqtt_311_refuses_filters_that_would_loop() {
        let mut b = bridge();
        b.mqtt_version = BridgeMqttVersion::V311;
        assert_eq!(b.validate(""), vec![]);
        b.subscribe = vec!["+/temp".into()];
        b.forward = vec!["sensors/#".into()];
        assert_eq!(keys(&b.validate("")), ["subscribe"]);
        // Different prefixes keep them apart... only when the remote topics differ.
        b.remote_prefix = "site1/".into();
        assert_eq!(keys(&b.validate("")), ["subscribe"]);
        b.mqtt_version = BridgeMqttVersion::V5;
        assert_eq!(b.validate(""), vec![]);
    }

    #[test]
    fn names_and_remote_ids_are_unique() {
        let p = validate_bridges(&[bridge(), bridge()]);
        assert_eq!(keys(&p), ["bridges[1].name", "bridges[1].client_id"]);
    }

    #[test]
    fn overlap_follows_the_wildcard_rules() {
        for (a, b, want) in [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/c", true),
            ("a/#", "a", true),
            ("#", "x/y/z", true),
            ("a/+/c", "a/b", false),
            ("+/+", "a/b/c", false),
            ("a/+/#", "+/b", true),
        ] {
            assert_eq!(filters_overlap(a, b), want, "{a} {b}");
            assert_eq!(filters_overlap(b, a), want, "{b} {a}");
        }
    }

    #[test]
    fn prefixes_map_topics_both_ways() {
        let b = BridgeConfig {
            local_prefix: "site/".into(),
            remote_prefix: "cloud/site1/".into(),
            ..bridge()
        };
        assert_eq!(b.local_filter("sensors/#"), "site/sensors/#");
        assert_eq!(b.remote_filter("commands/#"), "cloud/site1/commands/#");
        assert_eq!(
            b.to_remote("site/sensors/t1").as_deref(),
            Some("cloud/site1/sensors/t1")
        );
        assert_eq!(
            b.to_local("cloud/site1/commands/x").as_deref(),
            Some("site/commands/x")
        );
        assert_eq!(b.to_local("other/x"), None);
    }

    /// Every field is in BRIDGE_KEYS, and docs/bridges.md lists each with the same default.
    #[test]
    fn docs_list_every_key_with_its_default() {
        let fields = serde_json::to_value(BridgeConfig::default()).expect("serializes");
        let mut fields: Vec<&str> = fields
            .as_object()
            .expect("a table")
            .keys()
            .map(String::as_str)
            .collect();
        let mut keys: Vec<&str> = BRIDGE_KEYS.iter().map(|(k, _)| *k).collect();
        fields.sort_unstable();
        keys.sort_unstable();
        assert_eq!(fields, keys, "BRIDGE_KEYS must list every field");
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/bridges.md");
        let docs = std::fs::read_to_string(path).expect("read docs/bridges.md");
        for (key, default) in BRIDGE_KEYS {
            let row = format!(
                "| `{key}` | {} |",
                if default.starts_with(['u', 'r']) {
                    (*default).to_owned()
                } else {
                    format!("`{default}`")
                }
            );
            assert!(
                docs.contains(&row),
                "docs/bridges.md lacks the row starting {row}"
            );
        }
    }
}
