//! The network front end: MQTT listeners, one task per connection, and the HTTP endpoint
//! (`/metrics`, `/healthz`, `/readyz`).
//!
//! This crate is the only one that opens sockets. It owns no broker logic: each connection task
//! feeds decoded packets to the sans-IO [`raftmq_core::Connection`] state machine and writes out
//! what it produces. It records metrics through the `metrics` facade but never installs a
//! recorder or a tracing subscriber (the binary does).

pub mod auth;
mod config;
mod connection;
mod http;
pub mod metrics;
mod server;
mod sys;

pub use config::{HttpConfig, ListenersConfig};
pub use server::{ClusterInfo, ClusterServer, MetricsRender, Server, ServerError};
