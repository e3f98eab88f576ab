//! Access control lists: which principal may publish to or subscribe to which topics.
//!
//! The text format (one rule per line, `#` starts a comment line) is documented in
//! `docs/security.md`:
//!
//! ```text
//! # before any header: rules for every client (%c: the client id, %u: the user name)
//! allow subscribe $SYS/broker/#
//! allow pubsub    devices/%c/#
//! # rules for user alice only
//! user alice
//! allow publish   alerts/# qos=1 retain=false
//! # rules for that client id only
//! client gateway-1
//! deny  subscribe secret/#
//! # back to rules for every client
//! all
//! allow subscribe public/#
//! ```
//!
//! Comments are whole lines starting with `#` (a `#` later in a line is a topic wildcard).
//!
//! **First match wins**: the rules that apply to a principal are tried in file order and the
//! first whose filter matches decides. Nothing matching means **deny**. An `allow` rule with
//! `qos=N` or `retain=false` that matches the topic but not the condition denies.
//!
//! How subscriptions are checked depends on the file's `mode` line (at most one, before the
//! first rule):
//!
//! - `mode filter` (the default): a SUBSCRIBE is decided once, for its whole filter. An `allow`
//!   rule matches when its filter covers every topic the requested filter can match; a `deny`
//!   rule matches when the two filters overlap at all (so `deny subscribe secret/#` also
//!   refuses a subscription to `#`). Nothing is checked per message.
//! - `mode message` (as Mosquitto does it): a SUBSCRIBE is granted when an `allow` rule
//!   overlaps the requested filter before any `deny` rule covers all of it, and every message is
//!   then checked as it is delivered: the first `subscribe`/`pubsub` rule whose filter matches
//!   the message's topic decides, and a denied message is withheld (counted as dropped,
//!   `reason="not_authorized"`). So `deny subscribe secret/#` followed by `allow subscribe #`
//!   grants `#` and delivers everything except `secret/...`.
//!
//! Parsing takes text (the caller reads the file): no I/O here.

use crate::auth::{Access, Authorizer, Principal};
use crate::topic::matches;
use raftmq_codec::QoS;
use std::fmt;

/// A problem in an ACL text, with its 1-based line number.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct AclError {
    pub line: usize,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Scope {
    All,
    User(String),
    Client(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    scope: Scope,
    allow: bool,
    publish: bool,
    subscribe: bool,
    filter: String,
    max_qos: Option<QoS>,
    retain: Option<bool>,
}

/// When subscriptions are checked (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AclMode {
    /// The whole filter, at SUBSCRIBE.
    #[default]
    Filter,
    /// Broad subscriptions granted, each message checked as it is delivered.
    Message,
}

/// A parsed access control list; see the module documentation for the format and semantics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Acl {
    rules: Vec<Rule>,
    mode: AclMode,
}

impl Acl {
    /// Parses an ACL text; the first problem found is returned with its line number.
    pub fn parse(text: &str) -> Result<Acl, AclError> {
        let mut scope = Scope::All;
        let mut rules = Vec::new();
        let mut mode = None;
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |message: String| AclError { line, message };
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let words: Vec<&str> = content.split_whitespace().collect();
            match words[..] {
                ["mode", m] => {
                    if mode.is_some() || !rules.is_empty() {
                        return Err(err(
                            "`mode` may appear once, before the first rule".to_owned()
                        ));
                    }
                    mode = Some(match m {
                        "filter" => AclMode::Filter,
                        "message" => AclMode::Message,
                        other => {
                            return Err(err(format!(
                                "mode `{other}`: expected `filter` or `message`"
                            )));
                        }
                    });
                }
                ["all"] => scope = Scope::All,
                ["user", name] => scope = Scope::User(name.to_owned()),
                ["client", id] => scope = Scope::Client(id.to_owned()),
                ["user" | "client", ..] => {
                    return Err(err(format!(
                        "`{}` takes exactly one name (no spaces)",
                        words[0]
                    )));
                }
                [verdict, action, filter, ref options @ ..] => {
                    let allow = match verdict {
                        "allow" => true,
                        "deny" => false,
                        other => {
                            return Err(err(format!(
                                "unknown word `{other}`: expected allow, deny, user, client or all"
                            )));
                        }
                    };
                    let (publish, subscribe) = match action {
                        "publish" => (true, false),
                        "subscribe" => (false, true),
                        "pubsub" => (true, true),
                        other => {
                            return Err(err(format!(
                                "unknown action `{other}`: expected publish, subscribe or pubsub"
                            )));
                        }
                    };
                    check_filter(filter).map_err(|m| err(format!("filter `{filter}`: {m}")))?;
                    let mut rule = Rule {
                        scope: scope.clone(),
                        allow,
                        publish,
                        subscribe,
                        filter: filter.to_owned(),
                        max_qos: None,
                        retain: None,
                    };
                    for option in options {
                        if !allow {
                            return Err(err(format!(
                                "`{option}`: qos= and retain= only apply to allow rules"
                            )));
                        }
                        match option.split_once('=') {
                            Some(("qos", n)) => {
                                rule.max_qos =
                                    Some(n.parse::<u8>().ok().and_then(QoS::from_u8).ok_or_else(
                                        || err(format!("qos=`{n}`: expected 0, 1 or 2")),
                                    )?);
                            }
                            Some(("retain", v)) => {
                                rule.retain = Some(match v {
                                    "true" => true,
                                    "false" => false,
                                    _ => {
                                        return Err(err(format!(
                                            "retain=`{v}`: expected true or false"
                                        )));
                                    }
                                });
                            }
                            _ => {
                                return Err(err(format!(
                                    "unknown option `{option}`: expected qos=N or retain=true|false"
                                )));
                            }
                        }
                    }
                    rules.push(rule);
                }
                _ => {
                    return Err(err(format!(
                        "cannot read `{content}`: expected `allow|deny publish|subscribe|pubsub \
                         <filter> [qos=N] [retain=true|false]`, `user <name>`, `client <id>` or \
                         `all`"
                    )));
                }
            }
        }
        Ok(Acl {
            rules,
            mode: mode.unwrap_or_default(),
        })
    }

    /// An ACL that allows publishing to the topics matching `publish` and subscribing within
    /// `subscribe` (filters, `%u`/`%c` substituted as in the file format) and denies the rest,
    /// in `filter` mode: the per-token permissions of a JWT. The filters are checked, never
    /// parsed as rule text, so a filter cannot smuggle in another rule. An error names the
    /// 1-based position of the first bad filter in its list.
    pub fn from_permissions(publish: &[&str], subscribe: &[&str]) -> Result<Acl, AclError> {
        let mut rules = Vec::with_capacity(publish.len() + subscribe.len());
        for (filters, is_publish) in [(publish, true), (subscribe, false)] {
            for (i, filter) in filters.iter().enumerate() {
                let checked = if filter.is_empty() {
                    Err("empty")
                } else {
                    check_filter(filter)
                };
                checked.map_err(|m| AclError {
                    line: i + 1,
                    message: format!("filter `{filter}`: {m}"),
                })?;
                rules.push(Rule {
                    scope: Scope::All,
                    allow: true,
                    publish: is_publish,
                    subscribe: !is_publish,
                    filter: (*filter).to_owned(),
                    max_qos: None,
                    retain: None,
                });
            }
        }
        Ok(Acl {
            rules,
            mode: AclMode::Filter,
        })
    }

    /// When subscriptions are checked.
    pub fn mode(&self) -> AclMode {
        self.mode
    }

    /// Number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules (everything is denied).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether `principal` may perform `access` (first matching rule; deny when none matches).
    pub fn check(&self, principal: &Principal, access: Access<'_>) -> bool {
        if matches!(access, Access::Receive { .. }) && self.mode == AclMode::Filter {
            // Decided for the whole filter at SUBSCRIBE.
            return true;
        }
        for rule in &self.rules {
            let applies = match &rule.scope {
                Scope::All => true,
                Scope::User(u) => principal.username.as_deref() == Some(u.as_str()),
                Scope::Client(c) => principal.client_id == *c,
            };
            if !applies {
                continue;
            }
            let Some(filter) = substitute(&rule.filter, principal) else {
                continue;
            };
            match access {
                Access::Publish { topic, qos, retain } => {
                    if !rule.publish || !matches(&filter, topic) {
                        continue;
                    }
                    if !rule.allow {
                        return false;
                    }
                    let qos_ok = rule.max_qos.is_none_or(|max| qos <= max);
                    let retain_ok = !retain || rule.retain != Some(false);
                    return qos_ok && retain_ok;
                }
                Access::Subscribe {
                    filter: wanted,
                    qos,
                } => {
                    if !rule.subscribe {
                        continue;
                    }
                    // `filter` mode: an allow must cover the whole requested filter, a deny
                    // decides as soon as it touches it. `message` mode the other way round:
                    // each message is checked again on delivery.
                    type Test = fn(&str, &str) -> bool;
                    let (allow_test, deny_test): (Test, Test) = match self.mode {
                        AclMode::Filter => (covers, overlaps),
                        AclMode::Message => (overlaps, covers),
                    };
                    let decides = if rule.allow { allow_test } else { deny_test };
                    if decides(&filter, strip_share(wanted)) {
                        return rule.allow && rule.max_qos.is_none_or(|max| qos <= max);
                    }
                }
                Access::Receive { topic } => {
                    if rule.subscribe && matches(&filter, topic) {
                        return rule.allow;
                    }
                }
            }
        }
        false
    }
}

impl Authorizer for Acl {
    fn authorize(&self, principal: &Principal, access: Access<'_>) -> bool {
        self.check(principal, access)
    }

    fn checks_delivery(&self, _principal: &Principal) -> bool {
        self.mode == AclMode::Message
    }
}

impl fmt::Display for Acl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ACL rules", self.rules.len())
    }
}

/// Checks a rule filter (placeholders allowed) is a valid MQTT topic filter.
fn check_filter(filter: &str) -> Result<(), &'static str> {
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("`#` must be a whole level and the last one");
        }
        if level.contains('+') && *level != "+" {
            return Err("`+` must be a whole level");
        }
        if level.contains('%') && level.replace("%u", "").replace("%c", "").contains('%') {
            return Err("only %u and %c may follow `%`");
        }
    }
    Ok(())
}

/// The rule filter with `%u`/`%c` replaced, or `None` when the principal cannot match it (no
/// user name for `%u`, or an identity containing `/`, `+` or `#`, which could widen the rule).
fn substitute(filter: &str, principal: &Principal) -> Option<String> {
    if !filter.contains('%') {
        return Some(filter.to_owned());
    }
    let safe = |s: &str| !s.is_empty() && !s.contains(['/', '+', '#']);
    let mut out = filter.to_owned();
    if out.contains("%u") {
        let user = principal.username.as_deref().filter(|u| safe(u))?;
        out = out.replace("%u", user);
    }
    if out.contains("%c") {
        if !safe(&principal.client_id) {
            return None;
        }
        out = out.replace("%c", &principal.client_id);
    }
    Some(out)
}

/// `$share/{group}/{filter}` → `{filter}`.
fn strip_share(filter: &str) -> &str {
    filter
        .strip_prefix("$share/")
        .and_then(|rest| rest.split_once('/'))
        .map_or(filter, |(_, f)| f)
}

/// Whether every topic matched by `wanted` is matched by `rule` (both valid filters).
fn covers(rule: &str, wanted: &str) -> bool {
    let first_wildcard = |s: &str| {
        let first = s.split('/').next().unwrap_or("");
        first == "+" || first == "#"
    };
    // `#`/`+` at the start never match `$` topics.
    if wanted.starts_with('$') && first_wildcard(rule) {
        return false;
    }
    let mut r = rule.split('/');
    let mut w = wanted.split('/');
    loop {
        match (r.next(), w.next()) {
            (Some("#"), _) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b && b != "+" => {}
            (None, None) => return true,
            // `a/#` also matches `a`.
            (Some(rest), None) => return rest == "#" && r.next().is_none(),
            _ => return false,
        }
    }
}

/// Whether some topic is matched by both filters.
fn overlaps(a: &str, b: &str) -> bool {
    let first = |s: &str| s.split('/').next().unwrap_or("").to_owned();
    let (fa, fb) = (first(a), first(b));
    let wild = |l: &str| l == "+" || l == "#";
    if (fa.starts_with('$') && wild(&fb)) || (fb.starts_with('$') && wild(&fa)) {
        return false;
    }
    let mut x = a.split('/');
    let mut y = b.split('/');
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (Some(p), Some(q)) if p == "+" || q == "+" || p == q => {}
            (None, None) => return true,
            (Some(rest), None) => return rest == "#",
            (None, Some(rest)) => return rest == "#",
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(user: Option<&str>, client: &str) -> Principal {
        Principal {
            username: user.map(str::to_owned),
            client_id: client.to_owned(),
            acl: None,
            valid_until: None,
        }
    }

    fn publish(topic: &str) -> Access<'_> {
        Access::Publish {
            topic,
            qos: QoS::AtMostOnce,
            retain: false,
        }
    }

    fn subscribe(filter: &str) -> Access<'_> {
        Access::Subscribe {
            filter,
            qos: QoS::AtMostOnce,
        }
    }

    fn receive(topic: &str) -> Access<'_> {
        Access::Receive { topic }
    }

    #[test]
    fn message_mode_grants_broad_subscriptions_and_withholds_denied_topics_per_message() {
        let acl = Acl::parse(
            "mode message\n\
             deny subscribe secret/#\n\
             allow subscribe #\n",
        )
        .expect("valid");
        let p = who(None, "c");
        assert_eq!(acl.mode(), AclMode::Message);
        assert!(acl.checks_delivery(&p));
        // Filter mode would refuse `#` (it overlaps the denied `secret/#`).
        assert!(acl.check(&p, subscribe("#")));
        assert!(acl.check(&p, subscribe("+/x")));
        assert!(acl.check(&p, receive("public/x")));
        assert!(!acl.check(&p, receive("secret/x")));
        assert!(!acl.check(&p, receive("secret")));
        // A subscription that can only ever see denied topics is refused.
        assert!(!acl.check(&p, subscribe("secret/#")));
        assert!(!acl.check(&p, subscribe("$share/g/secret/+")));
    }

    #[test]
    fn message_mode_without_a_matching_allow_refuses_and_withholds() {
        let acl = Acl::parse(
            "mode message\n\
             user alice\n\
             allow subscribe alice/#\n",
        )
        .expect("valid");
        let alice = who(Some("alice"), "a");
        let bob = who(Some("bob"), "b");
        assert!(acl.check(&alice, subscribe("#")));
        assert!(acl.check(&alice, receive("alice/1")));
        assert!(!acl.check(&alice, receive("bob/1")));
        assert!(!acl.check(&bob, subscribe("#")));
        assert!(!acl.check(&bob, receive("alice/1")));
    }

    #[test]
    fn filter_mode_is_the_default_and_never_checks_deliveries() {
        let acl = Acl::parse("deny subscribe secret/#\nallow subscribe #\n").expect("valid");
        let p = who(None, "c");
        assert_eq!(acl.mode(), AclMode::Filter);
        assert!(!acl.checks_delivery(&p));
        assert!(!acl.check(&p, subscribe("#")));
        assert!(acl.check(&p, receive("secret/x")));
    }

    #[test]
    fn mode_is_given_once_before_the_rules() {
        for text in [
            "allow subscribe #\nmode message\n",
            "mode message\nmode filter\n",
            "mode everything\n",
        ] {
            assert!(Acl::parse(text).is_err(), "{text:?}");
        }
        let err = Acl::parse("allow subscribe #\nmode message\n").expect_err("refused");
        assert_eq!(err.line, 2);
    }

    #[test]
    fn first_match_wins_and_nothing_matching_denies() {
        let acl = Acl::parse(
            "# comment\n\
             deny publish secret/#\n\
             allow pubsub #\n",
        )
        .expect("parse");
        let p = who(Some("bob"), "c1");
        assert!(!acl.check(&p, publish("secret/x")));
        assert!(acl.check(&p, publish("public/x")));
        assert!(!Acl::default().check(&p, publish("a")));
        // `#` does not cover `$SYS` topics.
        assert!(!acl.check(&p, publish("$SYS/x")));
    }

    #[test]
    fn user_and_client_sections_apply_only_to_them() {
        let acl = Acl::parse(
            "user alice\n\
             allow publish alice/#\n\
             client gw-1\n\
             allow subscribe gw/#\n\
             all\n\
             allow subscribe public/#\n",
        )
        .expect("parse");
        let alice = who(Some("alice"), "x");
        let bob = who(Some("bob"), "gw-1");
        assert!(acl.check(&alice, publish("alice/1")));
        assert!(!acl.check(&bob, publish("alice/1")));
        assert!(acl.check(&bob, subscribe("gw/+/t")));
        assert!(!acl.check(&alice, subscribe("gw/+/t")));
        assert!(acl.check(&alice, subscribe("public/#")));
        assert!(acl.check(&bob, subscribe("public/a")));
    }

    #[test]
    fn placeholders_substitute_user_and_client() {
        let acl = Acl::parse("allow pubsub users/%u/%c/#\n").expect("parse");
        assert!(acl.check(&who(Some("ann"), "dev1"), publish("users/ann/dev1/t")));
        assert!(!acl.check(&who(Some("ann"), "dev1"), publish("users/bob/dev1/t")));
        // No user name: a %u rule never matches.
        assert!(!acl.check(&who(None, "dev1"), publish("users//dev1/t")));
        // An identity with wildcards cannot widen the rule.
        assert!(!acl.check(&who(Some("#"), "dev1"), publish("users/x/dev1/t")));
        assert!(!acl.check(&who(Some("a/b"), "dev1"), publish("users/a/b/dev1/t")));
    }

    #[test]
    fn qos_and_retain_conditions_deny_when_exceeded() {
        let acl = Acl::parse("allow pubsub t/# qos=1 retain=false\n").expect("parse");
        let p = who(None, "c");
        let pub_ = |qos, retain| Access::Publish {
            topic: "t/1",
            qos,
            retain,
        };
        assert!(acl.check(&p, pub_(QoS::AtLeastOnce, false)));
        assert!(!acl.check(&p, pub_(QoS::ExactlyOnce, false)));
        assert!(!acl.check(&p, pub_(QoS::AtMostOnce, true)));
        let sub = |qos| Access::Subscribe { filter: "t/#", qos };
        assert!(acl.check(&p, sub(QoS::AtLeastOnce)));
        assert!(!acl.check(&p, sub(QoS::ExactlyOnce)));
    }

    #[test]
    fn subscribe_allow_needs_cover_deny_needs_overlap() {
        let acl = Acl::parse(
            "deny subscribe secret/#\n\
             allow subscribe a/#\n\
             allow subscribe #\n",
        )
        .expect("parse");
        let p = who(None, "c");
        assert!(!acl.check(&p, subscribe("#")));
        assert!(!acl.check(&p, subscribe("+/x")));
        assert!(!acl.check(&p, subscribe("secret")));
        assert!(acl.check(&p, subscribe("public/+")));
        assert!(acl.check(&p, subscribe("$share/g/public/+")));
        assert!(!acl.check(&p, subscribe("$share/g/secret/a")));

        let narrow = Acl::parse("allow subscribe a/+\n").expect("parse");
        assert!(narrow.check(&p, subscribe("a/b")));
        assert!(narrow.check(&p, subscribe("a/+")));
        assert!(!narrow.check(&p, subscribe("a/#")));
        assert!(!narrow.check(&p, subscribe("+/b")));
    }

    #[test]
    fn filter_helpers() {
        assert!(covers("a/#", "a"));
        assert!(covers("a/#", "a/b/c"));
        assert!(covers("+/b", "x/b"));
        assert!(!covers("a/b", "a/+"));
        assert!(!covers("#", "$SYS/a"));
        assert!(covers("$SYS/#", "$SYS/a"));
        assert!(overlaps("a/+", "+/b"));
        assert!(overlaps("a/#", "a"));
        assert!(!overlaps("a/b", "a/c"));
        assert!(!overlaps("#", "$SYS/x"));
        assert!(!overlaps("a/b/c", "a/b"));
    }

    #[test]
    fn errors_name_the_line() {
        let cases = [
            ("allow publish a/#\nallow poke a\n", 2, "unknown action"),
            ("\n\nmaybe publish a\n", 3, "unknown word"),
            ("allow publish a/#/b\n", 1, "`#` must be"),
            ("allow publish a/b+\n", 1, "`+` must be"),
            ("allow publish a qos=3\n", 1, "qos="),
            ("allow publish a retain=maybe\n", 1, "retain="),
            ("deny publish a qos=1\n", 1, "only apply to allow"),
            ("allow publish a size=1\n", 1, "unknown option"),
            ("user\n", 1, "exactly one name"),
            ("allow publish\n", 1, "cannot read"),
            ("user a b\n", 1, "exactly one name"),
            ("allow publish a/%x\n", 1, "%u and %c"),
        ];
        for (text, line, needle) in cases {
            let e = Acl::parse(text).expect_err(text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
            assert!(e.to_string().starts_with(&format!("line {line}: ")));
        }
        // `#` after the start of a line is a wildcard, not a comment.
        let acl = Acl::parse("  # indented comment\nallow publish #\n").expect("parse");
        assert_eq!(acl.len(), 1);
        assert!(acl.check(&who(None, "c"), publish("any/topic")));
    }
}
