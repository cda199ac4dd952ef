//! LoRA adapters in the service: where they come from, where they are kept, and how a job's
//! LoRAs are merged off its critical path (Katz's bounded asynchronous LoRA loading).
//!
//! ```text
//! delivery ─admit(names)─▶ LoraManager: unknown name? → invalid job (dead letter)
//!                           missing from the host cache → fetch (store: dir | Redis; may be slow)
//!                           ≤ max_pending_loads fetches at once: a full queue holds the job here,
//!                           so the consumer's prefetch window fills and the broker sends no more
//! job starts ─merge(names, scales)─▶ LoraManager ─ cache hit | join the fetch ─▶ parse
//!                                        └▶ merge W + Σ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ on the blocking pool
//!                                              └▶ MergeSender ══▶ PendingMerge (model thread)
//! model thread: denoise with the pristine weights; at step K (or the first ready boundary with
//!               --lora-switch ready) rebind to the merged set; if not ready at K, wait (timed)
//! ```
//!
//! `sync` mode is the same path with K = 0: the job waits for its merge before step 0. So does a
//! job whose LoRAs have text-encoder layers (the prompt's conditioning needs them): the manager
//! says so as soon as it knows (at once for LoRAs read before, else once they are read), and
//! every job waits for that notice before its first step, so a bad file fails it before any step.

pub mod cache;
pub mod manager;
pub mod store;

use std::path::PathBuf;
use std::time::Duration;

pub use cache::{Cache, CacheStats, Policy};
use katz_onnx::pipeline::{LoraBound, LoraMode};
pub use manager::{Admitted, JobLoraStats, LoraManager, LoraStats, MergeStarted};
pub use store::LoraStore;

/// Where adapters come from, how they are cached, and when jobs switch them in.
#[derive(Debug, Clone)]
pub struct LoraConfig {
    /// Store directory: adapter `name` is `<dir>/<name>.safetensors`.
    pub dir: PathBuf,
    /// A Redis holding adapters as `katz:lora:<name>` (raw safetensors bytes), tried after `dir`.
    pub redis: Option<String>,
    /// Added to every fetch: simulates a slow store (network, object storage).
    pub fetch_delay: Duration,
    pub mode: LoraMode,
    pub bound: LoraBound,
    /// Switch at the first ready step boundary instead of exactly at the bound.
    pub switch_early: bool,
    /// Byte budget of the host-memory cache of parsed adapters.
    pub host_cache_bytes: u64,
    /// A host cache of this many adapters instead of a byte budget (what the Katz paper's cache
    /// figures count; `katz trace cache` replays the same cache).
    pub host_cache_entries: Option<usize>,
    /// Byte budget of the device cache of uploaded factors (GPU workers).
    pub device_cache_bytes: u64,
    pub policy: Policy,
    /// Fetches pending at once; a job whose adapters would exceed it waits before it is admitted.
    pub max_pending_loads: usize,
    /// Longest a job waits at its bound step for its merge before failing.
    pub timeout: Duration,
}

impl LoraConfig {
    /// Defaults for a store directory: async, bound 10 of 50 steps (20%), switch at the bound,
    /// 1 GiB LRU host cache, 2 GiB device cache, 4 pending loads, 10 minutes.
    pub fn new(dir: PathBuf) -> Self {
        LoraConfig {
            dir,
            redis: None,
            fetch_delay: Duration::ZERO,
            mode: LoraMode::Async,
            bound: LoraBound::Fraction(0.2),
            switch_early: false,
            host_cache_bytes: 1 << 30,
            host_cache_entries: None,
            device_cache_bytes: 2 << 30,
            policy: Policy::Lru,
            max_pending_loads: 4,
            timeout: Duration::from_secs(600),
        }
    }

    /// The bound step of a job of `steps` steps (0 in sync mode).
    pub fn bound_step(&self, steps: usize) -> usize {
        match self.mode {
            LoraMode::Sync => 0,
            LoraMode::Async => self.bound.step_for(steps),
        }
    }
}
