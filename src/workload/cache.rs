//! Replaying requests through katz's own LoRA cache ([`Cache`], LRU or LFU, an entry budget):
//! drawn requests through one cache ([`replay`]), or a trace through one cache per serving
//! instance, for its LoRAs or its ControlNets ([`cache`]).
//!
//! ```text
//! drawn requests (LoRA ids) ─▶ replay(requests, entries, policy) ─▶ SimResult (loads/request,
//!                                  one Cache::with_entries            hit rate, popularity facts)
//! trace ─▶ cache(trace, adapter, entries, policy) ─▶ CacheResult (loads/request, hit rate)
//!            a Cache per instance (ip), replayed in timestamp order
//! each request: serve(cache, its adapters): looked up in order, a miss loaded, all pinned
//! ```

use std::collections::HashMap;

use katz_actors::lora::cache::{Cache, Policy};
use serde::Serialize;

use super::draw::popularity;
use super::trace::TraceRequest;

/// The outcome of replaying requests through a cache.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimResult {
    pub policy: Policy,
    pub entries: usize,
    pub requests: usize,
    /// LoRA lookups (calls).
    pub lookups: u64,
    /// Misses, each followed by a load into the cache.
    pub loads: u64,
    pub loads_per_request: f64,
    /// Hits / lookups.
    pub hit_rate: f64,
    /// See [`Popularity`](super::draw::Popularity).
    pub max_share_of_one_lora: f64,
    pub share_of_loras_under_1pct: f64,
    pub loras_over_1pct: usize,
    pub distinct_loras_seen: usize,
}

/// Replays `requests` through an `entries`-entry cache of `policy`, starting cold. A request's
/// LoRAs are looked up in order; a miss is a load (an insert). A request's LoRAs are pinned while
/// it is served and unpinned after, so none of them is evicted by a later one of the same request.
pub fn replay(requests: &[Vec<u32>], entries: usize, policy: Policy) -> SimResult {
    let mut cache: Cache<()> = Cache::with_entries(entries, policy);
    for request in requests {
        let keys: Vec<String> = request.iter().map(u32::to_string).collect();
        serve(&mut cache, keys.iter().map(String::as_str));
    }
    let stats = cache.stats();
    let lookups = stats.hits + stats.misses;
    let pop = popularity(requests);
    SimResult {
        policy,
        entries,
        requests: requests.len(),
        lookups,
        loads: stats.misses,
        loads_per_request: ratio(stats.misses, requests.len() as u64),
        hit_rate: ratio(stats.hits, lookups),
        max_share_of_one_lora: pop.max_share_of_one_lora,
        share_of_loras_under_1pct: pop.share_of_loras_under_1pct,
        loras_over_1pct: pop.loras_over_1pct,
        distinct_loras_seen: pop.distinct_loras_seen,
    }
}

/// Serves one request's adapters from `cache`: each looked up in order, a miss loaded (inserted);
/// all of them pinned while the request is served, so none evicts another of the same request.
/// Hits and misses (loads) land in the cache's [`Cache::stats`].
pub fn serve<'a>(cache: &mut Cache<()>, keys: impl IntoIterator<Item = &'a str>) {
    let mut pinned: Vec<&str> = Vec::new();
    for key in keys {
        if cache.get(key).is_none() {
            cache.insert(key.to_string(), (), 1);
        }
        if cache.pin(key) {
            pinned.push(key);
        }
    }
    for key in pinned {
        cache.unpin(key);
    }
}

/// a / b, or 0 when b is 0.
pub fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Which adapters a cache holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Adapter {
    Lora,
    ControlNet,
}

/// Loads per request of a cache of `entries` adapters per instance (each `ip` its own cache, as
/// each serving node has its own memory), replayed in timestamp order.
#[derive(Debug, Clone, Serialize)]
pub struct CacheResult {
    pub adapter: Adapter,
    pub policy: Policy,
    pub entries: usize,
    pub requests: usize,
    pub lookups: u64,
    pub loads: u64,
    pub loads_per_request: f64,
    pub hit_rate: f64,
}

/// Replays a trace through a cache of `entries` `adapter`s per instance (see [`CacheResult`]).
pub fn cache(reqs: &[TraceRequest], adapter: Adapter, entries: usize, policy: Policy) -> CacheResult {
    let mut caches: HashMap<&str, Cache<()>> = HashMap::new();
    for r in reqs {
        let c = caches
            .entry(r.ip.as_str())
            .or_insert_with(|| Cache::with_entries(entries, policy));
        let ids = match adapter {
            Adapter::Lora => &r.loras,
            Adapter::ControlNet => &r.controlnets,
        };
        serve(c, ids.iter().map(String::as_str));
    }
    let (hits, loads) = caches
        .values()
        .map(Cache::stats)
        .fold((0, 0), |(h, m), s| (h + s.hits, m + s.misses));
    let lookups = hits + loads;
    CacheResult {
        adapter,
        policy,
        entries,
        requests: reqs.len(),
        lookups,
        loads,
        loads_per_request: ratio(loads, reqs.len() as u64),
        hit_rate: ratio(hits, lookups),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::draw::{draw, WorkloadSpec};
    use crate::workload::generate::generate;
    use crate::workload::published::TraceStats;
    use crate::workload::testutil::{stats_file, trace_spec as spec};

    /// Entries = 2. LoRA 1 is called often, then a stream of one-offs, then a two-LoRA request.
    fn hand_made() -> Vec<Vec<u32>> {
        vec![
            vec![1],
            vec![1],
            vec![1],
            vec![2],
            vec![3],
            vec![4],
            vec![1],
            vec![5, 6],
            vec![1],
        ]
    }

    #[test]
    fn replay_hand_made_lru() {
        // 1 miss, hit, hit; 2 miss {1,2}; 3 miss −1 {2,3}; 4 miss −2 {3,4}; 1 miss −3 {4,1};
        // [5,6]: 5 miss −4 {1,5}, 6 miss −1 (5 pinned) {5,6}; 1 miss −5 {6,1}.
        let r = replay(&hand_made(), 2, Policy::Lru);
        assert_eq!((r.requests, r.lookups, r.loads), (9, 10, 8));
        assert!((r.loads_per_request - 8.0 / 9.0).abs() < 1e-12);
        assert!((r.hit_rate - 0.2).abs() < 1e-12);
        assert_eq!((r.max_share_of_one_lora, r.distinct_loras_seen), (0.5, 6));
    }

    #[test]
    fn replay_hand_made_lfu() {
        // 1 miss, hit, hit (f=3); 2 miss {1:3,2:1}; 3 miss −2; 4 miss −3; 1 hit (f=4);
        // [5,6]: 5 miss −4 {1:4,5:1}; 6 miss: 5 pinned, so 1 goes despite f=4 {5,6};
        // 1 miss: 5 and 6 tie at f=1, 5 is older −5.
        let r = replay(&hand_made(), 2, Policy::Lfu);
        assert_eq!((r.requests, r.lookups, r.loads), (9, 10, 7));
        assert!((r.hit_rate - 0.3).abs() < 1e-12);
        // A request with more LoRAs than the cache holds all of them (over budget) while served.
        let r = replay(&[vec![1], vec![1], vec![5, 6, 7], vec![7]], 2, Policy::Lfu);
        assert_eq!((r.lookups, r.loads), (6, 4));
    }

    #[test]
    fn caches_per_instance_load_less_with_more_entries_and_lru_matches_the_simulation() {
        let path = stats_file(); // committed: a missing file fails the test
        let t = generate(&path, &spec("B", 20_000)).unwrap();
        let mut last = f64::MAX;
        for e in [1, 2, 5, 10] {
            let r = cache(&t, Adapter::Lora, e, Policy::Lru);
            assert!(r.loads_per_request <= last + 1e-9, "{e}: {}", r.loads_per_request);
            last = r.loads_per_request;
        }
        // one instance: the same requests replay sees, so the same loads
        let stats = TraceStats::load(&path).unwrap();
        let draws = draw(&stats, &WorkloadSpec::new("B", 20_000, 1.36, 7)).unwrap();
        let want = replay(&draws, 10, Policy::Lru).loads_per_request;
        assert!((last - want).abs() < 1e-9, "{last} vs {want}");
        // more instances, each with its own cache, load more
        let mut four = spec("B", 20_000);
        four.instances = 4;
        let t4 = generate(&path, &four).unwrap();
        assert!(cache(&t4, Adapter::Lora, 10, Policy::Lru).loads_per_request > last);
        // ControlNets: few and concentrated, so 10 entries hold nearly all calls
        assert!(cache(&t, Adapter::ControlNet, 10, Policy::Lru).hit_rate > 0.9);
    }
}
