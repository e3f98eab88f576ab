//! The replicated state machine against the core's reference model (`StateImage`), plus the
//! protobuf round trip, determinism, snapshots, restarts, skipped entries and openraft's
//! storage test suite.

use std::collections::HashMap;
use std::io::Cursor;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use openraft::storage::RaftStateMachine;
use openraft::testing::{StoreBuilder, Suite, log_id};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, RaftSnapshotBuilder};
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use prost::Message as _;
use raftmq_cluster::convert::{
    self, FencedRange, ProposalContext, SHARD_ID, WallClock, batch_from_proto, change_from_proto,
    change_to_proto, decode_batch, encode_batch, encode_fenced_batch,
};
use raftmq_cluster::state_machine::StateMachine;
use raftmq_cluster::types::{DATA_SHARD, Entry, LogId, Request, StorageError, TypeConfig};
use raftmq_codec::{ByteStr, PublishProperties, QoS, RetainHandling, SubscriptionOptions};
use raftmq_core::durability::{
    DetachRecord, Fence, MessageId, StateChange, StateImage, StoredTarget, WillRecord,
};
use raftmq_core::message::Message;
use raftmq_core::session::SubEntry;
use raftmq_proto::state;
use raftmq_store::{LogStore, StateBatch, StateCf, StateDb, Store};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------------
// Clock and fixtures
// ---------------------------------------------------------------------------------------------

const ANCHOR_UNIX_MS: u64 = 1_700_000_000_000;

/// An anchor an hour ahead, so that anchor − 10 s is always representable.
fn anchor() -> Instant {
    static ANCHOR: OnceLock<Instant> = OnceLock::new();
    *ANCHOR.get_or_init(|| Instant::now() + Duration::from_secs(3600))
}

/// The fixed clock every conversion of these tests uses.
fn clock() -> WallClock {
    WallClock::from_parts(anchor(), ANCHOR_UNIX_MS)
}

/// The anchor ± whole milliseconds (round-trips exactly through the protobuf form).
fn at(offset_ms: i64) -> Instant {
    let d = Duration::from_millis(offset_ms.unsigned_abs());
    if offset_ms >= 0 {
        anchor() + d
    } else {
        anchor() - d
    }
}

/// Proptest cases: `default`, or `PROPTEST_CASES` when set (for deeper runs).
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn open(dir: &TempDir) -> Store {
    Store::open(dir.path()).expect("open store")
}

/// A store in a new temporary directory (kept as long as the directory is).
fn temp_store() -> (TempDir, Store) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    (dir, store)
}

/// Deletes everything, to reuse one store across proptest cases.
fn clear(db: &StateDb) {
    let mut batch = StateBatch::new();
    for cf in StateCf::ALL {
        batch.clear(cf);
    }
    db.write(batch).expect("clear");
}

fn count(db: &StateDb, cf: StateCf) -> usize {
    db.scan_prefix(cf, b"").count()
}

fn normal(index: u64, batch: Vec<u8>) -> Entry {
    Entry {
        log_id: log_id(1, 0, index),
        payload: EntryPayload::Normal(Request { batch }),
    }
}

fn blank(index: u64) -> Entry {
    Entry {
        log_id: log_id(1, 0, index),
        payload: EntryPayload::Blank,
    }
}

fn msg(topic: &str, payload: &'static str, qos: QoS) -> Arc<Message> {
    Arc::new(Message {
        topic: topic.into(),
        payload: Bytes::from_static(payload.as_bytes()),
        qos,
        retain: false,
        properties: PublishProperties::default(),
        expires_at: Some(at(5000)),
        received_at: at(-20),
        origin: Some("pub".into()),
    })
}

fn target(client: &str, qos: QoS) -> StoredTarget {
    StoredTarget {
        client_id: client.into(),
        qos,
        retain: false,
        subscription_ids: [7].into_iter().collect(),
    }
}

fn opened(client: &str, clean_start: bool) -> StateChange {
    StateChange::SessionOpened {
        client_id: client.into(),
        epoch: 1,
        clean_start,
        expiry_secs: 60,
        will: None,
    }
}

// ---------------------------------------------------------------------------------------------
// Strategies: a small universe, so that changes collide often
// ---------------------------------------------------------------------------------------------

fn client() -> impl Strategy<Value = ByteStr> {
    prop_oneof![Just("a"), Just("b"), Just("c")].prop_map(ByteStr::from)
}

fn filter() -> impl Strategy<Value = Arc<str>> {
    prop_oneof![Just("t/1"), Just("t/+"), Just("#")].prop_map(Arc::from)
}

fn topic() -> impl Strategy<Value = ByteStr> {
    prop_oneof![Just("t/1"), Just("t/2"), Just("t/3")].prop_map(ByteStr::from)
}

fn message_id() -> impl Strategy<Value = MessageId> {
    (1u64..10).prop_map(MessageId)
}

fn packet_id() -> impl Strategy<Value = u16> {
    1u16..5
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn instant() -> impl Strategy<Value = Instant> {
    (-10_000i64..10_000).prop_map(at)
}

fn short_str() -> impl Strategy<Value = ByteStr> {
    "[a-z]{0,4}".prop_map(ByteStr::from)
}

/// Only the properties a stored message carries (see `convert`'s docs).
fn properties() -> impl Strategy<Value = PublishProperties> {
    (
        option::of(any::<bool>()),
        option::of(short_str()),
        option::of(topic()),
        option::of(vec(any::<u8>(), 0..4)),
        vec((short_str(), short_str()), 0..3),
    )
        .prop_map(
            |(payload_format_indicator, content_type, response_topic, correlation, user)| {
                PublishProperties {
                    payload_format_indicator,
                    content_type,
                    response_topic,
                    correlation_data: correlation.map(Bytes::from),
                    user_properties: user,
                    ..PublishProperties::default()
                }
            },
        )
}

fn message() -> impl Strategy<Value = Arc<Message>> {
    (
        topic(),
        vec(any::<u8>(), 0..8),
        qos(),
        any::<bool>(),
        properties(),
        option::of(instant()),
        instant(),
        option::of(client()),
    )
        .prop_map(
            |(topic, payload, qos, retain, properties, expires_at, received_at, origin)| {
                Arc::new(Message {
                    topic,
                    payload: Bytes::from(payload),
                    qos,
                    retain,
                    properties,
                    expires_at,
                    received_at,
                    origin,
                })
            },
        )
}

fn will() -> impl Strategy<Value = WillRecord> {
    (message(), 0u32..100, option::of(0u32..100)).prop_map(
        |(message, delay_secs, message_expiry_secs)| WillRecord {
            message,
            delay_secs,
            message_expiry_secs,
        },
    )
}

fn sub_entry() -> impl Strategy<Value = SubEntry> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        prop_oneof![
            Just(RetainHandling::SendAtSubscribe),
            Just(RetainHandling::SendIfNew),
            Just(RetainHandling::DoNotSend)
        ],
        option::of(1u32..1000),
    )
        .prop_map(
            |(qos, no_local, retain_as_published, retain_handling, subscription_id)| SubEntry {
                options: SubscriptionOptions {
                    qos,
                    no_local,
                    retain_as_published,
                    retain_handling,
                },
                subscription_id,
            },
        )
}

fn stored_target() -> impl Strategy<Value = StoredTarget> {
    (client(), qos(), any::<bool>(), vec(1u32..100, 0..3)).prop_map(
        |(client_id, qos, retain, ids)| StoredTarget {
            client_id,
            qos,
            retain,
            subscription_ids: ids.into_iter().collect(),
        },
    )
}

fn detach() -> impl Strategy<Value = DetachRecord> {
    prop_oneof![
        Just(DetachRecord::Normal),
        Just(DetachRecord::WillPublished),
        Just(DetachRecord::Abnormal)
    ]
}

fn change() -> impl Strategy<Value = StateChange> {
    prop_oneof![
        4 => (client(), 0u64..4, any::<bool>(), 0u32..3, option::of(will())).prop_map(
            |(client_id, epoch, clean_start, expiry_secs, will)| StateChange::SessionOpened {
                client_id,
                epoch,
                clean_start,
                expiry_secs,
                will,
            }
        ),
        1 => (client(), 0u64..4, detach(), 0u32..3).prop_map(
            |(client_id, epoch, how, expiry_secs)| StateChange::SessionDetached {
                client_id,
                epoch,
                how,
                expiry_secs,
            }
        ),
        1 => client().prop_map(|client_id| StateChange::SessionEnded { client_id }),
        1 => client().prop_map(|client_id| StateChange::WillPublished { client_id }),
        2 => (client(), filter(), sub_entry()).prop_map(|(client_id, filter, entry)| {
            StateChange::Subscribed {
                client_id,
                filter,
                entry,
            }
        }),
        1 => (client(), filter())
            .prop_map(|(client_id, filter)| StateChange::Unsubscribed { client_id, filter }),
        4 => (message_id(), message(), vec(stored_target(), 0..4)).prop_map(
            |(id, message, targets)| StateChange::MessageStored {
                id,
                message,
                targets,
            }
        ),
        2 => (client(), message_id(), packet_id()).prop_map(|(client_id, id, packet_id)| {
            StateChange::MessageSent {
                client_id,
                id,
                packet_id,
            }
        }),
        3 => (client(), message_id())
            .prop_map(|(client_id, id)| StateChange::MessageAcked { client_id, id }),
        1 => (client(), message_id())
            .prop_map(|(client_id, id)| StateChange::MessageReleased { client_id, id }),
        1 => (client(), packet_id()).prop_map(|(client_id, packet_id)| {
            // The message id is not carried by a single-shard batch (see `convert`).
            StateChange::IncomingQos2Received {
                client_id,
                packet_id,
                message_id: None,
            }
        }),
        1 => (client(), packet_id()).prop_map(|(client_id, packet_id)| {
            StateChange::IncomingQos2Completed {
                client_id,
                packet_id,
            }
        }),
        1 => message().prop_map(|message| StateChange::RetainedSet { message }),
        1 => topic().prop_map(|topic| StateChange::RetainedCleared { topic }),
    ]
}

/// One log entry to apply.
#[derive(Clone, Debug)]
enum Plan {
    /// A normal entry with these changes.
    Changes(Vec<StateChange>),
    Blank,
    /// Bytes that are not a `Batch`: skipped.
    Undecodable,
    /// These changes plus one this version cannot read: the whole entry is skipped.
    Unreadable(Vec<StateChange>),
}

fn plan() -> impl Strategy<Value = Plan> {
    prop_oneof![
        12 => vec(change(), 0..6).prop_map(Plan::Changes),
        1 => Just(Plan::Blank),
        1 => Just(Plan::Undecodable),
        1 => vec(change(), 1..3).prop_map(Plan::Unreadable),
    ]
}

fn plans() -> impl Strategy<Value = Vec<Plan>> {
    vec(plan(), 1..30)
}

/// The log entry of `plan` at `index`.
fn entry(index: u64, plan: &Plan) -> Entry {
    match plan {
        Plan::Changes(changes) => normal(index, encode_batch(changes, &clock())),
        Plan::Blank => blank(index),
        // A varint that never ends.
        Plan::Undecodable => normal(index, vec![0x0A, 0xFF]),
        Plan::Unreadable(changes) => {
            let mut batch = decode_batch(&encode_batch(changes, &clock())).expect("own batch");
            batch.changes.push(state::Change { change: None });
            normal(index, batch.encode_to_vec())
        }
    }
}

fn entries(plans: &[Plan]) -> Vec<Entry> {
    plans
        .iter()
        .enumerate()
        .map(|(i, plan)| entry(i as u64 + 1, plan))
        .collect()
}

/// Applies `plan` to the reference model.
fn apply_to_image(image: &mut StateImage, plan: &Plan) {
    if let Plan::Changes(changes) = plan {
        for change in changes {
            image.apply(change);
        }
    }
}

fn apply_all(rt: &tokio::runtime::Runtime, sm: &mut StateMachine, entries: Vec<Entry>) {
    let n = entries.len();
    let replies = rt.block_on(sm.apply(entries)).expect("apply");
    assert_eq!(replies.len(), n);
}

fn applied(rt: &tokio::runtime::Runtime, sm: &mut StateMachine) -> Option<LogId> {
    rt.block_on(sm.applied_state()).expect("applied state").0
}

// ---------------------------------------------------------------------------------------------
// Conversions
// ---------------------------------------------------------------------------------------------

/// Every `StateChange` survives domain → protobuf → bytes → protobuf → domain unchanged.
#[test]
fn changes_round_trip_through_protobuf() {
    let mut runner = TestRunner::new(Config::with_cases(cases(512)));
    runner
        .run(&vec(change(), 0..8), |changes| {
            let c = clock();
            for change in &changes {
                let proto = change_to_proto(change, &c);
                convert::validate_change(&proto).expect("valid");
                prop_assert_eq!(&change_from_proto(proto, &c).expect("convert"), change);
            }
            let batch = decode_batch(&encode_batch(&changes, &c)).expect("decode");
            prop_assert_eq!(batch.shard_id, SHARD_ID);
            prop_assert_eq!(batch_from_proto(batch, &c).expect("convert"), changes);
            Ok(())
        })
        .expect("round trip");
}

// ---------------------------------------------------------------------------------------------
// Equivalence with the reference model
// ---------------------------------------------------------------------------------------------

/// Random entries applied to `StateImage` and, as Raft entries, to the state machine: after
/// every entry both recover the same state, hold the same number of stored messages, and the
/// state machine's last applied log id is the entry's.
#[test]
fn apply_is_equivalent_to_the_reference_model() {
    let (_dir, store) = temp_store();
    let db = store.state_db(DATA_SHARD.get());
    let rt = runtime();
    let mut runner = TestRunner::new(Config::with_cases(cases(256)));
    runner
        .run(&plans(), |plans| {
            clear(&db);
            let mut sm = StateMachine::new(db.clone());
            let mut image = StateImage::default();
            for (i, plan) in plans.iter().enumerate() {
                let entry = entry(i as u64 + 1, plan);
                let log_id = entry.log_id;
                apply_all(&rt, &mut sm, vec![entry]);
                apply_to_image(&mut image, plan);
                prop_assert_eq!(
                    sm.recovered(&clock()).expect("recovered"),
                    image.recovered(),
                    "after entry {} ({:?})",
                    i + 1,
                    plan
                );
                prop_assert_eq!(count(&db, StateCf::Messages), image.stored_messages());
                prop_assert_eq!(applied(&rt, &mut sm), Some(log_id));
            }
            Ok(())
        })
        .expect("equivalence");
}

/// A scenario exercising the reference counting explicitly (fan-out, duplicate targets,
/// oldest-first acks, clean start releasing references).
#[test]
fn messages_are_stored_once_and_reference_counted() {
    let (_dir, store) = temp_store();
    let rt = runtime();
    let mut sm = StateMachine::new(store.state_db(DATA_SHARD.get()));
    let m1 = msg("t/1", "one", QoS::ExactlyOnce);
    let changes = vec![
        opened("a", false),
        opened("b", false),
        StateChange::MessageStored {
            id: MessageId(1),
            message: m1.clone(),
            targets: vec![
                target("a", QoS::ExactlyOnce),
                target("a", QoS::AtLeastOnce),
                target("b", QoS::ExactlyOnce),
                target("nobody", QoS::AtLeastOnce),
            ],
        },
        StateChange::MessageSent {
            client_id: "a".into(),
            id: MessageId(1),
            packet_id: 4,
        },
        StateChange::MessageReleased {
            client_id: "a".into(),
            id: MessageId(1),
        },
    ];
    let mut image = StateImage::default();
    changes.iter().for_each(|c| image.apply(c));
    apply_all(
        &rt,
        &mut sm,
        vec![normal(1, encode_batch(&changes, &clock()))],
    );
    let db = store.state_db(DATA_SHARD.get());
    assert_eq!(count(&db, StateCf::Messages), 1, "stored once");
    let recovered = sm.recovered(&clock()).expect("recovered");
    assert_eq!(recovered, image.recovered());
    let a = &recovered.sessions[0];
    assert_eq!(a.messages.len(), 2);
    assert_eq!(
        (a.messages[0].packet_id, a.messages[0].released),
        (Some(4), true)
    );
    assert_eq!(a.messages[1].target.qos, QoS::AtLeastOnce);
    assert_eq!(sm.max_message_id().expect("max id"), Some(1));

    // The oldest delivery is acked first; a clean start of `b` releases its reference.
    let more = vec![
        StateChange::MessageAcked {
            client_id: "a".into(),
            id: MessageId(1),
        },
        opened("b", true),
        StateChange::MessageAcked {
            client_id: "a".into(),
            id: MessageId(7),
        },
    ];
    more.iter().for_each(|c| image.apply(c));
    apply_all(&rt, &mut sm, vec![normal(2, encode_batch(&more, &clock()))]);
    let recovered = sm.recovered(&clock()).expect("recovered");
    assert_eq!(recovered, image.recovered());
    assert_eq!(recovered.sessions[0].messages.len(), 1);
    assert_eq!(recovered.sessions[0].messages[0].packet_id, None);
    assert!(recovered.sessions[1].messages.is_empty());
    assert_eq!(count(&db, StateCf::Messages), 1);

    let last = vec![StateChange::SessionEnded {
        client_id: "a".into(),
    }];
    apply_all(&rt, &mut sm, vec![normal(3, encode_batch(&last, &clock()))]);
    assert_eq!(
        count(&db, StateCf::Messages),
        0,
        "deleted with the last reference"
    );
    assert_eq!(count(&db, StateCf::SessionMessages), 0);
    assert_eq!(sm.max_message_id().expect("max id"), None);
}

/// Within one entry, reads see the entry's own writes merged with the database: the oldest
/// delivery is found whether it was stored by an earlier entry or this one, and a clean start
/// in the middle of an entry hides everything the session had before.
#[test]
fn reads_during_an_entry_see_its_own_writes() {
    let (_dir, store) = temp_store();
    let rt = runtime();
    let mut sm = StateMachine::new(store.state_db(DATA_SHARD.get()));
    let stored = |qos| StateChange::MessageStored {
        id: MessageId(1),
        message: msg("t/1", "m", QoS::ExactlyOnce),
        targets: vec![target("a", qos)],
    };
    let sent = StateChange::MessageSent {
        client_id: "a".into(),
        id: MessageId(1),
        packet_id: 3,
    };
    let acked = StateChange::MessageAcked {
        client_id: "a".into(),
        id: MessageId(1),
    };
    let plans = [
        vec![opened("a", false), stored(QoS::AtLeastOnce)],
        // The oldest delivery (stored by the previous entry) is sent and acked, not this one's.
        vec![stored(QoS::ExactlyOnce), sent.clone(), acked.clone()],
        vec![stored(QoS::AtMostOnce)],
        // After the clean start only this entry's delivery exists.
        vec![
            opened("a", true),
            StateChange::Subscribed {
                client_id: "a".into(),
                filter: Arc::from("t/1"),
                entry: SubEntry {
                    options: SubscriptionOptions::default(),
                    subscription_id: None,
                },
            },
            StateChange::MessageStored {
                id: MessageId(1),
                message: msg("t/1", "n", QoS::ExactlyOnce),
                targets: vec![target("a", QoS::ExactlyOnce), target("a", QoS::AtLeastOnce)],
            },
            sent,
            acked,
        ],
    ];
    let mut image = StateImage::default();
    for (i, changes) in plans.iter().enumerate() {
        changes.iter().for_each(|c| image.apply(c));
        apply_all(
            &rt,
            &mut sm,
            vec![normal(i as u64 + 1, encode_batch(changes, &clock()))],
        );
        assert_eq!(
            sm.recovered(&clock()).expect("recovered"),
            image.recovered(),
            "after entry {}",
            i + 1
        );
    }
    let recovered = sm.recovered(&clock()).expect("recovered");
    let a = &recovered.sessions[0];
    assert_eq!(a.subscriptions.len(), 1);
    assert_eq!(a.messages.len(), 1);
    assert_eq!(a.messages[0].target.qos, QoS::AtLeastOnce);
    assert_eq!(
        count(&store.state_db(DATA_SHARD.get()), StateCf::Messages),
        1
    );
}

// ---------------------------------------------------------------------------------------------
// Skipped entries
// ---------------------------------------------------------------------------------------------

/// Entries this version cannot read are skipped whole, advance `last_applied`, and change
/// nothing else.
#[test]
fn unreadable_entries_are_skipped() {
    let (_dir, store) = temp_store();
    let rt = runtime();
    let mut sm = StateMachine::new(store.state_db(DATA_SHARD.get()));
    apply_all(
        &rt,
        &mut sm,
        vec![normal(1, encode_batch(&[opened("a", false)], &clock()))],
    );
    let before = sm.recovered(&clock()).expect("recovered");

    let bad_qos = state::Batch {
        shard_id: SHARD_ID,
        origin_node: 0,
        fences: Vec::new(),
        changes: vec![
            state::Change {
                change: Some(state::change::Change::SessionEnded(state::SessionEnded {
                    client_id: "a".into(),
                })),
            },
            state::Change {
                change: Some(state::change::Change::RetainedSet(state::RetainedSet {
                    message: Some(state::Message {
                        topic: "t".into(),
                        qos: 3,
                        ..Default::default()
                    }),
                })),
            },
        ],
    };
    let other_shard = state::Batch {
        shard_id: 9,
        origin_node: 0,
        fences: Vec::new(),
        changes: vec![change_to_proto(
            &StateChange::SessionEnded {
                client_id: "a".into(),
            },
            &clock(),
        )],
    };
    let nul_client = encode_batch(&[opened("x\0y", false)], &clock());
    apply_all(
        &rt,
        &mut sm,
        vec![
            normal(2, vec![0xFF]),
            normal(3, b"definitely not protobuf".to_vec()),
            normal(4, bad_qos.encode_to_vec()),
            normal(5, other_shard.encode_to_vec()),
            normal(6, nul_client),
            normal(7, Vec::new()),
        ],
    );
    assert_eq!(applied(&rt, &mut sm), Some(log_id(1, 0, 7)));
    assert_eq!(sm.recovered(&clock()).expect("recovered"), before);
}

// ---------------------------------------------------------------------------------------------
// Fenced proposals
// ---------------------------------------------------------------------------------------------

/// A batch proposed by node `origin`, with `fenced` (fence, changes) proposals first and
/// `unfenced` changes after them.
fn batch_from(
    origin: u64,
    fenced: &[(Fence, Vec<StateChange>)],
    unfenced: &[StateChange],
) -> Vec<u8> {
    let mut changes = Vec::new();
    let mut fences = Vec::new();
    for (fence, part) in fenced {
        fences.push(FencedRange {
            fence: fence.clone(),
            first: changes.len() as u32,
            count: part.len() as u32,
        });
        changes.extend(part.iter().cloned());
    }
    changes.extend(unfenced.iter().cloned());
    let ctx = ProposalContext {
        node_id: origin,
        now: None,
    };
    encode_fenced_batch(&changes, &fences, &clock(), &ctx)
}

fn claim(client: &str, epoch: u64) -> StateChange {
    StateChange::SessionOpened {
        client_id: client.into(),
        epoch,
        clean_start: false,
        expiry_secs: 60,
        will: None,
    }
}

fn attached(client: &str, epoch: u64) -> Fence {
    Fence::Attached {
        client_id: client.into(),
        epoch,
    }
}

/// A QoS 2 PUBLISH from `pub` (packet id `pid`) stored for `sub` as message `id`.
fn qos2_publish(pid: u16, id: u64) -> Vec<StateChange> {
    vec![
        StateChange::IncomingQos2Received {
            client_id: "pub".into(),
            packet_id: pid,
            message_id: Some(MessageId(id)),
        },
        StateChange::MessageStored {
            id: MessageId(id),
            message: msg("t/q2", "exactly once", QoS::ExactlyOnce),
            targets: vec![target("sub", QoS::ExactlyOnce)],
        },
    ]
}

fn session<'a>(
    recovered: &'a raftmq_core::durability::Recovered,
    id: &str,
) -> &'a raftmq_core::durability::SessionImage {
    recovered
        .sessions
        .iter()
        .find(|s| s.client_id.as_str() == id)
        .unwrap_or_else(|| panic!("session {id} stored"))
}

/// The ambiguous-commit duplicate, at the state machine: a QoS 2 PUBLISH proposed through a
/// connection that timed out commits late, after its client reconnected elsewhere (a new
/// claim) — the late copy must not store the message a second time nor touch the session,
/// while unfenced changes of the same batch still apply; the proposer learns which fence
/// failed.
#[test]
fn a_fenced_proposal_applies_only_while_its_claim_is_the_sessions_latest() {
    let (_dir, store) = temp_store();
    let rt = runtime();
    let mut sm = StateMachine::new(store.state_db(DATA_SHARD.get()));
    sm.fence_notes().set_owner(1);
    let notes = sm.fence_notes().clone();
    apply_all(
        &rt,
        &mut sm,
        vec![
            normal(1, batch_from(1, &[], &[claim("pub", 10), claim("sub", 11)])),
            // Made by node 1's connection of claim 10: applies.
            normal(
                2,
                batch_from(1, &[(attached("pub", 10), qos2_publish(5, 1))], &[]),
            ),
        ],
    );
    let db = store.state_db(DATA_SHARD.get());
    assert_eq!(count(&db, StateCf::Messages), 1);
    assert_eq!(notes.take(2), Some(vec![]), "the fence of entry 2 held");

    // The client reconnects through node 2 (claim 20); then a late copy of another proposal of
    // the old connection commits, in a batch with an unfenced change and a fenced change of
    // another session.
    let retained = StateChange::RetainedSet {
        message: msg("t/r", "kept", QoS::AtMostOnce),
    };
    apply_all(
        &rt,
        &mut sm,
        vec![
            normal(3, batch_from(2, &[], &[claim("pub", 20)])),
            normal(
                4,
                batch_from(
                    1,
                    &[
                        (attached("pub", 10), qos2_publish(6, 2)),
                        (
                            attached("sub", 11),
                            vec![StateChange::MessageSent {
                                client_id: "sub".into(),
                                id: MessageId(1),
                                packet_id: 9,
                            }],
                        ),
                    ],
                    std::slice::from_ref(&retained),
                ),
            ),
        ],
    );
    let recovered = sm.recovered(&clock()).expect("recovered");
    assert_eq!(
        count(&db, StateCf::Messages),
        1,
        "the late copy stored nothing"
    );
    assert_eq!(session(&recovered, "pub").incoming_qos2, vec![5]);
    let sub = session(&recovered, "sub");
    assert_eq!(sub.messages.len(), 1);
    assert_eq!(
        sub.messages[0].packet_id,
        Some(9),
        "the fence of `sub` held"
    );
    assert_eq!(recovered.retained.len(), 1, "unfenced changes apply");
    assert_eq!(notes.take(4), Some(vec![0]), "fence 0 of entry 4 failed");
    assert_eq!(notes.take(4), None, "a note is taken once");

    // The same claim epoch from another node is another claim: node 2's claim 10 is not node
    // 1's; node 2's own connection (claim 20) proposes normally.
    apply_all(
        &rt,
        &mut sm,
        vec![
            normal(
                5,
                batch_from(2, &[(attached("pub", 10), qos2_publish(7, 3))], &[]),
            ),
            normal(
                6,
                batch_from(2, &[(attached("pub", 20), qos2_publish(8, 4))], &[]),
            ),
        ],
    );
    let recovered = sm.recovered(&clock()).expect("recovered");
    assert_eq!(session(&recovered, "pub").incoming_qos2, vec![5, 8]);
    assert_eq!(count(&db, StateCf::Messages), 2);
    // Node 2's batches are not this state machine's owner's: not noted.
    assert_eq!(notes.take(5), None);
}

/// The fence of a disconnected session's timers (delayed will, expiry): holds while the
/// session is offline and owned by the proposing node, or still held by the timer's epoch
/// (its detach not recorded); not once another connection has claimed it.
#[test]
fn an_offline_fence_holds_until_another_connection_claims_the_session() {
    let (_dir, store) = temp_store();
    let rt = runtime();
    let mut sm = StateMachine::new(store.state_db(DATA_SHARD.get()));
    let will = WillRecord {
        message: msg("will/t", "gone", QoS::AtLeastOnce),
        delay_secs: 30,
        message_expiry_secs: None,
    };
    let with_will = |epoch| StateChange::SessionOpened {
        client_id: "c".into(),
        epoch,
        clean_start: false,
        expiry_secs: 60,
        will: Some(will.clone()),
    };
    let offline = |epoch| Fence::Offline {
        client_id: "c".into(),
        epoch,
    };
    let will_published = StateChange::WillPublished {
        client_id: "c".into(),
    };
    let has_will = |sm: &StateMachine| {
        session(&sm.recovered(&clock()).expect("recovered"), "c")
            .will
            .is_some()
    };
    // Claimed through node 1 (epoch 10) and not detached: a timer of that epoch holds, one of
    // another epoch does not (the session is online under another claim).
    apply_all(
        &rt,
        &mut sm,
        vec![
            normal(1, batch_from(1, &[], &[with_will(10)])),
            normal(
                2,
                batch_from(1, &[(offline(99), vec![will_published.clone()])], &[]),
            ),
        ],
    );
    assert!(
        has_will(&sm),
        "online under claim 10: a timer of epoch 99 does not hold"
    );
    apply_all(
        &rt,
        &mut sm,
        vec![normal(
            3,
            batch_from(1, &[(offline(10), vec![will_published.clone()])], &[]),
        )],
    );
    assert!(!has_will(&sm), "the timer of the claim's own epoch holds");

    // Detached on node 1, then claimed again through node 2 (epoch 20), with a will: node 1's
    // timers no longer hold; node 2's, once it is detached there, do.
    let detached = StateChange::SessionDetached {
        client_id: "c".into(),
        epoch: 20,
        how: DetachRecord::Abnormal,
        expiry_secs: 60,
    };
    apply_all(
        &rt,
        &mut sm,
        vec![
            normal(4, batch_from(2, &[], &[with_will(20)])),
            normal(
                5,
                batch_from(1, &[(offline(10), vec![will_published.clone()])], &[]),
            ),
        ],
    );
    assert!(
        has_will(&sm),
        "claimed through node 2: node 1's timer does not hold"
    );
    apply_all(
        &rt,
        &mut sm,
        vec![
            normal(
                6,
                batch_from(2, &[(attached("c", 20), vec![detached])], &[]),
            ),
            normal(
                7,
                batch_from(2, &[(offline(12345), vec![will_published])], &[]),
            ),
        ],
    );
    assert!(
        !has_will(&sm),
        "offline and owned by node 2: its timer holds"
    );

    // A session of unknown owner (node 0: a record written before owners were recorded) is
    // restored, and timed, by the node that reads it.
    let legacy = vec![
        StateChange::SessionOpened {
            client_id: "old".into(),
            epoch: 1,
            clean_start: false,
            expiry_secs: 60,
            will: Some(will.clone()),
        },
        StateChange::SessionDetached {
            client_id: "old".into(),
            epoch: 1,
            how: DetachRecord::Abnormal,
            expiry_secs: 60,
        },
    ];
    let expired = StateChange::SessionEnded {
        client_id: "old".into(),
    };
    apply_all(
        &rt,
        &mut sm,
        vec![
            normal(8, encode_batch(&legacy, &clock())),
            normal(
                9,
                batch_from(
                    5,
                    &[(
                        Fence::Offline {
                            client_id: "old".into(),
                            epoch: 77,
                        },
                        vec![expired],
                    )],
                    &[],
                ),
            ),
        ],
    );
    let recovered = sm.recovered(&clock()).expect("recovered");
    assert!(
        recovered
            .sessions
            .iter()
            .all(|s| s.client_id.as_str() != "old"),
        "the expiry of a session of unknown owner applies"
    );
}

/// A batch whose fenced ranges do not lie within its changes (or overlap) is skipped whole.
#[test]
fn a_batch_with_malformed_fences_is_skipped() {
    let (_dir, store) = temp_store();
    let rt = runtime();
    let mut sm = StateMachine::new(store.state_db(DATA_SHARD.get()));
    apply_all(
        &rt,
        &mut sm,
        vec![normal(1, batch_from(1, &[], &[claim("pub", 1)]))],
    );
    let before = sm.recovered(&clock()).expect("recovered");
    let changes: Vec<state::Change> = [
        StateChange::SessionEnded {
            client_id: "pub".into(),
        },
        StateChange::RetainedSet {
            message: msg("t", "x", QoS::AtMostOnce),
        },
    ]
    .iter()
    .map(|c| change_to_proto(c, &clock()))
    .collect();
    let fence = |first, count| state::Fence {
        client_id: "pub".into(),
        epoch: 1,
        offline: false,
        first,
        count,
    };
    let bad = |fences: Vec<state::Fence>| {
        state::Batch {
            shard_id: SHARD_ID,
            origin_node: 1,
            changes: changes.clone(),
            fences,
        }
        .encode_to_vec()
    };
    apply_all(
        &rt,
        &mut sm,
        vec![
            normal(2, bad(vec![fence(1, 2)])),
            normal(3, bad(vec![fence(0, 2), fence(1, 1)])),
            normal(4, bad(vec![fence(1, 1), fence(0, 1)])),
            normal(5, bad(vec![fence(u32::MAX, 2)])),
        ],
    );
    assert_eq!(applied(&rt, &mut sm), Some(log_id(1, 0, 5)));
    assert_eq!(sm.recovered(&clock()).expect("recovered"), before);
}

/// A failing entry (here: a corrupt stored record) writes nothing, not even `last_applied`.
#[test]
fn a_failed_entry_writes_nothing() {
    let (_dir, store) = temp_store();
    let db = store.state_db(DATA_SHARD.get());
    let rt = runtime();
    let mut sm = StateMachine::new(db.clone());
    apply_all(
        &rt,
        &mut sm,
        vec![normal(1, encode_batch(&[opened("a", false)], &clock()))],
    );
    let mut corrupt = StateBatch::new();
    corrupt.put(StateCf::Sessions, b"b".to_vec(), vec![0xFF]);
    db.write(corrupt).expect("write");
    let before = db.export_snapshot_to_vec().expect("export");

    let changes = [
        StateChange::RetainedSet {
            message: msg("t/1", "r", QoS::AtMostOnce),
        },
        StateChange::WillPublished {
            client_id: "b".into(),
        },
    ];
    let result = rt.block_on(sm.apply(vec![normal(2, encode_batch(&changes, &clock()))]));
    assert!(result.is_err(), "a corrupt record is a storage error");
    assert_eq!(db.export_snapshot_to_vec().expect("export"), before);
    assert_eq!(applied(&rt, &mut sm), Some(log_id(1, 0, 1)));
}

// ---------------------------------------------------------------------------------------------
// Determinism, snapshots, restarts
// ---------------------------------------------------------------------------------------------

/// The same entries applied to two fresh state machines (one entry at a time vs. all at once)
/// give byte-identical snapshot streams.
#[test]
fn apply_is_deterministic() {
    let ((_dir_a, store_a), (_dir_b, store_b)) = (temp_store(), temp_store());
    let (db_a, db_b) = (
        store_a.state_db(DATA_SHARD.get()),
        store_b.state_db(DATA_SHARD.get()),
    );
    let rt = runtime();
    let mut runner = TestRunner::new(Config::with_cases(cases(48)));
    runner
        .run(&plans(), |plans| {
            clear(&db_a);
            clear(&db_b);
            let mut a = StateMachine::new(db_a.clone());
            let mut b = StateMachine::new(db_b.clone());
            let entries = entries(&plans);
            for entry in entries.clone() {
                apply_all(&rt, &mut a, vec![entry]);
            }
            apply_all(&rt, &mut b, entries);
            prop_assert_eq!(
                db_a.export_snapshot_to_vec().expect("export"),
                db_b.export_snapshot_to_vec().expect("export")
            );
            Ok(())
        })
        .expect("determinism");
}

/// A snapshot built on one state machine and installed on a fresh one carries the whole state:
/// same recovered state, applied state, current snapshot meta, and applying the same further
/// entries to both keeps them identical (the delivery counter travels with the snapshot).
#[test]
fn snapshot_restores_the_state() {
    let rt = runtime();
    let mut runner = TestRunner::new(Config::with_cases(cases(12)));
    runner
        .run(&(plans(), plans()), |(before, after)| {
            let ((_dir_a, store_a), (_dir_b, store_b)) = (temp_store(), temp_store());
            let mut a = StateMachine::new(store_a.state_db(DATA_SHARD.get()));
            let mut b = StateMachine::new(store_b.state_db(DATA_SHARD.get()));
            // The entries of `before`, a membership entry (so that the snapshot carries one),
            // then the entries of `after`.
            let mut first = entries(&before);
            let n = first.len() as u64 + 1;
            let members = openraft::Membership::new(vec![[1u64, 2, 3].into()], ());
            first.push(Entry {
                log_id: log_id(1, 0, n),
                payload: EntryPayload::Membership(members),
            });
            let rest: Vec<Entry> = after
                .iter()
                .enumerate()
                .map(|(i, plan)| entry(n + 1 + i as u64, plan))
                .collect();

            apply_all(&rt, &mut a, first);
            prop_assert!(
                rt.block_on(b.get_current_snapshot())
                    .expect("get")
                    .is_none()
            );
            let snapshot = rt.block_on(async {
                let mut builder = a.get_snapshot_builder().await;
                builder.build_snapshot().await
            });
            let snapshot = snapshot.expect("build");
            let applied_a = rt.block_on(a.applied_state()).expect("applied");
            prop_assert_eq!(&snapshot.meta.last_log_id, &applied_a.0);
            prop_assert_eq!(&snapshot.meta.last_membership, &applied_a.1);
            prop_assert_eq!(&applied_a.1.log_id().map(|id| id.index), &Some(n));

            let mut received = rt.block_on(b.begin_receiving_snapshot()).expect("begin");
            *received = Cursor::new(snapshot.snapshot.into_inner());
            rt.block_on(b.install_snapshot(&snapshot.meta, received))
                .expect("install");

            prop_assert_eq!(
                b.recovered(&clock()).expect("recovered"),
                a.recovered(&clock()).expect("recovered")
            );
            prop_assert_eq!(rt.block_on(b.applied_state()).expect("applied"), applied_a);
            let current = rt.block_on(b.get_current_snapshot()).expect("get");
            prop_assert_eq!(current.map(|s| s.meta), Some(snapshot.meta.clone()));

            apply_all(&rt, &mut a, rest.clone());
            apply_all(&rt, &mut b, rest);
            prop_assert_eq!(
                store_a
                    .state_db(DATA_SHARD.get())
                    .export_snapshot_to_vec()
                    .expect("export"),
                store_b
                    .state_db(DATA_SHARD.get())
                    .export_snapshot_to_vec()
                    .expect("export")
            );
            Ok(())
        })
        .expect("snapshot");
}

/// Installing a snapshot replaces everything that was there (nothing is merged).
#[test]
fn installing_a_snapshot_replaces_the_state() {
    let rt = runtime();
    let ((_dir_a, store_a), (_dir_b, store_b)) = (temp_store(), temp_store());
    let mut a = StateMachine::new(store_a.state_db(DATA_SHARD.get()));
    let mut b = StateMachine::new(store_b.state_db(DATA_SHARD.get()));
    let to_a = [opened("a", false)];
    let to_b = [
        opened("b", false),
        StateChange::RetainedSet {
            message: msg("t/2", "x", QoS::AtMostOnce),
        },
    ];
    apply_all(&rt, &mut a, vec![normal(1, encode_batch(&to_a, &clock()))]);
    apply_all(
        &rt,
        &mut b,
        vec![normal(1, encode_batch(&to_b, &clock())), blank(2), blank(3)],
    );
    let snapshot = rt
        .block_on(async { a.get_snapshot_builder().await.build_snapshot().await })
        .expect("build");
    assert_eq!(snapshot.meta.snapshot_id, "1-1-0");
    rt.block_on(b.install_snapshot(&snapshot.meta, snapshot.snapshot))
        .expect("install");
    assert_eq!(
        b.recovered(&clock()).expect("recovered"),
        a.recovered(&clock()).expect("recovered")
    );
    assert_eq!(applied(&rt, &mut b), Some(log_id(1, 0, 1)));
}

/// Reopening the store (a restart) gives back the applied state and the recovered state.
#[test]
fn state_survives_reopening_the_store() {
    let rt = runtime();
    let mut runner = TestRunner::new(Config::with_cases(cases(8)));
    runner
        .run(&plans(), |plans| {
            let dir = tempfile::tempdir().expect("tempdir");
            let (applied_before, recovered_before, export_before) = {
                let store = open(&dir);
                let mut sm = StateMachine::open(store.state_db(DATA_SHARD.get())).expect("open");
                apply_all(&rt, &mut sm, entries(&plans));
                (
                    rt.block_on(sm.applied_state()).expect("applied"),
                    sm.recovered(&clock()).expect("recovered"),
                    store
                        .state_db(DATA_SHARD.get())
                        .export_snapshot_to_vec()
                        .expect("export"),
                )
            };
            let store = open(&dir);
            let mut sm = StateMachine::open(store.state_db(DATA_SHARD.get())).expect("open");
            prop_assert_eq!(
                rt.block_on(sm.applied_state()).expect("applied"),
                applied_before
            );
            prop_assert_eq!(sm.recovered(&clock()).expect("recovered"), recovered_before);
            prop_assert_eq!(
                store
                    .state_db(DATA_SHARD.get())
                    .export_snapshot_to_vec()
                    .expect("export"),
                export_before
            );
            Ok(())
        })
        .expect("restart");
}

// ---------------------------------------------------------------------------------------------
// openraft's storage test suite
// ---------------------------------------------------------------------------------------------

struct Builder;

impl StoreBuilder<TypeConfig, LogStore<TypeConfig>, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore<TypeConfig>, StateMachine), StorageError> {
        let dir = tempfile::tempdir()
            .map_err(|e| StorageError::from_io_error(ErrorSubject::Store, ErrorVerb::Write, e))?;
        let store = Store::open(dir.path())
            .map_err(|e| e.into_storage_error(ErrorSubject::Store, ErrorVerb::Read))?;
        let sm = StateMachine::open(store.state_db(DATA_SHARD.get()))
            .map_err(|e| e.into_storage_error(ErrorSubject::StateMachine, ErrorVerb::Read))?;
        Ok((dir, store.log_store::<TypeConfig>(DATA_SHARD.get()), sm))
    }
}

/// Every test of `openraft::testing::Suite` with the real log store and this state machine.
#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
}

/// Applying a `NodeDown` records, durably and in snapshots, the log index at which the node was
/// declared down: a node that was cut off and catches up (from the log or a snapshot) learns
/// whether it was declared down meanwhile, and settles the wills it handed over accordingly.
#[test]
fn a_declaration_is_recorded_and_travels_in_snapshots() {
    let rt = runtime();
    let ((_dir_a, store_a), (_dir_b, store_b)) = (temp_store(), temp_store());
    let mut a = StateMachine::new(store_a.state_db(DATA_SHARD.get()));
    let mut b = StateMachine::new(store_b.state_db(DATA_SHARD.get()));
    assert_eq!(a.declared_down_at(3).expect("read"), 0);
    apply_all(
        &rt,
        &mut a,
        vec![
            normal(1, batch_from(1, &[], &[claim("x", 1)])),
            normal(
                2,
                batch_from(
                    1,
                    &[],
                    &[StateChange::NodeDown {
                        node: 3,
                        seen: 0,
                        wills: Some(vec!["w1".into()]),
                    }],
                ),
            ),
            blank(3),
            normal(
                4,
                batch_from(
                    2,
                    &[],
                    &[StateChange::NodeDown {
                        node: 3,
                        seen: 0,
                        wills: Some(vec!["w2".into(), "w3".into()]),
                    }],
                ),
            ),
        ],
    );
    assert_eq!(
        a.declared_down_at(3).expect("read"),
        4,
        "the last declaration"
    );
    assert_eq!(a.declared_down_at(1).expect("read"), 0);
    assert_eq!(
        a.declared_wills(3).expect("read"),
        Some(vec!["w2".to_owned(), "w3".to_owned()]),
        "the wills the last declaration listed"
    );
    assert_eq!(a.declared_wills(1).expect("read"), None);
    let snapshot = rt
        .block_on(async { a.get_snapshot_builder().await.build_snapshot().await })
        .expect("build");
    rt.block_on(b.install_snapshot(&snapshot.meta, snapshot.snapshot))
        .expect("install");
    assert_eq!(
        b.declared_down_at(3).expect("read"),
        4,
        "carried by the snapshot"
    );
    assert_eq!(
        b.declared_wills(3).expect("read"),
        Some(vec!["w2".to_owned(), "w3".to_owned()])
    );
}

/// A declaration is made on what the declaring node had applied (`seen`): if the declared node
/// proposed anything that committed after that (it is back in touch with a quorum, e.g. a
/// partition healed while the declaration was on its way), the declaration is void — nothing is
/// adopted, nothing recorded — so the node and the declaring node never both act on its
/// sessions and wills. A declaration made after its last batch applies.
#[test]
fn a_declaration_is_void_if_the_node_proposed_after_what_it_was_based_on() {
    let (_dir, store) = temp_store();
    let rt = runtime();
    let mut sm = StateMachine::new(store.state_db(DATA_SHARD.get()));
    let owner = |sm: &StateMachine| {
        sm.session_owners()
            .expect("owners")
            .get("c")
            .copied()
            .expect("session c")
    };
    apply_all(
        &rt,
        &mut sm,
        vec![
            // Node 3 claims `c` (index 1); the leader, node 1, has seen up to index 1.
            normal(1, batch_from(3, &[], &[claim("c", 7)])),
            // Node 3 commits something again (its regain barrier) at index 2...
            normal(2, batch_from(3, &[], &[])),
            // ...so a declaration based on index 1 is void.
            normal(
                3,
                batch_from(
                    1,
                    &[],
                    &[StateChange::NodeDown {
                        node: 3,
                        seen: 1,
                        wills: Some(Vec::new()),
                    }],
                ),
            ),
        ],
    );
    assert_eq!(
        sm.declared_down_at(3).expect("read"),
        0,
        "void: not recorded"
    );
    assert_eq!(owner(&sm), 3, "void: nothing adopted");
    // Based on index 3 (after node 3's last batch): applies.
    apply_all(
        &rt,
        &mut sm,
        vec![normal(
            4,
            batch_from(
                1,
                &[],
                &[StateChange::NodeDown {
                    node: 3,
                    seen: 3,
                    wills: Some(Vec::new()),
                }],
            ),
        )],
    );
    assert_eq!(sm.declared_down_at(3).expect("read"), 4);
    assert_eq!(owner(&sm), 1, "adopted by the declaring node");
    // Unconditional (0, older versions) applies too.
    apply_all(
        &rt,
        &mut sm,
        vec![
            normal(5, batch_from(1, &[], &[claim("c", 8)])),
            normal(6, batch_from(1, &[], &[])),
            normal(
                7,
                batch_from(
                    2,
                    &[],
                    &[StateChange::NodeDown {
                        node: 1,
                        seen: 0,
                        wills: Some(Vec::new()),
                    }],
                ),
            ),
        ],
    );
    assert_eq!(sm.declared_down_at(1).expect("read"), 7);
    assert_eq!(owner(&sm), 2);
}

/// The deliveries of a commit reported failed are queued when the node applies that batch
/// after all: during the apply itself (not through the asynchronous feed), so before any later
/// commit of the node completes and queues its own deliveries. Only this node's batches count,
/// and only for the messages they stored.
#[test]
fn the_messages_a_nodes_own_batches_stored_are_reported_while_each_is_applied() {
    let (_dir, store) = temp_store();
    let sm = StateMachine::new(store.state_db(DATA_SHARD.get()));
    let _feed = sm.feed().subscribe().expect("the first listener");
    type Stored = Vec<(MessageId, Vec<raftmq_codec::ByteStr>, u64)>;
    let seen: Arc<parking_lot::Mutex<Vec<Stored>>> = Arc::default();
    let record = seen.clone();
    sm.feed()
        .on_own_stored(1, move |ids| record.lock().push(ids));
    let apply = |index: u64, origin: u64, changes: Vec<StateChange>| {
        sm.apply_entry(&normal(index, batch_from(origin, &[], &changes)))
            .expect("applies");
        std::mem::take(&mut *seen.lock())
    };
    // Node 1's batch storing message 7: reported by the time the apply returned.
    assert_eq!(
        apply(1, 1, qos2_publish(1, 7)),
        vec![vec![(MessageId(7), vec!["sub".into()], 1)]],
        "reported during the apply, with the sessions it was stored for and its index"
    );
    // Another node's batch, or one of this node's that stored nothing: not reported.
    assert!(apply(2, 2, qos2_publish(2, 8)).is_empty());
    assert!(apply(3, 1, vec![claim("pub", 12)]).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Migration of a single-group release's store
// ---------------------------------------------------------------------------------------------

/// The store `raftmq serve` of the last single-group commit wrote
/// (`crates/raftmq-store/tests/fixtures/format-1`), migrated by what `RaftNode::start` runs: every
/// batch of its log names the data shard now, and replaying that log into an empty state
/// machine rebuilds the state the single-group release had applied (none of its entries is
/// skipped as another shard's).
#[test]
fn the_single_group_releases_log_applies_after_migration() {
    let fixture = std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../raftmq-store/tests/fixtures/format-1"
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("raft");
    std::fs::create_dir(&path).expect("mkdir");
    for entry in std::fs::read_dir(fixture).expect("fixture") {
        let entry = entry.expect("dir entry");
        if !entry.file_name().to_string_lossy().starts_with("LOG") {
            std::fs::copy(entry.path(), path.join(entry.file_name())).expect("copy");
        }
    }
    let report = match raftmq_cluster::upgrade::migrate_store(&path).expect("migrate") {
        raftmq_store::MigrationOutcome::Migrated(report) => report,
        other => panic!("expected a migration, got {other:?}"),
    };

    let rt = runtime();
    let store = Store::open(&path).expect("open the migrated store");
    let mut log: LogStore<TypeConfig> = store.log_store(DATA_SHARD.get());
    let entries = rt
        .block_on(openraft::RaftLogReader::try_get_log_entries(&mut log, 0..8))
        .expect("entries");
    assert_eq!(entries.len(), 8);
    let mut batches = 0;
    for entry in &entries {
        if let EntryPayload::Normal(request) = &entry.payload {
            let batch = decode_batch(&request.batch).expect("batch");
            assert_eq!(batch.shard_id, SHARD_ID, "entry {}", entry.log_id);
            batches += 1;
        }
    }
    assert!(batches > 0);
    assert_eq!(report.log_entries_rewritten, batches);

    let (_replay_dir, replay) = temp_store();
    let mut sm = StateMachine::open(replay.state_db(DATA_SHARD.get())).expect("open");
    rt.block_on(sm.apply(entries)).expect("apply");
    let migrated = store.state_db(DATA_SHARD.get());
    let replayed = replay.state_db(DATA_SHARD.get());
    assert!(
        replayed
            .get(StateCf::Sessions, b"fixture-sub")
            .expect("get")
            .is_some()
    );
    for cf in StateCf::ALL {
        let all = |db: &StateDb| -> Vec<_> {
            db.scan_prefix(cf, b"")
                .map(|item| item.expect("scan"))
                .collect()
        };
        assert_eq!(all(&replayed), all(&migrated), "{cf}");
    }
}

// ---------------------------------------------------------------------------------------------
// Stores spanning shards
// ---------------------------------------------------------------------------------------------

/// Applies `parts` (what `RaftDurability` proposes to each shard) as batches of node 1, the
/// fenced part with its fence, each on its own shard's state machine.
fn apply_parts(
    sms: &HashMap<u32, StateMachine>,
    next: &mut u64,
    split: raftmq_cluster::split::Split,
    fence: Option<&Fence>,
    count: raftmq_core::shard::ShardCount,
) {
    for part in split.parts {
        let fences = fence
            .filter(|f| raftmq_cluster::split::fence_shard(f, count) == part.shard)
            .map(|f| {
                let Fence::Attached { client_id, epoch } = f else {
                    panic!("attached fences only here")
                };
                vec![state::Fence {
                    client_id: client_id.to_string(),
                    epoch: *epoch,
                    offline: false,
                    first: 0,
                    count: part.changes.len() as u32,
                }]
            })
            .unwrap_or_default();
        let batch = state::Batch {
            shard_id: u64::from(part.shard.get()),
            changes: part.changes,
            origin_node: 1,
            fences,
        };
        *next += 1;
        sms[&part.shard.get()]
            .apply_entry(&normal(*next, batch.encode_to_vec()))
            .expect("applies");
    }
}

/// A QoS 2 message whose store spans shards: the publisher's shard records the packet id with
/// the message id and the shards it went to (a loaded session stores it again on a resend);
/// every shard stores it once under its id and skips a second store of it, even after the
/// delivery was acknowledged, until the exchange is settled, or the record is older than the
/// de-duplication horizon.
#[test]
fn a_qos2_store_spanning_shards_is_recorded_deduplicated_and_settled() {
    use raftmq_cluster::split::split;
    use raftmq_core::shard::{ShardCount, shard_of};
    let (_dir, store) = temp_store();
    let count = ShardCount::new(4).expect("valid");
    let sms: HashMap<u32, StateMachine> = count
        .shards()
        .map(|s| (s.get(), StateMachine::new(store.state_db(s.get()))))
        .collect();
    let shard = |c: &str| shard_of(c.as_bytes(), count).get();
    // A publisher and a subscriber in two different shards.
    let publisher = "pub";
    let subscriber = (0..)
        .map(|i| format!("sub{i}"))
        .find(|c| shard(c) != shard(publisher))
        .expect("a client id in another shard");
    let clock = WallClock::now();
    let ctx = ProposalContext {
        node_id: 1,
        now: Some(Instant::now()),
    };
    let mut next = 0;
    for client in [publisher, subscriber.as_str()] {
        let parts = split(&[claim(client, 1)], None, count, &clock, &ctx);
        apply_parts(&sms, &mut next, parts, None, count);
    }
    let fence = attached(publisher, 1);
    let publish = |id: u64| {
        vec![
            StateChange::IncomingQos2Received {
                client_id: publisher.into(),
                packet_id: 5,
                message_id: Some(MessageId(id)),
            },
            StateChange::MessageStored {
                id: MessageId(id),
                message: msg("t/q2", "exactly once", QoS::ExactlyOnce),
                targets: vec![target(&subscriber, QoS::ExactlyOnce)],
            },
        ]
    };
    let deliveries = |id: u64| {
        let recovered = sms[&shard(&subscriber)]
            .recovered(&clock)
            .expect("recovered");
        session(&recovered, &subscriber)
            .messages
            .iter()
            .filter(|m| m.id == MessageId(id))
            .count()
    };
    let store_9 = split(&publish(9), Some(&fence), count, &clock, &ctx);
    assert_eq!(store_9.parts.len(), 2, "spans two shards");
    apply_parts(&sms, &mut next, store_9.clone(), Some(&fence), count);
    assert_eq!(deliveries(9), 1);
    let recovered = sms[&shard(publisher)].recovered(&clock).expect("recovered");
    let image = session(&recovered, publisher);
    assert_eq!(image.incoming_qos2, vec![5]);
    assert_eq!(
        image.qos2_reroute,
        vec![(5, MessageId(9))],
        "a resend stores it again under its id"
    );
    let intent = sms[&shard(publisher)]
        .qos2_intent(publisher, 5)
        .expect("read")
        .expect("recorded");
    assert_eq!(intent.shards, vec![shard(&subscriber)]);
    // Stored again (the resend): skipped, also once the subscriber acknowledged it.
    apply_parts(&sms, &mut next, store_9.clone(), Some(&fence), count);
    assert_eq!(deliveries(9), 1, "not stored twice");
    let ack = vec![StateChange::MessageAcked {
        client_id: subscriber.as_str().into(),
        id: MessageId(9),
    }];
    apply_parts(
        &sms,
        &mut next,
        split(&ack, None, count, &clock, &ctx),
        None,
        count,
    );
    assert_eq!(deliveries(9), 0);
    apply_parts(&sms, &mut next, store_9.clone(), Some(&fence), count);
    assert_eq!(deliveries(9), 0, "acknowledged: not delivered again");
    assert!(sms[&shard(&subscriber)].published(9).expect("read"));
    // Settled: the record stays for a grace period, in which a copy of the store proposed
    // before the resend (its node paused right after its gate) is still skipped.
    let settle = |ids: Vec<u64>, at_ms: u64| {
        state::Batch {
            shard_id: u64::from(shard(&subscriber)),
            changes: vec![state::Change {
                change: Some(state::change::Change::PublishSettled(
                    state::PublishSettled { ids, at_ms },
                )),
            }],
            origin_node: 1,
            fences: Vec::new(),
        }
        .encode_to_vec()
    };
    let settled_ms = clock.to_unix_ms(ctx.now.expect("timed"));
    next += 1;
    sms[&shard(&subscriber)]
        .apply_entry(&normal(next, settle(vec![9], settled_ms)))
        .expect("applies");
    assert!(sms[&shard(&subscriber)].published(9).expect("read"));
    apply_parts(&sms, &mut next, store_9.clone(), Some(&fence), count);
    assert_eq!(deliveries(9), 0, "a late copy after the settle is skipped");
    // A store recorded after the grace drops it.
    let after_grace = ProposalContext {
        node_id: 1,
        now: ctx.now.map(|t| {
            t + Duration::from_millis(
                raftmq_cluster::state_machine::published::SETTLED_GRACE_MS + 1,
            )
        }),
    };
    apply_parts(
        &sms,
        &mut next,
        split(&publish(12), Some(&fence), count, &clock, &after_grace),
        Some(&fence),
        count,
    );
    assert!(
        !sms[&shard(&subscriber)].published(9).expect("read"),
        "gone after the grace"
    );
    assert!(sms[&shard(&subscriber)].published(12).expect("read"));
    // A settle of a version without the time drops the record at once.
    next += 1;
    sms[&shard(&subscriber)]
        .apply_entry(&normal(next, settle(vec![12], 0)))
        .expect("applies");
    assert!(!sms[&shard(&subscriber)].published(12).expect("read"));
    // Without a settle, a record older than the horizon goes when a newer one is recorded.
    apply_parts(
        &sms,
        &mut next,
        split(&publish(10), Some(&fence), count, &clock, &ctx),
        Some(&fence),
        count,
    );
    assert!(sms[&shard(&subscriber)].published(10).expect("read"));
    let later = ProposalContext {
        node_id: 1,
        now: ctx.now.map(|t| {
            t + Duration::from_millis(raftmq_cluster::state_machine::published::HORIZON_MS + 1)
        }),
    };
    apply_parts(
        &sms,
        &mut next,
        split(&publish(11), Some(&fence), count, &clock, &later),
        Some(&fence),
        count,
    );
    assert!(
        !sms[&shard(&subscriber)].published(10).expect("read"),
        "expired"
    );
    assert!(sms[&shard(&subscriber)].published(11).expect("read"));
}
