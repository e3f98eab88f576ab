//! The HTTP endpoint: Prometheus metrics and Kubernetes-style health probes.

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

async fn readyz(State(state): State<HttpState>) -> (StatusCode, &'static str) {
    if state.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}
