//! Admission of new connections: connection caps (node and listener), a connect rate per
//! listener, and overload protection (process memory, queued messages).
//!
//! A connection over a limit is still read until its CONNECT so the client learns why
//! (CONNACK 0x97 quota exceeded, 0x9F connection rate exceeded, 0x89 server busy; 3.x clients get
//! return code 3, server unavailable). At most [`MAX_REFUSING`] such connections are kept at a
//! time; beyond that, new connections are closed at once.

use crate::config::{LimitsConfig, ListenerKind};
use crate::metrics::{CONNECTIONS_REJECTED_TOTAL, OVERLOADED, PROCESS_RESIDENT_MEMORY_BYTES};
use metrics::{counter, gauge};
use parking_lot::Mutex;
use raftmq_codec::ReasonCode;
use raftmq_core::Broker;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::warn;

/// Connections kept open at once only to be refused with a CONNACK (the hard cap).
pub const MAX_REFUSING: usize = 256;

/// How often memory and queues are sampled for overload protection.
const OVERLOAD_SAMPLE: Duration = Duration::from_secs(1);

/// Why a connection was rejected: the `reason` label of `raftmq_connections_rejected_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The node is at `limits.max_connections`.
    MaxConnections,
    /// The listener is at `limits.max_connections_per_listener`.
    ListenerMaxConnections,
    /// The listener's `limits.connect_rate` is used up.
    ConnectRate,
    /// Memory or queued messages are above their threshold.
    Overload,
    /// Too many connections are already waiting to be refused: closed without a CONNACK.
    HardCap,
    /// Missing or invalid PROXY protocol header.
    ProxyProtocol,
    /// TLS handshake failed (or timed out).
    TlsHandshake,
    /// WebSocket handshake failed (or timed out).
    WebsocketHandshake,
}

impl Rejection {
    /// Every reason, for documentation and tests.
    pub const ALL: [Rejection; 8] = [
        Self::MaxConnections,
        Self::ListenerMaxConnections,
        Self::ConnectRate,
        Self::Overload,
        Self::HardCap,
        Self::ProxyProtocol,
        Self::TlsHandshake,
        Self::WebsocketHandshake,
    ];

    /// The stable label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxConnections => "max_connections",
            Self::ListenerMaxConnections => "listener_max_connections",
            Self::ConnectRate => "connect_rate",
            Self::Overload => "overload",
            Self::HardCap => "hard_cap",
            Self::ProxyProtocol => "proxy_protocol",
            Self::TlsHandshake => "tls_handshake",
            Self::WebsocketHandshake => "websocket_handshake",
        }
    }

    /// Counts one rejection.
    pub fn count(self) {
        counter!(CONNECTIONS_REJECTED_TOTAL, "reason" => self.as_str()).increment(1);
    }

    /// The CONNACK reason code a refused client gets.
    fn reason_code(self) -> ReasonCode {
        match self {
            Self::ConnectRate => ReasonCode::CONNECTION_RATE_EXCEEDED,
            Self::Overload => ReasonCode::SERVER_BUSY,
            _ => ReasonCode::QUOTA_EXCEEDED,
        }
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` saved up.
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// What happens to a new connection.
pub enum Decision {
    /// Serve it.
    Admit(Permit),
    /// Read its CONNECT and refuse it with this code.
    Refuse(ReasonCode, Permit),
    /// Close it at once.
    Drop,
}

/// Holds a connection's place in the counts until dropped.
pub struct Permit {
    admission: Arc<Admission>,
    /// Index of the listener (one of four); small, as every idle connection holds a permit.
    listener: u8,
    refusing: bool,
}

impl Permit {
    /// The limits the connection was admitted under.
    pub fn limits(&self) -> &LimitsConfig {
        &self.admission.limits
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if self.refusing {
            self.admission.refusing.fetch_sub(1, Relaxed);
        } else {
            self.admission.total.fetch_sub(1, Relaxed);
            self.admission.per_listener[usize::from(self.listener)].fetch_sub(1, Relaxed);
        }
    }
}

/// The connection limits of one server.
pub struct Admission {
    limits: LimitsConfig,
    total: AtomicUsize,
    per_listener: [AtomicUsize; 4],
    refusing: AtomicUsize,
    buckets: [Mutex<Bucket>; 4],
    overloaded: AtomicBool,
}

/// The bucket size: `connect_burst`, or `connect_rate` when 0.
fn burst(limits: &LimitsConfig) -> u32 {
    match limits.connect_burst {
        0 => limits.connect_rate.max(1),
        b => b,
    }
}

fn index(kind: ListenerKind) -> usize {
    ListenerKind::ALL
        .iter()
        .position(|k| *k == kind)
        .unwrap_or(0)
}

impl Admission {
    pub fn new(limits: LimitsConfig) -> Admission {
        let now = Instant::now();
        let burst = f64::from(burst(&limits));
        let bucket = || {
            Mutex::new(Bucket {
                tokens: burst,
                last: now,
            })
        };
        Admission {
            limits,
            total: AtomicUsize::new(0),
            per_listener: Default::default(),
            refusing: AtomicUsize::new(0),
            buckets: [bucket(), bucket(), bucket(), bucket()],
            overloaded: AtomicBool::new(false),
        }
    }

    /// The configured limits.
    pub fn limits(&self) -> &LimitsConfig {
        &self.limits
    }

    fn take_token(&self, i: usize, now: Instant) -> bool {
        let rate = self.limits.connect_rate;
        if rate == 0 {
            return true;
        }
        let burst = f64::from(burst(&self.limits));
        let mut b = self.buckets[i].lock();
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * f64::from(rate)).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Decides about a connection just accepted on `kind`.
    pub fn admit(self: &Arc<Self>, kind: ListenerKind, now: Instant) -> Decision {
        let i = index(kind);
        let rejection = self.check(i, now);
        match rejection {
            None => Decision::Admit(Permit {
                admission: self.clone(),
                listener: i as u8,
                refusing: false,
            }),
            Some(why) => {
                if self.refusing.fetch_add(1, Relaxed) >= MAX_REFUSING {
                    self.refusing.fetch_sub(1, Relaxed);
                    Rejection::HardCap.count();
                    return Decision::Drop;
                }
                why.count();
                Decision::Refuse(
                    why.reason_code(),
                    Permit {
                        admission: self.clone(),
                        listener: i as u8,
                        refusing: true,
                    },
                )
            }
        }
    }

    /// Takes a place in the counts, or says which limit is in the way.
    fn check(&self, i: usize, now: Instant) -> Option<Rejection> {
        if self.overloaded.load(Relaxed) {
            return Some(Rejection::Overload);
        }
        let max = self.limits.max_connections;
        if self.total.fetch_add(1, Relaxed) >= max && max > 0 {
            self.total.fetch_sub(1, Relaxed);
            return Some(Rejection::MaxConnections);
        }
        let per = self.limits.max_connections_per_listener;
        if self.per_listener[i].fetch_add(1, Relaxed) >= per && per > 0 {
            self.per_listener[i].fetch_sub(1, Relaxed);
            self.total.fetch_sub(1, Relaxed);
            return Some(Rejection::ListenerMaxConnections);
        }
        if !self.take_token(i, now) {
            self.per_listener[i].fetch_sub(1, Relaxed);
            self.total.fetch_sub(1, Relaxed);
            return Some(Rejection::ConnectRate);
        }
        None
    }

    /// Samples memory and queued messages; updates the overload flag and its gauges.
    pub fn sample(&self, broker: &Broker) {
        let rss = resident_memory();
        if let Some(rss) = rss {
            gauge!(PROCESS_RESIDENT_MEMORY_BYTES).set(rss as f64);
        }
        let queued = broker.stats().messages_queued.load(Relaxed).max(0);
        let queued = u64::try_from(queued).unwrap_or(0);
        let max_memory = self.limits.max_memory.0;
        let max_queued = self.limits.max_queued_messages;
        let memory_high = max_memory > 0 && rss.is_some_and(|r| r > max_memory);
        let queues_high = max_queued > 0 && queued > max_queued;
        let overloaded = memory_high || queues_high;
        if overloaded != self.overloaded.swap(overloaded, Relaxed) {
            if overloaded {
                warn!(
                    resident_bytes = rss,
                    queued_messages = queued,
                    "overloaded: refusing new connections (CONNACK 0x89 server busy)"
                );
            } else {
                warn!("no longer overloaded: accepting new connections");
            }
        }
        gauge!(OVERLOADED).set(if overloaded { 1.0 } else { 0.0 });
    }

    /// Samples every second until `stop`.
    pub async fn sample_loop(
        self: Arc<Self>,
        broker: Arc<Broker>,
        mut stop: watch::Receiver<bool>,
    ) {
        let mut tick = tokio::time::interval(OVERLOAD_SAMPLE);
        loop {
            tokio::select! {
                _ = tick.tick() => self.sample(&broker),
                _ = stop.changed() => return,
            }
        }
    }
}

/// The resident set size of this process (Linux: `VmRSS` in `/proc/self/status`).
fn resident_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftmq_core::config::ByteSize;

    fn code(d: &Decision) -> Option<ReasonCode> {
        match d {
            Decision::Admit(_) => None,
            Decision::Refuse(code, _) => Some(*code),
            Decision::Drop => Some(ReasonCode::UNSPECIFIED_ERROR),
        }
    }

    #[test]
    fn max_connections_refuses_with_quota_exceeded_and_frees_on_drop() {
        let a = Arc::new(Admission::new(LimitsConfig {
            max_connections: 2,
            ..LimitsConfig::default()
        }));
        let now = Instant::now();
        let first = a.admit(ListenerKind::Tcp, now);
        let second = a.admit(ListenerKind::Ws, now);
        assert_eq!(code(&first), None);
        assert_eq!(code(&second), None);
        let third = a.admit(ListenerKind::Tcp, now);
        assert_eq!(code(&third), Some(ReasonCode::QUOTA_EXCEEDED));
        drop(third);
        drop(first);
        assert_eq!(code(&a.admit(ListenerKind::Tcp, now)), None);
    }

    #[test]
    fn per_listener_cap_counts_each_listener() {
        let a = Arc::new(Admission::new(LimitsConfig {
            max_connections_per_listener: 1,
            ..LimitsConfig::default()
        }));
        let now = Instant::now();
        let _tcp = a.admit(ListenerKind::Tcp, now);
        let _tls = a.admit(ListenerKind::Tls, now);
        assert_eq!(code(&_tls), None);
        assert_eq!(
            code(&a.admit(ListenerKind::Tcp, now)),
            Some(ReasonCode::QUOTA_EXCEEDED)
        );
    }

    #[test]
    fn connect_rate_refills_over_time() {
        let a = Arc::new(Admission::new(LimitsConfig {
            connect_rate: 10,
            connect_burst: 2,
            ..LimitsConfig::default()
        }));
        let t0 = Instant::now();
        assert_eq!(code(&a.admit(ListenerKind::Tcp, t0)), None);
        assert_eq!(code(&a.admit(ListenerKind::Tcp, t0)), None);
        assert_eq!(
            code(&a.admit(ListenerKind::Tcp, t0)),
            Some(ReasonCode::CONNECTION_RATE_EXCEEDED)
        );
        // Another listener has its own bucket.
        assert_eq!(code(&a.admit(ListenerKind::Ws, t0)), None);
        let later = t0 + Duration::from_millis(150);
        assert_eq!(code(&a.admit(ListenerKind::Tcp, later)), None);
    }

    #[test]
    fn overload_refuses_with_server_busy_and_hard_cap_drops() {
        let a = Arc::new(Admission::new(LimitsConfig {
            max_memory: ByteSize(1),
            ..LimitsConfig::default()
        }));
        let broker = Broker::new(raftmq_core::config::MqttConfig::default());
        a.sample(&broker);
        let now = Instant::now();
        let refused: Vec<Decision> = (0..MAX_REFUSING)
            .map(|_| a.admit(ListenerKind::Tcp, now))
            .collect();
        assert!(
            refused
                .iter()
                .all(|d| code(d) == Some(ReasonCode::SERVER_BUSY))
        );
        assert!(matches!(a.admit(ListenerKind::Tcp, now), Decision::Drop));
        drop(refused);
        assert_eq!(
            code(&a.admit(ListenerKind::Tcp, now)),
            Some(ReasonCode::SERVER_BUSY)
        );
    }
}
