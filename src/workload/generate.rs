//! Drawing a whole trace in the Katz format from the published statistics (no real trace is
//! available here): the LoRAs of each request from [`draw`], its ControlNets with the published
//! concentration, arrival times (Poisson or bursty) and a serving instance.
//!
//! ```text
//! katz-trace-stats.json ─▶ TraceStats ─▶ draw (Zipf, optional drift) ─▶ LoRAs per request
//!                       └▶ ControlNetStats: controlnets_per_request, top k take share_of_calls
//!                                          (Zipf inside the top k and inside the rest)
//! arrivals: Poisson or on/off bursts at the mean rate; instance: uniform over `instances`
//!   ─▶ [TraceRequest {timestamp, ip, scene_id, base_model_id, controlnets, loras}]
//! ```

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::draw::{draw, WorkloadSpec, Zipf};
use super::published::{count_distribution, pick_count, StatsFile, TraceStats};
use super::trace::TraceRequest;
use super::WorkloadError;

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
    /// Zipf exponent of LoRA popularity and popularity drift ([`draw`] says what they mean).
    pub zipf_s: f64,
    pub drift: f64,
    /// Zipf exponent of ControlNet popularity inside the top k (and inside the rest).
    pub controlnet_zipf_s: f64,
    pub base_model_id: String,
}

/// Draws a trace from the published statistics of `spec.service`. The same file and spec give the
/// same trace.
pub fn generate(stats_path: impl AsRef<Path>, spec: &TraceSpec) -> Result<Vec<TraceRequest>, WorkloadError> {
    let path = stats_path.as_ref();
    let stats = TraceStats::load(path)?;
    stats.service(&spec.service)?;
    let text = std::fs::read_to_string(path).map_err(WorkloadError::io(path))?;
    let cn_file: StatsFile = serde_json::from_str(&text)
        .map_err(|e| WorkloadError::Invalid(format!("{}: ControlNet statistics: {e}", path.display())))?;
    let cn = cn_file.services.get(&spec.service).ok_or_else(|| {
        WorkloadError::Invalid(format!("service {} has no ControlNet statistics", spec.service))
    })?;
    if !(spec.rate > 0.0 && spec.rate.is_finite()) || spec.instances == 0 {
        return Err(WorkloadError::Invalid(
            "the rate must be > 0 and there must be an instance".into(),
        ));
    }
    let loras = draw(
        &stats,
        &WorkloadSpec::new(spec.service.clone(), spec.requests, spec.zipf_s, spec.seed)
            .with_drift(spec.drift),
    )?;
    let n_cn = count_distribution("controlnets_per_request", &cn.controlnets_per_request)?;
    let c = cn.controlnet_concentration;
    let (k, total) = (c.top_k.min(cn.distinct_controlnets), cn.distinct_controlnets);
    if k == 0 {
        return Err(WorkloadError::Invalid("no ControlNets to draw".into()));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::testutil::{stats_file, trace_spec as spec};
    use crate::workload::trace::{read, stats, write};

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
