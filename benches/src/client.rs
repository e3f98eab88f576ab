//! A small MQTT client made for load generation.
//!
//! [`Conn::connect`] opens a TCP connection (`TCP_NODELAY`) and completes the MQTT handshake
//! ([`Conn::handshake`] also reports a refusal's Server Reference);
//! [`Conn::subscribe`] and [`Conn::close`] serve the setup and churn phases, and
//! [`Conn::queue`], [`Conn::flush`] and [`Conn::recv`] let a scenario run the protocol itself
//! (the failover scenario reconnects and resends). A [`Driver`] then
//! runs the connection as one task: it publishes according to a [`Plan`] (rate, in-flight
//! window, QoS 0/1/2 with PUBACK, PUBREC/PUBREL/PUBCOMP), acknowledges what it receives and
//! records it in an [`Inbox`], and pings when idle.
//!
//! Packets are encoded into one write buffer and written with a single non-blocking write per
//! loop turn, so everything produced while the socket was busy goes out as one batch; new
//! publishes stop while that buffer holds more than [`HIGH_WATER`] bytes (TCP backpressure).

use crate::accounting::{Receipt, StreamLog};
use crate::payload::{Stamp, timestamp};
use anyhow::{Context, Result, anyhow, bail};
use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use raftmq_codec::{
    ByteStr, Connect, ConnectProperties, Disconnect, Packet, PacketId, ProtocolVersion,
    PubResponse, Publish, PublishProperties, QoS, ReasonCode, SubAck, Subscribe, SubscribeFilter,
    SubscribeProperties, SubscriptionOptions, Will, decode, encode,
};
use std::collections::HashSet;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Largest packet accepted from the broker (the MQTT maximum).
const MAX_PACKET: u32 = 268_435_460;
/// Publishing pauses while this many bytes wait to be written.
const HIGH_WATER: usize = 64 * 1024;
/// Read buffer growth step: starts small (thousands of idle connections stay cheap) and doubles
/// up to the maximum while reads fill it.
const READ_CHUNK_MIN: usize = 4 * 1024;
const READ_CHUNK_MAX: usize = 64 * 1024;
/// How long closing a connection (DISCONNECT, flush, shutdown) may take.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Where and how to connect.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Local address to connect from (port chosen by the system); `None`: the system's choice.
    pub local: Option<std::net::IpAddr>,
    pub version: ProtocolVersion,
    /// Keep alive in seconds (0: none).
    pub keep_alive: u16,
    /// Bound on the handshake (TCP connect to CONNACK) and on SUBSCRIBE → SUBACK.
    pub timeout: Duration,
}

/// The session a connection asks for.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    pub client_id: String,
    pub clean_start: bool,
    /// Session Expiry Interval in seconds (MQTT 5; 3.1.1 ignores it).
    pub expiry: u32,
    /// The will to register with CONNECT, if any.
    pub will: Option<Will>,
}

impl SessionOptions {
    /// A clean session that ends with the connection.
    pub fn clean(client_id: String) -> Self {
        SessionOptions {
            client_id,
            clean_start: true,
            expiry: 0,
            will: None,
        }
    }
}

/// Read and write buffers of one connection, and its protocol version.
struct Buffers {
    read: BytesMut,
    write: BytesMut,
    version: ProtocolVersion,
    /// Current read growth step, between [`READ_CHUNK_MIN`] and [`READ_CHUNK_MAX`].
    read_chunk: usize,
}

impl Buffers {
    fn queue(&mut self, packet: &Packet) -> Result<()> {
        encode(packet, self.version, &mut self.write).context("encoding a packet")
    }

    fn next_packet(&mut self) -> Result<Option<Packet>> {
        decode(&mut self.read, self.version, MAX_PACKET).context("malformed packet from the broker")
    }

    /// Makes room for the next read; returns the room.
    fn reserve_read(&mut self) -> usize {
        if self.read.capacity() - self.read.len() < self.read_chunk / 2 {
            self.read.reserve(self.read_chunk);
        }
        self.read.capacity() - self.read.len()
    }

    /// Notes a read of `n` bytes into `room` bytes of space: grows the step if it was filled.
    fn read_done(&mut self, n: usize, room: usize) {
        if n == room {
            self.read_chunk = (self.read_chunk * 2).min(READ_CHUNK_MAX);
        }
    }
}

/// An established MQTT connection (CONNACK received).
pub struct Conn {
    stream: TcpStream,
    bufs: Buffers,
    keep_alive: u16,
}

impl Conn {
    /// Connects and completes the handshake. Returns the connection and CONNACK's Session
    /// Present flag.
    pub async fn connect(endpoint: &Endpoint, session: &SessionOptions) -> Result<(Self, bool)> {
        match Self::handshake(endpoint, session).await? {
            Handshake::Accepted {
                conn,
                session_present,
                ..
            } => Ok((conn, session_present)),
            Handshake::Refused { code, .. } => bail!("connection refused: {code}"),
        }
    }

    /// Connects and sends CONNECT; returns the broker's answer (within `endpoint.timeout`).
    pub async fn handshake(endpoint: &Endpoint, session: &SessionOptions) -> Result<Handshake> {
        let handshake = async {
            let stream = connect_tcp(endpoint)
                .await
                .with_context(|| format!("connecting to {}", endpoint.addr))?;
            stream.set_nodelay(true)?;
            let mut conn = Conn {
                stream,
                bufs: Buffers {
                    read: BytesMut::new(),
                    write: BytesMut::new(),
                    version: endpoint.version,
                    read_chunk: READ_CHUNK_MIN,
                },
                keep_alive: endpoint.keep_alive,
            };
            let properties = ConnectProperties {
                session_expiry_interval: (session.expiry > 0).then_some(session.expiry),
                ..ConnectProperties::default()
            };
            conn.bufs.queue(&Packet::Connect(Box::new(Connect {
                protocol: endpoint.version,
                clean_start: session.clean_start,
                keep_alive: endpoint.keep_alive,
                client_id: session.client_id.as_str().into(),
                will: session.will.clone(),
                username: None,
                password: None,
                properties,
            })))?;
            conn.flush().await?;
            match conn.recv().await? {
                Packet::ConnAck(ack) if ack.reason_code.is_success() => Ok(Handshake::Accepted {
                    conn,
                    session_present: ack.session_present,
                    receive_maximum: ack.properties.receive_maximum,
                }),
                Packet::ConnAck(ack) => Ok(Handshake::Refused {
                    code: ack.reason_code,
                    server_reference: ack.properties.server_reference.map(|r| r.to_string()),
                }),
                other => bail!("expected CONNACK, got {:?}", other.packet_type()),
            }
        };
        tokio::time::timeout(endpoint.timeout, handshake)
            .await
            .map_err(|_| anyhow!("no CONNACK within {:?}", endpoint.timeout))?
    }

    /// Subscribes to `filter` and waits (at most `timeout`) for a successful SUBACK.
    pub async fn subscribe(&mut self, filter: &str, qos: QoS, timeout: Duration) -> Result<()> {
        self.bufs.queue(&subscribe_packet(filter, qos))?;
        let exchange = async {
            self.flush().await?;
            match self.recv().await? {
                Packet::SubAck(ack) => check_suback(&ack),
                other => bail!("expected SUBACK, got {:?}", other.packet_type()),
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| anyhow!("no SUBACK within {timeout:?}"))?
    }

    /// Sends DISCONNECT (normal) and closes the connection, within a second.
    pub async fn close(self) -> Result<()> {
        self.close_with(Disconnect::default()).await
    }

    /// Sends `disconnect` and closes the connection, within a second.
    pub async fn close_with(mut self, disconnect: Disconnect) -> Result<()> {
        self.bufs.queue(&Packet::Disconnect(disconnect))?;
        close(&mut self.stream, &mut self.bufs.write).await
    }

    /// Encodes `packet` into the write buffer, for the next [`Conn::flush`].
    pub fn queue(&mut self, packet: &Packet) -> Result<()> {
        self.bufs.queue(packet)
    }

    /// Writes everything queued.
    pub async fn flush(&mut self) -> Result<()> {
        self.stream
            .write_all_buf(&mut self.bufs.write)
            .await
            .context("writing to the broker")
    }

    /// The next packet from the broker. Cancel safe: bytes read before the future is dropped
    /// stay in the read buffer for the next call.
    pub async fn recv(&mut self) -> Result<Packet> {
        loop {
            if let Some(packet) = self.bufs.next_packet()? {
                return Ok(packet);
            }
            let room = self.bufs.reserve_read();
            match self.stream.read_buf(&mut self.bufs.read).await? {
                0 => bail!("the broker closed the connection"),
                n => self.bufs.read_done(n, room),
            }
        }
    }
}

/// The broker's answer to CONNECT.
pub enum Handshake {
    /// CONNACK with a success code.
    Accepted {
        conn: Conn,
        session_present: bool,
        /// The Receive Maximum the broker announced (MQTT 5): how many QoS 1/2 publishes it
        /// accepts unacknowledged.
        receive_maximum: Option<u16>,
    },
    /// CONNACK with a failure code; MQTT 5 may name another server to use (0x9C Use another
    /// server, 0x9D Server moved).
    Refused {
        code: ReasonCode,
        server_reference: Option<String>,
    },
}

/// Opens a TCP connection to `endpoint.addr`, from `endpoint.local` if set.
async fn connect_tcp(endpoint: &Endpoint) -> std::io::Result<TcpStream> {
    let Some(local) = endpoint.local else {
        return TcpStream::connect(endpoint.addr).await;
    };
    let socket = if endpoint.addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.bind(SocketAddr::new(local, 0))?;
    socket.connect(endpoint.addr).await
}

/// Flushes `pending` and shuts the connection down, within [`CLOSE_TIMEOUT`].
async fn close(stream: &mut TcpStream, pending: &mut BytesMut) -> Result<()> {
    let closing = async {
        stream.write_all_buf(pending).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
        Ok(result) => result.context("closing the connection"),
        Err(_) => bail!("closing the connection took more than {CLOSE_TIMEOUT:?}"),
    }
}

/// A SUBSCRIBE of one filter (packet id 1).
pub fn subscribe_packet(filter: &str, qos: QoS) -> Packet {
    Packet::Subscribe(Subscribe {
        packet_id: PacketId::MIN,
        properties: SubscribeProperties::default(),
        filters: vec![SubscribeFilter {
            filter: filter.into(),
            options: SubscriptionOptions {
                qos,
                ..SubscriptionOptions::default()
            },
        }],
    })
}

fn check_suback(ack: &SubAck) -> Result<()> {
    match ack.reason_codes.iter().find(|code| !code.is_success()) {
        Some(code) => bail!("subscription refused: {code}"),
        None => Ok(()),
    }
}

/// Progress counters shared by all connections of a run.
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages published.
    pub sent: AtomicU64,
    /// First receipts (per subscriber) of stamped messages.
    pub received: AtomicU64,
}

/// Messages a connection publishes: message `seq` (from 0) goes to `topics[seq % topics.len()]`.
#[derive(Clone, Debug)]
pub struct Plan {
    pub run: u32,
    pub publisher: u32,
    pub topics: Vec<ByteStr>,
    pub qos: QoS,
    pub retain: bool,
    /// Payload size (a [`Stamp`] then zeros); `None` sends empty payloads (clearing retained
    /// messages).
    pub payload: Option<usize>,
    /// Stop after this many messages.
    pub count: Option<u64>,
    /// Messages per second; `None` for as fast as the window and the socket allow.
    pub rate: Option<f64>,
    /// Most QoS 1/2 messages awaiting acknowledgement.
    pub window: u16,
    /// Origin of the pacing: message `seq` is due at `start + seq / rate`.
    pub start: Instant,
    /// No message is published from then on.
    pub until: Option<Instant>,
    /// Messages published from then on count as measured.
    pub measure_from: Instant,
}

/// What a connection received: per-publisher streams for the accounting, and latencies.
#[derive(Debug)]
pub struct Inbox {
    run: u32,
    publishers: u32,
    measure_from: Instant,
    measure_until: Instant,
    /// `measure_from` as a [`timestamp`], to compare with stamps.
    measure_from_ns: u64,
    pub log: StreamLog,
    /// Publish → first receipt latency (µs) of messages published in the measured window,
    /// whenever they arrive; allocated on first use.
    pub latency: Option<Histogram<u64>>,
    /// First receipts that arrived in the measured window (whenever they were published).
    pub measured: u64,
    /// Messages without a stamp of this run (or from an unknown publisher).
    pub foreign: u64,
    /// When the last first receipt arrived.
    pub last_new_at: Option<Instant>,
}

impl Inbox {
    /// An inbox for stamps of `run` from publishers `0..publishers`, measuring from
    /// `measure_from` until `measure_until`.
    pub fn new(run: u32, publishers: u32, measure_from: Instant, measure_until: Instant) -> Self {
        Inbox {
            run,
            publishers,
            measure_from,
            measure_until,
            measure_from_ns: timestamp(measure_from),
            log: StreamLog::default(),
            latency: None,
            measured: 0,
            foreign: 0,
            last_new_at: None,
        }
    }

    /// Records a received payload; true for the first receipt of a stamped message.
    fn record(&mut self, payload: &[u8], now: Instant) -> bool {
        let stamp = Stamp::parse(payload, self.run).filter(|s| s.publisher < self.publishers);
        let Some(stamp) = stamp else {
            self.foreign += 1;
            return false;
        };
        if self.log.record(stamp.publisher, stamp.seq) == Receipt::Duplicate {
            return false;
        }
        self.last_new_at = Some(now);
        if (self.measure_from..self.measure_until).contains(&now) {
            self.measured += 1;
        }
        if stamp.sent_ns >= self.measure_from_ns {
            let micros = timestamp(now).saturating_sub(stamp.sent_ns) / 1000;
            self.latency
                .get_or_insert_with(latency_histogram)
                .saturating_record(micros.max(1));
        }
        true
    }
}

/// An empty histogram of latencies in µs, up to an hour, with 2 significant digits (1%):
/// about 26 KiB, so thousands of subscribers can each keep one.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds")
}

/// The state of one packet id of our own QoS 1/2 publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Free,
    /// Waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    AwaitAck,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitComp,
}

/// Our publishes: counters and the in-flight window.
#[derive(Debug, Default)]
struct Outbound {
    /// Indexed by packet id; allocated for QoS 1/2 plans only.
    slots: Vec<Slot>,
    inflight: u32,
    last_id: u16,
    sent: u64,
    sent_measured: u64,
    acked: u64,
    rejected: u64,
}

impl Outbound {
    /// A free packet id; the caller ensures the window (< 65,535) is not full.
    fn allocate(&mut self) -> PacketId {
        if self.slots.is_empty() {
            self.slots = vec![Slot::Free; usize::from(u16::MAX) + 1];
        }
        loop {
            self.last_id = self.last_id.checked_add(1).unwrap_or(1);
            if self.slots[usize::from(self.last_id)] == Slot::Free {
                self.slots[usize::from(self.last_id)] = Slot::AwaitAck;
                self.inflight += 1;
                return PacketId::new(self.last_id).expect("ids start at 1");
            }
        }
    }

    fn slot(&mut self, id: PacketId) -> &mut Slot {
        if self.slots.is_empty() {
            self.slots = vec![Slot::Free; usize::from(u16::MAX) + 1];
        }
        &mut self.slots[usize::from(id.get())]
    }

    /// Ends the exchange of `id`, accepted or refused by the broker.
    fn complete(&mut self, id: PacketId, accepted: bool) {
        *self.slot(id) = Slot::Free;
        self.inflight -= 1;
        if accepted {
            self.acked += 1;
        } else {
            self.rejected += 1;
        }
    }
}

/// Why publishing paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Blocked {
    /// No plan, or the plan is complete.
    Done,
    /// The in-flight window is full: acknowledgements will reopen it.
    Window,
    /// The next message is due at this instant.
    Pace(Instant),
    /// The write buffer is full.
    Full,
}

/// Everything of a running connection but the socket.
struct State {
    bufs: Buffers,
    plan: Option<Plan>,
    out: Outbound,
    /// Packet ids of received QoS 2 messages awaiting PUBREL.
    incoming_qos2: HashSet<u16>,
    inbox: Inbox,
    counters: Arc<Counters>,
}

/// How a driven connection ended.
#[derive(Debug)]
pub struct Outcome {
    /// Messages published (sequence numbers `0..sent`).
    pub sent: u64,
    /// Messages published since the plan's `measure_from`.
    pub sent_measured: u64,
    /// QoS 1/2 messages acknowledged successfully.
    pub acked: u64,
    /// QoS 1/2 messages refused by the broker (PUBACK/PUBREC reason code ≥ 0x80).
    pub rejected: u64,
    /// QoS 1/2 messages still unacknowledged at the end.
    pub unacked: u32,
    pub inbox: Inbox,
    /// Why the connection ended early, if it did.
    pub error: Option<anyhow::Error>,
}

/// Runs one connection until its plan is complete and acknowledged (publishers) or until the
/// stop signal (everyone), then disconnects.
pub struct Driver {
    stream: TcpStream,
    keep_alive: u16,
    state: State,
    stop: watch::Receiver<bool>,
}

impl Driver {
    /// A driver for `conn` that records what it receives in `inbox`. It stops when `stop`
    /// becomes true (or its sender is dropped).
    pub fn new(
        conn: Conn,
        stop: watch::Receiver<bool>,
        counters: Arc<Counters>,
        inbox: Inbox,
    ) -> Self {
        Driver {
            stream: conn.stream,
            keep_alive: conn.keep_alive,
            state: State {
                bufs: conn.bufs,
                plan: None,
                out: Outbound::default(),
                incoming_qos2: HashSet::new(),
                inbox,
                counters,
            },
            stop,
        }
    }

    /// Publishes according to `plan`; the driver then ends once the plan is complete and every
    /// message acknowledged.
    pub fn publishing(mut self, plan: Plan) -> Self {
        self.state.plan = Some(plan);
        self
    }

    /// Sends `packet` first (e.g. a SUBSCRIBE whose SUBACK the driver will check).
    pub fn sending(mut self, packet: &Packet) -> Result<Self> {
        self.state.bufs.queue(packet)?;
        Ok(self)
    }

    /// Runs the connection to its end.
    pub async fn run(mut self) -> Outcome {
        let error = self.drive().await.err();
        let State { out, inbox, .. } = self.state;
        Outcome {
            sent: out.sent,
            sent_measured: out.sent_measured,
            acked: out.acked,
            rejected: out.rejected,
            unacked: out.inflight,
            inbox,
            error,
        }
    }

    async fn drive(&mut self) -> Result<()> {
        let Driver {
            stream,
            keep_alive,
            state,
            stop,
        } = self;
        // Ping when nothing was sent for half the keep alive.
        let ping_every = (*keep_alive > 0).then(|| Duration::from_secs(u64::from(*keep_alive)) / 2);
        let far = Duration::from_secs(86_400);
        let mut last_write = Instant::now();
        let ping = tokio::time::sleep(ping_every.unwrap_or(far));
        let pace = tokio::time::sleep(far);
        tokio::pin!(ping, pace);
        let mut pace_at = None;
        let mut stopping = *stop.borrow();
        while !stopping {
            let now = Instant::now();
            let blocked = state.fill(now)?;
            if !state.bufs.write.is_empty() && write_some(stream, &mut state.bufs.write)? {
                last_write = now;
            }
            if blocked == Blocked::Done && state.finished() {
                break;
            }
            if let Blocked::Pace(at) = blocked
                && (pace_at != Some(at) || pace.is_elapsed())
            {
                pace.as_mut().reset(at.into());
                pace_at = Some(at);
            }
            // The buffer drained at once: publish more after letting other tasks run.
            let more = blocked == Blocked::Full && state.bufs.write.len() < HIGH_WATER;
            let room = state.bufs.reserve_read();
            tokio::select! {
                _ = stop.changed() => stopping = true,
                ready = stream.readable() => {
                    ready?;
                    match stream.try_read_buf(&mut state.bufs.read) {
                        Ok(0) => bail!("the broker closed the connection"),
                        Ok(n) => {
                            state.bufs.read_done(n, room);
                            state.handle_input(Instant::now())?;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e).context("reading from the broker"),
                    }
                }
                ready = stream.writable(), if !state.bufs.write.is_empty() => ready?,
                () = &mut pace, if matches!(blocked, Blocked::Pace(_)) => {}
                () = &mut ping, if ping_every.is_some() => {
                    let every = ping_every.unwrap_or(far);
                    let now = Instant::now();
                    let next = if now >= last_write + every {
                        state.bufs.queue(&Packet::PingReq)?;
                        now + every
                    } else {
                        last_write + every
                    };
                    ping.as_mut().reset(next.into());
                }
                () = tokio::task::yield_now(), if more => {}
            }
        }
        state
            .bufs
            .queue(&Packet::Disconnect(Disconnect::default()))?;
        close(stream, &mut state.bufs.write).await
    }
}

/// One non-blocking write of `buf`; true if anything was written.
fn write_some(stream: &TcpStream, buf: &mut BytesMut) -> Result<bool> {
    match stream.try_write(buf) {
        Ok(n) => {
            buf.advance(n);
            Ok(n > 0)
        }
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e).context("writing to the broker"),
    }
}

impl State {
    /// True for a publisher whose plan is complete, acknowledged and written.
    fn finished(&self) -> bool {
        self.plan.is_some() && self.out.inflight == 0 && self.bufs.write.is_empty()
    }

    /// Encodes the publishes that are due, until something blocks.
    fn fill(&mut self, now: Instant) -> Result<Blocked> {
        let Some(plan) = &self.plan else {
            return Ok(Blocked::Done);
        };
        let sent_ns = timestamp(now);
        let measured = now >= plan.measure_from;
        let before = self.out.sent;
        let blocked = loop {
            let seq = self.out.sent;
            if plan.count.is_some_and(|c| seq >= c) || plan.until.is_some_and(|u| now >= u) {
                break Blocked::Done;
            }
            if self.bufs.write.len() >= HIGH_WATER {
                break Blocked::Full;
            }
            if plan.qos != QoS::AtMostOnce && self.out.inflight >= u32::from(plan.window) {
                break Blocked::Window;
            }
            if let Some(rate) = plan.rate {
                let due = plan.start + Duration::from_secs_f64(seq as f64 / rate);
                if due > now {
                    break Blocked::Pace(plan.until.map_or(due, |u| due.min(u)));
                }
            }
            let payload = match plan.payload {
                Some(len) => Stamp {
                    run: plan.run,
                    publisher: plan.publisher,
                    seq,
                    sent_ns,
                }
                .to_payload(len),
                None => bytes::Bytes::new(),
            };
            let topic = &plan.topics[(seq % plan.topics.len() as u64) as usize];
            let packet_id = (plan.qos != QoS::AtMostOnce).then(|| self.out.allocate());
            self.bufs.queue(&Packet::Publish(Publish {
                dup: false,
                qos: plan.qos,
                retain: plan.retain,
                topic: topic.clone(),
                packet_id,
                properties: PublishProperties::default(),
                payload,
            }))?;
            self.out.sent += 1;
            self.out.sent_measured += u64::from(measured);
        };
        self.counters
            .sent
            .fetch_add(self.out.sent - before, Relaxed);
        Ok(blocked)
    }

    /// Handles every complete packet in the read buffer.
    fn handle_input(&mut self, now: Instant) -> Result<()> {
        let mut received = 0;
        while let Some(packet) = self.bufs.next_packet()? {
            match packet {
                Packet::Publish(publish) => received += u64::from(self.on_publish(publish, now)?),
                Packet::PubAck(r) => self.on_puback(r)?,
                Packet::PubRec(r) => self.on_pubrec(r)?,
                Packet::PubComp(r) => self.on_pubcomp(r)?,
                Packet::PubRel(r) => {
                    self.incoming_qos2.remove(&r.packet_id.get());
                    self.bufs
                        .queue(&Packet::PubComp(PubResponse::success(r.packet_id)))?;
                }
                Packet::SubAck(ack) => check_suback(&ack)?,
                Packet::PingResp | Packet::UnsubAck(_) => {}
                Packet::Disconnect(d) => bail!("the broker disconnected: {}", d.reason_code),
                other => bail!("unexpected {:?} from the broker", other.packet_type()),
            }
        }
        self.counters.received.fetch_add(received, Relaxed);
        Ok(())
    }

    /// Acknowledges and records a message; true for a first receipt.
    fn on_publish(&mut self, publish: Publish, now: Instant) -> Result<bool> {
        if let Some(id) = publish.packet_id {
            match publish.qos {
                QoS::AtLeastOnce => self.bufs.queue(&Packet::PubAck(PubResponse::success(id)))?,
                QoS::ExactlyOnce => {
                    self.bufs.queue(&Packet::PubRec(PubResponse::success(id)))?;
                    // A resend before PUBREL is the same message: deliver it once.
                    if !self.incoming_qos2.insert(id.get()) {
                        return Ok(false);
                    }
                }
                QoS::AtMostOnce => {}
            }
        }
        Ok(self.inbox.record(&publish.payload, now))
    }

    fn our_qos(&self) -> QoS {
        self.plan.as_ref().map_or(QoS::AtMostOnce, |p| p.qos)
    }

    fn on_puback(&mut self, r: PubResponse) -> Result<()> {
        if self.our_qos() != QoS::AtLeastOnce || *self.out.slot(r.packet_id) != Slot::AwaitAck {
            bail!(
                "PUBACK for packet id {} which is not in flight",
                r.packet_id
            );
        }
        self.out.complete(r.packet_id, r.reason_code.is_success());
        Ok(())
    }

    fn on_pubrec(&mut self, r: PubResponse) -> Result<()> {
        if self.our_qos() != QoS::ExactlyOnce || *self.out.slot(r.packet_id) != Slot::AwaitAck {
            bail!(
                "PUBREC for packet id {} which is not in flight",
                r.packet_id
            );
        }
        if r.reason_code.is_success() {
            *self.out.slot(r.packet_id) = Slot::AwaitComp;
            self.bufs
                .queue(&Packet::PubRel(PubResponse::success(r.packet_id)))
        } else {
            self.out.complete(r.packet_id, false);
            Ok(())
        }
    }

    fn on_pubcomp(&mut self, r: PubResponse) -> Result<()> {
        if *self.out.slot(r.packet_id) != Slot::AwaitComp {
            bail!(
                "PUBCOMP for packet id {} which is not in flight",
                r.packet_id
            );
        }
        self.out.complete(r.packet_id, true);
        Ok(())
    }
}
