//! A worker: loads the models, starts the actors, serves metrics, and stops cleanly when its
//! shutdown future resolves (no new jobs; those in flight finish, are stored and acked; `run`
//! returns). The caller chooses what stops it: `katz worker` passes SIGTERM/SIGINT
//! (`src/cmd/worker.rs`), tests pass a channel.
//!
//! ```text
//! WorkerConfig ─models()─▶ LoadedPipeline × concurrency (weights shared) ─▶ PipelineActor (SyncArbiter)
//!   RabbitMQ ─▶ JobConsumer ─▶ JobDeps { store: ResultStore (Redis), lora: LoraManager, … }
//!   shutdown.await ─Shutdown─▶ JobConsumer: cancel the consumer, drain, close ─▶ run returns
//!   Health: loading → ready (consuming) → stopping → stopped, on /readyz and in the heartbeat
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::config::ConfigError;
pub use crate::config::WorkerConfig;
use crate::consumer::{ConsumerConfig, JobConsumer, Shutdown};
use crate::health::{Beat, Health, State};
use crate::job::JobDeps;
use crate::lora::{LoraManager, LoraStore};
use crate::pipeline::{LoadedPipeline, PipelineActor};
use crate::protocol::jobs_queue;
use crate::store::ResultStore;

/// How often the worker writes its heartbeat (`katz:worker:<name>`, expiring after 3 periods).
pub const HEARTBEAT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("loading models: {0}")]
    Models(#[from] katz_onnx::Error),
    #[error("redis at {url}: {source}")]
    Redis { url: String, source: redis::RedisError },
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("LoRA store: {0}")]
    Lora(String),
    #[error("runtime: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs a worker until `shutdown` resolves, then drains: the consumer is cancelled (deliveries
/// taken but not started go back to the queue), the jobs running finish, are stored and acked,
/// and `run` returns. Blocks the calling thread (it runs its own runtime and actix system).
pub fn run(cfg: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
    let health = Health::new();
    let models = cfg.models()?;
    let (limits, worker_name) = (cfg.limits(), cfg.worker_name());
    // Load every pipeline before taking any job: a bad bundle fails the start, loudly.
    let n = cfg.concurrency.max(1);
    let mut actors: Vec<LoadedPipeline> = Vec::with_capacity(n);
    for _ in 0..n {
        let shared = actors.first().map(|a| a.shared_weights());
        actors.push(LoadedPipeline::load(&models, shared)?);
    }
    let weights = actors[0].shared_weights();
    let base = actors[0].base_name().to_string();
    let catalogue = Arc::new(actors[0].catalogue(&limits));
    let queue = cfg.queue.clone().unwrap_or_else(|| jobs_queue(&base));
    let pool = Mutex::new(actors);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let sys = actix::System::with_tokio_rt(move || rt);
    let result: Result<(), WorkerError> = sys.block_on(async move {
        let store = connect_redis(&cfg.redis).await?.start();
        let beat = Beat {
            worker: worker_name.clone(),
            base: base.clone(),
            queue: queue.clone(),
            device: models.session.device.to_string(),
            concurrency: n,
            every: HEARTBEAT,
        };
        let heartbeat = match redis::Client::open(cfg.redis.as_str()) {
            Ok(c) => match redis::aio::ConnectionManager::new(c).await {
                Ok(conn) => Some(tokio::spawn(crate::health::heartbeat(conn, beat, health.clone()))),
                Err(e) => {
                    tracing::warn!(error = %e, "no heartbeat: Redis connection failed");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "no heartbeat: bad Redis URL");
                None
            }
        };
        let rt = tokio::runtime::Handle::current();
        let pipeline = SyncArbiter::start(n, move || {
            PipelineActor::from_pool(&pool).with_runtime(rt.clone())
        });
        if let Some(addr) = cfg.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| WorkerError::Metrics { addr, source })?;
            tracing::info!(%addr, "metrics on /metrics, probes on /readyz and /healthz");
            actix::spawn(crate::metrics::serve(listener, health.clone()));
        }
        let lora_store = LoraStore::open(&models.lora)
            .await
            .map_err(|e| WorkerError::Lora(e.to_string()))?;
        let lora = LoraManager::spawn(&models.lora, lora_store, weights);
        let (stopped_tx, stopped_rx) = oneshot::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let deps = JobDeps {
            limits: limits.clone(),
            catalogue,
            worker: worker_name.clone(),
            store_retry: cfg.store_retry,
            pipeline,
            store,
            running: Default::default(),
            lora,
            lora_cfg: Arc::new(models.lora.clone()),
            slots: Arc::new(tokio::sync::Semaphore::new(n)),
            shutdown: shutdown_rx,
        };
        let consumer = JobConsumer::new(
            ConsumerConfig {
                amqp: cfg.amqp.clone(),
                queue: queue.clone(),
                prefetch: (n + cfg.lookahead) as u16,
                limits,
                worker: worker_name.clone(),
                store_retry: cfg.store_retry,
                health: health.clone(),
            },
            deps,
            shutdown_tx,
            stopped_tx,
        )
        .start();
        tracing::info!(worker = %worker_name, %queue, base = %base, concurrency = n, "worker started");
        shutdown.await;
        // a consumer that is gone has dropped `stopped_tx`: the wait below ends too
        health.set(State::Stopping);
        let _ = consumer.send(Shutdown).await;
        let _ = stopped_rx.await;
        health.set(State::Stopped);
        if let Some(h) = heartbeat {
            // its last write says `stopped`; a Redis that is away does not hold the exit up
            let _ = tokio::time::timeout(Duration::from_secs(2), h).await;
        }
        Ok(())
    });
    result
}

async fn connect_redis(url: &str) -> Result<ResultStore, WorkerError> {
    use backon::{ExponentialBuilder, Retryable};
    // 200 ms doubling to 3 s, 20 retries (about 50 s) before the start fails
    let backoff = ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(3))
        .with_max_times(20);
    (|| ResultStore::connect(url))
        .retry(backoff)
        .notify(|e, wait| tracing::warn!(error = %e, retry_in = ?wait, "cannot reach Redis"))
        .await
        .map_err(|source| WorkerError::Redis {
            url: url.into(),
            source,
        })
}
