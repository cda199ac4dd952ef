//! LoRA merge on the CPU: `W' = W + Σᵢ cᵢ · Bᵢ · Aᵢ` with `cᵢ = sᵢ · αᵢ / rᵢ`.
//!
//! `W` is `[out, in]` row-major (PyTorch's `nn.Linear.weight` layout), `Bᵢ` is `[out, rᵢ]`,
//! `Aᵢ` is `[rᵢ, in]`. The products are summed (not the factors: summing the A and B matrices of
//! several LoRAs before multiplying, as the Katz artifact does, is a different and wrong merge).
//!
//! The kernel is blocked over output rows and runs the blocks on rayon's pool; within a row it
//! streams `Aᵢ` rows so the inner loop is a contiguous axpy the compiler vectorises.

use rayon::prelude::*;

/// One low-rank factor pair of a LoRA for one weight.
#[derive(Debug, Clone, Copy)]
pub struct Factor<'a> {
    /// `[out, rank]` row-major.
    pub b: &'a [f32],
    /// `[rank, in]` row-major.
    pub a: &'a [f32],
    pub rank: usize,
    /// `scale · alpha / rank`.
    pub coeff: f32,
}

/// Rows of `W` handled by one task.
const ROW_BLOCK: usize = 16;

/// Writes `base + Σ coeffᵢ · Bᵢ · Aᵢ` into `out` (`[rows, cols]`); `base` stays untouched.
pub fn merge_into(base: &[f32], rows: usize, cols: usize, factors: &[Factor<'_>], out: &mut [f32]) {
    assert_eq!(base.len(), rows * cols, "lora::merge_into: base shape");
    assert_eq!(out.len(), rows * cols, "lora::merge_into: out shape");
    for f in factors {
        assert_eq!(f.b.len(), rows * f.rank, "lora::merge_into: B shape");
        assert_eq!(f.a.len(), f.rank * cols, "lora::merge_into: A shape");
    }
    out.par_chunks_mut(ROW_BLOCK * cols)
        .enumerate()
        .for_each(|(blk, out_rows)| {
            let row0 = blk * ROW_BLOCK;
            out_rows.copy_from_slice(&base[row0 * cols..row0 * cols + out_rows.len()]);
            for (i, out_row) in out_rows.chunks_mut(cols).enumerate() {
                let row = row0 + i;
                for f in factors {
                    let b_row = &f.b[row * f.rank..(row + 1) * f.rank];
                    for (k, &bk) in b_row.iter().enumerate() {
                        let c = f.coeff * bk;
                        let a_row = &f.a[k * cols..(k + 1) * cols];
                        for (o, &a) in out_row.iter_mut().zip(a_row) {
                            *o += c * a;
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{rel_err, testutil::random};

    fn reference(base: &[f32], rows: usize, cols: usize, factors: &[Factor<'_>]) -> Vec<f32> {
        let mut out: Vec<f64> = base.iter().map(|&x| x as f64).collect();
        for f in factors {
            for r in 0..rows {
                for c in 0..cols {
                    let mut acc = 0f64;
                    for k in 0..f.rank {
                        acc += f.b[r * f.rank + k] as f64 * f.a[k * cols + c] as f64;
                    }
                    out[r * cols + c] += f.coeff as f64 * acc;
                }
            }
        }
        out.into_iter().map(|x| x as f32).collect()
    }

    #[test]
    fn two_loras_match_f64_reference() {
        let (rows, cols) = (67, 45); // not multiples of the block
        let base = random(rows * cols, 1);
        let (b1, a1) = (random(rows * 4, 2), random(4 * cols, 3));
        let (b2, a2) = (random(rows * 8, 4), random(8 * cols, 5));
        let factors = [
            Factor {
                b: &b1,
                a: &a1,
                rank: 4,
                coeff: 0.8 * 8.0 / 4.0,
            },
            Factor {
                b: &b2,
                a: &a2,
                rank: 8,
                coeff: -0.5,
            },
        ];
        let mut out = vec![0f32; rows * cols];
        merge_into(&base, rows, cols, &factors, &mut out);
        let want = reference(&base, rows, cols, &factors);
        let err = rel_err(&out, &want);
        assert!(err < 1e-6, "relative error {err}");
        // the merge changed W, and it did not touch the pristine weights
        assert!(rel_err(&out, &base) > 1e-2);
        assert_eq!(base, random(rows * cols, 1));
    }
}
