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
//!
//! A node that **restarts** before anyone declared it down has lost its table with its previous
//! process, and its peers learn of the new process from its first full table (a new
//! incarnation). They keep the old process's table aside and send it to the new process
//! (`EndedWills`), which publishes each will once, after a barrier commit proves what it has
//! applied is current, unless it was declared down meanwhile (then the declaring node
//! published them). Peers drop such a table when the node is declared down, or after
//! [`ENDED_WILLS_KEPT`].

use crate::broker::{Broker, UNFENCED};
use crate::session::PendingWill;
use ahash::HashMap;
use parking_lot::Mutex;
use raftmq_codec::{ByteStr, ReasonCode};
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// What became of this node while it was out of touch (or of its previous process): whether
/// it was declared down, and which of its sessionless wills the declaring node published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WillsOutcome {
    /// Not declared down: this node publishes its wills itself.
    Kept,
    /// Declared down; the declaring node published the wills of these client ids
    /// (`NodeDown.wills`), and this node publishes the others it held (registered while it
    /// was cut off from the declaring node).
    Declared(HashSet<ByteStr>),
    /// The store could not tell: every such will is dropped (never published twice).
    Unknown,
}

impl WillsOutcome {
    /// Whether this node publishes the will of `client_id` itself.
    fn publishes_here(&self, client_id: &ByteStr) -> bool {
        match self {
            WillsOutcome::Kept => true,
            WillsOutcome::Declared(published) => !published.contains(client_id),
            WillsOutcome::Unknown => false,
        }
    }
}

/// How long a peer's ended process's wills are kept, to be sent to its new process.
pub const ENDED_WILLS_KEPT: Duration = Duration::from_secs(300);

/// One peer's table, as announced by one process of it.
#[derive(Default)]
struct PeerTable {
    incarnation: u64,
    wills: HashMap<ByteStr, PendingWill>,
    /// The process reported that it settled its previous processes' wills (see
    /// [`WillsAnnouncement::ended_settled`]).
    ended_settled: bool,
}

/// A will announcement from one process of a peer (see [`Broker::apply_peer_wills`]).
#[derive(Clone, Debug, Default)]
pub struct WillsAnnouncement {
    /// The id of the sending process.
    pub incarnation: u64,
    /// The whole table (sent when a stream opens), else a delta.
    pub full: bool,
    pub registered: Vec<(ByteStr, PendingWill)>,
    pub released: Vec<ByteStr>,
    /// The process has settled the wills of the node's previous processes (published them,
    /// or left them to the node that declared it down): peers no longer include them in a
    /// declaration, nor carry them over to the next process.
    pub ended_settled: bool,
}

/// The table a peer's previous process had announced when a new process of it showed up.
struct EndedTable {
    incarnation: u64,
    wills: HashMap<ByteStr, PendingWill>,
    since: Instant,
}

/// What the peers report of this node's previous process's wills.
#[derive(Default)]
struct Predecessor {
    /// `None` until this node knows whether its previous process was declared down (see
    /// [`Broker::settle_predecessor_wills`]).
    settled: Option<WillsOutcome>,
    /// Received before that.
    pending: Vec<(ByteStr, PendingWill)>,
    /// Every will received, as (client id, topic, payload): each peer sends its copy, and
    /// peers that saw different processes of this node end may send one will under different
    /// incarnations.
    seen: HashSet<(ByteStr, ByteStr, bytes::Bytes)>,
}

/// This node's sessionless wills and the peers' (leaf locks, one at a time, except `peers` then
/// `ended`).
#[derive(Default)]
pub(in crate::broker) struct Wills {
    /// Client id → the will of its connection here.
    local: Mutex<HashMap<ByteStr, PendingWill>>,
    /// Bumped on every change of `local`.
    generation: AtomicU64,
    /// Each peer's table, as its current process announced it.
    peers: Mutex<HashMap<u64, PeerTable>>,
    /// Per peer: the table of its previous process, to send to the new one.
    ended: Mutex<HashMap<u64, EndedTable>>,
    /// Bumped whenever `ended` gains a table.
    ended_generation: AtomicU64,
    /// This node's previous process's wills, as peers send them.
    predecessor: Mutex<Predecessor>,
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

    /// Applies a will announcement from process `incarnation` of peer `node`: its full table
    /// (`full`), or wills registered and released since its last announcement. The first
    /// announcement of a new process sets the previous process's table aside (see the module
    /// docs and [`Broker::ended_wills_of`]).
    pub fn apply_peer_wills(&self, node: u64, announced: WillsAnnouncement, now: Instant) {
        let wills = &self.cluster.wills;
        let mut peers = wills.peers.lock();
        let table = peers.entry(node).or_default();
        if table.incarnation != announced.incarnation {
            let old = std::mem::take(&mut table.wills);
            if table.incarnation != 0 {
                let mut ended = wills.ended.lock();
                // The ended process had settled its predecessors' wills: only its own are
                // left to its successor. Otherwise they are carried over with its own.
                if table.ended_settled {
                    ended.remove(&node);
                }
                if !old.is_empty() {
                    let entry = ended.entry(node).or_insert_with(|| EndedTable {
                        incarnation: table.incarnation,
                        wills: HashMap::default(),
                        since: now,
                    });
                    entry.incarnation = table.incarnation;
                    entry.since = now;
                    entry.wills.extend(old);
                    wills.ended_generation.fetch_add(1, Relaxed);
                }
            }
            table.incarnation = announced.incarnation;
        }
        table.ended_settled = announced.ended_settled;
        if announced.full {
            table.wills.clear();
        }
        for client_id in announced.released {
            table.wills.remove(&client_id);
        }
        table.wills.extend(announced.registered);
    }

    /// Whether this process has settled the wills of its node's previous processes (see
    /// [`Broker::settle_predecessor_wills`]): announced to peers with its table.
    pub fn predecessor_settled(&self) -> bool {
        self.cluster.wills.predecessor.lock().settled.is_some()
    }

    /// How many wills peer `node` has announced.
    pub fn peer_will_count(&self, node: u64) -> usize {
        self.cluster
            .wills
            .peers
            .lock()
            .get(&node)
            .map_or(0, |t| t.wills.len())
    }

    /// The wills announced by the previous process of peer `node` (with its incarnation) that
    /// had not been released when a new process of it showed up: sent to the new process,
    /// which publishes them (see the module docs). Tables older than [`ENDED_WILLS_KEPT`] are
    /// dropped.
    pub fn ended_wills_of(
        &self,
        node: u64,
        now: Instant,
    ) -> Option<(u64, Vec<(ByteStr, PendingWill)>)> {
        let mut ended = self.cluster.wills.ended.lock();
        ended.retain(|_, t| now.saturating_duration_since(t.since) < ENDED_WILLS_KEPT);
        ended.get(&node).map(|t| {
            (
                t.incarnation,
                t.wills
                    .iter()
                    .map(|(id, will)| (id.clone(), will.clone()))
                    .collect(),
            )
        })
    }

    /// Changes whenever a peer's ended process's table is set aside.
    pub fn ended_wills_generation(&self) -> u64 {
        self.cluster.wills.ended_generation.load(Relaxed)
    }

    /// Wills of this node's previous processes, as a peer sent them: each is published once,
    /// when this node knows it was not declared down meanwhile (see
    /// [`Broker::settle_predecessor_wills`]; at once if it knows already). Returns how many
    /// were published now.
    pub fn predecessor_wills(&self, wills: Vec<(ByteStr, PendingWill)>, now: Instant) -> usize {
        let mut publish = Vec::new();
        {
            let mut p = self.cluster.wills.predecessor.lock();
            for (client_id, will) in wills {
                let key = (
                    client_id.clone(),
                    will.message.topic.clone(),
                    will.message.payload.clone(),
                );
                if !p.seen.insert(key) {
                    continue;
                }
                match &p.settled {
                    None => p.pending.push((client_id, will)),
                    Some(outcome) if outcome.publishes_here(&client_id) => publish.push(will),
                    Some(_) => {}
                }
            }
        }
        let count = publish.len();
        for will in publish {
            self.publish_will(will, now);
        }
        count
    }

    /// Settles the wills of this node's previous process (see
    /// [`Broker::predecessor_wills`]) by what became of it (`outcome`): those the node that
    /// declared it down published are dropped, the others published, now and as they arrive.
    /// Call once everything committed before this process started is applied here (a
    /// barrier). Returns how many were published now.
    pub fn settle_predecessor_wills(&self, outcome: WillsOutcome, now: Instant) -> usize {
        let pending = {
            let mut p = self.cluster.wills.predecessor.lock();
            let pending = std::mem::take(&mut p.pending);
            let publish: Vec<PendingWill> = pending
                .into_iter()
                .filter(|(id, _)| outcome.publishes_here(id))
                .map(|(_, will)| will)
                .collect();
            p.settled = Some(outcome);
            publish
        };
        // Announced to the peers with the table (they drop what they set aside).
        self.cluster.wills.generation.fetch_add(1, Relaxed);
        let count = pending.len();
        for will in pending {
            self.publish_will(will, now);
        }
        count
    }

    /// The client ids of the wills announced by `node` (by its current process and, set
    /// aside, its previous ones unless the current one settled them): what a declaration of
    /// it down lists (`NodeDown.wills`).
    pub fn peer_will_ids(&self, node: u64) -> Vec<ByteStr> {
        let (mut ids, settled): (HashSet<ByteStr>, bool) = self
            .cluster
            .wills
            .peers
            .lock()
            .get(&node)
            .map(|t| (t.wills.keys().cloned().collect(), t.ended_settled))
            .unwrap_or_default();
        if !settled && let Some(t) = self.cluster.wills.ended.lock().get(&node) {
            ids.extend(t.wills.keys().cloned());
        }
        let mut ids: Vec<ByteStr> = ids.into_iter().collect();
        ids.sort_unstable();
        ids
    }

    /// Publishes the wills announced by `node` (its previous processes' set aside too) whose
    /// client ids `listed` (from [`Broker::peer_will_ids`]) names: this node has just declared `node` down with that list
    /// (their connections ended with it, ungracefully; their sessions ended too, having no
    /// expiry). Once, here; the rest of its table is dropped (the declared node publishes
    /// what it held beyond the list). Returns how many.
    pub fn publish_wills_of(&self, node: u64, listed: &[ByteStr], now: Instant) -> usize {
        let table = self.cluster.wills.peers.lock().remove(&node);
        let ended = self.cluster.wills.ended.lock().remove(&node);
        let mut wills: HashMap<ByteStr, PendingWill> = ended.map(|t| t.wills).unwrap_or_default();
        wills.extend(table.into_iter().flat_map(|t| t.wills));
        let mut count = 0;
        for (client_id, will) in wills {
            if listed.contains(&client_id) {
                self.publish_will(will, now);
                count += 1;
            }
        }
        count
    }

    /// Forgets the wills announced by `node` (it was declared down by another node, which
    /// publishes them).
    pub(in crate::broker) fn forget_peer_wills(&self, node: u64) {
        self.cluster.wills.peers.lock().remove(&node);
        self.cluster.wills.ended.lock().remove(&node);
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

    /// Settles the wills handed over by [`Broker::hand_over_sessionless_wills`] by what became
    /// of this node meanwhile (`outcome`): those the node that declared it down published
    /// are dropped, the others published here, now. Either way they leave this node's
    /// announced table. Returns how many were published.
    pub fn settle_handed_over_wills(&self, outcome: &WillsOutcome, now: Instant) -> usize {
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
            if outcome.publishes_here(&client_id) {
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
