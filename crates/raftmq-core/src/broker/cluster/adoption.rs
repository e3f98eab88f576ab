//! Messages stored for sessions this node is about to adopt.
//!
//! Adoption (after a `NodeDown` this node committed, or when it regains a quorum) reads the
//! sessions it now owns from the replicated state and restores them. Until a session is
//! restored, a QoS 1/2 message published here reaches it only through the mirrored
//! subscriptions (it is stored for it, but the applied-change feed never queues this node's own
//! batches); if that message commits after the read, neither the read nor the feed would
//! queue it. So between [`Broker::begin_adoption`] and [`Broker::adopt_sessions`], every such
//! delivery is kept in a slot. Whichever comes second — the message's commit or the session's
//! restore — queues it (once: a message the read already restored is not queued again).

use crate::broker::Broker;
use crate::durability::Commit;
use crate::message::Delivery;
use crate::session::Session;
use parking_lot::Mutex;
use std::sync::Arc;

/// One delivery waiting for both its commit and its session.
pub(in crate::broker) struct AdoptionSlot {
    delivery: Delivery,
    state: Mutex<SlotState>,
}

enum SlotState {
    /// Routed; neither the commit nor the session is known yet.
    Routed,
    /// The routing pass proposed it under this commit.
    Proposed(Commit),
    /// The session was restored first.
    Claimed(Arc<Session>),
    /// Handed over.
    Done,
}

impl AdoptionSlot {
    pub(in crate::broker) fn new(delivery: Delivery) -> Arc<Self> {
        Arc::new(AdoptionSlot {
            delivery,
            state: Mutex::new(SlotState::Routed),
        })
    }
}

impl Broker {
    /// Opens the adoption window: from now until [`Broker::adopt_sessions`] (or
    /// [`Broker::end_adoption`]), stored messages routed to persistent sessions that are not in
    /// memory here are kept for them. Call before the barrier or `NodeDown` whose commit
    /// precedes the read of the sessions to adopt.
    pub fn begin_adoption(&self) {
        let mut adopting = self.cluster.adopting.lock();
        if adopting.is_none() {
            *adopting = Some(Default::default());
        }
    }

    /// Closes the adoption window without adopting (the read it was opened for did not
    /// happen).
    pub fn end_adoption(&self) {
        self.cluster.adopting.lock().take();
    }

    /// The routing pass proposed the slot's message under `commit`.
    pub(in crate::broker) fn slot_proposed(&self, slot: &AdoptionSlot, commit: &Commit) {
        let mut state = slot.state.lock();
        match std::mem::replace(&mut *state, SlotState::Done) {
            SlotState::Claimed(session) => {
                drop(state);
                self.queue_stored_after(commit, session, slot.delivery.clone());
            }
            SlotState::Routed => *state = SlotState::Proposed(commit.clone()),
            other => *state = other,
        }
    }

    /// The slot's session was restored (as `session`).
    pub(in crate::broker) fn slot_claimed(&self, slot: &AdoptionSlot, session: &Arc<Session>) {
        let mut state = slot.state.lock();
        match std::mem::replace(&mut *state, SlotState::Done) {
            SlotState::Proposed(commit) => {
                drop(state);
                self.queue_stored_after(&commit, session.clone(), slot.delivery.clone());
            }
            SlotState::Routed => *state = SlotState::Claimed(session.clone()),
            other => *state = other,
        }
    }

    /// Queues a stored delivery for `session` once `commit` succeeded, unless the session
    /// already has that stored message (restored from a read made after the commit).
    fn queue_stored_after(&self, commit: &Commit, session: Arc<Session>, delivery: Delivery) {
        let (limits, stats) = (self.queue_limits, self.stats.clone());
        commit.on_complete(move |result| {
            if result.is_ok() {
                session.enqueue_stored_once(delivery, &limits, &stats);
            }
        });
    }
}
