//! Protocol and session settings (the `[mqtt]` section of the broker configuration), plus the
//! human-friendly duration (`"30s"`, `"2h"`) and size (`"256KiB"`) types used across the config.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// How a shared-subscription group picks the member that gets a message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SharedStrategy {
    /// Members in turn.
    #[default]
    RoundRobin,
    /// A pseudo-random member (seeded, so it is reproducible in tests).
    Random,
}

/// What happens when a session's queue is full and another message arrives for it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OverflowPolicy {
    /// Drop the new message (and count it).
    #[default]
    DropNew,
    /// Drop the oldest queued message to make room (and count it).
    DropOldest,
}

/// MQTT protocol and session settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MqttConfig {
    /// Largest packet the broker accepts; announced to v5 clients as Maximum Packet Size.
    pub max_packet_size: ByteSize,
    /// How many QoS 1/2 PUBLISH a client may have unacknowledged towards the broker
    /// (Receive Maximum announced in CONNACK).
    pub receive_maximum: u16,
    /// Upper bound of messages in flight (sent, not yet acknowledged) towards one client; the
    /// client's own Receive Maximum lowers it further.
    pub max_inflight: u16,
    /// Messages queued per session beyond those in flight (online or offline).
    pub max_queued_messages: usize,
    /// What to do when the queue is full.
    pub queue_overflow: OverflowPolicy,
    /// Queue QoS 0 messages for offline persistent sessions (Mosquitto: `queue_qos0_messages`).
    pub queue_qos0_offline: bool,
    /// Backpressure from slow subscribers: once a connected subscriber's queue holds half of
    /// `max_queued_messages`, a client publishing to it is not read from until that queue is
    /// down to a quarter, for at most this long; then the subscriber counts as stalled (no
    /// publisher waits for it again until its queue drains) and its full queue drops, counted.
    /// At most 1s (below the shortest keep alive timeout); 0 turns backpressure off.
    pub backpressure_max_pause: DurationStr,
    /// Topic Alias Maximum announced to v5 clients (0 disables client-to-server aliases).
    pub topic_alias_maximum: u16,
    /// Cap on the session expiry a client may ask for (0 = no cap).
    pub max_session_expiry: DurationStr,
    /// Largest keep alive accepted; a larger (or zero) client keep alive is replaced by this
    /// value, sent to v5 clients as Server Keep Alive (0 = accept what the client asks).
    pub max_keep_alive: DurationStr,
    /// Highest QoS the broker grants (0, 1 or 2).
    pub max_qos: u8,
    /// Whether retained messages are supported.
    pub retain_available: bool,
    /// Whether wildcard subscriptions are allowed.
    pub wildcard_subscriptions: bool,
    /// Whether shared subscriptions (`$share/group/filter`) are allowed.
    pub shared_subscriptions: bool,
    /// Whether subscription identifiers are supported.
    pub subscription_identifiers: bool,
    /// How a shared group picks a member.
    pub shared_strategy: SharedStrategy,
    /// Accept an empty client id and assign one (v3.1.1 requires clean session for that).
    pub allow_empty_client_id: bool,
    /// Longest topic name or filter, in bytes.
    pub max_topic_length: usize,
    /// Most `/`-separated levels in a topic name or filter.
    pub max_topic_levels: usize,
    /// Most subscriptions one session may hold (0 = unlimited).
    pub max_subscriptions_per_client: usize,
    /// Most retained messages the broker stores (0 = unlimited); new topics beyond it are refused.
    pub max_retained_messages: usize,
    /// Most payload bytes of retained messages the broker stores (0 = unlimited); a retained
    /// message that would go beyond it is not stored (it is still delivered).
    pub max_retained_bytes: ByteSize,
    /// Most PUBLISH packets per second one client may send (0 = unlimited); a client over it
    /// is disconnected (v5: DISCONNECT 0x96 Message rate too high).
    pub max_publish_rate: u32,
    /// Most topic and payload bytes per second one client may publish (0 = unlimited); a client
    /// over it is disconnected (v5: DISCONNECT 0x97 Quota exceeded).
    pub max_publish_bandwidth: ByteSize,
    /// Number of shards of the subscription index.
    pub index_shards: usize,
    /// How often broker statistics are published as retained `$SYS/broker/...` messages
    /// (0 disables them).
    pub sys_interval: DurationStr,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            max_packet_size: ByteSize(1024 * 1024),
            receive_maximum: 1024,
            max_inflight: 128,
            max_queued_messages: 10_000,
            queue_overflow: OverflowPolicy::DropNew,
            queue_qos0_offline: false,
            backpressure_max_pause: DurationStr(Duration::from_millis(250)),
            topic_alias_maximum: 64,
            max_session_expiry: DurationStr(Duration::ZERO),
            max_keep_alive: DurationStr(Duration::from_secs(65_535)),
            max_qos: 2,
            retain_available: true,
            wildcard_subscriptions: true,
            shared_subscriptions: true,
            subscription_identifiers: true,
            shared_strategy: SharedStrategy::RoundRobin,
            allow_empty_client_id: true,
            max_topic_length: 65_535,
            max_topic_levels: 128,
            max_subscriptions_per_client: 0,
            max_retained_messages: 0,
            max_retained_bytes: ByteSize(0),
            max_publish_rate: 0,
            max_publish_bandwidth: ByteSize(0),
            index_shards: 16,
            sys_interval: DurationStr(Duration::from_secs(10)),
        }
    }
}

/// A problem found in a configuration value, naming the key.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigProblem {
    /// Dotted key, e.g. `mqtt.max_qos`.
    pub key: String,
    /// What is wrong.
    pub problem: String,
}

impl MqttConfig {
    /// Every problem with the values (not just the first), keys prefixed with `prefix`.
    pub fn validate(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut out = Vec::new();
        let mut bad = |key: &str, problem: &str| {
            out.push(ConfigProblem {
                key: format!("{prefix}{key}"),
                problem: problem.to_string(),
            })
        };
        if self.max_packet_size.0 < 64 || self.max_packet_size.0 > 268_435_460 {
            bad("max_packet_size", "must be between 64B and 256MiB");
        }
        if self.receive_maximum == 0 {
            bad("receive_maximum", "must be at least 1");
        }
        if self.max_inflight == 0 {
            bad("max_inflight", "must be at least 1");
        }
        if self.backpressure_max_pause.0 > Duration::from_secs(1) {
            bad(
                "backpressure_max_pause",
                "must be at most 1s (a paused client's keep alive must not run out)",
            );
        }
        if self.max_qos > 2 {
            bad("max_qos", "must be 0, 1 or 2");
        }
        if self.max_keep_alive.0.as_secs() > 65_535 {
            bad("max_keep_alive", "must be at most 65535s");
        }
        if self.max_session_expiry.0.as_secs() > u64::from(u32::MAX) {
            bad("max_session_expiry", "must be at most 4294967295s");
        }
        if self.max_topic_levels == 0 {
            bad("max_topic_levels", "must be at least 1");
        }
        if self.max_topic_length == 0 || self.max_topic_length > 65_535 {
            bad("max_topic_length", "must be between 1 and 65535");
        }
        if self.index_shards == 0 || self.index_shards > 1024 {
            bad("index_shards", "must be between 1 and 1024");
        }
        out
    }
}

/// A duration written as `"250ms"`, `"30s"`, `"5m"`, `"2h"`, `"7d"` (or a combination such as
/// `"1h30m"`); a bare integer is seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DurationStr(pub Duration);

impl FromStr for DurationStr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("empty duration".into());
        }
        if let Ok(secs) = s.parse::<u64>() {
            return Ok(Self(Duration::from_secs(secs)));
        }
        let mut total = Duration::ZERO;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if digits == 0 {
                return Err(format!(
                    "invalid duration `{s}` (expected e.g. 30s, 5m, 1h30m)"
                ));
            }
            let n: u64 = rest[..digits]
                .parse()
                .map_err(|_| format!("number too large in `{s}`"))?;
            rest = &rest[digits..];
            let unit_len = rest
                .find(|c: char| c.is_ascii_digit())
                .unwrap_or(rest.len());
            let unit = &rest[..unit_len];
            rest = &rest[unit_len..];
            let part = match unit {
                "ms" => Duration::from_millis(n),
                "s" => Duration::from_secs(n),
                "m" => Duration::from_secs(n.saturating_mul(60)),
                "h" => Duration::from_secs(n.saturating_mul(3600)),
                "d" => Duration::from_secs(n.saturating_mul(86_400)),
                _ => {
                    return Err(format!(
                        "invalid unit `{unit}` in `{s}` (use ms, s, m, h, d)"
                    ));
                }
            };
            total = total.saturating_add(part);
        }
        Ok(Self(total))
    }
}

impl fmt::Display for DurationStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_millis() != 0 || d.is_zero() && d.as_nanos() != 0 {
            return write!(f, "{}ms", d.as_millis());
        }
        let s = d.as_secs();
        match s {
            0 => write!(f, "0s"),
            s if s % 86_400 == 0 => write!(f, "{}d", s / 86_400),
            s if s % 3600 == 0 => write!(f, "{}h", s / 3600),
            s if s % 60 == 0 => write!(f, "{}m", s / 60),
            s => write!(f, "{s}s"),
        }
    }
}

/// A size written as `"512B"`, `"64KiB"`, `"1MiB"`, `"2GiB"` (or `KB`/`MB`/`GB` for powers of
/// 1000); a bare integer is bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        if split == 0 {
            return Err(format!(
                "invalid size `{s}` (expected e.g. 512B, 64KiB, 1MiB)"
            ));
        }
        let n: u64 = s[..split]
            .parse()
            .map_err(|_| format!("number too large in `{s}`"))?;
        let mult: u64 = match s[split..].trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            unit => {
                return Err(format!(
                    "invalid unit `{unit}` in `{s}` (use B, KiB, MiB, GiB, KB, MB, GB)"
                ));
            }
        };
        n.checked_mul(mult)
            .map(Self)
            .ok_or_else(|| format!("size `{s}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0;
        match n {
            0 => write!(f, "0B"),
            n if n % (1 << 30) == 0 => write!(f, "{}GiB", n >> 30),
            n if n % (1 << 20) == 0 => write!(f, "{}MiB", n >> 20),
            n if n % (1 << 10) == 0 => write!(f, "{}KiB", n >> 10),
            n => write!(f, "{n}B"),
        }
    }
}

macro_rules! serde_via_str {
    ($t:ty, $what:literal) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<$t, E> {
                        v.parse().map_err(E::custom)
                    }
                    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<$t, E> {
                        v.to_string().parse().map_err(E::custom)
                    }
                    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<$t, E> {
                        if v < 0 {
                            return Err(E::custom("must not be negative"));
                        }
                        v.to_string().parse().map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}
serde_via_str!(
    DurationStr,
    "a duration such as \"30s\", \"5m\" or \"1h30m\""
);
serde_via_str!(ByteSize, "a size such as \"512B\", \"64KiB\" or \"1MiB\"");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_units_and_combinations() {
        let p = |s: &str| s.parse::<DurationStr>().map(|d| d.0);
        assert_eq!(p("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(p("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(p("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(p("7d"), Ok(Duration::from_secs(604_800)));
        assert_eq!(p("45"), Ok(Duration::from_secs(45)));
        assert!(p("10x").is_err());
        assert!(p("s").is_err());
        assert!(p("").is_err());
    }

    #[test]
    fn durations_and_sizes_display_round_trip() {
        for s in ["0s", "250ms", "30s", "5m", "2h", "7d", "90s"] {
            let d: DurationStr = s.parse().expect("valid");
            assert_eq!(d.to_string().parse::<DurationStr>(), Ok(d), "{s}");
        }
        for s in ["0B", "100B", "64KiB", "1MiB", "3GiB", "1500B"] {
            let b: ByteSize = s.parse().expect("valid");
            assert_eq!(b.to_string(), s);
        }
    }

    #[test]
    fn sizes_parse_binary_and_decimal_units() {
        assert_eq!("256KiB".parse::<ByteSize>(), Ok(ByteSize(262_144)));
        assert_eq!("1MB".parse::<ByteSize>(), Ok(ByteSize(1_000_000)));
        assert_eq!("12".parse::<ByteSize>(), Ok(ByteSize(12)));
        assert!("12 parsecs".parse::<ByteSize>().is_err());
        assert!("99999999999999GiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn default_config_is_valid_and_bad_values_are_all_reported_by_key() {
        assert!(MqttConfig::default().validate("mqtt.").is_empty());
        let cfg = MqttConfig {
            max_qos: 3,
            receive_maximum: 0,
            index_shards: 0,
            ..Default::default()
        };
        let keys: Vec<String> = cfg.validate("mqtt.").into_iter().map(|p| p.key).collect();
        assert_eq!(
            keys,
            ["mqtt.receive_maximum", "mqtt.max_qos", "mqtt.index_shards"]
        );
    }
}
