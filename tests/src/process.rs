//! Real `raftmq` processes as cluster nodes: where each listens and keeps its data
//! ([`NodeSpec`]), starting one and waiting until it is ready, killing it by its process id
//! (`kill -9`, SIGTERM, SIGSTOP), and reading its HTTP endpoints (readiness, the cluster view,
//! metrics, the admin API).
//!
//! The executable's path comes from the test (`env!("CARGO_BIN_EXE_raftmq")` is only known in
//! the package that builds it).

use crate::ports::free_port;
use crate::wait::{poll, poll_blocking};
use serde_json::Value;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Upper bound for a node to start (Raft leader election included) and for a cluster to agree.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for one HTTP exchange with a node.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// The log level of nodes started by tests: `RAFTMQ_TEST_NODE_LOG` (a `--log-level` value, e.g.
/// `warn,openraft=off,raftmq=info,raftmq_cluster=debug` to follow sessions in a chaos run), else
/// `warn,openraft=off,raftmq=info`.
fn node_log_level() -> String {
    std::env::var("RAFTMQ_TEST_NODE_LOG")
        .unwrap_or_else(|_| "warn,openraft=off,raftmq=info".to_owned())
}

/// Where one node listens and keeps its data, and how it is started.
#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// The `raftmq` executable.
    pub program: PathBuf,
    pub id: u64,
    pub mqtt: u16,
    pub http: u16,
    pub cluster: u16,
    /// Cluster addresses to join through (none: bootstrap a cluster of one).
    pub seeds: Vec<String>,
    pub data_dir: PathBuf,
    /// Extra environment variables (configuration keys) for the process.
    pub env: Vec<(String, String)>,
}

impl NodeSpec {
    /// Node `id` of `program`, keeping its data in `data_dir`, on fresh ports.
    pub fn new(program: impl Into<PathBuf>, id: u64, data_dir: PathBuf) -> NodeSpec {
        NodeSpec {
            program: program.into(),
            id,
            mqtt: free_port(),
            http: free_port(),
            cluster: free_port(),
            seeds: Vec::new(),
            data_dir,
            env: Vec::new(),
        }
    }

    /// Adds the environment variable `key` = `value` to the node's.
    pub fn with_env(mut self, key: &str, value: impl Into<String>) -> NodeSpec {
        self.env.push((key.to_owned(), value.into()));
        self
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.mqtt))
    }

    /// The cluster address, as peers and seeds name it.
    pub fn cluster_addr(&self) -> String {
        format!("127.0.0.1:{}", self.cluster)
    }

    /// The base URL of the HTTP API.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }

    /// The node's log (appended to across restarts), next to its data dir.
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.with_extension("log")
    }

    /// The last `n` lines of the node's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let mut out = format!("--- node {} log (last {n} lines) ---\n", self.id);
        for l in &lines[lines.len().saturating_sub(n)..] {
            out += l;
            out += "\n";
        }
        out
    }
}

/// `n` nodes of `program` (ids 1..=n, data in `dir/n<id>`) that all name each other as seeds.
pub fn cluster_specs(program: &str, dir: &std::path::Path, n: u64) -> Vec<NodeSpec> {
    let mut specs: Vec<NodeSpec> = (1..=n)
        .map(|id| NodeSpec::new(program, id, dir.join(format!("n{id}"))))
        .collect();
    let seeds: Vec<String> = specs.iter().map(NodeSpec::cluster_addr).collect();
    // `RAFTMQ_TEST_SHARDS=<n>` runs every multi-process cluster with n data shards.
    let shards = std::env::var("RAFTMQ_TEST_SHARDS").ok();
    for s in &mut specs {
        s.seeds = seeds.clone();
        if let Some(n) = &shards {
            s.env.push(("RAFTMQ_CLUSTER__SHARDS".to_owned(), n.clone()));
        }
    }
    specs
}

/// A running `raftmq` process (killed when dropped).
pub struct Node {
    pub spec: NodeSpec,
    child: Child,
}

impl Node {
    /// Starts the process (without waiting for it to be ready).
    pub fn spawn(spec: &NodeSpec) -> Node {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(spec.log_path())
            .map_or_else(|_| Stdio::inherit(), Stdio::from);
        let mut cmd = Command::new(&spec.program);
        cmd.env_clear()
            .args(["serve", "--log-level", &node_log_level()])
            .args(["--node-id", &spec.id.to_string()])
            .args(["--mqtt-addr", &format!("127.0.0.1:{}", spec.mqtt)])
            .args(["--http-addr", &format!("127.0.0.1:{}", spec.http)])
            .args(["--cluster-addr", &spec.cluster_addr()])
            .arg("--data-dir")
            .arg(&spec.data_dir)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log);
        if !spec.seeds.is_empty() {
            cmd.args(["--seeds", &spec.seeds.join(",")]);
        }
        Node {
            spec: spec.clone(),
            child: cmd.spawn().expect("starts raftmq"),
        }
    }

    /// Starts the node and waits until it reports ready.
    pub async fn start(spec: &NodeSpec) -> Node {
        let node = Node::spawn(spec);
        wait_ready(spec.http, true, START_TIMEOUT).await;
        node
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.spec.mqtt_addr()
    }

    /// The operating system's id of the process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status if the process has exited (`Ok(None)`: still running).
    pub fn try_wait(&mut self) -> std::io::Result<Option<std::process::ExitStatus>> {
        self.child.try_wait()
    }

    /// Sends `signal` (e.g. `-STOP`, `-CONT`, `-TERM`) to the process; asserts it was sent.
    pub fn signal(&self, signal: &str) {
        let pid = self.pid().to_string();
        let sent = Command::new("kill")
            .args([signal, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(sent, "kill {signal} {pid}");
    }

    /// SIGKILL: no shutdown, no flush.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (bounded) for the process to exit; returns its exit code.
    pub fn terminate(mut self) -> Option<i32> {
        self.signal("-TERM");
        poll_blocking(
            "the process exits after SIGTERM",
            Duration::from_secs(30),
            Duration::from_millis(50),
            || match self.child.try_wait().expect("wait") {
                Some(status) => Ok(status.code()),
                None => Err("still running"),
            },
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange with 127.0.0.1:`port`: `method` `path` with `headers` and `body`.
/// Returns the status code and the body; code 0 when the node is unreachable.
pub async fn http_call(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port)).await else {
        return (0, String::new());
    };
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    if s.write_all(req.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(HTTP_TIMEOUT, s.read_to_end(&mut buf)).await;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let code = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

/// GET `path`: the status code and the body (code 0 if unreachable).
pub async fn http_get(port: u16, path: &str) -> (u16, String) {
    http_call(port, "GET", path, &[], "").await
}

/// An API call with a bearer `token` and a JSON `body` when given; the answer's body as JSON
/// (one that is not JSON as a JSON string).
pub async fn http_json(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut headers = Vec::new();
    if let Some(t) = token {
        headers.push(("Authorization", format!("Bearer {t}")));
    }
    let body = body.map(Value::to_string).unwrap_or_default();
    if !body.is_empty() {
        headers.push(("Content-Type", "application/json".to_owned()));
    }
    let (code, text) = http_call(port, method, path, &headers, &body).await;
    let json = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (code, json)
}

/// Whether the node answers `/readyz` with 200.
pub async fn ready(http_port: u16) -> bool {
    http_get(http_port, "/readyz").await.0 == 200
}

/// Waits until the node with HTTP port `http_port` reports ready (`want`) or not ready.
pub async fn wait_ready(http_port: u16, want: bool, timeout: Duration) {
    let what = format!("the node on HTTP port {http_port} reports ready: {want}");
    poll(&what, timeout, Duration::from_millis(100), || async {
        let (code, body) = http_get(http_port, "/readyz").await;
        if (code == 200) == want {
            Ok(())
        } else {
            Err((code, body))
        }
    })
    .await;
}

/// The node's view of the cluster (`GET /api/v1/cluster`), if it answers.
pub async fn cluster_status(http_port: u16) -> Option<Value> {
    match http_json(http_port, "GET", "/api/v1/cluster", None, None).await {
        (200, v @ Value::Object(_)) => Some(v),
        _ => None,
    }
}

/// The voters in the node's view of the cluster, if it answers.
pub async fn voters(http_port: u16) -> Option<Vec<u64>> {
    let v = cluster_status(http_port).await?;
    Some(
        v["voters"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_u64).collect())
            .unwrap_or_default(),
    )
}

/// Every node's view of the cluster (in the order of `http_ports`).
pub async fn cluster_views(http_ports: &[u16]) -> Vec<Option<Value>> {
    let mut views = Vec::new();
    for p in http_ports {
        views.push(cluster_status(*p).await);
    }
    views
}

/// The leader if every view names the same one, with `voters` voters and the same applied
/// index.
pub fn agreed_leader(views: &[Option<Value>], voters: usize) -> Option<u64> {
    let first = views.first()?.as_ref()?;
    let agreed = views.iter().all(|v| {
        v.as_ref().is_some_and(|v| {
            v["voters"].as_array().is_some_and(|a| a.len() == voters)
                && v["leader"] == first["leader"]
                && v["last_applied"] == first["last_applied"]
        })
    });
    agreed.then(|| first["leader"].as_u64()).flatten()
}

/// The leader every view names, with `voters` voters each, and the lowest and highest applied
/// index among them; `None` while they disagree on the leader or the voters.
pub fn agreed_leader_applied(views: &[Option<Value>], voters: usize) -> Option<(u64, u64, u64)> {
    let first = views.first()?.as_ref()?;
    let mut applied = Vec::with_capacity(views.len());
    for v in views {
        let v = v.as_ref()?;
        if v["voters"].as_array().is_none_or(|a| a.len() != voters)
            || v["leader"] != first["leader"]
        {
            return None;
        }
        applied.push(v["last_applied"].as_u64().unwrap_or(0));
    }
    let leader = first["leader"].as_u64()?;
    Some((leader, *applied.iter().min()?, *applied.iter().max()?))
}

/// Waits (up to [`START_TIMEOUT`]) until every node in `http_ports` reports the same leader
/// and `voters` voters, and every one has applied what the most advanced had applied when they
/// first agreed (not "the same applied index at one instant", which a cluster under steady load
/// may seldom show); returns the leader id.
pub async fn wait_converged(http_ports: &[u16], voters: usize) -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    // The index to reach, fixed when the nodes first agree on the leader (MAX: not yet).
    let goal = AtomicU64::new(u64::MAX);
    let goal = &goal;
    poll(
        "the cluster converges",
        START_TIMEOUT,
        Duration::from_millis(200),
        || async move {
            let views = cluster_views(http_ports).await;
            match agreed_leader_applied(&views, voters) {
                Some((leader, lowest, highest)) => {
                    let _ = goal.compare_exchange(u64::MAX, highest, Relaxed, Relaxed);
                    if lowest >= goal.load(Relaxed) {
                        Ok(leader)
                    } else {
                        Err(views)
                    }
                }
                None => Err(views),
            }
        },
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn agreement_on_the_leader_reports_the_spread_of_applied_indexes() {
        let view = |leader: u64, applied: u64| {
            Some(json!({"leader": leader, "voters": [1, 2, 3], "last_applied": applied}))
        };
        assert_eq!(
            agreed_leader_applied(&[view(2, 9), view(2, 7), view(2, 12)], 3),
            Some((2, 7, 12))
        );
        assert_eq!(
            agreed_leader_applied(&[view(2, 9), view(1, 9), view(2, 9)], 3),
            None
        );
        assert_eq!(agreed_leader_applied(&[view(2, 9), None], 3), None);
        let two_voters = Some(json!({"leader": 2, "voters": [1, 2], "last_applied": 9}));
        assert_eq!(agreed_leader_applied(&[view(2, 9), two_voters], 3), None);
    }

    #[test]
    fn agreement_needs_the_same_leader_voters_and_applied_index() {
        let view = |leader: u64, applied: u64| {
            Some(json!({"leader": leader, "voters": [1, 2, 3], "last_applied": applied}))
        };
        assert_eq!(
            agreed_leader(&[view(2, 9), view(2, 9), view(2, 9)], 3),
            Some(2)
        );
        assert_eq!(
            agreed_leader(&[view(2, 9), view(1, 9), view(2, 9)], 3),
            None
        );
        assert_eq!(
            agreed_leader(&[view(2, 9), view(2, 8), view(2, 9)], 3),
            None
        );
        assert_eq!(agreed_leader(&[view(2, 9), None, view(2, 9)], 3), None);
        assert_eq!(agreed_leader(&[view(2, 9)], 2), None, "voters counted");
        assert_eq!(agreed_leader(&[], 3), None);
    }

    #[tokio::test]
    async fn an_unreachable_node_answers_code_0() {
        let port = free_port();
        assert_eq!(http_get(port, "/readyz").await, (0, String::new()));
        assert!(!ready(port).await);
        assert_eq!(cluster_status(port).await, None);
    }
}
