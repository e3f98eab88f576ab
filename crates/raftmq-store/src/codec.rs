//! The compact binary encoding of Raft log values and metadata (postcard, serde-based).

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::StoreError;

/// Serializes `value` with postcard.
pub(crate) fn encode<T: Serialize + ?Sized>(
    what: &'static str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(|source| StoreError::Encode { what, source })
}

/// Deserializes a postcard value.
pub(crate) fn decode<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|source| StoreError::Decode { what, source })
}
