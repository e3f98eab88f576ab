//! Micro-benchmarks of the broker's hot paths:
//!
//! * `codec/*`: decoding and encoding PUBLISH (small and large), SUBSCRIBE and CONNECT;
//! * `index/*`: matching a topic against a subscription index holding 100,000 filters;
//! * `broker/*`: routing one publish to 1,000 subscribed sessions through `Broker::publish`;
//! * `state_machine/*`: applying one Raft log entry (a group-commit batch of 100 stored QoS 1
//!   messages for a persistent session) to the RocksDB state machine.
//!
//! Run with `cargo bench -p raftmq-bench --bench hot_paths` (add `-- --quick` for a short run,
//! or a name filter such as `-- codec/`).

use bytes::{Bytes, BytesMut};
use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use raftmq_codec::{
    Connect, ConnectProperties, Packet, PacketId, ProtocolVersion, Publish, PublishProperties, QoS,
    Subscribe, SubscribeFilter, SubscribeProperties, SubscriptionOptions, decode, encode,
};
use raftmq_core::auth::Principal;
use raftmq_core::config::MqttConfig;
use raftmq_core::index::SubscriptionIndex;
use raftmq_core::session::SubEntry;
use raftmq_core::topic::{TopicFilter, TopicLimits};
use raftmq_core::{Broker, Message, NEVER_EXPIRES};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const V5: ProtocolVersion = ProtocolVersion::V5;

fn publish(payload: usize) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "sensors/building-7/floor-3/room-12/temperature".into(),
        packet_id: PacketId::new(42),
        properties: PublishProperties::default(),
        payload: Bytes::from(vec![0xA5; payload]),
    })
}

fn subscribe() -> Packet {
    let filter = |f: &str| SubscribeFilter {
        filter: f.into(),
        options: SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..SubscriptionOptions::default()
        },
    };
    Packet::Subscribe(Subscribe {
        packet_id: PacketId::MIN,
        properties: SubscribeProperties {
            subscription_identifier: Some(7),
            user_properties: Vec::new(),
        },
        filters: vec![
            filter("sensors/+/floor-3/#"),
            filter("alerts/building-7/#"),
            filter("$share/workers/jobs/+"),
        ],
    })
}

fn connect() -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: V5,
        clean_start: false,
        keep_alive: 60,
        client_id: "device-0123456789abcdef".into(),
        will: None,
        username: Some("device".into()),
        password: Some(Bytes::from_static(b"s3cr3t-t0k3n")),
        properties: ConnectProperties {
            session_expiry_interval: Some(3600),
            receive_maximum: Some(128),
            ..ConnectProperties::default()
        },
    }))
}

fn codec(c: &mut Criterion) {
    let packets = [
        ("publish_64B", publish(64)),
        ("publish_64KiB", publish(64 * 1024)),
        ("subscribe", subscribe()),
        ("connect", connect()),
    ];
    let mut group = c.benchmark_group("codec");
    for (name, packet) in &packets {
        let mut wire = BytesMut::new();
        encode(packet, V5, &mut wire).expect("encodes");
        let wire = wire.freeze();
        group.throughput(Throughput::Bytes(wire.len() as u64));
        group.bench_function(format!("encode/{name}"), |b| {
            let mut buf = BytesMut::with_capacity(wire.len());
            b.iter(|| {
                buf.clear();
                encode(black_box(packet), V5, &mut buf).expect("encodes");
                black_box(buf.len())
            });
        });
        // Each iteration decodes its own copy of the bytes, made outside the measurement.
        group.bench_function(format!("decode/{name}"), |b| {
            b.iter_batched_ref(
                || BytesMut::from(&wire[..]),
                |buf| decode(buf, V5, u32::MAX).expect("decodes"),
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

/// 100,000 filters of a fleet of devices: 100 sites × 900 devices with an exact filter each,
/// plus per-device `+` and per-site `#` wildcards.
fn index(c: &mut Criterion) {
    let limits = TopicLimits::default();
    let index: SubscriptionIndex<u64, u8> = SubscriptionIndex::new(16);
    let mut key = 0;
    let mut add = |filter: String| {
        let filter = TopicFilter::new(&filter, &limits).expect("valid filter");
        index.subscribe(&filter, None, key, 1);
        key += 1;
    };
    for site in 0..100 {
        for device in 0..900 {
            add(format!("site/{site}/device/{device}/telemetry"));
        }
        for device in 0..99 {
            add(format!("site/{site}/device/{device}/+"));
        }
        add(format!("site/{site}/#"));
    }
    assert_eq!(index.len(), 100_000);
    let topics: Vec<String> = (0..1024)
        .map(|i| format!("site/{}/device/{}/telemetry", i % 100, (i * 7) % 900))
        .collect();

    let mut group = c.benchmark_group("index");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("match/100k_filters", |b| {
        b.iter(|| {
            i = (i + 1) % topics.len();
            let mut matches = 0;
            index.for_each_match(black_box(&topics[i]), |_| matches += 1);
            matches
        });
    });
    group.bench_function("miss/100k_filters", |b| {
        b.iter(|| {
            let mut matches = 0;
            index.for_each_match(black_box("other/7/device/1/telemetry"), |_| matches += 1);
            matches
        });
    });
    group.finish();
}

/// Sessions subscribed to the fan-out topic.
const SESSIONS: usize = 1000;
/// Publishes between two resets of the sessions' queues (below the default queue limit, so no
/// publish is measured on the cheaper queue-full path).
const PUBLISHES_PER_RESET: u64 = 500;

/// Attaches (fresh, clean start) and subscribes every session to `fan/out` at QoS 0.
fn attach_all(broker: &Broker, now: Instant) {
    let principal = Principal::default();
    for i in 0..SESSIONS {
        let attached = broker.attach(
            &format!("session-{i}").into(),
            true,
            NEVER_EXPIRES,
            None,
            now,
        );
        broker
            .subscribe(
                &attached.session,
                attached.epoch,
                &principal,
                "fan/out",
                SubEntry {
                    options: SubscriptionOptions::default(),
                    subscription_id: None,
                },
                now,
            )
            .expect("not taken over");
    }
}

fn broker(c: &mut Criterion) {
    let broker = Broker::new(MqttConfig::default());
    let now = Instant::now();
    attach_all(&broker, now);
    let message = Arc::new(Message {
        topic: "fan/out".into(),
        payload: Bytes::from(vec![0; 64]),
        qos: QoS::AtMostOnce,
        retain: false,
        properties: PublishProperties::default(),
        expires_at: None,
        received_at: now,
        origin: None,
    });

    assert_eq!(
        broker.publish(message.clone(), now),
        SESSIONS,
        "every session is offered the message"
    );
    attach_all(&broker, now);

    let mut group = c.benchmark_group("broker");
    group.throughput(Throughput::Elements(SESSIONS as u64));
    group.bench_function("publish/fanout_1000_sessions", |b| {
        b.iter_custom(|iters| {
            let mut measured = Duration::ZERO;
            let mut done = 0;
            while done < iters {
                let batch = PUBLISHES_PER_RESET.min(iters - done);
                let start = Instant::now();
                for _ in 0..batch {
                    black_box(broker.publish(message.clone(), now));
                }
                measured += start.elapsed();
                done += batch;
                // Reattaching with clean start drops the queued deliveries.
                attach_all(&broker, now);
            }
            measured
        });
    });
    group.finish();
}

/// One log entry holding 100 `MessageStored` changes (64 B payloads, one target each), applied
/// to the RocksDB-backed state machine: the per-entry cost behind durable QoS 1 throughput.
fn state_machine(c: &mut Criterion) {
    use raftmq_cluster::convert::{WallClock, encode_batch};
    use raftmq_cluster::state_machine::StateMachine;
    use raftmq_cluster::types::{Entry, Request};
    use raftmq_core::durability::{MessageId, StateChange, StoredTarget};
    use raftmq_store::Store;

    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path().join("raft")).expect("store");
    let sm = StateMachine::open(store.state_db(raftmq_cluster::types::DATA_SHARD.get()))
        .expect("state machine");
    let clock = WallClock::now();
    let entry = |index: u64, batch: Vec<u8>| Entry {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(1, 0), index),
        payload: openraft::EntryPayload::Normal(Request { batch }),
    };
    let open = encode_batch(
        &[StateChange::SessionOpened {
            client_id: "sub".into(),
            epoch: 1,
            clean_start: true,
            expiry_secs: 3600,
            will: None,
        }],
        &clock,
    );
    sm.apply_entry(&entry(1, open)).expect("apply");
    let now = Instant::now();
    let mut next_index = 2u64;
    let mut next_id = 1u64;
    let mut group = c.benchmark_group("state_machine");
    group.throughput(Throughput::Elements(100));
    group.bench_function("apply/entry_of_100_stored_messages", |b| {
        b.iter_batched(
            || {
                let changes: Vec<StateChange> = (0..100)
                    .map(|_| {
                        next_id += 1;
                        StateChange::MessageStored {
                            id: MessageId(next_id),
                            message: Arc::new(Message {
                                topic: "orders/new".into(),
                                payload: Bytes::from(vec![7u8; 64]),
                                qos: QoS::AtLeastOnce,
                                retain: false,
                                properties: PublishProperties::default(),
                                expires_at: None,
                                received_at: now,
                                origin: Some("pub".into()),
                            }),
                            targets: vec![StoredTarget {
                                client_id: "sub".into(),
                                qos: QoS::AtLeastOnce,
                                retain: false,
                                subscription_ids: Default::default(),
                            }],
                        }
                    })
                    .collect();
                next_index += 1;
                entry(next_index, encode_batch(&changes, &clock))
            },
            |e| sm.apply_entry(&e).expect("apply"),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, codec, index, broker, state_machine);
criterion_main!(benches);
