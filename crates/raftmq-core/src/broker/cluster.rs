//! What a node of a cluster adds to the broker. A newcomer can skip this module to learn the
//! single-node broker: on a single node every table here stays empty and no forwarder is set.
//!
//! - `forwarding` — live forwarding: the filters this node announces to its peers and those
//!   they announce (`Routes`), sending a publish to peers with matching subscribers
//!   ([`Forwarder`]), delivering what peers forward, and claims of client ids whose sessions
//!   are not stored;
//! - `mirror` — the replicated state as this node sees it: the persistent subscriptions of
//!   sessions held by other nodes (QoS 1/2 messages published here are stored for them),
//!   changes other nodes committed (the applied-change feed), and sessions adopted from a dead
//!   node or fenced when this node lost touch;
//! - `live` — a stored QoS 1 message that arrives both forwarded and through the log is
//!   queued once;
//! - `adoption` — stored messages routed to sessions this node is about to adopt are kept
//!   until both their commit and the session's restore happened;
//! - `wills` — the wills of connections without a stored session, shared with the peers so
//!   that the node declaring their node down publishes them;
//! - `unsettled` — local deliveries of a commit reported failed, queued if it turns out to
//!   have happened.

pub(super) mod adoption;
pub(super) mod forwarding;
mod live;
mod mirror;
pub(super) mod unsettled;
mod wills;

pub(super) use adoption::AdoptionSlot;
pub use forwarding::{CLAIM_CLOCK_TOLERANCE, Forwarder, Redirect};
pub use wills::{ENDED_WILLS_KEPT, WillsAnnouncement, WillsOutcome};

/// The cluster's part of the broker's state.
pub(super) struct ClusterState {
    /// Subscriptions of persistent sessions owned by other nodes (mirrored from the replicated
    /// log): QoS 1/2 messages published here are stored for them before the PUBACK.
    pub(super) remote: mirror::RemoteSubscriptions,
    /// This node's announced filters and the peers' (live forwarding).
    pub(super) routes: forwarding::Routes,
    /// Stored QoS 1 messages delivered live to sessions here before their commit.
    pub(super) live: live::LiveStored,
    /// Wills of sessionless connections, this node's and the peers'.
    pub(super) wills: wills::Wills,
    /// While an adoption is being prepared: the stored deliveries routed to persistent sessions
    /// not in memory here, by client id (a leaf lock, taken under the registry).
    pub(super) adopting: parking_lot::Mutex<Option<Adopting>>,
    /// Local deliveries of commits reported failed that may still have happened.
    pub(super) unsettled: std::sync::Arc<unsettled::Unsettled>,
}

/// Deliveries kept for sessions about to be adopted, by client id.
pub(super) type Adopting =
    ahash::HashMap<raftmq_codec::ByteStr, Vec<std::sync::Arc<adoption::AdoptionSlot>>>;

impl ClusterState {
    pub(super) fn new(index_shards: usize) -> Self {
        ClusterState {
            remote: mirror::RemoteSubscriptions::new(index_shards),
            routes: forwarding::Routes::new(index_shards),
            live: live::LiveStored::default(),
            wills: wills::Wills::default(),
            adopting: parking_lot::Mutex::new(None),
            unsettled: std::sync::Arc::default(),
        }
    }
}
