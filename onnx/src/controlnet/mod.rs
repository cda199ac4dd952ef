//! ControlNets: the models, and the one seam the denoising loops talk to them through.
//!
//! ```text
//! pipeline loop, per step i:  send(i, latent_in, t) to every active session ─▶ UNet encoder (overlap)
//!                             recv(i) from each ─▶ Σ scaleⱼ·residualⱼ into the skips ─▶ UNet decoder
//! ```
//!
//! A [`ControlService`] opens one [`ControlSession`] per ControlNet of a job; the loops know only
//! these two traits (the residual seam). Where the ControlNet runs is the service's business.
//!
//! ## Layout
//! - `mod.rs`: the seam — [`ControlService`], [`ControlSession`], [`SessionInit`], [`RunSpan`].
//! - `model.rs`: [`ControlNet`], one model's ONNX Runtime sessions (host run, or bound to a job
//!   on its GPU: [`BoundControlNet`]) and the weights its graph takes as inputs.
//! - `graphed.rs`: a ControlNet's CUDA graph per shape bucket (GPU, bundles whose weights are
//!   inputs), captured on the thread that runs it ([`ControlNet::prepare`]).
//! - `inline.rs`: [`InlineControlNets`], the pipeline's own models run in the caller's thread
//!   when their residuals are asked for (in-process serial).
//! - `threaded.rs`: [`ThreadedControlNets`], each session on a lasting thread of its own,
//!   overlapping the UNet encoder (in-process parallel).
//! - ControlNet workers reached over Redis or CUDA IPC implement the same seam in katz-actors.

mod graphed;
mod inline;
mod model;
mod threaded;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::device::DevRef;
use crate::request::{ControlModel, ControlRequest};
use crate::tensor::Tensor;
use crate::text::Conditioning;
use crate::{Error, Result};

pub use inline::InlineControlNets;
pub use model::{BoundControlNet, ControlNet};
pub use threaded::ThreadedControlNets;

/// When a ControlNet step ran: handed over (`sent`), started and finished computing. The
/// pipeline reads the per-step critical path from these (`Timings::cn_*`).
#[derive(Debug, Clone, Copy)]
pub struct RunSpan {
    pub sent: Instant,
    pub start: Instant,
    pub end: Instant,
}

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
    /// Whether the session takes its step input and gives its residuals in GPU memory
    /// ([`ControlSession::send_device`], [`ControlSession::recv_device`]). A GPU pipeline talks
    /// to the others through the host (`send`/`recv`, one download and one upload per step).
    fn on_device(&self) -> bool {
        false
    }
    /// [`ControlSession::send`] with the scaled latent in GPU memory (any GPU of this process);
    /// the pipeline does not change it before [`ControlSession::recv_device`] returns.
    fn send_device(&mut self, _step: usize, _latent_in: &DevRef, _timestep: &Tensor) -> Result<()> {
        Err(Error::Gpu("this ControlNet session has no device path".into()))
    }
    /// Step `step`'s residuals in GPU memory (down in skip order, then mid), valid until the next
    /// `send_device`.
    fn recv_device(&mut self, _step: usize) -> Result<Vec<DevRef>> {
        Err(Error::Gpu("this ControlNet session has no device path".into()))
    }
    /// When the step last received ran, where the session can tell (in-process sessions).
    fn last_span(&self) -> Option<RunSpan> {
        None
    }
}

/// Opens sessions for the ControlNets of a job.
pub trait ControlService {
    /// Whether the session for `req` runs the pipeline's own ControlNet on the caller's thread
    /// (inline), where the ControlNet's CUDA graph for the job's bucket can be captured and
    /// replayed ([`ControlNet::prepare`]).
    fn runs_inline(&self, _req: &ControlRequest) -> bool {
        false
    }

    /// A session for ControlNet `index` of the job (`req` names the model, scale and steps).
    fn open(
        &mut self,
        index: usize,
        req: &ControlRequest,
        init: SessionInit<'_>,
    ) -> Result<Box<dyn ControlSession>>;
}

pub(crate) fn lock(m: &Mutex<ControlNet>) -> std::sync::MutexGuard<'_, ControlNet> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The loaded ControlNet a request names.
pub(crate) fn loaded(
    models: &[Arc<Mutex<ControlNet>>],
    index: usize,
    req: &ControlRequest,
) -> Result<Arc<Mutex<ControlNet>>> {
    let not_loaded = || {
        Error::InvalidRequest(format!(
            "ControlNet #{index} refers to a model that is not loaded"
        ))
    };
    match req.model {
        ControlModel::Loaded(m) => models.get(m.index()).cloned().ok_or_else(not_loaded),
        ControlModel::Served(_) => Err(Error::InvalidRequest(format!(
            "ControlNet #{index} is served by a ControlNet service, but none is configured here"
        ))),
    }
}

pub(crate) fn clone_cond(c: &Conditioning) -> Conditioning {
    Conditioning {
        prompt_embeds: c.prompt_embeds.clone(),
        pooled: c.pooled.clone(),
        time_ids: c.time_ids.clone(),
    }
}
