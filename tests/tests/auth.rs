//! Authentication, authorization and per-client limits, end to end over real sockets: password
//! file, anonymous access, ACL enforcement with the reason codes of each protocol version, the
//! HTTP callout (allow, deny, timeout, cache) and the per-client limits.

use bytes::Bytes;
use raftmq_codec::{
    Packet, ProtocolVersion, PubResponse, QoS, ReasonCode, Subscribe, SubscribeFilter,
    SubscriptionOptions,
};
use raftmq_core::Broker;
use raftmq_core::config::{ByteSize, DurationStr, MqttConfig};
use raftmq_core::limits::Limit;
use raftmq_server::auth::passwd::hash_password;
use raftmq_server::auth::{Auth, AuthConfig};
use raftmq_server::metrics::AUTH_RELOADS_TOTAL;
use raftmq_tests::metrics::metric;
use raftmq_tests::{
    RawClient, TIMEOUT, TestBroker, connect_packet, encode_all, pid, publish_packet,
};
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V3_1_1;

fn write_file(path: &std::path::Path, text: &str) {
    let mut f = std::fs::File::create(path).expect("create");
    f.write_all(text.as_bytes()).expect("write");
}

fn passwd_text(users: &[(&str, &str)]) -> String {
    users
        .iter()
        .map(|(u, p)| format!("{u}:{}\n", hash_password(p.as_bytes()).expect("hash")))
        .collect()
}

/// A broker with `auth` and `mqtt` settings.
async fn start(auth: AuthConfig, mqtt: MqttConfig) -> (TestBroker, Arc<Auth>) {
    let auth = Arc::new(Auth::load(&auth).expect("auth config"));
    let broker = Broker::with_auth(mqtt, auth.clone(), auth.clone(), 1);
    (TestBroker::with_broker(Arc::new(broker)).await, auth)
}

async fn connect_as(
    addr: SocketAddr,
    version: ProtocolVersion,
    client_id: &str,
    user: Option<&str>,
    password: Option<&str>,
) -> (RawClient, ReasonCode) {
    let mut c = connect_packet(version, client_id, true);
    c.username = user.map(Into::into);
    c.password = password.map(|p| Bytes::copy_from_slice(p.as_bytes()));
    let (client, ack) = RawClient::handshake(addr, c).await;
    (client, ack.reason_code)
}

/// A broker with `mqtt` settings and a client `id` connected to it.
async fn broker_and_client(
    mqtt: MqttConfig,
    version: ProtocolVersion,
    id: &str,
) -> (TestBroker, RawClient) {
    let b = TestBroker::with_config(mqtt).await;
    let c = RawClient::connected(b.mqtt, version, id).await;
    (b, c)
}

async fn subscribe_codes(c: &mut RawClient, filters: &[(&str, QoS)]) -> Vec<ReasonCode> {
    c.send(&Packet::Subscribe(Subscribe {
        packet_id: pid(7),
        properties: Default::default(),
        filters: filters
            .iter()
            .map(|(f, qos)| SubscribeFilter {
                filter: (*f).into(),
                options: SubscriptionOptions {
                    qos: *qos,
                    ..Default::default()
                },
            })
            .collect(),
    }))
    .await;
    match c.recv().await {
        Some(Packet::SubAck(ack)) => ack.reason_codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

async fn puback_code(c: &mut RawClient, topic: &str, id: u16) -> ReasonCode {
    c.publish(topic, QoS::AtLeastOnce, id, b"x").await;
    match c.recv().await {
        Some(Packet::PubAck(PubResponse { reason_code, .. })) => reason_code,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

async fn ping(c: &mut RawClient) {
    c.send(&Packet::PingReq).await;
    assert_eq!(c.recv().await, Some(Packet::PingResp));
}

/// Nothing (no PUBLISH) arrives within a short while.
async fn expect_silence(c: &mut RawClient) {
    match c.recv_within(Duration::from_millis(300)).await {
        Err(()) => {}
        Ok(p) => panic!("expected nothing, got {p:?}"),
    }
}

#[tokio::test]
async fn password_file_accepts_good_and_refuses_bad_credentials() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("passwd");
    write_file(&path, &passwd_text(&[("alice", "wonderland")]));
    let (b, _) = start(
        AuthConfig {
            password_file: Some(path),
            ..AuthConfig::default()
        },
        MqttConfig::default(),
    )
    .await;
    for version in [V5, V3] {
        let (_c, code) = connect_as(b.mqtt, version, "ok", Some("alice"), Some("wonderland")).await;
        assert_eq!(code, ReasonCode::SUCCESS, "{version:?}");
        for (user, password) in [
            (Some("alice"), Some("wrong")),
            (Some("alice"), None),
            (Some("nobody"), Some("wonderland")),
        ] {
            // v5: 0x86; 3.1.1: 4 (decoded as the same reason code).
            let (mut c, code) = connect_as(b.mqtt, version, "bad", user, password).await;
            assert_eq!(
                code,
                ReasonCode::BAD_USER_NAME_OR_PASSWORD,
                "{version:?} {user:?}"
            );
            assert_eq!(c.expect_closed().await, []);
        }
        // With a password file, anonymous access is off by default: v5 0x87, 3.1.1: 5.
        let (_c, code) = connect_as(b.mqtt, version, "anon", None, None).await;
        assert_eq!(code, ReasonCode::NOT_AUTHORIZED, "{version:?}");
    }
    let stats = b.broker.stats();
    assert!(stats.auth_failures.load(Ordering::Relaxed) >= 8);
}

#[tokio::test]
async fn anonymous_is_refused_when_disabled_and_accepted_by_default() {
    let (open, _) = start(AuthConfig::default(), MqttConfig::default()).await;
    let (_c, code) = connect_as(open.mqtt, V5, "anon", None, None).await;
    assert_eq!(code, ReasonCode::SUCCESS);

    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("passwd");
    write_file(&path, &passwd_text(&[("u", "p")]));
    let (closed, _) = start(
        AuthConfig {
            allow_anonymous: Some(false),
            password_file: Some(path.clone()),
            ..AuthConfig::default()
        },
        MqttConfig::default(),
    )
    .await;
    for version in [V5, V3] {
        let (_c, code) = connect_as(closed.mqtt, version, "anon", None, None).await;
        assert_eq!(code, ReasonCode::NOT_AUTHORIZED, "{version:?}");
    }
    // Explicitly allowed next to a password file.
    let (both, _) = start(
        AuthConfig {
            allow_anonymous: Some(true),
            password_file: Some(path),
            ..AuthConfig::default()
        },
        MqttConfig::default(),
    )
    .await;
    let (_c, code) = connect_as(both.mqtt, V3, "anon", None, None).await;
    assert_eq!(code, ReasonCode::SUCCESS);
}

#[tokio::test]
async fn password_file_change_is_picked_up_without_dropping_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("passwd");
    write_file(&path, &passwd_text(&[("alice", "a")]));
    // Refused reloads are only visible as a metric (and a log line).
    let refused_reloads = || {
        let name = format!("{AUTH_RELOADS_TOTAL}{{file=\"password\",result=\"error\"}}");
        metric(&raftmq_tests::metrics::render(), &name).unwrap_or(0.0)
    };
    let refused_before = refused_reloads();
    let (b, auth) = start(
        AuthConfig {
            password_file: Some(path.clone()),
            reload_interval: DurationStr(Duration::from_millis(50)),
            ..AuthConfig::default()
        },
        MqttConfig::default(),
    )
    .await;
    let watcher = tokio::spawn(auth.clone().watch());
    let (mut alice, code) = connect_as(b.mqtt, V5, "alice-1", Some("alice"), Some("a")).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let (_c, code) = connect_as(b.mqtt, V5, "bob-1", Some("bob"), Some("b")).await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);

    // A broken file is read, refused and the old one kept: alice can still log in.
    write_file(&path, "alice:not-a-hash\n");
    raftmq_tests::wait_until("the broken password file is read and refused", || {
        refused_reloads() > refused_before
    })
    .await;
    assert_eq!(auth.user_count(), 1, "the previous password file is kept");
    let (_c, code) = connect_as(b.mqtt, V5, "alice-2", Some("alice"), Some("a")).await;
    assert_eq!(code, ReasonCode::SUCCESS);

    write_file(&path, &passwd_text(&[("alice", "a"), ("bob", "b")]));
    raftmq_tests::wait_until("the new password file is loaded", || auth.user_count() == 2).await;
    let (_c, code) = connect_as(b.mqtt, V5, "bob-2", Some("bob"), Some("b")).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    // The client connected before the reload is still there.
    ping(&mut alice).await;
    watcher.abort();
}

const ACL: &str = "\
# everyone
allow subscribe public/#
allow pubsub users/%u/#
allow publish devices/%c/status
allow publish limited/# qos=1 retain=false
user admin
allow pubsub #
";

async fn acl_broker() -> (TestBroker, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("acl");
    write_file(&path, ACL);
    let (b, _) = start(
        AuthConfig {
            acl_file: Some(path),
            ..AuthConfig::default()
        },
        MqttConfig::default(),
    )
    .await;
    (b, dir)
}

#[tokio::test]
async fn acl_denied_subscribe_gets_0x87_in_v5_and_0x80_in_v3() {
    let (b, _dir) = acl_broker().await;
    let (mut c, _) = connect_as(b.mqtt, V5, "c5", Some("ann"), None).await;
    let codes = subscribe_codes(
        &mut c,
        &[
            ("public/+", QoS::AtLeastOnce),
            ("secret/#", QoS::AtMostOnce),
            ("users/ann/#", QoS::AtMostOnce),
            ("users/bob/#", QoS::AtMostOnce),
            ("#", QoS::AtMostOnce),
        ],
    )
    .await;
    assert_eq!(
        codes,
        [
            ReasonCode::GRANTED_QOS_1,
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode::GRANTED_QOS_0,
            ReasonCode::NOT_AUTHORIZED,
            ReasonCode::NOT_AUTHORIZED,
        ]
    );
    let (mut c3, _) = connect_as(b.mqtt, V3, "c3", Some("ann"), None).await;
    let codes = subscribe_codes(
        &mut c3,
        &[("secret/#", QoS::AtMostOnce), ("public/a", QoS::AtMostOnce)],
    )
    .await;
    assert_eq!(codes, [ReasonCode(0x80), ReasonCode::GRANTED_QOS_0]);
    // The admin section allows everything.
    let (mut admin, _) = connect_as(b.mqtt, V5, "adm", Some("admin"), None).await;
    let codes = subscribe_codes(&mut admin, &[("#", QoS::AtMostOnce)]).await;
    assert_eq!(codes, [ReasonCode::GRANTED_QOS_0]);
    assert_eq!(b.broker.stats().subscribe_denied.load(Ordering::Relaxed), 4);
}

#[tokio::test]
async fn acl_denied_publish_is_dropped_with_0x87_in_v5_and_acked_in_v3() {
    let (b, _dir) = acl_broker().await;
    let (mut watcher, _) = connect_as(b.mqtt, V5, "watch", Some("admin"), None).await;
    watcher.subscribe("#", QoS::AtMostOnce).await;

    let (mut c5, _) = connect_as(b.mqtt, V5, "dev-5", Some("ann"), None).await;
    assert_eq!(
        puback_code(&mut c5, "secret/x", 1).await,
        ReasonCode::NOT_AUTHORIZED
    );
    let (mut c3, _) = connect_as(b.mqtt, V3, "dev-3", Some("ann"), None).await;
    // MQTT 3 cannot refuse: acknowledged normally, and dropped.
    assert_eq!(
        puback_code(&mut c3, "secret/x", 1).await,
        ReasonCode::SUCCESS
    );
    expect_silence(&mut watcher).await;
    assert_eq!(b.broker.stats().publish_denied.load(Ordering::Relaxed), 2);

    // %u and %c patterns.
    assert_eq!(
        puback_code(&mut c5, "users/ann/t", 2).await,
        ReasonCode::SUCCESS
    );
    assert_eq!(watcher.recv_publish().await.topic, "users/ann/t");
    assert_eq!(
        puback_code(&mut c5, "users/bob/t", 3).await,
        ReasonCode::NOT_AUTHORIZED
    );
    assert_eq!(
        puback_code(&mut c5, "devices/dev-5/status", 4).await,
        ReasonCode::SUCCESS
    );
    assert_eq!(watcher.recv_publish().await.topic, "devices/dev-5/status");
    assert_eq!(
        puback_code(&mut c5, "devices/dev-3/status", 5).await,
        ReasonCode::NOT_AUTHORIZED
    );
    expect_silence(&mut watcher).await;
}

#[tokio::test]
async fn acl_qos_and_retain_limits() {
    let (b, _dir) = acl_broker().await;
    let (mut c, _) = connect_as(b.mqtt, V5, "lim", Some("ann"), None).await;
    assert_eq!(
        puback_code(&mut c, "limited/a", 1).await,
        ReasonCode::NO_MATCHING_SUBSCRIBERS
    );
    // QoS 2 above the rule's qos=1: PUBREC 0x87.
    c.publish("limited/a", QoS::ExactlyOnce, 2, b"x").await;
    match c.recv().await {
        Some(Packet::PubRec(r)) => assert_eq!(r.reason_code, ReasonCode::NOT_AUTHORIZED),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    // Retained publish under retain=false: refused and not stored.
    let mut p = publish_packet("limited/r", QoS::AtLeastOnce, 3, b"keep");
    p.retain = true;
    c.send(&Packet::Publish(p)).await;
    match c.recv().await {
        Some(Packet::PubAck(r)) => assert_eq!(r.reason_code, ReasonCode::NOT_AUTHORIZED),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    assert!(b.broker.retained("limited/r").is_none());
}

/// An authentication service for the callout tests: user `good`/password `pw` allowed, `scoped`
/// allowed with rules of its own, `slow` answers after 2 s, everyone else denied. Counts
/// requests.
async fn auth_service(calls: Arc<AtomicUsize>) -> SocketAddr {
    use axum::routing::post;
    use axum::{Json, Router};
    let app = Router::new().route(
        "/auth",
        post(move |Json(body): Json<serde_json::Value>| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                let user = body["username"].as_str().unwrap_or("");
                if user == "slow" {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                if user == "scoped" {
                    return Json(serde_json::json!({
                        "allow": true,
                        "acl": ["allow publish own/%c", "allow subscribe own/#"],
                    }));
                }
                let allow = user == "good"
                    && body["password"] == "pw"
                    && body["client_id"].is_string()
                    && body["peer"].is_string();
                Json(serde_json::json!({ "allow": allow }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    addr
}

#[tokio::test]
async fn callout_allows_denies_times_out_and_caches() {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = auth_service(calls.clone()).await;
    let (b, _) = start(
        AuthConfig {
            callout_url: Some(format!("http://{service}/auth")),
            callout_timeout: DurationStr(Duration::from_millis(300)),
            ..AuthConfig::default()
        },
        MqttConfig::default(),
    )
    .await;
    let (_c, code) = connect_as(b.mqtt, V5, "g1", Some("good"), Some("pw")).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Same credentials and client id again: answered from the cache.
    let (_c2, code) = connect_as(b.mqtt, V5, "g1", Some("good"), Some("pw")).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    let (_c, code) = connect_as(b.mqtt, V5, "g2", Some("good"), Some("bad")).await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    let (_c, code) = connect_as(b.mqtt, V3, "g3", Some("evil"), Some("pw")).await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);

    // A slow service: refused after the timeout, well before the service answers; other
    // clients are not held up meanwhile.
    let started = tokio::time::Instant::now();
    let slow = tokio::spawn(connect_as(b.mqtt, V5, "s1", Some("slow"), Some("pw")));
    let (_c, code) = connect_as(b.mqtt, V5, "g1", Some("good"), Some("pw")).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let (_c, code) = tokio::time::timeout(TIMEOUT, slow)
        .await
        .expect("slow client answered")
        .expect("task");
    assert_eq!(code, ReasonCode::NOT_AUTHORIZED);
    assert!(
        started.elapsed() < Duration::from_millis(1900),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn publish_rate_limit_disconnects_with_0x96() {
    let mqtt = MqttConfig {
        max_publish_rate: 5,
        ..MqttConfig::default()
    };
    for version in [V5, V3] {
        let (b, mut c) = broker_and_client(mqtt.clone(), version, "fast").await;
        // Ten PUBLISH in one write: the broker sees them within microseconds, so the bucket
        // (5 a second, full at connect) cannot refill in between.
        let p = Packet::Publish(publish_packet("t", QoS::AtMostOnce, 0, b"x"));
        c.send_bytes(&encode_all(&vec![p; 10], version)).await;
        c.expect_disconnect(ReasonCode::MESSAGE_RATE_TOO_HIGH).await;
        assert_eq!(b.broker.stats().limit_exceeded_count(Limit::PublishRate), 1);
    }
}

#[tokio::test]
async fn publish_bandwidth_limit_disconnects_with_0x97() {
    let mqtt = MqttConfig {
        max_publish_bandwidth: ByteSize(1000),
        ..MqttConfig::default()
    };
    let (b, mut c) = broker_and_client(mqtt, V5, "big").await;
    // Two 600-byte PUBLISH in one write: 1000 bytes a second cannot refill 200 in between.
    let p = Packet::Publish(publish_packet("t", QoS::AtMostOnce, 0, &[0; 600]));
    c.send_bytes(&encode_all(&[p.clone(), p], V5)).await;
    c.expect_disconnect(ReasonCode::QUOTA_EXCEEDED).await;
    assert_eq!(
        b.broker
            .stats()
            .limit_exceeded_count(Limit::PublishBandwidth),
        1
    );
}

#[tokio::test]
async fn topic_and_subscription_limits_have_their_reason_codes() {
    let mqtt = MqttConfig {
        max_topic_levels: 3,
        max_topic_length: 20,
        max_subscriptions_per_client: 2,
        ..MqttConfig::default()
    };
    let (b, mut c) = broker_and_client(mqtt, V5, "t").await;
    assert_eq!(
        puback_code(&mut c, "a/b/c/d", 1).await,
        ReasonCode::TOPIC_NAME_INVALID
    );
    assert_eq!(
        puback_code(&mut c, "a-very-long-topic-name-indeed", 2).await,
        ReasonCode::TOPIC_NAME_INVALID
    );
    let codes = subscribe_codes(
        &mut c,
        &[
            ("a/b/c/#", QoS::AtMostOnce),
            ("x", QoS::AtMostOnce),
            ("y", QoS::AtMostOnce),
            ("z", QoS::AtMostOnce),
        ],
    )
    .await;
    assert_eq!(
        codes,
        [
            ReasonCode::TOPIC_FILTER_INVALID,
            ReasonCode::GRANTED_QOS_0,
            ReasonCode::GRANTED_QOS_0,
            ReasonCode::QUOTA_EXCEEDED,
        ]
    );
    assert_eq!(
        b.broker.stats().limit_exceeded_count(Limit::Subscriptions),
        1
    );
    // 3.1.1: every failure is 0x80.
    let mut c3 = RawClient::connected(b.mqtt, V3, "t3").await;
    let codes = subscribe_codes(&mut c3, &[("a/b/c/#", QoS::AtMostOnce)]).await;
    assert_eq!(codes, [ReasonCode(0x80)]);
}

#[tokio::test]
async fn retained_bytes_limit_skips_storing_but_still_delivers() {
    let mqtt = MqttConfig {
        max_retained_bytes: ByteSize(10),
        ..MqttConfig::default()
    };
    let (b, mut sub) = broker_and_client(mqtt, V5, "sub").await;
    sub.subscribe("r/#", QoS::AtMostOnce).await;
    let mut c = RawClient::connected(b.mqtt, V5, "pub").await;
    let retained = |topic: &str, payload: &[u8], id| {
        let mut p = publish_packet(topic, QoS::AtLeastOnce, id, payload);
        p.retain = true;
        Packet::Publish(p)
    };
    c.send(&retained("r/1", b"12345678", 1)).await;
    assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
    assert_eq!(sub.recv_publish().await.topic, "r/1");
    c.send(&retained("r/2", b"12345678", 2)).await;
    assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
    // Delivered, but not stored.
    assert_eq!(sub.recv_publish().await.topic, "r/2");
    assert!(b.broker.retained("r/1").is_some());
    assert!(b.broker.retained("r/2").is_none());
    assert_eq!(b.broker.retained_bytes(), 8);
    assert_eq!(
        b.broker.stats().limit_exceeded_count(Limit::RetainedBytes),
        1
    );
    // Clearing frees room.
    c.send(&retained("r/1", b"", 3)).await;
    assert!(matches!(c.recv().await, Some(Packet::PubAck(_))));
    assert_eq!(b.broker.retained_bytes(), 0);
}

#[tokio::test]
async fn callout_rules_replace_the_acl_for_that_connection() {
    let calls = Arc::new(AtomicUsize::new(0));
    let service = auth_service(calls.clone()).await;
    let (b, _) = start(
        AuthConfig {
            callout_url: Some(format!("http://{service}/auth")),
            ..AuthConfig::default()
        },
        MqttConfig::default(),
    )
    .await;
    for round in 0..2 {
        // The second round is answered from the cache, rules included.
        let (mut c, code) = connect_as(b.mqtt, V5, "s-1", Some("scoped"), Some("x")).await;
        assert_eq!(code, ReasonCode::SUCCESS);
        assert_eq!(
            puback_code(&mut c, "own/s-1", 1).await,
            ReasonCode::NO_MATCHING_SUBSCRIBERS,
            "round {round}"
        );
        assert_eq!(
            puback_code(&mut c, "other", 2).await,
            ReasonCode::NOT_AUTHORIZED
        );
        let codes = subscribe_codes(
            &mut c,
            &[("own/#", QoS::AtMostOnce), ("other/#", QoS::AtMostOnce)],
        )
        .await;
        assert_eq!(
            codes,
            [ReasonCode::GRANTED_QOS_0, ReasonCode::NOT_AUTHORIZED]
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // Other users (no rules from the service, no ACL file) may do everything.
    let (mut c, code) = connect_as(b.mqtt, V5, "g", Some("good"), Some("pw")).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert_eq!(
        puback_code(&mut c, "other", 1).await,
        ReasonCode::NO_MATCHING_SUBSCRIBERS
    );
}

#[tokio::test]
async fn acl_file_change_applies_to_connected_clients() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("acl");
    write_file(&path, "allow publish a/#\n");
    let (b, auth) = start(
        AuthConfig {
            acl_file: Some(path.clone()),
            reload_interval: DurationStr(Duration::ZERO),
            ..AuthConfig::default()
        },
        MqttConfig::default(),
    )
    .await;
    let (mut c, _) = connect_as(b.mqtt, V5, "c", None, None).await;
    assert_eq!(
        puback_code(&mut c, "b/1", 1).await,
        ReasonCode::NOT_AUTHORIZED
    );
    // A broken file is refused; the old rules stay.
    write_file(&path, "allow publish a/#\nallow publish b/# qos=7\n");
    let (reloaded, errors) = auth.reload(false);
    assert_eq!((reloaded, errors.len()), (0, 1));
    assert_eq!(
        puback_code(&mut c, "a/1", 2).await,
        ReasonCode::NO_MATCHING_SUBSCRIBERS
    );
    assert_eq!(
        puback_code(&mut c, "b/1", 3).await,
        ReasonCode::NOT_AUTHORIZED
    );
    write_file(&path, "allow publish a/#\nallow publish b/#\n");
    assert_eq!(auth.reload(false).0, 1);
    assert_eq!(
        puback_code(&mut c, "b/1", 4).await,
        ReasonCode::NO_MATCHING_SUBSCRIBERS
    );
}

// ---- JSON Web Tokens (auth.jwt_secret_file, auth.jwt_jwks_file) ----

/// A secret made by this test run (never checked in): 64 hex digits, text like the
/// documented recipe's, so that no trailing byte is white space (which the file loader trims).
fn test_secret() -> Vec<u8> {
    // Distinct for each call, even within one clock tick.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        ^ ((CALLS.fetch_add(1, Ordering::Relaxed) as u64) << 48);
    raftmq_tests::Rng::new(seed)
        .bytes(32)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>()
        .into_bytes()
}

fn unix_in(secs: i64) -> u64 {
    raftmq_server::auth::jwt::unix_now().saturating_add_signed(secs)
}

fn hs256(secret: &[u8], claims: &serde_json::Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("encode token")
}

/// A fresh P-256 key: (PKCS#8 for signing, its public JWK with `kid`).
fn ec_key(kid: &str) -> (Vec<u8>, serde_json::Value) {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let public = pair.public_key_raw();
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "kid": kid,
        "x": b64.encode(&public[1..33]), "y": b64.encode(&public[33..]),
    });
    (pair.serialize_der(), jwk)
}

fn es256(pkcs8: &[u8], kid: &str, claims: &serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_ec_der(pkcs8),
    )
    .expect("encode token")
}

/// A PUBACK code of an accepted message (0x10: accepted, nobody subscribed).
fn accepted(code: ReasonCode) -> bool {
    code == ReasonCode::SUCCESS || code == ReasonCode::NO_MATCHING_SUBSCRIBERS
}

async fn connect_with_token(
    addr: SocketAddr,
    version: ProtocolVersion,
    client_id: &str,
    token: &str,
) -> (RawClient, ReasonCode) {
    // 3.1.1 needs a user name with a password; it is ignored for tokens.
    connect_as(addr, version, client_id, Some("ignored"), Some(token)).await
}

#[tokio::test]
async fn jwt_passwords_are_validated_and_their_claims_applied() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = test_secret();
    let secret_path = dir.path().join("jwt.secret");
    std::fs::write(&secret_path, &secret).expect("write secret");
    let (k1, jwk1) = ec_key("k1");
    let jwks_path = dir.path().join("jwks.json");
    write_file(
        &jwks_path,
        &serde_json::json!({ "keys": [jwk1] }).to_string(),
    );
    let mut acl = tempfile::NamedTempFile::new().expect("temp");
    writeln!(acl, "allow pubsub users/%u/#").expect("write");
    let (b, _auth) = start(
        AuthConfig {
            jwt_secret_file: Some(secret_path),
            jwt_jwks_file: Some(jwks_path),
            jwt_acl_claim: Some("mqtt".into()),
            acl_file: Some(acl.path().to_owned()),
            ..AuthConfig::default()
        },
        MqttConfig::default(),
    )
    .await;
    let claims = |user: &str, exp: i64| serde_json::json!({"sub": user, "exp": unix_in(exp)});
    for version in [V5, V3] {
        let good = hs256(&secret, &claims("alice", 600));
        let (mut c, code) = connect_with_token(b.mqtt, version, "jwt-ok", &good).await;
        assert_eq!(code, ReasonCode::SUCCESS, "{version:?}");
        // %u is the token's `sub`, not the CONNECT user name.
        assert!(accepted(puback_code(&mut c, "users/alice/x", 1).await));
        if version.is_v5() {
            assert_eq!(
                puback_code(&mut c, "users/ignored/x", 2).await,
                ReasonCode::NOT_AUTHORIZED
            );
        }
        let refused = [
            hs256(&secret, &claims("alice", -60)),                // expired
            hs256(&test_secret(), &claims("alice", 600)),         // another key
            hs256(&secret, &serde_json::json!({"sub": "alice"})), // no exp
            hs256(
                &secret,
                &serde_json::json!({"sub": "a", "exp": unix_in(600), "nbf": unix_in(300)}),
            ), // not yet valid
        ];
        for token in refused {
            let (mut c, code) = connect_with_token(b.mqtt, version, "jwt-bad", &token).await;
            assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD, "{version:?}");
            assert_eq!(code.to_v3_connack(), 4);
            assert_eq!(c.expect_closed().await, []);
        }
    }
    // A JWKS key, and the token's own permissions replacing the ACL file.
    let scoped = serde_json::json!({
        "sub": "dev-1", "exp": unix_in(600), "mqtt": {"pub": ["telemetry/%u"], "sub": []},
    });
    let (mut c, code) = connect_with_token(b.mqtt, V5, "jwt-es", &es256(&k1, "k1", &scoped)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    assert!(accepted(puback_code(&mut c, "telemetry/dev-1", 1).await));
    assert_eq!(
        puback_code(&mut c, "users/dev-1/x", 2).await,
        ReasonCode::NOT_AUTHORIZED,
        "the token's permissions replace the ACL file"
    );
    // No password shaped like a token and no other credential store: refused.
    let (_c, code) = connect_as(b.mqtt, V5, "jwt-none", Some("alice"), Some("pw")).await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
    let (_c, code) = connect_as(b.mqtt, V5, "jwt-anon", None, None).await;
    assert_eq!(code, ReasonCode::NOT_AUTHORIZED);
}

#[tokio::test]
async fn a_token_that_expires_while_connected_closes_the_connection() {
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = test_secret();
    let path = dir.path().join("jwt.secret");
    std::fs::write(&path, &secret).expect("write secret");
    let (b, _auth) = start(
        AuthConfig {
            jwt_secret_file: Some(path),
            ..AuthConfig::default()
        },
        MqttConfig::default(),
    )
    .await;
    let token = |secs| {
        hs256(
            &secret,
            &serde_json::json!({"sub": "s", "exp": unix_in(secs)}),
        )
    };
    // exp has a one-second resolution: these expire 2 to 3 s from now.
    let (mut v5, code) = connect_with_token(b.mqtt, V5, "exp-5", &token(3)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let (mut v3, code) = connect_with_token(b.mqtt, V3, "exp-3", &token(3)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    let (mut long, code) = connect_with_token(b.mqtt, V5, "exp-long", &token(600)).await;
    assert_eq!(code, ReasonCode::SUCCESS);
    ping(&mut v5).await;
    // Then both are closed: MQTT 5 with DISCONNECT 0xA0 Maximum connect time, 3.1.1 without
    // a packet. `expect_disconnect` waits at most TIMEOUT for each.
    v5.expect_disconnect(ReasonCode::MAXIMUM_CONNECT_TIME).await;
    v3.expect_disconnect(ReasonCode::MAXIMUM_CONNECT_TIME).await;
    ping(&mut long).await;
}

// ---- MQTT 5 enhanced authentication: SCRAM (auth.scram_file) ----

mod scram_client {
    use super::*;
    use raftmq_codec::{Auth, AuthProperties, ConnAck, Connect, ConnectProperties};
    use raftmq_server::auth::scram::{ClientExchange, Mechanism};

    pub fn auth(code: ReasonCode, method: &str, data: String) -> Packet {
        Packet::Auth(Auth {
            reason_code: code,
            properties: AuthProperties {
                authentication_method: Some(method.into()),
                authentication_data: Some(Bytes::from(data)),
                ..AuthProperties::default()
            },
        })
    }

    pub fn connect(id: &str, method: &str, first: String) -> Connect {
        Connect {
            properties: ConnectProperties {
                authentication_method: Some(method.into()),
                authentication_data: Some(Bytes::from(first)),
                ..Default::default()
            },
            ..connect_packet(V5, id, true)
        }
    }

    /// Runs the exchange from the server-first message on: sends client-final and returns
    /// what the broker answers (CONNACK or AUTH).
    pub async fn finish(c: &mut RawClient, client: &mut ClientExchange, method: &str) -> Packet {
        let first = match c.recv().await {
            Some(Packet::Auth(a)) => {
                assert_eq!(a.reason_code, ReasonCode::CONTINUE_AUTHENTICATION);
                assert_eq!(a.properties.authentication_method.as_deref(), Some(method));
                a.properties.authentication_data.expect("server-first")
            }
            other => panic!("expected AUTH 0x18, got {other:?}"),
        };
        let last = client
            .client_final(&first)
            .expect("server-first is well formed");
        c.send(&auth(ReasonCode::CONTINUE_AUTHENTICATION, method, last))
            .await;
        c.recv().await.expect("an answer to client-final")
    }

    /// A full CONNECT exchange; the CONNACK and the client.
    pub async fn login(
        addr: SocketAddr,
        id: &str,
        m: Mechanism,
        user: &str,
        password: &str,
    ) -> (RawClient, ConnAck, ClientExchange) {
        let mut client = ClientExchange::new(m, user, password.as_bytes(), "cl1ent-n0nce");
        let mut c = RawClient::connect(addr, V5).await;
        c.send(&Packet::Connect(Box::new(connect(
            id,
            m.name(),
            client.client_first(),
        ))))
        .await;
        match finish(&mut c, &mut client, m.name()).await {
            Packet::ConnAck(ack) => (c, ack, client),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
}

async fn scram_broker() -> (TestBroker, tempfile::TempDir) {
    use raftmq_server::auth::scram::{Credential, Mechanism, format_credentials};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("scram");
    let creds: Vec<Credential> = Mechanism::ALL
        .into_iter()
        .map(|m| Credential::generate(m, b"correct horse").expect("salt"))
        .collect();
    write_file(&path, &format!("carol:{}\n", format_credentials(&creds)));
    let (b, _auth) = start(
        AuthConfig {
            scram_file: Some(path),
            // For the test of AUTH after a plain CONNECT.
            allow_anonymous: Some(true),
            ..AuthConfig::default()
        },
        MqttConfig::default(),
    )
    .await;
    (b, dir)
}

/// Conformance (5.0): [MQTT-4.12.0-2] [MQTT-4.12.0-4] [MQTT-4.12.0-5] [MQTT-3.15.2-1]
#[tokio::test]
async fn scram_enhanced_authentication_accepts_the_right_password_only() {
    use raftmq_server::auth::scram::Mechanism;
    let (b, _dir) = scram_broker().await;
    for m in Mechanism::ALL {
        let (mut c, ack, client) =
            scram_client::login(b.mqtt, "scram-ok", m, "carol", "correct horse").await;
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "{m:?}");
        assert_eq!(
            ack.properties.authentication_method.as_deref(),
            Some(m.name())
        );
        let server_final = ack.properties.authentication_data.expect("server-final");
        assert!(
            client.verify_server_final(&server_final),
            "the server proves it knows the credentials"
        );
        ping(&mut c).await;

        let (mut c, ack, _) =
            scram_client::login(b.mqtt, "scram-bad", m, "carol", "wrong horse").await;
        assert_eq!(ack.reason_code, ReasonCode::NOT_AUTHORIZED, "{m:?}");
        assert_eq!(c.expect_closed().await, []);
        let (mut c, ack, _) =
            scram_client::login(b.mqtt, "scram-who", m, "mallory", "correct horse").await;
        assert_eq!(ack.reason_code, ReasonCode::NOT_AUTHORIZED, "{m:?}");
        assert_eq!(c.expect_closed().await, []);
    }
    // A plain CONNECT with a password is not SCRAM: the SCRAM file holds no Argon2 hashes.
    let (_c, code) = connect_as(b.mqtt, V5, "plain", Some("carol"), Some("correct horse")).await;
    assert_eq!(code, ReasonCode::BAD_USER_NAME_OR_PASSWORD);
}

/// Conformance (5.0): [MQTT-4.12.0-1]
#[tokio::test]
async fn unknown_methods_and_out_of_order_packets_are_refused() {
    let (b, _dir) = scram_broker().await;
    let (mut c, ack) = RawClient::handshake(
        b.mqtt,
        scram_client::connect("m1", "SCRAM-SHA-1", "n,,n=carol,r=x".into()),
    )
    .await;
    assert_eq!(ack.reason_code, ReasonCode::BAD_AUTHENTICATION_METHOD);
    assert_eq!(c.expect_closed().await, []);
    // Anything but AUTH or DISCONNECT before CONNACK is a Protocol Error.
    let mut c = RawClient::connect(b.mqtt, V5).await;
    let connect = scram_client::connect("m2", "SCRAM-SHA-256", "n,,n=carol,r=x".into());
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(c.recv().await, Some(Packet::Auth(_))));
    c.send(&Packet::PingReq).await;
    match c.expect_closed().await.as_slice() {
        [Packet::ConnAck(ack)] => assert_eq!(ack.reason_code, ReasonCode::PROTOCOL_ERROR),
        other => panic!("expected CONNACK 0x82, got {other:?}"),
    }
    // An AUTH naming another method is one too.
    let mut c = RawClient::connect(b.mqtt, V5).await;
    let connect = scram_client::connect("m3", "SCRAM-SHA-256", "n,,n=carol,r=x".into());
    c.send(&Packet::Connect(Box::new(connect))).await;
    assert!(matches!(c.recv().await, Some(Packet::Auth(_))));
    c.send(&scram_client::auth(
        ReasonCode::CONTINUE_AUTHENTICATION,
        "SCRAM-SHA-512",
        "c=biws,r=x,p=AAAA".into(),
    ))
    .await;
    match c.expect_closed().await.as_slice() {
        [Packet::ConnAck(ack)] => assert_eq!(ack.reason_code, ReasonCode::PROTOCOL_ERROR),
        other => panic!("expected CONNACK 0x82, got {other:?}"),
    }
    // Re-authentication without enhanced authentication at CONNECT.
    let mut c = RawClient::connected(b.mqtt, V5, "m4").await;
    c.send(&scram_client::auth(
        ReasonCode::RE_AUTHENTICATE,
        "SCRAM-SHA-256",
        "n,,n=carol,r=x".into(),
    ))
    .await;
    c.expect_disconnect(ReasonCode::PROTOCOL_ERROR).await;
}

/// Conformance (5.0): [MQTT-4.12.1-2]
#[tokio::test]
async fn scram_re_authentication_renews_or_closes_the_connection() {
    use raftmq_server::auth::scram::{ClientExchange, Mechanism};
    let (b, _dir) = scram_broker().await;
    let m = Mechanism::Sha256;
    let (mut c, ack, _) = scram_client::login(b.mqtt, "reauth", m, "carol", "correct horse").await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    c.subscribe("reauth/#", QoS::AtLeastOnce).await;

    // Success: AUTH 0x19 → AUTH 0x18 → AUTH 0x18 → AUTH 0x00 with server-final.
    let mut again = ClientExchange::new(m, "carol", b"correct horse", "n0nce-2");
    c.send(&scram_client::auth(
        ReasonCode::RE_AUTHENTICATE,
        m.name(),
        again.client_first(),
    ))
    .await;
    match scram_client::finish(&mut c, &mut again, m.name()).await {
        Packet::Auth(a) => {
            assert_eq!(a.reason_code, ReasonCode::SUCCESS);
            assert_eq!(
                a.properties.authentication_method.as_deref(),
                Some(m.name())
            );
            let last = a.properties.authentication_data.expect("server-final");
            assert!(again.verify_server_final(&last));
        }
        other => panic!("expected AUTH 0x00, got {other:?}"),
    }
    // The session goes on.
    assert!(accepted(puback_code(&mut c, "reauth/a", 3).await));
    let p = c.recv_publish().await;
    assert_eq!(p.topic.as_str(), "reauth/a");

    // Failure: a wrong password closes the connection with DISCONNECT 0x87.
    let mut wrong = ClientExchange::new(m, "carol", b"wrong horse", "n0nce-3");
    c.send(&scram_client::auth(
        ReasonCode::RE_AUTHENTICATE,
        m.name(),
        wrong.client_first(),
    ))
    .await;
    let answer = scram_client::finish(&mut c, &mut wrong, m.name()).await;
    assert_eq!(
        answer,
        Packet::Disconnect(raftmq_codec::Disconnect::with_code(
            ReasonCode::NOT_AUTHORIZED
        ))
    );
    assert_eq!(c.expect_closed().await, []);
}
