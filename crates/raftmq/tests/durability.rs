//! Durability across `kill -9`, with the real `raftmq` executable: state acknowledged before a
//! crash (persistent sessions, subscriptions, queued QoS 1/2 messages, retained messages) is all
//! back after a restart on the same data dir, on a single node and in a 3-node cluster whose
//! leader, then whose client-facing node, is killed under a durable QoS 1 load.

use bytes::Bytes;
use raftmq_codec::{
    ByteStr, Connect, ConnectProperties, Packet, PacketId, ProtocolVersion, PubResponse, Publish,
    PublishProperties, QoS, ReasonCode, Subscribe, SubscribeFilter, SubscribeProperties,
    SubscriptionOptions,
};
use raftmq_tests::RawClient;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for a node to start (Raft leader election included).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A free port below the kernel's ephemeral range (32768+ on Linux), so an outgoing connection
/// cannot take it as its source port between this check and a node (re)binding it. Each test
/// process starts at its own offset.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    // Each test process starts at its own offset and wraps around within the range (an
    // offset near its end must not leave the process without ports).
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id() % 400 * 30,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free test port in 20000-31999");
}

/// Where one node listens and keeps its data.
#[derive(Clone)]
struct NodeSpec {
    id: u64,
    mqtt: u16,
    http: u16,
    cluster: u16,
    seeds: Vec<String>,
    data_dir: PathBuf,
    /// Extra environment variables (configuration keys) for the process.
    env: Vec<(String, String)>,
}

impl NodeSpec {
    fn new(id: u64, data_dir: PathBuf) -> NodeSpec {
        NodeSpec {
            id,
            mqtt: free_port(),
            http: free_port(),
            cluster: free_port(),
            seeds: Vec::new(),
            data_dir,
            env: Vec::new(),
        }
    }

    fn mqtt_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.mqtt))
    }
}

/// The node's log (appended to across restarts), next to its data dir.
fn log_file(spec: &NodeSpec) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(spec.data_dir.with_extension("log"))
        .map_or_else(|_| Stdio::inherit(), Stdio::from)
}

/// The last `n` lines of every node's log (for a failure message).
fn log_tails(specs: &[NodeSpec], n: usize) -> String {
    let mut out = String::new();
    for spec in specs {
        let text = std::fs::read_to_string(spec.data_dir.with_extension("log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        out += &format!("--- node {} log (last {n} lines) ---\n", spec.id);
        for l in &lines[lines.len().saturating_sub(n)..] {
            out += l;
            out += "\n";
        }
    }
    out
}

/// [`wait_converged`], printing the nodes' logs if they do not converge.
async fn converged_or_logs(ports: &[u16], specs: &[NodeSpec], nodes: &mut [Option<Node>]) -> u64 {
    match tokio::time::timeout(
        START_TIMEOUT - Duration::from_secs(5),
        wait_converged(ports, 3),
    )
    .await
    {
        Ok(leader) => leader,
        Err(_) => {
            let mut views = Vec::new();
            for p in ports {
                views.push(cluster_status(*p).await);
            }
            let processes: Vec<String> = nodes
                .iter_mut()
                .map(|n| match n {
                    Some(n) => format!("{:?}", n.child.try_wait()),
                    None => "not running".to_owned(),
                })
                .collect();
            // A node that is running but does not answer: its threads' stacks, if gdb is here.
            let mut stacks = String::new();
            for (view, node) in views.iter().zip(nodes.iter_mut()) {
                if let (None, Some(node)) = (view, node)
                    && matches!(node.child.try_wait(), Ok(None))
                    && let Ok(out) = Command::new("timeout")
                        .args(["60", "gdb", "-p", &node.child.id().to_string(), "-batch"])
                        .args(["-ex", "thread apply all bt 25"])
                        .output()
                {
                    stacks += &String::from_utf8_lossy(&out.stdout);
                }
            }
            panic!(
                "cluster did not converge: {views:?}\nprocesses (exit status): {processes:?}\n{}\n{stacks}",
                log_tails(specs, 40)
            )
        }
    }
}

/// A running `raftmq` process (killed when dropped).
struct Node {
    child: Child,
    http: u16,
}

impl Node {
    fn spawn(spec: &NodeSpec) -> Node {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_raftmq"));
        cmd.env_clear()
            .args([
                "serve",
                "--log-level",
                "warn,openraft=off,raftmq=info",
                "--node-id",
                &spec.id.to_string(),
            ])
            .args(["--mqtt-addr", &format!("127.0.0.1:{}", spec.mqtt)])
            .args(["--http-addr", &format!("127.0.0.1:{}", spec.http)])
            .args(["--cluster-addr", &format!("127.0.0.1:{}", spec.cluster)])
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log_file(spec));
        if !spec.seeds.is_empty() {
            cmd.args(["--seeds", &spec.seeds.join(",")]);
        }
        Node {
            child: cmd.spawn().expect("starts raftmq"),
            http: spec.http,
        }
    }

    /// Starts the node and waits until it reports ready.
    async fn start(spec: &NodeSpec) -> Node {
        let node = Node::spawn(spec);
        let deadline = Instant::now() + START_TIMEOUT;
        while !ready(node.http).await {
            assert!(
                Instant::now() < deadline,
                "node {} not ready within {START_TIMEOUT:?}",
                spec.id
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        node
    }

    /// SIGKILL: no shutdown, no flush.
    fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET `path` on 127.0.0.1:`port`: the status code and the body (code 0 if unreachable).
async fn http_get(port: u16, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return (0, String::new());
    };
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

async fn ready(http_port: u16) -> bool {
    http_get(http_port, "/readyz").await.0 == 200
}

/// The node's view of the cluster (`GET /api/v1/cluster`), if it answers.
async fn cluster_status(http_port: u16) -> Option<serde_json::Value> {
    let (code, body) = http_get(http_port, "/api/v1/cluster").await;
    if code == 200 {
        serde_json::from_str(&body).ok()
    } else {
        None
    }
}

/// Waits until every node in `ports` reports the same leader, `voters` voters and the same
/// applied index; returns the leader id.
async fn wait_converged(ports: &[u16], voters: usize) -> u64 {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let mut views = Vec::new();
        for p in ports {
            views.push(cluster_status(*p).await);
        }
        let agreed = views.iter().all(|v| {
            v.as_ref().is_some_and(|v| {
                v["voters"].as_array().is_some_and(|a| a.len() == voters)
                    && v["leader"]
                        == views[0]
                            .as_ref()
                            .map_or(serde_json::Value::Null, |f| f["leader"].clone())
                    && v["last_applied"]
                        == views[0]
                            .as_ref()
                            .map_or(serde_json::Value::Null, |f| f["last_applied"].clone())
            })
        });
        if agreed && let Some(leader) = views[0].as_ref().and_then(|v| v["leader"].as_u64()) {
            return leader;
        }
        assert!(
            Instant::now() < deadline,
            "cluster did not converge: {views:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn connect_packet(id: &str, clean_start: bool, expiry: u32) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start,
        keep_alive: 60,
        client_id: ByteStr::from(id),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties {
            session_expiry_interval: Some(expiry),
            ..Default::default()
        },
    }))
}

/// Connects and returns (client, session present); `None` if the node is down or refused (e.g.
/// no quorum). Connects with session expiry `expiry` (0: a clean session, never durable).
async fn try_connect(
    addr: SocketAddr,
    id: &str,
    clean_start: bool,
    expiry: u32,
) -> Option<(RawClient, bool)> {
    let stream = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    let _ = stream.set_nodelay(true);
    let mut c = RawClient::over(stream, ProtocolVersion::V5);
    c.try_send(&connect_packet(id, clean_start, expiry))
        .await
        .ok()?;
    match c.recv_within(Duration::from_secs(10)).await {
        Ok(Some(Packet::ConnAck(ack))) if ack.reason_code == ReasonCode::SUCCESS => {
            Some((c, ack.session_present))
        }
        _ => None,
    }
}

/// Connects (persistent session for subscribers, clean session for ids containing `pub`).
async fn connected(addr: SocketAddr, id: &str, clean_start: bool) -> (RawClient, bool) {
    let expiry = if id.contains("pub") { 0 } else { 3600 };
    try_connect(addr, id, clean_start, expiry)
        .await
        .expect("CONNACK success")
}

fn pid(n: u16) -> PacketId {
    PacketId::new(n).expect("nonzero")
}

async fn subscribe(c: &mut RawClient, filter: &str) {
    subscribe_qos(c, filter, QoS::AtLeastOnce).await;
}

fn publish(topic: &str, packet_id: u16, payload: String, retain: bool) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain,
        topic: ByteStr::from(topic),
        packet_id: Some(pid(packet_id)),
        properties: PublishProperties::default(),
        payload: Bytes::from(payload),
    })
}

/// Receives (and acknowledges) PUBLISHes until every number in `expected` was seen; returns the
/// numbers received (payload `msg-N`).
async fn receive_all(sub: &mut RawClient, expected: &BTreeSet<u32>) -> BTreeSet<u32> {
    let mut received = BTreeSet::new();
    while !expected.is_subset(&received) {
        let next = sub
            .recv_within(Duration::from_secs(10))
            .await
            .unwrap_or_else(|()| {
                let missing: Vec<&u32> = expected.difference(&received).collect();
                panic!(
                    "{} of {} received; missing {missing:?}",
                    received.len(),
                    expected.len()
                )
            });
        match next {
            Some(Packet::Publish(p)) => {
                if let Some(n) = std::str::from_utf8(&p.payload)
                    .ok()
                    .and_then(|s| s.strip_prefix("msg-")?.parse().ok())
                {
                    received.insert(n);
                }
                if let Some(id) = p.packet_id {
                    sub.send(&Packet::PubAck(PubResponse::success(id))).await;
                }
            }
            Some(_) => {}
            None => panic!(
                "connection closed after {} of {} messages",
                received.len(),
                expected.len()
            ),
        }
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_acknowledged_state_survives_kill_9() {
    const N: u32 = 200;
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = NodeSpec::new(1, dir.path().join("data"));

    let node = Node::start(&spec).await;
    let (mut sub, present) = connected(spec.mqtt_addr(), "durable-sub", true).await;
    assert!(!present);
    subscribe(&mut sub, "orders/#").await;
    sub.send(&Packet::Disconnect(Default::default())).await;
    drop(sub);
    let (mut publ, _) = connected(spec.mqtt_addr(), "publisher", true).await;
    for n in 1..=N {
        publ.send(&publish("orders/new", n as u16, format!("msg-{n}"), false))
            .await;
    }
    publ.send(&publish(
        "config/site",
        (N + 1) as u16,
        format!("msg-{}", N + 1),
        true,
    ))
    .await;
    let mut acked = 0;
    while acked < N + 1 {
        match publ.recv().await {
            Some(Packet::PubAck(a)) => {
                assert!(a.reason_code.is_success(), "{a:?}");
                acked += 1;
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    node.kill9();

    let node = Node::start(&spec).await;
    let (mut sub, present) = connected(spec.mqtt_addr(), "durable-sub", false).await;
    assert!(present, "the persistent session survives kill -9");
    let expected: BTreeSet<u32> = (1..=N).collect();
    assert_eq!(receive_all(&mut sub, &expected).await, expected);
    // The retained message too, and the subscription still routes new messages.
    subscribe(&mut sub, "config/#").await;
    match sub.recv().await {
        Some(Packet::Publish(p)) => {
            assert!(p.retain);
            assert_eq!(&p.payload[..], format!("msg-{}", N + 1).as_bytes());
        }
        other => panic!("expected the retained message, got {other:?}"),
    }
    let (mut publ, _) = connected(spec.mqtt_addr(), "publisher", true).await;
    publ.send(&publish("orders/late", 1, "msg-9999".into(), false))
        .await;
    receive_all(&mut sub, &[9999].into()).await;
    node.kill9();
}

/// Publishes `msg-{from..to}` through `addr` until every one is acknowledged, reconnecting when
/// the broker refuses (no quorum during an election). Returns the acknowledged numbers.
async fn publish_acked(addr: SocketAddr, from: u32, to: u32, deadline: Instant) -> BTreeSet<u32> {
    let mut acked = BTreeSet::new();
    let mut next = from;
    while next < to {
        assert!(
            Instant::now() < deadline,
            "publishing {from}..{to} did not finish; acked {}",
            acked.len()
        );
        let Some((mut publ, _)) = try_connect(addr, "loader", true, 0).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        // A window of 16 outstanding messages; packet id = position in the window.
        'conn: while next < to {
            let batch: Vec<u32> = (next..to.min(next + 16)).collect();
            let mut by_pid = BTreeMap::new();
            for (i, n) in batch.iter().enumerate() {
                let id = i as u16 + 1;
                by_pid.insert(id, *n);
                if publ
                    .try_send(&publish("orders/load", id, format!("msg-{n}"), false))
                    .await
                    .is_err()
                {
                    break 'conn;
                }
            }
            while !by_pid.is_empty() {
                match publ.recv_within(Duration::from_secs(10)).await {
                    Ok(Some(Packet::PubAck(a))) if a.reason_code.is_success() => {
                        if let Some(n) = by_pid.remove(&a.packet_id.get()) {
                            acked.insert(n);
                        }
                    }
                    // Refused (DISCONNECT 0x89 while there is no quorum) or closed: resend the
                    // unacknowledged ones on a new connection.
                    _ => {
                        next = by_pid.values().copied().min().unwrap_or(next);
                        break 'conn;
                    }
                }
            }
            next = batch.last().map_or(next, |n| n + 1);
        }
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_keeps_acknowledged_messages_when_the_leader_and_then_the_client_node_are_killed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (specs, mut nodes, leader) = start_cluster(dir.path()).await;
    let ports: Vec<u16> = specs.iter().map(|s| s.http).collect();
    // Clients use a follower, so killing the leader does not cut them off.
    let client = first_follower(&specs, leader);
    let addr = specs[client].mqtt_addr();
    let deadline = Instant::now() + Duration::from_secs(120);

    let (mut sub, _) = connected(addr, "cluster-sub", true).await;
    subscribe(&mut sub, "orders/#").await;
    sub.send(&Packet::Disconnect(Default::default())).await;
    drop(sub);

    let mut acked = publish_acked(addr, 0, 150, deadline).await;
    // kill -9 the leader under load, keep publishing through the election, restart it.
    let leader_idx = specs
        .iter()
        .position(|s| s.id == leader)
        .expect("leader index");
    if let Some(n) = nodes[leader_idx].take() {
        n.kill9();
    }
    acked.extend(publish_acked(addr, 150, 300, deadline).await);
    nodes[leader_idx] = Some(Node::spawn(&specs[leader_idx]));
    wait_converged(&ports, 3).await;
    acked.extend(publish_acked(addr, 300, 400, deadline).await);
    // kill -9 the node the clients use; restart it from its data dir.
    if let Some(n) = nodes[client].take() {
        n.kill9();
    }
    nodes[client] = Some(Node::start(&specs[client]).await);
    wait_converged(&ports, 3).await;
    let (mut sub, present) = connected(addr, "cluster-sub", false).await;
    assert!(present, "the persistent session survives");
    let received = receive_all(&mut sub, &acked).await;
    assert!(acked.is_subset(&received));
    assert_eq!(
        acked.len(),
        400,
        "every message was eventually acknowledged"
    );
    println!(
        "cluster chaos: {} acknowledged, {} delivered, 0 missing",
        acked.len(),
        received.len()
    );
}

fn faults_file(dir: &std::path::Path) -> PathBuf {
    dir.join("faults")
}

/// Cuts the cluster network of [`start_cluster`] in `dir` into `sides` (node ids); no sides
/// heals it. Clients still reach every node.
fn partition(dir: &std::path::Path, sides: &[&[u64]]) {
    let text: String = sides
        .iter()
        .map(|side| {
            let ids: Vec<String> = side.iter().map(u64::to_string).collect();
            ids.join(" ") + "\n"
        })
        .collect();
    std::fs::write(faults_file(dir), text).expect("write the faults file");
}

/// Starts a 3-node cluster in `dir`; returns the specs, the running nodes and the leader id.
/// Index of the first node that is not `leader`.
fn first_follower(specs: &[NodeSpec], leader: u64) -> usize {
    specs
        .iter()
        .position(|s| s.id != leader)
        .expect("a follower")
}

async fn start_cluster(dir: &std::path::Path) -> (Vec<NodeSpec>, Vec<Option<Node>>, u64) {
    let mut specs: Vec<NodeSpec> = (1..=3)
        .map(|id| NodeSpec::new(id, dir.join(format!("n{id}"))))
        .collect();
    let seeds: Vec<String> = specs
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.cluster))
        .collect();
    for s in &mut specs {
        s.seeds = seeds.clone();
        // Partitions are written to this file (see `partition`); absent: a healthy network.
        s.env.push((
            "RAFTMQ_CLUSTER__FAULTS_FILE".into(),
            faults_file(dir).display().to_string(),
        ));
    }
    let nodes: Vec<Option<Node>> = specs.iter().map(|s| Some(Node::spawn(s))).collect();
    let ports: Vec<u16> = specs.iter().map(|s| s.http).collect();
    let leader = wait_converged(&ports, 3).await;
    (specs, nodes, leader)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_quorum_refuses_durable_writes_and_recovers_by_itself() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (specs, mut nodes, _) = start_cluster(dir.path()).await;
    let survivor = 0;
    let addr = specs[survivor].mqtt_addr();
    let (mut sub, _) = connected(addr, "q-sub", true).await;
    subscribe(&mut sub, "orders/#").await;
    let (mut clean_sub, _) = try_connect(addr, "q-clean-sub", true, 0)
        .await
        .expect("CONNACK");
    subscribe(&mut clean_sub, "orders/#").await;
    // Two of three nodes gone: no quorum.
    for i in [1, 2] {
        if let Some(n) = nodes[i].take() {
            n.kill9();
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(specs[survivor].http).await {
        assert!(
            Instant::now() < deadline,
            "the node still reports ready without a quorum"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Without a quorum for a while, the node lets go of its persistent sessions (it could be
    // the minority side of a partition, whose sessions the majority adopts): their clients are
    // sent to another member.
    match sub.recv_within(Duration::from_secs(20)).await {
        Ok(Some(Packet::Disconnect(d))) => {
            assert_eq!(d.reason_code, ReasonCode::USE_ANOTHER_SERVER);
            assert!(d.properties.server_reference.is_some());
        }
        other => panic!("expected the persistent session fenced with 0x9C, got {other:?}"),
    }
    // A QoS 1 publish matching the persistent session is refused, not acknowledged.
    let (mut publ, _) = connected(addr, "q-pub", true).await;
    publ.send(&publish("orders/q1", 1, "msg-1".into(), false))
        .await;
    // MQTT 5: no PUBACK, and the client is sent to another member (0x9C + Server Reference).
    let others: Vec<String> = specs
        .iter()
        .filter(|s| s.id != specs[survivor].id)
        .map(|s| s.mqtt_addr().to_string())
        .collect();
    match publ.recv_within(Duration::from_secs(20)).await {
        Ok(Some(Packet::Disconnect(d))) => {
            assert_eq!(d.reason_code, ReasonCode::USE_ANOTHER_SERVER);
            let reference = d.properties.server_reference.expect("a Server Reference");
            assert!(
                others.iter().any(|o| o == reference.as_str()),
                "{reference} is not another member's MQTT address ({others:?})"
            );
        }
        other => {
            panic!("expected DISCONNECT 0x9C with a Server Reference (no PUBACK), got {other:?}")
        }
    }
    // A persistent session cannot be opened either: CONNACK 0x9C with the reference.
    let mut refused = RawClient::connect(addr, ProtocolVersion::V5).await;
    refused.send(&connect_packet("q-late", true, 3600)).await;
    match refused.recv_within(Duration::from_secs(20)).await {
        Ok(Some(Packet::ConnAck(ack))) => {
            assert_eq!(ack.reason_code, ReasonCode::USE_ANOTHER_SERVER);
            assert!(ack.properties.server_reference.is_some());
        }
        other => panic!("expected CONNACK 0x9C, got {other:?}"),
    }
    // QoS 0 and online delivery keep working without consensus.
    let (mut publ, _) = connected(addr, "q-pub0", true).await;
    publ.send(&Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: ByteStr::from("orders/zero"),
        packet_id: None,
        properties: PublishProperties::default(),
        payload: Bytes::from_static(b"msg-0"),
    }))
    .await;
    receive_all(&mut clean_sub, &[0].into()).await;
    // Quorum returns: the node becomes ready and durable writes are acknowledged again.
    nodes[1] = Some(Node::spawn(&specs[1]));
    let deadline = Instant::now() + START_TIMEOUT;
    while !ready(specs[survivor].http).await {
        assert!(Instant::now() < deadline, "not ready after quorum returned");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let acked = publish_acked(addr, 10, 20, Instant::now() + Duration::from_secs(60)).await;
    assert_eq!(acked.len(), 10);
    // The node took its persistent session back: it resumes here with what was stored for it.
    let (mut sub, present) = connected(addr, "q-sub", false).await;
    assert!(
        present,
        "the fenced session was restored when the quorum returned"
    );
    receive_all(&mut sub, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_cold_restart_recovers_without_an_operator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (specs, mut nodes, _) = start_cluster(dir.path()).await;
    let addr = specs[2].mqtt_addr();
    let (mut sub, _) = connected(addr, "cold-sub", true).await;
    subscribe(&mut sub, "orders/#").await;
    sub.send(&Packet::Disconnect(Default::default())).await;
    drop(sub);
    let acked = publish_acked(addr, 0, 50, Instant::now() + Duration::from_secs(60)).await;
    // Every node killed at once, then all started again with their data dirs.
    for n in nodes.iter_mut() {
        if let Some(n) = n.take() {
            n.kill9();
        }
    }
    let nodes: Vec<Node> = specs.iter().map(Node::spawn).collect();
    let ports: Vec<u16> = specs.iter().map(|s| s.http).collect();
    wait_converged(&ports, 3).await;
    let (mut sub, present) = connected(addr, "cold-sub", false).await;
    assert!(present);
    assert_eq!(receive_all(&mut sub, &acked).await, acked);
    drop(nodes);
}

/// Publishes `msg-N` for N in `range` to `topic` as QoS 1 through a clean session on `addr`,
/// each acknowledged before the next (a refused one fails the test).
async fn publish_each(addr: SocketAddr, topic: &str, range: std::ops::Range<u32>, retain: bool) {
    let (mut publ, _) = connected(addr, "pub-each", true).await;
    for n in range {
        publ.send(&publish(topic, 1, format!("msg-{n}"), retain))
            .await;
        match publ.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::PubAck(a))) if a.reason_code.is_success() => {}
            other => panic!("publish {n} to {topic} not acknowledged: {other:?}"),
        }
    }
    publ.send(&Packet::Disconnect(Default::default())).await;
}

/// Waits until a fresh clean session on `addr` subscribing to `filter` is sent the retained
/// `msg-N` (replication to that node's broker is asynchronous, so it may take a moment).
async fn wait_retained(addr: SocketAddr, filter: &str, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let want = format!("msg-{n}");
    loop {
        let (mut c, _) = connected(addr, "pub-retained-probe", true).await;
        subscribe(&mut c, filter).await;
        if let Ok(Some(Packet::Publish(p))) = c.recv_within(Duration::from_millis(500)).await
            && p.retain
            && p.payload == want.as_bytes()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "retained {want} never reached {addr}"
        );
    }
}

/// A persistent session follows its client across nodes: a CONNECT on node B takes the session
/// over from node A (A's connection gets DISCONNECT 0x8E and B resumes the subscriptions), and
/// messages queued for it while offline on B are delivered when it comes back on node C.
/// Retained messages set through one node are served by every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_move_between_nodes_and_retained_messages_are_served_everywhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (specs, _nodes, _leader) = start_cluster(dir.path()).await;
    let (a, b, c) = (
        specs[0].mqtt_addr(),
        specs[1].mqtt_addr(),
        specs[2].mqtt_addr(),
    );

    // Retained through A, seen from B and C.
    publish_each(a, "cfg/site", 1..2, true).await;
    wait_retained(b, "cfg/#", 1).await;
    wait_retained(c, "cfg/#", 1).await;

    // The session starts on A.
    let (mut on_a, present) = connected(a, "mover", true).await;
    assert!(!present);
    subscribe(&mut on_a, "jobs/#").await;

    // Taken over from B: A's connection is told 0x8E and closed; B resumes the session.
    let (mut on_b, present) = connected(b, "mover", false).await;
    assert!(present, "the session created on A is resumed on B");
    match on_a.recv_within(Duration::from_secs(10)).await {
        Ok(Some(Packet::Disconnect(d))) => {
            assert_eq!(d.reason_code, ReasonCode::SESSION_TAKEN_OVER);
        }
        other => panic!("the connection on A was not taken over: {other:?}"),
    }
    publish_each(b, "jobs/now", 10..20, false).await;
    let expected: BTreeSet<u32> = (10..20).collect();
    assert_eq!(receive_all(&mut on_b, &expected).await, expected);

    // Offline on B: messages queue for the session; it comes back through C and gets them.
    on_b.send(&Packet::Disconnect(Default::default())).await;
    drop(on_b);
    publish_each(b, "jobs/later", 20..30, false).await;
    let (mut on_c, present) = connected(c, "mover", false).await;
    assert!(present, "the session is resumed on C");
    let expected: BTreeSet<u32> = (20..30).collect();
    assert_eq!(receive_all(&mut on_c, &expected).await, expected);
    println!(
        "session moved A → B → C; 10 live and 10 queued messages delivered, retained seen on 3 nodes"
    );
}

/// QoS 1 messages published on node A for a persistent session owned by node B are stored for
/// it before A's PUBACK: delivered live while its client is connected to B, and still there
/// after B is killed with -9 and the client reconnects to node C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_for_a_session_on_another_node_survive_that_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (specs, mut nodes, _leader) = start_cluster(dir.path()).await;
    let ports: Vec<u16> = specs.iter().map(|s| s.http).collect();
    let (a, b, c) = (
        specs[0].mqtt_addr(),
        specs[1].mqtt_addr(),
        specs[2].mqtt_addr(),
    );

    let (mut on_b, _) = connected(b, "remote-sub", true).await;
    subscribe(&mut on_b, "alerts/#").await;
    // Every node has applied the subscription (A matches it from the replicated state).
    wait_converged(&ports, 3).await;

    // Live: published on A, delivered to the client on B.
    publish_each(a, "alerts/live", 100..110, false).await;
    let expected: BTreeSet<u32> = (100..110).collect();
    assert_eq!(receive_all(&mut on_b, &expected).await, expected);

    // Offline on B; published on A (acknowledged); B dies; the client comes back on C.
    on_b.send(&Packet::Disconnect(Default::default())).await;
    drop(on_b);
    wait_converged(&ports, 3).await;
    publish_each(a, "alerts/queued", 110..130, false).await;
    if let Some(node) = nodes[1].take() {
        node.kill9();
    }
    let (mut on_c, present) = connected(c, "remote-sub", false).await;
    assert!(present, "the session survives its node");
    let expected: BTreeSet<u32> = (110..130).collect();
    assert_eq!(receive_all(&mut on_c, &expected).await, expected);
    println!(
        "published on A, subscriber's node B killed: 20 of 20 acknowledged messages delivered on C"
    );
}

/// Receives PUBLISHes (acknowledging QoS 1) until `n` arrived or nothing came for 3 s; returns
/// the numbers in arrival order (duplicates included).
async fn collect(sub: &mut RawClient, n: usize) -> Vec<u32> {
    collect_in(sub, n, 0..u32::MAX).await
}

/// [`collect`], counting only numbers in `range` (others, e.g. leftover probes, are skipped).
async fn collect_in(sub: &mut RawClient, n: usize, range: std::ops::Range<u32>) -> Vec<u32> {
    let mut got = Vec::new();
    while got.len() < n {
        match sub.recv_within(Duration::from_secs(3)).await {
            Ok(Some(Packet::Publish(p))) => {
                if let Some(id) = p.packet_id {
                    sub.send(&Packet::PubAck(PubResponse::success(id))).await;
                }
                if let Some(k) = std::str::from_utf8(&p.payload)
                    .ok()
                    .and_then(|s| s.strip_prefix("msg-")?.parse::<u32>().ok())
                    .filter(|k| range.contains(k))
                {
                    got.push(k);
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    got
}

async fn subscribe_qos(c: &mut RawClient, filter: &str, qos: QoS) {
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: pid(1),
        properties: SubscribeProperties::default(),
        filters: vec![SubscribeFilter {
            filter: ByteStr::from(filter),
            options: SubscriptionOptions {
                qos,
                ..Default::default()
            },
        }],
    }))
    .await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
}

/// Publishes QoS 0 `msg-N` for N in `range` to `topic` through a clean session on `addr`.
async fn publish_qos0(addr: SocketAddr, topic: &str, range: std::ops::Range<u32>) {
    let (mut publ, _) = connected(addr, "pub-qos0", true).await;
    for n in range {
        publ.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: ByteStr::from(topic),
            packet_id: None,
            properties: PublishProperties::default(),
            payload: Bytes::from(format!("msg-{n}")),
        }))
        .await;
    }
    publ.send(&Packet::Disconnect(Default::default())).await;
}

/// Live routing between nodes: subscribers on B (clean and persistent, wildcard filters) get
/// QoS 0 and QoS 1 messages published on A exactly once, and a shared subscription with members
/// on B and C gets each message exactly once cluster-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_on_one_node_reach_subscribers_on_the_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (specs, _nodes, _leader) = start_cluster(dir.path()).await;
    let ports: Vec<u16> = specs.iter().map(|s| s.http).collect();
    let (a, b, c) = (
        specs[0].mqtt_addr(),
        specs[1].mqtt_addr(),
        specs[2].mqtt_addr(),
    );
    let (mut clean, _) = connected(b, "pub-like-clean-sub", true).await;
    subscribe_qos(&mut clean, "live/+/x", QoS::AtLeastOnce).await;
    let (mut durable, _) = connected(b, "durable-live", true).await;
    subscribe_qos(&mut durable, "live/#", QoS::AtLeastOnce).await;
    let (mut worker_b, _) = connected(b, "pub-like-worker-b", true).await;
    subscribe_qos(&mut worker_b, "$share/g/work/#", QoS::AtLeastOnce).await;
    let (mut worker_c, _) = connected(c, "pub-like-worker-c", true).await;
    subscribe_qos(&mut worker_c, "$share/g/work/#", QoS::AtLeastOnce).await;
    wait_converged(&ports, 3).await;

    // Routes reach A asynchronously: probe until the clean subscriber on B gets one.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        publish_each(a, "live/probe/x", 0..1, false).await;
        let got = collect(&mut clean, 1).await;
        if got == [0] {
            break;
        }
        assert!(Instant::now() < deadline, "routes never reached node A");
    }
    // The persistent subscriber got the probes too (through the replicated log).
    assert_eq!(collect(&mut durable, 1).await, [0]);

    publish_qos0(a, "live/q0/x", 1..51).await;
    publish_each(a, "live/q1/x", 51..101, false).await;
    let expected: Vec<u32> = (1..101).collect();
    let mut got = collect_in(&mut clean, 100, 1..101).await;
    got.sort_unstable();
    assert_eq!(got, expected, "clean subscriber on B");
    let mut got = collect_in(&mut durable, 100, 1..101).await;
    got.sort_unstable();
    assert_eq!(
        got, expected,
        "persistent subscriber on B: each message exactly once"
    );

    publish_each(a, "work/1", 200..240, false).await;
    let from_b = collect(&mut worker_b, 40).await;
    let from_c = collect(&mut worker_c, 40 - from_b.len()).await;
    let mut all: Vec<u32> = from_b.iter().chain(&from_c).copied().collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (200..240).collect::<Vec<_>>(),
        "each shared message to exactly one member (B got {}, C got {})",
        from_b.len(),
        from_c.len()
    );
    // What operators see: forwarding counted per peer on A, delivery latency observed on B.
    let (_, metrics_a) = http_get(specs[0].http, "/metrics").await;
    let forwarded_to_b = format!("raftmq_forward_messages_total{{peer=\"{}\"}}", specs[1].id);
    assert!(
        metrics_a.lines().any(|l| l.starts_with(&forwarded_to_b)),
        "no {forwarded_to_b} on node A"
    );
    let (_, metrics_b) = http_get(specs[1].http, "/metrics").await;
    let latency_count = metrics_b
        .lines()
        .find_map(|l| l.strip_prefix("raftmq_messages_delivery_latency_seconds_count "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(
        latency_count >= 100.0,
        "delivery latency samples on B: {latency_count}"
    );
    println!(
        "cross-node: 100 of 100 to B (clean and persistent); shared 40 = {} on B + {} on C",
        from_b.len(),
        from_c.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Chaos: kill -9 and restart nodes, and partition them off (the leader, the subscribers'
// nodes), under a steady durable QoS 1 and QoS 2 load, clients reconnecting to other nodes.
// Bounded: RAFTMQ_CHAOS_SECONDS (default 60) of chaos, then every acknowledged message must
// reach every persistent subscriber, QoS 2 exactly once.
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct ChaosState {
    acked: BTreeSet<u32>,
    received: BTreeMap<String, Vec<u32>>,
    /// QoS 2: acknowledged (PUBREC) by the broker, and received by each subscriber (counting
    /// a PUBLISH once per exchange, as an MQTT receiver does).
    acked_q2: BTreeSet<u32>,
    received_q2: BTreeMap<String, Vec<u32>>,
    /// The QoS 2 publisher's persistent session was missing on a reconnect (must not happen).
    q2_session_lost: u32,
    /// Index of the node each subscriber is connected to (usize::MAX: none).
    sub_node: BTreeMap<String, usize>,
    publish_reconnects: u32,
    subscriber_reconnects: u32,
}

type Shared = std::sync::Arc<std::sync::Mutex<ChaosState>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, ChaosState> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Publishes msg-0, msg-1, ... (QoS 1, one at a time) until `stop`, moving to the next node
/// whenever a publish is not acknowledged; an unacknowledged number is retried.
async fn chaos_publisher(
    addrs: Vec<SocketAddr>,
    state: Shared,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let mut n = 0u32;
    let mut node = 0usize;
    'outer: while !stop.load(Ordering::Relaxed) {
        let Some((mut c, _)) = try_connect(addrs[node], "pub-chaos", true, 0).await else {
            node = (node + 1) % addrs.len();
            lock(&state).publish_reconnects += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            let sent = c
                .try_send(&publish("chaos/load", 1, format!("msg-{n}"), false))
                .await;
            let acked = sent.is_ok()
                && matches!(
                    c.recv_within(Duration::from_secs(6)).await,
                    Ok(Some(Packet::PubAck(a))) if a.reason_code.is_success()
                );
            if !acked {
                node = (node + 1) % addrs.len();
                lock(&state).publish_reconnects += 1;
                continue 'outer;
            }
            lock(&state).acked.insert(n);
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// Publishes q2-0, q2-1, ... at QoS 2, one exchange at a time, from a persistent session, until
/// `stop`. On a reconnect (to the next node) it resumes the exchange in flight as MQTT requires:
/// PUBLISH again with DUP and the same packet id before PUBREC, PUBREL after it. A message
/// counts as acknowledged at PUBREC.
async fn chaos_publisher_qos2(
    addrs: Vec<SocketAddr>,
    state: Shared,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let mut n = 0u32;
    let mut node = 1usize;
    let mut connected_before = false;
    // (packet id, number, PUBREC received)
    let mut in_flight: Option<(PacketId, u32, bool)> = None;
    let packet = |pid: PacketId, k: u32, dup: bool| {
        Packet::Publish(Publish {
            dup,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: ByteStr::from("chaos2/load"),
            packet_id: Some(pid),
            properties: PublishProperties::default(),
            payload: Bytes::from(format!("q2-{k}")),
        })
    };
    'outer: while !stop.load(Ordering::Relaxed) || in_flight.is_some_and(|f| f.2) {
        let Some((mut c, present)) = try_connect(addrs[node], "chaos-q2-pub", false, 3600).await
        else {
            node = (node + 1) % addrs.len();
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if connected_before && !present {
            lock(&state).q2_session_lost += 1;
        }
        connected_before = true;
        if let Some((pid, k, released)) = in_flight {
            let resend = if released {
                Packet::PubRel(PubResponse::success(pid))
            } else {
                packet(pid, k, true)
            };
            if c.try_send(&resend).await.is_err() {
                node = (node + 1) % addrs.len();
                continue;
            }
        }
        loop {
            if in_flight.is_none() {
                if stop.load(Ordering::Relaxed) {
                    break 'outer;
                }
                let pid =
                    PacketId::new(u16::try_from(n % 60_000 + 1).unwrap_or(1)).expect("nonzero");
                in_flight = Some((pid, n, false));
                if c.try_send(&packet(pid, n, false)).await.is_err() {
                    break;
                }
            }
            let Some((pid, k, _)) = in_flight else { break };
            match c.recv_within(Duration::from_secs(6)).await {
                Ok(Some(Packet::PubRec(r))) if r.packet_id == pid => {
                    if !r.reason_code.is_success() {
                        // Refused (not routed): the same number again as a new message.
                        in_flight = None;
                        continue;
                    }
                    lock(&state).acked_q2.insert(k);
                    in_flight = Some((pid, k, true));
                    if c.try_send(&Packet::PubRel(PubResponse::success(pid)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(Some(Packet::PubComp(r))) if r.packet_id == pid => {
                    in_flight = None;
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(()) => break,
            }
        }
        node = (node + 1) % addrs.len();
    }
}

/// A persistent subscriber: reconnects (clean start off) to the next node whenever its
/// connection ends, records what it receives, acknowledges everything.
async fn chaos_subscriber(
    id: String,
    addrs: Vec<SocketAddr>,
    first: usize,
    state: Shared,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    use std::sync::atomic::Ordering;
    let mut node = first;
    // QoS 2 packet ids received and not yet released: a PUBLISH with one of them is the same
    // message again (client-side session state, kept across reconnections).
    let mut unreleased: BTreeSet<u16> = BTreeSet::new();
    while !stop.load(Ordering::Relaxed) {
        let Some((mut c, _)) = try_connect(addrs[node], &id, false, 3600).await else {
            node = (node + 1) % addrs.len();
            lock(&state).subscriber_reconnects += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        lock(&state).sub_node.insert(id.clone(), node);
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match c.recv_within(Duration::from_millis(500)).await {
                Ok(Some(Packet::Publish(p))) if p.qos == QoS::ExactlyOnce => {
                    let Some(pid) = p.packet_id else { break };
                    if unreleased.insert(pid.get())
                        && let Some(k) = std::str::from_utf8(&p.payload)
                            .ok()
                            .and_then(|s| s.strip_prefix("q2-")?.parse().ok())
                    {
                        lock(&state)
                            .received_q2
                            .entry(id.clone())
                            .or_default()
                            .push(k);
                    }
                    if c.try_send(&Packet::PubRec(PubResponse::success(pid)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(Some(Packet::PubRel(r))) => {
                    unreleased.remove(&r.packet_id.get());
                    if c.try_send(&Packet::PubComp(PubResponse::success(r.packet_id)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(Some(Packet::Publish(p))) => {
                    if let Some(pid) = p.packet_id
                        && c.try_send(&Packet::PubAck(PubResponse::success(pid)))
                            .await
                            .is_err()
                    {
                        break;
                    }
                    if let Some(k) = std::str::from_utf8(&p.payload)
                        .ok()
                        .and_then(|s| s.strip_prefix("msg-")?.parse().ok())
                    {
                        lock(&state).received.entry(id.clone()).or_default().push(k);
                    }
                }
                Ok(Some(_)) | Err(()) => {}
                Ok(None) => break,
            }
        }
        lock(&state).sub_node.insert(id.clone(), usize::MAX);
        lock(&state).subscriber_reconnects += 1;
        node = (node + 1) % addrs.len();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_9_leader_and_subscriber_nodes_under_durable_load_loses_nothing_acknowledged() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let chaos_secs: u64 = std::env::var("RAFTMQ_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let dir = tempfile::tempdir().expect("tempdir");
    let (specs, mut nodes, _leader) = start_cluster(dir.path()).await;
    let ports: Vec<u16> = specs.iter().map(|s| s.http).collect();
    let addrs: Vec<SocketAddr> = specs.iter().map(NodeSpec::mqtt_addr).collect();
    let subs = ["chaos-sub-1", "chaos-sub-2"];

    // Persistent sessions with their subscriptions, on nodes 2 and 3.
    for (i, id) in subs.iter().enumerate() {
        let (mut c, _) = connected(addrs[i + 1], id, true).await;
        subscribe(&mut c, "chaos/#").await;
        subscribe_qos(&mut c, "chaos2/#", QoS::ExactlyOnce).await;
        c.send(&Packet::Disconnect(Default::default())).await;
    }
    wait_converged(&ports, 3).await;

    let state: Shared = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, id) in subs.iter().enumerate() {
        tasks.push(tokio::spawn(chaos_subscriber(
            id.to_string(),
            addrs.clone(),
            i + 1,
            state.clone(),
            stop.clone(),
        )));
    }
    let stop_pub = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(chaos_publisher(
        addrs.clone(),
        state.clone(),
        stop_pub.clone(),
    ));
    let publisher_q2 = tokio::spawn(chaos_publisher_qos2(
        addrs.clone(),
        state.clone(),
        stop_pub.clone(),
    ));

    // The schedule, in rounds: kill -9 the leader; kill -9 a subscriber's node; cut a node off
    // (alternately a subscriber's node and the leader) from the other two for longer than the
    // cluster takes to declare it down, then heal. A killed node stays down a few seconds and
    // is restarted; the cluster settles after every round.
    let end = Instant::now() + Duration::from_secs(chaos_secs);
    let mut round = 0usize;
    let mut kills = Vec::new();
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let leader = cluster_status(ports[0])
            .await
            .or(cluster_status(ports[1]).await)
            .or(cluster_status(ports[2]).await)
            .and_then(|v| v["leader"].as_u64());
        let partitioned = round % 3 == 2;
        let target_leader =
            round.is_multiple_of(3) || (partitioned && (round / 3).is_multiple_of(2));
        let victim = if target_leader {
            leader.and_then(|l| specs.iter().position(|s| s.id == l))
        } else {
            let sub = subs[(round / 3) % subs.len()];
            lock(&state)
                .sub_node
                .get(sub)
                .copied()
                .filter(|n| *n < specs.len())
        }
        .unwrap_or(round % specs.len());
        let what = if target_leader {
            "leader"
        } else {
            "subscriber's node"
        };
        if partitioned {
            let cut = specs[victim].id;
            let rest: Vec<u64> = specs.iter().map(|s| s.id).filter(|id| *id != cut).collect();
            partition(dir.path(), &[&[cut], &rest]);
            kills.push(format!("partition {what} {cut}"));
            tokio::time::sleep(Duration::from_secs(12)).await;
            partition(dir.path(), &[]);
        } else {
            if let Some(n) = nodes[victim].take() {
                n.kill9();
                kills.push(format!("kill {what} {}", specs[victim].id));
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
            nodes[victim] = Some(Node::spawn(&specs[victim]));
        }
        converged_or_logs(&ports, &specs, &mut nodes).await;
        round += 1;
    }

    // Let the publisher finish its current message, then give subscribers time to drain.
    stop_pub.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(15), publisher).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), publisher_q2).await;
    let (acked, acked_q2) = {
        let st = lock(&state);
        (st.acked.clone(), st.acked_q2.clone())
    };
    assert!(
        acked.len() > 50 && acked_q2.len() > 20,
        "the load barely ran: {} QoS 1 and {} QoS 2 acknowledged",
        acked.len(),
        acked_q2.len()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing: Vec<(String, usize)> = {
            let st = lock(&state);
            subs.iter()
                .map(|id| {
                    let got: BTreeSet<u32> = st
                        .received
                        .get(*id)
                        .map(|v| v.iter().copied().collect())
                        .unwrap_or_default();
                    let got_q2: BTreeSet<u32> = st
                        .received_q2
                        .get(*id)
                        .map(|v| v.iter().copied().collect())
                        .unwrap_or_default();
                    (
                        id.to_string(),
                        acked.difference(&got).count() + acked_q2.difference(&got_q2).count(),
                    )
                })
                .filter(|(_, m)| *m > 0)
                .collect()
        };
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acknowledged messages never delivered: {missing:?} (of {} acknowledged; kills: {kills:?})",
            acked.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    let st = lock(&state);
    for id in subs {
        let got = &st.received[id];
        let distinct: BTreeSet<u32> = got.iter().copied().collect();
        println!(
            "chaos {id} QoS 1: {} acknowledged, {} received ({} distinct, {} duplicates), 0 missing",
            acked.len(),
            got.len(),
            distinct.len(),
            got.len() - distinct.len()
        );
        let got = &st.received_q2[id];
        let distinct: BTreeSet<u32> = got.iter().copied().collect();
        println!(
            "chaos {id} QoS 2: {} acknowledged, {} received ({} distinct, {} duplicates), 0 missing",
            acked_q2.len(),
            got.len(),
            distinct.len(),
            got.len() - distinct.len()
        );
        assert_eq!(
            got.len(),
            distinct.len(),
            "QoS 2 delivered more than once to {id} (kills: {kills:?})"
        );
    }
    assert_eq!(
        st.q2_session_lost, 0,
        "the QoS 2 publisher's session was lost"
    );
    println!(
        "chaos: {} rounds in {chaos_secs}s ({kills:?}); publisher reconnects {}, subscriber reconnects {}",
        round, st.publish_reconnects, st.subscriber_reconnects
    );
}

/// A node that dies is declared down by the leader (a committed command, after
/// `NODE_DOWN_AFTER` without its stream): the leader adopts its persistent sessions, so the will
/// of a client that was connected to it is published once, and the session expires on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_node_dies_its_clients_wills_fire_once_and_their_sessions_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (specs, mut nodes, leader) = start_cluster(dir.path()).await;
    let ports: Vec<u16> = specs.iter().map(|s| s.http).collect();
    // The doomed client on a follower; the will's subscriber on the other follower.
    let followers: Vec<usize> = (0..3).filter(|&i| specs[i].id != leader).collect();
    let (doomed_node, watcher_node) = (followers[0], followers[1]);

    let (mut watcher, _) = connected(specs[watcher_node].mqtt_addr(), "will-watcher", true).await;
    subscribe(&mut watcher, "wills/#").await;
    let mut doomed = RawClient::connect(specs[doomed_node].mqtt_addr(), ProtocolVersion::V5).await;
    doomed
        .send(&Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 60,
            client_id: ByteStr::from("doomed"),
            will: Some(raftmq_codec::Will {
                topic: ByteStr::from("wills/doomed"),
                payload: Bytes::from_static(b"msg-1"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Default::default(),
            }),
            username: None,
            password: None,
            properties: ConnectProperties {
                session_expiry_interval: Some(5),
                ..Default::default()
            },
        })))
        .await;
    assert!(matches!(
        doomed.recv().await,
        Some(Packet::ConnAck(a)) if a.reason_code == ReasonCode::SUCCESS
    ));
    wait_converged(&ports, 3).await;

    // kill -9 the doomed client's node: nobody there to publish the will.
    let killed_at = Instant::now();
    if let Some(n) = nodes[doomed_node].take() {
        n.kill9();
    }
    drop(doomed);
    let will = collect(&mut watcher, 1).await;
    let will = if will.is_empty() {
        // collect gives up after 3 s of silence; the declaration takes ~10 s.
        let mut got = Vec::new();
        while got.is_empty() && killed_at.elapsed() < Duration::from_secs(40) {
            got = collect(&mut watcher, 1).await;
        }
        got
    } else {
        will
    };
    assert_eq!(
        will,
        [1],
        "the will of a client of a dead node is published"
    );
    let took = killed_at.elapsed();
    assert!(
        collect(&mut watcher, 1).await.is_empty(),
        "the will is published once"
    );

    // The session (expiry 5 s, counted from the declaration) is gone once it expired.
    let expired_by = took + Duration::from_secs(9);
    tokio::time::sleep(expired_by.saturating_sub(killed_at.elapsed())).await;
    let (_c, present) = connected(specs[watcher_node].mqtt_addr(), "doomed", false).await;
    assert!(!present, "the session of the dead node's client expired");
    println!("node killed: will published after {took:?}, once; session expired");
}

/// Mutual TLS between nodes with the real binary: three nodes configured through
/// `RAFTMQ_CLUSTER__TLS_*` with certificates from one CA (SAN `127.0.0.1`, the host of their
/// cluster addresses) form a cluster, commit, and carry live forwarding over mTLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_over_mutual_tls_forms_and_forwards_messages() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let dir = tempfile::tempdir().expect("tempdir");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "raftmq cluster CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let ca_key = KeyPair::generate().expect("CA key");
    let ca = ca_params.self_signed(&ca_key).expect("CA");
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).expect("write CA");

    let mut specs: Vec<NodeSpec> = (1..=3)
        .map(|id| NodeSpec::new(id, dir.path().join(format!("n{id}"))))
        .collect();
    let seeds: Vec<String> = specs
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.cluster))
        .collect();
    for s in &mut specs {
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned()]).expect("params");
        let key = KeyPair::generate().expect("node key");
        let cert = params.signed_by(&key, &ca, &ca_key).expect("node cert");
        let (cert_file, key_file) = (
            dir.path().join(format!("n{}.crt", s.id)),
            dir.path().join(format!("n{}.key", s.id)),
        );
        std::fs::write(&cert_file, cert.pem()).expect("write cert");
        std::fs::write(&key_file, key.serialize_pem()).expect("write key");
        s.seeds = seeds.clone();
        s.env = [
            ("RAFTMQ_CLUSTER__TLS_CERT_FILE", &cert_file),
            ("RAFTMQ_CLUSTER__TLS_KEY_FILE", &key_file),
            ("RAFTMQ_CLUSTER__TLS_CA_FILE", &ca_file),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.display().to_string()))
        .collect();
    }
    let _nodes: Vec<Node> = specs.iter().map(Node::spawn).collect();
    let ports: Vec<u16> = specs.iter().map(|s| s.http).collect();
    wait_converged(&ports, 3).await;

    // Durable (Raft-committed) and live (forwarded) traffic between nodes, both over mTLS.
    let (a, b) = (specs[0].mqtt_addr(), specs[1].mqtt_addr());
    let (mut sub, _) = connected(b, "mtls-sub", true).await;
    subscribe_qos(&mut sub, "mtls/#", QoS::AtLeastOnce).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        publish_each(a, "mtls/probe", n..n + 1, true).await;
        if collect(&mut sub, 1).await == [n] {
            break;
        }
        n += 1;
        assert!(
            Instant::now() < deadline,
            "a message published on A never reached B"
        );
    }
    publish_each(a, "mtls/x", 100..120, false).await;
    let mut got = collect(&mut sub, 20).await;
    got.sort_unstable();
    assert_eq!(got, (100..120).collect::<Vec<_>>());
    // The retained message (committed through Raft) is served by the third node too.
    wait_retained(specs[2].mqtt_addr(), "mtls/probe", n).await;

    // The cluster port refuses plain TCP clients: a plaintext HTTP/2 preface gets no answer
    // but a closed connection or TLS alert.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", specs[0].cluster))
        .await
        .expect("connect to the cluster port");
    plain
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write preface");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), plain.read(&mut buf))
        .await
        .expect("the cluster port answers a plaintext client within 10 s");
    // An HTTP/2 server would answer with a SETTINGS frame (type 4 at byte 3).
    if let Ok(len) = read {
        assert!(
            len < 9 || buf[3] != 4,
            "the cluster port speaks plaintext HTTP/2: {:?}",
            &buf[..len]
        );
    }
}

/// QoS 2 across nodes: messages published with QoS 2 on node A reach a clean and a persistent
/// QoS 2 subscriber on node B exactly once each (four-way handshakes on both sides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_across_nodes_is_delivered_exactly_once() {
    const N: u32 = 40;
    let dir = tempfile::tempdir().expect("tempdir");
    let (specs, _nodes, _leader) = start_cluster(dir.path()).await;
    let ports: Vec<u16> = specs.iter().map(|s| s.http).collect();
    let (a, b) = (specs[0].mqtt_addr(), specs[1].mqtt_addr());
    let (mut clean, _) = connected(b, "pub-like-q2-clean", true).await;
    subscribe_qos(&mut clean, "q2/#", QoS::ExactlyOnce).await;
    let (mut durable, _) = connected(b, "q2-durable", true).await;
    subscribe_qos(&mut durable, "q2/#", QoS::ExactlyOnce).await;
    wait_converged(&ports, 3).await;
    tokio::time::sleep(Duration::from_millis(500)).await; // routes reach node A

    let (mut publ, _) = connected(a, "pub-q2", true).await;
    for n in 1..=N {
        let id = pid(u16::try_from(n).expect("small"));
        publ.send(&Packet::Publish(Publish {
            dup: false,
            qos: QoS::ExactlyOnce,
            retain: false,
            topic: ByteStr::from("q2/x"),
            packet_id: Some(id),
            properties: PublishProperties::default(),
            payload: Bytes::from(format!("msg-{n}")),
        }))
        .await;
        match publ.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::PubRec(r))) if r.reason_code.is_success() => {}
            other => panic!("PUBREC for {n}: {other:?}"),
        }
        publ.send(&Packet::PubRel(PubResponse::success(id))).await;
        match publ.recv_within(Duration::from_secs(10)).await {
            Ok(Some(Packet::PubComp(_))) => {}
            other => panic!("PUBCOMP for {n}: {other:?}"),
        }
    }

    for (name, sub) in [("clean", &mut clean), ("persistent", &mut durable)] {
        let mut got = Vec::new();
        loop {
            match sub.recv_within(Duration::from_secs(3)).await {
                Ok(Some(Packet::Publish(p))) => {
                    assert_eq!(p.qos, QoS::ExactlyOnce, "{name}");
                    let id = p.packet_id.expect("QoS 2 has a packet id");
                    sub.send(&Packet::PubRec(PubResponse::success(id))).await;
                    if let Some(k) = std::str::from_utf8(&p.payload)
                        .ok()
                        .and_then(|s| s.strip_prefix("msg-")?.parse::<u32>().ok())
                    {
                        got.push(k);
                    }
                }
                Ok(Some(Packet::PubRel(r))) => {
                    sub.send(&Packet::PubComp(PubResponse::success(r.packet_id)))
                        .await;
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        got.sort_unstable();
        assert_eq!(
            got,
            (1..=N).collect::<Vec<_>>(),
            "{name} QoS 2 subscriber on B: each message exactly once"
        );
    }
    println!("QoS 2 A → B: {N} of {N} exactly once to a clean and a persistent subscriber");
}

/// A node cut off from the other two stops serving the persistent sessions it can no longer
/// prove it owns: after `SELF_FENCE_AFTER` without a quorum its clients get DISCONNECT 0x9C
/// with a Server Reference, and resume their sessions (and what was stored for them meanwhile)
/// on the majority side. After the partition heals, the node serves again and routes to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_lets_go_of_its_sessions_and_they_resume_on_the_majority() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (specs, _nodes, leader) = start_cluster(dir.path()).await;
    let ports: Vec<u16> = specs.iter().map(|s| s.http).collect();
    // A follower (the subscriber's node) is cut off; the publisher uses a node of the majority.
    let cut = first_follower(&specs, leader);
    let other = (cut + 1) % 3;
    let (cut_addr, other_addr) = (specs[cut].mqtt_addr(), specs[other].mqtt_addr());

    let (mut sub, _) = connected(cut_addr, "cut-off-sub", true).await;
    subscribe(&mut sub, "orders/#").await;
    wait_converged(&ports, 3).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let before = publish_acked(other_addr, 0, 20, deadline).await;
    assert_eq!(before.len(), 20);
    receive_all(&mut sub, &before).await;

    let cut_id = specs[cut].id;
    let rest: Vec<u64> = specs
        .iter()
        .map(|s| s.id)
        .filter(|id| *id != cut_id)
        .collect();
    let started = Instant::now();
    partition(dir.path(), &[&[cut_id], &rest]);
    // Fenced: 0x9C, naming another member, once the node has been without quorum for a while.
    let disconnect = loop {
        match sub.recv_within(Duration::from_secs(15)).await {
            Ok(Some(Packet::Disconnect(d))) => break d,
            Ok(Some(Packet::Publish(_))) => continue,
            other => panic!("expected DISCONNECT 0x9C from the cut-off node, got {other:?}"),
        }
    };
    let fenced_after = started.elapsed();
    assert_eq!(disconnect.reason_code, ReasonCode::USE_ANOTHER_SERVER);
    let reference = disconnect
        .properties
        .server_reference
        .expect("a Server Reference");
    assert!(
        specs
            .iter()
            .any(|s| s.id != cut_id && reference.as_str() == format!("127.0.0.1:{}", s.mqtt)),
        "{reference} is not another member"
    );
    // Meanwhile the majority commits; the session resumes there with what was stored for it.
    let during = publish_acked(other_addr, 20, 40, Instant::now() + Duration::from_secs(20)).await;
    assert_eq!(during.len(), 20);
    let (mut sub, present) = connected(other_addr, "cut-off-sub", false).await;
    assert!(present, "the session resumes on the majority side");
    receive_all(&mut sub, &during).await;
    // A persistent session cannot start on the cut-off node (no quorum): sent elsewhere.
    let refused = try_connect(cut_addr, "cut-off-newcomer", true, 600).await;
    assert!(
        refused.is_none(),
        "the cut-off node accepted a persistent session"
    );

    partition(dir.path(), &[]);
    wait_converged(&ports, 3).await;
    // Healed: the node serves again and routes to the session now held elsewhere.
    let after = publish_acked(cut_addr, 40, 60, Instant::now() + Duration::from_secs(30)).await;
    assert_eq!(after.len(), 20);
    receive_all(&mut sub, &after).await;
    println!("partitioned node fenced its sessions {fenced_after:?} after the cut");
}

/// A client id has one connection cluster-wide even without a stored session: connecting
/// (clean, session expiry 0) through another node ends the older connection with 0x8E.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_stored_session_is_taken_over_across_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (specs, _nodes, _) = start_cluster(dir.path()).await;
    let (mut first, _) = try_connect(specs[0].mqtt_addr(), "roaming-device", true, 0)
        .await
        .expect("CONNACK");
    // Connections whose claims are less than 100 ms apart are ordered by the claims' clocks,
    // which two processes agree on only to a few ms, so the broker ends one of them, not
    // always the older one: a device that roams reconnects later than that. (With no pause,
    // the first claim could reach the second node late on a busy machine and end the newer
    // connection.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut second, _) = try_connect(specs[1].mqtt_addr(), "roaming-device", true, 0)
        .await
        .expect("CONNACK");
    match first.recv_within(Duration::from_secs(5)).await {
        Ok(Some(Packet::Disconnect(d))) => {
            assert_eq!(d.reason_code, ReasonCode::SESSION_TAKEN_OVER);
        }
        other => panic!("expected DISCONNECT 0x8E on the first node, got {other:?}"),
    }
    // The newer connection stays.
    second.send(&Packet::PingReq).await;
    assert!(matches!(
        second.recv_within(Duration::from_secs(5)).await,
        Ok(Some(Packet::PingResp))
    ));
}

/// A node that hangs (SIGSTOP: its connections stay open, nothing answers) does not hold up
/// QoS 1 publishers on other nodes whose messages match its subscribers: the forwarding stream
/// to it is closed once an acknowledgement is `FORWARD_ACK_TIMEOUT` (10 s) late, instead of
/// waiting for HTTP/2 keep-alive (up to 30 s); the node serves again once resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_does_not_hold_up_publishers_on_other_nodes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (specs, nodes, leader) = start_cluster(dir.path()).await;
    let ports: Vec<u16> = specs.iter().map(|s| s.http).collect();
    let hung = first_follower(&specs, leader);
    let publisher_node = specs
        .iter()
        .position(|s| s.id == leader)
        .expect("the leader");
    let (mut sub, _) = try_connect(specs[hung].mqtt_addr(), "hung-sub", true, 0)
        .await
        .expect("CONNACK");
    subscribe(&mut sub, "hung/#").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (mut publ, _) = connected(specs[publisher_node].mqtt_addr(), "pub-hung", true).await;
    publ.send(&publish("hung/x", 1, "msg-1".into(), false))
        .await;
    assert!(matches!(publ.recv().await, Some(Packet::PubAck(_))));
    receive_all(&mut sub, &[1].into()).await;

    let pid = nodes[hung]
        .as_ref()
        .expect("running")
        .child
        .id()
        .to_string();
    let signal = |sig: &str| {
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    let started = Instant::now();
    publ.send(&publish("hung/x", 2, "msg-2".into(), false))
        .await;
    let ack = publ.recv_within(Duration::from_secs(25)).await;
    let waited = started.elapsed();
    signal("-CONT");
    assert!(
        matches!(ack, Ok(Some(Packet::PubAck(_)))),
        "no PUBACK while a subscriber's node hung: {ack:?}"
    );
    assert!(
        waited < Duration::from_secs(15),
        "the publisher waited {waited:?} for a hung node"
    );
    wait_converged(&ports, 3).await;
    println!("publisher held {waited:?} by a hung node");
}
