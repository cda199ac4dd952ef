//! fp8 (OCP e4m3) GEMMs for the UNet's linear layers on GPUs of compute capability 8.9 and newer
//! (Ada, Hopper): activations and weights quantized per tensor, multiplied by cuBLASLt's fp8
//! kernels with fp32 accumulation, fp16 out.
//!
//! ```text
//! Fp8Kernels::new(ordinal)  ── fp8.cu (NVRTC, compute_89) ── cuBLASLt handle
//!   quantize_weight  W (fp16 [n, k]) ─amax─▶ s_w = amax/448 ─▶ W8 (e4m3), s_w left on the device
//!   quantize_x       X (fp16) · 1/s_x ─▶ X8 (e4m3)              (s_x calibrated when the graph was made)
//!   geglu            [X_l | X_r] + bias ─GEGLU─▶ · 1/s_x ─▶ X8   (BiasSplitGelu and its quantize, one pass)
//!   layer_norm       X (+ bias) (+ skip) ─▶ sum; LN(sum)·γ+β · 1/s_x ─▶ X8   (SkipLayerNormalization and
//!                    its quantize, one pass)
//!   Fp8Gemm::run     Y[m, n] = s_x·s_w · X8[m, k] · W8[n, k]ᵀ   (cuBLASLt, fp16 out)
//! ```
//!
//! Every launch goes on a stream the caller names by its raw handle (ONNX Runtime's compute
//! stream, inside its custom operators), so nothing here synchronises or allocates while a run
//! is captured into a CUDA graph: the buffers are made before, at an operator's first run.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::{result as lt, sys as ltsys};
use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice};

use super::{arg, launch_layer_norm, ptx_for, GpuError};

/// The CUDA C of the fp8 kernels.
pub(super) const SOURCE: &str = concat!(include_str!("half.cu"), include_str!("fp8.cu"));

/// The largest finite e4m3 value.
pub const E4M3_MAX: f32 = 448.0;

/// cuBLASLt's workspace per stream (NVIDIA's advice for Hopper).
const WORKSPACE: usize = 32 << 20;

fn lt_err(what: &str, e: lt::CublasError) -> GpuError {
    GpuError::Unsupported(format!("cuBLASLt {what}: {:?}", e.0))
}

/// `map_err` of a cuBLASLt call: what was being done, and cuBLASLt's status.
fn lt_fail(what: &str) -> impl Fn(lt::CublasError) -> GpuError + '_ {
    move |e| lt_err(what, e)
}

/// The fp8 kernels and cuBLASLt of one GPU.
pub struct Fp8Kernels {
    pub ctx: Arc<CudaContext>,
    amax: CudaFunction,
    quant_w: CudaFunction,
    quant_x: CudaFunction,
    geglu: CudaFunction,
    layer_norm: CudaFunction,
    handle: ltsys::cublasLtHandle_t,
    /// One workspace per stream that runs GEMMs (two streams never share one), with its address.
    workspaces: Mutex<HashMap<usize, (CudaSlice<u8>, u64)>>,
}

// SAFETY: the cuBLASLt handle is thread-safe for use with different streams (cuBLASLt docs);
// the workspaces are behind a mutex
unsafe impl Send for Fp8Kernels {}
unsafe impl Sync for Fp8Kernels {}

impl Drop for Fp8Kernels {
    fn drop(&mut self) {
        // SAFETY: made by create_handle, destroyed once
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}

/// Launches `f` on the raw `stream` over `items` (256 threads a block, grid-stride loops, at most
/// 1056 blocks).
///
/// # Safety
/// `args` match `f`'s parameters; the memory they name stays valid until `stream` has run it.
unsafe fn launch(
    f: &CudaFunction,
    items: usize,
    stream: CUstream,
    args: &mut [*mut c_void],
) -> Result<(), GpuError> {
    let blocks = items.div_ceil(256).clamp(1, 132 * 8) as u32;
    cudarc::driver::result::launch_kernel(f.cu_function(), (blocks, 1, 1), (256, 1, 1), 0, stream, args)?;
    Ok(())
}

impl Fp8Kernels {
    /// The fp8 kernels for GPU `ordinal`: refused below compute capability 8.9 (no fp8 tensor
    /// cores) or without libcublasLt.
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        if !super::cuda_available() {
            return Err(GpuError::NoCuda(
                "libcuda/libnvrtc not loadable or no device".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        if (major, minor) < (8, 9) {
            return Err(GpuError::Unsupported(format!(
                "fp8 needs compute capability 8.9 or newer (Ada, Hopper); GPU {ordinal} is {major}.{minor}"
            )));
        }
        // SAFETY: only probes whether the library can be opened
        if !unsafe { ltsys::is_culib_present() } {
            return Err(GpuError::NoCuda("libcublasLt not loadable (fp8 GEMMs)".into()));
        }
        let opts = cudarc::nvrtc::CompileOptions {
            arch: Some("compute_89"),
            ..Default::default()
        };
        let m = ctx.load_module(ptx_for(SOURCE, opts)?)?;
        ctx.bind_to_thread()?;
        let handle = lt::create_handle().map_err(|e| lt_err("handle", e))?;
        Ok(Fp8Kernels {
            amax: m.load_function("fp8_amax_f16")?,
            quant_w: m.load_function("fp8_quantize_w")?,
            quant_x: m.load_function("fp8_quantize_x")?,
            geglu: m.load_function("fp8_geglu")?,
            layer_norm: m.load_function("fp8_layer_norm")?,
            handle,
            workspaces: Mutex::new(HashMap::new()),
            ctx,
        })
    }

    /// `len` zeroed elements of device memory on this GPU, ready when this returns.
    pub fn alloc<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>, GpuError> {
        let s = self.ctx.default_stream();
        let b = s.alloc_zeros::<T>(len.max(1))?;
        s.synchronize()?;
        Ok(b)
    }

    /// W8 = e4m3(w / s_w) with s_w = max|w| / 448 written to `scale` (device f32); `amax` is a
    /// device f32 of scratch. `w`: `n` fp16 values (n even), `w8`: n bytes.
    ///
    /// # Safety
    /// Device pointers of this GPU, valid for the sizes named, until `stream` has run the work.
    pub unsafe fn quantize_weight(
        &self,
        stream: CUstream,
        w: u64,
        n: usize,
        amax: u64,
        w8: u64,
        scale: u64,
    ) -> Result<(), GpuError> {
        if !n.is_multiple_of(2) {
            return Err(GpuError::Shape(format!("fp8 weight of odd size {n}")));
        }
        self.ctx.bind_to_thread()?;
        cudarc::driver::result::memset_d8_async(amax, 0, 4, stream)?;
        let (mut pw, mut pn, mut pa, mut po, mut ps) = (w, n as u64, amax, w8, scale);
        launch(
            &self.amax,
            n,
            stream,
            &mut [arg(&mut pw), arg(&mut pn), arg(&mut pa)],
        )?;
        let args = &mut [
            arg(&mut pw),
            arg(&mut pn),
            arg(&mut pa),
            arg(&mut po),
            arg(&mut ps),
        ];
        launch(&self.quant_w, n / 2, stream, args)?;
        Ok(())
    }

    /// X8 = e4m3(x / scale), saturating; `n` fp16 values (a multiple of 8), `x8`: n bytes.
    ///
    /// # Safety
    /// As [`Fp8Kernels::quantize_weight`].
    pub unsafe fn quantize_x(
        &self,
        stream: CUstream,
        x: u64,
        n: usize,
        scale: f32,
        x8: u64,
    ) -> Result<(), GpuError> {
        if !n.is_multiple_of(8) {
            return Err(GpuError::Shape(format!(
                "fp8 activation of {n} values: not a multiple of 8"
            )));
        }
        let (mut px, mut pn, mut inv, mut po) = (x, n as u64, 1.0f32 / scale, x8);
        launch(
            &self.quant_x,
            n / 8,
            stream,
            &mut [arg(&mut px), arg(&mut pn), arg(&mut inv), arg(&mut po)],
        )?;
        Ok(())
    }

    /// X8 = e4m3(GEGLU(x + bias) / scale): ONNX Runtime's BiasSplitGelu (`rows` rows of
    /// `[left | right]`, `2·h` fp16 values each; `left · gelu(right)`, the bias added in fp16, the
    /// product rounded to fp16) and the quantize of its output in one pass. `bias`: `2·h` fp16
    /// values, `x8`: `rows · h` bytes; `h` a multiple of 8.
    ///
    /// # Safety
    /// As [`Fp8Kernels::quantize_weight`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn geglu(
        &self,
        stream: CUstream,
        x: u64,
        bias: u64,
        rows: usize,
        h: usize,
        scale: f32,
        x8: u64,
    ) -> Result<(), GpuError> {
        if h == 0 || !h.is_multiple_of(8) || h / 8 > u32::MAX as usize {
            return Err(GpuError::Shape(format!(
                "fp8 GEGLU of width {h}: not a positive multiple of 8"
            )));
        }
        let (mut px, mut pb, mut pr, mut ph8) = (x, bias, rows as u64, (h / 8) as u32);
        let (mut inv, mut po) = (1.0f32 / scale, x8);
        let args = &mut [
            arg(&mut px),
            arg(&mut pb),
            arg(&mut pr),
            arg(&mut ph8),
            arg(&mut inv),
            arg(&mut po),
        ];
        launch(&self.geglu, rows * h / 8, stream, args)?;
        Ok(())
    }

    /// X8 = e4m3(fp16(LN(sum)·γ + β) / scale) with sum = fp16(fp16(x + bias) + skip) (written to
    /// `ln.sum` where given): ONNX Runtime's SkipLayerNormalization, or LayerNormalization without
    /// skip and bias, and the quantize of its output in one pass; statistics in f32 over rows of
    /// `ln.width` fp16 values (a multiple of 8, at most 8192).
    ///
    /// # Safety
    /// As [`Fp8Kernels::quantize_weight`]; the buffers of `ln` hold `rows · width` values (x, skip,
    /// sum; x8 bytes) or `width` (bias, gamma, beta).
    pub unsafe fn layer_norm(&self, stream: CUstream, ln: &LayerNormArgs) -> Result<(), GpuError> {
        let (mut px, mut ps, mut pb, mut pg, mut pbeta) = (ln.x, ln.skip, ln.bias, ln.gamma, ln.beta);
        let (mut ld, mut eps, mut inv) = (ln.width as u32, ln.epsilon, 1.0f32 / ln.scale);
        let (mut po, mut psum) = (ln.x8, ln.sum);
        let args = &mut [
            arg(&mut px),
            arg(&mut ps),
            arg(&mut pb),
            arg(&mut pg),
            arg(&mut pbeta),
            arg(&mut ld),
            arg(&mut eps),
            arg(&mut inv),
            arg(&mut po),
            arg(&mut psum),
        ];
        launch_layer_norm(
            &self.layer_norm,
            "fp8 layer norm",
            ln.rows,
            ln.width,
            stream,
            args,
        )
    }

    /// The workspace of `stream`, made on its first GEMM (not while a graph is captured: the
    /// first run of a session is never captured).
    fn workspace(&self, stream: CUstream) -> Result<u64, GpuError> {
        use cudarc::driver::DevicePtr;
        let mut w = self.workspaces.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, p)) = w.get(&(stream as usize)) {
            // no cudarc call here: this may run while the stream is captured into a CUDA graph
            return Ok(*p);
        }
        let b = self.alloc::<u8>(WORKSPACE)?;
        let s = self.ctx.default_stream();
        let p = b.device_ptr(&s).0;
        s.synchronize()?;
        w.insert(stream as usize, (b, p));
        Ok(p)
    }
}

/// The buffers and sizes of [`Fp8Kernels::layer_norm`]: device addresses, 0 for an absent one
/// (`skip`, `bias`, `beta`, `sum`).
#[derive(Clone, Copy, Debug, Default)]
pub struct LayerNormArgs {
    pub x: u64,
    pub skip: u64,
    pub bias: u64,
    pub gamma: u64,
    pub beta: u64,
    pub rows: usize,
    pub width: usize,
    pub epsilon: f32,
    pub scale: f32,
    pub x8: u64,
    pub sum: u64,
}

/// One GEMM shape's cuBLASLt plan: `Y[m, n] = s_x·s_w · X8[m, k] · W8[n, k]ᵀ`, fp16 out.
pub struct Fp8Gemm {
    m: usize,
    n: usize,
    k: usize,
    desc: ltsys::cublasLtMatmulDesc_t,
    /// `[a (W8), b (X8), c/d (Y)]`
    layouts: [ltsys::cublasLtMatrixLayout_t; 3],
    algo: ltsys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are plain host objects, used by one operator at a time
unsafe impl Send for Fp8Gemm {}

impl Drop for Fp8Gemm {
    fn drop(&mut self) {
        // SAFETY: made in plan, destroyed once
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

impl Fp8Gemm {
    /// The plan for `m × k` activations and `n × k` weights (k and n multiples of 16).
    pub fn plan(fk: &Fp8Kernels, m: usize, n: usize, k: usize) -> Result<Fp8Gemm, GpuError> {
        use ltsys::cublasLtMatmulDescAttributes_t as D;
        use ltsys::cudaDataType_t as T;
        if !k.is_multiple_of(16) || !n.is_multiple_of(16) {
            return Err(GpuError::Shape(format!(
                "fp8 GEMM {m}×{k} · {n}×{k}ᵀ: k and n must be multiples of 16"
            )));
        }
        fk.ctx.bind_to_thread()?;
        let e = lt_fail;
        // column-major, as cuBLASLt sees it: D (n × m) = op(A) · B with A = W8 (k × n, transposed)
        // and B = X8 (k × m): row-major Y = X·Wᵀ; fp8 needs exactly this "TN" form
        let desc = lt::create_matmul_desc(ltsys::cublasComputeType_t::CUBLAS_COMPUTE_32F, T::CUDA_R_32F)
            .map_err(e("matmul descriptor"))?;
        let mut plan = Fp8Gemm {
            m,
            n,
            k,
            desc,
            layouts: [std::ptr::null_mut(); 3],
            algo: unsafe { std::mem::zeroed() },
        };
        let ta = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T;
        let fast: i8 = 1;
        // SAFETY: the descriptor lives; the sizes are those of the values passed
        unsafe {
            lt::set_matmul_desc_attribute(
                desc,
                D::CUBLASLT_MATMUL_DESC_TRANSA,
                &ta as *const _ as *const c_void,
                std::mem::size_of_val(&ta),
            )
            .map_err(e("transa"))?;
            lt::set_matmul_desc_attribute(
                desc,
                D::CUBLASLT_MATMUL_DESC_FAST_ACCUM,
                &fast as *const _ as *const c_void,
                1,
            )
            .map_err(e("fast accumulation"))?;
        }
        plan.layouts = [
            lt::create_matrix_layout(T::CUDA_R_8F_E4M3, k as u64, n as u64, k as i64)
                .map_err(e("layout A"))?,
            lt::create_matrix_layout(T::CUDA_R_8F_E4M3, k as u64, m as u64, k as i64)
                .map_err(e("layout B"))?,
            lt::create_matrix_layout(T::CUDA_R_16F, n as u64, m as u64, n as i64).map_err(e("layout D"))?,
        ];
        let pref = lt::create_matmul_pref().map_err(e("preference"))?;
        let ws = WORKSPACE as u64;
        // SAFETY: as above; the preference is destroyed once, here
        let found = unsafe {
            let r = lt::set_matmul_pref_attribute(
                pref,
                ltsys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                &ws as *const _ as *const c_void,
                8,
            )
            .and_then(|_| {
                let [a, b, d] = plan.layouts;
                lt::get_matmul_algo_heuristic(fk.handle, desc, a, b, d, d, pref)
            });
            let _ = lt::destroy_matmul_pref(pref);
            r
        };
        let what = format!("no fp8 algorithm for {m}×{k} · {n}×{k}ᵀ");
        plan.algo = found.map_err(lt_fail(&what))?.algo;
        Ok(plan)
    }

    pub fn shape(&self) -> (usize, usize, usize) {
        (self.m, self.n, self.k)
    }

    /// Queues the GEMM on `stream`: `y` (fp16 `[m, n]`) from `x8` (`[m, k]`) and `w8` (`[n, k]`),
    /// `x_scale` and `w_scale` device f32s.
    ///
    /// # Safety
    /// Device pointers of `fk`'s GPU, valid for the plan's sizes until `stream` has run it.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn run(
        &self,
        fk: &Fp8Kernels,
        stream: CUstream,
        x8: u64,
        w8: u64,
        y: u64,
        x_scale: u64,
        w_scale: u64,
    ) -> Result<(), GpuError> {
        use ltsys::cublasLtMatmulDescAttributes_t as D;
        let e = lt_fail;
        let ws = fk.workspace(stream)?;
        let (a_scale, b_scale) = (w_scale as *const c_void, x_scale as *const c_void);
        lt::set_matmul_desc_attribute(
            self.desc,
            D::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
            &a_scale as *const _ as *const c_void,
            8,
        )
        .map_err(e("A scale"))?;
        lt::set_matmul_desc_attribute(
            self.desc,
            D::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
            &b_scale as *const _ as *const c_void,
            8,
        )
        .map_err(e("B scale"))?;
        let (alpha, beta) = (1.0f32, 0.0f32);
        let [a, b, d] = self.layouts;
        lt::matmul(
            fk.handle,
            self.desc,
            &alpha as *const f32 as *const c_void,
            &beta as *const f32 as *const c_void,
            w8 as *const c_void,
            a,
            x8 as *const c_void,
            b,
            y as *const c_void,
            d,
            y as *mut c_void,
            d,
            &self.algo,
            ws as *mut c_void,
            WORKSPACE,
            stream as ltsys::cudaStream_t,
        )
        .map_err(e("fp8 matmul"))
    }
}

#[cfg(test)]
#[path = "fp8_tests.rs"]
mod tests;
