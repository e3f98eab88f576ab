//! Cluster traffic over mutual TLS: a cluster whose nodes hold certificates from one CA forms
//! and commits (through a follower, so forwarded proposals too); a node whose certificate comes
//! from another CA never gets in; a client without a certificate, or without TLS, cannot call
//! the cluster port at all.
//!
//! Certificates are made with rcgen ([`raftmq_tests::certs`]): a CA and, per node, a
//! certificate whose subject alternative name is the host of its cluster address
//! (`127.0.0.1`), as peers check it.

use super::*;
use raftmq_cluster::convert::{WallClock, encode_batch};
use raftmq_cluster::network::cluster_client;
use raftmq_proto::raft::ProposeRequest;
use raftmq_proto::raft::cluster_service_client::ClusterServiceClient;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a node with the wrong certificate keeps trying to join (it retries every second).
const REFUSED_FOR: Duration = Duration::from_secs(8);

/// A proposal creating session `name`, as a node forwards it to the leader.
fn propose_request(name: &str) -> ProposeRequest {
    ProposeRequest {
        shard_id: 0,
        batch: encode_batch(&[session(name)], &WallClock::now()).into(),
    }
}

/// Commits session `name` through a follower (which forwards it to the leader) and waits until
/// every node has applied it; returns the follower.
async fn commit_via_follower(cluster: &Cluster, name: &str) -> NodeId {
    let via = cluster.follower().await;
    let commit = cluster.node(via).durability.propose(vec![session(name)]);
    tokio::time::timeout(CALL_TIMEOUT, commit)
        .await
        .expect("the write finishes in time")
        .expect("the write commits");
    cluster.applied_everywhere(name).await;
    via
}

/// Asserts a proposal of session `name` through `client` fails (within [`CALL_TIMEOUT`]).
async fn assert_refused(mut client: ClusterServiceClient<tonic::transport::Channel>, name: &str) {
    let result = tokio::time::timeout(CALL_TIMEOUT, client.propose(propose_request(name)))
        .await
        .unwrap_or_else(|_| panic!("the refused call for {name} did not end in time"));
    assert!(
        result.is_err(),
        "the proposal of {name} was answered: {result:?}"
    );
}

/// Peer credentials made from a node's certificates.
fn peer_tls(pem: &ClusterTlsPem) -> ClusterTls {
    ClusterTls::from_pem(&pem.cert, &pem.key, &pem.ca)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_cluster_forms_and_commits_through_a_follower() {
    let ca = Ca::new("cluster CA");
    let cluster = Cluster::start_mtls(&ca).await;
    // A write through a follower is forwarded to the leader (ClusterService.Propose over mTLS),
    // then replicated (AppendEntries over mTLS).
    let via = commit_via_follower(&cluster, "over-mtls").await;

    // A peer's own credentials work directly against the leader's port as well.
    let leader = cluster.leader_of(1).expect("leader");
    let mut client = cluster_client(
        &cluster.addrs[&leader],
        Some(&peer_tls(&cluster.pems[&via])),
    )
    .expect("client");
    let resp = tokio::time::timeout(CALL_TIMEOUT, client.propose(propose_request("direct")))
        .await
        .expect("propose answers in time")
        .expect("a peer with a valid certificate may propose");
    assert!(resp.get_ref().committed);
    cluster.applied_everywhere("direct").await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_with_a_certificate_from_another_ca_cannot_join_or_propose() {
    let ca = Ca::new("cluster CA");
    let cluster = Cluster::start_mtls(&ca).await;
    let rogue_ca = Ca::new("rogue CA");
    // The rogue node knows (trusts) the cluster's CA, so only its own certificate is wrong.
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, key) = rogue_ca.issue("raftmq-4", &["127.0.0.1"]);
    let trust = format!("{}{}", ca.pem(), rogue_ca.pem());
    let pem = tls_files(dir.path(), &cert, &key, &trust);
    let rogue = Node::start(NodeSetup {
        id: 4,
        addr: free_addr().to_string(),
        seeds: cluster.addrs.values().cloned().collect(),
        data_dir: dir.path().join("data"),
        tuning: tuning(10_000, 1_000),
        faults: None,
        tls: Some(&pem),
        all_services: true,
        shards: test_shards(),
    })
    .await;

    // Refused for a while, not just at first: the rogue node keeps retrying meanwhile.
    tokio::time::sleep(REFUSED_FOR).await;
    for id in &cluster.ids {
        let members: Vec<NodeId> = cluster
            .node(*id)
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
    let rogue_tls = peer_tls(&pem);
    for addr in cluster.addrs.values() {
        let client = cluster_client(addr, Some(&rogue_tls)).expect("client");
        assert_refused(client, "rogue").await;
    }
    // The cluster still works, and has nothing from the rogue node.
    commit_via_follower(&cluster, "after-rogue").await;
    for id in &cluster.ids {
        assert!(!cluster.sessions(*id).contains("rogue"));
    }
    rogue.raft.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_certificate_cannot_call_the_cluster_port() {
    let ca = Ca::new("cluster CA");
    let cluster = Cluster::start_mtls(&ca).await;
    let leader = cluster.leader_of(1).expect("leader");
    let addr = cluster.addrs[&leader].clone();

    // Plain gRPC (no TLS) to an mTLS cluster port.
    let plain = cluster_client(&addr, None).expect("client");
    assert_refused(plain, "plain").await;

    // TLS that verifies the server but presents no client certificate.
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .expect("endpoint")
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca.pem())))
        .expect("TLS config")
        .connect_lazy();
    assert_refused(ClusterServiceClient::new(channel), "no-cert").await;

    // Neither reached the state.
    commit_via_follower(&cluster, "marker").await;
    for id in &cluster.ids {
        let s = cluster.sessions(*id);
        assert!(!s.contains("plain") && !s.contains("no-cert"), "{s:?}");
    }
    cluster.shutdown().await;
}

#[test]
fn bad_cluster_tls_files_are_refused_naming_the_key() {
    let ca = Ca::new("cluster CA");
    let dir = tempfile::tempdir().expect("temp dir");
    let (cert, _) = ca.issue("raftmq-1", &["127.0.0.1"]);
    let (_, other_key) = ca.issue("raftmq-2", &["127.0.0.1"]);
    let path = |name: &str| dir.path().join(name);
    std::fs::write(path("tls.crt"), &cert).expect("write");
    std::fs::write(path("tls.key"), &other_key).expect("write");
    std::fs::write(path("ca.crt"), ca.pem()).expect("write");
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
