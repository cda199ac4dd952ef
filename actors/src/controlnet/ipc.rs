//! The CUDA IPC transport of ControlNet sessions: base worker and ControlNet worker on one host,
//! tensors in GPU memory, Redis carrying only handles, shapes and step numbers.
//!
//! ```text
//! base (BaseIpc)                                        ControlNet worker (WorkerIpc)
//! latent_in ─copy─▶ input IpcBuffer, record event ─▶ RPUSH in: IpcStep{handles, shape, t}
//!                                                       map input (once), wait its event
//!                                                       run the ControlNet on its GPU
//!                                                       residuals ─copy─▶ output IpcBuffer, record event
//! map output (once), wait its event ◀─ BLPOP out: IpcResiduals{handles, shapes} (or an error)
//! residuals read in place (same GPU) or peer-copied by the pipeline
//! ```
//!
//! In half precision (`IpcResiduals::f16`, the session's `residuals`) the worker converts its
//! residuals to fp16 into the output buffer, and the base converts them back into an f32 buffer
//! of its own GPU, the kernel reading across: half the bytes cross between GPUs, and the
//! pipeline reads them in place. A ControlNet computing in fp16 loses nothing by it.
//!
//! Each side frees the buffers it owns when the session ends (or its process exits); mappings
//! close on drop. A worker that cannot serve IPC (CPU model, other host) answers with an error,
//! and the job fails naming it: nothing silently moves through the host instead.

use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaStream};
use katz_kernels::cuda::GpuKernels;
use katz_kernels::ipc::{handle_from_hex, handle_hex, IpcBuffer, IpcEvent, IpcMapping};
use katz_onnx::controlnet::{BoundControlNet, ControlNet};
use katz_onnx::device::DevRef;
use katz_onnx::tensor::Tensor;
use katz_onnx::text::Conditioning;
use katz_onnx::{Error, Result};

use super::wire::{host_identity, IpcResiduals, IpcStep};

fn ipc_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::ControlNet(format!("CUDA IPC: {what}: {e}"))
}

fn context(device: usize) -> Result<(Arc<CudaContext>, Arc<CudaStream>)> {
    if !katz_kernels::cuda::cuda_available() {
        return Err(ipc_err("no GPU", "the CUDA driver or a device is missing"));
    }
    let ctx = CudaContext::new(device).map_err(|e| ipc_err("opening the GPU", e))?;
    let stream = ctx.new_stream().map_err(|e| ipc_err("a stream", e))?;
    Ok((ctx, stream))
}

/// The conversion kernels of GPU `device`, compiled (or loaded from the PTX cache) once per
/// process and shared by its sessions.
fn kernels(device: usize) -> Result<Arc<Mutex<GpuKernels>>> {
    static KERNELS: Mutex<Vec<(usize, Arc<Mutex<GpuKernels>>)>> = Mutex::new(Vec::new());
    let mut all = KERNELS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, k)) = all.iter().find(|(d, _)| *d == device) {
        return Ok(k.clone());
    }
    let k = Arc::new(Mutex::new(
        GpuKernels::new(device).map_err(|e| ipc_err("the fp16 kernels", e))?,
    ));
    all.push((device, k.clone()));
    Ok(k)
}

/// Copies `bytes` between device addresses (either may be mapped from another process) on
/// `stream`.
///
/// # Safety
/// Both must address `bytes` live device bytes.
unsafe fn copy(ctx: &CudaContext, stream: &CudaStream, dst: u64, src: u64, bytes: usize) -> Result<()> {
    ctx.bind_to_thread().map_err(|e| ipc_err("binding the GPU", e))?;
    unsafe { cudarc::driver::sys::cuMemcpyAsync(dst, src, bytes, stream.cu_stream()) }
        .result()
        .map_err(|e| ipc_err("copying", e))
}

/// A mapping or event of the other side, opened once per handle.
struct Opened<T> {
    hex: String,
    it: T,
}

fn opened<'s, T>(
    slot: &'s mut Option<Opened<T>>,
    hex: &str,
    open: impl FnOnce(&[u8; 64]) -> Result<T>,
) -> Result<&'s T> {
    if slot.as_ref().map(|o| o.hex.as_str()) != Some(hex) {
        let h = handle_from_hex(hex).map_err(|e| ipc_err("a handle", e))?;
        *slot = Some(Opened {
            hex: hex.to_string(),
            it: open(&h)?,
        });
    }
    slot.as_ref()
        .map(|o| &o.it)
        .ok_or_else(|| ipc_err("a handle", "not opened"))
}

/// The base worker's side of one session.
pub struct BaseIpc {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    device: usize,
    host: String,
    input: Option<IpcBuffer>,
    event: IpcEvent,
    out: Option<Opened<IpcMapping>>,
    out_event: Option<Opened<IpcEvent>>,
    /// Half-precision answers, converted back to f32 on this GPU.
    widened: Option<IpcBuffer>,
}

impl BaseIpc {
    /// For a pipeline on GPU `device`.
    pub fn new(device: usize) -> Result<Self> {
        let (ctx, stream) = context(device)?;
        let event = IpcEvent::new(&ctx).map_err(|e| ipc_err("an event", e))?;
        Ok(BaseIpc {
            ctx,
            stream,
            device,
            host: host_identity(),
            input: None,
            event,
            out: None,
            out_event: None,
            widened: None,
        })
    }

    /// Puts step `step`'s latent into the shared buffer; the message announcing it.
    pub fn step(&mut self, step: usize, latent_in: &DevRef, timestep: &Tensor) -> Result<IpcStep> {
        if latent_in.device != self.device {
            return Err(ipc_err(
                "the latent",
                format!(
                    "on GPU {}, the session's is GPU {}",
                    latent_in.device, self.device
                ),
            ));
        }
        let bytes = latent_in.len() * 4;
        if self.input.as_ref().map(IpcBuffer::bytes) != Some(bytes) {
            self.input = Some(IpcBuffer::new(&self.ctx, bytes).map_err(|e| ipc_err("the input buffer", e))?);
        }
        let input = self
            .input
            .as_ref()
            .ok_or_else(|| ipc_err("the input buffer", "not allocated"))?;
        // SAFETY: the latent holds `bytes`; the pipeline keeps it until the residuals are back
        unsafe { copy(&self.ctx, &self.stream, input.ptr(), latent_in.ptr, bytes)? };
        self.event
            .record(&self.stream)
            .map_err(|e| ipc_err("recording", e))?;
        self.stream.synchronize().map_err(|e| ipc_err("the copy", e))?;
        Ok(IpcStep {
            step: step as u64,
            host: self.host.clone(),
            device: self.device as u32,
            buffer: handle_hex(&input.handle().map_err(|e| ipc_err("exporting the input", e))?),
            event: handle_hex(
                &self
                    .event
                    .handle()
                    .map_err(|e| ipc_err("exporting the event", e))?,
            ),
            shape: latent_in.shape.iter().map(|&d| d as u64).collect(),
            timestep: timestep.data.clone(),
        })
    }

    /// The residuals of a reply, in the worker's buffer (mapped here), once its event has passed.
    pub fn residuals(&mut self, r: &IpcResiduals) -> Result<Vec<DevRef>> {
        if let Some(e) = &r.error {
            return Err(Error::ControlNet(format!(
                "the ControlNet worker cannot serve CUDA IPC: {e}"
            )));
        }
        let ctx = self.ctx.clone();
        let base = opened(&mut self.out, &r.buffer, |h| {
            IpcMapping::open(&ctx, h).map_err(|e| ipc_err("mapping the residuals", e))
        })?
        .ptr();
        let ev = opened(&mut self.out_event, &r.event, |h| {
            IpcEvent::open(&ctx, h).map_err(|e| ipc_err("opening the worker's event", e))
        })?;
        let total: u64 = r.shapes.iter().map(|s| s.iter().product::<u64>()).sum();
        let (base, device) = if r.f16 {
            // fp16 in the worker's buffer: widened into an f32 buffer here, read across GPUs
            let bytes = total as usize * 4;
            if self.widened.as_ref().map(IpcBuffer::bytes) != Some(bytes) {
                self.widened = Some(
                    IpcBuffer::new(&self.ctx, bytes).map_err(|e| ipc_err("the f32 residual buffer", e))?,
                );
            }
            let dst = self
                .widened
                .as_ref()
                .ok_or_else(|| ipc_err("the f32 residual buffer", "not allocated"))?
                .ptr();
            let k = kernels(self.device)?;
            let k = k.lock().unwrap_or_else(|p| p.into_inner());
            ev.wait(&k.stream)
                .map_err(|e| ipc_err("waiting for the residuals", e))?;
            // SAFETY: the worker's buffer holds `total` fp16 values (its answer's shapes), ours
            // `total` f32; the worker writes its buffer again only after the next step is sent
            unsafe { k.from_f16_raw(base, dst, total as usize) }
                .map_err(|e| ipc_err("widening the residuals", e))?;
            k.synchronize()
                .map_err(|e| ipc_err("widening the residuals", e))?;
            (dst, self.device)
        } else {
            ev.wait(&self.stream)
                .map_err(|e| ipc_err("waiting for the residuals", e))?;
            self.stream
                .synchronize()
                .map_err(|e| ipc_err("waiting for the residuals", e))?;
            (base, r.device as usize)
        };
        let mut off = 0u64;
        Ok(r.shapes
            .iter()
            .map(|s| {
                let shape: Vec<usize> = s.iter().map(|&d| d as usize).collect();
                let d = DevRef {
                    ptr: base + off * 4,
                    shape,
                    device,
                };
                off += s.iter().product::<u64>();
                d
            })
            .collect())
    }
}

/// The ControlNet worker's side of one session.
pub struct WorkerIpc {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    device: usize,
    host: String,
    bound: Option<BoundControlNet>,
    input: Option<Opened<IpcMapping>>,
    in_event: Option<Opened<IpcEvent>>,
    out: Option<IpcBuffer>,
    event: IpcEvent,
}

impl WorkerIpc {
    /// Serves one IPC step; every failure becomes the reply's error.
    pub fn serve(
        slot: &mut Option<WorkerIpc>,
        cn: &mut ControlNet,
        cond: &Conditioning,
        image: &Tensor,
        m: &IpcStep,
        half: bool,
    ) -> IpcResiduals {
        let fail = |e: Error| IpcResiduals {
            step: m.step,
            error: Some(e.to_string()),
            device: 0,
            buffer: String::new(),
            event: String::new(),
            shapes: vec![],
            f16: false,
        };
        if slot.is_none() {
            let Some(device) = cn.gpu() else {
                return fail(Error::ControlNet(format!(
                    "ControlNet {} runs on the CPU here; CUDA IPC needs a ControlNet worker on a GPU (--device cuda:N)",
                    cn.name()
                )));
            };
            match context(device).and_then(|(ctx, stream)| {
                let event = IpcEvent::new(&ctx).map_err(|e| ipc_err("an event", e))?;
                Ok(WorkerIpc {
                    ctx,
                    stream,
                    device,
                    host: host_identity(),
                    bound: None,
                    input: None,
                    in_event: None,
                    out: None,
                    event,
                })
            }) {
                Ok(w) => *slot = Some(w),
                Err(e) => return fail(e),
            }
        }
        match slot.as_mut() {
            Some(w) => w.step(cn, cond, image, m, half).unwrap_or_else(fail),
            None => fail(ipc_err("the session", "no GPU side")),
        }
    }

    fn step(
        &mut self,
        cn: &mut ControlNet,
        cond: &Conditioning,
        image: &Tensor,
        m: &IpcStep,
        half: bool,
    ) -> Result<IpcResiduals> {
        if m.host != self.host {
            return Err(ipc_err(
                "another host",
                format!("the base runs on {}, this worker on {}", m.host, self.host),
            ));
        }
        let ctx = self.ctx.clone();
        let input = opened(&mut self.input, &m.buffer, |h| {
            IpcMapping::open(&ctx, h).map_err(|e| ipc_err("mapping the latent", e))
        })?
        .ptr();
        let ev = opened(&mut self.in_event, &m.event, |h| {
            IpcEvent::open(&ctx, h).map_err(|e| ipc_err("opening the base's event", e))
        })?;
        ev.wait(&self.stream)
            .map_err(|e| ipc_err("waiting for the latent", e))?;
        self.stream
            .synchronize()
            .map_err(|e| ipc_err("waiting for the latent", e))?;
        if self.bound.is_none() {
            self.bound = Some(cn.bind(cond, image, false)?);
        }
        let latent = DevRef {
            ptr: input,
            shape: m.shape.iter().map(|&d| d as usize).collect(),
            device: m.device as usize,
        };
        let t = Tensor::new(vec![m.timestep.len()], m.timestep.clone());
        let bound = self
            .bound
            .as_mut()
            .ok_or_else(|| ipc_err("the ControlNet", "not bound"))?;
        let res = cn.run_bound(bound, &latent, &t)?;
        let width = if half { 2 } else { 4 };
        let total: usize = res.iter().map(DevRef::len).sum::<usize>() * width;
        if self.out.as_ref().map(IpcBuffer::bytes) != Some(total) {
            self.out = Some(IpcBuffer::new(&self.ctx, total).map_err(|e| ipc_err("the residual buffer", e))?);
        }
        let out = self
            .out
            .as_ref()
            .ok_or_else(|| ipc_err("the residual buffer", "not allocated"))?;
        let mut off = 0u64;
        if half {
            // narrowed on the kernels' stream, which the event then marks
            let k = kernels(self.device)?;
            let k = k.lock().unwrap_or_else(|p| p.into_inner());
            for r in &res {
                // SAFETY: the residual is the ControlNet's live output (f32), the buffer holds
                // every residual as fp16
                unsafe { k.to_f16_raw(r.ptr, out.ptr() + off, r.len()) }
                    .map_err(|e| ipc_err("narrowing the residuals", e))?;
                off += (r.len() * 2) as u64;
            }
            self.event
                .record(&k.stream)
                .map_err(|e| ipc_err("recording", e))?;
            k.synchronize()
                .map_err(|e| ipc_err("narrowing the residuals", e))?;
        } else {
            for r in &res {
                // SAFETY: the residual is the ControlNet's live output; the buffer holds them all
                unsafe { copy(&self.ctx, &self.stream, out.ptr() + off, r.ptr, r.len() * 4)? };
                off += (r.len() * 4) as u64;
            }
        }
        if !half {
            self.event
                .record(&self.stream)
                .map_err(|e| ipc_err("recording", e))?;
            self.stream
                .synchronize()
                .map_err(|e| ipc_err("the residual copy", e))?;
        }
        Ok(IpcResiduals {
            step: m.step,
            error: None,
            device: self.device as u32,
            buffer: handle_hex(&out.handle().map_err(|e| ipc_err("exporting the residuals", e))?),
            event: handle_hex(
                &self
                    .event
                    .handle()
                    .map_err(|e| ipc_err("exporting the event", e))?,
            ),
            shapes: res
                .iter()
                .map(|r| r.shape.iter().map(|&d| d as u64).collect())
                .collect(),
            f16: half,
        })
    }
}
