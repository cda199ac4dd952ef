//! Jobs from trace requests: what `katz trace replay` and `katz bench service` publish. A trace
//! request names its ControlNets and LoRAs by anonymised ids; here they become a job the workers
//! can run (ControlNets mapped onto the workers' models, one conditioning image, LoRA files written
//! into the store), with a `queued` record in Redis before the publish (as `katz submit` does).
//!
//! ```text
//! TraceRequest {controlnets: [cn-3, cn-1], loras: [lora-17]}
//!   ─▶ JobMix::job(i) ─▶ Job PREFIX-i (prompt by i, seed i, size, steps, ControlNets round robin
//!                        by trace id onto the models, LoRAs by name, scale 0.8)
//!   ─▶ Publisher::publish ─▶ HSETNX katz:job:<id> status queued (+ digest, submitted_ms) ─▶ RabbitMQ
//! write_loras(store, names, weight map) ─▶ STORE/<name>.safetensors (seeded, diffusers/peft layout)
//! ```

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use anyhow::{bail, Context};
use katz_actors::protocol::{now_ms, ControlNetJob, ImageRef, Job, LoraJob};
use katz_actors::topology;

use crate::workload::TraceRequest;

/// What every job of a replayed trace shares.
#[derive(Debug, Clone)]
pub struct JobMix {
    pub base: String,
    /// The workers' ControlNet models the trace's ControlNets map onto (round robin by trace id).
    pub models: Vec<String>,
    /// The conditioning image (PNG) of every ControlNet.
    pub image: Vec<u8>,
    pub steps: u32,
    pub size: (usize, usize),
    pub guidance: f32,
}

impl JobMix {
    /// The job of trace request `i`, id `PREFIX-i`.
    pub fn job(&self, prefix: &str, i: usize, r: &TraceRequest) -> Job {
        let words = ["red", "blue", "green", "yellow", "purple", "orange"];
        let shapes = ["circle", "square", "triangle", "star"];
        let prompt = format!(
            "a {} {} on a white background",
            words[i % words.len()],
            shapes[(i / words.len()) % shapes.len()]
        );
        let mut job = Job::new(format!("{prefix}-{i}"), &self.base, prompt);
        job.width = self.size.0 as u32;
        job.height = self.size.1 as u32;
        job.steps = self.steps;
        job.guidance = self.guidance;
        job.seed = (i as u64).into();
        for c in &r.controlnets {
            let k = c
                .bytes()
                .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
            job.controlnets.push(ControlNetJob {
                resize: Default::default(),
                canny: None,
                model: self.models[k % self.models.len().max(1)].clone(),
                image: ImageRef::Inline(self.image.clone()),
                scale: 0.8,
                start: 0.0,
                end: 1.0,
            });
        }
        for l in &r.loras {
            job.loras.push(LoraJob {
                name: l.clone(),
                scale: 0.8,
            });
        }
        job
    }
}

/// A job's class by its adapters: `0C/1L`, `2C/1L`, …
pub fn class(controlnets: usize, loras: usize) -> String {
    format!("{controlnets}C/{loras}L")
}

/// The distinct LoRA names of a trace, sorted.
pub fn lora_names(t: &[TraceRequest]) -> Vec<&str> {
    let mut names: Vec<&str> = t
        .iter()
        .flat_map(|r| r.loras.iter().map(String::as_str))
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// Publishes jobs to RabbitMQ, each after its `queued` record; declares each queue once.
pub struct Publisher {
    conn: lapin::Connection,
    channel: lapin::Channel,
    declared: HashSet<String>,
}

impl Publisher {
    pub async fn connect(amqp: &str, name: &str) -> anyhow::Result<Self> {
        let conn = topology::connect(amqp, name)
            .await
            .with_context(|| format!("connecting to {}", katz_actors::redact::url(amqp)))?;
        let channel = conn.create_channel().await?;
        Ok(Publisher {
            conn,
            channel,
            declared: HashSet::new(),
        })
    }

    /// Stamps `submitted_ms`, writes the `queued` record (with `extra` fields) and publishes. An id
    /// already in use is an error.
    pub async fn publish(
        &mut self,
        redis: &mut redis::aio::MultiplexedConnection,
        queue: &str,
        job: &mut Job,
        extra: &[(&str, String)],
    ) -> anyhow::Result<()> {
        job.submitted_ms = Some(now_ms());
        if !super::submit::reserve_record(redis, job, extra, job.result_ttl_s).await? {
            bail!("job id `{}` is already in use: give another --id-prefix", job.id);
        }
        if self.declared.insert(queue.to_string()) {
            topology::declare(&self.channel, queue).await?;
        }
        topology::publish(&self.channel, queue, &job.encode()?, job.priority, &job.id).await?;
        Ok(())
    }

    /// The queues published to, sorted.
    pub fn queues(&self) -> Vec<&str> {
        let mut qs: Vec<&str> = self.declared.iter().map(String::as_str).collect();
        qs.sort_unstable();
        qs
    }

    pub async fn close(self) {
        let _ = self.conn.close(200, "published".into()).await;
    }
}

/// Writes `DIR/<name>.safetensors` for each LoRA name not there yet: diffusers/peft layout
/// (`unet.<module>.lora_A/B.weight`) over every LoRA-targetable layer of the bundle, rank `rank`,
/// seeded by the name, with factors small enough to nudge the image rather than wreck it.
pub fn write_loras(
    dir: &Path,
    names: &[&str],
    map: &BTreeMap<String, katz_onnx::bundle::WeightEntry>,
    rank: usize,
) -> anyhow::Result<usize> {
    use rand::{Rng, SeedableRng};
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut made = 0;
    for name in names {
        let path = dir.join(format!("{name}.safetensors"));
        if path.exists() {
            continue;
        }
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (w, e) in map {
            let [out, inp] = e.shape[..] else { continue };
            let r = rank.min(out).min(inp).max(1);
            let module = w.strip_suffix(".weight").unwrap_or(w);
            let mut f = |n: usize, scale: f32| -> Vec<u8> {
                (0..n)
                    .flat_map(|_| ((rng.random::<f32>() * 2.0 - 1.0) * scale).to_le_bytes())
                    .collect()
            };
            let a = f(r * inp, 1.0 / (inp as f32).sqrt());
            let b = f(out * r, 0.05 / (r as f32).sqrt());
            tensors.push((format!("unet.{module}.lora_A.weight"), vec![r, inp], a));
            tensors.push((format!("unet.{module}.lora_B.weight"), vec![out, r], b));
        }
        let views = tensors
            .iter()
            .map(|(k, s, b)| {
                Ok((
                    k.clone(),
                    safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)?,
                ))
            })
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let tmp = path.with_extension("tmp");
        safetensors::serialize_to_file(views, None, &tmp)?;
        std::fs::rename(&tmp, &path)?;
        made += 1;
    }
    Ok(made)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(cns: &[&str], loras: &[&str]) -> TraceRequest {
        TraceRequest {
            timestamp: 0.0,
            ip: "10.0.0.1".into(),
            scene_id: "B".into(),
            base_model_id: "m".into(),
            controlnets: cns.iter().map(|s| s.to_string()).collect(),
            loras: loras.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_trace_request_becomes_a_job_of_its_class() {
        let mix = JobMix {
            base: "tiny-sdxl".into(),
            models: vec!["cn-a".into(), "cn-b".into()],
            image: vec![1, 2],
            steps: 7,
            size: (64, 32),
            guidance: 5.0,
        };
        let j = mix.job("run", 3, &req(&["cn-3", "cn-1"], &["lora-17"]));
        assert_eq!(
            (j.id.as_str(), j.seed, j.steps, j.width, j.height),
            ("run-3", 3.into(), 7, 64, 32)
        );
        assert_eq!(j.controlnets.len(), 2);
        assert!(j.controlnets.iter().all(|c| c.model.starts_with("cn-")));
        assert_eq!(j.loras[0].name, "lora-17");
        assert_eq!(class(j.controlnets.len(), j.loras.len()), "2C/1L");
        // the same trace id maps onto the same model
        let k = mix.job("run", 4, &req(&["cn-3"], &[]));
        assert_eq!(k.controlnets[0].model, j.controlnets[0].model);
        let t = vec![req(&[], &["b", "a"]), req(&[], &["a"])];
        assert_eq!(lora_names(&t), vec!["a", "b"]);
    }
}
