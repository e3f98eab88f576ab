//! The Eclipse Paho C client through its sample programs (Debian `paho.mqtt.c-examples`):
//! `paho_c_pub` / `paho_c_sub` on the asynchronous library (`libpaho-mqtt3as`) and
//! `paho_cs_pub` / `paho_cs_sub` on the synchronous one (`libpaho-mqtt3cs`), over TCP, TLS,
//! WebSocket and secure WebSocket, MQTT 3.1.1 and 5.0.
//!
//! `--trace protocol` makes them log every packet they send and receive (`<- PUBLISH msgid: 1
//! qos: 2 retained: 0 payload len(5): hello`, `-> PUBCOMP msgid 1`), which the tests read to
//! check the QoS, retain flag and payload of what Paho received and that it completed the QoS 2
//! exchange; the subscriber prints `topic<TAB>payload` lines on stdout. What Paho publishes is
//! checked by a raw peer ([`Peer`]), which sees the QoS the broker delivered at.

use super::{Got, Peer, got, spawn_program, tls_broker};
use raftmq_tests::{TIMEOUT, TestBroker, wait_until};
use std::net::SocketAddr;
use std::process::Stdio;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

const PACKAGE: &str = "paho.mqtt.c-examples";

/// A Paho sample program with `args`, its output piped.
fn paho(program: &str, args: &[String]) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    cmd
}

/// `args` as owned strings.
fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
}

/// Runs a publisher (`paho_c_pub`, `paho_cs_pub`) to completion; asserts it succeeded.
async fn publish(program: &str, a: &[String]) {
    let child = spawn_program(paho(program, a), program, PACKAGE);
    let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} did not finish in time"))
        .expect("wait for the Paho publisher");
    assert!(
        out.status.success(),
        "{program} {a:?} failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A running subscriber (`paho_c_sub`, `paho_cs_sub`) whose stdout and stderr lines the test
/// reads as they come.
struct Subscriber {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// Every line read so far (`out: …` / `err: …`), in the order they were read.
    seen: Vec<String>,
    /// Where in `seen` the next message's trace and output lines are looked for.
    err: usize,
    out: usize,
    /// The topic filter it subscribed to (`-t`).
    filter: String,
    program: String,
}

impl Subscriber {
    /// Starts `program` with `a` and waits until the broker holds its subscription.
    async fn start(broker: &TestBroker, program: &str, client_id: &str, a: &[String]) -> Self {
        let mut all = vec!["-i".to_owned(), client_id.to_owned()];
        all.extend_from_slice(a);
        all.extend(args(&["--trace", "protocol"]));
        let mut child = spawn_program(paho(program, &all), program, PACKAGE);
        let (tx, lines) = mpsc::unbounded_channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        for (stream, tag) in [
            (
                Box::new(out) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                "out",
            ),
            (Box::new(err), "err"),
        ] {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stream).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if tx.send(format!("{tag}: {line}")).is_err() {
                        break;
                    }
                }
            });
        }
        let core = broker.broker.clone();
        wait_until(&format!("{program} has subscribed"), || {
            core.session(client_id)
                .is_some_and(|s| s.is_online() && s.subscription_count() == 1)
        })
        .await;
        Subscriber {
            child,
            lines,
            seen: Vec::new(),
            err: 0,
            out: 0,
            filter: a
                .iter()
                .skip_while(|x| *x != "-t")
                .nth(1)
                .cloned()
                .expect("the subscriber's -t filter"),
            program: program.to_owned(),
        }
    }

    /// The first line of `stream` ("out" or "err") from line `*cursor` on that `pick` picks,
    /// reading more lines as they come (within [`TIMEOUT`]); moves `*cursor` past it.
    async fn pick<T>(
        &mut self,
        stream: &str,
        cursor: &mut usize,
        what: &str,
        mut pick: impl FnMut(&str) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let prefix = format!("{stream}: ");
        loop {
            while *cursor < self.seen.len() {
                let line = &self.seen[*cursor];
                *cursor += 1;
                if let Some(t) = line.strip_prefix(&prefix).and_then(&mut pick) {
                    return t;
                }
            }
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) => self.seen.push(line),
                Ok(None) => panic!("{} ended before {what}\n{}", self.program, self.shown()),
                Err(_) => panic!("timed out waiting for {what}\n{}", self.shown()),
            }
        }
    }

    /// The next `n` messages, in order: (topic, QoS, retain flag, payload) from the
    /// `<- PUBLISH` trace line and the `topic<TAB>payload` output line of each; for each one at
    /// QoS 2 also waits for the `-> PUBCOMP` that completes it.
    async fn receive_n(&mut self, n: usize) -> Vec<Got> {
        let mut out = Vec::new();
        let begin = self.err;
        let (mut err, mut stdout) = (self.err, self.out);
        for _ in 0..n {
            let (qos, retain, payload) = self
                .pick(
                    "err",
                    &mut err,
                    "a PUBLISH in the protocol trace",
                    traced_publish,
                )
                .await;
            let suffix = format!("\t{payload}");
            let filter = self.filter.clone();
            let topic = self
                .pick("out", &mut stdout, "the message's output line", |l| {
                    // Without wildcards in the filter, only the payload is printed.
                    if l == payload && !filter.contains(['+', '#']) {
                        return Some(filter.clone());
                    }
                    let l = l.strip_suffix(&suffix)?;
                    // paho_c_sub prints `<topic length> <topic>`, paho_cs_sub `<topic>`.
                    Some(l.rsplit(' ').next().unwrap_or(l).to_owned())
                })
                .await;
            out.push(got(&topic, qos, retain, payload.as_bytes()));
        }
        let mut completed = begin;
        for _ in out.iter().filter(|m| m.1 == 2) {
            self.pick("err", &mut completed, "-> PUBCOMP", |l| {
                l.contains(" -> PUBCOMP ").then_some(())
            })
            .await;
        }
        (self.err, self.out) = (err, stdout);
        out
    }

    fn shown(&self) -> String {
        let lines: Vec<&str> = self
            .seen
            .iter()
            .map(String::as_str)
            .filter(|l| !l.starts_with("err: Trace : 3"))
            .collect();
        format!("--- {} output ---\n{}", self.program, lines.join("\n"))
    }

    /// Kills the subscriber (without DISCONNECT) and waits for it.
    async fn kill(mut self) {
        self.child.kill().await.expect("kill the Paho subscriber");
    }
}

/// From a trace line `... <- PUBLISH msgid: 1 qos: 2 retained: 0 payload len(5): hello`: the
/// QoS, retain flag and payload.
fn traced_publish(line: &str) -> Option<(u8, bool, String)> {
    let (_, rest) = line.split_once(" <- PUBLISH ")?;
    let (_, rest) = rest.split_once("qos: ")?;
    let (qos, rest) = rest.split_once(" retained: ")?;
    let (retained, rest) = rest.split_once(" payload len(")?;
    let (_, payload) = rest.split_once("): ")?;
    Some((qos.parse().ok()?, retained == "1", payload.to_owned()))
}

/// Where to reach `broker`: `-h 127.0.0.1 -p <port>` and the MQTT version.
fn tcp(broker: &TestBroker, version: &str) -> Vec<String> {
    let port = broker.mqtt.port().to_string();
    args(&["-h", "127.0.0.1", "-p", &port, "-V", version])
}

fn messages(items: &[(String, u8, bool, String)]) -> Vec<Got> {
    items
        .iter()
        .map(|(t, q, r, p)| got(t, *q, *r, p.as_bytes()))
        .collect()
}

/// The peer publishes at QoS 0, 1 and 2 to `<prefix>/to-paho/<qos>`; what `sub` received.
async fn peer_to_paho(peer: &mut Peer, sub: &mut Subscriber, prefix: &str) {
    let want: Vec<(String, u8, bool, String)> = (0..=2u8)
        .map(|q| {
            let topic = format!("{prefix}/to-paho/{q}");
            (topic, q, false, format!("to paho at qos {q}"))
        })
        .collect();
    for (topic, q, _, payload) in &want {
        peer.publish(topic, *q, false, payload).await;
    }
    assert_eq!(
        sub.receive_n(3).await,
        messages(&want),
        "what Paho received"
    );
}

/// Conformance (3.1.1): [MQTT-7.0.0-2]
/// Conformance (5.0): [MQTT-4.2.0-1]
#[tokio::test]
async fn paho_c_v311_and_v5_every_qos_both_ways() {
    let broker = TestBroker::start().await;
    for version in ["311", "5"] {
        let prefix = format!("paho-v{version}");
        let mut peer = Peer::connect(&broker, &format!("{prefix}-peer")).await;
        peer.subscribe(&format!("{prefix}/from-paho/#"), 2).await;
        let mut sub_args = tcp(&broker, version);
        sub_args.extend(args(&["-t", &format!("{prefix}/to-paho/#"), "-q", "2"]));
        let mut sub =
            Subscriber::start(&broker, "paho_c_sub", &format!("{prefix}-sub"), &sub_args).await;
        peer_to_paho(&mut peer, &mut sub, &prefix).await;
        sub.kill().await;

        for q in 0..=2u8 {
            let mut a = tcp(&broker, version);
            let topic = format!("{prefix}/from-paho/{q}");
            let payload = format!("from paho at qos {q}");
            a.extend(args(&["-i", &format!("{prefix}-pub"), "-t", &topic]));
            a.extend(args(&["-q", &q.to_string(), "-m", &payload]));
            publish("paho_c_pub", &a).await;
        }
        let want: Vec<Got> = (0..=2u8)
            .map(|q| {
                let topic = format!("{prefix}/from-paho/{q}");
                got(&topic, q, false, format!("from paho at qos {q}").as_bytes())
            })
            .collect();
        assert_eq!(peer.receive_n(3).await, want, "what the peer received");
    }
}

/// A retained message from `paho_c_pub -r` reaches a later `paho_c_sub` with RETAIN 1, and the
/// will of a `paho_c_sub` that is killed is published.
///
/// Conformance (3.1.1): [MQTT-3.1.2-8] [MQTT-3.3.1-5] [MQTT-3.3.1-6]
#[tokio::test]
async fn paho_c_retained_message_and_will() {
    let broker = TestBroker::start().await;
    for version in ["311", "5"] {
        let prefix = format!("paho-ret-v{version}");
        let topic = format!("{prefix}/state");
        let mut a = tcp(&broker, version);
        a.extend(args(&["-i", &format!("{prefix}-pub"), "-t", &topic]));
        a.extend(args(&["-q", "1", "-r", "-m", "kept by paho"]));
        publish("paho_c_pub", &a).await;

        let client_id = format!("{prefix}-sub");
        let will = format!("wills/{client_id}");
        let mut peer = Peer::connect(&broker, &format!("{prefix}-peer")).await;
        peer.subscribe(&will, 2).await;
        let mut sub_args = tcp(&broker, version);
        sub_args.extend(args(&["-t", &topic, "-q", "2", "--will-topic", &will]));
        sub_args.extend(args(&["--will-payload", "paho gone", "--will-qos", "1"]));
        let mut sub = Subscriber::start(&broker, "paho_c_sub", &client_id, &sub_args).await;
        assert_eq!(
            sub.receive_n(1).await,
            [got(&topic, 1, true, b"kept by paho")],
            "retained message, MQTT {version}"
        );
        sub.kill().await;
        assert_eq!(
            peer.receive().await,
            got(&will, 1, false, b"paho gone"),
            "will, MQTT {version}"
        );
    }
}

/// `paho_c_pub` over TLS (`ssl://`), WebSocket and secure WebSocket (verifying the server
/// certificate against the test CA) publishes at QoS 2 to the peer; `paho_c_sub` over secure
/// WebSocket receives at every QoS.
#[tokio::test]
async fn paho_c_over_tls_websocket_and_secure_websocket() {
    let (broker, ca_file, _dir) = tls_broker().await;
    let ca_file = ca_file.display().to_string();
    let port = |a: Option<SocketAddr>| a.expect("listener").port();
    let urls = [
        ("tls", format!("ssl://localhost:{}", port(broker.tls)), true),
        (
            "ws",
            format!("ws://127.0.0.1:{}/mqtt", port(broker.ws)),
            false,
        ),
        (
            "wss",
            format!("wss://localhost:{}/mqtt", port(broker.wss)),
            true,
        ),
    ];

    let mut peer = Peer::connect(&broker, "paho-transports-peer").await;
    peer.subscribe("paho-transports/from-paho/#", 2).await;
    for (name, url, secure) in &urls {
        let mut a = args(&["-c", url, "-V", "5", "-i", &format!("paho-pub-{name}")]);
        if *secure {
            a.extend(args(&["--cafile", &ca_file]));
        }
        let topic = format!("paho-transports/from-paho/{name}");
        a.extend(args(&[
            "-t",
            &topic,
            "-q",
            "2",
            "-m",
            &format!("over {name}"),
        ]));
        publish("paho_c_pub", &a).await;
        assert_eq!(
            peer.receive().await,
            got(&topic, 2, false, format!("over {name}").as_bytes()),
            "paho_c_pub over {name}"
        );
    }

    let (_, wss_url, _) = &urls[2];
    let sub_args = args(&[
        "-c",
        wss_url,
        "-V",
        "311",
        "--cafile",
        &ca_file,
        "-t",
        "paho-transports/to-paho/#",
        "-q",
        "2",
    ]);
    let mut sub = Subscriber::start(&broker, "paho_c_sub", "paho-sub-wss", &sub_args).await;
    peer_to_paho(&mut peer, &mut sub, "paho-transports").await;
    sub.kill().await;
}

/// The synchronous Paho library (`paho_cs_pub` / `paho_cs_sub`), MQTT 5 and 3.1.1: QoS 2 both
/// ways, and every QoS to the subscriber.
#[tokio::test]
async fn paho_cs_synchronous_client_every_qos_both_ways() {
    let broker = TestBroker::start().await;
    for version in ["5", "311"] {
        let prefix = format!("paho-cs-v{version}");
        let mut peer = Peer::connect(&broker, &format!("{prefix}-peer")).await;
        peer.subscribe(&format!("{prefix}/from-paho/#"), 2).await;
        let mut sub_args = tcp(&broker, version);
        sub_args.extend(args(&["-t", &format!("{prefix}/to-paho/#"), "-q", "2"]));
        let mut sub =
            Subscriber::start(&broker, "paho_cs_sub", &format!("{prefix}-sub"), &sub_args).await;
        peer_to_paho(&mut peer, &mut sub, &prefix).await;
        sub.kill().await;

        let topic = format!("{prefix}/from-paho/2");
        let mut a = tcp(&broker, version);
        a.extend(args(&["-i", &format!("{prefix}-pub"), "-t", &topic]));
        a.extend(args(&["-q", "2", "-m", "sync at qos 2"]));
        publish("paho_cs_pub", &a).await;
        assert_eq!(
            peer.receive().await,
            got(&topic, 2, false, b"sync at qos 2")
        );
    }
}
