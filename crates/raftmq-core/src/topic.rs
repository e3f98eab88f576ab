//! Topic names, topic filters and the matching rules between them (MQTT 5.0 §4.7, which
//! MQTT 3.1.1 §4.7 agrees with).
//!
//! * A [`TopicName`] is what a PUBLISH is sent to: at least one character, no wildcards.
//! * A [`TopicFilter`] is what a SUBSCRIBE asks for: levels separated by `/`, where `+` stands
//!   for exactly one level and `#` (only as the last level) for the parent level and any number
//!   of child levels.
//! * [`parse_subscription`] splits a shared subscription `$share/{group}/{filter}` into its
//!   group and filter.
//! * [`matches`] decides whether a filter matches a name.
//!
//! Both newtypes hold an `Arc<str>`, so cloning one (to store it in an index, a session or a
//! queued message) never copies the text. Validation is a single pass over the bytes and never
//! allocates except for the final `Arc`.
//!
//! Empty levels are significant: `a//b` has three levels, the middle one empty, and `/finance`
//! has two. Topics whose first character is `$` (such as `$SYS/...`) are never matched by a
//! filter whose first level is a wildcard.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;
use std::sync::Arc;

/// The prefix of a shared subscription's topic filter (MQTT 5.0 §4.8.2).
const SHARE_PREFIX: &str = "$share/";

/// Bounds a broker puts on topic names and filters, on top of the protocol's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Most levels a name or filter may have (`a/b/c` has 3).
    pub max_levels: usize,
    /// Most bytes (UTF-8 encoded, as on the wire) a name or filter may have.
    pub max_len: usize,
}

impl Default for TopicLimits {
    fn default() -> Self {
        Self {
            max_levels: 128,
            max_len: 65_535,
        }
    }
}

/// Why a topic name, topic filter or shared subscription is invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The name or filter has no characters.
    #[error("topic is empty")]
    Empty,
    /// The name or filter is longer than [`TopicLimits::max_len`] bytes.
    #[error("topic is {len} bytes long, more than the {max} allowed")]
    TooLong { len: usize, max: usize },
    /// The name or filter has more than [`TopicLimits::max_levels`] levels.
    #[error("topic has {levels} levels, more than the {max} allowed")]
    TooManyLevels { levels: usize, max: usize },
    /// The name or filter contains U+0000.
    #[error("topic contains the null character")]
    NullChar,
    /// A topic name contains `+` or `#`.
    #[error("topic name contains a wildcard")]
    WildcardInName,
    /// A filter uses `+` or `#` other than as a whole level, or `#` other than as the last one.
    #[error("wildcard is not a whole level, or `#` is not the last level")]
    InvalidWildcard,
    /// The group of a `$share/{group}/{filter}` subscription is empty or contains `+` or `#`.
    #[error("shared subscription group is empty or contains a wildcard")]
    InvalidShareGroup,
    /// A `$share/{group}` subscription has no filter after the group.
    #[error("shared subscription has no topic filter")]
    MissingShareFilter,
}

/// A validated topic name: the destination of a PUBLISH.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicName(Arc<str>);

impl TopicName {
    /// Validates `s` as a topic name: non-empty, without `+`, `#` or U+0000, and within `limits`.
    ///
    /// An empty name is legal on the wire in MQTT 5.0 when a topic alias is used; resolving the
    /// alias is the caller's business, so this rejects it.
    pub fn new(s: &str, limits: &TopicLimits) -> Result<Self, TopicError> {
        check_len(s, limits)?;
        let mut levels = 1;
        for b in s.bytes() {
            match b {
                b'/' => levels += 1,
                b'+' | b'#' => return Err(TopicError::WildcardInName),
                0 => return Err(TopicError::NullChar),
                _ => {}
            }
        }
        check_levels(levels, limits)?;
        Ok(Self(s.into()))
    }
}

/// A validated topic filter: what a SUBSCRIBE or UNSUBSCRIBE names (without any `$share/`
/// prefix, see [`parse_subscription`]).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicFilter(Arc<str>);

impl TopicFilter {
    /// Validates `s` as a topic filter: non-empty, no U+0000, within `limits`, `+` only as a
    /// whole level and `#` only as the whole last level.
    pub fn new(s: &str, limits: &TopicLimits) -> Result<Self, TopicError> {
        check_len(s, limits)?;
        if s.contains('\0') {
            return Err(TopicError::NullChar);
        }
        let mut levels = 0;
        let mut rest = Some(s);
        while let Some(text) = rest {
            let (level, next) = split_level(text);
            levels += 1;
            let valid = match level {
                "+" => true,
                "#" => next.is_none(),
                _ => !level.bytes().any(|b| b == b'+' || b == b'#'),
            };
            if !valid {
                return Err(TopicError::InvalidWildcard);
            }
            rest = next;
        }
        check_levels(levels, limits)?;
        Ok(Self(s.into()))
    }

    /// Whether the filter contains a `+` or `#` level (otherwise it matches exactly one name).
    pub fn has_wildcards(&self) -> bool {
        self.0.bytes().any(|b| b == b'+' || b == b'#')
    }
}

macro_rules! impl_str_newtype {
    ($ty:ident) => {
        impl $ty {
            /// The text.
            pub fn as_str(&self) -> &str {
                &self.0
            }

            /// Whether it starts with `$`: a server topic such as `$SYS/...` (which filters
            /// starting with a wildcard do not match), or a filter that can only match those.
            pub fn is_sys(&self) -> bool {
                self.0.starts_with('$')
            }
        }

        impl Deref for $ty {
            type Target = str;

            fn deref(&self) -> &str {
                &self.0
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        /// Consistent with `Eq`, `Ord` and `Hash`, which all compare the text.
        impl Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&*self.0, f)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
    };
}

impl_str_newtype!(TopicName);
impl_str_newtype!(TopicFilter);

/// A SUBSCRIBE topic filter split into its optional shared-subscription group and the filter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ParsedFilter {
    /// The `{group}` of `$share/{group}/{filter}`, or `None` for an ordinary subscription.
    pub share_group: Option<Arc<str>>,
    /// The filter proper, without the `$share/{group}/` prefix.
    pub filter: TopicFilter,
}

/// Parses a SUBSCRIBE topic filter, which may be a shared subscription
/// `$share/{group}/{filter}` (MQTT 5.0 §4.8.2): the group must be non-empty and free of `/`,
/// `+` and `#`, and the filter must be a valid [`TopicFilter`].
///
/// `limits.max_len` applies to the whole text, `limits.max_levels` to the filter proper.
/// A filter that merely starts with `$share` but not `$share/` (e.g. `$shares/x`) is ordinary.
pub fn parse_subscription(s: &str, limits: &TopicLimits) -> Result<ParsedFilter, TopicError> {
    let Some(rest) = s.strip_prefix(SHARE_PREFIX) else {
        return Ok(ParsedFilter {
            share_group: None,
            filter: TopicFilter::new(s, limits)?,
        });
    };
    check_len(s, limits)?;
    if s.contains('\0') {
        return Err(TopicError::NullChar);
    }
    let (group, filter) = rest.split_once('/').unwrap_or((rest, ""));
    if group.is_empty() || group.bytes().any(|b| b == b'+' || b == b'#') {
        return Err(TopicError::InvalidShareGroup);
    }
    if filter.is_empty() {
        return Err(TopicError::MissingShareFilter);
    }
    Ok(ParsedFilter {
        share_group: Some(group.into()),
        filter: TopicFilter::new(filter, limits)?,
    })
}

/// Whether `filter` matches the topic name `topic` (MQTT 5.0 §4.7).
///
/// Both are assumed valid ([`TopicFilter::new`], [`TopicName::new`]). `+` matches exactly one
/// level, possibly empty; `#` matches its parent level and any number of child levels
/// (`sport/#` matches `sport`); and a topic starting with `$` is not matched by a filter whose
/// first level is `+` or `#`. Never allocates.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && is_wildcard_level(split_level(filter).0) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some(f), Some(t)) if f == "+" || f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Splits off the first level of a topic or filter: `("a", Some("b/c"))` for `a/b/c`,
/// `("a", None)` for `a`, `("", Some(""))` for `/`.
pub(crate) fn split_level(s: &str) -> (&str, Option<&str>) {
    match s.split_once('/') {
        Some((level, rest)) => (level, Some(rest)),
        None => (s, None),
    }
}

/// Whether a filter level is `+` or `#`.
pub(crate) fn is_wildcard_level(level: &str) -> bool {
    level == "+" || level == "#"
}

fn check_len(s: &str, limits: &TopicLimits) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > limits.max_len {
        return Err(TopicError::TooLong {
            len: s.len(),
            max: limits.max_len,
        });
    }
    Ok(())
}

fn check_levels(levels: usize, limits: &TopicLimits) -> Result<(), TopicError> {
    if levels > limits.max_levels {
        return Err(TopicError::TooManyLevels {
            levels,
            max: limits.max_levels,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Result<TopicName, TopicError> {
        TopicName::new(s, &TopicLimits::default())
    }

    fn filter(s: &str) -> Result<TopicFilter, TopicError> {
        TopicFilter::new(s, &TopicLimits::default())
    }

    fn parse(s: &str) -> Result<ParsedFilter, TopicError> {
        parse_subscription(s, &TopicLimits::default())
    }

    #[test]
    fn multi_level_wildcard_matches_parent_and_descendants() {
        let f = "sport/tennis/player1/#";
        assert!(matches(f, "sport/tennis/player1"));
        assert!(matches(f, "sport/tennis/player1/ranking"));
        assert!(matches(f, "sport/tennis/player1/score/wimbledon"));
        assert!(!matches(f, "sport/tennis/player2"));
        assert!(!matches(f, "sport/tennis"));
        assert!(matches("sport/#", "sport"));
        assert!(matches("#", "sport/tennis"));
        assert!(matches("#", "/"));
    }

    #[test]
    fn single_level_wildcard_matches_exactly_one_level() {
        assert!(matches("sport/tennis/+", "sport/tennis/player1"));
        assert!(matches("sport/tennis/+", "sport/tennis/player2"));
        assert!(!matches("sport/tennis/+", "sport/tennis/player1/ranking"));
        assert!(!matches("sport/+", "sport"));
        assert!(matches("sport/+", "sport/"));
        assert!(matches("+/+", "/finance"));
        assert!(matches("/+", "/finance"));
        assert!(!matches("+", "/finance"));
        assert!(matches("+/tennis/#", "sport/tennis/player1"));
        assert!(matches("a/+/#", "a/x"));
        assert!(!matches("a/+/#", "a"));
    }

    #[test]
    fn empty_levels_are_significant() {
        assert!(matches("a//b", "a//b"));
        assert!(!matches("a/b", "a//b"));
        assert!(matches("a/+/b", "a//b"));
        assert!(!matches("/finance", "finance"));
        assert!(!matches("finance", "/finance"));
    }

    #[test]
    fn literal_filters_match_only_equal_names() {
        assert!(matches("sport/tennis", "sport/tennis"));
        assert!(!matches("sport/tennis", "sport/tennis/player1"));
        assert!(!matches("sport/tennis", "sport"));
        assert!(!matches("Sport", "sport"));
    }

    #[test]
    fn dollar_topics_not_matched_by_top_level_wildcard() {
        assert!(!matches("#", "$SYS/broker/uptime"));
        assert!(!matches("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(matches("$SYS/#", "$SYS"));
        // Only the first level of the topic is special.
        assert!(matches("+/$x", "a/$x"));
        assert!(matches("a/#", "a/$x"));
    }

    #[test]
    fn valid_filters_are_accepted() {
        for f in [
            "sport/tennis/player1/#",
            "sport/#",
            "#",
            "+",
            "+/tennis/#",
            "sport/+/player1",
            "+/+",
            "/+",
            "/finance",
            "a//b",
            "/",
            "$SYS/#",
            "$share",
            "caf\u{e9}/+",
        ] {
            assert_eq!(filter(f).map(|t| t.to_string()), Ok(f.to_owned()), "{f}");
        }
    }

    #[test]
    fn misplaced_wildcards_are_rejected_in_filters() {
        for f in [
            "sport+",
            "sport/#/ranking",
            "sport/tennis#",
            "#/",
            "++",
            "a/+b",
            "a/#b",
            "##",
        ] {
            assert_eq!(filter(f), Err(TopicError::InvalidWildcard), "{f}");
        }
    }

    #[test]
    fn wildcards_are_rejected_in_names() {
        for n in ["sport/+", "sport/#", "+", "a#b"] {
            assert_eq!(name(n), Err(TopicError::WildcardInName), "{n}");
        }
    }

    #[test]
    fn valid_names_are_accepted() {
        for n in ["sport/tennis", "/", "/finance", "a//b", "$SYS/uptime", "x"] {
            assert_eq!(name(n).map(|t| t.to_string()), Ok(n.to_owned()), "{n}");
        }
    }

    #[test]
    fn empty_and_null_char_are_rejected() {
        assert_eq!(name(""), Err(TopicError::Empty));
        assert_eq!(filter(""), Err(TopicError::Empty));
        assert_eq!(name("a\0b"), Err(TopicError::NullChar));
        assert_eq!(filter("a/\0"), Err(TopicError::NullChar));
        assert_eq!(parse("$share/g/\0"), Err(TopicError::NullChar));
    }

    #[test]
    fn limits_are_enforced() {
        let limits = TopicLimits {
            max_levels: 3,
            max_len: 8,
        };
        assert!(TopicName::new("a/b/c", &limits).is_ok());
        assert!(TopicFilter::new("a/+/#", &limits).is_ok());
        assert_eq!(
            TopicName::new("a/b/c/d", &limits),
            Err(TopicError::TooManyLevels { levels: 4, max: 3 })
        );
        assert_eq!(
            TopicFilter::new("a/+/c/#", &limits),
            Err(TopicError::TooManyLevels { levels: 4, max: 3 })
        );
        assert_eq!(
            TopicName::new("abcdefghi", &limits),
            Err(TopicError::TooLong { len: 9, max: 8 })
        );
        assert_eq!(
            parse_subscription("$share/group/a", &limits),
            Err(TopicError::TooLong { len: 14, max: 8 })
        );
        assert_eq!(TopicLimits::default().max_levels, 128);
        assert_eq!(TopicLimits::default().max_len, 65_535);
    }

    #[test]
    fn shared_subscriptions_are_split_into_group_and_filter() {
        let parsed = parse("$share/consumer1/sport/tennis/+").expect("valid");
        assert_eq!(parsed.share_group.as_deref(), Some("consumer1"));
        assert_eq!(parsed.filter.as_str(), "sport/tennis/+");

        let parsed = parse("$share/g/#").expect("valid");
        assert_eq!(parsed.share_group.as_deref(), Some("g"));
        assert_eq!(parsed.filter.as_str(), "#");

        let parsed = parse("$share/g//x").expect("valid");
        assert_eq!(parsed.filter.as_str(), "/x");
    }

    #[test]
    fn ordinary_subscriptions_have_no_group() {
        for f in ["sport/#", "$share", "$shares/a", "$SYS/#"] {
            let parsed = parse(f).expect("valid");
            assert_eq!(parsed.share_group, None);
            assert_eq!(parsed.filter.as_str(), f);
        }
        assert_eq!(parse("sport+"), Err(TopicError::InvalidWildcard));
    }

    #[test]
    fn malformed_shared_subscriptions_are_rejected() {
        assert_eq!(parse("$share/group"), Err(TopicError::MissingShareFilter));
        assert_eq!(parse("$share/group/"), Err(TopicError::MissingShareFilter));
        assert_eq!(parse("$share//x"), Err(TopicError::InvalidShareGroup));
        assert_eq!(parse("$share/"), Err(TopicError::InvalidShareGroup));
        assert_eq!(parse("$share/a+/x"), Err(TopicError::InvalidShareGroup));
        assert_eq!(parse("$share/#/x"), Err(TopicError::InvalidShareGroup));
        assert_eq!(parse("$share/g/a/#/b"), Err(TopicError::InvalidWildcard));
    }

    #[test]
    fn newtypes_behave_like_their_text() {
        let n = name("$SYS/uptime").expect("valid");
        assert!(n.is_sys());
        assert_eq!(n.as_str(), "$SYS/uptime");
        assert_eq!(&*n, "$SYS/uptime");
        assert_eq!(format!("{n:?}"), "\"$SYS/uptime\"");
        assert!(!name("a").expect("valid").is_sys());

        let f = filter("a/+").expect("valid");
        assert!(f.has_wildcards());
        assert!(!f.is_sys());
        assert!(!filter("a/b").expect("valid").has_wildcards());
        assert!(filter("$SYS/#").expect("valid").is_sys());

        let set: std::collections::HashSet<TopicFilter> = [f].into_iter().collect();
        assert!(set.contains("a/+"));
        assert!(filter("a").expect("valid") < filter("b").expect("valid"));
    }
}

/// Proptest strategies over small alphabets of topic levels (including the empty level and a
/// `$` level), shared by the property tests of the subscription and retained indexes.
#[cfg(test)]
pub(crate) mod strategies {
    use proptest::prelude::*;

    fn level() -> impl Strategy<Value = &'static str> {
        prop::sample::select(&["a", "b", "", "$x"][..])
    }

    /// Topic names of one to four levels.
    pub(crate) fn topics() -> impl Strategy<Value = String> {
        prop::collection::vec(level(), 1..5)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("topic names are non-empty", |t| !t.is_empty())
    }

    /// Filters of up to three levels (or `+`), ending in `#` when asked or when empty.
    pub(crate) fn filters() -> impl Strategy<Value = String> {
        let filter_level = prop_oneof![3 => level(), 1 => Just("+")];
        (prop::collection::vec(filter_level, 0..4), any::<bool>()).prop_map(|(mut levels, hash)| {
            if hash || levels.is_empty() {
                levels.push("#");
            }
            levels.join("/")
        })
    }
}
