//! Live forwarding between nodes: the routes each node announces, sending a publish to the
//! peers with matching subscribers, delivering what peers forward, and claims of client ids
//! whose sessions are not stored.

use super::live;
use crate::broker::routing::Scope;
use crate::broker::{Broker, UNFENCED};
use crate::durability::{Commit, MessageId};
use crate::index::Match;
use crate::index::SubscriptionIndex;
use crate::message::{Delivery, Message};
use crate::session::Session;
use crate::topic::{TopicLimits, parse_subscription};
use ahash::HashMap;
use parking_lot::Mutex;
use raftmq_codec::ByteStr;
use smallvec::SmallVec;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Live forwarding to other nodes (implemented by the cluster layer, which owns the streams).
/// Must not block: implementations queue and count what they cannot take.
pub trait Forwarder: Send + Sync + 'static {
    /// Sends `message` to node `node`, for its ordinary subscribers if `plain`, and for one
    /// member of each shared subscription in `shared` (`$share/<group>/<filter>`). For QoS 1/2
    /// the returned commit resolves when the peer acknowledged it (the publisher's PUBACK waits
    /// for it: backpressure instead of loss); it fails when the message could not be queued.
    /// `stored`: the id under which this node stores the message (QoS 1/2) for persistent
    /// sessions held by other nodes, so the peer can deliver it to them at once and skip the
    /// replicated copy (see [`Broker::deliver_forwarded`]).
    /// `after`: the commit of the same publisher's previous message stored through the log;
    /// the peer must deliver this message only once it has applied that commit (a message
    /// that reached some of its sessions through the log only is not overtaken by this one).
    fn forward(
        &self,
        node: u64,
        message: &Arc<Message>,
        plain: bool,
        shared: Vec<Arc<str>>,
        stored: Option<MessageId>,
        after: Option<&Commit>,
    ) -> Commit;

    /// Tells every peer that `client_id` connected here at `at` with a session that is not
    /// stored (so no claim goes through the replicated log): a peer still holding an older
    /// connection or session for it ends them ([`Broker::claimed_elsewhere`]). Best effort.
    fn claim(&self, client_id: &ByteStr, at: Instant) {
        let _ = (client_id, at);
    }
}

/// Where this node's subscribers are (announced to peers), and where the peers' are.
pub(in crate::broker) struct Routes {
    /// Filters (as subscribed, `$share/...` included) with local subscribers: reference counts.
    pub(in crate::broker) local: Mutex<HashMap<Arc<str>, usize>>,
    /// Bumped on every change of `local`'s key set.
    pub(in crate::broker) generation: AtomicU64,
    /// Filters each peer announced, and the same as an index (keys: node ids).
    pub(in crate::broker) peers: Mutex<HashMap<u64, std::collections::HashSet<Arc<str>>>>,
    /// Values: the filter as announced (`$share/...` included), handed back to the peer.
    pub(in crate::broker) peer_index: SubscriptionIndex<u64, Arc<str>>,
    pub(in crate::broker) forwarder: std::sync::OnceLock<Arc<dyn Forwarder>>,
    /// Where MQTT 5 clients are sent when this node cannot commit (`Server Reference`).
    pub(in crate::broker) redirect: std::sync::OnceLock<Redirect>,
}

/// Names another server for a client this node cannot serve durably (e.g. no quorum).
pub type Redirect = Arc<dyn Fn() -> Option<String> + Send + Sync>;

impl Routes {
    pub(in crate::broker) fn new(shards: usize) -> Self {
        Routes {
            local: Mutex::new(HashMap::default()),
            generation: AtomicU64::new(0),
            peers: Mutex::new(HashMap::default()),
            peer_index: SubscriptionIndex::new(shards),
            forwarder: std::sync::OnceLock::new(),
            redirect: std::sync::OnceLock::new(),
        }
    }

    /// A local subscription to `key` was added (`+1`) or removed (`-1`). `$SYS` filters are
    /// per node and never announced.
    pub(in crate::broker) fn local_ref(&self, key: &Arc<str>, add: bool) {
        if key.starts_with("$SYS") {
            return;
        }
        let mut local = self.local.lock();
        if add {
            let count = local.entry(key.clone()).or_insert(0);
            *count += 1;
            if *count == 1 {
                self.generation.fetch_add(1, Relaxed);
            }
        } else if let Some(count) = local.get_mut(key) {
            *count -= 1;
            if *count == 0 {
                local.remove(key);
                self.generation.fetch_add(1, Relaxed);
            }
        }
    }

    pub(in crate::broker) fn peer_add(&self, node: u64, key: &Arc<str>, limits: &TopicLimits) {
        if let Ok(parsed) = parse_subscription(key, limits) {
            self.peer_index.subscribe(
                &parsed.filter,
                parsed.share_group.as_deref(),
                node,
                key.clone(),
            );
        }
    }

    pub(in crate::broker) fn peer_remove(&self, node: u64, key: &Arc<str>, limits: &TopicLimits) {
        if let Ok(parsed) = parse_subscription(key, limits) {
            self.peer_index
                .unsubscribe(&parsed.filter, parsed.share_group.as_deref(), &node);
        }
    }
}

impl Broker {
    /// Queues the forwarded copy of stored QoS 1 message `id` for a connected persistent
    /// session here, unless its replicated copy was queued first (see `live`). Returns whether
    /// it was queued.
    pub(in crate::broker) fn deliver_stored_live(
        &self,
        session: &Arc<Session>,
        delivery: Delivery,
        id: MessageId,
    ) -> bool {
        let (copy, released) = self.cluster.live.forwarded(id, session.client_id());
        drop(self.propose(released));
        if copy == live::Copy::Skip {
            return false;
        }
        if session
            .enqueue(delivery, &self.queue_limits, &self.stats)
            .is_queued()
        {
            return true;
        }
        drop(self.propose(self.cluster.live.not_queued(id, session.client_id())));
        false
    }

    /// Forwards `message` to the peers whose routes match its topic: every peer with ordinary
    /// subscribers, and for each shared subscription with no member here, one peer holding
    /// members (round robin).
    pub(in crate::broker) fn forward_to_peers(
        &self,
        message: &Arc<Message>,
        local_groups: &[(String, String)],
        stored: Option<MessageId>,
        after: Option<&Commit>,
        acks: &mut Vec<Commit>,
    ) {
        let Some(forwarder) = self.cluster.routes.forwarder.get() else {
            return;
        };
        /// Per peer: (node, deliver to its ordinary subscribers, shared subscriptions).
        type PerNode = SmallVec<[(u64, bool, Vec<Arc<str>>); 4]>;
        let mut per_node: PerNode = SmallVec::new();
        fn slot(per_node: &mut PerNode, node: u64) -> usize {
            match per_node.iter().position(|(n, _, _)| *n == node) {
                Some(i) => i,
                None => {
                    per_node.push((node, false, Vec::new()));
                    per_node.len() - 1
                }
            }
        }
        self.cluster
            .routes
            .peer_index
            .for_each_match(&message.topic, |m| match m {
                Match::Plain { key, .. } => {
                    let i = slot(&mut per_node, *key);
                    per_node[i].1 = true;
                }
                Match::Shared {
                    group,
                    filter,
                    members,
                    cursor,
                } => {
                    if local_groups.iter().any(|(g, f)| g == group && f == filter)
                        || members.is_empty()
                    {
                        return;
                    }
                    let pick = &members[cursor.fetch_add(1, Relaxed) % members.len()];
                    let i = slot(&mut per_node, pick.0);
                    per_node[i].2.push(pick.1.clone());
                }
            });
        for (node, plain, shared) in per_node {
            acks.push(forwarder.forward(node, message, plain, shared, stored, after));
        }
    }

    /// Installs how to name another server (MQTT 5 Server Reference) for clients whose
    /// durable work this node cannot commit (once; later calls are ignored).
    pub fn set_redirect(&self, redirect: Redirect) {
        let _ = self.cluster.routes.redirect.set(redirect);
    }

    /// Another server for a client this node cannot serve durably right now, if one is known.
    pub fn redirect(&self) -> Option<ByteStr> {
        self.cluster
            .routes
            .redirect
            .get()
            .and_then(|r| r())
            .map(ByteStr::from)
    }

    /// Whether this broker is a node of a cluster (a forwarder is installed).
    pub(in crate::broker) fn clustered(&self) -> bool {
        self.cluster.routes.forwarder.get().is_some()
    }

    /// Installs the live forwarding to other nodes (once; later calls are ignored).
    pub fn set_forwarder(&self, forwarder: Arc<dyn Forwarder>) {
        let _ = self.cluster.routes.forwarder.set(forwarder);
    }

    /// The filters this node has local subscribers for, with the generation they are at
    /// ([`Broker::route_generation`]), to announce to peers.
    pub fn local_routes(&self) -> (u64, Vec<Arc<str>>) {
        let local = self.cluster.routes.local.lock();
        (
            self.cluster.routes.generation.load(Relaxed),
            local.keys().cloned().collect(),
        )
    }

    /// Changes whenever the set of [`Broker::local_routes`] changes.
    pub fn route_generation(&self) -> u64 {
        self.cluster.routes.generation.load(Relaxed)
    }

    /// Applies a route announcement from peer `node`: its full set of filters (`full`), or
    /// filters added and removed since its last announcement.
    pub fn apply_peer_routes(
        &self,
        node: u64,
        full: bool,
        added: Vec<Arc<str>>,
        removed: Vec<Arc<str>>,
    ) {
        let mut peers = self.cluster.routes.peers.lock();
        let known = peers.entry(node).or_default();
        if full {
            let new: std::collections::HashSet<Arc<str>> = added.iter().cloned().collect();
            for old in known.iter().filter(|k| !new.contains(*k)) {
                self.cluster
                    .routes
                    .peer_remove(node, old, &self.topic_limits);
            }
            for key in new.iter().filter(|k| !known.contains(*k)) {
                self.cluster.routes.peer_add(node, key, &self.topic_limits);
            }
            *known = new;
            return;
        }
        for key in removed {
            if known.remove(&key) {
                self.cluster
                    .routes
                    .peer_remove(node, &key, &self.topic_limits);
            }
        }
        for key in added {
            if known.insert(key.clone()) {
                self.cluster.routes.peer_add(node, &key, &self.topic_limits);
            }
        }
    }

    /// Drops every route of peer `node` (it left the cluster).
    pub fn forget_peer(&self, node: u64) {
        self.apply_peer_routes(node, true, Vec::new(), Vec::new());
        self.cluster.routes.peers.lock().remove(&node);
        self.forget_peer_wills(node);
    }

    /// Delivers a message another node forwarded (see [`Scope::Forwarded`]); never forwards
    /// it again nor stores it for sessions of other nodes. Returns how many sessions it was
    /// offered to.
    pub fn deliver_forwarded(
        &self,
        message: Arc<Message>,
        plain: bool,
        shared: &[Arc<str>],
        stored: Option<MessageId>,
    ) -> usize {
        let pass = self.deliver(
            &message,
            Scope::Forwarded {
                plain,
                shared,
                stored,
            },
        );
        // Stores for local persistent members of shared subscriptions: nobody waits on them.
        drop(self.propose(pass.changes));
        self.deliver_committed(pass.deferred);
        pass.offered
    }

    /// A client with id `client_id` connected to another node at `at` (that node's claim, see
    /// [`Forwarder::claim`]): a session here that is older ends (its connection is closed with
    /// Session Taken Over; the old connection's will is published as on any takeover by a
    /// session that is not resumed). A newer one is kept. Returns whether one ended.
    pub fn claimed_elsewhere(&self, client_id: &ByteStr, at: Instant, now: Instant) -> bool {
        let registry = self.sessions.lock();
        let Some(session) = registry.get(client_id).cloned() else {
            return false;
        };
        let mut st = session.lock_unfenced(UNFENCED);
        let since = if st.online {
            st.attached_at
        } else {
            st.disconnected_at
        };
        // Clocks of two processes, even on one host, agree only to a few milliseconds: a
        // session here counts as newer only when clearly so.
        if since.is_some_and(|t| t > at + CLAIM_CLOCK_TOLERANCE) {
            return false;
        }
        if st.online {
            self.stats.takeovers.fetch_add(1, Relaxed);
        }
        let will = st.will.take();
        drop(self.end_locked(registry, &session, st));
        if let Some(will) = will {
            self.publish_will(will, now);
        }
        true
    }
}

/// How much later than a claim from another node a local session must have started to be
/// kept ([`Broker::claimed_elsewhere`]).
pub const CLAIM_CLOCK_TOLERANCE: Duration = Duration::from_millis(100);

/// Whether `key` is `$share/{group}/{filter}`.
pub(in crate::broker) fn is_share_key(key: &str, group: &str, filter: &str) -> bool {
    key.strip_prefix("$share/")
        .and_then(|rest| rest.strip_prefix(group))
        .and_then(|rest| rest.strip_prefix('/'))
        == Some(filter)
}
