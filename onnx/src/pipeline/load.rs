//! Loading a pipeline and placing its parts: the base bundle's sessions and weights, then
//! where [`Placement`] says, the conditional guidance half and each ControlNet, with peer
//! access between their GPUs.
//!
//! ```text
//! Pipeline::load(bundle, opts) ─▶ text encoders, UNet pairs per shape bucket (+ CUDA graphs), VAE,
//!                                weights; Pipeline::warm_up runs each bucket once
//! Pipeline::place(&Placement, ControlNet bundles) ─▶ HalfUnet on cond_half (split guidance)
//!                                                 ─▶ ControlNet j on placement.controlnet(j)
//!                                                 ─▶ peer access: placement.peer_pairs
//! ```

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::bundle::{check_compute, check_io, BaseBundle, ControlNetBundle};
use crate::controlnet::{lock, ControlNet};
use crate::device::{current, peer};
use crate::placement::{ControlNetPlace, Placement};
use crate::request::ModelId;
use crate::runtime::{self, Device, SessionOptions};
use crate::text::TextEncoders;
use crate::unet::{half_inputs, UnetSet};
use crate::weights::Weights;
use crate::{Error, Result};
use ort::session::Session;

use super::split_loop::HalfUnet;
use super::Pipeline;

impl Pipeline {
    /// Opens a base bundle on `opts.device`: sessions for every graph (a UNet pair per shape
    /// bucket), checked against the manifest; with `opts.cuda_graph`, each bucket captured now,
    /// on this thread — the one that must run the jobs.
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
        let t_load = std::time::Instant::now();
        let bundle = BaseBundle::open(dir)?;
        check_compute(&bundle.dir, &bundle.manifest.compute, opts.device)?;
        runtime::init()?;
        if let Some(dir) = &opts.cache {
            // the CUDA kernels' PTX beside the optimized graphs: a restart does not compile them
            katz_kernels::cuda::cache_ptx_in(dir.join("kernels"));
        }
        let m = &bundle.manifest;
        if opts.deterministic && m.compute != "fp32" && !bundle.has_exact_twins() {
            tracing::warn!(
                bundle = %bundle.dir.display(),
                "deterministic output asked for, but this fp16 bundle has no deterministic twins of its \
                 fused graphs (export it again): two runs of a job can differ in the last bit of some pixels"
            );
        }
        if opts.precision == crate::runtime::Precision::Fp8 {
            check_fp8(&bundle, &opts)?;
        }
        if opts.cuda_graph && (opts.buckets.is_empty() || !matches!(opts.device, Device::Cuda(_))) {
            return Err(Error::InvalidRequest(format!(
                "CUDA graphs need shape buckets (--shapes) and the CUDA provider (cuda:N), got {}{}",
                opts.device,
                if opts.buckets.is_empty() {
                    " without shape buckets"
                } else {
                    ""
                }
            )));
        }
        // the text encoders, the weights and the UNet sessions load side by side (each is
        // mostly one core's work, or one file's read); the weights are read as the graphs
        // take them (f16 for an fp16 bundle's inputs, checked against the sessions below)
        let guess = match &shared {
            Some(w) => w.half_set().clone(),
            None if m.compute == "fp32" => HashSet::new(),
            // the UNet's inputs are fp16; the text encoders' graphs compute in fp32
            None => m
                .weights
                .map
                .iter()
                .filter(|(_, e)| e.graph.starts_with("unet_"))
                .map(|(n, _)| n.clone())
                .collect(),
        };
        let load_weights = |half: HashSet<String>| -> Result<Arc<Weights>> {
            // on a GPU, uploaded once: every job binds them in place, merges run on the device
            Ok(Arc::new(Weights::open(&bundle, half, opts.device.gpu())?))
        };
        let (text, vae, unets, weights, text_ms, vae_ms, unet_ms, weights_ms) = std::thread::scope(|sc| {
            let text = sc.spawn(|| {
                let t0 = std::time::Instant::now();
                let mut text = TextEncoders::load(&bundle, &opts)?;
                let text_ms = t0.elapsed().as_millis() as u64;
                // the VAE decoder after them, on the same thread
                let t0 = std::time::Instant::now();
                let vae_path = bundle.vae_graph(opts.deterministic);
                let mut vae = runtime::session(&vae_path, &opts)?;
                check_io(&vae_path, &vae, &["latent".into()], &["image".into()])?;
                let vae_ms = t0.elapsed().as_millis() as u64;
                if opts.device.gpu().is_some() {
                    // their first runs on a GPU pay cuDNN's choices and the kernels' loading:
                    // paid here, beside the weights' upload, instead of in the warm-up after it
                    first_runs(&bundle, &opts, &mut text, &mut vae)?;
                }
                Ok::<_, Error>((text, text_ms, vae, vae_ms))
            });
            let weights = sc.spawn(|| {
                let t0 = std::time::Instant::now();
                let w = match &shared {
                    Some(w) if w.map() == &m.weights.map => Ok(w.clone()),
                    Some(_) => Err(Error::bundle(
                        &bundle.dir,
                        "shared weights belong to another bundle",
                    )),
                    None => load_weights(guess.clone()),
                };
                w.map(|w| (w, t0.elapsed().as_millis() as u64))
            });
            let t0 = std::time::Instant::now();
            let unets = UnetSet::open(&bundle, &opts);
            let unet_ms = t0.elapsed().as_millis() as u64;
            let join = |what: &str| Error::Gpu(format!("the thread loading {what} panicked"));
            let text = text.join().unwrap_or_else(|_| Err(join("the text encoders")));
            let weights = weights.join().unwrap_or_else(|_| Err(join("the weights")));
            let unets = unets?;
            let (mut weights, mut weights_ms) = weights?;
            let (text, text_ms, vae, vae_ms) = text?;
            let first = unets.first();
            let half = half_inputs([&first.encoder, &first.decoder], &m.weights.map);
            if &half != weights.half_set() {
                if shared.is_some() {
                    return Err(Error::bundle(
                        &bundle.dir,
                        "shared weights are bound in other types",
                    ));
                }
                // a bundle whose file's types are not its graphs' (an older fp16 bundle): again
                tracing::info!("the weights' file holds other types than the graphs take: converting");
                let t0 = std::time::Instant::now();
                weights = load_weights(half)?;
                weights_ms += t0.elapsed().as_millis() as u64;
            }
            Ok::<_, Error>((text, vae, unets, weights, text_ms, vae_ms, unet_ms, weights_ms))
        })?;
        let mut unets = unets;

        let t0 = std::time::Instant::now();
        let skips = m.unet.skips;
        let mut step_kernels = None;
        if let (true, Some(id)) = (opts.cuda_graph, opts.device.gpu()) {
            // bound and captured now, on the thread that will run the jobs, before any job or
            // other thread uses the GPU (crate::unet::graphed)
            let k = match weights.device() {
                Some(d) => Arc::new(d.kernels.fork().map_err(crate::device::gpu_err)?),
                None => crate::device::kernels_for(id as usize)?,
            };
            current(&k)?;
            // the background bucket opener (BucketLoad::FirstUse) waits for the capture
            let _gpu = crate::device::capturing();
            unets.capture(&weights, &k, skips)?;
            step_kernels = Some(k);
        }
        let capture_ms = t0.elapsed().as_millis() as u64;
        for s in unets.shapes.iter().filter(|s| s.memory.is_some()) {
            if let (Some(f), Some(b)) = (s.fixed, s.memory) {
                tracing::info!(bucket = %format!("{}x{}", f.width, f.height), mib = b >> 20, "shape bucket captured");
            }
        }
        tracing::info!(
            bundle = %bundle.dir.display(),
            device = %opts.device,
            shapes = %unets.describe(),
            text_ms, unet_ms, weights_ms, vae_ms, capture_ms,
            total_ms = t_load.elapsed().as_millis() as u64,
            "pipeline loaded"
        );

        Ok(Pipeline {
            bundle,
            opts,
            text,
            unets,
            vae,
            weights,
            controlnets: Vec::new(),
            step_kernels,
            half: None,
            split_on: false,
            cn_threads: Arc::new(crate::threads::LastingThreads::new("controlnet")),
            cn_halves: HashMap::new(),
            cn_capture: true,
        })
    }

    /// Places the pipeline's other parts as `placement` says and loads `controlnets` (in order;
    /// ControlNet j where [`Placement::controlnet`] puts it): the conditional guidance half on
    /// its GPU, each ControlNet on its device (or once per guidance half), and peer access
    /// between every pair of their GPUs. Returns the ControlNets' ids, in order. `placement.base`
    /// must be the device the pipeline loaded on.
    pub fn place<P: AsRef<Path>>(
        &mut self,
        placement: &Placement,
        controlnets: &[P],
    ) -> Result<Vec<ModelId>> {
        if placement.base != self.opts.device {
            return Err(Error::InvalidRequest(format!(
                "the placement puts the base on {}, the pipeline loaded on {}",
                placement.base, self.opts.device
            )));
        }
        placement.check()?;
        if let Some(d) = placement.cond_half {
            if self.half.is_some() {
                return Err(Error::InvalidRequest(
                    "the guidance halves are split already".into(),
                ));
            }
            self.half = Some(HalfUnet::load(&self.bundle, &self.opts, d)?);
            self.split_on = true;
        }
        let mut ids = Vec::with_capacity(controlnets.len());
        for (j, dir) in controlnets.iter().enumerate() {
            let dir = dir.as_ref();
            let id = match placement.controlnet(j) {
                ControlNetPlace::One(d) if d == self.opts.device => self.controlnet(dir)?,
                ControlNetPlace::One(d) => self.load_controlnet(dir, d, 2)?,
                ControlNetPlace::Halves(u, c) => {
                    let u = self.load_controlnet(dir, u, 1)?;
                    let c = self.load_controlnet(dir, c, 1)?;
                    self.cn_halves.insert(u, c);
                    u
                }
            };
            ids.push(id);
        }
        // residuals go to the pipeline's GPU and, with split guidance, to the second half's
        // (without peer access the driver stages such a copy through host memory)
        for (a, b) in placement.peer_pairs(controlnets.len()) {
            peer(a, b)?;
        }
        Ok(ids)
    }

    /// Loads a ControlNet bundle on the pipeline's own device (once per directory) and returns
    /// its id for [`crate::request::ControlRequest`].
    pub fn controlnet(&mut self, dir: impl AsRef<Path>) -> Result<ModelId> {
        let dir = dir.as_ref();
        let own = self.opts.device;
        if let Some(i) = self.controlnets.iter().position(|c| {
            let c = lock(c);
            c.bundle.dir == dir && c.gpu().map(|g| g as i32) == own.gpu()
        }) {
            return Ok(ModelId::new(i));
        }
        self.load_controlnet(dir, own, 2)
    }

    /// A new ControlNet instance on `device` for a batch of `batch`; its id.
    fn load_controlnet(&mut self, dir: &Path, device: Device, batch: usize) -> Result<ModelId> {
        let opts = SessionOptions {
            device,
            ..self.opts.clone()
        };
        let cn = ControlNet::load_batch(ControlNetBundle::open(dir)?, &self.bundle, &opts, batch)?;
        self.controlnets.push(Arc::new(Mutex::new(cn)));
        Ok(ModelId::new(self.controlnets.len() - 1))
    }
}

/// Runs the text encoders and the VAE decoder once, at the first shape bucket's size (else the
/// bundle's default size), so that their first runs are not a job's. Nothing is kept.
fn first_runs(
    bundle: &BaseBundle,
    opts: &SessionOptions,
    text: &mut TextEncoders,
    vae: &mut Session,
) -> Result<()> {
    let t0 = std::time::Instant::now();
    let m = &bundle.manifest;
    let (width, height) = match opts.buckets.first() {
        Some(b) => (b.width, b.height),
        None => (m.default_size[0], m.default_size[1]),
    };
    // text encoders that take their weights as inputs wait for them: the warm-up runs them
    let takes_weights = m.weights.map.values().any(|e| !e.graph.starts_with("unet_"));
    if !takes_weights {
        text.condition(
            crate::text::TextWeights::default(),
            "",
            None,
            true,
            (height, width),
        )?;
    }
    let text_ms = t0.elapsed().as_millis() as u64;
    let s = m.vae_scale_factor;
    let latent = crate::tensor::Tensor::zeros(vec![1, m.latent_channels, height / s, width / s]);
    let tiling = m.vae_tiling();
    crate::vae::decode(&latent, Some(&tiling), |x| crate::vae::run(vae, x))?;
    tracing::info!(
        text_ms,
        vae_ms = t0.elapsed().as_millis() as u64 - text_ms,
        size = %format!("{width}x{height}"),
        "text encoders and VAE ran once"
    );
    Ok(())
}

/// `--precision fp8`: a GPU bundle with fp8 graphs, on `cuda:N` of compute capability 8.9+,
/// without deterministic output (the fp8 graphs are the fused ones); else the reason.
fn check_fp8(bundle: &BaseBundle, opts: &SessionOptions) -> Result<()> {
    let refuse = |why: String| Err(Error::InvalidRequest(format!("fp8 precision: {why}")));
    let Device::Cuda(gpu) = opts.device else {
        return refuse(format!("it runs on cuda:N only, got {}", opts.device));
    };
    if bundle.manifest.fp8.is_none() {
        return refuse(format!(
            "{} has no fp8 graphs (export it with --gpu --fp8, or run tools/fp8_rewrite.py on it)",
            bundle.dir.display()
        ));
    }
    if opts.deterministic {
        return refuse("its graphs have no deterministic twins: run it with --deterministic false".into());
    }
    crate::fp8::check_gpu(gpu as usize).or_else(refuse)
}
