//! In-process multi-node clusters over real gRPC on loopback, with a fault-injecting network
//! ([`raftmq_cluster::network::FaultInjector`]): leader loss and re-election, a partitioned
//! minority refusing durable writes, healing, lossy and slow links, and a lagging node that
//! catches up from a snapshot.
//!
//! Each node is a real `RaftNode` (RocksDB store in a temp dir, tonic server on 127.0.0.1);
//! only the network between them is under the test's control. Durable writes go through the
//! same `Durability::propose` the broker uses.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use raftmq_cluster::grpc::routes;
use raftmq_cluster::network::{Fault, FaultInjector};
use raftmq_cluster::node::{NodeOptions, RaftNode, RaftTuning};
use raftmq_codec::ByteStr;
use raftmq_core::Broker;
use raftmq_core::auth::AllowAll;
use raftmq_core::config::MqttConfig;
use raftmq_core::durability::{Durability, DurabilityError, StateChange};
use raftmq_server::ClusterServer;
use raftmq_tests::TestBroker;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

type NodeId = u64;

// ---------------------------------------------------------------------------------------------
// The fault-injecting network
// ---------------------------------------------------------------------------------------------

/// Link rules between nodes. Directed: `cut(a, b)` loses a's messages to b only.
#[derive(Debug, Default)]
struct Net {
    rules: Mutex<Rules>,
    /// Messages seen, for the deterministic "drop every n-th" rule.
    seen: AtomicU64,
}

#[derive(Debug, Default)]
struct Rules {
    cut: HashSet<(NodeId, NodeId)>,
    delay: HashMap<(NodeId, NodeId), Duration>,
    drop_every: Option<u64>,
}

impl FaultInjector for Net {
    fn fault(&self, from: NodeId, to: NodeId) -> Fault {
        let rules = self.rules.lock();
        if rules.cut.contains(&(from, to)) {
            return Fault::Drop;
        }
        if let Some(n) = rules.drop_every
            && self.seen.fetch_add(1, Ordering::Relaxed) % n == n - 1
        {
            return Fault::Drop;
        }
        match rules.delay.get(&(from, to)) {
            Some(d) => Fault::Delay(*d),
            None => Fault::Deliver,
        }
    }
}

impl Net {
    /// Cuts every link between the two sides, both ways.
    fn partition(&self, a: &[NodeId], b: &[NodeId]) {
        let mut rules = self.rules.lock();
        for &x in a {
            for &y in b {
                rules.cut.insert((x, y));
                rules.cut.insert((y, x));
            }
        }
    }

    /// Cuts `node` off from every other node in `all`.
    fn isolate(&self, node: NodeId, all: &[NodeId]) {
        let others: Vec<NodeId> = all.iter().copied().filter(|&n| n != node).collect();
        self.partition(&[node], &others);
    }

    /// Delays every message between distinct nodes in `all` by `d`.
    fn delay_all(&self, all: &[NodeId], d: Duration) {
        let mut rules = self.rules.lock();
        for &x in all {
            for &y in all {
                if x != y {
                    rules.delay.insert((x, y), d);
                }
            }
        }
    }

    fn drop_every(&self, n: u64) {
        self.rules.lock().drop_every = Some(n);
    }

    /// Restores every link.
    fn heal(&self) {
        *self.rules.lock() = Rules::default();
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

struct Node {
    raft: RaftNode,
    stop: oneshot::Sender<()>,
    server: JoinHandle<()>,
    /// The node's broker and its MQTT listener (clusters started with brokers).
    mqtt: Option<TestBroker>,
}

struct Cluster {
    net: Arc<Net>,
    nodes: HashMap<NodeId, Node>,
    addrs: HashMap<NodeId, String>,
    _dirs: HashMap<NodeId, TempDir>,
    ids: Vec<NodeId>,
    /// Run a broker (applied-change feed, live forwarding, liveness) and an MQTT listener on
    /// every node.
    brokers: bool,
}

/// Production election timeouts (shorter ones cause spurious elections when several clusters
/// share two cores); `snapshot_every` small where a test needs compaction.
fn tuning(snapshot_every: u64, keep_after_snapshot: u64) -> RaftTuning {
    RaftTuning {
        heartbeat_ms: 150,
        election_timeout_min_ms: 1000,
        election_timeout_max_ms: 2000,
        snapshot_every,
        keep_after_snapshot,
    }
}

/// A free loopback port (bound and released; nothing else on this host hands out ports in
/// between in practice).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Polls `cond` every 50 ms until it holds, or panics with `what` after `timeout`.
async fn eventually<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const FORM_TIMEOUT: Duration = Duration::from_secs(30);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longer than the durability layer's commit timeout, so a refused write is seen as refused.
const WRITE_TIMEOUT: Duration = Duration::from_secs(40);

impl Cluster {
    /// Starts `n` nodes: node 1 bootstraps, the others join through it; returns once all are
    /// voters.
    async fn start(n: u64, tuning: RaftTuning) -> Cluster {
        Self::start_with(n, tuning, false).await
    }

    /// [`Self::start`], with a broker and an MQTT listener on every node.
    async fn start_with_brokers(n: u64) -> Cluster {
        Self::start_with(n, tuning(10_000, 1_000), true).await
    }

    async fn start_with(n: u64, tuning: RaftTuning, brokers: bool) -> Cluster {
        // Warnings (refused writes, failed forwards) help explain a failure; RUST_LOG overrides.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn,openraft=error".into()),
            )
            .with_test_writer()
            .try_init();
        let ids: Vec<NodeId> = (1..=n).collect();
        let mut cluster = Cluster {
            net: Arc::new(Net::default()),
            nodes: HashMap::new(),
            addrs: ids
                .iter()
                .map(|&id| (id, format!("127.0.0.1:{}", free_port())))
                .collect(),
            _dirs: ids
                .iter()
                .map(|&id| (id, tempfile::tempdir().expect("temp dir")))
                .collect(),
            ids: ids.clone(),
            brokers,
        };
        for &id in &ids {
            cluster.boot(id, tuning).await;
        }
        let all: BTreeSet<NodeId> = ids.iter().copied().collect();
        for &id in &ids {
            let raft = cluster.node(id).raft.clone();
            raft.wait(Some(FORM_TIMEOUT))
                .metrics(
                    |m| {
                        let membership = m.membership_config.membership();
                        // Settled: one configuration (not the joint one of a change in
                        // progress, which would also need the old majority).
                        membership.get_joint_config().len() == 1
                            && membership.voter_ids().collect::<BTreeSet<_>>() == all
                            && m.current_leader.is_some()
                    },
                    "all nodes are voters of a settled membership",
                )
                .await
                .expect("cluster formed");
        }
        cluster
    }

    /// Starts (or restarts, from its data dir) node `id`.
    async fn boot(&mut self, id: NodeId, tuning: RaftTuning) {
        let addr = self.addrs[&id].clone();
        let seeds = if id == 1 {
            Vec::new()
        } else {
            vec![self.addrs[&1].clone()]
        };
        let mut opts = NodeOptions::new(
            id,
            addr.clone(),
            String::new(),
            seeds,
            self._dirs[&id].path().to_path_buf(),
        );
        opts.tuning = tuning;
        opts.faults = Some(self.net.clone());
        let mut raft = RaftNode::start(opts).await.expect("node starts");
        let grpc = if self.brokers {
            raft.grpc_routes()
        } else {
            routes(raft.raft.clone())
        };
        let server = ClusterServer::bind(addr.parse().expect("address"), grpc, None)
            .await
            .expect("cluster port binds");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        // As `raftmq serve` wires them: feed, forwarding (with the node's fault injection),
        // recovery, then the MQTT front end.
        let mqtt = if self.brokers {
            let broker = Arc::new(
                Broker::with_auth(
                    MqttConfig::default(),
                    Arc::new(AllowAll),
                    Arc::new(AllowAll),
                    id,
                )
                .with_durability(raft.durability.clone()),
            );
            raft.feed_broker(broker.clone());
            raft.start_forwarding(broker.clone());
            broker
                .recover(std::time::Instant::now())
                .expect("the state is readable");
            Some(TestBroker::with_broker(broker).await)
        } else {
            None
        };
        self.nodes.insert(
            id,
            Node {
                raft,
                stop,
                server,
                mqtt,
            },
        );
    }

    /// The MQTT address of node `id`'s broker.
    fn mqtt(&self, id: NodeId) -> std::net::SocketAddr {
        self.nodes[&id].mqtt.as_ref().expect("a broker").mqtt
    }

    fn broker(&self, id: NodeId) -> &Arc<Broker> {
        &self.nodes[&id].mqtt.as_ref().expect("a broker").broker
    }

    fn node(&self, id: NodeId) -> &RaftNode {
        &self.nodes[&id].raft
    }

    fn leader_of(&self, id: NodeId) -> Option<NodeId> {
        self.node(id).raft.metrics().borrow().current_leader
    }

    /// Waits until the nodes in `among` agree on a leader that is one of them and not
    /// `excluded`; returns it.
    async fn agreed_leader(&self, among: &[NodeId], excluded: Option<NodeId>) -> NodeId {
        let mut found = None;
        eventually(FORM_TIMEOUT, "a leader agreed by the majority", || {
            let leaders: BTreeSet<Option<NodeId>> =
                among.iter().map(|&id| self.leader_of(id)).collect();
            found = match leaders.into_iter().collect::<Vec<_>>().as_slice() {
                [Some(l)] if among.contains(l) && Some(*l) != excluded => Some(*l),
                _ => None,
            };
            let ok = found.is_some();
            async move { ok }
        })
        .await;
        found.expect("leader")
    }

    /// Proposes sessions `names` through node `via`, one proposal each, concurrently, and
    /// returns each proposal's outcome. Every commit is awaited, so when this returns no
    /// proposal of this call is still in flight.
    async fn write_each(&self, via: NodeId, names: &[String]) -> Vec<Result<(), DurabilityError>> {
        let durability = self.node(via).durability.clone();
        let commits: Vec<_> = names
            .iter()
            .map(|name| durability.propose(vec![session(name)]))
            .collect();
        tokio::time::timeout(WRITE_TIMEOUT, async {
            let mut results = Vec::new();
            for commit in commits {
                results.push(commit.await);
            }
            results
        })
        .await
        .expect("a durable write neither committed nor failed within the timeout")
    }

    /// [`Self::write_each`]: `Err` if any proposal was refused.
    async fn write(&self, via: NodeId, names: &[String]) -> Result<(), DurabilityError> {
        self.write_each(via, names)
            .await
            .into_iter()
            .find(Result::is_err)
            .unwrap_or(Ok(()))
    }

    /// Commits `names` through the leader agreed by `among`, retrying (with the then leader)
    /// when a write is refused during a leader change, as a client would. Fails the test if
    /// the majority cannot commit after a few attempts.
    async fn write_majority(&self, among: &[NodeId], names: &[String]) {
        let mut last = None;
        for _ in 0..4 {
            let leader = self.agreed_leader(among, None).await;
            match self.write(leader, names).await {
                Ok(()) => return,
                Err(e) => last = Some((leader, e)),
            }
        }
        panic!("the majority {among:?} could not commit: {last:?}");
    }

    /// The client ids of the sessions in node `id`'s state machine.
    fn sessions(&self, id: NodeId) -> BTreeSet<String> {
        self.node(id)
            .durability
            .replicated_state()
            .expect("the state is readable")
            .sessions
            .iter()
            .map(|s| s.client_id.as_str().to_owned())
            .collect()
    }

    /// Waits until every node in `on` has exactly the sessions `expected`.
    async fn converged(&self, on: &[NodeId], expected: &BTreeSet<String>) {
        let deadline = tokio::time::Instant::now() + CONVERGE_TIMEOUT;
        for &id in on {
            loop {
                let have = self.sessions(id);
                if &have == expected {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    let m = self.node(id).raft.metrics().borrow().clone();
                    panic!(
                        "node {id} did not converge within {CONVERGE_TIMEOUT:?}: missing {:?}, \
                         unexpected {:?}; state {:?}, leader {:?}, applied {:?}",
                        expected.difference(&have).collect::<Vec<_>>(),
                        have.difference(expected).collect::<Vec<_>>(),
                        m.state,
                        m.current_leader,
                        m.last_applied,
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Stops node `id` like a crash: its server and Raft go away, its data dir stays.
    async fn stop(&mut self, id: NodeId) {
        let node = self.nodes.remove(&id).expect("running node");
        if let Some(mqtt) = node.mqtt {
            mqtt.stop().await;
        }
        let _ = node.stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(10), node.server).await;
        node.raft.shutdown().await;
    }

    async fn shutdown(mut self) {
        for id in self.ids.clone() {
            if self.nodes.contains_key(&id) {
                self.stop(id).await;
            }
        }
    }
}

fn session(name: &str) -> StateChange {
    StateChange::SessionOpened {
        client_id: ByteStr::from(name),
        epoch: 1,
        clean_start: true,
        expiry_secs: 3600,
        will: None,
    }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

fn set(lists: &[&[String]]) -> BTreeSet<String> {
    lists.iter().flat_map(|l| l.iter().cloned()).collect()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolated_leader_is_replaced_refuses_writes_and_rejoins() {
    let cluster = Cluster::start(3, tuning(10_000, 1_000)).await;
    let all = cluster.ids.clone();
    let before = names("before", 20);
    cluster.write_majority(&all, &before).await;
    let old = cluster.agreed_leader(&all, None).await;

    // Cut the leader off: the other two elect a new leader among themselves.
    cluster.net.isolate(old, &all);
    let majority: Vec<NodeId> = all.iter().copied().filter(|&n| n != old).collect();
    let new = cluster.agreed_leader(&majority, Some(old)).await;
    assert_ne!(new, old);

    // The cut-off node cannot commit: its writes are refused (not acknowledged, not hung) and
    // it reports not-ready, while the majority keeps committing.
    let refused = names("refused", 3);
    assert_eq!(
        cluster.write_each(old, &refused).await,
        vec![Err(DurabilityError::Unavailable); refused.len()],
        "every write through the cut-off leader is refused"
    );
    eventually(Duration::from_secs(10), "isolated node not ready", || {
        let ready = cluster.node(old).is_ready();
        async move { !ready }
    })
    .await;
    let during = names("during", 20);
    cluster.write_majority(&majority, &during).await;
    let other = *majority.iter().find(|&&n| n != new).expect("a follower");
    let via_follower = names("via-follower", 5);
    let mut forwarded = Err(DurabilityError::Unavailable);
    for _ in 0..3 {
        forwarded = cluster.write(other, &via_follower).await;
        if forwarded.is_ok() {
            break;
        }
    }
    forwarded.expect("a follower forwards to the new leader");

    // Heal: the old leader steps down, catches up, and everyone has the same state, without
    // the refused writes.
    cluster.net.heal();
    let expected = set(&[&before, &during, &via_follower]);
    cluster.converged(&all, &expected).await;
    for id in &all {
        let sessions = cluster.sessions(*id);
        assert!(
            refused.iter().all(|r| !sessions.contains(r)),
            "node {id} holds a write that was refused"
        );
    }
    eventually(Duration::from_secs(10), "old leader ready again", || {
        let ready = cluster.node(old).is_ready();
        async move { ready }
    })
    .await;
    let after = names("after", 5);
    cluster
        .write(old, &after)
        .await
        .expect("the healed node commits again");
    cluster
        .converged(&all, &set(&[&before, &during, &via_follower, &after]))
        .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minority_follower_refuses_and_majority_carries_on() {
    let cluster = Cluster::start(3, tuning(10_000, 1_000)).await;
    let all = cluster.ids.clone();
    let leader = cluster.agreed_leader(&all, None).await;
    let follower = *all.iter().find(|&&n| n != leader).expect("a follower");

    cluster.net.isolate(follower, &all);
    let majority: Vec<NodeId> = all.iter().copied().filter(|&n| n != follower).collect();
    let during = names("during", 30);
    cluster.write_majority(&majority, &during).await;
    assert_eq!(
        cluster.write(follower, &names("cut-off", 2)).await,
        Err(DurabilityError::Unavailable),
        "a node that cannot reach the leader must refuse durable writes"
    );
    eventually(
        Duration::from_secs(10),
        "isolated follower not ready",
        || {
            let ready = cluster.node(follower).is_ready();
            async move { !ready }
        },
    )
    .await;

    cluster.net.heal();
    let expected = set(&[&during]);
    cluster.converged(&all, &expected).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_and_lossy_links_still_commit_everything_once() {
    let cluster = Cluster::start(3, tuning(10_000, 1_000)).await;
    let all = cluster.ids.clone();
    // 20 ms each way between nodes and one message in seven lost: openraft retries, nothing
    // acknowledged is lost, nothing is applied twice.
    cluster.net.delay_all(&all, Duration::from_millis(20));
    cluster.net.drop_every(7);
    let mut written = Vec::new();
    for round in 0..5 {
        let leader = cluster.agreed_leader(&all, None).await;
        let batch = names(&format!("lossy{round}"), 10);
        // A write may be refused while a lost heartbeat triggers an election; retry the
        // round (the same sessions: applying a session open twice is idempotent).
        let mut ok = false;
        for _ in 0..5 {
            if cluster.write(leader, &batch).await.is_ok() {
                ok = true;
                break;
            }
        }
        assert!(ok, "round {round} never committed over a lossy network");
        written.extend(batch);
    }
    cluster.net.heal();
    cluster.converged(&all, &set(&[&written])).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_node_catches_up_from_a_snapshot() {
    // Snapshot every 20 entries and keep no log behind it: a node that misses more than that
    // can only catch up by installing a snapshot.
    let cluster = Cluster::start(3, tuning(20, 0)).await;
    let all = cluster.ids.clone();
    let leader = cluster.agreed_leader(&all, None).await;
    let lagging = *all.iter().find(|&&n| n != leader).expect("a follower");
    let first = names("first", 5);
    cluster.write_majority(&all, &first).await;
    cluster.converged(&all, &set(&[&first])).await;

    cluster.net.isolate(lagging, &all);
    // One log entry per write (sequential), well past two snapshots.
    let mut missed = Vec::new();
    let majority: Vec<NodeId> = all.iter().copied().filter(|&n| n != lagging).collect();
    for i in 0..60 {
        let one = vec![format!("missed-{i}")];
        cluster.write_majority(&majority, &one).await;
        missed.extend(one);
    }
    let leader = cluster.agreed_leader(&majority, None).await;
    let leader_raft = cluster.node(leader).raft.clone();
    leader_raft
        .wait(Some(Duration::from_secs(20)))
        .metrics(
            |m| {
                m.snapshot.is_some_and(|s| s.index >= 40) && m.purged.is_some_and(|p| p.index >= 40)
            },
            "leader snapshotted and purged its log",
        )
        .await
        .expect("the leader compacts its log");
    let lagging_applied = cluster
        .node(lagging)
        .raft
        .metrics()
        .borrow()
        .last_applied
        .map_or(0, |l| l.index);
    let purged = leader_raft.metrics().borrow().purged.map_or(0, |p| p.index);
    assert!(
        lagging_applied < purged,
        "the lagging node ({lagging_applied}) must be behind the purged log ({purged})"
    );

    cluster.net.heal();
    let expected = set(&[&first, &missed]);
    cluster.converged(&all, &expected).await;
    let snapshot = cluster.node(lagging).raft.metrics().borrow().snapshot;
    assert!(
        snapshot.is_some_and(|s| s.index >= purged),
        "node {lagging} caught up without a snapshot at or past {purged}: {snapshot:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_node_restarts_from_its_data_dir_and_catches_up() {
    let tuning = tuning(10_000, 1_000);
    let mut cluster = Cluster::start(3, tuning).await;
    let all = cluster.ids.clone();
    let before = names("before", 10);
    cluster.write_majority(&all, &before).await;
    let leader = cluster.agreed_leader(&all, None).await;

    // Stop the leader itself; the survivors elect a new one and keep committing.
    cluster.stop(leader).await;
    let survivors: Vec<NodeId> = all.iter().copied().filter(|&n| n != leader).collect();
    let new = cluster.agreed_leader(&survivors, Some(leader)).await;
    assert_ne!(new, leader);
    let during = names("during", 10);
    cluster.write_majority(&survivors, &during).await;

    cluster.boot(leader, tuning).await;
    cluster.converged(&all, &set(&[&before, &during])).await;
    cluster.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Brokers on the harness: routing between nodes, fencing and node failure under injected faults
// ---------------------------------------------------------------------------------------------

mod with_brokers {
    use super::*;
    use raftmq_codec::{
        Connect, ConnectProperties, Packet, ProtocolVersion, PubResponse, QoS, ReasonCode, Will,
        WillProperties,
    };
    use raftmq_tests::{RawClient, publish_packet};
    use std::collections::BTreeMap;
    use std::net::SocketAddr;

    /// Connects an MQTT 5 client (`expiry` 0: a session that is not stored) with an optional
    /// will; asserts CONNACK success.
    async fn client(addr: SocketAddr, id: &str, expiry: u32, will: Option<Will>) -> RawClient {
        let connect = Connect {
            protocol: ProtocolVersion::V5,
            clean_start: true,
            keep_alive: 0,
            client_id: id.into(),
            will,
            username: None,
            password: None,
            properties: ConnectProperties {
                session_expiry_interval: Some(expiry),
                ..Default::default()
            },
        };
        let (c, ack) = RawClient::handshake(addr, connect).await;
        assert_eq!(ack.reason_code, ReasonCode::SUCCESS, "CONNACK {ack:?}");
        c
    }

    /// Publishes `payloads` to `topic` at `qos` one exchange at a time (QoS 2: PUBREC, PUBREL,
    /// PUBCOMP), waiting for each acknowledgement.
    async fn publish_all(c: &mut RawClient, topic: &str, qos: QoS, payloads: &[String]) {
        for (i, payload) in payloads.iter().enumerate() {
            let id = u16::try_from(i % 60_000 + 1).expect("packet id");
            c.send(&Packet::Publish(publish_packet(
                topic,
                qos,
                id,
                payload.as_bytes(),
            )))
            .await;
            match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => assert!(
                    matches!(c.recv().await, Some(Packet::PubAck(a)) if a.reason_code.is_success())
                ),
                QoS::ExactlyOnce => {
                    assert!(
                        matches!(c.recv().await, Some(Packet::PubRec(r)) if r.reason_code.is_success())
                    );
                    c.send(&Packet::PubRel(PubResponse::success(raftmq_tests::pid(id))))
                        .await;
                    assert!(matches!(c.recv().await, Some(Packet::PubComp(_))));
                }
            }
        }
    }

    /// Receives until `quiet` passes without a PUBLISH, acknowledging everything (QoS 2 as a
    /// receiver must: a PUBLISH with a packet id not yet released is the same message); returns
    /// the payloads in arrival order, one per message.
    async fn drain(c: &mut RawClient, quiet: Duration) -> Vec<String> {
        let mut got = Vec::new();
        let mut unreleased = BTreeSet::new();
        while let Ok(Some(p)) = c.recv_within(quiet).await {
            match p {
                Packet::Publish(p) => {
                    let text = String::from_utf8_lossy(&p.payload).into_owned();
                    match (p.qos, p.packet_id) {
                        (QoS::ExactlyOnce, Some(id)) => {
                            if unreleased.insert(id.get()) {
                                got.push(text);
                            }
                            c.send(&Packet::PubRec(PubResponse::success(id))).await;
                        }
                        (_, Some(id)) => {
                            got.push(text);
                            c.send(&Packet::PubAck(PubResponse::success(id))).await;
                        }
                        (_, None) => got.push(text),
                    }
                }
                Packet::PubRel(r) => {
                    unreleased.remove(&r.packet_id.get());
                    c.send(&Packet::PubComp(PubResponse::success(r.packet_id)))
                        .await;
                }
                _ => {}
            }
        }
        got
    }

    fn counts(got: &[String]) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for g in got {
            *m.entry(g.clone()).or_insert(0) += 1;
        }
        m
    }

    /// Brokers on three nodes over slow links (20 ms each way on every link, Raft and
    /// forwarding): QoS 0/1/2 published on node 1 reach a clean and a persistent subscriber on
    /// node 2 (wildcard filters) exactly once each, a shared group with a member on node 2 and one
    /// on node 3 gets each message once, and a retained message set on node 3 is served by node 1.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn brokers_route_qos_0_1_2_between_nodes_exactly_once_over_slow_links() {
        let cluster = Cluster::start_with_brokers(3).await;
        cluster
            .net
            .delay_all(&cluster.ids, Duration::from_millis(20));
        let mut clean = client(cluster.mqtt(2), "clean-2", 0, None).await;
        clean.subscribe("r/#", QoS::AtLeastOnce).await;
        let mut persistent = client(cluster.mqtt(2), "persistent-2", 3600, None).await;
        persistent.subscribe("r/+/x", QoS::ExactlyOnce).await;
        let mut s2 = client(cluster.mqtt(2), "member-2", 0, None).await;
        s2.subscribe("$share/g/r/#", QoS::AtLeastOnce).await;
        let mut s3 = client(cluster.mqtt(3), "member-3", 0, None).await;
        s3.subscribe("$share/g/r/#", QoS::AtLeastOnce).await;
        // Routes are announced asynchronously; the persistent subscription is mirrored once
        // node 1 has applied it.
        eventually(
            Duration::from_secs(10),
            "node 1 knows the remote routes",
            || {
                let (_, routes) = cluster.broker(2).local_routes();
                let ok = routes.len() >= 3;
                async move { ok }
            },
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        let mut publisher = client(cluster.mqtt(1), "publisher-1", 0, None).await;
        let mut expected = Vec::new();
        for qos in [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce] {
            let payloads: Vec<String> = (0..30).map(|i| format!("q{}-{i}", qos.as_u8())).collect();
            publish_all(&mut publisher, "r/a/x", qos, &payloads).await;
            expected.extend(payloads);
        }
        let quiet = Duration::from_secs(2);
        let (got_clean, got_persistent, got_s2, got_s3) = tokio::join!(
            drain(&mut clean, quiet),
            drain(&mut persistent, quiet),
            drain(&mut s2, quiet),
            drain(&mut s3, quiet)
        );
        let all: BTreeMap<String, usize> = expected.iter().map(|e| (e.clone(), 1)).collect();
        assert_eq!(counts(&got_clean), all, "clean subscriber on node 2");
        assert_eq!(
            counts(&got_persistent),
            all,
            "persistent subscriber on node 2"
        );
        let mut shared = got_s2.clone();
        shared.extend(got_s3.iter().cloned());
        assert_eq!(
            counts(&shared),
            all,
            "shared group: each message to one member"
        );
        assert!(!got_s2.is_empty() || !got_s3.is_empty());

        // Retained through node 3, served by node 1 once applied there.
        let mut setter = client(cluster.mqtt(3), "setter-3", 0, None).await;
        let mut retained = publish_packet("status/n3", QoS::AtLeastOnce, 1, b"up");
        retained.retain = true;
        setter.send(&Packet::Publish(retained)).await;
        assert!(matches!(setter.recv().await, Some(Packet::PubAck(_))));
        eventually(
            Duration::from_secs(10),
            "node 1 has the retained message",
            || {
                let ok = cluster.broker(1).retained("status/n3").is_some();
                async move { ok }
            },
        )
        .await;
        let mut late = client(cluster.mqtt(1), "late-1", 0, None).await;
        late.subscribe("status/#", QoS::AtLeastOnce).await;
        let p = late.recv_publish().await;
        assert!(p.retain && &p.payload[..] == b"up");
        cluster.shutdown().await;
    }

    /// A follower cut off from the others lets go of its persistent session (its client gets
    /// 0x9C with a Server Reference, no will is published there); the majority declares it down
    /// and adopts the session: the will is published once, on the majority side, and the session
    /// expires there. After healing, nothing is published twice and the node does not take the
    /// session back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_cut_off_node_fences_its_sessions_and_the_majority_publishes_their_wills_once() {
        let cluster = Cluster::start_with_brokers(3).await;
        let leader = cluster.agreed_leader(&cluster.ids, None).await;
        let cut = *cluster
            .ids
            .iter()
            .find(|id| **id != leader)
            .expect("a follower");
        let watcher_node = *cluster
            .ids
            .iter()
            .find(|id| **id != cut && **id != leader)
            .expect("the other follower");
        let mut watcher = client(cluster.mqtt(watcher_node), "watcher", 0, None).await;
        watcher.subscribe("wills/#", QoS::AtLeastOnce).await;
        let will = Will {
            topic: "wills/device".into(),
            payload: bytes::Bytes::from_static(b"gone"),
            qos: QoS::AtLeastOnce,
            retain: false,
            properties: WillProperties::default(),
        };
        let mut device = client(cluster.mqtt(cut), "device", 3, Some(will)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;

        let started = tokio::time::Instant::now();
        cluster.net.isolate(cut, &cluster.ids);
        // Fenced by its own node: 0x9C, and no will from there. (These brokers have no
        // redirect installed, so no Server Reference; the real-process tests check it.)
        match device.recv_within(Duration::from_secs(15)).await {
            Ok(Some(Packet::Disconnect(d))) => {
                assert_eq!(d.reason_code, ReasonCode::USE_ANOTHER_SERVER);
            }
            other => panic!("expected DISCONNECT 0x9C, got {other:?}"),
        }
        let fenced = started.elapsed();
        assert!(cluster.broker(cut).session("device").is_none());
        // Declared down by the majority, which adopts the session and publishes the will once.
        let p = watcher.recv_publish().await;
        let will_after = started.elapsed();
        assert_eq!(&p.payload[..], b"gone");
        watcher
            .send(&Packet::PubAck(PubResponse::success(
                p.packet_id.expect("QoS 1"),
            )))
            .await;
        assert!(
            will_after > fenced,
            "the will came from the cut-off node ({will_after:?} <= {fenced:?})"
        );
        // The session expires (3 s) on the adopting node, in memory and in the replicated state.
        eventually(
            Duration::from_secs(15),
            "the adopted session expired",
            || {
                let gone = cluster.broker(leader).session("device").is_none()
                    && !cluster.sessions(leader).contains("device");
                async move { gone }
            },
        )
        .await;
        cluster.net.heal();
        eventually(CONVERGE_TIMEOUT, "the healed node caught up", || {
            let ok = !cluster.sessions(cut).contains("device") && cluster.leader_of(cut).is_some();
            async move { ok }
        })
        .await;
        assert!(
            drain(&mut watcher, Duration::from_secs(3)).await.is_empty(),
            "the will was published twice"
        );
        assert!(cluster.broker(cut).session("device").is_none());
        println!("fenced {fenced:?} after the cut; will published {will_after:?} after it");
        cluster.shutdown().await;
    }
}
