//! CUDA twins of the CPU kernels, compiled at run time with NVRTC and launched through cudarc.
//!
//! ```text
//! GpuKernels::new(ordinal) ── probe libcuda + a device ── NVRTC compile (once) ── module
//!   combine    pred[2n] (uncond; cond), g        ─▶ out[n]        (guidance)
//!   axpy       dst += s · src                                      (ControlNet residual sums)
//!   scale      out = s · src (twice for [x; x])                    (scheduler input scale, CFG batch)
//!   euler      sample ← sample + (sample − (sample − σ·ε))/σ · (σ' − σ)   (diffusers' Euler, ε-prediction)
//!   lora_merge every layer of a LoRA set in ONE launch:  out = W + Σ cᵢ · Bᵢ·Aᵢ
//! ```
//!
//! cudarc loads libcuda and libnvrtc at run time, so this module builds everywhere; where no
//! driver or device is present, [`GpuKernels::new`] returns [`GpuError::NoCuda`] — it never
//! panics and never falls back to the CPU. Tests marked `#[ignore]` need a GPU:
//! `tools/device/gpu-tests.sh` runs them on the GPU machine.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
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
}

const SOURCE: &str = r#"
extern "C" __global__ void combine(const float* pred, float g, float* out, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float u = pred[i], c = pred[n + i];
        out[i] = u + g * (c - u);
    }
}

extern "C" __global__ void axpy(float* dst, const float* src, float s, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        dst[i] += s * src[i];
    }
}

// out[k*n + i] = s * src[i] for k < copies: the scaled latent, once per guidance half
extern "C" __global__ void scale(const float* src, float s, float* out, unsigned int n, unsigned int copies) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float v = s * src[i];
        for (unsigned int k = 0; k < copies; k++) out[k * n + i] = v;
    }
}

extern "C" __global__ void euler(float* sample, const float* eps, float sigma, float sigma_next, unsigned int n) {
    for (unsigned int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        float x = sample[i];
        float pred_original = x - sigma * eps[i];
        float derivative = (x - pred_original) / sigma;
        sample[i] = x + derivative * (sigma_next - sigma);
    }
}

// One launch over all layers. Layer l: W = layer_ptrs[2l], out = layer_ptrs[2l+1], dims[4l..] =
// rows, cols, first factor, number of factors; its elements start at offsets[l] of the flat range.
// Factor f: B = factor_ptrs[2f] ([rows, rank]), A = factor_ptrs[2f+1] ([rank, cols]).
extern "C" __global__ void lora_merge(const unsigned long long* layer_ptrs, const unsigned int* dims,
                                      const unsigned long long* offsets, int n_layers,
                                      const unsigned long long* factor_ptrs, const unsigned int* ranks,
                                      const float* coeffs, unsigned long long total) {
    for (unsigned long long idx = (unsigned long long)blockIdx.x * blockDim.x + threadIdx.x; idx < total;
         idx += (unsigned long long)gridDim.x * blockDim.x) {
        int lo = 0, hi = n_layers - 1;
        while (lo < hi) { int mid = (lo + hi + 1) / 2; if (offsets[mid] <= idx) lo = mid; else hi = mid - 1; }
        unsigned long long e = idx - offsets[lo];
        unsigned int cols = dims[4 * lo + 1], f0 = dims[4 * lo + 2], nf = dims[4 * lo + 3];
        unsigned int r = (unsigned int)(e / cols), c = (unsigned int)(e % cols);
        const float* W = (const float*)layer_ptrs[2 * lo];
        float* O = (float*)layer_ptrs[2 * lo + 1];
        float acc = W[e];
        for (unsigned int f = f0; f < f0 + nf; f++) {
            const float* B = (const float*)factor_ptrs[2 * f];
            const float* A = (const float*)factor_ptrs[2 * f + 1];
            unsigned int rank = ranks[f];
            float s = 0.0f;
            for (unsigned int k = 0; k < rank; k++) s += B[r * rank + k] * A[(unsigned long long)k * cols + c];
            acc += coeffs[f] * s;
        }
        O[e] = acc;
    }
}
"#;

/// Whether a CUDA driver library and at least one device are present (no panic where absent).
pub fn cuda_available() -> bool {
    // SAFETY: only probes whether the shared libraries can be opened.
    let libs = unsafe { cudarc::driver::sys::is_culib_present() && cudarc::nvrtc::sys::is_culib_present() };
    libs && cudarc::driver::result::init().is_ok()
        && cudarc::driver::result::device::get_count().unwrap_or(0) > 0
}

/// One LoRA factor of a layer on the device.
pub struct GpuFactor<'a> {
    pub b: &'a CudaSlice<f32>,
    pub a: &'a CudaSlice<f32>,
    pub rank: usize,
    pub coeff: f32,
}

/// One layer to merge: `out = base + Σ factors`.
pub struct GpuMergeLayer<'a> {
    pub base: &'a CudaSlice<f32>,
    pub out: &'a CudaSlice<f32>,
    pub rows: usize,
    pub cols: usize,
    pub factors: Vec<GpuFactor<'a>>,
}

pub struct GpuKernels {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    combine: CudaFunction,
    axpy: CudaFunction,
    scale: CudaFunction,
    euler: CudaFunction,
    lora_merge: CudaFunction,
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
        let ptx = cudarc::nvrtc::compile_ptx(SOURCE)?;
        let m = ctx.load_module(ptx)?;
        Ok(GpuKernels {
            combine: m.load_function("combine")?,
            axpy: m.load_function("axpy")?,
            scale: m.load_function("scale")?,
            euler: m.load_function("euler")?,
            lora_merge: m.load_function("lora_merge")?,
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

    /// Merges every layer of a LoRA set in one launch on this object's stream.
    pub fn lora_merge(&self, layers: &[GpuMergeLayer<'_>]) -> Result<(), GpuError> {
        if layers.is_empty() {
            return Ok(());
        }
        let s = &self.stream;
        let mut guards = Vec::new();
        let (mut layer_ptrs, mut dims, mut offsets) = (Vec::new(), Vec::new(), Vec::new());
        let (mut factor_ptrs, mut ranks, mut coeffs) = (Vec::new(), Vec::new(), Vec::new());
        let mut total: u64 = 0;
        for l in layers {
            let n = l.rows * l.cols;
            if l.base.len() != n || l.out.len() != n {
                return Err(GpuError::Shape(format!(
                    "lora_merge: layer {}×{} has buffers {} / {}",
                    l.rows,
                    l.cols,
                    l.base.len(),
                    l.out.len()
                )));
            }
            let (wp, gw) = l.base.device_ptr(s);
            let (op, go) = l.out.device_ptr(s);
            guards.push(gw);
            guards.push(go);
            layer_ptrs.extend([wp, op]);
            dims.extend([
                l.rows as u32,
                l.cols as u32,
                ranks.len() as u32,
                l.factors.len() as u32,
            ]);
            offsets.push(total);
            total += n as u64;
            for f in &l.factors {
                if f.b.len() != l.rows * f.rank || f.a.len() != f.rank * l.cols {
                    return Err(GpuError::Shape(format!(
                        "lora_merge: factor of rank {} does not fit {}×{}",
                        f.rank, l.rows, l.cols
                    )));
                }
                let (bp, gb) = f.b.device_ptr(s);
                let (ap, ga) = f.a.device_ptr(s);
                guards.push(gb);
                guards.push(ga);
                factor_ptrs.extend([bp, ap]);
                ranks.push(f.rank as u32);
                coeffs.push(f.coeff);
            }
        }
        if factor_ptrs.is_empty() {
            // keep the arrays non-empty for the launch
            factor_ptrs.extend([0u64, 0]);
            ranks.push(0);
            coeffs.push(0.0);
        }
        let d_layer_ptrs = s.clone_htod(&layer_ptrs)?;
        let d_dims = s.clone_htod(&dims)?;
        let d_offsets = s.clone_htod(&offsets)?;
        let d_factor_ptrs = s.clone_htod(&factor_ptrs)?;
        let d_ranks = s.clone_htod(&ranks)?;
        let d_coeffs = s.clone_htod(&coeffs)?;
        let n_layers = layers.len() as i32;
        let mut b = s.launch_builder(&self.lora_merge);
        b.arg(&d_layer_ptrs)
            .arg(&d_dims)
            .arg(&d_offsets)
            .arg(&n_layers)
            .arg(&d_factor_ptrs)
            .arg(&d_ranks)
            .arg(&d_coeffs)
            .arg(&total);
        let launch = LaunchConfig {
            grid_dim: ((total as usize).div_ceil(256).min(65_535 * 8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(launch) }?;
        drop(guards);
        Ok(())
    }

    pub fn synchronize(&self) -> Result<(), GpuError> {
        Ok(self.stream.synchronize()?)
    }
}

#[cfg(test)]
#[path = "cuda_tests.rs"]
mod tests;
