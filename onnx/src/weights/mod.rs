//! LoRA-targetable weights: graph inputs bound from buffers katz owns — the pristine set and
//! the merged sets that LoRAs make of it.
//!
//! The pristine set is read once from the bundle's `weights.safetensors`; a job with LoRAs gets a
//! [`MergedWeights`] set holding `W + Σ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ` for the layers its LoRAs touch, and the
//! pristine tensors for the rest. Sessions are never rebuilt and the pristine set never changes.
//! The merging itself is LoRA code ([`crate::lora`]: `Weights::merge`, `merge_on_device`); this
//! module only holds the buffers, and knows nothing of LoRA files.
//!
//! On a GPU ([`Weights::open`] with a GPU) the pristine set is streamed once from the mapped
//! file into device buffers ([`DeviceWeights`]) that every job binds without a copy, and merges
//! run there, writing every touched layer into fresh device buffers ([`MergedWeights`] holds
//! them as [`DevBuf`]s). A GPU set makes a host value only when one is asked for (a host-path
//! binding or a host merge), from the mapped file; a host set makes them all at load.
//!
//! ```text
//! host: weights.safetensors ─mmap─▶ values (f32 | f16 DynValue) ──lora::merge (CPU)──▶ MergedWeights (host)
//! GPU:  weights.safetensors ─mmap─▶ pinned chunks ─▶ DeviceWeights ──lora::merge_on_device──▶ MergedWeights (device)
//!       MergedWeights on GPU a ─copy_merged_from (peer copy)─▶ MergedWeights on GPU b
//! ```
//!
//! # Layout
//!
//! * `mod.rs` — [`Weights`] (the pristine set: manifest map, host values, device copy),
//!   [`DevBuf`], [`MergedWeights`], `HostData`.
//! * `file.rs` — `WeightFile`: the mapped file checked against the manifest, host values made
//!   from it, and the streamed upload to a GPU.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use cudarc::driver::{CudaSlice, DevicePtr};
use katz_kernels::cuda::GpuKernels;
use ort::value::{DynValue, Tensor as OrtTensor};

use crate::bundle::{BaseBundle, WeightEntry};
use crate::device::gpu_err;
use crate::dtype::to_f32;
use crate::{Error, Result};

mod file;
use file::WeightFile;

/// The bundle's pristine weights, by graph input name.
pub struct Weights {
    map: BTreeMap<String, WeightEntry>,
    /// Bound as the graph input wants them: f32, or f16 for the inputs named in `half`; made at
    /// load on the host, on first use for a GPU set.
    values: HashMap<String, OnceLock<DynValue>>,
    half: HashSet<String>,
    /// Input names per graph, in manifest order.
    by_graph: HashMap<String, Vec<String>>,
    /// The file, mapped: the host values are made from it.
    file: Arc<WeightFile>,
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

    /// A copy of this buffer (owned by `src`'s context) in new memory of `k`'s GPU, queued on
    /// `k`'s stream: synchronise `k` before reading it, and keep this buffer unchanged until then.
    pub(crate) fn copy_on(&self, src: &GpuKernels, k: &GpuKernels) -> Result<DevBuf> {
        let copy = match self {
            DevBuf::F16(x) => DevBuf::F16(k.stream.alloc_zeros::<u16>(x.len()).map_err(gpu_err)?),
            DevBuf::F32(x) => DevBuf::F32(k.stream.alloc_zeros::<f32>(x.len()).map_err(gpu_err)?),
        };
        // SAFETY: same length and type; the caller keeps the source unchanged until `k` synchronises
        unsafe { k.copy_raw(copy.ptr(k), self.ptr(src), self.bytes()) }.map_err(gpu_err)?;
        Ok(copy)
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

impl Weights {
    /// Reads the weights for a host pipeline; those named in `half` (fp16 graph inputs) are
    /// bound as f16.
    pub fn load(bundle: &BaseBundle, half: HashSet<String>) -> Result<Self> {
        Self::open(bundle, half, None)
    }

    /// Reads the weights and, with `gpu`, uploads them to that GPU (once: every job then binds
    /// them in place, merges run there). A GPU set makes its host values only when something
    /// asks for them (a host-path binding, a host merge); a host set makes them all now.
    pub fn open(bundle: &BaseBundle, half: HashSet<String>, gpu: Option<i32>) -> Result<Self> {
        Self::open_spec(&bundle.dir, &bundle.manifest.weights, half, gpu)
    }

    /// [`Weights::open`] for the weights `spec` describes in bundle directory `dir` (a base
    /// bundle's, or a ControlNet bundle's).
    pub fn open_spec(
        dir: &std::path::Path,
        spec: &crate::bundle::WeightsSpec,
        half: HashSet<String>,
        gpu: Option<i32>,
    ) -> Result<Self> {
        crate::runtime::init()?;
        let path = dir.join(&spec.file);
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the bundle's files are not written while it is served (docs/bundles.md); the
        // map is read-only and only ever read
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let file = Arc::new(WeightFile::read(&path, map, spec)?);
        let mut by_graph: HashMap<String, Vec<String>> = HashMap::new();
        for (name, entry) in &spec.map {
            by_graph
                .entry(entry.graph.clone())
                .or_default()
                .push(name.clone());
        }
        let values: HashMap<String, OnceLock<DynValue>> =
            spec.map.keys().map(|n| (n.clone(), OnceLock::new())).collect();
        let mut w = Weights {
            map: spec.map.clone(),
            values,
            half,
            by_graph,
            file,
            device: None,
        };
        match gpu {
            Some(ordinal) => w.device = Some(w.file.upload(ordinal, &w.half)?),
            None => w.fill_host()?,
        }
        Ok(w)
    }

    /// Makes every host value now (host pipelines), converted on every core (full-size SDXL in
    /// f32: 2.6 G values, ~10 s on one).
    fn fill_host(&self) -> Result<()> {
        use rayon::prelude::*;
        let made: Vec<(&String, Result<HostData>)> = self
            .map
            .keys()
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|name| (name, self.file.host_data(name, self.half.contains(name))))
            .collect();
        for (name, data) in made {
            let v = data?.into_value(&self.map[name].shape)?;
            let _ = self.values[name].set(v);
        }
        Ok(())
    }

    /// The device copy, on GPU pipelines.
    pub fn device(&self) -> Option<&DeviceWeights> {
        self.device.as_ref()
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
        let _gpu = crate::device::beside_capture();
        let mut out = HashMap::new();
        for (name, b) in &merged.device {
            // the source set is complete (its merge synchronised) and does not change
            out.insert(name.clone(), b.copy_on(&sdev.kernels, k)?);
        }
        k.synchronize().map_err(gpu_err)?;
        crate::fp8::weights_changed();
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

    /// Whether weight `name` is an input of the UNet's graphs (the rest are the text encoders').
    pub fn is_unet(&self, name: &str) -> bool {
        self.map.get(name).is_some_and(|e| e.graph.starts_with("unet_"))
    }

    /// Binds weight `name` as an input of `b`: merged if a LoRA touched it, else pristine — in
    /// place from device memory when the weights live on a GPU (no copy), else from the host.
    /// `merged` and `self` must outlive every run of the binding.
    pub(crate) fn bind_input(
        &self,
        b: &mut ort::session::IoBinding,
        name: &str,
        merged: &MergedWeights,
    ) -> Result<()> {
        let Some(dev) = self.device() else {
            b.bind_input(name, merged.get(self, name)?)?;
            return Ok(());
        };
        let buf = match merged.device(name) {
            Some(m) => m,
            None if merged.names().any(|n| n == name) => {
                // merged on the host (not expected with device weights): bind it with a copy
                b.bind_input(name, merged.get(self, name)?)?;
                return Ok(());
            }
            None => dev.get(name),
        };
        // SAFETY: the buffer is owned by the pristine set or by `merged`, which the caller keeps
        // alive for every run of the binding
        unsafe { buf.bind(b, name, &self.map[name].shape, &dev.kernels, dev.ordinal) }
    }

    /// Input names that graph `graph` takes as weights.
    pub fn inputs_of(&self, graph: &str) -> &[String] {
        self.by_graph.get(graph).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The pristine value of `name` on the host, as its graph input takes it (made on first
    /// use for a GPU set).
    pub fn pristine(&self, name: &str) -> Result<&DynValue> {
        let cell = &self.values[name];
        if let Some(v) = cell.get() {
            return Ok(v);
        }
        let v = self
            .file
            .host_data(name, self.half.contains(name))?
            .into_value(&self.map[name].shape)?;
        // another thread may have made it first: either is the same value
        Ok(cell.get_or_init(|| v))
    }

    /// The host data of a pristine weight, as f32.
    pub fn data(&self, name: &str) -> Result<Cow<'_, [f32]>> {
        let v = self.pristine(name)?;
        if self.half.contains(name) {
            let (_, d) = v.try_extract_tensor::<half::f16>()?;
            Ok(Cow::Owned(d.iter().map(|x| x.to_f32()).collect()))
        } else {
            Ok(Cow::Borrowed(v.try_extract_tensor::<f32>()?.1))
        }
    }

    /// Whether weight `name` is bound as f16 (an fp16 graph input).
    pub(crate) fn is_half(&self, name: &str) -> bool {
        self.half.contains(name)
    }

    /// The weights bound as f16.
    pub(crate) fn half_set(&self) -> &HashSet<String> {
        &self.half
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

impl Drop for MergedWeights {
    fn drop(&mut self) {
        // device buffers are freed beside a capture, not during one (crate::device::beside_capture)
        if !self.device.is_empty() {
            let _gpu = crate::device::beside_capture();
            self.device.clear();
        }
    }
}

/// A fresh [`MergedWeights::id`].
fn next_merge_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    // new buffers, possibly where a dropped set's were: fp8 weight copies are made again
    crate::fp8::weights_changed();
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

impl MergedWeights {
    /// A set merged on the host: the touched weights' values, as their graph inputs want them.
    pub(crate) fn on_host(merged: HashMap<String, DynValue>, merge_time: Duration) -> Self {
        MergedWeights {
            id: next_merge_id(),
            merged,
            device: HashMap::new(),
            merge_time,
        }
    }

    /// A set merged on the GPU: the touched weights' device buffers.
    pub(crate) fn on_device(device: HashMap<String, DevBuf>, merge_time: Duration) -> Self {
        MergedWeights {
            id: next_merge_id(),
            merged: HashMap::new(),
            device,
            merge_time,
        }
    }

    /// Which merge made this set (0: none); equal ids hold equal weights.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether a LoRA touched a text encoder's weights.
    pub fn touches_text(&self) -> bool {
        self.names().any(crate::lora::is_text_weight)
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
        let v = self.get(pristine, name)?;
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
    pub fn get<'a>(&'a self, pristine: &'a Weights, name: &str) -> Result<&'a DynValue> {
        match self.merged.get(name) {
            Some(v) => Ok(v),
            None => pristine.pristine(name),
        }
    }
}

/// An ONNX Runtime value for a weight, f32 or converted to f16 (for fp16 graph inputs).
pub(crate) fn make_value(shape: &[usize], data: Vec<f32>, half: bool) -> Result<DynValue> {
    HostData::new(data, half).into_value(shape)
}

/// A weight's values as a graph takes them (f16 for fp16 graph inputs), before they become an
/// ONNX Runtime value (which stays on the thread that makes it).
pub(crate) enum HostData {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

impl HostData {
    pub(crate) fn new(data: Vec<f32>, half: bool) -> Self {
        use half::slice::HalfFloatSliceExt;
        if half {
            let mut h = vec![half::f16::ZERO; data.len()];
            // F16C SIMD where the CPU has it
            h.convert_from_f32_slice(&data);
            HostData::F16(h)
        } else {
            HostData::F32(data)
        }
    }

    /// A weight as stored in a bundle's file (`dtype`, little-endian `bytes`), as its graph
    /// input takes it: f16 bits copied when both are f16, converted otherwise.
    pub(crate) fn from_file(dtype: safetensors::Dtype, bytes: &[u8], half: bool) -> Option<Self> {
        if half && dtype == safetensors::Dtype::F16 {
            let bits: Vec<half::f16> = bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]))
                .collect();
            return Some(HostData::F16(bits));
        }
        to_f32(dtype, bytes).map(|d| HostData::new(d, half))
    }

    pub(crate) fn into_value(self, shape: &[usize]) -> Result<DynValue> {
        Ok(match self {
            HostData::F16(h) => OrtTensor::from_array((shape.to_vec(), h))?.into_dyn(),
            HostData::F32(d) => OrtTensor::from_array((shape.to_vec(), d))?.into_dyn(),
        })
    }
}
