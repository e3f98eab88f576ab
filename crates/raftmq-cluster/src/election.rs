//! Replacing a leader whose process is gone, without waiting out the election timeout.
//!
//! openraft elects a new leader only when a follower's election timer fires, and a follower
//! refuses to vote while the lease of the leader it last heard from runs (the longest election
//! timeout): with the default 1–2 s timeouts a crashed leader used to cost 2–4 s of refused
//! durable writes. But a crash is visible sooner than silence: the dead leader's cluster port
//! refuses connections (the forwarding streams notice within a reconnect, ~100 ms). Then the
//! surviving voters call elections themselves, in turns a [`TURN`] apart, by rank among
//! them: the first candidate is refused by voters still inside the dead leader's lease, but a
//! voter that has become a candidate itself no longer defends that lease, so the next
//! candidate with a higher term (and a log as complete) is elected. Each turn checks first
//! that no new leader is known yet; after [`MAX_TURNS`] the ordinary timers take over.
//!
//! Nothing here overrides Raft's safety: a vote is still granted only to a candidate whose
//! log is at least as complete, by a voter that has not voted in that term; a partitioned
//! leader (silent, not refusing) is replaced by the ordinary election timeout as before.

use crate::forward::ForwardHub;
use crate::types::{NodeId, Raft};
use openraft::ServerState;
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

/// How often the leader's liveness is looked at.
const TICK: Duration = Duration::from_millis(50);
/// Time between two survivors' election calls.
const TURN: Duration = Duration::from_millis(100);
/// Election calls in all (over all survivors) before leaving it to the election timers.
const MAX_TURNS: u32 = 8;

/// Leader elections this node called because the leader's process was gone.
pub const DEAD_LEADER_ELECTIONS_TOTAL: &str = "raftmq_raft_dead_leader_elections_total";

/// On every voter: when the leader's cluster port refuses connections, takes part in the
/// elections that replace it (see the module docs). Runs until aborted.
pub(crate) async fn replace_dead_leader(raft: Raft, me: NodeId, hub: Arc<ForwardHub>) {
    // The (leader, term) already handled: one round of turns per dead leader.
    let mut handled: Option<(NodeId, u64)> = None;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let m = raft.metrics().borrow().clone();
        let Some(leader) = m.current_leader else {
            continue;
        };
        if leader == me
            || m.state == ServerState::Learner
            || handled == Some((leader, m.current_term))
            || hub.refused_for(leader).is_none()
        {
            continue;
        }
        let mut survivors: Vec<NodeId> = m
            .membership_config
            .membership()
            .voter_ids()
            .filter(|id| *id != leader)
            .collect();
        survivors.sort_unstable();
        let Some(rank) = survivors.iter().position(|id| *id == me) else {
            continue;
        };
        handled = Some((leader, m.current_term));
        info!(
            leader,
            term = m.current_term,
            "the leader's cluster port refuses connections: electing a new leader"
        );
        take_turns(&raft, leader, rank as u32, survivors.len() as u32).await;
    }
}

/// Calls an election at each of this node's turns (`rank`, `rank + n`, ...) until a leader
/// other than `dead` is known or the turns are over.
async fn take_turns(raft: &Raft, dead: NodeId, rank: u32, n: u32) {
    let start = tokio::time::Instant::now();
    let mut turn = rank;
    while turn < MAX_TURNS {
        tokio::time::sleep_until(start + TURN * turn).await;
        let m = raft.metrics().borrow().clone();
        if m.current_leader.is_some_and(|l| l != dead) || m.state == ServerState::Shutdown {
            return;
        }
        metrics::counter!(DEAD_LEADER_ELECTIONS_TOTAL).increment(1);
        if raft.trigger().elect().await.is_err() {
            return;
        }
        turn += n.max(1);
    }
}
