//! What the front end needs from the cluster, as one trait. This crate does not know Raft: the
//! binary implements [`ClusterControl`] over its Raft node and hands it to
//! [`Server::set_cluster`](crate::Server::set_cluster). Without one the node runs alone:
//! `/readyz` follows only the listeners and the cluster endpoints of the admin API answer 404.

use std::future::Future;
use std::pin::Pin;

/// A membership change under way; resolves once it is committed or has failed.
pub type MembershipChange<'a> =
    Pin<Box<dyn Future<Output = Result<(), ClusterAdminError>> + Send + 'a>>;

/// The cluster as the HTTP endpoint sees it: status, readiness and membership changes.
pub trait ClusterControl: Send + Sync {
    /// The cluster status as JSON, for `GET /api/v1/cluster`.
    fn status(&self) -> serde_json::Value;

    /// Whether this node can commit durable writes now (a leader is known), for `/readyz`.
    fn is_ready(&self) -> bool;

    /// Adds node `id`, which peers reach at `cluster_addr` and clients at `mqtt_addr` (empty
    /// when it has no MQTT listener to advertise).
    fn add_node(&self, id: u64, cluster_addr: String, mqtt_addr: String) -> MembershipChange<'_>;

    /// Removes node `id` from the cluster.
    fn remove_node(&self, id: u64) -> MembershipChange<'_>;
}

/// Why a membership change failed, as the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum ClusterAdminError {
    /// 404: no such node.
    #[error("{0}")]
    NotFound(String),
    /// 409: the change is not allowed in the current membership.
    #[error("{0}")]
    Conflict(String),
    /// 503: no leader/quorum; retry later.
    #[error("{0}")]
    Unavailable(String),
    /// 502: the leader failed or the change timed out.
    #[error("{0}")]
    Failed(String),
}
