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

use crate::docs;
use raftmq_core::config::{ConfigProblem, MqttConfig};
use raftmq_server::auth::AuthConfig;
use raftmq_server::{DrainConfig, HttpConfig, LimitsConfig, ListenersConfig, TlsConfig};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

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
    /// This node's certificate chain (PEM) for mutual TLS between nodes; with `tls_key_file`
    /// and `tls_ca_file` it turns mTLS on for all cluster traffic.
    pub tls_cert_file: Option<PathBuf>,
    /// The private key of `tls_cert_file` (PEM).
    pub tls_key_file: Option<PathBuf>,
    /// CA certificates (PEM) every node's certificate must chain to.
    pub tls_ca_file: Option<PathBuf>,
    /// Tests only: a file describing a network partition between nodes (see the docs).
    pub faults_file: Option<PathBuf>,
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
            tls_cert_file: None,
            tls_key_file: None,
            tls_ca_file: None,
            faults_file: None,
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

/// One configuration layer above the file (environment or flags): a partial table, plus where
/// each key came from (so a problem with its value can name the variable or flag) and the
/// problems found while building it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Layer {
    /// The keys this layer sets.
    pub table: Table,
    /// Dotted key → what set it (`RAFTMQ_MQTT__MAX_INFLIGHT`, `--node-id`).
    pub sources: BTreeMap<String, String>,
    /// Problems found building the layer (unknown variables, say).
    pub problems: Vec<ConfigProblem>,
}

impl Layer {
    /// Sets the dotted `key` to `value`, remembering `source`.
    pub fn set(&mut self, key: &str, value: Value, source: impl Into<String>) {
        let path: Vec<&str> = key.split('.').collect();
        set_path(&mut self.table, &path, value);
        self.sources.insert(key.to_owned(), source.into());
    }
}

/// The default configuration as a table: the bottom layer, and the schema that keys of the
/// other layers are checked against.
pub fn default_table() -> Table {
    match Value::try_from(Config::default()) {
        Ok(Value::Table(t)) => t,
        // Cannot happen (every field serializes to a TOML value; a unit test covers it); an
        // empty schema would make every key "unknown", which is loud rather than silent.
        _ => Table::new(),
    }
}

/// Merges `top` into `base`: tables merge key by key, anything else replaces.
pub fn overlay(base: &mut Table, top: Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(t)) => overlay(b, t),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn set_path(table: &mut Table, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            table.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry((*first).to_owned())
                .or_insert_with(|| Value::Table(Table::new()));
            if !entry.is_table() {
                *entry = Value::Table(Table::new());
            }
            if let Value::Table(t) = entry {
                set_path(t, rest, value);
            }
        }
    }
}

/// Reads and parses a TOML config file (errors name the path).
pub fn read_file(path: &Path) -> anyhow::Result<Table> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    text.parse::<Table>()
        .with_context(|| format!("parsing config file {}", path.display()))
}

/// What a dotted key is, according to the default configuration and the documented optional
/// keys.
enum Slot<'a> {
    /// A key with a default value.
    Leaf(&'a Value),
    /// A key that is absent by default (an `Option` that defaults to `None`).
    Optional,
    /// A section (table) of keys.
    Section,
    Unknown,
}

fn lookup<'a>(schema: &'a Table, path: &[&str]) -> Slot<'a> {
    let mut table = schema;
    for (i, segment) in path.iter().enumerate() {
        match table.get(*segment) {
            Some(Value::Table(_)) if i + 1 == path.len() => return Slot::Section,
            Some(Value::Table(t)) => table = t,
            Some(v) if i + 1 == path.len() => return Slot::Leaf(v),
            _ => break,
        }
    }
    if docs::is_optional_key(&path.join(".")) {
        Slot::Optional
    } else {
        Slot::Unknown
    }
}

/// Parses an environment variable's value: as a TOML value when it is one (number, boolean,
/// array, quoted string, inline table), otherwise as the string itself. Date-times stay strings.
pub fn parse_env_value(raw: &str) -> Value {
    match raw.trim().parse::<Value>() {
        Ok(Value::Datetime(_)) | Err(_) => Value::String(raw.to_owned()),
        Ok(v) => v,
    }
}

/// Like [`parse_env_value`], guided by the default value of the key: a key whose default is a
/// string always takes the raw text (so `RAFTMQ_LOG__LEVEL=1` or a numeric-looking path is not
/// turned into a number), and a list key also accepts `a,b,c`.
fn env_value_for(raw: &str, default: Option<&Value>) -> Value {
    match default {
        Some(Value::String(_)) | None => Value::String(raw.to_owned()),
        Some(Value::Array(_)) => match parse_env_value(raw) {
            v @ Value::Array(_) => v,
            _ => Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_owned()))
                    .collect(),
            ),
        },
        Some(_) => parse_env_value(raw),
    }
}

/// The environment layer: every `RAFTMQ_<SECTION>__<KEY>` variable in `vars` (path segments
/// separated by a double underscore, e.g. `RAFTMQ_MQTT__MAX_INFLIGHT`, `RAFTMQ_NODE_ID`).
/// Variables naming no key are reported as problems keyed by the variable; other variables and
/// [`FLAG_ONLY_ENV_VARS`] are ignored.
pub fn env_layer<I>(vars: I) -> Layer
where
    I: IntoIterator<Item = (OsString, OsString)>,
{
    let schema = default_table();
    let mut layer = Layer::default();
    let mut vars: Vec<(OsString, OsString)> = vars.into_iter().collect();
    vars.sort();
    for (name, value) in vars {
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if FLAG_ONLY_ENV_VARS.contains(&name) {
            continue;
        }
        let problem = |problem: String| ConfigProblem {
            key: name.to_owned(),
            problem,
        };
        let lower = rest.to_ascii_lowercase();
        let path: Vec<&str> = lower.split("__").collect();
        let dotted = path.join(".");
        if path.iter().any(|s| s.is_empty()) {
            layer.problems.push(problem(format!(
                "not a setting (expected {ENV_PREFIX}<SECTION>__<KEY>, e.g. {ENV_PREFIX}MQTT__MAX_INFLIGHT)"
            )));
            continue;
        }
        let default = match lookup(&schema, &path) {
            Slot::Leaf(v) => Some(v),
            Slot::Optional => None,
            Slot::Section => {
                layer.problems.push(problem(format!(
                    "names the [{dotted}] section; set its keys one by one, e.g. {name}__<KEY>"
                )));
                continue;
            }
            Slot::Unknown => {
                layer.problems.push(problem(format!(
                    "unknown setting (there is no key `{dotted}`)"
                )));
                continue;
            }
        };
        let Ok(value) = value.into_string() else {
            layer
                .problems
                .push(problem("value is not valid UTF-8".to_owned()));
            continue;
        };
        layer.set(&dotted, env_value_for(&value, default), name);
    }
    layer
}

/// Merges the layers over the defaults and checks the result; problems with a value set by the
/// environment or a flag name the variable or flag.
pub fn resolve(file: Option<Table>, env: Layer, flags: Layer) -> Result<Config, InvalidConfig> {
    let mut table = default_table();
    if let Some(file) = file {
        overlay(&mut table, file);
    }
    let mut sources = env.sources;
    let mut problems = env.problems;
    overlay(&mut table, env.table);
    sources.extend(flags.sources);
    problems.extend(flags.problems);
    overlay(&mut table, flags.table);
    match Config::check(&table) {
        Ok(config) if problems.is_empty() => Ok(config),
        Ok(_) => Err(InvalidConfig(problems)),
        Err(found) => {
            problems.extend(found.into_iter().map(|mut p| {
                if let Some(source) = sources.get(&p.key) {
                    p.problem = format!("{} (set by {source})", p.problem);
                }
                p
            }));
            Err(InvalidConfig(problems))
        }
    }
}

/// Loads the configuration: defaults, then `file`, then the `RAFTMQ_*` variables in `env`, then
/// `flags`.
pub fn load<I>(file: Option<&Path>, env: I, flags: Layer) -> anyhow::Result<Config>
where
    I: IntoIterator<Item = (OsString, OsString)>,
{
    let file = file.map(read_file).transpose()?;
    Ok(resolve(file, env_layer(env), flags)?)
}

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
    use std::time::Duration;

    fn file(text: &str) -> Table {
        text.parse().expect("test TOML parses")
    }

    fn env(vars: &[(&str, &str)]) -> Layer {
        env_layer(
            vars.iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
    }

    fn check_file(text: &str) -> Result<Config, Vec<String>> {
        resolve(Some(file(text)), Layer::default(), Layer::default())
            .map_err(|e| e.0.iter().map(ToString::to_string).collect())
    }

    fn problems(text: &str) -> Vec<String> {
        match check_file(text) {
            Ok(c) => panic!("expected problems, got {c:?}"),
            Err(p) => p,
        }
    }

    #[test]
    fn default_table_checks_back_to_the_default_config() {
        let table = default_table();
        assert!(table.contains_key("mqtt") && table.contains_key("node_id"));
        assert_eq!(Config::check(&table), Ok(Config::default()));
    }

    #[test]
    fn later_layers_win_file_then_env_then_flags() {
        let f = file(
            "node_id = 2\ndata_dir = \"/file\"\n[mqtt]\nmax_inflight = 10\n[log]\nlevel = \"warn\"",
        );
        let e = || {
            env(&[
                ("RAFTMQ_NODE_ID", "3"),
                ("RAFTMQ_MQTT__MAX_INFLIGHT", "20"),
                ("RAFTMQ_DATA_DIR", "/env"),
            ])
        };
        let mut flags = Layer::default();
        flags.set("node_id", Value::Integer(4), "--node-id");

        let only_file =
            resolve(Some(f.clone()), Layer::default(), Layer::default()).expect("valid");
        assert_eq!((only_file.node_id, only_file.mqtt.max_inflight), (2, 10));
        assert_eq!(only_file.data_dir, PathBuf::from("/file"));

        let with_env = resolve(Some(f.clone()), e(), Layer::default()).expect("valid");
        assert_eq!((with_env.node_id, with_env.mqtt.max_inflight), (3, 20));
        assert_eq!(with_env.data_dir, PathBuf::from("/env"));
        assert_eq!(
            with_env.log.level, "warn",
            "keys no later layer sets keep the file's value"
        );

        let with_flags = resolve(Some(f), e(), flags).expect("valid");
        assert_eq!((with_flags.node_id, with_flags.mqtt.max_inflight), (4, 20));
    }

    #[test]
    fn keys_not_set_anywhere_keep_their_defaults() {
        let config = check_file("[mqtt]\nmax_qos = 1").expect("valid");
        assert_eq!(
            config.mqtt,
            MqttConfig {
                max_qos: 1,
                ..MqttConfig::default()
            }
        );
        assert_eq!(config.listeners, ListenersConfig::default());
    }

    #[test]
    fn unknown_key_in_file_is_reported_with_its_dotted_path() {
        let p = problems(
            "[mqtt]\nmax_inflihgt = 5\n[mqqt]\nx = 1\n[cluster]\nseeds = []\nbogus = true",
        );
        assert_eq!(
            p,
            [
                "cluster.bogus: unknown key",
                "mqqt: unknown section (did you mean `mqtt`?)",
                "mqtt.max_inflihgt: unknown key (did you mean `mqtt.max_inflight`?)",
            ]
        );
    }

    #[test]
    fn several_problems_are_all_reported_at_once() {
        let p = problems(
            "node_id = 0\nextra = 1\n\
             [listeners]\ntcp = \"not an address\"\n\
             [cluster]\nseeds = [\"ok:7946\", \"no-port\"]\n\
             [mqtt]\nmax_qos = 3\nmax_inflight = \"lots\"\nreceive_maximum = 0\n\
             [log]\nformat = \"xml\"",
        );
        let keys: Vec<&str> = p.iter().filter_map(|l| l.split(':').next()).collect();
        assert_eq!(
            keys,
            [
                "extra",
                "node_id",
                "listeners.tcp",
                "cluster.seeds",
                "mqtt.max_inflight",
                "mqtt.receive_maximum",
                "mqtt.max_qos",
                "log.format",
            ],
            "{p:#?}"
        );
    }

    #[test]
    fn every_type_error_in_one_section_is_reported_by_key() {
        let p =
            problems("[mqtt]\nmax_inflight = \"lots\"\nmax_qos = -1\nqueue_overflow = \"explode\"");
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(
            p[0].starts_with("mqtt.max_inflight: invalid type: string \"lots\""),
            "{}",
            p[0]
        );
        assert!(
            p[1].starts_with("mqtt.max_qos: invalid value: integer `-1`"),
            "{}",
            p[1]
        );
        assert!(
            p[2].starts_with("mqtt.queue_overflow: unknown variant `explode`"),
            "{}",
            p[2]
        );
    }

    #[test]
    fn partial_cluster_tls_names_the_missing_keys() {
        let p = problems("[cluster]\ntls_cert_file = \"node.crt\"");
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(
            p[0].starts_with("cluster.tls_key_file: required when cluster.tls_cert_file is set"),
            "{}",
            p[0]
        );
        assert!(
            p[1].starts_with("cluster.tls_ca_file: required"),
            "{}",
            p[1]
        );
        let p = problems("[cluster]\ntls_key_file = \"k\"\ntls_ca_file = \"\"");
        assert_eq!(p.len(), 2, "{p:#?}");
        assert!(
            p[0].starts_with("cluster.tls_cert_file: required"),
            "{}",
            p[0]
        );
        assert!(
            p[1].starts_with("cluster.tls_ca_file: must not be empty"),
            "{}",
            p[1]
        );
        let c = check_file(
            "[cluster]\ntls_cert_file = \"c\"\ntls_key_file = \"k\"\ntls_ca_file = \"ca\"",
        )
        .expect("complete cluster TLS");
        assert_eq!(
            c.cluster.tls_files(),
            Some((Path::new("c"), Path::new("k"), Path::new("ca")))
        );
        assert_eq!(Config::default().cluster.tls_files(), None);
    }

    #[test]
    fn a_backpressure_pause_longer_than_a_second_is_refused_by_key() {
        let p = problems("[mqtt]\nbackpressure_max_pause = \"2s\"");
        assert_eq!(
            p,
            [
                "mqtt.backpressure_max_pause: must be at most 1s (a paused client's keep alive must not run out)"
            ]
        );
        let c = check_file("[mqtt]\nbackpressure_max_pause = \"0s\"").expect("0s turns it off");
        assert!(c.mqtt.backpressure_max_pause.0.is_zero());
    }

    #[test]
    fn bad_duration_reports_its_key() {
        let p = problems("[mqtt]\nmax_keep_alive = \"10x\"");
        assert_eq!(
            p,
            ["mqtt.max_keep_alive: invalid unit `x` in `10x` (use ms, s, m, h, d)"]
        );
        let p = problems("[mqtt]\nmax_packet_size = \"1 parsec\"");
        assert_eq!(p.len(), 1);
        assert!(
            p[0].starts_with("mqtt.max_packet_size: invalid unit"),
            "{}",
            p[0]
        );
    }

    #[test]
    fn a_section_of_the_wrong_type_is_reported_by_its_name() {
        let p = problems("mqtt = 5\nnode_id = \"one\"");
        assert_eq!(p.len(), 2);
        assert!(
            p[0].starts_with("node_id: invalid type: string \"one\", expected u64"),
            "{}",
            p[0]
        );
        assert!(
            p[1].starts_with("mqtt: invalid type: integer `5`"),
            "{}",
            p[1]
        );
    }

    #[test]
    fn semantic_checks_name_their_keys() {
        let p = problems(
            "[cluster]\nadvertise_addr = \"::1:7946\"\nseeds = [\"a:0\"]\n[log]\nlevel = \"info,[[\"",
        );
        assert_eq!(p.len(), 3, "{p:#?}");
        assert!(
            p[0].starts_with("cluster.advertise_addr: `::1:7946` is not host:port"),
            "{}",
            p[0]
        );
        assert_eq!(
            p[1],
            "cluster.seeds: `a:0` is not host:port (port must be 1-65535)"
        );
        assert!(
            p[2].starts_with("log.level: `info,[[` is not a valid log filter"),
            "{}",
            p[2]
        );
        let p =
            problems("[listeners]\ntcp = \"127.0.0.1:9100\"\n[http]\naddr = \"127.0.0.1:9100\"");
        assert_eq!(p, ["http.addr: same address as listeners.tcp"]);
    }

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
    fn none_or_empty_disables_an_address() {
        let config = check_file("[listeners]\ntcp = \"none\"\n[http]\naddr = \"\"").expect("valid");
        assert_eq!((config.listeners.tcp, config.http.addr), (None, None));
        let config = resolve(
            None,
            env(&[("RAFTMQ_HTTP__ADDR", "NONE")]),
            Layer::default(),
        )
        .expect("valid");
        assert_eq!(config.http.addr, None);
        assert_eq!(config.listeners, ListenersConfig::default());
    }

    #[test]
    fn env_values_parse_as_toml_values_or_else_strings() {
        assert_eq!(parse_env_value("64"), Value::Integer(64));
        assert_eq!(parse_env_value("-3"), Value::Integer(-3));
        assert_eq!(parse_env_value("true"), Value::Boolean(true));
        assert_eq!(parse_env_value("1.5"), Value::Float(1.5));
        assert_eq!(
            parse_env_value("0.0.0.0:1884"),
            Value::String("0.0.0.0:1884".into())
        );
        assert_eq!(
            parse_env_value("/var/lib/raftmq"),
            Value::String("/var/lib/raftmq".into())
        );
        assert_eq!(
            parse_env_value("\"quoted\""),
            Value::String("quoted".into())
        );
        assert_eq!(
            parse_env_value("2024-01-01"),
            Value::String("2024-01-01".into())
        );
        assert_eq!(parse_env_value("1 = 2"), Value::String("1 = 2".into()));
        assert_eq!(
            parse_env_value("[\"a:1\", \"b:2\"]"),
            Value::Array(vec![
                Value::String("a:1".into()),
                Value::String("b:2".into())
            ])
        );
    }

    #[test]
    fn env_vars_map_to_keys_by_double_underscore() {
        let config = resolve(
            None,
            env(&[
                ("RAFTMQ_MQTT__MAX_INFLIGHT", "64"),
                ("RAFTMQ_MQTT__RETAIN_AVAILABLE", "false"),
                ("RAFTMQ_MQTT__MAX_KEEP_ALIVE", "90"),
                ("RAFTMQ_LISTENERS__TCP", "0.0.0.0:1884"),
                ("RAFTMQ_NODE_ID", "2"),
                ("RAFTMQ_DATA_DIR", "/data"),
                ("RAFTMQ_CLUSTER__SEEDS", "a:1, b:2"),
                ("RAFTMQ_CLUSTER__ADVERTISE_ADDR", "node-2:7946"),
                ("RAFTMQ_LOG__LEVEL", "debug"),
                ("HOME", "/root"),
            ]),
            Layer::default(),
        )
        .expect("valid");
        assert_eq!(config.mqtt.max_inflight, 64);
        assert!(!config.mqtt.retain_available);
        assert_eq!(config.mqtt.max_keep_alive.0, Duration::from_secs(90));
        assert_eq!(
            config.listeners.tcp,
            Some(SocketAddr::from(([0, 0, 0, 0], 1884)))
        );
        assert_eq!(config.node_id, 2);
        assert_eq!(config.data_dir, PathBuf::from("/data"));
        assert_eq!(config.cluster.seeds, ["a:1", "b:2"]);
        assert_eq!(
            config.cluster.advertise_addr.as_deref(),
            Some("node-2:7946")
        );
        assert_eq!(config.log.level, "debug");
    }

    #[test]
    fn string_keys_take_env_text_verbatim_and_lists_take_toml_arrays() {
        let config = resolve(
            None,
            env(&[
                ("RAFTMQ_DATA_DIR", "42"),
                ("RAFTMQ_CLUSTER__SEEDS", "[\"a:1\"]"),
            ]),
            Layer::default(),
        )
        .expect("valid");
        assert_eq!(config.data_dir, PathBuf::from("42"));
        assert_eq!(config.cluster.seeds, ["a:1"]);
    }

    #[test]
    fn unknown_env_vars_are_reported_by_name_but_flag_vars_are_not() {
        let layer = env(&[
            ("RAFTMQ_MQTT__MAX_INFLIHGT", "1"),
            ("RAFTMQ_MQTT", "x"),
            ("RAFTMQ_MQTT____X", "x"),
            ("RAFTMQ_MQTT_ADDR", "127.0.0.1:1883"),
            ("RAFTMQ_CONFIG", "/etc/raftmq.toml"),
            ("RAFTMQ_LOG_LEVEL", "debug"),
            ("RAFTMQ_SEEDS", "a:1"),
            ("RAFTMQ_NODE_ID", "7"),
        ]);
        let keys: Vec<&str> = layer.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "RAFTMQ_MQTT",
                "RAFTMQ_MQTT__MAX_INFLIHGT",
                "RAFTMQ_MQTT____X"
            ]
        );
        assert_eq!(
            layer.problems[1].problem,
            "unknown setting (there is no key `mqtt.max_inflihgt`)"
        );
        assert_eq!(layer.table, file("node_id = 7"));
        let err = resolve(None, layer, Layer::default()).expect_err("unknown vars are errors");
        assert_eq!(err.0.len(), 3);
    }

    #[test]
    fn bad_values_from_env_or_flags_name_their_source() {
        let mut flags = Layer::default();
        flags.set("log.format", Value::String("yaml".into()), "--log-format");
        let err =
            resolve(None, env(&[("RAFTMQ_MQTT__MAX_INFLIGHT", "lots")]), flags).expect_err("bad");
        let lines: Vec<String> = err.0.iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 2);
        assert!(
            lines[0].starts_with("mqtt.max_inflight: invalid type"),
            "{}",
            lines[0]
        );
        assert!(
            lines[0].ends_with("(set by RAFTMQ_MQTT__MAX_INFLIGHT)"),
            "{}",
            lines[0]
        );
        assert!(lines[1].ends_with("(set by --log-format)"), "{}", lines[1]);
    }

    #[test]
    fn invalid_config_lists_one_problem_per_line() {
        let err = resolve(
            Some(file("node_id = 0\n[mqtt]\nmax_qos = 9")),
            Layer::default(),
            Layer::default(),
        )
        .expect_err("bad");
        assert_eq!(
            err.to_string(),
            "invalid configuration (2 problems)\n  node_id: must be at least 1\n  mqtt.max_qos: must be 0, 1 or 2"
        );
    }

    #[test]
    fn unreadable_or_malformed_files_are_errors_naming_the_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing.toml");
        let err = load(Some(&missing), [], Layer::default()).expect_err("missing file");
        assert!(
            format!("{err:#}").starts_with(&format!("reading config file {}: ", missing.display()))
        );

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "[mqtt\nmax_qos = 1").expect("write");
        let err = load(Some(&bad), [], Layer::default()).expect_err("bad TOML");
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with(&format!("parsing config file {}: ", bad.display())),
            "{msg}"
        );
        assert!(msg.contains("line 1"), "{msg}");
    }

    #[test]
    fn example_config_file_has_no_problems() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/config/raftmq.toml");
        let table = read_file(&path).expect("example config is readable TOML");
        let config = Config::check(&table).unwrap_or_else(|p| panic!("{p:#?}"));
        assert_ne!(
            config,
            Config::default(),
            "the example sets production values"
        );
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

    #[test]
    fn transport_and_limit_problems_name_their_keys() {
        let p = problems(
            "[listeners]\nws_path = \"mqtt\"\nhandshake_timeout = \"0s\"\n\
             tls = \"127.0.0.1:8883\"\nwss = \"127.0.0.1:8883\"\n\
             [tls]\nclient_auth = \"required\"\n\
             [limits]\nwrite_stall_timeout = \"0s\"",
        );
        assert_eq!(p.len(), 5, "{p:?}");
        for key in [
            "listeners.ws_path",
            "listeners.handshake_timeout",
            "listeners.wss",
            "tls.ca_file",
            "limits.write_stall_timeout",
        ] {
            assert!(p.iter().any(|m| m.starts_with(key)), "{key} not in {p:?}");
        }
        let p = problems("[tls]\nclient_auth = \"sometimes\"\nmin_version = \"1.1\"");
        assert!(p.iter().any(|m| m.starts_with("tls.client_auth")), "{p:?}");
        assert!(p.iter().any(|m| m.starts_with("tls.min_version")), "{p:?}");
        let config = check_file(
            "[listeners]\nws = \"127.0.0.1:8083\"\nproxy_protocol = [\"tcp\", \"ws\"]\n\
             [limits]\nmax_memory = \"2GiB\"\nconnect_rate = 100",
        )
        .expect("valid");
        assert_eq!(config.limits.max_memory.0, 2 << 30);
        assert_eq!(config.listeners.proxy_protocol.len(), 2);
    }
}
