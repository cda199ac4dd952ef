//! katz's own fp16 kernels for operators of the UNet step whose ONNX Runtime kernels leave
//! memory bandwidth unused (the step graphs name them as `katz` operators: tools/step_rewrite.py).
//!
//! ```text
//! FusedKernels::new(ordinal) ── fused.cu (NVRTC)
//!   geglu       [X_l | X_r] + bias ─GEGLU─▶ Y (fp16)   (BiasSplitGelu's formula, 16-byte loads and stores)
//!   layer_norm  X (+ bias) (+ skip) ─▶ sum; LN(sum)·γ + β ─▶ Y (fp16)   (LayerNormalization with the bias add
//!               before it, or SkipLayerNormalization: one pass, one block per row)
//! ```
//!
//! Every launch goes on a stream the caller names by its raw handle (ONNX Runtime's compute stream,
//! inside its custom operators) and allocates nothing, so it may be captured into a CUDA graph.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::driver::sys::CUstream;
use cudarc::driver::{CudaContext, CudaFunction};

use super::{arg, launch_layer_norm, ptx_for, GpuError};

/// The CUDA C of the fused fp16 kernels.
const SOURCE: &str = concat!(include_str!("half.cu"), include_str!("fused.cu"));

/// The fused fp16 kernels of one GPU.
pub struct FusedKernels {
    pub ctx: Arc<CudaContext>,
    geglu: CudaFunction,
    layer_norm: CudaFunction,
    /// Blocks a grid-stride launch fills the GPU with.
    blocks: u32,
}

impl FusedKernels {
    /// The kernels for GPU `ordinal` (any GPU the driver runs: no tensor cores needed).
    pub fn new(ordinal: usize) -> Result<Self, GpuError> {
        if !super::cuda_available() {
            return Err(GpuError::NoCuda(
                "libcuda/libnvrtc not loadable or no device".into(),
            ));
        }
        let ctx = CudaContext::new(ordinal)?;
        let m = ctx.load_module(ptx_for(SOURCE, Default::default())?)?;
        let sms = ctx
            .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?
            as u32;
        Ok(FusedKernels {
            geglu: m.load_function("geglu_f16")?,
            layer_norm: m.load_function("layer_norm_f16")?,
            blocks: sms * 8,
            ctx,
        })
    }

    /// Y = GEGLU(x + bias): ONNX Runtime's BiasSplitGelu, its formula in f32 (values
    /// may differ in the last fp16 bit where the compilers' fused multiply-adds do). `x`: `rows` rows of
    /// `[left | right]`, `2·h` fp16 values each; `bias`: `2·h` fp16 values; `y`: `rows · h` fp16
    /// values, `left · gelu(right)` with the bias added in fp16 and the product rounded to fp16;
    /// `h` a multiple of 8. All three 16-byte aligned (ONNX Runtime's buffers are).
    ///
    /// # Safety
    /// Device pointers of this GPU, valid for the sizes named, until `stream` has run the work.
    pub unsafe fn geglu(
        &self,
        stream: CUstream,
        x: u64,
        bias: u64,
        rows: usize,
        h: usize,
        y: u64,
    ) -> Result<(), GpuError> {
        let items = rows.saturating_mul(h / 8);
        if h == 0 || !h.is_multiple_of(8) || items >= 1 << 31 {
            return Err(GpuError::Shape(format!(
                "GEGLU of {rows} rows of width {h}: the width must be a positive multiple of 8, \
                 rows × width / 8 under 2^31"
            )));
        }
        if !(x | bias | y).is_multiple_of(16) {
            return Err(GpuError::Shape("GEGLU buffers not 16-byte aligned".into()));
        }
        if items == 0 {
            return Ok(());
        }
        let (mut px, mut pb, mut pr, mut ph8, mut py) = (x, bias, rows as u32, (h / 8) as u32, y);
        let args: &mut [*mut c_void] = &mut [
            arg(&mut px),
            arg(&mut pb),
            arg(&mut pr),
            arg(&mut ph8),
            arg(&mut py),
        ];
        let blocks = (items.div_ceil(256) as u32).clamp(1, self.blocks);
        cudarc::driver::result::launch_kernel(
            self.geglu.cu_function(),
            (blocks, 1, 1),
            (256, 1, 1),
            0,
            stream,
            args,
        )?;
        Ok(())
    }
}

/// The buffers and sizes of [`FusedKernels::layer_norm`]: device addresses, 0 for an absent one
/// (`skip`, `bias`, `beta`, `sum`), all fp16 and 16-byte aligned.
#[derive(Clone, Copy, Debug, Default)]
pub struct NormArgs {
    pub x: u64,
    pub skip: u64,
    pub bias: u64,
    pub gamma: u64,
    pub beta: u64,
    pub rows: usize,
    pub width: usize,
    pub epsilon: f32,
    pub y: u64,
    pub sum: u64,
}

impl FusedKernels {
    /// Y = fp16(LN(sum)·γ + β) with sum = fp16(fp16(x + bias) + skip) (written to `sum` where
    /// given): ONNX Runtime's LayerNormalization over the last axis with the bias add before it, or
    /// its SkipLayerNormalization; statistics in f32 over rows of `width` fp16 values (a positive
    /// multiple of 8, at most 8192).
    ///
    /// # Safety
    /// As [`FusedKernels::geglu`]; the buffers of `n` hold `rows · width` values (x, skip, y, sum)
    /// or `width` (bias, gamma, beta).
    pub unsafe fn layer_norm(&self, stream: CUstream, n: &NormArgs) -> Result<(), GpuError> {
        let all = n.x | n.skip | n.bias | n.gamma | n.beta | n.y | n.sum;
        if !all.is_multiple_of(16) {
            return Err(GpuError::Shape("layer norm buffers not 16-byte aligned".into()));
        }
        let (mut px, mut ps, mut pb, mut pg, mut pbeta) = (n.x, n.skip, n.bias, n.gamma, n.beta);
        let (mut ld, mut eps, mut py, mut psum) = (n.width as u32, n.epsilon, n.y, n.sum);
        let args: &mut [*mut c_void] = &mut [
            arg(&mut px),
            arg(&mut ps),
            arg(&mut pb),
            arg(&mut pg),
            arg(&mut pbeta),
            arg(&mut ld),
            arg(&mut eps),
            arg(&mut py),
            arg(&mut psum),
        ];
        launch_layer_norm(&self.layer_norm, "layer norm", n.rows, n.width, stream, args)
    }
}

#[cfg(test)]
#[path = "fused_tests.rs"]
mod tests;
