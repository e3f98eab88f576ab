//! The network front end: MQTT listeners (TCP, TLS, WebSocket, secure WebSocket, each optionally
//! behind the PROXY protocol), connection limits, one task per connection, the HTTP endpoint
//! (`/metrics`, `/healthz`, `/readyz`, the admin API), and the admin API's client (used by
//! `raftmq ctl`).
//!
//! This crate is the only one that opens sockets. It owns no broker logic: each connection task
//! feeds decoded packets to the sans-IO [`raftmq_core::Connection`] state machine and writes out
//! what it produces. It records metrics through the `metrics` facade but never installs a
//! recorder or a tracing subscriber (the binary does).

mod admin;
pub mod admin_client;
pub mod auth;
pub mod bridge;
mod config;
mod connection;
mod control;
mod descriptors;
mod drain;
mod http;
pub mod limits;
pub mod metrics;
mod proxy;
mod server;
mod stream;
mod sys;
mod tls;
mod ws;
mod x509;

pub use config::{
    CertIdentitySource, ClientAuth, DrainConfig, HttpConfig, LimitsConfig, ListenerKind,
    ListenersConfig, TlsConfig, TlsVersion,
};
pub use control::{ClusterAdminError, ClusterControl, MembershipChange};
pub use server::{ClusterServer, MetricsRender, Server, ServerError};
pub use stream::WsStream;
pub use tls::{ClusterTlsPem, TlsError};
