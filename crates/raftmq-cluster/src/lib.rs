//! Raft replication of the broker's durable state.
//!
//! Owns the openraft type configuration ([`types`]), the replicated state machine (a pure,
//! deterministic `apply` of `raftmq.state.v1` batches into the store's column families), the
//! conversions between the core's `StateChange`s and their protobuf form, and the
//! [`raftmq_core::durability::Durability`] implementation that proposes batches through Raft.
//!
//! It must never: read the clock inside `apply`, use randomness in `apply`, listen on a socket
//! (the server crate serves the gRPC endpoints), or link RocksDB directly (it goes through
//! `raftmq-store`).

pub mod convert;
pub mod durability;
pub mod election;
pub mod forward;
pub mod groups;
pub mod grpc;
pub mod network;
pub mod node;
pub mod peers;
pub mod quiesce;
mod raft_proto;
pub mod split;
pub mod state_machine;
pub mod types;
pub mod upgrade;
