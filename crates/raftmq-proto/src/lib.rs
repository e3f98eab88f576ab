//! raftmq-proto
