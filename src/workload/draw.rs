//! Drawing LoRA requests from the published statistics: how many LoRAs a request has from
//! `loras_per_request`, which ones from a Zipf popularity over the service's catalogue, with an
//! optional popularity drift (new LoRAs replacing popular ones over time).
//!
//! ```text
//! TraceStats ─(service, requests, zipf_s, drift, seed)─▶ draw ─▶ per request: LoRA ids
//!   loras_per_request {0,1,2}: how many LoRAs
//!   distinct_loras: catalog size N
//!   popularity: Zipf(s) over ranks 1..=N (s is a free parameter: see calibrate)
//!   drift: rank → id table changes over time
//! requests ─▶ popularity ─▶ Popularity (how concentrated the calls are)
//! ```

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::published::{pick_count, TraceStats};
use super::WorkloadError;

/// What to draw.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkloadSpec {
    /// Service of the statistics ("A" or "B").
    pub service: String,
    pub requests: usize,
    /// Zipf exponent of LoRA popularity (free parameter; see
    /// [`calibrate`](super::calibrate::calibrate)).
    pub zipf_s: f64,
    pub seed: u64,
    /// Popularity drift ≥ 0: replacements per request of the LoRA at a Zipf-drawn rank by a new
    /// one (see [`draw`]). 0 (the default) is the stationary draw. Free parameter; see
    /// [`calibrate2`](super::calibrate::calibrate2).
    #[serde(default)]
    pub drift: f64,
}

impl WorkloadSpec {
    /// A stationary workload (`drift = 0`).
    pub fn new(service: impl Into<String>, requests: usize, zipf_s: f64, seed: u64) -> Self {
        WorkloadSpec {
            service: service.into(),
            requests,
            zipf_s,
            seed,
            drift: 0.0,
        }
    }

    /// The same workload with popularity drift `drift` (replacements per request, ≥ 0).
    pub fn with_drift(mut self, drift: f64) -> Self {
        self.drift = drift;
        self
    }
}

/// Zipf(s) over ranks 1..=n by inverse CDF.
pub(crate) struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    pub(crate) fn new(n: u32, s: f64) -> Self {
        let mut acc = 0.0;
        let mut cdf: Vec<f64> = (1..=n)
            .map(|k| {
                acc += (k as f64).powf(-s);
                acc
            })
            .collect();
        cdf.iter_mut().for_each(|c| *c /= acc);
        Zipf { cdf }
    }

    /// The rank (1 = most popular) for a uniform `u` in [0, 1).
    pub(crate) fn rank(&self, u: f64) -> u32 {
        let i = self.cdf.partition_point(|&c| c <= u).min(self.cdf.len() - 1);
        i as u32 + 1
    }
}

/// Draws `spec.requests` requests of `spec.service`: for each, the number of LoRAs from
/// `loras_per_request`, then that many **distinct** popularity ranks from Zipf(`spec.zipf_s`) over
/// `distinct_loras`, mapped to LoRA ids. The same stats and spec give the same requests (ChaCha8
/// seeded with `spec.seed`).
///
/// **Ids.** Without drift, a LoRA's id is its popularity rank: 1 is the most popular. With
/// `spec.drift > 0` the ranks map to ids through a table that starts as the identity and evolves:
/// replacements arrive as a Poisson process of rate `drift` per request; at each, a rank `r` is
/// drawn from the same Zipf and its LoRA is retired for good (never called again) and replaced
/// by a new LoRA with the next unused id (`distinct_loras + 1`, `+ 2`, …), from the next request
/// on. So new adapters enter mostly at popular ranks and popular ones fade: rank `r` keeps a LoRA
/// for about `1 / (drift · p_r)` requests, in which that LoRA gets about
/// `mean_loras_per_request / drift` calls, the same at every rank. About `drift · requests` new
/// LoRAs appear, so the LoRAs seen grow linearly with requests and may exceed `distinct_loras`
/// (the catalogue at any one time stays `distinct_loras`).
///
/// The drift has its own random stream (stream 1 of the same seed) of (gap, rank) pairs: the
/// k-th replacement has the same rank at every drift and comes at time `(e₁ + … + e_k) / drift`
/// (eᵢ ~ Exp(1)). So the numbers of LoRAs and the ranks of every request do not depend on
/// `drift`, and the replacements only move in time, continuously, as `drift` changes (common
/// random numbers for [`calibrate2`](super::calibrate::calibrate2)). At `drift = 0` the stream is not used: the requests are
/// exactly those of the stationary draw.
///
/// # Errors
/// If `spec.service` is not in `stats` ([`WorkloadError::UnknownService`]), or `spec.drift` is
/// negative or not finite.
pub fn draw(stats: &TraceStats, spec: &WorkloadSpec) -> Result<Vec<Vec<u32>>, WorkloadError> {
    let svc = stats.service(&spec.service)?;
    let dist = svc.count_distribution()?;
    if !(spec.drift.is_finite() && spec.drift >= 0.0) {
        return Err(WorkloadError::Invalid(format!(
            "drift {} is not a rate ≥ 0",
            spec.drift
        )));
    }
    let zipf = Zipf::new(svc.distinct_loras, spec.zipf_s);
    let max_loras = svc.distinct_loras as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
    let mut drift = (spec.drift > 0.0).then(|| Drift::new(svc.distinct_loras, spec.drift, spec.seed));
    Ok((0..spec.requests)
        .map(|i| {
            let n = pick_count(&dist, rng.random());
            let mut ranks = Vec::with_capacity(n);
            while ranks.len() < n.min(max_loras) {
                // Distinct within a request: redraw a repeat (the Zipf conditioned on "not yet").
                let rank = zipf.rank(rng.random());
                if !ranks.contains(&rank) {
                    ranks.push(rank);
                }
            }
            match drift.as_mut() {
                None => ranks,
                Some(d) => {
                    let ids = ranks.iter().map(|&r| d.id(r)).collect();
                    d.advance((i + 1) as f64, &zipf);
                    ids
                }
            }
        })
        .collect())
}

/// The evolving rank → id table of a drifting draw (see [`draw`]).
struct Drift {
    /// `ids[r - 1]`: the LoRA at rank `r` now.
    ids: Vec<u32>,
    next_id: u32,
    /// Replacements per request.
    rate: f64,
    /// Time (in requests) of the next replacement, and its rank uniform.
    next: (f64, f64),
    rng: ChaCha8Rng,
}

impl Drift {
    fn new(n: u32, rate: f64, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(1);
        let mut d = Drift {
            ids: (1..=n).collect(),
            next_id: n + 1,
            rate,
            next: (0.0, 0.0),
            rng,
        };
        d.next = d.following(0.0);
        d
    }

    /// The replacement after one at time `t`: an Exp(1) gap over the rate, and a rank uniform.
    fn following(&mut self, t: f64) -> (f64, f64) {
        let (g, v): (f64, f64) = (self.rng.random(), self.rng.random());
        (t - (1.0 - g).ln() / self.rate, v)
    }

    fn id(&self, rank: u32) -> u32 {
        self.ids[rank as usize - 1]
    }

    /// Applies the replacements due before time `t` (requests served so far).
    fn advance(&mut self, t: f64, zipf: &Zipf) {
        while self.next.0 < t {
            let r = zipf.rank(self.next.1);
            self.ids[r as usize - 1] = self.next_id;
            self.next_id += 1;
            self.next = self.following(self.next.0);
        }
    }
}

/// The number of distinct LoRAs seen in the first `every`, `2·every`, … requests (and in all of
/// them, last): `(requests, distinct LoRAs)`. Linear growth is the paper's observation.
#[cfg(test)]
pub fn distinct_growth(requests: &[Vec<u32>], every: usize) -> Vec<(usize, usize)> {
    let every = every.max(1);
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (i, request) in requests.iter().enumerate() {
        seen.extend(request.iter().copied());
        if (i + 1) % every == 0 || i + 1 == requests.len() {
            out.push((i + 1, seen.len()));
        }
    }
    out
}

/// How concentrated the LoRA calls of a workload are (a call = one LoRA in one request).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Popularity {
    pub calls: u64,
    pub distinct_loras_seen: usize,
    /// Calls of the most called LoRA / all calls.
    pub max_share_of_one_lora: f64,
    /// LoRAs with at least 1% of all calls.
    pub loras_over_1pct: usize,
    /// Fraction of the LoRAs seen that each have under 1% of calls. The paper's "99.8%" counts
    /// over all LoRAs of its trace (`distinct_loras`); a short draw sees fewer, so compare
    /// `loras_over_1pct` with 0.2% of `distinct_loras` (≈ 15 for service B) as well.
    pub share_of_loras_under_1pct: f64,
}

/// The popularity facts of `requests`.
pub fn popularity(requests: &[Vec<u32>]) -> Popularity {
    let mut counts: HashMap<u32, u64> = HashMap::new();
    for &id in requests.iter().flatten() {
        *counts.entry(id).or_default() += 1;
    }
    let calls: u64 = counts.values().sum();
    if calls == 0 {
        return Popularity::default();
    }
    let max = counts.values().copied().max().unwrap_or(0);
    let over = counts.values().filter(|&&c| c * 100 >= calls).count();
    Popularity {
        calls,
        distinct_loras_seen: counts.len(),
        max_share_of_one_lora: max as f64 / calls as f64,
        loras_over_1pct: over,
        share_of_loras_under_1pct: (counts.len() - over) as f64 / counts.len() as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::testutil::{spec, stats};

    #[test]
    fn draw_is_deterministic_by_seed() {
        let s = stats();
        let a = draw(&s, &spec("B", 2000, 1.0, 7)).unwrap();
        assert_eq!(a, draw(&s, &spec("B", 2000, 1.0, 7)).unwrap());
        assert_ne!(a, draw(&s, &spec("B", 2000, 1.0, 8)).unwrap());
        assert_eq!(a.len(), 2000);
    }

    #[test]
    fn draw_follows_loras_per_request_with_distinct_ids() {
        let s = stats();
        for name in ["A", "B"] {
            let svc = s.service(name).unwrap();
            // A steep Zipf makes repeats within a request likely: they must be redrawn.
            let reqs = draw(&s, &spec(name, 20_000, 1.8, 1)).unwrap();
            let mut seen = [0usize; 3];
            for r in &reqs {
                seen[r.len()] += 1;
                let mut ids = r.clone();
                ids.sort();
                ids.dedup();
                assert_eq!(ids.len(), r.len(), "repeated LoRA in {r:?}");
                assert!(r.iter().all(|&id| (1..=svc.distinct_loras).contains(&id)));
            }
            for (n, p) in svc.count_distribution().unwrap() {
                let got = seen[n] as f64 / reqs.len() as f64;
                assert!((got - p).abs() < 0.01, "service {name}: {n} LoRAs {got} vs {p}");
            }
        }
    }

    #[test]
    fn popularity_counts_calls() {
        let mut reqs = vec![vec![1, 2]; 50];
        reqs.extend((3..=202).map(|i| vec![i])); // 300 calls: 1 and 2 have 50 each
        let p = popularity(&reqs);
        assert_eq!((p.calls, p.distinct_loras_seen, p.loras_over_1pct), (300, 202, 2));
        assert!((p.max_share_of_one_lora - 50.0 / 300.0).abs() < 1e-12);
        assert!((p.share_of_loras_under_1pct - 200.0 / 202.0).abs() < 1e-12);
    }

    /// The draw as it was before drift existed, verbatim: `drift = 0` must reproduce it exactly.
    fn stationary_draw_reference(stats: &TraceStats, spec: &WorkloadSpec) -> Vec<Vec<u32>> {
        let svc = stats.service(&spec.service).unwrap();
        let dist = svc.count_distribution().unwrap();
        let zipf = Zipf::new(svc.distinct_loras, spec.zipf_s);
        let max_loras = svc.distinct_loras as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        (0..spec.requests)
            .map(|_| {
                let u: f64 = rng.random();
                let mut acc = 0.0;
                let mut n = dist.last().map_or(0, |&(n, _)| n);
                for &(k, p) in &dist {
                    acc += p;
                    if u < acc {
                        n = k;
                        break;
                    }
                }
                let mut ids = Vec::with_capacity(n);
                while ids.len() < n.min(max_loras) {
                    let id = zipf.rank(rng.random());
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
                ids
            })
            .collect()
    }

    #[test]
    fn drift_zero_is_the_stationary_draw() {
        let s = stats();
        for (name, z, seed) in [("A", 0.8, 1), ("B", 1.36, 2025), ("B", 1.8, 7)] {
            let sp = spec(name, 20_000, z, seed);
            assert_eq!(sp.drift, 0.0);
            assert_eq!(draw(&s, &sp).unwrap(), stationary_draw_reference(&s, &sp));
            assert_eq!(
                draw(&s, &sp.clone().with_drift(0.0)).unwrap(),
                draw(&s, &sp).unwrap()
            );
        }
        // A spec serialised without the field reads as stationary.
        let old: WorkloadSpec =
            serde_json::from_str(r#"{"service": "B", "requests": 10, "zipf_s": 1.0, "seed": 3}"#).unwrap();
        assert_eq!(old, spec("B", 10, 1.0, 3));
    }

    #[test]
    fn draw_rejects_a_negative_drift() {
        let e = draw(&stats(), &spec("B", 10, 1.0, 1).with_drift(-0.1)).unwrap_err();
        assert!(e.to_string().contains("not a rate"), "{e}");
    }

    #[test]
    fn drift_grows_the_distinct_loras_linearly() {
        let s = stats();
        let n = s.service("B").unwrap().distinct_loras;
        let (requests, drift) = (100_000, 0.05);
        let still = draw(&s, &spec("B", requests, 1.36, 11)).unwrap();
        let moving = draw(&s, &spec("B", requests, 1.36, 11).with_drift(drift)).unwrap();
        // Same numbers of LoRAs and ranks: only the ids move; still distinct within a request.
        for (a, b) in still.iter().zip(&moving) {
            assert_eq!(a.len(), b.len());
            let mut ids = b.clone();
            ids.sort();
            ids.dedup();
            assert_eq!(ids.len(), b.len(), "repeated LoRA in {b:?}");
        }
        // About drift · requests replacements (Poisson: 5000 ± 71; ids are handed out in order,
        // so the largest id seen counts them, less any uncalled at the end), most of whose new
        // LoRAs are called (a few go to rarely called ranks, or come too late in the run).
        let new: std::collections::HashSet<u32> =
            moving.iter().flatten().copied().filter(|&id| id > n).collect();
        let replacements = new.iter().max().unwrap() - n;
        let expected = drift * requests as f64;
        assert!(
            (replacements as f64 - expected).abs() < 0.05 * expected,
            "{replacements} replacements"
        );
        assert!(new.len() as f64 > 0.85 * expected, "{} new LoRAs", new.len());
        // Cumulative distinct LoRAs per 10k requests: the stationary draw saturates, the drifting
        // one keeps growing by at least ~drift · 10k per 10k.
        let (g0, g1) = (distinct_growth(&still, 10_000), distinct_growth(&moving, 10_000));
        assert_eq!(g1.len(), 10);
        assert_eq!(g1.last().unwrap().0, requests);
        let steps = |g: &[(usize, usize)]| -> Vec<usize> { g.windows(2).map(|w| w[1].1 - w[0].1).collect() };
        let (d0, d1) = (steps(&g0), steps(&g1));
        eprintln!("distinct per 10k, drift 0: {g0:?}\ndrift {drift}: {g1:?}");
        assert!(d1.iter().all(|&d| d as f64 > 0.8 * drift * 10_000.0), "{d1:?}");
        assert!(d0.last().unwrap() * 2 < d0[0], "{d0:?}");
        assert!(g1.last().unwrap().1 > g0.last().unwrap().1 + 4000);
        // A long enough drift run sees more LoRAs than the catalogue holds at once.
        let far = draw(&s, &spec("B", requests, 1.36, 11).with_drift(0.2)).unwrap();
        assert!(popularity(&far).distinct_loras_seen > n as usize);
    }
}
