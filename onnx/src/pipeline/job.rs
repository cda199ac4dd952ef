//! The state of one job that every denoising loop shares: the request, its noise, observer,
//! scheduler and conditioning, the LoRA weights (merged, or a merge still pending), the
//! ControlNet sessions and the timings. [`super::Pipeline::run`] prepares it; a loop drives it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::controlnet::ControlSession;
use crate::lora::plan::LoraPlan;
use crate::lora::PendingMerge;
use crate::request::ValidRequest;
use crate::scheduler::{NoiseSource, Scheduler};
use crate::tensor::Tensor;
use crate::text::Conditioning;
use crate::weights::{MergedWeights, Weights};
use crate::{Error, Result};

use super::{Observer, Timings};

/// An asynchronous merge not switched in yet: the merge, its bound step, timeout, early switch.
pub(super) type Pending<'p> = Option<(&'p mut PendingMerge, usize, Duration, bool)>;

/// What a loop needs of a job.
pub(super) struct Job<'a, 'p> {
    pub req: &'a ValidRequest,
    pub noise: &'a mut dyn NoiseSource,
    pub obs: &'a mut dyn Observer,
    pub sched: &'a mut dyn Scheduler,
    pub cond: &'a Conditioning,
    /// The weights bound now: empty (pristine) until a LoRA merge switches in.
    pub merged: Arc<MergedWeights>,
    pub pending: Pending<'p>,
    /// One session per ControlNet of the request (empty: the host loop runs the pipeline's own
    /// ControlNets serially).
    pub sessions: &'a mut Vec<Box<dyn ControlSession>>,
    /// Per ControlNet, its conditional half's session when it runs per guidance half (split
    /// guidance; `sessions[j]` then takes the unconditional half).
    pub halves: &'a mut Vec<Option<Box<dyn ControlSession>>>,
    /// Conditioning images, batched like the latents (the host loop's serial ControlNets).
    pub images: &'a [Tensor],
    pub t: &'a mut Timings,
    pub started: Instant,
}

/// The merged weights a plan starts a job with, and the merge still pending (async plans). An
/// async merge that touches the text encoders is waited for here (its layers change the prompt's
/// conditioning, which step 0 reads already): it switches in at step 0.
pub(super) fn start_loras<'p>(
    plan: LoraPlan<'p>,
    req: &ValidRequest,
    weights: &Weights,
    t: &mut Timings,
) -> Result<(Arc<MergedWeights>, Pending<'p>)> {
    Ok(match plan {
        LoraPlan::Sync if req.loras.is_empty() => (Arc::new(MergedWeights::default()), None),
        LoraPlan::Sync => {
            t.lora_switch_step = Some(0);
            let t0 = Instant::now();
            let merged = Arc::new(weights.merge(&req.loaded_loras()?)?);
            t.lora_merge = t0.elapsed();
            (merged, None)
        }
        LoraPlan::Async {
            pending,
            bound,
            timeout,
            early,
        } => {
            if pending.touches_text(timeout)? {
                let t0 = Instant::now();
                let merged = pending.poll(Some(timeout)).unwrap_or_else(|| {
                    Err(Error::Lora {
                        path: "<merge>".into(),
                        message: format!(
                            "the LoRA merge (text encoders included) was not ready within {timeout:?}"
                        ),
                    })
                })?;
                t.lora_wait += t0.elapsed();
                t.lora_merge = merged.merge_time;
                t.lora_switch_step = Some(0);
                (merged, None)
            } else {
                (
                    Arc::new(MergedWeights::default()),
                    Some((pending, bound.min(req.steps - 1), timeout, early)),
                )
            }
        }
    })
}

impl Job<'_, '_> {
    /// At the boundary before step `i`: the merged weights if they switch in now (waiting for
    /// them at the bound, recorded in `t.lora_wait`), else `None`. They are also `self.merged`.
    pub fn poll_lora(&mut self, i: usize) -> Result<Option<Arc<MergedWeights>>> {
        let Some((p, k, timeout, early)) = self.pending.as_mut() else {
            return Ok(None);
        };
        let t0 = Instant::now();
        let ready = if i >= *k {
            let r = p.poll(Some(*timeout)).unwrap_or_else(|| {
                Err(Error::Lora {
                    path: "<merge>".into(),
                    message: format!("the LoRA merge was not ready {timeout:?} after step {i} (bound {k})"),
                })
            });
            self.t.lora_wait += t0.elapsed();
            Some(r)
        } else if *early {
            p.poll(None)
        } else {
            None
        };
        let Some(r) = ready else {
            return Ok(None);
        };
        let merged = r?;
        self.t.lora_merge = merged.merge_time;
        self.t.lora_switch_step = Some(i);
        self.pending = None;
        tracing::debug!(step = i, layers = merged.len(), "LoRA weights switched in");
        self.merged = merged.clone();
        Ok(Some(merged))
    }

    /// After step `i`: the first step's time, then the observer (which may stop the job).
    pub fn stepped(&mut self, i: usize, latents: &Tensor) -> Result<()> {
        if i == 0 {
            self.t.first_step = self.started.elapsed();
        }
        self.obs.on_step(i, self.req.steps, latents)
    }
}
