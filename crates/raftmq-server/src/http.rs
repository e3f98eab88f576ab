//! The HTTP endpoint: Prometheus metrics, Kubernetes-style health probes and the admin API
//! (see `admin.rs`).

use crate::MetricsRender;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use raftmq_core::Broker;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

#[derive(Clone)]
pub(crate) struct HttpState {
    pub broker: Arc<Broker>,
    pub metrics: Option<MetricsRender>,
    pub ready: Arc<AtomicBool>,
    /// The cluster this node belongs to (`None`: it runs alone).
    pub cluster: Option<Arc<dyn crate::ClusterControl>>,
    /// Bearer token of the admin API (`None`: open).
    pub admin_token: Option<Arc<str>>,
    pub drain: Arc<crate::drain::Drain>,
}

pub(crate) async fn serve(
    listener: TcpListener,
    state: HttpState,
    mut stop: watch::Receiver<bool>,
) {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/v1/cluster", get(cluster))
        .merge(crate::admin::routes())
        .with_state(state);
    let shutdown = async move {
        let _ = stop.changed().await;
    };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        warn!(error = %e, "HTTP server failed");
    }
}

async fn metrics(State(state): State<HttpState>) -> (StatusCode, String) {
    match &state.metrics {
        Some(render) => {
            crate::metrics::export_broker_stats(&state.broker);
            (StatusCode::OK, render())
        }
        None => (
            StatusCode::NOT_FOUND,
            "metrics recorder not installed\n".into(),
        ),
    }
}

async fn cluster(
    _: crate::admin::Admin,
    State(state): State<HttpState>,
) -> (StatusCode, axum::Json<serde_json::Value>) {
    match &state.cluster {
        Some(cluster) => (StatusCode::OK, axum::Json(cluster.status())),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({"error": "not clustered"})),
        ),
    }
}

/// Ready when the listeners run and (clustered) a leader is known, so durable writes can commit.
async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    let cluster_ok = state.cluster.as_ref().is_none_or(|c| c.is_ready());
    if state.ready.load(Ordering::Relaxed) && cluster_ok {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
