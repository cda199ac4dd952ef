//! The katz service: actors that turn RabbitMQ jobs into images in Redis.
//!
//! ```text
//! producer ──msgpack──▶ RabbitMQ katz.jobs ─▶ katz.jobs.<base> (priority; dead letters ─▶ <queue>.dead)
//!                                                  │ prefetch = jobs in flight + lookahead
//!   worker ┌───────────────────────────────────────▼──────────────────────────────────────────┐
//!          │ consumer::JobConsumer ─▶ job::process ──RunJob{ValidRequest}──▶ PipelineActor     │
//!          │      (one task per delivery) │  ▲ StepDone (progress, cancel)   (model thread:    │
//!          │                              │  │                               katz_onnx::Pipeline)
//!          │   lora::LoraManager ◀─admit/merge─┘ ─▶ PendingMerge ──────────────▶ │              │
//!          │   store::ResultStore ◀──BeginJob / Progress / Finish                              │
//!          └──────┬────────────────────────────────────────────────────────────────────────────┘
//!                 ▼
//!               Redis katz:job:<id> (status, step/total, timings, error), katz:job:<id>:image,
//!                     pub/sub katz:events:<id>
//! ```
//!
//! A delivery is acked only after its result is stored; bad input is dead-lettered with a
//! `failed` status naming the problem; a redelivered job whose result exists is acked without
//! running again (idempotent by job id and content digest). A Redis reply refusing the job's data
//! fails it; a transient fault requeues it, at most `max_attempts` starts. See docs/protocol.md.
//!
//! ## Layout
//!
//! | module | owns |
//! |---|---|
//! | `config` | `WorkerConfig`: one serde struct (TOML, then flags and `KATZ_*` over it), each default written once; `models()` → what the worker serves |
//! | `worker` | `run(cfg, shutdown)`: loads every pipeline, starts the actors and the consumer, drains on `shutdown` |
//! | `consumer/` | `JobConsumer` (RabbitMQ: qos, deliveries, reconnects) |
//! | `job` | `process`: one delivery from decode to ack (claim, LoRA prefetch, slot, BeginJob, images, the request check, LoRA admit/merge, RunJob, Finish); `JobDeps` |
//! | `producer` | what a producer does in Redis besides publishing: `cancel` (`katz cancel`, the gateway) |
//! | `protocol` | the wire format (`Job`; decode: the strict shape in `wire`, version, id, priority, TTL, upload keys), Redis keys, `Limits` |
//! | `pipeline/` | `PipelineActor` over a `LoadedPipeline`; `Models` (bundles, `Placement`, session options); `Catalogue` (a job → `ValidRequest`) |
//! | `lora/` | `LoraManager` (a handle; one owner task), the store (dir, Redis), the caches |
//! | `controlnet/` | `Router` (hosted or served ControlNets), `RemoteControlNets` (sessions on ControlNet workers over Redis or CUDA IPC), the ControlNet worker and its `SessionActor`, the wire format |
//! | `store/` | `ResultStore` (Redis through Lua, or the in-memory twin) |
//! | `embedded` | jobs through the same actors without a broker (`katz demo`) |
//! | `metrics` | Prometheus registry and its HTTP endpoint (with the `/readyz`, `/healthz` probes) |
//! | `redact` | passwords of AMQP / Redis URLs masked before they reach an error or a log line |
//! | `queue_depth` | the queue gauges: a passive declare of each queue a process consumes or serves, every few seconds |
//! | `trace_context` | a job's trace across processes: the `traceparent` a ControlNet session open carries |
//! | `health` | the worker's state (loading, ready, reconnecting, stopping, stopped) and its Redis heartbeat |
//! | `topology`, `error` | queues and exchanges; `JobError` with its ack / requeue / dead-letter action |
//!
//! ## Actors: the state each owns, the messages it takes
//!
//! | actor | owns | takes |
//! |---|---|---|
//! | `JobConsumer` (actix) | the AMQP connection and channel, deliveries in flight | deliveries (stream), `Shutdown` |
//! | `PipelineActor` (`SyncArbiter` thread) | one `katz_onnx::Pipeline`, its remote ControlNet client | `RunJob` → `JobOutput` |
//! | `ResultStore` (actix) | the Redis connection (or `Memory`) | `BeginJob`, `Progress`, `Finish`, `NoteConflict`, `CancelRequested`, `FetchBytes` |
//! | `LoraManager` (a tokio task behind a handle) | the host and device caches, loads in flight, the pending-load bound, counters | `prefetch`, `admit`, `merge`, `stats` (commands with a reply channel and the caller's span) |
//! | `SessionActor` (ControlNet worker thread) | one ControlNet model's session | `RunSession` |
//!
//! ## A job, hop by hop
//! RabbitMQ → `JobConsumer` → `job::process`: decode (wire) → claim the id → LoRA prefetch →
//! a pipeline slot → `ResultStore::BeginJob` → conditioning images → `Catalogue::request` (the
//! one check) → `LoraManager::admit`/`merge` → `PipelineActor::RunJob` (progress through
//! `StepDone` → `ResultStore::Progress`) → `ResultStore::Finish` → ack (or requeue / dead-letter
//! by the error's action).

pub mod config;
pub mod consumer;
pub mod controlnet;
pub mod embedded;
pub mod error;
pub mod health;
pub mod job;
pub mod lora;
pub mod metrics;
pub mod pipeline;
pub mod producer;
pub mod protocol;
pub mod queue_depth;
pub mod redact;
pub mod store;
pub mod topology;
pub mod trace_context;
pub mod worker;

pub use error::{Action, JobError};
