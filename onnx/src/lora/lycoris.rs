//! LyCORIS adapters (LoHa, LoKr) as exact low-rank layers, so that every merge path (the host
//! merge, the GPU merge kernel, the CUDA-graph weight slot) takes them as it takes a LoRA.
//!
//! ```text
//! LoHa  ΔW = (alpha/r) · (W1a·W1b) ⊙ (W2a·W2b)             W1a [out, r], W1b [r, in] (W2 alike, r2)
//!       = (alpha/r) · B'·A'   B'[o, i·r2+j] = W1a[o,i]·W2a[o,j]   A'[i·r2+j, c] = W1b[i,c]·W2b[j,c]
//! LoKr  ΔW = s · W1 ⊗ W2                                   W1 [a, b] (or W1a·W1b), W2 [c, d] (or W2a·W2b)
//!       = s · (U1 ⊗ U2)·(V1 ⊗ V2)   with W1 = U1·V1 (a full factor: U = W, V = I), W2 = U2·V2
//!       s = alpha / r when a factor is decomposed (r its inner size), else 1
//! ```
//!
//! The scales are LyCORIS's and peft's for LoHa (alpha/r); for LoKr, LyCORIS's (scale 1 when no
//! factor is decomposed, as diffusers' `_bake_lokr_alpha_` reads such files), which peft's
//! alpha/r agrees with where the file's alpha is the rank. A missing `.alpha` means alpha = r.
//! The layer's `rank` is the inner size of B'·A' and its `alpha` is chosen so that
//! `alpha / rank` is the scale above.

use std::collections::BTreeMap;

use super::adapter::LoraLayer;
use super::layout::LySlot;

/// A factor's shape and values.
pub(super) type Factor = (Vec<usize>, Vec<f32>);

/// The low-rank layer equal to the LoHa or LoKr `factors` of a weight of shape `target`
/// (`[out, in]`); `alpha`: the module's `.alpha`. Errors say what is missing or does not fit.
pub(super) fn low_rank(
    factors: &BTreeMap<LySlot, Factor>,
    target: &[usize],
    alpha: Option<f32>,
) -> Result<LoraLayer, String> {
    if target.len() != 2 {
        return Err(format!(
            "LyCORIS factors for a weight of shape {target:?} (only linear layers take them)"
        ));
    }
    let (out, inp) = (target[0], target[1]);
    let get = |s: LySlot| factors.get(&s);
    let hada = [LySlot::HadaW1A, LySlot::HadaW1B, LySlot::HadaW2A, LySlot::HadaW2B];
    if hada.iter().any(|s| factors.contains_key(s)) {
        if factors.keys().any(|s| !hada.contains(s)) {
            return Err("mixes LoHa and LoKr factors".into());
        }
        let [w1a, w1b, w2a, w2b] = hada.map(get);
        let (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) = (w1a, w1b, w2a, w2b) else {
            return Err("a LoHa layer needs hada_w1_a, hada_w1_b, hada_w2_a and hada_w2_b".into());
        };
        return loha(w1a, w1b, w2a, w2b, out, inp, alpha);
    }
    lokr(factors, out, inp, alpha)
}

fn dims2(f: &Factor, what: &str) -> Result<(usize, usize), String> {
    match f.0.as_slice() {
        [a, b] => Ok((*a, *b)),
        s => Err(format!("{what} has shape {s:?}, not 2-D")),
    }
}

fn loha(
    w1a: &Factor,
    w1b: &Factor,
    w2a: &Factor,
    w2b: &Factor,
    out: usize,
    inp: usize,
    alpha: Option<f32>,
) -> Result<LoraLayer, String> {
    let (o1, r) = dims2(w1a, "hada_w1_a")?;
    let (r1, i1) = dims2(w1b, "hada_w1_b")?;
    let (o2, r2) = dims2(w2a, "hada_w2_a")?;
    let (r2b, i2) = dims2(w2b, "hada_w2_b")?;
    if (o1, o2, i1, i2) != (out, out, inp, inp) || r1 != r || r2b != r2 {
        return Err(format!(
            "LoHa factors {:?}·{:?} ⊙ {:?}·{:?} do not make the weight's [{out}, {inp}] \
             (a LoRA for another architecture?)",
            w1a.0, w1b.0, w2a.0, w2b.0
        ));
    }
    let p = r * r2;
    let mut b = vec![0f32; out * p];
    for o in 0..out {
        for i in 0..r {
            for j in 0..r2 {
                b[o * p + i * r2 + j] = w1a.1[o * r + i] * w2a.1[o * r2 + j];
            }
        }
    }
    let mut a = vec![0f32; p * inp];
    for i in 0..r {
        for j in 0..r2 {
            let row = &mut a[(i * r2 + j) * inp..(i * r2 + j + 1) * inp];
            for (c, v) in row.iter_mut().enumerate() {
                *v = w1b.1[i * inp + c] * w2b.1[j * inp + c];
            }
        }
    }
    // scale alpha / r, with r the first pair's inner size (LyCORIS and peft)
    let scale = alpha.unwrap_or(r as f32) / r as f32;
    Ok(LoraLayer {
        a,
        b,
        rank: p,
        alpha: scale * p as f32,
        magnitude: None,
    })
}

/// One Kronecker factor as U·V: a full factor W [m, n] is W·I (inner n), a decomposed one
/// Wa [m, k]·Wb [k, n] (inner k); and whether it was decomposed.
fn kron_factor(
    full: Option<&Factor>,
    fa: Option<&Factor>,
    fb: Option<&Factor>,
    name: &str,
) -> Result<(Factor, Factor, bool), String> {
    match (full, fa, fb) {
        (Some(w), None, None) => {
            let (_, n) = dims2(w, name)?;
            let mut eye = vec![0f32; n * n];
            (0..n).for_each(|i| eye[i * n + i] = 1.0);
            Ok((w.clone(), (vec![n, n], eye), false))
        }
        (None, Some(a), Some(b)) => {
            let (_, k) = dims2(a, &format!("{name}_a"))?;
            let (k2, _) = dims2(b, &format!("{name}_b"))?;
            if k != k2 {
                return Err(format!("{name}_a {:?} and {name}_b {:?} do not chain", a.0, b.0));
            }
            Ok((a.clone(), b.clone(), true))
        }
        _ => Err(format!("a LoKr layer needs {name}, or {name}_a and {name}_b")),
    }
}

/// `x ⊗ y` of row-major matrices x [m, n], y [p, q] → [m·p, n·q].
fn kron(x: &Factor, y: &Factor) -> Factor {
    let ((m, n), (p, q)) = ((x.0[0], x.0[1]), (y.0[0], y.0[1]));
    let mut out = vec![0f32; m * p * n * q];
    let cols = n * q;
    for i in 0..m {
        for j in 0..n {
            let xv = x.1[i * n + j];
            for k in 0..p {
                let row = (i * p + k) * cols + j * q;
                for l in 0..q {
                    out[row + l] = xv * y.1[k * q + l];
                }
            }
        }
    }
    (vec![m * p, n * q], out)
}

fn lokr(
    factors: &BTreeMap<LySlot, Factor>,
    out: usize,
    inp: usize,
    alpha: Option<f32>,
) -> Result<LoraLayer, String> {
    let get = |s: LySlot| factors.get(&s);
    let (u1, v1, d1) = kron_factor(
        get(LySlot::LokrW1),
        get(LySlot::LokrW1A),
        get(LySlot::LokrW1B),
        "lokr_w1",
    )?;
    let (u2, v2, d2) = kron_factor(
        get(LySlot::LokrW2),
        get(LySlot::LokrW2A),
        get(LySlot::LokrW2B),
        "lokr_w2",
    )?;
    let (a1, b1) = (u1.0[0], v1.0[1]);
    let (c2, d2n) = (u2.0[0], v2.0[1]);
    if a1 * c2 != out || b1 * d2n != inp {
        return Err(format!(
            "LoKr factors [{a1}, {b1}] ⊗ [{c2}, {d2n}] do not make the weight's [{out}, {inp}] \
             (a LoRA for another architecture?)"
        ));
    }
    // the decomposed factors' inner size is the rank (LyCORIS gives both the same)
    let r = [(d1, v1.0[0]), (d2, v2.0[0])]
        .iter()
        .filter(|(d, _)| *d)
        .map(|(_, k)| *k)
        .next();
    let scale = match r {
        Some(r) => alpha.unwrap_or(r as f32) / r as f32,
        None => 1.0,
    };
    let (b, a) = (kron(&u1, &u2), kron(&v1, &v2));
    let p = b.0[1];
    Ok(LoraLayer {
        a: a.1,
        b: b.1,
        rank: p,
        alpha: scale * p as f32,
        magnitude: None,
    })
}

#[cfg(test)]
mod tests {
    use safetensors::SafeTensors;

    use super::*;
    use crate::dtype::to_f32;

    /// ΔW = (alpha/rank)·B·A in f64.
    fn delta(l: &LoraLayer, out: usize, inp: usize) -> Vec<f64> {
        let s = l.alpha as f64 / l.rank as f64;
        let mut d = vec![0f64; out * inp];
        for o in 0..out {
            for k in 0..l.rank {
                let b = l.b[o * l.rank + k] as f64;
                for c in 0..inp {
                    d[o * inp + c] += s * b * l.a[k * inp + c] as f64;
                }
            }
        }
        d
    }

    /// Every ΔW that peft computes (`get_delta_weight`, f64) for layers of the committed LoHa and
    /// LoKr files (tools/make_lycoris_fixtures.py) equals the low-rank layer made from the file's
    /// factors.
    #[test]
    fn loha_and_lokr_layers_equal_peft_s_delta_weights() {
        let refs = std::fs::read("../tests/data/lycoris/delta.safetensors").unwrap();
        let refs = SafeTensors::deserialize(&refs).unwrap();
        let mut checked = 0;
        for kind in ["loha", "lokr"] {
            let bytes = std::fs::read(format!("../tests/data/lycoris/{kind}.safetensors")).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, want) in refs.tensors() {
                let Some(prefix) = name.strip_prefix(&format!("{kind}.")) else {
                    continue;
                };
                let mut factors = BTreeMap::new();
                let mut alpha = None;
                for (key, t) in st.tensors() {
                    let Some(rest) = key.strip_prefix(prefix) else {
                        continue;
                    };
                    let data = to_f32(t.dtype(), t.data()).unwrap();
                    if rest == ".alpha" {
                        alpha = Some(data[0]);
                    } else if let Some((_, s)) =
                        super::super::layout::LY_SUFFIXES.iter().find(|(s, _)| *s == rest)
                    {
                        factors.insert(*s, (t.shape().to_vec(), data));
                    }
                }
                let (out, inp) = (want.shape()[0], want.shape()[1]);
                let layer = low_rank(&factors, &[out, inp], alpha).unwrap();
                let got = delta(&layer, out, inp);
                let want: Vec<f64> = want
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0.0, f64::max);
                let scale = want.iter().map(|w| w.abs()).fold(0.0, f64::max);
                assert!(
                    err <= 1e-6 * scale.max(1e-12),
                    "{name}: max |ΔW - peft's| {err:.2e} (max |ΔW| {scale:.2e})"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 5);
    }

    #[test]
    fn factors_that_do_not_make_the_weight_are_refused() {
        let f = |r: usize, c: usize| (vec![r, c], vec![0.5f32; r * c]);
        let mut loha = BTreeMap::new();
        loha.insert(LySlot::HadaW1A, f(4, 2));
        loha.insert(LySlot::HadaW1B, f(2, 6));
        loha.insert(LySlot::HadaW2A, f(4, 2));
        assert!(low_rank(&loha, &[4, 6], None)
            .unwrap_err()
            .contains("needs hada_w1_a"));
        loha.insert(LySlot::HadaW2B, f(2, 6));
        assert!(low_rank(&loha, &[4, 6], None).is_ok());
        assert!(low_rank(&loha, &[4, 7], None)
            .unwrap_err()
            .contains("do not make"));
        let mut lokr = BTreeMap::new();
        lokr.insert(LySlot::LokrW1, f(2, 2));
        lokr.insert(LySlot::LokrW2A, f(2, 1));
        assert!(low_rank(&lokr, &[4, 4], None).unwrap_err().contains("lokr_w2"));
        lokr.insert(LySlot::LokrW2B, f(1, 2));
        let l = low_rank(&lokr, &[4, 4], Some(2.0)).unwrap();
        // a decomposed factor of inner size 1: scale alpha / 1
        assert_eq!(l.alpha / l.rank as f32, 2.0);
        assert!(low_rank(&lokr, &[4, 5], None)
            .unwrap_err()
            .contains("do not make"));
    }
}
