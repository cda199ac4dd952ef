//! The denoising loop on host tensors (the CPU pipeline):
//!
//! ```text
//! latent_in = [latents; latents] · input_scale(i) ─▶ sessions.send (overlap) ─▶ unet_encoder
//!   ─▶ emb, mid, skips += Σ scaleⱼ·residualⱼ (sessions.recv, or the pipeline's ControlNets here)
//!   ─▶ unet_decoder ─▶ guidance combine ─▶ scheduler.step ─▶ latents ─▶ observer
//! ```

use std::borrow::Cow;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use katz_kernels::{guidance, residual};
use ort::session::{Session, SessionInputValue};

use crate::controlnet::{lock, ControlNet, ControlSession, RunSpan};
use crate::request::{ControlModel, ValidRequest};
use crate::shapes::skip_names;
use crate::tensor::Tensor;
use crate::text::Conditioning;
use crate::unet::prelude::{self, JobConsts};
use crate::weights::{MergedWeights, Weights};
use crate::{Error, Result};

use super::job::Job;
use super::timings::StepPath;

/// What the host loop borrows of the pipeline.
pub(super) struct HostParts<'p> {
    pub unet_encoder: &'p mut Session,
    pub unet_decoder: &'p mut Session,
    /// The pair's prelude, where its graphs take the prelude's outputs.
    pub unet_prelude: Option<&'p mut Session>,
    pub weights: &'p Weights,
    pub controlnets: &'p [Arc<Mutex<ControlNet>>],
    pub skips: usize,
}

/// Runs every step of `job` from `latents` (initial noise) on the host; the final latents.
pub(super) fn run(p: &mut HostParts<'_>, job: &mut Job<'_, '_>, mut latents: Tensor) -> Result<Tensor> {
    let req = job.req;
    let cfg = req.guided();
    let b = if cfg { 2 } else { 1 };
    let mut guided = Tensor::zeros(latents.shape.clone());
    let timesteps = job.sched.timesteps().to_vec();
    // the prelude's outputs, made again when the job's weights change (a LoRA switch)
    let mut consts: Option<JobConsts> = None;
    for (i, &ts) in timesteps.iter().enumerate() {
        let _step = tracing::debug_span!("step", i, t = ts).entered();
        job.poll_lora(i)?;
        if let Some(session) = p.unet_prelude.as_deref_mut() {
            if consts.as_ref().is_none_or(|c| c.merged != job.merged.id()) {
                let t0 = Instant::now();
                consts = Some(prelude::run_host(
                    session,
                    Some(p.weights),
                    prelude::JobInputs::of(job.cond),
                    &job.merged,
                )?);
                job.t.unet_encoder += t0.elapsed();
            }
        }
        let scale_in = job.sched.input_scale(i);
        let mut latent_in = if cfg {
            Tensor::concat0(&[&latents, &latents])
        } else {
            latents.clone()
        };
        latent_in.data.iter_mut().for_each(|v| *v *= scale_in);
        let timestep = Tensor::new(vec![b], vec![ts; b]);

        let active = req.active_controlnets(i);
        // sessions start on this step's residuals now: they overlap the UNet encoder
        let t0 = Instant::now();
        for &j in &active {
            if let Some(s) = job.sessions.get_mut(j) {
                s.send(i, &latent_in, &timestep)?;
            }
        }
        job.t.controlnet += t0.elapsed();

        let t0 = Instant::now();
        let (emb, mut mid, mut skips) =
            run_encoder(p, &latent_in, &timestep, job.cond, &job.merged, consts.as_ref())?;
        let encoder_end = Instant::now();
        job.t.unet_encoder += encoder_end - t0;
        let t0 = Instant::now();
        let mut sc = StepControl {
            req,
            images: job.images,
            active: &active,
            sessions: job.sessions,
            step: i,
            path: StepPath::default(),
        };
        add_residuals(
            p.controlnets,
            &mut sc,
            &latent_in,
            &timestep,
            job.cond,
            &mut mid,
            &mut skips,
        )?;
        sc.path.finish(job.t, encoder_end, Instant::now());
        job.t.controlnet += t0.elapsed();
        let t0 = Instant::now();
        let pred = run_decoder(p, &emb, job.cond, &mid, &skips, &job.merged, consts.as_ref())?;
        job.t.unet_decoder += t0.elapsed();

        let t0 = Instant::now();
        if cfg {
            guidance::combine(&pred.data, req.guidance, &mut guided.data);
        } else {
            guided.data.copy_from_slice(&pred.data);
        }
        job.sched.step(i, &guided.data, &mut latents.data, job.noise);
        job.t.scheduler += t0.elapsed();
        job.stepped(i, &latents)?;
    }
    Ok(latents)
}

fn run_encoder(
    p: &mut HostParts<'_>,
    latent_in: &Tensor,
    timestep: &Tensor,
    cond: &Conditioning,
    merged: &MergedWeights,
    consts: Option<&JobConsts>,
) -> Result<(Tensor, Tensor, Vec<Tensor>)> {
    let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
        ("sample".into(), latent_in.view()?.into()),
        ("timestep".into(), timestep.view()?.into()),
        ("encoder_hidden_states".into(), cond.prompt_embeds.view()?.into()),
        ("text_embeds".into(), cond.pooled.view()?.into()),
        ("time_ids".into(), cond.time_ids.view()?.into()),
    ];
    for name in p.weights.inputs_of("unet_encoder") {
        inputs.push((Cow::Borrowed(name.as_str()), merged.get(p.weights, name)?.into()));
    }
    for (name, v) in consts.iter().flat_map(|c| c.of("unet_encoder")) {
        inputs.push((Cow::Borrowed(name), v.into()));
    }
    let out = p.unet_encoder.run(inputs)?;
    let emb = Tensor::from_output(&out, "emb")?;
    let mid = Tensor::from_output(&out, "mid")?;
    let skips = skip_names(p.skips)
        .iter()
        .map(|n| Tensor::from_output(&out, n))
        .collect::<Result<Vec<_>>>()?;
    Ok((emb, mid, skips))
}

fn run_decoder(
    p: &mut HostParts<'_>,
    emb: &Tensor,
    cond: &Conditioning,
    mid: &Tensor,
    skips: &[Tensor],
    merged: &MergedWeights,
    consts: Option<&JobConsts>,
) -> Result<Tensor> {
    let names = skip_names(skips.len());
    let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = vec![
        ("emb".into(), emb.view()?.into()),
        ("encoder_hidden_states".into(), cond.prompt_embeds.view()?.into()),
        ("mid".into(), mid.view()?.into()),
    ];
    for (n, s) in names.iter().zip(skips) {
        inputs.push((Cow::Borrowed(n.as_str()), s.view()?.into()));
    }
    for name in p.weights.inputs_of("unet_decoder") {
        inputs.push((Cow::Borrowed(name.as_str()), merged.get(p.weights, name)?.into()));
    }
    for (name, v) in consts.iter().flat_map(|c| c.of("unet_decoder")) {
        inputs.push((Cow::Borrowed(name), v.into()));
    }
    let out = p.unet_decoder.run(inputs)?;
    Tensor::from_output(&out, "noise_pred")
}

/// The ControlNets of one step: which act, and where their residuals come from.
struct StepControl<'a> {
    req: &'a ValidRequest,
    /// Conditioning images, batched like the latents.
    images: &'a [Tensor],
    /// Indices into `req.controlnets` active at this step.
    active: &'a [usize],
    /// Sessions (already sent this step's input), or none: the pipeline's own, serially.
    sessions: &'a mut Vec<Box<dyn ControlSession>>,
    step: usize,
    /// This step's ControlNet runs, for the timings' critical path.
    path: StepPath,
}

/// `skips += Σ scaleⱼ·downⱼ`, `mid += Σ scaleⱼ·midⱼ` over the active ControlNets (diffusers'
/// MultiControlNet sum), on host tensors: from the sessions when there are, else computed here.
fn add_residuals(
    controlnets: &[Arc<Mutex<ControlNet>>],
    sc: &mut StepControl<'_>,
    latent_in: &Tensor,
    timestep: &Tensor,
    cond: &Conditioning,
    mid: &mut Tensor,
    skips: &mut [Tensor],
) -> Result<()> {
    for &j in sc.active {
        let c = &sc.req.controlnets[j];
        let res = match sc.sessions.get_mut(j) {
            Some(s) => {
                let res = s.recv(sc.step)?;
                sc.path.note(j, s.last_span());
                res
            }
            None => {
                let ControlModel::Loaded(m) = c.model else {
                    return Err(Error::InvalidRequest(format!(
                        "ControlNet #{j} is served by a ControlNet service, but none is configured here"
                    )));
                };
                let model = controlnets.get(m.index()).ok_or_else(|| {
                    Error::InvalidRequest(format!("ControlNet #{j} refers to a model that is not loaded"))
                })?;
                let start = Instant::now();
                let res = lock(model).residuals(latent_in, timestep, cond, &sc.images[j])?;
                let end = Instant::now();
                sc.path.note(
                    j,
                    Some(RunSpan {
                        sent: start,
                        start,
                        end,
                    }),
                );
                res
            }
        };
        let (res_mid, res_down) = res
            .split_last()
            .ok_or_else(|| Error::InvalidRequest(format!("ControlNet #{j} returned no residuals")))?;
        if res_down.len() != skips.len() {
            return Err(Error::InvalidRequest(format!(
                "ControlNet #{j} returned {} down residuals, the UNet has {} skips",
                res_down.len(),
                skips.len()
            )));
        }
        for (s, r) in skips.iter_mut().zip(res_down) {
            if s.shape != r.shape {
                return Err(Error::InvalidRequest(format!(
                    "ControlNet #{j}: residual {:?} does not fit the skip {:?}",
                    r.shape, s.shape
                )));
            }
            residual::axpy(&mut s.data, &r.data, c.scale);
        }
        residual::axpy(&mut mid.data, &res_mid.data, c.scale);
    }
    Ok(())
}
