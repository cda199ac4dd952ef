//! What live workers serve, read from their heartbeats (`katz:worker:*`), never from configuration.
//!
//! ```text
//! SCAN katz:worker:* ─HGETALL─▶ Worker { status, base, queue, controlnets, loras, heartbeat_ms }
//!   live = status `ready` and a heartbeat younger than 15 s
//!   ─▶ Catalog: per base model its queues, workers, ControlNets and LoRAs (GET /v1/models);
//!      check(job): the base, every ControlNet and LoRA served by one live worker, and the queue
//!      that worker consumes
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};

use redis::AsyncCommands;
use serde::Serialize;
use utoipa::ToSchema;

use katz_actors::protocol::{now_ms, Job};

use crate::error::ApiError;

/// A heartbeat older than this is a worker gone (the key itself expires after 15 s).
const LIVE_MS: u64 = 15_000;

/// One worker, as its heartbeat tells.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Worker {
    pub name: String,
    pub status: String,
    pub base: String,
    pub queue: String,
    pub device: String,
    pub concurrency: u32,
    pub controlnets: Vec<String>,
    pub loras: Vec<String>,
    /// Its LoRA store also reads Redis `katz:lora:<name>` (names not listed here).
    pub lora_redis: bool,
    pub heartbeat_ms: u64,
}

impl Worker {
    fn from_hash(name: String, h: &HashMap<String, String>) -> Worker {
        let list = |k: &str| -> Vec<String> {
            h.get(k)
                .and_then(|v| serde_json::from_str(v).ok())
                .unwrap_or_default()
        };
        let get = |k: &str| h.get(k).cloned().unwrap_or_default();
        Worker {
            name,
            status: get("status"),
            base: get("base"),
            queue: get("queue"),
            device: get("device"),
            concurrency: get("concurrency").parse().unwrap_or(0),
            controlnets: list("controlnets"),
            loras: list("loras"),
            lora_redis: get("lora_redis") == "1",
            heartbeat_ms: get("heartbeat_ms").parse().unwrap_or(0),
        }
    }

    pub fn live(&self, now: u64) -> bool {
        self.status == "ready" && now.saturating_sub(self.heartbeat_ms) < LIVE_MS
    }
}

/// Every worker with a heartbeat key (live or not), sorted by name.
pub async fn workers<C: redis::aio::ConnectionLike + Send + Sync>(
    conn: &mut C,
) -> Result<Vec<Worker>, ApiError> {
    let mut keys: Vec<String> = Vec::new();
    {
        let mut it: redis::AsyncIter<String> = conn.scan_match("katz:worker:*").await?;
        while let Some(k) = futures_util::StreamExt::next(&mut it).await {
            keys.push(k?);
        }
    }
    keys.sort();
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let h: HashMap<String, String> = conn.hgetall(&k).await?;
        if h.is_empty() {
            continue;
        }
        let name = k.trim_start_matches("katz:worker:").to_string();
        out.push(Worker::from_hash(name, &h));
    }
    Ok(out)
}

/// A base model and what its live workers serve with it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BaseModel {
    pub name: String,
    /// The queues its live workers consume.
    pub queues: Vec<String>,
    pub workers: Vec<String>,
    pub controlnets: Vec<String>,
    pub loras: Vec<String>,
}

/// `GET /v1/models`: the base models, ControlNets and LoRAs that live workers serve.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Catalog {
    pub base_models: Vec<BaseModel>,
    #[serde(skip)]
    live: Vec<Worker>,
}

impl Catalog {
    pub fn from_workers(all: Vec<Worker>) -> Catalog {
        let now = now_ms();
        let live: Vec<Worker> = all.into_iter().filter(|w| w.live(now)).collect();
        let mut bases: BTreeMap<String, (BTreeSet<String>, Vec<String>, BTreeSet<String>, BTreeSet<String>)> =
            BTreeMap::new();
        for w in &live {
            let e = bases.entry(w.base.clone()).or_default();
            e.0.insert(w.queue.clone());
            e.1.push(w.name.clone());
            e.2.extend(w.controlnets.iter().cloned());
            e.3.extend(w.loras.iter().cloned());
        }
        Catalog {
            base_models: bases
                .into_iter()
                .map(|(name, (q, w, c, l))| BaseModel {
                    name,
                    queues: q.into_iter().collect(),
                    workers: w,
                    controlnets: c.into_iter().collect(),
                    loras: l.into_iter().collect(),
                })
                .collect(),
            live,
        }
    }

    /// The queue to publish `job` to: one that a live worker consumes which serves the job's
    /// base, each of its ControlNets and each of its LoRAs (`redis_loras`: LoRA names found in
    /// Redis `katz:lora:<name>`, served by workers with `lora_redis`). Otherwise the job is
    /// refused naming what no live worker serves.
    pub fn route(&self, job: &Job, redis_loras: &BTreeSet<String>) -> Result<String, ApiError> {
        let of_base: Vec<&Worker> = self.live.iter().filter(|w| w.base == job.base).collect();
        if of_base.is_empty() {
            let known: Vec<&str> = self.base_models.iter().map(|b| b.name.as_str()).collect();
            return Err(ApiError::UnknownModel(format!(
                "base model `{}` is not served by any live worker (served: {known:?})",
                job.base
            )));
        }
        let serves = |w: &Worker| {
            job.controlnets.iter().all(|c| w.controlnets.contains(&c.model))
                && job
                    .loras
                    .iter()
                    .all(|l| w.loras.contains(&l.name) || (w.lora_redis && redis_loras.contains(&l.name)))
        };
        if let Some(w) = of_base.iter().find(|w| serves(w)) {
            return Ok(w.queue.clone());
        }
        let mut missing = Vec::new();
        for c in &job.controlnets {
            if !of_base.iter().any(|w| w.controlnets.contains(&c.model)) {
                missing.push(format!("ControlNet `{}`", c.model));
            }
        }
        for l in &job.loras {
            if !of_base
                .iter()
                .any(|w| w.loras.contains(&l.name) || (w.lora_redis && redis_loras.contains(&l.name)))
            {
                missing.push(format!("LoRA `{}`", l.name));
            }
        }
        if missing.is_empty() {
            missing.push("this combination of ControlNets and LoRAs".into());
        }
        Err(ApiError::UnknownModel(format!(
            "not served with base model `{}` by any live worker: {}",
            job.base,
            missing.join(", ")
        )))
    }

    pub fn live_workers(&self) -> &[Worker] {
        &self.live
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(name: &str, base: &str, cns: &[&str], loras: &[&str], age_ms: u64) -> Worker {
        Worker {
            name: name.into(),
            status: "ready".into(),
            base: base.into(),
            queue: format!("katz.jobs.{base}"),
            device: "cpu".into(),
            concurrency: 1,
            controlnets: cns.iter().map(|s| s.to_string()).collect(),
            loras: loras.iter().map(|s| s.to_string()).collect(),
            lora_redis: false,
            heartbeat_ms: now_ms() - age_ms,
        }
    }

    #[test]
    fn jobs_route_to_a_live_worker_that_serves_all_they_name() {
        let c = Catalog::from_workers(vec![
            worker("w1", "b", &["cn"], &["pastel"], 10),
            worker("old", "gone", &[], &[], 60_000),
        ]);
        assert_eq!(c.base_models.len(), 1, "a stale heartbeat is no live worker");
        let mut j = Job::new("t.1", "b", "p");
        assert_eq!(c.route(&j, &BTreeSet::new()).unwrap(), "katz.jobs.b");
        j.loras.push(katz_actors::protocol::LoraJob {
            name: "nope".into(),
            scale: 1.0,
        });
        let e = c.route(&j, &BTreeSet::new()).unwrap_err().to_string();
        assert!(e.contains("LoRA `nope`"), "{e}");
        let e = c
            .route(&Job::new("t.2", "gone", "p"), &BTreeSet::new())
            .unwrap_err();
        assert!(matches!(e, ApiError::UnknownModel(_)));
    }
}
