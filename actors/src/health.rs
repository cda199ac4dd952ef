//! Whether a worker takes jobs: its state, the answer of `GET /readyz`, and its heartbeat in Redis.
//!
//! ```text
//! loading ──(pipelines loaded, consumer consuming)──▶ ready ⇄ reconnecting (RabbitMQ away)
//!    └──────────────────────────────────────────────────────┴──(shutdown)──▶ stopping ──▶ stopped
//!
//! Health (shared)  ◀─set─ worker::run, JobConsumer
//!   ├─▶ metrics server: GET /readyz → 200 "ready" | 503 "<state>";  GET /healthz → 200
//!   └─▶ heartbeat task: HSET katz:worker:<name> status … heartbeat_ms … controlnets loras ;
//!                       EXPIRE 3 × period
//! ```
//!
//! A worker loads every pipeline before it consumes, so `ready` means: models loaded, queue
//! declared, deliveries flowing. The heartbeat's key expires when the worker is gone without a
//! word (a crash, a lost host); a worker that stops cleanly writes `stopped` last.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::protocol::now_ms;

/// Where a worker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Loading models or connecting: not taking jobs yet.
    Loading,
    /// Consuming its queue.
    Ready,
    /// Lost RabbitMQ; connecting again.
    Reconnecting,
    /// Shutting down: no new jobs, those in flight finish.
    Stopping,
    /// Done.
    Stopped,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Loading => "loading",
            State::Ready => "ready",
            State::Reconnecting => "reconnecting",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
        }
    }

    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Ready,
            2 => State::Reconnecting,
            3 => State::Stopping,
            4 => State::Stopped,
            _ => State::Loading,
        }
    }
}

/// A worker's state, shared by the parts that change it and those that report it.
#[derive(Debug, Clone)]
pub struct Health(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    state: AtomicU8,
    since: Instant,
    /// Milliseconds from `since` to the first `Ready` (0: not ready yet).
    ready_after_ms: AtomicU64,
}

impl Default for Health {
    fn default() -> Self {
        Health(Arc::new(Inner {
            state: AtomicU8::new(State::Loading as u8),
            since: Instant::now(),
            ready_after_ms: AtomicU64::new(0),
        }))
    }
}

impl Health {
    /// A worker starting now, loading.
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(&self, s: State) {
        let before = State::from_u8(self.0.state.swap(s as u8, Ordering::SeqCst));
        if s == State::Ready && self.0.ready_after_ms.load(Ordering::SeqCst) == 0 {
            let ms = (self.0.since.elapsed().as_millis() as u64).max(1);
            self.0.ready_after_ms.store(ms, Ordering::SeqCst);
            tracing::info!(ready_s = ms as f64 / 1e3, "ready: taking jobs");
        }
        if before != s {
            tracing::debug!(from = before.as_str(), to = s.as_str(), "worker state");
        }
    }

    /// Moves to `to` unless the worker is already stopping (a reconnect during a shutdown does
    /// not make it ready again).
    pub fn set_unless_stopping(&self, to: State) {
        if !matches!(self.get(), State::Stopping | State::Stopped) {
            self.set(to);
        }
    }

    pub fn get(&self) -> State {
        State::from_u8(self.0.state.load(Ordering::SeqCst))
    }

    /// From the worker's start to its first `Ready`, once it was.
    pub fn ready_after(&self) -> Option<Duration> {
        match self.0.ready_after_ms.load(Ordering::SeqCst) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

/// The Redis key of worker `name`'s heartbeat.
pub fn worker_key(name: &str) -> String {
    format!("katz:worker:{name}")
}

/// What the heartbeat says of a worker besides its state.
#[derive(Debug, Clone)]
pub struct Beat {
    pub worker: String,
    pub base: String,
    pub queue: String,
    pub device: String,
    pub concurrency: usize,
    /// How often the key is written; it expires after three periods without a write.
    pub every: Duration,
    /// The ControlNets a job may name (hosted here or served by ControlNet workers): known once
    /// the pipelines are loaded, written as the JSON array `controlnets` from then on.
    pub controlnets: Arc<OnceLock<Vec<String>>>,
    /// The LoRA store's directory: its `<name>.safetensors` files, listed at every beat, are the
    /// JSON array `loras` (a LoRA added to the directory shows at the next beat).
    pub lora_dir: Option<PathBuf>,
    /// The LoRA store also reads Redis `katz:lora:<name>` (field `lora_redis` = `1`): those
    /// names are served too, though not listed.
    pub lora_redis: bool,
}

/// The LoRA names of a store directory (`<name>.safetensors`), sorted; none if it cannot be read.
pub fn list_loras(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let stem = name.strip_suffix(".safetensors")?;
            katz_onnx::request::plain_name(stem).then(|| stem.to_string())
        })
        .collect();
    names.sort();
    names
}

async fn write(redis: &mut ConnectionManager, b: &Beat, h: &Health) -> redis::RedisResult<()> {
    let key = worker_key(&b.worker);
    let ready = h
        .ready_after()
        .map(|d| d.as_millis().to_string())
        .unwrap_or_default();
    let fields = [
        ("status", h.get().as_str().to_string()),
        ("base", b.base.clone()),
        ("queue", b.queue.clone()),
        ("device", b.device.clone()),
        ("concurrency", b.concurrency.to_string()),
        ("pid", std::process::id().to_string()),
        ("heartbeat_ms", now_ms().to_string()),
        ("ready_after_ms", ready),
        (
            "controlnets",
            serde_json::to_string(b.controlnets.get().map(Vec::as_slice).unwrap_or(&[])).unwrap_or_default(),
        ),
        (
            "loras",
            serde_json::to_string(&b.lora_dir.as_deref().map(list_loras).unwrap_or_default())
                .unwrap_or_default(),
        ),
        ("lora_redis", if b.lora_redis { "1" } else { "0" }.to_string()),
    ];
    let ttl = (3 * b.every.as_secs()).max(3) as i64;
    redis::pipe()
        .hset_multiple(&key, &fields)
        .ignore()
        .expire(&key, ttl)
        .ignore()
        .query_async(redis)
        .await
}

/// Writes the heartbeat every `beat.every` until the worker is stopped, then once more (its
/// `stopped`). A Redis that is away is logged and tried again at the next beat: the heartbeat
/// never stops the worker.
pub async fn heartbeat(mut redis: ConnectionManager, beat: Beat, health: Health) {
    loop {
        let state = health.get();
        if let Err(e) = write(&mut redis, &beat, &health).await {
            tracing::warn!(error = %e, "heartbeat not written");
        }
        if state == State::Stopped {
            return;
        }
        // wake early when the state changes, so `stopped` is written at once
        let t0 = Instant::now();
        while t0.elapsed() < beat.every && health.get() == state {
            tokio::time::sleep(Duration::from_millis(50).min(beat.every)).await;
        }
    }
}

/// Reads a heartbeat (for producers, tests and `katz status`-like tools).
pub async fn read(
    redis: &mut ConnectionManager,
    name: &str,
) -> redis::RedisResult<std::collections::HashMap<String, String>> {
    redis.hgetall(worker_key(name)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_move_and_ready_is_timed_once() {
        let h = Health::new();
        assert_eq!(h.get(), State::Loading);
        assert!(h.ready_after().is_none());
        h.set(State::Ready);
        let first = h.ready_after().expect("timed");
        h.set_unless_stopping(State::Reconnecting);
        h.set_unless_stopping(State::Ready);
        assert_eq!(h.ready_after(), Some(first), "only the first ready is timed");
        h.set(State::Stopping);
        h.set_unless_stopping(State::Ready);
        assert_eq!(h.get(), State::Stopping, "a reconnect does not undo a shutdown");
        assert_eq!(h.clone().get().as_str(), "stopping");
    }

    #[test]
    fn the_lora_store_lists_its_plain_names() {
        let dir = std::env::temp_dir().join(format!("katz-list-loras-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "b.safetensors",
            "a.safetensors",
            "notes.txt",
            "bad..name.safetensors",
        ] {
            std::fs::write(dir.join(f), b"").unwrap();
        }
        assert_eq!(list_loras(&dir), vec!["a".to_string(), "b".to_string()]);
        assert!(list_loras(&dir.join("absent")).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
