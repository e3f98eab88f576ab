//! The result of a run: printed for people, written as JSON for `compare.sh` and `report`.

use crate::accounting::Tally;
use crate::procfs::BrokerUsage;
use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::fmt::{self, Write as _};
use std::path::Path;

/// The summary of one run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// The subcommand: p2p, fanout, fanin, shared, retained, conn or churn.
    pub scenario: String,
    /// The scenario with its parameters, in words.
    pub description: String,
    /// The broker's name (`--label`).
    pub label: Option<String>,
    /// MQTT protocol level (4 or 5).
    pub mqtt_version: u8,
    /// QoS of publishes and subscriptions (message scenarios).
    pub qos: Option<u8>,
    /// Target publish rate in msg/s; `None` for as fast as possible (or not applicable).
    pub rate_per_s: Option<f64>,
    /// Length of the measured window (after warm-up), in seconds.
    pub duration_s: f64,
    pub connect: ConnectStats,
    pub messages: Option<MessageStats>,
    /// Publish → receive latency of measured messages, µs.
    pub latency_us: Option<Percentiles>,
    pub retained: Option<RetainedStats>,
    pub churn: Option<ChurnStats>,
    pub broker: Option<BrokerUsage>,
    /// Connections that failed or ended early, with the first few reasons.
    pub error_count: u64,
    pub errors: Vec<String>,
}

/// Connection establishment.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectStats {
    pub attempted: u64,
    pub established: u64,
    pub failed: u64,
    /// Established connections per second of connecting.
    pub per_s: f64,
    /// TCP connect → CONNACK, ms.
    pub latency_ms: Option<Percentiles>,
}

/// Message delivery.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MessageStats {
    /// Messages published.
    pub published: u64,
    /// QoS 1/2 messages acknowledged by the broker.
    pub acked: u64,
    /// QoS 1/2 messages refused by the broker.
    pub rejected: u64,
    /// QoS 1/2 messages never acknowledged.
    pub unacked: u64,
    #[serde(flatten)]
    pub tally: Tally,
    /// Received messages that were not stamped by this run.
    pub foreign: u64,
    /// Messages published per second in the measured window.
    pub offered_per_s: f64,
    /// Copies delivered per second: first receipts arriving in the measured window.
    pub delivered_per_s: f64,
    /// lost / expected.
    pub loss_ratio: f64,
}

/// The retained scenario: storing N retained messages, then receiving them on subscribe.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RetainedStats {
    pub topics: u64,
    /// Time to publish (and, for QoS > 0, have acknowledged) all retained messages, ms.
    pub store_ms: f64,
    /// SUBSCRIBE sent → last retained message received, ms (`None` unless all arrived).
    pub receive_all_ms: Option<f64>,
    /// Retained messages received per second after SUBSCRIBE.
    pub receive_per_s: Option<f64>,
}

/// The churn scenario: connect/disconnect cycles with persistent sessions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ChurnStats {
    pub clients: u64,
    /// Completed connect/disconnect cycles.
    pub cycles: u64,
    pub cycles_per_s: f64,
    /// Connections that resumed their session (Session Present).
    pub resumed: u64,
    /// Reconnections that found their session gone (Session Present 0 after the first).
    pub lost: u64,
    /// Broker CPU per cycle, µs.
    pub broker_cpu_us_per_cycle: Option<f64>,
}

/// Percentiles of a distribution, in the unit named by the field holding them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// The percentiles of `h` divided by `scale` (e.g. 1000 for µs → ms); `None` if empty.
    pub fn of(h: &Histogram<u64>, scale: f64) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let at = |q: f64| h.value_at_quantile(q) as f64 / scale;
        Some(Percentiles {
            count: h.len(),
            mean: h.mean() / scale,
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            p999: at(0.999),
            max: h.max() as f64 / scale,
        })
    }
}

/// Collects errors: counts all, keeps the first few messages.
#[derive(Debug, Default)]
pub struct Errors {
    count: u64,
    first: Vec<String>,
}

impl Errors {
    const KEPT: usize = 5;

    pub fn push(&mut self, error: &anyhow::Error) {
        self.count += 1;
        if self.first.len() < Self::KEPT {
            self.first.push(format!("{error:#}"));
        }
    }

    pub fn extend(&mut self, other: Errors) {
        self.count += other.count;
        let room = Self::KEPT.saturating_sub(self.first.len());
        self.first.extend(other.first.into_iter().take(room));
    }

    /// Moves the errors into `summary`.
    pub fn store(self, summary: &mut Summary) {
        summary.error_count = self.count;
        summary.errors = self.first;
    }
}

impl Summary {
    /// True for a QoS 0 message run at unbounded rate: publishers are only held back by TCP, so
    /// their messages queue in socket buffers (megabytes per connection on loopback) and the
    /// latency measures that queueing, not the broker.
    pub fn is_qos0_flood(&self) -> bool {
        self.qos == Some(0) && self.rate_per_s.is_none() && self.retained.is_none()
    }

    /// Writes the summary as pretty JSON to `path`.
    pub fn write_json(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
    }
}

/// `1234567.8` → `1,234,568`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if value < 0.0 && digits != "0" {
        out.insert(0, '-');
    }
    out
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = |v: u64| thousands(v as f64);
        writeln!(f, "{}", self.description)?;
        let c = &self.connect;
        write!(
            f,
            "  connections  {} of {} ({} failed), {} conn/s",
            n(c.established),
            n(c.attempted),
            n(c.failed),
            thousands(c.per_s)
        )?;
        if let Some(l) = &c.latency_ms {
            write!(
                f,
                "; connect p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                l.p50, l.p99, l.max
            )?;
        }
        writeln!(f)?;
        if let Some(m) = &self.messages {
            let t = &m.tally;
            writeln!(
                f,
                "  published    {} ({} msg/s); acked {}, rejected {}, unacked {}",
                n(m.published),
                thousands(m.offered_per_s),
                n(m.acked),
                n(m.rejected),
                n(m.unacked)
            )?;
            writeln!(
                f,
                "  delivered    {} of {} copies ({} msg/s); lost {} ({:.3}%), duplicates {}, \
                 out of order {}, unexpected {}, foreign {}",
                n(t.delivered),
                n(t.expected),
                thousands(m.delivered_per_s),
                n(t.lost),
                m.loss_ratio * 100.0,
                n(t.duplicates),
                n(t.out_of_order),
                n(t.unexpected),
                n(m.foreign)
            )?;
        }
        if let Some(l) = &self.latency_us {
            writeln!(
                f,
                "  latency µs   p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (mean {}, n = {})",
                thousands(l.p50),
                thousands(l.p90),
                thousands(l.p99),
                thousands(l.p999),
                thousands(l.max),
                thousands(l.mean),
                n(l.count)
            )?;
        }
        if let Some(r) = &self.retained {
            let mut line = format!(
                "  retained     {} topics stored in {:.1} ms",
                n(r.topics),
                r.store_ms
            );
            match (r.receive_all_ms, r.receive_per_s) {
                (Some(ms), Some(rate)) => {
                    let _ = write!(
                        line,
                        "; all received {ms:.1} ms after SUBSCRIBE ({} msg/s)",
                        thousands(rate)
                    );
                }
                _ => line.push_str("; NOT all received"),
            }
            writeln!(f, "{line}")?;
        }
        if let Some(ch) = &self.churn {
            writeln!(
                f,
                "  churn        {} cycles of {} clients ({} cycles/s); resumed {}, sessions lost {}",
                n(ch.cycles),
                n(ch.clients),
                thousands(ch.cycles_per_s),
                n(ch.resumed),
                n(ch.lost)
            )?;
        }
        if let Some(b) = &self.broker {
            write!(
                f,
                "  broker       CPU {:.2} s, RSS {:.1} MiB before, {:.1} MiB under load",
                b.cpu_seconds,
                b.rss_before_kib as f64 / 1024.0,
                b.rss_loaded_kib as f64 / 1024.0
            )?;
            if let Some(us) = b.cpu_us_per_msg {
                write!(f, "; {us:.2} µs CPU per delivered message")?;
            }
            if let Some(bytes) = b.rss_per_conn_bytes {
                write!(f, "; {:.1} KiB per connection", bytes / 1024.0)?;
            }
            writeln!(f)?;
        }
        if self.error_count > 0 {
            writeln!(f, "  errors       {}, first:", n(self.error_count))?;
            for e in &self.errors {
                writeln!(f, "    - {e}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1234567.8), "1,234,568");
        assert_eq!(thousands(-12345.0), "-12,345");
    }

    #[test]
    fn percentiles_of_a_histogram() {
        let mut h = crate::client::latency_histogram();
        for v in 1..=1000 {
            h.record(v).expect("in range");
        }
        let p = Percentiles::of(&h, 1.0).expect("not empty");
        assert_eq!(p.count, 1000);
        assert!((p.p50 - 500.0).abs() <= 5.0, "{p:?}");
        assert!((p.p99 - 990.0).abs() <= 10.0, "{p:?}");
        assert!((p.max - 1000.0).abs() <= 10.0, "{p:?}");
        assert_eq!(
            Percentiles::of(&crate::client::latency_histogram(), 1.0),
            None
        );
    }

    #[test]
    fn errors_keep_the_first_few() {
        let mut errors = Errors::default();
        for i in 0..7 {
            errors.push(&anyhow::anyhow!("e{i}"));
        }
        let mut more = Errors::default();
        more.push(&anyhow::anyhow!("late"));
        errors.extend(more);
        let mut summary = Summary::default();
        errors.store(&mut summary);
        assert_eq!(summary.error_count, 8);
        assert_eq!(summary.errors, ["e0", "e1", "e2", "e3", "e4"]);
    }

    #[test]
    fn json_round_trip() {
        let summary = Summary {
            scenario: "p2p".into(),
            messages: Some(MessageStats {
                published: 10,
                tally: Tally {
                    expected: 10,
                    delivered: 9,
                    lost: 1,
                    ..Tally::default()
                },
                ..MessageStats::default()
            }),
            ..Summary::default()
        };
        let json = serde_json::to_string(&summary).expect("serializes");
        assert!(json.contains("\"lost\":1"), "tally is flattened: {json}");
        let back: Summary = serde_json::from_str(&json).expect("deserializes");
        assert_eq!(back, summary);
    }
}
