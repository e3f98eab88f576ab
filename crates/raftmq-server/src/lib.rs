//! The network front end: MQTT listeners (TCP, TLS, WebSocket, secure WebSocket, each optionally
//! behind the PROXY protocol), connection limits, one task per connection, and the HTTP endpoint
//! (`/metrics`, `/healthz`, `/readyz`).
//!
//! This crate is the only one that opens sockets. It owns no broker logic: each connection task
//! feeds decoded packets to the sans-IO [`raftmq_core::Connection`] state machine and writes out
//! what it produces. It records metrics through the `metrics` facade but never installs a
//! recorder or a tracing subscriber (the binary does).

mod config;
mod connection;
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
    CertIdentitySource, ClientAuth, HttpConfig, LimitsConfig, ListenerKind, ListenersConfig,
    TlsConfig, TlsVersion,
};
pub use server::{ClusterInfo, ClusterServer, MetricsRender, Server, ServerError};
pub use stream::WsStream;
pub use tls::TlsError;
