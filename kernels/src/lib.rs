//! Numeric kernels of the katz pipeline, on host memory.
//!
//! ```text
//!   UNet (cond, uncond) ──▶ guidance::combine ──▶ scheduler step
//!   ControlNet residuals ──▶ residual::axpy (Σ scaleᵢ·residualᵢ) ──▶ UNet decoder skips
//!   LoRA (Aᵢ, Bᵢ, sᵢ, αᵢ/rᵢ) ──▶ lora::merge (W' = W + Σ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ) ──▶ bound weights
//! ```
//!
//! Each kernel is small, allocation-free on its hot path and tested against a float64 reference
//! by relative error on fresh random inputs. The CUDA twins of these kernels (cudarc + NVRTC)
//! arrive with the GPU path and are tested against these.

pub mod cuda;
pub mod guidance;
pub mod ipc;
pub mod lora;
pub mod residual;

/// Relative error ‖a − b‖₂ / ‖b‖₂ (b is the reference), computed in f64.
pub fn rel_err(a: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(a.len(), reference.len(), "rel_err: length mismatch");
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &r) in a.iter().zip(reference) {
        let d = x as f64 - r as f64;
        num += d * d;
        den += (r as f64) * (r as f64);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

#[cfg(test)]
pub(crate) mod testutil {
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Uniform values in [-1, 1): never zeros, never a constant.
    pub fn random(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }
}
