//! Black-box protocol conformance over real sockets, with raw packets (MQTT 3.1.1 and 5.0).

use raftmq_codec::{
    Connect, ConnectProperties, Disconnect, Packet, ProtocolVersion, PubResponse, Publish, QoS,
    ReasonCode, Subscribe, SubscribeFilter, SubscriptionOptions, Unsubscribe, Will, WillProperties,
};
use raftmq_core::config::{ByteSize, MqttConfig};
use raftmq_tests::{RawClient, TestBroker, connect_packet, pid, publish_packet};
use std::net::SocketAddr;

const V3: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;

/// Asserts the broker still routes messages between two fresh clients.
async fn assert_broker_serves(addr: SocketAddr) {
    let mut sub = RawClient::connected(addr, V3, "health-sub").await;
    sub.subscribe("health", QoS::AtLeastOnce).await;
    let mut publisher = RawClient::connected(addr, V3, "health-pub").await;
    publisher
        .send(&Packet::Publish(publish_packet(
            "health",
            QoS::AtLeastOnce,
            1,
            b"ok",
        )))
        .await;
    assert_eq!(
        publisher.recv().await,
        Some(Packet::PubAck(PubResponse::success(pid(1))))
    );
    assert_eq!(&sub.recv_publish().await.payload[..], b"ok");
}

/// Raw PUBLISH QoS 0 bytes with an arbitrary (possibly invalid) topic.
fn raw_publish(version: ProtocolVersion, topic: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    if version.is_v5() {
        body.push(0); // no properties
    }
    body.extend_from_slice(b"payload");
    let mut packet = vec![0x30, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// Connects a client of each version, sends `bytes` and expects the broker to close the
/// connection with `code` (MQTT 5 DISCONNECT, MQTT 3 plain close); then checks the broker
/// still serves other clients.
async fn rejects(bytes: &[u8], code: ReasonCode) {
    rejects_with(MqttConfig::default(), bytes, code).await;
}

async fn rejects_with(config: MqttConfig, bytes: &[u8], code: ReasonCode) {
    let broker = TestBroker::with_config(config).await;
    for version in [V3, V5] {
        let mut c = RawClient::connected(broker.mqtt, version, "victim").await;
        c.send_bytes(bytes).await;
        c.expect_disconnect(code).await;
    }
    assert_broker_serves(broker.mqtt).await;
}

/// Conformance (3.1.1): [MQTT-4.8.0-1]
/// Conformance (5.0): [MQTT-4.13.1-1]
#[tokio::test]
async fn malformed_remaining_length_closes_the_connection() {
    rejects(
        &[0xC0, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
        ReasonCode::MALFORMED_PACKET,
    )
    .await;
}

/// Conformance (3.1.1): [MQTT-2.2.2-2] [MQTT-3.8.1-1] [MQTT-4.8.0-1]
/// Conformance (5.0): [MQTT-2.1.3-1] [MQTT-3.8.1-1] [MQTT-4.13.1-1]
#[tokio::test]
async fn reserved_fixed_header_flags_close_the_connection() {
    // PINGREQ with flags 0001.
    rejects(&[0xC1, 0x00], ReasonCode::MALFORMED_PACKET).await;
    // SUBSCRIBE with flags 0000 instead of 0010.
    rejects(
        &[0x80, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x00],
        ReasonCode::MALFORMED_PACKET,
    )
    .await;
}

/// Conformance (3.1.1): [MQTT-1.5.3-2] [MQTT-4.7.3-2]
/// Conformance (5.0): [MQTT-1.5.4-2] [MQTT-4.7.3-2]
#[tokio::test]
async fn null_character_in_topic_closes_the_connection() {
    for version in [V3, V5] {
        let broker = TestBroker::start().await;
        let mut c = RawClient::connected(broker.mqtt, version, "nul").await;
        c.send_bytes(&raw_publish(version, b"a\0b")).await;
        c.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
        assert_broker_serves(broker.mqtt).await;
    }
}

/// Conformance (3.1.1): [MQTT-1.5.3-1] [MQTT-3.3.2-1]
/// Conformance (5.0): [MQTT-1.5.4-1] [MQTT-3.3.2-1]
#[tokio::test]
async fn invalid_utf8_in_topic_closes_the_connection() {
    for version in [V3, V5] {
        let broker = TestBroker::start().await;
        let mut c = RawClient::connected(broker.mqtt, version, "utf8").await;
        c.send_bytes(&raw_publish(version, &[b'a', 0xC3, 0x28]))
            .await;
        c.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
        assert_broker_serves(broker.mqtt).await;
    }
}

/// Conformance (3.1.1): [MQTT-3.3.2-2] [MQTT-4.7.1-1] [MQTT-4.8.0-1]
/// Conformance (5.0): [MQTT-3.3.2-2] [MQTT-4.7.0-1]
#[tokio::test]
async fn wildcard_in_publish_topic_closes_the_connection() {
    for version in [V3, V5] {
        let broker = TestBroker::start().await;
        let mut c = RawClient::connected(broker.mqtt, version, "wild").await;
        c.send_bytes(&raw_publish(version, b"a/+")).await;
        c.expect_disconnect(ReasonCode::TOPIC_NAME_INVALID).await;
        assert_broker_serves(broker.mqtt).await;
    }
}

/// Conformance (5.0): [MQTT-3.14.2-1] [MQTT-3.14.4-1] [MQTT-3.14.4-2] [MQTT-4.13.2-1]
#[tokio::test]
async fn packet_larger_than_maximum_packet_size_closes_with_0x95() {
    let config = MqttConfig {
        max_packet_size: ByteSize(1024),
        ..Default::default()
    };
    let broker = TestBroker::with_config(config).await;
    // The limit is announced to MQTT 5 clients.
    let (_c, ack) = RawClient::handshake(broker.mqtt, connect_packet(V5, "announce", true)).await;
    assert_eq!(ack.properties.maximum_packet_size, Some(1024));
    for version in [V3, V5] {
        let mut c = RawClient::connected(broker.mqtt, version, "big").await;
        let big = publish_packet("t", QoS::AtMostOnce, 0, &[b'x'; 2000]);
        c.send(&Packet::Publish(big)).await;
        c.expect_disconnect(ReasonCode::PACKET_TOO_LARGE).await;
    }
    assert_broker_serves(broker.mqtt).await;
}

/// Conformance (3.1.1): [MQTT-3.1.0-1]
/// Conformance (5.0): [MQTT-3.1.0-1]
#[tokio::test]
async fn first_packet_other_than_connect_closes_the_connection() {
    let broker = TestBroker::start().await;
    let mut c = RawClient::connect(broker.mqtt, V3).await;
    c.send(&Packet::PingReq).await;
    assert_eq!(c.expect_closed().await, []);
    assert_broker_serves(broker.mqtt).await;
}

/// Conformance (3.1.1): [MQTT-3.1.2-2]
/// Conformance (5.0): [MQTT-3.1.2-1] [MQTT-3.1.2-2] [MQTT-3.2.2-7] [MQTT-3.2.2-8]
#[tokio::test]
async fn unsupported_protocol_level_gets_connack_in_the_clients_format() {
    let broker = TestBroker::start().await;
    // "MQTT" level 6: an MQTT 5 style CONNACK with 0x84.
    let connect_level = |level: u8| {
        let mut v = vec![
            0x10, 0x0D, 0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0x02, 0x00, 0x00,
        ];
        if level >= 5 {
            v.push(0x00); // property length
        }
        v.extend_from_slice(&[0x00, 0x00]); // empty client id
        v[1] = (v.len() - 2) as u8;
        v
    };
    let mut c = RawClient::connect(broker.mqtt, V5).await;
    c.send_bytes(&connect_level(6)).await;
    let seen = c.expect_closed().await;
    assert!(
        matches!(&seen[..], [Packet::ConnAck(a)] if a.reason_code == ReasonCode::UNSUPPORTED_PROTOCOL_VERSION),
        "{seen:?}"
    );
    // "MQTT" level 2: a 3.1.1 CONNACK with return code 1.
    let mut c = RawClient::connect(broker.mqtt, V3).await;
    c.send_bytes(&connect_level(2)).await;
    let seen = c.expect_closed().await;
    assert!(
        matches!(&seen[..], [Packet::ConnAck(a)] if a.reason_code.to_v3_connack() == 1),
        "{seen:?}"
    );
}

/// Conformance (3.1.1): [MQTT-3.1.3-8] [MQTT-3.2.2-5]
/// Conformance (5.0): [MQTT-3.1.3-7] [MQTT-3.2.2-16]
#[tokio::test]
async fn empty_client_id_with_clean_session_0_is_refused_on_v311() {
    let broker = TestBroker::start().await;
    let (mut c, ack) = RawClient::handshake(broker.mqtt, connect_packet(V3, "", false)).await;
    assert_eq!(ack.reason_code.to_v3_connack(), 2);
    assert_eq!(c.expect_closed().await, []);
    let (_c, ack) = RawClient::handshake(broker.mqtt, connect_packet(V5, "", true)).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    assert!(
        ack.properties
            .assigned_client_identifier
            .is_some_and(|id| !id.is_empty())
    );
}

/// Conformance (3.1.1): [MQTT-3.1.0-2]
/// Conformance (5.0): [MQTT-3.1.0-2] [MQTT-3.2.0-2] [MQTT-3.14.4-1] [MQTT-3.14.4-2]
#[tokio::test]
async fn second_connect_closes_the_connection() {
    let broker = TestBroker::start().await;
    for version in [V3, V5] {
        let mut c = RawClient::connected(broker.mqtt, version, "twice").await;
        c.send(&Packet::Connect(Box::new(connect_packet(
            version, "twice", true,
        ))))
        .await;
        c.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
    }
}

/// Conformance (3.1.1): [MQTT-3.3.1-5] [MQTT-3.3.1-6] [MQTT-3.3.1-8] [MQTT-3.3.1-9] [MQTT-3.3.1-10]
/// Conformance (3.1.1): [MQTT-3.3.1-11]
#[tokio::test]
async fn retained_message_is_set_replaced_and_deleted_for_later_subscribers() {
    let broker = TestBroker::start().await;
    let mut p = RawClient::connected(broker.mqtt, V3, "pub").await;
    let retain = |payload: &[u8], id| {
        Packet::Publish(Publish {
            retain: true,
            ..publish_packet("status/dev", QoS::AtLeastOnce, id, payload)
        })
    };
    for (i, payload) in [&b"v1"[..], b"v2"].into_iter().enumerate() {
        let id = i as u16 + 1;
        p.send(&retain(payload, id)).await;
        assert_eq!(
            p.recv().await,
            Some(Packet::PubAck(PubResponse::success(pid(id))))
        );
    }
    let mut s1 = RawClient::connected(broker.mqtt, V3, "s1").await;
    s1.subscribe("status/+", QoS::AtLeastOnce).await;
    let got = s1.recv_publish().await;
    assert_eq!((&got.payload[..], got.retain), (&b"v2"[..], true));

    p.send(&retain(b"", 3)).await;
    assert_eq!(
        p.recv().await,
        Some(Packet::PubAck(PubResponse::success(pid(3))))
    );
    // The live subscriber sees the deletion as an ordinary message...
    let deletion = s1.recv_publish().await;
    assert!(deletion.payload.is_empty() && !deletion.retain);
    // ...and a later subscriber gets nothing retained: the next thing it sees is a live message.
    let mut s2 = RawClient::connected(broker.mqtt, V3, "s2").await;
    s2.subscribe("status/+", QoS::AtLeastOnce).await;
    p.send(&Packet::Publish(publish_packet(
        "status/dev",
        QoS::AtMostOnce,
        0,
        b"live",
    )))
    .await;
    let got = s2.recv_publish().await;
    assert_eq!((&got.payload[..], got.retain), (&b"live"[..], false));
}

/// Subscribes with a persistent session, disconnects, has QoS 0/1/2 messages published, and
/// reconnects: the QoS 1 and 2 messages are delivered, the QoS 0 one is not.
async fn persistent_session_round_trip(connect: Connect) {
    let broker = TestBroker::start().await;
    let version = connect.protocol;
    let (mut c, ack) = RawClient::handshake(broker.mqtt, connect.clone()).await;
    assert!(!ack.session_present);
    c.subscribe("inbox/#", QoS::ExactlyOnce).await;
    c.send(&Packet::Disconnect(Disconnect::default())).await;
    assert_eq!(c.expect_closed().await, []);

    let mut p = RawClient::connected(broker.mqtt, V5, "pub").await;
    p.send(&Packet::Publish(publish_packet(
        "inbox/0",
        QoS::AtMostOnce,
        0,
        b"q0",
    )))
    .await;
    p.send(&Packet::Publish(publish_packet(
        "inbox/1",
        QoS::AtLeastOnce,
        1,
        b"q1",
    )))
    .await;
    assert!(matches!(p.recv().await, Some(Packet::PubAck(_))));
    p.send(&Packet::Publish(publish_packet(
        "inbox/2",
        QoS::ExactlyOnce,
        2,
        b"q2",
    )))
    .await;
    assert!(matches!(p.recv().await, Some(Packet::PubRec(_))));

    let (mut c, ack) = RawClient::handshake(broker.mqtt, connect).await;
    assert!(ack.session_present, "{version:?} session not resumed");
    let m1 = c.recv_publish().await;
    assert_eq!((&m1.payload[..], m1.qos), (&b"q1"[..], QoS::AtLeastOnce));
    let m2 = c.recv_publish().await;
    assert_eq!((&m2.payload[..], m2.qos), (&b"q2"[..], QoS::ExactlyOnce));
    // The subscription itself survived too.
    p.send(&Packet::Publish(publish_packet(
        "inbox/3",
        QoS::AtMostOnce,
        0,
        b"live",
    )))
    .await;
    assert_eq!(&c.recv_publish().await.payload[..], b"live");
}

/// Conformance (3.1.1): [MQTT-3.1.2-4] [MQTT-3.1.2-5] [MQTT-3.1.3-2] [MQTT-3.1.4-3] [MQTT-3.2.0-1]
/// Conformance (3.1.1): [MQTT-3.2.2-2] [MQTT-3.2.2-3] [MQTT-4.1.0-1] [MQTT-4.5.0-1]
#[tokio::test]
async fn v311_persistent_session_keeps_subscriptions_and_queues_messages_while_offline() {
    persistent_session_round_trip(connect_packet(V3, "persist-3", false)).await;
}

/// Conformance (5.0): [MQTT-3.1.2-5] [MQTT-3.1.2-6] [MQTT-3.1.2-23] [MQTT-3.1.3-2] [MQTT-3.1.4-4]
/// Conformance (5.0): [MQTT-3.2.0-1] [MQTT-3.2.2-3] [MQTT-4.5.0-1]
#[tokio::test]
async fn v5_session_expiry_keeps_subscriptions_and_queues_messages_while_offline() {
    let connect = Connect {
        properties: ConnectProperties {
            session_expiry_interval: Some(300),
            ..Default::default()
        },
        ..connect_packet(V5, "persist-5", false)
    };
    persistent_session_round_trip(connect).await;
}

/// Conformance (3.1.1): [MQTT-2.3.1-6] [MQTT-3.3.4-1] [MQTT-4.3.3-1] [MQTT-4.3.3-2]
/// Conformance (5.0): [MQTT-2.2.1-5] [MQTT-3.3.4-1] [MQTT-3.5.2-1] [MQTT-3.6.2-1] [MQTT-3.7.2-1]
/// Conformance (5.0): [MQTT-4.3.3-4] [MQTT-4.3.3-8] [MQTT-4.3.3-10] [MQTT-4.3.3-11]
#[tokio::test]
async fn qos2_is_delivered_exactly_once_in_both_directions() {
    for version in [V3, V5] {
        let broker = TestBroker::start().await;
        let mut sub = RawClient::connected(broker.mqtt, version, "sub").await;
        sub.subscribe("x", QoS::ExactlyOnce).await;
        let mut p = RawClient::connected(broker.mqtt, version, "pub").await;

        // Client → broker, with a duplicate before PUBREL.
        let m = publish_packet("x", QoS::ExactlyOnce, 10, b"once");
        p.send(&Packet::Publish(m.clone())).await;
        assert_eq!(
            p.recv().await,
            Some(Packet::PubRec(PubResponse::success(pid(10))))
        );
        p.send(&Packet::Publish(Publish { dup: true, ..m })).await;
        assert_eq!(
            p.recv().await,
            Some(Packet::PubRec(PubResponse::success(pid(10))))
        );
        p.send(&Packet::PubRel(PubResponse::success(pid(10)))).await;
        assert_eq!(
            p.recv().await,
            Some(Packet::PubComp(PubResponse::success(pid(10))))
        );

        // Broker → client.
        let got = sub.recv_publish().await;
        assert_eq!(
            (&got.payload[..], got.qos),
            (&b"once"[..], QoS::ExactlyOnce)
        );
        let id = got.packet_id.expect("QoS 2 has a packet id");
        sub.send(&Packet::PubRec(PubResponse::success(id))).await;
        assert_eq!(
            sub.recv().await,
            Some(Packet::PubRel(PubResponse::success(id)))
        );
        sub.send(&Packet::PubComp(PubResponse::success(id))).await;

        // A sentinel proves the duplicate was not routed: it is the next thing delivered.
        p.send(&Packet::Publish(publish_packet(
            "x",
            QoS::AtMostOnce,
            0,
            b"sentinel",
        )))
        .await;
        assert_eq!(
            &sub.recv_publish().await.payload[..],
            b"sentinel",
            "{version:?}"
        );
    }
}

/// Raw MQTT 3.1 CONNECT ("MQIsdp", level 3) for `client_id`, keep alive off.
fn mqtt_3_1_connect(client_id: &[u8], clean_session: bool) -> Vec<u8> {
    let mut body = b"\x00\x06MQIsdp\x03".to_vec();
    body.push(if clean_session { 0x02 } else { 0x00 });
    body.extend_from_slice(&[0x00, 0x00]);
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id);
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// Connects an MQTT 3.1 client with raw bytes and asserts the broker accepted it.
async fn mqtt_3_1_connected(addr: SocketAddr, client_id: &[u8], clean_session: bool) -> RawClient {
    let mut c = RawClient::connect(addr, ProtocolVersion::V3_1).await;
    c.send_bytes(&mqtt_3_1_connect(client_id, clean_session))
        .await;
    match c.recv().await {
        Some(Packet::ConnAck(ack)) => assert_eq!(ack.reason_code, ReasonCode::SUCCESS),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    c
}

/// MQTT 3.1 sends PUBREL, SUBSCRIBE and UNSUBSCRIBE at QoS 1 and sets DUP on a resend: a PUBREL
/// resent after reconnecting completes its QoS 2 exchange, and SUBSCRIBE and UNSUBSCRIBE with DUP
/// are answered, over a connection that stays open.
#[tokio::test]
async fn mqtt_3_1_resends_with_dup_are_answered_not_disconnected() {
    let broker = TestBroker::start().await;
    let mut sub = RawClient::connected(broker.mqtt, V3, "dup31-sub").await;
    sub.subscribe("dup31", QoS::ExactlyOnce).await;

    // PUBLISH QoS 2 "dup31" id 1, answered by PUBREC; the connection drops before PUBREL.
    let mut c = mqtt_3_1_connected(broker.mqtt, b"dup31", false).await;
    c.send_bytes(b"\x34\x0B\x00\x05dup31\x00\x01hi").await;
    assert_eq!(
        c.recv().await,
        Some(Packet::PubRec(PubResponse::success(pid(1))))
    );
    drop(c);

    // Reconnected to the same session, the client resends PUBREL with DUP.
    let mut c = mqtt_3_1_connected(broker.mqtt, b"dup31", false).await;
    c.send_bytes(&[0x6A, 0x02, 0x00, 0x01]).await;
    assert_eq!(
        c.recv().await,
        Some(Packet::PubComp(PubResponse::success(pid(1))))
    );
    let got = sub.recv_publish().await;
    assert_eq!((&got.topic[..], &got.payload[..]), ("dup31", &b"hi"[..]));

    // SUBSCRIBE "a" at QoS 1 with DUP, id 2: SUBACK granting QoS 1.
    c.send_bytes(&[0x8A, 0x06, 0x00, 0x02, 0x00, 0x01, b'a', 0x01])
        .await;
    match c.recv().await {
        Some(Packet::SubAck(ack)) => {
            assert_eq!(
                (ack.packet_id, &ack.reason_codes[..]),
                (pid(2), &[ReasonCode::GRANTED_QOS_1][..])
            )
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // UNSUBSCRIBE "a" with DUP, id 3: UNSUBACK.
    c.send_bytes(&[0xAA, 0x05, 0x00, 0x03, 0x00, 0x01, b'a'])
        .await;
    match c.recv().await {
        Some(Packet::UnsubAck(ack)) => assert_eq!(ack.packet_id, pid(3)),
        other => panic!("expected UNSUBACK, got {other:?}"),
    }
    c.send_bytes(&[0xC0, 0x00]).await;
    assert_eq!(c.recv().await, Some(Packet::PingResp));

    // The same bytes from a 3.1.1 client stay malformed.
    let mut strict = RawClient::connected(broker.mqtt, V3, "dup311").await;
    strict.send_bytes(&[0x6A, 0x02, 0x00, 0x01]).await;
    strict.expect_disconnect(ReasonCode::MALFORMED_PACKET).await;
}

/// Conformance (3.1.1): [MQTT-3.1.4-2]
/// Conformance (5.0): [MQTT-3.1.4-3]
#[tokio::test]
async fn takeover_disconnects_the_old_connection_and_the_new_one_receives() {
    let broker = TestBroker::start().await;
    let persistent = Connect {
        properties: ConnectProperties {
            session_expiry_interval: Some(300),
            ..Default::default()
        },
        ..connect_packet(V5, "device", false)
    };
    let (mut old, _) = RawClient::handshake(broker.mqtt, persistent.clone()).await;
    old.subscribe("cmd", QoS::AtLeastOnce).await;
    let (mut new, ack) = RawClient::handshake(broker.mqtt, persistent).await;
    assert!(ack.session_present);
    old.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER).await;

    let mut p = RawClient::connected(broker.mqtt, V5, "ctl").await;
    p.send(&Packet::Publish(publish_packet(
        "cmd",
        QoS::AtLeastOnce,
        1,
        b"reboot",
    )))
    .await;
    assert_eq!(&new.recv_publish().await.payload[..], b"reboot");

    // MQTT 3.1.1: the old connection is simply closed.
    let mut old3 = RawClient::connected(broker.mqtt, V3, "device3").await;
    let _new3 = RawClient::connected(broker.mqtt, V3, "device3").await;
    assert_eq!(old3.expect_closed().await, []);
}

/// Conformance (5.0): [MQTT-3.1.2-22]
#[tokio::test]
async fn keep_alive_timeout_disconnects_with_0x8d() {
    let broker = TestBroker::start().await;
    let (mut c, ack) = RawClient::handshake(
        broker.mqtt,
        Connect {
            keep_alive: 1,
            ..connect_packet(V5, "sleepy", true)
        },
    )
    .await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    // Silence for 1.5 s: the broker gives up (recv waits up to the harness TIMEOUT).
    c.expect_disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT).await;
}

/// Conformance (5.0): [MQTT-3.1.2-8]
#[tokio::test]
async fn delayed_will_is_published_by_the_broker_timer() {
    let broker = TestBroker::start().await;
    let mut watcher = RawClient::connected(broker.mqtt, V5, "watcher").await;
    watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
    let connect = Connect {
        will: Some(Will {
            topic: "wills/dev".into(),
            payload: "offline".into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: WillProperties {
                will_delay_interval: Some(1),
                ..Default::default()
            },
        }),
        properties: ConnectProperties {
            session_expiry_interval: Some(60),
            ..Default::default()
        },
        ..connect_packet(V5, "dev", true)
    };
    let (c, _) = RawClient::handshake(broker.mqtt, connect).await;
    drop(c); // network failure, no DISCONNECT
    let will = watcher.recv_publish().await;
    assert_eq!(
        (will.topic.as_str(), &will.payload[..]),
        ("wills/dev", &b"offline"[..])
    );
}

// ---------------------------------------------------------------------------------------------
// Backpressure from slow subscribers (`mqtt.backpressure_max_pause`)
// ---------------------------------------------------------------------------------------------

/// How many 1 KiB messages one burst sends: twice what the kernel may buffer between the broker
/// and a subscriber (the broker's send buffer grows up to `tcp_wmem`'s maximum, 4 MiB by
/// default on Linux; the subscriber's receive buffer is pinned at 64 KiB), at least 8,000.
fn burst() -> usize {
    let wmem_max = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse::<usize>().ok())
        .unwrap_or(4 << 20);
    (2 * wmem_max / 1024).max(8_000)
}

/// Sends `count` QoS 0 messages to `topic` as fast as the socket takes them, each payload
/// starting with its index.
async fn flood(addr: SocketAddr, topic: &'static str, count: usize) -> RawClient {
    let mut publisher = RawClient::connected(addr, V3, "flood-pub").await;
    let mut bytes = bytes::BytesMut::new();
    for i in 0..count {
        let mut payload = format!("{i:08}").into_bytes();
        payload.resize(1024, b'.');
        let packet = Packet::Publish(publish_packet(topic, QoS::AtMostOnce, 0, &payload));
        raftmq_codec::encode(&packet, V3, &mut bytes).expect("encode");
    }
    publisher.send_bytes(&bytes).await;
    publisher
}

/// A subscriber with a small receive buffer that reads about 8 MB/s (16 KiB every 2 ms).
async fn slow_subscriber(addr: SocketAddr, topic: &str) -> RawClient {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(64 * 1024).expect("SO_RCVBUF");
    let stream = tokio::time::timeout(raftmq_tests::TIMEOUT, socket.connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    let mut sub = RawClient::over(stream, V3);
    sub.send(&Packet::Connect(Box::new(connect_packet(
        V3, "slow-sub", true,
    ))))
    .await;
    assert!(matches!(sub.recv().await, Some(Packet::ConnAck(a)) if a.reason_code.is_success()));
    sub.subscribe(topic, QoS::AtMostOnce).await;
    sub
}

/// Reads QoS 0 messages slowly until `count` have arrived or `idle` passes without one;
/// returns their indexes in order.
async fn read_slowly(sub: &mut RawClient, count: usize, idle: std::time::Duration) -> Vec<usize> {
    let mut got = Vec::new();
    while got.len() < count {
        match sub.recv_within(idle).await {
            Ok(Some(Packet::Publish(p))) => {
                let index = std::str::from_utf8(&p.payload[..8]).expect("index");
                got.push(index.parse().expect("index"));
                if got.len() % 16 == 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                }
            }
            Ok(other) => panic!("expected PUBLISH, got {other:?}"),
            Err(()) => break,
        }
    }
    got
}

fn backpressure_config(max_pause_ms: u64) -> MqttConfig {
    MqttConfig {
        max_queued_messages: 100,
        backpressure_max_pause: raftmq_core::config::DurationStr(std::time::Duration::from_millis(
            max_pause_ms,
        )),
        ..MqttConfig::default()
    }
}

/// A broker pausing publishers for at most `max_pause_ms` (0: never), a slow subscriber to
/// `topic` and a burst of `burst()` messages on its way to it.
async fn burst_towards_slow_subscriber(
    max_pause_ms: u64,
    topic: &'static str,
) -> (
    TestBroker,
    usize,
    RawClient,
    tokio::task::JoinHandle<RawClient>,
) {
    let broker = TestBroker::with_config(backpressure_config(max_pause_ms)).await;
    let count = burst();
    let sub = slow_subscriber(broker.mqtt, topic).await;
    let publisher = tokio::spawn(flood(broker.mqtt, topic, count));
    (broker, count, sub, publisher)
}

fn received_qos0(broker: &TestBroker) -> u64 {
    broker.broker.stats().messages_received[0].load(std::sync::atomic::Ordering::Relaxed)
}

/// Conformance (3.1.1): [MQTT-4.6.0-5] [MQTT-4.6.0-6] [MQTT-7.1.1-1]
#[tokio::test]
async fn a_slow_subscriber_slows_its_publisher_down_instead_of_losing_qos0_messages() {
    // The longest pause allowed: a machine busy with other tests must not make the steady
    // reader look stalled.
    let (broker, count, mut sub, publisher) = burst_towards_slow_subscriber(1000, "bp/slow").await;
    let got = read_slowly(&mut sub, count, raftmq_tests::TIMEOUT).await;
    let stats = broker.broker.stats();
    let dropped = stats.dropped_count(raftmq_core::stats::DropReason::QueueFull);
    assert_eq!(dropped, 0, "dropped at the subscriber's queue");
    assert_eq!(
        got,
        (0..count).collect::<Vec<_>>(),
        "every message, in order"
    );
    let paused = stats
        .publishers_paused
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(paused > 0, "the publisher was never paused");
    drop(publisher.await);
    broker.stop().await;
}

#[tokio::test]
async fn without_backpressure_the_same_burst_overflows_the_queue_and_every_drop_is_counted() {
    let (broker, count, mut sub, publisher) = burst_towards_slow_subscriber(0, "bp/off").await;
    // The broker takes the whole burst before the subscriber reads anything: what the
    // kernel's buffers and the queue cannot hold is dropped.
    raftmq_tests::wait_until("the broker read the whole burst", || {
        received_qos0(&broker) == count as u64
    })
    .await;
    let got = read_slowly(&mut sub, count, std::time::Duration::from_secs(1)).await;
    let stats = broker.broker.stats();
    let dropped = stats.dropped_count(raftmq_core::stats::DropReason::QueueFull);
    assert!(
        got.len() < count,
        "nothing was lost: the test proves nothing"
    );
    assert_eq!(
        dropped as usize,
        count - got.len(),
        "a loss was not counted"
    );
    assert_eq!(
        stats
            .publishers_paused
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    drop(publisher.await);
    broker.stop().await;
}

#[tokio::test]
async fn a_subscriber_that_stops_reading_holds_its_publisher_for_one_pause_only() {
    let started = std::time::Instant::now();
    // Subscribed, never read from.
    let (broker, count, sub, publisher) = burst_towards_slow_subscriber(250, "bp/stuck").await;
    raftmq_tests::wait_until("the broker read the whole burst", || {
        received_qos0(&broker) == count as u64
    })
    .await;
    let elapsed = started.elapsed();
    let stats = broker.broker.stats();
    let timeouts = stats
        .backpressure_timeouts
        .load(std::sync::atomic::Ordering::Relaxed);
    // One pause ran out, then the subscriber counted as stalled (a second one only if the
    // subscriber's task was starved for a whole pause while its socket still took bytes).
    assert!((1..=2).contains(&timeouts), "{timeouts} pauses ran out");
    assert!(
        elapsed < std::time::Duration::from_secs(5),
        "held for {elapsed:?}"
    );
    // The rest went to the full queue: dropped and counted.
    assert!(stats.dropped_count(raftmq_core::stats::DropReason::QueueFull) > 0);
    drop(publisher.await);
    // Gone, so the broker need not wait for it to read what it was sent.
    drop(sub);
    broker.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Conformance statements (docs/conformance.md), for MQTT 3.1.1 and 5.0 clients alike
// ---------------------------------------------------------------------------------------------

/// A CONNECT resuming (or creating) a session that outlives the connection: Clean Session 0 on
/// MQTT 3.1.1, Clean Start 0 and a Session Expiry Interval on MQTT 5.
fn persistent_connect(version: ProtocolVersion, client_id: &str) -> Connect {
    let mut connect = connect_packet(version, client_id, false);
    if version.is_v5() {
        connect.properties.session_expiry_interval = Some(300);
    }
    connect
}

/// A SUBSCRIBE with packet id `id` for `filters` (filter, requested QoS).
fn subscribe_packet(id: u16, filters: &[(&str, QoS)]) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: pid(id),
        properties: Default::default(),
        filters: filters
            .iter()
            .map(|&(filter, qos)| SubscribeFilter {
                filter: filter.into(),
                options: SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            })
            .collect(),
    })
}

/// The SUBACK code a client of `version` sees for a refused filter whose MQTT 5 code is `v5`.
fn refused(version: ProtocolVersion, v5: ReasonCode) -> ReasonCode {
    if version.is_v5() {
        v5
    } else {
        ReasonCode::UNSPECIFIED_ERROR // 0x80, the only MQTT 3 failure code
    }
}

/// Sends a QoS 1 PUBLISH and waits for its PUBACK (whatever its reason code).
async fn publish_acked(c: &mut RawClient, publish: Publish) {
    let id = publish.packet_id.expect("QoS 1");
    c.send(&Packet::Publish(publish)).await;
    match c.recv().await {
        Some(Packet::PubAck(ack)) => assert_eq!(ack.packet_id, id),
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// Sends a QoS 2 PUBLISH and completes its exchange (PUBREC, PUBREL, PUBCOMP).
async fn publish_exactly_once(c: &mut RawClient, publish: Publish) {
    let id = publish.packet_id.expect("QoS 2");
    c.send(&Packet::Publish(publish)).await;
    assert_eq!(
        c.recv().await,
        Some(Packet::PubRec(PubResponse::success(id)))
    );
    c.send(&Packet::PubRel(PubResponse::success(id))).await;
    assert_eq!(
        c.recv().await,
        Some(Packet::PubComp(PubResponse::success(id)))
    );
}

/// Waits until the broker has handled everything `c` sent so far (PINGREQ is answered in order).
async fn barrier(c: &mut RawClient) {
    c.send(&Packet::PingReq).await;
    assert_eq!(c.recv().await, Some(Packet::PingResp));
}

/// Publishes "sentinel" to `topic` at QoS 1 and asserts it is the next thing `sub` receives:
/// nothing published before it reached `sub`.
async fn assert_next_is_sentinel(p: &mut RawClient, sub: &mut RawClient, topic: &str, id: u16) {
    publish_acked(p, publish_packet(topic, QoS::AtLeastOnce, id, b"sentinel")).await;
    let got = sub.recv_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        (topic, &b"sentinel"[..]),
        "something was delivered before the sentinel"
    );
}

/// Conformance (3.1.1): [MQTT-2.3.1-7] [MQTT-3.8.4-1] [MQTT-3.8.4-2] [MQTT-3.8.4-4] [MQTT-3.8.4-5]
/// Conformance (3.1.1): [MQTT-3.9.3-1] [MQTT-3.9.3-2] [MQTT-3.10.4-1] [MQTT-3.10.4-2]
/// Conformance (3.1.1): [MQTT-3.10.4-4] [MQTT-3.10.4-5] [MQTT-3.10.4-6] [MQTT-3.12.4-1]
/// Conformance (3.1.1): [MQTT-4.7.1-3] [MQTT-4.7.3-4]
/// Conformance (5.0): [MQTT-2.2.1-6] [MQTT-3.8.4-1] [MQTT-3.8.4-2] [MQTT-3.8.4-5] [MQTT-3.8.4-6]
/// Conformance (5.0): [MQTT-3.8.4-7] [MQTT-3.9.3-1] [MQTT-3.9.3-2] [MQTT-3.10.4-1] [MQTT-3.10.4-2]
/// Conformance (5.0): [MQTT-3.10.4-4] [MQTT-3.10.4-5] [MQTT-3.10.4-6] [MQTT-3.11.3-1]
/// Conformance (5.0): [MQTT-3.11.3-2] [MQTT-3.12.4-1] [MQTT-4.7.3-4]
#[tokio::test]
async fn subscribe_and_unsubscribe_are_answered_per_filter_in_order() {
    let broker = TestBroker::start().await;
    for version in [V3, V5] {
        let mut s = RawClient::connected(broker.mqtt, version, "per-filter").await;
        let filters = [
            ("a/+", QoS::AtLeastOnce),
            ("x", QoS::ExactlyOnce),
            ("y/#", QoS::AtMostOnce),
        ];
        s.send(&subscribe_packet(7, &filters)).await;
        match s.recv().await {
            Some(Packet::SubAck(ack)) => assert_eq!(
                (ack.packet_id, &ack.reason_codes[..]),
                (
                    pid(7),
                    &[
                        ReasonCode::GRANTED_QOS_1,
                        ReasonCode::GRANTED_QOS_2,
                        ReasonCode::GRANTED_QOS_0,
                    ][..]
                ),
                "{version:?}"
            ),
            other => panic!("expected SUBACK, got {other:?}"),
        }
        s.send(&Packet::PingReq).await;
        assert_eq!(s.recv().await, Some(Packet::PingResp));

        // "a/#" is not "a/+": filters are compared as text, so only "x" is removed.
        s.send(&Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(8),
            properties: Vec::new(),
            filters: vec!["a/#".into(), "x".into(), "never".into()],
        }))
        .await;
        match s.recv().await {
            Some(Packet::UnsubAck(ack)) => {
                assert_eq!(ack.packet_id, pid(8));
                if version.is_v5() {
                    assert_eq!(
                        ack.reason_codes,
                        [
                            ReasonCode::NO_SUBSCRIPTION_EXISTED,
                            ReasonCode::SUCCESS,
                            ReasonCode::NO_SUBSCRIPTION_EXISTED
                        ]
                    );
                }
            }
            other => panic!("expected UNSUBACK, got {other:?}"),
        }

        // "x" no longer delivers, nor does "A/b" (matching never folds case); "a/+" still does.
        let mut p = RawClient::connected(broker.mqtt, version, "per-filter-pub").await;
        for topic in ["x", "A/b"] {
            p.send(&Packet::Publish(publish_packet(
                topic,
                QoS::AtMostOnce,
                0,
                b"no",
            )))
            .await;
        }
        assert_next_is_sentinel(&mut p, &mut s, "a/b", 1).await;
    }
}

/// A SUBSCRIBE or UNSUBSCRIBE carrying a malformed topic filter (empty, a wildcard that is not
/// a whole level, `#` not last, a shared subscription without share name or filter) is a
/// malformed packet: v5 gets DISCONNECT 0x81, 3.1.1 a plain close, and no SUBACK or UNSUBACK.
/// Conformance (3.1.1): [MQTT-4.7.1-2] [MQTT-4.7.3-1] [MQTT-4.8.0-1]
/// Conformance (5.0): [MQTT-4.7.1-1] [MQTT-4.7.1-2] [MQTT-4.7.3-1] [MQTT-4.13.1-1]
#[tokio::test]
async fn malformed_topic_filters_close_the_connection() {
    let broker = TestBroker::start().await;
    for version in [V3, V5] {
        for bad in ["", "a/#/b", "a+", "a#"] {
            let mut s = RawClient::connected(broker.mqtt, version, "bad-filter").await;
            s.send(&subscribe_packet(
                7,
                &[("ok/+", QoS::AtLeastOnce), (bad, QoS::AtMostOnce)],
            ))
            .await;
            let seen = s.expect_closed().await;
            let expected: Vec<Packet> = if version.is_v5() {
                vec![Packet::Disconnect(Disconnect::with_code(
                    ReasonCode::MALFORMED_PACKET,
                ))]
            } else {
                Vec::new()
            };
            assert_eq!(seen, expected, "{version:?} SUBSCRIBE {bad:?}");

            let mut u = RawClient::connected(broker.mqtt, version, "bad-unsub").await;
            u.send(&Packet::Unsubscribe(Unsubscribe {
                packet_id: pid(8),
                properties: Vec::new(),
                filters: vec![bad.into(), "q".into()],
            }))
            .await;
            assert_eq!(
                u.expect_closed().await,
                expected,
                "{version:?} UNSUBSCRIBE {bad:?}"
            );
        }
    }
    assert_broker_serves(broker.mqtt).await;
}

/// Conformance (3.1.1): [MQTT-4.7.2-1]
/// Conformance (5.0): [MQTT-4.7.2-1]
#[tokio::test]
async fn leading_wildcards_do_not_match_dollar_topics() {
    let broker = TestBroker::start().await;
    for version in [V3, V5] {
        let mut s = RawClient::connected(broker.mqtt, version, "dollar-sub").await;
        s.subscribe("#", QoS::AtLeastOnce).await;
        s.subscribe("+/x", QoS::AtLeastOnce).await;
        let mut p = RawClient::connected(broker.mqtt, version, "dollar-pub").await;
        p.send(&Packet::Publish(publish_packet(
            "$foo/x",
            QoS::AtMostOnce,
            0,
            b"dollar",
        )))
        .await;
        assert_next_is_sentinel(&mut p, &mut s, "plain/x", 1).await;
    }
}

/// Conformance (3.1.1): [MQTT-3.3.5-1] [MQTT-3.8.4-3] [MQTT-3.8.4-6]
/// Conformance (5.0): [MQTT-3.3.4-2] [MQTT-3.8.4-3] [MQTT-3.8.4-8]
#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_the_highest_granted_qos() {
    let broker = TestBroker::start().await;
    for version in [V3, V5] {
        let mut s = RawClient::connected(broker.mqtt, version, "overlap").await;
        s.subscribe("a/+", QoS::AtMostOnce).await;
        s.subscribe("a/#", QoS::ExactlyOnce).await;
        let mut low = RawClient::connected(broker.mqtt, version, "low").await;
        low.subscribe("a/b", QoS::AtMostOnce).await;
        let mut p = RawClient::connected(broker.mqtt, version, "overlap-pub").await;
        publish_exactly_once(&mut p, publish_packet("a/b", QoS::ExactlyOnce, 1, b"one")).await;
        let got = s.recv_publish().await;
        assert_eq!((&got.payload[..], got.qos), (&b"one"[..], QoS::ExactlyOnce));
        let id = got.packet_id.expect("QoS 2");
        s.send(&Packet::PubRec(PubResponse::success(id))).await;
        assert_eq!(
            s.recv().await,
            Some(Packet::PubRel(PubResponse::success(id)))
        );
        s.send(&Packet::PubComp(PubResponse::success(id))).await;
        // The QoS 0 subscriber gets the QoS 2 message at QoS 0.
        let got = low.recv_publish().await;
        assert_eq!((&got.payload[..], got.qos), (&b"one"[..], QoS::AtMostOnce));

        // A retained message, delivered live once...
        p.send(&Packet::Publish(Publish {
            retain: true,
            ..publish_packet("a/r", QoS::AtMostOnce, 0, b"kept")
        }))
        .await;
        let got = s.recv_publish().await;
        assert_eq!((&got.payload[..], got.retain), (&b"kept"[..], false));
        // ...and again when subscribing to "a/#" replaces that subscription, whose QoS 1 is now
        // the highest.
        // (The server may send matching messages before the SUBACK.)
        s.send(&subscribe_packet(4, &[("a/#", QoS::AtLeastOnce)]))
            .await;
        let (mut suback, mut retained) = (None, None);
        while suback.is_none() || retained.is_none() {
            match s.recv().await {
                Some(Packet::SubAck(ack)) if suback.is_none() => suback = Some(ack),
                Some(Packet::Publish(p)) if retained.is_none() => retained = Some(p),
                other => panic!("expected SUBACK and the retained message, got {other:?}"),
            }
        }
        let (suback, retained) = (suback.expect("SUBACK"), retained.expect("retained"));
        assert_eq!(suback.reason_codes, [ReasonCode::GRANTED_QOS_1]);
        assert_eq!(
            (&retained.payload[..], retained.retain),
            (&b"kept"[..], true)
        );
        publish_exactly_once(&mut p, publish_packet("a/b", QoS::ExactlyOnce, 2, b"two")).await;
        let got = s.recv_publish().await;
        assert_eq!((&got.payload[..], got.qos), (&b"two"[..], QoS::AtLeastOnce));
        s.send(&Packet::PubAck(PubResponse::success(
            got.packet_id.expect("QoS 1"),
        )))
        .await;
        // One copy only: the next delivery is the sentinel.
        assert_next_is_sentinel(&mut p, &mut s, "a/c", 3).await;
        // No retained message for the next round.
        publish_acked(
            &mut p,
            Publish {
                retain: true,
                ..publish_packet("a/r", QoS::AtLeastOnce, 4, b"")
            },
        )
        .await;
    }
}

/// Conformance (3.1.1): [MQTT-3.3.1-3] [MQTT-4.3.2-2]
/// Conformance (5.0): [MQTT-3.3.1-3] [MQTT-4.3.2-4] [MQTT-4.3.2-5]
#[tokio::test]
async fn incoming_dup_flag_is_not_forwarded_and_an_acknowledged_packet_id_is_a_new_message() {
    let broker = TestBroker::start().await;
    for version in [V3, V5] {
        let mut s = RawClient::connected(broker.mqtt, version, "dup-sub").await;
        s.subscribe("d", QoS::AtLeastOnce).await;
        let mut p = RawClient::connected(broker.mqtt, version, "dup-pub").await;
        for payload in [&b"first"[..], b"second"] {
            // Both carry DUP and packet id 5: after the PUBACK the id is free again.
            let publish = Publish {
                dup: true,
                ..publish_packet("d", QoS::AtLeastOnce, 5, payload)
            };
            publish_acked(&mut p, publish).await;
            let got = s.recv_publish().await;
            assert_eq!((&got.payload[..], got.dup), (payload, false), "{version:?}");
            s.send(&Packet::PubAck(PubResponse::success(
                got.packet_id.expect("QoS 1"),
            )))
            .await;
        }
    }
}

/// Conformance (3.1.1): [MQTT-3.1.2-6] [MQTT-3.1.2-7] [MQTT-3.1.4-3] [MQTT-3.2.2-1] [MQTT-4.1.0-2]
#[tokio::test]
async fn v311_clean_session_discards_the_stored_session_but_not_retained_messages() {
    let broker = TestBroker::start().await;
    let (mut c, _) = RawClient::handshake(broker.mqtt, connect_packet(V3, "clean", false)).await;
    c.subscribe("old", QoS::AtLeastOnce).await;
    // A retained message from this client outlives every session of it.
    publish_acked(
        &mut c,
        Publish {
            retain: true,
            ..publish_packet("kept", QoS::AtLeastOnce, 1, b"retained")
        },
    )
    .await;
    c.send(&Packet::Disconnect(Disconnect::default())).await;
    assert_eq!(c.expect_closed().await, []);

    let (mut c, ack) = RawClient::handshake(broker.mqtt, connect_packet(V3, "clean", true)).await;
    assert_eq!(
        (ack.reason_code, ack.session_present),
        (ReasonCode::SUCCESS, false)
    );
    // The new session lasts as long as the connection: it has no "old" subscription, and its
    // own subscription works while connected.
    c.subscribe("new", QoS::AtLeastOnce).await;
    let mut p = RawClient::connected(broker.mqtt, V3, "clean-pub").await;
    p.send(&Packet::Publish(publish_packet(
        "old",
        QoS::AtMostOnce,
        0,
        b"old",
    )))
    .await;
    assert_next_is_sentinel(&mut p, &mut c, "new", 1).await;
    c.send(&Packet::Disconnect(Disconnect::default())).await;
    assert_eq!(c.expect_closed().await, []);

    // Nothing of the clean session is reused.
    let (mut c, ack) = RawClient::handshake(broker.mqtt, connect_packet(V3, "clean", false)).await;
    assert!(!ack.session_present);
    c.subscribe("kept", QoS::AtLeastOnce).await;
    let got = c.recv_publish().await;
    assert_eq!((&got.payload[..], got.retain), (&b"retained"[..], true));
}

/// Conformance (3.1.1): [MQTT-3.1.2-8] [MQTT-3.1.2-10] [MQTT-3.1.2-12] [MQTT-3.1.2-16]
/// Conformance (3.1.1): [MQTT-3.1.2-17] [MQTT-3.14.4-3]
/// Conformance (5.0): [MQTT-3.1.2-7] [MQTT-3.1.2-8] [MQTT-3.1.2-10] [MQTT-3.1.2-14] [MQTT-3.1.2-15]
/// Conformance (5.0): [MQTT-3.14.4-3]
#[tokio::test]
async fn wills_are_published_only_when_set_and_never_after_disconnect() {
    for version in [V3, V5] {
        let broker = TestBroker::start().await;
        let mut watcher = RawClient::connected(broker.mqtt, version, "watcher").await;
        watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
        let with_will = |id: &str, retain: bool| Connect {
            will: Some(Will {
                topic: format!("wills/{id}").as_str().into(),
                payload: format!("{id} gone").into(),
                qos: QoS::AtLeastOnce,
                retain,
                properties: WillProperties::default(),
            }),
            ..connect_packet(version, id, true)
        };
        let gone = |id: &str| {
            let broker = broker.broker.clone();
            let id = id.to_owned();
            move || broker.session(&id).is_none()
        };
        // No will: nothing is published when the connection drops.
        let c = RawClient::connected(broker.mqtt, version, "plain").await;
        drop(c);
        raftmq_tests::wait_until("plain's session ended", gone("plain")).await;
        // A will and a DISCONNECT (normal disconnection): the will is discarded.
        let (mut c, _) = RawClient::handshake(broker.mqtt, with_will("polite", false)).await;
        c.send(&Packet::Disconnect(Disconnect::default())).await;
        assert_eq!(c.expect_closed().await, []);
        raftmq_tests::wait_until("polite's session ended", gone("polite")).await;
        let mut p = RawClient::connected(broker.mqtt, version, "will-pub").await;
        assert_next_is_sentinel(&mut p, &mut watcher, "wills/sentinel", 1).await;

        // Dropped connections publish their wills, retained only when Will Retain is 1.
        for (id, retain) in [("lost", false), ("lost-retained", true)] {
            let (c, _) = RawClient::handshake(broker.mqtt, with_will(id, retain)).await;
            drop(c);
            let will = watcher.recv_publish().await;
            assert_eq!(will.topic.as_str(), format!("wills/{id}"), "{version:?}");
            assert_eq!(&will.payload[..], format!("{id} gone").as_bytes());
        }
        // Published once: a later subscriber finds only the retained one.
        let mut later = RawClient::connected(broker.mqtt, version, "later").await;
        later.subscribe("wills/#", QoS::AtLeastOnce).await;
        let got = later.recv_publish().await;
        assert_eq!(
            (got.topic.as_str(), got.retain),
            ("wills/lost-retained", true)
        );
        assert_next_is_sentinel(&mut p, &mut later, "wills/sentinel", 2).await;
        assert_next_is_sentinel(&mut p, &mut watcher, "wills/sentinel", 3).await;
    }
}

/// Conformance (3.1.1): [MQTT-2.3.1-4] [MQTT-3.3.1-1] [MQTT-4.3.2-1] [MQTT-4.3.3-1] [MQTT-4.4.0-1]
/// Conformance (5.0): [MQTT-2.2.1-4] [MQTT-3.3.1-1] [MQTT-4.3.2-1] [MQTT-4.3.2-2] [MQTT-4.3.2-3]
/// Conformance (5.0): [MQTT-4.3.3-1] [MQTT-4.3.3-2] [MQTT-4.3.3-3] [MQTT-4.3.3-4] [MQTT-4.3.3-5]
/// Conformance (5.0): [MQTT-4.3.3-6] [MQTT-4.4.0-1]
#[tokio::test]
async fn unacknowledged_deliveries_are_resent_with_dup_and_their_ids_after_reconnecting() {
    for version in [V3, V5] {
        let broker = TestBroker::start().await;
        let (mut s, _) =
            RawClient::handshake(broker.mqtt, persistent_connect(version, "resend")).await;
        s.subscribe("r", QoS::ExactlyOnce).await;
        let mut p = RawClient::connected(broker.mqtt, version, "resend-pub").await;
        publish_acked(&mut p, publish_packet("r", QoS::AtLeastOnce, 1, b"q1")).await;
        publish_exactly_once(&mut p, publish_packet("r", QoS::ExactlyOnce, 2, b"q2")).await;
        publish_exactly_once(
            &mut p,
            publish_packet("r", QoS::ExactlyOnce, 3, b"released"),
        )
        .await;

        // First deliveries: DUP 0, distinct ids. None is acknowledged except that "released"
        // gets PUBREC, so the broker owes PUBREL for it and must not send it again.
        let first: Vec<Publish> = [
            s.recv_publish().await,
            s.recv_publish().await,
            s.recv_publish().await,
        ]
        .into();
        let ids: Vec<_> = first
            .iter()
            .map(|m| m.packet_id.expect("QoS > 0"))
            .collect();
        assert!(first.iter().all(|m| !m.dup), "{first:?}");
        assert!(
            ids[0] != ids[1] && ids[1] != ids[2] && ids[0] != ids[2],
            "{ids:?}"
        );
        s.send(&Packet::PubRec(PubResponse::success(ids[2]))).await;
        assert_eq!(
            s.recv().await,
            Some(Packet::PubRel(PubResponse::success(ids[2])))
        );
        drop(s);

        let (mut s, ack) =
            RawClient::handshake(broker.mqtt, persistent_connect(version, "resend")).await;
        assert!(ack.session_present);
        let r1 = s.recv_publish().await;
        let r2 = s.recv_publish().await;
        assert_eq!(
            [
                (&r1.payload[..], r1.dup, r1.packet_id),
                (&r2.payload[..], r2.dup, r2.packet_id)
            ],
            [
                (&b"q1"[..], true, Some(ids[0])),
                (&b"q2"[..], true, Some(ids[1]))
            ],
            "{version:?}"
        );
        assert_eq!(
            s.recv().await,
            Some(Packet::PubRel(PubResponse::success(ids[2])))
        );
        // Completing the flows leaves nothing to resend.
        s.send(&Packet::PubAck(PubResponse::success(ids[0]))).await;
        s.send(&Packet::PubRec(PubResponse::success(ids[1]))).await;
        assert_eq!(
            s.recv().await,
            Some(Packet::PubRel(PubResponse::success(ids[1])))
        );
        s.send(&Packet::PubComp(PubResponse::success(ids[1]))).await;
        s.send(&Packet::PubComp(PubResponse::success(ids[2]))).await;
        barrier(&mut s).await;
        drop(s);
        let (mut s, ack) =
            RawClient::handshake(broker.mqtt, persistent_connect(version, "resend")).await;
        assert!(ack.session_present);
        assert_next_is_sentinel(&mut p, &mut s, "r", 4).await;
    }
}

/// Conformance (3.1.1): [MQTT-3.1.3-5] [MQTT-3.1.4-4]
/// Conformance (5.0): [MQTT-3.1.3-5] [MQTT-3.1.4-5]
#[tokio::test]
async fn client_ids_of_1_to_23_letters_and_digits_are_accepted() {
    let broker = TestBroker::start().await;
    for version in [V3, V5] {
        for id in ["0", "abcdefghijklmnopqrstuvw", "XYZ0123456789ABCDEFGHIJ"] {
            let (_c, ack) =
                RawClient::handshake(broker.mqtt, connect_packet(version, id, true)).await;
            assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "{version:?} {id}");
        }
    }
}

/// Conformance (3.1.1): [MQTT-3.1.3-6]
#[tokio::test]
async fn empty_client_ids_get_distinct_sessions_on_v311() {
    let broker = TestBroker::start().await;
    let (mut a, ack) = RawClient::handshake(broker.mqtt, connect_packet(V3, "", true)).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    a.subscribe("a", QoS::AtLeastOnce).await;
    let (mut b, ack) = RawClient::handshake(broker.mqtt, connect_packet(V3, "", true)).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    b.subscribe("b", QoS::AtLeastOnce).await;
    // Had both been given the same identifier, `b` would have taken over `a`'s session.
    let mut p = RawClient::connected(broker.mqtt, V3, "anon-pub").await;
    assert_next_is_sentinel(&mut p, &mut a, "a", 1).await;
    assert_next_is_sentinel(&mut p, &mut b, "b", 2).await;
}

/// Conformance (3.1.1): [MQTT-3.1.2-3] [MQTT-3.1.4-1] [MQTT-3.2.2-6]
/// Conformance (5.0): [MQTT-3.1.2-3] [MQTT-3.1.4-1] [MQTT-3.14.0-1]
#[tokio::test]
async fn malformed_connect_is_closed_without_connack() {
    let broker = TestBroker::start().await;
    // Reserved connect flag set (0x03), then a client id.
    for (level, props) in [(4u8, &[][..]), (5, &[0x00][..])] {
        let mut body = vec![0x00, 0x04, b'M', b'Q', b'T', b'T', level, 0x03, 0x00, 0x00];
        body.extend_from_slice(props);
        body.extend_from_slice(&[0x00, 0x01, b'c']);
        let mut bytes = vec![0x10, body.len() as u8];
        bytes.extend_from_slice(&body);
        let version = if level == 5 { V5 } else { V3 };
        let mut c = RawClient::connect(broker.mqtt, version).await;
        c.send_bytes(&bytes).await;
        assert_eq!(c.expect_closed().await, [], "level {level}");
    }
    assert_broker_serves(broker.mqtt).await;
}

/// Conformance (3.1.1): [MQTT-3.3.1-5] [MQTT-3.3.1-7] [MQTT-3.3.1-8] [MQTT-3.3.1-12]
/// Conformance (5.0): [MQTT-3.3.1-5] [MQTT-3.3.1-8]
#[tokio::test]
async fn retained_messages_survive_plain_publishes_and_qos0_retain_replaces_them() {
    for version in [V3, V5] {
        let broker = TestBroker::start().await;
        let mut p = RawClient::connected(broker.mqtt, version, "ret-pub").await;
        publish_acked(
            &mut p,
            Publish {
                retain: true,
                ..publish_packet("ret/a", QoS::AtLeastOnce, 1, b"kept")
            },
        )
        .await;
        // A message without RETAIN neither replaces nor removes it.
        publish_acked(
            &mut p,
            publish_packet("ret/a", QoS::AtLeastOnce, 2, b"plain"),
        )
        .await;
        let mut s = RawClient::connected(broker.mqtt, version, "ret-sub").await;
        s.subscribe("ret/+", QoS::ExactlyOnce).await;
        let got = s.recv_publish().await;
        assert_eq!(
            (&got.payload[..], got.qos, got.retain),
            (&b"kept"[..], QoS::AtLeastOnce, true)
        );
        s.send(&Packet::PubAck(PubResponse::success(
            got.packet_id.expect("QoS 1"),
        )))
        .await;
        // A retained QoS 0 message replaces it.
        p.send(&Packet::Publish(Publish {
            retain: true,
            ..publish_packet("ret/a", QoS::AtMostOnce, 0, b"zero")
        }))
        .await;
        let live = s.recv_publish().await;
        assert_eq!(&live.payload[..], b"zero");
        let mut s2 = RawClient::connected(broker.mqtt, version, "ret-sub2").await;
        s2.subscribe("ret/+", QoS::ExactlyOnce).await;
        let got = s2.recv_publish().await;
        assert_eq!(
            (&got.payload[..], got.qos, got.retain),
            (&b"zero"[..], QoS::AtMostOnce, true)
        );
        assert_next_is_sentinel(&mut p, &mut s2, "ret/b", 3).await;
    }
}

/// Conformance (3.1.1): [MQTT-3.8.3-2]
/// Conformance (5.0): [MQTT-3.2.2-6] [MQTT-3.2.2-7] [MQTT-3.2.2-8] [MQTT-3.2.2-9] [MQTT-3.2.2-10]
/// Conformance (5.0): [MQTT-3.2.2-12] [MQTT-3.2.2-13] [MQTT-3.8.4-7] [MQTT-4.13.2-1]
#[tokio::test]
async fn features_turned_off_are_announced_and_refused() {
    let config = MqttConfig {
        max_qos: 1,
        retain_available: false,
        wildcard_subscriptions: false,
        ..Default::default()
    };
    let broker = TestBroker::with_config(config).await;
    let (_c, ack) = RawClient::handshake(broker.mqtt, connect_packet(V5, "announced", true)).await;
    assert_eq!(
        (
            ack.properties.maximum_qos,
            ack.properties.retain_available,
            ack.properties.wildcard_subscription_available
        ),
        (Some(QoS::AtLeastOnce), Some(false), Some(false))
    );
    for version in [V3, V5] {
        // SUBSCRIBE at QoS 2 is still accepted (granted 1); wildcard filters are refused.
        let mut s = RawClient::connected(broker.mqtt, version, "features").await;
        s.send(&subscribe_packet(
            1,
            &[("t", QoS::ExactlyOnce), ("t/#", QoS::AtMostOnce)],
        ))
        .await;
        match s.recv().await {
            Some(Packet::SubAck(ack)) => assert_eq!(
                ack.reason_codes,
                [
                    ReasonCode::GRANTED_QOS_1,
                    refused(version, ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED)
                ]
            ),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
    // A will the server cannot publish is refused at CONNECT.
    let will = |qos, retain| Connect {
        will: Some(Will {
            topic: "w".into(),
            payload: "x".into(),
            qos,
            retain,
            properties: WillProperties::default(),
        }),
        ..connect_packet(V5, "will", true)
    };
    for (connect, code) in [
        (will(QoS::ExactlyOnce, false), ReasonCode::QOS_NOT_SUPPORTED),
        (
            will(QoS::AtMostOnce, true),
            ReasonCode::RETAIN_NOT_SUPPORTED,
        ),
    ] {
        let (mut c, ack) = RawClient::handshake(broker.mqtt, connect).await;
        assert_eq!((ack.reason_code, ack.session_present), (code, false));
        assert_eq!(c.expect_closed().await, []);
    }
}

/// Refuses user "intruder" (0x87 Not authorized) and denies publishing under "secret/".
struct Guard;

impl raftmq_core::auth::Authenticator for Guard {
    fn authenticate(
        &self,
        info: &raftmq_core::auth::ConnectInfo<'_>,
    ) -> raftmq_core::auth::AuthDecision {
        if info.username == Some("intruder") {
            return raftmq_core::auth::AuthDecision::Deny(ReasonCode::NOT_AUTHORIZED);
        }
        raftmq_core::auth::AuthDecision::Allow(raftmq_core::auth::Principal {
            username: info.username.map(str::to_owned),
            client_id: info.client_id.to_owned(),
            acl: None,
            valid_until: None,
        })
    }
}

impl raftmq_core::auth::Authorizer for Guard {
    fn authorize(
        &self,
        _: &raftmq_core::auth::Principal,
        access: raftmq_core::auth::Access<'_>,
    ) -> bool {
        !matches!(access, raftmq_core::auth::Access::Publish { topic, .. } if topic.starts_with("secret/"))
    }
}

async fn guarded_broker() -> TestBroker {
    let guard = std::sync::Arc::new(Guard);
    let broker = raftmq_core::Broker::with_auth(MqttConfig::default(), guard.clone(), guard, 1);
    TestBroker::with_broker(std::sync::Arc::new(broker)).await
}

/// Conformance (3.1.1): [MQTT-3.1.4-5] [MQTT-3.2.2-4] [MQTT-3.2.2-5]
/// Conformance (5.0): [MQTT-3.1.4-2] [MQTT-3.1.4-6] [MQTT-3.2.2-6] [MQTT-3.2.2-7]
#[tokio::test]
async fn refused_connect_is_answered_then_closed_and_nothing_after_it_is_processed() {
    let broker = guarded_broker().await;
    for version in [V3, V5] {
        let connect = Connect {
            username: Some("intruder".into()),
            ..connect_packet(version, "intruder", true)
        };
        let mut bytes = bytes::BytesMut::new();
        raftmq_codec::encode(&Packet::Connect(Box::new(connect)), version, &mut bytes)
            .expect("encode");
        // Pipelined after the CONNECT: must not be answered.
        raftmq_codec::encode(&Packet::PingReq, version, &mut bytes).expect("encode");
        let mut c = RawClient::connect(broker.mqtt, version).await;
        c.send_bytes(&bytes).await;
        let seen = c.expect_closed().await;
        let [Packet::ConnAck(ack)] = &seen[..] else {
            panic!("{version:?}: expected only CONNACK, got {seen:?}")
        };
        assert!(!ack.session_present);
        assert_eq!(ack.reason_code.to_v3_connack(), 5, "{version:?}");
        if version.is_v5() {
            assert_eq!(ack.reason_code, ReasonCode::NOT_AUTHORIZED);
        }
    }
}

/// Conformance (3.1.1): [MQTT-3.3.5-2]
/// Conformance (5.0): [MQTT-3.4.2-1] [MQTT-3.5.2-1] [MQTT-4.3.3-9]
#[tokio::test]
async fn unauthorized_publishes_are_acknowledged_and_not_delivered() {
    let broker = guarded_broker().await;
    for version in [V3, V5] {
        let mut s = RawClient::connected(broker.mqtt, version, "guard-sub").await;
        s.subscribe("#", QoS::AtLeastOnce).await;
        let mut p = RawClient::connected(broker.mqtt, version, "guard-pub").await;
        let denied = if version.is_v5() {
            ReasonCode::NOT_AUTHORIZED
        } else {
            ReasonCode::SUCCESS // MQTT 3 cannot say no: a positive acknowledgement
        };
        p.send(&Packet::Publish(publish_packet(
            "secret/a",
            QoS::AtLeastOnce,
            1,
            b"no",
        )))
        .await;
        let expected = PubResponse {
            reason_code: denied,
            ..PubResponse::success(pid(1))
        };
        assert_eq!(p.recv().await, Some(Packet::PubAck(expected)));
        if version.is_v5() {
            // After a PUBREC of 0x80 or more, the same packet id starts a new message.
            p.send(&Packet::Publish(publish_packet(
                "secret/b",
                QoS::ExactlyOnce,
                2,
                b"no",
            )))
            .await;
            let refused = PubResponse {
                reason_code: ReasonCode::NOT_AUTHORIZED,
                ..PubResponse::success(pid(2))
            };
            assert_eq!(p.recv().await, Some(Packet::PubRec(refused)));
            publish_exactly_once(
                &mut p,
                publish_packet("open/b", QoS::ExactlyOnce, 2, b"yes"),
            )
            .await;
            let got = s.recv_publish().await;
            assert_eq!(
                (got.topic.as_str(), &got.payload[..]),
                ("open/b", &b"yes"[..])
            );
            s.send(&Packet::PubAck(PubResponse::success(
                got.packet_id.expect("QoS 1"),
            )))
            .await;
        }
        assert_next_is_sentinel(&mut p, &mut s, "open/a", 3).await;
    }
}

/// Conformance (3.1.1): [MQTT-3.1.3-9]
/// Conformance (5.0): [MQTT-3.1.3-8] [MQTT-3.2.2-8] [MQTT-4.12.0-1]
#[tokio::test]
async fn refused_client_ids_and_authentication_methods_get_connack_and_close() {
    let broker = TestBroker::with_config(MqttConfig {
        allow_empty_client_id: false,
        ..Default::default()
    })
    .await;
    for version in [V3, V5] {
        let (mut c, ack) =
            RawClient::handshake(broker.mqtt, connect_packet(version, "", true)).await;
        assert_eq!(ack.reason_code.to_v3_connack(), 2, "{version:?}");
        if version.is_v5() {
            assert_eq!(ack.reason_code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
        }
        assert_eq!(c.expect_closed().await, []);
    }
    // No enhanced authentication method is supported.
    let connect = Connect {
        properties: ConnectProperties {
            authentication_method: Some("SCRAM-SHA-1".into()),
            ..Default::default()
        },
        ..connect_packet(V5, "scram", true)
    };
    let (mut c, ack) = RawClient::handshake(broker.mqtt, connect).await;
    assert_eq!(ack.reason_code, ReasonCode::BAD_AUTHENTICATION_METHOD);
    assert_eq!(c.expect_closed().await, []);
}

/// Conformance (5.0): [MQTT-3.1.2-28] [MQTT-3.1.3-10] [MQTT-3.3.2-3] [MQTT-3.3.2-4] [MQTT-3.3.2-12]
/// Conformance (5.0): [MQTT-3.3.2-15] [MQTT-3.3.2-16] [MQTT-3.3.2-17] [MQTT-3.3.2-18]
/// Conformance (5.0): [MQTT-3.3.2-20] [MQTT-4.12.0-6]
#[tokio::test]
async fn v5_message_properties_are_forwarded_unaltered_and_in_order() {
    let broker = TestBroker::start().await;
    let mut s = RawClient::connected(broker.mqtt, V5, "props-sub").await;
    s.subscribe("props/#", QoS::AtLeastOnce).await;
    let user_properties: Vec<(raftmq_codec::ByteStr, raftmq_codec::ByteStr)> =
        [("z", "1"), ("a", "2"), ("z", "0")]
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
    let properties = raftmq_codec::PublishProperties {
        payload_format_indicator: Some(true),
        response_topic: Some("reply/here".into()),
        correlation_data: Some(bytes::Bytes::from_static(b"\x00corr\xFF")),
        user_properties: user_properties.clone(),
        content_type: Some("text/plain".into()),
        ..Default::default()
    };
    let expected = |p: &raftmq_codec::PublishProperties| {
        (
            p.payload_format_indicator,
            p.response_topic.clone(),
            p.correlation_data.clone(),
            p.user_properties.clone(),
            p.content_type.clone(),
        )
    };

    // A PUBLISH using the largest topic alias the server allows.
    let (mut p, ack) =
        RawClient::handshake(broker.mqtt, connect_packet(V5, "props-pub", true)).await;
    assert_eq!(
        (
            &ack.properties.response_information,
            &ack.properties.authentication_method
        ),
        (&None, &None),
        "nothing was requested"
    );
    let alias = ack.properties.topic_alias_maximum.expect("aliases allowed");
    assert!(alias > 0);
    let mut publish = publish_packet("props/a", QoS::AtLeastOnce, 1, b"body");
    publish.properties = raftmq_codec::PublishProperties {
        topic_alias: Some(alias),
        ..properties.clone()
    };
    publish_acked(&mut p, publish).await;
    let got = s.recv_publish().await;
    assert_eq!(got.topic.as_str(), "props/a");
    assert_eq!(expected(&got.properties), expected(&properties));
    s.send(&Packet::PubAck(PubResponse::success(
        got.packet_id.expect("QoS 1"),
    )))
    .await;

    // A will carries the same properties.
    let connect = Connect {
        will: Some(Will {
            topic: "props/will".into(),
            payload: "gone".into(),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: WillProperties {
                payload_format_indicator: Some(true),
                response_topic: Some("reply/here".into()),
                correlation_data: Some(bytes::Bytes::from_static(b"\x00corr\xFF")),
                user_properties,
                content_type: Some("text/plain".into()),
                ..Default::default()
            },
        }),
        ..connect_packet(V5, "props-will", true)
    };
    let (c, _) = RawClient::handshake(broker.mqtt, connect).await;
    drop(c);
    let got = s.recv_publish().await;
    assert_eq!(got.topic.as_str(), "props/will");
    assert_eq!(expected(&got.properties), expected(&properties));
}

/// Conformance (5.0): [MQTT-4.8.2-1] [MQTT-4.8.2-2] [MQTT-4.8.2-3]
#[tokio::test]
async fn shared_subscription_filters_need_a_share_name_and_a_filter_and_keep_the_granted_qos() {
    let broker = TestBroker::start().await;
    for bad in [
        "$share//jobs",
        "$share/g+/jobs",
        "$share/g#/jobs",
        "$share/g/",
        "$share/g",
    ] {
        let mut m = RawClient::connected(broker.mqtt, V5, "bad-member").await;
        m.send(&subscribe_packet(1, &[(bad, QoS::AtMostOnce)]))
            .await;
        assert_eq!(
            m.expect_closed().await,
            [Packet::Disconnect(Disconnect::with_code(
                ReasonCode::MALFORMED_PACKET
            ))],
            "{bad}"
        );
    }
    let mut m = RawClient::connected(broker.mqtt, V5, "member").await;
    m.send(&subscribe_packet(
        1,
        &[("$share/g/jobs/+", QoS::AtMostOnce)],
    ))
    .await;
    match m.recv().await {
        Some(Packet::SubAck(ack)) => assert_eq!(ack.reason_codes, [ReasonCode::GRANTED_QOS_0]),
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // The member granted QoS 0 gets a QoS 2 message at QoS 0.
    let mut p = RawClient::connected(broker.mqtt, V5, "jobs-pub").await;
    publish_exactly_once(
        &mut p,
        publish_packet("jobs/1", QoS::ExactlyOnce, 1, b"job"),
    )
    .await;
    let got = m.recv_publish().await;
    assert_eq!((&got.payload[..], got.qos), (&b"job"[..], QoS::AtMostOnce));
}

/// Conformance (5.0): [MQTT-3.3.4-10] [MQTT-4.9.0-3]
#[tokio::test]
async fn a_full_receive_window_holds_back_publishes_only() {
    let broker = TestBroker::start().await;
    let connect = Connect {
        properties: ConnectProperties {
            receive_maximum: Some(1),
            ..Default::default()
        },
        ..connect_packet(V5, "window", true)
    };
    let (mut s, _) = RawClient::handshake(broker.mqtt, connect).await;
    s.subscribe("w", QoS::AtLeastOnce).await;
    let mut p = RawClient::connected(broker.mqtt, V5, "window-pub").await;
    for (id, payload) in [(1, &b"first"[..]), (2, b"second")] {
        publish_acked(&mut p, publish_packet("w", QoS::AtLeastOnce, id, payload)).await;
    }
    let first = s.recv_publish().await;
    assert_eq!(&first.payload[..], b"first");
    // The window is full ("second" waits), yet other packets are answered at once.
    s.send(&Packet::PingReq).await;
    assert_eq!(s.recv().await, Some(Packet::PingResp));
    s.send(&subscribe_packet(9, &[("other", QoS::AtMostOnce)]))
        .await;
    assert!(
        matches!(s.recv().await, Some(Packet::SubAck(ack)) if ack.packet_id == pid(9)),
        "SUBACK held back by the full window"
    );
    s.send(&Packet::PubAck(PubResponse::success(
        first.packet_id.expect("QoS 1"),
    )))
    .await;
    assert_eq!(&s.recv_publish().await.payload[..], b"second");
}

/// Conformance (5.0): [MQTT-4.4.0-2]
#[tokio::test]
async fn a_delivery_refused_with_an_error_puback_is_not_resent() {
    let broker = TestBroker::start().await;
    let (mut s, _) = RawClient::handshake(broker.mqtt, persistent_connect(V5, "refuser")).await;
    s.subscribe("e", QoS::AtLeastOnce).await;
    let mut p = RawClient::connected(broker.mqtt, V5, "refuser-pub").await;
    publish_acked(
        &mut p,
        publish_packet("e", QoS::AtLeastOnce, 1, b"unwanted"),
    )
    .await;
    let got = s.recv_publish().await;
    s.send(&Packet::PubAck(PubResponse {
        reason_code: ReasonCode::UNSPECIFIED_ERROR,
        ..PubResponse::success(got.packet_id.expect("QoS 1"))
    }))
    .await;
    barrier(&mut s).await;
    drop(s);
    let (mut s, ack) = RawClient::handshake(broker.mqtt, persistent_connect(V5, "refuser")).await;
    assert!(ack.session_present);
    assert_next_is_sentinel(&mut p, &mut s, "e", 2).await;
}

/// Conformance (3.1.1): [MQTT-3.10.4-3]
/// Conformance (5.0): [MQTT-3.10.4-3]
#[tokio::test]
async fn unsubscribing_completes_the_deliveries_already_started() {
    let broker = TestBroker::start().await;
    for version in [V3, V5] {
        let mut s = RawClient::connected(broker.mqtt, version, "unsub-sub").await;
        s.subscribe("u", QoS::ExactlyOnce).await;
        s.subscribe("v", QoS::AtLeastOnce).await;
        let mut p = RawClient::connected(broker.mqtt, version, "unsub-pub").await;
        publish_exactly_once(&mut p, publish_packet("u", QoS::ExactlyOnce, 1, b"started")).await;
        let got = s.recv_publish().await;
        let id = got.packet_id.expect("QoS 2");
        s.send(&Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(2),
            properties: Vec::new(),
            filters: vec!["u".into()],
        }))
        .await;
        assert!(matches!(s.recv().await, Some(Packet::UnsubAck(ack)) if ack.packet_id == pid(2)));
        // The exchange started before UNSUBSCRIBE goes on to its end.
        s.send(&Packet::PubRec(PubResponse::success(id))).await;
        assert_eq!(
            s.recv().await,
            Some(Packet::PubRel(PubResponse::success(id)))
        );
        s.send(&Packet::PubComp(PubResponse::success(id))).await;
        // Nothing new is delivered for "u".
        p.send(&Packet::Publish(publish_packet(
            "u",
            QoS::AtMostOnce,
            0,
            b"late",
        )))
        .await;
        assert_next_is_sentinel(&mut p, &mut s, "v", 3).await;
    }
}

/// Conformance (5.0): [MQTT-4.8.2-4]
#[tokio::test]
async fn a_shared_delivery_in_flight_is_completed_when_the_member_reconnects() {
    let broker = TestBroker::start().await;
    let (mut m, _) = RawClient::handshake(broker.mqtt, persistent_connect(V5, "sticky")).await;
    m.subscribe("$share/g/jobs", QoS::AtLeastOnce).await;
    let mut p = RawClient::connected(broker.mqtt, V5, "sticky-pub").await;
    publish_acked(&mut p, publish_packet("jobs", QoS::AtLeastOnce, 1, b"job")).await;
    let first = m.recv_publish().await;
    assert_eq!((&first.payload[..], first.dup), (&b"job"[..], false));
    drop(m);
    let (mut m, ack) = RawClient::handshake(broker.mqtt, persistent_connect(V5, "sticky")).await;
    assert!(ack.session_present);
    let again = m.recv_publish().await;
    assert_eq!(
        (&again.payload[..], again.dup, again.packet_id),
        (&b"job"[..], true, first.packet_id)
    );
}

/// Waits for the next PUBLISH on either client; returns which one (0 or 1) got it, and it.
async fn first_of(a: &mut RawClient, b: &mut RawClient) -> (usize, Publish) {
    tokio::select! {
        p = a.recv_publish() => (0, p),
        p = b.recv_publish() => (1, p),
    }
}

/// Conformance (5.0): [MQTT-4.8.2-5] [MQTT-4.8.2-6]
#[tokio::test]
async fn a_shared_message_refused_or_orphaned_by_its_member_goes_to_no_other_member() {
    let broker = TestBroker::start().await;
    let mut members = [
        RawClient::connected(broker.mqtt, V5, "member-a").await,
        RawClient::connected(broker.mqtt, V5, "member-b").await,
    ];
    for m in &mut members {
        m.subscribe("$share/g/work", QoS::AtLeastOnce).await;
    }
    let mut p = RawClient::connected(broker.mqtt, V5, "work-pub").await;

    // The member that gets "refused" answers PUBACK 0x80: the message is dropped.
    publish_acked(
        &mut p,
        publish_packet("work", QoS::AtLeastOnce, 1, b"refused"),
    )
    .await;
    let [a, b] = &mut members;
    let (who, got) = first_of(a, b).await;
    assert_eq!(&got.payload[..], b"refused");
    let refuser = &mut members[who];
    refuser
        .send(&Packet::PubAck(PubResponse {
            reason_code: ReasonCode::UNSPECIFIED_ERROR,
            ..PubResponse::success(got.packet_id.expect("QoS 1"))
        }))
        .await;
    barrier(refuser).await;
    // Round robin: one new message for each member, and nothing else.
    for id in [2, 3] {
        publish_acked(
            &mut p,
            publish_packet("work", QoS::AtLeastOnce, id, b"next"),
        )
        .await;
    }
    for m in &mut members {
        let got = m.recv_publish().await;
        assert_eq!(
            &got.payload[..],
            b"next",
            "the refused message was sent again"
        );
        m.send(&Packet::PubAck(PubResponse::success(
            got.packet_id.expect("QoS 1"),
        )))
        .await;
    }

    // The member that gets "orphaned" goes away with it unacknowledged: its session ends, and
    // the message is not handed to the other member.
    publish_acked(
        &mut p,
        publish_packet("work", QoS::AtLeastOnce, 4, b"orphaned"),
    )
    .await;
    let [a, b] = &mut members;
    let (who, got) = first_of(a, b).await;
    assert_eq!(&got.payload[..], b"orphaned");
    let [a, b] = members;
    let (gone, mut other) = if who == 0 { (a, b) } else { (b, a) };
    drop(gone);
    let id = if who == 0 { "member-a" } else { "member-b" };
    let core = broker.broker.clone();
    raftmq_tests::wait_until("the member's session ended", || core.session(id).is_none()).await;
    publish_acked(&mut p, publish_packet("work", QoS::AtLeastOnce, 5, b"last")).await;
    let got = other.recv_publish().await;
    assert_eq!(
        &got.payload[..],
        b"last",
        "the orphaned message went to another member"
    );
}

/// Conformance (5.0): [MQTT-4.3.3-7] [MQTT-4.3.3-13]
#[tokio::test]
async fn message_expiry_does_not_cut_short_a_qos2_exchange_under_way() {
    let broker = TestBroker::start().await;
    let expiring = |id, payload: &[u8]| Publish {
        properties: raftmq_codec::PublishProperties {
            message_expiry_interval: Some(1),
            ..Default::default()
        },
        ..publish_packet("x", QoS::ExactlyOnce, id, payload)
    };
    let (mut s, _) = RawClient::handshake(broker.mqtt, persistent_connect(V5, "slow-ack")).await;
    s.subscribe("x", QoS::ExactlyOnce).await;
    let mut p = RawClient::connected(broker.mqtt, V5, "expiring-pub").await;

    // Receiving side: PUBREC, then the message expires, then PUBREL still gets PUBCOMP.
    p.send(&Packet::Publish(expiring(1, b"a"))).await;
    assert_eq!(
        p.recv().await,
        Some(Packet::PubRec(PubResponse::success(pid(1))))
    );
    let sent = s.recv_publish().await;
    assert_eq!((&sent.payload[..], sent.dup), (&b"a"[..], false));
    // The expiry interval is what this test is about: let it pass for real.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    p.send(&Packet::PubRel(PubResponse::success(pid(1)))).await;
    assert_eq!(
        p.recv().await,
        Some(Packet::PubComp(PubResponse::success(pid(1))))
    );

    // Sending side: the PUBLISH sent before it expired is still resent on reconnection.
    drop(s);
    let (mut s, ack) = RawClient::handshake(broker.mqtt, persistent_connect(V5, "slow-ack")).await;
    assert!(ack.session_present);
    let again = s.recv_publish().await;
    assert_eq!(
        (&again.payload[..], again.dup, again.packet_id),
        (&b"a"[..], true, sent.packet_id)
    );
}
