//! One connection per client id cluster-wide: sessions move between nodes with their client.

use super::*;

/// A persistent session follows its client across nodes: a CONNECT on node B takes the session
/// over from node A (A's connection gets DISCONNECT 0x8E and B resumes the subscriptions), and
/// messages queued for it while offline on B are delivered when it comes back on node C.
/// Retained messages set through one node are served by every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_move_between_nodes_and_retained_messages_are_served_everywhere() {
    let (_dir, specs, _nodes, _leader) = start_cluster().await;
    let [a, b, c] = mqtt_addrs(&specs);

    // Retained through A, seen from B and C.
    publish_each(a, "cfg/site", 1..2, true).await;
    wait_retained(b, "cfg/#", 1).await;
    wait_retained(c, "cfg/#", 1).await;

    // The session starts on A.
    let (mut on_a, present) = connected(a, "mover", true).await;
    assert!(!present);
    on_a.subscribe("jobs/#", QoS::AtLeastOnce).await;

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
    go_offline(on_b).await;
    publish_each(b, "jobs/later", 20..30, false).await;
    resume_and_receive(c, "mover", 20..30, "the session is resumed on C").await;
    println!(
        "session moved A → B → C; 10 live and 10 queued messages delivered, retained seen on 3 nodes"
    );
}

/// A client id has one connection cluster-wide even without a stored session: connecting
/// (clean, session expiry 0) through another node ends the older connection with 0x8E.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_stored_session_is_taken_over_across_nodes() {
    let (_dir, specs, _nodes, _) = start_cluster().await;
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
