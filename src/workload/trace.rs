//! Request traces in the format the Katz authors published: reading and writing them, and what
//! can be read from one (adapters per request, popularity, adapters seen per instance over time).
//!
//! ```text
//! trace JSON: [{timestamp, ip, scene_id, base_model_id, controlnets: [id…], loras: [id…]}, …]
//!      │ read (sorted by timestamp) / write
//!      ▼
//!  stats(trace) ─▶ TraceReport
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::WorkloadError;

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
pub fn read(path: impl AsRef<Path>) -> Result<Vec<TraceRequest>, WorkloadError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(WorkloadError::io(path))?;
    let mut reqs: Vec<TraceRequest> = serde_json::from_str(&text)
        .map_err(|e| WorkloadError::Invalid(format!("{}: not a Katz trace: {e}", path.display())))?;
    if let Some(i) = reqs.iter().position(|r| !r.timestamp.is_finite()) {
        return Err(WorkloadError::Invalid(format!(
            "{}: request {i} has no finite timestamp",
            path.display()
        )));
    }
    reqs.sort_by(|a, b| a.timestamp.total_cmp(&b.timestamp));
    Ok(reqs)
}

/// Writes a trace file.
pub fn write(path: impl AsRef<Path>, reqs: &[TraceRequest]) -> Result<(), WorkloadError> {
    let path = path.as_ref();
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(WorkloadError::io(d))?;
    }
    let text = serde_json::to_string(reqs).map_err(|e| WorkloadError::Invalid(e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(WorkloadError::io(path))
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
