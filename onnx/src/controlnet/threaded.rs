//! In-process ControlNets on threads of their own: each session runs on a lasting thread
//! (crate::threads), so its step overlaps the UNet encoder ("in-process parallel"). Tensors
//! and device references move between threads; nothing is serialised.
//!
//! ```text
//! loop ──StepIn::Host|Device──▶ session thread: residuals / run_bound ──StepOut──▶ loop (recv)
//! ```

use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::{
    clone_cond, loaded, lock, BoundControlNet, ControlNet, ControlService, ControlSession, RunSpan,
    SessionInit,
};
use crate::device::DevRef;
use crate::request::ControlRequest;
use crate::tensor::Tensor;
use crate::{Error, Result};

/// In-process ControlNets, each session on a thread of its own so that it overlaps the UNet
/// encoder ("in-process parallel"). Tensors move between threads; nothing is serialised.
#[derive(Clone, Default)]
pub struct ThreadedControlNets {
    pub models: Vec<Arc<Mutex<ControlNet>>>,
    /// The threads sessions run on, kept between jobs (crate::threads says why).
    pub threads: Arc<crate::threads::LastingThreads>,
}

/// A step's input: on the host, or in GPU memory.
enum StepIn {
    Host(usize, Tensor, Tensor),
    Device(usize, DevRef, Tensor),
}

enum StepOut {
    Host(usize, Result<Vec<Tensor>>, [Instant; 2]),
    Device(usize, Result<Vec<DevRef>>, [Instant; 2]),
}

struct ThreadedSession {
    tx: Option<mpsc::Sender<StepIn>>,
    rx: mpsc::Receiver<StepOut>,
    /// Closed when the session's loop has ended (its thread goes back to the pool).
    done: Option<mpsc::Receiver<()>>,
    name: String,
    gpu: bool,
    sent: Option<Instant>,
    last: Option<RunSpan>,
}

impl ControlService for ThreadedControlNets {
    fn open(
        &mut self,
        index: usize,
        req: &ControlRequest,
        init: SessionInit<'_>,
    ) -> Result<Box<dyn ControlSession>> {
        let model = loaded(&self.models, index, req)?;
        let (name, gpu) = {
            let m = lock(&model);
            (m.name().to_string(), m.gpu().is_some())
        };
        let (tx, in_rx) = mpsc::channel::<StepIn>();
        let (out_tx, rx) = mpsc::channel();
        let cond = clone_cond(init.cond);
        let image = init.image.clone();
        let (done_tx, done) = mpsc::channel::<()>();
        self.threads
            .run(move || {
                let _done = done_tx; // dropped when the loop ends, also on a panic
                let mut bound: Option<BoundControlNet> = None;
                for input in in_rx {
                    let start = Instant::now();
                    let out = match input {
                        StepIn::Host(step, latent_in, timestep) => {
                            let res = lock(&model).residuals(&latent_in, &timestep, &cond, &image);
                            StepOut::Host(step, res, [start, Instant::now()])
                        }
                        StepIn::Device(step, latent_in, timestep) => {
                            let mut m = lock(&model);
                            let res = match bound.as_mut() {
                                Some(b) => m.run_bound(b, &latent_in, &timestep),
                                None => m.bind(&cond, &image, false).and_then(|b| {
                                    let b = bound.insert(b);
                                    m.run_bound(b, &latent_in, &timestep)
                                }),
                            };
                            StepOut::Device(step, res, [start, Instant::now()])
                        }
                    };
                    if out_tx.send(out).is_err() {
                        break;
                    }
                }
            })
            .map_err(|e| Error::InvalidRequest(format!("starting a ControlNet thread: {e}")))?;
        Ok(Box::new(ThreadedSession {
            tx: Some(tx),
            rx,
            done: Some(done),
            name,
            gpu,
            sent: None,
            last: None,
        }))
    }
}

impl ThreadedSession {
    fn gone(&self) -> Error {
        Error::InvalidRequest(format!("ControlNet {} session thread is gone", self.name))
    }

    fn post(&mut self, input: StepIn) -> Result<()> {
        let tx = self.tx.as_ref().ok_or_else(|| self.gone())?;
        self.sent = Some(Instant::now());
        tx.send(input).map_err(|_| self.gone())
    }

    fn take(&mut self) -> Result<StepOut> {
        let out = self.rx.recv().map_err(|_| self.gone())?;
        let (StepOut::Host(_, _, [start, end]) | StepOut::Device(_, _, [start, end])) = &out;
        self.last = Some(RunSpan {
            sent: self.sent.take().unwrap_or(*start),
            start: *start,
            end: *end,
        });
        Ok(out)
    }
}

impl ControlSession for ThreadedSession {
    fn send(&mut self, step: usize, latent_in: &Tensor, timestep: &Tensor) -> Result<()> {
        self.post(StepIn::Host(step, latent_in.clone(), timestep.clone()))
    }

    fn recv(&mut self, step: usize) -> Result<Vec<Tensor>> {
        match self.take()? {
            StepOut::Host(got, res, _) => {
                debug_assert_eq!(got, step);
                res
            }
            StepOut::Device(..) => Err(Error::Gpu(
                "device residuals where host ones were asked for".into(),
            )),
        }
    }

    fn on_device(&self) -> bool {
        self.gpu
    }

    fn send_device(&mut self, step: usize, latent_in: &DevRef, timestep: &Tensor) -> Result<()> {
        self.post(StepIn::Device(step, latent_in.clone(), timestep.clone()))
    }

    fn recv_device(&mut self, step: usize) -> Result<Vec<DevRef>> {
        match self.take()? {
            StepOut::Device(got, res, _) => {
                debug_assert_eq!(got, step);
                res
            }
            StepOut::Host(..) => Err(Error::Gpu(
                "host residuals where device ones were asked for".into(),
            )),
        }
    }

    fn last_span(&self) -> Option<RunSpan> {
        self.last
    }

    fn close(&mut self) {
        self.tx = None;
        if let Some(d) = self.done.take() {
            let _ = d.recv(); // Err once the loop has ended and dropped its sender
        }
    }
}

impl Drop for ThreadedSession {
    fn drop(&mut self) {
        self.close();
    }
}
