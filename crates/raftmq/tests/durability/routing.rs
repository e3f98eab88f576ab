//! Live routing between nodes: messages published on one node reach subscribers on the
//! others exactly once (QoS 0, 1 and 2, shared subscriptions).

use super::*;

/// Live routing between nodes: subscribers on B (clean and persistent, wildcard filters) get
/// QoS 0 and QoS 1 messages published on A exactly once, and a shared subscription with members
/// on B and C gets each message exactly once cluster-wide.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_published_on_one_node_reach_subscribers_on_the_others() {
    let (_dir, specs, _nodes, _leader) = start_cluster().await;
    let [a, b, c] = mqtt_addrs(&specs);
    let (mut clean, _) = connected(b, "pub-like-clean-sub", true).await;
    clean.subscribe("live/+/x", QoS::AtLeastOnce).await;
    let (mut durable, _) = connected(b, "durable-live", true).await;
    durable.subscribe("live/#", QoS::AtLeastOnce).await;
    let (mut worker_b, _) = connected(b, "pub-like-worker-b", true).await;
    worker_b
        .subscribe("$share/g/work/#", QoS::AtLeastOnce)
        .await;
    let (mut worker_c, _) = connected(c, "pub-like-worker-c", true).await;
    worker_c
        .subscribe("$share/g/work/#", QoS::AtLeastOnce)
        .await;
    converged(&specs).await;

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
    if all != (200..240).collect::<Vec<_>>() {
        // What the nodes saw, for the failure message: forwarding counters and log tails.
        let mut seen = String::new();
        for spec in &specs {
            let (_, metrics) = http_get(spec.http, "/metrics").await;
            for line in metrics.lines().filter(|l| l.starts_with("raftmq_forward")) {
                seen += &format!("node {}: {line}\n", spec.id);
            }
            seen += &spec.log_tail(40);
        }
        panic!(
            "each shared message to exactly one member (B got {from_b:?}, C got {from_c:?})\n{seen}"
        );
    }
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

/// QoS 2 across nodes: messages published with QoS 2 on node A reach a clean and a persistent
/// QoS 2 subscriber on node B exactly once each (four-way handshakes on both sides).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos2_across_nodes_is_delivered_exactly_once() {
    const N: u32 = 40;
    let (_dir, specs, _nodes, _leader) = start_cluster().await;
    let (a, b) = (specs[0].mqtt_addr(), specs[1].mqtt_addr());
    let (mut clean, _) = connected(b, "pub-like-q2-clean", true).await;
    clean.subscribe("q2/#", QoS::ExactlyOnce).await;
    let (mut durable, _) = connected(b, "q2-durable", true).await;
    durable.subscribe("q2/#", QoS::ExactlyOnce).await;
    converged(&specs).await;
    wait_routed(a, "q2/probe", &mut [&mut clean, &mut durable]).await;

    let (mut publ, _) = connected(a, "pub-q2", true).await;
    for n in 1..=N {
        let id = pid(u16::try_from(n).expect("small"));
        let p = publish_packet(
            "q2/x",
            QoS::ExactlyOnce,
            id.get(),
            format!("msg-{n}").as_bytes(),
        );
        publ.send(&Packet::Publish(p)).await;
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
                    if let Some(k) = number(&p.payload) {
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
