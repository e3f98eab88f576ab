//! The cluster a chaos run hits, and how each fault is dealt to one of its nodes: three
//! `raftmq` processes (the default), or three containers with `RAFTMQ_CHAOS_DOCKER=1`.
//!
//! | fault | processes | containers ([`raftmq_tests::docker`]) |
//! |---|---|---|
//! | kill -9, restart | SIGKILL, spawned again on its data dir | `docker kill -s KILL`, `docker start` (its volume) |
//! | partition | the nodes' `cluster.faults_file` (the node's links dropped inside every node) | `docker network disconnect` from the cluster network, `connect --alias` to heal |
//! | pause | SIGSTOP, SIGCONT | `docker pause`, `docker unpause` (cgroup freezer) |
//! | slow disk | `cluster.disk_faults_file` in the test's directory | the same file, in a host directory bind-mounted read-only |
//!
//! In both, clients reach every node all along (for containers: through a second network,
//! the one their ports are published from), so a client of a cut-off node sees exactly what
//! that node does.

use super::super::{
    Node, NodeSpec, RAFTMQ, disk_faults_file, kill9, partition, start_cluster, wait_converged,
};
use raftmq_tests::docker::DockerCluster;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The environment variable that selects the containers (`1`) instead of processes.
pub(crate) const DOCKER_VAR: &str = "RAFTMQ_CHAOS_DOCKER";

/// Three nodes under test and the faults dealt to them (see the module docs). A node paused
/// when it is dropped (a failing test) is resumed first; containers, networks and volumes are
/// removed.
pub(crate) struct ChaosCluster {
    backend: Backend,
    ids: Vec<u64>,
    http: Vec<u16>,
    mqtt: Vec<SocketAddr>,
}

enum Backend {
    /// Fields in drop order: the nodes are killed before their directory goes.
    Processes {
        nodes: Vec<Option<Node>>,
        /// The process id of each node stopped with SIGSTOP.
        paused: Vec<Option<u32>>,
        specs: Vec<NodeSpec>,
        dir: tempfile::TempDir,
    },
    Docker(DockerCluster),
}

/// Whether `RAFTMQ_CHAOS_DOCKER` selects containers (`1`); processes when unset, empty or
/// `0`; anything else is refused.
pub(crate) fn docker_selected() -> bool {
    match std::env::var(DOCKER_VAR).as_deref() {
        Ok("1") => true,
        Ok("" | "0") | Err(_) => false,
        Ok(other) => panic!("{DOCKER_VAR}={other:?}: expected 1 (containers) or 0 (processes)"),
    }
}

impl ChaosCluster {
    /// Starts three nodes, as processes or (`RAFTMQ_CHAOS_DOCKER=1`) containers, and waits
    /// until they agree on a leader. Containers need a Docker daemon: without one, this fails
    /// saying so (it never falls back to processes).
    pub(crate) async fn start() -> ChaosCluster {
        if !docker_selected() {
            let (dir, specs, nodes, _leader) = start_cluster().await;
            return ChaosCluster {
                ids: specs.iter().map(|s| s.id).collect(),
                http: specs.iter().map(|s| s.http).collect(),
                mqtt: specs.iter().map(NodeSpec::mqtt_addr).collect(),
                backend: Backend::Processes {
                    paused: vec![None; nodes.len()],
                    nodes,
                    specs,
                    dir,
                },
            };
        }
        // Building the image and creating the containers are blocking commands.
        let docker = tokio::task::spawn_blocking(|| DockerCluster::start(RAFTMQ.as_ref(), 3, &[]))
            .await
            .unwrap_or_else(|e| match e.try_into_panic() {
                Ok(panic) => std::panic::resume_unwind(panic),
                Err(e) => panic!("starting the containers: {e}"),
            });
        let cluster = ChaosCluster {
            ids: docker.nodes.iter().map(|d| d.id).collect(),
            http: docker.nodes.iter().map(|d| d.http).collect(),
            mqtt: docker.nodes.iter().map(|d| d.mqtt_addr()).collect(),
            backend: Backend::Docker(docker),
        };
        wait_converged(&cluster.http, 3).await;
        cluster
    }

    /// What the nodes are, for the run's first line.
    pub(crate) fn describe(&self) -> String {
        match &self.backend {
            Backend::Processes { dir, .. } => {
                format!("3 processes (in {})", dir.path().display())
            }
            Backend::Docker(d) => format!(
                "3 containers {}-n1..3 of image {} (partitions: docker network disconnect from \
                 {}; clients through {})",
                d.prefix, d.image, d.cluster_net, d.clients_net
            ),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }

    /// Node `i`'s id.
    pub(crate) fn id(&self, i: usize) -> u64 {
        self.ids[i]
    }

    /// The index of the node with id `id`.
    pub(crate) fn position(&self, id: u64) -> Option<usize> {
        self.ids.iter().position(|n| *n == id)
    }

    /// Each node's HTTP port on 127.0.0.1.
    pub(crate) fn http_ports(&self) -> Vec<u16> {
        self.http.clone()
    }

    /// Each node's MQTT address.
    pub(crate) fn mqtt_addrs(&self) -> Vec<SocketAddr> {
        self.mqtt.clone()
    }

    /// Cuts node `i` off from the others (clients still reach it) until [`Self::reconnect`].
    pub(crate) async fn cut_off(&mut self, i: usize) {
        let id = self.ids[i];
        match &self.backend {
            Backend::Processes { dir, .. } => {
                let rest: Vec<u64> = self.ids.iter().copied().filter(|n| *n != id).collect();
                partition(dir.path(), &[&[id], &rest]);
            }
            Backend::Docker(d) => d.disconnect(i).await,
        }
    }

    /// Heals the partition of [`Self::cut_off`].
    pub(crate) async fn reconnect(&mut self, i: usize) {
        match &self.backend {
            Backend::Processes { dir, .. } => partition(dir.path(), &[]),
            Backend::Docker(d) => d.connect(i).await,
        }
    }

    /// Freezes node `i` (SIGSTOP, `docker pause`), its sockets open, until [`Self::resume`].
    /// A process that is not running is left alone.
    pub(crate) async fn pause(&mut self, i: usize) {
        match &mut self.backend {
            Backend::Processes { nodes, paused, .. } => {
                if let Some(node) = &nodes[i] {
                    node.signal("-STOP");
                    paused[i] = Some(node.pid());
                }
            }
            Backend::Docker(d) => d.pause(i).await,
        }
    }

    /// Resumes node `i` after [`Self::pause`].
    pub(crate) async fn resume(&mut self, i: usize) {
        match &mut self.backend {
            Backend::Processes { paused, .. } => {
                if let Some(pid) = paused[i].take() {
                    cont(pid);
                }
            }
            Backend::Docker(d) => d.unpause(i).await,
        }
    }

    /// The file that slows node `i`'s disk (`cluster.disk_faults_file`, as the node reads it
    /// from this machine's point of view).
    pub(crate) fn disk_faults_file(&self, i: usize) -> PathBuf {
        match &self.backend {
            Backend::Processes { dir, .. } => disk_faults_file(dir.path(), self.ids[i]),
            Backend::Docker(d) => d.disk_faults_file(i),
        }
    }

    /// Kills node `i` with -9 (no shutdown, no flush).
    pub(crate) async fn kill9(&mut self, i: usize) {
        match &mut self.backend {
            Backend::Processes { nodes, .. } => kill9(nodes, i),
            Backend::Docker(d) => d.kill9(i).await,
        }
    }

    /// Starts node `i` again on its data (without waiting until it is ready).
    pub(crate) async fn restart(&mut self, i: usize) {
        match &mut self.backend {
            Backend::Processes { nodes, specs, .. } => nodes[i] = Some(Node::spawn(&specs[i])),
            Backend::Docker(d) => d.start_node(i).await,
        }
    }

    /// Each node's state: a process's exit status (`Ok(None)`: running), a container's
    /// (`running exit 0`, `exited exit 137`, ...).
    pub(crate) async fn states(&mut self) -> Vec<String> {
        match &mut self.backend {
            Backend::Processes { nodes, .. } => nodes
                .iter_mut()
                .map(|n| match n {
                    Some(n) => format!("{:?}", n.try_wait()),
                    None => "not running".to_owned(),
                })
                .collect(),
            Backend::Docker(d) => {
                let mut states = Vec::new();
                for i in 0..d.nodes.len() {
                    states.push(d.state(i).await);
                }
                states
            }
        }
    }

    /// The process id (on this machine) of node `i` if it is running, for a debugger.
    pub(crate) async fn running_pid(&mut self, i: usize) -> Option<u32> {
        match &mut self.backend {
            Backend::Processes { nodes, .. } => {
                let n = nodes[i].as_mut()?;
                matches!(n.try_wait(), Ok(None)).then(|| n.pid())
            }
            Backend::Docker(d) => d.pid(i).await,
        }
    }

    /// Node `i`'s whole log (across its restarts).
    pub(crate) async fn log(&self, i: usize) -> String {
        match &self.backend {
            Backend::Processes { specs, .. } => {
                std::fs::read_to_string(specs[i].log_path()).unwrap_or_default()
            }
            Backend::Docker(d) => d.logs(i).await,
        }
    }

    /// Copies RocksDB's own logs (files named `LOG`: compaction and write-stall statistics)
    /// of node `i`'s data dir into `to`, as `n<id>-<path with _ for />`; best effort.
    pub(crate) async fn copy_store_logs(&self, i: usize, to: &Path) {
        let id = self.ids[i];
        match &self.backend {
            Backend::Processes { specs, .. } => copy_logs_under(&specs[i].data_dir, id, to),
            Backend::Docker(d) => {
                // The volume is read through the container (running or not): `docker cp`.
                let copy = to.join(format!(".n{id}-data"));
                if d.copy_data(i, &copy).await.is_ok() {
                    copy_logs_under(&copy, id, to);
                }
                let _ = std::fs::remove_dir_all(&copy);
            }
        }
    }

    /// The last `n` lines of node `i`'s log, under a header naming the node.
    pub(crate) async fn log_tail(&self, i: usize, n: usize) -> String {
        let text = self.log(i).await;
        let lines: Vec<&str> = text.lines().collect();
        let mut out = format!("--- node {} log (last {n} lines) ---\n", self.ids[i]);
        for l in &lines[lines.len().saturating_sub(n)..] {
            out += l;
            out += "\n";
        }
        out
    }
}

impl Drop for ChaosCluster {
    fn drop(&mut self) {
        // No process stays stopped, also when the test fails.
        if let Backend::Processes { paused, .. } = &mut self.backend {
            for pid in paused.iter_mut().filter_map(Option::take) {
                cont(pid);
            }
        }
    }
}

/// Copies every file named `LOG` under `data` into `to` as `n<id>-<path with _ for />`.
fn copy_logs_under(data: &Path, id: u64, to: &Path) {
    let mut dirs = vec![data.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if entry.file_name() == "LOG" {
                let rel = path.strip_prefix(data).unwrap_or(&path);
                let name = rel.to_string_lossy().replace('/', "_");
                let _ = std::fs::copy(&path, to.join(format!("n{id}-{name}")));
            }
        }
    }
}

/// SIGCONT to `pid` (a node this test stopped).
fn cont(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid.to_string()])
        .status();
}
