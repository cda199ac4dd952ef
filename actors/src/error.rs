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
    /// A Redis call failed: a transient fault (connection, loading, fail-over) requeues, a reply
    /// error caused by the job (`WRONGTYPE`, an expire time Redis refuses) dead-letters it
    /// ([`redis_transient`]).
    #[error("redis: {0}")]
    Store(#[from] redis::RedisError),
    /// The job was started this many times (each a requeue after a transient fault or a worker
    /// that died mid-job): it is failed rather than holding a worker's slot forever.
    #[error("started {attempts} times (the most is {max}): giving up")]
    Exhausted { attempts: u64, max: u64 },
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

/// Whether a Redis error is a transient fault of the connection or the server (retry, requeue)
/// rather than a reply refusing what the job asked for (a `WRONGTYPE` on a key the job named, an
/// expire time out of range, a script error: fail the job).
pub fn redis_transient(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind as K, ServerErrorKind as S};
    match e.kind() {
        K::Io | K::Parse | K::AuthenticationFailed | K::ClusterConnectionNotFound => true,
        K::MasterNameNotFoundBySentinel | K::NoValidReplicasFoundBySentinel => true,
        K::Server(
            S::BusyLoading
            | S::TryAgain
            | S::ClusterDown
            | S::MasterDown
            | S::ReadOnly
            | S::Moved
            | S::Ask
            | S::NoScript,
        ) => true,
        // replies with codes redis-rs does not name: out of memory and a busy script are the
        // server's state; anything else (WRONGTYPE, ERR …) is the job's
        K::Extension => matches!(e.code(), Some("OOM" | "BUSY" | "NOREPLICAS" | "LOADING")),
        _ => e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout(),
    }
}

/// Every `error_kind` a job can fail with ([`JobError::kind`], the model's kinds included): the
/// label values of `katz_job_errors_total`, each there at 0 from the worker's start.
pub const ERROR_KINDS: &[&str] = &[
    // the job's own
    "decode",
    "invalid",
    "conflict",
    "deadline",
    "attempts",
    "redis",
    "redis_refused",
    "rabbitmq",
    "mailbox",
    // the model's (katz_onnx::Error::kind)
    "runtime",
    "onnxruntime",
    "device",
    "bundle",
    "io",
    "tokenizer",
    "lora",
    "image",
    "invalid_request",
    "scheduler",
    "gpu",
    "controlnet",
    "controlnet_transport",
    "non_finite",
];

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
            | JobError::Deadline { .. }
            | JobError::Exhausted { .. } => Action::DeadLetter,
            JobError::Cancelled => Action::Ack,
            JobError::Model(e) => match e {
                katz_onnx::Error::Cancelled { .. } => Action::Ack,
                e => match e.disposition() {
                    katz_onnx::Disposition::DeadLetter => Action::DeadLetter,
                    katz_onnx::Disposition::Requeue => Action::Requeue,
                },
            },
            JobError::Store(e) if !redis_transient(e) => Action::DeadLetter,
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
            JobError::Store(e) if !redis_transient(e) => "redis_refused",
            JobError::Store(_) => "redis",
            JobError::Exhausted { .. } => "attempts",
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

    /// Whether another try of the same call may succeed (Redis away or busy); false for an error
    /// that the job's own data caused.
    pub fn is_transient_store(&self) -> bool {
        matches!(self, JobError::Store(e) if redis_transient(e))
    }

    pub fn is_cancel(&self) -> bool {
        matches!(
            self,
            JobError::Cancelled | JobError::Model(katz_onnx::Error::Cancelled { .. })
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, detail: &str) -> redis::RedisError {
        redis::make_extension_error(code.into(), Some(detail.into()))
    }

    #[test]
    fn redis_errors_are_classified_by_cause() {
        let io = redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset"));
        let e = JobError::Store(io);
        assert_eq!((e.action(), e.kind()), (Action::Requeue, "redis"));
        assert!(e.is_transient_store());
        for (code, detail) in [
            (
                "WRONGTYPE",
                "Operation against a key holding the wrong kind of value",
            ),
            ("ERR", "invalid expire time in 'setex' command"),
        ] {
            let e = JobError::Store(server(code, detail));
            assert_eq!(
                (e.action(), e.kind()),
                (Action::DeadLetter, "redis_refused"),
                "{code}"
            );
            assert!(!e.is_transient_store());
        }
        assert!(redis_transient(&server("OOM", "command not allowed")));
        let e = JobError::Exhausted { attempts: 6, max: 5 };
        assert_eq!((e.action(), e.kind()), (Action::DeadLetter, "attempts"));
    }

    #[test]
    fn every_error_kind_is_a_listed_metric_label() {
        let io = || std::io::Error::other("x");
        let errors = [
            JobError::Invalid("x".into()),
            JobError::Conflict {
                stored: "a".into(),
                this: "b".into(),
            },
            JobError::Deadline { late_ms: 1 },
            JobError::Exhausted { attempts: 2, max: 1 },
            JobError::Store(redis::RedisError::from(io())),
            JobError::Store(server("WRONGTYPE", "x")),
            JobError::Broker(lapin::Error::from(io())),
            JobError::Mailbox {
                actor: "x",
                reason: Unavailable::Stopped,
            },
            JobError::Model(katz_onnx::Error::InvalidRequest("x".into())),
            JobError::Model(katz_onnx::Error::ControlNet("x".into())),
            JobError::Model(katz_onnx::Error::Gpu("x".into())),
            JobError::Model(katz_onnx::Error::controlnet_transport("x", io())),
        ];
        for e in &errors {
            assert!(
                ERROR_KINDS.contains(&e.kind()),
                "{} is not in ERROR_KINDS",
                e.kind()
            );
        }
        assert!(ERROR_KINDS.contains(&"decode"));
    }
}
