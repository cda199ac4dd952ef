//! The base-model actor: owns one `katz_onnx::pipeline::Pipeline` (sessions of the base model
//! and its ControlNets) on a thread of its own — a `SyncArbiter` thread, never the event loop.
//!
//! ```text
//! JobConsumer ──RunJob{req: ValidRequest, loras, progress, cancel}──▶ PipelineActor (model thread)
//!      ▲                                                          │ Pipeline::run → encode PNG
//!      └──────────── JobOutput{png, timings} ◀────────────────────┘
//!                    StepDone ──▶ progress channel (forwarded to Redis by the consumer)
//!                    (+ every `preview_every` steps: the latents projected to an RGB preview)
//! ```
//!
//! The consumer makes the [`katz_onnx::request::ValidRequest`] with this worker's
//! [`Catalogue`] (catalogue.rs: base name, ControlNets by name, what the pipeline accepts)
//! before the job reaches the model thread; the actor only runs it. [`Models::placement`]
//! says where the pipeline's parts run.
//!
//! A job's LoRAs arrive as a [`katz_onnx::lora::PendingMerge`] from the LoraManager
//! ([`crate::lora`]); the pipeline switches them in at the job's bound step (0 in sync mode).

mod catalogue;
pub mod messages;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use katz_onnx::image::encode_png;
use katz_onnx::pipeline::{LoraPlan, Observer, Pipeline, RunOptions};
use katz_onnx::placement::Placement;
use katz_onnx::preview::Projection;
use katz_onnx::request::{ControlModel, ServiceId};
use katz_onnx::runtime::SessionOptions;
use katz_onnx::tensor::Tensor;
use katz_onnx::weights::Weights;

use crate::controlnet::{LocalMode, RemoteConfig, RemoteControlNets, RemoteModel, Router};
use tokio::sync::mpsc::UnboundedSender;

use crate::error::JobError;
pub use catalogue::Catalogue;
pub use messages::*;

/// The models one worker serves.
#[derive(Debug, Clone)]
pub struct Models {
    pub base: PathBuf,
    pub controlnets: Vec<PathBuf>,
    /// The LoRA store, caches and switching policy.
    pub lora: crate::lora::LoraConfig,
    pub session: SessionOptions,
    /// How the ControlNets hosted here run (serial, or parallel threads overlapping the UNet).
    pub controlnet_mode: LocalMode,
    /// ControlNet models served by `katz controlnet-worker`s (sessions over RabbitMQ + Redis).
    pub controlnet_services: Vec<RemoteModel>,
    /// How to reach them (needed when `controlnet_services` is not empty).
    pub remote: Option<RemoteConfig>,
    /// Where the base, the conditional guidance half and each hosted ControlNet run.
    pub placement: Placement,
    /// Run every shape bucket once at load (`Pipeline::warm_up`), before the worker takes jobs.
    pub warm_up: bool,
    /// A preview of the running job after every this many steps (0: none); see
    /// [`katz_onnx::preview`].
    pub preview_every: u32,
}

impl Models {
    /// The base bundle with local ControlNets and a LoRA store: the embedded demo's shape.
    pub fn local(
        base: PathBuf,
        controlnets: Vec<PathBuf>,
        lora: crate::lora::LoraConfig,
        session: SessionOptions,
    ) -> Self {
        Models {
            base,
            controlnets,
            lora,
            controlnet_mode: LocalMode::default(),
            controlnet_services: Vec::new(),
            remote: None,
            placement: Placement::on(session.device),
            warm_up: false,
            preview_every: 0,
            session,
        }
    }
}

/// The pipeline actor of one model thread (a `SyncArbiter` thread). It holds the pipeline that
/// was preloaded for its thread; a thread that found none (the arbiter asked for more actors
/// than were loaded) answers every job with a requeue instead of panicking.
pub struct PipelineActor(Option<LoadedPipeline>);

impl PipelineActor {
    /// The actor of a model thread that loaded `p`.
    pub fn new(p: LoadedPipeline) -> Self {
        PipelineActor(Some(p))
    }

    /// The actor of a model thread without a pipeline (its load failed): it requeues every job.
    pub fn empty() -> Self {
        PipelineActor(None)
    }

    /// Takes one preloaded pipeline from `pool` for a model thread (the `SyncArbiter` factory).
    pub fn from_pool(pool: &std::sync::Mutex<Vec<LoadedPipeline>>) -> Self {
        PipelineActor(pool.lock().ok().and_then(|mut p| p.pop()))
    }

    /// The tokio runtime that remote ControlNet sessions publish through.
    pub fn with_runtime(self, rt: tokio::runtime::Handle) -> Self {
        PipelineActor(self.0.map(|p| p.with_runtime(rt)))
    }
}

/// A base pipeline and its ControlNets, loaded for one model thread.
pub struct LoadedPipeline {
    pipe: Pipeline,
    /// ControlNet names → where they run (hosted here, or served by ControlNet workers).
    controlnets: BTreeMap<String, ControlModel>,
    mode: LocalMode,
    remote_names: Vec<RemoteModel>,
    remote_cfg: Option<RemoteConfig>,
    /// Made on the first job (it needs the worker's tokio runtime).
    remote: Option<RemoteControlNets>,
    rt: Option<tokio::runtime::Handle>,
    /// Step previews: every how many steps, and the bundle's projection.
    preview: Option<Previews>,
}

/// A job's previews: after step `k` (1-based) with `k % every == 0`, but not after the last.
#[derive(Debug, Clone)]
struct Previews {
    every: u32,
    projection: Projection,
}

impl Previews {
    /// Whether the step `step` (0-based) of `total` gets a preview.
    fn due(&self, step: usize, total: usize) -> bool {
        let k = step + 1;
        k < total && k.is_multiple_of(self.every as usize)
    }
}

impl LoadedPipeline {
    /// Loads the base bundle and every ControlNet bundle where the placement puts them (errors
    /// name the bundle), and warms the pipeline up when `models.warm_up`. With CUDA graphs, call
    /// it on the thread that will run the jobs.
    pub fn load(models: &Models, shared: Option<Arc<Weights>>) -> katz_onnx::Result<Self> {
        let mut pipe = Pipeline::load_sharing(&models.base, models.session.clone(), shared)?;
        let ids = pipe.place(&models.placement, &models.controlnets)?;
        if models.warm_up {
            let t = pipe.warm_up()?;
            tracing::info!(
                ms = t.as_millis() as u64,
                "warmed up: every shape bucket ran once"
            );
        }
        let mut controlnets = BTreeMap::new();
        for (dir, id) in models.controlnets.iter().zip(ids) {
            controlnets.insert(pipe_controlnet_name(dir)?, ControlModel::Loaded(id));
        }
        for (i, m) in models.controlnet_services.iter().enumerate() {
            controlnets
                .entry(m.name.clone())
                .or_insert(ControlModel::Served(ServiceId(i)));
        }
        if !models.controlnet_services.is_empty() && models.remote.is_none() {
            return Err(katz_onnx::Error::ControlNet(
                "ControlNet services are named but no RabbitMQ/Redis to reach them".into(),
            ));
        }
        let preview = match models.preview_every {
            0 => None,
            every => match Projection::for_bundle(&pipe.bundle.manifest) {
                Some(projection) => Some(Previews { every, projection }),
                None => {
                    // once per model thread, at load; the jobs run without previews
                    tracing::warn!(
                        bundle = %pipe.bundle.manifest.name,
                        latent_channels = pipe.bundle.manifest.latent_channels,
                        "no previews for this bundle: it has no preview_rgb and its latents are not SDXL's 4 channels"
                    );
                    None
                }
            },
        };
        Ok(LoadedPipeline {
            preview,
            pipe,
            controlnets,
            mode: models.controlnet_mode,
            remote_names: models.controlnet_services.clone(),
            remote_cfg: models.remote.clone(),
            remote: None,
            rt: None,
        })
    }

    /// The tokio runtime that remote ControlNet sessions publish through.
    pub fn with_runtime(mut self, rt: tokio::runtime::Handle) -> Self {
        self.rt = Some(rt);
        self
    }

    /// The pristine weights (shared with other pipeline threads and the LoraManager).
    pub fn shared_weights(&self) -> Arc<Weights> {
        self.pipe.shared_weights()
    }

    /// The base model's name: jobs must name it, and it names the queue.
    pub fn base_name(&self) -> &str {
        &self.pipe.bundle.manifest.name
    }

    /// What this pipeline serves and accepts, under the worker's `limits`: the consumer turns
    /// jobs into requests with it.
    pub fn catalogue(&self, limits: &crate::protocol::Limits) -> Catalogue {
        let mut accepts = self.pipe.accepts();
        accepts.limits = limits.request();
        accepts.served = self.remote_names.len();
        Catalogue {
            base: self.base_name().to_string(),
            controlnets: self.controlnets.clone(),
            accepts,
        }
    }
}

fn pipe_controlnet_name(dir: &Path) -> katz_onnx::Result<String> {
    Ok(katz_onnx::bundle::ControlNetBundle::open(dir)?.manifest.name)
}

impl Actor for PipelineActor {
    type Context = SyncContext<Self>;
}

/// Forwards steps (and their previews) to the consumer and stops the job when cancellation was
/// asked for.
struct JobObserver<'a> {
    tx: UnboundedSender<StepDone>,
    cancel: Arc<AtomicBool>,
    last: Instant,
    preview: Option<&'a Previews>,
    total: usize,
}

impl Observer for JobObserver<'_> {
    fn on_step(&mut self, step: usize, total: usize, latents: &Tensor) -> katz_onnx::Result<()> {
        let step_ms = self.last.elapsed().as_secs_f64() * 1e3;
        // a preview's time counts in the next step's
        self.last = Instant::now();
        // the projection is the only preview work on the model thread (the PNG is encoded by
        // the forwarder); a preview that cannot be made is left out, the job goes on
        let preview = match self.preview {
            Some(p) if p.due(step, total) && !latents.is_empty() => match p.projection.project(latents) {
                Ok(img) => Some(img),
                Err(e) => {
                    tracing::warn!(error = %e, step = step + 1, "no preview for this step");
                    None
                }
            },
            _ => None,
        };
        let _ = self.tx.send(StepDone {
            step: step as u32 + 1,
            total: total as u32,
            step_ms,
            preview,
        });
        if self.cancel.load(Ordering::Relaxed) && step + 1 < total {
            return Err(katz_onnx::Error::Cancelled { step: step + 1 });
        }
        Ok(())
    }

    fn wants_latents(&self, step: usize) -> bool {
        self.preview.is_some_and(|p| p.due(step, self.total))
    }
}

impl Handler<RunJob> for PipelineActor {
    type Result = Result<JobOutput, JobError>;

    fn handle(&mut self, m: RunJob, _: &mut SyncContext<Self>) -> Self::Result {
        match self.0.as_mut() {
            Some(p) => p.run(m),
            None => Err(JobError::Mailbox {
                actor: "pipeline actor",
                reason: crate::error::Unavailable::Unfit(
                    "this model thread holds no pipeline (more threads than preloaded pipelines)",
                ),
            }),
        }
    }
}

impl LoadedPipeline {
    /// Runs one job to its image.
    fn run(&mut self, m: RunJob) -> Result<JobOutput, JobError> {
        let _guard = m.span.enter();
        let req = m.req;
        let remote_needed = req
            .controlnets
            .iter()
            .any(|c| matches!(c.model, ControlModel::Served(_)));
        if remote_needed && self.remote.is_none() {
            let (cfg, rt) = match (&self.remote_cfg, &self.rt) {
                (Some(c), Some(rt)) => (c.clone(), rt.clone()),
                _ => {
                    return Err(JobError::Model(katz_onnx::Error::ControlNet(
                        "remote ControlNets need the worker's RabbitMQ and Redis".into(),
                    )))
                }
            };
            self.remote = Some(RemoteControlNets::new(cfg, self.remote_names.clone(), rt)?);
        }
        if let Some(r) = self.remote.as_mut() {
            r.for_job(&m.job_id);
        }
        let mut obs = JobObserver {
            tx: m.progress,
            cancel: m.cancel,
            last: Instant::now(),
            preview: self.preview.as_ref(),
            total: req.steps,
        };
        let mut lora = m.loras;
        let plan = match lora.as_mut() {
            None => LoraPlan::Sync,
            Some(l) => LoraPlan::Async {
                pending: &mut l.pending,
                bound: l.bound,
                timeout: l.timeout,
                early: l.early,
            },
        };
        let mut router = Router {
            inline: self.pipe.inline_controlnets(),
            threaded: self.pipe.threaded_controlnets(),
            mode: self.mode,
            remote: self.remote.as_mut(),
        };
        let mut opts = RunOptions::default().observer(&mut obs).lora(plan);
        if !req.controlnets.is_empty() {
            opts = opts.control(&mut router);
        }
        let out = self.pipe.run(&req, opts);
        let controlnet_retries = self.remote.as_ref().map(|r| r.retried()).unwrap_or(0);
        let out = out?;
        let png = encode_png(&out.image)?;
        tracing::debug!(ms = out.timings.total.as_secs_f64() * 1e3, "job generated");
        Ok(JobOutput {
            png,
            timings: out.timings,
            controlnet_retries,
            prompt_truncated: out.prompt_truncated,
            negative_truncated: out.negative_truncated,
        })
    }
}

/// A catalogue for the tiny base with no ControlNets (other modules' tests).
#[cfg(test)]
pub(crate) fn catalogue_for_tests() -> Catalogue {
    catalogue::tests::catalogue()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::Job;

    /// Previews after steps N, 2N, … (1-based), never after the last.
    #[test]
    fn previews_are_due_every_n_steps_but_not_after_the_last() {
        let p = Previews {
            every: 5,
            projection: Projection::sdxl(),
        };
        let due = |total| {
            (0..total)
                .filter(|&i| p.due(i, total))
                .map(|i| i + 1)
                .collect::<Vec<_>>()
        };
        assert_eq!(due(20), vec![5, 10, 15]);
        assert_eq!(due(21), vec![5, 10, 15, 20]);
        assert_eq!(due(4), Vec::<usize>::new());
        let every_step = Previews { every: 1, ..p };
        assert_eq!((0..3).filter(|&i| every_step.due(i, 3)).count(), 2);
    }

    /// A model thread that found no preloaded pipeline answers with a requeue, not a panic.
    #[test]
    fn a_thread_without_a_pipeline_requeues_the_job() {
        let sys = actix::System::new();
        let err = sys.block_on(async {
            let pool = std::sync::Mutex::new(Vec::new());
            let addr = SyncArbiter::start(1, move || PipelineActor::from_pool(&pool));
            let (progress, _rx) = tokio::sync::mpsc::unbounded_channel();
            let req = catalogue::tests::catalogue()
                .request(&Job::new("j1", "tiny-sdxl", "a red circle"), &[])
                .expect("a valid job");
            addr.send(RunJob {
                req,
                job_id: "j1".into(),
                loras: None,
                progress,
                cancel: Arc::new(AtomicBool::new(false)),
                span: tracing::Span::none(),
            })
            .await
            .expect("the mailbox answers")
            .expect_err("no pipeline, no image")
        });
        assert!(matches!(err, JobError::Mailbox { .. }), "{err}");
        assert_eq!(err.action(), crate::error::Action::Requeue);
    }
}
