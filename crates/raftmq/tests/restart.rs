//! Durability of the single-node broker across `kill -9`: state acknowledged before the crash
//! (persistent sessions, subscriptions, queued QoS 1/2 messages, retained messages) is all back
//! after a restart on the same data dir. Runs the real `raftmq` executable.

use bytes::Bytes;
use raftmq_codec::{
    ByteStr, Connect, ConnectProperties, Packet, PacketId, ProtocolVersion, PubResponse, Publish,
    PublishProperties, QoS, ReasonCode, Subscribe, SubscribeFilter, SubscribeProperties,
    SubscriptionOptions,
};
use raftmq_tests::RawClient;
use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for the broker to start (Raft leader election included).
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Broker {
    child: Child,
    mqtt: SocketAddr,
}

impl Broker {
    /// Starts `raftmq` on fresh loopback ports with `data_dir` and waits until it accepts MQTT
    /// connections and reports ready.
    async fn start(data_dir: &Path) -> Broker {
        let (mqtt, http, cluster) = (free_port(), free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_raftmq"))
            .env_clear()
            .args(["serve", "--log-level", "warn"])
            .args(["--mqtt-addr", &format!("127.0.0.1:{mqtt}")])
            .args(["--http-addr", &format!("127.0.0.1:{http}")])
            .args(["--cluster-addr", &format!("127.0.0.1:{cluster}")])
            .arg("--data-dir")
            .arg(data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starts raftmq");
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if ready(http).await {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "raftmq not ready within {START_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Broker {
            child,
            mqtt: SocketAddr::from(([127, 0, 0, 1], mqtt)),
        }
    }

    /// SIGKILL: no shutdown, no flush.
    fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET /readyz answers 200.
async fn ready(http_port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", http_port)).await else {
        return false;
    };
    if s.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await;
    buf.starts_with(b"HTTP/1.1 200")
}

fn connect(id: &str, clean_start: bool) -> Packet {
    Packet::Connect(Box::new(Connect {
        protocol: ProtocolVersion::V5,
        clean_start,
        keep_alive: 60,
        client_id: ByteStr::from(id),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties {
            session_expiry_interval: Some(3600),
            ..Default::default()
        },
    }))
}

async fn connected(addr: SocketAddr, id: &str, clean_start: bool) -> (RawClient, bool) {
    let mut c = RawClient::connect(addr, ProtocolVersion::V5).await;
    c.send(&connect(id, clean_start)).await;
    match c.recv().await {
        Some(Packet::ConnAck(ack)) => {
            assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "{ack:?}");
            (c, ack.session_present)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

fn pid(n: u16) -> PacketId {
    PacketId::new(n).expect("nonzero")
}

async fn subscribe(c: &mut RawClient, filter: &str) {
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: pid(1),
        properties: SubscribeProperties::default(),
        filters: vec![SubscribeFilter {
            filter: ByteStr::from(filter),
            options: SubscriptionOptions {
                qos: QoS::AtLeastOnce,
                ..Default::default()
            },
        }],
    }))
    .await;
    assert!(matches!(c.recv().await, Some(Packet::SubAck(_))));
}

fn publish(topic: &str, n: u16, retain: bool) -> Packet {
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain,
        topic: ByteStr::from(topic),
        packet_id: Some(pid(n)),
        properties: PublishProperties::default(),
        payload: Bytes::from(format!("msg-{n}")),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_state_survives_kill_9() {
    const N: u16 = 200;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");

    let broker = Broker::start(&data).await;
    // A persistent subscriber, then offline.
    let (mut sub, present) = connected(broker.mqtt, "durable-sub", true).await;
    assert!(!present);
    subscribe(&mut sub, "orders/#").await;
    sub.send(&Packet::Disconnect(Default::default())).await;
    drop(sub);
    // Publish; count only what the broker acknowledged.
    let (mut publ, _) = connected(broker.mqtt, "publisher", true).await;
    for n in 1..=N {
        publ.send(&publish("orders/new", n, false)).await;
    }
    publ.send(&publish("config/site", N + 1, true)).await;
    let mut acked = BTreeSet::new();
    while acked.len() < usize::from(N) + 1 {
        match publ.recv().await {
            Some(Packet::PubAck(a)) => {
                assert!(a.reason_code.is_success(), "{a:?}");
                acked.insert(a.packet_id.get());
            }
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }
    broker.kill9();

    let broker = Broker::start(&data).await;
    let (mut sub, present) = connected(broker.mqtt, "durable-sub", false).await;
    assert!(present, "the persistent session survives kill -9");
    let mut received = BTreeSet::new();
    while received.len() < usize::from(N) {
        match sub.recv().await {
            Some(Packet::Publish(p)) => {
                let n: u16 = std::str::from_utf8(&p.payload).expect("utf8")[4..]
                    .parse()
                    .expect("number");
                received.insert(n);
                sub.send(&Packet::PubAck(PubResponse::success(
                    p.packet_id.expect("qos 1"),
                )))
                .await;
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
    let expected: BTreeSet<u16> = (1..=N).collect();
    assert_eq!(
        received, expected,
        "every acknowledged message is delivered after the crash"
    );
    // The retained message too, and the subscription still routes new messages.
    subscribe(&mut sub, "config/#").await;
    match sub.recv().await {
        Some(Packet::Publish(p)) => {
            assert!(p.retain);
            assert_eq!(&p.payload[..], format!("msg-{}", N + 1).as_bytes());
        }
        other => panic!("expected the retained message, got {other:?}"),
    }
    let (mut publ, _) = connected(broker.mqtt, "publisher", true).await;
    publ.send(&publish("orders/late", 1, false)).await;
    let got_late = loop {
        match sub.recv().await {
            Some(Packet::Publish(p)) if p.payload == "msg-1" && p.topic == "orders/late" => {
                break true;
            }
            Some(Packet::Publish(_)) | Some(Packet::PubAck(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert!(got_late);
    broker.kill9();
}
