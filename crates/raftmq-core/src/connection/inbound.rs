//! Packets from the client after CONNECT: PUBLISH (and the QoS 2 PUBREL), SUBSCRIBE,
//! UNSUBSCRIBE and DISCONNECT.

use super::{Attachment, CloseReason, Connection, Pause, Violation};
use crate::auth::Access;
use crate::broker::{DetachKind, Publisher, TakenOver};
use crate::durability::{Commit, StateChange};
use crate::message::Message;
use crate::session::SubEntry;
use crate::topic::{TopicLimits, TopicName, parse_subscription};
use raftmq_codec::{
    Disconnect, Packet, PubResponse, Publish, QoS, ReasonCode, ReasonProperties, SubAck, Subscribe,
    UnsubAck, Unsubscribe,
};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

impl Connection {
    pub(super) fn attachment(&self) -> Result<&Attachment, Violation> {
        self.attachment
            .as_ref()
            .ok_or(Violation::Code(ReasonCode::PROTOCOL_ERROR))
    }

    pub(super) fn handle_publish(&mut self, p: Publish, now: Instant) -> Result<(), Violation> {
        let cfg = self.broker.config();
        let v5 = self.version.is_v5();
        // Per-client rate and bandwidth (token buckets): over the limit closes the connection.
        if let Some(limits) = &mut self.limits
            && let Err(exceeded) = limits.check(p.topic.len() + p.payload.len(), now)
        {
            self.broker.stats().limit_exceeded(exceeded.limit());
            return Err(Violation::Code(exceeded.reason_code()));
        }
        if p.qos.as_u8() > cfg.max_qos {
            return Err(Violation::Code(ReasonCode::QOS_NOT_SUPPORTED));
        }
        if p.retain && !cfg.retain_available {
            return Err(Violation::Code(ReasonCode::RETAIN_NOT_SUPPORTED));
        }
        if !p.properties.subscription_identifiers.is_empty() {
            return Err(Violation::Code(ReasonCode::PROTOCOL_ERROR));
        }
        // Topic alias (§3.3.2.3.4).
        let topic = match p.properties.topic_alias {
            Some(alias) if v5 => {
                if alias == 0 || alias > cfg.topic_alias_maximum {
                    return Err(Violation::Code(ReasonCode::TOPIC_ALIAS_INVALID));
                }
                if p.topic.is_empty() {
                    match self.inbound_aliases.as_ref().and_then(|a| a.get(&alias)) {
                        Some(t) => t.clone(),
                        None => return Err(Violation::Code(ReasonCode::PROTOCOL_ERROR)),
                    }
                } else {
                    self.inbound_aliases
                        .get_or_insert_default()
                        .insert(alias, p.topic.clone());
                    p.topic.clone()
                }
            }
            _ if p.topic.is_empty() => return Err(Violation::Code(ReasonCode::PROTOCOL_ERROR)),
            _ => p.topic.clone(),
        };
        let pid = p.packet_id;
        let topic_ok = TopicName::new(&topic, self.broker.topic_limits()).is_ok();
        let format_ok = p.properties.payload_format_indicator != Some(true)
            || std::str::from_utf8(&p.payload).is_ok();
        let att = self.attachment()?;
        let allowed = !topic.starts_with("$SYS")
            && self.broker.authorize(
                &att.principal,
                Access::Publish {
                    topic: &topic,
                    qos: p.qos,
                    retain: p.retain,
                },
            );
        let refusal = if !topic_ok {
            Some(ReasonCode::TOPIC_NAME_INVALID)
        } else if !format_ok {
            Some(ReasonCode::PAYLOAD_FORMAT_INVALID)
        } else if !allowed {
            self.broker.stats().publish_denied.fetch_add(1, Relaxed);
            Some(ReasonCode::NOT_AUTHORIZED)
        } else {
            None
        };
        let stats = self.broker.stats();
        stats.messages_received[usize::from(p.qos.as_u8())].fetch_add(1, Relaxed);
        stats
            .bytes_received
            .fetch_add(p.payload.len() as u64, Relaxed);

        // QoS 2: a PUBLISH whose packet id is still awaiting PUBREL is a duplicate: not routed
        // again, just acknowledged again (method B, §4.3.3) once what the first one recorded is
        // durable. If that failed, nothing was acknowledged: it is routed as new.
        let mut record_qos2 = None;
        let mut reroute = None;
        if p.qos == QoS::ExactlyOnce {
            let pid = pid.ok_or(Violation::Code(ReasonCode::PROTOCOL_ERROR))?;
            let (session, epoch) = (att.session.clone(), att.epoch);
            let mut st = session.lock_attached(epoch)?;
            // A packet id loaded with a message id to store again (its first store may have
            // reached only some shards): stored again under that id, whose shards skip it if
            // they have it; acknowledged once that commits (waiting if a resend is at it).
            let mut again = st.qos2_reroute.get(&pid.get()).copied();
            if again.is_some() && !st.incoming_qos2.contains_key(&pid.get()) {
                // Left from an exchange that completed: the packet id is free again.
                st.qos2_reroute.remove(&pid.get());
                again = None;
            }
            match (st.incoming_qos2.get(&pid.get()), again) {
                (Some(first), None) if !matches!(first.result(), Some(Err(_))) => {
                    let first = first.clone();
                    drop(st);
                    self.emit(Packet::PubRec(PubResponse::success(pid)), Some(first));
                    return Ok(());
                }
                (Some(first), Some(_)) if first.result().is_none() => {
                    let first = first.clone();
                    drop(st);
                    self.emit(Packet::PubRec(PubResponse::success(pid)), Some(first));
                    return Ok(());
                }
                (Some(_), again) => {
                    reroute = again;
                    st.incoming_qos2.remove(&pid.get());
                }
                (None, _) => {}
            }
            if refusal.is_none() || !v5 {
                if st.incoming_qos2.len() >= usize::from(cfg.receive_maximum) {
                    return Err(Violation::Code(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED));
                }
                // Recorded below with the commit of what routing it records (a refused message
                // records nothing: ready).
                record_qos2 = Some((session.clone(), epoch, pid.get()));
            }
        }
        let mut reason = ReasonCode::SUCCESS;
        let mut commit = None;
        let mut recorded = Commit::ready();
        if let Some(code) = refusal {
            reason = code;
        } else {
            let mut properties = p.properties;
            let expiry = properties.message_expiry_interval.take();
            properties.topic_alias = None;
            let message = Message {
                topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties,
                expires_at: expiry.map(|s| now + Duration::from_secs(s.into())),
                received_at: now,
                origin: Some(att.client_id.clone()),
            };
            let publisher = Publisher {
                session: &att.session,
                epoch: att.epoch,
                qos2_packet_id: pid
                    .filter(|_| p.qos == QoS::ExactlyOnce)
                    .map(|pid| pid.get()),
                reroute,
            };
            let routed = self.broker.route(Arc::new(message), Some(publisher), now);
            if routed.offered == 0 {
                reason = ReasonCode::NO_MATCHING_SUBSCRIBERS;
            }
            // Only reported with backpressure on (a non-zero pause). A client with messages
            // in flight is not paused (see `poll_room`).
            if let Some((session, episode)) = routed.congested
                && self.paused.is_none()
                && !att.session.awaits_acknowledgements()
            {
                self.broker.stats().publishers_paused.fetch_add(1, Relaxed);
                self.paused = Some(Box::new(Pause {
                    session,
                    episode,
                    until: now + cfg.backpressure_max_pause.0,
                }));
            }
            recorded = routed.store;
            commit = Some(routed.commit);
        }
        if let Some((session, epoch, id)) = record_qos2
            && let Ok(mut st) = session.lock_attached(epoch)
        {
            st.incoming_qos2.insert(id, recorded.clone());
            drop(st);
            if reroute.is_some() {
                // Stored everywhere once this commits: a later resend is only acknowledged.
                let done = session.clone();
                recorded.on_complete(move |result| {
                    if result.is_ok()
                        && let Ok(mut st) = done.lock_attached(epoch)
                    {
                        st.qos2_reroute.remove(&id);
                    }
                });
            }
        }
        let ack = |pid| PubResponse {
            packet_id: pid,
            reason_code: if v5 { reason } else { ReasonCode::SUCCESS },
            properties: ReasonProperties::default(),
        };
        match (p.qos, pid) {
            (QoS::AtMostOnce, _) => {}
            (QoS::AtLeastOnce, Some(pid)) => self.emit(Packet::PubAck(ack(pid)), commit),
            (QoS::ExactlyOnce, Some(pid)) => self.emit(Packet::PubRec(ack(pid)), commit),
            (_, None) => return Err(Violation::Code(ReasonCode::PROTOCOL_ERROR)),
        }
        Ok(())
    }

    pub(super) fn handle_pubrel(&mut self, r: PubResponse) -> Result<(), Violation> {
        let att = self.attachment()?;
        let existed = {
            let mut st = att.session.lock_attached(att.epoch)?;
            // The exchange is complete: the packet id names a new message next time.
            st.qos2_reroute.remove(&r.packet_id.get());
            st.incoming_qos2.remove(&r.packet_id.get()).is_some()
        };
        // PUBCOMP once the release is durable: after it the client may use the packet id for
        // a new message, which a session loaded from a state still holding the id unreleased
        // would take for a resend and drop (acknowledged, never delivered). If the record
        // fails, the connection closes without PUBCOMP and the client sends PUBREL again.
        let released = (existed && att.session.is_durable()).then(|| {
            self.broker.propose_fenced(
                att.fence(),
                vec![StateChange::IncomingQos2Completed {
                    client_id: att.client_id.clone(),
                    packet_id: r.packet_id.get(),
                }],
            )
        });
        let comp = Packet::PubComp(self.next_step(r.packet_id, existed));
        self.emit(comp, released);
        Ok(())
    }

    pub(super) fn handle_subscribe(&mut self, s: Subscribe, now: Instant) -> Result<(), Violation> {
        let cfg = self.broker.config();
        let v5 = self.version.is_v5();
        let sub_id = s.properties.subscription_identifier;
        if sub_id.is_some() && !cfg.subscription_identifiers {
            return Err(Violation::Code(
                ReasonCode::SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED,
            ));
        }
        // A filter that is not well formed (empty, a misplaced wildcard, a shared subscription
        // without group or filter) makes the whole packet malformed: the connection closes
        // ([MQTT-4.7.3-1], [MQTT-4.8.2-2], [MQTT-4.13.1-1]; 3.1.1 [MQTT-4.8.0-1]).
        if s.filters.iter().any(|f| !well_formed(&f.filter)) {
            return Err(Violation::Code(ReasonCode::MALFORMED_PACKET));
        }
        let att = self.attachment()?;
        let mut codes = Vec::with_capacity(s.filters.len());
        let mut changes = Vec::new();
        for f in &s.filters {
            // No Local on a shared subscription is a Protocol Error (§3.8.3.1).
            if v5 && f.options.no_local && f.filter.starts_with("$share/") {
                return Err(Violation::Code(ReasonCode::PROTOCOL_ERROR));
            }
            let subscribed = self
                .broker
                .subscribe(
                    &att.session,
                    att.epoch,
                    &att.principal,
                    &f.filter,
                    SubEntry {
                        options: f.options,
                        subscription_id: sub_id,
                    },
                    now,
                )
                .map_err(|TakenOver| Violation::TakenOver)?;
            codes.push(subscribed.code);
            changes.extend(subscribed.change);
        }
        let commit = self.broker.propose_fenced(att.fence(), changes);
        let ack = Packet::SubAck(SubAck {
            packet_id: s.packet_id,
            properties: ReasonProperties::default(),
            reason_codes: codes,
        });
        self.emit(ack, Some(commit));
        Ok(())
    }

    pub(super) fn handle_unsubscribe(&mut self, u: Unsubscribe) -> Result<(), Violation> {
        if u.filters.iter().any(|f| !well_formed(f)) {
            return Err(Violation::Code(ReasonCode::MALFORMED_PACKET));
        }
        let att = self.attachment()?;
        let mut codes = Vec::with_capacity(u.filters.len());
        let mut changes = Vec::new();
        for f in &u.filters {
            let (existed, change) = self
                .broker
                .unsubscribe(&att.session, att.epoch, f)
                .map_err(|TakenOver| Violation::TakenOver)?;
            changes.extend(change);
            codes.push(if existed {
                ReasonCode::SUCCESS
            } else {
                ReasonCode::NO_SUBSCRIPTION_EXISTED
            });
        }
        let commit = self.broker.propose_fenced(att.fence(), changes);
        let ack = Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            properties: ReasonProperties::default(),
            reason_codes: codes,
        });
        self.emit(ack, Some(commit));
        Ok(())
    }

    pub(super) fn handle_disconnect(&mut self, d: Disconnect, now: Instant) {
        if let Some(secs) = d.properties.session_expiry_interval {
            // Raising the expiry from 0 at DISCONNECT is a Protocol Error (§3.14.2.2.2).
            if self.connect_expiry == 0 && secs != 0 {
                return self.close(
                    CloseReason::ProtocolViolation(ReasonCode::PROTOCOL_ERROR),
                    Some(ReasonCode::PROTOCOL_ERROR),
                    now,
                );
            }
            let secs = self.cap_session_expiry(secs);
            if let Some(att) = &self.attachment
                && self
                    .broker
                    .set_session_expiry(&att.session, att.epoch, secs)
                    .is_err()
            {
                return self.taken_over();
            }
        }
        let kind = if d.reason_code == ReasonCode::DISCONNECT_WITH_WILL_MESSAGE {
            DetachKind::WithWill
        } else if d.reason_code == ReasonCode::NORMAL_DISCONNECTION {
            DetachKind::Normal
        } else {
            DetachKind::Abnormal
        };
        self.closed = Some(CloseReason::ClientDisconnect);
        self.detach(kind, now);
    }
}

/// Whether `filter` is a well-formed topic filter (shared or not), whatever this broker's
/// length and level limits: a filter over the limits is refused per filter in SUBACK, not a
/// malformed packet.
fn well_formed(filter: &str) -> bool {
    let unlimited = TopicLimits {
        max_levels: usize::MAX,
        max_len: usize::MAX,
    };
    parse_subscription(filter, &unlimited).is_ok()
}
