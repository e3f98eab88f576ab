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
use crate::durability::{MessageId, StoredTarget};
use crate::message::{Delivery, Message};
use crate::session::Session;
use ahash::{HashMap, HashSet};
use parking_lot::Mutex;
use raftmq_codec::ByteStr;
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
    /// Per stored id applied here, the sessions it was stored for (a message split over
    /// shards is applied one shard at a time, each storing it for its own sessions).
    applied: HashMap<MessageId, HashSet<ByteStr>>,
    applied_order: VecDeque<MessageId>,
    /// Messages this node stored for sessions held elsewhere when it routed them, whose
    /// stores may apply only after such a session was loaded here (see
    /// [`Unsettled::stored_remotely`]).
    remote: HashMap<MessageId, (Arc<Message>, Vec<StoredTarget>)>,
    remote_order: VecDeque<MessageId>,
}

impl Inner {
    /// Takes out of `deferred` the deliveries a store of the message for the sessions
    /// `stored_for` makes due: those to these sessions, and every delivery that is not of the
    /// stored message (to a session that is not persistent, or at QoS 0), which only waited
    /// to know that the message was accepted.
    fn take_stored(deferred: &mut Deferred, stored_for: &HashSet<ByteStr>) -> Deferred {
        let (due, rest) = std::mem::take(deferred)
            .into_iter()
            .partition(|(session, delivery)| {
                delivery.durable.is_none() || stored_for.contains(session.client_id())
            });
        *deferred = rest;
        due
    }
}

impl Unsettled {
    /// Keeps the deliveries of message `id`, stored again by a resent QoS 2 PUBLISH, until
    /// this node applies a store of it for their sessions. Unlike [`Unsettled::failed`], what
    /// was applied of `id` before does not count (a session it reached then has the message
    /// already), and a delivery replaces one kept for the same session (a first attempt's:
    /// the message goes to each session once).
    pub(in crate::broker) fn rerouted(&self, id: MessageId, deferred: Deferred) {
        let mut inner = self.0.lock();
        let inner = &mut *inner;
        match inner.waiting.entry(id) {
            std::collections::hash_map::Entry::Occupied(mut e) => {
                let kept = e.get_mut();
                kept.retain(|(s, _)| !deferred.iter().any(|(n, _)| n.client_id() == s.client_id()));
                kept.extend(deferred);
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(deferred);
                inner.waiting_order.push_back(id);
            }
        }
        // Only stores applied from now on release them.
        inner.applied.remove(&id);
        while inner.waiting_order.len() > CAPACITY {
            if let Some(old) = inner.waiting_order.pop_front() {
                inner.waiting.remove(&old);
            }
        }
    }

    /// Keeps the deliveries of message `id`, whose commit was reported failed (or whose store
    /// is still to be applied); returns at once those whose sessions this node has already
    /// applied its `MessageStored` for (they are due now).
    pub(in crate::broker) fn failed(&self, id: MessageId, deferred: Deferred) -> Option<Deferred> {
        let mut inner = self.0.lock();
        let mut deferred = deferred;
        let due = inner
            .applied
            .get(&id)
            .map(|stored_for| Inner::take_stored(&mut deferred, stored_for));
        if !deferred.is_empty() {
            match inner.waiting.entry(id) {
                std::collections::hash_map::Entry::Occupied(mut e) => e.get_mut().extend(deferred),
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(deferred);
                    inner.waiting_order.push_back(id);
                }
            }
        }
        while inner.waiting_order.len() > CAPACITY {
            if let Some(old) = inner.waiting_order.pop_front() {
                inner.waiting.remove(&old);
            }
        }
        due
    }

    /// Message `id` is stored, through this node, for `targets`, sessions that were not held
    /// here when it was routed (so it has no delivery for them here). A node's own stores are
    /// not fed to its broker: if one of those sessions is loaded here before the store
    /// applies, nothing else queues the message for it. That happens when the store commits
    /// after the claim of the session's load in the session's shard: a QoS 2 message of a
    /// persistent publisher stored across shards waits for its receipt to commit in the
    /// publisher's shard first (`raftmq_cluster::split`, the gate). Kept until the store
    /// applies here ([`Broker::own_stored_applied`]); bounded.
    pub(in crate::broker) fn stored_remotely(
        &self,
        id: MessageId,
        message: Arc<Message>,
        targets: Vec<StoredTarget>,
    ) {
        let mut inner = self.0.lock();
        if inner.remote.insert(id, (message, targets)).is_none() {
            inner.remote_order.push_back(id);
        }
        while inner.remote_order.len() > CAPACITY {
            if let Some(old) = inner.remote_order.pop_front() {
                inner.remote.remove(&old);
            }
        }
    }

    /// The targets of [`Unsettled::stored_remotely`] message `id` among `stored_for` (a
    /// store of one shard), with the message; forgotten once every target was taken.
    fn take_remote(
        &self,
        id: MessageId,
        stored_for: &[ByteStr],
    ) -> Option<(Arc<Message>, Vec<StoredTarget>)> {
        let mut inner = self.0.lock();
        let inner = &mut *inner;
        let (message, targets) = inner.remote.get_mut(&id)?;
        let (taken, rest): (Vec<_>, Vec<_>) = std::mem::take(targets)
            .into_iter()
            .partition(|t| stored_for.contains(&t.client_id));
        *targets = rest;
        let message = message.clone();
        if targets.is_empty() {
            inner.remote.remove(&id);
            inner.remote_order.retain(|r| *r != id);
        }
        Some((message, taken))
    }

    /// This node applied the `MessageStored` of `id` (proposed here) for the sessions
    /// `stored_for`: the deliveries kept for them, if its commit had been reported failed.
    fn applied(&self, id: MessageId, stored_for: Vec<ByteStr>) -> Option<Deferred> {
        let mut inner = self.0.lock();
        let inner = &mut *inner;
        let entry = inner.applied.entry(id).or_insert_with(|| {
            inner.applied_order.push_back(id);
            HashSet::default()
        });
        entry.extend(stored_for);
        let due = match inner.waiting.get_mut(&id) {
            Some(deferred) => {
                let due = Inner::take_stored(deferred, entry);
                if deferred.is_empty() {
                    inner.waiting.remove(&id);
                    inner.waiting_order.retain(|w| *w != id);
                }
                Some(due)
            }
            None => None,
        };
        while inner.applied_order.len() > CAPACITY {
            if let Some(old) = inner.applied_order.pop_front() {
                inner.applied.remove(&old);
            }
        }
        due
    }
}

impl Broker {
    /// This node applied `MessageStored` changes from batches it proposed itself: each stored
    /// id with the sessions it was stored for (see the module docs). Queues the deliveries
    /// kept for those sessions, if the commit had been reported failed. The caller is the
    /// applied-change feed; batches of other nodes go to [`Broker::apply_replicated`].
    ///
    /// `index` is the log index (of the shard) the store applied at: a session routed to
    /// elsewhere but loaded here before that index gets the message now (see
    /// [`Unsettled::stored_remotely`]), as a replicated copy would reach it.
    pub fn own_stored_applied(
        &self,
        stored: impl IntoIterator<Item = (MessageId, Vec<ByteStr>, u64)>,
    ) {
        for (id, stored_for, index) in stored {
            let remote = self.cluster.unsettled.take_remote(id, &stored_for);
            if let Some(deferred) = self.cluster.unsettled.applied(id, stored_for) {
                self.deliver_committed(deferred);
            }
            if let Some((message, targets)) = remote {
                self.queue_loaded_before(index, id, &message, &targets);
            }
        }
    }

    /// Queues message `id`, stored at `index` for `targets`, for those of them held here
    /// whose state was loaded from the log before `index` (or whose load is pending: the
    /// restore drops it if the load covers it). A session held here but never loaded from the
    /// log was held here when the message was routed, or is a new one: left alone.
    fn queue_loaded_before(
        &self,
        index: u64,
        id: MessageId,
        message: &Arc<Message>,
        targets: &[StoredTarget],
    ) {
        for target in targets {
            let Some(session) = self
                .sessions
                .lock()
                .get(&target.client_id)
                .filter(|s| s.is_durable())
                .cloned()
            else {
                continue;
            };
            let loading = self.loading.lock().contains_key(&target.client_id);
            if !loading && !session.loaded_from_at_least(1) {
                continue;
            }
            let delivery = super::mirror::stored_delivery(message, id, target);
            session.enqueue_replicated(delivery, index, loading, &self.queue_limits, &self.stats);
        }
    }
}
