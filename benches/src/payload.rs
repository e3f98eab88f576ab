//! The stamp at the front of every benchmark payload: which run and publisher sent it, its
//! sequence number and when it was sent.
//!
//! Publishers and subscribers live in the same process, so the send time is measured against
//! one process-wide monotonic clock ([`timestamp`]) and latency is a plain subtraction.
//!
//! Layout (big-endian), then zero padding up to the requested payload size:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | run id (messages of other runs or other clients are ignored) |
//! | 4..8 | publisher id |
//! | 8..16 | sequence number, from 0 per publisher |
//! | 16..24 | send time, ns since the process clock's origin |

use bytes::{BufMut, Bytes, BytesMut};
use std::sync::LazyLock;
use std::time::Instant;

/// Size of the stamp: the smallest payload a stamped message can have.
pub const STAMP_LEN: usize = 24;

/// The origin of [`timestamp`].
static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds from the process clock's origin to `at` (0 for instants before it).
pub fn timestamp(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(*ORIGIN).as_nanos()).unwrap_or(u64::MAX)
}

/// The identity and send time of one benchmark message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    pub run: u32,
    pub publisher: u32,
    pub seq: u64,
    /// [`timestamp`] of the moment the message was queued for sending.
    pub sent_ns: u64,
}

impl Stamp {
    /// A payload of `len` bytes (at least [`STAMP_LEN`]) starting with this stamp.
    pub fn to_payload(self, len: usize) -> Bytes {
        let mut buf = BytesMut::with_capacity(len.max(STAMP_LEN));
        buf.put_u32(self.run);
        buf.put_u32(self.publisher);
        buf.put_u64(self.seq);
        buf.put_u64(self.sent_ns);
        buf.resize(len.max(STAMP_LEN), 0);
        buf.freeze()
    }

    /// The stamp of `payload` if it carries one from run `run`.
    pub fn parse(payload: &[u8], run: u32) -> Option<Self> {
        let header: &[u8; STAMP_LEN] = payload.get(..STAMP_LEN)?.try_into().ok()?;
        let u32_at =
            |i: usize| u32::from_be_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
        let u64_at = |i: usize| (u64::from(u32_at(i)) << 32) | u64::from(u32_at(i + 4));
        let stamp = Stamp {
            run: u32_at(0),
            publisher: u32_at(4),
            seq: u64_at(8),
            sent_ns: u64_at(16),
        };
        (stamp.run == run).then_some(stamp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAMP: Stamp = Stamp {
        run: 0xdead_beef,
        publisher: 7,
        seq: 0x0102_0304_0506_0708,
        sent_ns: u64::MAX - 1,
    };

    #[test]
    fn round_trips_and_pads() {
        let payload = STAMP.to_payload(100);
        assert_eq!(payload.len(), 100);
        assert!(payload[STAMP_LEN..].iter().all(|&b| b == 0));
        assert_eq!(Stamp::parse(&payload, STAMP.run), Some(STAMP));
    }

    #[test]
    fn layout_is_big_endian() {
        let payload = STAMP.to_payload(STAMP_LEN);
        assert_eq!(&payload[..8], &[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 7]);
        assert_eq!(&payload[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
    }

    #[test]
    fn short_payloads_grow_to_the_stamp() {
        assert_eq!(STAMP.to_payload(3).len(), STAMP_LEN);
    }

    #[test]
    fn rejects_other_runs_and_short_payloads() {
        let payload = STAMP.to_payload(32);
        assert_eq!(Stamp::parse(&payload, 1), None);
        assert_eq!(Stamp::parse(&payload[..STAMP_LEN - 1], STAMP.run), None);
        assert_eq!(Stamp::parse(b"", STAMP.run), None);
    }

    #[test]
    fn timestamps_are_monotonic() {
        let a = timestamp(Instant::now());
        let b = timestamp(Instant::now());
        assert!(b >= a);
    }
}
