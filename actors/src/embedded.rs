//! Embedded mode: the service's own actors without a broker — jobs come from an in-process
//! source and results go to the in-memory [`ResultStore`]; each job takes exactly the path it
//! takes in a worker ([`crate::job::process`]). `katz demo` runs through it, and so can tests
//! that need no RabbitMQ or Redis.
//!
//! ```text
//! Job ─encode─▶ InProcess delivery ─▶ job::process ─▶ PipelineActor (model thread)
//!                                          └────────▶ ResultStore::memory ─▶ record + PNG, events
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use futures_util::future::BoxFuture;

use crate::error::Action;
use crate::job::{process, Delivered, JobDeps};
use crate::lora::{LoraManager, LoraStore};
use crate::pipeline::{LoadedPipeline, Models, PipelineActor};
use crate::protocol::{image_key, job_key, Event, Job, Limits};
use crate::store::ResultStore;

/// A message handed over in process; remembers how it was settled.
struct InProcess {
    body: Vec<u8>,
    settled: Mutex<Option<Action>>,
}

impl Delivered for InProcess {
    fn body(&self) -> &[u8] {
        &self.body
    }

    fn settle(&self, action: Action) -> BoxFuture<'_, ()> {
        *self.settled.lock().unwrap_or_else(|e| e.into_inner()) = Some(action);
        Box::pin(async {})
    }
}

/// What a job left behind.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// The fields of its `katz:job:<id>` record.
    pub record: HashMap<String, String>,
    pub png: Option<Vec<u8>>,
    /// How the delivery was settled.
    pub action: Option<Action>,
}

/// Runs `jobs` one after another through the actors; `on_event` sees every progress event.
pub fn run_jobs(
    models: &Models,
    jobs: Vec<Job>,
    mut on_event: impl FnMut(&Event),
) -> Result<Vec<JobResult>, katz_onnx::Error> {
    let actor = LoadedPipeline::load(models, None)?;
    let weights = actor.shared_weights();
    let catalogue = Arc::new(actor.catalogue(&Limits::default()));
    let actor = Mutex::new(vec![actor]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|source| katz_onnx::Error::Io {
            path: "(tokio runtime)".into(),
            source,
        })?;
    let sys = actix::System::with_tokio_rt(move || rt);
    let results = sys.block_on(async move {
        let pipeline = SyncArbiter::start(1, move || PipelineActor::from_pool(&actor));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (store, mem) = ResultStore::memory(Some(tx));
        let lora_store = LoraStore::new(models.lora.dir.clone(), None, models.lora.fetch_delay);
        let (_shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
        let deps = JobDeps {
            limits: Limits::default(),
            catalogue,
            worker: "embedded".into(),
            store_retry: Duration::from_secs(1),
            max_attempts: crate::config::DEFAULT_MAX_ATTEMPTS,
            pipeline,
            store: store.start(),
            running: Default::default(),
            lora: LoraManager::spawn(&models.lora, lora_store, weights),
            lora_cfg: Arc::new(models.lora.clone()),
            slots: Arc::new(tokio::sync::Semaphore::new(1)),
            shutdown,
        };
        let mut results = Vec::new();
        for job in jobs {
            let d = InProcess {
                body: job.encode().map_err(|e| {
                    katz_onnx::Error::InvalidRequest(format!("job {} cannot be encoded: {e}", job.id))
                })?,
                settled: Mutex::new(None),
            };
            let run = process(&d, &deps);
            tokio::pin!(run);
            loop {
                tokio::select! {
                    _ = &mut run => break,
                    Some(e) = rx.recv() => on_event(&e),
                }
            }
            while let Ok(e) = rx.try_recv() {
                on_event(&e);
            }
            let m = mem.lock().unwrap_or_else(|e| e.into_inner());
            results.push(JobResult {
                record: m.records.get(&job_key(&job.id)).cloned().unwrap_or_default(),
                png: m.blobs.get(&image_key(&job.id)).cloned(),
                action: *d.settled.lock().unwrap_or_else(|e| e.into_inner()),
            });
        }
        Ok::<_, katz_onnx::Error>(results)
    });
    results
}
