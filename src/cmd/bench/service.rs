//! `katz bench service`: the whole service under a trace mix, measured from outside — whatever
//! consumes the queue (katz workers, or another system that reads katz's job message and writes
//! katz's Redis records, e.g. tools/diffusers_worker.py).
//!
//! ```text
//! trace (a `katz trace gen` file, or drawn here: --service --requests --seed)
//!   ─▶ LoRA files into --store ─▶ [--warmup N jobs, waited for, not counted]
//!   ─▶ a job per request (trace_jobs: PREFIX-i, queued record first)
//!   ─▶ RabbitMQ --queue: all at once (saturation) or at --rate (the trace's arrivals rescaled)
//!   ─▶ poll the records until every job is final (or --timeout-s)
//!   ─▶ report::summarize: throughput (done ÷ (last finished − first submitted)), latency
//!      (finished − submitted) p50/p90/p99, queue wait, service and pipeline time; failures by
//!      kind; the same per job class (0C/1L, 2C/1L, …)
//!   ─▶ table, --out JSON; --baseline JSON (another run, e.g. the diffusers worker's): ratios
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::cmd::report::{percentiles, read_ids, summarize, ConfigReport, Percentiles};
use crate::cmd::trace_jobs::{class, lora_names, write_loras, JobMix, Publisher};
use crate::cmd::{bundles_dir, write_json, AmqpArgs, RedisArgs};
use crate::workload::{self, Arrivals, TraceRequest, TraceSpec};

#[derive(Args, Debug, Clone)]
pub struct ServiceBenchArgs {
    /// The queue the workers under test consume.
    #[arg(long)]
    pub queue: String,
    /// A trace (`katz trace gen`); without one, a trace is drawn (--service, --requests, --seed).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Service of the drawn trace.
    #[arg(long, default_value = "B")]
    pub service: String,
    /// Requests: the drawn trace's size, or the first N of --trace [default: 16 / all].
    #[arg(long)]
    pub requests: Option<usize>,
    /// Seed of the drawn trace.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// The published statistics [default: tools/workload/katz-trace-stats.json]
    #[arg(long)]
    pub stats: Option<PathBuf>,
    /// Offered load in jobs/s (the trace's arrivals rescaled to this mean rate); without it every
    /// job is published at once: the workers run saturated and the throughput is their capacity.
    #[arg(long)]
    pub rate: Option<f64>,
    /// At most this many ControlNets per job (the trace's first ones): a mix every system under
    /// test can run.
    #[arg(long)]
    pub max_controlnets: Option<usize>,
    /// At most this many LoRAs per job.
    #[arg(long)]
    pub max_loras: Option<usize>,
    /// Base bundle: its name is the jobs' base, its weight map shapes the LoRA files
    /// [default: bundles/tiny-sdxl]
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Base model name the jobs ask for [default: the bundle's]
    #[arg(long)]
    pub base: Option<String>,
    /// ControlNet models the trace's ControlNets map onto (round robin by trace id)
    /// [default: tiny-sdxl-controlnet]
    #[arg(long, value_delimiter = ',')]
    pub controlnet_models: Vec<String>,
    /// Conditioning image of every ControlNet, of the jobs' size
    /// [default: bundles/examples/edges-128.png]
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// The workers' LoRA store (`--lora-dir`): a file per trace LoRA is written here if missing.
    #[arg(long)]
    pub store: Option<PathBuf>,
    #[arg(long, default_value_t = 8)]
    pub lora_rank: usize,
    #[arg(long, default_value_t = 20)]
    pub steps: u32,
    #[arg(long, default_value = "128x128", value_parser = crate::cmd::generate::parse_size)]
    pub size: (usize, usize),
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f32,
    /// Job ids are PREFIX-<index> [default: bench-<unix ms>]
    #[arg(long, value_parser = crate::cmd::id_prefix)]
    pub id_prefix: Option<String>,
    /// The system under test, as the table and JSON name it.
    #[arg(long, default_value = "katz")]
    pub label: String,
    /// Warm-up jobs run (and waited for) before the measured ones, not counted: copies of the
    /// trace's first N requests, with LoRAs of their own (`warm-<name>`) so that the measured
    /// jobs find no LoRA cached by them. A worker's first jobs pay one-time costs (kernel
    /// selection, lazy allocations) that a long-running service does not.
    #[arg(long, default_value_t = 0)]
    pub warmup: usize,
    /// Give up waiting this long after the last publish; unfinished jobs are reported as such.
    #[arg(long, default_value_t = 1800)]
    pub timeout_s: u64,
    /// Another run's JSON (e.g. the diffusers worker's): print this run's ratios against it.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
}

/// The figures of one job class.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassFigures {
    pub jobs: usize,
    pub done: usize,
    pub failed: usize,
    pub latency_ms: Percentiles,
    pub service_ms: Percentiles,
    pub pipeline_ms: Percentiles,
}

/// What `--out` writes (and `--baseline` reads).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceBench {
    pub label: String,
    pub queue: String,
    pub id_prefix: String,
    /// `saturation` or `rate`.
    pub mode: String,
    pub offered_rate: Option<f64>,
    pub trace: String,
    pub size: (usize, usize),
    pub steps: u32,
    pub guidance: f32,
    pub workers: Vec<String>,
    pub jobs: usize,
    pub done: usize,
    pub failed: usize,
    pub unfinished: usize,
    /// Done jobs ÷ (last finished − first submitted).
    pub throughput_per_s: f64,
    pub offered_per_s: f64,
    /// From the first submission to the last job's end.
    pub span_s: f64,
    pub latency_ms: Percentiles,
    pub queue_wait_ms: Percentiles,
    pub service_ms: Percentiles,
    pub pipeline_ms: Percentiles,
    pub lora_loads_per_request: f64,
    /// Failed jobs by `error_kind`.
    pub errors: BTreeMap<String, usize>,
    pub classes: BTreeMap<String, ClassFigures>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vs_baseline: Option<Ratios>,
}

/// This run against a baseline run: > 1 means this one has more of it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ratios {
    pub baseline: String,
    pub baseline_label: String,
    /// This throughput ÷ the baseline's.
    pub throughput: f64,
    /// The baseline's latency ÷ this one's (> 1: this run is faster).
    pub latency_p50_speedup: f64,
    pub latency_p99_speedup: f64,
    /// Per class: the baseline's service time p50 ÷ this one's.
    pub service_p50_speedup_by_class: BTreeMap<String, f64>,
}

fn num(r: &HashMap<String, String>, k: &str) -> Option<f64> {
    r.get(k).and_then(|v| v.parse::<f64>().ok())
}

fn final_status(r: &HashMap<String, String>) -> bool {
    matches!(
        r.get("status").map(String::as_str),
        Some("done") | Some("failed") | Some("cancelled")
    )
}

/// The request's adapters, capped.
fn capped(mut r: TraceRequest, cn: Option<usize>, lo: Option<usize>) -> TraceRequest {
    if let Some(n) = cn {
        r.controlnets.truncate(n);
    }
    if let Some(n) = lo {
        r.loras.truncate(n);
    }
    r
}

/// Publish offsets (s from the start) of each request: all 0 (saturation), or the trace's
/// arrivals rescaled to a mean of `rate`.
fn offsets(t: &[TraceRequest], rate: Option<f64>) -> Vec<f64> {
    let Some(rate) = rate else {
        return vec![0.0; t.len()];
    };
    let t0 = t.first().map(|r| r.timestamp).unwrap_or(0.0);
    let span = t.last().map(|r| r.timestamp).unwrap_or(0.0) - t0;
    // n requests over the span: n − 1 gaps at the trace's rate; rescaled to `rate`
    let scale = if span > 0.0 && t.len() > 1 {
        (t.len() - 1) as f64 / span / rate
    } else {
        0.0
    };
    t.iter()
        .enumerate()
        .map(|(i, r)| {
            if scale > 0.0 {
                (r.timestamp - t0) * scale
            } else {
                i as f64 / rate
            }
        })
        .collect()
}

/// Polls the jobs' statuses until all are final or `timeout_s` passed; returns how many are not.
async fn wait_final(
    redis: &mut redis::aio::MultiplexedConnection,
    ids: &[String],
    timeout_s: u64,
) -> anyhow::Result<usize> {
    let t0 = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.hget(katz_actors::protocol::job_key(id), "status");
        }
        let st: Vec<Option<String>> = pipe.query_async(redis).await?;
        let open = st
            .iter()
            .filter(|s| !matches!(s.as_deref(), Some("done") | Some("failed") | Some("cancelled")))
            .count();
        if open == 0 {
            return Ok(0);
        }
        if t0.elapsed() > Duration::from_secs(timeout_s) {
            println!("  {open} job(s) not finished after {timeout_s} s: giving up");
            return Ok(open);
        }
        if last_report.elapsed() > Duration::from_secs(30) {
            println!("  {}/{} finished", ids.len() - open, ids.len());
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The figures of a run from its records (`classes[i]`: job i's class).
pub fn figures(
    records: &[HashMap<String, String>],
    classes: &[String],
) -> (
    ConfigReport,
    Percentiles,
    BTreeMap<String, usize>,
    BTreeMap<String, ClassFigures>,
) {
    let all = summarize("all", "", records);
    let done = |r: &&HashMap<String, String>| r.get("status").map(String::as_str) == Some("done");
    let mut pipe: Vec<f64> = records
        .iter()
        .filter(done)
        .filter_map(|r| num(r, "pipeline_ms"))
        .collect();
    let mut errors = BTreeMap::new();
    for r in records {
        if matches!(
            r.get("status").map(String::as_str),
            Some("failed") | Some("cancelled")
        ) {
            let kind = r.get("error_kind").cloned().unwrap_or_else(|| "unknown".into());
            *errors.entry(kind).or_default() += 1;
        }
    }
    let mut by: BTreeMap<String, Vec<HashMap<String, String>>> = BTreeMap::new();
    for (r, c) in records.iter().zip(classes) {
        by.entry(c.clone()).or_default().push(r.clone());
    }
    let per = by
        .into_iter()
        .map(|(c, rs)| {
            let s = summarize(&c, "", &rs);
            let mut p: Vec<f64> = rs
                .iter()
                .filter(done)
                .filter_map(|r| num(r, "pipeline_ms"))
                .collect();
            let f = ClassFigures {
                jobs: s.jobs,
                done: s.done,
                failed: s.failed,
                latency_ms: s.latency_ms,
                service_ms: s.service_ms,
                pipeline_ms: percentiles(&mut p),
            };
            (c, f)
        })
        .collect();
    (all, percentiles(&mut pipe), errors, per)
}

/// This run's ratios against a baseline run.
pub fn ratios(this: &ServiceBench, base: &ServiceBench, path: &str) -> Ratios {
    let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    Ratios {
        baseline: path.to_string(),
        baseline_label: base.label.clone(),
        throughput: div(this.throughput_per_s, base.throughput_per_s),
        latency_p50_speedup: div(base.latency_ms.p50, this.latency_ms.p50),
        latency_p99_speedup: div(base.latency_ms.p99, this.latency_ms.p99),
        service_p50_speedup_by_class: this
            .classes
            .iter()
            .filter_map(|(c, f)| {
                let b = base.classes.get(c)?;
                (f.done > 0 && b.done > 0).then(|| (c.clone(), div(b.service_ms.p50, f.service_ms.p50)))
            })
            .collect(),
    }
}

pub fn run(a: ServiceBenchArgs) -> anyhow::Result<()> {
    if let Some(r) = a.rate {
        if !(r > 0.0 && r.is_finite()) {
            bail!("--rate must be > 0");
        }
    }
    let baseline = match &a.baseline {
        Some(p) => {
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let b: ServiceBench = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a `katz bench service` JSON", p.display()))?;
            Some((p.display().to_string(), b))
        }
        None => None,
    };
    // the trace
    let (trace, trace_name) = match &a.trace {
        Some(p) => {
            let mut t = workload::read(p)?;
            if let Some(n) = a.requests {
                t.truncate(n);
            }
            (t, p.display().to_string())
        }
        None => {
            let stats = match &a.stats {
                Some(p) => p.clone(),
                None => crate::cmd::trace::default_stats()?,
            };
            let spec = TraceSpec {
                service: a.service.clone(),
                requests: a.requests.unwrap_or(16),
                rate: a.rate.unwrap_or(1.0),
                arrivals: Arrivals::Poisson,
                instances: 1,
                seed: a.seed,
                zipf_s: 1.36,
                drift: 0.0,
                controlnet_zipf_s: 1.0,
                base_model_id: "sdxl-base".into(),
            };
            let t = workload::generate(&stats, &spec)?;
            (
                t,
                format!(
                    "service {} ({} requests, seed {})",
                    a.service, spec.requests, a.seed
                ),
            )
        }
    };
    if trace.is_empty() {
        bail!("the trace has no request");
    }
    let trace: Vec<TraceRequest> = trace
        .into_iter()
        .map(|r| capped(r, a.max_controlnets, a.max_loras))
        .collect();
    let classes: Vec<String> = trace
        .iter()
        .map(|r| class(r.controlnets.len(), r.loras.len()))
        .collect();

    // the jobs
    let bundles = bundles_dir()?;
    let bundle_dir = a.bundle.clone().unwrap_or_else(|| bundles.join("tiny-sdxl"));
    let bundle = katz_onnx::bundle::BaseBundle::open(&bundle_dir)
        .with_context(|| format!("opening {}", bundle_dir.display()))?;
    let image_path = a
        .image
        .clone()
        .unwrap_or_else(|| bundles.join("examples/edges-128.png"));
    let mix = JobMix {
        base: a.base.clone().unwrap_or_else(|| bundle.manifest.name.clone()),
        models: if a.controlnet_models.is_empty() {
            vec!["tiny-sdxl-controlnet".into()]
        } else {
            a.controlnet_models.clone()
        },
        image: if trace.iter().any(|r| !r.controlnets.is_empty()) {
            std::fs::read(&image_path).with_context(|| format!("reading {}", image_path.display()))?
        } else {
            Vec::new()
        },
        steps: a.steps,
        size: a.size,
        guidance: a.guidance,
    };
    let warm: Vec<TraceRequest> = trace
        .iter()
        .take(a.warmup)
        .cloned()
        .map(|mut r| {
            r.loras = r.loras.iter().map(|l| format!("warm-{l}")).collect();
            r
        })
        .collect();
    let names: Vec<&str> = {
        let mut v = lora_names(&trace);
        v.extend(lora_names(&warm));
        v
    };
    if !names.is_empty() {
        let Some(store) = &a.store else {
            bail!("the trace has LoRAs: give --store (the workers' --lora-dir)");
        };
        let made = write_loras(store, &names, &bundle.manifest.weights.map, a.lora_rank)?;
        println!(
            "katz bench service: {} LoRA files in {} ({made} written, rank {})",
            names.len(),
            store.display(),
            a.lora_rank
        );
    }
    let prefix = a
        .id_prefix
        .clone()
        .unwrap_or_else(|| format!("bench-{}", katz_actors::protocol::now_ms()));
    let ids: Vec<String> = (0..trace.len()).map(|i| format!("{prefix}-{i}")).collect();
    let at = offsets(&trace, a.rate);
    let mut mix_count: BTreeMap<&str, usize> = BTreeMap::new();
    for c in &classes {
        *mix_count.entry(c.as_str()).or_default() += 1;
    }
    println!(
        "katz bench service: {} jobs ({}) of {trace_name}, {}x{}, {} steps, {} → {}",
        trace.len(),
        mix_count
            .iter()
            .map(|(c, n)| format!("{n}× {c}"))
            .collect::<Vec<_>>()
            .join(", "),
        a.size.0,
        a.size.1,
        a.steps,
        match a.rate {
            Some(r) => format!("at {r} jobs/s"),
            None => "all at once".into(),
        },
        a.queue
    );

    let records = crate::cmd::block_on(async {
        let mut redis = a.redis.connect().await?;
        let mut publisher = Publisher::connect(&a.amqp.amqp, "katz-bench-service").await?;
        if !warm.is_empty() {
            let wprefix = format!("{prefix}-warm");
            let t0 = Instant::now();
            let mut wids = Vec::new();
            for (i, r) in warm.iter().enumerate() {
                let mut job = mix.job(&wprefix, i, r);
                wids.push(job.id.clone());
                publisher.publish(&mut redis, &a.queue, &mut job, &[]).await?;
            }
            let open = wait_final(&mut redis, &wids, a.timeout_s).await?;
            println!(
                "  {} warm-up job(s) in {:.1} s{}",
                wids.len(),
                t0.elapsed().as_secs_f64(),
                if open > 0 {
                    format!(", {open} unfinished")
                } else {
                    String::new()
                }
            );
        }
        let started = tokio::time::Instant::now();
        for (i, r) in trace.iter().enumerate() {
            tokio::time::sleep_until(started + Duration::from_secs_f64(at[i])).await;
            let mut job = mix.job(&prefix, i, r);
            publisher
                .publish(
                    &mut redis,
                    &a.queue,
                    &mut job,
                    &[("bench_class", classes[i].clone())],
                )
                .await?;
        }
        publisher.close().await;
        wait_final(&mut redis, &ids, a.timeout_s).await?;
        read_ids(&mut redis, &ids).await
    })?;

    let (all, pipeline_ms, errors, per_class) = figures(&records, &classes);
    let mut workers: Vec<String> = records.iter().filter_map(|r| r.get("worker").cloned()).collect();
    workers.sort();
    workers.dedup();
    let sub: Vec<f64> = records.iter().filter_map(|r| num(r, "submitted_ms")).collect();
    let fin: Vec<f64> = records
        .iter()
        .filter(|r| final_status(r))
        .filter_map(|r| num(r, "finished_ms"))
        .collect();
    let span_s = (fin.iter().copied().fold(f64::NEG_INFINITY, f64::max)
        - sub.iter().copied().fold(f64::INFINITY, f64::min))
    .max(0.0)
        / 1e3;
    let mut out = ServiceBench {
        label: a.label.clone(),
        queue: a.queue.clone(),
        id_prefix: prefix.clone(),
        mode: if a.rate.is_some() { "rate" } else { "saturation" }.into(),
        offered_rate: a.rate,
        trace: trace_name,
        size: a.size,
        steps: a.steps,
        guidance: a.guidance,
        workers,
        jobs: all.jobs,
        done: all.done,
        failed: all.failed,
        unfinished: all.unfinished,
        throughput_per_s: all.throughput_per_s,
        offered_per_s: all.offered_per_s,
        span_s: if span_s.is_finite() { span_s } else { 0.0 },
        latency_ms: all.latency_ms,
        queue_wait_ms: all.queue_wait_ms,
        service_ms: all.service_ms,
        pipeline_ms,
        lora_loads_per_request: all.lora_loads_per_request,
        errors,
        classes: per_class,
        vs_baseline: None,
    };
    if let Some((path, b)) = &baseline {
        out.vs_baseline = Some(ratios(&out, b, path));
    }
    print!("{}", table(&out, baseline.as_ref().map(|b| &b.1)));
    if let Some(p) = &a.out {
        write_json(p, &serde_json::to_value(&out)?)?;
    }
    if out.done == 0 {
        bail!("no job finished (is a worker consuming {}?)", a.queue);
    }
    Ok(())
}

/// The printed table: the run, its classes, and the ratios against the baseline.
fn table(r: &ServiceBench, base: Option<&ServiceBench>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} on {} ({}; workers: {}): {} jobs, {} done, {} failed, {} unfinished in {:.1} s",
        r.label,
        r.queue,
        match r.offered_rate {
            Some(x) => format!("offered {x} jobs/s"),
            None => "saturation".into(),
        },
        if r.workers.is_empty() {
            "none".into()
        } else {
            r.workers.join(", ")
        },
        r.jobs,
        r.done,
        r.failed,
        r.unfinished,
        r.span_s
    );
    let _ = writeln!(
        s,
        "  throughput {:.4} jobs/s; latency p50 {:.0} ms, p90 {:.0} ms, p99 {:.0} ms; queue wait p50 {:.0} ms, p90 {:.0} ms; service p50 {:.0} ms",
        r.throughput_per_s,
        r.latency_ms.p50,
        r.latency_ms.p90,
        r.latency_ms.p99,
        r.queue_wait_ms.p50,
        r.queue_wait_ms.p90,
        r.service_ms.p50
    );
    if !r.errors.is_empty() {
        let e: Vec<String> = r.errors.iter().map(|(k, n)| format!("{n}× {k}")).collect();
        let _ = writeln!(s, "  failures: {}", e.join(", "));
    }
    let _ = writeln!(
        s,
        "  {:<8}{:>6}{:>6}{:>14}{:>14}{:>14}{:>16}",
        "class", "jobs", "done", "latency p50", "latency p99", "service p50", "pipeline p50"
    );
    for (c, f) in &r.classes {
        let _ = writeln!(
            s,
            "  {c:<8}{:>6}{:>6}{:>11.0} ms{:>11.0} ms{:>11.0} ms{:>13.0} ms",
            f.jobs, f.done, f.latency_ms.p50, f.latency_ms.p99, f.service_ms.p50, f.pipeline_ms.p50
        );
    }
    if let (Some(v), Some(b)) = (&r.vs_baseline, base) {
        let _ = writeln!(
            s,
            "  against {} ({}: {:.4} jobs/s, p50 {:.0} ms, p99 {:.0} ms): throughput {:.2}×, latency p50 {:.2}× faster, p99 {:.2}× faster",
            v.baseline,
            b.label,
            b.throughput_per_s,
            b.latency_ms.p50,
            b.latency_ms.p99,
            v.throughput,
            v.latency_p50_speedup,
            v.latency_p99_speedup
        );
        if !v.service_p50_speedup_by_class.is_empty() {
            let c: Vec<String> = v
                .service_p50_speedup_by_class
                .iter()
                .map(|(k, x)| format!("{k} {x:.2}×"))
                .collect();
            let _ = writeln!(
                s,
                "  service time p50, baseline ÷ this, by class: {}",
                c.join(", ")
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(sub: u64, start: u64, fin: u64, status: &str) -> HashMap<String, String> {
        [
            ("status", status.to_string()),
            ("submitted_ms", sub.to_string()),
            ("started_ms", start.to_string()),
            ("finished_ms", fin.to_string()),
            ("queue_wait_ms", (start - sub).to_string()),
            ("service_ms", (fin - start).to_string()),
            ("pipeline_ms", (fin - start).to_string()),
            (
                "error_kind",
                if status == "failed" { "lora" } else { "" }.to_string(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }

    fn tr(t: f64) -> TraceRequest {
        TraceRequest {
            timestamp: t,
            ip: "a".into(),
            scene_id: "B".into(),
            base_model_id: "m".into(),
            controlnets: vec!["cn-1".into(), "cn-2".into(), "cn-3".into()],
            loras: vec!["l1".into(), "l2".into()],
        }
    }

    #[test]
    fn offsets_are_all_at_once_or_the_trace_rescaled() {
        let t = vec![tr(10.0), tr(12.0), tr(14.0)];
        assert_eq!(offsets(&t, None), vec![0.0; 3]);
        // 2 gaps over 4 s = 0.5/s; at 2/s the gaps shrink 4×
        let o = offsets(&t, Some(2.0));
        assert!((o[1] - 0.5).abs() < 1e-9 && (o[2] - 1.0).abs() < 1e-9, "{o:?}");
        let c = capped(tr(0.0), Some(2), Some(1));
        assert_eq!((c.controlnets.len(), c.loras.len()), (2, 1));
    }

    #[test]
    fn figures_split_by_class_and_ratios_compare_runs() {
        let rs = vec![
            rec(0, 0, 1000, "done"),
            rec(0, 1000, 3000, "done"),
            rec(0, 3000, 4000, "done"),
            rec(0, 4000, 4100, "failed"),
        ];
        let cls: Vec<String> = ["0C/1L", "1C/1L", "0C/1L", "1C/1L"].map(String::from).to_vec();
        let (all, pipe, errors, per) = figures(&rs, &cls);
        assert_eq!((all.jobs, all.done, all.failed), (4, 3, 1));
        assert!(
            (all.throughput_per_s - 0.75).abs() < 1e-9,
            "{}",
            all.throughput_per_s
        ); // 3 in 4 s
        assert_eq!(pipe.p50, 1000.0);
        assert_eq!(errors["lora"], 1);
        assert_eq!(
            (per["0C/1L"].done, per["1C/1L"].done, per["1C/1L"].failed),
            (2, 1, 1)
        );
        assert_eq!(per["1C/1L"].service_ms.p50, 2000.0);
        let mk = |tp: f64, p50: f64| ServiceBench {
            label: "x".into(),
            queue: "q".into(),
            id_prefix: "p".into(),
            mode: "saturation".into(),
            offered_rate: None,
            trace: "t".into(),
            size: (128, 128),
            steps: 4,
            guidance: 5.0,
            workers: vec![],
            jobs: 4,
            done: 3,
            failed: 1,
            unfinished: 0,
            throughput_per_s: tp,
            offered_per_s: 0.0,
            span_s: 4.0,
            latency_ms: Percentiles {
                p50,
                p99: 2.0 * p50,
                ..Default::default()
            },
            queue_wait_ms: Percentiles::default(),
            service_ms: Percentiles::default(),
            pipeline_ms: Percentiles::default(),
            lora_loads_per_request: 0.0,
            errors: BTreeMap::new(),
            classes: per.clone(),
            vs_baseline: None,
        };
        let (fast, slow) = (mk(2.0, 500.0), mk(1.0, 1500.0));
        let v = ratios(&fast, &slow, "b.json");
        assert!((v.throughput - 2.0).abs() < 1e-9);
        assert!((v.latency_p50_speedup - 3.0).abs() < 1e-9 && (v.latency_p99_speedup - 3.0).abs() < 1e-9);
        assert!((v.service_p50_speedup_by_class["0C/1L"] - 1.0).abs() < 1e-9);
        let json = serde_json::to_string(&fast).unwrap();
        let back: ServiceBench = serde_json::from_str(&json).unwrap();
        assert_eq!(back.classes.len(), 2);
        assert!(table(
            &ServiceBench {
                vs_baseline: Some(v),
                ..fast
            },
            Some(&slow)
        )
        .contains("throughput 2.00×"));
    }
}
