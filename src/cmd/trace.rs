//! `katz trace`: request traces in the Katz authors' format (crate::workload).
//!
//! ```text
//! katz trace gen   --service B --requests N --rate R [--bursty F:ON:OFF] --instances K --out T.json
//!                  (drawn from the published statistics: no real trace is available here)
//! katz trace stats T.json          adapters per request, popularity, LoRAs seen per instance
//! katz trace cache T.json          loads per request of LoRA and ControlNet caches, LRU and LFU,
//!                                  1…10 entries, a cache per instance (katz's own cache)
//! katz trace replay T.json --store DIR --speed S
//!                                  writes a LoRA file per trace LoRA into DIR (seeded, rank R, for
//!                                  the bundle's weight map), then publishes a job per request at
//!                                  its time ÷ S to RabbitMQ (status `queued` in Redis first, as
//!                                  `katz submit` does); trace ControlNets map onto the worker's
//!                                  model(s), round robin by trace id
//! ```

use std::path::PathBuf;

use crate::workload::{self, Adapter, Arrivals, TraceSpec};
use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use katz_actors::lora::cache::Policy;
use serde_json::json;

use super::write_json;

#[derive(Args, Debug, Clone)]
pub struct TraceArgs {
    #[command(subcommand)]
    pub command: TraceCommand,
}

#[derive(Subcommand, Debug, Clone)]
pub enum TraceCommand {
    /// Draw a trace from the published statistics.
    Gen(GenArgs),
    /// Statistics of a trace.
    Stats(FileArgs),
    /// Loads per request of LoRA and ControlNet caches replayed over a trace.
    Cache(CacheArgs),
    /// Publish a trace's requests as jobs, time-scaled, with the LoRA files they need.
    Replay(ReplayArgs),
}

#[derive(Args, Debug, Clone)]
pub struct ReplayArgs {
    pub trace: PathBuf,
    /// LoRA store the workers read (`--lora-dir`): a file per trace LoRA is written here if missing.
    #[arg(long)]
    pub store: PathBuf,
    /// Time scale: 10 replays ten times faster than the trace's timestamps.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Base bundle (its weight map shapes the LoRA files) [default: bundles/tiny-sdxl]
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Base model name the jobs ask for [default: the bundle's]
    #[arg(long)]
    pub base: Option<String>,
    /// ControlNet models of the workers the trace's ControlNets map onto (round robin by id)
    /// [default: tiny-sdxl-controlnet]
    #[arg(long, value_delimiter = ',')]
    pub controlnet_models: Vec<String>,
    /// Conditioning image of every ControlNet [default: bundles/examples/edges-128.png]
    #[arg(long)]
    pub image: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    pub steps: u32,
    #[arg(long, default_value = "128x128", value_parser = super::generate::parse_size)]
    pub size: (usize, usize),
    /// Rank of the generated LoRA files.
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    /// Replay only the first N requests.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Job ids are PREFIX-<index>; the report reads them back by it.
    #[arg(long, default_value = "replay", value_parser = crate::cmd::id_prefix)]
    pub id_prefix: String,
    /// Queue [default: katz.jobs.<base>]
    #[arg(long)]
    pub queue: Option<String>,
    /// Each trace instance (`ip`) gets its own queue, QUEUE.<ip>: one worker per queue then
    /// serves one instance's requests with its own LoRA cache, as a serving node does.
    #[arg(long)]
    pub queue_per_instance: bool,
    #[command(flatten)]
    pub amqp: super::AmqpArgs,
    #[command(flatten)]
    pub redis: super::RedisArgs,
}

#[derive(Args, Debug, Clone)]
pub struct GenArgs {
    /// The published statistics [default: tools/workload/katz-trace-stats.json]
    #[arg(long)]
    pub stats: Option<PathBuf>,
    #[arg(long, default_value = "B")]
    pub service: String,
    #[arg(long, default_value_t = 10_000)]
    pub requests: usize,
    /// Mean requests per second.
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// On/off bursts: FACTOR:ON_S:OFF_S (bursts at FACTOR × the rate for ON_S seconds, then
    /// quiet for OFF_S, same mean); default Poisson arrivals.
    #[arg(long)]
    pub bursty: Option<String>,
    /// Serving instances (each request goes to one, uniformly).
    #[arg(long, default_value_t = 1)]
    pub instances: usize,
    #[arg(long, default_value_t = 2025)]
    pub seed: u64,
    /// Zipf exponent of LoRA popularity (1.36 fits service B's LRU 0.54 at 10 entries; see
    /// `katz bench lora-cache`).
    #[arg(long, default_value_t = 1.36)]
    pub zipf_s: f64,
    /// LoRA popularity drift (replacements per request; see docs/workload.md).
    #[arg(long, default_value_t = 0.0)]
    pub drift: f64,
    /// Zipf exponent of ControlNet popularity inside the top 5 (and the rest).
    #[arg(long, default_value_t = 1.0)]
    pub controlnet_zipf_s: f64,
    #[arg(long, default_value = "sdxl-base")]
    pub base_model: String,
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Args, Debug, Clone)]
pub struct FileArgs {
    /// A trace: a JSON list of {timestamp, ip, scene_id, base_model_id, controlnets, loras}.
    pub trace: PathBuf,
    /// Write the numbers as JSON too.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Args, Debug, Clone)]
pub struct CacheArgs {
    pub trace: PathBuf,
    /// Largest cache size (entries per instance).
    #[arg(long, default_value_t = 10)]
    pub max_entries: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn default_stats() -> anyhow::Result<PathBuf> {
    let root = super::bundles_dir()?.join("..");
    let p = root.join("tools/workload/katz-trace-stats.json");
    if p.exists() {
        Ok(p)
    } else {
        bail!("{} is missing: give --stats", p.display())
    }
}

pub fn run(a: TraceArgs) -> anyhow::Result<()> {
    match a.command {
        TraceCommand::Gen(g) => gen(g),
        TraceCommand::Stats(f) => stats(f),
        TraceCommand::Cache(c) => cache(c),
        TraceCommand::Replay(r) => super::block_on(replay(r)),
    }
}

fn arrivals(s: &Option<String>) -> anyhow::Result<Arrivals> {
    let Some(s) = s else {
        return Ok(Arrivals::Poisson);
    };
    let v: Vec<f64> = s
        .split(':')
        .map(|x| x.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--bursty {s}: FACTOR:ON_S:OFF_S, numbers"))?;
    match v[..] {
        [factor, on_s, off_s] if factor >= 1.0 && on_s > 0.0 && off_s > 0.0 => {
            Ok(Arrivals::Bursty { factor, on_s, off_s })
        }
        _ => bail!("--bursty {s}: FACTOR ≥ 1, ON_S > 0, OFF_S > 0, as FACTOR:ON_S:OFF_S"),
    }
}

fn gen(a: GenArgs) -> anyhow::Result<()> {
    let stats = match a.stats {
        Some(p) => p,
        None => default_stats()?,
    };
    let spec = TraceSpec {
        service: a.service.clone(),
        requests: a.requests,
        rate: a.rate,
        arrivals: arrivals(&a.bursty)?,
        instances: a.instances,
        seed: a.seed,
        zipf_s: a.zipf_s,
        drift: a.drift,
        controlnet_zipf_s: a.controlnet_zipf_s,
        base_model_id: a.base_model.clone(),
    };
    let t = workload::generate(&stats, &spec)?;
    workload::write(&a.out, &t)?;
    println!(
        "katz trace gen: {} requests of service {} over {:.0} s ({:?}, {} instance(s), seed {}) → {}",
        t.len(),
        a.service,
        t.last().map(|r| r.timestamp).unwrap_or(0.0),
        spec.arrivals,
        a.instances,
        a.seed,
        a.out.display()
    );
    Ok(())
}

fn read(p: &PathBuf) -> anyhow::Result<Vec<workload::TraceRequest>> {
    let t = workload::read(p)?;
    if t.is_empty() {
        bail!("{}: the trace has no request", p.display());
    }
    Ok(t)
}

fn stats(a: FileArgs) -> anyhow::Result<()> {
    let t = read(&a.trace)?;
    let r = workload::stats(&t);
    println!(
        "{}: {} requests over {:.0} s ({:.3}/s), {} instance(s)",
        a.trace.display(),
        r.requests,
        r.seconds,
        r.rate,
        r.instances
    );
    let fmt = |m: &std::collections::BTreeMap<usize, f64>| {
        m.iter()
            .map(|(k, v)| format!("{k}: {:.1}%", v * 100.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!("  ControlNets per request  {}", fmt(&r.controlnets_per_request));
    println!("  LoRAs per request        {}", fmt(&r.loras_per_request));
    let top = |k: usize| r.top_controlnet_share.get(&k).copied().unwrap_or(0.0) * 100.0;
    println!(
        "  ControlNets: {} distinct; the most called take {:.1}% of calls (top 1), {:.1}% (top 5), {:.1}% (top 8)",
        r.distinct_controlnets,
        top(1),
        top(5),
        top(8)
    );
    println!(
        "  LoRAs: {} distinct, the most called takes {:.1}%, {:.2}% of them each under 1% of calls",
        r.distinct_loras,
        r.top_lora_share * 100.0,
        r.share_of_loras_under_1pct * 100.0
    );
    for (ip, pts) in r.distinct_loras_over_time.iter().take(4) {
        let s: Vec<String> = pts.iter().map(|(n, d)| format!("{n}→{d}")).collect();
        println!("  LoRAs seen at {ip} (requests→distinct): {}", s.join(" "));
    }
    if r.distinct_loras_over_time.len() > 4 {
        println!(
            "  … and {} more instances (JSON)",
            r.distinct_loras_over_time.len() - 4
        );
    }
    if let Some(out) = &a.out {
        write_json(out, &serde_json::to_value(&r)?)?;
    }
    Ok(())
}

fn cache(a: CacheArgs) -> anyhow::Result<()> {
    let t = read(&a.trace)?;
    let instances = workload::stats(&t).instances;
    println!(
        "{}: {} requests, {instances} instance(s), a cache per instance; loads per request",
        a.trace.display(),
        t.len()
    );
    println!(
        "  {:>8}{:>12}{:>12}{:>16}{:>16}",
        "entries", "LoRA LRU", "LoRA LFU", "ControlNet LRU", "ControlNet LFU"
    );
    let mut rows = Vec::new();
    for e in 1..=a.max_entries.max(1) {
        let r = [
            workload::cache(&t, Adapter::Lora, e, Policy::Lru),
            workload::cache(&t, Adapter::Lora, e, Policy::Lfu),
            workload::cache(&t, Adapter::ControlNet, e, Policy::Lru),
            workload::cache(&t, Adapter::ControlNet, e, Policy::Lfu),
        ];
        println!(
            "  {e:>8}{:>12.3}{:>12.3}{:>16.3}{:>16.3}",
            r[0].loads_per_request, r[1].loads_per_request, r[2].loads_per_request, r[3].loads_per_request
        );
        rows.push(json!({"entries": e, "lora_lru": r[0], "lora_lfu": r[1], "controlnet_lru": r[2], "controlnet_lfu": r[3]}));
    }
    println!("  the paper (service B, 10 entries, its real trace): LoRA LRU 0.54, LFU 0.57");
    if let Some(out) = &a.out {
        write_json(
            out,
            &json!({"trace": a.trace.display().to_string(), "requests": t.len(), "instances": instances, "rows": rows}),
        )?;
    }
    Ok(())
}

async fn replay(a: ReplayArgs) -> anyhow::Result<()> {
    use super::trace_jobs::{lora_names, write_loras, JobMix, Publisher};
    use katz_actors::protocol::jobs_queue;

    if !(a.speed > 0.0 && a.speed.is_finite()) {
        bail!("--speed must be > 0");
    }
    let mut t = read(&a.trace)?;
    if let Some(n) = a.limit {
        t.truncate(n);
    }
    let bundles = super::bundles_dir()?;
    let bundle_dir = a.bundle.clone().unwrap_or_else(|| bundles.join("tiny-sdxl"));
    let bundle = katz_onnx::bundle::BaseBundle::open(&bundle_dir)
        .with_context(|| format!("opening {}", bundle_dir.display()))?;
    let base = a.base.clone().unwrap_or_else(|| bundle.manifest.name.clone());
    let models = if a.controlnet_models.is_empty() {
        vec!["tiny-sdxl-controlnet".to_string()]
    } else {
        a.controlnet_models.clone()
    };
    let image_path = a
        .image
        .clone()
        .unwrap_or_else(|| bundles.join("examples/edges-128.png"));
    let image = std::fs::read(&image_path).with_context(|| format!("reading {}", image_path.display()))?;
    let mix = JobMix {
        base: base.clone(),
        models,
        image,
        steps: a.steps,
        size: a.size,
        guidance: 5.0,
    };

    let names = lora_names(&t);
    let t0 = std::time::Instant::now();
    let made = write_loras(&a.store, &names, &bundle.manifest.weights.map, a.lora_rank)?;
    println!(
        "katz trace replay: {} LoRA files in {} ({made} written, rank {}, {:.1} s)",
        names.len(),
        a.store.display(),
        a.lora_rank,
        t0.elapsed().as_secs_f64()
    );

    let mut redis = a.redis.connect().await?;
    let queue = a.queue.clone().unwrap_or_else(|| jobs_queue(&base));
    let mut publisher = Publisher::connect(&a.amqp.amqp, "katz-trace-replay").await?;
    let start_ts = t.first().map(|r| r.timestamp).unwrap_or(0.0);
    let started = tokio::time::Instant::now();
    let mut worst_lag = 0.0f64;
    for (i, r) in t.iter().enumerate() {
        let due = started + std::time::Duration::from_secs_f64((r.timestamp - start_ts) / a.speed);
        tokio::time::sleep_until(due).await;
        worst_lag = worst_lag.max(due.elapsed().as_secs_f64());
        let mut job = mix.job(&a.id_prefix, i, r);
        let q = if a.queue_per_instance {
            format!("{queue}.{}", r.ip)
        } else {
            queue.clone()
        };
        let extra = [("trace_instance", r.ip.clone())];
        publisher.publish(&mut redis, &q, &mut job, &extra).await?;
        if (i + 1) % 100 == 0 {
            println!("  {} published", i + 1);
        }
    }
    let queues = publisher.queues().join(", ");
    let n_queues = publisher.queues().len();
    publisher.close().await;
    println!(
        "katz trace replay: {} jobs published to {} in {:.1} s (ids {}-0…{}; worst lag behind the schedule {:.0} ms)",
        t.len(),
        if a.queue_per_instance {
            format!("{n_queues} queues ({queues})")
        } else {
            queue.clone()
        },
        started.elapsed().as_secs_f64(),
        a.id_prefix,
        t.len().saturating_sub(1),
        worst_lag * 1e3
    );
    Ok(())
}
