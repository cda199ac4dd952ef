//! How a job's LoRAs reach the UNet's weights: merged before step 0, or while the job denoises
//! and switched in by a bound step (Katz's bounded asynchronous LoRA loading).
//!
//! ```text
//! step:     0   1   2   …   r   …   K   …   n-1
//! weights:  W   W   W   W   W'  W'  W'  W'  W'      (ready at r ≤ K: switch at r, no wait)
//!           W   W   …   W  [wait] W'  W'  …  W'     (not ready at K: wait, timings.lora_wait)
//! ```

use std::time::Duration;

use crate::error::ParseError;
use crate::lora::PendingMerge;

/// When a job's LoRAs are merged: before step 0, or while the job denoises.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraMode {
    Sync,
    Async,
}

impl std::str::FromStr for LoraMode {
    type Err = ParseError;
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        match s {
            "sync" => Ok(LoraMode::Sync),
            "async" => Ok(LoraMode::Async),
            _ => Err(ParseError(format!(
                "LoRA mode must be `sync` or `async`, got `{s}`"
            ))),
        }
    }
}

impl std::fmt::Display for LoraMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LoraMode::Sync => "sync",
            LoraMode::Async => "async",
        })
    }
}

/// The step by which an asynchronous merge must be in: a step count (`10`) or a fraction of the
/// job's steps (`0.2`, `20%`). Katz profiled 10 of 50 steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoraBound {
    Steps(usize),
    Fraction(f32),
}

impl LoraBound {
    /// The bound step of a job of `steps` steps (at most its last step, so a LoRA always acts).
    pub fn step_for(&self, steps: usize) -> usize {
        let k = match *self {
            LoraBound::Steps(k) => k,
            LoraBound::Fraction(f) => (f as f64 * steps as f64).round() as usize,
        };
        k.min(steps.saturating_sub(1))
    }
}

impl std::str::FromStr for LoraBound {
    type Err = ParseError;
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        let bad = || {
            ParseError(format!(
                "LoRA bound must be a step count (10), a fraction (0.2) or a percentage (20%), got `{s}`"
            ))
        };
        if let Some(p) = s.strip_suffix('%') {
            let v: f32 = p.trim().parse().map_err(|_| bad())?;
            return if (0.0..=100.0).contains(&v) {
                Ok(LoraBound::Fraction(v / 100.0))
            } else {
                Err(bad())
            };
        }
        if s.contains('.') {
            let v: f32 = s.parse().map_err(|_| bad())?;
            return if (0.0..=1.0).contains(&v) {
                Ok(LoraBound::Fraction(v))
            } else {
                Err(bad())
            };
        }
        s.parse().map(LoraBound::Steps).map_err(|_| bad())
    }
}

impl std::fmt::Display for LoraBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LoraBound::Steps(k) => write!(f, "{k}"),
            LoraBound::Fraction(v) => write!(f, "{}%", v * 100.0),
        }
    }
}

/// How a job's LoRAs reach the UNet's weights.
#[derive(Default)]
pub enum LoraPlan<'a> {
    /// The request's loaded LoRAs (`ValidRequest::loaded_loras`) merged before step 0.
    #[default]
    Sync,
    /// Merged elsewhere while the job denoises with the pristine weights; switched in at the first
    /// step boundary where it is ready, waited for (at most `timeout`) before step `bound`.
    /// The request's LoRAs are not read.
    Async {
        pending: &'a mut PendingMerge,
        bound: usize,
        timeout: Duration,
        /// Switch at the first boundary where the merge is ready (lower latency of the LoRA's
        /// effect, but the image depends on timing); `false`: always exactly at `bound`, so the
        /// same job gives the same image whatever the load.
        early: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_parse_and_clamp() {
        assert_eq!("10".parse::<LoraBound>().unwrap().step_for(50), 10);
        assert_eq!("0.2".parse::<LoraBound>().unwrap().step_for(50), 10);
        assert_eq!("20%".parse::<LoraBound>().unwrap().step_for(20), 4);
        assert_eq!("10".parse::<LoraBound>().unwrap().step_for(4), 3);
        assert_eq!("0".parse::<LoraBound>().unwrap().step_for(4), 0);
        assert!("1.5".parse::<LoraBound>().is_err());
        assert!("x".parse::<LoraBound>().is_err());
        assert!("sync".parse::<LoraMode>().is_ok() && "later".parse::<LoraMode>().is_err());
    }
}
