//! A worker: loads the models, starts the actors, serves metrics, and stops cleanly when its
//! shutdown future resolves (no new jobs; those in flight finish, are stored and acked; `run`
//! returns). The caller chooses what stops it: `katz worker` passes SIGTERM/SIGINT
//! (`src/cmd/worker.rs`), tests pass a channel.
//!
//! ```text
//! WorkerConfig ─models()─▶ SyncArbiter × concurrency: each model thread loads + warms up its
//!                          LoadedPipeline (weights shared) ─▶ PipelineActor
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
///
/// Each model thread loads its own pipeline (one after another, the first one's weights shared
/// by the rest) and warms it up: CUDA graphs are captured on the thread that replays them, and
/// the first job finds every shape bucket run once. The heartbeat and `/readyz` say `loading`
/// meanwhile; the worker consumes only when every pipeline is loaded.
pub fn run(cfg: WorkerConfig, shutdown: impl Future<Output = ()>) -> Result<(), WorkerError> {
    let started = std::time::Instant::now();
    let health = Health::new();
    let models = cfg.models()?;
    let (limits, worker_name) = (cfg.limits(), cfg.worker_name());
    let n = cfg.concurrency.max(1);
    let base = katz_onnx::bundle::BaseBundle::open(&models.base)?.manifest.name;
    let queue = cfg.queue.clone().unwrap_or_else(|| jobs_queue(&base));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let sys = actix::System::with_tokio_rt(move || rt);
    let controlnets_served = Arc::new(std::sync::OnceLock::new());
    let result: Result<(), WorkerError> = sys.block_on(async move {
        let beat = Beat {
            worker: worker_name.clone(),
            base: base.clone(),
            queue: queue.clone(),
            device: models.session.device.to_string(),
            concurrency: n,
            every: HEARTBEAT,
            controlnets: controlnets_served.clone(),
            lora_dir: Some(models.lora.dir.clone()),
            lora_redis: models.lora.redis.is_some(),
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
        if let Some(addr) = cfg.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| WorkerError::Metrics { addr, source })?;
            tracing::info!(%addr, "metrics on /metrics, probes on /readyz and /healthz");
            actix::spawn(crate::metrics::serve(
                listener,
                health.clone(),
                crate::metrics::render,
            ));
        }
        crate::metrics::metrics().start(&base);
        // the job queue and the queues of the ControlNet workers this worker's sessions go to
        let mut queues = vec![queue.clone()];
        queues.extend(models.controlnet_services.iter().map(|m| m.queue.clone()));
        actix::spawn(crate::queue_depth::poll(crate::queue_depth::QueuePoll {
            amqp: cfg.amqp.clone(),
            name: format!("{worker_name}-queue-depth"),
            queues,
            every: crate::queue_depth::EVERY,
            gauges: crate::metrics::metrics().queues.clone(),
        }));
        // Load every pipeline before taking any job, each on its model thread: a bad bundle
        // fails the start, loudly.
        let (loaded_tx, mut loaded_rx) = tokio::sync::mpsc::unbounded_channel();
        let loader = Arc::new(Loader {
            models: models.clone(),
            limits: limits.clone(),
            shared: Mutex::new(None),
            done: loaded_tx,
        });
        let rt = tokio::runtime::Handle::current();
        let pipeline = SyncArbiter::start(n, move || loader.load().with_runtime(rt.clone()));
        let mut first: Option<Loaded> = None;
        for _ in 0..n {
            match loaded_rx.recv().await {
                Some(Ok(l)) => {
                    first.get_or_insert(l);
                }
                Some(Err(e)) => return Err(WorkerError::Models(e)),
                None => {
                    return Err(WorkerError::Models(katz_onnx::Error::Gpu(
                        "a model thread ended before its pipeline loaded".into(),
                    )))
                }
            }
        }
        let Some(Loaded { weights, catalogue }) = first else {
            unreachable!("n ≥ 1 pipelines reported")
        };
        let _ = controlnets_served.set(catalogue.controlnets.keys().cloned().collect());
        tracing::info!(
            ms = started.elapsed().as_millis() as u64,
            pipelines = n,
            "models loaded"
        );
        let store = connect_redis(&cfg.redis).await?.start();
        let lora_store = LoraStore::open(&models.lora)
            .await
            .map_err(|e| WorkerError::Lora(e.to_string()))?;
        let lora = LoraManager::spawn(&models.lora, lora_store, weights);
        let (stopped_tx, stopped_rx) = oneshot::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let deps = JobDeps {
            limits: limits.clone(),
            catalogue: Arc::new(catalogue),
            worker: worker_name.clone(),
            store_retry: cfg.store_retry,
            max_attempts: cfg.max_attempts.max(1),
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

/// What a model thread reports when its pipeline is loaded.
struct Loaded {
    weights: Arc<katz_onnx::weights::Weights>,
    catalogue: crate::pipeline::Catalogue,
}

/// Loads one pipeline per model thread (the `SyncArbiter` factory runs on each thread).
struct Loader {
    models: crate::pipeline::Models,
    limits: crate::protocol::Limits,
    /// The first pipeline's pristine weights, which the others share; the lock also keeps the
    /// loads one after another (a CUDA-graph capture wants no other thread on the GPU).
    shared: Mutex<Option<Arc<katz_onnx::weights::Weights>>>,
    done: tokio::sync::mpsc::UnboundedSender<katz_onnx::Result<Loaded>>,
}

impl Loader {
    /// On a model thread: loads (and warms up) its pipeline and reports it; a thread whose load
    /// failed holds none (the worker stops on the report).
    fn load(&self) -> PipelineActor {
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        match LoadedPipeline::load(&self.models, shared.clone()) {
            Ok(p) => {
                let weights = p.shared_weights();
                shared.get_or_insert_with(|| weights.clone());
                let _ = self.done.send(Ok(Loaded {
                    weights,
                    catalogue: p.catalogue(&self.limits),
                }));
                PipelineActor::new(p)
            }
            Err(e) => {
                let _ = self.done.send(Err(e));
                PipelineActor::empty()
            }
        }
    }
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
            url: crate::redact::url(url),
            source,
        })
}
