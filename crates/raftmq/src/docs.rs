//! What each configuration key means, in one place: `raftmq config default` prints these as
//! comments above the keys, and tests make sure every key of the configuration has one.

use crate::config::default_table;
use toml::Value;

/// The documentation of one configuration key (or section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyDoc {
    /// Dotted path (`mqtt.max_qos`), or a section name (`mqtt`).
    pub key: &'static str,
    /// What it means (one paragraph; wrapped when printed).
    pub doc: &'static str,
    /// For a key absent by default (an optional value): an example value, as TOML, printed
    /// commented out.
    pub example: Option<&'static str>,
}

const fn key(key: &'static str, doc: &'static str) -> KeyDoc {
    KeyDoc {
        key,
        doc,
        example: None,
    }
}

const fn optional(key: &'static str, doc: &'static str, example: &'static str) -> KeyDoc {
    KeyDoc {
        key,
        doc,
        example: Some(example),
    }
}

/// Every key and section, in the order `config default` prints them (top-level keys first, then
/// each section followed by its keys).
pub const KEYS: &[KeyDoc] = &[
    key(
        "node_id",
        "This node's id in the cluster: a positive integer, unique among the nodes.",
    ),
    key(
        "data_dir",
        "Directory where the node keeps its state (Raft log, sessions, retained messages). \
         Created at startup if missing.",
    ),
    key(
        "bridges",
        "Bridges to other MQTT brokers, one [[bridges]] table each (name, address, forward and \
         subscribe filters, QoS, prefixes, credentials, TLS): the broker connects to each as a \
         client and passes messages both ways, queueing QoS 1/2 while the remote broker is \
         away. In a cluster the Raft leader runs them. Every key, its default and the \
         guarantees: docs/bridges.md. Empty: no bridges.",
    ),
    key("listeners", "MQTT listeners."),
    key(
        "listeners.tcp",
        "Address of the plain TCP MQTT listener, \"host:port\"; \"none\" disables it. \
         Who may connect is set in [auth]; by default (no password file) clients connect \
         anonymously: bind to a loopback address or firewall the port unless the network is \
         trusted.",
    ),
    optional(
        "listeners.tls",
        "Address of the MQTT over TLS listener (usually port 8883); needs tls.cert_file and \
         tls.key_file. Absent: disabled.",
        "\"0.0.0.0:8883\"",
    ),
    optional(
        "listeners.ws",
        "Address of the MQTT over WebSocket listener (usually port 8083), for browser clients. \
         Absent: disabled.",
        "\"0.0.0.0:8083\"",
    ),
    optional(
        "listeners.wss",
        "Address of the MQTT over secure WebSocket listener (usually port 8084); uses the [tls] \
         certificates. Absent: disabled.",
        "\"0.0.0.0:8084\"",
    ),
    key(
        "listeners.ws_path",
        "HTTP path of the WebSocket endpoints; other paths get 404. The \"mqtt\" subprotocol is \
         negotiated.",
    ),
    key(
        "listeners.proxy_protocol",
        "Listeners (\"tcp\", \"tls\", \"ws\", \"wss\") behind a load balancer that sends a PROXY \
         protocol v1 or v2 header: the address in it is the client's address for logs, \
         authentication and limits; connections without a valid header are closed.",
    ),
    key(
        "listeners.handshake_timeout",
        "Time a new connection gets for its PROXY header and its TLS and WebSocket handshakes.",
    ),
    key(
        "tls",
        "Certificates of the TLS and secure WebSocket listeners. The files are reloaded without a \
         restart when they change, and on SIGHUP.",
    ),
    optional(
        "tls.cert_file",
        "PEM file with the server certificate chain, leaf first.",
        "\"/etc/raftmq/tls/server.crt\"",
    ),
    optional(
        "tls.key_file",
        "PEM file with the server's private key (PKCS#8, PKCS#1 or SEC1).",
        "\"/etc/raftmq/tls/server.key\"",
    ),
    optional(
        "tls.ca_file",
        "PEM file with the CA certificates client certificates must chain to (needed when \
         client_auth is not \"none\").",
        "\"/etc/raftmq/tls/ca.crt\"",
    ),
    key(
        "tls.client_auth",
        "Client certificates: \"none\" (not asked for), \"optional\" (verified when sent) or \
         \"required\" (mutual TLS: handshakes without a valid certificate fail).",
    ),
    key(
        "tls.min_version",
        "Lowest TLS version accepted: \"1.2\" or \"1.3\".",
    ),
    key(
        "tls.identity",
        "What of a verified client certificate is passed to authentication as the certificate \
         identity: \"cn\" (subject Common Name), \"subject\" (the whole subject, RFC 4514, e.g. \
         \"CN=device-1,O=Example\") or \"none\".",
    ),
    key(
        "tls.reload_interval",
        "How often the certificate files are checked for changes; \"0s\" disables polling \
         (SIGHUP still reloads).",
    ),
    key("limits", "Connection limits and overload protection."),
    key(
        "limits.max_connections",
        "Most open client connections on this node; 0 = unlimited. Beyond it, CONNECT is refused \
         with CONNACK 0x97 quota exceeded (MQTT 3.x: 3 server unavailable).",
    ),
    key(
        "limits.max_connections_per_listener",
        "Most open client connections on each listener; 0 = unlimited. Refused like \
         max_connections.",
    ),
    key(
        "limits.connect_rate",
        "New connections accepted per second on each listener (token bucket); 0 = unlimited. \
         Beyond it, CONNECT is refused with CONNACK 0x9F connection rate exceeded.",
    ),
    key(
        "limits.connect_burst",
        "Connections a listener accepts at once before connect_rate applies (the token bucket's \
         size); 0 = connect_rate.",
    ),
    key(
        "limits.write_stall_timeout",
        "A client that accepts none of the broker's bytes for this long is disconnected; its \
         connection never buffers more than one write batch meanwhile.",
    ),
    key(
        "limits.max_memory",
        "Resident memory of the process above which new connections are refused with CONNACK \
         0x89 server busy (checked every second); \"0B\" = off. Set it below the container's \
         memory limit.",
    ),
    key(
        "limits.max_queued_messages",
        "Messages queued in all sessions of this node above which new connections are refused \
         with CONNACK 0x89 server busy; 0 = off.",
    ),
    key(
        "http",
        "The HTTP endpoint: Prometheus metrics (/metrics), health (/healthz, /readyz), admin API.",
    ),
    key(
        "http.addr",
        "Address of the HTTP endpoint, \"host:port\"; \"none\" disables it.",
    ),
    optional(
        "http.admin_token",
        "Bearer token the admin API (/api/v1/...) requires (`Authorization: Bearer <token>`); \
         unset leaves the admin API open to anyone who can reach the HTTP port (a warning is \
         logged when that port is not loopback). /metrics, /healthz and /readyz never need it. \
         Prefer the environment variable RAFTMQ_HTTP__ADMIN_TOKEN to a file.",
        "\"change-me\"",
    ),
    key(
        "drain",
        "Draining: how a node hands its clients off before it stops (POST /api/v1/drain, \
         `raftmq ctl drain`, and SIGTERM).",
    ),
    key(
        "drain.timeout",
        "Longest a drain waits for connections to finish in-flight work (acknowledgements \
         waiting for a commit, queued bytes) before closing them anyway.",
    ),
    optional(
        "drain.server_reference",
        "Server Reference sent to MQTT 5 clients with DISCONNECT 0x9C (Use another server) when \
         draining, e.g. the address of a load balancer in front of the other nodes; unset: \
         DISCONNECT 0x8B (Server shutting down). MQTT 3.1.1 clients are simply disconnected.",
        "\"mqtt.example.com:1883\"",
    ),
    key("cluster", "Cluster membership."),
    key(
        "cluster.addr",
        "Address the cluster listener (Raft and membership traffic between nodes) binds.",
    ),
    optional(
        "cluster.advertise_addr",
        "\"host:port\" other nodes use to reach this one, when it differs from `addr` (NAT, \
         containers, 0.0.0.0). Defaults to `addr`.",
        "\"raftmq-1.example.internal:7946\"",
    ),
    key(
        "cluster.seeds",
        "\"host:port\" of nodes to contact when joining a cluster; empty for a single node.",
    ),
    key(
        "cluster.shards",
        "Number of data shards (1 to 1024): the durable state is split into this many Raft \
         groups, every node a replica of each. Fixed when the cluster is created: the first \
         start records it in the data dir, and a node started with another value is refused \
         (as is a node joining a cluster created with another value). A data dir written before \
         the key existed has 1. Sessions live in the shard of their client id, retained \
         messages in the shard of their topic, and a message for persistent sessions is stored \
         once in each shard holding one of them (see docs/cluster.md). Every node is still a \
         replica of every shard, so more shards do not yet reduce the work per node. More than \
         1 is a preview: not yet proven under failures (docs/reliability.md); keep 1 in \
         production.",
    ),
    key(
        "cluster.quiesce_idle_shards",
        "With cluster.shards > 1: a shard other than shard 1 with nothing written for 2 s stops \
         its Raft heartbeats (its followers stop their election timers) until something is \
         written, and every node sends a small heartbeat to each peer every 500 ms instead, so \
         an idle cluster's work does not grow with the number of shards. A quiet shard whose \
         leader's node falls silent elects a new leader in about 2.5 to 5 s. false keeps every \
         shard's heartbeats (for comparison, or if quiescence misbehaves). Set it the same on \
         every node.",
    ),
    optional(
        "cluster.tls_cert_file",
        "PEM file with this node's certificate chain, leaf first, for mutual TLS between nodes. \
         Setting it, tls_key_file and tls_ca_file (all three or none) makes the cluster port \
         serve only TLS to peers with a certificate from tls_ca_file, and every connection to a \
         peer present this certificate and verify the peer's. The certificate must name, as a \
         DNS or IP subject alternative name, the host of this node's advertise_addr (peers check \
         it) and is used as both server and client certificate. Unset: plain gRPC, no \
         authentication. Not reloaded: restart to rotate.",
        "\"/etc/raftmq/cluster-tls/tls.crt\"",
    ),
    optional(
        "cluster.tls_key_file",
        "PEM file with the private key of cluster.tls_cert_file (PKCS#8, PKCS#1 or SEC1).",
        "\"/etc/raftmq/cluster-tls/tls.key\"",
    ),
    optional(
        "cluster.tls_ca_file",
        "PEM file with the CA certificates every node's cluster certificate must chain to.",
        "\"/etc/raftmq/cluster-tls/ca.crt\"",
    ),
    optional(
        "cluster.faults_file",
        "For tests only, never in production: a file describing a network partition between \
         cluster nodes, re-read every 100 ms. One side per line, node ids separated by spaces or \
         commas; nodes on different lines cannot reach each other (Raft and forwarding traffic \
         both ways), nodes on no line reach everyone, an empty or missing file is a healthy \
         network. Client connections are not affected. Every node of a test cluster reads the \
         same file.",
        "\"/tmp/raftmq-test/faults\"",
    ),
    optional(
        "cluster.disk_faults_file",
        "For tests only, never in production: a file that makes this node's disk slow, re-read \
         at most every 100 ms. While it exists and holds a number of milliseconds (at most \
         30000), every sync of the Raft log (the WAL syncer's fsync, which appends, votes, \
         truncations and purges wait for) takes that much longer, as if the fsync stalled; a missing or empty file, or anything but a number, is \
         a healthy disk. Each node reads its own file.",
        "\"/tmp/raftmq-test/disk-n1\"",
    ),
    key("mqtt", "MQTT protocol and session settings."),
    key(
        "mqtt.max_packet_size",
        "Largest packet the broker accepts (64B to 256MiB); announced to MQTT 5 clients as Maximum \
         Packet Size.",
    ),
    key(
        "mqtt.receive_maximum",
        "How many QoS 1/2 PUBLISH a client may have unacknowledged towards the broker (Receive \
         Maximum announced in CONNACK).",
    ),
    key(
        "mqtt.max_inflight",
        "Most messages in flight (sent, not yet acknowledged) towards one client; the client's own \
         Receive Maximum lowers it further.",
    ),
    key(
        "mqtt.max_queued_messages",
        "Messages queued per session beyond those in flight (online or offline).",
    ),
    key(
        "mqtt.queue_overflow",
        "What to do when a session's queue is full: \"drop-new\" drops the arriving message, \
         \"drop-oldest\" drops the oldest queued one (both are counted).",
    ),
    key(
        "mqtt.queue_qos0_offline",
        "Queue QoS 0 messages for offline persistent sessions.",
    ),
    key(
        "mqtt.backpressure_max_pause",
        "Backpressure from slow subscribers: once a connected subscriber's queue holds half of \
         mqtt.max_queued_messages, a client publishing to it is not read from until that queue \
         is down to a quarter, for at most this long; then the subscriber counts as stalled (no \
         publisher waits for it again until its queue drains) and its full queue drops, counted. \
         At most 1s; \"0s\" turns backpressure off.",
    ),
    key(
        "mqtt.topic_alias_maximum",
        "Topic Alias Maximum announced to MQTT 5 clients; 0 disables client-to-server aliases.",
    ),
    key(
        "mqtt.max_session_expiry",
        "Cap on the session expiry interval a client may ask for; \"0s\" means no cap. At most \
         4294967295s.",
    ),
    key(
        "mqtt.max_keep_alive",
        "Largest keep alive accepted (at most 65535s); a larger or zero client keep alive is \
         replaced by this value, sent to MQTT 5 clients as Server Keep Alive. \"0s\" accepts what \
         the client asks.",
    ),
    key("mqtt.max_qos", "Highest QoS the broker grants: 0, 1 or 2."),
    key(
        "mqtt.retain_available",
        "Whether retained messages are supported.",
    ),
    key(
        "mqtt.wildcard_subscriptions",
        "Whether wildcard subscriptions (+ and #) are allowed.",
    ),
    key(
        "mqtt.shared_subscriptions",
        "Whether shared subscriptions ($share/group/filter) are allowed.",
    ),
    key(
        "mqtt.subscription_identifiers",
        "Whether MQTT 5 subscription identifiers are supported.",
    ),
    key(
        "mqtt.shared_strategy",
        "How a shared subscription group picks the member that gets a message: \"round-robin\" or \
         \"random\".",
    ),
    key(
        "mqtt.allow_empty_client_id",
        "Accept an empty client id and assign one (MQTT 3.1.1 clients must then ask for a clean \
         session).",
    ),
    key(
        "mqtt.max_topic_length",
        "Longest topic name or filter, in bytes (1 to 65535).",
    ),
    key(
        "mqtt.max_topic_levels",
        "Most /-separated levels in a topic name or filter.",
    ),
    key(
        "mqtt.max_subscriptions_per_client",
        "Most subscriptions one session may hold; 0 = unlimited.",
    ),
    key(
        "mqtt.max_retained_messages",
        "Most retained messages the broker stores; 0 = unlimited. Retained messages on new topics \
         beyond it are refused.",
    ),
    key(
        "mqtt.sys_interval",
        "How often broker statistics are published as retained $SYS/broker/... messages; \"0s\" \
         disables them.",
    ),
    key(
        "mqtt.index_shards",
        "Number of shards of the subscription index (1 to 1024).",
    ),
    key(
        "mqtt.max_retained_bytes",
        "Most payload bytes of retained messages the broker stores; \"0B\" = unlimited. A \
         retained message that would go beyond it is not stored (it is still delivered, and \
         counted in raftmq_limits_exceeded_total{limit=\"retained_bytes\"}).",
    ),
    key(
        "mqtt.max_publish_rate",
        "Most PUBLISH packets per second one client may send (bursts up to one second's worth); \
         0 = unlimited. A client over it is disconnected: MQTT 5 clients get DISCONNECT 0x96 \
         Message rate too high, 3.1.1 clients a closed connection.",
    ),
    key(
        "mqtt.max_publish_bandwidth",
        "Most topic and payload bytes per second one client may publish (bursts up to one \
         second's worth); \"0B\" = unlimited. A client over it is disconnected: MQTT 5 clients \
         get DISCONNECT 0x97 Quota exceeded, 3.1.1 clients a closed connection.",
    ),
    key(
        "auth",
        "Authentication and authorization (see docs/security.md). A fresh install has no \
         password file and accepts anonymous clients; configuring a password file, a callout, \
         JWT keys or SCRAM credentials turns anonymous access off unless allow_anonymous = \
         true.",
    ),
    optional(
        "auth.allow_anonymous",
        "Accept clients that send no user name (refused otherwise with CONNACK 0x87 / 3.1.1: \
         5). Unset: true when none of password_file, callout_url, jwt_secret_file, \
         jwt_jwks_file and scram_file is set, false otherwise.",
        "true",
    ),
    optional(
        "auth.password_file",
        "File of \"username:argon2id-hash\" lines (manage it with `raftmq passwd FILE USER`). \
         Reloaded when it changes or on SIGHUP; a bad file keeps the previous one.",
        "\"/etc/raftmq/passwd\"",
    ),
    optional(
        "auth.acl_file",
        "ACL file (allow/deny publish/subscribe rules per user, client id or for all, first \
         match wins, no match denies). Unset: every authenticated client may do everything. \
         Reloaded like the password file.",
        "\"/etc/raftmq/acl\"",
    ),
    key(
        "auth.use_cert_identity",
        "Use the identity of a verified TLS client certificate as the user name; such clients \
         need no password.",
    ),
    key(
        "auth.reload_interval",
        "How often the password, ACL, JWT key and SCRAM files are checked for changes; \"0s\" \
         reloads only on SIGHUP.",
    ),
    key(
        "auth.cache_size",
        "Most recent authentication decisions remembered (keyed by a keyed hash, never the \
         password), so reconnect storms do not rehash; 0 disables the cache.",
    ),
    key(
        "auth.cache_ttl",
        "How long a remembered authentication decision is reused.",
    ),
    key(
        "auth.max_concurrent_hashes",
        "Most password hashes verified at once (each Argon2id check takes about 19 MiB and tens \
         of milliseconds on a blocking thread); more connections wait their turn.",
    ),
    optional(
        "auth.callout_url",
        "http://host:port/path of an external authentication service, asked (POST JSON) about \
         user names not in the password file.",
        "\"http://127.0.0.1:8080/mqtt/auth\"",
    ),
    key(
        "auth.callout_timeout",
        "How long the authentication callout may take (at most 10s); a slower answer refuses \
         the client (CONNACK 0x87 / 3.1.1: 5).",
    ),
    optional(
        "auth.jwt_secret_file",
        "File with the shared secret of HS256/HS384/HS512 JSON Web Tokens (at least 32 bytes; \
         trailing white space ignored). A CONNECT password shaped like a JWT is then validated \
         as a token (exp required; invalid: CONNACK 0x86 / 3.1.1: 4) and the connection is \
         closed when it expires (MQTT 5: DISCONNECT 0xA0). Reloaded like the password file.",
        "\"/etc/raftmq/jwt.secret\"",
    ),
    optional(
        "auth.jwt_jwks_file",
        "JWKS document (JSON {\"keys\": [...]}) with the public keys of RS256/384/512, \
         PS256/384/512, ES256/384 and EdDSA tokens; a token's kid picks the key. Reloaded like \
         the password file.",
        "\"/etc/raftmq/jwks.json\"",
    ),
    key(
        "auth.jwt_username_claim",
        "The token claim that names the user (the user name of %u in ACL rules); a token \
         without it is refused.",
    ),
    optional(
        "auth.jwt_acl_claim",
        "Token claim with the connection's own permissions, {\"pub\": [filters], \"sub\": \
         [filters]}, which then replace the ACL file for it. Unset, or absent from a token: \
         the ACL file applies.",
        "\"mqtt\"",
    ),
    key(
        "auth.jwt_leeway",
        "Tolerance for clock differences with the token issuer when checking exp and nbf (at \
         most 5m); a connection stays open until exp plus this.",
    ),
    optional(
        "auth.jwt_audience",
        "Required aud claim of tokens.",
        "\"mqtt\"",
    ),
    optional(
        "auth.jwt_issuer",
        "Required iss claim of tokens.",
        "\"https://id.example.com\"",
    ),
    optional(
        "auth.scram_file",
        "SCRAM credentials file (\"username:SCRAM-SHA-256$...\" lines; manage it with \
         `raftmq passwd --scram FILE USER`): MQTT 5 clients may then authenticate with the \
         enhanced authentication methods SCRAM-SHA-256 and SCRAM-SHA-512. Reloaded like the \
         password file.",
        "\"/etc/raftmq/scram\"",
    ),
    key("log", "Logging (to standard error)."),
    key(
        "log.format",
        "\"text\" for human-readable lines, \"json\" for one JSON object per line.",
    ),
    key(
        "log.level",
        "Which events to log: a level (error, warn, info, debug, trace) or a tracing EnvFilter \
         directive such as \"info,raftmq_server=debug\". RUST_LOG, when set, overrides it.",
    ),
];

/// The documentation of a dotted key or section.
pub fn doc(key: &str) -> Option<&'static KeyDoc> {
    KEYS.iter().find(|d| d.key == key)
}

/// Whether `key` is a documented optional key (absent from the default configuration).
pub fn is_optional_key(key: &str) -> bool {
    doc(key).is_some_and(|d| d.example.is_some())
}

/// The names (last path segment) of the optional keys directly under `prefix` (`""` for the top
/// level, `"cluster."` for the cluster section).
pub fn optional_keys_under(prefix: &str) -> impl Iterator<Item = &'static str> + '_ {
    KEYS.iter()
        .filter(|d| d.example.is_some())
        .filter_map(move |d| d.key.strip_prefix(prefix))
        .filter(|rest| !rest.contains('.'))
}

const HEADER: &str = "\
# raftmq configuration, with every key at its default value.
#
# Precedence, lowest first: defaults, this file (--config FILE or RAFTMQ_CONFIG), environment
# variables, command-line flags. Any key can be set from the environment as
# RAFTMQ_<SECTION>__<KEY> (RAFTMQ_MQTT__MAX_INFLIGHT=64, RAFTMQ_LISTENERS__TCP=0.0.0.0:1884)
# or, at the top level, RAFTMQ_<KEY> (RAFTMQ_NODE_ID=2).
#
# Durations: \"250ms\", \"30s\", \"5m\", \"2h\", \"7d\", \"1h30m\" (a bare number is seconds).
# Sizes: \"512B\", \"64KiB\", \"1MiB\", \"1GiB\" (KB, MB, GB are powers of 1000; a bare number is bytes).
";

const WIDTH: usize = 98;

fn push_comment(out: &mut String, text: &str) {
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > WIDTH {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
}

fn push_key(out: &mut String, name: &str, doc: Option<&KeyDoc>, value: Option<&Value>) {
    push_comment(out, doc.map_or("(undocumented)", |d| d.doc));
    match (value, doc.and_then(|d| d.example)) {
        (Some(v), _) => out.push_str(&format!("{name} = {v}\n")),
        (None, Some(example)) => out.push_str(&format!("# {name} = {example}\n")),
        (None, None) => {}
    }
}

/// The full default configuration as TOML, each key preceded by a comment saying what it means
/// (optional keys commented out, with an example value).
pub fn default_config_toml() -> String {
    let defaults = default_table();
    let mut out = String::from(HEADER);
    // Top-level keys must come before the first [section].
    for d in KEYS.iter().filter(|d| !d.key.contains('.')) {
        match defaults.get(d.key) {
            Some(Value::Table(_)) => {}
            value => {
                out.push('\n');
                push_key(&mut out, d.key, Some(d), value);
            }
        }
    }
    for d in KEYS.iter().filter(|d| !d.key.contains('.')) {
        let Some(Value::Table(section)) = defaults.get(d.key) else {
            continue;
        };
        out.push('\n');
        push_comment(&mut out, d.doc);
        out.push_str(&format!("[{}]\n", d.key));
        let prefix = format!("{}.", d.key);
        for k in KEYS.iter().filter(|k| {
            k.key
                .strip_prefix(&prefix)
                .is_some_and(|rest| !rest.contains('.'))
        }) {
            let name = &k.key[prefix.len()..];
            push_key(&mut out, name, Some(k), section.get(name));
        }
        // Keys missing from the table above still get printed (the docs test then fails).
        for (name, value) in section {
            if doc(&format!("{prefix}{name}")).is_none() {
                push_key(&mut out, name, None, Some(value));
            }
        }
    }
    out
}

/// The configuration reference as Markdown tables (one per section): key, default, meaning.
/// `docs/configuration.md` embeds it between markers; a test keeps the two identical.
pub fn markdown_reference() -> String {
    let defaults = default_table();
    let lookup = |key: &str| -> Option<Value> {
        let mut v = Value::Table(defaults.clone());
        for part in key.split('.') {
            v = v.as_table()?.get(part)?.clone();
        }
        Some(v)
    };
    let cell = |d: &KeyDoc| match (lookup(d.key), d.example) {
        (Some(v), _) => format!("`{v}`"),
        (None, Some(example)) => format!("unset (e.g. `{example}`)"),
        (None, None) => "unset".to_string(),
    };
    let mut out = String::new();
    let top: Vec<&KeyDoc> = KEYS
        .iter()
        .filter(|d| !d.key.contains('.') && !matches!(lookup(d.key), Some(Value::Table(_))))
        .collect();
    out.push_str("### Top level\n\n| Key | Default | Meaning |\n|---|---|---|\n");
    for d in top {
        out.push_str(&format!("| `{}` | {} | {} |\n", d.key, cell(d), d.doc));
    }
    for section in KEYS
        .iter()
        .filter(|d| matches!(lookup(d.key), Some(Value::Table(_))))
    {
        out.push_str(&format!(
            "\n### `[{}]`\n\n{}\n\n| Key | Default | Meaning |\n|---|---|---|\n",
            section.key, section.doc
        ));
        let prefix = format!("{}.", section.key);
        for k in KEYS.iter().filter(|k| k.key.starts_with(&prefix)) {
            out.push_str(&format!("| `{}` | {} | {} |\n", k.key, cell(k), k.doc));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const BEGIN: &str = "<!-- BEGIN GENERATED REFERENCE -->\n";
    const END: &str = "<!-- END GENERATED REFERENCE -->";

    /// `docs/configuration.md` must carry the current reference. Regenerate it with
    /// `RAFTMQ_BLESS=1 cargo test -p raftmq docs_configuration_reference_is_current`.
    #[test]
    fn docs_configuration_reference_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/configuration.md");
        let text = std::fs::read_to_string(path).expect("read docs/configuration.md");
        let start = text.find(BEGIN).expect("begin marker") + BEGIN.len();
        let end = text.find(END).expect("end marker");
        let expected = markdown_reference();
        if std::env::var_os("RAFTMQ_BLESS").is_some() {
            let updated = format!("{}{}{}", &text[..start], expected, &text[end..]);
            std::fs::write(path, updated).expect("write docs/configuration.md");
            return;
        }
        assert!(
            text[start..end] == expected,
            "docs/configuration.md is out of date: run RAFTMQ_BLESS=1 cargo test -p raftmq docs_configuration_reference_is_current"
        );
    }
    use toml::Table;

    /// Every dotted path of the table, sections included.
    fn paths(table: &Table, prefix: &str, out: &mut Vec<String>) {
        for (k, v) in table {
            let path = format!("{prefix}{k}");
            if let Value::Table(t) = v {
                paths(t, &format!("{path}."), out);
            }
            out.push(path);
        }
    }

    #[test]
    fn every_default_key_is_documented() {
        let mut all = Vec::new();
        paths(&default_table(), "", &mut all);
        assert!(all.len() > 20, "{all:?}");
        let undocumented: Vec<&String> = all
            .iter()
            .filter(|k| doc(k).is_none_or(|d| d.doc.trim().is_empty()))
            .collect();
        assert!(
            undocumented.is_empty(),
            "add these keys to docs::KEYS: {undocumented:?}"
        );
    }

    /// Optional keys that are only valid all together (each group within one section).
    const SET_TOGETHER: &[&[&str]] = &[&[
        "cluster.tls_cert_file",
        "cluster.tls_key_file",
        "cluster.tls_ca_file",
    ]];

    #[test]
    fn every_documented_key_exists() {
        let mut all = Vec::new();
        paths(&default_table(), "", &mut all);
        for d in KEYS {
            if all.iter().any(|k| k == d.key) {
                assert!(
                    d.example.is_none(),
                    "{}: has a default, needs no example",
                    d.key
                );
                continue;
            }
            // An optional key: its example must be accepted and change the configuration.
            let example = d
                .example
                .unwrap_or_else(|| panic!("{}: documented but not a key", d.key));
            let (section, name) = d.key.split_once('.').unwrap_or(("", d.key));
            let mut text = if section.is_empty() {
                format!("{name} = {example}")
            } else {
                format!("[{section}]\n{name} = {example}")
            };
            // Keys valid only together get their companions (same section) too.
            for group in SET_TOGETHER.iter().filter(|g| g.contains(&d.key)) {
                for other in group.iter().filter(|k| **k != d.key) {
                    let (_, other_name) = other.split_once('.').expect("a section key");
                    let other_example = doc(other).and_then(|o| o.example).expect("example");
                    text.push_str(&format!("\n{other_name} = {other_example}"));
                }
            }
            let table: Table = text.parse().expect("example is TOML");
            let config = Config::check(&table).unwrap_or_else(|p| panic!("{}: {p:?}", d.key));
            assert_ne!(config, Config::default(), "{}", d.key);
        }
        let mut keys: Vec<&str> = KEYS.iter().map(|d| d.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), KEYS.len(), "duplicate entries in docs::KEYS");
    }

    #[test]
    fn config_default_output_reparses_to_the_default_config() {
        let text = default_config_toml();
        let table: Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(table, default_table());
        assert_eq!(Config::check(&table), Ok(Config::default()));
    }

    #[test]
    fn config_default_output_has_a_comment_above_every_key() {
        let text = default_config_toml();
        let lines: Vec<&str> = text.lines().collect();
        let mut keys = 0;
        for (i, line) in lines.iter().enumerate() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            keys += 1;
            assert!(
                i > 0 && lines[i - 1].starts_with("# "),
                "no comment above `{line}`:\n{text}"
            );
            assert!(!lines[i - 1].contains("(undocumented)"), "`{line}`");
        }
        assert!(keys > 25, "{text}");
        assert!(
            text.contains("\n# advertise_addr = \"raftmq-1.example.internal:7946\"\n"),
            "{text}"
        );
        assert!(text.lines().all(|l| l.len() <= WIDTH + 2), "{text}");
    }

    #[test]
    fn optional_keys_are_listed_under_their_section() {
        assert_eq!(
            optional_keys_under("cluster.").collect::<Vec<_>>(),
            [
                "advertise_addr",
                "tls_cert_file",
                "tls_key_file",
                "tls_ca_file",
                "faults_file",
                "disk_faults_file"
            ]
        );
        assert_eq!(optional_keys_under("").count(), 0);
        assert!(is_optional_key("cluster.advertise_addr"));
        assert!(!is_optional_key("cluster.addr"));
    }
}
