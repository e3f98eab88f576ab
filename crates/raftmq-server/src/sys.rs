//! `$SYS/broker/...` topics: broker statistics published periodically as retained QoS 0
//! messages, with the names Mosquitto uses so existing dashboards and scripts keep working.

use bytes::Bytes;
use raftmq_codec::{ByteStr, QoS};
use raftmq_core::{Broker, Message};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Publishes the statistics every `interval` until `stop` changes.
pub(crate) async fn publish_loop(
    broker: Arc<Broker>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let started = Instant::now();
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => publish_once(&broker, started, Instant::now()),
            _ = stop.changed() => return,
        }
    }
}

/// The `$SYS` topics and their current values.
pub(crate) fn snapshot(
    broker: &Broker,
    started: Instant,
    now: Instant,
) -> Vec<(&'static str, String)> {
    let s = broker.stats();
    let sum =
        |a: &[std::sync::atomic::AtomicU64; 3]| a.iter().map(|c| c.load(Relaxed)).sum::<u64>();
    let online = s.sessions_online.load(Relaxed).max(0);
    let total = s.sessions_total.load(Relaxed).max(0);
    let dropped: u64 = raftmq_core::stats::DropReason::ALL
        .iter()
        .map(|r| s.dropped_count(*r))
        .sum();
    vec![
        (
            "$SYS/broker/version",
            format!("raftmq {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", now.duration_since(started).as_secs()),
        ),
        ("$SYS/broker/clients/connected", online.to_string()),
        (
            "$SYS/broker/clients/disconnected",
            (total - online).max(0).to_string(),
        ),
        ("$SYS/broker/clients/total", total.to_string()),
        (
            "$SYS/broker/messages/received",
            sum(&s.messages_received).to_string(),
        ),
        (
            "$SYS/broker/messages/sent",
            sum(&s.messages_sent).to_string(),
        ),
        (
            "$SYS/broker/messages/inflight",
            s.messages_inflight.load(Relaxed).max(0).to_string(),
        ),
        (
            "$SYS/broker/messages/queued",
            s.messages_queued.load(Relaxed).max(0).to_string(),
        ),
        (
            "$SYS/broker/publish/messages/received",
            sum(&s.messages_received).to_string(),
        ),
        (
            "$SYS/broker/publish/messages/sent",
            sum(&s.messages_sent).to_string(),
        ),
        ("$SYS/broker/publish/messages/dropped", dropped.to_string()),
        (
            "$SYS/broker/publish/bytes/received",
            s.bytes_received.load(Relaxed).to_string(),
        ),
        (
            "$SYS/broker/publish/bytes/sent",
            s.bytes_sent.load(Relaxed).to_string(),
        ),
        (
            "$SYS/broker/subscriptions/count",
            broker.subscription_count().to_string(),
        ),
        (
            "$SYS/broker/retained messages/count",
            broker.retained_count().to_string(),
        ),
    ]
}

fn publish_once(broker: &Broker, started: Instant, now: Instant) {
    for (topic, value) in snapshot(broker, started, now) {
        let message = Message {
            topic: ByteStr::from_static(topic),
            payload: Bytes::from(value),
            qos: QoS::AtMostOnce,
            retain: true,
            properties: Default::default(),
            expires_at: None,
            received_at: now,
            origin: None,
        };
        broker.publish(Arc::new(message), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftmq_core::config::MqttConfig;

    #[test]
    fn sys_topics_are_published_retained_and_reflect_counts() {
        let broker = Broker::new(MqttConfig::default());
        let t0 = Instant::now();
        publish_once(&broker, t0, t0 + Duration::from_secs(42));
        let uptime = broker
            .retained("$SYS/broker/uptime")
            .expect("uptime retained");
        assert_eq!(&uptime.payload[..], b"42 seconds");
        let clients = broker
            .retained("$SYS/broker/clients/connected")
            .expect("clients retained");
        assert_eq!(&clients.payload[..], b"0");
        // The statistics topics themselves are retained messages and are counted on the next round.
        publish_once(&broker, t0, t0 + Duration::from_secs(43));
        let retained = broker
            .retained("$SYS/broker/retained messages/count")
            .expect("count");
        let n: usize = std::str::from_utf8(&retained.payload)
            .expect("utf8")
            .parse()
            .expect("number");
        assert_eq!(n, snapshot(&broker, t0, t0).len());
    }
}
