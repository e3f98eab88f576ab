//! Interoperability with independent client implementations: rumqttc (MQTT 3.1.1 and 5) and
//! the Debian `mosquitto_pub` / `mosquitto_sub` command line clients.
//!
//! Publishing only starts once the broker holds the subscription, so nothing depends on timing.

use raftmq_codec::{ProtocolVersion, QoS as RawQoS};
use raftmq_tests::{RawClient, TIMEOUT, TestBroker, wait_until};
use std::process::{Output, Stdio};
use std::time::Duration;
use tokio::process::{Child, Command};

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

fn spawn(mut cmd: Command, program: &str) -> Child {
    match cmd.spawn() {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!(
                "{program} not found: install the mosquitto clients (apt-get install mosquitto-clients)"
            )
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    }
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
