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

use super::{ptx_for, GpuError};

/// The CUDA C of the fp8 kernels.
const SOURCE: &str = include_str!("fp8.cu");

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

/// A kernel argument as the driver takes it: the address of its value.
fn arg<T>(v: &mut T) -> *mut c_void {
    v as *mut T as *mut c_void
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
        let w = ln.width;
        if w == 0 || !w.is_multiple_of(8) || w > 8 * 1024 {
            return Err(GpuError::Shape(format!(
                "fp8 layer norm of width {w}: not a positive multiple of 8 up to 8192"
            )));
        }
        if ln.rows > i32::MAX as usize {
            return Err(GpuError::Shape(format!("fp8 layer norm of {} rows", ln.rows)));
        }
        if ln.rows == 0 {
            return Ok(());
        }
        let threads = (w / 8).div_ceil(32) * 32;
        let (mut px, mut ps, mut pb, mut pg, mut pbeta) = (ln.x, ln.skip, ln.bias, ln.gamma, ln.beta);
        let (mut ld, mut eps, mut inv) = (w as u32, ln.epsilon, 1.0f32 / ln.scale);
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
        cudarc::driver::result::launch_kernel(
            self.layer_norm.cu_function(),
            (ln.rows as u32, 1, 1),
            (threads as u32, 1, 1),
            0,
            stream,
            args,
        )?;
        Ok(())
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
mod tests {
    //! The fp8 kernels against known encodings and an f64 GEMM (`#[ignore]`d: they need a GPU of
    //! compute capability 8.9+, `tools/device/gpu-tests.sh`).
    use super::*;
    use crate::{rel_err, testutil::random};
    use cudarc::driver::DevicePtr;

    #[test]
    #[ignore = "needs a GPU of compute capability 8.9+: tools/device/gpu-tests.sh"]
    fn fp8_quantize_and_gemm_match_f64() {
        let fk = Fp8Kernels::new(0).expect("an fp8 GPU");
        let s = fk.ctx.default_stream();
        let stream = s.cu_stream();
        let ptr = |b: &CudaSlice<u16>| b.device_ptr(&s).0;
        let ptr8 = |b: &CudaSlice<u8>| b.device_ptr(&s).0;
        let ptrf = |b: &CudaSlice<f32>| b.device_ptr(&s).0;
        let h = |v: &[f32]| -> Vec<u16> { v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect() };

        // known encodings (OCP e4m3fn): 1 → 0x38, 0.5 → 0x30, −2 → 0xC0, 448 → 0x7E, 500 saturates
        // to 448, 0 → 0x00, 1.0625 rounds to even (1.0) → 0x38
        let known = [1.0f32, 0.5, -2.0, 448.0, 500.0, 0.0, 1.0625, -448.0];
        let x = s.clone_htod(&h(&known)).unwrap();
        let x8 = s.alloc_zeros::<u8>(8).unwrap();
        unsafe { fk.quantize_x(stream, ptr(&x), 8, 1.0, ptr8(&x8)) }.unwrap();
        s.synchronize().unwrap();
        assert_eq!(
            s.clone_dtoh(&x8).unwrap(),
            vec![0x38, 0x30, 0xC0, 0x7E, 0x7E, 0x00, 0x38, 0xFE]
        );

        // Y = X·Wᵀ at SDXL's shapes, against f64 on the fp16 inputs
        let (m, n, k) = (256usize, 640usize, 1280usize);
        let xs: Vec<f32> = random(m * k, 21).iter().map(|v| v * 3.0).collect();
        let ws: Vec<f32> = random(n * k, 22).iter().map(|v| v * 0.05).collect();
        let (xh, wh) = (h(&xs), h(&ws));
        let f = |b: u16| half::f16::from_bits(b).to_f64();
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let acc: f64 = (0..k).map(|q| f(xh[i * k + q]) * f(wh[j * k + q])).sum();
                want[i * n + j] = acc as f32;
            }
        }
        let amax_x = xh.iter().map(|&b| f(b).abs()).fold(0.0, f64::max) as f32;
        let x_scale = amax_x / E4M3_MAX;
        let (dx, dw) = (s.clone_htod(&xh).unwrap(), s.clone_htod(&wh).unwrap());
        let (dx8, dw8) = (
            s.alloc_zeros::<u8>(m * k).unwrap(),
            s.alloc_zeros::<u8>(n * k).unwrap(),
        );
        let dxs = s.clone_htod(&[x_scale]).unwrap();
        let (dws, damax) = (s.alloc_zeros::<f32>(1).unwrap(), s.alloc_zeros::<f32>(1).unwrap());
        let dy = s.alloc_zeros::<u16>(m * n).unwrap();
        let gemm = Fp8Gemm::plan(&fk, m, n, k).unwrap();
        unsafe {
            fk.quantize_weight(stream, ptr(&dw), n * k, ptrf(&damax), ptr8(&dw8), ptrf(&dws))
                .unwrap();
            fk.quantize_x(stream, ptr(&dx), m * k, x_scale, ptr8(&dx8))
                .unwrap();
            gemm.run(
                &fk,
                stream,
                ptr8(&dx8),
                ptr8(&dw8),
                ptr(&dy),
                ptrf(&dxs),
                ptrf(&dws),
            )
            .unwrap();
        }
        s.synchronize().unwrap();
        let w_scale = s.clone_dtoh(&dws).unwrap()[0];
        let amax_w = wh.iter().map(|&b| f(b).abs()).fold(0.0, f64::max) as f32;
        assert!(
            (w_scale - amax_w / 448.0).abs() <= 1e-6 * amax_w,
            "weight scale {w_scale}"
        );
        let got: Vec<f32> = s.clone_dtoh(&dy).unwrap().iter().map(|&b| f(b) as f32).collect();
        let err = rel_err(&got, &want);
        eprintln!("fp8 GEMM {m}×{k}·{n}×{k}ᵀ: relative error {err:.4} against f64");
        assert!(err < 0.06 && err > 1e-4, "fp8 GEMM relative error {err}");
    }

    #[test]
    #[ignore = "needs a GPU of compute capability 8.9+: tools/device/gpu-tests.sh"]
    fn fp8_layer_norm_is_skip_layer_norm_then_quantize() {
        let fk = Fp8Kernels::new(0).expect("an fp8 GPU");
        let s = fk.ctx.default_stream();
        let stream = s.cu_stream();
        let ptr = |b: &CudaSlice<u16>| b.device_ptr(&s).0;
        let ptr8 = |b: &CudaSlice<u8>| b.device_ptr(&s).0;
        let h16 = |x: f64| half::f16::from_f64(x);
        let f = |b: u16| half::f16::from_bits(b).to_f64();
        let hv = |n: usize, seed: u64, k: f64, off: f64| -> Vec<u16> {
            random(n, seed)
                .iter()
                .map(|v| h16(*v as f64 * k + off).to_bits())
                .collect()
        };
        // SDXL's two widths (and one not a multiple of 32 threads), with and without skip and bias
        for (rows, w, skip, bias) in [
            (33usize, 1280usize, true, true),
            (17, 640, true, false),
            (9, 200, false, false),
        ] {
            let (x, sk, bi) = (
                hv(rows * w, 41, 3.0, 0.5),
                hv(rows * w, 42, 2.0, 0.0),
                hv(w, 43, 1.0, 0.0),
            );
            let (ga, be) = (hv(w, 44, 0.5, 1.0), hv(w, 45, 0.2, 0.0));
            let mut sum = vec![0u16; rows * w];
            let mut normed = vec![0u16; rows * w];
            for r in 0..rows {
                let row: Vec<f64> = (0..w)
                    .map(|c| {
                        let mut v = f(x[r * w + c]);
                        if bias {
                            v = h16(v + f(bi[c])).to_f64();
                        }
                        if skip {
                            v = h16(v + f(sk[r * w + c])).to_f64();
                        }
                        v
                    })
                    .collect();
                let mean = row.iter().sum::<f64>() / w as f64;
                let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / w as f64;
                let rstd = 1.0 / (var + 1e-5).sqrt();
                for c in 0..w {
                    sum[r * w + c] = h16(row[c]).to_bits();
                    normed[r * w + c] = h16((row[c] - mean) * rstd * f(ga[c]) + f(be[c])).to_bits();
                }
            }
            let amax = normed.iter().map(|&b| f(b).abs()).fold(0.0, f64::max) as f32;
            let scale = amax / E4M3_MAX;
            let up = |v: &[u16]| s.clone_htod(v).unwrap();
            let (dx, dsk, dbi, dga, dbe, dnormed) = (up(&x), up(&sk), up(&bi), up(&ga), up(&be), up(&normed));
            let dsum = s.alloc_zeros::<u16>(rows * w).unwrap();
            let (got8, want8) = (
                s.alloc_zeros::<u8>(rows * w).unwrap(),
                s.alloc_zeros::<u8>(rows * w).unwrap(),
            );
            let args = LayerNormArgs {
                x: ptr(&dx),
                skip: if skip { ptr(&dsk) } else { 0 },
                bias: if bias { ptr(&dbi) } else { 0 },
                gamma: ptr(&dga),
                beta: ptr(&dbe),
                rows,
                width: w,
                epsilon: 1e-5,
                scale,
                x8: ptr8(&got8),
                sum: ptr(&dsum),
            };
            unsafe {
                fk.layer_norm(stream, &args).unwrap();
                fk.quantize_x(stream, ptr(&dnormed), rows * w, scale, ptr8(&want8))
                    .unwrap();
            }
            s.synchronize().unwrap();
            assert_eq!(s.clone_dtoh(&dsum).unwrap(), sum, "the sum output ({w} wide)");
            let (got, want) = (s.clone_dtoh(&got8).unwrap(), s.clone_dtoh(&want8).unwrap());
            let differ: Vec<(u8, u8)> = got
                .iter()
                .zip(&want)
                .filter(|(a, b)| a != b)
                .map(|(a, b)| (*a, *b))
                .collect();
            eprintln!(
                "fp8 layer norm {rows}×{w}: {} of {} codes differ from the two-step result",
                differ.len(),
                got.len()
            );
            // f32 statistics against f64 move an fp16 output by an ulp now and then
            assert!(differ.len() * 200 <= got.len(), "{} codes differ", differ.len());
            assert!(differ.iter().all(|&(a, b)| near(a, b)), "{differ:?}");
        }
        let bad = LayerNormArgs {
            width: 12,
            rows: 1,
            ..Default::default()
        };
        assert!(
            unsafe { fk.layer_norm(stream, &bad) }.is_err(),
            "a width not a multiple of 8 is refused"
        );
    }

    /// Whether two e4m3 codes are at most one step apart (±0 counting as one value).
    fn near(a: u8, b: u8) -> bool {
        let (ma, mb) = (a & 0x7f, b & 0x7f);
        ma.abs_diff(mb) <= 1 && ((a ^ b) & 0x80 == 0 || ma + mb <= 1)
    }

    /// erf to about 1.5e-7 (Abramowitz & Stegun 7.1.26): far below an fp16 step
    fn erf(x: f64) -> f64 {
        let t = 1.0 / (1.0 + 0.327_591_1 * x.abs());
        let p = t
            * (0.254_829_592
                + t * (-0.284_496_736 + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
        (1.0 - p * (-x * x).exp()).copysign(x)
    }

    #[test]
    #[ignore = "needs a GPU of compute capability 8.9+: tools/device/gpu-tests.sh"]
    fn fp8_geglu_is_bias_split_gelu_then_quantize() {
        let fk = Fp8Kernels::new(0).expect("an fp8 GPU");
        let s = fk.ctx.default_stream();
        let stream = s.cu_stream();
        let ptr = |b: &CudaSlice<u16>| b.device_ptr(&s).0;
        let ptr8 = |b: &CudaSlice<u8>| b.device_ptr(&s).0;
        let h16 = |x: f64| half::f16::from_f64(x);
        // SDXL's widest feed-forward (h = 5120) over a few rows, and an odd row count
        let (rows, h) = (37usize, 5120usize);
        let xs: Vec<u16> = random(rows * 2 * h, 31)
            .iter()
            .map(|v| h16(*v as f64 * 4.0).to_bits())
            .collect();
        let bs: Vec<u16> = random(2 * h, 32)
            .iter()
            .map(|v| h16(*v as f64).to_bits())
            .collect();
        let f = |b: u16| half::f16::from_bits(b).to_f64();
        // BiasSplitGelu as ONNX Runtime computes it, in f64 where it computes in f32
        let mut want = vec![0u16; rows * h];
        for r in 0..rows {
            for c in 0..h {
                let l = h16(f(xs[r * 2 * h + c]) + f(bs[c])).to_f64();
                let x = h16(f(xs[r * 2 * h + h + c]) + f(bs[h + c])).to_f64();
                let gelu = x * 0.5 * (erf(x / std::f64::consts::SQRT_2) + 1.0);
                want[r * h + c] = h16(l * gelu).to_bits();
            }
        }
        let amax = want.iter().map(|&b| f(b).abs()).fold(0.0, f64::max) as f32;
        let scale = amax / E4M3_MAX;
        let (dx, db, dwant) = (
            s.clone_htod(&xs).unwrap(),
            s.clone_htod(&bs).unwrap(),
            s.clone_htod(&want).unwrap(),
        );
        let (got8, want8) = (
            s.alloc_zeros::<u8>(rows * h).unwrap(),
            s.alloc_zeros::<u8>(rows * h).unwrap(),
        );
        unsafe {
            fk.geglu(stream, ptr(&dx), ptr(&db), rows, h, scale, ptr8(&got8))
                .unwrap();
            fk.quantize_x(stream, ptr(&dwant), rows * h, scale, ptr8(&want8))
                .unwrap();
        }
        s.synchronize().unwrap();
        let (got, want) = (s.clone_dtoh(&got8).unwrap(), s.clone_dtoh(&want8).unwrap());
        // erff on the GPU and erf here may differ in the last bit of the fp16 product, which
        // moves an fp8 code by at most one
        let differ: Vec<(u8, u8)> = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a != b)
            .map(|(a, b)| (*a, *b))
            .collect();
        eprintln!(
            "fp8 GEGLU {rows}×{h}: {} of {} codes differ from the two-step result",
            differ.len(),
            got.len()
        );
        assert!(differ.len() * 1000 <= got.len(), "{} codes differ", differ.len());
        assert!(differ.iter().all(|&(a, b)| near(a, b)), "{differ:?}");
        let bad = unsafe { fk.geglu(stream, ptr(&dx), ptr(&db), rows, 12, scale, ptr8(&got8)) };
        assert!(bad.is_err(), "a width not a multiple of 8 is refused");
    }
}
