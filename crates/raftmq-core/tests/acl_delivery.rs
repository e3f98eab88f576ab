//! An ACL in `message` mode: a broad subscription is granted, and messages on denied topics
//! are withheld from it one by one (as Mosquitto users expect), counted as dropped.

mod support;

use raftmq_codec::{
    Packet, PacketId, ProtocolVersion, Publish, PublishProperties, QoS, ReasonCode, Subscribe,
    SubscribeFilter, SubscriptionOptions,
};
use raftmq_core::acl::Acl;
use raftmq_core::config::MqttConfig;
use raftmq_core::stats::DropReason;
use raftmq_core::{Broker, Connection};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

fn broker(acl: &str) -> Arc<Broker> {
    let acl = Arc::new(Acl::parse(acl).expect("valid ACL"));
    Arc::new(Broker::with_auth(
        MqttConfig::default(),
        Arc::new(raftmq_core::auth::AllowAll),
        acl,
        1,
    ))
}

fn connected(broker: &Arc<Broker>, id: &str, now: Instant) -> Connection {
    let mut c = Connection::new(broker.clone(), None, now);
    c.handle_packet(
        Packet::Connect(Box::new(support::connect(ProtocolVersion::V5, id, true))),
        now,
    );
    assert!(
        matches!(c.poll_transmit(), Some(Packet::ConnAck(a)) if a.reason_code == ReasonCode::SUCCESS)
    );
    c
}

fn subscribe(c: &mut Connection, filter: &str, now: Instant) -> Vec<ReasonCode> {
    c.handle_packet(
        Packet::Subscribe(Subscribe {
            packet_id: PacketId::new(1).expect("non-zero"),
            properties: Default::default(),
            filters: vec![SubscribeFilter {
                filter: filter.into(),
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..Default::default()
                },
            }],
        }),
        now,
    );
    match c.poll_transmit() {
        Some(Packet::SubAck(ack)) => ack.reason_codes,
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

fn publish(c: &mut Connection, topic: &str, now: Instant) {
    c.handle_packet(
        Packet::Publish(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: false,
            topic: topic.into(),
            packet_id: None,
            properties: PublishProperties::default(),
            payload: bytes::Bytes::from_static(b"m"),
        }),
        now,
    );
}

fn topics_received(c: &mut Connection, now: Instant) -> Vec<String> {
    c.pump(now, usize::MAX);
    std::iter::from_fn(|| c.poll_transmit())
        .map(|p| match p {
            Packet::Publish(p) => p.topic.to_string(),
            other => panic!("expected PUBLISH, got {other:?}"),
        })
        .collect()
}

#[test]
fn message_mode_grants_hash_and_withholds_the_denied_topics() {
    let b = broker("mode message\ndeny subscribe secret/#\nallow subscribe #\nallow publish #\n");
    let now = Instant::now();
    let mut sub = connected(&b, "sub", now);
    assert_eq!(subscribe(&mut sub, "#", now), [ReasonCode::GRANTED_QOS_1]);
    let mut publ = connected(&b, "pub", now);
    for topic in ["public/a", "secret/b", "public/c", "secret"] {
        publish(&mut publ, topic, now);
    }
    assert_eq!(topics_received(&mut sub, now), ["public/a", "public/c"]);
    let dropped = &b.stats().messages_dropped;
    let index = DropReason::ALL
        .iter()
        .position(|r| *r == DropReason::NotAuthorized)
        .expect("a drop reason");
    assert_eq!(dropped[index].load(Ordering::Relaxed), 2);
}

#[test]
fn filter_mode_still_refuses_an_overlapping_subscription() {
    let b = broker("deny subscribe secret/#\nallow subscribe #\nallow publish #\n");
    let now = Instant::now();
    let mut sub = connected(&b, "sub", now);
    assert_eq!(subscribe(&mut sub, "#", now), [ReasonCode::NOT_AUTHORIZED]);
    assert_eq!(
        subscribe(&mut sub, "public/#", now),
        [ReasonCode::GRANTED_QOS_1]
    );
}

/// A connection the server makes itself (a bridge's local side, `Connection::trust`) skips
/// authentication (here an authenticator that refuses everyone) but not the ACL, which applies
/// to its user name; a client asking for a client id reserved for the server is refused.
#[test]
fn a_trusted_connection_skips_authentication_but_not_the_acl() {
    use raftmq_core::auth::{AuthDecision, Authenticator, ConnectInfo, Principal};
    struct Nobody;
    impl Authenticator for Nobody {
        fn authenticate(&self, _: &ConnectInfo<'_>) -> AuthDecision {
            AuthDecision::Deny(ReasonCode::NOT_AUTHORIZED)
        }
    }
    let acl = Acl::parse("user bridge\nallow subscribe out/#\nallow publish in/#\n").expect("ACL");
    let b = Arc::new(Broker::with_auth(
        MqttConfig::default(),
        Arc::new(Nobody),
        Arc::new(acl),
        1,
    ));
    let now = Instant::now();
    let connack = |c: &mut Connection| match c.poll_transmit() {
        Some(Packet::ConnAck(a)) => a.reason_code,
        other => panic!("expected CONNACK, got {other:?}"),
    };
    // A network client: refused by the authenticator, and for a reserved id before that.
    for id in ["device", "$bridge/cloud"] {
        let mut client = Connection::new(b.clone(), None, now);
        client.handle_packet(
            Packet::Connect(Box::new(support::connect(ProtocolVersion::V5, id, true))),
            now,
        );
        let want = if id.starts_with(raftmq_core::RESERVED_CLIENT_ID_PREFIX) {
            ReasonCode::CLIENT_IDENTIFIER_NOT_VALID
        } else {
            ReasonCode::NOT_AUTHORIZED
        };
        assert_eq!(connack(&mut client), want, "{id}");
    }
    // The server's own connection, running as user "bridge".
    let mut bridge = Connection::new(b.clone(), None, now);
    bridge.trust(Principal {
        username: Some("bridge".into()),
        ..Principal::default()
    });
    bridge.handle_packet(
        Packet::Connect(Box::new(support::connect(
            ProtocolVersion::V5,
            "$bridge/cloud",
            true,
        ))),
        now,
    );
    assert_eq!(connack(&mut bridge), ReasonCode::SUCCESS);
    assert_eq!(
        subscribe(&mut bridge, "out/#", now),
        [ReasonCode::GRANTED_QOS_1]
    );
    assert_eq!(
        subscribe(&mut bridge, "secret/#", now),
        [ReasonCode::NOT_AUTHORIZED]
    );
}
