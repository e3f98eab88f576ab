//! Session lifecycle: attaching a connection (resume, takeover, clean start), detaching it
//! (wills and expiry), and taking sessions out of this node.

use crate::broker::{Attached, Broker, DetachKind, TakenOver, UNFENCED};
use crate::durability::{Commit, DetachRecord, Fence, StateChange};
use crate::session::{Outgoing, PendingWill, Session, SessionState};
use ahash::HashMap;
use raftmq_codec::{ByteStr, ReasonCode};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

impl Broker {
    /// Attaches a connection to the session of `client_id`: resumes it (clean start false and
    /// one exists), or replaces/creates it. A connection still attached to it is fenced off and
    /// woken so it closes with Session Taken Over.
    pub fn attach(
        &self,
        client_id: &ByteStr,
        clean_start: bool,
        expiry_secs: u32,
        will: Option<PendingWill>,
        now: Instant,
    ) -> Attached {
        let mut wills_to_publish = Vec::new();
        let mut changes = Vec::new();
        // In a cluster, a stored session whose memory here holds a QoS 2 PUBLISH whose commit
        // was reported failed cannot be resumed from memory: the commit may have happened all
        // the same (a lost reply, a timeout), and the client's resend would then be routed as
        // new and stored twice. It is let go of and loaded from the replicated state, which
        // says whether the packet id was recorded (as on any other node).
        if !clean_start
            && self.clustered()
            && self.sessions.lock().get(client_id).is_some_and(|s| {
                s.is_durable()
                    && s.lock_unfenced(UNFENCED)
                        .incoming_qos2
                        .values()
                        .any(|c| matches!(c.result(), Some(Err(_))))
            })
            && let Some(w) = self.forget_session(client_id, true, true)
        {
            wills_to_publish.push(w);
        }
        // The session starts empty: clean start, or the one found ends with its connection.
        let mut fresh = clean_start;
        let attached = {
            let mut registry = self.sessions.lock();
            let resumed = match registry.get(client_id) {
                Some(existing) => {
                    let mut st = existing.lock_unfenced(UNFENCED);
                    let was_durable = existing.is_durable();
                    if st.online {
                        self.stats.takeovers.fetch_add(1, Relaxed);
                        self.stats.sessions_online.fetch_sub(1, Relaxed);
                        existing.set_online(&mut st, false);
                    }
                    // The previous connection's will (still attached, or waiting for its delay):
                    // due now if it has no delay; otherwise cancelled, as a new network
                    // connection for the client id came within the delay ([MQTT-3.1.2-8],
                    // [MQTT-3.1.3-9]), whether or not it starts clean (docs/conformance.md).
                    if let Some(w) = st.will.take().filter(|w| w.delay_secs == 0) {
                        wills_to_publish.push(w);
                    }
                    // A session with expiry 0 ends with its connection, which this attach
                    // closes: the new connection starts a new session, as with clean start
                    // ([MQTT-3.1.2-6], [MQTT-3.2.2-2]).
                    fresh = clean_start || st.expiry_secs == 0;
                    st.epoch = self.next_epoch();
                    st.kick = None;
                    Session::notify(&mut st);
                    if fresh {
                        self.discard_locked(existing, &mut st);
                        if was_durable {
                            existing.set_durable(false);
                            if expiry_secs == 0 {
                                changes.push(StateChange::SessionEnded {
                                    client_id: client_id.clone(),
                                });
                            }
                        }
                        None
                    } else {
                        drop(st);
                        Some(existing.clone())
                    }
                }
                None => None,
            };
            let session_present = resumed.is_some();
            let session = match resumed {
                Some(s) => s,
                None => {
                    let s = Arc::new(Session::new(client_id.clone(), expiry_secs));
                    if registry.insert(client_id.clone(), s.clone()).is_none() {
                        self.stats.sessions_total.fetch_add(1, Relaxed);
                    }
                    s
                }
            };
            let mut st = session.lock_unfenced(UNFENCED);
            st.epoch = self.next_epoch();
            st.notified = false;
            st.waker = None;
            st.kick = None;
            st.expiry_secs = expiry_secs;
            st.disconnected_at = None;
            st.attached_at = Some(now);
            session.set_online(&mut st, true);
            self.stats.sessions_online.fetch_add(1, Relaxed);
            let epoch = st.epoch;
            // A persistent session (or one that was, resumed with expiry 0 for this connection)
            // is recorded, with its will, before CONNACK.
            if expiry_secs > 0 || session.is_durable() {
                // A clean start ends the stored session, and with it its subscriptions. Otherwise
                // they stay remote until the session is loaded here (`finish_attach`): until
                // then publishes here must still be stored for it.
                if fresh {
                    self.cluster.remote.clear(client_id);
                }
                session.set_durable(true);
                changes.push(StateChange::SessionOpened {
                    client_id: client_id.clone(),
                    epoch,
                    clean_start: fresh,
                    expiry_secs,
                    will: will.clone(),
                });
            }
            // A will that no log entry records is announced to the peers instead (a single
            // node has none: nothing to keep).
            if let Some(w) = will
                .as_ref()
                .filter(|_| !session.is_durable() && self.clustered())
            {
                self.cluster.wills.register(client_id, w.clone());
            }
            st.will = will;
            drop(st);
            Attached {
                session,
                epoch,
                session_present,
                commit: Commit::ready(),
                load_after_commit: !session_present && !fresh,
            }
        };
        let claim = self.propose(changes);
        let commit = if attached.load_after_commit {
            self.start_load(client_id, attached.epoch, claim)
        } else {
            claim
        };
        let attached = Attached { commit, ..attached };
        // Nothing goes through the log for a session that is not stored: tell the other nodes
        // (outside the registry lock).
        if !attached.session.is_durable()
            && let Some(forwarder) = self.cluster.routes.forwarder.get()
        {
            forwarder.claim(client_id, now);
        }
        for w in wills_to_publish {
            self.publish_will(w, now);
        }
        attached
    }

    /// Detaches the connection holding `epoch`. No-op if the session was taken over since.
    pub fn detach(&self, session: &Arc<Session>, epoch: u64, kind: DetachKind, now: Instant) {
        drop(self.take_load(session.client_id(), epoch));
        let mut publish_now = None;
        {
            let mut registry = self.sessions.lock();
            let Ok(mut st) = session.lock_attached(epoch) else {
                return;
            };
            if !st.online {
                return;
            }
            session.set_online(&mut st, false);
            self.stats.sessions_online.fetch_sub(1, Relaxed);
            st.waker = None;
            st.disconnected_at = Some(now);
            match kind {
                DetachKind::Normal => st.will = None,
                DetachKind::WithWill => publish_now = st.will.take(),
                DetachKind::Abnormal => {}
            }
            if st.expiry_secs == 0 {
                // The session ends with the connection: a pending will goes out now.
                if let Some(w) = st.will.take() {
                    publish_now = Some(w);
                }
                self.discard_locked(session, &mut st);
                drop(st);
                self.remove_from_registry(&mut registry, session);
                if session.is_durable() {
                    session.set_durable(false);
                    drop(registry);
                    // Fenced: a copy applied after the client reconnected must not end the
                    // session that connection has claimed since.
                    self.propose_fenced(
                        Fence::Attached {
                            client_id: session.client_id().clone(),
                            epoch,
                        },
                        vec![StateChange::SessionEnded {
                            client_id: session.client_id().clone(),
                        }],
                    );
                }
            } else {
                if st.will.as_ref().is_some_and(|w| w.delay_secs == 0) {
                    publish_now = st.will.take();
                }
                let record = StateChange::SessionDetached {
                    client_id: session.client_id().clone(),
                    epoch,
                    how: if publish_now.is_some() {
                        DetachRecord::WillPublished
                    } else if st.will.is_some() {
                        DetachRecord::Abnormal
                    } else {
                        DetachRecord::Normal
                    },
                    expiry_secs: st.expiry_secs,
                };
                let will_delay = st.will.as_ref().map(|w| w.delay_secs);
                let expiry_secs = st.expiry_secs;
                drop(st);
                drop(registry);
                if session.is_durable() {
                    self.propose_fenced(
                        Fence::Attached {
                            client_id: session.client_id().clone(),
                            epoch,
                        },
                        vec![record],
                    );
                }
                self.start_disconnected_timers(
                    session.client_id(),
                    epoch,
                    will_delay,
                    expiry_secs,
                    now,
                );
            }
        }
        if let Some(w) = publish_now {
            self.publish_will(w, now);
        }
    }

    /// Changes the expiry of the session attached with `epoch` (MQTT 5 DISCONNECT property).
    pub fn set_session_expiry(
        &self,
        session: &Session,
        epoch: u64,
        secs: u32,
    ) -> Result<(), TakenOver> {
        let mut st = session.lock_attached(epoch)?;
        st.expiry_secs = secs;
        Ok(())
    }

    pub(in crate::broker) fn remove_from_registry(
        &self,
        registry: &mut HashMap<ByteStr, Arc<Session>>,
        session: &Arc<Session>,
    ) {
        if registry
            .get(session.client_id())
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            registry.remove(session.client_id());
            self.stats.sessions_total.fetch_sub(1, Relaxed);
        }
    }

    /// Removes a session's subscriptions and messages (its state lock held).
    /// Takes `session` (locked as `st`) out of this node: offline, fenced (its connection, if
    /// any, closes on its next poll), emptied and out of the registry. Records nothing.
    pub(in crate::broker) fn unload_locked(
        &self,
        registry: &mut HashMap<ByteStr, Arc<Session>>,
        session: &Arc<Session>,
        mut st: parking_lot::MutexGuard<'_, SessionState>,
    ) {
        if st.online {
            self.stats.sessions_online.fetch_sub(1, Relaxed);
            session.set_online(&mut st, false);
        }
        st.epoch = self.next_epoch();
        Session::notify(&mut st);
        self.discard_locked(session, &mut st);
        drop(st);
        self.remove_from_registry(registry, session);
    }

    pub(in crate::broker) fn discard_locked(&self, session: &Arc<Session>, st: &mut SessionState) {
        if self.clustered() {
            self.cluster.wills.release(session.client_id());
        }
        for (key, rec) in st.subscriptions.drain() {
            if self
                .index
                .unsubscribe(&rec.filter, rec.share_group.as_deref(), session)
                .is_some()
            {
                self.cluster.routes.local_ref(&key, false);
            }
        }
        self.stats
            .messages_queued
            .fetch_sub(st.queue.len() as i64, Relaxed);
        st.queue.clear();
        let inflight = st
            .outgoing
            .values()
            .filter(|o| matches!(o.state, Outgoing::Publish(_)))
            .count();
        self.stats
            .messages_inflight
            .fetch_sub(inflight as i64, Relaxed);
        st.outgoing.clear();
        st.incoming_qos2.clear();
        st.qos2_reroute.clear();
    }

    /// Ends a session by administrative action (kicks its connection if online).
    pub fn remove_session(&self, client_id: &str) -> bool {
        self.end_session(client_id).is_some()
    }

    /// Like [`Broker::remove_session`], returning the commit of the session's end (`None` when
    /// there was no session).
    pub fn end_session(&self, client_id: &str) -> Option<Commit> {
        let registry = self.sessions.lock();
        let session = registry.get(client_id).cloned()?;
        let mut st = session.lock_unfenced(UNFENCED);
        if st.online && st.kick.is_none() {
            st.kick = Some(ReasonCode::ADMINISTRATIVE_ACTION);
        }
        st.will = None;
        Some(self.end_locked(registry, &session, st))
    }

    /// Takes `session` (locked as `st`) out of this node ([`Broker::unload_locked`]) and, if
    /// it was stored, ends it in the durable state too (dropping any of its subscriptions still
    /// mirrored as those of a session held elsewhere, as during a load).
    pub(in crate::broker) fn end_locked(
        &self,
        mut registry: parking_lot::MutexGuard<'_, HashMap<ByteStr, Arc<Session>>>,
        session: &Arc<Session>,
        st: parking_lot::MutexGuard<'_, SessionState>,
    ) -> Commit {
        let durable = session.is_durable();
        session.set_durable(false);
        self.unload_locked(&mut registry, session, st);
        drop(registry);
        if !durable {
            return Commit::ready();
        }
        self.cluster.remote.clear(session.client_id());
        self.propose(vec![StateChange::SessionEnded {
            client_id: session.client_id().clone(),
        }])
    }
}
