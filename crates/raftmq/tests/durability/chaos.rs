//! Chaos: kill -9 and restart nodes, and partition them off (the leader, the subscribers'
//! nodes), under a steady durable QoS 1 and QoS 2 load, clients reconnecting to other nodes.
//! Bounded: RAFTMQ_CHAOS_SECONDS (default 60) of chaos, then every acknowledged message must
//! reach every persistent subscriber, QoS 2 exactly once.

use super::*;
use raftmq_codec::PacketId;
use raftmq_tests::process::cluster_views;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
            let views = cluster_views(ports).await;
            let processes: Vec<String> = nodes
                .iter_mut()
                .map(|n| match n {
                    Some(n) => format!("{:?}", n.try_wait()),
                    None => "not running".to_owned(),
                })
                .collect();
            // A node that is running but does not answer: its threads' stacks, if gdb is here.
            let mut stacks = String::new();
            for (view, node) in views.iter().zip(nodes.iter_mut()) {
                if let (None, Some(node)) = (view, node)
                    && matches!(node.try_wait(), Ok(None))
                    && let Ok(out) = std::process::Command::new("timeout")
                        .args(["60", "gdb", "-p", &node.pid().to_string(), "-batch"])
                        .args(["-ex", "thread apply all bt 25"])
                        .output()
                {
                    stacks += &String::from_utf8_lossy(&out.stdout);
                }
            }
            let logs: String = specs.iter().map(|s| s.log_tail(40)).collect();
            panic!(
                "cluster did not converge: {views:?}\nprocesses (exit status): {processes:?}\n{logs}\n{stacks}"
            )
        }
    }
}

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

type Shared = Arc<std::sync::Mutex<ChaosState>>;
/// Set when the load (or the subscribers) should stop.
type Stop = Arc<AtomicBool>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, ChaosState> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Publishes msg-0, msg-1, ... (QoS 1, one at a time) until `stop`, moving to the next node
/// whenever a publish is not acknowledged; an unacknowledged number is retried.
async fn chaos_publisher(addrs: Vec<SocketAddr>, state: Shared, stop: Stop) {
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
async fn chaos_publisher_qos2(addrs: Vec<SocketAddr>, state: Shared, stop: Stop) {
    let mut n = 0u32;
    let mut node = 1usize;
    let mut connected_before = false;
    // (packet id, number, PUBREC received)
    let mut in_flight: Option<(PacketId, u32, bool)> = None;
    let packet = |pid: PacketId, k: u32, dup: bool| {
        let payload = format!("q2-{k}");
        let mut p = publish_packet(
            "chaos2/load",
            QoS::ExactlyOnce,
            pid.get(),
            payload.as_bytes(),
        );
        p.dup = dup;
        Packet::Publish(p)
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
    stop: Stop,
) {
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
                    if let Some(k) = number(&p.payload) {
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

/// Prints what subscriber `id` got at `qos` against what was acknowledged; returns the
/// distinct numbers it got.
fn report(id: &str, qos: &str, acked: &BTreeSet<u32>, got: &[u32]) -> BTreeSet<u32> {
    let distinct: BTreeSet<u32> = got.iter().copied().collect();
    println!(
        "chaos {id} {qos}: {} acknowledged, {} received ({} distinct, {} duplicates), 0 missing",
        acked.len(),
        got.len(),
        distinct.len(),
        got.len() - distinct.len()
    );
    distinct
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_9_leader_and_subscriber_nodes_under_durable_load_loses_nothing_acknowledged() {
    let chaos_secs: u64 = std::env::var("RAFTMQ_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let (dir, specs, mut nodes, _leader) = start_cluster().await;
    let ports = http_ports(&specs);
    let addrs: Vec<SocketAddr> = specs.iter().map(NodeSpec::mqtt_addr).collect();
    let subs = ["chaos-sub-1", "chaos-sub-2"];

    // Persistent sessions with their subscriptions, on nodes 2 and 3.
    for (i, id) in subs.iter().enumerate() {
        let (mut c, _) = connected(addrs[i + 1], id, true).await;
        c.subscribe("chaos/#", QoS::AtLeastOnce).await;
        c.subscribe("chaos2/#", QoS::ExactlyOnce).await;
        c.send(&Packet::Disconnect(Default::default())).await;
    }
    converged(&specs).await;

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
        report(id, "QoS 1", &acked, &st.received[id]);
        let got = &st.received_q2[id];
        let distinct = report(id, "QoS 2", &acked_q2, got);
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
