//! Commits whose outcome the proposer lost: a follower's forwarded proposal is held up on its
//! way to the leader until after the proposer gave up (or the leader's reply is lost). The
//! client resends through a new connection, whose claim fences the old one's proposals: a late
//! copy never takes effect after the claim, so a QoS 2 message is stored once.

use super::*;
use raftmq_codec::QoS;
use raftmq_core::durability::{Fence, MessageId, StoredTarget};

/// One-shot rules for forwarded proposals and their replies
/// ([`FaultInjector::forwarded`]), armed per proposing node.
#[derive(Debug, Default)]
pub(crate) struct ForwardRules {
    /// Proposers whose next forwarded proposal is held up this long on its way to the leader.
    delay_next_request: Mutex<HashMap<NodeId, Duration>>,
    /// Proposers that lose the leader's reply to their next forwarded proposal.
    drop_next_reply: Mutex<HashSet<NodeId>>,
    /// Replies to forwarded proposals (one per proposal the leader handled), counted for the
    /// proposers listed.
    replies: Mutex<HashMap<NodeId, u64>>,
    /// Proposers whose forwarded proposals are all lost until [`Net::heal_forwarded`] (Raft's
    /// own traffic flows).
    cut_requests: Mutex<HashSet<NodeId>>,
}

impl ForwardRules {
    fn replies_to(&self, proposer: NodeId) -> u64 {
        self.replies.lock().get(&proposer).copied().unwrap_or(0)
    }
}

impl Net {
    /// Loses the leader's reply to the next proposal `proposer` forwards.
    pub(crate) fn lose_next_reply_to(&self, proposer: NodeId) {
        self.forwarded.drop_next_reply.lock().insert(proposer);
    }

    /// Whether a reply armed by [`Net::lose_next_reply_to`] is still to be lost.
    pub(crate) fn reply_loss_armed(&self, proposer: NodeId) -> bool {
        self.forwarded.drop_next_reply.lock().contains(&proposer)
    }

    /// Loses every proposal `proposer` forwards to the leader until [`Net::heal_forwarded`].
    pub(crate) fn cut_forwarded_from(&self, proposer: NodeId) {
        self.forwarded.cut_requests.lock().insert(proposer);
    }

    /// Ends every [`Net::cut_forwarded_from`].
    pub(crate) fn heal_forwarded(&self) {
        self.forwarded.cut_requests.lock().clear();
    }

    /// The fate of a forwarded proposal or of its reply: an armed one-shot rule, else the
    /// links' rules.
    pub(crate) fn forwarded_fault(&self, from: NodeId, to: NodeId) -> Fault {
        let rules = &self.forwarded;
        if rules.cut_requests.lock().contains(&from) {
            return Fault::Drop;
        }
        if let Some(d) = rules.delay_next_request.lock().remove(&from) {
            return Fault::Delay(d);
        }
        if let Some(n) = rules.replies.lock().get_mut(&to) {
            *n += 1;
        }
        if rules.drop_next_reply.lock().remove(&to) {
            return Fault::Drop;
        }
        self.fault(from, to)
    }
}

/// The claim of persistent session `client` (expiry 3600 s) with `epoch`.
pub(crate) fn claim(client: &str, epoch: u64) -> StateChange {
    StateChange::SessionOpened {
        client_id: ByteStr::from(client),
        epoch,
        clean_start: false,
        expiry_secs: 3600,
        will: None,
    }
}

/// What a node's broker proposes for a QoS 2 PUBLISH (packet id `pid`) of the persistent
/// session `pub` matching the persistent session `sub`: the packet id record and the message
/// stored for `sub`.
fn qos2_publish(pid: u16, id: MessageId) -> Vec<StateChange> {
    vec![
        StateChange::IncomingQos2Received {
            client_id: ByteStr::from("pub"),
            packet_id: pid,
            message_id: Some(id),
        },
        StateChange::MessageStored {
            id,
            message: super::sharded::qos2_message(),
            targets: vec![StoredTarget {
                client_id: ByteStr::from("sub"),
                qos: QoS::ExactlyOnce,
                retain: false,
                subscription_ids: Default::default(),
            }],
        },
    ]
}

impl Cluster {
    /// Proposes `changes` through node `via` (under `fence`), waiting for the outcome.
    pub(crate) async fn propose(
        &self,
        via: NodeId,
        fence: Option<Fence>,
        changes: Vec<StateChange>,
    ) -> Result<(), DurabilityError> {
        let durability = &self.node(via).durability;
        let commit = match fence {
            Some(fence) => durability.propose_fenced(fence, changes),
            None => durability.propose(changes),
        };
        tokio::time::timeout(WRITE_TIMEOUT, commit)
            .await
            .expect("a durable write neither committed nor failed within the timeout")
    }

    /// The messages stored for `sub` and the incoming QoS 2 packet ids of `pub` on node `id`.
    fn qos2_state(&self, id: NodeId) -> (usize, Vec<u16>) {
        let state = self
            .node(id)
            .durability
            .replicated_state()
            .expect("the state is readable");
        let of = |client: &str| {
            state
                .sessions
                .iter()
                .find(|s| s.client_id.as_str() == client)
        };
        (
            of("sub").map_or(0, |s| s.messages.len()),
            of("pub").map_or_else(Vec::new, |s| s.incoming_qos2.clone()),
        )
    }

    /// Holds up `proposer`'s next forwarded proposal by `hold`, proposes `changes` through it
    /// (under `fence`), expects the proposer to give up before the proposal is delivered, then
    /// runs `meanwhile`, and finally waits until the held-up copy has been handled by the
    /// leader and every node has applied everything the leader had applied by then.
    async fn late_copy<F: std::future::Future<Output = ()>>(
        &self,
        proposer: NodeId,
        fence: Option<Fence>,
        changes: Vec<StateChange>,
        meanwhile: F,
    ) {
        let hold = Duration::from_secs(9);
        self.net
            .forwarded
            .delay_next_request
            .lock()
            .insert(proposer, hold);
        self.net.forwarded.replies.lock().insert(proposer, 0);
        let started = tokio::time::Instant::now();
        assert_eq!(
            self.propose(proposer, fence, changes).await,
            Err(DurabilityError::Unavailable),
            "a proposal held up on its way to the leader was reported committed"
        );
        assert!(
            started.elapsed() < hold,
            "the proposer only gave up once the held-up proposal was delivered"
        );
        meanwhile.await;
        eventually(
            "the held-up proposal is handled by the leader",
            hold + WRITE_TIMEOUT,
            || {
                let handled = self.net.forwarded.replies_to(proposer) > 0;
                async move { handled }
            },
        )
        .await;
        self.all_applied_what_the_leader_applied().await;
    }

    /// Waits until every node has applied what the leader has applied now.
    async fn all_applied_what_the_leader_applied(&self) {
        let leader = self.leader().await;
        let index = self
            .node(leader)
            .raft
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        for &id in &self.ids {
            self.node(id)
                .raft
                .wait(Some(CONVERGE_TIMEOUT))
                .applied_index_at_least(Some(index), "the leader's entries applied")
                .await
                .expect("every node applies what the leader applied");
        }
    }
}

/// The fence of `pub`'s connection of claim `epoch`.
fn pub_connection(epoch: u64) -> Fence {
    Fence::Attached {
        client_id: ByteStr::from("pub"),
        epoch,
    }
}

impl Cluster {
    /// `pub` reconnects through node `via` (claim 20).
    async fn reclaim_pub(&self, via: NodeId) {
        self.propose(via, None, vec![claim("pub", 20)])
            .await
            .expect("the new claim commits");
    }
}

/// A 3-node cluster (with its leader and a follower) where `pub` (claim 10) and `sub` (claim
/// 11) were claimed through the follower. One shard: these are the hazards of one log, which
/// every shard's log has in the same way (a session's claim and what it fences share a
/// shard); a publish spanning shards is in `sharded`.
async fn claimed_through_a_follower() -> (Cluster, NodeId, NodeId) {
    let cluster = Cluster::start_full(
        3,
        tuning(10_000, 1_000),
        false,
        Transport::Plain,
        ShardCount::ONE,
    )
    .await;
    let leader = cluster.leader().await;
    let follower = without(&cluster.ids, leader)[0];
    cluster
        .propose(follower, None, vec![claim("pub", 10), claim("sub", 11)])
        .await
        .expect("the claims commit");
    (cluster, leader, follower)
}

/// The QoS 2 duplicate of the reliability issue, at the Raft layer: a publisher's QoS 2
/// PUBLISH is proposed through a follower whose forward is held up; the proposer gives up
/// (the broker closes the connection without PUBREC); the client reconnects through another
/// node (a new claim) and resends, which is stored. When the held-up copy finally commits, it
/// must not store the message a second time on any node. The same late copy without a fence
/// does (checked last), which is the duplicate this prevents.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_late_copy_of_a_fenced_proposal_takes_no_effect_after_the_client_reconnected() {
    // The publisher's first connection is on the follower (claim 10); the subscriber's
    // session exists.
    let (cluster, leader, follower) = claimed_through_a_follower().await;
    let first_connection = pub_connection(10);

    // The QoS 2 PUBLISH (packet id 5) through the first connection is held up; meanwhile the
    // client reconnects through the leader (claim 20) and resends it there.
    let resend = async {
        cluster.reclaim_pub(leader).await;
        assert_eq!(
            cluster.qos2_state(leader),
            (0, vec![]),
            "nothing of the held-up proposal is applied yet"
        );
        cluster
            .propose(
                leader,
                Some(pub_connection(20)),
                qos2_publish(5, MessageId(2 << 48 | 7)),
            )
            .await
            .expect("the resend commits");
    };
    cluster
        .late_copy(
            follower,
            Some(first_connection),
            qos2_publish(5, MessageId(1 << 48 | 7)),
            resend,
        )
        .await;
    for &id in &cluster.ids {
        assert_eq!(
            cluster.qos2_state(id),
            (1, vec![5]),
            "node {id}: the message is stored once, its packet id recorded once"
        );
    }

    // Without the fence, the same late copy stores the message again.
    cluster
        .late_copy(
            follower,
            None,
            qos2_publish(5, MessageId(1 << 48 | 8)),
            async {},
        )
        .await;
    for &id in &cluster.ids {
        assert_eq!(
            cluster.qos2_state(id).0,
            2,
            "node {id}: an unfenced late copy takes effect (the hazard the fence removes)"
        );
    }
    cluster.shutdown().await;
}

/// A fenced proposal whose reply is lost after it committed is reported as failed (the
/// proposer cannot tell); it did take effect, so the client's reconnection finds its packet id
/// recorded and the resend is recognised as a duplicate (the broker answers PUBREC without
/// storing it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_committed_proposal_whose_reply_was_lost_is_in_the_state_the_next_claim_loads() {
    let (cluster, leader, follower) = claimed_through_a_follower().await;
    cluster
        .net
        .forwarded
        .drop_next_reply
        .lock()
        .insert(follower);
    let outcome = cluster
        .propose(
            follower,
            Some(pub_connection(10)),
            qos2_publish(5, MessageId(1 << 48 | 7)),
        )
        .await;
    assert!(
        !cluster
            .net
            .forwarded
            .drop_next_reply
            .lock()
            .contains(&follower),
        "the reply to the forwarded proposal was never dropped"
    );
    assert_eq!(outcome, Err(DurabilityError::Unavailable));
    cluster.reclaim_pub(leader).await;
    assert_eq!(
        cluster.qos2_state(leader),
        (1, vec![5]),
        "the new connection loads the committed message and its packet id"
    );
    cluster.shutdown().await;
}

/// What one connection proposes takes effect in order, as a prefix: once one of its proposals
/// failed (here held up on its way to the leader until the proposer gave up), its later
/// proposals, queued behind it, are refused without being proposed, while another
/// connection's go through. Without it the later one committed while the earlier one had
/// failed: the client resent the earlier message, which subscribers then got after the later
/// one (checker rule `out_of_order`), or a session recorded a later delivery as sent while an
/// earlier one was not, and resent the later one first when it resumed elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn after_a_proposal_of_a_connection_failed_its_later_ones_are_refused() {
    let (cluster, _leader, follower) = claimed_through_a_follower().await;
    let durability = cluster.node(follower).durability.clone();
    let hold = Duration::from_secs(9);
    cluster
        .net
        .forwarded
        .delay_next_request
        .lock()
        .insert(follower, hold);
    cluster.net.forwarded.replies.lock().insert(follower, 0);
    let connection = (ByteStr::from("pub"), 10);
    let started = tokio::time::Instant::now();
    let first = durability.propose_chained(connection.clone(), None, vec![session("first")]);
    // The first is on its way (held up) before the next ones are proposed: they wait behind
    // it in the batcher.
    eventually(
        "the first proposal was forwarded",
        Duration::from_secs(5),
        || {
            let sent = !cluster
                .net
                .forwarded
                .delay_next_request
                .lock()
                .contains_key(&follower);
            async move { sent }
        },
    )
    .await;
    let second = durability.propose_chained(connection.clone(), None, vec![session("second")]);
    let other =
        durability.propose_chained((ByteStr::from("sub"), 11), None, vec![session("other")]);
    assert_eq!(
        first.await,
        Err(DurabilityError::Unavailable),
        "a proposal held up on its way to the leader was reported committed"
    );
    assert!(
        started.elapsed() < hold,
        "the proposer waited for the held-up proposal"
    );
    assert_eq!(
        second.await,
        Err(DurabilityError::Unavailable),
        "a connection's proposal after one that failed was not refused"
    );
    other
        .await
        .expect("another connection's proposal is not held back by it");
    // Once the held-up copy has reached the leader (it may commit late: a prefix still), the
    // later proposal is nowhere.
    eventually(
        "the held-up proposal is handled by the leader",
        hold + WRITE_TIMEOUT,
        || {
            let handled = cluster.net.forwarded.replies_to(follower) > 0;
            async move { handled }
        },
    )
    .await;
    cluster.all_applied_what_the_leader_applied().await;
    for &id in &cluster.ids {
        assert!(cluster.sessions(id).contains("other"));
        assert!(
            !cluster.sessions(id).contains("second"),
            "node {id}: a connection's later proposal took effect after its earlier one failed"
        );
    }
    cluster.shutdown().await;
}
