//! Broker counters kept as atomics on the hot path; the server exports them as metrics and
//! `$SYS` topics periodically, so a publish never touches a metrics registry.

use crate::limits::Limit;
use raftmq_codec::ReasonCode;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

/// Why authentication refused a connection (the `reason` label of
/// `raftmq_auth_failures_total`), from the CONNACK code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// 0x86 Bad user name or password.
    BadCredentials,
    /// 0x87 Not authorized (anonymous refused, authentication service said no or timed out).
    NotAuthorized,
    /// 0x88 Server unavailable / 0x89 Server busy.
    Unavailable,
    /// Anything else (0x8A Banned...).
    Other,
}

impl AuthFailure {
    /// Every reason, for exporting.
    pub const ALL: [AuthFailure; 4] = [
        Self::BadCredentials,
        Self::NotAuthorized,
        Self::Unavailable,
        Self::Other,
    ];

    /// The reason a refusal with `code` counts as.
    pub fn from_code(code: ReasonCode) -> Self {
        match code {
            ReasonCode::BAD_USER_NAME_OR_PASSWORD => Self::BadCredentials,
            ReasonCode::NOT_AUTHORIZED => Self::NotAuthorized,
            ReasonCode::SERVER_UNAVAILABLE | ReasonCode::SERVER_BUSY => Self::Unavailable,
            _ => Self::Other,
        }
    }

    /// The stable label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadCredentials => "bad_credentials",
            Self::NotAuthorized => "not_authorized",
            Self::Unavailable => "unavailable",
            Self::Other => "other",
        }
    }
}

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
    /// The subscriber may not receive messages on this topic (an ACL in `message` mode).
    NotAuthorized,
}

impl DropReason {
    /// Every reason, for exporting.
    pub const ALL: [DropReason; 5] = [
        Self::QueueFull,
        Self::Expired,
        Self::TooLarge,
        Self::Offline,
        Self::NotAuthorized,
    ];

    /// The stable label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Expired => "expired",
            Self::TooLarge => "too_large",
            Self::Offline => "offline_qos0",
            Self::NotAuthorized => "not_authorized",
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
    pub messages_dropped: [AtomicU64; 5],
    /// PUBLISH refused by authorization.
    pub publish_denied: AtomicU64,
    /// Connections refused by authentication.
    pub auth_failures: AtomicU64,
    /// Connections refused by authentication, by [`AuthFailure`] (as in `AuthFailure::ALL`).
    pub auth_failures_by_reason: [AtomicU64; 4],
    /// SUBSCRIBE filters refused by authorization.
    pub subscribe_denied: AtomicU64,
    /// Times a configured limit was hit, by [`Limit`] (as in `Limit::ALL`).
    pub limits_exceeded: [AtomicU64; 5],
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
    /// Times a publishing client was not read from because a subscriber's queue was filling
    /// (`mqtt.backpressure_max_pause`).
    pub publishers_paused: AtomicU64,
    /// Times a paused publisher waited the longest pause and the subscriber was marked stalled.
    pub backpressure_timeouts: AtomicU64,
}

impl BrokerStats {
    /// Counts a connection refused by authentication with `code`.
    pub fn auth_failed(&self, code: ReasonCode) {
        self.auth_failures.fetch_add(1, Relaxed);
        let reason = AuthFailure::from_code(code);
        let i = AuthFailure::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.auth_failures_by_reason[i].fetch_add(1, Relaxed);
    }

    /// Connections refused for `reason` so far.
    pub fn auth_failure_count(&self, reason: AuthFailure) -> u64 {
        let i = AuthFailure::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.auth_failures_by_reason[i].load(Relaxed)
    }

    /// Counts one hit of `limit`.
    pub fn limit_exceeded(&self, limit: Limit) {
        let i = Limit::ALL.iter().position(|l| *l == limit).unwrap_or(0);
        self.limits_exceeded[i].fetch_add(1, Relaxed);
    }

    /// Hits of `limit` so far.
    pub fn limit_exceeded_count(&self, limit: Limit) -> u64 {
        let i = Limit::ALL.iter().position(|l| *l == limit).unwrap_or(0);
        self.limits_exceeded[i].load(Relaxed)
    }

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

/// Time from a message's arrival at the broker (at the node it was published on) to its
/// PUBLISH being handed to a subscriber's connection (histogram, seconds). Recorded through the
/// `metrics` facade: a no-op until the binary installs a recorder.
pub const DELIVERY_LATENCY_SECONDS: &str = "raftmq_messages_delivery_latency_seconds";
