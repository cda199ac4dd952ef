//! A ControlNet run in-process: `(latent, t, embeddings, image) → 9 down residuals + 1 mid`.
//!
//! Residuals leave unscaled; the pipeline adds `scale · residual` to the UNet skips (diffusers'
//! MultiControlNet: a sum of scaled residuals, each ControlNet active between its start and end).

use ort::session::{IoBinding, Session};
use ort::value::DynValue;

use katz_kernels::cuda::GpuKernels;

use crate::bundle::{check_compute, check_io, BaseBundle, ControlNetBundle};
use crate::device::{kernels_for, DevRef, DevTensor};
use crate::runtime::{self, SessionOptions};
use crate::tensor::Tensor;
use crate::text::Conditioning;
use crate::Result;

pub struct ControlNet {
    pub bundle: ControlNetBundle,
    session: Session,
    outputs: Vec<String>,
    /// Step kernels (copies across GPUs) on this ControlNet's GPU, when it runs on one.
    kernels: Option<Arc<GpuKernels>>,
}

/// A ControlNet bound to one job on its GPU: conditioning and image go up once; each step's
/// latent is read in place (or copied from the pipeline's GPU), residuals stay on the device.
pub struct BoundControlNet {
    binding: IoBinding,
    kernels: Arc<GpuKernels>,
    /// The step's latent, when the pipeline runs on another GPU.
    sample: Option<DevTensor>,
    /// The last step's residuals (ONNX Runtime's buffers, kept alive until the next step).
    held: Vec<DynValue>,
}

impl ControlNet {
    /// Loads a ControlNet for the guidance batch (2; with static shapes, fixed to it).
    pub fn load(bundle: ControlNetBundle, base: &BaseBundle, opts: &SessionOptions) -> Result<Self> {
        Self::load_batch(bundle, base, opts, 2)
    }

    /// [`ControlNet::load`] for a batch of `batch` (1: one guidance half per ControlNet, the
    /// paper's placement; `Pipeline::controlnet_halves`).
    pub fn load_batch(
        bundle: ControlNetBundle,
        base: &BaseBundle,
        opts: &SessionOptions,
        batch: usize,
    ) -> Result<Self> {
        bundle.check_fits(base)?;
        check_compute(&bundle.dir, &bundle.manifest.compute, opts.device)?;
        let path = bundle.dir.join(&bundle.manifest.graph);
        let dims = match opts.fixed {
            Some(f) => crate::pipeline::controlnet_dims(base.manifest.vae_scale_factor, f, batch),
            None => vec![],
        };
        let session = runtime::session_with_dims(&path, opts, &dims)?;
        let mut outputs: Vec<String> = (0..bundle.manifest.residuals)
            .map(|i| format!("down_{i}"))
            .collect();
        outputs.push("mid".into());
        let inputs: Vec<String> = [
            "sample",
            "timestep",
            "encoder_hidden_states",
            "text_embeds",
            "time_ids",
            "controlnet_cond",
        ]
        .map(String::from)
        .to_vec();
        check_io(&path, &session, &inputs, &outputs)?;
        let kernels = match opts.device.gpu() {
            Some(id) => Some(kernels_for(id as usize)?),
            None => None,
        };
        Ok(ControlNet {
            bundle,
            session,
            outputs,
            kernels,
        })
    }

    /// The GPU this ControlNet runs on (`None`: the CPU).
    pub fn gpu(&self) -> Option<usize> {
        self.kernels.as_ref().map(|k| k.ordinal())
    }

    /// Binds this ControlNet for one job on its GPU (conditioning and image copied up once).
    pub fn bind(&mut self, cond: &Conditioning, image: &Tensor) -> Result<BoundControlNet> {
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
        for o in &self.outputs {
            binding.bind_output_to_device(o.as_str(), &dev)?;
        }
        Ok(BoundControlNet {
            binding,
            kernels,
            sample: None,
            held: Vec::new(),
        })
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
        let k = b.kernels.clone();
        let here = k.ordinal();
        let sample = if latent_in.device == here {
            latent_in.clone()
        } else {
            if b.sample.as_ref().map(|s| &s.shape) != Some(&latent_in.shape) {
                b.sample = Some(DevTensor::zeros(&k, latent_in.shape.clone())?);
            }
            let Some(s) = b.sample.as_ref() else {
                return Err(Error::Gpu("no staging buffer for the latent".into()));
            };
            let dst = s.ptr(&k);
            // SAFETY: both buffers hold `len` f32; the source is not written until we return
            unsafe { k.copy_raw(dst, latent_in.ptr, latent_in.len() * 4) }.map_err(crate::device::gpu_err)?;
            k.synchronize().map_err(crate::device::gpu_err)?;
            s.dev_ref(&k)
        };
        k.ctx.bind_to_thread().map_err(crate::device::gpu_err)?;
        // SAFETY: `sample` outlives the run (the caller's buffer or `b.sample`)
        let t = unsafe { sample.ort()? };
        b.binding.bind_input("sample", &*t)?;
        b.binding.bind_input("timestep", &*timestep.view()?)?;
        b.held.clear();
        let mut out = self.session.run_binding(&b.binding)?;
        b.binding.synchronize_outputs()?;
        let mut refs = Vec::with_capacity(self.outputs.len());
        for o in &self.outputs {
            let v = out.remove(o.as_str()).ok_or_else(|| {
                Error::Gpu(format!("ControlNet {}: no output {o}", self.bundle.manifest.name))
            })?;
            refs.push(DevRef::of_value(&v, here)?);
            b.held.push(v);
        }
        Ok(refs)
    }

    pub fn name(&self) -> &str {
        &self.bundle.manifest.name
    }

    /// Down residuals in skip order, then the mid residual.
    pub fn residuals(
        &mut self,
        sample: &Tensor,
        timestep: &Tensor,
        cond: &Conditioning,
        image: &Tensor,
    ) -> Result<Vec<Tensor>> {
        let out = self.session.run(ort::inputs![
            "sample" => sample.view()?,
            "timestep" => timestep.view()?,
            "encoder_hidden_states" => cond.prompt_embeds.view()?,
            "text_embeds" => cond.pooled.view()?,
            "time_ids" => cond.time_ids.view()?,
            "controlnet_cond" => image.view()?,
        ])?;
        self.outputs
            .iter()
            .map(|n| Tensor::from_output(&out, n))
            .collect()
    }
}

// ───────────────────────────── ControlNet sessions ─────────────────────────────
//
// A session binds one ControlNet to one job for its steps (DESIGN.md, ControlNet-as-a-Service):
//
//   pipeline, per step i:  send(i, latent_in, t) to every active session ─▶ UNet encoder (overlap)
//                          recv(i) from each ─▶ Σ scaleⱼ·residualⱼ into the skips ─▶ UNet decoder
//
// Where the ControlNet runs is the service's business: a thread of this process
// ([`ThreadedControlNets`]), or a `katz controlnet-worker` reached over Redis or CUDA IPC
// (katz-actors).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::pipeline::ControlRequest;
use crate::Error;

/// When a ControlNet step ran: handed over (`sent`), started and finished computing. The
/// pipeline reads the per-step critical path from these (`Timings::cn_*`).
#[derive(Debug, Clone, Copy)]
pub struct RunSpan {
    pub sent: Instant,
    pub start: Instant,
    pub end: Instant,
}

/// What a session needs once, when it opens.
pub struct SessionInit<'a> {
    /// The job's text conditioning (both guidance halves when guidance is on).
    pub cond: &'a Conditioning,
    /// The conditioning image, batched like the latents (`[B, 3, H, W]` in [0, 1]).
    pub image: &'a Tensor,
}

/// One ControlNet working for one job.
pub trait ControlSession: Send {
    /// Hands step `step`'s input over; returns without waiting for the residuals.
    fn send(&mut self, step: usize, latent_in: &Tensor, timestep: &Tensor) -> Result<()>;
    /// Step `step`'s residuals, unscaled: down residuals in skip order, then the mid residual.
    fn recv(&mut self, step: usize) -> Result<Vec<Tensor>>;
    /// Ends the session (also on drop); idempotent.
    fn close(&mut self) {}
    /// Whether the session takes its step input and gives its residuals in GPU memory
    /// ([`ControlSession::send_device`], [`ControlSession::recv_device`]). A GPU pipeline talks
    /// to the others through the host (`send`/`recv`, one download and one upload per step).
    fn on_device(&self) -> bool {
        false
    }
    /// [`ControlSession::send`] with the scaled latent in GPU memory (any GPU of this process);
    /// the pipeline does not change it before [`ControlSession::recv_device`] returns.
    fn send_device(&mut self, _step: usize, _latent_in: &DevRef, _timestep: &Tensor) -> Result<()> {
        Err(Error::Gpu("this ControlNet session has no device path".into()))
    }
    /// Step `step`'s residuals in GPU memory (down in skip order, then mid), valid until the next
    /// `send_device`.
    fn recv_device(&mut self, _step: usize) -> Result<Vec<DevRef>> {
        Err(Error::Gpu("this ControlNet session has no device path".into()))
    }
    /// When the step last received ran, where the session can tell (in-process sessions).
    fn last_span(&self) -> Option<RunSpan> {
        None
    }
}

/// Opens sessions for the ControlNets of a job.
pub trait ControlService {
    /// A session for ControlNet `index` of the job (`req` names the model, scale and steps).
    fn open(
        &mut self,
        index: usize,
        req: &ControlRequest,
        init: SessionInit<'_>,
    ) -> Result<Box<dyn ControlSession>>;
}

/// In-process ControlNets run where the pipeline runs, one after another after the UNet encoder
/// ("in-process serial": `recv` computes; nothing overlaps).
#[derive(Clone, Default)]
pub struct InlineControlNets {
    pub models: Vec<Arc<Mutex<ControlNet>>>,
}

struct InlineSession {
    model: Arc<Mutex<ControlNet>>,
    cond: Conditioning,
    image: Tensor,
    input: Option<(usize, Tensor, Tensor)>,
    /// On a GPU: the job's binding (made at the first device step) and the pending device input.
    gpu: bool,
    bound: Option<BoundControlNet>,
    dev_input: Option<(usize, DevRef, Tensor)>,
    sent: Option<Instant>,
    last: Option<RunSpan>,
}

impl ControlService for InlineControlNets {
    fn open(
        &mut self,
        index: usize,
        req: &ControlRequest,
        init: SessionInit<'_>,
    ) -> Result<Box<dyn ControlSession>> {
        let model = loaded(&self.models, index, req)?;
        let gpu = lock(&model).gpu().is_some();
        Ok(Box::new(InlineSession {
            model,
            cond: clone_cond(init.cond),
            image: init.image.clone(),
            input: None,
            gpu,
            bound: None,
            dev_input: None,
            sent: None,
            last: None,
        }))
    }
}

impl ControlSession for InlineSession {
    fn send(&mut self, step: usize, latent_in: &Tensor, timestep: &Tensor) -> Result<()> {
        self.input = Some((step, latent_in.clone(), timestep.clone()));
        self.sent = Some(Instant::now());
        Ok(())
    }

    fn recv(&mut self, step: usize) -> Result<Vec<Tensor>> {
        let (s, latent_in, timestep) = self
            .input
            .take()
            .ok_or_else(|| Error::InvalidRequest("ControlNet step received before it was sent".into()))?;
        debug_assert_eq!(s, step);
        let start = Instant::now();
        let out = self.model.lock().unwrap_or_else(|e| e.into_inner()).residuals(
            &latent_in,
            &timestep,
            &self.cond,
            &self.image,
        );
        self.note(start);
        out
    }

    fn on_device(&self) -> bool {
        self.gpu
    }

    fn send_device(&mut self, step: usize, latent_in: &DevRef, timestep: &Tensor) -> Result<()> {
        self.dev_input = Some((step, latent_in.clone(), timestep.clone()));
        self.sent = Some(Instant::now());
        Ok(())
    }

    fn recv_device(&mut self, step: usize) -> Result<Vec<DevRef>> {
        let (s, latent_in, timestep) = self
            .dev_input
            .take()
            .ok_or_else(|| Error::InvalidRequest("ControlNet step received before it was sent".into()))?;
        debug_assert_eq!(s, step);
        let start = Instant::now();
        let mut model = lock(&self.model);
        if self.bound.is_none() {
            self.bound = Some(model.bind(&self.cond, &self.image)?);
        }
        let Some(b) = self.bound.as_mut() else {
            return Err(Error::Gpu("the ControlNet is not bound".into()));
        };
        let out = model.run_bound(b, &latent_in, &timestep);
        drop(model);
        self.note(start);
        out
    }

    fn last_span(&self) -> Option<RunSpan> {
        self.last
    }
}

impl InlineSession {
    fn note(&mut self, start: Instant) {
        self.last = Some(RunSpan {
            sent: self.sent.take().unwrap_or(start),
            start,
            end: Instant::now(),
        });
    }
}

fn lock(m: &Mutex<ControlNet>) -> std::sync::MutexGuard<'_, ControlNet> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The loaded ControlNet a request names.
fn loaded(
    models: &[Arc<Mutex<ControlNet>>],
    index: usize,
    req: &ControlRequest,
) -> Result<Arc<Mutex<ControlNet>>> {
    models.get(req.model).cloned().ok_or_else(|| {
        Error::InvalidRequest(format!(
            "ControlNet #{index} refers to a model that is not loaded"
        ))
    })
}

fn clone_cond(c: &Conditioning) -> Conditioning {
    Conditioning {
        prompt_embeds: c.prompt_embeds.clone(),
        pooled: c.pooled.clone(),
        time_ids: c.time_ids.clone(),
    }
}

/// In-process ControlNets, each session on a thread of its own so that it overlaps the UNet
/// encoder ("in-process parallel"). Tensors move between threads; nothing is serialised.
#[derive(Clone, Default)]
pub struct ThreadedControlNets {
    pub models: Vec<Arc<Mutex<ControlNet>>>,
    /// The threads sessions run on, kept between jobs (crate::threads says why).
    pub threads: Arc<crate::threads::LastingThreads>,
}

/// A step's input: on the host, or in GPU memory.
enum StepIn {
    Host(usize, Tensor, Tensor),
    Device(usize, DevRef, Tensor),
}

enum StepOut {
    Host(usize, Result<Vec<Tensor>>, [Instant; 2]),
    Device(usize, Result<Vec<DevRef>>, [Instant; 2]),
}

struct ThreadedSession {
    tx: Option<mpsc::Sender<StepIn>>,
    rx: mpsc::Receiver<StepOut>,
    /// Closed when the session's loop has ended (its thread goes back to the pool).
    done: Option<mpsc::Receiver<()>>,
    name: String,
    gpu: bool,
    sent: Option<Instant>,
    last: Option<RunSpan>,
}

impl ControlService for ThreadedControlNets {
    fn open(
        &mut self,
        index: usize,
        req: &ControlRequest,
        init: SessionInit<'_>,
    ) -> Result<Box<dyn ControlSession>> {
        let model = loaded(&self.models, index, req)?;
        let (name, gpu) = {
            let m = lock(&model);
            (m.name().to_string(), m.gpu().is_some())
        };
        let (tx, in_rx) = mpsc::channel::<StepIn>();
        let (out_tx, rx) = mpsc::channel();
        let cond = clone_cond(init.cond);
        let image = init.image.clone();
        let (done_tx, done) = mpsc::channel::<()>();
        self.threads
            .run(move || {
                let _done = done_tx; // dropped when the loop ends, also on a panic
                let mut bound: Option<BoundControlNet> = None;
                for input in in_rx {
                    let start = Instant::now();
                    let out = match input {
                        StepIn::Host(step, latent_in, timestep) => {
                            let res = lock(&model).residuals(&latent_in, &timestep, &cond, &image);
                            StepOut::Host(step, res, [start, Instant::now()])
                        }
                        StepIn::Device(step, latent_in, timestep) => {
                            let mut m = lock(&model);
                            let res = match bound.as_mut() {
                                Some(b) => m.run_bound(b, &latent_in, &timestep),
                                None => m.bind(&cond, &image).and_then(|b| {
                                    let b = bound.insert(b);
                                    m.run_bound(b, &latent_in, &timestep)
                                }),
                            };
                            StepOut::Device(step, res, [start, Instant::now()])
                        }
                    };
                    if out_tx.send(out).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::InvalidRequest(format!("starting a ControlNet thread: {e}")))?;
        Ok(Box::new(ThreadedSession {
            tx: Some(tx),
            rx,
            done: Some(done),
            name,
            gpu,
            sent: None,
            last: None,
        }))
    }
}

impl ThreadedSession {
    fn gone(&self) -> Error {
        Error::InvalidRequest(format!("ControlNet {} session thread is gone", self.name))
    }

    fn post(&mut self, input: StepIn) -> Result<()> {
        let tx = self.tx.as_ref().ok_or_else(|| self.gone())?;
        self.sent = Some(Instant::now());
        tx.send(input).map_err(|_| self.gone())
    }

    fn take(&mut self) -> Result<StepOut> {
        let out = self.rx.recv().map_err(|_| self.gone())?;
        let (StepOut::Host(_, _, [start, end]) | StepOut::Device(_, _, [start, end])) = &out;
        self.last = Some(RunSpan {
            sent: self.sent.take().unwrap_or(*start),
            start: *start,
            end: *end,
        });
        Ok(out)
    }
}

impl ControlSession for ThreadedSession {
    fn send(&mut self, step: usize, latent_in: &Tensor, timestep: &Tensor) -> Result<()> {
        self.post(StepIn::Host(step, latent_in.clone(), timestep.clone()))
    }

    fn recv(&mut self, step: usize) -> Result<Vec<Tensor>> {
        match self.take()? {
            StepOut::Host(got, res, _) => {
                debug_assert_eq!(got, step);
                res
            }
            StepOut::Device(..) => Err(Error::Gpu(
                "device residuals where host ones were asked for".into(),
            )),
        }
    }

    fn on_device(&self) -> bool {
        self.gpu
    }

    fn send_device(&mut self, step: usize, latent_in: &DevRef, timestep: &Tensor) -> Result<()> {
        self.post(StepIn::Device(step, latent_in.clone(), timestep.clone()))
    }

    fn recv_device(&mut self, step: usize) -> Result<Vec<DevRef>> {
        match self.take()? {
            StepOut::Device(got, res, _) => {
                debug_assert_eq!(got, step);
                res
            }
            StepOut::Host(..) => Err(Error::Gpu(
                "host residuals where device ones were asked for".into(),
            )),
        }
    }

    fn last_span(&self) -> Option<RunSpan> {
        self.last
    }

    fn close(&mut self) {
        self.tx = None;
        if let Some(d) = self.done.take() {
            let _ = d.recv(); // Err once the loop has ended and dropped its sender
        }
    }
}

impl Drop for ThreadedSession {
    fn drop(&mut self) {
        self.close();
    }
}
