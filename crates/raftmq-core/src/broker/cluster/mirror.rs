//! Mirroring of the replicated state: the persistent subscriptions of sessions held by other
//! nodes (messages published here are stored for them), changes other nodes committed
//! (the applied-change feed), and sessions taken from or given to other nodes.

use super::adoption::AdoptionSlot;
use super::live;
use crate::broker::routing::{Pass, merge_overlapping};
use crate::broker::{Broker, UNFENCED};
use crate::durability::{MessageId, SessionImage, StateChange, StoredTarget};
use crate::index::Match;
use crate::index::SubscriptionIndex;
use crate::message::{Delivery, Message};
use crate::session::{PendingWill, Session, SubEntry};
use crate::topic::{TopicFilter, TopicLimits, parse_subscription};
use ahash::HashMap;
use parking_lot::Mutex;
use raftmq_codec::{ByteStr, QoS, ReasonCode};
use smallvec::SmallVec;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

/// Plain (non-shared) subscriptions of persistent sessions owned by other nodes, by client id.
pub(in crate::broker) struct RemoteSubscriptions {
    index: SubscriptionIndex<ByteStr, SubEntry>,
    by_client: Mutex<HashMap<ByteStr, Vec<TopicFilter>>>,
}

impl RemoteSubscriptions {
    pub(in crate::broker) fn new(shards: usize) -> Self {
        RemoteSubscriptions {
            index: SubscriptionIndex::new(shards),
            by_client: Mutex::new(HashMap::default()),
        }
    }

    /// Records `client_id`'s subscription to `filter` (as subscribed). Shared subscriptions
    /// are not mirrored (see docs/cluster.md).
    pub(in crate::broker) fn add(
        &self,
        client_id: &ByteStr,
        filter: &str,
        entry: SubEntry,
        limits: &TopicLimits,
    ) {
        if let Some(filter) = plain_filter(filter, limits) {
            self.add_parsed(client_id, filter, entry);
        }
    }

    fn add_parsed(&self, client_id: &ByteStr, filter: TopicFilter, entry: SubEntry) {
        let previous = self
            .index
            .subscribe(&filter, None, client_id.clone(), entry);
        if previous.is_none() {
            self.by_client
                .lock()
                .entry(client_id.clone())
                .or_default()
                .push(filter);
        }
    }

    pub(in crate::broker) fn remove(
        &self,
        client_id: &ByteStr,
        filter: &str,
        limits: &TopicLimits,
    ) {
        if let Some(filter) = plain_filter(filter, limits) {
            self.remove_parsed(client_id, &filter);
        }
    }

    fn remove_parsed(&self, client_id: &ByteStr, filter: &TopicFilter) {
        self.index.unsubscribe(filter, None, client_id);
        let mut by_client = self.by_client.lock();
        if let Some(filters) = by_client.get_mut(client_id) {
            filters.retain(|f| f != filter);
            if filters.is_empty() {
                by_client.remove(client_id);
            }
        }
    }

    /// Makes the mirror hold exactly `subscriptions` (plain ones; each as subscribed). The new
    /// entries go in before the stale ones are removed: a publish routed meanwhile matches at
    /// least every subscription of the new set (a message stored for a subscription removed a
    /// moment later is harmless; one not stored is lost).
    fn replace(
        &self,
        subscriptions: Vec<(ByteStr, Arc<str>, SubEntry)>,
        limits: &TopicLimits,
        in_scope: impl Fn(&ByteStr) -> bool,
    ) {
        let mut keep: ahash::HashSet<(ByteStr, TopicFilter)> = ahash::HashSet::default();
        for (client_id, filter, entry) in subscriptions {
            if let Some(filter) = plain_filter(&filter, limits) {
                self.add_parsed(&client_id, filter.clone(), entry);
                keep.insert((client_id, filter));
            }
        }
        let stale: Vec<(ByteStr, TopicFilter)> = self
            .by_client
            .lock()
            .iter()
            .flat_map(|(client_id, filters)| filters.iter().map(move |f| (client_id, f)))
            .filter(|(client_id, f)| {
                in_scope(client_id) && !keep.contains(&((*client_id).clone(), (*f).clone()))
            })
            .map(|(client_id, f)| (client_id.clone(), f.clone()))
            .collect();
        for (client_id, filter) in stale {
            self.remove_parsed(&client_id, &filter);
        }
    }

    /// Forgets every subscription of `client_id`.
    pub(in crate::broker) fn clear(&self, client_id: &ByteStr) {
        let Some(filters) = self.by_client.lock().remove(client_id) else {
            return;
        };
        for filter in filters {
            self.index.unsubscribe(&filter, None, client_id);
        }
    }
}

/// The filter of a plain (not shared) subscription `filter` as subscribed; `None` for a shared
/// or malformed one (neither is mirrored).
fn plain_filter(filter: &str, limits: &TopicLimits) -> Option<TopicFilter> {
    parse_subscription(filter, limits)
        .ok()
        .filter(|p| p.share_group.is_none())
        .map(|p| p.filter)
}

impl Broker {
    /// Adds to `stored` a target for every persistent session owned by another node that
    /// subscribes to the topic of QoS 1/2 `message` (overlapping subscriptions merged: one
    /// target). Sessions in `local` (served by this pass from the local index) are skipped.
    /// Returns how many targets it added.
    pub(in crate::broker) fn store_for_remote(
        &self,
        message: &Arc<Message>,
        local: &[(Arc<Session>, SubEntry, bool)],
        stored: &mut Option<(MessageId, Vec<StoredTarget>)>,
        pass: &mut Pass,
    ) -> usize {
        if message.qos == QoS::AtMostOnce || self.cluster.remote.index.is_empty() {
            return 0;
        }
        let origin = message.origin.as_ref();
        let mut matches: SmallVec<[(ByteStr, SubEntry, bool); 4]> = SmallVec::new();
        self.cluster
            .remote
            .index
            .for_each_match(&message.topic, |m| {
                if let Match::Plain { key, value, .. } = m
                    && !(value.options.no_local && origin == Some(key))
                {
                    matches.push((key.clone(), *value, false));
                }
            });
        matches.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        let mut count = 0;
        merge_overlapping(
            message,
            &matches,
            |a, b| a == b,
            |client_id, merged| {
                // A session this pass already serves through the local index is not stored twice
                // (a session being loaded here is in neither index for a moment: its remote
                // entries stay until the load, see `finish_attach`).
                let served_here = local.iter().any(|(s, _, _)| s.client_id() == client_id);
                if merged.qos == QoS::AtMostOnce || served_here {
                    return;
                }
                let (id, targets) =
                    stored.get_or_insert_with(|| (self.durability.next_message_id(), Vec::new()));
                // A session being loaded here right now: the replicated log will not queue this
                // node's own batch for it, and its load may have been read before the commit;
                // queue it once committed (the load skips ids already queued).
                let delivery = || Delivery {
                    qos: merged.qos,
                    retain: merged.retain,
                    subscription_ids: merged.subscription_ids.clone(),
                    message: message.clone(),
                    durable: Some(*id),
                };
                let registry = self.sessions.lock();
                if let Some(session) = registry.get(client_id).filter(|s| s.is_durable()) {
                    pass.deferred.push((session.clone(), delivery()));
                } else if let Some(adopting) = self.cluster.adopting.lock().as_mut() {
                    // A session this node may be about to adopt (see `adoption`).
                    let slot = AdoptionSlot::new(delivery());
                    adopting
                        .entry(client_id.clone())
                        .or_default()
                        .push(slot.clone());
                    pass.adopting.push(slot);
                }
                drop(registry);
                targets.push(StoredTarget {
                    client_id: client_id.clone(),
                    qos: merged.qos,
                    retain: merged.retain,
                    subscription_ids: merged.subscription_ids,
                });
                count += 1;
            },
        );
        count
    }

    /// Adopts persistent sessions whose node was declared down (`StateChange::NodeDown`
    /// committed through this node): they come back here offline, as after a restart, and
    /// their wills and expiry run here. Sessions already in memory are left alone. Returns how
    /// many were adopted.
    pub fn adopt_sessions(&self, sessions: Vec<SessionImage>, now: Instant) -> usize {
        self.adopt_sessions_read_at(sessions.into_iter().map(|s| (s, 0)).collect(), now)
    }

    /// [`Broker::adopt_sessions`] of images each read at a known log index: the
    /// applied-change feed, which may lag behind the reads, does not queue again a message
    /// the image covers (in it, or acknowledged before the read).
    pub fn adopt_sessions_read_at(
        &self,
        sessions: Vec<(SessionImage, u64)>,
        now: Instant,
    ) -> usize {
        let mut adopted = 0;
        // One registry lock for the check and the insert: a client connecting meanwhile keeps
        // its live session (it waits, then resumes the adopted one).
        let mut registry = self.sessions.lock();
        // Messages routed to these sessions since the window opened (under the registry lock,
        // so no routing pass falls between the window and the restore).
        let mut kept = self.cluster.adopting.lock().take().unwrap_or_default();
        for (image, read_at) in sessions {
            if registry.contains_key(&image.client_id) {
                continue;
            }
            let client_id = image.client_id.clone();
            self.restore_offline(&mut registry, image, read_at, now);
            self.cluster.remote.clear(&client_id);
            if let (Some(slots), Some(session)) =
                (kept.remove(&client_id), registry.get(&client_id))
            {
                for slot in slots {
                    self.slot_claimed(&slot, session);
                }
            }
            adopted += 1;
        }
        adopted
    }

    /// Mirrors changes that another node committed (the applied-change feed of a cluster, in
    /// log order): retained messages set or cleared anywhere are served here; a session claimed
    /// by another node's connection is fenced here (its connection closes with Session Taken
    /// Over) and forgotten, as its new owner holds it; a session ended elsewhere is forgotten
    /// if no connection holds it here. Changes this node proposed itself must not be passed.
    ///
    /// Persistent subscriptions of sessions owned elsewhere are mirrored too, so QoS 1/2
    /// messages published here are stored for them; and a stored message committed through
    /// another node for a session owned here is queued for it. `index` is the log index of the
    /// batch.
    pub fn apply_replicated(&self, index: u64, changes: &[StateChange], now: Instant) {
        for change in changes {
            match change {
                StateChange::RetainedSet { message } => {
                    self.store_retained(message);
                }
                StateChange::RetainedCleared { topic } => {
                    self.remove_retained(topic);
                }
                StateChange::SessionOpened {
                    client_id,
                    clean_start,
                    ..
                } => {
                    if *clean_start {
                        self.cluster.remote.clear(client_id);
                    }
                    if let Some(will) = self.forget_session(client_id, true, !*clean_start) {
                        self.publish_will(will, now);
                    }
                }
                StateChange::SessionEnded { client_id } => {
                    self.cluster.remote.clear(client_id);
                    self.forget_session(client_id, false, false);
                }
                StateChange::Subscribed {
                    client_id,
                    filter,
                    entry,
                } if !self.owns(client_id) => {
                    self.cluster
                        .remote
                        .add(client_id, filter, *entry, &self.topic_limits);
                }
                StateChange::Unsubscribed { client_id, filter } => {
                    self.cluster
                        .remote
                        .remove(client_id, filter, &self.topic_limits);
                }
                StateChange::MessageStored {
                    id,
                    message,
                    targets,
                } => self.queue_replicated(index, *id, message, targets),
                StateChange::NodeDown { node, .. } if *node != self.node_id => {
                    // Its routes are stale until it comes back and announces them again.
                    self.forget_peer(*node);
                }
                StateChange::NodeDown { wills, .. } => {
                    // This node was declared down (it was cut off, its sessions were adopted
                    // elsewhere): it can no longer prove it owns any persistent session, and
                    // the declaring node published the wills of its sessionless connections
                    // it knew of (listed); the connections end here, and the wills it did not
                    // know of (registered here while cut off from it) are published here.
                    self.fence_durable_sessions(None);
                    self.hand_over_sessionless_wills(None);
                    let outcome = match wills {
                        Some(listed) => {
                            super::WillsOutcome::Declared(listed.iter().cloned().collect())
                        }
                        None => super::WillsOutcome::Unknown,
                    };
                    self.settle_handed_over_wills(&outcome, now);
                }
                _ => {}
            }
        }
    }

    /// Lets go of every persistent session held here, because this node can no longer prove
    /// it owns them (it was declared down, or it has been out of touch with a quorum long
    /// enough that the cluster may declare it down and adopt them). Connected clients are
    /// disconnected with `code` (MQTT 5; with a Server Reference for 0x9C Use another server;
    /// `None`: 0x8E Session taken over); no will is published here (the adopting node publishes it), and the sessions'
    /// subscriptions are kept as those of sessions held elsewhere. Returns how many.
    pub fn fence_durable_sessions(&self, code: Option<ReasonCode>) -> usize {
        self.fence_durable_sessions_where(code, |_| true)
    }

    /// [`Broker::fence_durable_sessions`] of the persistent sessions whose client id `which`
    /// selects (those of one shard, when this node was declared down in that shard alone).
    pub fn fence_durable_sessions_where(
        &self,
        code: Option<ReasonCode>,
        which: impl Fn(&ByteStr) -> bool,
    ) -> usize {
        let durable: Vec<Arc<Session>> = self
            .sessions
            .lock()
            .values()
            .filter(|s| s.is_durable() && which(s.client_id()))
            .cloned()
            .collect();
        let mut fenced = 0;
        for session in durable {
            {
                let mut st = session.lock_unfenced(UNFENCED);
                if st.online && st.kick.is_none() {
                    st.kick = code;
                }
                // Its will belongs to whichever node adopts the session.
                st.will = None;
            }
            drop(self.forget_session(session.client_id(), true, true));
            fenced += 1;
        }
        fenced
    }

    /// Whether the session of `client_id` lives on this node.
    pub(in crate::broker) fn owns(&self, client_id: &ByteStr) -> bool {
        self.sessions.lock().contains_key(client_id)
    }

    /// Queues a message stored through another node for the targets that are sessions of this
    /// node (unless it came with the session's load).
    pub(in crate::broker) fn queue_replicated(
        &self,
        index: u64,
        id: MessageId,
        message: &Arc<Message>,
        targets: &[StoredTarget],
    ) {
        let mut release = Vec::new();
        for target in targets {
            let session = self.sessions.lock().get(&target.client_id).cloned();
            let here = session.filter(|s| s.is_durable());
            // A QoS 1 copy forwarded live by the publishing node may have been delivered
            // already (or may still come, for a connected session). Batches replicated here
            // were all proposed by other nodes.
            let expect_forward =
                target.qos == QoS::AtLeastOnce && here.as_ref().is_some_and(|s| s.is_online());
            let (copy, held) = self
                .cluster
                .live
                .replicated(id, &target.client_id, expect_forward);
            release.extend(held);
            let Some(session) = here else { continue };
            if copy == live::Copy::Skip {
                continue;
            }
            let delivery = stored_delivery(message, id, target);
            // A session whose load is pending: the restore drops this one if the loaded image
            // covers its index (it is in the image, or was acknowledged already).
            let loading = self.loading.lock().contains_key(&target.client_id);
            session.enqueue_replicated(delivery, index, loading, &self.queue_limits, &self.stats);
        }
        drop(self.propose(release));
    }

    /// Replaces the mirrored subscriptions of sessions held elsewhere (after the durable state
    /// was replaced wholesale, e.g. a Raft snapshot installed on a lagging node) with
    /// `subscriptions`, those of every stored persistent session: the ones of sessions held in
    /// memory here are skipped (their own subscriptions route to them).
    ///
    /// Never emptier than either side while it runs: the new subscriptions are added before
    /// the stale ones are removed, so a publish routed meanwhile matches at least every
    /// subscription of the new state (a message stored for a subscription removed a moment
    /// later is harmless; one not stored is lost).
    pub fn replace_remote_subscriptions(&self, subscriptions: Vec<(ByteStr, Arc<str>, SubEntry)>) {
        self.replace_remote_subscriptions_where(subscriptions, |_| true);
    }

    /// [`Broker::replace_remote_subscriptions`] for the sessions `in_scope` selects (those of
    /// one shard, whose state alone was replaced): mirrored subscriptions of other sessions are
    /// kept.
    pub fn replace_remote_subscriptions_where(
        &self,
        subscriptions: Vec<(ByteStr, Arc<str>, SubEntry)>,
        in_scope: impl Fn(&ByteStr) -> bool,
    ) {
        let theirs = subscriptions
            .into_iter()
            .filter(|(client_id, _, _)| !self.owns(client_id))
            .collect();
        self.cluster
            .remote
            .replace(theirs, &self.topic_limits, in_scope);
    }

    /// Drops the in-memory session of `client_id` without recording anything (its durable
    /// state now belongs to another node). With `fence`, a connection attached to it is told
    /// it was taken over; without, an attached session is kept.
    /// With `keep_subscriptions`, its persistent subscriptions are mirrored as remote ones.
    ///
    /// Returns the will of a fenced connection that is due now, as on a local takeover: when
    /// it has no delay (a new connection within the delay cancels it, [MQTT-3.1.2-8]).
    pub(in crate::broker) fn forget_session(
        &self,
        client_id: &ByteStr,
        fence: bool,
        keep_subscriptions: bool,
    ) -> Option<PendingWill> {
        let mut registry = self.sessions.lock();
        let session = registry.get(client_id).cloned()?;
        let mut st = session.lock_unfenced(UNFENCED);
        if st.online {
            if !fence {
                return None;
            }
            self.stats.takeovers.fetch_add(1, Relaxed);
        }
        // The session lives on elsewhere: its persistent subscriptions now belong to a remote
        // owner (a clean start there ends them, and its SessionOpened clears them again).
        if keep_subscriptions && session.is_durable() {
            for (key, rec) in &st.subscriptions {
                self.cluster
                    .remote
                    .add(client_id, key, rec.entry, &self.topic_limits);
            }
        }
        // A will still pending here (connected, or waiting for its delay) is this node's to
        // publish if due now; otherwise the new connection cancels it.
        let will = st.will.take().filter(|w| fence && w.delay_secs == 0);
        session.set_durable(false);
        self.unload_locked(&mut registry, &session, st);
        will
    }
}

/// The delivery of stored message `id` to one of its targets.
pub(in crate::broker) fn stored_delivery(
    message: &Arc<Message>,
    id: MessageId,
    target: &StoredTarget,
) -> Delivery {
    Delivery {
        qos: target.qos,
        retain: target.retain,
        subscription_ids: target.subscription_ids.iter().copied().collect(),
        message: message.clone(),
        durable: Some(id),
    }
}
