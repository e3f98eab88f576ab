//! Transports and connection-level protection over real sockets: TLS and mutual TLS,
//! certificate reload, WebSocket and secure WebSocket, the PROXY protocol, connection limits
//! with their reason codes, a client that stops reading, and a flood of malformed packets while
//! well-behaved clients publish.

use futures_util::{SinkExt, StreamExt};
use raftmq_codec::{Packet, ProtocolVersion, PubResponse, QoS, ReasonCode};
use raftmq_core::Broker;
use raftmq_core::auth::{AllowAll, AuthDecision, Authenticator, ConnectInfo};
use raftmq_core::config::{ByteSize, DurationStr, MqttConfig};
use raftmq_server::{
    CertIdentitySource, ClientAuth, LimitsConfig, ListenerKind, ListenersConfig, TlsConfig,
    TlsVersion, WsStream,
};
use raftmq_tests::Rng;
use raftmq_tests::certs::Ca;
use raftmq_tests::{
    RawClient, TIMEOUT, TestBroker, connect_packet, encode_all, eventually, pid, wait_until,
};
use rcgen::{CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, SupportedProtocolVersion};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V311: ProtocolVersion = ProtocolVersion::V3_1_1;
const ANY: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

// ---------------------------------------------------------------------------------------------
// Certificates

struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

enum Role {
    Server,
    Client,
    ExpiredClient,
}

fn leaf(ca: &Ca, cn: &str, org: Option<&str>, role: Role) -> Leaf {
    let names = match role {
        Role::Server => vec!["localhost".to_owned()],
        _ => Vec::new(),
    };
    let mut p = CertificateParams::new(names).expect("leaf params");
    p.distinguished_name = DistinguishedName::new();
    if let Some(org) = org {
        p.distinguished_name.push(DnType::OrganizationName, org);
    }
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![match role {
        Role::Server => ExtendedKeyUsagePurpose::ServerAuth,
        _ => ExtendedKeyUsagePurpose::ClientAuth,
    }];
    if let Role::ExpiredClient = role {
        p.not_before = rcgen::date_time_ymd(2000, 1, 1);
        p.not_after = rcgen::date_time_ymd(2001, 1, 1);
    }
    let (cert, key) = ca.sign(p);
    Leaf {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        der: cert.der().clone(),
        key_der: key.serialize_der(),
    }
}

/// The PEM files of a TLS listener, in a temporary directory.
struct TlsFiles {
    _dir: tempfile::TempDir,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

/// Replaces `path` atomically (write, then rename), as certificate tooling does.
fn replace(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).expect("write temporary file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

fn tls_files(server: &Leaf, client_ca: &Ca) -> TlsFiles {
    let dir = tempfile::tempdir().expect("temp dir");
    let files = TlsFiles {
        cert: dir.path().join("server.crt"),
        key: dir.path().join("server.key"),
        ca: dir.path().join("ca.crt"),
        _dir: dir,
    };
    replace(&files.cert, &server.cert_pem);
    replace(&files.key, &server.key_pem);
    replace(&files.ca, &client_ca.cert.pem());
    files
}

fn tls_settings(
    files: &TlsFiles,
    client_auth: ClientAuth,
    identity: CertIdentitySource,
) -> TlsConfig {
    TlsConfig {
        cert_file: Some(files.cert.clone()),
        key_file: Some(files.key.clone()),
        ca_file: Some(files.ca.clone()),
        client_auth,
        identity,
        ..TlsConfig::default()
    }
}

/// A server certificate for `localhost` from `ca` in files, and TLS settings serving it that
/// ask for no client certificate.
fn server_tls(ca: &Ca) -> (TlsFiles, TlsConfig) {
    let files = tls_files(&leaf(ca, "broker", None, Role::Server), ca);
    let tls = tls_settings(&files, ClientAuth::None, CertIdentitySource::Cn);
    (files, tls)
}

fn client_config(
    trust: &Ca,
    cert: Option<&Leaf>,
    versions: &[&'static SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(trust.cert.der().clone()).expect("trust CA");
    let builder = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(versions)
        .expect("TLS versions")
        .with_root_certificates(roots);
    let config = match cert {
        Some(l) => builder
            .with_client_auth_cert(
                vec![l.der.clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(l.key_der.clone())),
            )
            .expect("client certificate"),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

const BOTH: &[&SupportedProtocolVersion] = &[&rustls::version::TLS13, &rustls::version::TLS12];

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let handshake = async {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").expect("server name");
        TlsConnector::from(config).connect(name, tcp).await
    };
    tokio::time::timeout(TIMEOUT, handshake)
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// Whether an MQTT 5 client with `config` gets through the TLS handshake and CONNACK 0x00.
/// (With TLS 1.3 a refused client certificate shows up after the client's handshake, as an
/// alert on the first read.)
async fn tls_mqtt_accepted(addr: SocketAddr, config: Arc<ClientConfig>, client_id: &str) -> bool {
    let Ok(stream) = tls_connect(addr, config).await else {
        return false;
    };
    let mut c = RawClient::over(stream, V5);
    let connect = Packet::Connect(Box::new(connect_packet(V5, client_id, true)));
    if c.try_send(&connect).await.is_err() {
        return false;
    }
    matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.reason_code == ReasonCode::SUCCESS)
}

// ---------------------------------------------------------------------------------------------
// Brokers

/// What the transport told authentication about a client: peer address, certificate identity.
type Transport = (Option<SocketAddr>, Option<String>);

/// An authenticator that accepts everyone and remembers what the transport told about them.
#[derive(Default)]
struct Recorder {
    seen: Mutex<HashMap<String, Transport>>,
}

impl Authenticator for Recorder {
    fn authenticate(&self, info: &ConnectInfo<'_>) -> AuthDecision {
        self.seen.lock().expect("recorder lock").insert(
            info.client_id.to_owned(),
            (info.peer_addr, info.cert_identity.map(str::to_owned)),
        );
        AllowAll.authenticate(info)
    }
}

impl Recorder {
    fn get(&self, client_id: &str) -> Transport {
        self.seen
            .lock()
            .expect("recorder lock")
            .get(client_id)
            .cloned()
            .unwrap_or_else(|| panic!("{client_id} was not authenticated"))
    }
}

/// [`broker_full`] with default limits and MQTT settings.
async fn broker_with(
    listeners: ListenersConfig,
    tls: Option<TlsConfig>,
) -> (TestBroker, Arc<Recorder>) {
    broker_full(
        listeners,
        tls,
        LimitsConfig::default(),
        MqttConfig::default(),
    )
    .await
}

/// A broker with `listeners`, TLS, `limits` and `mqtt` settings whose authenticator records
/// what the transport told it about each client.
async fn broker_full(
    listeners: ListenersConfig,
    tls: Option<TlsConfig>,
    limits: LimitsConfig,
    mqtt: MqttConfig,
) -> (TestBroker, Arc<Recorder>) {
    let recorder = Arc::new(Recorder::default());
    let broker = Arc::new(Broker::with_auth(
        mqtt,
        recorder.clone(),
        Arc::new(AllowAll),
        1,
    ));
    let tb = TestBroker::with_server(broker, listeners, tls, limits).await;
    (tb, recorder)
}

/// The listeners of `kinds` besides the plain TCP one, on ephemeral ports.
fn listening(kinds: &[ListenerKind]) -> ListenersConfig {
    let on = |kind| kinds.contains(&kind).then_some(ANY);
    ListenersConfig {
        tls: on(ListenerKind::Tls),
        ws: on(ListenerKind::Ws),
        wss: on(ListenerKind::Wss),
        ..ListenersConfig::default()
    }
}

fn tls_listeners() -> ListenersConfig {
    listening(&[ListenerKind::Tls, ListenerKind::Wss])
}

// ---------------------------------------------------------------------------------------------
// TLS

#[tokio::test]
async fn tls_listener_serves_mqtt_over_tls_1_2_and_1_3() {
    let ca = Ca::new("test CA");
    let (_files, tls) = server_tls(&ca);
    let (tb, _) = broker_with(tls_listeners(), Some(tls.clone())).await;
    let addr = tb.tls.expect("tls listener");

    let mut publisher = RawClient::connected(tb.mqtt, V5, "plain-publisher").await;
    for (n, version) in [
        (1u16, &rustls::version::TLS12),
        (2, &rustls::version::TLS13),
    ] {
        let stream = tls_connect(addr, client_config(&ca, None, &[version]))
            .await
            .expect("TLS handshake");
        assert_eq!(
            stream.get_ref().1.protocol_version(),
            Some(version.version),
            "negotiated version"
        );
        let mut c = RawClient::over(stream, V5);
        c.send(&Packet::Connect(Box::new(connect_packet(
            V5,
            &format!("tls-{n}"),
            true,
        ))))
        .await;
        assert!(
            matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.reason_code == ReasonCode::SUCCESS)
        );
        c.subscribe("tls/#", QoS::AtLeastOnce).await;
        publisher
            .publish("tls/x", QoS::AtLeastOnce, n, b"over tls")
            .await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
        let p = c.recv_publish().await;
        assert_eq!((&*p.topic, &p.payload[..]), ("tls/x", &b"over tls"[..]));
    }
    tb.stop().await;

    // With min_version 1.3 a TLS 1.2-only client is turned away.
    let tls13 = TlsConfig {
        min_version: TlsVersion::V1_3,
        ..tls
    };
    let (tb, _) = broker_with(tls_listeners(), Some(tls13)).await;
    let addr = tb.tls.expect("tls listener");
    assert!(
        tls_connect(addr, client_config(&ca, None, &[&rustls::version::TLS12]))
            .await
            .is_err()
    );
    assert!(tls_mqtt_accepted(addr, client_config(&ca, None, BOTH), "tls13").await);
    tb.stop().await;
}

#[tokio::test]
async fn mutual_tls_requires_a_valid_client_certificate_and_passes_its_cn() {
    let ca = Ca::new("device CA");
    let other = ca_other();
    let server = leaf(&ca, "broker", None, Role::Server);
    let good = leaf(&ca, "device-1", Some("Acme"), Role::Client);
    let wrong_ca = leaf(&other, "device-1", Some("Acme"), Role::Client);
    let expired = leaf(&ca, "device-old", None, Role::ExpiredClient);
    let files = tls_files(&server, &ca);
    let tls = tls_settings(&files, ClientAuth::Required, CertIdentitySource::Cn);
    let (tb, seen) = broker_with(tls_listeners(), Some(tls)).await;
    let addr = tb.tls.expect("tls listener");

    assert!(tls_mqtt_accepted(addr, client_config(&ca, Some(&good), BOTH), "good").await);
    let (peer, identity) = seen.get("good");
    assert_eq!(identity.as_deref(), Some("device-1"));
    assert_eq!(peer.map(|p| p.ip()), Some(ANY.ip()));

    for (what, config) in [
        (
            "certificate from another CA",
            client_config(&ca, Some(&wrong_ca), BOTH),
        ),
        (
            "expired certificate",
            client_config(&ca, Some(&expired), BOTH),
        ),
        ("no certificate", client_config(&ca, None, BOTH)),
        (
            "no certificate, TLS 1.2",
            client_config(&ca, None, &[&rustls::version::TLS12]),
        ),
    ] {
        assert!(
            !tls_mqtt_accepted(addr, config, "refused").await,
            "{what} was accepted"
        );
    }
    assert!(seen.seen.lock().expect("lock").get("refused").is_none());
    tb.stop().await;
}

fn ca_other() -> Ca {
    Ca::new("some other CA")
}

#[tokio::test]
async fn optional_client_certificate_passes_the_subject_when_sent() {
    let ca = Ca::new("device CA");
    let server = leaf(&ca, "broker", None, Role::Server);
    let good = leaf(&ca, "device-1", Some("Acme"), Role::Client);
    let wrong_ca = leaf(&ca_other(), "device-1", None, Role::Client);
    let files = tls_files(&server, &ca);
    let tls = tls_settings(&files, ClientAuth::Optional, CertIdentitySource::Subject);
    let (tb, seen) = broker_with(tls_listeners(), Some(tls)).await;
    let addr = tb.tls.expect("tls listener");

    assert!(tls_mqtt_accepted(addr, client_config(&ca, None, BOTH), "anonymous").await);
    assert_eq!(seen.get("anonymous").1, None);
    assert!(tls_mqtt_accepted(addr, client_config(&ca, Some(&good), BOTH), "device").await);
    assert_eq!(seen.get("device").1.as_deref(), Some("CN=device-1,O=Acme"));
    assert!(!tls_mqtt_accepted(addr, client_config(&ca, Some(&wrong_ca), BOTH), "bad").await);
    tb.stop().await;
}

#[tokio::test]
async fn changed_certificate_files_are_used_without_a_restart() {
    let ca = Ca::new("test CA");
    let first = leaf(&ca, "broker-1", None, Role::Server);
    let second = leaf(&ca, "broker-2", None, Role::Server);
    let files = tls_files(&first, &ca);
    let tls = TlsConfig {
        reload_interval: DurationStr(Duration::from_millis(100)),
        ..tls_settings(&files, ClientAuth::None, CertIdentitySource::Cn)
    };
    let (tb, _) = broker_with(tls_listeners(), Some(tls)).await;
    let addr = tb.tls.expect("tls listener");
    let server_cert = || async {
        let s = tls_connect(addr, client_config(&ca, None, BOTH))
            .await
            .expect("TLS handshake");
        s.get_ref()
            .1
            .peer_certificates()
            .expect("server certificate")[0]
            .clone()
    };
    assert_eq!(server_cert().await, first.der);
    // An established connection survives the swap.
    let stream = tls_connect(addr, client_config(&ca, None, BOTH))
        .await
        .expect("TLS handshake");
    let mut old = RawClient::over(stream, V5);
    old.send(&Packet::Connect(Box::new(connect_packet(V5, "old", true))))
        .await;
    assert!(matches!(old.recv().await, Some(Packet::ConnAck(_))));

    replace(&files.key, &second.key_pem);
    replace(&files.cert, &second.cert_pem);
    eventually("the new certificate is served", TIMEOUT, || async {
        server_cert().await == second.der
    })
    .await;
    old.send(&Packet::PingReq).await;
    assert_eq!(old.recv().await, Some(Packet::PingResp));
    tb.stop().await;
}

/// Runs a mosquitto client against the TLS listener at `port` (host name `localhost`, which the
/// server certificate names), with `args`.
fn mosquitto_tls(program: &str, port: u16, args: &[&str]) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(["-h", "localhost", "-p", &port.to_string(), "-V", "mqttv5"])
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    cmd
}

async fn finished(child: tokio::process::Child) -> std::process::Output {
    tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .expect("mosquitto client did not finish in time")
        .expect("wait for mosquitto client")
}

#[tokio::test]
async fn mosquitto_clients_over_mutual_tls() {
    let ca = Ca::new("device CA");
    let server = leaf(&ca, "broker", None, Role::Server);
    let device = leaf(&ca, "mosquitto-device", None, Role::Client);
    let files = tls_files(&server, &ca);
    let dir = files.cert.parent().expect("dir").to_owned();
    let (cert, key) = (dir.join("device.crt"), dir.join("device.key"));
    replace(&cert, &device.cert_pem);
    replace(&key, &device.key_pem);
    let tls = tls_settings(&files, ClientAuth::Required, CertIdentitySource::Cn);
    let (tb, seen) = broker_with(tls_listeners(), Some(tls)).await;
    let port = tb.tls.expect("tls listener").port();
    let path = |p: &Path| p.to_str().expect("utf-8 path").to_owned();
    let (ca_file, cert, key) = (path(&files.ca), path(&cert), path(&key));
    let with_cert = ["--cafile", &ca_file, "--cert", &cert, "--key", &key];

    let mut sub_args = with_cert.to_vec();
    sub_args.extend(["-i", "mosq-sub", "-t", "mtls/t", "-q", "1", "-C", "1"]);
    let sub = mosquitto_tls("mosquitto_sub", port, &sub_args)
        .spawn()
        .expect("run mosquitto_sub (apt-get install mosquitto-clients)");
    let broker = tb.broker.clone();
    wait_until("mosquitto_sub has subscribed", || {
        broker.subscription_count() == 1
    })
    .await;

    let mut pub_args = with_cert.to_vec();
    pub_args.extend([
        "-i",
        "mosq-pub",
        "-t",
        "mtls/t",
        "-q",
        "1",
        "-m",
        "over mutual TLS",
    ]);
    let out = finished(
        mosquitto_tls("mosquitto_pub", port, &pub_args)
            .spawn()
            .expect("run mosquitto_pub"),
    )
    .await;
    assert!(
        out.status.success(),
        "mosquitto_pub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = finished(sub).await;
    assert!(
        out.status.success(),
        "mosquitto_sub: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "over mutual TLS"
    );
    assert_eq!(seen.get("mosq-pub").1.as_deref(), Some("mosquitto-device"));

    // Without a client certificate the broker turns mosquitto_pub away.
    let out = finished(
        mosquitto_tls(
            "mosquitto_pub",
            port,
            &[
                "--cafile", &ca_file, "-i", "no-cert", "-t", "mtls/t", "-m", "x",
            ],
        )
        .spawn()
        .expect("run mosquitto_pub"),
    )
    .await;
    assert!(
        !out.status.success(),
        "mosquitto_pub without a certificate succeeded"
    );
    tb.stop().await;
}

// ---------------------------------------------------------------------------------------------
// WebSocket

async fn ws_client<S>(stream: S, url: &str) -> Result<RawClient, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let (ws, response) =
        tokio::time::timeout(TIMEOUT, tokio_tungstenite::client_async(request, stream))
            .await
            .map_err(|_| "WebSocket handshake timed out".to_owned())?
            .map_err(|e| e.to_string())?;
    assert_eq!(
        response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.as_bytes()),
        Some(&b"mqtt"[..]),
        "subprotocol negotiated"
    );
    Ok(RawClient::over(WsStream::new(ws), V5))
}

/// CONNECT split over two WebSocket messages, then two PINGREQ in one message, a subscription
/// and QoS 1 both ways with a plain TCP client.
async fn websocket_round_trip(mut ws: RawClient, tcp: SocketAddr, id: &str) {
    let bytes = connect_bytes(V5, id);
    let (a, b) = bytes.split_at(5);
    ws.send_bytes(a).await;
    ws.send_bytes(b).await;
    assert!(
        matches!(ws.recv().await, Some(Packet::ConnAck(a)) if a.reason_code == ReasonCode::SUCCESS)
    );
    ws.send_bytes(&[0xC0, 0x00, 0xC0, 0x00]).await;
    assert_eq!(ws.recv().await, Some(Packet::PingResp));
    assert_eq!(ws.recv().await, Some(Packet::PingResp));
    ws.subscribe("web/in", QoS::AtLeastOnce).await;

    let mut tcp = RawClient::connected(tcp, V5, &format!("{id}-tcp")).await;
    tcp.subscribe("web/out", QoS::AtLeastOnce).await;
    tcp.publish("web/in", QoS::AtLeastOnce, 7, b"to browser")
        .await;
    assert!(matches!(tcp.recv().await, Some(Packet::PubAck(_))));
    let p = ws.recv_publish().await;
    assert_eq!(&p.payload[..], b"to browser");
    if let Some(id) = p.packet_id {
        ws.send(&Packet::PubAck(PubResponse::success(id))).await;
    }
    ws.publish("web/out", QoS::AtLeastOnce, 9, b"from browser")
        .await;
    assert_eq!(
        ws.recv().await,
        Some(Packet::PubAck(PubResponse::success(pid(9))))
    );
    assert_eq!(&tcp.recv_publish().await.payload[..], b"from browser");
}

#[tokio::test]
async fn websocket_and_secure_websocket_clients_publish_and_subscribe() {
    let ca = Ca::new("test CA");
    let (_files, tls) = server_tls(&ca);
    let listeners = listening(&[ListenerKind::Ws, ListenerKind::Wss]);
    let (tb, _) = broker_with(listeners, Some(tls)).await;
    let ws_addr = tb.ws.expect("ws listener");
    let wss_addr = tb.wss.expect("wss listener");

    let tcp = TcpStream::connect(ws_addr).await.expect("connect");
    let ws = ws_client(tcp, &format!("ws://{ws_addr}/mqtt"))
        .await
        .expect("ws handshake");
    websocket_round_trip(ws, tb.mqtt, "ws").await;

    let tls = tls_connect(wss_addr, client_config(&ca, None, BOTH))
        .await
        .expect("TLS");
    let wss = ws_client(tls, "wss://localhost/mqtt")
        .await
        .expect("wss handshake");
    websocket_round_trip(wss, tb.mqtt, "wss").await;

    // MQTT over WebSocket is binary: a text message closes the connection.
    let tcp = TcpStream::connect(ws_addr).await.expect("connect");
    let request = format!("ws://{ws_addr}/mqtt")
        .into_client_request()
        .expect("request");
    let (mut ws, _) = tokio_tungstenite::client_async(request, tcp)
        .await
        .expect("ws handshake");
    ws.send(Message::Text(
        String::from_utf8_lossy(&connect_bytes(V5, "texter"))
            .into_owned()
            .into(),
    ))
    .await
    .expect("send text message");
    let end = tokio::time::timeout(TIMEOUT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(b))) => panic!("answered a text message with {b:?}"),
                Some(Ok(_)) => continue,
                None | Some(Err(_)) => return,
            }
        }
    });
    end.await
        .expect("the connection stayed open after a text message");

    // Only the configured path serves MQTT.
    let tcp = TcpStream::connect(ws_addr).await.expect("connect");
    let refused = ws_client(tcp, &format!("ws://{ws_addr}/elsewhere")).await;
    assert!(refused.is_err(), "a WebSocket on another path was accepted");
    tb.stop().await;
}

// ---------------------------------------------------------------------------------------------
// PROXY protocol

/// A clean-start CONNECT for `version`, encoded.
fn connect_bytes(version: ProtocolVersion, id: &str) -> Vec<u8> {
    let connect = Packet::Connect(Box::new(connect_packet(version, id, true)));
    encode_all(&[connect], version)
}

#[tokio::test]
async fn proxy_protocol_header_gives_the_client_address() {
    let listeners = ListenersConfig {
        proxy_protocol: vec![ListenerKind::Tcp],
        ..ListenersConfig::default()
    };
    let (tb, seen) = broker_with(listeners, None).await;

    // v1, with the CONNECT in the same segment.
    let mut c = RawClient::connect(tb.mqtt, V5).await;
    let mut bytes = b"PROXY TCP4 203.0.113.7 192.0.2.1 51000 1883\r\n".to_vec();
    bytes.extend(connect_bytes(V5, "via-v1"));
    c.send_bytes(&bytes).await;
    assert!(
        matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.reason_code == ReasonCode::SUCCESS)
    );
    assert_eq!(
        seen.get("via-v1").0,
        Some("203.0.113.7:51000".parse().expect("addr"))
    );

    // v2 (IPv6), header and CONNECT in separate writes.
    let mut header = b"\r\n\r\n\0\r\nQUIT\n\x21\x21\x00\x24".to_vec();
    let src: std::net::Ipv6Addr = "2001:db8::42".parse().expect("ip");
    header.extend(src.octets());
    header.extend([0u8; 16]);
    header.extend(40000u16.to_be_bytes());
    header.extend(1883u16.to_be_bytes());
    let mut c = RawClient::connect(tb.mqtt, V5).await;
    c.send_bytes(&header).await;
    c.send_bytes(&connect_bytes(V5, "via-v2")).await;
    assert!(
        matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.reason_code == ReasonCode::SUCCESS)
    );
    assert_eq!(
        seen.get("via-v2").0,
        Some("[2001:db8::42]:40000".parse().expect("addr"))
    );

    // Without a header: closed, no CONNACK.
    let mut c = RawClient::connect(tb.mqtt, V5).await;
    c.send_bytes(&connect_bytes(V5, "direct")).await;
    assert_eq!(c.expect_closed().await, []);
    assert!(seen.seen.lock().expect("lock").get("direct").is_none());
    tb.stop().await;
}

#[tokio::test]
async fn proxy_protocol_header_comes_before_the_tls_handshake() {
    let ca = Ca::new("test CA");
    let files = tls_files(&leaf(&ca, "broker", None, Role::Server), &ca);
    let listeners = ListenersConfig {
        tls: Some(ANY),
        proxy_protocol: vec![ListenerKind::Tls],
        ..ListenersConfig::default()
    };
    let tls = tls_settings(&files, ClientAuth::None, CertIdentitySource::Cn);
    let (tb, seen) = broker_with(listeners, Some(tls)).await;
    let mut tcp = TcpStream::connect(tb.tls.expect("tls listener"))
        .await
        .expect("connect");
    tcp.write_all(b"PROXY TCP4 198.51.100.23 192.0.2.1 1234 8883\r\n")
        .await
        .expect("write header");
    let name = ServerName::try_from("localhost").expect("server name");
    let stream = tokio::time::timeout(
        TIMEOUT,
        TlsConnector::from(client_config(&ca, None, BOTH)).connect(name, tcp),
    )
    .await
    .expect("TLS handshake timed out")
    .expect("TLS handshake");
    let mut c = RawClient::over(stream, V5);
    c.send(&Packet::Connect(Box::new(connect_packet(
        V5,
        "behind-lb",
        true,
    ))))
    .await;
    assert!(
        matches!(c.recv().await, Some(Packet::ConnAck(a)) if a.reason_code == ReasonCode::SUCCESS)
    );
    assert_eq!(
        seen.get("behind-lb").0,
        Some("198.51.100.23:1234".parse().expect("addr"))
    );
    tb.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Limits

/// The CONNACK code a client with `version` gets (3.x return codes as their 5.0 equivalents).
async fn connack_code(
    addr: SocketAddr,
    version: ProtocolVersion,
    id: &str,
) -> (RawClient, ReasonCode) {
    let (c, ack) = RawClient::handshake(addr, connect_packet(version, id, true)).await;
    (c, ack.reason_code)
}

/// The CONNACK code an MQTT 5 client over WebSocket (to the listener at `addr`) gets.
async fn ws_connack_code(addr: SocketAddr, id: &str) -> (RawClient, ReasonCode) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let mut ws = ws_client(tcp, &format!("ws://{addr}/mqtt"))
        .await
        .expect("ws");
    ws.send(&Packet::Connect(Box::new(connect_packet(V5, id, true))))
        .await;
    match ws.recv().await {
        Some(Packet::ConnAck(a)) => (ws, a.reason_code),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// A broker with connection `limits` and default settings otherwise.
async fn limited(limits: LimitsConfig) -> TestBroker {
    let listeners = ListenersConfig::default();
    broker_full(listeners, None, limits, MqttConfig::default())
        .await
        .0
}

/// An MQTT 5 client `id` is refused with `code`, an MQTT 3.1.1 one with 0x03 Server
/// unavailable (3.1.1 has no finer code).
async fn assert_refused(addr: SocketAddr, id: &str, code: ReasonCode) {
    assert_eq!(connack_code(addr, V5, id).await.1, code);
    let v3 = connack_code(addr, V311, &format!("{id}-v3")).await.1;
    assert_eq!(v3, ReasonCode::SERVER_UNAVAILABLE);
}

/// Connects MQTT 5 clients `id` until one gets CONNACK `code` (a limit that frees or fills up
/// in the background).
async fn wait_connack(addr: SocketAddr, id: &str, code: ReasonCode) {
    let what = format!("a client gets CONNACK {code:?}");
    raftmq_tests::poll(&what, TIMEOUT, Duration::from_millis(20), || async {
        let (_c, got) = connack_code(addr, V5, id).await;
        if got == code { Ok(()) } else { Err(got) }
    })
    .await;
}

#[tokio::test]
async fn connection_caps_refuse_with_quota_exceeded() {
    let limits = LimitsConfig {
        max_connections: 2,
        max_connections_per_listener: 1,
        ..LimitsConfig::default()
    };
    let listeners = listening(&[ListenerKind::Ws]);
    let (tb, _) = broker_full(listeners, None, limits, MqttConfig::default()).await;
    let (first, code) = connack_code(tb.mqtt, V5, "first").await;
    assert_eq!(code, ReasonCode::SUCCESS);
    // The TCP listener is full; the WebSocket one is not.
    assert_refused(tb.mqtt, "second", ReasonCode::QUOTA_EXCEEDED).await;
    let ws_addr = tb.ws.expect("ws listener");
    let (_ws, code) = ws_connack_code(ws_addr, "web").await;
    assert_eq!(code, ReasonCode::SUCCESS);
    // The node is full: the last place on the WebSocket listener is refused too.
    let (_ws2, code) = ws_connack_code(ws_addr, "web2").await;
    assert_eq!(code, ReasonCode::QUOTA_EXCEEDED);

    // A closed connection frees its place.
    drop(first);
    wait_connack(tb.mqtt, "again", ReasonCode::SUCCESS).await;
    tb.stop().await;
}

#[tokio::test]
async fn connect_rate_refuses_with_connection_rate_exceeded() {
    // One connection a second, two at once: the third in a row is refused (the test takes far
    // less than the second a token takes to come back).
    let limits = LimitsConfig {
        connect_rate: 1,
        connect_burst: 2,
        ..LimitsConfig::default()
    };
    let tb = limited(limits).await;
    let (_a, code_a) = connack_code(tb.mqtt, V5, "a").await;
    let (_b, code_b) = connack_code(tb.mqtt, V5, "b").await;
    let (_c, code_c) = connack_code(tb.mqtt, V5, "c").await;
    assert_eq!([code_a, code_b], [ReasonCode::SUCCESS; 2]);
    assert_eq!(code_c, ReasonCode::CONNECTION_RATE_EXCEEDED);
    tb.stop().await;
}

#[tokio::test]
async fn overload_refuses_with_server_busy() {
    // Memory: any process is above 1KiB.
    let limits = LimitsConfig {
        max_memory: ByteSize(1024),
        ..LimitsConfig::default()
    };
    let tb = limited(limits).await;
    assert_refused(tb.mqtt, "m", ReasonCode::SERVER_BUSY).await;
    tb.stop().await;

    // Queued messages: an offline persistent session collects more than the threshold.
    let limits = LimitsConfig {
        max_queued_messages: 5,
        ..LimitsConfig::default()
    };
    let tb = limited(limits).await;
    let mut connect = connect_packet(V5, "offline", true);
    connect.properties.session_expiry_interval = Some(600);
    let (mut sub, ack) = RawClient::handshake(tb.mqtt, connect).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    sub.subscribe("queued/#", QoS::AtLeastOnce).await;
    sub.send(&Packet::Disconnect(Default::default())).await;
    drop(sub);
    let mut publisher = RawClient::connected(tb.mqtt, V5, "publisher").await;
    for n in 1..=10u16 {
        publisher
            .publish("queued/x", QoS::AtLeastOnce, n, b"m")
            .await;
        assert!(matches!(publisher.recv().await, Some(Packet::PubAck(_))));
    }
    let stats = tb.broker.clone();
    wait_until("10 messages are queued", || {
        stats.stats().messages_queued.load(Relaxed) >= 10
    })
    .await;
    wait_connack(tb.mqtt, "late", ReasonCode::SERVER_BUSY).await;
    tb.stop().await;
}

#[tokio::test]
async fn client_that_stops_reading_is_disconnected_and_memory_stays_bounded() {
    let limits = LimitsConfig {
        write_stall_timeout: DurationStr(Duration::from_secs(1)),
        ..LimitsConfig::default()
    };
    let mqtt = MqttConfig {
        max_queued_messages: 50,
        ..MqttConfig::default()
    };
    let (tb, _) = broker_full(ListenersConfig::default(), None, limits, mqtt).await;
    let mut slow = RawClient::connected(tb.mqtt, V5, "slow").await;
    slow.subscribe("big/#", QoS::AtMostOnce).await;
    let mut publisher = RawClient::connected(tb.mqtt, V5, "fast").await;
    let payload = vec![0x5A; 64 * 1024];
    let stats = tb.broker.clone();
    let online = || stats.stats().sessions_online.load(Relaxed);
    assert_eq!(online(), 2);
    let started = Instant::now();
    let mut sent = 0;
    // Bounded: at most 4000 messages (250 MiB) and TIMEOUT.
    while online() == 2 {
        assert!(
            sent < 4000 && started.elapsed() < TIMEOUT,
            "slow client still connected after {sent} messages"
        );
        for _ in 0..20 {
            publisher
                .publish("big/x", QoS::AtMostOnce, 0, &payload)
                .await;
        }
        sent += 20;
        let queued = stats.stats().messages_queued.load(Relaxed);
        assert!(queued <= 50, "{queued} messages queued for one session");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(online(), 1);
    publisher.send(&Packet::PingReq).await;
    assert_eq!(publisher.recv().await, Some(Packet::PingResp));
    drop(slow);
    tb.stop().await;
}

// ---------------------------------------------------------------------------------------------
// Robustness

/// One bad packet: random bytes, a truncated or oversized packet, reserved flags, a bad
/// remaining length, or a malformed PUBLISH.
fn junk(rng: &mut Rng) -> Vec<u8> {
    match rng.below(7) {
        0 => {
            let n = rng.below(64) as usize + 1;
            rng.bytes(n)
        }
        // Remaining length that never ends.
        1 => vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F],
        // Claims 256 MiB, more than max_packet_size.
        2 => vec![0x30, 0xFF, 0xFF, 0xFF, 0x7F, 0x00, 0x01],
        // Reserved flags on SUBSCRIBE / PUBREL.
        3 => vec![0x80, 0x02, 0x00, 0x01],
        // PUBLISH with an invalid topic (wildcard, NUL) or a topic longer than the packet.
        4 => {
            let mut p = vec![0x30, 0x07, 0x00, 0x03, b'a', b'/', b'#', b'x', b'y'];
            if rng.below(2) == 0 {
                p[6] = 0;
            }
            p
        }
        5 => vec![0x30, 0x04, 0x00, 0x09, b'a', b'b'],
        // A truncated CONNECT.
        _ => connect_bytes(V5, "junk")[..10].to_vec(),
    }
}

/// Where misbehaving connections go: the plain TCP listener, or a WebSocket or TLS one.
#[derive(Clone)]
struct Targets {
    tcp: SocketAddr,
    ws: SocketAddr,
    tls: SocketAddr,
    tls_client: Arc<ClientConfig>,
}

/// Writes a valid CONNECT half the time, then bad packets; a write error (the broker closed
/// the connection) ends it. Returns how many bad packets were written.
async fn send_junk<S: tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    rng: &mut Rng,
    packets: usize,
) -> usize {
    if rng.below(2) == 0 {
        let id = format!("junk-{}", rng.next_u64());
        let version = if rng.below(2) == 0 { V5 } else { V311 };
        if s.write_all(&connect_bytes(version, &id)).await.is_err() {
            return 0;
        }
    }
    for n in 0..packets {
        let bad = junk(rng);
        if s.write_all(&bad).await.is_err() || s.flush().await.is_err() {
            return n;
        }
    }
    packets
}

/// One misbehaving connection: bad MQTT over TCP, WebSocket or TLS, or garbage instead of the
/// WebSocket or TLS handshake. Returns how many bad packets (or garbage handshakes) it sent.
async fn misbehave(to: Targets, seed: u64, packets: usize) -> usize {
    let mut rng = Rng::new(seed | 1);
    let kind = rng.below(6);
    let addr = match kind {
        0..=2 => to.tcp,
        3 => to.ws,
        _ => to.tls,
    };
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return 0;
    };
    match kind {
        // Plain TCP, or garbage where a handshake should be.
        0..=2 => send_junk(&mut tcp, &mut rng, packets).await,
        _ if rng.below(4) == 0 => {
            let garbage = rng.bytes(200);
            usize::from(tcp.write_all(&garbage).await.is_ok())
        }
        3 => {
            let Ok(request) = format!("ws://{addr}/mqtt").into_client_request() else {
                return 0;
            };
            match tokio::time::timeout(TIMEOUT, tokio_tungstenite::client_async(request, tcp)).await
            {
                Ok(Ok((ws, _))) => send_junk(&mut WsStream::new(ws), &mut rng, packets).await,
                _ => panic!("WebSocket handshake refused during the flood"),
            }
        }
        _ => {
            let name = ServerName::try_from("localhost").expect("server name");
            let connect = TlsConnector::from(to.tls_client.clone()).connect(name, tcp);
            match tokio::time::timeout(TIMEOUT, connect).await {
                Ok(Ok(mut tls)) => send_junk(&mut tls, &mut rng, packets).await,
                _ => panic!("TLS handshake refused during the flood"),
            }
        }
    }
}

fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kib| kib.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packet_flood_does_not_disturb_well_behaved_clients() {
    const BAD_CONNECTIONS: u64 = 200;
    const BAD_PACKETS: usize = 20;
    const PUBLISHERS: u16 = 4;
    const MESSAGES: u16 = 250;
    let started = Instant::now();
    let ca = Ca::new("test CA");
    let (_files, tls) = server_tls(&ca);
    let listeners = listening(&[ListenerKind::Tls, ListenerKind::Ws]);
    let (tb, _) = broker_with(listeners, Some(tls)).await;
    let addr = tb.mqtt;
    let targets = Targets {
        tcp: addr,
        ws: tb.ws.expect("ws listener"),
        tls: tb.tls.expect("tls listener"),
        tls_client: client_config(&ca, None, BOTH),
    };
    let rss_before = resident_bytes();

    let mut sub = RawClient::connected(addr, V5, "subscriber").await;
    sub.subscribe("good/#", QoS::AtLeastOnce).await;
    let receiver = tokio::spawn(async move {
        let mut got = HashSet::new();
        while got.len() < usize::from(PUBLISHERS * MESSAGES) {
            let p = sub.recv_publish().await;
            if let Some(id) = p.packet_id {
                sub.send(&Packet::PubAck(PubResponse::success(id))).await;
            }
            got.insert(p.payload.to_vec());
        }
        got
    });
    let mut publishers = Vec::new();
    for n in 0..PUBLISHERS {
        publishers.push(tokio::spawn(async move {
            let mut c = RawClient::connected(addr, V5, &format!("publisher-{n}")).await;
            for m in 1..=MESSAGES {
                let payload = format!("{n}/{m}");
                c.publish("good/t", QoS::AtLeastOnce, m, payload.as_bytes())
                    .await;
                match c.recv().await {
                    Some(Packet::PubAck(ack)) => assert_eq!(ack.packet_id, pid(m)),
                    other => panic!("expected PUBACK, got {other:?}"),
                }
            }
        }));
    }
    // 200 misbehaving connections, 50 at a time.
    let mut attackers = tokio::task::JoinSet::new();
    let mut sent = 0;
    for seed in 0..BAD_CONNECTIONS {
        if attackers.len() >= 50
            && let Some(n) = attackers.join_next().await
        {
            sent += n.expect("misbehaving connection task");
        }
        attackers.spawn(misbehave(
            targets.clone(),
            0x9E37_79B9_7F4A_7C15 ^ seed.wrapping_mul(7919),
            BAD_PACKETS,
        ));
    }
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Some(n) = attackers.join_next().await {
            sent += n.expect("misbehaving connection task");
        }
    })
    .await
    .expect("the misbehaving connections did not finish in 20s");
    // The broker closes a connection at its first bad packet; writes succeed until the client
    // sees that, so this only checks that the flood happened.
    assert!(sent >= 1000, "only {sent} bad packets were sent");
    for p in publishers {
        tokio::time::timeout(Duration::from_secs(20), p)
            .await
            .expect("publisher timed out")
            .expect("publisher failed");
    }
    let got = tokio::time::timeout(Duration::from_secs(20), receiver)
        .await
        .expect("subscriber timed out")
        .expect("subscriber failed");
    for n in 0..PUBLISHERS {
        for m in 1..=MESSAGES {
            assert!(got.contains(format!("{n}/{m}").as_bytes()), "lost {n}/{m}");
        }
    }

    // Every misbehaving connection is gone; nothing piles up.
    let stats = tb.broker.clone();
    wait_until("only the well-behaved sessions are online", || {
        stats.stats().sessions_online.load(Relaxed) <= i64::from(PUBLISHERS) + 1
    })
    .await;
    assert!(stats.stats().messages_queued.load(Relaxed) <= i64::from(PUBLISHERS * MESSAGES));
    let growth = resident_bytes().saturating_sub(rss_before);
    assert!(
        growth < 256 * 1024 * 1024,
        "resident memory grew by {growth} bytes"
    );
    RawClient::connected(addr, V5, "after").await;
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    tb.stop().await;
}
