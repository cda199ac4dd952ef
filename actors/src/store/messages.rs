//! Messages of the ResultStore actor.

use actix::Message;

use crate::error::JobError;
use crate::protocol::Status;

/// What a worker may do with a delivered job, decided atomically in Redis.
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// Run it (status is now `running`, attempts incremented).
    Run { attempts: u64 },
    /// Its result is already stored: ack without running.
    AlreadyDone,
    /// Cancellation was asked for before it started: status is now `cancelled`.
    Cancelled,
    /// The id belongs to a different job (other digest); the stored record is left as it is.
    Conflict { stored: String },
}

#[derive(Message)]
#[rtype(result = "Result<Begin, JobError>")]
pub struct BeginJob {
    pub id: String,
    pub digest: String,
    pub worker: String,
    pub total_steps: u32,
    pub queue_wait_ms: Option<u64>,
    /// The job's `result_ttl_s`: a job cancelled before it started ends here, and its record
    /// expires this long after.
    pub ttl_s: u64,
}

#[derive(Message)]
#[rtype(result = "Result<(), JobError>")]
pub struct Progress {
    pub id: String,
    pub step: u32,
    pub total: u32,
    /// This step's preview, stored with the progress in the same transaction.
    pub preview: Option<StepPreview>,
}

/// A step preview (`katz worker --preview-every`): the PNG for `katz:job:<id>:preview` and the
/// record's `preview_step`.
#[derive(Debug, Clone)]
pub struct StepPreview {
    pub step: u32,
    pub png: Vec<u8>,
    /// The job's `result_ttl_s`, which the preview key gets.
    pub ttl_s: u64,
}

/// The job's end: `done` with its image, or `failed` / `cancelled` with an error.
#[derive(Message)]
#[rtype(result = "Result<(), JobError>")]
pub struct Finish {
    pub id: String,
    pub status: Status,
    pub png: Option<Vec<u8>>,
    pub error: Option<(String, String)>,
    /// `(field, value)` pairs added to the status hash (timings, worker …).
    pub fields: Vec<(String, String)>,
    pub ttl_s: u64,
}

/// A message that did not decode names a job id: its record says `failed` (decode) only if no job
/// began under that id (no record, the producer's `queued` one, or an earlier such failure);
/// another job's record only gets a `conflict` note. Answers whether the status was written.
#[derive(Message)]
#[rtype(result = "Result<bool, JobError>")]
pub struct FailUndecoded {
    pub id: String,
    pub error: String,
    pub ttl_s: u64,
}

/// Notes a conflicting delivery on the existing record without changing its status.
#[derive(Message)]
#[rtype(result = "Result<(), JobError>")]
pub struct NoteConflict {
    pub id: String,
    pub error: String,
}

#[derive(Message)]
#[rtype(result = "Result<bool, JobError>")]
pub struct CancelRequested {
    pub id: String,
}

#[derive(Message)]
#[rtype(result = "Result<Option<Vec<u8>>, JobError>")]
pub struct FetchBytes {
    pub key: String,
}
