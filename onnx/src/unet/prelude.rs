//! The prelude of a step graph (`unet.prelude` in a base bundle's manifest, `prelude` in a
//! ControlNet's; made at export by `tools/job_prelude.py`): what the step graphs would compute
//! from the job's constants alone, run once per job (and, for the UNet, again after each LoRA
//! switch) instead of at every step. A ControlNet's image is one of its job's constants: its
//! embedding convolutions move into the prelude too.
//!
//! ```text
//! conditioning (embeds, pooled, time_ids) ─┐
//! weights (pristine, merged, or the slot) ─┴─▶ unet_prelude ─▶ job.unet_encoder.<t> …  ─▶ the encoder's inputs
//!                                                              job.unet_decoder.<t> …  ─▶ the decoder's inputs
//! ```
//!
//! The cross-attention keys and values of the text tokens (two GEMMs per transformer block) and
//! SDXL's added embedding are such tensors. The step graphs take them as inputs named
//! `job.<graph>.<tensor>`, which is how each output finds its graph ([`graph_of`]).
//! On the host the outputs are host values ([`run_host`]); on a GPU they stay on the device
//! ([`run_device`]) and are bound in place, or copied into a CUDA graph's lasting buffers.

use std::borrow::Cow;

use katz_kernels::cuda::GpuKernels;
use ort::memory::MemoryInfo;
use ort::session::{IoBinding, Session, SessionInputValue};
use ort::value::{DynTensorValueType, DynValue, TensorElementType};

use crate::device::gpu_err;
use crate::tensor::Tensor;
use crate::text::Conditioning;
use crate::weights::{DevBuf, MergedWeights, Weights};
use crate::{Error, Result};

/// The prefix of a step graph input that the prelude makes.
pub(crate) const PREFIX: &str = "job.";

/// The step graph (`unet_encoder`, `unet_decoder`) that prelude output `name` feeds.
pub(crate) fn graph_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix(PREFIX)?;
    ["unet_encoder", "unet_decoder", "controlnet"]
        .into_iter()
        .find(|g| rest.strip_prefix(g).is_some_and(|r| r.starts_with('.')))
}

/// The inputs of `session` that a prelude makes.
pub(crate) fn job_inputs(session: &Session) -> Vec<String> {
    session
        .inputs()
        .iter()
        .map(|o| o.name().to_string())
        .filter(|n| n.starts_with(PREFIX))
        .collect()
}

/// A zeroed lasting buffer of `n` elements on `k`'s GPU for a prelude output of type `ty`
/// (f16 or f32), which a CUDA graph reads in place.
pub(crate) fn lasting(k: &GpuKernels, ty: TensorElementType, n: usize, name: &str) -> Result<DevBuf> {
    let n = n.max(1);
    Ok(match ty {
        TensorElementType::Float16 => DevBuf::F16(k.stream.alloc_zeros::<u16>(n).map_err(gpu_err)?),
        TensorElementType::Float32 => DevBuf::F32(k.stream.alloc_zeros::<f32>(n).map_err(gpu_err)?),
        other => {
            return Err(Error::Gpu(format!(
                "the prelude's {name} is {other:?}; f16 or f32 expected"
            )))
        }
    })
}

/// Copies the prelude's outputs `consts` into the lasting buffers `bufs` (by name), queued on
/// `k`'s stream: synchronise `k` before `consts` is dropped or the buffers are read.
pub(crate) fn copy_into<'a>(
    k: &GpuKernels,
    consts: &JobConsts,
    bufs: impl IntoIterator<Item = (&'a str, &'a DevBuf)>,
) -> Result<()> {
    for (name, dst) in bufs {
        let v = consts
            .values
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| Error::Gpu(format!("the prelude gave no {name}")))?;
        let (src, bytes) = raw(v)?;
        if bytes != dst.bytes() {
            return Err(Error::Gpu(format!(
                "the prelude's {name} has {bytes} bytes, the CUDA graph's buffer {}",
                dst.bytes()
            )));
        }
        // SAFETY: sizes checked; the caller keeps `consts` alive until `k` synchronises
        unsafe { k.copy_raw(dst.ptr(k), src, bytes) }.map_err(gpu_err)?;
    }
    Ok(())
}

/// The prelude's outputs for one job and weight set: (input name, value) of each.
pub(crate) struct JobConsts {
    pub values: Vec<(String, DynValue)>,
    /// [`MergedWeights::id`] of the weights they were made with.
    pub merged: u64,
}

impl JobConsts {
    /// The values that `graph` takes.
    pub(crate) fn of<'a>(&'a self, graph: &'a str) -> impl Iterator<Item = (&'a str, &'a DynValue)> + 'a {
        self.values
            .iter()
            .filter(move |(n, _)| graph_of(n) == Some(graph))
            .map(|(n, v)| (n.as_str(), v))
    }
}

/// What a job gives a prelude besides weights: the conditioning, and a ControlNet's image.
#[derive(Clone, Copy)]
pub(crate) struct JobInputs<'a> {
    pub cond: &'a Conditioning,
    /// `controlnet_cond` (ControlNet preludes).
    pub image: Option<&'a Tensor>,
}

impl<'a> JobInputs<'a> {
    pub(crate) fn of(cond: &'a Conditioning) -> Self {
        JobInputs { cond, image: None }
    }

    /// The tensor a prelude input names, if it is not a weight.
    pub(crate) fn get(&self, name: &str) -> Option<&'a Tensor> {
        match name {
            "encoder_hidden_states" => Some(&self.cond.prompt_embeds),
            "text_embeds" => Some(&self.cond.pooled),
            "time_ids" => Some(&self.cond.time_ids),
            "controlnet_cond" => self.image,
            _ => None,
        }
    }
}

/// The outputs of a run as owned values (they no longer borrow the session).
fn collect(mut out: ort::session::SessionOutputs<'_>) -> Result<Vec<(String, DynValue)>> {
    let names: Vec<String> = out.keys().map(String::from).collect();
    names
        .into_iter()
        .map(|n| {
            let v = out
                .remove(n.as_str())
                .ok_or_else(|| Error::Gpu(format!("the UNet prelude gave no {n}")))?;
            Ok((n, v))
        })
        .collect()
}

/// Runs the prelude on the host: every input from `cond` or the weights (`merged` over the
/// pristine `weights`).
pub(crate) fn run_host(
    session: &mut Session,
    weights: Option<&Weights>,
    job: JobInputs<'_>,
    merged: &MergedWeights,
) -> Result<JobConsts> {
    let names: Vec<String> = session.inputs().iter().map(|o| o.name().to_string()).collect();
    let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = Vec::with_capacity(names.len());
    for name in &names {
        let v: SessionInputValue<'_> = match (job.get(name), weights) {
            (Some(t), _) => t.view()?.into(),
            (None, Some(w)) => merged.get(w, name)?.into(),
            (None, None) => {
                return Err(Error::Gpu(format!(
                    "the prelude reads {name}, which is no weight here"
                )))
            }
        };
        inputs.push((Cow::Owned(name.clone()), v));
    }
    let values = collect(session.run(inputs)?)?;
    Ok(JobConsts {
        values,
        merged: merged.id(),
    })
}

/// Runs the prelude on GPU `device` with IoBinding: `bind` binds its inputs (conditioning and
/// weights, by name); the outputs stay in device memory.
pub(crate) fn run_device(
    session: &mut Session,
    device: i32,
    merged: u64,
    bind: impl FnOnce(&mut IoBinding, &[String]) -> Result<()>,
) -> Result<JobConsts> {
    let mem: MemoryInfo<'static> = crate::device::cuda_memory(device)?;
    let mut b = session.create_binding()?;
    let names: Vec<String> = session.inputs().iter().map(|o| o.name().to_string()).collect();
    bind(&mut b, &names)?;
    for o in session.outputs() {
        b.bind_output_to_device(o.name(), &mem)?;
    }
    let out = session.run_binding(&b)?;
    b.synchronize_outputs()?;
    let values = collect(out)?;
    Ok(JobConsts { values, merged })
}

/// Binds a job's conditioning (host tensors: ONNX Runtime copies them up) and weights (`merged`
/// over `weights`, in place) as the prelude's inputs `names`.
pub(crate) fn bind_job_inputs(
    b: &mut IoBinding,
    names: &[String],
    weights: Option<&Weights>,
    job: JobInputs<'_>,
    merged: &MergedWeights,
) -> Result<()> {
    for name in names {
        match (job.get(name), weights) {
            (Some(t), _) => b.bind_input(name.as_str(), &*t.view()?)?,
            (None, Some(w)) => w.bind_input(b, name, merged)?,
            (None, None) => {
                return Err(Error::Gpu(format!(
                    "the prelude reads {name}, which is no weight here"
                )))
            }
        }
    }
    Ok(())
}

/// The device address and byte length of a tensor value.
pub(crate) fn raw(v: &DynValue) -> Result<(u64, usize)> {
    let t = v.downcast_ref::<DynTensorValueType>()?;
    let n: usize = t.shape().iter().map(|&d| d.max(0) as usize).product();
    let size = match *t.data_type() {
        TensorElementType::Float16 | TensorElementType::Bfloat16 => 2,
        TensorElementType::Float32 | TensorElementType::Int32 => 4,
        TensorElementType::Int64 | TensorElementType::Float64 => 8,
        other => return Err(Error::Gpu(format!("a UNet prelude output of {other:?}"))),
    };
    Ok((t.data_ptr() as u64, n * size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_output_finds_its_graph_by_name() {
        assert_eq!(
            graph_of("job.unet_encoder./down/attn2/to_k/MatMul_output_0"),
            Some("unet_encoder")
        );
        assert_eq!(graph_of("job.unet_decoder.x"), Some("unet_decoder"));
        assert_eq!(
            graph_of("job.controlnet./cn/conv_out/Conv_output_0"),
            Some("controlnet")
        );
        assert_eq!(graph_of("job.unet_decoderx"), None);
        assert_eq!(graph_of("encoder_hidden_states"), None);
    }
}
