//! What can go wrong with a job, and what the consumer does about it.

use crate::protocol::DecodeError;

/// The consumer's answer to a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Result stored (or nothing to do): acknowledge.
    Ack,
    /// The job can never succeed: reject without requeue, into the dead-letter queue.
    DeadLetter,
    /// This worker or a resource failed: requeue for another try.
    Requeue,
}

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{}", .0.message)]
    Decode(DecodeError),
    #[error("{0}")]
    Invalid(String),
    #[error("job id is already used by a different job (stored digest {stored}, this one {this})")]
    Conflict { stored: String, this: String },
    #[error("deadline passed {late_ms} ms before the job could start")]
    Deadline { late_ms: u64 },
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Model(#[from] katz_onnx::Error),
    #[error("redis: {0}")]
    Store(#[from] redis::RedisError),
    #[error("rabbitmq: {0}")]
    Broker(#[from] lapin::Error),
    #[error("pipeline actor unavailable: {0}")]
    Mailbox(String),
}

impl JobError {
    pub fn action(&self) -> Action {
        match self {
            JobError::Decode(_)
            | JobError::Invalid(_)
            | JobError::Conflict { .. }
            | JobError::Deadline { .. } => Action::DeadLetter,
            JobError::Cancelled => Action::Ack,
            JobError::Model(e) => match e {
                katz_onnx::Error::Cancelled { .. } => Action::Ack,
                e => match e.disposition() {
                    katz_onnx::Disposition::DeadLetter => Action::DeadLetter,
                    katz_onnx::Disposition::Requeue => Action::Requeue,
                },
            },
            JobError::Store(_) | JobError::Broker(_) | JobError::Mailbox(_) => Action::Requeue,
        }
    }

    /// Stable label for metrics and the status field `error_kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            JobError::Decode(_) => "decode",
            JobError::Invalid(_) => "invalid",
            JobError::Conflict { .. } => "conflict",
            JobError::Deadline { .. } => "deadline",
            JobError::Cancelled => "cancelled",
            JobError::Model(e) => e.kind(),
            JobError::Store(_) => "redis",
            JobError::Broker(_) => "rabbitmq",
            JobError::Mailbox(_) => "mailbox",
        }
    }

    pub fn is_cancel(&self) -> bool {
        matches!(
            self,
            JobError::Cancelled | JobError::Model(katz_onnx::Error::Cancelled { .. })
        )
    }
}
