//! Interoperability with independent client implementations: rumqttc (MQTT 3.1.1 and 5), the
//! Debian `mosquitto_pub` / `mosquitto_sub` command line clients, the Eclipse Paho C client's
//! sample programs ([`paho`]) and MQTT.js, in Node over TCP and TLS and in headless Chromium
//! over WebSocket and secure WebSocket ([`mqttjs`]).
//!
//! Publishing only starts once the broker holds the subscription, so nothing depends on timing.
//! A client program that is missing fails its test, naming the Debian package that brings it
//! (`scripts/install-prereqs --test` installs them all).

use raftmq_codec::{Packet, PacketId, ProtocolVersion, PubResponse, Publish, QoS as RawQoS};
use raftmq_core::config::MqttConfig;
use raftmq_server::{LimitsConfig, ListenersConfig, TlsConfig};
use raftmq_tests::certs::Ca;
use raftmq_tests::{RawClient, TIMEOUT, TestBroker, pid, publish_packet, wait_until};
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio::process::{Child, Command};

#[path = "clients/mqttjs.rs"]
mod mqttjs;
#[path = "clients/paho.rs"]
mod paho;

// ---------------------------------------------------------------------------------------------
// The other end of an interop exchange
// ---------------------------------------------------------------------------------------------

/// What a subscriber was sent: topic, QoS, retain flag and payload (as text).
type Got = (String, u8, bool, String);

/// The other end of an exchange with a client under test: a raw MQTT 5 client that completes
/// QoS 1 and 2 exchanges in both directions and reports exactly what the broker sent it (QoS,
/// retain flag, payload), whatever the client under test would show of it.
struct Peer {
    c: RawClient,
    next_id: u16,
    /// Publishes received while waiting for an acknowledgement of one of its own.
    pending: VecDeque<Publish>,
}

impl Peer {
    async fn connect(broker: &TestBroker, client_id: &str) -> Peer {
        Peer {
            c: RawClient::connected(broker.mqtt, ProtocolVersion::V5, client_id).await,
            next_id: 1,
            pending: VecDeque::new(),
        }
    }

    async fn subscribe(&mut self, filter: &str, qos_n: u8) {
        self.c.subscribe(filter, qos(qos_n)).await;
    }

    fn packet_id(&mut self) -> PacketId {
        let id = pid(self.next_id);
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }

    /// The next packet that is not a PUBLISH (those are kept for [`Self::receive`]).
    async fn next_response(&mut self, what: &str) -> Packet {
        loop {
            match self.c.recv().await {
                Some(Packet::Publish(p)) => self.pending.push_back(p),
                Some(p) => return p,
                None => panic!("the broker closed the peer's connection waiting for {what}"),
            }
        }
    }

    /// Publishes and completes the exchange: PUBACK (QoS 1), PUBREC/PUBREL/PUBCOMP (QoS 2).
    async fn publish(&mut self, topic: &str, qos_n: u8, retain: bool, payload: &str) {
        let qos = qos(qos_n);
        let id = self.packet_id();
        let mut p = publish_packet(topic, qos, id.get(), payload.as_bytes());
        p.retain = retain;
        self.c.send(&Packet::Publish(p)).await;
        match qos {
            RawQoS::AtMostOnce => {}
            RawQoS::AtLeastOnce => match self.next_response("PUBACK").await {
                Packet::PubAck(r) if r.packet_id == id => {
                    assert!(r.reason_code.0 < 0x80, "PUBACK {r:?}")
                }
                other => panic!("expected PUBACK for {id:?}, got {other:?}"),
            },
            RawQoS::ExactlyOnce => {
                match self.next_response("PUBREC").await {
                    Packet::PubRec(r) if r.packet_id == id => {
                        assert!(r.reason_code.0 < 0x80, "PUBREC {r:?}")
                    }
                    other => panic!("expected PUBREC for {id:?}, got {other:?}"),
                }
                self.c.send(&Packet::PubRel(PubResponse::success(id))).await;
                match self.next_response("PUBCOMP").await {
                    Packet::PubComp(r) if r.packet_id == id => {}
                    other => panic!("expected PUBCOMP for {id:?}, got {other:?}"),
                }
            }
        }
    }

    /// The next message the broker sends, acknowledged as its QoS requires (for QoS 2 the
    /// whole PUBREC/PUBREL/PUBCOMP exchange).
    async fn receive(&mut self) -> Got {
        let p = match self.pending.pop_front() {
            Some(p) => p,
            None => self.c.recv_publish().await,
        };
        match (p.qos, p.packet_id) {
            (RawQoS::AtLeastOnce, Some(id)) => {
                self.c.send(&Packet::PubAck(PubResponse::success(id))).await
            }
            (RawQoS::ExactlyOnce, Some(id)) => {
                self.c.send(&Packet::PubRec(PubResponse::success(id))).await;
                match self.next_response("PUBREL").await {
                    Packet::PubRel(r) if r.packet_id == id => {}
                    other => panic!("expected PUBREL for {id:?}, got {other:?}"),
                }
                self.c
                    .send(&Packet::PubComp(PubResponse::success(id)))
                    .await;
            }
            _ => {}
        }
        got(&p.topic, p.qos.as_u8(), p.retain, &p.payload)
    }

    /// The next `n` messages, in the order they arrived.
    async fn receive_n(&mut self, n: usize) -> Vec<Got> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.receive().await);
        }
        out
    }

    /// Asserts nothing more arrives within `wait` (after what was expected did).
    async fn expect_nothing(&mut self, wait: Duration) {
        assert!(self.pending.is_empty(), "unexpected {:?}", self.pending);
        match self.c.recv_within(wait).await {
            Err(()) => {}
            Ok(p) => panic!("expected nothing more, got {p:?}"),
        }
    }
}

fn got(topic: &str, qos: u8, retain: bool, payload: &[u8]) -> Got {
    (
        topic.to_owned(),
        qos,
        retain,
        String::from_utf8_lossy(payload).into_owned(),
    )
}

/// A QoS level from its number.
fn qos(n: u8) -> RawQoS {
    RawQoS::from_u8(n).expect("QoS 0, 1 or 2")
}

/// A broker with TLS, WebSocket and secure WebSocket listeners serving a certificate for
/// `localhost` and 127.0.0.1 from a fresh CA; returns it with the CA certificate's file (in
/// the returned directory).
async fn tls_broker() -> (TestBroker, PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let ca = Ca::new("raftmq interop test CA");
    let (cert, key) = ca.issue("localhost", &["localhost", "127.0.0.1"]);
    let paths = ["ca.crt", "server.crt", "server.key"].map(|f| dir.path().join(f));
    for (path, text) in paths.iter().zip([ca.pem(), cert, key]) {
        std::fs::write(path, text).expect("write certificate file");
    }
    let [ca_file, cert_file, key_file] = paths;
    let tls = TlsConfig {
        cert_file: Some(cert_file),
        key_file: Some(key_file),
        ..TlsConfig::default()
    };
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let listeners = ListenersConfig {
        tls: Some(any),
        ws: Some(any),
        wss: Some(any),
        ..ListenersConfig::default()
    };
    let broker = Arc::new(raftmq_core::Broker::new(MqttConfig::default()));
    let tb = TestBroker::with_server(broker, listeners, Some(tls), LimitsConfig::default()).await;
    (tb, ca_file, dir)
}

/// Starts `cmd`; a missing program fails the test naming the Debian `package` that has it.
fn spawn_program(mut cmd: Command, program: &str, package: &str) -> Child {
    match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "{program} not found: run scripts/install-prereqs --test \
             (apt-get install {package})"
        ),
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// What the rumqttc wrappers of both protocol versions share: the client with its event loop,
/// connecting, driving the loop until an incoming packet is picked, and waiting for a QoS 1 or
/// 2 exchange to complete. Expands in a module that imports one version's `AsyncClient`,
/// `Event`, `EventLoop`, `MqttOptions`, `Packet`, `Publish` and `QoS`.
macro_rules! rumqttc_client {
    () => {
        pub struct Client {
            pub client: AsyncClient,
            pub events: EventLoop,
        }

        impl Client {
            /// Starts a client with `opts`; returns it with CONNACK's session present flag.
            async fn start(opts: MqttOptions) -> (Client, bool) {
                let (client, events) = AsyncClient::new(opts, 16);
                let mut c = Client { client, events };
                let present = c
                    .until(|p| match p {
                        Packet::ConnAck(ack) => Some(ack.session_present),
                        _ => None,
                    })
                    .await;
                (c, present)
            }

            /// Drives the event loop until `f` picks an incoming packet.
            pub async fn until<T>(&mut self, mut f: impl FnMut(Packet) -> Option<T>) -> T {
                loop {
                    let event = tokio::time::timeout(TIMEOUT, self.events.poll())
                        .await
                        .expect("timed out waiting for rumqttc")
                        .expect("rumqttc connection failed");
                    if let Event::Incoming(p) = event
                        && let Some(t) = f(p)
                    {
                        return t;
                    }
                }
            }

            pub async fn next_publish(&mut self) -> Publish {
                self.until(|p| match p {
                    Packet::Publish(p) => Some(p),
                    _ => None,
                })
                .await
            }

            /// Drives the event loop until the broker completed the exchange of a publish at
            /// `qos` (PUBACK for QoS 1, PUBCOMP for QoS 2).
            async fn completed(&mut self, qos: QoS) {
                match qos {
                    QoS::AtLeastOnce => {
                        self.until(|p| matches!(p, Packet::PubAck(_)).then_some(()))
                            .await
                    }
                    QoS::ExactlyOnce => {
                        self.until(|p| matches!(p, Packet::PubComp(_)).then_some(()))
                            .await
                    }
                    QoS::AtMostOnce => {}
                }
            }
        }
    };
}

/// Waits until the broker has `client_id`'s session offline (its client went away).
async fn wait_offline(broker: &TestBroker, client_id: &str) {
    let core = broker.broker.clone();
    wait_until("the subscriber is offline", || {
        core.session(client_id).is_some_and(|s| !s.is_online())
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// rumqttc, MQTT 3.1.1
// ---------------------------------------------------------------------------------------------

mod v4 {
    use super::*;
    use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};

    rumqttc_client!();

    impl Client {
        /// Connects and returns the client with CONNACK's session present flag.
        pub async fn connect(broker: &TestBroker, id: &str, clean: bool) -> (Client, bool) {
            let (host, port) = broker.host_port();
            let mut opts = MqttOptions::new(id, host, port);
            opts.set_keep_alive(Duration::from_secs(30));
            opts.set_clean_session(clean);
            Client::start(opts).await
        }

        pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
            self.client.subscribe(filter, qos).await.expect("subscribe");
            let codes = self
                .until(|p| match p {
                    Packet::SubAck(ack) => Some(ack.return_codes),
                    _ => None,
                })
                .await;
            assert_eq!(codes.len(), 1);
        }

        /// Publishes and drives the event loop until the exchange is complete.
        pub async fn publish(&mut self, topic: &str, qos: QoS, retain: bool, payload: &str) {
            self.client
                .publish(topic, qos, retain, payload.as_bytes().to_vec())
                .await
                .expect("publish");
            match qos {
                QoS::AtMostOnce => {
                    // Flush the outgoing QoS 0 publish.
                    loop {
                        let event = tokio::time::timeout(TIMEOUT, self.events.poll())
                            .await
                            .expect("timed out publishing")
                            .expect("rumqttc connection failed");
                        if matches!(event, Event::Outgoing(rumqttc::Outgoing::Publish(_))) {
                            break;
                        }
                    }
                }
                _ => self.completed(qos).await,
            }
        }
    }
}

/// Conformance (3.1.1): [MQTT-3.3.2-3] [MQTT-3.3.4-1] [MQTT-7.0.0-2] [MQTT-7.1.1-1]
#[tokio::test]
async fn rumqttc_v311_pub_sub_at_every_qos_with_wildcards() {
    use rumqttc::QoS;
    let broker = TestBroker::start().await;
    let (mut sub, _) = v4::Client::connect(&broker, "r4-sub", true).await;
    sub.subscribe("sensors/+/temp", QoS::ExactlyOnce).await;
    sub.subscribe("alerts/#", QoS::AtLeastOnce).await;
    let (mut publisher, _) = v4::Client::connect(&broker, "r4-pub", true).await;
    for (topic, qos, payload) in [
        ("sensors/a/temp", QoS::AtMostOnce, "q0"),
        ("sensors/b/temp", QoS::AtLeastOnce, "q1"),
        ("sensors/c/temp", QoS::ExactlyOnce, "q2"),
        ("alerts/fire/kitchen", QoS::ExactlyOnce, "alert"),
        ("sensors/a/humidity", QoS::AtMostOnce, "no match"),
    ] {
        publisher.publish(topic, qos, false, payload).await;
    }
    let mut got = Vec::new();
    for _ in 0..4 {
        let p = sub.next_publish().await;
        got.push((
            p.topic,
            p.qos,
            String::from_utf8_lossy(&p.payload).into_owned(),
        ));
    }
    let expected = [
        ("sensors/a/temp", QoS::AtMostOnce, "q0"),
        ("sensors/b/temp", QoS::AtLeastOnce, "q1"),
        ("sensors/c/temp", QoS::ExactlyOnce, "q2"),
        ("alerts/fire/kitchen", QoS::AtLeastOnce, "alert"),
    ]
    .map(|(t, q, p)| (t.to_string(), q, p.to_string()));
    assert_eq!(got, expected);
}

/// Conformance (3.1.1): [MQTT-3.3.1-5] [MQTT-3.3.1-6] [MQTT-3.3.1-8]
#[tokio::test]
async fn rumqttc_v311_receives_retained_message_on_subscribe() {
    use rumqttc::QoS;
    let broker = TestBroker::start().await;
    let (mut publisher, _) = v4::Client::connect(&broker, "r4-ret-pub", true).await;
    publisher
        .publish("config/x", QoS::AtLeastOnce, true, "v1")
        .await;
    let (mut sub, _) = v4::Client::connect(&broker, "r4-ret-sub", true).await;
    sub.subscribe("config/#", QoS::AtLeastOnce).await;
    let p = sub.next_publish().await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..], p.retain),
        ("config/x", &b"v1"[..], true)
    );
}

/// Conformance (3.1.1): [MQTT-3.1.2-4] [MQTT-3.1.2-5]
#[tokio::test]
async fn rumqttc_v311_persistent_session_resumes_with_queued_messages() {
    use rumqttc::QoS;
    let broker = TestBroker::start().await;
    let (mut sub, present) = v4::Client::connect(&broker, "r4-persist", false).await;
    assert!(!present);
    sub.subscribe("jobs", QoS::AtLeastOnce).await;
    drop(sub);
    wait_offline(&broker, "r4-persist").await;
    let (mut publisher, _) = v4::Client::connect(&broker, "r4-persist-pub", true).await;
    publisher
        .publish("jobs", QoS::AtLeastOnce, false, "queued")
        .await;
    let (mut sub, present) = v4::Client::connect(&broker, "r4-persist", false).await;
    assert!(present, "session not resumed");
    let p = sub.next_publish().await;
    assert_eq!((&p.payload[..], p.qos), (&b"queued"[..], QoS::AtLeastOnce));
}

// ---------------------------------------------------------------------------------------------
// rumqttc, MQTT 5
// ---------------------------------------------------------------------------------------------

mod v5 {
    use super::*;
    use rumqttc::v5::mqttbytes::QoS;
    use rumqttc::v5::mqttbytes::v5::{Packet, Publish};
    use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

    rumqttc_client!();

    impl Client {
        /// Connects (session expiry `expiry` seconds, clean start unless resuming) and returns
        /// the client with CONNACK's session present flag.
        pub async fn connect(
            broker: &TestBroker,
            id: &str,
            clean: bool,
            expiry: u32,
        ) -> (Client, bool) {
            let (host, port) = broker.host_port();
            let mut opts = MqttOptions::new(id, host, port);
            opts.set_keep_alive(Duration::from_secs(30));
            opts.set_clean_start(clean);
            opts.set_session_expiry_interval(Some(expiry));
            Client::start(opts).await
        }

        pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
            self.client.subscribe(filter, qos).await.expect("subscribe");
            self.until(|p| matches!(p, Packet::SubAck(_)).then_some(()))
                .await;
        }

        /// Publishes at QoS 1 or 2 and drives the event loop until the exchange is complete.
        pub async fn publish(&mut self, topic: &str, qos: QoS, payload: &str) {
            self.client
                .publish(topic, qos, false, payload.as_bytes().to_vec())
                .await
                .expect("publish");
            assert_ne!(
                qos,
                QoS::AtMostOnce,
                "use QoS 1 or 2 so completion is observable"
            );
            self.completed(qos).await;
        }
    }
}

/// Conformance (5.0): [MQTT-4.2.0-1]
#[tokio::test]
async fn rumqttc_v5_pub_sub_at_qos_1_and_2_with_wildcards() {
    use rumqttc::v5::mqttbytes::QoS;
    let broker = TestBroker::start().await;
    let (mut sub, _) = v5::Client::connect(&broker, "r5-sub", true, 0).await;
    sub.subscribe("home/+/light", QoS::ExactlyOnce).await;
    let (mut publisher, _) = v5::Client::connect(&broker, "r5-pub", true, 0).await;
    publisher
        .publish("home/kitchen/light", QoS::AtLeastOnce, "on")
        .await;
    publisher
        .publish("home/hall/light", QoS::ExactlyOnce, "off")
        .await;
    let a = sub.next_publish().await;
    let b = sub.next_publish().await;
    assert_eq!(
        (&a.topic[..], &a.payload[..], a.qos),
        (&b"home/kitchen/light"[..], &b"on"[..], QoS::AtLeastOnce)
    );
    assert_eq!(
        (&b.topic[..], &b.payload[..], b.qos),
        (&b"home/hall/light"[..], &b"off"[..], QoS::ExactlyOnce)
    );
}

/// Conformance (5.0): [MQTT-3.1.2-5] [MQTT-3.1.2-23]
#[tokio::test]
async fn rumqttc_v5_session_expiry_resumes_with_queued_messages() {
    use rumqttc::v5::mqttbytes::QoS;
    let broker = TestBroker::start().await;
    let (mut sub, present) = v5::Client::connect(&broker, "r5-persist", true, 300).await;
    assert!(!present);
    sub.subscribe("jobs", QoS::ExactlyOnce).await;
    drop(sub);
    wait_offline(&broker, "r5-persist").await;
    let (mut publisher, _) = v5::Client::connect(&broker, "r5-persist-pub", true, 0).await;
    publisher.publish("jobs", QoS::ExactlyOnce, "queued").await;
    let (mut sub, present) = v5::Client::connect(&broker, "r5-persist", false, 300).await;
    assert!(present, "session not resumed");
    let p = sub.next_publish().await;
    assert_eq!((&p.payload[..], p.qos), (&b"queued"[..], QoS::ExactlyOnce));
}

// ---------------------------------------------------------------------------------------------
// mosquitto_pub / mosquitto_sub
// ---------------------------------------------------------------------------------------------

/// A mosquitto command line client aimed at the test broker.
fn mosquitto(program: &str, broker: &TestBroker, args: &[&str]) -> Command {
    let (host, port) = broker.host_port();
    let mut cmd = Command::new(program);
    cmd.args(["-h", &host, "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

fn spawn(cmd: Command, program: &str) -> Child {
    spawn_program(cmd, program, "mosquitto-clients")
}

async fn finish(child: Child, program: &str) -> Output {
    let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} did not finish in time"))
        .expect("wait for mosquitto client");
    assert!(
        out.status.success(),
        "{program} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs `mosquitto_pub` to completion.
async fn mosquitto_pub(broker: &TestBroker, args: &[&str]) {
    let child = spawn(mosquitto("mosquitto_pub", broker, args), "mosquitto_pub");
    finish(child, "mosquitto_pub").await;
}

/// Starts `mosquitto_sub` and waits until the broker holds `subscriptions` subscriptions.
async fn mosquitto_sub(broker: &TestBroker, args: &[&str], subscriptions: usize) -> Child {
    let child = spawn(mosquitto("mosquitto_sub", broker, args), "mosquitto_sub");
    let core = broker.broker.clone();
    wait_until("mosquitto_sub has subscribed", || {
        core.subscription_count() >= subscriptions
    })
    .await;
    child
}

/// Lines printed by mosquitto_sub (format `%t %q %r %p`: topic, QoS, retain flag, payload).
async fn sub_lines(child: Child) -> Vec<String> {
    let out = finish(child, "mosquitto_sub").await;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

const FORMAT: &str = "%t %q %r %p";

async fn mosquitto_round_trip(version: &str) {
    let broker = TestBroker::start().await;
    let sub = mosquitto_sub(
        &broker,
        &[
            "-V", version, "-t", "m/#", "-q", "2", "-C", "3", "-W", "10", "-F", FORMAT,
        ],
        1,
    )
    .await;
    for (topic, qos, payload) in [
        ("m/1", "1", "one"),
        ("m/2", "2", "two"),
        ("m/x/2", "2", "deep"),
    ] {
        mosquitto_pub(
            &broker,
            &["-V", version, "-t", topic, "-q", qos, "-m", payload],
        )
        .await;
    }
    assert_eq!(
        sub_lines(sub).await,
        ["m/1 1 0 one", "m/2 2 0 two", "m/x/2 2 0 deep"]
    );
}

/// Conformance (3.1.1): [MQTT-7.0.0-2]
#[tokio::test]
async fn mosquitto_clients_v311_pub_sub_at_qos_1_and_2() {
    mosquitto_round_trip("mqttv311").await;
}

/// Conformance (5.0): [MQTT-4.2.0-1]
#[tokio::test]
async fn mosquitto_clients_v5_pub_sub_at_qos_1_and_2() {
    mosquitto_round_trip("mqttv5").await;
}

#[tokio::test]
async fn mosquitto_pub_reaches_mosquitto_sub() {
    let broker = TestBroker::start().await;
    let sub = mosquitto_sub(
        &broker,
        &["-t", "a/#", "-C", "1", "-W", "10", "-V", "mqttv5"],
        1,
    )
    .await;
    mosquitto_pub(&broker, &["-t", "a/b", "-m", "hello", "-q", "1"]).await;
    assert_eq!(sub_lines(sub).await, ["hello"]);
}

/// Conformance (3.1.1): [MQTT-3.3.1-5] [MQTT-3.3.1-6]
#[tokio::test]
async fn mosquitto_retained_message_reaches_later_subscribers() {
    for version in ["mqttv311", "mqttv5"] {
        let broker = TestBroker::start().await;
        mosquitto_pub(
            &broker,
            &[
                "-V",
                version,
                "-t",
                "state/door",
                "-q",
                "1",
                "-r",
                "-m",
                "open",
            ],
        )
        .await;
        // The message is already retained: no need to wait for the subscription (which may be
        // gone again as soon as the retained message arrives).
        let args = [
            "-V", version, "-t", "state/#", "-q", "1", "-C", "1", "-W", "10", "-F", FORMAT,
        ];
        let sub = spawn(mosquitto("mosquitto_sub", &broker, &args), "mosquitto_sub");
        assert_eq!(sub_lines(sub).await, ["state/door 1 1 open"], "{version}");
    }
}

/// Conformance (3.1.1): [MQTT-3.1.2-8]
#[tokio::test]
async fn mosquitto_sub_will_is_published_when_it_is_killed() {
    for version in ["mqttv311", "mqttv5"] {
        let broker = TestBroker::start().await;
        let mut watcher = RawClient::connected(broker.mqtt, ProtocolVersion::V5, "watcher").await;
        watcher.subscribe("wills/#", RawQoS::AtLeastOnce).await;
        let mut doomed = mosquitto_sub(
            &broker,
            &[
                "-V",
                version,
                "-t",
                "anything",
                "--will-topic",
                "wills/sub",
                "--will-payload",
                "died",
                "--will-qos",
                "1",
            ],
            2,
        )
        .await;
        doomed.kill().await.expect("kill mosquitto_sub");
        let will = watcher.recv_publish().await;
        assert_eq!(
            (will.topic.as_str(), &will.payload[..]),
            ("wills/sub", &b"died"[..]),
            "{version}"
        );
    }
}
