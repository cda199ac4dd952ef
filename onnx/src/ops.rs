//! katz's own ONNX Runtime operators (domain `katz`, CUDA provider only): every CUDA session
//! registers them, and a graph names them where katz's kernel beats ONNX Runtime's or where no
//! ONNX Runtime operator does the work.
//!
//! ```text
//!  fp16 step graphs (tools/katz_ops.py at export):
//!    [X_l | X_r], bias ─katz.BiasSplitGelu─▶ Y (fp16)      com.microsoft.BiasSplitGelu's values,
//!                                                           16-byte loads (kernels::cuda::fused)
//!  fp8 graphs (tools/fp8_rewrite.py, `--precision fp8`): the operators of `fp8`
//!    katz.Fp8Quantize, katz.Fp8MatMul, katz.Fp8BiasSplitGelu, katz.Fp8LayerNorm
//! ```
//!
//! Each operator's kernel finds its GPU from its first input's address at its first run (never
//! one captured into a CUDA graph), keeps that GPU's kernels, and launches on ONNX Runtime's
//! compute stream; nothing falls back: an unaligned shape or a missing library fails the run
//! with the reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use katz_kernels::cuda::fused::FusedKernels;
use katz_kernels::cuda::GpuError;
use ort::operator::{
    BoxedKernel, ComputeContext, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput,
};
use ort::value::{DynTensorValueType, TensorElementType};

/// The custom operators' domain.
pub const DOMAIN: &str = "katz";

/// The `katz` operator domain, for a session on the CUDA provider (the session keeps it).
pub fn domain() -> ort::Result<OperatorDomain> {
    crate::fp8::add_operators(OperatorDomain::new(DOMAIN)?.add(BiasSplitGelu)?)
}

pub(crate) fn ort_err(e: impl std::fmt::Display) -> ort::Error {
    ort::Error::new(format!("katz operator: {e}"))
}

/// The GPU whose memory `ptr` is in.
pub(crate) fn device_of(ptr: u64) -> ort::Result<usize> {
    use cudarc::driver::sys;
    let mut ordinal: i32 = -1;
    // SAFETY: a pointer attribute query writes one int
    let r = unsafe {
        sys::cuPointerGetAttribute(
            &mut ordinal as *mut i32 as *mut std::ffi::c_void,
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
            ptr,
        )
    };
    if r != sys::CUresult::CUDA_SUCCESS || ordinal < 0 {
        return Err(ort_err(format!("input at {ptr:#x} is not in GPU memory ({r:?})")));
    }
    Ok(ordinal as usize)
}

/// ONNX Runtime's compute stream of this run.
pub(crate) fn stream_of(ctx: &ComputeContext) -> ort::Result<cudarc::driver::sys::CUstream> {
    ctx.stream()?
        .map(|s| s.as_ptr() as cudarc::driver::sys::CUstream)
        .ok_or_else(|| ort_err("no CUDA stream: katz's operators run on the CUDA provider only"))
}

/// The fused fp16 kernels of each GPU, made on first use.
fn fused(ordinal: usize) -> Result<Arc<FusedKernels>, GpuError> {
    static ALL: OnceLock<Mutex<HashMap<usize, Arc<FusedKernels>>>> = OnceLock::new();
    let mut all = ALL
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(k) = all.get(&ordinal) {
        return Ok(k.clone());
    }
    let k = Arc::new(FusedKernels::new(ordinal)?);
    all.insert(ordinal, k.clone());
    Ok(k)
}

/// `katz.BiasSplitGelu`: `Y = BiasSplitGelu(X, bias)` as ONNX Runtime's `com.microsoft`
/// operator computes it (X fp16 `[.., 2h]`, bias fp16 `[2h]`, Y fp16 `[.., h]`: `(X_l + b_l) ·
/// gelu(X_r + b_r)`), through 16-byte loads and stores.
struct BiasSplitGelu;

impl Operator for BiasSplitGelu {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        "BiasSplitGelu"
    }

    fn execution_provider_type(&self) -> Option<&str> {
        Some("CUDAExecutionProvider")
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float16),
            OperatorInput::required(TensorElementType::Float16),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float16)]
    }

    fn create_kernel<'attr>(&self, _: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let mut fk: Option<Arc<FusedKernels>> = None;
        Ok(Box::new(move |ctx: &ComputeContext| {
            let x = ctx
                .input(0)?
                .ok_or_else(|| ort_err("BiasSplitGelu: no input"))?
                .downcast::<DynTensorValueType>()?;
            let b = ctx
                .input(1)?
                .ok_or_else(|| ort_err("BiasSplitGelu: no bias"))?
                .downcast::<DynTensorValueType>()?;
            let mut shape: Vec<i64> = x.shape().to_vec();
            let width = shape.last().copied().unwrap_or(0);
            if b.shape().to_vec() != [width] || width % 16 != 0 {
                return Err(ort_err(format!(
                    "BiasSplitGelu: input {shape:?} and bias {:?} (the width must be the bias's, a multiple of 16)",
                    b.shape()
                )));
            }
            let h = (width / 2) as usize;
            let rows: usize = shape[..shape.len() - 1].iter().map(|&d| d as usize).product();
            let last = shape.len() - 1;
            shape[last] = h as i64;
            let (xp, bp) = (x.data_ptr() as u64, b.data_ptr() as u64);
            let stream = stream_of(ctx)?;
            let mut y = ctx
                .output(0, shape)?
                .ok_or_else(|| ort_err("BiasSplitGelu: no output"))?
                .downcast::<DynTensorValueType>()?;
            let yp = y.data_ptr_mut() as u64;
            if rows == 0 {
                return Ok(());
            }
            let k = match fk {
                Some(ref k) => k,
                None => fk.insert(fused(device_of(xp)?).map_err(ort_err)?),
            };
            // SAFETY: ONNX Runtime's buffers: rows·2h and 2h fp16 values in, rows·h out, on its stream
            unsafe { k.geglu(stream, xp, bp, rows, h, yp) }.map_err(ort_err)
        }))
    }
}
