//! `katz controlnet-worker`: serves one ControlNet model's sessions.
//!
//! ```text
//! RabbitMQ katz.controlnet.<model> (prefetch = sessions at once) ─SessionOpen─▶ consumer task
//!    ─RunSession─▶ SessionActor (SyncArbiter thread, its own ControlNet session):
//!        GET katz:cn:<s>:init (gone: the base abandoned it → done) → cond, image
//!        loop: BLPOP katz:cn:<s>:in (idle timeout) → empty: closed → done
//!              residuals(latent_in, t) → RPUSH katz:cn:<s>:out + EXPIRE (f32, or fp16 when
//!              the open asks so: `auto` where the ControlNet computes in fp16, lossless)
//!              (a CUDA IPC step: map the base's latent, run on this GPU, answer with the
//!              handles of the residual buffer — super::ipc)
//!    ◀── done: ack the open (a worker killed mid-session leaves it unacked: redelivered, and the
//!        base's retry has already moved the job to another session)
//! ```
//! Shutdown (the future `run` is given; `katz controlnet-worker` passes SIGTERM/SIGINT): no new
//! sessions; running ones end (the base closes them), then `run` returns.
//!
//! Operability, as the base worker's: with `metrics_addr`, `GET /readyz` (200 `ready` while it
//! consumes; 503 `loading`, `reconnecting`, `stopping`), `GET /healthz` and `GET /metrics`
//! (super::metrics: sessions, steps, step time, errors, its queue's depth, the build).

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix::prelude::*;
use futures_util::StreamExt;
use katz_onnx::bundle::{BaseBundle, ControlNetBundle};
use katz_onnx::controlnet::ControlNet;
use katz_onnx::runtime::SessionOptions;
use katz_onnx::tensor::Tensor;
use katz_onnx::text::Conditioning;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, BasicRejectOptions};
use lapin::types::FieldTable;

use super::ipc::WorkerIpc;
use super::metrics::controlnet_metrics;
use super::wire::{self, controlnet_queue, IpcStep, SessionOpen, WireError};
use crate::health::{Health, State};
use crate::topology;

#[derive(Debug, Clone)]
pub struct ControlNetWorkerConfig {
    pub amqp: String,
    pub redis: String,
    pub bundle: PathBuf,
    /// The base bundle it serves (its ControlNet must fit it).
    pub base: PathBuf,
    pub session: SessionOptions,
    /// Sessions served at once (threads, each with its own ControlNet session).
    pub concurrency: usize,
    pub name: String,
    /// Queue to consume [default: katz.controlnet.<model>].
    pub queue: Option<String>,
    /// A session with no step for this long ends.
    pub idle_timeout: Duration,
    /// Lifetime of the residual lists.
    pub ttl: Duration,
    /// Serve `/metrics`, `/readyz` and `/healthz` here.
    pub metrics_addr: Option<SocketAddr>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlNetWorkerError {
    #[error("loading the ControlNet: {0}")]
    Model(#[from] katz_onnx::Error),
    #[error("runtime: {0}")]
    Io(#[from] std::io::Error),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Why a session ended before its base closed it.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("this session thread holds no ControlNet (more threads than loaded models)")]
    NoModel,
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error("ControlNet step {step}: {source}")]
    Step {
        step: u64,
        #[source]
        source: katz_onnx::Error,
    },
}

impl SessionError {
    /// The `error_kind` label of `katz_controlnet_errors_total` (super::metrics::ERROR_KINDS).
    pub fn kind(&self) -> &'static str {
        match self {
            SessionError::NoModel => "no_model",
            SessionError::Redis(_) => "redis",
            SessionError::Wire(_) => "wire",
            SessionError::Step { .. } => "step",
        }
    }
}

/// Runs one session to its end on a model thread.
#[derive(Message)]
#[rtype(result = "Result<SessionEnd, SessionError>")]
pub struct RunSession {
    pub open: SessionOpen,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionEnd {
    Closed { steps: usize },
    Idle { steps: usize },
    Abandoned,
}

pub struct SessionActor {
    /// The model preloaded for this session thread (`None`: the arbiter started more threads
    /// than models were loaded; such a thread fails its sessions instead of panicking).
    cn: Option<ControlNet>,
    redis: redis::Client,
    idle: Duration,
    ttl: Duration,
}

impl Actor for SessionActor {
    type Context = SyncContext<Self>;
}

impl Handler<RunSession> for SessionActor {
    type Result = Result<SessionEnd, SessionError>;

    fn handle(&mut self, m: RunSession, _: &mut SyncContext<Self>) -> Self::Result {
        let s = &m.open.session;
        let span = tracing::info_span!("session", session = %s, job = %m.open.job, model = %m.open.model);
        if let Some(tp) = &m.open.traceparent {
            crate::trace_context::set_remote_parent(&span, tp);
        }
        let _span = span.entered();
        let Some(cn) = self.cn.as_mut() else {
            return Err(SessionError::NoModel);
        };
        let mut conn = self.redis.get_connection()?;
        let init: Option<Vec<u8>> = redis::cmd("GET").arg(wire::init_key(s)).query(&mut conn)?;
        let Some(init) = init else {
            tracing::info!("session abandoned before it started");
            return Ok(SessionEnd::Abandoned);
        };
        let (_, t) = wire::decode(&init)?;
        let [prompt_embeds, pooled, time_ids, image]: [Tensor; 4] =
            t.try_into().map_err(|v: Vec<Tensor>| WireError::TensorCount {
                what: "session init",
                got: v.len(),
                want: 4,
            })?;
        let cond = Conditioning {
            prompt_embeds,
            pooled,
            time_ids,
        };
        // residuals in fp16 where the base asks and (for `auto`) where that is exact
        let half = m.open.residuals.half(cn.computes_fp16());
        tracing::info!(model = %cn.name(), ipc = m.open.ipc.is_some(), half, "session started");
        let mut steps = 0;
        // the CUDA IPC side (mappings, the residual buffer), freed when the session ends
        let mut ipc: Option<WorkerIpc> = None;
        loop {
            let got: Option<(String, Vec<u8>)> = redis::cmd("BLPOP")
                .arg(wire::in_key(s))
                .arg(self.idle.as_secs_f64())
                .query(&mut conn)?;
            let Some((_, payload)) = got else {
                tracing::info!(steps, "session idle; ending it");
                return Ok(SessionEnd::Idle { steps });
            };
            if payload.is_empty() {
                tracing::info!(steps, "session closed");
                return Ok(SessionEnd::Closed { steps });
            }
            let t0 = Instant::now();
            if let Some(m) = wire::decode_ipc::<IpcStep>(&payload) {
                let m = m?;
                let r = WorkerIpc::serve(&mut ipc, cn, &cond, &image, &m, half);
                if let Some(e) = &r.error {
                    tracing::warn!(step = m.step, error = %e, "CUDA IPC step refused");
                }
                reply(self.ttl, &mut conn, s, wire::encode_ipc(&r)?)?;
                steps += 1;
                controlnet_metrics().step(cn.name(), t0.elapsed().as_secs_f64());
                tracing::debug!(
                    step = m.step,
                    ms = t0.elapsed().as_secs_f64() * 1e3,
                    "residuals sent (CUDA IPC)"
                );
                continue;
            }
            let (step, inputs) = wire::decode(&payload)?;
            let [latent_in, timestep]: [Tensor; 2] =
                inputs
                    .try_into()
                    .map_err(|v: Vec<Tensor>| WireError::TensorCount {
                        what: "a step input",
                        got: v.len(),
                        want: 2,
                    })?;
            let res = cn
                .residuals(&latent_in, &timestep, &cond, &image)
                .map_err(|source| SessionError::Step { step, source })?;
            let refs: Vec<&Tensor> = res.iter().collect();
            reply(self.ttl, &mut conn, s, wire::encode_as(step, &refs, half))?;
            steps += 1;
            controlnet_metrics().step(cn.name(), t0.elapsed().as_secs_f64());
            tracing::debug!(step, ms = t0.elapsed().as_secs_f64() * 1e3, "residuals sent");
        }
    }
}

/// RPUSH a step's answer to the session's `out` list (with its TTL).
fn reply(
    ttl: Duration,
    conn: &mut redis::Connection,
    session: &str,
    out: Vec<u8>,
) -> Result<(), SessionError> {
    redis::pipe()
        .cmd("RPUSH")
        .arg(wire::out_key(session))
        .arg(out)
        .ignore()
        .cmd("EXPIRE")
        .arg(wire::out_key(session))
        .arg(ttl.as_secs().max(1))
        .ignore()
        .query::<()>(conn)?;
    Ok(())
}

/// Runs a ControlNet worker until `shutdown` resolves, then waits for the sessions running (the
/// base closes them) and returns. Blocks the calling thread (its own runtime and actix system).
/// With `metrics_addr`, the probes and metrics answer from the start (`loading` while the models
/// load).
pub fn run(
    cfg: ControlNetWorkerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControlNetWorkerError> {
    let health = Health::new();
    let n = cfg.concurrency.max(1);
    let redis = redis::Client::open(cfg.redis.as_str()).map_err(|e| {
        katz_onnx::Error::controlnet_transport(format!("Redis URL {}", crate::redact::url(&cfg.redis)), e)
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let sys = actix::System::with_tokio_rt(move || rt);
    let (idle, ttl) = (cfg.idle_timeout, cfg.ttl);
    sys.block_on(async move {
        if let Some(addr) = cfg.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ControlNetWorkerError::Metrics { addr, source })?;
            tracing::info!(%addr, "metrics on /metrics, probes on /readyz and /healthz");
            tokio::spawn(crate::metrics::serve(
                listener,
                health.clone(),
                super::metrics::render,
            ));
        }
        // the models load on this thread; the probes answer `loading` meanwhile
        let base = BaseBundle::open(&cfg.base)?;
        let mut models: Vec<ControlNet> = Vec::with_capacity(n);
        for _ in 0..n {
            // the sessions share one copy of the weights the graph takes as inputs
            let shared = models.first().and_then(ControlNet::weights);
            models.push(ControlNet::load_sharing(
                ControlNetBundle::open(&cfg.bundle)?,
                &base,
                &cfg.session,
                2,
                shared,
            )?);
        }
        let model = models[0].name().to_string();
        let queue = cfg.queue.clone().unwrap_or_else(|| controlnet_queue(&model));
        let m = controlnet_metrics();
        m.start(&model);
        tokio::spawn(crate::queue_depth::poll(crate::queue_depth::QueuePoll {
            amqp: cfg.amqp.clone(),
            name: format!("{}-queue-depth", cfg.name),
            queues: vec![queue.clone()],
            every: crate::queue_depth::EVERY,
            gauges: m.queues.clone(),
        }));
        let pool = Mutex::new(models);
        let sessions = SyncArbiter::start(n, move || SessionActor {
            cn: pool.lock().ok().and_then(|mut p| p.pop()),
            redis: redis.clone(),
            idle,
            ttl,
        });
        tracing::info!(worker = %cfg.name, %queue, model = %model, concurrency = n, "ControlNet worker started");
        tokio::pin!(shutdown);
        let running = std::sync::Arc::new(tokio::sync::Semaphore::new(n));
        // reconnect back-off by hand: each wait races the signals, and a session stream that ends
        // after a good connection resets it — neither fits a retry combinator around one future
        let mut backoff = Duration::from_millis(200);
        'outer: loop {
            let connected = async {
                let conn = topology::connect(&cfg.amqp, &cfg.name).await?;
                let ch = conn.create_channel().await?;
                topology::declare(&ch, &queue).await?;
                ch.basic_qos(n as u16, BasicQosOptions::default()).await?;
                let consumer = ch
                    .basic_consume(
                        queue.as_str().into(),
                        cfg.name.as_str().into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                Ok::<_, lapin::Error>((conn, ch, consumer))
            }
            .await;
            let (_conn, _ch, mut consumer) = match connected {
                Ok(c) => c,
                Err(e) => {
                    let error = crate::redact::error(&e, &[cfg.amqp.as_str()]);
                    tracing::warn!(%error, retry_in = ?backoff, "cannot reach RabbitMQ");
                    // as the base worker: `loading` until the first connection, then `reconnecting`
                    if health.get() == State::Ready {
                        health.set(State::Reconnecting);
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut shutdown => break 'outer,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(200);
            tracing::info!(%queue, prefetch = n, "consuming");
            health.set_unless_stopping(State::Ready);
            loop {
                tokio::select! {
                    _ = &mut shutdown => { tracing::info!("shutdown: no new sessions"); break 'outer; }
                    d = consumer.next() => match d {
                        Some(Ok(d)) => {
                            let open = match SessionOpen::decode(&d.data) {
                                Ok(o) if o.model == model => o,
                                Ok(o) => {
                                    tracing::warn!(model = %o.model, "session for another model; dead-lettering");
                                    m.error(&model, "bad_request");
                                    let _ = d.reject(BasicRejectOptions { requeue: false }).await;
                                    continue;
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "bad session-open message; dead-lettering");
                                    m.error(&model, "bad_request");
                                    let _ = d.reject(BasicRejectOptions { requeue: false }).await;
                                    continue;
                                }
                            };
                            let (sessions, permit) = (sessions.clone(), running.clone().acquire_owned().await);
                            let model = model.clone();
                            tokio::spawn(async move {
                                let _permit = permit;
                                m.session_started(&model);
                                let end = match sessions.send(RunSession { open }).await {
                                    Ok(Ok(end)) => {
                                        tracing::debug!(?end, "session ended");
                                        match end {
                                            SessionEnd::Closed { .. } => "closed",
                                            SessionEnd::Idle { .. } => "idle",
                                            SessionEnd::Abandoned => "abandoned",
                                        }
                                    }
                                    Ok(Err(e)) => {
                                        tracing::warn!(error = %e, error_kind = e.kind(), "session failed");
                                        m.error(&model, e.kind());
                                        "failed"
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, "session thread unavailable");
                                        m.error(&model, "mailbox");
                                        "failed"
                                    }
                                };
                                m.session_ended(&model, end);
                                let _ = d.ack(BasicAckOptions::default()).await;
                            });
                        }
                        Some(Err(e)) => {
                            tracing::warn!(error = %e, "consumer error");
                            health.set_unless_stopping(State::Reconnecting);
                            break;
                        }
                        None => {
                            tracing::warn!("lost the RabbitMQ consumer; reconnecting");
                            health.set_unless_stopping(State::Reconnecting);
                            break;
                        }
                    }
                }
            }
        }
        health.set(State::Stopping);
        // drain: wait for the sessions running now (the base closes them)
        let _ = running.acquire_many(n as u32).await;
        health.set(State::Stopped);
        tracing::info!("drained; stopping");
        Ok::<_, ControlNetWorkerError>(())
    })?;
    Ok(())
}
