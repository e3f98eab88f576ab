//! One link of a bridge: a remote connection and the local session attached to it, from the
//! remote CONNACK until either side ends. The local side is a [`Connection`] driven here as the
//! server's connection task drives a client's (commits, deliveries, timeouts, backpressure),
//! with packets handed over as values instead of bytes.

use super::remote::{Remote, RemoteEvent, RemotePublish};
use super::{Bridge, LinkEnd, LinkState, unix_now};
use raftmq_codec::{
    ByteStr, Connect, ConnectProperties, Disconnect, DisconnectProperties, Packet, PacketId,
    ProtocolVersion, PubResponse, Publish, PublishProperties, QoS, ReasonCode, RetainHandling,
    Subscribe, SubscribeFilter, SubscribeProperties, SubscriptionOptions, Unsubscribe,
};
use raftmq_core::auth::Principal;
use raftmq_core::topic::TopicName;
use raftmq_core::{Broker, Connection};
use rumqttc::v5::mqttbytes::v5 as p5;
use std::collections::{HashMap, VecDeque};
use std::future::poll_fn;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Deliveries moved per pass (as for a client connection).
const PUMP_BATCH: usize = 256;
/// Keep alive asked for on the local side (the server may lower it: Server Keep Alive).
const LOCAL_KEEP_ALIVE: u16 = 60;
/// How long a stopping link waits for the remote DISCONNECT to go out.
const DISCONNECT_GRACE: Duration = Duration::from_secs(1);

/// A message forwarded to the remote broker, waiting for its acknowledgement there.
#[derive(Clone, Copy, Debug)]
struct Out {
    /// Its packet id in the local session.
    local: PacketId,
    qos: u8,
}

struct Link<'a> {
    bridge: &'a Bridge,
    broker: &'a Arc<Broker>,
    remote: Remote,
    conn: Connection,
    /// Publish requests given to the remote client and not yet on the wire, in order (`None`:
    /// QoS 0, nothing to acknowledge).
    unsent: VecDeque<Option<Out>>,
    /// Forwarded messages by their remote packet id.
    out: HashMap<u16, Out>,
    /// Messages from the remote broker published locally, by local packet id, until the local
    /// broker acknowledges them.
    inbound: HashMap<u16, RemotePublish>,
    /// Messages from the remote broker waiting to be published locally (before the local
    /// CONNACK, or while the local receive window is full).
    held: VecDeque<RemotePublish>,
    next_pid: u16,
    /// The local Receive Maximum (`mqtt.receive_maximum`).
    window: usize,
    local_ready: bool,
    /// Keep alive of the local side (from CONNACK), for pings.
    ping_every: Option<Duration>,
    /// When the next PINGREQ goes to the local session.
    ping_due: Option<tokio::time::Instant>,
    /// The remote broker's Maximum QoS (forwarded messages are downgraded to it) and Maximum
    /// Packet Size (larger messages are refused rather than sent and disconnected for).
    remote_max_qos: u8,
    remote_max_packet: usize,
}

/// Runs one link until it ends. See the module documentation.
pub(crate) async fn run(
    bridge: &Bridge,
    broker: &Arc<Broker>,
    placement: &mut watch::Receiver<bool>,
    stop: &mut watch::Receiver<bool>,
) -> LinkEnd {
    let cfg = &bridge.cfg;
    let failed = |error: String| LinkEnd::Failed {
        error,
        connected: false,
    };
    // 1. The remote broker.
    let (remote, mut events) = match Remote::connect(
        cfg,
        bridge.password.clone(),
        bridge.tls.clone(),
        broker.config().max_packet_size.0,
    ) {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let connected = tokio::select! {
        r = tokio::time::timeout(cfg.connect_timeout.0 + Duration::from_secs(1), events.recv()) => r,
        _ = stop.changed() => return LinkEnd::Stopped,
        _ = placement.changed() => return LinkEnd::Inactive,
    };
    let remote_limits;
    match connected {
        Ok(Some(RemoteEvent::Connected {
            session_present,
            max_qos,
            max_packet_size,
        })) => {
            remote_limits = (
                max_qos.unwrap_or(2).min(2),
                max_packet_size.map_or(usize::MAX, |m| m as usize),
            );
            bridge.count_connect(true);
            bridge.status.lock().remote_session_present = Some(session_present);
            info!(bridge = %cfg.name, address = %cfg.address, session_present, "bridge connected to the remote broker");
        }
        Ok(Some(RemoteEvent::Closed(e))) => {
            bridge.count_connect(false);
            return failed(format!("connecting to {}: {e}", cfg.address));
        }
        Ok(other) => {
            bridge.count_connect(false);
            return failed(format!(
                "connecting to {}: unexpected {other:?}",
                cfg.address
            ));
        }
        Err(_) => {
            bridge.count_connect(false);
            return failed(format!(
                "connecting to {}: no CONNACK within {:?}",
                cfg.address, cfg.connect_timeout.0
            ));
        }
    }
    let remote_filters: Vec<String> = cfg.subscribe.iter().map(|f| cfg.remote_filter(f)).collect();
    if let Err(e) = remote.subscribe(&remote_filters, cfg.qos) {
        return failed(format!("subscribing at the remote broker: {e}"));
    }
    // 2. The local session.
    let conn = local_connection(bridge, broker, Instant::now());
    let mut link = Link {
        bridge,
        broker,
        remote,
        conn,
        unsent: VecDeque::new(),
        out: HashMap::new(),
        inbound: HashMap::new(),
        held: VecDeque::new(),
        next_pid: 0,
        window: usize::from(broker.config().receive_maximum.max(1)),
        local_ready: false,
        ping_every: None,
        ping_due: None,
        remote_max_qos: remote_limits.0,
        remote_max_packet: remote_limits.1,
    };
    let end = link.drive(&mut events, placement, stop).await;
    // Either side ended: end the other (the local session stays, detached, and queues).
    if !link.conn.is_closed() {
        link.conn.handle_packet(
            Packet::Disconnect(Disconnect {
                reason_code: ReasonCode::SUCCESS,
                properties: DisconnectProperties::default(),
            }),
            Instant::now(),
        );
    }
    while link.conn.poll_transmit().is_some() {}
    link.remote.disconnect();
    link.remote.finish(DISCONNECT_GRACE).await;
    end
}

/// The bridge's local session: a [`Connection`] made inside the server, its CONNECT (MQTT 5,
/// persistent, no authentication: see [`Connection::trust`]) already handled.
fn local_connection(bridge: &Bridge, broker: &Arc<Broker>, now: Instant) -> Connection {
    let cfg = &bridge.cfg;
    let mut conn = Connection::new(broker.clone(), None, now);
    conn.trust(Principal {
        username: cfg.local_username.clone(),
        client_id: String::new(),
        acl: None,
        valid_until: None,
    });
    let expiry = u32::try_from(cfg.session_expiry.0.as_secs()).unwrap_or(u32::MAX);
    conn.handle_packet(
        Packet::Connect(Box::new(Connect {
            protocol: ProtocolVersion::V5,
            clean_start: false,
            keep_alive: LOCAL_KEEP_ALIVE,
            client_id: ByteStr::from(cfg.local_client_id()),
            will: None,
            username: None,
            password: None,
            properties: ConnectProperties {
                session_expiry_interval: Some(expiry),
                receive_maximum: Some(cfg.max_inflight),
                ..ConnectProperties::default()
            },
        })),
        now,
    );
    conn
}

/// Longest wait for the local session to be created by [`prime`].
const PRIME_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the bridge's local session, subscribed to the `forward` filters, and detaches it:
/// while the remote broker has never been reached, what the filters match is queued for the
/// bridge rather than dropped for lack of a subscriber.
pub(crate) async fn prime(bridge: &Bridge, broker: &Arc<Broker>) -> Result<(), String> {
    if bridge.cfg.forward.is_empty() {
        // Nothing to queue.
        return Ok(());
    }
    let deadline = tokio::time::Instant::now() + PRIME_TIMEOUT;
    let mut conn = local_connection(bridge, broker, Instant::now());
    let mut subscribed = false;
    loop {
        let now = Instant::now();
        while let Some(packet) = conn.poll_transmit() {
            match packet {
                Packet::ConnAck(c) if !c.reason_code.is_success() => {
                    return Err(format!(
                        "the local broker refused the bridge's session: {:?}",
                        c.reason_code
                    ));
                }
                Packet::ConnAck(_) => subscribe_locally(&mut conn, bridge, broker, now),
                Packet::SubAck(_) => subscribed = true,
                // Retained messages delivered at once stay in flight for the first link.
                _ => {}
            }
        }
        if subscribed || conn.is_closed() {
            break;
        }
        let Some(commit) = conn.pending_commit() else {
            return Err("the local session did not answer".into());
        };
        if tokio::time::timeout_at(deadline, commit).await.is_err() {
            return Err(format!(
                "the local session was not stored within {PRIME_TIMEOUT:?}"
            ));
        }
        conn.handle_commits(Instant::now());
    }
    if !conn.is_closed() {
        conn.handle_packet(
            Packet::Disconnect(Disconnect {
                reason_code: ReasonCode::SUCCESS,
                properties: DisconnectProperties::default(),
            }),
            Instant::now(),
        );
    }
    while conn.poll_transmit().is_some() {}
    if subscribed {
        Ok(())
    } else {
        Err("the local session ended before its subscriptions were made".into())
    }
}

impl Link<'_> {
    async fn drive(
        &mut self,
        events: &mut mpsc::Receiver<RemoteEvent>,
        placement: &mut watch::Receiver<bool>,
        stop: &mut watch::Receiver<bool>,
    ) -> LinkEnd {
        let mut timer = std::pin::pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
        let mut armed = false;
        let mut more = false;
        loop {
            tokio::task::consume_budget().await;
            if let Err(e) = self.transmit() {
                return self.fail(e);
            }
            if self.conn.is_closed() {
                let why = self
                    .conn
                    .close_reason()
                    .map_or_else(|| "closed".to_owned(), |r| format!("{r:?}"));
                return self.fail(format!("the local session ended: {why}"));
            }
            if self.local_ready
                && !self.conn.reading_paused()
                && let Err(e) = self.feed_held(Instant::now())
            {
                return self.fail(e);
            }
            if more {
                more = self.conn.pump(Instant::now(), PUMP_BATCH);
                continue;
            }
            if let Some(d) = self.conn.poll_timeout()
                && (!armed || d < timer.deadline().into_std())
            {
                timer.as_mut().reset(tokio::time::Instant::from_std(d));
                armed = true;
            }
            let pending_commit = self.conn.pending_commit();
            let paused = self.conn.reading_paused();
            let ping_due = self.ping_due;
            tokio::select! {
                r = stop.changed() => {
                    if r.is_err() || *stop.borrow() {
                        return LinkEnd::Stopped;
                    }
                }
                r = placement.changed() => {
                    if r.is_err() || !*placement.borrow() {
                        return LinkEnd::Inactive;
                    }
                }
                event = events.recv(), if !paused => {
                    let Some(event) = event else {
                        return self.fail("the remote connection's event loop ended".into());
                    };
                    if let Err(e) = self.on_remote(event, Instant::now()) {
                        return self.fail(e);
                    }
                    more = self.conn.pump(Instant::now(), PUMP_BATCH);
                }
                _ = poll_fn(|cx| self.conn.poll_session(cx)) => {
                    more = self.conn.pump(Instant::now(), PUMP_BATCH);
                }
                _ = poll_fn(|cx| self.conn.poll_room(cx)), if paused => self.conn.handle_room(),
                () = &mut timer, if armed => {
                    armed = false;
                    self.conn.handle_timeout(Instant::now());
                }
                () = sleep_until_some(ping_due), if ping_due.is_some() => {
                    self.conn.handle_packet(Packet::PingReq, Instant::now());
                    self.ping_due = self.ping_every.map(|e| tokio::time::Instant::now() + e);
                }
                _ = async move {
                    match pending_commit {
                        Some(c) => { let _ = c.await; }
                        None => std::future::pending().await,
                    }
                } => {
                    let now = Instant::now();
                    self.conn.handle_commits(now);
                    more = self.conn.pump(now, PUMP_BATCH);
                }
            }
        }
    }

    fn fail(&self, error: String) -> LinkEnd {
        debug!(bridge = %self.bridge.cfg.name, %error, "link ends");
        LinkEnd::Failed {
            error,
            connected: self.local_ready,
        }
    }

    /// Handles what the local session sent "to the bridge".
    fn transmit(&mut self) -> Result<(), String> {
        let now = Instant::now();
        while let Some(packet) = self.conn.poll_transmit() {
            match packet {
                Packet::ConnAck(c) => {
                    if c.reason_code != ReasonCode::SUCCESS {
                        return Err(format!(
                            "the local broker refused the bridge's session: {:?}",
                            c.reason_code
                        ));
                    }
                    let ka = c.properties.server_keep_alive.unwrap_or(LOCAL_KEEP_ALIVE);
                    self.ping_every = (ka > 0).then(|| Duration::from_secs(u64::from(ka)) / 2);
                    self.ping_due = self.ping_every.map(|e| tokio::time::Instant::now() + e);
                    self.local_ready = true;
                    subscribe_locally(&mut self.conn, self.bridge, self.broker, now);
                    self.bridge.set_state(LinkState::Connected);
                    let mut st = self.bridge.status.lock();
                    st.since = unix_now();
                    drop(st);
                    info!(bridge = %self.bridge.cfg.name, session_present = c.session_present, "bridge running");
                }
                Packet::SubAck(s) => {
                    for code in s.reason_codes.iter().filter(|c| !c.is_success()) {
                        let msg = format!("a local subscription was refused: {code:?}");
                        warn!(bridge = %self.bridge.cfg.name, "{msg}");
                        self.bridge.set_error(&msg);
                    }
                }
                Packet::Publish(p) => self.forward(p)?,
                Packet::PubRel(r) => {
                    // QoS 2 towards the remote broker: it has the message since its PUBREC.
                    self.conn
                        .handle_packet(Packet::PubComp(PubResponse::success(r.packet_id)), now);
                }
                Packet::PubAck(r) | Packet::PubComp(r) => {
                    if let Some(p) = self.inbound.remove(&r.packet_id.get()) {
                        if !r.reason_code.is_success() {
                            self.bridge.count_refused_in();
                            debug!(bridge = %self.bridge.cfg.name, code = ?r.reason_code, "message refused locally");
                        } else {
                            self.bridge.count_received();
                        }
                        self.remote.ack(&p)?;
                    }
                }
                Packet::PubRec(r) => {
                    // Messages are published locally with QoS 1 at most; answer anyway.
                    self.conn
                        .handle_packet(Packet::PubRel(PubResponse::success(r.packet_id)), now);
                }
                Packet::Disconnect(d) => {
                    debug!(bridge = %self.bridge.cfg.name, code = ?d.reason_code, "local DISCONNECT");
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A local message for the bridge: forwarded to the remote broker.
    fn forward(&mut self, p: Publish) -> Result<(), String> {
        let cfg = &self.bridge.cfg;
        let qos = p.qos.as_u8();
        let Some(topic) = cfg.to_remote(&p.topic) else {
            // Not under local_prefix (cannot happen with the filters subscribed): acknowledged
            // and dropped.
            if let Some(pid) = p.packet_id {
                self.ack_local(pid, qos);
            }
            return Ok(());
        };
        // Topic, payload and room for the header and properties.
        let size = topic.len() + p.payload.len() + 16 + properties_size(&p.properties);
        if topic.is_empty() || topic.contains(['+', '#', '\0']) || size > self.remote_max_packet {
            // Not a valid topic name at the remote broker, or larger than it accepts: never
            // accepted there, so acknowledged and counted rather than retried forever.
            self.bridge.count_refused_out();
            if let Some(pid) = p.packet_id {
                self.ack_local(pid, qos);
            }
            return Ok(());
        }
        let props = match cfg.mqtt_version {
            super::BridgeMqttVersion::V5 => to_remote_properties(&p.properties),
            super::BridgeMqttVersion::V311 => None,
        };
        let remote_qos = qos.min(self.remote_max_qos);
        match self
            .remote
            .publish(topic, remote_qos, p.retain, p.payload.clone(), props)
        {
            Ok(()) => {
                // Acknowledged locally at the local QoS, whatever QoS the remote hop used.
                match p.packet_id {
                    Some(local) if remote_qos == 0 => {
                        self.unsent.push_back(None);
                        self.bridge.count_forwarded();
                        self.ack_local(local, qos);
                    }
                    local => self.unsent.push_back(local.map(|local| Out { local, qos })),
                }
                if qos == 0 {
                    self.bridge.count_forwarded();
                }
                Ok(())
            }
            Err(e) => Err(format!("forwarding to the remote broker: {e}")),
        }
    }

    /// Tells the local session the bridge is done with the message `pid`.
    fn ack_local(&mut self, pid: PacketId, qos: u8) {
        let packet = if qos == 2 {
            Packet::PubRec(PubResponse::success(pid))
        } else {
            Packet::PubAck(PubResponse::success(pid))
        };
        self.conn.handle_packet(packet, Instant::now());
    }

    fn on_remote(&mut self, event: RemoteEvent, now: Instant) -> Result<(), String> {
        match event {
            RemoteEvent::Sent(pkid) => {
                if let Some(Some(out)) = self.unsent.pop_front()
                    && pkid != 0
                {
                    self.out.insert(pkid, out);
                }
            }
            RemoteEvent::PubAck { pkid, ok } | RemoteEvent::PubRec { pkid, ok } => {
                if let Some(out) = self.out.remove(&pkid) {
                    if ok {
                        self.bridge.count_forwarded();
                    } else {
                        self.bridge.count_refused_out();
                    }
                    self.ack_local(out.local, out.qos);
                }
            }
            RemoteEvent::Publish(p) => {
                self.held.push_back(p);
                if self.local_ready && !self.conn.reading_paused() {
                    self.feed_held(now)?;
                }
            }
            RemoteEvent::SubAck { refused } => {
                let cfg = &self.bridge.cfg;
                for i in refused {
                    let filter = cfg.subscribe.get(i).map_or("?", String::as_str);
                    let msg = format!(
                        "the remote broker refused the subscription to `{}`",
                        cfg.remote_filter(filter)
                    );
                    warn!(bridge = %cfg.name, "{msg}");
                    self.bridge.set_error(&msg);
                }
            }
            RemoteEvent::Connected { .. } => {}
            RemoteEvent::Closed(e) => return Err(format!("the remote connection ended: {e}")),
        }
        Ok(())
    }

    /// Publishes held remote messages locally while the local receive window has room.
    fn feed_held(&mut self, now: Instant) -> Result<(), String> {
        while let Some(p) = self.held.front() {
            let qos = p.qos().min(1).min(self.broker.config().max_qos);
            if qos > 0 && self.inbound.len() >= self.window {
                return Ok(());
            }
            let Some(p) = self.held.pop_front() else {
                break;
            };
            let Some(publish) = self.local_publish(&p, qos) else {
                // Not publishable here (bad topic, outside the prefix): acknowledged, counted.
                self.bridge.count_refused_in();
                self.remote.ack(&p)?;
                continue;
            };
            match publish.packet_id {
                Some(pid) => {
                    self.inbound.insert(pid.get(), p);
                }
                None => {
                    // QoS 0 locally: done once handed over (a QoS 1/2 remote message demoted
                    // to the broker's max_qos 0 is acknowledged now).
                    self.bridge.count_received();
                    self.remote.ack(&p)?;
                }
            }
            self.conn.handle_packet(Packet::Publish(publish), now);
            if self.conn.is_closed() || self.conn.reading_paused() {
                break;
            }
        }
        Ok(())
    }

    /// The local PUBLISH for a remote message, or `None` if it cannot be published here.
    fn local_publish(&mut self, p: &RemotePublish, qos: u8) -> Option<Publish> {
        let cfg = &self.bridge.cfg;
        let topic = cfg.to_local(p.topic()?)?;
        TopicName::new(&topic, self.broker.topic_limits()).ok()?;
        let packet_id = if qos > 0 {
            Some(self.allocate_pid()?)
        } else {
            None
        };
        Some(Publish {
            dup: false,
            qos: QoS::from_u8(qos).unwrap_or(QoS::AtMostOnce),
            retain: p.retain() && self.broker.config().retain_available,
            topic: ByteStr::from(topic),
            packet_id,
            properties: p
                .properties()
                .map(|props| to_local_properties(props, self.broker))
                .unwrap_or_default(),
            payload: p.payload().clone(),
        })
    }

    fn allocate_pid(&mut self) -> Option<PacketId> {
        for _ in 0..u16::MAX {
            self.next_pid = self.next_pid.checked_add(1).unwrap_or(1);
            if !self.inbound.contains_key(&self.next_pid) {
                return PacketId::new(self.next_pid);
            }
        }
        None
    }
}

/// Subscribes the local session to the `forward` filters (again on every attach: a filter
/// added to the configuration is picked up) and drops the filters no longer configured.
fn subscribe_locally(conn: &mut Connection, bridge: &Bridge, broker: &Broker, now: Instant) {
    let cfg = &bridge.cfg;
    let wanted: Vec<String> = cfg.forward.iter().map(|f| cfg.local_filter(f)).collect();
    let stale: Vec<ByteStr> = broker
        .inspect_client(&cfg.local_client_id())
        .map(|(_, subs)| {
            subs.into_iter()
                .filter(|s| !wanted.contains(&s.filter))
                .map(|s| ByteStr::from(s.filter))
                .collect()
        })
        .unwrap_or_default();
    if !stale.is_empty() {
        info!(bridge = %cfg.name, filters = ?stale, "dropping local subscriptions no longer configured");
        conn.handle_packet(
            Packet::Unsubscribe(Unsubscribe {
                packet_id: PacketId::MIN,
                properties: Vec::new(),
                filters: stale,
            }),
            now,
        );
    }
    if wanted.is_empty() {
        return;
    }
    let qos = QoS::from_u8(cfg.qos).unwrap_or(QoS::AtLeastOnce);
    conn.handle_packet(
        Packet::Subscribe(Subscribe {
            packet_id: PacketId::MIN.saturating_add(1),
            properties: SubscribeProperties::default(),
            filters: wanted
                .into_iter()
                .map(|f| SubscribeFilter {
                    filter: ByteStr::from(f),
                    options: SubscriptionOptions {
                        qos,
                        no_local: true,
                        retain_as_published: true,
                        retain_handling: RetainHandling::SendIfNew,
                    },
                })
                .collect(),
        }),
        now,
    );
}

/// Bytes the properties take on the wire, roughly (an upper bound for the common ones).
fn properties_size(p: &PublishProperties) -> usize {
    let text = |s: &Option<ByteStr>| s.as_ref().map_or(0, |s| s.len() + 3);
    8 + text(&p.response_topic)
        + text(&p.content_type)
        + p.correlation_data.as_ref().map_or(0, |d| d.len() + 3)
        + p.user_properties
            .iter()
            .map(|(k, v)| k.len() + v.len() + 5)
            .sum::<usize>()
}

/// MQTT 5 properties of a local message as sent to the remote broker (without topic alias and
/// subscription identifiers, which belong to one connection).
fn to_remote_properties(props: &PublishProperties) -> Option<p5::PublishProperties> {
    let out = p5::PublishProperties {
        payload_format_indicator: props.payload_format_indicator.map(u8::from),
        message_expiry_interval: props.message_expiry_interval,
        topic_alias: None,
        response_topic: props.response_topic.as_ref().map(|t| t.to_string()),
        correlation_data: props.correlation_data.clone(),
        user_properties: props
            .user_properties
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        subscription_identifiers: Vec::new(),
        content_type: props.content_type.as_ref().map(|t| t.to_string()),
    };
    (out != p5::PublishProperties::default()).then_some(out)
}

/// MQTT 5 properties of a remote message as published locally (what a client may send: no
/// topic alias, no subscription identifiers; a response topic that is not a valid topic name
/// is left out).
fn to_local_properties(props: &p5::PublishProperties, broker: &Broker) -> PublishProperties {
    PublishProperties {
        payload_format_indicator: props.payload_format_indicator.map(|v| v == 1),
        message_expiry_interval: props.message_expiry_interval,
        topic_alias: None,
        response_topic: props
            .response_topic
            .as_deref()
            .filter(|t| TopicName::new(t, broker.topic_limits()).is_ok())
            .map(ByteStr::from),
        correlation_data: props.correlation_data.clone(),
        user_properties: props
            .user_properties
            .iter()
            .map(|(k, v)| (ByteStr::from(k.as_str()), ByteStr::from(v.as_str())))
            .collect(),
        subscription_identifiers: Vec::new(),
        content_type: props.content_type.as_deref().map(ByteStr::from),
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
