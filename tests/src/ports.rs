//! Loopback ports for nodes a test starts on fixed addresses (real `raftmq` processes, cluster
//! nodes that must keep their address across a restart).
//!
//! Ports are handed out below the kernel's ephemeral range (32768 and up on Linux), so an
//! outgoing connection cannot take one as its source port between the check here and a node
//! binding it. The range is cut into blocks; each test process claims a block of its own for
//! its whole life by keeping the block's first port bound (the kernel releases it when the
//! process exits, however it exits), so test binaries running at the same time, from this
//! checkout or another, never hand out the same port. Within its block a process goes round
//! and round, skipping ports something still listens on.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

/// The first port of the first block.
const FIRST: u32 = 20_000;
/// Ports per block (the first one is the claim, the others are handed out).
const BLOCK_SIZE: u32 = 250;
/// Blocks between [`FIRST`] and 32000.
const BLOCKS: u32 = 48;

/// The block this process claimed.
struct Block {
    /// Bound for the life of the process: the claim.
    _claim: TcpListener,
    /// The first port handed out.
    first: u32,
    /// Ports handed out so far (wraps around the block).
    next: AtomicU32,
}

static BLOCK: OnceLock<Block> = OnceLock::new();

/// Claims the first free block, starting from one chosen by the process id so that processes
/// started together do not all try the same blocks in the same order.
fn claim_block() -> Block {
    let start = std::process::id() % BLOCKS;
    for i in 0..BLOCKS {
        let first = FIRST + (start + i) % BLOCKS * BLOCK_SIZE;
        if let Ok(claim) = TcpListener::bind((Ipv4Addr::LOCALHOST, port(first))) {
            return Block {
                _claim: claim,
                first: first + 1,
                next: AtomicU32::new(0),
            };
        }
    }
    panic!(
        "every block of test ports in {FIRST}-{} is claimed by another process",
        FIRST + BLOCKS * BLOCK_SIZE - 1
    );
}

fn port(n: u32) -> u16 {
    u16::try_from(n).expect("test ports are below 65536")
}

/// A loopback port nothing listens on right now, from this process's block (see the module
/// documentation). Successive calls give different ports until the block wraps around.
pub fn free_port() -> u16 {
    next_free(BLOCK.get_or_init(claim_block))
}

/// The next port of `block` nothing listens on.
fn next_free(block: &Block) -> u16 {
    let span = BLOCK_SIZE - 1;
    for _ in 0..span {
        let n = block.first + block.next.fetch_add(1, Ordering::Relaxed) % span;
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port(n))).is_ok() {
            return port(n);
        }
    }
    panic!(
        "no free port in the block {}-{}",
        block.first,
        block.first + span - 1
    );
}

/// `127.0.0.1` with a [`free_port`].
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn in_block(block: &Block, p: u16) -> bool {
        (block.first..block.first + BLOCK_SIZE - 1).contains(&u32::from(p))
    }

    #[test]
    fn ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let block = claim_block();
        let ports: Vec<u16> = (0..100).map(|_| next_free(&block)).collect();
        let distinct: BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len(), "a port was handed out twice");
        for p in &ports {
            assert!((20_000..32_000).contains(&u32::from(*p)), "{p}");
            assert!(in_block(&block, *p), "{p} is outside the block");
            TcpListener::bind((Ipv4Addr::LOCALHOST, *p)).expect("the port is free");
        }
        assert!(in_block(BLOCK.get_or_init(claim_block), free_port()));
    }

    #[test]
    fn a_port_in_use_is_skipped_and_the_block_wraps_around() {
        let block = claim_block();
        let held_port = port(block.first);
        let _held = TcpListener::bind((Ipv4Addr::LOCALHOST, held_port)).expect("bind");
        let got: Vec<u16> = (0..BLOCK_SIZE + 10).map(|_| next_free(&block)).collect();
        assert!(!got.contains(&held_port), "a port in use was handed out");
        assert!(
            got.iter().all(|p| in_block(&block, *p)),
            "wrapping around left the block"
        );
        assert_eq!(got[0], held_port + 1);
        assert_eq!(
            got[BLOCK_SIZE as usize - 2],
            held_port + 1,
            "wrapped around"
        );
    }

    #[test]
    fn a_claimed_block_is_not_claimed_again() {
        let (a, b) = (claim_block(), claim_block());
        assert_ne!(a.first, b.first);
        assert!(
            TcpListener::bind((Ipv4Addr::LOCALHOST, port(a.first - 1))).is_err(),
            "the block's claim is not held"
        );
    }
}
