//! `failover`: how long after a cluster node is killed clients are reconnected and messages flow
//! again, and whether any acknowledged message went missing on the way.
//!
//! Timeline:
//!
//! 1. A subscriber with a persistent session (clean start 0, Session Expiry Interval; clean
//!    session 0 on 3.1.1) connects to `addrs[sub_node]` and subscribes to a topic of this run
//!    at QoS 1 or 2. Unless `--no-wills`, a will watcher with a persistent session subscribes
//!    at QoS 1 to the run's will topics on a surviving node, and clients with a will connect to
//!    `addrs[killed_node]` (see [`crate::wills`]); they only ping and never reconnect. A
//!    publisher with a persistent session connects to `addrs[pub_node]`.
//! 2. The publisher publishes at `--rate`, every payload stamped with its sequence number and
//!    send time; at most `--inflight` unacknowledged.
//! 3. After `--before`, `kill -9 --kill-pid`. The kill's instant is the origin of every time
//!    reported.
//! 4. A client that loses its connection reconnects at once: first to the server named by a
//!    Server Reference (MQTT 5 CONNACK or DISCONNECT 0x9C/0x9D), then to the other nodes
//!    round-robin with the killed node last, `--retry-delay` between attempts. With Session
//!    Present, the publisher resends its unacknowledged PUBLISHes (DUP) and PUBRELs in their
//!    original order; a subscriber that finds no session subscribes again.
//! 5. Once every milestone of [`crate::recovery`] has happened and every will has arrived, the
//!    publisher goes on for `--settle`, or the run gives up `--after` the kill. Then publishing stops, and the run
//!    waits up to `--drain` for outstanding acknowledgements and for every acknowledged
//!    message to arrive.
//! 6. The clients disconnect and remove their sessions (the will clients' persistent sessions,
//!    adopted by a surviving node, through a clean-session connection once the watcher is gone);
//!    the summary reports the times and the accounting, and the run fails if it did not
//!    recover, an acknowledged message is missing, or a will did not arrive exactly once.

use crate::cli::{CommonArgs, FailoverArgs};
use crate::client::{Conn, Counters, Endpoint, Handshake, SessionOptions};
use crate::context::{ConnectLog, Context, qos};
use crate::payload::{STAMP_LEN, Stamp, timestamp};
use crate::recovery::{RecoveryLog, Role};
use crate::summary::{Errors, FailoverStats, MessageStats, Percentiles, Summary};
use crate::wills::{self, WillLog, WillSpec};
use anyhow::{Context as _, Result, anyhow, bail, ensure};
use bytes::Bytes;
use raftmq_codec::{
    ByteStr, Disconnect, DisconnectProperties, Packet, PacketId, ProtocolVersion, PubResponse,
    Publish, PublishProperties, QoS, ReasonCode, Will, WillProperties,
};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// Across nodes, a new subscription reaches the publisher's node asynchronously: wait this long
/// before publishing (as the message scenarios do).
const ROUTE_SETTLE: Duration = Duration::from_millis(500);
/// Bound on writing to a broker: a connection that cannot take our bytes for this long is
/// considered lost.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How far behind its schedule the publisher may fall and still catch up; beyond that (window
/// full, or disconnected) it resumes at the rate instead of sending a burst.
const MAX_CATCH_UP: Duration = Duration::from_millis(100);
/// Bound on resolving a Server Reference.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on sending the kill.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// Connection events kept in the summary's timeline.
const TIMELINE_LINES: usize = 40;
/// `killed` before the kill.
const NOT_KILLED: usize = usize::MAX;

/// What the clients do, set by the coordinator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Run,
    /// No new messages; the publisher ends once everything in flight is acknowledged.
    StopPublishing,
    /// End now: disconnect and remove the sessions.
    Shutdown,
}

/// What a client reports, with the instant it happened.
#[derive(Debug)]
enum Event {
    /// A connection attempt after the first connection.
    Attempt {
        role: Role,
        at: Instant,
        target: String,
        took: Duration,
        error: Option<String>,
        redirected: bool,
    },
    Connected {
        role: Role,
        at: Instant,
        node: Option<usize>,
        session_present: bool,
    },
    Lost {
        role: Role,
        at: Instant,
        reason: String,
    },
    /// PUBACK (QoS 1) or PUBREC (QoS 2) of message `seq`.
    Acked {
        at: Instant,
        seq: u64,
        sent_ns: u64,
        code: ReasonCode,
    },
    Received {
        at: Instant,
        seq: u64,
        sent_ns: u64,
    },
    /// A message without this run's stamp.
    Foreign,
    /// The subscriber (or the will watcher) subscribed again (its session was gone).
    Resubscribed {
        role: Role,
        at: Instant,
    },
    /// The will watcher received will `index` (of the run's [`WillSpec`]s).
    Will {
        at: Instant,
        index: usize,
        dup: bool,
    },
    /// The connection of will client `index` ended.
    WillClientLost {
        at: Instant,
        index: usize,
        reason: String,
    },
    /// A QoS 2 PUBLISH reused packet id `id`, still awaiting PUBREL for message `pending`, for
    /// another message `seq`: taken for a resend (as MQTT requires of the receiver), so lost.
    IdReused {
        at: Instant,
        id: u16,
        pending: Option<u64>,
        seq: Option<u64>,
    },
}

/// The order in which to try the nodes after losing the connection to node `current`: the
/// others round-robin from `current + 1`, then `current`, with the killed node (if known) moved
/// to the end.
pub fn candidates(nodes: usize, current: usize, killed: Option<usize>) -> Vec<usize> {
    let mut order: Vec<usize> = (1..=nodes).map(|k| (current + k) % nodes).collect();
    if let Some(killed) = killed
        && let Some(at) = order.iter().position(|&i| i == killed)
    {
        let k = order.remove(at);
        order.push(k);
    }
    order
}

/// The first address of a Server Reference ("host:port", several separated by spaces).
async fn resolve_reference(reference: &str) -> Option<SocketAddr> {
    let first = reference.split_whitespace().next()?;
    if let Ok(addr) = first.parse() {
        return Some(addr);
    }
    tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host(first))
        .await
        .ok()?
        .ok()?
        .next()
}

/// A connection that was accepted.
struct Established {
    conn: Conn,
    session_present: bool,
    receive_maximum: Option<u16>,
}

/// One client's way to the cluster: where to connect, its session, and what to report.
struct Link {
    role: Role,
    addrs: Vec<SocketAddr>,
    /// The node of the current connection, or of the last attempt.
    current: usize,
    endpoint: Endpoint,
    session: SessionOptions,
    retry_delay: Duration,
    /// The killed node's index once killed, else [`NOT_KILLED`].
    killed: Arc<AtomicUsize>,
    /// A Server Reference from the last CONNACK or DISCONNECT: tried first.
    redirect: Option<String>,
    events: mpsc::UnboundedSender<Event>,
    phase: watch::Receiver<Phase>,
    /// No reconnection attempt starts after this (a backstop: the coordinator ends the run
    /// with [`Phase::Shutdown`] before).
    give_up_at: Instant,
}

impl Link {
    fn report(&self, event: Event) {
        // The coordinator stops listening only once the run is over.
        let _ = self.events.send(event);
    }

    fn killed(&self) -> Option<usize> {
        Some(self.killed.load(Relaxed)).filter(|&k| k != NOT_KILLED)
    }

    fn ending(&self) -> bool {
        *self.phase.borrow() == Phase::Shutdown || Instant::now() >= self.give_up_at
    }

    fn describe(&self, addr: SocketAddr, node: Option<usize>) -> String {
        match node {
            Some(i) => format!("node {i} ({addr})"),
            None => addr.to_string(),
        }
    }

    /// One handshake with `addr`: the connection if accepted. A refusal's Server Reference is
    /// kept for the next attempt.
    async fn attempt(&mut self, addr: SocketAddr, node: Option<usize>) -> Result<Established> {
        // The next round-robin pass starts after the node tried last.
        if let Some(node) = node {
            self.current = node;
        }
        let endpoint = Endpoint {
            addr,
            ..self.endpoint.clone()
        };
        match Conn::handshake(&endpoint, &self.session).await? {
            Handshake::Accepted {
                conn,
                session_present,
                receive_maximum,
            } => {
                self.report(Event::Connected {
                    role: self.role,
                    at: Instant::now(),
                    node,
                    session_present,
                });
                Ok(Established {
                    conn,
                    session_present,
                    receive_maximum,
                })
            }
            Handshake::Refused {
                code,
                server_reference,
            } => {
                let to = server_reference
                    .as_deref()
                    .map(|r| format!(", use {r}"))
                    .unwrap_or_default();
                self.redirect = server_reference;
                bail!("connection refused: {code}{to}")
            }
        }
    }

    /// The first connection, to the client's own node.
    async fn connect_first(&mut self) -> Result<Established> {
        let addr = self.addrs[self.current];
        let node = Some(self.current);
        self.attempt(addr, node)
            .await
            .with_context(|| format!("{} connecting to {addr}", self.role))
    }

    /// Connects again after losing the connection, until connected, or `None` once the run
    /// ends. Each attempt is bounded by the connect timeout.
    async fn reconnect(&mut self) -> Option<Established> {
        while !self.ending() {
            let killed = self.killed();
            let mut plan: Vec<(SocketAddr, Option<usize>, bool)> = Vec::new();
            if let Some(reference) = self.redirect.take()
                && let Some(addr) = resolve_reference(&reference).await
            {
                let node = self.addrs.iter().position(|a| *a == addr);
                if node.is_none() || node != killed {
                    plan.push((addr, node, true));
                }
            }
            plan.extend(
                candidates(self.addrs.len(), self.current, killed)
                    .into_iter()
                    .map(|i| (self.addrs[i], Some(i), false)),
            );
            for (addr, node, redirected) in plan {
                if self.ending() {
                    return None;
                }
                let started = Instant::now();
                let result = self.attempt(addr, node).await;
                self.report(Event::Attempt {
                    role: self.role,
                    at: Instant::now(),
                    target: self.describe(addr, node),
                    took: started.elapsed(),
                    error: result.as_ref().err().map(|e| format!("{e:#}")),
                    redirected,
                });
                if let Ok(established) = result {
                    return Some(established);
                }
                if !self.pause(self.retry_delay).await {
                    return None;
                }
                if self.redirect.is_some() {
                    // The refusal named a server: try it next.
                    break;
                }
            }
        }
        None
    }

    /// Sleeps `delay`; false if the run ends meanwhile.
    async fn pause(&mut self, delay: Duration) -> bool {
        let until = tokio::time::sleep(delay);
        tokio::pin!(until);
        loop {
            tokio::select! {
                () = &mut until => return !self.ending(),
                changed = self.phase.changed() => {
                    if changed.is_err() || self.ending() {
                        return false;
                    }
                }
            }
        }
    }

    fn lost(&self, error: &anyhow::Error) {
        self.report(Event::Lost {
            role: self.role,
            at: Instant::now(),
            reason: format!("{error:#}"),
        });
    }

    /// Disconnects and removes the session: DISCONNECT with Session Expiry Interval 0 on
    /// MQTT 5; on 3.1.1 a clean-session connection replaces it.
    async fn end(&self, conn: Conn) -> Result<()> {
        if self.endpoint.version == ProtocolVersion::V5 {
            return conn
                .close_with(Disconnect {
                    reason_code: ReasonCode::NORMAL_DISCONNECTION,
                    properties: DisconnectProperties {
                        session_expiry_interval: Some(0),
                        ..DisconnectProperties::default()
                    },
                })
                .await;
        }
        conn.close().await?;
        let endpoint = Endpoint {
            addr: self.addrs[self.current],
            ..self.endpoint.clone()
        };
        let clean = SessionOptions::clean(self.session.client_id.clone());
        Conn::connect(&endpoint, &clean).await?.0.close().await
    }

    /// A sleep until the next PINGREQ is due (half the keep alive), or a day.
    fn ping_every(&self) -> Duration {
        match self.endpoint.keep_alive {
            0 => Duration::from_secs(86_400),
            k => Duration::from_secs(u64::from(k)) / 2,
        }
    }
}

/// Writes what `conn` has queued, within [`WRITE_TIMEOUT`].
async fn flush(conn: &mut Conn) -> Result<()> {
    tokio::time::timeout(WRITE_TIMEOUT, conn.flush())
        .await
        .map_err(|_| anyhow!("the broker took no data for {WRITE_TIMEOUT:?}"))?
}

/// The broker's DISCONNECT: keeps its Server Reference, and ends the connection.
fn disconnected(link: &mut Link, disconnect: Disconnect) -> anyhow::Error {
    let reference = disconnect
        .properties
        .server_reference
        .map(|r| r.to_string());
    let to = reference
        .as_deref()
        .map(|r| format!(", use {r}"))
        .unwrap_or_default();
    link.redirect = reference;
    anyhow!("the broker disconnected: {}{to}", disconnect.reason_code)
}

/// The subscriber: acknowledges and reports what it receives.
struct Subscriber {
    link: Link,
    run: u32,
    filter: String,
    qos: QoS,
    /// Packet ids of QoS 2 messages received and not yet released (PUBREL), with the message's
    /// sequence number: a PUBLISH with one of these ids is a resend of the same delivery (§4.3.3
    /// method B), not delivered again. Kept across reconnections with Session Present.
    incoming_qos2: HashMap<u16, Option<u64>>,
    timeout: Duration,
}

impl Subscriber {
    async fn run(mut self, mut established: Established) -> Result<()> {
        loop {
            let mut conn = established.conn;
            match self.drive(&mut conn).await {
                Ok(()) => return self.link.end(conn).await,
                Err(e) => self.link.lost(&e),
            }
            established = loop {
                let Some(mut next) = self.link.reconnect().await else {
                    return Ok(());
                };
                if next.session_present {
                    break next;
                }
                // The session is gone: subscribe again (whatever it held is lost).
                self.incoming_qos2.clear();
                match next
                    .conn
                    .subscribe(&self.filter, self.qos, self.timeout)
                    .await
                {
                    Ok(()) => {
                        self.link.report(Event::Resubscribed {
                            role: self.link.role,
                            at: Instant::now(),
                        });
                        break next;
                    }
                    Err(e) => self.link.lost(&e),
                }
            };
        }
    }

    /// Runs the connection until it fails or the run ends.
    async fn drive(&mut self, conn: &mut Conn) -> Result<()> {
        let every = self.link.ping_every();
        let ping = tokio::time::sleep(every);
        tokio::pin!(ping);
        loop {
            if *self.link.phase.borrow() == Phase::Shutdown {
                return Ok(());
            }
            flush(conn).await?;
            tokio::select! {
                packet = conn.recv() => self.on_packet(conn, packet?)?,
                () = &mut ping => {
                    conn.queue(&Packet::PingReq)?;
                    ping.as_mut().reset((Instant::now() + every).into());
                }
                changed = self.link.phase.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn on_packet(&mut self, conn: &mut Conn, packet: Packet) -> Result<()> {
        match packet {
            Packet::Publish(publish) => {
                let at = Instant::now();
                let stamp = Stamp::parse(&publish.payload, self.run);
                if let Some(id) = publish.packet_id {
                    match publish.qos {
                        QoS::AtLeastOnce => {
                            conn.queue(&Packet::PubAck(PubResponse::success(id)))?
                        }
                        QoS::ExactlyOnce => {
                            conn.queue(&Packet::PubRec(PubResponse::success(id)))?;
                            let seq = stamp.map(|s| s.seq);
                            if let Some(&pending) = self.incoming_qos2.get(&id.get()) {
                                // A resend: the same delivery. A different message under an id
                                // still awaiting PUBREL is a broker error; a client following
                                // the spec takes it for a resend too, so it is lost: reported.
                                if pending != seq {
                                    self.link.report(Event::IdReused {
                                        at,
                                        id: id.get(),
                                        pending,
                                        seq,
                                    });
                                }
                                return Ok(());
                            }
                            self.incoming_qos2.insert(id.get(), seq);
                        }
                        QoS::AtMostOnce => {}
                    }
                }
                match stamp {
                    Some(stamp) => self.link.report(Event::Received {
                        at,
                        seq: stamp.seq,
                        sent_ns: stamp.sent_ns,
                    }),
                    None => self.link.report(Event::Foreign),
                }
            }
            Packet::PubRel(r) => {
                self.incoming_qos2.remove(&r.packet_id.get());
                conn.queue(&Packet::PubComp(PubResponse::success(r.packet_id)))?;
            }
            Packet::PingResp | Packet::SubAck(_) => {}
            Packet::Disconnect(d) => return Err(disconnected(&mut self.link, d)),
            other => bail!("unexpected {:?} from the broker", other.packet_type()),
        }
        Ok(())
    }
}

/// The will watcher: a persistent session on a surviving node subscribed at QoS 1 to the wills'
/// topics; reports each will it receives. It reconnects like the subscriber.
struct Watcher {
    link: Link,
    /// The wills' topics are `prefix` + a [`WillSpec`] name; the payload is `payloads[index]`.
    prefix: String,
    names: Vec<&'static str>,
    payloads: Vec<Bytes>,
    timeout: Duration,
}

impl Watcher {
    fn filter(&self) -> String {
        format!("{}#", self.prefix)
    }

    async fn run(mut self, mut established: Established) -> Result<()> {
        loop {
            let mut conn = established.conn;
            match self.drive(&mut conn).await {
                Ok(()) => return self.link.end(conn).await,
                Err(e) => self.link.lost(&e),
            }
            established = loop {
                let Some(mut next) = self.link.reconnect().await else {
                    return Ok(());
                };
                if next.session_present {
                    break next;
                }
                // The session is gone, with any will queued in it: subscribe again.
                match next
                    .conn
                    .subscribe(&self.filter(), QoS::AtLeastOnce, self.timeout)
                    .await
                {
                    Ok(()) => {
                        self.link.report(Event::Resubscribed {
                            role: self.link.role,
                            at: Instant::now(),
                        });
                        break next;
                    }
                    Err(e) => self.link.lost(&e),
                }
            };
        }
    }

    /// Runs the connection until it fails or the run ends.
    async fn drive(&mut self, conn: &mut Conn) -> Result<()> {
        let every = self.link.ping_every();
        let ping = tokio::time::sleep(every);
        tokio::pin!(ping);
        loop {
            if *self.link.phase.borrow() == Phase::Shutdown {
                return Ok(());
            }
            flush(conn).await?;
            tokio::select! {
                packet = conn.recv() => self.on_packet(conn, packet?)?,
                () = &mut ping => {
                    conn.queue(&Packet::PingReq)?;
                    ping.as_mut().reset((Instant::now() + every).into());
                }
                changed = self.link.phase.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn on_packet(&mut self, conn: &mut Conn, packet: Packet) -> Result<()> {
        match packet {
            Packet::Publish(publish) => {
                let at = Instant::now();
                if let Some(id) = publish.packet_id {
                    conn.queue(&Packet::PubAck(PubResponse::success(id)))?;
                }
                // Only this run's wills count (by topic and payload).
                let index = publish
                    .topic
                    .as_str()
                    .strip_prefix(self.prefix.as_str())
                    .and_then(|name| self.names.iter().position(|n| *n == name))
                    .filter(|&i| self.payloads[i] == publish.payload);
                if let Some(index) = index {
                    self.link.report(Event::Will {
                        at,
                        index,
                        dup: publish.dup,
                    });
                }
            }
            Packet::PingResp | Packet::SubAck(_) => {}
            Packet::Disconnect(d) => return Err(disconnected(&mut self.link, d)),
            other => bail!("unexpected {:?} from the broker", other.packet_type()),
        }
        Ok(())
    }
}

/// A client with a will, connected to the node that is killed. It keeps its connection alive
/// (pings) and never reconnects: a new connection would cancel a will that waits for its
/// delay. It reports when its connection ends.
struct WillClient {
    index: usize,
    conn: Conn,
    version: ProtocolVersion,
    ping_every: Duration,
    events: mpsc::UnboundedSender<Event>,
    phase: watch::Receiver<Phase>,
}

impl WillClient {
    async fn run(mut self) -> Result<()> {
        let ping = tokio::time::sleep(self.ping_every);
        tokio::pin!(ping);
        let error = loop {
            if *self.phase.borrow() == Phase::Shutdown {
                // Still connected (its node lives): leave without the will, ending the session
                // on MQTT 5 (on 3.1.1 a clean-session connection removes it afterwards).
                let mut disconnect = Disconnect::default();
                if self.version == ProtocolVersion::V5 {
                    disconnect.properties.session_expiry_interval = Some(0);
                }
                return self.conn.close_with(disconnect).await;
            }
            if let Err(e) = flush(&mut self.conn).await {
                break e;
            }
            tokio::select! {
                packet = self.conn.recv() => match packet {
                    Ok(Packet::PingResp) => {}
                    Ok(Packet::Disconnect(d)) => {
                        break anyhow!("the broker disconnected: {}", d.reason_code);
                    }
                    Ok(other) => break anyhow!("unexpected {:?} from the broker", other.packet_type()),
                    Err(e) => break e,
                },
                () = &mut ping => {
                    if let Err(e) = self.conn.queue(&Packet::PingReq) {
                        break e;
                    }
                    ping.as_mut().reset((Instant::now() + self.ping_every).into());
                }
                changed = self.phase.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
            }
        };
        // The coordinator stops listening only once the run is over.
        let _ = self.events.send(Event::WillClientLost {
            at: Instant::now(),
            index: self.index,
            reason: format!("{error:#}"),
        });
        Ok(())
    }
}

/// The CONNECT options of will client `index`: its will goes to `prefix` + its name, at QoS 1,
/// with `payload`.
fn will_session(
    ctx: &Context,
    index: usize,
    spec: &WillSpec,
    prefix: &str,
    payload: Bytes,
) -> SessionOptions {
    let v5 = ctx.endpoint.version == ProtocolVersion::V5;
    SessionOptions {
        client_id: ctx.client_id('w', index as u32),
        // A new session: clean start with an expiry on MQTT 5; clean session 0 on 3.1.1 for
        // a persistent one (client ids are unique per run, so nothing old is resumed).
        clean_start: v5 || spec.session_expiry == 0,
        expiry: spec.session_expiry,
        will: Some(Will {
            topic: ByteStr::from(format!("{prefix}{}", spec.name).as_str()),
            payload,
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: WillProperties {
                will_delay_interval: (v5 && spec.delay > 0).then_some(spec.delay),
                ..WillProperties::default()
            },
        }),
    }
}

/// A message of ours not yet acknowledged.
#[derive(Debug)]
struct InFlight {
    id: PacketId,
    payload: Bytes,
    sent_ns: u64,
    /// QoS 2: PUBREC received, PUBREL sent, waiting for PUBCOMP.
    released: bool,
}

/// The publisher: publishes at a fixed rate, resends after reconnecting, reports
/// acknowledgements.
struct Publisher {
    link: Link,
    run: u32,
    topic: ByteStr,
    qos: QoS,
    payload: usize,
    interval: Duration,
    window: usize,
    next_seq: u64,
    next_due: Instant,
    /// Unacknowledged messages by sequence number: the order to resend them in.
    inflight: BTreeMap<u64, InFlight>,
    /// The sequence number of each packet id in flight.
    ids: HashMap<u16, u64>,
    last_id: u16,
    counters: Arc<Counters>,
}

impl Publisher {
    async fn run(mut self, mut established: Established) -> Result<()> {
        loop {
            let window = established
                .receive_maximum
                .map_or(self.window, |m| self.window.min(usize::from(m)));
            let mut conn = established.conn;
            match self.drive(&mut conn, window).await {
                Ok(()) => return self.link.end(conn).await,
                Err(e) => self.link.lost(&e),
            }
            established = match self.link.reconnect().await {
                Some(next) => next,
                None => return Ok(()),
            };
            self.resend(&mut established.conn)?;
        }
    }

    /// Queues every unacknowledged message again in its original order: PUBLISH with DUP, or
    /// PUBREL once PUBREC was received (§4.4).
    fn resend(&mut self, conn: &mut Conn) -> Result<()> {
        for m in self.inflight.values() {
            let packet = if m.released {
                Packet::PubRel(PubResponse::success(m.id))
            } else {
                self.publish_packet(m.id, m.payload.clone(), true)
            };
            conn.queue(&packet)?;
        }
        Ok(())
    }

    fn publish_packet(&self, id: PacketId, payload: Bytes, dup: bool) -> Packet {
        Packet::Publish(Publish {
            dup,
            qos: self.qos,
            retain: false,
            topic: self.topic.clone(),
            packet_id: Some(id),
            properties: PublishProperties::default(),
            payload,
        })
    }

    /// A packet id not in flight (the window is below 65,535).
    fn allocate(&mut self) -> PacketId {
        loop {
            self.last_id = self.last_id.checked_add(1).unwrap_or(1);
            if !self.ids.contains_key(&self.last_id) {
                return PacketId::new(self.last_id).expect("ids start at 1");
            }
        }
    }

    fn publish_next(&mut self, conn: &mut Conn, now: Instant) -> Result<()> {
        let seq = self.next_seq;
        let sent_ns = timestamp(now);
        let payload = Stamp {
            run: self.run,
            publisher: 0,
            seq,
            sent_ns,
        }
        .to_payload(self.payload);
        let id = self.allocate();
        conn.queue(&self.publish_packet(id, payload.clone(), false))?;
        self.ids.insert(id.get(), seq);
        self.inflight.insert(
            seq,
            InFlight {
                id,
                payload,
                sent_ns,
                released: false,
            },
        );
        self.next_seq += 1;
        self.counters.sent.fetch_add(1, Relaxed);
        Ok(())
    }

    /// Runs the connection until it fails, the run ends, or (publishing stopped) nothing is
    /// left in flight.
    async fn drive(&mut self, conn: &mut Conn, window: usize) -> Result<()> {
        let every = self.link.ping_every();
        let ping = tokio::time::sleep(every);
        tokio::pin!(ping);
        loop {
            let phase = *self.link.phase.borrow();
            if phase == Phase::Shutdown
                || (phase == Phase::StopPublishing && self.inflight.is_empty())
            {
                return Ok(());
            }
            let publishing = phase == Phase::Run;
            if publishing {
                let now = Instant::now();
                if now.saturating_duration_since(self.next_due) > MAX_CATCH_UP {
                    self.next_due = now;
                }
                while self.inflight.len() < window && self.next_due <= now {
                    self.publish_next(conn, now)?;
                    self.next_due += self.interval;
                }
            }
            flush(conn).await?;
            let can_publish = publishing && self.inflight.len() < window;
            tokio::select! {
                packet = conn.recv() => self.on_packet(conn, packet?)?,
                () = tokio::time::sleep_until(self.next_due.into()), if can_publish => {}
                () = &mut ping => {
                    conn.queue(&Packet::PingReq)?;
                    ping.as_mut().reset((Instant::now() + every).into());
                }
                changed = self.link.phase.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Ends the exchange of packet id `id`; returns the message.
    fn complete(&mut self, id: PacketId) -> Option<(u64, InFlight)> {
        let seq = self.ids.remove(&id.get())?;
        Some((seq, self.inflight.remove(&seq)?))
    }

    fn on_packet(&mut self, conn: &mut Conn, packet: Packet) -> Result<()> {
        let at = Instant::now();
        match packet {
            Packet::PubAck(r) if self.qos == QoS::AtLeastOnce => {
                if let Some((seq, m)) = self.complete(r.packet_id) {
                    self.link.report(Event::Acked {
                        at,
                        seq,
                        sent_ns: m.sent_ns,
                        code: r.reason_code,
                    });
                }
            }
            Packet::PubRec(r) if self.qos == QoS::ExactlyOnce => {
                let Some(&seq) = self.ids.get(&r.packet_id.get()) else {
                    return Ok(());
                };
                let Some(m) = self.inflight.get_mut(&seq) else {
                    return Ok(());
                };
                if !r.reason_code.is_success() {
                    let sent_ns = m.sent_ns;
                    self.complete(r.packet_id);
                    self.link.report(Event::Acked {
                        at,
                        seq,
                        sent_ns,
                        code: r.reason_code,
                    });
                    return Ok(());
                }
                if !m.released {
                    m.released = true;
                    self.link.report(Event::Acked {
                        at,
                        seq,
                        sent_ns: m.sent_ns,
                        code: r.reason_code,
                    });
                }
                conn.queue(&Packet::PubRel(PubResponse::success(r.packet_id)))?;
            }
            Packet::PubComp(r) if self.qos == QoS::ExactlyOnce => {
                let released = self
                    .ids
                    .get(&r.packet_id.get())
                    .and_then(|seq| self.inflight.get(seq))
                    .is_some_and(|m| m.released);
                if released {
                    self.complete(r.packet_id);
                }
            }
            Packet::PingResp => {}
            Packet::Disconnect(d) => return Err(disconnected(&mut self.link, d)),
            other => bail!("unexpected {:?} from the broker", other.packet_type()),
        }
        Ok(())
    }
}

/// `kill -9 PID` from a shell started in advance that waits for a line on its stdin. Firing is
/// then a pipe write and the shell's builtin `kill`, well under a millisecond, where starting
/// a `kill` process takes milliseconds: the kill's instant is known that precisely. Dropped
/// without firing, the shell reads end of file and exits without killing.
struct Killer {
    pid: u32,
    shell: tokio::process::Child,
}

impl Killer {
    fn prepare(pid: u32) -> Result<Self> {
        let shell = tokio::process::Command::new("sh")
            .args(["-c", r#"read -r _ && kill -9 "$1""#, "sh", &pid.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting sh for kill -9")?;
        Ok(Killer { pid, shell })
    }

    /// Sends SIGKILL; returns once the shell has exited (within [`KILL_TIMEOUT`]).
    async fn fire(mut self) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        let pid = self.pid;
        let mut stdin = self.shell.stdin.take().context("the shell's stdin")?;
        let fired = async {
            stdin.write_all(b"kill\n").await?;
            drop(stdin);
            self.shell.wait_with_output().await
        };
        let output = tokio::time::timeout(KILL_TIMEOUT, fired)
            .await
            .map_err(|_| anyhow!("kill -9 {pid} took more than {KILL_TIMEOUT:?}"))?
            .with_context(|| format!("kill -9 {pid}"))?;
        ensure!(
            output.status.success(),
            "kill -9 {pid} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }
}

/// Connection events for the summary, in time order. Repeated failures of one client (same
/// target, same error) between two of its connections or losses fold into one line with a
/// count.
#[derive(Debug, Default)]
struct Timeline {
    notes: Vec<Note>,
    /// Failure streaks still open, by client and text: their index in `notes`.
    streaks: HashMap<(Role, String), usize>,
    /// Events left out once [`TIMELINE_LINES`] lines were kept.
    dropped: u64,
}

#[derive(Debug)]
struct Note {
    first: Instant,
    last: Instant,
    count: u64,
    text: String,
}

/// `at - origin` in ms (negative before it).
fn offset_ms(origin: Instant, at: Instant) -> f64 {
    match at.checked_duration_since(origin) {
        Some(d) => d.as_secs_f64() * 1e3,
        None => -(origin - at).as_secs_f64() * 1e3,
    }
}

impl Timeline {
    /// An event of `role` (a connection made or lost): ends its failure streaks.
    fn event(&mut self, role: Role, at: Instant, text: String) {
        self.streaks.retain(|(r, _), _| *r != role);
        self.push(at, text);
    }

    /// A failed attempt of `role`: counted into the same failure since its last event, if any.
    fn failure(&mut self, role: Role, at: Instant, text: String) {
        if let Some(&i) = self.streaks.get(&(role, text.clone())) {
            let note = &mut self.notes[i];
            note.count += 1;
            note.last = note.last.max(at);
            return;
        }
        if self.push(at, text.clone()) {
            self.streaks.insert((role, text), self.notes.len() - 1);
        }
    }

    /// Keeps a new line unless the timeline is full; true if kept.
    fn push(&mut self, at: Instant, text: String) -> bool {
        if self.notes.len() >= TIMELINE_LINES {
            self.dropped += 1;
            return false;
        }
        self.notes.push(Note {
            first: at,
            last: at,
            count: 1,
            text,
        });
        true
    }

    /// The lines, in time order, with times from `origin` (the kill).
    fn lines(&self, origin: Option<Instant>) -> Vec<String> {
        let mut notes: Vec<&Note> = self.notes.iter().collect();
        notes.sort_by_key(|n| n.first);
        let mut lines: Vec<String> = notes
            .into_iter()
            .map(|n| {
                let when = origin.map_or_else(String::new, |o| {
                    format!("kill {:>+9.1} ms  ", offset_ms(o, n.first))
                });
                let repeated = match (n.count, origin) {
                    (1, _) => String::new(),
                    (count, Some(o)) => format!(
                        " ({count} times, the last at kill {:+.1} ms)",
                        offset_ms(o, n.last)
                    ),
                    (count, None) => format!(" ({count} times)"),
                };
                format!("{when}{}{repeated}", n.text)
            })
            .collect();
        if self.dropped > 0 {
            lines.push(format!("... {} more", self.dropped));
        }
        lines
    }
}

/// Everything the coordinator learns from the events.
struct Collected {
    log: RecoveryLog,
    connect: ConnectLog,
    attempts: u64,
    redirects: u64,
    foreign: u64,
    /// QoS 2 packet ids reused by the broker while awaiting PUBREL, and the first few.
    id_reuses: u64,
    id_reuse_examples: Vec<String>,
    timeline: Timeline,
    /// The will clients' names, and what was seen of their wills (same order).
    will_names: Vec<&'static str>,
    wills: Vec<WillLog>,
}

impl Collected {
    fn apply(&mut self, event: Event) {
        match event {
            Event::Attempt {
                role,
                at,
                target,
                took,
                error,
                redirected,
            } => {
                self.attempts += 1;
                self.redirects += u64::from(redirected);
                let via = if redirected {
                    " (Server Reference)"
                } else {
                    ""
                };
                self.connect.elapsed += took;
                match error {
                    None => self.connect.established(took),
                    Some(e) => {
                        self.connect.failed();
                        self.timeline.failure(
                            role,
                            at,
                            format!("{role}: {target}{via} failed: {e}"),
                        );
                    }
                }
            }
            Event::Connected {
                role,
                at,
                node,
                session_present,
            } => {
                self.log.connected(role, at, node, session_present);
                let node =
                    node.map_or_else(|| "another server".to_owned(), |i| format!("node {i}"));
                self.timeline.event(
                    role,
                    at,
                    format!("{role}: connected to {node}, session present: {session_present}"),
                );
            }
            Event::Lost { role, at, reason } => {
                self.log.lost(role, at);
                self.timeline
                    .event(role, at, format!("{role}: connection lost: {reason}"));
            }
            Event::Acked {
                at,
                seq,
                sent_ns,
                code,
            } => self.log.acked(at, seq, sent_ns, code),
            Event::Received { at, seq, sent_ns } => {
                self.log.received(at, seq, sent_ns);
            }
            Event::Foreign => self.foreign += 1,
            Event::IdReused {
                at,
                id,
                pending,
                seq,
            } => {
                self.id_reuses += 1;
                let show = |s: Option<u64>| s.map_or_else(|| "?".to_owned(), |s| s.to_string());
                self.timeline.failure(
                    Role::Subscriber,
                    at,
                    "subscriber: a QoS 2 PUBLISH reused a packet id awaiting PUBREL: dropped as \
                     a resend"
                        .to_owned(),
                );
                if self.id_reuse_examples.len() < 10 {
                    self.id_reuse_examples.push(format!(
                        "id {id}: message {} pending, message {} dropped",
                        show(pending),
                        show(seq)
                    ));
                }
            }
            Event::Resubscribed { role, at } => {
                self.timeline
                    .event(role, at, format!("{role}: session gone, subscribed again"))
            }
            Event::Will { at, index, dup } => {
                let name = self.will_names.get(index).copied().unwrap_or("?");
                if let Some(log) = self.wills.get_mut(index) {
                    log.receipts.push((at, dup));
                }
                let dup = if dup { " (DUP)" } else { "" };
                self.timeline
                    .push(at, format!("will watcher: the {name} will arrived{dup}"));
            }
            Event::WillClientLost { at, index, reason } => {
                let name = self.will_names.get(index).copied().unwrap_or("?");
                self.timeline
                    .push(at, format!("{name} will client: connection lost: {reason}"));
                if let Some(log) = self.wills.get_mut(index) {
                    log.client_lost.get_or_insert((at, reason));
                }
            }
        }
    }
}

/// A line of progress on stderr.
fn progress(started: Instant, c: &Collected, counters: &Counters, last: &mut (u64, u64, u64)) {
    let sent = counters.sent.load(Relaxed);
    let acked = c.log.acked_count();
    let received = c.log.received_count();
    let (s, a, r) = std::mem::replace(last, (sent, acked, received));
    let state = |up: bool, node: Option<usize>| match (up, node) {
        (false, _) => "reconnecting".to_owned(),
        (true, Some(i)) => format!("on node {i}"),
        (true, None) => "on another server".to_owned(),
    };
    eprintln!(
        "[{:>4.0}s] sent {:>6}/s  acked {:>6}/s  received {:>6}/s  unacked {:>6}  | subscriber {}, \
         publisher {}",
        started.elapsed().as_secs_f64(),
        sent - s,
        acked - a,
        received - r,
        sent.saturating_sub(acked),
        state(c.log.subscriber.up, c.log.subscriber.node),
        state(c.log.publisher.up, c.log.publisher.node),
    );
}

fn validate(args: &FailoverArgs) -> Result<()> {
    let n = args.addrs.len();
    ensure!(n >= 2, "--addrs needs at least two nodes");
    for (name, i) in [
        ("--sub-node", args.sub_node),
        ("--pub-node", args.pub_node),
        ("--killed-node", args.killed_node),
    ] {
        ensure!(i < n, "{name} {i} is not an index of --addrs (0..{n})");
    }
    ensure!(
        args.rate > 0.0 && args.rate.is_finite(),
        "--rate must be a number > 0"
    );
    ensure!(
        args.payload >= STAMP_LEN,
        "--payload must be at least {STAMP_LEN} bytes"
    );
    ensure!(
        args.kill_pid > 1 && args.kill_pid != std::process::id(),
        "--kill-pid {} is not a broker's PID",
        args.kill_pid
    );
    ensure!(
        std::path::Path::new(&format!("/proc/{}", args.kill_pid)).exists(),
        "no process with PID {} (--kill-pid)",
        args.kill_pid
    );
    if let Some(w) = args.will_node {
        ensure!(w < n, "--will-node {w} is not an index of --addrs (0..{n})");
        ensure!(
            w != args.killed_node,
            "--will-node must be a node that survives, not --killed-node"
        );
    }
    Ok(())
}

/// The node the will watcher subscribes on: --will-node, else the publisher's node unless it
/// is killed, else the first node that is not.
fn will_node(args: &FailoverArgs) -> usize {
    args.will_node
        .unwrap_or(if args.pub_node != args.killed_node {
            args.pub_node
        } else {
            usize::from(args.killed_node == 0)
        })
}

/// Runs the scenario.
pub async fn run(args: &FailoverArgs) -> Result<Summary> {
    validate(args)?;
    let mut killer = Some(Killer::prepare(args.kill_pid)?);
    let first = &args.addrs[args.sub_node];
    let (host, port) = first
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.to_owned(), p.parse().ok()?)))
        .ok_or_else(|| anyhow!("`{first}` is not HOST:PORT"))?;
    let ctx = Context::new(&CommonArgs {
        host,
        port,
        mqtt_version: args.mqtt_version,
        keep_alive: args.keep_alive,
        connect_concurrency: 1,
        connect_timeout: args.connect_timeout,
        broker_pid: Vec::new(),
        output: args.output.clone(),
    })?;
    let addrs: Vec<SocketAddr> = args
        .addrs
        .iter()
        .map(|a| Ok(ctx.endpoint_at(Some(a))?.addr))
        .collect::<Result<_>>()?;
    let qos = qos(args.qos);
    let topic = ctx.topic("failover");
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (phase, phase_rx) = watch::channel(Phase::Run);
    let killed = Arc::new(AtomicUsize::new(NOT_KILLED));
    let counters = Arc::new(Counters::default());
    let give_up_at = Instant::now()
        + 2 * ROUTE_SETTLE
        + args.before
        + args.after
        + args.settle
        + args.drain
        + 2 * args.connect_timeout;
    let link = |role, node, id| Link {
        role,
        addrs: addrs.clone(),
        current: node,
        endpoint: ctx.endpoint.clone(),
        session: SessionOptions {
            client_id: ctx.client_id(id, 0),
            clean_start: false,
            expiry: args.session_expiry,
            will: None,
        },
        retry_delay: args.retry_delay,
        killed: killed.clone(),
        redirect: None,
        events: events_tx.clone(),
        phase: phase_rx.clone(),
        give_up_at,
    };
    let mut collected = Collected {
        log: RecoveryLog::default(),
        connect: ConnectLog::default(),
        attempts: 0,
        redirects: 0,
        foreign: 0,
        id_reuses: 0,
        id_reuse_examples: Vec::new(),
        timeline: Timeline::default(),
        will_names: Vec::new(),
        wills: Vec::new(),
    };

    // The subscriber first, so that nothing published is missed.
    let mut sub_link = link(Role::Subscriber, args.sub_node, 's');
    let connecting = Instant::now();
    let mut sub = sub_link.connect_first().await?;
    sub.conn
        .subscribe(&topic, qos, args.connect_timeout)
        .await
        .context("subscribing")?;
    collected.connect.established(connecting.elapsed());
    collected.connect.elapsed += connecting.elapsed();

    // The will watcher, then the will clients on the node to be killed.
    let will_specs = if args.no_wills {
        Vec::new()
    } else {
        wills::specs(
            ctx.endpoint.version == ProtocolVersion::V5,
            args.session_expiry,
            args.will_delay,
        )
    };
    let watch_node = will_node(args);
    let mut watcher = None;
    let mut will_clients = Vec::new();
    if !will_specs.is_empty() {
        let prefix = ctx.topic("will/");
        let payloads: Vec<Bytes> = will_specs
            .iter()
            .map(|spec| Bytes::from(format!("will of {} in run {:08x}", spec.name, ctx.run)))
            .collect();
        let started = async {
            let mut watch_link = link(Role::Watcher, watch_node, 'v');
            let mut established = watch_link.connect_first().await?;
            let watching = Watcher {
                link: watch_link,
                prefix: prefix.clone(),
                names: will_specs.iter().map(|spec| spec.name).collect(),
                payloads: payloads.clone(),
                timeout: args.connect_timeout,
            };
            established
                .conn
                .subscribe(&watching.filter(), QoS::AtLeastOnce, args.connect_timeout)
                .await
                .context("will watcher subscribing")?;
            watcher = Some((watching, established));
            let endpoint = Endpoint {
                addr: addrs[args.killed_node],
                ..ctx.endpoint.clone()
            };
            for (i, spec) in will_specs.iter().enumerate() {
                let session = will_session(&ctx, i, spec, &prefix, payloads[i].clone());
                let (conn, _) = Conn::connect(&endpoint, &session)
                    .await
                    .with_context(|| format!("{} will client connecting", spec.name))?;
                will_clients.push(conn);
            }
            anyhow::Ok(())
        };
        if let Err(e) = started.await {
            let _ = sub_link.end(sub.conn).await;
            if let Some((watching, established)) = watcher.take() {
                let _ = watching.link.end(established.conn).await;
            }
            return Err(e);
        }
        collected.will_names = will_specs.iter().map(|spec| spec.name).collect();
        collected.wills = vec![WillLog::default(); will_specs.len()];
    }
    if args.sub_node != args.pub_node || !will_specs.is_empty() {
        tokio::time::sleep(ROUTE_SETTLE).await;
    }
    let mut pub_link = link(Role::Publisher, args.pub_node, 'p');
    let connecting = Instant::now();
    let publisher = match pub_link.connect_first().await {
        Ok(p) => p,
        Err(e) => {
            let _ = sub_link.end(sub.conn).await;
            if let Some((watching, established)) = watcher.take() {
                let _ = watching.link.end(established.conn).await;
            }
            return Err(e);
        }
    };
    collected.connect.established(connecting.elapsed());
    collected.connect.elapsed += connecting.elapsed();
    let mut will_tasks = JoinSet::new();
    if let Some((watching, established)) = watcher {
        will_tasks
            .spawn(async move { ("will watcher".to_owned(), watching.run(established).await) });
    }
    let ping_every = match args.keep_alive {
        0 => Duration::from_secs(86_400),
        k => Duration::from_secs(u64::from(k)) / 2,
    };
    for (index, conn) in will_clients.into_iter().enumerate() {
        let client = WillClient {
            index,
            conn,
            version: ctx.endpoint.version,
            ping_every,
            events: events_tx.clone(),
            phase: phase_rx.clone(),
        };
        let name = format!("{} will client", will_specs[index].name);
        will_tasks.spawn(async move { (name, client.run().await) });
    }
    drop(events_tx);

    let start = Instant::now();
    let mut sub_task = tokio::spawn(
        Subscriber {
            link: sub_link,
            run: ctx.run,
            filter: topic.clone(),
            qos,
            incoming_qos2: HashMap::new(),
            timeout: args.connect_timeout,
        }
        .run(sub),
    );
    let mut pub_task = tokio::spawn(
        Publisher {
            link: pub_link,
            run: ctx.run,
            topic: ByteStr::from(topic.as_str()),
            qos,
            payload: args.payload,
            interval: Duration::from_secs_f64(1.0 / args.rate),
            window: usize::from(args.inflight),
            next_seq: 0,
            next_due: start,
            inflight: BTreeMap::new(),
            ids: HashMap::new(),
            last_id: 0,
            counters: counters.clone(),
        }
        .run(publisher),
    );

    // Steady load, the kill, then until recovered (+ settle) or given up.
    let kill_at = start + args.before;
    let give_up = kill_at + args.after;
    let mut ticks = tokio::time::interval_at(
        (start + Duration::from_secs(1)).into(),
        Duration::from_secs(1),
    );
    let mut last = (0, 0, 0);
    let mut kill_pending = true;
    let mut kill_error = None;
    let mut kill_command = Duration::ZERO;
    let mut errors = Errors::default();
    let mut pub_result = None;
    loop {
        // Recovered, and every will in (if any are measured); then `settle` more.
        let settled = collected
            .log
            .recovered_at()
            .and_then(|at| {
                if collected.wills.is_empty() {
                    Some(at)
                } else {
                    wills::all_received_at(&collected.wills).map(|w| w.max(at))
                }
            })
            .map(|at| at + args.settle);
        if settled.is_some_and(|at| Instant::now() >= at) {
            break;
        }
        tokio::select! {
            Some(event) = events.recv() => collected.apply(event),
            () = tokio::time::sleep_until(kill_at.into()), if kill_pending => {
                kill_pending = false;
                killed.store(args.killed_node, Relaxed);
                let Some(killer) = killer.take() else { break };
                // The origin of every time: the signal goes out between now and the shell's
                // exit (`kill_command`, well under a millisecond).
                let at = Instant::now();
                collected.log.kill(at);
                if let Err(e) = killer.fire().await {
                    kill_error = Some(e);
                    break;
                }
                kill_command = at.elapsed();
                eprintln!(
                    "[{:>4.0}s] SIGKILL sent to pid {} (node {}, {}) in {:.2} ms",
                    start.elapsed().as_secs_f64(),
                    args.kill_pid,
                    args.killed_node,
                    addrs[args.killed_node],
                    kill_command.as_secs_f64() * 1e3
                );
            }
            () = tokio::time::sleep_until(settled.unwrap_or(give_up).into()), if settled.is_some() => {}
            () = tokio::time::sleep_until(give_up.into()) => break,
            joined = &mut pub_task, if pub_result.is_none() => pub_result = Some(joined),
            _ = ticks.tick() => progress(start, &collected, &counters, &mut last),
        }
    }

    // No new messages; wait for acknowledgements and for acknowledged messages in transit.
    phase.send_replace(Phase::StopPublishing);
    let drain_until = Instant::now() + args.drain;
    while kill_error.is_none() {
        if pub_result.is_some() && collected.log.outstanding() == 0 {
            break;
        }
        tokio::select! {
            Some(event) = events.recv() => collected.apply(event),
            joined = &mut pub_task, if pub_result.is_none() => pub_result = Some(joined),
            () = tokio::time::sleep_until(drain_until.into()) => break,
            _ = ticks.tick() => progress(start, &collected, &counters, &mut last),
        }
    }
    let ended = Instant::now();

    // Both clients disconnect and remove their sessions, within a bound.
    phase.send_replace(Phase::Shutdown);
    let end_by = Instant::now() + 2 * args.connect_timeout + Duration::from_secs(2);
    let mut sub_result = None;
    while pub_result.is_none() || sub_result.is_none() || !will_tasks.is_empty() {
        tokio::select! {
            Some(event) = events.recv() => collected.apply(event),
            joined = &mut pub_task, if pub_result.is_none() => pub_result = Some(joined),
            joined = &mut sub_task, if sub_result.is_none() => sub_result = Some(joined),
            Some(joined) = will_tasks.join_next(), if !will_tasks.is_empty() => match joined {
                Ok((_, Ok(()))) => {}
                Ok((name, Err(e))) => errors.push(&e.context(format!("{name} ending"))),
                Err(e) => errors.push(&anyhow!("will task: {e}")),
            },
            () = tokio::time::sleep_until(end_by.into()) => break,
        }
    }
    if !will_tasks.is_empty() {
        will_tasks.abort_all();
        errors.push(&anyhow!(
            "{} will watcher or will client tasks did not end within their bound",
            will_tasks.len()
        ));
    }
    for (role, task, result) in [
        (Role::Publisher, &pub_task, pub_result),
        (Role::Subscriber, &sub_task, sub_result),
    ] {
        match result {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => errors.push(&e.context(format!("{role} ending"))),
            Some(Err(e)) => errors.push(&anyhow!("{role} task: {e}")),
            None => {
                task.abort();
                errors.push(&anyhow!("{role} did not end within its bound"));
            }
        }
    }
    while let Ok(event) = events.try_recv() {
        collected.apply(event);
    }
    // The will clients' persistent sessions, adopted by a surviving node: removed by a
    // clean-session connection (after the watcher has gone, so a will published now is not
    // counted).
    for (i, spec) in will_specs.iter().enumerate() {
        if spec.session_expiry == 0 {
            continue;
        }
        let endpoint = Endpoint {
            addr: addrs[watch_node],
            ..ctx.endpoint.clone()
        };
        let clean = SessionOptions::clean(ctx.client_id('w', i as u32));
        let removed = async { Conn::connect(&endpoint, &clean).await?.0.close().await };
        if let Err(e) = removed.await {
            errors.push(&e.context(format!("removing the {} will client's session", spec.name)));
        }
    }
    if let Some(e) = kill_error {
        return Err(e);
    }

    let published = counters.sent.load(Relaxed);
    let rec = collected.log.recovery(published);
    let window = ended.saturating_duration_since(start).as_secs_f64();
    let mut summary = ctx.summary(
        "failover",
        format!(
            "kill node {} after {:?}, subscriber on node {}, publisher on node {}, QoS {}, {} msg/s, {} B payload",
            args.killed_node,
            args.before,
            args.sub_node,
            args.pub_node,
            args.qos,
            args.rate,
            args.payload
        ),
    );
    summary.qos = Some(args.qos);
    summary.rate_per_s = Some(args.rate);
    summary.duration_s = window;
    summary.connect = collected.connect.stats();
    summary.messages = Some(MessageStats {
        published,
        acked: rec.acked,
        rejected: rec.rejected,
        unacked: published.saturating_sub(rec.acked + rec.rejected),
        tally: rec.tally,
        foreign: collected.foreign,
        offered_per_s: published as f64 / window,
        delivered_per_s: rec.tally.delivered as f64 / window,
        loss_ratio: if rec.tally.expected == 0 {
            0.0
        } else {
            rec.tally.lost as f64 / rec.tally.expected as f64
        },
    });
    summary.latency_us = Percentiles::of(collected.log.latency(), 1.0);
    summary.failover = Some(FailoverStats {
        nodes: args.addrs.clone(),
        sub_node: args.sub_node,
        pub_node: args.pub_node,
        killed_node: args.killed_node,
        kill_pid: args.kill_pid,
        kill_command_ms: kill_command.as_secs_f64() * 1e3,
        before_s: args.before.as_secs_f64(),
        after_s: args.after.as_secs_f64(),
        sub_lost: rec.sub_lost,
        sub_reconnect_ms: rec.sub_back_ms,
        sub_reconnect_node: rec.sub_back_node,
        sub_session_present: rec.sub_session_present,
        pub_lost: rec.pub_lost,
        pub_reconnect_ms: rec.pub_back_ms,
        pub_reconnect_node: rec.pub_back_node,
        pub_session_present: rec.pub_session_present,
        first_message_ms: rec.first_message_ms,
        first_fresh_message_ms: rec.first_fresh_message_ms,
        first_fresh_ack_ms: rec.first_fresh_ack_ms,
        recovered_ms: rec.recovered_ms,
        max_receive_gap_ms: rec.max_receive_gap_ms,
        max_sequence_jump: rec.max_sequence_jump,
        acked: rec.acked,
        no_subscribers: rec.no_subscribers,
        received: rec.received,
        duplicates: rec.duplicates,
        missing_acked: rec.missing_acked,
        missing_examples: rec.missing_examples,
        missing_acked_after_kill: rec.missing_acked_after_kill,
        qos2_id_reuses: collected.id_reuses,
        qos2_id_reuse_examples: collected.id_reuse_examples,
        lost_unacked: rec.lost_unacked,
        reconnect_attempts: collected.attempts,
        redirects: collected.redirects,
        sessions_lost: rec.sessions_lost,
        timeline: collected.timeline.lines(collected.log.killed_at()),
        will_node: (!will_specs.is_empty()).then_some(watch_node),
        wills: will_specs
            .iter()
            .zip(&collected.wills)
            .map(|(spec, log)| log.stats(spec, collected.log.killed_at()))
            .collect(),
    });
    errors.store(&mut summary);
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_go_round_robin_with_the_killed_node_last() {
        assert_eq!(candidates(3, 0, None), [1, 2, 0]);
        assert_eq!(candidates(3, 2, None), [0, 1, 2]);
        // The current node was killed: the others first, it last.
        assert_eq!(candidates(3, 1, Some(1)), [2, 0, 1]);
        // Another node was killed: the current node before it.
        assert_eq!(candidates(3, 0, Some(1)), [2, 0, 1]);
        assert_eq!(candidates(2, 0, Some(0)), [1, 0]);
        assert_eq!(candidates(1, 0, Some(0)), [0]);
        // Every node is in the list exactly once.
        for current in 0..5 {
            for killed in [None, Some(0), Some(3)] {
                let mut c = candidates(5, current, killed);
                assert_eq!(c.last().copied(), killed.or(Some(current)));
                c.sort_unstable();
                assert_eq!(c, [0, 1, 2, 3, 4]);
            }
        }
    }

    #[test]
    fn repeated_failures_fold_into_one_line() {
        let t0 = Instant::now();
        let ms = |m| t0 + Duration::from_millis(m);
        let mut t = Timeline::default();
        let refused = |role: &str, node| format!("{role}: node {node} failed: refused");
        t.event(
            Role::Subscriber,
            ms(10),
            "subscriber: connection lost".into(),
        );
        for i in 0..5 {
            t.failure(Role::Subscriber, ms(20 + 50 * i), refused("subscriber", 1));
        }
        // Another client, or another text: lines of their own.
        t.failure(Role::Publisher, ms(25), refused("publisher", 1));
        t.failure(Role::Subscriber, ms(30), refused("subscriber", 2));
        t.event(Role::Subscriber, ms(300), "subscriber: connected".into());
        // After an event of the client: a new streak.
        t.failure(Role::Subscriber, ms(400), refused("subscriber", 1));
        t.failure(Role::Publisher, ms(410), refused("publisher", 1));
        let lines = t.lines(Some(ms(5)));
        assert_eq!(
            lines,
            [
                "kill      +5.0 ms  subscriber: connection lost",
                "kill     +15.0 ms  subscriber: node 1 failed: refused (5 times, the last at \
                 kill +215.0 ms)",
                "kill     +20.0 ms  publisher: node 1 failed: refused (2 times, the last at kill \
                 +405.0 ms)",
                "kill     +25.0 ms  subscriber: node 2 failed: refused",
                "kill    +295.0 ms  subscriber: connected",
                "kill    +395.0 ms  subscriber: node 1 failed: refused",
            ]
        );
        // Full: further events are counted, not kept.
        for i in 0..2 * TIMELINE_LINES as u64 {
            t.event(Role::Publisher, ms(500 + i), format!("event {i}"));
        }
        let lines = t.lines(None);
        assert_eq!(lines.len(), TIMELINE_LINES + 1);
        assert_eq!(lines[0], "subscriber: connection lost");
        assert_eq!(
            lines.last().map(String::as_str),
            Some(format!("... {} more", TIMELINE_LINES as u64 + 6).as_str())
        );
    }

    #[tokio::test]
    async fn server_references_resolve_their_first_address() {
        let resolved = tokio::time::timeout(
            Duration::from_secs(5),
            resolve_reference("127.0.0.1:1884 127.0.0.1:1885"),
        )
        .await
        .expect("resolves in time");
        assert_eq!(resolved, Some(SocketAddr::from(([127, 0, 0, 1], 1884))));
        let nothing = tokio::time::timeout(Duration::from_secs(5), resolve_reference("  "))
            .await
            .expect("answers in time");
        assert_eq!(nothing, None);
    }

    /// A `sleep 30` of our own, to kill.
    fn victim() -> (tokio::process::Child, u32) {
        let child = tokio::process::Command::new("sleep")
            .arg("30")
            .kill_on_drop(true)
            .spawn()
            .expect("spawns sleep");
        let pid = child.id().expect("has a pid");
        (child, pid)
    }

    #[tokio::test]
    async fn the_killer_kills_when_fired_and_only_then() {
        use std::os::unix::process::ExitStatusExt;
        let (mut child, pid) = victim();
        let killer = Killer::prepare(pid).expect("prepares");
        // Not before firing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(child.try_wait().expect("checks").is_none(), "still running");
        let fired = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), killer.fire())
            .await
            .expect("fires in time")
            .expect("kills");
        let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .expect("the child ends in time")
            .expect("waits");
        assert_eq!(status.signal(), Some(9));
        assert!(fired.elapsed() < Duration::from_secs(5));

        // Dropped without firing: the shell exits, the process lives.
        let (mut child, pid) = victim();
        let mut killer = Killer::prepare(pid).expect("prepares");
        let shell = killer.shell.id();
        drop(killer.shell.stdin.take());
        let status = tokio::time::timeout(Duration::from_secs(5), killer.shell.wait())
            .await
            .expect("the shell ends in time")
            .expect("waits");
        assert!(!status.success(), "no line read: no kill ({shell:?})");
        assert!(child.try_wait().expect("checks").is_none(), "still running");
        child.start_kill().expect("kills our sleep");
        let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
    }

    #[tokio::test]
    async fn the_killer_reports_a_missing_process() {
        // A PID above the system's maximum names no process.
        let pid_max: u32 = std::fs::read_to_string("/proc/sys/kernel/pid_max")
            .expect("reads pid_max")
            .trim()
            .parse()
            .expect("a number");
        let killer = Killer::prepare(pid_max + 1).expect("prepares");
        let result = tokio::time::timeout(Duration::from_secs(10), killer.fire())
            .await
            .expect("answers in time");
        assert!(result.is_err());
    }

    /// A broker that accepts one connection, answers CONNECT with `connack`, then closes.
    async fn one_shot_broker(connack: Packet) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binds");
        let addr = listener.local_addr().expect("has an address");
        let task = tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut buf = bytes::BytesMut::new();
            loop {
                match raftmq_codec::decode(&mut buf, ProtocolVersion::V5, 1 << 20) {
                    Ok(Some(Packet::Connect(_))) => break,
                    Ok(_) => {}
                    Err(_) => return,
                }
                if socket.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                    return;
                }
            }
            let mut out = bytes::BytesMut::new();
            raftmq_codec::encode(&connack, ProtocolVersion::V5, &mut out).expect("encodes");
            let _ = socket.write_all(&out).await;
            let _ = socket.shutdown().await;
        });
        (addr, task)
    }

    /// A subscriber's link to `addrs`, last connected to `current`; the phase sender and the
    /// events it reports.
    fn test_link(
        addrs: Vec<SocketAddr>,
        current: usize,
    ) -> (Link, watch::Sender<Phase>, mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = mpsc::unbounded_channel();
        let (phase, phase_rx) = watch::channel(Phase::Run);
        let link = Link {
            role: Role::Subscriber,
            addrs: addrs.clone(),
            current,
            endpoint: Endpoint {
                addr: addrs[current],
                local: None,
                version: ProtocolVersion::V5,
                keep_alive: 10,
                timeout: Duration::from_secs(2),
            },
            session: SessionOptions {
                client_id: "failover-test".into(),
                clean_start: false,
                expiry: 300,
                will: None,
            },
            retry_delay: Duration::from_millis(10),
            killed: Arc::new(AtomicUsize::new(NOT_KILLED)),
            redirect: None,
            events,
            phase: phase_rx,
            give_up_at: Instant::now() + Duration::from_secs(10),
        };
        (link, phase, rx)
    }

    #[tokio::test]
    async fn a_refusal_with_a_server_reference_is_followed() {
        use raftmq_codec::{ConnAck, ConnAckProperties};
        // Node 0 refuses with 0x9C naming node 2; node 1 is not listening; node 2 accepts.
        let accepting = ConnAck {
            session_present: true,
            reason_code: ReasonCode::SUCCESS,
            properties: ConnAckProperties::default(),
        };
        let (good, good_task) = one_shot_broker(Packet::ConnAck(accepting)).await;
        let refusing = ConnAck {
            session_present: false,
            reason_code: ReasonCode::USE_ANOTHER_SERVER,
            properties: ConnAckProperties {
                server_reference: Some(ByteStr::from(good.to_string().as_str())),
                ..ConnAckProperties::default()
            },
        };
        let (bad, bad_task) = one_shot_broker(Packet::ConnAck(refusing)).await;
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
            l.local_addr().expect("has an address")
        };
        // After a loss on node 2's neighbour order: from current = 2, candidates are 0, 1, 2.
        let (mut link, _phase, mut events) = test_link(vec![bad, closed, good], 2);
        let established = tokio::time::timeout(Duration::from_secs(10), link.reconnect())
            .await
            .expect("reconnects in time")
            .expect("connected");
        assert!(established.session_present);
        assert_eq!(link.current, 2);
        let mut attempts = Vec::new();
        while let Ok(event) = events.try_recv() {
            if let Event::Attempt {
                target,
                error,
                redirected,
                ..
            } = event
            {
                attempts.push((target, error.is_none(), redirected));
            }
        }
        // Node 0 refused and named node 2, which was tried next (not node 1).
        assert_eq!(attempts.len(), 2, "{attempts:?}");
        assert!(
            attempts[0].0.starts_with("node 0") && !attempts[0].1,
            "{attempts:?}"
        );
        assert_eq!(
            (
                attempts[1].0.starts_with("node 2"),
                attempts[1].1,
                attempts[1].2
            ),
            (true, true, true),
            "{attempts:?}"
        );
        let _ = tokio::time::timeout(Duration::from_secs(5), good_task).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), bad_task).await;
    }

    #[tokio::test]
    async fn reconnecting_gives_up_when_the_run_ends() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
            l.local_addr().expect("has an address")
        };
        let (mut link, phase, mut events) = test_link(vec![closed, closed], 0);
        link.give_up_at = Instant::now() + Duration::from_millis(200);
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), link.reconnect())
            .await
            .expect("gives up in time");
        assert!(result.is_none());
        assert!(started.elapsed() < Duration::from_secs(5));
        let mut failed = 0;
        while let Ok(event) = events.try_recv() {
            if let Event::Attempt { error, .. } = event {
                assert!(error.is_some(), "nothing listens");
                failed += 1;
            }
        }
        assert!(
            failed >= 2,
            "it kept trying until the bound: {failed} attempts"
        );

        // Shutdown ends the retries too, without waiting for the bound.
        link.give_up_at = Instant::now() + Duration::from_secs(60);
        let stopper = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            phase.send_replace(Phase::Shutdown);
        });
        let started = Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), link.reconnect())
            .await
            .expect("gives up in time");
        assert!(result.is_none());
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::timeout(Duration::from_secs(5), stopper)
            .await
            .expect("stopper ends")
            .expect("stopper ran");
    }
}
