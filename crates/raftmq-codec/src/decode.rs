//! Decoding: framing (fixed header, remaining length, maximum packet size) and the strict
//! validation of each packet's variable header and payload.
//!
//! A packet is only split off the input once its fixed header is valid, it fits the maximum
//! packet size and all its bytes are present. Its body must then be consumed exactly: reading
//! past its end is [`DecodeError::Truncated`], bytes left over are [`DecodeError::TrailingBytes`].

use crate::property_codec::{PropertySet, read_properties};
use crate::wire::{MalformedVarInt, Reader, parse_var_int};
use crate::*;
use bytes::BytesMut;

/// Decodes one packet from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole packet (nothing is consumed), and
/// `Ok(Some(packet))` after removing the packet's bytes from `buf`. `version` is the connection's
/// negotiated protocol (ignored for CONNECT, which carries its own). A packet whose declared size
/// exceeds `max_packet_size` is rejected as soon as its fixed header is readable, before its body
/// is buffered. Decoded strings and payloads share `buf`'s allocation (no copies).
///
/// After an error the connection must be closed: how much of `buf` was consumed is unspecified.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    max_packet_size: u32,
) -> Result<Option<Packet>, DecodeError> {
    let Some((&first, rest)) = buf.split_first() else {
        return Ok(None);
    };
    let header = FixedHeader::parse(first, version)?;
    let (remaining, len_bytes) = match parse_var_int(rest) {
        Ok(Some(length)) => length,
        Ok(None) => return Ok(None),
        Err(MalformedVarInt) => return Err(DecodeError::MalformedRemainingLength),
    };
    let header_len = 1 + len_bytes;
    // At most 5 + 268,435,455: cannot overflow.
    let size = header_len + remaining as usize;
    if size > max_packet_size as usize {
        return Err(DecodeError::PacketTooLarge {
            size,
            max: max_packet_size,
        });
    }
    if buf.len() < size {
        return Ok(None);
    }
    let frame = buf.split_to(size).freeze();
    let mut body = Reader::new(frame.slice(header_len..));
    let packet = header.decode_body(&mut body, version)?;
    body.finish()?;
    Ok(Some(packet))
}

/// The first byte of the fixed header (§2.1.2), validated.
struct FixedHeader {
    packet_type: PacketType,
    /// PUBLISH flags; all false / QoS 0 for other packets.
    dup: bool,
    qos: QoS,
    retain: bool,
}

impl FixedHeader {
    fn parse(byte: u8, version: ProtocolVersion) -> Result<Self, DecodeError> {
        let packet_type = match byte >> 4 {
            1 => PacketType::Connect,
            2 => PacketType::ConnAck,
            3 => PacketType::Publish,
            4 => PacketType::PubAck,
            5 => PacketType::PubRec,
            6 => PacketType::PubRel,
            7 => PacketType::PubComp,
            8 => PacketType::Subscribe,
            9 => PacketType::SubAck,
            10 => PacketType::Unsubscribe,
            11 => PacketType::UnsubAck,
            12 => PacketType::PingReq,
            13 => PacketType::PingResp,
            14 => PacketType::Disconnect,
            15 if version.is_v5() => PacketType::Auth,
            reserved => return Err(DecodeError::InvalidPacketType(reserved)),
        };
        let flags = byte & 0x0F;
        let invalid_flags = DecodeError::InvalidFlags { packet_type, flags };
        let header = FixedHeader {
            packet_type,
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
        };
        match packet_type {
            PacketType::Publish => {
                let qos = (flags >> 1) & 0b11;
                let qos = QoS::from_u8(qos).ok_or(DecodeError::InvalidQoS(qos))?;
                let dup = flags & 0b1000 != 0;
                // The DUP flag MUST be 0 for QoS 0 messages [MQTT-3.3.1-2].
                if dup && qos == QoS::AtMostOnce {
                    return Err(invalid_flags);
                }
                Ok(FixedHeader {
                    dup,
                    qos,
                    retain: flags & 1 != 0,
                    ..header
                })
            }
            // Flags 0010 are mandatory [MQTT-2.2.2-1]. MQTT 3.1 sends these packets at QoS 1
            // and sets DUP when it resends them (3.1 §3.6, §3.8, §3.10), so level 3 also
            // accepts 1010; levels 4 and 5 do not.
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe
                if flags == 0b0010 || (flags == 0b1010 && version == ProtocolVersion::V3_1) =>
            {
                Ok(header)
            }
            PacketType::PubRel | PacketType::Subscribe | PacketType::Unsubscribe => {
                Err(invalid_flags)
            }
            _ if flags == 0 => Ok(header),
            _ => Err(invalid_flags),
        }
    }

    fn decode_body(&self, r: &mut Reader, version: ProtocolVersion) -> Result<Packet, DecodeError> {
        let v5 = version.is_v5();
        Ok(match self.packet_type {
            PacketType::Connect => Packet::Connect(Box::new(connect(r)?)),
            PacketType::ConnAck => Packet::ConnAck(connack(r, version)?),
            PacketType::Publish => Packet::Publish(self.publish(r, v5)?),
            PacketType::PubAck => Packet::PubAck(pub_response(r, v5, PacketType::PubAck)?),
            PacketType::PubRec => Packet::PubRec(pub_response(r, v5, PacketType::PubRec)?),
            PacketType::PubRel => Packet::PubRel(pub_response(r, v5, PacketType::PubRel)?),
            PacketType::PubComp => Packet::PubComp(pub_response(r, v5, PacketType::PubComp)?),
            PacketType::Subscribe => Packet::Subscribe(subscribe(r, v5)?),
            PacketType::SubAck => Packet::SubAck(suback(r, v5)?),
            PacketType::Unsubscribe => Packet::Unsubscribe(unsubscribe(r, v5)?),
            PacketType::UnsubAck => Packet::UnsubAck(unsuback(r, v5)?),
            PacketType::PingReq => Packet::PingReq,
            PacketType::PingResp => Packet::PingResp,
            PacketType::Disconnect => Packet::Disconnect(disconnect(r, v5)?),
            PacketType::Auth => Packet::Auth(auth(r)?),
        })
    }

    /// PUBLISH (§3.3).
    fn publish(&self, r: &mut Reader, v5: bool) -> Result<Publish, DecodeError> {
        let topic = r.topic_name()?;
        let packet_id = match self.qos {
            QoS::AtMostOnce => None,
            QoS::AtLeastOnce | QoS::ExactlyOnce => Some(r.packet_id()?),
        };
        let properties: PublishProperties = v5_properties(r, v5, PacketType::Publish)?;
        // An empty topic stands for the topic of a Topic Alias, which only MQTT 5 has; resolving
        // the alias is the session's job.
        if topic.is_empty() && properties.topic_alias.is_none() {
            return Err(DecodeError::EmptyTopicName);
        }
        Ok(Publish {
            dup: self.dup,
            qos: self.qos,
            retain: self.retain,
            topic,
            packet_id,
            properties,
            payload: r.rest(),
        })
    }
}

/// Reason codes allowed in MQTT 5 CONNACK (§3.2.2.2).
const CONNACK_CODES: &[ReasonCode] = &[
    ReasonCode::SUCCESS,
    ReasonCode::UNSPECIFIED_ERROR,
    ReasonCode::MALFORMED_PACKET,
    ReasonCode::PROTOCOL_ERROR,
    ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR,
    ReasonCode::UNSUPPORTED_PROTOCOL_VERSION,
    ReasonCode::CLIENT_IDENTIFIER_NOT_VALID,
    ReasonCode::BAD_USER_NAME_OR_PASSWORD,
    ReasonCode::NOT_AUTHORIZED,
    ReasonCode::SERVER_UNAVAILABLE,
    ReasonCode::SERVER_BUSY,
    ReasonCode::BANNED,
    ReasonCode::BAD_AUTHENTICATION_METHOD,
    ReasonCode::TOPIC_NAME_INVALID,
    ReasonCode::PACKET_TOO_LARGE,
    ReasonCode::QUOTA_EXCEEDED,
    ReasonCode::PAYLOAD_FORMAT_INVALID,
    ReasonCode::RETAIN_NOT_SUPPORTED,
    ReasonCode::QOS_NOT_SUPPORTED,
    ReasonCode::USE_ANOTHER_SERVER,
    ReasonCode::SERVER_MOVED,
    ReasonCode::CONNECTION_RATE_EXCEEDED,
];

/// Reason codes allowed in PUBACK and PUBREC (§3.4.2.1, §3.5.2.1).
const PUBACK_PUBREC_CODES: &[ReasonCode] = &[
    ReasonCode::SUCCESS,
    ReasonCode::NO_MATCHING_SUBSCRIBERS,
    ReasonCode::UNSPECIFIED_ERROR,
    ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR,
    ReasonCode::NOT_AUTHORIZED,
    ReasonCode::TOPIC_NAME_INVALID,
    ReasonCode::PACKET_IDENTIFIER_IN_USE,
    ReasonCode::QUOTA_EXCEEDED,
    ReasonCode::PAYLOAD_FORMAT_INVALID,
];

/// Reason codes allowed in PUBREL and PUBCOMP (§3.6.2.1, §3.7.2.1).
const PUBREL_PUBCOMP_CODES: &[ReasonCode] =
    &[ReasonCode::SUCCESS, ReasonCode::PACKET_IDENTIFIER_NOT_FOUND];

/// Reason codes allowed in MQTT 3.1.1 SUBACK (§3.9.3): the granted QoS or failure.
const V3_SUBACK_CODES: &[ReasonCode] = &[
    ReasonCode::GRANTED_QOS_0,
    ReasonCode::GRANTED_QOS_1,
    ReasonCode::GRANTED_QOS_2,
    ReasonCode::UNSPECIFIED_ERROR,
];

/// Reason codes allowed in MQTT 5 SUBACK (§3.9.3).
const SUBACK_CODES: &[ReasonCode] = &[
    ReasonCode::GRANTED_QOS_0,
    ReasonCode::GRANTED_QOS_1,
    ReasonCode::GRANTED_QOS_2,
    ReasonCode::UNSPECIFIED_ERROR,
    ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR,
    ReasonCode::NOT_AUTHORIZED,
    ReasonCode::TOPIC_FILTER_INVALID,
    ReasonCode::PACKET_IDENTIFIER_IN_USE,
    ReasonCode::QUOTA_EXCEEDED,
    ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
    ReasonCode::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
    ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
];

/// Reason codes allowed in MQTT 5 UNSUBACK (§3.11.3).
const UNSUBACK_CODES: &[ReasonCode] = &[
    ReasonCode::SUCCESS,
    ReasonCode::NO_SUBSCRIPTION_EXISTED,
    ReasonCode::UNSPECIFIED_ERROR,
    ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR,
    ReasonCode::NOT_AUTHORIZED,
    ReasonCode::TOPIC_FILTER_INVALID,
    ReasonCode::PACKET_IDENTIFIER_IN_USE,
];

/// Reason codes allowed in MQTT 5 DISCONNECT (§3.14.2.1), from either side.
const DISCONNECT_CODES: &[ReasonCode] = &[
    ReasonCode::NORMAL_DISCONNECTION,
    ReasonCode::DISCONNECT_WITH_WILL_MESSAGE,
    ReasonCode::UNSPECIFIED_ERROR,
    ReasonCode::MALFORMED_PACKET,
    ReasonCode::PROTOCOL_ERROR,
    ReasonCode::IMPLEMENTATION_SPECIFIC_ERROR,
    ReasonCode::NOT_AUTHORIZED,
    ReasonCode::SERVER_BUSY,
    ReasonCode::SERVER_SHUTTING_DOWN,
    ReasonCode::KEEP_ALIVE_TIMEOUT,
    ReasonCode::SESSION_TAKEN_OVER,
    ReasonCode::TOPIC_FILTER_INVALID,
    ReasonCode::TOPIC_NAME_INVALID,
    ReasonCode::RECEIVE_MAXIMUM_EXCEEDED,
    ReasonCode::TOPIC_ALIAS_INVALID,
    ReasonCode::PACKET_TOO_LARGE,
    ReasonCode::MESSAGE_RATE_TOO_HIGH,
    ReasonCode::QUOTA_EXCEEDED,
    ReasonCode::ADMINISTRATIVE_ACTION,
    ReasonCode::PAYLOAD_FORMAT_INVALID,
    ReasonCode::RETAIN_NOT_SUPPORTED,
    ReasonCode::QOS_NOT_SUPPORTED,
    ReasonCode::USE_ANOTHER_SERVER,
    ReasonCode::SERVER_MOVED,
    ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED,
    ReasonCode::CONNECTION_RATE_EXCEEDED,
    ReasonCode::MAXIMUM_CONNECT_TIME,
    ReasonCode::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
    ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED,
];

/// Reason codes allowed in AUTH (§3.15.2.1).
const AUTH_CODES: &[ReasonCode] = &[
    ReasonCode::SUCCESS,
    ReasonCode::CONTINUE_AUTHENTICATION,
    ReasonCode::RE_AUTHENTICATE,
];

/// Reads a reason code byte, which must be one of `allowed`.
fn reason_code(
    r: &mut Reader,
    packet_type: PacketType,
    allowed: &[ReasonCode],
) -> Result<ReasonCode, DecodeError> {
    let code = r.u8()?;
    if allowed.contains(&ReasonCode(code)) {
        Ok(ReasonCode(code))
    } else {
        Err(DecodeError::InvalidReasonCode { code, packet_type })
    }
}

/// Reads a property section on MQTT 5; MQTT 3.x packets have none.
fn v5_properties<P: PropertySet>(
    r: &mut Reader,
    v5: bool,
    packet_type: PacketType,
) -> Result<P, DecodeError> {
    if v5 {
        read_properties(r, packet_type)
    } else {
        Ok(P::default())
    }
}

/// The optional reason code and properties that end MQTT 5 PUBACK, PUBREC, PUBREL, PUBCOMP,
/// DISCONNECT and AUTH. Both are absent (Success, no properties) when the body ends here. After
/// the reason code, the properties may be left out too, except in AUTH (§3.15.2.2.1).
fn reason_tail<P: PropertySet>(
    r: &mut Reader,
    packet_type: PacketType,
    allowed: &[ReasonCode],
) -> Result<(ReasonCode, P), DecodeError> {
    if r.is_empty() {
        return Ok((ReasonCode::SUCCESS, P::default()));
    }
    let code = reason_code(r, packet_type, allowed)?;
    let properties = if r.is_empty() && packet_type != PacketType::Auth {
        P::default()
    } else {
        read_properties(r, packet_type)?
    };
    Ok((code, properties))
}

/// CONNECT (§3.1), decoded according to the protocol level it announces.
fn connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.binary()?;
    let level = r.u8()?;
    let protocol = match (&name[..], level) {
        (b"MQIsdp", 3) => ProtocolVersion::V3_1,
        (b"MQTT", 4) => ProtocolVersion::V3_1_1,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQIsdp" | b"MQTT", _) => return Err(DecodeError::UnsupportedProtocolVersion(level)),
        _ => return Err(DecodeError::InvalidProtocolName),
    };
    let v5 = protocol.is_v5();

    let flags = r.u8()?;
    let invalid_flags = DecodeError::InvalidConnectFlags(flags);
    let has_username = flags & 0b1000_0000 != 0;
    let has_password = flags & 0b0100_0000 != 0;
    let will_retain = flags & 0b0010_0000 != 0;
    let will_qos = (flags >> 3) & 0b11;
    let has_will = flags & 0b0000_0100 != 0;
    let clean_start = flags & 0b0000_0010 != 0;
    // The reserved bit must be 0 [MQTT-3.1.2-3].
    if flags & 0b0000_0001 != 0 {
        return Err(invalid_flags);
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::InvalidQoS(will_qos))?;
    // Without a will, will QoS and retain must be 0 [MQTT-3.1.2-11, MQTT-3.1.2-13, MQTT-3.1.2-15].
    if !has_will && (will_qos != QoS::AtMostOnce || will_retain) {
        return Err(invalid_flags);
    }
    // MQTT 3.x requires a user name with a password [MQTT-3.1.2-22]; MQTT 5 dropped the rule.
    if has_password && !has_username && !v5 {
        return Err(invalid_flags);
    }

    let keep_alive = r.u16()?;
    let properties: ConnectProperties = v5_properties(r, v5, PacketType::Connect)?;
    if properties.authentication_data.is_some() && properties.authentication_method.is_none() {
        return Err(DecodeError::AuthenticationDataWithoutMethod);
    }
    let client_id = r.string()?;
    let will = if has_will {
        let properties = v5_properties(r, v5, PacketType::Connect)?;
        let topic = r.topic_name()?;
        if topic.is_empty() {
            return Err(DecodeError::EmptyTopicName);
        }
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = has_username.then(|| r.string()).transpose()?;
    let password = has_password.then(|| r.binary()).transpose()?;

    Ok(Connect {
        protocol,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

/// CONNACK (§3.2).
fn connack(r: &mut Reader, version: ProtocolVersion) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    // Bits 7-1 are reserved [MQTT-3.2.2-1]. MQTT 3.1 has no Session Present flag.
    if flags & 0b1111_1110 != 0 {
        return Err(DecodeError::InvalidConnAckFlags(flags));
    }
    let session_present = flags == 1 && version != ProtocolVersion::V3_1;
    let (reason_code, properties) = if version.is_v5() {
        let code = reason_code(r, PacketType::ConnAck, CONNACK_CODES)?;
        (code, read_properties(r, PacketType::ConnAck)?)
    } else {
        let code = r.u8()?;
        let reason = ReasonCode::from_v3_connack(code).ok_or(DecodeError::InvalidReasonCode {
            code,
            packet_type: PacketType::ConnAck,
        })?;
        (reason, ConnAckProperties::default())
    };
    Ok(ConnAck {
        session_present,
        reason_code,
        properties,
    })
}

/// PUBACK, PUBREC, PUBREL and PUBCOMP (§3.4-§3.7).
fn pub_response(
    r: &mut Reader,
    v5: bool,
    packet_type: PacketType,
) -> Result<PubResponse, DecodeError> {
    let packet_id = r.packet_id()?;
    if !v5 {
        return Ok(PubResponse::success(packet_id));
    }
    let allowed = match packet_type {
        PacketType::PubAck | PacketType::PubRec => PUBACK_PUBREC_CODES,
        _ => PUBREL_PUBCOMP_CODES,
    };
    let (reason_code, properties) = reason_tail(r, packet_type, allowed)?;
    Ok(PubResponse {
        packet_id,
        reason_code,
        properties,
    })
}

/// The Subscription Options byte (MQTT 5 §3.8.3.1; MQTT 3.x has only the QoS bits).
fn subscription_options(byte: u8, v5: bool) -> Result<SubscriptionOptions, DecodeError> {
    let reserved = if v5 { 0b1100_0000 } else { 0b1111_1100 };
    let retain_handling = match (byte >> 4) & 0b11 {
        0 => RetainHandling::SendAtSubscribe,
        1 => RetainHandling::SendIfNew,
        2 => RetainHandling::DoNotSend,
        _ => return Err(DecodeError::InvalidSubscriptionOptions(byte)),
    };
    if byte & reserved != 0 {
        return Err(DecodeError::InvalidSubscriptionOptions(byte));
    }
    let qos = byte & 0b11;
    Ok(SubscriptionOptions {
        qos: QoS::from_u8(qos).ok_or(DecodeError::InvalidQoS(qos))?,
        no_local: byte & 0b0100 != 0,
        retain_as_published: byte & 0b1000 != 0,
        retain_handling,
    })
}

/// SUBSCRIBE (§3.8). Filters are only checked to be UTF-8: the broker validates their syntax so
/// it can refuse each one with its own reason code.
fn subscribe(r: &mut Reader, v5: bool) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = v5_properties(r, v5, PacketType::Subscribe)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        let filter = r.string()?;
        let options = subscription_options(r.u8()?, v5)?;
        filters.push(SubscribeFilter { filter, options });
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters(PacketType::Subscribe));
    }
    Ok(Subscribe {
        packet_id,
        properties,
        filters,
    })
}

/// SUBACK (§3.9).
fn suback(r: &mut Reader, v5: bool) -> Result<SubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = v5_properties(r, v5, PacketType::SubAck)?;
    let allowed = if v5 { SUBACK_CODES } else { V3_SUBACK_CODES };
    let reason_codes = reason_codes(r, PacketType::SubAck, allowed)?;
    Ok(SubAck {
        packet_id,
        properties,
        reason_codes,
    })
}

/// UNSUBSCRIBE (§3.10).
fn unsubscribe(r: &mut Reader, v5: bool) -> Result<Unsubscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = v5_properties(r, v5, PacketType::Unsubscribe)?;
    let mut filters = Vec::new();
    while !r.is_empty() {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::NoTopicFilters(PacketType::Unsubscribe));
    }
    Ok(Unsubscribe {
        packet_id,
        properties,
        filters,
    })
}

/// UNSUBACK (§3.11): MQTT 3.x has only the packet identifier.
fn unsuback(r: &mut Reader, v5: bool) -> Result<UnsubAck, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = v5_properties(r, v5, PacketType::UnsubAck)?;
    let reason_codes = if v5 {
        reason_codes(r, PacketType::UnsubAck, UNSUBACK_CODES)?
    } else {
        Vec::new()
    };
    Ok(UnsubAck {
        packet_id,
        properties,
        reason_codes,
    })
}

/// The payload of SUBACK and MQTT 5 UNSUBACK: reason codes up to the end of the packet.
fn reason_codes(
    r: &mut Reader,
    packet_type: PacketType,
    allowed: &[ReasonCode],
) -> Result<Vec<ReasonCode>, DecodeError> {
    let mut codes = Vec::new();
    while !r.is_empty() {
        codes.push(reason_code(r, packet_type, allowed)?);
    }
    Ok(codes)
}

/// DISCONNECT (§3.14): MQTT 3.x has no variable header.
fn disconnect(r: &mut Reader, v5: bool) -> Result<Disconnect, DecodeError> {
    if !v5 {
        return Ok(Disconnect::default());
    }
    let (reason_code, properties) = reason_tail(r, PacketType::Disconnect, DISCONNECT_CODES)?;
    Ok(Disconnect {
        reason_code,
        properties,
    })
}

/// AUTH (§3.15), MQTT 5 only: the fixed header already rejected it on 3.x.
fn auth(r: &mut Reader) -> Result<Auth, DecodeError> {
    let (reason_code, properties) = reason_tail(r, PacketType::Auth, AUTH_CODES)?;
    Ok(Auth {
        reason_code,
        properties,
    })
}
