//! A bundle's `weights.safetensors`, mapped and checked against the manifest: host values are
//! made from the map, and a GPU set is streamed from it into device buffers.
//!
//! ```text
//! weights.safetensors ─mmap─▶ WeightFile { slot per weight: dtype, byte range }
//!   host_data(name)  ─copy (f16 as stored) or convert─▶ HostData
//!   upload(gpu)      ─ device buffers, one per weight (allocated on the kernels' stream)
//!                    ─ weights split by bytes over up to UPLOAD_THREADS threads, each with its
//!                      own stream and two pinned chunks: page cache ─copy─▶ pinned chunk
//!                      ─async copy─▶ device, the other chunk filling meanwhile
//! ```
//!
//! A weight stored as its graph takes it (f16 for an fp16 input, f32 for an f32 one) is copied
//! byte for byte; any other is converted on the host first (older bundles).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::DevicePtrMut;
use katz_kernels::cuda::{GpuKernels, PinnedUpload, PINNED_CHUNK};
use safetensors::{Dtype, SafeTensors};

use super::{DevBuf, DeviceWeights, HostData};
use crate::bundle::WeightsSpec;
use crate::device::gpu_err;
use crate::dtype::to_f32;
use crate::{Error, Result};

/// Threads that stream a GPU set (each with its own stream and two pinned chunks).
const UPLOAD_THREADS: usize = 8;

/// Where one weight lies in the file.
struct Slot {
    dtype: Dtype,
    bytes: Range<usize>,
}

pub(super) struct WeightFile {
    path: PathBuf,
    map: memmap2::Mmap,
    slots: HashMap<String, Slot>,
}

impl WeightFile {
    /// Checks the mapped file against the manifest's weight map: every weight present with its
    /// shape and a readable type, and no weight the map does not name.
    pub(super) fn read(path: &Path, map: memmap2::Mmap, spec: &WeightsSpec) -> Result<Self> {
        let st = SafeTensors::deserialize(&map)
            .map_err(|e| Error::bundle(path, format!("not a safetensors file: {e}")))?;
        let base = map.as_ptr() as usize;
        let mut slots = HashMap::with_capacity(spec.map.len());
        for (name, entry) in &spec.map {
            let t = st.tensor(name).map_err(|_| {
                Error::bundle(
                    path,
                    format!("manifest names weight `{name}`, which the file lacks"),
                )
            })?;
            if t.shape() != entry.shape.as_slice() {
                return Err(Error::bundle(
                    path,
                    format!(
                        "weight `{name}` has shape {:?}, the manifest says {:?}",
                        t.shape(),
                        entry.shape
                    ),
                ));
            }
            let readable = matches!(t.dtype(), Dtype::F32 | Dtype::F16 | Dtype::BF16);
            if !readable {
                return Err(Error::bundle(
                    path,
                    format!("weight `{name}` has unsupported dtype {:?}", t.dtype()),
                ));
            }
            let start = t.data().as_ptr() as usize - base;
            slots.insert(
                name.clone(),
                Slot {
                    dtype: t.dtype(),
                    bytes: start..start + t.data().len(),
                },
            );
        }
        let extra: Vec<String> = st
            .names()
            .into_iter()
            .filter(|n| !spec.map.contains_key(*n))
            .map(String::from)
            .collect();
        if !extra.is_empty() {
            return Err(Error::bundle(
                path,
                format!(
                    "{} weights are not in the manifest's map (first: {})",
                    extra.len(),
                    extra[0]
                ),
            ));
        }
        Ok(WeightFile {
            path: path.into(),
            map,
            slots,
        })
    }

    fn bytes(&self, name: &str) -> (&Slot, &[u8]) {
        let s = &self.slots[name];
        (s, &self.map[s.bytes.clone()])
    }

    /// Weight `name` as its graph input takes it (f16 when `half`).
    pub(super) fn host_data(&self, name: &str, half: bool) -> Result<HostData> {
        let (slot, bytes) = self.bytes(name);
        HostData::from_file(slot.dtype, bytes, half).ok_or_else(|| {
            Error::bundle(
                &self.path,
                format!("weight `{name}` has unsupported dtype {:?}", slot.dtype),
            )
        })
    }

    /// Weight `name` as the bytes its graph input takes: borrowed from the file when it is
    /// stored so, converted otherwise.
    fn device_bytes(&self, name: &str, half: bool) -> Result<std::borrow::Cow<'_, [u8]>> {
        let (slot, bytes) = self.bytes(name);
        let as_stored = match slot.dtype {
            Dtype::F16 => half,
            Dtype::F32 => !half,
            _ => false,
        };
        if as_stored {
            return Ok(std::borrow::Cow::Borrowed(bytes));
        }
        let data = to_f32(slot.dtype, bytes).ok_or_else(|| {
            Error::bundle(
                &self.path,
                format!("weight `{name}` has unsupported dtype {:?}", slot.dtype),
            )
        })?;
        Ok(std::borrow::Cow::Owned(match HostData::new(data, half) {
            HostData::F16(h) => h.iter().flat_map(|x| x.to_le_bytes()).collect(),
            HostData::F32(d) => d.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }))
    }

    /// Streams every weight to GPU `ordinal` (f16 for those in `half`) into buffers of its own.
    pub(super) fn upload(&self, ordinal: i32, half: &HashSet<String>) -> Result<DeviceWeights> {
        let t0 = Instant::now();
        let kernels = Arc::new(
            GpuKernels::new(ordinal as usize).map_err(|e| Error::DeviceUnavailable {
                device: format!("cuda:{ordinal}"),
                message: format!("the LoRA merge kernels cannot start: {e}"),
            })?,
        );
        let kernels_ms = t0.elapsed().as_millis() as u64;
        let t0 = Instant::now();
        let names: BTreeMap<&str, usize> = self
            .slots
            .iter()
            .map(|(n, s)| (n.as_str(), elements(s)))
            .collect();
        let mut bufs: Vec<(String, DevBuf)> = Vec::with_capacity(names.len());
        for (&name, &n) in &names {
            // SAFETY: every byte is written below before any job reads the buffer
            let b = if half.contains(name) {
                DevBuf::F16(unsafe { kernels.stream.alloc::<u16>(n) }.map_err(gpu_err)?)
            } else {
                DevBuf::F32(unsafe { kernels.stream.alloc::<f32>(n) }.map_err(gpu_err)?)
            };
            bufs.push((name.to_string(), b));
        }
        // the copy streams write into buffers allocated on the kernels' stream
        kernels.synchronize().map_err(gpu_err)?;
        let groups = split_by_bytes(bufs, UPLOAD_THREADS, |(_, b)| b.bytes());
        let total: usize = groups.iter().flatten().map(|(_, b)| b.bytes()).sum();
        let done: Vec<Result<Vec<(String, DevBuf)>>> = std::thread::scope(|sc| {
            let handles: Vec<_> = groups
                .into_iter()
                .map(|group| {
                    let k = &kernels;
                    sc.spawn(move || self.stream_group(k, group, half))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Gpu("a weight upload thread panicked".into())))
                })
                .collect()
        });
        let mut values = HashMap::with_capacity(names.len());
        for group in done {
            values.extend(group?);
        }
        let upload_ms = t0.elapsed().as_millis() as u64;
        tracing::info!(
            device = ordinal,
            mib = total >> 20,
            kernels_ms,
            upload_ms,
            "weights on the GPU"
        );
        Ok(DeviceWeights {
            kernels,
            ordinal,
            values,
        })
    }

    /// One upload thread: its weights through two pinned chunks on a stream of its own.
    fn stream_group(
        &self,
        k: &GpuKernels,
        mut group: Vec<(String, DevBuf)>,
        half: &HashSet<String>,
    ) -> Result<Vec<(String, DevBuf)>> {
        if group.is_empty() {
            return Ok(group);
        }
        k.ctx.bind_to_thread().map_err(gpu_err)?;
        let stream = k.ctx.new_stream().map_err(gpu_err)?;
        let largest = group.iter().map(|(_, b)| b.bytes()).max().unwrap_or(0);
        let mut up = PinnedUpload::new(&k.ctx, &stream, largest.clamp(1, PINNED_CHUNK)).map_err(gpu_err)?;
        for (name, buf) in &mut group {
            let src = self.device_bytes(name, half.contains(name.as_str()))?;
            let dst = match buf {
                DevBuf::F16(b) => b.device_ptr_mut(&stream).0,
                DevBuf::F32(b) => b.device_ptr_mut(&stream).0,
            };
            // SAFETY: `dst` holds the weight's bytes, as many as `src`
            unsafe { up.copy_to(&src, dst) }.map_err(gpu_err)?;
        }
        up.finish().map_err(gpu_err)?;
        Ok(group)
    }
}

/// Elements of a weight (its device buffer holds as many, in the type its graph takes).
fn elements(s: &Slot) -> usize {
    let stored = match s.dtype {
        Dtype::F32 => 4,
        _ => 2,
    };
    (s.bytes.end - s.bytes.start) / stored
}

/// `items` in at most `n` groups of about equal `size` (largest first, each to the lightest
/// group so far).
fn split_by_bytes<T>(mut items: Vec<T>, n: usize, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    items.sort_by_key(|t| std::cmp::Reverse(size(t)));
    let n = n.clamp(1, items.len().max(1));
    let mut groups: Vec<(usize, Vec<T>)> = (0..n).map(|_| (0, Vec::new())).collect();
    for item in items {
        // n ≥ 1 groups: there is always a lightest one
        if let Some(g) = groups.iter_mut().min_by_key(|(bytes, _)| *bytes) {
            g.0 += size(&item);
            g.1.push(item);
        }
    }
    groups.into_iter().map(|(_, g)| g).collect()
}

#[cfg(test)]
mod tests {
    use super::split_by_bytes;

    #[test]
    fn groups_balance_bytes_and_keep_every_item() {
        let groups = split_by_bytes(vec![1usize, 9, 3, 7, 5], 2, |s| *s);
        let loads: Vec<usize> = groups.iter().map(|g| g.iter().sum()).collect();
        assert_eq!(loads, [13, 12]);
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 5);
        // more threads than weights: one group per weight
        assert_eq!(split_by_bytes(vec![4usize, 2], 8, |s| *s).len(), 2);
        assert_eq!(split_by_bytes(Vec::<usize>::new(), 8, |s| *s).len(), 1);
    }
}
