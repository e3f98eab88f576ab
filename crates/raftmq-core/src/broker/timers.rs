//! Timers of disconnected sessions: delayed wills and session expiry.
//!
//! A timer names the session's client id and the epoch it was set for: a session resumed,
//! taken over or replaced since then has another epoch, so the timer finds nothing to do.

use crate::broker::{Broker, NEVER_EXPIRES};
use crate::durability::{Fence, StateChange};
use crate::session::PendingWill;
use raftmq_codec::ByteStr;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum TimerKind {
    Will,
    Expire,
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Timer {
    at: Instant,
    kind: TimerKind,
    client_id: ByteStr,
    epoch: u64,
}

/// The timer heap (a leaf lock: nothing else is locked while it is held).
#[derive(Default)]
pub(super) struct Timers {
    heap: BinaryHeap<Reverse<Timer>>,
    waker: Option<Waker>,
    /// A timer earlier than all others was scheduled since [`Broker::poll_timers_changed`]
    /// last reported Ready.
    changed: bool,
}

impl Broker {
    /// Starts the timers of a session that became disconnected at `now` (attached with
    /// `epoch`): its will after `will_delay` seconds, unless the session ends first (the will
    /// then goes out with the end), and its end after `expiry_secs` unless it never expires.
    pub(super) fn start_disconnected_timers(
        &self,
        client_id: &ByteStr,
        epoch: u64,
        will_delay: Option<u32>,
        expiry_secs: u32,
        now: Instant,
    ) {
        let at = |secs: u32| now + Duration::from_secs(u64::from(secs));
        let timer = |secs, kind| Timer {
            at: at(secs),
            kind,
            client_id: client_id.clone(),
            epoch,
        };
        let mut new = Vec::with_capacity(2);
        if let Some(delay) = will_delay.filter(|d| *d < expiry_secs) {
            new.push(timer(delay, TimerKind::Will));
        }
        if expiry_secs != NEVER_EXPIRES {
            new.push(timer(expiry_secs, TimerKind::Expire));
        }
        self.schedule(new);
    }

    fn schedule(&self, new: Vec<Timer>) {
        if new.is_empty() {
            return;
        }
        let mut t = self.timers.lock();
        let earliest = t.heap.peek().map(|Reverse(t)| t.at);
        let mut wake = false;
        for timer in new {
            wake |= earliest.is_none_or(|e| timer.at < e);
            t.heap.push(Reverse(timer));
        }
        if wake {
            t.changed = true;
            if let Some(w) = t.waker.take() {
                w.wake();
            }
        }
    }

    /// When [`Broker::handle_timeout`] next has work (a will delay or session expiry).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.lock().heap.peek().map(|Reverse(t)| t.at)
    }

    /// Ready (once) when a timer earlier than all others was scheduled since the last time it
    /// was Ready: the caller must ask [`Broker::poll_timeout`] again. Registers the waker
    /// otherwise.
    pub fn poll_timers_changed(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut t = self.timers.lock();
        if std::mem::take(&mut t.changed) {
            return Poll::Ready(());
        }
        t.waker = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Runs due timers: publishes delayed wills and ends expired sessions.
    pub fn handle_timeout(&self, now: Instant) {
        loop {
            let timer = {
                let mut t = self.timers.lock();
                match t.heap.peek() {
                    Some(Reverse(timer)) if timer.at <= now => t.heap.pop().map(|Reverse(t)| t),
                    _ => None,
                }
            };
            let Some(timer) = timer else { break };
            if let Some(will) = self.fire(&timer) {
                self.publish_will(will, now);
            }
        }
    }

    /// Runs one due timer, if its session is still the disconnected one it was set for.
    /// Returns the will to publish.
    fn fire(&self, timer: &Timer) -> Option<PendingWill> {
        let mut registry = self.sessions.lock();
        let session = registry.get(&timer.client_id).cloned()?;
        // The epoch the timer was set for: any attach since has moved it on.
        let mut st = session.lock_attached(timer.epoch).ok()?;
        if st.online {
            return None;
        }
        let client_id = session.client_id().clone();
        let will = st.will.take();
        let record = match timer.kind {
            TimerKind::Will => will
                .is_some()
                .then_some(StateChange::WillPublished { client_id }),
            TimerKind::Expire => {
                self.discard_locked(&session, &mut st);
                drop(st);
                self.remove_from_registry(&mut registry, &session);
                Some(StateChange::SessionEnded { client_id })
            }
        };
        if let Some(record) = record.filter(|_| session.is_durable()) {
            if timer.kind == TimerKind::Expire {
                session.set_durable(false);
            }
            drop(registry);
            // Fenced: if the client has reconnected (here or on another node) by the time
            // this is applied, its new session keeps its will and its state.
            self.propose_fenced(
                Fence::Offline {
                    client_id: session.client_id().clone(),
                    epoch: timer.epoch,
                },
                vec![record],
            );
        }
        will
    }

    pub(super) fn publish_will(&self, will: PendingWill, now: Instant) {
        self.stats
            .wills_published
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.publish(will.into_message(now), now);
    }
}
