//! The primitive data representations of MQTT (MQTT 5 §1.5, MQTT 3.1.1 §1.5): big-endian
//! integers, variable byte integers, length-prefixed UTF-8 strings and binary data.
//!
//! [`Reader`] reads them from a packet body with a bounds check on every read; the `put_*` and
//! `*_len` functions write them and give their encoded size. Encoded sizes and writes are
//! defined side by side so they cannot disagree.

use crate::{ByteStr, DecodeError, EncodeError, PacketId};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// The largest value a variable byte integer can hold (four bytes of seven bits).
pub(crate) const VAR_INT_MAX: u32 = 268_435_455;

/// A variable byte integer that is longer than four bytes or not in its shortest form.
#[derive(Debug)]
pub(crate) struct MalformedVarInt;

/// Parses the variable byte integer at the start of `bytes`: its value and encoded length, or
/// `None` when `bytes` ends before its last byte.
///
/// MQTT 5 requires the shortest encoding [MQTT-1.5.5-1], so a multi-byte integer whose last
/// byte is zero is malformed. (MQTT 3.1.1 does not say so; no real client sends one either.)
pub(crate) fn parse_var_int(bytes: &[u8]) -> Result<Option<(u32, usize)>, MalformedVarInt> {
    let mut value = 0u32;
    for (index, &byte) in bytes.iter().take(4).enumerate() {
        value |= u32::from(byte & 0x7F) << (7 * index);
        if byte & 0x80 == 0 {
            return if index > 0 && byte == 0 {
                Err(MalformedVarInt)
            } else {
                Ok(Some((value, index + 1)))
            };
        }
    }
    if bytes.len() >= 4 {
        Err(MalformedVarInt)
    } else {
        Ok(None)
    }
}

/// Encoded size of a variable byte integer holding `value`.
pub(crate) fn var_int_len(mut value: usize) -> usize {
    let mut len = 1;
    while value >= 0x80 {
        value >>= 7;
        len += 1;
    }
    len
}

/// Writes `value` as a variable byte integer. Callers ensure `value <= VAR_INT_MAX`.
pub(crate) fn put_var_int(buf: &mut BytesMut, mut value: usize) {
    while value >= 0x80 {
        buf.put_u8((value & 0x7F) as u8 | 0x80);
        value >>= 7;
    }
    buf.put_u8(value as u8);
}

/// Encoded size of a UTF-8 string or binary data field holding `bytes`.
pub(crate) fn prefixed_len(bytes: &[u8]) -> usize {
    2 + bytes.len()
}

/// Writes a UTF-8 string or binary data field: a two-byte length, then the bytes.
pub(crate) fn put_prefixed(buf: &mut BytesMut, bytes: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(bytes.len()).map_err(|_| EncodeError::FieldTooLong(bytes.len()))?;
    buf.put_u16(len);
    buf.put_slice(bytes);
    Ok(())
}

/// True if `topic` contains a wildcard character, which Topic Names must not [MQTT-3.3.2-2].
/// Checking bytes is exact: multi-byte UTF-8 sequences never contain ASCII bytes.
fn has_wildcard(topic: &[u8]) -> bool {
    topic.iter().any(|&b| b == b'+' || b == b'#')
}

/// A bounds-checked cursor over the body of one packet. Fields are split off the underlying
/// [`Bytes`], so strings and payloads share the read buffer.
pub(crate) struct Reader(Bytes);

impl Reader {
    pub(crate) fn new(body: Bytes) -> Self {
        Reader(body)
    }

    /// True when every byte has been read.
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Fails with [`DecodeError::TrailingBytes`] unless every byte has been read.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.0.len() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes(extra)),
        }
    }

    /// The next `len` bytes.
    pub(crate) fn take(&mut self, len: usize) -> Result<Bytes, DecodeError> {
        if len > self.0.len() {
            return Err(self.truncated(len));
        }
        Ok(self.0.split_to(len))
    }

    /// Everything not read yet.
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.0)
    }

    /// A reader over the next `len` bytes, which this reader skips.
    pub(crate) fn sub_reader(&mut self, len: usize) -> Result<Reader, DecodeError> {
        self.take(len).map(Reader)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        self.array().map(|[byte]| byte)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        self.array().map(u16::from_be_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        self.array().map(u32::from_be_bytes)
    }

    pub(crate) fn var_int(&mut self) -> Result<u32, DecodeError> {
        match parse_var_int(&self.0) {
            Ok(Some((value, len))) => {
                self.0.advance(len);
                Ok(value)
            }
            Ok(None) => Err(DecodeError::Truncated { needed: 1 }),
            Err(MalformedVarInt) => Err(DecodeError::MalformedVarInt),
        }
    }

    /// Binary data: a two-byte length, then that many bytes.
    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    /// A UTF-8 encoded string, which must not contain U+0000 [MQTT-1.5.4-1, MQTT-1.5.4-2].
    pub(crate) fn string(&mut self) -> Result<ByteStr, DecodeError> {
        let bytes = self.binary()?;
        let text = ByteStr::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8)?;
        if text.as_bytes().contains(&0) {
            return Err(DecodeError::NullCharacter);
        }
        Ok(text)
    }

    /// A string used as a Topic Name: no wildcards allowed (it may be empty; callers decide).
    pub(crate) fn topic_name(&mut self) -> Result<ByteStr, DecodeError> {
        let topic = self.string()?;
        if has_wildcard(topic.as_bytes()) {
            return Err(DecodeError::WildcardInTopicName);
        }
        Ok(topic)
    }

    pub(crate) fn packet_id(&mut self) -> Result<PacketId, DecodeError> {
        PacketId::new(self.u16()?).ok_or(DecodeError::ZeroPacketId)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let Some((&head, _)) = self.0.split_first_chunk::<N>() else {
            return Err(self.truncated(N));
        };
        self.0.advance(N);
        Ok(head)
    }

    fn truncated(&self, wanted: usize) -> DecodeError {
        DecodeError::Truncated {
            needed: wanted.saturating_sub(self.0.len()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn var_int_boundaries_round_trip() {
        for value in [
            0usize,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            268_435_455,
        ] {
            let mut buf = BytesMut::new();
            put_var_int(&mut buf, value);
            assert_eq!(buf.len(), var_int_len(value));
            let parsed = parse_var_int(&buf).map(|v| v.map(|(v, n)| (v as usize, n)));
            assert!(
                matches!(parsed, Ok(Some(p)) if p == (value, buf.len())),
                "{value}"
            );
        }
    }

    #[test]
    fn var_int_rejects_a_fifth_byte_and_non_minimal_forms() {
        assert!(parse_var_int(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]).is_err());
        assert!(parse_var_int(&[0x80, 0x00]).is_err());
        assert!(parse_var_int(&[0xFF, 0x80, 0x00]).is_err());
        assert!(matches!(parse_var_int(&[0xFF, 0xFF, 0xFF]), Ok(None)));
        assert!(matches!(parse_var_int(&[]), Ok(None)));
    }
}
