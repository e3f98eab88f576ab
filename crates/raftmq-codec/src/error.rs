//! Decode and encode errors. Each decode error knows the reason code the receiver must use
//! when it closes the connection (MQTT 5 §4.13).

use crate::{PacketType, ReasonCode, properties::id};
use thiserror::Error;

/// Why a byte sequence is not a valid MQTT packet.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("invalid packet type {0}")]
    InvalidPacketType(u8),
    #[error("invalid fixed header flags {flags:#06b} for {packet_type:?}")]
    InvalidFlags { packet_type: PacketType, flags: u8 },
    #[error("malformed remaining length")]
    MalformedRemainingLength,
    /// A variable byte integer in the packet body (property length or value) is longer than
    /// four bytes or not in its shortest form.
    #[error("malformed variable byte integer")]
    MalformedVarInt,
    #[error("packet of {size} bytes exceeds the maximum packet size {max}")]
    PacketTooLarge { size: usize, max: u32 },
    #[error("packet ends before its content (needed {needed} more bytes)")]
    Truncated { needed: usize },
    #[error("{0} unexpected bytes after the end of the packet content")]
    TrailingBytes(usize),
    #[error("string is not valid UTF-8")]
    InvalidUtf8,
    #[error("string contains U+0000")]
    NullCharacter,
    #[error("invalid protocol name")]
    InvalidProtocolName,
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolVersion(u8),
    #[error("invalid CONNECT flags {0:#010b}")]
    InvalidConnectFlags(u8),
    #[error("invalid CONNACK acknowledge flags {0:#010b}")]
    InvalidConnAckFlags(u8),
    #[error("invalid QoS {0}")]
    InvalidQoS(u8),
    #[error("packet identifier 0")]
    ZeroPacketId,
    #[error("invalid property identifier {0:#04x}")]
    InvalidPropertyId(u8),
    #[error("property {0:#04x} appears more than once")]
    DuplicateProperty(u8),
    #[error("property {id:#04x} is not allowed in {packet_type:?}")]
    PropertyNotAllowed { id: u8, packet_type: PacketType },
    #[error("invalid value for property {0:#04x}")]
    InvalidPropertyValue(u8),
    #[error("reason code {code:#04x} is not allowed in {packet_type:?}")]
    InvalidReasonCode { code: u8, packet_type: PacketType },
    #[error("{0:?} without any topic filter")]
    NoTopicFilters(PacketType),
    #[error("invalid subscription options {0:#010b}")]
    InvalidSubscriptionOptions(u8),
    #[error("{0:?} is not valid for this protocol version")]
    UnexpectedPacketForVersion(PacketType),
    #[error("topic name contains a wildcard")]
    WildcardInTopicName,
    /// An empty topic name: in a will, in an MQTT 3.x PUBLISH, or in an MQTT 5 PUBLISH without
    /// a Topic Alias.
    #[error("empty topic name")]
    EmptyTopicName,
    #[error("authentication data without an authentication method")]
    AuthenticationDataWithoutMethod,
}

impl DecodeError {
    /// The reason code to send in CONNACK (during connect) or DISCONNECT (after) when closing
    /// the connection because of this error (MQTT 5 §4.13.1). MQTT 3.x connections close
    /// without a reason code, except CONNACK 0x01 for an unsupported protocol level.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::PacketTooLarge { .. } => ReasonCode::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocolVersion(_) => ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
            // Topic Alias 0 [MQTT-3.3.2-8] gets the code MQTT 5 uses for every bad alias.
            DecodeError::InvalidPropertyValue(id::TOPIC_ALIAS) => ReasonCode::TOPIC_ALIAS_INVALID,
            DecodeError::DuplicateProperty(_)
            | DecodeError::PropertyNotAllowed { .. }
            | DecodeError::InvalidPropertyValue(_)
            | DecodeError::NoTopicFilters(_)
            | DecodeError::UnexpectedPacketForVersion(_)
            | DecodeError::EmptyTopicName
            | DecodeError::AuthenticationDataWithoutMethod => ReasonCode::PROTOCOL_ERROR,
            DecodeError::WildcardInTopicName => ReasonCode::TOPIC_NAME_INVALID,
            _ => ReasonCode::MALFORMED_PACKET,
        }
    }
}

/// Why a packet cannot be encoded.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum EncodeError {
    #[error("string or binary field of {0} bytes exceeds 65535")]
    FieldTooLong(usize),
    #[error("packet of {0} bytes exceeds the MQTT maximum of 268435455")]
    PacketTooLarge(usize),
    #[error("{0:?} cannot be encoded for this protocol version")]
    NotInVersion(PacketType),
    #[error("QoS > 0 PUBLISH without a packet identifier")]
    MissingPacketId,
    #[error("subscription identifier {0} is outside 1..=268435455")]
    InvalidSubscriptionIdentifier(u32),
}
