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
    /// The subcommand: p2p, fanout, fanin, shared, retained, conn, churn or failover.
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
    pub failover: Option<FailoverStats>,
    pub broker: Option<BrokerUsage>,
    /// The load tool's own CPU over the same window (connection scenario): on a machine it
    /// shares with the broker, it bounds the connect rate either broker can show.
    #[serde(default)]
    pub load_tool: Option<BrokerUsage>,
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
    /// The system (kernel) part of it, µs.
    #[serde(default)]
    pub broker_sys_us_per_cycle: Option<f64>,
}

/// The failover scenario: times from the kill (ms) and what was lost on the way.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FailoverStats {
    /// MQTT addresses of the nodes; the node fields below index this list.
    pub nodes: Vec<String>,
    pub sub_node: usize,
    pub pub_node: usize,
    pub killed_node: usize,
    pub kill_pid: u32,
    /// The times below are measured from the moment the kill was ordered; the signal went
    /// out within this many ms of it.
    pub kill_command_ms: f64,
    /// Steady load before the kill, s.
    pub before_s: f64,
    /// The longest wait allowed for recovery, s.
    pub after_s: f64,
    /// Whether the subscriber lost its connection after the kill.
    pub sub_lost: bool,
    /// Kill → the subscriber connected again (CONNACK success).
    pub sub_reconnect_ms: Option<f64>,
    /// The node it reconnected to (`None`: a server outside the list, or not reconnected).
    pub sub_reconnect_node: Option<usize>,
    pub sub_session_present: Option<bool>,
    pub pub_lost: bool,
    pub pub_reconnect_ms: Option<f64>,
    pub pub_reconnect_node: Option<usize>,
    pub pub_session_present: Option<bool>,
    /// Kill → the first message the subscriber received (any).
    pub first_message_ms: Option<f64>,
    /// Kill → the first message published after the kill received by the subscriber.
    pub first_fresh_message_ms: Option<f64>,
    /// Kill → the first acknowledgement (PUBACK; PUBREC for QoS 2) of a message published
    /// after the kill.
    pub first_fresh_ack_ms: Option<f64>,
    /// The latest of the above (reconnections only for clients that lost their connection);
    /// `None`: not recovered within `after_s`.
    pub recovered_ms: Option<f64>,
    /// The longest time without a new message at the subscriber, over the whole run.
    pub max_receive_gap_ms: f64,
    /// The most sequence numbers one new message skipped (later ones arriving first).
    pub max_sequence_jump: u64,
    /// Messages acknowledged with a success code.
    pub acked: u64,
    /// Acknowledgements with 0x10 No matching subscribers (counted in `acked`).
    pub no_subscribers: u64,
    /// Distinct messages received.
    pub received: u64,
    pub duplicates: u64,
    /// Acknowledged messages the subscriber never received: must be 0.
    pub missing_acked: u64,
    /// The first few missing sequence numbers.
    pub missing_examples: Vec<u64>,
    /// Missing acknowledged messages that were published before the kill and acknowledged
    /// after it (on a new connection, after a resend).
    pub missing_acked_after_kill: u64,
    /// QoS 2 PUBLISHes that reused a packet id still awaiting PUBREL for another message: the
    /// subscriber takes them for resends, as MQTT requires, so they are lost. A broker error.
    pub qos2_id_reuses: u64,
    pub qos2_id_reuse_examples: Vec<String>,
    /// Messages published, never acknowledged and never received.
    pub lost_unacked: u64,
    /// Connection attempts after the first connections, and how many followed a Server
    /// Reference.
    pub reconnect_attempts: u64,
    pub redirects: u64,
    /// Reconnections that found no session.
    pub sessions_lost: u64,
    /// Connection events, with the time from the kill.
    pub timeline: Vec<String>,
    /// The node the will watcher subscribed on (`None`: no wills measured).
    #[serde(default)]
    pub will_node: Option<usize>,
    /// The wills of the killed node's clients, as the watcher received them.
    #[serde(default)]
    pub wills: Vec<WillStats>,
}

/// One will of a client of the killed node (see [`crate::wills`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct WillStats {
    /// `persistent`, `sessionless` or `delayed`.
    pub name: String,
    /// Session Expiry Interval of its client's session, s (0: none outlives the connection).
    pub session_expiry: u32,
    /// Will Delay Interval, s.
    pub will_delay_s: u32,
    /// Kill → its client saw its connection end (negative: before the kill), and why.
    pub client_lost_ms: Option<f64>,
    pub client_lost_reason: Option<String>,
    /// Kill → the watcher received the will (the first receipt).
    pub received_ms: Option<f64>,
    /// Receipts with DUP 0: times the will was published. Must be 1.
    pub publications: u64,
    /// Receipts with DUP 1: resends to the watcher after it reconnected.
    pub resends: u64,
    /// Receipts at or before the kill. Must be 0.
    pub received_before_kill: u64,
}

impl WillStats {
    /// What makes the run fail: the will missing, published more than once, before the kill or
    /// before its delay, or its client's connection lost before the kill.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let name = &self.name;
        if let Some(ms) = self.client_lost_ms.filter(|&ms| ms <= 0.0) {
            problems.push(format!(
                "the {name} will client lost its connection {:.0} ms before the kill ({})",
                -ms,
                self.client_lost_reason.as_deref().unwrap_or("no reason")
            ));
        }
        if self.publications + self.resends == 0 {
            problems.push(format!("the {name} will was not received"));
        } else if self.publications != 1 {
            problems.push(format!(
                "the {name} will was published {} times (received with DUP 0)",
                self.publications
            ));
        }
        if self.received_before_kill > 0 {
            problems.push(format!("the {name} will arrived before the kill"));
        }
        if let Some(ms) = self.received_ms
            && ms > 0.0
            && ms < f64::from(self.will_delay_s) * 1e3
        {
            problems.push(format!(
                "the {name} will arrived {ms:.0} ms after the kill, before its delay of {} s",
                self.will_delay_s
            ));
        }
        problems
    }
}

impl FailoverStats {
    /// What makes the run fail: no recovery, acknowledged messages missing, or a will not
    /// received exactly once (see [`WillStats::problems`]).
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.recovered_ms.is_none() {
            problems.push(format!(
                "not recovered within {} s of the kill",
                self.after_s
            ));
        }
        if self.missing_acked > 0 {
            problems.push(format!(
                "{} acknowledged messages missing (first: {:?})",
                self.missing_acked, self.missing_examples
            ));
        }
        for will in &self.wills {
            problems.extend(will.problems());
        }
        problems
    }
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

/// "; N % in the kernel" for a process's usage (nothing when it used no CPU).
fn write_kernel_share(f: &mut fmt::Formatter<'_>, usage: &BrokerUsage) -> fmt::Result {
    if usage.cpu_seconds > 0.0 {
        write!(
            f,
            "; {:.0} % in the kernel",
            usage.sys_seconds * 100.0 / usage.cpu_seconds
        )?;
    }
    Ok(())
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
        if let Some(fo) = &self.failover {
            write_failover(f, fo)?;
        }
        if let Some(t) = &self.load_tool {
            write!(f, "  load tool    CPU {:.2} s", t.cpu_seconds)?;
            if self.connect.established > 0 {
                let per_conn = t.cpu_seconds * 1e6 / self.connect.established as f64;
                write!(f, "; {per_conn:.0} µs per connection")?;
            }
            write_kernel_share(f, t)?;
            writeln!(f)?;
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
            write_kernel_share(f, b)?;
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

/// `Some(1234.5)` → `1,235 ms`; `None` → `none`.
fn millis(value: Option<f64>) -> String {
    value.map_or_else(|| "none".to_owned(), |ms| format!("{} ms", thousands(ms)))
}

fn write_failover(f: &mut fmt::Formatter<'_>, fo: &FailoverStats) -> fmt::Result {
    let n = |v: u64| thousands(v as f64);
    let node = |i: Option<usize>| match i {
        Some(i) => format!("node {i}"),
        None => "another server".to_owned(),
    };
    let reconnect =
        |lost: bool, ms: Option<f64>, at: Option<usize>, present: Option<bool>| match (lost, ms) {
            (false, _) => "kept its connection".to_owned(),
            (true, None) => "NOT reconnected".to_owned(),
            (true, Some(_)) => format!(
                "reconnected after {} to {} (session present: {})",
                millis(ms),
                node(at),
                present.unwrap_or(false)
            ),
        };
    writeln!(
        f,
        "  failover     SIGKILL pid {} (node {}) after {} s (sent within {:.2} ms); subscriber \
         on node {}, publisher on node {}",
        fo.kill_pid, fo.killed_node, fo.before_s, fo.kill_command_ms, fo.sub_node, fo.pub_node
    )?;
    writeln!(
        f,
        "  subscriber   {}",
        reconnect(
            fo.sub_lost,
            fo.sub_reconnect_ms,
            fo.sub_reconnect_node,
            fo.sub_session_present
        )
    )?;
    writeln!(
        f,
        "  publisher    {}",
        reconnect(
            fo.pub_lost,
            fo.pub_reconnect_ms,
            fo.pub_reconnect_node,
            fo.pub_session_present
        )
    )?;
    writeln!(
        f,
        "  after kill   first message {}, first fresh message {}, first fresh ack {}",
        millis(fo.first_message_ms),
        millis(fo.first_fresh_message_ms),
        millis(fo.first_fresh_ack_ms)
    )?;
    match fo.recovered_ms {
        Some(ms) => writeln!(f, "  recovered    {} after the kill", millis(Some(ms)))?,
        None => writeln!(f, "  recovered    NOT within {} s of the kill", fo.after_s)?,
    }
    writeln!(
        f,
        "  gaps         longest {} without a new message; largest sequence jump {}",
        millis(Some(fo.max_receive_gap_ms)),
        n(fo.max_sequence_jump)
    )?;
    writeln!(
        f,
        "  acknowledged {} ({} with no matching subscribers); received {} distinct, {} \
         duplicates; missing acknowledged {}{}; lost unacknowledged {}",
        n(fo.acked),
        n(fo.no_subscribers),
        n(fo.received),
        n(fo.duplicates),
        n(fo.missing_acked),
        if fo.missing_examples.is_empty() {
            String::new()
        } else {
            format!(
                " (first: {:?}; {} published before the kill and acknowledged after it)",
                fo.missing_examples, fo.missing_acked_after_kill
            )
        },
        n(fo.lost_unacked)
    )?;
    if fo.qos2_id_reuses > 0 {
        writeln!(
            f,
            "  QoS 2 ids    {} PUBLISHes reused a packet id awaiting PUBREL (dropped as resends): \
             {}",
            n(fo.qos2_id_reuses),
            fo.qos2_id_reuse_examples.join("; ")
        )?;
    }
    if let Some(node) = fo.will_node {
        writeln!(
            f,
            "  wills        of clients of node {}, received on node {node}:",
            fo.killed_node
        )?;
    }
    for w in &fo.wills {
        let session = match w.session_expiry {
            0 => "no session".to_owned(),
            s => format!("session expiry {s} s"),
        };
        let received = match (w.received_ms, w.publications) {
            (None, _) => "NOT received".to_owned(),
            (Some(ms), 1) => format!("received {} after the kill, once", millis(Some(ms))),
            (Some(ms), n) => format!(
                "received {} after the kill, published {n} times",
                millis(Some(ms))
            ),
        };
        let resends = match w.resends {
            0 => String::new(),
            r => format!(" (+{r} resends with DUP)"),
        };
        writeln!(
            f,
            "    {:<12} ({session}, will delay {} s): {received}{resends}; client connection \
             lost {}",
            w.name,
            w.will_delay_s,
            w.client_lost_ms
                .map_or_else(|| "never".to_owned(), |ms| format!("at kill {ms:+.1} ms"))
        )?;
    }
    writeln!(
        f,
        "  reconnects   {} attempts ({} to a Server Reference), {} sessions lost",
        n(fo.reconnect_attempts),
        n(fo.redirects),
        n(fo.sessions_lost)
    )?;
    for line in &fo.timeline {
        writeln!(f, "    {line}")?;
    }
    Ok(())
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
    fn failover_problems() {
        let ok = FailoverStats {
            recovered_ms: Some(1500.0),
            after_s: 20.0,
            ..FailoverStats::default()
        };
        assert!(ok.problems().is_empty());
        let bad = FailoverStats {
            recovered_ms: None,
            missing_acked: 2,
            missing_examples: vec![7, 9],
            ..ok.clone()
        };
        let problems = bad.problems();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("not recovered"), "{problems:?}");
        assert!(
            problems[1].contains("2 acknowledged messages missing"),
            "{problems:?}"
        );
        let text = Summary {
            failover: Some(bad),
            ..Summary::default()
        }
        .to_string();
        assert!(text.contains("NOT within 20 s"), "{text}");
        assert!(
            text.contains("missing acknowledged 2 (first: [7, 9]; 0 published before"),
            "{text}"
        );
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
