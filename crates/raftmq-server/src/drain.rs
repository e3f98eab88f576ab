//! Draining: a node about to stop hands its clients off. It stops accepting MQTT connections,
//! reports not ready, lets every connection finish what is in flight (acknowledgements waiting
//! for a commit, bytes queued for the socket) and then closes it, telling MQTT 5 clients to use
//! another server. Started by `POST /api/v1/drain` or by the shutdown signal; bounded by
//! `drain.timeout`.

use crate::DrainConfig;
use parking_lot::Mutex;
use raftmq_codec::ByteStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// The drain state of one server, shared by the accept loop, the connection tasks and the
/// HTTP endpoint.
#[derive(Debug)]
pub(crate) struct Drain {
    started: watch::Sender<bool>,
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

/// Counts one open connection while alive.
pub(crate) struct ConnectionGuard(Arc<Drain>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves once the drain behind `rx` has started.
pub(crate) async fn started(rx: &mut watch::Receiver<bool>) {
    loop {
        let started = *rx.borrow_and_update();
        if started {
            return;
        }
        if rx.changed().await.is_err() {
            // The server is gone; its shutdown signal ends the waiter.
            std::future::pending::<()>().await;
        }
    }
}

impl Drain {
    pub fn new(config: &DrainConfig, ready: Arc<AtomicBool>) -> Drain {
        Drain {
            started: watch::channel(false).0,
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
        self.started.send_replace(true);
        true
    }

    /// Resolves once the drain has started.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.started.subscribe()
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
}
