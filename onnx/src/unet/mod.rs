//! The UNet of a job on one GPU, step by step: bound for the job alone, or the pipeline's
//! CUDA-graph bindings.
//!
//! ```text
//! JobUnet::open ─┬─ Graphed: the pipeline's GraphedUnet (captured at load), the job's conditioning
//!                │           and weights copied into its lasting buffers
//!                └─ Bound:   bound::bind_unet for this job (weights bound in place)
//! per step:  sample_mut() ◀─ scale kernel;  encode(t) ─▶ emb, mid, skips (residuals added in place)
//!            decode() ─▶ noise_pred;  end_step() releases the step's outputs
//! at a LoRA switch:  switch_weights(merged)
//! once per job and LoRA switch, where the pair has a prelude: prelude ─▶ job.* inputs
//! ```
//!
//! ## Layout
//! - `mod.rs`: [`JobUnet`], what the device and split loops drive.
//! - `bound.rs`: IoBinding of the UNet pair for one job (`BoundUnet`).
//! - `graphed.rs`: `GraphedUnet`, the UNet pair bound once to lasting buffers and captured as CUDA
//!   graphs when the pipeline loads; `WeightSlot`, the weights those graphs read (one per GPU).
//! - `buckets.rs`: `UnetSet`, a device's UNet pairs by shape bucket (and one of free shapes).
//! - `prelude.rs`: the UNet prelude, what the pair computes from the job's constants alone (the
//!   text tokens' cross-attention keys and values), run once per job and LoRA switch.

pub(crate) mod bound;
pub(crate) mod buckets;
pub(crate) mod graphed;
pub(crate) mod prelude;

use std::collections::HashSet;
use std::sync::Arc;

use katz_kernels::cuda::GpuKernels;
use ort::session::Session;
use ort::value::{DynValue, TensorElementType};

use crate::device::{current, DevRef, DevTensor};
use crate::tensor::Tensor;
use crate::text::Conditioning;
use crate::weights::{MergedWeights, Weights};
use crate::{Error, Result};
use bound::{bind_unet, rebind_weights, run_decoder_bound, run_encoder_bound, BoundUnet};
pub(crate) use buckets::UnetSet;
pub(crate) use graphed::GraphedUnet;

/// The weight inputs the UNet graphs take as f16 (fp16 GPU bundles): they are bound as such.
pub(crate) fn half_inputs(
    sessions: [&Session; 2],
    map: &std::collections::BTreeMap<String, crate::bundle::WeightEntry>,
) -> HashSet<String> {
    sessions
        .iter()
        .flat_map(|s| s.inputs())
        .filter(|o| map.contains_key(o.name()))
        .filter(|o| o.dtype().tensor_type() == Some(TensorElementType::Float16))
        .map(|o| o.name().to_string())
        .collect()
}

/// A job's UNet on one GPU, step by step: bound for this job alone (`Bound`), or the pipeline's
/// CUDA-graph bindings (`Graphed`, graphed.rs), whose buffers outlive the job and whose
/// graphs were captured when the pipeline loaded.
pub(crate) enum JobUnet<'g> {
    Bound(Box<BoundJob>),
    Graphed(&'g mut GraphedUnet),
}

/// [`JobUnet::Bound`]: the graphs bound for one job, its sample buffer, the step's outputs.
pub(crate) struct BoundJob {
    // the binding goes first: it is dropped before the sample buffer it points at
    bu: BoundUnet,
    sample: DevTensor,
    k: Arc<GpuKernels>,
    enc_vals: Vec<DynValue>,
    pred: Option<DynValue>,
    /// A merge copied over from another GPU's set (split guidance), kept while it is bound.
    merged_copy: Option<Arc<MergedWeights>>,
    /// The job's conditioning, for the prelude's runs at LoRA switches (pairs with a prelude).
    cond: Option<Conditioning>,
    /// The prelude's outputs for the weights bound now (bound as the graphs' inputs).
    consts: Option<prelude::JobConsts>,
}

impl BoundJob {
    /// Runs the prelude for the weights `merged` (over `own`) and binds its outputs; nothing to
    /// do without a prelude.
    fn set_job_consts(
        &mut self,
        prelude: Option<&mut Session>,
        own: &Weights,
        merged: &MergedWeights,
    ) -> Result<()> {
        let Some(session) = prelude else {
            return Ok(());
        };
        let device = self.k.ordinal() as i32;
        let cond = self
            .cond
            .as_ref()
            .ok_or_else(|| Error::Gpu("the job kept no conditioning for the UNet prelude".into()))?;
        let consts = prelude::run_device(session, device, merged.id(), |b, names| {
            prelude::bind_job_inputs(b, names, Some(own), prelude::JobInputs::of(cond), merged)
        })?;
        for (graph, b) in [
            ("unet_encoder", &mut self.bu.enc),
            ("unet_decoder", &mut self.bu.dec),
        ] {
            for (name, v) in consts.of(graph) {
                b.bind_input(name, v)?;
            }
        }
        self.consts = Some(consts);
        Ok(())
    }
}

impl<'g> JobUnet<'g> {
    /// The UNet pair `sessions` on `k`'s GPU for a job: the pipeline's `graph` when it has one
    /// (the job's conditioning and weights copied in), else bound for this job. `own` is this
    /// GPU's pristine set; `merged.0` was merged from `merged.1` (this set, or another GPU's).
    /// `prelude`: the pair's prelude session, where its graphs take the prelude's outputs.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        graph: Option<&'g mut GraphedUnet>,
        sessions: (&Session, &Session),
        mut prelude: Option<&mut Session>,
        own: &Weights,
        skips: usize,
        cond: &Conditioning,
        merged: (&MergedWeights, &Weights),
        k: &Arc<GpuKernels>,
        sample_shape: Vec<usize>,
    ) -> Result<Self> {
        if let Some(g) = graph {
            if g.sample.shape != sample_shape {
                return Err(Error::InvalidRequest(format!(
                    "the CUDA graph was captured for a latent of {:?}, this job needs {:?}",
                    g.sample.shape, sample_shape
                )));
            }
            g.set_conditioning(cond)?;
            g.set_weights(own, merged.0, merged.1)?;
            g.set_job_consts(prelude, own)?;
            return Ok(JobUnet::Graphed(g));
        }
        let bu = bind_unet(
            sessions.0,
            sessions.1,
            own,
            skips,
            cond,
            &MergedWeights::default(),
            k.ordinal() as i32,
        )?;
        let mut unet = JobUnet::Bound(Box::new(BoundJob {
            bu,
            sample: DevTensor::zeros(k, sample_shape)?,
            k: k.clone(),
            enc_vals: Vec::new(),
            pred: None,
            merged_copy: None,
            cond: prelude.is_some().then(|| cond.clone()),
            consts: None,
        }));
        if !merged.0.is_empty() {
            unet.switch_weights(own, merged.0, merged.1, prelude.as_deref_mut())?;
        } else if let JobUnet::Bound(j) = &mut unet {
            j.set_job_consts(prelude, own, merged.0)?;
        }
        Ok(unet)
    }

    pub(crate) fn sample(&self) -> &DevTensor {
        match self {
            JobUnet::Bound(j) => &j.sample,
            JobUnet::Graphed(g) => &g.sample,
        }
    }

    pub(crate) fn sample_mut(&mut self) -> &mut DevTensor {
        match self {
            JobUnet::Bound(j) => &mut j.sample,
            JobUnet::Graphed(g) => &mut g.sample,
        }
    }

    /// Switches to `merged` (made from `merged_on`'s weights) at a step boundary, and runs the
    /// prelude (`prelude`, where the graphs take its outputs) on them.
    pub(crate) fn switch_weights(
        &mut self,
        own: &Weights,
        merged: &MergedWeights,
        merged_on: &Weights,
        prelude: Option<&mut Session>,
    ) -> Result<()> {
        match self {
            JobUnet::Graphed(g) => {
                g.set_weights(own, merged, merged_on)?;
                g.set_job_consts(prelude, own)
            }
            JobUnet::Bound(j) if std::ptr::eq(own, merged_on) => {
                rebind_weights(own, &mut j.bu, merged)?;
                j.set_job_consts(prelude, own, merged)
            }
            JobUnet::Bound(j) => {
                let copy = Arc::new(own.copy_merged_from(merged, merged_on)?);
                rebind_weights(own, &mut j.bu, &copy)?;
                j.set_job_consts(prelude, own, &copy)?;
                j.merged_copy = Some(copy);
                Ok(())
            }
        }
    }

    /// Runs the encoder on the sample at timestep `t`: the addresses of `emb`, `mid`, skips, valid
    /// until [`JobUnet::end_step`] (ControlNet residuals are added to them in place).
    pub(crate) fn encode(&mut self, session: &mut Session, t: f32) -> Result<Vec<DevRef>> {
        match self {
            JobUnet::Graphed(g) => {
                current(g.kernels())?;
                Ok(g.encode(session, t)?.to_vec())
            }
            JobUnet::Bound(j) => {
                current(&j.k)?;
                let b = j.sample.shape[0];
                let timestep = Tensor::new(vec![b], vec![t; b]);
                // bound again every step: were ONNX Runtime to copy an input at bind time (a
                // consumer on the CPU), the copy must be of this step's latent
                let r = j.sample.dev_ref(&j.k);
                // SAFETY: the sample buffer outlives the binding (BoundJob's field order)
                let v = unsafe { r.ort()? };
                j.bu.enc.bind_input("sample", &*v)?;
                j.bu.enc.bind_input("timestep", &*timestep.view()?)?;
                j.enc_vals = run_encoder_bound(session, &j.bu)?;
                let dev = j.k.ordinal();
                j.enc_vals.iter().map(|v| DevRef::of_value(v, dev)).collect()
            }
        }
    }

    /// Runs the decoder on the encoder's outputs: the noise prediction's address, valid until
    /// [`JobUnet::end_step`].
    pub(crate) fn decode(&mut self, session: &mut Session) -> Result<DevRef> {
        match self {
            JobUnet::Graphed(g) => {
                current(g.kernels())?;
                Ok(g.decode(session)?.clone())
            }
            JobUnet::Bound(j) => {
                current(&j.k)?;
                for (name, v) in j.bu.enc_outputs.iter().zip(&j.enc_vals) {
                    j.bu.dec.bind_input(name.as_str(), v)?;
                }
                let p = run_decoder_bound(session, &j.bu)?;
                let r = DevRef::of_value(&p, j.k.ordinal())?;
                j.pred = Some(p);
                Ok(r)
            }
        }
    }

    /// Releases the step's outputs (after the stream that read them was synchronised).
    pub(crate) fn end_step(&mut self) {
        if let JobUnet::Bound(j) = self {
            j.enc_vals.clear();
            j.pred = None;
        }
    }
}
