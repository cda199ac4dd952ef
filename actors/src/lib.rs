//! The katz service: actors that turn RabbitMQ jobs into images in Redis.
//!
//! ```text
//! producer ──msgpack──▶ RabbitMQ katz.jobs ─▶ katz.jobs.<base> (priority; dead letters ─▶ <queue>.dead)
//!                                                  │ prefetch = jobs in flight
//!   worker ┌───────────────────────────────────────▼─────────────────────────────────────┐
//!          │ consumer::JobConsumer ──RunJob──▶ pipeline::PipelineActor (model thread)     │
//!          │      │   ▲ StepDone (progress, cancel)          │ katz_onnx::Pipeline        │
//!          │      ▼   │                                      │ (base + ControlNets + LoRA)│
//!          │ store::ResultStore ◀──BeginJob / Progress / Finish                           │
//!          └──────┬───────────────────────────────────────────────────────────────────────┘
//!                 ▼
//!               Redis katz:job:<id> (status, step/total, timings, error), katz:job:<id>:image,
//!                     pub/sub katz:events:<id>
//! ```
//!
//! A delivery is acked only after its result is stored; bad input is dead-lettered with a
//! `failed` status naming the problem; a redelivered job whose result exists is acked without
//! running again (idempotent by job id and content digest). See docs/protocol.md.

pub mod config;
pub mod consumer;
pub mod controlnet;
pub mod embedded;
pub mod error;
pub mod job;
pub mod lora;
pub mod metrics;
pub mod pipeline;
pub mod protocol;
pub mod store;
pub mod topology;
pub mod worker;

pub use error::{Action, JobError};
