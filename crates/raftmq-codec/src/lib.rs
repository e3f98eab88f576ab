//! The MQTT wire format, for protocol levels 3 (MQTT 3.1, "MQIsdp"), 4 (3.1.1) and 5 (5.0).
//!
//! This crate owns packets, properties, reason codes and their exact byte encoding, with the
//! strict validation the specifications demand. It is sans-IO: [`decode`] takes bytes already
//! read and returns `Ok(None)` while a packet is incomplete; [`encode`] appends to a buffer.
//!
//! It must never: do I/O, read the clock, depend on an async runtime, or panic on any input.
//! Every malformed input is a [`DecodeError`] that carries the MQTT reason code the broker must
//! answer with ([`DecodeError::reason_code`]).

mod bytestr;
mod decode;
mod encode;
mod error;
mod packet;
mod properties;
mod property_codec;
mod reason;
mod wire;

pub use bytestr::ByteStr;
pub use decode::decode;
pub use encode::{encode, encoded_len};
pub use error::{DecodeError, EncodeError};
pub use packet::*;
pub use properties::*;
pub use reason::ReasonCode;
