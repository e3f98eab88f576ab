//! Conversions between the core's durable-state types ([`StateChange`], [`Message`],
//! [`WillRecord`], [`SubEntry`], [`StoredTarget`]) and their `raftmq.state.v1` protobuf form.
//! Every conversion of the crate lives here.
//!
//! # Time
//!
//! The core holds times as monotonic [`Instant`]s, which mean nothing on another node or after
//! a restart; the protobuf form holds wall-clock milliseconds since the Unix epoch. A
//! [`WallClock`] pairs one `Instant` with the wall-clock time read at the same moment
//! ([`WallClock::now`], once per process) and maps between the two. The mapping is exact for
//! whole milliseconds from the anchor; sub-millisecond parts are truncated. Conversions never
//! read a clock themselves, and the state machine's `apply` never converts times at all: it
//! stores the milliseconds as proposed.
//!
//! # What is not carried
//!
//! * [`Message::properties`]: `message_expiry_interval`, `topic_alias` and
//!   `subscription_identifiers` are per-connection or kept elsewhere (expiry as
//!   [`Message::expires_at`]) and are never set on a stored message; they are dropped.
//! * `SessionOpened.node_id` and `SessionDetached.at_ms` have no field in [`StateChange`]: they
//!   come from the [`ProposalContext`] given to [`encode_batch_with`] / [`change_to_proto_with`]
//!   (0 = unknown with [`encode_batch`] / [`change_to_proto`]) and are dropped when decoding.
//!
//! # Validation
//!
//! Decoding checks what the domain types cannot represent (QoS > 2, retain handling > 2, packet
//! id > 65535, unknown detach kind, missing required sub-messages, an empty or unknown
//! `oneof change`) and reports the field in a [`ConvertError`]. [`validate_change`] performs
//! exactly these checks without converting (and without a clock), for the state machine.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message as _;
use raftmq_codec::{ByteStr, PublishProperties, QoS, RetainHandling, SubscriptionOptions};
use raftmq_core::durability::{
    DetachRecord, Fence, MessageId, StateChange, StoredTarget, WillRecord,
};
use raftmq_core::message::Message;
use raftmq_core::session::SubEntry;
use raftmq_proto::state;
use raftmq_proto::state::change::Change as ProtoChange;

pub use prost::DecodeError;

/// A monotonic [`Instant`] and the wall-clock time (Unix milliseconds) of the same moment: the
/// anchor for converting between the two.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WallClock {
    instant: Instant,
    unix_ms: u64,
}

impl WallClock {
    /// Reads both clocks now. Call once (per process) and share the result, so that every
    /// conversion uses the same anchor. Never call it from the state machine's `apply`.
    pub fn now() -> WallClock {
        let instant = Instant::now();
        let unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, duration_ms);
        WallClock { instant, unix_ms }
    }

    /// A clock anchored at `instant` = `unix_ms` (tests, or a known anchor).
    pub fn from_parts(instant: Instant, unix_ms: u64) -> WallClock {
        WallClock { instant, unix_ms }
    }

    /// The anchor instant.
    pub fn instant(&self) -> Instant {
        self.instant
    }

    /// The wall-clock time of the anchor, in milliseconds since the Unix epoch.
    pub fn unix_ms(&self) -> u64 {
        self.unix_ms
    }

    /// The wall-clock time of `at` (saturating at 0 and `u64::MAX`).
    pub fn to_unix_ms(&self, at: Instant) -> u64 {
        if at >= self.instant {
            self.unix_ms
                .saturating_add(duration_ms(at.duration_since(self.instant)))
        } else {
            self.unix_ms
                .saturating_sub(duration_ms(self.instant.duration_since(at)))
        }
    }

    /// The instant of wall-clock time `unix_ms`. Times further in the past than the monotonic
    /// clock can express map to the anchor; times further in the future than it can express map
    /// to the latest instant it can (far beyond any expiry).
    pub fn to_instant(&self, unix_ms: u64) -> Instant {
        if unix_ms >= self.unix_ms {
            let ahead = Duration::from_millis(unix_ms - self.unix_ms);
            self.instant
                .checked_add(ahead)
                .unwrap_or_else(|| far_future(self.instant, ahead))
        } else {
            let behind = Duration::from_millis(self.unix_ms - unix_ms);
            self.instant.checked_sub(behind).unwrap_or(self.instant)
        }
    }
}

/// Whole milliseconds of `d`, saturating.
fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The latest instant after `base` (at most `base + wanted`) that the platform can represent.
fn far_future(base: Instant, wanted: Duration) -> Instant {
    let mut step = wanted;
    let mut at = base;
    while !step.is_zero() {
        if let Some(next) = at.checked_add(step) {
            at = next;
        } else {
            step /= 2;
        }
    }
    at
}

/// Who proposes a batch, and when: the parts of the protobuf form that [`StateChange`] does not
/// carry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProposalContext {
    /// The proposing node, recorded as `SessionOpened.node_id` (session ownership).
    pub node_id: u64,
    /// The time of the proposal, recorded as `SessionDetached.at_ms` (converted with the
    /// [`WallClock`]); `None` records 0 (unknown).
    pub now: Option<Instant>,
}

/// A protobuf message that cannot be converted into the domain type.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// A required sub-message is absent.
    #[error("missing field `{0}`")]
    Missing(&'static str),
    /// The `oneof change` is empty: a change kind this version does not know (or a corrupt one).
    #[error("unknown or empty change")]
    UnknownChange,
    /// A QoS above 2.
    #[error("field `{field}`: invalid QoS {value}")]
    InvalidQos { field: &'static str, value: u32 },
    /// A retain handling above 2.
    #[error("field `{field}`: invalid retain handling {value}")]
    InvalidRetainHandling { field: &'static str, value: u32 },
    /// A packet id above 65535.
    #[error("field `{field}`: packet id {value} out of range")]
    InvalidPacketId { field: &'static str, value: u32 },
    /// An unknown `DetachHow`.
    #[error("field `{field}`: unknown detach kind {value}")]
    InvalidDetachHow { field: &'static str, value: i32 },
    /// A change of the store's own bookkeeping (`PublishSettled`), with no broker form.
    #[error("a change of the store's own bookkeeping")]
    StoreOnly,
    /// A fenced range outside the batch's changes, out of order or overlapping another.
    #[error("fenced range of {count} changes from {first} is not within the batch")]
    InvalidFence { first: u32, count: u32 },
}

// ---------------------------------------------------------------------------------------------
// Batches
// ---------------------------------------------------------------------------------------------

/// The shard of every batch until the cluster is sharded: the one data group,
/// [`DATA_SHARD`](crate::types::DATA_SHARD).
pub const SHARD_ID: u64 = crate::types::DATA_SHARD.get() as u64;

/// Encodes `changes` as a `raftmq.state.v1.Batch` (of [`SHARD_ID`]), the payload of one log
/// entry.
/// `SessionOpened.node_id` and `SessionDetached.at_ms` are 0 (see [`encode_batch_with`]).
pub fn encode_batch(changes: &[StateChange], clock: &WallClock) -> Vec<u8> {
    encode_batch_with(changes, clock, &ProposalContext::default())
}

/// [`encode_batch`] for shard `shard`.
pub fn encode_shard_batch(
    shard: crate::types::ShardId,
    changes: &[StateChange],
    clock: &WallClock,
) -> Vec<u8> {
    encode_batch_of(
        u64::from(shard.get()),
        changes,
        &[],
        clock,
        &ProposalContext::default(),
    )
}

/// [`encode_batch`] recording the proposer's node id and the proposal time.
pub fn encode_batch_with(
    changes: &[StateChange],
    clock: &WallClock,
    ctx: &ProposalContext,
) -> Vec<u8> {
    encode_fenced_batch(changes, &[], clock, ctx)
}

/// A fenced range of a batch: `changes[first .. first + count]` take effect only if `fence`
/// holds when the batch is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FencedRange {
    pub fence: Fence,
    pub first: u32,
    pub count: u32,
}

/// [`encode_batch_with`] with fenced ranges (`Batch.fences`).
pub fn encode_fenced_batch(
    changes: &[StateChange],
    fences: &[FencedRange],
    clock: &WallClock,
    ctx: &ProposalContext,
) -> Vec<u8> {
    encode_batch_of(SHARD_ID, changes, fences, clock, ctx)
}

/// The one encoder behind the others: a batch of shard `shard_id`.
fn encode_batch_of(
    shard_id: u64,
    changes: &[StateChange],
    fences: &[FencedRange],
    clock: &WallClock,
    ctx: &ProposalContext,
) -> Vec<u8> {
    state::Batch {
        shard_id,
        changes: changes
            .iter()
            .map(|c| change_to_proto_with(c, clock, ctx))
            .collect(),
        origin_node: ctx.node_id,
        fences: fences.iter().map(fence_to_proto).collect(),
    }
    .encode_to_vec()
}

pub(crate) fn fence_to_proto(range: &FencedRange) -> state::Fence {
    let (client_id, epoch, offline) = match &range.fence {
        Fence::Attached { client_id, epoch } => (client_id, *epoch, false),
        Fence::Offline { client_id, epoch } => (client_id, *epoch, true),
    };
    state::Fence {
        client_id: client_id.to_string(),
        epoch,
        offline,
        first: range.first,
        count: range.count,
    }
}

/// Checks that a batch's fenced ranges lie within its changes, in order and without overlap.
pub fn validate_fences(batch: &state::Batch) -> Result<(), ConvertError> {
    let mut next = 0u64;
    for f in &batch.fences {
        let (first, end) = (u64::from(f.first), u64::from(f.first) + u64::from(f.count));
        if first < next || end > batch.changes.len() as u64 {
            return Err(ConvertError::InvalidFence {
                first: f.first,
                count: f.count,
            });
        }
        next = end;
    }
    Ok(())
}

/// Decodes the bytes of a `raftmq.state.v1.Batch`.
pub fn decode_batch(bytes: &[u8]) -> Result<state::Batch, DecodeError> {
    state::Batch::decode(bytes)
}

/// The domain changes of a decoded batch (all of them, or the first error).
pub fn batch_from_proto(
    batch: state::Batch,
    clock: &WallClock,
) -> Result<Vec<StateChange>, ConvertError> {
    batch
        .changes
        .into_iter()
        .map(|c| change_from_proto(c, clock))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Changes
// ---------------------------------------------------------------------------------------------

/// The protobuf form of `change` (`node_id` and `at_ms` 0, see [`change_to_proto_with`]).
pub fn change_to_proto(change: &StateChange, clock: &WallClock) -> state::Change {
    change_to_proto_with(change, clock, &ProposalContext::default())
}

/// The protobuf form of `change`, with the proposer's node id and time from `ctx`.
pub fn change_to_proto_with(
    change: &StateChange,
    clock: &WallClock,
    ctx: &ProposalContext,
) -> state::Change {
    let change = match change {
        StateChange::SessionOpened {
            client_id,
            epoch,
            clean_start,
            expiry_secs,
            will,
        } => ProtoChange::SessionOpened(state::SessionOpened {
            client_id: client_id.to_string(),
            epoch: *epoch,
            clean_start: *clean_start,
            expiry_secs: *expiry_secs,
            will: will.as_ref().map(|w| will_to_proto(w, clock)),
            node_id: ctx.node_id,
        }),
        StateChange::SessionDetached {
            client_id,
            epoch,
            how,
            expiry_secs,
        } => ProtoChange::SessionDetached(state::SessionDetached {
            client_id: client_id.to_string(),
            epoch: *epoch,
            how: detach_to_proto(*how).into(),
            expiry_secs: *expiry_secs,
            at_ms: ctx.now.map_or(0, |now| clock.to_unix_ms(now)),
        }),
        StateChange::SessionEnded { client_id } => ProtoChange::SessionEnded(state::SessionEnded {
            client_id: client_id.to_string(),
        }),
        StateChange::Subscribed {
            client_id,
            filter,
            entry,
        } => ProtoChange::Subscribed(state::Subscribed {
            client_id: client_id.to_string(),
            filter: filter.to_string(),
            entry: Some(sub_entry_to_proto(entry)),
        }),
        StateChange::Unsubscribed { client_id, filter } => {
            ProtoChange::Unsubscribed(state::Unsubscribed {
                client_id: client_id.to_string(),
                filter: filter.to_string(),
            })
        }
        StateChange::WillPublished { client_id } => {
            ProtoChange::WillPublished(state::WillPublished {
                client_id: client_id.to_string(),
            })
        }
        StateChange::MessageStored {
            id,
            message,
            targets,
        } => ProtoChange::MessageStored(state::MessageStored {
            id: id.0,
            message: Some(message_to_proto(message, clock)),
            targets: targets.iter().map(target_to_proto).collect(),
            dedupe: false,
            at_ms: 0,
        }),
        StateChange::MessageSent {
            client_id,
            id,
            packet_id,
        } => ProtoChange::MessageSent(state::MessageSent {
            client_id: client_id.to_string(),
            id: id.0,
            packet_id: u32::from(*packet_id),
        }),
        StateChange::MessageAcked { client_id, id } => {
            ProtoChange::MessageAcked(state::MessageAcked {
                client_id: client_id.to_string(),
                id: id.0,
            })
        }
        StateChange::MessageReleased { client_id, id } => {
            ProtoChange::MessageReleased(state::MessageReleased {
                client_id: client_id.to_string(),
                id: id.0,
            })
        }
        // The message id is kept only by a store that cannot record the message atomically
        // with the packet id (`RaftDurability` sets it for a store spanning shards).
        StateChange::IncomingQos2Received {
            client_id,
            packet_id,
            message_id: _,
        } => ProtoChange::IncomingQos2Received(state::IncomingQos2Received {
            client_id: client_id.to_string(),
            packet_id: u32::from(*packet_id),
            message_id: 0,
            shards: Vec::new(),
        }),
        StateChange::IncomingQos2Completed {
            client_id,
            packet_id,
        } => ProtoChange::IncomingQos2Completed(state::IncomingQos2Completed {
            client_id: client_id.to_string(),
            packet_id: u32::from(*packet_id),
        }),
        StateChange::RetainedSet { message } => ProtoChange::RetainedSet(state::RetainedSet {
            message: Some(message_to_proto(message, clock)),
        }),
        StateChange::RetainedCleared { topic } => {
            ProtoChange::RetainedCleared(state::RetainedCleared {
                topic: topic.to_string(),
            })
        }
        StateChange::NodeDown { node, seen, wills } => ProtoChange::NodeDown(state::NodeDown {
            node: *node,
            at_ms: ctx.now.map_or(0, |now| clock.to_unix_ms(now)),
            seen: *seen,
            wills: wills.iter().flatten().map(|w| w.to_string()).collect(),
            lists_wills: wills.is_some(),
        }),
    };
    state::Change {
        change: Some(change),
    }
}

/// The domain form of a protobuf change.
pub fn change_from_proto(
    change: state::Change,
    clock: &WallClock,
) -> Result<StateChange, ConvertError> {
    Ok(match change.change.ok_or(ConvertError::UnknownChange)? {
        ProtoChange::SessionOpened(c) => StateChange::SessionOpened {
            client_id: c.client_id.into(),
            epoch: c.epoch,
            clean_start: c.clean_start,
            expiry_secs: c.expiry_secs,
            will: c.will.map(|w| will_from_proto(w, clock)).transpose()?,
        },
        ProtoChange::SessionDetached(c) => StateChange::SessionDetached {
            client_id: c.client_id.into(),
            epoch: c.epoch,
            how: detach_from_proto(c.how)?,
            expiry_secs: c.expiry_secs,
        },
        ProtoChange::SessionEnded(c) => StateChange::SessionEnded {
            client_id: c.client_id.into(),
        },
        ProtoChange::WillPublished(c) => StateChange::WillPublished {
            client_id: c.client_id.into(),
        },
        ProtoChange::Subscribed(c) => StateChange::Subscribed {
            client_id: c.client_id.into(),
            filter: Arc::from(c.filter),
            entry: sub_entry_from_proto(&required(c.entry, "subscribed.entry")?)?,
        },
        ProtoChange::Unsubscribed(c) => StateChange::Unsubscribed {
            client_id: c.client_id.into(),
            filter: Arc::from(c.filter),
        },
        ProtoChange::MessageStored(c) => StateChange::MessageStored {
            id: MessageId(c.id),
            message: Arc::new(message_from_proto(
                required(c.message, "message_stored.message")?,
                clock,
            )?),
            targets: c
                .targets
                .into_iter()
                .map(target_from_proto)
                .collect::<Result<_, _>>()?,
        },
        ProtoChange::MessageSent(c) => StateChange::MessageSent {
            client_id: c.client_id.into(),
            id: MessageId(c.id),
            packet_id: packet_id(c.packet_id, "message_sent.packet_id")?,
        },
        ProtoChange::MessageAcked(c) => StateChange::MessageAcked {
            client_id: c.client_id.into(),
            id: MessageId(c.id),
        },
        ProtoChange::MessageReleased(c) => StateChange::MessageReleased {
            client_id: c.client_id.into(),
            id: MessageId(c.id),
        },
        ProtoChange::IncomingQos2Received(c) => StateChange::IncomingQos2Received {
            client_id: c.client_id.into(),
            packet_id: packet_id(c.packet_id, "incoming_qos2_received.packet_id")?,
            message_id: (c.message_id != 0).then_some(MessageId(c.message_id)),
        },
        ProtoChange::IncomingQos2Completed(c) => StateChange::IncomingQos2Completed {
            client_id: c.client_id.into(),
            packet_id: packet_id(c.packet_id, "incoming_qos2_completed.packet_id")?,
        },
        ProtoChange::RetainedSet(c) => StateChange::RetainedSet {
            message: Arc::new(message_from_proto(
                required(c.message, "retained_set.message")?,
                clock,
            )?),
        },
        ProtoChange::RetainedCleared(c) => StateChange::RetainedCleared {
            topic: c.topic.into(),
        },
        ProtoChange::NodeDown(c) => StateChange::NodeDown {
            node: c.node,
            seen: c.seen,
            wills: c
                .lists_wills
                .then(|| c.wills.into_iter().map(ByteStr::from).collect()),
        },
        ProtoChange::PublishSettled(_) => return Err(ConvertError::StoreOnly),
    })
}

/// Checks that [`change_from_proto`] would accept `change`, without converting it (and
/// without a clock): the state machine validates a whole batch before applying any of it.
pub fn validate_change(change: &state::Change) -> Result<(), ConvertError> {
    match change.change.as_ref().ok_or(ConvertError::UnknownChange)? {
        ProtoChange::SessionOpened(c) => {
            if let Some(w) = &c.will {
                validate_will(w)?;
            }
        }
        ProtoChange::SessionDetached(c) => {
            detach_from_proto(c.how)?;
        }
        ProtoChange::Subscribed(c) => {
            sub_entry_from_proto(required_ref(c.entry.as_ref(), "subscribed.entry")?)?;
        }
        ProtoChange::MessageStored(c) => {
            validate_message(required_ref(c.message.as_ref(), "message_stored.message")?)?;
            for t in &c.targets {
                qos(t.qos, "target.qos")?;
            }
        }
        ProtoChange::MessageSent(c) => {
            packet_id(c.packet_id, "message_sent.packet_id")?;
        }
        ProtoChange::IncomingQos2Received(c) => {
            packet_id(c.packet_id, "incoming_qos2_received.packet_id")?;
        }
        ProtoChange::IncomingQos2Completed(c) => {
            packet_id(c.packet_id, "incoming_qos2_completed.packet_id")?;
        }
        ProtoChange::RetainedSet(c) => {
            validate_message(required_ref(c.message.as_ref(), "retained_set.message")?)?;
        }
        ProtoChange::SessionEnded(_)
        | ProtoChange::WillPublished(_)
        | ProtoChange::Unsubscribed(_)
        | ProtoChange::MessageAcked(_)
        | ProtoChange::MessageReleased(_)
        | ProtoChange::RetainedCleared(_)
        | ProtoChange::NodeDown(_)
        | ProtoChange::PublishSettled(_) => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Parts
// ---------------------------------------------------------------------------------------------

/// The protobuf form of a message (times as Unix milliseconds through `clock`).
pub fn message_to_proto(message: &Message, clock: &WallClock) -> state::Message {
    let p = &message.properties;
    state::Message {
        topic: message.topic.to_string(),
        payload: message.payload.clone(),
        qos: u32::from(message.qos.as_u8()),
        retain: message.retain,
        payload_format_utf8: p.payload_format_indicator,
        content_type: p.content_type.as_ref().map(ToString::to_string),
        response_topic: p.response_topic.as_ref().map(ToString::to_string),
        correlation_data: p.correlation_data.clone(),
        user_properties: p
            .user_properties
            .iter()
            .map(|(key, value)| state::UserProperty {
                key: key.to_string(),
                value: value.to_string(),
            })
            .collect(),
        expires_at_ms: message.expires_at.map(|at| clock.to_unix_ms(at)),
        received_at_ms: clock.to_unix_ms(message.received_at),
        origin: message.origin.as_ref().map(ToString::to_string),
    }
}

/// The domain form of a protobuf message.
pub fn message_from_proto(
    message: state::Message,
    clock: &WallClock,
) -> Result<Message, ConvertError> {
    Ok(Message {
        topic: message.topic.into(),
        payload: message.payload,
        qos: qos(message.qos, "message.qos")?,
        retain: message.retain,
        properties: PublishProperties {
            payload_format_indicator: message.payload_format_utf8,
            content_type: message.content_type.map(ByteStr::from),
            response_topic: message.response_topic.map(ByteStr::from),
            correlation_data: message.correlation_data,
            user_properties: message
                .user_properties
                .into_iter()
                .map(|p| (ByteStr::from(p.key), ByteStr::from(p.value)))
                .collect(),
            ..PublishProperties::default()
        },
        expires_at: message.expires_at_ms.map(|ms| clock.to_instant(ms)),
        received_at: clock.to_instant(message.received_at_ms),
        origin: message.origin.map(ByteStr::from),
    })
}

fn validate_message(message: &state::Message) -> Result<(), ConvertError> {
    qos(message.qos, "message.qos").map(drop)
}

/// The protobuf form of a will.
pub fn will_to_proto(will: &WillRecord, clock: &WallClock) -> state::Will {
    state::Will {
        message: Some(message_to_proto(&will.message, clock)),
        delay_secs: will.delay_secs,
        message_expiry_secs: will.message_expiry_secs,
    }
}

/// The domain form of a protobuf will.
pub fn will_from_proto(will: state::Will, clock: &WallClock) -> Result<WillRecord, ConvertError> {
    Ok(WillRecord {
        message: Arc::new(message_from_proto(
            required(will.message, "will.message")?,
            clock,
        )?),
        delay_secs: will.delay_secs,
        message_expiry_secs: will.message_expiry_secs,
    })
}

/// Checks that [`will_from_proto`] would accept `will`.
pub fn validate_will(will: &state::Will) -> Result<(), ConvertError> {
    validate_message(required_ref(will.message.as_ref(), "will.message")?)
}

/// The protobuf form of a subscription entry.
pub fn sub_entry_to_proto(entry: &SubEntry) -> state::SubEntry {
    state::SubEntry {
        qos: u32::from(entry.options.qos.as_u8()),
        no_local: entry.options.no_local,
        retain_as_published: entry.options.retain_as_published,
        retain_handling: entry.options.retain_handling as u32,
        subscription_id: entry.subscription_id,
    }
}

/// The domain form of a protobuf subscription entry.
pub fn sub_entry_from_proto(entry: &state::SubEntry) -> Result<SubEntry, ConvertError> {
    Ok(SubEntry {
        options: SubscriptionOptions {
            qos: qos(entry.qos, "sub_entry.qos")?,
            no_local: entry.no_local,
            retain_as_published: entry.retain_as_published,
            retain_handling: retain_handling(entry.retain_handling)?,
        },
        subscription_id: entry.subscription_id,
    })
}

/// The protobuf form of a stored message's target.
pub fn target_to_proto(target: &StoredTarget) -> state::StoredTarget {
    state::StoredTarget {
        client_id: target.client_id.to_string(),
        qos: u32::from(target.qos.as_u8()),
        retain: target.retain,
        subscription_ids: target.subscription_ids.to_vec(),
    }
}

/// The domain form of a protobuf target.
pub fn target_from_proto(target: state::StoredTarget) -> Result<StoredTarget, ConvertError> {
    Ok(StoredTarget {
        client_id: target.client_id.into(),
        qos: qos(target.qos, "target.qos")?,
        retain: target.retain,
        subscription_ids: target.subscription_ids.into_iter().collect(),
    })
}

/// The protobuf form of a detach kind.
pub fn detach_to_proto(how: DetachRecord) -> state::DetachHow {
    match how {
        DetachRecord::Normal => state::DetachHow::Normal,
        DetachRecord::WillPublished => state::DetachHow::WillPublished,
        DetachRecord::Abnormal => state::DetachHow::Abnormal,
    }
}

/// The domain form of a protobuf detach kind (`SessionDetached.how`).
pub fn detach_from_proto(how: i32) -> Result<DetachRecord, ConvertError> {
    match state::DetachHow::try_from(how) {
        Ok(state::DetachHow::Normal) => Ok(DetachRecord::Normal),
        Ok(state::DetachHow::WillPublished) => Ok(DetachRecord::WillPublished),
        Ok(state::DetachHow::Abnormal) => Ok(DetachRecord::Abnormal),
        Err(_) => Err(ConvertError::InvalidDetachHow {
            field: "session_detached.how",
            value: how,
        }),
    }
}

/// A QoS from its protobuf value.
pub fn qos(value: u32, field: &'static str) -> Result<QoS, ConvertError> {
    u8::try_from(value)
        .ok()
        .and_then(QoS::from_u8)
        .ok_or(ConvertError::InvalidQos { field, value })
}

/// A packet id from its protobuf value.
pub fn packet_id(value: u32, field: &'static str) -> Result<u16, ConvertError> {
    u16::try_from(value).map_err(|_| ConvertError::InvalidPacketId { field, value })
}

fn retain_handling(value: u32) -> Result<RetainHandling, ConvertError> {
    match value {
        0 => Ok(RetainHandling::SendAtSubscribe),
        1 => Ok(RetainHandling::SendIfNew),
        2 => Ok(RetainHandling::DoNotSend),
        _ => Err(ConvertError::InvalidRetainHandling {
            field: "sub_entry.retain_handling",
            value,
        }),
    }
}

fn required<T>(value: Option<T>, field: &'static str) -> Result<T, ConvertError> {
    value.ok_or(ConvertError::Missing(field))
}

fn required_ref<'a, T>(value: Option<&'a T>, field: &'static str) -> Result<&'a T, ConvertError> {
    value.ok_or(ConvertError::Missing(field))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> WallClock {
        WallClock::from_parts(Instant::now(), 1_700_000_000_000)
    }

    #[test]
    fn wall_clock_maps_whole_milliseconds_both_ways() {
        let c = clock();
        assert_eq!(c.to_unix_ms(c.instant()), c.unix_ms());
        let later = c.instant() + Duration::from_millis(1234);
        assert_eq!(c.to_unix_ms(later), c.unix_ms() + 1234);
        assert_eq!(c.to_instant(c.unix_ms() + 1234), later);
        if let Some(earlier) = c.instant().checked_sub(Duration::from_millis(5)) {
            assert_eq!(c.to_unix_ms(earlier), c.unix_ms() - 5);
            assert_eq!(c.to_instant(c.unix_ms() - 5), earlier);
        }
    }

    #[test]
    fn wall_clock_saturates() {
        let c = clock();
        // Long before the anchor: the anchor if the platform cannot go that far back.
        let early = c.to_instant(0);
        assert!(early == c.instant() || c.to_unix_ms(early) == 0);
        // Far future: some instant after the anchor, no panic.
        assert!(c.to_instant(u64::MAX) > c.instant());
        assert_eq!(
            c.to_unix_ms(c.to_instant(c.unix_ms() + 10)),
            c.unix_ms() + 10
        );
    }

    #[test]
    fn invalid_fields_are_named() {
        let c = clock();
        let bad_qos = state::Change {
            change: Some(ProtoChange::RetainedSet(state::RetainedSet {
                message: Some(state::Message {
                    qos: 3,
                    ..Default::default()
                }),
            })),
        };
        let err = ConvertError::InvalidQos {
            field: "message.qos",
            value: 3,
        };
        assert_eq!(validate_change(&bad_qos), Err(err.clone()));
        assert_eq!(change_from_proto(bad_qos, &c), Err(err));

        let missing = state::Change {
            change: Some(ProtoChange::MessageStored(state::MessageStored::default())),
        };
        let err = ConvertError::Missing("message_stored.message");
        assert_eq!(validate_change(&missing), Err(err.clone()));
        assert_eq!(change_from_proto(missing, &c), Err(err));

        let empty = state::Change { change: None };
        assert_eq!(validate_change(&empty), Err(ConvertError::UnknownChange));
        assert_eq!(
            change_from_proto(empty, &c),
            Err(ConvertError::UnknownChange)
        );

        let pid = state::Change {
            change: Some(ProtoChange::MessageSent(state::MessageSent {
                packet_id: 70_000,
                ..Default::default()
            })),
        };
        assert!(matches!(
            validate_change(&pid),
            Err(ConvertError::InvalidPacketId { value: 70_000, .. })
        ));
        let how = state::Change {
            change: Some(ProtoChange::SessionDetached(state::SessionDetached {
                how: 9,
                ..Default::default()
            })),
        };
        assert!(matches!(
            change_from_proto(how, &c),
            Err(ConvertError::InvalidDetachHow { value: 9, .. })
        ));
    }

    #[test]
    fn context_fills_node_id_and_detach_time() {
        let c = clock();
        let ctx = ProposalContext {
            node_id: 7,
            now: Some(c.instant() + Duration::from_millis(20)),
        };
        let opened = change_to_proto_with(
            &StateChange::SessionOpened {
                client_id: "a".into(),
                epoch: 1,
                clean_start: false,
                expiry_secs: 5,
                will: None,
            },
            &c,
            &ctx,
        );
        assert!(matches!(
            opened.change,
            Some(ProtoChange::SessionOpened(state::SessionOpened {
                node_id: 7,
                ..
            }))
        ));
        let detached = change_to_proto_with(
            &StateChange::SessionDetached {
                client_id: "a".into(),
                epoch: 1,
                how: DetachRecord::Abnormal,
                expiry_secs: 5,
            },
            &c,
            &ctx,
        );
        let Some(ProtoChange::SessionDetached(d)) = detached.change else {
            panic!("not a detach");
        };
        assert_eq!(d.at_ms, c.unix_ms() + 20);
        assert_eq!(d.how, state::DetachHow::Abnormal as i32);
    }
}
