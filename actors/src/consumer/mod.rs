//! JobConsumer: takes jobs from RabbitMQ, drives each through the store and the pipeline, and
//! acks a delivery only after its result is stored.
//!
//! ```text
//! RabbitMQ katz.jobs.<base> ──Delivery──▶ JobConsumer (prefetch = jobs in flight)
//!   decode + limits ──bad──▶ Finish(failed) ─▶ reject ─▶ katz.jobs.<base>.dead
//!   BeginJob (idempotency by id + digest) ──done──▶ ack        ──conflict──▶ dead letter
//!   images (inline | Redis key) ─▶ RunJob ─▶ PipelineActor ─StepDone─▶ forwarder ─▶ Progress
//!   Finish(done, png) with retries ─▶ ack        error ─▶ Action: dead letter | requeue
//! ```
//!
//! The connection is re-made with back-off when RabbitMQ goes away; deliveries not acked by
//! then are redelivered by the broker, and [`crate::store::Begin`] makes the second run free
//! when the first one stored its result.

pub mod messages;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::error::{Action, JobError};
use crate::metrics::metrics;
use crate::pipeline::{PipelineActor, RunJob};
use crate::protocol::{decode, now_ms, ImageRef, Job, Limits, Status, DEFAULT_RESULT_TTL_S};
use crate::store::{
    Begin, BeginJob, CancelRequested, FetchBytes, Finish, NoteConflict, Progress, ResultStore,
};
use crate::topology;
pub use messages::*;

#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    pub amqp: String,
    pub queue: String,
    /// Deliveries in flight at once (AMQP prefetch).
    pub prefetch: u16,
    pub limits: Limits,
    /// Written into each job's status as `worker`.
    pub worker: String,
    /// How long to keep retrying a result store while Redis is away before requeueing.
    pub store_retry: Duration,
}

#[derive(Clone)]
struct Deps {
    cfg: Arc<ConsumerConfig>,
    pipeline: Addr<PipelineActor>,
    store: Addr<ResultStore>,
}

pub struct JobConsumer {
    deps: Deps,
    conn: Option<Connection>,
    channel: Option<Channel>,
    tag: String,
    in_flight: usize,
    draining: bool,
    backoff: Duration,
    stopped: Option<oneshot::Sender<()>>,
}

impl JobConsumer {
    /// `stopped` fires once the consumer has drained after [`Shutdown`].
    pub fn new(
        cfg: ConsumerConfig,
        pipeline: Addr<PipelineActor>,
        store: Addr<ResultStore>,
        stopped: oneshot::Sender<()>,
    ) -> Self {
        let tag = format!("{}-{}", cfg.worker, std::process::id());
        JobConsumer {
            deps: Deps {
                cfg: Arc::new(cfg),
                pipeline,
                store,
            },
            conn: None,
            channel: None,
            tag,
            in_flight: 0,
            draining: false,
            backoff: Duration::from_millis(200),
            stopped: Some(stopped),
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.draining {
            return;
        }
        let cfg = self.deps.cfg.clone();
        let tag = self.tag.clone();
        let fut = async move {
            let conn = topology::connect(&cfg.amqp, &cfg.worker).await?;
            let channel = conn.create_channel().await?;
            topology::declare(&channel, &cfg.queue).await?;
            channel
                .basic_qos(cfg.prefetch, BasicQosOptions::default())
                .await?;
            let consumer = channel
                .basic_consume(
                    cfg.queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>((conn, channel, consumer))
        };
        ctx.spawn(fut.into_actor(self).map(|res, act, ctx| match res {
            Ok((conn, channel, consumer)) => {
                tracing::info!(queue = %act.deps.cfg.queue, prefetch = act.deps.cfg.prefetch, "consuming");
                act.conn = Some(conn);
                act.channel = Some(channel);
                act.backoff = Duration::from_millis(200);
                ctx.add_stream(consumer);
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?act.backoff, "cannot reach RabbitMQ");
                let wait = act.backoff;
                act.backoff = (act.backoff * 2).min(Duration::from_secs(5));
                ctx.run_later(wait, |act, ctx| act.connect(ctx));
            }
        }));
    }

    fn maybe_finish(&mut self, ctx: &mut Context<Self>) {
        if !self.draining || self.in_flight > 0 {
            return;
        }
        let (conn, channel) = (self.conn.take(), self.channel.take());
        let fut = async move {
            if let Some(ch) = channel {
                let _ = ch.close(200, "worker stopping".into()).await;
            }
            if let Some(c) = conn {
                let _ = c.close(200, "worker stopping".into()).await;
            }
        };
        ctx.spawn(fut.into_actor(self).map(|_, act, ctx| {
            tracing::info!("drained; stopping");
            if let Some(tx) = act.stopped.take() {
                let _ = tx.send(());
            }
            ctx.stop();
        }));
    }
}

impl Actor for JobConsumer {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.connect(ctx);
    }
}

impl StreamHandler<Result<Delivery, lapin::Error>> for JobConsumer {
    fn handle(&mut self, item: Result<Delivery, lapin::Error>, ctx: &mut Context<Self>) {
        match item {
            Ok(d) => {
                self.in_flight += 1;
                metrics().in_flight.fetch_add(1, Ordering::Relaxed);
                let deps = self.deps.clone();
                ctx.spawn(process(d, deps).into_actor(self).map(|outcome, act, ctx| {
                    act.in_flight -= 1;
                    metrics().in_flight.fetch_sub(1, Ordering::Relaxed);
                    metrics().outcome(outcome);
                    act.maybe_finish(ctx);
                }));
            }
            Err(e) => tracing::warn!(error = %e, "consumer error"),
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        if self.draining {
            // our own basic_cancel ended the stream: keep the channel, in-flight jobs still ack on it
            self.maybe_finish(ctx);
        } else {
            // dropping the last handles closes them; unacked deliveries return to the queue
            self.conn = None;
            self.channel = None;
            tracing::warn!("lost the RabbitMQ consumer; reconnecting");
            let wait = self.backoff;
            ctx.run_later(wait, |act, ctx| act.connect(ctx));
        }
    }
}

impl Handler<Shutdown> for JobConsumer {
    type Result = ();

    fn handle(&mut self, _: Shutdown, ctx: &mut Context<Self>) {
        if self.draining {
            return;
        }
        tracing::info!(
            in_flight = self.in_flight,
            "shutdown: no new jobs; finishing those in flight"
        );
        self.draining = true;
        if let Some(ch) = self.channel.clone() {
            let tag = self.tag.clone();
            ctx.spawn(
                async move {
                    let _ = ch
                        .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                        .await;
                }
                .into_actor(self),
            );
        }
        self.maybe_finish(ctx);
    }
}

impl Handler<InFlight> for JobConsumer {
    type Result = usize;

    fn handle(&mut self, _: InFlight, _: &mut Context<Self>) -> usize {
        self.in_flight
    }
}

// ───────────────────────────── one delivery ─────────────────────────────

async fn ack(d: &Delivery) {
    settle(d, Action::Ack).await
}

async fn settle(d: &Delivery, action: Action) {
    let res = match action {
        Action::Ack => d.ack(BasicAckOptions::default()).await,
        Action::DeadLetter => d.reject(BasicRejectOptions { requeue: false }).await,
        Action::Requeue => {
            d.nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
        }
    };
    match res {
        Ok(true) => {}
        Ok(false) => tracing::warn!(
            ?action,
            "delivery not settled: its channel is gone; the broker will redeliver"
        ),
        Err(e) => {
            tracing::warn!(error = %e, ?action, "settling the delivery failed; the broker will redeliver")
        }
    }
}

/// Sends a store message, retrying while Redis is away (up to `store_retry`).
async fn store_retry<M>(deps: &Deps, make: impl Fn() -> M) -> Result<M::Result, JobError>
where
    M: Message + Send + 'static,
    M::Result: Send,
    ResultStore: Handler<M>,
    M::Result: IsStoreResult,
{
    let deadline = Instant::now() + deps.cfg.store_retry;
    let mut wait = Duration::from_millis(100);
    loop {
        match deps.store.send(make()).await {
            Ok(r) if r.ok() || Instant::now() >= deadline => return Ok(r),
            Ok(_) => {}
            Err(e) => return Err(JobError::Mailbox(e.to_string())),
        }
        tracing::warn!(retry_in = ?wait, "redis unavailable; retrying");
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(2));
    }
}

trait IsStoreResult {
    fn ok(&self) -> bool;
}
impl<T> IsStoreResult for Result<T, JobError> {
    fn ok(&self) -> bool {
        self.is_ok()
    }
}

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

async fn process(d: Delivery, deps: Deps) -> &'static str {
    let job = match decode(&d.data, &deps.cfg.limits) {
        Ok(j) => j,
        Err(e) => {
            tracing::warn!(id = ?e.id, error = %e.message, "rejecting a message");
            let err = JobError::Decode(e.clone());
            if let Some(id) = &e.id {
                let _ = store_retry(&deps, || finish_failed(id, &err, DEFAULT_RESULT_TTL_S)).await;
            }
            settle(&d, Action::DeadLetter).await;
            return "rejected";
        }
    };
    let span = tracing::info_span!("job", id = %job.id, base = %job.base, steps = job.steps);
    run(d, job, deps).instrument(span).await
}

async fn run(d: Delivery, job: Job, deps: Deps) -> &'static str {
    let started = Instant::now();
    let ttl = job.result_ttl_s;
    let queue_wait_ms = job.submitted_ms.map(|s| now_ms().saturating_sub(s));
    if let Some(w) = queue_wait_ms {
        metrics().queue_wait.observe(w as f64 / 1e3);
    }
    let outcome = async {
        if let Some(deadline) = job.deadline_ms {
            let now = now_ms();
            if now > deadline {
                return Err(JobError::Deadline {
                    late_ms: now - deadline,
                });
            }
        }
        let begin = deps
            .store
            .send(BeginJob {
                id: job.id.clone(),
                digest: job.digest(),
                worker: deps.cfg.worker.clone(),
                total_steps: job.steps,
                queue_wait_ms,
            })
            .await
            .map_err(|e| JobError::Mailbox(e.to_string()))??;
        match begin {
            Begin::AlreadyDone => return Ok("duplicate"),
            Begin::Cancelled => return Ok("cancelled"),
            Begin::Conflict { stored } => {
                return Err(JobError::Conflict {
                    stored,
                    this: job.digest(),
                })
            }
            Begin::Run { attempts } => tracing::info!(attempts, "running"),
        }
        // conditioning images, inline or from Redis
        let mut images = Vec::with_capacity(job.controlnets.len());
        for c in &job.controlnets {
            images.push(match &c.image {
                ImageRef::Inline(b) => b.clone(),
                ImageRef::RedisKey(k) => store_retry(&deps, || FetchBytes { key: k.clone() })
                    .await??
                    .ok_or_else(|| {
                        JobError::Invalid(format!("conditioning image key `{k}` is not in Redis"))
                    })?,
            });
        }
        // progress forwarder: model thread → Redis; Redis cancel flag → model thread
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<crate::pipeline::StepDone>();
        let cancel = Arc::new(AtomicBool::new(false));
        let fwd = {
            let (store, id, cancel) = (deps.store.clone(), job.id.clone(), cancel.clone());
            tokio::spawn(
                async move {
                    while let Some(s) = rx.recv().await {
                        metrics().step.observe(s.step_ms / 1e3);
                        let _ = store
                            .send(Progress {
                                id: id.clone(),
                                step: s.step,
                                total: s.total,
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
        let t0 = Instant::now();
        let out = deps
            .pipeline
            .send(RunJob {
                job: job.clone(),
                images,
                progress: tx,
                cancel,
                span: tracing::Span::current(),
            })
            .await
            .map_err(|e| JobError::Mailbox(e.to_string()))?;
        let _ = fwd.await;
        let out = out?;
        let pipeline_ms = t0.elapsed().as_secs_f64() * 1e3;
        metrics().pipeline.observe(pipeline_ms / 1e3);
        let t = &out.timings;
        let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1e3);
        let fields = vec![
            ("worker".to_string(), deps.cfg.worker.clone()),
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
            ("step_ms".into(), ms(t.per_step())),
        ];
        store_retry(&deps, || Finish {
            id: job.id.clone(),
            status: Status::Done,
            png: Some(out.png.clone()),
            error: None,
            fields: fields.clone(),
            ttl_s: ttl,
        })
        .await??;
        Ok("done")
    }
    .await;

    let outcome = match outcome {
        Ok(o) => {
            ack(&d).await;
            o
        }
        Err(e) => {
            let action = e.action();
            tracing::warn!(error = %e, ?action, "job did not complete");
            match (&e, action) {
                (JobError::Conflict { .. }, _) => {
                    let _ = store_retry(&deps, || NoteConflict {
                        id: job.id.clone(),
                        error: e.to_string(),
                    })
                    .await;
                }
                (_, Action::Requeue) => {}
                _ => {
                    let _ = store_retry(&deps, || finish_failed(&job.id, &e, ttl)).await;
                }
            }
            if action == Action::Requeue {
                // a resource is away (Redis, the model thread): do not spin on redeliveries
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            settle(&d, action).await;
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
