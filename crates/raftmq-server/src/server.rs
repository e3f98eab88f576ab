//! Binding listeners and running them until shutdown.

use crate::connection::ConnOptions;
use crate::drain::{Drain, Phase};
use crate::limits::{Admission, Decision, Permit, Rejection};
use crate::stream::Rewind;
use crate::tls::{ClusterTlsPem, TlsError, TlsState};
use crate::{
    ClusterControl, DrainConfig, HttpConfig, LimitsConfig, ListenerKind, ListenersConfig,
    TlsConfig, connection, http, metrics, proxy, ws,
};
use raftmq_core::Broker;
use std::future::{Future, poll_fn};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Renders the Prometheus exposition text (provided by the binary, which owns the recorder).
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// How long connections get to say goodbye at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long a stopping server waits for its bridges to say goodbye to their remote brokers.
const BRIDGE_STOP_GRACE: Duration = Duration::from_secs(3);

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {what} listener on {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A bridge cannot be set up (its password or certificate files); names the key.
    #[error("{0}")]
    Bridge(String),
}

/// The cluster gRPC endpoint (Raft, forwarded proposals, join). It runs on its own, from
/// before the broker is ready: a joining node must answer its peers while it catches up.
/// With TLS it serves only TLS, and only to peers whose certificate chains to the cluster CA.
pub struct ClusterServer {
    listener: TcpListener,
    routes: tonic::service::Routes,
    tls: Option<tonic::transport::ServerTlsConfig>,
}

impl ClusterServer {
    /// Binds `addr` for `routes` (the services from `raftmq-cluster`), serving mutual TLS with
    /// `tls` when given.
    pub async fn bind(
        addr: SocketAddr,
        routes: tonic::service::Routes,
        tls: Option<&ClusterTlsPem>,
    ) -> Result<Self, ServerError> {
        let tls = tls.map(ClusterTlsPem::server_config);
        if let Some(tls) = &tls {
            // Fails here rather than when serving.
            tonic::transport::Server::builder()
                .tls_config(tls.clone())
                .map_err(|e| TlsError::Invalid {
                    key: "cluster.tls_cert_file",
                    problem: e.to_string(),
                })?;
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                what: "cluster",
                addr,
                source,
            })?;
        Ok(ClusterServer {
            listener,
            routes,
            tls,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) {
        let incoming =
            tonic::transport::server::TcpIncoming::from(self.listener).with_nodelay(Some(true));
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = self.tls {
            builder = match builder.tls_config(tls) {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "cluster gRPC server: TLS configuration refused");
                    return;
                }
            };
        }
        if let Err(e) = builder
            .add_routes(self.routes)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await
        {
            warn!(error = %e, "cluster gRPC server failed");
        }
    }
}

/// A bound, not yet running broker front end.
pub struct Server {
    broker: Arc<Broker>,
    mqtt: Option<TcpListener>,
    /// The TLS, WebSocket and secure WebSocket listeners.
    more: Vec<(ListenerKind, TcpListener)>,
    settings: ListenersConfig,
    tls: Option<Arc<TlsState>>,
    limits: LimitsConfig,
    http: Option<TcpListener>,
    metrics: Option<MetricsRender>,
    cluster: Option<Arc<dyn ClusterControl>>,
    admin_token: Option<Arc<str>>,
    drain: DrainConfig,
    bridges: Vec<Arc<crate::bridge::Bridge>>,
    /// Whether this node runs the bridges (`None`: always, a node alone).
    placement: Option<crate::bridge::BridgePlacement>,
}

async fn bind(
    what: &'static str,
    addr: Option<SocketAddr>,
) -> Result<Option<TcpListener>, ServerError> {
    match addr {
        None => Ok(None),
        Some(addr) => TcpListener::bind(addr)
            .await
            .map(Some)
            .map_err(|source| ServerError::Bind { what, addr, source }),
    }
}

impl Server {
    /// Binds every configured listener (so "address in use" is reported before anything runs).
    pub async fn bind(
        broker: Arc<Broker>,
        listeners: &ListenersConfig,
        http: &HttpConfig,
        metrics: Option<MetricsRender>,
    ) -> Result<Server, ServerError> {
        let mut more = Vec::new();
        for kind in [ListenerKind::Tls, ListenerKind::Ws, ListenerKind::Wss] {
            let what = match kind {
                ListenerKind::Tls => "MQTT over TLS",
                ListenerKind::Ws => "MQTT over WebSocket",
                _ => "MQTT over secure WebSocket",
            };
            if let Some(l) = bind(what, listeners.addr(kind)).await? {
                more.push((kind, l));
            }
        }
        Ok(Server {
            broker,
            mqtt: bind("MQTT", listeners.tcp).await?,
            more,
            settings: listeners.clone(),
            tls: None,
            limits: LimitsConfig::default(),
            http: bind("HTTP", http.addr).await?,
            metrics,
            cluster: None,
            admin_token: http.admin_token.as_deref().map(Arc::from),
            drain: DrainConfig::default(),
            bridges: Vec::new(),
            placement: None,
        })
    }

    /// Makes the HTTP endpoint cluster-aware: `/api/v1/cluster` reports `cluster`'s status,
    /// `/readyz` also needs it ready, and the admin API changes its membership
    /// (`/api/v1/cluster/nodes`).
    pub fn set_cluster(&mut self, cluster: Arc<dyn ClusterControl>) {
        self.cluster = Some(cluster);
    }

    /// The bridges to other brokers (`[[bridges]]`), checked now: their password and TLS
    /// files are read here, so a bad one stops the start-up (naming its key). `placement`
    /// tells, in a cluster, whether this node runs them now (see [`crate::bridge`]); `None`
    /// runs them always.
    pub fn set_bridges(
        &mut self,
        bridges: &[crate::bridge::BridgeConfig],
        placement: Option<crate::bridge::BridgePlacement>,
    ) -> Result<(), ServerError> {
        if let Some(p) = crate::bridge::validate_bridges(bridges).into_iter().next() {
            return Err(ServerError::Bridge(p.to_string()));
        }
        self.bridges = bridges
            .iter()
            .enumerate()
            .map(|(i, b)| crate::bridge::Bridge::new(b.clone(), i).map(Arc::new))
            .collect::<Result<_, _>>()
            .map_err(ServerError::Bridge)?;
        self.placement = placement;
        Ok(())
    }

    /// How to drain (at `POST /api/v1/drain` and at shutdown).
    pub fn set_drain_config(&mut self, drain: DrainConfig) {
        self.drain = drain;
    }

    /// The bound MQTT TCP address (with the real port when 0 was configured).
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Loads the certificates of the TLS and secure WebSocket listeners (reloaded when the files
    /// change, see `tls.reload_interval`, and on SIGHUP).
    pub fn set_tls(&mut self, tls: &TlsConfig) -> Result<(), ServerError> {
        self.tls = Some(Arc::new(TlsState::load(tls)?));
        Ok(())
    }

    /// Sets the connection limits and overload thresholds.
    pub fn set_limits(&mut self, limits: LimitsConfig) {
        self.limits = limits;
    }

    /// The bound address of the `kind` listener (with the real port when 0 was configured).
    pub fn listener_addr(&self, kind: ListenerKind) -> Option<SocketAddr> {
        if kind == ListenerKind::Tcp {
            return self.mqtt_addr();
        }
        self.more
            .iter()
            .find(|(k, _)| *k == kind)
            .and_then(|(_, l)| l.local_addr().ok())
    }

    /// The bound HTTP address.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The broker this server fronts.
    pub fn broker(&self) -> &Arc<Broker> {
        &self.broker
    }

    /// Serves until `shutdown` resolves, then drains (unless `POST /api/v1/drain` already did):
    /// stops accepting, lets connections finish their in-flight commits and writes, tells MQTT 5
    /// clients DISCONNECT 0x9C with the configured Server Reference (else 0x8B), all within
    /// `drain.timeout`; then closes the HTTP endpoint and waits for the remaining tasks (at most
    /// a few seconds).
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<(), ServerError> {
        if let Some((kind, _)) = self.more.iter().find(|(k, _)| k.is_tls())
            && self.tls.is_none()
        {
            return Err(TlsError::NotConfigured(kind.as_str()).into());
        }
        // Before the first connection: see `descriptors` (a 12 ms stall per table doubling).
        crate::descriptors::prepare();
        let (stop_tx, stop_rx) = watch::channel(false);
        let tasks = TaskTracker::new();
        let ready = Arc::new(AtomicBool::new(true));
        let drain = Arc::new(Drain::new(&self.drain, ready.clone()));

        let admission = Arc::new(Admission::new(self.limits.clone()));
        admission.sample(&self.broker);
        tasks.spawn(
            admission
                .clone()
                .sample_loop(self.broker.clone(), stop_rx.clone()),
        );
        if let Some(tls) = &self.tls {
            tasks.spawn(tls.clone().reload_loop(stop_rx.clone()));
        }
        let mut listeners = self.more;
        if let Some(listener) = self.mqtt {
            listeners.insert(0, (ListenerKind::Tcp, listener));
        }
        let max_packet =
            usize::try_from(self.broker.config().max_packet_size.0).unwrap_or(usize::MAX);
        for (kind, listener) in listeners {
            let ctx = Arc::new(ListenerCtx {
                kind,
                proxy: self.settings.proxy_protocol.contains(&kind),
                handshake_timeout: self.settings.handshake_timeout.0,
                ws_path: self.settings.ws_path.clone(),
                // A message may hold a whole packet plus the start of the next ones.
                ws_max_message: max_packet.saturating_add(64 * 1024),
                tls: self.tls.clone(),
                admission: admission.clone(),
                broker: self.broker.clone(),
                drain: drain.clone(),
            });
            tasks.spawn(accept_loop(listener, ctx, stop_rx.clone(), tasks.clone()));
        }
        // Bridges stop first at shutdown (before the drain), so they hand their local session
        // back (detached: it queues) and say DISCONNECT to the remote broker.
        let (bridges_stop, bridges_stopped) = watch::channel(false);
        let bridges: Arc<[Arc<crate::bridge::Bridge>]> = self.bridges.into();
        let bridge_tasks = TaskTracker::new();
        if !bridges.is_empty() {
            let placement = self.placement.unwrap_or_else(|| watch::channel(true).1);
            for bridge in bridges.iter() {
                bridge_tasks.spawn(crate::bridge::supervise(
                    bridge.clone(),
                    self.broker.clone(),
                    placement.clone(),
                    bridges_stopped.clone(),
                ));
            }
            tasks.spawn(crate::bridge::export_queues(
                bridges.clone(),
                self.broker.clone(),
                stop_rx.clone(),
            ));
        }
        bridge_tasks.close();
        if let Some(listener) = self.http {
            let state = http::HttpState {
                broker: self.broker.clone(),
                metrics: self.metrics,
                ready: ready.clone(),
                cluster: self.cluster,
                admin_token: self.admin_token,
                drain: drain.clone(),
                bridges: bridges.clone(),
            };
            tasks.spawn(http::serve(listener, state, stop_rx.clone()));
        }
        tasks.spawn(broker_timers(self.broker.clone(), stop_rx.clone()));
        tasks.spawn(stats_exporter(self.broker.clone(), stop_rx.clone()));
        let sys_interval = self.broker.config().sys_interval.0;
        if !sys_interval.is_zero() {
            tasks.spawn(crate::sys::publish_loop(
                self.broker.clone(),
                sys_interval,
                stop_rx.clone(),
            ));
        }

        shutdown.await;
        info!("shutting down");
        let _ = bridges_stop.send(true);
        if tokio::time::timeout(BRIDGE_STOP_GRACE, bridge_tasks.wait())
            .await
            .is_err()
        {
            warn!("bridges did not stop within {BRIDGE_STOP_GRACE:?}");
        }
        ready.store(false, Ordering::Relaxed);
        if drain.start(Instant::now()) {
            info!("draining connections");
        }
        // Connections close themselves by the drain deadline; the margin covers the last writes.
        let drain_limit = self.drain.timeout.0 + Duration::from_secs(1);
        if tokio::time::timeout(drain_limit, drain.wait_complete())
            .await
            .is_err()
        {
            warn!("drain did not complete within {drain_limit:?}");
        }
        drain.stop();
        let _ = stop_tx.send(true);
        tasks.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = tasks.len(),
                "connections still open after the shutdown grace period"
            );
        }
        Ok(())
    }
}

/// What every connection of one listener shares.
struct ListenerCtx {
    kind: ListenerKind,
    proxy: bool,
    handshake_timeout: Duration,
    ws_path: String,
    ws_max_message: usize,
    tls: Option<Arc<TlsState>>,
    admission: Arc<Admission>,
    broker: Arc<Broker>,
    drain: Arc<Drain>,
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ListenerCtx>,
    mut stop: watch::Receiver<bool>,
    tasks: TaskTracker,
) {
    // Closing the listener: new connections are refused while draining.
    let mut draining = std::pin::pin!(ctx.drain.next_phase(Phase::Serving));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    ::metrics::counter!(metrics::CONNECTIONS_ACCEPTED_TOTAL).increment(1);
                    let (permit, refusal) = match ctx.admission.admit(ctx.kind, Instant::now()) {
                        Decision::Admit(p) => (p, None),
                        Decision::Refuse(code, p) => (p, Some(code)),
                        Decision::Drop => continue,
                    };
                    // Small packets must not wait for Nagle's algorithm.
                    let _ = stream.set_nodelay(true);
                    if ctx.is_plain() {
                        // Most connections: MQTT straight on the socket, in the smallest task.
                        let opts = ctx.options(refusal, permit);
                        tasks.spawn(connection::run(stream, peer, ctx.broker.clone(), opts));
                    } else {
                        tasks.spawn(serve(stream, peer, refusal, ctx.clone(), permit));
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => return,
            _ = &mut draining => return,
        }
    }
}

/// Reads the PROXY header (if the listener expects one), runs the TLS and WebSocket handshakes
/// (within `listeners.handshake_timeout`), then serves MQTT on the resulting byte stream. The
/// connection holds its place in the admission counts (`permit`) until it closes. (Plain TCP
/// without a PROXY header skips this: see [`accept_loop`].)
async fn serve(
    mut stream: TcpStream,
    mut peer: SocketAddr,
    refusal: Option<raftmq_codec::ReasonCode>,
    ctx: Arc<ListenerCtx>,
    permit: Permit,
) {
    let deadline = tokio::time::Instant::now() + ctx.handshake_timeout;
    let mut prefix = bytes::Bytes::new();
    if ctx.proxy {
        match tokio::time::timeout_at(deadline, proxy::read_header(&mut stream)).await {
            Ok(Ok((addr, rest))) => {
                if let Some(addr) = addr {
                    peer = addr;
                }
                prefix = rest;
            }
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "PROXY protocol header refused");
                return Rejection::ProxyProtocol.count();
            }
            Err(_) => {
                debug!(%peer, "no PROXY protocol header in time");
                return Rejection::ProxyProtocol.count();
            }
        }
    }
    let stream = Rewind::new(stream, prefix);
    let opts = ctx.options(refusal, permit);
    if !ctx.upgrades() {
        let broker = ctx.broker.clone();
        return connection::run(stream, peer, broker, opts).await;
    }
    // The TLS and WebSocket handshakes and streams are several times larger than a plain
    // TCP connection's whole state: boxed, so they do not size every connection's task.
    Box::pin(serve_upgraded(stream, peer, deadline, ctx, opts)).await
}

impl ListenerCtx {
    /// A TLS or WebSocket handshake comes before MQTT.
    fn upgrades(&self) -> bool {
        self.kind.is_tls() || self.kind.is_websocket()
    }

    /// Plain TCP without a PROXY header: nothing comes before MQTT.
    fn is_plain(&self) -> bool {
        !self.proxy && !self.upgrades()
    }

    fn options(&self, refusal: Option<raftmq_codec::ReasonCode>, permit: Permit) -> ConnOptions {
        ConnOptions {
            cert_identity: None,
            refusal,
            drain: self.drain.clone(),
            permit,
        }
    }
}

/// The TLS and WebSocket part of [`serve`].
async fn serve_upgraded(
    stream: Rewind<TcpStream>,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
    ctx: Arc<ListenerCtx>,
    mut opts: ConnOptions,
) {
    let broker = ctx.broker.clone();
    if !ctx.kind.is_tls() {
        let ws = tokio::time::timeout_at(
            deadline,
            ws::accept(stream, &ctx.ws_path, ctx.ws_max_message),
        );
        return match ws.await {
            Ok(Ok(ws)) => connection::run(ws, peer, broker, opts).await,
            Ok(Err(e)) => {
                debug!(%peer, error = %e, "WebSocket handshake failed");
                Rejection::WebsocketHandshake.count();
            }
            Err(_) => Rejection::WebsocketHandshake.count(),
        };
    }
    let Some(tls) = &ctx.tls else { return };
    let tls_stream = match tokio::time::timeout_at(deadline, tls.acceptor().accept(stream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "TLS handshake failed");
            return Rejection::TlsHandshake.count();
        }
        Err(_) => return Rejection::TlsHandshake.count(),
    };
    opts.cert_identity = tls.identity(tls_stream.get_ref().1);
    if !ctx.kind.is_websocket() {
        return connection::run(tls_stream, peer, broker, opts).await;
    }
    match tokio::time::timeout_at(
        deadline,
        ws::accept(tls_stream, &ctx.ws_path, ctx.ws_max_message),
    )
    .await
    {
        Ok(Ok(ws)) => connection::run(ws, peer, broker, opts).await,
        Ok(Err(e)) => {
            debug!(%peer, error = %e, "WebSocket handshake failed");
            Rejection::WebsocketHandshake.count();
        }
        Err(_) => Rejection::WebsocketHandshake.count(),
    }
}

/// Fires delayed wills and session expiries when they are due.
async fn broker_timers(broker: Arc<Broker>, mut stop: watch::Receiver<bool>) {
    loop {
        broker.handle_timeout(Instant::now());
        let next = broker
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = poll_fn(|cx| broker.poll_timers_changed(cx)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn stats_exporter(broker: Arc<Broker>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => metrics::export_broker_stats(&broker),
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftmq_core::config::MqttConfig;

    /// Every connection's task is one allocation the size of its future: the TLS and WebSocket
    /// handshakes and streams (over 10 KiB together) must not size plain TCP connections.
    #[tokio::test]
    async fn plain_tcp_connection_task_is_not_sized_by_tls_or_websocket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound address");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (stream, peer) = listener.accept().await.expect("accept");
        let ctx = Arc::new(ListenerCtx {
            kind: ListenerKind::Tcp,
            proxy: false,
            handshake_timeout: Duration::from_secs(1),
            ws_path: "/mqtt".to_owned(),
            ws_max_message: 1024,
            tls: None,
            admission: Arc::new(Admission::new(LimitsConfig::default())),
            broker: Arc::new(Broker::new(MqttConfig::default())),
            drain: Arc::new(Drain::new(
                &DrainConfig::default(),
                Arc::new(AtomicBool::new(true)),
            )),
        });
        let Decision::Admit(permit) = ctx.admission.admit(ListenerKind::Tcp, Instant::now()) else {
            panic!("no limits configured, yet the connection was not admitted");
        };
        assert!(ctx.is_plain(), "plain TCP skips the handshake wrapper");
        // What `accept_loop` spawns for a plain TCP connection.
        let opts = ctx.options(None, permit);
        let task = connection::run(stream, peer, ctx.broker.clone(), opts);
        // tokio adds 112 bytes (header, scheduler, id, trailer, the tracker's token) and rounds
        // the task up to 128 bytes: up to 784 bytes of future, the task is 896 bytes, one more
        // and it is 1,024 (14 % more memory per idle connection). 760 bytes in a debug build
        // with Rust 1.95, about the same in release.
        let size = std::mem::size_of_val(&task);
        println!("plain TCP connection task future: {size} bytes");
        assert!(size <= 784, "connection task future is {size} bytes");
        drop(task);
        drop(client);
    }
}
