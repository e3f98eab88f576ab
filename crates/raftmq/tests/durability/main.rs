//! Durability across `kill -9`, with the real `raftmq` executable: state acknowledged before a
//! crash (persistent sessions, subscriptions, queued QoS 1/2 messages, retained messages) is all
//! back after a restart on the same data dir, on a single node and in a 3-node cluster whose
//! leader, then whose client-facing node, is killed under a durable QoS 1 load.
//!
//! One test binary (each links RocksDB), split by behaviour: [`restart`] (kill -9 and restart),
//! [`failure`] (nodes that die or hang), [`partition`] (lost quorum, cut-off nodes),
//! [`takeover`] (sessions moving between nodes), [`routing`] (live delivery between nodes),
//! [`chaos`] (all of it at once under load), [`tls`] (mutual TLS between nodes) and [`bridge`]
//! (bridges to a real Mosquitto, and a bridge moving when its node dies). The
//! process harness (ports, starting and killing nodes, their HTTP endpoints) is
//! [`raftmq_tests::process`]; the MQTT helpers every part uses are here.

mod bridge;
mod chaos;
mod failure;
mod partition;
mod restart;
mod routing;
mod takeover;
mod tls;

use raftmq_codec::{Packet, ProtocolVersion, PubResponse, QoS, ReasonCode};
use raftmq_tests::process::{
    Node, NodeSpec, START_TIMEOUT, cluster_specs, cluster_status, http_get, wait_converged,
    wait_ready,
};
use raftmq_tests::{RawClient, connect_v5, pid, publish_packet};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The executable under test.
const RAFTMQ: &str = env!("CARGO_BIN_EXE_raftmq");
/// Upper bound for connecting to a node and getting its CONNACK.
const CONNECT_WAIT: Duration = Duration::from_secs(10);

/// The MQTT 5 CONNECT the tests send: keep alive 60 s, session expiry `expiry` (0: a clean
/// session, never durable).
fn connect_packet(id: &str, clean_start: bool, expiry: u32) -> Packet {
    let mut connect = connect_v5(id, clean_start, expiry);
    connect.keep_alive = 60;
    Packet::Connect(Box::new(connect))
}

/// Connects and returns (client, session present); `None` if the node is down or refused (e.g.
/// no quorum). Connects with session expiry `expiry` (0: a clean session, never durable).
async fn try_connect(
    addr: SocketAddr,
    id: &str,
    clean_start: bool,
    expiry: u32,
) -> Option<(RawClient, bool)> {
    let mut connect = connect_v5(id, clean_start, expiry);
    connect.keep_alive = 60;
    match RawClient::try_handshake(addr, connect, CONNECT_WAIT).await {
        Some((c, ack)) if ack.reason_code == ReasonCode::SUCCESS => Some((c, ack.session_present)),
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

/// A QoS 1 PUBLISH of `payload` to `topic`.
fn publish(topic: &str, packet_id: u16, payload: String, retain: bool) -> Packet {
    let mut p = publish_packet(topic, QoS::AtLeastOnce, packet_id, payload.as_bytes());
    p.retain = retain;
    Packet::Publish(p)
}

/// The number `N` of a payload `msg-N`.
fn number(payload: &[u8]) -> Option<u32> {
    std::str::from_utf8(payload)
        .ok()
        .and_then(|s| s.strip_prefix("msg-")?.parse().ok())
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
                if let Some(n) = number(&p.payload) {
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

fn faults_file(dir: &std::path::Path) -> PathBuf {
    dir.join("faults")
}

/// The file that slows node `id`'s disk in a cluster of [`start_cluster`] in `dir`
/// (`cluster.disk_faults_file`: a number of milliseconds by which every synced Raft log write
/// stalls; absent: a healthy disk).
fn disk_faults_file(dir: &std::path::Path, id: u64) -> PathBuf {
    dir.join(format!("disk-faults-n{id}"))
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

/// Index of the first node that is not `leader`.
fn first_follower(specs: &[NodeSpec], leader: u64) -> usize {
    specs
        .iter()
        .position(|s| s.id != leader)
        .expect("a follower")
}

/// The HTTP ports of `specs`.
fn http_ports(specs: &[NodeSpec]) -> Vec<u16> {
    specs.iter().map(|s| s.http).collect()
}

/// Kills node `i` with -9 if it is running.
fn kill9(nodes: &mut [Option<Node>], i: usize) {
    if let Some(n) = nodes[i].take() {
        n.kill9();
    }
}

/// Waits until the nodes of `specs` agree on the leader and the applied index.
async fn converged(specs: &[NodeSpec]) {
    wait_converged(&http_ports(specs), specs.len()).await;
}

/// The MQTT addresses of three nodes.
fn mqtt_addrs(specs: &[NodeSpec]) -> [SocketAddr; 3] {
    [0, 1, 2].map(|i| specs[i].mqtt_addr())
}

/// Starts a 3-node cluster in a new temporary directory; returns the directory, the specs, the
/// running nodes and the leader id.
async fn start_cluster() -> (tempfile::TempDir, Vec<NodeSpec>, Vec<Option<Node>>, u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (specs, nodes, leader) = start_cluster_in(dir.path()).await;
    (dir, specs, nodes, leader)
}

/// Starts a 3-node cluster in `dir`; returns the specs, the running nodes and the leader id.
async fn start_cluster_in(dir: &std::path::Path) -> (Vec<NodeSpec>, Vec<Option<Node>>, u64) {
    // Partitions are written to this file (see `partition`); absent: a healthy network.
    let faults = faults_file(dir).display().to_string();
    // Each node's disk is slowed through its own file (see `disk_faults_file`).
    let specs: Vec<NodeSpec> = cluster_specs(RAFTMQ, dir, 3)
        .into_iter()
        .map(|s| {
            let disk = disk_faults_file(dir, s.id).display().to_string();
            s.with_env("RAFTMQ_CLUSTER__FAULTS_FILE", faults.clone())
                .with_env("RAFTMQ_CLUSTER__DISK_FAULTS_FILE", disk)
        })
        .collect();
    let nodes: Vec<Option<Node>> = specs.iter().map(|s| Some(Node::spawn(s))).collect();
    let leader = wait_converged(&http_ports(&specs), 3).await;
    (specs, nodes, leader)
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
        // A client id of its own per node: probes of one id on several nodes in quick
        // succession take each other over (client ids are unique cluster-wide, best effort),
        // which is not what this waits for.
        let id = format!("pub-retained-probe-{}", addr.port());
        let (mut c, _) = connected(addr, &id, true).await;
        c.subscribe(filter, QoS::AtLeastOnce).await;
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
                if let Some(k) = number(&p.payload).filter(|k| range.contains(k)) {
                    got.push(k);
                }
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    got
}

/// Publishes QoS 0 `msg-N` for N in `range` to `topic` through a clean session on `addr`.
async fn publish_qos0(addr: SocketAddr, topic: &str, range: std::ops::Range<u32>) {
    let (mut publ, _) = connected(addr, "pub-qos0", true).await;
    for n in range {
        let p = publish_packet(topic, QoS::AtMostOnce, 0, format!("msg-{n}").as_bytes());
        publ.send(&Packet::Publish(p)).await;
    }
    publ.send(&Packet::Disconnect(Default::default())).await;
}

/// Waits until messages published on `from` reach every client in `subs` (routes between nodes
/// are announced asynchronously): publishes QoS 0 probes (payload `probe`, to `topic`) until
/// each has received one, then lets stragglers arrive and discards them.
async fn wait_routed(from: SocketAddr, topic: &str, subs: &mut [&mut RawClient]) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let (mut publ, _) = connected(from, "pub-probe", true).await;
    let mut reached = vec![false; subs.len()];
    while reached.contains(&false) {
        assert!(
            Instant::now() < deadline,
            "probes published on {from} never reached subscribers {reached:?}"
        );
        publ.publish(topic, QoS::AtMostOnce, 0, b"probe").await;
        for (sub, reached) in subs.iter_mut().zip(reached.iter_mut()) {
            while !*reached {
                match sub.recv_within(Duration::from_secs(2)).await {
                    Ok(Some(Packet::Publish(p))) => *reached = &p.payload[..] == b"probe",
                    other => {
                        assert!(other.is_err(), "subscriber got {other:?} while probing");
                        break;
                    }
                }
            }
        }
    }
    for sub in subs {
        while let Ok(Some(p)) = sub.recv_within(Duration::from_millis(500)).await {
            assert!(
                matches!(&p, Packet::Publish(p) if &p.payload[..] == b"probe"),
                "subscriber got {p:?} after probing"
            );
        }
    }
}

/// Waits for the broker to send `c` to another server: DISCONNECT (after any PUBLISH still
/// being delivered) or CONNACK with 0x9C Use another server, each packet within `wait`, whose
/// Server Reference is the MQTT address of one of `others`.
async fn expect_sent_elsewhere(c: &mut RawClient, others: &[&NodeSpec], wait: Duration) {
    let (code, reference) = loop {
        match c.recv_within(wait).await {
            Ok(Some(Packet::Publish(_))) => continue,
            Ok(Some(Packet::Disconnect(d))) => {
                break (d.reason_code, d.properties.server_reference);
            }
            Ok(Some(Packet::ConnAck(a))) => break (a.reason_code, a.properties.server_reference),
            other => panic!("expected DISCONNECT or CONNACK 0x9C, got {other:?}"),
        }
    };
    assert_eq!(code, ReasonCode::USE_ANOTHER_SERVER);
    let reference = reference.expect("a Server Reference");
    let addrs: Vec<String> = others.iter().map(|s| s.mqtt_addr().to_string()).collect();
    assert!(
        addrs.iter().any(|a| a == reference.as_str()),
        "{reference} is not another member's MQTT address ({addrs:?})"
    );
}

/// Ends `client`'s connection with a normal DISCONNECT: a persistent session stays, offline.
async fn go_offline(mut client: RawClient) {
    client.send(&Packet::Disconnect(Default::default())).await;
}

/// Resumes the persistent session `id` on `addr` (`what`: why it must be there) and receives
/// exactly the messages `range` (acknowledging them).
async fn resume_and_receive(addr: SocketAddr, id: &str, range: std::ops::Range<u32>, what: &str) {
    let (mut c, present) = connected(addr, id, false).await;
    assert!(present, "{what}");
    let expected: BTreeSet<u32> = range.collect();
    assert_eq!(receive_all(&mut c, &expected).await, expected);
}
