//! Raft under injected network faults: leader loss and re-election, a partitioned minority
//! refusing durable writes, healing, lossy and slow links, a lagging node that catches up from
//! a snapshot, and a node restarted from its data dir.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn isolated_leader_is_replaced_refuses_writes_and_rejoins() {
    let cluster = Cluster::start(3, tuning(10_000, 1_000)).await;
    let before = names("before", 20);
    cluster.write_majority(&cluster.ids, &before).await;
    let old = cluster.leader().await;

    // Cut the leader off: the other two elect a new leader among themselves.
    cluster.net.isolate(old, &cluster.ids);
    let majority = without(&cluster.ids, old);
    let new = cluster.agreed_leader(&majority, Some(old)).await;
    assert_ne!(new, old);

    // The cut-off node cannot commit: its writes are refused (not acknowledged, not hung) and
    // it reports not-ready, while the majority keeps committing.
    let refused = names("refused", 3);
    assert_eq!(
        cluster.write_each(old, &refused).await,
        vec![Err(DurabilityError::Unavailable); refused.len()],
        "every write through the cut-off leader is refused"
    );
    cluster
        .wait_ready(old, false, "isolated node not ready")
        .await;
    let during = names("during", 20);
    cluster.write_majority(&majority, &during).await;
    let other = *majority.iter().find(|&&n| n != new).expect("a follower");
    let via_follower = names("via-follower", 5);
    let mut forwarded = Err(DurabilityError::Unavailable);
    for _ in 0..3 {
        forwarded = cluster.write(other, &via_follower).await;
        if forwarded.is_ok() {
            break;
        }
    }
    forwarded.expect("a follower forwards to the new leader");

    // Heal: the old leader steps down, catches up, and everyone has the same state, without
    // the refused writes.
    cluster
        .heal_and_converge(&set(&[&before, &during, &via_follower]))
        .await;
    for id in &cluster.ids {
        let sessions = cluster.sessions(*id);
        assert!(
            refused.iter().all(|r| !sessions.contains(r)),
            "node {id} holds a write that was refused"
        );
    }
    cluster
        .wait_ready(old, true, "old leader ready again")
        .await;
    let after = names("after", 5);
    cluster
        .write(old, &after)
        .await
        .expect("the healed node commits again");
    cluster
        .converged(
            &cluster.ids,
            &set(&[&before, &during, &via_follower, &after]),
        )
        .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn minority_follower_refuses_and_majority_carries_on() {
    let cluster = Cluster::start(3, tuning(10_000, 1_000)).await;
    let follower = cluster.follower().await;

    cluster.net.isolate(follower, &cluster.ids);
    let majority = without(&cluster.ids, follower);
    let during = names("during", 30);
    cluster.write_majority(&majority, &during).await;
    assert_eq!(
        cluster.write(follower, &names("cut-off", 2)).await,
        Err(DurabilityError::Unavailable),
        "a node that cannot reach the leader must refuse durable writes"
    );
    cluster
        .wait_ready(follower, false, "isolated follower not ready")
        .await;

    cluster.heal_and_converge(&set(&[&during])).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_and_lossy_links_still_commit_everything_once() {
    let cluster = Cluster::start(3, tuning(10_000, 1_000)).await;
    // 20 ms each way between nodes and one message in seven lost: openraft retries, nothing
    // acknowledged is lost, nothing is applied twice.
    cluster
        .net
        .delay_all(&cluster.ids, Duration::from_millis(20));
    cluster.net.drop_every(7);
    let mut written = Vec::new();
    for round in 0..5 {
        let leader = cluster.leader().await;
        let batch = names(&format!("lossy{round}"), 10);
        // A write may be refused while a lost heartbeat triggers an election; retry the
        // round (the same sessions: applying a session open twice is idempotent).
        let mut ok = false;
        for _ in 0..5 {
            if cluster.write(leader, &batch).await.is_ok() {
                ok = true;
                break;
            }
        }
        assert!(ok, "round {round} never committed over a lossy network");
        written.extend(batch);
    }
    cluster.heal_and_converge(&set(&[&written])).await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lagging_node_catches_up_from_a_snapshot() {
    // Snapshot every 20 entries and keep no log behind it: a node that misses more than that
    // can only catch up by installing a snapshot.
    // Every write goes to shard 1 (with several shards, the one whose log is watched).
    let cluster = Cluster::start(3, tuning(20, 0)).await;
    let lagging = cluster.follower().await;
    let first = names_in("first", 5, 1, cluster.shards);
    cluster.write_majority(&cluster.ids, &first).await;
    cluster.converged(&cluster.ids, &set(&[&first])).await;

    cluster.net.isolate(lagging, &cluster.ids);
    // One log entry per write (sequential), well past two snapshots.
    let mut missed = Vec::new();
    let majority = without(&cluster.ids, lagging);
    for name in names_in("missed", 60, 1, cluster.shards) {
        let one = vec![name];
        cluster.write_majority(&majority, &one).await;
        missed.extend(one);
    }
    let leader = cluster.agreed_leader(&majority, None).await;
    let leader_raft = cluster.node(leader).raft.clone();
    leader_raft
        .wait(Some(Duration::from_secs(20)))
        .metrics(
            |m| {
                m.snapshot.is_some_and(|s| s.index >= 40) && m.purged.is_some_and(|p| p.index >= 40)
            },
            "leader snapshotted and purged its log",
        )
        .await
        .expect("the leader compacts its log");
    let lagging_applied = cluster
        .node(lagging)
        .raft
        .metrics()
        .borrow()
        .last_applied
        .map_or(0, |l| l.index);
    let purged = leader_raft.metrics().borrow().purged.map_or(0, |p| p.index);
    assert!(
        lagging_applied < purged,
        "the lagging node ({lagging_applied}) must be behind the purged log ({purged})"
    );

    cluster.heal_and_converge(&set(&[&first, &missed])).await;
    let snapshot = cluster.node(lagging).raft.metrics().borrow().snapshot;
    assert!(
        snapshot.is_some_and(|s| s.index >= purged),
        "node {lagging} caught up without a snapshot at or past {purged}: {snapshot:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_node_restarts_from_its_data_dir_and_catches_up() {
    let tuning = tuning(10_000, 1_000);
    let mut cluster = Cluster::start(3, tuning).await;
    let before = names("before", 10);
    cluster.write_majority(&cluster.ids, &before).await;
    let leader = cluster.leader().await;

    // Stop the leader itself; the survivors elect a new one and keep committing.
    cluster.stop(leader).await;
    let survivors = without(&cluster.ids, leader);
    let new = cluster.agreed_leader(&survivors, Some(leader)).await;
    assert_ne!(new, leader);
    let during = names("during", 10);
    cluster.write_majority(&survivors, &during).await;

    cluster.boot(leader, tuning).await;
    cluster
        .converged(&cluster.ids, &set(&[&before, &during]))
        .await;
    cluster.shutdown().await;
}
