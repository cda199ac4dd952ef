//! Request traces in the format the Katz authors published, and what can be read from them:
//! adapters per request, popularity, adapters seen per instance over time, and the loads per
//! request of LoRA and ControlNet caches (katz's own [`Cache`], LRU and LFU) on each instance.
//!
//! ```text
//! trace JSON: [{timestamp, ip, scene_id, base_model_id, controlnets: [id…], loras: [id…]}, …]
//!      │ read / write                         ▲
//!      ▼                                      │ generate (no real trace here): the published
//!  stats(trace) ─▶ TraceReport                │ statistics (katz-trace-stats.json) — adapters per
//!  cache(trace, entries, policy)              │ request per service, ControlNet concentration
//!      └─ per instance (ip): a cache of N      │ (top 5 of 47 take 98%), LoRA popularity from
//!         entries; loads/request summed        │ lora::sim::draw (Zipf, optional drift) — with
//!                                              │ Poisson or bursty arrivals over instances
//! ```
//!
//! An operator with the real trace runs the same `stats` and `cache` on it (`katz trace stats |
//! cache FILE`); the generated one stands in for it in tests and in the workload runs.

pub mod sim;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use katz_actors::lora::cache::{Cache, Policy};
use self::sim::{count_distribution, pick_count, TraceStats, WorkloadSpec, Zipf};

/// One request of a trace, as the Katz authors published them (ids anonymised strings).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Seconds (a number; numeric strings are read too).
    #[serde(deserialize_with = "seconds")]
    pub timestamp: f64,
    /// The serving instance.
    pub ip: String,
    pub scene_id: String,
    pub base_model_id: String,
    #[serde(default)]
    pub controlnets: Vec<String>,
    #[serde(default)]
    pub loras: Vec<String>,
}

fn seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum T {
        N(f64),
        S(String),
    }
    match T::deserialize(d)? {
        T::N(x) => Ok(x),
        T::S(s) => s
            .trim()
            .parse()
            .map_err(|_| serde::de::Error::custom(format!("timestamp {s:?} is not a number of seconds"))),
    }
}

/// Reads a trace file (a JSON list of requests), sorted by timestamp.
pub fn read(path: impl AsRef<Path>) -> Result<Vec<TraceRequest>, String> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut reqs: Vec<TraceRequest> =
        serde_json::from_str(&text).map_err(|e| format!("{}: not a Katz trace: {e}", path.display()))?;
    if let Some(i) = reqs.iter().position(|r| !r.timestamp.is_finite()) {
        return Err(format!("{}: request {i} has no finite timestamp", path.display()));
    }
    reqs.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    Ok(reqs)
}

/// Writes a trace file.
pub fn write(path: impl AsRef<Path>, reqs: &[TraceRequest]) -> Result<(), String> {
    let path = path.as_ref();
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
    }
    let text = serde_json::to_string(reqs).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| format!("{}: {e}", path.display()))
}

/// The ControlNet side of a service's published statistics.
#[derive(Debug, Clone, Deserialize)]
pub struct ControlNetStats {
    pub controlnets_per_request: BTreeMap<String, f64>,
    pub distinct_controlnets: u32,
    pub controlnet_concentration: Concentration,
}

/// "The top `top_k` ControlNets take `share_of_calls` of the calls."
#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
pub struct Concentration {
    pub top_k: u32,
    pub share_of_calls: f64,
}

#[derive(Deserialize)]
struct StatsFile {
    services: BTreeMap<String, ControlNetStats>,
}

/// Arrival process.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Arrivals {
    /// Exponential gaps at the mean rate.
    Poisson,
    /// On/off: bursts at `factor` × the rate for `on_s` seconds, then quiet at the rate that keeps
    /// the mean, alternating (a two-state modulated Poisson process).
    Bursty { factor: f64, on_s: f64, off_s: f64 },
}

/// What [`generate`] draws.
#[derive(Debug, Clone)]
pub struct TraceSpec {
    pub service: String,
    pub requests: usize,
    /// Requests per second (mean).
    pub rate: f64,
    pub arrivals: Arrivals,
    /// Serving instances the requests spread over (uniformly).
    pub instances: usize,
    pub seed: u64,
    /// Zipf exponent of LoRA popularity and popularity drift (lora::sim says what they mean).
    pub zipf_s: f64,
    pub drift: f64,
    /// Zipf exponent of ControlNet popularity inside the top k (and inside the rest).
    pub controlnet_zipf_s: f64,
    pub base_model_id: String,
}

/// Draws a trace from the published statistics of `spec.service`. The same file and spec give the
/// same trace.
pub fn generate(stats_path: impl AsRef<Path>, spec: &TraceSpec) -> Result<Vec<TraceRequest>, String> {
    let path = stats_path.as_ref();
    let stats = TraceStats::load(path)?;
    stats.service(&spec.service)?;
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cn_file: StatsFile =
        serde_json::from_str(&text).map_err(|e| format!("{}: ControlNet statistics: {e}", path.display()))?;
    let cn = cn_file
        .services
        .get(&spec.service)
        .ok_or_else(|| format!("service {} has no ControlNet statistics", spec.service))?;
    if !(spec.rate > 0.0 && spec.rate.is_finite()) || spec.instances == 0 {
        return Err("the rate must be > 0 and there must be an instance".into());
    }
    let loras = sim::draw(
        &stats,
        &WorkloadSpec::new(spec.service.clone(), spec.requests, spec.zipf_s, spec.seed)
            .with_drift(spec.drift),
    );
    let n_cn = count_distribution("controlnets_per_request", &cn.controlnets_per_request)?;
    let c = cn.controlnet_concentration;
    let (k, total) = (c.top_k.min(cn.distinct_controlnets), cn.distinct_controlnets);
    if k == 0 {
        return Err("no ControlNets to draw".into());
    }
    let top = Zipf::new(k, spec.controlnet_zipf_s);
    let rest = (total > k).then(|| Zipf::new(total - k, spec.controlnet_zipf_s));
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0x6b61_747a_5f63_6e00);
    let mut t = 0.0f64;
    let mut out = Vec::with_capacity(spec.requests);
    for lr in loras {
        t += gap(&mut rng, spec, t);
        let want = pick_count(&n_cn, rng.random()).min(total as usize);
        let mut cns: Vec<u32> = Vec::new();
        while cns.len() < want {
            let id = match &rest {
                Some(rest) if rng.random::<f64>() >= c.share_of_calls => k + rest.rank(rng.random()),
                _ => top.rank(rng.random()),
            };
            if !cns.contains(&id) {
                cns.push(id);
            }
        }
        out.push(TraceRequest {
            timestamp: (t * 1e3).round() / 1e3,
            ip: format!("10.0.0.{}", 1 + rng.random_range(0..spec.instances)),
            scene_id: spec.service.clone(),
            base_model_id: spec.base_model_id.clone(),
            controlnets: cns.iter().map(|c| format!("cn-{c}")).collect(),
            loras: lr.iter().map(|l| format!("lora-{l}")).collect(),
        });
    }
    Ok(out)
}

/// The next inter-arrival gap at time `t`: an Exp(1) amount of the integrated rate, walked
/// through the on/off segments (a gap drawn in a quiet segment ends in the next burst).
fn gap(rng: &mut ChaCha8Rng, spec: &TraceSpec, t: f64) -> f64 {
    let mut e = -(1.0 - rng.random::<f64>()).ln();
    match spec.arrivals {
        Arrivals::Poisson => e / spec.rate,
        Arrivals::Bursty { factor, on_s, off_s } => {
            // on: factor × rate; off: what keeps the mean (at least 1% of it)
            let (on_s, off_s) = (on_s.max(1e-6), off_s.max(1e-6));
            let period = on_s + off_s;
            let on_rate = spec.rate * factor;
            let off_rate = ((spec.rate * period - on_rate * on_s) / off_s).max(spec.rate * 0.01);
            let mut now = t;
            loop {
                let phase = now % period;
                let (r, left) = if phase < on_s {
                    (on_rate, on_s - phase)
                } else {
                    (off_rate, period - phase)
                };
                if e <= r * left {
                    return now + e / r - t;
                }
                e -= r * left;
                now += left;
            }
        }
    }
}

/// What a trace shows.
#[derive(Debug, Clone, Serialize)]
pub struct TraceReport {
    pub requests: usize,
    pub seconds: f64,
    pub rate: f64,
    pub instances: usize,
    /// Share of requests with n ControlNets / LoRAs.
    pub controlnets_per_request: BTreeMap<usize, f64>,
    pub loras_per_request: BTreeMap<usize, f64>,
    pub distinct_controlnets: usize,
    pub distinct_loras: usize,
    /// Share of ControlNet calls taken by the k most called, for k = 1, 5, 8, 10 (the paper
    /// states service A's as top 5, service B's as top 8).
    pub top_controlnet_share: BTreeMap<usize, f64>,
    pub top_lora_share: f64,
    /// Share of the LoRAs seen that each take under 1% of the LoRA calls.
    pub share_of_loras_under_1pct: f64,
    /// Per instance: (requests at it so far, distinct LoRAs it has seen), at ten points.
    pub distinct_loras_over_time: BTreeMap<String, Vec<(usize, usize)>>,
}

/// Statistics of a trace.
pub fn stats(reqs: &[TraceRequest]) -> TraceReport {
    let n = reqs.len().max(1) as f64;
    let share = |f: &dyn Fn(&TraceRequest) -> usize| {
        let mut m: BTreeMap<usize, f64> = BTreeMap::new();
        for r in reqs {
            *m.entry(f(r)).or_default() += 1.0 / n;
        }
        m
    };
    let calls = |f: &dyn Fn(&TraceRequest) -> &Vec<String>| {
        let mut m: HashMap<&str, u64> = HashMap::new();
        for r in reqs {
            for id in f(r) {
                *m.entry(id.as_str()).or_default() += 1;
            }
        }
        let mut v: Vec<u64> = m.into_values().collect();
        v.sort_unstable_by(|a, b| b.cmp(a));
        v
    };
    let cn_calls = calls(&|r| &r.controlnets);
    let lora_calls = calls(&|r| &r.loras);
    let cn_total: u64 = cn_calls.iter().sum();
    let lora_total: u64 = lora_calls.iter().sum();
    let mut per: BTreeMap<String, Vec<&TraceRequest>> = BTreeMap::new();
    for r in reqs {
        per.entry(r.ip.clone()).or_default().push(r);
    }
    let over_time = per
        .iter()
        .map(|(ip, rs)| {
            let mut seen: HashSet<&str> = HashSet::new();
            let mut pts = Vec::new();
            let every = rs.len().div_ceil(10).max(1);
            for (i, r) in rs.iter().enumerate() {
                seen.extend(r.loras.iter().map(String::as_str));
                if (i + 1) % every == 0 || i + 1 == rs.len() {
                    pts.push((i + 1, seen.len()));
                }
            }
            (ip.clone(), pts)
        })
        .collect();
    let (t0, t1) = (
        reqs.first().map(|r| r.timestamp).unwrap_or(0.0),
        reqs.last().map(|r| r.timestamp).unwrap_or(0.0),
    );
    TraceReport {
        requests: reqs.len(),
        seconds: t1 - t0,
        rate: if t1 > t0 {
            reqs.len() as f64 / (t1 - t0)
        } else {
            0.0
        },
        instances: per.len(),
        controlnets_per_request: share(&|r| r.controlnets.len()),
        loras_per_request: share(&|r| r.loras.len()),
        distinct_controlnets: cn_calls.len(),
        distinct_loras: lora_calls.len(),
        top_controlnet_share: [1, 5, 8, 10]
            .into_iter()
            .map(|k| {
                (
                    k,
                    cn_calls.iter().take(k).sum::<u64>() as f64 / cn_total.max(1) as f64,
                )
            })
            .collect(),
        top_lora_share: lora_calls.first().copied().unwrap_or(0) as f64 / lora_total.max(1) as f64,
        share_of_loras_under_1pct: lora_calls
            .iter()
            .filter(|&&c| (c as f64) < 0.01 * lora_total as f64)
            .count() as f64
            / lora_calls.len().max(1) as f64,
        distinct_loras_over_time: over_time,
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
        sim::serve(c, ids.iter().map(String::as_str));
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
        loads_per_request: sim::ratio(loads, reqs.len() as u64),
        hit_rate: sim::ratio(hits, lookups),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stats_file() -> std::path::PathBuf {
        // a copy of ../shared/workload/katz-trace-stats.json (the paper's published statistics)
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/workload/katz-trace-stats.json")
    }

    fn spec(service: &str, requests: usize) -> TraceSpec {
        TraceSpec {
            service: service.into(),
            requests,
            rate: 2.0,
            arrivals: Arrivals::Poisson,
            instances: 1,
            seed: 7,
            zipf_s: 1.36,
            drift: 0.0,
            controlnet_zipf_s: 1.0,
            base_model_id: "sdxl".into(),
        }
    }

    #[test]
    fn a_generated_trace_has_the_published_shape_and_round_trips() {
        let path = stats_file(); // committed: a missing file fails the test
        let t = generate(&path, &spec("A", 20_000)).unwrap();
        let r = stats(&t);
        // service A: 30.5% one ControlNet, 69.5% two; 98% of calls to the top 5 of 47
        assert!((r.controlnets_per_request[&1] - 0.305).abs() < 0.015, "{r:?}");
        assert!((r.controlnets_per_request[&2] - 0.695).abs() < 0.015, "{r:?}");
        let top5 = r.top_controlnet_share[&5];
        assert!((top5 - 0.98).abs() < 0.01, "{top5}");
        assert!(r.distinct_controlnets <= 47);
        assert!((r.loras_per_request[&2] - 0.91).abs() < 0.015, "{r:?}");
        assert!(
            r.share_of_loras_under_1pct > 0.99,
            "{}",
            r.share_of_loras_under_1pct
        );
        assert!((r.rate - 2.0).abs() < 0.1, "{}", r.rate);
        assert!(t.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
        let dir = std::env::temp_dir().join(format!("katz-trace-{}", std::process::id()));
        let f = dir.join("t.json");
        write(&f, &t[..100]).unwrap();
        assert_eq!(read(&f).unwrap(), t[..100].to_vec());
        let _ = std::fs::remove_dir_all(dir);
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
        // one instance: the same requests lora::sim::replay sees, so the same loads
        let stats = TraceStats::load(&path).unwrap();
        let draws = sim::draw(&stats, &WorkloadSpec::new("B", 20_000, 1.36, 7));
        let want = sim::replay(&draws, 10, Policy::Lru).loads_per_request;
        assert!((last - want).abs() < 1e-9, "{last} vs {want}");
        // more instances, each with its own cache, load more
        let mut four = spec("B", 20_000);
        four.instances = 4;
        let t4 = generate(&path, &four).unwrap();
        assert!(cache(&t4, Adapter::Lora, 10, Policy::Lru).loads_per_request > last);
        // ControlNets: few and concentrated, so 10 entries hold nearly all calls
        assert!(cache(&t, Adapter::ControlNet, 10, Policy::Lru).hit_rate > 0.9);
    }

    #[test]
    fn bursty_arrivals_keep_the_mean_rate_and_timestamps_may_be_strings() {
        let path = stats_file();
        if !path.exists() {
            return;
        }
        let mut s = spec("B", 5_000);
        s.arrivals = Arrivals::Bursty {
            factor: 4.0,
            on_s: 10.0,
            off_s: 30.0,
        };
        let r = stats(&generate(&path, &s).unwrap());
        assert!((r.rate - 2.0).abs() < 0.3, "{}", r.rate);
        let one: Vec<TraceRequest> = serde_json::from_str(
            r#"[{"timestamp": "12.5", "ip": "a", "scene_id": "B", "base_model_id": "m", "controlnets": [], "loras": ["x"]}]"#,
        )
        .unwrap();
        assert_eq!(one[0].timestamp, 12.5);
        let bad = serde_json::from_str::<Vec<TraceRequest>>(
            r#"[{"timestamp": "noon", "ip": "a", "scene_id": "B", "base_model_id": "m"}]"#,
        );
        assert!(bad.unwrap_err().to_string().contains("not a number of seconds"));
    }
}
