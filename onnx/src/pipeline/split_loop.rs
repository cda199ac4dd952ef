//! The denoising loop with the guidance halves on two GPUs (latent parallelism):
//!
//! ```text
//! GPU a: latents ─scale─▶ [x_u; x_c] ──x_u────────▶ encoder(x_u) ─┐+res_u  decoder ─▶ ε_u ─┐
//!                              │ x_c (peer copy)     ControlNets ─┤ (batch 2, anywhere)    ├─▶ combine ─▶ euler (once)
//! GPU b:                       └───────────────────▶ encoder(x_c) ─┘+res_c  decoder ─▶ ε_c ─┘ (peer copy)
//! ```
//!
//! Each phase (encoders, decoders) runs on both GPUs at once: GPU b's half on a lasting thread of
//! its own ([`HalfUnet::thread`]). ControlNet sessions take the batch-2 latent as on one GPU and
//! each half of their residuals goes to its GPU; a ControlNet placed per guidance half takes its
//! half's latent and gives its residuals to that half's GPU.

use std::sync::Arc;
use std::time::Instant;

use katz_kernels::cuda::GpuKernels;

use crate::bundle::BaseBundle;
use crate::device::{at, current, gpu_err, DevTensor};
use crate::runtime::{Device, SessionOptions};
use crate::tensor::Tensor;
use crate::text::Conditioning;
use crate::unet::{half_inputs, JobUnet, UnetSet};
use crate::weights::Weights;
use crate::{Error, Result};

use super::device_loop::{add_residual, recv_residuals, scheduler_step, send_step, stage, GpuParts};
use super::job::Job;
use super::timings::StepPath;

/// Runs every step of `job` with the unconditional half on `p`'s GPU and the conditional half
/// on `h`'s; the final latents, downloaded.
pub(super) fn run(
    p: GpuParts<'_>,
    h: &mut HalfUnet,
    job: &mut Job<'_, '_>,
    host_latents: Tensor,
) -> Result<Tensor> {
    let GpuParts {
        unet_encoder,
        unet_decoder,
        mut unet_prelude,
        weights,
        graph,
        k: k0,
        skips,
    } = p;
    let req = job.req;
    let g = gpu_err;
    let HalfUnet {
        device: h_device,
        unets: h_unets,
        weights: h_weights,
        kernels: h_kernels,
        thread: h_thread,
    } = h;
    let hb = h_unets.pick(req.width, req.height, 1)?;
    let k1 = h_kernels.clone();
    let (d0, d1) = (k0.ordinal(), *h_device as usize);
    let lat_shape = host_latents.shape.clone();
    let n = host_latents.data.len();
    let mut in2 = lat_shape.clone();
    in2[0] = 2;
    let mut latents = DevTensor::upload(&k0, &host_latents)?;
    let mut latent_in = DevTensor::zeros(&k0, in2.clone())?; // [x_u; x_c] on GPU a
    let pred2 = DevTensor::zeros(&k0, in2)?; // [ε_u; ε_c] on GPU a
    let mut guided = DevTensor::zeros(&k0, lat_shape.clone())?;
    let (cond_u, cond_c) = (half_cond(job.cond, 0)?, half_cond(job.cond, 1)?);
    current(&k0)?;
    let mut uu = JobUnet::open(
        graph,
        (unet_encoder, unet_decoder),
        unet_prelude.as_deref_mut(),
        weights,
        skips,
        &cond_u,
        (&job.merged, weights),
        &k0,
        lat_shape.clone(),
    )
    .map_err(|e| at("binding the unconditional half", e))?;
    current(&k1)?;
    let mut uc = JobUnet::open(
        hb.graph.as_mut(),
        (&hb.encoder, &hb.decoder),
        hb.prelude.as_mut(),
        h_weights,
        skips,
        &cond_c,
        (&job.merged, weights),
        &k1,
        lat_shape.clone(),
    )
    .map_err(|e| at("binding the conditional half", e))?;
    // the conditional halves of residuals land here (on GPU b) before they are added
    let mut stage_c: Vec<Option<DevTensor>> = (0..=skips).map(|_| None).collect();
    let mut stage_h: Vec<Option<DevTensor>> = (0..=skips).map(|_| None).collect();
    let empty = Tensor::new(vec![0], vec![]);
    let timesteps = job.sched.timesteps().to_vec();

    for (i, &ts) in timesteps.iter().enumerate() {
        let _step = tracing::debug_span!("step", i, t = ts, split = true).entered();
        if let Some(m) = job.poll_lora(i)? {
            current(&k0)?;
            uu.switch_weights(weights, &m, weights, unet_prelude.as_deref_mut())
                .map_err(|e| at("switching the unconditional half's weights", e))?;
            current(&k1)?;
            uc.switch_weights(h_weights, &m, weights, hb.prelude.as_mut())
                .map_err(|e| at("switching the conditional half's weights", e))?;
        }
        let t0 = Instant::now();
        k0.scale(&latents.buf, job.sched.input_scale(i), &mut latent_in.buf, 2)
            .map_err(g)?;
        k0.synchronize().map_err(g)?;
        let x = latent_in.ptr(&k0);
        // SAFETY: x_u and x_c are the halves of `latent_in`, complete after the synchronise;
        // each sample buffer holds n f32
        unsafe {
            k0.copy_raw(uu.sample().ptr(&k0), x, n * 4).map_err(g)?;
            k1.copy_raw(uc.sample().ptr(&k1), x + (n * 4) as u64, n * 4)
                .map_err(g)?;
        }
        k0.synchronize().map_err(g)?;
        k1.synchronize().map_err(g)?;
        let ts2 = Tensor::new(vec![2], vec![ts; 2]);
        job.t.scheduler += t0.elapsed();

        let active = req.active_controlnets(i);
        let t0 = Instant::now();
        let (split_cn, whole): (Vec<usize>, Vec<usize>) = active
            .iter()
            .partition(|&&j| job.halves.get(j).is_some_and(|h| h.is_some()));
        send_step(job.sessions, &whole, i, &latent_in, &k0, &ts2)?;
        // per-half ControlNets: each half's latent as its UNet half reads it, batch 1
        let ts1 = Tensor::new(vec![1], vec![ts]);
        for &j in &split_cn {
            let (xu, xc) = (uu.sample().dev_ref(&k0), uc.sample().dev_ref(&k1));
            job.sessions[j].send_device(i, &xu, &ts1)?;
            if let Some(hc) = job.halves[j].as_mut() {
                hc.send_device(i, &xc, &ts1)?;
            }
        }
        job.t.controlnet += t0.elapsed();

        // phase 1: both encoders at once
        let t0 = Instant::now();
        let (tu, tc) = {
            let (hs, hu) = (&mut hb.encoder, Sent(&mut uc));
            let (mine, theirs) = on_both(
                h_thread,
                move || hu.into_inner().encode(hs, ts),
                || uu.encode(unet_encoder, ts),
            );
            (
                mine.map_err(|e| at("unconditional encoder", e))?,
                theirs.map_err(|e| at("conditional encoder", e))?,
            )
        };
        let encoder_end = Instant::now();
        job.t.unet_encoder += encoder_end - t0;

        let t0 = Instant::now();
        if !active.is_empty() {
            let mut path = StepPath::default();
            for &j in &active {
                let c = &req.controlnets[j];
                let res = recv_residuals(&mut job.sessions[j], i, j, &mut stage_h, &k0)?;
                path.note(j, job.sessions[j].last_span());
                if let Some(hc) = job.halves.get_mut(j).and_then(|h| h.as_mut()) {
                    // per-half: the unconditional residuals to GPU a, the conditional to GPU b
                    let res_c = recv_residuals(hc, i, j, &mut stage_c, &k1)?;
                    path.note(j, hc.last_span());
                    let (wu, wc) = (
                        format!("ControlNet #{j}, unconditional half"),
                        format!("ControlNet #{j}, conditional half"),
                    );
                    for (r, (ru, rc)) in res.iter().zip(&res_c).enumerate() {
                        let (au, ac) = if r < skips {
                            (&tu[2 + r], &tc[2 + r])
                        } else {
                            (&tu[1], &tc[1])
                        };
                        add_residual(&wu, au, ru, c.scale, &k0, d0, &mut stage_h[r])
                            .map_err(|e| at(&wu, e))?;
                        add_residual(&wc, ac, rc, c.scale, &k1, d1, &mut stage_c[r])
                            .map_err(|e| at(&wc, e))?;
                    }
                    continue;
                }
                for (r, rr) in res.iter().enumerate() {
                    let (au, ac) = if r < skips {
                        (&tu[2 + r], &tc[2 + r])
                    } else {
                        (&tu[1], &tc[1])
                    };
                    let half_n = au.len();
                    if rr.len() != 2 * half_n || ac.len() != half_n {
                        return Err(Error::InvalidRequest(format!(
                            "ControlNet #{j}: residual {:?} does not fit two halves of {:?}",
                            rr.shape, au.shape
                        )));
                    }
                    // unconditional half: first half of the residual, added on GPU a
                    let src_u = if rr.device == d0 {
                        rr.ptr
                    } else {
                        let st = stage(&mut stage_h[r], &k0, &au.shape)?;
                        let p = st.ptr(&k0);
                        // SAFETY: the session keeps its buffer until its next step
                        unsafe { k0.copy_raw(p, rr.ptr, half_n * 4) }.map_err(g)?;
                        p
                    };
                    // SAFETY: targets are the encoders' live outputs; nothing else writes them
                    unsafe { k0.axpy_raw(au.ptr, src_u, c.scale, half_n) }.map_err(g)?;
                    // conditional half: second half, to GPU b
                    let second = rr.ptr + (half_n * 4) as u64;
                    let src_c = if rr.device == d1 {
                        second
                    } else {
                        let st = stage(&mut stage_c[r], &k1, &ac.shape)?;
                        let p = st.ptr(&k1);
                        unsafe { k1.copy_raw(p, second, half_n * 4) }.map_err(g)?;
                        p
                    };
                    unsafe { k1.axpy_raw(ac.ptr, src_c, c.scale, half_n) }.map_err(g)?;
                }
            }
            k0.synchronize().map_err(g)?;
            k1.synchronize().map_err(g)?;
            path.finish(job.t, encoder_end, Instant::now());
        }
        job.t.controlnet += t0.elapsed();

        // phase 2: both decoders at once
        let t0 = Instant::now();
        let (ru, rc) = {
            let (hs, hu) = (&mut hb.decoder, Sent(&mut uc));
            let (mine, theirs) = on_both(
                h_thread,
                move || hu.into_inner().decode(hs),
                || uu.decode(unet_decoder),
            );
            (
                mine.map_err(|e| at("unconditional decoder", e))?,
                theirs.map_err(|e| at("conditional decoder", e))?,
            )
        };
        job.t.unet_decoder += t0.elapsed();

        let t0 = Instant::now();
        if ru.len() != n || rc.len() != n {
            return Err(Error::Gpu(format!(
                "noise_pred {:?} for latents {:?}",
                ru.shape, lat_shape
            )));
        }
        let p2 = pred2.ptr(&k0);
        // SAFETY: both predictions stay alive (until `end_step`) past the synchronise below
        unsafe {
            k0.copy_raw(p2, ru.ptr, n * 4).map_err(g)?;
            k0.copy_raw(p2 + (n * 4) as u64, rc.ptr, n * 4).map_err(g)?;
        }
        k0.combine(&pred2.buf, req.guidance, &mut guided.buf).map_err(g)?;
        scheduler_step(job.sched, i, &k0, &mut latents, &guided, job.noise)?;
        k0.synchronize().map_err(g)?;
        uu.end_step();
        uc.end_step();
        job.t.scheduler += t0.elapsed();
        if job.obs.wants_latents(i) {
            let host = latents.download(&k0)?;
            job.stepped(i, &host)?;
        } else {
            job.stepped(i, &empty)?;
        }
    }
    drop((uu, uc));
    let out = latents.download(&k0)?;
    drop((pred2, latent_in));
    Ok(out)
}

/// The UNet of the conditional guidance half on its own GPU (latent parallelism): its sessions,
/// the pristine weights uploaded there, and step kernels on that GPU.
pub(super) struct HalfUnet {
    pub device: i32,
    /// This half's UNet pairs by shape bucket, captured on `thread` (`SessionOptions::cuda_graph`).
    unets: UnetSet,
    weights: Arc<Weights>,
    kernels: Arc<GpuKernels>,
    /// The thread that runs this half's graphs, for the pipeline's whole life: ONNX Runtime's
    /// CUDA provider makes per-thread state (library handles) on a thread's first run, so a
    /// fresh thread per step cost about 0.2 s each (476 ms per step on 2×H200, run C).
    thread: rayon::ThreadPool,
}

/// Runs `theirs` on `pool`'s thread while `mine` runs on this one; both results.
pub(super) fn on_both<A, B: Send>(
    pool: &rayon::ThreadPool,
    theirs: impl FnOnce() -> Result<B> + Send,
    mine: impl FnOnce() -> Result<A>,
) -> (Result<A>, Result<B>) {
    let mut out: Option<Result<B>> = None;
    let slot = &mut out;
    let a = pool.in_place_scope(|sc| {
        sc.spawn(move |_| {
            *slot = Some(
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(theirs))
                    .unwrap_or_else(|_| Err(Error::Gpu("the second GPU's thread panicked".into()))),
            );
        });
        mine()
    });
    let b = out.unwrap_or_else(|| Err(Error::Gpu("the second GPU's thread did not run".into())));
    (a, b)
}

impl HalfUnet {
    /// The conditional half's UNet on `device`: its own sessions (a UNet batch of 1 with static
    /// shapes), a copy of the pristine weights uploaded there, step kernels and the lasting
    /// thread; with CUDA graphs, captured on that thread now, before any job.
    pub(super) fn load(bundle: &BaseBundle, opts: &SessionOptions, device: Device) -> Result<Self> {
        let there = device
            .gpu()
            .ok_or_else(|| Error::InvalidRequest(format!("split guidance needs a GPU, got {device}")))?;
        // the second GPU's buckets are all captured at load: its thread runs only the jobs
        let opts = SessionOptions {
            device,
            bucket_load: crate::runtime::BucketLoad::All,
            ..opts.clone()
        };
        if let Some(f) = opts.buckets.iter().find(|f| f.unet_batch != 1) {
            return Err(Error::InvalidRequest(format!(
                "split guidance runs a UNet batch of 1 per GPU; the shape buckets fix {}",
                f.unet_batch
            )));
        }
        let m = &bundle.manifest;
        let mut unets = UnetSet::open(bundle, &opts)?;
        let first = unets.first();
        let half = half_inputs([&first.encoder, &first.decoder], &m.weights.map);
        let w = Weights::open(bundle, half, Some(there))?;
        let dev = w
            .device()
            .ok_or_else(|| Error::Gpu("the second GPU's weights did not upload".into()))?;
        let kernels = Arc::new(dev.kernels.fork().map_err(gpu_err)?);
        let thread = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(move |_| format!("katz-cuda{there}"))
            .build()
            .map_err(|e| Error::Gpu(format!("starting the second GPU's thread: {e}")))?;
        let weights = Arc::new(w);
        if opts.cuda_graph {
            // captured on the thread that will run it, before any job (crate::unet::graphed)
            let (u, w, k) = (Sent(&mut unets), &weights, &kernels);
            let skips = m.unet.skips;
            thread.install(move || {
                let u = u.into_inner();
                current(k).and_then(|_| u.capture(w, k, skips))
            })?;
        }
        Ok(HalfUnet {
            device: there,
            unets,
            weights,
            kernels,
            thread,
        })
    }
}

/// The second GPU's [`JobUnet`], lent to that GPU's thread while this one waits for it. `ort`
/// marks values `!Send` conservatively; an OrtValue is a buffer plus metadata with no thread
/// affinity, and only one thread uses it at a time ([`on_both`] returns after both ran).
struct Sent<T>(T);
// SAFETY: see above; the value is lent to one thread at a time, never shared.
unsafe impl<T> Send for Sent<T> {}

impl<T> Sent<T> {
    /// The value (a method, so that a `move` closure captures the whole wrapper, not its field).
    fn into_inner(self) -> T {
        self.0
    }
}

/// Guidance half `k` (0 unconditional, 1 conditional) of a batch-2 conditioning.
pub(super) fn half_cond(c: &Conditioning, k: usize) -> Result<Conditioning> {
    let half = |t: &Tensor| -> Result<Tensor> {
        if t.shape.first() != Some(&2) {
            return Err(Error::InvalidRequest(format!(
                "split guidance needs both guidance halves, got a batch of {:?}",
                t.shape.first()
            )));
        }
        let n = t.data.len() / 2;
        let mut shape = t.shape.clone();
        shape[0] = 1;
        Ok(Tensor::new(shape, t.data[k * n..(k + 1) * n].to_vec()))
    };
    Ok(Conditioning {
        prompt_embeds: half(&c.prompt_embeds)?,
        pooled: half(&c.pooled)?,
        time_ids: half(&c.time_ids)?,
    })
}

#[cfg(test)]
#[cfg(test)]
mod split_thread_tests {
    use super::*;

    #[test]
    fn the_second_half_runs_on_one_lasting_thread_beside_this_one() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let here = std::thread::current().id();
        let mut seen = Vec::new();
        for i in 0..5 {
            let (a, b) = on_both(&pool, move || Ok((std::thread::current().id(), i)), || Ok(i * 10));
            let (tid, j) = b.unwrap();
            assert_eq!((a.unwrap(), j), (i * 10, i));
            assert_ne!(tid, here, "the other half ran on the calling thread");
            seen.push(tid);
        }
        // one thread for every step (a fresh thread per step cost 0.2 s each on a GPU)
        assert!(seen.windows(2).all(|w| w[0] == w[1]), "{seen:?}");
        // both run at once: each waits for the other
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let (a, b) = on_both(
            &pool,
            move || {
                rx.recv_timeout(std::time::Duration::from_secs(5))
                    .map_err(|e| Error::Gpu(e.to_string()))
            },
            || tx.send(()).map_err(|e| Error::Gpu(e.to_string())),
        );
        a.unwrap();
        b.unwrap();
        // a panic there is an error here, and the thread survives it
        let (_, b) = on_both(&pool, || -> Result<()> { panic!("boom") }, || Ok(()));
        assert!(b.unwrap_err().to_string().contains("panicked"));
        let (_, b) = on_both(&pool, || Ok(1), || Ok(()));
        assert_eq!(b.unwrap(), 1);
    }
}
