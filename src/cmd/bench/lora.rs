//! `katz bench lora-bound` and `katz bench lora-cache`: what asynchronous LoRA loading costs in
//! image quality, and how often a LoRA cache must load under the Katz trace's statistics.
//!
//! ```text
//! lora-bound:  for each seed: sync image (LoRAs merged before step 0) ─┐
//!              async images switching at K = 0, 5, 10, 20 of 50 ───────┴▶ relative difference, SSIM
//!              (and the LoRA-free image: how far the LoRAs move the picture at all)
//! lora-cache:  trace statistics ─▶ drawn workload (Zipf popularity) ─▶ Cache LRU | LFU, 1…N entries
//!              ─▶ loads per request (the paper: 0.54 LRU, 0.57 LFU, service B, 10 entries)
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use katz_actors::lora::Policy;
use katz_onnx::lora::PendingMerge;
use katz_onnx::pipeline::{LoraPlan, Pipeline, RunOptions};
use katz_onnx::quality::{rel_diff, ssim};
use katz_onnx::request::{LoraRequest, Request, ValidRequest};
use katz_onnx::scheduler::SchedulerKind;
use serde_json::json;

use crate::cmd::generate::LoraSpec;
use crate::cmd::write_json;
use crate::cmd::{bundles_dir, DeviceArgs};
use crate::workload;

#[derive(Args, Debug, Clone)]
pub struct LoraBoundArgs {
    /// Base bundle [default: bundles/tiny-sdxl]
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// LoRAs FILE[:SCALE] [default: bundles/loras/tiny-lora-a.safetensors:0.8]
    #[arg(long = "lora")]
    pub loras: Vec<LoraSpec>,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Bound steps K to compare with sync.
    #[arg(long, value_delimiter = ',', default_value = "0,5,10,20")]
    pub bounds: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    pub seeds: Vec<u64>,
    #[arg(
        long,
        default_value = "a red circle above a blue square on a white background"
    )]
    pub prompt: String,
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f32,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn lora_bound(a: LoraBoundArgs) -> anyhow::Result<()> {
    let bundles = bundles_dir()?;
    let bundle = a.bundle.clone().unwrap_or_else(|| bundles.join("tiny-sdxl"));
    let mut pipe = Pipeline::load(&bundle, a.device.session_options())
        .with_context(|| format!("loading {}", bundle.display()))?;
    let specs = if a.loras.is_empty() {
        vec![
            format!("{}:0.8", bundles.join("loras/tiny-lora-a.safetensors").display())
                .parse::<LoraSpec>()
                .map_err(anyhow::Error::msg)?,
        ]
    } else {
        a.loras.clone()
    };
    let mut loras = Vec::new();
    for s in &specs {
        loras.push((pipe.lora(&s.file)?, s.scale));
    }
    let accepts = pipe.accepts();
    let request = |seed: u64, with: bool| {
        ValidRequest::new(
            Request {
                prompt: a.prompt.clone(),
                negative_prompt: None,
                width: a.size,
                height: a.size,
                steps: a.steps,
                guidance: a.guidance,
                scheduler: SchedulerKind::Euler,
                karras: false,
                seed,
                controlnets: vec![],
                loras: if with {
                    loras
                        .iter()
                        .map(|(l, s)| LoraRequest::loaded(l.clone(), *s))
                        .collect()
                } else {
                    vec![]
                },
            },
            &accepts,
        )
    };
    println!(
        "katz bench lora-bound: {} · {} steps, {}², {} LoRA(s), seeds {:?}; async switches exactly at K",
        bundle.display(),
        a.steps,
        a.size,
        loras.len(),
        a.seeds
    );
    // per K: (rel diff, ssim) per seed
    let mut rows: Vec<(String, Vec<f64>, Vec<f64>)> = Vec::new();
    let mut per_seed = Vec::new();
    for &seed in &a.seeds {
        let (with, without) = (request(seed, true)?, request(seed, false)?);
        let sync = pipe.run(&with, RunOptions::default())?.image;
        let plain = pipe.run(&without, RunOptions::default())?.image;
        let mut seed_rows = vec![json!({
            "variant": "no LoRA",
            "rel_diff": rel_diff(&plain.data, &sync.data),
            "ssim": ssim(&plain, &sync)?,
        })];
        let mut push = |label: String, rd: f64, ss: f64| match rows.iter_mut().find(|r| r.0 == label) {
            Some(r) => {
                r.1.push(rd);
                r.2.push(ss);
            }
            None => rows.push((label, vec![rd], vec![ss])),
        };
        push(
            "no LoRA".into(),
            rel_diff(&plain.data, &sync.data),
            ssim(&plain, &sync)?,
        );
        for &k in &a.bounds {
            let mut pending = PendingMerge::spawn(pipe.shared_weights(), loras.clone());
            let plan = LoraPlan::Async {
                pending: &mut pending,
                bound: k,
                timeout: Duration::from_secs(600),
                early: false,
            };
            let out = pipe.run(&without, RunOptions::default().lora(plan))?;
            let (rd, ss) = (rel_diff(&out.image.data, &sync.data), ssim(&out.image, &sync)?);
            seed_rows.push(json!({"variant": format!("async K={k}"), "switch_step": out.timings.lora_switch_step, "rel_diff": rd, "ssim": ss}));
            push(format!("async K={k}"), rd, ss);
        }
        per_seed.push(json!({"seed": seed, "rows": seed_rows}));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!("  {:<14}{:>22}{:>16}", "vs sync", "relative difference", "SSIM");
    let mut summary = Vec::new();
    for (label, rd, ss) in &rows {
        let min_ssim = ss.iter().cloned().fold(f64::INFINITY, f64::min);
        println!(
            "  {label:<14}{:>22.3e}{:>16.4}   (min SSIM {min_ssim:.4})",
            mean(rd),
            mean(ss)
        );
        summary.push(
            json!({"variant": label, "rel_diff_mean": mean(rd), "ssim_mean": mean(ss), "ssim_min": min_ssim}),
        );
    }
    if let Some(out) = &a.out {
        let doc = json!({
            "bench": "lora-bound",
            "bundle": bundle.display().to_string(),
            "loras": specs.iter().map(|s| json!({"file": s.file.display().to_string(), "scale": s.scale})).collect::<Vec<_>>(),
            "steps": a.steps, "size": a.size, "guidance": a.guidance, "prompt": a.prompt,
            "device": format!("{:?}", a.device.device),
            "switch": "exactly at K",
            "summary": summary,
            "per_seed": per_seed,
        });
        write_json(out, &doc)?;
    }
    Ok(())
}

#[derive(Args, Debug, Clone)]
pub struct LoraCacheArgs {
    /// The published trace statistics [default: tools/workload/katz-trace-stats.json]
    #[arg(long)]
    pub stats: Option<PathBuf>,
    #[arg(long, default_value = "B")]
    pub service: String,
    #[arg(long, default_value_t = 50_000)]
    pub requests: usize,
    #[arg(long, default_value_t = 2025)]
    pub seed: u64,
    /// Zipf exponent of LoRA popularity; without it, fitted so LRU with 10 entries gives the
    /// paper's loads per request (a fit, not a validation: LFU is the check).
    #[arg(long)]
    pub zipf_s: Option<f64>,
    /// Popularity drift (new LoRAs replacing popular ones per request; 0: stationary popularity).
    #[arg(long, default_value_t = 0.0)]
    pub drift: f64,
    /// Fit both the Zipf exponent and the drift so LRU and LFU with 10 entries give the paper's
    /// figures (then nothing is left to check against the paper: a description, not a validation).
    #[arg(long, conflicts_with_all = ["zipf_s", "drift"])]
    pub fit_both: bool,
    /// Largest cache size (entries) to replay.
    #[arg(long, default_value_t = 10)]
    pub max_entries: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn lora_cache(a: LoraCacheArgs) -> anyhow::Result<()> {
    let path = match &a.stats {
        Some(p) => p.clone(),
        None => bundles_dir()?.join("../tools/workload/katz-trace-stats.json"),
    };
    let stats = workload::TraceStats::load(&path).with_context(|| format!("reading {}", path.display()))?;
    let svc = stats
        .service(&a.service)
        .with_context(|| format!("service {} in {}", a.service, path.display()))?;
    let target = svc.lora_cache_loads_per_request_10_entries;
    let mut drift = a.drift;
    let s = match (a.zipf_s, &target) {
        (Some(s), _) => s,
        (None, Some(_)) if a.fit_both => {
            let (s, d, _, _) = workload::calibrate2(&stats, &a.service, a.requests, a.seed)?;
            drift = d;
            s
        }
        (None, Some(t)) => {
            workload::calibrate_with_drift(
                &stats,
                &a.service,
                a.requests,
                a.seed,
                a.drift,
                t.lru,
                Policy::Lru,
            )?
            .0
        }
        (None, None) => anyhow::bail!(
            "service {} has no published cache result to fit; give --zipf-s",
            a.service
        ),
    };
    let spec = workload::WorkloadSpec {
        service: a.service.clone(),
        requests: a.requests,
        zipf_s: s,
        seed: a.seed,
        drift,
    };
    let reqs = workload::draw(&stats, &spec)?;
    let pop = workload::popularity(&reqs);
    println!(
        "katz bench lora-cache: service {}, {} requests drawn (seed {}), Zipf s = {s:.3}, drift {drift:.2e}{}",
        a.service,
        a.requests,
        a.seed,
        if a.fit_both { " (both fitted to LRU@10 and LFU@10)" } else if a.zipf_s.is_none() { " (s fitted to LRU@10)" } else { "" }
    );
    println!(
        "  popularity: top LoRA {:.1}% of calls, {:.2}% of LoRAs seen each under 1%, {} distinct seen",
        pop.max_share_of_one_lora * 100.0,
        pop.share_of_loras_under_1pct * 100.0,
        pop.distinct_loras_seen
    );
    println!("  {:>8}{:>16}{:>16}", "entries", "LRU loads/req", "LFU loads/req");
    let mut rows = Vec::new();
    for e in 1..=a.max_entries {
        let (l, f) = (
            workload::replay(&reqs, e, Policy::Lru),
            workload::replay(&reqs, e, Policy::Lfu),
        );
        println!(
            "  {e:>8}{:>16.3}{:>16.3}",
            l.loads_per_request, f.loads_per_request
        );
        rows.push(json!({"entries": e, "lru": l, "lfu": f}));
    }
    if let Some(t) = &target {
        println!("  paper (10 entries): LRU {:.2}, LFU {:.2}", t.lru, t.lfu);
    }
    if let Some(out) = &a.out {
        write_json(
            out,
            &json!({
                "bench": "lora-cache", "stats": path.display().to_string(), "service": a.service,
                "requests": a.requests, "seed": a.seed, "zipf_s": s, "drift": drift, "fitted": if a.fit_both { "s and drift" } else if a.zipf_s.is_none() { "s" } else { "none" },
                "popularity": pop, "paper_10_entries": target, "rows": rows,
            }),
        )?;
    }
    Ok(())
}
