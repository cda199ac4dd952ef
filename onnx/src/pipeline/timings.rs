//! Wall time per stage of one generation, and the per-step ControlNet critical path.
//!
//! ```text
//! step i:  sent ─▶ ControlNet run (start..end) ─┐
//!          UNet encoder ──────────── encoder_end ┴─▶ residuals added (done) ─▶ decoder
//!          cn_slowest_run = slowest run, cn_start_delay = its start − sent,
//!          cn_after_encoder = last end − encoder_end, residual_transport = done − max(end, encoder_end)
//! ```

use std::time::{Duration, Instant};

use crate::controlnet::RunSpan;

/// Wall time per stage of one generation.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub text_encode: Duration,
    pub lora_merge: Duration,
    pub controlnet: Duration,
    pub unet_encoder: Duration,
    pub unet_decoder: Duration,
    pub scheduler: Duration,
    pub vae_decode: Duration,
    pub total: Duration,
    pub steps: usize,
    /// Time the denoising loop stood still waiting for an asynchronous LoRA merge.
    pub lora_wait: Duration,
    /// The first step run with the merged weights (`None`: no LoRA).
    pub lora_switch_step: Option<usize>,
    /// From the start of the generation to the end of its first step.
    pub first_step: Duration,
    /// The per-step critical path with ControlNets, summed over steps (sessions that report
    /// [`RunSpan`]s: in-process ones): the slowest ControlNet's run on its GPU and how long it
    /// waited to start after the step was handed over; how long after the UNet encoder ended the
    /// last residuals were ready; and the residual transport after both (copies between GPUs,
    /// the scaled adds).
    pub cn_slowest_run: Duration,
    pub cn_start_delay: Duration,
    pub cn_after_encoder: Duration,
    pub residual_transport: Duration,
    /// Run time of each of the request's ControlNets, summed over its steps (a ControlNet placed
    /// per guidance half: both halves' runs).
    pub cn_runs: Vec<Duration>,
}

impl Timings {
    /// Mean wall time of one denoising step (ControlNets, UNet halves, guidance, scheduler).
    pub fn per_step(&self) -> Duration {
        let loop_time = self.controlnet + self.unet_encoder + self.unet_decoder + self.scheduler;
        loop_time
            .checked_div(self.steps.max(1) as u32)
            .unwrap_or_default()
    }

    pub fn rows(&self) -> Vec<(&'static str, Duration)> {
        vec![
            ("text encoders", self.text_encode),
            ("LoRA merge", self.lora_merge),
            ("LoRA wait", self.lora_wait),
            ("ControlNets", self.controlnet),
            ("UNet encoder", self.unet_encoder),
            ("UNet decoder", self.unet_decoder),
            ("guidance + scheduler", self.scheduler),
            ("VAE decode", self.vae_decode),
            ("per step (mean)", self.per_step()),
            ("total", self.total),
        ]
    }
}

/// One step's ControlNet spans, gathered as their residuals arrive ([`Timings`]' critical path).
#[derive(Default)]
pub(crate) struct StepPath {
    last_end: Option<Instant>,
    slowest: Duration,
    delay: Duration,
    /// Each noted run: the request's ControlNet index and its run time.
    runs: Vec<(usize, Duration)>,
}

impl StepPath {
    pub(crate) fn note(&mut self, j: usize, span: Option<RunSpan>) {
        let Some(s) = span else { return };
        let run = s.end.saturating_duration_since(s.start);
        self.runs.push((j, run));
        if run >= self.slowest {
            self.slowest = run;
            self.delay = s.start.saturating_duration_since(s.sent);
        }
        self.last_end = Some(self.last_end.map_or(s.end, |e| e.max(s.end)));
    }

    /// The step's residuals are in: `encoder_end` when the UNet encoder(s) returned, `done` when
    /// the residuals had been added.
    pub(crate) fn finish(self, t: &mut Timings, encoder_end: Instant, done: Instant) {
        for (j, run) in self.runs {
            if t.cn_runs.len() <= j {
                t.cn_runs.resize(j + 1, Duration::ZERO);
            }
            t.cn_runs[j] += run;
        }
        let Some(end) = self.last_end else { return };
        t.cn_slowest_run += self.slowest;
        t.cn_start_delay += self.delay;
        t.cn_after_encoder += end.saturating_duration_since(encoder_end);
        t.residual_transport += done.saturating_duration_since(end.max(encoder_end));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_step_path_adds_up_the_slowest_controlnet_and_the_transport() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let span = |sent, start, end| {
            Some(RunSpan {
                sent: at(sent),
                start: at(start),
                end: at(end),
            })
        };
        let mut t = Timings::default();
        let mut path = StepPath::default();
        // encoder ends at 15 ms; ControlNet 1 (slowest, 20 ms) ends at 21, the others earlier
        path.note(0, span(0, 1, 18));
        path.note(2, None); // a session that cannot tell is skipped
        path.note(1, span(0, 1, 21));
        path.finish(&mut t, at(15), at(24));
        assert_eq!(t.cn_slowest_run, Duration::from_millis(20));
        assert_eq!(t.cn_start_delay, Duration::from_millis(1));
        assert_eq!(t.cn_after_encoder, Duration::from_millis(6));
        assert_eq!(t.residual_transport, Duration::from_millis(3));
        assert_eq!(
            t.cn_runs,
            vec![Duration::from_millis(17), Duration::from_millis(20)]
        );
        // residuals ready before the encoder ended: nothing after it, transport from its end
        let mut path = StepPath::default();
        path.note(0, span(30, 30, 40));
        path.finish(&mut t, at(45), at(46));
        assert_eq!(t.cn_after_encoder, Duration::from_millis(6));
        assert_eq!(t.residual_transport, Duration::from_millis(4));
    }
}
