//! CUDA graphs for the UNet (`--cuda-graph`): ONNX Runtime's CUDA provider captures each UNet
//! graph's kernel launches once and replays them every step (one launch instead of thousands).
//!
//! ```text
//! GraphedUnet: one per UNet pair and GPU, made when the pipeline loads, as long-lived as it
//!
//!   sample, timestep ──┐  embeds, pooled, time_ids ──┐  weight slot (every LoRA-targetable weight)
//!     (each step)      ▼     (once per job)          ▼     (merged values copied in per merge)
//!                   unet_encoder (replayed) ─▶ emb, mid, skips   ◀─ ControlNet residuals added in place
//!                   unet_decoder (replayed) ─▶ noise_pred        ─▶ guidance combine, scheduler step
//! ```
//!
//! A captured graph replays on the addresses it was captured with, so every input and output is
//! bound once, here, to buffers that live as long as the sessions; a job writes its values into
//! them. LoRA-merged weights are copied into the [`WeightSlot`], and pristine values back when a
//! later job no longer merges them: the slot is a second copy of the LoRA-targetable weights on
//! the GPU (full-size SDXL, fp16: 4.5 GB), the price of merged weights under a graph — one slot
//! per GPU, which every shape bucket's graphs read (a pipeline runs one job at a time). Shapes
//! must be fixed (shape buckets) and every node must run on the CUDA provider (ONNX Runtime
//! refuses the session otherwise, at load).
//!
//! ONNX Runtime keeps its captured graph per thread and captures in CUDA's global capture mode,
//! during which no other thread of the process may allocate or synchronise. So the capture
//! happens here, when the pipeline loads ([`GraphedUnet::capture`] runs each graph once, on the
//! thread that will run it), before any job, LoRA merge or ControlNet thread runs.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use katz_kernels::cuda::GpuKernels;
use ort::memory::Allocator;
use ort::session::{IoBinding, Session};
use ort::value::{DynValue, Tensor as OrtTensor, ValueType};

use crate::device::{cuda_memory, gpu_err, ort_ref, DevRef, DevTensor};
use crate::text::Conditioning;
use crate::weights::{DevBuf, MergedWeights, Weights};

use super::prelude;
use crate::{Error, Result};

/// The UNet encoder and decoder of one GPU, bound once to lasting buffers for CUDA graphs.
pub(crate) struct GraphedUnet {
    // the bindings go first: they are dropped before the buffers they point at
    enc: IoBinding,
    dec: IoBinding,
    /// The latent input of a step (`[batch, 4, h, w]`), written by the scale kernel or a copy.
    pub sample: DevTensor,
    timestep: DevTensor,
    /// prompt_embeds, pooled, time_ids.
    cond: [DevTensor; 3],
    /// `emb`, `mid`, `skip_0` … (ONNX Runtime's buffers, owned by `enc` as its bound outputs).
    enc_out: Vec<DevRef>,
    noise_pred: DevRef,
    /// The weights the graphs read (shared by the buckets of one GPU).
    slot: Arc<WeightSlot>,
    /// The inputs the prelude makes (`job.<graph>.<tensor>`), lasting buffers its outputs are
    /// copied into once per job and LoRA switch ([`GraphedUnet::set_job_consts`]).
    job: Vec<(String, DevBuf, Vec<usize>)>,
    k: Arc<GpuKernels>,
}

/// The weights every CUDA graph of one GPU reads, by input name: a lasting copy of the pristine
/// set, into which a job's LoRA merge is copied (and pristine values back after it).
pub(crate) struct WeightSlot {
    bufs: HashMap<String, DevBuf>,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    /// The names holding a merge's values.
    merged: HashSet<String>,
    /// [`MergedWeights::id`] of the set in the slot.
    holds: u64,
}

impl WeightSlot {
    /// A copy of every UNet weight of `weights` (on `k`'s GPU), pristine to start with.
    pub(crate) fn new(weights: &Weights, k: &GpuKernels) -> Result<Arc<Self>> {
        let dev = weights
            .device()
            .ok_or_else(|| Error::Gpu("CUDA graphs need the weights on the GPU".into()))?;
        if dev.ordinal as usize != k.ordinal() {
            return Err(Error::Gpu(format!(
                "CUDA graph on cuda:{} with weights on cuda:{}",
                k.ordinal(),
                dev.ordinal
            )));
        }
        let mut bufs = HashMap::new();
        for name in weights.map().keys().filter(|n| weights.is_unet(n)) {
            // the pristine set does not change
            bufs.insert(name.clone(), dev.get(name).copy_on(&dev.kernels, k)?);
        }
        k.synchronize().map_err(gpu_err)?;
        Ok(Arc::new(WeightSlot {
            bufs,
            state: Mutex::new(SlotState::default()),
        }))
    }

    /// Puts `merged` (made on the GPU of `merged_on`: this one, or another by peer copy) in the
    /// slot, and pristine values (from `own`, this GPU's set) back where the slot held a merge
    /// that `merged` does not touch. Nothing to do if the slot holds this merge already.
    fn set(&self, k: &GpuKernels, own: &Weights, merged: &MergedWeights, merged_on: &Weights) -> Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if merged.id() == st.holds {
            return Ok(());
        }
        let dev = own
            .device()
            .ok_or_else(|| Error::Gpu("CUDA graphs need the weights on the GPU".into()))?;
        let src_dev = merged_on
            .device()
            .ok_or_else(|| Error::Gpu("the merged weights' set is not on a GPU".into()))?;
        let now: HashSet<String> = merged
            .names()
            .filter(|n| own.is_unet(n))
            .map(String::from)
            .collect();
        for name in st.merged.difference(&now) {
            let (dst, src) = (&self.bufs[name], dev.get(name));
            // SAFETY: same length and type; the graphs do not run until the synchronise below
            unsafe { k.copy_raw(dst.ptr(k), src.ptr(&dev.kernels), src.bytes()) }.map_err(gpu_err)?;
        }
        for name in &now {
            let src = merged.device(name).ok_or_else(|| {
                Error::Gpu(format!(
                    "CUDA graphs take LoRA merges made on the GPU; {name} was merged on the host"
                ))
            })?;
            let dst = self
                .bufs
                .get(name)
                .ok_or_else(|| Error::Gpu(format!("the merge touches {name}, which no UNet graph takes")))?;
            if dst.bytes() != src.bytes() {
                return Err(Error::Gpu(format!("merged {name} does not fit the slot")));
            }
            // SAFETY: as above; the merge is complete (its merge stream was synchronised)
            unsafe { k.copy_raw(dst.ptr(k), src.ptr(&src_dev.kernels), src.bytes()) }.map_err(gpu_err)?;
        }
        // a graph replays without running the fp8 operators: their weight copies of what was
        // written are made again now (nothing to do without fp8 graphs)
        let written: Vec<u64> = st
            .merged
            .union(&now)
            .filter_map(|n| self.bufs.get(n))
            .map(|b| b.ptr(k))
            .collect();
        // SAFETY: the stream is this GPU's; the copies above are queued on it before
        unsafe { crate::fp8::refresh(k.ordinal(), k.stream.cu_stream() as u64, &written) }?;
        k.synchronize().map_err(gpu_err)?;
        st.merged = now;
        st.holds = merged.id();
        Ok(())
    }
}

/// A graph input's shape, its free dimensions resolved from `known`.
fn shape_of(session: &Session, name: &str, known: &[(String, i64)]) -> Result<Vec<usize>> {
    outlet_shape(session.inputs(), name, known)
}

/// The shape of input or output `name` among `outlets` (a session's inputs or outputs), its
/// free dimensions resolved from `known`; the step buffers are f32, so it must be f32.
pub(crate) fn outlet_shape(
    outlets: &[ort::value::Outlet],
    name: &str,
    known: &[(String, i64)],
) -> Result<Vec<usize>> {
    let o = outlets
        .iter()
        .find(|o| o.name() == name)
        .ok_or_else(|| Error::Gpu(format!("CUDA graph: the graph has no {name}")))?;
    let (ty, dims) = outlet_dims(o, known)?;
    if ty != ort::value::TensorElementType::Float32 {
        return Err(Error::Gpu(format!(
            "CUDA graph: {name} is {ty:?}; the step buffers are f32"
        )));
    }
    Ok(dims)
}

/// The element type and dimensions of outlet `o`, its free dimensions (named by its symbols)
/// from `known`.
fn outlet_dims(
    o: &ort::value::Outlet,
    known: &[(String, i64)],
) -> Result<(ort::value::TensorElementType, Vec<usize>)> {
    let name = o.name();
    let ValueType::Tensor {
        ty,
        shape,
        dimension_symbols,
    } = o.dtype()
    else {
        return Err(Error::Gpu(format!("CUDA graph: {name} is not a tensor")));
    };
    let dims = shape
        .iter()
        .enumerate()
        .map(|(i, &d)| {
            if d >= 0 {
                return Ok(d as usize);
            }
            let sym = dimension_symbols.get(i).map(String::as_str).unwrap_or("");
            known
                .iter()
                .find(|(n, _)| n == sym)
                .map(|&(_, v)| v as usize)
                .ok_or_else(|| {
                    Error::Gpu(format!(
                        "CUDA graph: dimension {i} (`{sym}`) of {name} is not fixed by the static shapes"
                    ))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((*ty, dims))
}

/// Binds the f32 device buffer at `ptr` as input `name` (in place, no copy).
pub(crate) fn bind_dev(
    b: &mut IoBinding,
    name: &str,
    ptr: u64,
    shape: &[usize],
    device: usize,
) -> Result<()> {
    // SAFETY: callers pass buffers of this struct, which outlive the bindings (field order)
    let t = unsafe { ort_ref(ptr, shape, device)? };
    b.bind_input(name, &*t)?;
    Ok(())
}

/// A lasting output buffer from the session's CUDA allocator, bound as output `name`.
pub(crate) fn bind_out(
    b: &mut IoBinding,
    alloc: &Allocator,
    name: &str,
    shape: &[usize],
    device: usize,
) -> Result<DevRef> {
    let v: DynValue = OrtTensor::<f32>::new(alloc, shape.to_vec())?.into_dyn();
    let r = DevRef::of_value(&v, device)?;
    b.bind_output(name, v)?;
    Ok(r)
}

impl GraphedUnet {
    /// Binds the UNet pair on `k`'s GPU with the free dimensions `enc_dims` / `dec_dims` of its
    /// shape bucket, reading the weights from `slot` (made from `weights`).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        enc_session: &Session,
        dec_session: &Session,
        weights: &Weights,
        slot: Arc<WeightSlot>,
        k: Arc<GpuKernels>,
        skips: usize,
        enc_dims: &[(String, i64)],
        dec_dims: &[(String, i64)],
    ) -> Result<Self> {
        let device = k.ordinal();
        let known: Vec<(String, i64)> = enc_dims.iter().chain(dec_dims).cloned().collect();
        let zeros = |shape: Vec<usize>| DevTensor::zeros(&k, shape);

        let sample = zeros(shape_of(enc_session, "sample", &known)?)?;
        let timestep = zeros(shape_of(enc_session, "timestep", &known)?)?;
        let cond = [
            zeros(shape_of(enc_session, "encoder_hidden_states", &known)?)?,
            zeros(shape_of(enc_session, "text_embeds", &known)?)?,
            zeros(shape_of(enc_session, "time_ids", &known)?)?,
        ];

        let mut enc = enc_session.create_binding()?;
        let mut dec = dec_session.create_binding()?;
        bind_dev(&mut enc, "sample", sample.ptr(&k), &sample.shape, device)?;
        bind_dev(&mut enc, "timestep", timestep.ptr(&k), &timestep.shape, device)?;
        for (name, t) in ["encoder_hidden_states", "text_embeds", "time_ids"]
            .iter()
            .zip(&cond)
        {
            bind_dev(&mut enc, name, t.ptr(&k), &t.shape, device)?;
        }
        bind_dev(
            &mut dec,
            "encoder_hidden_states",
            cond[0].ptr(&k),
            &cond[0].shape,
            device,
        )?;
        for (b, graph) in [(&mut enc, "unet_encoder"), (&mut dec, "unet_decoder")] {
            for name in weights.inputs_of(graph) {
                // SAFETY: the slot outlives the bindings (field order)
                let buf = slot
                    .bufs
                    .get(name)
                    .ok_or_else(|| Error::Gpu(format!("the weight slot has no {name}")))?;
                unsafe { buf.bind(b, name, &weights.map()[name].shape, &k, device as i32)? };
            }
        }

        // outputs: lasting buffers of the sessions' CUDA allocators; the encoder's feed the decoder
        let enc_alloc = Allocator::new(enc_session, cuda_memory(device as i32)?)?;
        let dec_alloc = Allocator::new(dec_session, cuda_memory(device as i32)?)?;
        let mut names = vec!["emb".to_string(), "mid".to_string()];
        names.extend((0..skips).map(|i| format!("skip_{i}")));
        let mut enc_out = Vec::with_capacity(names.len());
        for name in &names {
            // the decoder's input says the shape (its free dimensions are the fixed ones)
            let shape = shape_of(dec_session, name, &known)?;
            let r = bind_out(&mut enc, &enc_alloc, name, &shape, device)?;
            bind_dev(&mut dec, name, r.ptr, &r.shape, device)?;
            enc_out.push(r);
        }
        let noise_pred = bind_out(&mut dec, &dec_alloc, "noise_pred", &sample.shape, device)?;
        let mut job = Vec::new();
        for (b, session) in [(&mut enc, enc_session), (&mut dec, dec_session)] {
            for o in session
                .inputs()
                .iter()
                .filter(|o| o.name().starts_with(prelude::PREFIX))
            {
                let (ty, shape) = outlet_dims(o, &known)?;
                let buf = prelude::lasting(&k, ty, shape.iter().product(), o.name())?;
                // SAFETY: the buffer lives in `job`, dropped after the bindings (field order)
                unsafe { buf.bind(b, o.name(), &shape, &k, device as i32)? };
                job.push((o.name().to_string(), buf, shape));
            }
        }
        Ok(GraphedUnet {
            enc,
            dec,
            sample,
            timestep,
            cond,
            enc_out,
            noise_pred,
            slot,
            job,
            k,
        })
    }

    /// Runs both graphs once: ONNX Runtime captures them on this thread (its first run of a
    /// graph-enabled session runs once to allocate, then captures). Call before any job, with no
    /// other thread of the process using CUDA.
    pub fn capture(&mut self, enc: &mut Session, dec: &mut Session) -> Result<()> {
        let t0 = std::time::Instant::now();
        self.encode(enc, 999.0)
            .map_err(|e| Error::Gpu(format!("capturing the UNet encoder's CUDA graph: {e}")))?;
        let encoder_ms = t0.elapsed().as_millis() as u64;
        self.decode(dec)
            .map_err(|e| Error::Gpu(format!("capturing the UNet decoder's CUDA graph: {e}")))?;
        tracing::debug!(
            encoder_ms,
            decoder_ms = t0.elapsed().as_millis() as u64 - encoder_ms,
            "UNet pair captured"
        );
        Ok(())
    }

    /// Copies a job's conditioning in (its shapes must be the captured ones).
    pub fn set_conditioning(&mut self, c: &Conditioning) -> Result<()> {
        let srcs = [
            (&c.prompt_embeds, "prompt embeddings"),
            (&c.pooled, "pooled embeddings"),
            (&c.time_ids, "time ids"),
        ];
        for (dst, (src, what)) in self.cond.iter_mut().zip(srcs) {
            if dst.shape != src.shape {
                return Err(Error::InvalidRequest(format!(
                    "the CUDA graph was captured for {what} of {:?}, this job has {:?}",
                    dst.shape, src.shape
                )));
            }
            dst.write(&self.k, &src.data)?;
        }
        self.k.synchronize().map_err(gpu_err)
    }

    /// Puts `merged` (made on `merged_on`'s GPU) in the weight slot (see [`WeightSlot`]).
    pub fn set_weights(&mut self, own: &Weights, merged: &MergedWeights, merged_on: &Weights) -> Result<()> {
        self.slot.set(&self.k, own, merged, merged_on)
    }

    /// Runs the prelude on the conditioning and the weights in the slot (after
    /// [`GraphedUnet::set_conditioning`] and [`GraphedUnet::set_weights`]) and copies its outputs
    /// into the buffers the graphs read. Nothing to do for graphs without a prelude.
    pub fn set_job_consts(&mut self, prelude: Option<&mut Session>, own: &Weights) -> Result<()> {
        if self.job.is_empty() {
            return Ok(());
        }
        let session = prelude.ok_or_else(|| {
            Error::Gpu("the UNet graphs take the prelude's outputs, and it is not loaded".into())
        })?;
        let device = self.k.ordinal();
        let (cond, slot, k) = (&self.cond, &self.slot, &self.k);
        let consts = prelude::run_device(session, device as i32, 0, |b, names| {
            for name in names {
                match ["encoder_hidden_states", "text_embeds", "time_ids"]
                    .iter()
                    .position(|c| c == name)
                {
                    Some(i) => bind_dev(b, name, cond[i].ptr(k), &cond[i].shape, device)?,
                    None => {
                        let buf = slot.bufs.get(name).ok_or_else(|| {
                            Error::Gpu(format!("the prelude reads {name}, which the weight slot lacks"))
                        })?;
                        let shape = &own
                            .map()
                            .get(name)
                            .ok_or_else(|| {
                                Error::Gpu(format!("the prelude reads {name}, which is no weight"))
                            })?
                            .shape;
                        // SAFETY: the slot outlives this run
                        unsafe { buf.bind(b, name, shape, k, device as i32)? };
                    }
                }
            }
            Ok(())
        })?;
        prelude::copy_into(&self.k, &consts, self.job.iter().map(|(n, b, _)| (n.as_str(), b)))?;
        self.k.synchronize().map_err(gpu_err)
    }

    /// Runs the encoder at timestep `t` on the current `sample`; its outputs' addresses.
    pub fn encode(&mut self, session: &mut Session, t: f32) -> Result<&[DevRef]> {
        let b = self.timestep.len();
        self.timestep.write(&self.k, &vec![t; b])?;
        self.k.synchronize().map_err(gpu_err)?;
        drop(session.run_binding(&self.enc)?);
        self.enc.synchronize_outputs()?;
        Ok(&self.enc_out)
    }

    /// Runs the decoder on the encoder's outputs (residuals added in place); the noise prediction.
    pub fn decode(&mut self, session: &mut Session) -> Result<&DevRef> {
        drop(session.run_binding(&self.dec)?);
        self.dec.synchronize_outputs()?;
        Ok(&self.noise_pred)
    }

    /// The step kernels of this GPU (its context, a stream for the copies).
    pub fn kernels(&self) -> &GpuKernels {
        &self.k
    }
}
