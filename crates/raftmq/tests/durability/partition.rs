//! Losing the quorum and network partitions: durable writes are refused rather than lost, a
//! cut-off node lets go of its sessions, and everything recovers by itself.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_quorum_refuses_durable_writes_and_recovers_by_itself() {
    let (_dir, specs, mut nodes, _) = start_cluster().await;
    let survivor = 0;
    let addr = specs[survivor].mqtt_addr();
    let (mut sub, _) = connected(addr, "q-sub", true).await;
    sub.subscribe("orders/#", QoS::AtLeastOnce).await;
    let (mut clean_sub, _) = try_connect(addr, "q-clean-sub", true, 0)
        .await
        .expect("CONNACK");
    clean_sub.subscribe("orders/#", QoS::AtLeastOnce).await;
    // Two of three nodes gone: no quorum.
    for i in [1, 2] {
        kill9(&mut nodes, i);
    }
    wait_ready(specs[survivor].http, false, Duration::from_secs(30)).await;
    // Without a quorum for a while, the node lets go of its persistent sessions (it could be
    // the minority side of a partition, whose sessions the majority adopts): their clients are
    // sent to another member.
    let others: Vec<&NodeSpec> = specs
        .iter()
        .filter(|s| s.id != specs[survivor].id)
        .collect();
    expect_sent_elsewhere(&mut sub, &others, Duration::from_secs(20)).await;
    // A QoS 1 publish matching the persistent session is refused, not acknowledged.
    let (mut publ, _) = connected(addr, "q-pub", true).await;
    publ.send(&publish("orders/q1", 1, "msg-1".into(), false))
        .await;
    // MQTT 5: no PUBACK, and the client is sent to another member (0x9C + Server Reference).
    expect_sent_elsewhere(&mut publ, &others, Duration::from_secs(20)).await;
    // A persistent session cannot be opened either: CONNACK 0x9C with the reference.
    let mut refused = RawClient::connect(addr, ProtocolVersion::V5).await;
    refused.send(&connect_packet("q-late", true, 3600)).await;
    expect_sent_elsewhere(&mut refused, &others, Duration::from_secs(20)).await;
    // QoS 0 and online delivery keep working without consensus.
    let (mut publ, _) = connected(addr, "q-pub0", true).await;
    let p = publish_packet("orders/zero", QoS::AtMostOnce, 0, b"msg-0");
    publ.send(&Packet::Publish(p)).await;
    receive_all(&mut clean_sub, &[0].into()).await;
    // Quorum returns: the node becomes ready and durable writes are acknowledged again.
    nodes[1] = Some(Node::spawn(&specs[1]));
    wait_ready(specs[survivor].http, true, START_TIMEOUT).await;
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

/// A node cut off from the other two stops serving the persistent sessions it can no longer
/// prove it owns: after `SELF_FENCE_AFTER` without a quorum its clients get DISCONNECT 0x9C
/// with a Server Reference, and resume their sessions (and what was stored for them meanwhile)
/// on the majority side. After the partition heals, the node serves again and routes to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_node_lets_go_of_its_sessions_and_they_resume_on_the_majority() {
    let (dir, specs, _nodes, leader) = start_cluster().await;
    // A follower (the subscriber's node) is cut off; the publisher uses a node of the majority.
    let cut = first_follower(&specs, leader);
    let other = (cut + 1) % 3;
    let (cut_addr, other_addr) = (specs[cut].mqtt_addr(), specs[other].mqtt_addr());

    let (mut sub, _) = connected(cut_addr, "cut-off-sub", true).await;
    sub.subscribe("orders/#", QoS::AtLeastOnce).await;
    converged(&specs).await;
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
    let others: Vec<&NodeSpec> = specs.iter().filter(|s| s.id != cut_id).collect();
    expect_sent_elsewhere(&mut sub, &others, Duration::from_secs(15)).await;
    let fenced_after = started.elapsed();
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
    converged(&specs).await;
    // Healed: the node serves again and routes to the session now held elsewhere.
    let after = publish_acked(cut_addr, 40, 60, Instant::now() + Duration::from_secs(30)).await;
    assert_eq!(after.len(), 20);
    receive_all(&mut sub, &after).await;
    println!("partitioned node fenced its sessions {fenced_after:?} after the cut");
}
