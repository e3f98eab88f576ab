//! Wills of connections whose sessions are not stored, shared with the peers.
//!
//! A connection with a will and no persistent session proposes nothing to the log (CONNECT must
//! not wait for consensus), so if its node dies nobody else would know the will. Each node
//! therefore keeps the wills of its sessionless connections in a table with a generation
//! (like its announced routes); the forwarding streams send the full table when they connect and
//! the changes after that. Every node keeps its peers' tables. When a node is declared down
//! (`NodeDown` committed), the node that declared it publishes the dead node's wills, once; the
//! others drop them. A will a node published itself (or that its client cancelled) leaves its
//! table, and the peers' copies, within one forwarding tick.
//!
//! A node cut off from the quorum long enough that the others may declare it down closes these
//! connections too, and **hands their wills over** rather than publishing them: they stay in its
//! table (the peers, which cannot hear from it, keep them) until it knows the outcome. If it was
//! declared down, the declaring node published them; otherwise, once it can commit again, it
//! publishes them itself. Either way each is published once, after its connection ended.

use crate::broker::{Broker, UNFENCED};
use crate::session::PendingWill;
use ahash::HashMap;
use parking_lot::Mutex;
use raftmq_codec::{ByteStr, ReasonCode};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

/// This node's sessionless wills and the peers' (leaf locks, never held together).
#[derive(Default)]
pub(in crate::broker) struct Wills {
    /// Client id → the will of its connection here.
    local: Mutex<HashMap<ByteStr, PendingWill>>,
    /// Bumped on every change of `local`.
    generation: AtomicU64,
    /// Each peer's table, as it announced it.
    peers: Mutex<HashMap<u64, HashMap<ByteStr, PendingWill>>>,
    /// Wills of connections this node closed while cut off, kept in `local` until it knows
    /// whether it was declared down (see the module docs).
    handed_over: Mutex<HashMap<ByteStr, PendingWill>>,
}

impl Wills {
    /// The connection attached to the sessionless session of `client_id` has `will`.
    pub(in crate::broker) fn register(&self, client_id: &ByteStr, will: PendingWill) {
        self.local.lock().insert(client_id.clone(), will);
        self.generation.fetch_add(1, Relaxed);
    }

    /// The will registered for `client_id`, if any, is no longer pending here (published,
    /// cancelled, or the session ended or moved). Called whenever a session is emptied, before
    /// a new connection for the client id registers its own.
    pub(in crate::broker) fn release(&self, client_id: &ByteStr) {
        // A handed-over will stays announced until its outcome is known.
        let handed = self.handed_over.lock().get(client_id).cloned();
        let mut local = self.local.lock();
        if handed.is_some() && local.get(client_id) == handed.as_ref() {
            return;
        }
        if local.remove(client_id).is_some() {
            self.generation.fetch_add(1, Relaxed);
        }
    }
}

impl Broker {
    /// The wills of this node's sessionless connections, with the generation they are at
    /// ([`Broker::wills_generation`]), to announce to peers.
    pub fn local_wills(&self) -> (u64, Vec<(ByteStr, PendingWill)>) {
        let wills = &self.cluster.wills;
        let local = wills.local.lock();
        let generation = wills.generation.load(Relaxed);
        (
            generation,
            local
                .iter()
                .map(|(id, will)| (id.clone(), will.clone()))
                .collect(),
        )
    }

    /// Changes whenever [`Broker::local_wills`] changes.
    pub fn wills_generation(&self) -> u64 {
        self.cluster.wills.generation.load(Relaxed)
    }

    /// Applies a will announcement from peer `node`: its full table (`full`), or wills
    /// registered and released since its last announcement.
    pub fn apply_peer_wills(
        &self,
        node: u64,
        full: bool,
        registered: Vec<(ByteStr, PendingWill)>,
        released: Vec<ByteStr>,
    ) {
        let mut peers = self.cluster.wills.peers.lock();
        let table = peers.entry(node).or_default();
        if full {
            table.clear();
        }
        for client_id in released {
            table.remove(&client_id);
        }
        table.extend(registered);
    }

    /// How many wills peer `node` has announced.
    pub fn peer_will_count(&self, node: u64) -> usize {
        self.cluster
            .wills
            .peers
            .lock()
            .get(&node)
            .map_or(0, HashMap::len)
    }

    /// Publishes the wills announced by `node`, which this node has just declared down (their
    /// connections ended with it, ungracefully; their sessions ended too, having no expiry):
    /// once, here. Returns how many.
    pub fn publish_wills_of(&self, node: u64, now: Instant) -> usize {
        let table = self.cluster.wills.peers.lock().remove(&node);
        let wills: Vec<PendingWill> = table.into_iter().flat_map(|t| t.into_values()).collect();
        let count = wills.len();
        for will in wills {
            self.publish_will(will, now);
        }
        count
    }

    /// Forgets the wills announced by `node` (it was declared down by another node, which
    /// publishes them).
    pub(in crate::broker) fn forget_peer_wills(&self, node: u64) {
        self.cluster.wills.peers.lock().remove(&node);
    }

    /// Closes every connection here that has a will and no stored session (MQTT 5: with
    /// `code`), keeping their wills unpublished and announced: this node is cut off and may be
    /// declared down, and then the declaring node publishes them (see the module docs and
    /// [`Broker::settle_handed_over_wills`]). Returns how many.
    pub fn hand_over_sessionless_wills(&self, code: Option<ReasonCode>) -> usize {
        let ids: Vec<ByteStr> = self.cluster.wills.local.lock().keys().cloned().collect();
        let mut handed = 0;
        for client_id in ids {
            let Some(session) = self.sessions.lock().get(&client_id).cloned() else {
                continue;
            };
            let mut st = session.lock_unfenced(UNFENCED);
            if session.is_durable() || !st.online {
                continue;
            }
            let Some(will) = st.will.take() else {
                continue;
            };
            if st.kick.is_none() {
                st.kick = Some(code.unwrap_or(ReasonCode::SESSION_TAKEN_OVER));
            }
            // Wake its connection, which closes on the kick.
            crate::session::Session::notify(&mut st);
            drop(st);
            self.cluster
                .wills
                .handed_over
                .lock()
                .insert(client_id, will);
            handed += 1;
        }
        handed
    }

    /// Settles the wills handed over by [`Broker::hand_over_sessionless_wills`]: dropped when
    /// this node was declared down meanwhile (`declared`: the declaring node published them),
    /// else published here, now. Either way they leave this node's announced table. Returns
    /// how many were published.
    pub fn settle_handed_over_wills(&self, declared: bool, now: Instant) -> usize {
        let handed = std::mem::take(&mut *self.cluster.wills.handed_over.lock());
        let mut published = 0;
        for (client_id, will) in handed {
            {
                let wills = &self.cluster.wills;
                let mut local = wills.local.lock();
                if local.get(&client_id) == Some(&will) {
                    local.remove(&client_id);
                    wills.generation.fetch_add(1, Relaxed);
                }
            }
            if !declared {
                self.publish_will(will, now);
                published += 1;
            }
        }
        published
    }

    /// How many wills are handed over and not settled yet.
    pub fn handed_over_wills(&self) -> usize {
        self.cluster.wills.handed_over.lock().len()
    }
}
