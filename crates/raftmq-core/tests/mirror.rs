//! What a cluster node's broker does for the others (sans-IO, no network).
//!
//! - Adopting the sessions of a node declared down (`Broker::adopt_sessions`) while their
//!   clients reconnect here: adoption restores a stored session offline unless the client id
//!   already has a session in memory. A client that connects while the adoption runs keeps its
//!   live session: the adopted copy neither replaces it in the registry nor publishes its will
//!   while the client is connected.
//! - The wills of sessionless connections (nothing in the log for them): announced to the
//!   peers, withdrawn when they stop being pending, and published once by the node that
//!   declares their node down.

use bytes::Bytes;
use raftmq_codec::{ByteStr, QoS, SubscriptionOptions};
use raftmq_core::DetachKind;
use raftmq_core::broker::{ENDED_WILLS_KEPT, WillsAnnouncement, WillsOutcome};
use raftmq_core::config::MqttConfig;
use raftmq_core::durability::{Commit, MessageId, SessionImage, WillRecord};
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
        qos2_reroute: Vec::new(),
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

fn will_of(client_id: &str) -> WillRecord {
    WillRecord {
        message: Arc::new(Message {
            topic: ByteStr::from(format!("wills/{client_id}")),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            received_at: Instant::now(),
            origin: Some(ByteStr::from(client_id.to_owned())),
        }),
        delay_secs: 0,
        message_expiry_secs: None,
    }
}

fn announced(broker: &Broker) -> Vec<String> {
    let mut ids: Vec<String> = broker
        .local_wills()
        .1
        .into_iter()
        .map(|(id, _)| id.to_string())
        .collect();
    ids.sort();
    ids
}

/// A sessionless connection's will is announced while it is pending and withdrawn when it is
/// not any more: a normal disconnect, a disconnect that publishes it, a takeover. Persistent
/// sessions' wills are never announced (the log records them).
/// A forwarder that sends nothing: makes a broker a cluster node for these tests.
struct NoPeers;

impl raftmq_core::Forwarder for NoPeers {
    fn forward(
        &self,
        _node: u64,
        _message: &Arc<Message>,
        _plain: bool,
        _shared: Vec<Arc<str>>,
        _stored: Option<MessageId>,
        _after: Option<&Commit>,
    ) -> Commit {
        Commit::ready()
    }
}

#[test]
fn sessionless_wills_are_announced_while_pending_and_withdrawn_after() {
    let t0 = Instant::now();
    // A single node keeps no will table.
    let single = Broker::new(MqttConfig::default());
    let _s = single.attach(&ByteStr::from("s"), true, 0, Some(will_of("s")), t0);
    assert_eq!(announced(&single), [] as [&str; 0]);

    let broker = Broker::new(MqttConfig::default());
    broker.set_forwarder(Arc::new(NoPeers));
    let g0 = broker.wills_generation();
    let a = broker.attach(&ByteStr::from("a"), true, 0, Some(will_of("a")), t0);
    let _b = broker.attach(&ByteStr::from("b"), true, 0, Some(will_of("b")), t0);
    let _p = broker.attach(&ByteStr::from("p"), true, 3600, Some(will_of("p")), t0);
    let _n = broker.attach(&ByteStr::from("n"), true, 0, None, t0);
    assert_eq!(announced(&broker), ["a", "b"]);
    assert_ne!(broker.wills_generation(), g0);

    broker.detach(&a.session, a.epoch, DetachKind::Normal, t0);
    assert_eq!(announced(&broker), ["b"]);
    // A takeover: the old connection's will is published here (no delay) and the new
    // connection has none.
    let g1 = broker.wills_generation();
    let _b2 = broker.attach(&ByteStr::from("b"), true, 0, None, t0);
    assert_eq!(announced(&broker), [] as [&str; 0]);
    assert_ne!(broker.wills_generation(), g1);
    assert_eq!(broker.stats().wills_published.load(Relaxed), 1);
    // A new will for the same client id is announced again.
    let c = broker.attach(&ByteStr::from("b"), true, 0, Some(will_of("b")), t0);
    assert_eq!(announced(&broker), ["b"]);
    broker.detach(&c.session, c.epoch, DetachKind::Abnormal, t0);
    assert_eq!(announced(&broker), [] as [&str; 0]);
    assert_eq!(broker.stats().wills_published.load(Relaxed), 2);
}

/// The node that declares a peer down publishes the wills that peer announced, once; a later
/// call publishes nothing, and a node that only learns of the NodeDown forgets them.
#[test]
fn a_dead_peers_wills_are_published_once_by_the_node_that_declared_it() {
    let t0 = Instant::now();
    let broker = Broker::new(MqttConfig::default());
    let watcher = will_watcher(&broker, t0);
    broker.apply_peer_wills(
        2,
        table(
            20,
            &[
                (ByteStr::from("x"), will_of("x")),
                (ByteStr::from("y"), will_of("y")),
            ],
        ),
        t0,
    );
    let release_y = WillsAnnouncement {
        incarnation: 20,
        released: vec![ByteStr::from("y")],
        ..WillsAnnouncement::default()
    };
    broker.apply_peer_wills(2, release_y, t0);
    broker.apply_peer_wills(3, table(30, &[(ByteStr::from("z"), will_of("z"))]), t0);
    assert_eq!(broker.peer_will_count(2), 1);
    // Declared with the wills this node knew of: x (y was released).
    assert_eq!(broker.peer_will_ids(2), [ByteStr::from("x")]);
    assert_eq!(broker.publish_wills_of(2, &[ByteStr::from("x")], t0), 1);
    assert_eq!(broker.publish_wills_of(2, &[ByteStr::from("x")], t0), 0);
    let (queued, _) = watcher.queue_depth();
    assert_eq!(queued, 1, "the watcher got x's will only");
    // Another node declared 3 down: this one drops 3's wills without publishing them.
    broker.forget_peer(3);
    assert_eq!(broker.peer_will_count(3), 0);
    assert_eq!(broker.stats().wills_published.load(Relaxed), 1);
}

/// A watcher session subscribed to `wills/#` on `broker`.
fn will_watcher(broker: &Broker, t0: Instant) -> Arc<raftmq_core::session::Session> {
    let watcher = broker.attach(&ByteStr::from("watcher"), true, 0, None, t0);
    broker
        .subscribe(
            &watcher.session,
            watcher.epoch,
            &raftmq_core::auth::Principal {
                username: None,
                client_id: "watcher".to_owned(),
                acl: None,
                valid_until: None,
            },
            "wills/#",
            SubEntry {
                options: SubscriptionOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubscriptionOptions::default()
                },
                subscription_id: None,
            },
            t0,
        )
        .expect("subscribed");
    watcher.session
}

/// The full table of process `incarnation` of a peer.
fn table(incarnation: u64, wills: &[(ByteStr, WillRecord)]) -> WillsAnnouncement {
    WillsAnnouncement {
        incarnation,
        full: true,
        registered: wills.to_vec(),
        ..WillsAnnouncement::default()
    }
}

/// A peer that restarts before anyone declared it down: its new process's first table sets
/// the old one's wills aside (a reconnect of the same process does not), to be sent to the
/// new process. Until that process reports them settled, a declaration of the peer lists and
/// publishes them too (once); after, neither a declaration nor the next process gets them.
#[test]
fn a_restarted_peers_previous_wills_are_set_aside_for_it() {
    let t0 = Instant::now();
    let broker = Broker::new(MqttConfig::default());
    let x = (ByteStr::from("x"), will_of("x"));
    let y = (ByteStr::from("y"), will_of("y"));
    broker.apply_peer_wills(2, table(20, &[x.clone(), y.clone()]), t0);
    // The same process reconnecting its stream: nothing set aside.
    broker.apply_peer_wills(2, table(20, std::slice::from_ref(&x)), t0);
    assert!(broker.ended_wills_of(2, t0).is_none());
    let g = broker.ended_wills_generation();
    // A new process: its table replaces the old, whose unreleased will is set aside.
    broker.apply_peer_wills(2, table(21, &[]), t0);
    assert_eq!(broker.peer_will_count(2), 0);
    assert_ne!(broker.ended_wills_generation(), g);
    let (incarnation, wills) = broker.ended_wills_of(2, t0).expect("set aside");
    assert_eq!(incarnation, 20);
    assert_eq!(wills, vec![x.clone()]);
    assert_eq!(
        broker.peer_will_ids(2),
        std::slice::from_ref(&x.0),
        "not settled yet"
    );
    // Kept for a while only.
    assert!(broker.ended_wills_of(2, t0 + ENDED_WILLS_KEPT).is_none());

    // Process 22 registers y, settles its predecessors' wills, and ends: only y is left to
    // its successor, and a declaration lists only what that successor has not settled.
    broker.apply_peer_wills(2, table(21, std::slice::from_ref(&x)), t0);
    broker.apply_peer_wills(2, table(22, std::slice::from_ref(&y)), t0);
    let settled = WillsAnnouncement {
        incarnation: 22,
        ended_settled: true,
        ..WillsAnnouncement::default()
    };
    broker.apply_peer_wills(2, settled.clone(), t0);
    assert_eq!(
        broker.peer_will_ids(2),
        std::slice::from_ref(&y.0),
        "x was settled by 22"
    );
    broker.apply_peer_wills(2, table(23, &[]), t0);
    let (incarnation, wills) = broker.ended_wills_of(2, t0).expect("set aside");
    assert_eq!((incarnation, wills), (22, vec![y.clone()]));

    // Declared down after all: the declaring node publishes what it lists, once.
    let watcher = will_watcher(&broker, t0);
    assert_eq!(broker.peer_will_ids(2), std::slice::from_ref(&y.0));
    assert_eq!(
        broker.publish_wills_of(2, std::slice::from_ref(&y.0), t0),
        1,
        "y, of 22"
    );
    assert!(broker.ended_wills_of(2, t0).is_none());
    assert_eq!(
        broker.publish_wills_of(2, std::slice::from_ref(&y.0), t0),
        0
    );
    assert_eq!(watcher.queue_depth().0, 1);
    // A node that only learns of the declaration forgets them.
    broker.apply_peer_wills(3, table(30, std::slice::from_ref(&x)), t0);
    broker.apply_peer_wills(3, table(31, &[]), t0);
    broker.forget_peer(3);
    assert!(broker.ended_wills_of(3, t0).is_none());
    assert_eq!(broker.stats().wills_published.load(Relaxed), 1);
}

/// The restarted node publishes its previous process's wills, as its peers send them, each
/// once however many peers send it, and only once it knows that process was not declared
/// down; if it was, it publishes none.
#[test]
fn a_restarted_node_publishes_its_previous_processes_wills_once_unless_declared() {
    let t0 = Instant::now();
    let x = (ByteStr::from("x"), will_of("x"));
    let y = (ByteStr::from("y"), will_of("y"));
    let broker = Broker::new(MqttConfig::default());
    let watcher = will_watcher(&broker, t0);
    // From the first peer, before this node knows: held.
    assert_eq!(broker.predecessor_wills(vec![x.clone()], t0), 0);
    assert_eq!(watcher.queue_depth().0, 0);
    // Not declared: published now, and announced to the peers with the table.
    assert!(!broker.predecessor_settled());
    let g = broker.wills_generation();
    assert_eq!(broker.settle_predecessor_wills(WillsOutcome::Kept, t0), 1);
    assert!(broker.predecessor_settled());
    assert_ne!(broker.wills_generation(), g);
    assert_eq!(watcher.queue_depth().0, 1);
    // The second peer's copy: not again; a will it alone had: at once.
    assert_eq!(broker.predecessor_wills(vec![x.clone(), y.clone()], t0), 1);
    assert_eq!(broker.predecessor_wills(vec![y.clone()], t0), 0);
    assert_eq!(watcher.queue_depth().0, 2);

    let declared = Broker::new(MqttConfig::default());
    let watcher = will_watcher(&declared, t0);
    declared.predecessor_wills(vec![x.clone()], t0);
    // Declared down, with x listed: the declaring node published x; y it did not know of.
    let outcome = WillsOutcome::Declared([ByteStr::from("x")].into_iter().collect());
    assert_eq!(declared.settle_predecessor_wills(outcome, t0), 0);
    assert_eq!(
        watcher.queue_depth().0,
        0,
        "x published by the declaring node"
    );
    assert_eq!(declared.predecessor_wills(vec![x, y], t0), 1);
    assert_eq!(
        watcher.queue_depth().0,
        1,
        "y, which the declaration did not list"
    );
}

/// Durability whose commits complete when the test says so.
#[derive(Default)]
struct Manual {
    handles: parking_lot::Mutex<Vec<raftmq_core::durability::CommitHandle>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl raftmq_core::durability::Durability for Manual {
    fn propose(&self, _changes: Vec<raftmq_core::durability::StateChange>) -> Commit {
        let (commit, handle) = Commit::pending();
        self.handles.lock().push(handle);
        commit
    }
    fn next_message_id(&self) -> MessageId {
        MessageId(self.next_id.fetch_add(1, Relaxed) + 1)
    }
    fn recover(
        &self,
    ) -> Result<raftmq_core::durability::Recovered, raftmq_core::durability::DurabilityError> {
        Ok(Default::default())
    }
}

impl Manual {
    fn commit_all(&self) {
        for h in self.handles.lock().drain(..) {
            h.complete(Ok(()));
        }
    }
}

/// A broker over `durability` that mirrors a persistent subscription to `t/#` of `x`, a
/// session held by another node (which this node is about to adopt), and a QoS 1 message
/// `m` for `t/1`.
fn adopting_broker(durability: Arc<Manual>) -> (Broker, SessionImage, Arc<Message>) {
    let broker = Broker::new(MqttConfig::default()).with_durability(durability);
    let entry = SubEntry {
        options: SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..SubscriptionOptions::default()
        },
        subscription_id: None,
    };
    broker.replace_remote_subscriptions(vec![(ByteStr::from("x"), Arc::from("t/#"), entry)]);
    let image = SessionImage {
        client_id: ByteStr::from("x"),
        expiry_secs: 3600,
        subscriptions: vec![(Arc::from("t/#"), entry)],
        messages: Vec::new(),
        incoming_qos2: Vec::new(),
        qos2_reroute: Vec::new(),
        will: None,
    };
    let message = Arc::new(Message {
        topic: ByteStr::from("t/1"),
        payload: Bytes::from_static(b"m"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
        expires_at: None,
        received_at: Instant::now(),
        origin: Some(ByteStr::from("publisher")),
    });
    (broker, image, message)
}

fn queued(broker: &Broker, client_id: &str) -> usize {
    broker.session(client_id).expect("adopted").queue_depth().0
}

/// A message stored (through the mirrored subscription) for a session this node is adopting,
/// whose commit comes after the adoption read: it is queued for the adopted session once
/// committed, whichever of the commit and the restore comes first, and never twice.
#[test]
fn a_message_stored_while_a_session_is_being_adopted_reaches_it() {
    let t0 = Instant::now();
    // The restore before the commit.
    let durability = Arc::new(Manual::default());
    let (broker, image, message) = adopting_broker(durability.clone());
    broker.begin_adoption();
    let routed = broker.route(message.clone(), None, t0);
    assert_eq!(routed.offered, 1, "stored for the session held elsewhere");
    assert_eq!(broker.adopt_sessions(vec![image.clone()], t0), 1);
    assert_eq!(queued(&broker, "x"), 0, "not before its commit");
    durability.commit_all();
    assert_eq!(queued(&broker, "x"), 1, "queued once committed");

    // The commit before the restore (the read did not see it).
    let durability = Arc::new(Manual::default());
    let (broker, image, message) = adopting_broker(durability.clone());
    broker.begin_adoption();
    broker.route(message.clone(), None, t0);
    durability.commit_all();
    broker.adopt_sessions(vec![image.clone()], t0);
    assert_eq!(queued(&broker, "x"), 1);

    // The read saw it: not queued a second time.
    let durability = Arc::new(Manual::default());
    let (broker, mut image, message) = adopting_broker(durability.clone());
    broker.begin_adoption();
    broker.route(message.clone(), None, t0);
    durability.commit_all();
    image
        .messages
        .push(raftmq_core::durability::StoredDelivery {
            id: MessageId(1),
            message: message.clone(),
            target: raftmq_core::durability::StoredTarget {
                client_id: ByteStr::from("x"),
                qos: QoS::AtLeastOnce,
                retain: false,
                subscription_ids: Default::default(),
            },
            packet_id: None,
            released: false,
        });
    broker.adopt_sessions(vec![image], t0);
    assert_eq!(queued(&broker, "x"), 1, "the restored copy only");
}

/// A node cut off from the quorum closes its sessionless connections that have a will and
/// hands the wills over instead of publishing them: they stay announced (the peers keep their
/// copies) until the node knows whether it was declared down. Not declared (the quorum came
/// back first): it publishes them itself. Declared: the declaring node published those its
/// declaration lists, this node the others (a connection made while it was cut off, whose will
/// the declaring node never heard of, is closed by the declaration and its will published
/// here). Either way once.
#[test]
fn a_cut_off_node_hands_its_sessionless_wills_over_and_each_is_published_once() {
    let t0 = Instant::now();
    // (not declared, or declared with this list or none (an older version's: it published
    // every will it knew); wills published here)
    let cases: [(Option<Option<&[&str]>>, u64); 5] = [
        (None, 1),
        (Some(Some(&["a"])), 1),
        (Some(Some(&[])), 2),
        (Some(Some(&["a", "b"])), 0),
        (Some(None), 0),
    ];
    for (declared, expected) in cases {
        let broker = Broker::new(MqttConfig::default());
        broker.set_forwarder(Arc::new(NoPeers));
        let a = broker.attach(&ByteStr::from("a"), true, 0, Some(will_of("a")), t0);
        let _p = broker.attach(&ByteStr::from("p"), true, 3600, Some(will_of("p")), t0);
        let _n = broker.attach(&ByteStr::from("n"), true, 0, None, t0);
        assert_eq!(
            broker.hand_over_sessionless_wills(Some(raftmq_codec::ReasonCode::USE_ANOTHER_SERVER)),
            1,
            "only the sessionless connection with a will"
        );
        // Its connection ends (the kick): no will here yet, still announced.
        broker.detach(&a.session, a.epoch, DetachKind::Abnormal, t0);
        assert_eq!(broker.stats().wills_published.load(Relaxed), 0);
        assert_eq!(announced(&broker), ["a"]);
        assert_eq!(broker.handed_over_wills(), 1);
        // Another client connects meanwhile, with a will of its own.
        let _b = broker.attach(&ByteStr::from("b"), true, 0, Some(will_of("b")), t0);
        match declared {
            Some(listed) => {
                // This node (id 1) learns it was declared down, by a declaration listing
                // the wills the declaring node publishes.
                broker.apply_replicated(
                    9,
                    &[raftmq_core::durability::StateChange::NodeDown {
                        node: 1,
                        seen: 0,
                        wills: listed.map(|l| l.iter().map(|id| ByteStr::from(*id)).collect()),
                    }],
                    t0,
                );
            }
            None => {
                assert_eq!(broker.settle_handed_over_wills(&WillsOutcome::Kept, t0), 1);
            }
        }
        assert_eq!(
            broker.stats().wills_published.load(Relaxed),
            expected,
            "declared {declared:?}: published here {expected} times"
        );
        assert_eq!(broker.handed_over_wills(), 0);
        assert_eq!(
            broker.settle_handed_over_wills(&WillsOutcome::Kept, t0),
            0,
            "settled once"
        );
        if declared.is_some() {
            // Declared down, this node let go of b as well.
            assert_eq!(announced(&broker), [] as [&str; 0]);
        } else {
            assert_eq!(announced(&broker), ["b"], "a's will withdrawn, b's kept");
        }
    }
}

/// A forwarder that records, per forwarded message, the commit it must be delivered after.
#[derive(Default)]
struct OrderRecorder {
    calls: parking_lot::Mutex<Vec<(String, Option<Commit>)>>,
}

impl raftmq_core::Forwarder for OrderRecorder {
    fn forward(
        &self,
        _node: u64,
        message: &Arc<Message>,
        _plain: bool,
        _shared: Vec<Arc<str>>,
        _stored: Option<MessageId>,
        after: Option<&Commit>,
    ) -> Commit {
        let payload = String::from_utf8_lossy(&message.payload).into_owned();
        self.calls.lock().push((payload, after.cloned()));
        Commit::ready()
    }
}

impl Manual {
    /// Commits everything proposed so far at log index `index`.
    fn commit_all_at(&self, index: u64) {
        for h in self.handles.lock().drain(..) {
            h.complete_at(
                Ok(()),
                raftmq_core::durability::LogPositions::from_slice(&[(1, index)]),
            );
        }
    }
}

/// MQTT 4.6 across nodes: a publisher's message stored through the log for a session held
/// elsewhere is handed to the forwarder's next message of the same publisher as the commit to
/// wait for, so the peer delivers that one only after applying it (whether it was committed
/// when the next was routed, or still pending: then its log index is known once it commits).
#[test]
fn a_forwarded_message_names_the_publishers_previous_stored_commit() {
    let t0 = Instant::now();
    let durability = Arc::new(Manual::default());
    let (broker, _image, _) = adopting_broker(durability.clone());
    let forwarder = Arc::new(OrderRecorder::default());
    broker.set_forwarder(forwarder.clone());
    // Node 2 has a live subscriber of t/# too: every message is forwarded there.
    broker.apply_peer_routes(2, true, vec![Arc::from("t/#")], Vec::new());
    let publisher = broker.attach(&ByteStr::from("publisher"), true, 0, None, t0);
    let message = |n: u32| {
        Arc::new(Message {
            topic: ByteStr::from("t/1"),
            payload: Bytes::from(format!("m{n}")),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: Default::default(),
            expires_at: None,
            received_at: t0,
            origin: Some(ByteStr::from("publisher")),
        })
    };
    let route = |n: u32| {
        broker.route(
            message(n),
            Some(raftmq_core::broker::Publisher {
                session: &publisher.session,
                epoch: publisher.epoch,
                qos2_packet_id: None,
                reroute: None,
            }),
            t0,
        )
    };
    // m1 (stored for x, held elsewhere), the first stored through this node for this
    // connection: its previous message may have gone through another node, so peers deliver
    // it after its own commit (41), when they have everything before it from the log.
    route(1);
    durability.commit_all_at(41);
    // m2, after m1 committed at 41: delivered after index 41.
    route(2);
    // m3 while m2 is still pending: after m2's commit, whose index is known once it commits.
    route(3);
    durability.commit_all_at(42);
    // A broker's own publish (no publisher): nothing to wait for.
    broker.publish(message(4), t0);

    let calls = forwarder.calls.lock();
    let index = |c: &Commit| c.log_positions().map(|p| p[0].1);
    let after: Vec<(&str, Option<Option<u64>>)> = calls
        .iter()
        .map(|(p, c)| (p.as_str(), c.as_ref().map(index)))
        .collect();
    assert_eq!(
        after,
        [
            ("m1", Some(Some(41))),
            ("m2", Some(Some(41))),
            ("m3", Some(Some(42))),
            ("m4", None),
        ],
        "each forwarded message waits for its publisher's previous stored message"
    );
}

/// A durability layer whose session loads the test completes by hand.
#[derive(Default)]
struct HandLoaded {
    load: parking_lot::Mutex<Option<raftmq_core::durability::SessionLoadHandle>>,
}

impl raftmq_core::durability::Durability for HandLoaded {
    fn propose(&self, _changes: Vec<raftmq_core::durability::StateChange>) -> Commit {
        Commit::ready()
    }
    fn next_message_id(&self) -> MessageId {
        MessageId(1000)
    }
    fn recover(
        &self,
    ) -> Result<raftmq_core::durability::Recovered, raftmq_core::durability::DurabilityError> {
        Ok(Default::default())
    }
    fn load_session(
        &self,
        _client_id: &ByteStr,
        _claim: Commit,
    ) -> raftmq_core::durability::SessionLoad {
        let (load, handle) = raftmq_core::durability::SessionLoad::pending();
        *self.load.lock() = Some(handle);
        load
    }
}

impl HandLoaded {
    /// Completes the pending load with `image` read at log index `upto`, and restores it.
    fn load_with(
        &self,
        broker: &Broker,
        attached: &raftmq_core::Attached,
        image: SessionImage,
        upto: u64,
    ) {
        self.load
            .lock()
            .take()
            .expect("the load started")
            .complete(Ok(Some((image, upto))));
        assert!(broker.finish_attach(&attached.session, attached.epoch));
    }
}

/// A message on `topic` from `publisher` at `t0`.
fn published(t0: Instant, topic: &str, payload: &'static str, qos: QoS) -> Arc<Message> {
    Arc::new(Message {
        topic: ByteStr::from(topic.to_owned()),
        payload: Bytes::from_static(payload.as_bytes()),
        qos,
        retain: false,
        properties: Default::default(),
        expires_at: None,
        received_at: t0,
        origin: Some(ByteStr::from("publisher")),
    })
}

/// The QoS 2 duplicate of a lagging feed: a session resumed here is loaded from the state
/// machine at some log index, while the applied-change feed, which may lag behind, is still
/// queueing messages of older batches for it. A message at or below the load's index that the
/// image does not hold was acknowledged on the node the session came from: queued again, it
/// would reach the client a second time as a new message. Only what the image does not cover
/// stays.
#[test]
fn the_feed_does_not_queue_again_what_a_sessions_loaded_image_covers() {
    let t0 = Instant::now();
    let durability = Arc::new(HandLoaded::default());
    let broker = Broker::new(MqttConfig::default()).with_durability(durability.clone());
    broker.set_forwarder(Arc::new(NoPeers));
    let sub = ByteStr::from("sub");
    let attached = broker.attach(&sub, false, 3600, None, t0);
    assert!(
        attached.load_after_commit,
        "resumes a session stored elsewhere"
    );
    let stored =
        |id: u64, payload: &'static str| raftmq_core::durability::StateChange::MessageStored {
            id: MessageId(id),
            message: published(t0, "t/1", payload, QoS::ExactlyOnce),
            targets: vec![raftmq_core::durability::StoredTarget {
                client_id: sub.clone(),
                qos: QoS::ExactlyOnce,
                retain: false,
                subscription_ids: Default::default(),
            }],
        };
    // The feed, behind: message 5 (batch 10, delivered and acknowledged on the session's
    // previous node before the load's read at 15) and message 6 (batch 20, after the read).
    broker.apply_replicated(10, &[stored(5, "acknowledged elsewhere")], t0);
    broker.apply_replicated(20, &[stored(6, "after the read")], t0);
    let image = SessionImage {
        client_id: sub.clone(),
        expiry_secs: 3600,
        subscriptions: Vec::new(),
        messages: Vec::new(),
        incoming_qos2: Vec::new(),
        qos2_reroute: Vec::new(),
        will: None,
    };
    durability.load_with(&broker, &attached, image, 15);
    assert_eq!(
        attached.session.queue_depth().0,
        1,
        "only the message committed after the read is queued"
    );
    // Later batches at or below the read are not queued either; newer ones are.
    broker.apply_replicated(14, &[stored(7, "old")], t0);
    broker.apply_replicated(21, &[stored(8, "new")], t0);
    assert_eq!(attached.session.queue_depth().0, 2);
}

/// A QoS 1 message in a session's loaded image may also be forwarded live by its publisher's
/// node, and that copy may arrive after the load (it waits for this node's log to catch up):
/// it is not queued a second time.
#[test]
fn a_forwarded_copy_of_a_message_in_the_loaded_image_is_not_queued_again() {
    let t0 = Instant::now();
    let durability = Arc::new(HandLoaded::default());
    let broker = Broker::new(MqttConfig::default()).with_durability(durability.clone());
    broker.set_forwarder(Arc::new(NoPeers));
    let sub = ByteStr::from("sub");
    let attached = broker.attach(&sub, false, 3600, None, t0);
    let entry = SubEntry {
        options: SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..SubscriptionOptions::default()
        },
        subscription_id: None,
    };
    let message = published(t0, "t/1", "stored and forwarded", QoS::AtLeastOnce);
    let image = SessionImage {
        client_id: sub.clone(),
        expiry_secs: 3600,
        subscriptions: vec![(Arc::from("t/#"), entry)],
        messages: vec![raftmq_core::durability::StoredDelivery {
            id: MessageId(5),
            message: message.clone(),
            target: raftmq_core::durability::StoredTarget {
                client_id: sub.clone(),
                qos: QoS::AtLeastOnce,
                retain: false,
                subscription_ids: Default::default(),
            },
            packet_id: None,
            released: false,
        }],
        incoming_qos2: Vec::new(),
        qos2_reroute: Vec::new(),
        will: None,
    };
    durability.load_with(&broker, &attached, image, 15);
    assert_eq!(attached.session.queue_depth().0, 1, "the image's copy");
    broker.deliver_forwarded(message.clone(), true, &[], Some(MessageId(5)));
    assert_eq!(
        attached.session.queue_depth().0,
        1,
        "the forwarded copy of the same stored message is skipped"
    );
    // Another stored message forwarded live is queued.
    broker.deliver_forwarded(message, true, &[], Some(MessageId(6)));
    assert_eq!(attached.session.queue_depth().0, 2);
}

/// A durability layer that counts what is proposed.
#[derive(Default)]
struct Counting {
    proposed: std::sync::atomic::AtomicUsize,
}

impl raftmq_core::durability::Durability for Counting {
    fn propose(&self, changes: Vec<raftmq_core::durability::StateChange>) -> Commit {
        self.proposed.fetch_add(changes.len(), Relaxed);
        Commit::ready()
    }
    fn next_message_id(&self) -> MessageId {
        MessageId(1)
    }
    fn recover(
        &self,
    ) -> Result<raftmq_core::durability::Recovered, raftmq_core::durability::DurabilityError> {
        Ok(Default::default())
    }
}

/// A QoS 2 PUBLISH of a connection whose persistent session this node has just let go of (no
/// quorum): refused, and nothing proposed. Routed as the publish of a session that is not
/// persistent, it would be stored without its packet id and without the connection's fence,
/// so a copy committing after the client resent the message through another node would
/// deliver it twice.
#[test]
fn a_qos2_publish_of_a_connection_whose_session_was_fenced_is_refused() {
    let t0 = Instant::now();
    let durability = Arc::new(Counting::default());
    let broker = Broker::new(MqttConfig::default()).with_durability(durability.clone());
    let publisher = broker.attach(&ByteStr::from("pub"), true, 3600, None, t0);
    assert!(publisher.session.is_durable());
    let before = durability.proposed.load(Relaxed);
    broker.fence_durable_sessions(Some(raftmq_codec::ReasonCode::USE_ANOTHER_SERVER));
    let message = published(t0, "t/q2", "exactly once", QoS::ExactlyOnce);
    let routed = broker.route(
        message,
        Some(raftmq_core::broker::Publisher {
            session: &publisher.session,
            epoch: publisher.epoch,
            qos2_packet_id: Some(7),
            reroute: None,
        }),
        t0,
    );
    assert!(
        matches!(routed.store.result(), Some(Err(_))),
        "refused: the connection no longer holds its session"
    );
    assert_eq!(
        durability.proposed.load(Relaxed),
        before,
        "nothing proposed"
    );
}

/// A durability layer of several shards whose commits (at log positions the test names) and
/// session loads the test completes by hand: `a` is in shard 2, every other client id in
/// shard 1.
#[derive(Default)]
struct Sharded {
    handles: parking_lot::Mutex<Vec<(raftmq_core::durability::CommitHandle, Vec<StateChange>)>>,
    /// Its session loads.
    loads: HandLoaded,
    ids: std::sync::atomic::AtomicU64,
}

use raftmq_core::durability::{StateChange, StoredDelivery, StoredTarget};

impl raftmq_core::durability::Durability for Sharded {
    fn propose(&self, changes: Vec<StateChange>) -> Commit {
        let (commit, handle) = Commit::pending();
        self.handles.lock().push((handle, changes));
        commit
    }
    fn next_message_id(&self) -> MessageId {
        MessageId(500 + self.ids.fetch_add(1, Relaxed))
    }
    fn recover(
        &self,
    ) -> Result<raftmq_core::durability::Recovered, raftmq_core::durability::DurabilityError> {
        Ok(Default::default())
    }
    fn load_session(
        &self,
        client_id: &ByteStr,
        claim: Commit,
    ) -> raftmq_core::durability::SessionLoad {
        self.loads.load_session(client_id, claim)
    }
    fn shard_of(&self, client_id: &[u8]) -> u32 {
        if client_id == b"a" { 2 } else { 1 }
    }
    fn shards(&self) -> u32 {
        2
    }
}

impl Sharded {
    /// Commits every pending proposal that stored a message, at `positions`.
    fn commit_stores_at(&self, positions: &[(u32, u64)]) {
        let mut handles = self.handles.lock();
        let (stores, rest): (Vec<_>, Vec<_>) =
            std::mem::take(&mut *handles)
                .into_iter()
                .partition(|(_, changes)| {
                    changes
                        .iter()
                        .any(|c| matches!(c, StateChange::MessageStored { .. }))
                });
        *handles = rest;
        drop(handles);
        for (handle, _) in stores {
            handle.complete_at(
                Ok(()),
                raftmq_core::durability::LogPositions::from_slice(positions),
            );
        }
    }

    /// Commits every other pending proposal (claims).
    fn commit_rest(&self) {
        for (handle, _) in self.handles.lock().drain(..) {
            handle.complete(Ok(()));
        }
    }
}

/// Routes `message` as persistent publisher `publisher`'s QoS 2 PUBLISH `packet_id`.
fn route_qos2(
    broker: &Broker,
    publisher: &raftmq_core::Attached,
    message: Arc<Message>,
    packet_id: u16,
    t0: Instant,
) -> raftmq_core::broker::Routed {
    broker.route(
        message,
        Some(raftmq_core::broker::Publisher {
            session: &publisher.session,
            epoch: publisher.epoch,
            qos2_packet_id: Some(packet_id),
            reroute: None,
        }),
        t0,
    )
}

fn qos2_entry() -> SubEntry {
    SubEntry {
        options: SubscriptionOptions {
            qos: QoS::ExactlyOnce,
            ..SubscriptionOptions::default()
        },
        subscription_id: None,
    }
}

fn image_of(client_id: &str, messages: Vec<StoredDelivery>) -> SessionImage {
    SessionImage {
        client_id: ByteStr::from(client_id.to_owned()),
        expiry_secs: 3600,
        subscriptions: vec![(Arc::from("t/#"), qos2_entry())],
        messages,
        incoming_qos2: Vec::new(),
        qos2_reroute: Vec::new(),
        will: None,
    }
}

/// With shards, a message's commit completes when its store committed in every shard it
/// went to, which can be long after the part in one subscriber's shard applied. A session
/// held here when the message was routed waits for that commit; if it was loaded from the
/// log meanwhile, at or past its shard's store, the image has the message already (and it
/// may have been delivered and acknowledged since): the commit must not queue it again.
#[test]
fn a_delivery_waiting_for_a_commit_is_dropped_when_the_session_was_loaded_past_its_store() {
    let t0 = Instant::now();
    let durability = Arc::new(Sharded::default());
    let broker = Broker::new(MqttConfig::default()).with_durability(durability.clone());
    broker.set_forwarder(Arc::new(NoPeers));
    // `a` (shard 2), held elsewhere, resumes its stored session here; its load is pending
    // when the message is routed (so its delivery waits for the message's commit).
    broker.replace_remote_subscriptions(vec![(ByteStr::from("a"), Arc::from("t/#"), qos2_entry())]);
    let a = broker.attach(&ByteStr::from("a"), false, 3600, None, t0);
    assert!(a.load_after_commit);
    let publisher = broker.attach(&ByteStr::from("pub"), true, 3600, None, t0);
    durability.commit_rest();
    let message = published(t0, "t/1", "q2", QoS::ExactlyOnce);
    let routed = route_qos2(&broker, &publisher, message.clone(), 1, t0);
    assert_eq!(routed.offered, 1);
    // The load read shard 2 at 15, past the message's store there (12): the image has it.
    let stored = StoredDelivery {
        id: MessageId(500),
        message,
        target: StoredTarget {
            client_id: ByteStr::from("a"),
            qos: QoS::ExactlyOnce,
            retain: false,
            subscription_ids: Default::default(),
        },
        packet_id: None,
        released: false,
    };
    durability
        .loads
        .load_with(&broker, &a, image_of("a", vec![stored]), 15);
    assert_eq!(a.session.queue_depth().0, 1, "the image's copy");
    // The whole commit completes later (its part in shard 1 at 40).
    durability.commit_stores_at(&[(1, 40), (2, 12)]);
    assert_eq!(
        a.session.queue_depth().0,
        1,
        "not queued a second time by the commit"
    );
}

/// The other side of the same window: a message stored through this node for a session
/// held elsewhere when it was routed (so no delivery waits here for it), whose store applies
/// after that session was loaded here from an earlier point of its shard's log. A node's own
/// stores are not fed to its broker: the session gets it when the store applies here, once;
/// a store the image covers is not queued.
#[test]
fn a_message_stored_for_a_session_held_elsewhere_reaches_it_once_loaded_here_before_the_store() {
    let t0 = Instant::now();
    let durability = Arc::new(Sharded::default());
    let broker = Broker::new(MqttConfig::default()).with_durability(durability.clone());
    broker.set_forwarder(Arc::new(NoPeers));
    broker.replace_remote_subscriptions(vec![(ByteStr::from("a"), Arc::from("t/#"), qos2_entry())]);
    let publisher = broker.attach(&ByteStr::from("pub"), true, 3600, None, t0);
    durability.commit_rest();
    let first = route_qos2(
        &broker,
        &publisher,
        published(t0, "t/1", "m1", QoS::ExactlyOnce),
        1,
        t0,
    );
    let second = route_qos2(
        &broker,
        &publisher,
        published(t0, "t/1", "m2", QoS::ExactlyOnce),
        2,
        t0,
    );
    assert_eq!(
        (first.offered, second.offered),
        (1, 1),
        "stored for a, held elsewhere"
    );
    // `a` moves here and is loaded at 15 of shard 2, without either message.
    let a = broker.attach(&ByteStr::from("a"), false, 3600, None, t0);
    durability.commit_rest();
    durability
        .loads
        .load_with(&broker, &a, image_of("a", Vec::new()), 15);
    assert_eq!(a.session.queue_depth().0, 0);
    // The first message's store applies here at 20: after the load, so it is queued.
    broker.own_stored_applied([(MessageId(500), vec![ByteStr::from("a")], 20)]);
    assert_eq!(
        a.session.queue_depth().0,
        1,
        "queued when its store applied here"
    );
    broker.own_stored_applied([(MessageId(500), vec![ByteStr::from("a")], 20)]);
    assert_eq!(a.session.queue_depth().0, 1, "once");
    // The second message's store at 12, which the load at 15 covers, is not queued.
    broker.own_stored_applied([(MessageId(501), vec![ByteStr::from("a")], 12)]);
    assert_eq!(a.session.queue_depth().0, 1, "the image covers it");
}
