//! JobConsumer: takes jobs from RabbitMQ, drives each through the store and the pipeline, and
//! acks a delivery only after its result is stored.
//!
//! ```text
//! RabbitMQ katz.jobs.<base> ──Delivery──▶ JobConsumer (prefetch = pipeline threads + lookahead)
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

use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::BoxFuture;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::oneshot;

use crate::error::Action;
use crate::health::{Health, State};
use crate::job::{process, Delivered, JobDeps};
use crate::metrics::metrics;
use crate::protocol::Limits;
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
    /// The worker's state: ready while consuming (crate::health).
    pub health: Health,
}

pub struct JobConsumer {
    cfg: Arc<ConsumerConfig>,
    deps: JobDeps,
    conn: Option<Connection>,
    channel: Option<Channel>,
    tag: String,
    in_flight: usize,
    draining: bool,
    /// Reconnect back-off (200 ms doubling to 5 s), kept by hand: each retry is an actor
    /// `run_later` that must see the actor's state (draining, shutdown) when it fires, which a
    /// retry combinator around one future cannot.
    backoff: Duration,
    stopped: Option<oneshot::Sender<()>>,
    shutdown: tokio::sync::watch::Sender<bool>,
}

impl JobConsumer {
    /// `stopped` fires once the consumer has drained after [`Shutdown`]; `shutdown` is the
    /// sender of `deps.shutdown` (jobs waiting for a pipeline go back to the queue).
    pub fn new(
        cfg: ConsumerConfig,
        deps: JobDeps,
        shutdown: tokio::sync::watch::Sender<bool>,
        stopped: oneshot::Sender<()>,
    ) -> Self {
        let tag = format!("{}-{}", cfg.worker, std::process::id());
        JobConsumer {
            cfg: Arc::new(cfg),
            deps,
            conn: None,
            channel: None,
            tag,
            in_flight: 0,
            draining: false,
            backoff: Duration::from_millis(200),
            stopped: Some(stopped),
            shutdown,
        }
    }

    fn connect(&mut self, ctx: &mut Context<Self>) {
        if self.draining {
            return;
        }
        let cfg = self.cfg.clone();
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
                tracing::info!(queue = %act.cfg.queue, prefetch = act.cfg.prefetch, "consuming");
                act.cfg.health.set_unless_stopping(State::Ready);
                act.conn = Some(conn);
                act.channel = Some(channel);
                act.backoff = Duration::from_millis(200);
                ctx.add_stream(consumer);
            }
            Err(e) => {
                let error = crate::redact::error(&e, &[act.cfg.amqp.as_str()]);
                tracing::warn!(%error, retry_in = ?act.backoff, "cannot reach RabbitMQ");
                if act.cfg.health.get() == State::Ready {
                    act.cfg.health.set(State::Reconnecting);
                }
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
                metrics().in_flight.inc();
                let deps = self.deps.clone();
                let job = async move { process(&d, &deps).await };
                ctx.spawn(job.into_actor(self).map(|outcome, act, ctx| {
                    act.in_flight -= 1;
                    metrics().in_flight.dec();
                    metrics().outcome(&act.deps.catalogue.base, outcome);
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
            self.cfg.health.set_unless_stopping(State::Reconnecting);
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
        self.cfg.health.set(State::Stopping);
        let _ = self.shutdown.send(true);
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

// ───────────────────────────── RabbitMQ deliveries ─────────────────────────────

impl Delivered for Delivery {
    fn body(&self) -> &[u8] {
        &self.data
    }

    fn settle(&self, action: Action) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let res = match action {
                Action::Ack => self.ack(BasicAckOptions::default()).await,
                Action::DeadLetter => self.reject(BasicRejectOptions { requeue: false }).await,
                Action::Requeue => {
                    self.nack(BasicNackOptions {
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
        })
    }
}
