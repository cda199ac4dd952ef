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
    /// `(σᵢ, σᵢ₊₁)` when step `i` is a plain Euler step on an ε-prediction (`x += ε·(σᵢ₊₁ − σᵢ)`),
    /// which the GPU pipeline runs as a device kernel; `None`: the step runs here, on the host.
    fn euler_sigmas(&self, _i: usize) -> Option<(f32, f32)> {
        None
    }
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
#[path = "tests.rs"]
mod tests;
