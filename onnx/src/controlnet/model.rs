//! A ControlNet model in-process: `(latent, t, embeddings, image) → 9 down residuals + 1 mid`,
//! on the host ([`ControlNet::residuals`]) or bound to a job on its GPU ([`ControlNet::bind`],
//! [`ControlNet::run_bound`]: the step's latent read in place or copied over from the
//! pipeline's GPU, residuals left in device memory).
//!
//! Residuals leave unscaled; the pipeline adds `scale · residual` to the UNet skips (diffusers'
//! MultiControlNet: a sum of scaled residuals, each ControlNet active between its start and end).

use std::sync::Arc;

use ort::session::{IoBinding, Session};
use ort::value::DynValue;

use katz_kernels::cuda::GpuKernels;

use crate::bundle::{check_compute, check_io, BaseBundle, ControlNetBundle};
use crate::device::{kernels_for, DevRef, DevTensor};
use crate::runtime::{self, SessionOptions};
use crate::tensor::Tensor;
use crate::text::Conditioning;
use crate::{Error, Result};

pub struct ControlNet {
    pub bundle: ControlNetBundle,
    session: Session,
    outputs: Vec<String>,
    /// Step kernels (copies across GPUs) on this ControlNet's GPU, when it runs on one.
    kernels: Option<Arc<GpuKernels>>,
}

/// A ControlNet bound to one job on its GPU: conditioning and image go up once; each step's
/// latent is read in place (or copied from the pipeline's GPU), residuals stay on the device.
pub struct BoundControlNet {
    binding: IoBinding,
    kernels: Arc<GpuKernels>,
    /// The step's latent, when the pipeline runs on another GPU.
    sample: Option<DevTensor>,
    /// The last step's residuals (ONNX Runtime's buffers, kept alive until the next step).
    held: Vec<DynValue>,
}

impl ControlNet {
    /// Loads a ControlNet for the guidance batch (2; fixed to the only shape bucket when other
    /// sizes are refused, else free shapes).
    pub fn load(bundle: ControlNetBundle, base: &BaseBundle, opts: &SessionOptions) -> Result<Self> {
        Self::load_batch(bundle, base, opts, 2)
    }

    /// [`ControlNet::load`] for a batch of `batch` (1: one guidance half per ControlNet, the
    /// paper's placement; `Placement`'s `ControlNetPlace::Halves`).
    pub fn load_batch(
        bundle: ControlNetBundle,
        base: &BaseBundle,
        opts: &SessionOptions,
        batch: usize,
    ) -> Result<Self> {
        bundle.check_fits(base)?;
        check_compute(&bundle.dir, &bundle.manifest.compute, opts.device)?;
        let path = bundle.dir.join(&bundle.manifest.graph);
        let dims = match opts.only_shape() {
            Some(f) => crate::shapes::controlnet_dims(base.manifest.vae_scale_factor, f, batch),
            None => vec![],
        };
        let session = runtime::session_with_dims(&path, opts, &dims)?;
        let mut outputs: Vec<String> = (0..bundle.manifest.residuals)
            .map(|i| format!("down_{i}"))
            .collect();
        outputs.push("mid".into());
        let inputs: Vec<String> = [
            "sample",
            "timestep",
            "encoder_hidden_states",
            "text_embeds",
            "time_ids",
            "controlnet_cond",
        ]
        .map(String::from)
        .to_vec();
        check_io(&path, &session, &inputs, &outputs)?;
        let kernels = match opts.device.gpu() {
            Some(id) => Some(kernels_for(id as usize)?),
            None => None,
        };
        Ok(ControlNet {
            bundle,
            session,
            outputs,
            kernels,
        })
    }

    /// The GPU this ControlNet runs on (`None`: the CPU).
    pub fn gpu(&self) -> Option<usize> {
        self.kernels.as_ref().map(|k| k.ordinal())
    }

    /// Binds this ControlNet for one job on its GPU (conditioning and image copied up once).
    pub fn bind(&mut self, cond: &Conditioning, image: &Tensor) -> Result<BoundControlNet> {
        let kernels = self
            .kernels
            .clone()
            .ok_or_else(|| Error::Gpu(format!("ControlNet {} does not run on a GPU", self.name())))?;
        let dev = crate::device::cuda_memory(kernels.ordinal() as i32)?;
        // ONNX Runtime copies host inputs with the current device: make it this ControlNet's
        kernels.ctx.bind_to_thread().map_err(crate::device::gpu_err)?;
        let mut binding = self.session.create_binding()?;
        binding.bind_input("encoder_hidden_states", &*cond.prompt_embeds.view()?)?;
        binding.bind_input("text_embeds", &*cond.pooled.view()?)?;
        binding.bind_input("time_ids", &*cond.time_ids.view()?)?;
        binding.bind_input("controlnet_cond", &*image.view()?)?;
        for o in &self.outputs {
            binding.bind_output_to_device(o.as_str(), &dev)?;
        }
        Ok(BoundControlNet {
            binding,
            kernels,
            sample: None,
            held: Vec::new(),
        })
    }

    /// One step on a bound job: residuals in this ControlNet's GPU memory (down in skip order,
    /// then mid), valid until the next step of `b`. `latent_in` may live on another GPU of
    /// this process; it must not change until this returns.
    pub fn run_bound(
        &mut self,
        b: &mut BoundControlNet,
        latent_in: &DevRef,
        timestep: &Tensor,
    ) -> Result<Vec<DevRef>> {
        let k = b.kernels.clone();
        let here = k.ordinal();
        let sample = if latent_in.device == here {
            latent_in.clone()
        } else {
            if b.sample.as_ref().map(|s| &s.shape) != Some(&latent_in.shape) {
                b.sample = Some(DevTensor::zeros(&k, latent_in.shape.clone())?);
            }
            let Some(s) = b.sample.as_ref() else {
                return Err(Error::Gpu("no staging buffer for the latent".into()));
            };
            let dst = s.ptr(&k);
            // SAFETY: both buffers hold `len` f32; the source is not written until we return
            unsafe { k.copy_raw(dst, latent_in.ptr, latent_in.len() * 4) }.map_err(crate::device::gpu_err)?;
            k.synchronize().map_err(crate::device::gpu_err)?;
            s.dev_ref(&k)
        };
        k.ctx.bind_to_thread().map_err(crate::device::gpu_err)?;
        // SAFETY: `sample` outlives the run (the caller's buffer or `b.sample`)
        let t = unsafe { sample.ort()? };
        b.binding.bind_input("sample", &*t)?;
        b.binding.bind_input("timestep", &*timestep.view()?)?;
        b.held.clear();
        let mut out = self.session.run_binding(&b.binding)?;
        b.binding.synchronize_outputs()?;
        let mut refs = Vec::with_capacity(self.outputs.len());
        for o in &self.outputs {
            let v = out.remove(o.as_str()).ok_or_else(|| {
                Error::Gpu(format!("ControlNet {}: no output {o}", self.bundle.manifest.name))
            })?;
            refs.push(DevRef::of_value(&v, here)?);
            b.held.push(v);
        }
        Ok(refs)
    }

    pub fn name(&self) -> &str {
        &self.bundle.manifest.name
    }

    /// Down residuals in skip order, then the mid residual.
    pub fn residuals(
        &mut self,
        sample: &Tensor,
        timestep: &Tensor,
        cond: &Conditioning,
        image: &Tensor,
    ) -> Result<Vec<Tensor>> {
        let out = self.session.run(ort::inputs![
            "sample" => sample.view()?,
            "timestep" => timestep.view()?,
            "encoder_hidden_states" => cond.prompt_embeds.view()?,
            "text_embeds" => cond.pooled.view()?,
            "time_ids" => cond.time_ids.view()?,
            "controlnet_cond" => image.view()?,
        ])?;
        self.outputs
            .iter()
            .map(|n| Tensor::from_output(&out, n))
            .collect()
    }
}
