//! The history checker on hand-written histories: each rule has histories that must fail it and
//! near misses that must pass, and a history survives its JSON-lines file.

use raftmq_tests::history::{
    AckKind, Event, History, HistoryError, NEVER_EXPIRES, Report, Rule, Violation, Will, check,
};
use std::sync::Arc;
use std::time::Duration;

/// Writes a history event by event, one millisecond apart unless told to wait.
struct Run {
    history: History,
    ms: u64,
}

impl Run {
    fn new() -> Run {
        Run {
            history: History::new(),
            ms: 0,
        }
    }

    fn ev(&mut self, client: &str, event: Event) -> &mut Run {
        self.ms += 1;
        self.history
            .record_at(Duration::from_millis(self.ms), client, event);
        self
    }

    fn wait(&mut self, ms: u64) -> &mut Run {
        self.ms += ms;
        self
    }

    /// A new persistent session subscribed to `filter`.
    fn subscriber(&mut self, client: &str, filter: &str, qos: u8) -> &mut Run {
        self.ev(client, Event::connect(true, NEVER_EXPIRES, false))
            .ev(client, Event::subscribe(filter, qos))
    }

    /// A QoS 1 publish acknowledged with success.
    fn publish1(&mut self, client: &str, payload: &str, topic: &str, pid: u16) -> &mut Run {
        self.ev(client, Event::publish(payload, topic, 1, Some(pid)))
            .ev(client, Event::ack(payload, pid, AckKind::Puback))
    }

    /// A QoS 2 publish through PUBREC and PUBCOMP.
    fn publish2(&mut self, client: &str, payload: &str, topic: &str, pid: u16) -> &mut Run {
        self.ev(client, Event::publish(payload, topic, 2, Some(pid)))
            .ev(client, Event::ack(payload, pid, AckKind::Pubrec))
            .ev(client, Event::ack(payload, pid, AckKind::Pubcomp))
    }

    fn deliver(
        &mut self,
        client: &str,
        payload: &str,
        topic: &str,
        qos: u8,
        pid: Option<u16>,
        dup: bool,
    ) -> &mut Run {
        self.ev(client, Event::delivery(payload, topic, qos, pid, dup))
    }

    fn end(&mut self, client: &str, graceful: bool) -> &mut Run {
        self.ev(client, Event::ConnectionEnd { graceful })
    }

    fn check(&self) -> Report {
        check(&self.history)
    }
}

fn will(payload: &str, delay_secs: u32) -> Will {
    Will {
        topic: "wills/owner".to_owned(),
        payload: payload.to_owned(),
        qos: 1,
        delay_secs,
    }
}

fn connect_with_will(expiry: u32, will: Will) -> Event {
    Event::Connect {
        clean_start: true,
        session_expiry: expiry,
        session_present: false,
        will: Some(will),
    }
}

#[track_caller]
fn assert_clean(report: &Report) {
    assert!(report.is_ok(), "expected no violation:\n{report}");
}

/// Asserts the report has violations, all of `rule`, and returns them.
#[track_caller]
fn assert_only(report: &Report, rule: Rule) -> Vec<Violation> {
    let found: Vec<Violation> = report.of(rule).cloned().collect();
    assert!(!found.is_empty(), "expected a {rule} violation:\n{report}");
    assert_eq!(
        found.len(),
        report.violations.len(),
        "expected only {rule} violations:\n{report}"
    );
    found
}

// ---------------------------------------------------------------------------------------------
// Clean histories
// ---------------------------------------------------------------------------------------------

#[test]
fn a_clean_run_with_reconnects_passes_and_is_counted() {
    let mut run = Run::new();
    run.subscriber("sub", "t/#", 2)
        .ev("pub", Event::connect(true, 0, false))
        .ev("pub2", Event::connect(false, 3600, false))
        .publish1("pub", "m1", "t/a", 1)
        .publish2("pub2", "q1", "t/b", 1)
        .deliver("sub", "m1", "t/a", 1, Some(1), false)
        .deliver("sub", "q1", "t/b", 2, Some(2), false)
        .ev("sub", Event::Released { packet_id: 2 })
        .end("sub", false)
        .publish1("pub", "m2", "t/a", 1)
        .ev("sub", Event::connect(false, NEVER_EXPIRES, true))
        .deliver("sub", "m2", "t/a", 1, Some(3), false)
        .end("pub2", false)
        .ev("pub2", Event::connect(false, 3600, true));
    let report = run.check();
    assert_clean(&report);
    let c = &report.counts;
    assert_eq!(c.events, run.history.len());
    assert_eq!(c.publishes, 3);
    assert_eq!(c.acknowledged, 3);
    assert_eq!(c.expected_deliveries, 3);
    assert_eq!(c.delivered, 3);
    assert_eq!(c.missing, 0);
    assert_eq!(c.duplicates, 0);
    // The subscriber's and the QoS 2 publisher's resumptions (the first connect of a
    // persistent session is unknown territory); the clean starts.
    assert_eq!(c.session_checks, 4);
}

#[test]
fn qos1_duplicates_are_allowed_and_counted() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 1)
        .ev("pub", Event::connect(true, 0, false))
        .publish1("pub", "m1", "t", 1)
        .deliver("sub", "m1", "t", 1, Some(1), false)
        .end("sub", false)
        .ev("sub", Event::connect(false, NEVER_EXPIRES, true))
        // Not acknowledged before the connection went: sent again with DUP.
        .deliver("sub", "m1", "t", 1, Some(1), true)
        // And the publisher retried it as a new message after a lost PUBACK.
        .ev("pub", Event::publish("m1", "t", 1, Some(2)))
        .ev("pub", Event::ack("m1", 2, AckKind::Puback))
        .deliver("sub", "m1", "t", 1, Some(2), false);
    let report = run.check();
    assert_clean(&report);
    assert_eq!(report.counts.delivered, 1);
    assert_eq!(report.counts.duplicates, 2);
}

#[test]
fn a_qos2_resend_before_pubrel_is_not_a_duplicate() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 2)
        .ev("pub", Event::connect(false, 3600, false))
        .publish2("pub", "q1", "t", 1)
        .deliver("sub", "q1", "t", 2, Some(7), false)
        // PUBREC lost with the connection: the broker sends the PUBLISH again.
        .end("sub", false)
        .ev("sub", Event::connect(false, NEVER_EXPIRES, true))
        .deliver("sub", "q1", "t", 2, Some(7), true)
        .ev("sub", Event::Released { packet_id: 7 });
    let report = run.check();
    assert_clean(&report);
    assert_eq!(report.counts.resends, 1);
    assert_eq!(report.counts.duplicates, 0);
}

#[test]
fn a_released_qos2_packet_id_may_carry_the_next_message() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 2)
        .ev("pub", Event::connect(false, 3600, false))
        .publish2("pub", "q1", "t", 1)
        .publish2("pub", "q2", "t", 2)
        .deliver("sub", "q1", "t", 2, Some(1), false)
        .ev("sub", Event::Released { packet_id: 1 })
        .deliver("sub", "q2", "t", 2, Some(1), false)
        .ev("sub", Event::Released { packet_id: 1 });
    assert_clean(&run.check());
}

#[test]
fn a_qos2_message_published_again_as_a_new_message_may_arrive_twice() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 2)
        .ev("pub", Event::connect(true, 0, false))
        .ev("pub", Event::publish("q1", "t", 2, Some(1)))
        .end("pub", false)
        .ev(
            "pub",
            Event::PublishFailed {
                payload: "q1".to_owned(),
            },
        )
        // A clean session cannot resume the exchange: a new message with the same content.
        .ev("pub", Event::connect(true, 0, false))
        .publish2("pub", "q1", "t", 1)
        .deliver("sub", "q1", "t", 2, Some(1), false)
        .ev("sub", Event::Released { packet_id: 1 })
        .deliver("sub", "q1", "t", 2, Some(2), false)
        .ev("sub", Event::Released { packet_id: 2 });
    assert_clean(&run.check());
}

#[test]
fn overlapping_subscriptions_may_each_get_a_qos2_copy() {
    let mut run = Run::new();
    run.subscriber("sub", "a/#", 2)
        .ev("sub", Event::subscribe("a/b", 2))
        .ev("pub", Event::connect(false, 3600, false))
        .publish2("pub", "q1", "a/b", 1)
        .deliver("sub", "q1", "a/b", 2, Some(1), false)
        .deliver("sub", "q1", "a/b", 2, Some(2), false);
    assert_clean(&run.check());
}

#[test]
fn a_subscription_made_after_the_publish_is_not_owed_the_message() {
    let mut run = Run::new();
    run.ev("pub", Event::connect(true, 0, false))
        .publish1("pub", "m1", "t", 1)
        .subscriber("sub", "t", 1);
    let report = run.check();
    assert_clean(&report);
    assert_eq!(report.counts.expected_deliveries, 0);
}

#[test]
fn a_subscriber_whose_session_ended_is_not_owed_the_message() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 1)
        .end("sub", false)
        .ev("pub", Event::connect(true, 0, false))
        .publish1("pub", "m1", "t", 1)
        // Clean start: the old session and its subscription are gone.
        .ev("sub", Event::connect(true, NEVER_EXPIRES, false));
    let report = run.check();
    assert_clean(&report);
    assert_eq!(report.counts.expected_deliveries, 0);
}

#[test]
fn a_subscriber_whose_session_expired_is_not_owed_the_message() {
    let mut run = Run::new();
    run.ev("sub", Event::connect(true, 5, false))
        .ev("sub", Event::subscribe("t", 1))
        .end("sub", false)
        .ev("pub", Event::connect(true, 0, false))
        .publish1("pub", "m1", "t", 1)
        // 5 s of session expiry, the run ends 20 s after the subscriber left.
        .wait(20_000)
        .ev("pub", Event::ConnectionEnd { graceful: true });
    let report = run.check();
    assert_clean(&report);
    assert_eq!(report.counts.expected_deliveries, 0);
}

#[test]
fn a_will_is_owed_only_to_sessions_subscribed_before_the_end_and_alive_after() {
    let mut run = Run::new();
    // Replaced by a clean start.
    run.subscriber("replaced", "wills/#", 1)
        .end("replaced", false)
        // Expires (5 s) long before the run ends.
        .ev("expired", Event::connect(true, 5, false))
        .ev("expired", Event::subscribe("wills/#", 1))
        .end("expired", false)
        .ev("owner", connect_with_will(0, will("w1", 0)))
        .end("owner", false)
        // Subscribed after the will was due.
        .subscriber("late", "wills/#", 1)
        .ev("replaced", Event::connect(true, NEVER_EXPIRES, false))
        .wait(20_000)
        .ev("late", Event::subscribe("other", 1));
    let report = run.check();
    assert_clean(&report);
    assert_eq!(report.counts.wills_checked, 1);
}

#[test]
fn a_will_on_a_take_over_may_be_published_once_or_not() {
    for published in [false, true] {
        let mut run = Run::new();
        run.subscriber("watcher", "wills/#", 1)
            .ev("owner", connect_with_will(0, will("w1", 0)))
            // The same client id connects again while the first connection is open.
            .ev("owner", Event::connect(true, 0, false));
        if published {
            run.deliver("watcher", "w1", "wills/owner", 1, Some(1), false);
        }
        run.wait(5_000).ev("watcher", Event::subscribe("other", 1));
        assert_clean(&run.check());
    }
}

#[test]
fn a_clean_start_without_connack_leaves_the_old_subscriptions_in_doubt() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 1)
        .end("sub", false)
        // The broker may have replaced the session with an empty one, then lost the client.
        .ev(
            "sub",
            Event::ConnectFailed {
                clean_start: true,
                session_expiry: NEVER_EXPIRES,
            },
        )
        .ev("pub", Event::connect(true, 0, false))
        .publish1("pub", "m1", "t", 1)
        .ev("sub", Event::connect(false, NEVER_EXPIRES, true));
    let report = run.check();
    assert_clean(&report);
    assert_eq!(report.counts.expected_deliveries, 0);
}

#[test]
fn unacknowledged_and_refused_messages_are_not_owed() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 1)
        .ev("pub", Event::connect(true, 0, false))
        .ev("pub", Event::publish("refused", "t", 1, Some(1)))
        .ev(
            "pub",
            Event::PublishAck {
                payload: "refused".to_owned(),
                packet_id: 1,
                kind: AckKind::Puback,
                reason: 0x97,
            },
        )
        .ev("pub", Event::publish("lost", "t", 1, Some(2)))
        .end("pub", false)
        .ev(
            "pub",
            Event::PublishFailed {
                payload: "lost".to_owned(),
            },
        );
    let report = run.check();
    assert_clean(&report);
    assert_eq!(report.counts.refused, 1);
    assert_eq!(report.counts.unacknowledged, 1);
    assert_eq!(report.counts.expected_deliveries, 0);
}

#[test]
fn redeliveries_after_a_reconnect_may_repeat_earlier_messages() {
    // MQTT §4.6: published 1,2,3,4, received 1,2,3,2,3,4 with QoS 1 in flight.
    let mut run = Run::new();
    run.subscriber("sub", "t", 1)
        .ev("pub", Event::connect(true, 0, false));
    for (i, m) in ["m1", "m2", "m3", "m4"].into_iter().enumerate() {
        run.publish1("pub", m, "t", 1);
        if i < 3 {
            run.deliver("sub", m, "t", 1, Some(10 + i as u16), false);
        }
    }
    run.end("sub", false)
        .ev("sub", Event::connect(false, NEVER_EXPIRES, true))
        .deliver("sub", "m2", "t", 1, Some(11), true)
        .deliver("sub", "m3", "t", 1, Some(12), true)
        .deliver("sub", "m4", "t", 1, Some(13), false);
    let report = run.check();
    assert_clean(&report);
    assert_eq!(report.counts.ordering_checks, 4);
    assert_eq!(report.counts.duplicates, 2);
}

#[test]
fn messages_never_acknowledged_or_on_other_topics_are_not_ordered() {
    let mut run = Run::new();
    run.subscriber("sub", "t/#", 1)
        .ev("pub", Event::connect(true, 0, false))
        // Sent, connection lost: the broker may commit it late.
        .ev("pub", Event::publish("late", "t/a", 1, Some(1)))
        .end("pub", false)
        .ev("pub", Event::connect(true, 0, false))
        .publish1("pub", "m1", "t/a", 1)
        .publish1("pub", "other", "t/b", 2)
        .deliver("sub", "other", "t/b", 1, Some(1), false)
        .deliver("sub", "m1", "t/a", 1, Some(2), false)
        .deliver("sub", "late", "t/a", 1, Some(3), false);
    assert_clean(&run.check());
}

#[test]
fn a_retained_copy_on_subscribe_is_exempt_from_order_and_qos2_counts() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 2)
        .ev("pub", Event::connect(false, 3600, false))
        .publish2("pub", "q1", "t", 1)
        .publish2("pub", "q2", "t", 2)
        .deliver("sub", "q1", "t", 2, Some(1), false)
        .ev("sub", Event::Released { packet_id: 1 })
        .ev("sub", Event::subscribe("t", 2))
        .ev(
            "sub",
            Event::Delivery {
                payload: "q1".to_owned(),
                topic: "t".to_owned(),
                qos: 2,
                packet_id: Some(2),
                dup: false,
                retain: true,
            },
        )
        .ev("sub", Event::Released { packet_id: 2 })
        .deliver("sub", "q2", "t", 2, Some(3), false);
    assert_clean(&run.check());
}

#[test]
fn a_session_within_the_expiry_tolerance_is_not_judged() {
    for present in [true, false] {
        let mut run = Run::new();
        run.ev("c", Event::connect(true, 10, false))
            .end("c", false)
            // 10 s expiry, back after 11 s: within the default tolerance of the deadline.
            .wait(11_000)
            .ev("c", Event::connect(false, 10, present));
        let report = run.check();
        assert_clean(&report);
        assert_eq!(report.counts.session_checks, 1, "only the clean start");
    }
}

#[test]
fn a_will_is_published_once_after_an_ungraceful_end() {
    let mut run = Run::new();
    run.subscriber("watcher", "wills/#", 1)
        .ev("owner", connect_with_will(0, will("w1", 0)))
        .end("owner", false)
        .deliver("watcher", "w1", "wills/owner", 1, Some(1), false)
        // Not acknowledged in time: the same publication again with DUP.
        .end("watcher", false)
        .ev("watcher", Event::connect(false, NEVER_EXPIRES, true))
        .deliver("watcher", "w1", "wills/owner", 1, Some(1), true)
        .wait(5_000)
        .ev("watcher", Event::subscribe("other", 1));
    let report = run.check();
    assert_clean(&report);
    assert_eq!(report.counts.wills_checked, 1);
}

#[test]
fn a_delayed_will_waits_and_is_cancelled_by_a_return() {
    let mut run = Run::new();
    run.subscriber("watcher", "wills/#", 1)
        // Came back after 1 s of a 5 s delay: no will.
        .ev("a", connect_with_will(60, will("wa", 5)))
        .end("a", false)
        .wait(1_000)
        .ev("a", Event::connect(false, 60, true))
        // Not back: published after the delay.
        .ev("b", connect_with_will(60, will("wb", 5)))
        .end("b", false)
        .wait(5_500)
        .deliver("watcher", "wb", "wills/owner", 1, Some(1), false)
        .wait(5_000)
        .ev("watcher", Event::subscribe("other", 1));
    let report = run.check();
    assert_clean(&report);
    assert_eq!(report.counts.wills_checked, 2);
}

// ---------------------------------------------------------------------------------------------
// Histories that must fail
// ---------------------------------------------------------------------------------------------

#[test]
fn an_acknowledged_message_that_never_arrives_fails() {
    let mut run = Run::new();
    run.subscriber("sub", "t/#", 1)
        .ev("pub", Event::connect(true, 0, false))
        .publish1("pub", "m1", "t/a", 1)
        .deliver("sub", "m1", "t/a", 1, Some(1), false)
        .publish1("pub", "m2", "t/a", 2);
    let report = run.check();
    let found = assert_only(&report, Rule::Missing);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].client, "sub");
    assert_eq!(found[0].payload.as_deref(), Some("m2"));
    // The subscribe, the attempt and the acknowledgement are there to debug it.
    let kinds: Vec<&Event> = found[0].events.iter().map(|e| &e.event).collect();
    assert!(kinds.contains(&&Event::subscribe("t/#", 1)));
    assert!(kinds.contains(&&Event::ack("m2", 2, AckKind::Puback)));
    assert_eq!(report.counts.expected_deliveries, 2);
    assert_eq!(report.counts.missing, 1);
    assert!(report.to_string().contains("m2"), "{report}");
}

#[test]
fn an_acknowledged_qos2_message_missing_at_a_disconnected_subscriber_fails() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 2)
        .end("sub", false)
        .ev("pub", Event::connect(false, 3600, false))
        .publish2("pub", "q1", "t", 1);
    let report = run.check();
    let found = assert_only(&report, Rule::Missing);
    assert!(found[0].detail.contains("NOT connected"), "{report}");
    assert_eq!(found[0].payload.as_deref(), Some("q1"));
}

#[test]
fn a_qos2_message_delivered_twice_fails() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 2)
        .ev("pub", Event::connect(false, 3600, false))
        .publish2("pub", "q1", "t", 1)
        .deliver("sub", "q1", "t", 2, Some(1), false)
        .ev("sub", Event::Released { packet_id: 1 })
        .deliver("sub", "q1", "t", 2, Some(2), false);
    let found = assert_only(&run.check(), Rule::Qos2Duplicate);
    assert_eq!(found[0].payload.as_deref(), Some("q1"));
}

#[test]
fn a_qos2_resend_after_pubrel_is_a_second_delivery() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 2)
        .ev("pub", Event::connect(false, 3600, false))
        .publish2("pub", "q1", "t", 1)
        .deliver("sub", "q1", "t", 2, Some(4), false)
        .ev("sub", Event::Released { packet_id: 4 })
        .end("sub", false)
        .ev("sub", Event::connect(false, NEVER_EXPIRES, true))
        // Same packet id and DUP, but the receiver had already released it.
        .deliver("sub", "q1", "t", 2, Some(4), true);
    assert_only(&run.check(), Rule::Qos2Duplicate);
}

#[test]
fn a_qos2_message_resumed_by_its_publisher_still_must_arrive_once() {
    // The publisher sends it again in its resumed session with the same packet id: the broker
    // holds that id until PUBREL and must deduplicate, DUP or not.
    for dup in [true, false] {
        let mut run = Run::new();
        run.subscriber("sub", "t", 2)
            .ev("pub", Event::connect(false, 3600, false))
            .ev("pub", Event::publish("q1", "t", 2, Some(1)))
            .end("pub", false)
            .ev("pub", Event::connect(false, 3600, true))
            .ev(
                "pub",
                Event::PublishAttempt {
                    payload: "q1".to_owned(),
                    topic: "t".to_owned(),
                    qos: 2,
                    packet_id: Some(1),
                    dup,
                },
            )
            .ev("pub", Event::ack("q1", 1, AckKind::Pubrec))
            .deliver("sub", "q1", "t", 2, Some(1), false)
            .ev("sub", Event::Released { packet_id: 1 })
            .deliver("sub", "q1", "t", 2, Some(2), false);
        assert_only(&run.check(), Rule::Qos2Duplicate);
    }
}

#[test]
fn a_qos2_message_sent_again_after_its_pubrec_may_arrive_twice() {
    // After PUBREC (success or refusal) the exchange is over: the same packet id in the same
    // session is a new message to the broker.
    for reason in [0x00, 0x97] {
        let mut run = Run::new();
        run.subscriber("sub", "t", 2)
            .ev("pub", Event::connect(false, 3600, false))
            .ev("pub", Event::publish("q1", "t", 2, Some(1)))
            .ev(
                "pub",
                Event::PublishAck {
                    payload: "q1".to_owned(),
                    packet_id: 1,
                    kind: AckKind::Pubrec,
                    reason,
                },
            )
            .publish2("pub", "q1", "t", 1)
            .deliver("sub", "q1", "t", 2, Some(1), false)
            .ev("sub", Event::Released { packet_id: 1 })
            .deliver("sub", "q1", "t", 2, Some(2), false)
            .ev("sub", Event::Released { packet_id: 2 });
        assert_clean(&run.check());
    }
}

#[test]
fn a_qos2_resend_without_dup_fails() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 2)
        .ev("pub", Event::connect(false, 3600, false))
        .publish2("pub", "q1", "t", 1)
        .deliver("sub", "q1", "t", 2, Some(1), false)
        .end("sub", false)
        .ev("sub", Event::connect(false, NEVER_EXPIRES, true))
        .deliver("sub", "q1", "t", 2, Some(1), false);
    assert_only(&run.check(), Rule::ResendWithoutDup);
}

#[test]
fn a_new_qos2_message_on_a_held_packet_id_fails() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 2)
        .ev("pub", Event::connect(false, 3600, false))
        .publish2("pub", "q1", "t", 1)
        .publish2("pub", "q2", "t", 2)
        .deliver("sub", "q1", "t", 2, Some(1), false)
        // No PUBREL for 1 yet: the receiver takes this for q1 again and drops q2.
        .deliver("sub", "q2", "t", 2, Some(1), true);
    let report = run.check();
    assert_eq!(report.of(Rule::PacketIdInUse).count(), 1, "{report}");
    let missing: Vec<_> = report.of(Rule::Missing).collect();
    assert_eq!(missing.len(), 1, "{report}");
    assert_eq!(missing[0].payload.as_deref(), Some("q2"));
}

#[test]
fn a_message_delivered_before_one_acknowledged_ahead_of_it_fails() {
    // On two connections of the publisher: only the acknowledgement orders them.
    let mut run = Run::new();
    run.subscriber("sub", "t", 1)
        .ev("pub", Event::connect(true, 0, false))
        .publish1("pub", "m1", "t", 1)
        .end("pub", false)
        .ev("pub", Event::connect(true, 0, false))
        .publish1("pub", "m2", "t", 1)
        .deliver("sub", "m2", "t", 1, Some(1), false)
        .deliver("sub", "m1", "t", 1, Some(2), false);
    let found = assert_only(&run.check(), Rule::OutOfOrder);
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].payload.as_deref(), Some("m2"));
    assert!(found[0].detail.contains("m1"), "{}", found[0].detail);
}

#[test]
fn pipelined_messages_delivered_out_of_order_fail() {
    // Both in flight on one connection, so neither was acknowledged before the other was sent.
    let mut run = Run::new();
    run.subscriber("sub", "t", 2)
        .ev("pub", Event::connect(true, 0, false))
        .ev("pub", Event::publish("m1", "t", 1, Some(1)))
        .ev("pub", Event::publish("m2", "t", 1, Some(2)))
        .ev("pub", Event::ack("m1", 1, AckKind::Puback))
        .ev("pub", Event::ack("m2", 2, AckKind::Puback))
        .deliver("sub", "m2", "t", 1, Some(1), false)
        .deliver("sub", "m1", "t", 1, Some(2), false);
    let found = assert_only(&run.check(), Rule::OutOfOrder);
    assert_eq!(found[0].payload.as_deref(), Some("m2"));
}

#[test]
fn session_present_after_a_clean_start_fails() {
    let mut run = Run::new();
    run.ev("c", Event::connect(true, NEVER_EXPIRES, true));
    assert_only(&run.check(), Rule::SessionPresent);
}

#[test]
fn a_lost_persistent_session_fails() {
    let mut run = Run::new();
    run.ev("c", Event::connect(true, NEVER_EXPIRES, false))
        .end("c", false)
        .ev("c", Event::connect(false, NEVER_EXPIRES, false));
    let found = assert_only(&run.check(), Rule::SessionPresent);
    assert!(found[0].detail.contains("should still exist"));
}

#[test]
fn a_lost_session_is_held_to_what_it_was_owed() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 1)
        .ev("pub", Event::connect(true, 0, false))
        .publish1("pub", "m1", "t", 1)
        .publish1("pub", "m2", "t", 2)
        .deliver("sub", "m1", "t", 1, Some(1), false)
        .end("sub", false)
        .ev("sub", Event::connect(false, NEVER_EXPIRES, false))
        .ev("sub", Event::subscribe("t", 1))
        .publish1("pub", "m3", "t", 3)
        .deliver("sub", "m3", "t", 1, Some(1), false);
    let report = run.check();
    assert_eq!(report.of(Rule::SessionPresent).count(), 1, "{report}");
    let missing: Vec<_> = report.of(Rule::Missing).collect();
    assert_eq!(missing.len(), 1, "{report}");
    assert_eq!(missing[0].payload.as_deref(), Some("m2"));
    assert!(missing[0].detail.contains("lost the session"), "{report}");
    assert_eq!(report.violations.len(), 2, "{report}");
}

#[test]
fn a_session_present_after_the_session_ended_fails() {
    // Expiry 0: the session ends with the connection.
    let mut run = Run::new();
    run.ev("a", Event::connect(true, 0, false))
        .end("a", true)
        .ev("a", Event::connect(false, 3600, true));
    assert_only(&run.check(), Rule::SessionPresent);

    // Ended by the test.
    let mut run = Run::new();
    run.ev("b", Event::connect(true, NEVER_EXPIRES, false))
        .end("b", true)
        .ev("b", Event::SessionEnded)
        .ev("b", Event::connect(false, NEVER_EXPIRES, true));
    assert_only(&run.check(), Rule::SessionPresent);

    // Expired: 10 s, back after 20 s.
    let mut run = Run::new();
    run.ev("c", Event::connect(true, 10, false))
        .end("c", false)
        .wait(20_000)
        .ev("c", Event::connect(false, 10, true));
    assert_only(&run.check(), Rule::SessionPresent);
}

#[test]
fn a_will_published_twice_fails() {
    let mut run = Run::new();
    run.subscriber("watcher", "wills/#", 1)
        .ev("owner", connect_with_will(0, will("w1", 0)))
        .end("owner", false)
        .deliver("watcher", "w1", "wills/owner", 1, Some(1), false)
        .deliver("watcher", "w1", "wills/owner", 1, Some(2), false)
        .wait(5_000)
        .ev("watcher", Event::subscribe("other", 1));
    let found = assert_only(&run.check(), Rule::WillDuplicated);
    assert_eq!(found[0].client, "watcher");
    assert_eq!(found[0].payload.as_deref(), Some("w1"));
}

#[test]
fn a_will_that_never_comes_fails() {
    let mut run = Run::new();
    run.subscriber("watcher", "wills/#", 1)
        .ev("owner", connect_with_will(0, will("w1", 0)))
        .end("owner", false)
        .wait(5_000)
        .ev("watcher", Event::subscribe("other", 1));
    let found = assert_only(&run.check(), Rule::WillMissing);
    assert_eq!(found[0].client, "watcher");
}

#[test]
fn a_will_after_a_normal_disconnect_fails() {
    let mut run = Run::new();
    run.subscriber("watcher", "wills/#", 1)
        .ev("owner", connect_with_will(0, will("w1", 0)))
        .end("owner", true)
        .deliver("watcher", "w1", "wills/owner", 1, Some(1), false);
    let found = assert_only(&run.check(), Rule::WillUnexpected);
    assert!(found[0].detail.contains("normal DISCONNECT"));
}

#[test]
fn a_will_while_the_connection_is_open_fails() {
    let mut run = Run::new();
    run.subscriber("watcher", "wills/#", 1)
        .ev("owner", connect_with_will(0, will("w1", 0)))
        .deliver("watcher", "w1", "wills/owner", 1, Some(1), false);
    assert_only(&run.check(), Rule::WillUnexpected);
}

#[test]
fn a_will_despite_a_return_within_the_delay_fails() {
    let mut run = Run::new();
    run.subscriber("watcher", "wills/#", 1)
        .ev("owner", connect_with_will(60, will("w1", 10)))
        .end("owner", false)
        .wait(1_000)
        .ev("owner", Event::connect(false, 60, true))
        .wait(10_000)
        .deliver("watcher", "w1", "wills/owner", 1, Some(1), false);
    let found = assert_only(&run.check(), Rule::WillUnexpected);
    assert!(found[0].detail.contains("within the will delay"));
}

#[test]
fn a_will_before_its_delay_fails() {
    let mut run = Run::new();
    run.subscriber("watcher", "wills/#", 1)
        .ev("owner", connect_with_will(60, will("w1", 10)))
        .end("owner", false)
        .wait(1_000)
        .deliver("watcher", "w1", "wills/owner", 1, Some(1), false)
        .wait(20_000)
        .ev("watcher", Event::subscribe("other", 1));
    assert_only(&run.check(), Rule::WillEarly);
}

#[test]
fn a_payload_nobody_published_fails() {
    let mut run = Run::new();
    run.subscriber("sub", "t", 1)
        .deliver("sub", "ghost", "t", 1, Some(1), false);
    assert_only(&run.check(), Rule::Phantom);

    // Published, but delivered on another topic.
    let mut run = Run::new();
    run.subscriber("sub", "t/#", 1)
        .ev("pub", Event::connect(true, 0, false))
        .ev("pub", Event::publish("m1", "t/a", 0, None))
        .deliver("sub", "m1", "t/b", 0, None, false);
    assert_only(&run.check(), Rule::Phantom);
}

#[test]
fn a_history_the_checker_cannot_interpret_is_reported() {
    let mut run = Run::new();
    run.ev("pub", Event::connect(true, 0, false))
        .ev("pub", Event::ack("never-sent", 1, AckKind::Puback));
    assert_only(&run.check(), Rule::InvalidHistory);

    let history = History::new();
    history.record_at(
        Duration::from_millis(5),
        "c",
        Event::connect(true, 0, false),
    );
    history.record_at(
        Duration::from_millis(1),
        "c",
        Event::ConnectionEnd { graceful: true },
    );
    assert_only(&check(&history), Rule::InvalidHistory);
}

// ---------------------------------------------------------------------------------------------
// Recording and files
// ---------------------------------------------------------------------------------------------

#[test]
fn a_history_survives_its_json_lines_file() {
    let mut run = Run::new();
    run.subscriber("sub", "t/#", 2)
        .ev(
            "pub",
            Event::ConnectFailed {
                clean_start: false,
                session_expiry: 3600,
            },
        )
        .ev(
            "pub",
            Event::ConnectRefused {
                clean_start: false,
                session_expiry: 3600,
                code: 0x88,
            },
        )
        .ev("pub", connect_with_will(3600, will("w", 3)))
        .publish1("pub", "m1", "t/a", 1)
        .publish2("pub", "q1", "t/b", 2)
        .ev("pub", Event::publish("m0", "t/c", 0, None))
        .ev(
            "pub",
            Event::PublishFailed {
                payload: "m0".to_owned(),
            },
        )
        .deliver("sub", "m1", "t/a", 1, Some(1), false)
        .deliver("sub", "q1", "t/b", 2, Some(2), true)
        .ev("sub", Event::Released { packet_id: 2 })
        .ev(
            "sub",
            Event::Unsubscribe {
                filter: "t/#".to_owned(),
            },
        )
        .end("pub", false)
        .ev("pub", Event::SessionEnded);
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("history.jsonl");
    run.history.save(&path).expect("save");

    let text = std::fs::read_to_string(&path).expect("read");
    assert_eq!(text.lines().count(), run.history.len());
    assert!(
        text.lines()
            .next()
            .is_some_and(|l| l.contains("\"event\":\"connect\"")),
        "{text}"
    );

    let loaded = History::load(&path).expect("load");
    assert_eq!(loaded.events(), run.history.events());
    assert_eq!(check(&loaded), run.check());
}

#[test]
fn a_damaged_history_file_names_the_line() {
    let text = "{\"seq\":0,\"at_us\":1,\"client\":\"c\",\"event\":\"session_ended\"}\n\
                {\"seq\":1,\"at_us\":2,\"client\":\"c\",\"event\":\"no_such_event\"}\n";
    match History::read_jsonl(text.as_bytes()) {
        Err(HistoryError::Parse { line, .. }) => assert_eq!(line, 2),
        other => panic!("expected a parse error on line 2, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_append_in_one_consistent_order() {
    fn shareable<T: Send + Sync>() {}
    shareable::<History>();

    const TASKS: usize = 8;
    const EACH: u16 = 500;
    let history = Arc::new(History::new());
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let history = history.clone();
            tokio::spawn(async move {
                let client = format!("client-{t}");
                for n in 1..=EACH {
                    history.record(&client, Event::Released { packet_id: n });
                    if n % 50 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("task finished in time")
            .expect("task did not panic");
    }
    let events = history.events();
    assert_eq!(events.len(), TASKS * usize::from(EACH));
    for (i, pair) in events.windows(2).enumerate() {
        assert_eq!(pair[1].seq, pair[0].seq + 1, "at {i}");
        assert!(pair[1].at_us >= pair[0].at_us, "time went back at {i}");
    }
    // Each task's own events keep its order.
    for t in 0..TASKS {
        let client = format!("client-{t}");
        let mine: Vec<u16> = events
            .iter()
            .filter(|e| e.client == client)
            .map(|e| match e.event {
                Event::Released { packet_id } => packet_id,
                _ => 0,
            })
            .collect();
        assert_eq!(mine, (1..=EACH).collect::<Vec<_>>());
    }
    assert_clean(&check(&history));
}
