//! Loss, duplicate and ordering accounting.
//!
//! Every subscriber keeps a [`StreamLog`]: for each publisher, the set of sequence numbers it
//! received (a bitset), how many receipts there were and how many arrived out of order. Once the
//! publishers have stopped, their sent counts ([`Sent`]) say what should have arrived, and a
//! [`Tally`] compares the two:
//!
//! * [`tally_each`]: one subscriber must receive every message of the publishers it listens to,
//!   exactly once (p2p, fan-out and fan-in: sum the tallies of all subscribers, so a fan-out to
//!   N subscribers expects N copies of each message);
//! * [`tally_group`]: the members of a shared subscription group together must receive every
//!   message exactly once (a copy received by two members is a duplicate).
//!
//! Publisher `p` sends sequence numbers `0..sent[p]` in order. A receipt of a sequence number
//! already received is a duplicate; a first receipt of a number below the highest received so
//! far (from that publisher, by that subscriber) is out of order. A receipt from a publisher the
//! subscriber does not listen to, or of a number the publisher never sent, is unexpected (a
//! routing bug), and is not counted as delivered.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// What a receipt was, for the receiver's own counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receipt {
    /// The first receipt of this message by this subscriber.
    New,
    /// This subscriber had already received this message.
    Duplicate,
}

/// The messages one subscriber received, per publisher.
#[derive(Clone, Debug, Default)]
pub struct StreamLog {
    /// By publisher id.
    streams: HashMap<u32, Stream>,
}

/// The messages received from one publisher.
#[derive(Clone, Debug, Default)]
struct Stream {
    /// Bit `seq` is set once `seq` was received.
    seen: Vec<u64>,
    receipts: u64,
    /// One past the highest sequence number received.
    high: u64,
    out_of_order: u64,
}

impl Stream {
    /// Distinct sequence numbers received below `end`.
    fn distinct_below(&self, end: u64) -> u64 {
        count_below(&self.seen, end)
    }

    fn distinct(&self) -> u64 {
        self.distinct_below(u64::MAX)
    }
}

/// The word index and bit mask of `seq` in a bitset.
fn split(seq: u64) -> (usize, u64) {
    let word = usize::try_from(seq / 64).expect("sequence numbers fit the address space");
    (word, 1 << (seq % 64))
}

/// Bits set in `bits` at positions below `end`.
fn count_below(bits: &[u64], end: u64) -> u64 {
    let full = usize::try_from(end / 64).unwrap_or(usize::MAX);
    let mut count: u64 = bits
        .iter()
        .take(full)
        .map(|w| u64::from(w.count_ones()))
        .sum();
    if let Some(word) = bits.get(full) {
        let mask = (1u64 << (end % 64)) - 1;
        count += u64::from((word & mask).count_ones());
    }
    count
}

impl StreamLog {
    /// Records the receipt of message `seq` of `publisher`.
    pub fn record(&mut self, publisher: u32, seq: u64) -> Receipt {
        let stream = self.streams.entry(publisher).or_default();
        stream.receipts += 1;
        let (word, bit) = split(seq);
        if stream.seen.len() <= word {
            stream.seen.resize(word + 1, 0);
        }
        if stream.seen[word] & bit != 0 {
            return Receipt::Duplicate;
        }
        stream.seen[word] |= bit;
        if seq < stream.high {
            stream.out_of_order += 1;
        } else {
            stream.high = seq + 1;
        }
        Receipt::New
    }

    fn stream(&self, publisher: u32) -> Option<&Stream> {
        self.streams.get(&publisher)
    }

    /// Distinct sequence numbers received from `publisher`.
    pub fn distinct(&self, publisher: u32) -> u64 {
        self.stream(publisher).map_or(0, Stream::distinct)
    }

    /// True once message `seq` of `publisher` was received.
    pub fn contains(&self, publisher: u32, seq: u64) -> bool {
        let (word, bit) = split(seq);
        self.stream(publisher)
            .and_then(|s| s.seen.get(word))
            .is_some_and(|w| w & bit != 0)
    }
}

/// How many messages each publisher sent: publisher `p` sent sequence numbers `0..sent[p]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sent(pub Vec<u64>);

impl Sent {
    fn of(&self, publisher: u32) -> u64 {
        self.0.get(publisher as usize).copied().unwrap_or(0)
    }
}

/// Expected against received messages, over one or more subscribers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Copies that should have been delivered.
    pub expected: u64,
    /// Expected copies that were delivered (at least once).
    pub delivered: u64,
    /// Expected copies never delivered.
    pub lost: u64,
    /// Receipts of a copy already delivered.
    pub duplicates: u64,
    /// First receipts that arrived after a later message of the same publisher.
    pub out_of_order: u64,
    /// Receipts of messages that were not expected at all (wrong publisher, or never sent).
    pub unexpected: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, other: Self) {
        self.expected += other.expected;
        self.delivered += other.delivered;
        self.lost += other.lost;
        self.duplicates += other.duplicates;
        self.out_of_order += other.out_of_order;
        self.unexpected += other.unexpected;
    }
}

/// Tally of one subscriber that must receive every message of `publishers` exactly once.
pub fn tally_each(log: &StreamLog, sent: &Sent, publishers: &[u32]) -> Tally {
    let mut tally = Tally::default();
    for (publisher, stream) in &log.streams {
        if !publishers.contains(publisher) {
            tally.unexpected += stream.receipts;
            continue;
        }
        let expected = sent.of(*publisher);
        let delivered = stream.distinct_below(expected);
        tally.delivered += delivered;
        tally.unexpected += stream.distinct() - delivered;
        tally.duplicates += stream.receipts - stream.distinct();
        tally.out_of_order += stream.out_of_order;
    }
    tally.expected = publishers.iter().map(|&p| sent.of(p)).sum();
    tally.lost = tally.expected - tally.delivered;
    tally
}

/// Tally of a shared subscription group (`members`) that together must receive every message
/// of `publishers` exactly once. Out-of-order counts each member's own stream.
pub fn tally_group(members: &[&StreamLog], sent: &Sent, publishers: &[u32]) -> Tally {
    let mut tally = Tally::default();
    for &publisher in publishers {
        let expected = sent.of(publisher);
        let mut union: Vec<u64> = Vec::new();
        let mut receipts = 0;
        for stream in members.iter().filter_map(|m| m.stream(publisher)) {
            if union.len() < stream.seen.len() {
                union.resize(stream.seen.len(), 0);
            }
            for (u, w) in union.iter_mut().zip(&stream.seen) {
                *u |= w;
            }
            receipts += stream.receipts;
            tally.out_of_order += stream.out_of_order;
        }
        let distinct = count_below(&union, u64::MAX);
        let delivered = count_below(&union, expected);
        tally.expected += expected;
        tally.delivered += delivered;
        tally.unexpected += distinct - delivered;
        tally.duplicates += receipts - distinct;
    }
    // Receipts from publishers outside the group's interest.
    for member in members {
        for (publisher, stream) in &member.streams {
            if !publishers.contains(publisher) {
                tally.unexpected += stream.receipts;
            }
        }
    }
    tally.lost = tally.expected - tally.delivered;
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log of the given (publisher, seq) receipts, in order.
    fn log(receipts: &[(u32, u64)]) -> StreamLog {
        let mut log = StreamLog::default();
        for &(p, s) in receipts {
            log.record(p, s);
        }
        log
    }

    fn seqs(publisher: u32, range: std::ops::Range<u64>) -> Vec<(u32, u64)> {
        range.map(|s| (publisher, s)).collect()
    }

    #[test]
    fn complete_in_order_stream() {
        let t = tally_each(&log(&seqs(0, 0..1000)), &Sent(vec![1000]), &[0]);
        assert_eq!(
            t,
            Tally {
                expected: 1000,
                delivered: 1000,
                ..Tally::default()
            }
        );
    }

    #[test]
    fn gaps_are_lost() {
        // 0..100 without 10, 64 (word boundary) and the tail 95..100.
        let received: Vec<_> = seqs(0, 0..95)
            .into_iter()
            .filter(|&(_, s)| s != 10 && s != 64)
            .collect();
        let t = tally_each(&log(&received), &Sent(vec![100]), &[0]);
        assert_eq!((t.expected, t.delivered, t.lost), (100, 93, 7));
        assert_eq!((t.duplicates, t.out_of_order, t.unexpected), (0, 0, 0));
    }

    #[test]
    fn nothing_received() {
        let t = tally_each(&StreamLog::default(), &Sent(vec![5, 7]), &[0, 1]);
        assert_eq!((t.expected, t.delivered, t.lost), (12, 0, 12));
    }

    #[test]
    fn duplicates_are_counted_once_each() {
        let received = [(0, 0), (0, 1), (0, 1), (0, 2), (0, 1), (0, 0)];
        let mut l = StreamLog::default();
        let kinds: Vec<_> = received.iter().map(|&(p, s)| l.record(p, s)).collect();
        use Receipt::*;
        assert_eq!(kinds, [New, New, Duplicate, New, Duplicate, Duplicate]);
        let t = tally_each(&l, &Sent(vec![3]), &[0]);
        assert_eq!(
            (t.delivered, t.lost, t.duplicates, t.out_of_order),
            (3, 0, 3, 0)
        );
    }

    #[test]
    fn reorderings_count_late_first_receipts() {
        // 3 and 1 arrive after a higher number; the duplicate 4 is not a reordering.
        let t = tally_each(
            &log(&[(0, 0), (0, 2), (0, 4), (0, 3), (0, 1), (0, 4), (0, 5)]),
            &Sent(vec![6]),
            &[0],
        );
        assert_eq!(
            (t.delivered, t.lost, t.duplicates, t.out_of_order),
            (6, 0, 1, 2)
        );
    }

    #[test]
    fn order_is_per_publisher() {
        // Interleaved publishers, each in order.
        let t = tally_each(
            &log(&[(1, 0), (0, 0), (1, 1), (0, 1), (2, 0), (0, 2)]),
            &Sent(vec![3, 2, 1]),
            &[0, 1, 2],
        );
        assert_eq!(
            (t.expected, t.delivered, t.lost, t.out_of_order),
            (6, 6, 0, 0)
        );
    }

    #[test]
    fn multiple_publishers_with_losses() {
        let mut received = seqs(0, 0..50);
        received.extend(seqs(1, 10..20));
        let t = tally_each(&log(&received), &Sent(vec![50, 20, 5]), &[0, 1, 2]);
        assert_eq!((t.expected, t.delivered, t.lost), (75, 60, 15));
    }

    #[test]
    fn unexpected_publishers_and_sequence_numbers() {
        // Publisher 1 is not listened to; seq 5 and 6 of publisher 0 were never sent.
        let t = tally_each(
            &log(&[(0, 0), (1, 0), (1, 1), (0, 5), (0, 6), (0, 6)]),
            &Sent(vec![2, 2]),
            &[0],
        );
        assert_eq!((t.expected, t.delivered, t.lost), (2, 1, 1));
        assert_eq!((t.unexpected, t.duplicates), (4, 1));
    }

    #[test]
    fn fanout_expects_a_copy_per_subscriber() {
        let sent = Sent(vec![100]);
        let full = log(&seqs(0, 0..100));
        let missing_one = log(&seqs(0, 1..100));
        let twice: Vec<_> = seqs(0, 0..100).into_iter().chain(seqs(0, 0..10)).collect();
        let twice = log(&twice);
        let mut total = Tally::default();
        for sub in [&full, &missing_one, &twice] {
            total += tally_each(sub, &sent, &[0]);
        }
        assert_eq!(
            total,
            Tally {
                expected: 300,
                delivered: 299,
                lost: 1,
                duplicates: 10,
                ..Tally::default()
            }
        );
    }

    #[test]
    fn shared_group_expects_exactly_one_copy() {
        let sent = Sent(vec![6, 2]);
        // Round-robin split of both publishers across three members.
        let a = log(&[(0, 0), (0, 3), (1, 1)]);
        let b = log(&[(0, 1), (0, 4)]);
        let c = log(&[(0, 2), (0, 5), (1, 0)]);
        let t = tally_group(&[&a, &b, &c], &sent, &[0, 1]);
        assert_eq!(
            t,
            Tally {
                expected: 8,
                delivered: 8,
                ..Tally::default()
            }
        );
    }

    #[test]
    fn shared_group_copies_to_two_members_are_duplicates() {
        let sent = Sent(vec![4]);
        let a = log(&[(0, 0), (0, 1), (0, 2)]);
        let b = log(&[(0, 1), (0, 2), (0, 2)]);
        let t = tally_group(&[&a, &b], &sent, &[0]);
        // 1 and 2 went to both members (2 of them twice to b), 3 to nobody.
        assert_eq!(
            (t.expected, t.delivered, t.lost, t.duplicates),
            (4, 3, 1, 3)
        );
    }

    #[test]
    fn shared_group_order_is_per_member() {
        // Each member sees an increasing subsequence: no reordering even though the union
        // interleaves; b's own stream goes backwards once.
        let a = log(&[(0, 0), (0, 2), (0, 4)]);
        let b = log(&[(0, 3), (0, 1), (0, 5)]);
        let t = tally_group(&[&a, &b], &Sent(vec![6]), &[0]);
        assert_eq!((t.delivered, t.out_of_order), (6, 1));
    }

    #[test]
    fn shared_group_unexpected_receipts() {
        let a = log(&[(0, 0), (0, 9), (3, 0)]);
        let t = tally_group(&[&a], &Sent(vec![1]), &[0]);
        assert_eq!((t.delivered, t.unexpected), (1, 2));
    }

    #[test]
    fn contains_what_was_recorded() {
        let l = log(&[(0, 0), (0, 63), (0, 64), (2, 5)]);
        for (p, s) in [(0, 0), (0, 63), (0, 64), (2, 5)] {
            assert!(l.contains(p, s), "({p}, {s})");
        }
        for (p, s) in [(0, 1), (0, 65), (0, 1_000_000), (1, 0), (2, 4)] {
            assert!(!l.contains(p, s), "({p}, {s})");
        }
    }

    #[test]
    fn bit_counting_at_word_boundaries() {
        let bits = [u64::MAX, 0b101];
        assert_eq!(count_below(&bits, 0), 0);
        assert_eq!(count_below(&bits, 63), 63);
        assert_eq!(count_below(&bits, 64), 64);
        assert_eq!(count_below(&bits, 65), 65);
        assert_eq!(count_below(&bits, 66), 65);
        assert_eq!(count_below(&bits, 67), 66);
        assert_eq!(count_below(&bits, u64::MAX), 66);
        let t = tally_each(&log(&[(0, 64)]), &Sent(vec![65]), &[0]);
        assert_eq!((t.delivered, t.lost), (1, 64));
    }
}
