//! Messages towards the client: pumping the session's queue into the in-flight window,
//! resending after a resume, topic aliases, sizes, and the client's PUBACK/PUBREC/PUBCOMP.

use super::{CloseReason, Connection, Violation};
use crate::auth::Access;
use crate::durability::{Commit, Fence, StateChange};
use crate::message::Delivery;
use crate::session::{Outgoing, OutgoingEntry};
use crate::stats::DropReason;
use ahash::HashMap;
use raftmq_codec::{
    ByteStr, Packet, PacketId, PubResponse, Publish, PublishProperties, QoS, ReasonCode,
    ReasonProperties, encoded_len,
};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

/// Server→client topic aliases: topics get aliases 1..=max in first-use order, never evicted.
#[derive(Default)]
pub(super) struct OutboundAliases {
    pub(super) max: u16,
    /// Allocated at the first alias.
    pub(super) by_topic: Option<Box<HashMap<ByteStr, u16>>>,
}

impl OutboundAliases {
    /// `(alias, already_known_by_client)` for `topic`, or `None` when aliases are off or full.
    /// A new alias is only recorded by [`Self::commit`], once the packet introducing it is sent.
    pub(super) fn alias_for(&self, topic: &ByteStr) -> Option<(u16, bool)> {
        if self.max == 0 {
            return None;
        }
        let known = self.by_topic.as_deref();
        if let Some(a) = known.and_then(|m| m.get(topic)) {
            return Some((*a, true));
        }
        let next = u16::try_from(known.map_or(0, |m| m.len()) + 1)
            .ok()
            .filter(|n| *n <= self.max)?;
        Some((next, false))
    }

    /// Records that the client learnt `alias` for `topic` (a PUBLISH carrying both was sent).
    pub(super) fn commit(&mut self, topic: &ByteStr, alias: u16) {
        self.by_topic
            .get_or_insert_default()
            .entry(topic.clone())
            .or_insert(alias);
    }
}

impl Connection {
    /// Resends unacknowledged messages after a session is resumed (§4.4): PUBLISH with DUP,
    /// and PUBREL for those already released, in their original order.
    pub(super) fn resend_inflight(&mut self, now: Instant) {
        let Some(att) = &self.attachment else { return };
        let session = att.session.clone();
        let mut entries: Vec<(u16, OutgoingEntry)> = {
            let Ok(st) = session.lock_attached(att.epoch) else {
                return;
            };
            st.outgoing.iter().map(|(id, e)| (*id, e.clone())).collect()
        };
        entries.sort_by_key(|(_, e)| e.seq);
        // Never more unacknowledged than the client's (possibly smaller) Receive Maximum.
        let window = self.window();
        for (i, (id, entry)) in entries.into_iter().enumerate() {
            if i < window {
                self.resend(id, entry.state, now);
            } else {
                self.resend_backlog.get_or_insert_default().push_back(id);
            }
        }
    }

    pub(super) fn resend(&mut self, id: u16, state: Outgoing, now: Instant) {
        let Some(pid) = PacketId::new(id) else { return };
        match state {
            Outgoing::Publish(d) => {
                if !self.transmit_publish(&d, Some(pid), true, now) {
                    // The client's new Maximum Packet Size is smaller: drop it (§3.1.2.25).
                    self.broker.stats().dropped(DropReason::TooLarge, 1);
                    self.complete_outgoing(id);
                }
            }
            Outgoing::Released(_) => self.emit(Packet::PubRel(PubResponse::success(pid)), None),
        }
    }

    /// QoS 1/2 messages that may be unacknowledged towards the client at once.
    pub(super) fn window(&self) -> usize {
        usize::from(
            self.client_receive_max
                .min(self.broker.config().max_inflight),
        )
    }

    /// Moves queued deliveries into the transmit queue, as far as the client's receive window
    /// allows, at most `budget` of them. Also notices a session takeover. Returns true when
    /// more deliveries are ready (budget exhausted).
    ///
    /// The caller pumps after every batch of input (packets change the window; a SUBSCRIBE
    /// queues retained messages) and whenever the session is notified.
    pub fn pump(&mut self, now: Instant, budget: usize) -> bool {
        if self.closed.is_some()
            || matches!(self.pending_front(), Some(p) if matches!(p.packet, Packet::ConnAck(_)))
        {
            // Nothing is delivered before CONNACK.
            return false;
        }
        let Some(att) = &self.attachment else {
            return false;
        };
        let session = att.session.clone();
        let epoch = att.epoch;
        // An ACL that withholds topics message by message (asked once per pass).
        let receiver = self
            .broker
            .checks_delivery(&att.principal)
            .then(|| att.principal.clone());
        let mut sent_records = Vec::new();
        let window = self.window();
        let broker = self.broker.clone();
        let stats = broker.stats();
        let mut moved = 0;
        let mut batch: Vec<(Delivery, Option<PacketId>)> = Vec::new();
        let mut resends = Vec::new();
        let relieved = {
            let Ok(mut st) = session.lock_attached(epoch) else {
                self.taken_over();
                return false;
            };
            if let Some(code) = st.kick.take() {
                drop(st);
                self.close(CloseReason::Kicked, Some(code), now);
                return false;
            }
            // Held-back resends go first, as the window allows.
            let backlog = self.resend_backlog.as_ref().map_or(0, |b| b.len());
            let mut on_wire = st.outgoing.len().saturating_sub(backlog);
            while on_wire < window {
                let Some(id) = self.resend_backlog.as_mut().and_then(|b| b.pop_front()) else {
                    // Empty (or never needed): the rare backlog's memory goes.
                    self.resend_backlog = None;
                    break;
                };
                if let Some(entry) = st.outgoing.get(&id) {
                    resends.push((id, entry.state.clone()));
                    on_wire += 1;
                }
            }
            while moved < budget {
                let Some(front) = st.queue.front() else { break };
                if front.message.is_expired(now) {
                    st.queue.pop_front();
                    stats.messages_queued.fetch_sub(1, Relaxed);
                    stats.dropped(DropReason::Expired, 1);
                    continue;
                }
                if let Some(principal) = &receiver
                    && !broker.authorize(
                        principal,
                        Access::Receive {
                            topic: &front.message.topic,
                        },
                    )
                {
                    // Withheld: done for this session (a stored copy is acknowledged, so it is
                    // not delivered after a restart either).
                    if let Some(d) = st.queue.pop_front() {
                        stats.messages_queued.fetch_sub(1, Relaxed);
                        stats.dropped(DropReason::NotAuthorized, 1);
                        if let Some(id) = d.durable {
                            sent_records.push(StateChange::MessageAcked {
                                client_id: session.client_id().clone(),
                                id,
                            });
                        }
                    }
                    continue;
                }
                let pid = if front.qos == QoS::AtMostOnce {
                    None
                } else {
                    let inflight = st.outgoing.len();
                    if inflight >= window {
                        break;
                    }
                    match st.allocate_packet_id() {
                        Some(pid) => Some(pid),
                        None => break,
                    }
                };
                let Some(d) = st.queue.pop_front() else { break };
                stats.messages_queued.fetch_sub(1, Relaxed);
                if let Some(pid) = pid {
                    if let Some(id) = d.durable {
                        sent_records.push(StateChange::MessageSent {
                            client_id: session.client_id().clone(),
                            id,
                            packet_id: pid.get(),
                        });
                    }
                    let seq = st.next_seq;
                    st.next_seq += 1;
                    st.outgoing.insert(
                        pid.get(),
                        OutgoingEntry {
                            seq,
                            state: Outgoing::Publish(d.clone()),
                        },
                    );
                    stats.messages_inflight.fetch_add(1, Relaxed);
                }
                batch.push((d, pid));
                moved += 1;
            }
            session.relieve(&mut st, broker.queue_limits().resume_at)
        };
        // Publishers paused for this queue read again.
        for w in relieved {
            w.wake();
        }
        for (id, state) in resends {
            self.resend(id, state, now);
        }
        let more = moved == budget && budget != usize::MAX;
        // Packet ids of durable deliveries are recorded so a resumed session resends them with
        // the same ids (§4.4). QoS 1 does not wait (a lost record only costs a duplicate, which
        // QoS 1 allows). A stored QoS 2 PUBLISH waits for its record: sent before it and the
        // node lost, the session elsewhere would send the message again under a new packet id,
        // which a receiver cannot recognise as a duplicate (exactly once).
        let sent = broker.propose_fenced(
            Fence::Attached {
                client_id: session.client_id().clone(),
                epoch,
            },
            sent_records,
        );
        let latency = (!batch.is_empty())
            .then(|| metrics::histogram!(crate::stats::DELIVERY_LATENCY_SECONDS));
        for (d, pid) in batch {
            let hold = (d.qos == QoS::ExactlyOnce && d.durable.is_some()).then(|| sent.clone());
            if self.transmit_publish_after(&d, pid, false, now, hold) {
                if let Some(h) = &latency {
                    h.record(
                        now.saturating_duration_since(d.message.received_at)
                            .as_secs_f64(),
                    );
                }
                stats.messages_sent[usize::from(d.qos.as_u8())].fetch_add(1, Relaxed);
                stats
                    .bytes_sent
                    .fetch_add(d.message.payload.len() as u64, Relaxed);
            } else {
                // Too large for the client (MQTT 5 §3.1.2.25): drop it as if delivered.
                stats.dropped(DropReason::TooLarge, 1);
                if let Some(pid) = pid {
                    self.complete_outgoing(pid.get());
                }
            }
        }
        more
    }

    /// Whether `packet` respects the client's Maximum Packet Size (measured in place: no copy).
    pub(super) fn fits(&self, packet: &Packet) -> bool {
        self.client_max_packet == u32::MAX
            || u32::try_from(encoded_len(packet, self.version))
                .is_ok_and(|l| l <= self.client_max_packet)
    }

    /// Queues the PUBLISH for `d` unless it exceeds the client's Maximum Packet Size (then
    /// returns false and sends nothing, leaving the topic alias state untouched).
    pub(super) fn transmit_publish(
        &mut self,
        d: &Delivery,
        packet_id: Option<PacketId>,
        dup: bool,
        now: Instant,
    ) -> bool {
        self.transmit_publish_after(d, packet_id, dup, now, None)
    }

    /// [`Self::transmit_publish`], held back (with everything after it) until `commit`.
    pub(super) fn transmit_publish_after(
        &mut self,
        d: &Delivery,
        packet_id: Option<PacketId>,
        dup: bool,
        now: Instant,
        commit: Option<Commit>,
    ) -> bool {
        let packet = Packet::Publish(self.publish_packet(d, packet_id, dup, now));
        if !self.fits(&packet) {
            return false;
        }
        if let Packet::Publish(p) = &packet
            && let Some(alias) = p.properties.topic_alias
            && !p.topic.is_empty()
        {
            self.outbound_aliases.commit(&p.topic, alias);
        }
        self.emit(packet, commit);
        true
    }

    pub(super) fn publish_packet(
        &self,
        d: &Delivery,
        packet_id: Option<PacketId>,
        dup: bool,
        now: Instant,
    ) -> Publish {
        let m = &d.message;
        let mut topic = m.topic.clone();
        let properties = if self.version.is_v5() {
            let mut p = m.properties.clone();
            p.message_expiry_interval = m.remaining_expiry(now);
            p.subscription_identifiers = d.subscription_ids.to_vec();
            if let Some((alias, known)) = self.outbound_aliases.alias_for(&m.topic) {
                p.topic_alias = Some(alias);
                if known {
                    topic = ByteStr::default();
                }
            }
            p
        } else {
            PublishProperties::default()
        };
        Publish {
            dup,
            qos: d.qos,
            retain: d.retain,
            topic,
            packet_id,
            properties,
            payload: m.payload.clone(),
        }
    }

    pub(super) fn handle_puback(&mut self, r: PubResponse) -> Result<(), Violation> {
        let att = self.attachment()?;
        let mut st = att.session.lock_attached(att.epoch)?;
        let id = r.packet_id.get();
        match st.outgoing.get(&id).map(|e| &e.state) {
            Some(Outgoing::Publish(d)) if d.qos == QoS::AtLeastOnce => {}
            // A QoS 2 delivery is answered with PUBREC, and after PUBREL with PUBCOMP: PUBACK
            // is the wrong acknowledgement ([MQTT-4.3.3-2]).
            Some(_) => return Err(Violation::Code(ReasonCode::PROTOCOL_ERROR)),
            // An id not in flight (acknowledged twice, or after a resume): nothing to do.
            None => return Ok(()),
        }
        if let Some(OutgoingEntry {
            state: Outgoing::Publish(d),
            ..
        }) = st.outgoing.remove(&id)
        {
            drop(st);
            self.broker.stats().messages_inflight.fetch_sub(1, Relaxed);
            self.record_acked(d.durable);
        }
        Ok(())
    }

    pub(super) fn handle_pubrec(&mut self, r: PubResponse) -> Result<(), Violation> {
        let att = self.attachment()?;
        let id = r.packet_id.get();
        let mut released = None;
        let known = {
            let mut st = att.session.lock_attached(att.epoch)?;
            match st.outgoing.get_mut(&id) {
                Some(e) if matches!(&e.state, Outgoing::Publish(d) if d.qos == QoS::ExactlyOnce) => {
                    self.broker.stats().messages_inflight.fetch_sub(1, Relaxed);
                    let durable = match &e.state {
                        Outgoing::Publish(d) => d.durable,
                        Outgoing::Released(_) => None,
                    };
                    if !r.reason_code.is_success() {
                        // The client refused the message: the exchange ends here (§4.3.3).
                        st.outgoing.remove(&id);
                        drop(st);
                        self.record_acked(durable);
                        return Ok(());
                    }
                    e.state = Outgoing::Released(durable);
                    released = durable;
                    true
                }
                // PUBREC again after PUBREL: PUBREL again.
                Some(OutgoingEntry {
                    state: Outgoing::Released(_),
                    ..
                }) => true,
                // PUBREC for a QoS 1 delivery ([MQTT-4.3.2-2]).
                Some(_) => return Err(Violation::Code(ReasonCode::PROTOCOL_ERROR)),
                None => false,
            }
        };
        // PUBREL for a stored message waits until "released" is durable: after a restart the
        // session must resend PUBREL, not the PUBLISH (exactly once).
        let commit = released.map(|id| {
            self.broker.propose_fenced(
                att.fence(),
                vec![StateChange::MessageReleased {
                    client_id: att.client_id.clone(),
                    id,
                }],
            )
        });
        let rel = Packet::PubRel(self.next_step(r.packet_id, known));
        self.emit(rel, commit);
        Ok(())
    }

    pub(super) fn handle_pubcomp(&mut self, r: PubResponse) -> Result<(), Violation> {
        let att = self.attachment()?;
        let mut st = att.session.lock_attached(att.epoch)?;
        let id = r.packet_id.get();
        let durable = match st.outgoing.get(&id).map(|e| &e.state) {
            Some(Outgoing::Released(durable)) => *durable,
            // PUBCOMP before PUBREC, or for a QoS 1 delivery ([MQTT-4.3.2-2], [MQTT-4.3.3-2]).
            Some(Outgoing::Publish(_)) => return Err(Violation::Code(ReasonCode::PROTOCOL_ERROR)),
            None => return Ok(()),
        };
        st.outgoing.remove(&id);
        drop(st);
        self.record_acked(durable);
        Ok(())
    }

    /// Records that a stored message is done for this session (not awaited: a lost record
    /// only means a redelivery after a crash).
    pub(super) fn record_acked(&self, durable: Option<crate::durability::MessageId>) {
        if let (Some(id), Some(att)) = (durable, &self.attachment) {
            self.broker.propose(vec![StateChange::MessageAcked {
                client_id: att.client_id.clone(),
                id,
            }]);
        }
    }

    pub(super) fn complete_outgoing(&mut self, id: u16) {
        let Some(att) = &self.attachment else { return };
        let removed = att
            .session
            .lock_attached(att.epoch)
            .ok()
            .and_then(|mut st| st.outgoing.remove(&id));
        if let Some(entry) = removed {
            let durable = match entry.state {
                Outgoing::Publish(d) => {
                    self.broker.stats().messages_inflight.fetch_sub(1, Relaxed);
                    d.durable
                }
                Outgoing::Released(durable) => durable,
            };
            self.record_acked(durable);
        }
    }

    /// The next step of a QoS 2 exchange (PUBREL after PUBREC, PUBCOMP after PUBREL) for
    /// `packet_id`: success, or (MQTT 5) Packet Identifier not found when it was not `known`.
    pub(super) fn next_step(&self, packet_id: PacketId, known: bool) -> PubResponse {
        PubResponse {
            packet_id,
            reason_code: if known || !self.version.is_v5() {
                ReasonCode::SUCCESS
            } else {
                ReasonCode::PACKET_IDENTIFIER_NOT_FOUND
            },
            properties: ReasonProperties::default(),
        }
    }
}
