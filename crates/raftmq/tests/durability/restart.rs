//! A node or the whole cluster killed with -9 and restarted on the same data dirs gives back
//! everything acknowledged before the crash.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_node_acknowledged_state_survives_kill_9() {
    const N: u32 = 200;
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = NodeSpec::new(RAFTMQ, 1, dir.path().join("data"));

    let node = Node::start(&spec).await;
    let (mut sub, present) = connected(spec.mqtt_addr(), "durable-sub", true).await;
    assert!(!present);
    sub.subscribe("orders/#", QoS::AtLeastOnce).await;
    go_offline(sub).await;
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
    sub.subscribe("config/#", QoS::AtLeastOnce).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_cold_restart_recovers_without_an_operator() {
    let (_dir, specs, mut nodes, _) = start_cluster().await;
    let addr = specs[2].mqtt_addr();
    let (mut sub, _) = connected(addr, "cold-sub", true).await;
    sub.subscribe("orders/#", QoS::AtLeastOnce).await;
    go_offline(sub).await;
    let acked = publish_acked(addr, 0, 50, Instant::now() + Duration::from_secs(60)).await;
    // Every node killed at once, then all started again with their data dirs.
    for n in nodes.iter_mut() {
        if let Some(n) = n.take() {
            n.kill9();
        }
    }
    let nodes: Vec<Node> = specs.iter().map(Node::spawn).collect();
    converged(&specs).await;
    let (mut sub, present) = connected(addr, "cold-sub", false).await;
    assert!(present);
    assert_eq!(receive_all(&mut sub, &acked).await, acked);
    drop(nodes);
}
