//! CUDA graphs for a ControlNet, one per shape bucket: the bucket's fixed-shape session bound
//! once to lasting buffers and captured on the thread that replays it (the model thread, for
//! the pipeline's inline ControlNets).
//!
//! ```text
//! GraphedControlNet: one per (ControlNet, shape bucket), made on the bucket's first job (or the warm-up)
//!   sample, timestep ──┐   embeds, pooled, time_ids, image ──┐   weights (the ControlNet's one copy,
//!     (each step)      ▼     (once per job)                   ▼    shared by every bucket's graph)
//!                   controlnet (replayed) ─▶ down_0 … down_8, mid  (lasting buffers: the step's residuals)
//!   with a prelude: embeds, pooled, time_ids, image, weights ─▶ prelude (once per job, at upload)
//!                   ─▶ job.controlnet.* copied into lasting buffers the graph reads, at the job's turn
//! ```
//!
//! The ControlNet's LoRA-targetable weights are graph inputs (ControlNet bundles with `weights`),
//! so a bucket holds only its graph, its activations and the weights left inside the graph
//! (convolutions, norms); the weight inputs are bound in place from the ControlNet's device copy.

use std::sync::Arc;

use katz_kernels::cuda::GpuKernels;
use ort::memory::Allocator;
use ort::session::{IoBinding, Session};

use crate::device::{cuda_memory, gpu_err, DevRef, DevTensor};
use crate::tensor::Tensor;
use crate::text::Conditioning;
use crate::unet::graphed::{bind_dev, bind_out, outlet_shape};
use crate::unet::prelude::{self, JobConsts};
use crate::weights::{DevBuf, MergedWeights, Weights};
use crate::{Error, Result};

/// A ControlNet's fixed-shape session of one bucket, bound to lasting buffers for CUDA graphs.
pub(crate) struct GraphedControlNet {
    // the binding goes first: it is dropped before the buffers it points at
    binding: IoBinding,
    sample: DevTensor,
    timestep: DevTensor,
    /// prompt_embeds, pooled, time_ids.
    cond: [DevTensor; 3],
    image: DevTensor,
    /// `down_0` … then `mid` (ONNX Runtime's buffers, owned by `binding` as its bound outputs).
    outputs: Vec<DevRef>,
    /// The weights bound in place (kept alive as long as the binding).
    _weights: Arc<Weights>,
    /// The inputs the prelude makes (`job.controlnet.<tensor>`): lasting buffers its outputs for
    /// a session's job are copied into when that session's turn comes.
    job: Vec<(String, DevBuf)>,
    k: Arc<GpuKernels>,
    /// [`GraphInputs::id`] of the inputs in the buffers now (0: none).
    holds: u64,
}

/// One session's conditioning and image on the graph's GPU (prompt embeddings, pooled, time
/// ids, image), copied into the graph's buffers when its turn comes.
pub(crate) struct GraphInputs {
    id: u64,
    tensors: Vec<DevTensor>,
    /// The prelude's outputs for this job (ONNX Runtime's device buffers).
    consts: Option<JobConsts>,
}

fn next_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

const COND: [&str; 3] = ["encoder_hidden_states", "text_embeds", "time_ids"];

impl GraphedControlNet {
    /// Binds `session` (fixed to `known`'s dimensions) on `k`'s GPU, its weight inputs from
    /// `weights` (on that GPU), its outputs `outputs` to lasting buffers.
    pub fn new(
        session: &Session,
        weights: Arc<Weights>,
        k: Arc<GpuKernels>,
        outputs: &[String],
        known: &[(String, i64)],
        prelude: Option<&mut Session>,
    ) -> Result<Self> {
        let device = k.ordinal();
        match weights.device() {
            Some(d) if d.ordinal as usize == device => {}
            _ => {
                return Err(Error::Gpu(format!(
                    "a ControlNet's CUDA graph on cuda:{device} needs its weights on that GPU"
                )))
            }
        }
        let ins = session.inputs();
        let zeros = |name: &str| DevTensor::zeros(&k, outlet_shape(ins, name, known)?);
        let sample = zeros("sample")?;
        let timestep = zeros("timestep")?;
        let cond = [zeros(COND[0])?, zeros(COND[1])?, zeros(COND[2])?];
        let image = zeros("controlnet_cond")?;

        let mut binding = session.create_binding()?;
        bind_dev(&mut binding, "sample", sample.ptr(&k), &sample.shape, device)?;
        bind_dev(
            &mut binding,
            "timestep",
            timestep.ptr(&k),
            &timestep.shape,
            device,
        )?;
        for (name, t) in COND.iter().zip(&cond) {
            bind_dev(&mut binding, name, t.ptr(&k), &t.shape, device)?;
        }
        bind_dev(
            &mut binding,
            "controlnet_cond",
            image.ptr(&k),
            &image.shape,
            device,
        )?;
        let pristine = MergedWeights::default();
        for name in weights.inputs_of(super::model::GRAPH) {
            // in place from the device copy, which `_weights` keeps alive
            weights.bind_input(&mut binding, name, &pristine)?;
        }
        // the prelude's outputs: their shapes from a run on the (zero) inputs of this bucket
        let mut job = Vec::new();
        let wanted = prelude::job_inputs(session);
        if !wanted.is_empty() {
            let session = prelude.ok_or_else(|| {
                Error::Gpu("the ControlNet's graph takes the prelude's outputs, and it is not loaded".into())
            })?;
            let probe = run_prelude(session, &k, &weights, [&cond[0], &cond[1], &cond[2], &image])?;
            for name in wanted {
                let v = probe
                    .values
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| v)
                    .ok_or_else(|| Error::Gpu(format!("the ControlNet's prelude gave no {name}")))?;
                let t = v.downcast_ref::<ort::value::DynTensorValueType>()?;
                let shape: Vec<usize> = t.shape().iter().map(|&d| d.max(0) as usize).collect();
                let buf = prelude::lasting(&k, *t.data_type(), shape.iter().product(), &name)?;
                // SAFETY: the buffer lives in `job`, dropped after the binding (field order)
                unsafe { buf.bind(&mut binding, &name, &shape, &k, device as i32)? };
                job.push((name, buf));
            }
        }
        let alloc = Allocator::new(session, cuda_memory(device as i32)?)?;
        let mut outs = Vec::with_capacity(outputs.len());
        for name in outputs {
            let shape = outlet_shape(session.outputs(), name, known)?;
            outs.push(bind_out(&mut binding, &alloc, name, &shape, device)?);
        }
        Ok(GraphedControlNet {
            binding,
            sample,
            timestep,
            cond,
            image,
            outputs: outs,
            _weights: weights,
            job,
            k,
            holds: 0,
        })
    }

    /// Runs the graph once: ONNX Runtime runs it, then captures it, on this thread (the one that
    /// will replay it). The caller holds the capture gate (crate::device::capturing).
    pub fn capture(&mut self, session: &mut Session) -> Result<()> {
        let b = self.timestep.len();
        self.timestep.write(&self.k, &vec![999.0; b])?;
        self.k.synchronize().map_err(gpu_err)?;
        self.k.ctx.bind_to_thread().map_err(gpu_err)?;
        drop(session.run_binding(&self.binding)?);
        self.binding.synchronize_outputs()?;
        self.holds = 0;
        Ok(())
    }

    /// Whether a job with this conditioning image (`[B, 3, H, W]`) runs on this graph.
    pub fn fits(&self, image: &Tensor) -> bool {
        self.image.shape == image.shape
    }

    /// A job's conditioning and image in device memory of this GPU, for [`GraphedControlNet::step`]
    /// (their shapes must be the captured ones). Each session keeps its own: sessions of one
    /// ControlNet in one job (the same model with two images) take turns on the graph.
    pub fn upload_inputs(
        &self,
        c: &Conditioning,
        image: &Tensor,
        prelude: Option<&mut Session>,
    ) -> Result<GraphInputs> {
        let srcs = [
            (&c.prompt_embeds, "prompt embeddings"),
            (&c.pooled, "pooled embeddings"),
            (&c.time_ids, "time ids"),
            (image, "conditioning image"),
        ];
        let dsts = [&self.cond[0], &self.cond[1], &self.cond[2], &self.image];
        let mut up = Vec::with_capacity(4);
        for (dst, (src, what)) in dsts.into_iter().zip(srcs) {
            if dst.shape != src.shape {
                return Err(Error::InvalidRequest(format!(
                    "the ControlNet's CUDA graph was captured for {what} of {:?}, this job has {:?}",
                    dst.shape, src.shape
                )));
            }
            up.push(DevTensor::upload(&self.k, src)?);
        }
        self.k.synchronize().map_err(gpu_err)?;
        let consts = match (self.job.is_empty(), prelude) {
            (true, _) => None,
            (false, None) => {
                return Err(Error::Gpu(
                    "the ControlNet's graph takes the prelude's outputs, and it is not loaded".into(),
                ))
            }
            (false, Some(session)) => Some(run_prelude(
                session,
                &self.k,
                &self._weights,
                [&up[0], &up[1], &up[2], &up[3]],
            )?),
        };
        Ok(GraphInputs {
            id: next_id(),
            tensors: up,
            consts,
        })
    }

    /// Copies `inputs` into the graph's buffers unless they hold them already.
    fn load_inputs(&mut self, inputs: &GraphInputs) -> Result<()> {
        if self.holds == inputs.id {
            return Ok(());
        }
        let k = self.k.clone();
        let [a, b, d] = &self.cond;
        for (dst, src) in [a, b, d, &self.image].into_iter().zip(&inputs.tensors) {
            // SAFETY: same length (checked at upload); both live on this GPU until the synchronise
            unsafe { k.copy_raw(dst.ptr(&k), src.ptr(&k), src.len() * 4) }.map_err(gpu_err)?;
        }
        if let Some(consts) = &inputs.consts {
            // `inputs` keeps the values alive; the step synchronises before it returns
            prelude::copy_into(&k, consts, self.job.iter().map(|(n, b)| (n.as_str(), b)))?;
        } else if !self.job.is_empty() {
            return Err(Error::Gpu(
                "this job has no outputs of the ControlNet's prelude".into(),
            ));
        }
        self.holds = inputs.id;
        Ok(())
    }

    /// One step: the latent (on any GPU of this process) copied into the graph's sample buffer,
    /// the timestep written, the graph replayed; the residuals (down in skip order, then mid),
    /// valid until the next step.
    pub fn step(
        &mut self,
        session: &mut Session,
        inputs: &GraphInputs,
        latent_in: &DevRef,
        timestep: &Tensor,
    ) -> Result<Vec<DevRef>> {
        self.load_inputs(inputs)?;
        let k = self.k.clone();
        if latent_in.len() != self.sample.len() || timestep.data.len() != self.timestep.len() {
            return Err(Error::InvalidRequest(format!(
                "the ControlNet's CUDA graph was captured for latents of {:?}, this step has {:?}",
                self.sample.shape, latent_in.shape
            )));
        }
        // SAFETY: both buffers hold `len` f32; the source is not written until we return
        unsafe { k.copy_raw(self.sample.ptr(&k), latent_in.ptr, latent_in.len() * 4) }.map_err(gpu_err)?;
        self.timestep.write(&k, &timestep.data)?;
        k.synchronize().map_err(gpu_err)?;
        k.ctx.bind_to_thread().map_err(gpu_err)?;
        drop(session.run_binding(&self.binding)?);
        self.binding.synchronize_outputs()?;
        Ok(self.outputs.clone())
    }
}

/// Runs the ControlNet's prelude on conditioning and image already on `k`'s GPU (`tensors`:
/// prompt embeddings, pooled, time ids, image) and its pristine weights; outputs on the device.
fn run_prelude(
    session: &mut Session,
    k: &GpuKernels,
    weights: &Weights,
    tensors: [&DevTensor; 4],
) -> Result<JobConsts> {
    let device = k.ordinal();
    let pristine = MergedWeights::default();
    prelude::run_device(session, device as i32, 0, |b, names| {
        for name in names {
            let i = COND
                .iter()
                .position(|c| c == name)
                .or((name == "controlnet_cond").then_some(3));
            match i {
                Some(i) => bind_dev(b, name, tensors[i].ptr(k), &tensors[i].shape, device)?,
                None => weights.bind_input(b, name, &pristine)?,
            }
        }
        Ok(())
    })
}
