//! Cluster traffic over mutual TLS, in-process over real gRPC on loopback: a cluster whose
//! nodes hold certificates from one CA forms and commits (through a follower, so forwarded
//! proposals too); a node whose certificate comes from another CA never gets in; a client
//! without a certificate, or without TLS, cannot call the cluster port at all.
//!
//! Certificates are made here with rcgen: a CA and, per node, a certificate whose subject
//! alternative name is the host of its cluster address (`127.0.0.1`), as peers check it.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use raftmq_cluster::convert::{WallClock, encode_batch};
use raftmq_cluster::network::{ClusterTls, cluster_client};
use raftmq_cluster::node::{NodeOptions, RaftNode, RaftTuning};
use raftmq_codec::ByteStr;
use raftmq_core::durability::{Durability, StateChange};
use raftmq_proto::raft::ProposeRequest;
use raftmq_proto::raft::cluster_service_client::ClusterServiceClient;
use raftmq_server::{ClusterServer, ClusterTlsPem};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use tempfile::TempDir;
use tokio::sync::oneshot;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

type NodeId = u64;

const FORM_TIMEOUT: Duration = Duration::from_secs(30);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a node with the wrong certificate keeps trying to join (it retries every second).
const REFUSED_FOR: Duration = Duration::from_secs(8);

struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

fn new_ca(name: &str) -> Ca {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("CA key");
    let cert = p.self_signed(&key).expect("self-signed CA");
    Ca { cert, key }
}

/// A node certificate (no extended key usage: valid as server and as client certificate)
/// naming `host`, signed by `ca`; returns (certificate PEM, key PEM).
fn node_cert(ca: &Ca, node: NodeId, host: &str) -> (String, String) {
    let mut p = CertificateParams::new(vec![host.to_owned()]).expect("node params");
    p.distinguished_name
        .push(DnType::CommonName, format!("raftmq-{node}"));
    let key = KeyPair::generate().expect("node key");
    let cert = p.signed_by(&key, &ca.cert, &ca.key).expect("sign node");
    (cert.pem(), key.serialize_pem())
}

/// Writes a node's PEM files and loads them as the binary does.
fn files(dir: &TempDir, cert: &str, key: &str, ca_pem: &str) -> ClusterTlsPem {
    let path = |name: &str| -> PathBuf { dir.path().join(name) };
    std::fs::write(path("tls.crt"), cert).expect("write cert");
    std::fs::write(path("tls.key"), key).expect("write key");
    std::fs::write(path("ca.crt"), ca_pem).expect("write CA");
    ClusterTlsPem::load(&path("tls.crt"), &path("tls.key"), &path("ca.crt"))
        .expect("cluster TLS files load")
}

fn free_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port");
    format!("127.0.0.1:{port}")
}

struct Node {
    raft: RaftNode,
    _stop: oneshot::Sender<()>,
    addr: String,
    pem: ClusterTlsPem,
    _dir: TempDir,
}

/// Starts node `id` at `addr` with `pem`, joining through `seeds`, serving mTLS.
async fn start(
    id: NodeId,
    addr: String,
    seeds: Vec<String>,
    pem: ClusterTlsPem,
    dir: TempDir,
) -> Node {
    let mut opts = NodeOptions::new(
        id,
        addr.clone(),
        String::new(),
        seeds,
        dir.path().join("data"),
    );
    opts.tuning = RaftTuning {
        heartbeat_ms: 150,
        ..RaftTuning::default()
    };
    opts.tls = Some(ClusterTls::from_pem(&pem.cert, &pem.key, &pem.ca));
    let raft = RaftNode::start(opts).await.expect("node starts");
    let server = ClusterServer::bind(
        addr.parse().expect("address"),
        raft.grpc_routes(),
        Some(&pem),
    )
    .await
    .expect("cluster port binds");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));
    Node {
        raft,
        _stop: stop,
        addr,
        pem,
        _dir: dir,
    }
}

/// A 3-node cluster whose certificates all come from `ca`.
async fn cluster(ca: &Ca) -> HashMap<NodeId, Node> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,openraft=error".into()),
        )
        .with_test_writer()
        .try_init();
    let ca_pem = ca.cert.pem();
    let addrs: HashMap<NodeId, String> = (1..=3).map(|id| (id, free_addr())).collect();
    let mut nodes = HashMap::new();
    for id in 1..=3 {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = node_cert(ca, id, "127.0.0.1");
        let pem = files(&dir, &cert, &key, &ca_pem);
        let seeds = if id == 1 {
            Vec::new()
        } else {
            vec![addrs[&1].clone()]
        };
        nodes.insert(id, start(id, addrs[&id].clone(), seeds, pem, dir).await);
    }
    let all: BTreeSet<NodeId> = (1..=3).collect();
    for node in nodes.values() {
        node.raft
            .raft
            .wait(Some(FORM_TIMEOUT))
            .metrics(
                |m| {
                    let membership = m.membership_config.membership();
                    membership.get_joint_config().len() == 1
                        && membership.voter_ids().collect::<BTreeSet<_>>() == all
                        && m.current_leader.is_some()
                },
                "all nodes are voters of a settled membership",
            )
            .await
            .expect("the mTLS cluster forms");
    }
    nodes
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

fn sessions(node: &RaftNode) -> BTreeSet<String> {
    node.durability
        .replicated_state()
        .expect("the state is readable")
        .sessions
        .iter()
        .map(|s| s.client_id.as_str().to_owned())
        .collect()
}

fn follower(nodes: &HashMap<NodeId, Node>) -> &Node {
    let leader = nodes[&1].raft.raft.metrics().borrow().current_leader;
    nodes
        .iter()
        .find(|(id, _)| Some(**id) != leader)
        .map(|(_, n)| n)
        .expect("a follower")
}

/// Waits until every node has applied session `name`.
async fn replicated_everywhere(nodes: &HashMap<NodeId, Node>, name: &str) {
    tokio::time::timeout(FORM_TIMEOUT, async {
        while !nodes.values().all(|n| sessions(&n.raft).contains(name)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{name} not applied on every node"));
}

/// A proposal creating session `name`, as a node forwards it to the leader.
fn propose_request(name: &str) -> ProposeRequest {
    ProposeRequest {
        shard_id: 0,
        batch: encode_batch(&[session(name)], &WallClock::now()).into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_cluster_forms_and_commits_through_a_follower() {
    let ca = new_ca("cluster CA");
    let nodes = cluster(&ca).await;
    // A write through a follower is forwarded to the leader (ClusterService.Propose over mTLS),
    // then replicated (AppendEntries over mTLS).
    let via = follower(&nodes);
    tokio::time::timeout(
        CALL_TIMEOUT,
        via.raft.durability.propose(vec![session("over-mtls")]),
    )
    .await
    .expect("the write finishes in time")
    .expect("the write commits");
    replicated_everywhere(&nodes, "over-mtls").await;

    // A peer's own credentials work directly against the leader's port as well.
    let leader = nodes[&1]
        .raft
        .raft
        .metrics()
        .borrow()
        .current_leader
        .expect("leader");
    let leader = &nodes[&leader];
    let mut client = cluster_client(
        &leader.addr,
        Some(&ClusterTls::from_pem(
            &via.pem.cert,
            &via.pem.key,
            &via.pem.ca,
        )),
    )
    .expect("client");
    let resp = tokio::time::timeout(CALL_TIMEOUT, client.propose(propose_request("direct")))
        .await
        .expect("propose answers in time")
        .expect("a peer with a valid certificate may propose");
    assert!(resp.get_ref().committed);
    replicated_everywhere(&nodes, "direct").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_a_certificate_from_another_ca_cannot_join_or_propose() {
    let ca = new_ca("cluster CA");
    let nodes = cluster(&ca).await;
    let rogue_ca = new_ca("rogue CA");
    // The rogue node knows (trusts) the cluster's CA, so only its own certificate is wrong.
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = node_cert(&rogue_ca, 4, "127.0.0.1");
    let trust = format!("{}{}", ca.cert.pem(), rogue_ca.cert.pem());
    let pem = files(&dir, &cert, &key, &trust);
    let seeds: Vec<String> = nodes.values().map(|n| n.addr.clone()).collect();
    let rogue = start(4, free_addr(), seeds, pem, dir).await;

    tokio::time::sleep(REFUSED_FOR).await;
    for (id, node) in &nodes {
        let members: Vec<NodeId> = node
            .raft
            .raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .nodes()
            .map(|(id, _)| *id)
            .collect();
        assert!(
            !members.contains(&4),
            "node {id} lists the rogue node: {members:?}"
        );
    }
    let rogue_metrics = rogue.raft.raft.metrics().borrow().clone();
    assert_eq!(
        rogue_metrics.current_leader, None,
        "the rogue node found a leader"
    );
    assert_eq!(
        rogue_metrics.membership_config.membership().nodes().count(),
        0
    );

    // Nor can it inject anything through a member's cluster port.
    let rogue_tls = ClusterTls::from_pem(&rogue.pem.cert, &rogue.pem.key, &rogue.pem.ca);
    for node in nodes.values() {
        let mut client = cluster_client(&node.addr, Some(&rogue_tls)).expect("client");
        let result = tokio::time::timeout(CALL_TIMEOUT, client.propose(propose_request("rogue")))
            .await
            .expect("the refused call ends in time");
        assert!(result.is_err(), "a rogue proposal was answered: {result:?}");
    }
    // The cluster still works, and has nothing from the rogue node.
    let via = follower(&nodes);
    via.raft
        .durability
        .propose(vec![session("after-rogue")])
        .await
        .expect("the cluster still commits");
    replicated_everywhere(&nodes, "after-rogue").await;
    for node in nodes.values() {
        assert!(!sessions(&node.raft).contains("rogue"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_certificate_cannot_call_the_cluster_port() {
    let ca = new_ca("cluster CA");
    let nodes = cluster(&ca).await;
    let leader = nodes[&1]
        .raft
        .raft
        .metrics()
        .borrow()
        .current_leader
        .expect("leader");
    let addr = nodes[&leader].addr.clone();

    // Plain gRPC (no TLS) to an mTLS cluster port.
    let mut plain = cluster_client(&addr, None).expect("client");
    let result = tokio::time::timeout(CALL_TIMEOUT, plain.propose(propose_request("plain")))
        .await
        .expect("the plain call ends in time");
    assert!(
        result.is_err(),
        "a plaintext proposal was answered: {result:?}"
    );

    // TLS that verifies the server but presents no client certificate.
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.cert.pem())))
        .expect("TLS config")
        .connect_lazy();
    let mut anonymous = ClusterServiceClient::new(channel);
    let result = tokio::time::timeout(CALL_TIMEOUT, anonymous.propose(propose_request("no-cert")))
        .await
        .expect("the call without a certificate ends in time");
    assert!(
        result.is_err(),
        "a proposal without a client certificate was answered: {result:?}"
    );

    // Neither reached the state.
    let via = follower(&nodes);
    via.raft
        .durability
        .propose(vec![session("marker")])
        .await
        .expect("the cluster commits");
    replicated_everywhere(&nodes, "marker").await;
    for node in nodes.values() {
        let s = sessions(&node.raft);
        assert!(!s.contains("plain") && !s.contains("no-cert"), "{s:?}");
    }
}

#[test]
fn bad_cluster_tls_files_are_refused_naming_the_key() {
    let ca = new_ca("cluster CA");
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, _) = node_cert(&ca, 1, "127.0.0.1");
    let (_, other_key) = node_cert(&ca, 2, "127.0.0.1");
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("tls.crt"), &cert).expect("write");
    std::fs::write(path("tls.key"), &other_key).expect("write");
    std::fs::write(path("ca.crt"), ca.cert.pem()).expect("write");
    std::fs::write(path("empty"), "").expect("write");

    let err = |cert: &str, key: &str, ca: &str| {
        ClusterTlsPem::load(&path(cert), &path(key), &path(ca))
            .expect_err("refused")
            .to_string()
    };
    let e = err("tls.crt", "tls.key", "ca.crt");
    assert!(
        e.starts_with("cluster.tls_key_file: does not match cluster.tls_cert_file"),
        "{e}"
    );
    let e = err("tls.crt", "tls.key", "missing.crt");
    assert!(e.starts_with("cluster.tls_ca_file: cannot read"), "{e}");
    let e = err("empty", "tls.key", "ca.crt");
    assert!(e.starts_with("cluster.tls_cert_file: "), "{e}");
    let e = err("tls.crt", "empty", "ca.crt");
    assert!(e.starts_with("cluster.tls_key_file: "), "{e}");
}
