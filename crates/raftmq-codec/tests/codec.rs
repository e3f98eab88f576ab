//! Conformance tests of the codec: byte vectors from the MQTT 3.1, 3.1.1 and 5.0 specifications,
//! tables of malformed packets with the error and reason code each must produce, sans-IO framing,
//! encoder behaviour, and property-based round trips.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use raftmq_codec::*;

const V31: ProtocolVersion = ProtocolVersion::V3_1;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;
const V5: ProtocolVersion = ProtocolVersion::V5;
const ALL_VERSIONS: [ProtocolVersion; 3] = [V31, V311, V5];
const NO_LIMIT: u32 = u32::MAX;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn pid(id: u16) -> PacketId {
    PacketId::new(id).expect("test packet ids are nonzero")
}

fn s(text: &'static str) -> ByteStr {
    ByteStr::from_static(text)
}

fn b(bytes: &'static [u8]) -> Bytes {
    Bytes::from_static(bytes)
}

/// Concatenates byte string fragments, so vectors can be written field by field.
fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Decodes `bytes`, which must hold exactly one packet (or an error).
fn decode_exactly(bytes: &[u8], version: ProtocolVersion) -> Result<Packet, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let packet = decode(&mut buf, version, NO_LIMIT)?.expect("a complete packet");
    assert!(buf.is_empty(), "{} bytes left after the packet", buf.len());
    Ok(packet)
}

/// Encodes `packet`, checking that [`encoded_len`] predicted the size.
fn encode_to_vec(packet: &Packet, version: ProtocolVersion) -> Vec<u8> {
    let mut buf = BytesMut::new();
    encode(packet, version, &mut buf).expect("packet is encodable");
    assert_eq!(
        buf.len(),
        encoded_len(packet, version),
        "encoded_len of {packet:?}"
    );
    buf.to_vec()
}

/// Decodes every packet of `bytes` until the input is incomplete or invalid, and checks that each
/// decoded packet re-encodes to bytes that decode to the same packet.
fn decode_all_and_reencode(bytes: &[u8], version: ProtocolVersion, max_packet_size: u32) {
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some(packet)) = decode(&mut buf, version, max_packet_size) {
        let reencoded = encode_to_vec(&packet, version);
        assert_eq!(decode_exactly(&reencoded, version), Ok(packet));
    }
}

// ---------------------------------------------------------------------------------------------
// Byte vectors from the specifications
// ---------------------------------------------------------------------------------------------

struct Vector {
    name: &'static str,
    version: ProtocolVersion,
    bytes: Vec<u8>,
    packet: Packet,
}

fn user_property() -> UserProperties {
    vec![(s("k"), s("v"))]
}

fn publish(
    topic: &'static str,
    qos: QoS,
    packet_id: Option<u16>,
    payload: &'static [u8],
) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: s(topic),
        packet_id: packet_id.map(pid),
        properties: PublishProperties::default(),
        payload: b(payload),
    }
}

fn response(packet_id: u16, reason_code: ReasonCode) -> PubResponse {
    PubResponse {
        reason_code,
        ..PubResponse::success(pid(packet_id))
    }
}

fn reason_string(text: &'static str) -> ReasonProperties {
    ReasonProperties {
        reason_string: Some(s(text)),
        user_properties: Vec::new(),
    }
}

fn vectors() -> Vec<Vector> {
    let mut vectors = vec![
        Vector {
            name: "3.1.1 CONNECT with will, user name and password (variable header of §3.1.2.10)",
            version: V311,
            bytes: cat(&[
                b"\x10\x2F",
                b"\x00\x04MQTT\x04\xCE\x00\x0A", // level 4, flags 1100_1110, keep alive 10
                b"\x00\x06client",
                b"\x00\x0Awill/topic",
                b"\x00\x03bye",
                b"\x00\x04user",
                b"\x00\x04pass",
            ]),
            packet: Packet::Connect(Box::new(Connect {
                protocol: V311,
                clean_start: true,
                keep_alive: 10,
                client_id: s("client"),
                will: Some(Will {
                    topic: s("will/topic"),
                    payload: b(b"bye"),
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    properties: WillProperties::default(),
                }),
                username: Some(s("user")),
                password: Some(b(b"pass")),
                properties: ConnectProperties::default(),
            })),
        },
        Vector {
            name: "3.1 CONNECT (\"MQIsdp\", level 3)",
            version: V31,
            bytes: cat(&[
                b"\x10\x11",
                b"\x00\x06MQIsdp\x03\x02\x00\x3C",
                b"\x00\x03abc",
            ]),
            packet: Packet::Connect(Box::new(Connect {
                protocol: V31,
                clean_start: true,
                keep_alive: 60,
                client_id: s("abc"),
                will: None,
                username: None,
                password: None,
                properties: ConnectProperties::default(),
            })),
        },
        Vector {
            name: "5.0 CONNECT with properties (§3.1.2.11) and will properties",
            version: V5,
            bytes: cat(&[
                b"\x10\x33",
                b"\x00\x04MQTT\x05\xC6\x00\x0A", // level 5, flags 1100_0110, keep alive 10
                b"\x0F\x11\x00\x00\x00\x0A\x21\x00\x14\x26\x00\x01k\x00\x01v",
                b"\x00\x02c1",
                b"\x07\x18\x00\x00\x00\x05\x01\x01",
                b"\x00\x01w",
                b"\x00\x02hi",
                b"\x00\x01u",
                b"\x00\x01p",
            ]),
            packet: Packet::Connect(Box::new(Connect {
                protocol: V5,
                clean_start: true,
                keep_alive: 10,
                client_id: s("c1"),
                will: Some(Will {
                    topic: s("w"),
                    payload: b(b"hi"),
                    qos: QoS::AtMostOnce,
                    retain: false,
                    properties: WillProperties {
                        will_delay_interval: Some(5),
                        payload_format_indicator: Some(true),
                        ..WillProperties::default()
                    },
                }),
                username: Some(s("u")),
                password: Some(b(b"p")),
                properties: ConnectProperties {
                    session_expiry_interval: Some(10),
                    receive_maximum: Some(20),
                    user_properties: user_property(),
                    ..ConnectProperties::default()
                },
            })),
        },
        Vector {
            name: "3.1.1 CONNACK accepted with session present",
            version: V311,
            bytes: b"\x20\x02\x01\x00".to_vec(),
            packet: Packet::ConnAck(ConnAck {
                session_present: true,
                ..ConnAck::default()
            }),
        },
        Vector {
            name: "3.1 CONNACK return code 5 (not authorized)",
            version: V31,
            bytes: b"\x20\x02\x00\x05".to_vec(),
            packet: Packet::ConnAck(ConnAck {
                reason_code: ReasonCode::NOT_AUTHORIZED,
                ..ConnAck::default()
            }),
        },
        Vector {
            name: "5.0 CONNACK with properties",
            version: V5,
            bytes: cat(&[
                b"\x20\x0D\x00\x00\x0A",
                b"\x24\x01",
                b"\x12\x00\x02id",
                b"\x22\x00\x0A",
            ]),
            packet: Packet::ConnAck(ConnAck {
                session_present: false,
                reason_code: ReasonCode::SUCCESS,
                properties: ConnAckProperties {
                    maximum_qos: Some(QoS::AtLeastOnce),
                    assigned_client_identifier: Some(s("id")),
                    topic_alias_maximum: Some(10),
                    ..ConnAckProperties::default()
                },
            }),
        },
        Vector {
            name: "5.0 CONNACK refusing with 0x87",
            version: V5,
            bytes: b"\x20\x03\x00\x87\x00".to_vec(),
            packet: Packet::ConnAck(ConnAck {
                reason_code: ReasonCode::NOT_AUTHORIZED,
                ..ConnAck::default()
            }),
        },
        Vector {
            name: "3.1.1 PUBLISH QoS 1 (§3.3.2.3 example: topic a/b, packet id 10)",
            version: V311,
            bytes: cat(&[b"\x32\x0C", b"\x00\x03a/b", b"\x00\x0A", b"hello"]),
            packet: Packet::Publish(publish("a/b", QoS::AtLeastOnce, Some(10), b"hello")),
        },
        Vector {
            name: "3.1 PUBLISH QoS 0 retained",
            version: V31,
            bytes: cat(&[b"\x31\x07", b"\x00\x03a/b", b"hi"]),
            packet: Packet::Publish(Publish {
                retain: true,
                ..publish("a/b", QoS::AtMostOnce, None, b"hi")
            }),
        },
        Vector {
            name: "5.0 PUBLISH QoS 0 without properties",
            version: V5,
            bytes: cat(&[b"\x30\x08", b"\x00\x03a/b", b"\x00", b"hi"]),
            packet: Packet::Publish(publish("a/b", QoS::AtMostOnce, None, b"hi")),
        },
        Vector {
            name: "5.0 PUBLISH QoS 2, DUP, retained, with every PUBLISH property",
            version: V5,
            bytes: cat(&[
                b"\x3D\x2F",
                b"\x00\x03a/b",
                b"\x00\x0B",
                b"\x25",
                b"\x01\x01",             // payload format indicator: UTF-8
                b"\x02\x00\x00\x00\x3C", // message expiry interval 60
                b"\x23\x00\x05",         // topic alias 5
                b"\x08\x00\x03r/1",      // response topic
                b"\x09\x00\x02\xAB\xCD", // correlation data
                b"\x26\x00\x01k\x00\x01v",
                b"\x0B\x07",         // subscription identifier 7
                b"\x03\x00\x04text", // content type
                b"hi",
            ]),
            packet: Packet::Publish(Publish {
                dup: true,
                retain: true,
                properties: PublishProperties {
                    payload_format_indicator: Some(true),
                    message_expiry_interval: Some(60),
                    topic_alias: Some(5),
                    response_topic: Some(s("r/1")),
                    correlation_data: Some(b(b"\xAB\xCD")),
                    user_properties: user_property(),
                    subscription_identifiers: vec![7],
                    content_type: Some(s("text")),
                },
                ..publish("a/b", QoS::ExactlyOnce, Some(11), b"hi")
            }),
        },
        Vector {
            name: "5.0 PUBLISH with an empty topic and a topic alias",
            version: V5,
            bytes: cat(&[b"\x30\x07", b"\x00\x00", b"\x03\x23\x00\x01", b"x"]),
            packet: Packet::Publish(Publish {
                properties: PublishProperties {
                    topic_alias: Some(1),
                    ..PublishProperties::default()
                },
                ..publish("", QoS::AtMostOnce, None, b"x")
            }),
        },
        Vector {
            name: "3.1.1 PUBACK",
            version: V311,
            bytes: b"\x40\x02\x00\x0A".to_vec(),
            packet: Packet::PubAck(PubResponse::success(pid(10))),
        },
        Vector {
            name: "5.0 PUBACK short form (Success, no properties)",
            version: V5,
            bytes: b"\x40\x02\x00\x0A".to_vec(),
            packet: Packet::PubAck(PubResponse::success(pid(10))),
        },
        Vector {
            name: "5.0 PUBACK with a reason code and no properties",
            version: V5,
            bytes: b"\x40\x03\x00\x0A\x10".to_vec(),
            packet: Packet::PubAck(response(10, ReasonCode::NO_MATCHING_SUBSCRIBERS)),
        },
        Vector {
            name: "5.0 PUBREC with a reason code and a reason string",
            version: V5,
            bytes: cat(&[b"\x50\x0A\x00\x0A\x87", b"\x06\x1F\x00\x03why"]),
            packet: Packet::PubRec(PubResponse {
                properties: reason_string("why"),
                ..response(10, ReasonCode::NOT_AUTHORIZED)
            }),
        },
        Vector {
            name: "3.1.1 PUBREL (flags 0010)",
            version: V311,
            bytes: b"\x62\x02\x00\x0A".to_vec(),
            packet: Packet::PubRel(PubResponse::success(pid(10))),
        },
        Vector {
            name: "5.0 PUBREL packet identifier not found",
            version: V5,
            bytes: b"\x62\x03\x00\x0A\x92".to_vec(),
            packet: Packet::PubRel(response(10, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND)),
        },
        Vector {
            name: "3.1 PUBCOMP",
            version: V31,
            bytes: b"\x70\x02\x00\x0A".to_vec(),
            packet: Packet::PubComp(PubResponse::success(pid(10))),
        },
        Vector {
            name: "5.0 PUBCOMP short form",
            version: V5,
            bytes: b"\x70\x02\x00\x0A".to_vec(),
            packet: Packet::PubComp(PubResponse::success(pid(10))),
        },
        Vector {
            name: "3.1.1 SUBSCRIBE of a/b at QoS 1 and c/d at QoS 2 (§3.8.3 example)",
            version: V311,
            bytes: cat(&[b"\x82\x0E\x00\x0A", b"\x00\x03a/b\x01", b"\x00\x03c/d\x02"]),
            packet: Packet::Subscribe(Subscribe {
                packet_id: pid(10),
                properties: SubscribeProperties::default(),
                filters: vec![
                    SubscribeFilter {
                        filter: s("a/b"),
                        options: SubscriptionOptions {
                            qos: QoS::AtLeastOnce,
                            ..Default::default()
                        },
                    },
                    SubscribeFilter {
                        filter: s("c/d"),
                        options: SubscriptionOptions {
                            qos: QoS::ExactlyOnce,
                            ..Default::default()
                        },
                    },
                ],
            }),
        },
        Vector {
            name: "5.0 SUBSCRIBE with a subscription identifier and every option",
            version: V5,
            bytes: cat(&[
                b"\x82\x0F\x00\x0B",
                b"\x02\x0B\x05",    // subscription identifier 5
                b"\x00\x03a/+\x2D", // retain handling 2, retain as published, no local, QoS 1
                b"\x00\x01#\x12",   // retain handling 1, QoS 2
            ]),
            packet: Packet::Subscribe(Subscribe {
                packet_id: pid(11),
                properties: SubscribeProperties {
                    subscription_identifier: Some(5),
                    user_properties: Vec::new(),
                },
                filters: vec![
                    SubscribeFilter {
                        filter: s("a/+"),
                        options: SubscriptionOptions {
                            qos: QoS::AtLeastOnce,
                            no_local: true,
                            retain_as_published: true,
                            retain_handling: RetainHandling::DoNotSend,
                        },
                    },
                    SubscribeFilter {
                        filter: s("#"),
                        options: SubscriptionOptions {
                            qos: QoS::ExactlyOnce,
                            retain_handling: RetainHandling::SendIfNew,
                            ..Default::default()
                        },
                    },
                ],
            }),
        },
        Vector {
            name: "3.1.1 SUBACK granting QoS 0 and 2 and refusing one (§3.9.3 example)",
            version: V311,
            bytes: b"\x90\x05\x00\x0A\x00\x02\x80".to_vec(),
            packet: Packet::SubAck(SubAck {
                packet_id: pid(10),
                properties: ReasonProperties::default(),
                reason_codes: vec![
                    ReasonCode::GRANTED_QOS_0,
                    ReasonCode::GRANTED_QOS_2,
                    ReasonCode::UNSPECIFIED_ERROR,
                ],
            }),
        },
        Vector {
            name: "5.0 SUBACK with MQTT 5 reason codes",
            version: V5,
            bytes: b"\x90\x07\x00\x0A\x00\x00\x02\x8F\xA2".to_vec(),
            packet: Packet::SubAck(SubAck {
                packet_id: pid(10),
                properties: ReasonProperties::default(),
                reason_codes: vec![
                    ReasonCode::GRANTED_QOS_0,
                    ReasonCode::GRANTED_QOS_2,
                    ReasonCode::TOPIC_FILTER_INVALID,
                    ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
                ],
            }),
        },
        Vector {
            name: "3.1.1 UNSUBSCRIBE of a/b and c/d (§3.10.3 example)",
            version: V311,
            bytes: cat(&[b"\xA2\x0C\x00\x0B", b"\x00\x03a/b", b"\x00\x03c/d"]),
            packet: Packet::Unsubscribe(Unsubscribe {
                packet_id: pid(11),
                properties: Vec::new(),
                filters: vec![s("a/b"), s("c/d")],
            }),
        },
        Vector {
            name: "5.0 UNSUBSCRIBE with a user property",
            version: V5,
            bytes: cat(&[
                b"\xA2\x0F\x00\x0B",
                b"\x07\x26\x00\x01k\x00\x01v",
                b"\x00\x03a/b",
            ]),
            packet: Packet::Unsubscribe(Unsubscribe {
                packet_id: pid(11),
                properties: user_property(),
                filters: vec![s("a/b")],
            }),
        },
        Vector {
            name: "3.1.1 UNSUBACK",
            version: V311,
            bytes: b"\xB0\x02\x00\x0B".to_vec(),
            packet: Packet::UnsubAck(UnsubAck {
                packet_id: pid(11),
                properties: ReasonProperties::default(),
                reason_codes: Vec::new(),
            }),
        },
        Vector {
            name: "5.0 UNSUBACK with reason codes",
            version: V5,
            bytes: b"\xB0\x05\x00\x0B\x00\x00\x11".to_vec(),
            packet: Packet::UnsubAck(UnsubAck {
                packet_id: pid(11),
                properties: ReasonProperties::default(),
                reason_codes: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
            }),
        },
        Vector {
            name: "3.1.1 DISCONNECT",
            version: V311,
            bytes: b"\xE0\x00".to_vec(),
            packet: Packet::Disconnect(Disconnect::default()),
        },
        Vector {
            name: "5.0 DISCONNECT short form (normal disconnection)",
            version: V5,
            bytes: b"\xE0\x00".to_vec(),
            packet: Packet::Disconnect(Disconnect::default()),
        },
        Vector {
            name: "5.0 DISCONNECT with will message, reason code only",
            version: V5,
            bytes: b"\xE0\x01\x04".to_vec(),
            packet: Packet::Disconnect(Disconnect::with_code(
                ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
            )),
        },
        Vector {
            name: "5.0 DISCONNECT session taken over, with session expiry interval",
            version: V5,
            bytes: b"\xE0\x07\x8E\x05\x11\x00\x00\x0E\x10".to_vec(),
            packet: Packet::Disconnect(Disconnect {
                reason_code: ReasonCode::SESSION_TAKEN_OVER,
                properties: DisconnectProperties {
                    session_expiry_interval: Some(3600),
                    ..DisconnectProperties::default()
                },
            }),
        },
        Vector {
            name: "5.0 AUTH short form (success)",
            version: V5,
            bytes: b"\xF0\x00".to_vec(),
            packet: Packet::Auth(Auth::default()),
        },
        Vector {
            name: "5.0 AUTH continue authentication with method and data",
            version: V5,
            bytes: cat(&[
                b"\xF0\x0F\x18\x0D",
                b"\x15\x00\x05SCRAM",
                b"\x16\x00\x02\x01\x02",
            ]),
            packet: Packet::Auth(Auth {
                reason_code: ReasonCode::CONTINUE_AUTHENTICATION,
                properties: AuthProperties {
                    authentication_method: Some(s("SCRAM")),
                    authentication_data: Some(b(b"\x01\x02")),
                    ..AuthProperties::default()
                },
            }),
        },
        Vector {
            name: "5.0 AUTH re-authenticate with an empty property section",
            version: V5,
            bytes: b"\xF0\x02\x19\x00".to_vec(),
            packet: Packet::Auth(Auth {
                reason_code: ReasonCode::RE_AUTHENTICATE,
                properties: AuthProperties::default(),
            }),
        },
    ];
    for version in ALL_VERSIONS {
        vectors.push(Vector {
            name: "PINGREQ",
            version,
            bytes: b"\xC0\x00".to_vec(),
            packet: Packet::PingReq,
        });
        vectors.push(Vector {
            name: "PINGRESP",
            version,
            bytes: b"\xD0\x00".to_vec(),
            packet: Packet::PingResp,
        });
    }
    vectors
}

/// Conformance (3.1.1): [MQTT-2.2.2-1] [MQTT-3.1.3-1]
/// Conformance (5.0): [MQTT-2.2.2-1] [MQTT-3.1.3-1] [MQTT-3.2.2-1]
#[test]
fn spec_vectors_decode_to_their_packet_and_encode_back_to_the_same_bytes() {
    for vector in vectors() {
        let Vector {
            name,
            version,
            bytes,
            packet,
        } = vector;
        assert_eq!(
            decode_exactly(&bytes, version),
            Ok(packet.clone()),
            "decoding {name}"
        );
        assert_eq!(encode_to_vec(&packet, version), bytes, "encoding {name}");
    }
}

// ---------------------------------------------------------------------------------------------
// Malformed packets and protocol errors
// ---------------------------------------------------------------------------------------------

/// An invalid input: what it shows, the connection's version, its bytes, and the error expected.
type Case = (&'static str, ProtocolVersion, Vec<u8>, DecodeError);

/// Asserts that each case fails with its error, and that the error carries `reason`.
fn assert_rejected(reason: ReasonCode, cases: Vec<Case>) {
    for (name, version, bytes, error) in cases {
        let mut buf = BytesMut::from(&bytes[..]);
        assert_eq!(
            decode(&mut buf, version, NO_LIMIT),
            Err(error.clone()),
            "{name}"
        );
        assert_eq!(error.reason_code(), reason, "reason code for {name}");
    }
}

/// A CONNECT announcing protocol `name` and `level`, with `flags` and keep alive 60, then `rest`.
fn connect_bytes(name: &[u8], level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    let name_len = u8::try_from(name.len()).expect("short name");
    let body = cat(&[&[0, name_len], name, &[level, flags, 0x00, 0x3C], rest]);
    let remaining_len = u8::try_from(body.len()).expect("short test packet");
    cat(&[&[0x10, remaining_len], &body])
}

/// A v5 CONNECT with properties `properties` and client id "a".
fn v5_connect_with_properties(properties: &[u8]) -> Vec<u8> {
    let len = u8::try_from(properties.len()).expect("short test properties");
    connect_bytes(b"MQTT", 5, 0x02, &cat(&[&[len], properties, b"\x00\x01a"]))
}

/// A v5 QoS 0 PUBLISH to "a" with properties `properties` and no payload.
fn v5_publish_with_properties(properties: &[u8]) -> Vec<u8> {
    let len = u8::try_from(properties.len()).expect("short test properties");
    cat(&[&[0x30, 4 + len, 0x00, 0x01, b'a', len], properties])
}

/// A v5 CONNACK (success) with properties `properties`.
fn v5_connack_with_properties(properties: &[u8]) -> Vec<u8> {
    let len = u8::try_from(properties.len()).expect("short test properties");
    cat(&[&[0x20, 3 + len, 0x00, 0x00, len], properties])
}

const MALFORMED: ReasonCode = ReasonCode::MALFORMED_PACKET;
const PROTOCOL_ERROR: ReasonCode = ReasonCode::PROTOCOL_ERROR;

/// Conformance (3.1.1): [MQTT-2.2.2-1] [MQTT-3.3.1-2] [MQTT-3.3.1-4] [MQTT-3.6.1-1] [MQTT-3.8.1-1]
/// Conformance (3.1.1): [MQTT-3.10.1-1] [MQTT-3.14.1-1]
/// Conformance (5.0): [MQTT-1.5.5-1] [MQTT-2.1.3-1] [MQTT-3.3.1-2] [MQTT-3.3.1-4] [MQTT-3.6.1-1]
/// Conformance (5.0): [MQTT-3.8.1-1] [MQTT-3.10.1-1] [MQTT-3.14.1-1] [MQTT-3.15.1-1]
#[test]
#[rustfmt::skip]
fn fixed_header_violations_are_malformed() {
    use DecodeError::*;
    let flags = |packet_type, flags| InvalidFlags { packet_type, flags };
    assert_rejected(MALFORMED, vec![
        ("packet type 0",               V311, vec![0x00, 0x00], InvalidPacketType(0)),
        ("AUTH in 3.1.1",               V311, vec![0xF0, 0x00], InvalidPacketType(15)),
        ("AUTH in 3.1",                 V31,  vec![0xF0, 0x00], InvalidPacketType(15)),
        ("PUBREL with flags 0000",      V311, vec![0x60, 0x02, 0x00, 0x01], flags(PacketType::PubRel, 0)),
        ("SUBSCRIBE with flags 0000",   V5,   vec![0x80, 0x00], flags(PacketType::Subscribe, 0)),
        ("UNSUBSCRIBE with flags 0011", V311, vec![0xA3, 0x00], flags(PacketType::Unsubscribe, 3)),
        ("CONNECT with flags 0001",     V311, vec![0x11, 0x00], flags(PacketType::Connect, 1)),
        ("PINGREQ with flags 1000",     V311, vec![0xC8, 0x00], flags(PacketType::PingReq, 8)),
        ("DISCONNECT with flags 0010",  V5,   vec![0xE2, 0x00], flags(PacketType::Disconnect, 2)),
        ("3.1.1 DISCONNECT with flags 0001", V311, vec![0xE1, 0x00], flags(PacketType::Disconnect, 1)),
        ("AUTH with flags 0001",        V5,   vec![0xF1, 0x00], flags(PacketType::Auth, 1)),
        ("PUBLISH with QoS 3",          V311, vec![0x36, 0x00], InvalidQoS(3)),
        ("PUBLISH with DUP at QoS 0",   V5,   vec![0x38, 0x00], flags(PacketType::Publish, 8)),
        ("remaining length with a fifth byte",    V311, vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], MalformedRemainingLength),
        ("remaining length not in shortest form", V5,   vec![0xC0, 0x80, 0x00], MalformedRemainingLength),
    ]);
}

/// MQTT 3.1 sends PUBREL, SUBSCRIBE and UNSUBSCRIBE at QoS 1 and sets DUP when it resends them
/// (3.1 §3.6, §3.8, §3.10); the reserved-flags rule of 3.1.1 and 5.0 does not apply to level 3.
#[test]
fn mqtt_3_1_pubrel_subscribe_and_unsubscribe_may_carry_dup() {
    let subscribe = Packet::Subscribe(Subscribe {
        packet_id: pid(1),
        properties: SubscribeProperties::default(),
        filters: vec![SubscribeFilter {
            filter: s("a"),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..SubscriptionOptions::default()
            },
        }],
    });
    let unsubscribe = Packet::Unsubscribe(Unsubscribe {
        packet_id: pid(1),
        properties: UserProperties::default(),
        filters: vec![s("a")],
    });
    let pubrel = Packet::PubRel(PubResponse::success(pid(1)));
    for first in [0x02, 0x0A] {
        let cases = [
            (&[0x60 | first, 0x02, 0x00, 0x01][..], &pubrel),
            (
                &[0x80 | first, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x01][..],
                &subscribe,
            ),
            (
                &[0xA0 | first, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'][..],
                &unsubscribe,
            ),
        ];
        for (bytes, packet) in cases {
            assert_eq!(
                decode_exactly(bytes, V31).as_ref(),
                Ok(packet),
                "3.1 {bytes:02x?}"
            );
        }
    }
}

/// The DUP bit (and any flags other than 0010) on PUBREL, SUBSCRIBE and UNSUBSCRIBE
/// stay malformed at levels 4 and 5, and level 3 accepts only 0010 and 1010.
/// Conformance (3.1.1): [MQTT-2.2.2-1] [MQTT-3.6.1-1] [MQTT-3.8.1-1]
/// Conformance (5.0): [MQTT-2.1.3-1] [MQTT-3.6.1-1] [MQTT-3.8.1-1]
#[test]
#[rustfmt::skip]
fn pubrel_subscribe_and_unsubscribe_flags_are_strict_except_dup_in_3_1() {
    use DecodeError::*;
    let flags = |packet_type, flags| InvalidFlags { packet_type, flags };
    assert_rejected(MALFORMED, vec![
        ("3.1.1 PUBREL with DUP",      V311, vec![0x6A, 0x02, 0x00, 0x01], flags(PacketType::PubRel, 0x0A)),
        ("5.0 PUBREL with DUP",        V5,   vec![0x6A, 0x02, 0x00, 0x01], flags(PacketType::PubRel, 0x0A)),
        ("3.1.1 SUBSCRIBE with DUP",   V311, vec![0x8A, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x01], flags(PacketType::Subscribe, 0x0A)),
        ("5.0 SUBSCRIBE with DUP",     V5,   vec![0x8A, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x01], flags(PacketType::Subscribe, 0x0A)),
        ("3.1.1 UNSUBSCRIBE with DUP", V311, vec![0xAA, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'], flags(PacketType::Unsubscribe, 0x0A)),
        ("5.0 UNSUBSCRIBE with DUP",   V5,   vec![0xAA, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, b'a'], flags(PacketType::Unsubscribe, 0x0A)),
        ("3.1 PUBREL with flags 0000", V31,  vec![0x60, 0x02, 0x00, 0x01], flags(PacketType::PubRel, 0x00)),
        ("3.1 PUBREL with DUP at QoS 0", V31, vec![0x68, 0x02, 0x00, 0x01], flags(PacketType::PubRel, 0x08)),
        ("3.1 SUBSCRIBE with QoS 2",   V31,  vec![0x84, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x01], flags(PacketType::Subscribe, 0x04)),
        ("3.1 UNSUBSCRIBE with RETAIN", V31, vec![0xA3, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'], flags(PacketType::Unsubscribe, 0x03)),
    ]);
}

#[test]
fn fixed_header_errors_are_reported_from_the_first_byte_alone() {
    for (first, version) in [
        (0x00, V311),
        (0xF0, V311),
        (0x60, V5),
        (0x36, V5),
        (0x38, V311),
    ] {
        let mut buf = BytesMut::from(&[first][..]);
        assert!(
            decode(&mut buf, version, NO_LIMIT).is_err(),
            "first byte {first:#04x}"
        );
    }
}

/// Conformance (3.1.1): [MQTT-2.3.1-1] [MQTT-3.1.3-3]
/// Conformance (5.0): [MQTT-3.1.3-3]
#[test]
#[rustfmt::skip]
fn packet_bodies_must_be_consumed_exactly() {
    use DecodeError::*;
    assert_rejected(MALFORMED, vec![
        ("PINGREQ with a body",             V311, vec![0xC0, 0x01, 0x00], TrailingBytes(1)),
        ("PINGRESP with a body",            V5,   vec![0xD0, 0x01, 0x00], TrailingBytes(1)),
        ("3.1.1 DISCONNECT with a body",    V311, vec![0xE0, 0x01, 0x00], TrailingBytes(1)),
        ("3.1 DISCONNECT with a body",      V31,  vec![0xE0, 0x01, 0x00], TrailingBytes(1)),
        ("3.1.1 PUBACK with a reason code", V311, vec![0x40, 0x03, 0x00, 0x01, 0x00], TrailingBytes(1)),
        ("3.1.1 CONNACK with properties",   V311, vec![0x20, 0x03, 0x00, 0x00, 0x00], TrailingBytes(1)),
        ("3.1.1 UNSUBACK with a payload",   V311, vec![0xB0, 0x03, 0x00, 0x01, 0x00], TrailingBytes(1)),
        ("CONNECT with bytes after the payload", V311, connect_bytes(b"MQTT", 4, 0x02, b"\x00\x01a\x00"), TrailingBytes(1)),
        ("PUBACK shorter than a packet id", V311, vec![0x40, 0x01, 0x00], Truncated { needed: 1 }),
        ("topic longer than the packet",    V311, vec![0x30, 0x03, 0x00, 0x05, b'a'], Truncated { needed: 4 }),
        ("CONNECT without a client id",     V311, connect_bytes(b"MQTT", 4, 0x02, b""), Truncated { needed: 2 }),
        ("5.0 CONNECT without a client id", V5,   connect_bytes(b"MQTT", 5, 0x02, b"\x00"), Truncated { needed: 2 }),
        ("property section longer than the packet", V5, vec![0x40, 0x05, 0x00, 0x01, 0x80, 0x05, 0x1F], Truncated { needed: 4 }),
        ("property value crossing the end of the property section",
            V5, vec![0x30, 0x07, 0x00, 0x01, b'a', 0x02, 0x02, 0x00, 0x00], Truncated { needed: 3 }),
        ("packet id 0 in PUBACK",           V311, vec![0x40, 0x02, 0x00, 0x00], ZeroPacketId),
        ("packet id 0 in QoS 1 PUBLISH",    V5,   vec![0x32, 0x06, 0x00, 0x01, b'a', 0x00, 0x00, 0x00], ZeroPacketId),
        ("packet id 0 in SUBSCRIBE",        V311, vec![0x82, 0x06, 0x00, 0x00, 0x00, 0x01, b'a', 0x00], ZeroPacketId),
    ]);
}

/// Conformance (3.1.1): [MQTT-1.5.3-1] [MQTT-1.5.3-2] [MQTT-3.1.3-4] [MQTT-3.1.3-10]
/// Conformance (3.1.1): [MQTT-3.1.3-11] [MQTT-3.3.2-1] [MQTT-3.3.2-2] [MQTT-3.8.3-1]
/// Conformance (3.1.1): [MQTT-3.10.3-1] [MQTT-4.7.1-1] [MQTT-4.7.3-1] [MQTT-4.7.3-2]
/// Conformance (5.0): [MQTT-1.5.4-1] [MQTT-1.5.4-2] [MQTT-1.5.7-1] [MQTT-3.1.3-4] [MQTT-3.1.3-11]
/// Conformance (5.0): [MQTT-3.1.3-12] [MQTT-3.3.2-1] [MQTT-3.3.2-2] [MQTT-3.3.2-13] [MQTT-3.3.2-14]
/// Conformance (5.0): [MQTT-3.3.2-19] [MQTT-3.8.3-1] [MQTT-3.10.3-1] [MQTT-4.7.0-1] [MQTT-4.7.3-1]
/// Conformance (5.0): [MQTT-4.7.3-2]
#[test]
#[rustfmt::skip]
fn invalid_strings_and_topic_names_are_rejected() {
    use DecodeError::*;
    assert_rejected(MALFORMED, vec![
        ("invalid UTF-8",             V311, vec![0x30, 0x04, 0x00, 0x02, 0xC3, 0x28], InvalidUtf8),
        ("UTF-16 surrogate in UTF-8", V311, vec![0x30, 0x05, 0x00, 0x03, 0xED, 0xA0, 0x80], InvalidUtf8),
        ("overlong encoding of '/'",  V5,   vec![0x30, 0x05, 0x00, 0x02, 0xC0, 0xAF, 0x00], InvalidUtf8),
        ("U+0000 in a topic",         V311, vec![0x30, 0x03, 0x00, 0x01, 0x00], NullCharacter),
        ("U+0000 in a client id",     V311, connect_bytes(b"MQTT", 4, 0x02, b"\x00\x02a\x00"), NullCharacter),
        ("invalid UTF-8 in a user name", V311, connect_bytes(b"MQTT", 4, 0x82, b"\x00\x01a\x00\x01\xFF"), InvalidUtf8),
        ("invalid UTF-8 in a topic filter", V311, vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, 0xFF, 0x00], InvalidUtf8),
        ("invalid UTF-8 in an unsubscribe filter", V311, vec![0xA2, 0x05, 0x00, 0x01, 0x00, 0x01, 0xFF], InvalidUtf8),
        ("invalid UTF-8 in a 5.0 topic filter", V5, vec![0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, 0xFF, 0x00], InvalidUtf8),
        ("invalid UTF-8 in a 5.0 unsubscribe filter", V5, vec![0xA2, 0x06, 0x00, 0x01, 0x00, 0x00, 0x01, 0xFF], InvalidUtf8),
        ("invalid UTF-8 in a 5.0 client id", V5, connect_bytes(b"MQTT", 5, 0x02, b"\x00\x00\x01\xFF"), InvalidUtf8),
        ("invalid UTF-8 in a 5.0 will topic", V5, connect_bytes(b"MQTT", 5, 0x06, b"\x00\x00\x01a\x00\x00\x01\xFF\x00\x00"), InvalidUtf8),
        ("invalid UTF-8 in a 5.0 user name", V5, connect_bytes(b"MQTT", 5, 0x82, b"\x00\x00\x01a\x00\x01\xFF"), InvalidUtf8),
        ("invalid UTF-8 in a response topic", V5, v5_publish_with_properties(b"\x08\x00\x01\xFF"), InvalidUtf8),
        ("invalid UTF-8 in a content type", V5, v5_publish_with_properties(b"\x03\x00\x01\xFF"), InvalidUtf8),
        ("invalid UTF-8 in a client id", V311, connect_bytes(b"MQTT", 4, 0x02, b"\x00\x01\xFF"), InvalidUtf8),
        ("invalid UTF-8 in a will topic", V311, connect_bytes(b"MQTT", 4, 0x06, b"\x00\x01a\x00\x01\xFF\x00\x00"), InvalidUtf8),
        ("invalid UTF-8 in a user property", V5, v5_publish_with_properties(b"\x26\x00\x01\xFF\x00\x00"), InvalidUtf8),
    ]);
    assert_rejected(ReasonCode::TOPIC_NAME_INVALID, vec![
        ("'+' in a topic name",          V311, vec![0x30, 0x05, 0x00, 0x03, b'a', b'/', b'+'], WildcardInTopicName),
        ("'#' in a topic name",          V5,   vec![0x30, 0x04, 0x00, 0x01, b'#', 0x00], WildcardInTopicName),
        ("wildcard in a response topic", V5,   v5_publish_with_properties(b"\x08\x00\x01#"), WildcardInTopicName),
    ]);
    assert_rejected(PROTOCOL_ERROR, vec![
        ("empty topic in 3.1.1", V311, vec![0x30, 0x02, 0x00, 0x00], EmptyTopicName),
        ("empty topic in 3.1",   V31,  vec![0x32, 0x04, 0x00, 0x00, 0x00, 0x01], EmptyTopicName),
        ("empty topic without a topic alias in 5.0", V5, vec![0x30, 0x03, 0x00, 0x00, 0x00], EmptyTopicName),
    ]);
}

/// Conformance (3.1.1): [MQTT-3.1.2-1] [MQTT-3.1.2-3] [MQTT-3.1.2-11] [MQTT-3.1.2-13]
/// Conformance (3.1.1): [MQTT-3.1.2-14] [MQTT-3.1.2-15] [MQTT-3.1.2-22]
/// Conformance (5.0): [MQTT-3.1.2-1] [MQTT-3.1.2-3] [MQTT-3.1.2-11] [MQTT-3.1.2-12] [MQTT-3.1.2-13]
/// Conformance (5.0): [MQTT-3.1.4-1]
#[test]
#[rustfmt::skip]
fn connect_violations_are_rejected() {
    use DecodeError::*;
    let client = b"\x00\x01a";
    assert_rejected(ReasonCode::UNSUPPORTED_PROTOCOL_VERSION, vec![
        ("name MQTT with level 3",   V311, connect_bytes(b"MQTT", 3, 0x02, client), UnsupportedProtocolVersion(3)),
        ("name MQIsdp with level 4", V311, connect_bytes(b"MQIsdp", 4, 0x02, client), UnsupportedProtocolVersion(4)),
        ("level 6",                  V5,   connect_bytes(b"MQTT", 6, 0x02, client), UnsupportedProtocolVersion(6)),
    ]);
    assert_rejected(MALFORMED, vec![
        ("unknown protocol name",         V311, connect_bytes(b"MQTX", 4, 0x02, client), InvalidProtocolName),
        ("lower-case protocol name",      V311, connect_bytes(b"mqtt", 4, 0x02, client), InvalidProtocolName),
        ("reserved flag set",             V311, connect_bytes(b"MQTT", 4, 0x03, client), InvalidConnectFlags(0x03)),
        ("reserved flag set in 5.0",      V5,   connect_bytes(b"MQTT", 5, 0x03, b"\x00\x00\x01a"), InvalidConnectFlags(0x03)),
        ("will QoS 3",                    V311, connect_bytes(b"MQTT", 4, 0x1E, client), InvalidQoS(3)),
        ("will QoS 3 in 5.0",             V5,   connect_bytes(b"MQTT", 5, 0x1E, b"\x00\x00\x01a"), InvalidQoS(3)),
        ("will QoS without will flag in 5.0",    V5, connect_bytes(b"MQTT", 5, 0x0A, b"\x00\x00\x01a"), InvalidConnectFlags(0x0A)),
        ("will retain without will flag in 5.0", V5, connect_bytes(b"MQTT", 5, 0x22, b"\x00\x00\x01a"), InvalidConnectFlags(0x22)),
        ("will QoS without will flag",    V311, connect_bytes(b"MQTT", 4, 0x0A, client), InvalidConnectFlags(0x0A)),
        ("will retain without will flag", V311, connect_bytes(b"MQTT", 4, 0x22, client), InvalidConnectFlags(0x22)),
        ("password without user name in 3.1.1",
            V311, connect_bytes(b"MQTT", 4, 0x42, b"\x00\x01a\x00\x01p"), InvalidConnectFlags(0x42)),
        ("password without user name in 3.1",
            V31, connect_bytes(b"MQIsdp", 3, 0x42, b"\x00\x01a\x00\x01p"), InvalidConnectFlags(0x42)),
    ]);
    assert_rejected(ReasonCode::TOPIC_NAME_INVALID, vec![
        ("wildcard in the will topic", V311, connect_bytes(b"MQTT", 4, 0x06, b"\x00\x01a\x00\x03a/#\x00\x00"), WildcardInTopicName),
    ]);
    assert_rejected(PROTOCOL_ERROR, vec![
        ("empty will topic", V311, connect_bytes(b"MQTT", 4, 0x06, b"\x00\x01a\x00\x00\x00\x00"), EmptyTopicName),
        ("authentication data without a method",
            V5, v5_connect_with_properties(b"\x16\x00\x01\xAA"), AuthenticationDataWithoutMethod),
        ("session expiry interval in the will properties",
            V5, connect_bytes(b"MQTT", 5, 0x06, b"\x00\x00\x01a\x05\x11\x00\x00\x00\x01\x00\x01w\x00\x00"),
            PropertyNotAllowed { id: 0x11, packet_type: PacketType::Connect }),
    ]);
}

/// Conformance (5.0): [MQTT-1.5.5-1]
#[test]
#[rustfmt::skip]
fn property_violations_are_rejected() {
    use DecodeError::*;
    let not_allowed = |id, packet_type| PropertyNotAllowed { id, packet_type };
    assert_rejected(MALFORMED, vec![
        ("unknown property id",     V5, v5_publish_with_properties(b"\x04\x00"), InvalidPropertyId(0x04)),
        ("property id 0",           V5, v5_publish_with_properties(b"\x00\x00"), InvalidPropertyId(0x00)),
        ("multi-byte property id",  V5, v5_publish_with_properties(b"\x81\x01"), InvalidPropertyId(0x81)),
        ("subscription identifier with a fifth byte",
            V5, v5_publish_with_properties(b"\x0B\xFF\xFF\xFF\xFF\x01"), MalformedVarInt),
        ("property length with a fifth byte",
            V5, vec![0x30, 0x08, 0x00, 0x01, b'a', 0xFF, 0xFF, 0xFF, 0xFF, 0x01], MalformedVarInt),
        ("property length not in shortest form", V5, vec![0x30, 0x05, 0x00, 0x01, b'a', 0x80, 0x00], MalformedVarInt),
    ]);
    assert_rejected(PROTOCOL_ERROR, vec![
        ("reason string in PUBLISH", V5, v5_publish_with_properties(b"\x1F\x00\x00"), not_allowed(0x1F, PacketType::Publish)),
        ("topic alias in CONNECT",   V5, v5_connect_with_properties(b"\x23\x00\x01"), not_allowed(0x23, PacketType::Connect)),
        ("session expiry interval in AUTH",
            V5, vec![0xF0, 0x07, 0x18, 0x05, 0x11, 0x00, 0x00, 0x00, 0x01], not_allowed(0x11, PacketType::Auth)),
        ("reason string in UNSUBSCRIBE",
            V5, vec![0xA2, 0x09, 0x00, 0x01, 0x03, 0x1F, 0x00, 0x00, 0x00, 0x01, b'a'], not_allowed(0x1F, PacketType::Unsubscribe)),
        ("server reference in PUBACK",
            V5, vec![0x40, 0x07, 0x00, 0x01, 0x80, 0x03, 0x1C, 0x00, 0x00], not_allowed(0x1C, PacketType::PubAck)),
        ("message expiry interval twice",
            V5, v5_publish_with_properties(b"\x02\x00\x00\x00\x01\x02\x00\x00\x00\x02"), DuplicateProperty(0x02)),
        ("reason string twice",
            V5, vec![0x40, 0x0B, 0x00, 0x01, 0x80, 0x07, 0x1F, 0x00, 0x01, b'a', 0x1F, 0x00, 0x00], DuplicateProperty(0x1F)),
        ("two subscription identifiers in SUBSCRIBE",
            V5, vec![0x82, 0x0B, 0x00, 0x01, 0x04, 0x0B, 0x01, 0x0B, 0x02, 0x00, 0x01, b'a', 0x00], DuplicateProperty(0x0B)),
        ("subscription identifier 0",
            V5, vec![0x82, 0x09, 0x00, 0x01, 0x02, 0x0B, 0x00, 0x00, 0x01, b'a', 0x00], InvalidPropertyValue(0x0B)),
        ("payload format indicator 2",          V5, v5_publish_with_properties(b"\x01\x02"), InvalidPropertyValue(0x01)),
        ("request problem information 2",       V5, v5_connect_with_properties(b"\x17\x02"), InvalidPropertyValue(0x17)),
        ("request response information 2",      V5, v5_connect_with_properties(b"\x19\x02"), InvalidPropertyValue(0x19)),
        ("receive maximum 0",                   V5, v5_connect_with_properties(b"\x21\x00\x00"), InvalidPropertyValue(0x21)),
        ("maximum packet size 0",               V5, v5_connect_with_properties(b"\x27\x00\x00\x00\x00"), InvalidPropertyValue(0x27)),
        ("maximum QoS 2",                       V5, v5_connack_with_properties(b"\x24\x02"), InvalidPropertyValue(0x24)),
        ("retain available 2",                  V5, v5_connack_with_properties(b"\x25\x02"), InvalidPropertyValue(0x25)),
        ("wildcard subscription available 2",   V5, v5_connack_with_properties(b"\x28\x02"), InvalidPropertyValue(0x28)),
        ("subscription identifiers available 2", V5, v5_connack_with_properties(b"\x29\x02"), InvalidPropertyValue(0x29)),
        ("shared subscription available 2",     V5, v5_connack_with_properties(b"\x2A\x02"), InvalidPropertyValue(0x2A)),
    ]);
    assert_rejected(ReasonCode::TOPIC_ALIAS_INVALID, vec![
        ("topic alias 0", V5, v5_publish_with_properties(b"\x23\x00\x00"), InvalidPropertyValue(0x23)),
    ]);
}

/// Conformance (3.1.1): [MQTT-3.8.3-3] [MQTT-3.8.3-4] [MQTT-3.10.3-2]
/// Conformance (5.0): [MQTT-3.8.3-2] [MQTT-3.8.3-5] [MQTT-3.10.3-2]
#[test]
#[rustfmt::skip]
fn subscribe_and_unsubscribe_violations_are_rejected() {
    use DecodeError::*;
    assert_rejected(PROTOCOL_ERROR, vec![
        ("SUBSCRIBE without filters",     V311, vec![0x82, 0x02, 0x00, 0x01], NoTopicFilters(PacketType::Subscribe)),
        ("5.0 SUBSCRIBE without filters", V5,   vec![0x82, 0x03, 0x00, 0x01, 0x00], NoTopicFilters(PacketType::Subscribe)),
        ("UNSUBSCRIBE without filters",   V311, vec![0xA2, 0x02, 0x00, 0x01], NoTopicFilters(PacketType::Unsubscribe)),
        ("5.0 UNSUBSCRIBE without filters", V5, vec![0xA2, 0x03, 0x00, 0x01, 0x00], NoTopicFilters(PacketType::Unsubscribe)),
    ]);
    assert_rejected(MALFORMED, vec![
        ("3.1.1 options with a no-local bit", V311, vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x04], InvalidSubscriptionOptions(0x04)),
        ("3.1 options with the top bit",      V31,  vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x80], InvalidSubscriptionOptions(0x80)),
        ("3.1.1 QoS 3",                       V311, vec![0x82, 0x06, 0x00, 0x01, 0x00, 0x01, b'a', 0x03], InvalidQoS(3)),
        ("5.0 options with reserved bit 6",   V5,   vec![0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x40], InvalidSubscriptionOptions(0x40)),
        ("5.0 retain handling 3",             V5,   vec![0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x30], InvalidSubscriptionOptions(0x30)),
        ("5.0 QoS 3",                         V5,   vec![0x82, 0x07, 0x00, 0x01, 0x00, 0x00, 0x01, b'a', 0x03], InvalidQoS(3)),
        ("filter without options",            V311, vec![0x82, 0x05, 0x00, 0x01, 0x00, 0x01, b'a'], Truncated { needed: 1 }),
    ]);
}

#[test]
#[rustfmt::skip]
fn reason_codes_not_allowed_in_a_packet_are_malformed() {
    use DecodeError::*;
    let invalid = |code, packet_type| InvalidReasonCode { code, packet_type };
    assert_rejected(MALFORMED, vec![
        ("PUBACK with 0x92",            V5,   vec![0x40, 0x03, 0x00, 0x01, 0x92], invalid(0x92, PacketType::PubAck)),
        ("PUBREC with 0x92",            V5,   vec![0x50, 0x03, 0x00, 0x01, 0x92], invalid(0x92, PacketType::PubRec)),
        ("PUBREL with 0x10",            V5,   vec![0x62, 0x03, 0x00, 0x01, 0x10], invalid(0x10, PacketType::PubRel)),
        ("PUBCOMP with 0x80",           V5,   vec![0x70, 0x03, 0x00, 0x01, 0x80], invalid(0x80, PacketType::PubComp)),
        ("3.1.1 CONNACK return code 6", V311, vec![0x20, 0x02, 0x00, 0x06], invalid(6, PacketType::ConnAck)),
        ("5.0 CONNACK with 0x04",       V5,   vec![0x20, 0x03, 0x00, 0x04, 0x00], invalid(4, PacketType::ConnAck)),
        ("3.1.1 SUBACK with 0x03",      V311, vec![0x90, 0x03, 0x00, 0x01, 0x03], invalid(3, PacketType::SubAck)),
        ("5.0 SUBACK with 0x11",        V5,   vec![0x90, 0x04, 0x00, 0x01, 0x00, 0x11], invalid(0x11, PacketType::SubAck)),
        ("5.0 UNSUBACK with 0x01",      V5,   vec![0xB0, 0x04, 0x00, 0x01, 0x00, 0x01], invalid(1, PacketType::UnsubAck)),
        ("DISCONNECT with 0x84",        V5,   vec![0xE0, 0x01, 0x84], invalid(0x84, PacketType::Disconnect)),
        ("DISCONNECT with 0x05",        V5,   vec![0xE0, 0x01, 0x05], invalid(0x05, PacketType::Disconnect)),
        ("AUTH with 0x87",              V5,   vec![0xF0, 0x02, 0x87, 0x00], invalid(0x87, PacketType::Auth)),
        ("CONNACK with reserved acknowledge flags", V311, vec![0x20, 0x02, 0x02, 0x00], InvalidConnAckFlags(2)),
        ("AUTH with a reason code but no property length", V5, vec![0xF0, 0x01, 0x18], Truncated { needed: 1 }),
    ]);
}

/// Conformance (3.1.1): [MQTT-3.1.2-9] [MQTT-3.1.2-18] [MQTT-3.1.2-19] [MQTT-3.1.2-20]
/// Conformance (3.1.1): [MQTT-3.1.2-21]
/// Conformance (5.0): [MQTT-3.1.2-9] [MQTT-3.1.2-16] [MQTT-3.1.2-17] [MQTT-3.1.2-18]
/// Conformance (5.0): [MQTT-3.1.2-19]
#[test]
fn connect_payload_fields_must_be_present_exactly_when_their_flags_say_so() {
    // (name, level, flags, payload after the variable header)
    let cases: [(&str, u8, u8, &[u8]); 10] = [
        ("will flag without will topic", 4, 0x06, b"\x00\x01a"),
        ("user name flag without user name", 4, 0x82, b"\x00\x01a"),
        (
            "password flag without password",
            4,
            0xC2,
            b"\x00\x01a\x00\x01u",
        ),
        ("user name without its flag", 4, 0x02, b"\x00\x01a\x00\x01u"),
        (
            "password without its flag",
            4,
            0x82,
            b"\x00\x01a\x00\x01u\x00\x01p",
        ),
        (
            "will flag without will properties",
            5,
            0x06,
            b"\x00\x00\x01a",
        ),
        (
            "user name flag without user name",
            5,
            0x82,
            b"\x00\x00\x01a",
        ),
        ("password flag without password", 5, 0x42, b"\x00\x00\x01a"),
        (
            "user name without its flag",
            5,
            0x02,
            b"\x00\x00\x01a\x00\x01u",
        ),
        (
            "password without its flag",
            5,
            0x82,
            b"\x00\x00\x01a\x00\x01u\x00\x01p",
        ),
    ];
    for (name, level, flags, payload) in cases {
        let version = if level == 5 { V5 } else { V311 };
        let error = decode_exactly(&connect_bytes(b"MQTT", level, flags, payload), version)
            .expect_err(name);
        assert!(
            matches!(
                error,
                DecodeError::Truncated { .. } | DecodeError::TrailingBytes(_)
            ),
            "level {level}, {name}: {error:?}"
        );
        assert_eq!(error.reason_code(), MALFORMED, "level {level}, {name}");
    }
}

/// Conformance (3.1.1): [MQTT-1.5.3-3]
/// Conformance (5.0): [MQTT-1.5.4-3]
#[test]
fn a_byte_order_mark_in_a_string_is_kept() {
    for version in [V311, V5] {
        let properties: &[u8] = if version.is_v5() { &[0x00] } else { &[] };
        let bytes = cat(&[
            &[0x30, 0x06 + properties.len() as u8, 0x00, 0x04],
            b"\xEF\xBB\xBFa",
            properties,
        ]);
        let Ok(Packet::Publish(publish)) = decode_exactly(&bytes, version) else {
            panic!("{version:?}: rejected")
        };
        assert_eq!(publish.topic, "\u{FEFF}a", "{version:?}");
        assert_eq!(encode_to_vec(&Packet::Publish(publish), version), bytes);
    }
}

/// Conformance (3.1.1): [MQTT-3.1.2-22]
#[test]
fn password_without_username_is_malformed_in_v311_but_allowed_in_v5() {
    let v311 = connect_bytes(b"MQTT", 4, 0x42, b"\x00\x01a\x00\x01p");
    assert_eq!(
        decode_exactly(&v311, V311),
        Err(DecodeError::InvalidConnectFlags(0x42))
    );

    let v5 = connect_bytes(b"MQTT", 5, 0x42, b"\x00\x00\x01a\x00\x01p");
    let Ok(Packet::Connect(connect)) = decode_exactly(&v5, V5) else {
        panic!("5.0 CONNECT rejected")
    };
    assert_eq!((connect.username, connect.password), (None, Some(b(b"p"))));
}

/// Conformance (3.1.1): [MQTT-3.1.2-2]
#[test]
fn unsupported_protocol_level_is_reported_before_the_rest_of_connect_is_parsed() {
    // Whatever follows the level (here a reserved flag and no payload), the broker must be able
    // to answer CONNACK 0x84 (5.0) or return code 1 (3.x).
    let error = decode_exactly(&connect_bytes(b"MQTT", 7, 0xFF, b""), V311).expect_err("level 7");
    assert_eq!(error, DecodeError::UnsupportedProtocolVersion(7));
    assert_eq!(
        error.reason_code(),
        ReasonCode::UNSUPPORTED_PROTOCOL_VERSION
    );
    assert_eq!(error.reason_code().to_v3_connack(), 1);
}

#[test]
fn connect_is_decoded_by_its_own_protocol_level_whatever_the_connection_version() {
    let v5_connect = v5_connect_with_properties(b"\x11\x00\x00\x00\x0A");
    for version in ALL_VERSIONS {
        let Ok(Packet::Connect(connect)) = decode_exactly(&v5_connect, version) else {
            panic!("rejected")
        };
        assert_eq!(connect.protocol, V5);
        assert_eq!(connect.properties.session_expiry_interval, Some(10));
    }
}

#[test]
fn user_properties_and_publish_subscription_identifiers_may_repeat_in_order() {
    let bytes =
        v5_publish_with_properties(b"\x0B\x02\x26\x00\x01a\x00\x00\x0B\x01\x26\x00\x01a\x00\x01z");
    let Ok(Packet::Publish(publish)) = decode_exactly(&bytes, V5) else {
        panic!("rejected")
    };
    assert_eq!(publish.properties.subscription_identifiers, vec![2, 1]);
    assert_eq!(
        publish.properties.user_properties,
        vec![(s("a"), s("")), (s("a"), s("z"))]
    );
}

#[test]
fn v5_short_forms_with_a_full_property_section_decode_the_same() {
    // Senders may write the long form of a Success response; it means the same packet.
    assert_eq!(
        decode_exactly(b"\x40\x04\x00\x0A\x00\x00", V5),
        Ok(Packet::PubAck(PubResponse::success(pid(10))))
    );
    assert_eq!(
        decode_exactly(b"\xE0\x02\x00\x00", V5),
        Ok(Packet::Disconnect(Disconnect::default()))
    );
    assert_eq!(
        decode_exactly(b"\xF0\x02\x00\x00", V5),
        Ok(Packet::Auth(Auth::default()))
    );
}

#[test]
fn mqtt_3_1_connack_has_no_session_present_flag() {
    let connack = Packet::ConnAck(ConnAck {
        session_present: true,
        ..ConnAck::default()
    });
    assert_eq!(encode_to_vec(&connack, V31), b"\x20\x02\x00\x00");
    assert_eq!(
        decode_exactly(b"\x20\x02\x01\x00", V31),
        Ok(Packet::ConnAck(ConnAck::default()))
    );
}

#[test]
fn decoded_strings_and_payloads_share_the_input_buffer() {
    let mut buf = BytesMut::from(&b"\x32\x0C\x00\x03a/b\x00\x0Ahello"[..]);
    let input = buf.as_ptr_range();
    let Ok(Some(Packet::Publish(publish))) = decode(&mut buf, V311, NO_LIMIT) else {
        panic!("rejected")
    };
    assert!(input.contains(&publish.topic.as_bytes().as_ptr()));
    assert!(input.contains(&publish.payload.as_ptr()));
}

// ---------------------------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------------------------

#[test]
fn every_strict_prefix_of_a_valid_packet_is_incomplete_and_consumes_nothing() {
    for Vector {
        name,
        version,
        bytes,
        ..
    } in vectors()
    {
        for len in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..len]);
            assert_eq!(
                decode(&mut buf, version, NO_LIMIT),
                Ok(None),
                "{name}: prefix of {len} bytes"
            );
            assert_eq!(
                &buf[..],
                &bytes[..len],
                "{name}: prefix of {len} bytes was consumed"
            );
        }
    }
}

#[test]
fn back_to_back_packets_decode_in_order_and_keep_the_rest_buffered() {
    let packets = [
        Packet::Publish(publish("t", QoS::AtLeastOnce, Some(1), b"x")),
        Packet::PingReq,
        Packet::PubAck(PubResponse::success(pid(1))),
    ];
    let mut buf = BytesMut::new();
    for packet in &packets {
        encode(packet, V5, &mut buf).expect("encodable");
    }
    let next = b"\x30\x05\x00\x01";
    buf.extend_from_slice(next);
    for packet in packets {
        assert_eq!(decode(&mut buf, V5, NO_LIMIT), Ok(Some(packet)));
    }
    assert_eq!(decode(&mut buf, V5, NO_LIMIT), Ok(None));
    assert_eq!(&buf[..], next);
}

#[test]
fn packet_too_large_is_rejected_from_the_fixed_header_alone() {
    // A PUBLISH announcing 16,383 bytes of body: 16,386 bytes in all.
    let mut buf = BytesMut::from(&[0x30, 0xFF, 0x7F][..]);
    let error = decode(&mut buf, V5, 1024).expect_err("too large");
    assert_eq!(
        error,
        DecodeError::PacketTooLarge {
            size: 16_386,
            max: 1024
        }
    );
    assert_eq!(error.reason_code(), ReasonCode::PACKET_TOO_LARGE);
    assert_eq!(buf.len(), 3, "nothing is consumed");
}

#[test]
fn maximum_packet_size_counts_the_whole_packet_even_when_it_is_all_buffered() {
    let bytes = b"\x32\x0C\x00\x03a/b\x00\x0Ahello"; // 14 bytes
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(
        decode(&mut buf, V311, 13),
        Err(DecodeError::PacketTooLarge { size: 14, max: 13 })
    );
    assert!(matches!(
        decode(&mut buf, V311, 14),
        Ok(Some(Packet::Publish(_)))
    ));
}

#[test]
fn empty_input_is_incomplete() {
    for version in ALL_VERSIONS {
        assert_eq!(decode(&mut BytesMut::new(), version, 0), Ok(None));
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding
// ---------------------------------------------------------------------------------------------

/// Conformance (3.1.1): [MQTT-3.9.3-2]
#[test]
fn encoding_for_v3_leaves_out_what_only_v5_has() {
    let reason = reason_string("no");
    let cases: [(Packet, &[u8]); 7] = [
        (
            Packet::ConnAck(ConnAck {
                session_present: true,
                reason_code: ReasonCode::BANNED,
                properties: ConnAckProperties {
                    reason_string: Some(s("no")),
                    ..ConnAckProperties::default()
                },
            }),
            b"\x20\x02\x01\x05",
        ),
        (
            Packet::Publish(Publish {
                properties: PublishProperties {
                    message_expiry_interval: Some(1),
                    ..PublishProperties::default()
                },
                ..publish("t", QoS::AtMostOnce, None, b"x")
            }),
            b"\x30\x04\x00\x01tx",
        ),
        (
            Packet::PubAck(PubResponse {
                properties: reason.clone(),
                ..response(1, ReasonCode::QUOTA_EXCEEDED)
            }),
            b"\x40\x02\x00\x01",
        ),
        (
            Packet::SubAck(SubAck {
                packet_id: pid(1),
                properties: reason.clone(),
                reason_codes: vec![ReasonCode::GRANTED_QOS_1, ReasonCode::NOT_AUTHORIZED],
            }),
            b"\x90\x04\x00\x01\x01\x80",
        ),
        (
            Packet::UnsubAck(UnsubAck {
                packet_id: pid(1),
                properties: reason,
                reason_codes: vec![ReasonCode::NO_SUBSCRIPTION_EXISTED],
            }),
            b"\xB0\x02\x00\x01",
        ),
        (
            Packet::Disconnect(Disconnect::with_code(ReasonCode::SERVER_SHUTTING_DOWN)),
            b"\xE0\x00",
        ),
        (
            Packet::Subscribe(Subscribe {
                packet_id: pid(1),
                properties: SubscribeProperties {
                    subscription_identifier: Some(3),
                    user_properties: Vec::new(),
                },
                filters: vec![SubscribeFilter {
                    filter: s("t"),
                    options: SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: RetainHandling::DoNotSend,
                    },
                }],
            }),
            b"\x82\x06\x00\x01\x00\x01t\x01",
        ),
    ];
    for (packet, bytes) in cases {
        assert_eq!(encode_to_vec(&packet, V311), bytes, "{packet:?}");
    }
}

/// Conformance (3.1.1): [MQTT-2.3.1-5] [MQTT-3.3.1-2] [MQTT-4.3.1-1]
/// Conformance (5.0): [MQTT-2.2.1-2] [MQTT-3.3.1-2] [MQTT-4.3.1-1]
#[test]
fn qos_0_publish_is_encoded_without_dup_flag_or_packet_id() {
    let packet = Packet::Publish(Publish {
        dup: true,
        ..publish("t", QoS::AtMostOnce, Some(7), b"")
    });
    assert_eq!(encode_to_vec(&packet, V311), b"\x30\x03\x00\x01t");
}

/// Conformance (3.1.1): [MQTT-4.7.3-3]
/// Conformance (5.0): [MQTT-4.7.3-3]
#[test]
fn unencodable_packets_fail_and_leave_the_buffer_untouched() {
    let long = ByteStr::from("x".repeat(65_536));
    let cases = [
        (
            Packet::Publish(publish("t", QoS::AtLeastOnce, None, b"")),
            V5,
            EncodeError::MissingPacketId,
        ),
        (
            Packet::Auth(Auth::default()),
            V311,
            EncodeError::NotInVersion(PacketType::Auth),
        ),
        (
            Packet::Auth(Auth::default()),
            V31,
            EncodeError::NotInVersion(PacketType::Auth),
        ),
        (
            Packet::Publish(Publish {
                topic: long.clone(),
                ..publish("", QoS::AtMostOnce, None, b"")
            }),
            V311,
            EncodeError::FieldTooLong(65_536),
        ),
        (
            Packet::Disconnect(Disconnect {
                reason_code: ReasonCode::NORMAL_DISCONNECTION,
                properties: DisconnectProperties {
                    user_properties: vec![(s("k"), long)],
                    ..Default::default()
                },
            }),
            V5,
            EncodeError::FieldTooLong(65_536),
        ),
        (
            Packet::Publish(Publish {
                properties: PublishProperties {
                    subscription_identifiers: vec![1, 268_435_456],
                    ..Default::default()
                },
                ..publish("t", QoS::AtMostOnce, None, b"")
            }),
            V5,
            EncodeError::InvalidSubscriptionIdentifier(268_435_456),
        ),
        (
            Packet::Subscribe(Subscribe {
                packet_id: pid(1),
                properties: SubscribeProperties {
                    subscription_identifier: Some(0),
                    user_properties: Vec::new(),
                },
                filters: vec![SubscribeFilter {
                    filter: s("t"),
                    options: SubscriptionOptions::default(),
                }],
            }),
            V5,
            EncodeError::InvalidSubscriptionIdentifier(0),
        ),
    ];
    for (packet, version, error) in cases {
        let mut buf = BytesMut::from(&b"kept"[..]);
        assert_eq!(
            encode(&packet, version, &mut buf),
            Err(error),
            "{:?}",
            packet.packet_type()
        );
        assert_eq!(&buf[..], b"kept");
    }
}

#[test]
fn packet_over_the_mqtt_maximum_is_not_encodable() {
    // A 3-byte topic field and a 268,435,453-byte payload: a remaining length one byte over the
    // limit, which would need a 5-byte remaining length field.
    let payload = Bytes::from(vec![0; 268_435_453]);
    let packet = Packet::Publish(Publish {
        payload,
        ..publish("t", QoS::AtMostOnce, None, b"")
    });
    let mut buf = BytesMut::new();
    assert_eq!(
        encode(&packet, V311, &mut buf),
        Err(EncodeError::PacketTooLarge(268_435_462))
    );
    assert!(buf.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Property-based tests: generated valid packets, arbitrary and corrupted bytes
// ---------------------------------------------------------------------------------------------

/// Strategies generating valid packets for a protocol version. `prop_compose!` bodies are not
/// formatted by rustfmt.
mod strategy {
    use super::*;
    use proptest::collection::vec;
    use proptest::option::of as maybe;
    use proptest::sample::select;
    use proptest::strategy::Union;
    use std::fmt::Debug;

    const CONNACK_V3: &[u8] = &[0x00, 0x84, 0x85, 0x86, 0x87, 0x88];
    const CONNACK_V5: &[u8] = &[
        0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95,
        0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
    ];
    const PUBACK_PUBREC: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
    const PUBREL_PUBCOMP: &[u8] = &[0x00, 0x92];
    const SUBACK_V3: &[u8] = &[0x00, 0x01, 0x02, 0x80];
    const SUBACK_V5: &[u8] = &[
        0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
    ];
    const UNSUBACK: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
    const DISCONNECT: &[u8] = &[
        0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94,
        0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
    ];
    const AUTH: &[u8] = &[0x00, 0x18, 0x19];
    const SUCCESS: &[u8] = &[0x00];

    pub fn version() -> impl Strategy<Value = ProtocolVersion> {
        select(ALL_VERSIONS.to_vec())
    }

    /// A valid packet for a random version, with that version.
    pub fn versioned_packet() -> impl Strategy<Value = (ProtocolVersion, Packet)> {
        version().prop_flat_map(|version| (Just(version), packet(version)))
    }

    fn packet(version: ProtocolVersion) -> impl Strategy<Value = Packet> {
        let mut packets = vec![
            connect().boxed(),
            connack(version).boxed(),
            publish(version).boxed(),
            pub_response(version, PUBACK_PUBREC, Packet::PubAck).boxed(),
            pub_response(version, PUBACK_PUBREC, Packet::PubRec).boxed(),
            pub_response(version, PUBREL_PUBCOMP, Packet::PubRel).boxed(),
            pub_response(version, PUBREL_PUBCOMP, Packet::PubComp).boxed(),
            subscribe(version).boxed(),
            suback(version).boxed(),
            unsubscribe(version).boxed(),
            unsuback(version).boxed(),
            Just(Packet::PingReq).boxed(),
            Just(Packet::PingResp).boxed(),
            disconnect(version).boxed(),
        ];
        if version.is_v5() {
            packets.push(auth().boxed());
        }
        Union::new(packets)
    }

    /// Text without U+0000, often beyond ASCII.
    fn text() -> impl Strategy<Value = ByteStr> {
        "[^\\x00]{0,6}".prop_map(ByteStr::from)
    }

    fn topic_name() -> impl Strategy<Value = ByteStr> {
        "[^\\x00+#]{1,6}".prop_map(ByteStr::from)
    }

    /// Any filter, valid or not: the codec leaves filter syntax to the broker.
    fn topic_filter() -> impl Strategy<Value = ByteStr> {
        "[a-z/+#]{1,8}".prop_map(ByteStr::from)
    }

    fn binary() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..8).prop_map(Bytes::from)
    }

    fn user_properties() -> impl Strategy<Value = UserProperties> {
        vec((text(), text()), 0..3)
    }

    fn packet_id() -> impl Strategy<Value = PacketId> {
        (1..=u16::MAX).prop_filter_map("nonzero", PacketId::new)
    }

    fn qos() -> impl Strategy<Value = QoS> {
        select(vec![QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce])
    }

    fn subscription_id() -> impl Strategy<Value = u32> {
        1..=268_435_455u32
    }

    /// One of `v5_codes` on MQTT 5, else one of `v3_codes`.
    fn reason_code(
        version: ProtocolVersion,
        v5_codes: &'static [u8],
        v3_codes: &'static [u8],
    ) -> impl Strategy<Value = ReasonCode> {
        let codes = if version.is_v5() { v5_codes } else { v3_codes };
        select(codes.iter().copied().map(ReasonCode).collect::<Vec<_>>())
    }

    /// `value` on MQTT 5, the default (no properties, no reason codes) on 3.x.
    fn v5_only<T: Default + Clone + Debug + 'static>(
        version: ProtocolVersion,
        value: impl Strategy<Value = T> + 'static,
    ) -> BoxedStrategy<T> {
        if version.is_v5() {
            value.boxed()
        } else {
            Just(T::default()).boxed()
        }
    }

    prop_compose! {
        fn connect_properties()(
            session_expiry_interval in maybe(any::<u32>()),
            receive_maximum in maybe(1..=u16::MAX),
            maximum_packet_size in maybe(1..=u32::MAX),
            topic_alias_maximum in maybe(any::<u16>()),
            request_response_information in maybe(any::<bool>()),
            request_problem_information in maybe(any::<bool>()),
            user_properties in user_properties(),
            authentication_method in maybe(text()),
            data in maybe(binary()),
        ) -> ConnectProperties {
            // Authentication data needs a method.
            let authentication_data = data.filter(|_| authentication_method.is_some());
            ConnectProperties {
                session_expiry_interval, receive_maximum, maximum_packet_size, topic_alias_maximum,
                request_response_information, request_problem_information, user_properties,
                authentication_method, authentication_data,
            }
        }
    }

    prop_compose! {
        fn will_properties()(
            will_delay_interval in maybe(any::<u32>()),
            payload_format_indicator in maybe(any::<bool>()),
            message_expiry_interval in maybe(any::<u32>()),
            content_type in maybe(text()),
            response_topic in maybe(topic_name()),
            correlation_data in maybe(binary()),
            user_properties in user_properties(),
        ) -> WillProperties {
            WillProperties {
                will_delay_interval, payload_format_indicator, message_expiry_interval, content_type,
                response_topic, correlation_data, user_properties,
            }
        }
    }

    prop_compose! {
        fn connack_properties()(
            session_expiry_interval in maybe(any::<u32>()),
            receive_maximum in maybe(1..=u16::MAX),
            maximum_qos in maybe(select(vec![QoS::AtMostOnce, QoS::AtLeastOnce])),
            retain_available in maybe(any::<bool>()),
            maximum_packet_size in maybe(1..=u32::MAX),
            assigned_client_identifier in maybe(text()),
            topic_alias_maximum in maybe(any::<u16>()),
            reason_string in maybe(text()),
            user_properties in user_properties(),
            wildcard_subscription_available in maybe(any::<bool>()),
            subscription_identifiers_available in maybe(any::<bool>()),
            shared_subscription_available in maybe(any::<bool>()),
            server_keep_alive in maybe(any::<u16>()),
            response_information in maybe(text()),
            server_reference in maybe(text()),
            authentication_method in maybe(text()),
            authentication_data in maybe(binary()),
        ) -> ConnAckProperties {
            ConnAckProperties {
                session_expiry_interval, receive_maximum, maximum_qos, retain_available,
                maximum_packet_size, assigned_client_identifier, topic_alias_maximum, reason_string,
                user_properties, wildcard_subscription_available, subscription_identifiers_available,
                shared_subscription_available, server_keep_alive, response_information,
                server_reference, authentication_method, authentication_data,
            }
        }
    }

    prop_compose! {
        fn publish_properties()(
            payload_format_indicator in maybe(any::<bool>()),
            message_expiry_interval in maybe(any::<u32>()),
            topic_alias in maybe(1..=u16::MAX),
            response_topic in maybe(topic_name()),
            correlation_data in maybe(binary()),
            user_properties in user_properties(),
            subscription_identifiers in vec(subscription_id(), 0..3),
            content_type in maybe(text()),
        ) -> PublishProperties {
            PublishProperties {
                payload_format_indicator, message_expiry_interval, topic_alias, response_topic,
                correlation_data, user_properties, subscription_identifiers, content_type,
            }
        }
    }

    prop_compose! {
        fn reason_properties()(
            reason_string in maybe(text()),
            user_properties in user_properties(),
        ) -> ReasonProperties {
            ReasonProperties { reason_string, user_properties }
        }
    }

    prop_compose! {
        fn subscribe_properties()(
            subscription_identifier in maybe(subscription_id()),
            user_properties in user_properties(),
        ) -> SubscribeProperties {
            SubscribeProperties { subscription_identifier, user_properties }
        }
    }

    prop_compose! {
        fn disconnect_properties()(
            session_expiry_interval in maybe(any::<u32>()),
            reason_string in maybe(text()),
            user_properties in user_properties(),
            server_reference in maybe(text()),
        ) -> DisconnectProperties {
            DisconnectProperties { session_expiry_interval, reason_string, user_properties, server_reference }
        }
    }

    prop_compose! {
        fn auth_properties()(
            authentication_method in maybe(text()),
            authentication_data in maybe(binary()),
            reason_string in maybe(text()),
            user_properties in user_properties(),
        ) -> AuthProperties {
            AuthProperties { authentication_method, authentication_data, reason_string, user_properties }
        }
    }

    prop_compose! {
        fn will(protocol: ProtocolVersion)(
            topic in topic_name(),
            payload in binary(),
            qos in qos(),
            retain in any::<bool>(),
            properties in v5_only(protocol, will_properties()),
        ) -> Will {
            Will { topic, payload, qos, retain, properties }
        }
    }

    prop_compose! {
        /// CONNECT carries its own protocol version, whatever the connection's.
        fn connect()(protocol in version())(
            protocol in Just(protocol),
            clean_start in any::<bool>(),
            keep_alive in any::<u16>(),
            client_id in text(),
            will in maybe(will(protocol)),
            username in maybe(text()),
            password in maybe(binary()),
            properties in v5_only(protocol, connect_properties()),
        ) -> Packet {
            // MQTT 3.x allows a password only with a user name.
            let password = password.filter(|_| protocol.is_v5() || username.is_some());
            let connect = Connect { protocol, clean_start, keep_alive, client_id, will, username, password, properties };
            Packet::Connect(Box::new(connect))
        }
    }

    prop_compose! {
        fn connack(version: ProtocolVersion)(
            session_present in any::<bool>(),
            reason_code in reason_code(version, CONNACK_V5, CONNACK_V3),
            properties in v5_only(version, connack_properties()),
        ) -> Packet {
            // MQTT 3.1 has no Session Present flag.
            let session_present = session_present && version != V31;
            Packet::ConnAck(ConnAck { session_present, reason_code, properties })
        }
    }

    prop_compose! {
        fn publish(version: ProtocolVersion)(
            qos in qos(),
            dup in any::<bool>(),
            retain in any::<bool>(),
            topic in topic_name(),
            use_topic_alias in any::<bool>(),
            packet_id in packet_id(),
            properties in v5_only(version, publish_properties()),
            payload in binary(),
        ) -> Packet {
            let at_most_once = qos == QoS::AtMostOnce;
            // With a Topic Alias, an MQTT 5 PUBLISH may leave the topic empty.
            let topic = if use_topic_alias && properties.topic_alias.is_some() { ByteStr::default() } else { topic };
            let packet_id = (!at_most_once).then_some(packet_id);
            Packet::Publish(Publish { dup: dup && !at_most_once, qos, retain, topic, packet_id, properties, payload })
        }
    }

    prop_compose! {
        fn pub_response(version: ProtocolVersion, codes: &'static [u8], packet: fn(PubResponse) -> Packet)(
            packet_id in packet_id(),
            reason_code in reason_code(version, codes, SUCCESS),
            properties in v5_only(version, reason_properties()),
        ) -> Packet {
            packet(PubResponse { packet_id, reason_code, properties })
        }
    }

    prop_compose! {
        fn subscription_options(version: ProtocolVersion)(
            qos in qos(),
            no_local in any::<bool>(),
            retain_as_published in any::<bool>(),
            retain_handling in select(vec![
                RetainHandling::SendAtSubscribe, RetainHandling::SendIfNew, RetainHandling::DoNotSend,
            ]),
        ) -> SubscriptionOptions {
            if version.is_v5() {
                SubscriptionOptions { qos, no_local, retain_as_published, retain_handling }
            } else {
                SubscriptionOptions { qos, ..SubscriptionOptions::default() }
            }
        }
    }

    prop_compose! {
        fn subscribe(version: ProtocolVersion)(
            packet_id in packet_id(),
            properties in v5_only(version, subscribe_properties()),
            filters in vec((topic_filter(), subscription_options(version)), 1..4),
        ) -> Packet {
            let filters = filters.into_iter().map(|(filter, options)| SubscribeFilter { filter, options }).collect();
            Packet::Subscribe(Subscribe { packet_id, properties, filters })
        }
    }

    prop_compose! {
        fn suback(version: ProtocolVersion)(
            packet_id in packet_id(),
            properties in v5_only(version, reason_properties()),
            reason_codes in vec(reason_code(version, SUBACK_V5, SUBACK_V3), 1..4),
        ) -> Packet {
            Packet::SubAck(SubAck { packet_id, properties, reason_codes })
        }
    }

    prop_compose! {
        fn unsubscribe(version: ProtocolVersion)(
            packet_id in packet_id(),
            properties in v5_only(version, user_properties()),
            filters in vec(topic_filter(), 1..4),
        ) -> Packet {
            Packet::Unsubscribe(Unsubscribe { packet_id, properties, filters })
        }
    }

    prop_compose! {
        fn unsuback(version: ProtocolVersion)(
            packet_id in packet_id(),
            properties in v5_only(version, reason_properties()),
            reason_codes in v5_only(version, vec(reason_code(version, UNSUBACK, SUCCESS), 0..4)),
        ) -> Packet {
            Packet::UnsubAck(UnsubAck { packet_id, properties, reason_codes })
        }
    }

    prop_compose! {
        fn disconnect(version: ProtocolVersion)(
            reason_code in reason_code(version, DISCONNECT, SUCCESS),
            properties in v5_only(version, disconnect_properties()),
        ) -> Packet {
            Packet::Disconnect(Disconnect { reason_code, properties })
        }
    }

    prop_compose! {
        fn auth()(reason_code in reason_code(V5, AUTH, AUTH), properties in auth_properties()) -> Packet {
            Packet::Auth(Auth { reason_code, properties })
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn valid_packets_round_trip_and_encoded_len_is_exact((version, packet) in strategy::versioned_packet()) {
        let mut buf = BytesMut::new();
        prop_assert_eq!(encode(&packet, version, &mut buf), Ok(()));
        prop_assert_eq!(buf.len(), encoded_len(&packet, version));
        prop_assert_eq!(decode(&mut buf, version, NO_LIMIT), Ok(Some(packet)));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_decoded_packets_reencode(
        bytes in proptest::collection::vec(any::<u8>(), 0..256),
        version in strategy::version(),
        max_packet_size in prop_oneof![any::<u32>(), 0..300u32],
    ) {
        decode_all_and_reencode(&bytes, version, max_packet_size);
    }

    #[test]
    fn corrupted_valid_packets_never_panic_and_decoded_packets_reencode(
        (version, packet) in strategy::versioned_packet(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut bytes = encode_to_vec(&packet, version);
        for (index, byte) in edits {
            let position = index.index(bytes.len());
            bytes[position] = byte;
        }
        decode_all_and_reencode(&bytes, version, NO_LIMIT);
    }
}
