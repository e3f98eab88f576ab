//! Idle shards stop their heartbeats (`raftmq_cluster::quiesce`): they quiesce without any
//! election, a proposal commits in a quiesced shard, and a quiesced shard whose leader's node is
//! cut off elects a new leader among the others (the leader's process is alive, so only the
//! followers' own timers, started again by the silence of its node, can replace it).

use super::ambiguous::claim;
use super::*;
use raftmq_cluster::quiesce::{QUIESCE_AFTER, UNQUIESCE_AFTER};
use raftmq_cluster::types::DATA_SHARD;
use raftmq_core::shard::shard_of;

const SHARDS: u32 = 4;

fn count() -> ShardCount {
    ShardCount::new(SHARDS).expect("valid")
}

/// Waits until every shard but shard 1 is quiesced on every node (leader and followers).
async fn all_quiesced(cluster: &Cluster) {
    for &node in &cluster.ids {
        for s in 2..=SHARDS {
            eventually(
                &format!("node {node}: shard {s} quiesced"),
                QUIESCE_AFTER * 10,
                || {
                    std::future::ready(
                        cluster
                            .node(node)
                            .groups()
                            .quiet()
                            .is_quiesced(ShardId::new(s)),
                    )
                },
            )
            .await;
        }
    }
}

/// Every shard's term on every node.
fn terms(cluster: &Cluster) -> Vec<(NodeId, u32, u64)> {
    let mut all = Vec::new();
    for &node in &cluster.ids {
        for (shard, raft) in cluster.node(node).groups().iter() {
            all.push((node, shard.get(), raft.metrics().borrow().current_term));
        }
    }
    all
}

/// A client id whose session lives in shard `shard`.
fn client_of(shard: u32) -> String {
    (0..)
        .map(|i| format!("q{i}"))
        .find(|c| shard_of(c.as_bytes(), count()).get() == shard)
        .expect("some id lands in every shard")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_shards_quiesce_without_elections_and_a_proposal_commits_in_one() {
    let cluster =
        Cluster::start_full(3, tuning(10_000, 1_000), false, Transport::Plain, count()).await;
    all_quiesced(&cluster).await;
    for &node in &cluster.ids {
        assert!(
            !cluster.node(node).groups().quiet().is_quiesced(DATA_SHARD),
            "node {node}: shard 1 never quiesces"
        );
    }
    // Longer than the longest election timeout (2 s): a follower whose timer still ran would
    // stand for election, since its leader sends no heartbeats; every term stays.
    let before = terms(&cluster);
    let watched = tokio::time::Instant::now();
    while watched.elapsed() < Duration::from_secs(3) {
        assert_eq!(terms(&cluster), before, "no election while quiesced");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A proposal to a quiesced shard commits (through a follower of shard 1, forwarded), on
    // every node, without an election.
    for s in 2..=SHARDS {
        let client = client_of(s);
        let via = cluster.ids[s as usize % cluster.ids.len()];
        cluster
            .propose(via, None, vec![claim(&client, 1)])
            .await
            .unwrap_or_else(|e| panic!("shard {s} commits while quiesced: {e:?}"));
        for &node in &cluster.ids {
            eventually(
                &format!("node {node} has {client}'s claim"),
                CONVERGE_TIMEOUT,
                || std::future::ready(cluster.sessions(node).contains(&client)),
            )
            .await;
        }
    }
    assert_eq!(terms(&cluster), before, "no election to wake a shard");
    // Idle again: quiesced again.
    all_quiesced(&cluster).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quiesced_shard_whose_leaders_node_is_cut_off_elects_another_leader() {
    let cluster =
        Cluster::start_full(3, tuning(10_000, 1_000), false, Transport::Plain, count()).await;
    all_quiesced(&cluster).await;
    let shard = ShardId::new(SHARDS);
    let leader = cluster
        .node(cluster.ids[0])
        .groups()
        .get(shard)
        .and_then(|r| r.metrics().borrow().current_leader)
        .expect("a quiesced shard has a leader");
    let others = without(&cluster.ids, leader);
    cluster.net.isolate(leader, &cluster.ids);
    // The others hear nothing from the leader's node for UNQUIESCE_AFTER, start their timers
    // and elect one of them (a timer of up to 2 s, and a vote round, after that).
    let bound = UNQUIESCE_AFTER + Duration::from_secs(15);
    for &node in &others {
        let what = format!("node {node}: shard {shard:?} led by one of {others:?}");
        cluster
            .node(node)
            .groups()
            .get(shard)
            .expect("runs every shard")
            .wait(Some(bound))
            .metrics(
                |m| m.current_leader.is_some_and(|l| others.contains(&l)),
                &what,
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    // And the shard commits there while the old leader is still cut off.
    let client = client_of(SHARDS);
    cluster
        .propose(others[0], None, vec![claim(&client, 1)])
        .await
        .expect("the new leader commits");
    cluster.net.heal();
    cluster.shutdown().await;
}
