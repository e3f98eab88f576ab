//! A cluster of `raftmq` containers on this machine's Docker daemon, for tests that need real
//! networks between nodes: partitions made with `docker network disconnect`, kills with
//! `docker kill -s KILL`, pauses with `docker pause` (the cgroup freezer).
//!
//! # Layout
//!
//! Everything a [`DockerCluster`] creates is named `<prefix>-...` with a prefix of its own
//! (`raftmq-dc-[<RAFTMQ_DOCKER_RUN>-]<pid>-<time>`; the image `raftmq-test:<prefix>`) and
//! labelled `raftmq-test=<prefix>`, and removed when it is dropped (also when the test
//! panics): the containers (with `-v`), their data volumes, both networks, the image if it
//! built one, and the host directory of the disk fault files. It never touches anything else.
//! A test process killed outright (SIGKILL, a supervisor's timeout) cannot clean up: remove
//! what is left by its prefix (`.ci/run` sets `RAFTMQ_DOCKER_RUN` and does so).
//!
//! - **The image** is built offline from the executable under test by
//!   `deploy/docker/build-image.sh` (FROM scratch: the binary and the shared libraries `ldd`
//!   reports; nothing is pulled), or taken as it is from `RAFTMQ_DOCKER_IMAGE`.
//! - **Two networks**: `<prefix>-cluster`, on which node `N` has the alias `nN` and advertises
//!   `nN:7946` (Raft, forwarding, joins); and `<prefix>-clients`, the network the containers
//!   are created on, through which Docker publishes each node's MQTT (1883) and HTTP (9100)
//!   ports on 127.0.0.1 at ports fixed for the cluster's life (a restarted node keeps them).
//!   The clients network has inter-container traffic disabled
//!   (`com.docker.network.bridge.enable_icc=false`) and the aliases exist only on the cluster
//!   network, so nodes can reach each other only through the cluster network.
//! - **A partition** ([`DockerCluster::disconnect`]) takes a node's container off the cluster
//!   network: its peers cannot resolve or reach it, open connections to it hang (nothing
//!   answers, no reset), while clients on the host still reach it through the clients network,
//!   as with the nodes' `cluster.faults_file`. [`DockerCluster::connect`] puts it back with
//!   its alias.
//! - **Each node's data** is a named volume at `/data`; the root filesystem is read-only, as
//!   in `deploy/docker/compose.yaml`.
//! - **A slow disk**: node `N` reads `cluster.disk_faults_file` = `/faults/disk-nN`, a
//!   read-only bind mount of a host directory; write the host file
//!   ([`DockerCluster::disk_faults_file`]) to stall its synced log writes.
//!
//! Every `docker` command runs with a timeout; a failing one panics with its output.

use crate::ports::free_port;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Upper bound for one `docker` command (other than building the image).
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound for building the image (`deploy/docker/build-image.sh`).
pub const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
/// The image build script of the repository.
const BUILD_IMAGE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/docker/build-image.sh"
);
/// The label on everything a cluster creates (value: its prefix).
pub const LABEL: &str = "raftmq-test";

/// One node of a [`DockerCluster`].
#[derive(Clone, Debug)]
pub struct DockerNode {
    pub id: u64,
    /// The container's name.
    pub container: String,
    /// The named volume mounted at `/data`.
    pub volume: String,
    /// Host ports (on 127.0.0.1) published to the container's 1883 and 9100.
    pub mqtt: u16,
    pub http: u16,
}

impl DockerNode {
    /// The node's name on the cluster network, as peers and seeds name it.
    pub fn alias(&self) -> String {
        format!("n{}", self.id)
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.mqtt))
    }
}

/// A cluster of `raftmq` containers; everything it created is removed when it is dropped.
#[derive(Debug)]
pub struct DockerCluster {
    /// The prefix of every name (and the value of the [`LABEL`] label).
    pub prefix: String,
    pub image: String,
    pub nodes: Vec<DockerNode>,
    /// The network of Raft and forwarding traffic (what a partition cuts).
    pub cluster_net: String,
    /// The network through which the host reaches the published ports.
    pub clients_net: String,
    /// Host directory mounted read-only at `/faults` in every container.
    pub faults_dir: PathBuf,
    /// What was created, for the teardown (in creation order).
    built_image: bool,
    networks: Vec<String>,
    volumes: Vec<String>,
    containers: Vec<String>,
}

/// Whether a Docker daemon answers (`docker info` within 30 s), or why not.
pub fn available() -> Result<(), String> {
    run_blocking(
        &["info", "--format", "{{.ServerVersion}}"],
        Duration::from_secs(30),
    )
    .map(|_| ())
}

impl DockerCluster {
    /// Starts `n` nodes (ids 1..=n) of an image of `program` (built with
    /// `deploy/docker/build-image.sh`, or `RAFTMQ_DOCKER_IMAGE` if set), node 1 initialising
    /// the cluster and every node naming all of them as seeds; `env` is added to every node's
    /// environment. Returns once the containers run (not once they are ready). Panics, naming
    /// what failed, if Docker is not available or a command fails; what was created by then is
    /// removed.
    pub fn start(program: &Path, n: u64, env: &[(&str, &str)]) -> DockerCluster {
        if let Err(e) = available() {
            panic!(
                "Docker is not available ('docker info' failed: {e}); the Docker variant of this \
                 test needs a running Docker daemon (no registry access needed)"
            );
        }
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let prefix = format!("raftmq-dc-{}{}-{stamp}", run_tag(), std::process::id());
        let faults_dir = std::env::temp_dir().join(&prefix);
        let mut c = DockerCluster {
            image: String::new(),
            nodes: Vec::new(),
            cluster_net: format!("{prefix}-cluster"),
            clients_net: format!("{prefix}-clients"),
            faults_dir,
            built_image: false,
            networks: Vec::new(),
            volumes: Vec::new(),
            containers: Vec::new(),
            prefix,
        };
        // The containers run as uid 10001: the directory must be readable by everyone.
        std::fs::create_dir_all(&c.faults_dir).expect("create the disk faults directory");
        set_mode(&c.faults_dir, 0o755);
        c.image = match std::env::var("RAFTMQ_DOCKER_IMAGE") {
            Ok(image) if !image.is_empty() => {
                if let Err(e) = run_blocking(&["image", "inspect", &image], DOCKER_TIMEOUT) {
                    panic!(
                        "RAFTMQ_DOCKER_IMAGE={image}: no such image here ({e}); nothing is pulled"
                    )
                }
                image
            }
            _ => c.build_image(program),
        };
        let label = format!("{LABEL}={}", c.prefix);
        docker(&["network", "create", "--label", &label, &c.cluster_net]);
        c.networks.push(c.cluster_net.clone());
        docker(&[
            "network",
            "create",
            "--label",
            &label,
            "-o",
            "com.docker.network.bridge.enable_icc=false",
            &c.clients_net,
        ]);
        c.networks.push(c.clients_net.clone());
        let nodes: Vec<DockerNode> = (1..=n)
            .map(|id| DockerNode {
                id,
                container: format!("{}-n{id}", c.prefix),
                volume: format!("{}-n{id}-data", c.prefix),
                mqtt: free_port(),
                http: free_port(),
            })
            .collect();
        let seeds: Vec<String> = nodes
            .iter()
            .map(|d| format!("{}:7946", d.alias()))
            .collect();
        let seeds = seeds.join(",");
        for d in &nodes {
            docker(&["volume", "create", "--label", &label, &d.volume]);
            c.volumes.push(d.volume.clone());
            let mut args: Vec<String> = [
                "create",
                "--pull",
                "never",
                "--name",
                &d.container,
                "--label",
                &label,
                "--network",
                &c.clients_net,
                "--read-only",
            ]
            .map(str::to_owned)
            .to_vec();
            args.extend(["-v".into(), format!("{}:/data", d.volume)]);
            args.extend([
                "-v".into(),
                format!("{}:/faults:ro", c.faults_dir.display()),
            ]);
            args.extend(["-p".into(), format!("127.0.0.1:{}:1883", d.mqtt)]);
            args.extend(["-p".into(), format!("127.0.0.1:{}:9100", d.http)]);
            let mut vars: Vec<(String, String)> = vec![
                ("RAFTMQ_NODE_ID".into(), d.id.to_string()),
                ("RAFTMQ_SEEDS".into(), seeds.clone()),
                (
                    "RAFTMQ_CLUSTER__ADVERTISE_ADDR".into(),
                    format!("{}:7946", d.alias()),
                ),
                (
                    "RAFTMQ_CLUSTER__DISK_FAULTS_FILE".into(),
                    format!("/faults/disk-n{}", d.id),
                ),
                ("RAFTMQ_LOG_FORMAT".into(), "text".into()),
                (
                    "RAFTMQ_LOG_LEVEL".into(),
                    "warn,openraft=off,raftmq=info".into(),
                ),
            ];
            vars.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
            for (k, v) in vars {
                args.extend(["-e".into(), format!("{k}={v}")]);
            }
            args.extend([c.image.clone(), "serve".into()]);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            docker(&args);
            c.containers.push(d.container.clone());
            docker(&[
                "network",
                "connect",
                "--alias",
                &d.alias(),
                &c.cluster_net,
                &d.container,
            ]);
        }
        c.nodes = nodes;
        for d in &c.nodes {
            docker(&["start", &d.container]);
        }
        c
    }

    /// Builds the image of `program` with `deploy/docker/build-image.sh` (offline, no smoke
    /// test: the cluster's own start checks it runs).
    fn build_image(&mut self, program: &Path) -> String {
        let tag = format!("raftmq-test:{}", self.prefix);
        let program = program.display().to_string();
        let args = [
            "--binary",
            program.as_str(),
            "--tag",
            tag.as_str(),
            "--no-test",
        ];
        let started = Instant::now();
        match run_program(BUILD_IMAGE, &args, BUILD_TIMEOUT) {
            Ok(_) => {
                self.built_image = true;
                eprintln!(
                    "docker: built image {tag} from {program} in {:.1}s",
                    started.elapsed().as_secs_f64()
                );
                tag
            }
            Err(e) => panic!("{BUILD_IMAGE} --binary {program} --tag {tag} failed: {e}"),
        }
    }

    /// The host file that slows node `i`'s disk (its `cluster.disk_faults_file`).
    pub fn disk_faults_file(&self, i: usize) -> PathBuf {
        self.faults_dir.join(format!("disk-n{}", self.nodes[i].id))
    }

    /// `docker kill -s KILL` node `i`, and waits (bounded) until Docker reports it stopped.
    pub async fn kill9(&self, i: usize) {
        let name = &self.nodes[i].container;
        docker_async(&["kill", "-s", "KILL", name]).await;
        let deadline = Instant::now() + DOCKER_TIMEOUT;
        while self.state(i).await.starts_with("running") {
            assert!(
                Instant::now() < deadline,
                "container {name} still running {DOCKER_TIMEOUT:?} after docker kill"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `docker start` node `i` (on its volume, with its networks and ports).
    pub async fn start_node(&self, i: usize) {
        docker_async(&["start", &self.nodes[i].container]).await;
    }

    /// `docker pause` node `i`: every process of the container frozen, its sockets open.
    pub async fn pause(&self, i: usize) {
        docker_async(&["pause", &self.nodes[i].container]).await;
    }

    /// `docker unpause` node `i`.
    pub async fn unpause(&self, i: usize) {
        docker_async(&["unpause", &self.nodes[i].container]).await;
    }

    /// Takes node `i` off the cluster network (`docker network disconnect`): cut off from its
    /// peers, still reachable by clients.
    pub async fn disconnect(&self, i: usize) {
        docker_async(&[
            "network",
            "disconnect",
            &self.cluster_net,
            &self.nodes[i].container,
        ])
        .await;
    }

    /// Puts node `i` back on the cluster network with its alias (`docker network connect`).
    pub async fn connect(&self, i: usize) {
        let d = &self.nodes[i];
        docker_async(&[
            "network",
            "connect",
            "--alias",
            &d.alias(),
            &self.cluster_net,
            &d.container,
        ])
        .await;
    }

    /// The container's state: `<status> exit <code>` (e.g. `running exit 0`, `exited exit
    /// 137`, `paused exit 0`), or why it could not be read.
    pub async fn state(&self, i: usize) -> String {
        let format =
            "{{.State.Status}} exit {{.State.ExitCode}}{{if .State.OOMKilled}} (OOM killed){{end}}";
        match run_async(
            &["inspect", "--format", format, &self.nodes[i].container],
            DOCKER_TIMEOUT,
        )
        .await
        {
            Ok(out) => out.trim().to_owned(),
            Err(e) => format!("unknown ({e})"),
        }
    }

    /// The host's id of the container's main process (the node), while it runs.
    pub async fn pid(&self, i: usize) -> Option<u32> {
        run_async(
            &[
                "inspect",
                "--format",
                "{{.State.Pid}}",
                &self.nodes[i].container,
            ],
            DOCKER_TIMEOUT,
        )
        .await
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|p| *p != 0)
    }

    /// Copies node `i`'s data directory (`/data`, its volume) to `to` on this machine
    /// (`docker cp`; the container may be stopped).
    pub async fn copy_data(&self, i: usize, to: &Path) -> Result<(), String> {
        let from = format!("{}:/data", self.nodes[i].container);
        let to = to.display().to_string();
        run_async(&["cp", &from, &to], DOCKER_TIMEOUT)
            .await
            .map(|_| ())
    }

    /// Node `i`'s whole log (`docker logs`: what it wrote since the container was created,
    /// across restarts), or why it could not be read.
    pub async fn logs(&self, i: usize) -> String {
        match run_async(&["logs", &self.nodes[i].container], DOCKER_TIMEOUT).await {
            Ok(out) => out,
            Err(e) => format!("docker logs {} failed: {e}", self.nodes[i].container),
        }
    }
}

impl Drop for DockerCluster {
    /// Removes what the cluster created, newest first; a failure is printed (with the command
    /// that removes the rest by hand), never a panic.
    fn drop(&mut self) {
        let mut left = Vec::new();
        for c in self.containers.iter().rev() {
            // A paused container is thawed first so that it can be killed.
            let _ = run_blocking(&["unpause", c], DOCKER_TIMEOUT);
            if let Err(e) = run_blocking(&["rm", "-f", "-v", c], DOCKER_TIMEOUT) {
                left.push(format!("container {c}: {e}"));
            }
        }
        for v in self.volumes.iter().rev() {
            if let Err(e) = run_blocking(&["volume", "rm", v], DOCKER_TIMEOUT) {
                left.push(format!("volume {v}: {e}"));
            }
        }
        for n in self.networks.iter().rev() {
            if let Err(e) = run_blocking(&["network", "rm", n], DOCKER_TIMEOUT) {
                left.push(format!("network {n}: {e}"));
            }
        }
        if self.built_image
            && let Err(e) = run_blocking(&["rmi", &self.image], DOCKER_TIMEOUT)
        {
            left.push(format!("image {}: {e}", self.image));
        }
        let _ = std::fs::remove_dir_all(&self.faults_dir);
        if !left.is_empty() {
            eprintln!(
                "docker: WARNING: could not remove {left:?}; remove them by hand (everything \
                 of this run is labelled {LABEL}={}: docker ps -aq --filter label={LABEL}={} | \
                 xargs docker rm -f -v; then docker network ls / volume ls with the same filter)",
                self.prefix, self.prefix
            );
        }
    }
}

/// `RAFTMQ_DOCKER_RUN` followed by `-` if set (the names of this run then start with
/// `raftmq-dc-<run>-`, so a supervisor that had to kill the test can remove what it left with a
/// name filter, as `.ci/run` does), else nothing.
fn run_tag() -> String {
    match std::env::var("RAFTMQ_DOCKER_RUN") {
        Ok(run) if !run.is_empty() => {
            assert!(
                run.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
                "RAFTMQ_DOCKER_RUN={run:?}: only letters, digits, - and _"
            );
            format!("{run}-")
        }
        _ => String::new(),
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// Runs `docker args` (bounded by [`DOCKER_TIMEOUT`]) and returns its standard output; panics
/// with the command and its output if it fails.
fn docker(args: &[&str]) -> String {
    run_blocking(args, DOCKER_TIMEOUT).unwrap_or_else(|e| panic!("docker {}: {e}", args.join(" ")))
}

/// [`docker`] from async code (the runtime's threads are not blocked).
async fn docker_async(args: &[&str]) -> String {
    run_async(args, DOCKER_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("docker {}: {e}", args.join(" ")))
}

/// Runs `docker args`, killed after `timeout`; its standard output, or what went wrong.
fn run_blocking(args: &[&str], timeout: Duration) -> Result<String, String> {
    run_program("docker", args, timeout)
}

/// Runs `program args`, killed after `timeout`; its standard output, or what went wrong
/// (exit status and standard error).
fn run_program(program: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program} did not start: {e}"))?;
    // The output is read on threads, so a child filling a pipe cannot block the wait.
    let out = child.stdout.take().map(read_on_thread);
    let err = child.stderr.take().map(read_on_thread);
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("killed after {timeout:?}"));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => break Err(format!("wait: {e}")),
        }
    };
    let out = out.and_then(|t| t.join().ok()).unwrap_or_default();
    let err = err.and_then(|t| t.join().ok()).unwrap_or_default();
    match status {
        Ok(s) if s.success() => Ok(out),
        Ok(s) => Err(format!("{s}: {}{}", err.trim(), tail(&out))),
        Err(e) => Err(format!("{e}: {}{}", err.trim(), tail(&out))),
    }
}

fn read_on_thread(mut r: impl std::io::Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// The last lines of a command's standard output, for an error message.
fn tail(out: &str) -> String {
    let lines: Vec<&str> = out.lines().collect();
    let last = &lines[lines.len().saturating_sub(20)..];
    if last.is_empty() {
        String::new()
    } else {
        format!("\n{}", last.join("\n"))
    }
}

/// Runs `docker args` on the runtime (killed after `timeout`, or if the future is dropped);
/// its standard output (standard error appended, as `docker logs` writes a container's
/// standard error there), or what went wrong.
async fn run_async(args: &[&str], timeout: Duration) -> Result<String, String> {
    let child = tokio::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("docker did not start: {e}"))?;
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => {
            let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&out.stderr));
            Ok(text)
        }
        Ok(Ok(out)) => Err(format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Ok(Err(e)) => Err(format!("wait: {e}")),
        Err(_) => Err(format!("killed after {timeout:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_that_fails_reports_its_status_and_standard_error() {
        let e = run_program(
            "sh",
            &["-c", "echo out; echo oops >&2; exit 3"],
            DOCKER_TIMEOUT,
        )
        .expect_err("exit 3");
        assert!(
            e.contains("exit status: 3") && e.contains("oops") && e.contains("out"),
            "{e}"
        );
        assert_eq!(
            run_program("sh", &["-c", "echo fine"], DOCKER_TIMEOUT).as_deref(),
            Ok("fine\n")
        );
    }

    #[test]
    fn a_command_that_hangs_is_killed_at_its_timeout() {
        let started = Instant::now();
        let e = run_program("sleep", &["30"], Duration::from_millis(200)).expect_err("killed");
        assert!(e.contains("killed after"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn the_build_script_is_where_the_cluster_looks_for_it() {
        assert!(Path::new(BUILD_IMAGE).is_file(), "{BUILD_IMAGE}");
    }
}
