//! Metric names recorded by the server (listed with meanings in `docs/metrics.md`).
//! Labels are bounded enums only: never a client id, user name or topic.

use metrics::{counter, gauge};
use raftmq_core::Broker;
use raftmq_core::limits::Limit;
use raftmq_core::stats::{AuthFailure, DropReason};
use std::sync::atomic::Ordering::Relaxed;

pub const CONNECTIONS_CURRENT: &str = "raftmq_connections_current";
pub const CONNECTIONS_ACCEPTED_TOTAL: &str = "raftmq_connections_accepted_total";
pub const CONNECTIONS_CLOSED_TOTAL: &str = "raftmq_connections_closed_total";
pub const SESSIONS_ONLINE: &str = "raftmq_sessions_online";
pub const SESSIONS_TOTAL: &str = "raftmq_sessions";
pub const SUBSCRIPTIONS: &str = "raftmq_subscriptions";
pub const RETAINED_MESSAGES: &str = "raftmq_retained_messages";
pub const MESSAGES_RECEIVED_TOTAL: &str = "raftmq_messages_received_total";
pub const MESSAGES_SENT_TOTAL: &str = "raftmq_messages_sent_total";
pub const BYTES_RECEIVED_TOTAL: &str = "raftmq_payload_bytes_received_total";
pub const BYTES_SENT_TOTAL: &str = "raftmq_payload_bytes_sent_total";
pub const MESSAGES_DROPPED_TOTAL: &str = "raftmq_messages_dropped_total";
pub const MESSAGES_UNROUTED_TOTAL: &str = "raftmq_messages_unrouted_total";
pub const MESSAGES_QUEUED: &str = "raftmq_messages_queued";
pub const MESSAGES_INFLIGHT: &str = "raftmq_messages_inflight";
pub const PUBLISH_DENIED_TOTAL: &str = "raftmq_publish_denied_total";
pub const AUTH_FAILURES_TOTAL: &str = "raftmq_auth_failures_total";
pub const WILLS_PUBLISHED_TOTAL: &str = "raftmq_wills_published_total";
pub const SESSION_TAKEOVERS_TOTAL: &str = "raftmq_session_takeovers_total";
pub const DECODE_ERRORS_TOTAL: &str = "raftmq_decode_errors_total";
pub const CONNECTIONS_REJECTED_TOTAL: &str = "raftmq_connections_rejected_total";
pub const TLS_RELOADS_TOTAL: &str = "raftmq_tls_reloads_total";
pub const OVERLOADED: &str = "raftmq_overloaded";
pub const PROCESS_RESIDENT_MEMORY_BYTES: &str = "raftmq_process_resident_memory_bytes";
pub const AUTH_DENIED_TOTAL: &str = "raftmq_auth_denied_total";
pub const AUTH_CACHE_LOOKUPS_TOTAL: &str = "raftmq_auth_cache_lookups_total";
pub const AUTH_CALLOUTS_TOTAL: &str = "raftmq_auth_callouts_total";
pub const AUTH_RELOADS_TOTAL: &str = "raftmq_auth_reloads_total";
pub const AUTH_TOKENS_TOTAL: &str = "raftmq_auth_tokens_total";
pub const LIMITS_EXCEEDED_TOTAL: &str = "raftmq_limits_exceeded_total";
pub const RETAINED_BYTES: &str = "raftmq_retained_bytes";
pub const BACKPRESSURE_PAUSES_TOTAL: &str = "raftmq_backpressure_pauses_total";
pub const BACKPRESSURE_TIMEOUTS_TOTAL: &str = "raftmq_backpressure_timeouts_total";

const QOS_LABELS: [&str; 3] = ["0", "1", "2"];

/// Copies the broker's hot-path atomics into the metrics registry (called periodically).
pub fn export_broker_stats(broker: &Broker) {
    let s = broker.stats();
    for (i, qos) in QOS_LABELS.iter().enumerate() {
        counter!(MESSAGES_RECEIVED_TOTAL, "qos" => *qos)
            .absolute(s.messages_received[i].load(Relaxed));
        counter!(MESSAGES_SENT_TOTAL, "qos" => *qos).absolute(s.messages_sent[i].load(Relaxed));
    }
    for reason in DropReason::ALL {
        counter!(MESSAGES_DROPPED_TOTAL, "reason" => reason.as_str())
            .absolute(s.dropped_count(reason));
    }
    counter!(BYTES_RECEIVED_TOTAL).absolute(s.bytes_received.load(Relaxed));
    counter!(BYTES_SENT_TOTAL).absolute(s.bytes_sent.load(Relaxed));
    counter!(MESSAGES_UNROUTED_TOTAL).absolute(s.messages_unrouted.load(Relaxed));
    counter!(PUBLISH_DENIED_TOTAL).absolute(s.publish_denied.load(Relaxed));
    for reason in AuthFailure::ALL {
        counter!(AUTH_FAILURES_TOTAL, "reason" => reason.as_str())
            .absolute(s.auth_failure_count(reason));
    }
    counter!(AUTH_DENIED_TOTAL, "action" => "publish").absolute(s.publish_denied.load(Relaxed));
    counter!(AUTH_DENIED_TOTAL, "action" => "subscribe").absolute(s.subscribe_denied.load(Relaxed));
    for limit in Limit::ALL {
        counter!(LIMITS_EXCEEDED_TOTAL, "limit" => limit.as_str())
            .absolute(s.limit_exceeded_count(limit));
    }
    gauge!(RETAINED_BYTES).set(broker.retained_bytes() as f64);
    counter!(WILLS_PUBLISHED_TOTAL).absolute(s.wills_published.load(Relaxed));
    counter!(SESSION_TAKEOVERS_TOTAL).absolute(s.takeovers.load(Relaxed));
    counter!(BACKPRESSURE_PAUSES_TOTAL).absolute(s.publishers_paused.load(Relaxed));
    counter!(BACKPRESSURE_TIMEOUTS_TOTAL).absolute(s.backpressure_timeouts.load(Relaxed));
    gauge!(SESSIONS_ONLINE).set(s.sessions_online.load(Relaxed) as f64);
    gauge!(SESSIONS_TOTAL).set(s.sessions_total.load(Relaxed) as f64);
    gauge!(MESSAGES_QUEUED).set(s.messages_queued.load(Relaxed) as f64);
    gauge!(MESSAGES_INFLIGHT).set(s.messages_inflight.load(Relaxed) as f64);
    gauge!(SUBSCRIPTIONS).set(broker.subscription_count() as f64);
    gauge!(RETAINED_MESSAGES).set(broker.retained_count() as f64);
}
