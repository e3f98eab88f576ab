//! A store that fails: the broker fails closed.
//!
//! Recovery that cannot read the store is an error (the broker must not start empty over
//! stored sessions), and a stored session that cannot be read refuses its client (CONNACK
//! 0x80; 3.1.1 return code 3) without touching what is stored, so the same client resumes it
//! once the store reads again.

mod support;

use parking_lot::Mutex;
use raftmq_codec::{ByteStr, ConnAck, Packet, ProtocolVersion, ReasonCode};
use raftmq_core::config::MqttConfig;
use raftmq_core::durability::{
    Commit, Durability, DurabilityError, MemoryDurability, MessageId, Recovered, SessionLoad,
    StateChange,
};
use raftmq_core::{Broker, Connection};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// A durability layer over [`MemoryDurability`] whose reads fail while `failing` is set.
/// Session loads read the stored image the way a cluster node does (after the claim), so a
/// client resuming a stored session that is not in memory depends on the read.
#[derive(Default)]
struct FailingStore {
    state: MemoryDurability,
    failing: AtomicBool,
    loads: Mutex<usize>,
}

impl Durability for FailingStore {
    fn propose(&self, changes: Vec<StateChange>) -> Commit {
        self.state.propose(changes)
    }

    fn next_message_id(&self) -> MessageId {
        self.state.next_message_id()
    }

    fn recover(&self) -> Result<Recovered, DurabilityError> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(DurabilityError::Storage);
        }
        self.state.recover()
    }

    fn load_session(&self, client_id: &ByteStr, claim: Commit) -> SessionLoad {
        *self.loads.lock() += 1;
        let (load, handle) = SessionLoad::pending();
        if self.failing.load(Ordering::Relaxed) {
            handle.complete(Err(DurabilityError::Storage));
            return load;
        }
        assert_eq!(
            claim.result(),
            Some(Ok(())),
            "the claim commits at once here"
        );
        let found = self
            .state
            .image()
            .recovered()
            .sessions
            .into_iter()
            .find(|s| &s.client_id == client_id)
            .map(|image| (image, 0));
        handle.complete(Ok(found));
        load
    }
}

fn connect(version: ProtocolVersion, id: &str) -> Packet {
    let mut connect = support::connect(version, id, false);
    connect.properties.session_expiry_interval = version.is_v5().then_some(3600);
    Packet::Connect(Box::new(connect))
}

/// Connects `id` (resuming its session) and returns the CONNACK and whether the connection is
/// closed.
fn connack(broker: &Arc<Broker>, version: ProtocolVersion, id: &str) -> (ConnAck, bool) {
    let now = Instant::now();
    let mut c = Connection::new(broker.clone(), None, now);
    c.handle_packet(connect(version, id), now);
    c.handle_commits(now);
    c.pump(now, usize::MAX);
    match c.poll_transmit() {
        Some(Packet::ConnAck(ack)) => (ack, c.is_closed()),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// A broker over `store` holding nothing in memory (as after a restart elsewhere), with one
/// stored session `id` subscribed to `t/#`.
fn broker_with_stored_session(store: &Arc<FailingStore>, id: &str) -> Arc<Broker> {
    let writer = Arc::new(
        Broker::new(MqttConfig::default()).with_durability(store.clone() as Arc<dyn Durability>),
    );
    let now = Instant::now();
    let mut c = Connection::new(writer.clone(), None, now);
    c.handle_packet(connect(ProtocolVersion::V5, id), now);
    c.handle_commits(now);
    c.handle_packet(
        Packet::Subscribe(raftmq_codec::Subscribe {
            packet_id: raftmq_codec::PacketId::new(1).expect("non-zero"),
            properties: Default::default(),
            filters: vec![raftmq_codec::SubscribeFilter {
                filter: "t/#".into(),
                options: raftmq_codec::SubscriptionOptions {
                    qos: raftmq_codec::QoS::AtLeastOnce,
                    ..Default::default()
                },
            }],
        }),
        now,
    );
    c.handle_transport_closed(now);
    assert!(
        store
            .state
            .image()
            .recovered()
            .sessions
            .iter()
            .any(|s| s.client_id.as_str() == id),
        "the session is stored"
    );
    // A second broker (another node) that has not loaded it.
    Arc::new(
        Broker::new(MqttConfig::default()).with_durability(store.clone() as Arc<dyn Durability>),
    )
}

#[test]
fn recovery_from_an_unreadable_store_is_an_error_and_restores_nothing() {
    let store = Arc::new(FailingStore::default());
    let _ = broker_with_stored_session(&store, "kept");
    store.failing.store(true, Ordering::Relaxed);
    let broker =
        Broker::new(MqttConfig::default()).with_durability(store.clone() as Arc<dyn Durability>);
    assert_eq!(
        broker.recover(Instant::now()),
        Err(DurabilityError::Storage)
    );
    assert_eq!(broker.session_count(), 0);
    store.failing.store(false, Ordering::Relaxed);
    assert_eq!(broker.recover(Instant::now()), Ok(1));
}

#[test]
fn an_unreadable_stored_session_refuses_its_client_and_keeps_the_data() {
    for (version, expected) in [
        (ProtocolVersion::V5, ReasonCode::UNSPECIFIED_ERROR),
        (ProtocolVersion::V3_1_1, ReasonCode::UNSPECIFIED_ERROR),
    ] {
        let store = Arc::new(FailingStore::default());
        let broker = broker_with_stored_session(&store, "resumer");
        store.failing.store(true, Ordering::Relaxed);
        let (ack, closed) = connack(&broker, version, "resumer");
        assert_eq!(ack.reason_code, expected, "{version:?}");
        assert!(!ack.session_present);
        assert!(closed, "{version:?}: the refused connection closes");
        // 3.1.1 carries it as return code 3 (server unavailable).
        assert_eq!(ack.reason_code.to_v3_connack(), 3);
        // Nothing was taken over an empty session: the stored one is intact...
        let stored = store.state.image().recovered().sessions;
        let session = stored
            .iter()
            .find(|s| s.client_id.as_str() == "resumer")
            .expect("the stored session is kept");
        assert_eq!(session.subscriptions.len(), 1, "{version:?}");
        assert!(
            broker.session("resumer").is_none(),
            "no empty session left in memory"
        );
        // ...and the client resumes it once the store reads again.
        store.failing.store(false, Ordering::Relaxed);
        let (ack, closed) = connack(&broker, version, "resumer");
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
        assert!(ack.session_present, "{version:?}");
        assert!(!closed);
        assert_eq!(
            broker
                .session("resumer")
                .expect("resumed")
                .subscription_count(),
            1
        );
        assert!(*store.loads.lock() >= 2);
    }
}
