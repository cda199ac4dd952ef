//! LoRA-targetable weights: graph inputs bound from buffers katz owns.
//!
//! The pristine set is read once from the bundle's `weights.safetensors`; a job with LoRAs gets a
//! [`MergedWeights`] set holding `W + Σ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ` for the layers its LoRAs touch, and the
//! pristine tensors for the rest. Sessions are never rebuilt and the pristine set never changes.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use katz_kernels::lora::{merge_into, Factor};
use ort::value::{DynValue, Tensor as OrtTensor};
use safetensors::{Dtype, SafeTensors};

use crate::bundle::{BaseBundle, WeightEntry};
use crate::lora::LoraAdapter;
use crate::{Error, Result};

/// Converts a safetensors tensor to f32 (f32, f16 and bf16 are read).
pub(crate) fn to_f32(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    match dtype {
        Dtype::F32 => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::F16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        Dtype::BF16 => Some(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
        ),
        _ => None,
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

    /// Merges LoRAs (each with its scale) into a new set of the touched weights.
    pub fn merge(&self, loras: &[(Arc<LoraAdapter>, f32)]) -> Result<MergedWeights> {
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
            merged,
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
    merged: HashMap<String, DynValue>,
    /// Wall time of the merge that made this set.
    pub merge_time: Duration,
}

impl MergedWeights {
    /// Names of the weights a LoRA touched.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.merged.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.merged.len()
    }

    pub fn is_empty(&self) -> bool {
        self.merged.is_empty()
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
        let (tx, rx) = PendingMerge::channel();
        std::thread::Builder::new()
            .name("lora-merge".into())
            .spawn(move || tx.send(weights.merge(&loras).map(Arc::new)))
            .expect("spawning the LoRA merge thread");
        rx
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
