//! A worker process: loads the models, starts the actors, serves metrics, and stops cleanly on
//! SIGTERM/SIGINT (no new jobs; those in flight finish, are stored and acked; exit 0).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use tokio::sync::oneshot;

use crate::consumer::{ConsumerConfig, JobConsumer, Shutdown};
use crate::job::JobDeps;
use crate::lora::{LoraManager, LoraStore};
use crate::pipeline::{LoadedPipeline, Models, PipelineActor};
use crate::protocol::{jobs_queue, Limits};
use crate::store::ResultStore;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub amqp: String,
    pub redis: String,
    pub models: Models,
    /// Queue to consume (default `katz.jobs.<base>`).
    pub queue: Option<String>,
    /// Jobs run at once: pipeline threads, each with its own sessions (weights are shared).
    pub concurrency: usize,
    /// Deliveries taken beyond `concurrency` (AMQP prefetch = concurrency + lookahead): they wait
    /// for a pipeline with their LoRAs prefetching, and go back to the queue on shutdown.
    pub lookahead: usize,
    pub limits: Limits,
    pub worker_name: String,
    pub metrics_addr: Option<SocketAddr>,
    pub store_retry: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
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

/// Runs a worker until it is told to stop.
pub fn run(cfg: WorkerConfig) -> Result<(), WorkerError> {
    // Load every pipeline before taking any job: a bad bundle fails the start, loudly.
    let n = cfg.concurrency.max(1);
    let mut actors: Vec<LoadedPipeline> = Vec::with_capacity(n);
    for _ in 0..n {
        let shared = actors.first().map(|a| a.shared_weights());
        actors.push(LoadedPipeline::load(&cfg.models, shared)?);
    }
    let weights = actors[0].shared_weights();
    let base = actors[0].base_name().to_string();
    let queue = cfg.queue.clone().unwrap_or_else(|| jobs_queue(&base));
    let pool = Mutex::new(actors);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let sys = actix::System::with_tokio_rt(move || rt);
    let result: Result<(), WorkerError> = sys.block_on(async move {
        let store = connect_redis(&cfg.redis).await?.start();
        let rt = tokio::runtime::Handle::current();
        let pipeline = SyncArbiter::start(n, move || {
            PipelineActor::from_pool(&pool).with_runtime(rt.clone())
        });
        if let Some(addr) = cfg.metrics_addr {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| WorkerError::Metrics { addr, source })?;
            tracing::info!(%addr, "metrics on /metrics");
            actix::spawn(crate::metrics::serve(listener));
        }
        let lora_store = LoraStore::open(&cfg.models.lora)
            .await
            .map_err(|e| WorkerError::Lora(e.to_string()))?;
        let lora = LoraManager::spawn(&cfg.models.lora, lora_store, weights);
        let (stopped_tx, stopped_rx) = oneshot::channel();
        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        let deps = JobDeps {
            limits: cfg.limits.clone(),
            worker: cfg.worker_name.clone(),
            store_retry: cfg.store_retry,
            pipeline,
            store,
            running: Default::default(),
            lora,
            lora_cfg: Arc::new(cfg.models.lora.clone()),
            slots: Arc::new(tokio::sync::Semaphore::new(n)),
            shutdown: shutdown_rx,
        };
        let consumer = JobConsumer::new(
            ConsumerConfig {
                amqp: cfg.amqp.clone(),
                queue: queue.clone(),
                prefetch: (n + cfg.lookahead) as u16,
                limits: cfg.limits.clone(),
                worker: cfg.worker_name.clone(),
                store_retry: cfg.store_retry,
            },
            deps,
            shutdown_tx,
            stopped_tx,
        )
        .start();
        tracing::info!(worker = %cfg.worker_name, %queue, base = %base, concurrency = n, "worker started");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        consumer.do_send(Shutdown);
        let _ = stopped_rx.await;
        Ok(())
    });
    result
}

async fn connect_redis(url: &str) -> Result<ResultStore, WorkerError> {
    let mut wait = Duration::from_millis(200);
    let mut tries = 0;
    loop {
        match ResultStore::connect(url).await {
            Ok(s) => return Ok(s),
            Err(e) if tries < 20 => {
                tracing::warn!(error = %e, retry_in = ?wait, "cannot reach Redis");
                tries += 1;
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(3));
            }
            Err(source) => {
                return Err(WorkerError::Redis {
                    url: url.into(),
                    source,
                })
            }
        }
    }
}
