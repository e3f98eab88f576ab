//! Conformance scenarios driving [`Broker`] and [`Connection`] directly (sans-IO).
//!
//! Time is a fake clock: a base `Instant` plus offsets, passed to every call. Nothing sleeps.
//! Each client is a `Connection` fed decoded packets; what it would send is collected with
//! `pump` + `poll_transmit`.

mod support;

use bytes::Bytes;
use raftmq_codec::{
    ConnAck, Connect, ConnectProperties, DecodeError, Disconnect, DisconnectProperties, Packet,
    PacketId, ProtocolVersion, PubResponse, Publish, PublishProperties, QoS, ReasonCode,
    RetainHandling, SubAck, Subscribe, SubscribeFilter, SubscribeProperties, SubscriptionOptions,
    UnsubAck, Unsubscribe, Will, WillProperties,
};
use raftmq_core::config::{MqttConfig, OverflowPolicy};
use raftmq_core::stats::DropReason;
use raftmq_core::{Broker, CloseReason, Connection};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------------

/// A broker and a fake clock.
struct World {
    broker: Arc<Broker>,
    t0: Instant,
}

impl World {
    fn new() -> Self {
        Self::with_config(MqttConfig::default())
    }

    fn with_config(config: MqttConfig) -> Self {
        World {
            broker: Arc::new(Broker::new(config)),
            t0: Instant::now(),
        }
    }

    /// The fake clock at `secs` seconds after the start.
    fn at(&self, secs: u64) -> Instant {
        self.t0 + Duration::from_secs(secs)
    }

    /// A fresh network connection, accepted at `now`, with nothing sent yet.
    fn open(&self, now: Instant) -> Client {
        Client {
            conn: Connection::new(self.broker.clone(), None, now),
        }
    }

    /// Opens a connection and sends `connect`; returns the client and its CONNACK.
    fn connect(&self, connect: Connect, now: Instant) -> (Client, ConnAck) {
        let mut c = self.open(now);
        c.send(Packet::Connect(Box::new(connect)), now);
        // Only the CONNACK: what follows (resent or queued messages) stays for the test.
        let connack = match c.conn.poll_transmit() {
            Some(Packet::ConnAck(ack)) => ack,
            other => panic!("expected CONNACK, got {other:?}"),
        };
        (c, connack)
    }

    /// Connects a v5 client with clean start and asserts success.
    fn connect_v5(&self, id: &str, now: Instant) -> Client {
        self.connect_ok(v5(id), now)
    }

    fn connect_ok(&self, connect: Connect, now: Instant) -> Client {
        let (c, ack) = self.connect(connect, now);
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "{ack:?}");
        c
    }
}

/// One client's network connection.
struct Client {
    conn: Connection,
}

impl Client {
    /// Feeds one packet from the client (without pumping deliveries).
    fn send(&mut self, packet: Packet, now: Instant) {
        self.conn.handle_packet(packet, now);
    }

    /// Pumps deliveries and returns everything the broker would send now.
    fn drain(&mut self, now: Instant) -> Vec<Packet> {
        self.conn.pump(now, usize::MAX);
        std::iter::from_fn(|| self.conn.poll_transmit()).collect()
    }

    /// Sends a packet and returns the broker's answer(s).
    fn exchange(&mut self, packet: Packet, now: Instant) -> Vec<Packet> {
        self.send(packet, now);
        self.drain(now)
    }

    /// Subscribes and asserts the SUBACK grants `options.qos`.
    fn subscribe(&mut self, filter: &str, options: SubscriptionOptions, now: Instant) {
        self.subscribe_with_id(filter, options, None, now);
    }

    /// Subscribes with a subscription identifier; returns what followed the SUBACK
    /// (retained messages).
    fn subscribe_with_id(
        &mut self,
        filter: &str,
        options: SubscriptionOptions,
        id: Option<u32>,
        now: Instant,
    ) -> Vec<Packet> {
        let mut out = self.exchange(subscribe(filter, options, id), now);
        assert!(!out.is_empty(), "no SUBACK");
        match out.remove(0) {
            Packet::SubAck(SubAck { reason_codes, .. }) => {
                assert_eq!(reason_codes, [ReasonCode(options.qos.as_u8())]);
            }
            other => panic!("expected SUBACK, got {other:?}"),
        }
        out
    }

    /// Publishes and returns the broker's acknowledgement (if any).
    fn publish(&mut self, p: Publish, now: Instant) -> Vec<Packet> {
        self.exchange(Packet::Publish(p), now)
    }

    /// The PUBLISH packets the broker sends now (asserting nothing else is sent).
    fn publishes(&mut self, now: Instant) -> Vec<Publish> {
        self.drain(now)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => p,
                other => panic!("expected only PUBLISH, got {other:?}"),
            })
            .collect()
    }

    /// Asserts the broker sends a DISCONNECT with `code` and closes.
    fn expect_disconnect(&mut self, code: ReasonCode, now: Instant) {
        let out = self.drain(now);
        assert_eq!(
            out,
            [Packet::Disconnect(Disconnect::with_code(code))],
            "expected DISCONNECT {code:?}"
        );
        assert!(self.conn.is_closed());
    }

    fn disconnect(&mut self, code: ReasonCode, now: Instant) {
        self.send(Packet::Disconnect(Disconnect::with_code(code)), now);
        assert!(self.conn.is_closed());
    }
}

fn pid(n: u16) -> PacketId {
    PacketId::new(n).expect("non-zero packet id")
}

fn v5(id: &str) -> Connect {
    support::connect(ProtocolVersion::V5, id, true)
}

/// A v5 CONNECT resuming (or creating) a session that lasts `expiry` seconds.
fn v5_persistent(id: &str, expiry: u32) -> Connect {
    Connect {
        clean_start: false,
        properties: ConnectProperties {
            session_expiry_interval: Some(expiry),
            ..Default::default()
        },
        ..v5(id)
    }
}

fn v311(id: &str, clean: bool) -> Connect {
    Connect {
        protocol: ProtocolVersion::V3_1_1,
        clean_start: clean,
        ..v5(id)
    }
}

fn will(topic: &str, delay: Option<u32>) -> Will {
    Will {
        topic: topic.into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: WillProperties {
            will_delay_interval: delay,
            ..Default::default()
        },
    }
}

fn qos(q: u8) -> SubscriptionOptions {
    SubscriptionOptions {
        qos: QoS::from_u8(q).expect("qos 0..=2"),
        ..Default::default()
    }
}

fn subscribe(filter: &str, options: SubscriptionOptions, id: Option<u32>) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: pid(100),
        properties: SubscribeProperties {
            subscription_identifier: id,
            ..Default::default()
        },
        filters: vec![SubscribeFilter {
            filter: filter.into(),
            options,
        }],
    })
}

fn msg(topic: &str, q: u8, packet_id: u16, payload: &'static [u8]) -> Publish {
    let qos = QoS::from_u8(q).expect("qos 0..=2");
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: (qos != QoS::AtMostOnce).then(|| pid(packet_id)),
        properties: PublishProperties::default(),
        payload: Bytes::from_static(payload),
    }
}

fn retained(topic: &str, q: u8, payload: &'static [u8]) -> Publish {
    Publish {
        retain: true,
        ..msg(topic, q, 1, payload)
    }
}

fn payloads(ps: &[Publish]) -> Vec<&[u8]> {
    ps.iter().map(|p| &p.payload[..]).collect()
}

fn puback(id: PacketId) -> Packet {
    Packet::PubAck(PubResponse::success(id))
}

/// A waker that counts its wake-ups.
#[derive(Default)]
struct CountingWaker(AtomicUsize);

impl Wake for CountingWaker {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------------
// Keep alive and CONNECT timeout
// ---------------------------------------------------------------------------------------------

/// Conformance (5.0): [MQTT-3.1.2-22] [MQTT-3.2.2-22] [MQTT-3.12.4-1] [MQTT-3.14.2-1]
/// Conformance (5.0): [MQTT-4.13.2-1]
#[test]
fn keep_alive_expires_after_one_and_a_half_intervals_with_disconnect_0x8d() {
    let w = World::new();
    let mut c = w.connect_ok(
        Connect {
            keep_alive: 10,
            ..v5("ka")
        },
        w.at(0),
    );
    // Any packet restarts the timer.
    assert_eq!(c.exchange(Packet::PingReq, w.at(10)), [Packet::PingResp]);
    assert_eq!(c.conn.poll_timeout(), Some(w.at(25)));
    c.conn.handle_timeout(w.at(24));
    assert!(!c.conn.is_closed(), "closed before 1.5 x keep alive");
    c.conn.handle_timeout(w.at(25));
    c.expect_disconnect(ReasonCode::KEEP_ALIVE_TIMEOUT, w.at(25));
    assert_eq!(c.conn.close_reason(), Some(CloseReason::KeepAliveTimeout));
    assert!(!w.broker.session("ka").is_some_and(|s| s.is_online()));
}

/// Conformance (3.1.1): [MQTT-3.1.2-24]
#[test]
fn keep_alive_timeout_on_v311_closes_without_disconnect() {
    let w = World::new();
    let mut c = w.connect_ok(
        Connect {
            keep_alive: 4,
            ..v311("ka3", true)
        },
        w.at(0),
    );
    c.conn.handle_timeout(w.at(6));
    assert!(c.conn.is_closed());
    assert_eq!(c.drain(w.at(6)), []);
}

/// Conformance (5.0): [MQTT-3.14.0-1]
#[test]
fn connection_without_connect_is_closed_after_connect_timeout() {
    let w = World::new();
    let mut c = w.open(w.at(0));
    let deadline = c.conn.poll_timeout().expect("a CONNECT deadline");
    assert!(deadline > w.at(0) && deadline <= w.at(60));
    c.conn.handle_timeout(deadline - Duration::from_millis(1));
    assert!(!c.conn.is_closed());
    c.conn.handle_timeout(deadline);
    assert!(c.conn.is_closed());
    assert_eq!(c.drain(deadline), [], "nothing is sent before CONNECT");
}

// ---------------------------------------------------------------------------------------------
// Wills
// ---------------------------------------------------------------------------------------------

/// A subscriber to `will/#` (QoS 1).
fn will_watcher(w: &World) -> Client {
    let mut s = w.connect_v5("watcher", w.at(0));
    s.subscribe("will/#", qos(1), w.at(0));
    s
}

fn with_will(connect: Connect, delay: Option<u32>) -> Connect {
    Connect {
        will: Some(will("will/x", delay)),
        ..connect
    }
}

/// Conformance (5.0): [MQTT-3.1.2-7] [MQTT-3.1.2-8]
#[test]
fn delayed_will_is_published_when_the_delay_elapses() {
    let w = World::new();
    let mut watcher = will_watcher(&w);
    let mut c = w.connect_ok(with_will(v5_persistent("w1", 60), Some(5)), w.at(0));
    c.conn.handle_transport_closed(w.at(10));
    assert_eq!(w.broker.poll_timeout(), Some(w.at(15)));
    w.broker.handle_timeout(w.at(14));
    assert_eq!(watcher.publishes(w.at(14)), []);
    w.broker.handle_timeout(w.at(15));
    let got = watcher.publishes(w.at(15));
    assert_eq!(payloads(&got), [b"gone"]);
    assert_eq!(got[0].topic, "will/x");
    // The session itself outlives the will.
    assert!(w.broker.session("w1").is_some());
}

/// Conformance (5.0): [MQTT-3.1.2-8] [MQTT-3.1.3-9]
#[test]
fn delayed_will_is_not_published_when_the_client_reconnects_within_the_delay() {
    let w = World::new();
    let mut watcher = will_watcher(&w);
    let mut c = w.connect_ok(with_will(v5_persistent("w2", 60), Some(5)), w.at(0));
    c.conn.handle_transport_closed(w.at(10));
    let (_c2, ack) = w.connect(v5_persistent("w2", 60), w.at(12));
    assert!(ack.session_present);
    w.broker.handle_timeout(w.at(100));
    assert_eq!(watcher.publishes(w.at(100)), []);
}

/// Conformance (5.0): [MQTT-3.1.2-8]
#[test]
fn delayed_will_is_published_at_once_when_session_expiry_zero_ends_the_session() {
    let w = World::new();
    let mut watcher = will_watcher(&w);
    let mut c = w.connect_ok(with_will(v5("w3"), Some(30)), w.at(0));
    c.conn.handle_transport_closed(w.at(1));
    assert_eq!(payloads(&watcher.publishes(w.at(1))), [b"gone"]);
    assert!(w.broker.session("w3").is_none());
}

/// Conformance (5.0): [MQTT-3.1.2-8]
#[test]
fn delayed_will_is_published_when_session_expiry_is_shorter_than_the_delay() {
    let w = World::new();
    let mut watcher = will_watcher(&w);
    let mut c = w.connect_ok(with_will(v5_persistent("w4", 3), Some(30)), w.at(0));
    c.conn.handle_transport_closed(w.at(0));
    w.broker.handle_timeout(w.at(2));
    assert_eq!(watcher.publishes(w.at(2)), []);
    w.broker.handle_timeout(w.at(3));
    assert_eq!(payloads(&watcher.publishes(w.at(3))), [b"gone"]);
    assert!(w.broker.session("w4").is_none());
}

/// Conformance (5.0): [MQTT-3.1.2-8] [MQTT-3.1.2-10] [MQTT-3.14.4-3]
#[test]
fn will_is_discarded_after_normal_disconnect() {
    let w = World::new();
    let mut watcher = will_watcher(&w);
    let mut c = w.connect_ok(with_will(v5_persistent("w5", 60), None), w.at(0));
    c.disconnect(ReasonCode::NORMAL_DISCONNECTION, w.at(1));
    w.broker.handle_timeout(w.at(1000));
    assert_eq!(watcher.publishes(w.at(1000)), []);
    assert_eq!(w.broker.stats().wills_published.load(Ordering::Relaxed), 0);
}

#[test]
fn will_is_published_at_once_after_disconnect_with_will_message() {
    let w = World::new();
    let mut watcher = will_watcher(&w);
    let mut c = w.connect_ok(with_will(v5_persistent("w6", 60), None), w.at(0));
    c.disconnect(ReasonCode::DISCONNECT_WITH_WILL_MESSAGE, w.at(1));
    assert_eq!(payloads(&watcher.publishes(w.at(1))), [b"gone"]);
}

/// Conformance (3.1.1): [MQTT-3.1.2-8]
#[test]
fn will_is_published_when_a_v311_client_drops_the_connection() {
    let w = World::new();
    let mut watcher = will_watcher(&w);
    let mut c = w.connect_ok(with_will(v311("w7", true), None), w.at(0));
    c.conn.handle_transport_closed(w.at(1));
    assert_eq!(payloads(&watcher.publishes(w.at(1))), [b"gone"]);
}

#[test]
fn will_is_published_when_the_server_closes_for_a_protocol_error() {
    let w = World::new();
    let mut watcher = will_watcher(&w);
    let mut c = w.connect_ok(with_will(v5_persistent("w8", 60), None), w.at(0));
    c.send(Packet::PingResp, w.at(1));
    c.expect_disconnect(ReasonCode::PROTOCOL_ERROR, w.at(1));
    assert_eq!(payloads(&watcher.publishes(w.at(1))), [b"gone"]);
}

/// A new connection for the client id within the will delay cancels the will, also when it
/// starts clean and so ends the offline session (the reading is explained in
/// docs/conformance.md); the session itself is not resumed.
/// Conformance (5.0): [MQTT-3.1.2-4] [MQTT-3.1.2-8] [MQTT-3.1.3-9]
#[test]
fn delayed_will_is_cancelled_by_a_clean_start_reconnect_within_the_delay() {
    let w = World::new();
    let mut watcher = will_watcher(&w);
    let mut c = w.connect_ok(with_will(v5_persistent("w9", 60), Some(30)), w.at(0));
    c.conn.handle_transport_closed(w.at(1));
    let (_c2, ack) = w.connect(v5("w9"), w.at(2));
    assert!(!ack.session_present);
    assert_eq!(watcher.publishes(w.at(2)), []);
    // Not later either.
    w.broker.handle_timeout(w.at(100));
    assert_eq!(watcher.publishes(w.at(100)), []);
}

#[test]
fn scheduling_an_earlier_timer_wakes_the_broker_timer_task() {
    let w = World::new();
    let waker = Arc::new(CountingWaker::default());
    let task = Waker::from(waker.clone());
    let mut cx = Context::from_waker(&task);
    assert_eq!(w.broker.poll_timers_changed(&mut cx), Poll::Pending);
    let mut c = w.connect_ok(with_will(v5_persistent("t1", 60), Some(5)), w.at(0));
    c.conn.handle_transport_closed(w.at(0));
    assert_eq!(waker.0.load(Ordering::SeqCst), 1);
    // The task must see the change (not go back to sleep until its old deadline)...
    assert_eq!(w.broker.poll_timers_changed(&mut cx), Poll::Ready(()));
    assert_eq!(w.broker.poll_timeout(), Some(w.at(5)));
    // ...once.
    assert_eq!(w.broker.poll_timers_changed(&mut cx), Poll::Pending);
}

/// Conformance (5.0): [MQTT-3.3.2-6]
#[test]
fn will_message_expiry_counts_from_publication_not_from_connect() {
    let w = World::new();
    let mut watcher = will_watcher(&w);
    let mut offline = w.connect_ok(v5_persistent("away", 1000), w.at(0));
    offline.subscribe("will/#", qos(1), w.at(0));
    offline.disconnect(ReasonCode::NORMAL_DISCONNECTION, w.at(0));
    let expiring_will = Will {
        properties: WillProperties {
            message_expiry_interval: Some(10),
            ..Default::default()
        },
        ..will("will/x", None)
    };
    let mut c = w.connect_ok(
        Connect {
            will: Some(expiring_will),
            ..v5("w10")
        },
        w.at(0),
    );
    c.conn.handle_transport_closed(w.at(100));
    let got = watcher.publishes(w.at(100));
    assert_eq!(got.len(), 1, "the will expired before it was published");
    assert_eq!(got[0].properties.message_expiry_interval, Some(10));
    let (mut offline, _) = w.connect(v5_persistent("away", 1000), w.at(104));
    let got = offline.publishes(w.at(104));
    assert_eq!(payloads(&got), [b"gone"]);
    assert_eq!(got[0].properties.message_expiry_interval, Some(6));
}

// ---------------------------------------------------------------------------------------------
// Session expiry and persistence
// ---------------------------------------------------------------------------------------------

/// Conformance (5.0): [MQTT-3.1.2-6] [MQTT-3.2.2-3] [MQTT-4.1.0-2]
#[test]
fn session_ends_when_its_expiry_interval_elapses() {
    let w = World::new();
    let mut c = w.connect_ok(v5_persistent("exp", 10), w.at(0));
    c.subscribe("a", qos(1), w.at(0));
    c.disconnect(ReasonCode::NORMAL_DISCONNECTION, w.at(5));
    w.broker.handle_timeout(w.at(14));
    assert!(w.broker.session("exp").is_some(), "expired early");
    w.broker.handle_timeout(w.at(15));
    assert!(w.broker.session("exp").is_none());
    assert_eq!(w.broker.subscription_count(), 0);
    let (_c, ack) = w.connect(v5_persistent("exp", 10), w.at(16));
    assert!(!ack.session_present);
}

/// Conformance (5.0): [MQTT-3.1.2-5] [MQTT-3.1.2-23] [MQTT-3.1.3-2] [MQTT-3.2.2-3] [MQTT-4.1.0-1]
/// Conformance (5.0): [MQTT-4.5.0-1]
#[test]
fn session_resumed_before_expiry_keeps_subscriptions_and_queued_messages() {
    let w = World::new();
    let mut c = w.connect_ok(v5_persistent("keep", 10), w.at(0));
    c.subscribe("a", qos(1), w.at(0));
    c.disconnect(ReasonCode::NORMAL_DISCONNECTION, w.at(1));
    let mut p = w.connect_v5("pub", w.at(2));
    p.publish(msg("a", 1, 1, b"while away"), w.at(2));
    w.broker.handle_timeout(w.at(9));
    let (mut c, ack) = w.connect(v5_persistent("keep", 10), w.at(9));
    assert!(ack.session_present);
    let got = c.publishes(w.at(9));
    assert_eq!(payloads(&got), [b"while away"]);
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    // The reconnect cancelled the old expiry.
    w.broker.handle_timeout(w.at(100));
    assert!(w.broker.session("keep").is_some());
}

#[test]
fn stale_expiry_timer_does_not_end_a_newer_session_with_the_same_client_id() {
    let w = World::new();
    let mut c = w.connect_ok(v5_persistent("same", 10), w.at(0));
    c.disconnect(ReasonCode::NORMAL_DISCONNECTION, w.at(0)); // old expiry at 10s
    let mut c = w.connect_ok(
        Connect {
            clean_start: true,
            ..v5_persistent("same", 100)
        },
        w.at(1),
    );
    c.subscribe("a", qos(1), w.at(1));
    c.disconnect(ReasonCode::NORMAL_DISCONNECTION, w.at(2)); // new expiry at 102s
    w.broker.handle_timeout(w.at(50));
    let (_c, ack) = w.connect(v5_persistent("same", 100), w.at(50));
    assert!(
        ack.session_present,
        "the new session expired on the old timer"
    );
}

/// Conformance (5.0): [MQTT-3.1.2-4] [MQTT-3.1.4-4] [MQTT-3.2.2-2]
#[test]
fn clean_start_discards_the_existing_session() {
    let w = World::new();
    let mut c = w.connect_ok(v5_persistent("cs", 100), w.at(0));
    c.subscribe("a", qos(1), w.at(0));
    c.disconnect(ReasonCode::NORMAL_DISCONNECTION, w.at(0));
    let (mut c, ack) = w.connect(v5("cs"), w.at(1));
    assert!(!ack.session_present);
    assert_eq!(w.broker.subscription_count(), 0);
    let mut p = w.connect_v5("pub", w.at(1));
    p.publish(msg("a", 1, 1, b"x"), w.at(1));
    assert_eq!(c.publishes(w.at(1)), []);
}

/// Conformance (3.1.1): [MQTT-3.1.2-4] [MQTT-3.1.2-5] [MQTT-3.2.2-2] [MQTT-4.5.0-1]
#[test]
fn v311_persistent_session_queues_qos1_and_qos2_but_not_qos0_while_offline() {
    let w = World::new();
    let mut c = w.connect_ok(v311("p311", false), w.at(0));
    c.subscribe("q/#", qos(2), w.at(0));
    c.send(Packet::Disconnect(Disconnect::default()), w.at(0));
    let mut p = w.connect_v5("pub", w.at(1));
    p.publish(msg("q/0", 0, 0, b"zero"), w.at(1));
    p.publish(msg("q/1", 1, 1, b"one"), w.at(1));
    p.publish(msg("q/2", 2, 2, b"two"), w.at(1));
    assert_eq!(w.broker.stats().dropped_count(DropReason::Offline), 1);
    let (mut c, ack) = w.connect(v311("p311", false), w.at(2));
    assert!(ack.session_present);
    let got = c.publishes(w.at(2));
    assert_eq!(payloads(&got), [&b"one"[..], b"two"]);
    assert_eq!(
        got.iter().map(|p| p.qos).collect::<Vec<_>>(),
        [QoS::AtLeastOnce, QoS::ExactlyOnce]
    );
}

#[test]
fn disconnect_may_not_raise_session_expiry_from_zero() {
    let w = World::new();
    let mut c = w.connect_v5("raise", w.at(0));
    c.send(
        Packet::Disconnect(Disconnect {
            reason_code: ReasonCode::NORMAL_DISCONNECTION,
            properties: DisconnectProperties {
                session_expiry_interval: Some(60),
                ..Default::default()
            },
        }),
        w.at(1),
    );
    c.expect_disconnect(ReasonCode::PROTOCOL_ERROR, w.at(1));
    assert!(w.broker.session("raise").is_none());
}

#[test]
fn disconnect_can_change_a_nonzero_session_expiry() {
    let w = World::new();
    let mut c = w.connect_ok(v5_persistent("lower", 100), w.at(0));
    c.send(
        Packet::Disconnect(Disconnect {
            reason_code: ReasonCode::NORMAL_DISCONNECTION,
            properties: DisconnectProperties {
                session_expiry_interval: Some(0),
                ..Default::default()
            },
        }),
        w.at(1),
    );
    assert!(c.conn.is_closed());
    assert!(w.broker.session("lower").is_none(), "expiry 0 ends it now");
}

// ---------------------------------------------------------------------------------------------
// Takeover
// ---------------------------------------------------------------------------------------------

/// Conformance (5.0): [MQTT-3.1.4-3] [MQTT-3.3.1-1] [MQTT-4.3.2-3] [MQTT-4.3.3-5] [MQTT-4.3.3-6]
/// Conformance (5.0): [MQTT-4.4.0-1] [MQTT-4.6.0-5] [MQTT-4.6.0-6]
#[test]
fn takeover_fences_the_old_connection_and_resends_unacknowledged_messages_in_order() {
    let w = World::new();
    let mut old = w.connect_ok(v5_persistent("dev", 100), w.at(0));
    old.subscribe("t", qos(2), w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(msg("t", 1, 1, b"m1"), w.at(1));
    p.publish(msg("t", 2, 2, b"m2"), w.at(1));
    p.publish(msg("t", 2, 3, b"m3"), w.at(1));
    let first = old.publishes(w.at(1));
    assert_eq!(payloads(&first), [&b"m1"[..], b"m2", b"m3"]);
    assert!(first.iter().all(|p| !p.dup));
    // m3 is received (PUBREC → PUBREL), m1 and m2 are not acknowledged.
    let m3 = first[2].packet_id.expect("QoS 2 has an id");
    assert_eq!(
        old.exchange(Packet::PubRec(PubResponse::success(m3)), w.at(1)),
        [Packet::PubRel(PubResponse::success(m3))]
    );

    let (mut new, ack) = w.connect(v5_persistent("dev", 100), w.at(2));
    assert!(ack.session_present);
    let resent = new.drain(w.at(2));
    let [
        Packet::Publish(r1),
        Packet::Publish(r2),
        Packet::PubRel(rel),
    ] = &resent[..]
    else {
        panic!("expected PUBLISH m1, PUBLISH m2, PUBREL m3; got {resent:?}");
    };
    assert_eq!(
        (&r1.payload[..], r1.dup, r1.packet_id),
        (&b"m1"[..], true, first[0].packet_id)
    );
    assert_eq!(
        (&r2.payload[..], r2.dup, r2.packet_id),
        (&b"m2"[..], true, first[1].packet_id)
    );
    assert_eq!(rel.packet_id, m3);
    assert_eq!(w.broker.stats().takeovers.load(Ordering::Relaxed), 1);

    // The old connection can no longer acknowledge anything: it is told and closed.
    let m1 = first[0].packet_id.expect("QoS 1 has an id");
    old.send(puback(m1), w.at(3));
    old.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER, w.at(3));
    assert_eq!(old.conn.close_reason(), Some(CloseReason::TakenOver));
    let session = w.broker.session("dev").expect("session");
    assert!(
        session.is_online(),
        "the old connection must not detach the new one"
    );
    assert_eq!(session.queue_depth(), (0, 3));

    // The new connection completes everything.
    new.send(puback(m1), w.at(3));
    let m2 = r2.packet_id.expect("QoS 2 has an id");
    assert_eq!(
        new.exchange(Packet::PubRec(PubResponse::success(m2)), w.at(3)),
        [Packet::PubRel(PubResponse::success(m2))]
    );
    new.send(Packet::PubComp(PubResponse::success(m2)), w.at(3));
    new.send(Packet::PubComp(PubResponse::success(m3)), w.at(3));
    assert_eq!(session.queue_depth(), (0, 0));
}

/// Conformance (5.0): [MQTT-3.1.4-3] [MQTT-3.14.2-2]
#[test]
fn taken_over_connection_notices_without_sending_anything() {
    let w = World::new();
    let mut old = w.connect_ok(v5_persistent("idle", 100), w.at(0));
    let (_new, ack) = w.connect(v5_persistent("idle", 100), w.at(1));
    assert!(ack.session_present);
    old.expect_disconnect(ReasonCode::SESSION_TAKEN_OVER, w.at(1));
}

/// Conformance (3.1.1): [MQTT-3.1.4-2]
#[test]
fn v311_takeover_closes_the_old_connection_without_disconnect() {
    let w = World::new();
    let mut old = w.connect_ok(v311("d311", false), w.at(0));
    let (_new, ack) = w.connect(v311("d311", false), w.at(1));
    assert!(ack.session_present);
    assert_eq!(old.drain(w.at(1)), []);
    assert!(old.conn.is_closed());
}

#[test]
fn old_connection_cannot_steal_wakeups_from_the_one_that_took_over() {
    let w = World::new();
    let mut old = w.connect_ok(v5_persistent("wake", 100), w.at(0));
    old.subscribe("t", qos(1), w.at(0));
    let (new, _) = w.connect(v5_persistent("wake", 100), w.at(1));

    let new_waker = Arc::new(CountingWaker::default());
    let old_waker = Arc::new(CountingWaker::default());
    let new_w = Waker::from(new_waker.clone());
    let old_w = Waker::from(old_waker.clone());
    assert_eq!(
        new.conn.poll_session(&mut Context::from_waker(&new_w)),
        Poll::Pending
    );
    // The fenced-off connection is ready at once (it must go and notice the takeover)...
    assert_eq!(
        old.conn.poll_session(&mut Context::from_waker(&old_w)),
        Poll::Ready(())
    );
    // ...and a publish still wakes the new one.
    let mut p = w.connect_v5("pub", w.at(1));
    p.publish(msg("t", 1, 1, b"x"), w.at(1));
    assert_eq!(new_waker.0.load(Ordering::SeqCst), 1);
    assert_eq!(
        new.conn.poll_session(&mut Context::from_waker(&new_w)),
        Poll::Ready(())
    );
}

// ---------------------------------------------------------------------------------------------
// QoS flows
// ---------------------------------------------------------------------------------------------

/// Conformance (3.1.1): [MQTT-2.3.1-6]
/// Conformance (5.0): [MQTT-2.2.1-5] [MQTT-3.3.4-1] [MQTT-4.3.3-8] [MQTT-4.3.3-10] [MQTT-4.3.3-11]
/// Conformance (5.0): [MQTT-4.3.3-12]
#[test]
fn qos2_duplicate_publish_is_not_redelivered() {
    let w = World::new();
    let mut s = w.connect_v5("sub", w.at(0));
    s.subscribe("t", qos(2), w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    let rec = || Packet::PubRec(PubResponse::success(pid(7)));
    assert_eq!(p.publish(msg("t", 2, 7, b"once"), w.at(1)), [rec()]);
    let dup = Publish {
        dup: true,
        ..msg("t", 2, 7, b"once")
    };
    assert_eq!(p.publish(dup, w.at(1)), [rec()]);
    assert_eq!(payloads(&s.publishes(w.at(1))), [b"once"]);
    assert_eq!(
        p.exchange(Packet::PubRel(PubResponse::success(pid(7))), w.at(2)),
        [Packet::PubComp(PubResponse::success(pid(7)))]
    );
    // After PUBCOMP the id is free: the same id now carries a new message.
    p.publish(msg("t", 2, 7, b"again"), w.at(3));
    assert_eq!(payloads(&s.publishes(w.at(3))), [b"again"]);
}

/// Conformance (5.0): [MQTT-3.7.2-1]
#[test]
fn pubrel_for_unknown_packet_id_gets_pubcomp_0x92() {
    let w = World::new();
    let mut p = w.connect_v5("pub", w.at(0));
    let out = p.exchange(Packet::PubRel(PubResponse::success(pid(9))), w.at(0));
    assert_eq!(
        out,
        [Packet::PubComp(PubResponse {
            reason_code: ReasonCode::PACKET_IDENTIFIER_NOT_FOUND,
            ..PubResponse::success(pid(9))
        })]
    );
}

/// Conformance (5.0): [MQTT-3.4.2-1]
#[test]
fn publish_without_subscribers_is_acked_with_no_matching_subscribers_on_v5() {
    let w = World::new();
    let mut p = w.connect_v5("pub", w.at(0));
    let out = p.publish(msg("nobody", 1, 3, b"x"), w.at(0));
    assert_eq!(
        out,
        [Packet::PubAck(PubResponse {
            reason_code: ReasonCode::NO_MATCHING_SUBSCRIBERS,
            ..PubResponse::success(pid(3))
        })]
    );
}

/// Conformance (3.1.1): [MQTT-4.3.1-1]
/// Conformance (5.0): [MQTT-3.8.4-8] [MQTT-4.3.1-1]
#[test]
fn delivery_qos_is_the_minimum_of_publish_and_subscription_qos() {
    let w = World::new();
    let mut s0 = w.connect_v5("s0", w.at(0));
    s0.subscribe("t", qos(0), w.at(0));
    let mut s2 = w.connect_v5("s2", w.at(0));
    s2.subscribe("t", qos(2), w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(msg("t", 2, 1, b"a"), w.at(0));
    p.publish(msg("t", 1, 2, b"b"), w.at(0));
    let q = |ps: Vec<Publish>| ps.iter().map(|p| p.qos).collect::<Vec<_>>();
    assert_eq!(q(s0.publishes(w.at(0))), [QoS::AtMostOnce, QoS::AtMostOnce]);
    assert_eq!(
        q(s2.publishes(w.at(0))),
        [QoS::ExactlyOnce, QoS::AtLeastOnce]
    );
}

#[test]
fn client_exceeding_server_receive_maximum_is_disconnected_with_0x93() {
    let w = World::with_config(MqttConfig {
        receive_maximum: 2,
        ..Default::default()
    });
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(msg("t", 2, 1, b"1"), w.at(0));
    p.publish(msg("t", 2, 2, b"2"), w.at(0));
    p.send(Packet::Publish(msg("t", 2, 3, b"3")), w.at(0));
    p.expect_disconnect(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED, w.at(0));
}

/// Conformance (5.0): [MQTT-3.3.4-9] [MQTT-4.6.0-5] [MQTT-4.6.0-6] [MQTT-4.9.0-1] [MQTT-4.9.0-2]
#[test]
fn deliveries_respect_the_client_receive_maximum() {
    let w = World::new();
    let mut s = w.connect_ok(
        Connect {
            properties: ConnectProperties {
                receive_maximum: Some(2),
                ..Default::default()
            },
            ..v5("slow")
        },
        w.at(0),
    );
    s.subscribe("t", qos(2), w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    for (i, m) in [b"1", b"2", b"3", b"4"].into_iter().enumerate() {
        let q = if i % 2 == 0 { 1 } else { 2 };
        p.publish(msg("t", q, i as u16 + 1, m), w.at(0));
    }
    p.publish(msg("t", 0, 0, b"q0"), w.at(0));
    let got = s.publishes(w.at(0));
    assert_eq!(
        payloads(&got),
        [b"1", b"2"],
        "only two unacknowledged at once"
    );
    // Acking the QoS 1 message frees one slot.
    s.send(puback(got[0].packet_id.expect("id")), w.at(1));
    assert_eq!(payloads(&s.publishes(w.at(1))), [b"3"]);
    // A QoS 2 message holds its slot until PUBCOMP, not PUBREC.
    let id2 = got[1].packet_id.expect("id");
    s.exchange(Packet::PubRec(PubResponse::success(id2)), w.at(2));
    assert_eq!(s.publishes(w.at(2)), []);
    s.send(Packet::PubComp(PubResponse::success(id2)), w.at(2));
    let rest = s.publishes(w.at(2));
    assert_eq!(payloads(&rest), [&b"4"[..], b"q0"]);
}

// ---------------------------------------------------------------------------------------------
// Queue limits, expiry, packet size
// ---------------------------------------------------------------------------------------------

fn offline_subscriber(w: &World, id: &str) {
    let mut s = w.connect_ok(v5_persistent(id, 1000), w.at(0));
    s.subscribe("t", qos(1), w.at(0));
    s.disconnect(ReasonCode::NORMAL_DISCONNECTION, w.at(0));
}

fn queue_policy_keeps(policy: OverflowPolicy) -> (Vec<Vec<u8>>, u64) {
    let w = World::with_config(MqttConfig {
        max_queued_messages: 2,
        queue_overflow: policy,
        ..Default::default()
    });
    offline_subscriber(&w, "q");
    let mut p = w.connect_v5("pub", w.at(0));
    for (i, m) in [b"1", b"2", b"3", b"4"].into_iter().enumerate() {
        p.publish(msg("t", 1, i as u16 + 1, m), w.at(1));
    }
    let (mut s, _) = w.connect(v5_persistent("q", 1000), w.at(2));
    let got = s.publishes(w.at(2));
    (
        got.iter().map(|p| p.payload.to_vec()).collect(),
        w.broker.stats().dropped_count(DropReason::QueueFull),
    )
}

#[test]
fn full_queue_drops_new_messages_and_counts_them() {
    let (kept, dropped) = queue_policy_keeps(OverflowPolicy::DropNew);
    assert_eq!(kept, [b"1", b"2"]);
    assert_eq!(dropped, 2);
}

#[test]
fn full_queue_with_drop_oldest_keeps_the_newest_and_counts_drops() {
    let (kept, dropped) = queue_policy_keeps(OverflowPolicy::DropOldest);
    assert_eq!(kept, [b"3", b"4"]);
    assert_eq!(dropped, 2);
}

/// Conformance (5.0): [MQTT-3.3.2-5] [MQTT-3.3.2-6]
#[test]
fn expired_messages_are_dropped_and_the_rest_carry_the_remaining_interval() {
    let w = World::new();
    offline_subscriber(&w, "e");
    let mut p = w.connect_v5("pub", w.at(0));
    let expiring = |payload, secs| Publish {
        properties: PublishProperties {
            message_expiry_interval: Some(secs),
            ..Default::default()
        },
        ..msg("t", 1, 1, payload)
    };
    p.publish(expiring(b"short", 10), w.at(0));
    p.publish(expiring(b"long", 100), w.at(0));
    p.publish(msg("t", 1, 2, b"forever"), w.at(0));
    let (mut s, _) = w.connect(v5_persistent("e", 1000), w.at(30));
    let got = s.publishes(w.at(30));
    assert_eq!(payloads(&got), [&b"long"[..], b"forever"]);
    assert_eq!(got[0].properties.message_expiry_interval, Some(70));
    assert_eq!(got[1].properties.message_expiry_interval, None);
    assert_eq!(w.broker.stats().dropped_count(DropReason::Expired), 1);
}

/// Conformance (5.0): [MQTT-3.3.2-5]
#[test]
fn expired_retained_message_is_not_sent_to_new_subscribers() {
    let w = World::new();
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(
        Publish {
            properties: PublishProperties {
                message_expiry_interval: Some(5),
                ..Default::default()
            },
            ..retained("r/short", 0, b"x")
        },
        w.at(0),
    );
    p.publish(retained("r/long", 0, b"y"), w.at(0));
    let mut s = w.connect_v5("sub", w.at(6));
    let got = s.subscribe_with_id("r/+", qos(0), None, w.at(6));
    let got: Vec<_> = got.into_iter().collect();
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(matches!(&got[0], Packet::Publish(p) if p.topic == "r/long"));
}

/// Conformance (5.0): [MQTT-3.1.2-24] [MQTT-3.1.2-25]
#[test]
fn deliveries_larger_than_the_client_maximum_packet_size_are_dropped_and_counted() {
    let w = World::new();
    let mut s = w.connect_ok(
        Connect {
            properties: ConnectProperties {
                maximum_packet_size: Some(64),
                topic_alias_maximum: Some(4),
                ..Default::default()
            },
            ..v5("small")
        },
        w.at(0),
    );
    s.subscribe("t", qos(1), w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(msg("t", 1, 1, &[b'x'; 100]), w.at(0));
    p.publish(msg("t", 1, 2, b"fits"), w.at(0));
    let got = s.publishes(w.at(0));
    assert_eq!(payloads(&got), [b"fits"]);
    // The dropped message must not have consumed the topic alias: the client has never seen
    // the topic, so it is sent in full.
    assert_eq!(got[0].topic, "t");
    assert_eq!(w.broker.stats().dropped_count(DropReason::TooLarge), 1);
    let session = w.broker.session("small").expect("session");
    assert_eq!(
        session.queue_depth(),
        (0, 1),
        "the dropped one is not in flight"
    );
}

// ---------------------------------------------------------------------------------------------
// Topic aliases
// ---------------------------------------------------------------------------------------------

fn aliased(topic: &str, alias: u16, payload: &'static [u8]) -> Publish {
    Publish {
        properties: PublishProperties {
            topic_alias: Some(alias),
            ..Default::default()
        },
        ..msg(topic, 0, 0, payload)
    }
}

/// Conformance (5.0): [MQTT-3.3.2-3] [MQTT-3.3.2-12]
#[test]
fn inbound_topic_alias_is_set_then_used() {
    let w = World::new();
    let mut s = w.connect_v5("sub", w.at(0));
    s.subscribe("long/topic/name", qos(0), w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(aliased("long/topic/name", 1, b"set"), w.at(0));
    p.publish(aliased("", 1, b"use"), w.at(0));
    // The alias can be remapped.
    p.publish(aliased("other", 1, b"remap"), w.at(0));
    p.publish(aliased("", 1, b"other"), w.at(0));
    let got = s.publishes(w.at(0));
    assert_eq!(payloads(&got), [&b"set"[..], b"use"]);
    assert!(got.iter().all(|p| p.topic == "long/topic/name"));
    assert!(got.iter().all(|p| p.properties.topic_alias.is_none()));
}

/// Conformance (5.0): [MQTT-3.3.2-8]
#[test]
fn inbound_topic_alias_zero_is_invalid() {
    let w = World::new();
    let mut p = w.connect_v5("pub", w.at(0));
    p.send(Packet::Publish(aliased("t", 0, b"x")), w.at(0));
    p.expect_disconnect(ReasonCode::TOPIC_ALIAS_INVALID, w.at(0));
}

#[test]
fn inbound_topic_alias_above_the_maximum_is_invalid() {
    let w = World::with_config(MqttConfig {
        topic_alias_maximum: 5,
        ..Default::default()
    });
    let mut p = w.connect_v5("pub", w.at(0));
    p.send(Packet::Publish(aliased("t", 6, b"x")), w.at(0));
    p.expect_disconnect(ReasonCode::TOPIC_ALIAS_INVALID, w.at(0));
}

#[test]
fn inbound_unknown_topic_alias_is_a_protocol_error() {
    let w = World::new();
    let mut p = w.connect_v5("pub", w.at(0));
    p.send(Packet::Publish(aliased("", 3, b"x")), w.at(0));
    p.expect_disconnect(ReasonCode::PROTOCOL_ERROR, w.at(0));
}

/// Conformance (5.0): [MQTT-3.3.2-7]
#[test]
fn inbound_topic_aliases_do_not_survive_a_reconnect() {
    let w = World::new();
    let mut p = w.connect_ok(v5_persistent("pub", 100), w.at(0));
    p.publish(aliased("t", 1, b"set"), w.at(0));
    p.disconnect(ReasonCode::NORMAL_DISCONNECTION, w.at(0));
    let mut p = w.connect_ok(v5_persistent("pub", 100), w.at(1));
    p.send(Packet::Publish(aliased("", 1, b"x")), w.at(1));
    p.expect_disconnect(ReasonCode::PROTOCOL_ERROR, w.at(1));
}

/// Conformance (5.0): [MQTT-3.1.2-26] [MQTT-3.3.2-8] [MQTT-3.3.2-11]
#[test]
fn server_assigns_outbound_topic_aliases_when_the_client_allows_them() {
    let w = World::new();
    let mut s = w.connect_ok(
        Connect {
            properties: ConnectProperties {
                topic_alias_maximum: Some(1),
                ..Default::default()
            },
            ..v5("sub")
        },
        w.at(0),
    );
    s.subscribe("#", qos(0), w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(msg("a/b", 0, 0, b"1"), w.at(0));
    p.publish(msg("a/b", 0, 0, b"2"), w.at(0));
    p.publish(msg("c", 0, 0, b"3"), w.at(0));
    let got = s.publishes(w.at(0));
    let view: Vec<_> = got
        .iter()
        .map(|p| (p.topic.as_str(), p.properties.topic_alias))
        .collect();
    // Only one alias is allowed: the second topic goes without one.
    assert_eq!(view, [("a/b", Some(1)), ("", Some(1)), ("c", None)]);
}

/// Conformance (5.0): [MQTT-3.1.2-27]
#[test]
fn no_outbound_topic_aliases_without_client_topic_alias_maximum() {
    let w = World::new();
    let mut s = w.connect_v5("sub", w.at(0));
    s.subscribe("a", qos(0), w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(msg("a", 0, 0, b"1"), w.at(0));
    p.publish(msg("a", 0, 0, b"2"), w.at(0));
    let got = s.publishes(w.at(0));
    assert!(
        got.iter()
            .all(|p| p.topic == "a" && p.properties.topic_alias.is_none())
    );
}

// ---------------------------------------------------------------------------------------------
// Subscriptions
// ---------------------------------------------------------------------------------------------

/// Conformance (5.0): [MQTT-3.3.4-3]
#[test]
fn subscription_identifier_is_delivered_with_matching_messages() {
    let w = World::new();
    let mut s = w.connect_v5("sub", w.at(0));
    s.subscribe_with_id("a/+", qos(1), Some(42), w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(msg("a/b", 1, 1, b"x"), w.at(0));
    let got = s.publishes(w.at(0));
    assert_eq!(got[0].properties.subscription_identifiers, [42]);
}

/// Conformance (5.0): [MQTT-3.3.4-2] [MQTT-3.3.4-3] [MQTT-3.3.4-4]
#[test]
fn overlapping_subscriptions_give_one_delivery_with_the_highest_qos_and_all_identifiers() {
    let w = World::new();
    let mut s = w.connect_v5("sub", w.at(0));
    s.subscribe_with_id("a/+", qos(0), Some(1), w.at(0));
    s.subscribe_with_id("a/#", qos(2), Some(2), w.at(0));
    s.subscribe_with_id("a/b", qos(1), None, w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(msg("a/b", 2, 1, b"x"), w.at(0));
    let got = s.publishes(w.at(0));
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].qos, QoS::ExactlyOnce);
    let mut ids = got[0].properties.subscription_identifiers.clone();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2]);
}

/// Conformance (5.0): [MQTT-3.8.3-3]
#[test]
fn no_local_subscription_does_not_receive_own_messages() {
    let w = World::new();
    let mut a = w.connect_v5("a", w.at(0));
    let no_local = SubscriptionOptions {
        no_local: true,
        ..qos(0)
    };
    a.subscribe("t", no_local, w.at(0));
    let mut b = w.connect_v5("b", w.at(0));
    b.subscribe("t", no_local, w.at(0));
    a.publish(msg("t", 0, 0, b"from a"), w.at(0));
    assert_eq!(a.publishes(w.at(0)), []);
    assert_eq!(payloads(&b.publishes(w.at(0))), [b"from a"]);
}

/// Conformance (3.1.1): [MQTT-3.3.1-9]
/// Conformance (5.0): [MQTT-3.3.1-12] [MQTT-3.3.1-13]
#[test]
fn retain_as_published_keeps_the_retain_flag_on_live_messages() {
    let w = World::new();
    let mut plain = w.connect_v5("plain", w.at(0));
    plain.subscribe("t", qos(0), w.at(0));
    let mut rap = w.connect_v5("rap", w.at(0));
    rap.subscribe(
        "t",
        SubscriptionOptions {
            retain_as_published: true,
            ..qos(0)
        },
        w.at(0),
    );
    let mut v3 = w.connect_ok(v311("v3", true), w.at(0));
    v3.subscribe("t", qos(0), w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(retained("t", 0, b"r"), w.at(0));
    assert!(!plain.publishes(w.at(0))[0].retain);
    assert!(rap.publishes(w.at(0))[0].retain);
    assert!(!v3.publishes(w.at(0))[0].retain, "MQTT-3.3.1-9");
}

/// Conformance (5.0): [MQTT-3.3.1-9] [MQTT-3.3.1-10] [MQTT-3.3.1-11] [MQTT-3.8.4-4]
#[test]
fn retain_handling_controls_retained_messages_at_subscribe() {
    let w = World::new();
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(retained("r", 1, b"kept"), w.at(0));
    let mut s = w.connect_v5("sub", w.at(0));
    let rh = |h| SubscriptionOptions {
        retain_handling: h,
        ..qos(1)
    };
    let count = |out: Vec<Packet>| {
        out.iter()
            .filter(|p| matches!(p, Packet::Publish(p) if p.retain && p.payload == "kept"))
            .count()
    };
    let send_always = rh(RetainHandling::SendAtSubscribe);
    assert_eq!(
        count(s.subscribe_with_id("r", send_always, None, w.at(0))),
        1
    );
    assert_eq!(
        count(s.subscribe_with_id("r", send_always, None, w.at(0))),
        1
    );
    let if_new = rh(RetainHandling::SendIfNew);
    assert_eq!(count(s.subscribe_with_id("r", if_new, None, w.at(0))), 0);
    assert_eq!(count(s.subscribe_with_id("+", if_new, None, w.at(0))), 1);
    let never = rh(RetainHandling::DoNotSend);
    assert_eq!(count(s.subscribe_with_id("#", never, None, w.at(0))), 0);
}

/// Conformance (5.0): [MQTT-3.3.1-5] [MQTT-3.3.1-6] [MQTT-3.3.1-7]
#[test]
fn retained_message_is_replaced_and_deleted_by_empty_payload() {
    let w = World::new();
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(retained("r", 0, b"v1"), w.at(0));
    p.publish(retained("r", 0, b"v2"), w.at(0));
    let mut s = w.connect_v5("s1", w.at(0));
    let got = s.subscribe_with_id("r", qos(0), None, w.at(0));
    assert!(matches!(&got[..], [Packet::Publish(p)] if p.payload == "v2" && p.retain));
    p.publish(retained("r", 0, b""), w.at(0));
    assert_eq!(w.broker.retained_count(), 0);
    let mut s2 = w.connect_v5("s2", w.at(0));
    assert_eq!(s2.subscribe_with_id("r", qos(0), None, w.at(0)), []);
}

/// Conformance (3.1.1): [MQTT-2.3.1-7]
/// Conformance (5.0): [MQTT-2.2.1-6] [MQTT-3.10.4-1] [MQTT-3.10.4-2] [MQTT-3.10.4-4]
/// Conformance (5.0): [MQTT-3.10.4-5] [MQTT-3.10.4-6] [MQTT-3.11.3-1] [MQTT-3.11.3-2]
#[test]
fn unsubscribe_stops_deliveries_and_reports_missing_subscriptions() {
    let w = World::new();
    let mut s = w.connect_v5("sub", w.at(0));
    s.subscribe("t", qos(0), w.at(0));
    let out = s.exchange(
        Packet::Unsubscribe(Unsubscribe {
            packet_id: pid(5),
            properties: Vec::new(),
            filters: vec!["t".into(), "never".into()],
        }),
        w.at(0),
    );
    assert_eq!(
        out,
        [Packet::UnsubAck(UnsubAck {
            packet_id: pid(5),
            properties: Default::default(),
            reason_codes: vec![ReasonCode::SUCCESS, ReasonCode::NO_SUBSCRIPTION_EXISTED],
        })]
    );
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(msg("t", 0, 0, b"x"), w.at(0));
    assert_eq!(s.publishes(w.at(0)), []);
}

/// A SUBSCRIBE with a malformed filter is a malformed packet, whatever the other filters:
/// DISCONNECT 0x81 and no SUBACK.
/// Conformance (5.0): [MQTT-4.7.1-1] [MQTT-4.7.1-2] [MQTT-4.8.2-1] [MQTT-4.8.2-2]
#[test]
fn malformed_topic_filters_close_the_connection() {
    for bad in ["a/#/b", "a+", "$share//x", "a#"] {
        let w = World::new();
        let mut s = w.connect_v5("sub", w.at(0));
        s.send(
            Packet::Subscribe(Subscribe {
                packet_id: pid(1),
                properties: Default::default(),
                filters: ["ok/+", bad]
                    .into_iter()
                    .map(|f| SubscribeFilter {
                        filter: f.into(),
                        options: qos(1),
                    })
                    .collect(),
            }),
            w.at(0),
        );
        s.expect_disconnect(ReasonCode::MALFORMED_PACKET, w.at(0));
        assert!(s.conn.is_closed(), "{bad}");
    }
}

/// Conformance (5.0): [MQTT-4.7.2-1]
#[test]
fn dollar_topics_are_not_matched_by_leading_wildcards() {
    let w = World::new();
    let mut all = w.connect_v5("all", w.at(0));
    all.subscribe("#", qos(0), w.at(0));
    all.subscribe("+/x", qos(0), w.at(0));
    let mut sys = w.connect_v5("sys", w.at(0));
    sys.subscribe("$foo/#", qos(0), w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(msg("$foo/x", 0, 0, b"dollar"), w.at(0));
    assert_eq!(all.publishes(w.at(0)), []);
    assert_eq!(payloads(&sys.publishes(w.at(0))), [b"dollar"]);
}

// ---------------------------------------------------------------------------------------------
// Shared subscriptions
// ---------------------------------------------------------------------------------------------

#[test]
fn shared_subscription_delivers_each_message_to_exactly_one_member_in_turn() {
    let w = World::new();
    let mut members: Vec<Client> = ["m1", "m2", "m3"]
        .into_iter()
        .map(|id| {
            let mut c = w.connect_v5(id, w.at(0));
            c.subscribe("$share/g/jobs/+", qos(1), w.at(0));
            c
        })
        .collect();
    let mut plain = w.connect_v5("plain", w.at(0));
    plain.subscribe("jobs/#", qos(0), w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    for i in 0..6u16 {
        p.publish(msg("jobs/a", 1, i + 1, b"job"), w.at(0));
    }
    let counts: Vec<usize> = members
        .iter_mut()
        .map(|m| m.publishes(w.at(0)).len())
        .collect();
    assert_eq!(counts, [2, 2, 2], "round robin across members");
    assert_eq!(
        plain.publishes(w.at(0)).len(),
        6,
        "plain subscribers get all"
    );
}

#[test]
fn shared_subscription_does_not_send_retained_messages() {
    let w = World::new();
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(retained("jobs/a", 0, b"old"), w.at(0));
    let mut m = w.connect_v5("m", w.at(0));
    assert_eq!(
        m.subscribe_with_id("$share/g/jobs/+", qos(0), None, w.at(0)),
        []
    );
}

/// Conformance (5.0): [MQTT-3.8.3-4]
#[test]
fn shared_subscription_with_no_local_is_a_protocol_error() {
    let w = World::new();
    let mut m = w.connect_v5("m", w.at(0));
    let options = SubscriptionOptions {
        no_local: true,
        ..qos(0)
    };
    m.send(subscribe("$share/g/t", options, None), w.at(0));
    m.expect_disconnect(ReasonCode::PROTOCOL_ERROR, w.at(0));
}

// ---------------------------------------------------------------------------------------------
// CONNECT handling
// ---------------------------------------------------------------------------------------------

/// Conformance (5.0): [MQTT-3.1.3-6] [MQTT-3.1.3-7] [MQTT-3.2.2-16]
#[test]
fn empty_client_id_is_assigned_on_v5() {
    let w = World::new();
    let (_c, ack) = w.connect(v5(""), w.at(0));
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    let id = ack
        .properties
        .assigned_client_identifier
        .expect("Assigned Client Identifier");
    assert!(!id.is_empty());
    assert!(w.broker.session(&id).is_some());
    let (_c, ack2) = w.connect(v5(""), w.at(0));
    assert_ne!(ack2.properties.assigned_client_identifier, Some(id));
}

/// Conformance (3.1.1): [MQTT-3.1.3-8] [MQTT-3.2.2-4]
#[test]
fn empty_client_id_on_v311_needs_clean_session() {
    let w = World::new();
    let (_c, ack) = w.connect(v311("", true), w.at(0));
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    let (c, ack) = w.connect(v311("", false), w.at(0));
    assert_eq!(ack.reason_code, ReasonCode::CLIENT_IDENTIFIER_NOT_VALID);
    assert_eq!(ack.reason_code.to_v3_connack(), 2);
    assert!(!ack.session_present);
    assert!(c.conn.is_closed());
}

#[test]
fn mqtt_3_1_client_can_connect_and_receive() {
    let w = World::new();
    let mut c = w.connect_ok(
        Connect {
            protocol: ProtocolVersion::V3_1,
            ..v311("old-timer", true)
        },
        w.at(0),
    );
    assert_eq!(c.conn.version(), ProtocolVersion::V3_1);
    c.subscribe("t", qos(1), w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    p.publish(msg("t", 1, 1, b"hi"), w.at(0));
    assert_eq!(payloads(&c.publishes(w.at(0))), [b"hi"]);
}

/// Conformance (3.1.1): [MQTT-3.1.2-2]
/// Conformance (5.0): [MQTT-3.1.2-2] [MQTT-3.2.2-6]
#[test]
fn unsupported_protocol_level_is_refused_with_the_matching_connack() {
    let w = World::new();
    for (level, version) in [(6, ProtocolVersion::V5), (2, ProtocolVersion::V3_1_1)] {
        let mut c = w.open(w.at(0));
        c.conn
            .handle_decode_error(&DecodeError::UnsupportedProtocolVersion(level), w.at(0));
        assert_eq!(c.conn.version(), version);
        let out = c.drain(w.at(0));
        assert!(
            matches!(&out[..], [Packet::ConnAck(a)] if a.reason_code == ReasonCode::UNSUPPORTED_PROTOCOL_VERSION && !a.session_present),
            "{out:?}"
        );
        assert!(c.conn.is_closed());
    }
}

/// Conformance (5.0): [MQTT-4.13.1-1]
#[test]
fn malformed_packet_after_connect_is_answered_with_its_reason_code() {
    let w = World::new();
    let mut c = w.connect_v5("m", w.at(0));
    c.conn
        .handle_decode_error(&DecodeError::PacketTooLarge { size: 10, max: 5 }, w.at(0));
    c.expect_disconnect(ReasonCode::PACKET_TOO_LARGE, w.at(0));
}

/// Conformance (5.0): [MQTT-3.1.0-2] [MQTT-3.2.0-2]
#[test]
fn second_connect_is_a_protocol_error() {
    let w = World::new();
    let mut c = w.connect_v5("twice", w.at(0));
    c.send(Packet::Connect(Box::new(v5("twice"))), w.at(1));
    c.expect_disconnect(ReasonCode::PROTOCOL_ERROR, w.at(1));
}

/// Conformance (5.0): [MQTT-4.13.1-1]
#[test]
fn server_only_packets_from_a_client_are_protocol_errors() {
    let w = World::new();
    let server_only = [
        Packet::ConnAck(ConnAck::default()),
        Packet::SubAck(SubAck {
            packet_id: pid(1),
            properties: Default::default(),
            reason_codes: vec![ReasonCode::SUCCESS],
        }),
        Packet::UnsubAck(UnsubAck {
            packet_id: pid(1),
            properties: Default::default(),
            reason_codes: vec![ReasonCode::SUCCESS],
        }),
        Packet::PingResp,
    ];
    for (i, packet) in server_only.into_iter().enumerate() {
        let mut c = w.connect_v5(&format!("c{i}"), w.at(0));
        c.send(packet.clone(), w.at(0));
        c.expect_disconnect(ReasonCode::PROTOCOL_ERROR, w.at(0));
        assert_eq!(
            c.conn.close_reason(),
            Some(CloseReason::ProtocolViolation(ReasonCode::PROTOCOL_ERROR)),
            "{packet:?}"
        );
    }
}

/// Conformance (3.1.1): [MQTT-3.1.0-1]
/// Conformance (5.0): [MQTT-3.1.0-1] [MQTT-3.14.0-1]
#[test]
fn first_packet_other_than_connect_closes_the_connection() {
    let w = World::new();
    let mut c = w.open(w.at(0));
    c.send(Packet::PingReq, w.at(0));
    assert!(c.conn.is_closed());
    assert_eq!(c.drain(w.at(0)), []);
    assert_eq!(w.broker.session_count(), 0);
}

/// Conformance (5.0): [MQTT-3.3.4-6]
#[test]
fn publish_with_subscription_identifier_from_client_is_a_protocol_error() {
    let w = World::new();
    let mut c = w.connect_v5("p", w.at(0));
    c.send(
        Packet::Publish(Publish {
            properties: PublishProperties {
                subscription_identifiers: vec![1],
                ..Default::default()
            },
            ..msg("t", 0, 0, b"x")
        }),
        w.at(0),
    );
    c.expect_disconnect(ReasonCode::PROTOCOL_ERROR, w.at(0));
}

// ---------------------------------------------------------------------------------------------
// Administration: kick, drain, introspection
// ---------------------------------------------------------------------------------------------

#[test]
fn kick_tells_a_v5_client_administrative_action_and_keeps_its_session() {
    let w = World::new();
    let mut c = w.connect_ok(v5_persistent("k1", 3600), w.at(0));
    c.subscribe("a/#", qos(1), w.at(0));
    assert!(matches!(
        w.broker
            .kick("k1", ReasonCode::ADMINISTRATIVE_ACTION, false),
        raftmq_core::broker::Kicked::Disconnected
    ));
    assert_eq!(
        c.drain(w.at(1)),
        [Packet::Disconnect(Disconnect::with_code(
            ReasonCode::ADMINISTRATIVE_ACTION
        ))]
    );
    assert_eq!(c.conn.close_reason(), Some(CloseReason::Kicked));
    let (summary, subs) = w.broker.inspect_client("k1").expect("session kept");
    assert!(!summary.connected);
    assert_eq!(subs.len(), 1);
    assert!(matches!(
        w.broker
            .kick("k1", ReasonCode::ADMINISTRATIVE_ACTION, false),
        raftmq_core::broker::Kicked::NotConnected
    ));
    assert!(matches!(
        w.broker
            .kick("nobody", ReasonCode::ADMINISTRATIVE_ACTION, false),
        raftmq_core::broker::Kicked::NotFound
    ));
}

#[test]
fn kick_with_discard_session_ends_the_session_and_says_administrative_action() {
    let w = World::new();
    let mut c = w.connect_ok(v5_persistent("k2", 3600), w.at(0));
    c.subscribe("a/#", qos(1), w.at(0));
    assert!(matches!(
        w.broker.kick("k2", ReasonCode::ADMINISTRATIVE_ACTION, true),
        raftmq_core::broker::Kicked::SessionDiscarded {
            was_connected: true,
            ..
        }
    ));
    assert_eq!(
        c.drain(w.at(1)),
        [Packet::Disconnect(Disconnect::with_code(
            ReasonCode::ADMINISTRATIVE_ACTION
        ))]
    );
    assert!(w.broker.inspect_client("k2").is_none());
    assert_eq!(w.broker.subscription_count(), 0);
    let (_c, ack) = w.connect(v5_persistent("k2", 3600), w.at(2));
    assert!(!ack.session_present);
}

#[test]
fn a_takeover_after_a_kick_still_says_session_taken_over() {
    let w = World::new();
    let mut old = w.connect_ok(v5_persistent("k3", 3600), w.at(0));
    w.broker
        .kick("k3", ReasonCode::ADMINISTRATIVE_ACTION, false);
    let _new = w.connect_ok(v5_persistent("k3", 3600), w.at(1));
    assert_eq!(
        old.drain(w.at(1)),
        [Packet::Disconnect(Disconnect::with_code(
            ReasonCode::SESSION_TAKEN_OVER
        ))]
    );
}

/// Conformance (5.0): [MQTT-3.14.2-1] [MQTT-3.14.2-2]
#[test]
fn drain_sends_v5_clients_to_another_server_or_says_shutting_down() {
    let w = World::new();
    let mut c = w.connect_v5("d1", w.at(0));
    c.conn.handle_drain(Some("other:1883".into()), w.at(1));
    let mut expected = Disconnect::with_code(ReasonCode::USE_ANOTHER_SERVER);
    expected.properties = DisconnectProperties {
        server_reference: Some("other:1883".into()),
        ..Default::default()
    };
    assert_eq!(c.drain(w.at(1)), [Packet::Disconnect(expected)]);
    assert_eq!(c.conn.close_reason(), Some(CloseReason::ServerShutdown));

    let mut c = w.connect_v5("d2", w.at(0));
    c.conn.handle_drain(None, w.at(1));
    assert_eq!(
        c.drain(w.at(1)),
        [Packet::Disconnect(Disconnect::with_code(
            ReasonCode::SERVER_SHUTTING_DOWN
        ))]
    );
    let mut c = w.connect_ok(v311("d3", true), w.at(0));
    c.conn.handle_drain(Some("other:1883".into()), w.at(1));
    assert_eq!(c.drain(w.at(1)), []);
    assert!(c.conn.is_closed());
}

#[test]
fn admin_listings_show_clients_subscriptions_and_retained_messages() {
    let w = World::new();
    let mut a = w.connect_ok(v5_persistent("cl-a", 60), w.at(0));
    a.subscribe("x/+", qos(1), w.at(0));
    a.subscribe("$share/g/y/#", qos(0), w.at(0));
    let _b = w.connect_ok(v311("cl-b", true), w.at(0));
    let _o = w.connect_v5("other", w.at(0));
    let mut p = w.connect_v5("pub", w.at(0));
    p.exchange(Packet::Publish(retained("x/1", 0, b"r")), w.at(0));

    let ids: Vec<String> = w
        .broker
        .list_clients("cl-")
        .into_iter()
        .map(|c| c.client_id)
        .collect();
    assert_eq!(ids, ["cl-a", "cl-b"]);
    let a = &w.broker.list_clients("cl-a")[0];
    let info = a.connection.as_ref().expect("connection info");
    assert_eq!(
        (info.protocol_level, info.clean_start, a.session_expiry_secs),
        (5, false, 60)
    );
    assert_eq!(
        (a.subscriptions, a.persistent, a.connected),
        (2, true, true)
    );
    let b = &w.broker.list_clients("cl-b")[0];
    assert_eq!(b.connection.as_ref().map(|i| i.protocol_level), Some(4));

    let filters: Vec<String> = w
        .broker
        .list_subscriptions("", Some("y/z"))
        .into_iter()
        .map(|s| s.filter)
        .collect();
    assert_eq!(filters, ["$share/g/y/#"]);
    assert_eq!(w.broker.list_subscriptions("cl-a", None).len(), 2);
    assert_eq!(w.broker.list_subscriptions("other", None).len(), 0);

    let topics: Vec<String> = w
        .broker
        .list_retained(Some("x/#"))
        .iter()
        .map(|m| m.topic.to_string())
        .collect();
    assert_eq!(topics, ["x/1"]);
    let before = w.broker.retained_bytes();
    assert!(w.broker.clear_retained("x/1").is_some());
    assert!(
        w.broker.retained_bytes() < before,
        "cleared bytes are uncounted"
    );
    assert!(w.broker.clear_retained("x/1").is_none());
    assert!(w.broker.list_retained(Some("x/#")).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Asynchronous authentication and per-client limits
// ---------------------------------------------------------------------------------------------

/// Defers every decision: the test plays the role of the server task resolving it.
struct Deferring;

impl raftmq_core::auth::Authenticator for Deferring {
    fn authenticate(
        &self,
        info: &raftmq_core::auth::ConnectInfo<'_>,
    ) -> raftmq_core::auth::AuthDecision {
        let user = info.username.map(str::to_owned);
        let client_id = info.client_id.to_owned();
        raftmq_core::auth::AuthDecision::Pending(Box::pin(async move {
            Ok(raftmq_core::auth::Principal {
                username: user,
                client_id,
                acl: None,
                valid_until: None,
            })
        }))
    }
}

fn deferring_world() -> World {
    World {
        broker: Arc::new(Broker::with_auth(
            MqttConfig::default(),
            Arc::new(Deferring),
            Arc::new(raftmq_core::auth::AllowAll),
            1,
        )),
        t0: Instant::now(),
    }
}

/// Conformance (5.0): [MQTT-3.2.0-1]
#[test]
fn deferred_auth_holds_connack_and_later_packets_until_the_decision() {
    let w = deferring_world();
    let t = w.at(0);
    let mut c = w.open(t);
    c.send(Packet::Connect(Box::new(v5("a"))), t);
    // Pipelined before the decision: held, not answered.
    c.send(Packet::PingReq, t);
    assert!(c.conn.is_awaiting_auth());
    assert_eq!(c.drain(t), []);
    let pending = c.conn.take_pending_auth().expect("a pending decision");
    assert!(c.conn.take_pending_auth().is_none(), "handed out once");
    drop(pending);
    let principal = raftmq_core::auth::Principal {
        username: None,
        client_id: "a".into(),
        acl: None,
        valid_until: None,
    };
    c.conn.handle_auth_result(Ok(principal), t);
    let out = c.drain(t);
    assert!(
        matches!(&out[..], [Packet::ConnAck(ack), Packet::PingResp] if ack.reason_code == ReasonCode::SUCCESS),
        "{out:?}"
    );
}

/// Conformance (3.1.1): [MQTT-3.1.4-5]
#[test]
fn deferred_auth_refusal_sends_connack_code_and_drops_held_packets() {
    let w = deferring_world();
    let t = w.at(0);
    let mut c = w.open(t);
    c.send(Packet::Connect(Box::new(v311("a", true))), t);
    c.send(Packet::PingReq, t);
    drop(c.conn.take_pending_auth());
    c.conn
        .handle_auth_result(Err(ReasonCode::BAD_USER_NAME_OR_PASSWORD), t);
    let out = c.drain(t);
    assert!(
        matches!(&out[..], [Packet::ConnAck(ack)] if ack.reason_code == ReasonCode::BAD_USER_NAME_OR_PASSWORD),
        "{out:?}"
    );
    assert!(c.conn.is_closed());
    assert_eq!(w.broker.stats().auth_failures.load(Ordering::Relaxed), 1);
    assert!(w.broker.session("a").is_none());
}

/// Accepts everyone with credentials valid until a fixed instant, and runs a two-step
/// challenge exchange for the method "CHALLENGE" (the client must answer "answer").
struct Expiring(Instant);

struct Challenge {
    client_id: String,
    asked: bool,
}

impl raftmq_core::auth::AuthExchange for Challenge {
    fn step(&mut self, data: Option<&[u8]>) -> raftmq_core::auth::ExchangeStep {
        use raftmq_core::auth::ExchangeStep;
        if !std::mem::replace(&mut self.asked, true) {
            return ExchangeStep::Continue(bytes::Bytes::from_static(b"question"));
        }
        match data {
            Some(b"answer") => ExchangeStep::Success {
                principal: raftmq_core::auth::Principal {
                    username: Some("u".into()),
                    client_id: self.client_id.clone(),
                    acl: None,
                    valid_until: None,
                },
                data: Some(bytes::Bytes::from_static(b"welcome")),
            },
            _ => ExchangeStep::Failure(ReasonCode::NOT_AUTHORIZED),
        }
    }
}

impl raftmq_core::auth::Authenticator for Expiring {
    fn authenticate(
        &self,
        info: &raftmq_core::auth::ConnectInfo<'_>,
    ) -> raftmq_core::auth::AuthDecision {
        raftmq_core::auth::AuthDecision::Allow(raftmq_core::auth::Principal {
            username: info.username.map(str::to_owned),
            client_id: info.client_id.to_owned(),
            acl: None,
            valid_until: Some(self.0),
        })
    }

    fn start_exchange(
        &self,
        method: &str,
        info: &raftmq_core::auth::ConnectInfo<'_>,
    ) -> Option<Box<dyn raftmq_core::auth::AuthExchange>> {
        (method == "CHALLENGE").then(|| {
            Box::new(Challenge {
                client_id: info.client_id.to_owned(),
                asked: false,
            }) as Box<dyn raftmq_core::auth::AuthExchange>
        })
    }
}

fn expiring_world(valid_for: u64) -> World {
    let t0 = Instant::now();
    World {
        broker: Arc::new(Broker::with_auth(
            MqttConfig::default(),
            Arc::new(Expiring(t0 + Duration::from_secs(valid_for))),
            Arc::new(raftmq_core::auth::AllowAll),
            1,
        )),
        t0,
    }
}

#[test]
fn credentials_that_expire_close_the_connection_at_their_deadline() {
    let w = expiring_world(30);
    let mut c = w.connect_ok(
        Connect {
            keep_alive: 60,
            ..v5("exp")
        },
        w.at(0),
    );
    // The credentials' deadline comes before the keep alive's.
    assert_eq!(c.conn.poll_timeout(), Some(w.at(30)));
    c.conn.handle_timeout(w.at(29));
    assert!(!c.conn.is_closed());
    c.conn.handle_timeout(w.at(30));
    c.expect_disconnect(ReasonCode::MAXIMUM_CONNECT_TIME, w.at(30));
    assert_eq!(c.conn.close_reason(), Some(CloseReason::CredentialsExpired));
    // 3.1.1: closed without a DISCONNECT.
    let mut c = w.connect_ok(v311("exp3", true), w.at(0));
    c.conn.handle_timeout(w.at(31));
    assert_eq!(c.drain(w.at(31)), []);
    assert_eq!(c.conn.close_reason(), Some(CloseReason::CredentialsExpired));
}

fn auth_packet(code: ReasonCode, method: &str, data: &'static [u8]) -> Packet {
    Packet::Auth(raftmq_codec::Auth {
        reason_code: code,
        properties: raftmq_codec::AuthProperties {
            authentication_method: Some(method.into()),
            authentication_data: Some(bytes::Bytes::from_static(data)),
            ..Default::default()
        },
    })
}

fn challenge_connect(id: &str) -> Connect {
    let mut c = v5(id);
    c.properties.authentication_method = Some("CHALLENGE".into());
    c
}

#[test]
fn enhanced_authentication_exchanges_auth_before_connack_and_on_re_authentication() {
    let w = expiring_world(3600);
    let t = w.at(0);
    let mut c = w.open(t);
    c.send(Packet::Connect(Box::new(challenge_connect("ch"))), t);
    assert_eq!(
        c.drain(t),
        [auth_packet(
            ReasonCode::CONTINUE_AUTHENTICATION,
            "CHALLENGE",
            b"question"
        )]
    );
    let out = c.exchange(
        auth_packet(ReasonCode::CONTINUE_AUTHENTICATION, "CHALLENGE", b"answer"),
        t,
    );
    match &out[..] {
        [Packet::ConnAck(ack)] => {
            assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
            assert_eq!(
                ack.properties.authentication_method.as_deref(),
                Some("CHALLENGE")
            );
            assert_eq!(
                ack.properties.authentication_data.as_deref(),
                Some(&b"welcome"[..])
            );
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    // Re-authentication: 0x19, challenge, answer, AUTH 0x00; the connection goes on.
    assert_eq!(
        c.exchange(
            auth_packet(ReasonCode::RE_AUTHENTICATE, "CHALLENGE", b""),
            t
        ),
        [auth_packet(
            ReasonCode::CONTINUE_AUTHENTICATION,
            "CHALLENGE",
            b"question"
        )]
    );
    assert_eq!(c.exchange(Packet::PingReq, t), [Packet::PingResp]);
    assert_eq!(
        c.exchange(
            auth_packet(ReasonCode::CONTINUE_AUTHENTICATION, "CHALLENGE", b"answer"),
            t
        ),
        [auth_packet(ReasonCode::SUCCESS, "CHALLENGE", b"welcome")]
    );
    // A wrong answer during re-authentication closes with DISCONNECT 0x87.
    c.exchange(
        auth_packet(ReasonCode::RE_AUTHENTICATE, "CHALLENGE", b""),
        t,
    );
    c.send(
        auth_packet(ReasonCode::CONTINUE_AUTHENTICATION, "CHALLENGE", b"wrong"),
        t,
    );
    c.expect_disconnect(ReasonCode::NOT_AUTHORIZED, t);
    assert_eq!(
        c.conn.close_reason(),
        Some(CloseReason::ReauthFailed(ReasonCode::NOT_AUTHORIZED))
    );
    // A wrong answer before CONNACK: CONNACK 0x87; an unknown method: 0x8C.
    let mut c = w.open(t);
    c.send(Packet::Connect(Box::new(challenge_connect("ch2"))), t);
    c.drain(t);
    let out = c.exchange(
        auth_packet(ReasonCode::CONTINUE_AUTHENTICATION, "CHALLENGE", b"wrong"),
        t,
    );
    assert!(
        matches!(&out[..], [Packet::ConnAck(a)] if a.reason_code == ReasonCode::NOT_AUTHORIZED),
        "{out:?}"
    );
    assert!(c.conn.is_closed());
    assert!(w.broker.session("ch2").is_none());
    let mut unknown = challenge_connect("ch3");
    unknown.properties.authentication_method = Some("OTHER".into());
    let (_, ack) = w.connect(unknown, t);
    assert_eq!(ack.reason_code, ReasonCode::BAD_AUTHENTICATION_METHOD);
    // The client may give up with DISCONNECT before CONNACK.
    let mut c = w.open(t);
    c.send(Packet::Connect(Box::new(challenge_connect("ch4"))), t);
    c.drain(t);
    c.send(
        Packet::Disconnect(Disconnect::with_code(ReasonCode::SUCCESS)),
        t,
    );
    assert_eq!(c.drain(t), []);
    assert_eq!(c.conn.close_reason(), Some(CloseReason::ClientDisconnect));
}

#[test]
fn too_many_packets_before_the_auth_decision_close_the_connection() {
    let w = deferring_world();
    let t = w.at(0);
    let mut c = w.open(t);
    c.send(Packet::Connect(Box::new(v5("a"))), t);
    for _ in 0..raftmq_core::connection::MAX_PACKETS_BEFORE_AUTH {
        c.send(Packet::PingReq, t);
    }
    assert!(!c.conn.is_closed());
    c.send(Packet::PingReq, t);
    assert!(c.conn.is_closed());
    assert_eq!(c.drain(t), []);
}

#[test]
fn publish_rate_over_the_limit_disconnects_and_refills_with_time() {
    let w = World::with_config(MqttConfig {
        max_publish_rate: 2,
        ..MqttConfig::default()
    });
    let mut c = w.connect_v5("p", w.at(0));
    let t = w.at(0);
    c.publish(msg("t", 0, 0, b"1"), t);
    c.publish(msg("t", 0, 0, b"2"), t);
    // A second later the bucket is full again.
    let t1 = w.at(1);
    c.publish(msg("t", 0, 0, b"3"), t1);
    c.publish(msg("t", 0, 0, b"4"), t1);
    assert!(!c.conn.is_closed());
    c.send(Packet::Publish(msg("t", 0, 0, b"5")), t1);
    c.expect_disconnect(ReasonCode::MESSAGE_RATE_TOO_HIGH, t1);
    assert_eq!(
        w.broker
            .stats()
            .limit_exceeded_count(raftmq_core::limits::Limit::PublishRate),
        1
    );
}

#[test]
fn sys_statistics_are_exempt_from_the_retained_bytes_limit() {
    let w = World::with_config(MqttConfig {
        max_retained_bytes: raftmq_core::config::ByteSize(4),
        ..MqttConfig::default()
    });
    let t = w.at(0);
    let sys = raftmq_core::Message {
        topic: "$SYS/broker/uptime".into(),
        payload: Bytes::from_static(b"1234567890"),
        qos: QoS::AtMostOnce,
        retain: true,
        properties: PublishProperties::default(),
        expires_at: None,
        received_at: t,
        origin: None,
    };
    w.broker.publish(Arc::new(sys), t);
    assert!(w.broker.retained("$SYS/broker/uptime").is_some());
    assert_eq!(w.broker.retained_bytes(), 0);
    let mut c = w.connect_v5("p", t);
    c.publish(retained("a", 0, b"1234"), t);
    c.publish(retained("b", 0, b"5"), t);
    assert!(w.broker.retained("a").is_some());
    assert!(w.broker.retained("b").is_none());
    assert_eq!(w.broker.retained_bytes(), 4);
}

// ---------------------------------------------------------------------------------------------
// Backpressure from slow subscribers (`mqtt.backpressure_max_pause`)
// ---------------------------------------------------------------------------------------------

/// A broker whose sessions queue 8 messages (pause at 4, resume at 2), a connected QoS 0
/// subscriber to `t` that is never pumped unless the test says so, and a publisher.
fn congested_world(max_pause: Duration) -> (World, Client, Client) {
    let w = World::with_config(MqttConfig {
        max_queued_messages: 8,
        backpressure_max_pause: raftmq_core::config::DurationStr(max_pause),
        ..Default::default()
    });
    let mut sub = w.connect_v5("slow", w.at(0));
    sub.subscribe("t", qos(0), w.at(0));
    let p = w.connect_v5("fast", w.at(0));
    (w, sub, p)
}

/// `n` QoS 0 messages from `c` to `topic`, without pumping anything.
fn flood(c: &mut Client, topic: &str, n: usize, now: Instant) {
    for _ in 0..n {
        c.send(Packet::Publish(msg(topic, 0, 0, b"x")), now);
    }
}

/// (publishers paused, pauses that ran out) so far.
fn backpressure(w: &World) -> (u64, u64) {
    let stats = w.broker.stats();
    (
        stats.publishers_paused.load(Ordering::SeqCst),
        stats.backpressure_timeouts.load(Ordering::SeqCst),
    )
}

fn poll_room(c: &Client, waker: &Arc<CountingWaker>) -> Poll<()> {
    let waker = Waker::from(waker.clone());
    c.conn.poll_room(&mut Context::from_waker(&waker))
}

#[test]
fn a_publisher_is_not_read_from_while_a_subscriber_queue_is_half_full_and_resumes_at_a_quarter() {
    let (w, mut sub, mut p) = congested_world(Duration::from_millis(250));
    let t = w.at(1);
    for (i, payload) in [b"0", b"1", b"2"].into_iter().enumerate() {
        p.send(Packet::Publish(msg("t", 0, 0, payload)), t);
        assert!(!p.conn.reading_paused(), "paused after {} messages", i + 1);
    }
    p.send(Packet::Publish(msg("t", 0, 0, b"3")), t);
    assert!(
        p.conn.reading_paused(),
        "the 4th message fills half the queue"
    );
    assert_eq!(backpressure(&w).0, 1);
    // The pause bounds the publisher's next deadline.
    assert_eq!(p.conn.poll_timeout(), Some(t + Duration::from_millis(250)));

    let waker = Arc::new(CountingWaker::default());
    assert_eq!(poll_room(&p, &waker), Poll::Pending);
    // The subscriber's connection takes the queue: the publisher is woken and reads again.
    assert_eq!(sub.publishes(t).len(), 4);
    assert_eq!(waker.0.load(Ordering::SeqCst), 1);
    assert_eq!(poll_room(&p, &waker), Poll::Ready(()));
    p.conn.handle_room();
    assert!(!p.conn.reading_paused());
    // Only the keep alive (65535 s) is left to wait for.
    assert!(p.conn.poll_timeout() > Some(t + Duration::from_secs(1)));
    // Nothing was dropped.
    assert_eq!(w.broker.stats().dropped_count(DropReason::QueueFull), 0);
}

#[test]
fn a_pause_that_runs_out_marks_the_subscriber_stalled_until_its_queue_drains() {
    let (w, mut sub, mut p) = congested_world(Duration::from_millis(250));
    let t = w.at(1);
    flood(&mut p, "t", 4, t);
    assert!(p.conn.reading_paused());
    let waker = Arc::new(CountingWaker::default());
    assert_eq!(poll_room(&p, &waker), Poll::Pending);
    // Not yet...
    p.conn.handle_timeout(t + Duration::from_millis(249));
    assert!(p.conn.reading_paused());
    // ...then the pause runs out: reading resumes, the connection stays open.
    p.conn.handle_timeout(t + Duration::from_millis(250));
    assert!(!p.conn.reading_paused());
    assert!(!p.conn.is_closed());
    assert_eq!(backpressure(&w).1, 1);
    // The stalled subscriber pauses nobody: its full queue drops, and counts, the rest.
    for _ in 0..10 {
        p.send(Packet::Publish(msg("t", 0, 0, b"y")), t);
        assert!(!p.conn.reading_paused());
    }
    assert_eq!(w.broker.stats().dropped_count(DropReason::QueueFull), 6);
    // Once it has drained, it asks publishers to wait again.
    assert_eq!(sub.publishes(t).len(), 8);
    flood(&mut p, "t", 4, t);
    assert!(p.conn.reading_paused());
    assert_eq!(backpressure(&w).0, 2);
}

#[test]
fn a_paused_publisher_goes_on_when_the_subscriber_disconnects() {
    let (w, mut sub, mut p) = congested_world(Duration::from_millis(250));
    let t = w.at(1);
    flood(&mut p, "t", 4, t);
    let waker = Arc::new(CountingWaker::default());
    assert_eq!(poll_room(&p, &waker), Poll::Pending);
    sub.disconnect(ReasonCode::NORMAL_DISCONNECTION, t);
    assert_eq!(waker.0.load(Ordering::SeqCst), 1);
    assert_eq!(poll_room(&p, &waker), Poll::Ready(()));
}

#[test]
fn a_client_subscribed_to_its_own_topic_is_never_paused_by_its_own_queue() {
    let (w, _sub, _p) = congested_world(Duration::from_millis(250));
    let t = w.at(1);
    let mut me = w.connect_v5("loop", t);
    me.subscribe("mine", qos(1), t);
    for i in 0..8u16 {
        me.send(Packet::Publish(msg("mine", 1, i + 1, b"x")), t);
    }
    assert!(!me.conn.reading_paused());
}

#[test]
fn with_backpressure_off_a_full_queue_drops_and_nobody_is_paused() {
    let (w, _sub, mut p) = congested_world(Duration::ZERO);
    let t = w.at(1);
    for _ in 0..12 {
        p.send(Packet::Publish(msg("t", 0, 0, b"x")), t);
        assert!(!p.conn.reading_paused());
    }
    assert_eq!(w.broker.stats().dropped_count(DropReason::QueueFull), 4);
    assert_eq!(backpressure(&w).0, 0);
}

#[test]
fn a_publisher_woken_late_waits_for_its_own_congestion_only_not_the_next() {
    let (w, mut sub, mut p1) = congested_world(Duration::from_millis(250));
    let t = w.at(1);
    let mut p2 = w.connect_v5("fast-2", t);
    flood(&mut p1, "t", 4, t);
    assert!(p1.conn.reading_paused());
    let (w1, w2) = (
        Arc::new(CountingWaker::default()),
        Arc::new(CountingWaker::default()),
    );
    assert_eq!(poll_room(&p1, &w1), Poll::Pending);
    // The subscriber drains: p1 is woken, but p2 runs first and fills the queue again.
    assert_eq!(sub.publishes(t).len(), 4);
    assert_eq!(w1.0.load(Ordering::SeqCst), 1);
    flood(&mut p2, "t", 4, t);
    assert!(p2.conn.reading_paused(), "a new congestion pauses p2");
    assert_eq!(poll_room(&p2, &w2), Poll::Pending);
    // p1 waited for the congestion that ended: it reads again...
    assert_eq!(poll_room(&p1, &w1), Poll::Ready(()));
    // ...and had its deadline come first, the new congestion would not count as stalled.
    p1.conn.handle_timeout(t + Duration::from_millis(250));
    assert!(!p1.conn.reading_paused());
    assert_eq!(backpressure(&w).1, 0);
    assert_eq!(poll_room(&p2, &w2), Poll::Pending, "p2 still waits");
}

#[test]
fn a_client_with_messages_in_flight_is_not_paused_and_a_paused_one_resumes_when_it_has_some() {
    let (w, _sub, _p) = congested_world(Duration::from_millis(250));
    let t = w.at(1);
    let mut both = w.connect_v5("both", t);
    both.subscribe("back", qos(1), t);
    flood(&mut both, "t", 4, t);
    assert!(both.conn.reading_paused());
    let waker = Arc::new(CountingWaker::default());
    assert_eq!(poll_room(&both, &waker), Poll::Pending);
    // A QoS 1 message for this client: once sent, its PUBACK must be read.
    let mut other = w.connect_v5("other", t);
    other.publish(msg("back", 1, 1, b"reply"), t);
    assert_eq!(both.publishes(t).len(), 1);
    assert_eq!(poll_room(&both, &waker), Poll::Ready(()));
    both.conn.handle_room();
    // While it is unacknowledged, the client is not paused again.
    both.send(Packet::Publish(msg("t", 0, 0, b"y")), t);
    assert!(!both.conn.reading_paused());
}

#[test]
fn a_qos2_publisher_is_paused_like_the_others() {
    let (w, _sub, mut p) = congested_world(Duration::from_millis(250));
    let t = w.at(1);
    let mut sub2 = w.connect_v5("slow-2", t);
    sub2.subscribe("q2", qos(2), t);
    // Its deliveries wait for the publish's commit, so congestion is read before queueing:
    // the 5th message finds 4 queued.
    for i in 1..=4u16 {
        p.send(Packet::Publish(msg("q2", 2, i, b"x")), t);
        assert!(!p.conn.reading_paused(), "paused after {i}");
    }
    p.send(Packet::Publish(msg("q2", 2, 5, b"x")), t);
    assert!(p.conn.reading_paused());
}

#[test]
fn a_shared_group_routes_around_a_crowded_member_without_pausing_the_publisher() {
    let (w, _sub, mut p) = congested_world(Duration::from_millis(250));
    let t = w.at(1);
    let mut lazy = w.connect_v5("lazy", t);
    lazy.subscribe("$share/g/jobs", qos(0), t);
    let mut busy = w.connect_v5("busy", t);
    busy.subscribe("$share/g/jobs", qos(0), t);
    let mut done = 0;
    for _ in 0..20 {
        p.send(Packet::Publish(msg("jobs", 0, 0, b"j")), t);
        assert!(!p.conn.reading_paused());
        done += busy.publishes(t).len();
    }
    // Turns alternate until the member that never reads holds 4 (half its queue): the rest
    // goes to the other.
    assert_eq!(lazy.publishes(t).len(), 4);
    assert_eq!(done, 16);
}
