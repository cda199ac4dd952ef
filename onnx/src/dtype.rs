//! Element types of safetensors data: [`to_f32`] reads f32, f16 and bf16 tensors (a bundle's
//! weights, a LoRA's factors) as f32.
//!
//! ```text
//! safetensors bytes (f32 | f16 | bf16, little-endian) ─▶ to_f32 ─▶ Vec<f32>
//! ```

use safetensors::Dtype;

/// Converts a safetensors tensor to f32 (f32, f16 and bf16 are read). fp16 and bf16 go through
/// `half`'s slice conversion (F16C SIMD where the CPU has it): a per-element conversion ran at
/// ~5 ns per value, 0.8 s for a rank-64 SDXL LoRA (H200 host, docs/measurements.md).
pub(crate) fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
    match dtype {
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 | Dtype::BF16 => {
            let mut out = vec![0f32; bytes.len() / 2];
            // SAFETY: any bit pattern is a valid u16; `align_to` only yields the aligned middle
            let (pre, mid, post) = unsafe { bytes.align_to::<u16>() };
            let owned: Vec<u16>;
            let bits: &[u16] = if pre.is_empty() && post.is_empty() && cfg!(target_endian = "little") {
                mid
            } else {
                owned = bytes
                    .chunks_exact(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .collect();
                &owned
            };
            if dtype == Dtype::F16 {
                bits.reinterpret_cast::<half::f16>()
                    .convert_to_f32_slice(&mut out);
            } else {
                bits.reinterpret_cast::<half::bf16>()
                    .convert_to_f32_slice(&mut out);
            }
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_and_bfloat_convert_exactly() {
        let vals = [0.0f32, -1.5, 3.140625, 65504.0, 1e-4, -0.0];
        let f16: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        let want: Vec<f32> = vals.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        assert_eq!(to_f32(Dtype::F16, &f16).unwrap(), want);
        let bf: Vec<u8> = vals
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        let want: Vec<f32> = vals.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        assert_eq!(to_f32(Dtype::BF16, &bf).unwrap(), want);
        let f32b: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(to_f32(Dtype::F32, &f32b).unwrap(), vals);
    }

    #[test]
    #[ignore = "a timing, not a check: cargo test --release -p katz-onnx -- --ignored --nocapture to_f32"]
    fn to_f32_speed() {
        let n = 50_000_000;
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| half::f16::from_f32((i % 977) as f32 * 0.01).to_le_bytes())
            .collect();
        let t0 = std::time::Instant::now();
        let a = to_f32(Dtype::F16, &bytes).unwrap();
        let slice = t0.elapsed();
        let t0 = std::time::Instant::now();
        let b: Vec<f32> = bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect();
        let scalar = t0.elapsed();
        assert_eq!(a, b);
        eprintln!("{n} fp16 values: slice conversion {slice:?}, per element {scalar:?}");
    }
}
