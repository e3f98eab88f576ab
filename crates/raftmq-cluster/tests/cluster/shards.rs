//! Several data groups on every node (RFC 0002, step 2a): every shard elects a leader and
//! replicates, keeps committing with a node cut off, a restarted node rejoins every group from
//! its store, a fourth node joins and leaves every group (resuming an interrupted join), one
//! channel per peer serves every group, a request for a shard a node does not run is answered
//! NOT_FOUND without disturbing the others, and the shard count is fixed at creation.

use super::*;
use prost::Message as _;
use raftmq_cluster::groups::ShardStatus;
use raftmq_cluster::node::{AdminError, NodeError};
use raftmq_cluster::types::{Raft, Request};
use raftmq_proto::raft as pb;

const SHARDS: u32 = 4;

impl Cluster {
    /// `n` nodes with `cluster.shards = shards`, node 1 bootstrapping; returns once every node
    /// is a voter of every group and each group has a leader.
    async fn start_sharded(n: u64, shards: u32) -> Cluster {
        let count = ShardCount::new(shards).expect("a valid shard count");
        let cluster =
            Self::start_full(n, tuning(10_000, 1_000), false, Transport::Plain, count).await;
        let all: BTreeSet<NodeId> = cluster.ids.iter().copied().collect();
        cluster.groups_settled(&cluster.ids, &all).await;
        cluster
    }

    /// Node `id`'s Raft of shard `shard`.
    fn group(&self, id: NodeId, shard: u32) -> Raft {
        self.node(id)
            .groups()
            .get(ShardId::new(shard))
            .expect("the node runs the shard")
            .clone()
    }

    /// Waits until, on every node of `on`, every group has exactly the voters `voters` (one
    /// settled configuration, no learner) and knows a leader among them.
    async fn groups_settled(&self, on: &[NodeId], voters: &BTreeSet<NodeId>) {
        for &id in on {
            for shard in 1..=self.shards.get() {
                let what = format!("node {id}, shard {shard}: voters {voters:?} and a leader");
                self.group(id, shard)
                    .wait(Some(FORM_TIMEOUT))
                    .metrics(
                        |m| {
                            let membership = m.membership_config.membership();
                            membership.get_joint_config().len() == 1
                                && membership.voter_ids().collect::<BTreeSet<_>>() == *voters
                                && membership.nodes().count() == voters.len()
                                && m.current_leader.is_some_and(|l| voters.contains(&l))
                        },
                        &what,
                    )
                    .await
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
            }
        }
    }

    /// Commits an empty batch of shard `shard` through the leader the nodes of `among` agree
    /// on (retrying across a leader change); returns its log index.
    async fn barrier(&self, among: &[NodeId], shard: u32) -> u64 {
        let batch = raftmq_proto::state::Batch {
            shard_id: u64::from(shard),
            ..Default::default()
        }
        .encode_to_vec();
        let what = format!("an empty batch of shard {shard} committed by one of {among:?}");
        raftmq_tests::poll(&what, FORM_TIMEOUT, Duration::from_millis(100), || {
            let batch = batch.clone();
            let leaders: BTreeSet<Option<NodeId>> = among
                .iter()
                .map(|&id| self.group(id, shard).metrics().borrow().current_leader)
                .collect();
            let leader = match leaders.iter().collect::<Vec<_>>().as_slice() {
                [Some(l)] if among.contains(l) => Some(self.group(*l, shard)),
                _ => None,
            };
            async move {
                let Some(raft) = leader else {
                    return Err(format!("no agreed leader: {leaders:?}"));
                };
                let write = raft.client_write(Request { batch });
                match tokio::time::timeout(Duration::from_secs(5), write).await {
                    Ok(Ok(resp)) => Ok(resp.log_id.index),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("timed out".to_owned()),
                }
            }
        })
        .await
    }

    /// Waits until every node of `on` has applied shard `shard` up to `index`.
    async fn applied_in(&self, on: &[NodeId], shard: u32, index: u64) {
        for &id in on {
            let what = format!("node {id} applied shard {shard} up to {index}");
            self.group(id, shard)
                .wait(Some(CONVERGE_TIMEOUT))
                .metrics(|m| m.last_applied.is_some_and(|l| l.index >= index), &what)
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
        }
    }

    /// Makes room for node `id` (address and data dir) so that [`Cluster::boot`] can start it.
    fn add_slot(&mut self, id: NodeId) {
        self.addrs.insert(id, free_addr().to_string());
        self.dirs.insert(id, tempfile::tempdir().expect("temp dir"));
    }
}

fn ids(set: &[NodeId]) -> BTreeSet<NodeId> {
    set.iter().copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_shard_elects_a_leader_and_replicates_to_every_node_over_one_channel_per_peer() {
    let cluster = Cluster::start_sharded(3, SHARDS).await;
    for shard in 1..=SHARDS {
        let index = cluster.barrier(&cluster.ids, shard).await;
        cluster.applied_in(&cluster.ids, shard, index).await;
    }

    // The admin API's view: every shard, its leader and its voters.
    let status = cluster.node(1).status();
    assert_eq!(status.shard_count, SHARDS);
    let shards: Vec<(u32, Vec<NodeId>, Vec<NodeId>)> = status
        .shards
        .iter()
        .map(|s: &ShardStatus| (s.id, s.voters.clone(), s.learners.clone()))
        .collect();
    assert_eq!(
        shards,
        (1..=SHARDS)
            .map(|id| (id, vec![1, 2, 3], Vec::new()))
            .collect::<Vec<_>>()
    );
    assert!(
        status.shards.iter().all(|s| s.leader.is_some()),
        "{status:?}"
    );

    // Every node holds every shard; the leaders add up to the shard count.
    let mut leaders = 0;
    for &id in &cluster.ids {
        let (led, replicas) = cluster.node(id).groups().leaders_and_replicas();
        assert_eq!(
            replicas, SHARDS as usize,
            "node {id} is a voter of every shard"
        );
        leaders += led;
    }
    assert_eq!(leaders, SHARDS as usize, "one leader per shard");

    // One channel per peer, whatever the number of groups using it: every group leader
    // replicates to both peers (a channel per group and peer would be 2 per led group).
    for &id in &cluster.ids {
        let created = cluster.node(id).peer_pool().channels_created();
        assert!(created <= 2, "node {id} made {created} channels to 2 peers");
        let leads = cluster
            .node(id)
            .groups()
            .iter()
            .any(|(_, raft)| raft.metrics().borrow().current_leader == Some(id));
        if leads {
            assert_eq!(
                created, 2,
                "node {id} leads a group: a channel to each peer"
            );
        }
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_shard_commits_while_a_node_is_cut_off_and_catches_up_after() {
    let cluster = Cluster::start_sharded(3, SHARDS).await;
    // Cut off the leader of shard 2, so at least that group elects a new leader.
    let victim = cluster
        .group(1, 2)
        .metrics()
        .borrow()
        .current_leader
        .expect("settled groups know their leader");
    cluster.net.isolate(victim, &cluster.ids);
    let rest = without(&cluster.ids, victim);
    let mut committed = Vec::new();
    for shard in 1..=SHARDS {
        let index = cluster.barrier(&rest, shard).await;
        cluster.applied_in(&rest, shard, index).await;
        committed.push((shard, index));
    }
    for &(shard, index) in &committed {
        let applied = cluster
            .group(victim, shard)
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        assert!(
            applied < index,
            "the cut-off node cannot have applied shard {shard} at {index}"
        );
    }
    cluster.net.heal();
    for &(shard, index) in &committed {
        cluster.applied_in(&[victim], shard, index).await;
    }
    cluster
        .groups_settled(&cluster.ids, &ids(&cluster.ids))
        .await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restarted_node_rejoins_every_shard_from_its_store() {
    let mut cluster = Cluster::start_sharded(3, SHARDS).await;
    cluster.stop(3).await;
    let mut committed = Vec::new();
    for shard in 1..=SHARDS {
        committed.push((shard, cluster.barrier(&[1, 2], shard).await));
    }
    // Node 1, the seed node 3 would join through, is gone too: node 3 can only come back from
    // the memberships in its store, and with node 2 it is a majority of every group.
    cluster.stop(1).await;
    cluster.boot(3, tuning(10_000, 1_000)).await;
    for &(shard, index) in &committed {
        cluster.applied_in(&[3], shard, index).await;
        let index = cluster.barrier(&[2, 3], shard).await;
        cluster.applied_in(&[2, 3], shard, index).await;
    }
    for shard in cluster.node(3).groups().status() {
        assert_eq!(shard.voters, vec![1, 2, 3], "{shard:?}");
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fourth_node_joins_every_shard_resuming_an_interrupted_join_and_leaves_every_shard() {
    let mut cluster = Cluster::start_sharded(3, SHARDS).await;
    let three = ids(&cluster.ids);
    let four = ids(&[1, 2, 3, 4]);
    cluster.add_slot(4);
    // Shard 3's traffic cannot reach node 4: it joins the other groups, and its own group of
    // shard 3 hears from no leader (openraft's leader may still list it, as an unreachable
    // voter: a learner within `replication_lag_threshold` counts as caught up).
    cluster.net.isolate_shard(3, 4, &[1, 2, 3, 4]);
    cluster.boot(4, tuning(10_000, 1_000)).await;
    for shard in [1, 2, 4] {
        let what = format!("node 4 sees itself a voter of shard {shard} (settled)");
        cluster
            .group(4, shard)
            .wait(Some(FORM_TIMEOUT))
            .metrics(
                |m| {
                    let joint = m.membership_config.membership().get_joint_config();
                    joint.len() == 1 && joint[0].contains(&4)
                },
                &what,
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let alone = cluster.group(4, 3).metrics().borrow().clone();
    assert_eq!(
        alone.membership_config.membership().nodes().count(),
        0,
        "node 4 has heard nothing of shard 3: {:?}",
        alone.membership_config
    );

    // Interrupted: node 4 stops midway and comes back with shard 3 reachable, from its store
    // (three groups joined, one not): it finishes joining.
    cluster.stop(4).await;
    cluster.net.heal();
    cluster.boot(4, tuning(10_000, 1_000)).await;
    cluster.groups_settled(&[1, 2, 3, 4], &four).await;
    for shard in 1..=SHARDS {
        let index = cluster.barrier(&[1, 2, 3, 4], shard).await;
        cluster.applied_in(&[4], shard, index).await;
    }

    // A join that changed some groups and not others: node 4 leaves shard 3 only. Adding it
    // again (through any node, idempotent) completes shard 3 and leaves the others as they are.
    leave_group(&cluster.addrs[&2], 4, 3).await;
    for id in 1..=3 {
        let what = format!("node {id}: shard 3 without node 4");
        cluster
            .group(id, 3)
            .wait(Some(FORM_TIMEOUT))
            .metrics(
                |m| m.membership_config.membership().get_node(&4).is_none(),
                &what,
            )
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    let node4 = raftmq_cluster::types::ClusterNode {
        cluster_addr: cluster.addrs[&4].clone(),
        mqtt_addr: String::new(),
    };
    cluster
        .node(2)
        .add_node(4, node4)
        .await
        .expect("node 4 added again");
    cluster.groups_settled(&[1, 2, 3, 4], &four).await;

    // Removing it takes it out of every group; removing it again is refused as unknown.
    cluster
        .node(1)
        .remove_node(4)
        .await
        .expect("node 4 removed");
    cluster.groups_settled(&[1, 2, 3], &three).await;
    assert!(
        matches!(
            cluster.node(1).remove_node(4).await,
            Err(AdminError::UnknownNode(4))
        ),
        "a removed node is no member"
    );
    cluster.stop(4).await;
    cluster.shutdown().await;
}

/// Removes node `node` from group `shard` alone, through the node at `addr` (following the
/// group's leader).
async fn leave_group(addr: &str, node: NodeId, shard: u32) {
    let mut addr = addr.to_owned();
    for _ in 0..4 {
        let mut client =
            raftmq_cluster::network::cluster_client(&addr, None).expect("cluster client");
        let req = pb::LeaveRequest {
            node_id: node,
            shard_id: u64::from(shard),
        };
        let resp = tokio::time::timeout(WRITE_TIMEOUT, client.leave(req))
            .await
            .expect("leave answered")
            .expect("leave accepted");
        match resp.into_inner().leader {
            Some(leader) => addr = leader.cluster_addr,
            None => return,
        }
    }
    panic!("no leader of shard {shard} found from {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_for_an_unknown_shard_is_not_found_and_leaves_the_others_alone() {
    let cluster = Cluster::start_sharded(3, SHARDS).await;
    let before: Vec<ShardStatus> = cluster.node(1).groups().status();
    let addr = cluster.addrs[&1].clone();
    let channel = raftmq_cluster::network::channel(&addr, None).expect("channel");
    let mut raft = pb::raft_service_client::RaftServiceClient::new(channel.clone());
    // A vote with a far higher term would depose the leader of a shard that had it.
    for shard_id in [0, u64::from(SHARDS) + 1, u64::from(u32::MAX) + 2] {
        let vote = pb::VoteRequest {
            shard_id,
            vote: Some(pb::Vote {
                term: 1_000,
                node_id: 2,
                committed: false,
            }),
            last_log_id: Some(pb::LogId {
                term: 999,
                leader_id: 2,
                index: 1_000_000,
            }),
        };
        let status = raft.vote(vote).await.expect_err("refused");
        assert_eq!(
            status.code(),
            tonic::Code::NotFound,
            "shard {shard_id}: {status}"
        );
        let append = pb::AppendEntriesRequest {
            shard_id,
            vote: Some(pb::Vote {
                term: 1_000,
                node_id: 2,
                committed: true,
            }),
            ..Default::default()
        };
        let status = raft.append_entries(append).await.expect_err("refused");
        assert_eq!(
            status.code(),
            tonic::Code::NotFound,
            "shard {shard_id}: {status}"
        );
        let snapshot = pb::InstallSnapshotRequest {
            shard_id,
            ..Default::default()
        };
        let status = raft.install_snapshot(snapshot).await.expect_err("refused");
        assert_eq!(
            status.code(),
            tonic::Code::NotFound,
            "shard {shard_id}: {status}"
        );
    }
    let mut admin = pb::cluster_service_client::ClusterServiceClient::new(channel);
    let join = pb::JoinRequest {
        node_id: 9,
        node: None,
        shard_id: u64::from(SHARDS) + 1,
        shards: SHARDS,
    };
    let status = admin.join(join).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status}");
    // A node configured for another shard count is refused, naming the key and both values.
    let join = pb::JoinRequest {
        node_id: 9,
        node: None,
        shard_id: 1,
        shards: 2,
    };
    let status = admin.join(join).await.expect_err("refused");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status}");
    for needle in ["cluster.shards = 2", "cluster.shards = 4"] {
        assert!(status.message().contains(needle), "{status}");
    }

    // Nothing changed: same leaders and terms, and every shard still commits.
    let after = cluster.node(1).groups().status();
    let view = |s: &[ShardStatus]| -> Vec<(u32, Option<NodeId>, u64)> {
        s.iter().map(|s| (s.id, s.leader, s.term)).collect()
    };
    assert_eq!(view(&after), view(&before));
    for shard in 1..=SHARDS {
        let index = cluster.barrier(&cluster.ids, shard).await;
        cluster.applied_in(&cluster.ids, shard, index).await;
    }
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_keeps_the_shard_count_it_was_created_with() {
    init_logs();
    let dir = tempfile::tempdir().expect("temp dir");
    let data_dir = dir.path().join("data");
    let start = |shards: u32| {
        let mut opts = NodeOptions::new(
            1,
            free_addr().to_string(),
            String::new(),
            Vec::new(),
            data_dir.clone(),
        );
        opts.tuning = tuning(10_000, 1_000);
        opts.shards = ShardCount::new(shards).expect("a valid shard count");
        RaftNode::start(opts)
    };
    let node = start(4).await.expect("a new data dir takes any count");
    assert_eq!(node.groups().count(), 4);
    node.shutdown().await;

    let refused = start(2).await.err().expect("another count is refused");
    assert!(
        matches!(
            refused,
            NodeError::ShardCount {
                configured: 2,
                recorded: 4,
                ..
            }
        ),
        "{refused:?}"
    );
    let message = refused.to_string();
    for needle in ["cluster.shards is 2", "cluster.shards = 4"] {
        assert!(message.contains(needle), "{message}");
    }

    let node = start(4).await.expect("the recorded count starts");
    assert_eq!(node.groups().count(), 4);
    for (_, raft) in node.groups().iter() {
        raft.wait(Some(FORM_TIMEOUT))
            .metrics(
                |m| m.current_leader == Some(1),
                "a single node leads its groups",
            )
            .await
            .expect("every group of a single node elects it");
    }
    node.shutdown().await;

    // A data dir written before the count was recorded holds one data group: its count is 1.
    let legacy = tempfile::tempdir().expect("temp dir");
    {
        use openraft::storage::RaftLogStorage as _;
        let store = raftmq_store::Store::open(legacy.path().join("data").join("raft"))
            .expect("store opens");
        let mut log = store.log_store::<raftmq_cluster::types::TypeConfig>(1);
        log.save_vote(&openraft::Vote::new(1, 1))
            .await
            .expect("vote saved");
    }
    let mut opts = NodeOptions::new(
        1,
        free_addr().to_string(),
        String::new(),
        Vec::new(),
        legacy.path().join("data"),
    );
    opts.shards = ShardCount::new(4).expect("a valid shard count");
    let refused = RaftNode::start(opts).await.err().expect("refused");
    assert!(
        matches!(
            refused,
            NodeError::ShardCount {
                configured: 4,
                recorded: 1,
                ..
            }
        ),
        "{refused:?}"
    );

    // A count recorded in a data dir without any Raft state yet (a node whose join was refused
    // for its count) is replaced by the configured one: nothing depends on it.
    let unused = tempfile::tempdir().expect("temp dir");
    raftmq_store::Store::open(unused.path().join("data").join("raft"))
        .expect("store opens")
        .record_shard_count(2)
        .expect("count recorded");
    let mut opts = NodeOptions::new(
        1,
        free_addr().to_string(),
        String::new(),
        Vec::new(),
        unused.path().join("data"),
    );
    opts.shards = ShardCount::new(4).expect("a valid shard count");
    let node = RaftNode::start(opts)
        .await
        .expect("an unused count is replaced");
    assert_eq!(node.groups().count(), 4);
    node.shutdown().await;
}
