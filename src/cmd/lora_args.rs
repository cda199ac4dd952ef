//! The LoRA flags shared by `katz worker`, `katz demo` and `katz generate`.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use katz_actors::lora::{LoraConfig, Policy};
use katz_onnx::pipeline::{LoraBound, LoraMode};
use serde::Deserialize;

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
    #[arg(long, env = "KATZ_LORA_SWITCH", value_parser = ["bound", "ready"])]
    pub lora_switch: Option<String>,
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

/// The same options in a worker's TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraFile {
    pub lora_mode: Option<String>,
    pub lora_bound: Option<String>,
    pub lora_switch: Option<String>,
    pub lora_cache_mb: Option<u64>,
    pub lora_cache_entries: Option<usize>,
    pub lora_device_cache_mb: Option<u64>,
    pub lora_cache_policy: Option<String>,
    pub lora_max_pending: Option<usize>,
    pub lora_redis: Option<String>,
    pub lora_fetch_delay_ms: Option<u64>,
    pub lora_timeout_s: Option<u64>,
}

fn parsed<T: std::str::FromStr>(v: Option<&String>, what: &str) -> anyhow::Result<Option<T>>
where
    T::Err: std::fmt::Display,
{
    v.map(|s| s.parse::<T>().map_err(|e| anyhow::anyhow!("{what}: {e}")))
        .transpose()
}

/// Flags win over the file, the file over the defaults.
pub fn config(dir: PathBuf, a: &LoraArgs, s: &LoraStoreArgs, f: &LoraFile) -> anyhow::Result<LoraConfig> {
    let mut c = LoraConfig::new(dir);
    if let Some(m) = a.lora_mode.or(parsed(f.lora_mode.as_ref(), "lora_mode")?) {
        c.mode = m;
    }
    if let Some(b) = a.lora_bound.or(parsed(f.lora_bound.as_ref(), "lora_bound")?) {
        c.bound = b;
    }
    match a.lora_switch.as_deref().or(f.lora_switch.as_deref()) {
        None | Some("bound") => c.switch_early = false,
        Some("ready") => c.switch_early = true,
        Some(o) => anyhow::bail!("lora_switch must be `bound` or `ready`, got `{o}`"),
    }
    if let Some(mb) = s.lora_cache_mb.or(f.lora_cache_mb) {
        c.host_cache_bytes = mb << 20;
    }
    c.host_cache_entries = s.lora_cache_entries.or(f.lora_cache_entries);
    if c.host_cache_entries == Some(0) {
        anyhow::bail!("lora_cache_entries must be at least 1");
    }
    if let Some(mb) = s.lora_device_cache_mb.or(f.lora_device_cache_mb) {
        c.device_cache_bytes = mb << 20;
    }
    if let Some(p) = s
        .lora_cache_policy
        .or(parsed(f.lora_cache_policy.as_ref(), "lora_cache_policy")?)
    {
        c.policy = p;
    }
    if let Some(n) = s.lora_max_pending.or(f.lora_max_pending) {
        anyhow::ensure!(n >= 1, "lora_max_pending must be at least 1");
        c.max_pending_loads = n;
    }
    c.redis = s.lora_redis.clone().or(f.lora_redis.clone());
    if let Some(ms) = s.lora_fetch_delay_ms.or(f.lora_fetch_delay_ms) {
        c.fetch_delay = Duration::from_millis(ms);
    }
    if let Some(t) = s.lora_timeout_s.or(f.lora_timeout_s) {
        c.timeout = Duration::from_secs(t);
    }
    Ok(c)
}
