//! diffusers' `EulerAncestralDiscreteScheduler`: an Euler step down to `sigma_down`, then fresh noise
//! of standard deviation `sigma_up` so that the sample lands at the next sigma. Karras sigmas do not
//! exist for it in diffusers; the config flag is ignored, as there.

use super::euler::{init_noise_sigma, input_scale, pred_original, sigma_schedule};
use super::{check_lengths, Common, NoiseSource, Prediction, Scheduler, SchedulerKind};

pub(super) struct EulerAncestral {
    prediction: Prediction,
    timesteps: Vec<f32>,
    /// One per timestep, then the final 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    /// Scratch buffer for the noise of one step.
    noise: Vec<f32>,
}

impl EulerAncestral {
    pub(super) fn new(common: &Common, steps: usize) -> Self {
        let (timesteps, sigmas) = sigma_schedule(common, steps, false);
        EulerAncestral {
            prediction: common.prediction,
            init_noise_sigma: init_noise_sigma(common.spacing, &sigmas),
            timesteps,
            sigmas,
            noise: Vec::new(),
        }
    }
}

impl Scheduler for EulerAncestral {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        self.init_noise_sigma
    }

    fn input_scale(&self, i: usize) -> f32 {
        input_scale(self.sigmas[i])
    }

    fn step(&mut self, i: usize, model_output: &[f32], sample: &mut [f32], noise: &mut dyn NoiseSource) {
        check_lengths(model_output, sample);
        let sigma = self.sigmas[i];
        let (sigma_from, sigma_to) = (sigma, self.sigmas[i + 1]);
        let from2 = sigma_from * sigma_from;
        let to2 = sigma_to * sigma_to;
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        // diffusers draws the noise on every step, the last (where sigma_up is 0) included.
        self.noise.resize(sample.len(), 0.0);
        noise.fill(&mut self.noise);
        for ((s, &m), &z) in sample.iter_mut().zip(model_output).zip(&self.noise) {
            let pred = pred_original(self.prediction, sigma, m, *s);
            let derivative = (*s - pred) / sigma;
            let prev = *s + derivative * dt;
            *s = prev + z * sigma_up;
        }
    }
}
