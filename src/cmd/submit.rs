//! `katz submit`: publishes a job; with `--wait` follows its progress in Redis and writes the image.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use katz_actors::protocol::{
    image_key, job_key, jobs_queue, now_ms, valid_id, ControlNetJob, ImageRef, Job, LoraJob, Seed, Status,
    MAX_RESULT_TTL_S,
};
use katz_actors::topology;
use redis::AsyncCommands;

use super::generate::{parse_size, ControlNetSpec, ControlPrepArgs, LoraSpec};
use super::{block_on, AmqpArgs, RedisArgs};

#[derive(Args, Debug, Clone)]
pub struct SubmitArgs {
    #[arg(long)]
    pub prompt: String,
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Base model name (routing key of its queue).
    #[arg(long, env = "KATZ_BASE", default_value = "tiny-sdxl")]
    pub base: String,
    /// WIDTHxHEIGHT, multiples of 8.
    #[arg(long, value_parser = parse_size, default_value = "128x128")]
    pub size: (usize, usize),
    #[arg(long, default_value_t = 20)]
    pub steps: u32,
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f32,
    /// The noise seed; -1: the worker draws one and records it (printed with --wait).
    #[arg(long, default_value = "0", allow_hyphen_values = true)]
    pub seed: Seed,
    #[arg(long, default_value = "euler")]
    pub scheduler: String,
    #[arg(long)]
    pub karras: bool,
    /// NAME=IMAGE[:SCALE[:START:END]]: a ControlNet model the worker hosts, and a local PNG,
    /// JPEG or WebP of any size.
    #[arg(long = "controlnet")]
    pub controlnets: Vec<ControlNetSpec>,
    #[command(flatten)]
    pub control_prep: ControlPrepArgs,
    /// Upload conditioning images to Redis and send their keys instead of the bytes.
    #[arg(long)]
    pub images_via_redis: bool,
    /// NAME[:SCALE]: a LoRA in the worker's store.
    #[arg(long = "lora")]
    pub loras: Vec<LoraSpec>,
    /// Skip the parts of the LoRA files the base bundle cannot take (text-encoder parts on a
    /// bundle whose text encoders take no weights, convolution parts on one whose convolutions
    /// take none) instead of failing; the job's record names them (`lora_skipped`).
    #[arg(long)]
    pub unet_only: bool,
    /// 0 (lowest) to 10.
    #[arg(long, default_value_t = 0)]
    pub priority: u8,
    /// Seconds from now after which the job must not start.
    #[arg(long)]
    pub deadline_s: Option<u64>,
    /// Seconds the status and image stay in Redis.
    #[arg(long, default_value_t = 86_400)]
    pub ttl_s: u64,
    /// Job id [default: generated].
    #[arg(long)]
    pub id: Option<String>,
    /// Queue [default: katz.jobs.<base>].
    #[arg(long, env = "KATZ_QUEUE")]
    pub queue: Option<String>,
    /// Follow the job until it ends.
    #[arg(long)]
    pub wait: bool,
    /// With --wait: where to write the PNG.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// With --wait: give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout_s: u64,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
}

fn new_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("job-{:x}-{:x}", nanos, std::process::id())
}

pub fn run(a: SubmitArgs) -> anyhow::Result<()> {
    if a.output.is_some() && !a.wait {
        bail!("--output needs --wait");
    }
    block_on(submit(a))
}

async fn submit(a: SubmitArgs) -> anyhow::Result<()> {
    let id = a.id.clone().unwrap_or_else(new_id);
    // checked before anything is written: a worker would write no record for a bad id
    if !valid_id(&id) {
        bail!("job id `{id}` is not 1-128 characters of [A-Za-z0-9_.-] (docs/protocol.md)");
    }
    if !(1..=MAX_RESULT_TTL_S).contains(&a.ttl_s) {
        bail!(
            "--ttl-s {} is out of range: 1 to {MAX_RESULT_TTL_S} (365 days)",
            a.ttl_s
        );
    }
    let mut redis = a.redis.connect().await?;
    let mut job = Job::new(&id, &a.base, &a.prompt);
    job.negative_prompt = a.negative_prompt.clone();
    job.width = a.size.0 as u32;
    job.height = a.size.1 as u32;
    job.steps = a.steps;
    job.guidance = a.guidance;
    job.seed = a.seed;
    job.scheduler = a.scheduler.clone();
    job.karras = a.karras;
    job.priority = a.priority;
    job.result_ttl_s = a.ttl_s;
    job.deadline_ms = a.deadline_s.map(|s| now_ms() + s * 1000);
    job.unet_only = a.unet_only;
    let mut images = Vec::with_capacity(a.controlnets.len());
    for (i, c) in a.controlnets.iter().enumerate() {
        let bytes = std::fs::read(&c.image).with_context(|| format!("reading {}", c.image.display()))?;
        images.push(bytes.clone());
        let image = if a.images_via_redis {
            let key = format!("katz:upload:{id}:{i}");
            let _: () = redis.set_ex(&key, bytes, a.ttl_s).await?;
            ImageRef::RedisKey(key)
        } else {
            ImageRef::Inline(bytes)
        };
        let model = c.bundle.to_string_lossy().into_owned();
        let prep = a.control_prep.get(i);
        job.controlnets.push(ControlNetJob {
            model,
            image,
            resize: prep.resize,
            canny: prep.canny,
            scale: c.scale,
            start: c.start,
            end: c.end,
        });
    }
    for l in &a.loras {
        job.loras.push(LoraJob {
            name: l.file.to_string_lossy().into_owned(),
            scale: l.scale,
        });
    }
    // the worker's own check, as far as a producer can make it (any base and ControlNet name)
    katz_actors::pipeline::Catalogue::producer(&job, &katz_actors::protocol::Limits::default())
        .request(&job, &images)?;

    if !reserve_record(&mut redis, &job, &[], a.ttl_s).await? {
        bail!("job id `{id}` is already in use (katz status {id})");
    }

    let queue = a.queue.clone().unwrap_or_else(|| jobs_queue(&a.base));
    let conn = topology::connect(&a.amqp.amqp, "katz-submit")
        .await
        .with_context(|| format!("connecting to {}", katz_actors::redact::url(&a.amqp.amqp)))?;
    let channel = conn.create_channel().await?;
    topology::declare(&channel, &queue).await?;
    topology::publish(&channel, &queue, &job.encode()?, job.priority, &id).await?;
    let _ = conn.close(200, "submitted".into()).await;
    println!("{id}");
    if !a.wait {
        return Ok(());
    }
    follow(&mut redis, &id, &a).await
}

async fn follow(
    redis: &mut redis::aio::MultiplexedConnection,
    id: &str,
    a: &SubmitArgs,
) -> anyhow::Result<()> {
    let bar = ProgressBar::new(a.steps as u64);
    bar.set_style(ProgressStyle::with_template("{msg:>9} [{bar:32}] {pos}/{len}")?.progress_chars("=> "));
    let started = Instant::now();
    loop {
        let rec: HashMap<String, String> = redis.hgetall(job_key(id)).await?;
        let status = rec.get("status").and_then(|s| Status::parse(s));
        if let Some(step) = rec.get("step").and_then(|s| s.parse().ok()) {
            bar.set_position(step);
        }
        bar.set_message(status.map(|s| s.as_str()).unwrap_or("?").to_string());
        match status {
            Some(Status::Done) => {
                bar.finish_and_clear();
                let png: Vec<u8> = redis.get(image_key(id)).await?;
                if let Some(out) = &a.output {
                    std::fs::write(out, &png).with_context(|| format!("writing {}", out.display()))?;
                    println!("wrote {} ({} bytes)", out.display(), png.len());
                }
                let f = |k: &str| rec.get(k).cloned().unwrap_or_default();
                println!(
                    "done by {} in {} ms (pipeline {} ms, queue wait {} ms), seed {}",
                    f("worker"),
                    f("service_ms"),
                    f("pipeline_ms"),
                    f("queue_wait_ms"),
                    f("seed")
                );
                for k in ["prompt_truncated", "negative_prompt_truncated"] {
                    if let Some(t) = rec.get(k) {
                        eprintln!("warning: {k} {t}: the tokens past `kept` were cut off");
                    }
                }
                return Ok(());
            }
            Some(Status::Failed) => {
                bar.finish_and_clear();
                bail!(
                    "job {id} failed: {}",
                    rec.get("error").cloned().unwrap_or_default()
                );
            }
            Some(Status::Cancelled) => {
                bar.finish_and_clear();
                bail!("job {id} was cancelled");
            }
            _ => {}
        }
        if started.elapsed() > Duration::from_secs(a.timeout_s) {
            bail!(
                "job {id} did not end within {} s (status {:?}); it is still queued or running",
                a.timeout_s,
                status
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Makes a job's record before it is published: status `queued` first (only if the id is new:
/// false when it is taken), so a reader never sees a published job without a record; then its
/// digest, submission time and `extra` fields, and its TTL. `katz submit` and `katz trace replay`.
pub async fn reserve_record(
    redis: &mut redis::aio::MultiplexedConnection,
    job: &Job,
    extra: &[(&str, String)],
    ttl_s: u64,
) -> anyhow::Result<bool> {
    let key = job_key(&job.id);
    let created: bool = redis.hset_nx(&key, "status", Status::Queued.as_str()).await?;
    if !created {
        return Ok(false);
    }
    let mut fields = vec![("digest", job.digest()?), ("submitted_ms", now_ms().to_string())];
    fields.extend(extra.iter().cloned());
    let _: () = redis.hset_multiple(&key, &fields).await?;
    let _: () = redis.expire(&key, ttl_s as i64).await?;
    Ok(true)
}
