//! What one worker serves, and how a wire job becomes the request its pipeline takes.
//!
//! ```text
//! protocol::Job + conditioning PNGs ─Catalogue::request─▶ katz_onnx Request ─ValidRequest::new─▶ ValidRequest
//!   base name            ── must be this worker's base model
//!   ControlNet names     ── ControlModel::Loaded (hosted here) | ControlModel::Served (a ControlNet service)
//!   scheduler, images    ── parsed; images decoded (PNG | JPEG | WebP, any size)
//!   seed                 ── a number, or -1: drawn here (the request's seed is the one used)
//!   everything else      ── checked once, by ValidRequest::new against `accepts` (which also
//!                           resizes the images and runs their canny preprocessor)
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use katz_onnx::conditioning::Preprocess;
use katz_onnx::image::decode_image;
use katz_onnx::request::{
    Accepts, ControlModel, ControlRequest, LoraRequest, Request, ServiceId, ValidRequest,
};
use katz_onnx::scheduler::SchedulerKind;

use crate::error::JobError;
use crate::protocol::Job;

/// The base model, the ControlNets by name and what the pipeline accepts.
#[derive(Debug, Clone)]
pub struct Catalogue {
    /// The base model's name: jobs must name it, and it names the queue.
    pub base: String,
    /// Every ControlNet a job may name: hosted here or served by ControlNet workers.
    pub controlnets: BTreeMap<String, ControlModel>,
    pub accepts: Accepts,
}

impl Catalogue {
    /// What a producer can check without a worker (`katz submit`): the job's own base and
    /// ControlNet names, SDXL's size multiple, the worker's default `limits`.
    pub fn producer(job: &Job, limits: &crate::protocol::Limits) -> Catalogue {
        Catalogue {
            base: job.base.clone(),
            controlnets: job
                .controlnets
                .iter()
                .enumerate()
                .map(|(i, c)| (c.model.clone(), ControlModel::Served(ServiceId(i))))
                .collect(),
            accepts: Accepts {
                limits: limits.request(),
                size_multiple: 8,
                buckets: Vec::new(),
                other_sizes: Default::default(),
                split: false,
                loaded: 0,
                served: job.controlnets.len(),
            },
        }
    }

    /// `job` with its conditioning images (`images[i]`: the encoded image of ControlNet `i`) as a
    /// request checked against this worker's pipeline; every problem is a dead-letter error
    /// naming it. A seed of -1 is drawn here: the request's `seed` is the one to record.
    pub fn request(&self, job: &Job, images: &[Vec<u8>]) -> Result<ValidRequest, JobError> {
        if job.base != self.base {
            return Err(JobError::Invalid(format!(
                "unknown base model `{}` (this worker serves `{}`)",
                job.base, self.base
            )));
        }
        let scheduler: SchedulerKind = job
            .scheduler
            .parse()
            .map_err(|e| JobError::Invalid(format!("{e}")))?;
        let mut controlnets = Vec::with_capacity(job.controlnets.len());
        for (i, (c, bytes)) in job.controlnets.iter().zip(images).enumerate() {
            let model = *self.controlnets.get(&c.model).ok_or_else(|| {
                let known: Vec<&String> = self.controlnets.keys().collect();
                JobError::Invalid(format!(
                    "unknown ControlNet `{}` (this worker serves {known:?})",
                    c.model
                ))
            })?;
            let image = decode_image(bytes, Path::new("")).map_err(|e| {
                let why = match e {
                    katz_onnx::Error::Image { message, .. } => message,
                    e => e.to_string(),
                };
                JobError::Invalid(format!(
                    "ControlNet #{i} (`{}`): the conditioning image is {why}",
                    c.model
                ))
            })?;
            controlnets.push(ControlRequest {
                model,
                image,
                prep: Preprocess {
                    resize: c.resize,
                    canny: c.canny,
                },
                scale: c.scale,
                start: c.start,
                end: c.end,
            });
        }
        let req = Request {
            prompt: job.prompt.clone(),
            negative_prompt: job.negative_prompt.clone(),
            width: job.width as usize,
            height: job.height as usize,
            steps: job.steps as usize,
            guidance: job.guidance,
            scheduler,
            karras: job.karras,
            seed: job.seed.resolve(),
            controlnets,
            loras: job
                .loras
                .iter()
                .map(|l| LoraRequest::named(l.name.clone(), l.scale))
                .collect(),
        };
        Ok(ValidRequest::new(req, &self.accepts)?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use katz_onnx::request::Limits;

    pub(crate) fn catalogue() -> Catalogue {
        Catalogue {
            base: "tiny-sdxl".into(),
            controlnets: BTreeMap::new(),
            accepts: Accepts {
                limits: Limits::default(),
                size_multiple: 8,
                buckets: Vec::new(),
                other_sizes: Default::default(),
                split: false,
                loaded: 0,
                served: 0,
            },
        }
    }

    #[test]
    fn a_job_maps_onto_one_checked_request() {
        let c = catalogue();
        let job = Job::new("j", "tiny-sdxl", "a red circle");
        let r = c.request(&job, &[]).unwrap();
        assert_eq!(
            (r.width, r.height, r.steps),
            (job.width as usize, job.height as usize, job.steps as usize)
        );
        let mut other = job.clone();
        other.base = "sd15".into();
        let e = c.request(&other, &[]).unwrap_err();
        assert!(e.to_string().contains("unknown base model `sd15`"), "{e}");
        let mut bad = job.clone();
        bad.steps = 1_000_000;
        let e = c.request(&bad, &[]).unwrap_err();
        assert!(e.to_string().contains("steps 1000000"), "{e}");
        assert_eq!(e.action(), crate::error::Action::DeadLetter);
    }
}
