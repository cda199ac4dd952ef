//! CUDA IPC: device buffers and events shared between processes of one host — the transport a
//! ControlNet worker and a base worker use for a step's latent and residuals (ControlNet-as-a-Service).
//!
//! ```text
//! owner process                                   peer process (same host, any of its GPUs)
//! IpcBuffer::new(ctx, bytes)  ── cuMemAlloc ──▶ handle() : 64 bytes ──(Redis)──▶ IpcMapping::open(ctx, handle)
//!   (freed on drop)                                                           (cuIpcOpenMemHandle, lazy peer
//!                                                                              access; closed on drop)
//! IpcEvent::new(ctx)  ── interprocess event ──▶ handle() ──(Redis)──▶ IpcEvent::open(ctx, handle)
//! writer: copy into the buffer, event.record(stream), tell the reader (Redis) which step it was
//! reader: event.wait(its stream) — its later work on that stream sees the data — then reads
//! ```
//!
//! Buffers come from `cuMemAlloc`, not from the stream-ordered pool cudarc allocates from: pool
//! memory is not exportable by default. An IPC handle cannot be opened in the process that made
//! it (CUDA's rule): tests use two processes.

use std::sync::Arc;

use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaStream};

use crate::cuda::GpuError;

/// An exported memory or event handle, as bytes that travel between processes.
pub type Handle = [u8; 64];

fn to_bytes(r: &[std::ffi::c_char; 64]) -> Handle {
    let mut out = [0u8; 64];
    for (o, &c) in out.iter_mut().zip(r) {
        *o = c as u8;
    }
    out
}

fn to_chars(h: &Handle) -> [std::ffi::c_char; 64] {
    let mut out = [0 as std::ffi::c_char; 64];
    for (o, &b) in out.iter_mut().zip(h) {
        *o = b as std::ffi::c_char;
    }
    out
}

/// Hex form of a handle (for messages and environment variables).
pub fn handle_hex(h: &Handle) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

/// A handle back from [`handle_hex`].
pub fn handle_from_hex(s: &str) -> Result<Handle, GpuError> {
    let bad = || GpuError::Shape(format!("not a 64-byte hex handle: {s:.20}…"));
    if s.len() != 128 {
        return Err(bad());
    }
    let mut out = [0u8; 64];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// Device memory this process owns and exports.
pub struct IpcBuffer {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

// SAFETY: a device address and its context; CUDA calls bind the context first.
unsafe impl Send for IpcBuffer {}
unsafe impl Sync for IpcBuffer {}

impl IpcBuffer {
    /// `bytes` of device memory on `ctx`'s GPU, zeroed.
    pub fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self, GpuError> {
        ctx.bind_to_thread()?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: plain allocation on the bound context
        unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes.max(1)) }.result()?;
        let b = IpcBuffer {
            ctx: ctx.clone(),
            ptr,
            bytes,
        };
        unsafe { sys::cuMemsetD8_v2(ptr, 0, bytes.max(1)) }.result()?;
        Ok(b)
    }

    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The handle another process opens with [`IpcMapping::open`].
    pub fn handle(&self) -> Result<Handle, GpuError> {
        self.ctx.bind_to_thread()?;
        let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
        unsafe { sys::cuIpcGetMemHandle(&mut h, self.ptr) }.result()?;
        Ok(to_bytes(&h.reserved))
    }
}

impl Drop for IpcBuffer {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // SAFETY: allocated by cuMemAlloc in `new`, freed once
            let _ = unsafe { sys::cuMemFree_v2(self.ptr) };
        }
    }
}

/// Another process's [`IpcBuffer`], mapped into this one.
pub struct IpcMapping {
    ctx: Arc<CudaContext>,
    ptr: sys::CUdeviceptr,
}

unsafe impl Send for IpcMapping {}
unsafe impl Sync for IpcMapping {}

impl IpcMapping {
    /// Maps the buffer behind `handle` into `ctx` (any GPU of this host: peer access is enabled
    /// lazily when the buffer lives on another one).
    pub fn open(ctx: &Arc<CudaContext>, handle: &Handle) -> Result<Self, GpuError> {
        ctx.bind_to_thread()?;
        let mut ptr: sys::CUdeviceptr = 0;
        let h = sys::CUipcMemHandle {
            reserved: to_chars(handle),
        };
        let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
        // SAFETY: the handle came from cuIpcGetMemHandle in another process of this host
        unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, h, flags) }.result()?;
        Ok(IpcMapping {
            ctx: ctx.clone(),
            ptr,
        })
    }

    /// The buffer's address in this process.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            let _ = unsafe { sys::cuIpcCloseMemHandle(self.ptr) };
        }
    }
}

/// An interprocess event: the writer records it after writing a shared buffer, the reader's
/// stream waits for it before reading.
pub struct IpcEvent {
    ctx: Arc<CudaContext>,
    ev: sys::CUevent,
}

unsafe impl Send for IpcEvent {}
unsafe impl Sync for IpcEvent {}

impl IpcEvent {
    pub fn new(ctx: &Arc<CudaContext>) -> Result<Self, GpuError> {
        ctx.bind_to_thread()?;
        let mut ev: sys::CUevent = std::ptr::null_mut();
        let flags = sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32
            | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        unsafe { sys::cuEventCreate(&mut ev, flags) }.result()?;
        Ok(IpcEvent { ctx: ctx.clone(), ev })
    }

    /// The event behind another process's [`IpcEvent::handle`].
    pub fn open(ctx: &Arc<CudaContext>, handle: &Handle) -> Result<Self, GpuError> {
        ctx.bind_to_thread()?;
        let mut ev: sys::CUevent = std::ptr::null_mut();
        let h = sys::CUipcEventHandle {
            reserved: to_chars(handle),
        };
        unsafe { sys::cuIpcOpenEventHandle(&mut ev, h) }.result()?;
        Ok(IpcEvent { ctx: ctx.clone(), ev })
    }

    pub fn handle(&self) -> Result<Handle, GpuError> {
        self.ctx.bind_to_thread()?;
        let mut h = sys::CUipcEventHandle { reserved: [0; 64] };
        unsafe { sys::cuIpcGetEventHandle(&mut h, self.ev) }.result()?;
        Ok(to_bytes(&h.reserved))
    }

    /// Marks the point of `stream` after the writes queued so far.
    pub fn record(&self, stream: &CudaStream) -> Result<(), GpuError> {
        self.ctx.bind_to_thread()?;
        unsafe { sys::cuEventRecord(self.ev, stream.cu_stream()) }.result()?;
        Ok(())
    }

    /// Work queued on `stream` from now on waits for the last record.
    pub fn wait(&self, stream: &CudaStream) -> Result<(), GpuError> {
        stream.context().bind_to_thread()?;
        unsafe { sys::cuStreamWaitEvent(stream.cu_stream(), self.ev, 0) }.result()?;
        Ok(())
    }
}

impl Drop for IpcEvent {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            let _ = unsafe { sys::cuEventDestroy_v2(self.ev) };
        }
    }
}

/// Host ↔ device copies on raw addresses (synchronous), for the transport's small messages and
/// the tests.
///
/// # Safety
/// `ptr` must address at least `data.len() · 4` bytes on `ctx`'s GPU (or mapped into it).
pub unsafe fn write_f32(ctx: &Arc<CudaContext>, ptr: u64, data: &[f32]) -> Result<(), GpuError> {
    ctx.bind_to_thread()?;
    unsafe { sys::cuMemcpyHtoD_v2(ptr, data.as_ptr().cast(), std::mem::size_of_val(data)) }.result()?;
    Ok(())
}

/// # Safety
/// See [`write_f32`].
pub unsafe fn read_f32(ctx: &Arc<CudaContext>, ptr: u64, n: usize) -> Result<Vec<f32>, GpuError> {
    ctx.bind_to_thread()?;
    let mut out = vec![0f32; n];
    unsafe { sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), ptr, n * 4) }.result()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_through_hex() {
        let mut h = [0u8; 64];
        for (i, b) in h.iter_mut().enumerate() {
            *b = (i * 37 % 256) as u8;
        }
        assert_eq!(handle_from_hex(&handle_hex(&h)).unwrap(), h);
        assert!(handle_from_hex("00").is_err());
        assert!(handle_from_hex(&"zz".repeat(64)).is_err());
    }

    const CHILD: &str = "KATZ_IPC_CHILD";

    /// The peer side, run by [`a_buffer_and_an_event_cross_processes`] in a child process of this
    /// test binary: maps the parent's buffer on the last GPU, writes a pattern, records the
    /// parent's event. Does nothing when run on its own.
    #[test]
    #[ignore = "the child half of a_buffer_and_an_event_cross_processes"]
    fn ipc_child() {
        let Ok(spec) = std::env::var(CHILD) else { return };
        let mut parts = spec.split(':');
        let (mem, ev, n, dev) = (
            handle_from_hex(parts.next().unwrap()).unwrap(),
            handle_from_hex(parts.next().unwrap()).unwrap(),
            parts.next().unwrap().parse::<usize>().unwrap(),
            parts.next().unwrap().parse::<usize>().unwrap(),
        );
        let ctx = CudaContext::new(dev).unwrap();
        let stream = ctx.default_stream();
        let m = IpcMapping::open(&ctx, &mem).unwrap();
        let e = IpcEvent::open(&ctx, &ev).unwrap();
        let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
        unsafe { write_f32(&ctx, m.ptr(), &data) }.unwrap();
        e.record(&stream).unwrap();
        stream.synchronize().unwrap();
    }

    /// Needs a GPU (two, for the cross-GPU path): tools/device/gpu-path.sh tests.
    #[test]
    #[ignore = "needs a GPU: tools/device/gpu-path.sh"]
    fn a_buffer_and_an_event_cross_processes() {
        assert!(crate::cuda::cuda_available(), "no CUDA device");
        let ctx = CudaContext::new(0).unwrap();
        let n = 1 << 16;
        let buf = IpcBuffer::new(&ctx, n * 4).unwrap();
        let ev = IpcEvent::new(&ctx).unwrap();
        let peer_dev = crate::cuda::device_count().saturating_sub(1);
        let spec = format!(
            "{}:{}:{n}:{peer_dev}",
            handle_hex(&buf.handle().unwrap()),
            handle_hex(&ev.handle().unwrap())
        );
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "ipc::tests::ipc_child",
                "--ignored",
                "--test-threads",
                "1",
            ])
            .env(CHILD, spec)
            .status()
            .unwrap();
        assert!(status.success(), "the child process failed");
        let stream = ctx.default_stream();
        ev.wait(&stream).unwrap();
        stream.synchronize().unwrap();
        let got = unsafe { read_f32(&ctx, buf.ptr(), n) }.unwrap();
        let want: Vec<f32> = (0..n).map(|i| i as f32 * 0.5 - 3.0).collect();
        assert_eq!(got, want, "the child's writes (GPU {peer_dev}) did not arrive");
        println!(
            "IPC: GPU {peer_dev} of another process wrote {} KiB into GPU 0's buffer",
            n * 4 / 1024
        );
    }
}
