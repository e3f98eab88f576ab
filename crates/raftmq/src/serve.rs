//! `raftmq serve`: wires configuration, telemetry and the server together and runs until a
//! shutdown signal.

use crate::config::Config;
use crate::telemetry;
use anyhow::Context as _;
use raftmq_core::Broker;
use raftmq_core::auth::AllowAll;
use raftmq_server::Server;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
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

    // Anonymous access until authentication is configurable (see the warning below).
    let broker = Arc::new(Broker::with_auth(
        config.mqtt.clone(),
        Arc::new(AllowAll),
        Arc::new(AllowAll),
        config.node_id,
    ));
    let metrics_render = telemetry::metrics_render(metrics);
    let server = Server::bind(
        broker,
        &config.listeners,
        &config.http,
        Some(metrics_render),
    )
    .await
    .context("starting listeners")?;
    match server.mqtt_addr() {
        Some(addr) => {
            info!("mqtt listening on {addr}");
            if is_exposed(addr) {
                warn!(
                    "MQTT listener {addr} is reachable from other hosts and accepts ANONYMOUS clients \
                     (authentication is not implemented yet): bind listeners.tcp to 127.0.0.1 or \
                     firewall the port unless the network is trusted"
                );
            }
        }
        None => warn!("mqtt listener disabled (listeners.tcp = \"none\"): no client can connect"),
    }
    match server.http_addr() {
        Some(addr) => info!("http listening on {addr} (/metrics, /healthz, /readyz)"),
        None => info!("http endpoint disabled"),
    }

    let result = server.run(shutdown).await.context("running the server");
    upkeep.abort();
    match &result {
        Ok(()) => info!("stopped"),
        Err(e) => error!("stopped: {e:#}"),
    }
    result
}

/// Whether a listener on `addr` accepts connections from other hosts.
pub fn is_exposed(addr: SocketAddr) -> bool {
    !addr.ip().is_loopback()
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
}
