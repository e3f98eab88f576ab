//! The retained message index: the last retained message of each topic, found by filter.
//!
//! A SUBSCRIBE must be answered with the retained messages of every topic its filter matches,
//! so the messages are kept in a topic trie (one node per level) rather than a flat map, and
//! [`RetainedIndex::matching`] walks only the part of the trie the filter can reach: a literal
//! level follows one child, `+` follows every child, `#` takes the whole subtree. `a/b/#` visits
//! the `a/b` subtree and nothing else; a filter without wildcards is a plain lookup.
//!
//! The index is internally locked with a [`RwLock`], so one instance can be shared by all
//! connection tasks. Nodes left empty by a removal are pruned at once. The trie walks recurse,
//! so their depth is bounded by the deepest stored topic, i.e. by
//! [`TopicLimits::max_levels`](crate::topic::TopicLimits::max_levels).
//!
//! What the stored value is (the message, or a handle to it) and when a message expires are the
//! caller's business; the index only stores, replaces, removes and finds.

use std::fmt;

use parking_lot::RwLock;

use crate::index::{Map, shrink_map};
use crate::topic::{TopicName, is_wildcard_level, split_level};

/// Retained messages by topic name. `Send + Sync` when `V` is.
pub struct RetainedIndex<V> {
    inner: RwLock<Inner<V>>,
}

struct Inner<V> {
    root: Node<V>,
    len: usize,
}

impl<V: Clone> RetainedIndex<V> {
    /// An empty index.
    pub fn new() -> Self {
        Self {
            inner: RwLock::new(Inner {
                root: Node::default(),
                len: 0,
            }),
        }
    }

    /// Stores `value` as the retained message of `topic`, returning the one it replaces.
    pub fn set(&self, topic: &TopicName, value: V) -> Option<V> {
        let mut inner = self.inner.write();
        let inner = &mut *inner;
        // Look the node up first: creating the path allocates each level's key.
        let node = match inner.root.find_mut(topic) {
            Some(node) => node,
            None => inner.root.create(topic),
        };
        let previous = node
            .retained
            .replace((topic.clone(), value))
            .map(|(_, old)| old);
        if previous.is_none() {
            inner.len += 1;
        }
        previous
    }

    /// Removes the retained message of `topic`, returning it.
    pub fn remove(&self, topic: &str) -> Option<V> {
        let mut inner = self.inner.write();
        let removed = inner.root.remove(topic);
        if removed.is_some() {
            inner.len -= 1;
        }
        removed
    }

    /// The retained message of `topic`, if any.
    pub fn get(&self, topic: &str) -> Option<V> {
        let inner = self.inner.read();
        let (_, value) = inner.root.find(topic)?.retained.as_ref()?;
        Some(value.clone())
    }

    /// The retained messages whose topic matches the (valid) topic filter `filter`, at most
    /// `limit` of them, in no particular order. Topics starting with `$` are not matched by a
    /// filter starting with `+` or `#`. Visits only the part of the trie the filter can reach
    /// and stops as soon as `limit` messages are found.
    pub fn matching(&self, filter: &str, limit: usize) -> Vec<(TopicName, V)> {
        let mut found = Vec::new();
        if limit == 0 {
            return found;
        }
        let inner = self.inner.read();
        Collector {
            found: &mut found,
            limit,
        }
        .matching(&inner.root, Some(filter), true);
        found
    }

    /// Calls `f` with every retained message (for snapshots and admin listings), in no
    /// particular order. Holds the read lock throughout, so `f` must be quick and must not call
    /// back into the index.
    pub fn for_each(&self, mut f: impl FnMut(&TopicName, &V)) {
        self.inner.read().root.for_each(&mut f);
    }
}

impl<V> RetainedIndex<V> {
    /// The number of retained messages.
    pub fn len(&self) -> usize {
        self.inner.read().len
    }

    /// Whether there are no retained messages.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Trie nodes, root excluded.
    #[cfg(test)]
    fn node_count(&self) -> usize {
        self.inner.read().root.count() - 1
    }
}

impl<V: Clone> Default for RetainedIndex<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V> fmt::Debug for RetainedIndex<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RetainedIndex")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

struct Node<V> {
    children: Map<Box<str>, Node<V>>,
    /// The retained message of the topic ending at this node.
    retained: Option<(TopicName, V)>,
}

impl<V> Default for Node<V> {
    fn default() -> Self {
        Self {
            children: Map::default(),
            retained: None,
        }
    }
}

impl<V> Node<V> {
    /// The node of `topic` below this node, if it exists.
    fn find(&self, topic: &str) -> Option<&Self> {
        topic
            .split('/')
            .try_fold(self, |node, level| node.children.get(level))
    }

    /// The node of `topic` below this node, if it exists.
    fn find_mut(&mut self, topic: &str) -> Option<&mut Self> {
        topic
            .split('/')
            .try_fold(self, |node, level| node.children.get_mut(level))
    }

    /// The node of `topic` below this node, creating the path to it.
    fn create(&mut self, topic: &str) -> &mut Self {
        topic.split('/').fold(self, |node, level| {
            node.children.entry(level.into()).or_default()
        })
    }

    /// Removes the message of `topic` below this node, pruning emptied nodes.
    fn remove(&mut self, topic: &str) -> Option<V> {
        let (level, rest) = split_level(topic);
        let child = self.children.get_mut(level)?;
        let removed = match rest {
            Some(rest) => child.remove(rest),
            None => child.retained.take().map(|(_, value)| value),
        };
        if child.retained.is_none() && child.children.is_empty() {
            self.children.remove(level);
            shrink_map(&mut self.children);
        }
        removed
    }

    fn for_each(&self, f: &mut impl FnMut(&TopicName, &V)) {
        if let Some((topic, value)) = &self.retained {
            f(topic, value);
        }
        for child in self.children.values() {
            child.for_each(f);
        }
    }

    /// This node and its descendants.
    #[cfg(test)]
    fn count(&self) -> usize {
        1 + self.children.values().map(Node::count).sum::<usize>()
    }
}

/// The state of one [`RetainedIndex::matching`] walk.
struct Collector<'a, V> {
    found: &'a mut Vec<(TopicName, V)>,
    limit: usize,
}

impl<V: Clone> Collector<'_, V> {
    fn is_full(&self) -> bool {
        self.found.len() >= self.limit
    }

    fn push(&mut self, node: &Node<V>) {
        if let Some((topic, value)) = &node.retained
            && !self.is_full()
        {
            self.found.push((topic.clone(), value.clone()));
        }
    }

    /// Collects the messages at or below `node` that match `filter`, the filter levels not
    /// consumed by the path to `node` (`None` when all are). `at_root` is set while matching the
    /// first level, where a wildcard must not match topics starting with `$`.
    fn matching(&mut self, node: &Node<V>, filter: Option<&str>, at_root: bool) {
        let Some(filter) = filter else {
            return self.push(node);
        };
        let (level, rest) = split_level(filter);
        if !is_wildcard_level(level) {
            if let Some(child) = node.children.get(level) {
                self.matching(child, rest, false);
            }
            return;
        }
        // `#` also matches its parent level, i.e. `node` itself.
        if level == "#" {
            self.push(node);
        }
        for (name, child) in &node.children {
            if self.is_full() {
                return;
            }
            if at_root && name.starts_with('$') {
                continue;
            }
            if level == "#" {
                self.subtree(child);
            } else {
                self.matching(child, rest, false);
            }
        }
    }

    /// Collects every message at or below `node`.
    fn subtree(&mut self, node: &Node<V>) {
        self.push(node);
        for child in node.children.values() {
            if self.is_full() {
                return;
            }
            self.subtree(child);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::{TopicFilter, TopicLimits, matches};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn name(s: &str) -> TopicName {
        TopicName::new(s, &TopicLimits::default()).expect("valid name")
    }

    fn sorted(mut found: Vec<(TopicName, u32)>) -> Vec<(String, u32)> {
        found.sort();
        found.into_iter().map(|(t, v)| (t.to_string(), v)).collect()
    }

    fn index_of(topics: &[&str]) -> RetainedIndex<u32> {
        let index = RetainedIndex::new();
        for (value, topic) in (0..).zip(topics) {
            index.set(&name(topic), value);
        }
        index
    }

    #[test]
    fn index_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<RetainedIndex<bytes::Bytes>>();
    }

    #[test]
    fn set_get_remove_round_trip() {
        let index = RetainedIndex::new();
        assert!(index.is_empty());
        assert_eq!(index.set(&name("a/b"), 1), None);
        assert_eq!(index.set(&name("a/b"), 2), Some(1));
        assert_eq!(index.set(&name("a"), 3), None);
        assert_eq!(index.len(), 2);
        assert_eq!(index.get("a/b"), Some(2));
        assert_eq!(index.get("a"), Some(3));
        assert_eq!(index.get("a/b/c"), None);
        assert_eq!(index.get("a/"), None);
        assert_eq!(index.remove("a/b/c"), None);
        assert_eq!(index.remove("a"), Some(3));
        assert_eq!(index.remove("a"), None);
        assert_eq!(index.get("a/b"), Some(2));
        assert_eq!(index.remove("a/b"), Some(2));
        assert!(index.is_empty());
        assert_eq!(index.node_count(), 0);
    }

    #[test]
    fn removing_a_leaf_prunes_only_emptied_nodes() {
        let index = index_of(&["a/b/c/d", "a/x"]);
        assert_eq!(index.node_count(), 5);
        assert_eq!(index.remove("a/b/c/d"), Some(0));
        assert_eq!(index.node_count(), 2);
        assert_eq!(index.get("a/x"), Some(1));
    }

    #[test]
    fn matching_follows_wildcard_rules() {
        let index = index_of(&[
            "sport",
            "sport/tennis",
            "sport/tennis/player1",
            "sport/tennis/player1/ranking",
            "sport/golf",
            "/finance",
            "a//b",
            "$SYS/uptime",
        ]);
        let m = |filter: &str| -> Vec<String> {
            sorted(index.matching(filter, usize::MAX))
                .into_iter()
                .map(|(t, _)| t)
                .collect()
        };
        assert_eq!(
            m("sport/tennis/player1/#"),
            ["sport/tennis/player1", "sport/tennis/player1/ranking"]
        );
        assert_eq!(m("sport/+"), ["sport/golf", "sport/tennis"]);
        assert_eq!(m("sport/#").len(), 5);
        assert_eq!(m("+/+"), ["/finance", "sport/golf", "sport/tennis"]);
        assert_eq!(m("/finance"), ["/finance"]);
        assert_eq!(m("a/+/b"), ["a//b"]);
        assert_eq!(m("sport/tennis"), ["sport/tennis"]);
        assert!(m("sport/tennis/+/ranking/+").is_empty());
        assert!(m("nothing/#").is_empty());
    }

    #[test]
    fn dollar_topics_not_matched_by_top_level_wildcard() {
        let index = index_of(&["$SYS/uptime", "$SYS", "a/$x"]);
        let m = |filter: &str| -> Vec<String> {
            sorted(index.matching(filter, usize::MAX))
                .into_iter()
                .map(|(t, _)| t)
                .collect()
        };
        assert_eq!(m("#"), ["a/$x"]);
        assert!(m("+/uptime").is_empty());
        assert!(m("+").is_empty());
        assert_eq!(m("$SYS/#"), ["$SYS", "$SYS/uptime"]);
        assert_eq!(m("$SYS/+"), ["$SYS/uptime"]);
        assert_eq!(m("+/+"), ["a/$x"]);
    }

    #[test]
    fn matching_returns_at_most_limit_messages() {
        let topics: Vec<String> = (0..100).map(|i| format!("t/{i}")).collect();
        let index = RetainedIndex::new();
        for (value, topic) in (0..).zip(&topics) {
            index.set(&name(topic), value);
        }
        assert!(index.matching("t/#", 0).is_empty());
        assert_eq!(index.matching("t/#", 7).len(), 7);
        assert_eq!(index.matching("t/+", 100).len(), 100);
        assert_eq!(index.matching("#", 1000).len(), 100);
        for (topic, value) in index.matching("+/+", 10) {
            assert_eq!(index.get(&topic), Some(value));
        }
    }

    #[test]
    fn for_each_visits_every_message_once() {
        let topics = ["a", "a/b", "$SYS/x", "/"];
        let index = index_of(&topics);
        let mut seen = Vec::new();
        index.for_each(|topic, value| seen.push((topic.clone(), *value)));
        let mut want: Vec<_> = (0..).zip(topics).map(|(v, t)| (t.to_owned(), v)).collect();
        want.sort();
        assert_eq!(sorted(seen), want);
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        crate::topic::strategies::filters().prop_filter("filters are valid", |f| {
            TopicFilter::new(f, &TopicLimits::default()).is_ok()
        })
    }

    use crate::topic::strategies::topics as topic_strategy;

    proptest! {
        #[test]
        fn matching_equals_brute_force(
            topics in prop::collection::vec(topic_strategy(), 0..30),
            removals in prop::collection::vec(topic_strategy(), 0..10),
            filters in prop::collection::vec(filter_strategy(), 1..10),
            limit in 0..8usize,
        ) {
            let index = RetainedIndex::new();
            let mut model = BTreeMap::new();
            for (value, topic) in (0..).zip(&topics) {
                prop_assert_eq!(index.set(&name(topic), value), model.insert(topic.clone(), value));
            }
            for topic in &removals {
                prop_assert_eq!(index.remove(topic), model.remove(topic));
            }
            prop_assert_eq!(index.len(), model.len());
            for filter in &filters {
                let want: Vec<_> = model
                    .iter()
                    .filter(|(topic, _)| matches(filter, topic))
                    .map(|(topic, value)| (topic.clone(), *value))
                    .collect();
                prop_assert_eq!(sorted(index.matching(filter, usize::MAX)), want.clone(), "filter {:?}", filter);
                let limited = index.matching(filter, limit);
                prop_assert_eq!(limited.len(), want.len().min(limit));
                for found in sorted(limited) {
                    prop_assert!(want.contains(&found));
                }
            }
            for topic in model.keys() {
                prop_assert!(index.remove(topic).is_some());
            }
            prop_assert!(index.is_empty());
            prop_assert_eq!(index.node_count(), 0);
        }
    }
}
