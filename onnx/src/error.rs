//! One error type for the model side, and what a job consumer should do with a job that failed.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A value given as text (a flag, a config field) that does not parse; the message says why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

/// What to do with a job that failed with this error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// The job can never succeed (bad input, unknown model): reject it to the dead-letter queue.
    DeadLetter,
    /// The failure belongs to this worker or a transient resource: requeue for another try.
    Requeue,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "ONNX Runtime {version} not found (looked in: {searched}). Run `tools/fetch-onnxruntime.sh`, which \
         downloads the pinned onnxruntime wheel from PyPI into .katz/ort/, or set ORT_DYLIB_PATH to a \
         libonnxruntime.so of version {version} or later"
    )]
    RuntimeMissing { version: &'static str, searched: String },
    #[error("could not load ONNX Runtime from {path}: {message}")]
    RuntimeLoad { path: PathBuf, message: String },
    #[error("ONNX Runtime: {0}")]
    Ort(#[from] ort::Error),
    #[error(
        "device {device} cannot be used: {message} (katz does not fall back to the CPU; the ONNX Runtime \
         library must be a GPU build, e.g. onnxruntime-gpu, with CUDA and cuDNN on the library path)"
    )]
    DeviceUnavailable { device: String, message: String },
    #[error("bundle {path}: {message}")]
    Bundle { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },
    #[error("LoRA {path}: {message}")]
    Lora { path: PathBuf, message: String },
    #[error("image {path}: {message}")]
    Image { path: PathBuf, message: String },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    #[error(transparent)]
    Scheduler(#[from] crate::scheduler::SchedulerError),
    #[error("cancelled at step {step}")]
    Cancelled { step: usize },
    #[error("GPU: {0}")]
    Gpu(String),
    /// A ControlNet failed for a reason of the job's or the model's (a bad answer, no worker
    /// answering within every retry): dead-letter.
    #[error("{0}")]
    ControlNet(String),
    /// The job's numbers overflowed (latents or image not finite: a LoRA or ControlNet scale too
    /// large, weights that blow up): no image is stored, the job fails.
    #[error("{0}")]
    NonFinite(String),
    /// A ControlNet's transport failed (Redis, RabbitMQ): not the job's fault, so it is requeued
    /// for a try that may find the transport back.
    #[error("{what}: {source}")]
    ControlNetTransport {
        /// What was being done ("Redis: sending a ControlNet step").
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    pub(crate) fn bundle(path: impl Into<PathBuf>, message: impl Into<String>) -> Self {
        Error::Bundle {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A ControlNet transport failure (requeued): `what` was being done when `source` happened.
    pub fn controlnet_transport(
        what: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        Error::ControlNetTransport {
            what: what.into(),
            source: Box::new(source),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether a job that failed with this error should be dead-lettered or retried.
    pub fn disposition(&self) -> Disposition {
        match self {
            Error::Lora { .. }
            | Error::Image { .. }
            | Error::InvalidRequest(_)
            | Error::Scheduler(_)
            | Error::Tokenizer { .. }
            | Error::ControlNet(_)
            | Error::NonFinite(_)
            | Error::Cancelled { .. } => Disposition::DeadLetter,
            Error::RuntimeMissing { .. }
            | Error::RuntimeLoad { .. }
            | Error::Ort(_)
            | Error::DeviceUnavailable { .. }
            | Error::Gpu(_)
            | Error::Bundle { .. }
            | Error::Io { .. }
            | Error::ControlNetTransport { .. } => Disposition::Requeue,
        }
    }

    /// A short stable label, for metrics and job status.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::RuntimeMissing { .. } | Error::RuntimeLoad { .. } => "runtime",
            Error::Ort(_) => "onnxruntime",
            Error::DeviceUnavailable { .. } => "device",
            Error::Bundle { .. } => "bundle",
            Error::Io { .. } => "io",
            Error::Tokenizer { .. } => "tokenizer",
            Error::Lora { .. } => "lora",
            Error::Image { .. } => "image",
            Error::InvalidRequest(_) => "invalid_request",
            Error::Scheduler(_) => "scheduler",
            Error::Cancelled { .. } => "cancelled",
            Error::Gpu(_) => "gpu",
            Error::ControlNet(_) => "controlnet",
            Error::NonFinite(_) => "non_finite",
            Error::ControlNetTransport { .. } => "controlnet_transport",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_controlnet_transport_failure_is_requeued_and_bad_controlnet_input_dead_lettered() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::controlnet_transport("Redis: sending a ControlNet step", io);
        assert_eq!(e.disposition(), Disposition::Requeue);
        assert_eq!(e.kind(), "controlnet_transport");
        assert_eq!(e.to_string(), "Redis: sending a ControlNet step: refused");
        assert!(std::error::Error::source(&e).is_some());
        let bad = Error::ControlNet("ControlNet m: bad CUDA IPC message".into());
        assert_eq!(bad.disposition(), Disposition::DeadLetter);
    }
}
