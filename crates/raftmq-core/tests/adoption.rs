//! Adopting the sessions of a node declared down (`Broker::adopt_sessions`) while their clients
//! reconnect here.
//!
//! Adoption restores a stored session offline unless the client id already has a session in
//! memory. A client that connects while the adoption runs must keep its live session: the
//! adopted copy may neither replace it in the registry nor publish its will while the client
//! is connected.

use bytes::Bytes;
use raftmq_codec::{ByteStr, QoS, SubscriptionOptions};
use raftmq_core::config::MqttConfig;
use raftmq_core::durability::{SessionImage, WillRecord};
use raftmq_core::session::SubEntry;
use raftmq_core::{Broker, Message};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// A stored session of `client_id` with `subscriptions` filters (a long restore: the window in
/// which a connect could slip in) and a will with a 60 s delay.
fn stored_session(client_id: &str, subscriptions: usize, now: Instant) -> SessionImage {
    let entry = SubEntry {
        options: SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..SubscriptionOptions::default()
        },
        subscription_id: None,
    };
    SessionImage {
        client_id: ByteStr::from(client_id.to_owned()),
        expiry_secs: 3600,
        subscriptions: (0..subscriptions)
            .map(|i| (Arc::from(format!("adopted/{i}/#")), entry))
            .collect(),
        messages: Vec::new(),
        incoming_qos2: Vec::new(),
        will: Some(WillRecord {
            message: Arc::new(Message {
                topic: ByteStr::from("wills/adopted".to_owned()),
                payload: Bytes::from_static(b"gone"),
                qos: QoS::AtLeastOnce,
                retain: false,
                properties: Default::default(),
                expires_at: None,
                received_at: now,
                origin: Some(ByteStr::from(client_id.to_owned())),
            }),
            delay_secs: 60,
            message_expiry_secs: None,
        }),
    }
}

/// Races one adoption against one reconnect of the same client id, many times: whichever
/// comes first, the connected client's session is the one in the registry, it is online, and
/// no will is published while it stays connected (not even after the adopted will's delay and
/// the session's expiry have passed).
#[test]
fn a_client_connecting_during_adoption_keeps_its_live_session_and_no_will_fires() {
    let t0 = Instant::now();
    for round in 0..1000 {
        let broker = Arc::new(Broker::new(MqttConfig::default()));
        let client_id = ByteStr::from(format!("roamer-{round}"));
        let image = stored_session(&client_id, 400, t0);
        let start = Arc::new(Barrier::new(2));
        let connector = {
            let (broker, start, client_id) = (broker.clone(), start.clone(), client_id.clone());
            std::thread::spawn(move || {
                start.wait();
                broker.attach(&client_id, false, 3600, None, t0)
            })
        };
        start.wait();
        broker.adopt_sessions(vec![image], t0);
        let attached = connector.join().expect("the connecting thread panicked");

        let held = broker
            .session(&client_id)
            .expect("the client id has a session");
        assert!(
            Arc::ptr_eq(&held, &attached.session),
            "round {round}: the adopted session replaced the live one of a connected client"
        );
        assert!(
            held.is_online(),
            "round {round}: the live session is offline"
        );
        broker.handle_timeout(t0 + Duration::from_secs(7200));
        assert_eq!(
            broker.stats().wills_published.load(Relaxed),
            0,
            "round {round}: a will was published while its client was connected"
        );
        assert!(
            broker.session(&client_id).is_some_and(|s| s.is_online()),
            "round {round}: the connected client's session ended"
        );
    }
}
