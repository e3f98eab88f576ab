//! Wills in `failover`: which clients with a will connect to the node that is killed, and what
//! a subscriber on a surviving node saw of their wills.
//!
//! Every will must arrive exactly once, after the kill, and not before its Will Delay Interval
//! has passed since the kill (the broker cannot have noticed the loss earlier). A receipt with
//! DUP 1 is a resend of a delivery to the watcher (after it reconnected), not a second
//! publication; a receipt with DUP 0 is a publication.

use crate::summary::WillStats;
use std::time::Instant;

/// One client with a will on the node to be killed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WillSpec {
    /// Names the client in reports, and ends its will's topic.
    pub name: &'static str,
    /// Session Expiry Interval of its session, s; 0: the session ends with the connection
    /// (clean start 1 and no expiry on MQTT 5, clean session 1 on 3.1.1). On 3.1.1 any value
    /// above 0 means clean session 0.
    pub session_expiry: u32,
    /// Will Delay Interval, s (MQTT 5 only).
    pub delay: u32,
}

/// The will clients of a run: a persistent session (expiry `expiry` s) whose will is due at
/// once; a client without a session (expiry 0) with a will; and, on MQTT 5 with `delay` > 0, a
/// persistent session whose will waits `delay` s.
pub fn specs(v5: bool, expiry: u32, delay: u32) -> Vec<WillSpec> {
    let mut specs = vec![
        WillSpec {
            name: "persistent",
            session_expiry: expiry,
            delay: 0,
        },
        WillSpec {
            name: "sessionless",
            session_expiry: 0,
            delay: 0,
        },
    ];
    if v5 && delay > 0 {
        specs.push(WillSpec {
            name: "delayed",
            session_expiry: expiry,
            delay,
        });
    }
    specs
}

/// What the run saw of one will.
#[derive(Clone, Debug, Default)]
pub struct WillLog {
    /// When its client saw its connection end, and why.
    pub client_lost: Option<(Instant, String)>,
    /// Receipts at the watcher: when, and the DUP flag.
    pub receipts: Vec<(Instant, bool)>,
}

impl WillLog {
    /// The first receipt.
    pub fn first(&self) -> Option<Instant> {
        self.receipts.iter().map(|&(at, _)| at).min()
    }

    /// The summary of this will, with times from `kill`.
    pub fn stats(&self, spec: &WillSpec, kill: Option<Instant>) -> WillStats {
        let ms = |at: Instant| {
            kill.map(|k| match at.checked_duration_since(k) {
                Some(d) => d.as_secs_f64() * 1e3,
                None => -(k - at).as_secs_f64() * 1e3,
            })
        };
        WillStats {
            name: spec.name.to_owned(),
            session_expiry: spec.session_expiry,
            will_delay_s: spec.delay,
            client_lost_ms: self.client_lost.as_ref().and_then(|(at, _)| ms(*at)),
            client_lost_reason: self.client_lost.as_ref().map(|(_, r)| r.clone()),
            received_ms: self.first().and_then(ms),
            publications: self.receipts.iter().filter(|(_, dup)| !dup).count() as u64,
            resends: self.receipts.iter().filter(|(_, dup)| *dup).count() as u64,
            received_before_kill: match kill {
                Some(k) => self.receipts.iter().filter(|(at, _)| *at <= k).count() as u64,
                None => self.receipts.len() as u64,
            },
        }
    }
}

/// When the last of `logs` first arrived; `None` while one has not.
pub fn all_received_at(logs: &[WillLog]) -> Option<Instant> {
    logs.iter()
        .map(WillLog::first)
        .try_fold(None, |latest, first| {
            let first = first?;
            Some(Some(latest.map_or(first, |l: Instant| l.max(first))))
        })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_delayed_will_needs_mqtt_5_and_a_delay() {
        let names = |s: Vec<WillSpec>| s.iter().map(|s| s.name).collect::<Vec<_>>();
        assert_eq!(
            names(specs(true, 300, 2)),
            ["persistent", "sessionless", "delayed"]
        );
        assert_eq!(names(specs(true, 300, 0)), ["persistent", "sessionless"]);
        assert_eq!(names(specs(false, 300, 2)), ["persistent", "sessionless"]);
        let s = specs(true, 300, 2);
        assert_eq!((s[0].session_expiry, s[0].delay), (300, 0));
        assert_eq!((s[1].session_expiry, s[1].delay), (0, 0));
        assert_eq!((s[2].session_expiry, s[2].delay), (300, 2));
    }

    #[test]
    fn a_will_received_once_after_its_delay_is_fine() {
        let kill = Instant::now();
        let ms = |m| kill + Duration::from_millis(m);
        let spec = &specs(true, 300, 2)[2];
        let log = WillLog {
            client_lost: Some((ms(3), "the broker closed the connection".into())),
            // A resend to the watcher after it reconnected does not count as a publication.
            receipts: vec![(ms(2_600), true), (ms(2_500), false)],
        };
        let stats = log.stats(spec, Some(kill));
        assert_eq!(stats.received_ms, Some(2_500.0));
        assert_eq!(stats.client_lost_ms, Some(3.0));
        assert_eq!((stats.publications, stats.resends), (1, 1));
        assert_eq!(stats.received_before_kill, 0);
        assert!(stats.problems().is_empty(), "{:?}", stats.problems());
    }

    #[test]
    fn missing_repeated_early_and_premature_wills_are_problems() {
        let kill = Instant::now();
        let ms = |m| kill + Duration::from_millis(m);
        let specs = specs(true, 300, 2);
        let problems = |spec: &WillSpec, log: WillLog| log.stats(spec, Some(kill)).problems();

        let missing = problems(&specs[0], WillLog::default());
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert!(missing[0].contains("not received"), "{missing:?}");

        let twice = WillLog {
            receipts: vec![(ms(10_500), false), (ms(10_600), false)],
            ..WillLog::default()
        };
        let twice = problems(&specs[1], twice);
        assert_eq!(twice.len(), 1, "{twice:?}");
        assert!(twice[0].contains("2 times"), "{twice:?}");

        // Its client lost the connection before the kill: the will fired early.
        let early = WillLog {
            client_lost: Some((kill - Duration::from_millis(500), "closed".into())),
            receipts: vec![(kill - Duration::from_millis(400), false)],
        };
        let early = problems(&specs[0], early);
        assert_eq!(early.len(), 2, "{early:?}");

        // The delayed will came before its delay had passed since the kill.
        let premature = WillLog {
            receipts: vec![(ms(1_200), false)],
            ..WillLog::default()
        };
        let premature = problems(&specs[2], premature);
        assert_eq!(premature.len(), 1, "{premature:?}");
        assert!(premature[0].contains("before its delay"), "{premature:?}");
    }

    #[test]
    fn all_received_waits_for_every_will() {
        let t0 = Instant::now();
        let at = |m| t0 + Duration::from_millis(m);
        let got = |m| WillLog {
            receipts: vec![(at(m), false)],
            ..WillLog::default()
        };
        assert_eq!(all_received_at(&[got(5), got(9), got(7)]), Some(at(9)));
        assert_eq!(all_received_at(&[got(5), WillLog::default()]), None);
        assert_eq!(all_received_at(&[]), None);
    }
}
