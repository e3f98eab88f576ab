//! raftmq-store
