//! Nodes that die or hang under load: acknowledged messages survive the node that held their
//! session, a dead node's clients' wills fire once, and a hung node does not hold up
//! publishers elsewhere.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_keeps_acknowledged_messages_when_the_leader_and_then_the_client_node_are_killed() {
    let (_dir, specs, mut nodes, leader) = start_cluster().await;
    // Clients use a follower, so killing the leader does not cut them off.
    let client = first_follower(&specs, leader);
    let addr = specs[client].mqtt_addr();
    let deadline = Instant::now() + Duration::from_secs(120);

    let (mut sub, _) = connected(addr, "cluster-sub", true).await;
    sub.subscribe("orders/#", QoS::AtLeastOnce).await;
    go_offline(sub).await;

    let mut acked = publish_acked(addr, 0, 150, deadline).await;
    // kill -9 the leader under load, keep publishing through the election, restart it.
    let leader_idx = specs
        .iter()
        .position(|s| s.id == leader)
        .expect("leader index");
    kill9(&mut nodes, leader_idx);
    acked.extend(publish_acked(addr, 150, 300, deadline).await);
    nodes[leader_idx] = Some(Node::spawn(&specs[leader_idx]));
    converged(&specs).await;
    acked.extend(publish_acked(addr, 300, 400, deadline).await);
    // kill -9 the node the clients use; restart it from its data dir.
    kill9(&mut nodes, client);
    nodes[client] = Some(Node::start(&specs[client]).await);
    converged(&specs).await;
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

/// QoS 1 messages published on node A for a persistent session owned by node B are stored for
/// it before A's PUBACK: delivered live while its client is connected to B, and still there
/// after B is killed with -9 and the client reconnects to node C.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_for_a_session_on_another_node_survive_that_node() {
    let (_dir, specs, mut nodes, _leader) = start_cluster().await;
    let [a, b, c] = mqtt_addrs(&specs);

    let (mut on_b, _) = connected(b, "remote-sub", true).await;
    on_b.subscribe("alerts/#", QoS::AtLeastOnce).await;
    // Every node has applied the subscription (A matches it from the replicated state).
    converged(&specs).await;

    // Live: published on A, delivered to the client on B.
    publish_each(a, "alerts/live", 100..110, false).await;
    let expected: BTreeSet<u32> = (100..110).collect();
    assert_eq!(receive_all(&mut on_b, &expected).await, expected);

    // Offline on B; published on A (acknowledged); B dies; the client comes back on C.
    go_offline(on_b).await;
    converged(&specs).await;
    publish_each(a, "alerts/queued", 110..130, false).await;
    kill9(&mut nodes, 1);
    resume_and_receive(c, "remote-sub", 110..130, "the session survives its node").await;
    println!(
        "published on A, subscriber's node B killed: 20 of 20 acknowledged messages delivered on C"
    );
}

/// A node that dies is declared down by the leader (a committed command, after
/// `NODE_DOWN_AFTER` without its stream): the leader adopts its persistent sessions, so the will
/// of a client that was connected to it is published once, and the session expires on time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_node_dies_its_clients_wills_fire_once_and_their_sessions_expire() {
    let (_dir, specs, mut nodes, leader) = start_cluster().await;
    // The doomed client on a follower; the will's subscriber on the other follower.
    let followers: Vec<usize> = (0..3).filter(|&i| specs[i].id != leader).collect();
    let (doomed_node, watcher_node) = (followers[0], followers[1]);

    let (mut watcher, _) = connected(specs[watcher_node].mqtt_addr(), "will-watcher", true).await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    let mut connect = connect_v5("doomed", true, 5);
    connect.keep_alive = 60;
    connect.will = Some(raftmq_codec::Will {
        topic: "wills/doomed".into(),
        payload: bytes::Bytes::from_static(b"msg-1"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    let (doomed, ack) = RawClient::handshake(specs[doomed_node].mqtt_addr(), connect).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    converged(&specs).await;

    // kill -9 the doomed client's node: nobody there to publish the will.
    let killed_at = Instant::now();
    kill9(&mut nodes, doomed_node);
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

/// The leader's view of the wills `node` announced (`raftmq_forward_peer_wills{peer}`).
async fn peer_wills(leader_http: u16, node: u64) -> Option<f64> {
    let (status, body) = http_get(leader_http, "/metrics").await;
    assert_eq!(status, 200);
    raftmq_tests::metrics::metric(
        &body,
        &format!("raftmq_forward_peer_wills{{peer=\"{node}\"}}"),
    )
}

/// The nodes of a will test: the follower to fail, the other follower (the watcher's), and the
/// leader's HTTP port.
fn will_roles(specs: &[NodeSpec], leader: u64) -> (usize, usize, u16) {
    let followers: Vec<usize> = (0..3).filter(|&i| specs[i].id != leader).collect();
    let leader_http = specs
        .iter()
        .find(|s| s.id == leader)
        .expect("the leader is a member")
        .http;
    (followers[0], followers[1], leader_http)
}

/// An MQTT 5 CONNECT of `id` without a stored session, with a QoS 1 will `payload` to
/// `{prefix}/{id}`.
fn sessionless_with_will(id: &str, prefix: &str, payload: &'static [u8]) -> raftmq_codec::Connect {
    let mut connect = connect_v5(id, true, 0);
    connect.keep_alive = 60;
    connect.will = Some(raftmq_codec::Will {
        topic: format!("{prefix}/{id}").as_str().into(),
        payload: bytes::Bytes::from_static(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    connect
}

/// A client without a stored session (session expiry 0) proposes nothing to the log, so its
/// will is known only to its node and, through the forwarding streams, to the peers. When that
/// node is killed, the node that declares it down publishes the will, once; a will withdrawn
/// by a normal DISCONNECT before the crash is not published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_node_dies_the_wills_of_its_sessionless_clients_fire_once() {
    let (_dir, specs, mut nodes, leader) = start_cluster().await;
    let (doomed_node, watcher_node, leader_http) = will_roles(&specs, leader);
    let doomed_id = specs[doomed_node].id;

    let (mut watcher, _) =
        connected(specs[watcher_node].mqtt_addr(), "clean-will-watcher", true).await;
    watcher.subscribe("clean-wills/#", QoS::AtLeastOnce).await;
    let with_will = |id: &str, payload| sessionless_with_will(id, "clean-wills", payload);
    let (doomed, ack) = RawClient::handshake(
        specs[doomed_node].mqtt_addr(),
        with_will("doomed-clean", b"msg-7"),
    )
    .await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    let (mut graceful, ack) = RawClient::handshake(
        specs[doomed_node].mqtt_addr(),
        with_will("graceful-clean", b"msg-8"),
    )
    .await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    raftmq_tests::eventually(
        "the leader holds both wills of the doomed node's clients",
        Duration::from_secs(10),
        || async move { peer_wills(leader_http, doomed_id).await == Some(2.0) },
    )
    .await;
    // A normal DISCONNECT withdraws that will from the peers.
    graceful
        .send(&Packet::Disconnect(raftmq_codec::Disconnect::default()))
        .await;
    raftmq_tests::eventually(
        "the leader no longer holds the withdrawn will",
        Duration::from_secs(10),
        || async move { peer_wills(leader_http, doomed_id).await == Some(1.0) },
    )
    .await;

    let killed_at = Instant::now();
    kill9(&mut nodes, doomed_node);
    drop(doomed);
    let mut will = Vec::new();
    while will.is_empty() && killed_at.elapsed() < Duration::from_secs(40) {
        will = collect(&mut watcher, 1).await;
    }
    let took = killed_at.elapsed();
    assert_eq!(
        will,
        [7],
        "the will of a dead node's sessionless client is published"
    );
    assert!(
        collect(&mut watcher, 1).await.is_empty(),
        "the will is published once, and the withdrawn one not at all"
    );
    println!("node killed: the sessionless client's will published after {took:?}, once");
}

/// A node killed and started again at once (a supervisor or Kubernetes restarting it) before
/// anyone declares it down: its new process has forgotten the wills of its sessionless
/// clients, but its peers kept its previous process's table and send it to the new one, which
/// publishes each will once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_a_node_restarts_at_once_the_wills_of_its_sessionless_clients_fire_once() {
    let (_dir, specs, mut nodes, leader) = start_cluster().await;
    let (doomed_node, watcher_node, leader_http) = will_roles(&specs, leader);
    let doomed_id = specs[doomed_node].id;
    let (mut watcher, _) = connected(
        specs[watcher_node].mqtt_addr(),
        "restart-will-watcher",
        true,
    )
    .await;
    watcher.subscribe("restart-wills/#", QoS::AtLeastOnce).await;
    let connect = sessionless_with_will("restart-doomed", "restart-wills", b"msg-9");
    let (doomed, ack) = RawClient::handshake(specs[doomed_node].mqtt_addr(), connect).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    raftmq_tests::eventually(
        "the leader holds the will of the doomed node's client",
        Duration::from_secs(10),
        || async move { peer_wills(leader_http, doomed_id).await == Some(1.0) },
    )
    .await;

    let killed_at = Instant::now();
    kill9(&mut nodes, doomed_node);
    drop(doomed);
    nodes[doomed_node] = Some(Node::spawn(&specs[doomed_node]));
    let mut will = Vec::new();
    while will.is_empty() && killed_at.elapsed() < Duration::from_secs(40) {
        will = collect(&mut watcher, 1).await;
    }
    let took = killed_at.elapsed();
    assert_eq!(
        will,
        [9],
        "the will of a restarted node's sessionless client"
    );
    assert!(
        collect(&mut watcher, 1).await.is_empty(),
        "the will is published once"
    );
    // Which path published it: the restarted node (its peers sent it the old table), or the
    // leader, if the restart took long enough for it to declare the node down.
    let (_, metrics) = http_get(leader_http, "/metrics").await;
    let declared =
        raftmq_tests::metrics::metric(&metrics, "raftmq_cluster_nodes_declared_down_total")
            .unwrap_or(0.0);
    println!(
        "node killed and restarted: the will published after {took:?}, once (declared down: {declared})"
    );
}

/// A node that hangs (SIGSTOP: its connections stay open, nothing answers) does not hold up
/// QoS 1 publishers on other nodes whose messages match its subscribers: the forwarding stream
/// to it is closed once an acknowledgement is `FORWARD_ACK_TIMEOUT` (10 s) late, instead of
/// waiting for HTTP/2 keep-alive (up to 30 s); the node serves again once resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_node_does_not_hold_up_publishers_on_other_nodes() {
    let (_dir, specs, nodes, leader) = start_cluster().await;
    let hung = first_follower(&specs, leader);
    let publisher_node = specs
        .iter()
        .position(|s| s.id == leader)
        .expect("the leader");
    let (mut sub, _) = try_connect(specs[hung].mqtt_addr(), "hung-sub", true, 0)
        .await
        .expect("CONNACK");
    sub.subscribe("hung/#", QoS::AtLeastOnce).await;
    wait_routed(
        specs[publisher_node].mqtt_addr(),
        "hung/probe",
        &mut [&mut sub],
    )
    .await;
    let (mut publ, _) = connected(specs[publisher_node].mqtt_addr(), "pub-hung", true).await;
    publ.send(&publish("hung/x", 1, "msg-1".into(), false))
        .await;
    assert!(matches!(publ.recv().await, Some(Packet::PubAck(_))));
    receive_all(&mut sub, &[1].into()).await;

    let hung_node = nodes[hung].as_ref().expect("running");
    hung_node.signal("-STOP");
    let started = Instant::now();
    publ.send(&publish("hung/x", 2, "msg-2".into(), false))
        .await;
    let ack = publ.recv_within(Duration::from_secs(25)).await;
    let waited = started.elapsed();
    hung_node.signal("-CONT");
    assert!(
        matches!(ack, Ok(Some(Packet::PubAck(_)))),
        "no PUBACK while a subscriber's node hung: {ack:?}"
    );
    assert!(
        waited < Duration::from_secs(15),
        "the publisher waited {waited:?} for a hung node"
    );
    converged(&specs).await;
    println!("publisher held {waited:?} by a hung node");
}
