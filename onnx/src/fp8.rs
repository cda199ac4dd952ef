//! fp8 precision (`--precision fp8`): the UNet's GEMMs against LoRA-targetable weights in OCP
//! e4m3 on GPUs of compute capability 8.9+, through ONNX Runtime custom operators on the
//! CUDA provider (domain `katz`) that an fp8 bundle's graphs use (`tools/fp8_rewrite.py` makes
//! them from the fp16 graphs, with activation scales calibrated at export).
//!
//! ```text
//!  X (fp16) ─katz.Fp8Quantize(scale)─▶ X8 (e4m3 bytes) ─┐     once per activation (Q, K, V share it)
//!  (or [X_l | X_r] ─katz.Fp8BiasSplitGelu(scale)─▶ X8: the feed-forward's GEGLU, quantized as it is made;
//!   or X, skip ─katz.Fp8LayerNorm(scale)─▶ X8, sum: a (skip) layer norm, quantized as it is made)
//!  W (fp16 graph input: pristine, merged, or a CUDA-graph weight slot)
//!     ─(first run, new weights epoch, or refresh)─▶ W8 + s_w (kept by the operator)
//!                                                     └─katz.Fp8MatMul(x_scale)─▶ Y (fp16) = s_x·s_w · X8·W8ᵀ
//! ```
//!
//! The weights stay fp16 graph inputs, so LoRA merges, merged sets and CUDA-graph weight slots
//! work as in fp16; each `Fp8MatMul` keeps its own quantized copy of its weight and makes it
//! again when the weight it is bound to may have changed:
//! * a new merged set (fresh buffers, possibly at a freed set's addresses) bumps the weights
//!   epoch ([`weights_changed`]); an operator whose copy is older quantizes at its next run;
//! * a CUDA graph replays without calling the operators, so the weight slot, after it copies a
//!   merge in, asks every copy made from the buffers it wrote to be made again ([`refresh`]).
//!
//! Nothing here falls back: a GPU below 8.9, a missing libcublasLt or an unaligned shape fails the
//! run with the reason.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, DevicePtr};
use katz_kernels::cuda::fp8::{Fp8Gemm, Fp8Kernels, LayerNormArgs};
use katz_kernels::cuda::GpuError;

use crate::ops::{device_of, geglu_node, norm_epsilon, norm_inputs, norm_node, ort_err, stream_of, PerGpu};
use ort::operator::{
    BoxedKernel, ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput,
    OperatorOutput,
};
use ort::value::{DynTensorValueType, TensorElementType};

static EPOCH: AtomicU64 = AtomicU64::new(1);

/// Weights bound to the graphs may have changed place or content (a new merged set): every
/// fp8 weight copy is made again at its operator's next run.
pub fn weights_changed() {
    EPOCH.fetch_add(1, Ordering::Relaxed);
}

/// The fp8 kernels of each GPU.
static KERNELS: PerGpu<Fp8Kernels> = PerGpu::new(Fp8Kernels::new);

/// Whether GPU `ordinal` runs fp8 graphs, or why not.
pub fn check_gpu(ordinal: usize) -> Result<(), String> {
    KERNELS.get(ordinal).map(|_| ()).map_err(|e| e.to_string())
}

/// A quantized weight: where it came from, and where its copy and scale live.
#[derive(Clone, Copy)]
struct Copy8 {
    ordinal: usize,
    src: u64,
    len: usize,
    w8: u64,
    scale: u64,
    amax: u64,
}

/// Every fp8 weight copy of the process, by its source buffer's address ([`refresh`]).
fn copies() -> std::sync::MutexGuard<'static, Vec<Copy8>> {
    static ALL: Mutex<Vec<Copy8>> = Mutex::new(Vec::new());
    ALL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Makes again, on `stream` of GPU `ordinal`, every fp8 copy of the buffers at `written`
/// (a CUDA-graph weight slot's, after it copied weights in); the caller synchronises `stream`.
///
/// # Safety
/// `stream` is a stream of GPU `ordinal`'s primary context; the buffers hold their new values
/// once `stream`'s earlier work is done.
pub unsafe fn refresh(ordinal: usize, stream: u64, written: &[u64]) -> crate::Result<()> {
    let list: Vec<Copy8> = copies()
        .iter()
        .filter(|c| c.ordinal == ordinal && written.contains(&c.src))
        .copied()
        .collect();
    if list.is_empty() {
        return Ok(());
    }
    let fk = KERNELS.get(ordinal).map_err(crate::device::gpu_err)?;
    for c in list {
        // SAFETY: the copy's buffers live as long as their operator, which is registered while
        // it lives (it deregisters on drop)
        unsafe { fk.quantize_weight(stream as _, c.src, c.len, c.amax, c.w8, c.scale) }
            .map_err(crate::device::gpu_err)?;
    }
    Ok(())
}

/// A float attribute of a node that must be finite and positive (a scale).
fn positive_attr(kctx: &KernelContext<'_>, op: &str, name: &str) -> ort::Result<f32> {
    let v: f32 = kctx
        .get(name)
        .ok_or_else(|| ort_err(format!("{op} without `{name}`")))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(ort_err(format!("{op} {name} {v}")));
    }
    Ok(v)
}

/// `katz.Fp8Quantize`: `X8 = e4m3(X / scale)`.
struct Quantize;

impl Operator for Quantize {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        "Fp8Quantize"
    }

    fn execution_provider_type(&self) -> Option<&str> {
        Some("CUDAExecutionProvider")
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [OperatorInput::required(TensorElementType::Float16)]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Uint8)]
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let scale = positive_attr(kctx, "Fp8Quantize", "scale")?;
        let mut fk: Option<Arc<Fp8Kernels>> = None;
        Ok(Box::new(move |ctx: &ComputeContext| {
            let x = ctx
                .input(0)?
                .ok_or_else(|| ort_err("Fp8Quantize: no input"))?
                .downcast::<DynTensorValueType>()?;
            let shape: Vec<i64> = x.shape().to_vec();
            let n: usize = shape.iter().map(|&d| d as usize).product();
            let xp = x.data_ptr() as u64;
            let stream = stream_of(ctx)?;
            let mut y = ctx
                .output(0, shape)?
                .ok_or_else(|| ort_err("Fp8Quantize: no output"))?
                .downcast::<DynTensorValueType>()?;
            let yp = y.data_ptr_mut() as u64;
            if n == 0 {
                return Ok(());
            }
            let k = KERNELS.at(&mut fk, xp)?;
            // SAFETY: ONNX Runtime's input and output buffers of n elements, on its stream
            unsafe { k.quantize_x(stream, xp, n, scale, yp) }.map_err(ort_err)
        }))
    }
}

/// `katz.Fp8BiasSplitGelu`: `X8 = e4m3(BiasSplitGelu(X, bias) / scale)`, X fp16 `[.., 2h]`,
/// bias fp16 `[2h]`, X8 `[.., h]`: the feed-forward's GEGLU and the quantize of its output in one
/// kernel (the fp8 rewrite fuses them where nothing else reads the GEGLU's fp16 output).
struct Geglu;

impl Operator for Geglu {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        "Fp8BiasSplitGelu"
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
        [OperatorOutput::required(TensorElementType::Uint8)]
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let scale = positive_attr(kctx, "Fp8BiasSplitGelu", "scale")?;
        let mut fk: Option<Arc<Fp8Kernels>> = None;
        Ok(Box::new(move |ctx: &ComputeContext| {
            let stream = stream_of(ctx)?;
            let g = geglu_node(ctx, "Fp8BiasSplitGelu")?;
            if g.rows == 0 {
                return Ok(());
            }
            let k = KERNELS.at(&mut fk, g.x)?;
            // SAFETY: ONNX Runtime's buffers: rows·2h and 2h fp16 values in, rows·h bytes out,
            // on its stream
            unsafe { k.geglu(stream, g.x, g.bias, g.rows, g.h, scale, g.y) }.map_err(ort_err)
        }))
    }
}

/// `katz.Fp8LayerNorm`: ONNX Runtime's `SkipLayerNormalization` (inputs `X, skip, gamma, beta,
/// bias`; skip, beta and bias optional, so a plain `LayerNormalization` too) with its normalised
/// output quantized as it is made: outputs `X8` (e4m3 of `LN(sum)·γ+β` over `scale`) and,
/// where the node names it, `sum = X + bias + skip` (fp16), the residual stream's next value.
struct LayerNorm;

impl Operator for LayerNorm {
    type Kernel<'attr> = BoxedKernel<'attr>;

    fn name(&self) -> &str {
        "Fp8LayerNorm"
    }

    fn execution_provider_type(&self) -> Option<&str> {
        Some("CUDAExecutionProvider")
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        norm_inputs()
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [
            OperatorOutput::required(TensorElementType::Uint8),
            OperatorOutput::optional(TensorElementType::Float16),
        ]
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let scale = positive_attr(kctx, "Fp8LayerNorm", "scale")?;
        let epsilon = norm_epsilon(kctx, "Fp8LayerNorm")?;
        let mut fk: Option<Arc<Fp8Kernels>> = None;
        Ok(Box::new(move |ctx: &ComputeContext| {
            let stream = stream_of(ctx)?;
            let n = norm_node(ctx, "Fp8LayerNorm")?;
            if n.rows == 0 {
                return Ok(());
            }
            let k = KERNELS.at(&mut fk, n.x)?;
            let args = LayerNormArgs {
                x: n.x,
                skip: n.skip,
                bias: n.bias,
                gamma: n.gamma,
                beta: n.beta,
                rows: n.rows,
                width: n.width,
                epsilon,
                scale,
                x8: n.y,
                sum: n.sum,
            };
            // SAFETY: ONNX Runtime's buffers of the shapes norm_node checked, on its stream
            unsafe { k.layer_norm(stream, &args) }.map_err(ort_err)
        }))
    }
}

/// `katz.Fp8MatMul`: `Y = (x_scale · X8) · fp8(W)ᵀ`, W fp16 `[n, k]`.
struct MatMul;

impl Operator for MatMul {
    type Kernel<'attr> = MatMulKernel;

    fn name(&self) -> &str {
        "Fp8MatMul"
    }

    fn execution_provider_type(&self) -> Option<&str> {
        Some("CUDAExecutionProvider")
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Uint8),
            OperatorInput::required(TensorElementType::Float16),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float16)]
    }

    fn create_kernel<'attr>(&self, kctx: &KernelContext<'attr>) -> ort::Result<Self::Kernel<'attr>> {
        let x_scale = positive_attr(kctx, "Fp8MatMul", "x_scale")?;
        Ok(MatMulKernel { x_scale, state: None })
    }
}

/// One `Fp8MatMul` node's state: its weight's fp8 copy and its GEMM plan.
struct MatMulKernel {
    x_scale: f32,
    state: Option<MatMulState>,
}

struct MatMulState {
    fk: Arc<Fp8Kernels>,
    /// `[x_scale, w8, w_scale, amax]`: the buffers below, their addresses taken once (a run that
    /// is being captured into a CUDA graph makes no cudarc calls).
    ptrs: [u64; 4],
    bufs: (CudaSlice<f32>, CudaSlice<u8>, CudaSlice<f32>, CudaSlice<f32>),
    /// The weight buffer and weights epoch the copy was made from.
    from: (u64, u64),
    gemm: Option<Fp8Gemm>,
}

impl MatMulState {
    /// The buffers of a weight of `len` elements on `fk`'s GPU, `x_scale` written into its own.
    fn new(fk: Arc<Fp8Kernels>, len: usize, x_scale: f32) -> Result<Self, GpuError> {
        let mut xs = fk.alloc::<f32>(1)?;
        let s = fk.ctx.default_stream();
        s.memcpy_htod(&[x_scale], &mut xs)?;
        s.synchronize()?;
        let (w8, ws, amax) = (fk.alloc::<u8>(len)?, fk.alloc::<f32>(1)?, fk.alloc::<f32>(1)?);
        let ptrs = [
            xs.device_ptr(&s).0,
            w8.device_ptr(&s).0,
            ws.device_ptr(&s).0,
            amax.device_ptr(&s).0,
        ];
        s.synchronize()?;
        Ok(MatMulState {
            fk,
            ptrs,
            bufs: (xs, w8, ws, amax),
            from: (0, 0),
            gemm: None,
        })
    }
}

impl Drop for MatMulKernel {
    fn drop(&mut self) {
        if let Some(st) = &self.state {
            copies().retain(|c| c.w8 != st.ptrs[1]);
        }
    }
}

impl Kernel for MatMulKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let x = ctx
            .input(0)?
            .ok_or_else(|| ort_err("Fp8MatMul: no X8"))?
            .downcast::<DynTensorValueType>()?;
        let w = ctx
            .input(1)?
            .ok_or_else(|| ort_err("Fp8MatMul: no W"))?
            .downcast::<DynTensorValueType>()?;
        let xs: Vec<i64> = x.shape().to_vec();
        let ws: Vec<i64> = w.shape().to_vec();
        if ws.len() != 2 || xs.is_empty() || xs[xs.len() - 1] != ws[1] {
            return Err(ort_err(format!("Fp8MatMul: X {xs:?} · W {ws:?}ᵀ do not fit")));
        }
        let (n, k) = (ws[0] as usize, ws[1] as usize);
        let m: usize = xs[..xs.len() - 1].iter().map(|&d| d as usize).product();
        let (xp, wp) = (x.data_ptr() as u64, w.data_ptr() as u64);
        let stream = stream_of(ctx)?;
        let mut out_shape = xs.clone();
        let last = out_shape.len() - 1;
        out_shape[last] = n as i64;
        let mut y = ctx
            .output(0, out_shape)?
            .ok_or_else(|| ort_err("Fp8MatMul: no output"))?
            .downcast::<DynTensorValueType>()?;
        let yp = y.data_ptr_mut() as u64;
        let st = match self.state {
            Some(ref mut st) => st,
            None => {
                // the first run of a session: never one being captured into a CUDA graph
                let fk = KERNELS.get(device_of(wp)?).map_err(ort_err)?;
                self.state
                    .insert(MatMulState::new(fk, n * k, self.x_scale).map_err(ort_err)?)
            }
        };
        let [xs_p, w8_p, ws_p, amax_p] = st.ptrs;
        if st.bufs.1.len() != n * k {
            return Err(ort_err(format!("Fp8MatMul: the weight changed shape to {ws:?}")));
        }
        let epoch = EPOCH.load(Ordering::Relaxed);
        if st.from != (wp, epoch) {
            // SAFETY: W is ONNX Runtime's input of n·k fp16 values; the copy is this node's
            unsafe { st.fk.quantize_weight(stream, wp, n * k, amax_p, w8_p, ws_p) }.map_err(ort_err)?;
            let ordinal = st.fk.ctx.ordinal();
            let mut all = copies();
            all.retain(|c| c.w8 != w8_p);
            all.push(Copy8 {
                ordinal,
                src: wp,
                len: n * k,
                w8: w8_p,
                scale: ws_p,
                amax: amax_p,
            });
            st.from = (wp, epoch);
        }
        if m == 0 {
            return Ok(());
        }
        let gemm = match st.gemm {
            Some(ref g) if g.shape() == (m, n, k) => g,
            _ => st.gemm.insert(Fp8Gemm::plan(&st.fk, m, n, k).map_err(ort_err)?),
        };
        // SAFETY: X8 is m·k bytes, Y m·n fp16 (ONNX Runtime's buffers), the copy and scales this
        // node's; all on ONNX Runtime's stream
        unsafe { gemm.run(&st.fk, stream, xp, w8_p, yp, xs_p, ws_p) }.map_err(ort_err)
    }
}

/// `domain` with the fp8 operators added (the `katz` domain: crate::ops).
pub(crate) fn add_operators(domain: OperatorDomain) -> ort::Result<OperatorDomain> {
    domain.add(Quantize)?.add(MatMul)?.add(Geglu)?.add(LayerNorm)
}
