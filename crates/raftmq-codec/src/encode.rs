//! Encoding: the inverse of [`decode`](crate::decode) for valid packets.
//!
//! The remaining length of a packet is computed from its fields ([`remaining_len`]) without
//! writing anything, so [`encode`] reserves the whole packet once and then writes every field
//! straight into the caller's buffer, and [`encoded_len`] costs no encoding. `remaining_len` and
//! `put_body` mirror each other field by field.
//!
//! Fields a protocol version lacks are left out (properties and most reason codes on 3.x), and
//! 3.x CONNACK and SUBACK codes are mapped with [`ReasonCode::to_v3_connack`] and
//! [`ReasonCode::to_v3_suback`]. MQTT 5 PUBACK/PUBREC/PUBREL/PUBCOMP, DISCONNECT and AUTH use
//! the shortest form their content allows.
//!
//! Values are not validated beyond what is needed to produce well-formed bytes: building packets
//! that respect the protocol's rules is the caller's job.

use crate::property_codec::{PropertySet, properties_len, put_section, section_len};
use crate::wire::{VAR_INT_MAX, prefixed_len, put_prefixed, put_var_int, var_int_len};
use crate::*;
use bytes::{BufMut, BytesMut};

/// Appends the encoding of `packet` for `version` to `buf`. Fields the version does not have are
/// left out (MQTT 5 properties and reason codes on 3.x; 3.x CONNACK/SUBACK codes are mapped).
/// CONNECT is encoded for the protocol it names, whatever `version` is.
///
/// On error `buf` is left as it was.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    if matches!(packet, Packet::Auth(_)) && !version.is_v5() {
        return Err(EncodeError::NotInVersion(PacketType::Auth));
    }
    let remaining = remaining_len(packet, version);
    let size = packet_len(remaining);
    if remaining > VAR_INT_MAX as usize {
        return Err(EncodeError::PacketTooLarge(size));
    }
    let start = buf.len();
    buf.reserve(size);
    buf.put_u8(first_byte(packet));
    put_var_int(buf, remaining);
    if let Err(error) = put_body(packet, version, buf) {
        buf.truncate(start);
        return Err(error);
    }
    debug_assert_eq!(
        buf.len() - start,
        size,
        "remaining_len and put_body disagree"
    );
    Ok(())
}

/// The exact number of bytes [`encode`] would append (used to honour a peer's Maximum Packet Size
/// before sending).
pub fn encoded_len(packet: &Packet, version: ProtocolVersion) -> usize {
    packet_len(remaining_len(packet, version))
}

/// Size of a whole packet with a body of `remaining` bytes.
fn packet_len(remaining: usize) -> usize {
    1 + var_int_len(remaining) + remaining
}

/// The first byte of the fixed header: packet type and flags (§2.1.2).
fn first_byte(packet: &Packet) -> u8 {
    let flags = match packet {
        Packet::Publish(publish) => {
            // DUP must be 0 at QoS 0 [MQTT-3.3.1-2]; a PUBLISH downgraded to QoS 0 drops it.
            let dup = publish.dup && publish.qos != QoS::AtMostOnce;
            (u8::from(dup) << 3) | (publish.qos.as_u8() << 1) | u8::from(publish.retain)
        }
        Packet::PubRel(_) | Packet::Subscribe(_) | Packet::Unsubscribe(_) => 0b0010,
        _ => 0,
    };
    ((packet.packet_type() as u8) << 4) | flags
}

/// Length of the variable header and payload of `packet`: what [`put_body`] writes.
fn remaining_len(packet: &Packet, version: ProtocolVersion) -> usize {
    let v5 = version.is_v5();
    match packet {
        Packet::Connect(connect) => connect_len(connect),
        Packet::ConnAck(connack) => 2 + v5_section_len(v5, &connack.properties),
        Packet::Publish(publish) => {
            prefixed_len(publish.topic.as_bytes())
                + if publish.qos == QoS::AtMostOnce { 0 } else { 2 }
                + v5_section_len(v5, &publish.properties)
                + publish.payload.len()
        }
        Packet::PubAck(response)
        | Packet::PubRec(response)
        | Packet::PubRel(response)
        | Packet::PubComp(response)
            if v5 =>
        {
            2 + ReasonTail::new(response.reason_code, &response.properties).len()
        }
        Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubRel(_) | Packet::PubComp(_) => 2,
        Packet::Subscribe(subscribe) => {
            2 + v5_section_len(v5, &subscribe.properties)
                + subscribe
                    .filters
                    .iter()
                    .map(|f| prefixed_len(f.filter.as_bytes()) + 1)
                    .sum::<usize>()
        }
        Packet::SubAck(suback) => {
            2 + v5_section_len(v5, &suback.properties) + suback.reason_codes.len()
        }
        Packet::Unsubscribe(unsubscribe) => {
            2 + v5_section_len(v5, &unsubscribe.properties)
                + unsubscribe
                    .filters
                    .iter()
                    .map(|f| prefixed_len(f.as_bytes()))
                    .sum::<usize>()
        }
        Packet::UnsubAck(unsuback) if v5 => {
            2 + section_len(&unsuback.properties) + unsuback.reason_codes.len()
        }
        Packet::UnsubAck(_) => 2,
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(disconnect) if v5 => {
            ReasonTail::new(disconnect.reason_code, &disconnect.properties).len()
        }
        Packet::Disconnect(_) => 0,
        Packet::Auth(auth) => ReasonTail::auth(auth.reason_code, &auth.properties).len(),
    }
}

/// Writes the variable header and payload of `packet`.
fn put_body(
    packet: &Packet,
    version: ProtocolVersion,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    let v5 = version.is_v5();
    match packet {
        Packet::Connect(connect) => put_connect(connect, buf)?,
        Packet::ConnAck(connack) => {
            // MQTT 3.1 has no Session Present flag: the byte is reserved.
            buf.put_u8(u8::from(
                connack.session_present && version != ProtocolVersion::V3_1,
            ));
            if v5 {
                buf.put_u8(connack.reason_code.0);
                put_section(&connack.properties, buf)?;
            } else {
                buf.put_u8(connack.reason_code.to_v3_connack());
            }
        }
        Packet::Publish(publish) => {
            put_prefixed(buf, publish.topic.as_bytes())?;
            if publish.qos != QoS::AtMostOnce {
                let packet_id = publish.packet_id.ok_or(EncodeError::MissingPacketId)?;
                buf.put_u16(packet_id.get());
            }
            put_v5_section(v5, &publish.properties, buf)?;
            buf.put_slice(&publish.payload);
        }
        Packet::PubAck(response)
        | Packet::PubRec(response)
        | Packet::PubRel(response)
        | Packet::PubComp(response) => {
            buf.put_u16(response.packet_id.get());
            if v5 {
                ReasonTail::new(response.reason_code, &response.properties).put(buf)?;
            }
        }
        Packet::Subscribe(subscribe) => {
            buf.put_u16(subscribe.packet_id.get());
            put_v5_section(v5, &subscribe.properties, buf)?;
            for filter in &subscribe.filters {
                put_prefixed(buf, filter.filter.as_bytes())?;
                buf.put_u8(options_byte(filter.options, v5));
            }
        }
        Packet::SubAck(suback) => {
            buf.put_u16(suback.packet_id.get());
            put_v5_section(v5, &suback.properties, buf)?;
            for code in &suback.reason_codes {
                buf.put_u8(if v5 { code.0 } else { code.to_v3_suback() });
            }
        }
        Packet::Unsubscribe(unsubscribe) => {
            buf.put_u16(unsubscribe.packet_id.get());
            put_v5_section(v5, &unsubscribe.properties, buf)?;
            for filter in &unsubscribe.filters {
                put_prefixed(buf, filter.as_bytes())?;
            }
        }
        Packet::UnsubAck(unsuback) => {
            buf.put_u16(unsuback.packet_id.get());
            if v5 {
                put_section(&unsuback.properties, buf)?;
                buf.extend(unsuback.reason_codes.iter().map(|code| code.0));
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(disconnect) => {
            if v5 {
                ReasonTail::new(disconnect.reason_code, &disconnect.properties).put(buf)?;
            }
        }
        Packet::Auth(auth) => ReasonTail::auth(auth.reason_code, &auth.properties).put(buf)?,
    }
    Ok(())
}

/// Size of a property section on MQTT 5, 0 on 3.x.
fn v5_section_len(v5: bool, properties: &impl PropertySet) -> usize {
    if v5 { section_len(properties) } else { 0 }
}

/// Writes a property section on MQTT 5, nothing on 3.x.
fn put_v5_section(
    v5: bool,
    properties: &impl PropertySet,
    buf: &mut BytesMut,
) -> Result<(), EncodeError> {
    if v5 {
        put_section(properties, buf)
    } else {
        Ok(())
    }
}

/// The optional reason code and properties that end MQTT 5 PUBACK, PUBREC, PUBREL, PUBCOMP,
/// DISCONNECT and AUTH, in the shortest form: nothing for Success without properties, the reason
/// code alone without properties (not allowed in AUTH, §3.15.2.2.1), else both.
enum ReasonTail<'a, P> {
    Omitted,
    Code(ReasonCode),
    Full(ReasonCode, &'a P),
}

impl<'a, P: PropertySet> ReasonTail<'a, P> {
    /// The tail of PUBACK, PUBREC, PUBREL, PUBCOMP or DISCONNECT.
    fn new(code: ReasonCode, properties: &'a P) -> Self {
        match (code, properties_len(properties)) {
            (ReasonCode::SUCCESS, 0) => ReasonTail::Omitted,
            (code, 0) => ReasonTail::Code(code),
            (code, _) => ReasonTail::Full(code, properties),
        }
    }

    /// The tail of AUTH, which has no form with a reason code alone.
    fn auth(code: ReasonCode, properties: &'a P) -> Self {
        match Self::new(code, properties) {
            ReasonTail::Code(code) => ReasonTail::Full(code, properties),
            tail => tail,
        }
    }

    fn len(&self) -> usize {
        match self {
            ReasonTail::Omitted => 0,
            ReasonTail::Code(_) => 1,
            ReasonTail::Full(_, properties) => 1 + section_len(*properties),
        }
    }

    fn put(&self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            ReasonTail::Omitted => Ok(()),
            ReasonTail::Code(code) => {
                buf.put_u8(code.0);
                Ok(())
            }
            ReasonTail::Full(code, properties) => {
                buf.put_u8(code.0);
                put_section(*properties, buf)
            }
        }
    }
}

/// The Subscription Options byte (MQTT 5 §3.8.3.1); MQTT 3.x has only the QoS.
fn options_byte(options: SubscriptionOptions, v5: bool) -> u8 {
    let qos = options.qos.as_u8();
    if !v5 {
        return qos;
    }
    qos | (u8::from(options.no_local) << 2)
        | (u8::from(options.retain_as_published) << 3)
        | ((options.retain_handling as u8) << 4)
}

/// The protocol name CONNECT announces for `protocol` (§3.1.2.1).
fn protocol_name(protocol: ProtocolVersion) -> &'static [u8] {
    match protocol {
        ProtocolVersion::V3_1 => b"MQIsdp",
        ProtocolVersion::V3_1_1 | ProtocolVersion::V5 => b"MQTT",
    }
}

/// Length of a CONNECT body (§3.1), for the protocol it names.
fn connect_len(connect: &Connect) -> usize {
    let v5 = connect.protocol.is_v5();
    let will = connect.will.as_ref().map_or(0, |will| {
        v5_section_len(v5, &will.properties)
            + prefixed_len(will.topic.as_bytes())
            + prefixed_len(&will.payload)
    });
    prefixed_len(protocol_name(connect.protocol))
        + 1 // protocol level
        + 1 // connect flags
        + 2 // keep alive
        + v5_section_len(v5, &connect.properties)
        + prefixed_len(connect.client_id.as_bytes())
        + will
        + connect.username.as_ref().map_or(0, |username| prefixed_len(username.as_bytes()))
        + connect.password.as_ref().map_or(0, |password| prefixed_len(password))
}

/// Writes a CONNECT body.
fn put_connect(connect: &Connect, buf: &mut BytesMut) -> Result<(), EncodeError> {
    let v5 = connect.protocol.is_v5();
    put_prefixed(buf, protocol_name(connect.protocol))?;
    buf.put_u8(connect.protocol.level());
    buf.put_u8(connect_flags(connect));
    buf.put_u16(connect.keep_alive);
    put_v5_section(v5, &connect.properties, buf)?;
    put_prefixed(buf, connect.client_id.as_bytes())?;
    if let Some(will) = &connect.will {
        put_v5_section(v5, &will.properties, buf)?;
        put_prefixed(buf, will.topic.as_bytes())?;
        put_prefixed(buf, &will.payload)?;
    }
    if let Some(username) = &connect.username {
        put_prefixed(buf, username.as_bytes())?;
    }
    if let Some(password) = &connect.password {
        put_prefixed(buf, password)?;
    }
    Ok(())
}

/// The Connect Flags byte (§3.1.2.3).
fn connect_flags(connect: &Connect) -> u8 {
    let will = connect.will.as_ref().map_or(0, |will| {
        (u8::from(will.retain) << 5) | (will.qos.as_u8() << 3) | 0b0000_0100
    });
    (u8::from(connect.username.is_some()) << 7)
        | (u8::from(connect.password.is_some()) << 6)
        | will
        | (u8::from(connect.clean_start) << 1)
}
