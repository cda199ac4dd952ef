//! Messages of the Pipeline actor.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use actix::Message;
use katz_onnx::lora::PendingMerge;
use katz_onnx::pipeline::Timings;
use katz_onnx::preview::PreviewImage;
use tokio::sync::mpsc::UnboundedSender;

use crate::error::JobError;
use katz_onnx::request::ValidRequest;

/// A step finished (sent from the model thread to the job's forwarder).
#[derive(Debug, Clone)]
pub struct StepDone {
    pub step: u32,
    pub total: u32,
    pub step_ms: f64,
    /// This step's preview, projected on the model thread; the forwarder encodes the PNG.
    pub preview: Option<PreviewImage>,
}

/// Runs one job to a PNG: its request, checked by the consumer against this worker's
/// [`super::Catalogue`].
#[derive(Message)]
#[rtype(result = "Result<JobOutput, JobError>")]
pub struct RunJob {
    pub req: ValidRequest,
    /// The job's id (ControlNet service sessions are named after it).
    pub job_id: String,
    /// The job's LoRAs, being merged by the LoraManager (`None`: the job has none).
    pub loras: Option<JobLoras>,
    pub progress: UnboundedSender<StepDone>,
    pub cancel: Arc<AtomicBool>,
    pub span: tracing::Span,
}

#[derive(Debug)]
pub struct JobOutput {
    pub png: Vec<u8>,
    pub timings: Timings,
    /// ControlNet sessions opened again on another worker after a timeout.
    pub controlnet_retries: u32,
    /// The prompt (negative prompt) was longer than the text encoders take and was cut.
    pub prompt_truncated: Option<katz_onnx::text::Truncated>,
    pub negative_truncated: Option<katz_onnx::text::Truncated>,
}

/// A job's LoRA merge and when to switch it in.
pub struct JobLoras {
    pub pending: PendingMerge,
    /// Step at which the merged weights must be in (0: before the first step, sync mode).
    pub bound: usize,
    /// Switch at the first ready step boundary instead of exactly at `bound`.
    pub early: bool,
    /// Longest wait at `bound`.
    pub timeout: Duration,
}
