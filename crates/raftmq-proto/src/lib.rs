//! Generated protobuf and gRPC code for everything raftmq nodes exchange or persist, from the
//! versioned packages under `proto/`: `raftmq.state.v1` (replicated commands and state machine
//! records), `raftmq.raft.v1` (Raft transport and cluster administration) and
//! `raftmq.forward.v1` (live forwarding between nodes).
//!
//! This crate holds generated code only; conversions between these messages and domain types
//! live with the domain types (`raftmq-cluster`).

/// `raftmq.state.v1`: replicated commands and state-machine records.
pub mod state {
    tonic::include_proto!("raftmq.state.v1");
}

/// `raftmq.raft.v1`: Raft transport and cluster administration.
pub mod raft {
    tonic::include_proto!("raftmq.raft.v1");
}

/// `raftmq.forward.v1`: live forwarding of published messages and route announcements.
pub mod forward {
    tonic::include_proto!("raftmq.forward.v1");
}
