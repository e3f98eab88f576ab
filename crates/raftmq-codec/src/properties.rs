//! MQTT 5 properties (§2.2.2), grouped per packet type. Each struct holds exactly the properties
//! its packet may carry; decoding any other property for that packet is a Protocol Error, and a
//! property other than User Property / Subscription Identifier appearing twice is a Protocol Error.

use crate::{ByteStr, QoS};
use bytes::Bytes;

/// Property identifiers (§2.2.2.2).
pub mod id {
    pub const PAYLOAD_FORMAT_INDICATOR: u8 = 0x01;
    pub const MESSAGE_EXPIRY_INTERVAL: u8 = 0x02;
    pub const CONTENT_TYPE: u8 = 0x03;
    pub const RESPONSE_TOPIC: u8 = 0x08;
    pub const CORRELATION_DATA: u8 = 0x09;
    pub const SUBSCRIPTION_IDENTIFIER: u8 = 0x0B;
    pub const SESSION_EXPIRY_INTERVAL: u8 = 0x11;
    pub const ASSIGNED_CLIENT_IDENTIFIER: u8 = 0x12;
    pub const SERVER_KEEP_ALIVE: u8 = 0x13;
    pub const AUTHENTICATION_METHOD: u8 = 0x15;
    pub const AUTHENTICATION_DATA: u8 = 0x16;
    pub const REQUEST_PROBLEM_INFORMATION: u8 = 0x17;
    pub const WILL_DELAY_INTERVAL: u8 = 0x18;
    pub const REQUEST_RESPONSE_INFORMATION: u8 = 0x19;
    pub const RESPONSE_INFORMATION: u8 = 0x1A;
    pub const SERVER_REFERENCE: u8 = 0x1C;
    pub const REASON_STRING: u8 = 0x1F;
    pub const RECEIVE_MAXIMUM: u8 = 0x21;
    pub const TOPIC_ALIAS_MAXIMUM: u8 = 0x22;
    pub const TOPIC_ALIAS: u8 = 0x23;
    pub const MAXIMUM_QOS: u8 = 0x24;
    pub const RETAIN_AVAILABLE: u8 = 0x25;
    pub const USER_PROPERTY: u8 = 0x26;
    pub const MAXIMUM_PACKET_SIZE: u8 = 0x27;
    pub const WILDCARD_SUBSCRIPTION_AVAILABLE: u8 = 0x28;
    pub const SUBSCRIPTION_IDENTIFIER_AVAILABLE: u8 = 0x29;
    pub const SHARED_SUBSCRIPTION_AVAILABLE: u8 = 0x2A;
}

/// User properties: name/value pairs, order preserved, duplicates allowed.
pub type UserProperties = Vec<(ByteStr, ByteStr)>;

/// CONNECT properties.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectProperties {
    pub session_expiry_interval: Option<u32>,
    /// Must not be 0 (Protocol Error).
    pub receive_maximum: Option<u16>,
    /// Must not be 0 (Protocol Error).
    pub maximum_packet_size: Option<u32>,
    pub topic_alias_maximum: Option<u16>,
    /// 0 or 1, else Protocol Error.
    pub request_response_information: Option<bool>,
    /// 0 or 1, else Protocol Error.
    pub request_problem_information: Option<bool>,
    pub user_properties: UserProperties,
    pub authentication_method: Option<ByteStr>,
    /// Only valid together with an authentication method (Protocol Error otherwise).
    pub authentication_data: Option<Bytes>,
}

/// Will properties (§3.1.3.2).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WillProperties {
    pub will_delay_interval: Option<u32>,
    /// true = payload is UTF-8 (indicator 1). Values other than 0/1 are a Protocol Error.
    pub payload_format_indicator: Option<bool>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<ByteStr>,
    pub response_topic: Option<ByteStr>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: UserProperties,
}

/// CONNACK properties.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnAckProperties {
    pub session_expiry_interval: Option<u32>,
    pub receive_maximum: Option<u16>,
    /// Only 0 or 1 are legal on the wire (absent means 2).
    pub maximum_qos: Option<QoS>,
    pub retain_available: Option<bool>,
    pub maximum_packet_size: Option<u32>,
    pub assigned_client_identifier: Option<ByteStr>,
    pub topic_alias_maximum: Option<u16>,
    pub reason_string: Option<ByteStr>,
    pub user_properties: UserProperties,
    pub wildcard_subscription_available: Option<bool>,
    pub subscription_identifiers_available: Option<bool>,
    pub shared_subscription_available: Option<bool>,
    pub server_keep_alive: Option<u16>,
    pub response_information: Option<ByteStr>,
    pub server_reference: Option<ByteStr>,
    pub authentication_method: Option<ByteStr>,
    pub authentication_data: Option<Bytes>,
}

/// PUBLISH properties.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishProperties {
    pub payload_format_indicator: Option<bool>,
    pub message_expiry_interval: Option<u32>,
    /// Must not be 0 (Protocol Error / Topic Alias invalid).
    pub topic_alias: Option<u16>,
    /// A topic name: must not contain wildcards.
    pub response_topic: Option<ByteStr>,
    pub correlation_data: Option<Bytes>,
    pub user_properties: UserProperties,
    /// Client→server: Protocol Error if present. Server→client: one per matching subscription
    /// with an identifier (1..=268,435,455; 0 is a Protocol Error).
    pub subscription_identifiers: Vec<u32>,
    pub content_type: Option<ByteStr>,
}

impl PublishProperties {
    /// True when no property is set.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Reason string and user properties: the properties of PUBACK, PUBREC, PUBREL, PUBCOMP,
/// SUBACK and UNSUBACK.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReasonProperties {
    pub reason_string: Option<ByteStr>,
    pub user_properties: UserProperties,
}

impl ReasonProperties {
    /// True when no property is set.
    pub fn is_empty(&self) -> bool {
        self.reason_string.is_none() && self.user_properties.is_empty()
    }
}

/// SUBSCRIBE properties.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscribeProperties {
    /// 1..=268,435,455; 0 is a Protocol Error. At most one.
    pub subscription_identifier: Option<u32>,
    pub user_properties: UserProperties,
}

/// DISCONNECT properties.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DisconnectProperties {
    pub session_expiry_interval: Option<u32>,
    pub reason_string: Option<ByteStr>,
    pub user_properties: UserProperties,
    pub server_reference: Option<ByteStr>,
}

/// AUTH properties.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AuthProperties {
    pub authentication_method: Option<ByteStr>,
    pub authentication_data: Option<Bytes>,
    pub reason_string: Option<ByteStr>,
    pub user_properties: UserProperties,
}
