//! Merging LoRAs into a bundle's weights: `W + Σ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ` for every layer a job's
//! LoRAs touch, written into a fresh [`MergedWeights`] set (the pristine set never changes).
//! A convolution weight `[out, in, kh, kw]` is merged as the matrix `[out, in·kh·kw]` it is in
//! memory, with its factors flattened the same way (`LoraLayer`), on the host and on the GPU.
//!
//! ```text
//! host: [(LoraAdapter, scale)] ─▶ Weights::merge ─ katz_kernels::lora::merge_into per layer ─▶ MergedWeights (host)
//! GPU:  LoraAdapter ─upload_factors (once; the LoraManager caches them)─▶ DeviceFactors
//!       (f32 factors; with tensor cores also the fp16 layers' factors packed, pack_factors_f16)
//!       [(LoraAdapter, DeviceFactors, scale)] ─▶ Weights::merge_on_device ─ one launch per
//!       weight type (fp16: lora_merge_f16, the packed kernel on tensor cores; f32: lora_merge)
//!       ─▶ MergedWeights (device)
//! ```
//!
//! These are methods of [`Weights`] (whose buffers they read), written here beside the rest of
//! the LoRA code: `weights.rs` knows nothing of LoRAs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::CudaSlice;
use katz_kernels::cuda::{GpuFactor, GpuMergeLayer, PackedFactor};
use katz_kernels::lora::{merge_into, Factor};

use super::adapter::{LoraAdapter, LoraLayer};
use crate::device::gpu_err;
use crate::weights::{make_value, DevBuf, DeviceWeights, MergedWeights, Weights};
use crate::{Error, Result};

/// One LoRA's factors in device memory (f32), by weight name: `(B, A)`; and, for the fp16
/// weights of a GPU with tensor cores, the same factors packed once for the packed fp16 merge.
pub struct DeviceFactors {
    layers: HashMap<String, (CudaSlice<f32>, CudaSlice<f32>)>,
    packed: HashMap<String, PackedFactor>,
    bytes: usize,
}

impl Drop for DeviceFactors {
    fn drop(&mut self) {
        // freed beside a CUDA-graph capture, not during one (crate::device::beside_capture)
        let _gpu = crate::device::beside_capture();
        self.layers.clear();
        self.packed.clear();
    }
}

impl DeviceFactors {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The coefficient of a layer's `B·A` at LoRA scale `scale`: `s·α/r`.
fn coeff(layer: &LoraLayer, scale: f32) -> f32 {
    scale * layer.alpha / layer.rank as f32
}

impl Weights {
    /// Merges LoRAs (each with its scale) into a new set of the touched weights (on the GPU
    /// when the weights are there, uploading the factors first).
    pub fn merge(&self, loras: &[(Arc<LoraAdapter>, f32)]) -> Result<MergedWeights> {
        if self.device().is_some() {
            let mut with = Vec::new();
            for (l, s) in loras {
                with.push((l.clone(), Arc::new(self.upload_factors(l)?), *s));
            }
            return self.merge_on_device(&with);
        }
        let started = Instant::now();
        // per layer, in the job's order: each adapter's factor and its DoRA magnitude, if any
        let mut touched: BTreeMap<&str, Vec<Step<'_>>> = BTreeMap::new();
        for (lora, scale) in loras {
            for (name, layer) in &lora.layers {
                touched.entry(name.as_str()).or_default().push((
                    Factor {
                        b: &layer.b,
                        a: &layer.a,
                        rank: layer.rank,
                        coeff: coeff(layer, *scale),
                    },
                    layer.magnitude.as_deref(),
                ));
            }
        }
        let mut merged = HashMap::new();
        for (name, steps) in touched {
            let entry = self.map().get(name).ok_or_else(|| {
                Error::InvalidRequest(format!("LoRA layer `{name}` is not a weight of this bundle"))
            })?;
            // a convolution `[out, in, kh, kw]` as `[out, in·kh·kw]` (the same memory)
            let (rows, cols) = rows_cols(&entry.shape);
            let mut out = vec![0f32; rows * cols];
            if steps.iter().any(|(_, m)| m.is_some()) {
                dora_merge(&self.data(name)?, rows, cols, &steps, &mut out);
            } else {
                let factors: Vec<Factor<'_>> = steps.into_iter().map(|(f, _)| f).collect();
                merge_into(&self.data(name)?, rows, cols, &factors, &mut out);
            }
            merged.insert(
                name.to_string(),
                make_value(&entry.shape, out, self.is_half(name))?,
            );
        }
        Ok(MergedWeights::on_host(merged, started.elapsed()))
    }

    /// Uploads a LoRA's factors for [`Weights::merge_on_device`]; DoRA layers merge on the host
    /// only (an error naming the file).
    pub fn upload_factors(&self, lora: &LoraAdapter) -> Result<DeviceFactors> {
        if lora.has_dora_layers() {
            return Err(Error::Lora {
                path: lora.path.clone(),
                message: "DoRA layers (lora_magnitude_vector) are merged on the host only: a GPU worker \
                          does not take them yet"
                    .into(),
            });
        }
        let dev = on_gpu(self)?;
        let k = &dev.kernels;
        let _gpu = crate::device::beside_capture();
        let mut bytes: usize = lora.layers.values().map(|l| 4 * (l.a.len() + l.b.len())).sum();
        // one copy per factor from the parsed vectors: through two pinned chunks it was no faster
        // (the host copy into them is the limit, docs/measurements.md run N)
        let mut layers = HashMap::new();
        for (name, l) in &lora.layers {
            let b = k.stream.clone_htod(&l.b).map_err(gpu_err)?;
            let a = k.stream.clone_htod(&l.a).map_err(gpu_err)?;
            layers.insert(name.clone(), (b, a));
        }
        // the fp16 layers' factors packed once for the packed merge (tensor cores only)
        let mut packed = HashMap::new();
        if k.has_tensor_cores() {
            let mut names = Vec::new();
            let mut items = Vec::new();
            for (name, l) in &lora.layers {
                if l.rank == 0 || !matches!(dev.get(name), DevBuf::F16(_)) {
                    continue;
                }
                let (b, a) = &layers[name];
                let (rows, cols) = rows_cols(&self.map()[name].shape);
                names.push(name.clone());
                items.push((b, a, rows, cols, l.rank));
            }
            let p = k.pack_factors_f16(&items).map_err(gpu_err)?;
            k.synchronize().map_err(gpu_err)?;
            bytes += p.iter().map(PackedFactor::bytes).sum::<usize>();
            packed = names.into_iter().zip(p).collect();
        }
        Ok(DeviceFactors {
            layers,
            packed,
            bytes,
        })
    }

    /// Merges on the GPU: every touched layer in one launch into fresh device buffers; returns
    /// once the kernel has finished.
    pub fn merge_on_device(
        &self,
        loras: &[(Arc<LoraAdapter>, Arc<DeviceFactors>, f32)],
    ) -> Result<MergedWeights> {
        let started = Instant::now();
        let dev = on_gpu(self)?;
        let k = &dev.kernels;
        let _gpu = crate::device::beside_capture();
        let mut touched: BTreeMap<&str, Vec<GpuFactor<'_>>> = BTreeMap::new();
        for (lora, factors, scale) in loras {
            if lora.has_dora_layers() {
                return Err(Error::Lora {
                    path: lora.path.clone(),
                    message: "DoRA layers (lora_magnitude_vector) are merged on the host only".into(),
                });
            }
            for (name, layer) in &lora.layers {
                let (b, a) = factors
                    .layers
                    .get(name)
                    .ok_or_else(|| Error::Gpu(format!("device factors of `{name}` are missing")))?;
                touched.entry(name.as_str()).or_default().push(GpuFactor {
                    b,
                    a,
                    rank: layer.rank,
                    coeff: coeff(layer, *scale),
                    packed: factors.packed.get(name),
                });
            }
        }
        let mut outs: Vec<(&str, DevBuf)> = Vec::new();
        for name in touched.keys() {
            let n = self.map()[*name].shape.iter().product::<usize>();
            outs.push((
                name,
                match dev.get(name) {
                    DevBuf::F16(_) => DevBuf::F16(k.stream.alloc_zeros::<u16>(n).map_err(gpu_err)?),
                    DevBuf::F32(_) => DevBuf::F32(k.stream.alloc_zeros::<f32>(n).map_err(gpu_err)?),
                },
            ));
        }
        let (mut l16, mut l32) = (Vec::new(), Vec::new());
        for ((name, factors), (_, out)) in touched.into_iter().zip(&outs) {
            let shape = &self.map()[name].shape;
            let (rows, cols) = rows_cols(shape);
            match (dev.get(name), out) {
                (DevBuf::F16(base), DevBuf::F16(out)) => l16.push(GpuMergeLayer {
                    base,
                    out,
                    rows,
                    cols,
                    factors,
                }),
                (DevBuf::F32(base), DevBuf::F32(out)) => l32.push(GpuMergeLayer {
                    base,
                    out,
                    rows,
                    cols,
                    factors,
                }),
                _ => unreachable!("outputs take their base's type"),
            }
        }
        // fp16: the packed merge on tensor cores, its factors packed at upload
        k.lora_merge_f16(&l16).map_err(gpu_err)?;
        k.lora_merge(&l32).map_err(gpu_err)?;
        k.synchronize().map_err(gpu_err)?;
        drop((l16, l32));
        Ok(MergedWeights::on_device(
            outs.into_iter().map(|(n, b)| (n.to_string(), b)).collect(),
            started.elapsed(),
        ))
    }
}

/// One adapter's part of a layer's merge: its factor, and its DoRA magnitude if it has one.
type Step<'a> = (Factor<'a>, Option<&'a [f32]>);

/// Merges a layer some of whose adapters are DoRA, in the job's order, as peft's forward applies
/// them: a LoRA step adds `s·ΔW`; a DoRA step with magnitude m makes each row r
/// `acc_r ← (m_r / ‖W_r + s·ΔW_r‖)·(acc_r + s·ΔW_r)`, the norm over the pristine weight `W` (`base`)
/// — so a DoRA adapter also scales what the adapters before it added. Norms in f64.
fn dora_merge(base: &[f32], rows: usize, cols: usize, steps: &[Step<'_>], out: &mut [f32]) {
    out.copy_from_slice(base);
    let zeros = vec![0f32; rows * cols];
    let mut delta = vec![0f32; rows * cols];
    for (factor, magnitude) in steps {
        // s·ΔW of this adapter alone
        merge_into(&zeros, rows, cols, std::slice::from_ref(factor), &mut delta);
        match magnitude {
            None => out.iter_mut().zip(&delta).for_each(|(o, d)| *o += d),
            Some(m) => {
                for r in 0..rows {
                    let (w, d) = (&base[r * cols..(r + 1) * cols], &delta[r * cols..(r + 1) * cols]);
                    let norm = w
                        .iter()
                        .zip(d)
                        .map(|(&w, &d)| (w as f64 + d as f64).powi(2))
                        .sum::<f64>()
                        .sqrt();
                    let f = m[r] as f64 / norm;
                    for (o, &d) in out[r * cols..(r + 1) * cols].iter_mut().zip(d) {
                        *o = (f * (*o as f64 + d as f64)) as f32;
                    }
                }
            }
        }
    }
}

/// A weight's shape as the merge's `[rows, cols]`: `[out, in]`, or a convolution `[out, in, kh, kw]`
/// as `[out, in·kh·kw]` (row-major: the same memory, and `B·A` of its flattened factors).
fn rows_cols(shape: &[usize]) -> (usize, usize) {
    let rows = shape.first().copied().unwrap_or(1);
    (rows, shape.iter().skip(1).product())
}

/// The device copy of `weights`, or the error of a GPU merge on host weights.
fn on_gpu(weights: &Weights) -> Result<&DeviceWeights> {
    weights
        .device()
        .ok_or_else(|| Error::Gpu("these weights are not on a GPU".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lora::fixtures::values;

    /// `coeff·B·A` in f64.
    fn delta(f: &Factor<'_>, rows: usize, cols: usize) -> Vec<f64> {
        let mut d = vec![0f64; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                let acc: f64 = (0..f.rank)
                    .map(|k| f.b[r * f.rank + k] as f64 * f.a[k * cols + c] as f64)
                    .sum();
                d[r * cols + c] = f.coeff as f64 * acc;
            }
        }
        d
    }

    /// A LoRA, a DoRA and a LoRA on one weight, against peft's forward written out in f64: the
    /// DoRA step scales each row of everything so far by m / ‖W + s·ΔW‖ (pristine W).
    #[test]
    fn dora_scales_what_came_before_by_its_magnitude_over_the_row_norm() {
        let (rows, cols, rank) = (6, 10, 3);
        let base = values(rows * cols, 1);
        let (a1, b1, a2, b2, a3, b3) = (
            values(rank * cols, 2),
            values(rows * rank, 3),
            values(rank * cols, 4),
            values(rows * rank, 5),
            values(rank * cols, 6),
            values(rows * rank, 7),
        );
        let m: Vec<f32> = values(rows, 8).iter().map(|v| 2.0 + v).collect();
        let f = |a: &'static [f32], b: &'static [f32], coeff| Factor { b, a, rank, coeff };
        let leak = |v: Vec<f32>| -> &'static [f32] { Box::leak(v.into_boxed_slice()) };
        let (a1, b1, a2, b2, a3, b3) = (leak(a1), leak(b1), leak(a2), leak(b2), leak(a3), leak(b3));
        let steps = [
            (f(a1, b1, 0.4), None),
            (f(a2, b2, -0.7), Some(m.as_slice())),
            (f(a3, b3, 0.25), None),
        ];
        let mut out = vec![0f32; rows * cols];
        dora_merge(&base, rows, cols, &steps, &mut out);

        let mut want: Vec<f64> = base.iter().map(|&x| x as f64).collect();
        let d1 = delta(&steps[0].0, rows, cols);
        want.iter_mut().zip(&d1).for_each(|(w, d)| *w += d);
        let d2 = delta(&steps[1].0, rows, cols);
        for (r, mr) in m.iter().enumerate() {
            let row = r * cols..(r + 1) * cols;
            let norm = row
                .clone()
                .map(|i| (base[i] as f64 + d2[i]).powi(2))
                .sum::<f64>()
                .sqrt();
            for i in row {
                want[i] = *mr as f64 / norm * (want[i] + d2[i]);
            }
        }
        let d3 = delta(&steps[2].0, rows, cols);
        want.iter_mut().zip(&d3).for_each(|(w, d)| *w += d);
        for (g, w) in out.iter().zip(&want) {
            assert!((*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }

        // a magnitude equal to the row norms of W + s·ΔW is the plain LoRA
        let d = delta(&steps[1].0, rows, cols);
        let norms: Vec<f32> = (0..rows)
            .map(|r| {
                (r * cols..(r + 1) * cols)
                    .map(|i| (base[i] as f64 + d[i]).powi(2))
                    .sum::<f64>()
                    .sqrt() as f32
            })
            .collect();
        let mut dora = vec![0f32; rows * cols];
        dora_merge(
            &base,
            rows,
            cols,
            &[(f(a2, b2, -0.7), Some(norms.as_slice()))],
            &mut dora,
        );
        let mut lora = vec![0f32; rows * cols];
        merge_into(&base, rows, cols, &[f(a2, b2, -0.7)], &mut lora);
        for (x, y) in dora.iter().zip(&lora) {
            assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{x} vs {y}");
        }
    }
}
