//! Checking a merged configuration table: unknown keys (with a likely intended name), type
//! errors pinned to their keys, and the values' own rules, all reported at once.

use super::{ClusterConfig, Config, DISABLEABLE_ADDRS, LogConfig, default_table};
use crate::docs;
use raftmq_core::config::{ConfigProblem, MqttConfig};
use raftmq_server::auth::AuthConfig;
use raftmq_server::bridge::{BRIDGE_KEYS, BridgeConfig, validate_bridges};
use raftmq_server::{DrainConfig, HttpConfig, LimitsConfig, ListenersConfig, TlsConfig};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use std::path::PathBuf;
use toml::{Table, Value};

fn problem(key: impl Into<String>, problem: impl Into<String>) -> ConfigProblem {
    ConfigProblem {
        key: key.into(),
        problem: problem.into(),
    }
}

/// The message of a deserialization error, without position information.
fn message(e: &toml::de::Error) -> String {
    e.message().trim().to_owned()
}

fn is_disabled(value: &Value) -> bool {
    matches!(value, Value::String(s) if s.is_empty() || s.eq_ignore_ascii_case("none"))
}

impl Config {
    /// Checks a merged configuration table (normally [`default_table`] with the other layers
    /// overlaid) and deserializes it, or returns every problem found: unknown keys (with their
    /// dotted path), type errors (per key, each section on its own so one bad section does not
    /// hide another), and invalid values.
    pub fn check(table: &Table) -> Result<Config, Vec<ConfigProblem>> {
        let schema = default_table();
        let mut problems = Vec::new();
        unknown_keys(table, &schema, "", &mut problems);

        // `"none"` disables an address; serde would fill a missing key with its default, so the
        // key is taken out here and cleared after deserializing.
        let mut table = table.clone();
        let mut disabled = Vec::new();
        for key in DISABLEABLE_ADDRS {
            let path: Vec<&str> = key.split('.').collect();
            if let [section, field] = path[..]
                && let Some(Value::Table(t)) = table.get_mut(section)
                && t.get(field).is_some_and(is_disabled)
            {
                t.remove(field);
                disabled.push(*key);
            }
        }

        let mut c = Checker {
            table: &table,
            schema: &schema,
            problems: &mut problems,
            broken: Vec::new(),
        };
        if let Some(node_id) = c.section::<u64>("node_id")
            && node_id == 0
        {
            c.problems.push(problem("node_id", "must be at least 1"));
        }
        if let Some(dir) = c.section::<PathBuf>("data_dir")
            && dir.as_os_str().is_empty()
        {
            c.problems.push(problem("data_dir", "must not be empty"));
        }
        let listeners = c.section::<ListenersConfig>("listeners");
        let http = c.section::<HttpConfig>("http");
        if let Some(cluster) = c.section::<ClusterConfig>("cluster") {
            c.problems.extend(cluster.validate("cluster."));
            // Only compare addresses the user actually gave (not defaults standing in for bad
            // values).
            let typed = ["listeners", "http", "cluster"]
                .iter()
                .all(|k| !c.broken.iter().any(|b| b == k));
            if let (Some(l), Some(h), true) = (&listeners, &http, typed) {
                let tcp = if disabled.contains(&"listeners.tcp") {
                    None
                } else {
                    l.tcp
                };
                let http = if disabled.contains(&"http.addr") {
                    None
                } else {
                    h.addr
                };
                c.problems.extend(address_clashes(tcp, http, cluster.addr));
            }
        }
        if let Some(http) = &http
            && http.admin_token.as_deref().is_some_and(|t| {
                t.trim().is_empty() || t.chars().any(|ch| ch.is_control() || ch == ' ')
            })
        {
            c.problems.push(problem(
                "http.admin_token",
                "must be non-empty, without spaces or control characters",
            ));
        }
        if let Some(drain) = c.section::<DrainConfig>("drain") {
            if drain.timeout.0.is_zero() {
                c.problems.push(problem(
                    "drain.timeout",
                    "must be more than 0s (e.g. \"10s\")",
                ));
            }
            if drain
                .server_reference
                .as_deref()
                .is_some_and(|r| r.trim().is_empty())
            {
                c.problems
                    .push(problem("drain.server_reference", "must not be empty"));
            }
        }
        if let Some(mqtt) = c.section::<MqttConfig>("mqtt") {
            c.problems.extend(mqtt.validate("mqtt."));
        }
        if let Some(auth) = c.section::<AuthConfig>("auth") {
            c.problems.extend(auth.validate("auth."));
        }
        if let Some(log) = c.section::<LogConfig>("log") {
            c.problems.extend(log.validate("log."));
        }
        if let Some(l) = &listeners {
            c.problems.extend(l.validate("listeners."));
        }
        if let Some(tls) = c.section::<TlsConfig>("tls") {
            c.problems.extend(tls.validate("tls."));
        }
        if let Some(limits) = c.section::<LimitsConfig>("limits") {
            c.problems.extend(limits.validate("limits."));
        }
        if let Some(bridges) = table.get("bridges") {
            check_bridges(bridges, c.problems);
        }
        if !problems.is_empty() {
            return Err(problems);
        }

        let mut config = Config::deserialize(Value::Table(table))
            .map_err(|e| vec![problem("config", message(&e))])?;
        if disabled.contains(&"listeners.tcp") {
            config.listeners.tcp = None;
        }
        if disabled.contains(&"http.addr") {
            config.http.addr = None;
        }
        Ok(config)
    }
}

/// Checks the `[[bridges]]` tables one by one, reporting problems as `bridges[i].key`.
fn check_bridges(value: &Value, problems: &mut Vec<ConfigProblem>) {
    let Value::Array(items) = value else {
        problems.push(problem(
            "bridges",
            "must be a list of tables: write each bridge as a [[bridges]] table",
        ));
        return;
    };
    let mut bridges = Vec::new();
    let mut broken = false;
    for (i, item) in items.iter().enumerate() {
        let prefix = format!("bridges[{i}]");
        let Value::Table(fields) = item else {
            problems.push(problem(prefix, "must be a table ([[bridges]])"));
            broken = true;
            continue;
        };
        let before = problems.len();
        let known = || BRIDGE_KEYS.iter().map(|(k, _)| *k);
        for (key, field) in fields {
            if !known().any(|k| k == key) {
                let hint = closest(key, known())
                    .map(|k| format!(" (did you mean `{prefix}.{k}`?)"))
                    .unwrap_or_default();
                problems.push(problem(
                    format!("{prefix}.{key}"),
                    format!("unknown key{hint}"),
                ));
                continue;
            }
            let mut probe = Table::new();
            probe.insert(key.clone(), field.clone());
            if let Err(e) = BridgeConfig::deserialize(Value::Table(probe)) {
                problems.push(problem(format!("{prefix}.{key}"), message(&e)));
            }
        }
        if problems.len() > before {
            broken = true;
            continue;
        }
        match BridgeConfig::deserialize(item.clone()) {
            Ok(b) => bridges.push((i, b)),
            Err(e) => {
                problems.push(problem(prefix, message(&e)));
                broken = true;
            }
        }
    }
    if broken {
        // The others are still checked, each on its own.
        for (i, b) in &bridges {
            problems.extend(b.validate(&format!("bridges[{i}].")));
        }
    } else {
        let all: Vec<BridgeConfig> = bridges.into_iter().map(|(_, b)| b).collect();
        problems.extend(validate_bridges(&all));
    }
}

impl ClusterConfig {
    /// Every problem with the values, keys prefixed with `prefix`.
    pub fn validate(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut out = Vec::new();
        if let Some(addr) = &self.advertise_addr
            && let Err(e) = check_host_port(addr)
        {
            out.push(problem(format!("{prefix}advertise_addr"), e));
        }
        for seed in &self.seeds {
            if let Err(e) = check_host_port(seed) {
                out.push(problem(format!("{prefix}seeds"), e));
            }
        }
        if raftmq_core::shard::ShardCount::new(self.shards).is_none() {
            out.push(problem(
                format!("{prefix}shards"),
                format!(
                    "must be between 1 and {} (the number of data shards), not {}",
                    raftmq_core::shard::ShardCount::MAX,
                    self.shards
                ),
            ));
        }
        let files = [
            ("tls_cert_file", &self.tls_cert_file),
            ("tls_key_file", &self.tls_key_file),
            ("tls_ca_file", &self.tls_ca_file),
        ];
        let given: Vec<&str> = files
            .iter()
            .filter(|(_, f)| f.is_some())
            .map(|(k, _)| *k)
            .collect();
        for (key, file) in files {
            match file {
                Some(f) if f.as_os_str().is_empty() => {
                    out.push(problem(format!("{prefix}{key}"), "must not be empty"));
                }
                None if !given.is_empty() => out.push(problem(
                    format!("{prefix}{key}"),
                    format!(
                        "required when {prefix}{} is set: cluster mTLS needs tls_cert_file, \
                         tls_key_file and tls_ca_file",
                        given[0]
                    ),
                )),
                _ => {}
            }
        }
        out
    }
}

impl LogConfig {
    /// Every problem with the values, keys prefixed with `prefix`.
    pub fn validate(&self, prefix: &str) -> Vec<ConfigProblem> {
        let mut out = Vec::new();
        if self.level.trim().is_empty() {
            out.push(problem(
                format!("{prefix}level"),
                "must not be empty (e.g. \"info\")",
            ));
        } else if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.level) {
            out.push(problem(
                format!("{prefix}level"),
                format!("`{}` is not a valid log filter: {e}", self.level),
            ));
        }
        out
    }
}

/// Checks that `s` is `host:port` (host a name, an IPv4 address or a bracketed IPv6 address).
fn check_host_port(s: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("`{s}` is not host:port ({why})"));
    let Some((host, port)) = s.rsplit_once(':') else {
        return bad("no port");
    };
    if host.is_empty() {
        return bad("no host");
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return bad("write IPv6 addresses in brackets, e.g. [::1]:7946");
    }
    if host.contains(|c: char| c.is_whitespace() || c == '/') {
        return bad("invalid host");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => bad("port must be 1-65535"),
        Ok(_) => Ok(()),
    }
}

/// Two listeners configured on the same address (port 0 means "any free port", never a clash).
fn address_clashes(
    tcp: Option<SocketAddr>,
    http: Option<SocketAddr>,
    cluster: SocketAddr,
) -> Vec<ConfigProblem> {
    let clash = |a: Option<SocketAddr>, b: Option<SocketAddr>| matches!((a, b), (Some(a), Some(b)) if a == b && a.port() != 0);
    let mut out = Vec::new();
    if clash(tcp, http) {
        out.push(problem("http.addr", "same address as listeners.tcp"));
    }
    if clash(tcp, Some(cluster)) {
        out.push(problem("cluster.addr", "same address as listeners.tcp"));
    }
    if clash(http, Some(cluster)) {
        out.push(problem("cluster.addr", "same address as http.addr"));
    }
    out
}

struct Checker<'a> {
    table: &'a Table,
    schema: &'a Table,
    problems: &'a mut Vec<ConfigProblem>,
    /// Top-level keys with type errors.
    broken: Vec<String>,
}

impl Checker<'_> {
    /// Deserializes the top-level `key` on its own. On failure, reports the error against each
    /// offending key of the section (trying each key alone over the section's defaults), or
    /// against the section itself, and returns the section with the offending keys at their
    /// defaults (so its other values can still be validated), if that deserializes.
    fn section<T: DeserializeOwned>(&mut self, key: &str) -> Option<T> {
        let value = self
            .table
            .get(key)
            .or_else(|| self.schema.get(key))?
            .clone();
        let err = match T::deserialize(value.clone()) {
            Ok(v) => return Some(v),
            Err(e) => e,
        };
        self.broken.push(key.to_owned());
        let (Value::Table(fields), Some(Value::Table(defaults))) = (&value, self.schema.get(key))
        else {
            self.problems.push(problem(key, message(&err)));
            return None;
        };
        let mut repaired = defaults.clone();
        let mut pinpointed = false;
        for (field, field_value) in fields {
            if !defaults.contains_key(field) && !docs::is_optional_key(&format!("{key}.{field}")) {
                pinpointed = true; // an unknown key, already reported by `unknown_keys`
                continue;
            }
            let mut probe = defaults.clone();
            probe.insert(field.clone(), field_value.clone());
            match T::deserialize(Value::Table(probe)) {
                Ok(_) => {
                    repaired.insert(field.clone(), field_value.clone());
                }
                Err(e) => {
                    self.problems
                        .push(problem(format!("{key}.{field}"), message(&e)));
                    pinpointed = true;
                }
            }
        }
        if !pinpointed {
            self.problems.push(problem(key, message(&err)));
            return None;
        }
        T::deserialize(Value::Table(repaired)).ok()
    }
}

/// Reports every key of `table` that is not in `schema` (nor a documented optional key).
fn unknown_keys(table: &Table, schema: &Table, prefix: &str, out: &mut Vec<ConfigProblem>) {
    for (key, value) in table {
        let path = format!("{prefix}{key}");
        match schema.get(key) {
            Some(Value::Table(s)) => {
                if let Value::Table(t) = value {
                    unknown_keys(t, s, &format!("{path}."), out);
                }
            }
            Some(_) => {}
            None if docs::is_optional_key(&path) => {}
            None => {
                let what = if value.is_table() {
                    "unknown section"
                } else {
                    "unknown key"
                };
                let optional = docs::optional_keys_under(prefix).map(|k| -> &str { k });
                let known = schema.keys().map(String::as_str).chain(optional);
                let hint = match closest(key, known) {
                    Some(k) => format!(" (did you mean `{prefix}{k}`?)"),
                    None => String::new(),
                };
                out.push(problem(path, format!("{what}{hint}")));
            }
        }
    }
}

/// The candidate closest to `word` by edit distance, if close enough to be a likely typo.
fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|c| (edit_distance(word, c), c))
        .filter(|(d, c)| *d <= (c.chars().count() / 3).max(1))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_host_port_forms_are_accepted() {
        for ok in [
            "broker-2:7946",
            "10.0.0.2:7946",
            "[::1]:7946",
            "node.example.com:1",
        ] {
            assert_eq!(check_host_port(ok), Ok(()), "{ok}");
        }
        for bad in [
            "broker",
            ":7946",
            "broker:",
            "broker:99999",
            "::1:7946",
            "a b:1",
        ] {
            assert!(check_host_port(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn typo_suggestions_only_for_close_names() {
        let keys = ["max_inflight", "max_qos", "retain_available"];
        assert_eq!(
            closest("max_inflght", keys.into_iter()),
            Some("max_inflight")
        );
        assert_eq!(closest("maxqos", keys.into_iter()), Some("max_qos"));
        assert_eq!(closest("color", keys.into_iter()), None);
        assert_eq!(
            closest("foo", ["log"].into_iter()),
            None,
            "short names need a closer match"
        );
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
