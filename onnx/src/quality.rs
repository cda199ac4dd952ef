//! Image quality metrics for comparing generated images: a relative L2 difference and SSIM.

use crate::tensor::Tensor;
use crate::{Error, Result};

/// `‖a − b‖₂ / ‖b‖₂`, accumulated in f64; `‖a − b‖₂` where `b` is all zeros.
///
/// # Panics
/// If `a` and `b` differ in length.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_diff: lengths differ");
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let d = x as f64 - y as f64;
        diff += d * d;
        norm += (y as f64) * (y as f64);
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

const SSIM_WINDOW: usize = 11;
const SSIM_SIGMA: f64 = 1.5;
const SSIM_K1: f64 = 0.01;
const SSIM_K2: f64 = 0.03;
/// Images are in [0, 1].
const SSIM_RANGE: f64 = 1.0;

/// Structural similarity (Wang et al. 2004) of two images `[N, C, H, W]` in [0, 1] (`[1, 3, H, W]`
/// as the pipeline makes them): an 11×11 Gaussian window (σ = 1.5), K1 = 0.01, K2 = 0.03, data range
/// 1, population (co)variances, over the valid windows of each channel (no padding), averaged over
/// channels. This is skimage's `structural_similarity(gaussian_weights=True, sigma=1.5,
/// use_sample_covariance=False, data_range=1)` per channel, averaged. An image smaller than the
/// window gets the largest odd window that fits (same σ, the Gaussian cut there and renormalized).
pub fn ssim(a: &Tensor, b: &Tensor) -> Result<f64> {
    let bad = |m: String| Err(Error::InvalidRequest(format!("ssim: {m}")));
    if a.shape != b.shape {
        return bad(format!("shapes differ: {:?} and {:?}", a.shape, b.shape));
    }
    let [n, c, h, w] = match a.shape[..] {
        [n, c, h, w] => [n, c, h, w],
        _ => return bad(format!("images are [N, C, H, W], not {:?}", a.shape)),
    };
    let numel = n
        .checked_mul(c)
        .and_then(|x| x.checked_mul(h))
        .and_then(|x| x.checked_mul(w));
    if numel != Some(a.data.len()) || numel != Some(b.data.len()) {
        return bad(format!(
            "data of {} and {} values does not fit shape {:?}",
            a.data.len(),
            b.data.len(),
            a.shape
        ));
    }
    if n * c == 0 || h == 0 || w == 0 {
        return bad(format!("empty image {:?}", a.shape));
    }
    let mut win = SSIM_WINDOW.min(h).min(w);
    if win % 2 == 0 {
        win -= 1;
    }
    let kernel = gaussian(win, SSIM_SIGMA);
    let plane = h * w;
    let total: f64 = (0..n * c)
        .map(|p| {
            let r = p * plane..(p + 1) * plane;
            ssim_plane(&a.data[r.clone()], &b.data[r], h, w, &kernel)
        })
        .sum();
    Ok(total / (n * c) as f64)
}

/// A normalized 1-D Gaussian of `len` (odd) taps.
fn gaussian(len: usize, sigma: f64) -> Vec<f64> {
    let r = (len / 2) as f64;
    let k: Vec<f64> = (0..len)
        .map(|i| {
            let x = i as f64 - r;
            (-0.5 * x * x / (sigma * sigma)).exp()
        })
        .collect();
    let s: f64 = k.iter().sum();
    k.into_iter().map(|v| v / s).collect()
}

/// Mean SSIM of one `h × w` plane over the valid positions of the separable window `k`.
fn ssim_plane(x: &[f32], y: &[f32], h: usize, w: usize, k: &[f64]) -> f64 {
    let win = k.len();
    let (oh, ow) = (h - win + 1, w - win + 1);
    // The five moments, filtered along rows: [h, ow] each.
    let mut rows = vec![[0.0f64; 5]; h * ow];
    for i in 0..h {
        for j in 0..ow {
            let mut m = [0.0f64; 5];
            for (t, &kt) in k.iter().enumerate() {
                let (u, v) = (x[i * w + j + t] as f64, y[i * w + j + t] as f64);
                m[0] += kt * u;
                m[1] += kt * v;
                m[2] += kt * u * u;
                m[3] += kt * v * v;
                m[4] += kt * u * v;
            }
            rows[i * ow + j] = m;
        }
    }
    let c1 = (SSIM_K1 * SSIM_RANGE).powi(2);
    let c2 = (SSIM_K2 * SSIM_RANGE).powi(2);
    let mut sum = 0.0;
    for i in 0..oh {
        for j in 0..ow {
            let mut m = [0.0f64; 5];
            for (t, &kt) in k.iter().enumerate() {
                let r = &rows[(i + t) * ow + j];
                for (acc, v) in m.iter_mut().zip(r) {
                    *acc += kt * v;
                }
            }
            let [ux, uy, uxx, uyy, uxy] = m;
            let (vx, vy, vxy) = (uxx - ux * ux, uyy - uy * uy, uxy - ux * uy);
            sum += ((2.0 * ux * uy + c1) * (2.0 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2));
        }
    }
    sum / (oh * ow) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference pair: a gradient per channel, and it plus a fixed sine pattern.
    fn pair(h: usize, w: usize) -> (Tensor, Tensor) {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for c in 0..3 {
            for i in 0..h {
                for j in 0..w {
                    let g = (i + 2 * j + 5 * c) as f64 / (h + 2 * w + 15) as f64;
                    let s = 0.1 * (0.7 * i as f64 + 1.3 * j as f64 + c as f64).sin();
                    x.push(g as f32);
                    y.push((g + s) as f32);
                }
            }
        }
        (Tensor::new(vec![1, 3, h, w], x), Tensor::new(vec![1, 3, h, w], y))
    }

    /// Deterministic noise in [-1, 1).
    fn noise(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn rel_diff_is_relative_l2() {
        assert_eq!(rel_diff(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel_diff(&[3.0, 4.0], &[0.0, 0.0]) - 5.0).abs() < 1e-12);
        assert!((rel_diff(&[1.0, 1.0], &[3.0, 4.0]) - (13.0f64).sqrt() / 5.0).abs() < 1e-12);
        assert_eq!(rel_diff(&[], &[]), 0.0);
    }

    #[test]
    fn ssim_of_an_image_with_itself_is_one() {
        let (x, y) = pair(16, 16);
        assert!((ssim(&x, &x).unwrap() - 1.0).abs() < 1e-12);
        assert!((ssim(&y, &y).unwrap() - 1.0).abs() < 1e-12);
        let (x, _) = pair(5, 8);
        assert!((ssim(&x, &x).unwrap() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn ssim_falls_with_noise() {
        let (x, _) = pair(24, 20);
        let n = noise(x.len(), 7);
        let mut last = 1.0;
        for amp in [0.01f32, 0.05, 0.1, 0.3] {
            let data = x
                .data
                .iter()
                .zip(&n)
                .map(|(v, e)| (v + amp * e).clamp(0.0, 1.0))
                .collect();
            let s = ssim(&Tensor::new(x.shape.clone(), data), &x).unwrap();
            assert!(s < last, "noise {amp}: ssim {s} is not below {last}");
            last = s;
        }
        assert!(last < 0.5, "{last}");
    }

    /// Values from an independent numpy computation (reflect-padded Gaussian filtering of the
    /// whole image, as skimage does, then cropped by the window's radius).
    #[test]
    fn ssim_matches_numpy_reference() {
        for (h, w, expected) in [
            (16, 16, 0.5662513515297434),
            (16, 12, 0.6307758680626446),
            // Smaller than the window: a 7×7 Gaussian (σ = 1.5).
            (8, 9, 0.6991389115023726),
        ] {
            let (x, y) = pair(h, w);
            let s = ssim(&x, &y).unwrap();
            assert!((s - expected).abs() < 1e-6, "{h}×{w}: {s} vs {expected}");
            // Symmetric.
            assert!((ssim(&y, &x).unwrap() - s).abs() < 1e-12);
        }
    }

    #[test]
    fn ssim_refuses_bad_shapes() {
        let (x, _) = pair(16, 16);
        let (z, _) = pair(16, 12);
        for (a, b) in [
            (&x, &z),
            (
                &Tensor::new(vec![3, 16, 16], x.data.clone()),
                &Tensor::new(vec![3, 16, 16], x.data.clone()),
            ),
            (&Tensor::zeros(vec![1, 3, 0, 4]), &Tensor::zeros(vec![1, 3, 0, 4])),
        ] {
            let e = ssim(a, b).unwrap_err();
            assert!(matches!(e, Error::InvalidRequest(_)), "{e:?}");
        }
        let broken = Tensor {
            shape: vec![1, 3, 16, 16],
            data: vec![0.0; 10],
        };
        assert!(matches!(ssim(&broken, &x), Err(Error::InvalidRequest(_))));
        assert!(matches!(ssim(&broken, &broken), Err(Error::InvalidRequest(_))));
    }
}
