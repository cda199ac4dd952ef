//! Diffusion schedulers: Euler, Euler ancestral, DDIM and DPM++ 2M.
//!
//! Each one is a port of its diffusers class as an SDXL pipeline builds it, that is
//! `XScheduler.from_config(<SDXL base 1.0 scheduler_config.json>)`:
//!
//! - [`SchedulerKind::Euler`], `EulerDiscreteScheduler` (linear interpolation, final sigma 0,
//!   optional Karras sigmas);
//! - [`SchedulerKind::EulerAncestral`], `EulerAncestralDiscreteScheduler`;
//! - [`SchedulerKind::Ddim`], `DDIMScheduler` (eta 0, no clipping or thresholding,
//!   `set_alpha_to_one` false);
//! - [`SchedulerKind::DpmPp2m`], `DPMSolverMultistepScheduler` (`dpmsolver++`, order 2, midpoint,
//!   `lower_order_final`, final sigma 0, optional Karras sigmas).
//!
//! The numbers follow diffusers closely: the training tables (betas, cumulative alphas, sigmas) are
//! built in `f32` as torch builds them (`linspace` with fused multiply-adds, the cumulative product
//! accumulated in `f64`, as torch's CPU kernels do), the inference schedules (`np.interp`, Karras
//! sigmas, `_sigma_to_t`) in `f64` as numpy computes them, and every step in `f32` in the order of
//! diffusers' tensor expressions. The unit tests compare whole trajectories with ones recorded from
//! diffusers by `tools/scheduler_reference.py`; they agree to within 1e-6 relative, most values bit
//! for bit.
//!
//! Data flow of one generation, for `i` in `0..timesteps().len()`:
//!
//! 1. `latents = unit_normal_noise * init_noise_sigma()`;
//! 2. the model gets `latents * input_scale(i)` and `timesteps()[i]`;
//! 3. `step(i, model_output, &mut latents, noise)` moves `latents` to the next noise level.
//!
//! After the last step `latents` is the denoised latent for the VAE.

mod ddim;
mod dpmpp_2m;
mod euler;
mod euler_ancestral;

use std::fmt;
use std::str::FromStr;

/// A source of standard-normal noise (mean 0, variance 1), drawn by the ancestral scheduler.
pub trait NoiseSource {
    /// Fills `out` with independent standard-normal values.
    fn fill(&mut self, out: &mut [f32]);
}

/// Which scheduler to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    /// diffusers' `EulerDiscreteScheduler`.
    Euler,
    /// diffusers' `EulerAncestralDiscreteScheduler`.
    EulerAncestral,
    /// diffusers' `DDIMScheduler`.
    Ddim,
    /// diffusers' `DPMSolverMultistepScheduler` set up as DPM++ 2M.
    DpmPp2m,
}

impl SchedulerKind {
    /// Every kind, in the order of [`SchedulerKind::VALID_NAMES`].
    pub const ALL: [SchedulerKind; 4] = [
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Ddim,
        SchedulerKind::DpmPp2m,
    ];

    /// The names [`FromStr`] accepts, for messages.
    pub const VALID_NAMES: &'static str =
        "euler, euler-a (or euler-ancestral), ddim, dpm++2m (or dpmpp-2m, dpmpp2m)";

    /// The canonical name, which [`fmt::Display`] prints and [`FromStr`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::DpmPp2m => "dpm++2m",
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;

    /// Parses a scheduler name; ASCII case and surrounding white space are ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "euler" => Ok(SchedulerKind::Euler),
            "euler-a" | "euler-ancestral" => Ok(SchedulerKind::EulerAncestral),
            "ddim" => Ok(SchedulerKind::Ddim),
            "dpm++2m" | "dpmpp-2m" | "dpmpp2m" => Ok(SchedulerKind::DpmPp2m),
            _ => Err(SchedulerError::UnknownKind(s.to_owned())),
        }
    }
}

fn default_prediction_type() -> String {
    "epsilon".to_owned()
}

/// The training noise schedule and inference settings, as in a diffusers `scheduler_config.json`
/// (fields not listed here are ignored when deserializing one).
///
/// Settings of the diffusers classes that are not fields here take the values that
/// `from_config(<SDXL base 1.0 scheduler_config.json>)` gives them: `interpolation_type` "linear",
/// `final_sigmas_type` "zero", no `trained_betas`, no zero-SNR rescaling; DDIM with eta 0,
/// `set_alpha_to_one` false, `clip_sample` false, no thresholding; DPM++ 2M as described on
/// [`SchedulerKind::DpmPp2m`].
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
pub struct SchedulerConfig {
    /// Number of diffusion steps the model was trained with (1000).
    pub num_train_timesteps: usize,
    /// First beta of the training schedule.
    pub beta_start: f64,
    /// Last beta of the training schedule.
    pub beta_end: f64,
    /// "scaled_linear" (betas linear in their square root) or "linear".
    pub beta_schedule: String,
    /// "leading", "trailing" or "linspace"; see diffusers' `timestep_spacing`.
    pub timestep_spacing: String,
    /// Offset added to the timesteps under "leading" spacing.
    pub steps_offset: usize,
    /// What the model predicts: "epsilon" or "v_prediction".
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    /// Karras sigmas (Euler and DPM++ 2M). Euler ancestral and DDIM ignore the flag, as in diffusers.
    #[serde(default)]
    pub use_karras_sigmas: bool,
}

impl Default for SchedulerConfig {
    /// SDXL base 1.0's scheduler configuration.
    fn default() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".to_owned(),
            timestep_spacing: "leading".to_owned(),
            steps_offset: 1,
            prediction_type: default_prediction_type(),
            use_karras_sigmas: false,
        }
    }
}

/// Why a scheduler cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// Zero inference steps were asked for.
    #[error("the number of inference steps must be at least 1")]
    ZeroSteps,
    /// More inference steps were asked for than the training schedule allows.
    #[error("{steps} inference steps are too many: this noise schedule allows at most {max}")]
    TooManySteps {
        /// Steps asked for.
        steps: usize,
        /// The largest number allowed.
        max: usize,
    },
    /// A configuration value these ports do not implement.
    #[error("unsupported scheduler configuration: {0}")]
    Unsupported(String),
    /// A scheduler name that [`SchedulerKind`]'s `FromStr` does not know.
    #[error("unknown scheduler {0:?}; valid names: {names}", names = SchedulerKind::VALID_NAMES)]
    UnknownKind(String),
}

/// A scheduler set up for a fixed number of inference steps.
pub trait Scheduler: Send {
    /// Which scheduler this is.
    fn kind(&self) -> SchedulerKind;
    /// Model `timestep` input for each step, in order (float: Euler's may be fractional).
    ///
    /// Its length is the number of steps to run. That is the number asked for, except where
    /// diffusers itself gives one more: "trailing" spacing with a step count such as 61, where
    /// numpy's `arange` yields an extra timestep of -1.
    fn timesteps(&self) -> &[f32];
    /// Multiplier of the initial unit-normal noise (diffusers' init_noise_sigma).
    fn init_noise_sigma(&self) -> f32;
    /// Factor applied to the latent before the model at step `i` (diffusers' scale_model_input is a scalar
    /// multiply for all four).
    fn input_scale(&self, i: usize) -> f32;
    /// One denoising step in place:
    /// `sample` ← `scheduler.step(model_output, timesteps[i], sample).prev_sample`; ancestral noise
    /// drawn from `noise`.
    ///
    /// Steps must be taken in order, `i` = 0, 1, … each once; `model_output` and `sample` must have the
    /// same length.
    fn step(&mut self, i: usize, model_output: &[f32], sample: &mut [f32], noise: &mut dyn NoiseSource);
}

/// Builds scheduler `kind` for `steps` inference steps.
pub fn build(
    kind: SchedulerKind,
    config: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Scheduler>, SchedulerError> {
    let common = Common::new(config, steps)?;
    Ok(match kind {
        SchedulerKind::Euler => Box::new(euler::Euler::new(&common, steps)),
        SchedulerKind::EulerAncestral => Box::new(euler_ancestral::EulerAncestral::new(&common, steps)),
        SchedulerKind::Ddim => Box::new(ddim::Ddim::new(&common, steps)?),
        SchedulerKind::DpmPp2m => Box::new(dpmpp_2m::DpmPp2m::new(&common, steps)?),
    })
}

/// How inference timesteps are spread over the training ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spacing {
    Leading,
    Trailing,
    Linspace,
}

impl Spacing {
    fn name(self) -> &'static str {
        match self {
            Spacing::Leading => "leading",
            Spacing::Trailing => "trailing",
            Spacing::Linspace => "linspace",
        }
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prediction {
    Epsilon,
    VPrediction,
}

/// The validated configuration and the training tables every scheduler starts from.
struct Common {
    num_train_timesteps: usize,
    spacing: Spacing,
    steps_offset: usize,
    prediction: Prediction,
    use_karras_sigmas: bool,
    /// `alphas_cumprod` of diffusers, indexed by training timestep.
    alphas_cumprod: Vec<f32>,
    /// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5`, indexed by training timestep (ascending).
    train_sigmas: Vec<f32>,
}

impl Common {
    fn new(config: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        let n_train = config.num_train_timesteps;
        if n_train < 2 {
            return Err(SchedulerError::Unsupported(format!(
                "num_train_timesteps {n_train} (at least 2 are needed)"
            )));
        }
        if steps == 0 {
            return Err(SchedulerError::ZeroSteps);
        }
        if steps > n_train {
            return Err(SchedulerError::TooManySteps { steps, max: n_train });
        }
        let spacing = match config.timestep_spacing.as_str() {
            "leading" => Spacing::Leading,
            "trailing" => Spacing::Trailing,
            "linspace" => Spacing::Linspace,
            other => {
                return Err(SchedulerError::Unsupported(format!(
                    "timestep_spacing {other:?} (expected \"leading\", \"trailing\" or \"linspace\")"
                )))
            }
        };
        let prediction = match config.prediction_type.as_str() {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::VPrediction,
            other => {
                return Err(SchedulerError::Unsupported(format!(
                    "prediction_type {other:?} (expected \"epsilon\" or \"v_prediction\")"
                )))
            }
        };
        // torch.linspace(..., dtype=torch.float32) (** 2 for scaled_linear).
        let betas: Vec<f32> = match config.beta_schedule.as_str() {
            "linear" => torch_linspace_f32(config.beta_start, config.beta_end, n_train),
            "scaled_linear" => torch_linspace_f32(config.beta_start.sqrt(), config.beta_end.sqrt(), n_train)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            other => {
                return Err(SchedulerError::Unsupported(format!(
                    "beta_schedule {other:?} (expected \"scaled_linear\" or \"linear\")"
                )))
            }
        };
        // torch.cumprod on CPU accumulates float32 in double and rounds each output.
        let mut acc = 1.0f64;
        let alphas_cumprod: Vec<f32> = betas
            .iter()
            .map(|&b| {
                acc *= f64::from(1.0f32 - b);
                acc as f32
            })
            .collect();
        let train_sigmas = alphas_cumprod
            .iter()
            .map(|&a| ((1.0f32 - a) / a).sqrt())
            .collect();
        Ok(Common {
            num_train_timesteps: n_train,
            spacing,
            steps_offset: config.steps_offset,
            prediction,
            use_karras_sigmas: config.use_karras_sigmas,
            alphas_cumprod,
            train_sigmas,
        })
    }

    /// `np.log(sigmas)` of the float32 training sigmas (a float32 array).
    fn log_train_sigmas(&self) -> Vec<f32> {
        self.train_sigmas.iter().map(|&s| ln_f32(s)).collect()
    }

    /// `np.arange(0, n) * (N // n)`, reversed, plus `steps_offset`: diffusers' "leading" timesteps.
    fn leading(&self, n: usize) -> Vec<i64> {
        let ratio = (self.num_train_timesteps / n) as i64;
        (0..n as i64)
            .rev()
            .map(|i| i * ratio + self.steps_offset as i64)
            .collect()
    }

    /// `np.round(np.arange(N, 0, -N / n)) - 1`: diffusers' "trailing" timesteps.
    fn trailing(&self, n: usize) -> Vec<i64> {
        let n_train = self.num_train_timesteps as f64;
        np_arange(n_train, 0.0, -(n_train / n as f64))
            .into_iter()
            .map(|t| t.round_ties_even() as i64 - 1)
            .collect()
    }
}

/// `f32` natural logarithm, correctly rounded (through `f64`) like numpy's and torch's.
fn ln_f32(x: f32) -> f32 {
    f64::from(x).ln() as f32
}

/// `f32` exponential, correctly rounded (through `f64`).
fn exp_f32(x: f32) -> f32 {
    f64::from(x).exp() as f32
}

/// `torch.linspace(start, end, steps, dtype=torch.float32)` as its CPU kernel computes it: the first
/// half counted up from `start`, the second down from `end`, each value one fused multiply-add (the
/// x86-64 build of torch contracts `start + step * idx`; this matches it bit for bit).
fn torch_linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in `f64`.
fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut out: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    out[num - 1] = stop;
    out
}

/// `np.arange(start, stop, step)` for floats: `ceil((stop - start) / step)` values
/// `start + i * ((start + step) - start)`.
fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, np.arange(len(fp)), fp)`.
fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x.is_nan() {
        return f64::NAN;
    }
    if x >= last as f64 {
        return f64::from(fp[last]);
    }
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    let j = x.floor() as usize;
    let (y0, y1) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    if j as f64 == x {
        return y0;
    }
    (y1 - y0) * (x - j as f64) + y0
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`, interpolating linearly in
/// log sigma between neighbouring training timesteps.
fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // low_idx = np.cumsum(dists >= 0).argmax().clip(max=len - 2)
    let (mut count, mut best, mut low) = (0usize, 0usize, 0usize);
    for (i, &ls) in log_sigmas.iter().enumerate() {
        if log_sigma - f64::from(ls) >= 0.0 {
            count += 1;
            if count > best {
                best = count;
                low = i;
            }
        }
    }
    let low = low.min(log_sigmas.len() - 2);
    let high = low + 1;
    let (lo, hi) = (f64::from(log_sigmas[low]), f64::from(log_sigmas[high]));
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * high as f64
}

/// diffusers' `_convert_to_karras` (rho 7) from `sigma_max` down to `sigma_min` in `n` values.
fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv_rho + r * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// Panics unless `model_output` and `sample` have the same length.
fn check_lengths(model_output: &[f32], sample: &[f32]) {
    assert_eq!(
        model_output.len(),
        sample.len(),
        "scheduler step: model output has {} values, the sample {}",
        model_output.len(),
        sample.len()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Reference {
        sample: Vec<f32>,
        model_outputs: Vec<Vec<f32>>,
        noise: Vec<Vec<f32>>,
        cases: Vec<Case>,
        schedule_tables: Vec<Table>,
    }

    /// Timesteps of one setting, recorded without stepping.
    #[derive(serde::Deserialize)]
    struct Table {
        scheduler: String,
        steps: usize,
        timestep_spacing: String,
        use_karras_sigmas: bool,
        timesteps: Vec<f32>,
        init_noise_sigma: f32,
        /// Only for the Euler kinds.
        input_scales: Option<Vec<f32>>,
    }

    #[derive(serde::Deserialize)]
    struct Case {
        scheduler: String,
        steps: usize,
        timestep_spacing: String,
        use_karras_sigmas: bool,
        prediction_type: String,
        beta_schedule: String,
        timesteps: Vec<f32>,
        init_noise_sigma: f32,
        input_scales: Vec<f32>,
        samples: Vec<Vec<f32>>,
    }

    impl Case {
        fn label(&self) -> String {
            format!(
                "{} steps={} spacing={} karras={} prediction={} betas={}",
                self.scheduler,
                self.steps,
                self.timestep_spacing,
                self.use_karras_sigmas,
                self.prediction_type,
                self.beta_schedule
            )
        }
    }

    /// Hands out the recorded noise rows in order.
    struct Recorded<'a> {
        rows: &'a [Vec<f32>],
        next: usize,
    }

    impl NoiseSource for Recorded<'_> {
        fn fill(&mut self, out: &mut [f32]) {
            out.copy_from_slice(&self.rows[self.next]);
            self.next += 1;
        }
    }

    const REL_TOL: f32 = 1e-5;

    /// Relative error of `got` against `want`, with values below 1 in magnitude measured against 1
    /// (the data are of unit scale, so near-zero values that result from cancellation are not
    /// judged by their own tiny magnitude).
    fn rel_err(got: f32, want: f32) -> f32 {
        (got - want).abs() / want.abs().max(1.0)
    }

    fn reference() -> Reference {
        serde_json::from_str(include_str!("testdata/reference.json")).expect("reference.json parses")
    }

    #[test]
    fn matches_diffusers_reference() {
        let reference = reference();
        assert!(reference.cases.len() >= 30);
        let mut worst = 0.0f32;
        for case in &reference.cases {
            let label = case.label();
            let config = SchedulerConfig {
                timestep_spacing: case.timestep_spacing.clone(),
                prediction_type: case.prediction_type.clone(),
                use_karras_sigmas: case.use_karras_sigmas,
                beta_schedule: case.beta_schedule.clone(),
                ..SchedulerConfig::default()
            };
            let kind: SchedulerKind = case.scheduler.parse().expect("known scheduler name");
            let mut scheduler = build(kind, &config, case.steps).expect("scheduler builds");
            assert_eq!(scheduler.kind(), kind);

            assert_eq!(
                scheduler.timesteps().len(),
                case.timesteps.len(),
                "{label}: timestep count"
            );
            for (i, (&got, &want)) in scheduler.timesteps().iter().zip(&case.timesteps).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-4,
                    "{label}: timestep {i}: {got} vs {want}"
                );
            }
            let e = rel_err(scheduler.init_noise_sigma(), case.init_noise_sigma);
            assert!(
                e <= REL_TOL,
                "{label}: init_noise_sigma {} vs {}",
                scheduler.init_noise_sigma(),
                case.init_noise_sigma
            );
            worst = worst.max(e);

            let mut sample = reference.sample.clone();
            let mut noise = Recorded {
                rows: &reference.noise,
                next: 0,
            };
            for i in 0..case.timesteps.len() {
                let scale = scheduler.input_scale(i);
                let e = rel_err(scale, case.input_scales[i]);
                assert!(
                    e <= REL_TOL,
                    "{label}: input scale {i}: {scale} vs {}",
                    case.input_scales[i]
                );
                worst = worst.max(e);

                scheduler.step(i, &reference.model_outputs[i], &mut sample, &mut noise);
                for (j, (&got, &want)) in sample.iter().zip(&case.samples[i]).enumerate() {
                    let e = rel_err(got, want);
                    assert!(
                        e <= REL_TOL,
                        "{label}: sample after step {i}, value {j}: {got} vs {want}"
                    );
                    worst = worst.max(e);
                }
            }
        }
        eprintln!("largest relative error against diffusers: {worst:e}");
    }

    #[test]
    fn schedules_match_diffusers_reference() {
        let reference = reference();
        assert!(reference.schedule_tables.len() >= 300);
        for table in &reference.schedule_tables {
            let label = format!(
                "{} steps={} spacing={} karras={}",
                table.scheduler, table.steps, table.timestep_spacing, table.use_karras_sigmas
            );
            let config = SchedulerConfig {
                timestep_spacing: table.timestep_spacing.clone(),
                use_karras_sigmas: table.use_karras_sigmas,
                ..SchedulerConfig::default()
            };
            let kind: SchedulerKind = table.scheduler.parse().expect("known scheduler name");
            let scheduler = build(kind, &config, table.steps).expect("scheduler builds");
            assert_eq!(
                scheduler.timesteps().len(),
                table.timesteps.len(),
                "{label}: timestep count"
            );
            for (i, (&got, &want)) in scheduler.timesteps().iter().zip(&table.timesteps).enumerate() {
                assert!(
                    (got - want).abs() <= 1e-4,
                    "{label}: timestep {i}: {got} vs {want}"
                );
            }
            let (got, want) = (scheduler.init_noise_sigma(), table.init_noise_sigma);
            assert!(
                rel_err(got, want) <= REL_TOL,
                "{label}: init_noise_sigma {got} vs {want}"
            );
            let ones = vec![1.0; table.timesteps.len()];
            for (i, &want) in table.input_scales.as_ref().unwrap_or(&ones).iter().enumerate() {
                let got = scheduler.input_scale(i);
                assert!(
                    rel_err(got, want) <= REL_TOL,
                    "{label}: input scale {i}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn zero_steps_is_an_error() {
        for kind in SchedulerKind::ALL {
            let err = build(kind, &SchedulerConfig::default(), 0)
                .err()
                .expect("zero steps fails");
            assert!(matches!(err, SchedulerError::ZeroSteps), "{kind}: {err}");
        }
    }

    #[test]
    fn too_many_steps_is_an_error() {
        for kind in SchedulerKind::ALL {
            let err = build(kind, &SchedulerConfig::default(), 1001)
                .err()
                .expect("1001 steps fails");
            assert!(
                matches!(
                    err,
                    SchedulerError::TooManySteps {
                        steps: 1001,
                        max: 1000
                    }
                ),
                "{kind}: {err}"
            );
        }
        // "leading" with steps_offset 1 reaches timestep 1000 at 1000 steps: DDIM cannot index it,
        // and DPM++'s leading step ratio 1000 // 1001 is 0.
        assert!(build(SchedulerKind::Ddim, &SchedulerConfig::default(), 1000).is_err());
        assert!(build(SchedulerKind::Ddim, &SchedulerConfig::default(), 999).is_ok());
        assert!(build(SchedulerKind::DpmPp2m, &SchedulerConfig::default(), 1000).is_err());
        assert!(build(SchedulerKind::DpmPp2m, &SchedulerConfig::default(), 999).is_ok());
        assert!(build(SchedulerKind::Euler, &SchedulerConfig::default(), 1000).is_ok());
    }

    #[test]
    fn unsupported_settings_are_errors() {
        let cases = [
            SchedulerConfig {
                timestep_spacing: "karras".into(),
                ..Default::default()
            },
            SchedulerConfig {
                prediction_type: "sample".into(),
                ..Default::default()
            },
            SchedulerConfig {
                beta_schedule: "squaredcos_cap_v2".into(),
                ..Default::default()
            },
            SchedulerConfig {
                num_train_timesteps: 1,
                ..Default::default()
            },
        ];
        for config in &cases {
            for kind in SchedulerKind::ALL {
                let err = build(kind, config, 4).err().expect("unsupported setting fails");
                assert!(matches!(err, SchedulerError::Unsupported(_)), "{kind}: {err}");
            }
        }
    }

    #[test]
    fn names_parse_and_print() {
        let names = [
            ("euler", SchedulerKind::Euler),
            ("euler-a", SchedulerKind::EulerAncestral),
            ("euler-ancestral", SchedulerKind::EulerAncestral),
            ("ddim", SchedulerKind::Ddim),
            ("dpm++2m", SchedulerKind::DpmPp2m),
            ("dpmpp-2m", SchedulerKind::DpmPp2m),
            ("dpmpp2m", SchedulerKind::DpmPp2m),
            ("DDIM", SchedulerKind::Ddim),
        ];
        for (name, kind) in names {
            assert_eq!(name.parse::<SchedulerKind>().expect("valid name"), kind);
        }
        for kind in SchedulerKind::ALL {
            assert_eq!(
                kind.to_string()
                    .parse::<SchedulerKind>()
                    .expect("display name parses"),
                kind
            );
        }
        assert_eq!(SchedulerKind::EulerAncestral.to_string(), "euler-a");
        assert_eq!(SchedulerKind::DpmPp2m.to_string(), "dpm++2m");
    }

    #[test]
    fn unknown_name_is_an_error() {
        let err = "heun".parse::<SchedulerKind>().expect_err("unknown name fails");
        assert!(matches!(&err, SchedulerError::UnknownKind(name) if name == "heun"));
        let message = err.to_string();
        for name in ["euler", "euler-a", "ddim", "dpm++2m"] {
            assert!(message.contains(name), "{message}");
        }
    }

    #[test]
    fn config_deserializes_from_sdxl_json() {
        let json = r#"{
            "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0",
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "clip_sample": false, "interpolation_type": "linear", "num_train_timesteps": 1000,
            "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false,
            "skip_prk_steps": true, "steps_offset": 1, "timestep_spacing": "leading",
            "trained_betas": null, "use_karras_sigmas": false
        }"#;
        let config: SchedulerConfig = serde_json::from_str(json).expect("SDXL config parses");
        let default = SchedulerConfig::default();
        assert_eq!(config.num_train_timesteps, default.num_train_timesteps);
        assert_eq!(config.beta_start, default.beta_start);
        assert_eq!(config.beta_end, default.beta_end);
        assert_eq!(config.beta_schedule, default.beta_schedule);
        assert_eq!(config.timestep_spacing, default.timestep_spacing);
        assert_eq!(config.steps_offset, default.steps_offset);
        assert_eq!(config.prediction_type, default.prediction_type);
        assert_eq!(config.use_karras_sigmas, default.use_karras_sigmas);
    }

    #[test]
    #[should_panic(expected = "in order")]
    fn dpm_steps_out_of_order_panic() {
        let mut scheduler = build(SchedulerKind::DpmPp2m, &SchedulerConfig::default(), 4).expect("builds");
        let mut sample = vec![0.5f32; 4];
        let mut noise = Recorded { rows: &[], next: 0 };
        scheduler.step(1, &[0.1; 4], &mut sample, &mut noise);
    }
}
