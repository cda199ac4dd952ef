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
    /// An actor or service of this worker is gone or cannot serve: requeue for another worker.
    #[error("{actor} unavailable: {reason}")]
    Mailbox {
        /// Which one: "pipeline actor", "result store", "LoRA manager".
        actor: &'static str,
        #[source]
        reason: Unavailable,
    },
}

/// Why an actor could not take a message.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// An actix mailbox closed (the actor stopped) or timed out.
    #[error(transparent)]
    Mailbox(#[from] actix::MailboxError),
    /// A task-owned service's command channel closed (its owner task ended).
    #[error("it has stopped")]
    Stopped,
    /// It runs but cannot serve this job (a model thread without a pipeline).
    #[error("{0}")]
    Unfit(&'static str),
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
            JobError::Store(_) | JobError::Broker(_) | JobError::Mailbox { .. } => Action::Requeue,
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
            JobError::Mailbox { .. } => "mailbox",
        }
    }

    /// Maps an actix send failure to [`JobError::Mailbox`] naming `actor`.
    pub fn mailbox(actor: &'static str) -> impl FnOnce(actix::MailboxError) -> JobError {
        move |e| JobError::Mailbox {
            actor,
            reason: Unavailable::Mailbox(e),
        }
    }

    pub fn is_cancel(&self) -> bool {
        matches!(
            self,
            JobError::Cancelled | JobError::Model(katz_onnx::Error::Cancelled { .. })
        )
    }
}
