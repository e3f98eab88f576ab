//! Sessions brought back from durable storage: at start-up, and when a client resumes a
//! session that is stored but not in memory here.

use crate::broker::{Broker, UNFENCED};
use crate::durability::{Commit, DurabilityError, MessageId, Recovered, SessionImage, SessionLoad};
use crate::message::Delivery;
use crate::session::{Outgoing, OutgoingEntry, Session, SessionState};
use crate::topic::parse_subscription;
use ahash::HashMap;
use raftmq_codec::{ByteStr, QoS};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

impl Broker {
    /// Rebuilds the broker from its durable storage at start-up: persistent sessions come back
    /// offline with their subscriptions, queued and in-flight messages (in-flight ones keep
    /// their packet ids, so they are resent as the protocol requires) and incoming QoS 2 state;
    /// retained messages come back too. Will and expiry timers restart from `now`. Returns the
    /// number of sessions recovered, or the error that kept the store from being read (then
    /// nothing was restored: the caller must not serve clients over stored sessions it could
    /// not see).
    pub fn recover(&self, now: Instant) -> Result<usize, DurabilityError> {
        let Recovered {
            sessions,
            retained,
            remote_subscriptions,
        } = self.durability.recover()?;
        for message in retained {
            self.store_retained(&message);
        }
        for (client_id, filter, entry) in remote_subscriptions {
            self.cluster
                .remote
                .add(&client_id, &filter, entry, &self.topic_limits);
        }
        let count = sessions.len();
        let mut registry = self.sessions.lock();
        for image in sessions {
            self.restore_offline(&mut registry, image, 0, now);
        }
        Ok(count)
    }

    /// Puts a stored session back in memory, offline, into `registry` (locked by the caller
    /// from its check that the client id has no session here, so no connection can attach in
    /// between), with its will and expiry timers starting at `now`.
    ///
    /// `read_at`: the log index the image was read at (0: unknown); the applied-change feed
    /// does not queue again what the image covers.
    pub(in crate::broker) fn restore_offline(
        &self,
        registry: &mut HashMap<ByteStr, Arc<Session>>,
        image: SessionImage,
        read_at: u64,
        now: Instant,
    ) {
        let session = Arc::new(Session::new(image.client_id.clone(), image.expiry_secs));
        session.set_durable(true);
        let mut st = session.lock_unfenced(UNFENCED);
        st.replicated_upto = read_at;
        let epoch = self.next_epoch();
        st.epoch = epoch;
        st.disconnected_at = Some(now);
        let will = image.will.clone();
        let expiry_secs = image.expiry_secs;
        self.restore_locked(&session, &mut st, image);
        let will_delay = will.as_ref().map(|w| w.delay_secs);
        st.will = will;
        drop(st);
        let client_id = session.client_id().clone();
        if registry.insert(client_id.clone(), session).is_none() {
            self.stats.sessions_total.fetch_add(1, Relaxed);
        }
        self.start_disconnected_timers(&client_id, epoch, will_delay, expiry_secs, now);
    }

    /// Fills `session` (locked as `st`) with the subscriptions, queued and in-flight messages
    /// and incoming QoS 2 state of `image`. In-flight messages keep their packet ids.
    pub(in crate::broker) fn restore_locked(
        &self,
        session: &Arc<Session>,
        st: &mut SessionState,
        image: SessionImage,
    ) {
        for (key, entry) in image.subscriptions {
            let Ok(parsed) = parse_subscription(&key, &self.topic_limits) else {
                continue;
            };
            self.add_subscription(session, st, key, parsed, entry);
        }
        // Stored messages the applied-change feed (or live forwarding) already queued for this
        // session, committed between its attach here and the load, are not queued twice; and
        // the stored messages come first, in the order they were stored, whichever way they
        // arrived: a message committed just before the attach (only in the image) goes before
        // one committed just after it (queued by the feed too), as MQTT's ordering requires.
        let in_flight: std::collections::HashSet<MessageId> = st
            .outgoing
            .values()
            .filter_map(|o| match &o.state {
                Outgoing::Publish(d) => d.durable,
                Outgoing::Released(id) => *id,
            })
            .collect();
        let stored_ids: std::collections::HashSet<MessageId> =
            image.messages.iter().map(|m| m.id).collect();
        // Queued by the feed while the load was pending, from a batch the load's read covers:
        // in the image (above), or acknowledged before the read — not to be delivered again.
        let covered: std::collections::HashSet<MessageId> =
            std::mem::take(&mut st.fed_while_loading)
                .into_iter()
                .filter(|(_, index)| *index <= st.replicated_upto)
                .map(|(id, _)| id)
                .collect();
        let mut fed: HashMap<MessageId, Delivery> = HashMap::default();
        let mut later = std::collections::VecDeque::new();
        for d in std::mem::take(&mut st.queue) {
            match d.durable {
                Some(id) if stored_ids.contains(&id) => {
                    fed.insert(id, d);
                }
                Some(id) if covered.contains(&id) => {
                    self.stats.messages_queued.fetch_sub(1, Relaxed);
                }
                _ => later.push_back(d),
            }
        }
        // QoS 1 messages of the image queued so far by this loop (not sent yet). A later QoS 1
        // message the image shows as sent (its record landed, theirs did not: a record held
        // back for a live delivery, or lost in a failure) must not overtake them (MQTT 4.6):
        // they are sent first, resent with the in-flight ones in stored order under packet
        // ids of their own (a duplicate QoS 1 allows), and the sent one keeps its id. A QoS 2
        // one keeps its place too (exactly once first: ids for QoS 2 are only used once
        // recorded, which the chained records of a connection make this case need a lost one).
        let image_pids: std::collections::HashSet<u16> = image
            .messages
            .iter()
            .filter_map(|m| m.packet_id)
            .filter(|id| *id != 0)
            .collect();
        let mut unsent_qos1 = 0usize;
        for stored in image.messages {
            if in_flight.contains(&stored.id) {
                continue;
            }
            if let Some(d) = fed.remove(&stored.id) {
                if stored.packet_id.is_none_or(|id| id == 0) {
                    // Queued already (and counted): back in its stored place.
                    if d.qos == QoS::AtLeastOnce {
                        unsent_qos1 += 1;
                    }
                    st.queue.push_back(d);
                    continue;
                }
                // Sent under a packet id elsewhere meanwhile: resent under that id (below), not
                // as a new message.
                self.stats.messages_queued.fetch_sub(1, Relaxed);
            }
            let delivery = Delivery {
                qos: stored.target.qos,
                retain: stored.target.retain,
                subscription_ids: stored.target.subscription_ids,
                message: stored.message,
                durable: Some(stored.id),
            };
            match stored
                .packet_id
                .filter(|id| *id != 0 && !st.outgoing.contains_key(id))
            {
                Some(id) => {
                    if stored.target.qos == QoS::AtLeastOnce && unsent_qos1 > 0 {
                        self.send_queued_qos1_first(st, &image_pids);
                        unsent_qos1 = 0;
                    }
                    let state = if stored.released {
                        Outgoing::Released(Some(stored.id))
                    } else {
                        self.stats.messages_inflight.fetch_add(1, Relaxed);
                        Outgoing::Publish(delivery)
                    };
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.outgoing.insert(id, OutgoingEntry { seq, state });
                    st.next_packet_id = id.checked_add(1).unwrap_or(1);
                }
                None => {
                    self.stats.messages_queued.fetch_add(1, Relaxed);
                    if delivery.qos == QoS::AtLeastOnce {
                        unsent_qos1 += 1;
                    }
                    st.queue.push_back(delivery);
                }
            }
        }
        // What was queued here and is not in the image (committed after the load's read, or
        // not stored at all) follows.
        st.queue.extend(later);
        st.incoming_qos2.extend(
            image
                .incoming_qos2
                .into_iter()
                .map(|id| (id, Commit::ready())),
        );
        st.qos2_reroute.extend(image.qos2_reroute);
    }

    /// Moves the QoS 1 messages queued in `st` (those of the image being restored) into the
    /// in-flight set, in queue order, each under a free packet id that no message of the image
    /// holds (`taken`): they are resent, with DUP, before the in-flight messages restored after
    /// them. One that finds no free id stays queued.
    fn send_queued_qos1_first(
        &self,
        st: &mut SessionState,
        taken: &std::collections::HashSet<u16>,
    ) {
        let (first, rest): (std::collections::VecDeque<Delivery>, _) =
            std::mem::take(&mut st.queue)
                .into_iter()
                .partition(|d| d.qos == QoS::AtLeastOnce);
        st.queue = rest;
        for d in first {
            let free = (0..u16::MAX)
                .map_while(|_| st.allocate_packet_id())
                .map(|p| p.get())
                .find(|p| !taken.contains(p));
            let Some(id) = free else {
                st.queue.push_back(d);
                continue;
            };
            self.stats.messages_queued.fetch_sub(1, Relaxed);
            self.stats.messages_inflight.fetch_add(1, Relaxed);
            let seq = st.next_seq;
            st.next_seq += 1;
            st.outgoing.insert(
                id,
                OutgoingEntry {
                    seq,
                    state: Outgoing::Publish(d),
                },
            );
        }
    }

    /// Completes an attachment whose session was not in memory ([`Attached::load_after_commit`]):
    /// once the claim committed, loads the session from the replicated state, if it exists
    /// there. Returns whether a session was resumed (CONNACK's session present). Does nothing
    /// if the connection was fenced in the meantime.
    pub fn finish_attach(&self, session: &Arc<Session>, epoch: u64) -> bool {
        let Some(load) = self.take_load(session.client_id(), epoch) else {
            return false;
        };
        let Some((image, upto)) = load.take() else {
            return false;
        };
        let Ok(mut st) = session.lock_attached(epoch) else {
            return false;
        };
        st.replicated_upto = upto;
        // QoS 1 messages of the image may also be forwarded live by their publishers' nodes,
        // and such a copy may arrive after this restore (it waits for this node's log to catch
        // up): marked, so it is skipped rather than queued a second time.
        let live: Vec<MessageId> = image
            .messages
            .iter()
            .filter(|m| m.target.qos == QoS::AtLeastOnce)
            .map(|m| m.id)
            .collect();
        // The connection's own will and expiry stay as its CONNECT set them.
        self.restore_locked(session, &mut st, image);
        // Its subscriptions are local from now on (removed from the remote index only once
        // they are in the local one, so no publish in between finds neither).
        self.cluster.remote.clear(session.client_id());
        Session::notify(&mut st);
        drop(st);
        let mut held = Vec::new();
        for id in live {
            held.extend(self.cluster.live.loaded(id, session.client_id()));
        }
        drop(self.propose(held));
        true
    }

    /// Undoes an attachment whose claim could not commit, for a session that was not in memory
    /// before it ([`Attached::load_after_commit`]): the empty session created for it is
    /// dropped, so a later connection here loads the stored session instead of resuming an
    /// empty one. Instead of detaching the connection: nothing is recorded.
    pub fn abandon_attach(&self, session: &Arc<Session>, epoch: u64) {
        drop(self.take_load(session.client_id(), epoch));
        let mut registry = self.sessions.lock();
        let Ok(mut st) = session.lock_attached(epoch) else {
            return;
        };
        st.will = None;
        session.set_durable(false);
        self.unload_locked(&mut registry, session, st);
    }

    /// Starts reading the stored session of `client_id` for the attachment `epoch` once its
    /// `claim` commits; the returned commit covers both (CONNACK waits for it).
    pub(in crate::broker) fn start_load(
        &self,
        client_id: &ByteStr,
        epoch: u64,
        claim: Commit,
    ) -> Commit {
        let load = self.durability.load_session(client_id, claim);
        let commit = load.commit();
        self.loading.lock().insert(client_id.clone(), (epoch, load));
        commit
    }

    /// The load started for the attachment `epoch` of `client_id`, if it is still the latest.
    pub(in crate::broker) fn take_load(
        &self,
        client_id: &ByteStr,
        epoch: u64,
    ) -> Option<SessionLoad> {
        let mut loading = self.loading.lock();
        match loading.get(client_id) {
            Some((e, _)) if *e == epoch => loading.remove(client_id).map(|(_, load)| load),
            _ => None,
        }
    }
}
