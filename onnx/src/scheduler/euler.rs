//! diffusers' `EulerDiscreteScheduler`: Euler's method on the probability-flow ODE in sigma, with
//! linear interpolation of the training sigmas, optional Karras sigmas and a final sigma of 0.
//! No churn (`s_churn` 0), as diffusers' pipelines call it.

use super::{
    check_lengths, karras_sigmas, np_interp, np_linspace, sigma_to_t, Common, NoiseSource, Prediction,
    Scheduler, SchedulerKind, Spacing,
};

pub(super) struct Euler {
    prediction: Prediction,
    timesteps: Vec<f32>,
    /// One per timestep, then the final 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
}

impl Euler {
    pub(super) fn new(common: &Common, steps: usize) -> Self {
        let (timesteps, sigmas) = sigma_schedule(common, steps, common.use_karras_sigmas);
        Euler {
            prediction: common.prediction,
            init_noise_sigma: init_noise_sigma(common.spacing, &sigmas),
            timesteps,
            sigmas,
        }
    }
}

/// The timesteps and sigmas (with the final 0) of `EulerDiscreteScheduler.set_timesteps`, also
/// used by the ancestral variant (which has no Karras option).
pub(super) fn sigma_schedule(common: &Common, steps: usize, karras: bool) -> (Vec<f32>, Vec<f32>) {
    let n_train = common.num_train_timesteps;
    let mut timesteps: Vec<f32> = match common.spacing {
        // np.linspace(0, N - 1, steps, dtype=np.float32)[::-1]
        Spacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps)
            .iter()
            .rev()
            .map(|&t| t as f32)
            .collect(),
        Spacing::Leading => common.leading(steps).into_iter().map(|t| t as f32).collect(),
        Spacing::Trailing => common.trailing(steps).into_iter().map(|t| t as f32).collect(),
    };
    // np.interp(timesteps, np.arange(0, len(sigmas)), sigmas), in float64.
    let mut sigmas: Vec<f64> = timesteps
        .iter()
        .map(|&t| np_interp(f64::from(t), &common.train_sigmas))
        .collect();
    if karras {
        let log_sigmas = common.log_train_sigmas();
        // sigma_min and sigma_max are those of the interpolated schedule, not of training.
        let (sigma_min, sigma_max) = (sigmas[sigmas.len() - 1], sigmas[0]);
        sigmas = karras_sigmas(sigma_min, sigma_max, steps);
        timesteps = sigmas
            .iter()
            .map(|&s| sigma_to_t(s, &log_sigmas) as f32)
            .collect();
    }
    let sigmas = sigmas
        .into_iter()
        .map(|s| s as f32)
        .chain(std::iter::once(0.0))
        .collect();
    (timesteps, sigmas)
}

/// `init_noise_sigma` of both Euler schedulers: the largest sigma, or `(max² + 1) ** 0.5` under
/// "leading" spacing.
pub(super) fn init_noise_sigma(spacing: Spacing, sigmas: &[f32]) -> f32 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match spacing {
        Spacing::Linspace | Spacing::Trailing => max,
        Spacing::Leading => (max * max + 1.0).sqrt(),
    }
}

/// `scale_model_input` of both Euler schedulers: `sample / (sigma² + 1) ** 0.5`.
pub(super) fn input_scale(sigma: f32) -> f32 {
    1.0 / (sigma * sigma + 1.0).sqrt()
}

/// diffusers' `pred_original_sample` of both Euler schedulers for one value.
#[inline]
pub(super) fn pred_original(prediction: Prediction, sigma: f32, model_output: f32, sample: f32) -> f32 {
    match prediction {
        Prediction::Epsilon => sample - sigma * model_output,
        // model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
        Prediction::VPrediction => {
            let var = sigma * sigma + 1.0;
            model_output * (-sigma / var.sqrt()) + sample / var
        }
    }
}

impl Scheduler for Euler {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Euler
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

    fn euler_sigmas(&self, i: usize) -> Option<(f32, f32)> {
        (self.prediction == Prediction::Epsilon).then(|| (self.sigmas[i], self.sigmas[i + 1]))
    }

    fn step(&mut self, i: usize, model_output: &[f32], sample: &mut [f32], _noise: &mut dyn NoiseSource) {
        check_lengths(model_output, sample);
        let sigma = self.sigmas[i];
        // gamma = 0 without churn, so sigma_hat = sigma * (gamma + 1) = sigma.
        let sigma_hat = sigma;
        let dt = self.sigmas[i + 1] - sigma_hat;
        for (s, &m) in sample.iter_mut().zip(model_output) {
            let pred = pred_original(self.prediction, sigma_hat, m, *s);
            let derivative = (*s - pred) / sigma_hat;
            *s += derivative * dt;
        }
    }
}
