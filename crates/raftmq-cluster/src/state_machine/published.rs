//! De-duplication of QoS 2 messages stored across shards (`MessageStored.dedupe`).
//!
//! A QoS 2 PUBLISH whose message goes to the sessions of other shards than its publisher's is
//! recorded in the publisher's shard first (`IncomingQos2Received` with the message id), then
//! stored in the other shards. When the client resends it (its PUBREC never came), the broker
//! stores it again under the same id; each shard that has that id recorded here skips the
//! second store, so no session gets it twice. The records are dropped when the exchange
//! completes (`PublishSettled`, proposed after PUBREL) and, as a backstop for a settle that
//! was lost with its node, once they are [`HORIZON_MS`] older than the newest record applied.
//!
//! Keys in `sm_meta` (part of every snapshot, so a replica that catches up from one keeps
//! skipping): `published/{id u64 BE}` → the proposer's time in ms (u64 BE), and
//! `published_at/{ms u64 BE}{id u64 BE}` → empty, the same records in time order.

use super::*;

/// How long a record is kept without its settle: a QoS 2 PUBLISH resent later than this after
/// its first store (its client away that long with the exchange open) may be stored twice.
pub const HORIZON_MS: u64 = 24 * 60 * 60 * 1000;
/// How long a record is kept after its exchange settled: a copy of the store proposed before
/// the client's resend can still reach a shard's log after the resend's store and settle (its
/// node paused or cut off right after its gate committed, its request held up in the network).
/// The proposing node sends no part later than [`crate::durability::REST_DEADLINE`] after the
/// proposal; this covers that and the request's transit with a wide margin.
pub const SETTLED_GRACE_MS: u64 = 10 * 60 * 1000;
/// Most expired records dropped while one entry is applied (the rest go with later ones).
const PURGE_PER_ENTRY: usize = 64;

const ID_PREFIX: &[u8] = b"published/";
const AT_PREFIX: &[u8] = b"published_at/";

fn id_key(id: u64) -> Vec<u8> {
    let mut key = ID_PREFIX.to_vec();
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn at_key(at_ms: u64, id: u64) -> Vec<u8> {
    let mut key = AT_PREFIX.to_vec();
    key.extend_from_slice(&at_ms.to_be_bytes());
    key.extend_from_slice(&id.to_be_bytes());
    key
}

/// Whether message `id` was stored in this shard already (its record is still kept).
pub(super) fn seen(tx: &Tx<'_>, id: u64) -> Result<bool, StoreError> {
    Ok(tx.get(StateCf::SmMeta, &id_key(id))?.is_some())
}

/// Records that message `id` was stored here, proposed at `at_ms`, and drops records that
/// expired before it.
pub(super) fn record(tx: &mut Tx<'_>, id: u64, at_ms: u64) -> Result<(), StoreError> {
    tx.put(StateCf::SmMeta, id_key(id), at_ms.to_be_bytes().to_vec());
    tx.put(StateCf::SmMeta, at_key(at_ms, id), Vec::new());
    purge_before(tx, at_ms.saturating_sub(HORIZON_MS))
}

/// The exchange of `id` completed at `settled_ms` (the settle's proposer's clock; 0: a
/// settle of a version without it, which drops the record at once). The record is kept, and
/// re-dated so that it expires [`SETTLED_GRACE_MS`] after the settle (sooner than its
/// [`HORIZON_MS`]; left as it is if that would keep it longer).
pub(super) fn settle(tx: &mut Tx<'_>, id: u64, settled_ms: u64) -> Result<(), StoreError> {
    let key = id_key(id);
    let Some(raw) = tx.get(StateCf::SmMeta, &key)? else {
        return Ok(());
    };
    let at_ms = read_u64(&raw).ok_or_else(|| corrupt(StateCf::SmMeta, &key, "not a u64"))?;
    // Expires when the newest record is HORIZON_MS past its date.
    let dated = (settled_ms + SETTLED_GRACE_MS).saturating_sub(HORIZON_MS);
    if settled_ms != 0 && dated >= at_ms {
        return Ok(());
    }
    tx.delete(StateCf::SmMeta, at_key(at_ms, id));
    if settled_ms == 0 {
        tx.delete(StateCf::SmMeta, key);
    } else {
        tx.put(StateCf::SmMeta, key, dated.to_be_bytes().to_vec());
        tx.put(StateCf::SmMeta, at_key(dated, id), Vec::new());
    }
    Ok(())
}

/// Drops up to [`PURGE_PER_ENTRY`] records older than `before_ms`, oldest first.
fn purge_before(tx: &mut Tx<'_>, before_ms: u64) -> Result<(), StoreError> {
    if before_ms == 0 {
        return Ok(());
    }
    let mut expired = Vec::new();
    for item in tx.db.scan_prefix(StateCf::SmMeta, AT_PREFIX) {
        let (key, _) = item?;
        let Some(rest) = key.get(AT_PREFIX.len()..) else {
            continue;
        };
        let (Some(at_ms), Some(id)) = (
            rest.get(..8).and_then(read_u64),
            rest.get(8..16).and_then(read_u64),
        ) else {
            return Err(corrupt(StateCf::SmMeta, &key, "bad published_at key"));
        };
        if at_ms >= before_ms || expired.len() == PURGE_PER_ENTRY {
            break;
        }
        // Deleted by this entry already (settled, or purged by an earlier change of it).
        if tx.get(StateCf::SmMeta, &key)?.is_none() {
            continue;
        }
        expired.push((key, id));
    }
    for (key, id) in expired {
        tx.delete(StateCf::SmMeta, key);
        tx.delete(StateCf::SmMeta, id_key(id));
    }
    Ok(())
}

impl StateMachine {
    /// Whether message `id` is recorded as stored in this shard (see the module docs).
    pub fn published(&self, id: u64) -> Result<bool, StoreError> {
        Ok(self.db.get(StateCf::SmMeta, &id_key(id))?.is_some())
    }

    /// When the de-duplication record of `id` expires (wall-clock ms; it goes once a store
    /// proposed after that is applied), if there is one: [`HORIZON_MS`] after its store, or
    /// [`SETTLED_GRACE_MS`] after its settle.
    pub fn published_expiry(&self, id: u64) -> Result<Option<u64>, StoreError> {
        let key = id_key(id);
        match self.db.get(StateCf::SmMeta, &key)? {
            None => Ok(None),
            Some(raw) => read_u64(&raw)
                .map(|at_ms| Some(at_ms + HORIZON_MS))
                .ok_or_else(|| corrupt(StateCf::SmMeta, &key, "not a u64")),
        }
    }

    /// The message id and shards recorded with the incoming QoS 2 packet id `packet_id` of
    /// session `client_id` (`None`: not received, or stored atomically with the record).
    pub fn qos2_intent(
        &self,
        client_id: &str,
        packet_id: u16,
    ) -> Result<Option<state::Qos2Intent>, StoreError> {
        let key = qos2_key(client_id, u32::from(packet_id));
        match self.db.get(StateCf::SessionMessages, &key)? {
            None => Ok(None),
            Some(raw) => decode_intent(&key, &raw),
        }
    }
}

/// The intent stored as the value of an incoming QoS 2 key (empty: none).
pub(super) fn decode_intent(
    key: &[u8],
    raw: &[u8],
) -> Result<Option<state::Qos2Intent>, StoreError> {
    if raw.is_empty() {
        return Ok(None);
    }
    let intent: state::Qos2Intent = decode_value(StateCf::SessionMessages, key, raw)?;
    Ok((intent.message_id != 0).then_some(intent))
}
