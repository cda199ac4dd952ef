//! Numeric kernels of the katz pipeline, each on host memory (the CPU twin) and on a GPU (the
//! CUDA twin).
//!
//! ```text
//!   UNet (cond, uncond) ──▶ guidance::combine ──▶ scheduler step
//!   ControlNet residuals ──▶ residual::axpy (Σ scaleᵢ·residualᵢ) ──▶ UNet decoder skips
//!   LoRA (Aᵢ, Bᵢ, sᵢ, αᵢ/rᵢ) ──▶ lora::merge (W' = W + Σ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ) ──▶ bound weights
//! ```
//!
//! # Layout
//!
//! ```text
//! guidance     CPU: classifier-free guidance, out = uncond + g·(cond − uncond)
//! residual     CPU: dst += scale·src (ControlNet residual sums)
//! lora         CPU: the LoRA merge, blocked over output rows on rayon's pool
//! cuda/        the CUDA twins and their launches:
//!   kernels.cu   CUDA C of every kernel: combine, axpy, scale, euler, lora_merge_{naive,tiled,
//!                mma}_{f32,f16} (all layers of a LoRA set in one launch)
//!   mod.rs       GpuKernels::new(ordinal): probes libcuda, compiles kernels.cu with NVRTC once
//!                (compute_80 PTX where the GPU has tensor cores), loads each kernel by name;
//!                typed launch methods (combine, axpy, scale, euler, lora_merge_with) and raw-
//!                address ones for ONNX Runtime's buffers; fork() shares the module on a new
//!                stream; device_count, cuda_available, enable_peer_access
//!   tests.rs     each CUDA twin against its CPU twin or an f64 reference (GPU tests #[ignore]d)
//! ipc          CUDA IPC buffers and events shared between processes of one host (the
//!              ControlNet worker's transport)
//! ```
//!
//! Each CPU kernel is small, allocation-free on its hot path and tested against a float64
//! reference by relative error on fresh random inputs; each CUDA kernel against its CPU twin or
//! an f64 reference. cudarc loads libcuda and libnvrtc at run time, so the crate builds and its CPU kernels
//! run where there is no CUDA; there, `GpuKernels::new` is an error, never a CPU fall-back.

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

    /// `n` fp16 bit patterns of `k · u + off`, u uniform in [-1, 1).
    pub fn half_values(n: usize, seed: u64, k: f64, off: f64) -> Vec<u16> {
        random(n, seed)
            .iter()
            .map(|v| half::f16::from_f64(*v as f64 * k + off).to_bits())
            .collect()
    }

    /// The five fp16 inputs of a layer norm test, `rows` rows of `w` from seeds `seed..seed + 5`:
    /// (x, skip, bias, gamma, beta).
    pub type NormInputs = (Vec<u16>, Vec<u16>, Vec<u16>, Vec<u16>, Vec<u16>);
    pub fn norm_inputs(rows: usize, w: usize, seed: u64) -> NormInputs {
        (
            half_values(rows * w, seed, 3.0, 0.5),
            half_values(rows * w, seed + 1, 2.0, 0.0),
            half_values(w, seed + 2, 1.0, 0.0),
            half_values(w, seed + 3, 0.5, 1.0),
            half_values(w, seed + 4, 0.2, 0.0),
        )
    }

    /// A layer norm as ONNX Runtime's SkipLayerNormalization computes it, in f64 where it computes
    /// in f32: per row of `w` fp16 values, sum = fp16(fp16(x + bias) + skip) (each optional), then
    /// fp16(LN(sum)·γ + β) with epsilon 1e-5. Returns (sum, normed) as fp16 bit patterns.
    pub fn layer_norm_ref(
        x: &[u16],
        skip: Option<&[u16]>,
        bias: Option<&[u16]>,
        gamma: &[u16],
        beta: &[u16],
        w: usize,
    ) -> (Vec<u16>, Vec<u16>) {
        let h16 = half::f16::from_f64;
        let f = |b: u16| half::f16::from_bits(b).to_f64();
        let rows = x.len() / w;
        let (mut sum, mut normed) = (vec![0u16; rows * w], vec![0u16; rows * w]);
        for r in 0..rows {
            let row: Vec<f64> = (0..w)
                .map(|c| {
                    let mut v = f(x[r * w + c]);
                    if let Some(b) = bias {
                        v = h16(v + f(b[c])).to_f64();
                    }
                    if let Some(s) = skip {
                        v = h16(v + f(s[r * w + c])).to_f64();
                    }
                    v
                })
                .collect();
            let mean = row.iter().sum::<f64>() / w as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / w as f64;
            let rstd = 1.0 / (var + 1e-5).sqrt();
            for c in 0..w {
                sum[r * w + c] = h16(row[c]).to_bits();
                normed[r * w + c] = h16((row[c] - mean) * rstd * f(gamma[c]) + f(beta[c])).to_bits();
            }
        }
        (sum, normed)
    }
}
