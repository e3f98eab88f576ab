//! The `raftmq` executable end to end: exit codes, output, and a serve / SIGTERM cycle.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// The executable with a clean environment (no stray `RAFTMQ_*` or `RUST_LOG`).
fn raftmq() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_raftmq"));
    cmd.env_clear();
    cmd
}

fn run(args: &[&str]) -> Output {
    raftmq().args(args).output().expect("runs raftmq")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_exits_0() {
    let out = run(&["--version"]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        text(&out.stdout),
        format!("raftmq {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["--mqtt-addr", "nowhere"][..],
        &["frobnicate"],
        &["config", "check"],
    ] {
        let out = run(args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

#[test]
fn config_default_passes_config_check() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = run(&["config", "default"]);
    assert_eq!(out.status.code(), Some(0));
    let path = dir.path().join("default.toml");
    std::fs::write(&path, &out.stdout).expect("write");
    let out = run(&["config", "check", path.to_str().expect("utf-8 path")]);
    assert_eq!(
        (out.status.code(), text(&out.stdout).as_str()),
        (Some(0), "ok\n")
    );
}

#[test]
fn config_check_prints_every_problem_and_exits_1() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "node_id = 0\n[mqtt]\nmax_qos = 3\nmax_keep_alive = \"10x\"\n",
    )
    .expect("write");
    let out = run(&["config", "check", path.to_str().expect("utf-8 path")]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stdout),
        "node_id: must be at least 1\n\
         mqtt.max_keep_alive: invalid unit `x` in `10x` (use ms, s, m, h, d)\n\
         mqtt.max_qos: must be 0, 1 or 2\n"
    );
}

#[test]
fn serve_with_a_bad_config_exits_1_naming_every_problem() {
    let out = raftmq()
        .args(["serve", "--mqtt-addr", "none", "--http-addr", "none"])
        .env("RAFTMQ_MQTT__MAX_QOS", "7")
        .env("RAFTMQ_MQTT__NO_SUCH_KEY", "1")
        .output()
        .expect("runs raftmq");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: loading configuration: invalid configuration (2 problems)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("\n  RAFTMQ_MQTT__NO_SUCH_KEY: unknown setting"),
        "{stderr}"
    );
    assert!(
        stderr.contains("\n  mqtt.max_qos: must be 0, 1 or 2 (set by RAFTMQ_MQTT__MAX_QOS)"),
        "{stderr}"
    );
}

#[test]
fn serve_runs_until_sigterm_then_exits_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let mut child = raftmq()
        .args([
            "--mqtt-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--log-level",
            "info",
        ])
        .arg("--data-dir")
        .arg(&data_dir)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("starts raftmq");
    let stderr = child.stderr.take().expect("piped stderr");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("http listening on 127.0.0.1:"))
    {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => seen.push(line),
            Err(e) => {
                let _ = child.kill();
                panic!("no startup log ({e}): {seen:#?}");
            }
        }
    }
    assert!(
        seen.iter()
            .any(|l| l.contains("mqtt listening on 127.0.0.1:")),
        "{seen:#?}"
    );
    assert!(
        !seen.iter().any(|l| l.contains("ANONYMOUS")),
        "loopback needs no warning: {seen:#?}"
    );
    assert!(
        !seen.iter().any(|l| l.contains("admin API")),
        "a loopback HTTP port needs no admin token warning: {seen:#?}"
    );
    assert!(data_dir.is_dir(), "data_dir is created");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("runs kill");
    assert!(killed.success());
    let status = child.wait().expect("raftmq exits");
    assert_eq!(status.code(), Some(0));
    let rest: Vec<String> = rx.iter().collect();
    assert!(
        rest.iter().any(|l| l.contains("received SIGTERM")),
        "{rest:#?}"
    );
    assert!(
        rest.iter().any(|l| l.contains("draining connections")),
        "SIGTERM drains first: {rest:#?}"
    );
}

/// The Grafana dashboard in `deploy/grafana/` only uses metrics that `docs/metrics.md`
/// documents (and so that the broker exports), and is valid JSON.
#[test]
fn grafana_dashboard_uses_only_documented_metrics() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");
    let dashboard = std::fs::read_to_string(format!("{root}/deploy/grafana/raftmq.json"))
        .expect("read dashboard");
    let docs =
        std::fs::read_to_string(format!("{root}/docs/metrics.md")).expect("read docs/metrics.md");
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    let panels = json["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut used = std::collections::BTreeSet::new();
    for expr in panels
        .iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
    {
        let expr = expr["expr"].as_str().expect("expr");
        for (i, _) in expr.match_indices("raftmq_") {
            let name: String = expr[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let base = name.trim_end_matches("_bucket").to_owned();
            used.insert(base);
        }
    }
    assert!(used.len() >= 10, "{used:?}");
    for name in used {
        assert!(
            docs.contains(&format!("`{name}`")),
            "{name} is used by the dashboard but not documented in docs/metrics.md"
        );
    }
}

/// Runs `raftmq passwd ARGS` with `stdin` as standard input.
fn passwd(args: &[&str], stdin: &str) -> Output {
    use std::io::Write as _;
    let mut child = raftmq()
        .arg("passwd")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs raftmq passwd");
    if let Some(mut input) = child.stdin.take() {
        // A command that reads no input (e.g. --delete, or a refused one) may have exited
        // already: a broken pipe here is not a failure; its exit status and output are checked.
        if let Err(e) = input.write_all(stdin.as_bytes()) {
            assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "write stdin: {e}");
        }
    }
    child.wait_with_output().expect("raftmq passwd finishes")
}

#[test]
fn passwd_adds_updates_and_deletes_users_from_stdin() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("passwd");
    let file = path.to_str().expect("utf-8 path");
    let out = passwd(&[file, "alice", "--password-stdin"], "s3cret\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("added `alice`"));
    let first = std::fs::read_to_string(&path).expect("read");
    assert!(first.starts_with("alice:$argon2id$"), "{first}");

    let out = passwd(&[file, "alice", "--password-stdin"], "other\n");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("updated `alice`"));
    assert_ne!(std::fs::read_to_string(&path).expect("read"), first);

    // Not a terminal and no --password-stdin: a clear error, nothing written.
    let out = passwd(&[file, "bob"], "");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("--password-stdin"),
        "{}",
        text(&out.stderr)
    );

    let out = passwd(&[file, "alice", "--delete"], "");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(std::fs::read_to_string(&path).expect("read"), "");
    let out = passwd(&[file, "alice", "--delete"], "");
    assert_eq!(out.status.code(), Some(1));

    // A broken file is reported with its line, not overwritten.
    std::fs::write(&path, "# users\nalice\n").expect("write");
    let out = passwd(&[file, "carol", "--password-stdin"], "pw\n");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("line 2"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        "# users\nalice\n"
    );
}

#[test]
fn serve_with_an_unreadable_password_file_exits_1_naming_the_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let missing = dir.path().join("no-such-passwd");
    let out = raftmq()
        .args(["serve", "--mqtt-addr", "none", "--http-addr", "none"])
        .args(["--cluster-addr", "127.0.0.1:0", "--data-dir"])
        .arg(&data_dir)
        .env("RAFTMQ_AUTH__PASSWORD_FILE", &missing)
        .output()
        .expect("runs raftmq");
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "error: loading authentication files: auth.password_file: cannot read {}",
            missing.display()
        )),
        "{stderr}"
    );
}

/// Every file of `dir` but RocksDB's info log (`LOG`, `LOG.old.*`), with its content.
fn store_files(dir: &std::path::Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .expect("read dir")
        .map(|entry| entry.expect("dir entry"))
        .filter(|entry| !entry.file_name().to_string_lossy().starts_with("LOG"))
        .map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(entry.path()).expect("read file"))
        })
        .collect()
}

/// A copy of the store `raftmq serve` of the last single-group commit wrote (store format 1: the
/// fixture `crates/raftmq-store/tests/fixtures/format-1`, made by commit 6f6bd8e, see the README
/// there) in `<dir>/data/raft`; returns the data dir.
fn format_1_data_dir(dir: &std::path::Path) -> std::path::PathBuf {
    let fixture = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../raftmq-store/tests/fixtures/format-1"
    ));
    let data_dir = dir.join("data");
    let store = data_dir.join("raft");
    std::fs::create_dir_all(&store).expect("create data dir");
    for (name, content) in store_files(fixture) {
        std::fs::write(store.join(name), content).expect("copy fixture");
    }
    data_dir
}

/// A data dir written by the single-group release is migrated on the first start (logged),
/// keeps the format-1 store as `raft.format-1`, and serves what it held: the persistent
/// session `fixture-sub` resumes with its queued message, the retained message is delivered to a
/// new subscriber. The next start finds format 2 and migrates nothing.
#[tokio::test]
async fn serve_on_a_format_1_data_dir_migrates_it_and_serves_its_sessions_and_retained_messages() {
    use raftmq_codec::{ProtocolVersion, PubResponse, QoS, ReasonCode};
    use raftmq_tests::process::{Node, NodeSpec};
    use raftmq_tests::{RawClient, connect_v5};

    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = format_1_data_dir(dir.path());
    // Node 1, as the fixture was written (the default node id).
    let spec = NodeSpec::new(env!("CARGO_BIN_EXE_raftmq"), 1, data_dir.clone());
    let node = Node::start(&spec).await;
    let log = std::fs::read_to_string(spec.log_path()).expect("node log");
    let d = data_dir.join("raft");
    assert!(
        log.contains(&format!(
            "migrating data dir {} from format 1 to format 2 (about",
            d.display()
        )),
        "{log}"
    );
    assert!(
        log.contains(&format!("migrated data dir {} to format 2: ", d.display())),
        "{log}"
    );
    // The format-1 store is kept next to it, still format 1 (RocksDB's recovery at the
    // migration's open rewrote its files, not its keys).
    {
        let backup = data_dir.join("raft.format-1");
        let opts = rocksdb::Options::default();
        let names = rocksdb::DB::list_cf(&opts, &backup).expect("list");
        let db = rocksdb::DB::open_cf_for_read_only(&opts, &backup, &names, false).expect("open");
        assert_eq!(
            db.get(b"raftmq_store_format").expect("get"),
            Some(1u32.to_be_bytes().to_vec())
        );
    }
    assert!(!data_dir.join("raft.migrating").exists());

    // The persistent session resumes: its subscription and its queued QoS 1 message.
    let (mut sub, ack) =
        RawClient::handshake(node.mqtt_addr(), connect_v5("fixture-sub", false, 3600)).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "{ack:?}");
    assert!(ack.session_present, "{ack:?}");
    // Delivered on resume: both messages queued for the offline session, in publish order (the
    // fixture's `mosquitto_sub -C 1 -W 2` ended before they were published, see its README).
    let mut delivered = Vec::new();
    while let Ok(Some(raftmq_codec::Packet::Publish(publish))) =
        sub.recv_within(Duration::from_secs(2)).await
    {
        sub.send(&raftmq_codec::Packet::PubAck(PubResponse::success(
            publish.packet_id.expect("QoS 1 packet id"),
        )))
        .await;
        delivered.push((
            publish.topic.to_string(),
            String::from_utf8_lossy(&publish.payload).into_owned(),
            publish.qos,
            publish.dup,
        ));
    }
    let qos1 = |topic: &str, payload: &str| {
        (
            topic.to_owned(),
            payload.to_owned(),
            QoS::AtLeastOnce,
            false,
        )
    };
    assert_eq!(
        delivered,
        [
            qos1("fixture/retained", "kept by format 1"),
            qos1("fixture/queued", "queued for fixture-sub"),
        ]
    );

    // The retained message, to a new subscriber.
    let mut reader =
        RawClient::connected(node.mqtt_addr(), ProtocolVersion::V5, "fixture-reader").await;
    reader.subscribe("fixture/retained", QoS::AtLeastOnce).await;
    let retained = reader.recv_publish().await;
    assert_eq!(
        (&*retained.topic, &retained.payload[..], retained.retain),
        ("fixture/retained", &b"kept by format 1"[..], true)
    );
    drop((sub, reader));
    assert_eq!(node.terminate(), Some(0));

    // Format 2 now: the next start migrates nothing.
    let node = Node::start(&spec).await;
    assert_eq!(node.terminate(), Some(0));
    let log = std::fs::read_to_string(spec.log_path()).expect("node log");
    assert_eq!(log.matches("migrating data dir").count(), 1, "{log}");
}

/// A data dir of a store format this release does not know (a newer release wrote it) is
/// refused: exit status 78 (`EX_CONFIG`), the message naming the data dir and the way out, and
/// nothing written to the store.
#[test]
fn serve_on_a_data_dir_of_an_unknown_format_exits_78_and_leaves_it_untouched() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    let store = data_dir.join("raft");
    {
        let mut opts = rocksdb::Options::default();
        opts.create_if_missing(true);
        let db = rocksdb::DB::open(&opts, &store).expect("raw open");
        db.put(b"raftmq_store_format", 3u32.to_be_bytes())
            .expect("put");
        db.flush_wal(true).expect("sync");
    }
    let before = store_files(&store);

    /// Kills the server if the test fails before it exited by itself.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut server = Reap(
        raftmq()
            .args(["serve", "--mqtt-addr", "none", "--http-addr", "none"])
            .args(["--cluster-addr", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runs raftmq"),
    );
    let status = raftmq_tests::wait::poll_blocking(
        "raftmq serve exits",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || server.0.try_wait().expect("try_wait").ok_or("running"),
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(server.0.stderr.as_mut().expect("stderr piped"), &mut stderr)
        .expect("read stderr");
    assert_eq!(status.code(), Some(78), "{stderr}");
    let d = data_dir.display();
    assert!(
        stderr.ends_with(&format!(
            "data dir {d} was written in store format 3, and this release reads only format 2 \
             (a newer release wrote it?);\n\
             run the release that wrote it, or move {d} aside to start this node empty.\n\
             See docs/operations.md#upgrading-to-sharded-state\n"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("error:"), "{stderr}");
    assert_eq!(store_files(&store), before, "nothing written to the store");
    assert!(!data_dir.join("raft.migrating").exists());
    assert!(!data_dir.join("raft.format-1").exists());
}

/// A data dir keeps the shard count its cluster was created with: `raftmq serve` configured
/// with another `cluster.shards` exits 78 naming the key and both values.
#[test]
fn serve_on_a_data_dir_created_with_other_shards_exits_78_naming_cluster_shards() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data_dir = dir.path().join("data");
    // A node of 4 shards created the data dir (and bootstrapped its groups).
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let mut opts = raftmq_cluster::node::NodeOptions::new(
            1,
            "127.0.0.1:1".to_owned(),
            String::new(),
            Vec::new(),
            data_dir.clone(),
        );
        opts.shards = raftmq_core::shard::ShardCount::new(4).expect("valid");
        raftmq_cluster::node::RaftNode::start(opts)
            .await
            .expect("node starts")
            .shutdown()
            .await;
    });
    drop(runtime);

    /// Kills the server if the test fails before it exited by itself.
    struct Reap(std::process::Child);
    impl Drop for Reap {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut server = Reap(
        raftmq()
            .args(["serve", "--mqtt-addr", "none", "--http-addr", "none"])
            .args(["--cluster-addr", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .env("RAFTMQ_CLUSTER__SHARDS", "2")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runs raftmq"),
    );
    let status = raftmq_tests::wait::poll_blocking(
        "raftmq serve exits",
        Duration::from_secs(60),
        Duration::from_millis(50),
        || server.0.try_wait().expect("try_wait").ok_or("running"),
    );
    let mut stderr = String::new();
    std::io::Read::read_to_string(server.0.stderr.as_mut().expect("stderr piped"), &mut stderr)
        .expect("read stderr");
    assert_eq!(status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cluster.shards is 2, but the data dir {} belongs to a cluster created with \
             cluster.shards = 4",
            data_dir.display()
        )),
        "{stderr}"
    );
}
