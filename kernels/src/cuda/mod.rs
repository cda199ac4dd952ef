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
//!              tensor cores, sm_80+: fp16 weights' default) or mma-f16-packed (the factors
//!              packed into fp16 scratch first)
//! ```
//!
//! cudarc loads libcuda and libnvrtc at run time, so this module builds everywhere; where no
//! driver or device is present, [`GpuKernels::new`] returns [`GpuError::NoCuda`] — it never
//! panics and never falls back to the CPU. Tests marked `#[ignore]` need a GPU:
//! `tools/device/gpu-tests.sh` runs them on the GPU machine.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
    ValidAsZeroBits,
};

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

/// One LoRA factor of a layer on the device: `coeff · B · A`.
pub struct GpuFactor<'a> {
    /// `[rows, rank]` row-major.
    pub b: &'a CudaSlice<f32>,
    /// `[rank, cols]` row-major.
    pub a: &'a CudaSlice<f32>,
    pub rank: usize,
    /// `scale · alpha / rank`.
    pub coeff: f32,
}

/// One layer to merge: `out = base + Σ factors` (`base` and `out` may be the same buffer).
/// `T` is `f32`, or `u16` holding fp16 bit patterns (see [`MergeElem`]).
pub struct GpuMergeLayer<'a, T = f32> {
    pub base: &'a CudaSlice<T>,
    pub out: &'a CudaSlice<T>,
    pub rows: usize,
    pub cols: usize,
    pub factors: Vec<GpuFactor<'a>>,
}

/// Element types a merge reads and writes: `f32`, or `u16` for IEEE fp16 bit patterns (cudarc's
/// f16 feature is off; the kernel converts with PTX `cvt`).
pub trait MergeElem: DeviceRepr + ValidAsZeroBits {
    const F16: bool;
}

impl MergeElem for f32 {
    const F16: bool = false;
}

impl MergeElem for u16 {
    const F16: bool = true;
}

/// Which merge kernel runs (both give the same result up to f32 summation order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergeKernel {
    /// 128×128 tiles per block, factors staged in shared memory, 8×8 outputs per thread.
    #[default]
    Tiled,
    /// One thread per element, each a rank-long dot product (the first version; kept to compare).
    Naive,
    /// The tiles of `Tiled` on tensor cores: TF32 `mma.sync` in the 3×TF32 split (about f32
    /// accuracy), f32 accumulation. Needs compute capability 8.0 or newer.
    Mma,
    /// Tensor cores on fp16 operands (`mma.sync` m16n8k16), f32 accumulation, 128×64 tiles: the
    /// factors are rounded to fp16 as they are read (exact for fp16 LoRA files, about 2^-12
    /// relative otherwise), the coefficients applied in f32. Needs compute capability 8.0 or newer.
    MmaF16,
    /// `MmaF16` on factors packed first: one pass writes every layer's factors as fp16 into
    /// scratch (k-contiguous, each factor's ranks padded to 32), then 128×128 tiles copy their
    /// chunks into shared memory by cp.async, double-buffered. Same numbers as `MmaF16`; scratch of
    /// (rows + cols) × padded rank fp16 values per layer for the merge's duration.
    MmaF16Packed,
}

/// A merge kernel name other than `tiled` / `naive` / `mma`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}`: expected tiled, naive, mma, mma-f16 or mma-f16-packed")]
pub struct UnknownMergeKernel(pub String);

impl std::str::FromStr for MergeKernel {
    type Err = UnknownMergeKernel;
    fn from_str(s: &str) -> Result<Self, UnknownMergeKernel> {
        match s {
            "tiled" => Ok(MergeKernel::Tiled),
            "naive" => Ok(MergeKernel::Naive),
            "mma" => Ok(MergeKernel::Mma),
            "mma-f16" => Ok(MergeKernel::MmaF16),
            "mma-f16-packed" => Ok(MergeKernel::MmaF16Packed),
            _ => Err(UnknownMergeKernel(s.to_string())),
        }
    }
}

impl std::fmt::Display for MergeKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MergeKernel::Tiled => "tiled",
            MergeKernel::Naive => "naive",
            MergeKernel::Mma => "mma",
            MergeKernel::MmaF16 => "mma-f16",
            MergeKernel::MmaF16Packed => "mma-f16-packed",
        })
    }
}

/// Where compiled kernels are kept between processes ([`cache_ptx_in`]); none: compiled once
/// per process.
static PTX_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();
/// The kernels compiled in this process, by target architecture.
static PTX: std::sync::Mutex<Vec<(Option<&'static str>, String)>> = std::sync::Mutex::new(Vec::new());

/// Keeps the kernels' PTX in `dir` (the first call's directory counts), so that a restart loads
/// them instead of compiling them again (NVRTC: about a second). Entries are named after a hash
/// of the source and the architecture, so a changed source is compiled afresh.
pub fn cache_ptx_in(dir: impl Into<std::path::PathBuf>) {
    let _ = PTX_DIR.set(dir.into());
}

/// The kernels' PTX for `opts.arch`: compiled in this process before, kept in the cache
/// directory, or compiled now (and kept).
fn ptx_for(opts: cudarc::nvrtc::CompileOptions) -> Result<cudarc::nvrtc::Ptx, GpuError> {
    use std::hash::Hasher;
    let arch = opts.arch;
    let mut done = PTX.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, src)) = done.iter().find(|(a, _)| *a == arch) {
        return Ok(cudarc::nvrtc::Ptx::from_src(src.clone()));
    }
    let mut h = fnv::FnvHasher::default();
    h.write(SOURCE.as_bytes());
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
            let src = cudarc::nvrtc::compile_ptx_with_opts(SOURCE, opts)?.to_src();
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
    done.push((arch, src.clone()));
    Ok(cudarc::nvrtc::Ptx::from_src(src))
}

/// Output tile of the tiled merge kernel (`TM`×`TN` in the CUDA source).
const MERGE_TILE: usize = 128;
/// The column width of the fp16 tensor-core kernel's tiles (kernels.cu `HN`).
const MERGE_TILE_F16_COLS: usize = 64;

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
        let ptx = ptx_for(opts)?;
        let m = ctx.load_module(ptx)?;
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
            lora_merge_packed: [
                m.load_function("lora_merge_packed_f32")?,
                m.load_function("lora_merge_packed_f16")?,
            ],
            has_mma,
            ctx,
            stream,
        })
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

    /// Merges every layer of a LoRA set (f32 weights) in one launch on this object's stream.
    pub fn lora_merge(&self, layers: &[GpuMergeLayer<'_, f32>]) -> Result<(), GpuError> {
        self.lora_merge_with(layers, MergeKernel::Tiled)
    }

    /// Merges every layer of a LoRA set (fp16 weights as u16 bit patterns) in one launch: on fp16
    /// tensor cores where the GPU has them ([`MergeKernel::MmaF16`]: the result is fp16 anyway,
    /// and fp16 LoRA factors are exact), else [`MergeKernel::Tiled`].
    pub fn lora_merge_f16(&self, layers: &[GpuMergeLayer<'_, u16>]) -> Result<(), GpuError> {
        let kernel = if self.has_mma {
            MergeKernel::MmaF16
        } else {
            MergeKernel::Tiled
        };
        self.lora_merge_with(layers, kernel)
    }

    /// Merges every layer of a LoRA set in one launch of `kernel` on this object's stream:
    /// `out = base + Σ coeff·B·A`, accumulated in f32. Returns once the launch is queued (the
    /// small metadata arrays are copied first); [`Self::synchronize`] waits for the result.
    pub fn lora_merge_with<T: MergeElem>(
        &self,
        layers: &[GpuMergeLayer<'_, T>],
        kernel: MergeKernel,
    ) -> Result<(), GpuError> {
        if layers.is_empty() {
            return Ok(());
        }
        if matches!(
            kernel,
            MergeKernel::Mma | MergeKernel::MmaF16 | MergeKernel::MmaF16Packed
        ) && !self.has_mma
        {
            return Err(GpuError::Unsupported(format!(
                "lora_merge: the {kernel} kernel needs compute capability 8.0 or newer"
            )));
        }
        let s = &self.stream;
        let shape = |m: String| GpuError::Shape(format!("lora_merge: {m}"));
        let mut guards = Vec::new();
        let (mut layer_ptrs, mut dims, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
        let (mut factor_ptrs, mut ranks, mut coeffs) = (Vec::new(), Vec::new(), Vec::new());
        // elements (naive) or tiles (tiled) before each layer
        let mut total: u64 = 0;
        for l in layers {
            let n = l
                .rows
                .checked_mul(l.cols)
                .ok_or_else(|| shape(format!("{}×{} overflows", l.rows, l.cols)))?;
            if l.base.len() != n || l.out.len() != n {
                return Err(shape(format!(
                    "layer {}×{} has buffers {} / {}",
                    l.rows,
                    l.cols,
                    l.base.len(),
                    l.out.len()
                )));
            }
            if l.rows > u32::MAX as usize || l.cols > u32::MAX as usize {
                return Err(shape(format!("layer {}×{} is too large", l.rows, l.cols)));
            }
            let (wp, gw) = l.base.device_ptr(s);
            let (op, go) = l.out.device_ptr(s);
            guards.push(gw);
            guards.push(go);
            layer_ptrs.extend([wp, op]);
            let first = ranks.len() as u32;
            for f in &l.factors {
                if f.b.len() != l.rows * f.rank || f.a.len() != f.rank * l.cols {
                    return Err(shape(format!(
                        "factor of rank {} does not fit {}×{} (B {}, A {})",
                        f.rank,
                        l.rows,
                        l.cols,
                        f.b.len(),
                        f.a.len()
                    )));
                }
                if f.rank == 0 {
                    continue; // adds nothing
                }
                if f.rank > u32::MAX as usize {
                    return Err(shape(format!("rank {} is too large", f.rank)));
                }
                let (bp, gb) = f.b.device_ptr(s);
                let (ap, ga) = f.a.device_ptr(s);
                guards.push(gb);
                guards.push(ga);
                factor_ptrs.extend([bp, ap]);
                ranks.push(f.rank as u32);
                coeffs.push(f.coeff);
            }
            dims.extend([l.rows as u32, l.cols as u32, first, ranks.len() as u32 - first]);
            offsets.push(total);
            total += match kernel {
                MergeKernel::Naive => n as u64,
                MergeKernel::Tiled | MergeKernel::Mma | MergeKernel::MmaF16Packed => {
                    (l.rows.div_ceil(MERGE_TILE) * l.cols.div_ceil(MERGE_TILE)) as u64
                }
                MergeKernel::MmaF16 => {
                    (l.rows.div_ceil(MERGE_TILE) * l.cols.div_ceil(MERGE_TILE_F16_COLS)) as u64
                }
            };
        }
        if total == 0 {
            return Ok(());
        }
        if factor_ptrs.is_empty() {
            // keep the arrays non-empty for the launch
            factor_ptrs.extend([0u64, 0]);
            ranks.push(0);
            coeffs.push(0.0);
        }
        let (blocks, func) = match kernel {
            MergeKernel::Naive => (
                (total.div_ceil(256)).min(65_535 * 8),
                &self.lora_merge[T::F16 as usize],
            ),
            MergeKernel::MmaF16Packed => {
                // (the weights' guards are held until both launches are queued)
                return self.lora_merge_packed_with(
                    layers,
                    &dims,
                    &offsets,
                    total,
                    &ranks,
                    &coeffs,
                    &layer_ptrs,
                    guards,
                );
            }
            MergeKernel::Tiled | MergeKernel::Mma | MergeKernel::MmaF16 => {
                if total > i32::MAX as u64 {
                    return Err(shape(format!("{total} tiles are more than one launch takes")));
                }
                let first = match kernel {
                    MergeKernel::Tiled => 2,
                    MergeKernel::Mma => 4,
                    _ => 6,
                };
                (total, &self.lora_merge[first + T::F16 as usize])
            }
        };
        let d_layer_ptrs = s.clone_htod(&layer_ptrs)?;
        let d_dims = s.clone_htod(&dims)?;
        let d_offsets = s.clone_htod(&offsets)?;
        let d_factor_ptrs = s.clone_htod(&factor_ptrs)?;
        let d_ranks = s.clone_htod(&ranks)?;
        let d_coeffs = s.clone_htod(&coeffs)?;
        let n_layers = layers.len() as i32;
        let mut b = s.launch_builder(func);
        b.arg(&d_layer_ptrs)
            .arg(&d_dims)
            .arg(&d_offsets)
            .arg(&n_layers)
            .arg(&d_factor_ptrs)
            .arg(&d_ranks)
            .arg(&d_coeffs)
            .arg(&total);
        let launch = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(launch) }?;
        drop(guards);
        Ok(())
    }

    /// [`MergeKernel::MmaF16Packed`]: packs the factors into fp16 scratch, then merges from it
    /// (both launches on this object's stream; the scratch is freed in stream order).
    #[allow(clippy::too_many_arguments)]
    fn lora_merge_packed_with<'g, T: MergeElem>(
        &'g self,
        layers: &'g [GpuMergeLayer<'g, T>],
        dims: &[u32],
        offsets: &[u64],
        total: u64,
        ranks: &[u32],
        coeffs: &[f32],
        layer_ptrs: &[u64],
        mut guards: Vec<cudarc::driver::SyncOnDrop<'g>>,
    ) -> Result<(), GpuError> {
        const PK: usize = 32;
        let s = &self.stream;
        let shape = |m: String| GpuError::Shape(format!("lora_merge: {m}"));
        if total > i32::MAX as u64 {
            return Err(shape(format!("{total} tiles are more than one launch takes")));
        }
        // each layer's padded rank and where its packed B and Aᵀ start in the scratch (fp16 values)
        let mut kpads = Vec::with_capacity(layers.len());
        let mut starts = Vec::with_capacity(layers.len());
        let mut scratch_len = 0usize;
        for l in layers {
            let kpad: usize = l
                .factors
                .iter()
                .filter(|f| f.rank > 0)
                .map(|f| f.rank.div_ceil(PK) * PK)
                .sum();
            if kpad > u32::MAX as usize {
                return Err(shape(format!("a padded rank of {kpad} is too large")));
            }
            starts.push(scratch_len);
            kpads.push(kpad as u32);
            scratch_len += (l.rows + l.cols) * kpad;
        }
        // SAFETY: every value a merge reads is written by the pack launch before it, in stream order
        let scratch = unsafe { s.alloc::<u16>(scratch_len.max(1)) }?;
        let (base, scratch_guard) = scratch.device_ptr(s);
        let (mut jobs, mut tile_offsets, mut packed) = (Vec::new(), Vec::new(), Vec::new());
        let mut tiles: u64 = 0;
        for ((l, &start), &kpad) in layers.iter().zip(&starts).zip(&kpads) {
            let bp = base + 2 * start as u64;
            let ap = bp + 2 * (l.rows * kpad as usize) as u64;
            packed.extend([bp, ap]);
            let mut kseg = 0u64;
            for f in l.factors.iter().filter(|f| f.rank > 0) {
                let seg = f.rank.div_ceil(PK) * PK;
                let (b, gb) = f.b.device_ptr(s);
                let (a, ga) = f.a.device_ptr(s);
                guards.push(gb);
                guards.push(ga);
                for (src, dst, n, transposed) in [(b, bp, l.rows, 0u64), (a, ap, l.cols, 1)] {
                    jobs.extend([
                        src,
                        dst,
                        n as u64,
                        f.rank as u64,
                        kpad as u64,
                        kseg,
                        transposed,
                        l.cols as u64,
                    ]);
                    tile_offsets.push(tiles);
                    tiles += (n.div_ceil(32) * (seg / 32)) as u64;
                }
                kseg += seg as u64;
            }
        }
        if tiles > 0 {
            if tiles > i32::MAX as u64 {
                return Err(shape(format!(
                    "{tiles} pack tiles are more than one launch takes"
                )));
            }
            let d_jobs = s.clone_htod(&jobs)?;
            let d_tile_offsets = s.clone_htod(&tile_offsets)?;
            let n_jobs = tile_offsets.len() as i32;
            let mut b = s.launch_builder(&self.pack);
            b.arg(&d_jobs).arg(&d_tile_offsets).arg(&n_jobs);
            let launch = LaunchConfig {
                grid_dim: (tiles as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { b.launch(launch) }?;
        }
        let d_layer_ptrs = s.clone_htod(layer_ptrs)?;
        let d_dims = s.clone_htod(dims)?;
        let d_offsets = s.clone_htod(offsets)?;
        let d_packed = s.clone_htod(&packed)?;
        let d_kpads = s.clone_htod(&kpads)?;
        let d_ranks = s.clone_htod(ranks)?;
        let d_coeffs = s.clone_htod(coeffs)?;
        let n_layers = layers.len() as i32;
        let mut b = s.launch_builder(&self.lora_merge_packed[T::F16 as usize]);
        b.arg(&d_layer_ptrs)
            .arg(&d_dims)
            .arg(&d_offsets)
            .arg(&n_layers)
            .arg(&d_packed)
            .arg(&d_kpads)
            .arg(&d_ranks)
            .arg(&d_coeffs);
        let launch = LaunchConfig {
            grid_dim: (total as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(launch) }?;
        drop(guards);
        drop(scratch_guard);
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
