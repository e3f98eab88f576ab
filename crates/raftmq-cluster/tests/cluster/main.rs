//! In-process multi-node clusters over real gRPC on loopback, plain or over mutual TLS, with a
//! fault-injecting network ([`raftmq_cluster::network::FaultInjector`]).
//!
//! Each node is a real `RaftNode` (RocksDB store in a temp dir, tonic server on 127.0.0.1);
//! only the network between them is under the test's control. Durable writes go through the
//! same `Durability::propose` the broker uses. One test binary (each links RocksDB), split by
//! behaviour: [`faults`] (Raft under partitions, loss and delay), [`brokers`] (brokers routing
//! between nodes, fencing) and [`tls`] (mutual TLS between nodes).

mod ambiguous;
mod brokers;
mod faults;
mod quiesce;
mod sharded;
mod shards;
mod tls;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use raftmq_cluster::network::{ClusterTls, Fault, FaultInjector};
use raftmq_cluster::node::{NodeOptions, RaftNode, RaftTuning};
use raftmq_codec::ByteStr;
use raftmq_core::Broker;
use raftmq_core::auth::AllowAll;
use raftmq_core::config::MqttConfig;
use raftmq_core::durability::{Durability, DurabilityError, StateChange};
use raftmq_core::shard::{ShardCount, ShardId};
use raftmq_server::{ClusterServer, ClusterTlsPem};
use raftmq_tests::certs::Ca;
use raftmq_tests::{TestBroker, eventually, free_addr};
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
    /// One-shot rules for forwarded proposals and their replies ([`ambiguous`]).
    forwarded: ambiguous::ForwardRules,
}

#[derive(Debug, Default)]
struct Rules {
    cut: HashSet<(NodeId, NodeId)>,
    /// Links cut for one group's Raft traffic only: (shard, from, to).
    cut_shard: HashSet<(u32, NodeId, NodeId)>,
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

    fn forwarded(&self, from: NodeId, to: NodeId) -> Fault {
        self.forwarded_fault(from, to)
    }

    fn raft(&self, shard: ShardId, from: NodeId, to: NodeId) -> Fault {
        if self
            .rules
            .lock()
            .cut_shard
            .contains(&(shard.get(), from, to))
        {
            return Fault::Drop;
        }
        self.fault(from, to)
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

    /// Cuts group `shard`'s Raft traffic between `node` and every other node in `all`, both
    /// ways (the other groups' traffic flows).
    fn isolate_shard(&self, shard: u32, node: NodeId, all: &[NodeId]) {
        let mut rules = self.rules.lock();
        for &other in all.iter().filter(|&&n| n != node) {
            rules.cut_shard.insert((shard, node, other));
            rules.cut_shard.insert((shard, other, node));
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
// One node
// ---------------------------------------------------------------------------------------------

/// Production election timeouts (shorter ones cause spurious elections when several clusters
/// share two cores); `snapshot_every` small where a test needs compaction.
fn tuning(snapshot_every: u64, keep_after_snapshot: u64) -> RaftTuning {
    RaftTuning {
        heartbeat_ms: 150,
        election_timeout_min_ms: 1000,
        election_timeout_max_ms: 2000,
        snapshot_every,
        keep_after_snapshot,
        ..RaftTuning::default()
    }
}

/// How to start one node.
struct NodeSetup<'a> {
    id: NodeId,
    addr: String,
    seeds: Vec<String>,
    data_dir: std::path::PathBuf,
    tuning: RaftTuning,
    faults: Option<Arc<Net>>,
    /// Serve and call peers over mutual TLS with these certificates.
    tls: Option<&'a ClusterTlsPem>,
    /// Serve every cluster service (Raft, administration, live forwarding); otherwise Raft and
    /// administration only.
    all_services: bool,
    /// `cluster.shards`.
    shards: ShardCount,
}

struct Node {
    raft: RaftNode,
    stop: oneshot::Sender<()>,
    server: JoinHandle<()>,
    /// The node's broker and its MQTT listener (clusters started with brokers).
    mqtt: Option<TestBroker>,
}

impl Node {
    /// Starts a Raft node and serves its cluster port.
    async fn start(setup: NodeSetup<'_>) -> Node {
        let mut opts = NodeOptions::new(
            setup.id,
            setup.addr.clone(),
            String::new(),
            setup.seeds,
            setup.data_dir,
        );
        opts.tuning = setup.tuning;
        opts.shards = setup.shards;
        opts.faults = setup.faults.map(|net| net as _);
        opts.tls = setup
            .tls
            .map(|pem| ClusterTls::from_pem(&pem.cert, &pem.key, &pem.ca));
        // A node stopped just before may still hold its store for a moment (openraft's state
        // machine workers end after `shutdown` returns): its RocksDB lock is released then.
        let raft = raftmq_tests::poll(
            "the node starts (its data dir unlocked)",
            Duration::from_secs(10),
            Duration::from_millis(50),
            || {
                let opts = opts.clone();
                async move {
                    match RaftNode::start(opts).await {
                        Ok(raft) => Ok(Ok(raft)),
                        Err(e) if format!("{e:?}").contains("LOCK") => Err(format!("{e:?}")),
                        Err(e) => Ok(Err(e)),
                    }
                }
            },
        )
        .await
        .expect("node starts");
        let grpc = if setup.all_services {
            raft.grpc_routes()
        } else {
            raft.raft_routes()
        };
        let server = ClusterServer::bind(setup.addr.parse().expect("address"), grpc, setup.tls)
            .await
            .expect("cluster port binds");
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Node {
            raft,
            stop,
            server,
            mqtt: None,
        }
    }
}

/// Writes a node's PEM files into `dir` and loads them as the binary does.
fn tls_files(dir: &std::path::Path, cert: &str, key: &str, ca_pem: &str) -> ClusterTlsPem {
    let path = |name: &str| dir.join(name);
    std::fs::write(path("tls.crt"), cert).expect("write cert");
    std::fs::write(path("tls.key"), key).expect("write key");
    std::fs::write(path("ca.crt"), ca_pem).expect("write CA");
    ClusterTlsPem::load(&path("tls.crt"), &path("tls.key"), &path("ca.crt"))
        .expect("cluster TLS files load")
}

// ---------------------------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------------------------

/// How the nodes of a [`Cluster`] talk to each other.
enum Transport<'a> {
    /// Plain gRPC.
    Plain,
    /// Mutual TLS, every node with a certificate (SAN `127.0.0.1`) from this CA.
    MutualTls(&'a Ca),
}

struct Cluster {
    net: Arc<Net>,
    nodes: HashMap<NodeId, Node>,
    addrs: HashMap<NodeId, String>,
    dirs: HashMap<NodeId, TempDir>,
    /// Each node's certificates (mutual TLS only).
    pems: HashMap<NodeId, ClusterTlsPem>,
    ids: Vec<NodeId>,
    /// Run a broker (applied-change feed, live forwarding, liveness) and an MQTT listener on
    /// every node.
    brokers: bool,
    /// `cluster.shards` of every node.
    shards: ShardCount,
}

const FORM_TIMEOUT: Duration = Duration::from_secs(30);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longer than the durability layer's commit timeout, so a refused write is seen as refused.
const WRITE_TIMEOUT: Duration = Duration::from_secs(40);

/// Warnings (refused writes, failed forwards) help explain a failure; RUST_LOG overrides.
fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,openraft=error".into()),
        )
        .with_test_writer()
        .try_init();
}

impl Cluster {
    /// Starts `n` nodes: node 1 bootstraps, the others join through it; returns once all are
    /// voters.
    async fn start(n: u64, tuning: RaftTuning) -> Cluster {
        Self::start_with(n, tuning, false, Transport::Plain).await
    }

    /// [`Self::start`], with a broker and an MQTT listener on every node.
    async fn start_with_brokers(n: u64) -> Cluster {
        Self::start_with(n, tuning(10_000, 1_000), true, Transport::Plain).await
    }

    /// Three nodes over mutual TLS with certificates from `ca`, serving every cluster service.
    async fn start_mtls(ca: &Ca) -> Cluster {
        Self::start_with(3, tuning(10_000, 1_000), false, Transport::MutualTls(ca)).await
    }

    /// With `cluster.shards` from `RAFTMQ_TEST_SHARDS` (1 when unset), so the whole suite can
    /// run with several data groups per node: `RAFTMQ_TEST_SHARDS=8 cargo test --test cluster`.
    async fn start_with(n: u64, tuning: RaftTuning, brokers: bool, via: Transport<'_>) -> Cluster {
        Self::start_full(n, tuning, brokers, via, test_shards()).await
    }

    async fn start_full(
        n: u64,
        tuning: RaftTuning,
        brokers: bool,
        via: Transport<'_>,
        shards: ShardCount,
    ) -> Cluster {
        init_logs();
        let ids: Vec<NodeId> = (1..=n).collect();
        let dirs: HashMap<NodeId, TempDir> = ids
            .iter()
            .map(|&id| (id, tempfile::tempdir().expect("temp dir")))
            .collect();
        let pems = match via {
            Transport::Plain => HashMap::new(),
            Transport::MutualTls(ca) => ids
                .iter()
                .map(|&id| {
                    let (cert, key) = ca.issue(&format!("raftmq-{id}"), &["127.0.0.1"]);
                    (id, tls_files(dirs[&id].path(), &cert, &key, &ca.pem()))
                })
                .collect(),
        };
        let mut cluster = Cluster {
            net: Arc::new(Net::default()),
            nodes: HashMap::new(),
            addrs: ids
                .iter()
                .map(|&id| (id, free_addr().to_string()))
                .collect(),
            dirs,
            pems,
            ids: ids.clone(),
            brokers,
            shards,
        };
        for &id in &ids {
            cluster.boot(id, tuning).await;
        }
        let all: BTreeSet<NodeId> = ids.iter().copied().collect();
        // Every node a voter of a settled membership of every shard (with several shards,
        // a node's joins of the other groups may still run when shard 1 has it: a test that
        // stops a node then could leave a group without a quorum).
        for &id in &ids {
            for (shard, raft) in cluster.node(id).groups().iter() {
                let what = format!("node {id}: all nodes are voters of shard {shard:?}");
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
                        &what,
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            }
        }
        cluster
    }

    /// Starts (or restarts, from its data dir) node `id`.
    async fn boot(&mut self, id: NodeId, tuning: RaftTuning) {
        let seeds = if id == 1 {
            Vec::new()
        } else {
            vec![self.addrs[&1].clone()]
        };
        let tls = self.pems.get(&id);
        let mut node = Node::start(NodeSetup {
            id,
            addr: self.addrs[&id].clone(),
            seeds,
            data_dir: self.dirs[&id].path().join("data"),
            tuning,
            faults: Some(self.net.clone()),
            tls,
            // The mutual TLS tests check the whole cluster port.
            all_services: self.brokers || tls.is_some(),
            shards: self.shards,
        })
        .await;
        // As `raftmq serve` wires them: feed, forwarding (with the node's fault injection),
        // recovery, then the MQTT front end.
        if self.brokers {
            let broker = Arc::new(
                Broker::with_auth(
                    MqttConfig::default(),
                    Arc::new(AllowAll),
                    Arc::new(AllowAll),
                    id,
                )
                .with_durability(node.raft.durability.clone()),
            );
            node.raft.feed_broker(broker.clone());
            node.raft.start_forwarding(broker.clone());
            broker
                .recover(std::time::Instant::now())
                .expect("the state is readable");
            node.mqtt = Some(TestBroker::with_broker(broker).await);
        }
        self.nodes.insert(id, node);
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

    /// Waits until all nodes agree on a leader; returns the first node that is not it.
    async fn follower(&self) -> NodeId {
        without(&self.ids, self.leader().await)[0]
    }

    /// Waits until all nodes agree on a leader; returns it.
    async fn leader(&self) -> NodeId {
        self.agreed_leader(&self.ids, None).await
    }

    /// Waits until the nodes in `among` agree on a leader that is one of them and not
    /// `excluded`; returns it.
    async fn agreed_leader(&self, among: &[NodeId], excluded: Option<NodeId>) -> NodeId {
        raftmq_tests::poll(
            "a leader agreed by the majority",
            FORM_TIMEOUT,
            Duration::from_millis(50),
            || {
                let leaders: BTreeSet<Option<NodeId>> =
                    among.iter().map(|&id| self.leader_of(id)).collect();
                let found = match leaders.iter().collect::<Vec<_>>().as_slice() {
                    [Some(l)] if among.contains(l) && Some(*l) != excluded => Ok(*l),
                    _ => Err(leaders),
                };
                async move { found }
            },
        )
        .await
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
            // With several shards, each needs a leader the majority can reach.
            self.shards_led_among(among).await;
            match self.write(leader, names).await {
                Ok(()) => return,
                Err(e) => last = Some((leader, e)),
            }
        }
        panic!("the majority {among:?} could not commit: {last:?}");
    }

    /// Waits until, as `among[0]` sees it, every shard has a leader in `among`.
    async fn shards_led_among(&self, among: &[NodeId]) {
        for (shard, raft) in self.node(among[0]).groups().iter() {
            let what = format!("shard {shard:?} led by one of {among:?}");
            raft.wait(Some(FORM_TIMEOUT))
                .metrics(
                    |m| m.current_leader.is_some_and(|l| among.contains(&l)),
                    &what,
                )
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
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
        for &id in on {
            let what = format!("node {id} has exactly the sessions {expected:?}");
            raftmq_tests::poll(&what, CONVERGE_TIMEOUT, Duration::from_millis(50), || {
                let have = self.sessions(id);
                let seen = if &have == expected {
                    Ok(())
                } else {
                    let m = self.node(id).raft.metrics().borrow().clone();
                    Err(format!(
                        "missing {:?}, unexpected {:?}; state {:?}, leader {:?}, applied {:?}",
                        expected.difference(&have).collect::<Vec<_>>(),
                        have.difference(expected).collect::<Vec<_>>(),
                        m.state,
                        m.current_leader,
                        m.last_applied,
                    ))
                };
                async move { seen }
            })
            .await;
        }
    }

    /// Waits (up to 10 s) until node `id` reports ready (`want`) or not ready; `what` names it.
    async fn wait_ready(&self, id: NodeId, want: bool, what: &str) {
        eventually(what, Duration::from_secs(10), || {
            let ready = self.node(id).is_ready();
            async move { ready == want }
        })
        .await;
    }

    /// Heals the network and waits until every node has exactly the sessions `expected`.
    async fn heal_and_converge(&self, expected: &BTreeSet<String>) {
        self.net.heal();
        self.converged(&self.ids, expected).await;
    }

    /// Waits until every node has applied session `name`.
    async fn applied_everywhere(&self, name: &str) {
        let what = format!("every node has applied {name}");
        eventually(&what, FORM_TIMEOUT, || {
            let everywhere = self.ids.iter().all(|id| self.sessions(*id).contains(name));
            async move { everywhere }
        })
        .await;
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

/// `cluster.shards` of the clusters of the tests that do not choose it: `RAFTMQ_TEST_SHARDS`,
/// else 1.
fn test_shards() -> ShardCount {
    match std::env::var("RAFTMQ_TEST_SHARDS") {
        Ok(v) => v
            .parse()
            .ok()
            .and_then(ShardCount::new)
            .unwrap_or_else(|| panic!("RAFTMQ_TEST_SHARDS={v:?} is no shard count")),
        Err(_) => ShardCount::ONE,
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

/// `all` but `node`.
fn without(all: &[NodeId], node: NodeId) -> Vec<NodeId> {
    all.iter().copied().filter(|&n| n != node).collect()
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// `n` session names (`{prefix}-{i}`) that all live in shard `shard` of `count`.
fn names_in(prefix: &str, n: usize, shard: u32, count: ShardCount) -> Vec<String> {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .filter(|c| raftmq_core::shard::shard_of(c.as_bytes(), count).get() == shard)
        .take(n)
        .collect()
}

fn set(lists: &[&[String]]) -> BTreeSet<String> {
    lists.iter().flat_map(|l| l.iter().cloned()).collect()
}
