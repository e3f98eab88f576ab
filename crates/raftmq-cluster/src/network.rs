//! The Raft network client: openraft's `RaftNetwork` over tonic gRPC to each peer's
//! `raftmq.raft.v1.RaftService`, plus a client for the leader's `ClusterService` (forwarded
//! proposals, join). Channels connect lazily and reconnect by themselves; an unreachable peer
//! is reported as `Unreachable` so openraft backs off. With [`ClusterTls`] every channel is
//! mutual TLS: this node presents its certificate and verifies the peer's.

use crate::peers::PeerPool;
use crate::raft_proto::{self as conv, WireError};
use crate::types::{ClusterNode, NodeId, ShardId, TypeConfig};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use raftmq_proto::raft::cluster_service_client::ClusterServiceClient;
use raftmq_proto::raft::raft_service_client::RaftServiceClient;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How long to wait for a TCP connection to a peer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Largest gRPC message between nodes. tonic's default (4 MiB) is far below what a leader sends
/// a lagging follower (up to `max_payload_entries` group-commit batches): at that limit every
/// catch-up append would be refused and retried forever.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

/// Mutual TLS for this node's outgoing cluster connections: the node presents its certificate
/// (`cert`, `key`) and accepts a peer only if the peer's certificate chains to `ca` and names
/// the host part of the peer's cluster address (a DNS or IP subject alternative name).
#[derive(Clone, Debug)]
pub struct ClusterTls {
    config: ClientTlsConfig,
}

impl ClusterTls {
    /// From PEM: the node's certificate chain (leaf first), its private key, and the CA
    /// certificates peers' certificates must chain to. The files are checked when loaded (the
    /// binary does it at startup); a bad certificate here makes every connection fail.
    pub fn from_pem(cert: &[u8], key: &[u8], ca: &[u8]) -> Self {
        ClusterTls {
            config: ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(ca))
                .identity(Identity::from_pem(cert, key))
                .timeout(CONNECT_TIMEOUT),
        }
    }
}

/// A lazily connecting channel to `addr` (host:port), over mutual TLS when `tls` is given, or
/// an error naming it.
pub fn channel(addr: &str, tls: Option<&ClusterTls>) -> Result<Channel, tonic::transport::Error> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(tls) = tls {
        // The server name checked is the host of `addr` (tonic takes it from the URI).
        endpoint = endpoint.tls_config(tls.config.clone())?;
    }
    Ok(endpoint.connect_lazy())
}

/// A client of a node's `ClusterService`.
pub fn cluster_client(
    addr: &str,
    tls: Option<&ClusterTls>,
) -> Result<ClusterServiceClient<Channel>, tonic::transport::Error> {
    Ok(ClusterServiceClient::new(channel(addr, tls)?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// What the network does with one message from one node to another (see [`FaultInjector`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Deliver it normally.
    Deliver,
    /// Lose it: the sender sees the peer as unreachable.
    Drop,
    /// Deliver it after this long.
    Delay(Duration),
}

/// A hook consulted before every Raft RPC leaves a node and before its response is accepted,
/// so tests can partition, isolate, slow down or lose traffic between nodes while everything
/// else (gRPC, serialization, storage) stays real. Production nodes run without one.
pub trait FaultInjector: std::fmt::Debug + Send + Sync + 'static {
    /// The fate of a message sent by node `from` to node `to`.
    fn fault(&self, from: NodeId, to: NodeId) -> Fault;

    /// The fate of a Raft message of group `shard` from node `from` to node `to`. By default
    /// that of any other message between them; a test overrides it to cut or slow one group's
    /// traffic while the other groups' (sharing the same connection) flows.
    fn raft(&self, shard: ShardId, from: NodeId, to: NodeId) -> Fault {
        let _ = shard;
        self.fault(from, to)
    }

    /// The fate of a proposal forwarded by node `from` to the leader `to`, or of the leader's
    /// reply (`from` the leader, `to` the proposer). By default that of any other message
    /// between them; a test overrides it to hold up or lose one proposal or one reply while
    /// Raft's own traffic flows (the proposer then does not learn whether its batch committed).
    fn forwarded(&self, from: NodeId, to: NodeId) -> Fault {
        self.fault(from, to)
    }
}

/// Shared handle to an optional fault injector.
pub type Faults = Option<std::sync::Arc<dyn FaultInjector>>;

/// A partition described by a file (`cluster.faults_file`; for tests of real processes, which
/// all read the same file): one side per line, node ids separated by spaces or commas. Nodes on
/// different lines cannot reach each other; nodes on no line reach everyone. An empty or
/// missing file is a healthy network. Lines starting with `#` are comments. Re-read at most
/// every 100 ms.
#[derive(Debug)]
pub struct FileFaults {
    path: std::path::PathBuf,
    state: parking_lot::Mutex<(Option<std::time::Instant>, Vec<Vec<NodeId>>)>,
}

impl FileFaults {
    const REREAD: Duration = Duration::from_millis(100);

    pub fn new(path: std::path::PathBuf) -> Self {
        FileFaults {
            path,
            state: parking_lot::Mutex::new((None, Vec::new())),
        }
    }

    /// The sides described by `text` (see [`FileFaults`]); unreadable ids are ignored.
    pub fn parse(text: &str) -> Vec<Vec<NodeId>> {
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                l.split(|c: char| c == ',' || c.is_whitespace())
                    .filter_map(|id| id.parse().ok())
                    .collect::<Vec<NodeId>>()
            })
            .filter(|side| !side.is_empty())
            .collect()
    }
}

impl FaultInjector for FileFaults {
    fn fault(&self, from: NodeId, to: NodeId) -> Fault {
        let mut state = self.state.lock();
        let now = std::time::Instant::now();
        if state
            .0
            .is_none_or(|t| now.duration_since(t) >= Self::REREAD)
        {
            let text = std::fs::read_to_string(&self.path).unwrap_or_default();
            *state = (Some(now), Self::parse(&text));
        }
        let side = |n: NodeId| state.1.iter().position(|s| s.contains(&n));
        match (side(from), side(to)) {
            (Some(a), Some(b)) if a != b => Fault::Drop,
            _ => Fault::Deliver,
        }
    }
}

/// Applies the injector's verdict for a Raft message of group `shard` from `from` to `to`
/// ([`FaultInjector::raft`]): waits out a delay, or reports a drop.
pub(crate) async fn pass_raft(
    faults: &Faults,
    shard: ShardId,
    from: NodeId,
    to: NodeId,
) -> Result<(), Dropped> {
    pass_by(faults, from, to, |f| f.raft(shard, from, to)).await
}

/// [`pass_raft`] for a message between two nodes that belongs to no group (a node heartbeat):
/// [`FaultInjector::fault`].
pub(crate) async fn pass_node(faults: &Faults, from: NodeId, to: NodeId) -> Result<(), Dropped> {
    pass_by(faults, from, to, |f| f.fault(from, to)).await
}

/// [`pass_raft`] for a forwarded proposal or its reply ([`FaultInjector::forwarded`]).
pub(crate) async fn pass_forwarded(
    faults: &Faults,
    from: NodeId,
    to: NodeId,
) -> Result<(), Dropped> {
    pass_by(faults, from, to, |f| f.forwarded(from, to)).await
}

async fn pass_by(
    faults: &Faults,
    from: NodeId,
    to: NodeId,
    verdict: impl Fn(&dyn FaultInjector) -> Fault,
) -> Result<(), Dropped> {
    let Some(faults) = faults else {
        return Ok(());
    };
    match verdict(faults.as_ref()) {
        Fault::Deliver => Ok(()),
        Fault::Drop => Err(Dropped { from, to }),
        Fault::Delay(d) => {
            tokio::time::sleep(d).await;
            // The link may have been cut while the message was in flight.
            match faults.fault(from, to) {
                Fault::Drop => Err(Dropped { from, to }),
                _ => Ok(()),
            }
        }
    }
}

/// A message lost by fault injection.
#[derive(Debug, thiserror::Error)]
#[error("message from node {from} to node {to} dropped by fault injection")]
pub struct Dropped {
    pub from: NodeId,
    pub to: NodeId,
}

/// Creates [`PeerClient`]s for openraft: one factory per Raft group, every group's clients
/// sharing the node's [`PeerPool`] (one channel per peer).
#[derive(Clone, Debug)]
pub struct Network {
    shard_id: ShardId,
    node_id: NodeId,
    faults: Faults,
    pool: Arc<PeerPool>,
}

impl Network {
    /// The network of shard `shard_id` as seen from node `node_id`, over the channels of
    /// `pool` (which carries the node's mutual TLS settings).
    pub fn new(shard_id: ShardId, node_id: NodeId, pool: Arc<PeerPool>) -> Self {
        Network {
            shard_id,
            node_id,
            faults: None,
            pool,
        }
    }

    /// Routes every RPC through `faults` first (tests).
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.faults = faults;
        self
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &ClusterNode) -> PeerClient {
        PeerClient {
            shard_id: self.shard_id,
            me: self.node_id,
            faults: self.faults.clone(),
            target,
            client: self.pool.channel(target, &node.cluster_addr).map(|ch| {
                RaftServiceClient::new(ch)
                    .max_decoding_message_size(MAX_MESSAGE_BYTES)
                    .max_encoding_message_size(MAX_MESSAGE_BYTES)
            }),
        }
    }
}

/// The connection to one peer, for one group.
pub struct PeerClient {
    shard_id: ShardId,
    me: NodeId,
    faults: Faults,
    target: NodeId,
    client: Result<RaftServiceClient<Channel>, String>,
}

type RpcError<E = openraft::error::Infallible> =
    RPCError<NodeId, ClusterNode, RaftError<NodeId, E>>;

fn status_error<E: std::error::Error>(
    status: tonic::Status,
) -> RPCError<NodeId, ClusterNode, RaftError<NodeId, E>> {
    match status.code() {
        // NotFound: the peer runs no group of this shard (not created there yet, or a peer of
        // another shard count): unreachable for this group only, openraft backs off.
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::NotFound => {
            RPCError::Unreachable(Unreachable::new(&status))
        }
        _ => RPCError::Network(NetworkError::new(&status)),
    }
}

fn wire_error<E: std::error::Error>(
    e: WireError,
) -> RPCError<NodeId, ClusterNode, RaftError<NodeId, E>> {
    RPCError::Network(NetworkError::new(&e))
}

#[derive(Debug, thiserror::Error)]
#[error("invalid address of node {0}: {1}")]
struct BadAddress(NodeId, String);

impl PeerClient {
    #[allow(
        clippy::result_large_err,
        reason = "openraft's RPC error type, required by RaftNetwork"
    )]
    fn client<E: std::error::Error>(
        &self,
    ) -> Result<RaftServiceClient<Channel>, RPCError<NodeId, ClusterNode, RaftError<NodeId, E>>>
    {
        self.client
            .clone()
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&BadAddress(self.target, e))))
    }
}

impl PeerClient {
    /// Fault injection on the way out (`me → target`) or back (`target → me`).
    async fn link<E: std::error::Error>(
        &self,
        outbound: bool,
    ) -> Result<(), RPCError<NodeId, ClusterNode, RaftError<NodeId, E>>> {
        let (from, to) = if outbound {
            (self.me, self.target)
        } else {
            (self.target, self.me)
        };
        pass_raft(&self.faults, self.shard_id, from, to)
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))
    }
}

fn request<T>(msg: T, option: &RPCOption) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.set_timeout(option.hard_ttl());
    req
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcError> {
        let msg = conv::append_request_to_pb(self.shard_id.into(), &rpc);
        self.link(true).await?;
        let resp = self
            .client()?
            .append_entries(request(msg, &option))
            .await
            .map_err(status_error)?;
        self.link(false).await?;
        conv::append_response_from_pb(resp.get_ref()).map_err(wire_error)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcError<InstallSnapshotError>> {
        let msg = conv::snapshot_request_to_pb(self.shard_id.into(), &rpc);
        self.link(true).await?;
        let resp = self
            .client()?
            .install_snapshot(request(msg, &option))
            .await
            .map_err(status_error)?;
        self.link(false).await?;
        conv::snapshot_response_from_pb(resp.get_ref()).map_err(wire_error)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcError> {
        let msg = conv::vote_request_to_pb(self.shard_id.into(), &rpc);
        self.link(true).await?;
        let resp = self
            .client()?
            .vote(request(msg, &option))
            .await
            .map_err(status_error)?;
        self.link(false).await?;
        conv::vote_response_from_pb(resp.get_ref()).map_err(wire_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that runs no group of the shard answers NOT_FOUND: unreachable for that group
    /// (openraft backs off), like a peer that is down, never a protocol error.
    #[test]
    fn an_unknown_shard_at_the_peer_is_unreachable_for_that_group() {
        let unreachable = |status: tonic::Status| {
            matches!(
                status_error::<openraft::error::Infallible>(status),
                RPCError::Unreachable(_)
            )
        };
        assert!(unreachable(tonic::Status::not_found("no group of shard 9")));
        assert!(unreachable(tonic::Status::unavailable(
            "connection refused"
        )));
        assert!(!unreachable(tonic::Status::internal("a bug")));
    }

    #[test]
    fn a_faults_file_cuts_links_between_sides_only() {
        assert_eq!(
            FileFaults::parse("# comment\n1 3\n\n2,4\nx\n"),
            vec![vec![1, 3], vec![2, 4]]
        );
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("faults");
        let faults = FileFaults::new(path.clone());
        // Missing file: healthy.
        assert_eq!(faults.fault(1, 2), Fault::Deliver);
        std::fs::write(&path, "1\n2 3\n").expect("write");
        std::thread::sleep(FileFaults::REREAD + Duration::from_millis(20));
        assert_eq!(faults.fault(1, 2), Fault::Drop);
        assert_eq!(faults.fault(3, 1), Fault::Drop);
        assert_eq!(faults.fault(2, 3), Fault::Deliver);
        // A node on no line reaches everyone.
        assert_eq!(faults.fault(4, 1), Fault::Deliver);
        std::fs::write(&path, "").expect("write");
        std::thread::sleep(FileFaults::REREAD + Duration::from_millis(20));
        assert_eq!(faults.fault(1, 2), Fault::Deliver);
    }
}
