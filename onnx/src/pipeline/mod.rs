//! The SDXL text-to-image pipeline with ControlNets and LoRAs, in-process.
//!
//! Per step (diffusers' `StableDiffusionXL[ControlNet]Pipeline`, classifier-free guidance on):
//!
//! ```text
//! latent_in = [latents; latents] · input_scale(i)          t = timesteps[i]
//! emb, mid, skips  = unet_encoder(latent_in, t, embeds, bound weights)
//! for each ControlNet j active at step i (start ≤ i/n, (i+1)/n ≤ end):
//!     skips += scaleⱼ · downⱼ ;  mid += scaleⱼ · midⱼ
//! pred    = unet_decoder(emb, embeds, mid, skips, bound weights)
//! guided  = pred_uncond + g · (pred_cond − pred_uncond)
//! latents = scheduler.step(i, guided, latents)
//! ```
//!
//! LoRAs are merged (`W + Σ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ`) into a second weight set and bound instead of the
//! pristine weights; the pristine set is left as it was for the next job. The plan
//! ([`LoraPlan`], crate::lora::plan) says whether the merge happens before step 0 or while the
//! job denoises, switched in by a bound step.
//!
//! ## Layout
//! - `mod.rs`: [`Pipeline`], [`RunOptions`], [`Pipeline::run`] — prepares a job (scheduler, text
//!   conditioning, LoRA plan, ControlNet sessions, initial noise), picks its loop once, decodes.
//! - `load.rs`: [`Pipeline::load`] and [`Pipeline::place`] (the parts where a
//!   [`crate::placement::Placement`] puts them, peer access).
//! - `job.rs`: the job state every loop shares; the LoRA switch at step boundaries.
//! - `host_loop.rs`: the loop on host tensors (the CPU).
//! - `device_loop.rs`: the device-resident loop on one GPU; the residual adds and staging.
//! - `split_loop.rs`: the loop with the guidance halves on two GPUs (`HalfUnet`).
//! - `timings.rs`: [`Timings`], the per-step ControlNet critical path.
//!
//! A job moves: [`crate::request::ValidRequest`] ─▶ `run` ─▶ one loop (over borrowed parts of
//! the pipeline, the UNet through crate::unet, ControlNets through the crate::controlnet seam)
//! ─▶ VAE ─▶ [`Generated`].

mod device_loop;
mod host_loop;
mod job;
mod load;
mod split_loop;
mod timings;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use katz_kernels::cuda::GpuKernels;
use ort::session::Session;

use crate::bundle::BaseBundle;
use crate::controlnet::{
    ControlNet, ControlService, ControlSession, InlineControlNets, SessionInit, ThreadedControlNets,
};
use crate::device::{at, current, gpu_err};
use crate::lora::{LoraAdapter, LoraParts};
use crate::noise::SeededNoise;
use crate::request::{Accepts, ControlModel, ControlRequest, Limits, Request, ValidRequest};
use crate::runtime::SessionOptions;
use crate::scheduler::{self, NoiseSource};
use crate::tensor::Tensor;
use crate::text::{TextEncoders, TextWeights};
use crate::unet::UnetSet;
use crate::weights::Weights;
use crate::{Error, Result};

pub use crate::lora::plan::{LoraBound, LoraMode, LoraPlan};
pub use timings::Timings;

use job::Job;
use split_loop::{half_cond, HalfUnet};

/// Hooks into a running generation: progress, cancellation, intermediate latents.
pub trait Observer {
    /// Called after each step with the new latents; an error (e.g. [`crate::Error::Cancelled`])
    /// stops the job.
    fn on_step(&mut self, _step: usize, _total: usize, _latents: &Tensor) -> Result<()> {
        Ok(())
    }
    /// Whether `on_step` reads the latents of step `step` (0-based). On a GPU they stay on the
    /// device unless this says so; `on_step` then gets an empty tensor.
    fn wants_latents(&self, _step: usize) -> bool {
        false
    }
}

/// An observer that does nothing.
pub struct NoObserver;
impl Observer for NoObserver {}

/// The output of a generation.
#[derive(Debug, Clone)]
pub struct Generated {
    /// `[1, 3, H, W]` in [0, 1].
    pub image: Tensor,
    pub timings: Timings,
    /// The prompt was longer than the text encoders take and was cut (`text::Truncated`).
    pub prompt_truncated: Option<crate::text::Truncated>,
    /// The same for the negative prompt.
    pub negative_truncated: Option<crate::text::Truncated>,
}

/// How one run goes, besides its request. `RunOptions::default()`: the request's seeded noise,
/// no observer, LoRAs merged before step 0, the pipeline's own ControlNets.
#[derive(Default)]
pub struct RunOptions<'a> {
    /// Progress, cancellation, intermediate latents.
    pub observer: Option<&'a mut dyn Observer>,
    /// The initial latents and any ancestral noise (default: seeded by the request's seed).
    pub noise: Option<&'a mut dyn NoiseSource>,
    /// How the LoRAs reach the weights (default: [`LoraPlan::Sync`]).
    pub lora: LoraPlan<'a>,
    /// The service that opens the ControlNet sessions: each step's input goes to every active
    /// session before the UNet encoder runs, the residuals are collected after it (overlap).
    /// Without one, the pipeline's own ControlNets run one after another after the encoder (the
    /// host), or as inline sessions on the device loop (a GPU).
    pub control: Option<&'a mut dyn ControlService>,
}

impl<'a> RunOptions<'a> {
    pub fn observer(mut self, o: &'a mut dyn Observer) -> Self {
        self.observer = Some(o);
        self
    }
    pub fn noise(mut self, n: &'a mut dyn NoiseSource) -> Self {
        self.noise = Some(n);
        self
    }
    pub fn lora(mut self, plan: LoraPlan<'a>) -> Self {
        self.lora = plan;
        self
    }
    pub fn control(mut self, c: &'a mut dyn ControlService) -> Self {
        self.control = Some(c);
        self
    }
}

pub struct Pipeline {
    pub bundle: BaseBundle,
    opts: SessionOptions,
    text: TextEncoders,
    /// The UNet pairs by shape bucket (each bound for CUDA graphs and captured at load with
    /// `SessionOptions::cuda_graph`), and one of free shapes when other sizes run dynamically.
    unets: UnetSet,
    vae: Session,
    weights: Arc<Weights>,
    controlnets: Vec<Arc<Mutex<ControlNet>>>,
    /// The device loop's kernels on a stream of their own (GPU pipelines; made at load with CUDA
    /// graphs, else at the first job).
    step_kernels: Option<Arc<GpuKernels>>,
    /// Split guidance: the conditional half's UNet on a second GPU, and whether jobs use it.
    half: Option<HalfUnet>,
    split_on: bool,
    /// Threads of parallel ControlNet sessions, kept between jobs (crate::threads says why).
    cn_threads: Arc<crate::threads::LastingThreads>,
    /// ControlNets placed per guidance half: the unconditional half's instance (the id requests
    /// name) → the conditional half's.
    cn_halves: HashMap<crate::request::ModelId, crate::request::ModelId>,
    /// Whether a job may capture its inline ControlNets' CUDA graphs for its bucket: until the
    /// warm-up (one thread uses the pipeline: `generate`, the benches), then only with buckets
    /// on first use (one model thread); with every bucket at load the warm-up captured them.
    cn_capture: bool,
}

impl Pipeline {
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Turns split guidance off (one GPU, as without a `cond_half`) or back on.
    pub fn set_split(&mut self, on: bool) {
        self.split_on = on && self.half.is_some();
    }

    /// The GPU of the conditional half, when guidance is split.
    pub fn split_device(&self) -> Option<i32> {
        self.half.as_ref().filter(|_| self.split_on).map(|h| h.device)
    }

    /// The pristine weights, to share with other pipelines and with LoRA merges.
    pub fn shared_weights(&self) -> Arc<Weights> {
        self.weights.clone()
    }

    pub fn text_encoders(&self) -> &TextEncoders {
        &self.text
    }

    /// The conditioning of a prompt with the pristine weights (no LoRA), as a job makes it.
    pub fn condition(
        &mut self,
        prompt: &str,
        negative_prompt: Option<&str>,
        cfg: bool,
        (height, width): (usize, usize),
    ) -> Result<crate::text::Conditioning> {
        let none = crate::weights::MergedWeights::default();
        self.make_current()?;
        self.text.condition(
            TextWeights::new(&self.weights, &none),
            prompt,
            negative_prompt,
            cfg,
            (height, width),
        )
    }

    /// This pipeline's ControlNets as a [`ControlService`] computing in the caller's thread.
    pub fn inline_controlnets(&self) -> InlineControlNets {
        InlineControlNets {
            models: self.controlnets.clone(),
        }
    }

    /// This pipeline's ControlNets as a [`ControlService`] whose sessions run on threads of
    /// their own, overlapping the UNet encoder.
    pub fn threaded_controlnets(&self) -> ThreadedControlNets {
        ThreadedControlNets {
            models: self.controlnets.clone(),
            threads: self.cn_threads.clone(),
        }
    }

    /// Reads a LoRA file against this bundle's weights.
    pub fn lora(&self, path: impl AsRef<Path>) -> Result<Arc<LoraAdapter>> {
        self.lora_with(path, LoraParts::All)
    }

    /// Reads a LoRA file against this bundle's weights, using its `parts` (the adapter's
    /// `untaken` says what was skipped).
    pub fn lora_with(&self, path: impl AsRef<Path>, parts: LoraParts) -> Result<Arc<LoraAdapter>> {
        Ok(Arc::new(LoraAdapter::load_with(
            path.as_ref(),
            self.weights.map(),
            parts,
        )?))
    }

    /// What this pipeline accepts, under the default [`Limits`] (a worker overlays its own).
    pub fn accepts(&self) -> Accepts {
        Accepts {
            limits: Limits::default(),
            size_multiple: self.bundle.manifest.vae_scale_factor,
            buckets: self.opts.buckets.clone(),
            other_sizes: self.opts.other_sizes,
            split: self.split_on,
            loaded: self.controlnets.len(),
            served: 0,
        }
    }

    /// [`ValidRequest::new`] against [`Pipeline::accepts`].
    pub fn validate(&self, req: Request) -> Result<ValidRequest> {
        ValidRequest::new(req, &self.accepts())
    }

    /// Runs a request: its text conditioning, LoRA plan, ControlNet sessions and initial noise,
    /// then the one loop this pipeline and request take (host, one GPU, or the guidance halves
    /// on two), then the VAE.
    pub fn run(&mut self, req: &ValidRequest, opts: RunOptions<'_>) -> Result<Generated> {
        let started = Instant::now();
        let mut t = Timings {
            steps: req.steps,
            ..Timings::default()
        };
        let mut seeded = SeededNoise::new(req.seed);
        let mut none = NoObserver;
        let noise: &mut dyn NoiseSource = match opts.noise {
            Some(n) => n,
            None => &mut seeded,
        };
        let obs: &mut dyn Observer = match opts.observer {
            Some(o) => o,
            None => &mut none,
        };
        let m = &self.bundle.manifest;
        let (f, lc) = (m.vae_scale_factor, m.latent_channels);
        let (h, w) = (req.height / f, req.width / f);
        let cfg = req.guided();

        // the background opener of buckets left for their first use waits while a job runs
        let _running = self.unets.job_running();
        // a bucket left for its first use opens (and is captured) now, before this job's
        // other GPU work starts
        let gpu = self.opts.device.gpu();
        let split = gpu.is_some() && self.half.is_some() && self.split_on && cfg;
        let unet_batch = if cfg && !split { 2 } else { 1 };
        let skips = m.unet.skips;
        match gpu {
            Some(id) if self.opts.cuda_graph => {
                let k = self.step_kernels(id)?;
                self.unets.prepare(
                    req.width,
                    req.height,
                    unet_batch,
                    Some((&self.weights, &k, skips)),
                )?;
            }
            _ => self.unets.prepare(req.width, req.height, unet_batch, None)?,
        }
        if gpu.is_some() && self.opts.cuda_graph && self.cn_capture {
            // the job's inline ControlNets' CUDA graphs for its bucket, captured now on this
            // thread (the one that replays them), like the UNet's
            let cn_batch = if cfg { 2 } else { 1 };
            for c in &req.controlnets {
                let inline = opts.control.as_deref().is_none_or(|s| s.runs_inline(c));
                if let (true, crate::request::ControlModel::Loaded(id)) = (inline, c.model) {
                    if let Some(model) = self.controlnets.get(id.index()) {
                        crate::controlnet::lock(model).prepare(req.width, req.height, cn_batch)?;
                    }
                }
            }
        }
        let m = &self.bundle.manifest;

        let mut sched_cfg = m.scheduler.clone();
        sched_cfg.use_karras_sigmas = req.karras;
        let mut sched = scheduler::build(req.scheduler, &sched_cfg, req.steps)?;

        // the LoRAs first: a merge with text-encoder layers is bound to the text encoders
        let (merged, pending) = job::start_loras(opts.lora, req, &self.weights, &mut t)?;

        let t0 = Instant::now();
        self.make_current()?;
        let cond = self.text.condition(
            TextWeights::new(&self.weights, &merged),
            &req.prompt,
            req.negative_prompt.as_deref(),
            cfg,
            (req.height, req.width),
        )?;
        t.text_encode = t0.elapsed();
        let truncated = (
            self.text.truncation(&req.prompt)?,
            match &req.negative_prompt {
                Some(n) if cfg => self.text.truncation(n)?,
                _ => None,
            },
        );

        let images: Vec<Tensor> = req
            .controlnets
            .iter()
            .map(|c| {
                if cfg {
                    Tensor::concat0(&[&c.image, &c.image])
                } else {
                    c.image.clone()
                }
            })
            .collect();

        // on a GPU the pipeline's own ControlNets run as inline sessions on the device loop
        let mut inline = self.inline_controlnets();
        let control: Option<&mut dyn ControlService> = match opts.control {
            Some(c) => Some(c),
            None if gpu.is_some() && !req.controlnets.is_empty() => Some(&mut inline),
            None => None,
        };
        let (mut sessions, mut halves) = match control {
            Some(svc) => self.open_sessions(svc, req, &cond, &images, split, &mut t)?,
            None => (Vec::new(), Vec::new()),
        };
        let mut latents = Tensor::zeros(vec![1, lc, h, w]);
        noise.fill(&mut latents.data);
        let sigma0 = sched.init_noise_sigma();
        latents.data.iter_mut().for_each(|v| *v *= sigma0);

        let mut job = Job {
            req,
            noise,
            obs,
            sched: &mut *sched,
            cond: &cond,
            merged,
            pending,
            sessions: &mut sessions,
            halves: &mut halves,
            images: &images,
            t: &mut t,
            started,
        };
        let k = gpu.map(|id| self.step_kernels(id)).transpose()?;
        let unet = self.unets.pick(req.width, req.height, unet_batch)?;
        let latents = match k {
            Some(k) => {
                let parts = device_loop::GpuParts {
                    unet_encoder: &mut unet.encoder,
                    unet_decoder: &mut unet.decoder,
                    unet_prelude: unet.prelude.as_mut(),
                    weights: &self.weights,
                    graph: unet.graph.as_mut(),
                    k,
                    skips,
                };
                match self.half.as_mut().filter(|_| split) {
                    Some(h) => split_loop::run(parts, h, &mut job, latents)?,
                    None => device_loop::run(parts, &mut job, latents)?,
                }
            }
            None => {
                let mut parts = host_loop::HostParts {
                    unet_encoder: &mut unet.encoder,
                    unet_decoder: &mut unet.decoder,
                    unet_prelude: unet.prelude.as_mut(),
                    weights: &self.weights,
                    controlnets: &self.controlnets,
                    skips,
                };
                host_loop::run(&mut parts, &mut job, latents)?
            }
        };
        drop(job);

        for s in sessions.iter_mut().chain(halves.iter_mut().flatten()) {
            s.close();
        }
        finite(&latents.data, "the latents after the last step")?;
        let t0 = Instant::now();
        self.make_current()?;
        let image = self.decode(&latents).map_err(|e| at("VAE decode", e))?;
        t.vae_decode = t0.elapsed();
        t.total = started.elapsed();
        Ok(Generated {
            image,
            timings: t,
            prompt_truncated: truncated.0,
            negative_truncated: truncated.1,
        })
    }

    /// Runs every shape bucket that is open once before the first job — one denoising step and
    /// the VAE at its size, with the text encoders — and the free-shape sessions at the bundle's default
    /// size: what a first run pays (the CUDA provider's memory arenas, cuDNN's algorithm choice
    /// for each shape, library handles on this thread) is paid at load, so the first job runs
    /// as fast as the tenth. Returns the time it took.
    pub fn warm_up(&mut self) -> Result<std::time::Duration> {
        let t0 = Instant::now();
        let m = &self.bundle.manifest;
        let guided = m.default_guidance.max(2.0);
        // the buckets open now (with BucketLoad::FirstUse, the others warm up on their first job)
        let mut runs: Vec<(usize, usize, f32)> = self
            .unets
            .ready_buckets()
            .into_iter()
            .map(|b| {
                // a bucket of UNet batch 2 (or one half per GPU) is guided; batch 1 on one GPU is not
                let g = if b.unet_batch == 2 || self.half.is_some() {
                    guided
                } else {
                    1.0
                };
                (b.width, b.height, g)
            })
            .collect();
        if self.opts.dynamic() {
            let [w, h] = m.default_size;
            runs.push((w, h, guided));
        }
        self.unets.hold_opener = true;
        for (width, height, guidance) in runs {
            let req = self.validate(Request {
                prompt: String::new(),
                negative_prompt: None,
                width,
                height,
                steps: 1,
                guidance,
                scheduler: crate::scheduler::SchedulerKind::Euler,
                karras: false,
                seed: 0,
                controlnets: vec![],
                loras: vec![],
            })?;
            let out = self
                .run(&req, RunOptions::default())
                .map_err(|e| at(&format!("warming up {width}x{height}"), e))?;
            tracing::debug!(
                width,
                height,
                ms = out.timings.total.as_secs_f64() * 1e3,
                "warmed up"
            );
        }
        // the buckets once more with every ControlNet hosted here (their sessions' first runs;
        // on a GPU with CUDA graphs, each one's graph for the bucket captured): the first bucket
        // when the others open on their first use, else every bucket — then no job captures
        // (other model threads may be running jobs on the GPU: a capture needs it to itself)
        let mut cn_buckets = self.unets.ready_buckets();
        if self.opts.bucket_load == crate::runtime::BucketLoad::FirstUse {
            cn_buckets.truncate(1);
        }
        if self.opts.device.gpu().is_none() || self.controlnets.is_empty() {
            cn_buckets.clear();
        }
        for b in cn_buckets {
            let guidance = if b.unet_batch == 2 || self.half.is_some() {
                guided
            } else {
                1.0
            };
            let halves: std::collections::HashSet<usize> =
                self.cn_halves.values().map(|m| m.index()).collect();
            let controlnets = (0..self.controlnets.len())
                .filter(|i| !halves.contains(i))
                .map(|i| ControlRequest {
                    model: ControlModel::Loaded(crate::request::ModelId::new(i)),
                    image: Tensor::zeros(vec![1, 3, b.height, b.width]),
                    prep: Default::default(),
                    scale: 1.0,
                    start: 0.0,
                    end: 1.0,
                })
                .collect();
            let req = self.validate(Request {
                prompt: String::new(),
                negative_prompt: None,
                width: b.width,
                height: b.height,
                steps: 1,
                guidance,
                scheduler: crate::scheduler::SchedulerKind::Euler,
                karras: false,
                seed: 0,
                controlnets,
                loras: vec![],
            })?;
            let out = self.run(&req, RunOptions::default()).map_err(|e| {
                at(
                    &format!("warming up the ControlNets at {}x{}", b.width, b.height),
                    e,
                )
            })?;
            tracing::debug!(
                ms = out.timings.total.as_secs_f64() * 1e3,
                "ControlNets warmed up"
            );
        }
        self.cn_capture = self.opts.bucket_load == crate::runtime::BucketLoad::FirstUse;
        // ready: the buckets left for their first use open from now on
        self.unets.hold_opener = false;
        self.unets.open_later_in_background();
        Ok(t0.elapsed())
    }

    /// One session per ControlNet of the request; with split guidance, a ControlNet placed per
    /// guidance half gets a second session for the conditional half (`halves[j]`).
    #[allow(clippy::type_complexity)]
    fn open_sessions(
        &self,
        svc: &mut dyn ControlService,
        req: &ValidRequest,
        cond: &crate::text::Conditioning,
        images: &[Tensor],
        split: bool,
        t: &mut Timings,
    ) -> Result<(Vec<Box<dyn ControlSession>>, Vec<Option<Box<dyn ControlSession>>>)> {
        let t0 = Instant::now();
        let other_half = |c: &ControlRequest| match c.model {
            ControlModel::Loaded(m) => self.cn_halves.get(&m).copied(),
            ControlModel::Served(_) => None,
        };
        // each half's conditioning, made once for all the per-half ControlNets of the job
        let cond_halves = if split && req.controlnets.iter().any(|c| other_half(c).is_some()) {
            Some((half_cond(cond, 0)?, half_cond(cond, 1)?))
        } else {
            None
        };
        let (mut sessions, mut halves) = (Vec::new(), Vec::new());
        for (j, (c, image)) in req.controlnets.iter().zip(images).enumerate() {
            match (other_half(c), &cond_halves) {
                (Some(other), Some((cu, cc))) => {
                    let image = &c.image;
                    sessions.push(svc.open(j, c, SessionInit { cond: cu, image })?);
                    let cr = ControlRequest {
                        model: other.into(),
                        ..c.clone()
                    };
                    halves.push(Some(svc.open(j, &cr, SessionInit { cond: cc, image })?));
                }
                _ => {
                    sessions.push(svc.open(j, c, SessionInit { cond, image })?);
                    halves.push(None);
                }
            }
        }
        t.controlnet += t0.elapsed();
        Ok((sessions, halves))
    }

    /// On a GPU pipeline, makes its GPU current on this thread (ControlNets and split guidance
    /// on other GPUs leave theirs current; ONNX Runtime's host copies use the current device).
    fn make_current(&mut self) -> Result<()> {
        match self.opts.device.gpu() {
            Some(id) => current(&*self.step_kernels(id)?),
            None => Ok(()),
        }
    }

    /// The step kernels of this pipeline's GPU, on a stream of their own (LoRA merges keep theirs).
    fn step_kernels(&mut self, id: i32) -> Result<Arc<GpuKernels>> {
        if let Some(k) = &self.step_kernels {
            return Ok(k.clone());
        }
        let k = match self.weights.device() {
            Some(d) => Arc::new(d.kernels.fork().map_err(gpu_err)?),
            None => crate::device::kernels_for(id as usize)?,
        };
        self.step_kernels = Some(k.clone());
        Ok(k)
    }

    /// Latents → image in [0, 1] (diffusers: `vae.decode(latents / scaling_factor)`, `x/2 + 0.5`, clamp);
    /// latents larger than the VAE's tile decode tiled (crate::vae, diffusers' `enable_tiling()`).
    pub fn decode(&mut self, latents: &Tensor) -> Result<Tensor> {
        let s = self.bundle.manifest.scaling_factor;
        let scaled = Tensor::new(
            latents.shape.clone(),
            latents.data.iter().map(|v| v / s).collect(),
        );
        let tiling = self.bundle.manifest.vae_tiling();
        let mut image = crate::vae::decode(&scaled, Some(&tiling), |x| crate::vae::run(&mut self.vae, x))?;
        finite(&image.data, "the VAE's image")?;
        image
            .data
            .iter_mut()
            .for_each(|v| *v = (*v / 2.0 + 0.5).clamp(0.0, 1.0));
        Ok(image)
    }
}

/// Fails a job whose numbers overflowed: the first value of `data` that is NaN or infinite is
/// named (a clamp would turn it into a black or white pixel and store the image as `done`).
fn finite(data: &[f32], what: &str) -> Result<()> {
    match data.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::NonFinite(format!(
            "{what} hold a non-finite value ({} at index {i} of {}): a LoRA or ControlNet scale too large, or weights that overflow",
            data[i],
            data.len()
        ))),
    }
}

#[cfg(test)]
mod finite_tests {
    use super::*;

    #[test]
    fn non_finite_values_fail_the_job_naming_the_first() {
        assert!(finite(&[0.0, -1.5, 3e38], "x").is_ok());
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let e = finite(&[0.0, bad, 1.0], "the latents").unwrap_err();
            assert!(e.to_string().contains("at index 1 of 3"), "{e}");
            assert_eq!(
                (e.disposition(), e.kind()),
                (crate::Disposition::DeadLetter, "non_finite")
            );
        }
    }
}
