//! Application messages as the broker holds them, and deliveries (a message bound for one session).

use bytes::Bytes;
use raftmq_codec::{ByteStr, PublishProperties, QoS};
use smallvec::SmallVec;
use std::sync::Arc;
use std::time::Instant;

/// A published application message, shared (by `Arc`) between every session it is delivered to
/// and the retained store: fan-out never copies the payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub topic: ByteStr,
    pub payload: Bytes,
    /// The QoS it was published with (the upper bound for every delivery).
    pub qos: QoS,
    /// The RETAIN flag it was published with.
    pub retain: bool,
    /// Properties forwarded to subscribers unchanged (payload format, content type, response
    /// topic, correlation data, user properties). Topic alias and subscription identifiers are
    /// per-connection and never stored here; message expiry is kept as `expires_at`.
    pub properties: PublishProperties,
    /// When the message expires (from Message Expiry Interval), if ever.
    pub expires_at: Option<Instant>,
    /// When the broker received it (for latency metrics and expiry arithmetic).
    pub received_at: Instant,
    /// Client id of the publisher, for No Local; `None` for broker-originated messages.
    pub origin: Option<ByteStr>,
}

impl Message {
    /// True when the message has expired at `now`.
    pub fn is_expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// The Message Expiry Interval to forward at `now`: the remaining lifetime in whole seconds
    /// (rounded up, at least 1), or `None` when the message does not expire.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|at| {
            let left = at.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            u32::try_from(secs.max(1)).unwrap_or(u32::MAX)
        })
    }
}

/// A message bound for one session, with what that session's subscriptions decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub message: Arc<Message>,
    /// min(message QoS, granted subscription QoS).
    pub qos: QoS,
    /// The RETAIN flag to send.
    pub retain: bool,
    /// Identifiers of the matching subscriptions (MQTT 5).
    pub subscription_ids: SmallVec<[u32; 2]>,
    /// Set when the message is stored durably for this (persistent) session.
    pub durable: Option<crate::durability::MessageId>,
}
