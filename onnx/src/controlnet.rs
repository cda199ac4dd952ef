//! A ControlNet run in-process: `(latent, t, embeddings, image) → 9 down residuals + 1 mid`.
//!
//! Residuals leave unscaled; the pipeline adds `scale · residual` to the UNet skips (diffusers'
//! MultiControlNet: a sum of scaled residuals, each ControlNet active between its start and end).

use ort::session::Session;

use crate::bundle::{check_compute, check_io, BaseBundle, ControlNetBundle};
use crate::runtime::{self, SessionOptions};
use crate::tensor::Tensor;
use crate::text::Conditioning;
use crate::Result;

pub struct ControlNet {
    pub bundle: ControlNetBundle,
    session: Session,
    outputs: Vec<String>,
}

impl ControlNet {
    pub fn load(bundle: ControlNetBundle, base: &BaseBundle, opts: &SessionOptions) -> Result<Self> {
        bundle.check_fits(base)?;
        check_compute(&bundle.dir, &bundle.manifest.compute, opts.device)?;
        let path = bundle.dir.join(&bundle.manifest.graph);
        let session = runtime::session(&path, opts)?;
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
        Ok(ControlNet {
            bundle,
            session,
            outputs,
        })
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
