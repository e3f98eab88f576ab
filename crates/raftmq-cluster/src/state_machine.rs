//! The replicated state machine: applies `raftmq.state.v1` batches (the payload of normal Raft
//! log entries) to the store's state column families, and reads the state back as the core's
//! [`Recovered`].
//!
//! # Semantics
//!
//! [`StateMachine::apply`](RaftStateMachine::apply) has exactly the semantics of the core's
//! reference model, [`raftmq_core::durability::StateImage::apply`], applied change by change in
//! log order; [`StateMachine::recovered`] returns what `StateImage::recovered` would. In short:
//! a clean-start `SessionOpened` ends the old session first; every change that names a session
//! is a no-op when the session does not exist; `MessageStored` stores the message once, with a
//! reference per delivery to an existing session (nothing when there is none); `MessageSent`,
//! `MessageReleased` and `MessageAcked` act on the session's first (oldest) delivery of that
//! message; an ack removes it and drops a reference, deleting the message at zero;
//! `SessionEnded` drops the references of all the session's deliveries. Like the model,
//! storing an id that is still stored replaces the message and its count (ids are never
//! reused while stored, so this only shows in randomized tests).
//!
//! A client id containing U+0000 (which MQTT forbids, and the codec rejects) would make the key
//! layout ambiguous: a `SessionOpened` for one is skipped, so such a session never exists and
//! every other change naming it is a no-op.
//!
//! # Determinism and atomicity
//!
//! `apply` reads no clock, uses no randomness and does no I/O besides the [`StateDb`]: times are
//! stored as the proposer's wall-clock milliseconds, the delivery order comes from a counter in
//! `sm_meta`. Each log entry is one [`StateBatch`] holding its effects *and* the new
//! `last_applied` (and, for a membership entry, `last_membership`), so a crash never leaves an
//! entry half applied and the state always matches `last_applied`. Reads during an entry see
//! the entry's own earlier writes (an overlay over the database).
//!
//! A normal entry whose batch cannot be decoded, belongs to another shard, or holds a change
//! this version cannot convert (e.g. a change kind added by a later version: prost decodes an
//! unknown `oneof` member as an empty `change`) is **skipped as a whole** — logged with
//! `tracing::error!` — and still advances `last_applied`. Refusing it would stop the state
//! machine for good on every node of this version (openraft treats an apply error as fatal),
//! and the outcome is deterministic: every node of the same version skips the same entries. The
//! whole batch is skipped rather than its unreadable changes alone because a batch is the unit
//! of atomicity the proposer asked for.
//!
//! **Fenced ranges** (`Batch.fences`, the one departure from the reference model): see
//! `fences.rs`.
//!
//! # Key layout
//!
//! Integers are big-endian (bytewise order = numeric order); `\0` separates a client id from
//! what follows (client ids never contain NUL, see above).
//!
//! | column family | key | value |
//! |---|---|---|
//! | `sessions` | `{client_id}` | `SessionRecord` |
//! | `subscriptions` | `{client_id}\0{filter}` | `SubEntry` |
//! | `messages` | `{message id u64}` | `StoredMessageRecord` (message + reference count) |
//! | `session_messages` | `{client_id}\0d{delivery seq u64}` | `DeliveryRecord` (with `message_id`) |
//! | `session_messages` | `{client_id}\0i{message id u64}{delivery seq u64}` | empty: index (client, message) → deliveries |
//! | `session_messages` | `{client_id}\0q{packet id u16}` | empty: incoming QoS 2 awaiting PUBREL |
//! | `retained` | `{topic}` | `Message` |
//! | `sm_meta` | `last_applied` | postcard of `Option<LogId>` |
//! | `sm_meta` | `last_membership` | postcard of `StoredMembership` |
//! | `sm_meta` | `next_seq` | `u64`: the next delivery sequence number |
//! | `sm_meta` | `declared/{node id u64}` | `u64`: log index of the last `NodeDown` naming it |
//! | `sm_meta` | `declared_wills/{node id u64}` | `DeclaredWills`: the wills that `NodeDown` listed |
//! | `sm_meta` | `origin/{node id u64}` | `u64`: log index of the last batch it proposed |
//!
//! Values are `raftmq.state.v1` protobuf messages. The delivery sequence number is one counter
//! for the whole state machine, so a session's deliveries scan in the order they were stored.
//! The index keys make acknowledging a message O(log n) whatever the length of the session's
//! queue (an offline persistent session can accumulate many): the first key under
//! `{client_id}\0i{id}` is the oldest delivery of that message to that session. Everything a
//! session owns in `subscriptions` and `session_messages` is under `{client_id}\0`, so ending a
//! session is two prefix deletes (plus one reference drop per delivery).
//!
//! # Snapshots
//!
//! A snapshot is the [`StateDb`] snapshot stream (see `raftmq-store`) of one consistent RocksDB
//! snapshot, labelled with the `last_applied` and `last_membership` read from that same
//! snapshot and an id `{term}-{index}-{n}` (`n` counts the snapshots this process built).
//! Building it does not stop `apply`. Installing one replaces the whole state atomically (its
//! `sm_meta` included) and then records the snapshot's meta as `last_applied` /
//! `last_membership`.
//!
//! The current snapshot (the last one built or installed) is kept **in memory only**, not in
//! `sm_meta` (it would be exported into every later snapshot) nor in a file: after a restart
//! [`get_current_snapshot`](RaftStateMachine::get_current_snapshot) returns `None` until the
//! next one is built, and openraft itself rebuilds one at start-up when the log has been purged
//! (`StorageHelper::get_initial_state`), which is the only case where a follower could need it.
//! The stream is held as one `Vec<u8>` (the snapshot data type is `Cursor<Vec<u8>>`): memory of
//! the order of the state's size.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use openraft::storage::RaftStateMachine;
use openraft::{
    EntryPayload, ErrorSubject, ErrorVerb, OptionalSend, RaftSnapshotBuilder, StorageIOError,
};
use prost::Message as _;
use raftmq_core::durability::{MessageId, Recovered, SessionImage, StoredDelivery};
use raftmq_core::message::Message;
use raftmq_proto::state;
use raftmq_proto::state::change::Change as ProtoChange;
use raftmq_store::{StateBatch, StateCf, StateDb, StateSnapshot, StoreError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::convert::{
    self, ConvertError, WallClock, decode_batch, validate_change, validate_fences,
};

mod fences;
pub mod published;
use crate::types::{
    Entry, LogId, Response, Snapshot, SnapshotMeta, StorageError, StoredMembership, TypeConfig,
};
use fences::BatchOutcome;
pub use fences::FenceNotes;

/// Key in `sm_meta`: the last applied log id.
pub const META_LAST_APPLIED: &[u8] = b"last_applied";
/// Key in `sm_meta`: the last applied membership.
pub const META_LAST_MEMBERSHIP: &[u8] = b"last_membership";
/// Key in `sm_meta`: the next delivery sequence number.
pub const META_NEXT_SEQ: &[u8] = b"next_seq";

const TAG_DELIVERY: u8 = b'd';
const TAG_INDEX: u8 = b'i';
const TAG_QOS2: u8 = b'q';

/// A snapshot built or installed, kept as the current one.
#[derive(Clone, Debug)]
struct CurrentSnapshot {
    meta: SnapshotMeta,
    data: Vec<u8>,
}

/// The Raft state machine of a raftmq group, on the store's [`StateDb`].
///
/// Clones share the database and the current snapshot. Only one of them (the one given to
/// openraft) may apply entries or install snapshots; the others may read
/// ([`StateMachine::recovered`], [`StateMachine::max_message_id`], ...).
#[derive(Clone, Debug)]
pub struct StateMachine {
    db: StateDb,
    current: Arc<Mutex<Option<CurrentSnapshot>>>,
    snapshot_seq: Arc<AtomicU64>,
    feed: Feed,
    fence_notes: FenceNotes,
}

/// What the state machine tells its observer after applying.
#[derive(Clone, Debug)]
pub enum Applied {
    /// A normal entry's batch was applied (in log order) at log index `index` of `shard`.
    Batch {
        shard: u32,
        index: u64,
        batch: state::Batch,
    },
    /// A normal entry with no change that took effect was applied at log index `index` of
    /// `shard`.
    Progress { shard: u32, index: u64 },
    /// A snapshot replaced the whole state of `shard`.
    SnapshotInstalled { shard: u32 },
}

/// A stored message of one of this node's own batches: its id, the sessions it was stored
/// for, and the log index (of this shard) of the batch.
pub type StoredFor = (
    raftmq_core::durability::MessageId,
    Vec<raftmq_codec::ByteStr>,
    u64,
);

/// Called, during the apply, with the messages a batch of this node's own stored.
type OwnStored = Arc<dyn Fn(Vec<StoredFor>) + Send + Sync>;

/// Where applied changes go, once someone listens (see [`StateMachine::feed`]). Shared by
/// clones, so the instance openraft drives and the node's handle see the same observer.
#[derive(Clone, Default)]
pub struct Feed {
    tx: Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Applied>>>,
    /// This node's id and what to call with the messages its own batches stored.
    own: Arc<std::sync::OnceLock<(u64, OwnStored)>>,
}

impl std::fmt::Debug for Feed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Feed")
            .field("active", &self.is_active())
            .finish_non_exhaustive()
    }
}

impl Feed {
    /// Starts listening. Only the first call gets a receiver; later calls get `None`.
    pub fn subscribe(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Applied>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        self.tx.set(tx).ok().map(|()| rx)
    }

    /// Calls `f` with the messages each batch of node `me` stored (id, and the sessions it
    /// was stored for in this shard), while that batch is applied, before the applied index
    /// moves past it (so before any later commit of this node completes): what depends on
    /// this node's own batches in log order does not go through the asynchronous feed. Only
    /// the first call counts.
    pub fn on_own_stored(&self, me: u64, f: impl Fn(Vec<StoredFor>) + Send + Sync + 'static) {
        let _ = self.own.set((me, Arc::new(f)));
    }

    fn own_stored(&self, batch: &state::Batch, index: u64) {
        let Some((me, f)) = self.own.get() else {
            return;
        };
        if batch.origin_node != *me {
            return;
        }
        let ids: Vec<_> = batch
            .changes
            .iter()
            .filter_map(|c| match &c.change {
                Some(ProtoChange::MessageStored(m)) => Some((
                    raftmq_core::durability::MessageId(m.id),
                    m.targets
                        .iter()
                        .map(|t| raftmq_codec::ByteStr::from(t.client_id.as_str()))
                        .collect(),
                    index,
                )),
                _ => None,
            })
            .collect();
        if !ids.is_empty() {
            f(ids);
        }
    }

    fn send(&self, applied: Applied) {
        if let Some(tx) = self.tx.get() {
            // A closed receiver (node shutting down) has nothing left to learn.
            let _ = tx.send(applied);
        }
    }

    fn is_active(&self) -> bool {
        self.tx.get().is_some()
    }
}

impl StateMachine {
    /// The state machine persisted in `db` (empty for a new store).
    pub fn new(db: StateDb) -> StateMachine {
        StateMachine::with_feed(db, Feed::default())
    }

    /// [`StateMachine::new`] reporting to `feed`, which the groups of a node share: one
    /// listener learns what every shard applied.
    pub fn with_feed(db: StateDb, feed: Feed) -> StateMachine {
        StateMachine {
            db,
            current: Arc::default(),
            snapshot_seq: Arc::default(),
            feed,
            fence_notes: FenceNotes::default(),
        }
    }

    /// The shard this state machine applies.
    pub fn shard(&self) -> u32 {
        self.db.shard()
    }

    /// Which fences of this node's own batches did not hold (shared by clones).
    pub fn fence_notes(&self) -> &FenceNotes {
        &self.fence_notes
    }

    /// The applied-change feed of this state machine (and its clones).
    pub fn feed(&self) -> &Feed {
        &self.feed
    }

    /// [`StateMachine::new`], after checking that the state machine metadata is readable (a
    /// store written by an incompatible version fails here rather than in Raft).
    pub fn open(db: StateDb) -> Result<StateMachine, StoreError> {
        StateMachine::open_with_feed(db, Feed::default())
    }

    /// [`StateMachine::open`] reporting to `feed` (see [`StateMachine::with_feed`]).
    pub fn open_with_feed(db: StateDb, feed: Feed) -> Result<StateMachine, StoreError> {
        let sm = StateMachine::with_feed(db, feed);
        sm.applied()?;
        Ok(sm)
    }

    /// The database it lives in.
    pub fn db(&self) -> &StateDb {
        &self.db
    }

    /// The last applied log id and membership.
    pub fn applied(&self) -> Result<(Option<LogId>, StoredMembership), StoreError> {
        read_applied(|key| self.db.get(StateCf::SmMeta, key))
    }

    /// Applies one log entry: its effects and the new `last_applied` in one atomic write.
    pub fn apply_entry(&self, entry: &Entry) -> Result<Response, StoreError> {
        let mut tx = Tx::new(&self.db);
        let mut outcome = BatchOutcome::default();
        match &entry.payload {
            EntryPayload::Blank => {}
            EntryPayload::Normal(request) => {
                outcome = apply_batch(
                    &mut tx,
                    &request.batch,
                    &entry.log_id,
                    self.feed.is_active(),
                )?;
            }
            EntryPayload::Membership(membership) => {
                let stored = StoredMembership::new(Some(entry.log_id), membership.clone());
                tx.put(
                    StateCf::SmMeta,
                    META_LAST_MEMBERSHIP.to_vec(),
                    encode_meta("last membership", &stored)?,
                );
            }
        }
        fences::record_meta(&mut tx, &outcome, entry.log_id.index);
        tx.put(
            StateCf::SmMeta,
            META_LAST_APPLIED.to_vec(),
            encode_meta("last applied log id", &Some(entry.log_id))?,
        );
        self.db.write(tx.into_batch())?;
        if let Some((origin, failed)) = outcome.fences {
            self.fence_notes.record(origin, entry.log_id.index, failed);
        }
        if let Some(batch) = &outcome.feed {
            self.feed.own_stored(batch, entry.log_id.index);
        }
        let shard = self.db.shard();
        match outcome.feed {
            Some(batch) if !batch.changes.is_empty() => self.feed.send(Applied::Batch {
                shard,
                index: entry.log_id.index,
                batch,
            }),
            // Nothing to mirror, but how far the log is mirrored moves on.
            Some(_) => self.feed.send(Applied::Progress {
                shard,
                index: entry.log_id.index,
            }),
            None => {}
        }
        Ok(Response)
    }

    /// A reader of the same state whose injected read faults are its own (see
    /// [`raftmq_store::StateDb::with_own_faults`]).
    pub fn with_own_faults(&self) -> StateMachine {
        StateMachine {
            db: self.db.with_own_faults(),
            ..self.clone()
        }
    }

    /// Makes this reader's reads fail while `on` (tests of the paths that must fail closed).
    pub fn inject_read_faults(&self, on: bool) {
        self.db.inject_read_faults(on);
    }

    /// The stored state of the persistent session `client_id`, if there is one, with the log
    /// index it reflects and the number of claims (`SessionOpened`) applied to it (1: created
    /// by the last one).
    pub fn session_image(
        &self,
        client_id: &str,
        clock: &WallClock,
    ) -> Result<Option<(SessionImage, u64, u64)>, StoreError> {
        if client_id.contains('\0') {
            return Ok(None);
        }
        let snap = self.db.snapshot();
        let Some(value) = snap.get(StateCf::Sessions, client_id.as_bytes())? else {
            return Ok(None);
        };
        let record: state::SessionRecord =
            decode_value(StateCf::Sessions, client_id.as_bytes(), &value)?;
        let (applied, _) = read_applied(|key| snap.get(StateCf::SmMeta, key))?;
        let mut messages = HashMap::new();
        let claims = record.claims;
        let image = recover_session(&snap, clock, &mut messages, client_id.to_owned(), record)?;
        Ok(Some((image, applied.map_or(0, |l| l.index), claims)))
    }

    /// The node that last claimed each persistent session (`SessionOpened`; 0 when unknown,
    /// e.g. written by a version that did not record it).
    pub fn session_owners(&self) -> Result<HashMap<String, u64>, StoreError> {
        let snap = self.db.snapshot();
        let mut owners = HashMap::new();
        for item in snap.scan_prefix(StateCf::Sessions, b"") {
            let (key, value) = item?;
            let record: state::SessionRecord = decode_value(StateCf::Sessions, &key, &value)?;
            let client_id = String::from_utf8(key)
                .map_err(|e| corrupt(StateCf::Sessions, e.as_bytes(), "client id not UTF-8"))?;
            owners.insert(client_id, record.node_id);
        }
        Ok(owners)
    }

    /// The whole durable state, as the broker rebuilds itself from it (read from one consistent
    /// snapshot of the database). Times are converted with `clock`.
    pub fn recovered(&self, clock: &WallClock) -> Result<Recovered, StoreError> {
        let snap = self.db.snapshot();
        let mut messages: HashMap<u64, Option<Arc<Message>>> = HashMap::new();
        let mut sessions = Vec::new();
        for item in snap.scan_prefix(StateCf::Sessions, b"") {
            let (key, value) = item?;
            let client_id = String::from_utf8(key)
                .map_err(|e| corrupt(StateCf::Sessions, e.as_bytes(), "client id not UTF-8"))?;
            let record: state::SessionRecord =
                decode_value(StateCf::Sessions, client_id.as_bytes(), &value)?;
            sessions.push(recover_session(
                &snap,
                clock,
                &mut messages,
                client_id,
                record,
            )?);
        }
        let mut retained = Vec::new();
        for item in snap.scan_prefix(StateCf::Retained, b"") {
            let (key, value) = item?;
            let message: state::Message = decode_value(StateCf::Retained, &key, &value)?;
            let message = convert::message_from_proto(message, clock)
                .map_err(|e| corrupt(StateCf::Retained, &key, e))?;
            retained.push(Arc::new(message));
        }
        Ok(Recovered {
            sessions,
            retained,
            remote_subscriptions: Vec::new(),
        })
    }

    /// The highest id of a message currently stored (referenced by at least one session).
    /// Messages already deleted (acknowledged by every session) do not count.
    pub fn max_message_id(&self) -> Result<Option<u64>, StoreError> {
        self.db
            .last_with_prefix(StateCf::Messages, b"")?
            .map(|(key, _)| {
                read_u64(&key).ok_or_else(|| corrupt(StateCf::Messages, &key, "not a message id"))
            })
            .transpose()
    }

    /// Builds a snapshot of the current state (see the module docs) and makes it the current
    /// one. Blocking: reads the whole state.
    pub fn build_snapshot_blocking(&self) -> Result<Snapshot, StoreError> {
        let n = self.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let current = build_snapshot(&self.db, n)?;
        *lock(&self.current) = Some(current.clone());
        Ok(Snapshot {
            meta: current.meta,
            snapshot: Box::new(Cursor::new(current.data)),
        })
    }

    /// Replaces the whole state with the snapshot `data` described by `meta` and makes it the
    /// current snapshot. Blocking.
    pub fn install_snapshot_blocking(
        &self,
        meta: &SnapshotMeta,
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        self.db.import_snapshot(data.as_slice())?;
        let mut batch = StateBatch::new();
        batch.put(
            StateCf::SmMeta,
            META_LAST_APPLIED,
            encode_meta("last applied log id", &meta.last_log_id)?,
        );
        batch.put(
            StateCf::SmMeta,
            META_LAST_MEMBERSHIP,
            encode_meta("last membership", &meta.last_membership)?,
        );
        self.db.write_sync(batch)?;
        *lock(&self.current) = Some(CurrentSnapshot {
            meta: meta.clone(),
            data,
        });
        Ok(())
    }

    /// The current snapshot (the last built or installed by this process), if any.
    pub fn current_snapshot(&self) -> Option<Snapshot> {
        lock(&self.current).clone().map(|current| Snapshot {
            meta: current.meta,
            snapshot: Box::new(Cursor::new(current.data)),
        })
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The guarded value is replaced whole, never left half-updated: a poisoned lock is usable.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// openraft
// ---------------------------------------------------------------------------------------------

fn sm_error(verb: ErrorVerb) -> impl FnOnce(StoreError) -> StorageError {
    move |e| e.into_storage_error(ErrorSubject::StateMachine, verb)
}

fn join_error(e: tokio::task::JoinError) -> StorageError {
    StorageIOError::read_snapshot(None, &e).into()
}

/// Time to apply one run of committed entries handed over by openraft (histogram).
pub const APPLY_SECONDS: &str = "raftmq_raft_apply_seconds";
/// Log entries applied to the state machine.
pub const APPLIED_ENTRIES_TOTAL: &str = "raftmq_raft_applied_entries_total";
/// Time to build (`op="build"`) or install (`op="install"`) a snapshot (histogram).
pub const SNAPSHOT_SECONDS: &str = "raftmq_raft_snapshot_seconds";
/// Snapshots built or installed, by `op`.
pub const SNAPSHOTS_TOTAL: &str = "raftmq_raft_snapshots_total";

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        self.applied().map_err(sm_error(ErrorVerb::Read))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Timing is observed for the metric only; it never reaches the applied state.
        let started = std::time::Instant::now();
        let mut replies = Vec::new();
        for entry in entries {
            let reply = self.apply_entry(&entry).map_err(|e| {
                e.into_storage_error(ErrorSubject::Apply(entry.log_id), ErrorVerb::Write)
            })?;
            replies.push(reply);
        }
        metrics::histogram!(APPLY_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::counter!(APPLIED_ENTRIES_TOTAL).increment(replies.len() as u64);
        Ok(replies)
    }

    async fn get_snapshot_builder(&mut self) -> SnapshotBuilder {
        SnapshotBuilder { sm: self.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let sm = self.clone();
        let meta = meta.clone();
        let data = snapshot.into_inner();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || sm.install_snapshot_blocking(&meta, data))
            .await
            .map_err(join_error)?
            .map_err(StoreError::write_snapshot)?;
        self.feed.send(Applied::SnapshotInstalled {
            shard: self.db.shard(),
        });
        metrics::histogram!(SNAPSHOT_SECONDS, "op" => "install")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(SNAPSHOTS_TOTAL, "op" => "install").increment(1);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot>, StorageError> {
        Ok(self.current_snapshot())
    }
}

/// Builds snapshots of a [`StateMachine`] (on the blocking thread pool: exporting reads the
/// whole state).
#[derive(Debug)]
pub struct SnapshotBuilder {
    sm: StateMachine,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot, StorageError> {
        let sm = self.sm.clone();
        let started = std::time::Instant::now();
        let snapshot = tokio::task::spawn_blocking(move || sm.build_snapshot_blocking())
            .await
            .map_err(join_error)?
            .map_err(StoreError::read_snapshot)?;
        metrics::histogram!(SNAPSHOT_SECONDS, "op" => "build")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!(SNAPSHOTS_TOTAL, "op" => "build").increment(1);
        Ok(snapshot)
    }
}

fn build_snapshot(db: &StateDb, n: u64) -> Result<CurrentSnapshot, StoreError> {
    let snap = db.snapshot();
    // The labels come from the same consistent snapshot as the data.
    let (last_log_id, last_membership) = read_applied(|key| snap.get(StateCf::SmMeta, key))?;
    let mut data = Vec::new();
    snap.export(&mut data)?;
    let snapshot_id = match &last_log_id {
        Some(id) => format!("{}-{}-{n}", id.leader_id.term, id.index),
        None => format!("0-0-{n}"),
    };
    Ok(CurrentSnapshot {
        meta: SnapshotMeta {
            last_log_id,
            last_membership,
            snapshot_id,
        },
        data,
    })
}

fn read_applied(
    get: impl Fn(&[u8]) -> Result<Option<Vec<u8>>, StoreError>,
) -> Result<(Option<LogId>, StoredMembership), StoreError> {
    let applied = match get(META_LAST_APPLIED)? {
        Some(raw) => decode_meta::<Option<LogId>>("last applied log id", &raw)?,
        None => None,
    };
    let membership = match get(META_LAST_MEMBERSHIP)? {
        Some(raw) => decode_meta::<StoredMembership>("last membership", &raw)?,
        None => StoredMembership::default(),
    };
    Ok((applied, membership))
}

fn encode_meta<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_stdvec(value).map_err(|source| StoreError::Encode { what, source })
}

fn decode_meta<T: DeserializeOwned>(what: &'static str, raw: &[u8]) -> Result<T, StoreError> {
    postcard::from_bytes(raw).map_err(|source| StoreError::Decode { what, source })
}

// ---------------------------------------------------------------------------------------------
// Apply
// ---------------------------------------------------------------------------------------------

/// Applies the batch of a normal entry to `tx`, or skips it (see the module docs).
/// Returns the batch when it was applied (not skipped) and `keep` asks for it.
fn apply_batch(
    tx: &mut Tx<'_>,
    bytes: &[u8],
    log_id: &LogId,
    keep: bool,
) -> Result<BatchOutcome, StoreError> {
    let batch = match decode_batch(bytes) {
        Ok(batch) => batch,
        Err(error) => {
            tracing::error!(%log_id, %error, "skipping a log entry whose batch cannot be decoded");
            return Ok(BatchOutcome::default());
        }
    };
    // Each group's state machine applies the batches of its own shard (its store handle's).
    if batch.shard_id != u64::from(tx.db.shard()) {
        tracing::error!(%log_id, shard_id = batch.shard_id, "skipping a batch of another shard");
        return Ok(BatchOutcome::default());
    }
    if let Err(error) = batch
        .changes
        .iter()
        .try_for_each(validate_change)
        .and_then(|()| validate_fences(&batch))
    {
        tracing::error!(%log_id, %error, "skipping a batch with a change this version cannot read");
        return Ok(BatchOutcome::default());
    }
    fences::apply_changes(tx, batch, keep)
}

/// Applies one validated change: [`raftmq_core::durability::StateImage::apply`] on the store.
/// `origin` is the node that proposed the batch (the adopting node of a `NodeDown`).
fn apply_change(tx: &mut Tx<'_>, change: ProtoChange, origin: u64) -> Result<(), StoreError> {
    if let Some(client_id) = client_of(&change)
        && client_id.contains('\0')
    {
        tracing::warn!(client_id, "ignoring a change naming a client id with NUL");
        return Ok(());
    }
    match change {
        ProtoChange::SessionOpened(c) => {
            if c.clean_start {
                end_session(tx, &c.client_id)?;
            }
            let mut record = get_session(tx, &c.client_id)?.unwrap_or_default();
            record.expiry_secs = c.expiry_secs;
            record.will = c.will;
            record.epoch = c.epoch;
            record.node_id = c.node_id;
            record.online = true;
            record.detached_at_ms = None;
            record.claims = record.claims.saturating_add(1);
            put_session(tx, &c.client_id, &record);
        }
        ProtoChange::SessionDetached(c) => {
            if let Some(mut record) = get_session(tx, &c.client_id)? {
                record.expiry_secs = c.expiry_secs;
                if c.how != state::DetachHow::Abnormal as i32 {
                    record.will = None;
                }
                record.online = false;
                record.detached_at_ms = (c.at_ms != 0).then_some(c.at_ms);
                put_session(tx, &c.client_id, &record);
            }
        }
        ProtoChange::SessionEnded(c) => end_session(tx, &c.client_id)?,
        ProtoChange::WillPublished(c) => {
            if let Some(mut record) = get_session(tx, &c.client_id)? {
                record.will = None;
                put_session(tx, &c.client_id, &record);
            }
        }
        ProtoChange::Subscribed(c) => {
            if session_exists(tx, &c.client_id)? {
                let entry = c.entry.unwrap_or_default();
                tx.put(
                    StateCf::Subscriptions,
                    sub_key(&c.client_id, &c.filter),
                    entry.encode_to_vec(),
                );
            }
        }
        ProtoChange::Unsubscribed(c) => {
            if session_exists(tx, &c.client_id)? {
                tx.delete(StateCf::Subscriptions, sub_key(&c.client_id, &c.filter));
            }
        }
        ProtoChange::MessageStored(c) => {
            let mut refs: u32 = 0;
            for target in c.targets {
                if target.client_id.contains('\0') || !session_exists(tx, &target.client_id)? {
                    continue;
                }
                let seq = next_seq(tx)?;
                tx.put(
                    StateCf::SessionMessages,
                    index_key(&target.client_id, c.id, seq),
                    Vec::new(),
                );
                let key = delivery_key(&target.client_id, seq);
                let record = state::DeliveryRecord {
                    target: Some(target),
                    packet_id: None,
                    released: false,
                    message_id: c.id,
                };
                tx.put(StateCf::SessionMessages, key, record.encode_to_vec());
                refs = refs.saturating_add(1);
            }
            if refs > 0 {
                let record = state::StoredMessageRecord {
                    message: c.message,
                    refs,
                };
                tx.put(
                    StateCf::Messages,
                    message_key(c.id).to_vec(),
                    record.encode_to_vec(),
                );
            }
        }
        ProtoChange::MessageSent(c) => {
            if let Some((key, mut record)) = first_delivery(tx, &c.client_id, c.id)? {
                record.packet_id = Some(c.packet_id);
                tx.put(StateCf::SessionMessages, key, record.encode_to_vec());
            }
        }
        ProtoChange::MessageReleased(c) => {
            if let Some((key, mut record)) = first_delivery(tx, &c.client_id, c.id)? {
                record.released = true;
                tx.put(StateCf::SessionMessages, key, record.encode_to_vec());
            }
        }
        ProtoChange::MessageAcked(c) => {
            if let Some((key, _)) = first_delivery(tx, &c.client_id, c.id)? {
                let seq = key
                    .get(key.len().saturating_sub(8)..)
                    .and_then(read_u64)
                    .ok_or_else(|| corrupt(StateCf::SessionMessages, &key, "bad delivery key"))?;
                tx.delete(StateCf::SessionMessages, key);
                tx.delete(StateCf::SessionMessages, index_key(&c.client_id, c.id, seq));
                release_message(tx, c.id)?;
            }
        }
        ProtoChange::IncomingQos2Received(c) => {
            if session_exists(tx, &c.client_id)? {
                // With the message id when its store spans shards (the resend stores it again).
                let value = if c.message_id == 0 {
                    Vec::new()
                } else {
                    state::Qos2Intent {
                        message_id: c.message_id,
                        shards: c.shards,
                    }
                    .encode_to_vec()
                };
                tx.put(
                    StateCf::SessionMessages,
                    qos2_key(&c.client_id, c.packet_id),
                    value,
                );
            }
        }
        ProtoChange::PublishSettled(c) => {
            for id in c.ids {
                published::settle(tx, id, c.at_ms)?;
            }
        }
        ProtoChange::IncomingQos2Completed(c) => {
            if session_exists(tx, &c.client_id)? {
                tx.delete(
                    StateCf::SessionMessages,
                    qos2_key(&c.client_id, c.packet_id),
                );
            }
        }
        ProtoChange::RetainedSet(c) => {
            if let Some(message) = c.message {
                tx.put(
                    StateCf::Retained,
                    message.topic.as_bytes().to_vec(),
                    message.encode_to_vec(),
                );
            }
        }
        ProtoChange::RetainedCleared(c) => {
            tx.delete(StateCf::Retained, c.topic.into_bytes());
        }
        ProtoChange::NodeDown(c) => {
            // The proposer adopts every session the node owned; attached ones are detached
            // as of the declaration (their wills and expiry run on the adopting node).
            if c.node != origin && origin != 0 {
                for (key, value) in tx.scan_prefix(StateCf::Sessions, b"")? {
                    let mut record: state::SessionRecord =
                        decode_value(StateCf::Sessions, &key, &value)?;
                    if record.node_id != c.node {
                        continue;
                    }
                    record.node_id = origin;
                    if record.online {
                        record.online = false;
                        record.detached_at_ms = (c.at_ms != 0).then_some(c.at_ms);
                    }
                    tx.put(StateCf::Sessions, key, record.encode_to_vec());
                }
            }
        }
    }
    Ok(())
}

/// The client id a change is keyed by (targets of `MessageStored` are checked one by one).
fn client_of(change: &ProtoChange) -> Option<&str> {
    Some(match change {
        ProtoChange::SessionOpened(c) => &c.client_id,
        ProtoChange::SessionDetached(c) => &c.client_id,
        ProtoChange::SessionEnded(c) => &c.client_id,
        ProtoChange::WillPublished(c) => &c.client_id,
        ProtoChange::Subscribed(c) => &c.client_id,
        ProtoChange::Unsubscribed(c) => &c.client_id,
        ProtoChange::MessageSent(c) => &c.client_id,
        ProtoChange::MessageAcked(c) => &c.client_id,
        ProtoChange::MessageReleased(c) => &c.client_id,
        ProtoChange::IncomingQos2Received(c) => &c.client_id,
        ProtoChange::IncomingQos2Completed(c) => &c.client_id,
        ProtoChange::MessageStored(_)
        | ProtoChange::RetainedSet(_)
        | ProtoChange::RetainedCleared(_)
        | ProtoChange::NodeDown(_)
        | ProtoChange::PublishSettled(_) => return None,
    })
}

fn get_session(tx: &Tx<'_>, client_id: &str) -> Result<Option<state::SessionRecord>, StoreError> {
    let key = client_id.as_bytes();
    tx.get(StateCf::Sessions, key)?
        .map(|raw| decode_value(StateCf::Sessions, key, &raw))
        .transpose()
}

fn session_exists(tx: &Tx<'_>, client_id: &str) -> Result<bool, StoreError> {
    Ok(tx.get(StateCf::Sessions, client_id.as_bytes())?.is_some())
}

fn put_session(tx: &mut Tx<'_>, client_id: &str, record: &state::SessionRecord) {
    tx.put(
        StateCf::Sessions,
        client_id.as_bytes().to_vec(),
        record.encode_to_vec(),
    );
}

/// Removes the session and everything it owns, dropping its message references.
fn end_session(tx: &mut Tx<'_>, client_id: &str) -> Result<(), StoreError> {
    if !session_exists(tx, client_id)? {
        return Ok(());
    }
    tx.delete(StateCf::Sessions, client_id.as_bytes().to_vec());
    for (key, value) in tx.scan_prefix(StateCf::SessionMessages, &delivery_prefix(client_id))? {
        let record: state::DeliveryRecord = decode_value(StateCf::SessionMessages, &key, &value)?;
        release_message(tx, record.message_id)?;
    }
    let prefix = client_prefix(client_id);
    tx.delete_prefix(StateCf::Subscriptions, prefix.clone());
    tx.delete_prefix(StateCf::SessionMessages, prefix);
    Ok(())
}

/// Drops one reference to message `id`, deleting it at zero.
fn release_message(tx: &mut Tx<'_>, id: u64) -> Result<(), StoreError> {
    let key = message_key(id);
    let Some(raw) = tx.get(StateCf::Messages, &key)? else {
        return Ok(());
    };
    let mut record: state::StoredMessageRecord = decode_value(StateCf::Messages, &key, &raw)?;
    record.refs = record.refs.saturating_sub(1);
    if record.refs == 0 {
        tx.delete(StateCf::Messages, key.to_vec());
    } else {
        tx.put(StateCf::Messages, key.to_vec(), record.encode_to_vec());
    }
    Ok(())
}

/// The oldest delivery of message `id` to `client_id`: its key and record.
fn first_delivery(
    tx: &Tx<'_>,
    client_id: &str,
    id: u64,
) -> Result<Option<(Vec<u8>, state::DeliveryRecord)>, StoreError> {
    let prefix = index_prefix(client_id, id);
    let Some(index) = tx.first_key_with_prefix(StateCf::SessionMessages, &prefix)? else {
        return Ok(None);
    };
    let seq = index
        .get(prefix.len()..)
        .and_then(read_u64)
        .ok_or_else(|| corrupt(StateCf::SessionMessages, &index, "bad index key"))?;
    let key = delivery_key(client_id, seq);
    let raw = tx
        .get(StateCf::SessionMessages, &key)?
        .ok_or_else(|| corrupt(StateCf::SessionMessages, &index, "index without delivery"))?;
    let record = decode_value(StateCf::SessionMessages, &key, &raw)?;
    Ok(Some((key, record)))
}

/// Takes the next delivery sequence number.
fn next_seq(tx: &mut Tx<'_>) -> Result<u64, StoreError> {
    let seq = match tx.get(StateCf::SmMeta, META_NEXT_SEQ)? {
        Some(raw) => {
            read_u64(&raw).ok_or_else(|| corrupt(StateCf::SmMeta, META_NEXT_SEQ, "not a u64"))?
        }
        None => 0,
    };
    tx.put(
        StateCf::SmMeta,
        META_NEXT_SEQ.to_vec(),
        seq.wrapping_add(1).to_be_bytes().to_vec(),
    );
    Ok(seq)
}

// ---------------------------------------------------------------------------------------------
// Recovery
// ---------------------------------------------------------------------------------------------

fn recover_session(
    snap: &StateSnapshot<'_>,
    clock: &WallClock,
    messages: &mut HashMap<u64, Option<Arc<Message>>>,
    client_id: String,
    record: state::SessionRecord,
) -> Result<SessionImage, StoreError> {
    let prefix = client_prefix(&client_id);
    let session_key = client_id.as_bytes().to_vec();

    let mut subscriptions = Vec::new();
    for item in snap.scan_prefix(StateCf::Subscriptions, &prefix) {
        let (key, value) = item?;
        let filter = key
            .get(prefix.len()..)
            .and_then(|f| std::str::from_utf8(f).ok())
            .ok_or_else(|| corrupt(StateCf::Subscriptions, &key, "filter not UTF-8"))?;
        let entry: state::SubEntry = decode_value(StateCf::Subscriptions, &key, &value)?;
        let entry = convert::sub_entry_from_proto(&entry)
            .map_err(|e| corrupt(StateCf::Subscriptions, &key, e))?;
        subscriptions.push((Arc::<str>::from(filter), entry));
    }

    let mut deliveries = Vec::new();
    for item in snap.scan_prefix(StateCf::SessionMessages, &delivery_prefix(&client_id)) {
        let (key, value) = item?;
        let record: state::DeliveryRecord = decode_value(StateCf::SessionMessages, &key, &value)?;
        let Some(message) = recover_message(snap, clock, messages, record.message_id)? else {
            // As in the reference model: a delivery whose message is gone is not recovered.
            continue;
        };
        let bad = |e: ConvertError| corrupt(StateCf::SessionMessages, &key, e);
        let target = record
            .target
            .ok_or(ConvertError::Missing("delivery.target"))
            .and_then(convert::target_from_proto)
            .map_err(bad)?;
        let packet_id = record
            .packet_id
            .map(|p| convert::packet_id(p, "delivery.packet_id"))
            .transpose()
            .map_err(bad)?;
        deliveries.push(StoredDelivery {
            id: MessageId(record.message_id),
            message,
            target,
            packet_id,
            released: record.released,
        });
    }

    let mut incoming_qos2 = Vec::new();
    let mut qos2_reroute = Vec::new();
    let qos2_prefix = qos2_prefix(&client_id);
    for item in snap.scan_prefix(StateCf::SessionMessages, &qos2_prefix) {
        let (key, value) = item?;
        let packet_id = key
            .get(qos2_prefix.len()..)
            .and_then(|b| <[u8; 2]>::try_from(b).ok())
            .map(u16::from_be_bytes)
            .ok_or_else(|| corrupt(StateCf::SessionMessages, &key, "bad QoS 2 key"))?;
        incoming_qos2.push(packet_id);
        if let Some(intent) = published::decode_intent(&key, &value)? {
            qos2_reroute.push((packet_id, MessageId(intent.message_id)));
        }
    }

    let will = record
        .will
        .map(|w| convert::will_from_proto(w, clock))
        .transpose()
        .map_err(|e| corrupt(StateCf::Sessions, &session_key, e))?;

    Ok(SessionImage {
        client_id: client_id.into(),
        expiry_secs: record.expiry_secs,
        subscriptions,
        messages: deliveries,
        incoming_qos2,
        qos2_reroute,
        will,
    })
}

/// Message `id`, converted once and shared by every delivery that recovers it.
fn recover_message(
    snap: &StateSnapshot<'_>,
    clock: &WallClock,
    cache: &mut HashMap<u64, Option<Arc<Message>>>,
    id: u64,
) -> Result<Option<Arc<Message>>, StoreError> {
    if let Some(message) = cache.get(&id) {
        return Ok(message.clone());
    }
    let key = message_key(id);
    let message = match snap.get(StateCf::Messages, &key)? {
        None => None,
        Some(raw) => {
            let record: state::StoredMessageRecord = decode_value(StateCf::Messages, &key, &raw)?;
            let message = record
                .message
                .ok_or(ConvertError::Missing("stored_message.message"))
                .and_then(|m| convert::message_from_proto(m, clock))
                .map_err(|e| corrupt(StateCf::Messages, &key, e))?;
            Some(Arc::new(message))
        }
    };
    cache.insert(id, message.clone());
    Ok(message)
}

// ---------------------------------------------------------------------------------------------
// Keys and values
// ---------------------------------------------------------------------------------------------

/// `{client_id}\0`: the prefix of everything a session owns in `subscriptions` and
/// `session_messages`.
fn client_prefix(client_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(client_id.len() + 1 + 16);
    key.extend_from_slice(client_id.as_bytes());
    key.push(0);
    key
}

fn sub_key(client_id: &str, filter: &str) -> Vec<u8> {
    let mut key = client_prefix(client_id);
    key.extend_from_slice(filter.as_bytes());
    key
}

fn delivery_prefix(client_id: &str) -> Vec<u8> {
    let mut key = client_prefix(client_id);
    key.push(TAG_DELIVERY);
    key
}

fn delivery_key(client_id: &str, seq: u64) -> Vec<u8> {
    let mut key = delivery_prefix(client_id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn index_prefix(client_id: &str, id: u64) -> Vec<u8> {
    let mut key = client_prefix(client_id);
    key.push(TAG_INDEX);
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn index_key(client_id: &str, id: u64, seq: u64) -> Vec<u8> {
    let mut key = index_prefix(client_id, id);
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn qos2_prefix(client_id: &str) -> Vec<u8> {
    let mut key = client_prefix(client_id);
    key.push(TAG_QOS2);
    key
}

fn qos2_key(client_id: &str, packet_id: u32) -> Vec<u8> {
    let mut key = qos2_prefix(client_id);
    // Validated to fit in 16 bits before apply.
    key.extend_from_slice(&(packet_id as u16).to_be_bytes());
    key
}

fn message_key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

fn read_u64(bytes: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(bytes).ok().map(u64::from_be_bytes)
}

fn decode_value<M: prost::Message + Default>(
    cf: StateCf,
    key: &[u8],
    raw: &[u8],
) -> Result<M, StoreError> {
    M::decode(raw).map_err(|e| corrupt(cf, key, e))
}

fn corrupt(cf: StateCf, key: &[u8], detail: impl std::fmt::Display) -> StoreError {
    StoreError::CorruptKey {
        cf: cf.name(),
        detail: format!("value of key {:?}: {detail}", String::from_utf8_lossy(key)),
    }
}

// ---------------------------------------------------------------------------------------------
// Overlay
// ---------------------------------------------------------------------------------------------

/// Key/value pairs in key order.
type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// The writes of one log entry: a [`StateBatch`] plus an overlay so that reads during the
/// entry see its earlier writes.
struct Tx<'a> {
    db: &'a StateDb,
    batch: StateBatch,
    /// Latest value written per key (`None`: deleted).
    writes: BTreeMap<(StateCf, Vec<u8>), Option<Vec<u8>>>,
    /// Prefixes deleted (keys written after the deletion are in `writes`).
    cleared: Vec<(StateCf, Vec<u8>)>,
}

impl<'a> Tx<'a> {
    fn new(db: &'a StateDb) -> Self {
        Tx {
            db,
            batch: StateBatch::new(),
            writes: BTreeMap::new(),
            cleared: Vec::new(),
        }
    }

    fn into_batch(self) -> StateBatch {
        self.batch
    }

    fn is_cleared(&self, cf: StateCf, key: &[u8]) -> bool {
        self.cleared
            .iter()
            .any(|(c, prefix)| *c == cf && key.starts_with(prefix))
    }

    fn get(&self, cf: StateCf, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(value) = self.writes.get(&(cf, key.to_vec())) {
            return Ok(value.clone());
        }
        if self.is_cleared(cf, key) {
            return Ok(None);
        }
        self.db.get(cf, key)
    }

    fn put(&mut self, cf: StateCf, key: Vec<u8>, value: Vec<u8>) {
        self.batch.put(cf, key.clone(), value.clone());
        self.writes.insert((cf, key), Some(value));
    }

    fn delete(&mut self, cf: StateCf, key: Vec<u8>) {
        self.batch.delete(cf, key.clone());
        self.writes.insert((cf, key), None);
    }

    fn delete_prefix(&mut self, cf: StateCf, prefix: Vec<u8>) {
        self.batch.delete_prefix(cf, prefix.clone());
        self.writes
            .retain(|(c, key), _| !(*c == cf && key.starts_with(&prefix)));
        self.cleared.push((cf, prefix));
    }

    /// Writes of this entry under `prefix`, in key order.
    fn overlay<'s>(
        &'s self,
        cf: StateCf,
        prefix: &'s [u8],
    ) -> impl Iterator<Item = (&'s Vec<u8>, &'s Option<Vec<u8>>)> + 's {
        self.writes
            .range((cf, prefix.to_vec())..)
            .take_while(move |((c, key), _)| *c == cf && key.starts_with(prefix))
            .map(|((_, key), value)| (key, value))
    }

    /// Whether the database's keys under `prefix` are all deleted by this entry.
    fn prefix_cleared(&self, cf: StateCf, prefix: &[u8]) -> bool {
        self.cleared
            .iter()
            .any(|(c, p)| *c == cf && prefix.starts_with(p))
    }

    /// Every pair under `prefix` as of this entry's writes, in key order.
    fn scan_prefix(&self, cf: StateCf, prefix: &[u8]) -> Result<Pairs, StoreError> {
        let mut pairs = BTreeMap::new();
        if !self.prefix_cleared(cf, prefix) {
            for item in self.db.scan_prefix(cf, prefix) {
                let (key, value) = item?;
                if !self.is_cleared(cf, &key) {
                    pairs.insert(key, value);
                }
            }
        }
        for (key, value) in self.overlay(cf, prefix) {
            match value {
                Some(value) => pairs.insert(key.clone(), value.clone()),
                None => pairs.remove(key),
            };
        }
        Ok(pairs.into_iter().collect())
    }

    /// The smallest key under `prefix` as of this entry's writes.
    fn first_key_with_prefix(
        &self,
        cf: StateCf,
        prefix: &[u8],
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut from_db = None;
        if !self.prefix_cleared(cf, prefix) {
            for item in self.db.scan_prefix(cf, prefix) {
                let (key, _) = item?;
                let deleted = self.is_cleared(cf, &key)
                    || matches!(self.writes.get(&(cf, key.clone())), Some(None));
                if !deleted {
                    from_db = Some(key);
                    break;
                }
            }
        }
        let from_overlay = self
            .overlay(cf, prefix)
            .find(|(_, value)| value.is_some())
            .map(|(key, _)| key.clone());
        Ok(match (from_db, from_overlay) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }
}
