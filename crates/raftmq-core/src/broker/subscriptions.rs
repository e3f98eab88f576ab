//! SUBSCRIBE and UNSUBSCRIBE of one topic filter.

use crate::auth::{Access, Principal};
use crate::broker::{Broker, Subscribed, TakenOver};
use crate::durability::StateChange;
use crate::limits::Limit;
use crate::session::{Session, SessionState, SubEntry, SubscriptionRecord};
use crate::topic::{ParsedFilter, parse_subscription};
use raftmq_codec::{QoS, ReasonCode, RetainHandling, SubscriptionOptions};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

impl Broker {
    /// Handles one topic filter of a SUBSCRIBE for the session attached with `epoch`: validates,
    /// authorizes, records it and queues the matching retained messages. Returns the SUBACK
    /// reason code (the granted QoS on success).
    pub fn subscribe(
        &self,
        session: &Arc<Session>,
        epoch: u64,
        principal: &Principal,
        filter: &str,
        requested: SubEntry,
        now: Instant,
    ) -> Result<Subscribed, TakenOver> {
        let refuse = |code| Ok(Subscribed { code, change: None });
        let SubEntry {
            options,
            subscription_id,
        } = requested;
        let parsed = match parse_subscription(filter, &self.topic_limits) {
            Ok(p) => p,
            Err(_) => return refuse(ReasonCode::TOPIC_FILTER_INVALID),
        };
        if parsed.share_group.is_some() && !self.config.shared_subscriptions {
            return refuse(ReasonCode::SHARED_SUBSCRIPTIONS_NOT_SUPPORTED);
        }
        if !self.config.wildcard_subscriptions && parsed.filter.contains(['+', '#']) {
            return refuse(ReasonCode::WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED);
        }
        let granted = options
            .qos
            .min(QoS::from_u8(self.config.max_qos).unwrap_or(QoS::ExactlyOnce));
        if !self.authorize(
            principal,
            Access::Subscribe {
                filter,
                qos: granted,
            },
        ) {
            self.stats.subscribe_denied.fetch_add(1, Relaxed);
            return refuse(ReasonCode::NOT_AUTHORIZED);
        }
        let options = SubscriptionOptions {
            qos: granted,
            ..options
        };
        let entry = SubEntry {
            options,
            subscription_id,
        };
        let key: Arc<str> = Arc::from(filter);
        let existed = {
            let mut st = session.lock_attached(epoch)?;
            let max = self.config.max_subscriptions_per_client;
            if max > 0 && st.subscriptions.len() >= max && !st.subscriptions.contains_key(&key) {
                self.stats.limit_exceeded(Limit::Subscriptions);
                return refuse(ReasonCode::QUOTA_EXCEEDED);
            }
            self.add_subscription(session, &mut st, key, parsed.clone(), entry)
        };
        // Retained messages are not sent for shared subscriptions (MQTT 5 §4.8.2).
        let send_retained = parsed.share_group.is_none()
            && match options.retain_handling {
                RetainHandling::SendAtSubscribe => true,
                RetainHandling::SendIfNew => !existed,
                RetainHandling::DoNotSend => false,
            };
        if send_retained {
            for d in self.retained_deliveries(&parsed.filter, &options, subscription_id, now) {
                session.enqueue(d, &self.queue_limits, &self.stats);
            }
        }
        let change = session.is_durable().then(|| StateChange::Subscribed {
            client_id: session.client_id().clone(),
            filter: Arc::from(filter),
            entry,
        });
        Ok(Subscribed {
            code: ReasonCode(granted.as_u8()),
            change,
        })
    }

    /// Adds (or replaces) a subscription in the index and in the session (its lock held).
    /// Returns whether it replaced an existing one.
    pub(in crate::broker) fn add_subscription(
        &self,
        session: &Arc<Session>,
        st: &mut SessionState,
        key: Arc<str>,
        parsed: ParsedFilter,
        entry: SubEntry,
    ) -> bool {
        let replaced = self
            .index
            .subscribe(
                &parsed.filter,
                parsed.share_group.as_deref(),
                session.clone(),
                entry,
            )
            .is_some();
        if !replaced {
            self.cluster.routes.local_ref(&key, true);
        }
        let rec = SubscriptionRecord {
            filter: parsed.filter,
            share_group: parsed.share_group,
            entry,
        };
        st.subscriptions.insert(key, rec).is_some()
    }

    /// Removes one subscription. Returns whether it existed, and the durable record to
    /// propose (persistent sessions only).
    pub fn unsubscribe(
        &self,
        session: &Arc<Session>,
        epoch: u64,
        filter: &str,
    ) -> Result<(bool, Option<StateChange>), TakenOver> {
        let mut st = session.lock_attached(epoch)?;
        match st.subscriptions.remove_entry(filter) {
            Some((key, rec)) => {
                if self
                    .index
                    .unsubscribe(&rec.filter, rec.share_group.as_deref(), session)
                    .is_some()
                {
                    self.cluster.routes.local_ref(&key, false);
                }
                let change = session.is_durable().then(|| StateChange::Unsubscribed {
                    client_id: session.client_id().clone(),
                    filter: key,
                });
                Ok((true, change))
            }
            None => Ok((false, None)),
        }
    }
}
