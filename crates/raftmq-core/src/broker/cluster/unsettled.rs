//! Local deliveries of a message whose commit was reported failed but may have happened.
//!
//! A message routed here is queued for the sessions of this node once its commit succeeds, and
//! dropped if it fails: the client resends it. But a commit reported failed (a timeout, a
//! forward whose reply was lost, a node paused past its deadline) may still have happened.
//! Then the client's resend is recognised as a duplicate (a QoS 2 packet id already recorded)
//! and routed nowhere, and the replicated copy reaches only the sessions of *other* nodes (a
//! node does not re-apply its own batches to its broker): the sessions here would not get it
//! until they are reloaded. So the deliveries of a failed commit are kept, by stored message
//! id, and queued if this node later applies that message's `MessageStored` after all
//! ([`Broker::own_stored_applied`]). Bounded: the oldest are forgotten first.

use crate::broker::Broker;
use crate::durability::MessageId;
use crate::message::Delivery;
use crate::session::Session;
use ahash::{HashMap, HashSet};
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;

/// Failed commits whose deliveries are kept, and stored ids of this node applied recently.
const CAPACITY: usize = 4096;

type Deferred = Vec<(Arc<Session>, Delivery)>;

#[derive(Default)]
pub(in crate::broker) struct Unsettled(Mutex<Inner>);

#[derive(Default)]
struct Inner {
    waiting: HashMap<MessageId, Deferred>,
    waiting_order: VecDeque<MessageId>,
    applied: HashSet<MessageId>,
    applied_order: VecDeque<MessageId>,
}

impl Unsettled {
    /// Keeps the deliveries of message `id`, whose commit was reported failed; returns them at
    /// once if this node has already applied its `MessageStored` (then they are due now).
    pub(in crate::broker) fn failed(&self, id: MessageId, deferred: Deferred) -> Option<Deferred> {
        let mut inner = self.0.lock();
        if inner.applied.contains(&id) {
            return Some(deferred);
        }
        if inner.waiting.insert(id, deferred).is_none() {
            inner.waiting_order.push_back(id);
        }
        while inner.waiting_order.len() > CAPACITY {
            if let Some(old) = inner.waiting_order.pop_front() {
                inner.waiting.remove(&old);
            }
        }
        None
    }

    /// This node applied the `MessageStored` of `id` (proposed here): the deliveries kept for
    /// it, if its commit had been reported failed.
    fn applied(&self, id: MessageId) -> Option<Deferred> {
        let mut inner = self.0.lock();
        if let Some(deferred) = inner.waiting.remove(&id) {
            inner.waiting_order.retain(|w| *w != id);
            return Some(deferred);
        }
        if inner.applied.insert(id) {
            inner.applied_order.push_back(id);
        }
        while inner.applied_order.len() > CAPACITY {
            if let Some(old) = inner.applied_order.pop_front() {
                inner.applied.remove(&old);
            }
        }
        None
    }
}

impl Broker {
    /// This node applied the `MessageStored` changes with these ids from batches it proposed
    /// itself (see the module docs): queues the deliveries kept for any whose commit had been
    /// reported failed. The caller is the applied-change feed; batches of other nodes go to
    /// [`Broker::apply_replicated`].
    pub fn own_stored_applied(&self, ids: impl IntoIterator<Item = MessageId>) {
        for id in ids {
            if let Some(deferred) = self.cluster.unsettled.applied(id) {
                self.deliver_committed(deferred);
            }
        }
    }
}
