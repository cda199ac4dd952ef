//! The LoraManager actor: admits jobs' adapters (existence, prefetch, a bound on pending loads),
//! keeps parsed adapters in a byte-budgeted host cache, and merges a job's LoRAs on the blocking
//! pool while the job denoises with the pristine weights.
//!
//! ```text
//! Admit{names}  ─▶ check each name in the store (unknown → Invalid: dead letter)
//!                  each missing adapter: take a pending-load permit (wait when all are taken),
//!                  start its fetch (shared by every job that needs it); returns once started
//! Merge{loras}  ─▶ MergeStarted{pending, stats} at once; in the background: each adapter from
//!                  the cache (hit) or its fetch (load) ─▶ Weights::merge (blocking pool) ─▶ send
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::prelude::*;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use katz_onnx::lora::{DeviceFactors, LoraAdapter, PendingMerge};
use katz_onnx::weights::Weights;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::cache::{Cache, CacheStats};
use super::store::LoraStore;
use super::LoraConfig;
use crate::error::JobError;

type Fetch = Shared<BoxFuture<'static, Result<Arc<LoraAdapter>, String>>>;

struct Inner {
    store: LoraStore,
    weights: Arc<Weights>,
    host: Mutex<Cache<Arc<LoraAdapter>>>,
    /// Factors uploaded to the GPU (GPU workers only).
    device: Mutex<Cache<Arc<DeviceFactors>>>,
    fetching: Mutex<HashMap<String, Fetch>>,
    pending_loads: Arc<Semaphore>,
    max_pending: usize,
    loads: Mutex<LoadCounters>,
    /// LoRAs a prefetch fetched that no admitted job has counted as its load yet: the first job
    /// admitted with one counts it as a load (the prefetch was for it, or an earlier job), not a
    /// hit, so loads per request count every fetch.
    prefetched: Mutex<std::collections::HashSet<String>>,
}

#[derive(Debug, Default, Clone, Serialize)]
struct LoadCounters {
    fetches: u64,
    fetch_errors: u64,
    fetch_ms_total: f64,
    merges: u64,
    merge_ms_total: f64,
}

/// The service-wide LoRA counters (for metrics and tests).
#[derive(Debug, Clone, Serialize)]
pub struct LoraStats {
    pub host_cache: CacheStats,
    pub device_cache: CacheStats,
    pub fetches: u64,
    pub fetch_errors: u64,
    pub fetch_ms_total: f64,
    pub merges: u64,
    pub merge_ms_total: f64,
    /// Fetches running or waiting now.
    pub pending_loads: usize,
    pub max_pending_loads: usize,
}

/// What one job's adapters cost: filled in while its merge runs.
#[derive(Debug, Default, Clone, Serialize)]
pub struct JobLoraStats {
    /// Adapters found in the host cache.
    pub hits: u32,
    /// Adapters that had to come from the store (fetched for this job or joined a fetch).
    pub loads: u32,
    /// Time from the merge request until every adapter was in memory.
    pub load_ms: f64,
    pub merge_ms: f64,
    /// Time from the merge request until the merged weights were ready.
    pub ready_ms: f64,
}

#[derive(Clone)]
pub struct LoraManager {
    inner: Arc<Inner>,
}

impl LoraManager {
    pub fn new(cfg: &LoraConfig, store: LoraStore, weights: Arc<Weights>) -> Self {
        let max_pending = cfg.max_pending_loads.max(1);
        LoraManager {
            inner: Arc::new(Inner {
                store,
                weights,
                host: Mutex::new(match cfg.host_cache_entries {
                    Some(n) => Cache::with_entries(n.max(1), cfg.policy),
                    None => Cache::new(cfg.host_cache_bytes, cfg.policy),
                }),
                device: Mutex::new(Cache::new(cfg.device_cache_bytes, cfg.policy)),
                fetching: Mutex::default(),
                pending_loads: Arc::new(Semaphore::new(max_pending)),
                max_pending,
                loads: Mutex::default(),
                prefetched: Mutex::default(),
            }),
        }
    }

    pub fn stats(&self) -> LoraStats {
        let i = &self.inner;
        let l = i.loads.lock().unwrap_or_else(|e| e.into_inner()).clone();
        LoraStats {
            host_cache: i.host.lock().unwrap_or_else(|e| e.into_inner()).stats(),
            device_cache: i.device.lock().unwrap_or_else(|e| e.into_inner()).stats(),
            fetches: l.fetches,
            fetch_errors: l.fetch_errors,
            fetch_ms_total: l.fetch_ms_total,
            merges: l.merges,
            merge_ms_total: l.merge_ms_total,
            pending_loads: i.max_pending - i.pending_loads.available_permits(),
            max_pending_loads: i.max_pending,
        }
    }
}

impl Inner {
    fn cached(&self, name: &str) -> bool {
        self.host.lock().unwrap_or_else(|e| e.into_inner()).contains(name)
    }

    /// The running fetch of `name`, or a new one (holding `permit` until it ends, if given).
    fn fetch(self: &Arc<Self>, name: &str, permit: Option<OwnedSemaphorePermit>) -> Fetch {
        let mut fetching = self.fetching.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = fetching.get(name) {
            return f.clone();
        }
        if permit.is_some() {
            crate::metrics::metrics()
                .lora_pending
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let (me, key) = (self.clone(), name.to_string());
        let fut = async move {
            let t0 = Instant::now();
            let res = async {
                let bytes = me.store.fetch(&key).await.map_err(|e| e.to_string())?;
                let (weights, k) = (me.weights.clone(), key.clone());
                let adapter =
                    tokio::task::spawn_blocking(move || LoraAdapter::from_bytes(&bytes, &k, weights.map()))
                        .await
                        .map_err(|e| format!("parsing LoRA `{key}`: {e}"))?
                        .map_err(|e| e.to_string())?;
                Ok::<_, String>(Arc::new(adapter))
            }
            .await;
            {
                let mut l = me.loads.lock().unwrap_or_else(|e| e.into_inner());
                l.fetches += 1;
                l.fetch_ms_total += t0.elapsed().as_secs_f64() * 1e3;
                if res.is_err() {
                    l.fetch_errors += 1;
                }
            }
            if let Ok(a) = &res {
                let evicted = me.host.lock().unwrap_or_else(|e| e.into_inner()).insert(
                    key.clone(),
                    a.clone(),
                    a.nbytes() as u64,
                );
                if !evicted.is_empty() {
                    tracing::debug!(?evicted, "LoRA host cache evicted");
                }
            }
            me.fetching.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
            if permit.is_some() {
                crate::metrics::metrics()
                    .lora_pending
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
            drop(permit);
            res
        }
        .boxed()
        .shared();
        fetching.insert(name.to_string(), fut.clone());
        // run it even if nobody polls it yet (a prefetch)
        tokio::spawn(fut.clone());
        fut
    }

    /// The adapter and whether it was a cache hit.
    async fn adapter(self: &Arc<Self>, name: &str) -> Result<(Arc<LoraAdapter>, bool), String> {
        if let Some(a) = self.host.lock().unwrap_or_else(|e| e.into_inner()).get(name) {
            return Ok((a, true));
        }
        Ok((self.fetch(name, None).await?, false))
    }
}

/// Admits a job's adapters: checks them, and starts fetching those not in memory — waiting while
/// `max_pending_loads` fetches are already pending (backpressure).
#[derive(Message)]
#[rtype(result = "Result<Admitted, JobError>")]
pub struct Admit {
    pub names: Vec<String>,
}

/// How a job's adapters stood when it was admitted.
#[derive(Debug, Default, Clone, Copy)]
pub struct Admitted {
    /// In the host cache.
    pub hits: u32,
    /// Not in memory: fetched for this job, or joined to a fetch already running, or fetched
    /// ahead by a prefetch no earlier job counted.
    pub loads: u32,
}

/// Best-effort prefetch for a job that waits for a pipeline: starts fetching its adapters while
/// pending-load permits are free; never waits, never fails (admission checks the names later).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Prefetch {
    pub names: Vec<String>,
}

impl Handler<Prefetch> for LoraManager {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, m: Prefetch, _: &mut Context<Self>) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move {
            for name in &m.names {
                let busy = inner.cached(name)
                    || inner
                        .fetching
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .contains_key(name);
                if busy || inner.store.check(name).await.is_err() {
                    continue;
                }
                match inner.pending_loads.clone().try_acquire_owned() {
                    Ok(permit) => {
                        tracing::debug!(lora = %name, "prefetching");
                        inner
                            .prefetched
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(name.clone());
                        drop(inner.fetch(name, Some(permit))); // the fetch runs on its own task
                    }
                    Err(_) => return,
                }
            }
        })
    }
}

impl Actor for LoraManager {
    type Context = Context<Self>;
}

impl Handler<Admit> for LoraManager {
    type Result = ResponseFuture<Result<Admitted, JobError>>;

    fn handle(&mut self, m: Admit, _: &mut Context<Self>) -> Self::Result {
        let inner = self.inner.clone();
        Box::pin(async move {
            let mut out = Admitted::default();
            for name in &m.names {
                let prefetched = inner
                    .prefetched
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(name);
                if inner.cached(name) && !prefetched {
                    out.hits += 1;
                    continue;
                }
                out.loads += 1;
                if inner.cached(name) {
                    continue; // fetched by a prefetch for this job: its load, now done
                }
                inner.store.check(name).await?;
                let fetching = inner
                    .fetching
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains_key(name);
                if fetching {
                    continue;
                }
                let permit = inner
                    .pending_loads
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| JobError::Mailbox(format!("LoRA manager closed: {e}")))?;
                if !inner.cached(name) {
                    drop(inner.fetch(name, Some(permit))); // the fetch runs on its own task
                }
            }
            Ok(out)
        })
    }
}

/// Starts merging a job's LoRAs (name, scale); the merged set arrives through `pending`.
#[derive(Message)]
#[rtype(result = "MergeStarted")]
pub struct Merge {
    pub loras: Vec<(String, f32)>,
}

pub struct MergeStarted {
    pub pending: PendingMerge,
    pub stats: Arc<Mutex<JobLoraStats>>,
}

impl Handler<Merge> for LoraManager {
    type Result = MessageResult<Merge>;

    fn handle(&mut self, m: Merge, _: &mut Context<Self>) -> Self::Result {
        let (tx, pending) = PendingMerge::channel();
        let stats = Arc::new(Mutex::new(JobLoraStats::default()));
        let (inner, st) = (self.inner.clone(), stats.clone());
        tokio::spawn(async move {
            let t0 = Instant::now();
            let mut loras = Vec::with_capacity(m.loras.len());
            for (name, scale) in &m.loras {
                match inner.adapter(name).await {
                    Ok((a, hit)) => {
                        let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                        if hit {
                            s.hits += 1;
                        } else {
                            s.loads += 1;
                        }
                        loras.push((a, *scale));
                    }
                    Err(message) => {
                        tx.send(Err(katz_onnx::Error::Lora {
                            path: name.into(),
                            message,
                        }));
                        return;
                    }
                }
            }
            let load_ms = t0.elapsed().as_secs_f64() * 1e3;
            let (weights, me) = (inner.weights.clone(), inner.clone());
            let merged = tokio::task::spawn_blocking(move || {
                if weights.device().is_none() {
                    return weights.merge(&loras);
                }
                // GPU: factors from the device cache (or uploaded into it), one merge launch
                let mut with = Vec::with_capacity(loras.len());
                for (a, scale) in &loras {
                    let cached = me.device.lock().unwrap_or_else(|e| e.into_inner()).get(&a.name);
                    let f = match cached {
                        Some(f) => f,
                        None => {
                            let f = Arc::new(weights.upload_factors(a)?);
                            let mut dc = me.device.lock().unwrap_or_else(|e| e.into_inner());
                            dc.insert(a.name.clone(), f.clone(), f.bytes() as u64);
                            f
                        }
                    };
                    with.push((a.clone(), f, *scale));
                }
                weights.merge_on_device(&with)
            })
            .await
            .unwrap_or_else(|e| {
                Err(katz_onnx::Error::Lora {
                    path: "<merge>".into(),
                    message: format!("the merge thread failed: {e}"),
                })
            });
            {
                let mut s = st.lock().unwrap_or_else(|e| e.into_inner());
                s.load_ms = load_ms;
                s.ready_ms = t0.elapsed().as_secs_f64() * 1e3;
                if let Ok(w) = &merged {
                    s.merge_ms = w.merge_time.as_secs_f64() * 1e3;
                    let mut l = inner.loads.lock().unwrap_or_else(|e| e.into_inner());
                    l.merges += 1;
                    l.merge_ms_total += s.merge_ms;
                }
            }
            tx.send(merged.map(Arc::new));
        });
        MessageResult(MergeStarted { pending, stats })
    }
}

/// The service-wide counters.
#[derive(Message)]
#[rtype(result = "LoraStats")]
pub struct GetStats;

impl Handler<GetStats> for LoraManager {
    type Result = MessageResult<GetStats>;
    fn handle(&mut self, _: GetStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.stats())
    }
}
