//! `katz bench`: measurements of katz's building blocks, one nested subcommand each, one file
//! each; this file only parses and dispatches.
//!
//! ```text
//! katz bench lora-merge   lora_merge.rs   LoRA merge time against the memory-bound floor (CPU, or
//!                         lora_merge_gpu.rs  one GPU: CUDA merge kernels)
//! katz bench lora-bound   lora.rs         image quality of asynchronous LoRA loading (K vs sync)
//! katz bench lora-cache   lora.rs         LoRA cache loads per request under the Katz trace's
//!                                         statistics (crate::workload)
//! katz bench controlnet   controlnet.rs   per-step time with 0…3 ControlNets: serial, threads,
//!                                         service over Redis or CUDA IPC
//! katz bench pipeline     pipeline.rs     end-to-end and per-stage times of whole generations,
//!                                         against diffusers
//! katz bench service    service.rs      the whole service from outside: a trace mix through
//!                                         RabbitMQ into whatever consumes the queue (katz, or the
//!                                         diffusers worker); throughput, latency percentiles
//! katz bench vae        vae.rs          the VAE decoder alone (whole or tiled), its image as .npy
//!                         stats.rs        medians, seeded values, the CPU's name
//! ```
//!
//! Each prints a table and, with `--out`, writes its numbers as JSON (docs/bench/).

mod controlnet;
mod lora;
mod lora_merge;
mod lora_merge_gpu;
mod pipeline;
mod service;
mod stats;
mod vae;

use clap::{Args, Subcommand};

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub bench: Bench,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Bench {
    /// Time merging a LoRA set into the weights it targets, on the CPU or one GPU.
    LoraMerge(lora_merge::LoraMergeArgs),
    /// Image quality of asynchronous LoRA loading: async at bound K vs sync (relative difference, SSIM).
    LoraBound(lora::LoraBoundArgs),
    /// LoRA cache loads per request under the Katz trace's statistics (LRU, LFU, 1…N entries).
    LoraCache(lora::LoraCacheArgs),
    /// Per-step time with 0…3 ControlNets: in-process serial, parallel threads, service over Redis.
    Controlnet(controlnet::ControlNetBenchArgs),
    /// End-to-end and per-stage times of whole generations (0C/0L, 1C/1L, 3C/2L) on one bundle,
    /// with a diffusers baseline from the same sitting.
    Pipeline(pipeline::PipelineBenchArgs),
    /// The service under a trace mix: jobs/s at saturation (or at --rate), latency p50/p90/p99,
    /// per job class; against any worker that consumes the queue; ratios against a --baseline run.
    Service(service::ServiceBenchArgs),
    /// The VAE decoder alone, as the pipeline decodes (whole, or tiled above the VAE's tile size);
    /// median ms, and the image as .npy for tools/vae_check.py.
    Vae(vae::VaeBenchArgs),
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.bench {
        Bench::LoraMerge(a) => lora_merge::lora_merge(a),
        Bench::LoraBound(a) => lora::lora_bound(a),
        Bench::LoraCache(a) => lora::lora_cache(a),
        Bench::Controlnet(a) => controlnet::run(a),
        Bench::Pipeline(a) => pipeline::run(a),
        Bench::Service(a) => service::run(a),
        Bench::Vae(a) => vae::run(a),
    }
}
