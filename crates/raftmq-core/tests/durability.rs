//! Durability seam: acknowledgements that promise durability wait for the commit, nothing else
//! does, and a broker rebuilt from durable state gives persistent sessions back as the protocol
//! requires (sans-IO, fake clock).

mod support;

use bytes::Bytes;
use parking_lot::Mutex;
use raftmq_codec::{
    ByteStr, Connect, ConnectProperties, Packet, PacketId, ProtocolVersion, PubResponse, Publish,
    PublishProperties, QoS, ReasonCode, Subscribe, SubscribeFilter, SubscribeProperties,
    SubscriptionOptions,
};
use raftmq_core::config::MqttConfig;
use raftmq_core::durability::{
    Commit, CommitHandle, Durability, DurabilityError, MemoryDurability, MessageId, Recovered,
    StateChange, StateImage,
};
use raftmq_core::{Broker, CloseReason, Connection};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Durability whose commits complete only when the test says so; records every change.
#[derive(Default)]
struct Held {
    changes: Mutex<Vec<StateChange>>,
    handles: Mutex<Vec<CommitHandle>>,
    next_id: AtomicU64,
}

impl Held {
    fn complete_all(&self, result: Result<(), DurabilityError>) {
        for h in self.handles.lock().drain(..) {
            h.complete(result);
        }
    }
    fn changes(&self) -> Vec<StateChange> {
        self.changes.lock().clone()
    }
}

impl Durability for Held {
    fn propose(&self, changes: Vec<StateChange>) -> Commit {
        self.changes.lock().extend(changes);
        let (commit, handle) = Commit::pending();
        self.handles.lock().push(handle);
        commit
    }
    fn next_message_id(&self) -> MessageId {
        MessageId(self.next_id.fetch_add(1, Ordering::Relaxed) + 1)
    }
    fn recover(&self) -> Result<Recovered, DurabilityError> {
        Ok(Recovered::default())
    }
}

/// A broker over [`Held`] durability, and the time the test starts at.
fn held_broker() -> (Arc<Held>, Arc<Broker>, Instant) {
    let held = Arc::new(Held::default());
    (held.clone(), broker(held), Instant::now())
}

/// Completes every pending commit successfully and returns what `c` sends then.
fn committed(held: &Held, c: &mut Connection, now: Instant) -> Vec<Packet> {
    held.complete_all(Ok(()));
    c.handle_commits(now);
    drain(c, now)
}

fn broker(d: Arc<dyn Durability>) -> Arc<Broker> {
    Arc::new(Broker::new(MqttConfig::default()).with_durability(d))
}

fn connect(id: &str, clean_start: bool, expiry: u32) -> Packet {
    Packet::Connect(Box::new(support::connect_v5(id, clean_start, expiry)))
}

fn subscribe(filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: pid(1),
        properties: SubscribeProperties::default(),
        filters: vec![SubscribeFilter {
            filter: ByteStr::from(filter),
            options: SubscriptionOptions {
                qos,
                ..Default::default()
            },
        }],
    })
}

fn publish(topic: &str, qos: QoS, id: u16, retain: bool) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos,
        retain,
        topic: ByteStr::from(topic),
        packet_id: (qos != QoS::AtMostOnce).then(|| pid(id)),
        properties: PublishProperties::default(),
        payload: Bytes::from(format!("m{id}")),
    })
}

fn pid(n: u16) -> PacketId {
    PacketId::new(n).expect("nonzero")
}

/// Sends a packet and returns what the connection would transmit now (after committing).
fn exchange(c: &mut Connection, p: Packet, now: Instant) -> Vec<Packet> {
    c.handle_packet(p, now);
    c.handle_commits(now);
    drain(c, now)
}

fn drain(c: &mut Connection, now: Instant) -> Vec<Packet> {
    c.pump(now, usize::MAX);
    std::iter::from_fn(|| c.poll_transmit()).collect()
}

/// A connection with a clean session that is not stored (no commit to wait for), past CONNACK.
fn clean_client(b: &Arc<Broker>, id: &str, now: Instant) -> Connection {
    let mut c = open(b, now);
    assert!(matches!(
        exchange(&mut c, connect(id, true, 0), now)[..],
        [Packet::ConnAck(_)]
    ));
    c
}

fn open(b: &Arc<Broker>, now: Instant) -> Connection {
    Connection::new(b.clone(), None, now)
}

#[test]
fn puback_waits_for_the_commit_when_a_persistent_session_matches() {
    let (held, b, now) = held_broker();
    let mut sub = open(&b, now);
    sub.handle_packet(connect("sub", true, 300), now);
    assert!(
        drain(&mut sub, now).is_empty(),
        "CONNACK must wait for the session record"
    );
    assert!(matches!(
        committed(&held, &mut sub, now)[..],
        [Packet::ConnAck(_)]
    ));
    sub.handle_packet(subscribe("t/#", QoS::AtLeastOnce), now);
    assert!(
        drain(&mut sub, now).is_empty(),
        "SUBACK must wait for the subscription record"
    );
    assert!(matches!(
        committed(&held, &mut sub, now)[..],
        [Packet::SubAck(_)]
    ));

    let mut publ = clean_client(&b, "pub", now);
    publ.handle_packet(publish("t/1", QoS::AtLeastOnce, 7, false), now);
    assert!(
        drain(&mut publ, now).is_empty(),
        "PUBACK before the message is durable"
    );
    assert!(publ.pending_commit().is_some());
    // Online delivery does not wait for consensus.
    assert!(matches!(drain(&mut sub, now)[..], [Packet::Publish(_)]));
    let stored = held
        .changes()
        .into_iter()
        .filter(|c| matches!(c, StateChange::MessageStored { .. }))
        .count();
    assert_eq!(stored, 1);
    match &committed(&held, &mut publ, now)[..] {
        [Packet::PubAck(ack)] => assert_eq!(ack.packet_id, pid(7)),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

#[test]
fn clean_sessions_and_qos0_never_wait_for_durability() {
    let (held, b, now) = held_broker();
    let mut sub = clean_client(&b, "sub", now);
    assert!(matches!(
        exchange(&mut sub, subscribe("t/#", QoS::ExactlyOnce), now)[..],
        [Packet::SubAck(_)]
    ));
    let mut publ = open(&b, now);
    exchange(&mut publ, connect("pub", true, 0), now);
    exchange(&mut publ, publish("t/1", QoS::AtMostOnce, 0, false), now);
    assert!(matches!(
        exchange(&mut publ, publish("t/1", QoS::AtLeastOnce, 2, false), now)[..],
        [Packet::PubAck(_)]
    ));
    assert_eq!(drain(&mut sub, now).len(), 2);
    assert!(
        held.changes().is_empty(),
        "nothing durable was involved: {:?}",
        held.changes()
    );
}

#[test]
fn fan_out_to_many_persistent_sessions_stores_the_message_once() {
    let durability = Arc::new(MemoryDurability::default());
    let b = broker(durability.clone());
    let now = Instant::now();
    let mut subs: Vec<Connection> = (0..20)
        .map(|i| {
            let mut c = open(&b, now);
            exchange(&mut c, connect(&format!("s{i}"), true, 300), now);
            exchange(&mut c, subscribe("fan/#", QoS::AtLeastOnce), now);
            c
        })
        .collect();
    let mut publ = open(&b, now);
    exchange(&mut publ, connect("pub", true, 0), now);
    exchange(&mut publ, publish("fan/x", QoS::AtLeastOnce, 1, false), now);
    assert_eq!(durability.image().stored_messages(), 1);
    // Every subscriber acknowledges: the stored message is released.
    for c in &mut subs {
        let p = match &drain(c, now)[..] {
            [Packet::Publish(p)] => p.packet_id.expect("qos1"),
            other => panic!("{other:?}"),
        };
        exchange(c, Packet::PubAck(PubResponse::success(p)), now);
    }
    assert_eq!(durability.image().stored_messages(), 0);
}

/// Fails every held commit: the CONNACK waiting for its session's record must go out alone,
/// refused with `code`, and the connection close.
fn assert_connack_after_failed_commit(
    c: &mut Connection,
    held: &Held,
    now: Instant,
    code: ReasonCode,
) {
    held.complete_all(Err(DurabilityError::Unavailable));
    c.handle_commits(now);
    match &drain(c, now)[..] {
        [Packet::ConnAck(ack)] => assert_eq!(ack.reason_code, code),
        other => panic!("expected CONNACK {code:?}, got {other:?}"),
    }
    assert!(c.is_closed());
}

#[test]
fn failed_commit_refuses_connack_with_server_unavailable() {
    let (held, b, now) = held_broker();
    let mut c = open(&b, now);
    c.handle_packet(connect("c", true, 60), now);
    assert_connack_after_failed_commit(&mut c, &held, now, ReasonCode::SERVER_UNAVAILABLE);
}

#[test]
fn failed_commit_closes_the_publisher_without_acknowledging() {
    let (held, b, now) = held_broker();
    let mut sub = open(&b, now);
    sub.handle_packet(connect("sub", true, 60), now);
    sub.handle_packet(subscribe("t", QoS::AtLeastOnce), now);
    held.complete_all(Ok(()));
    sub.handle_commits(now);
    let mut publ = open(&b, now);
    exchange(&mut publ, connect("pub", true, 0), now);
    publ.handle_packet(publish("t", QoS::AtLeastOnce, 3, false), now);
    held.complete_all(Err(DurabilityError::Unavailable));
    publ.handle_commits(now);
    let out = drain(&mut publ, now);
    assert!(
        !out.iter().any(|p| matches!(p, Packet::PubAck(_))),
        "{out:?}"
    );
    assert!(
        matches!(out[..], [Packet::Disconnect(ref d)] if d.reason_code == ReasonCode::SERVER_BUSY),
        "{out:?}"
    );
    assert_eq!(publ.close_reason(), Some(CloseReason::StorageUnavailable));
}

/// A subscriber with a persistent session, offline; messages published meanwhile; the broker
/// is rebuilt from durable state; the subscriber comes back.
#[test]
fn persistent_session_queue_and_retained_survive_a_broker_rebuild() {
    let durability = Arc::new(MemoryDurability::default());
    let t0 = Instant::now();
    {
        let b = broker(durability.clone());
        let mut sub = open(&b, t0);
        exchange(&mut sub, connect("sub", true, 3600), t0);
        exchange(&mut sub, subscribe("t/#", QoS::ExactlyOnce), t0);
        sub.handle_packet(Packet::Disconnect(Default::default()), t0);
        let mut publ = open(&b, t0);
        exchange(&mut publ, connect("pub", true, 0), t0);
        for i in 1..=3u16 {
            exchange(&mut publ, publish("t/a", QoS::AtLeastOnce, i, false), t0);
        }
        exchange(&mut publ, publish("r/x", QoS::AtLeastOnce, 9, true), t0);
    }
    let t1 = t0 + Duration::from_secs(5);
    let b = broker(durability.clone());
    assert_eq!(b.recover(t1), Ok(1));
    assert!(b.retained("r/x").is_some(), "retained message recovered");
    let mut sub = open(&b, t1);
    let out = exchange(&mut sub, connect("sub", false, 3600), t1);
    match &out[0] {
        Packet::ConnAck(ack) => assert!(ack.session_present),
        other => panic!("{other:?}"),
    }
    let payloads: Vec<Bytes> = out[1..]
        .iter()
        .map(|p| match p {
            Packet::Publish(p) => p.payload.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        payloads,
        [b"m1", b"m2", b"m3"].map(|b| Bytes::from_static(b))
    );
    // The subscription came back too.
    let mut publ = open(&b, t1);
    exchange(&mut publ, connect("pub", true, 0), t1);
    exchange(&mut publ, publish("t/b", QoS::AtMostOnce, 0, false), t1);
    assert_eq!(drain(&mut sub, t1).len(), 1);
}

#[test]
fn unacknowledged_deliveries_are_resent_with_their_original_packet_ids_after_a_rebuild() {
    let durability = Arc::new(MemoryDurability::default());
    let t0 = Instant::now();
    let (first_id, second_id) = {
        let b = broker(durability.clone());
        let mut sub = open(&b, t0);
        exchange(&mut sub, connect("sub", true, 3600), t0);
        exchange(&mut sub, subscribe("q", QoS::ExactlyOnce), t0);
        let mut publ = open(&b, t0);
        exchange(&mut publ, connect("pub", true, 0), t0);
        exchange(&mut publ, publish("q", QoS::ExactlyOnce, 1, false), t0);
        exchange(&mut publ, Packet::PubRel(PubResponse::success(pid(1))), t0);
        exchange(&mut publ, publish("q", QoS::AtLeastOnce, 2, false), t0);
        let ids: Vec<PacketId> = drain(&mut sub, t0)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => p.packet_id.expect("qos>0"),
                other => panic!("{other:?}"),
            })
            .collect();
        // The QoS 2 one gets PUBREC (so PUBREL is what must come back); the QoS 1 one nothing.
        let out = exchange(&mut sub, Packet::PubRec(PubResponse::success(ids[0])), t0);
        assert!(matches!(out[..], [Packet::PubRel(_)]));
        (ids[0], ids[1])
    };
    let t1 = t0 + Duration::from_secs(1);
    let b = broker(durability);
    b.recover(t1).expect("the store is readable");
    let mut sub = open(&b, t1);
    let out = exchange(&mut sub, connect("sub", false, 3600), t1);
    match &out[..] {
        [
            Packet::ConnAck(ack),
            Packet::PubRel(rel),
            Packet::Publish(p),
        ] => {
            assert!(ack.session_present);
            assert_eq!(rel.packet_id, first_id);
            assert_eq!(p.packet_id, Some(second_id));
            assert!(p.dup, "a resent PUBLISH carries DUP");
        }
        other => panic!("expected CONNACK, PUBREL, PUBLISH; got {other:?}"),
    }
}

/// PUBCOMP is sent only once the release of the packet id is durable: after PUBCOMP the
/// client may reuse the id for a new message, and a session loaded from a state that still
/// holds the id unreleased would take that new message for a resend and drop it (a 30-minute
/// chaos run lost six acknowledged QoS 2 messages this way, once the publisher's packet ids
/// wrapped around). A release that fails closes the connection without PUBCOMP.
#[test]
fn pubcomp_waits_until_the_release_of_the_packet_id_is_durable() {
    let (held, b, now) = held_broker();
    let mut publ = open(&b, now);
    publ.handle_packet(connect("pub", true, 3600), now);
    assert!(matches!(
        committed(&held, &mut publ, now)[..],
        [Packet::ConnAck(_)]
    ));
    publ.handle_packet(publish("x", QoS::ExactlyOnce, 5, false), now);
    assert!(matches!(
        committed(&held, &mut publ, now)[..],
        [Packet::PubRec(_)]
    ));
    publ.handle_packet(Packet::PubRel(PubResponse::success(pid(5))), now);
    assert!(
        drain(&mut publ, now).is_empty(),
        "PUBCOMP sent before the release was recorded"
    );
    assert!(
        held.changes()
            .iter()
            .any(|c| matches!(c, StateChange::IncomingQos2Completed { packet_id: 5, .. }))
    );
    assert!(matches!(
        committed(&held, &mut publ, now)[..],
        [Packet::PubComp(_)]
    ));

    // A release that cannot be recorded: no PUBCOMP, the connection closes.
    publ.handle_packet(publish("x", QoS::ExactlyOnce, 6, false), now);
    assert!(matches!(
        committed(&held, &mut publ, now)[..],
        [Packet::PubRec(_)]
    ));
    publ.handle_packet(Packet::PubRel(PubResponse::success(pid(6))), now);
    held.complete_all(Err(DurabilityError::Unavailable));
    publ.handle_commits(now);
    let out = drain(&mut publ, now);
    assert!(
        !out.iter().any(|p| matches!(p, Packet::PubComp(_))),
        "PUBCOMP for a release that was not recorded: {out:?}"
    );
    assert!(publ.is_closed(), "the connection stays open: {out:?}");
}

#[test]
fn incoming_qos2_state_survives_a_rebuild_so_a_resent_publish_is_not_routed_twice() {
    let durability = Arc::new(MemoryDurability::default());
    let t0 = Instant::now();
    {
        let b = broker(durability.clone());
        let mut sub = open(&b, t0);
        exchange(&mut sub, connect("sub", true, 3600), t0);
        exchange(&mut sub, subscribe("x", QoS::ExactlyOnce), t0);
        let mut publ = open(&b, t0);
        exchange(&mut publ, connect("pub", true, 3600), t0);
        let out = exchange(&mut publ, publish("x", QoS::ExactlyOnce, 5, false), t0);
        assert!(matches!(out[..], [Packet::PubRec(_)]));
        // The publisher's connection dies before it sends PUBREL.
    }
    let b = broker(durability.clone());
    b.recover(t0).expect("the store is readable");
    let mut publ = open(&b, t0);
    exchange(&mut publ, connect("pub", false, 3600), t0);
    let mut dup = publish("x", QoS::ExactlyOnce, 5, false);
    if let Packet::Publish(p) = &mut dup {
        p.dup = true;
    }
    assert!(matches!(
        exchange(&mut publ, dup, t0)[..],
        [Packet::PubRec(_)]
    ));
    assert!(matches!(
        exchange(&mut publ, Packet::PubRel(PubResponse::success(pid(5))), t0)[..],
        [Packet::PubComp(_)]
    ));
    // The subscriber holds exactly one copy.
    let mut sub = open(&b, t0);
    let out = exchange(&mut sub, connect("sub", false, 3600), t0);
    assert_eq!(
        out.iter()
            .filter(|p| matches!(p, Packet::Publish(_)))
            .count(),
        1,
        "{out:?}"
    );
}

#[test]
fn state_image_is_a_deterministic_function_of_its_changes() {
    let durability = Arc::new(MemoryDurability::default());
    let held = Arc::new(Held::default());
    // Drive two brokers identically: one applying as it goes, one recording.
    let now = Instant::now();
    for d in [
        durability.clone() as Arc<dyn Durability>,
        held.clone() as Arc<dyn Durability>,
    ] {
        let b = broker(d);
        let mut sub = open(&b, now);
        sub.handle_packet(connect("s", true, 100), now);
        sub.handle_packet(subscribe("a/+", QoS::AtLeastOnce), now);
        let mut publ = open(&b, now);
        publ.handle_packet(connect("p", true, 0), now);
        publ.handle_packet(publish("a/b", QoS::AtLeastOnce, 1, true), now);
        held.complete_all(Ok(()));
    }
    let mut replayed = StateImage::default();
    for change in held.changes() {
        replayed.apply(&change);
    }
    assert_eq!(replayed.recovered(), durability.image().recovered());
}

#[test]
fn resumed_session_resends_no_more_than_the_new_receive_maximum_at_once() {
    let b = broker(Arc::new(MemoryDurability::default()));
    let now = Instant::now();
    let mut sub = open(&b, now);
    exchange(&mut sub, connect("sub", true, 600), now);
    exchange(&mut sub, subscribe("w", QoS::AtLeastOnce), now);
    let mut publ = open(&b, now);
    exchange(&mut publ, connect("pub", true, 0), now);
    for i in 1..=3u16 {
        exchange(&mut publ, publish("w", QoS::AtLeastOnce, i, false), now);
    }
    assert_eq!(
        drain(&mut sub, now).len(),
        3,
        "three in flight, none acknowledged"
    );
    sub.handle_transport_closed(now);

    let resumed = Connect {
        protocol: ProtocolVersion::V5,
        clean_start: false,
        keep_alive: 0,
        client_id: ByteStr::from("sub"),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties {
            session_expiry_interval: Some(600),
            receive_maximum: Some(1),
            ..Default::default()
        },
    };
    let mut sub = open(&b, now);
    let out = exchange(&mut sub, Packet::Connect(Box::new(resumed)), now);
    let resent = |out: &[Packet]| -> Vec<Bytes> {
        out.iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(p.payload.clone()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(resent(&out), [Bytes::from_static(b"m1")]);
    let mut expected = 2;
    let mut last = out;
    while expected <= 3 {
        let id = last
            .iter()
            .find_map(|p| match p {
                Packet::Publish(p) => p.packet_id,
                _ => None,
            })
            .expect("a resent PUBLISH");
        last = exchange(&mut sub, Packet::PubAck(PubResponse::success(id)), now);
        assert_eq!(
            resent(&last),
            [Bytes::from(format!("m{expected}"))],
            "one at a time, in order"
        );
        expected += 1;
    }
}

#[test]
fn a_refused_publish_leaves_nothing_queued_for_an_offline_persistent_session() {
    let (held, b, now) = held_broker();
    let mut sub = open(&b, now);
    sub.handle_packet(connect("sub", true, 300), now);
    sub.handle_packet(subscribe("t", QoS::AtLeastOnce), now);
    held.complete_all(Ok(()));
    sub.handle_commits(now);
    sub.handle_transport_closed(now);
    let session = b.session("sub").expect("persistent session");

    let mut publ = open(&b, now);
    exchange(&mut publ, connect("pub", true, 0), now);
    // Refused three times (no quorum): nothing may pile up in the offline session's queue.
    for attempt in 0..3u16 {
        publ = open(&b, now);
        exchange(&mut publ, connect("pub", true, 0), now);
        publ.handle_packet(publish("t", QoS::AtLeastOnce, 1 + attempt, false), now);
        assert_eq!(session.queue_depth(), (0, 0), "queued before the commit");
        held.complete_all(Err(DurabilityError::Unavailable));
        publ.handle_commits(now);
        assert!(publ.is_closed());
    }
    assert_eq!(session.queue_depth(), (0, 0));
    // Accepted: queued once the commit succeeds, together with the PUBACK.
    let mut publ = open(&b, now);
    exchange(&mut publ, connect("pub", true, 0), now);
    publ.handle_packet(publish("t", QoS::AtLeastOnce, 9, false), now);
    held.complete_all(Ok(()));
    assert!(matches!(
        exchange(&mut publ, Packet::PingReq, now)[..],
        [Packet::PubAck(_), Packet::PingResp]
    ));
    assert_eq!(session.queue_depth(), (1, 0));
}

// ---------------------------------------------------------------------------------------------
// Mirroring what other nodes commit (Broker::apply_replicated)
// ---------------------------------------------------------------------------------------------

fn sub_entry(qos: QoS) -> raftmq_core::session::SubEntry {
    raftmq_core::session::SubEntry {
        options: SubscriptionOptions {
            qos,
            ..Default::default()
        },
        subscription_id: None,
    }
}

#[test]
fn a_qos1_publish_is_stored_for_persistent_sessions_owned_by_other_nodes() {
    let (held, b, now) = held_broker();
    // Another node's client subscribed (QoS 1 and QoS 0 subscriptions, one shared).
    b.apply_replicated(
        5,
        &[
            StateChange::Subscribed {
                client_id: ByteStr::from("far"),
                filter: Arc::from("t/#"),
                entry: sub_entry(QoS::AtLeastOnce),
            },
            StateChange::Subscribed {
                client_id: ByteStr::from("far0"),
                filter: Arc::from("t/+"),
                entry: sub_entry(QoS::AtMostOnce),
            },
            StateChange::Subscribed {
                client_id: ByteStr::from("farshared"),
                filter: Arc::from("$share/g/t/#"),
                entry: sub_entry(QoS::AtLeastOnce),
            },
        ],
        now,
    );
    let mut publ = clean_client(&b, "pub", now);
    publ.handle_packet(publish("t/1", QoS::AtLeastOnce, 3, false), now);
    assert!(
        drain(&mut publ, now).is_empty(),
        "PUBACK must wait until the message is stored for the remote session"
    );
    let targets: Vec<String> = held
        .changes()
        .into_iter()
        .filter_map(|c| match c {
            StateChange::MessageStored { targets, .. } => Some(targets),
            _ => None,
        })
        .flatten()
        .map(|t| format!("{}:{:?}", t.client_id.as_str(), t.qos))
        .collect();
    assert_eq!(targets, ["far:AtLeastOnce"]);
    assert!(matches!(
        committed(&held, &mut publ, now)[..],
        [Packet::PubAck(_)]
    ));

    // QoS 0 is never stored; after the remote session ends nothing is stored for it.
    let before = held.changes().len();
    publ.handle_packet(publish("t/2", QoS::AtMostOnce, 0, false), now);
    b.apply_replicated(
        6,
        &[StateChange::SessionEnded {
            client_id: ByteStr::from("far"),
        }],
        now,
    );
    publ.handle_packet(publish("t/3", QoS::AtLeastOnce, 4, false), now);
    assert!(
        held.changes()[before..]
            .iter()
            .all(|c| !matches!(c, StateChange::MessageStored { .. }))
    );
    assert!(matches!(drain(&mut publ, now)[..], [Packet::PubAck(_)]));
}

#[test]
fn a_claim_through_another_node_fences_the_local_connection_and_keeps_its_subscriptions_remote() {
    let (held, b, now) = held_broker();
    let mut sub = open(&b, now);
    sub.handle_packet(connect("mover", true, 300), now);
    sub.handle_packet(subscribe("jobs/#", QoS::AtLeastOnce), now);
    held.complete_all(Ok(()));
    sub.handle_commits(now);
    assert!(matches!(
        drain(&mut sub, now)[..],
        [Packet::ConnAck(_), Packet::SubAck(_)]
    ));

    // The same client id claims its session through another node.
    b.apply_replicated(
        9,
        &[StateChange::SessionOpened {
            client_id: ByteStr::from("mover"),
            epoch: 77,
            clean_start: false,
            expiry_secs: 300,
            will: None,
        }],
        now,
    );
    match &drain(&mut sub, now)[..] {
        [Packet::Disconnect(d)] => assert_eq!(d.reason_code, ReasonCode::SESSION_TAKEN_OVER),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    assert_eq!(sub.close_reason(), Some(CloseReason::TakenOver));
    assert!(
        b.session("mover").is_none(),
        "the session now lives elsewhere"
    );

    // Its subscription is now a remote one: a QoS 1 publish here is stored for it.
    let mut publ = open(&b, now);
    exchange(&mut publ, connect("pub", true, 0), now);
    publ.handle_packet(publish("jobs/1", QoS::AtLeastOnce, 1, false), now);
    let stored_for_mover = held.changes().into_iter().any(|c| {
        matches!(c, StateChange::MessageStored { targets, .. }
            if targets.iter().any(|t| t.client_id.as_str() == "mover"))
    });
    assert!(stored_for_mover);
}

#[test]
fn a_message_stored_through_another_node_is_queued_for_the_local_session_once() {
    let (held, b, now) = held_broker();
    let mut sub = open(&b, now);
    sub.handle_packet(connect("here", true, 300), now);
    assert!(matches!(
        committed(&held, &mut sub, now)[..],
        [Packet::ConnAck(_)]
    ));

    let stored = |id: u64| StateChange::MessageStored {
        id: MessageId(id),
        message: Arc::new(raftmq_core::Message {
            topic: ByteStr::from("t/x"),
            payload: Bytes::from_static(b"remote"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: PublishProperties::default(),
            expires_at: None,
            received_at: now,
            origin: Some(ByteStr::from("elsewhere")),
        }),
        targets: vec![raftmq_core::durability::StoredTarget {
            client_id: ByteStr::from("here"),
            qos: QoS::AtLeastOnce,
            retain: false,
            subscription_ids: Default::default(),
        }],
    };
    b.apply_replicated(10, &[stored(500)], now);
    match &drain(&mut sub, now)[..] {
        [Packet::Publish(p)] => assert_eq!(&p.payload[..], b"remote"),
        other => panic!("expected the stored message, got {other:?}"),
    }
    // A stored message whose targets are all sessions of other nodes queues nothing here.
    let elsewhere = match stored(501) {
        StateChange::MessageStored {
            id,
            message,
            mut targets,
        } => {
            targets[0].client_id = ByteStr::from("not-here");
            StateChange::MessageStored {
                id,
                message,
                targets,
            }
        }
        other => other,
    };
    b.apply_replicated(12, &[elsewhere], now);
    assert!(drain(&mut sub, now).is_empty());
}

fn remote_message(
    topic: &str,
    qos: QoS,
    payload: &'static [u8],
    now: Instant,
) -> Arc<raftmq_core::Message> {
    Arc::new(raftmq_core::Message {
        topic: ByteStr::from(topic),
        payload: Bytes::from_static(payload),
        qos,
        retain: false,
        properties: PublishProperties::default(),
        expires_at: None,
        received_at: now,
        origin: Some(ByteStr::from("elsewhere")),
    })
}

fn stored_for(id: u64, message: &Arc<raftmq_core::Message>, client: &str) -> StateChange {
    StateChange::MessageStored {
        id: MessageId(id),
        message: message.clone(),
        targets: vec![raftmq_core::durability::StoredTarget {
            client_id: ByteStr::from(client),
            qos: message.qos,
            retain: false,
            subscription_ids: Default::default(),
        }],
    }
}

/// A connected persistent session subscribed to `filter` at `qos` (commits completed).
fn persistent_subscriber(
    b: &Arc<Broker>,
    held: &Held,
    id: &str,
    filter: &str,
    qos: QoS,
    now: Instant,
) -> Connection {
    let mut sub = open(b, now);
    sub.handle_packet(connect(id, true, 300), now);
    sub.handle_packet(subscribe(filter, qos), now);
    held.complete_all(Ok(()));
    sub.handle_commits(now);
    assert!(matches!(
        drain(&mut sub, now)[..],
        [Packet::ConnAck(_), Packet::SubAck(_)]
    ));
    sub
}

fn records_of(held: &Held, id: u64) -> Vec<&'static str> {
    held.changes()
        .into_iter()
        .filter_map(|c| match c {
            StateChange::MessageSent { id: m, .. } if m == MessageId(id) => Some("sent"),
            StateChange::MessageAcked { id: m, .. } if m == MessageId(id) => Some("acked"),
            _ => None,
        })
        .collect()
}

#[test]
fn a_forwarded_qos1_message_reaches_a_connected_persistent_session_before_its_commit_once() {
    let (held, b, now) = held_broker();
    let mut sub = persistent_subscriber(&b, &held, "here", "t/#", QoS::AtLeastOnce, now);

    // Forwarded first: delivered at once, without waiting for the replicated copy.
    let m = remote_message("t/1", QoS::AtLeastOnce, b"live", now);
    assert_eq!(
        b.deliver_forwarded(m.clone(), true, &[], Some(MessageId(900))),
        1
    );
    let packet_id = match &drain(&mut sub, now)[..] {
        [Packet::Publish(p)] => {
            assert_eq!(&p.payload[..], b"live");
            p.packet_id.expect("QoS 1")
        }
        other => panic!("expected the forwarded message at once, got {other:?}"),
    };
    exchange(
        &mut sub,
        Packet::PubAck(PubResponse::success(packet_id)),
        now,
    );
    assert!(
        records_of(&held, 900).is_empty(),
        "records of a message not yet stored here wait for its MessageStored"
    );
    // The replicated copy: not delivered again; the held-back records follow it.
    b.apply_replicated(20, &[stored_for(900, &m, "here")], now);
    assert!(drain(&mut sub, now).is_empty(), "delivered once");
    assert_eq!(records_of(&held, 900), ["sent", "acked"]);

    // Replicated first: delivered from the log; the late forwarded copy is dropped.
    let m2 = remote_message("t/2", QoS::AtLeastOnce, b"logged", now);
    b.apply_replicated(21, &[stored_for(901, &m2, "here")], now);
    assert!(
        matches!(&drain(&mut sub, now)[..], [Packet::Publish(p)] if &p.payload[..] == b"logged")
    );
    assert_eq!(b.deliver_forwarded(m2, true, &[], Some(MessageId(901))), 0);
    assert!(drain(&mut sub, now).is_empty(), "delivered once");
    assert_eq!(
        records_of(&held, 901),
        ["sent"],
        "recorded at once: already stored"
    );
}

#[test]
fn forwarded_qos2_for_a_persistent_session_waits_for_the_log_and_its_sent_record() {
    let (held, b, now) = held_broker();
    let mut sub = persistent_subscriber(&b, &held, "q2", "t/#", QoS::ExactlyOnce, now);
    let m = remote_message("t/1", QoS::ExactlyOnce, b"once", now);
    assert_eq!(
        b.deliver_forwarded(m.clone(), true, &[], Some(MessageId(77))),
        0
    );
    assert!(
        drain(&mut sub, now).is_empty(),
        "QoS 2 comes through the log only"
    );
    b.apply_replicated(30, &[stored_for(77, &m, "q2")], now);
    // The PUBLISH waits until its packet id is recorded: a resumed session elsewhere must
    // resend it under the same id.
    assert!(drain(&mut sub, now).is_empty());
    assert_eq!(records_of(&held, 77), ["sent"]);
    assert!(
        matches!(&committed(&held, &mut sub, now)[..], [Packet::Publish(p)] if p.qos == QoS::ExactlyOnce)
    );
}

#[derive(Default)]
struct RecordingForwarder {
    claims: Mutex<Vec<String>>,
}

impl raftmq_core::Forwarder for RecordingForwarder {
    fn forward(
        &self,
        _node: u64,
        _message: &Arc<raftmq_core::Message>,
        _plain: bool,
        _shared: Vec<Arc<str>>,
        _stored: Option<MessageId>,
        _after: Option<&Commit>,
    ) -> Commit {
        Commit::ready()
    }
    fn claim(&self, client_id: &ByteStr, _at: Instant) {
        self.claims.lock().push(client_id.to_string());
    }
}

#[test]
fn a_client_without_a_stored_session_is_claimed_cluster_wide_and_older_ones_end() {
    let held = Arc::new(Held::default());
    let b = broker(held.clone());
    let forwarder = Arc::new(RecordingForwarder::default());
    b.set_forwarder(forwarder.clone());
    let t0 = Instant::now();
    let mut clean = open(&b, t0);
    assert!(matches!(
        exchange(&mut clean, connect("dev", true, 0), t0)[..],
        [Packet::ConnAck(_)]
    ));
    let _persistent = persistent_subscriber(&b, &held, "keeper", "k/#", QoS::AtLeastOnce, t0);
    assert_eq!(
        *forwarder.claims.lock(),
        ["dev"],
        "only sessions that are not stored are claimed"
    );

    // An older claim from another node does not end the newer connection here (clearly
    // older: clocks of two processes agree only to a few milliseconds).
    let t1 = t0 + Duration::from_secs(1);
    assert!(!b.claimed_elsewhere(&ByteStr::from("dev"), t0 - Duration::from_millis(500), t1));
    assert!(drain(&mut clean, t1).is_empty());
    // A newer one does: Session Taken Over, and the session is gone.
    assert!(b.claimed_elsewhere(&ByteStr::from("dev"), t1, t1));
    match &drain(&mut clean, t1)[..] {
        [Packet::Disconnect(d)] => assert_eq!(d.reason_code, ReasonCode::SESSION_TAKEN_OVER),
        other => panic!("expected DISCONNECT 0x8E, got {other:?}"),
    }
    assert!(b.session("dev").is_none());

    // A stored session here, claimed by a newer connection elsewhere, is ended for good.
    assert!(b.claimed_elsewhere(&ByteStr::from("keeper"), t1, t1));
    assert!(held.changes().iter().any(
        |c| matches!(c, StateChange::SessionEnded { client_id } if client_id.as_str() == "keeper")
    ));
    assert!(!b.claimed_elsewhere(&ByteStr::from("nobody"), t1, t1));
}

#[test]
fn fencing_releases_persistent_sessions_without_their_wills_and_redirects_their_clients() {
    let held = Arc::new(Held::default());
    let b = broker(held.clone());
    b.set_redirect(Arc::new(|| Some("10.0.0.2:1883".to_owned())));
    let now = Instant::now();
    let mut sub = persistent_subscriber(&b, &held, "fenced", "f/#", QoS::AtLeastOnce, now);
    let mut clean = open(&b, now);
    exchange(&mut clean, connect("transient", true, 0), now);

    let before_fence = held.changes().len();
    assert_eq!(
        b.fence_durable_sessions(Some(ReasonCode::USE_ANOTHER_SERVER)),
        1
    );
    match &drain(&mut sub, now)[..] {
        [Packet::Disconnect(d)] => {
            assert_eq!(d.reason_code, ReasonCode::USE_ANOTHER_SERVER);
            assert_eq!(
                d.properties.server_reference.as_ref().map(|r| r.as_str()),
                Some("10.0.0.2:1883")
            );
        }
        other => panic!("expected DISCONNECT 0x9C, got {other:?}"),
    }
    assert!(b.session("fenced").is_none());
    assert!(
        b.session("transient").is_some(),
        "sessions that are not stored stay"
    );
    // Its subscription is now that of a session held elsewhere: QoS 1 here is stored for it.
    let before = held.changes().len();
    let mut publ = open(&b, now);
    exchange(&mut publ, connect("pub", true, 0), now);
    publ.handle_packet(publish("f/1", QoS::AtLeastOnce, 1, false), now);
    let after = held.changes();
    assert!(
        after[before_fence..].iter().all(|c| !matches!(
            c,
            StateChange::SessionDetached { .. } | StateChange::SessionEnded { .. }
        )),
        "no record: the session's owner is decided by the log"
    );
    assert!(
        after[before..]
            .iter()
            .any(|c| matches!(c, StateChange::MessageStored { targets, .. }
        if targets.iter().any(|t| t.client_id.as_str() == "fenced")))
    );
}

fn stored_payloads(held: &Held) -> Vec<String> {
    held.changes()
        .into_iter()
        .filter_map(|c| match c {
            StateChange::MessageStored { message, .. } => {
                Some(String::from_utf8_lossy(&message.payload).into_owned())
            }
            _ => None,
        })
        .collect()
}

/// What a subscriber is sent once the packet ids of its stored QoS 2 deliveries are recorded.
fn drain_recorded(c: &mut Connection, held: &Held, now: Instant) -> Vec<Packet> {
    let mut out = drain(c, now);
    out.extend(committed(held, c, now));
    out
}

fn publishes(packets: &[Packet]) -> Vec<String> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some(String::from_utf8_lossy(&p.payload).into_owned()),
            _ => None,
        })
        .collect()
}

/// Exactly once for a client's QoS 2 PUBLISH when its commit fails or its connection drops:
/// local subscribers get it only once it is recorded; a resend after a refused commit is routed
/// again (nothing was acknowledged), a resend after a successful one is not, and a resend while
/// the first is still committing is acknowledged when the first is.
#[test]
fn a_qos2_publish_reaches_subscribers_once_whatever_happens_to_its_commit() {
    let (held, b, now) = held_broker();
    let mut sub = persistent_subscriber(&b, &held, "s", "t/#", QoS::ExactlyOnce, now);
    let mut publ = open(&b, now);
    publ.handle_packet(connect("p", true, 300), now);
    assert!(matches!(
        committed(&held, &mut publ, now)[..],
        [Packet::ConnAck(_)]
    ));

    // Refused: nothing delivered, nothing acknowledged.
    publ.handle_packet(publish("t/1", QoS::ExactlyOnce, 7, false), now);
    assert!(
        drain(&mut sub, now).is_empty(),
        "delivered before it was recorded"
    );
    held.complete_all(Err(DurabilityError::Unavailable));
    publ.handle_commits(now);
    assert!(
        !drain(&mut publ, now)
            .iter()
            .any(|p| matches!(p, Packet::PubRec(_)))
    );
    assert!(drain(&mut sub, now).is_empty());
    // The client comes back and resends it (DUP): routed again, delivered once.
    let mut publ = open(&b, now);
    publ.handle_packet(connect("p", false, 300), now);
    committed(&held, &mut publ, now);
    let mut again = publish("t/1", QoS::ExactlyOnce, 7, false);
    if let Packet::Publish(p) = &mut again {
        p.dup = true;
    }
    publ.handle_packet(again.clone(), now);
    assert!(matches!(
        committed(&held, &mut publ, now)[..],
        [Packet::PubRec(_)]
    ));
    assert_eq!(publishes(&drain_recorded(&mut sub, &held, now)), ["m7"]);
    assert_eq!(
        stored_payloads(&held),
        ["m7", "m7"],
        "stored by the refused try and the resend"
    );

    // A resend while the first is still committing: routed once, acknowledged twice, once the
    // first commit succeeded.
    publ.handle_packet(publish("t/2", QoS::ExactlyOnce, 8, false), now);
    let mut dup8 = publish("t/2", QoS::ExactlyOnce, 8, false);
    if let Packet::Publish(p) = &mut dup8 {
        p.dup = true;
    }
    publ.handle_packet(dup8, now);
    assert!(drain(&mut publ, now).is_empty());
    held.complete_all(Ok(()));
    publ.handle_commits(now);
    assert!(matches!(
        drain(&mut publ, now)[..],
        [Packet::PubRec(_), Packet::PubRec(_)]
    ));
    assert_eq!(publishes(&drain_recorded(&mut sub, &held, now)), ["m8"]);

    // The publisher's connection drops before the commit: the message is still delivered
    // once it is recorded, and the resend on a new connection is acknowledged, not routed.
    publ.handle_packet(publish("t/3", QoS::ExactlyOnce, 9, false), now);
    drop(publ);
    held.complete_all(Ok(()));
    assert_eq!(publishes(&drain_recorded(&mut sub, &held, now)), ["m9"]);
    let before = stored_payloads(&held).len();
    let mut publ = open(&b, now);
    publ.handle_packet(connect("p", false, 300), now);
    committed(&held, &mut publ, now);
    let mut dup9 = publish("t/3", QoS::ExactlyOnce, 9, false);
    if let Packet::Publish(p) = &mut dup9 {
        p.dup = true;
    }
    publ.handle_packet(dup9, now);
    publ.handle_commits(now);
    assert!(matches!(drain(&mut publ, now)[..], [Packet::PubRec(_)]));
    assert_eq!(stored_payloads(&held).len(), before, "not routed again");
    assert!(
        drain_recorded(&mut sub, &held, now).is_empty(),
        "delivered once"
    );
}

/// A connection whose CONNACK waits for its claim while its session is fenced (this node lost
/// its quorum) does not spin: it waits for the commit, then answers and leaves.
#[test]
fn a_session_fenced_before_its_connack_waits_for_the_commit_instead_of_spinning() {
    let held = Arc::new(Held::default());
    let b = broker(held.clone());
    b.set_redirect(Arc::new(|| Some("10.0.0.2:1883".to_owned())));
    let now = Instant::now();
    let mut c = open(&b, now);
    c.handle_packet(connect("attaching", true, 300), now);
    assert!(drain(&mut c, now).is_empty(), "CONNACK waits for the claim");
    assert_eq!(
        b.fence_durable_sessions(Some(ReasonCode::USE_ANOTHER_SERVER)),
        1
    );
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    assert!(
        c.poll_session(&mut cx).is_pending(),
        "nothing to do before CONNACK: a ready session here would make the caller spin"
    );
    assert_connack_after_failed_commit(&mut c, &held, now, ReasonCode::USE_ANOTHER_SERVER);
}

/// A client's QoS 2 messages reach a subscriber in the order it sent them, even when one waits
/// for a commit (retained) and the next needs none; a refused one does not hold the next back.
#[test]
fn qos2_messages_of_one_client_are_delivered_in_order_around_commits() {
    let (held, b, now) = held_broker();
    let mut sub = open(&b, now);
    exchange(&mut sub, connect("order-sub", true, 0), now);
    exchange(&mut sub, subscribe("o/#", QoS::ExactlyOnce), now);
    let mut publ = open(&b, now);
    exchange(&mut publ, connect("order-pub", true, 0), now);
    // Retained: its record must commit first. Then one that records nothing.
    publ.handle_packet(publish("o/t", QoS::ExactlyOnce, 1, true), now);
    publ.handle_packet(publish("o/t", QoS::ExactlyOnce, 2, false), now);
    assert!(
        drain(&mut sub, now).is_empty(),
        "the second waits for the first"
    );
    held.complete_all(Ok(()));
    assert_eq!(publishes(&drain(&mut sub, now)), ["m1", "m2"]);
    // A refused one is not delivered, and does not stop the next.
    publ.handle_packet(publish("o/t", QoS::ExactlyOnce, 3, true), now);
    publ.handle_packet(publish("o/t", QoS::ExactlyOnce, 4, false), now);
    held.complete_all(Err(DurabilityError::Unavailable));
    assert_eq!(publishes(&drain(&mut sub, now)), ["m4"]);
}

/// Durability whose commits and session loads complete when the test says so.
#[derive(Default)]
struct Resuming {
    held: Held,
    loads: Mutex<Vec<raftmq_core::durability::SessionLoadHandle>>,
}

impl Durability for Resuming {
    fn propose(&self, changes: Vec<StateChange>) -> Commit {
        self.held.propose(changes)
    }
    fn next_message_id(&self) -> MessageId {
        self.held.next_message_id()
    }
    fn recover(&self) -> Result<Recovered, DurabilityError> {
        Ok(Recovered::default())
    }
    fn load_session(
        &self,
        _client_id: &ByteStr,
        _claim: Commit,
    ) -> raftmq_core::durability::SessionLoad {
        let (load, handle) = raftmq_core::durability::SessionLoad::pending();
        self.loads.lock().push(handle);
        load
    }
}

/// A session resumes here after its client's previous node went away: a message stored
/// for it just before it attached here is only in the image the load reads; the next one,
/// committed between the attach and the load, is also queued by the applied-change feed; the
/// third, the image shows, was sent under packet id 7 by the previous node, whose records of
/// the two before it did not land (a record held back for a live delivery, or lost in a
/// failure). Returns what the client gets: (payload, packet id, DUP).
fn resumed_with_a_later_message_recorded_sent(qos: QoS) -> Vec<(String, Option<u16>, bool)> {
    let d = Arc::new(Resuming::default());
    let b = broker(d.clone());
    let now = Instant::now();
    let mut sub = open(&b, now);
    sub.handle_packet(connect("x", false, 300), now);
    let m = |n: u64| {
        remote_message(
            "t/1",
            qos,
            ["m1", "m2", "m3"][n as usize - 1].as_bytes(),
            now,
        )
    };
    let (m1, m2, m3) = (m(1), m(2), m(3));
    // m2 and m3 commit after the attach: the feed queues them for the attaching session.
    b.apply_replicated(20, &[stored_for(2, &m2, "x")], now);
    b.apply_replicated(21, &[stored_for(3, &m3, "x")], now);
    // The claim commits; the load reads m1 (stored before the attach), m2, and m3, which the
    // client's previous node had already sent under packet id 7.
    d.held.complete_all(Ok(()));
    let delivery = |id: u64, message: &Arc<raftmq_core::Message>, packet_id| {
        raftmq_core::durability::StoredDelivery {
            id: MessageId(id),
            message: message.clone(),
            target: raftmq_core::durability::StoredTarget {
                client_id: ByteStr::from("x"),
                qos,
                retain: false,
                subscription_ids: Default::default(),
            },
            packet_id,
            released: false,
        }
    };
    let image = raftmq_core::durability::SessionImage {
        client_id: ByteStr::from("x"),
        expiry_secs: 300,
        subscriptions: vec![(Arc::from("t/#"), sub_entry(qos))],
        messages: vec![
            delivery(1, &m1, None),
            delivery(2, &m2, None),
            delivery(3, &m3, Some(7)),
        ],
        incoming_qos2: Vec::new(),
        qos2_reroute: Vec::new(),
        will: None,
    };
    for load in d.loads.lock().drain(..) {
        load.complete(Ok(Some((image.clone(), 22))));
    }
    sub.handle_commits(now);
    let mut packets = drain(&mut sub, now);
    // QoS 2 deliveries wait for their records.
    d.held.complete_all(Ok(()));
    sub.handle_commits(now);
    packets.extend(drain(&mut sub, now));
    let sent = packets
        .into_iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some((
                String::from_utf8_lossy(&p.payload).into_owned(),
                p.packet_id.map(|id| id.get()),
                p.dup,
            )),
            _ => None,
        })
        .collect();
    assert_eq!(
        b.stats().messages_queued.load(Ordering::Relaxed),
        0,
        "nothing left counted as queued"
    );
    sent
}

/// QoS 1: the stored order wins (MQTT 4.6): m1 and m2 are sent first, under packet ids of
/// their own, then m3 is resent under its id 7; all with DUP (the previous node may have sent
/// m1 and m2 too). Before, m3 was resent first (in flight), ahead of the two stored before it:
/// the chaos checker's `out_of_order`.
#[test]
fn a_resumed_session_gets_its_qos_1_messages_in_stored_order_even_one_recorded_sent() {
    let sent = resumed_with_a_later_message_recorded_sent(QoS::AtLeastOnce);
    let payloads: Vec<&str> = sent.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(payloads, ["m1", "m2", "m3"], "in stored order: {sent:?}");
    assert_eq!(sent[2].1, Some(7), "m3 keeps its packet id: {sent:?}");
    assert!(
        sent[..2]
            .iter()
            .all(|(_, id, _)| id.is_some() && *id != Some(7)),
        "m1 and m2 under ids of their own: {sent:?}"
    );
    assert!(
        sent.iter().all(|(_, _, dup)| *dup),
        "all resent with DUP: {sent:?}"
    );
}

/// QoS 2: exactly once wins: m3, which its receiver may hold unreleased under packet id 7, is
/// resent first under that id with DUP, then m1 and m2.
#[test]
fn a_resumed_session_resends_a_qos_2_message_recorded_sent_under_its_packet_id_first() {
    let sent = resumed_with_a_later_message_recorded_sent(QoS::ExactlyOnce);
    let payloads: Vec<&str> = sent.iter().map(|(p, _, _)| p.as_str()).collect();
    assert_eq!(
        payloads,
        ["m3", "m1", "m2"],
        "the in-flight one first: {sent:?}"
    );
    assert_eq!(sent[0].1, Some(7), "resent under its packet id");
    assert!(sent[0].2, "with DUP");
}

/// In a cluster, a QoS 2 PUBLISH whose commit was reported failed may have committed all the
/// same (its reply lost). When its client reconnects to the same node, its session is not
/// resumed from memory (which says "not recorded", so the resend would be routed and stored a
/// second time: a QoS 2 duplicate a 30-minute chaos run found) but loaded from the replicated
/// state, which says whether the packet id was recorded.
#[test]
fn a_session_holding_a_failed_qos2_commit_is_loaded_again_not_resumed_from_memory() {
    let d = Arc::new(Resuming::default());
    let b = broker(d.clone());
    b.set_forwarder(Arc::new(RecordingForwarder::default()));
    let now = Instant::now();
    let mut publ = open(&b, now);
    publ.handle_packet(connect("pub", true, 3600), now);
    d.held.complete_all(Ok(()));
    publ.handle_commits(now);
    drain(&mut publ, now);
    publ.handle_packet(publish("x", QoS::ExactlyOnce, 5, false), now);
    // Reported failed (it may have committed): no PUBREC, the connection closes.
    d.held.complete_all(Err(DurabilityError::Unavailable));
    publ.handle_commits(now);
    drain(&mut publ, now);
    assert!(publ.is_closed());
    assert!(d.loads.lock().is_empty());
    // The client reconnects to this node: its session is loaded, not taken from memory.
    let mut again = open(&b, now);
    again.handle_packet(connect("pub", false, 3600), now);
    d.held.complete_all(Ok(()));
    again.handle_commits(now);
    assert_eq!(
        d.loads.lock().len(),
        1,
        "the session was resumed from memory, which does not know whether its QoS 2 PUBLISH \
         was recorded"
    );
}

/// A commit reported failed may have happened (a timeout, a lost reply, a node paused past
/// its deadline). The local deliveries of the message are then kept and queued if this node
/// applies the message's `MessageStored` after all (its own batch, which the feed does not
/// otherwise re-apply to its broker), whichever of the two it learns first; a commit that
/// really failed queues nothing. Without this, the publisher's resend is recognised as a
/// duplicate and the subscriber here never gets the message (found by the chaos test).
#[test]
fn local_deliveries_of_a_commit_reported_failed_are_queued_if_it_happened() {
    let (held, b, now) = held_broker();
    let _sub = persistent_subscriber(&b, &held, "sub", "t", QoS::ExactlyOnce, now);
    let session = b.session("sub").expect("persistent session");
    let stored_ids = |held: &Held| -> Vec<MessageId> {
        held.changes()
            .iter()
            .filter_map(|c| match c {
                StateChange::MessageStored { id, .. } => Some(*id),
                _ => None,
            })
            .collect()
    };
    let publish_refused = |n: u16, applied_first: bool| {
        let mut publ = open(&b, now);
        exchange(&mut publ, connect("pub", true, 0), now);
        publ.handle_packet(publish("t", QoS::ExactlyOnce, n, false), now);
        let id = *stored_ids(&held).last().expect("stored");
        if applied_first {
            b.own_stored_applied([(id, vec!["sub".into()], 0)]);
        }
        held.complete_all(Err(DurabilityError::Unavailable));
        publ.handle_commits(now);
        assert!(publ.is_closed(), "refused: the client resends");
        id
    };
    // Reported failed, then applied here after all: queued then, once.
    let first = publish_refused(1, false);
    assert_eq!(
        session.queue_depth().0,
        0,
        "not before it is known to have happened"
    );
    b.own_stored_applied([(first, vec!["sub".into()], 0)]);
    assert_eq!(session.queue_depth().0, 1);
    b.own_stored_applied([(first, vec!["sub".into()], 0)]);
    assert_eq!(session.queue_depth().0, 1, "once");
    // Applied here before the failure was reported: queued when it is.
    publish_refused(2, true);
    assert_eq!(session.queue_depth().0, 2);
    // Really failed (never applied): nothing.
    publish_refused(3, false);
    assert_eq!(session.queue_depth().0, 2);
}

/// A QoS 2 PUBLISH whose packet id was loaded with a message id to store again (its first
/// store reached the publisher's shard, and maybe not the others): the client's resend is
/// stored again under that id, not a new one, and not forwarded live; the sessions here get it
/// only once the store applied it for them (`own_stored_applied`), and PUBREC waits for the
/// commit. Once that committed, a further resend is only acknowledged.
#[test]
fn a_resent_qos2_publish_loaded_with_a_message_id_is_stored_again_under_it() {
    let d = Arc::new(Resuming::default());
    let b = broker(d.clone());
    let now = Instant::now();
    let settle = |c: &mut Connection| {
        for _ in 0..3 {
            d.held.complete_all(Ok(()));
            for load in d.loads.lock().drain(..) {
                load.complete(Ok(None));
            }
            c.handle_commits(now);
        }
        drain(c, now)
    };
    let mut sub = open(&b, now);
    sub.handle_packet(connect("sub", false, 300), now);
    settle(&mut sub);
    sub.handle_packet(subscribe("t", QoS::ExactlyOnce), now);
    assert!(
        settle(&mut sub)
            .iter()
            .any(|p| matches!(p, Packet::SubAck(_))),
        "subscribed"
    );
    let mut publ = open(&b, now);
    publ.handle_packet(connect("pub", false, 300), now);
    d.held.complete_all(Ok(()));
    let image = raftmq_core::durability::SessionImage {
        client_id: ByteStr::from("pub"),
        expiry_secs: 300,
        incoming_qos2: vec![5],
        qos2_reroute: vec![(5, MessageId(77))],
        ..Default::default()
    };
    for load in d.loads.lock().drain(..) {
        load.complete(Ok(Some((image.clone(), 9))));
    }
    publ.handle_commits(now);
    assert!(
        drain(&mut publ, now)
            .iter()
            .any(|p| matches!(p, Packet::ConnAck(_))),
        "connected with its session"
    );
    // A first attempt's store of the message had reached this session here (applied here
    // before): the resend must not deliver it again for that.
    b.own_stored_applied([(MessageId(77), vec![ByteStr::from("sub")], 0)]);
    let before = d.held.changes().len();
    let mut resend = publish("t", QoS::ExactlyOnce, 5, false);
    if let Packet::Publish(p) = &mut resend {
        p.dup = true;
    }
    publ.handle_packet(resend.clone(), now);
    let proposed: Vec<StateChange> = d.held.changes()[before..].to_vec();
    let stored: Vec<MessageId> = proposed
        .iter()
        .filter_map(|c| match c {
            StateChange::MessageStored { id, targets, .. } => {
                assert_eq!(targets.len(), 1);
                assert_eq!(targets[0].client_id.as_str(), "sub");
                Some(*id)
            }
            _ => None,
        })
        .collect();
    assert_eq!(stored, vec![MessageId(77)], "stored again under its id");
    assert!(proposed.iter().any(|c| matches!(
        c,
        StateChange::IncomingQos2Received {
            packet_id: 5,
            message_id: Some(MessageId(77)),
            ..
        }
    )));
    assert!(
        !drain(&mut publ, now)
            .iter()
            .any(|p| matches!(p, Packet::PubRec(_))),
        "PUBREC waits for the commit"
    );
    d.held.complete_all(Ok(()));
    publ.handle_commits(now);
    assert!(
        drain(&mut publ, now)
            .iter()
            .any(|p| matches!(p, Packet::PubRec(_))),
        "acknowledged once stored"
    );
    sub.handle_commits(now);
    assert!(
        publishes(&drain(&mut sub, now)).is_empty(),
        "not delivered here before the store applied it for this session"
    );
    b.own_stored_applied([(MessageId(77), vec![ByteStr::from("sub")], 0)]);
    // A QoS 2 delivery to a persistent session goes once its sending is recorded.
    let mut sent = drain(&mut sub, now);
    d.held.complete_all(Ok(()));
    sub.handle_commits(now);
    sent.extend(drain(&mut sub, now));
    assert_eq!(publishes(&sent), ["m5"]);
    b.own_stored_applied([(MessageId(77), vec![ByteStr::from("sub")], 0)]);
    assert!(publishes(&drain(&mut sub, now)).is_empty(), "once");
    // Resent once more: acknowledged, not stored again.
    let before = d.held.changes().len();
    publ.handle_packet(resend, now);
    publ.handle_commits(now);
    assert!(
        drain(&mut publ, now)
            .iter()
            .any(|p| matches!(p, Packet::PubRec(_)))
    );
    assert_eq!(d.held.changes().len(), before, "nothing proposed");
}

/// A QoS 2 commit reported failed that happened after all, with a persistent subscriber and
/// a clean one here: once this node applies the message's store, both get it, although the
/// store names the persistent one only (with shards, a store names the sessions of its shard;
/// a delivery that is not stored only waited to know the message was accepted).
#[test]
fn a_store_applied_after_a_reported_failure_releases_the_clean_sessions_deliveries_too() {
    let (held, b, now) = held_broker();
    let _durable = persistent_subscriber(&b, &held, "sub", "t", QoS::ExactlyOnce, now);
    let durable = b.session("sub").expect("persistent session");
    let mut clean = open(&b, now);
    exchange(&mut clean, connect("clean", true, 0), now);
    exchange(&mut clean, subscribe("t", QoS::ExactlyOnce), now);
    let mut publ = open(&b, now);
    exchange(&mut publ, connect("pub", true, 0), now);
    publ.handle_packet(publish("t", QoS::ExactlyOnce, 1, false), now);
    let id = held
        .changes()
        .iter()
        .rev()
        .find_map(|c| match c {
            StateChange::MessageStored { id, .. } => Some(*id),
            _ => None,
        })
        .expect("stored");
    held.complete_all(Err(DurabilityError::Unavailable));
    publ.handle_commits(now);
    assert!(
        publishes(&drain(&mut clean, now)).is_empty(),
        "not before it is known"
    );
    b.own_stored_applied([(id, vec![ByteStr::from("sub")], 0)]);
    assert_eq!(publishes(&drain(&mut clean, now)), ["m1"]);
    assert_eq!(durable.queue_depth().0, 1);
}
