//! A ControlNet model in-process: `(latent, t, embeddings, image) → 9 down residuals + 1 mid`,
//! on the host ([`ControlNet::residuals`]) or bound to a job on its GPU ([`ControlNet::bind`],
//! [`ControlNet::run_bound`]: the step's latent read in place or copied over from the
//! pipeline's GPU, residuals left in device memory).
//!
//! Bundles exported with `weights` take their LoRA-targetable Linear weights as graph inputs:
//! the ControlNet reads them once ([`Weights`], uploaded once on a GPU) and binds them into every
//! session it runs, so on a GPU with shape buckets and CUDA graphs each bucket gets a
//! fixed-shape session captured as a CUDA graph ([`ControlNet::prepare`], graphed.rs) without a
//! copy of those weights. Older bundles hold every weight in their graph: one session, of free
//! shapes (or of the only bucket when other sizes are refused).
//!
//! ```text
//! load ─▶ session (free shapes) + Weights (bundles with `weights`)
//! prepare(width, height, batch), on the thread that runs the jobs ─▶ the bucket's session,
//!         bound and captured (GraphedControlNet), once per bucket
//! bind(cond, image, graphs) ─▶ BoundControlNet: the bucket's graph (inputs copied in), else a
//!         binding of the free-shape session for this job
//! ```
//!
//! Residuals leave unscaled; the pipeline adds `scale · residual` to the UNet skips (diffusers'
//! MultiControlNet: a sum of scaled residuals, each ControlNet active between its start and end).

use std::sync::Arc;

use ort::session::{IoBinding, Session};
use ort::value::DynValue;

use katz_kernels::cuda::GpuKernels;
use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};

use super::graphed::{GraphInputs, GraphedControlNet};
use crate::bundle::{check_compute, check_io, BaseBundle, BaseManifest, ControlNetBundle};
use crate::device::{capturing, current, free_memory, kernels_for, DevRef, DevTensor};
use crate::runtime::{self, FixedShape, SessionOptions};
use crate::tensor::Tensor;
use crate::text::Conditioning;
use crate::unet::prelude::{self, JobConsts, JobInputs};
use crate::weights::{MergedWeights, Weights};
use crate::{Error, Result};

/// The graph name a ControlNet bundle's weight map gives its inputs.
pub(crate) const GRAPH: &str = "controlnet";

const INPUTS: [&str; 6] = [
    "sample",
    "timestep",
    "encoder_hidden_states",
    "text_embeds",
    "time_ids",
    "controlnet_cond",
];

pub struct ControlNet {
    pub bundle: ControlNetBundle,
    session: Session,
    /// The bundle's prelude (free shapes, never graphed), where the graph takes its outputs:
    /// run once per job (crate::unet::prelude).
    prelude: Option<Session>,
    outputs: Vec<String>,
    /// Step kernels (copies across GPUs) on this ControlNet's GPU, when it runs on one.
    kernels: Option<Arc<GpuKernels>>,
    /// The weights the graph takes as inputs (bundles exported with `weights`), on this
    /// ControlNet's GPU when it runs on one; shared by its sessions.
    weights: Option<Arc<Weights>>,
    /// Fixed-shape sessions captured as CUDA graphs, one per shape bucket used so far.
    buckets: Vec<Bucket>,
    /// Buckets whose graph could not be made (logged once): their jobs run on free shapes.
    no_graph: Vec<FixedShape>,
    /// What the bucket sessions are made with: the options (with CUDA graphs on), the graph, the
    /// batch, the base's manifest (the residuals' shapes); `None`: no CUDA graphs here.
    graphs: Option<GraphSpec>,
}

struct GraphSpec {
    opts: SessionOptions,
    path: std::path::PathBuf,
    batch: usize,
    base: BaseManifest,
}

/// One shape bucket's session and CUDA graph.
struct Bucket {
    fixed: FixedShape,
    // the graph goes first: its binding is dropped before the session
    graph: GraphedControlNet,
    session: Session,
}

/// A ControlNet bound to one job: on its bucket's CUDA graph (the job's inputs copied in), or a
/// binding of the free-shape session on its GPU (conditioning and image go up once; each step's
/// latent is read in place or copied from the pipeline's GPU; residuals stay on the device).
pub struct BoundControlNet {
    how: Bound,
}

enum Bound {
    /// Index into [`ControlNet`]'s buckets, and this job's inputs on its GPU.
    Graph(usize, GraphInputs),
    Free(Box<FreeBinding>),
}

struct FreeBinding {
    binding: IoBinding,
    kernels: Arc<GpuKernels>,
    /// The step's latent, when the pipeline runs on another GPU.
    sample: Option<DevTensor>,
    /// The last step's residuals (ONNX Runtime's buffers, kept alive until the next step).
    held: Vec<DynValue>,
    /// The prelude's outputs for this job, bound as the graph's inputs.
    _consts: Option<JobConsts>,
}

impl ControlNet {
    /// Loads a ControlNet for the guidance batch (2; fixed to the only shape bucket when other
    /// sizes are refused, else free shapes).
    pub fn load(bundle: ControlNetBundle, base: &BaseBundle, opts: &SessionOptions) -> Result<Self> {
        Self::load_batch(bundle, base, opts, 2)
    }

    /// [`ControlNet::load`] for a batch of `batch` (1: one guidance half per ControlNet, the
    /// paper's placement; `Placement`'s `ControlNetPlace::Halves`).
    pub fn load_batch(
        bundle: ControlNetBundle,
        base: &BaseBundle,
        opts: &SessionOptions,
        batch: usize,
    ) -> Result<Self> {
        Self::load_sharing(bundle, base, opts, batch, None)
    }

    /// [`ControlNet::load_batch`] reusing the weights of another instance of the same bundle on
    /// the same device (a ControlNet worker's sessions share one copy).
    pub fn load_sharing(
        bundle: ControlNetBundle,
        base: &BaseBundle,
        opts: &SessionOptions,
        batch: usize,
        shared: Option<Arc<Weights>>,
    ) -> Result<Self> {
        bundle.check_fits(base)?;
        check_compute(&bundle.dir, &bundle.manifest.compute, opts.device)?;
        let path = bundle.dir.join(&bundle.manifest.graph);
        let spec = bundle.manifest.weights.clone();
        // an older bundle (every weight inside its graph) is fixed to the only bucket when other
        // sizes are refused; one whose weights are inputs keeps free shapes beside its buckets
        let dims = match opts.only_shape() {
            Some(f) if spec.is_none() => {
                crate::shapes::controlnet_dims(base.manifest.vae_scale_factor, f, batch)
            }
            _ => vec![],
        };
        let session = runtime::session_with_dims(&path, opts, &dims)?;
        let mut outputs: Vec<String> = (0..bundle.manifest.residuals)
            .map(|i| format!("down_{i}"))
            .collect();
        outputs.push("mid".into());
        let mut inputs: Vec<String> = INPUTS.map(String::from).to_vec();
        if let Some(spec) = &spec {
            inputs.extend(spec.map.keys().cloned());
        }
        // the inputs the prelude makes are checked against its outputs, the rest against the manifest
        let job_inputs = prelude::job_inputs(&session);
        check_io(&path, &session, &[inputs, job_inputs.clone()].concat(), &outputs)?;
        let prelude = match (&bundle.manifest.prelude, job_inputs.first()) {
            (_, None) => None,
            (None, Some(first)) => {
                return Err(Error::bundle(
                    &path,
                    format!(
                    "the graph takes inputs the prelude makes ({first}), and the manifest names no prelude"
                ),
                ))
            }
            (Some(p), Some(_)) => {
                let ppath = bundle.dir.join(p);
                let s = runtime::session_with_dims(&ppath, opts, &[])?;
                let made: Vec<&str> = s.outputs().iter().map(|o| o.name()).collect();
                if let Some(missing) = job_inputs.iter().find(|n| !made.contains(&n.as_str())) {
                    return Err(Error::bundle(
                        &ppath,
                        format!("the prelude does not make {missing}, which the ControlNet's graph takes"),
                    ));
                }
                Some(s)
            }
        };
        let weights = match (&spec, shared) {
            (None, _) => None,
            (Some(spec), Some(w)) if w.map() == &spec.map => Some(w),
            (Some(_), Some(_)) => {
                return Err(Error::bundle(
                    &bundle.dir,
                    "shared weights belong to another bundle",
                ))
            }
            (Some(spec), None) => {
                let half = crate::unet::half_inputs([&session, &session], &spec.map);
                Some(Arc::new(Weights::open_spec(
                    &bundle.dir,
                    spec,
                    half,
                    opts.device.gpu(),
                )?))
            }
        };
        let kernels = match opts.device.gpu() {
            Some(id) => Some(kernels_for(id as usize)?),
            None => None,
        };
        let graphs = (opts.cuda_graph && kernels.is_some() && weights.is_some()).then(|| GraphSpec {
            opts: opts.clone(),
            path: path.clone(),
            batch,
            base: base.manifest.clone(),
        });
        Ok(ControlNet {
            bundle,
            session,
            prelude,
            outputs,
            kernels,
            weights,
            buckets: Vec::new(),
            no_graph: Vec::new(),
            graphs,
        })
    }

    /// The shape buckets (keyed by this ControlNet's batch) whose CUDA graphs are captured.
    pub fn captured(&self) -> Vec<FixedShape> {
        self.buckets.iter().map(|b| b.fixed).collect()
    }

    /// The weights the graph takes as inputs (bundles exported with `weights`).
    pub fn weights(&self) -> Option<Arc<Weights>> {
        self.weights.clone()
    }

    /// Makes ready the CUDA graph of the bucket `width`×`height` (batch `batch`): its session
    /// opened, bound and captured now, on the calling thread — the one that must run it — with
    /// the capture gate held. Nothing to do without CUDA graphs here, for another batch, a size
    /// outside the buckets, or a bucket ready already. Returns whether the bucket has a graph.
    pub fn prepare(&mut self, width: usize, height: usize, batch: usize) -> Result<bool> {
        let Some(g) = &self.graphs else {
            return Ok(false);
        };
        // keyed by the ControlNet's own batch (the guidance batch, or 1 per guidance half)
        let fixed = FixedShape {
            width,
            height,
            unet_batch: batch,
        };
        let served = g
            .opts
            .buckets
            .iter()
            .any(|b| (b.width, b.height) == (width, height));
        if batch != g.batch || !served {
            return Ok(false);
        }
        if self.buckets.iter().any(|b| b.fixed == fixed) {
            return Ok(true);
        }
        if self.no_graph.contains(&fixed) {
            return Ok(false);
        }
        let mut prelude = self.prelude.take();
        let opened = self.open_bucket(fixed, prelude.as_mut());
        self.prelude = prelude;
        match opened {
            Ok(b) => {
                self.buckets.push(b);
                Ok(true)
            }
            Err(e) => {
                // the free-shape session still serves this size: the job goes on without a graph
                tracing::warn!(
                    controlnet = %self.bundle.manifest.name,
                    bucket = %format!("{width}x{height}"),
                    error = %e,
                    "no CUDA graph for this ControlNet in this bucket: its jobs run on free shapes"
                );
                self.no_graph.push(fixed);
                Ok(false)
            }
        }
    }

    /// The bucket `fixed`'s session, opened, bound and captured (see [`ControlNet::prepare`]).
    fn open_bucket(&self, fixed: FixedShape, prelude: Option<&mut Session>) -> Result<Bucket> {
        let (width, height, batch) = (fixed.width, fixed.height, fixed.unet_batch);
        let Some(g) = &self.graphs else {
            return Err(Error::Gpu("no CUDA graphs here".into()));
        };
        let (Some(k), Some(weights)) = (self.kernels.clone(), self.weights.clone()) else {
            return Err(Error::Gpu(
                "a ControlNet's CUDA graph needs it and its weights on a GPU".into(),
            ));
        };
        let t0 = std::time::Instant::now();
        let mut dims = crate::shapes::controlnet_dims(g.base.vae_scale_factor, fixed, batch);
        let session_dims = dims.clone();
        dims.extend(crate::shapes::controlnet_out_dims(&g.base, fixed).ok_or_else(|| {
            Error::bundle(
                &self.bundle.dir,
                "CUDA graphs need the SDXL UNet structure (nine skips)",
            )
        })?);
        let _gpu = capturing();
        current(&k)?;
        let before = free_memory(&k);
        let mut session = runtime::unet_session(&g.path, &g.opts, &session_dims, true)?;
        let opened_ms = t0.elapsed().as_millis() as u64;
        let mut graph = GraphedControlNet::new(&session, weights, k.clone(), &self.outputs, &dims, prelude)?;
        graph.capture(&mut session).map_err(|e| {
            Error::Gpu(format!(
                "ControlNet {}, bucket {width}x{height}: capturing its CUDA graph: {e}",
                self.bundle.manifest.name
            ))
        })?;
        let mib = before
            .zip(free_memory(&k))
            .map(|(b, a)| b.saturating_sub(a) >> 20);
        tracing::info!(
            controlnet = %self.bundle.manifest.name,
            bucket = %format!("{width}x{height}"),
            opened_ms,
            ms = t0.elapsed().as_millis() as u64,
            mib,
            "ControlNet bucket captured"
        );
        Ok(Bucket {
            fixed,
            graph,
            session,
        })
    }

    /// The GPU this ControlNet runs on (`None`: the CPU).
    pub fn gpu(&self) -> Option<usize> {
        self.kernels.as_ref().map(|k| k.ordinal())
    }

    /// Binds this ControlNet for one job on its GPU: on the CUDA graph of the job's bucket when
    /// `graphs` allows it (the caller runs the steps on the thread that captured it, see
    /// [`ControlNet::prepare`]) and one is ready, else on the free-shape session (conditioning
    /// and image copied up once).
    pub fn bind(&mut self, cond: &Conditioning, image: &Tensor, graphs: bool) -> Result<BoundControlNet> {
        if graphs {
            if let Some(i) = self.buckets.iter().position(|b| b.graph.fits(image)) {
                let inputs = self.buckets[i]
                    .graph
                    .upload_inputs(cond, image, self.prelude.as_mut())?;
                return Ok(BoundControlNet {
                    how: Bound::Graph(i, inputs),
                });
            }
        }
        let kernels = self
            .kernels
            .clone()
            .ok_or_else(|| Error::Gpu(format!("ControlNet {} does not run on a GPU", self.name())))?;
        let dev = crate::device::cuda_memory(kernels.ordinal() as i32)?;
        // ONNX Runtime copies host inputs with the current device: make it this ControlNet's
        kernels.ctx.bind_to_thread().map_err(crate::device::gpu_err)?;
        let mut binding = self.session.create_binding()?;
        binding.bind_input("encoder_hidden_states", &*cond.prompt_embeds.view()?)?;
        binding.bind_input("text_embeds", &*cond.pooled.view()?)?;
        binding.bind_input("time_ids", &*cond.time_ids.view()?)?;
        binding.bind_input("controlnet_cond", &*image.view()?)?;
        self.bind_weights(&mut binding)?;
        let consts = match self.prelude.as_mut() {
            Some(session) => {
                let (weights, job) = (
                    self.weights.as_deref(),
                    JobInputs {
                        cond,
                        image: Some(image),
                    },
                );
                let pristine = MergedWeights::default();
                let c = prelude::run_device(session, kernels.ordinal() as i32, 0, |b, names| {
                    prelude::bind_job_inputs(b, names, weights, job, &pristine)
                })?;
                for (name, v) in c.of(GRAPH) {
                    binding.bind_input(name, v)?;
                }
                Some(c)
            }
            None => None,
        };
        for o in &self.outputs {
            binding.bind_output_to_device(o.as_str(), &dev)?;
        }
        Ok(BoundControlNet {
            how: Bound::Free(Box::new(FreeBinding {
                binding,
                kernels,
                sample: None,
                held: Vec::new(),
                _consts: consts,
            })),
        })
    }

    /// Binds the weight inputs (pristine; in place on a GPU); `self.weights` outlives the binding.
    fn bind_weights(&self, b: &mut IoBinding) -> Result<()> {
        if let Some(w) = &self.weights {
            let pristine = MergedWeights::default();
            for name in w.inputs_of(GRAPH) {
                w.bind_input(b, name, &pristine)?;
            }
        }
        Ok(())
    }

    /// Whether `b` runs on a CUDA graph (for the logs and tests).
    pub fn is_graphed(b: &BoundControlNet) -> bool {
        matches!(b.how, Bound::Graph(..))
    }

    /// One step on a bound job: residuals in this ControlNet's GPU memory (down in skip order,
    /// then mid), valid until the next step of `b`. `latent_in` may live on another GPU of
    /// this process; it must not change until this returns.
    pub fn run_bound(
        &mut self,
        b: &mut BoundControlNet,
        latent_in: &DevRef,
        timestep: &Tensor,
    ) -> Result<Vec<DevRef>> {
        let fb = match &mut b.how {
            Bound::Graph(i, inputs) => {
                let bucket = self
                    .buckets
                    .get_mut(*i)
                    .ok_or_else(|| Error::Gpu("the ControlNet's bucket is gone".into()))?;
                return bucket
                    .graph
                    .step(&mut bucket.session, inputs, latent_in, timestep);
            }
            Bound::Free(fb) => fb,
        };
        let k = fb.kernels.clone();
        let here = k.ordinal();
        let sample = if latent_in.device == here {
            latent_in.clone()
        } else {
            if fb.sample.as_ref().map(|s| &s.shape) != Some(&latent_in.shape) {
                fb.sample = Some(DevTensor::zeros(&k, latent_in.shape.clone())?);
            }
            let Some(s) = fb.sample.as_ref() else {
                return Err(Error::Gpu("no staging buffer for the latent".into()));
            };
            let dst = s.ptr(&k);
            // SAFETY: both buffers hold `len` f32; the source is not written until we return
            unsafe { k.copy_raw(dst, latent_in.ptr, latent_in.len() * 4) }.map_err(crate::device::gpu_err)?;
            k.synchronize().map_err(crate::device::gpu_err)?;
            s.dev_ref(&k)
        };
        k.ctx.bind_to_thread().map_err(crate::device::gpu_err)?;
        // SAFETY: `sample` outlives the run (the caller's buffer or `fb.sample`)
        let t = unsafe { sample.ort()? };
        fb.binding.bind_input("sample", &*t)?;
        fb.binding.bind_input("timestep", &*timestep.view()?)?;
        fb.held.clear();
        let mut out = self.session.run_binding(&fb.binding)?;
        fb.binding.synchronize_outputs()?;
        let mut refs = Vec::with_capacity(self.outputs.len());
        for o in &self.outputs {
            let v = out.remove(o.as_str()).ok_or_else(|| {
                Error::Gpu(format!("ControlNet {}: no output {o}", self.bundle.manifest.name))
            })?;
            refs.push(DevRef::of_value(&v, here)?);
            fb.held.push(v);
        }
        Ok(refs)
    }

    pub fn name(&self) -> &str {
        &self.bundle.manifest.name
    }

    /// Whether its graph computes in fp16 (GPU bundles: fp16 inside, f32 at the edges), so that
    /// its residuals are fp16 values and travel as such without loss.
    pub fn computes_fp16(&self) -> bool {
        self.bundle.manifest.compute != "fp32"
    }

    /// Down residuals in skip order, then the mid residual.
    pub fn residuals(
        &mut self,
        sample: &Tensor,
        timestep: &Tensor,
        cond: &Conditioning,
        image: &Tensor,
    ) -> Result<Vec<Tensor>> {
        if self.weights.is_none() && self.prelude.is_none() {
            let out = self.session.run(ort::inputs![
                "sample" => sample.view()?,
                "timestep" => timestep.view()?,
                "encoder_hidden_states" => cond.prompt_embeds.view()?,
                "text_embeds" => cond.pooled.view()?,
                "time_ids" => cond.time_ids.view()?,
                "controlnet_cond" => image.view()?,
            ])?;
            return self
                .outputs
                .iter()
                .map(|n| Tensor::from_output(&out, n))
                .collect();
        }
        // the weights bound (in place from device memory on a GPU), the rest from the host
        if let Some(k) = &self.kernels {
            k.ctx.bind_to_thread().map_err(crate::device::gpu_err)?;
        }
        let mut b = self.session.create_binding()?;
        b.bind_input("sample", &*sample.view()?)?;
        b.bind_input("timestep", &*timestep.view()?)?;
        b.bind_input("encoder_hidden_states", &*cond.prompt_embeds.view()?)?;
        b.bind_input("text_embeds", &*cond.pooled.view()?)?;
        b.bind_input("time_ids", &*cond.time_ids.view()?)?;
        b.bind_input("controlnet_cond", &*image.view()?)?;
        self.bind_weights(&mut b)?;
        // the prelude runs with every call here (the host path keeps no job state)
        let consts = match self.prelude.as_mut() {
            Some(session) => Some(prelude::run_host(
                session,
                self.weights.as_deref(),
                JobInputs {
                    cond,
                    image: Some(image),
                },
                &MergedWeights::default(),
            )?),
            None => None,
        };
        for (name, v) in consts.iter().flat_map(|c| c.of(GRAPH)) {
            b.bind_input(name, v)?;
        }
        let host = MemoryInfo::new(
            AllocationDevice::CPU,
            0,
            AllocatorType::Device,
            MemoryType::Default,
        )?;
        for o in &self.outputs {
            b.bind_output_to_device(o.as_str(), &host)?;
        }
        let out = self.session.run_binding(&b)?;
        self.outputs
            .iter()
            .map(|n| Tensor::from_output(&out, n))
            .collect()
    }
}
