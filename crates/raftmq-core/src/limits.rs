//! Per-client publish limits: a message rate and a bandwidth, each a token bucket refilled
//! continuously from the `now` the caller passes (no clock here).
//!
//! A bucket holds at most one second's worth of tokens, so a client may burst up to its
//! per-second allowance and then sustain the configured rate.

use crate::config::MqttConfig;
use raftmq_codec::ReasonCode;
use std::time::Instant;

/// Which configured limit was hit (the `limit` label of `raftmq_limits_exceeded_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// `mqtt.max_publish_rate`.
    PublishRate,
    /// `mqtt.max_publish_bandwidth`.
    PublishBandwidth,
    /// `mqtt.max_subscriptions_per_client`.
    Subscriptions,
    /// `mqtt.max_retained_messages`.
    RetainedMessages,
    /// `mqtt.max_retained_bytes`.
    RetainedBytes,
}

impl Limit {
    /// Every limit, for exporting (in the order of `BrokerStats::limits_exceeded`).
    pub const ALL: [Limit; 5] = [
        Limit::PublishRate,
        Limit::PublishBandwidth,
        Limit::Subscriptions,
        Limit::RetainedMessages,
        Limit::RetainedBytes,
    ];

    /// The stable label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::PublishRate => "publish_rate",
            Limit::PublishBandwidth => "publish_bandwidth",
            Limit::Subscriptions => "subscriptions",
            Limit::RetainedMessages => "retained_messages",
            Limit::RetainedBytes => "retained_bytes",
        }
    }
}

/// A client went over its publish rate or bandwidth.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exceeded {
    Rate,
    Bandwidth,
}

impl Exceeded {
    /// The DISCONNECT reason sent to an MQTT 5 client: 0x96 Message rate too high for the
    /// message rate, 0x97 Quota exceeded for the bandwidth.
    pub fn reason_code(self) -> ReasonCode {
        match self {
            Exceeded::Rate => ReasonCode::MESSAGE_RATE_TOO_HIGH,
            Exceeded::Bandwidth => ReasonCode::QUOTA_EXCEEDED,
        }
    }

    /// The limit that was hit.
    pub fn limit(self) -> Limit {
        match self {
            Exceeded::Rate => Limit::PublishRate,
            Exceeded::Bandwidth => Limit::PublishBandwidth,
        }
    }
}

/// A token bucket of `capacity` tokens refilled at `capacity` per second.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket allowing `per_second` tokens a second.
    pub fn new(per_second: u64, now: Instant) -> Self {
        let capacity = per_second as f64;
        TokenBucket {
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// Takes `n` tokens if there are enough (after refilling up to `now`).
    pub fn try_take(&mut self, n: u64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.capacity).min(self.capacity);
        let n = n as f64;
        if self.tokens >= n {
            self.tokens -= n;
            true
        } else {
            false
        }
    }
}

/// The publish limits of one connection.
#[derive(Clone, Debug)]
pub struct PublishLimits {
    rate: Option<TokenBucket>,
    bandwidth: Option<TokenBucket>,
}

impl PublishLimits {
    /// Limits from `config` (a zero setting means unlimited).
    pub fn new(config: &MqttConfig, now: Instant) -> Self {
        let bucket = |n: u64| (n > 0).then(|| TokenBucket::new(n, now));
        PublishLimits {
            rate: bucket(u64::from(config.max_publish_rate)),
            bandwidth: bucket(config.max_publish_bandwidth.0),
        }
    }

    /// Accounts one PUBLISH of `bytes` (topic and payload) at `now`.
    pub fn check(&mut self, bytes: usize, now: Instant) -> Result<(), Exceeded> {
        if let Some(rate) = &mut self.rate
            && !rate.try_take(1, now)
        {
            return Err(Exceeded::Rate);
        }
        if let Some(bw) = &mut self.bandwidth {
            // A single message larger than a second's allowance can never pass: it only
            // needs the full bucket.
            let need = (bytes as u64).min(bw.capacity as u64);
            if !bw.try_take(need, now) {
                return Err(Exceeded::Bandwidth);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ByteSize;
    use std::time::Duration;

    #[test]
    fn rate_allows_a_one_second_burst_then_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        for _ in 0..10 {
            assert!(b.try_take(1, t0));
        }
        assert!(!b.try_take(1, t0));
        assert!(!b.try_take(1, t0 + Duration::from_millis(50)));
        assert!(b.try_take(1, t0 + Duration::from_millis(150)));
        // Never more than capacity after a long pause.
        let later = t0 + Duration::from_secs(100);
        for _ in 0..10 {
            assert!(b.try_take(1, later));
        }
        assert!(!b.try_take(1, later));
    }

    #[test]
    fn limits_report_which_limit_and_code() {
        let t0 = Instant::now();
        let config = MqttConfig {
            max_publish_rate: 2,
            max_publish_bandwidth: ByteSize(100),
            ..MqttConfig::default()
        };
        let mut l = PublishLimits::new(&config, t0);
        assert_eq!(l.check(10, t0), Ok(()));
        assert_eq!(l.check(10, t0), Ok(()));
        assert_eq!(l.check(10, t0), Err(Exceeded::Rate));
        assert_eq!(
            Exceeded::Rate.reason_code(),
            ReasonCode::MESSAGE_RATE_TOO_HIGH
        );

        let config = MqttConfig {
            max_publish_bandwidth: ByteSize(100),
            ..MqttConfig::default()
        };
        let mut l = PublishLimits::new(&config, t0);
        assert_eq!(l.check(60, t0), Ok(()));
        assert_eq!(l.check(60, t0), Err(Exceeded::Bandwidth));
        assert_eq!(
            Exceeded::Bandwidth.reason_code(),
            ReasonCode::QUOTA_EXCEEDED
        );
        // A message bigger than the per-second allowance passes on a full bucket.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(l.check(500, later), Ok(()));
    }

    #[test]
    fn zero_means_unlimited() {
        let t0 = Instant::now();
        let mut l = PublishLimits::new(&MqttConfig::default(), t0);
        for _ in 0..10_000 {
            assert_eq!(l.check(1 << 20, t0), Ok(()));
        }
    }
}
