//! Administration end to end, with the real `raftmq` executable: the admin API (token,
//! clients, kick, subscriptions, retained messages, publish), draining (readiness, refused
//! connections, the DISCONNECT clients get, no acknowledged message lost), `raftmq ctl` against
//! a running broker, and membership changes with two processes.

use raftmq_codec::{Disconnect, Packet, ProtocolVersion, PubResponse, QoS, ReasonCode};
use raftmq_tests::process::{Node, NodeSpec, START_TIMEOUT, http_get, http_json, voters};
use raftmq_tests::{RawClient, connect_packet, connect_v5, free_port, poll, publish_packet};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

/// Upper bound for any wait but a node's start.
const WAIT: Duration = Duration::from_secs(15);
const TOKEN: &str = "s3cret-admin-token";
/// The executable under test.
const RAFTMQ: &str = env!("CARGO_BIN_EXE_raftmq");

/// Starts node `id` (data in `data_dir`, joining through `seeds`) with `env` (e.g. the admin
/// token) and waits until it is ready.
async fn start(id: u64, data_dir: &Path, seeds: &[String], env: &[(&str, &str)]) -> Node {
    let mut spec = NodeSpec::new(RAFTMQ, id, data_dir.to_owned());
    spec.seeds = seeds.to_vec();
    for (k, v) in env {
        spec = spec.with_env(k, *v);
    }
    Node::start(&spec).await
}

/// Starts node 1 alone in a new temporary directory with `env`.
async fn single_node(env: &[(&str, &str)]) -> (tempfile::TempDir, Node) {
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start(1, &dir.path().join("data"), &[], env).await;
    (dir, node)
}

/// An authorized admin call that must answer `expected`; returns the body.
async fn api(node: &Node, method: &str, path: &str, body: Option<Value>, expected: u16) -> Value {
    let (code, v) = http_json(node.spec.http, method, path, Some(TOKEN), body.as_ref()).await;
    assert_eq!(code, expected, "{method} {path}: {v}");
    v
}

/// Kicks `client_id` and discards its session through the API; returns what the answer says:
/// (session discarded, client disconnected).
async fn kick_discarding(node: &Node, client_id: &str) -> (Value, Value) {
    let path = format!("/api/v1/clients/{client_id}?discard_session=true");
    let v = api(node, "DELETE", &path, None, 200).await;
    (v["session_discarded"].clone(), v["disconnected"].clone())
}

/// The `error` of a JSON error answer.
fn error_of(v: &Value) -> &str {
    v["error"]
        .as_str()
        .unwrap_or_else(|| panic!("no error in {v}"))
}

/// A v5 client with a persistent session (expiry 1 h), subscribed to `filter` at QoS 1.
async fn persistent_subscriber(addr: SocketAddr, id: &str, filter: &str) -> RawClient {
    let (mut c, ack) = RawClient::handshake(addr, connect_v5(id, false, 3600)).await;
    assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
    c.subscribe(filter, QoS::AtLeastOnce).await;
    c
}

/// Runs `raftmq ctl` with `args` (blocking, in a helper thread); the environment has only
/// `env`.
async fn ctl(args: &[&str], env: &[(&str, &str)]) -> Output {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let run = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_raftmq"))
            .env_clear()
            .envs(env)
            .arg("ctl")
            .args(args)
            .output()
            .expect("runs raftmq ctl")
    });
    tokio::time::timeout(Duration::from_secs(150), run)
        .await
        .expect("ctl finished in time")
        .expect("ctl thread")
}

/// The node drains: it reports not ready and its MQTT listener is (or soon is) closed.
async fn assert_draining(node: &Node) {
    assert_eq!(http_get(node.spec.http, "/readyz").await.0, 503);
    wait_refused(node.mqtt_addr()).await;
}

/// Waits (bounded) until connections to `addr` are refused: the listener is closed.
async fn wait_refused(addr: SocketAddr) {
    let what = format!("{addr} refuses connections");
    poll(&what, WAIT, Duration::from_millis(20), || async {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => Err("accepted"),
            Err(_) => Ok(()),
        }
    })
    .await;
}

/// Runs `raftmq ctl` with `args` and `env`, which must fail saying each of `says` on stderr.
async fn ctl_fails(args: &[&str], env: &[(&str, &str)], says: &[&str]) {
    let out = ctl(args, env).await;
    assert_ne!(out.status.code(), Some(0));
    let stderr = text(&out.stderr);
    assert!(says.iter().all(|s| stderr.contains(s)), "{stderr}");
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_needs_the_token_and_inspects_kicks_publishes_and_clears() {
    let (_dir, node) = single_node(&[("RAFTMQ_HTTP__ADMIN_TOKEN", TOKEN)]).await;

    // The token guards /api/v1, not the probes or the metrics.
    let (code, v) = http_json(node.spec.http, "GET", "/api/v1/clients", None, None).await;
    assert_eq!(code, 401, "{v}");
    assert!(error_of(&v).contains("token"), "{v}");
    let (code, v) = http_json(
        node.spec.http,
        "GET",
        "/api/v1/cluster",
        Some("wrong"),
        None,
    )
    .await;
    assert_eq!((code, error_of(&v)), (401, "wrong admin token"));
    for open in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(
            http_json(node.spec.http, "GET", open, None, None).await.0,
            200,
            "{open}"
        );
    }
    let cluster = api(&node, "GET", "/api/v1/cluster", None, 200).await;
    assert_eq!(cluster["leader"], 1);
    assert_eq!(cluster["shard_count"], 1, "{cluster}");
    assert_eq!(
        (
            &cluster["shards"][0]["id"],
            &cluster["shards"][0]["leader"],
            &cluster["shards"][0]["voters"]
        ),
        (&json!(1), &json!(1), &json!([1])),
        "{cluster}"
    );

    // Clients: list with a prefix filter, paging, inspect.
    let mut sub = persistent_subscriber(node.mqtt_addr(), "sub-1", "t/#").await;
    let _other = RawClient::connected(node.mqtt_addr(), ProtocolVersion::V3_1_1, "other").await;
    let v = api(&node, "GET", "/api/v1/clients?client_id=sub", None, 200).await;
    assert_eq!(v["total"], 1, "{v}");
    let c = &v["items"][0];
    assert_eq!(
        (
            &c["client_id"],
            &c["connected"],
            &c["protocol_version"],
            &c["clean_start"],
            &c["session_expiry_secs"],
            &c["subscriptions"],
        ),
        (
            &json!("sub-1"),
            &json!(true),
            &json!(5),
            &json!(false),
            &json!(3600),
            &json!(1)
        ),
        "{c}"
    );
    assert!(
        c["peer"]
            .as_str()
            .is_some_and(|p| p.starts_with("127.0.0.1:")),
        "{c}"
    );
    let v = api(&node, "GET", "/api/v1/clients?limit=1&offset=1", None, 200).await;
    assert_eq!(
        (&v["total"], &v["items"][0]["client_id"]),
        (&json!(2), &json!("sub-1"))
    );
    let v = api(&node, "GET", "/api/v1/clients/sub-1", None, 200).await;
    assert_eq!(v["subscription_list"][0]["filter"], "t/#", "{v}");
    assert_eq!(v["subscription_list"][0]["qos"], 1, "{v}");
    let v = api(&node, "GET", "/api/v1/clients/nobody", None, 404).await;
    assert!(error_of(&v).contains("nobody"), "{v}");

    // Subscriptions by client and by matching topic.
    let v = api(&node, "GET", "/api/v1/subscriptions?topic=t/x/y", None, 200).await;
    assert_eq!(
        (&v["total"], &v["items"][0]["client_id"]),
        (&json!(1), &json!("sub-1"))
    );
    let v = api(&node, "GET", "/api/v1/subscriptions?topic=u", None, 200).await;
    assert_eq!(v["total"], 0);

    // Bad requests name what is wrong.
    for (path, field) in [
        ("/api/v1/clients?limit=0", "limit"),
        ("/api/v1/clients?limit=abc", "limit"),
        ("/api/v1/clients?limt=3", "limt"),
        ("/api/v1/subscriptions?topic=a/%23", "topic"),
        ("/api/v1/retained?filter=a/%23/b", "filter"),
        ("/api/v1/cluster/nodes/abc", "node id"),
    ] {
        let method = if path.contains("nodes") {
            "DELETE"
        } else {
            "GET"
        };
        let v = api(&node, method, path, None, 400).await;
        assert!(error_of(&v).contains(field), "{path}: {v}");
    }
    for (body, field) in [
        (json!({"topic": "t/#", "payload": "x"}), "topic"),
        (json!({"topic": "t/a", "qos": 3}), "qos"),
        (json!({"payload": "x"}), "topic"),
        (
            json!({"topic": "t/a", "payload": "!!", "payload_encoding": "base64"}),
            "payload",
        ),
        (json!({"topic": "t/a", "colour": "red"}), "colour"),
    ] {
        let (code, v) = http_json(
            node.spec.http,
            "POST",
            "/api/v1/publish",
            Some(TOKEN),
            Some(&body),
        )
        .await;
        assert!((400..500).contains(&code), "{body}: {code} {v}");
        assert!(error_of(&v).contains(field), "{body}: {v}");
    }

    // Publish goes through the broker: retained, delivered at QoS 1 to the subscriber.
    let body = json!({"topic": "t/a", "payload": "hello", "qos": 1, "retain": true,
        "properties": {"content_type": "text/plain", "user_properties": {"k": "v"}}});
    let v = api(&node, "POST", "/api/v1/publish", Some(body), 200).await;
    assert_eq!(v["delivered_to"], 1, "{v}");
    let p = sub.recv_publish().await;
    assert_eq!(
        (&p.topic[..], &p.payload[..], p.qos),
        ("t/a", &b"hello"[..], QoS::AtLeastOnce)
    );
    assert_eq!(p.properties.content_type.as_deref(), Some("text/plain"));
    sub.send(&Packet::PubAck(PubResponse::success(
        p.packet_id.expect("id"),
    )))
    .await;
    let body = json!({"topic": "t/b", "payload": "/wD+", "payload_encoding": "base64"});
    api(&node, "POST", "/api/v1/publish", Some(body), 200).await;
    assert_eq!(&sub.recv_publish().await.payload[..], &[0xff, 0x00, 0xfe]);

    // Retained: list (with a filter), delete, gone.
    let v = api(&node, "GET", "/api/v1/retained?filter=t/%2B", None, 200).await;
    assert_eq!(v["total"], 1, "{v}");
    assert_eq!(
        (&v["items"][0]["topic"], &v["items"][0]["payload"]),
        (&json!("t/a"), &json!("hello"))
    );
    let v = api(&node, "DELETE", "/api/v1/retained/t/a", None, 200).await;
    assert_eq!(v["cleared"], true);
    assert_eq!(
        api(&node, "GET", "/api/v1/retained?filter=t/%23", None, 200).await["total"],
        0
    );
    // Without a filter the list includes `$SYS` topics too.
    let all = api(&node, "GET", "/api/v1/retained?limit=1000", None, 200).await;
    assert!(
        all["items"].as_array().is_some_and(|a| !a.is_empty()
            && a.iter()
                .all(|m| m["topic"].as_str().is_some_and(|t| t.starts_with("$SYS/")))),
        "{all}"
    );
    api(&node, "DELETE", "/api/v1/retained/t/a", None, 404).await;

    // Kick: DISCONNECT 0x98, the persistent session stays (offline) until discarded.
    let v = api(&node, "DELETE", "/api/v1/clients/sub-1", None, 200).await;
    assert_eq!(v["session_discarded"], false);
    sub.expect_disconnect(ReasonCode::ADMINISTRATIVE_ACTION)
        .await;
    poll(
        "sub-1 is offline",
        WAIT,
        Duration::from_millis(50),
        || async {
            let v = api(&node, "GET", "/api/v1/clients/sub-1", None, 200).await;
            if v["connected"] == false {
                Ok(())
            } else {
                Err(v)
            }
        },
    )
    .await;
    let v = api(&node, "DELETE", "/api/v1/clients/sub-1", None, 409).await;
    assert!(error_of(&v).contains("discard_session"), "{v}");
    assert_eq!(
        kick_discarding(&node, "sub-1").await,
        (json!(true), json!(false)),
        "(session discarded, disconnected)"
    );
    api(&node, "GET", "/api/v1/clients/sub-1", None, 404).await;

    // Kicking with discard_session while connected: the client is told 0x98 too, and
    // reconnecting finds no session.
    let mut sub2 = persistent_subscriber(node.mqtt_addr(), "sub-2", "t/#").await;
    assert_eq!(
        kick_discarding(&node, "sub-2").await,
        (json!(true), json!(true)),
        "(session discarded, disconnected)"
    );
    sub2.expect_disconnect(ReasonCode::ADMINISTRATIVE_ACTION)
        .await;
    let (_c, ack) = RawClient::handshake(
        node.mqtt_addr(),
        connect_packet(ProtocolVersion::V5, "sub-2", false),
    )
    .await;
    assert!(!ack.session_present);

    // Not clustered with peers, but membership errors are still answered precisely.
    let body = json!({"node_id": 0, "cluster_addr": "127.0.0.1:1"});
    let v = api(&node, "POST", "/api/v1/cluster/nodes", Some(body), 400).await;
    assert!(error_of(&v).contains("node_id"), "{v}");
    let body = json!({"node_id": 5, "cluster_addr": "nowhere"});
    let v = api(&node, "POST", "/api/v1/cluster/nodes", Some(body), 400).await;
    assert!(error_of(&v).contains("cluster_addr"), "{v}");
    api(&node, "DELETE", "/api/v1/cluster/nodes/7", None, 404).await;
    api(&node, "DELETE", "/api/v1/cluster/nodes/1", None, 409).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_new_clients_disconnects_the_others_and_loses_no_acknowledged_message() {
    const N: u32 = 300;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let node = start(1, &data, &[], &[]).await;
    let spec = node.spec.clone();

    let mut sub = persistent_subscriber(node.mqtt_addr(), "drain-sub", "d/#").await;
    let mut v3 = RawClient::connected(node.mqtt_addr(), ProtocolVersion::V3_1_1, "drain-v3").await;
    let mut publisher =
        RawClient::connected(node.mqtt_addr(), ProtocolVersion::V5, "drain-pub").await;

    // A burst of QoS 1 publishes, and the drain starts while they are being committed.
    for n in 1..=N {
        let p = publish_packet(
            "d/x",
            QoS::AtLeastOnce,
            n as u16,
            format!("msg-{n}").as_bytes(),
        );
        publisher.send(&Packet::Publish(p)).await;
    }
    // Start draining once the broker has routed at least one of them (so some are in flight);
    // the subscriber's first delivery shows it.
    let mut received = BTreeSet::new();
    match sub.recv().await {
        Some(Packet::Publish(p)) => {
            if let Some(id) = p.packet_id {
                sub.send(&Packet::PubAck(PubResponse::success(id))).await;
            }
            let n: u32 = std::str::from_utf8(&p.payload)
                .ok()
                .and_then(|s| s.strip_prefix("msg-")?.parse().ok())
                .expect("msg-N");
            received.insert(n);
        }
        other => panic!("subscriber got {other:?}"),
    }
    let (code, status) = http_json(node.spec.http, "POST", "/api/v1/drain", None, None).await;
    assert_eq!((code, &status["draining"]), (200, &json!(true)), "{status}");

    // The publisher gets an acknowledgement for what was committed, then 0x8B.
    let mut acked = BTreeSet::new();
    loop {
        match publisher.recv().await {
            Some(Packet::PubAck(ack)) => {
                assert_eq!(ack.reason_code, ReasonCode::SUCCESS);
                acked.insert(u32::from(ack.packet_id.get()));
            }
            Some(Packet::Disconnect(d)) => {
                assert_eq!(d, Disconnect::with_code(ReasonCode::SERVER_SHUTTING_DOWN));
                assert_eq!(publisher.recv().await, None, "closed after DISCONNECT");
                break;
            }
            other => panic!("publisher got {other:?}"),
        }
    }
    // The v5 subscriber gets its deliveries and then 0x8B; the v3 client is just closed.
    loop {
        match sub.recv().await {
            Some(Packet::Publish(p)) => {
                if let Some(id) = p.packet_id {
                    // The broker stops reading while it drains: the write may fail.
                    let _ = sub
                        .try_send(&Packet::PubAck(PubResponse::success(id)))
                        .await;
                }
                let n: u32 = std::str::from_utf8(&p.payload)
                    .ok()
                    .and_then(|s| s.strip_prefix("msg-")?.parse().ok())
                    .expect("msg-N");
                received.insert(n);
            }
            Some(Packet::Disconnect(d)) => {
                assert_eq!(d.reason_code, ReasonCode::SERVER_SHUTTING_DOWN);
                break;
            }
            other => panic!("subscriber got {other:?}"),
        }
    }
    assert_eq!(v3.expect_closed().await, []);

    // Not ready, new connections refused, the drain reports complete.
    assert_draining(&node).await;
    let v = poll(
        "the drain is complete",
        WAIT,
        Duration::from_millis(50),
        || async {
            let (code, v) = http_json(node.spec.http, "GET", "/api/v1/drain", None, None).await;
            assert_eq!(code, 200);
            if v["complete"] == true { Ok(v) } else { Err(v) }
        },
    )
    .await;
    assert_eq!(v["connections"], 0, "{v}");
    assert_eq!(node.terminate(), Some(0), "clean exit after SIGTERM");

    // Every acknowledged message reaches the persistent subscriber after a restart.
    assert!(
        !acked.is_empty(),
        "nothing was acknowledged before the drain"
    );
    // The same node again: the same data dir and ports.
    let node = Node::start(&spec).await;
    let (mut sub, ack) =
        RawClient::handshake(node.mqtt_addr(), connect_v5("drain-sub", false, 3600)).await;
    assert!(ack.session_present);
    while !acked.is_subset(&received) {
        match sub.recv_within(WAIT).await {
            Ok(Some(Packet::Publish(p))) => {
                if let Some(id) = p.packet_id {
                    sub.send(&Packet::PubAck(PubResponse::success(id))).await;
                }
                if let Some(n) = std::str::from_utf8(&p.payload)
                    .ok()
                    .and_then(|s| s.strip_prefix("msg-")?.parse::<u32>().ok())
                {
                    received.insert(n);
                }
            }
            other => panic!(
                "missing acknowledged messages {:?} ({other:?})",
                acked.difference(&received).collect::<Vec<_>>()
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_reports_status_lists_kicks_publishes_and_drains() {
    let (_dir, node) = single_node(&[
        ("RAFTMQ_HTTP__ADMIN_TOKEN", TOKEN),
        ("RAFTMQ_DRAIN__SERVER_REFERENCE", "other.example:1883"),
    ])
    .await;
    let url = node.spec.url();
    let with_token = [("RAFTMQ_ADMIN_TOKEN", TOKEN)];

    // Errors say what is wrong and exit non-zero.
    let status = ["--url", &url, "cluster", "status"];
    ctl_fails(&status, &[], &["token is missing"]).await;
    let wrong_token = ["--url", &url, "--token", "nope", "cluster", "status"];
    ctl_fails(&wrong_token, &[], &["token was refused"]).await;
    let closed = format!("http://127.0.0.1:{}", free_port());
    ctl_fails(
        &["--url", &closed, "cluster", "status"],
        &[],
        &[closed.as_str()],
    )
    .await;
    let show = ["--url", &url, "clients", "show", "nobody"];
    ctl_fails(&show, &with_token, &["404", "no client `nobody`"]).await;

    // Status (table and JSON); the server's own variable is a fallback for the token.
    let out = ctl(
        &["--url", &url, "cluster", "status"],
        &[("RAFTMQ_HTTP__ADMIN_TOKEN", TOKEN)],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("Leader"),
        "{}",
        text(&out.stdout)
    );
    let out = ctl(
        &["--url", &url, "--output", "json", "cluster", "status"],
        &with_token,
    )
    .await;
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(v["voters"], json!([1]));
    // One line per shard: a single node has one shard (the default), led by itself.
    let out = ctl(&["--url", &url, "cluster", "shards"], &with_token).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shards = text(&out.stdout);
    let lines: Vec<Vec<&str>> = shards
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 2, "{shards}");
    assert_eq!(lines[0], ["SHARD", "LEADER", "TERM", "VOTERS", "LEARNERS"]);
    assert_eq!(
        (lines[1][0], lines[1][1], lines[1][3], lines[1][4]),
        ("1", "1", "1", "-"),
        "{shards}"
    );

    // Clients, publish, kick.
    let mut sub = persistent_subscriber(node.mqtt_addr(), "ctl-sub", "c/#").await;
    let out = ctl(&["--url", &url, "clients", "list"], &with_token).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    assert!(
        listing.contains("CLIENT ID") && listing.contains("ctl-sub"),
        "{listing}"
    );
    let out = ctl(
        &["--url", &url, "subscriptions", "list", "--topic", "c/1"],
        &with_token,
    )
    .await;
    assert!(text(&out.stdout).contains("c/#"), "{}", text(&out.stdout));
    let out = ctl(
        &[
            "--url",
            &url,
            "publish",
            "c/1",
            "from ctl",
            "--qos",
            "1",
            "--user-property",
            "a=b",
        ],
        &with_token,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let p = sub.recv_publish().await;
    assert_eq!(&p.payload[..], b"from ctl");
    sub.send(&Packet::PubAck(PubResponse::success(
        p.packet_id.expect("id"),
    )))
    .await;
    let out = ctl(&["--url", &url, "clients", "kick", "ctl-sub"], &with_token).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    sub.expect_disconnect(ReasonCode::ADMINISTRATIVE_ACTION)
        .await;

    // Drain: a v5 client is sent to the configured server; ctl waits for completion.
    let (mut sub, _) =
        RawClient::handshake(node.mqtt_addr(), connect_v5("ctl-sub", false, 3600)).await;
    let out = ctl(
        &["--url", &url, "--output", "json", "drain", "--wait"],
        &with_token,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON output");
    assert_eq!(
        (&v["draining"], &v["complete"]),
        (&json!(true), &json!(true)),
        "{v}"
    );
    match sub.recv().await {
        Some(Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, ReasonCode::USE_ANOTHER_SERVER);
            assert_eq!(
                d.properties.server_reference.as_deref(),
                Some("other.example:1883")
            );
        }
        other => panic!("expected DISCONNECT 0x9C, got {other:?}"),
    }
    assert_draining(&node).await;
}

/// Waits until `node` sees exactly the voters `expected`.
async fn wait_voters(node: &Node, expected: &[u64]) {
    let what = format!("node {} sees voters {expected:?}", node.spec.id);
    poll(&what, START_TIMEOUT, Duration::from_millis(200), || async {
        let seen = voters(node.spec.http).await;
        if seen.as_deref() == Some(expected) {
            Ok(())
        } else {
            Err(seen)
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_is_changed_through_the_admin_api_and_ctl() {
    let dir = tempfile::tempdir().expect("tempdir");
    let n1 = start(1, &dir.path().join("n1"), &[], &[]).await;
    let seed = format!("127.0.0.1:{}", n1.spec.cluster);
    let n2 = start(2, &dir.path().join("n2"), &[seed], &[]).await;
    wait_voters(&n1, &[1, 2]).await;

    // Remove node 2 through the API of node 2 itself (forwarded to the leader).
    let (code, v) = http_json(
        n2.spec.http,
        "DELETE",
        "/api/v1/cluster/nodes/2",
        None,
        None,
    )
    .await;
    assert_eq!(code, 200, "{v}");
    wait_voters(&n1, &[1]).await;

    // Add it back with ctl, against node 1.
    let out = ctl(
        &[
            "--url",
            &n1.spec.url(),
            "cluster",
            "add",
            "--node-id",
            "2",
            "--cluster-addr",
            &format!("127.0.0.1:{}", n2.spec.cluster),
            "--mqtt-addr",
            &format!("127.0.0.1:{}", n2.spec.mqtt),
        ],
        &[],
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    wait_voters(&n1, &[1, 2]).await;
    let remove = ["--url", &n1.spec.url(), "cluster", "remove", "9"];
    ctl_fails(&remove, &[], &["not a member"]).await;
    drop(n2);
}
