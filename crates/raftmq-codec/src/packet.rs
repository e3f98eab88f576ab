//! The fifteen MQTT control packets as plain data.
//!
//! One representation serves all protocol levels: fields that only exist in MQTT 5 (properties,
//! most reason codes) are ignored when encoding for 3.x and take their defaults when decoding 3.x.

use crate::{ByteStr, ReasonCode, properties::*};
use bytes::Bytes;
use std::num::NonZeroU16;

/// A packet identifier: never zero on the wire.
pub type PacketId = NonZeroU16;

/// The protocol level announced in CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProtocolVersion {
    /// MQTT 3.1, protocol name "MQIsdp", level 3.
    V3_1,
    /// MQTT 3.1.1, protocol name "MQTT", level 4.
    V3_1_1,
    /// MQTT 5.0, protocol name "MQTT", level 5.
    V5,
}

impl ProtocolVersion {
    /// The protocol level byte.
    pub fn level(self) -> u8 {
        match self {
            Self::V3_1 => 3,
            Self::V3_1_1 => 4,
            Self::V5 => 5,
        }
    }

    /// True for MQTT 5.
    pub fn is_v5(self) -> bool {
        self == Self::V5
    }
}

/// Quality of service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QoS {
    #[default]
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl QoS {
    /// From the two-bit wire value; `None` for 3.
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::AtMostOnce),
            1 => Some(Self::AtLeastOnce),
            2 => Some(Self::ExactlyOnce),
            _ => None,
        }
    }

    /// The wire value.
    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

/// The packet type nibble of the fixed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PacketType {
    Connect = 1,
    ConnAck = 2,
    Publish = 3,
    PubAck = 4,
    PubRec = 5,
    PubRel = 6,
    PubComp = 7,
    Subscribe = 8,
    SubAck = 9,
    Unsubscribe = 10,
    UnsubAck = 11,
    PingReq = 12,
    PingResp = 13,
    Disconnect = 14,
    Auth = 15,
}

/// Any MQTT control packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Packet {
    Connect(Box<Connect>),
    ConnAck(ConnAck),
    Publish(Publish),
    PubAck(PubResponse),
    PubRec(PubResponse),
    PubRel(PubResponse),
    PubComp(PubResponse),
    Subscribe(Subscribe),
    SubAck(SubAck),
    Unsubscribe(Unsubscribe),
    UnsubAck(UnsubAck),
    PingReq,
    PingResp,
    Disconnect(Disconnect),
    Auth(Auth),
}

impl Packet {
    /// The packet's type.
    pub fn packet_type(&self) -> PacketType {
        match self {
            Packet::Connect(_) => PacketType::Connect,
            Packet::ConnAck(_) => PacketType::ConnAck,
            Packet::Publish(_) => PacketType::Publish,
            Packet::PubAck(_) => PacketType::PubAck,
            Packet::PubRec(_) => PacketType::PubRec,
            Packet::PubRel(_) => PacketType::PubRel,
            Packet::PubComp(_) => PacketType::PubComp,
            Packet::Subscribe(_) => PacketType::Subscribe,
            Packet::SubAck(_) => PacketType::SubAck,
            Packet::Unsubscribe(_) => PacketType::Unsubscribe,
            Packet::UnsubAck(_) => PacketType::UnsubAck,
            Packet::PingReq => PacketType::PingReq,
            Packet::PingResp => PacketType::PingResp,
            Packet::Disconnect(_) => PacketType::Disconnect,
            Packet::Auth(_) => PacketType::Auth,
        }
    }
}

/// CONNECT (§3.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    pub protocol: ProtocolVersion,
    /// Clean Start (5.0) / Clean Session (3.x).
    pub clean_start: bool,
    /// Keep alive in seconds; 0 disables it.
    pub keep_alive: u16,
    /// May be empty (the server then assigns one, or rejects it on 3.x without clean session).
    pub client_id: ByteStr,
    pub will: Option<Will>,
    pub username: Option<ByteStr>,
    pub password: Option<Bytes>,
    pub properties: ConnectProperties,
}

/// The will message carried by CONNECT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Will {
    pub topic: ByteStr,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    pub properties: WillProperties,
}

/// CONNACK (§3.2). For 3.x the reason code is mapped to a return code on encode
/// ([`ReasonCode::to_v3_connack`]) and back on decode.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub reason_code: ReasonCode,
    pub properties: ConnAckProperties,
}

impl Default for ReasonCode {
    fn default() -> Self {
        ReasonCode::SUCCESS
    }
}

/// PUBLISH (§3.3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publish {
    pub dup: bool,
    pub qos: QoS,
    pub retain: bool,
    /// May be empty in MQTT 5 when `properties.topic_alias` is set.
    pub topic: ByteStr,
    /// Present exactly when `qos` > 0.
    pub packet_id: Option<PacketId>,
    pub properties: PublishProperties,
    pub payload: Bytes,
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP (§3.4–3.7): a packet id, a reason code, and properties.
/// In MQTT 5 the reason code and properties may be omitted on the wire when they are
/// Success and empty; the encoder does that.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PubResponse {
    pub packet_id: PacketId,
    pub reason_code: ReasonCode,
    pub properties: ReasonProperties,
}

impl PubResponse {
    /// A successful response with no properties.
    pub fn success(packet_id: PacketId) -> Self {
        Self {
            packet_id,
            reason_code: ReasonCode::SUCCESS,
            properties: ReasonProperties::default(),
        }
    }
}

/// Retain handling subscription option (MQTT 5 §3.8.3.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RetainHandling {
    /// 0: send retained messages at the time of the subscribe.
    #[default]
    SendAtSubscribe = 0,
    /// 1: send retained messages only if the subscription did not already exist.
    SendIfNew = 1,
    /// 2: do not send retained messages.
    DoNotSend = 2,
}

/// Subscription options byte (MQTT 5 §3.8.3.1; 3.x carries only the QoS).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SubscriptionOptions {
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: RetainHandling,
}

/// One topic filter of a SUBSCRIBE.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscribeFilter {
    pub filter: ByteStr,
    pub options: SubscriptionOptions,
}

/// SUBSCRIBE (§3.8). Has at least one filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscribe {
    pub packet_id: PacketId,
    pub properties: SubscribeProperties,
    pub filters: Vec<SubscribeFilter>,
}

/// SUBACK (§3.9): one reason code per filter, in order. For 3.x encoded with
/// [`ReasonCode::to_v3_suback`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubAck {
    pub packet_id: PacketId,
    pub properties: ReasonProperties,
    pub reason_codes: Vec<ReasonCode>,
}

/// UNSUBSCRIBE (§3.10). Has at least one filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unsubscribe {
    pub packet_id: PacketId,
    pub properties: UserProperties,
    pub filters: Vec<ByteStr>,
}

/// UNSUBACK (§3.11). 3.x has no payload: `reason_codes` is empty when decoded from 3.x and
/// ignored when encoding 3.x.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnsubAck {
    pub packet_id: PacketId,
    pub properties: ReasonProperties,
    pub reason_codes: Vec<ReasonCode>,
}

/// DISCONNECT (§3.14). 3.x has no variable header: reason code Normal, no properties.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Disconnect {
    pub reason_code: ReasonCode,
    pub properties: DisconnectProperties,
}

impl Disconnect {
    /// A DISCONNECT with `code` and no properties.
    pub fn with_code(code: ReasonCode) -> Self {
        Self {
            reason_code: code,
            properties: DisconnectProperties::default(),
        }
    }
}

/// AUTH (§3.15, MQTT 5 only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Auth {
    pub reason_code: ReasonCode,
    pub properties: AuthProperties,
}
