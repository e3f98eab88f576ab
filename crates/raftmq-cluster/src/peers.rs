//! One gRPC channel per peer node, shared by every Raft group of this node (RFC 0002,
//! section 8.1, step 2).
//!
//! A tonic [`Channel`] is one HTTP/2 connection that multiplexes concurrent calls, so the
//! clients openraft asks for, one per (group, peer), all clone the one channel of their peer:
//! S groups replicating to a peer use one connection to it, not S. The channel connects lazily
//! and reconnects by itself; it is mutual TLS when the pool is given [`ClusterTls`]. A peer
//! whose cluster address changes (removed and added again elsewhere) gets a new channel.

use crate::network::{ClusterTls, channel};
use crate::types::NodeId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::transport::Channel;

/// The channels of this node to its peers, keyed by node id.
#[derive(Debug, Default)]
pub struct PeerPool {
    tls: Option<ClusterTls>,
    channels: parking_lot::Mutex<HashMap<NodeId, (String, Channel)>>,
    /// Channels made so far (a peer's address change makes a new one).
    created: AtomicU64,
}

impl PeerPool {
    /// An empty pool; channels are made on first use, over mutual TLS when `tls` is given.
    pub fn new(tls: Option<ClusterTls>) -> Self {
        PeerPool {
            tls,
            ..PeerPool::default()
        }
    }

    /// The channel to node `node` at `addr` (host:port): the one already made for it if its
    /// address is the same, else a new lazily connecting one. An invalid address is an error
    /// naming it (nothing is kept for it).
    pub fn channel(&self, node: NodeId, addr: &str) -> Result<Channel, String> {
        let mut channels = self.channels.lock();
        if let Some((known, ch)) = channels.get(&node)
            && known == addr
        {
            return Ok(ch.clone());
        }
        let ch = channel(addr, self.tls.as_ref()).map_err(|e| format!("{addr}: {e}"))?;
        self.created.fetch_add(1, Ordering::Relaxed);
        channels.insert(node, (addr.to_owned(), ch.clone()));
        Ok(ch)
    }

    /// How many channels this pool has made (for tests and diagnostics).
    pub fn channels_created(&self) -> u64 {
        self.created.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_gets_one_channel_until_its_address_changes() {
        let pool = PeerPool::new(None);
        for _ in 0..8 {
            pool.channel(2, "127.0.0.1:7001").expect("valid address");
        }
        assert_eq!(pool.channels_created(), 1, "one channel for every caller");
        pool.channel(3, "127.0.0.1:7002").expect("valid address");
        assert_eq!(pool.channels_created(), 2, "one per peer");
        pool.channel(2, "127.0.0.1:7003").expect("valid address");
        assert_eq!(pool.channels_created(), 3, "a new address, a new channel");
        pool.channel(2, "127.0.0.1:7003").expect("valid address");
        assert_eq!(pool.channels_created(), 3);
        assert!(pool.channel(4, "not an address").is_err());
        assert_eq!(pool.channels_created(), 3, "nothing kept for a bad address");
    }
}
