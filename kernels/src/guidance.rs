//! Classifier-free guidance: `out = uncond + g · (cond − uncond)` (diffusers' order of terms).

/// Combines the two halves of a batch-2 noise prediction laid out `[uncond; cond]`.
///
/// `pred` holds both halves back to back; `out` receives one half.
pub fn combine(pred: &[f32], guidance: f32, out: &mut [f32]) {
    let n = out.len();
    assert_eq!(
        pred.len(),
        2 * n,
        "guidance::combine: prediction must hold two halves"
    );
    let (uncond, cond) = pred.split_at(n);
    for ((o, &u), &c) in out.iter_mut().zip(uncond).zip(cond) {
        *o = u + guidance * (c - u);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{rel_err, testutil::random};

    #[test]
    fn matches_f64_reference() {
        let n = 4 * 16 * 16;
        let pred = random(2 * n, 1);
        let g = 7.5f32;
        let mut out = vec![0f32; n];
        combine(&pred, g, &mut out);
        let reference: Vec<f32> = (0..n)
            .map(|i| {
                let (u, c) = (pred[i] as f64, pred[n + i] as f64);
                (u + g as f64 * (c - u)) as f32
            })
            .collect();
        assert!(rel_err(&out, &reference) < 1e-6);
    }
}
