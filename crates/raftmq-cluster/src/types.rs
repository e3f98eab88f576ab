//! The openraft type configuration of a raftmq Raft group.

use serde::{Deserialize, Serialize};

/// The payload of a normal log entry: an encoded `raftmq.state.v1.Batch`. The Raft log carries
/// versioned protobuf bytes, so the state machine of another version can read it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub batch: Vec<u8>,
}

/// What applying an entry returns (nothing: proposers only need to know it committed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response;

/// A member's addresses, part of the replicated membership.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterNode {
    /// host:port of the node's cluster gRPC endpoint.
    pub cluster_addr: String,
    /// host:port of the node's MQTT listener (for redirects).
    pub mqtt_addr: String,
}

/// A node id (the StatefulSet ordinal + 1 on Kubernetes).
pub type NodeId = u64;

/// The shard (Raft group) id carried by every command, RPC and key prefix of the store.
pub use raftmq_core::shard::ShardId;

/// The one data group, until the cluster is sharded (RFC 0002, step 2): shard 1. Group 0 is
/// reserved for the metadata group.
pub const DATA_SHARD: ShardId = ShardId::FIRST_DATA;

openraft::declare_raft_types!(
    /// Type configuration of raftmq's Raft groups.
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = ClusterNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = std::io::Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// openraft's types specialised to [`TypeConfig`].
pub type Raft = openraft::Raft<TypeConfig>;
pub type Entry = openraft::Entry<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type Vote = openraft::Vote<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, ClusterNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, ClusterNode>;
pub type Snapshot = openraft::Snapshot<TypeConfig>;
pub type StorageError = openraft::StorageError<NodeId>;
