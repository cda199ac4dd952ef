//! `katz bench lora-merge --device cuda:N`: the GPU half of the lora-merge bench (the CPU half
//! and the report are in `lora_merge.rs`).
//!
//! ```text
//! dtod copy of a 1 GiB buffer, median of 10 ─▶ bandwidth B (bytes read + written per second)
//! pristine W of every touched layer: seeded random values uploaded once, one output per layer
//! (b) factors H2D: per factor from the parsed vectors, then all in one copy from pinned memory
//! (c) ONE merge launch over all layers (GpuKernels::lora_merge_with), --repeat times
//! spot check: a sample of outputs of the first and last layer recomputed on the host (f64)
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use katz_kernels::cuda::{GpuFactor, GpuKernels, GpuMergeLayer, MergeElem, MergeKernel, PackedFactor};
use katz_onnx::bundle::WeightEntry;

use super::lora_merge::{load_loras, read_files, touched, Loaded, LoraMergeArgs, Measured, On, Touched};
use super::stats::{median_min, SplitMix};

/// How a merge element is made from and read back as f32 on the host.
pub(super) trait HostElem: MergeElem + Copy {
    const NAME: &'static str;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl HostElem for f32 {
    const NAME: &'static str = "f32";
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl HostElem for u16 {
    const NAME: &'static str = "f16";
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x).to_bits()
    }
    fn to_f32(self) -> f32 {
        half::f16::from_bits(self).to_f32()
    }
}

pub(super) fn gpu_bench<T: HostElem>(
    a: &LoraMergeArgs,
    map: &BTreeMap<String, WeightEntry>,
    ordinal: usize,
) -> anyhow::Result<Measured> {
    if !katz_kernels::cuda::cuda_available() {
        bail!(
            "--device cuda:{ordinal}: no usable CUDA here (libcuda and libnvrtc must load and a GPU must be \
             present; put NVRTC's lib directory on LD_LIBRARY_PATH)"
        );
    }
    let k = GpuKernels::new(ordinal).with_context(|| format!("starting CUDA on GPU {ordinal}"))?;
    let s = k.stream.clone();
    let gpu_name = k.ctx.name().context("reading the GPU's name")?;
    let esize = std::mem::size_of::<T>() as u64;

    // bandwidth first, so its buffers are gone before the weights arrive
    let bw = {
        let n = a.bandwidth_mib << 20;
        let src = s
            .alloc_zeros::<u8>(n)
            .context("allocating the bandwidth buffer")?;
        let mut dst = s
            .alloc_zeros::<u8>(n)
            .context("allocating the bandwidth buffer")?;
        let mut times = Vec::new();
        for i in 0..12 {
            s.synchronize()?;
            let t0 = Instant::now();
            s.memcpy_dtod(&src, &mut dst)?;
            s.synchronize()?;
            if i >= 2 {
                times.push(t0.elapsed());
            }
        }
        let (median, _) = median_min(&times);
        2.0 * n as f64 / (median / 1e3)
    };

    let (loras, parse) = load_loras(a, map)?;
    let read = read_files(a)?;
    let t = touched(&loras, map)?;
    let need = 2 * t.params * esize + t.factor_bytes;
    let (free, total_mem) = k.ctx.mem_get_info().context("reading the GPU's free memory")?;
    ensure!(
        need < free as u64,
        "the merge needs {:.1} GiB of GPU memory (pristine + merged weights, factors); {:.1} of {:.1} GiB are free",
        need as f64 / (1u64 << 30) as f64,
        free as f64 / (1u64 << 30) as f64,
        total_mem as f64 / (1u64 << 30) as f64
    );

    // pristine weights: a seeded random pool, uploaded at a different offset for each layer
    let max_layer = t.layers.values().map(|&(r, c)| r * c).max().unwrap_or(0);
    let mut rng = SplitMix(a.seed);
    let pool: Vec<T> = (0..max_layer + 4096)
        .map(|_| T::from_f32(rng.next_f32()))
        .collect();
    let mut pristine = BTreeMap::new();
    for (i, (name, &(rows, cols))) in t.layers.iter().enumerate() {
        let off = (i * 97) % 4096;
        let w = s
            .clone_htod(&pool[off..off + rows * cols])
            .with_context(|| format!("uploading `{name}`"))?;
        let o = s
            .alloc_zeros::<T>(rows * cols)
            .with_context(|| format!("allocating `{name}`"))?;
        pristine.insert(name.clone(), (w, o));
    }
    drop(pool);
    s.synchronize()?;

    // (b) factors to the device, as a worker uploads a cold LoRA: one copy per factor
    let t0 = Instant::now();
    let mut factors = Vec::new();
    for l in &loras {
        let mut per_layer = BTreeMap::new();
        for (name, layer) in &l.adapter.layers {
            let b = s
                .clone_htod(&layer.b)
                .with_context(|| format!("uploading B of `{name}`"))?;
            let a_ = s
                .clone_htod(&layer.a)
                .with_context(|| format!("uploading A of `{name}`"))?;
            per_layer.insert(name.clone(), (b, a_));
        }
        factors.push(per_layer);
    }
    s.synchronize()?;
    let upload = t0.elapsed();
    let upload_pinned = upload_pinned(&k, &loras)?;

    // the packed kernel reads factors packed once per LoRA, as a worker keeps them: packed here,
    // timed apart from the merges
    let t0 = Instant::now();
    let prepack = matches!(
        a.kernel,
        MergeKernel::MmaF16Packed | MergeKernel::MmaF16Persistent
    );
    let packed: Vec<BTreeMap<String, PackedFactor>> = if prepack {
        loras
            .iter()
            .zip(&factors)
            .map(|(l, dev)| {
                let names: Vec<&String> = l
                    .adapter
                    .layers
                    .iter()
                    .filter(|(n, x)| x.rank > 0 && t.layers.contains_key(*n))
                    .map(|(n, _)| n)
                    .collect();
                let items: Vec<_> = names
                    .iter()
                    .map(|n| {
                        let (b, a_) = &dev[*n];
                        let (rows, cols) = t.layers[*n];
                        (b, a_, rows, cols, l.adapter.layers[*n].rank)
                    })
                    .collect();
                let p = k.pack_factors_f16(&items).context("packing the factors")?;
                Ok(names.into_iter().cloned().zip(p).collect())
            })
            .collect::<anyhow::Result<_>>()?
    } else {
        loras.iter().map(|_| BTreeMap::new()).collect()
    };
    s.synchronize()?;
    let pack = prepack.then(|| t0.elapsed());

    let layers: Vec<GpuMergeLayer<'_, T>> = t
        .layers
        .iter()
        .map(|(name, &(rows, cols))| {
            let (base, out) = &pristine[name];
            let factors = loras
                .iter()
                .zip(&factors)
                .zip(&packed)
                .filter_map(|((l, dev), p)| {
                    let layer = l.adapter.layers.get(name)?;
                    let (b, a_) = &dev[name];
                    Some(GpuFactor {
                        b,
                        a: a_,
                        rank: layer.rank,
                        coeff: l.scale * layer.alpha / layer.rank as f32,
                        packed: p.get(name),
                    })
                })
                .collect();
            GpuMergeLayer {
                base,
                out,
                rows,
                cols,
                factors,
            }
        })
        .collect();

    // (c) the merge: the first (cold) launch, then --repeat timed ones
    let mut times = Vec::new();
    for _ in 0..=a.repeat {
        s.synchronize()?;
        let t0 = Instant::now();
        k.lora_merge_with(&layers, a.kernel).context("merge launch")?;
        k.synchronize().context("merge")?;
        times.push(t0.elapsed());
    }
    let first = times.remove(0);
    let (median, min) = median_min(&times);
    let check = spot_check::<T>(&k, &layers, &t, &loras)?;
    drop(layers);
    Ok(Measured {
        machine: gpu_name,
        device: a.device.to_string(),
        dtype: T::NAME,
        kernel: a.kernel.to_string(),
        pristine_weights:
            "seeded random values on the device: the arithmetic is what matters, not the values",
        layers: t.layers.len(),
        touched: t,
        loras,
        elem_bytes: esize,
        parse,
        read,
        first,
        median,
        min,
        bandwidth: bw,
        bandwidth_method: format!(
            "device-to-device copy of {} MiB, median of 10 after 2 warm-ups; (bytes read + written) / time",
            a.bandwidth_mib
        ),
        on: On::Gpu {
            upload,
            upload_pinned,
            pack,
            spot_check_rel_err: check,
        },
    })
}

/// (b) from page-locked memory: every factor of the set in one pinned buffer, one copy to the
/// device (the buffers are freed before the merges run).
fn upload_pinned(k: &GpuKernels, loras: &[Loaded]) -> anyhow::Result<Duration> {
    let n: usize = loras
        .iter()
        .flat_map(|l| l.adapter.layers.values())
        .map(|x| x.a.len() + x.b.len())
        .sum();
    // SAFETY: every element is written below before the buffer is read.
    let mut host = unsafe { k.ctx.alloc_pinned_with_flags::<f32>(n, 0) }
        .context("allocating page-locked memory for the factors")?;
    {
        let dst = host.as_mut_slice()?;
        let mut at = 0;
        for x in loras.iter().flat_map(|l| l.adapter.layers.values()) {
            for v in [&x.b, &x.a] {
                dst[at..at + v.len()].copy_from_slice(v);
                at += v.len();
            }
        }
    }
    let mut dev = k
        .stream
        .alloc_zeros::<f32>(n)
        .context("allocating the factors on the GPU")?;
    k.stream.synchronize()?;
    let t0 = Instant::now();
    k.stream.memcpy_htod(&host, &mut dev)?;
    k.stream.synchronize()?;
    Ok(t0.elapsed())
}

/// Recomputes a sample of outputs of the first and last layer on the host (f64) and returns the
/// largest relative error: the timed kernel computed the right thing.
fn spot_check<T: HostElem>(
    k: &GpuKernels,
    layers: &[GpuMergeLayer<'_, T>],
    t: &Touched,
    loras: &[Loaded],
) -> anyhow::Result<f64> {
    let mut worst = 0f64;
    let names: Vec<&String> = t.layers.keys().collect();
    for (idx, name) in [(0, names[0]), (layers.len() - 1, names[names.len() - 1])] {
        let l = &layers[idx];
        let base = k.stream.clone_dtoh(l.base).context("reading back a layer")?;
        let out = k.stream.clone_dtoh(l.out).context("reading back a layer")?;
        let n = l.rows * l.cols;
        let (mut num, mut den) = (0f64, 0f64);
        for i in 0..257 {
            let e = (i * 7919 + i * i * 31) % n;
            let (r, c) = (e / l.cols, e % l.cols);
            let mut want = base[e].to_f32() as f64;
            for lo in loras {
                if let Some(x) = lo.adapter.layers.get(name) {
                    let coeff = (lo.scale * x.alpha / x.rank as f32) as f64;
                    let dot: f64 = (0..x.rank)
                        .map(|q| x.b[r * x.rank + q] as f64 * x.a[q * l.cols + c] as f64)
                        .sum();
                    want += coeff * dot;
                }
            }
            num += (out[e].to_f32() as f64 - want).powi(2);
            den += want * want;
        }
        worst = worst.max(if den > 0.0 { (num / den).sqrt() } else { num.sqrt() });
    }
    Ok(worst)
}
