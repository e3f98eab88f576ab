//! Live delivery of stored QoS 1 messages to persistent sessions held by this node when the
//! message was published on another node.
//!
//! Such a message reaches this node twice: forwarded live by the publishing node (fast, no
//! consensus), and as a `MessageStored` in the replicated log (after the commit). The session
//! must get it once, from whichever arrives first, and the log must end up saying it was
//! delivered: the session's `MessageSent`/`MessageAcked` for it may only be proposed once the
//! `MessageStored` they refer to has been applied here (before that, the state machine would
//! ignore them and keep the message for a redelivery).
//!
//! [`LiveStored`] keeps, per (message id, client id), which path came first: `Delivered` (the
//! forwarded copy was queued; changes naming it are held back until the log's copy arrives,
//! which is then skipped) or `Queued` (the log's copy was queued; the forwarded copy will be
//! skipped). Bounded: the oldest marks are dropped beyond [`CAPACITY`] (held-back changes are
//! proposed then). Only QoS 1 takes this path: for QoS 2 a forwarded copy whose publisher's
//! node died before the commit could be delivered and then never be recorded.

use crate::durability::{MessageId, StateChange};
use raftmq_codec::ByteStr;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Most marks kept (a forwarded copy arriving after this many later stored messages, e.g.
/// resent after a long link outage, is delivered a second time: QoS 1 allows it).
pub(super) const CAPACITY: usize = 65_536;

type Key = (MessageId, ByteStr);

enum Mark {
    /// The forwarded copy was queued; changes naming the message, held back.
    Delivered(Vec<StateChange>),
    /// The replicated copy was queued.
    Queued,
}

/// What to do with one copy of a message.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Copy {
    /// Queue it for the session.
    Queue,
    /// The other copy got there first: drop this one.
    Skip,
}

#[derive(Default)]
pub(in crate::broker) struct LiveStored {
    inner: parking_lot::Mutex<Inner>,
    /// Marks held (read without the lock on the proposal path).
    len: AtomicUsize,
}

#[derive(Default)]
struct Inner {
    marks: HashMap<Key, Mark>,
    /// Insertion order, for eviction (may hold keys already removed).
    order: VecDeque<Key>,
}

impl LiveStored {
    /// The forwarded copy of stored message `id` arrived for session `client_id`.
    pub(super) fn forwarded(&self, id: MessageId, client_id: &ByteStr) -> (Copy, Vec<StateChange>) {
        let mut inner = self.inner.lock();
        let key = (id, client_id.clone());
        match inner.marks.remove(&key) {
            Some(Mark::Queued) => {
                self.len.store(inner.marks.len(), Relaxed);
                (Copy::Skip, Vec::new())
            }
            Some(Mark::Delivered(held)) => {
                // A second forwarded copy (a resend): keep the first's mark.
                inner.marks.insert(key, Mark::Delivered(held));
                (Copy::Skip, Vec::new())
            }
            None => {
                let evicted = inner.insert(key, Mark::Delivered(Vec::new()));
                self.len.store(inner.marks.len(), Relaxed);
                (Copy::Queue, evicted)
            }
        }
    }

    /// Session `client_id` was loaded here from an image holding stored message `id`: a
    /// forwarded copy arriving later is skipped (the image's copy is queued). Returns the
    /// changes held back for a forwarded copy that came first (its replicated copy is applied).
    pub(in crate::broker) fn loaded(&self, id: MessageId, client_id: &ByteStr) -> Vec<StateChange> {
        let mut inner = self.inner.lock();
        let key = (id, client_id.clone());
        let held = match inner.marks.remove(&key) {
            Some(Mark::Delivered(held)) => held,
            Some(Mark::Queued) | None => inner.insert(key, Mark::Queued),
        };
        self.len.store(inner.marks.len(), Relaxed);
        held
    }

    /// The forwarded copy that [`Self::forwarded`] said to queue could not be queued: the
    /// replicated copy should be, when it comes. Returns changes to propose now.
    pub(super) fn not_queued(&self, id: MessageId, client_id: &ByteStr) -> Vec<StateChange> {
        let mut inner = self.inner.lock();
        let held = match inner.marks.remove(&(id, client_id.clone())) {
            Some(Mark::Delivered(held)) => held,
            Some(Mark::Queued) | None => Vec::new(),
        };
        self.len.store(inner.marks.len(), Relaxed);
        held
    }

    /// The replicated copy of `id` for session `client_id` was applied here. `expect_forward`:
    /// a forwarded copy may still come (mark it). Returns what to do with the replicated copy,
    /// and the held-back changes to propose now (they follow the `MessageStored` in the log).
    pub(super) fn replicated(
        &self,
        id: MessageId,
        client_id: &ByteStr,
        expect_forward: bool,
    ) -> (Copy, Vec<StateChange>) {
        if !expect_forward && self.len.load(Relaxed) == 0 {
            // Nothing marked, nothing to mark: the common case of an offline target.
            return (Copy::Queue, Vec::new());
        }
        let mut inner = self.inner.lock();
        let key = (id, client_id.clone());
        let result = match inner.marks.remove(&key) {
            Some(Mark::Delivered(held)) => (Copy::Skip, held),
            Some(Mark::Queued) | None if expect_forward => {
                let evicted = inner.insert(key, Mark::Queued);
                (Copy::Queue, evicted)
            }
            Some(Mark::Queued) | None => (Copy::Queue, Vec::new()),
        };
        self.len.store(inner.marks.len(), Relaxed);
        result
    }

    /// Takes out of `changes` those naming a message delivered live whose replicated copy has
    /// not been applied yet; they are proposed after it.
    pub(in crate::broker) fn hold_back(&self, changes: &mut Vec<StateChange>) {
        if self.len.load(Relaxed) == 0 {
            return;
        }
        let mut inner = self.inner.lock();
        changes.retain(|change| {
            let (StateChange::MessageSent { client_id, id, .. }
            | StateChange::MessageAcked { client_id, id }
            | StateChange::MessageReleased { client_id, id }) = change
            else {
                return true;
            };
            match inner.marks.get_mut(&(*id, client_id.clone())) {
                Some(Mark::Delivered(held)) => {
                    held.push(change.clone());
                    false
                }
                _ => true,
            }
        });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.len.load(Relaxed)
    }
}

impl Inner {
    /// Inserts a mark, evicting the oldest beyond [`CAPACITY`]; returns the changes held back
    /// by evicted marks (to propose now).
    fn insert(&mut self, key: Key, mark: Mark) -> Vec<StateChange> {
        self.marks.insert(key.clone(), mark);
        self.order.push_back(key);
        let mut released = Vec::new();
        while self.marks.len() > CAPACITY {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some(Mark::Delivered(mut held)) = self.marks.remove(&old) {
                released.append(&mut held);
            }
        }
        if self.order.len() > 2 * CAPACITY.max(self.marks.len()) {
            let marks = &self.marks;
            self.order.retain(|k| marks.contains_key(k));
        }
        released
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked(client: &str, id: u64) -> StateChange {
        StateChange::MessageAcked {
            client_id: ByteStr::from(client),
            id: MessageId(id),
        }
    }

    #[test]
    fn forwarded_first_holds_back_changes_until_the_replicated_copy_which_is_skipped() {
        let live = LiveStored::default();
        let c = ByteStr::from("c");
        assert_eq!(live.forwarded(MessageId(1), &c).0, Copy::Queue);
        let mut changes = vec![acked("c", 1), acked("c", 2), acked("d", 1)];
        live.hold_back(&mut changes);
        assert_eq!(changes, vec![acked("c", 2), acked("d", 1)]);
        let (copy, held) = live.replicated(MessageId(1), &c, true);
        assert_eq!(copy, Copy::Skip);
        assert_eq!(held, vec![acked("c", 1)]);
        assert_eq!(live.len(), 0);
        // Nothing is held back any more.
        let mut changes = vec![acked("c", 1)];
        live.hold_back(&mut changes);
        assert_eq!(changes.len(), 1);
    }

    #[test]
    fn replicated_first_skips_the_forwarded_copy() {
        let live = LiveStored::default();
        let c = ByteStr::from("c");
        assert_eq!(live.replicated(MessageId(7), &c, true).0, Copy::Queue);
        assert_eq!(live.forwarded(MessageId(7), &c).0, Copy::Skip);
        assert_eq!(live.len(), 0);
        // Without an expected forward nothing is remembered.
        assert_eq!(live.replicated(MessageId(8), &c, false).0, Copy::Queue);
        assert_eq!(live.len(), 0);
        assert_eq!(live.forwarded(MessageId(8), &c).0, Copy::Queue);
    }

    #[test]
    fn a_resent_forward_is_skipped_and_an_unqueued_one_leaves_it_to_the_log() {
        let live = LiveStored::default();
        let c = ByteStr::from("c");
        assert_eq!(live.forwarded(MessageId(1), &c).0, Copy::Queue);
        assert_eq!(live.forwarded(MessageId(1), &c).0, Copy::Skip);
        let mut changes = vec![acked("c", 1)];
        live.hold_back(&mut changes);
        assert!(changes.is_empty());
        assert_eq!(live.not_queued(MessageId(1), &c), vec![acked("c", 1)]);
        assert_eq!(live.replicated(MessageId(1), &c, false).0, Copy::Queue);
    }

    #[test]
    fn marks_are_bounded_and_evicted_marks_release_their_changes() {
        let live = LiveStored::default();
        let c = ByteStr::from("c");
        live.forwarded(MessageId(0), &c);
        let mut changes = vec![acked("c", 0)];
        live.hold_back(&mut changes);
        let mut released = Vec::new();
        for i in 1..=CAPACITY as u64 {
            released.extend(live.forwarded(MessageId(i), &c).1);
        }
        assert_eq!(live.len(), CAPACITY);
        assert_eq!(released, vec![acked("c", 0)]);
        // The evicted one is unknown again: its replicated copy is queued.
        assert_eq!(live.replicated(MessageId(0), &c, false).0, Copy::Queue);
        assert_eq!(live.len(), CAPACITY);
    }
}
