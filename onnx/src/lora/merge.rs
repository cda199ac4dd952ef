//! Merging LoRAs into a bundle's weights: `W + Σ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ` for every layer a job's
//! LoRAs touch, written into a fresh [`MergedWeights`] set (the pristine set never changes).
//! A convolution weight `[out, in, kh, kw]` is merged as the matrix `[out, in·kh·kw]` it is in
//! memory, with its factors flattened the same way (`LoraLayer`), on the host and on the GPU.
//!
//! ```text
//! host: [(LoraAdapter, scale)] ─▶ Weights::merge ─ katz_kernels::lora::merge_into per layer ─▶ MergedWeights (host)
//! GPU:  LoraAdapter ─upload_factors (once; the LoraManager caches them)─▶ DeviceFactors
//!       [(LoraAdapter, DeviceFactors, scale)] ─▶ Weights::merge_on_device ─ one launch
//!       (GpuKernels::lora_merge_f16 / lora_merge) ─▶ MergedWeights (device)
//! ```
//!
//! These are methods of [`Weights`] (whose buffers they read), written here beside the rest of
//! the LoRA code: `weights.rs` knows nothing of LoRAs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::CudaSlice;
use katz_kernels::cuda::{GpuFactor, GpuMergeLayer};
use katz_kernels::lora::{merge_into, Factor};

use super::adapter::{LoraAdapter, LoraLayer};
use crate::device::gpu_err;
use crate::weights::{make_value, DevBuf, DeviceWeights, MergedWeights, Weights};
use crate::{Error, Result};

/// One LoRA's factors in device memory (f32), by weight name: `(B, A)`.
pub struct DeviceFactors {
    layers: HashMap<String, (CudaSlice<f32>, CudaSlice<f32>)>,
    bytes: usize,
}

impl Drop for DeviceFactors {
    fn drop(&mut self) {
        // freed beside a CUDA-graph capture, not during one (crate::device::beside_capture)
        let _gpu = crate::device::beside_capture();
        self.layers.clear();
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
        let mut touched: BTreeMap<&str, Vec<Factor<'_>>> = BTreeMap::new();
        for (lora, scale) in loras {
            for (name, layer) in &lora.layers {
                touched.entry(name.as_str()).or_default().push(Factor {
                    b: &layer.b,
                    a: &layer.a,
                    rank: layer.rank,
                    coeff: coeff(layer, *scale),
                });
            }
        }
        let mut merged = HashMap::new();
        for (name, factors) in touched {
            let entry = self.map().get(name).ok_or_else(|| {
                Error::InvalidRequest(format!("LoRA layer `{name}` is not a weight of this bundle"))
            })?;
            // a convolution `[out, in, kh, kw]` as `[out, in·kh·kw]` (the same memory)
            let (rows, cols) = rows_cols(&entry.shape);
            let mut out = vec![0f32; rows * cols];
            merge_into(&self.data(name)?, rows, cols, &factors, &mut out);
            merged.insert(
                name.to_string(),
                make_value(&entry.shape, out, self.is_half(name))?,
            );
        }
        Ok(MergedWeights::on_host(merged, started.elapsed()))
    }

    /// Uploads a LoRA's factors for [`Weights::merge_on_device`].
    pub fn upload_factors(&self, lora: &LoraAdapter) -> Result<DeviceFactors> {
        let s = &on_gpu(self)?.kernels.stream;
        let _gpu = crate::device::beside_capture();
        let mut layers = HashMap::new();
        let mut bytes = 0;
        for (name, l) in &lora.layers {
            bytes += 4 * (l.a.len() + l.b.len());
            layers.insert(
                name.clone(),
                (
                    s.clone_htod(&l.b).map_err(gpu_err)?,
                    s.clone_htod(&l.a).map_err(gpu_err)?,
                ),
            );
        }
        Ok(DeviceFactors { layers, bytes })
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
