//! Mutual TLS between real nodes.

use super::*;
use raftmq_tests::certs::Ca;

/// Mutual TLS between nodes with the real binary: three nodes configured through
/// `RAFTMQ_CLUSTER__TLS_*` with certificates from one CA (SAN `127.0.0.1`, the host of their
/// cluster addresses) form a cluster, commit, and carry live forwarding over mTLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_over_mutual_tls_forms_and_forwards_messages() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = Ca::new("raftmq cluster CA");
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca.pem()).expect("write CA");

    let mut specs = cluster_specs(RAFTMQ, dir.path(), 3);
    for s in &mut specs {
        let (cert, key) = ca.issue(&format!("raftmq-{}", s.id), &["127.0.0.1"]);
        let (cert_file, key_file) = (
            dir.path().join(format!("n{}.crt", s.id)),
            dir.path().join(format!("n{}.key", s.id)),
        );
        std::fs::write(&cert_file, cert).expect("write cert");
        std::fs::write(&key_file, key).expect("write key");
        s.env = [
            ("RAFTMQ_CLUSTER__TLS_CERT_FILE", &cert_file),
            ("RAFTMQ_CLUSTER__TLS_KEY_FILE", &key_file),
            ("RAFTMQ_CLUSTER__TLS_CA_FILE", &ca_file),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.display().to_string()))
        .collect();
    }
    let _nodes: Vec<Node> = specs.iter().map(Node::spawn).collect();
    converged(&specs).await;

    // Durable (Raft-committed) and live (forwarded) traffic between nodes, both over mTLS.
    let (a, b) = (specs[0].mqtt_addr(), specs[1].mqtt_addr());
    let (mut sub, _) = connected(b, "mtls-sub", true).await;
    sub.subscribe("mtls/#", QoS::AtLeastOnce).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut n = 0;
    loop {
        publish_each(a, "mtls/probe", n..n + 1, true).await;
        if collect(&mut sub, 1).await == [n] {
            break;
        }
        n += 1;
        assert!(
            Instant::now() < deadline,
            "a message published on A never reached B"
        );
    }
    publish_each(a, "mtls/x", 100..120, false).await;
    let mut got = collect(&mut sub, 20).await;
    got.sort_unstable();
    assert_eq!(got, (100..120).collect::<Vec<_>>());
    // The retained message (committed through Raft) is served by the third node too.
    wait_retained(specs[2].mqtt_addr(), "mtls/probe", n).await;

    // The cluster port refuses plain TCP clients: a plaintext HTTP/2 preface gets no answer
    // but a closed connection or TLS alert.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", specs[0].cluster))
        .await
        .expect("connect to the cluster port");
    plain
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("write preface");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(10), plain.read(&mut buf))
        .await
        .expect("the cluster port answers a plaintext client within 10 s");
    // An HTTP/2 server would answer with a SETTINGS frame (type 4 at byte 3).
    if let Ok(len) = read {
        assert!(
            len < 9 || buf[3] != 4,
            "the cluster port speaks plaintext HTTP/2: {:?}",
            &buf[..len]
        );
    }
}
