//! diffusers' `DPMSolverMultistepScheduler` as DPM++ 2M: `algorithm_type` "dpmsolver++",
//! `solver_order` 2, `solver_type` "midpoint", `lower_order_final` true, `euler_at_final` false,
//! `final_sigmas_type` "zero", optional Karras sigmas. The model output is turned into a denoised
//! estimate (x0); the first and the last step are first order (DDIM-like), the others second order
//! with the previous step's estimate.

use super::{
    check_lengths, exp_f32, karras_sigmas, ln_f32, np_interp, np_linspace, sigma_to_t, Common, NoiseSource,
    Prediction, Scheduler, SchedulerError, SchedulerKind, Spacing,
};

pub(super) struct DpmPp2m {
    prediction: Prediction,
    timesteps: Vec<f32>,
    /// One per timestep, then the final 0.
    sigmas: Vec<f32>,
    /// Denoised estimate of the current step (after `step`, of the last step taken).
    x0: Vec<f32>,
    /// Denoised estimate of the step before.
    x0_prev: Vec<f32>,
    /// diffusers' `lower_order_nums`: how many steps have run, up to the solver order.
    lower_order_nums: usize,
    /// The step `step` expects next.
    next_step: usize,
}

impl DpmPp2m {
    pub(super) fn new(common: &Common, steps: usize) -> Result<Self, SchedulerError> {
        let n_train = common.num_train_timesteps;
        // lambda_min_clipped is -inf, so last_timestep = num_train_timesteps.
        let last_timestep = n_train;
        let mut timesteps: Vec<i64> = match common.spacing {
            // np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
            Spacing::Linspace => np_linspace(0.0, (last_timestep - 1) as f64, steps + 1)
                .iter()
                .skip(1)
                .rev()
                .map(|t| t.round_ties_even() as i64)
                .collect(),
            // (np.arange(0, steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + steps_offset
            Spacing::Leading => {
                let ratio = last_timestep / (steps + 1);
                // diffusers would run on with every timestep equal (and divide by h = 0).
                if ratio == 0 && !common.use_karras_sigmas {
                    return Err(SchedulerError::TooManySteps {
                        steps,
                        max: last_timestep - 1,
                    });
                }
                (1..=steps as i64)
                    .rev()
                    .map(|i| i * ratio as i64 + common.steps_offset as i64)
                    .collect()
            }
            Spacing::Trailing => common.trailing(steps),
        };
        let sigmas: Vec<f64> = if common.use_karras_sigmas {
            // Karras sigmas span the whole training range; timesteps are the rounded inverse.
            let log_sigmas = common.log_train_sigmas();
            let (sigma_min, sigma_max) = (
                f64::from(common.train_sigmas[0]),
                f64::from(common.train_sigmas[n_train - 1]),
            );
            let sigmas = karras_sigmas(sigma_min, sigma_max, steps);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas).round_ties_even() as i64)
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|&t| np_interp(t as f64, &common.train_sigmas))
                .collect()
        };
        Ok(DpmPp2m {
            prediction: common.prediction,
            timesteps: timesteps.iter().map(|&t| t as f32).collect(),
            sigmas: sigmas
                .into_iter()
                .map(|s| s as f32)
                .chain(std::iter::once(0.0))
                .collect(),
            x0: Vec::new(),
            x0_prev: Vec::new(),
            lower_order_nums: 0,
            next_step: 0,
        })
    }
}

/// `_sigma_to_alpha_sigma_t`: (alpha_t, sigma_t) of the variance-preserving process at `sigma`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha_t = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha_t, sigma * alpha_t)
}

/// log(alpha_t) - log(sigma_t), +inf at sigma 0.
fn lambda(alpha_t: f32, sigma_t: f32) -> f32 {
    ln_f32(alpha_t) - ln_f32(sigma_t)
}

impl Scheduler for DpmPp2m {
    fn kind(&self) -> SchedulerKind {
        SchedulerKind::DpmPp2m
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
        assert_eq!(
            i, self.next_step,
            "DPM++ 2M steps must be taken in order, once each"
        );
        assert!(
            i < self.timesteps.len(),
            "DPM++ 2M step {i} of {}",
            self.timesteps.len()
        );
        self.next_step += 1;
        let last = self.timesteps.len() - 1;

        // convert_model_output: the denoised estimate x0.
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        std::mem::swap(&mut self.x0, &mut self.x0_prev);
        self.x0.clear();
        self.x0.extend(
            sample
                .iter()
                .zip(model_output)
                .map(|(&s, &m)| match self.prediction {
                    Prediction::Epsilon => (s - sigma_s0 * m) / alpha_s0,
                    Prediction::VPrediction => alpha_s0 * s - sigma_s0 * m,
                }),
        );

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda_t - lambda_s0;
        let ratio = sigma_t / sigma_s0;
        let coef = alpha_t * (exp_f32(-h) - 1.0);
        // lower_order_final: the last step is first order (final_sigmas_type "zero").
        if self.lower_order_nums < 1 || i == last {
            for (s, &d0) in sample.iter_mut().zip(&self.x0) {
                *s = ratio * *s - coef * d0;
            }
        } else {
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
            let lambda_s1 = lambda(alpha_s1, sigma_s1);
            let h_0 = lambda_s0 - lambda_s1;
            let r0 = h_0 / h;
            let inv_r0 = 1.0 / r0;
            let half_coef = 0.5 * coef;
            assert_eq!(
                self.x0_prev.len(),
                sample.len(),
                "DPM++ 2M: sample length changed between steps"
            );
            for ((s, &m0), &m1) in sample.iter_mut().zip(&self.x0).zip(&self.x0_prev) {
                let d1 = inv_r0 * (m0 - m1);
                *s = ratio * *s - coef * m0 - half_coef * d1;
            }
        }
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
    }
}
