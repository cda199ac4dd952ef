//! Offline workload research on the Katz paper's trace (USENIX ATC 2025): its published
//! statistics, requests and whole traces drawn from them, traces in the authors' format, and
//! katz's LoRA cache replayed over them. None of it runs in the service; `katz trace` and
//! `katz bench lora-cache` use it.
//!
//! The paper's production trace (about 550k requests, two services) is **not available**: only
//! its published statistics are (`tools/workload/katz-trace-stats.json`, a copy of
//! `shared/workload/katz-trace-stats.json`). So the workload is drawn from them; an operator with
//! the real trace runs the same `stats` and `cache` on it (`katz trace stats | cache FILE`).
//!
//! # Layout
//!
//! ```text
//! published   katz-trace-stats.json ─▶ TraceStats (per service: LoRAs / ControlNets per request,
//!             catalogue sizes, ControlNet concentration, the paper's cache loads per request)
//!                │
//! draw           ├─▶ draw(stats, WorkloadSpec) ─▶ per request: LoRA ids (Zipf popularity,
//!                │     optional drift); popularity(requests) ─▶ Popularity
//! generate       └─▶ generate(stats file, TraceSpec) ─▶ a whole trace: + ControlNets, arrival
//!                      times (Poisson | bursty), instances
//! trace       TraceRequest: read / write the authors' JSON format; stats(trace) ─▶ TraceReport
//! cache       replay(drawn requests, entries, policy) ─▶ SimResult   (one katz lora::Cache)
//!             cache(trace, adapter, entries, policy) ─▶ CacheResult  (a Cache per instance)
//! calibrate   calibrate / calibrate2: fit the Zipf exponent (and drift) so that replay gives
//!             the paper's loads per request (a fit, not a validation)
//! ```

pub mod cache;
pub mod calibrate;
pub mod draw;
pub mod generate;
pub mod published;
pub mod trace;

use std::path::PathBuf;

pub use cache::{cache, replay, Adapter};
pub use calibrate::{calibrate2, calibrate_with_drift};
pub use draw::{draw, popularity, WorkloadSpec};
pub use generate::{generate, Arrivals, TraceSpec};
pub use published::TraceStats;
pub use trace::{read, stats, write, TraceRequest};

/// Why statistics, a trace or a spec cannot be used. The callers are command-line tools: every
/// variant ends the command with its message.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    /// A file could not be read or written.
    #[error("{}: {err}", path.display())]
    Io { path: PathBuf, err: std::io::Error },
    /// A service the statistics do not have.
    #[error("unknown service {name:?}: the statistics have {known}")]
    UnknownService { name: String, known: String },
    /// Statistics, a trace or a spec that does not parse or does not make sense; the message
    /// says which and why.
    #[error("{0}")]
    Invalid(String),
}

impl WorkloadError {
    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |err| WorkloadError::Io { path, err }
    }
}

/// Fixtures of the tests of this module's files.
#[cfg(test)]
pub(crate) mod testutil {
    use std::path::Path;

    use super::draw::WorkloadSpec;
    use super::generate::{Arrivals, TraceSpec};
    use super::published::TraceStats;

    /// The statistics the LoRA draw needs, as published (a copy of the relevant fields of
    /// `shared/workload/katz-trace-stats.json`, which lives outside the repository).
    const PUBLISHED: &str = r#"{
        "services": {
            "A": {"loras_per_request": {"0": 0.002, "1": 0.088, "2": 0.910}, "distinct_loras": 6980},
            "B": {"loras_per_request": {"0": 0.072, "1": 0.736, "2": 0.192}, "distinct_loras": 7463,
                  "lora_cache_loads_per_request_10_entries": {"lru": 0.54, "lfu": 0.57}}
        },
        "lora_popularity": "99.8% of LoRAs each account for under 1% of calls"
    }"#;

    pub fn stats() -> TraceStats {
        TraceStats::from_json(PUBLISHED).unwrap()
    }

    pub fn spec(service: &str, requests: usize, zipf_s: f64, seed: u64) -> WorkloadSpec {
        WorkloadSpec::new(service, requests, zipf_s, seed)
    }

    /// The committed statistics file (a copy of ../shared/workload/katz-trace-stats.json, the
    /// paper's published statistics, with the ControlNet side too).
    pub fn stats_file() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/workload/katz-trace-stats.json")
    }

    /// A Poisson trace of `requests` requests of `service` at 2/s on one instance.
    pub fn trace_spec(service: &str, requests: usize) -> TraceSpec {
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
}
