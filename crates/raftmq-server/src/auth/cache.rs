//! A bounded cache of recent authentication decisions, so a reconnect storm does not run the
//! password hash (or the HTTP callout) once per connection.
//!
//! Entries are keyed by a keyed BLAKE2b-256 MAC of what was checked (user name, password,
//! client id), with a random key drawn at start: the cache never holds a password, and its keys
//! are useless outside this process.

use argon2::password_hash::rand_core::{OsRng, RngCore};
use blake2::Blake2bMac;
use blake2::digest::consts::U32;
use blake2::digest::{KeyInit, Mac};
use parking_lot::Mutex;
use raftmq_core::acl::Acl;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

type Key = [u8; 32];

/// A remembered decision: accepted or not, and the rules that came with an acceptance.
pub type Decision = (bool, Option<Arc<Acl>>);

/// Decision cache with a size bound and a time to live.
pub struct DecisionCache {
    secret: [u8; 32],
    capacity: usize,
    ttl: Duration,
    entries: Mutex<HashMap<Key, (Decision, Instant)>>,
}

impl DecisionCache {
    /// A cache of at most `capacity` decisions, each valid for `ttl` (0 disables caching).
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        let mut secret = [0u8; 32];
        OsRng.fill_bytes(&mut secret);
        DecisionCache {
            secret,
            capacity,
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// The cache key for `parts` checked by `kind` (`"password"`, `"callout"`).
    pub fn key(&self, kind: &str, parts: &[&[u8]]) -> Key {
        let mut mac = match <Blake2bMac<U32> as KeyInit>::new_from_slice(&self.secret) {
            Ok(m) => m,
            // A 32-byte key is always valid for BLAKE2b; fall back to an unkeyed-looking but
            // still process-unique domain if it ever were not.
            Err(_) => <Blake2bMac<U32> as KeyInit>::new(&Default::default()),
        };
        mac.update(kind.as_bytes());
        for part in parts {
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac.finalize().into_bytes().into()
    }

    /// The cached decision for `key`, if still fresh at `now`.
    pub fn get(&self, key: &Key, now: Instant) -> Option<Decision> {
        let mut entries = self.entries.lock();
        match entries.get(key) {
            Some((decision, at)) if now.saturating_duration_since(*at) < self.ttl => {
                Some(decision.clone())
            }
            Some(_) => {
                entries.remove(key);
                None
            }
            None => None,
        }
    }

    /// Remembers a decision taken at `now`.
    pub fn insert(&self, key: Key, decision: Decision, now: Instant) {
        if self.capacity == 0 || self.ttl.is_zero() {
            return;
        }
        let mut entries = self.entries.lock();
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            let ttl = self.ttl;
            entries.retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl);
            // Still full: forget the oldest decision.
            if entries.len() >= self.capacity
                && let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| *k)
            {
                entries.remove(&oldest);
            }
        }
        entries.insert(key, (decision, now));
    }

    /// Forgets everything (after the password file changed).
    pub fn clear(&self) {
        self.entries.lock().clear();
    }

    /// Number of cached decisions.
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_depend_on_every_part_and_the_kind() {
        let c = DecisionCache::new(10, Duration::from_secs(60));
        let k = c.key("password", &[b"alice", b"pw"]);
        assert_eq!(k, c.key("password", &[b"alice", b"pw"]));
        assert_ne!(k, c.key("password", &[b"alice", b"pX"]));
        assert_ne!(k, c.key("callout", &[b"alice", b"pw"]));
        // Length prefixes: ("ab","c") differs from ("a","bc").
        assert_ne!(
            c.key("password", &[b"ab", b"c"]),
            c.key("password", &[b"a", b"bc"])
        );
        // Another process (another secret) derives other keys.
        let other = DecisionCache::new(10, Duration::from_secs(60));
        assert_ne!(k, other.key("password", &[b"alice", b"pw"]));
    }

    #[test]
    fn entries_expire_and_the_size_is_bounded() {
        let t0 = Instant::now();
        let c = DecisionCache::new(3, Duration::from_secs(10));
        for i in 0u8..10 {
            c.insert(
                c.key("k", &[&[i]]),
                (true, None),
                t0 + Duration::from_millis(u64::from(i)),
            );
        }
        assert_eq!(c.len(), 3);
        // The newest survive.
        let last = c.key("k", &[&[9]]);
        assert_eq!(
            c.get(&last, t0 + Duration::from_secs(1)),
            Some((true, None))
        );
        assert_eq!(c.get(&c.key("k", &[&[0]]), t0), None);
        assert_eq!(c.get(&last, t0 + Duration::from_secs(11)), None);
        c.clear();
        assert_eq!(c.len(), 0);
    }
}
