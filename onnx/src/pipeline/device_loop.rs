//! The denoising loop on one GPU, device-resident:
//!
//! ```text
//! latents ─scale──▶ latent_in ─┬─▶ UNet encoder ─▶ emb, mid, skips ──┐        (in place, bound)
//!  (device)       (bound once) └─▶ ControlNet sessions ─▶ residuals ─┴─ axpy ─▶ UNet decoder
//!     ▲                                                                           │ noise_pred
//!     └──────────── euler ◀── guided ◀── combine ◀────────────────────────────────┘
//! ```
//!
//! The host uploads the initial latents and downloads the final ones; per step only the
//! timestep goes up. ControlNet sessions without a device path get the latent downloaded and
//! their residuals uploaded; residuals on another GPU come over by peer copy. Schedulers other
//! than plain Euler step on the host (one download and upload per step).

use std::sync::Arc;
use std::time::Instant;

use katz_kernels::cuda::GpuKernels;
use ort::session::Session;

use crate::controlnet::ControlSession;
use crate::device::{at, current, gpu_err, DevRef, DevTensor};
use crate::scheduler::{NoiseSource, Scheduler};
use crate::tensor::Tensor;
use crate::unet::{GraphedUnet, JobUnet};
use crate::weights::Weights;
use crate::{Error, Result};

use super::job::Job;
use super::timings::StepPath;

/// What the device loop borrows of the pipeline: the UNet pair of one GPU and its kernels.
pub(super) struct GpuParts<'p> {
    pub unet_encoder: &'p mut Session,
    pub unet_decoder: &'p mut Session,
    /// The pair's prelude, where its graphs take the prelude's outputs.
    pub unet_prelude: Option<&'p mut Session>,
    pub weights: &'p Weights,
    pub graph: Option<&'p mut GraphedUnet>,
    pub k: Arc<GpuKernels>,
    pub skips: usize,
}

/// Runs every step of `job` on `p`'s GPU from the host latents; the final latents, downloaded.
pub(super) fn run(p: GpuParts<'_>, job: &mut Job<'_, '_>, host_latents: Tensor) -> Result<Tensor> {
    let GpuParts {
        unet_encoder,
        unet_decoder,
        mut unet_prelude,
        weights,
        graph,
        k,
        skips,
    } = p;
    let req = job.req;
    let dev = k.ordinal();
    let cfg = req.guided();
    let b = if cfg { 2 } else { 1 };
    let mut in_shape = host_latents.shape.clone();
    in_shape[0] = b;
    let mut latents = DevTensor::upload(&k, &host_latents)?;
    let mut guided = DevTensor::zeros(&k, host_latents.shape.clone())?;
    let g = gpu_err;

    current(&k)?;
    let mut unet = JobUnet::open(
        graph,
        (unet_encoder, unet_decoder),
        unet_prelude.as_deref_mut(),
        weights,
        skips,
        job.cond,
        (&job.merged, weights),
        &k,
        in_shape,
    )?;
    // residuals from the host or from another GPU land here before they are added
    let mut staging: Vec<Option<DevTensor>> = (0..=skips).map(|_| None).collect();
    let empty = Tensor::new(vec![0], vec![]);
    let timesteps = job.sched.timesteps().to_vec();

    for (i, &ts) in timesteps.iter().enumerate() {
        let _step = tracing::debug_span!("step", i, t = ts).entered();
        if let Some(m) = job.poll_lora(i)? {
            current(&k)?;
            unet.switch_weights(weights, &m, weights, unet_prelude.as_deref_mut())?;
        }
        let t0 = Instant::now();
        k.scale(
            &latents.buf,
            job.sched.input_scale(i),
            &mut unet.sample_mut().buf,
            b,
        )
        .map_err(g)?;
        k.synchronize().map_err(g)?;
        let timestep = Tensor::new(vec![b], vec![ts; b]);
        job.t.scheduler += t0.elapsed();

        let active = req.active_controlnets(i);
        let t0 = Instant::now();
        send_step(job.sessions, &active, i, unet.sample(), &k, &timestep)?;
        job.t.controlnet += t0.elapsed();

        let t0 = Instant::now();
        let targets = unet.encode(unet_encoder, ts)?;
        let encoder_end = Instant::now();
        job.t.unet_encoder += encoder_end - t0;

        let t0 = Instant::now();
        if !active.is_empty() {
            let mut path = StepPath::default();
            // residual r < skips goes to skip r, the last to mid
            for &j in &active {
                let c = &req.controlnets[j];
                let res = recv_residuals(&mut job.sessions[j], i, j, &mut staging, &k)?;
                path.note(j, job.sessions[j].last_span());
                let who = format!("ControlNet #{j}");
                for (r, rr) in res.iter().enumerate() {
                    let target = if r < skips { &targets[2 + r] } else { &targets[1] };
                    add_residual(&who, target, rr, c.scale, &k, dev, &mut staging[r])
                        .map_err(|e| at(&who, e))?;
                }
            }
            k.synchronize().map_err(g)?;
            path.finish(job.t, encoder_end, Instant::now());
        }
        job.t.controlnet += t0.elapsed();

        let t0 = Instant::now();
        let pred = unet.decode(unet_decoder)?;
        job.t.unet_decoder += t0.elapsed();

        let t0 = Instant::now();
        if pred.len() != b * guided.len() {
            return Err(Error::Gpu(format!(
                "noise_pred {:?} for latents {:?}",
                pred.shape, guided.shape
            )));
        }
        // SAFETY: the prediction stays alive (until `end_step`) past the synchronise below
        unsafe {
            if cfg {
                k.combine_raw(pred.ptr, req.guidance, &mut guided.buf)
                    .map_err(g)?;
            } else {
                k.copy_raw(guided.ptr(&k), pred.ptr, guided.len() * 4)
                    .map_err(g)?;
            }
        }
        scheduler_step(job.sched, i, &k, &mut latents, &guided, job.noise)?;
        k.synchronize().map_err(g)?;
        unet.end_step();
        job.t.scheduler += t0.elapsed();
        if job.obs.wants_latents(i) {
            let host = latents.download(&k)?;
            job.stepped(i, &host)?;
        } else {
            job.stepped(i, &empty)?;
        }
    }
    drop(unet);
    latents.download(&k)
}

/// Hands step `i`'s scaled latent to the active sessions: in device memory where a session has a
/// device path, else downloaded once and sent from the host.
pub(super) fn send_step(
    sessions: &mut [Box<dyn ControlSession>],
    active: &[usize],
    i: usize,
    latent_in: &DevTensor,
    k: &GpuKernels,
    timestep: &Tensor,
) -> Result<()> {
    let latent_ref = latent_in.dev_ref(k);
    let mut host_in: Option<Tensor> = None;
    for &j in active {
        let s = sessions
            .get_mut(j)
            .ok_or_else(|| Error::InvalidRequest(format!("ControlNet #{j} has no session")))?;
        if s.on_device() {
            s.send_device(i, &latent_ref, timestep)?;
            continue;
        }
        let host = match host_in.take() {
            Some(h) => h,
            None => latent_in.download(k)?,
        };
        s.send(i, &host, timestep)?;
        host_in = Some(host);
    }
    Ok(())
}

/// Adds `scale · residual` into `target` (an encoder output on `k`'s GPU, `device`), copying the
/// residual into `slot` first when it lives on another GPU; `who` names the ControlNet in errors.
pub(super) fn add_residual(
    who: &str,
    target: &DevRef,
    residual: &DevRef,
    scale: f32,
    k: &GpuKernels,
    device: usize,
    slot: &mut Option<DevTensor>,
) -> Result<()> {
    if residual.shape != target.shape {
        return Err(Error::InvalidRequest(format!(
            "{who}: residual {:?} does not fit {:?}",
            residual.shape, target.shape
        )));
    }
    let src = if residual.device == device {
        residual.ptr
    } else {
        let st = stage(slot, k, &residual.shape)?;
        let p = st.ptr(k);
        // SAFETY: both hold `len` f32; the session keeps its buffer until its next step
        unsafe { k.copy_raw(p, residual.ptr, residual.len() * 4) }.map_err(gpu_err)?;
        p
    };
    // SAFETY: the target is the encoder's live output; nothing else writes it until the decoder
    unsafe { k.axpy_raw(target.ptr, src, scale, residual.len()) }.map_err(gpu_err)
}

/// Step `i`'s residuals of session `j` in device memory (host residuals are uploaded into
/// `staging` on `k`'s GPU): one per skip, then mid.
pub(super) fn recv_residuals(
    s: &mut Box<dyn ControlSession>,
    i: usize,
    j: usize,
    staging: &mut [Option<DevTensor>],
    k: &GpuKernels,
) -> Result<Vec<DevRef>> {
    let count = |n: usize| -> Result<()> {
        if n == staging.len() {
            return Ok(());
        }
        Err(Error::InvalidRequest(format!(
            "ControlNet #{j} returned {n} residuals, the UNet has {} skips and a mid block",
            staging.len() - 1
        )))
    };
    if s.on_device() {
        let res = s.recv_device(i)?;
        count(res.len())?;
        return Ok(res);
    }
    let host = s.recv(i)?;
    count(host.len())?;
    let mut refs = Vec::with_capacity(host.len());
    for (slot, h) in staging.iter_mut().zip(&host) {
        let st = stage(slot, k, &h.shape)?;
        st.write(k, &h.data)?;
        refs.push(st.dev_ref(k));
    }
    Ok(refs)
}

/// One scheduler step on device latents: the Euler kernel where the scheduler allows, else the
/// host scheduler (one download and one upload).
pub(super) fn scheduler_step(
    sched: &mut dyn Scheduler,
    i: usize,
    k: &GpuKernels,
    latents: &mut DevTensor,
    guided: &DevTensor,
    noise: &mut dyn NoiseSource,
) -> Result<()> {
    match sched.euler_sigmas(i) {
        Some((s0, s1)) => k.euler(&mut latents.buf, &guided.buf, s0, s1).map_err(gpu_err),
        None => {
            let gh = guided.download(k)?;
            let mut lh = latents.download(k)?;
            sched.step(i, &gh.data, &mut lh.data, noise);
            latents.write(k, &lh.data)
        }
    }
}

/// A staging buffer of `shape` on `k`'s GPU (reused while the shape stays).
pub(super) fn stage<'s>(
    slot: &'s mut Option<DevTensor>,
    k: &GpuKernels,
    shape: &[usize],
) -> Result<&'s mut DevTensor> {
    if slot.as_ref().map(|s| s.shape.as_slice()) != Some(shape) {
        *slot = None;
    }
    match slot {
        Some(s) => Ok(s),
        None => Ok(slot.insert(DevTensor::zeros(k, shape.to_vec())?)),
    }
}
