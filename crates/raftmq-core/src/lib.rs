//! Broker logic without I/O.
//!
//! This crate owns everything an MQTT broker decides: topic rules, the sharded subscription index,
//! retained messages, the per-client session and QoS state machine, routing of a publish to the
//! sessions that must receive it, and the authentication/authorization traits.
//!
//! It must never: open a socket or file, read the clock (time is passed in as [`Instant`] values
//! by the caller), spawn a thread or task, or depend on tokio, tonic or rocksdb. Locks are allowed
//! (the index and the session registry are shared by connection tasks), blocking I/O is not.

pub mod acl;
pub mod auth;
pub mod broker;
pub mod config;
pub mod connection;
pub mod durability;
pub mod index;
pub mod limits;
pub mod message;
pub mod retained;
pub mod session;
pub mod shard;
pub mod stats;
pub mod topic;

pub use broker::{Attached, Broker, DetachKind, Forwarder, NEVER_EXPIRES, Redirect};
pub use connection::{CloseReason, Connection, RESERVED_CLIENT_ID_PREFIX};
pub use message::{Delivery, Message};
pub use session::Session;
