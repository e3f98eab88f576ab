//! raftmq-cluster
