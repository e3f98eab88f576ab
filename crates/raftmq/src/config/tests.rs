//! The configuration end to end: layers merged over the defaults, then checked.

use super::*;
use std::ffi::OsString;
use std::time::Duration;
use toml::{Table, Value};

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

/// The problems of `text`, checked to be as many as `starts`, each beginning with its entry.
fn problems_starting(text: &str, starts: &[&str]) -> Vec<String> {
    let p = problems(text);
    assert_eq!(p.len(), starts.len(), "{p:#?}");
    for (problem, start) in p.iter().zip(starts) {
        assert!(
            problem.starts_with(start),
            "{problem:?} should start with {start:?}"
        );
    }
    p
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

    let only_file = resolve(Some(f.clone()), Layer::default(), Layer::default()).expect("valid");
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
    let p =
        problems("[mqtt]\nmax_inflihgt = 5\n[mqqt]\nx = 1\n[cluster]\nseeds = []\nbogus = true");
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
    problems_starting(
        "[mqtt]\nmax_inflight = \"lots\"\nmax_qos = -1\nqueue_overflow = \"explode\"",
        &[
            "mqtt.max_inflight: invalid type: string \"lots\"",
            "mqtt.max_qos: invalid value: integer `-1`",
            "mqtt.queue_overflow: unknown variant `explode`",
        ],
    );
}

#[test]
fn partial_cluster_tls_names_the_missing_keys() {
    problems_starting(
        "[cluster]\ntls_cert_file = \"node.crt\"",
        &[
            "cluster.tls_key_file: required when cluster.tls_cert_file is set",
            "cluster.tls_ca_file: required",
        ],
    );
    problems_starting(
        "[cluster]\ntls_key_file = \"k\"\ntls_ca_file = \"\"",
        &[
            "cluster.tls_cert_file: required",
            "cluster.tls_ca_file: must not be empty",
        ],
    );
    let c =
        check_file("[cluster]\ntls_cert_file = \"c\"\ntls_key_file = \"k\"\ntls_ca_file = \"ca\"")
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
    problems_starting(
        "[mqtt]\nmax_packet_size = \"1 parsec\"",
        &["mqtt.max_packet_size: invalid unit"],
    );
}

#[test]
fn a_section_of_the_wrong_type_is_reported_by_its_name() {
    problems_starting(
        "mqtt = 5\nnode_id = \"one\"",
        &[
            "node_id: invalid type: string \"one\", expected u64",
            "mqtt: invalid type: integer `5`",
        ],
    );
}

#[test]
fn semantic_checks_name_their_keys() {
    let p = problems_starting(
        "[cluster]\nadvertise_addr = \"::1:7946\"\nseeds = [\"a:0\"]\n[log]\nlevel = \"info,[[\"",
        &[
            "cluster.advertise_addr: `::1:7946` is not host:port",
            "cluster.seeds: ",
            "log.level: `info,[[` is not a valid log filter",
        ],
    );
    assert_eq!(
        p[1],
        "cluster.seeds: `a:0` is not host:port (port must be 1-65535)"
    );
    let p = problems("[listeners]\ntcp = \"127.0.0.1:9100\"\n[http]\naddr = \"127.0.0.1:9100\"");
    assert_eq!(p, ["http.addr: same address as listeners.tcp"]);
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
    // Not TOML values (or date-times): the text itself.
    for text in ["0.0.0.0:1884", "/var/lib/raftmq", "2024-01-01", "1 = 2"] {
        assert_eq!(parse_env_value(text), Value::String(text.into()), "{text}");
    }
    assert_eq!(
        parse_env_value("\"quoted\""),
        Value::String("quoted".into())
    );
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
    let err = resolve(None, env(&[("RAFTMQ_MQTT__MAX_INFLIGHT", "lots")]), flags).expect_err("bad");
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

#[test]
fn bridges_are_checked_table_by_table_naming_the_key() {
    let ok = check_file(
        r#"
[[bridges]]
name = "cloud"
address = "mqtt.example.com:8883"
forward = ["sensors/#"]
qos = 2
keep_alive = "30s"
"#,
    )
    .expect("valid bridge");
    assert_eq!(ok.bridges.len(), 1);
    assert_eq!(ok.bridges[0].qos, 2);
    assert_eq!(ok.bridges[0].keep_alive.0, Duration::from_secs(30));
    let p = problems_starting(
        r#"
[[bridges]]
name = "a"
address = "h:1"
forward = ["x/#"]
qos = 3

[[bridges]]
name = "b"
adress = "h:2"
keep_alive = "soon"
forward = ["y"]
"#,
        &[
            "bridges[1].adress: unknown key (did you mean `bridges[1].address`?)",
            "bridges[1].keep_alive:",
            "bridges[0].qos: must be 0, 1 or 2",
        ],
    );
    assert!(p[1].contains("soon"), "{p:?}");
    problems_starting(
        r#"
[[bridges]]
name = "a"
address = "h:1"
forward = ["x/#"]

[[bridges]]
name = "a"
address = "h:2"
subscribe = ["y/#"]
"#,
        &["bridges[1].name: `a` is the name of another bridge"],
    );
    problems_starting("bridges = 3", &["bridges: must be a list of tables"]);
}

#[test]
fn the_shard_count_is_checked_against_its_range_naming_the_key() {
    assert_eq!(
        problems("[cluster]\nshards = 0"),
        ["cluster.shards: must be between 1 and 1024 (the number of data shards), not 0"]
    );
    assert_eq!(
        problems("[cluster]\nshards = 1025"),
        ["cluster.shards: must be between 1 and 1024 (the number of data shards), not 1025"]
    );
    assert_eq!(
        check_file("[cluster]\nshards = 1024").map(|c| c.cluster.shards),
        Ok(1024)
    );
    assert_eq!(
        Config::default().cluster.shards,
        1,
        "one data group by default"
    );
}

#[test]
fn idle_shards_quiesce_unless_the_key_says_otherwise() {
    assert!(Config::default().cluster.quiesce_idle_shards);
    assert_eq!(
        check_file("[cluster]\nquiesce_idle_shards = false").map(|c| c.cluster.quiesce_idle_shards),
        Ok(false)
    );
    assert_eq!(problems("[cluster]\nquiesce_idle_shards = \"no\"").len(), 1);
}
