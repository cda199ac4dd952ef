//! The LoRA flags shared by `katz worker`, `katz demo` and `katz generate`: overlays of
//! [`LoraSection`], the worker configuration's LoRA options.

use std::path::PathBuf;

use clap::Args;
use katz_actors::config::{LoraSection, LoraSwitch};
use katz_actors::lora::{LoraConfig, Policy};
use katz_onnx::pipeline::{LoraBound, LoraMode};

#[derive(Args, Debug, Clone, Default)]
pub struct LoraArgs {
    /// sync: merge a job's LoRAs before its first step; async: start denoising at once and switch
    /// the merged weights in by the bound step [default: async]
    #[arg(long, env = "KATZ_LORA_MODE")]
    pub lora_mode: Option<LoraMode>,
    /// Async: the step by which the LoRAs must be in — steps (10), a fraction (0.2) or a
    /// percentage (20%) of the job's steps; a job waits there if its merge is late [default: 20%]
    #[arg(long, env = "KATZ_LORA_BOUND")]
    pub lora_bound: Option<LoraBound>,
    /// Async: `bound` switches exactly at the bound step (same job, same image, whatever the load);
    /// `ready` switches at the first step boundary where the merge is done [default: bound]
    #[arg(long, env = "KATZ_LORA_SWITCH")]
    pub lora_switch: Option<LoraSwitch>,
}

/// The store and cache flags (worker and demo).
#[derive(Args, Debug, Clone, Default)]
pub struct LoraStoreArgs {
    /// Byte budget of the host-memory LoRA cache, in MiB [default: 1024]
    #[arg(long, env = "KATZ_LORA_CACHE_MB")]
    pub lora_cache_mb: Option<u64>,
    /// A host LoRA cache of this many adapters instead of a byte budget (as the Katz paper's
    /// cache figures count, and `katz trace cache` replays)
    #[arg(long, env = "KATZ_LORA_CACHE_ENTRIES", conflicts_with = "lora_cache_mb")]
    pub lora_cache_entries: Option<usize>,
    /// Byte budget of the device (GPU) cache of LoRA factors, in MiB [default: 2048]
    #[arg(long, env = "KATZ_LORA_DEVICE_CACHE_MB")]
    pub lora_device_cache_mb: Option<u64>,
    /// Eviction policy of the LoRA caches: lru or lfu [default: lru]
    #[arg(long, env = "KATZ_LORA_CACHE_POLICY")]
    pub lora_cache_policy: Option<Policy>,
    /// LoRA fetches pending at once; when full, the worker admits no new job [default: 4]
    #[arg(long, env = "KATZ_LORA_MAX_PENDING")]
    pub lora_max_pending: Option<usize>,
    /// A Redis that holds adapters as `katz:lora:<name>` (tried after the store directory).
    #[arg(long, env = "KATZ_LORA_REDIS")]
    pub lora_redis: Option<String>,
    /// Added to every LoRA fetch, in ms: simulates a slow store.
    #[arg(long, env = "KATZ_LORA_FETCH_DELAY_MS")]
    pub lora_fetch_delay_ms: Option<u64>,
    /// Longest a job waits at its bound step for its LoRAs, in seconds [default: 600]
    #[arg(long, env = "KATZ_LORA_TIMEOUT_S")]
    pub lora_timeout_s: Option<u64>,
}

impl LoraArgs {
    /// Overlays the flags given onto `c`.
    pub fn apply(&self, c: &mut LoraSection) {
        set(&mut c.lora_mode, self.lora_mode);
        set(&mut c.lora_bound, self.lora_bound);
        set(&mut c.lora_switch, self.lora_switch);
    }
}

impl LoraStoreArgs {
    /// Overlays the flags given onto `c` (a cache of N entries replaces a byte budget).
    pub fn apply(&self, c: &mut LoraSection) {
        set(&mut c.lora_cache_mb, self.lora_cache_mb);
        if self.lora_cache_entries.is_some() {
            c.lora_cache_entries = self.lora_cache_entries;
        }
        set(&mut c.lora_device_cache_mb, self.lora_device_cache_mb);
        set(&mut c.lora_cache_policy, self.lora_cache_policy);
        set(&mut c.lora_max_pending, self.lora_max_pending);
        if self.lora_redis.is_some() {
            c.lora_redis = self.lora_redis.clone();
        }
        set(&mut c.lora_fetch_delay_ms, self.lora_fetch_delay_ms);
        set(&mut c.lora_timeout_s, self.lora_timeout_s);
    }
}

/// `*field = v` where the flag was given.
pub fn set<T>(field: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *field = v;
    }
}

/// The LoRA configuration for a store directory: the flags given over `file` (a worker's TOML
/// section, or the defaults).
pub fn config(
    dir: PathBuf,
    a: &LoraArgs,
    s: &LoraStoreArgs,
    file: &LoraSection,
) -> anyhow::Result<LoraConfig> {
    let mut c = file.clone();
    a.apply(&mut c);
    s.apply(&mut c);
    Ok(c.config(dir)?)
}
