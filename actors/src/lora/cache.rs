//! A byte-budgeted cache of LoRA adapters, keyed by adapter name, with an LRU or LFU eviction
//! policy. The LoraManager keeps two: a host-memory tier (adapter weights fetched from the store)
//! and a device tier (GPU buffers). The binary's `workload/cache.rs` replays workload traces
//! through the same type with an entry-count budget ([`Cache::with_entries`]).
//!
//! ```text
//! get(name) ─hit─▶ value (recency / frequency updated)      insert(name, value, bytes)
//!           └miss─▶ None (caller fetches, then inserts)        └▶ evict unpinned victims until
//!                                                                 bytes ≤ budget ─▶ evicted names
//! pin(name) … merge running … unpin(name) ─▶ evicted names (a deferred eviction, if over budget)
//! ```
//!
//! - **LRU** evicts the least recently used entry; `get` hits and `insert` count as uses.
//! - **LFU** evicts the least frequently used entry (uses = `get` hits + `insert`s), ties broken by
//!   least recent use. Frequency lives with the entry: an evicted adapter that comes back starts
//!   again at 1 (classic in-cache LFU).
//! - **Pinned** entries (in use by a running merge) are never evicted. When only pinned entries
//!   (and the entry being inserted) are left, the cache stays over its budget until enough of them
//!   are unpinned; [`Cache::unpin`] then evicts down to the budget and returns what it evicted.
//!
//! Eviction walks an ordered index from the best victim on, skipping pinned entries: O(log n) per
//! eviction plus the number of pinned entries skipped.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Which entry to evict when the cache is over budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Least recently used.
    #[default]
    Lru,
    /// Least frequently used (in-cache counts), ties broken by least recently used.
    Lfu,
}

/// A policy name other than `lru` / `lfu`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cache policy {0:?}: expected \"lru\" or \"lfu\"")]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            t if t.eq_ignore_ascii_case("lru") => Ok(Policy::Lru),
            t if t.eq_ignore_ascii_case("lfu") => Ok(Policy::Lfu),
            _ => Err(UnknownPolicy(s.to_string())),
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::Lru => "lru",
            Policy::Lfu => "lfu",
        })
    }
}

/// Counters and occupancy of a cache. With [`Cache::with_entries`], `bytes` and `budget_bytes`
/// are entry counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CacheStats {
    /// `get`s that found the key.
    pub hits: u64,
    /// `get`s that did not.
    pub misses: u64,
    /// `insert`s that cached their value (new keys and replacements; not oversize items).
    pub inserts: u64,
    /// Entries evicted by the policy (not `remove`s, not replacements).
    pub evictions: u64,
    /// Bytes held now (may exceed `budget_bytes` while pinned entries block eviction).
    pub bytes: u64,
    /// Entries held now.
    pub entries: u64,
    /// The budget.
    pub budget_bytes: u64,
}

struct Entry<V> {
    value: V,
    /// What the entry costs against the budget (1 per entry with `with_entries`).
    cost: u64,
    /// Uses while cached (gets that hit + inserts).
    freq: u64,
    /// Tick of the last use; unique per use, so it also identifies the entry in `order`.
    last: u64,
    /// Nesting count of `pin`s.
    pins: u32,
}

/// A byte-budgeted (or entry-budgeted) cache keyed by adapter name. See the module doc.
pub struct Cache<V> {
    policy: Policy,
    budget: u64,
    /// Every entry costs 1, whatever `insert` is told (an entry-count budget).
    unit_cost: bool,
    entries: HashMap<String, Entry<V>>,
    /// Eviction order: the first key is the best victim. Rank = (freq, last) for LFU,
    /// (0, last) for LRU.
    order: BTreeMap<(u64, u64), String>,
    tick: u64,
    bytes: u64,
    hits: u64,
    misses: u64,
    inserts: u64,
    evictions: u64,
}

impl<V: Clone> Cache<V> {
    /// A cache holding at most `budget_bytes` bytes of entries (see the module doc for pinning).
    pub fn new(budget_bytes: u64, policy: Policy) -> Self {
        Self::build(budget_bytes, policy, false)
    }

    /// A cache holding at most `max_entries` entries: every entry costs 1 and the `bytes` passed
    /// to [`insert`](Self::insert) are ignored. For trace simulation.
    pub fn with_entries(max_entries: usize, policy: Policy) -> Self {
        Self::build(max_entries as u64, policy, true)
    }

    fn build(budget: u64, policy: Policy, unit_cost: bool) -> Self {
        Cache {
            policy,
            budget,
            unit_cost,
            entries: HashMap::new(),
            order: BTreeMap::new(),
            tick: 0,
            bytes: 0,
            hits: 0,
            misses: 0,
            inserts: 0,
            evictions: 0,
        }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The value under `key`, counting a hit (and a use of the entry) or a miss.
    pub fn get(&mut self, key: &str) -> Option<V> {
        if self.entries.contains_key(key) {
            self.hits += 1;
            self.touch(key);
            self.entries.get(key).map(|e| e.value.clone())
        } else {
            self.misses += 1;
            None
        }
    }

    /// The value under `key`, without counting anything or updating its use.
    pub fn peek(&self, key: &str) -> Option<&V> {
        self.entries.get(key).map(|e| &e.value)
    }

    /// Whether `key` is cached, without counting anything.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// Caches `value` under `key` at a cost of `bytes` (1 with [`with_entries`](Self::with_entries)),
    /// replacing any value already there (its frequency and pins carry over, and the insert counts
    /// as a use). Evicts unpinned entries, never `key` itself, until the cache is within budget,
    /// and returns the evicted keys; if pinned entries leave nothing to evict, the cache stays over
    /// budget until they are unpinned.
    ///
    /// An item larger than the whole budget is not cached: the call returns `vec![key]` (as if
    /// the item were evicted at once) and drops any older value under `key`, which would
    /// otherwise be stale. It counts neither as an insert nor as an eviction.
    pub fn insert(&mut self, key: String, value: V, bytes: u64) -> Vec<String> {
        let cost = if self.unit_cost { 1 } else { bytes };
        if cost > self.budget {
            self.remove(&key);
            return vec![key];
        }
        self.inserts += 1;
        if let Some(e) = self.entries.get_mut(&key) {
            self.bytes = self.bytes - e.cost + cost;
            e.value = value;
            e.cost = cost;
            self.touch(&key);
        } else {
            self.tick += 1;
            let e = Entry {
                value,
                cost,
                freq: 1,
                last: self.tick,
                pins: 0,
            };
            self.order.insert(self.rank(&e), key.clone());
            self.entries.insert(key.clone(), e);
            self.bytes += cost;
        }
        self.evict_to_budget(Some(&key))
    }

    /// Protects `key` from eviction until a matching [`unpin`](Self::unpin); pins nest. Returns
    /// whether `key` is cached (nothing is pinned otherwise).
    pub fn pin(&mut self, key: &str) -> bool {
        match self.entries.get_mut(key) {
            Some(e) => {
                e.pins += 1;
                true
            }
            None => false,
        }
    }

    /// Undoes one [`pin`](Self::pin). When the last pin goes and the cache is over budget, evicts
    /// down to the budget (possibly `key` itself) and returns the evicted keys.
    pub fn unpin(&mut self, key: &str) -> Vec<String> {
        match self.entries.get_mut(key) {
            Some(e) if e.pins > 0 => {
                e.pins -= 1;
                if e.pins == 0 {
                    return self.evict_to_budget(None);
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }

    /// Whether `key` is cached and pinned.
    pub fn is_pinned(&self, key: &str) -> bool {
        self.entries.get(key).is_some_and(|e| e.pins > 0)
    }

    /// Takes `key` out of the cache, pinned or not (the caller holds the value's users), without
    /// counting an eviction.
    pub fn remove(&mut self, key: &str) -> Option<V> {
        let e = self.entries.remove(key)?;
        self.order.remove(&self.rank(&e));
        self.bytes -= e.cost;
        Some(e.value)
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits,
            misses: self.misses,
            inserts: self.inserts,
            evictions: self.evictions,
            bytes: self.bytes,
            entries: self.entries.len() as u64,
            budget_bytes: self.budget,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes held now (entries with [`with_entries`](Self::with_entries)).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn budget_bytes(&self) -> u64 {
        self.budget
    }

    fn rank(&self, e: &Entry<V>) -> (u64, u64) {
        rank(self.policy, e)
    }

    /// Records a use of `key` (which must be cached): a new tick, one more use.
    fn touch(&mut self, key: &str) {
        self.tick += 1;
        let tick = self.tick;
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        let old = rank(self.policy, e);
        e.freq += 1;
        e.last = tick;
        let new = rank(self.policy, e);
        if let Some(k) = self.order.remove(&old) {
            self.order.insert(new, k);
        }
    }

    /// Evicts the best unpinned victims other than `keep` until within budget or none is left.
    fn evict_to_budget(&mut self, keep: Option<&str>) -> Vec<String> {
        let mut evicted = Vec::new();
        while self.bytes > self.budget {
            let victim = self.order.iter().find_map(|(rank, k)| {
                let evictable = Some(k.as_str()) != keep && self.entries.get(k).is_some_and(|e| e.pins == 0);
                evictable.then_some(*rank)
            });
            let Some(rank) = victim else { break };
            // the index and the entries move together; a mismatch ends the eviction, never a panic
            let Some(key) = self.order.remove(&rank) else {
                break;
            };
            let Some(e) = self.entries.remove(&key) else { break };
            self.bytes -= e.cost;
            self.evictions += 1;
            evicted.push(key);
        }
        evicted
    }
}

/// Position in the eviction order (smallest first).
fn rank<V>(policy: Policy, e: &Entry<V>) -> (u64, u64) {
    match policy {
        Policy::Lru => (0, e.last),
        Policy::Lfu => (e.freq, e.last),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn filled(policy: Policy, keys: &[&str]) -> Cache<u32> {
        let mut c = Cache::with_entries(keys.len(), policy);
        for (i, k) in keys.iter().enumerate() {
            assert!(c.insert(k.to_string(), i as u32, 0).is_empty());
        }
        c
    }

    #[test]
    fn policy_parses_and_prints() {
        assert_eq!("lru".parse::<Policy>().unwrap(), Policy::Lru);
        assert_eq!(" LFU ".parse::<Policy>().unwrap(), Policy::Lfu);
        let err = "fifo".parse::<Policy>().unwrap_err().to_string();
        assert!(
            err.contains("lru") && err.contains("lfu") && err.contains("fifo"),
            "{err}"
        );
        assert_eq!(Policy::default(), Policy::Lru);
        assert_eq!(Policy::Lfu.to_string(), "lfu");
        assert_eq!(serde_json::to_string(&Policy::Lfu).unwrap(), "\"lfu\"");
        assert_eq!(serde_json::from_str::<Policy>("\"lru\"").unwrap(), Policy::Lru);
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut c = filled(Policy::Lru, &["a", "b", "c"]);
        assert_eq!(c.get("a"), Some(0)); // order now b, c, a
        assert_eq!(c.insert("d".into(), 3, 0), vec!["b"]);
        assert_eq!(c.peek("c"), Some(&2)); // peek is not a use
        assert_eq!(c.insert("e".into(), 4, 0), vec!["c"]);
        // Re-inserting counts as a use: a becomes most recent.
        assert!(c.insert("a".into(), 10, 0).is_empty());
        assert_eq!(c.insert("f".into(), 5, 0), vec!["d"]);
        assert_eq!(c.peek("a"), Some(&10));
        let mut keys: Vec<_> = ["a", "e", "f"].into_iter().filter(|k| c.contains(k)).collect();
        keys.sort();
        assert_eq!(keys, ["a", "e", "f"]);
    }

    #[test]
    fn lfu_evicts_least_frequent_ties_by_recency() {
        let mut c = filled(Policy::Lfu, &["a", "b", "c"]);
        c.get("a");
        c.get("a"); // a: 3 uses
        c.get("c"); // c: 2 uses; b: 1 use
        assert_eq!(c.insert("d".into(), 3, 0), vec!["b"]);
        // c: 2, d: 1 → d goes even though it is the most recent.
        assert_eq!(c.insert("e".into(), 4, 0), vec!["d"]);
        c.get("e"); // e: 2 uses, more recent than c (2 uses) → tie goes to c
        assert_eq!(c.insert("f".into(), 5, 0), vec!["c"]);
        // Frequency does not survive eviction: c comes back at 1 use, ties with f (older) → f goes.
        assert_eq!(c.insert("c".into(), 6, 0), vec!["f"]);
        assert!(c.contains("a") && c.contains("e") && c.contains("c"));
    }

    #[test]
    fn byte_budget_with_different_sizes() {
        let mut c = Cache::new(1000 * MIB, Policy::Lru);
        assert!(c.insert("small".into(), 1, 100 * MIB).is_empty());
        assert!(c.insert("mid".into(), 2, 341 * MIB).is_empty());
        assert!(c.insert("big".into(), 3, 456 * MIB).is_empty());
        assert_eq!(c.bytes(), 897 * MIB);
        // 897 + 250 > 1000: evicting the LRU "small" (100) is not enough, "mid" goes too.
        assert_eq!(c.insert("new".into(), 4, 250 * MIB), vec!["small", "mid"]);
        assert_eq!(c.bytes(), 706 * MIB);
        // Replacing an entry with a bigger version re-accounts its bytes.
        assert_eq!(c.insert("new".into(), 5, 600 * MIB), vec!["big"]);
        assert_eq!(c.bytes(), 600 * MIB);
        assert_eq!(c.len(), 1);
        assert_eq!(c.remove("new"), Some(5));
        assert_eq!((c.bytes(), c.is_empty()), (0, true));
        assert!(c.insert("x".into(), 6, 10).is_empty());
    }

    #[test]
    fn oversize_item_is_not_cached() {
        let mut c = Cache::new(100, Policy::Lru);
        assert!(c.insert("a".into(), 1, 60).is_empty());
        assert_eq!(c.insert("huge".into(), 2, 101), vec!["huge"]);
        assert!(!c.contains("huge") && c.contains("a"));
        // A replacement too big to cache drops the stale older value.
        assert_eq!(c.insert("a".into(), 3, 500), vec!["a"]);
        assert!(c.is_empty());
        let s = c.stats();
        assert_eq!((s.inserts, s.evictions, s.bytes), (1, 0, 0));
        // Exactly the budget fits.
        assert!(c.insert("full".into(), 4, 100).is_empty());
        let mut none = Cache::with_entries(0, Policy::Lfu);
        assert_eq!(none.insert("x".into(), 0u8, 0), vec!["x"]);
    }

    #[test]
    fn pinned_entries_are_never_evicted() {
        let mut c = Cache::new(300, Policy::Lru);
        c.insert("a".into(), 1, 100);
        c.insert("b".into(), 2, 100);
        c.insert("c".into(), 3, 100);
        assert!(c.pin("a") && c.pin("a") && !c.pin("missing"));
        // a is the LRU but pinned: b goes instead.
        assert_eq!(c.insert("d".into(), 4, 100), vec!["b"]);
        assert!(c.pin("c") && c.pin("d"));
        // Everything else is pinned: the new entry is kept and the cache runs over budget.
        assert!(c.insert("e".into(), 5, 100).is_empty());
        assert_eq!(c.bytes(), 400);
        // One unpin of a nested pin changes nothing.
        assert!(c.unpin("a").is_empty());
        assert!(c.is_pinned("a"));
        // The last unpin of a lets the deferred eviction run: a is the LRU.
        assert_eq!(c.unpin("a"), vec!["a"]);
        assert_eq!(c.bytes(), 300);
        assert!(c.unpin("c").is_empty() && c.unpin("nope").is_empty());
        // remove ignores pins.
        assert_eq!(c.remove("d"), Some(4));
    }

    #[test]
    fn stats_count_hits_misses_inserts_evictions() {
        let mut c = Cache::new(250, Policy::Lfu);
        assert_eq!(c.get("a"), None);
        c.insert("a".into(), 'a', 100);
        c.insert("b".into(), 'b', 100);
        assert_eq!(c.get("a"), Some('a'));
        assert_eq!(c.get("a"), Some('a'));
        assert_eq!(c.peek("b"), Some(&'b'));
        assert!(c.contains("b") && !c.contains("z"));
        assert_eq!(c.insert("c".into(), 'c', 100), vec!["b"]);
        c.insert("c".into(), 'C', 120); // replacement: an insert, no eviction
        c.remove("a");
        let s = c.stats();
        assert_eq!(
            s,
            CacheStats {
                hits: 2,
                misses: 1,
                inserts: 4,
                evictions: 1,
                bytes: 120,
                entries: 1,
                budget_bytes: 250
            }
        );
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["budget_bytes"], 250);
    }
}
