//! The sharded subscription index: which subscriptions match a published topic.
//!
//! Every PUBLISH, from many connection tasks at once, asks the index for its matches, while
//! SUBSCRIBE and UNSUBSCRIBE change it. To keep those from serializing on one lock, the index is
//! a set of topic tries ("shards"), each behind its own [`RwLock`]:
//!
//! * a filter whose first level is a literal (`sport/#`, `$SYS/+`) lives in the shard chosen by
//!   a hash of that first level;
//! * a filter whose first level is `+` or `#` lives in a dedicated wildcard shard.
//!
//! Matching a topic visits exactly two shards, the one its first level hashes to and the
//! wildcard shard, one after the other (never holding both locks), and skips a shard that holds
//! no subscriptions without touching its lock. A topic starting with `$` skips the wildcard
//! shard entirely, which is how the rule "`$` topics are not matched by a leading wildcard" is
//! honoured.
//!
//! Each trie node has its literal children in a hash map, a `+` child, a `#` leaf, and the
//! subscriptions whose filter ends there: plain ones in a hash map keyed by subscriber, shared
//! ones per group as a member list with a round-robin cursor. Subscribing, unsubscribing and
//! replacing are O(filter levels) whatever the number of subscribers on a node, and matching
//! allocates nothing. Nodes left empty by an unsubscribe are removed at once, so churn does not
//! leak memory.
//!
//! The trie walks recurse, so their depth is bounded by the deepest stored filter, i.e. by
//! [`TopicLimits::max_levels`](crate::topic::TopicLimits::max_levels).

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::RwLock;

use crate::topic::{TopicFilter, is_wildcard_level, split_level};

/// The hash map of the tries: ahash, randomly seeded per map against collision attacks.
pub(crate) type Map<K, V> = HashMap<K, V, ahash::RandomState>;

/// Seeds of the shard-choice hash. They are fixed so that choosing a shard never needs OS
/// randomness; a client steering all its topics into one shard only costs itself parallelism.
const SHARD_SEEDS: [u64; 4] = [
    0x243f_6a88_85a3_08d3,
    0x1319_8a2e_0370_7344,
    0xa409_3822_299f_31d0,
    0x082e_fa98_ec4e_6c89,
];

/// The subscriptions of many subscribers to many topic filters, sharded for concurrent use.
///
/// `K` identifies a subscriber (a session id or client id), `V` is the per-subscription data
/// (the subscription options). The index is `Send + Sync` when `K` and `V` are, and is meant to
/// be shared (e.g. in an `Arc`) by all connection tasks.
pub struct SubscriptionIndex<K, V> {
    shards: Box<[Shard<K, V>]>,
    wildcard: Shard<K, V>,
    shard_hasher: ahash::RandomState,
}

/// One match of a published topic, handed to the callback of
/// [`SubscriptionIndex::for_each_match`].
#[derive(Debug)]
pub enum Match<'a, K, V> {
    /// An ordinary subscription of `key` to `filter`.
    Plain {
        filter: &'a str,
        key: &'a K,
        value: &'a V,
    },
    /// A shared subscription `$share/{group}/{filter}`: the message goes to one of `members`
    /// (never empty). `cursor` is the group's round-robin position, shared by all publishers;
    /// pick with `members[cursor.fetch_add(1, Relaxed) % members.len()]`, or skip ahead past
    /// members that cannot take the message.
    Shared {
        group: &'a str,
        filter: &'a str,
        members: &'a [(K, V)],
        cursor: &'a AtomicUsize,
    },
}

impl<K: Eq + Hash + Clone, V: Clone> SubscriptionIndex<K, V> {
    /// An empty index with `shards` shards for literal first levels (at least 1) plus the
    /// wildcard shard. A few times the number of cores is a good choice.
    pub fn new(shards: usize) -> Self {
        let [k0, k1, k2, k3] = SHARD_SEEDS;
        Self {
            shards: (0..shards.max(1)).map(|_| Shard::default()).collect(),
            wildcard: Shard::default(),
            shard_hasher: ahash::RandomState::with_seeds(k0, k1, k2, k3),
        }
    }

    /// Adds or replaces `key`'s subscription to `filter`, as a member of the shared group
    /// `group` if given. Returns the value it replaced, if any.
    pub fn subscribe(
        &self,
        filter: &TopicFilter,
        group: Option<&str>,
        key: K,
        value: V,
    ) -> Option<V> {
        let shard = self.shard_of_filter(filter);
        let mut root = shard.root.write();
        let root = &mut *root;
        // Look the path up first: creating it allocates each level's key.
        let slot = match root.existing_slot_mut(filter.as_str()) {
            Some(slot) => slot,
            None => root.slot_mut(filter.as_str()),
        };
        let entry = slot.get_or_insert_with(|| Box::new(Entry::new(filter.clone())));
        let previous = match group {
            None => entry.plain.insert(key, value),
            Some(group) => match entry.shared.get_mut(group) {
                Some(members) => members.insert(key, value),
                None => {
                    let mut members = SharedGroup::default();
                    members.insert(key, value);
                    entry.shared.insert(group.into(), members);
                    None
                }
            },
        };
        if previous.is_none() {
            shard.len.fetch_add(1, Ordering::Relaxed);
        }
        previous
    }

    /// Removes `key`'s subscription to `filter` (in the shared group `group` if given),
    /// returning its value, or `None` if there was no such subscription.
    pub fn unsubscribe(&self, filter: &TopicFilter, group: Option<&str>, key: &K) -> Option<V> {
        let shard = self.shard_of_filter(filter);
        let mut root = shard.root.write();
        let removed = root.remove(Some(filter.as_str()), group, key);
        if removed.is_some() {
            shard.len.fetch_sub(1, Ordering::Relaxed);
        }
        removed
    }

    /// Calls `f` once per plain subscription whose filter matches `topic` and once per shared
    /// group (per filter) that does. A subscriber with several matching filters is reported once
    /// per filter; deduplicating is the caller's choice.
    ///
    /// Runs under the shard read locks, so `f` must be quick (copy what it needs) and must not
    /// call back into the index. Allocates nothing.
    pub fn for_each_match(&self, topic: &str, mut f: impl FnMut(Match<'_, K, V>)) {
        let (first, _) = split_level(topic);
        self.literal_shard(first).for_each_match(topic, &mut f);
        if !topic.starts_with('$') {
            self.wildcard.for_each_match(topic, &mut f);
        }
    }

    fn shard_of_filter(&self, filter: &TopicFilter) -> &Shard<K, V> {
        let (first, _) = split_level(filter.as_str());
        if is_wildcard_level(first) {
            &self.wildcard
        } else {
            self.literal_shard(first)
        }
    }

    fn literal_shard(&self, first_level: &str) -> &Shard<K, V> {
        let n = self.shards.len();
        let i = if n == 1 {
            0
        } else {
            // The remainder is below `n`, so it fits a usize.
            (self.shard_hasher.hash_one(first_level) % n as u64) as usize
        };
        &self.shards[i]
    }

    /// Trie nodes and entries (subscription sets) in all shards, roots excluded.
    #[cfg(test)]
    fn node_count(&self) -> usize {
        self.all_shards()
            .map(|shard| shard.root.read().count() - 1)
            .sum()
    }
}

impl<K, V> SubscriptionIndex<K, V> {
    /// The number of (filter, group, key) subscriptions.
    pub fn len(&self) -> usize {
        self.all_shards()
            .map(|shard| shard.len.load(Ordering::Relaxed))
            .sum()
    }

    /// Whether there are no subscriptions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn all_shards(&self) -> impl Iterator<Item = &Shard<K, V>> {
        self.shards.iter().chain(std::iter::once(&self.wildcard))
    }
}

impl<K, V> fmt::Debug for SubscriptionIndex<K, V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubscriptionIndex")
            .field("shards", &self.shards.len())
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

struct Shard<K, V> {
    root: RwLock<Node<K, V>>,
    /// Subscriptions in this shard; written under the write lock, read without any lock.
    len: AtomicUsize,
}

impl<K, V> Default for Shard<K, V> {
    fn default() -> Self {
        Self {
            root: RwLock::new(Node::default()),
            len: AtomicUsize::new(0),
        }
    }
}

impl<K: Eq + Hash, V> Shard<K, V> {
    fn for_each_match<F>(&self, topic: &str, f: &mut F)
    where
        F: FnMut(Match<'_, K, V>),
    {
        if self.len.load(Ordering::Relaxed) == 0 {
            return;
        }
        let root = self.root.read();
        root.for_each_match(Some(topic), f);
    }
}

struct Node<K, V> {
    /// Children for literal levels.
    children: Map<Box<str>, Node<K, V>>,
    /// The child for a `+` level.
    plus: Option<Box<Node<K, V>>>,
    /// Subscriptions to this node's filter followed by `/#`.
    hash: Option<Box<Entry<K, V>>>,
    /// Subscriptions whose filter ends at this node.
    entry: Option<Box<Entry<K, V>>>,
}

impl<K, V> Default for Node<K, V> {
    fn default() -> Self {
        Self {
            children: Map::default(),
            plus: None,
            hash: None,
            entry: None,
        }
    }
}

impl<K: Eq + Hash, V> Node<K, V> {
    /// The entry slot for `filter` below this node, if the nodes on the way exist.
    fn existing_slot_mut(&mut self, filter: &str) -> Option<&mut Option<Box<Entry<K, V>>>> {
        let mut node = self;
        for level in filter.split('/') {
            node = match level {
                "#" => return Some(&mut node.hash),
                "+" => node.plus.as_deref_mut()?,
                _ => node.children.get_mut(level)?,
            };
        }
        Some(&mut node.entry)
    }

    /// The entry slot for `filter` below this node, creating the nodes on the way.
    fn slot_mut(&mut self, filter: &str) -> &mut Option<Box<Entry<K, V>>> {
        let mut node = self;
        for level in filter.split('/') {
            node = match level {
                // A valid filter has `#` only as its last level.
                "#" => return &mut node.hash,
                "+" => node.plus.get_or_insert_with(Box::default),
                _ => node.children.entry(level.into()).or_default(),
            };
        }
        &mut node.entry
    }

    /// Removes a subscription to the filter `rest` below this node, pruning emptied nodes.
    fn remove(&mut self, rest: Option<&str>, group: Option<&str>, key: &K) -> Option<V> {
        let Some(rest) = rest else {
            return Entry::remove_from(&mut self.entry, group, key);
        };
        let (level, rest) = split_level(rest);
        match level {
            "#" => Entry::remove_from(&mut self.hash, group, key),
            "+" => {
                let child = self.plus.as_deref_mut()?;
                let removed = child.remove(rest, group, key);
                if child.is_empty() {
                    self.plus = None;
                }
                removed
            }
            _ => {
                let child = self.children.get_mut(level)?;
                let removed = child.remove(rest, group, key);
                if child.is_empty() {
                    self.children.remove(level);
                    shrink_map(&mut self.children);
                }
                removed
            }
        }
    }

    /// Reports the subscriptions at or below this node that match `topic`, the part of the
    /// topic not consumed by the path to this node (`None` when it is all consumed).
    fn for_each_match<'a, F>(&'a self, topic: Option<&str>, f: &mut F)
    where
        F: FnMut(Match<'a, K, V>),
    {
        if let Some(entry) = &self.hash {
            entry.report(f);
        }
        let Some(topic) = topic else {
            if let Some(entry) = &self.entry {
                entry.report(f);
            }
            return;
        };
        let (level, rest) = split_level(topic);
        if let Some(child) = self.children.get(level) {
            child.for_each_match(rest, f);
        }
        if let Some(child) = &self.plus {
            child.for_each_match(rest, f);
        }
    }

    fn is_empty(&self) -> bool {
        self.entry.is_none()
            && self.hash.is_none()
            && self.plus.is_none()
            && self.children.is_empty()
    }

    /// This node, its descendants and their entries.
    #[cfg(test)]
    fn count(&self) -> usize {
        1 + usize::from(self.entry.is_some())
            + usize::from(self.hash.is_some())
            + self.plus.as_ref().map_or(0, |child| child.count())
            + self.children.values().map(Node::count).sum::<usize>()
    }
}

/// The subscriptions to one filter.
struct Entry<K, V> {
    filter: TopicFilter,
    plain: Map<K, V>,
    shared: Map<Box<str>, SharedGroup<K, V>>,
}

impl<K: Eq + Hash, V> Entry<K, V> {
    fn new(filter: TopicFilter) -> Self {
        Self {
            filter,
            plain: Map::default(),
            shared: Map::default(),
        }
    }

    /// Removes a subscription from the entry in `slot`, emptying the slot if it was the last.
    fn remove_from(slot: &mut Option<Box<Self>>, group: Option<&str>, key: &K) -> Option<V> {
        let entry = slot.as_deref_mut()?;
        let removed = match group {
            None => {
                let removed = entry.plain.remove(key);
                shrink_map(&mut entry.plain);
                removed
            }
            Some(group) => {
                let members = entry.shared.get_mut(group)?;
                let removed = members.remove(key);
                if members.members.is_empty() {
                    entry.shared.remove(group);
                }
                removed
            }
        };
        if entry.plain.is_empty() && entry.shared.is_empty() {
            *slot = None;
        }
        removed
    }

    fn report<'a, F>(&'a self, f: &mut F)
    where
        F: FnMut(Match<'a, K, V>),
    {
        let filter = self.filter.as_str();
        for (key, value) in &self.plain {
            f(Match::Plain { filter, key, value });
        }
        for (group, members) in &self.shared {
            f(Match::Shared {
                group,
                filter,
                members: &members.members,
                cursor: &members.cursor,
            });
        }
    }
}

/// The members of one shared group on one filter.
struct SharedGroup<K, V> {
    members: Vec<(K, V)>,
    /// Index of each member's key in `members`, so joining and leaving are O(1).
    positions: Map<K, usize>,
    cursor: AtomicUsize,
}

impl<K, V> Default for SharedGroup<K, V> {
    fn default() -> Self {
        Self {
            members: Vec::new(),
            positions: Map::default(),
            cursor: AtomicUsize::new(0),
        }
    }
}

impl<K: Eq + Hash + Clone, V> SharedGroup<K, V> {
    fn insert(&mut self, key: K, value: V) -> Option<V> {
        if let Some(&i) = self.positions.get(&key)
            && let Some((_, old)) = self.members.get_mut(i)
        {
            return Some(std::mem::replace(old, value));
        }
        self.positions.insert(key.clone(), self.members.len());
        self.members.push((key, value));
        None
    }
}

impl<K: Eq + Hash, V> SharedGroup<K, V> {
    fn remove(&mut self, key: &K) -> Option<V> {
        let i = self.positions.remove(key)?;
        let (_, value) = self.members.swap_remove(i);
        if let Some((moved, _)) = self.members.get(i)
            && let Some(position) = self.positions.get_mut(moved)
        {
            *position = i;
        }
        shrink_map(&mut self.positions);
        if mostly_empty(self.members.len(), self.members.capacity()) {
            self.members.shrink_to(self.members.len() * 2);
        }
        Some(value)
    }
}

/// Whether a collection of `len` items with room for `capacity` should give memory back.
/// Shrinking to twice the length only then keeps removals amortized O(1).
fn mostly_empty(len: usize, capacity: usize) -> bool {
    capacity > 64 && len < capacity / 4
}

/// Gives back most of a map's memory once it is mostly empty.
pub(crate) fn shrink_map<K: Eq + Hash, V>(map: &mut Map<K, V>) {
    if mostly_empty(map.len(), map.capacity()) {
        map.shrink_to(map.len() * 2);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::{TopicLimits, matches};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;

    fn filter(s: &str) -> TopicFilter {
        TopicFilter::new(s, &TopicLimits::default()).expect("valid filter")
    }

    /// Every match as `(filter, group, key, value)`, shared groups expanded, sorted.
    fn matches_of<K: Eq + Hash + Clone + Ord, V: Clone + Ord>(
        index: &SubscriptionIndex<K, V>,
        topic: &str,
    ) -> Vec<(String, Option<String>, K, V)> {
        let mut out = Vec::new();
        index.for_each_match(topic, |m| match m {
            Match::Plain { filter, key, value } => {
                out.push((filter.to_owned(), None, key.clone(), value.clone()))
            }
            Match::Shared {
                group,
                filter,
                members,
                ..
            } => {
                assert!(!members.is_empty());
                for (key, value) in members {
                    out.push((
                        filter.to_owned(),
                        Some(group.to_owned()),
                        key.clone(),
                        value.clone(),
                    ));
                }
            }
        });
        out.sort();
        out
    }

    #[test]
    fn index_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<SubscriptionIndex<u64, u8>>();
        assert_send_sync::<SubscriptionIndex<Arc<str>, Arc<str>>>();
    }

    #[test]
    fn plain_subscriptions_match_per_spec() {
        let index = SubscriptionIndex::new(4);
        for (i, f) in [
            "sport/tennis/player1/#",
            "sport/+",
            "+/+",
            "/finance",
            "#",
            "$SYS/#",
            "+/monitor/Clients",
        ]
        .into_iter()
        .enumerate()
        {
            assert_eq!(index.subscribe(&filter(f), None, i, ()), None);
        }
        let filters = |topic: &str| -> Vec<String> {
            matches_of(&index, topic).into_iter().map(|m| m.0).collect()
        };
        assert_eq!(
            filters("sport/tennis/player1"),
            ["#", "sport/tennis/player1/#"]
        );
        assert_eq!(filters("sport"), ["#"]);
        assert_eq!(filters("sport/"), ["#", "+/+", "sport/+"]);
        assert_eq!(filters("/finance"), ["#", "+/+", "/finance"]);
        assert_eq!(filters("$SYS/monitor/Clients"), ["$SYS/#"]);
        assert_eq!(filters("a/monitor/Clients"), ["#", "+/monitor/Clients"]);
    }

    #[test]
    fn dollar_topics_not_matched_by_top_level_wildcard() {
        let index = SubscriptionIndex::new(2);
        index.subscribe(&filter("#"), None, 1, ());
        index.subscribe(&filter("+/x"), None, 2, ());
        index.subscribe(&filter("$SYS/+"), None, 3, ());
        assert_eq!(
            matches_of(&index, "$SYS/x"),
            [("$SYS/+".to_owned(), None, 3, ())]
        );
        assert_eq!(matches_of(&index, "a/x").len(), 2);
    }

    #[test]
    fn subscribing_twice_replaces_and_returns_previous_value() {
        let index = SubscriptionIndex::new(1);
        let f = filter("a/b");
        assert_eq!(index.subscribe(&f, None, "c1", 0), None);
        assert_eq!(index.subscribe(&f, None, "c1", 1), Some(0));
        assert_eq!(index.subscribe(&f, Some("g"), "c1", 2), None);
        assert_eq!(index.subscribe(&f, Some("g"), "c1", 3), Some(2));
        assert_eq!(index.len(), 2);
        assert_eq!(
            matches_of(&index, "a/b"),
            [
                ("a/b".to_owned(), None, "c1", 1),
                ("a/b".to_owned(), Some("g".to_owned()), "c1", 3)
            ]
        );
        assert_eq!(index.unsubscribe(&f, None, &"c1"), Some(1));
        assert_eq!(index.unsubscribe(&f, None, &"c1"), None);
        assert_eq!(index.unsubscribe(&f, Some("h"), &"c1"), None);
        assert_eq!(index.unsubscribe(&filter("a/c"), None, &"c1"), None);
        assert_eq!(index.unsubscribe(&f, Some("g"), &"c1"), Some(3));
        assert!(index.is_empty());
        assert_eq!(index.node_count(), 0);
    }

    #[test]
    fn shared_group_lists_members_and_shares_one_cursor() {
        let index = SubscriptionIndex::new(3);
        let f = filter("jobs/+");
        for key in 0..3 {
            index.subscribe(&f, Some("workers"), key, ());
        }
        index.subscribe(&f, Some("auditors"), 9, ());
        index.subscribe(&filter("jobs/#"), Some("workers"), 7, ());

        let mut picked = Vec::new();
        for _ in 0..6 {
            index.for_each_match("jobs/1", |m| {
                if let Match::Shared {
                    group: "workers",
                    filter: "jobs/+",
                    members,
                    cursor,
                } = m
                {
                    let mut keys: Vec<_> = members.iter().map(|(k, ())| *k).collect();
                    keys.sort_unstable();
                    assert_eq!(keys, [0, 1, 2]);
                    picked.push(members[cursor.fetch_add(1, Ordering::Relaxed) % members.len()].0);
                }
            });
        }
        picked.sort_unstable();
        assert_eq!(picked, [0, 0, 1, 1, 2, 2]);

        let mut groups = Vec::new();
        index.for_each_match("jobs/1", |m| {
            if let Match::Shared { group, filter, .. } = m {
                groups.push((group.to_owned(), filter.to_owned()));
            }
        });
        groups.sort();
        assert_eq!(
            groups,
            [
                ("auditors".to_owned(), "jobs/+".to_owned()),
                ("workers".to_owned(), "jobs/#".to_owned()),
                ("workers".to_owned(), "jobs/+".to_owned())
            ]
        );
    }

    #[test]
    fn unsubscribing_last_member_removes_the_group() {
        let index = SubscriptionIndex::new(1);
        let f = filter("a");
        index.subscribe(&f, Some("g"), 1, 'x');
        index.subscribe(&f, Some("g"), 2, 'y');
        index.subscribe(&f, Some("g"), 3, 'z');
        assert_eq!(index.unsubscribe(&f, Some("g"), &1), Some('x'));
        // The member moved into the hole is still found by key.
        assert_eq!(index.subscribe(&f, Some("g"), 3, 'w'), Some('z'));
        assert_eq!(index.unsubscribe(&f, Some("g"), &3), Some('w'));
        assert_eq!(
            matches_of(&index, "a"),
            [("a".to_owned(), Some("g".to_owned()), 2, 'y')]
        );
        assert_eq!(index.unsubscribe(&f, Some("g"), &2), Some('y'));
        let mut calls = 0;
        index.for_each_match("a", |_| calls += 1);
        assert_eq!(calls, 0);
        assert_eq!(index.node_count(), 0);
    }

    #[test]
    fn many_subscribers_on_one_node_churn_without_leftovers() {
        let index = SubscriptionIndex::new(2);
        let f = filter("hot/topic");
        for key in 0..10_000u32 {
            index.subscribe(&f, None, key, key);
            index.subscribe(&f, Some("g"), key, key);
        }
        assert_eq!(index.len(), 20_000);
        let mut count = 0;
        index.for_each_match("hot/topic", |m| match m {
            Match::Plain { .. } => count += 1,
            Match::Shared { members, .. } => count += members.len(),
        });
        assert_eq!(count, 20_000);
        for key in 0..10_000u32 {
            assert_eq!(index.unsubscribe(&f, None, &key), Some(key));
            assert_eq!(index.unsubscribe(&f, Some("g"), &key), Some(key));
        }
        assert!(index.is_empty());
        assert_eq!(index.node_count(), 0);
    }

    #[test]
    fn concurrent_subscribe_unsubscribe_and_match_stay_consistent() {
        const THREADS: u64 = 4;
        const ROUNDS: u64 = 500;
        let index = SubscriptionIndex::<u64, u64>::new(4);
        let filters = ["a/b", "a/+", "+/b", "#", "a/#", "c/d/e", "$SYS/#"].map(filter);
        std::thread::scope(|scope| {
            for t in 0..THREADS {
                let index = &index;
                let filters = &filters;
                scope.spawn(move || {
                    for round in 0..ROUNDS {
                        let f = &filters[(round as usize + t as usize) % filters.len()];
                        let group = (round % 3 == 0).then_some("g");
                        index.subscribe(f, group, t, round);
                        let mut seen = 0;
                        index.for_each_match("a/b", |_| seen += 1);
                        index.for_each_match("$SYS/x", |_| seen += 1);
                        assert!(seen > 0 || f.as_str() == "c/d/e");
                        // Keep the subscriptions of rounds ≡ 1 (mod 3), drop the rest.
                        if round % 3 != 1 {
                            assert_eq!(index.unsubscribe(f, group, &t), Some(round));
                        }
                    }
                });
            }
        });
        // Replay each thread's plain subscriptions (group ones never survive their round): a
        // round ≡ 1 (mod 3) keeps its subscription, a round ≡ 2 replaces then drops it.
        let mut expected = BTreeMap::new();
        for t in 0..THREADS {
            for round in (0..ROUNDS).filter(|r| r % 3 != 0) {
                let f = &filters[(round as usize + t as usize) % filters.len()];
                let key = (f.as_str().to_owned(), t);
                if round % 3 == 1 {
                    expected.insert(key, round);
                } else {
                    expected.remove(&key);
                }
            }
        }
        assert_eq!(index.len(), expected.len());
        for topic in ["a/b", "x/b", "c/d/e", "$SYS/x", "zzz"] {
            let want: Vec<_> = expected
                .iter()
                .filter(|((f, _), _)| matches(f, topic))
                .map(|((f, t), round)| (f.clone(), None, *t, *round))
                .collect();
            assert_eq!(matches_of(&index, topic), want, "{topic}");
        }
        for (f, t) in expected.keys() {
            assert!(index.unsubscribe(&filter(f), None, t).is_some());
        }
        assert!(index.is_empty());
        assert_eq!(index.node_count(), 0);
    }

    fn filter_strategy() -> impl Strategy<Value = String> {
        crate::topic::strategies::filters().prop_filter("filters are non-empty", |f| !f.is_empty())
    }

    use crate::topic::strategies::topics as topic_strategy;

    fn subscription_strategy() -> impl Strategy<Value = (String, Option<&'static str>, u8)> {
        (
            filter_strategy(),
            prop::option::weighted(0.3, prop::sample::select(&["g1", "g2"][..])),
            0..4u8,
        )
    }

    proptest! {
        #[test]
        fn index_matches_equal_brute_force(
            shards in 1..8usize,
            subs in prop::collection::vec(subscription_strategy(), 0..40),
            removals in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
            topics in prop::collection::vec(topic_strategy(), 1..10),
        ) {
            let index = SubscriptionIndex::new(shards);
            let mut model = BTreeMap::new();
            for (value, (f, group, key)) in subs.iter().enumerate() {
                let previous = index.subscribe(&filter(f), *group, *key, value);
                prop_assert_eq!(previous, model.insert((f.clone(), *group, *key), value));
            }
            for removal in &removals {
                if model.is_empty() {
                    break;
                }
                let (f, group, key) = model.keys().nth(removal.index(model.len())).cloned().expect("in range");
                let removed = index.unsubscribe(&filter(&f), group, &key);
                prop_assert_eq!(removed, model.remove(&(f, group, key)));
            }
            prop_assert_eq!(index.len(), model.len());
            for topic in &topics {
                let mut want: Vec<_> = model
                    .iter()
                    .filter(|((f, _, _), _)| matches(f, topic))
                    .map(|((f, g, k), v)| (f.clone(), g.map(str::to_owned), *k, *v))
                    .collect();
                want.sort();
                prop_assert_eq!(matches_of(&index, topic), want, "topic {:?}", topic);
            }
            for (f, group, key) in model.keys() {
                prop_assert!(index.unsubscribe(&filter(f), *group, key).is_some());
            }
            prop_assert_eq!(index.len(), 0);
            prop_assert_eq!(index.node_count(), 0);
        }
    }
}
