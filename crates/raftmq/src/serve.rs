//! `raftmq serve`: wires configuration, telemetry and the server together and runs until a
//! shutdown signal.

use crate::config::Config;
use crate::telemetry;
use anyhow::Context as _;
use raftmq_cluster::network::ClusterTls;
use raftmq_cluster::node::{NodeOptions, RaftNode};
use raftmq_core::Broker;
use raftmq_server::auth::Auth;
use raftmq_server::{
    ClusterAdminError, ClusterControl, ClusterServer, ClusterTlsPem, ListenerKind,
    MembershipChange, Server,
};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

/// Runs the broker with `config` until SIGINT or SIGTERM, then shuts down gracefully. This is
/// the one place that builds the broker's parts and hands them to each other.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let metrics = telemetry::init(&config.log).context("setting up logging and metrics")?;
    info!(
        version = env!("CARGO_PKG_VERSION"),
        node_id = config.node_id,
        data_dir = %config.data_dir.display(),
        "starting raftmq"
    );

    tokio::fs::create_dir_all(&config.data_dir)
        .await
        .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;

    // Installed before binding so that a signal arriving during startup is not lost.
    let shutdown = shutdown_signal()?;
    let upkeep = telemetry::spawn_upkeep(metrics.clone(), telemetry::UPKEEP_INTERVAL);

    // Authentication and authorization: password file, JWT keys, SCRAM credentials, ACL,
    // callout; files reloaded when they change and on SIGHUP.
    let auth = Arc::new(Auth::load(&config.auth).context("loading authentication files")?);
    info!(
        anonymous = auth.allows_anonymous(),
        users = auth.user_count(),
        acl = config.auth.acl_file.is_some(),
        callout = config.auth.callout_url.is_some(),
        cert_identity = config.auth.use_cert_identity,
        jwt = config.auth.jwt_enabled(),
        jwks_keys = auth.jwks_key_count(),
        scram_users = auth.scram_user_count(),
        "authentication configured"
    );
    let auth_watch = tokio::spawn(auth.clone().watch());
    let sighup = reload_on_sighup(auth.clone())?;

    // Mutual TLS between nodes, when configured: checked before anything listens.
    let cluster_tls = match config.cluster.tls_files() {
        Some((cert, key, ca)) => Some(
            ClusterTlsPem::load(cert, key, ca).context("loading the cluster TLS certificates")?,
        ),
        None => None,
    };
    info!(mtls = cluster_tls.is_some(), "cluster transport configured");

    // Durable state: a Raft group (of one node unless seeds are given) over RocksDB in data_dir.
    let mut node_options = NodeOptions::new(
        config.node_id,
        advertise_addr(&config),
        advertised_mqtt_addr(&config),
        config.cluster.seeds.clone(),
        config.data_dir.clone(),
    );
    node_options.shards = raftmq_core::shard::ShardCount::new(config.cluster.shards)
        .context("cluster.shards must be between 1 and 1024")?;
    if !config.cluster.quiesce_idle_shards {
        node_options.tuning.quiesce_after_ms = 0;
    }
    if let Some(path) = &config.cluster.faults_file {
        warn!(path = %path.display(), "cluster.faults_file is set: network faults are injected (tests only)");
        node_options.faults = Some(Arc::new(raftmq_cluster::network::FileFaults::new(
            path.clone(),
        )));
    }
    if let Some(path) = &config.cluster.disk_faults_file {
        warn!(path = %path.display(), "cluster.disk_faults_file is set: slow-disk faults are injected (tests only)");
        raftmq_store::inject_disk_faults(path.clone());
    }
    node_options.tls = cluster_tls
        .as_ref()
        .map(|p| ClusterTls::from_pem(&p.cert, &p.key, &p.ca));
    let mut node = RaftNode::start(node_options)
        .await
        .with_context(|| format!("starting the raft node in {}", config.data_dir.display()))?;
    // Peers must reach this node while it joins and catches up: serve the cluster endpoint first.
    let cluster_server = ClusterServer::bind(
        config.cluster.addr,
        node.grpc_routes(),
        cluster_tls.as_ref(),
    )
    .await
    .context("starting the cluster listener")?;
    if let Some(addr) = cluster_server.local_addr() {
        info!("cluster listening on {addr}");
    }
    let (cluster_stop, cluster_stopped) = tokio::sync::oneshot::channel::<()>();
    let cluster_task = tokio::spawn(cluster_server.run(async {
        let _ = cluster_stopped.await;
    }));
    if !node.wait_ready(READY_TIMEOUT).await {
        warn!(
            "no raft leader after {READY_TIMEOUT:?}: serving anyway; durable writes are refused \
             (CONNACK 0x88 / DISCONNECT 0x89) until a quorum forms"
        );
    }

    let broker = Arc::new(
        Broker::with_auth(
            config.mqtt.clone(),
            auth.clone(),
            auth.clone(),
            config.node_id,
        )
        .with_durability(node.durability.clone())
        .with_epoch_base(epoch_base()),
    );
    // Mirror what other nodes commit (retained messages, session claims) from before the
    // recovery read, so nothing falls in between.
    node.feed_broker(broker.clone());
    node.start_forwarding(broker.clone());
    let node = Arc::new(node);
    // MQTT 5 clients this node cannot serve durably (no quorum) are sent to another member:
    // a reachable one, the leader first.
    let redirect_node = node.clone();
    broker.set_redirect(Arc::new(move || redirect_node.redirect_target()));
    let sessions = broker.recover(Instant::now()).map_err(|e| {
        anyhow::anyhow!(
            "cannot read the stored sessions in {}: {e}; refusing to start (the data is left as it is)",
            config.data_dir.display()
        )
    })?;
    info!(
        sessions,
        retained = broker.retained_count(),
        "recovered persistent state"
    );
    let metrics_render = telemetry::metrics_render(metrics);
    let mut server = Server::bind(
        broker,
        &config.listeners,
        &config.http,
        Some(metrics_render),
    )
    .await
    .context("starting listeners")?;
    server.set_limits(config.limits.clone());
    if config.listeners.tls.is_some() || config.listeners.wss.is_some() {
        server
            .set_tls(&config.tls)
            .context("loading TLS certificates")?;
    }
    server.set_cluster(Arc::new(NodeControl(node.clone())));
    // Bridges run on the Raft leader (while it can commit), so on one node at a time.
    let (placement_tx, placement) = tokio::sync::watch::channel(false);
    let placement_task = (!config.bridges.is_empty())
        .then(|| tokio::spawn(bridge_placement(node.clone(), placement_tx)));
    server
        .set_bridges(&config.bridges, Some(placement))
        .context("setting up the bridges")?;
    if !config.bridges.is_empty() {
        info!(
            bridges = config.bridges.len(),
            "bridges configured (run by the Raft leader)"
        );
    }
    server.set_drain_config(config.drain.clone());
    match server.mqtt_addr() {
        Some(addr) => {
            info!("mqtt listening on {addr}");
            if is_exposed(addr) && auth.allows_anonymous() {
                warn!(
                    "MQTT listener {addr} is reachable from other hosts and accepts ANONYMOUS \
                     clients: set auth.password_file (see `raftmq passwd`) and/or \
                     auth.allow_anonymous = false, or bind listeners.tcp to 127.0.0.1, unless \
                     the network is trusted"
                );
            }
        }
        None => warn!("mqtt listener disabled (listeners.tcp = \"none\"): no client can connect"),
    }
    for kind in [ListenerKind::Tls, ListenerKind::Ws, ListenerKind::Wss] {
        if let Some(addr) = server.listener_addr(kind) {
            info!("mqtt over {} listening on {addr}", kind.as_str());
        }
    }
    match server.http_addr() {
        Some(addr) => {
            info!("http listening on {addr} (/metrics, /healthz, /readyz, /api/v1)");
            if admin_api_unprotected(addr, config.http.admin_token.as_deref()) {
                warn!(
                    "HTTP endpoint {addr} is reachable from other hosts and its admin API \
                     (/api/v1: kick clients, publish, drain, change membership) needs no token: \
                     set http.admin_token (RAFTMQ_HTTP__ADMIN_TOKEN) or bind http.addr to \
                     127.0.0.1"
                );
            }
        }
        None => info!("http endpoint disabled"),
    }

    let result = server.run(shutdown).await.context("running the server");
    if let Some(task) = placement_task {
        task.abort();
    }
    upkeep.abort();
    auth_watch.abort();
    sighup.abort();
    let _ = cluster_stop.send(());
    // Peers keep their forwarding streams open until they notice: don't wait for them long.
    let mut cluster_task = cluster_task;
    if tokio::time::timeout(CLUSTER_STOP_GRACE, &mut cluster_task)
        .await
        .is_err()
    {
        cluster_task.abort();
    }
    if let Ok(node) = Arc::try_unwrap(node) {
        node.shutdown().await;
    }
    match &result {
        Ok(()) => info!("stopped"),
        Err(e) => error!("stopped: {e:#}"),
    }
    result
}

/// How often the bridges' placement is re-evaluated.
const PLACEMENT_TICK: Duration = Duration::from_millis(200);

/// Keeps `placement` true while this node should run the bridges: while it is the Raft leader
/// and a quorum acknowledged it recently (`RaftNode::is_ready`; a leader cut off from the
/// majority stops within about 3 s, see docs/bridges.md). A deterministic choice every node
/// agrees on without more coordination: one leader per term.
async fn bridge_placement(node: Arc<RaftNode>, placement: tokio::sync::watch::Sender<bool>) {
    let mut tick = tokio::time::interval(PLACEMENT_TICK);
    loop {
        tick.tick().await;
        let leader = node.raft.metrics().borrow().current_leader == Some(node.node_id);
        let here = leader && node.is_ready();
        let changed = placement.send_if_modified(|v| std::mem::replace(v, here) != here);
        if changed {
            info!(
                runs_bridges = here,
                "bridge placement: {}",
                if here {
                    "this node is the leader and runs the bridges"
                } else {
                    "another node runs the bridges"
                }
            );
        }
        if placement.is_closed() {
            return;
        }
    }
}

/// The HTTP endpoint's view of the cluster (status, readiness, membership changes), served by
/// the Raft node.
struct NodeControl(Arc<RaftNode>);

impl ClusterControl for NodeControl {
    fn status(&self) -> serde_json::Value {
        serde_json::to_value(self.0.status()).unwrap_or(serde_json::Value::Null)
    }

    fn is_ready(&self) -> bool {
        self.0.is_ready()
    }

    fn add_node(&self, id: u64, cluster_addr: String, mqtt_addr: String) -> MembershipChange<'_> {
        let member = raftmq_cluster::types::ClusterNode {
            cluster_addr,
            mqtt_addr,
        };
        Box::pin(async move { self.0.add_node(id, member).await.map_err(membership_error) })
    }

    fn remove_node(&self, id: u64) -> MembershipChange<'_> {
        Box::pin(async move { self.0.remove_node(id).await.map_err(membership_error) })
    }
}

/// A failed membership change as the admin API reports it.
fn membership_error(e: raftmq_cluster::node::AdminError) -> ClusterAdminError {
    use raftmq_cluster::node::AdminError;
    let msg = e.to_string();
    match e {
        AdminError::UnknownNode(_) => ClusterAdminError::NotFound(msg),
        AdminError::LastNode(_) => ClusterAdminError::Conflict(msg),
        AdminError::NoLeader => ClusterAdminError::Unavailable(msg),
        AdminError::Timeout(_) | AdminError::Rpc(_) => ClusterAdminError::Failed(msg),
    }
}

/// How long the cluster endpoint may take to close its streams at shutdown.
const CLUSTER_STOP_GRACE: Duration = Duration::from_secs(2);

/// How long startup waits for a Raft leader before serving anyway.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The cluster address peers should use: `cluster.advertise_addr`, else the bound address,
/// with an unspecified IP (0.0.0.0) replaced by the host name.
fn advertise_addr(config: &Config) -> String {
    if let Some(addr) = &config.cluster.advertise_addr {
        return addr.clone();
    }
    let addr = config.cluster.addr;
    if addr.ip().is_unspecified() {
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "127.0.0.1".into());
        format!("{host}:{}", addr.port())
    } else {
        addr.to_string()
    }
}

/// The MQTT address other nodes give clients (Server Reference): the TCP listener's, with an
/// unspecified IP (0.0.0.0) replaced by the host of the cluster advertise address.
fn advertised_mqtt_addr(config: &Config) -> String {
    let Some(addr) = config.listeners.tcp else {
        return String::new();
    };
    if !addr.ip().is_unspecified() {
        return addr.to_string();
    }
    let cluster = advertise_addr(config);
    let host = cluster
        .rsplit_once(':')
        .map_or(cluster.as_str(), |(host, _)| host);
    format!("{host}:{}", addr.port())
}

/// Whether a listener on `addr` accepts connections from other hosts.
pub fn is_exposed(addr: SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

/// Whether the admin API on `http` is reachable from other hosts without a token.
pub fn admin_api_unprotected(http: SocketAddr, token: Option<&str>) -> bool {
    is_exposed(http) && token.is_none()
}

/// Reloads the password and ACL files on every SIGHUP.
fn reload_on_sighup(auth: Arc<Auth>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            info!("received SIGHUP, reloading authentication files");
            auth.request_reload();
        }
    }))
}

/// Resolves at the first SIGINT or SIGTERM; a second one exits the process at once (for a
/// graceful shutdown that hangs).
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("received SIGTERM, shutting down"),
            _ = int.recv() => info!("received SIGINT, shutting down"),
        }
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            error!("second shutdown signal, exiting immediately");
            std::process::exit(1);
        });
    })
}

/// The first session epoch of this run: milliseconds since the Unix epoch times 2^16, so a
/// restarted node never hands out an epoch of an earlier run (65,536 attachments per
/// millisecond of uptime before the counter could catch up with a later start; the clock
/// would have to step back by more than the downtime for two runs to overlap).
fn epoch_base() -> u64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX >> 16)
        });
    ms.saturating_mul(1 << 16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_listeners_count_as_private() {
        let exposed = |s: &str| is_exposed(s.parse().expect("address"));
        assert!(exposed("0.0.0.0:1883"));
        assert!(exposed("[::]:1883"));
        assert!(exposed("192.168.1.10:1883"));
        assert!(!exposed("127.0.0.1:1883"));
        assert!(!exposed("[::1]:1883"));
    }

    #[test]
    fn an_exposed_http_port_without_token_is_flagged() {
        let addr = |s: &str| s.parse::<SocketAddr>().expect("address");
        assert!(admin_api_unprotected(addr("0.0.0.0:9100"), None));
        assert!(!admin_api_unprotected(addr("0.0.0.0:9100"), Some("t")));
        assert!(!admin_api_unprotected(addr("127.0.0.1:9100"), None));
    }
}
