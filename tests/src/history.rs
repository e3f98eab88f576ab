//! A record of what MQTT clients did and saw during a test run (a *history*), and an offline
//! checker of such a history against MQTT's delivery guarantees, in the manner of Jepsen.
//!
//! A chaos test gives every client task the same [`History`] (behind an `Arc`) and appends an
//! [`Event`] for each thing a client does or observes. When the run is over, [`check`] reads the
//! history and returns a [`Report`]: counts, and every violation found, each with the events that
//! show it. A history can be written to a JSON-lines file ([`History::save`]) and checked again
//! later ([`History::load`]), so a failing run can be kept and examined offline.
//!
//! # Recording discipline
//!
//! The checker trusts the order of the history, so the recorder must keep it honest:
//!
//! - every event carries the MQTT client identifier as its client name;
//! - [`Event::PublishAttempt`] is recorded *before* the PUBLISH is written to the socket,
//!   [`Event::Subscribe`] *after* the SUBACK is read, acknowledgements and deliveries after the
//!   packet is read: so "subscribed before the publish started" in the history is true of the
//!   broker as well;
//! - payload ids identify messages: one payload id is one application message, published by one
//!   client to one topic at one QoS. A retry of the same message (DUP resend, or a fresh PUBLISH
//!   after a lost connection) uses the same payload id; will payloads are unique per connection;
//! - a connection's end is recorded (by the task that owns it) before the same client connects
//!   again. A CONNECT received while the previous connection is open is a session take-over;
//! - [`Event::Released`] is recorded for each PUBREL a QoS 2 receiver reads: it is what tells a
//!   protocol resend from a second delivery (see below);
//! - the teardown at the end of a run is not recorded: the history's last event is "the end of
//!   the run", and a session counts as alive at the end if nothing in the history ended it.
//!
//! Times are microseconds since the history was created, as the clients saw them. Broker and
//! client clocks differ by the time a packet takes, so rules that depend on a duration (session
//! expiry, will delay) give the broker [`CheckOptions::timing_tolerance`] either way and check
//! nothing inside that window.
//!
//! # Rules checked
//!
//! The checker implements MQTT 5.0 and holds for 3.1.1 (session expiry 0 or [`NEVER_EXPIRES`],
//! no will delay, no reason codes: record 0 for success).
//!
//! - **Acknowledged messages arrive** (§4.3.2, §4.3.3): a QoS 1 or 2 message the broker
//!   acknowledged with a success reason code (< 0x80; PUBACK for QoS 1, PUBREC for QoS 2, which is
//!   where the broker takes ownership) must reach every client that, when the first publish
//!   attempt was recorded, already held a subscription granted QoS 1 or 2 with a matching filter,
//!   kept it to the end of the run, and whose session lived to the end of the run. Shared
//!   subscriptions (`$share/...`) are not checked. A message refused or never acknowledged is not
//!   required anywhere.
//! - **QoS 2 is never delivered twice** (§4.3.3): the receiver keeps each QoS 2 packet id it has
//!   received until it reads the matching PUBREL; a PUBLISH carrying a packet id still held with
//!   the same payload is a protocol resend, not a delivery (and must have DUP set, §3.3.1.1). Any
//!   other QoS 2 PUBLISH is a new delivery to the application, and a second new delivery of the
//!   same payload in the same session is a violation. A PUBLISH with a packet id still held for
//!   a *different* payload is a violation too (the receiver would discard it). Exceptions: a
//!   client whose subscriptions overlap may receive one copy per matching subscription, retained
//!   copies sent on subscribe are not counted, and a message its publisher sent again as a *new*
//!   message may legitimately arrive twice, since the protocol cannot tell the copies apart. A
//!   retry is the same message only if it resumes the exchange: same publisher session, same
//!   packet id, and no PUBREC (success or refusal) read before it; the broker, as a receiver,
//!   must then deduplicate it by packet id, whether or not DUP is set.
//! - **QoS 1 duplicates are allowed** and counted in [`Counts::duplicates`].
//! - **Order** (§4.6, Ordered Topics, non-shared subscriptions): the broker must send PUBLISH
//!   packets for the same topic and QoS to each subscriber in the order it received them from a
//!   given client. The history shows that the broker received message A before message B when
//!   A's success acknowledgement was recorded before B's first attempt, or when both were first
//!   sent on the same connection, A first, and both acknowledged on it. For every such pair
//!   delivered to a subscriber session, the first delivery of A must come before the first
//!   delivery of B. Only first deliveries count: redeliveries after a reconnect and QoS 1
//!   duplicates may arrive later (the spec's "1,2,3,2,3,4"), and retained copies are exempt.
//!   A message never acknowledged orders nothing after it (the broker may commit it late).
//! - **Session present** (§3.2.2.2): a connect with clean start must see session present 0. One
//!   without must see 1 if the session should still exist (an earlier connection in the history
//!   created it and nothing ended it) and 0 if it should not (it had session expiry 0 and its
//!   connection ended, its expiry interval elapsed while disconnected, or [`Event::SessionEnded`]
//!   was recorded). The first connect of a client, or one after an ambiguous event (a connect
//!   attempt that got no CONNACK, an expiry inside the timing tolerance), is not checked.
//! - **Wills** (§3.1.2.5, §3.1.3.2.2): the will of a connection is due once the connection ended
//!   without a normal DISCONNECT, after the will delay or when the session ends if earlier,
//!   unless the client connected again before that time. Then exactly one publication of it must
//!   reach every subscriber that matched it when the connection ended (as for messages, counting
//!   a QoS 1 redelivery with DUP as the same publication); it must never appear after a normal
//!   DISCONNECT, while the connection is open, before the delay, or when the client came back in
//!   time. On a take-over, a return (or connect attempt) within the timing tolerance of the
//!   delay, or a history ending before then, it may be published at most once.
//!
//! Anything the checker cannot interpret (an acknowledgement of a message never attempted, a
//! payload id reused for another message, events out of order) is reported as
//! [`Rule::InvalidHistory`], and a delivery of a payload nobody published as [`Rule::Phantom`]:
//! a history with either is not evidence of anything.

use raftmq_core::topic::matches;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Session expiry interval meaning "never expires" (MQTT 5.0 §3.1.2.11.2); use it for an
/// MQTT 3.1.1 persistent session (clean session 0).
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// A will message registered by a CONNECT.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Will {
    pub topic: String,
    /// The payload id of the will; unique per connection.
    pub payload: String,
    pub qos: u8,
    /// Will delay interval in seconds (0 for MQTT 3.1.1).
    pub delay_secs: u32,
}

/// Which acknowledgement of an outgoing publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckKind {
    Puback,
    Pubrec,
    Pubcomp,
}

/// Something one client did or observed. QoS values are 0, 1 or 2; reason codes are the MQTT
/// byte (0 for success, and for MQTT 3.1.1 acknowledgements, which carry none).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A CONNACK with success was read for this CONNECT.
    Connect {
        clean_start: bool,
        /// Seconds; 0 ends the session with the connection, [`NEVER_EXPIRES`] never.
        session_expiry: u32,
        session_present: bool,
        will: Option<Will>,
    },
    /// A CONNACK with a failure reason code was read: the broker did not take the connection.
    ConnectRefused {
        clean_start: bool,
        session_expiry: u32,
        code: u8,
    },
    /// The CONNECT may have been sent but no CONNACK was read (refused socket, timeout, lost
    /// connection): the broker may or may not have acted on it.
    ConnectFailed {
        clean_start: bool,
        session_expiry: u32,
    },
    /// A SUBACK was read for this filter: `granted` is the granted QoS or the failure reason
    /// code (>= 0x80).
    Subscribe { filter: String, granted: u8 },
    /// An UNSUBACK was read for this filter.
    Unsubscribe { filter: String },
    /// About to write a PUBLISH (recorded before it is sent). `dup` is the DUP flag: set for a
    /// resend of the same packet id in a resumed session.
    PublishAttempt {
        payload: String,
        topic: String,
        qos: u8,
        packet_id: Option<u16>,
        dup: bool,
    },
    /// An acknowledgement of an outgoing publish was read.
    PublishAck {
        payload: String,
        packet_id: u16,
        kind: AckKind,
        reason: u8,
    },
    /// The connection ended before the exchange for this publish completed.
    PublishFailed { payload: String },
    /// A PUBLISH was read from the broker.
    Delivery {
        payload: String,
        topic: String,
        qos: u8,
        packet_id: Option<u16>,
        dup: bool,
        retain: bool,
    },
    /// A PUBREL was read for an incoming QoS 2 packet id: the receiver forgets it.
    Released { packet_id: u16 },
    /// The connection ended: `graceful` when the client sent DISCONNECT with reason 0x00 (the
    /// will is discarded); anything else (lost, killed, DISCONNECT with will) is not graceful.
    ConnectionEnd { graceful: bool },
    /// The test knows the client's session is gone (deleted, or expired by design).
    SessionEnded,
}

impl Event {
    /// A successful connect without a will.
    pub fn connect(clean_start: bool, session_expiry: u32, session_present: bool) -> Event {
        Event::Connect {
            clean_start,
            session_expiry,
            session_present,
            will: None,
        }
    }

    /// A SUBACK granting `granted` for `filter`.
    pub fn subscribe(filter: &str, granted: u8) -> Event {
        Event::Subscribe {
            filter: filter.to_owned(),
            granted,
        }
    }

    /// A first PUBLISH of `payload` (DUP clear).
    pub fn publish(payload: &str, topic: &str, qos: u8, packet_id: Option<u16>) -> Event {
        Event::PublishAttempt {
            payload: payload.to_owned(),
            topic: topic.to_owned(),
            qos,
            packet_id,
            dup: false,
        }
    }

    /// A successful acknowledgement of `payload`.
    pub fn ack(payload: &str, packet_id: u16, kind: AckKind) -> Event {
        Event::PublishAck {
            payload: payload.to_owned(),
            packet_id,
            kind,
            reason: 0,
        }
    }

    /// A non-retained PUBLISH read from the broker.
    pub fn delivery(
        payload: &str,
        topic: &str,
        qos: u8,
        packet_id: Option<u16>,
        dup: bool,
    ) -> Event {
        Event::Delivery {
            payload: payload.to_owned(),
            topic: topic.to_owned(),
            qos,
            packet_id,
            dup,
            retain: false,
        }
    }
}

/// An event as stored: its place in the history, when, and which client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    /// Position in the history (strictly increasing).
    pub seq: u64,
    /// Microseconds since the history started (never decreasing along `seq`).
    pub at_us: u64,
    pub client: String,
    #[serde(flatten)]
    pub event: Event,
}

/// Reading or writing a history file failed.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("history file: {0}")]
    Io(#[from] io::Error),
    #[error("history file line {line}: {source}")]
    Parse {
        line: usize,
        source: serde_json::Error,
    },
}

/// An append-only, shareable list of [`Recorded`] events. Appending takes a short lock and
/// assigns the sequence number and time under it, so the order of `seq` is the order in which
/// the events happened, across all tasks.
#[derive(Debug)]
pub struct History {
    start: Instant,
    events: Mutex<Vec<Recorded>>,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

impl History {
    /// An empty history starting now.
    pub fn new() -> History {
        History {
            start: Instant::now(),
            events: Mutex::new(Vec::new()),
        }
    }

    /// A history holding `events` as they are (for loading, and for hand-written histories).
    pub fn from_events(events: Vec<Recorded>) -> History {
        History {
            start: Instant::now(),
            events: Mutex::new(events),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Recorded>> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `event` of `client`, timed now; returns its sequence number.
    pub fn record(&self, client: &str, event: Event) -> u64 {
        let mut events = self.lock();
        let at = self.start.elapsed();
        Self::push(&mut events, at, client, event)
    }

    /// Appends `event` of `client` at `at` after the start (for hand-written histories; the
    /// checker reports times that go backwards).
    pub fn record_at(&self, at: Duration, client: &str, event: Event) -> u64 {
        let mut events = self.lock();
        Self::push(&mut events, at, client, event)
    }

    fn push(events: &mut Vec<Recorded>, at: Duration, client: &str, event: Event) -> u64 {
        let seq = events.last().map_or(0, |e| e.seq + 1);
        events.push(Recorded {
            seq,
            at_us: u64::try_from(at.as_micros()).unwrap_or(u64::MAX),
            client: client.to_owned(),
            event,
        });
        seq
    }

    /// Number of events recorded.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// A copy of the events so far.
    pub fn events(&self) -> Vec<Recorded> {
        self.lock().clone()
    }

    /// Writes the events as JSON lines, one event per line.
    pub fn write_jsonl<W: Write>(&self, mut out: W) -> Result<(), HistoryError> {
        for event in self.lock().iter() {
            serde_json::to_writer(&mut out, event).map_err(io::Error::from)?;
            out.write_all(b"\n")?;
        }
        out.flush()?;
        Ok(())
    }

    /// Reads a history written by [`History::write_jsonl`] (blank lines are skipped).
    pub fn read_jsonl<R: BufRead>(input: R) -> Result<History, HistoryError> {
        let mut events = Vec::new();
        for (i, line) in input.lines().enumerate() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            let event = serde_json::from_str(&line).map_err(|source| HistoryError::Parse {
                line: i + 1,
                source,
            })?;
            events.push(event);
        }
        Ok(History::from_events(events))
    }

    /// Saves the history to `path` as JSON lines.
    pub fn save(&self, path: &Path) -> Result<(), HistoryError> {
        self.write_jsonl(BufWriter::new(File::create(path)?))
    }

    /// Loads a history saved by [`History::save`].
    pub fn load(path: &Path) -> Result<History, HistoryError> {
        History::read_jsonl(BufReader::new(File::open(path)?))
    }
}

/// Settings of the checker.
#[derive(Clone, Debug)]
pub struct CheckOptions {
    /// How far apart broker and client may see the same instant: duration rules (session
    /// expiry, will delay) check nothing within this distance of a deadline.
    pub timing_tolerance: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            timing_tolerance: Duration::from_secs(2),
        }
    }
}

/// The rule a [`Violation`] breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// The history cannot be interpreted (a recorder bug).
    InvalidHistory,
    /// A delivery of a payload never published (before it), or on another topic, or at a
    /// higher QoS than published.
    Phantom,
    /// An acknowledged message did not reach a subscriber that had to receive it.
    Missing,
    /// A QoS 2 message delivered twice to the same session.
    Qos2Duplicate,
    /// A QoS 2 PUBLISH whose packet id the receiver still holds for another message.
    PacketIdInUse,
    /// A QoS 2 resend without the DUP flag.
    ResendWithoutDup,
    /// Messages of one publisher on one topic first delivered out of order.
    OutOfOrder,
    /// A CONNACK's session present flag contradicts the session's history.
    SessionPresent,
    /// A will that was due did not reach a subscriber.
    WillMissing,
    /// A will published more than once.
    WillDuplicated,
    /// A will published although it must not be (normal DISCONNECT, connection still open,
    /// client back in time).
    WillUnexpected,
    /// A will published before its delay elapsed.
    WillEarly,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            Rule::InvalidHistory => "invalid history",
            Rule::Phantom => "phantom delivery",
            Rule::Missing => "missing",
            Rule::Qos2Duplicate => "QoS 2 duplicate",
            Rule::PacketIdInUse => "packet id in use",
            Rule::ResendWithoutDup => "resend without DUP",
            Rule::OutOfOrder => "out of order",
            Rule::SessionPresent => "session present",
            Rule::WillMissing => "will missing",
            Rule::WillDuplicated => "will duplicated",
            Rule::WillUnexpected => "will unexpected",
            Rule::WillEarly => "will early",
        };
        f.write_str(name)
    }
}

/// One broken rule, with the events that show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Violation {
    pub rule: Rule,
    /// The client concerned: the subscriber for delivery rules (wills included, the will's
    /// owner is named in `detail`), the connecting client for session present.
    pub client: String,
    pub payload: Option<String>,
    pub detail: String,
    pub events: Vec<Recorded>,
}

/// What the checker looked at.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub events: usize,
    /// Distinct payload ids published.
    pub publishes: usize,
    /// QoS 1 and 2 messages acknowledged with success.
    pub acknowledged: usize,
    /// QoS 1 and 2 messages refused (a failure reason code) and never acknowledged.
    pub refused: usize,
    /// QoS 1 and 2 messages with neither (their fate is unknown).
    pub unacknowledged: usize,
    /// (message, subscriber) pairs that had to be delivered.
    pub expected_deliveries: usize,
    /// (payload, subscriber session) pairs delivered at least once.
    pub delivered: usize,
    /// Expected deliveries that never happened.
    pub missing: usize,
    /// Deliveries beyond the first of a payload to a session (QoS 2 protocol resends excluded).
    pub duplicates: usize,
    /// QoS 2 protocol resends (same packet id before PUBREL).
    pub resends: usize,
    /// Messages whose first delivery was checked against the ones published before them.
    pub ordering_checks: usize,
    /// Connects whose session present flag was checked.
    pub session_checks: usize,
    /// Connections with a will whose outcome was checked.
    pub wills_checked: usize,
}

/// The result of [`check`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub counts: Counts,
    pub violations: Vec<Violation>,
}

impl Report {
    /// Whether no rule was broken.
    pub fn is_ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// The violations of `rule`.
    pub fn of(&self, rule: Rule) -> impl Iterator<Item = &Violation> {
        self.violations.iter().filter(move |v| v.rule == rule)
    }
}

/// How many violations [`Report`]'s `Display` prints in full.
const SHOWN_VIOLATIONS: usize = 30;

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.counts;
        writeln!(
            f,
            "history: {} events; {} published ({} acknowledged, {} refused, {} unacknowledged); \
             {} deliveries expected, {} delivered, {} missing, {} duplicates, {} QoS 2 resends; \
             {} ordering checks, {} session checks, {} wills checked; {} violations",
            c.events,
            c.publishes,
            c.acknowledged,
            c.refused,
            c.unacknowledged,
            c.expected_deliveries,
            c.delivered,
            c.missing,
            c.duplicates,
            c.resends,
            c.ordering_checks,
            c.session_checks,
            c.wills_checked,
            self.violations.len()
        )?;
        for v in self.violations.iter().take(SHOWN_VIOLATIONS) {
            write!(f, "- [{}] {}", v.rule, v.client)?;
            if let Some(p) = &v.payload {
                write!(f, " {p}")?;
            }
            writeln!(f, ": {}", v.detail)?;
            for e in &v.events {
                let line = serde_json::to_string(e).unwrap_or_else(|_| format!("{e:?}"));
                writeln!(f, "    {line}")?;
            }
        }
        if self.violations.len() > SHOWN_VIOLATIONS {
            writeln!(
                f,
                "... and {} more",
                self.violations.len() - SHOWN_VIOLATIONS
            )?;
        }
        Ok(())
    }
}

/// Checks `history` with the default [`CheckOptions`].
pub fn check(history: &History) -> Report {
    check_with(history, &CheckOptions::default())
}

/// Checks `history` against the rules in the module documentation.
pub fn check_with(history: &History, options: &CheckOptions) -> Report {
    let events = history.events();
    Checker::new(&events, options).run()
}

// ---------------------------------------------------------------------------------------------
// The checker: one pass over the events builds the state of every client, message and will,
// then each rule is evaluated on it.
// ---------------------------------------------------------------------------------------------

const SECOND_US: u64 = 1_000_000;

/// What the history says about a client's session.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
enum SessionState {
    /// Nothing known (never connected in this history, or an ambiguous event).
    #[default]
    Unknown,
    Live,
    Gone,
}

/// A subscription of the current session.
#[derive(Clone, Copy, Debug)]
struct Sub {
    granted: u8,
    /// The Subscribe event that established it (a replacement keeps the first: the flow of
    /// messages is not interrupted, MQTT 5.0 §3.8.4).
    idx: usize,
}

#[derive(Debug, Default)]
struct ClientState {
    /// Successful connects so far: numbers the connections.
    connections: u32,
    connected: bool,
    /// The Connect of the current or last connection, and the end of the last one.
    connect_idx: Option<usize>,
    end_idx: Option<usize>,
    /// Session expiry of the current or last connection.
    expiry: u32,
    will_case: Option<usize>,
    session: SessionState,
    /// Numbers the client's sessions: bumped whenever the session may have been replaced.
    epoch: u32,
    disconnected_at: Option<u64>,
    /// A resume attempt without CONNACK may have restarted the expiry clock.
    clock_uncertain: bool,
    subs: BTreeMap<String, Sub>,
    /// Incoming QoS 2 packet ids not yet released, with their payload.
    unreleased: HashMap<u16, String>,
    /// Ended connections whose will waits for the client's next connect.
    waiting_wills: Vec<usize>,
}

impl ClientState {
    fn new_session(&mut self) {
        self.epoch += 1;
        self.subs.clear();
        self.unreleased.clear();
    }

    /// The session's state at `at` (µs), with `tol` of slack around an expiry deadline.
    fn session_at(&self, at: u64, tol: u64) -> SessionState {
        if self.session != SessionState::Live || self.connected || self.expiry == NEVER_EXPIRES {
            return self.session;
        }
        let Some(since) = self.disconnected_at else {
            return self.session;
        };
        let lifetime = u64::from(self.expiry) * SECOND_US;
        let elapsed = at.saturating_sub(since);
        if elapsed.saturating_add(tol) < lifetime {
            SessionState::Live
        } else if elapsed > lifetime.saturating_add(tol) && !self.clock_uncertain {
            SessionState::Gone
        } else {
            SessionState::Unknown
        }
    }

    /// Subscriptions of the current session granted QoS 1 or 2 whose filter matches `topic`.
    fn matching<'s>(&'s self, topic: &'s str) -> impl Iterator<Item = &'s Sub> + 's {
        matching(&self.subs, topic)
    }
}

/// The subscriptions in `subs` granted QoS 1 or 2 whose (non-shared) filter matches `topic`.
fn matching<'s>(
    subs: &'s BTreeMap<String, Sub>,
    topic: &'s str,
) -> impl Iterator<Item = &'s Sub> + 's {
    subs.iter()
        .filter(move |(filter, sub)| {
            (1..=2).contains(&sub.granted)
                && !filter.starts_with("$share/")
                && matches(filter, topic)
        })
        .map(|(_, sub)| sub)
}

/// A session the broker reported missing (session present 0) when it should have existed: it
/// still owed the messages published before that connect.
#[derive(Debug)]
struct LostSession {
    client: String,
    epoch: u32,
    subs: BTreeMap<String, Sub>,
    /// The connect that found it missing.
    lost_idx: usize,
}

#[derive(Debug)]
struct Msg {
    payload: String,
    publisher: String,
    topic: String,
    qos: u8,
    first_attempt: usize,
    /// The publisher's connection number at the first attempt.
    first_conn: u32,
    attempts: Vec<usize>,
    /// Session epoch and packet id of the first attempt.
    epoch: u32,
    packet_id: Option<u16>,
    last_packet_id: Option<u16>,
    /// Every attempt after the first resumed its exchange (same session and packet id, before
    /// any PUBREC): QoS 2 exactly once applies.
    once: bool,
    /// A failure reason code was read: a later attempt is a new message.
    refused_since: bool,
    refused: bool,
    ack: Option<usize>,
    ack_conn: u32,
}

#[derive(Clone, Copy, Debug)]
struct WillEnd {
    idx: usize,
    at: u64,
    graceful: bool,
    takeover: bool,
}

#[derive(Debug)]
struct WillCase {
    client: String,
    will: Will,
    connect_idx: usize,
    expiry: u32,
    end: Option<WillEnd>,
    /// The client's first successful connect, and first connect attempt, after the end.
    next_connect: Option<u64>,
    next_attempt: Option<u64>,
}

/// Deliveries of one payload to one client session.
#[derive(Debug, Default)]
struct Receipt {
    /// Every delivery to the application (QoS 2 protocol resends excluded).
    deliveries: Vec<usize>,
    /// Of those, the ones without DUP.
    originals: usize,
    /// The first non-retained delivery.
    first: Option<usize>,
    /// Non-retained deliveries at QoS 2.
    qos2: Vec<usize>,
    /// Most subscriptions of the session matching the topic at a delivery.
    allowed: usize,
}

impl Receipt {
    /// Publications the receiver saw: copies without DUP, or one if it only got resends.
    fn publications(&self) -> usize {
        self.originals.max(usize::from(!self.deliveries.is_empty()))
    }
}

type SessionKey = (String, u32);

/// Publisher, topic and QoS: the scope of MQTT's ordering guarantee.
type OrderKey<'m> = (&'m str, &'m str, u8);

/// Whether a will was due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WillDue {
    Never(&'static str),
    AtMostOnce,
    Exactly,
}

struct Checker<'a> {
    events: &'a [Recorded],
    tol: u64,
    clients: BTreeMap<String, ClientState>,
    msgs: Vec<Msg>,
    msg_index: HashMap<String, usize>,
    wills: Vec<WillCase>,
    will_index: HashMap<String, usize>,
    receipts: BTreeMap<SessionKey, BTreeMap<String, Receipt>>,
    lost_sessions: Vec<LostSession>,
    counts: Counts,
    violations: Vec<Violation>,
}

fn expiry_text(expiry: u32) -> String {
    if expiry == NEVER_EXPIRES {
        "never".to_owned()
    } else {
        format!("{expiry}s")
    }
}

fn secs(us: u64) -> f64 {
    // Display only.
    #[allow(clippy::cast_precision_loss)]
    let s = us as f64 / 1e6;
    s
}

impl<'a> Checker<'a> {
    fn new(events: &'a [Recorded], options: &CheckOptions) -> Self {
        Checker {
            events,
            tol: u64::try_from(options.timing_tolerance.as_micros()).unwrap_or(u64::MAX),
            clients: BTreeMap::new(),
            msgs: Vec::new(),
            msg_index: HashMap::new(),
            wills: Vec::new(),
            will_index: HashMap::new(),
            receipts: BTreeMap::new(),
            lost_sessions: Vec::new(),
            counts: Counts::default(),
            violations: Vec::new(),
        }
    }

    fn violation(
        &mut self,
        rule: Rule,
        client: &str,
        payload: Option<&str>,
        detail: String,
        idxs: &[usize],
    ) {
        let mut idxs: Vec<usize> = idxs.to_vec();
        idxs.sort_unstable();
        idxs.dedup();
        self.violations.push(Violation {
            rule,
            client: client.to_owned(),
            payload: payload.map(str::to_owned),
            detail,
            events: idxs
                .into_iter()
                .filter_map(|i| self.events.get(i).cloned())
                .collect(),
        });
    }

    fn invalid(&mut self, idx: usize, detail: &str) {
        let client = self.events[idx].client.clone();
        self.violation(
            Rule::InvalidHistory,
            &client,
            None,
            detail.to_owned(),
            &[idx],
        );
    }

    fn run(mut self) -> Report {
        self.counts.events = self.events.len();
        for idx in 0..self.events.len() {
            if idx > 0 {
                let (prev, this) = (&self.events[idx - 1], &self.events[idx]);
                if this.seq <= prev.seq || this.at_us < prev.at_us {
                    self.violation(
                        Rule::InvalidHistory,
                        &this.client.clone(),
                        None,
                        "sequence or time goes backwards".to_owned(),
                        &[idx - 1, idx],
                    );
                }
            }
            self.step(idx);
        }
        let end_at = self.events.last().map_or(0, |e| e.at_us);
        for m in &self.msgs {
            if m.qos == 0 {
                continue;
            }
            if m.ack.is_some() {
                self.counts.acknowledged += 1;
            } else if m.refused {
                self.counts.refused += 1;
            } else {
                self.counts.unacknowledged += 1;
            }
        }
        self.counts.publishes = self.msgs.len();
        for receipts in self.receipts.values() {
            for r in receipts.values() {
                self.counts.delivered += 1;
                self.counts.duplicates += r.deliveries.len().saturating_sub(1);
            }
        }
        self.check_missing(end_at);
        self.check_qos2_duplicates();
        self.check_order();
        self.check_wills(end_at);
        Report {
            counts: self.counts,
            violations: self.violations,
        }
    }

    fn step(&mut self, idx: usize) {
        let events = self.events;
        let rec = &events[idx];
        let (client, at) = (rec.client.as_str(), rec.at_us);
        match &rec.event {
            Event::Connect {
                clean_start,
                session_expiry,
                session_present,
                will,
            } => self.on_connect(
                idx,
                *clean_start,
                *session_expiry,
                *session_present,
                will.as_ref(),
            ),
            Event::ConnectRefused { .. } => {
                let st = self.clients.entry(client.to_owned()).or_default();
                for &w in &st.waiting_wills {
                    self.wills[w].next_attempt.get_or_insert(at);
                }
            }
            Event::ConnectFailed {
                clean_start,
                session_expiry,
            } => {
                let st = self.clients.entry(client.to_owned()).or_default();
                for &w in &st.waiting_wills {
                    self.wills[w].next_attempt.get_or_insert(at);
                }
                if *clean_start {
                    // The broker may have replaced the session with an empty one.
                    st.session = SessionState::Unknown;
                    st.new_session();
                } else if *session_expiry == 0 {
                    // It may have taken the session over and ended it with the connection.
                    st.session = SessionState::Unknown;
                } else {
                    st.clock_uncertain = true;
                }
            }
            Event::Subscribe { filter, granted } => {
                let st = self.clients.entry(client.to_owned()).or_default();
                match *granted {
                    0..=2 => {
                        st.subs
                            .entry(filter.clone())
                            .and_modify(|s| s.granted = *granted)
                            .or_insert(Sub {
                                granted: *granted,
                                idx,
                            });
                    }
                    0x80.. => {
                        st.subs.remove(filter);
                    }
                    _ => self.invalid(idx, "granted QoS is neither 0-2 nor a failure code"),
                }
            }
            Event::Unsubscribe { filter } => {
                let st = self.clients.entry(client.to_owned()).or_default();
                st.subs.remove(filter);
            }
            Event::PublishAttempt {
                payload,
                topic,
                qos,
                packet_id,
                dup: _,
            } => self.on_attempt(idx, payload, topic, *qos, *packet_id),
            Event::PublishAck {
                payload,
                packet_id,
                kind,
                reason,
            } => self.on_ack(idx, payload, *packet_id, *kind, *reason),
            Event::PublishFailed { payload } => {
                if !self.msg_index.contains_key(payload) {
                    self.invalid(idx, "failure of a publish never attempted");
                }
            }
            Event::Delivery {
                payload,
                topic,
                qos,
                packet_id,
                dup,
                retain,
            } => self.on_delivery(idx, payload, topic, *qos, *packet_id, *dup, *retain),
            Event::Released { packet_id } => {
                let st = self.clients.entry(client.to_owned()).or_default();
                st.unreleased.remove(packet_id);
            }
            Event::ConnectionEnd { graceful } => {
                let st = self.clients.entry(client.to_owned()).or_default();
                if !st.connected {
                    self.invalid(idx, "connection end without an open connection");
                    return;
                }
                st.connected = false;
                st.end_idx = Some(idx);
                st.disconnected_at = Some(at);
                st.clock_uncertain = false;
                if let Some(w) = st.will_case.take() {
                    self.wills[w].end = Some(WillEnd {
                        idx,
                        at,
                        graceful: *graceful,
                        takeover: false,
                    });
                    st.waiting_wills.push(w);
                }
                if st.expiry == 0 {
                    st.session = SessionState::Gone;
                    st.new_session();
                }
            }
            Event::SessionEnded => {
                let st = self.clients.entry(client.to_owned()).or_default();
                st.session = SessionState::Gone;
                st.new_session();
            }
        }
    }

    fn on_connect(
        &mut self,
        idx: usize,
        clean_start: bool,
        session_expiry: u32,
        session_present: bool,
        will: Option<&Will>,
    ) {
        let rec = &self.events[idx];
        let (client, at) = (rec.client.as_str(), rec.at_us);
        let tol = self.tol;
        let st = self.clients.entry(client.to_owned()).or_default();
        if st.connected {
            // Take-over: the broker closes the open connection.
            if let Some(w) = st.will_case.take() {
                self.wills[w].end = Some(WillEnd {
                    idx,
                    at,
                    graceful: false,
                    takeover: true,
                });
            }
            st.connected = false;
            st.end_idx = Some(idx);
            st.disconnected_at = Some(at);
            if st.expiry == 0 {
                st.session = SessionState::Unknown;
                st.new_session();
            }
        }
        for w in st.waiting_wills.drain(..) {
            self.wills[w].next_connect.get_or_insert(at);
        }
        let previous = st.session_at(at, tol);
        let expected = if clean_start {
            Some(false)
        } else {
            match previous {
                SessionState::Live => Some(true),
                SessionState::Gone => Some(false),
                SessionState::Unknown => None,
            }
        };
        let context: Vec<usize> = st.connect_idx.into_iter().chain(st.end_idx).collect();
        let last_end = st.disconnected_at;
        let last_expiry = st.expiry;
        if expected == Some(true) && !session_present {
            self.lost_sessions.push(LostSession {
                client: client.to_owned(),
                epoch: st.epoch,
                subs: st.subs.clone(),
                lost_idx: idx,
            });
        }
        if clean_start || !session_present {
            st.new_session();
        }
        st.session = SessionState::Live;
        st.connected = true;
        st.connections += 1;
        st.connect_idx = Some(idx);
        st.expiry = session_expiry;
        st.disconnected_at = None;
        st.clock_uncertain = false;

        if let Some(expected) = expected {
            self.counts.session_checks += 1;
            if expected != session_present {
                let why = if clean_start {
                    "a connect with clean start must see session present 0".to_owned()
                } else if expected {
                    format!(
                        "the session should still exist (last connection {}, session expiry \
                         {}) but session present was 0",
                        last_end.map_or("still open".to_owned(), |t| format!(
                            "ended at {:.3}s",
                            secs(t)
                        )),
                        expiry_text(last_expiry)
                    )
                } else {
                    format!(
                        "the session had ended (last connection {}, session expiry {}, or the \
                         session was ended) but session present was 1",
                        last_end.map_or("still open".to_owned(), |t| format!(
                            "ended at {:.3}s",
                            secs(t)
                        )),
                        expiry_text(last_expiry)
                    )
                };
                let mut idxs = context;
                idxs.push(idx);
                self.violation(Rule::SessionPresent, client, None, why, &idxs);
            }
        }

        if let Some(will) = will {
            if self.will_index.contains_key(&will.payload)
                || self.msg_index.contains_key(&will.payload)
            {
                self.invalid(idx, "will payload id already used");
                return;
            }
            let case = self.wills.len();
            self.wills.push(WillCase {
                client: client.to_owned(),
                will: will.clone(),
                connect_idx: idx,
                expiry: session_expiry,
                end: None,
                next_connect: None,
                next_attempt: None,
            });
            self.will_index.insert(will.payload.clone(), case);
            if let Some(st) = self.clients.get_mut(client) {
                st.will_case = Some(case);
            }
        }
    }

    fn on_attempt(
        &mut self,
        idx: usize,
        payload: &str,
        topic: &str,
        qos: u8,
        packet_id: Option<u16>,
    ) {
        if qos > 2 || (qos > 0) != packet_id.is_some() {
            self.invalid(idx, "publish QoS and packet id do not agree");
            return;
        }
        if self.will_index.contains_key(payload) {
            self.invalid(idx, "payload id already used by a will");
            return;
        }
        let client = self.events[idx].client.as_str();
        let st = self.clients.entry(client.to_owned()).or_default();
        let (epoch, conn) = (st.epoch, st.connections);
        match self.msg_index.get(payload) {
            None => {
                self.msg_index.insert(payload.to_owned(), self.msgs.len());
                self.msgs.push(Msg {
                    payload: payload.to_owned(),
                    publisher: client.to_owned(),
                    topic: topic.to_owned(),
                    qos,
                    first_attempt: idx,
                    first_conn: conn,
                    attempts: vec![idx],
                    epoch,
                    packet_id,
                    last_packet_id: packet_id,
                    once: true,
                    refused_since: false,
                    refused: false,
                    ack: None,
                    ack_conn: 0,
                });
            }
            Some(&i) => {
                let m = &mut self.msgs[i];
                if m.publisher != client || m.topic != topic || m.qos != qos {
                    self.invalid(
                        idx,
                        "payload id reused for another message (publisher, topic or QoS differ)",
                    );
                    return;
                }
                m.attempts.push(idx);
                // The broker deduplicates by packet id while it holds it (DUP does not matter
                // to a receiver): the same session and packet id, with the exchange still
                // open, is the same message; anything else is a new one.
                if epoch != m.epoch
                    || packet_id != m.packet_id
                    || m.refused_since
                    || m.ack.is_some()
                {
                    m.once = false;
                }
                m.last_packet_id = packet_id;
                m.refused_since = false;
            }
        }
    }

    fn on_ack(&mut self, idx: usize, payload: &str, packet_id: u16, kind: AckKind, reason: u8) {
        let client = self.events[idx].client.as_str();
        let conn = self.clients.get(client).map_or(0, |s| s.connections);
        let Some(&i) = self.msg_index.get(payload) else {
            self.invalid(idx, "acknowledgement of a publish never attempted");
            return;
        };
        let m = &mut self.msgs[i];
        let problem = if m.publisher != client {
            Some("acknowledgement read by another client than the publisher")
        } else if m.last_packet_id != Some(packet_id) {
            Some("acknowledgement packet id differs from the attempt's")
        } else if !matches!(
            (m.qos, kind),
            (1, AckKind::Puback) | (2, AckKind::Pubrec | AckKind::Pubcomp)
        ) {
            Some("acknowledgement kind does not fit the publish QoS")
        } else {
            None
        };
        if let Some(problem) = problem {
            self.invalid(idx, problem);
            return;
        }
        if reason < 0x80 {
            if m.ack.is_none() {
                m.ack = Some(idx);
                m.ack_conn = conn;
            }
        } else {
            m.refused = true;
            m.refused_since = true;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_delivery(
        &mut self,
        idx: usize,
        payload: &str,
        topic: &str,
        qos: u8,
        packet_id: Option<u16>,
        dup: bool,
        retain: bool,
    ) {
        let client = self.events[idx].client.as_str();
        if qos > 2 || (qos > 0) != packet_id.is_some() {
            self.invalid(idx, "delivery QoS and packet id do not agree");
            return;
        }
        let published = if let Some(&i) = self.msg_index.get(payload) {
            let m = &self.msgs[i];
            Some((m.topic.clone(), m.qos, vec![m.first_attempt]))
        } else if let Some(&w) = self.will_index.get(payload) {
            let c = &self.wills[w];
            Some((c.will.topic.clone(), c.will.qos, vec![c.connect_idx]))
        } else {
            None
        };
        let Some((published_topic, published_qos, origin)) = published else {
            self.violation(
                Rule::Phantom,
                client,
                Some(payload),
                "delivered but never published before".to_owned(),
                &[idx],
            );
            return;
        };
        if published_topic != topic || qos > published_qos {
            let mut idxs = origin;
            idxs.push(idx);
            self.violation(
                Rule::Phantom,
                client,
                Some(payload),
                format!(
                    "delivered on {topic} at QoS {qos}, published on {published_topic} at QoS \
                     {published_qos}"
                ),
                &idxs,
            );
            return;
        }
        let st = self.clients.entry(client.to_owned()).or_default();
        if qos == 2 {
            let pid = packet_id.unwrap_or_default();
            match st.unreleased.get(&pid) {
                Some(held) if held == payload => {
                    self.counts.resends += 1;
                    if !dup {
                        self.violation(
                            Rule::ResendWithoutDup,
                            client,
                            Some(payload),
                            format!("QoS 2 packet id {pid} sent again before PUBREL without DUP"),
                            &[idx],
                        );
                    }
                    return;
                }
                Some(held) => {
                    let detail = format!(
                        "QoS 2 packet id {pid} is still held for {held} (no PUBREL yet): the \
                         receiver discards this message"
                    );
                    self.violation(Rule::PacketIdInUse, client, Some(payload), detail, &[idx]);
                    return;
                }
                None => {
                    st.unreleased.insert(pid, payload.to_owned());
                }
            }
        }
        let allowed = st.matching(topic).count().max(1);
        let receipt = self
            .receipts
            .entry((client.to_owned(), st.epoch))
            .or_default()
            .entry(payload.to_owned())
            .or_default();
        receipt.deliveries.push(idx);
        receipt.originals += usize::from(!dup);
        receipt.allowed = receipt.allowed.max(allowed);
        if !retain {
            receipt.first.get_or_insert(idx);
            if qos == 2 {
                receipt.qos2.push(idx);
            }
        }
    }

    /// Every acknowledged message reached every subscriber that had to receive it: the sessions
    /// alive at the end, and those the broker lost (for what was published before the loss).
    fn check_missing(&mut self, end_at: u64) {
        struct Owed<'s> {
            client: &'s str,
            epoch: u32,
            subs: &'s BTreeMap<String, Sub>,
            /// Only messages first attempted before this event.
            before: usize,
            context: Vec<usize>,
            state: &'static str,
        }
        let mut owed = Vec::new();
        for (client, st) in &self.clients {
            if st.session_at(end_at, self.tol) != SessionState::Live {
                continue;
            }
            let mut context: Vec<usize> = st.connect_idx.into_iter().collect();
            let state = if st.connected {
                "session alive and connected at the end"
            } else {
                context.extend(st.end_idx);
                "session alive but NOT connected at the end (the run should reconnect every \
                 subscriber)"
            };
            owed.push(Owed {
                client,
                epoch: st.epoch,
                subs: &st.subs,
                before: usize::MAX,
                context,
                state,
            });
        }
        for lost in &self.lost_sessions {
            owed.push(Owed {
                client: &lost.client,
                epoch: lost.epoch,
                subs: &lost.subs,
                before: lost.lost_idx,
                context: vec![lost.lost_idx],
                state: "the broker lost the session (session present 0 on a resumption)",
            });
        }
        let mut found = Vec::new();
        for o in &owed {
            let received = self.receipts.get(&(o.client.to_owned(), o.epoch));
            for m in &self.msgs {
                if m.qos == 0 || m.ack.is_none() || m.first_attempt >= o.before {
                    continue;
                }
                let Some(sub) = matching(o.subs, &m.topic)
                    .filter(|s| s.idx < m.first_attempt)
                    .min_by_key(|s| s.idx)
                else {
                    continue;
                };
                self.counts.expected_deliveries += 1;
                if received.is_some_and(|r| r.contains_key(&m.payload)) {
                    continue;
                }
                self.counts.missing += 1;
                let mut idxs = vec![sub.idx, m.first_attempt];
                idxs.extend(m.ack);
                idxs.extend(&o.context);
                found.push((
                    o.client.to_owned(),
                    m.payload.clone(),
                    format!(
                        "acknowledged QoS {} message on {} (from {}) never delivered; subscribed \
                         before the first attempt; {}",
                        m.qos, m.topic, m.publisher, o.state
                    ),
                    idxs,
                ));
            }
        }
        for (client, payload, detail, idxs) in found {
            self.violation(Rule::Missing, &client, Some(&payload), detail, &idxs);
        }
    }

    /// No QoS 2 message reached the application of one session twice.
    fn check_qos2_duplicates(&mut self) {
        let mut found = Vec::new();
        for ((client, _), receipts) in &self.receipts {
            for (payload, r) in receipts {
                if r.qos2.len() <= r.allowed {
                    continue;
                }
                let Some(&i) = self.msg_index.get(payload) else {
                    continue; // wills: checked with the will rules
                };
                let m = &self.msgs[i];
                if m.qos != 2 || !m.once {
                    continue;
                }
                let mut idxs = m.attempts.clone();
                idxs.extend(m.ack);
                idxs.extend(&r.qos2);
                found.push((
                    client.clone(),
                    payload.clone(),
                    format!(
                        "QoS 2 message delivered {} times as a new message (allowed {})",
                        r.qos2.len(),
                        r.allowed
                    ),
                    idxs,
                ));
            }
        }
        for (client, payload, detail, idxs) in found {
            self.violation(Rule::Qos2Duplicate, &client, Some(&payload), detail, &idxs);
        }
    }

    /// First deliveries follow the order in which the broker received the messages.
    fn check_order(&mut self) {
        let mut found = Vec::new();
        for ((client, _), receipts) in &self.receipts {
            // (publisher, topic, QoS) -> [(message, position of its first delivery)]
            let mut groups: BTreeMap<OrderKey<'_>, Vec<(usize, usize)>> = BTreeMap::new();
            for (payload, r) in receipts {
                let (Some(&i), Some(pos)) = (self.msg_index.get(payload), r.first) else {
                    continue;
                };
                let m = &self.msgs[i];
                if m.qos > 0 {
                    groups
                        .entry((&m.publisher, &m.topic, m.qos))
                        .or_default()
                        .push((i, pos));
                }
            }
            for list in groups.values() {
                self.counts.ordering_checks += list.len();
                let mut reported: HashSet<usize> = HashSet::new();
                // A acknowledged before B's first attempt.
                let mut points: Vec<(usize, bool, usize, usize)> = Vec::new();
                for &(i, pos) in list {
                    let m = &self.msgs[i];
                    if let Some(ack) = m.ack {
                        points.push((ack, true, i, pos));
                    }
                    points.push((m.first_attempt, false, i, pos));
                }
                points.sort_unstable();
                let mut latest: Option<(usize, usize)> = None; // (position, message)
                for (_, is_ack, i, pos) in points {
                    if is_ack {
                        if latest.is_none_or(|(p, _)| pos > p) {
                            latest = Some((pos, i));
                        }
                    } else if let Some((p, before)) = latest
                        && p > pos
                        && reported.insert(i)
                    {
                        found.push((client.clone(), before, i, p, pos, "was acknowledged before"));
                    }
                }
                // Both first sent on one connection and acknowledged on it.
                let mut by_conn: BTreeMap<u32, Vec<(usize, usize, usize)>> = BTreeMap::new();
                for &(i, pos) in list {
                    let m = &self.msgs[i];
                    if m.ack.is_some() && m.ack_conn == m.first_conn {
                        by_conn
                            .entry(m.first_conn)
                            .or_default()
                            .push((m.first_attempt, i, pos));
                    }
                }
                for mut sent in by_conn.into_values() {
                    sent.sort_unstable();
                    let mut latest: Option<(usize, usize)> = None;
                    for (_, i, pos) in sent {
                        if let Some((p, before)) = latest
                            && p > pos
                            && reported.insert(i)
                        {
                            found.push((
                                client.clone(),
                                before,
                                i,
                                p,
                                pos,
                                "was sent before it on the same connection, both acknowledged \
                                 there",
                            ));
                        }
                        if latest.is_none_or(|(p, _)| pos > p) {
                            latest = Some((pos, i));
                        }
                    }
                }
            }
        }
        for (client, before, after, before_pos, after_pos, why) in found {
            let (a, b) = (&self.msgs[before], &self.msgs[after]);
            let detail = format!(
                "{} (from {} on {}, QoS {}) first delivered before {}, which {why}",
                b.payload, b.publisher, b.topic, b.qos, a.payload
            );
            let mut idxs = vec![a.first_attempt, b.first_attempt, before_pos, after_pos];
            idxs.extend(a.ack);
            idxs.extend(b.ack);
            let payload = b.payload.clone();
            self.violation(Rule::OutOfOrder, &client, Some(&payload), detail, &idxs);
        }
    }

    fn will_due(&self, case: &WillCase, end_at: u64) -> WillDue {
        let Some(end) = case.end else {
            return WillDue::Never("the connection never ended");
        };
        if end.graceful {
            return WillDue::Never("the connection ended with a normal DISCONNECT");
        }
        if end.takeover {
            return WillDue::AtMostOnce;
        }
        let delay = u64::from(case.will.delay_secs.min(case.expiry)) * SECOND_US;
        if delay == 0 {
            return WillDue::Exactly;
        }
        let due = end.at.saturating_add(delay);
        if let Some(back) = case.next_connect
            && back.saturating_add(self.tol) < due
        {
            return WillDue::Never("the client connected again within the will delay");
        }
        let returned_near = case
            .next_connect
            .into_iter()
            .chain(case.next_attempt)
            .any(|t| t <= due.saturating_add(self.tol));
        if returned_near || end_at <= due.saturating_add(self.tol) {
            WillDue::AtMostOnce
        } else {
            WillDue::Exactly
        }
    }

    /// Each due will was published once to its subscribers, and no other will at all.
    fn check_wills(&mut self, end_at: u64) {
        let mut found = Vec::new();
        for case in &self.wills {
            self.counts.wills_checked += 1;
            let due = self.will_due(case, end_at);
            let payload = case.will.payload.as_str();
            let mut context = vec![case.connect_idx];
            context.extend(case.end.map(|e| e.idx));
            let received: Vec<(&SessionKey, &Receipt)> = self
                .receipts
                .iter()
                .filter_map(|(key, r)| r.get(payload).map(|r| (key, r)))
                .collect();
            for &((client, _), r) in &received {
                let mut idxs = context.clone();
                idxs.extend(&r.deliveries);
                match due {
                    WillDue::Never(why) => {
                        found.push((
                            Rule::WillUnexpected,
                            client.clone(),
                            payload.to_owned(),
                            format!("will of {} published but {why}", case.client),
                            idxs,
                        ));
                        continue;
                    }
                    WillDue::AtMostOnce | WillDue::Exactly => {}
                }
                if r.publications() > 1 {
                    found.push((
                        Rule::WillDuplicated,
                        client.clone(),
                        payload.to_owned(),
                        format!(
                            "will of {} published {} times",
                            case.client,
                            r.publications()
                        ),
                        idxs.clone(),
                    ));
                }
                if let Some(end) = case.end {
                    let delay = u64::from(case.will.delay_secs.min(case.expiry)) * SECOND_US;
                    let earliest = end.at.saturating_add(delay).saturating_sub(self.tol);
                    let early =
                        r.deliveries.iter().copied().find(|&d| {
                            d < end.idx || (delay > 0 && self.events[d].at_us < earliest)
                        });
                    if let Some(d) = early {
                        found.push((
                            Rule::WillEarly,
                            client.clone(),
                            payload.to_owned(),
                            format!(
                                "will of {} published at {:.3}s, connection ended at {:.3}s \
                                 with will delay {}s",
                                case.client,
                                secs(self.events[d].at_us),
                                secs(end.at),
                                case.will.delay_secs
                            ),
                            idxs,
                        ));
                    }
                }
            }
            if due != WillDue::Exactly || case.will.qos == 0 {
                continue;
            }
            let Some(end) = case.end else { continue };
            for (client, st) in &self.clients {
                if st.session_at(end_at, self.tol) != SessionState::Live {
                    continue;
                }
                let Some(sub) = st
                    .matching(&case.will.topic)
                    .filter(|s| s.idx < end.idx)
                    .min_by_key(|s| s.idx)
                else {
                    continue;
                };
                let key = (client.clone(), st.epoch);
                if received.iter().any(|(k, _)| **k == key) {
                    continue;
                }
                let mut idxs = context.clone();
                idxs.push(sub.idx);
                found.push((
                    Rule::WillMissing,
                    client.clone(),
                    payload.to_owned(),
                    format!(
                        "will of {} (connection ended without DISCONNECT at {:.3}s, delay {}s) \
                         never delivered to a subscriber of {}",
                        case.client,
                        secs(end.at),
                        case.will.delay_secs,
                        case.will.topic
                    ),
                    idxs,
                ));
            }
        }
        for (rule, client, payload, detail, idxs) in found {
            self.violation(rule, &client, Some(&payload), detail, &idxs);
        }
    }
}
