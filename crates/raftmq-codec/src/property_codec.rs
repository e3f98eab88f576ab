//! Reading and writing MQTT 5 property sections (§2.2.2).
//!
//! A property section is a variable byte integer length followed by properties, each an
//! identifier and a value whose data type the identifier fixes. Every properties struct of
//! [`crate::properties`] is declared once below with [`property_set!`], mapping each field to its
//! identifier and value [`Kind`]; the macro derives both the decoder and the encoder from that
//! one list, so the two cannot drift apart.
//!
//! Decoding enforces: identifiers must be known ([`DecodeError::InvalidPropertyId`]) and allowed
//! for the packet ([`DecodeError::PropertyNotAllowed`]); only properties stored in a `Vec`
//! (User Property, and Subscription Identifier in PUBLISH) may repeat
//! ([`DecodeError::DuplicateProperty`]); values must be in range
//! ([`DecodeError::InvalidPropertyValue`]); the section length must exactly cover the properties.

use crate::properties::id;
use crate::wire::{Reader, VAR_INT_MAX, prefixed_len, put_prefixed, put_var_int, var_int_len};
use crate::*;
use bytes::{BufMut, Bytes, BytesMut};
use std::convert::Infallible;

/// Every property identifier MQTT 5 defines.
const KNOWN_IDS: [u8; 27] = [
    id::PAYLOAD_FORMAT_INDICATOR,
    id::MESSAGE_EXPIRY_INTERVAL,
    id::CONTENT_TYPE,
    id::RESPONSE_TOPIC,
    id::CORRELATION_DATA,
    id::SUBSCRIPTION_IDENTIFIER,
    id::SESSION_EXPIRY_INTERVAL,
    id::ASSIGNED_CLIENT_IDENTIFIER,
    id::SERVER_KEEP_ALIVE,
    id::AUTHENTICATION_METHOD,
    id::AUTHENTICATION_DATA,
    id::REQUEST_PROBLEM_INFORMATION,
    id::WILL_DELAY_INTERVAL,
    id::REQUEST_RESPONSE_INFORMATION,
    id::RESPONSE_INFORMATION,
    id::SERVER_REFERENCE,
    id::REASON_STRING,
    id::RECEIVE_MAXIMUM,
    id::TOPIC_ALIAS_MAXIMUM,
    id::TOPIC_ALIAS,
    id::MAXIMUM_QOS,
    id::RETAIN_AVAILABLE,
    id::USER_PROPERTY,
    id::MAXIMUM_PACKET_SIZE,
    id::WILDCARD_SUBSCRIPTION_AVAILABLE,
    id::SUBSCRIPTION_IDENTIFIER_AVAILABLE,
    id::SHARED_SUBSCRIPTION_AVAILABLE,
];

/// The properties one packet (or the will) may carry.
pub(crate) trait PropertySet: Default {
    /// Reads the value of property `property` into `self`. Returns `Ok(false)` if this set does
    /// not contain that property.
    fn read_property(&mut self, property: u8, r: &mut Reader) -> Result<bool, DecodeError>;

    /// Calls `f` with the identifier and value of every property present, in a fixed order.
    fn try_for_each<E>(&self, f: impl FnMut(u8, Value<'_>) -> Result<(), E>) -> Result<(), E>;
}

/// Reads a property section (length and properties) for a packet of type `packet_type`.
pub(crate) fn read_properties<P: PropertySet>(
    r: &mut Reader,
    packet_type: PacketType,
) -> Result<P, DecodeError> {
    let len = r.var_int()?;
    let mut section = r.sub_reader(len as usize)?;
    let mut set = P::default();
    while !section.is_empty() {
        // The identifier is a variable byte integer, but every defined one fits in its first byte;
        // a first byte with the continuation bit is thus an unknown identifier.
        let property = section.u8()?;
        if !KNOWN_IDS.contains(&property) {
            return Err(DecodeError::InvalidPropertyId(property));
        }
        if !set.read_property(property, &mut section)? {
            return Err(DecodeError::PropertyNotAllowed {
                id: property,
                packet_type,
            });
        }
    }
    Ok(set)
}

/// Size of the properties of `set`, without the section's length prefix.
pub(crate) fn properties_len(set: &impl PropertySet) -> usize {
    let mut len = 0;
    let Ok(()) = set.try_for_each::<Infallible>(|_, value| {
        len += 1 + value.len();
        Ok(())
    });
    len
}

/// Size of the whole property section of `set`: length prefix and properties.
pub(crate) fn section_len(set: &impl PropertySet) -> usize {
    let len = properties_len(set);
    var_int_len(len) + len
}

/// Writes the property section of `set`.
pub(crate) fn put_section(set: &impl PropertySet, buf: &mut BytesMut) -> Result<(), EncodeError> {
    put_var_int(buf, properties_len(set));
    set.try_for_each(|property, value| {
        buf.put_u8(property);
        value.write(buf)
    })
}

/// A property value in its wire data type.
#[derive(Clone, Copy)]
pub(crate) enum Value<'a> {
    Byte(u8),
    TwoByte(u16),
    FourByte(u32),
    VarInt(u32),
    /// A UTF-8 string or binary data.
    Prefixed(&'a [u8]),
    StringPair(&'a [u8], &'a [u8]),
}

impl Value<'_> {
    fn len(self) -> usize {
        match self {
            Value::Byte(_) => 1,
            Value::TwoByte(_) => 2,
            Value::FourByte(_) => 4,
            Value::VarInt(v) => var_int_len(v as usize),
            Value::Prefixed(bytes) => prefixed_len(bytes),
            Value::StringPair(name, value) => prefixed_len(name) + prefixed_len(value),
        }
    }

    fn write(self, buf: &mut BytesMut) -> Result<(), EncodeError> {
        match self {
            Value::Byte(v) => buf.put_u8(v),
            Value::TwoByte(v) => buf.put_u16(v),
            Value::FourByte(v) => buf.put_u32(v),
            // The only variable byte integer property is the Subscription Identifier.
            Value::VarInt(v) if v == 0 || v > VAR_INT_MAX => {
                return Err(EncodeError::InvalidSubscriptionIdentifier(v));
            }
            Value::VarInt(v) => put_var_int(buf, v as usize),
            Value::Prefixed(bytes) => put_prefixed(buf, bytes)?,
            Value::StringPair(name, value) => {
                put_prefixed(buf, name)?;
                put_prefixed(buf, value)?;
            }
        }
        Ok(())
    }
}

/// How the value of one kind of property is read, checked and written.
trait Kind {
    type Value;
    fn read(r: &mut Reader, property: u8) -> Result<Self::Value, DecodeError>;
    fn wire(value: &Self::Value) -> Value<'_>;
}

/// Declares a [`Kind`]: the type of its values, how one is read (`r` the reader, `p` the
/// property's identifier, for errors) and how it is written.
macro_rules! kind {
    ($(#[$doc:meta])* $name:ident: $value:ty,
     read($r:ident, $p:pat_param) => $read:expr,
     wire($v:pat_param) => $wire:expr $(,)?) => {
        $(#[$doc])*
        struct $name;
        impl Kind for $name {
            type Value = $value;
            fn read($r: &mut Reader, $p: u8) -> Result<$value, DecodeError> {
                $read
            }
            fn wire($v: &$value) -> Value<'_> {
                $wire
            }
        }
    };
}

kind! {
    /// A byte that must be 0 or 1.
    Flag: bool,
    read(r, property) => match r.u8()? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(DecodeError::InvalidPropertyValue(property)),
    },
    wire(value) => Value::Byte(u8::from(*value)),
}

kind! {
    /// Maximum QoS: a byte that must be 0 or 1.
    MaximumQoS: QoS,
    read(r, property) => Flag::read(r, property).map(|one| {
        if one {
            QoS::AtLeastOnce
        } else {
            QoS::AtMostOnce
        }
    }),
    wire(value) => Value::Byte(value.as_u8()),
}

kind! {
    /// Any two byte integer.
    TwoByte: u16, read(r, _) => r.u16(), wire(value) => Value::TwoByte(*value),
}

kind! {
    /// Any four byte integer.
    FourByte: u32, read(r, _) => r.u32(), wire(value) => Value::FourByte(*value),
}

kind! {
    /// Any variable byte integer (at most 268,435,455).
    VarInt: u32, read(r, _) => r.var_int(), wire(value) => Value::VarInt(*value),
}

/// The values of kind `K` except 0, which is a Protocol Error
/// ([`DecodeError::InvalidPropertyValue`]).
struct NonZero<K>(std::marker::PhantomData<K>);
impl<K: Kind<Value: Default + PartialEq>> Kind for NonZero<K> {
    type Value = K::Value;
    fn read(r: &mut Reader, property: u8) -> Result<K::Value, DecodeError> {
        let value = K::read(r, property)?;
        if value == K::Value::default() {
            return Err(DecodeError::InvalidPropertyValue(property));
        }
        Ok(value)
    }
    fn wire(value: &K::Value) -> Value<'_> {
        K::wire(value)
    }
}

/// A two byte integer that must not be 0.
type NonZeroTwoByte = NonZero<TwoByte>;
/// A four byte integer that must not be 0.
type NonZeroFourByte = NonZero<FourByte>;
/// Subscription Identifier: a variable byte integer, 1..=268,435,455.
type SubscriptionId = NonZero<VarInt>;

kind! {
    /// A UTF-8 encoded string.
    Utf8: ByteStr, read(r, _) => r.string(), wire(value) => Value::Prefixed(value.as_bytes()),
}

kind! {
    /// A UTF-8 encoded string used as a Topic Name (Response Topic): no wildcards.
    TopicName: ByteStr,
    read(r, _) => r.topic_name(),
    wire(value) => Value::Prefixed(value.as_bytes()),
}

kind! {
    /// Binary data.
    Binary: Bytes, read(r, _) => r.binary(), wire(value) => Value::Prefixed(value),
}

kind! {
    /// A UTF-8 string pair (User Property).
    StringPair: (ByteStr, ByteStr),
    read(r, _) => Ok((r.string()?, r.string()?)),
    wire((name, value)) => Value::StringPair(name.as_bytes(), value.as_bytes()),
}

/// Where a property's values are stored: an `Option` holds at most one (a second one is a
/// [`DecodeError::DuplicateProperty`]), a `Vec` any number, in order.
trait Field<T> {
    fn store(&mut self, property: u8, value: T) -> Result<(), DecodeError>;
    fn values(&self) -> &[T];
}

impl<T> Field<T> for Option<T> {
    fn store(&mut self, property: u8, value: T) -> Result<(), DecodeError> {
        if self.is_some() {
            return Err(DecodeError::DuplicateProperty(property));
        }
        *self = Some(value);
        Ok(())
    }
    fn values(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T> Field<T> for Vec<T> {
    fn store(&mut self, _: u8, value: T) -> Result<(), DecodeError> {
        self.push(value);
        Ok(())
    }
    fn values(&self) -> &[T] {
        self
    }
}

/// Implements [`PropertySet`] for a properties struct from its list of
/// `field: IDENTIFIER as Kind`, in the order the encoder writes them.
macro_rules! property_set {
    ($set:ty { $($field:ident: $id:ident as $kind:ty),+ $(,)? }) => {
        impl PropertySet for $set {
            fn read_property(&mut self, property: u8, r: &mut Reader) -> Result<bool, DecodeError> {
                match property {
                    $(id::$id => Field::store(&mut self.$field, property, <$kind>::read(r, property)?)?,)+
                    _ => return Ok(false),
                }
                Ok(true)
            }

            fn try_for_each<E>(
                &self,
                mut f: impl FnMut(u8, Value<'_>) -> Result<(), E>,
            ) -> Result<(), E> {
                $(for value in Field::values(&self.$field) {
                    f(id::$id, <$kind>::wire(value))?;
                })+
                Ok(())
            }
        }
    };
}

property_set!(ConnectProperties {
    session_expiry_interval: SESSION_EXPIRY_INTERVAL as FourByte,
    receive_maximum: RECEIVE_MAXIMUM as NonZeroTwoByte,
    maximum_packet_size: MAXIMUM_PACKET_SIZE as NonZeroFourByte,
    topic_alias_maximum: TOPIC_ALIAS_MAXIMUM as TwoByte,
    request_response_information: REQUEST_RESPONSE_INFORMATION as Flag,
    request_problem_information: REQUEST_PROBLEM_INFORMATION as Flag,
    user_properties: USER_PROPERTY as StringPair,
    authentication_method: AUTHENTICATION_METHOD as Utf8,
    authentication_data: AUTHENTICATION_DATA as Binary,
});

property_set!(WillProperties {
    will_delay_interval: WILL_DELAY_INTERVAL as FourByte,
    payload_format_indicator: PAYLOAD_FORMAT_INDICATOR as Flag,
    message_expiry_interval: MESSAGE_EXPIRY_INTERVAL as FourByte,
    content_type: CONTENT_TYPE as Utf8,
    response_topic: RESPONSE_TOPIC as TopicName,
    correlation_data: CORRELATION_DATA as Binary,
    user_properties: USER_PROPERTY as StringPair,
});

property_set!(ConnAckProperties {
    session_expiry_interval: SESSION_EXPIRY_INTERVAL as FourByte,
    receive_maximum: RECEIVE_MAXIMUM as NonZeroTwoByte,
    maximum_qos: MAXIMUM_QOS as MaximumQoS,
    retain_available: RETAIN_AVAILABLE as Flag,
    maximum_packet_size: MAXIMUM_PACKET_SIZE as NonZeroFourByte,
    assigned_client_identifier: ASSIGNED_CLIENT_IDENTIFIER as Utf8,
    topic_alias_maximum: TOPIC_ALIAS_MAXIMUM as TwoByte,
    reason_string: REASON_STRING as Utf8,
    user_properties: USER_PROPERTY as StringPair,
    wildcard_subscription_available: WILDCARD_SUBSCRIPTION_AVAILABLE as Flag,
    subscription_identifiers_available: SUBSCRIPTION_IDENTIFIER_AVAILABLE as Flag,
    shared_subscription_available: SHARED_SUBSCRIPTION_AVAILABLE as Flag,
    server_keep_alive: SERVER_KEEP_ALIVE as TwoByte,
    response_information: RESPONSE_INFORMATION as Utf8,
    server_reference: SERVER_REFERENCE as Utf8,
    authentication_method: AUTHENTICATION_METHOD as Utf8,
    authentication_data: AUTHENTICATION_DATA as Binary,
});

property_set!(PublishProperties {
    payload_format_indicator: PAYLOAD_FORMAT_INDICATOR as Flag,
    message_expiry_interval: MESSAGE_EXPIRY_INTERVAL as FourByte,
    topic_alias: TOPIC_ALIAS as NonZeroTwoByte,
    response_topic: RESPONSE_TOPIC as TopicName,
    correlation_data: CORRELATION_DATA as Binary,
    user_properties: USER_PROPERTY as StringPair,
    subscription_identifiers: SUBSCRIPTION_IDENTIFIER as SubscriptionId,
    content_type: CONTENT_TYPE as Utf8,
});

property_set!(ReasonProperties {
    reason_string: REASON_STRING as Utf8,
    user_properties: USER_PROPERTY as StringPair,
});

property_set!(SubscribeProperties {
    subscription_identifier: SUBSCRIPTION_IDENTIFIER as SubscriptionId,
    user_properties: USER_PROPERTY as StringPair,
});

property_set!(DisconnectProperties {
    session_expiry_interval: SESSION_EXPIRY_INTERVAL as FourByte,
    reason_string: REASON_STRING as Utf8,
    user_properties: USER_PROPERTY as StringPair,
    server_reference: SERVER_REFERENCE as Utf8,
});

property_set!(AuthProperties {
    authentication_method: AUTHENTICATION_METHOD as Utf8,
    authentication_data: AUTHENTICATION_DATA as Binary,
    reason_string: REASON_STRING as Utf8,
    user_properties: USER_PROPERTY as StringPair,
});

/// UNSUBSCRIBE carries only user properties, held directly as [`UserProperties`].
impl PropertySet for UserProperties {
    fn read_property(&mut self, property: u8, r: &mut Reader) -> Result<bool, DecodeError> {
        if property != id::USER_PROPERTY {
            return Ok(false);
        }
        self.push(StringPair::read(r, property)?);
        Ok(true)
    }

    fn try_for_each<E>(&self, mut f: impl FnMut(u8, Value<'_>) -> Result<(), E>) -> Result<(), E> {
        self.iter()
            .try_for_each(|pair| f(id::USER_PROPERTY, StringPair::wire(pair)))
    }
}
