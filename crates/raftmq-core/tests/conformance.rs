//! Raw-packet conformance checks of the connection state machine (sans-IO).
//!
//! Each client speaks bytes: what it sends is decoded exactly as the server's connection task
//! decodes a socket's input (`raftmq_codec::decode` with the connection's protocol version and
//! packet size limit), and what the broker answers is encoded to bytes again. The fake clock
//! is a base `Instant` plus offsets. The `Conformance` lines name the statements of the OASIS
//! MQTT 3.1.1 and 5.0 texts each test checks (see docs/conformance.md).

mod support;

use bytes::BytesMut;
use raftmq_codec::{
    ByteStr, Connect, Packet, ProtocolVersion, QoS, Will, WillProperties, decode, encode,
};
use raftmq_core::config::MqttConfig;
use raftmq_core::{Broker, Connection};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A broker and a fake clock.
struct World {
    broker: Arc<Broker>,
    t0: Instant,
}

impl World {
    fn new() -> Self {
        World {
            broker: Arc::new(Broker::new(MqttConfig::default())),
            t0: Instant::now(),
        }
    }

    fn at(&self, millis: u64) -> Instant {
        self.t0 + Duration::from_millis(millis)
    }

    /// Opens a connection and sends `connect` (encoded by the codec, as a client would);
    /// returns the client and the bytes of the broker's answer.
    fn connect(&self, connect: Connect, now: Instant) -> (Wire, Vec<u8>) {
        let mut wire = Wire {
            conn: Connection::new(self.broker.clone(), None, now),
            inbound: BytesMut::new(),
            version: connect.protocol,
        };
        let bytes = encode_packet(
            &Packet::Connect(Box::new(connect.clone())),
            connect.protocol,
        );
        let answer = wire.send(&bytes, now);
        (wire, answer)
    }

    /// Connects and asserts a successful CONNACK (any session present flag).
    fn connect_ok(&self, connect: Connect, now: Instant) -> Wire {
        let (wire, answer) = self.connect(connect, now);
        assert_eq!(
            answer.first(),
            Some(&0x20),
            "expected CONNACK: {answer:02x?}"
        );
        let rc_at = 3;
        assert_eq!(answer[rc_at], 0, "CONNACK refused: {answer:02x?}");
        wire
    }
}

/// One client's network connection, spoken to in bytes.
struct Wire {
    conn: Connection,
    inbound: BytesMut,
    version: ProtocolVersion,
}

impl Wire {
    /// Feeds `bytes` from the client, then returns every byte the broker would write now.
    fn send(&mut self, bytes: &[u8], now: Instant) -> Vec<u8> {
        self.inbound.extend_from_slice(bytes);
        loop {
            match decode(
                &mut self.inbound,
                self.conn.version(),
                self.conn.max_incoming_packet_size(),
            ) {
                Ok(Some(packet)) => self.conn.handle_packet(packet, now),
                Ok(None) => break,
                Err(err) => {
                    self.conn.handle_decode_error(&err, now);
                    break;
                }
            }
            if self.conn.is_closed() {
                break;
            }
        }
        self.receive(now)
    }

    /// Everything the broker would write now (deliveries pumped, commits settled).
    fn receive(&mut self, now: Instant) -> Vec<u8> {
        self.conn.handle_commits(now);
        self.conn.pump(now, usize::MAX);
        let mut out = Vec::new();
        while let Some(packet) = self.conn.poll_transmit() {
            out.extend_from_slice(&encode_packet(&packet, self.version));
        }
        out
    }

    fn closed(&self) -> bool {
        self.conn.is_closed()
    }
}

fn encode_packet(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf).expect("the packet encodes");
    buf.to_vec()
}

/// A v5 CONNECT with clean start and no session expiry.
fn v5(id: &str) -> Connect {
    support::connect(ProtocolVersion::V5, id, true)
}

/// A v5 CONNECT with the given clean start and session expiry.
fn v5_session(id: &str, clean_start: bool, expiry: u32) -> Connect {
    support::connect_v5(id, clean_start, expiry)
}

fn v311(id: &str, clean_session: bool) -> Connect {
    Connect {
        protocol: ProtocolVersion::V3_1_1,
        clean_start: clean_session,
        ..v5(id)
    }
}

/// A raw SUBSCRIBE (packet id 1) of `filters` at QoS 1, for `version`.
fn subscribe_bytes(version: ProtocolVersion, filters: &[&str]) -> Vec<u8> {
    let mut body = vec![0x00, 0x01];
    if version == ProtocolVersion::V5 {
        body.push(0x00); // no properties
    }
    for f in filters {
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
        body.push(0x01);
    }
    framed(0x82, &body)
}

/// A raw UNSUBSCRIBE (packet id 2) of `filters`, for `version`.
fn unsubscribe_bytes(version: ProtocolVersion, filters: &[&str]) -> Vec<u8> {
    let mut body = vec![0x00, 0x02];
    if version == ProtocolVersion::V5 {
        body.push(0x00);
    }
    for f in filters {
        body.extend_from_slice(&(f.len() as u16).to_be_bytes());
        body.extend_from_slice(f.as_bytes());
    }
    framed(0xA2, &body)
}

/// A raw PUBLISH of `payload` to `topic` with `qos` (packet id 7 for QoS 1/2), for `version`.
fn publish_bytes(version: ProtocolVersion, topic: &str, qos: u8, payload: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&[0x00, 0x07]);
    }
    if version == ProtocolVersion::V5 {
        body.push(0x00);
    }
    body.extend_from_slice(payload);
    framed(0x30 | (qos << 1), &body)
}

/// A fixed header (`first` byte, remaining length below 128) and `body`.
fn framed(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128, "short packets only");
    let mut packet = vec![first, body.len() as u8];
    packet.extend_from_slice(body);
    packet
}

/// The packet type nibbles of the packets in `bytes` (a sequence of short packets).
fn packet_types(mut bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    while bytes.len() >= 2 {
        types.push(bytes[0] >> 4);
        let len = 2 + bytes[1] as usize;
        bytes = &bytes[len.min(bytes.len())..];
    }
    types
}

const DISCONNECT_MALFORMED: [u8; 3] = [0xE0, 0x01, 0x81];
const DISCONNECT_PROTOCOL_ERROR: [u8; 3] = [0xE0, 0x01, 0x82];

// ---------------------------------------------------------------------------------------------
// 1. Empty and malformed topic filters close the connection
// ---------------------------------------------------------------------------------------------

/// A v5 SUBSCRIBE with a zero-length topic filter is a
/// malformed packet: DISCONNECT 0x81 and the connection closes (no SUBACK).
/// Conformance (5.0): [MQTT-4.7.3-1] [MQTT-4.13.1-1]
#[test]
fn v5_subscribe_with_an_empty_filter_is_disconnected_as_malformed() {
    let w = World::new();
    let mut c = w.connect_ok(v5("empty-filter"), w.at(0));
    let answer = c.send(&subscribe_bytes(ProtocolVersion::V5, &[""]), w.at(1));
    assert_eq!(answer, DISCONNECT_MALFORMED, "{answer:02x?}");
    assert!(c.closed());
}

/// A shared subscription must name a group and a filter: `$share/p/` and
/// `$share/p` are malformed (DISCONNECT 0x81, closed).
/// Conformance (5.0): [MQTT-4.8.2-2] [MQTT-4.13.1-1]
#[test]
fn v5_shared_subscription_without_a_filter_is_disconnected_as_malformed() {
    for filter in ["$share/p/", "$share/p"] {
        let w = World::new();
        let mut c = w.connect_ok(v5("shared-no-filter"), w.at(0));
        let answer = c.send(&subscribe_bytes(ProtocolVersion::V5, &[filter]), w.at(1));
        assert_eq!(answer, DISCONNECT_MALFORMED, "{filter}: {answer:02x?}");
        assert!(c.closed(), "{filter}");
    }
}

/// A 3.1.1 SUBSCRIBE with an empty filter closes the connection
/// without a SUBACK (3.1.1 has no DISCONNECT from the server).
/// Conformance (3.1.1): [MQTT-4.7.3-1] [MQTT-4.8.0-1]
#[test]
fn v311_subscribe_with_an_empty_filter_closes_the_connection() {
    let w = World::new();
    let mut c = w.connect_ok(v311("empty-filter-311", true), w.at(0));
    let answer = c.send(
        &subscribe_bytes(ProtocolVersion::V3_1_1, &["ok", ""]),
        w.at(1),
    );
    assert_eq!(answer, [] as [u8; 0], "{answer:02x?}");
    assert!(c.closed());
}

/// UNSUBSCRIBE filters are validated too: an empty one is malformed.
/// Conformance (5.0): [MQTT-4.7.3-1] [MQTT-4.13.1-1]
#[test]
fn v5_unsubscribe_with_an_empty_filter_is_disconnected_as_malformed() {
    let w = World::new();
    let mut c = w.connect_ok(v5("empty-unsub"), w.at(0));
    let answer = c.send(&unsubscribe_bytes(ProtocolVersion::V5, &["", "q"]), w.at(1));
    assert_eq!(answer, DISCONNECT_MALFORMED, "{answer:02x?}");
    assert!(c.closed());
}

/// A filter that is well formed but outside this broker's limits is refused per filter
/// (SUBACK 0x8F Topic Filter invalid), not a protocol violation: the connection stays.
/// Conformance (5.0): [MQTT-3.8.4-6]
#[test]
fn v5_filter_over_the_level_limit_is_refused_per_filter_and_the_connection_stays() {
    let w = World {
        broker: Arc::new(Broker::new(MqttConfig {
            max_topic_levels: 2,
            ..MqttConfig::default()
        })),
        t0: Instant::now(),
    };
    let mut c = w.connect_ok(v5("deep"), w.at(0));
    let answer = c.send(
        &subscribe_bytes(ProtocolVersion::V5, &["a/b/c", "a/b"]),
        w.at(1),
    );
    // SUBACK, packet id 1, no properties, codes 0x8F and 0x01.
    assert_eq!(answer, [0x90, 0x05, 0x00, 0x01, 0x00, 0x8F, 0x01]);
    assert!(!c.closed());
}

// ---------------------------------------------------------------------------------------------
// 2. Taking over a session that ends with its connection
// ---------------------------------------------------------------------------------------------

/// A session with expiry 0 ends when its connection closes: a
/// connection that takes it over (clean start 0, expiry 60) gets a new session, Session
/// Present 0, and none of the old subscriptions.
/// Conformance (5.0): [MQTT-3.1.2-6] [MQTT-3.2.2-3]
#[test]
fn v5_taking_over_a_session_that_ends_with_its_connection_starts_a_new_one() {
    let w = World::new();
    let mut a = w.connect_ok(v5_session("x", true, 0), w.at(0));
    let suback = a.send(&subscribe_bytes(ProtocolVersion::V5, &["t"]), w.at(1));
    assert_eq!(packet_types(&suback), [9]);
    let (mut b, connack) = w.connect(v5_session("x", false, 60), w.at(2));
    // CONNACK: flags byte 0 (session present 0), reason 0.
    assert_eq!(
        &connack[..4],
        [0x20, connack[1], 0x00, 0x00],
        "{connack:02x?}"
    );
    let mut publisher = w.connect_ok(v5("pub"), w.at(3));
    publisher.send(&publish_bytes(ProtocolVersion::V5, "t", 0, b"m"), w.at(4));
    assert_eq!(
        b.receive(w.at(5)),
        [] as [u8; 0],
        "the old subscription delivered"
    );
    let old = a.receive(w.at(5));
    assert_eq!(old, [0xE0, 0x01, 0x8E], "the old connection is taken over");
}

/// The same for 3.1.1: a clean-session connection taken over by a
/// persistent one leaves no session behind (session present 0, no subscriptions).
/// Conformance (3.1.1): [MQTT-3.1.2-6] [MQTT-3.2.2-3]
#[test]
fn v311_taking_over_a_clean_session_starts_a_new_one() {
    let w = World::new();
    let mut a = w.connect_ok(v311("y", true), w.at(0));
    a.send(&subscribe_bytes(ProtocolVersion::V3_1_1, &["t"]), w.at(1));
    let (mut b, connack) = w.connect(v311("y", false), w.at(2));
    assert_eq!(connack, [0x20, 0x02, 0x00, 0x00], "{connack:02x?}");
    let mut publisher = w.connect_ok(v311("pub", true), w.at(3));
    publisher.send(
        &publish_bytes(ProtocolVersion::V3_1_1, "t", 0, b"m"),
        w.at(4),
    );
    assert_eq!(b.receive(w.at(5)), [] as [u8; 0]);
}

// ---------------------------------------------------------------------------------------------
// 3. A delayed will and a reconnect with clean start
// ---------------------------------------------------------------------------------------------

/// A new network connection for the client id before the will
/// delay has passed cancels the will, with clean start 1 as with 0 (the reading Mosquitto
/// takes too; docs/conformance.md says why).
/// Conformance (5.0): [MQTT-3.1.2-8] [MQTT-3.1.3-9]
#[test]
fn v5_reconnect_with_clean_start_within_the_will_delay_cancels_the_will() {
    let w = World::new();
    let mut watcher = w.connect_ok(v5("watcher"), w.at(0));
    watcher.send(&subscribe_bytes(ProtocolVersion::V5, &["wills/#"]), w.at(0));
    let mut connect = v5_session("dev", true, 30);
    connect.will = Some(Will {
        topic: ByteStr::from("wills/dev".to_owned()),
        payload: bytes::Bytes::from_static(b"gone"),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: Some(3),
            ..WillProperties::default()
        },
    });
    let mut dev = w.connect_ok(connect, w.at(0));
    dev.conn.handle_transport_closed(w.at(100));
    let _again = w.connect_ok(v5_session("dev", true, 30), w.at(1_000));
    assert_eq!(watcher.receive(w.at(1_000)), [] as [u8; 0]);
    w.broker.handle_timeout(w.at(10_000));
    assert_eq!(
        watcher.receive(w.at(10_000)),
        [] as [u8; 0],
        "the will was published"
    );
}

// ---------------------------------------------------------------------------------------------
// 5. Nothing larger than the client's Maximum Packet Size
// ---------------------------------------------------------------------------------------------

/// A CONNACK that does not fit the client's Maximum Packet Size is not sent:
/// the connection closes without it.
/// Conformance (5.0): [MQTT-3.1.2-24]
#[test]
fn v5_connack_larger_than_the_clients_maximum_packet_size_is_not_sent() {
    let w = World::new();
    let mut connect = v5("tiny");
    connect.properties.maximum_packet_size = Some(2);
    let (c, answer) = w.connect(connect, w.at(0));
    assert_eq!(answer, [] as [u8; 0], "{answer:02x?}");
    assert!(c.closed());
}

/// The limit holds for every packet: a CONNACK that fits is sent, a SUBACK
/// that does not fit closes the connection without being sent.
/// Conformance (5.0): [MQTT-3.1.2-24]
#[test]
fn v5_suback_larger_than_the_clients_maximum_packet_size_is_not_sent() {
    let w = World::new();
    let mut connect = v5("small");
    // The CONNACK (19 bytes) fits, a SUBACK with 20 reason codes (25 bytes) does not.
    connect.properties.maximum_packet_size = Some(20);
    let mut c = w.connect_ok(connect, w.at(0));
    let filters: Vec<String> = (b'a'..=b't').map(|c| char::from(c).to_string()).collect();
    let filters: Vec<&str> = filters.iter().map(String::as_str).collect();
    let answer = c.send(&subscribe_bytes(ProtocolVersion::V5, &filters), w.at(1));
    assert_eq!(answer, [] as [u8; 0], "{answer:02x?}");
    assert!(c.closed());
}

// ---------------------------------------------------------------------------------------------
// 6. Acknowledgements of the wrong type
// ---------------------------------------------------------------------------------------------

/// A subscriber that received one message at `qos` (packet id 1); returns it ready for its
/// acknowledgement.
fn receiving(w: &World, version: ProtocolVersion, qos: u8) -> Wire {
    let connect = Connect {
        protocol: version,
        ..v5("sub")
    };
    let mut sub = w.connect_ok(connect, w.at(0));
    let mut body = vec![0x00, 0x01];
    if version == ProtocolVersion::V5 {
        body.push(0x00);
    }
    body.extend_from_slice(&[0x00, 0x01, b'q', qos]);
    sub.send(&framed(0x82, &body), w.at(0));
    let mut publisher = w.connect_ok(v5("pub"), w.at(0));
    publisher.send(&publish_bytes(ProtocolVersion::V5, "q", qos, b"m"), w.at(1));
    publisher.send(&[0x62, 0x02, 0x00, 0x07], w.at(1)); // PUBREL, if QoS 2
    let delivered = sub.receive(w.at(2));
    assert_eq!(packet_types(&delivered), [3], "{delivered:02x?}");
    assert_eq!(delivered[0] & 0x06, qos << 1);
    sub
}

/// PUBREC for a QoS 1 delivery is a protocol error, not
/// answered with PUBREL.
/// Conformance (5.0): [MQTT-4.13.1-1]
#[test]
fn v5_pubrec_for_a_qos1_delivery_is_a_protocol_error() {
    let w = World::new();
    let mut sub = receiving(&w, ProtocolVersion::V5, 1);
    let answer = sub.send(&[0x50, 0x02, 0x00, 0x01], w.at(3));
    assert_eq!(answer, DISCONNECT_PROTOCOL_ERROR, "{answer:02x?}");
    assert!(sub.closed());
}

/// PUBCOMP for a QoS 1 delivery is a protocol error.
/// Conformance (5.0): [MQTT-4.13.1-1]
#[test]
fn v5_pubcomp_for_a_qos1_delivery_is_a_protocol_error() {
    let w = World::new();
    let mut sub = receiving(&w, ProtocolVersion::V5, 1);
    let answer = sub.send(&[0x70, 0x02, 0x00, 0x01], w.at(3));
    assert_eq!(answer, DISCONNECT_PROTOCOL_ERROR, "{answer:02x?}");
    assert!(sub.closed());
}

/// PUBACK or PUBCOMP for a QoS 2 delivery that was not PUBREC'ed is a protocol
/// error.
/// Conformance (5.0): [MQTT-4.13.1-1]
#[test]
fn v5_puback_or_pubcomp_before_pubrec_of_a_qos2_delivery_is_a_protocol_error() {
    for ack in [[0x40, 0x02, 0x00, 0x01], [0x70, 0x02, 0x00, 0x01]] {
        let w = World::new();
        let mut sub = receiving(&w, ProtocolVersion::V5, 2);
        let answer = sub.send(&ack, w.at(3));
        assert_eq!(
            answer, DISCONNECT_PROTOCOL_ERROR,
            "{ack:02x?}: {answer:02x?}"
        );
        assert!(sub.closed());
    }
}

/// After the broker's PUBREL only PUBCOMP completes the exchange: a PUBACK is a
/// protocol error.
/// Conformance (5.0): [MQTT-4.13.1-1]
#[test]
fn v5_puback_after_the_brokers_pubrel_is_a_protocol_error() {
    let w = World::new();
    let mut sub = receiving(&w, ProtocolVersion::V5, 2);
    let pubrel = sub.send(&[0x50, 0x02, 0x00, 0x01], w.at(3));
    assert_eq!(pubrel, [0x62, 0x02, 0x00, 0x01]);
    let answer = sub.send(&[0x40, 0x02, 0x00, 0x01], w.at(4));
    assert_eq!(answer, DISCONNECT_PROTOCOL_ERROR, "{answer:02x?}");
    assert!(sub.closed());
}

/// On 3.1.1 a wrong-type acknowledgement closes the connection (no DISCONNECT
/// from a 3.1.1 server).
/// Conformance (3.1.1): [MQTT-4.8.0-1]
#[test]
fn v311_pubrec_for_a_qos1_delivery_closes_the_connection() {
    let w = World::new();
    let mut sub = receiving(&w, ProtocolVersion::V3_1_1, 1);
    let answer = sub.send(&[0x50, 0x02, 0x00, 0x01], w.at(3));
    assert_eq!(answer, [] as [u8; 0], "{answer:02x?}");
    assert!(sub.closed());
}

/// The right acknowledgements still complete both exchanges and keep the connection.
#[test]
fn v5_right_acknowledgements_complete_qos1_and_qos2_deliveries() {
    let w = World::new();
    let mut sub = receiving(&w, ProtocolVersion::V5, 1);
    assert_eq!(sub.send(&[0x40, 0x02, 0x00, 0x01], w.at(3)), [] as [u8; 0]);
    assert!(!sub.closed());
    let w = World::new();
    let mut sub = receiving(&w, ProtocolVersion::V5, 2);
    assert_eq!(
        sub.send(&[0x50, 0x02, 0x00, 0x01], w.at(3)),
        [0x62, 0x02, 0x00, 0x01]
    );
    assert_eq!(sub.send(&[0x70, 0x02, 0x00, 0x01], w.at(4)), [] as [u8; 0]);
    assert!(!sub.closed());
}
