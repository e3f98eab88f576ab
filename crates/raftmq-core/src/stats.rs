//! Broker counters kept as atomics on the hot path; the server exports them as metrics and
//! `$SYS` topics periodically, so a publish never touches a metrics registry.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Why a message was not delivered to a session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// The session's queue was full.
    QueueFull,
    /// Message expiry passed before delivery.
    Expired,
    /// Larger than the client's Maximum Packet Size.
    TooLarge,
    /// QoS 0 for an offline session (not queued by configuration).
    Offline,
}

impl DropReason {
    /// Every reason, for exporting.
    pub const ALL: [DropReason; 4] = [
        Self::QueueFull,
        Self::Expired,
        Self::TooLarge,
        Self::Offline,
    ];

    /// The stable label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Expired => "expired",
            Self::TooLarge => "too_large",
            Self::Offline => "offline_qos0",
        }
    }
}

/// Monotonic counters and current gauges of one broker.
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// PUBLISH received from clients, by QoS.
    pub messages_received: [AtomicU64; 3],
    /// Payload bytes received.
    pub bytes_received: AtomicU64,
    /// PUBLISH sent to clients, by QoS.
    pub messages_sent: [AtomicU64; 3],
    /// Payload bytes sent.
    pub bytes_sent: AtomicU64,
    /// Published messages that matched no subscription.
    pub messages_unrouted: AtomicU64,
    /// Deliveries dropped, by [`DropReason`] (indexed as in `DropReason::ALL`).
    pub messages_dropped: [AtomicU64; 4],
    /// PUBLISH refused by authorization.
    pub publish_denied: AtomicU64,
    /// Connections refused by authentication.
    pub auth_failures: AtomicU64,
    /// Sessions currently connected.
    pub sessions_online: AtomicI64,
    /// Sessions that exist (online or offline).
    pub sessions_total: AtomicI64,
    /// Messages waiting in session queues.
    pub messages_queued: AtomicI64,
    /// Messages sent and not yet acknowledged.
    pub messages_inflight: AtomicI64,
    /// Wills published.
    pub wills_published: AtomicU64,
    /// Sessions taken over by a new connection with the same client id.
    pub takeovers: AtomicU64,
}

impl BrokerStats {
    pub(crate) fn dropped(&self, reason: DropReason, n: u64) {
        let i = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.messages_dropped[i].fetch_add(n, Relaxed);
    }

    /// Deliveries dropped for `reason` so far.
    pub fn dropped_count(&self, reason: DropReason) -> u64 {
        let i = DropReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.messages_dropped[i].load(Relaxed)
    }
}
