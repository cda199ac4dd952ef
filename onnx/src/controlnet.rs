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

// ───────────────────────────── ControlNet sessions ─────────────────────────────
//
// A session binds one ControlNet to one job for its steps (DESIGN.md, ControlNet-as-a-Service):
//
//   pipeline, per step i:  send(i, latent_in, t) to every active session ─▶ UNet encoder (overlap)
//                          recv(i) from each ─▶ Σ scaleⱼ·residualⱼ into the skips ─▶ UNet decoder
//
// Where the ControlNet runs is the service's business: a thread of this process
// ([`ThreadedControlNets`]), or a `katz controlnet-worker` reached over Redis or CUDA IPC
// (katz-actors).

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use crate::pipeline::ControlRequest;
use crate::Error;

/// What a session needs once, when it opens.
pub struct SessionInit<'a> {
    /// The job's text conditioning (both guidance halves when guidance is on).
    pub cond: &'a Conditioning,
    /// The conditioning image, batched like the latents (`[B, 3, H, W]` in [0, 1]).
    pub image: &'a Tensor,
}

/// One ControlNet working for one job.
pub trait ControlSession: Send {
    /// Hands step `step`'s input over; returns without waiting for the residuals.
    fn send(&mut self, step: usize, latent_in: &Tensor, timestep: &Tensor) -> Result<()>;
    /// Step `step`'s residuals, unscaled: down residuals in skip order, then the mid residual.
    fn recv(&mut self, step: usize) -> Result<Vec<Tensor>>;
    /// Ends the session (also on drop); idempotent.
    fn close(&mut self) {}
}

/// Opens sessions for the ControlNets of a job.
pub trait ControlService {
    /// A session for ControlNet `index` of the job (`req` names the model, scale and steps).
    fn open(
        &mut self,
        index: usize,
        req: &ControlRequest,
        init: SessionInit<'_>,
    ) -> Result<Box<dyn ControlSession>>;
}

/// In-process ControlNets run where the pipeline runs, one after another after the UNet encoder
/// ("in-process serial": `recv` computes; nothing overlaps).
#[derive(Clone, Default)]
pub struct InlineControlNets {
    pub models: Vec<Arc<Mutex<ControlNet>>>,
}

struct InlineSession {
    model: Arc<Mutex<ControlNet>>,
    cond: Conditioning,
    image: Tensor,
    input: Option<(usize, Tensor, Tensor)>,
}

impl ControlService for InlineControlNets {
    fn open(
        &mut self,
        index: usize,
        req: &ControlRequest,
        init: SessionInit<'_>,
    ) -> Result<Box<dyn ControlSession>> {
        let model = loaded(&self.models, index, req)?;
        Ok(Box::new(InlineSession {
            model,
            cond: clone_cond(init.cond),
            image: init.image.clone(),
            input: None,
        }))
    }
}

impl ControlSession for InlineSession {
    fn send(&mut self, step: usize, latent_in: &Tensor, timestep: &Tensor) -> Result<()> {
        self.input = Some((step, latent_in.clone(), timestep.clone()));
        Ok(())
    }

    fn recv(&mut self, step: usize) -> Result<Vec<Tensor>> {
        let (s, latent_in, timestep) = self
            .input
            .take()
            .ok_or_else(|| Error::InvalidRequest("ControlNet step received before it was sent".into()))?;
        debug_assert_eq!(s, step);
        self.model.lock().unwrap_or_else(|e| e.into_inner()).residuals(
            &latent_in,
            &timestep,
            &self.cond,
            &self.image,
        )
    }
}

/// The loaded ControlNet a request names.
fn loaded(
    models: &[Arc<Mutex<ControlNet>>],
    index: usize,
    req: &ControlRequest,
) -> Result<Arc<Mutex<ControlNet>>> {
    models.get(req.model).cloned().ok_or_else(|| {
        Error::InvalidRequest(format!(
            "ControlNet #{index} refers to a model that is not loaded"
        ))
    })
}

fn clone_cond(c: &Conditioning) -> Conditioning {
    Conditioning {
        prompt_embeds: c.prompt_embeds.clone(),
        pooled: c.pooled.clone(),
        time_ids: c.time_ids.clone(),
    }
}

/// In-process ControlNets, each session on a thread of its own so that it overlaps the UNet
/// encoder ("in-process parallel"). Tensors move between threads; nothing is serialised.
#[derive(Clone, Default)]
pub struct ThreadedControlNets {
    pub models: Vec<Arc<Mutex<ControlNet>>>,
}

type StepIn = (usize, Tensor, Tensor);

struct ThreadedSession {
    tx: Option<mpsc::Sender<StepIn>>,
    rx: mpsc::Receiver<(usize, Result<Vec<Tensor>>)>,
    thread: Option<std::thread::JoinHandle<()>>,
    name: String,
}

impl ControlService for ThreadedControlNets {
    fn open(
        &mut self,
        index: usize,
        req: &ControlRequest,
        init: SessionInit<'_>,
    ) -> Result<Box<dyn ControlSession>> {
        let model = loaded(&self.models, index, req)?;
        let name = model.lock().unwrap_or_else(|e| e.into_inner()).name().to_string();
        let (tx, in_rx) = mpsc::channel::<StepIn>();
        let (out_tx, rx) = mpsc::channel();
        let cond = clone_cond(init.cond);
        let image = init.image.clone();
        let thread = std::thread::Builder::new()
            .name(format!("controlnet-{index}"))
            .spawn(move || {
                for (step, latent_in, timestep) in in_rx {
                    let res = model
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .residuals(&latent_in, &timestep, &cond, &image);
                    if out_tx.send((step, res)).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::InvalidRequest(format!("starting a ControlNet thread: {e}")))?;
        Ok(Box::new(ThreadedSession {
            tx: Some(tx),
            rx,
            thread: Some(thread),
            name,
        }))
    }
}

impl ControlSession for ThreadedSession {
    fn send(&mut self, step: usize, latent_in: &Tensor, timestep: &Tensor) -> Result<()> {
        let gone = || Error::InvalidRequest(format!("ControlNet {} session thread is gone", self.name));
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send((step, latent_in.clone(), timestep.clone()))
            .map_err(|_| gone())
    }

    fn recv(&mut self, step: usize) -> Result<Vec<Tensor>> {
        let (got, res) = self
            .rx
            .recv()
            .map_err(|_| Error::InvalidRequest(format!("ControlNet {} session thread is gone", self.name)))?;
        debug_assert_eq!(got, step);
        res
    }

    fn close(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ThreadedSession {
    fn drop(&mut self) {
        self.close();
    }
}
