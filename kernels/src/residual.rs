//! Residual sums: `dst += scale · src` — how ControlNet residuals (each with its own scale) reach
//! the UNet decoder's skip connections (diffusers' MultiControlNet: a sum of scaled residuals).

/// `dst[i] += scale · src[i]`.
pub fn axpy(dst: &mut [f32], src: &[f32], scale: f32) {
    assert_eq!(dst.len(), src.len(), "residual::axpy: length mismatch");
    for (d, &s) in dst.iter_mut().zip(src) {
        *d += scale * s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{rel_err, testutil::random};

    #[test]
    fn sum_of_scaled_residuals() {
        let n = 1000;
        let mut dst = random(n, 1);
        let (a, b) = (random(n, 2), random(n, 3));
        let reference: Vec<f32> = (0..n)
            .map(|i| (dst[i] as f64 + 0.5 * a[i] as f64 - 1.25 * b[i] as f64) as f32)
            .collect();
        axpy(&mut dst, &a, 0.5);
        axpy(&mut dst, &b, -1.25);
        assert!(rel_err(&dst, &reference) < 1e-6);
    }
}
