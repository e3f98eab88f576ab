//! Waiting for a condition that has no event to wait on (a node's view of the cluster, a
//! counter, a route announced in the background): poll it until it holds or a deadline passes.
//! Every wait has a deadline and names what it waited for, so a test fails instead of hanging.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

/// How often [`eventually`] and [`wait_until`] check by default.
pub const POLL_EVERY: Duration = Duration::from_millis(50);

/// Calls `check` every `every` until it returns `Ok`, and returns that value. Panics after
/// `timeout` naming `what` and the last `Err` (what was seen instead).
pub async fn poll<T, E, F, Fut>(what: &str, timeout: Duration, every: Duration, mut check: F) -> T
where
    E: Debug,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(value) => return value,
            Err(last) => last,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}; last seen: {last:?}"
        );
        tokio::time::sleep(every).await;
    }
}

/// Waits until the async condition `cond` holds, checking every [`POLL_EVERY`]; panics naming
/// `what` after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll(what, timeout, POLL_EVERY, || {
        let holds = cond();
        async move { if holds.await { Ok(()) } else { Err(()) } }
    })
    .await;
}

/// Waits until `cond` holds, checking every few milliseconds; panics naming `what` after
/// [`crate::TIMEOUT`]. For in-process state with no packet to wait for (a subscription made
/// by an external client, a session going offline).
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    poll(what, crate::TIMEOUT, Duration::from_millis(5), || {
        let holds = cond();
        async move { if holds { Ok(()) } else { Err(()) } }
    })
    .await;
}

/// [`poll`] for blocking code (no runtime): calls `check` every `every` until it returns `Ok`;
/// panics naming `what` after `timeout`.
pub fn poll_blocking<T, E: Debug>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<T, E>,
) -> T {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let last = match check() {
            Ok(value) => return value,
            Err(last) => last,
        };
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}; last seen: {last:?}"
        );
        std::thread::sleep(every);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn poll_returns_the_first_ok_value() {
        let calls = AtomicU32::new(0);
        let got = poll(
            "three calls",
            Duration::from_secs(5),
            Duration::ZERO,
            || {
                let n = calls.fetch_add(1, Ordering::Relaxed) + 1;
                async move { if n == 3 { Ok(n) } else { Err(n) } }
            },
        )
        .await;
        assert_eq!(got, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting until never; last seen: \"still false\"")]
    async fn poll_fails_naming_what_and_the_last_value_at_the_deadline() {
        poll::<(), _, _, _>(
            "never",
            Duration::from_millis(50),
            Duration::from_millis(5),
            || async { Err("still false") },
        )
        .await;
    }

    #[tokio::test]
    #[should_panic(expected = "waiting until the flag is set")]
    async fn eventually_fails_when_the_condition_never_holds() {
        eventually("the flag is set", Duration::from_millis(100), || async {
            false
        })
        .await;
    }

    #[test]
    #[should_panic(expected = "waiting until blocking never; last seen: 7")]
    fn poll_blocking_fails_at_the_deadline() {
        poll_blocking(
            "blocking never",
            Duration::from_millis(30),
            Duration::from_millis(5),
            || Err::<(), _>(7),
        );
    }
}
