//! The LoRA manager: admits jobs' adapters (existence, prefetch, a bound on pending loads),
//! keeps parsed adapters in a byte-budgeted host cache (and uploaded factors in a device cache),
//! and merges a job's LoRAs on the blocking pool while the job denoises with the pristine weights.
//!
//! [`LoraManager`] is a cloneable handle around the sender of a [`Command`] channel; ONE tokio
//! task (the owner, [`Owner::run`]) holds every piece of state — both caches, the fetches in
//! flight and their waiters, the counters — and touches it only between two commands, so nothing
//! is locked. Each command carries its reply channel and the caller's [`tracing::Span`], which
//! the owner re-enters (and passes to what it spawns), so a job's trace follows it here. Slow work
//! never runs in the owner's loop: store checks, waiting for a pending-load permit, fetches,
//! parses and merges run on tasks of their own (or the blocking pool) and report back as
//! commands.
//!
//! ```text
//!  job ─prefetch / admit / merge / stats─▶ LoraManager ══Command══▶ owner task (caches, fetches,
//!   ▲                                                               counters; no locks)
//!   └──────────── reply (oneshot) ◀─────────────────────────────────┤ spawns, off its loop:
//!  Admit{names}  ─▶ admission driver: per name Lookup ─▶ store check (unknown → Invalid: dead
//!                   letter) ─▶ a pending-load permit (waits while all are taken: the job is
//!                   held) ─▶ Load ─▶ the owner starts the fetch (shared by every job needing it)
//!  Prefetch      ─▶ prefetch driver: the same while permits are free; never waits, never fails
//!  fetch task    ─▶ store read (+ delay) ─▶ parse (blocking pool) ─▶ Fetched ─▶ host cache,
//!                   waiters answered, permit released
//!  Merge{loras}  ─▶ MergeStarted{pending, stats} at once; merge task: each adapter from the
//!                   cache (hit) or its fetch (load) ─▶ [device factors: DeviceFactors / Uploaded]
//!                   ─▶ Weights::merge (blocking pool) ─▶ Merged ─▶ MergeSender ══▶ PendingMerge
//! ```
//!
//! The command channel is unbounded: what bounds the work is the pending-load [`Semaphore`]
//! (a full queue of pending loads holds the admitting job, so the consumer's prefetch window fills
//! and the broker sends no more), and the jobs in flight are bounded by the AMQP prefetch.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use katz_onnx::lora::{DeviceFactors, LoraAdapter, LoraParts, MergeSender, PendingMerge};
use katz_onnx::weights::Weights;
use serde::Serialize;
use tokio::sync::mpsc::{self, UnboundedSender, WeakUnboundedSender};
use tokio::sync::{oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tracing::{Instrument, Span};

use super::cache::{Cache, CacheStats};
use super::store::LoraStore;
use super::LoraConfig;
use crate::error::{JobError, Unavailable};
use crate::metrics::metrics;

/// What a fetch gives every job waiting for it (the error is shared by all of them).
type Fetched = Result<Arc<LoraAdapter>, Arc<JobError>>;

/// The name the manager gives in errors when it has stopped.
const ACTOR: &str = "LoRA manager";

fn stopped() -> JobError {
    JobError::Mailbox {
        actor: ACTOR,
        reason: Unavailable::Stopped,
    }
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
    /// The parts of each adapter the job skipped (`unet_only`): adapter name → what was skipped.
    pub skipped: Vec<(String, String)>,
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

/// A merge that has started: the merged set arrives through `pending`; `stats` fills in while it
/// runs (complete once `pending` has answered).
pub struct MergeStarted {
    pub pending: PendingMerge,
    pub stats: watch::Receiver<JobLoraStats>,
}

/// What the owner task is asked to do. The first four come from [`LoraManager`]; the others
/// from the tasks the owner spawned (drivers, fetches, merges).
enum Command {
    /// Starts fetching the adapters among `names` not in memory while permits are free;
    /// `started` answers once it is done trying.
    Prefetch {
        names: Vec<String>,
        started: Option<oneshot::Sender<()>>,
        span: Span,
    },
    /// Admits a job's adapters (see [`LoraManager::admit`]).
    Admit {
        names: Vec<String>,
        reply: oneshot::Sender<Result<Admitted, JobError>>,
        span: Span,
    },
    /// Starts merging a job's LoRAs, using their `parts`.
    Merge {
        loras: Vec<(String, f32)>,
        parts: LoraParts,
        reply: oneshot::Sender<MergeStarted>,
        span: Span,
    },
    Stats {
        reply: oneshot::Sender<LoraStats>,
        span: Span,
    },
    /// How `name` stands now; with `take_prefetched`, also takes it out of the set of prefetched
    /// adapters no job has counted yet (an admission counts it).
    Lookup {
        name: String,
        take_prefetched: bool,
        reply: oneshot::Sender<Standing>,
    },
    /// Fetch `name` under `permit` unless it is cached or already being fetched (the permit is
    /// then released); a prefetch marks it as prefetched first.
    Load {
        name: String,
        permit: OwnedSemaphorePermit,
        prefetch: bool,
        span: Span,
    },
    /// A fetch ended.
    Fetched {
        name: String,
        result: Fetched,
        ms: f64,
        permit: Option<OwnedSemaphorePermit>,
    },
    /// The device factors cached for these adapters (GPU merges).
    DeviceFactors {
        names: Vec<String>,
        reply: oneshot::Sender<Vec<Option<Arc<DeviceFactors>>>>,
    },
    /// A merge uploaded an adapter's factors: cache them.
    Uploaded {
        name: String,
        factors: Arc<DeviceFactors>,
    },
    /// A merge succeeded in `merge_ms`.
    Merged { merge_ms: f64 },
    /// Whether a job with `name` waits for its merge before its first step (from its file's
    /// header, at admission: text-encoder keys, or convolution keys the bundle cannot take).
    WaitsFirst { name: String, waits: bool },
}

/// How an adapter stands in the owner's state.
#[derive(Debug, Clone, Copy)]
struct Standing {
    cached: bool,
    fetching: bool,
    prefetched: bool,
}

/// The handle: cheap to clone; every clone talks to the same owner task, which stops when the
/// last handle (and the last task it spawned) is gone.
#[derive(Clone)]
pub struct LoraManager {
    tx: UnboundedSender<Command>,
}

impl LoraManager {
    /// Starts the owner task on the current tokio runtime.
    pub fn spawn(cfg: &LoraConfig, store: LoraStore, weights: Arc<Weights>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let max_pending = cfg.max_pending_loads.max(1);
        let owner = Owner {
            me: tx.downgrade(),
            store,
            weights,
            host: match cfg.host_cache_entries {
                Some(n) => Cache::with_entries(n.max(1), cfg.policy),
                None => Cache::new(cfg.host_cache_bytes, cfg.policy),
            },
            device: Cache::new(cfg.device_cache_bytes, cfg.policy),
            fetching: HashMap::new(),
            waits_first: HashMap::new(),
            prefetched: HashSet::new(),
            pending_loads: Arc::new(Semaphore::new(max_pending)),
            max_pending,
            counters: Counters::default(),
        };
        tokio::spawn(owner.run(rx));
        LoraManager { tx }
    }

    /// A handle whose owner is gone: every request answers that the manager stopped (tests of
    /// jobs without LoRAs).
    #[cfg(test)]
    pub(crate) fn stopped() -> Self {
        let (tx, _) = mpsc::unbounded_channel();
        LoraManager { tx }
    }

    /// Best-effort prefetch for a job that waits for a pipeline: starts fetching its adapters
    /// while pending-load permits are free; never waits, never fails (admission checks the names
    /// later).
    pub fn prefetch(&self, names: Vec<String>) {
        // a stopped manager: the job's admission reports it
        let _ = self.tx.send(Command::Prefetch {
            names,
            started: None,
            span: Span::current(),
        });
    }

    /// [`prefetch`](Self::prefetch), returning once the fetches it could start have started.
    pub async fn prefetch_started(&self, names: Vec<String>) -> Result<(), JobError> {
        self.ask(|reply| Command::Prefetch {
            names,
            started: Some(reply),
            span: Span::current(),
        })
        .await
    }

    /// Admits a job's adapters: checks them (an unknown one is [`JobError::Invalid`]), and starts
    /// fetching those not in memory — waiting while `max_pending_loads` fetches are already
    /// pending (backpressure). Returns once every fetch it needs has started.
    pub async fn admit(&self, names: Vec<String>) -> Result<Admitted, JobError> {
        self.ask(|reply| Command::Admit {
            names,
            reply,
            span: Span::current(),
        })
        .await?
    }

    /// Starts merging a job's LoRAs (name, scale), using their `parts` (a job's `unet_only`:
    /// [`LoraParts::Takeable`]); the merged set arrives through `pending`, or the error of a file
    /// with parts the bundle cannot take under [`LoraParts::All`], before the job's first step.
    pub async fn merge(&self, loras: Vec<(String, f32)>, parts: LoraParts) -> Result<MergeStarted, JobError> {
        self.ask(|reply| Command::Merge {
            loras,
            parts,
            reply,
            span: Span::current(),
        })
        .await
    }

    /// The service-wide counters.
    pub async fn stats(&self) -> Result<LoraStats, JobError> {
        self.ask(|reply| Command::Stats {
            reply,
            span: Span::current(),
        })
        .await
    }

    async fn ask<T>(&self, command: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, JobError> {
        ask(&self.tx, command).await
    }
}

/// Sends a command with a fresh reply channel and waits for the answer.
async fn ask<T>(
    tx: &UnboundedSender<Command>,
    command: impl FnOnce(oneshot::Sender<T>) -> Command,
) -> Result<T, JobError> {
    let (reply, rx) = oneshot::channel();
    tx.send(command(reply)).map_err(|_| stopped())?;
    rx.await.map_err(|_| stopped())
}

#[derive(Debug, Default, Clone)]
struct Counters {
    fetches: u64,
    fetch_errors: u64,
    fetch_ms_total: f64,
    merges: u64,
    merge_ms_total: f64,
}

/// The state, owned by one task.
struct Owner {
    /// For the tasks it spawns to report back (weak: the owner stops when the handles are gone).
    me: WeakUnboundedSender<Command>,
    store: LoraStore,
    weights: Arc<Weights>,
    host: Cache<Arc<LoraAdapter>>,
    /// Factors uploaded to the GPU (GPU workers only).
    device: Cache<Arc<DeviceFactors>>,
    /// Fetches in flight, with the jobs waiting for each.
    fetching: HashMap<String, Vec<oneshot::Sender<Fetched>>>,
    /// Whether a job waits for each LoRA read so far before its first step (kept after its
    /// adapter leaves the cache): text-encoder layers, or parts the bundle cannot take (the job
    /// either fails on them or skips them, before any step). A job whose LoRAs are all known
    /// here learns it at once, and starts denoising without waiting for their fetch unless one
    /// of them waits.
    waits_first: HashMap<String, bool>,
    /// LoRAs a prefetch fetched that no admitted job has counted as its load yet: the first job
    /// admitted with one counts it as a load (the prefetch was for it, or an earlier job), not a
    /// hit, so loads per request count every fetch.
    prefetched: HashSet<String>,
    /// One permit per pending fetch started by an admission or a prefetch.
    pending_loads: Arc<Semaphore>,
    max_pending: usize,
    counters: Counters,
}

impl Owner {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        while let Some(command) = rx.recv().await {
            self.handle(command);
        }
        tracing::debug!("LoRA manager stopped");
    }

    /// Handles one command; never waits.
    fn handle(&mut self, command: Command) {
        match command {
            Command::Prefetch { names, started, span } => {
                let Some(tx) = self.me.upgrade() else { return };
                let (store, permits) = (self.store.clone(), self.pending_loads.clone());
                tokio::spawn(
                    async move {
                        prefetch(&tx, &store, &permits, &names).await;
                        if let Some(s) = started {
                            let _ = s.send(());
                        }
                    }
                    .instrument(span),
                );
            }
            Command::Admit { names, reply, span } => {
                let Some(tx) = self.me.upgrade() else { return };
                let (store, permits) = (self.store.clone(), self.pending_loads.clone());
                let takes = Takes {
                    conv: katz_onnx::lora::takes_conv(self.weights.map()),
                    time_emb: katz_onnx::lora::takes_time_emb(self.weights.map()),
                };
                tokio::spawn(
                    async move {
                        let _ = reply.send(admit(&tx, &store, &permits, &names, takes).await);
                    }
                    .instrument(span),
                );
            }
            Command::Merge {
                loras,
                parts,
                reply,
                span,
            } => {
                let _e = span.enter();
                let started = self.merge(loras, parts, &span);
                let _ = reply.send(started);
            }
            Command::Stats { reply, span } => {
                let _e = span.enter();
                let _ = reply.send(self.stats());
            }
            Command::Lookup {
                name,
                take_prefetched,
                reply,
            } => {
                let prefetched = take_prefetched && self.prefetched.remove(&name);
                let _ = reply.send(Standing {
                    cached: self.host.contains(&name),
                    fetching: self.fetching.contains_key(&name),
                    prefetched,
                });
            }
            Command::Load {
                name,
                permit,
                prefetch,
                span,
            } => {
                let _e = span.enter();
                if prefetch {
                    tracing::debug!(lora = %name, "prefetching");
                    self.prefetched.insert(name.clone());
                }
                if !self.host.contains(&name) {
                    self.fetch(&name, Some(permit), None, &span);
                } // else: cached meanwhile; the permit goes back
            }
            Command::Fetched {
                name,
                result,
                ms,
                permit,
            } => self.fetched(name, result, ms, permit),
            Command::DeviceFactors { names, reply } => {
                let _ = reply.send(names.iter().map(|n| self.device.get(n)).collect());
            }
            Command::Uploaded { name, factors } => {
                let bytes = factors.bytes() as u64;
                self.device.insert(name, factors, bytes);
            }
            Command::Merged { merge_ms } => {
                self.counters.merges += 1;
                self.counters.merge_ms_total += merge_ms;
            }
            Command::WaitsFirst { name, waits } => {
                self.waits_first.insert(name, waits);
            }
        }
    }

    fn stats(&self) -> LoraStats {
        let c = &self.counters;
        LoraStats {
            host_cache: self.host.stats(),
            device_cache: self.device.stats(),
            fetches: c.fetches,
            fetch_errors: c.fetch_errors,
            fetch_ms_total: c.fetch_ms_total,
            merges: c.merges,
            merge_ms_total: c.merge_ms_total,
            pending_loads: self.max_pending - self.pending_loads.available_permits(),
            max_pending_loads: self.max_pending,
        }
    }

    /// Joins the running fetch of `name` (releasing `permit`), or starts one holding `permit`
    /// until it ends; `waiter` hears how it ended.
    fn fetch(
        &mut self,
        name: &str,
        permit: Option<OwnedSemaphorePermit>,
        waiter: Option<oneshot::Sender<Fetched>>,
        span: &Span,
    ) {
        if let Some(waiters) = self.fetching.get_mut(name) {
            waiters.extend(waiter);
            return;
        }
        let Some(tx) = self.me.upgrade() else { return };
        if permit.is_some() {
            metrics().lora_pending.inc();
        }
        self.fetching
            .insert(name.to_string(), waiter.into_iter().collect());
        let (store, weights, name) = (self.store.clone(), self.weights.clone(), name.to_string());
        tokio::spawn(
            async move {
                let t0 = Instant::now();
                let result = load(&store, weights, &name).await;
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                let _ = tx.send(Command::Fetched {
                    name,
                    result,
                    ms,
                    permit,
                });
            }
            .instrument(span.clone()),
        );
    }

    fn fetched(&mut self, name: String, result: Fetched, ms: f64, permit: Option<OwnedSemaphorePermit>) {
        let c = &mut self.counters;
        c.fetches += 1;
        c.fetch_ms_total += ms;
        if result.is_err() {
            c.fetch_errors += 1;
        }
        if let Ok(a) = &result {
            self.waits_first
                .insert(name.clone(), a.has_text_encoder_layers() || !a.untaken.is_empty());
            let evicted = self.host.insert(name.clone(), a.clone(), a.nbytes() as u64);
            if !evicted.is_empty() {
                tracing::debug!(?evicted, "LoRA host cache evicted");
            }
        }
        let waiters = self.fetching.remove(&name).unwrap_or_default();
        if permit.is_some() {
            metrics().lora_pending.dec();
        }
        drop(permit);
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }

    /// Takes each adapter from the host cache (a hit) or joins (or starts) its fetch (a load),
    /// and spawns the merge.
    fn merge(&mut self, loras: Vec<(String, f32)>, lora_parts: LoraParts, span: &Span) -> MergeStarted {
        let (merge_tx, pending) = PendingMerge::channel();
        // LoRAs read before: the job learns now whether it must wait for the merge (text-encoder
        // layers, parts the bundle cannot take) and otherwise denoises while they are fetched
        // and merged
        let known: Option<Vec<bool>> = loras
            .iter()
            .map(|(n, _)| self.waits_first.get(n).copied())
            .collect();
        // where one waits, the merge itself says (MergeJob::run): the text-encoder notice, or
        // the error of a part the bundle cannot take, comes before the first step
        if known.is_some_and(|k| !k.iter().any(|w| *w)) {
            merge_tx.text_encoders(false);
        }
        let (stats_tx, stats) = watch::channel(JobLoraStats::default());
        let mut parts = Vec::with_capacity(loras.len());
        for (name, scale) in loras {
            let part = match self.host.get(&name) {
                Some(a) => Part::Cached(a),
                None => {
                    let (w, rx) = oneshot::channel();
                    self.fetch(&name, None, Some(w), span);
                    Part::Loading(rx)
                }
            };
            parts.push((name, scale, part));
        }
        let job = MergeJob {
            tx: self.me.upgrade(),
            weights: self.weights.clone(),
            parts,
            lora_parts,
            stats: stats_tx,
        };
        tokio::spawn(
            async move {
                let merged = job.run(&merge_tx).await;
                merge_tx.send(merged);
            }
            .instrument(span.clone()),
        );
        MergeStarted { pending, stats }
    }
}

/// Fetches and parses one adapter (the parse on the blocking pool).
async fn load(store: &LoraStore, weights: Arc<Weights>, name: &str) -> Fetched {
    let bytes = store.fetch(name).await.map_err(Arc::new)?;
    let origin = name.to_string();
    // every part the bundle can take; each job checks the rest against its own parts
    let adapter = tokio::task::spawn_blocking(move || {
        LoraAdapter::from_bytes_with(&bytes, &origin, weights.map(), LoraParts::Takeable)
    })
    .await
    .map_err(|e| {
        Arc::new(JobError::Model(katz_onnx::Error::Lora {
            path: name.into(),
            message: format!("the parsing thread failed: {e}"),
        }))
    })?
    .map_err(|e| Arc::new(JobError::Model(e)))?;
    Ok(Arc::new(adapter))
}

/// Which LoCon parts the bundle's weights take (what a file's header is checked against).
#[derive(Debug, Clone, Copy)]
struct Takes {
    conv: bool,
    time_emb: bool,
}

/// The admission driver (a task of its own): one name after another, as the module doc draws.
async fn admit(
    tx: &UnboundedSender<Command>,
    store: &LoraStore,
    permits: &Arc<Semaphore>,
    names: &[String],
    takes: Takes,
) -> Result<Admitted, JobError> {
    let mut out = Admitted::default();
    for name in names {
        let st = lookup(tx, name, true).await?;
        if st.cached && !st.prefetched {
            out.hits += 1;
            continue;
        }
        out.loads += 1;
        if st.cached {
            continue; // fetched by a prefetch for this job: its load, now done
        }
        store.check(name).await?;
        // its header says whether the job must wait for its merge before its first step
        // (text-encoder keys, or convolution keys where the bundle's convolutions take no
        // weights: the job fails on them or skips them before any step); a header that does not
        // parse fails the job here
        let h = store.header_parts(name).await?;
        tx.send(Command::WaitsFirst {
            name: name.clone(),
            waits: h.text_encoder || (h.conv && !takes.conv) || (h.time_emb && !takes.time_emb),
        })
        .map_err(|_| stopped())?;
        if lookup(tx, name, false).await?.fetching {
            continue;
        }
        let permit = permits.clone().acquire_owned().await.map_err(|_| stopped())?;
        tx.send(Command::Load {
            name: name.clone(),
            permit,
            prefetch: false,
            span: Span::current(),
        })
        .map_err(|_| stopped())?;
    }
    Ok(out)
}

/// The prefetch driver (a task of its own): starts fetches while permits are free.
async fn prefetch(
    tx: &UnboundedSender<Command>,
    store: &LoraStore,
    permits: &Arc<Semaphore>,
    names: &[String],
) {
    for name in names {
        let Ok(st) = lookup(tx, name, false).await else {
            return;
        };
        if st.cached || st.fetching || store.check(name).await.is_err() {
            continue;
        }
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            return;
        };
        let load = Command::Load {
            name: name.clone(),
            permit,
            prefetch: true,
            span: Span::current(),
        };
        if tx.send(load).is_err() {
            return;
        }
    }
}

async fn lookup(
    tx: &UnboundedSender<Command>,
    name: &str,
    take_prefetched: bool,
) -> Result<Standing, JobError> {
    ask(tx, |reply| Command::Lookup {
        name: name.to_string(),
        take_prefetched,
        reply,
    })
    .await
}

/// An adapter of a merge: in hand, or on its way.
enum Part {
    Cached(Arc<LoraAdapter>),
    Loading(oneshot::Receiver<Fetched>),
}

/// One job's merge, run on a task of its own.
struct MergeJob {
    /// To report uploads and the merge (none when the manager is stopping).
    tx: Option<UnboundedSender<Command>>,
    weights: Arc<Weights>,
    parts: Vec<(String, f32, Part)>,
    /// The parts of the files the job uses.
    lora_parts: LoraParts,
    stats: watch::Sender<JobLoraStats>,
}

impl MergeJob {
    /// Reads (or takes from the cache) each adapter, says whether they adapt a text encoder
    /// (`notice`), then merges.
    async fn run(self, notice: &MergeSender) -> katz_onnx::Result<Arc<katz_onnx::weights::MergedWeights>> {
        let t0 = Instant::now();
        let mut loras = Vec::with_capacity(self.parts.len());
        for (name, scale, part) in self.parts {
            let (adapter, hit) = match part {
                Part::Cached(a) => (a, true),
                Part::Loading(rx) => {
                    let fetched = rx.await.map_err(|_| Arc::new(stopped())).and_then(|r| r);
                    match fetched {
                        Ok(a) => (a, false),
                        Err(e) => {
                            return Err(katz_onnx::Error::Lora {
                                path: name.into(),
                                message: e.to_string(),
                            })
                        }
                    }
                }
            };
            self.stats.send_modify(|s| {
                if hit {
                    s.hits += 1;
                } else {
                    s.loads += 1;
                }
            });
            // parts the bundle cannot take: the job's error (before any step), or skipped
            adapter.check(self.lora_parts)?;
            if !adapter.untaken.is_empty() {
                tracing::info!(lora = %name, skipped = %adapter.untaken, "LoRA parts skipped (unet_only)");
                let skipped = (name.clone(), adapter.untaken.to_string());
                self.stats.send_modify(|s| s.skipped.push(skipped));
            }
            loras.push((adapter, scale));
        }
        notice.text_encoders(loras.iter().any(|(a, _)| a.has_text_encoder_layers()));
        let load_ms = t0.elapsed().as_secs_f64() * 1e3;
        // GPU: factors from the device cache (or uploaded into it), one merge launch
        let on_device = self.weights.device().is_some();
        let cached = match (&self.tx, on_device) {
            (Some(tx), true) => {
                let names = loras.iter().map(|(a, _)| a.name.clone()).collect();
                ask(tx, |reply| Command::DeviceFactors { names, reply })
                    .await
                    .unwrap_or_default()
            }
            _ => Vec::new(),
        };
        let (weights, tx) = (self.weights.clone(), self.tx.clone());
        let merged = tokio::task::spawn_blocking(move || {
            if !on_device {
                return weights.merge(&loras);
            }
            let mut with = Vec::with_capacity(loras.len());
            for (i, (a, scale)) in loras.iter().enumerate() {
                let f = match cached.get(i).cloned().flatten() {
                    Some(f) => f,
                    None => {
                        let f = Arc::new(weights.upload_factors(a)?);
                        if let Some(tx) = &tx {
                            let _ = tx.send(Command::Uploaded {
                                name: a.name.clone(),
                                factors: f.clone(),
                            });
                        }
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
        let merge_ms = merged.as_ref().map(|w| w.merge_time.as_secs_f64() * 1e3).ok();
        self.stats.send_modify(|s| {
            s.load_ms = load_ms;
            s.ready_ms = t0.elapsed().as_secs_f64() * 1e3;
            if let Some(ms) = merge_ms {
                s.merge_ms = ms;
            }
        });
        if let (Some(ms), Some(tx)) = (merge_ms, &self.tx) {
            let _ = tx.send(Command::Merged { merge_ms: ms });
        }
        merged.map(Arc::new)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use katz_onnx::bundle::BaseBundle;

    use super::*;
    use crate::error::Action;

    fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
    }

    /// The tiny base bundle's pristine weights (what adapters are parsed against).
    fn weights() -> Arc<Weights> {
        let bundle = BaseBundle::open(root().join("bundles/tiny-sdxl")).expect("the tiny bundle");
        Arc::new(Weights::load(&bundle, HashSet::new()).expect("its weights"))
    }

    /// A store directory holding the two tiny adapters and a `broken` one that exists but is not
    /// a safetensors file.
    fn store_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("katz-manager-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for n in ["tiny-lora-a", "tiny-lora-b"] {
            let file = format!("{n}.safetensors");
            std::fs::copy(root().join("bundles/loras").join(&file), dir.join(&file)).unwrap();
        }
        std::fs::write(dir.join("broken.safetensors"), b"not a safetensors file").unwrap();
        // a real LoRA cut after its header: admitted (the header parses), its read fails
        let a = std::fs::read(root().join("bundles/loras/tiny-lora-a.safetensors")).unwrap();
        let header = 8 + u64::from_le_bytes(a[..8].try_into().unwrap()) as usize;
        std::fs::write(dir.join("cut.safetensors"), &a[..header + 16]).unwrap();
        dir
    }

    /// A manager over [`store_dir`] whose every fetch takes `delay`.
    fn manager(tag: &str, max_pending: usize, delay: Duration) -> LoraManager {
        let mut cfg = LoraConfig::new(store_dir(tag));
        cfg.max_pending_loads = max_pending;
        cfg.fetch_delay = delay;
        let store = LoraStore::new(cfg.dir.clone(), None, delay);
        LoraManager::spawn(&cfg, store, weights())
    }

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    async fn merged(started: MergeStarted) -> (katz_onnx::Result<()>, JobLoraStats) {
        let mut pending = started.pending;
        let r = tokio::task::spawn_blocking(move || pending.poll(Some(Duration::from_secs(30))))
            .await
            .unwrap()
            .expect("the merge answers");
        (r.map(|_| ()), started.stats.borrow().clone())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_queue_of_pending_loads_holds_the_next_admission() {
        let mgr = manager("bound", 1, Duration::from_millis(300));
        let t0 = Instant::now();
        let first = mgr.admit(names(&["tiny-lora-a"])).await.unwrap();
        assert_eq!((first.hits, first.loads), (0, 1));
        assert_eq!(mgr.stats().await.unwrap().pending_loads, 1);
        let held = tokio::spawn({
            let mgr = mgr.clone();
            async move { mgr.admit(names(&["tiny-lora-b"])).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!held.is_finished(), "admitted past a full queue of pending loads");
        // the stats still answer while a job is held: the owner's loop never waits
        assert_eq!(mgr.stats().await.unwrap().fetches, 0);
        let second = held.await.unwrap().unwrap();
        assert_eq!(second.loads, 1);
        assert!(t0.elapsed() >= Duration::from_millis(300), "{:?}", t0.elapsed());
        assert_eq!(mgr.stats().await.unwrap().fetches, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn loads_of_one_adapter_coalesce_into_one_fetch() {
        let mgr = manager("coalesce", 4, Duration::from_millis(200));
        let (a, b) = tokio::join!(
            mgr.admit(names(&["tiny-lora-a"])),
            mgr.admit(names(&["tiny-lora-a"]))
        );
        assert_eq!((a.unwrap().loads, b.unwrap().loads), (1, 1));
        // two merges join the fetch still running
        let m1 = mgr
            .merge(vec![("tiny-lora-a".into(), 1.0)], LoraParts::All)
            .await
            .unwrap();
        let m2 = mgr
            .merge(vec![("tiny-lora-a".into(), 0.5)], LoraParts::All)
            .await
            .unwrap();
        let ((r1, s1), (r2, s2)) = (merged(m1).await, merged(m2).await);
        r1.unwrap();
        r2.unwrap();
        assert_eq!((s1.loads, s2.loads), (1, 1));
        let st = mgr.stats().await.unwrap();
        assert_eq!((st.fetches, st.fetch_errors, st.merges), (1, 0, 2));
        assert_eq!(st.pending_loads, 0);
        // now cached: a hit, no new fetch
        let again = mgr.admit(names(&["tiny-lora-a"])).await.unwrap();
        assert_eq!((again.hits, again.loads), (1, 0));
        assert_eq!(mgr.stats().await.unwrap().fetches, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_fetch_answers_an_error_and_an_unknown_name_is_refused() {
        let mgr = manager("fail", 2, Duration::ZERO);
        let e = mgr.admit(names(&["nope"])).await.unwrap_err();
        assert!(e.to_string().contains("unknown LoRA `nope`"), "{e}");
        assert_eq!(e.action(), Action::DeadLetter);
        // `broken` exists but its header is no safetensors header: refused at admission, a bad
        // input (dead letter), before any fetch or step
        let e = mgr.admit(names(&["broken"])).await.unwrap_err();
        assert!(
            e.to_string().contains("broken") && e.to_string().contains("header"),
            "{e}"
        );
        assert_eq!(e.action(), Action::DeadLetter);
        // `cut` has a good header, so it is admitted; its read fails, and the merge says so
        let a = mgr.admit(names(&["cut"])).await.unwrap();
        assert_eq!(a.loads, 1);
        let m = mgr
            .merge(vec![("cut".into(), 1.0)], LoraParts::All)
            .await
            .unwrap();
        let (r, _) = merged(m).await;
        let e = r.unwrap_err();
        assert!(matches!(e, katz_onnx::Error::Lora { .. }), "{e}");
        assert!(e.to_string().contains("cut"), "{e}");
        let st = mgr.stats().await.unwrap();
        assert!(st.fetch_errors >= 1 && st.merges == 0, "{st:?}");
        assert_eq!(st.pending_loads, 0);
    }

    /// A file with parts the bundle cannot take (made by peft for the trained family, whose
    /// bundle takes no text-encoder or convolution weights): a job without `unet_only` fails
    /// naming them before its first step (its merge is waited for, fetched or cached); with it
    /// they are skipped and the job's stats name them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unet_only_skips_the_parts_the_bundle_cannot_take_and_records_them() {
        let dir = std::env::temp_dir().join(format!("katz-manager-unet-only-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(
            root().join("tests/data/lora/shapes-te-conv.safetensors"),
            dir.join("te-conv.safetensors"),
        )
        .unwrap();
        let bundle =
            BaseBundle::open(root().join("bundles/shapes/shapes-sdxl")).expect("the family's bundle");
        let weights = Arc::new(Weights::load(&bundle, HashSet::new()).expect("its weights"));
        let cfg = LoraConfig::new(dir.clone());
        let mgr = LoraManager::spawn(&cfg, LoraStore::new(dir, None, Duration::ZERO), weights);
        for round in ["fetched", "cached"] {
            mgr.admit(names(&["te-conv"])).await.unwrap();
            let m = mgr
                .merge(vec![("te-conv".into(), 1.0)], LoraParts::All)
                .await
                .unwrap();
            let mut pending = m.pending;
            let e = tokio::task::spawn_blocking(move || pending.touches_text(Duration::from_secs(30)))
                .await
                .unwrap()
                .expect_err("refused before the first step")
                .to_string();
            for want in [
                "te-conv",
                "adapt a text encoder",
                "convolution LoRA factors",
                "unet_only",
            ] {
                assert!(e.contains(want), "{round}: {want}: {e}");
            }
            let m = mgr
                .merge(vec![("te-conv".into(), 0.5)], LoraParts::Takeable)
                .await
                .unwrap();
            let (r, st) = merged(m).await;
            r.unwrap_or_else(|e| panic!("{round}: {e}"));
            assert_eq!(st.skipped.len(), 1, "{round}");
            let (name, what) = &st.skipped[0];
            assert_eq!(name, "te-conv");
            assert!(
                what.contains("text-encoder keys") && what.contains("convolution keys"),
                "{round}: {what}"
            );
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prefetch_fetches_ahead_and_counts_as_the_first_jobs_load() {
        let mgr = manager("prefetch", 1, Duration::ZERO);
        // an unknown name is skipped, never an error
        mgr.prefetch_started(names(&["tiny-lora-a", "nope"]))
            .await
            .unwrap();
        let mut fetched = false;
        for _ in 0..500 {
            let st = mgr.stats().await.unwrap();
            if st.fetches == 1 && st.pending_loads == 0 {
                fetched = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(fetched, "the prefetch did not fetch");
        let first = mgr.admit(names(&["tiny-lora-a"])).await.unwrap();
        let second = mgr.admit(names(&["tiny-lora-a"])).await.unwrap();
        assert_eq!((first.loads, first.hits, second.loads, second.hits), (1, 0, 0, 1));
    }

    #[tokio::test]
    async fn a_stopped_manager_answers_a_requeue_naming_itself() {
        let mgr = LoraManager::stopped();
        let e = mgr.admit(names(&["tiny-lora-a"])).await.unwrap_err();
        assert!(e.to_string().contains("LoRA manager"), "{e}");
        assert_eq!(e.action(), Action::Requeue);
        assert!(mgr.merge(vec![], LoraParts::All).await.is_err() && mgr.stats().await.is_err());
        mgr.prefetch(names(&["tiny-lora-a"])); // never fails
    }
}
