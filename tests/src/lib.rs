//! Shared support for raftmq's tests: an in-process broker on an ephemeral port and a raw MQTT
//! client (built on `raftmq-codec`) for the packets client libraries won't send, plus
//! [`ports`] for nodes on fixed addresses, [`wait`] for polling a condition with a deadline,
//! [`process`] for clusters of real `raftmq` processes, [`certs`] for TLS certificates,
//! [`metrics`] for reading what was counted, [`history`], the chaos tests' history
//! recorder and its offline checker, and [`docker`] for clusters of `raftmq` containers.
//!
//! Every wait has a timeout ([`TIMEOUT`]): a broken broker fails a test, never hangs it.

pub mod certs;
pub mod docker;
pub mod history;
pub mod metrics;
pub mod ports;
pub mod process;
mod rng;
pub mod wait;

pub use ports::{free_addr, free_port};
pub use rng::Rng;
pub use wait::{eventually, poll, wait_until};

use bytes::{Bytes, BytesMut};
use raftmq_codec::{
    ConnAck, Connect, ConnectProperties, Disconnect, Packet, PacketId, ProtocolVersion, Publish,
    PublishProperties, QoS, ReasonCode, Subscribe, SubscribeFilter, SubscriptionOptions, decode,
    encode,
};
use raftmq_core::Broker;
use raftmq_core::config::MqttConfig;
use raftmq_server::{HttpConfig, LimitsConfig, ListenerKind, ListenersConfig, Server, TlsConfig};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Upper bound for any single wait in a test.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// A broker running in this process on 127.0.0.1 with ephemeral ports.
pub struct TestBroker {
    /// The plain TCP MQTT listener.
    pub mqtt: SocketAddr,
    /// The HTTP listener (probes, metrics, admin API).
    pub http: SocketAddr,
    /// The TLS, WebSocket and secure WebSocket listeners, when started with them.
    pub tls: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
    /// The broker behind the listeners.
    pub broker: Arc<Broker>,
    /// What the front end was started with, at the addresses it bound (for [`Self::restart`]).
    started: Started,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestBroker {
    /// Starts a broker with default settings.
    pub async fn start() -> TestBroker {
        Self::with_config(MqttConfig::default()).await
    }

    /// Starts a broker with `config`.
    pub async fn with_config(config: MqttConfig) -> TestBroker {
        Self::with_broker(Arc::new(Broker::new(config))).await
    }

    /// Starts the front end for an existing broker.
    pub async fn with_broker(broker: Arc<Broker>) -> TestBroker {
        Self::with_server(
            broker,
            ListenersConfig::default(),
            None,
            LimitsConfig::default(),
        )
        .await
    }

    /// Starts the front end for `broker` with the listeners of `listeners` that are set (their
    /// addresses replaced by 127.0.0.1 with an ephemeral port; the TCP one is always started),
    /// TLS certificates and connection limits.
    pub async fn with_server(
        broker: Arc<Broker>,
        listeners: ListenersConfig,
        tls: Option<TlsConfig>,
        limits: LimitsConfig,
    ) -> TestBroker {
        let local = SocketAddr::from(([127, 0, 0, 1], 0));
        let listeners = ListenersConfig {
            tcp: Some(local),
            tls: listeners.tls.map(|_| local),
            ws: listeners.ws.map(|_| local),
            wss: listeners.wss.map(|_| local),
            ..listeners
        };
        let started = Started {
            listeners,
            http: local,
            tls,
            limits,
        };
        Self::start_front_end(broker, started).await
    }

    /// Binds exactly the addresses of `started` and runs the front end for `broker`.
    async fn start_front_end(broker: Arc<Broker>, mut started: Started) -> TestBroker {
        let http = HttpConfig {
            addr: Some(started.http),
            ..HttpConfig::default()
        };
        let mut server = Server::bind(broker.clone(), &started.listeners, &http, None)
            .await
            .expect("bind test broker");
        if let Some(tls) = &started.tls {
            server.set_tls(tls).expect("load TLS certificates");
        }
        server.set_limits(started.limits.clone());
        let mqtt = server.mqtt_addr().expect("mqtt addr");
        let http = server.http_addr().expect("http addr");
        let (tls, ws, wss) = (
            server.listener_addr(ListenerKind::Tls),
            server.listener_addr(ListenerKind::Ws),
            server.listener_addr(ListenerKind::Wss),
        );
        started.listeners = ListenersConfig {
            tcp: Some(mqtt),
            tls,
            ws,
            wss,
            ..started.listeners
        };
        started.http = http;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = server
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        TestBroker {
            mqtt,
            http,
            tls,
            ws,
            wss,
            broker,
            started,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// Host and port for client libraries.
    pub fn host_port(&self) -> (String, u16) {
        (self.mqtt.ip().to_string(), self.mqtt.port())
    }

    /// Stops the front end gracefully (its clients are disconnected as by a node that shuts
    /// down) and starts it again on the same addresses with the same TLS settings and limits,
    /// for clients that reconnect by themselves. The broker's state (sessions, subscriptions,
    /// retained messages) is kept, as a restarted node keeps its durable state.
    pub async fn restart(mut self) -> TestBroker {
        let broker = self.broker.clone();
        let started = self.started.clone();
        assert!(
            self.shutdown().await,
            "the broker did not stop within {TIMEOUT:?}"
        );
        Self::start_front_end(broker, started).await
    }

    /// Stops the broker gracefully and waits for it.
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    /// Stops the front end; whether it stopped within [`TIMEOUT`].
    async fn shutdown(&mut self) -> bool {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => tokio::time::timeout(TIMEOUT, task).await.is_ok(),
            None => true,
        }
    }
}

/// What a [`TestBroker`]'s front end was started with.
#[derive(Clone)]
struct Started {
    listeners: ListenersConfig,
    http: SocketAddr,
    tls: Option<TlsConfig>,
    limits: LimitsConfig,
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// A byte stream a [`RawClient`] can run over (TCP, TLS, WebSocket).
pub trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ByteStream for T {}

/// A raw MQTT client: sends exactly the bytes or packets it is given.
pub struct RawClient {
    stream: Box<dyn ByteStream>,
    buf: BytesMut,
    pub version: ProtocolVersion,
}

impl RawClient {
    /// Connects a TCP socket (no MQTT CONNECT yet).
    pub async fn connect(addr: SocketAddr, version: ProtocolVersion) -> RawClient {
        let stream = tokio::time::timeout(TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        stream.set_nodelay(true).expect("nodelay");
        Self::over(stream, version)
    }

    /// A client over an established byte stream (a TLS session, a WebSocket).
    pub fn over(stream: impl ByteStream + 'static, version: ProtocolVersion) -> RawClient {
        RawClient {
            stream: Box::new(stream),
            buf: BytesMut::new(),
            version,
        }
    }

    /// Sends raw bytes.
    pub async fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        self.stream.flush().await.expect("flush");
    }

    /// Encodes and sends a packet; an error if the broker closed the connection.
    pub async fn try_send(&mut self, packet: &Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        encode(packet, self.version, &mut out).expect("encode");
        self.stream.write_all(&out).await?;
        self.stream.flush().await
    }

    /// Sends a PUBLISH of `payload` to `topic` at `qos` (packet id `id` unless QoS 0).
    pub async fn publish(&mut self, topic: &str, qos: QoS, id: u16, payload: &[u8]) {
        self.send(&Packet::Publish(publish_packet(topic, qos, id, payload)))
            .await;
    }

    /// Encodes and sends a packet for this client's protocol version.
    pub async fn send(&mut self, packet: &Packet) {
        let mut out = BytesMut::new();
        encode(packet, self.version, &mut out).expect("encode");
        self.send_bytes(&out).await;
    }

    /// The next packet from the broker; `None` if the broker closed the connection.
    /// Panics on timeout or on bytes that don't decode.
    pub async fn recv(&mut self) -> Option<Packet> {
        self.recv_within(TIMEOUT)
            .await
            .expect("timed out waiting for a packet")
    }

    /// Like [`Self::recv`] but returns `Err(())` on timeout instead of panicking.
    pub async fn recv_within(&mut self, wait: Duration) -> Result<Option<Packet>, ()> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(p) = decode(&mut self.buf, self.version, u32::MAX)
                .expect("broker sent a malformed packet")
            {
                return Ok(Some(p));
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await;
            match read {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Asserts the broker closes the connection (after any packets it sends first, which are
    /// returned).
    pub async fn expect_closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        while let Some(p) = self.recv().await {
            seen.push(p);
        }
        seen
    }
}

/// A non-zero packet identifier.
pub fn pid(n: u16) -> PacketId {
    PacketId::new(n).expect("packet id must not be 0")
}

/// A CONNECT for `version` with keep alive off and no will.
pub fn connect_packet(version: ProtocolVersion, client_id: &str, clean_start: bool) -> Connect {
    Connect {
        protocol: version,
        clean_start,
        keep_alive: 0,
        client_id: client_id.into(),
        will: None,
        username: None,
        password: None,
        properties: ConnectProperties::default(),
    }
}

/// `packets` encoded for `version`, back to back (to send in one write).
pub fn encode_all(packets: &[Packet], version: ProtocolVersion) -> Vec<u8> {
    let mut out = BytesMut::new();
    for p in packets {
        encode(p, version, &mut out).expect("encode");
    }
    out.to_vec()
}

/// An MQTT 5 CONNECT with keep alive off, no will and a session expiry of `expiry` seconds
/// (0: the session ends with the connection).
pub fn connect_v5(client_id: &str, clean_start: bool, expiry: u32) -> Connect {
    let mut c = connect_packet(ProtocolVersion::V5, client_id, clean_start);
    c.properties.session_expiry_interval = Some(expiry);
    c
}

/// A PUBLISH of `payload` to `topic` (packet id `id` unless QoS 0).
pub fn publish_packet(topic: &str, qos: QoS, id: u16, payload: &[u8]) -> Publish {
    Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: (qos != QoS::AtMostOnce).then(|| pid(id)),
        properties: PublishProperties::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

impl RawClient {
    /// Opens a connection, sends `connect` and returns the CONNACK (whatever its code).
    pub async fn handshake(addr: SocketAddr, connect: Connect) -> (RawClient, ConnAck) {
        let mut c = RawClient::connect(addr, connect.protocol).await;
        c.send(&Packet::Connect(Box::new(connect))).await;
        match c.recv().await {
            Some(Packet::ConnAck(ack)) => (c, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Opens a connection within `wait`, sends `connect` and returns the CONNACK, whatever its
    /// code; `None` if the broker cannot be reached, closes the connection or does not answer
    /// within `wait` (e.g. a node that is down or restarting).
    pub async fn try_handshake(
        addr: SocketAddr,
        connect: Connect,
        wait: Duration,
    ) -> Option<(RawClient, ConnAck)> {
        let stream = tokio::time::timeout(wait, TcpStream::connect(addr))
            .await
            .ok()?
            .ok()?;
        let _ = stream.set_nodelay(true);
        let mut c = RawClient::over(stream, connect.protocol);
        c.try_send(&Packet::Connect(Box::new(connect))).await.ok()?;
        match c.recv_within(wait).await {
            Ok(Some(Packet::ConnAck(ack))) => Some((c, ack)),
            _ => None,
        }
    }

    /// Connects with clean start and asserts the broker accepted.
    pub async fn connected(
        addr: SocketAddr,
        version: ProtocolVersion,
        client_id: &str,
    ) -> RawClient {
        let (c, ack) = Self::handshake(addr, connect_packet(version, client_id, true)).await;
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "CONNACK {ack:?}");
        c
    }

    /// Subscribes to `filter` and waits for the SUBACK granting `qos`.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS) {
        self.send(&Packet::Subscribe(Subscribe {
            packet_id: pid(1),
            properties: Default::default(),
            filters: vec![SubscribeFilter {
                filter: filter.into(),
                options: SubscriptionOptions {
                    qos,
                    ..Default::default()
                },
            }],
        }))
        .await;
        match self.recv().await {
            Some(Packet::SubAck(ack)) => assert_eq!(
                ack.reason_codes,
                [ReasonCode(qos.as_u8())],
                "SUBACK for {filter}"
            ),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// The next packet, which must be a PUBLISH.
    pub async fn recv_publish(&mut self) -> Publish {
        match self.recv().await {
            Some(Packet::Publish(p)) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    /// Asserts the broker closes the connection because of `code`: an MQTT 5 client first gets
    /// DISCONNECT with that reason code, an MQTT 3 client is just disconnected.
    pub async fn expect_disconnect(&mut self, code: ReasonCode) {
        let seen = self.expect_closed().await;
        if self.version.is_v5() {
            assert_eq!(seen, [Packet::Disconnect(Disconnect::with_code(code))]);
        } else {
            assert_eq!(seen, [], "MQTT 3 has no DISCONNECT from the server");
        }
    }
}
