//! CUDA twins of the CPU kernels: their CUDA C is `kernels.cu`, compiled at run time with NVRTC
//! and launched through cudarc.
//!
//! ```text
//! GpuKernels::new(ordinal) ── probe libcuda + a device ── PTX: this process's, cache_ptx_in's
//!                             directory's, or NVRTC compiled now (and kept there) ── module
//!   combine    pred[2n] (uncond; cond), g        ─▶ out[n]        (guidance)
//!   axpy       dst += s · src                                      (ControlNet residual sums)
//!   scale      out = s · src (twice for [x; x])                    (scheduler input scale, CFG batch)
//!   euler      sample ← sample + (sample − (sample − σ·ε))/σ · (σ' − σ)   (diffusers' Euler, ε-prediction)
//!   lora_merge every layer of a LoRA set in ONE launch:  out = W + Σ cᵢ · Bᵢ·Aᵢ
//!              W/out f32 ([`GpuKernels::lora_merge`]) or fp16 ([`GpuKernels::lora_merge_f16`],
//!              bit patterns in u16); factors f32; f32 accumulation; tiled (f32 weights, and
//!              fp16 before sm_80), naive, mma (tensor cores, 3×TF32, sm_80+), mma-f16 (fp16
//!              tensor cores, sm_80+: fp16 weights' default), mma-f16-packed (the factors
//!              packed into fp16 once: `pack_factors_f16`, or into scratch by the merge) or
//!              mma-f16-persistent (the same in persistent blocks, the next tile's weights
//!              loading while a tile multiplies)
//! Fp8Kernels::new(ordinal) ── fp8.cu (compute_89) + cuBLASLt: e4m3 quantization of weights and
//!              activations, Fp8Gemm (fp8 GEMMs, fp16 out) on a caller's stream (fp8.rs)
//! FusedKernels::new(ordinal) ── fused.cu: fp16 kernels of katz's own ONNX Runtime operators,
//!              faster twins of ONNX Runtime's (the GEGLU) on a caller's stream (fused.rs)
//! ```
//!
//! cudarc loads libcuda and libnvrtc at run time, so this module builds everywhere; where no
//! driver or device is present, [`GpuKernels::new`] returns [`GpuError::NoCuda`] — it never
//! panics and never falls back to the CPU. Tests marked `#[ignore]` need a GPU:
//! `tools/device/gpu-tests.sh` runs them on the GPU machine. The LoRA merges and their launch
//! plans are `merge.rs`.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg};

pub mod fp8;
pub mod fused;
mod merge;
mod upload;
pub use merge::{
    FactorToPack, GpuFactor, GpuMergeLayer, MergeElem, MergeKernel, PackedFactor, UnknownMergeKernel,
};
pub use upload::{PinnedUpload, PINNED_CHUNK};

#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    #[error("no CUDA here: {0}")]
    NoCuda(String),
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("NVRTC: {0}")]
    Compile(#[from] cudarc::nvrtc::CompileError),
    #[error("{0}")]
    Shape(String),
    #[error("{0}")]
    Unsupported(String),
}

/// The CUDA C of every kernel (`kernels.cu`), compiled once per [`GpuKernels::new`].
const SOURCE: &str = include_str!("kernels.cu");

/// Lets GPUs `a` and `b` of this process read each other's memory (both directions): peer
/// access between their primary contexts (direct NVLink/PCIe copies of ONNX Runtime's buffers)
/// and access to each other's default memory pool (cudarc allocates from it with
/// `cuMemAllocAsync`; pool memory ignores context peer access, and a copy between devices
/// touching a pool it may not access fails with `CUDA_ERROR_INVALID_VALUE`). Idempotent.
pub fn enable_peer_access(a: usize, b: usize) -> Result<(), GpuError> {
    use cudarc::driver::sys;
    if a == b {
        return Ok(());
    }
    static DONE: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());
    let mut done = DONE.lock().unwrap_or_else(|e| e.into_inner());
    if done.contains(&(a.min(b), a.max(b))) {
        return Ok(());
    }
    let (ca, cb) = (CudaContext::new(a)?, CudaContext::new(b)?);
    for (from, to, to_ord, from_ord) in [(&ca, &cb, b, a), (&cb, &ca, a, b)] {
        from.bind_to_thread()?;
        // SAFETY: both contexts are live primary contexts of this process
        let r = unsafe { sys::cuCtxEnablePeerAccess(to.cu_ctx(), 0) };
        if r != sys::CUresult::CUDA_SUCCESS && r != sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED {
            r.result()?;
        }
        // `to_ord`'s default pool becomes readable and writable by `from_ord`
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, to_ord as sys::CUdevice) }.result()?;
        let desc = sys::CUmemAccessDesc {
            location: sys::CUmemLocation {
                type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
                id: from_ord as i32,
            },
            flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
        };
        unsafe { sys::cuMemPoolSetAccess(pool, &desc, 1) }.result()?;
    }
    done.push((a.min(b), a.max(b)));
    Ok(())
}

/// How many GPUs the driver sees (0 where no driver is present; no panic).
pub fn device_count() -> usize {
    if !cuda_available() {
        return 0;
    }
    cudarc::driver::result::device::get_count().unwrap_or(0).max(0) as usize
}

/// Whether a CUDA driver library and at least one device are present (no panic where absent).
pub fn cuda_available() -> bool {
    // SAFETY: only probes whether the shared libraries can be opened.
    let libs = unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present() };
    libs && cudarc::driver::result::init().is_ok()
        && cudarc::driver::result::device::get_count().unwrap_or(0) > 0
}

/// Where compiled kernels are kept between processes ([`cache_ptx_in`]); none: compiled once
/// per process.
static PTX_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
/// The kernels compiled in this process, by source and target architecture.
type Compiled = (&'static str, Option<&'static str>, String);
static PTX: std::sync::Mutex<Vec<Compiled>> = std::sync::Mutex::new(Vec::new());

/// Keeps the kernels' PTX in `dir` (the first call's directory counts), so that a restart loads
/// them instead of compiling them again (NVRTC: about a second). Entries are named after a hash
/// of the source and the architecture, so a changed source is compiled afresh.
pub fn cache_ptx_in(dir: impl Into<std::path::PathBuf>) {
    let _ = PTX_DIR.set(dir.into());
}

/// The kernels' PTX for `opts.arch`: compiled in this process before, kept in the cache
/// directory, or compiled now (and kept).
fn ptx_for(
    source: &'static str,
    opts: cudarc::nvrtc::CompileOptions,
) -> Result<cudarc::nvrtc::Ptx, GpuError> {
    use std::hash::Hasher;
    let arch = opts.arch;
    let mut done = PTX.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, _, src)) = done
        .iter()
        .find(|(s, a, _)| std::ptr::eq(*s, source) && *a == arch)
    {
        return Ok(cudarc::nvrtc::Ptx::from_src(src.clone()));
    }
    let mut h = fnv::FnvHasher::default();
    h.write(source.as_bytes());
    h.write(arch.unwrap_or("default").as_bytes());
    let file = PTX_DIR.get().map(|d| {
        d.join(format!(
            "kernels-{}-{:016x}.ptx",
            arch.unwrap_or("default"),
            h.finish()
        ))
    });
    let kept = file.as_ref().and_then(|f| std::fs::read_to_string(f).ok());
    let src = match kept {
        Some(src) if src.contains(".entry") => src,
        _ => {
            let src = cudarc::nvrtc::compile_ptx_with_opts(source, opts)?.to_src();
            if let Some(f) = &file {
                // written beside, then renamed: a reader never sees half a file
                let tmp = f.with_extension(format!("tmp{}", std::process::id()));
                let kept = f.parent().map(std::fs::create_dir_all).transpose().is_ok()
                    && std::fs::write(&tmp, &src).is_ok()
                    && std::fs::rename(&tmp, f).is_ok();
                if !kept {
                    let _ = std::fs::remove_file(&tmp);
                }
            }
            src
        }
    };
    done.push((source, arch, src.clone()));
    Ok(cudarc::nvrtc::Ptx::from_src(src))
}

/// A kernel argument as the driver takes it: the address of its value.
pub(crate) fn arg<T>(v: &mut T) -> *mut std::ffi::c_void {
    v as *mut T as *mut std::ffi::c_void
}

/// Launches a layer norm kernel of half.cu (`layer_norm_row`: one block per row of `width` fp16
/// values, 8 a thread) on the raw `stream`, after checking the shape it takes: a width that is a
/// positive multiple of 8 up to 8192, at most 2^31 - 1 rows. `what` names it in the error.
///
/// # Safety
/// `args` match `f`'s parameters; the memory they name stays valid until `stream` has run it.
pub(crate) unsafe fn launch_layer_norm(
    f: &CudaFunction,
    what: &str,
    rows: usize,
    width: usize,
    stream: cudarc::driver::sys::CUstream,
    args: &mut [*mut std::ffi::c_void],
) -> Result<(), GpuError> {
    if width == 0 || !width.is_multiple_of(8) || width > 8 * 1024 || rows > i32::MAX as usize {
        return Err(GpuError::Shape(format!(
            "{what} of {rows} rows of width {width}: the width must be a positive multiple of 8 up to 8192"
        )));
    }
    if rows == 0 {
        return Ok(());
    }
    let threads = (width / 8).div_ceil(32) * 32;
    cudarc::driver::result::launch_kernel(
        f.cu_function(),
        (rows as u32, 1, 1),
        (threads as u32, 1, 1),
        0,
        stream,
        args,
    )?;
    Ok(())
}

pub struct GpuKernels {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    combine: CudaFunction,
    axpy: CudaFunction,
    scale: CudaFunction,
    euler: CudaFunction,
    /// `[to_f16, from_f16]`
    convert: [CudaFunction; 2],
    /// `[naive f32, naive f16, tiled f32, tiled f16, mma f32, mma f16]`
    lora_merge: [CudaFunction; 8],
    /// `pack_factors_f16`, then `[packed f32, packed f16]` ([`MergeKernel::MmaF16Packed`])
    pack: CudaFunction,
    lora_merge_packed: [CudaFunction; 2],
    /// `[persistent f32, persistent f16]` ([`MergeKernel::MmaF16Persistent`]), and the SM count
    /// that sizes its grid
    lora_merge_persistent: [CudaFunction; 2],
    sms: u32,
    /// Compute capability 8.0 or newer: the tensor-core merge runs.
    has_mma: bool,
}

fn cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 4) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

impl GpuKernels {
    /// Compiles the kernels for GPU `ordinal` on a stream of their own.
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        if !cuda_available() {
            return Err(GpuError::NoCuda(
                "libcuda/libnvrtc not loadable or no device".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal)?;
        let stream = ctx.new_stream()?;
        let (major, _) = ctx.compute_capability()?;
        let has_mma = major >= 8;
        // compute_80 PTX (JIT-compiled by the driver for the device) enables the mma kernels
        let opts = cudarc::nvrtc::CompileOptions {
            arch: has_mma.then_some("compute_80"),
            ..Default::default()
        };
        let ptx = ptx_for(SOURCE, opts)?;
        let m = ctx.load_module(ptx)?;
        let packed = [
            m.load_function("lora_merge_packed_f32")?,
            m.load_function("lora_merge_packed_f16")?,
        ];
        let persistent = [
            m.load_function("lora_merge_persistent_f32")?,
            m.load_function("lora_merge_persistent_f16")?,
        ];
        if has_mma {
            // their chunk stages and weight tiles live in dynamic shared memory, past 48 KiB
            let max =
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES;
            for (i, f16) in [false, true].into_iter().enumerate() {
                packed[i].set_attribute(max, merge::chunk_smem_bytes(2, f16) as i32)?;
                persistent[i].set_attribute(max, merge::persistent_smem_bytes(f16) as i32)?;
            }
        }
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as u32;
        Ok(GpuKernels {
            combine: m.load_function("combine")?,
            axpy: m.load_function("axpy")?,
            scale: m.load_function("scale")?,
            euler: m.load_function("euler")?,
            convert: [m.load_function("to_f16")?, m.load_function("from_f16")?],
            lora_merge: [
                m.load_function("lora_merge_naive_f32")?,
                m.load_function("lora_merge_naive_f16")?,
                m.load_function("lora_merge_tiled_f32")?,
                m.load_function("lora_merge_tiled_f16")?,
                m.load_function("lora_merge_mma_f32")?,
                m.load_function("lora_merge_mma_f16")?,
                m.load_function("lora_merge_h16_f32")?,
                m.load_function("lora_merge_h16_f16")?,
            ],
            pack: m.load_function("pack_factors_f16")?,
            lora_merge_packed: packed,
            lora_merge_persistent: persistent,
            sms,
            has_mma,
            ctx,
            stream,
        })
    }

    /// Whether this GPU has the tensor cores the mma merges need (compute capability 8.0+).
    pub fn has_tensor_cores(&self) -> bool {
        self.has_mma
    }

    /// `out = uncond + g·(cond − uncond)` of a `[uncond; cond]` prediction.
    pub fn combine(&self, pred: &CudaSlice<f32>, g: f32, out: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let n = out.len();
        if pred.len() != 2 * n {
            return Err(GpuError::Shape(format!(
                "combine: prediction {} is not 2 × {n}",
                pred.len()
            )));
        }
        let n32 = n as u32;
        let mut b = self.stream.launch_builder(&self.combine);
        b.arg(pred).arg(&g).arg(out).arg(&n32);
        unsafe { b.launch(cfg(n)) }?;
        Ok(())
    }

    /// `dst += s · src`.
    pub fn axpy(&self, dst: &mut CudaSlice<f32>, src: &CudaSlice<f32>, s: f32) -> Result<(), GpuError> {
        if dst.len() != src.len() {
            return Err(GpuError::Shape(format!("axpy: {} vs {}", dst.len(), src.len())));
        }
        let n = dst.len() as u32;
        let mut b = self.stream.launch_builder(&self.axpy);
        b.arg(dst).arg(src).arg(&s).arg(&n);
        unsafe { b.launch(cfg(n as usize)) }?;
        Ok(())
    }

    /// `out = [s·src; …]` (`copies` times).
    pub fn scale(
        &self,
        src: &CudaSlice<f32>,
        s: f32,
        out: &mut CudaSlice<f32>,
        copies: usize,
    ) -> Result<(), GpuError> {
        if out.len() != src.len() * copies {
            return Err(GpuError::Shape(format!(
                "scale: out {} is not {copies} × {}",
                out.len(),
                src.len()
            )));
        }
        let (n, k) = (src.len() as u32, copies as u32);
        let mut b = self.stream.launch_builder(&self.scale);
        b.arg(src).arg(&s).arg(out).arg(&n).arg(&k);
        unsafe { b.launch(cfg(n as usize)) }?;
        Ok(())
    }

    /// One Euler step (ε-prediction, no churn) in place, diffusers' arithmetic.
    pub fn euler(
        &self,
        sample: &mut CudaSlice<f32>,
        eps: &CudaSlice<f32>,
        sigma: f32,
        sigma_next: f32,
    ) -> Result<(), GpuError> {
        if sample.len() != eps.len() {
            return Err(GpuError::Shape(format!(
                "euler: {} vs {}",
                sample.len(),
                eps.len()
            )));
        }
        let n = sample.len() as u32;
        let mut b = self.stream.launch_builder(&self.euler);
        b.arg(sample).arg(eps).arg(&sigma).arg(&sigma_next).arg(&n);
        unsafe { b.launch(cfg(n as usize)) }?;
        Ok(())
    }

    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }

    /// The same compiled kernels on a new stream of the same device (a pipeline's step kernels
    /// must not queue behind a LoRA merge running on the merge stream).
    pub fn fork(&self) -> Result<GpuKernels, GpuError> {
        Ok(GpuKernels {
            ctx: self.ctx.clone(),
            stream: self.ctx.new_stream()?,
            combine: self.combine.clone(),
            axpy: self.axpy.clone(),
            scale: self.scale.clone(),
            euler: self.euler.clone(),
            convert: self.convert.clone(),
            lora_merge: self.lora_merge.clone(),
            pack: self.pack.clone(),
            lora_merge_packed: self.lora_merge_packed.clone(),
            lora_merge_persistent: self.lora_merge_persistent.clone(),
            sms: self.sms,
            has_mma: self.has_mma,
        })
    }

    /// The GPU these kernels run on.
    pub fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    /// `dst += s · src` over `n` f32 at raw device addresses (buffers ONNX Runtime owns).
    ///
    /// # Safety
    /// `dst` and `src` must address `n` live f32 on this object's device, and nothing else may
    /// write them until this stream is synchronised.
    pub unsafe fn axpy_raw(&self, dst: u64, src: u64, s: f32, n: usize) -> Result<(), GpuError> {
        let n32 = n as u32;
        let mut b = self.stream.launch_builder(&self.axpy);
        b.arg(&dst).arg(&src).arg(&s).arg(&n32);
        unsafe { b.launch(cfg(n)) }?;
        Ok(())
    }

    /// `out = uncond + g·(cond − uncond)` of a `[uncond; cond]` prediction at a raw address.
    ///
    /// # Safety
    /// `pred` must address `2 · out.len()` live f32 on this object's device.
    pub unsafe fn combine_raw(&self, pred: u64, g: f32, out: &mut CudaSlice<f32>) -> Result<(), GpuError> {
        let n32 = out.len() as u32;
        let mut b = self.stream.launch_builder(&self.combine);
        b.arg(&pred).arg(&g).arg(out).arg(&n32);
        unsafe { b.launch(cfg(n32 as usize)) }?;
        Ok(())
    }

    /// `dst[i] = fp16(src[i])` for `n` values at raw addresses (`dst`: IEEE fp16 bit patterns,
    /// rounded to nearest); `src` may be on another GPU with peer access.
    ///
    /// # Safety
    /// `src` must address `n` live f32 and `dst` `n` live u16, unchanged until this stream is
    /// synchronised.
    pub unsafe fn to_f16_raw(&self, src: u64, dst: u64, n: usize) -> Result<(), GpuError> {
        let n64 = n as u64;
        let mut b = self.stream.launch_builder(&self.convert[0]);
        b.arg(&src).arg(&dst).arg(&n64);
        unsafe { b.launch(cfg(n)) }?;
        Ok(())
    }

    /// `dst[i] = f32(src[i])` for `n` fp16 values at raw addresses; `src` may be on another GPU
    /// (peer access, or a CUDA IPC mapping): the copy across moves half the bytes of an f32 one.
    ///
    /// # Safety
    /// `src` must address `n` live u16 and `dst` `n` live f32, unchanged until this stream is
    /// synchronised.
    pub unsafe fn from_f16_raw(&self, src: u64, dst: u64, n: usize) -> Result<(), GpuError> {
        let n64 = n as u64;
        let mut b = self.stream.launch_builder(&self.convert[1]);
        b.arg(&src).arg(&dst).arg(&n64);
        unsafe { b.launch(cfg(n)) }?;
        Ok(())
    }

    /// Copies `bytes` from `src` to `dst` on this stream; either address may be on another GPU
    /// of this process (unified addressing: the driver picks the peer path).
    ///
    /// # Safety
    /// Both must address `bytes` live device bytes; `src` must not change until the copy is done.
    pub unsafe fn copy_raw(&self, dst: u64, src: u64, bytes: usize) -> Result<(), GpuError> {
        self.ctx.bind_to_thread()?;
        unsafe {
            cudarc::driver::sys::cuMemcpyAsync(dst, src, bytes, self.stream.cu_stream()).result()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
