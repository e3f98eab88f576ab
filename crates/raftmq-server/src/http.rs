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
    /// The bridges configured (run on this node or not).
    pub bridges: Arc<[Arc<crate::bridge::Bridge>]>,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin_client::{AdminClient, AdminClientError};
    use crate::drain::Drain;
    use crate::{ClusterAdminError, ClusterControl, DrainConfig, MembershipChange};
    use raftmq_core::config::MqttConfig;
    use serde_json::{Value, json};
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const WAIT: Duration = Duration::from_secs(10);

    /// A cluster whose answers the test decides: node 2 may join, anything else clashes;
    /// removing 9 finds no such node, 3 finds no leader, 4 fails on the leader.
    struct FakeCluster {
        ready: AtomicBool,
    }

    impl ClusterControl for FakeCluster {
        fn status(&self) -> Value {
            json!({ "leader": 7, "voters": [7, 8] })
        }
        fn is_ready(&self) -> bool {
            self.ready.load(Ordering::Relaxed)
        }
        fn add_node(
            &self,
            id: u64,
            cluster_addr: String,
            mqtt_addr: String,
        ) -> MembershipChange<'_> {
            Box::pin(async move {
                match id {
                    2 if cluster_addr == "n2:7946" && mqtt_addr == "n2:1883" => Ok(()),
                    _ => Err(ClusterAdminError::Conflict(format!("node {id} clashes"))),
                }
            })
        }
        fn remove_node(&self, id: u64) -> MembershipChange<'_> {
            Box::pin(async move {
                Err(match id {
                    9 => ClusterAdminError::NotFound("node 9 is not a member".into()),
                    3 => ClusterAdminError::Unavailable("no leader".into()),
                    _ => ClusterAdminError::Failed("the leader refused".into()),
                })
            })
        }
    }

    /// Serves the HTTP endpoint for `cluster` on an ephemeral loopback port.
    async fn serve_with(
        cluster: Option<Arc<dyn ClusterControl>>,
    ) -> (std::net::SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound address");
        let ready = Arc::new(AtomicBool::new(true));
        let state = HttpState {
            broker: Arc::new(Broker::new(MqttConfig::default())),
            metrics: None,
            ready: ready.clone(),
            cluster,
            admin_token: None,
            drain: Arc::new(Drain::new(&DrainConfig::default(), ready)),
            bridges: Arc::from(Vec::new()),
        };
        let (stop, stopped) = watch::channel(false);
        tokio::spawn(serve(listener, state, stopped));
        (addr, stop)
    }

    /// The status code of `GET path` (a plain-text endpoint).
    async fn status_of(addr: std::net::SocketAddr, path: &str) -> u16 {
        let exchange = async {
            let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut response = String::new();
            stream.read_to_string(&mut response).await.expect("read");
            response
        };
        let response = tokio::time::timeout(WAIT, exchange)
            .await
            .expect("an answer in time");
        response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"))
    }

    /// The HTTP status of a failed admin request.
    fn api_status(result: Result<Value, AdminClientError>) -> u16 {
        match result {
            Err(AdminClientError::Api { status, .. }) => status,
            other => panic!("expected an HTTP error status, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn the_cluster_answers_status_readiness_and_membership_changes() {
        let cluster = Arc::new(FakeCluster {
            ready: AtomicBool::new(true),
        });
        let (addr, _stop) = serve_with(Some(cluster.clone())).await;
        let client = AdminClient::new(&format!("http://{addr}"), None)
            .expect("client")
            .with_timeout(WAIT);

        let status = client.get("/api/v1/cluster").await.expect("status");
        assert_eq!(status, json!({ "leader": 7, "voters": [7, 8] }));

        assert_eq!(status_of(addr, "/readyz").await, 200);
        cluster.ready.store(false, Ordering::Relaxed);
        assert_eq!(
            status_of(addr, "/readyz").await,
            503,
            "no leader: not ready"
        );
        cluster.ready.store(true, Ordering::Relaxed);
        assert_eq!(status_of(addr, "/readyz").await, 200);

        let join =
            |id: u64| json!({ "node_id": id, "cluster_addr": "n2:7946", "mqtt_addr": "n2:1883" });
        let added = client.post("/api/v1/cluster/nodes", &join(2)).await;
        assert_eq!(
            added.expect("node 2 joins"),
            json!({ "node_id": 2, "added": true })
        );
        assert_eq!(
            api_status(client.post("/api/v1/cluster/nodes", &join(5)).await),
            409
        );

        for (id, status) in [(9, 404), (3, 503), (4, 502)] {
            let removed = client.delete(&format!("/api/v1/cluster/nodes/{id}")).await;
            assert_eq!(api_status(removed), status, "removing node {id}");
        }
    }

    #[tokio::test]
    async fn a_node_without_a_cluster_is_ready_and_has_no_cluster_api() {
        let (addr, _stop) = serve_with(None).await;
        let client = AdminClient::new(&format!("http://{addr}"), None)
            .expect("client")
            .with_timeout(WAIT);
        assert_eq!(status_of(addr, "/readyz").await, 200);
        assert_eq!(api_status(client.get("/api/v1/cluster").await), 404);
        let join = json!({ "node_id": 2, "cluster_addr": "n2:7946" });
        assert_eq!(
            api_status(client.post("/api/v1/cluster/nodes", &join).await),
            404
        );
        assert_eq!(
            api_status(client.delete("/api/v1/cluster/nodes/2").await),
            404
        );
    }
}
