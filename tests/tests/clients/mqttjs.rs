//! MQTT.js (Debian's `node-mqtt`) against the broker: in Node over TCP, TLS and secure
//! WebSocket, and bundled with esbuild into a page that headless Chromium runs over WebSocket
//! and secure WebSocket.
//!
//! Both run the same JavaScript (`tests/fixtures/mqttjs/driver.js`), driven one command at a
//! time so that the test decides what happens when: Node reads commands as JSON lines on stdin
//! and answers on stdout; in the browser the test evaluates `raftmqRun(command)` in the page
//! through the DevTools protocol (`Runtime.evaluate`, awaiting the promise). Every command that
//! waits has a deadline on both sides. The other end of each exchange is a raw MQTT client
//! ([`Peer`]) that sees exactly the QoS, retain flag and payload the broker sent.
//!
//! Secure WebSocket in the browser: headless Chromium is started with
//! `--ignore-certificate-errors` (its trust store is not the test's CA); Node and the Paho
//! client verify the server certificate against the test CA.

use super::{Got, Peer, got, spawn_program, tls_broker};
use futures_util::{SinkExt, StreamExt};
use raftmq_server::{LimitsConfig, ListenersConfig};
use raftmq_tests::{TIMEOUT, TestBroker, wait_until};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

/// Where Debian installs Node packages (MQTT.js and its dependencies).
const NODE_PATH: &str = "/usr/share/nodejs";
/// The JavaScript side's deadline for a command that waits (a CONNACK, messages).
const JS_WAIT_MS: u64 = 10_000;
/// The test's deadline for one command: the JavaScript one plus a margin.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// Upper bound for Chromium to start and load the page.
const BROWSER_START: Duration = Duration::from_secs(30);

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mqttjs")
}

/// Fails the test, clearly, when Debian's MQTT.js is not installed.
fn require_mqttjs() {
    assert!(
        Path::new(NODE_PATH).join("mqtt/package.json").exists(),
        "MQTT.js not found in {NODE_PATH}/mqtt: run scripts/install-prereqs --test \
         (apt-get install node-mqtt)"
    );
}

/// One MQTT.js client that the test drives one command at a time (see `driver.js`).
trait Driver {
    /// Runs `cmd`: what it resolved to, or the JavaScript error.
    async fn call(&mut self, cmd: Value) -> Result<Value, String>;
    /// What the client's process or browser logged, for failure messages.
    fn log(&self) -> String;
}

/// Runs `cmd` and returns what it resolved to; fails the test on an error.
async fn run<D: Driver>(d: &mut D, cmd: Value) -> Value {
    let shown = cmd.to_string();
    match d.call(cmd).await {
        Ok(v) => v,
        Err(e) => panic!("MQTT.js command {shown} failed: {e}\n{}", d.log()),
    }
}

/// The messages a `next` command returned.
fn messages(v: &Value) -> Vec<Got> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected a list of messages, got {v}"))
        .iter()
        .map(|m| {
            got(
                m["topic"].as_str().expect("topic"),
                m["qos"]
                    .as_u64()
                    .and_then(|q| u8::try_from(q).ok())
                    .expect("qos"),
                m["retain"].as_bool().expect("retain"),
                m["payload"].as_str().expect("payload").as_bytes(),
            )
        })
        .collect()
}

/// The next `count` messages MQTT.js received, in order.
async fn next<D: Driver>(d: &mut D, count: usize) -> Vec<Got> {
    let v = run(
        d,
        json!({"op": "next", "count": count, "timeoutMs": JS_WAIT_MS}),
    )
    .await;
    messages(&v)
}

fn expected(items: &[(&str, u8, bool, &str)]) -> Vec<Got> {
    items
        .iter()
        .map(|(t, q, r, p)| got(t, *q, *r, p.as_bytes()))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// What every MQTT.js client goes through
// ---------------------------------------------------------------------------------------------

/// Connects MQTT.js to `url` as `client_id` with MQTT `version` (4: 3.1.1, 5: 5.0), a clean
/// session, a will (QoS 1, "gone" on `wills/<client_id>`) and reconnection every 200 ms;
/// `extra` is merged into the command (e.g. `caFile` for Node).
async fn connect<D: Driver>(d: &mut D, url: &str, client_id: &str, version: u8, extra: Value) {
    let mut cmd = json!({
        "op": "connect",
        "url": url,
        "timeoutMs": JS_WAIT_MS,
        "options": {
            "clientId": client_id,
            "protocolVersion": version,
            "clean": true,
            "keepalive": 30,
            "reconnectPeriod": 200,
            "connectTimeout": 5000,
            "will": {
                "topic": format!("wills/{client_id}"),
                "payload": "gone",
                "qos": 1,
                "retain": false,
            },
        },
    });
    if let (Some(cmd), Some(extra)) = (cmd.as_object_mut(), extra.as_object()) {
        cmd.extend(extra.clone());
    }
    let ack = run(d, cmd).await;
    assert_eq!(
        ack,
        json!({"sessionPresent": false, "code": 0}),
        "CONNACK to MQTT.js"
    );
}

/// MQTT.js subscribes to `<prefix>/to-js/#` at QoS 2 and gets the peer's messages at QoS 0, 1
/// and 2 in order, with their QoS; then publishes at QoS 0, 1 and 2 (each completed: PUBACK,
/// PUBCOMP) and the peer gets them in order with their QoS. Returns the peer.
async fn every_qos_both_ways<D: Driver>(d: &mut D, broker: &TestBroker, prefix: &str) -> Peer {
    let mut peer = Peer::connect(broker, &format!("{prefix}-peer")).await;
    peer.subscribe(&format!("{prefix}/from-js/#"), 2).await;
    let granted = run(
        d,
        json!({"op": "subscribe", "filter": format!("{prefix}/to-js/#"), "qos": 2,
               "timeoutMs": JS_WAIT_MS}),
    )
    .await;
    assert_eq!(granted, json!([2]), "granted QoS");

    for q in 0..=2u8 {
        let topic = format!("{prefix}/to-js/{q}");
        peer.publish(&topic, q, false, &format!("to js at qos {q}"))
            .await;
    }
    let want: Vec<Got> = (0..=2u8)
        .map(|q| {
            let topic = format!("{prefix}/to-js/{q}");
            got(&topic, q, false, format!("to js at qos {q}").as_bytes())
        })
        .collect();
    assert_eq!(next(d, 3).await, want, "what MQTT.js received");

    for q in 0..=2u8 {
        run(
            d,
            json!({"op": "publish", "topic": format!("{prefix}/from-js/{q}"),
                   "payload": format!("from js at qos {q}"), "qos": q, "timeoutMs": JS_WAIT_MS}),
        )
        .await;
    }
    let want: Vec<Got> = (0..=2u8)
        .map(|q| {
            let topic = format!("{prefix}/from-js/{q}");
            got(&topic, q, false, format!("from js at qos {q}").as_bytes())
        })
        .collect();
    assert_eq!(peer.receive_n(3).await, want, "what the peer received");
    peer
}

/// A retained message set by MQTT.js reaches a later subscriber (the peer) with RETAIN 1, and
/// one set by the peer reaches MQTT.js when it subscribes later.
async fn retained_both_ways<D: Driver>(d: &mut D, peer: &mut Peer, prefix: &str) {
    let js_topic = format!("{prefix}/retained/js");
    run(
        d,
        json!({"op": "publish", "topic": js_topic, "payload": "kept by js", "qos": 1,
               "retain": true, "timeoutMs": JS_WAIT_MS}),
    )
    .await;
    peer.subscribe(&js_topic, 2).await;
    assert_eq!(
        peer.receive().await,
        got(&js_topic, 1, true, b"kept by js"),
        "retained message from MQTT.js"
    );

    let peer_topic = format!("{prefix}/retained/peer");
    peer.publish(&peer_topic, 2, true, "kept by peer").await;
    let granted = run(
        d,
        json!({"op": "subscribe", "filter": peer_topic, "qos": 2, "timeoutMs": JS_WAIT_MS}),
    )
    .await;
    assert_eq!(granted, json!([2]));
    assert_eq!(
        next(d, 1).await,
        expected(&[(&peer_topic, 2, true, "kept by peer")]),
        "retained message to MQTT.js"
    );
}

/// MQTT.js drops its connection without DISCONNECT (`end(true)`): the peer gets its will.
async fn will_on_dropped_connection<D: Driver>(d: &mut D, peer: &mut Peer, client_id: &str) {
    let topic = format!("wills/{client_id}");
    peer.subscribe(&topic, 2).await;
    run(
        d,
        json!({"op": "end", "force": true, "timeoutMs": JS_WAIT_MS}),
    )
    .await;
    assert_eq!(peer.receive().await, got(&topic, 1, false, b"gone"), "will");
    peer.expect_nothing(Duration::from_millis(200)).await;
}

// ---------------------------------------------------------------------------------------------
// MQTT.js in Node
// ---------------------------------------------------------------------------------------------

/// `node tests/fixtures/mqttjs/node.js`: one MQTT.js client, commands on stdin.
struct NodeClient {
    _child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    next_id: u64,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl NodeClient {
    fn start() -> NodeClient {
        require_mqttjs();
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("node.log");
        let stderr = std::fs::File::create(&log).expect("node log");
        let mut cmd = Command::new("node");
        cmd.arg(fixtures().join("node.js"))
            .env("NODE_PATH", NODE_PATH)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true);
        let mut child = spawn_program(cmd, "node", "nodejs");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout")).lines();
        NodeClient {
            _child: child,
            stdin,
            stdout,
            next_id: 0,
            log,
            _dir: dir,
        }
    }
}

impl Driver for NodeClient {
    async fn call(&mut self, mut cmd: Value) -> Result<Value, String> {
        self.next_id += 1;
        cmd["id"] = json!(self.next_id);
        let line = format!("{cmd}\n");
        self.stdin
            .write_all(line.as_bytes())
            .await
            .map_err(|e| format!("writing to node: {e}"))?;
        self.stdin.flush().await.map_err(|e| e.to_string())?;
        let answer = tokio::time::timeout(COMMAND_TIMEOUT, self.stdout.next_line())
            .await
            .map_err(|_| format!("node did not answer within {COMMAND_TIMEOUT:?}"))?
            .map_err(|e| format!("reading from node: {e}"))?
            .ok_or("node exited")?;
        let answer: Value =
            serde_json::from_str(&answer).map_err(|e| format!("{e} in node's answer {answer}"))?;
        if answer["id"] != json!(self.next_id) {
            return Err(format!("answer to another command: {answer}"));
        }
        match answer["ok"].as_bool() {
            Some(true) => Ok(answer["result"].clone()),
            _ => Err(answer["error"].to_string()),
        }
    }

    fn log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        format!("--- node's stderr ---\n{text}")
    }
}

/// Conformance (3.1.1): [MQTT-7.0.0-2]
/// Conformance (5.0): [MQTT-4.2.0-1]
#[tokio::test]
async fn mqttjs_node_tcp_v311_and_v5_every_qos_retained_and_will() {
    let broker = TestBroker::start().await;
    for version in [4u8, 5] {
        let prefix = format!("node-v{version}");
        let client_id = format!("{prefix}-js");
        let mut js = NodeClient::start();
        let url = format!("mqtt://{}", broker.mqtt);
        connect(&mut js, &url, &client_id, version, json!({})).await;
        let mut peer = every_qos_both_ways(&mut js, &broker, &prefix).await;
        retained_both_ways(&mut js, &mut peer, &prefix).await;
        will_on_dropped_connection(&mut js, &mut peer, &client_id).await;
    }
}

/// MQTT.js in Node over TLS (`mqtts://`, MQTT 5) and secure WebSocket (`wss://`, MQTT 3.1.1),
/// verifying the server's certificate against the test CA.
#[tokio::test]
async fn mqttjs_node_over_tls_and_secure_websocket_trusting_the_test_ca() {
    let (broker, ca_file, _dir) = tls_broker().await;
    let tls = broker.tls.expect("TLS listener").port();
    let wss = broker.wss.expect("wss listener").port();
    for (url, version, prefix) in [
        (format!("mqtts://localhost:{tls}"), 5u8, "node-tls"),
        (format!("wss://localhost:{wss}/mqtt"), 4, "node-wss"),
    ] {
        let client_id = format!("{prefix}-js");
        let mut js = NodeClient::start();
        let ca = json!({"caFile": ca_file});
        connect(&mut js, &url, &client_id, version, ca).await;
        let mut peer = every_qos_both_ways(&mut js, &broker, prefix).await;
        will_on_dropped_connection(&mut js, &mut peer, &client_id).await;
    }
}

// ---------------------------------------------------------------------------------------------
// MQTT.js in headless Chromium
// ---------------------------------------------------------------------------------------------

/// Bundles `browser.js` (with MQTT.js and the Node globals it expects) into `dir/bundle.js`
/// with esbuild and puts the page beside it.
async fn bundle(dir: &Path) {
    require_mqttjs();
    let fx = fixtures();
    let mut cmd = Command::new("esbuild");
    cmd.arg(fx.join("browser.js"))
        .args([
            "--bundle",
            "--platform=browser",
            "--log-level=warning",
            "--define:global=globalThis",
        ])
        // MQTT.js uses the browser's own WebSocket there; `ws` is Node's.
        .arg(format!("--alias:ws={NODE_PATH}/ws/browser.js"))
        .arg(format!("--inject:{}", fx.join("inject.js").display()))
        .arg(format!("--outfile={}", dir.join("bundle.js").display()))
        .env("NODE_PATH", NODE_PATH)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = spawn_program(cmd, "esbuild", "esbuild");
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .expect("esbuild did not finish in time")
        .expect("wait for esbuild");
    assert!(
        out.status.success(),
        "esbuild failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::copy(fx.join("page.html"), dir.join("page.html")).expect("copy the page");
}

/// Headless Chromium showing the test page, driven over the DevTools protocol.
struct Browser {
    child: Child,
    cdp: WebSocketStream<TcpStream>,
    /// The DevTools session attached to the page.
    session: String,
    next_id: u64,
    /// Console messages and exceptions of the page, for failure messages.
    events: Vec<String>,
    dir: tempfile::TempDir,
}

impl Browser {
    /// Bundles the page, starts Chromium and waits until the page is ready for commands.
    async fn start() -> Browser {
        let dir = tempfile::tempdir().expect("temp dir");
        bundle(dir.path()).await;
        let profile = dir.path().join("profile");
        let log = std::fs::File::create(dir.path().join("chromium.log")).expect("chromium log");
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-domain-reliability",
            "--no-pings",
            // Nothing but this machine: no name resolves except localhost, and whatever is not
            // loopback would go to a proxy that is not there.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
            "--proxy-server=http://127.0.0.1:9",
            // The secure WebSocket listener's certificate comes from the test's own CA.
            "--ignore-certificate-errors",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
        let mut child = spawn_program(cmd, "chromium", "chromium");

        // Chromium writes the port it chose (and the browser's DevTools path) into the profile.
        let deadline = Instant::now() + BROWSER_START;
        let active = profile.join("DevToolsActivePort");
        let (port, path) = loop {
            if let Ok(text) = std::fs::read_to_string(&active)
                && let Some((port, path)) = text.split_once('\n')
                && let Ok(port) = port.trim().parse::<u16>()
                && !path.trim().is_empty()
            {
                break (port, path.trim().to_owned());
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "chromium exited ({status}) before it listened for DevTools\n{}",
                    chromium_log(dir.path())
                );
            }
            assert!(
                Instant::now() < deadline,
                "chromium did not start within {BROWSER_START:?}\n{}",
                chromium_log(dir.path())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to DevTools");
        let url = format!("ws://127.0.0.1:{port}{path}");
        let (cdp, _) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::client_async(url, stream))
            .await
            .expect("DevTools handshake timed out")
            .expect("DevTools handshake");
        let mut b = Browser {
            child,
            cdp,
            session: String::new(),
            next_id: 0,
            events: Vec::new(),
            dir,
        };
        let page = format!("file://{}", b.dir.path().join("page.html").display());
        let target = b
            .cdp("Target.createTarget", json!({"url": page}), false)
            .await
            .unwrap_or_else(|e| panic!("open the page: {e}"));
        let attached = b
            .cdp(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
                false,
            )
            .await
            .unwrap_or_else(|e| panic!("attach to the page: {e}"));
        b.session = attached["sessionId"]
            .as_str()
            .expect("DevTools session id")
            .to_owned();
        b.cdp("Runtime.enable", json!({}), true)
            .await
            .unwrap_or_else(|e| panic!("Runtime.enable: {e}"));
        // The page sets its title once the bundle has run.
        loop {
            let title = b
                .cdp(
                    "Runtime.evaluate",
                    json!({"expression": "document.title", "returnByValue": true}),
                    true,
                )
                .await;
            if matches!(&title, Ok(v) if v["result"]["value"] == "raftmq-ready") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the page did not load within {BROWSER_START:?} (title: {title:?})\n{}",
                b.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b
    }

    /// Sends one DevTools command (to the page's session when `on_page`) and waits for its
    /// answer, keeping the page's console messages and exceptions that arrive meanwhile.
    async fn cdp(&mut self, method: &str, params: Value, on_page: bool) -> Result<Value, String> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if on_page {
            msg["sessionId"] = json!(self.session);
        }
        self.cdp
            .send(Message::Text(msg.to_string().into()))
            .await
            .map_err(|e| format!("DevTools send: {e}"))?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.cdp.next())
                .await
                .map_err(|_| format!("no answer to {method} within {COMMAND_TIMEOUT:?}"))?
                .ok_or("the DevTools connection closed")?
                .map_err(|e| format!("DevTools: {e}"))?;
            let Message::Text(text) = msg else { continue };
            let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
            if v["id"] == json!(id) {
                return match v.get("error") {
                    Some(e) => Err(format!("{method}: {e}")),
                    None => Ok(v["result"].clone()),
                };
            }
            match v["method"].as_str() {
                Some("Runtime.consoleAPICalled") => self.events.push(format!(
                    "console.{}: {}",
                    v["params"]["type"].as_str().unwrap_or("?"),
                    v["params"]["args"]
                )),
                Some("Runtime.exceptionThrown") => self
                    .events
                    .push(format!("exception: {}", v["params"]["exceptionDetails"])),
                Some("Inspector.targetCrashed") => return Err("the page crashed".into()),
                _ => {}
            }
        }
    }

    /// Closes the browser (bounded; killed if it does not exit).
    async fn close(mut self) {
        let _ = self.cdp("Browser.close", json!({}), false).await;
        if tokio::time::timeout(TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

fn chromium_log(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("chromium.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
    format!("--- chromium's stderr (last 30 lines) ---\n{tail}")
}

impl Driver for Browser {
    async fn call(&mut self, cmd: Value) -> Result<Value, String> {
        let expression = format!("raftmqRun({cmd})");
        let r = self
            .cdp(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
                true,
            )
            .await?;
        if let Some(e) = r.get("exceptionDetails") {
            return Err(format!("exception in the page: {e}"));
        }
        let text = r["result"]["value"]
            .as_str()
            .ok_or_else(|| format!("unexpected evaluation result {r}"))?;
        let answer: Value = serde_json::from_str(text).map_err(|e| format!("{e}: {text}"))?;
        match answer["ok"].as_bool() {
            Some(true) => Ok(answer["result"].clone()),
            _ => Err(answer["error"].to_string()),
        }
    }

    fn log(&self) -> String {
        format!(
            "--- the page's console and exceptions ---\n{}\n{}",
            self.events.join("\n"),
            chromium_log(self.dir.path())
        )
    }
}

/// MQTT.js in headless Chromium over WebSocket (MQTT 5): every QoS both ways, retained
/// messages both ways, then the broker restarts: MQTT.js reconnects by itself, subscribes
/// again (and so gets the retained message again), and messages flow both ways again; last,
/// its will when it drops the connection.
///
/// Conformance (5.0): [MQTT-4.2.0-1]
#[tokio::test]
async fn mqttjs_in_chromium_over_websocket_every_qos_retained_restart_and_will() {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let listeners = ListenersConfig {
        ws: Some(any),
        ..ListenersConfig::default()
    };
    let core = Arc::new(raftmq_core::Broker::new(Default::default()));
    let broker = TestBroker::with_server(core, listeners, None, LimitsConfig::default()).await;
    let ws = broker.ws.expect("ws listener");
    let mut page = Browser::start().await;
    let prefix = "browser-ws";
    let client_id = "browser-ws-js";
    connect(
        &mut page,
        &format!("ws://{ws}/mqtt"),
        client_id,
        5,
        json!({}),
    )
    .await;
    let mut peer = every_qos_both_ways(&mut page, &broker, prefix).await;
    retained_both_ways(&mut page, &mut peer, prefix).await;
    drop(peer);

    let broker = broker.restart().await;
    let seen = run(
        &mut page,
        json!({"op": "connects", "count": 2, "timeoutMs": JS_WAIT_MS}),
    )
    .await;
    assert_eq!(seen["connects"], 2, "MQTT.js reconnected once: {seen}");
    // MQTT.js subscribes again by itself (to-js/# and retained/peer).
    let core = broker.broker.clone();
    wait_until("MQTT.js subscribed again after the restart", || {
        core.session(client_id)
            .is_some_and(|s| s.is_online() && s.subscription_count() == 2)
    })
    .await;
    let retained = format!("{prefix}/retained/peer");
    assert_eq!(
        next(&mut page, 1).await,
        expected(&[(&retained, 2, true, "kept by peer")]),
        "the retained message again, after subscribing again"
    );
    let mut peer = Peer::connect(&broker, "browser-ws-peer-2").await;
    peer.subscribe(&format!("{prefix}/from-js/#"), 2).await;
    peer.publish(
        &format!("{prefix}/to-js/again"),
        2,
        false,
        "after the restart",
    )
    .await;
    assert_eq!(
        next(&mut page, 1).await,
        expected(&[(
            &format!("{prefix}/to-js/again"),
            2,
            false,
            "after the restart"
        )])
    );
    for q in [1u8, 2] {
        run(
            &mut page,
            json!({"op": "publish", "topic": format!("{prefix}/from-js/again"),
                   "payload": format!("again at qos {q}"), "qos": q, "timeoutMs": JS_WAIT_MS}),
        )
        .await;
    }
    let topic = format!("{prefix}/from-js/again");
    assert_eq!(
        peer.receive_n(2).await,
        expected(&[
            (&topic, 1, false, "again at qos 1"),
            (&topic, 2, false, "again at qos 2")
        ])
    );
    will_on_dropped_connection(&mut page, &mut peer, client_id).await;
    page.close().await;
}

/// MQTT.js in headless Chromium over secure WebSocket (MQTT 3.1.1): every QoS both ways,
/// retained messages both ways, its will.
///
/// Conformance (3.1.1): [MQTT-7.0.0-2]
#[tokio::test]
async fn mqttjs_in_chromium_over_secure_websocket_v311_every_qos_retained_and_will() {
    let (broker, _ca, _dir) = tls_broker().await;
    let wss = broker.wss.expect("wss listener").port();
    let mut page = Browser::start().await;
    let prefix = "browser-wss";
    let client_id = "browser-wss-js";
    let url = format!("wss://localhost:{wss}/mqtt");
    connect(&mut page, &url, client_id, 4, json!({})).await;
    let mut peer = every_qos_both_ways(&mut page, &broker, prefix).await;
    retained_both_ways(&mut page, &mut peer, prefix).await;
    will_on_dropped_connection(&mut page, &mut peer, client_id).await;
    page.close().await;
}
