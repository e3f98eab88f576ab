//! The broker's retained messages: storing and clearing them within the limits, and the
//! deliveries a new subscription gets.

use crate::broker::Broker;
use crate::limits::Limit;
use crate::message::{Delivery, Message};
use crate::topic::TopicName;
use raftmq_codec::SubscriptionOptions;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

impl Broker {
    /// Applies a RETAIN publish to the retained store. Returns whether anything changed.
    ///
    /// The broker's own `$SYS/...` statistics are never refused by the retained limits and not
    /// counted in [`Broker::retained_bytes`]: clients' retained messages cannot crowd them out.
    /// Removes the retained message of `topic`, keeping the byte count right; returns it.
    pub(in crate::broker) fn remove_retained(&self, topic: &str) -> Option<Arc<Message>> {
        let old = self.retained.remove(topic)?;
        if !topic.starts_with("$SYS/") {
            self.retained_bytes
                .fetch_sub(old.payload.len() as u64, Relaxed);
        }
        Some(old)
    }

    pub(in crate::broker) fn store_retained(&self, message: &Arc<Message>) -> bool {
        let limited = !message.topic.starts_with("$SYS/");
        if message.payload.is_empty() {
            return self.remove_retained(&message.topic).is_some();
        }
        let Ok(topic) = TopicName::new(&message.topic, &self.topic_limits) else {
            return false;
        };
        let existing = self.retained.get(&message.topic);
        let max = self.config.max_retained_messages;
        if limited && max > 0 && self.retained.len() >= max && existing.is_none() {
            self.stats.limit_exceeded(Limit::RetainedMessages);
            return false;
        }
        let max_bytes = self.config.max_retained_bytes.0;
        let old_len = existing.map_or(0, |m| m.payload.len() as u64);
        let new_len = message.payload.len() as u64;
        if limited
            && max_bytes > 0
            && self
                .retained_bytes
                .load(Relaxed)
                .saturating_sub(old_len)
                .saturating_add(new_len)
                > max_bytes
        {
            self.stats.limit_exceeded(Limit::RetainedBytes);
            return false;
        }
        let old = self.retained.set(&topic, message.clone());
        if limited {
            if let Some(old) = old {
                self.retained_bytes
                    .fetch_sub(old.payload.len() as u64, Relaxed);
            }
            self.retained_bytes.fetch_add(new_len, Relaxed);
        }
        true
    }

    /// Retained messages matching `filter`, as deliveries for a subscription with `options`.
    pub(in crate::broker) fn retained_deliveries(
        &self,
        filter: &str,
        options: &SubscriptionOptions,
        subscription_id: Option<u32>,
        now: Instant,
    ) -> Vec<Delivery> {
        self.retained
            .matching(filter, self.config.max_queued_messages)
            .into_iter()
            .filter(|(_, m)| !m.is_expired(now))
            .map(|(_, m)| Delivery {
                qos: options.qos.min(m.qos),
                retain: true,
                subscription_ids: subscription_id.into_iter().collect(),
                message: m,
                durable: None,
            })
            .collect()
    }

    /// Retained message stored for `topic`.
    pub fn retained(&self, topic: &str) -> Option<Arc<Message>> {
        self.retained.get(topic)
    }

    /// Replaces every retained message with `retained` (after the durable state was replaced
    /// wholesale, e.g. a Raft snapshot installed on a lagging node).
    pub fn replace_retained(&self, retained: Vec<Arc<Message>>) {
        self.replace_retained_where(retained, |_| true);
    }

    /// [`Broker::replace_retained`] for the topics `in_scope` selects (those of one shard,
    /// whose state alone was replaced): retained messages of other topics are kept.
    pub fn replace_retained_where(
        &self,
        retained: Vec<Arc<Message>>,
        in_scope: impl Fn(&str) -> bool,
    ) {
        let keep: std::collections::HashSet<&str> =
            retained.iter().map(|m| m.topic.as_str()).collect();
        let mut stale = Vec::new();
        self.retained.for_each(|topic, _| {
            // `$SYS` topics are this node's own statistics, never replicated.
            if !keep.contains(topic.as_str())
                && !topic.as_str().starts_with("$SYS/")
                && in_scope(topic.as_str())
            {
                stale.push(topic.as_str().to_owned());
            }
        });
        for topic in stale {
            self.remove_retained(&topic);
        }
        for message in &retained {
            self.store_retained(message);
        }
    }
}
