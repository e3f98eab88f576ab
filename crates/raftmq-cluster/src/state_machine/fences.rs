//! Fenced proposals (`Batch.fences`): what decides whether a fenced range of a batch takes
//! effect, and the notes that tell the proposing node which of its fences did not hold.
//!
//! A connection's changes to its session (subscriptions, packet ids of deliveries, incoming
//! QoS 2 records, its detach) are proposed under the claim that attached it: `(origin node,
//! epoch)`, recorded in the session's record by its `SessionOpened`. When the range is applied
//! the record must still carry that claim; otherwise another connection has claimed the session
//! since, and the range is skipped as a whole. Because the check runs in log order on every
//! node, the claim of a reconnecting client is a barrier: a copy of an old proposal that
//! commits before it is in the state the new connection loads, a copy that commits after it
//! has no effect. This is what keeps a proposal whose commit outcome its proposer never learned
//! (a timeout, a forward whose reply was lost) from applying a second time after the client has
//! resent the same thing through another connection.

use super::*;
use std::collections::VecDeque;

/// Batches of the owning node whose fences were checked, kept until its batcher reads them.
const NOTES_CAPACITY: usize = 4096;

/// The outcome of the fences of this node's own batches, by log index: shared by the state
/// machine that applies them and the node's batcher, which completes each fenced proposal
/// according to its fence (see `RaftDurability`).
#[derive(Clone, Debug, Default)]
pub struct FenceNotes(Arc<FenceNotesInner>);

#[derive(Debug, Default)]
struct FenceNotesInner {
    /// The node whose batches are noted (0: none yet).
    owner: AtomicU64,
    /// (log index, ordinals of the fences that did not hold), oldest first.
    notes: Mutex<VecDeque<(u64, Vec<u32>)>>,
}

impl FenceNotes {
    /// Notes the fences of batches proposed by `node` from now on.
    pub fn set_owner(&self, node: u64) {
        self.0.owner.store(node, Ordering::Relaxed);
    }

    /// Which fences of the batch applied at `index` did not hold (ordinals in `Batch.fences`);
    /// `None` when this node did not apply that batch itself (it installed a snapshot over it)
    /// or the note is gone.
    pub fn take(&self, index: u64) -> Option<Vec<u32>> {
        let mut notes = lock(&self.0.notes);
        let at = notes.iter().position(|(i, _)| *i == index)?;
        notes.remove(at).map(|(_, failed)| failed)
    }

    pub(super) fn record(&self, origin: u64, index: u64, failed: Vec<u32>) {
        if origin == 0 || origin != self.0.owner.load(Ordering::Relaxed) {
            return;
        }
        let mut notes = lock(&self.0.notes);
        if notes.len() == NOTES_CAPACITY {
            notes.pop_front();
        }
        notes.push_back((index, failed));
    }
}

impl StateMachine {
    /// The log index of the last `NodeDown` applied that declared `node` down (0: never).
    pub fn declared_down_at(&self, node: u64) -> Result<u64, StoreError> {
        self.meta_u64(&declared_key(node))
    }

    /// The client ids of `node`'s sessionless wills that the last declaration of it down
    /// listed (published by the declaring node; see `NodeDown.wills`); `None` if it listed
    /// none (an older version's, or no declaration).
    pub fn declared_wills(&self, node: u64) -> Result<Option<Vec<String>>, StoreError> {
        let key = declared_wills_key(node);
        match self.db.get(StateCf::SmMeta, &key)? {
            None => Ok(None),
            Some(raw) => state::DeclaredWills::decode(raw.as_slice())
                .map(|d| d.listed.then_some(d.client_ids))
                .map_err(|_| corrupt(StateCf::SmMeta, &key, "not a DeclaredWills")),
        }
    }

    /// The log index of the last batch `node` proposed (0: none applied here).
    pub fn last_proposed_by(&self, node: u64) -> Result<u64, StoreError> {
        self.meta_u64(&origin_key(node))
    }

    fn meta_u64(&self, key: &[u8]) -> Result<u64, StoreError> {
        meta_u64(self.db.get(StateCf::SmMeta, key)?, key)
    }
}

/// Key in `sm_meta`: `origin/{node id u64}` → the log index of the last batch that node
/// proposed (what voids a declaration made before it: see `NodeDown.seen`).
pub(super) fn origin_key(node: u64) -> Vec<u8> {
    let mut key = b"origin/".to_vec();
    key.extend_from_slice(&node.to_be_bytes());
    key
}

/// Records in `sm_meta` what an applied batch says about its nodes: the last batch of its
/// proposer, and the declarations it made (durable, and in snapshots: a node that catches up
/// from a snapshot still learns that it was declared down).
pub(super) fn record_meta(tx: &mut Tx<'_>, outcome: &BatchOutcome, index: u64) {
    if outcome.origin != 0 {
        tx.put(
            StateCf::SmMeta,
            origin_key(outcome.origin),
            index.to_be_bytes().to_vec(),
        );
    }
    for (node, wills) in &outcome.declared {
        tx.put(
            StateCf::SmMeta,
            declared_key(*node),
            index.to_be_bytes().to_vec(),
        );
        let list = state::DeclaredWills {
            client_ids: wills.clone().unwrap_or_default(),
            listed: wills.is_some(),
        };
        tx.put(
            StateCf::SmMeta,
            declared_wills_key(*node),
            list.encode_to_vec(),
        );
    }
}

/// A `u64` value read from `sm_meta` (through the database or an entry's overlay): 0 when absent.
fn meta_u64(raw: Option<Vec<u8>>, key: &[u8]) -> Result<u64, StoreError> {
    raw.map_or(Ok(0), |raw| {
        read_u64(&raw).ok_or_else(|| corrupt(StateCf::SmMeta, key, "not a u64"))
    })
}

/// Key in `sm_meta`: `declared/{node id u64}` → the log index of the last `NodeDown` applied
/// that declared that node down.
pub(super) fn declared_key(node: u64) -> Vec<u8> {
    let mut key = b"declared/".to_vec();
    key.extend_from_slice(&node.to_be_bytes());
    key
}

/// Key in `sm_meta`: `declared_wills/{node id u64}` → [`state::DeclaredWills`] of the last
/// `NodeDown` applied that declared that node down.
pub(super) fn declared_wills_key(node: u64) -> Vec<u8> {
    let mut key = b"declared_wills/".to_vec();
    key.extend_from_slice(&node.to_be_bytes());
    key
}

/// Whether `fence` holds for a batch proposed by node `origin`, against the session record as
/// the batch's earlier changes left it.
pub(super) fn fence_holds(
    tx: &Tx<'_>,
    fence: &state::Fence,
    origin: u64,
) -> Result<bool, StoreError> {
    let Some(record) = get_session(tx, &fence.client_id)? else {
        return Ok(false);
    };
    Ok(if fence.offline {
        // A record of unknown owner (node 0: written before owners were recorded) is restored,
        // and timed, by every node that reads it; a claim since has set its owner.
        (record.node_id == origin || record.node_id == 0)
            && (!record.online || record.epoch == fence.epoch)
    } else {
        record.node_id == origin && record.epoch == fence.epoch
    })
}

/// What applying one batch gave: the changes that took effect (for the feed, when kept) and,
/// if the batch had fences, the ordinals of those that did not hold.
#[derive(Debug, Default)]
pub(super) struct BatchOutcome {
    /// The proposing node (0: unknown, or the batch was skipped).
    pub origin: u64,
    pub feed: Option<state::Batch>,
    pub fences: Option<(u64, Vec<u32>)>,
    /// Nodes a `NodeDown` of the batch declared down, with the wills it listed.
    pub declared: Vec<(u64, Option<Vec<String>>)>,
}

/// Applies the changes of `batch` in order, skipping every fenced range whose fence does not
/// hold when its first change is reached.
pub(super) fn apply_changes(
    tx: &mut Tx<'_>,
    mut batch: state::Batch,
    keep: bool,
) -> Result<BatchOutcome, StoreError> {
    let origin = batch.origin_node;
    let fences = std::mem::take(&mut batch.fences);
    let changes = std::mem::take(&mut batch.changes);
    let mut kept = Vec::with_capacity(if keep { changes.len() } else { 0 });
    let mut failed = Vec::new();
    let mut pending = fences.iter().zip(0u32..).peekable();
    let mut skip_until = 0usize;
    let mut declared = Vec::new();
    for (i, change) in changes.into_iter().enumerate() {
        while let Some((fence, ordinal)) = pending.next_if(|(f, _)| f.first as usize <= i) {
            if !fence_holds(tx, fence, origin)? {
                tracing::info!(
                    client_id = fence.client_id,
                    epoch = fence.epoch,
                    origin,
                    "skipping changes made for a session claimed since by another connection"
                );
                failed.push(ordinal);
                skip_until = skip_until.max(fence.first as usize + fence.count as usize);
            }
        }
        if i < skip_until {
            continue;
        }
        let Some(change) = change.change else {
            continue;
        };
        // A QoS 2 message stored again (its publisher resent it) is skipped where it was
        // stored already (see `published`).
        if let ProtoChange::MessageStored(stored) = &change
            && stored.dedupe
        {
            if published::seen(tx, stored.id)? {
                tracing::debug!(
                    diag = "skip",
                    id = stored.id,
                    shard = tx.db.shard(),
                    "a message stored here already: skipped"
                );
                continue;
            }
            published::record(tx, stored.id, stored.at_ms)?;
        }
        if let ProtoChange::NodeDown(down) = &change {
            let key = origin_key(down.node);
            let back = meta_u64(tx.get(StateCf::SmMeta, &key)?, &key)?;
            if down.seen != 0 && back > down.seen {
                tracing::info!(
                    node = down.node,
                    seen = down.seen,
                    back,
                    "a declaration of a node that proposed since: void"
                );
                continue;
            }
            declared.push((down.node, down.lists_wills.then(|| down.wills.clone())));
        }
        if keep {
            apply_change(tx, change.clone(), origin)?;
            kept.push(state::Change {
                change: Some(change),
            });
        } else {
            apply_change(tx, change, origin)?;
        }
    }
    Ok(BatchOutcome {
        origin,
        feed: keep.then(|| state::Batch {
            changes: kept,
            ..batch
        }),
        fences: (!fences.is_empty()).then_some((origin, failed)),
        declared,
    })
}
