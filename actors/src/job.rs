//! One job's journey, whatever brought it: decode → idempotency → images → pipeline → store →
//! settle. The RabbitMQ consumer and the embedded mode both run jobs through [`process`].
//!
//! ```text
//! bytes ─decode+limits─▶ Job ─Prefetch(LoRAs)─▶ wait for a pipeline slot (shutdown: requeue)
//!   ─BeginJob─▶ run | already done | cancelled | conflict
//!   Admit(LoRAs: check, bounded pending loads) ─▶ Merge(LoRAs) ─▶ PendingMerge ─┐
//!   images (inline | Redis key) ─▶ RunJob ◀─────────────────────────────────────┘
//!   RunJob ─▶ PipelineActor ── StepDone ─▶ Progress (+ cancel flag; + a step preview's PNG,
//!                                          encoded here, off the model thread)
//!   Finish(done, PNG) with retries ─▶ settle(Ack)        failure ─▶ Finish(failed) ─▶ settle(action)
//! ```

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use backon::{ExponentialBuilder, Retryable};
use futures_util::future::BoxFuture;
use katz_onnx::lora::LoraParts;
use tracing::Instrument;

use crate::error::{redis_transient, Action, JobError, Unavailable};
use crate::lora::{LoraConfig, LoraManager};
use crate::metrics::metrics;
use crate::pipeline::JobLoras;
use crate::pipeline::{Catalogue, PipelineActor, RunJob};
use crate::protocol::{decode, now_ms, ImageRef, Job, Limits, Status, DEFAULT_RESULT_TTL_S};
use crate::store::{
    Begin, BeginJob, CancelRequested, FailUndecoded, FetchBytes, Finish, NoteConflict, Progress, ResultStore,
    StepPreview,
};

/// A delivered message: its bytes, and how to tell the source what became of it.
pub trait Delivered: Send + Sync {
    fn body(&self) -> &[u8];
    /// Ack, dead-letter or requeue. Called once, after the result (or failure) is stored.
    fn settle(&self, action: Action) -> BoxFuture<'_, ()>;
}

/// What a job needs from its worker.
#[derive(Clone)]
pub struct JobDeps {
    /// Wire limits (message size) on every delivery.
    pub limits: Limits,
    /// What this worker serves: turns a job into the request its pipeline takes.
    pub catalogue: Arc<Catalogue>,
    /// Written into each job's status as `worker`.
    pub worker: String,
    /// How long to keep retrying a result store while Redis is away before requeueing.
    pub store_retry: Duration,
    /// Starts of one job (counted in its record) beyond which it fails with `attempts`.
    pub max_attempts: u64,
    pub pipeline: Addr<PipelineActor>,
    pub store: Addr<ResultStore>,
    /// Job ids running in this process: a redelivery of one of them (after a reconnect) waits for
    /// it and is then acked as already done instead of running twice.
    pub running: Arc<Mutex<HashSet<String>>>,
    pub lora: LoraManager,
    pub lora_cfg: Arc<LoraConfig>,
    /// One permit per pipeline thread: deliveries beyond them (the prefetch lookahead) wait here
    /// with their LoRAs prefetching, and go back to the queue on shutdown.
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Turns true when the worker stops taking jobs.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

/// Marks a job id as running in this process until dropped.
struct RunningGuard<'a> {
    set: &'a Mutex<HashSet<String>>,
    id: String,
}

impl Drop for RunningGuard<'_> {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// Waits while another delivery of `id` runs here, then claims it (polling every 100 ms: a
/// redelivery during a reconnect is rare, and the wait is not a retry of a failed call).
async fn claim<'a>(set: &'a Mutex<HashSet<String>>, id: &str) -> RunningGuard<'a> {
    loop {
        if set
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string())
        {
            return RunningGuard {
                set,
                id: id.to_string(),
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends a store message, retrying while Redis is away: every 100 ms, doubling up to 2 s, until
/// `store_retry` has passed since the first try (then the last error is the answer). Only a
/// transient Redis fault is retried: a reply that refuses the job's data (`WRONGTYPE`, an expire
/// time out of range) and a closed store mailbox are answers at once.
async fn store_retry<M, T>(deps: &JobDeps, make: impl Fn() -> M) -> Result<T, JobError>
where
    M: Message<Result = Result<T, JobError>> + Send + 'static,
    T: Send + 'static,
    ResultStore: Handler<M>,
{
    let deadline = Instant::now() + deps.store_retry;
    let backoff = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(2))
        .without_max_times();
    let send = || async {
        deps.store
            .send(make())
            .await
            .map_err(JobError::mailbox(STORE))
            .and_then(|r| r)
    };
    send.retry(backoff)
        .when(|e| e.is_transient_store() && Instant::now() < deadline)
        .notify(|_, wait| tracing::warn!(retry_in = ?wait, "redis unavailable; retrying"))
        .await
}

/// The actors a job talks to, as their errors name them.
const STORE: &str = "result store";
const PIPELINE: &str = "pipeline actor";

fn finish_failed(id: &str, err: &JobError, ttl: u64) -> Finish {
    let status = if err.is_cancel() {
        Status::Cancelled
    } else {
        Status::Failed
    };
    Finish {
        id: id.into(),
        status,
        png: None,
        error: Some((err.kind().into(), err.to_string())),
        fields: vec![],
        ttl_s: ttl,
    }
}

/// Runs one delivered message to its end; returns the outcome label (for metrics).
pub async fn process(d: &dyn Delivered, deps: &JobDeps) -> &'static str {
    let job = match decode(d.body(), &deps.limits) {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(id = ?e.id, error = %e.message, "rejecting a message");
            metrics().error(&deps.catalogue.base, "decode");
            if let Some(id) = &e.id {
                let stored = store_retry(deps, || FailUndecoded {
                    id: id.clone(),
                    error: e.message.clone(),
                    ttl_s: DEFAULT_RESULT_TTL_S,
                })
                .await;
                if let Err(s) = stored {
                    if s.action() == Action::Requeue {
                        // the failed status is not stored yet: the message comes back for it
                        tracing::warn!(error = %s, "the failed status could not be stored; requeueing");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        d.settle(Action::Requeue).await;
                        return "requeued";
                    }
                }
            }
            d.settle(Action::DeadLetter).await;
            return "rejected";
        }
    };
    let span = tracing::info_span!(
        "job",
        id = %job.id,
        base = %job.base,
        steps = job.steps,
        controlnets = job.controlnets.len(),
        loras = job.loras.len(),
        outcome = tracing::field::Empty,
        // read by the OpenTelemetry export: a failed job is a span with an error status
        otel.status_code = tracing::field::Empty,
    );
    let outcome = run(d, job, deps).instrument(span.clone()).await;
    span.record("outcome", outcome);
    if outcome == "failed" {
        span.record("otel.status_code", "ERROR");
    }
    outcome
}

async fn run(d: &dyn Delivered, job: Job, deps: &JobDeps) -> &'static str {
    let _claim = claim(&deps.running, &job.id).await;
    let started = Instant::now();
    let names: Vec<String> = job.loras.iter().map(|l| l.name.clone()).collect();
    if !names.is_empty() {
        deps.lora.prefetch(names.clone());
    }
    // wait for a pipeline; a stopping worker gives the job back instead
    let mut shutdown = deps.shutdown.clone();
    let _slot = tokio::select! {
        p = deps.slots.clone().acquire_owned() => match p {
            Ok(p) => p,
            Err(_) => {
                d.settle(Action::Requeue).await;
                return "requeued";
            }
        },
        _ = shutdown.wait_for(|s| *s) => {
            tracing::info!("stopping: the job goes back to the queue");
            d.settle(Action::Requeue).await;
            return "requeued";
        }
    };
    let ttl = job.result_ttl_s;
    let queue_wait_ms = job.submitted_ms.map(|s| now_ms().saturating_sub(s));
    if let Some(w) = queue_wait_ms {
        metrics().queue_wait.observe(w as f64 / 1e3);
    }
    let outcome = async {
        let digest = job
            .digest()
            .map_err(|e| JobError::Invalid(format!("the job cannot be encoded: {e}")))?;
        let begin = deps
            .store
            .send(BeginJob {
                id: job.id.clone(),
                digest: digest.clone(),
                worker: deps.worker.clone(),
                total_steps: job.steps,
                queue_wait_ms,
                ttl_s: ttl,
            })
            .await
            .map_err(JobError::mailbox(STORE))??;
        match begin {
            Begin::AlreadyDone => return Ok("duplicate"),
            Begin::Cancelled => return Ok("cancelled"),
            Begin::Conflict { stored } => return Err(JobError::Conflict { stored, this: digest }),
            Begin::Run { attempts } if attempts > deps.max_attempts => {
                return Err(JobError::Exhausted {
                    attempts,
                    max: deps.max_attempts,
                })
            }
            Begin::Run { attempts } => tracing::info!(attempts, "running"),
        }
        // after the begin: a late redelivery of a job already done is acked, and a late job under
        // another job's id is a conflict, not a failed status written over that job's record
        if let Some(deadline) = job.deadline_ms {
            let now = now_ms();
            if now > deadline {
                return Err(JobError::Deadline {
                    late_ms: now - deadline,
                });
            }
        }
        // LoRAs: known, fetching (a full queue of pending loads holds the job here), merging
        let admitted = if names.is_empty() {
            Default::default()
        } else {
            deps.lora.admit(names.clone()).await?
        };
        // conditioning images, inline or from Redis
        let mut images = Vec::with_capacity(job.controlnets.len());
        for (i, c) in job.controlnets.iter().enumerate() {
            images.push(match &c.image {
                ImageRef::Inline(b) => b.clone(),
                ImageRef::RedisKey(k) => store_retry(deps, || FetchBytes { key: k.clone() })
                    .await
                    .map_err(|e| match e {
                        JobError::Store(e) if !redis_transient(&e) => {
                            JobError::Invalid(format!("ControlNet #{i}: conditioning image key `{k}`: {e}"))
                        }
                        e => e,
                    })?
                    .ok_or_else(|| {
                        JobError::Invalid(format!(
                            "ControlNet #{i}: conditioning image key `{k}` is not in Redis"
                        ))
                    })?,
            });
        }
        // the one validation: the job as a request this worker's pipeline takes (decoding the
        // conditioning PNGs is blocking work: off the event loop)
        let req = {
            let (catalogue, job) = (deps.catalogue.clone(), job.clone());
            tokio::task::spawn_blocking(move || catalogue.request(&job, &images))
                .await
                .map_err(|_| JobError::Mailbox {
                    actor: "request check",
                    reason: Unavailable::Stopped,
                })??
        };
        // the seed it runs with (a job's -1 drawn by the catalogue): recorded, to make it again
        let seed = req.seed;
        // progress forwarder: model thread → Redis; Redis cancel flag → model thread
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<crate::pipeline::StepDone>();
        let cancel = Arc::new(AtomicBool::new(false));
        let fwd = {
            let (store, id, cancel) = (deps.store.clone(), job.id.clone(), cancel.clone());
            tokio::spawn(
                async move {
                    while let Some(s) = rx.recv().await {
                        metrics().step.observe(s.step_ms / 1e3);
                        // a step preview's PNG is encoded here, off the model thread and the
                        // event loop; one that fails to encode is left out
                        let preview = match s.preview {
                            Some(img) => match tokio::task::spawn_blocking(move || img.png()).await {
                                Ok(Ok(png)) => Some(StepPreview {
                                    step: s.step,
                                    png,
                                    ttl_s: ttl,
                                }),
                                Ok(Err(e)) => {
                                    tracing::warn!(error = %e, step = s.step, "preview not encoded");
                                    None
                                }
                                Err(_) => None,
                            },
                            None => None,
                        };
                        let _ = store
                            .send(Progress {
                                id: id.clone(),
                                step: s.step,
                                total: s.total,
                                preview,
                            })
                            .await;
                        if let Ok(Ok(true)) = store.send(CancelRequested { id: id.clone() }).await {
                            cancel.store(true, Ordering::Relaxed);
                        }
                    }
                }
                .in_current_span(),
            )
        };
        let bound = deps.lora_cfg.bound_step(job.steps as usize);
        let (loras, lora_stats) = if names.is_empty() {
            (None, None)
        } else {
            let started = deps
                .lora
                .merge(
                    job.loras.iter().map(|l| (l.name.clone(), l.scale)).collect(),
                    LoraParts::unet_only(job.unet_only),
                )
                .await?;
            (
                Some(JobLoras {
                    pending: started.pending,
                    bound,
                    early: deps.lora_cfg.switch_early,
                    timeout: deps.lora_cfg.timeout,
                }),
                Some(started.stats),
            )
        };
        let t0 = Instant::now();
        let out = deps
            .pipeline
            .send(RunJob {
                req,
                job_id: job.id.clone(),
                loras,
                progress: tx,
                cancel,
                span: tracing::Span::current(),
            })
            .await
            .map_err(JobError::mailbox(PIPELINE))?;
        let _ = fwd.await;
        let out = out?;
        let pipeline_ms = t0.elapsed().as_secs_f64() * 1e3;
        metrics().pipeline.observe(pipeline_ms / 1e3);
        let t = &out.timings;
        let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
        let mut fields = vec![
            ("worker".to_string(), deps.worker.clone()),
            ("seed".into(), seed.to_string()),
            ("step".into(), job.steps.to_string()),
            ("total".into(), job.steps.to_string()),
            ("pipeline_ms".into(), format!("{pipeline_ms:.3}")),
            (
                "service_ms".into(),
                format!("{:.3}", started.elapsed().as_secs_f64() * 1e3),
            ),
            ("text_encode_ms".into(), ms(t.text_encode)),
            ("lora_merge_ms".into(), ms(t.lora_merge)),
            ("controlnet_ms".into(), ms(t.controlnet)),
            ("unet_encoder_ms".into(), ms(t.unet_encoder)),
            ("unet_decoder_ms".into(), ms(t.unet_decoder)),
            ("vae_decode_ms".into(), ms(t.vae_decode)),
            ("scheduler_ms".into(), ms(t.scheduler)),
            ("step_ms".into(), ms(t.per_step())),
            ("first_step_ms".into(), ms(t.first_step)),
        ];
        for (field, t) in [
            ("prompt_truncated", out.prompt_truncated),
            ("negative_prompt_truncated", out.negative_truncated),
        ] {
            if let Some(t) = t {
                tracing::warn!(field, tokens = t.tokens, kept = t.kept, "prompt truncated");
                fields.push((field.into(), t.to_json()));
            }
        }
        if !job.controlnets.is_empty() {
            fields.push(("controlnet_retries".into(), out.controlnet_retries.to_string()));
        }
        metrics().controlnet_retries.inc_by(out.controlnet_retries as u64);
        if let Some(st) = lora_stats {
            let st = st.borrow().clone();
            metrics().lora_hits.inc_by(admitted.hits as u64);
            metrics().lora_loads.inc_by(admitted.loads as u64);
            metrics().lora_wait.observe(t.lora_wait.as_secs_f64());
            fields.extend([
                ("lora_mode".to_string(), deps.lora_cfg.mode.to_string()),
                ("lora_bound_step".into(), bound.to_string()),
                (
                    "lora_switch_step".into(),
                    t.lora_switch_step.map(|s| s.to_string()).unwrap_or_default(),
                ),
                ("lora_wait_ms".into(), ms(t.lora_wait)),
                ("lora_cache_hits".into(), admitted.hits.to_string()),
                ("lora_loads".into(), admitted.loads.to_string()),
                ("lora_load_ms".into(), format!("{:.3}", st.load_ms)),
                ("lora_ready_ms".into(), format!("{:.3}", st.ready_ms)),
            ]);
            if !st.skipped.is_empty() {
                // `unet_only`: what of each file the bundle could not take (a JSON object)
                let skipped: serde_json::Map<String, serde_json::Value> = st
                    .skipped
                    .iter()
                    .map(|(n, w)| (n.clone(), w.clone().into()))
                    .collect();
                fields.push((
                    "lora_skipped".into(),
                    serde_json::Value::Object(skipped).to_string(),
                ));
            }
        }
        store_retry(deps, || Finish {
            id: job.id.clone(),
            status: Status::Done,
            png: Some(out.png.clone()),
            error: None,
            fields: fields.clone(),
            ttl_s: ttl,
        })
        .await?;
        Ok("done")
    }
    .await;

    let outcome = match outcome {
        Ok(o) => {
            d.settle(Action::Ack).await;
            o
        }
        Err(e) => {
            let mut action = e.action();
            tracing::warn!(error = %e, error_kind = e.kind(), ?action, "job did not complete");
            if !e.is_cancel() {
                metrics().error(&deps.catalogue.base, e.kind());
            }
            let stored = match (&e, action) {
                (JobError::Conflict { .. }, _) => {
                    store_retry(deps, || NoteConflict {
                        id: job.id.clone(),
                        error: e.to_string(),
                    })
                    .await
                }
                (_, Action::Requeue) => Ok(()),
                _ => store_retry(deps, || finish_failed(&job.id, &e, ttl)).await,
            };
            if let Err(s) = stored {
                if s.action() == Action::Requeue {
                    // the end is not stored yet (Redis away): the job comes back to store it;
                    // its attempts bound it
                    tracing::warn!(error = %s, "the job's end could not be stored; requeueing");
                    action = Action::Requeue;
                }
            }
            if action == Action::Requeue {
                // a resource is away (Redis, the model thread): do not spin on redeliveries
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            d.settle(action).await;
            match action {
                Action::Ack => "cancelled",
                Action::DeadLetter => "failed",
                Action::Requeue => "requeued",
            }
        }
    };
    metrics().job_latency.observe(started.elapsed().as_secs_f64());
    outcome
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::protocol::{job_key, LoraJob};
    use crate::store::Memory;

    /// A delivery that remembers how it was settled (as RabbitMQ or the embedded mode would).
    struct Fake {
        body: Vec<u8>,
        settled: Mutex<Vec<Action>>,
    }

    impl Fake {
        fn new(body: Vec<u8>) -> Self {
            Fake {
                body,
                settled: Mutex::default(),
            }
        }

        fn of(job: &Job) -> Self {
            Fake::new(job.encode().unwrap())
        }

        fn settled(&self) -> Vec<Action> {
            self.settled.lock().unwrap().clone()
        }
    }

    impl Delivered for Fake {
        fn body(&self) -> &[u8] {
            &self.body
        }

        fn settle(&self, action: Action) -> BoxFuture<'_, ()> {
            self.settled.lock().unwrap().push(action);
            Box::pin(async {})
        }
    }

    /// Deps over the in-memory store (the Lua script's Rust twin), a model thread without a
    /// pipeline (every job that reaches it is requeued) and a stopped LoRA manager.
    fn deps(slots: usize) -> (JobDeps, Arc<Mutex<Memory>>, tokio::sync::watch::Sender<bool>) {
        let (store, mem) = ResultStore::memory(None);
        let pool = Mutex::new(Vec::new());
        let pipeline = SyncArbiter::start(1, move || PipelineActor::from_pool(&pool));
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let deps = JobDeps {
            limits: Limits::default(),
            catalogue: Arc::new(crate::pipeline::catalogue_for_tests()),
            worker: "test".into(),
            store_retry: Duration::from_millis(200),
            max_attempts: 3,
            pipeline,
            store: store.start(),
            running: Default::default(),
            lora: LoraManager::stopped(),
            lora_cfg: Arc::new(LoraConfig::new("/nonexistent".into())),
            slots: Arc::new(tokio::sync::Semaphore::new(slots)),
            shutdown,
        };
        (deps, mem, stop)
    }

    fn record(mem: &Mutex<Memory>, id: &str) -> HashMap<String, String> {
        mem.lock()
            .unwrap()
            .records
            .get(&job_key(id))
            .cloned()
            .unwrap_or_default()
    }

    fn job(id: &str) -> Job {
        Job::new(id, "tiny-sdxl", "a red circle")
    }

    #[test]
    fn a_message_that_does_not_decode_is_dead_lettered_with_a_failed_status() {
        actix::System::new().block_on(async {
            let (deps, mem, _stop) = deps(1);
            let mut bad = job("bad-version");
            bad.v = 99;
            let d = Fake::of(&bad);
            assert_eq!(process(&d, &deps).await, "rejected");
            assert_eq!(d.settled(), [Action::DeadLetter]);
            let r = record(&mem, "bad-version");
            assert_eq!(r["status"], "failed", "{r:?}");
            assert_eq!(r["error_kind"], "decode", "{r:?}");
            assert!(r["error"].contains("schema version 99"), "{r:?}");
            // no id at all: dead-lettered, nothing stored
            let d = Fake::new(b"not msgpack".to_vec());
            assert_eq!(process(&d, &deps).await, "rejected");
            assert_eq!(d.settled(), [Action::DeadLetter]);
        });
    }

    #[test]
    fn a_message_that_does_not_decode_leaves_another_jobs_record_as_it_is() {
        actix::System::new().block_on(async {
            let (deps, mem, _stop) = deps(1);
            mem.lock().unwrap().records.insert(
                job_key("taken-id"),
                HashMap::from([("digest".into(), "d1".into()), ("status".into(), "done".into())]),
            );
            let mut bad = job("taken-id");
            bad.v = 99;
            let d = Fake::of(&bad);
            assert_eq!(process(&d, &deps).await, "rejected");
            assert_eq!(d.settled(), [Action::DeadLetter]);
            let r = record(&mem, "taken-id");
            assert_eq!(r["status"], "done", "{r:?}");
            assert!(r["conflict"].contains("schema version 99"), "{r:?}");
            // a producer's queued record is the message's own: it fails
            mem.lock().unwrap().records.insert(
                job_key("queued-id"),
                HashMap::from([("status".into(), "queued".into())]),
            );
            let mut bad = job("queued-id");
            bad.v = 98;
            assert_eq!(process(&Fake::of(&bad), &deps).await, "rejected");
            assert_eq!(record(&mem, "queued-id")["status"], "failed");
        });
    }

    #[test]
    fn a_late_job_fails_with_deadline_but_never_over_another_jobs_record() {
        actix::System::new().block_on(async {
            let (deps, mem, _stop) = deps(1);
            let mut late = job("late");
            late.deadline_ms = Some(1);
            let d = Fake::of(&late);
            assert_eq!(process(&d, &deps).await, "failed");
            assert_eq!(record(&mem, "late")["error_kind"], "deadline");
            // the same id held by a finished job with other content: a conflict, record kept
            let mut other = job("late-other");
            other.deadline_ms = Some(1);
            mem.lock().unwrap().records.insert(
                job_key(&other.id),
                HashMap::from([
                    ("digest".into(), "someone-else".into()),
                    ("status".into(), "done".into()),
                ]),
            );
            assert_eq!(process(&Fake::of(&other), &deps).await, "failed");
            let r = record(&mem, "late-other");
            assert_eq!(r["status"], "done", "{r:?}");
            assert!(r.contains_key("conflict"), "{r:?}");
            // a late redelivery of a job already done: acked as a duplicate
            let mut done = job("late-done");
            done.deadline_ms = Some(1);
            mem.lock().unwrap().records.insert(
                job_key(&done.id),
                HashMap::from([
                    ("digest".into(), done.digest().unwrap()),
                    ("status".into(), "done".into()),
                ]),
            );
            let d = Fake::of(&done);
            assert_eq!(process(&d, &deps).await, "duplicate");
            assert_eq!(d.settled(), [Action::Ack]);
        });
    }

    #[test]
    fn a_request_out_of_range_is_refused_by_the_one_check_and_dead_lettered() {
        actix::System::new().block_on(async {
            let (deps, mem, _stop) = deps(1);
            let mut bad = job("bad-size");
            bad.width = 7;
            let d = Fake::of(&bad);
            assert_eq!(process(&d, &deps).await, "failed");
            assert_eq!(d.settled(), [Action::DeadLetter]);
            let r = record(&mem, "bad-size");
            assert_eq!(r["status"], "failed", "{r:?}");
            assert!(
                r["error"].contains("width must be a positive multiple of 8"),
                "{r:?}"
            );
        });
    }

    #[test]
    fn a_job_already_done_is_acked_without_running() {
        actix::System::new().block_on(async {
            let (deps, mem, _stop) = deps(1);
            let j = job("done-before");
            let digest = j.digest().unwrap();
            mem.lock().unwrap().records.insert(
                job_key(&j.id),
                HashMap::from([("digest".into(), digest), ("status".into(), "done".into())]),
            );
            let d = Fake::of(&j);
            assert_eq!(process(&d, &deps).await, "duplicate");
            assert_eq!(d.settled(), [Action::Ack]);
        });
    }

    #[test]
    fn an_id_of_another_job_is_dead_lettered_and_the_stored_record_kept() {
        actix::System::new().block_on(async {
            let (deps, mem, _stop) = deps(1);
            let j = job("taken");
            mem.lock().unwrap().records.insert(
                job_key(&j.id),
                HashMap::from([
                    ("digest".into(), "someone-else".into()),
                    ("status".into(), "done".into()),
                ]),
            );
            let d = Fake::of(&j);
            assert_eq!(process(&d, &deps).await, "failed");
            assert_eq!(d.settled(), [Action::DeadLetter]);
            let r = record(&mem, "taken");
            assert_eq!(
                (r["status"].as_str(), r["digest"].as_str()),
                ("done", "someone-else")
            );
            assert!(r["conflict"].contains("already used"), "{r:?}");
        });
    }

    #[test]
    fn a_model_thread_that_cannot_serve_requeues_without_a_failed_status() {
        actix::System::new().block_on(async {
            let (deps, mem, _stop) = deps(1);
            let d = Fake::of(&job("no-pipeline"));
            assert_eq!(process(&d, &deps).await, "requeued");
            assert_eq!(d.settled(), [Action::Requeue]);
            assert_eq!(record(&mem, "no-pipeline")["status"], "running");
        });
    }

    #[test]
    fn a_job_requeued_again_and_again_fails_after_its_attempts() {
        actix::System::new().block_on(async {
            let (deps, mem, _stop) = deps(1);
            let j = job("poisoned");
            for n in 1..=3 {
                let d = Fake::of(&j);
                assert_eq!(process(&d, &deps).await, "requeued", "start {n}");
            }
            let d = Fake::of(&j);
            assert_eq!(process(&d, &deps).await, "failed");
            assert_eq!(d.settled(), [Action::DeadLetter]);
            let r = record(&mem, "poisoned");
            assert_eq!(
                (r["status"].as_str(), r["error_kind"].as_str()),
                ("failed", "attempts")
            );
            assert!(r["error"].contains("started 4 times (the most is 3)"), "{r:?}");
        });
    }

    #[test]
    fn a_stopped_lora_manager_requeues_the_job_naming_itself() {
        actix::System::new().block_on(async {
            let (deps, mem, _stop) = deps(1);
            let mut j = job("with-lora");
            j.loras.push(LoraJob {
                name: "tiny-lora-a".into(),
                scale: 1.0,
            });
            let d = Fake::of(&j);
            assert_eq!(process(&d, &deps).await, "requeued");
            assert_eq!(d.settled(), [Action::Requeue]);
            assert_ne!(record(&mem, "with-lora")["status"], "failed");
        });
    }

    #[test]
    fn a_stopping_worker_gives_a_waiting_job_back() {
        actix::System::new().block_on(async {
            let (deps, mem, stop) = deps(0);
            stop.send(true).unwrap();
            let d = Fake::of(&job("waiting"));
            assert_eq!(process(&d, &deps).await, "requeued");
            assert_eq!(d.settled(), [Action::Requeue]);
            assert!(record(&mem, "waiting").is_empty(), "it never began");
        });
    }

    #[test]
    fn mailbox_errors_name_the_actor() {
        let e = JobError::mailbox(STORE)(actix::MailboxError::Closed);
        assert!(e.to_string().starts_with("result store unavailable"), "{e}");
        assert_eq!((e.action(), e.kind()), (Action::Requeue, "mailbox"));
    }
}
