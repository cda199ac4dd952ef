//! diffusers' `DDIMScheduler` with eta 0 (deterministic), no sample clipping or thresholding, and
//! `set_alpha_to_one` false (SDXL's config), so that the step below timestep 0 lands on
//! `alphas_cumprod[0]`.

use super::{
    check_lengths, np_linspace, Common, NoiseSource, Prediction, Scheduler, SchedulerError, SchedulerKind,
    Spacing,
};

pub(super) struct Ddim {
    prediction: Prediction,
    /// Integer training timesteps, one per step.
    train_timesteps: Vec<usize>,
    timesteps: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    /// `alphas_cumprod[0]`, as `set_alpha_to_one` is false.
    final_alpha_cumprod: f32,
    /// diffusers' `num_train_timesteps // num_inference_steps`, the distance to the previous timestep
    /// whatever the spacing.
    step_ratio: usize,
}

impl Ddim {
    pub(super) fn new(common: &Common, steps: usize) -> Result<Self, SchedulerError> {
        let n_train = common.num_train_timesteps;
        let timesteps: Vec<i64> = match common.spacing {
            // np.linspace(0, N - 1, steps).round()[::-1].astype(np.int64)
            Spacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps)
                .iter()
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            Spacing::Leading => common.leading(steps),
            Spacing::Trailing => common.trailing(steps),
        };
        // diffusers would index alphas_cumprod with these (or wrap around, for -1).
        let train_timesteps = timesteps
            .iter()
            .map(|&t| {
                usize::try_from(t).ok().filter(|&t| t < n_train).ok_or_else(|| {
                    let spacing = common.spacing.name();
                    SchedulerError::Unsupported(format!(
                        "DDIM with {steps} steps and {spacing} spacing reaches timestep {t}, \
                         outside the trained 0..{n_train}"
                    ))
                })
            })
            .collect::<Result<Vec<usize>, _>>()?;
        Ok(Ddim {
            prediction: common.prediction,
            timesteps: train_timesteps.iter().map(|&t| t as f32).collect(),
            train_timesteps,
            alphas_cumprod: common.alphas_cumprod.clone(),
            final_alpha_cumprod: common.alphas_cumprod[0],
            step_ratio: n_train / steps,
        })
    }
}

impl Scheduler for Ddim {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    fn input_scale(&self, _i: usize) -> f32 {
        1.0
    }

    fn step(&mut self, i: usize, model_output: &[f32], sample: &mut [f32], _noise: &mut dyn NoiseSource) {
        check_lengths(model_output, sample);
        let t = self.train_timesteps[i];
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_t_prev = match t.checked_sub(self.step_ratio) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let sqrt_alpha = alpha_prod_t.sqrt();
        let sqrt_beta = beta_prod_t.sqrt();
        // eta = 0: std_dev_t = 0 * variance ** 0.5 (NaN stays NaN, as in torch).
        let variance = (beta_prod_t_prev / beta_prod_t) * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = 0.0 * variance.sqrt();
        let direction_coef = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt();
        let sqrt_alpha_prev = alpha_prod_t_prev.sqrt();
        for (s, &m) in sample.iter_mut().zip(model_output) {
            let (pred_original, pred_epsilon) = match self.prediction {
                Prediction::Epsilon => ((*s - sqrt_beta * m) / sqrt_alpha, m),
                Prediction::VPrediction => (sqrt_alpha * *s - sqrt_beta * m, sqrt_alpha * m + sqrt_beta * *s),
            };
            *s = sqrt_alpha_prev * pred_original + direction_coef * pred_epsilon;
        }
    }
}
