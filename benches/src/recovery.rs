//! Failover accounting: from the timestamped events of one `failover` run (the kill,
//! connections lost and made, messages acknowledged and received) to recovery times, delivery
//! gaps, and the check that no acknowledged message went missing.
//!
//! One publisher (id 0) sends sequence numbers from 0 and one subscriber receives them. Every
//! event carries the instant it happened (one process clock), so milestones are computed from
//! those instants, not from the order in which events reach the log: the subscriber and the
//! publisher report over one channel from two tasks, so their events may interleave slightly
//! out of order.
//!
//! Milestones, each measured from the kill:
//!
//! * a client (subscriber or publisher) that lost its connection after the kill is back once
//!   it has a new connection (CONNACK success);
//! * the first message the subscriber receives after the kill (any, including resends and
//!   messages queued for its session);
//! * the first *fresh* message received: one published after the kill (its stamp's send time
//!   is later than the kill), so traffic flows end to end again;
//! * the first acknowledgement (PUBACK, or PUBREC for QoS 2) of a fresh message: the cluster
//!   accepts new durable writes again.
//!
//! The run has recovered when all of these happened (reconnections only for clients that lost
//! their connection); the recovery time is the latest of them.

use crate::accounting::{Receipt, Sent, StreamLog, Tally, tally_each};
use crate::client::latency_histogram;
use crate::payload::timestamp;
use hdrhistogram::Histogram;
use raftmq_codec::ReasonCode;
use std::collections::HashSet;
use std::fmt;
use std::time::{Duration, Instant};

/// The only publisher's id in the stamps.
const PUBLISHER: u32 = 0;
/// Missing acknowledged sequence numbers listed in the report (all are counted).
const MISSING_LISTED: usize = 10;

/// Which client an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Subscriber,
    Publisher,
    /// The subscriber to the wills' topics (on a surviving node).
    Watcher,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Subscriber => "subscriber",
            Role::Publisher => "publisher",
            Role::Watcher => "will watcher",
        })
    }
}

/// One client's connections.
#[derive(Clone, Debug, Default)]
pub struct LinkLog {
    /// Connected now (as far as the events received so far tell).
    pub up: bool,
    /// The node it is (or was last) connected to: an index into the node list, `None` for a
    /// server outside the list (reached through a Server Reference).
    pub node: Option<usize>,
    /// Connections established, the first one included.
    pub connects: u64,
    /// Connections lost.
    pub losses: u64,
    /// When it first lost its connection after the kill.
    pub lost_at: Option<Instant>,
    /// Its first connection after `lost_at`: when, to which node, and Session Present.
    pub back: Option<(Instant, Option<usize>, bool)>,
    /// Reconnections that found no session (Session Present 0): the session's state was lost.
    pub sessions_lost: u64,
}

/// The events of a run, and what follows from them.
#[derive(Debug)]
pub struct RecoveryLog {
    /// The kill, and the same instant as a [`timestamp`] (to compare with stamps).
    kill: Option<(Instant, u64)>,
    pub subscriber: LinkLog,
    pub publisher: LinkLog,
    /// The will watcher's connections (no part of the recovery milestones).
    pub watcher: LinkLog,
    /// Every receipt, by sequence number.
    received: StreamLog,
    /// Bit `seq` is set once message `seq` was acknowledged.
    acked: Vec<u64>,
    acked_count: u64,
    /// Acknowledged messages that were also received.
    acked_received: u64,
    /// Acknowledgements with a failure code (≥ 0x80): the broker refused the message.
    rejected: u64,
    /// Acknowledgements with 0x10 No matching subscribers (counted as acknowledged).
    no_subscribers: u64,
    receipts: u64,
    first_receipt: Option<Instant>,
    first_fresh_receipt: Option<Instant>,
    first_fresh_ack: Option<Instant>,
    /// Messages published before the kill and acknowledged after it (typically after a resend
    /// on a new connection).
    acked_late: HashSet<u64>,
    /// The last first receipt: the start of the current gap.
    last_new: Option<Instant>,
    /// The longest time between two consecutive first receipts, and when it ended.
    max_gap: Duration,
    max_gap_end: Option<Instant>,
    /// One past the highest sequence number received.
    high: u64,
    /// The most sequence numbers skipped by one first receipt (`seq - high` when it jumped
    /// ahead of the stream).
    max_jump: u64,
    /// Publish → first receipt, µs.
    latency: Histogram<u64>,
}

impl Default for RecoveryLog {
    fn default() -> Self {
        RecoveryLog {
            kill: None,
            subscriber: LinkLog::default(),
            publisher: LinkLog::default(),
            watcher: LinkLog::default(),
            received: StreamLog::default(),
            acked: Vec::new(),
            acked_count: 0,
            acked_received: 0,
            rejected: 0,
            no_subscribers: 0,
            receipts: 0,
            first_receipt: None,
            first_fresh_receipt: None,
            first_fresh_ack: None,
            acked_late: HashSet::new(),
            last_new: None,
            max_gap: Duration::ZERO,
            max_gap_end: None,
            high: 0,
            max_jump: 0,
            latency: latency_histogram(),
        }
    }
}

/// The earlier of `slot` and `at`, into `slot`.
fn keep_earliest(slot: &mut Option<Instant>, at: Instant) {
    if slot.is_none_or(|s| at < s) {
        *slot = Some(at);
    }
}

fn is_set(bits: &[u64], seq: u64) -> bool {
    let (word, bit) = split(seq);
    bits.get(word).is_some_and(|w| w & bit != 0)
}

fn split(seq: u64) -> (usize, u64) {
    let word = usize::try_from(seq / 64).expect("sequence numbers fit the address space");
    (word, 1 << (seq % 64))
}

/// What the log concludes, in milliseconds from the kill.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovery {
    pub sub_lost: bool,
    pub sub_back_ms: Option<f64>,
    pub sub_back_node: Option<usize>,
    pub sub_session_present: Option<bool>,
    pub pub_lost: bool,
    pub pub_back_ms: Option<f64>,
    pub pub_back_node: Option<usize>,
    pub pub_session_present: Option<bool>,
    pub first_message_ms: Option<f64>,
    pub first_fresh_message_ms: Option<f64>,
    pub first_fresh_ack_ms: Option<f64>,
    /// The latest milestone; `None` if one of them is missing (not recovered).
    pub recovered_ms: Option<f64>,
    pub max_receive_gap_ms: f64,
    /// When the longest gap ended, ms from the kill (negative: before it).
    pub max_receive_gap_end_ms: Option<f64>,
    pub max_sequence_jump: u64,
    pub acked: u64,
    pub rejected: u64,
    pub no_subscribers: u64,
    /// Distinct messages received.
    pub received: u64,
    pub receipts: u64,
    pub duplicates: u64,
    /// Acknowledged messages never received.
    pub missing_acked: u64,
    /// The first few of them.
    pub missing_examples: Vec<u64>,
    /// Missing acknowledged messages published before the kill and acknowledged after it.
    pub missing_acked_after_kill: u64,
    /// Published, not acknowledged, never received.
    pub lost_unacked: u64,
    pub sessions_lost: u64,
    /// The full tally against the messages published.
    pub tally: Tally,
}

/// `at - kill` in ms (negative before the kill).
fn ms_from(kill: Instant, at: Instant) -> f64 {
    match at.checked_duration_since(kill) {
        Some(d) => d.as_secs_f64() * 1000.0,
        None => -(kill.duration_since(at).as_secs_f64() * 1000.0),
    }
}

impl RecoveryLog {
    /// The node was killed at `at`.
    pub fn kill(&mut self, at: Instant) {
        self.kill = Some((at, timestamp(at)));
    }

    pub fn killed_at(&self) -> Option<Instant> {
        self.kill.map(|(at, _)| at)
    }

    /// Strictly after the kill.
    fn after_kill(&self, at: Instant) -> bool {
        self.kill.is_some_and(|(k, _)| at > k)
    }

    fn fresh(&self, sent_ns: u64) -> bool {
        self.kill.is_some_and(|(_, k)| sent_ns >= k)
    }

    fn link(&mut self, role: Role) -> &mut LinkLog {
        match role {
            Role::Subscriber => &mut self.subscriber,
            Role::Publisher => &mut self.publisher,
            Role::Watcher => &mut self.watcher,
        }
    }

    /// `role` connected (CONNACK success) at `at` to `node`.
    pub fn connected(
        &mut self,
        role: Role,
        at: Instant,
        node: Option<usize>,
        session_present: bool,
    ) {
        let link = self.link(role);
        link.connects += 1;
        link.up = true;
        link.node = node;
        if link.connects > 1 && !session_present {
            link.sessions_lost += 1;
        }
        if link.lost_at.is_some_and(|lost| at >= lost) && link.back.is_none() {
            link.back = Some((at, node, session_present));
        }
    }

    /// `role` lost its connection at `at`.
    pub fn lost(&mut self, role: Role, at: Instant) {
        let after_kill = self.after_kill(at);
        let link = self.link(role);
        link.losses += 1;
        link.up = false;
        if after_kill && link.lost_at.is_none() {
            link.lost_at = Some(at);
        }
    }

    /// The broker acknowledged message `seq` (sent at `sent_ns`) with `code` at `at`: PUBACK
    /// for QoS 1, PUBREC for QoS 2.
    pub fn acked(&mut self, at: Instant, seq: u64, sent_ns: u64, code: ReasonCode) {
        if !code.is_success() {
            self.rejected += 1;
            return;
        }
        if code == ReasonCode::NO_MATCHING_SUBSCRIBERS {
            self.no_subscribers += 1;
        }
        let (word, bit) = split(seq);
        if self.acked.len() <= word {
            self.acked.resize(word + 1, 0);
        }
        if self.acked[word] & bit != 0 {
            return;
        }
        self.acked[word] |= bit;
        self.acked_count += 1;
        if self.received.contains(PUBLISHER, seq) {
            self.acked_received += 1;
        }
        if self.after_kill(at) {
            if self.fresh(sent_ns) {
                keep_earliest(&mut self.first_fresh_ack, at);
            } else {
                self.acked_late.insert(seq);
            }
        }
    }

    /// The subscriber received message `seq` (sent at `sent_ns`) at `at`.
    pub fn received(&mut self, at: Instant, seq: u64, sent_ns: u64) -> Receipt {
        self.receipts += 1;
        if self.after_kill(at) {
            keep_earliest(&mut self.first_receipt, at);
            if self.fresh(sent_ns) {
                keep_earliest(&mut self.first_fresh_receipt, at);
            }
        }
        let receipt = self.received.record(PUBLISHER, seq);
        if receipt == Receipt::Duplicate {
            return receipt;
        }
        if is_set(&self.acked, seq) {
            self.acked_received += 1;
        }
        if let Some(last) = self.last_new {
            let gap = at.saturating_duration_since(last);
            if gap > self.max_gap {
                self.max_gap = gap;
                self.max_gap_end = Some(at);
            }
        }
        if self.last_new.is_none_or(|last| at > last) {
            self.last_new = Some(at);
        }
        if seq >= self.high {
            self.max_jump = self.max_jump.max(seq - self.high);
            self.high = seq + 1;
        }
        let micros = timestamp(at).saturating_sub(sent_ns) / 1000;
        self.latency.saturating_record(micros.max(1));
        receipt
    }

    /// Acknowledged messages not (yet) received.
    pub fn outstanding(&self) -> u64 {
        self.acked_count - self.acked_received
    }

    pub fn acked_count(&self) -> u64 {
        self.acked_count
    }

    /// Distinct messages received.
    pub fn received_count(&self) -> u64 {
        self.received.distinct(PUBLISHER)
    }

    /// Publish → first receipt latencies, µs.
    pub fn latency(&self) -> &Histogram<u64> {
        &self.latency
    }

    /// When the run recovered from the kill: the latest milestone, once all have happened.
    pub fn recovered_at(&self) -> Option<Instant> {
        self.kill?;
        let mut latest = self
            .first_receipt?
            .max(self.first_fresh_receipt?)
            .max(self.first_fresh_ack?);
        for link in [&self.subscriber, &self.publisher] {
            if link.lost_at.is_some() {
                latest = latest.max(link.back?.0);
            }
        }
        Some(latest)
    }

    /// What the run shows, with `published` messages published in all (sequence numbers
    /// `0..published`).
    pub fn recovery(&self, published: u64) -> Recovery {
        let tally = tally_each(&self.received, &Sent(vec![published]), &[PUBLISHER]);
        let mut missing_acked = 0;
        let mut missing_examples = Vec::new();
        let mut missing_acked_after_kill = 0;
        for (w, &word) in self.acked.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                let seq = w as u64 * 64 + u64::from(bits.trailing_zeros());
                bits &= bits - 1;
                if !self.received.contains(PUBLISHER, seq) {
                    missing_acked += 1;
                    missing_acked_after_kill += u64::from(self.acked_late.contains(&seq));
                    if missing_examples.len() < MISSING_LISTED {
                        missing_examples.push(seq);
                    }
                }
            }
        }
        // What does not depend on the kill; without one, that is all there is.
        let whole_run = Recovery {
            max_receive_gap_ms: self.max_gap.as_secs_f64() * 1000.0,
            max_sequence_jump: self.max_jump,
            acked: self.acked_count,
            rejected: self.rejected,
            no_subscribers: self.no_subscribers,
            received: self.received_count(),
            receipts: self.receipts,
            duplicates: tally.duplicates,
            missing_acked,
            missing_examples,
            missing_acked_after_kill,
            lost_unacked: tally.lost - missing_acked.min(tally.lost),
            sessions_lost: self.subscriber.sessions_lost + self.publisher.sessions_lost,
            tally,
            ..Recovery::default()
        };
        let Some((kill, _)) = self.kill else {
            return whole_run;
        };
        let ms = |at: Option<Instant>| at.map(|at| ms_from(kill, at));
        Recovery {
            sub_lost: self.subscriber.lost_at.is_some(),
            sub_back_ms: ms(self.subscriber.back.map(|b| b.0)),
            sub_back_node: self.subscriber.back.and_then(|b| b.1),
            sub_session_present: self.subscriber.back.map(|b| b.2),
            pub_lost: self.publisher.lost_at.is_some(),
            pub_back_ms: ms(self.publisher.back.map(|b| b.0)),
            pub_back_node: self.publisher.back.and_then(|b| b.1),
            pub_session_present: self.publisher.back.map(|b| b.2),
            first_message_ms: ms(self.first_receipt),
            first_fresh_message_ms: ms(self.first_fresh_receipt),
            first_fresh_ack_ms: ms(self.first_fresh_ack),
            recovered_ms: ms(self.recovered_at()),
            max_receive_gap_end_ms: ms(self.max_gap_end),
            ..whole_run
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic run: instants are offsets from one origin, stamps use the same clock.
    struct Run {
        origin: Instant,
        log: RecoveryLog,
    }

    impl Run {
        fn new() -> Self {
            // Start the stamp clock first, so that every instant below is after its origin.
            timestamp(Instant::now());
            Run {
                origin: Instant::now(),
                log: RecoveryLog::default(),
            }
        }

        fn at(&self, ms: u64) -> Instant {
            self.origin + Duration::from_millis(ms)
        }

        fn ns(&self, ms: u64) -> u64 {
            timestamp(self.at(ms))
        }

        /// Message `seq`, sent at `sent` ms, received at `at` ms.
        fn receive(&mut self, seq: u64, sent: u64, at: u64) -> Receipt {
            let (at, sent) = (self.at(at), self.ns(sent));
            self.log.received(at, seq, sent)
        }

        fn ack(&mut self, seq: u64, sent: u64, at: u64) {
            let (at, sent) = (self.at(at), self.ns(sent));
            self.log.acked(at, seq, sent, ReasonCode::SUCCESS);
        }

        /// Message `seq` sent at `seq` ms, acknowledged and received 1 ms later.
        fn steady(&mut self, seqs: std::ops::Range<u64>) {
            for seq in seqs {
                self.ack(seq, seq, seq + 1);
                self.receive(seq, seq, seq + 1);
            }
        }
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 0.01)
    }

    #[test]
    fn subscriber_node_killed_then_back_elsewhere() {
        let mut r = Run::new();
        r.log.connected(Role::Subscriber, r.at(0), Some(0), false);
        r.log.connected(Role::Publisher, r.at(0), Some(1), false);
        r.steady(0..3000);
        // Kill at 3,000 ms: the subscriber's node. Messages 3000..3100 are acknowledged (the
        // publisher's node is alive) and queued for the subscriber's session.
        r.log.kill(r.at(3000));
        assert_eq!(r.log.recovered_at(), None);
        r.log.lost(Role::Subscriber, r.at(3001));
        for seq in 3000..3100 {
            r.ack(seq, seq, seq + 2);
        }
        assert_eq!(r.log.outstanding(), 100);
        // Back at 4,500 ms on node 2, session present: the queue arrives, then new messages.
        r.log.connected(Role::Subscriber, r.at(4500), Some(2), true);
        for seq in 3000..3100 {
            r.receive(seq, seq, 4510);
        }
        assert_eq!(r.log.outstanding(), 0);
        r.receive(3100, 4520, 4521);
        r.ack(3100, 4520, 4522);

        let rec = r.log.recovery(3101);
        assert!(rec.sub_lost && !rec.pub_lost);
        assert!(close(rec.sub_back_ms, 1500.0), "{rec:?}");
        assert_eq!(
            (rec.sub_back_node, rec.sub_session_present),
            (Some(2), Some(true))
        );
        // The first message after the kill was a queued one (sent before the kill).
        assert!(close(rec.first_message_ms, 1510.0), "{rec:?}");
        // Messages 3000.. were sent after the kill too: fresh traffic is the first of them.
        assert!(close(rec.first_fresh_message_ms, 1510.0), "{rec:?}");
        // Acknowledgements of fresh messages never stopped: the publisher's node was alive.
        assert!(close(rec.first_fresh_ack_ms, 2.0), "{rec:?}");
        assert!(close(rec.recovered_ms, 1510.0), "{rec:?}");
        // The longest silence: from 3,000 ms (last receipt before) to 4,510 ms.
        assert!((rec.max_receive_gap_ms - 1510.0).abs() < 0.01, "{rec:?}");
        assert!(close(rec.max_receive_gap_end_ms, 1510.0), "{rec:?}");
        assert_eq!(rec.max_sequence_jump, 0);
        assert_eq!((rec.acked, rec.received, rec.receipts), (3101, 3101, 3101));
        assert_eq!(
            (rec.missing_acked, rec.duplicates, rec.lost_unacked),
            (0, 0, 0)
        );
        assert_eq!(rec.sessions_lost, 0);
    }

    #[test]
    fn fresh_means_published_after_the_kill() {
        let mut r = Run::new();
        r.steady(0..10);
        r.log.kill(r.at(100));
        r.log.lost(Role::Subscriber, r.at(101));
        r.log.lost(Role::Publisher, r.at(101));
        // Old messages (sent before the kill) arrive and are acknowledged after it: not fresh.
        r.log.connected(Role::Publisher, r.at(900), Some(2), true);
        r.log.connected(Role::Subscriber, r.at(1000), Some(2), true);
        r.ack(10, 99, 950);
        r.receive(10, 99, 1100);
        assert_eq!(r.log.recovered_at(), None, "nothing fresh yet");
        // The first fresh message is acknowledged at 1,300 ms and received at 1,250 ms.
        r.receive(11, 1200, 1250);
        assert_eq!(r.log.recovered_at(), None, "no fresh acknowledgement yet");
        r.ack(11, 1200, 1300);
        assert_eq!(r.log.recovered_at(), Some(r.at(1300)));
        let rec = r.log.recovery(12);
        assert!(close(rec.pub_back_ms, 800.0), "{rec:?}");
        assert!(close(rec.sub_back_ms, 900.0), "{rec:?}");
        assert!(close(rec.first_message_ms, 1000.0), "{rec:?}");
        assert!(close(rec.first_fresh_message_ms, 1150.0), "{rec:?}");
        assert!(close(rec.first_fresh_ack_ms, 1200.0), "{rec:?}");
        assert!(close(rec.recovered_ms, 1200.0), "{rec:?}");
        assert_eq!((rec.missing_acked, rec.missing_acked_after_kill), (0, 0));
    }

    #[test]
    fn missing_messages_acknowledged_after_the_kill_are_told_apart() {
        let mut r = Run::new();
        r.ack(0, 0, 1); // before the kill, never received
        r.log.kill(r.at(10));
        r.ack(1, 5, 500); // sent before, acknowledged after the kill (a resend), never received
        r.ack(2, 6, 501); // the same, received
        r.receive(2, 6, 600);
        r.ack(3, 20, 502); // fresh, never received
        let rec = r.log.recovery(4);
        assert_eq!(rec.missing_examples, vec![0, 1, 3]);
        assert_eq!((rec.missing_acked, rec.missing_acked_after_kill), (3, 1));
    }

    #[test]
    fn recovery_waits_for_every_client_that_lost_its_connection() {
        let mut r = Run::new();
        r.log.connected(Role::Publisher, r.at(0), Some(0), false);
        r.log.kill(r.at(10));
        r.log.lost(Role::Publisher, r.at(11));
        // The subscriber kept its connection and gets fresh messages that were acknowledged:
        // but the publisher has not reconnected (these are from before it lost it, say).
        r.ack(0, 10, 12);
        r.receive(0, 10, 12);
        assert_eq!(r.log.recovered_at(), None);
        r.log.connected(Role::Publisher, r.at(500), Some(1), true);
        assert_eq!(r.log.recovered_at(), Some(r.at(500)));
        let rec = r.log.recovery(1);
        assert!(!rec.sub_lost && rec.pub_lost);
        assert_eq!(rec.sub_back_ms, None);
        assert!(close(rec.recovered_ms, 490.0), "{rec:?}");
    }

    #[test]
    fn losses_before_the_kill_are_not_the_failover() {
        let mut r = Run::new();
        r.log.connected(Role::Subscriber, r.at(0), Some(0), false);
        r.log.lost(Role::Subscriber, r.at(5));
        r.log.connected(Role::Subscriber, r.at(6), Some(0), true);
        r.log.kill(r.at(10));
        let rec = r.log.recovery(0);
        assert!(!rec.sub_lost);
        assert_eq!(rec.sub_back_ms, None);
        assert_eq!((r.log.subscriber.connects, r.log.subscriber.losses), (2, 1));
        assert!(r.log.subscriber.up);
    }

    #[test]
    fn no_recovery_without_a_kill_or_without_fresh_traffic() {
        let mut r = Run::new();
        r.steady(0..100);
        assert_eq!(r.log.recovered_at(), None, "no kill");
        r.log.kill(r.at(100));
        r.log.lost(Role::Subscriber, r.at(101));
        r.log.connected(Role::Subscriber, r.at(200), Some(1), true);
        assert_eq!(r.log.recovered_at(), None);
        let rec = r.log.recovery(100);
        assert_eq!(
            (
                rec.recovered_ms,
                rec.first_message_ms,
                rec.first_fresh_ack_ms
            ),
            (None, None, None)
        );
        assert!(close(rec.sub_back_ms, 100.0), "{rec:?}");
    }

    #[test]
    fn missing_acknowledged_messages_are_found_and_listed() {
        let mut r = Run::new();
        // 0..200 acknowledged; 70 and 130 never received; 150..160 received twice.
        for seq in 0..200 {
            r.ack(seq, seq, seq + 1);
            if seq != 70 && seq != 130 {
                r.receive(seq, seq, seq + 2);
            }
        }
        for seq in 150..160 {
            assert_eq!(r.receive(seq, seq, 300), Receipt::Duplicate);
        }
        // 200..205 published, never acknowledged; 203 received anyway.
        r.receive(203, 203, 310);
        let rec = r.log.recovery(205);
        assert_eq!(
            (rec.missing_acked, rec.missing_examples.clone()),
            (2, vec![70, 130])
        );
        assert_eq!(r.log.outstanding(), 2);
        assert_eq!((rec.acked, rec.received, rec.receipts), (200, 199, 209));
        assert_eq!((rec.duplicates, rec.lost_unacked), (10, 4));
        assert_eq!((rec.tally.expected, rec.tally.lost), (205, 6));
    }

    #[test]
    fn acknowledgement_and_receipt_count_in_either_order() {
        let mut r = Run::new();
        r.receive(0, 0, 1);
        r.ack(0, 0, 2);
        r.ack(1, 1, 2);
        r.receive(1, 1, 3);
        r.ack(1, 1, 4); // a repeated acknowledgement is not a second message
        assert_eq!((r.log.acked_count(), r.log.outstanding()), (2, 0));
    }

    #[test]
    fn refused_messages_are_not_acknowledged() {
        let mut r = Run::new();
        let (at, sent) = (r.at(1), r.ns(0));
        r.log.acked(at, 0, sent, ReasonCode::QUOTA_EXCEEDED);
        r.log
            .acked(at, 1, sent, ReasonCode::NO_MATCHING_SUBSCRIBERS);
        let rec = r.log.recovery(2);
        assert_eq!((rec.acked, rec.rejected, rec.no_subscribers), (1, 1, 1));
        assert_eq!(rec.missing_examples, vec![1]);
    }

    #[test]
    fn gaps_and_jumps() {
        let mut r = Run::new();
        r.receive(0, 0, 0);
        r.receive(1, 1, 10);
        // 2..7 skipped (jump 5), then filled in late: a gap of 90 ms, no new jump.
        r.receive(7, 7, 100);
        for seq in 2..7 {
            r.receive(seq, seq, 101);
        }
        r.receive(8, 8, 120);
        // Duplicates do not end a gap.
        r.receive(8, 8, 500);
        r.receive(9, 9, 700);
        let rec = r.log.recovery(10);
        assert_eq!(rec.max_sequence_jump, 5);
        assert!((rec.max_receive_gap_ms - 580.0).abs() < 0.01, "{rec:?}");
        assert_eq!(rec.tally.out_of_order, 5);
        assert_eq!(rec.max_receive_gap_end_ms, None, "no kill: no time from it");
    }

    #[test]
    fn milestones_take_the_earliest_event_whatever_the_arrival_order() {
        let mut r = Run::new();
        r.log.kill(r.at(0));
        r.receive(0, 50, 80);
        r.receive(1, 40, 60); // arrives later in the log, happened earlier
        r.ack(1, 40, 70);
        r.ack(0, 50, 65);
        let rec = r.log.recovery(2);
        assert!(close(rec.first_message_ms, 60.0), "{rec:?}");
        assert!(close(rec.first_fresh_message_ms, 60.0), "{rec:?}");
        assert!(close(rec.first_fresh_ack_ms, 65.0), "{rec:?}");
        assert!(close(rec.recovered_ms, 65.0), "{rec:?}");
    }

    #[test]
    fn a_reconnection_without_session_counts_as_a_lost_session() {
        let mut r = Run::new();
        r.log.connected(Role::Subscriber, r.at(0), Some(0), false);
        r.log.kill(r.at(1));
        r.log.lost(Role::Subscriber, r.at(2));
        r.log.connected(Role::Subscriber, r.at(3), None, false);
        let rec = r.log.recovery(0);
        assert_eq!(rec.sessions_lost, 1);
        assert_eq!(
            (rec.sub_back_node, rec.sub_session_present),
            (None, Some(false))
        );
    }
}
