//! Bridges to other MQTT brokers (`[[bridges]]`, see `docs/bridges.md`).
//!
//! A bridge is two connections joined back to back:
//!
//! * **remote**: an MQTT client connection to the other broker, made with rumqttc
//!   ([`remote`]); it subscribes to the `subscribe` filters there (no-local with MQTT 5) and
//!   publishes what is forwarded;
//! * **local**: a persistent MQTT 5 session in this broker (client id `$bridge/<name>`), driven
//!   in-process as a [`raftmq_core::Connection`] like any client's (no socket): it subscribes to
//!   the `forward` filters (no-local, so what the bridge publishes locally never goes back) and
//!   publishes what arrives from the remote broker.
//!
//! Acknowledgements are passed through: a message forwarded to the remote broker is
//! acknowledged to the local session only once the remote broker acknowledged it, and one from
//! the remote broker only once the local broker acknowledged it (after its durable commit).
//! While the remote connection is down the local session is detached, so what the `forward`
//! filters match is queued in it (QoS 1/2, durably, within `mqtt.max_queued_messages`) and
//! delivered after the reconnect, with what was in flight resent. Being an ordinary persistent
//! session, it also moves between the nodes of a cluster: the node that runs the bridge
//! ([`BridgePlacement`], the Raft leader) resumes it.

mod config;
mod link;
mod remote;

pub use config::{BRIDGE_KEYS, BridgeConfig, BridgeMqttVersion, filters_overlap, validate_bridges};

use metrics::{counter, gauge};
use parking_lot::Mutex;
use raftmq_core::Broker;
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio_rustls::rustls;
use tracing::{info, warn};

pub const BRIDGE_ACTIVE: &str = "raftmq_bridge_active";
pub const BRIDGE_CONNECTED: &str = "raftmq_bridge_connected";
pub const BRIDGE_MESSAGES_TOTAL: &str = "raftmq_bridge_messages_total";
pub const BRIDGE_REFUSED_TOTAL: &str = "raftmq_bridge_refused_total";
pub const BRIDGE_CONNECTS_TOTAL: &str = "raftmq_bridge_connects_total";
pub const BRIDGE_QUEUED: &str = "raftmq_bridge_queued";

/// Where bridges run in a cluster: `true` while this node should run them. The binary derives
/// it from the cluster (the Raft leader that can commit); a node alone always runs them.
pub type BridgePlacement = watch::Receiver<bool>;

/// What a bridge's link is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LinkState {
    /// Not run on this node (another node of the cluster runs it, or it is stopping).
    Inactive,
    /// Connecting to the remote broker, or attaching the local session.
    Connecting,
    /// Both sides are up: messages flow.
    Connected,
    /// Waiting before the next attempt after a failure.
    Backoff,
}

impl LinkState {
    fn as_str(self) -> &'static str {
        match self {
            LinkState::Inactive => "inactive",
            LinkState::Connecting => "connecting",
            LinkState::Connected => "connected",
            LinkState::Backoff => "backoff",
        }
    }
}

#[derive(Debug)]
struct Status {
    state: LinkState,
    /// When `state` was entered (Unix seconds).
    since: u64,
    last_error: Option<String>,
    last_error_at: Option<u64>,
    /// Whether the remote broker still had the bridge's session at the last connect.
    remote_session_present: Option<bool>,
}

/// One bridge: its settings, status and counters (shared with the admin API).
#[derive(Debug)]
pub struct Bridge {
    cfg: BridgeConfig,
    /// The password read from `password_file` (or `password`).
    password: Option<String>,
    tls: Option<Arc<rustls::ClientConfig>>,
    status: Mutex<Status>,
    forwarded: AtomicU64,
    received: AtomicU64,
    refused_out: AtomicU64,
    refused_in: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Bridge {
    /// Checks `cfg` (its value rules, then its files: password file, TLS certificates) and
    /// prepares the bridge. The error names the key (`bridges[i].…`).
    pub fn new(cfg: BridgeConfig, index: usize) -> Result<Bridge, String> {
        let prefix = format!("bridges[{index}].");
        if let Some(p) = cfg.validate(&prefix).into_iter().next() {
            return Err(p.to_string());
        }
        let password = match (&cfg.password, &cfg.password_file) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        format!("{prefix}password_file: cannot read {}: {e}", path.display())
                    })?
                    .trim_end()
                    .to_owned(),
            ),
            (None, None) => None,
        };
        let tls = remote::tls_config(&cfg, &prefix)?;
        Ok(Bridge {
            cfg,
            password,
            tls,
            status: Mutex::new(Status {
                state: LinkState::Inactive,
                since: unix_now(),
                last_error: None,
                last_error_at: None,
                remote_session_present: None,
            }),
            forwarded: AtomicU64::new(0),
            received: AtomicU64::new(0),
            refused_out: AtomicU64::new(0),
            refused_in: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
        })
    }

    /// The bridge's settings.
    pub fn config(&self) -> &BridgeConfig {
        &self.cfg
    }

    fn name(&self) -> &str {
        &self.cfg.name
    }

    fn set_state(&self, state: LinkState) {
        let mut st = self.status.lock();
        if st.state != state {
            st.state = state;
            st.since = unix_now();
            gauge!(BRIDGE_CONNECTED, "bridge" => self.cfg.name.clone())
                .set(f64::from(u8::from(state == LinkState::Connected)));
            gauge!(BRIDGE_ACTIVE, "bridge" => self.cfg.name.clone())
                .set(f64::from(u8::from(state != LinkState::Inactive)));
        }
    }

    fn set_error(&self, error: &str) {
        let mut st = self.status.lock();
        st.last_error = Some(error.to_owned());
        st.last_error_at = Some(unix_now());
    }

    pub(crate) fn count_forwarded(&self) {
        self.forwarded.fetch_add(1, Relaxed);
        counter!(BRIDGE_MESSAGES_TOTAL, "bridge" => self.cfg.name.clone(), "direction" => "out")
            .increment(1);
    }

    pub(crate) fn count_received(&self) {
        self.received.fetch_add(1, Relaxed);
        counter!(BRIDGE_MESSAGES_TOTAL, "bridge" => self.cfg.name.clone(), "direction" => "in")
            .increment(1);
    }

    pub(crate) fn count_refused_out(&self) {
        self.refused_out.fetch_add(1, Relaxed);
        counter!(BRIDGE_REFUSED_TOTAL, "bridge" => self.cfg.name.clone(), "direction" => "out")
            .increment(1);
    }

    pub(crate) fn count_refused_in(&self) {
        self.refused_in.fetch_add(1, Relaxed);
        counter!(BRIDGE_REFUSED_TOTAL, "bridge" => self.cfg.name.clone(), "direction" => "in")
            .increment(1);
    }

    fn count_connect(&self, ok: bool) {
        if ok {
            self.connects.fetch_add(1, Relaxed);
        } else {
            self.connect_failures.fetch_add(1, Relaxed);
        }
        counter!(BRIDGE_CONNECTS_TOTAL, "bridge" => self.cfg.name.clone(),
            "result" => if ok { "ok" } else { "error" })
        .increment(1);
    }

    /// The bridge as the admin API shows it: settings (no secrets), status, counters, and the
    /// local session's queue as this node sees it.
    pub fn to_json(&self, broker: &Broker) -> Value {
        let st = self.status.lock();
        let local = broker.inspect_client(&self.cfg.local_client_id());
        let (queued, inflight) = local
            .as_ref()
            .map_or((0, 0), |(c, _)| (c.queued, c.inflight));
        json!({
            "name": self.cfg.name,
            "address": self.cfg.address,
            "mqtt_version": match self.cfg.mqtt_version {
                BridgeMqttVersion::V311 => "3.1.1",
                BridgeMqttVersion::V5 => "5",
            },
            "tls": self.cfg.tls,
            "remote_client_id": self.cfg.remote_client_id(),
            "local_client_id": self.cfg.local_client_id(),
            "forward": self.cfg.forward,
            "subscribe": self.cfg.subscribe,
            "qos": self.cfg.qos,
            "local_prefix": self.cfg.local_prefix,
            "remote_prefix": self.cfg.remote_prefix,
            "active": st.state != LinkState::Inactive,
            "state": st.state.as_str(),
            "since": st.since,
            "last_error": st.last_error,
            "last_error_at": st.last_error_at,
            "remote_session_present": st.remote_session_present,
            "messages_forwarded": self.forwarded.load(Relaxed),
            "messages_received": self.received.load(Relaxed),
            "refused_by_remote": self.refused_out.load(Relaxed),
            "refused_locally": self.refused_in.load(Relaxed),
            "connects": self.connects.load(Relaxed),
            "connect_failures": self.connect_failures.load(Relaxed),
            "local_session": local.is_some(),
            "queued": queued,
            "inflight": inflight,
        })
    }
}

/// How a link ended.
#[derive(Debug)]
pub(crate) enum LinkEnd {
    /// The server stops.
    Stopped,
    /// This node no longer runs the bridge.
    Inactive,
    /// A failure; `connected` when both sides had been up (the backoff starts over).
    Failed { error: String, connected: bool },
}

/// Runs `bridge` while `placement` says so, until `stop` turns true: connects, passes messages,
/// reconnects after failures with an exponential backoff (`reconnect_min` doubling up to
/// `reconnect_max`).
pub(crate) async fn supervise(
    bridge: Arc<Bridge>,
    broker: Arc<Broker>,
    mut placement: BridgePlacement,
    mut stop: watch::Receiver<bool>,
) {
    let cfg = bridge.cfg.clone();
    let mut backoff = cfg.reconnect_min.0;
    loop {
        if *stop.borrow() {
            break;
        }
        if !*placement.borrow_and_update() {
            bridge.set_state(LinkState::Inactive);
            tokio::select! {
                r = placement.changed() => if r.is_err() { break },
                r = stop.changed() => if r.is_err() { break },
            }
            continue;
        }
        bridge.set_state(LinkState::Connecting);
        let end = link::run(&bridge, &broker, &mut placement, &mut stop).await;
        match end {
            LinkEnd::Stopped => break,
            LinkEnd::Inactive => {
                info!(
                    bridge = bridge.name(),
                    "bridge stopped here: another node runs it"
                );
                backoff = cfg.reconnect_min.0;
            }
            LinkEnd::Failed { error, connected } => {
                if connected {
                    backoff = cfg.reconnect_min.0;
                } else if broker.inspect_client(&cfg.local_client_id()).is_none() {
                    // Never connected yet: the local session is made now, so what `forward`
                    // matches is queued until the remote broker can be reached.
                    match link::prime(&bridge, &broker).await {
                        Ok(()) => info!(
                            bridge = bridge.name(),
                            "remote broker unreachable: the bridge's local session queues meanwhile"
                        ),
                        Err(e) => {
                            warn!(bridge = bridge.name(), error = %e, "cannot create the bridge's local session")
                        }
                    }
                }
                warn!(bridge = bridge.name(), error = %error, retry_in = ?backoff, "bridge link failed");
                bridge.set_error(&error);
                bridge.set_state(LinkState::Backoff);
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    r = stop.changed() => if r.is_err() { break },
                    r = placement.changed() => if r.is_err() { break },
                }
                backoff = (backoff * 2).min(cfg.reconnect_max.0);
            }
        }
    }
    bridge.set_state(LinkState::Inactive);
}

/// How often the queue gauge of active bridges is refreshed.
const QUEUE_GAUGE_INTERVAL: Duration = Duration::from_secs(1);

/// Refreshes `raftmq_bridge_queued` for every bridge until `stop`.
pub(crate) async fn export_queues(
    bridges: Arc<[Arc<Bridge>]>,
    broker: Arc<Broker>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(QUEUE_GAUGE_INTERVAL);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        for b in bridges.iter() {
            let queued = broker
                .inspect_client(&b.cfg.local_client_id())
                .map_or(0, |(c, _)| c.queued + c.inflight);
            gauge!(BRIDGE_QUEUED, "bridge" => b.cfg.name.clone()).set(queued as f64);
        }
    }
}
