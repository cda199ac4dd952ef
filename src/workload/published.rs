//! The statistics the Katz authors published of their production trace (USENIX ATC 2025), read
//! from `katz-trace-stats.json`: per service, how many LoRAs and ControlNets a request has, how
//! many distinct ones the trace saw, how concentrated the ControlNet calls are, and the paper's
//! cache loads per request. Everything in this module that draws requests starts here.
//!
//! ```text
//! katz-trace-stats.json ─▶ TraceStats::load ─▶ services["A" | "B"]: ServiceStats
//!   loras_per_request {"0": p0, "1": p1, "2": p2} ─▶ count_distribution ─▶ pick_count(u)
//!   distinct_loras, lora_cache_loads_per_request_10_entries (LRU, LFU)
//!   controlnets_per_request, distinct_controlnets, controlnet_concentration ─▶ ControlNetStats
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::WorkloadError;

/// The published trace statistics the LoRA draw needs (other fields of the file are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct TraceStats {
    /// Per service ("A", "B").
    pub services: BTreeMap<String, ServiceStats>,
}

/// One service's statistics.
#[derive(Debug, Clone, Deserialize)]
pub struct ServiceStats {
    /// Probability of each number of LoRAs in a request, keyed by the number ("0", "1", "2").
    pub loras_per_request: BTreeMap<String, f64>,
    /// LoRAs seen in the trace: the catalog size of the draw.
    pub distinct_loras: u32,
    /// The paper's loads per request of a 10-entry cache, where published (service B).
    #[serde(default)]
    pub lora_cache_loads_per_request_10_entries: Option<PolicyTargets>,
}

/// A figure per cache policy.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct PolicyTargets {
    pub lru: f64,
    pub lfu: f64,
}

impl TraceStats {
    /// Reads and checks the statistics file (`katz-trace-stats.json`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self, WorkloadError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(WorkloadError::io(path))?;
        Self::from_json(&text).map_err(|e| WorkloadError::Invalid(format!("{}: {e}", path.display())))
    }

    /// Parses and checks the statistics from JSON text.
    pub fn from_json(text: &str) -> Result<Self, WorkloadError> {
        let stats: TraceStats =
            serde_json::from_str(text).map_err(|e| WorkloadError::Invalid(e.to_string()))?;
        for (name, svc) in &stats.services {
            svc.count_distribution()
                .map_err(|e| WorkloadError::Invalid(format!("service {name}: {e}")))?;
            if svc.distinct_loras == 0 {
                return Err(WorkloadError::Invalid(format!(
                    "service {name}: distinct_loras is 0"
                )));
            }
        }
        Ok(stats)
    }

    /// The statistics of service `name`; an unknown name is an error that lists the known ones.
    pub fn service(&self, name: &str) -> Result<&ServiceStats, WorkloadError> {
        self.services
            .get(name)
            .ok_or_else(|| WorkloadError::UnknownService {
                name: name.to_string(),
                known: self
                    .services
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

impl ServiceStats {
    /// `(number of LoRAs, probability)`, sorted by number, probabilities normalised to sum 1.
    pub fn count_distribution(&self) -> Result<Vec<(usize, f64)>, WorkloadError> {
        count_distribution("loras_per_request", &self.loras_per_request)
    }
}

/// A published "how many per request" distribution (`{"0": p0, "1": p1, …}`) as `(number,
/// probability)`, sorted by number, normalised to sum 1; `what` names it in errors.
pub fn count_distribution(what: &str, m: &BTreeMap<String, f64>) -> Result<Vec<(usize, f64)>, WorkloadError> {
    let mut dist = Vec::new();
    for (k, &p) in m {
        let n: usize = k
            .trim()
            .parse()
            .map_err(|_| WorkloadError::Invalid(format!("{what} key {k:?}")))?;
        if !(p.is_finite() && p >= 0.0) {
            return Err(WorkloadError::Invalid(format!("{what}[{k}] = {p}")));
        }
        dist.push((n, p));
    }
    dist.sort_by_key(|&(n, _)| n);
    let total: f64 = dist.iter().map(|&(_, p)| p).sum();
    if (total - 1.0).abs() > 0.01 {
        return Err(WorkloadError::Invalid(format!("{what} sums to {total}, not 1")));
    }
    Ok(dist.into_iter().map(|(n, p)| (n, p / total)).collect())
}

/// The number a uniform `u` in [0, 1) picks from a [`count_distribution`] (the largest number
/// when rounding leaves `u` past the last step).
pub fn pick_count(dist: &[(usize, f64)], u: f64) -> usize {
    let mut acc = 0.0;
    for &(k, p) in dist {
        acc += p;
        if u < acc {
            return k;
        }
    }
    dist.last().map_or(0, |&(n, _)| n)
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

/// The ControlNet side of the whole statistics file (the LoRA side is [`TraceStats`]).
#[derive(Deserialize)]
pub(super) struct StatsFile {
    pub(super) services: BTreeMap<String, ControlNetStats>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::testutil::stats;

    #[test]
    fn shared_stats_file_matches_the_published_copy() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/workload/katz-trace-stats.json"
        );
        if !Path::new(path).exists() {
            eprintln!("skipped: {path} not present");
            return;
        }
        let file = TraceStats::load(path).unwrap();
        let copy = stats();
        for name in ["A", "B"] {
            let (f, c) = (file.service(name).unwrap(), copy.service(name).unwrap());
            assert_eq!(f.loras_per_request, c.loras_per_request);
            assert_eq!(f.distinct_loras, c.distinct_loras);
            assert_eq!(
                f.lora_cache_loads_per_request_10_entries,
                c.lora_cache_loads_per_request_10_entries
            );
        }
        assert!(file.service("C").unwrap_err().to_string().contains("A, B"));
        assert!(TraceStats::from_json(
            r#"{"services": {"X": {"loras_per_request": {"1": 0.5},
            "distinct_loras": 3}}}"#
        )
        .unwrap_err()
        .to_string()
        .contains("sums to"));
    }
}
