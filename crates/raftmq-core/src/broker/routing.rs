//! Routing a publish to the sessions that want it: the delivery pass over the subscription
//! index, overlapping subscriptions, shared subscriptions, and queueing after a commit.

use crate::broker::cluster::AdoptionSlot;
use crate::broker::cluster::forwarding::is_share_key;
use crate::broker::{Broker, Routed, UNFENCED};
use crate::config::SharedStrategy;
use crate::durability::{Commit, DurabilityError, Fence, MessageId, StateChange, StoredTarget};
use crate::index::Match;
use crate::message::{Delivery, Message};
use crate::session::{Enqueued, Session, SubEntry};
use raftmq_codec::QoS;
use smallvec::SmallVec;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

/// Which subscribers a routing pass serves.
#[derive(Clone, Copy)]
pub(in crate::broker) enum Scope<'a> {
    /// A publish received here: every local subscriber, peers with matching routes, and
    /// persistent sessions owned by other nodes (stored for them). `hold`: every local
    /// delivery waits for the commit (a client's QoS 2 PUBLISH).
    ///
    /// `after`: the commit of the publisher's previous stored message; a peer this message is
    /// forwarded to delivers it only once it has applied that commit (see
    /// [`Forwarder::forward`]), so it never overtakes a message that went through the log only.
    ///
    /// `reroute`: the message is a resent QoS 2 PUBLISH whose first store may be incomplete
    /// (see [`Publisher::reroute`]): stored again under this id, not forwarded live.
    Origin {
        hold: bool,
        after: Option<&'a Commit>,
        reroute: Option<MessageId>,
    },
    /// A message another node forwarded: local ordinary subscribers if `plain`, one local
    /// member of each listed shared subscription. Persistent sessions that the origin stored
    /// it for (under `stored`) get it live if connected and QoS 1 (once: the replicated copy
    /// is skipped), else through the replicated log.
    Forwarded {
        plain: bool,
        shared: &'a [Arc<str>],
        stored: Option<MessageId>,
    },
}

/// The client that published a message being routed.
#[derive(Clone, Copy)]
pub struct Publisher<'a> {
    pub session: &'a Session,
    /// Its connection's claim on the session.
    pub epoch: u64,
    /// For a new QoS 2 PUBLISH, its packet id: recorded in the session with the message when
    /// the session is persistent, both fenced by the claim.
    pub qos2_packet_id: Option<u16>,
    /// For a resent QoS 2 PUBLISH whose packet id was loaded with a message id to store it
    /// under again ([`crate::durability::SessionImage::qos2_reroute`]): that id. The store
    /// skips the shards that have it already; the deliveries to sessions held here follow
    /// the store (only those it actually stored).
    pub reroute: Option<MessageId>,
}

/// The local subscriptions matching a message: (session, subscription, through a shared
/// subscription).
type Targets = SmallVec<[(Arc<Session>, SubEntry, bool); 8]>;

/// Shared subscriptions (group, filter) with a member here: served here, not forwarded.
type LocalGroups = SmallVec<[(String, String); 2]>;

/// What one routing pass produced, for its caller to commit and queue.
#[derive(Default)]
pub(in crate::broker) struct Pass {
    /// Sessions the message was offered to.
    pub offered: usize,
    /// What to record: the message stored once for every persistent session it goes to.
    pub changes: Vec<StateChange>,
    /// Deliveries to queue only once `changes` commit (to offline persistent sessions, and
    /// every delivery of a client's QoS 2 PUBLISH).
    pub deferred: Vec<(Arc<Session>, Delivery)>,
    /// Acknowledgements of the peers the message was forwarded to (QoS 1/2).
    pub acks: Vec<Commit>,
    /// A connected session (not the publisher's own) whose queue is past the pause mark,
    /// with its congestion episode.
    pub congested: Option<(Arc<Session>, u64)>,
    /// Deliveries kept for sessions about to be adopted (see `cluster::adoption`): told the
    /// commit once `changes` are proposed.
    pub adopting: Vec<Arc<AdoptionSlot>>,
}

/// One subscriber's subscriptions that match a message, merged into one delivery: overlapping
/// subscriptions give one message with the highest QoS granted (never above the message's),
/// every subscription identifier, and RETAIN kept if any asks for it (MQTT 5 §3.3.4).
pub(in crate::broker) struct Merged {
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: SmallVec<[u32; 2]>,
    /// One of them is a shared subscription.
    pub via_shared: bool,
}

/// Calls `each` once per subscriber in `matches` (subscriber, subscription, through a shared
/// subscription), with its subscriptions merged ([`Merged`]). One subscriber's entries must
/// be adjacent (`same` compares subscribers).
pub(in crate::broker) fn merge_overlapping<K>(
    message: &Message,
    matches: &[(K, SubEntry, bool)],
    same: impl Fn(&K, &K) -> bool,
    mut each: impl FnMut(&K, Merged),
) {
    let mut rest = matches;
    while let Some(((key, first, first_shared), tail)) = rest.split_first() {
        let run = 1 + tail.iter().take_while(|(k, _, _)| same(k, key)).count();
        let mut merged = Merged {
            qos: first.options.qos,
            retain: first.options.retain_as_published,
            subscription_ids: first.subscription_id.into_iter().collect(),
            via_shared: *first_shared,
        };
        for (_, e, shared) in &rest[1..run] {
            merged.qos = merged.qos.max(e.options.qos);
            merged.retain |= e.options.retain_as_published;
            merged.subscription_ids.extend(e.subscription_id);
            merged.via_shared |= *shared;
        }
        merged.qos = merged.qos.min(message.qos);
        merged.retain &= message.retain;
        each(key, merged);
        rest = &rest[run..];
    }
}

impl Broker {
    /// Routes a message to every matching session and applies its RETAIN flag, without
    /// waiting for durability (wills, `$SYS`, administrative publishes). Returns the number of
    /// sessions it was offered to.
    pub fn publish(&self, message: Arc<Message>, now: Instant) -> usize {
        self.route(message, None, now).offered
    }

    /// Queues `deferred` deliveries now.
    pub(in crate::broker) fn deliver_committed(&self, deferred: Vec<(Arc<Session>, Delivery)>) {
        for (session, delivery) in deferred {
            session.enqueue(delivery, &self.queue_limits, &self.stats);
        }
    }

    /// Queues `deferred` deliveries once `commit` succeeds (in commit order: the durability
    /// layer resolves commits in the order they were proposed). If it fails they are dropped,
    /// or, when the commit stored message `stored`, kept until this node applies that message
    /// after all (a commit reported failed may have happened; see `cluster::unsettled`).
    ///
    /// `store` is the commit that stored the message (`commit` may also wait for others): a
    /// stored delivery to a session loaded from the log since, at or past the store's position
    /// in the session's shard, is dropped: the loaded image had the message already (its
    /// parts in other shards may commit well after, and with them `commit`).
    pub(in crate::broker) fn deliver_after(
        &self,
        commit: &Commit,
        deferred: Vec<(Arc<Session>, Delivery)>,
        stored: Option<MessageId>,
        store: &Commit,
    ) {
        if deferred.is_empty() {
            return;
        }
        let (limits, stats) = (self.queue_limits, self.stats.clone());
        let unsettled = self.cluster.unsettled.clone();
        // One log: the store comes before any later claim's load, never after it.
        let sharded = self.durability.shards() > 1;
        let (durability, store) = (self.durability.clone(), store.clone());
        let complete = move |result: Result<(), crate::durability::DurabilityError>| {
            let due = match (result, stored) {
                (Ok(()), _) => Some(deferred),
                (Err(_), Some(id)) => unsettled.failed(id, deferred),
                (Err(_), None) => None,
            };
            let positions = if sharded {
                store.log_positions().unwrap_or_default()
            } else {
                Default::default()
            };
            for (session, delivery) in due.into_iter().flatten() {
                if !positions.is_empty() && delivery.durable.is_some() {
                    let shard = durability.shard_of(session.client_id().as_bytes());
                    let at = positions.iter().find(|(s, _)| *s == shard).map(|(_, i)| *i);
                    if at.is_some_and(|at| session.loaded_from_at_least(at)) {
                        continue;
                    }
                }
                session.enqueue(delivery, &limits, &stats);
            }
        };
        match commit.result() {
            Some(result) => complete(result),
            None => commit.on_complete(complete),
        }
    }

    /// Routes a message published by a client (`publisher`; `None` for the broker's own
    /// publishes). QoS 1/2 deliveries to persistent sessions are stored once (one
    /// [`StateChange::MessageStored`] for all of them) and a retained change is recorded; a new
    /// QoS 2 PUBLISH's packet id is recorded when the publisher's session is persistent, and
    /// then all of it is fenced by that connection's claim: a copy that commits after the
    /// client reconnected (and resent the message) cannot store it a second time. The returned
    /// commit covers all of it.
    pub fn route(
        &self,
        message: Arc<Message>,
        publisher: Option<Publisher<'_>>,
        now: Instant,
    ) -> Routed {
        let incoming_qos2 =
            publisher.and_then(|p| p.qos2_packet_id.map(|pid| (p.session, p.epoch, pid)));
        let reroute = publisher
            .and_then(|p| p.reroute)
            .filter(|_| incoming_qos2.is_some());
        // The publisher's previous message stored through the log: peers deliver this one
        // only after it (MQTT 4.6 order, whichever path each took).
        // Only a cluster forwards: a single node keeps no chain (no lock per publish for it).
        let chained = publisher.filter(|_| self.clustered());
        // A publisher with no stored message through this node yet (a new connection, or a
        // session loaded or moved here) may have had its previous one stored through another
        // node, at a log index unknown here: peers then deliver this one only after its own
        // commit (by when they have the previous one from the log). One commit's latency, on
        // the first stored message of each connection.
        let mut first_link = None;
        let after = chained.map(|p| {
            let last = p.session.lock_unfenced(UNFENCED).last_stored.clone();
            last.unwrap_or_else(|| {
                let (own, handle) = Commit::pending();
                first_link = Some(handle);
                own
            })
        });
        let mut changes = Vec::new();
        let mut fence = None;
        // Whether the publisher's session is persistent is read with its connection's claim
        // (one lock): a session fenced just now (this node lost its quorum) is no longer
        // marked persistent here, and a QoS 2 PUBLISH routed in that window would otherwise be
        // stored unfenced and without its packet id, and stored again when the client resends
        // it through another node. Such a connection has lost its session: refused.
        let durable_qos2 = match incoming_qos2 {
            Some((publisher, epoch, _)) => match publisher.lock_attached(epoch) {
                Ok(_claim) => publisher.is_durable(),
                Err(_) => {
                    return Routed {
                        offered: 0,
                        commit: Commit::failed(DurabilityError::Unavailable),
                        store: Commit::failed(DurabilityError::Unavailable),
                        congested: None,
                    };
                }
            },
            None => false,
        };
        if let Some((publisher, epoch, packet_id)) = incoming_qos2.filter(|_| durable_qos2) {
            // The message id is filled in once the routing pass below has chosen it.
            changes.push(StateChange::IncomingQos2Received {
                client_id: publisher.client_id().clone(),
                packet_id,
                message_id: None,
            });
            fence = Some(Fence::Attached {
                client_id: publisher.client_id().clone(),
                epoch,
            });
        }
        // `$SYS/...` statistics are regenerated every interval: never worth a durable write.
        let durable_retain = !message.topic.starts_with("$SYS/");
        if message.retain
            && self.config.retain_available
            && self.store_retained(&message)
            && durable_retain
        {
            changes.push(if message.payload.is_empty() {
                StateChange::RetainedCleared {
                    topic: message.topic.clone(),
                }
            } else {
                StateChange::RetainedSet {
                    message: message.clone(),
                }
            });
        }
        // A client's QoS 2 PUBLISH reaches local sessions only once it is recorded: if the
        // commit fails, the client sends it again and it is routed again, which must not
        // deliver it twice.
        let hold = incoming_qos2.is_some();
        let Pass {
            offered,
            changes: stored,
            mut deferred,
            mut acks,
            congested,
            adopting,
        } = self.deliver(
            &message,
            Scope::Origin {
                hold,
                after: after.as_ref(),
                reroute,
            },
        );
        let stored_id = stored.iter().find_map(|c| match c {
            StateChange::MessageStored { id, .. } => Some(*id),
            _ => None,
        });
        for change in &mut changes {
            if let StateChange::IncomingQos2Received { message_id, .. } = change {
                *message_id = stored_id;
            }
        }
        // A persistent publisher's QoS 2 message may be stored in the shards of its targets
        // only after its receipt committed: a target held elsewhere now may be loaded here
        // before that (see `Unsettled::stored_remotely`).
        if durable_qos2
            && self.durability.shards() > 1
            && self.clustered()
            && let Some(id) = stored_id
        {
            let remote: Vec<StoredTarget> = stored
                .iter()
                .filter_map(|c| match c {
                    StateChange::MessageStored { targets, .. } => Some(targets),
                    _ => None,
                })
                .flatten()
                .filter(|t| {
                    !deferred
                        .iter()
                        .any(|(session, _)| session.client_id() == &t.client_id)
                })
                .cloned()
                .collect();
            if !remote.is_empty() {
                self.cluster
                    .unsettled
                    .stored_remotely(id, message.clone(), remote);
            }
        }
        // A resent QoS 2 PUBLISH stored again: the sessions here get it once a store applied
        // here names them, which happens only in the shards that did not have it (kept before
        // proposing, so that apply cannot come first).
        if let Some(id) = reroute.and(stored_id) {
            self.cluster
                .unsettled
                .rerouted(id, std::mem::take(&mut deferred));
        }
        changes.extend(stored);
        let _ = now;
        // A client's messages are stored in the order it sent them: once one failed (it will
        // resend it), the next ones of the connection are refused too (see
        // `Durability::propose_chained`).
        let store = match publisher {
            Some(p) => {
                self.propose_chained((p.session.client_id().clone(), p.epoch), fence, changes)
            }
            None => match fence {
                Some(fence) => self.propose_fenced(fence, changes),
                None => self.propose(changes),
            },
        };
        for slot in adopting {
            self.slot_proposed(&slot, &store);
        }
        if let Some(handle) = first_link {
            if stored_id.is_some() {
                let own = store.clone();
                store.on_complete(move |result| {
                    handle.complete_at(result, own.log_positions().unwrap_or_default())
                });
            } else {
                // Nothing stored: nothing for peers to wait for.
                handle.complete(Ok(()));
            }
        }
        if stored_id.is_some()
            && let Some(p) = chained
        {
            p.session.lock_unfenced(UNFENCED).last_stored = Some(store.clone());
        }
        match (incoming_qos2, reroute.and(stored_id)) {
            // A resent QoS 2 PUBLISH stored again: its deliveries were kept above.
            (Some(_), Some(_)) => {}
            // A client's QoS 2 messages reach local sessions in the order it sent them: each
            // waits for its own commit and for the previous one's to settle (not to succeed:
            // a refused one must not hold this one's back for good).
            (Some((publisher, _, _)), None) => {
                let mut st = publisher.lock_unfenced(UNFENCED);
                let after = Commit::all(vec![store.clone(), st.last_qos2.settled()]);
                st.last_qos2 = after.clone();
                drop(st);
                self.deliver_after(&after, deferred, stored_id, &store);
            }
            (None, _) => self.deliver_after(&store, deferred, stored_id, &store),
        }
        acks.push(store.clone());
        Routed {
            offered,
            commit: Commit::all(acks),
            store,
            congested,
        }
    }

    /// One routing pass of `message` over the sessions `scope` serves: queues what can be
    /// queued now and returns the rest for the caller to commit and queue.
    pub(in crate::broker) fn deliver(&self, message: &Arc<Message>, scope: Scope<'_>) -> Pass {
        let mut pass = Pass::default();
        let (mut targets, local_groups) = self.match_local(message, scope);
        // The message stored once, under one id, for every persistent session it goes to.
        let mut stored: Option<(MessageId, Vec<StoredTarget>)> = None;
        if let Scope::Origin { after, reroute, .. } = scope {
            stored = reroute.map(|id| (id, Vec::new()));
            pass.offered += self.store_for_remote(message, &targets, &mut stored, &mut pass);
            // A resent message is stored again, never forwarded live a second time.
            if let Some(groups) = local_groups.filter(|_| reroute.is_none()) {
                let stored_id = stored.as_ref().map(|(id, _)| *id);
                self.forward_to_peers(message, &groups, stored_id, after, &mut pass.acks);
            }
        }
        if targets.is_empty() && pass.offered == 0 {
            self.stats.messages_unrouted.fetch_add(1, Relaxed);
        }
        if targets.len() > 1 {
            targets.sort_unstable_by_key(|(s, _, _)| Arc::as_ptr(s) as usize);
        }
        merge_overlapping(message, &targets, Arc::ptr_eq, |session, merged| {
            self.offer(message, session, merged, scope, &mut stored, &mut pass);
        });
        if let Some((id, targets)) = stored.filter(|(_, t)| !t.is_empty()) {
            pass.changes.push(StateChange::MessageStored {
                id,
                message: message.clone(),
                targets,
            });
        }
        pass
    }

    /// The local subscriptions `scope` serves that match `message`: (session, subscription,
    /// through a shared subscription), and, when the message is to be forwarded to peers, the
    /// shared subscriptions served here (`(group, filter)`: not forwarded).
    fn match_local(&self, message: &Message, scope: Scope<'_>) -> (Targets, Option<LocalGroups>) {
        let mut targets = Targets::new();
        let origin = message.origin.as_ref();
        let forwarding = matches!(scope, Scope::Origin { .. })
            && !self.cluster.routes.peer_index.is_empty()
            && !message.topic.starts_with("$SYS/");
        let mut local_groups = LocalGroups::new();
        self.index.for_each_match(&message.topic, |m| match m {
            Match::Plain { key, value, .. } => {
                let wanted = match scope {
                    Scope::Origin { .. } => true,
                    Scope::Forwarded { plain, .. } => plain,
                };
                if wanted && !(value.options.no_local && origin == Some(key.client_id())) {
                    targets.push((key.clone(), *value, false));
                }
            }
            Match::Shared {
                group,
                filter,
                members,
                cursor,
            } => {
                let wanted = match scope {
                    Scope::Origin { .. } => true,
                    Scope::Forwarded { shared, .. } => {
                        shared.iter().any(|k| is_share_key(k, group, filter))
                    }
                };
                if !wanted {
                    return;
                }
                if forwarding {
                    local_groups.push((group.to_owned(), filter.to_owned()));
                }
                if let Some((key, value)) = self.pick_shared(members, cursor) {
                    targets.push((key.clone(), *value, true));
                }
            }
        });
        (targets, forwarding.then_some(local_groups))
    }

    /// Offers `message` to one local session (its matching subscriptions `merged`): queued
    /// now, or held back for the commit in `pass`, and recorded in `stored` when it is a QoS
    /// 1/2 delivery to a persistent session.
    fn offer(
        &self,
        message: &Arc<Message>,
        session: &Arc<Session>,
        merged: Merged,
        scope: Scope<'_>,
        stored: &mut Option<(MessageId, Vec<StoredTarget>)>,
        pass: &mut Pass,
    ) {
        let Merged {
            qos,
            retain,
            subscription_ids,
            via_shared,
        } = merged;
        // Forwarded QoS 1/2 for a persistent session here: the origin stored it for that
        // session (its ordinary subscriptions are mirrored there), and the replicated log
        // queues it here. A connected session gets QoS 1 now, without waiting for the
        // commit, and the replicated copy is then skipped (or this one, if the log was
        // faster); QoS 2 waits for the log (see `cluster::live`).
        if let Scope::Forwarded { stored, .. } = scope
            && qos != QoS::AtMostOnce
            && session.is_durable()
            && !via_shared
        {
            if let Some(id) = stored
                && qos == QoS::AtLeastOnce
                && session.is_online()
            {
                let delivery = Delivery {
                    qos,
                    retain,
                    subscription_ids,
                    message: message.clone(),
                    durable: Some(id),
                };
                pass.offered += usize::from(self.deliver_stored_live(session, delivery, id));
            }
            return;
        }
        // QoS 1/2 for a persistent session: stored once, referenced by each such session.
        let durable = (qos != QoS::AtMostOnce && session.is_durable()).then(|| {
            stored
                .get_or_insert_with(|| (self.durability.next_message_id(), Vec::new()))
                .0
        });
        let target = durable.map(|_| StoredTarget {
            client_id: session.client_id().clone(),
            qos,
            retain,
            subscription_ids: subscription_ids.clone(),
        });
        let mut record = |target: Option<StoredTarget>| {
            if let (Some(target), Some((_, targets))) = (target, stored.as_mut()) {
                targets.push(target);
            }
        };
        let delivery = Delivery {
            qos,
            retain,
            subscription_ids,
            message: message.clone(),
            durable,
        };
        let hold = matches!(scope, Scope::Origin { hold: true, .. });
        // A client waiting for its own queue would never read the acknowledgements that
        // drain it. A shared subscription's member only pauses the publisher if it was
        // crowded before (`pick_shared` prefers members that are not: all were).
        let may_pause = pass.congested.is_none()
            && message.origin.as_ref() != Some(session.client_id())
            && (!via_shared || session.is_crowded());
        if hold || (durable.is_some() && !session.is_online()) {
            // Offline and persistent: nobody can receive it before the commit anyway; or a
            // client's QoS 2 PUBLISH: delivered once recorded (and its publisher waits for
            // a congested queue as for the others).
            if hold
                && may_pause
                && let Some(episode) = session.congestion(&self.queue_limits)
            {
                pass.congested = Some((session.clone(), episode));
            }
            pass.offered += 1;
            record(target);
            pass.deferred.push((session.clone(), delivery));
        } else {
            let result = session.enqueue(delivery, &self.queue_limits, &self.stats);
            if result.is_queued() {
                pass.offered += 1;
                record(target);
            }
            if let Enqueued::Congested { episode, .. } = result
                && may_pause
            {
                pass.congested = Some((session.clone(), episode));
            }
        }
    }

    pub(in crate::broker) fn pick_shared<'a>(
        &self,
        members: &'a [(Arc<Session>, SubEntry)],
        cursor: &std::sync::atomic::AtomicUsize,
    ) -> Option<&'a (Arc<Session>, SubEntry)> {
        let n = members.len();
        if n == 0 {
            return None;
        }
        let start = match self.config.shared_strategy {
            SharedStrategy::RoundRobin => cursor.fetch_add(1, Relaxed) % n,
            SharedStrategy::Random => (self.next_random() % n as u64) as usize,
        };
        // Prefer a member that is connected and keeps up (a slow member's queue must not hold
        // up the publisher while others have room), then any connected one; fall back to
        // queueing for an offline one.
        let turn = |k| &members[(start + k) % n];
        (0..n)
            .map(turn)
            .find(|(s, _)| s.is_online() && !s.is_crowded())
            .or_else(|| (0..n).map(turn).find(|(s, _)| s.is_online()))
            .or(members.get(start))
    }
}
