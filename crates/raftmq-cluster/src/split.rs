//! Splitting a proposal over the shards (RFC 0002, section 6): what of a broker's proposal goes
//! to which shard's log.
//!
//! - A change that names a session (its claim, detach, end, will, subscriptions, deliveries,
//!   QoS 2 receipts) goes to the shard of its client id.
//! - `MessageStored` goes to every shard that holds one of its targets, each copy naming that
//!   shard's targets only: a message is stored once per shard it has sessions in.
//! - A retained message goes to the shard of its topic.
//! - `NodeDown` goes to the first data shard (a declaration names one log's index in `seen`;
//!   the node-down task proposes one per shard itself, see `RaftDurability::propose_to`).
//! - An empty proposal is a barrier: an empty batch in every shard.
//!
//! A fenced proposal whose changes reach other shards than the fence's (a persistent
//! publisher's QoS 2 PUBLISH whose subscribers live elsewhere) is **gated**: its part in the
//! fence's shard, which records the packet id with the message id, commits first, and the
//! other parts are proposed only once it has (see `RaftDurability`). Its stores are
//! de-duplicated by message id in every shard (`MessageStored.dedupe`), so the resend of a
//! publish whose other parts were lost stores them again without storing twice where they
//! were not lost. With one shard nothing of this applies: the proposal is one batch, as
//! before shards.

use crate::convert::{ProposalContext, WallClock, change_to_proto_with};
use raftmq_core::durability::{Fence, StateChange};
use raftmq_core::shard::{ShardCount, ShardId, shard_of};
use raftmq_proto::state;
use raftmq_proto::state::change::Change as ProtoChange;
use std::collections::BTreeMap;

/// One shard's part of a proposal.
#[derive(Clone, Debug, PartialEq)]
pub struct Part {
    pub shard: ShardId,
    pub changes: Vec<state::Change>,
}

/// A proposal split over the shards.
#[derive(Clone, Debug, PartialEq)]
pub struct Split {
    /// In shard order; never empty.
    pub parts: Vec<Part>,
    /// The part (index into `parts`) that must commit before the others are proposed: the
    /// fence's shard, when the proposal is fenced and has other parts.
    pub gate: Option<usize>,
}

/// The shard of a fence (its session's).
pub fn fence_shard(fence: &Fence, count: ShardCount) -> ShardId {
    let client_id = match fence {
        Fence::Attached { client_id, .. } | Fence::Offline { client_id, .. } => client_id,
    };
    shard_of(client_id.as_bytes(), count)
}

/// Splits `changes` (a proposal, under `fence` if any) over `count` shards, converting them to
/// their protobuf form with `clock` and `ctx`.
pub fn split(
    changes: &[StateChange],
    fence: Option<&Fence>,
    count: ShardCount,
    clock: &WallClock,
    ctx: &ProposalContext,
) -> Split {
    let convert = |c: &StateChange| change_to_proto_with(c, clock, ctx);
    if count.get() == 1 {
        return Split {
            parts: vec![Part {
                shard: ShardId::FIRST_DATA,
                changes: changes.iter().map(convert).collect(),
            }],
            gate: None,
        };
    }
    if changes.is_empty() {
        return Split {
            parts: count
                .shards()
                .map(|shard| Part {
                    shard,
                    changes: Vec::new(),
                })
                .collect(),
            gate: None,
        };
    }
    let of = |key: &[u8]| shard_of(key, count);
    let mut parts: BTreeMap<ShardId, Vec<state::Change>> = BTreeMap::new();
    // A QoS 2 receipt with the id its message is stored under: the stores are de-duplicated.
    let qos2_id = changes.iter().find_map(|c| match c {
        StateChange::IncomingQos2Received {
            message_id: Some(id),
            ..
        } => Some(*id),
        _ => None,
    });
    for change in changes {
        match change {
            StateChange::MessageStored { targets, .. } => {
                let mut proto = convert(change);
                let Some(ProtoChange::MessageStored(stored)) = proto.change.as_mut() else {
                    continue;
                };
                let mut by_shard: BTreeMap<ShardId, Vec<state::StoredTarget>> = BTreeMap::new();
                for (target, proto_target) in
                    targets.iter().zip(std::mem::take(&mut stored.targets))
                {
                    by_shard
                        .entry(of(target.client_id.as_bytes()))
                        .or_default()
                        .push(proto_target);
                }
                for (shard, targets) in by_shard {
                    let mut copy = stored.clone();
                    copy.targets = targets;
                    parts.entry(shard).or_default().push(state::Change {
                        change: Some(ProtoChange::MessageStored(copy)),
                    });
                }
            }
            StateChange::RetainedSet { message } => parts
                .entry(of(message.topic.as_bytes()))
                .or_default()
                .push(convert(change)),
            StateChange::RetainedCleared { topic } => parts
                .entry(of(topic.as_bytes()))
                .or_default()
                .push(convert(change)),
            StateChange::NodeDown { .. } => parts
                .entry(ShardId::FIRST_DATA)
                .or_default()
                .push(convert(change)),
            StateChange::SessionOpened { client_id, .. }
            | StateChange::SessionDetached { client_id, .. }
            | StateChange::SessionEnded { client_id }
            | StateChange::Subscribed { client_id, .. }
            | StateChange::Unsubscribed { client_id, .. }
            | StateChange::WillPublished { client_id }
            | StateChange::MessageSent { client_id, .. }
            | StateChange::MessageAcked { client_id, .. }
            | StateChange::MessageReleased { client_id, .. }
            | StateChange::IncomingQos2Received { client_id, .. }
            | StateChange::IncomingQos2Completed { client_id, .. } => parts
                .entry(of(client_id.as_bytes()))
                .or_default()
                .push(convert(change)),
        }
    }
    let fenced = fence.map(|f| fence_shard(f, count));
    if let Some(shard) = fenced {
        parts.entry(shard).or_default();
    }
    if let (Some(id), true) = (qos2_id, fence.is_some()) {
        let at_ms = ctx.now.map_or(0, |now| clock.to_unix_ms(now));
        let mut stored_in = Vec::new();
        for (shard, changes) in &mut parts {
            for change in changes.iter_mut() {
                if let Some(ProtoChange::MessageStored(stored)) = change.change.as_mut()
                    && stored.id == id.0
                {
                    stored.dedupe = true;
                    stored.at_ms = at_ms;
                    stored_in.push(shard.get());
                }
            }
        }
        for changes in parts.values_mut() {
            for change in changes.iter_mut() {
                if let Some(ProtoChange::IncomingQos2Received(received)) = change.change.as_mut() {
                    received.message_id = id.0;
                    received.shards.clone_from(&stored_in);
                }
            }
        }
    }
    let parts: Vec<Part> = parts
        .into_iter()
        .map(|(shard, changes)| Part { shard, changes })
        .collect();
    let gate = fenced
        .filter(|_| parts.len() > 1)
        .and_then(|shard| parts.iter().position(|p| p.shard == shard));
    Split { parts, gate }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftmq_codec::{ByteStr, QoS};
    use raftmq_core::durability::{MessageId, StoredTarget};
    use raftmq_core::message::Message;
    use std::sync::Arc;

    fn count(n: u32) -> ShardCount {
        ShardCount::new(n).expect("valid")
    }

    /// Client ids that land in distinct shards of `n`, one per shard in shard order.
    fn one_per_shard(n: u32) -> Vec<ByteStr> {
        let mut found: BTreeMap<ShardId, ByteStr> = BTreeMap::new();
        for i in 0.. {
            let id = format!("c{i}");
            found
                .entry(shard_of(id.as_bytes(), count(n)))
                .or_insert(id.into());
            if found.len() == n as usize {
                break;
            }
        }
        found.into_values().collect()
    }

    fn message(topic: &str) -> Arc<Message> {
        Arc::new(Message {
            topic: topic.into(),
            payload: bytes::Bytes::from_static(b"x"),
            qos: QoS::ExactlyOnce,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            received_at: std::time::Instant::now(),
            origin: None,
        })
    }

    fn target(client_id: &ByteStr) -> StoredTarget {
        StoredTarget {
            client_id: client_id.clone(),
            qos: QoS::ExactlyOnce,
            retain: false,
            subscription_ids: Default::default(),
        }
    }

    fn ctx() -> ProposalContext {
        ProposalContext {
            node_id: 7,
            now: Some(std::time::Instant::now()),
        }
    }

    fn stored_in(part: &Part) -> Vec<(u64, Vec<String>, bool)> {
        part.changes
            .iter()
            .filter_map(|c| match &c.change {
                Some(ProtoChange::MessageStored(m)) => Some((
                    m.id,
                    m.targets.iter().map(|t| t.client_id.clone()).collect(),
                    m.dedupe,
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn one_shard_is_one_part_as_before_shards() {
        let ids = one_per_shard(4);
        let changes = vec![
            StateChange::SessionEnded {
                client_id: ids[0].clone(),
            },
            StateChange::MessageStored {
                id: MessageId(9),
                message: message("t"),
                targets: ids.iter().map(target).collect(),
            },
        ];
        let clock = WallClock::now();
        let one = split(&changes, None, ShardCount::ONE, &clock, &ctx());
        assert_eq!(one.gate, None);
        assert_eq!(one.parts.len(), 1);
        assert_eq!(one.parts[0].shard, ShardId::FIRST_DATA);
        assert_eq!(one.parts[0].changes.len(), 2);
        assert_eq!(stored_in(&one.parts[0])[0].1.len(), 4);
        assert!(!stored_in(&one.parts[0])[0].2, "no de-duplication");
        assert_eq!(
            split(&[], None, ShardCount::ONE, &clock, &ctx())
                .parts
                .len(),
            1
        );
    }

    #[test]
    fn a_message_is_stored_once_per_shard_of_its_targets_and_session_changes_go_to_their_shard() {
        let ids = one_per_shard(4);
        let clock = WallClock::now();
        let changes = vec![
            StateChange::MessageAcked {
                client_id: ids[2].clone(),
                id: MessageId(1),
            },
            StateChange::MessageStored {
                id: MessageId(9),
                message: message("t"),
                targets: vec![target(&ids[3]), target(&ids[1]), target(&ids[3])],
            },
            StateChange::RetainedCleared { topic: "t".into() },
        ];
        let parts = split(&changes, None, count(4), &clock, &ctx());
        assert_eq!(parts.gate, None, "unfenced: every part at once");
        let shards: Vec<u32> = parts.parts.iter().map(|p| p.shard.get()).collect();
        let retained = shard_of(b"t", count(4)).get();
        let mut expected = vec![2, 3, 4, retained];
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(shards, expected);
        let part = |shard: u32| {
            parts
                .parts
                .iter()
                .find(|p| p.shard.get() == shard)
                .expect("part")
        };
        assert_eq!(
            stored_in(part(4)),
            vec![(9, vec![ids[3].to_string(), ids[3].to_string()], false)],
            "both deliveries to the session in shard 4, in order, one stored copy"
        );
        assert_eq!(
            stored_in(part(2)),
            vec![(9, vec![ids[1].to_string()], false)]
        );
        assert!(matches!(
            part(3).changes[0].change,
            Some(ProtoChange::MessageAcked(_))
        ));
    }

    #[test]
    fn a_fenced_qos2_publish_spanning_shards_is_gated_on_its_publishers_shard_and_deduplicated() {
        let ids = one_per_shard(4);
        let clock = WallClock::now();
        let publisher = ids[0].clone();
        let changes = vec![
            StateChange::IncomingQos2Received {
                client_id: publisher.clone(),
                packet_id: 5,
                message_id: Some(MessageId(9)),
            },
            StateChange::MessageStored {
                id: MessageId(9),
                message: message("t"),
                targets: vec![target(&ids[0]), target(&ids[2])],
            },
        ];
        let fence = Fence::Attached {
            client_id: publisher,
            epoch: 3,
        };
        let gated = split(&changes, Some(&fence), count(4), &clock, &ctx());
        let gate = gated.gate.expect("gated");
        assert_eq!(gated.parts[gate].shard.get(), 1, "the publisher's shard");
        assert_eq!(gated.parts.len(), 2);
        let received = gated.parts[gate]
            .changes
            .iter()
            .find_map(|c| match &c.change {
                Some(ProtoChange::IncomingQos2Received(r)) => Some(r.clone()),
                _ => None,
            })
            .expect("receipt in the gate");
        assert_eq!(received.message_id, 9);
        assert_eq!(received.shards, vec![1, 3], "every shard it is stored in");
        for part in &gated.parts {
            for (_, _, dedupe) in stored_in(part) {
                assert!(dedupe, "every store de-duplicated");
            }
        }
    }

    #[test]
    fn a_fenced_proposal_within_its_shard_is_not_gated_and_a_barrier_reaches_every_shard() {
        let ids = one_per_shard(4);
        let clock = WallClock::now();
        let fence = Fence::Attached {
            client_id: ids[1].clone(),
            epoch: 1,
        };
        let changes = vec![StateChange::MessageSent {
            client_id: ids[1].clone(),
            id: MessageId(4),
            packet_id: 2,
        }];
        let split_one = split(&changes, Some(&fence), count(4), &clock, &ctx());
        assert_eq!(split_one.gate, None);
        assert_eq!(split_one.parts.len(), 1);
        assert_eq!(split_one.parts[0].shard.get(), 2);
        let barrier = split(&[], None, count(4), &clock, &ctx());
        assert_eq!(barrier.parts.len(), 4);
        assert!(barrier.parts.iter().all(|p| p.changes.is_empty()));
    }
}
