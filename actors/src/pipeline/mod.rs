//! The base-model actor: owns one `katz_onnx::pipeline::Pipeline` (sessions of the base model
//! and its ControlNets) on a thread of its own — a `SyncArbiter` thread, never the event loop.
//!
//! ```text
//! JobConsumer ──RunJob{job, images, loras, progress, cancel}──▶ PipelineActor (model thread)
//!      ▲                                                     │ resolve base / ControlNets
//!      └──────────── JobOutput{png, timings} ◀───────────────┘ generate → encode PNG
//!                    StepDone ──▶ progress channel (forwarded to Redis by the consumer)
//! ```
//!
//! A job's LoRAs arrive as a [`katz_onnx::weights::PendingMerge`] from the LoraManager
//! ([`crate::lora`]); the pipeline switches them in at the job's bound step (0 in sync mode).

pub mod messages;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use katz_onnx::image::{decode_png, encode_png};
use katz_onnx::noise::SeededNoise;
use katz_onnx::pipeline::{ControlRequest, LoraPlan, Observer, Pipeline, Request};
use katz_onnx::runtime::SessionOptions;
use katz_onnx::scheduler::SchedulerKind;
use katz_onnx::tensor::Tensor;
use katz_onnx::weights::Weights;
use tokio::sync::mpsc::UnboundedSender;

use crate::error::JobError;
pub use messages::*;

/// The models one worker serves.
#[derive(Debug, Clone)]
pub struct Models {
    pub base: PathBuf,
    pub controlnets: Vec<PathBuf>,
    /// The LoRA store, caches and switching policy.
    pub lora: crate::lora::LoraConfig,
    pub session: SessionOptions,
}

pub struct PipelineActor {
    pipe: Pipeline,
    controlnets: HashMap<String, usize>,
}

impl PipelineActor {
    /// Loads the base bundle and every ControlNet bundle (errors name the bundle).
    pub fn load(models: &Models, shared: Option<Arc<Weights>>) -> katz_onnx::Result<Self> {
        let mut pipe = Pipeline::load_sharing(&models.base, models.session.clone(), shared)?;
        let mut controlnets = HashMap::new();
        for dir in &models.controlnets {
            let idx = pipe.controlnet(dir)?;
            let name = pipe_controlnet_name(dir)?;
            controlnets.insert(name, idx);
        }
        Ok(PipelineActor { pipe, controlnets })
    }

    /// The pristine weights (shared with other pipeline threads and the LoraManager).
    pub fn shared_weights(&self) -> Arc<Weights> {
        self.pipe.shared_weights()
    }

    /// The base model's name: jobs must name it, and it names the queue.
    pub fn base_name(&self) -> &str {
        &self.pipe.bundle.manifest.name
    }

    fn request(&self, job: &crate::protocol::Job, images: &[Vec<u8>]) -> Result<Request, JobError> {
        if job.base != self.base_name() {
            return Err(JobError::Invalid(format!(
                "unknown base model `{}` (this worker serves `{}`)",
                job.base,
                self.base_name()
            )));
        }
        let scheduler: SchedulerKind = job
            .scheduler
            .parse()
            .map_err(|e| JobError::Invalid(format!("{e}")))?;
        let mut controlnets = Vec::new();
        for (c, png) in job.controlnets.iter().zip(images) {
            let model = *self.controlnets.get(&c.model).ok_or_else(|| {
                let mut known: Vec<&String> = self.controlnets.keys().collect();
                known.sort();
                JobError::Invalid(format!(
                    "unknown ControlNet `{}` (this worker serves {known:?})",
                    c.model
                ))
            })?;
            let image = decode_png(png, Path::new(&format!("controlnet {} image", c.model)))?;
            controlnets.push(ControlRequest {
                model,
                image,
                scale: c.scale,
                start: c.start,
                end: c.end,
            });
        }
        Ok(Request {
            prompt: job.prompt.clone(),
            negative_prompt: job.negative_prompt.clone(),
            width: job.width as usize,
            height: job.height as usize,
            steps: job.steps as usize,
            guidance: job.guidance,
            scheduler,
            karras: job.karras,
            seed: job.seed,
            controlnets,
            loras: Vec::new(),
        })
    }
}

fn pipe_controlnet_name(dir: &Path) -> katz_onnx::Result<String> {
    Ok(katz_onnx::bundle::ControlNetBundle::open(dir)?.manifest.name)
}

impl Actor for PipelineActor {
    type Context = SyncContext<Self>;
}

/// Forwards steps to the consumer and stops the job when cancellation was asked for.
struct JobObserver {
    tx: UnboundedSender<StepDone>,
    cancel: Arc<AtomicBool>,
    last: Instant,
}

impl Observer for JobObserver {
    fn on_step(&mut self, step: usize, total: usize, _latents: &Tensor) -> katz_onnx::Result<()> {
        let step_ms = self.last.elapsed().as_secs_f64() * 1e3;
        self.last = Instant::now();
        let _ = self.tx.send(StepDone {
            step: step as u32 + 1,
            total: total as u32,
            step_ms,
        });
        if self.cancel.load(Ordering::Relaxed) && step + 1 < total {
            return Err(katz_onnx::Error::Cancelled { step: step + 1 });
        }
        Ok(())
    }
}

impl Handler<RunJob> for PipelineActor {
    type Result = Result<JobOutput, JobError>;

    fn handle(&mut self, m: RunJob, _: &mut SyncContext<Self>) -> Self::Result {
        let _guard = m.span.enter();
        let req = self.request(&m.job, &m.images)?;
        self.pipe.validate(&req)?;
        let mut obs = JobObserver {
            tx: m.progress,
            cancel: m.cancel,
            last: Instant::now(),
        };
        let mut noise = SeededNoise::new(req.seed);
        let out = match m.loras {
            None => self.pipe.generate(&req, &mut obs)?,
            Some(mut l) => self.pipe.generate_planned(
                &req,
                &mut noise,
                &mut obs,
                LoraPlan::Async {
                    pending: &mut l.pending,
                    bound: l.bound,
                    timeout: l.timeout,
                    early: l.early,
                },
            )?,
        };
        let png = encode_png(&out.image)?;
        tracing::debug!(ms = out.timings.total.as_secs_f64() * 1e3, "job generated");
        Ok(JobOutput {
            png,
            timings: out.timings,
        })
    }
}
