//! Draining: a node about to stop hands its clients off. It stops accepting MQTT connections,
//! reports not ready, lets every connection finish what is in flight (acknowledgements waiting
//! for a commit, bytes queued for the socket) and then closes it, telling MQTT 5 clients to use
//! another server. Started by `POST /api/v1/drain` or by the shutdown signal; bounded by
//! `drain.timeout`.

use crate::DrainConfig;
use parking_lot::Mutex;
use raftmq_codec::ByteStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// The drain state of one server, shared by the accept loop, the connection tasks and the
/// HTTP endpoint.
#[derive(Debug)]
pub(crate) struct Drain {
    /// A [`Phase`]; only ever moves forward.
    phase: AtomicU8,
    /// Wakes every [`Drain::next_phase`] waiter when `phase` moves.
    phase_changed: Notify,
    started_at: Mutex<Option<Instant>>,
    timeout: Duration,
    server_reference: Option<ByteStr>,
    /// Open MQTT connections.
    connections: AtomicUsize,
    /// The server's readiness flag (`/readyz`), cleared when the drain starts.
    ready: Arc<AtomicBool>,
}

/// What `GET /api/v1/drain` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub(crate) struct DrainStatus {
    pub draining: bool,
    /// Every connection is closed, or the timeout passed.
    pub complete: bool,
    /// MQTT connections still open.
    pub connections: usize,
    pub elapsed_ms: Option<u64>,
    pub timeout_ms: u64,
}

/// Where the server is in its life, as its connections see it: one signal per connection
/// (one waiter, re-armed only when the phase changes) rather than one per event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub(crate) enum Phase {
    Serving = 0,
    /// Finish what is in flight and say goodbye by [`Drain::deadline`].
    Draining = 1,
    /// Close now (the drain is over, or its deadline passed).
    Stopping = 2,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Serving,
            1 => Phase::Draining,
            _ => Phase::Stopping,
        }
    }
}

/// Counts one open connection while alive.
pub(crate) struct ConnectionGuard(Arc<Drain>);

impl ConnectionGuard {
    /// The drain this connection is counted in.
    pub fn drain(&self) -> &Drain {
        &self.0
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drain {
    pub fn new(config: &DrainConfig, ready: Arc<AtomicBool>) -> Drain {
        Drain {
            phase: AtomicU8::new(Phase::Serving as u8),
            phase_changed: Notify::new(),
            started_at: Mutex::new(None),
            timeout: config.timeout.0,
            server_reference: config.server_reference.as_deref().map(ByteStr::from),
            connections: AtomicUsize::new(0),
            ready,
        }
    }

    /// Starts draining (again: no-op). Returns whether this call started it.
    pub fn start(&self, now: Instant) -> bool {
        let mut at = self.started_at.lock();
        if at.is_some() {
            return false;
        }
        *at = Some(now);
        self.ready.store(false, Ordering::Relaxed);
        self.advance(Phase::Draining);
        true
    }

    /// Tells every connection still open to close now (after the drain, at shutdown).
    pub fn stop(&self) {
        self.advance(Phase::Stopping);
    }

    fn advance(&self, to: Phase) {
        if self.phase.fetch_max(to as u8, Ordering::AcqRel) < to as u8 {
            self.phase_changed.notify_waiters();
        }
    }

    /// The server's phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Acquire))
    }

    /// Resolves with the phase once it is past `seen`.
    pub async fn next_phase(&self, seen: Phase) -> Phase {
        loop {
            // Created before the check: `notify_waiters` reaches it from here on.
            let changed = self.phase_changed.notified();
            let phase = self.phase();
            if phase > seen {
                return phase;
            }
            changed.await;
        }
    }

    /// When connections must close even with work outstanding (once started).
    pub fn deadline(&self) -> Option<Instant> {
        self.started_at.lock().map(|at| at + self.timeout)
    }

    /// The Server Reference to give MQTT 5 clients.
    pub fn server_reference(&self) -> Option<ByteStr> {
        self.server_reference.clone()
    }

    /// Registers an open connection.
    pub fn track(self: &Arc<Self>) -> ConnectionGuard {
        self.connections.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard(self.clone())
    }

    pub fn status(&self, now: Instant) -> DrainStatus {
        let started = *self.started_at.lock();
        let connections = self.connections.load(Ordering::Relaxed);
        let elapsed = started.map(|at| now.saturating_duration_since(at));
        DrainStatus {
            draining: started.is_some(),
            complete: elapsed.is_some_and(|e| connections == 0 || e >= self.timeout),
            connections,
            elapsed_ms: elapsed.map(|e| u64::try_from(e.as_millis()).unwrap_or(u64::MAX)),
            timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Waits until the drain is complete (it must have started).
    pub async fn wait_complete(&self) {
        loop {
            if self.status(Instant::now()).complete {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_completes_when_connections_close_or_the_timeout_passes() {
        let ready = Arc::new(AtomicBool::new(true));
        let drain = Arc::new(Drain::new(&DrainConfig::default(), ready.clone()));
        let t0 = Instant::now();
        let guard = drain.track();
        assert!(!drain.status(t0).draining);
        assert!(!drain.status(t0).complete);
        assert!(drain.start(t0));
        assert!(!drain.start(t0), "a second start is a no-op");
        assert!(!ready.load(Ordering::Relaxed));
        let s = drain.status(t0);
        assert!(s.draining && !s.complete && s.connections == 1, "{s:?}");
        assert!(drain.status(t0 + drain.timeout).complete);
        drop(guard);
        assert!(drain.status(t0).complete);
        assert_eq!(drain.deadline(), Some(t0 + drain.timeout));
    }

    #[tokio::test]
    async fn phase_waiters_wake_on_each_step_and_never_go_back() {
        let drain = Arc::new(Drain::new(
            &DrainConfig::default(),
            Arc::new(AtomicBool::new(true)),
        ));
        let wait = |seen| {
            let drain = drain.clone();
            tokio::spawn(async move { drain.next_phase(seen).await })
        };
        let within = |task| tokio::time::timeout(Duration::from_secs(5), task);
        let waiter = wait(Phase::Serving);
        tokio::task::yield_now().await;
        assert_eq!(drain.phase(), Phase::Serving);
        assert!(drain.start(Instant::now()));
        let first = within(waiter).await.expect("woken").expect("task");
        assert_eq!(first, Phase::Draining);
        let waiter = wait(Phase::Draining);
        tokio::task::yield_now().await;
        drain.stop();
        let second = within(waiter).await.expect("woken").expect("task");
        assert_eq!(second, Phase::Stopping);
        assert_eq!(drain.phase(), Phase::Stopping);
        drain.start(Instant::now());
        assert_eq!(
            drain.phase(),
            Phase::Stopping,
            "a late start does not go back"
        );
        // A waiter created after the last step resolves at once.
        let late = tokio::time::timeout(Duration::from_secs(5), drain.next_phase(Phase::Draining));
        assert_eq!(late.await.expect("resolves at once"), Phase::Stopping);
    }
}
