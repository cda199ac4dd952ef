//! katz's own ONNX Runtime operators (domain `katz`, CUDA provider only): every CUDA session
//! registers them, and a graph names them where katz's kernel beats ONNX Runtime's or where no
//! ONNX Runtime operator does the work.
//!
//! ```text
//!  fp16 step graphs (tools/step_rewrite.py at export):
//!    [X_l | X_r], bias ─katz.BiasSplitGelu─▶ Y (fp16)      com.microsoft.BiasSplitGelu's formula,
//!                                                           16-byte loads (kernels::cuda::fused)
//!    X, bias ─katz.LayerNorm─▶ Y, sum (fp16)              LayerNormalization with the bias add
//!                                                           before it, one pass (its ONNX Runtime
//!                                                           kernel reads fp16 a value at a time)
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

use katz_kernels::cuda::fused::{FusedKernels, NormArgs};
use katz_kernels::cuda::GpuError;
use ort::operator::{
    BoxedKernel, ComputeContext, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput,
};
use ort::value::{DynTensorValueType, TensorElementType};

/// The custom operators' domain.
pub const DOMAIN: &str = "katz";

/// The `katz` operator domain, for a session on the CUDA provider (the session keeps it).
pub fn domain() -> ort::Result<OperatorDomain> {
    crate::fp8::add_operators(OperatorDomain::new(DOMAIN)?.add(BiasSplitGelu)?.add(LayerNorm)?)
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

/// Input `i` of a node, `None` where the node leaves it out (an empty name or fewer inputs).
pub(crate) fn opt_input(ctx: &ComputeContext, i: usize) -> ort::Result<Option<(u64, Vec<i64>)>> {
    if i >= ctx.num_inputs()? {
        return Ok(None);
    }
    Ok(match ctx.input(i)? {
        Some(v) => {
            let t = v.downcast::<DynTensorValueType>()?;
            Some((t.data_ptr() as u64, t.shape().to_vec()))
        }
        None => None,
    })
}

/// A GEGLU node's buffers as katz.BiasSplitGelu and katz.Fp8BiasSplitGelu take them: X `[.., 2h]`
/// and bias `[2h]` in (the width a multiple of 16), Y `[.., h]` out (made here), `rows` rows of X.
pub(crate) struct GegluNode {
    pub x: u64,
    pub bias: u64,
    pub y: u64,
    pub rows: usize,
    pub h: usize,
}

/// The buffers of GEGLU node `op` in this run (its output made).
pub(crate) fn geglu_node(ctx: &ComputeContext, op: &str) -> ort::Result<GegluNode> {
    let (x, mut shape) = opt_input(ctx, 0)?.ok_or_else(|| ort_err(format!("{op}: no input")))?;
    let (bias, bshape) = opt_input(ctx, 1)?.ok_or_else(|| ort_err(format!("{op}: no bias")))?;
    let width = shape.last().copied().unwrap_or(0);
    if bshape != [width] || width == 0 || width % 16 != 0 {
        return Err(ort_err(format!(
            "{op}: input {shape:?} and bias {bshape:?} (the width must be the bias's, a positive multiple of 16)"
        )));
    }
    let h = (width / 2) as usize;
    let rows: usize = shape[..shape.len() - 1].iter().map(|&d| d as usize).product();
    let last = shape.len() - 1;
    shape[last] = h as i64;
    let y = ctx
        .output(0, shape)?
        .ok_or_else(|| ort_err(format!("{op}: no output")))?
        .downcast::<DynTensorValueType>()?
        .data_ptr_mut() as u64;
    Ok(GegluNode { x, bias, y, rows, h })
}

/// A layer norm node's buffers as katz.LayerNorm and katz.Fp8LayerNorm take them (inputs `X, skip,
/// gamma, beta, bias`, SkipLayerNormalization's order; outputs `Y` and, where the node names it,
/// `sum = X + bias + skip`): device addresses, 0 for an absent one, each checked against X's shape;
/// the outputs made with X's shape.
pub(crate) struct NormNode {
    pub x: u64,
    pub skip: u64,
    pub gamma: u64,
    pub beta: u64,
    pub bias: u64,
    pub y: u64,
    pub sum: u64,
    pub rows: usize,
    pub width: usize,
}

/// A layer norm node's `epsilon` attribute (finite, not negative).
pub(crate) fn norm_epsilon(kctx: &KernelContext<'_>, op: &str) -> ort::Result<f32> {
    let epsilon: f32 = kctx
        .get("epsilon")
        .ok_or_else(|| ort_err(format!("{op} without an `epsilon`")))?;
    if !(epsilon.is_finite() && epsilon >= 0.0) {
        return Err(ort_err(format!("{op} epsilon {epsilon}")));
    }
    Ok(epsilon)
}

/// A layer norm node's inputs: `X, skip, gamma, beta, bias`, fp16, skip, beta and bias optional.
pub(crate) fn norm_inputs() -> [OperatorInput; 5] {
    [
        OperatorInput::required(TensorElementType::Float16),
        OperatorInput::optional(TensorElementType::Float16),
        OperatorInput::required(TensorElementType::Float16),
        OperatorInput::optional(TensorElementType::Float16),
        OperatorInput::optional(TensorElementType::Float16),
    ]
}

/// The buffers of layer norm node `op` in this run (its outputs made).
pub(crate) fn norm_node(ctx: &ComputeContext, op: &str) -> ort::Result<NormNode> {
    let (x, shape) = opt_input(ctx, 0)?.ok_or_else(|| ort_err(format!("{op}: no input")))?;
    let (gamma, gshape) = opt_input(ctx, 2)?.ok_or_else(|| ort_err(format!("{op}: no gamma")))?;
    let width = shape.last().copied().unwrap_or(0);
    let row_of = |what: &str, v: Option<(u64, Vec<i64>)>| -> ort::Result<u64> {
        match v {
            Some((p, s)) if s == [width] => Ok(p),
            Some((_, s)) => Err(ort_err(format!("{op}: {what} {s:?} for input {shape:?}"))),
            None => Ok(0),
        }
    };
    if gshape != [width] {
        return Err(ort_err(format!("{op}: gamma {gshape:?} for input {shape:?}")));
    }
    let beta = row_of("beta", opt_input(ctx, 3)?)?;
    let bias = row_of("bias", opt_input(ctx, 4)?)?;
    let skip = match opt_input(ctx, 1)? {
        Some((p, s)) if s == shape => p,
        Some((_, s)) => return Err(ort_err(format!("{op}: skip {s:?} for input {shape:?}"))),
        None => 0,
    };
    let rows: usize = shape[..shape.len().saturating_sub(1)]
        .iter()
        .map(|&d| d as usize)
        .product();
    let y = ctx
        .output(0, shape.clone())?
        .ok_or_else(|| ort_err(format!("{op}: no output")))?
        .downcast::<DynTensorValueType>()?
        .data_ptr_mut() as u64;
    let sum = if ctx.num_outputs()? > 1 {
        match ctx.output(1, shape.clone())? {
            Some(v) => v.downcast::<DynTensorValueType>()?.data_ptr_mut() as u64,
            None => 0,
        }
    } else {
        0
    };
    Ok(NormNode {
        x,
        skip,
        gamma,
        beta,
        bias,
        y,
        sum,
        rows,
        width: width as usize,
    })
}

/// One set of kernels `K` per GPU, made on first use by `make` (NVRTC compiles them) and kept for
/// the process: the fused fp16 kernels here, the fp8 kernels in `fp8`.
pub(crate) struct PerGpu<K> {
    all: OnceLock<Mutex<HashMap<usize, Arc<K>>>>,
    make: fn(usize) -> Result<K, GpuError>,
}

impl<K> PerGpu<K> {
    pub(crate) const fn new(make: fn(usize) -> Result<K, GpuError>) -> Self {
        PerGpu {
            all: OnceLock::new(),
            make,
        }
    }

    /// GPU `ordinal`'s kernels.
    pub(crate) fn get(&self, ordinal: usize) -> Result<Arc<K>, GpuError> {
        let mut all = self
            .all
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(k) = all.get(&ordinal) {
            return Ok(k.clone());
        }
        let k = Arc::new((self.make)(ordinal)?);
        all.insert(ordinal, k.clone());
        Ok(k)
    }

    /// The kernels of the GPU that `ptr` is on, looked up at an operator's first run and kept in
    /// `slot` (a run being captured into a CUDA graph makes no lookups).
    pub(crate) fn at<'a>(&self, slot: &'a mut Option<Arc<K>>, ptr: u64) -> ort::Result<&'a Arc<K>> {
        match slot {
            Some(k) => Ok(k),
            None => Ok(slot.insert(self.get(device_of(ptr)?).map_err(ort_err)?)),
        }
    }
}

/// The fused fp16 kernels of each GPU.
static FUSED: PerGpu<FusedKernels> = PerGpu::new(FusedKernels::new);

/// `katz.BiasSplitGelu`: `Y = BiasSplitGelu(X, bias)` by ONNX Runtime's `com.microsoft`
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
            let stream = stream_of(ctx)?;
            let g = geglu_node(ctx, "BiasSplitGelu")?;
            if g.rows == 0 {
                return Ok(());
            }
            let k = FUSED.at(&mut fk, g.x)?;
            // SAFETY: ONNX Runtime's buffers: rows·2h and 2h fp16 values in, rows·h out, on its stream
            unsafe { k.geglu(stream, g.x, g.bias, g.rows, g.h, g.y) }.map_err(ort_err)
        }))
    }
}

/// `katz.LayerNorm`: a layer norm over the last axis with inputs `X, skip, gamma, beta, bias`
/// (SkipLayerNormalization's order; skip, beta and bias optional) and outputs `Y = LN(sum)·γ + β`
/// and, where the node names it, `sum = X + bias + skip`, all fp16: ONNX Runtime's
/// LayerNormalization with the bias add before it folded in (the step rewrite's), in one pass.
struct LayerNorm;

impl Operator for LayerNorm {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        "LayerNorm"
    }

    fn execution_provider_type(&self) -> Option<&str> {
        Some("CUDAExecutionProvider")
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        norm_inputs()
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [
            OperatorOutput::required(TensorElementType::Float16),
            OperatorOutput::optional(TensorElementType::Float16),
        ]
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let epsilon = norm_epsilon(kctx, "LayerNorm")?;
        let mut fk: Option<Arc<FusedKernels>> = None;
        Ok(Box::new(move |ctx: &ComputeContext| {
            let stream = stream_of(ctx)?;
            let n = norm_node(ctx, "LayerNorm")?;
            if n.rows == 0 {
                return Ok(());
            }
            let k = FUSED.at(&mut fk, n.x)?;
            let args = NormArgs {
                x: n.x,
                skip: n.skip,
                bias: n.bias,
                gamma: n.gamma,
                beta: n.beta,
                rows: n.rows,
                width: n.width,
                epsilon,
                y: n.y,
                sum: n.sum,
            };
            // SAFETY: ONNX Runtime's buffers of the shapes norm_node checked, on its stream
            unsafe { k.layer_norm(stream, &args) }.map_err(ort_err)
        }))
    }
}
