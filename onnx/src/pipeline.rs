//! The SDXL text-to-image pipeline with ControlNets and LoRAs, in-process on one device.
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
//! pristine weights; the pristine set is left as it was for the next job. [`LoraPlan::Sync`]
//! merges before step 0; [`LoraPlan::Async`] starts denoising with the pristine weights at once,
//! polls the merge running elsewhere at every step boundary, switches to the merged set at the
//! first boundary where it is ready, and waits for it at step `bound` at the latest (Katz's
//! bounded asynchronous LoRA loading):
//!
//! ```text
//! step:     0   1   2   …   r   …   K   …   n-1
//! weights:  W   W   W   W   W'  W'  W'  W'  W'      (ready at r ≤ K: switch at r, no wait)
//!           W   W   …   W  [wait] W'  W'  …  W'     (not ready at K: wait, timings.lora_wait)
//! ```

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use katz_kernels::cuda::GpuKernels;
use katz_kernels::{guidance, residual};
use ort::session::{IoBinding, Session, SessionInputValue};
use ort::value::DynValue;
use ort::value::TensorElementType;

use crate::bundle::{check_compute, check_io, BaseBundle, ControlNetBundle};
use crate::controlnet::{
    ControlNet, ControlService, ControlSession, InlineControlNets, RunSpan, SessionInit, ThreadedControlNets,
};
use crate::device::{gpu_err, DevRef, DevTensor};
use crate::graphs::GraphedUnet;
use crate::lora::{LoraAdapter, PendingMerge};
use crate::noise::SeededNoise;
use crate::runtime::{self, Device, FixedShape, SessionOptions};
use crate::scheduler::{self, NoiseSource, Scheduler, SchedulerKind};
use crate::tensor::Tensor;
use crate::text::{Conditioning, TextEncoders};
use crate::weights::{MergedWeights, Weights};
use crate::{Error, Result};

/// Largest image side accepted, in pixels.
pub const MAX_SIDE: usize = 4096;
/// Most denoising steps accepted.
pub const MAX_STEPS: usize = 1000;

/// When a job's LoRAs are merged: before step 0, or while the job denoises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraMode {
    Sync,
    Async,
}

impl std::str::FromStr for LoraMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sync" => Ok(LoraMode::Sync),
            "async" => Ok(LoraMode::Async),
            _ => Err(format!("LoRA mode must be `sync` or `async`, got `{s}`")),
        }
    }
}

impl std::fmt::Display for LoraMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoraMode::Sync => "sync",
            LoraMode::Async => "async",
        })
    }
}

/// The step by which an asynchronous merge must be in: a step count (`10`) or a fraction of the
/// job's steps (`0.2`, `20%`). Katz profiled 10 of 50 steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoraBound {
    Steps(usize),
    Fraction(f32),
}

impl LoraBound {
    /// The bound step of a job of `steps` steps (at most its last step, so a LoRA always acts).
    pub fn step_for(&self, steps: usize) -> usize {
        let k = match *self {
            LoraBound::Steps(k) => k,
            LoraBound::Fraction(f) => (f as f64 * steps as f64).round() as usize,
        };
        k.min(steps.saturating_sub(1))
    }
}

impl std::str::FromStr for LoraBound {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!("LoRA bound must be a step count (10), a fraction (0.2) or a percentage (20%), got `{s}`")
        };
        if let Some(p) = s.strip_suffix('%') {
            let v: f32 = p.trim().parse().map_err(|_| bad())?;
            return if (0.0..=100.0).contains(&v) {
                Ok(LoraBound::Fraction(v / 100.0))
            } else {
                Err(bad())
            };
        }
        if s.contains('.') {
            let v: f32 = s.parse().map_err(|_| bad())?;
            return if (0.0..=1.0).contains(&v) {
                Ok(LoraBound::Fraction(v))
            } else {
                Err(bad())
            };
        }
        s.parse().map(LoraBound::Steps).map_err(|_| bad())
    }
}

impl std::fmt::Display for LoraBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoraBound::Steps(k) => write!(f, "{k}"),
            LoraBound::Fraction(v) => write!(f, "{}%", v * 100.0),
        }
    }
}

/// How a job's LoRAs reach the UNet's weights.
pub enum LoraPlan<'a> {
    /// `Request::loras` merged before step 0.
    Sync,
    /// Merged elsewhere while the job denoises with the pristine weights; switched in at the first
    /// step boundary where it is ready, waited for (at most `timeout`) before step `bound`.
    /// `Request::loras` is not used.
    Async {
        pending: &'a mut PendingMerge,
        bound: usize,
        timeout: Duration,
        /// Switch at the first boundary where the merge is ready (lower latency of the LoRA's
        /// effect, but the image depends on timing); `false`: always exactly at `bound`, so the
        /// same job gives the same image whatever the load.
        early: bool,
    },
}

/// One ControlNet of a request.
#[derive(Debug, Clone)]
pub struct ControlRequest {
    /// Index returned by [`Pipeline::controlnet`].
    pub model: usize,
    /// `[1, 3, H, W]` in [0, 1], the request's size.
    pub image: Tensor,
    pub scale: f32,
    /// Fraction of the steps at which it starts and ends (diffusers' control_guidance_start/end).
    pub start: f32,
    pub end: f32,
}

/// Everything a generation needs besides the models.
#[derive(Debug, Clone)]
pub struct Request {
    pub prompt: String,
    /// `None`: zero embeddings as the unconditional half (SDXL's force_zeros_for_empty_prompt).
    pub negative_prompt: Option<String>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f32,
    pub scheduler: SchedulerKind,
    pub karras: bool,
    pub seed: u64,
    pub controlnets: Vec<ControlRequest>,
    pub loras: Vec<(Arc<LoraAdapter>, f32)>,
}

/// Wall time per stage of one generation.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub text_encode: Duration,
    pub lora_merge: Duration,
    pub controlnet: Duration,
    pub unet_encoder: Duration,
    pub unet_decoder: Duration,
    pub scheduler: Duration,
    pub vae_decode: Duration,
    pub total: Duration,
    pub steps: usize,
    /// Time the denoising loop stood still waiting for an asynchronous LoRA merge.
    pub lora_wait: Duration,
    /// The first step run with the merged weights (`None`: no LoRA).
    pub lora_switch_step: Option<usize>,
    /// From the start of the generation to the end of its first step.
    pub first_step: Duration,
    /// The per-step critical path with ControlNets, summed over steps (sessions that report
    /// [`RunSpan`]s: in-process ones): the slowest ControlNet's run on its GPU and how long it
    /// waited to start after the step was handed over; how long after the UNet encoder ended the
    /// last residuals were ready; and the residual transport after both (copies between GPUs,
    /// the scaled adds).
    pub cn_slowest_run: Duration,
    pub cn_start_delay: Duration,
    pub cn_after_encoder: Duration,
    pub residual_transport: Duration,
    /// Run time of each of the request's ControlNets, summed over its steps (a ControlNet placed
    /// per guidance half: both halves' runs).
    pub cn_runs: Vec<Duration>,
}

impl Timings {
    /// Mean wall time of one denoising step (ControlNets, UNet halves, guidance, scheduler).
    pub fn per_step(&self) -> Duration {
        let loop_time = self.controlnet + self.unet_encoder + self.unet_decoder + self.scheduler;
        loop_time
            .checked_div(self.steps.max(1) as u32)
            .unwrap_or_default()
    }

    pub fn rows(&self) -> Vec<(&'static str, Duration)> {
        vec![
            ("text encoders", self.text_encode),
            ("LoRA merge", self.lora_merge),
            ("LoRA wait", self.lora_wait),
            ("ControlNets", self.controlnet),
            ("UNet encoder", self.unet_encoder),
            ("UNet decoder", self.unet_decoder),
            ("guidance + scheduler", self.scheduler),
            ("VAE decode", self.vae_decode),
            ("per step (mean)", self.per_step()),
            ("total", self.total),
        ]
    }
}

/// One step's ControlNet spans, gathered as their residuals arrive ([`Timings`]' critical path).
#[derive(Default)]
struct StepPath {
    last_end: Option<Instant>,
    slowest: Duration,
    delay: Duration,
    /// Each noted run: the request's ControlNet index and its run time.
    runs: Vec<(usize, Duration)>,
}

impl StepPath {
    fn note(&mut self, j: usize, span: Option<RunSpan>) {
        let Some(s) = span else { return };
        let run = s.end.saturating_duration_since(s.start);
        self.runs.push((j, run));
        if run >= self.slowest {
            self.slowest = run;
            self.delay = s.start.saturating_duration_since(s.sent);
        }
        self.last_end = Some(self.last_end.map_or(s.end, |e| e.max(s.end)));
    }

    /// The step's residuals are in: `encoder_end` when the UNet encoder(s) returned, `done` when
    /// the residuals had been added.
    fn finish(self, t: &mut Timings, encoder_end: Instant, done: Instant) {
        for (j, run) in self.runs {
            if t.cn_runs.len() <= j {
                t.cn_runs.resize(j + 1, Duration::ZERO);
            }
            t.cn_runs[j] += run;
        }
        let Some(end) = self.last_end else { return };
        t.cn_slowest_run += self.slowest;
        t.cn_start_delay += self.delay;
        t.cn_after_encoder += end.saturating_duration_since(encoder_end);
        t.residual_transport += done.saturating_duration_since(end.max(encoder_end));
    }
}

/// Hooks into a running generation: progress, cancellation, intermediate latents.
pub trait Observer {
    /// Called after each step with the new latents; an error (e.g. [`Error::Cancelled`]) stops the job.
    fn on_step(&mut self, _step: usize, _total: usize, _latents: &Tensor) -> Result<()> {
        Ok(())
    }
    /// Whether `on_step` reads the latents. On a GPU they stay on the device unless this says
    /// so; `on_step` then gets an empty tensor.
    fn wants_latents(&self) -> bool {
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
}

pub struct Pipeline {
    pub bundle: BaseBundle,
    opts: SessionOptions,
    text: TextEncoders,
    unet_encoder: Session,
    unet_decoder: Session,
    vae: Session,
    weights: Arc<Weights>,
    controlnets: Vec<Arc<Mutex<ControlNet>>>,
    /// The device loop's kernels on a stream of their own (GPU pipelines; made at the first job).
    step_kernels: Option<Arc<GpuKernels>>,
    /// The UNet bound for CUDA graphs and captured at load (`SessionOptions::cuda_graph`).
    graph: Option<GraphedUnet>,
    /// Split guidance: the conditional half's UNet on a second GPU, and whether jobs use it.
    half: Option<HalfUnet>,
    split_on: bool,
    /// Threads of parallel ControlNet sessions, kept between jobs (crate::threads says why).
    cn_threads: Arc<crate::threads::LastingThreads>,
    /// ControlNets placed per guidance half ([`Pipeline::controlnet_halves`]): the unconditional
    /// half's instance (the index requests name) → the conditional half's.
    cn_halves: HashMap<usize, usize>,
}

/// The UNet of the conditional guidance half on its own GPU (latent parallelism): its sessions,
/// the pristine weights uploaded there, and step kernels on that GPU.
struct HalfUnet {
    device: i32,
    unet_encoder: Session,
    unet_decoder: Session,
    weights: Arc<Weights>,
    kernels: Arc<GpuKernels>,
    /// This half's UNet bound for CUDA graphs, captured on `thread` (`SessionOptions::cuda_graph`).
    graph: Option<GraphedUnet>,
    /// The thread that runs this half's graphs, for the pipeline's whole life: ONNX Runtime's
    /// CUDA provider makes per-thread state (library handles) on a thread's first run, so a
    /// fresh thread per step cost about 0.2 s each (476 ms per step on 2×H200, run C).
    thread: rayon::ThreadPool,
}

/// Runs `theirs` on `pool`'s thread while `mine` runs on this one; both results.
fn on_both<A, B: Send>(
    pool: &rayon::ThreadPool,
    theirs: impl FnOnce() -> Result<B> + Send,
    mine: impl FnOnce() -> Result<A>,
) -> (Result<A>, Result<B>) {
    let mut out: Option<Result<B>> = None;
    let slot = &mut out;
    let a = pool.in_place_scope(|sc| {
        sc.spawn(move |_| {
            *slot = Some(
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(theirs))
                    .unwrap_or_else(|_| Err(Error::Gpu("the second GPU's thread panicked".into()))),
            );
        });
        mine()
    });
    let b = out.unwrap_or_else(|| Err(Error::Gpu("the second GPU's thread did not run".into())));
    (a, b)
}

/// Makes GPU `k`'s primary context current on this thread before ONNX Runtime touches a session
/// of that GPU (its host-to-device copies at bind time use the current device; ONNX Runtime sets
/// the device only when a thread first runs a session).
fn current(k: &GpuKernels) -> Result<()> {
    k.ctx.bind_to_thread().map_err(gpu_err)
}

/// Names the stage an error of the GPU loop came from.
fn at(what: &str, e: Error) -> Error {
    match e {
        Error::Ort(e) => Error::Gpu(format!("{what}: {e}")),
        Error::Gpu(m) => Error::Gpu(format!("{what}: {m}")),
        other => other,
    }
}

/// GPUs `a` and `b` read each other's memory (peer copies of latents, residuals, weights).
fn peer(a: i32, b: i32) -> Result<()> {
    katz_kernels::cuda::enable_peer_access(a as usize, b as usize).map_err(|e| Error::DeviceUnavailable {
        device: format!("cuda:{a} + cuda:{b}"),
        message: format!("peer access between the GPUs cannot be enabled: {e}"),
    })
}

/// The weight inputs the graphs take as f16 (fp16 GPU bundles).
fn half_inputs(
    sessions: [&Session; 2],
    map: &std::collections::BTreeMap<String, crate::bundle::WeightEntry>,
) -> HashSet<String> {
    sessions
        .iter()
        .flat_map(|s| s.inputs())
        .filter(|o| map.contains_key(o.name()))
        .filter(|o| o.dtype().tensor_type() == Some(TensorElementType::Float16))
        .map(|o| o.name().to_string())
        .collect()
}

fn skip_names(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("skip_{i}")).collect()
}

/// The spatial strides of the UNet encoder's outputs (mid, then each skip) relative to the
/// latent: SDXL's structure (three levels of two blocks, conv_in first, downsamplers after the
/// first two levels), which the exporter's tiny and full-size configs share.
fn unet_strides(m: &crate::bundle::BaseManifest) -> Option<(usize, Vec<usize>)> {
    (m.architecture == "sdxl" && m.unet.skips == 9).then(|| (4, vec![1, 1, 1, 2, 2, 2, 4, 4, 4]))
}

/// The fixed free dimensions of the UNet encoder and decoder for `f` (`--static-shapes`).
fn unet_dims(bundle: &BaseBundle, f: FixedShape) -> Result<[Vec<(String, i64)>; 2]> {
    let m = &bundle.manifest;
    let (mid, strides) = unet_strides(m).ok_or_else(|| {
        Error::bundle(
            &bundle.dir,
            "static shapes need the SDXL UNet structure (nine skips); this bundle has another",
        )
    })?;
    let s = m.vae_scale_factor;
    let largest = mid.max(strides.iter().copied().max().unwrap_or(1));
    if !f.width.is_multiple_of(s * largest) || !f.height.is_multiple_of(s * largest) || f.unet_batch == 0 {
        return Err(Error::InvalidRequest(format!(
            "static shapes: {}x{} is not a multiple of {} (or the batch is 0)",
            f.width,
            f.height,
            s * largest
        )));
    }
    let (h, w) = ((f.height / s) as i64, (f.width / s) as i64);
    let d = |n: &str, v: i64| (n.to_string(), v);
    let b = f.unet_batch as i64;
    let enc = vec![d("batch", b), d("height", h), d("width", w)];
    let mut dec = vec![
        d("batch", b),
        d("mid_h", h / mid as i64),
        d("mid_w", w / mid as i64),
    ];
    for (i, st) in strides.iter().enumerate() {
        dec.push(d(&format!("skip_{i}_h"), h / *st as i64));
        dec.push(d(&format!("skip_{i}_w"), w / *st as i64));
    }
    Ok([enc, dec])
}

/// The fixed free dimensions of a ControlNet graph for `f`: it always takes both guidance halves.
pub(crate) fn controlnet_dims(vae_scale: usize, f: FixedShape, batch: usize) -> Vec<(String, i64)> {
    let (h, w) = ((f.height / vae_scale) as i64, (f.width / vae_scale) as i64);
    [
        ("batch", batch as i64),
        ("height", h),
        ("width", w),
        ("image_height", f.height as i64),
        ("image_width", f.width as i64),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_string(), v))
    .collect()
}

impl Pipeline {
    /// Opens a base bundle: sessions for every graph, checked against the manifest.
    pub fn load(dir: impl AsRef<Path>, opts: SessionOptions) -> Result<Self> {
        Self::load_sharing(dir, opts, None)
    }

    /// Like [`Pipeline::load`], reusing the pristine weights of another pipeline of the same
    /// bundle (the worker's pipeline threads and its LoRA merges share one copy).
    pub fn load_sharing(
        dir: impl AsRef<Path>,
        opts: SessionOptions,
        shared: Option<Arc<Weights>>,
    ) -> Result<Self> {
        let bundle = BaseBundle::open(dir)?;
        check_compute(&bundle.dir, &bundle.manifest.compute, opts.device)?;
        runtime::init()?;
        let m = &bundle.manifest;
        let text = TextEncoders::load(&bundle, &opts)?;
        let weight_inputs = |graph: &str| -> Vec<String> {
            m.weights
                .map
                .iter()
                .filter(|(_, e)| e.graph == graph)
                .map(|(n, _)| n.clone())
                .collect()
        };
        let skips = skip_names(m.unet.skips);

        if opts.cuda_graph && (opts.fixed.is_none() || !matches!(opts.device, Device::Cuda(_))) {
            return Err(Error::InvalidRequest(format!(
                "CUDA graphs need fixed shapes (--static-shapes) and the CUDA provider (cuda:N), got {}{}",
                opts.device,
                if opts.fixed.is_none() {
                    " without fixed shapes"
                } else {
                    ""
                }
            )));
        }
        let fixed_dims = opts.fixed.map(|f| unet_dims(&bundle, f)).transpose()?;
        let [enc_dims, dec_dims] = fixed_dims.clone().unwrap_or_default();
        let enc_path = bundle.path(&m.unet.encoder);
        let unet_encoder = runtime::unet_session(&enc_path, &opts, &enc_dims)?;
        let mut enc_in: Vec<String> = [
            "sample",
            "timestep",
            "encoder_hidden_states",
            "text_embeds",
            "time_ids",
        ]
        .map(String::from)
        .to_vec();
        enc_in.extend(weight_inputs("unet_encoder"));
        let mut enc_out: Vec<String> = vec!["emb".into(), "mid".into()];
        enc_out.extend(skips.iter().cloned());
        check_io(&enc_path, &unet_encoder, &enc_in, &enc_out)?;

        let dec_path = bundle.path(&m.unet.decoder);
        let unet_decoder = runtime::unet_session(&dec_path, &opts, &dec_dims)?;
        let mut dec_in: Vec<String> = vec!["emb".into(), "encoder_hidden_states".into(), "mid".into()];
        dec_in.extend(skips.iter().cloned());
        dec_in.extend(weight_inputs("unet_decoder"));
        check_io(&dec_path, &unet_decoder, &dec_in, &["noise_pred".into()])?;

        // weights are bound as the graphs take them: f32, or f16 in fp16 GPU bundles
        let half = half_inputs([&unet_encoder, &unet_decoder], &m.weights.map);
        let weights = match shared {
            Some(w) if w.map() == &m.weights.map => w,
            Some(_) => {
                return Err(Error::bundle(
                    &bundle.dir,
                    "shared weights belong to another bundle",
                ))
            }
            None => {
                let mut w = Weights::load(&bundle, half)?;
                if let Some(id) = opts.device.gpu() {
                    // uploaded once: every job binds them in place, merges run on the device
                    w.to_device(id)?;
                }
                Arc::new(w)
            }
        };

        let vae_path = bundle.path(&m.vae_decoder);
        let vae = runtime::session(&vae_path, &opts)?;
        check_io(&vae_path, &vae, &["latent".into()], &["image".into()])?;

        let mut pipe = Pipeline {
            bundle,
            opts,
            text,
            unet_encoder,
            unet_decoder,
            vae,
            weights,
            controlnets: Vec::new(),
            step_kernels: None,
            graph: None,
            half: None,
            split_on: false,
            cn_threads: Arc::new(crate::threads::LastingThreads::new("controlnet")),
            cn_halves: HashMap::new(),
        };
        if let (true, Some(id), Some([enc_dims, dec_dims])) =
            (pipe.opts.cuda_graph, pipe.opts.device.gpu(), fixed_dims)
        {
            // bound and captured now, before any job or other thread uses the GPU (crate::graphs)
            let k = pipe.step_kernels(id)?;
            current(&k)?;
            let mut g = GraphedUnet::new(
                &pipe.unet_encoder,
                &pipe.unet_decoder,
                &pipe.weights,
                k,
                skips.len(),
                &enc_dims,
                &dec_dims,
            )?;
            g.capture(&mut pipe.unet_encoder, &mut pipe.unet_decoder)?;
            pipe.graph = Some(g);
        }
        Ok(pipe)
    }

    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// Latent parallelism: from now on the conditional guidance half runs on `device` (its own
    /// UNet sessions and a copy of the weights there), the unconditional half here; one noise
    /// prediction crosses per step by peer copy and the scheduler runs once, here. LoRAs merge
    /// here and the merged layers are copied over. Both devices must be GPUs of this process.
    pub fn split_guidance(&mut self, device: Device) -> Result<()> {
        let (Some(here), Some(there)) = (self.opts.device.gpu(), device.gpu()) else {
            return Err(Error::InvalidRequest(format!(
                "split guidance needs two GPUs, got {} and {device}",
                self.opts.device
            )));
        };
        if here == there {
            return Err(Error::InvalidRequest(format!(
                "split guidance needs a second GPU, got {device} twice"
            )));
        }
        peer(here, there)?;
        // the ControlNets' residuals go to both halves: the second GPU reads theirs directly
        for g in self.controlnet_gpus() {
            peer(there, g as i32)?;
        }
        let opts = SessionOptions {
            device,
            ..self.opts.clone()
        };
        let m = &self.bundle.manifest;
        let [enc_dims, dec_dims] = match opts.fixed {
            Some(f) if f.unet_batch != 1 => {
                return Err(Error::InvalidRequest(format!(
                    "split guidance runs a UNet batch of 1 per GPU; the static shapes fix {}",
                    f.unet_batch
                )))
            }
            Some(f) => unet_dims(&self.bundle, f)?,
            None => [vec![], vec![]],
        };
        let mut unet_encoder = runtime::unet_session(&self.bundle.path(&m.unet.encoder), &opts, &enc_dims)?;
        let mut unet_decoder = runtime::unet_session(&self.bundle.path(&m.unet.decoder), &opts, &dec_dims)?;
        let half = half_inputs([&unet_encoder, &unet_decoder], &m.weights.map);
        let mut w = Weights::load(&self.bundle, half)?;
        w.to_device(there)?;
        let dev = w
            .device()
            .ok_or_else(|| Error::Gpu("the second GPU's weights did not upload".into()))?;
        let kernels = Arc::new(dev.kernels.fork().map_err(gpu_err)?);
        let thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(move |_| format!("katz-cuda{there}"))
            .build()
            .map_err(|e| Error::Gpu(format!("starting the second GPU's thread: {e}")))?;
        let weights = Arc::new(w);
        let graph = if opts.cuda_graph {
            // captured on the thread that will run it, before any job (crate::graphs)
            let mut g = GraphedUnet::new(
                &unet_encoder,
                &unet_decoder,
                &weights,
                kernels.clone(),
                m.unet.skips,
                &enc_dims,
                &dec_dims,
            )?;
            let (e, d, gk) = (&mut unet_encoder, &mut unet_decoder, Sent(&mut g));
            thread.install(move || {
                let g = gk.into_inner();
                current(g.kernels()).and_then(|_| g.capture(e, d))
            })?;
            Some(g)
        } else {
            None
        };
        self.half = Some(HalfUnet {
            device: there,
            unet_encoder,
            unet_decoder,
            weights,
            kernels,
            graph,
            thread,
        });
        self.split_on = true;
        Ok(())
    }

    /// Turns split guidance off (one GPU, as before [`Pipeline::split_guidance`]) or back on.
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

    pub fn text_encoders_mut(&mut self) -> &mut TextEncoders {
        &mut self.text
    }

    /// Loads a ControlNet bundle (once per directory) and returns its index for [`ControlRequest`].
    pub fn controlnet(&mut self, dir: impl AsRef<Path>) -> Result<usize> {
        let dir = dir.as_ref();
        if let Some(i) = self
            .controlnets
            .iter()
            .position(|c| c.lock().unwrap_or_else(|e| e.into_inner()).bundle.dir == dir)
        {
            return Ok(i);
        }
        let cn = ControlNet::load(ControlNetBundle::open(dir)?, &self.bundle, &self.opts)?;
        self.controlnets.push(Arc::new(Mutex::new(cn)));
        Ok(self.controlnets.len() - 1)
    }

    /// Loads a ControlNet bundle on another device of this process (a ControlNet per GPU: its
    /// sessions read the step's latent across GPUs and the residuals come back by peer copy).
    /// Each call loads a new instance, so one bundle can run on several GPUs.
    pub fn controlnet_on(&mut self, dir: impl AsRef<Path>, device: Device) -> Result<usize> {
        self.load_controlnet(dir.as_ref(), device, 2)
    }

    /// Loads a ControlNet once per guidance half (the Katz paper's placement: one GPU per
    /// ControlNet per half): an instance at batch 1 on `uncond` for the unconditional half and one
    /// on `cond` for the conditional half. With split guidance each runs its half's latent and
    /// its residuals go to that half's GPU; without, the `uncond` instance runs the whole batch
    /// (with static shapes it is fixed to batch 1, so such a job is refused by ONNX Runtime).
    /// Returns the index requests name ([`ControlRequest::model`]).
    pub fn controlnet_halves(
        &mut self,
        dir: impl AsRef<Path>,
        uncond: Device,
        cond: Device,
    ) -> Result<usize> {
        let u = self.load_controlnet(dir.as_ref(), uncond, 1)?;
        let c = self.load_controlnet(dir.as_ref(), cond, 1)?;
        self.cn_halves.insert(u, c);
        Ok(u)
    }

    /// A new ControlNet instance on `device` for a batch of `batch`, with peer access to the
    /// pipeline's GPUs; its index.
    fn load_controlnet(&mut self, dir: &Path, device: Device, batch: usize) -> Result<usize> {
        let opts = SessionOptions {
            device,
            ..self.opts.clone()
        };
        let cn = ControlNet::load_batch(ControlNetBundle::open(dir)?, &self.bundle, &opts, batch)?;
        if let Some(b) = device.gpu() {
            // residuals go to the pipeline's GPU and, with split guidance, to the second half's
            // (without peer access the driver stages such a copy through host memory)
            for a in self
                .opts
                .device
                .gpu()
                .into_iter()
                .chain(self.half.as_ref().map(|h| h.device))
            {
                peer(a, b)?;
            }
        }
        self.controlnets.push(Arc::new(Mutex::new(cn)));
        Ok(self.controlnets.len() - 1)
    }

    /// The GPUs this pipeline's ControlNets run on.
    fn controlnet_gpus(&self) -> Vec<usize> {
        self.controlnets
            .iter()
            .filter_map(|c| c.lock().unwrap_or_else(|e| e.into_inner()).gpu())
            .collect()
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
        Ok(Arc::new(LoraAdapter::load(path.as_ref(), self.weights.map())?))
    }

    /// Checks a request before any model work; every problem is an [`Error::InvalidRequest`].
    pub fn validate(&self, req: &Request) -> Result<()> {
        self.validate_for(req, false)
    }

    /// [`Pipeline::validate`]; with `remote`, ControlNets run elsewhere (no loaded model needed).
    pub fn validate_for(&self, req: &Request, remote: bool) -> Result<()> {
        let f = self.bundle.manifest.vae_scale_factor;
        let bad = |m: String| Err(Error::InvalidRequest(m));
        if req.steps == 0 {
            return bad("steps must be at least 1".into());
        }
        if req.steps > MAX_STEPS {
            return bad(format!("steps must be at most {MAX_STEPS}, got {}", req.steps));
        }
        for (what, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % f != 0 {
                return bad(format!("{what} must be a positive multiple of {f}, got {v}"));
            }
            if v > MAX_SIDE {
                return bad(format!("{what} must be at most {MAX_SIDE}, got {v}"));
            }
        }
        if !req.guidance.is_finite() || req.guidance < 0.0 {
            return bad(format!(
                "guidance must be a finite number ≥ 0, got {}",
                req.guidance
            ));
        }
        if let Some(fx) = self.opts.fixed {
            let split = self.split_on && req.guidance > 1.0;
            let batch = if req.guidance > 1.0 && !split { 2 } else { 1 };
            if (req.width, req.height) != (fx.width, fx.height) || batch != fx.unet_batch {
                return bad(format!(
                    "this pipeline's graphs are fixed to {}x{} with a UNet batch of {} (static shapes); \
                     the request is {}x{} with a batch of {batch}",
                    fx.width, fx.height, fx.unet_batch, req.width, req.height
                ));
            }
        }
        for (i, c) in req.controlnets.iter().enumerate() {
            if !remote && c.model >= self.controlnets.len() {
                return bad(format!("ControlNet #{i} refers to a model that is not loaded"));
            }
            if !c.scale.is_finite() {
                return bad(format!("ControlNet #{i}: scale must be finite"));
            }
            if !(0.0..=1.0).contains(&c.start) || !(0.0..=1.0).contains(&c.end) || c.start >= c.end {
                return bad(format!(
                    "ControlNet #{i}: need 0 ≤ start < end ≤ 1, got {}..{}",
                    c.start, c.end
                ));
            }
            if c.image.shape != [1, 3, req.height, req.width] {
                return bad(format!(
                    "ControlNet #{i}: conditioning image is {}×{}, the request is {}×{}",
                    c.image.shape.get(3).unwrap_or(&0),
                    c.image.shape.get(2).unwrap_or(&0),
                    req.width,
                    req.height
                ));
            }
        }
        for (lora, scale) in &req.loras {
            if !scale.is_finite() {
                return bad(format!("LoRA {}: scale must be finite", lora.name));
            }
        }
        Ok(())
    }

    /// Runs a request with its seeded noise.
    pub fn generate(&mut self, req: &Request, obs: &mut dyn Observer) -> Result<Generated> {
        let mut noise = SeededNoise::new(req.seed);
        self.generate_with_noise(req, &mut noise, obs)
    }

    /// Runs a request drawing the initial latents (and any ancestral noise) from `noise`.
    pub fn generate_with_noise(
        &mut self,
        req: &Request,
        noise: &mut dyn NoiseSource,
        obs: &mut dyn Observer,
    ) -> Result<Generated> {
        self.generate_planned(req, noise, obs, LoraPlan::Sync)
    }

    /// Runs a request with its LoRAs arriving as `plan` says.
    pub fn generate_planned(
        &mut self,
        req: &Request,
        noise: &mut dyn NoiseSource,
        obs: &mut dyn Observer,
        plan: LoraPlan<'_>,
    ) -> Result<Generated> {
        self.generate_with(req, noise, obs, plan, None)
    }

    /// Runs a request with its LoRAs arriving as `plan` says and, with `control`, its ControlNets
    /// in sessions of that service: each step's input goes to every active session before the UNet
    /// encoder runs, the residuals are collected after it (overlap). Without `control` the
    /// pipeline's own ControlNets run one after another after the encoder (in-process serial).
    pub fn generate_with(
        &mut self,
        req: &Request,
        noise: &mut dyn NoiseSource,
        obs: &mut dyn Observer,
        plan: LoraPlan<'_>,
        control: Option<&mut dyn ControlService>,
    ) -> Result<Generated> {
        self.validate_for(req, control.is_some())?;
        let started = Instant::now();
        let mut t = Timings {
            steps: req.steps,
            ..Timings::default()
        };
        let m = &self.bundle.manifest;
        let (f, lc) = (m.vae_scale_factor, m.latent_channels);
        let (h, w) = (req.height / f, req.width / f);
        let cfg = req.guidance > 1.0;
        let b = if cfg { 2 } else { 1 };

        let mut sched_cfg = m.scheduler.clone();
        sched_cfg.use_karras_sigmas = req.karras;
        let mut sched = scheduler::build(req.scheduler, &sched_cfg, req.steps)?;

        let t0 = Instant::now();
        self.make_current()?;
        let cond = self.text.condition(
            &req.prompt,
            req.negative_prompt.as_deref(),
            cfg,
            (req.height, req.width),
        )?;
        t.text_encode = t0.elapsed();

        let t0 = Instant::now();
        // `pending`: an asynchronous merge not switched in yet, and its bound step
        let (mut merged, mut pending) = match plan {
            LoraPlan::Sync if req.loras.is_empty() => (Arc::new(MergedWeights::default()), None),
            LoraPlan::Sync => {
                t.lora_switch_step = Some(0);
                (Arc::new(self.weights.merge(&req.loras)?), None)
            }
            LoraPlan::Async {
                pending,
                bound,
                timeout,
                early,
            } => (
                Arc::new(MergedWeights::default()),
                Some((pending, bound.min(req.steps - 1), timeout, early)),
            ),
        };
        t.lora_merge = t0.elapsed();

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
        let gpu = self.opts.device.gpu();
        let control: Option<&mut dyn ControlService> = match control {
            Some(c) => Some(c),
            None if gpu.is_some() && !req.controlnets.is_empty() => Some(&mut inline),
            None => None,
        };
        let mut sessions: Vec<Box<dyn ControlSession>> = Vec::new();
        // per-half ControlNets under split guidance: `sessions[j]` takes the unconditional half,
        // `halves[j]` the conditional one
        let mut halves: Vec<Option<Box<dyn ControlSession>>> = Vec::new();
        let split = gpu.is_some() && self.half.is_some() && self.split_on && cfg;
        // each half's conditioning, made once for all the per-half ControlNets of the job
        let per_half = req
            .controlnets
            .iter()
            .any(|c| self.cn_halves.contains_key(&c.model));
        let cond_halves = if split && per_half {
            Some((half_cond(&cond, 0)?, half_cond(&cond, 1)?))
        } else {
            None
        };
        if let Some(svc) = control {
            let t0 = Instant::now();
            for (j, (c, image)) in req.controlnets.iter().zip(&images).enumerate() {
                match (self.cn_halves.get(&c.model), &cond_halves) {
                    (Some(&other), Some((cu, cc))) => {
                        let image = &c.image;
                        sessions.push(svc.open(j, c, SessionInit { cond: cu, image })?);
                        let cr = ControlRequest {
                            model: other,
                            ..c.clone()
                        };
                        halves.push(Some(svc.open(j, &cr, SessionInit { cond: cc, image })?));
                    }
                    _ => {
                        sessions.push(svc.open(j, c, SessionInit { cond: &cond, image })?);
                        halves.push(None);
                    }
                }
            }
            t.controlnet += t0.elapsed();
        }
        let mut latents = Tensor::zeros(vec![1, lc, h, w]);
        noise.fill(&mut latents.data);
        let sigma0 = sched.init_noise_sigma();
        latents.data.iter_mut().for_each(|v| *v *= sigma0);

        let n = req.steps;
        let timesteps = sched.timesteps().to_vec();
        if let Some(id) = gpu {
            let job = DeviceJob {
                req,
                noise,
                obs,
                sched: &mut *sched,
                cond: &cond,
                merged,
                pending,
                sessions: &mut sessions,
                halves: &mut halves,
                t: &mut t,
                started,
            };
            latents = self.device_loop(id, job, latents)?;
        } else {
            let mut guided = Tensor::zeros(latents.shape.clone());
            for (i, &ts) in timesteps.iter().enumerate() {
                let _step = tracing::debug_span!("step", i, t = ts).entered();
                if let Some(m) = poll_lora(&mut pending, i, &mut t)? {
                    merged = m;
                }
                let scale_in = sched.input_scale(i);
                let mut latent_in = if cfg {
                    Tensor::concat0(&[&latents, &latents])
                } else {
                    latents.clone()
                };
                latent_in.data.iter_mut().for_each(|v| *v *= scale_in);
                let timestep = Tensor::new(vec![b], vec![ts; b]);

                let active = active_controlnets(req, i);
                // sessions start on this step's residuals now: they overlap the UNet encoder
                let t0 = Instant::now();
                for &j in &active {
                    if let Some(s) = sessions.get_mut(j) {
                        s.send(i, &latent_in, &timestep)?;
                    }
                }
                t.controlnet += t0.elapsed();
                let mut sc = StepControl {
                    req,
                    images: &images,
                    active: &active,
                    sessions: &mut sessions,
                    step: i,
                    path: StepPath::default(),
                };
                let pred = self.host_unet_step(&latent_in, &timestep, &cond, &merged, &mut sc, &mut t)?;

                let t0 = Instant::now();
                if cfg {
                    guidance::combine(&pred.data, req.guidance, &mut guided.data);
                } else {
                    guided.data.copy_from_slice(&pred.data);
                }
                sched.step(i, &guided.data, &mut latents.data, noise);
                t.scheduler += t0.elapsed();
                if i == 0 {
                    t.first_step = started.elapsed();
                }
                obs.on_step(i, n, &latents)?;
            }
        }

        for s in sessions.iter_mut().chain(halves.iter_mut().flatten()) {
            s.close();
        }
        let t0 = Instant::now();
        self.make_current()?;
        let image = self.decode(&latents).map_err(|e| at("VAE decode", e))?;
        t.vae_decode = t0.elapsed();
        t.total = started.elapsed();
        Ok(Generated { image, timings: t })
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

    /// The denoising loop on GPU `id`, device-resident (DESIGN.md, GPU path):
    ///
    /// ```text
    /// latents ─scale──▶ latent_in ─┬─▶ UNet encoder ─▶ emb, mid, skips ──┐        (in place, bound)
    ///  (device)       (bound once) └─▶ ControlNet sessions ─▶ residuals ─┴─ axpy ─▶ UNet decoder
    ///     ▲                                                                           │ noise_pred
    ///     └──────────── euler ◀── guided ◀── combine ◀────────────────────────────────┘
    /// ```
    ///
    /// The host uploads the initial latents and downloads the final ones; per step only the
    /// timestep goes up. ControlNet sessions without a device path get the latent downloaded and
    /// their residuals uploaded; residuals on another GPU come over by peer copy. Schedulers other
    /// than plain Euler step on the host (one download and upload per step).
    fn device_loop(&mut self, id: i32, job: DeviceJob<'_, '_>, host_latents: Tensor) -> Result<Tensor> {
        let DeviceJob {
            req,
            noise,
            obs,
            sched,
            cond,
            mut merged,
            mut pending,
            sessions,
            halves,
            t,
            started,
        } = job;
        if self.half.is_some() && self.split_on && req.guidance > 1.0 {
            let job = DeviceJob {
                req,
                noise,
                obs,
                sched,
                cond,
                merged,
                pending,
                sessions,
                halves,
                t,
                started,
            };
            return self.split_loop(id, job, host_latents);
        }
        let k = self.step_kernels(id)?;
        let dev = id as usize;
        let n = req.steps;
        let cfg = req.guidance > 1.0;
        let b = if cfg { 2 } else { 1 };
        let mut in_shape = host_latents.shape.clone();
        in_shape[0] = b;
        let mut latents = DevTensor::upload(&k, &host_latents)?;
        let mut guided = DevTensor::zeros(&k, host_latents.shape.clone())?;
        let g = |e: katz_kernels::cuda::GpuError| gpu_err(e);
        let skips = self.bundle.manifest.unet.skips;
        let Pipeline {
            unet_encoder,
            unet_decoder,
            weights,
            graph,
            ..
        } = self;

        current(&k)?;
        let mut unet = JobUnet::open(
            graph.as_mut(),
            (unet_encoder, unet_decoder),
            weights,
            skips,
            cond,
            (&merged, weights),
            &k,
            in_shape,
        )?;
        // residuals from the host or from another GPU land here before they are added
        let mut staging: Vec<Option<DevTensor>> = (0..=skips).map(|_| None).collect();
        let empty = Tensor::new(vec![0], vec![]);
        let timesteps = sched.timesteps().to_vec();

        for (i, &ts) in timesteps.iter().enumerate() {
            let _step = tracing::debug_span!("step", i, t = ts).entered();
            if let Some(m) = poll_lora(&mut pending, i, t)? {
                merged = m;
                current(&k)?;
                unet.switch_weights(weights, &merged, weights)?;
            }
            let t0 = Instant::now();
            k.scale(&latents.buf, sched.input_scale(i), &mut unet.sample_mut().buf, b)
                .map_err(g)?;
            k.synchronize().map_err(g)?;
            let timestep = Tensor::new(vec![b], vec![ts; b]);
            t.scheduler += t0.elapsed();

            let active = active_controlnets(req, i);
            let t0 = Instant::now();
            send_step(sessions, &active, i, unet.sample(), &k, &timestep)?;
            t.controlnet += t0.elapsed();

            let t0 = Instant::now();
            let targets = unet.encode(unet_encoder, ts)?;
            let encoder_end = Instant::now();
            t.unet_encoder += encoder_end - t0;

            let t0 = Instant::now();
            if !active.is_empty() {
                let mut path = StepPath::default();
                // residual r < skips goes to skip r, the last to mid
                for &j in &active {
                    let c = &req.controlnets[j];
                    let res = recv_residuals(&mut sessions[j], i, j, &mut staging, &k)?;
                    path.note(j, sessions[j].last_span());
                    let who = format!("ControlNet #{j}");
                    for (r, rr) in res.iter().enumerate() {
                        let target = if r < skips { &targets[2 + r] } else { &targets[1] };
                        add_residual(&who, target, rr, c.scale, &k, dev, &mut staging[r])
                            .map_err(|e| at(&who, e))?;
                    }
                }
                k.synchronize().map_err(g)?;
                path.finish(t, encoder_end, Instant::now());
            }
            t.controlnet += t0.elapsed();

            let t0 = Instant::now();
            let pred = unet.decode(unet_decoder)?;
            t.unet_decoder += t0.elapsed();

            let t0 = Instant::now();
            if pred.len() != b * guided.len() {
                return Err(Error::Gpu(format!(
                    "noise_pred {:?} for latents {:?}",
                    pred.shape, guided.shape
                )));
            }
            // SAFETY: the prediction stays alive (until `end_step`) past the synchronise below
            unsafe {
                if cfg {
                    k.combine_raw(pred.ptr, req.guidance, &mut guided.buf)
                        .map_err(g)?;
                } else {
                    k.copy_raw(guided.ptr(&k), pred.ptr, guided.len() * 4)
                        .map_err(g)?;
                }
            }
            scheduler_step(sched, i, &k, &mut latents, &guided, noise)?;
            k.synchronize().map_err(g)?;
            unet.end_step();
            t.scheduler += t0.elapsed();
            if i == 0 {
                t.first_step = started.elapsed();
            }
            if obs.wants_latents() {
                obs.on_step(i, n, &latents.download(&k)?)?;
            } else {
                obs.on_step(i, n, &empty)?;
            }
        }
        drop(unet);
        let out = latents.download(&k)?;
        drop(merged);
        Ok(out)
    }

    /// [`Pipeline::device_loop`] with the guidance halves on two GPUs (latent parallelism):
    ///
    /// ```text
    /// GPU a: latents ─scale─▶ [x_u; x_c] ──x_u────────▶ encoder(x_u) ─┐+res_u  decoder ─▶ ε_u ─┐
    ///                              │ x_c (peer copy)     ControlNets ─┤ (batch 2, anywhere)    ├─▶ combine ─▶ euler (once)
    /// GPU b:                       └───────────────────▶ encoder(x_c) ─┘+res_c  decoder ─▶ ε_c ─┘ (peer copy)
    /// ```
    ///
    /// Each phase (encoders, decoders) runs on both GPUs at once; ControlNet sessions take the
    /// batch-2 latent as on one GPU and each half of their residuals goes to its GPU.
    fn split_loop(&mut self, id: i32, job: DeviceJob<'_, '_>, host_latents: Tensor) -> Result<Tensor> {
        let DeviceJob {
            req,
            noise,
            obs,
            sched,
            cond,
            mut merged,
            mut pending,
            sessions,
            halves,
            t,
            started,
        } = job;
        let k0 = self.step_kernels(id)?;
        let skips = self.bundle.manifest.unet.skips;
        let n_steps = req.steps;
        let g = |e: katz_kernels::cuda::GpuError| gpu_err(e);
        let Pipeline {
            unet_encoder,
            unet_decoder,
            weights,
            half,
            graph,
            ..
        } = self;
        let h = half
            .as_mut()
            .ok_or_else(|| Error::Gpu("split guidance without a second GPU".into()))?;
        let k1 = h.kernels.clone();
        let (d0, d1) = (id as usize, h.device as usize);
        let lat_shape = host_latents.shape.clone();
        let n = host_latents.data.len();
        let mut in2 = lat_shape.clone();
        in2[0] = 2;
        let mut latents = DevTensor::upload(&k0, &host_latents)?;
        let mut latent_in = DevTensor::zeros(&k0, in2.clone())?; // [x_u; x_c] on GPU a
        let pred2 = DevTensor::zeros(&k0, in2)?; // [ε_u; ε_c] on GPU a
        let mut guided = DevTensor::zeros(&k0, lat_shape.clone())?;
        let (cond_u, cond_c) = (half_cond(cond, 0)?, half_cond(cond, 1)?);
        current(&k0)?;
        let mut uu = JobUnet::open(
            graph.as_mut(),
            (unet_encoder, unet_decoder),
            weights,
            skips,
            &cond_u,
            (&merged, weights),
            &k0,
            lat_shape.clone(),
        )
        .map_err(|e| at("binding the unconditional half", e))?;
        current(&k1)?;
        let mut uc = JobUnet::open(
            h.graph.as_mut(),
            (&h.unet_encoder, &h.unet_decoder),
            &h.weights,
            skips,
            &cond_c,
            (&merged, weights),
            &k1,
            lat_shape.clone(),
        )
        .map_err(|e| at("binding the conditional half", e))?;
        // the conditional halves of residuals land here (on GPU b) before they are added
        let mut stage_c: Vec<Option<DevTensor>> = (0..=skips).map(|_| None).collect();
        let mut stage_h: Vec<Option<DevTensor>> = (0..=skips).map(|_| None).collect();
        let empty = Tensor::new(vec![0], vec![]);
        let timesteps = sched.timesteps().to_vec();

        for (i, &ts) in timesteps.iter().enumerate() {
            let _step = tracing::debug_span!("step", i, t = ts, split = true).entered();
            if let Some(m) = poll_lora(&mut pending, i, t)? {
                merged = m;
                current(&k0)?;
                uu.switch_weights(weights, &merged, weights)
                    .map_err(|e| at("switching the unconditional half's weights", e))?;
                current(&k1)?;
                uc.switch_weights(&h.weights, &merged, weights)
                    .map_err(|e| at("switching the conditional half's weights", e))?;
            }
            let t0 = Instant::now();
            k0.scale(&latents.buf, sched.input_scale(i), &mut latent_in.buf, 2)
                .map_err(g)?;
            k0.synchronize().map_err(g)?;
            let x = latent_in.ptr(&k0);
            // SAFETY: x_u and x_c are the halves of `latent_in`, complete after the synchronise;
            // each sample buffer holds n f32
            unsafe {
                k0.copy_raw(uu.sample().ptr(&k0), x, n * 4).map_err(g)?;
                k1.copy_raw(uc.sample().ptr(&k1), x + (n * 4) as u64, n * 4)
                    .map_err(g)?;
            }
            k0.synchronize().map_err(g)?;
            k1.synchronize().map_err(g)?;
            let ts2 = Tensor::new(vec![2], vec![ts; 2]);
            t.scheduler += t0.elapsed();

            let active = active_controlnets(req, i);
            let t0 = Instant::now();
            let (split_cn, whole): (Vec<usize>, Vec<usize>) = active
                .iter()
                .partition(|&&j| halves.get(j).is_some_and(|h| h.is_some()));
            send_step(sessions, &whole, i, &latent_in, &k0, &ts2)?;
            // per-half ControlNets: each half's latent as its UNet half reads it, batch 1
            let ts1 = Tensor::new(vec![1], vec![ts]);
            for &j in &split_cn {
                let (xu, xc) = (uu.sample().dev_ref(&k0), uc.sample().dev_ref(&k1));
                sessions[j].send_device(i, &xu, &ts1)?;
                if let Some(hc) = halves[j].as_mut() {
                    hc.send_device(i, &xc, &ts1)?;
                }
            }
            t.controlnet += t0.elapsed();

            // phase 1: both encoders at once
            let t0 = Instant::now();
            let (tu, tc) = {
                let (hs, hu) = (&mut h.unet_encoder, Sent(&mut uc));
                let (mine, theirs) = on_both(
                    &h.thread,
                    move || hu.into_inner().encode(hs, ts),
                    || uu.encode(unet_encoder, ts),
                );
                (
                    mine.map_err(|e| at("unconditional encoder", e))?,
                    theirs.map_err(|e| at("conditional encoder", e))?,
                )
            };
            let encoder_end = Instant::now();
            t.unet_encoder += encoder_end - t0;

            let t0 = Instant::now();
            if !active.is_empty() {
                let mut path = StepPath::default();
                for &j in &active {
                    let c = &req.controlnets[j];
                    let res = recv_residuals(&mut sessions[j], i, j, &mut stage_h, &k0)?;
                    path.note(j, sessions[j].last_span());
                    if let Some(hc) = halves.get_mut(j).and_then(|h| h.as_mut()) {
                        // per-half: the unconditional residuals to GPU a, the conditional to GPU b
                        let res_c = recv_residuals(hc, i, j, &mut stage_c, &k1)?;
                        path.note(j, hc.last_span());
                        let (wu, wc) = (
                            format!("ControlNet #{j}, unconditional half"),
                            format!("ControlNet #{j}, conditional half"),
                        );
                        for (r, (ru, rc)) in res.iter().zip(&res_c).enumerate() {
                            let (au, ac) = if r < skips {
                                (&tu[2 + r], &tc[2 + r])
                            } else {
                                (&tu[1], &tc[1])
                            };
                            add_residual(&wu, au, ru, c.scale, &k0, d0, &mut stage_h[r])
                                .map_err(|e| at(&wu, e))?;
                            add_residual(&wc, ac, rc, c.scale, &k1, d1, &mut stage_c[r])
                                .map_err(|e| at(&wc, e))?;
                        }
                        continue;
                    }
                    for (r, rr) in res.iter().enumerate() {
                        let (au, ac) = if r < skips {
                            (&tu[2 + r], &tc[2 + r])
                        } else {
                            (&tu[1], &tc[1])
                        };
                        let half_n = au.len();
                        if rr.len() != 2 * half_n || ac.len() != half_n {
                            return Err(Error::InvalidRequest(format!(
                                "ControlNet #{j}: residual {:?} does not fit two halves of {:?}",
                                rr.shape, au.shape
                            )));
                        }
                        // unconditional half: first half of the residual, added on GPU a
                        let src_u = if rr.device == d0 {
                            rr.ptr
                        } else {
                            let st = stage(&mut stage_h[r], &k0, &au.shape)?;
                            let p = st.ptr(&k0);
                            // SAFETY: the session keeps its buffer until its next step
                            unsafe { k0.copy_raw(p, rr.ptr, half_n * 4) }.map_err(g)?;
                            p
                        };
                        // SAFETY: targets are the encoders' live outputs; nothing else writes them
                        unsafe { k0.axpy_raw(au.ptr, src_u, c.scale, half_n) }.map_err(g)?;
                        // conditional half: second half, to GPU b
                        let second = rr.ptr + (half_n * 4) as u64;
                        let src_c = if rr.device == d1 {
                            second
                        } else {
                            let st = stage(&mut stage_c[r], &k1, &ac.shape)?;
                            let p = st.ptr(&k1);
                            unsafe { k1.copy_raw(p, second, half_n * 4) }.map_err(g)?;
                            p
                        };
                        unsafe { k1.axpy_raw(ac.ptr, src_c, c.scale, half_n) }.map_err(g)?;
                    }
                }
                k0.synchronize().map_err(g)?;
                k1.synchronize().map_err(g)?;
                path.finish(t, encoder_end, Instant::now());
            }
            t.controlnet += t0.elapsed();

            // phase 2: both decoders at once
            let t0 = Instant::now();
            let (ru, rc) = {
                let (hs, hu) = (&mut h.unet_decoder, Sent(&mut uc));
                let (mine, theirs) = on_both(
                    &h.thread,
                    move || hu.into_inner().decode(hs),
                    || uu.decode(unet_decoder),
                );
                (
                    mine.map_err(|e| at("unconditional decoder", e))?,
                    theirs.map_err(|e| at("conditional decoder", e))?,
                )
            };
            t.unet_decoder += t0.elapsed();

            let t0 = Instant::now();
            if ru.len() != n || rc.len() != n {
                return Err(Error::Gpu(format!(
                    "noise_pred {:?} for latents {:?}",
                    ru.shape, lat_shape
                )));
            }
            let p2 = pred2.ptr(&k0);
            // SAFETY: both predictions stay alive (until `end_step`) past the synchronise below
            unsafe {
                k0.copy_raw(p2, ru.ptr, n * 4).map_err(g)?;
                k0.copy_raw(p2 + (n * 4) as u64, rc.ptr, n * 4).map_err(g)?;
            }
            k0.combine(&pred2.buf, req.guidance, &mut guided.buf).map_err(g)?;
            scheduler_step(sched, i, &k0, &mut latents, &guided, noise)?;
            k0.synchronize().map_err(g)?;
            uu.end_step();
            uc.end_step();
            t.scheduler += t0.elapsed();
            if i == 0 {
                t.first_step = started.elapsed();
            }
            if obs.wants_latents() {
                obs.on_step(i, n_steps, &latents.download(&k0)?)?;
            } else {
                obs.on_step(i, n_steps, &empty)?;
            }
        }
        drop((uu, uc));
        let out = latents.download(&k0)?;
        drop((merged, pred2, latent_in));
        Ok(out)
    }

    /// Latents → image in [0, 1] (diffusers: `vae.decode(latents / scaling_factor)`, `x/2 + 0.5`, clamp).
    pub fn decode(&mut self, latents: &Tensor) -> Result<Tensor> {
        let s = self.bundle.manifest.scaling_factor;
        let scaled = Tensor::new(
            latents.shape.clone(),
            latents.data.iter().map(|v| v / s).collect(),
        );
        let out = self.vae.run(ort::inputs!["latent" => scaled.view()?])?;
        let mut image = Tensor::from_output(&out, "image")?;
        image
            .data
            .iter_mut()
            .for_each(|v| *v = (*v / 2.0 + 0.5).clamp(0.0, 1.0));
        Ok(image)
    }

    /// One UNet step with host tensors: encoder, ControlNet residuals, decoder.
    fn host_unet_step(
        &mut self,
        latent_in: &Tensor,
        timestep: &Tensor,
        cond: &Conditioning,
        merged: &MergedWeights,
        sc: &mut StepControl<'_>,
        t: &mut Timings,
    ) -> Result<Tensor> {
        let t0 = Instant::now();
        let (emb, mut mid, mut skips) = self.run_encoder(latent_in, timestep, cond, merged)?;
        let encoder_end = Instant::now();
        t.unet_encoder += encoder_end - t0;
        let t0 = Instant::now();
        add_residuals(
            &self.controlnets,
            sc,
            latent_in,
            timestep,
            cond,
            &mut mid,
            &mut skips,
        )?;
        std::mem::take(&mut sc.path).finish(t, encoder_end, Instant::now());
        t.controlnet += t0.elapsed();
        let t0 = Instant::now();
        let pred = self.run_decoder(&emb, cond, &mid, &skips, merged)?;
        t.unet_decoder += t0.elapsed();
        Ok(pred)
    }

    fn run_encoder(
        &mut self,
        latent_in: &Tensor,
        timestep: &Tensor,
        cond: &Conditioning,
        merged: &MergedWeights,
    ) -> Result<(Tensor, Tensor, Vec<Tensor>)> {
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            ("sample".into(), latent_in.view()?.into()),
            ("timestep".into(), timestep.view()?.into()),
            ("encoder_hidden_states".into(), cond.prompt_embeds.view()?.into()),
            ("text_embeds".into(), cond.pooled.view()?.into()),
            ("time_ids".into(), cond.time_ids.view()?.into()),
        ];
        // sessions and weights are disjoint fields: borrow them apart
        let Pipeline {
            unet_encoder,
            weights,
            bundle,
            ..
        } = self;
        for name in weights.inputs_of("unet_encoder") {
            inputs.push((Cow::Borrowed(name.as_str()), merged.get(weights, name).into()));
        }
        let out = unet_encoder.run(inputs)?;
        let emb = Tensor::from_output(&out, "emb")?;
        let mid = Tensor::from_output(&out, "mid")?;
        let skips = skip_names(bundle.manifest.unet.skips)
            .iter()
            .map(|n| Tensor::from_output(&out, n))
            .collect::<Result<Vec<_>>>()?;
        Ok((emb, mid, skips))
    }

    fn run_decoder(
        &mut self,
        emb: &Tensor,
        cond: &Conditioning,
        mid: &Tensor,
        skips: &[Tensor],
        merged: &MergedWeights,
    ) -> Result<Tensor> {
        let names = skip_names(skips.len());
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
            ("emb".into(), emb.view()?.into()),
            ("encoder_hidden_states".into(), cond.prompt_embeds.view()?.into()),
            ("mid".into(), mid.view()?.into()),
        ];
        for (n, s) in names.iter().zip(skips) {
            inputs.push((Cow::Borrowed(n.as_str()), s.view()?.into()));
        }
        let Pipeline {
            unet_decoder,
            weights,
            ..
        } = self;
        for name in weights.inputs_of("unet_decoder") {
            inputs.push((Cow::Borrowed(name.as_str()), merged.get(weights, name).into()));
        }
        let out = unet_decoder.run(inputs)?;
        Tensor::from_output(&out, "noise_pred")
    }
}

/// An asynchronous merge not switched in yet: the merge, its bound step, timeout, early switch.
type Pending<'p> = Option<(&'p mut PendingMerge, usize, Duration, bool)>;

/// At the boundary before step `i`: the merged weights if they switch in now (waiting for them
/// at the bound, recorded in `t.lora_wait`), else `None`.
fn poll_lora(pending: &mut Pending<'_>, i: usize, t: &mut Timings) -> Result<Option<Arc<MergedWeights>>> {
    let Some((p, k, timeout, early)) = pending.as_mut() else {
        return Ok(None);
    };
    let t0 = Instant::now();
    let ready = if i >= *k {
        let r = p.poll(Some(*timeout)).unwrap_or_else(|| {
            Err(Error::Lora {
                path: "<merge>".into(),
                message: format!("the LoRA merge was not ready {timeout:?} after step {i} (bound {k})"),
            })
        });
        t.lora_wait += t0.elapsed();
        Some(r)
    } else if *early {
        p.poll(None)
    } else {
        None
    };
    let Some(r) = ready else {
        return Ok(None);
    };
    let merged = r?;
    t.lora_merge = merged.merge_time;
    t.lora_switch_step = Some(i);
    *pending = None;
    tracing::debug!(step = i, layers = merged.len(), "LoRA weights switched in");
    Ok(Some(merged))
}

/// The ControlNets acting at step `i` (diffusers' controlnet_keep: start ≤ i/n and (i+1)/n ≤ end).
fn active_controlnets(req: &Request, i: usize) -> Vec<usize> {
    let n = req.steps;
    let (lo, hi) = (i as f32 / n as f32, (i + 1) as f32 / n as f32);
    req.controlnets
        .iter()
        .enumerate()
        .filter(|(_, c)| lo >= c.start && hi <= c.end)
        .map(|(j, _)| j)
        .collect()
}

/// What the device loop needs of a job (prepared by [`Pipeline::generate_with`]).
struct DeviceJob<'a, 'p> {
    req: &'a Request,
    noise: &'a mut dyn NoiseSource,
    obs: &'a mut dyn Observer,
    sched: &'a mut dyn Scheduler,
    cond: &'a Conditioning,
    merged: Arc<MergedWeights>,
    pending: Pending<'p>,
    sessions: &'a mut Vec<Box<dyn ControlSession>>,
    /// Per ControlNet, its conditional half's session when it runs per guidance half (split
    /// guidance; `sessions[j]` then takes the unconditional half).
    halves: &'a mut Vec<Option<Box<dyn ControlSession>>>,
    t: &'a mut Timings,
    started: Instant,
}

/// The UNet graphs of a job bound on GPU `device_id`: weights bound in place (pristine, or merged
/// where a LoRA touched them), conditioning copied up once, outputs left on the device.
fn bind_unet(
    enc_session: &Session,
    dec_session: &Session,
    weights: &Weights,
    skips: usize,
    cond: &Conditioning,
    merged: &MergedWeights,
    device_id: i32,
) -> Result<BoundUnet> {
    let dev = crate::device::cuda_memory(device_id)?;
    let mut enc = enc_session.create_binding()?;
    let mut dec = dec_session.create_binding()?;
    for b in [&mut enc, &mut dec] {
        b.bind_input("encoder_hidden_states", &*cond.prompt_embeds.view()?)?;
    }
    enc.bind_input("text_embeds", &*cond.pooled.view()?)?;
    enc.bind_input("time_ids", &*cond.time_ids.view()?)?;
    for (b, graph) in [(&mut enc, "unet_encoder"), (&mut dec, "unet_decoder")] {
        for name in weights.inputs_of(graph) {
            bind_weight(weights, b, name, merged, device_id)?;
        }
    }
    let mut outs = vec!["emb".to_string(), "mid".to_string()];
    outs.extend(skip_names(skips));
    for o in &outs {
        enc.bind_output_to_device(o.as_str(), &dev)?;
    }
    dec.bind_output_to_device("noise_pred", &dev)?;
    Ok(BoundUnet {
        enc,
        dec,
        enc_outputs: outs,
        device_id,
    })
}

/// Binds the weights a LoRA merge touched in place of the pristine ones (at a step boundary).
fn rebind_weights(weights: &Weights, bu: &mut BoundUnet, merged: &MergedWeights) -> Result<()> {
    for name in merged.names() {
        let b = match weights.map()[name].graph.as_str() {
            "unet_encoder" => &mut bu.enc,
            _ => &mut bu.dec,
        };
        bind_weight(weights, b, name, merged, bu.device_id)?;
    }
    Ok(())
}

/// Binds weight `name`: merged if a LoRA touched it, else pristine — in place from device
/// memory when the weights live on the GPU (no copy), else from the host.
fn bind_weight(
    weights: &Weights,
    b: &mut IoBinding,
    name: &str,
    merged: &MergedWeights,
    device_id: i32,
) -> Result<()> {
    let Some(dev) = weights.device() else {
        b.bind_input(name, merged.get(weights, name))?;
        return Ok(());
    };
    let buf = match merged.device(name) {
        Some(m) => m,
        None if merged.names().any(|n| n == name) => {
            // merged on the host (not expected with device weights): bind it with a copy
            b.bind_input(name, merged.get(weights, name))?;
            return Ok(());
        }
        None => dev.get(name),
    };
    // SAFETY: the buffer is owned by the pristine set or by `merged`, both kept alive for the
    // whole job (the bound UNet is dropped before them)
    unsafe { buf.bind(b, name, &weights.map()[name].shape, &dev.kernels, device_id) }
}

/// The second GPU's [`JobUnet`], lent to that GPU's thread while this one waits for it. `ort`
/// marks values `!Send` conservatively; an OrtValue is a buffer plus metadata with no thread
/// affinity, and only one thread uses it at a time ([`on_both`] returns after both ran).
struct Sent<T>(T);
// SAFETY: see above; the value is lent to one thread at a time, never shared.
unsafe impl<T> Send for Sent<T> {}

impl<T> Sent<T> {
    /// The value (a method, so that a `move` closure captures the whole wrapper, not its field).
    fn into_inner(self) -> T {
        self.0
    }
}

/// A job's UNet on one GPU, step by step: bound for this job alone (`Bound`), or the pipeline's
/// CUDA-graph bindings (`Graphed`, crate::graphs), whose buffers outlive the job and whose
/// graphs were captured when the pipeline loaded.
enum JobUnet<'g> {
    Bound(Box<BoundJob>),
    Graphed(&'g mut GraphedUnet),
}

/// [`JobUnet::Bound`]: the graphs bound for one job, its sample buffer, the step's outputs.
struct BoundJob {
    // the binding goes first: it is dropped before the sample buffer it points at
    bu: BoundUnet,
    sample: DevTensor,
    k: Arc<GpuKernels>,
    enc_vals: Vec<DynValue>,
    pred: Option<DynValue>,
    /// A merge copied over from another GPU's set (split guidance), kept while it is bound.
    merged_copy: Option<Arc<MergedWeights>>,
}

impl<'g> JobUnet<'g> {
    /// The UNet pair `sessions` on `k`'s GPU for a job: the pipeline's `graph` when it has one
    /// (the job's conditioning and weights copied in), else bound for this job. `own` is this
    /// GPU's pristine set; `merged.0` was merged from `merged.1` (this set, or another GPU's).
    #[allow(clippy::too_many_arguments)]
    fn open(
        graph: Option<&'g mut GraphedUnet>,
        sessions: (&Session, &Session),
        own: &Weights,
        skips: usize,
        cond: &Conditioning,
        merged: (&MergedWeights, &Weights),
        k: &Arc<GpuKernels>,
        sample_shape: Vec<usize>,
    ) -> Result<Self> {
        if let Some(g) = graph {
            if g.sample.shape != sample_shape {
                return Err(Error::InvalidRequest(format!(
                    "the CUDA graph was captured for a latent of {:?}, this job needs {:?}",
                    g.sample.shape, sample_shape
                )));
            }
            g.set_conditioning(cond)?;
            g.set_weights(own, merged.0, merged.1)?;
            return Ok(JobUnet::Graphed(g));
        }
        let bu = bind_unet(
            sessions.0,
            sessions.1,
            own,
            skips,
            cond,
            &MergedWeights::default(),
            k.ordinal() as i32,
        )?;
        let mut unet = JobUnet::Bound(Box::new(BoundJob {
            bu,
            sample: DevTensor::zeros(k, sample_shape)?,
            k: k.clone(),
            enc_vals: Vec::new(),
            pred: None,
            merged_copy: None,
        }));
        if !merged.0.is_empty() {
            unet.switch_weights(own, merged.0, merged.1)?;
        }
        Ok(unet)
    }

    fn sample(&self) -> &DevTensor {
        match self {
            JobUnet::Bound(j) => &j.sample,
            JobUnet::Graphed(g) => &g.sample,
        }
    }

    fn sample_mut(&mut self) -> &mut DevTensor {
        match self {
            JobUnet::Bound(j) => &mut j.sample,
            JobUnet::Graphed(g) => &mut g.sample,
        }
    }

    /// Switches to `merged` (made from `merged_on`'s weights) at a step boundary.
    fn switch_weights(&mut self, own: &Weights, merged: &MergedWeights, merged_on: &Weights) -> Result<()> {
        match self {
            JobUnet::Graphed(g) => g.set_weights(own, merged, merged_on),
            JobUnet::Bound(j) if std::ptr::eq(own, merged_on) => rebind_weights(own, &mut j.bu, merged),
            JobUnet::Bound(j) => {
                let copy = Arc::new(own.copy_merged_from(merged, merged_on)?);
                rebind_weights(own, &mut j.bu, &copy)?;
                j.merged_copy = Some(copy);
                Ok(())
            }
        }
    }

    /// Runs the encoder on the sample at timestep `t`: the addresses of `emb`, `mid`, skips, valid
    /// until [`JobUnet::end_step`] (ControlNet residuals are added to them in place).
    fn encode(&mut self, session: &mut Session, t: f32) -> Result<Vec<DevRef>> {
        match self {
            JobUnet::Graphed(g) => {
                current(g.kernels())?;
                Ok(g.encode(session, t)?.to_vec())
            }
            JobUnet::Bound(j) => {
                current(&j.k)?;
                let b = j.sample.shape[0];
                let timestep = Tensor::new(vec![b], vec![t; b]);
                // bound again every step: were ONNX Runtime to copy an input at bind time (a
                // consumer on the CPU), the copy must be of this step's latent
                let r = j.sample.dev_ref(&j.k);
                // SAFETY: the sample buffer outlives the binding (BoundJob's field order)
                let v = unsafe { r.ort()? };
                j.bu.enc.bind_input("sample", &*v)?;
                j.bu.enc.bind_input("timestep", &*timestep.view()?)?;
                j.enc_vals = run_encoder_bound(session, &j.bu)?;
                let dev = j.k.ordinal();
                j.enc_vals.iter().map(|v| DevRef::of_value(v, dev)).collect()
            }
        }
    }

    /// Runs the decoder on the encoder's outputs: the noise prediction's address, valid until
    /// [`JobUnet::end_step`].
    fn decode(&mut self, session: &mut Session) -> Result<DevRef> {
        match self {
            JobUnet::Graphed(g) => {
                current(g.kernels())?;
                Ok(g.decode(session)?.clone())
            }
            JobUnet::Bound(j) => {
                current(&j.k)?;
                for (name, v) in j.bu.enc_outputs.iter().zip(&j.enc_vals) {
                    j.bu.dec.bind_input(name.as_str(), v)?;
                }
                let p = run_decoder_bound(session, &j.bu)?;
                let r = DevRef::of_value(&p, j.k.ordinal())?;
                j.pred = Some(p);
                Ok(r)
            }
        }
    }

    /// Releases the step's outputs (after the stream that read them was synchronised).
    fn end_step(&mut self) {
        if let JobUnet::Bound(j) = self {
            j.enc_vals.clear();
            j.pred = None;
        }
    }
}

/// Runs a bound UNet encoder; its outputs (`emb`, `mid`, skips), left on the device.
fn run_encoder_bound(session: &mut Session, bu: &BoundUnet) -> Result<Vec<DynValue>> {
    let mut out = session.run_binding(&bu.enc)?;
    bu.enc.synchronize_outputs()?;
    bu.enc_outputs
        .iter()
        .map(|name| {
            out.remove(name.as_str())
                .ok_or_else(|| Error::Gpu(format!("UNet encoder gave no {name}")))
        })
        .collect()
}

/// Runs a bound UNet decoder; its noise prediction, left on the device.
fn run_decoder_bound(session: &mut Session, bu: &BoundUnet) -> Result<DynValue> {
    let mut out = session.run_binding(&bu.dec)?;
    bu.dec.synchronize_outputs()?;
    out.remove("noise_pred")
        .ok_or_else(|| Error::Gpu("UNet decoder gave no noise_pred".into()))
}

/// Guidance half `k` (0 unconditional, 1 conditional) of a batch-2 conditioning.
fn half_cond(c: &Conditioning, k: usize) -> Result<Conditioning> {
    let half = |t: &Tensor| -> Result<Tensor> {
        if t.shape.first() != Some(&2) {
            return Err(Error::InvalidRequest(format!(
                "split guidance needs both guidance halves, got a batch of {:?}",
                t.shape.first()
            )));
        }
        let n = t.data.len() / 2;
        let mut shape = t.shape.clone();
        shape[0] = 1;
        Ok(Tensor::new(shape, t.data[k * n..(k + 1) * n].to_vec()))
    };
    Ok(Conditioning {
        prompt_embeds: half(&c.prompt_embeds)?,
        pooled: half(&c.pooled)?,
        time_ids: half(&c.time_ids)?,
    })
}

/// The UNet graphs of one job bound on a GPU.
struct BoundUnet {
    enc: IoBinding,
    dec: IoBinding,
    /// `emb`, `mid`, `skip_0` … in that order.
    enc_outputs: Vec<String>,
    /// The GPU it is bound on.
    device_id: i32,
}

/// Hands step `i`'s scaled latent to the active sessions: in device memory where a session has a
/// device path, else downloaded once and sent from the host.
fn send_step(
    sessions: &mut [Box<dyn ControlSession>],
    active: &[usize],
    i: usize,
    latent_in: &DevTensor,
    k: &GpuKernels,
    timestep: &Tensor,
) -> Result<()> {
    let latent_ref = latent_in.dev_ref(k);
    let mut host_in: Option<Tensor> = None;
    for &j in active {
        let s = sessions
            .get_mut(j)
            .ok_or_else(|| Error::InvalidRequest(format!("ControlNet #{j} has no session")))?;
        if s.on_device() {
            s.send_device(i, &latent_ref, timestep)?;
            continue;
        }
        let host = match host_in.take() {
            Some(h) => h,
            None => latent_in.download(k)?,
        };
        s.send(i, &host, timestep)?;
        host_in = Some(host);
    }
    Ok(())
}

/// Adds `scale · residual` into `target` (an encoder output on `k`'s GPU, `device`), copying the
/// residual into `slot` first when it lives on another GPU; `who` names the ControlNet in errors.
fn add_residual(
    who: &str,
    target: &DevRef,
    residual: &DevRef,
    scale: f32,
    k: &GpuKernels,
    device: usize,
    slot: &mut Option<DevTensor>,
) -> Result<()> {
    if residual.shape != target.shape {
        return Err(Error::InvalidRequest(format!(
            "{who}: residual {:?} does not fit {:?}",
            residual.shape, target.shape
        )));
    }
    let src = if residual.device == device {
        residual.ptr
    } else {
        let st = stage(slot, k, &residual.shape)?;
        let p = st.ptr(k);
        // SAFETY: both hold `len` f32; the session keeps its buffer until its next step
        unsafe { k.copy_raw(p, residual.ptr, residual.len() * 4) }.map_err(gpu_err)?;
        p
    };
    // SAFETY: the target is the encoder's live output; nothing else writes it until the decoder
    unsafe { k.axpy_raw(target.ptr, src, scale, residual.len()) }.map_err(gpu_err)
}

/// Step `i`'s residuals of session `j` in device memory (host residuals are uploaded into
/// `staging` on `k`'s GPU): one per skip, then mid.
fn recv_residuals(
    s: &mut Box<dyn ControlSession>,
    i: usize,
    j: usize,
    staging: &mut [Option<DevTensor>],
    k: &GpuKernels,
) -> Result<Vec<DevRef>> {
    let count = |n: usize| -> Result<()> {
        if n == staging.len() {
            return Ok(());
        }
        Err(Error::InvalidRequest(format!(
            "ControlNet #{j} returned {n} residuals, the UNet has {} skips and a mid block",
            staging.len() - 1
        )))
    };
    if s.on_device() {
        let res = s.recv_device(i)?;
        count(res.len())?;
        return Ok(res);
    }
    let host = s.recv(i)?;
    count(host.len())?;
    let mut refs = Vec::with_capacity(host.len());
    for (slot, h) in staging.iter_mut().zip(&host) {
        let st = stage(slot, k, &h.shape)?;
        st.write(k, &h.data)?;
        refs.push(st.dev_ref(k));
    }
    Ok(refs)
}

/// One scheduler step on device latents: the Euler kernel where the scheduler allows, else the
/// host scheduler (one download and one upload).
fn scheduler_step(
    sched: &mut dyn Scheduler,
    i: usize,
    k: &GpuKernels,
    latents: &mut DevTensor,
    guided: &DevTensor,
    noise: &mut dyn NoiseSource,
) -> Result<()> {
    match sched.euler_sigmas(i) {
        Some((s0, s1)) => k.euler(&mut latents.buf, &guided.buf, s0, s1).map_err(gpu_err),
        None => {
            let gh = guided.download(k)?;
            let mut lh = latents.download(k)?;
            sched.step(i, &gh.data, &mut lh.data, noise);
            latents.write(k, &lh.data)
        }
    }
}

/// A staging buffer of `shape` on `k`'s GPU (reused while the shape stays).
fn stage<'s>(slot: &'s mut Option<DevTensor>, k: &GpuKernels, shape: &[usize]) -> Result<&'s mut DevTensor> {
    if slot.as_ref().map(|s| s.shape.as_slice()) != Some(shape) {
        *slot = None;
    }
    match slot {
        Some(s) => Ok(s),
        None => Ok(slot.insert(DevTensor::zeros(k, shape.to_vec())?)),
    }
}

/// The ControlNets of one step: which act, and where their residuals come from.
struct StepControl<'a> {
    req: &'a Request,
    /// Conditioning images, batched like the latents.
    images: &'a [Tensor],
    /// Indices into `req.controlnets` active at this step.
    active: &'a [usize],
    /// Sessions (already sent this step's input), or none: the pipeline's own, serially.
    sessions: &'a mut Vec<Box<dyn ControlSession>>,
    step: usize,
    /// This step's ControlNet runs, for [`Timings`]' critical path.
    path: StepPath,
}

/// `skips += Σ scaleⱼ·downⱼ`, `mid += Σ scaleⱼ·midⱼ` over the active ControlNets (diffusers'
/// MultiControlNet sum), on host tensors: from the sessions when there are, else computed here.
fn add_residuals(
    controlnets: &[Arc<Mutex<ControlNet>>],
    sc: &mut StepControl<'_>,
    latent_in: &Tensor,
    timestep: &Tensor,
    cond: &Conditioning,
    mid: &mut Tensor,
    skips: &mut [Tensor],
) -> Result<()> {
    for &j in sc.active {
        let c = &sc.req.controlnets[j];
        let res = match sc.sessions.get_mut(j) {
            Some(s) => {
                let res = s.recv(sc.step)?;
                sc.path.note(j, s.last_span());
                res
            }
            None => {
                let start = Instant::now();
                let res = controlnets[c.model]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .residuals(latent_in, timestep, cond, &sc.images[j])?;
                let end = Instant::now();
                sc.path.note(
                    j,
                    Some(RunSpan {
                        sent: start,
                        start,
                        end,
                    }),
                );
                res
            }
        };
        let (res_mid, res_down) = res
            .split_last()
            .ok_or_else(|| Error::InvalidRequest(format!("ControlNet #{j} returned no residuals")))?;
        if res_down.len() != skips.len() {
            return Err(Error::InvalidRequest(format!(
                "ControlNet #{j} returned {} down residuals, the UNet has {} skips",
                res_down.len(),
                skips.len()
            )));
        }
        for (s, r) in skips.iter_mut().zip(res_down) {
            if s.shape != r.shape {
                return Err(Error::InvalidRequest(format!(
                    "ControlNet #{j}: residual {:?} does not fit the skip {:?}",
                    r.shape, s.shape
                )));
            }
            residual::axpy(&mut s.data, &r.data, c.scale);
        }
        residual::axpy(&mut mid.data, &res_mid.data, c.scale);
    }
    Ok(())
}

#[cfg(test)]
mod lora_plan_tests {
    use super::*;

    #[test]
    fn the_step_path_adds_up_the_slowest_controlnet_and_the_transport() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let span = |sent, start, end| {
            Some(RunSpan {
                sent: at(sent),
                start: at(start),
                end: at(end),
            })
        };
        let mut t = Timings::default();
        let mut path = StepPath::default();
        // encoder ends at 15 ms; ControlNet 1 (slowest, 20 ms) ends at 21, the others earlier
        path.note(0, span(0, 1, 18));
        path.note(2, None); // a session that cannot tell is skipped
        path.note(1, span(0, 1, 21));
        path.finish(&mut t, at(15), at(24));
        assert_eq!(t.cn_slowest_run, Duration::from_millis(20));
        assert_eq!(t.cn_start_delay, Duration::from_millis(1));
        assert_eq!(t.cn_after_encoder, Duration::from_millis(6));
        assert_eq!(t.residual_transport, Duration::from_millis(3));
        assert_eq!(
            t.cn_runs,
            vec![Duration::from_millis(17), Duration::from_millis(20)]
        );
        // residuals ready before the encoder ended: nothing after it, transport from its end
        let mut path = StepPath::default();
        path.note(0, span(30, 30, 40));
        path.finish(&mut t, at(45), at(46));
        assert_eq!(t.cn_after_encoder, Duration::from_millis(6));
        assert_eq!(t.residual_transport, Duration::from_millis(4));
    }

    #[test]
    fn bounds_parse_and_clamp() {
        assert_eq!("10".parse::<LoraBound>().unwrap().step_for(50), 10);
        assert_eq!("0.2".parse::<LoraBound>().unwrap().step_for(50), 10);
        assert_eq!("20%".parse::<LoraBound>().unwrap().step_for(20), 4);
        assert_eq!("10".parse::<LoraBound>().unwrap().step_for(4), 3);
        assert_eq!("0".parse::<LoraBound>().unwrap().step_for(4), 0);
        assert!("1.5".parse::<LoraBound>().is_err());
        assert!("x".parse::<LoraBound>().is_err());
        assert!("sync".parse::<LoraMode>().is_ok() && "later".parse::<LoraMode>().is_err());
    }
}

#[cfg(test)]
mod split_thread_tests {
    use super::*;

    #[test]
    fn the_second_half_runs_on_one_lasting_thread_beside_this_one() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let here = std::thread::current().id();
        let mut seen = Vec::new();
        for i in 0..5 {
            let (a, b) = on_both(&pool, move || Ok((std::thread::current().id(), i)), || Ok(i * 10));
            let (tid, j) = b.unwrap();
            assert_eq!((a.unwrap(), j), (i * 10, i));
            assert_ne!(tid, here, "the other half ran on the calling thread");
            seen.push(tid);
        }
        // one thread for every step (a fresh thread per step cost 0.2 s each on a GPU)
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
        // both run at once: each waits for the other
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (a, b) = on_both(
            &pool,
            move || {
                rx.recv_timeout(Duration::from_secs(5))
                    .map_err(|e| Error::Gpu(e.to_string()))
            },
            || tx.send(()).map_err(|e| Error::Gpu(e.to_string())),
        );
        a.unwrap();
        b.unwrap();
        // a panic there is an error here, and the thread survives it
        let (_, b) = on_both(&pool, || -> Result<()> { panic!("boom") }, || Ok(()));
        assert!(b.unwrap_err().to_string().contains("panicked"));
        let (_, b) = on_both(&pool, || Ok(1), || Ok(()));
        assert_eq!(b.unwrap(), 1);
    }
}
