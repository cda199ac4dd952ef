//! The pipeline's own ControlNets run in the caller's thread when a step's residuals are asked
//! for ("in-process serial": `recv` computes; nothing overlaps the UNet encoder).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{
    clone_cond, loaded, lock, BoundControlNet, ControlNet, ControlService, ControlSession, RunSpan,
    SessionInit,
};
use crate::device::DevRef;
use crate::request::ControlRequest;
use crate::tensor::Tensor;
use crate::text::Conditioning;
use crate::{Error, Result};

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
    /// On a GPU: the job's binding (made at the first device step) and the pending device input.
    gpu: bool,
    bound: Option<BoundControlNet>,
    dev_input: Option<(usize, DevRef, Tensor)>,
    sent: Option<Instant>,
    last: Option<RunSpan>,
}

impl ControlService for InlineControlNets {
    fn runs_inline(&self, _req: &ControlRequest) -> bool {
        true
    }

    fn open(
        &mut self,
        index: usize,
        req: &ControlRequest,
        init: SessionInit<'_>,
    ) -> Result<Box<dyn ControlSession>> {
        let model = loaded(&self.models, index, req)?;
        let gpu = lock(&model).gpu().is_some();
        Ok(Box::new(InlineSession {
            model,
            cond: clone_cond(init.cond),
            image: init.image.clone(),
            input: None,
            gpu,
            bound: None,
            dev_input: None,
            sent: None,
            last: None,
        }))
    }
}

impl ControlSession for InlineSession {
    fn send(&mut self, step: usize, latent_in: &Tensor, timestep: &Tensor) -> Result<()> {
        self.input = Some((step, latent_in.clone(), timestep.clone()));
        self.sent = Some(Instant::now());
        Ok(())
    }

    fn recv(&mut self, step: usize) -> Result<Vec<Tensor>> {
        let (s, latent_in, timestep) = self
            .input
            .take()
            .ok_or_else(|| Error::InvalidRequest("ControlNet step received before it was sent".into()))?;
        debug_assert_eq!(s, step);
        let start = Instant::now();
        let out = self.model.lock().unwrap_or_else(|e| e.into_inner()).residuals(
            &latent_in,
            &timestep,
            &self.cond,
            &self.image,
        );
        self.note(start);
        out
    }

    fn on_device(&self) -> bool {
        self.gpu
    }

    fn send_device(&mut self, step: usize, latent_in: &DevRef, timestep: &Tensor) -> Result<()> {
        self.dev_input = Some((step, latent_in.clone(), timestep.clone()));
        self.sent = Some(Instant::now());
        Ok(())
    }

    fn recv_device(&mut self, step: usize) -> Result<Vec<DevRef>> {
        let (s, latent_in, timestep) = self
            .dev_input
            .take()
            .ok_or_else(|| Error::InvalidRequest("ControlNet step received before it was sent".into()))?;
        debug_assert_eq!(s, step);
        let start = Instant::now();
        let mut model = lock(&self.model);
        if self.bound.is_none() {
            self.bound = Some(model.bind(&self.cond, &self.image, true)?);
        }
        let Some(b) = self.bound.as_mut() else {
            return Err(Error::Gpu("the ControlNet is not bound".into()));
        };
        let out = model.run_bound(b, &latent_in, &timestep);
        drop(model);
        self.note(start);
        out
    }

    fn last_span(&self) -> Option<RunSpan> {
        self.last
    }
}

impl InlineSession {
    fn note(&mut self, start: Instant) {
        self.last = Some(RunSpan {
            sent: self.sent.take().unwrap_or(start),
            start,
            end: Instant::now(),
        });
    }
}
