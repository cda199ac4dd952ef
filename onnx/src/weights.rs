//! LoRA-targetable weights: graph inputs bound from buffers katz owns.
//!
//! The pristine set is read once from the bundle's `weights.safetensors`; a job with LoRAs gets a
//! [`MergedWeights`] set holding `W + Σ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ` for the layers its LoRAs touch, and the
//! pristine tensors for the rest. Sessions are never rebuilt and the pristine set never changes.
//!
//! On a GPU ([`Weights::to_device`]) the pristine set is also uploaded once into device buffers
//! ([`DeviceWeights`]) that every job binds without a copy, and merges run there: each LoRA's
//! factors go up once ([`DeviceFactors`], cached by the LoraManager) and one kernel launch writes
//! every touched layer into fresh device buffers (`katz_kernels::cuda::GpuKernels::lora_merge_*`).
//!
//! ```text
//! host: weights.safetensors ─▶ values (f32 | f16 DynValue) ──merge (CPU)──▶ MergedWeights::host
//! GPU:  values ─upload once─▶ DeviceWeights ──factors (DeviceFactors) + one launch──▶ MergedWeights::device
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::{CudaSlice, DevicePtr};
use katz_kernels::cuda::{GpuFactor, GpuKernels, GpuMergeLayer};
use katz_kernels::lora::{merge_into, Factor};
use ort::value::{DynValue, Tensor as OrtTensor};
use safetensors::{Dtype, SafeTensors};

use crate::bundle::{BaseBundle, WeightEntry};
use crate::lora::LoraAdapter;
use crate::{Error, Result};

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
mod to_f32_tests {
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

/// The bundle's pristine weights, by graph input name.
pub struct Weights {
    map: BTreeMap<String, WeightEntry>,
    /// Bound as the graph input wants them: f32, or f16 for the inputs named in `half`.
    values: HashMap<String, DynValue>,
    half: HashSet<String>,
    /// Input names per graph, in manifest order.
    by_graph: HashMap<String, Vec<String>>,
    /// The same weights in device memory (GPU pipelines).
    device: Option<DeviceWeights>,
}

/// A weight in device memory: f32, or fp16 bit patterns.
pub enum DevBuf {
    F32(CudaSlice<f32>),
    F16(CudaSlice<u16>),
}

impl DevBuf {
    /// The device address (valid while the buffer lives).
    pub fn ptr(&self, k: &GpuKernels) -> u64 {
        match self {
            DevBuf::F32(b) => b.device_ptr(&k.stream).0,
            DevBuf::F16(b) => b.device_ptr(&k.stream).0,
        }
    }

    pub fn bytes(&self) -> usize {
        match self {
            DevBuf::F32(b) => b.len() * 4,
            DevBuf::F16(b) => b.len() * 2,
        }
    }

    /// Binds this buffer as input `name` (shape `shape`) of a binding on GPU `device`, in place
    /// (no copy); `k` is any kernels object of that GPU's context.
    ///
    /// # Safety
    /// The buffer must outlive every run of the binding (or until `name` is bound again).
    pub(crate) unsafe fn bind(
        &self,
        b: &mut ort::session::IoBinding,
        name: &str,
        shape: &[usize],
        k: &GpuKernels,
        device: i32,
    ) -> Result<()> {
        use ort::value::TensorRefMut;
        let mem = crate::device::cuda_memory(device)?;
        let ptr = self.ptr(k) as usize as *mut std::ffi::c_void;
        let shape = ort::value::Shape::from(shape);
        // SAFETY: the caller keeps the buffer alive; shape and element type match it
        match self {
            DevBuf::F16(_) => b.bind_input(name, &*unsafe {
                TensorRefMut::<half::f16>::from_raw(mem, ptr, shape)?
            })?,
            DevBuf::F32(_) => {
                b.bind_input(name, &*unsafe { TensorRefMut::<f32>::from_raw(mem, ptr, shape)? })?
            }
        }
        Ok(())
    }

    fn to_host(&self, k: &GpuKernels) -> Result<Vec<f32>> {
        let g = |e: cudarc::driver::DriverError| Error::Gpu(e.to_string());
        Ok(match self {
            DevBuf::F32(b) => k.stream.clone_dtoh(b).map_err(g)?,
            DevBuf::F16(b) => k
                .stream
                .clone_dtoh(b)
                .map_err(g)?
                .into_iter()
                .map(|h| half::f16::from_bits(h).to_f32())
                .collect(),
        })
    }
}

/// The pristine weights in device memory, with the kernels (context, stream) that own them.
pub struct DeviceWeights {
    pub kernels: Arc<GpuKernels>,
    pub ordinal: i32,
    values: HashMap<String, DevBuf>,
}

impl DeviceWeights {
    pub fn get(&self, name: &str) -> &DevBuf {
        &self.values[name]
    }
}

/// One LoRA's factors in device memory (f32), by weight name: `(B, A)`.
pub struct DeviceFactors {
    layers: HashMap<String, (CudaSlice<f32>, CudaSlice<f32>)>,
    bytes: usize,
}

impl DeviceFactors {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

fn gpu_err(e: impl std::fmt::Display) -> Error {
    Error::Gpu(e.to_string())
}

impl Weights {
    /// Reads the weights; those named in `half` (fp16 graph inputs) are bound as f16.
    pub fn load(bundle: &BaseBundle, half: HashSet<String>) -> Result<Self> {
        crate::runtime::init()?;
        let spec = &bundle.manifest.weights;
        let path = bundle.path(&spec.file);
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::bundle(&path, format!("not a safetensors file: {e}")))?;
        let mut values = HashMap::new();
        let mut by_graph: HashMap<String, Vec<String>> = HashMap::new();
        for (name, entry) in &spec.map {
            let t = st.tensor(name).map_err(|_| {
                Error::bundle(
                    &path,
                    format!("manifest names weight `{name}`, which the file lacks"),
                )
            })?;
            if t.shape() != entry.shape.as_slice() {
                return Err(Error::bundle(
                    &path,
                    format!(
                        "weight `{name}` has shape {:?}, the manifest says {:?}",
                        t.shape(),
                        entry.shape
                    ),
                ));
            }
            let data = to_f32(t.dtype(), t.data()).ok_or_else(|| {
                Error::bundle(
                    &path,
                    format!("weight `{name}` has unsupported dtype {:?}", t.dtype()),
                )
            })?;
            values.insert(name.clone(), make_value(&entry.shape, data, half.contains(name))?);
            by_graph
                .entry(entry.graph.clone())
                .or_default()
                .push(name.clone());
        }
        let extra: Vec<String> = st
            .names()
            .into_iter()
            .filter(|n| !spec.map.contains_key(*n))
            .map(String::from)
            .collect();
        if !extra.is_empty() {
            return Err(Error::bundle(
                &path,
                format!(
                    "{} weights are not in the manifest's map (first: {})",
                    extra.len(),
                    extra[0]
                ),
            ));
        }
        Ok(Weights {
            map: spec.map.clone(),
            values,
            half,
            by_graph,
            device: None,
        })
    }

    /// Uploads the pristine weights to GPU `ordinal` (once; every job then binds them in place).
    pub fn to_device(&mut self, ordinal: i32) -> Result<()> {
        let kernels = Arc::new(
            GpuKernels::new(ordinal as usize).map_err(|e| Error::DeviceUnavailable {
                device: format!("cuda:{ordinal}"),
                message: format!("the LoRA merge kernels cannot start: {e}"),
            })?,
        );
        let mut values = HashMap::new();
        for name in self.map.keys() {
            let v = &self.values[name];
            let buf = if self.half.contains(name) {
                let (_, d) = v.try_extract_tensor::<half::f16>()?;
                let bits: Vec<u16> = d.iter().map(|x| x.to_bits()).collect();
                DevBuf::F16(kernels.stream.clone_htod(&bits).map_err(gpu_err)?)
            } else {
                let (_, d) = v.try_extract_tensor::<f32>()?;
                DevBuf::F32(kernels.stream.clone_htod(d).map_err(gpu_err)?)
            };
            values.insert(name.clone(), buf);
        }
        kernels.synchronize().map_err(gpu_err)?;
        self.device = Some(DeviceWeights {
            kernels,
            ordinal,
            values,
        });
        Ok(())
    }

    /// The device copy, on GPU pipelines.
    pub fn device(&self) -> Option<&DeviceWeights> {
        self.device.as_ref()
    }

    /// Uploads a LoRA's factors for [`Weights::merge_on_device`].
    pub fn upload_factors(&self, lora: &LoraAdapter) -> Result<DeviceFactors> {
        let dev = self
            .device
            .as_ref()
            .ok_or_else(|| Error::Gpu("these weights are not on a GPU".into()))?;
        let s = &dev.kernels.stream;
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
        let dev = self
            .device
            .as_ref()
            .ok_or_else(|| Error::Gpu("these weights are not on a GPU".into()))?;
        let k = &dev.kernels;
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
                    coeff: scale * layer.alpha / layer.rank as f32,
                });
            }
        }
        let mut outs: Vec<(&str, DevBuf)> = Vec::new();
        for name in touched.keys() {
            let n = self.map[*name].shape.iter().product::<usize>();
            outs.push((
                name,
                match dev.values[*name] {
                    DevBuf::F16(_) => DevBuf::F16(k.stream.alloc_zeros::<u16>(n).map_err(gpu_err)?),
                    DevBuf::F32(_) => DevBuf::F32(k.stream.alloc_zeros::<f32>(n).map_err(gpu_err)?),
                },
            ));
        }
        let (mut l16, mut l32) = (Vec::new(), Vec::new());
        for ((name, factors), (_, out)) in touched.into_iter().zip(&outs) {
            let shape = &self.map[name].shape;
            let (rows, cols) = (shape[0], shape[1]);
            match (&dev.values[name], out) {
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
        Ok(MergedWeights {
            id: next_merge_id(),
            merged: HashMap::new(),
            device: outs.into_iter().map(|(n, b)| (n.to_string(), b)).collect(),
            merge_time: started.elapsed(),
        })
    }

    /// The merged set `merged` of `src` (weights of the same bundle on another GPU of this
    /// process), copied to this set's GPU by peer copy (split guidance: both halves switch to
    /// the same merged weights without merging twice).
    pub fn copy_merged_from(&self, merged: &MergedWeights, src: &Weights) -> Result<MergedWeights> {
        let started = Instant::now();
        let (dev, sdev) = match (self.device.as_ref(), src.device.as_ref()) {
            (Some(d), Some(s)) => (d, s),
            _ => {
                return Err(Error::Gpu(
                    "copying merged weights needs both sets on GPUs".into(),
                ))
            }
        };
        if !merged.merged.is_empty() {
            return Err(Error::Gpu(
                "the merged weights are on the host, not on a GPU".into(),
            ));
        }
        let k = &dev.kernels;
        let mut out = HashMap::new();
        for (name, b) in &merged.device {
            let copy = match b {
                DevBuf::F16(x) => DevBuf::F16(k.stream.alloc_zeros::<u16>(x.len()).map_err(gpu_err)?),
                DevBuf::F32(x) => DevBuf::F32(k.stream.alloc_zeros::<f32>(x.len()).map_err(gpu_err)?),
            };
            // SAFETY: same length and type; the source set is complete (its merge synchronised)
            unsafe { k.copy_raw(copy.ptr(k), b.ptr(&sdev.kernels), b.bytes()) }.map_err(gpu_err)?;
            out.insert(name.clone(), copy);
        }
        k.synchronize().map_err(gpu_err)?;
        Ok(MergedWeights {
            id: merged.id, // the same merge, on another GPU
            merged: HashMap::new(),
            device: out,
            merge_time: merged.merge_time + started.elapsed(),
        })
    }

    pub fn map(&self) -> &BTreeMap<String, WeightEntry> {
        &self.map
    }

    /// Input names that graph `graph` takes as weights.
    pub fn inputs_of(&self, graph: &str) -> &[String] {
        self.by_graph.get(graph).map(Vec::as_slice).unwrap_or(&[])
    }

    pub fn pristine(&self, name: &str) -> &DynValue {
        &self.values[name]
    }

    /// The host data of a pristine weight, as f32.
    pub fn data(&self, name: &str) -> Result<Cow<'_, [f32]>> {
        let v = &self.values[name];
        if self.half.contains(name) {
            let (_, d) = v.try_extract_tensor::<half::f16>()?;
            Ok(Cow::Owned(d.iter().map(|x| x.to_f32()).collect()))
        } else {
            Ok(Cow::Borrowed(v.try_extract_tensor::<f32>()?.1))
        }
    }

    /// Merges LoRAs (each with its scale) into a new set of the touched weights (on the GPU
    /// when the weights are there, uploading the factors first).
    pub fn merge(&self, loras: &[(Arc<LoraAdapter>, f32)]) -> Result<MergedWeights> {
        if self.device.is_some() {
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
                    coeff: scale * layer.alpha / layer.rank as f32,
                });
            }
        }
        let mut merged = HashMap::new();
        for (name, factors) in touched {
            let entry = self.map.get(name).ok_or_else(|| {
                Error::InvalidRequest(format!("LoRA layer `{name}` is not a weight of this bundle"))
            })?;
            let (rows, cols) = (entry.shape[0], entry.shape[1]);
            let mut out = vec![0f32; rows * cols];
            merge_into(&self.data(name)?, rows, cols, &factors, &mut out);
            merged.insert(
                name.to_string(),
                make_value(&entry.shape, out, self.half.contains(name))?,
            );
        }
        Ok(MergedWeights {
            id: next_merge_id(),
            merged,
            device: HashMap::new(),
            merge_time: started.elapsed(),
        })
    }

    /// Whether `other` holds the same weight map (same bundle).
    pub fn same_map(&self, other: &Weights) -> bool {
        self.map == other.map && self.half == other.half
    }
}

/// Weights changed by a job's LoRAs; the rest are bound from the pristine set.
#[derive(Default)]
pub struct MergedWeights {
    /// Unique per merge (0: no LoRA, the pristine weights): a CUDA-graph weight slot that holds
    /// this set already need not copy it again (crate::unet::graphed).
    id: u64,
    merged: HashMap<String, DynValue>,
    /// Merged on the GPU (then `merged` is empty).
    device: HashMap<String, DevBuf>,
    /// Wall time of the merge that made this set.
    pub merge_time: Duration,
}

/// A fresh [`MergedWeights::id`].
fn next_merge_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl MergedWeights {
    /// Which merge made this set (0: none); equal ids hold equal weights.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Names of the weights a LoRA touched.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.merged.keys().chain(self.device.keys()).map(String::as_str)
    }

    /// The device buffer of a weight merged on the GPU.
    pub fn device(&self, name: &str) -> Option<&DevBuf> {
        self.device.get(name)
    }

    /// The merged (or pristine) values of `name` as f32 on the host (for checks).
    pub fn host_data(&self, pristine: &Weights, name: &str) -> Result<Vec<f32>> {
        if let (Some(b), Some(dev)) = (self.device.get(name), pristine.device.as_ref()) {
            return b.to_host(&dev.kernels);
        }
        let v = self.get(pristine, name);
        if pristine.half.contains(name) {
            Ok(v.try_extract_tensor::<half::f16>()?
                .1
                .iter()
                .map(|x| x.to_f32())
                .collect())
        } else {
            Ok(v.try_extract_tensor::<f32>()?.1.to_vec())
        }
    }

    pub fn len(&self) -> usize {
        self.merged.len() + self.device.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The tensor to bind for input `name`: merged if a LoRA touched it, pristine otherwise.
    pub fn get<'a>(&'a self, pristine: &'a Weights, name: &str) -> &'a DynValue {
        self.merged.get(name).unwrap_or_else(|| pristine.pristine(name))
    }
}

/// An ONNX Runtime value for a weight, f32 or converted to f16 (for fp16 graph inputs).
fn make_value(shape: &[usize], data: Vec<f32>, half: bool) -> Result<DynValue> {
    Ok(if half {
        let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
        OrtTensor::from_array((shape.to_vec(), h))?.into_dyn()
    } else {
        OrtTensor::from_array((shape.to_vec(), data))?.into_dyn()
    })
}

/// A merge that finishes while a job runs (asynchronous LoRA loading): the merging side holds a
/// [`MergeSender`], the pipeline polls this at step boundaries and waits at the bound step.
pub struct PendingMerge {
    rx: Receiver<Result<Arc<MergedWeights>>>,
}

/// The merging side of a [`PendingMerge`]; dropping it unsent fails the pending merge.
pub struct MergeSender {
    tx: Sender<Result<Arc<MergedWeights>>>,
}

impl MergeSender {
    pub fn send(self, result: Result<Arc<MergedWeights>>) {
        // the job may be gone (cancelled, failed): nobody to tell
        let _ = self.tx.send(result);
    }
}

impl PendingMerge {
    pub fn channel() -> (MergeSender, PendingMerge) {
        let (tx, rx) = mpsc::channel();
        (MergeSender { tx }, PendingMerge { rx })
    }

    /// A merge that is already done (or failed).
    pub fn ready(result: Result<Arc<MergedWeights>>) -> PendingMerge {
        let (tx, rx) = PendingMerge::channel();
        tx.send(result);
        rx
    }

    /// Merges on a thread of its own (`katz generate --lora-mode async` without the service).
    pub fn spawn(weights: Arc<Weights>, loras: Vec<(Arc<LoraAdapter>, f32)>) -> PendingMerge {
        PendingMerge::on_thread("lora-merge", move || weights.merge(&loras).map(Arc::new))
    }

    /// Runs `merge` on a thread named `name`. A thread that cannot start drops its sender, so the
    /// pending merge reports itself abandoned instead of panicking the caller.
    fn on_thread(
        name: &str,
        merge: impl FnOnce() -> Result<Arc<MergedWeights>> + Send + 'static,
    ) -> PendingMerge {
        let (tx, rx) = PendingMerge::channel();
        if let Err(e) = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || tx.send(merge()))
        {
            tracing::error!(error = %e, "cannot start the {name} thread");
        }
        rx
    }

    /// Reads and parses LoRA files, then merges them, on a thread of its own: the whole of a
    /// request's LoRA loading overlaps its first steps (without a service's caches).
    pub fn spawn_loading(weights: Arc<Weights>, files: Vec<(std::path::PathBuf, f32)>) -> PendingMerge {
        PendingMerge::on_thread("lora-load", move || {
            let loaded = files
                .iter()
                .map(|(p, s)| Ok((Arc::new(LoraAdapter::load(p, weights.map())?), *s)))
                .collect::<Result<Vec<_>>>()?;
            weights.merge(&loaded).map(Arc::new)
        })
    }

    /// The merged set once it is ready; with `wait`, blocks until it is (at most `limit`).
    pub fn poll(&mut self, wait: Option<Duration>) -> Option<Result<Arc<MergedWeights>>> {
        let gone = || {
            Some(Err(Error::Lora {
                path: "<merge>".into(),
                message: "the LoRA merge was abandoned before it finished".into(),
            }))
        };
        match wait {
            None => match self.rx.try_recv() {
                Ok(r) => Some(r),
                Err(mpsc::TryRecvError::Empty) => None,
                Err(mpsc::TryRecvError::Disconnected) => gone(),
            },
            Some(limit) => match self.rx.recv_timeout(limit) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => gone(),
            },
        }
    }
}
