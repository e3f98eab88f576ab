//! The WAL syncer: one thread per store that makes the unsynced writes of every shard durable
//! with one `fsync` of the shared write-ahead log (RFC 0002, section 6.5).
//!
//! A writer writes without `fsync` (readable at once), then hands the syncer a *waiter*, a
//! callback to run once its write is durable. The thread loops: wait until waiters are
//! pending; take them all; sync the WAL once; run every taken waiter with the result, in the
//! order they were handed in. A waiter is therefore never run before a sync that *started
//! after its write* has returned, and a failed sync fails every waiter it took. Waiters that
//! arrive during a sync wait for the next one: group commit across every shard of the node,
//! with no timer, so the number of syncs per second is bounded by the sync latency, not by the
//! number of writers.
//!
//! When the store is dropped the thread syncs whatever is still pending, runs those waiters and
//! ends; [`WalSyncer`]'s drop joins it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use crate::error::StoreError;

/// What a waiter is told: its write is durable, or the sync that should have made it durable
/// failed (the same error for every waiter of that sync).
pub(crate) type SyncResult = Result<(), Arc<StoreError>>;

/// A callback run on the syncer thread once the writes made before it was handed in are
/// durable. It must be quick (it completes a future or a channel); it must not block.
pub(crate) type Waiter = Box<dyn FnOnce(SyncResult) + Send + 'static>;

#[derive(Default)]
struct Pending {
    waiters: Vec<Waiter>,
    /// Set by the drop of the [`WalSyncer`]: sync what is pending, then end.
    stop: bool,
}

#[derive(Default)]
struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when a waiter arrives or `stop` is set.
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The handle of the syncer thread (one per store).
pub(crate) struct WalSyncer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl WalSyncer {
    /// Starts the thread; `sync` makes every write made before it was called durable (the
    /// store's is `flush_wal(true)`).
    pub(crate) fn start<F>(sync: F) -> Result<WalSyncer, StoreError>
    where
        F: FnMut() -> Result<(), StoreError> + Send + 'static,
    {
        let shared = Arc::new(Shared::default());
        let thread = std::thread::Builder::new()
            .name("raftmq-wal-sync".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || run(&shared, sync)
            })?;
        Ok(WalSyncer {
            shared,
            thread: Some(thread),
        })
    }

    /// Runs `waiter` once every write made before this call is durable (or the sync failed).
    pub(crate) fn submit(&self, waiter: Waiter) {
        let mut pending = self.shared.lock();
        pending.waiters.push(waiter);
        drop(pending);
        self.shared.wake.notify_one();
    }
}

impl Drop for WalSyncer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            // The thread only ends by returning (it runs no code that panics by design); a
            // panic there has already been reported by the panic hook.
            let _ = thread.join();
        }
    }
}

fn run<F>(shared: &Shared, mut sync: F)
where
    F: FnMut() -> Result<(), StoreError>,
{
    loop {
        let waiters = {
            let mut pending = shared.lock();
            while pending.waiters.is_empty() && !pending.stop {
                pending = shared
                    .wake
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            if pending.waiters.is_empty() {
                return; // stopping, and nothing left to make durable
            }
            std::mem::take(&mut pending.waiters)
        };
        let started = Instant::now();
        let result = sync().map_err(Arc::new);
        metrics::histogram!(crate::WAL_SYNC_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::histogram!(crate::WAL_WRITES_PER_BATCH).record(waiters.len() as f64);
        if result.is_err() {
            // Reported where it is handled: every waiter fails (openraft logs it and stops the
            // groups whose log writes it fails, as on any storage error).
            metrics::counter!(crate::WAL_SYNC_FAILURES_TOTAL).increment(1);
        }
        for waiter in waiters {
            waiter(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::mpsc;
    use std::time::Duration;

    const WAIT: Duration = Duration::from_secs(10);

    /// A sync function the test drives: it reports that a sync began, waits for the test to
    /// release it with the result to return, counts the syncs that *returned*, and returns.
    struct Controlled {
        began: mpsc::Receiver<()>,
        release: mpsc::Sender<Result<(), StoreError>>,
        returned: Arc<AtomicU64>,
    }

    fn controlled() -> (WalSyncer, Controlled) {
        let (began_tx, began) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<Result<(), StoreError>>();
        let returned = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&returned);
        let syncer = WalSyncer::start(move || {
            let _ = began_tx.send(());
            let result = release_rx
                .recv_timeout(WAIT)
                .unwrap_or(Err(StoreError::InjectedFault { op: "test timeout" }));
            counter.fetch_add(1, Ordering::SeqCst);
            result
        })
        .expect("start");
        (
            syncer,
            Controlled {
                began,
                release,
                returned,
            },
        )
    }

    /// A waiter that reports, when run, its result and how many syncs had returned by then.
    fn probe(
        name: &'static str,
        returned: &Arc<AtomicU64>,
        done: &mpsc::Sender<(&'static str, bool, u64)>,
    ) -> Waiter {
        let returned = Arc::clone(returned);
        let done = done.clone();
        Box::new(move |result| {
            let _ = done.send((name, result.is_ok(), returned.load(Ordering::SeqCst)));
        })
    }

    #[test]
    fn no_waiter_runs_before_the_sync_that_covers_it_returned() {
        let (syncer, sync) = controlled();
        let (done_tx, done) = mpsc::channel();
        syncer.submit(probe("a", &sync.returned, &done_tx));
        sync.began.recv_timeout(WAIT).expect("first sync began");
        // Arrives during the first sync: must wait for a second one.
        syncer.submit(probe("b", &sync.returned, &done_tx));
        assert!(
            done.try_recv().is_err(),
            "nothing completes while the sync is running"
        );
        sync.release.send(Ok(())).expect("release");
        assert_eq!(done.recv_timeout(WAIT).expect("a"), ("a", true, 1));
        sync.began.recv_timeout(WAIT).expect("second sync began");
        assert!(done.try_recv().is_err(), "b waits for the second sync");
        sync.release.send(Ok(())).expect("release");
        assert_eq!(done.recv_timeout(WAIT).expect("b"), ("b", true, 2));
        drop(syncer);
        assert_eq!(
            sync.returned.load(Ordering::SeqCst),
            2,
            "no sync without waiters"
        );
    }

    #[test]
    fn a_failed_sync_fails_every_waiter_it_took_and_the_next_one_succeeds() {
        let (syncer, sync) = controlled();
        let (done_tx, done) = mpsc::channel();
        syncer.submit(probe("first", &sync.returned, &done_tx));
        sync.began.recv_timeout(WAIT).expect("sync began");
        sync.release
            .send(Err(StoreError::InjectedFault { op: "sync" }))
            .expect("release");
        assert_eq!(done.recv_timeout(WAIT).expect("first"), ("first", false, 1));
        // Several waiters pile up behind a blocked sync and are all failed by it.
        syncer.submit(probe("x", &sync.returned, &done_tx));
        sync.began.recv_timeout(WAIT).expect("sync began");
        for name in ["y", "z"] {
            syncer.submit(probe(name, &sync.returned, &done_tx));
        }
        sync.release.send(Ok(())).expect("release");
        assert_eq!(done.recv_timeout(WAIT).expect("x"), ("x", true, 2));
        sync.began.recv_timeout(WAIT).expect("sync began");
        sync.release
            .send(Err(StoreError::InjectedFault { op: "sync" }))
            .expect("release");
        assert_eq!(done.recv_timeout(WAIT).expect("y"), ("y", false, 3));
        assert_eq!(done.recv_timeout(WAIT).expect("z"), ("z", false, 3));
    }

    #[test]
    fn dropping_the_syncer_completes_what_is_pending() {
        let (syncer, sync) = controlled();
        let (done_tx, done) = mpsc::channel();
        syncer.submit(probe("a", &sync.returned, &done_tx));
        sync.began.recv_timeout(WAIT).expect("sync began");
        syncer.submit(probe("b", &sync.returned, &done_tx));
        // Releases both syncs ahead of time: the drop below joins the thread.
        sync.release.send(Ok(())).expect("release");
        sync.release.send(Ok(())).expect("release");
        drop(syncer);
        assert_eq!(done.recv_timeout(WAIT).expect("a"), ("a", true, 1));
        assert_eq!(done.recv_timeout(WAIT).expect("b"), ("b", true, 2));
    }
}
