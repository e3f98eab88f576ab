//! Brokers on the harness: routing between nodes, fencing and node failure under injected
//! faults.

use super::*;
use raftmq_codec::{Packet, PubResponse, QoS, ReasonCode, Will, WillProperties};
use raftmq_core::Message;
use raftmq_tests::{RawClient, connect_v5, publish_packet};
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// Connects an MQTT 5 client (`expiry` 0: a session that is not stored) with an optional
/// will; asserts CONNACK success.
async fn client(addr: SocketAddr, id: &str, expiry: u32, will: Option<Will>) -> RawClient {
    let mut connect = connect_v5(id, true, expiry);
    connect.will = will;
    let (c, ack) = RawClient::handshake(addr, connect).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "CONNACK {ack:?}");
    c
}

/// Publishes `payloads` to `topic` at `qos` one exchange at a time (QoS 2: PUBREC, PUBREL,
/// PUBCOMP), waiting for each acknowledgement.
async fn publish_all(c: &mut RawClient, topic: &str, qos: QoS, payloads: &[String]) {
    for (i, payload) in payloads.iter().enumerate() {
        let id = u16::try_from(i % 60_000 + 1).expect("packet id");
        c.publish(topic, qos, id, payload.as_bytes()).await;
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => assert!(
                matches!(c.recv().await, Some(Packet::PubAck(a)) if a.reason_code.is_success())
            ),
            QoS::ExactlyOnce => {
                assert!(
                    matches!(c.recv().await, Some(Packet::PubRec(r)) if r.reason_code.is_success())
                );
                c.send(&Packet::PubRel(PubResponse::success(raftmq_tests::pid(id))))
                    .await;
                assert!(matches!(c.recv().await, Some(Packet::PubComp(_))));
            }
        }
    }
}

/// Receives until `quiet` passes without a PUBLISH, acknowledging everything (QoS 2 as a
/// receiver must: a PUBLISH with a packet id not yet released is the same message); returns
/// the payloads in arrival order, one per message.
async fn drain(c: &mut RawClient, quiet: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let mut unreleased = BTreeSet::new();
    while let Ok(Some(p)) = c.recv_within(quiet).await {
        match p {
            Packet::Publish(p) => {
                let text = String::from_utf8_lossy(&p.payload).into_owned();
                match (p.qos, p.packet_id) {
                    (QoS::ExactlyOnce, Some(id)) => {
                        if unreleased.insert(id.get()) {
                            got.push(text);
                        }
                        c.send(&Packet::PubRec(PubResponse::success(id))).await;
                    }
                    (_, Some(id)) => {
                        got.push(text);
                        c.send(&Packet::PubAck(PubResponse::success(id))).await;
                    }
                    (_, None) => got.push(text),
                }
            }
            Packet::PubRel(r) => {
                unreleased.remove(&r.packet_id.get());
                c.send(&Packet::PubComp(PubResponse::success(r.packet_id)))
                    .await;
            }
            _ => {}
        }
    }
    got
}

/// The payload of the probes [`wait_routed_from_1`] publishes.
const PROBE: &str = "probe";

/// Waits until node 1 routes messages to each of `subs` (named) on the other nodes, and
/// stores QoS 1 messages for the persistent sessions among them, which it does once it has the
/// routes the other nodes announced and has applied their subscriptions. Probes (payload
/// [`PROBE`], to `r/probe/x`) are published on node 1 until each subscriber has received one:
/// QoS 0 through an MQTT client, and QoS 1 straight into node 1's broker, whose count of
/// sessions offered the message includes those it stored it for.
async fn wait_routed_from_1(cluster: &Cluster, subs: &mut [(&str, &mut RawClient)]) {
    let timeout = Duration::from_secs(15);
    let deadline = tokio::time::Instant::now() + timeout;
    let mut prober = client(cluster.mqtt(1), "prober-1", 0, None).await;
    let mut reached = BTreeSet::new();
    let mut stored_for = 0;
    while reached.len() < subs.len() || stored_for == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "after {timeout:?}, probes published on node 1 reached only {reached:?} and were \
             stored for {stored_for} sessions"
        );
        prober
            .publish("r/probe/x", QoS::AtMostOnce, 0, PROBE.as_bytes())
            .await;
        let now = std::time::Instant::now();
        let stored = Message {
            topic: "r/probe/x".into(),
            payload: bytes::Bytes::from_static(PROBE.as_bytes()),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            received_at: now,
            origin: None,
        };
        stored_for = stored_for.max(cluster.broker(1).publish(Arc::new(stored), now));
        for (name, sub) in subs.iter_mut() {
            let got = drain(sub, Duration::from_millis(200)).await;
            if got.iter().any(|p| p == PROBE) {
                reached.insert(name.to_string());
            }
        }
    }
}

/// `got` without the probes of [`wait_routed_from_1`] (stragglers may arrive later).
fn without_probes(got: Vec<String>) -> Vec<String> {
    got.into_iter().filter(|p| p != PROBE).collect()
}

fn counts(got: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for g in got {
        *m.entry(g.clone()).or_insert(0) += 1;
    }
    m
}

/// Brokers on three nodes over slow links (20 ms each way on every link, Raft and
/// forwarding): QoS 0/1/2 published on node 1 reach a clean and a persistent subscriber on
/// node 2 (wildcard filters) exactly once each, a shared group with a member on node 2 and one
/// on node 3 gets each message once, and a retained message set on node 3 is served by node 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn brokers_route_qos_0_1_2_between_nodes_exactly_once_over_slow_links() {
    let cluster = Cluster::start_with_brokers(3).await;
    cluster
        .net
        .delay_all(&cluster.ids, Duration::from_millis(20));
    let mut clean = client(cluster.mqtt(2), "clean-2", 0, None).await;
    clean.subscribe("r/#", QoS::AtLeastOnce).await;
    let mut persistent = client(cluster.mqtt(2), "persistent-2", 3600, None).await;
    persistent.subscribe("r/+/x", QoS::ExactlyOnce).await;
    let mut s2 = client(cluster.mqtt(2), "member-2", 0, None).await;
    s2.subscribe("$share/g/r/#", QoS::AtLeastOnce).await;
    let mut s3 = client(cluster.mqtt(3), "member-3", 0, None).await;
    s3.subscribe("$share/g/r/#", QoS::AtLeastOnce).await;
    // Routes are announced asynchronously, and the persistent subscription is mirrored once
    // node 1 has applied it.
    wait_routed_from_1(
        &cluster,
        &mut [
            ("clean-2", &mut clean),
            ("persistent-2", &mut persistent),
            ("member-2", &mut s2),
            ("member-3", &mut s3),
        ],
    )
    .await;

    let mut publisher = client(cluster.mqtt(1), "publisher-1", 0, None).await;
    let mut expected = Vec::new();
    for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
        let payloads: Vec<String> = (0..30).map(|i| format!("q{}-{i}", qos.as_u8())).collect();
        publish_all(&mut publisher, "r/a/x", qos, &payloads).await;
        expected.extend(payloads);
    }
    let quiet = Duration::from_secs(2);
    let (got_clean, got_persistent, got_s2, got_s3) = tokio::join!(
        drain(&mut clean, quiet),
        drain(&mut persistent, quiet),
        drain(&mut s2, quiet),
        drain(&mut s3, quiet)
    );
    let [got_clean, got_persistent, got_s2, got_s3] =
        [got_clean, got_persistent, got_s2, got_s3].map(without_probes);
    let all: BTreeMap<String, usize> = expected.iter().map(|e| (e.clone(), 1)).collect();
    assert_eq!(counts(&got_clean), all, "clean subscriber on node 2");
    assert_eq!(
        counts(&got_persistent),
        all,
        "persistent subscriber on node 2"
    );
    let mut shared = got_s2.clone();
    shared.extend(got_s3.iter().cloned());
    assert_eq!(
        counts(&shared),
        all,
        "shared group: each message to one member"
    );
    assert!(!got_s2.is_empty() || !got_s3.is_empty());

    // Retained through node 3, served by node 1 once applied there.
    let mut setter = client(cluster.mqtt(3), "setter-3", 0, None).await;
    let mut retained = publish_packet("status/n3", QoS::AtLeastOnce, 1, b"up");
    retained.retain = true;
    setter.send(&Packet::Publish(retained)).await;
    assert!(matches!(setter.recv().await, Some(Packet::PubAck(_))));
    eventually(
        "node 1 has the retained message",
        Duration::from_secs(10),
        || {
            let ok = cluster.broker(1).retained("status/n3").is_some();
            async move { ok }
        },
    )
    .await;
    let mut late = client(cluster.mqtt(1), "late-1", 0, None).await;
    late.subscribe("status/#", QoS::AtLeastOnce).await;
    let p = late.recv_publish().await;
    assert!(p.retain && &p.payload[..] == b"up");
    cluster.shutdown().await;
}

/// The agreed leader, a follower to cut off, and the other follower.
async fn follower_to_cut(cluster: &Cluster) -> (NodeId, NodeId, NodeId) {
    let leader = cluster.agreed_leader(&cluster.ids, None).await;
    let cut = *cluster
        .ids
        .iter()
        .find(|id| **id != leader)
        .expect("a follower");
    let other = *cluster
        .ids
        .iter()
        .find(|id| **id != cut && **id != leader)
        .expect("the other follower");
    (leader, cut, other)
}

/// A follower cut off from the others lets go of its persistent session (its client gets
/// 0x9C with a Server Reference, no will is published there); the majority declares it down
/// and adopts the session: the will is published once, on the majority side, and the session
/// expires there. After healing, nothing is published twice and the node does not take the
/// session back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_node_fences_its_sessions_and_the_majority_publishes_their_wills_once() {
    let cluster = Cluster::start_with_brokers(3).await;
    let (leader, cut, watcher_node) = follower_to_cut(&cluster).await;
    let mut watcher = client(cluster.mqtt(watcher_node), "watcher", 0, None).await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    let will = Will {
        topic: "wills/device".into(),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties::default(),
    };
    let mut device = client(cluster.mqtt(cut), "device", 3, Some(will)).await;
    // The majority holds the device's session (and its will) before the cut.
    eventually(
        "the majority has applied the device's session",
        Duration::from_secs(10),
        || {
            let ok = [leader, watcher_node]
                .iter()
                .all(|id| cluster.sessions(*id).contains("device"));
            async move { ok }
        },
    )
    .await;

    let started = tokio::time::Instant::now();
    cluster.net.isolate(cut, &cluster.ids);
    // Fenced by its own node: 0x9C, and no will from there. (These brokers have no
    // redirect installed, so no Server Reference; the real-process tests check it.)
    match device.recv_within(Duration::from_secs(15)).await {
        Ok(Some(Packet::Disconnect(d))) => {
            assert_eq!(d.reason_code, ReasonCode::USE_ANOTHER_SERVER);
        }
        other => panic!("expected DISCONNECT 0x9C, got {other:?}"),
    }
    let fenced = started.elapsed();
    assert!(cluster.broker(cut).session("device").is_none());
    // Declared down by the majority, which adopts the session and publishes the will once.
    let p = watcher.recv_publish().await;
    let will_after = started.elapsed();
    assert_eq!(&p.payload[..], b"gone");
    watcher
        .send(&Packet::PubAck(PubResponse::success(
            p.packet_id.expect("QoS 1"),
        )))
        .await;
    // The node counts its time without a leader from the last one it heard, not from when
    // openraft stops naming the leader (a lease and an election timeout later): fenced about
    // SELF_FENCE_AFTER after the cut, seconds before the majority may declare it down, so its
    // clients are gone well before their wills are published elsewhere.
    assert!(
        fenced < raftmq_cluster::node::SELF_FENCE_AFTER + Duration::from_secs(2),
        "fenced only {fenced:?} after the cut"
    );
    assert!(
        will_after > fenced + Duration::from_secs(2),
        "the will was published {will_after:?} after the cut, too close to (or before) the \
         node let go of its client ({fenced:?})"
    );
    // The session expires (3 s) on the adopting node, in memory and in the replicated state.
    eventually(
        "the adopted session expired",
        Duration::from_secs(15),
        || {
            let gone = cluster.broker(leader).session("device").is_none()
                && !cluster.sessions(leader).contains("device");
            async move { gone }
        },
    )
    .await;
    cluster.net.heal();
    eventually("the healed node caught up", CONVERGE_TIMEOUT, || {
        let ok = !cluster.sessions(cut).contains("device") && cluster.leader_of(cut).is_some();
        async move { ok }
    })
    .await;
    assert!(
        drain(&mut watcher, Duration::from_secs(3)).await.is_empty(),
        "the will was published twice"
    );
    assert!(cluster.broker(cut).session("device").is_none());
    println!("fenced {fenced:?} after the cut; will published {will_after:?} after it");
    cluster.shutdown().await;
}

/// A client without a stored session that connects to a node already cut off from the others
/// registers a will the majority never hears of. The majority declares the node down and
/// publishes the wills it knew (listed in the declaration); the node, once it learns of the
/// declaration, publishes the one the list lacks. Each will once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_will_registered_on_a_cut_off_node_is_published_once_after_it_is_declared_down() {
    let cluster = Cluster::start_with_brokers(3).await;
    let (leader, cut, watcher_node) = follower_to_cut(&cluster).await;
    let mut watcher = client(cluster.mqtt(watcher_node), "watcher", 0, None).await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    let will = |payload: &'static [u8]| Will {
        topic: "wills/device".into(),
        payload: bytes::Bytes::from_static(payload),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties::default(),
    };
    let _known = client(cluster.mqtt(cut), "known", 0, Some(will(b"known-gone"))).await;
    eventually(
        "the leader holds the will of the client connected before the cut",
        Duration::from_secs(10),
        || {
            let ok = cluster.broker(leader).peer_will_count(cut) == 1;
            async move { ok }
        },
    )
    .await;

    cluster.net.isolate(cut, &cluster.ids);
    let _late = client(cluster.mqtt(cut), "late", 0, Some(will(b"late-gone"))).await;
    // The majority declares the node down (10 s after the cut) and publishes the will it
    // knew.
    let p = match watcher.recv_within(CONVERGE_TIMEOUT).await {
        Ok(Some(Packet::Publish(p))) => p,
        other => panic!("expected the known will, got {other:?}"),
    };
    assert_eq!(&p.payload[..], b"known-gone");
    watcher
        .send(&Packet::PubAck(PubResponse::success(
            p.packet_id.expect("QoS 1"),
        )))
        .await;
    assert_eq!(cluster.broker(leader).peer_will_count(cut), 0);
    cluster.net.heal();
    // The node learns it was declared down: it publishes the will the declaration did not
    // list (its client connected after the cut).
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + CONVERGE_TIMEOUT;
    while got.is_empty() && tokio::time::Instant::now() < deadline {
        got = drain(&mut watcher, Duration::from_secs(1)).await;
    }
    assert_eq!(got, ["late-gone"], "the will registered while cut off");
    assert!(
        drain(&mut watcher, Duration::from_secs(3)).await.is_empty(),
        "a will was published twice"
    );
    cluster.shutdown().await;
}

/// A QoS 1 message for the persistent subscriptions of `t/#` (published straight into a
/// broker, which returns how many sessions it was offered to, those it stored it for included).
fn stored_message(payload: &'static str) -> Arc<Message> {
    Arc::new(Message {
        topic: "t/x".into(),
        payload: bytes::Bytes::from_static(payload.as_bytes()),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
        expires_at: None,
        received_at: std::time::Instant::now(),
        origin: None,
    })
}

/// The majority moves on, one log entry per write, well past two snapshots (of a cluster
/// snapshotting every 20 entries).
async fn write_past_two_snapshots(cluster: &Cluster, majority: &[NodeId]) {
    for i in 0..60 {
        cluster
            .write_majority(majority, &[format!("missed-{i}")])
            .await;
    }
}

/// Waits until `node` has installed a snapshot at or past `purged` and its broker has
/// mirrored it.
async fn installed_a_snapshot_and_mirrored_it(cluster: &Cluster, node: NodeId, purged: u64) {
    eventually(
        "the node installed a snapshot and mirrored it",
        Duration::from_secs(15),
        || {
            let node = cluster.node(node);
            let snapshot = node.raft.metrics().borrow().snapshot.map_or(0, |s| s.index);
            let ok = snapshot >= purged && node.mirrored_index() >= snapshot;
            async move { ok }
        },
    )
    .await;
}

/// A node cut off long enough to let go of its persistent sessions (but not long enough to be
/// declared down, so it still owns them in the replicated state) catches up by installing a
/// snapshot before it can take them back. Meanwhile it must still store what is published
/// through it for those sessions: routed through the mirrored subscriptions of sessions held
/// elsewhere, which the snapshot replaces. (The mirror used to be rebuilt from the sessions of
/// *other* owners only: a publish there matched nothing and was acknowledged with 0x10 No
/// matching subscribers, unstored: the loss a chaos run found.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_node_that_installs_a_snapshot_still_stores_for_the_sessions_it_let_go() {
    // Snapshot every 20 entries, keep no log behind it: the cut-off node can only catch up
    // from a snapshot.
    let cluster = Cluster::start_with(3, tuning(20, 0), true, Transport::Plain).await;
    let leader = cluster.agreed_leader(&cluster.ids, None).await;
    let cut = *cluster
        .ids
        .iter()
        .find(|id| **id != leader)
        .expect("a follower");
    let majority = without(&cluster.ids, cut);
    let mut sub = client(cluster.mqtt(cut), "sub", 300, None).await;
    sub.subscribe("t/#", QoS::AtLeastOnce).await;
    eventually(
        "every node has applied the subscriber's session",
        Duration::from_secs(10),
        || {
            let ok = cluster
                .ids
                .iter()
                .all(|id| cluster.sessions(*id).contains("sub"));
            async move { ok }
        },
    )
    .await;
    let now = std::time::Instant::now();
    assert_eq!(
        cluster.broker(cut).publish(stored_message("before"), now),
        1
    );

    cluster.net.isolate(cut, &cluster.ids);
    write_past_two_snapshots(&cluster, &majority).await;
    let leader = cluster.agreed_leader(&majority, None).await;
    eventually(
        "the cut-off node let go of its sessions",
        Duration::from_secs(10),
        || {
            let fenced = cluster.broker(cut).session("sub").is_none();
            async move { fenced }
        },
    )
    .await;
    let purged = cluster
        .node(leader)
        .raft
        .metrics()
        .borrow()
        .purged
        .map_or(0, |p| p.index);
    let behind = cluster
        .node(cut)
        .raft
        .metrics()
        .borrow()
        .last_applied
        .map_or(0, |l| l.index);
    assert!(
        behind < purged,
        "the cut-off node ({behind}) must be behind the purged log ({purged})"
    );
    // Raft reaches it again, but what it proposes (the barrier it takes its sessions back
    // after) does not: it stays fenced, with the snapshot installed and mirrored.
    cluster.net.cut_forwarded_from(cut);
    cluster.net.heal();
    installed_a_snapshot_and_mirrored_it(&cluster, cut, purged).await;
    assert!(
        cluster.broker(cut).session("sub").is_none(),
        "the node took its sessions back although its barrier cannot commit"
    );
    let owned = cluster
        .node(leader)
        .durability
        .sessions_owned_by(cut)
        .expect("the state is readable");
    assert!(
        owned.iter().any(|(image, _)| image.client_id == "sub"),
        "the cut-off node was declared down (its session adopted elsewhere): too slow a run"
    );
    let offered = cluster
        .broker(cut)
        .publish(stored_message("after"), std::time::Instant::now());
    assert_eq!(
        offered, 1,
        "a message published through the node after the snapshot matched no session"
    );
    cluster.net.heal_forwarded();
    cluster.shutdown().await;
}

/// A node that misses, behind a snapshot, the claim another node made of a session it holds
/// offline no longer holds that session once it has installed the snapshot, and holds again
/// the sessions nobody claimed (it lets go of every session it held, whose changes in the
/// compacted log it missed, and takes back from the new state those it still owns). Without it
/// the node kept a stale copy: resumed there, the session would deliver again what its client
/// had already received elsewhere (QoS 2 twice, a chaos run found 374 of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_lets_go_of_a_session_claimed_elsewhere_behind_a_snapshot_it_installs() {
    let cluster = Cluster::start_with(3, tuning(20, 0), true, Transport::Plain).await;
    let leader = cluster.agreed_leader(&cluster.ids, None).await;
    let behind = *cluster
        .ids
        .iter()
        .find(|id| **id != leader)
        .expect("a follower");
    let other = *cluster
        .ids
        .iter()
        .find(|id| **id != leader && **id != behind)
        .expect("the other follower");
    let majority = without(&cluster.ids, behind);
    // Two persistent sessions held offline on the node that will fall behind.
    for id in ["moving", "staying"] {
        let mut c = client(cluster.mqtt(behind), id, 300, None).await;
        c.subscribe("t/#", QoS::AtLeastOnce).await;
        c.send(&Packet::Disconnect(Default::default())).await;
    }
    eventually(
        "every node has applied both sessions",
        Duration::from_secs(10),
        || {
            let ok = cluster.ids.iter().all(|id| {
                let s = cluster.sessions(*id);
                s.contains("moving") && s.contains("staying")
            });
            async move { ok }
        },
    )
    .await;

    // Cut off for less than the time after which it would let go of its sessions itself.
    let started = tokio::time::Instant::now();
    cluster.net.isolate(behind, &cluster.ids);
    let mut moved = {
        let mut connect = connect_v5("moving", false, 300);
        connect.will = None;
        let (c, ack) = RawClient::handshake(cluster.mqtt(other), connect).await;
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "CONNACK {ack:?}");
        assert!(ack.session_present);
        c
    };
    // A message stored for both sessions meanwhile, through the majority.
    assert_eq!(
        cluster
            .broker(other)
            .publish(stored_message("while behind"), std::time::Instant::now()),
        2
    );
    write_past_two_snapshots(&cluster, &majority).await;
    let last = cluster
        .node(behind)
        .raft
        .metrics()
        .borrow()
        .last_log_index
        .unwrap_or(0);
    let purged = cluster
        .node(leader)
        .raft
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.purged.is_some_and(|p| p.index > last),
            "the leader purged the log the cut-off node lacks",
        )
        .await
        .expect("the leader compacts its log")
        .purged
        .map_or(0, |p| p.index);
    cluster.net.heal();
    let healed_after = started.elapsed();
    installed_a_snapshot_and_mirrored_it(&cluster, behind, purged).await;
    // It lets go of the sessions it held and takes back those it still owns (once a barrier
    // commits): not the one claimed elsewhere.
    eventually(
        "the node took back the session nobody claimed",
        Duration::from_secs(15),
        || {
            let back = cluster.broker(behind).session("staying").is_some();
            async move { back }
        },
    )
    .await;
    assert!(
        cluster.broker(behind).session("moving").is_none(),
        "the node kept a session claimed elsewhere behind the snapshot it installed (cut \
         healed after {healed_after:?})"
    );
    // The session taken back has what was stored for it behind the snapshot.
    let (staying, _) = cluster
        .broker(behind)
        .inspect_client("staying")
        .expect("held");
    assert_eq!(
        staying.queued, 1,
        "the message stored for the session while its node was behind is not queued there"
    );
    // Published through it, a message is still stored for the session it let go of.
    let offered = cluster
        .broker(behind)
        .publish(stored_message("after"), std::time::Instant::now());
    assert_eq!(offered, 2, "both persistent sessions are routed to");
    moved.send(&Packet::Disconnect(Default::default())).await;
    cluster.shutdown().await;
}
