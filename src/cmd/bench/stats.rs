//! What the benches share: medians of timed runs, seeded values, and the machine's names.
//!
//! ```text
//! timed runs ─▶ median / median_min / upper_median ─▶ ms in the tables and JSON reports
//! seed ─▶ SplitMix ─▶ values whose arithmetic is timed (not their values)
//! /proc/cpuinfo ─▶ cpu_model
//! ```

use std::time::Duration;

/// A duration in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `x` rounded to three decimals.
pub fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// The median: the middle value, or the mean of the two middle ones; NaN when there is none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median and minimum of timed runs, in ms.
pub fn median_min(times: &[Duration]) -> (f64, f64) {
    let v: Vec<f64> = times.iter().map(|&d| ms(d)).collect();
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    (median(v), min)
}

/// Sorts `v` and returns its upper median (the value at index n/2: the median for odd n); NaN
/// when empty.
pub fn upper_median(v: &mut [f64]) -> f64 {
    v.sort_by(|x, y| x.total_cmp(y));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// SplitMix64: seeded values without another dependency (their values do not matter here).
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // uniform in [-0.1, 0.1)
        ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
    }
}

/// The CPU's model name from /proc/cpuinfo (None where there is none).
pub fn cpu_model() -> Option<String> {
    std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_are_median_and_min() {
        let d = |x: u64| Duration::from_millis(x);
        assert_eq!(median_min(&[d(5), d(1), d(3)]), (3.0, 1.0));
        assert_eq!(median_min(&[d(4), d(2)]), (3.0, 2.0));
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        let mut v = vec![4.0, 1.0, 3.0, 2.0];
        assert_eq!(upper_median(&mut v), 3.0);
        assert_eq!(v, vec![1.0, 2.0, 3.0, 4.0]);
        assert!(upper_median(&mut []).is_nan());
    }

    #[test]
    fn random_weights_are_seeded_and_small() {
        let (mut a, mut b) = (SplitMix(7), SplitMix(7));
        let xs: Vec<f32> = (0..1000).map(|_| a.next_f32()).collect();
        assert!(xs.iter().all(|x| (-0.1..0.1).contains(x)));
        assert!(xs.iter().any(|&x| x != xs[0]));
        assert_eq!(xs[999], (0..1000).map(|_| b.next_f32()).last().unwrap());
    }
}
