//! ControlNet-as-a-Service (Katz's first idea): ControlNets in sessions that overlap the UNet
//! encoder — on threads of the base worker, or in `katz controlnet-worker` processes on any host.
//!
//! ```text
//! base worker (PipelineActor, model thread)                    ControlNet worker(s)
//!   Router ─ Loaded(m) ─▶ InlineControlNets (serial) | ThreadedControlNets (parallel threads)
//!          └ Served(s) ─▶ RemoteControlNets ─SessionOpen─▶ RabbitMQ katz.controlnet.<model>
//!                              │ Redis katz:cn:<s>:init/in/out (TTL) ◀──▶ SessionActor (thread):
//!                              │                                           BLPOP in → ControlNet
//!                              └ step timeout → another session → … → job fails, named   → RPUSH out
//! ```

pub mod ipc;
pub mod metrics;
pub mod remote;
pub mod wire;
pub mod worker;

use katz_onnx::controlnet::{
    ControlService, ControlSession, InlineControlNets, SessionInit, ThreadedControlNets,
};
use katz_onnx::request::{ControlModel, ControlRequest};
use katz_onnx::{Error, Result};

pub use remote::{RemoteConfig, RemoteControlNets, RemoteModel};

/// How a worker runs the ControlNets it hosts itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LocalMode {
    /// One after another after the UNet encoder, on the model thread.
    Serial,
    /// Each on a thread of its own, overlapping the UNet encoder.
    #[default]
    Parallel,
}

/// A ControlNet mode other than `serial` / `parallel`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ControlNet mode must be `serial` or `parallel`, got `{0}`")]
pub struct UnknownMode(pub String);

impl std::str::FromStr for LocalMode {
    type Err = UnknownMode;
    fn from_str(s: &str) -> std::result::Result<Self, UnknownMode> {
        match s {
            "serial" => Ok(LocalMode::Serial),
            "parallel" => Ok(LocalMode::Parallel),
            _ => Err(UnknownMode(s.to_string())),
        }
    }
}

/// Sends each ControlNet of a job to where its model runs: the pipeline's own models
/// ([`ControlModel::Loaded`]) to the inline or threaded sessions, served models
/// ([`ControlModel::Served`]) to the ControlNet workers.
pub struct Router<'a> {
    pub inline: InlineControlNets,
    pub threaded: ThreadedControlNets,
    pub mode: LocalMode,
    pub remote: Option<&'a mut RemoteControlNets>,
}

impl ControlService for Router<'_> {
    fn runs_inline(&self, req: &ControlRequest) -> bool {
        matches!(req.model, ControlModel::Loaded(_)) && matches!(self.mode, LocalMode::Serial)
    }

    fn open(
        &mut self,
        index: usize,
        req: &ControlRequest,
        init: SessionInit<'_>,
    ) -> Result<Box<dyn ControlSession>> {
        match req.model {
            ControlModel::Loaded(_) => match self.mode {
                LocalMode::Serial => self.inline.open(index, req, init),
                LocalMode::Parallel => self.threaded.open(index, req, init),
            },
            ControlModel::Served(_) => self
                .remote
                .as_deref_mut()
                .ok_or_else(|| Error::ControlNet("no ControlNet service is configured".into()))?
                .open(index, req, init),
        }
    }
}
