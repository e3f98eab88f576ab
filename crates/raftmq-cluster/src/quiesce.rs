//! Idle shards stop their Raft heartbeats (RFC 0002, section 8.2, "quiescence").
//!
//! Without this every group's leader sends a heartbeat to each follower every 200 ms whether
//! or not anything happens, so an idle cluster's work grows with the number of shards. Here,
//! once a shard other than shard 1 has had nothing appended for [`QUIESCE_AFTER`] and every
//! voter has its whole log applied, its leader asks the followers to stop their election
//! timers (`Quiesce`), and when all agreed it stops its heartbeats. From then on the shard
//! costs nothing until:
//!
//! - **something is appended**: openraft replicates a new entry at once whatever the
//!   heartbeat setting; the follower that receives any Raft message of the shard starts its
//!   election timer again, and the leader, seeing its log grow, its heartbeats;
//! - **the leader's node falls silent**: every node sends a [`NodeHeartbeat`] to each peer
//!   every [`NODE_HEARTBEAT`] (a few RPCs per second per node, however many shards); a follower
//!   that has not heard from its quiesced leader's node for [`UNQUIESCE_AFTER`] starts its
//!   election timer again (after a per-node delay, so the followers do not all stand at once),
//!   and openraft elects a new leader as for a busy shard. A leader whose process is gone is
//!   replaced sooner, by `election.rs`, which does not depend on the timers;
//! - **anything else changes**: a new leader or term, a vote request, a lost leadership.
//!
//! Shard 1 never quiesces: its heartbeats drive this node's lease (self-fencing) and the
//! leader contact that readiness reads, and cost one group's worth.
//!
//! Only liveness actions are switched (heartbeats, the election timer); terms, votes and log
//! matching are untouched, so the worst a mistake here can cost is an election nobody needed
//! or, for a shard whose Raft traffic alone is cut while its nodes' heartbeats flow (tests can
//! do that; one connection per node pair makes it unlikely in production), an election that
//! waits for that traffic to come back.

use crate::groups::Groups;
use crate::network::{Faults, pass_node, pass_raft};
use crate::peers::PeerPool;
use crate::types::{DATA_SHARD, NodeId, Raft, ShardId};
use metrics::{counter, gauge};
use openraft::ServerState;
use parking_lot::Mutex;
use raftmq_proto::raft as pb;
use raftmq_proto::raft::raft_service_client::RaftServiceClient;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::debug;

/// A shard with nothing appended for this long is quiesced.
pub const QUIESCE_AFTER: Duration = Duration::from_secs(2);
/// How often every node tells each peer it is up.
pub const NODE_HEARTBEAT: Duration = Duration::from_millis(500);
/// A follower of a quiesced shard whose leader's node has been silent this long starts its
/// election timer again.
pub const UNQUIESCE_AFTER: Duration = Duration::from_secs(2);
/// How often the shards are looked at.
const TICK: Duration = Duration::from_millis(100);
/// Bound on one `Quiesce` or `NodeHeartbeat` call.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// The most a follower waits, after its leader's node fell silent, before it may stand.
const MAX_JITTER_MS: u64 = 500;

/// Shards this node leads whose heartbeats are off (per node; bounded: no labels).
pub const SHARDS_QUIESCED: &str = "raftmq_shards_quiesced";
/// Times a shard this node leads was quiesced.
pub const SHARD_QUIESCES_TOTAL: &str = "raftmq_shard_quiesces_total";
/// Times a shard quiesced here (as leader or follower) woke up.
pub const SHARD_WAKEUPS_TOTAL: &str = "raftmq_shard_wakeups_total";

/// What this node knows of quiesced shards, shared by the [`run`] loop and the Raft service.
#[derive(Debug, Default)]
pub struct Quiet {
    /// Follower side: the shards whose election timer is off here, with their leader.
    followed: Mutex<HashMap<ShardId, NodeId>>,
    /// Leader side: the shards this node leads with heartbeats off.
    led: Mutex<HashSet<ShardId>>,
    /// When each peer was last heard from (a node heartbeat it sent or answered).
    heard: Mutex<HashMap<NodeId, Instant>>,
}

impl Quiet {
    /// Peer `peer` is up now.
    pub(crate) fn heard_from(&self, peer: NodeId) {
        self.heard.lock().insert(peer, Instant::now());
    }

    /// How long `peer` has been silent (`None`: never heard from).
    fn silent_for(&self, peer: NodeId) -> Option<Duration> {
        self.heard.lock().get(&peer).map(Instant::elapsed)
    }

    /// A Raft message of `shard` arrived: if it was quiesced here, its election timer runs
    /// again.
    pub(crate) fn woken(&self, shard: ShardId, raft: &Raft) {
        if self.followed.lock().remove(&shard).is_some() {
            raft.runtime_config().elect(true);
            counter!(SHARD_WAKEUPS_TOTAL).increment(1);
            debug!(%shard, "quiesced shard woken by a Raft message");
        }
    }

    /// Whether shard `shard` is quiesced here (as leader or follower).
    pub fn is_quiesced(&self, shard: ShardId) -> bool {
        self.led.lock().contains(&shard) || self.followed.lock().contains_key(&shard)
    }

    /// A leader's `Quiesce`: agreed (and the election timer stopped) when this node follows
    /// that leader in that term, with the same last log entry, applied.
    pub(crate) fn on_quiesce(&self, shard: ShardId, raft: &Raft, req: &pb::QuiesceRequest) -> bool {
        if shard == DATA_SHARD {
            return false;
        }
        let m = raft.metrics().borrow().clone();
        let applied = m.last_applied.is_some_and(|l| {
            l.index == req.last_log_index && l.leader_id.term == req.last_log_term
        });
        let agreed = m.state == ServerState::Follower
            && m.current_leader == Some(req.leader)
            && m.current_term == req.term
            && m.last_log_index == Some(req.last_log_index)
            && applied;
        if agreed {
            // Recorded before the timer stops, so a Raft message racing this one wakes it.
            self.followed.lock().insert(shard, req.leader);
            raft.runtime_config().elect(false);
        }
        agreed
    }
}

/// The leader-side record of one shard: its last log index and since when it has not moved.
struct Idle {
    term: u64,
    last_log_index: Option<u64>,
    since: Instant,
}

/// Quiesces the idle shards this node leads, wakes the ones it follows whose leader's node
/// fell silent, and sends the node heartbeats. Runs until aborted; only with more than one
/// shard.
pub(crate) async fn run(
    groups: Arc<Groups>,
    me: NodeId,
    pool: Arc<PeerPool>,
    faults: Faults,
    after: Duration,
) {
    let quiet = groups.quiet().clone();
    let mut idle: HashMap<ShardId, Idle> = HashMap::new();
    // Follower side: when a shard whose leader's node fell silent may stand.
    let mut wake_at: HashMap<ShardId, Instant> = HashMap::new();
    let mut next_heartbeat = Instant::now();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        if now >= next_heartbeat {
            next_heartbeat = now + NODE_HEARTBEAT;
            send_heartbeats(groups.data(), me, &pool, &faults, &quiet);
        }
        for (shard, raft) in groups.iter().filter(|(s, _)| *s != DATA_SHARD) {
            let m = raft.metrics().borrow().clone();
            lead(
                shard, raft, &m, &quiet, &mut idle, now, after, me, &pool, &faults,
            )
            .await;
            follow(shard, raft, &m, &quiet, &mut wake_at, now, me);
        }
        gauge!(SHARDS_QUIESCED).set(quiet.led.lock().len() as f64);
    }
}

/// The leader side of one shard: heartbeats back on when it woke or is no longer led here; a
/// `Quiesce` round when it has been idle long enough.
#[allow(clippy::too_many_arguments, reason = "one loop's state, passed down")]
async fn lead(
    shard: ShardId,
    raft: &Raft,
    m: &openraft::RaftMetrics<NodeId, crate::types::ClusterNode>,
    quiet: &Quiet,
    idle: &mut HashMap<ShardId, Idle>,
    now: Instant,
    after: Duration,
    me: NodeId,
    pool: &PeerPool,
    faults: &Faults,
) {
    if m.state != ServerState::Leader {
        idle.remove(&shard);
        if quiet.led.lock().remove(&shard) {
            // Whoever leads next (this node again, later) starts with heartbeats on.
            raft.runtime_config().heartbeat(true);
        }
        return;
    }
    let entry = idle.entry(shard).or_insert(Idle {
        term: m.current_term,
        last_log_index: m.last_log_index,
        since: now,
    });
    if entry.term != m.current_term || entry.last_log_index != m.last_log_index {
        *entry = Idle {
            term: m.current_term,
            last_log_index: m.last_log_index,
            since: now,
        };
        if quiet.led.lock().remove(&shard) {
            raft.runtime_config().heartbeat(true);
            counter!(SHARD_WAKEUPS_TOTAL).increment(1);
            debug!(%shard, "quiesced shard woken by a proposal");
        }
        return;
    }
    if quiet.led.lock().contains(&shard) || now.duration_since(entry.since) < after {
        return;
    }
    let Some(followers) = quiescable(m, me, quiet) else {
        return;
    };
    let Some(last) = m.last_applied else {
        return;
    };
    let req = pb::QuiesceRequest {
        shard_id: u64::from(shard.get()),
        leader: me,
        term: m.current_term,
        last_log_index: last.index,
        last_log_term: last.leader_id.term,
    };
    let calls = followers
        .iter()
        .map(|(peer, addr)| ask_quiesce(shard, me, *peer, addr, req, pool, faults));
    let agreed = futures_util::future::join_all(calls)
        .await
        .into_iter()
        .all(|ok| ok);
    // The shard must not have moved meanwhile (a proposal during the round wakes the
    // followers that agreed; this side then sees the new index on its next tick).
    let still = raft.metrics().borrow().clone();
    if agreed && still.state == ServerState::Leader && still.last_log_index == m.last_log_index {
        raft.runtime_config().heartbeat(false);
        quiet.led.lock().insert(shard);
        counter!(SHARD_QUIESCES_TOTAL).increment(1);
        debug!(%shard, index = last.index, "shard quiesced");
    } else {
        // Try again after another idle period.
        if let Some(entry) = idle.get_mut(&shard) {
            entry.since = now;
        }
    }
}

/// The followers to ask, with their addresses, if the shard may quiesce: one configuration
/// (no membership change under way), no learners, every voter's log matched up to the
/// leader's last entry, which is applied here, and every voter's node heard from lately.
fn quiescable(
    m: &openraft::RaftMetrics<NodeId, crate::types::ClusterNode>,
    me: NodeId,
    quiet: &Quiet,
) -> Option<Vec<(NodeId, String)>> {
    let membership = m.membership_config.membership();
    if membership.get_joint_config().len() != 1 || membership.learner_ids().next().is_some() {
        return None;
    }
    let last = m.last_log_index?;
    if m.last_applied.map(|l| l.index) != Some(last) {
        return None;
    }
    let replication = m.replication.as_ref()?;
    let mut followers = Vec::new();
    for id in membership.voter_ids().filter(|id| *id != me) {
        let matched = replication.get(&id).copied().flatten().map(|l| l.index);
        if matched != Some(last) || quiet.silent_for(id).is_none_or(|s| s > UNQUIESCE_AFTER / 2) {
            return None;
        }
        followers.push((id, membership.get_node(&id)?.cluster_addr.clone()));
    }
    Some(followers)
}

/// One follower's answer to `Quiesce` (false on any failure).
async fn ask_quiesce(
    shard: ShardId,
    me: NodeId,
    peer: NodeId,
    addr: &str,
    req: pb::QuiesceRequest,
    pool: &PeerPool,
    faults: &Faults,
) -> bool {
    if pass_raft(faults, shard, me, peer).await.is_err() {
        return false;
    }
    let Ok(channel) = pool.channel(peer, addr) else {
        return false;
    };
    let mut request = tonic::Request::new(req);
    request.set_timeout(CALL_TIMEOUT);
    let answer = RaftServiceClient::new(channel).quiesce(request).await;
    let agreed = answer.is_ok_and(|r| r.get_ref().quiesced);
    agreed && pass_raft(faults, shard, peer, me).await.is_ok()
}

/// The follower side of one shard quiesced here: its election timer runs again when the
/// leader changed, or after its leader's node has been silent for [`UNQUIESCE_AFTER`] (and a
/// per-node delay).
fn follow(
    shard: ShardId,
    raft: &Raft,
    m: &openraft::RaftMetrics<NodeId, crate::types::ClusterNode>,
    quiet: &Quiet,
    wake_at: &mut HashMap<ShardId, Instant>,
    now: Instant,
    me: NodeId,
) {
    let Some(leader) = quiet.followed.lock().get(&shard).copied() else {
        wake_at.remove(&shard);
        return;
    };
    let moved = m.state != ServerState::Follower || m.current_leader != Some(leader);
    let silent = quiet
        .silent_for(leader)
        .is_none_or(|s| s >= UNQUIESCE_AFTER);
    let due = if moved {
        true
    } else if silent {
        let at = *wake_at
            .entry(shard)
            .or_insert_with(|| now + jitter(me, shard));
        now >= at
    } else {
        wake_at.remove(&shard);
        false
    };
    if due && quiet.followed.lock().remove(&shard).is_some() {
        wake_at.remove(&shard);
        raft.runtime_config().elect(true);
        counter!(SHARD_WAKEUPS_TOTAL).increment(1);
        debug!(%shard, leader, moved, "quiesced shard woken: its leader changed or fell silent");
    }
}

/// A delay that differs between nodes and shards, so the followers of a silent leader do
/// not all call an election at once.
fn jitter(me: NodeId, shard: ShardId) -> Duration {
    let mixed = me
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(u64::from(shard.get()).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    Duration::from_millis((mixed >> 32) % MAX_JITTER_MS)
}

/// Sends this node's heartbeat to every other member of shard 1's membership, without
/// waiting; an answer marks the peer heard from.
fn send_heartbeats(
    data: &Raft,
    me: NodeId,
    pool: &Arc<PeerPool>,
    faults: &Faults,
    quiet: &Arc<Quiet>,
) {
    let m = data.metrics().borrow().clone();
    let peers: Vec<(NodeId, String)> = m
        .membership_config
        .membership()
        .nodes()
        .filter(|(id, _)| **id != me)
        .map(|(id, node)| (*id, node.cluster_addr.clone()))
        .collect();
    for (peer, addr) in peers {
        let (pool, faults, quiet) = (pool.clone(), faults.clone(), quiet.clone());
        tokio::spawn(async move {
            if pass_node(&faults, me, peer).await.is_err() {
                return;
            }
            let Ok(channel) = pool.channel(peer, &addr) else {
                return;
            };
            let mut request = tonic::Request::new(pb::NodeHeartbeat { from: me });
            request.set_timeout(CALL_TIMEOUT);
            if RaftServiceClient::new(channel)
                .heartbeat(request)
                .await
                .is_ok()
                && pass_node(&faults, peer, me).await.is_ok()
            {
                quiet.heard_from(peer);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followers_of_one_silent_leader_wait_different_delays_within_the_bound() {
        let delays: HashSet<Duration> = (1..=5).map(|n| jitter(n, ShardId::new(7))).collect();
        assert!(delays.len() >= 4, "nodes wait different delays: {delays:?}");
        for n in 1..=50 {
            for s in 1..=64 {
                assert!(jitter(n, ShardId::new(s)) < Duration::from_millis(MAX_JITTER_MS));
            }
        }
    }

    #[test]
    fn a_peer_is_silent_until_heard_from() {
        let quiet = Quiet::default();
        assert_eq!(quiet.silent_for(2), None);
        quiet.heard_from(2);
        assert!(
            quiet
                .silent_for(2)
                .is_some_and(|s| s < Duration::from_secs(1))
        );
        assert_eq!(quiet.silent_for(3), None);
    }
}
