//! Chaos: nodes killed with `-9`, cut off by partitions and paused with SIGSTOP (the leader,
//! the subscribers' and the publishers' nodes) under a steady durable QoS 1 and QoS 2 load,
//! with clients reconnecting to other nodes and clients whose wills must fire exactly when due.
//! Bounded: `RAFTMQ_CHAOS_SECONDS` (default 60) of faults, then at most a minute of draining.
//!
//! # The clients
//!
//! - `pub-chaos` publishes `msg-N` at QoS 1 (clean session) and `chaos-q2-pub` publishes
//!   `q2-N` at QoS 2 from a persistent session, one message at a time, each moving to the next
//!   node when its connection fails; the QoS 2 publisher resumes an exchange in flight after a
//!   reconnect (PUBLISH again with DUP and the same packet id before PUBREC, PUBREL after).
//! - `chaos-sub-1` and `chaos-sub-2` (persistent sessions) subscribe to both topics and to the
//!   wills; `chaos-will-watch` (persistent) to the wills only. They reconnect with clean start
//!   0 whenever their connection ends and keep their QoS 2 receive state across connections.
//! - `chaos-will-persistent` (session expiry 1 h, QoS 1 will) and `chaos-will-clean` (session
//!   expiry 0, QoS 2 will), will delay 0, connect anew before every fault to the node it hits,
//!   each connection with a will payload of its own; a connection the previous fault left open
//!   is ended first, with DISCONNECT (no will) or without (the will is due).
//!
//! # The faults
//!
//! Rounds, each: load without faults for 2-4 s; one fault from a rotation that goes through
//! every kind once per cycle, in an order drawn anew for each cycle: kill -9 of the leader, of a
//! subscriber's node or of a publisher's node (down 3-8 s, and until the others have declared
//! it down, then restarted on its data dir); a partition cutting the leader or a subscriber's
//! node off from the other two (8-15 s, shorter and longer than the 10 s after which the
//! majority declares it down); SIGSTOP of the leader or a subscriber's node for 2-8 s (SIGCONT
//! from a drop guard, so a failing test leaves no process stopped); a slow disk on the leader
//! for 3-8 s, every synced Raft log write stalled by 0.1-2 s (`cluster.disk_faults_file`,
//! removed by a drop guard). Then the cluster must converge before the next round.
//!
//! # Processes or containers
//!
//! By default the three nodes are processes and a partition is made inside them, by the
//! nodes' `cluster.faults_file`. With `RAFTMQ_CHAOS_DOCKER=1` they are containers of an image
//! built offline from the same executable (`deploy/docker/build-image.sh`), each on two Docker
//! networks of the run's own: a partition takes the node off the cluster network with `docker
//! network disconnect` (a real network cut: its peers' connections hang), while clients keep
//! reaching it through the other; kill -9 is `docker kill -s KILL` then `docker start`, a
//! pause `docker pause`, and the slow disk the same file in a bind-mounted directory. The
//! schedule, the load and the checker are the same; see [`cluster`] and
//! [`raftmq_tests::docker`]. Docker must answer: without it the run fails, saying so. The
//! containers, networks, volumes and image are removed at the end, also when the test fails.
//!
//! # Seed and replay
//!
//! `RAFTMQ_CHAOS_SEED` (a u64; default: from the clock) seeds the schedule: the order of the
//! faults, which subscriber or publisher a round targets, the gaps and durations, and how the
//! will clients end their connections. The seed is printed at the start and in every failure
//! message; `RAFTMQ_CHAOS_SEED=<seed> cargo test -p raftmq --test durability chaos` replays the
//! same rounds (which node is the leader, and the timing of the load, still vary).
//!
//! # Known gaps
//!
//! A violation of a rule listed in [`KNOWN_GAPS`] (documented in docs/reliability.md) is
//! printed and the history saved, but fails the run only with `RAFTMQ_CHAOS_STRICT=1`.
//!
//! # The verdict, and a saved history
//!
//! Every client records what it does and sees into one [`History`] (see
//! [`raftmq_tests::history`] for the recording discipline): connects with session present,
//! publish attempts before they are sent, every acknowledgement with its reason code, every
//! delivery with its packet id and DUP flag, PUBRELs read, and connection ends (graceful or
//! not). When the run is over the history checker decides: every acknowledged QoS 1/2 message
//! reached every persistent subscriber, QoS 2 was delivered once (protocol resends told apart
//! by packet id), order per publisher and topic, session present, and every will published
//! exactly once after an ungraceful end and never otherwise. The per-subscriber summary lines
//! and the checker's counts are printed.
//!
//! A failing run saves its history as JSON lines under the target directory's `tmp/`
//! (`chaos-history-<seed>-<time>.jsonl`; the path is printed); `RAFTMQ_CHAOS_HISTORY=<path>`
//! saves it there in any case. One event per line, in order (`seq`, `at_us`, `client`,
//! `event`, ...), so `grep`/`jq` find a message's story, e.g.
//! `jq -c 'select(.payload == "q2-17" or .client == "chaos-sub-1")' <file>`, and
//! `raftmq_tests::history::History::load(path)` followed by `raftmq_tests::history::check`
//! checks it again offline.

mod cluster;

use super::*;
use cluster::ChaosCluster;
use raftmq_codec::PacketId;
use raftmq_tests::Rng;
use raftmq_tests::history::{self, AckKind, Event, History};
use raftmq_tests::process::cluster_views;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// [`wait_converged`]; if the nodes do not converge, fails the run after recording why: how
/// every node's applied index moved over 20 more seconds (a follower catching up slowly, or
/// not at all), each node's metrics and full log and the history so far (saved next to the
/// history files, the paths printed), the tails of the logs and any hung process's stacks.
async fn converged_or_logs(
    cluster: &mut ChaosCluster,
    seed: u64,
    history: &History,
    kills: &[String],
) -> u64 {
    let ports = &cluster.http_ports();
    match tokio::time::timeout(
        START_TIMEOUT - Duration::from_secs(5),
        wait_converged(ports, 3),
    )
    .await
    {
        Ok(leader) => leader,
        Err(_) => {
            let views = cluster_views(ports).await;
            // Progress: (leader, last log index, last applied) per node, every 2 s.
            let mut progress = String::new();
            for _ in 0..10 {
                let row: Vec<String> = cluster_views(ports)
                    .await
                    .iter()
                    .map(|v| match v {
                        Some(v) => format!(
                            "leader {} log {} applied {}",
                            v["leader"], v["last_log_index"], v["last_applied"]
                        ),
                        None => "no answer".to_owned(),
                    })
                    .collect();
                progress += &format!("  {row:?}\n");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            let processes = cluster.states().await;
            // A node that is running but does not answer: its threads' stacks, if gdb is here.
            let mut stacks = String::new();
            for (i, view) in views.iter().enumerate() {
                if view.is_none()
                    && let Some(pid) = cluster.running_pid(i).await
                    && let Ok(out) = std::process::Command::new("timeout")
                        .args(["60", "gdb", "-p", &pid.to_string(), "-batch"])
                        .args(["-ex", "thread apply all bt 25"])
                        .output()
                {
                    stacks += &String::from_utf8_lossy(&out.stdout);
                }
            }
            let kept = keep_evidence(cluster, &format!("{seed}-nonconverged")).await;
            let path = history_path(&format!("{seed}-nonconverged"));
            let saved = match history.save(&path) {
                Ok(()) => format!("history saved to {}", path.display()),
                Err(e) => format!("history could not be saved to {}: {e}", path.display()),
            };
            let mut logs = String::new();
            for i in 0..cluster.len() {
                logs += &cluster.log_tail(i, 40).await;
            }
            panic!(
                "cluster did not converge (replay with RAFTMQ_CHAOS_SEED={seed}; faults: \
                 {kills:?}): {views:?}\nprogress over 20 s:\n{progress}processes (exit \
                 status): {processes:?}\n{saved}; {kept}\n{logs}\n{stacks}"
            )
        }
    }
}

/// Copies every node's full log (a container's: `docker logs`), RocksDB's own logs and its
/// current metrics into a new directory beside the saved histories
/// (`chaos-evidence-<tag>-<time>/`); says where, or why not.
async fn keep_evidence(cluster: &ChaosCluster, tag: &str) -> String {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-evidence-{tag}-{stamp}"));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        return format!("node logs not kept ({}: {e})", dir.display());
    }
    for (i, port) in cluster.http_ports().into_iter().enumerate() {
        let id = cluster.id(i);
        let _ = std::fs::write(dir.join(format!("n{id}.log")), cluster.log(i).await);
        // RocksDB's own logs (compaction and write-stall statistics), wherever they are.
        cluster.copy_store_logs(i, &dir).await;
        let (status, metrics) =
            tokio::time::timeout(Duration::from_secs(5), http_get(port, "/metrics"))
                .await
                .unwrap_or((0, String::new()));
        if status == 200 {
            let _ = std::fs::write(dir.join(format!("n{id}.metrics")), metrics);
        }
    }
    format!("node logs and metrics kept in {}", dir.display())
}

#[derive(Default)]
struct ChaosState {
    acked: BTreeSet<u32>,
    received: BTreeMap<String, Vec<u32>>,
    /// QoS 2: acknowledged (PUBREC) by the broker, and received by each subscriber (counting
    /// a PUBLISH once per exchange, as an MQTT receiver does).
    acked_q2: BTreeSet<u32>,
    received_q2: BTreeMap<String, Vec<u32>>,
    /// Index of the node each client is connected to (usize::MAX: none).
    node_of: BTreeMap<String, usize>,
    publish_reconnects: u32,
    subscriber_reconnects: u32,
}

type Shared = Arc<std::sync::Mutex<ChaosState>>;
/// Set when the load (or the subscribers) should stop.
type Stop = Arc<AtomicBool>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, ChaosState> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Connects `id` to `addr` (MQTT 5, keep alive 60 s) and records the outcome in `history`:
/// `Connect` on a successful CONNACK, `ConnectRefused` on a failure code, `ConnectFailed` when
/// the CONNECT may have been sent but no CONNACK was read (nothing when the socket did not
/// open: the broker saw nothing). Returns the client and session present.
async fn connect_recorded(
    history: &History,
    addr: SocketAddr,
    id: &str,
    clean_start: bool,
    expiry: u32,
    will: Option<history::Will>,
) -> Option<(RawClient, bool)> {
    let mut connect = connect_v5(id, clean_start, expiry);
    connect.keep_alive = 60;
    if let Some(w) = &will {
        connect.will = Some(raftmq_codec::Will {
            topic: w.topic.as_str().into(),
            payload: bytes::Bytes::from(w.payload.clone()),
            qos: QoS::from_u8(w.qos).expect("will QoS 0-2"),
            retain: false,
            properties: raftmq_codec::WillProperties {
                will_delay_interval: (w.delay_secs > 0).then_some(w.delay_secs),
                ..Default::default()
            },
        });
    }
    let stream =
        match tokio::time::timeout(CONNECT_WAIT, tokio::net::TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            _ => return None,
        };
    let _ = stream.set_nodelay(true);
    let mut c = RawClient::over(stream, ProtocolVersion::V5);
    let answer = match c.try_send(&Packet::Connect(Box::new(connect))).await {
        Ok(()) => c.recv_within(CONNECT_WAIT).await,
        Err(_) => Err(()),
    };
    match answer {
        Ok(Some(Packet::ConnAck(ack))) if ack.reason_code == ReasonCode::SUCCESS => {
            history.record(
                id,
                Event::Connect {
                    clean_start,
                    session_expiry: expiry,
                    session_present: ack.session_present,
                    will,
                },
            );
            Some((c, ack.session_present))
        }
        Ok(Some(Packet::ConnAck(ack))) => {
            history.record(
                id,
                Event::ConnectRefused {
                    clean_start,
                    session_expiry: expiry,
                    code: ack.reason_code.0,
                },
            );
            None
        }
        _ => {
            history.record(
                id,
                Event::ConnectFailed {
                    clean_start,
                    session_expiry: expiry,
                },
            );
            None
        }
    }
}

/// Ends `c` with a normal DISCONNECT and records the end (graceful only if it was sent).
async fn disconnect_recorded(history: &History, id: &str, mut c: RawClient) {
    let graceful = c
        .try_send(&Packet::Disconnect(Default::default()))
        .await
        .is_ok();
    drop(c);
    history.record(id, Event::ConnectionEnd { graceful });
}

/// Records the end of the connection (lost, given up, or ended by the test) and drops `c`.
fn lost_recorded(history: &History, id: &str, c: RawClient) {
    // Recorded before the socket closes: when the test ends the connection, the broker
    // publishes the will as soon as it sees the close, and a subscriber may record that will
    // before this task would record an end made after the drop (the checker's `will_early`,
    // seen once in a 30-minute run, 0.7 ms apart). A connection the broker closed is closed
    // already: the order does not matter then.
    history.record(id, Event::ConnectionEnd { graceful: false });
    drop(c);
}

/// The client ids of the QoS 1 and the QoS 2 publisher.
const PUBLISHERS: [&str; 2] = ["pub-chaos", "chaos-q2-pub"];

/// Publishes msg-0, msg-1, ... (QoS 1, one at a time, packet id 1) from a clean session until
/// `stop`, moving to the next node whenever a publish is not acknowledged; an unacknowledged
/// number is retried (the same message: the same payload).
async fn chaos_publisher(addrs: Vec<SocketAddr>, history: Arc<History>, state: Shared, stop: Stop) {
    let id = PUBLISHERS[0];
    let mut n = 0u32;
    let mut node = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let Some((mut c, _)) = connect_recorded(&history, addrs[node], id, true, 0, None).await
        else {
            node = (node + 1) % addrs.len();
            lock(&state).publish_reconnects += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        lock(&state).node_of.insert(id.to_owned(), node);
        loop {
            if stop.load(Ordering::Relaxed) {
                disconnect_recorded(&history, id, c).await;
                return;
            }
            let payload = format!("msg-{n}");
            history.record(id, Event::publish(&payload, "chaos/load", 1, Some(1)));
            let sent = c
                .try_send(&publish("chaos/load", 1, payload.clone(), false))
                .await;
            let ack = match sent {
                Ok(()) => match c.recv_within(Duration::from_secs(6)).await {
                    Ok(Some(Packet::PubAck(a))) => Some(a),
                    _ => None,
                },
                Err(_) => None,
            };
            let acked = match &ack {
                Some(a) => {
                    history.record(
                        id,
                        Event::PublishAck {
                            payload: payload.clone(),
                            packet_id: a.packet_id.get(),
                            kind: AckKind::Puback,
                            reason: a.reason_code.0,
                        },
                    );
                    a.reason_code.is_success()
                }
                None => {
                    history.record(id, Event::PublishFailed { payload });
                    false
                }
            };
            if !acked {
                lost_recorded(&history, id, c);
                lock(&state).node_of.insert(id.to_owned(), usize::MAX);
                node = (node + 1) % addrs.len();
                lock(&state).publish_reconnects += 1;
                break;
            }
            lock(&state).acked.insert(n);
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// The QoS 2 PUBLISH of q2-`k` with packet id `pid`.
fn q2_packet(pid: PacketId, k: u32, dup: bool) -> Packet {
    let payload = format!("q2-{k}");
    let mut p = publish_packet(
        "chaos2/load",
        QoS::ExactlyOnce,
        pid.get(),
        payload.as_bytes(),
    );
    p.dup = dup;
    Packet::Publish(p)
}

/// Publishes q2-0, q2-1, ... at QoS 2, one exchange at a time, from a persistent session, until
/// `stop`. On a reconnect (to the next node) it resumes the exchange in flight as MQTT requires:
/// PUBLISH again with DUP and the same packet id before PUBREC, PUBREL after it. A message
/// counts as acknowledged at PUBREC.
async fn chaos_publisher_qos2(
    addrs: Vec<SocketAddr>,
    history: Arc<History>,
    state: Shared,
    stop: Stop,
) {
    let id = PUBLISHERS[1];
    let mut n = 0u32;
    let mut node = 1usize;
    // (packet id, number, PUBREC received)
    let mut in_flight: Option<(PacketId, u32, bool)> = None;
    'outer: while !stop.load(Ordering::Relaxed) || in_flight.is_some_and(|f| f.2) {
        let Some((mut c, _)) = connect_recorded(&history, addrs[node], id, false, 3600, None).await
        else {
            node = (node + 1) % addrs.len();
            lock(&state).publish_reconnects += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        lock(&state).node_of.insert(id.to_owned(), node);
        let mut resumed = true;
        if let Some((pid, k, released)) = in_flight {
            let resend = if released {
                Packet::PubRel(PubResponse::success(pid))
            } else {
                history.record(
                    id,
                    Event::PublishAttempt {
                        payload: format!("q2-{k}"),
                        topic: "chaos2/load".to_owned(),
                        qos: 2,
                        packet_id: Some(pid.get()),
                        dup: true,
                    },
                );
                q2_packet(pid, k, true)
            };
            resumed = c.try_send(&resend).await.is_ok();
        }
        if resumed {
            loop {
                if in_flight.is_none() {
                    if stop.load(Ordering::Relaxed) {
                        disconnect_recorded(&history, id, c).await;
                        break 'outer;
                    }
                    let pid =
                        PacketId::new(u16::try_from(n % 60_000 + 1).unwrap_or(1)).expect("nonzero");
                    in_flight = Some((pid, n, false));
                    history.record(
                        id,
                        Event::publish(&format!("q2-{n}"), "chaos2/load", 2, Some(pid.get())),
                    );
                    if c.try_send(&q2_packet(pid, n, false)).await.is_err() {
                        break;
                    }
                }
                let Some((pid, k, _)) = in_flight else { break };
                let ack = |kind, reason: ReasonCode| Event::PublishAck {
                    payload: format!("q2-{k}"),
                    packet_id: pid.get(),
                    kind,
                    reason: reason.0,
                };
                match c.recv_within(Duration::from_secs(6)).await {
                    Ok(Some(Packet::PubRec(r))) if r.packet_id == pid => {
                        history.record(id, ack(AckKind::Pubrec, r.reason_code));
                        if !r.reason_code.is_success() {
                            // Refused (not routed): the same number again as a new message.
                            in_flight = None;
                            continue;
                        }
                        lock(&state).acked_q2.insert(k);
                        in_flight = Some((pid, k, true));
                        if c.try_send(&Packet::PubRel(PubResponse::success(pid)))
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    Ok(Some(Packet::PubComp(r))) if r.packet_id == pid => {
                        history.record(id, ack(AckKind::Pubcomp, r.reason_code));
                        in_flight = None;
                        n += 1;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) | Err(()) => break,
                }
            }
        }
        if let Some((_, k, false)) = in_flight {
            history.record(
                id,
                Event::PublishFailed {
                    payload: format!("q2-{k}"),
                },
            );
        }
        lost_recorded(&history, id, c);
        lock(&state).node_of.insert(id.to_owned(), usize::MAX);
        lock(&state).publish_reconnects += 1;
        node = (node + 1) % addrs.len();
    }
}

/// Creates the persistent session `id` (clean start, session expiry 1 h) on `addr` with
/// `filters`, then ends the connection normally; recorded in `history`.
async fn persistent_subscriber(
    history: &History,
    addr: SocketAddr,
    id: &str,
    filters: &[(&str, QoS)],
) {
    let (mut c, _) = connect_recorded(history, addr, id, true, 3600, None)
        .await
        .expect("CONNACK success");
    for (filter, qos) in filters {
        c.subscribe(filter, *qos).await;
        history.record(id, Event::subscribe(filter, qos.as_u8()));
    }
    disconnect_recorded(history, id, c).await;
}

/// A persistent subscriber: reconnects (clean start off) to the next node whenever its
/// connection ends, records what it receives, acknowledges everything.
async fn chaos_subscriber(
    id: String,
    addrs: Vec<SocketAddr>,
    first: usize,
    history: Arc<History>,
    state: Shared,
    stop: Stop,
) {
    let mut node = first;
    // QoS 2 packet ids received and not yet released: a PUBLISH with one of them is the same
    // message again (client-side session state, kept across reconnections).
    let mut unreleased: BTreeSet<u16> = BTreeSet::new();
    while !stop.load(Ordering::Relaxed) {
        let Some((mut c, present)) =
            connect_recorded(&history, addrs[node], &id, false, 3600, None).await
        else {
            node = (node + 1) % addrs.len();
            lock(&state).subscriber_reconnects += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        if !present {
            // No session on the broker: the client's session state goes too (MQTT 5
            // §4.1). It should never happen here; the checker reports it.
            unreleased.clear();
        }
        lock(&state).node_of.insert(id.clone(), node);
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            match c.recv_within(Duration::from_millis(500)).await {
                Ok(Some(Packet::Publish(p))) => {
                    history.record(
                        &id,
                        Event::Delivery {
                            payload: String::from_utf8_lossy(&p.payload).into_owned(),
                            topic: p.topic.to_string(),
                            qos: p.qos.as_u8(),
                            packet_id: p.packet_id.map(PacketId::get),
                            dup: p.dup,
                            retain: p.retain,
                        },
                    );
                    let Some(pid) = p.packet_id else { continue };
                    let answer = if p.qos == QoS::ExactlyOnce {
                        if unreleased.insert(pid.get())
                            && let Some(k) = std::str::from_utf8(&p.payload)
                                .ok()
                                .and_then(|s| s.strip_prefix("q2-")?.parse().ok())
                        {
                            lock(&state)
                                .received_q2
                                .entry(id.clone())
                                .or_default()
                                .push(k);
                        }
                        Packet::PubRec(PubResponse::success(pid))
                    } else {
                        if let Some(k) = number(&p.payload) {
                            lock(&state).received.entry(id.clone()).or_default().push(k);
                        }
                        Packet::PubAck(PubResponse::success(pid))
                    };
                    if c.try_send(&answer).await.is_err() {
                        break;
                    }
                }
                Ok(Some(Packet::PubRel(r))) => {
                    history.record(
                        &id,
                        Event::Released {
                            packet_id: r.packet_id.get(),
                        },
                    );
                    unreleased.remove(&r.packet_id.get());
                    if c.try_send(&Packet::PubComp(PubResponse::success(r.packet_id)))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                Ok(Some(_)) | Err(()) => {}
                Ok(None) => break,
            }
        }
        lost_recorded(&history, &id, c);
        lock(&state).node_of.insert(id.clone(), usize::MAX);
        lock(&state).subscriber_reconnects += 1;
        node = (node + 1) % addrs.len();
    }
}

/// How the test ends a will client's connection that is still open.
#[derive(Clone, Copy, Debug)]
enum EndHow {
    /// DISCONNECT with reason 0x00: the will is discarded.
    Graceful,
    /// The socket is closed without DISCONNECT: the will is due.
    Abrupt,
}

/// A client with a will (delay 0) that the test connects anew every round, to the node the
/// round's fault hits. Each connection is a new "life" with its own will payload.
struct WillClient {
    id: &'static str,
    /// Session expiry: 0 (sessionless, clean start) or above (persistent, clean start 0).
    expiry: u32,
    qos: u8,
    lives: u32,
    /// The task owning the current connection, and how to tell it to end.
    life: Option<(
        tokio::sync::oneshot::Sender<EndHow>,
        tokio::task::JoinHandle<()>,
    )>,
}

impl WillClient {
    fn new(id: &'static str, expiry: u32, qos: u8) -> WillClient {
        WillClient {
            id,
            expiry,
            qos,
            lives: 0,
            life: None,
        }
    }

    /// Ends the current life: its connection, if still open, as `how`; returns once the end
    /// is recorded (so the next connect comes after it in the history).
    async fn end(&mut self, how: EndHow) {
        if let Some((tell, task)) = self.life.take() {
            let _ = tell.send(how);
            tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("a will client's connection ends within 15 s")
                .expect("the will client's task");
        }
    }

    /// Connects to `addr` with a new will; whether it is connected.
    async fn start(&mut self, history: &Arc<History>, addr: SocketAddr) -> bool {
        self.lives += 1;
        let will = history::Will {
            topic: format!("chaos-will/{}", self.id),
            payload: format!("will-{}-{}", self.id, self.lives),
            qos: self.qos,
            delay_secs: 0,
        };
        let clean_start = self.expiry == 0;
        let Some((c, _)) =
            connect_recorded(history, addr, self.id, clean_start, self.expiry, Some(will)).await
        else {
            return false;
        };
        let (tell, told) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(will_life(self.id, c, history.clone(), told));
        self.life = Some((tell, task));
        true
    }

    /// Stops watching the connection without recording anything (the teardown at the end of
    /// a run is not part of the history).
    fn abandon(&mut self) {
        if let Some((_, task)) = self.life.take() {
            task.abort();
        }
    }
}

/// One life of a will client: reads (and pings, keep alive 60 s) until the broker closes the
/// connection or the test ends it, and records the end.
async fn will_life(
    id: &'static str,
    mut c: RawClient,
    history: Arc<History>,
    mut told: tokio::sync::oneshot::Receiver<EndHow>,
) {
    use tokio::sync::oneshot::error::TryRecvError;
    let mut pinged = Instant::now();
    loop {
        match told.try_recv() {
            Ok(EndHow::Graceful) => return disconnect_recorded(&history, id, c).await,
            Ok(EndHow::Abrupt) | Err(TryRecvError::Closed) => {
                return lost_recorded(&history, id, c);
            }
            Err(TryRecvError::Empty) => {}
        }
        // Closed, or DISCONNECT from the broker (e.g. 0x9C from a node that lost its quorum,
        // 0x8E on a take-over): not a normal end, the will is due.
        if let Ok(None | Some(Packet::Disconnect(_))) =
            c.recv_within(Duration::from_millis(100)).await
        {
            return lost_recorded(&history, id, c);
        }
        if pinged.elapsed() > Duration::from_secs(20) {
            if c.try_send(&Packet::PingReq).await.is_err() {
                return lost_recorded(&history, id, c);
            }
            pinged = Instant::now();
        }
    }
}

/// Whether `cond` holds within `timeout` (checked every 100 ms).
async fn holds_within<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of the metric sample `name` on the node with HTTP port `port` (0 if absent or
/// the node does not answer).
async fn metric_on(port: u16, name: &str) -> f64 {
    let (status, body) = http_get(port, "/metrics").await;
    if status != 200 {
        return 0.0;
    }
    raftmq_tests::metrics::metric(&body, name).unwrap_or(0.0)
}

/// Nodes declared down so far, summed over the nodes with HTTP ports `ports`.
async fn declared_down(ports: &[u16]) -> f64 {
    let mut sum = 0.0;
    for p in ports {
        sum += metric_on(*p, "raftmq_cluster_nodes_declared_down_total").await;
    }
    sum
}

/// Waits (up to 10 s) until every node holds, for each other node `peer`, `expected(peer)`
/// wills of sessionless connections announced by that peer (what the node declaring `peer`
/// down would publish); whether they do. The will clients' are the only sessionless wills.
async fn wills_held(cluster: &ChaosCluster, expected: impl Fn(usize) -> usize) -> bool {
    let ports = cluster.http_ports();
    holds_within(Duration::from_secs(10), || async {
        for (holder, port) in ports.iter().enumerate() {
            for peer in 0..cluster.len() {
                let name = format!("raftmq_forward_peer_wills{{peer=\"{}\"}}", cluster.id(peer));
                #[allow(clippy::cast_precision_loss)]
                let want = expected(peer) as f64;
                if holder != peer && metric_on(*port, &name).await != want {
                    return false;
                }
            }
        }
        true
    })
    .await
}

/// What a round of the schedule does to its victim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// kill -9; restarted after the hold, once the cluster has declared it down.
    Kill,
    /// kill -9 and started again at once (within the hold, at most 0.5 s), as a supervisor or
    /// Kubernetes does: usually before the cluster can declare it down, so the new process
    /// publishes the sessionless wills its peers kept of the old one.
    Restart,
    /// Cut off from the other two nodes (clients still reach it) for the hold.
    Partition,
    /// SIGSTOP for the hold, then SIGCONT: a node that hangs, its sockets open.
    Pause,
    /// Every synced Raft log write of the node stalls (`cluster.disk_faults_file`) for the hold.
    StallDisk,
}

/// Whose node a round hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Leader,
    /// The node of one of the two persistent subscribers.
    Subscriber,
    /// The node of one of the two publishers (QoS 1, QoS 2).
    Publisher,
}

/// The faults the schedule goes through, each once per cycle, in an order drawn anew for
/// every cycle.
const ROTATION: &[(Fault, Target)] = &[
    (Fault::Kill, Target::Leader),
    (Fault::Kill, Target::Subscriber),
    (Fault::Kill, Target::Publisher),
    (Fault::Restart, Target::Leader),
    (Fault::Restart, Target::Subscriber),
    (Fault::Partition, Target::Leader),
    (Fault::Partition, Target::Subscriber),
    (Fault::Pause, Target::Leader),
    (Fault::Pause, Target::Subscriber),
    (Fault::StallDisk, Target::Leader),
];

/// One round, drawn from the seed before it starts (so a seed gives the same rounds whatever
/// the cluster does; which node is the leader, or a subscriber's, is still up to the run).
#[derive(Clone, Copy, Debug)]
struct Round {
    fault: Fault,
    target: Target,
    /// Which subscriber (or publisher) when the target is one.
    pick: usize,
    /// The victim when the target's node is not known (e.g. the subscriber is between nodes).
    fallback: usize,
    /// Load without faults before the fault.
    gap: Duration,
    /// How long the fault lasts (a killed node stays down at least this long).
    hold: Duration,
    /// How long each synced log write stalls (slow disk only).
    stall: Duration,
    /// How the will clients end the connections the previous round left open.
    will_end: EndHow,
}

/// The seeded sequence of rounds.
struct Schedule {
    rng: Rng,
    cycle: Vec<(Fault, Target)>,
}

impl Schedule {
    fn new(seed: u64) -> Schedule {
        Schedule {
            rng: Rng::new(seed),
            cycle: Vec::new(),
        }
    }

    /// A duration between `min` and `max` milliseconds.
    fn millis(&mut self, min: u64, max: u64) -> Duration {
        Duration::from_millis(min + self.rng.below(max - min + 1))
    }

    fn next_round(&mut self) -> Round {
        if self.cycle.is_empty() {
            self.cycle = ROTATION.to_vec();
            // Fisher-Yates, popped from the back.
            for i in (1..self.cycle.len()).rev() {
                let j = self.rng.below(i as u64 + 1) as usize;
                self.cycle.swap(i, j);
            }
        }
        let (fault, target) = self.cycle.pop().expect("a full cycle");
        let pick = self.rng.below(2) as usize;
        let fallback = self.rng.below(3) as usize;
        let gap = self.millis(2_000, 4_000);
        let hold = match fault {
            Fault::Kill => self.millis(3_000, 8_000),
            Fault::Restart => self.millis(0, 500),
            // Shorter and longer than the 10 s after which the majority declares it down.
            Fault::Partition => self.millis(8_000, 15_000),
            Fault::Pause => self.millis(2_000, 8_000),
            Fault::StallDisk => self.millis(3_000, 8_000),
        };
        let stall = match fault {
            Fault::StallDisk => self.millis(100, 2_000),
            _ => Duration::ZERO,
        };
        let will_end = if self.rng.below(2) == 0 {
            EndHow::Graceful
        } else {
            EndHow::Abrupt
        };
        Round {
            fault,
            target,
            pick,
            fallback,
            gap,
            hold,
            stall,
            will_end,
        }
    }
}

/// A node's disk made slow through its `cluster.disk_faults_file`; healthy again when dropped,
/// also when the test fails.
struct SlowDisk(PathBuf);

impl SlowDisk {
    /// Stalls every synced Raft log write of the node that reads `path` (its
    /// `cluster.disk_faults_file`) by `by`.
    fn stall(path: PathBuf, by: Duration) -> SlowDisk {
        std::fs::write(&path, by.as_millis().to_string()).expect("write the disk faults file");
        SlowDisk(path)
    }
}

impl Drop for SlowDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The seed of the schedule: `RAFTMQ_CHAOS_SEED`, else from the clock.
fn chaos_seed() -> u64 {
    match std::env::var("RAFTMQ_CHAOS_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("RAFTMQ_CHAOS_SEED={s:?} is not a u64")),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

/// Prints how to replay the run if the test fails (whatever panics).
struct ReplayHint(u64);

impl Drop for ReplayHint {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("chaos: failed; replay with RAFTMQ_CHAOS_SEED={}", self.0);
        }
    }
}

/// Prints what subscriber `id` got at `qos` against what was acknowledged.
fn report(id: &str, qos: &str, acked: &BTreeSet<u32>, got: &[u32]) {
    let distinct: BTreeSet<u32> = got.iter().copied().collect();
    println!(
        "chaos {id} {qos}: {} acknowledged, {} received ({} distinct, {} duplicates), {} missing",
        acked.len(),
        got.len(),
        distinct.len(),
        got.len() - distinct.len(),
        acked.difference(&distinct).count()
    );
}

/// Where a failing run's history goes: `RAFTMQ_CHAOS_HISTORY`, else a new file under the
/// target directory's `tmp/`.
fn history_path(tag: &str) -> PathBuf {
    if let Some(path) = std::env::var_os("RAFTMQ_CHAOS_HISTORY") {
        return PathBuf::from(path);
    }
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-history-{tag}-{stamp}.jsonl"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_kill_9_leader_and_subscriber_nodes_under_durable_load_loses_nothing_acknowledged() {
    let chaos_secs: u64 = std::env::var("RAFTMQ_CHAOS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let seed = chaos_seed();
    println!("chaos: seed {seed} (replay with RAFTMQ_CHAOS_SEED={seed}), {chaos_secs}s of faults");
    let _replay = ReplayHint(seed);
    let mut cluster = ChaosCluster::start().await;
    println!("chaos: on {}", cluster.describe());
    let ports = cluster.http_ports();
    let addrs = cluster.mqtt_addrs();
    let subs = ["chaos-sub-1", "chaos-sub-2"];
    let history = Arc::new(History::new());

    // Persistent sessions with their subscriptions, on nodes 2 and 3; they get the wills too.
    for (i, id) in subs.iter().enumerate() {
        persistent_subscriber(
            &history,
            addrs[i + 1],
            id,
            &[
                ("chaos/#", QoS::AtLeastOnce),
                ("chaos2/#", QoS::ExactlyOnce),
                ("chaos-will/#", QoS::ExactlyOnce),
            ],
        )
        .await;
    }
    // A persistent subscriber of the wills only, on node 1.
    let watcher = "chaos-will-watch";
    persistent_subscriber(
        &history,
        addrs[0],
        watcher,
        &[("chaos-will/#", QoS::ExactlyOnce)],
    )
    .await;
    wait_converged(&ports, 3).await;

    let state: Shared = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for (i, id) in [watcher].iter().chain(&subs).enumerate() {
        tasks.push(tokio::spawn(chaos_subscriber(
            id.to_string(),
            addrs.clone(),
            i,
            history.clone(),
            state.clone(),
            stop.clone(),
        )));
    }
    let stop_pub = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(chaos_publisher(
        addrs.clone(),
        history.clone(),
        state.clone(),
        stop_pub.clone(),
    ));
    let publisher_q2 = tokio::spawn(chaos_publisher_qos2(
        addrs.clone(),
        history.clone(),
        state.clone(),
        stop_pub.clone(),
    ));

    // Clients with a will (delay 0): a persistent session with a QoS 1 will, a sessionless
    // connection with a QoS 2 will.
    let mut will_clients = [
        WillClient::new("chaos-will-persistent", 3600, 1),
        WillClient::new("chaos-will-clean", 0, 2),
    ];

    // The schedule, in rounds drawn from the seed (see the module docs): wait, pick the victim,
    // move the will clients there (ending their connections with or without DISCONNECT), wait
    // until the peers know the sessionless will, inject the fault, hold it, heal, and wait
    // until the cluster has converged again.
    let end = Instant::now() + Duration::from_secs(chaos_secs);
    let mut schedule = Schedule::new(seed);
    let mut round = 0usize;
    let mut kills = Vec::new();
    while Instant::now() < end {
        let r = schedule.next_round();
        tokio::time::sleep(r.gap).await;
        let victim = match r.target {
            Target::Leader => {
                let leader = cluster_status(ports[0])
                    .await
                    .or(cluster_status(ports[1]).await)
                    .or(cluster_status(ports[2]).await)
                    .and_then(|v| v["leader"].as_u64());
                leader.and_then(|l| cluster.position(l))
            }
            Target::Subscriber => lock(&state).node_of.get(subs[r.pick]).copied(),
            Target::Publisher => lock(&state).node_of.get(PUBLISHERS[r.pick]).copied(),
        }
        .filter(|n| *n < cluster.len())
        .unwrap_or(r.fallback);
        let what = match r.target {
            Target::Leader => "leader".to_owned(),
            Target::Subscriber => format!("{}'s node", subs[r.pick]),
            Target::Publisher => format!("{}'s node", PUBLISHERS[r.pick]),
        };
        // Every will client ends its connection, then no node holds a sessionless will of
        // another; after connecting anew, the victim's peers hold exactly its sessionless
        // will (a will announced less than a tick before a crash may be lost, see
        // docs/cluster.md, "Node failure").
        for w in &mut will_clients {
            w.end(r.will_end).await;
        }
        if !wills_held(&cluster, |_| 0).await {
            println!(
                "chaos: round {round}: the nodes still hold sessionless wills 10 s after their \
                 connections ended"
            );
        }
        let mut sessionless = 0;
        for w in &mut will_clients {
            if w.start(&history, addrs[victim]).await && w.expiry == 0 {
                sessionless += 1;
            }
        }
        if !wills_held(&cluster, |p| if p == victim { sessionless } else { 0 }).await {
            println!(
                "chaos: round {round}: the sessionless wills of node {} were not announced to \
                 every peer within 10 s",
                cluster.id(victim)
            );
        }
        let id = cluster.id(victim);
        let stall = if r.fault == Fault::StallDisk {
            format!(" ({} ms per synced write)", r.stall.as_millis())
        } else {
            String::new()
        };
        kills.push(format!(
            "{round}: {:?} {what} {id} for {:.1}s{stall}",
            r.fault,
            r.hold.as_secs_f64()
        ));
        match r.fault {
            Fault::Partition => {
                cluster.cut_off(victim).await;
                tokio::time::sleep(r.hold).await;
                cluster.reconnect(victim).await;
            }
            Fault::StallDisk => {
                let healed = SlowDisk::stall(cluster.disk_faults_file(victim), r.stall);
                tokio::time::sleep(r.hold).await;
                drop(healed);
            }
            Fault::Pause => {
                cluster.pause(victim).await;
                tokio::time::sleep(r.hold).await;
                cluster.resume(victim).await;
            }
            Fault::Restart => {
                cluster.kill9(victim).await;
                tokio::time::sleep(r.hold).await;
                cluster.restart(victim).await;
            }
            Fault::Kill => {
                let survivors: Vec<u16> = (0..cluster.len())
                    .filter(|i| *i != victim)
                    .map(|i| ports[i])
                    .collect();
                let before = declared_down(&survivors).await;
                cluster.kill9(victim).await;
                tokio::time::sleep(r.hold).await;
                // This fault exercises the declaration (adoption, the declaring node's wills):
                // wait for it before restarting. `Fault::Restart` covers a restart before it.
                let declared = holds_within(Duration::from_secs(30), || async {
                    declared_down(&survivors).await > before
                })
                .await;
                if !declared {
                    println!("chaos: node {id} not declared down within 30 s of its kill");
                }
                cluster.restart(victim).await;
            }
        }
        converged_or_logs(&mut cluster, seed, &history, &kills).await;
        round += 1;
    }

    // Let the publishers finish their current message, then give subscribers time to drain:
    // until the checker finds nothing missing, for at most a minute.
    stop_pub.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(15), publisher).await;
    let _ = tokio::time::timeout(Duration::from_secs(15), publisher_q2).await;
    let (acked, acked_q2) = {
        let st = lock(&state);
        (st.acked.clone(), st.acked_q2.clone())
    };
    assert!(
        acked.len() > 50 && acked_q2.len() > 20,
        "the load barely ran: {} QoS 1 and {} QoS 2 acknowledged (replay with RAFTMQ_CHAOS_SEED={seed})",
        acked.len(),
        acked_q2.len()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = history::check(&history);
        let pending = r.counts.missing + r.of(history::Rule::WillMissing).count();
        if pending == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The subscribers and the will clients stop (their teardown is not recorded): the history
    // is complete.
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
    }
    for w in &mut will_clients {
        w.abandon();
    }
    let checked = history::check(&history);
    {
        let st = lock(&state);
        for id in subs {
            let none = Vec::new();
            report(id, "QoS 1", &acked, st.received.get(id).unwrap_or(&none));
            report(
                id,
                "QoS 2",
                &acked_q2,
                st.received_q2.get(id).unwrap_or(&none),
            );
        }
        println!(
            "chaos: seed {seed}, {} rounds in {chaos_secs}s ({kills:?}); publisher reconnects {}, subscriber reconnects {}",
            round, st.publish_reconnects, st.subscriber_reconnects
        );
    }
    let ends: Vec<bool> = history
        .events()
        .iter()
        .filter(|e| will_clients.iter().any(|w| w.id == e.client))
        .filter_map(|e| match e.event {
            Event::ConnectionEnd { graceful } => Some(graceful),
            _ => None,
        })
        .collect();
    println!(
        "chaos wills: {} connections with a will; {} ended with DISCONNECT, {} without",
        will_clients.iter().map(|w| w.lives).sum::<u32>(),
        ends.iter().filter(|g| **g).count(),
        ends.iter().filter(|g| !**g).count()
    );
    let c = &checked.counts;
    println!(
        "chaos checker: {} events, {} acknowledged, {} deliveries expected, {} missing, {} \
         duplicates, {} QoS 2 resends, {} QoS 2 duplicates, {} ordering checks, {} session \
         checks, {} wills checked, {} violations",
        c.events,
        c.acknowledged,
        c.expected_deliveries,
        c.missing,
        c.duplicates,
        c.resends,
        checked.of(history::Rule::Qos2Duplicate).count(),
        c.ordering_checks,
        c.session_checks,
        c.wills_checked,
        checked.violations.len()
    );
    // Violations of a rule with a known, documented gap fail the run only with
    // RAFTMQ_CHAOS_STRICT=1; they are always printed and the history saved.
    let strict = std::env::var_os("RAFTMQ_CHAOS_STRICT").is_some_and(|v| v == "1");
    let known: Vec<&history::Violation> = checked
        .violations
        .iter()
        .filter(|v| !strict && KNOWN_GAPS.contains(&v.rule))
        .collect();
    let failing = checked.violations.len() - known.len();
    if !known.is_empty() {
        println!(
            "chaos known gap (docs/reliability.md, not failing the run): {} violations of {:?}; \
             first: [{}] {} {}",
            known.len(),
            KNOWN_GAPS,
            known[0].rule,
            known[0].client,
            known[0].detail
        );
    }
    let save = std::env::var_os("RAFTMQ_CHAOS_HISTORY").is_some() || !checked.is_ok();
    let saved = save.then(|| {
        let path = history_path(&seed.to_string());
        match history.save(&path) {
            Ok(()) => format!("history saved to {}", path.display()),
            Err(e) => format!("history could not be saved to {}: {e}", path.display()),
        }
    });
    if let Some(saved) = &saved {
        println!("chaos: {saved}");
        println!(
            "chaos: {}",
            keep_evidence(&cluster, &seed.to_string()).await
        );
    }
    assert!(
        failing == 0,
        "the history checker found violations (replay with RAFTMQ_CHAOS_SEED={seed}; faults: \
         {kills:?}); {}\n{checked}",
        saved.unwrap_or_default()
    );
}

/// Rules whose violations are known gaps, documented in docs/reliability.md ("Known gaps"):
/// printed and saved but not failing a run unless `RAFTMQ_CHAOS_STRICT=1`. None: every rule
/// of the checker fails a run (`OutOfOrder` was one until the chained proposals of
/// docs/reliability.md, "Defects found and fixed").
const KNOWN_GAPS: &[history::Rule] = &[];

#[test]
fn a_seed_gives_the_same_schedule_and_every_cycle_has_every_fault_once() {
    let rounds = |seed| {
        let mut s = Schedule::new(seed);
        (0..3 * ROTATION.len())
            .map(|_| {
                let r = s.next_round();
                (
                    r.fault, r.target, r.pick, r.fallback, r.gap, r.hold, r.stall,
                )
            })
            .collect::<Vec<_>>()
    };
    let a = rounds(42);
    assert_eq!(a, rounds(42), "the same seed, the same rounds");
    assert_ne!(a, rounds(43), "another seed, other rounds");
    for cycle in a.chunks(ROTATION.len()) {
        let mut faults: Vec<String> = cycle
            .iter()
            .map(|r| format!("{:?} {:?}", r.0, r.1))
            .collect();
        faults.sort();
        let mut all: Vec<String> = ROTATION
            .iter()
            .map(|f| format!("{f:?}").replace(['(', ')', ','], ""))
            .collect();
        all.sort();
        assert_eq!(faults, all, "each cycle goes through the rotation once");
    }
    for r in &a {
        assert!(r.2 < 2 && r.3 < 3);
        assert!((2_000..=4_000).contains(&r.4.as_millis()));
        if r.0 == Fault::Restart {
            assert!(r.5 <= Duration::from_millis(500), "a restart at once");
        } else {
            assert!(r.5 >= Duration::from_secs(2) && r.5 <= Duration::from_secs(15));
        }
        assert_eq!(r.6.is_zero(), r.0 != Fault::StallDisk);
    }
}
