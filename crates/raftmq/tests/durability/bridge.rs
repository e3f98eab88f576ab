//! Bridges (`[[bridges]]`, docs/bridges.md) against a real Mosquitto broker started here (the
//! Debian package's `/usr/sbin/mosquitto`, on a free port, with its own configuration file and
//! persistence directory, stopped by its process id): messages both ways through prefixes,
//! MQTT 5 and 3.1.1, loop prevention, the remote broker restarting mid-stream with QoS 1
//! messages in flight (none lost), and, in a 3-node cluster, the bridge moving to another node
//! when the node running it is killed (`kill -9`; the messages published meanwhile are
//! forwarded after the move: at least once, none lost).

use super::{RAFTMQ, connected, http_ports, number, try_connect};
use raftmq_codec::{Packet, PubResponse, QoS, ReasonCode};
use raftmq_tests::ports::free_port;
use raftmq_tests::process::{
    Node, NodeSpec, START_TIMEOUT, cluster_specs, cluster_status, http_get, http_json,
    wait_converged,
};
use raftmq_tests::wait::poll;
use raftmq_tests::{RawClient, connect_v5, publish_packet};
use serde_json::Value;
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Mosquitto broker of the Debian package.
const MOSQUITTO: &str = "/usr/sbin/mosquitto";
/// Upper bound for Mosquitto to start listening or to exit.
const MOSQUITTO_WAIT: Duration = Duration::from_secs(15);
/// Upper bound for a bridge to (re)connect: its backoff is at most 1 s in these tests.
const BRIDGE_WAIT: Duration = Duration::from_secs(30);
/// Upper bound for all the messages of a test to arrive.
const DELIVERY_WAIT: Duration = Duration::from_secs(60);

/// A Mosquitto process on 127.0.0.1:`port`, persisting its sessions and queued messages in
/// `dir` (saved when it stops on SIGTERM, restored when it starts again).
/// With `tls_port`, a second listener there serves mutual TLS (certificates in `dir`: `ca.pem`,
/// `server.pem`, `server.key`; clients need a certificate from the same CA).
struct Mosquitto {
    child: Option<Child>,
    port: u16,
    tls_port: Option<u16>,
    dir: PathBuf,
}

impl Mosquitto {
    fn start(dir: &Path) -> Mosquitto {
        let mut m = Mosquitto::new(dir);
        m.spawn();
        m
    }

    /// Not started yet (see [`Mosquitto::spawn`]).
    fn new(dir: &Path) -> Mosquitto {
        Mosquitto {
            child: None,
            port: free_port(),
            tls_port: None,
            dir: dir.to_owned(),
        }
    }

    /// Also listens for mutual TLS with certificates signed by `ca` (the server's for
    /// 127.0.0.1); returns the client certificate and key (PEM) for the bridge.
    fn with_tls(&mut self, ca: &raftmq_tests::certs::Ca) -> (PathBuf, PathBuf) {
        let (cert, key) = ca.issue("127.0.0.1", &["127.0.0.1"]);
        let (client_cert, client_key) = ca.issue("raftmq-bridge", &[]);
        for (name, pem) in [
            ("ca.pem", ca.pem()),
            ("server.pem", cert),
            ("server.key", key),
            ("client.pem", client_cert),
            ("client.key", client_key),
        ] {
            std::fs::write(self.dir.join(name), pem).expect("write a certificate");
        }
        self.tls_port = Some(free_port());
        (self.dir.join("client.pem"), self.dir.join("client.key"))
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    fn spawn(&mut self) {
        let conf = self.dir.join("mosquitto.conf");
        // Started as root, Mosquitto switches to the user `mosquitto`, which could not write
        // its persistence file in the test's private directory: it stays who it is.
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
        std::fs::write(
            &conf,
            format!(
                "{user}listener {port} 127.0.0.1\n\
                 allow_anonymous true\n\
                 persistence true\n\
                 persistence_location {dir}/\n\
                 max_queued_messages 0\n\
                 log_dest file {dir}/mosquitto.log\n\
                 log_type all\n",
                user = if root { "user root\n" } else { "" },
                port = self.port,
                dir = self.dir.display()
            ) + &self.tls_port.map_or(String::new(), |tls| {
                format!(
                    "listener {tls} 127.0.0.1\n\
                     cafile {dir}/ca.pem\n\
                     certfile {dir}/server.pem\n\
                     keyfile {dir}/server.key\n\
                     require_certificate true\n",
                    dir = self.dir.display()
                )
            }),
        )
        .expect("write mosquitto.conf");
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start /usr/sbin/mosquitto (Debian package mosquitto)");
        self.child = Some(child);
        let addr = self.addr();
        raftmq_tests::wait::poll_blocking(
            "mosquitto listens",
            MOSQUITTO_WAIT,
            Duration::from_millis(50),
            || std::net::TcpStream::connect(addr).map(|_| ()),
        );
    }

    /// SIGTERM (Mosquitto saves its persistence file), waits for the exit, starts it again on
    /// the same port and files.
    fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// SIGTERM (Mosquitto saves its persistence file), and waits for the exit.
    fn stop(&mut self) {
        let mut child = self.child.take().expect("running");
        let pid = child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill -TERM {pid}");
        raftmq_tests::wait::poll_blocking(
            "mosquitto exits after SIGTERM",
            MOSQUITTO_WAIT,
            Duration::from_millis(20),
            || match child.try_wait().expect("wait") {
                Some(_) => Ok(()),
                None => Err("running"),
            },
        );
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        // Only the process this test started, by its id.
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A raftmq configuration file in `dir` with `bridges` (TOML `[[bridges]]` tables).
fn config_file(dir: &Path, bridges: &str) -> PathBuf {
    let path = dir.join("raftmq.toml");
    std::fs::write(&path, bridges).expect("write raftmq.toml");
    path
}

/// The bridge `name` as node `http` reports it (`GET /api/v1/bridges/{name}`).
async fn bridge_status(http: u16, name: &str) -> Option<Value> {
    match http_json(http, "GET", &format!("/api/v1/bridges/{name}"), None, None).await {
        (200, v) => Some(v),
        _ => None,
    }
}

/// Waits until node `http` reports bridge `name` connected; returns its status.
async fn wait_connected(http: u16, name: &str) -> Value {
    poll(
        &format!("bridge {name} connected on the node with HTTP port {http}"),
        BRIDGE_WAIT,
        Duration::from_millis(100),
        || async {
            match bridge_status(http, name).await {
                Some(v) if v["state"] == "connected" => Ok(v),
                other => Err(other),
            }
        },
    )
    .await
}

/// Connects a persistent MQTT 5 session `id` to `addr` and subscribes it to `filter` (QoS 1).
async fn subscriber(addr: SocketAddr, id: &str, filter: &str) -> RawClient {
    let (mut c, _) = connected(addr, id, false).await;
    c.subscribe(filter, QoS::AtLeastOnce).await;
    c
}

/// Publishes `msg-N` (N in `range`) to `topic` at QoS 1 through `addr` until each one is
/// acknowledged, reconnecting (and resending what was not acknowledged) when the broker
/// goes away or refuses; returns when all are acknowledged.
async fn publish_all(addr: SocketAddr, id: &str, topic: &str, range: std::ops::Range<u32>) {
    let deadline = Instant::now() + DELIVERY_WAIT;
    let mut next = range.start;
    while next < range.end {
        assert!(
            Instant::now() < deadline,
            "publishing {range:?} to {topic} at {addr} did not finish (next {next})"
        );
        let Some((mut c, _)) = try_connect(addr, id, true, 0).await else {
            // The broker is restarting: try again (bounded by the deadline above).
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        // A window of 8 messages in flight, packet id = position in the window + 1.
        'conn: while next < range.end {
            let batch: Vec<u32> = (next..range.end.min(next + 8)).collect();
            for (i, n) in batch.iter().enumerate() {
                let p = publish_packet(
                    topic,
                    QoS::AtLeastOnce,
                    i as u16 + 1,
                    format!("msg-{n}").as_bytes(),
                );
                if c.try_send(&Packet::Publish(p)).await.is_err() {
                    break 'conn;
                }
            }
            let mut acked = 0;
            while acked < batch.len() {
                match c.recv_within(Duration::from_secs(10)).await {
                    Ok(Some(Packet::PubAck(a))) if a.reason_code.is_success() => acked += 1,
                    Ok(Some(_)) => {}
                    // Closed or refused: the whole batch again on a new connection.
                    _ => break 'conn,
                }
            }
            next = batch.last().map_or(next, |n| n + 1);
        }
    }
}

/// Receives until every `msg-N` of `expected` arrived on the persistent session `id` (subscribed
/// to `filter`) at `addr`, reconnecting it (session resumed) when its broker restarts; returns
/// how many copies of each arrived.
async fn receive_all(
    addr: SocketAddr,
    mut client: RawClient,
    id: &str,
    filter: &str,
    expected: &BTreeSet<u32>,
) -> std::collections::BTreeMap<u32, u32> {
    let deadline = Instant::now() + DELIVERY_WAIT;
    let mut copies = std::collections::BTreeMap::new();
    loop {
        let seen: BTreeSet<u32> = copies.keys().copied().collect();
        if expected.is_subset(&seen) {
            return copies;
        }
        let missing: Vec<&u32> = expected.difference(&seen).take(20).collect();
        assert!(
            Instant::now() < deadline,
            "{} of {} messages arrived on {filter} at {addr}; missing (first 20) {missing:?}",
            seen.len(),
            expected.len()
        );
        match client.recv_within(Duration::from_secs(5)).await {
            Ok(Some(Packet::Publish(p))) => {
                if let Some(n) = number(&p.payload) {
                    *copies.entry(n).or_insert(0) += 1;
                }
                if let Some(pid) = p.packet_id {
                    let _ = client
                        .try_send(&Packet::PubAck(PubResponse::success(pid)))
                        .await;
                }
            }
            Ok(Some(_)) | Err(()) => {}
            Ok(None) => {
                // The broker went away (a restart): resume the session.
                client = poll(
                    &format!("{id} reconnects to {addr}"),
                    MOSQUITTO_WAIT,
                    Duration::from_millis(100),
                    || async {
                        match try_connect(addr, id, false, 3600).await {
                            Some((c, true)) => Ok(c),
                            Some((_, false)) => Err("session lost"),
                            None => Err("not reachable"),
                        }
                    },
                )
                .await;
            }
        }
    }
}

/// The value of the counter `name` with `labels` (e.g. `bridge="m",direction="out"`) in the
/// node's `/metrics`.
async fn metric(http: u16, name: &str, labels: &str) -> Option<f64> {
    let (_, text) = http_get(http, "/metrics").await;
    text.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Both directions through a real Mosquitto (MQTT 5 bridge with a remote prefix, and an MQTT
/// 3.1.1 one), loop prevention, then Mosquitto restarted while QoS 1 messages stream both ways:
/// every acknowledged message arrives on the other side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bridge_to_mosquitto_both_ways_survives_a_remote_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mdir = dir.path().join("mosquitto");
    std::fs::create_dir_all(&mdir).expect("mkdir");
    let mut mosq = Mosquitto::new(&mdir);
    let ca = raftmq_tests::certs::Ca::new("bridge test CA");
    let (client_cert, client_key) = mosq.with_tls(&ca);
    mosq.spawn();
    let conf = config_file(
        dir.path(),
        &format!(
            r#"
[[bridges]]
name = "mtls"
address = "127.0.0.1:{tls_port}"
tls = true
tls_ca_file = "{dir}/ca.pem"
tls_cert_file = "{cert}"
tls_key_file = "{key}"
forward = ["tls/out/#"]
subscribe = ["tls/in/#"]
reconnect_min = "200ms"
reconnect_max = "1s"

[[bridges]]
name = "m"
address = "127.0.0.1:{port}"
forward = ["out/#", "loop/#"]
subscribe = ["in/#", "loop/#"]
remote_prefix = "site1/"
qos = 1
keep_alive = "5s"
reconnect_min = "200ms"
reconnect_max = "1s"

[[bridges]]
name = "m311"
address = "127.0.0.1:{port}"
mqtt_version = "3.1.1"
forward = ["v3/out/#"]
subscribe = ["v3/in/#"]
reconnect_min = "200ms"
reconnect_max = "1s"
"#,
            port = mosq.port,
            tls_port = mosq.tls_port.expect("a TLS listener"),
            dir = mdir.display(),
            cert = client_cert.display(),
            key = client_key.display(),
        ),
    );
    let spec = NodeSpec::new(RAFTMQ, 1, dir.path().join("n1"))
        .with_env("RAFTMQ_CONFIG", conf.display().to_string());
    let node = Node::start(&spec).await;
    let (local, remote) = (spec.mqtt_addr(), mosq.addr());
    let status = wait_connected(spec.http, "m").await;
    assert_eq!(status["active"], true, "{status}");
    assert_eq!(status["remote_client_id"], "raftmq-bridge-m", "{status}");
    wait_connected(spec.http, "m311").await;
    let status = wait_connected(spec.http, "mtls").await;
    assert_eq!(status["tls"], true, "{status}");

    // Loop prevention, both ways: a message published on either side reaches the other side
    // once and never comes back (no-local on both sessions of the bridge). A marker sent after
    // it from the other side, through the same bridge, arrives after any echo would have.
    let mut lsub = subscriber(local, "lsub-loop", "loop/#").await;
    let mut msub = subscriber(remote, "msub-loop", "site1/loop/#").await;
    publish_all(local, "lpub-loop", "loop/a", 0..1).await;
    assert_eq!(&lsub.recv_publish().await.topic[..], "loop/a");
    assert_eq!(&msub.recv_publish().await.topic[..], "site1/loop/a");
    publish_all(remote, "mpub-loop", "site1/loop/b", 1..2).await;
    assert_eq!(&msub.recv_publish().await.topic[..], "site1/loop/b");
    let p = lsub.recv_publish().await;
    assert_eq!(
        &p.topic[..],
        "loop/b",
        "the local echo of loop/a came back: {p:?}"
    );
    publish_all(local, "lpub-loop", "loop/c", 2..3).await;
    let p = msub.recv_publish().await;
    assert_eq!(
        &p.topic[..],
        "site1/loop/c",
        "loop/b went back to Mosquitto: {p:?}"
    );
    drop((lsub, msub));

    // MQTT 3.1.1 bridge, both ways.
    let v3_local = subscriber(local, "lsub-v3", "v3/in/#").await;
    let v3_remote = subscriber(remote, "msub-v3", "v3/out/#").await;
    publish_all(local, "lpub-v3", "v3/out/x", 0..20).await;
    publish_all(remote, "mpub-v3", "v3/in/x", 0..20).await;
    let want: BTreeSet<u32> = (0..20).collect();
    receive_all(remote, v3_remote, "msub-v3", "v3/out/#", &want).await;
    receive_all(local, v3_local, "lsub-v3", "v3/in/#", &want).await;

    // Over mutual TLS, both ways.
    let tls_local = subscriber(local, "lsub-tls", "tls/in/#").await;
    let tls_remote = subscriber(remote, "msub-tls", "tls/out/#").await;
    publish_all(local, "lpub-tls", "tls/out/x", 0..20).await;
    publish_all(remote, "mpub-tls", "tls/in/x", 0..20).await;
    receive_all(remote, tls_remote, "msub-tls", "tls/out/#", &want).await;
    receive_all(local, tls_local, "lsub-tls", "tls/in/#", &want).await;

    // QoS 1 streams both ways; Mosquitto restarted in the middle.
    const N: u32 = 1500;
    let out_sub = subscriber(remote, "msub-out", "site1/out/#").await;
    let in_sub = subscriber(local, "lsub-in", "in/#").await;
    let out_pub = tokio::spawn(publish_all(local, "lpub-out", "out/load", 0..N));
    let in_pub = tokio::spawn(publish_all(remote, "mpub-in", "site1/in/load", 0..N));
    // Mid-stream: once messages arrive on the remote side, and before the publishers are done.
    poll(
        "forwarded messages arrive at Mosquitto",
        DELIVERY_WAIT,
        Duration::from_millis(20),
        || async {
            let n = metric(
                spec.http,
                "raftmq_bridge_messages_total",
                "bridge=\"m\",direction=\"out\"",
            )
            .await
            .unwrap_or(0.0);
            if n >= 100.0 { Ok(()) } else { Err(n) }
        },
    )
    .await;
    let before = bridge_status(spec.http, "m").await.expect("status");
    mosq.restart();
    out_pub.await.expect("local publisher");
    in_pub.await.expect("remote publisher");
    let want: BTreeSet<u32> = (0..N).collect();
    let out = receive_all(remote, out_sub, "msub-out", "site1/out/#", &want).await;
    let inc = receive_all(local, in_sub, "lsub-in", "in/#", &want).await;
    assert_eq!(out.len(), N as usize);
    assert_eq!(inc.len(), N as usize);
    let twice = |m: &std::collections::BTreeMap<u32, u32>| m.values().filter(|c| **c > 1).count();
    eprintln!(
        "through the restart: {N} messages each way, delivered more than once: {} out, {} in",
        twice(&out),
        twice(&inc)
    );

    // The bridge reconnected (and says so), and counted what it carried.
    let after = wait_connected(spec.http, "m").await;
    let connects = |v: &Value| v["connects"].as_u64().unwrap_or(0);
    assert!(
        connects(&after) > connects(&before),
        "no reconnect after the restart: before {before}, after {after}\n{}",
        mosq.log_tail()
    );
    assert!(
        after["messages_forwarded"].as_u64().unwrap_or(0) >= u64::from(N),
        "{after}"
    );
    assert!(
        after["messages_received"].as_u64().unwrap_or(0) >= u64::from(N),
        "{after}"
    );
    let (code, list) = http_json(spec.http, "GET", "/api/v1/bridges", None, None).await;
    assert_eq!(code, 200, "{list}");
    assert_eq!(list["items"].as_array().map(Vec::len), Some(3), "{list}");
    assert_eq!(
        http_json(spec.http, "GET", "/api/v1/bridges/nope", None, None)
            .await
            .0,
        404
    );
    for labels in [
        "bridge=\"m\",direction=\"in\"",
        "bridge=\"m311\",direction=\"out\"",
    ] {
        assert!(
            metric(spec.http, "raftmq_bridge_messages_total", labels)
                .await
                .is_some_and(|v| v >= 20.0),
            "raftmq_bridge_messages_total{{{labels}}}"
        );
    }
    // `raftmq ctl bridges` shows them as a table.
    let url = spec.url();
    let ctl = tokio::task::spawn_blocking(move || {
        Command::new(RAFTMQ)
            .args(["ctl", "--url", &url, "bridges"])
            .env_clear()
            .output()
            .expect("runs raftmq ctl")
    })
    .await
    .expect("ctl thread");
    let table = String::from_utf8_lossy(&ctl.stdout);
    assert!(ctl.status.success(), "{table}");
    assert!(
        table.starts_with("NAME") && table.lines().filter(|l| l.contains("connected")).count() == 3,
        "{table}"
    );
    // A network client may not take the bridge's local session.
    let refused =
        RawClient::try_handshake(local, connect_v5("$bridge/m", false, 60), START_TIMEOUT)
            .await
            .map(|(_, ack)| ack.reason_code);
    assert_eq!(refused, Some(ReasonCode::CLIENT_IDENTIFIER_NOT_VALID));
    drop(node);
}

/// A bridge whose remote broker is down from the start: its local session is made anyway, so
/// the QoS 1 messages published meanwhile are queued and forwarded once the broker is up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_queues_while_its_remote_broker_was_never_up() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mdir = dir.path().join("mosquitto");
    std::fs::create_dir_all(&mdir).expect("mkdir");
    // Mosquitto keeps the subscriber's session over its stop (persistence).
    let mut mosq = Mosquitto::start(&mdir);
    drop(subscriber(mosq.addr(), "msub-late", "late/#").await);
    mosq.stop();
    let conf = config_file(
        dir.path(),
        &format!(
            r#"
[[bridges]]
name = "late"
address = "127.0.0.1:{port}"
forward = ["late/#"]
reconnect_min = "200ms"
reconnect_max = "1s"
"#,
            port = mosq.port
        ),
    );
    let spec = NodeSpec::new(RAFTMQ, 1, dir.path().join("n1"))
        .with_env("RAFTMQ_CONFIG", conf.display().to_string());
    let _node = Node::start(&spec).await;
    poll(
        "the bridge failed to connect and made its local session, subscribed",
        BRIDGE_WAIT,
        Duration::from_millis(100),
        || async {
            let failed = bridge_status(spec.http, "late")
                .await
                .is_some_and(|v| v["connect_failures"].as_u64() >= Some(1));
            let session = http_json(
                spec.http,
                "GET",
                "/api/v1/clients/%24bridge%2Flate",
                None,
                None,
            )
            .await;
            match session {
                (200, v) if failed && v["subscriptions"] == 1 => Ok(()),
                other => Err((failed, other)),
            }
        },
    )
    .await;
    publish_all(spec.mqtt_addr(), "lpub-late", "late/x", 0..50).await;
    let queued = bridge_status(spec.http, "late").await.expect("status");
    assert_eq!(queued["queued"].as_u64(), Some(50), "{queued}");
    mosq.spawn();
    wait_connected(spec.http, "late").await;
    let (msub, present) = try_connect(mosq.addr(), "msub-late", false, 3600)
        .await
        .expect("reconnects to Mosquitto");
    assert!(present, "Mosquitto kept the subscriber's session");
    let want: BTreeSet<u32> = (0..50).collect();
    receive_all(mosq.addr(), msub, "msub-late", "late/#", &want).await;
}

/// In a 3-node cluster the bridge runs on the leader only; `kill -9` of that node moves it to
/// another node within a bounded time, and the QoS 1 messages published (through a surviving
/// node) before, during and after the move all reach Mosquitto (at least once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bridge_moves_when_its_node_is_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mdir = dir.path().join("mosquitto");
    std::fs::create_dir_all(&mdir).expect("mkdir");
    let mosq = Mosquitto::start(&mdir);
    let conf = config_file(
        dir.path(),
        &format!(
            r#"
[[bridges]]
name = "c"
address = "127.0.0.1:{port}"
forward = ["move/#"]
qos = 1
keep_alive = "5s"
reconnect_min = "200ms"
reconnect_max = "1s"
"#,
            port = mosq.port
        ),
    );
    let cluster_dir = dir.path().join("cluster");
    std::fs::create_dir_all(&cluster_dir).expect("mkdir");
    let (specs, mut nodes, _) = start_cluster_with(&cluster_dir, &conf).await;
    let ports = http_ports(&specs);
    // Exactly one node runs it: the leader.
    let runner = poll(
        "exactly one node runs the bridge, connected",
        BRIDGE_WAIT,
        Duration::from_millis(100),
        || async {
            let mut active = Vec::new();
            for (spec, port) in specs.iter().zip(&ports) {
                if let Some(v) = bridge_status(*port, "c").await
                    && v["active"] == true
                {
                    active.push((spec.id, v["state"].clone()));
                }
            }
            match active.as_slice() {
                [(id, state)] if state == "connected" => Ok(*id),
                _ => Err(active),
            }
        },
    )
    .await;
    let runner_idx = specs.iter().position(|s| s.id == runner).expect("runner");
    // On the leader (as that node sees it now: leadership may have moved since the start).
    let view = cluster_status(ports[runner_idx])
        .await
        .expect("cluster view");
    assert_eq!(
        view["leader"].as_u64(),
        Some(runner),
        "the bridge runs on the Raft leader: {view}"
    );
    let publisher_idx = (runner_idx + 1) % specs.len();
    let publish_to = specs[publisher_idx].mqtt_addr();

    const N: u32 = 600;
    let msub = subscriber(mosq.addr(), "msub-move", "move/#").await;
    let publisher = tokio::spawn(publish_all(publish_to, "lpub-move", "move/load", 0..N));
    poll(
        "forwarded messages arrive at Mosquitto before the kill",
        DELIVERY_WAIT,
        Duration::from_millis(20),
        || async {
            let n = metric(
                ports[runner_idx],
                "raftmq_bridge_messages_total",
                "bridge=\"c\",direction=\"out\"",
            )
            .await
            .unwrap_or(0.0);
            if n >= 50.0 { Ok(()) } else { Err(n) }
        },
    )
    .await;
    let killed_at = Instant::now();
    nodes[runner_idx].take().expect("running").kill9();

    // Another node takes the bridge over, within a bounded time.
    let survivors: Vec<(u64, u16)> = specs
        .iter()
        .zip(&ports)
        .filter(|(s, _)| s.id != runner)
        .map(|(s, p)| (s.id, *p))
        .collect();
    let (new_runner, _) = poll(
        "another node runs the bridge, connected",
        Duration::from_secs(45),
        Duration::from_millis(100),
        || async {
            let mut active = Vec::new();
            for (id, port) in &survivors {
                if let Some(v) = bridge_status(*port, "c").await
                    && v["active"] == true
                {
                    active.push((*id, v["state"].clone()));
                }
            }
            match active.as_slice() {
                [(id, state)] if state == "connected" => Ok((*id, ())),
                _ => Err(active),
            }
        },
    )
    .await;
    let moved_in = killed_at.elapsed();
    assert_ne!(new_runner, runner);
    publisher.await.expect("publisher");
    let want: BTreeSet<u32> = (0..N).collect();
    let copies = receive_all(mosq.addr(), msub, "msub-move", "move/#", &want).await;
    let duplicates = copies.values().filter(|c| **c > 1).count();
    eprintln!(
        "bridge moved from node {runner} to node {new_runner} in {moved_in:?}; \
         {N} messages, {duplicates} delivered more than once"
    );
    assert!(moved_in < Duration::from_secs(45));
    drop(nodes);
}

/// A 3-node cluster in `dir` whose nodes read `config` (the bridges); returns the specs, the
/// running nodes and the leader id.
async fn start_cluster_with(dir: &Path, config: &Path) -> (Vec<NodeSpec>, Vec<Option<Node>>, u64) {
    let specs: Vec<NodeSpec> = cluster_specs(RAFTMQ, dir, 3)
        .into_iter()
        .map(|s| s.with_env("RAFTMQ_CONFIG", config.display().to_string()))
        .collect();
    let nodes: Vec<Option<Node>> = specs.iter().map(|s| Some(Node::spawn(s))).collect();
    let leader = wait_converged(&http_ports(&specs), 3).await;
    (specs, nodes, leader)
}
