//! `katz bench`: measurements of katz's building blocks, one nested subcommand each.
//!
//! `katz bench lora-merge` times merging a LoRA set into a model's LoRA-targetable weights
//! (`W' = W + Σᵢ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ`, the work a LoRA switch costs):
//!
//! ```text
//!  --shapes FILE (name → [out, in])  or  --bundle DIR (its weight map)   ─▶ weight map
//!  --lora FILE[:SCALE] …  ─(a) read + parse on the host (LoraAdapter::load: a host-cache miss)
//!
//!  GPU (--device cuda:N, --dtype f32|f16)
//!    dtod copy of a 1 GiB buffer, median of 10 ─▶ bandwidth B (bytes read + written per second)
//!    pristine W of every touched layer: seeded random values uploaded once (the values do not
//!      change the arithmetic), plus one output buffer per layer
//!    (b) factors H2D (a device-cache miss): per factor from the parsed vectors, and once more
//!        from page-locked memory in one copy (what a host cache that keeps them pinned pays)
//!    (c) ONE merge launch over all layers, --repeat times
//!    total cold = (a) + (b) + median (c);  floor = (W read + out written + factors read) / B
//!
//!  CPU (--device cpu, needs --bundle and ONNX Runtime)
//!    the bundle's pristine weights (Weights::load) ─▶ Weights::merge, --repeat times
//! ```
//!
//! Prints a table and, with `--out`, writes the numbers as JSON (docs/bench/).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::{Args, Subcommand, ValueEnum};
use katz_kernels::cuda::{GpuFactor, GpuKernels, GpuMergeLayer, MergeElem, MergeKernel};
use katz_onnx::bundle::{BaseBundle, WeightEntry};
use katz_onnx::lora::LoraAdapter;
use katz_onnx::runtime::Device;
use serde_json::{json, Value};

use super::generate::LoraSpec;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub bench: Bench,
}

#[derive(Subcommand, Debug, Clone)]
pub enum Bench {
    /// Time merging a LoRA set into the weights it targets, on the CPU or one GPU.
    LoraMerge(LoraMergeArgs),
    /// Image quality of asynchronous LoRA loading: async at bound K vs sync (relative difference, SSIM).
    LoraBound(super::bench_lora::LoraBoundArgs),
    /// LoRA cache loads per request under the Katz trace's statistics (LRU, LFU, 1…N entries).
    LoraCache(super::bench_lora::LoraCacheArgs),
    /// Per-step time with 0…3 ControlNets: in-process serial, parallel threads, service over Redis.
    Controlnet(super::bench_controlnet::ControlNetBenchArgs),
    /// End-to-end and per-stage times of whole generations (0C/0L, 1C/1L, 3C/2L) on one bundle,
    /// with a diffusers baseline from the same sitting.
    Pipeline(super::bench_pipeline::PipelineBenchArgs),
}

pub fn run(a: BenchArgs) -> anyhow::Result<()> {
    match a.bench {
        Bench::LoraMerge(a) => lora_merge(a),
        Bench::LoraBound(a) => super::bench_lora::lora_bound(a),
        Bench::LoraCache(a) => super::bench_lora::lora_cache(a),
        Bench::Controlnet(a) => super::bench_controlnet::run(a),
        Bench::Pipeline(a) => super::bench_pipeline::run(a),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    F32,
    F16,
}

#[derive(Args, Debug, Clone)]
#[command(group(clap::ArgGroup::new("weights").required(true).args(["shapes", "bundle"])))]
pub struct LoraMergeArgs {
    /// JSON object: weight name (`<UNet module>.weight`) → [out, in]. GPU only.
    #[arg(long)]
    pub shapes: Option<PathBuf>,
    /// Base-model bundle: its weight map (GPU) or its pristine weights (CPU).
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// LoRA file (diffusers/peft layout) and its scale (default 1); repeat for a set.
    #[arg(long = "lora", required = true)]
    pub loras: Vec<LoraSpec>,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: Device,
    /// Weight type on the GPU (factors and accumulation are f32 either way); the CPU merges f32.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: Dtype,
    /// Merge kernel on the GPU: tiled (CUDA cores), mma (tensor cores, 3×TF32) or naive.
    #[arg(long, default_value = "tiled")]
    pub kernel: MergeKernel,
    /// Timed merges (after one warm-up).
    #[arg(long, default_value_t = 10)]
    pub repeat: usize,
    /// Seed of the random pristine weights (GPU).
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    /// Size of the buffer copied to measure memory bandwidth, MiB.
    #[arg(long, default_value_t = 1024)]
    pub bandwidth_mib: usize,
    /// Write the results here as JSON.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// A LoRA read from its file, with its scale and how long reading it took.
struct Loaded {
    adapter: Arc<LoraAdapter>,
    scale: f32,
    file_bytes: u64,
}

fn lora_merge(a: LoraMergeArgs) -> anyhow::Result<()> {
    ensure!(a.repeat >= 1, "--repeat must be at least 1");
    ensure!(a.bandwidth_mib >= 1, "--bandwidth-mib must be at least 1");
    for l in &a.loras {
        ensure!(
            l.scale.is_finite(),
            "LoRA {}: scale {} is not finite",
            l.file.display(),
            l.scale
        );
    }
    let (map, source) = weight_map(&a)?;
    let report = match a.device {
        Device::Cpu => {
            ensure!(
                a.dtype == Dtype::F32,
                "--dtype f16 is for GPUs: the CPU merges f32 weights"
            );
            cpu_bench(&a)?
        }
        Device::Cuda(ordinal) => {
            let ordinal = usize::try_from(ordinal).context("the GPU index must not be negative")?;
            match a.dtype {
                Dtype::F32 => gpu_bench::<f32>(&a, &map, ordinal)?,
                Dtype::F16 => gpu_bench::<u16>(&a, &map, ordinal)?,
            }
        }
        Device::TensorRt(_) => bail!("lora-merge runs on cpu or cuda:N (TensorRT does not merge)"),
    };
    let mut report = report;
    report["weights_from"] = json!(source);
    print_report(&report);
    if let Some(out) = &a.out {
        if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(&report)? + "\n";
        std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
        println!("wrote {}", out.display());
    }
    Ok(())
}

/// The weight map the LoRAs are checked against, and where it came from.
fn weight_map(a: &LoraMergeArgs) -> anyhow::Result<(BTreeMap<String, WeightEntry>, String)> {
    if let Some(dir) = &a.bundle {
        let b = BaseBundle::open(dir).with_context(|| format!("opening bundle {}", dir.display()))?;
        return Ok((b.manifest.weights.map, format!("bundle {}", dir.display())));
    }
    let Some(path) = &a.shapes else {
        bail!("pass --shapes FILE or --bundle DIR");
    };
    if a.device == Device::Cpu {
        bail!("the CPU bench merges a bundle's own weights: pass --bundle DIR, not --shapes");
    }
    Ok((read_shapes(path)?, format!("shapes {}", path.display())))
}

/// `{"name": [out, in], …}` → weight map.
fn read_shapes(path: &Path) -> anyhow::Result<BTreeMap<String, WeightEntry>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let raw: BTreeMap<String, Vec<usize>> = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: expected a JSON object of weight name → [out, in]",
            path.display()
        )
    })?;
    ensure!(!raw.is_empty(), "{}: no weights", path.display());
    let mut map = BTreeMap::new();
    for (name, shape) in raw {
        ensure!(
            shape.len() == 2 && shape.iter().all(|&d| d > 0),
            "{}: `{name}` has shape {shape:?}, expected [out, in] of positive sizes",
            path.display()
        );
        let graph = if name.starts_with("up_blocks.") {
            "unet_decoder"
        } else {
            "unet_encoder"
        };
        map.insert(
            name,
            WeightEntry {
                graph: graph.into(),
                shape,
            },
        );
    }
    Ok(map)
}

/// (a): reads and parses every LoRA file.
fn load_loras(
    a: &LoraMergeArgs,
    map: &BTreeMap<String, WeightEntry>,
) -> anyhow::Result<(Vec<Loaded>, Duration)> {
    let t0 = Instant::now();
    let mut out = Vec::new();
    for l in &a.loras {
        let adapter =
            LoraAdapter::load(&l.file, map).with_context(|| format!("reading LoRA {}", l.file.display()))?;
        let file_bytes = std::fs::metadata(&l.file).map(|m| m.len()).unwrap_or(0);
        out.push(Loaded {
            adapter: Arc::new(adapter),
            scale: l.scale,
            file_bytes,
        });
    }
    Ok((out, t0.elapsed()))
}

/// The LoRA files read once more, without parsing: how much of (a) is reading.
fn read_files(a: &LoraMergeArgs) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    for l in &a.loras {
        let bytes = std::fs::read(&l.file).with_context(|| format!("reading {}", l.file.display()))?;
        std::hint::black_box(bytes);
    }
    Ok(t0.elapsed())
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

/// What the LoRA set touches: layer name → shape, with the set's factor bytes and FLOPs.
struct Touched {
    layers: BTreeMap<String, (usize, usize)>,
    params: u64,
    factor_bytes: u64,
    flops: u64,
}

fn touched(loras: &[Loaded], map: &BTreeMap<String, WeightEntry>) -> anyhow::Result<Touched> {
    let mut t = Touched {
        layers: BTreeMap::new(),
        params: 0,
        factor_bytes: 0,
        flops: 0,
    };
    for l in loras {
        for (name, layer) in &l.adapter.layers {
            let shape = &map
                .get(name)
                .with_context(|| format!("LoRA layer `{name}` is not a weight of the map"))?
                .shape;
            ensure!(shape.len() == 2, "`{name}` has shape {shape:?}, not [out, in]");
            let (rows, cols) = (shape[0], shape[1]);
            t.layers.insert(name.clone(), (rows, cols));
            t.factor_bytes += ((rows + cols) * layer.rank * 4) as u64;
            t.flops += 2 * (rows * cols * layer.rank) as u64;
        }
    }
    t.params = t.layers.values().map(|&(r, c)| (r * c) as u64).sum();
    Ok(t)
}

fn lora_info(loras: &[Loaded]) -> Value {
    Value::Array(
        loras
            .iter()
            .map(|l| {
                let ranks: BTreeSet<usize> = l.adapter.layers.values().map(|x| x.rank).collect();
                let alphas: BTreeSet<String> = l
                    .adapter
                    .layers
                    .values()
                    .map(|x| format!("{}", x.alpha))
                    .collect();
                let factor_params: usize = l.adapter.layers.values().map(|x| x.a.len() + x.b.len()).sum();
                json!({
                    "file": l.adapter.path.display().to_string(),
                    "scale": l.scale,
                    "layers": l.adapter.layers.len(),
                    "ranks": ranks,
                    "alphas": alphas,
                    "factor_params": factor_params,
                    "file_bytes": l.file_bytes,
                })
            })
            .collect(),
    )
}

fn all_ranks(loras: &[Loaded]) -> BTreeSet<usize> {
    loras
        .iter()
        .flat_map(|l| l.adapter.layers.values().map(|x| x.rank))
        .collect()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Median and minimum, in ms.
fn stats(times: &[Duration]) -> (f64, f64) {
    let mut v: Vec<f64> = times.iter().map(|&d| ms(d)).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0])
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// SplitMix64: seeded values without another dependency (their values do not matter here).
struct SplitMix(u64);

impl SplitMix {
    fn next_f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // uniform in [-0.1, 0.1)
        ((z >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.2
    }
}

/// How a merge element is made from and read back as f32 on the host.
trait HostElem: MergeElem + Copy {
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

fn gpu_bench<T: HostElem>(
    a: &LoraMergeArgs,
    map: &BTreeMap<String, WeightEntry>,
    ordinal: usize,
) -> anyhow::Result<Value> {
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
        let (median, _) = stats(&times);
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

    // (b) factors to the device
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

    let layers: Vec<GpuMergeLayer<'_, T>> = t
        .layers
        .iter()
        .map(|(name, &(rows, cols))| {
            let (base, out) = &pristine[name];
            let factors = loras
                .iter()
                .zip(&factors)
                .filter_map(|(l, dev)| {
                    let layer = l.adapter.layers.get(name)?;
                    let (b, a_) = &dev[name];
                    Some(GpuFactor {
                        b,
                        a: a_,
                        rank: layer.rank,
                        coeff: l.scale * layer.alpha / layer.rank as f32,
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
    let (median, min) = stats(&times);
    let check = spot_check::<T>(&k, &layers, &t, &loras)?;

    let bytes_w = t.params * esize;
    let bytes = 2 * bytes_w + t.factor_bytes;
    let floor = bytes as f64 / bw * 1e3;
    let cold = ms(parse) + ms(upload) + median;
    Ok(json!({
        "bench": "lora-merge",
        "katz": env!("CARGO_PKG_VERSION"),
        "machine": gpu_name,
        "device": a.device.to_string(),
        "dtype": T::NAME,
        "kernel": a.kernel.to_string(),
        "pristine_weights": "seeded random values on the device: the arithmetic is what matters, not the values",
        "factors": "f32 on the device, f32 accumulation",
        "layers": t.layers.len(),
        "parameters_merged": t.params,
        "ranks": all_ranks(&loras),
        "loras": lora_info(&loras),
        "repeat": a.repeat,
        "timings_ms": {
            "parse_host": round3(ms(parse)),
            "upload_factors_h2d": round3(ms(upload)),
            "upload_factors_h2d_pinned": round3(ms(upload_pinned)),
            "read_files_again": round3(ms(read)),
            "merge_median": round3(median),
            "merge_min": round3(min),
            "merge_first": round3(ms(first)),
            "total_cold": round3(cold),
        },
        "timing_method": "host clock around each step with a stream synchronize; a merge is one launch plus its small \
            metadata copies; upload_factors_h2d: one copy per factor from the parsed (pageable) vectors; \
            upload_factors_h2d_pinned: all factors in one copy from page-locked memory, as a host cache that keeps \
            them pinned would; read_files_again: the LoRA files read once more (OS page cache as (a) left it)",
        "bytes": {
            "weights_read": bytes_w,
            "weights_written": bytes_w,
            "factors_read": t.factor_bytes,
            "total": bytes,
        },
        "bandwidth_gb_s": round3(bw / 1e9),
        "bandwidth_method": format!("device-to-device copy of {} MiB, median of 10 after 2 warm-ups; (bytes read + written) / time", a.bandwidth_mib),
        "floor_ms": round3(floor),
        "merge_over_floor": round3(median / floor),
        "merge_tflop_s": round3(t.flops as f64 / (median / 1e3) / 1e12),
        "flop": t.flops,
        "spot_check_rel_err": check,
    }))
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

fn cpu_bench(a: &LoraMergeArgs) -> anyhow::Result<Value> {
    let dir = a.bundle.as_ref().context("the CPU bench needs --bundle")?;
    let bundle = BaseBundle::open(dir).with_context(|| format!("opening bundle {}", dir.display()))?;
    let weights = katz_onnx::weights::Weights::load(&bundle, HashSet::new())
        .with_context(|| format!("loading the pristine weights of {}", dir.display()))?;
    let bw = {
        let n = a.bandwidth_mib << 20;
        let src = vec![1u8; n];
        let mut dst = vec![0u8; n];
        let mut times = Vec::new();
        for i in 0..7 {
            let t0 = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
            if i >= 2 {
                times.push(t0.elapsed());
            }
        }
        let (median, _) = stats(&times);
        2.0 * n as f64 / (median / 1e3)
    };
    let (loras, parse) = load_loras(a, weights.map())?;
    let read = read_files(a)?;
    let t = touched(&loras, weights.map())?;
    let set: Vec<(Arc<LoraAdapter>, f32)> = loras.iter().map(|l| (l.adapter.clone(), l.scale)).collect();
    let mut times = Vec::new();
    let mut merged_layers = 0;
    for _ in 0..=a.repeat {
        let t0 = Instant::now();
        let merged = weights.merge(&set).context("merge")?;
        times.push(t0.elapsed());
        merged_layers = merged.len();
    }
    let first = times.remove(0);
    let (median, min) = stats(&times);
    let bytes_w = t.params * 4;
    let bytes = 2 * bytes_w + t.factor_bytes;
    let floor = bytes as f64 / bw * 1e3;
    Ok(json!({
        "bench": "lora-merge",
        "katz": env!("CARGO_PKG_VERSION"),
        "machine": cpu_model(),
        "device": "cpu",
        "threads": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "dtype": "f32",
        "kernel": "cpu",
        "kernel_note": "katz_kernels::lora::merge_into through Weights::merge (rayon), making the ONNX Runtime tensors included",
        "pristine_weights": "the bundle's own",
        "layers": merged_layers,
        "parameters_merged": t.params,
        "ranks": all_ranks(&loras),
        "loras": lora_info(&loras),
        "repeat": a.repeat,
        "timings_ms": {
            "parse_host": round3(ms(parse)),
            "read_files_again": round3(ms(read)),
            "merge_median": round3(median),
            "merge_min": round3(min),
            "merge_first": round3(ms(first)),
            "total_cold": round3(ms(parse) + median),
        },
        "bytes": {
            "weights_read": bytes_w,
            "weights_written": bytes_w,
            "factors_read": t.factor_bytes,
            "total": bytes,
        },
        "bandwidth_gb_s": round3(bw / 1e9),
        "bandwidth_method": format!("host copy of {} MiB, median of 5 after 2 warm-ups; (bytes read + written) / time", a.bandwidth_mib),
        "floor_ms": round3(floor),
        "merge_over_floor": round3(median / floor),
        "flop": t.flops,
    }))
}

/// The CPU's model name from /proc/cpuinfo.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn print_report(r: &Value) {
    let f = |v: &Value| {
        v.as_f64()
            .map(|x| {
                if x != 0.0 && x.abs() < 1e-2 {
                    format!("{x:>10.2e}")
                } else {
                    format!("{x:>10.3}")
                }
            })
            .unwrap_or_else(|| format!("{:>10}", "—"))
    };
    let t = &r["timings_ms"];
    println!(
        "katz bench lora-merge on {} ({}, {}, kernel {})",
        r["machine"].as_str().unwrap_or("?"),
        r["device"].as_str().unwrap_or("?"),
        r["dtype"].as_str().unwrap_or("?"),
        r["kernel"].as_str().unwrap_or("?"),
    );
    println!(
        "  {} layers, {} parameters merged, ranks {}, {} LoRA(s)",
        r["layers"],
        r["parameters_merged"],
        r["ranks"],
        r["loras"].as_array().map(Vec::len).unwrap_or(0)
    );
    let rows = [
        ("(a) read + parse LoRAs (host)", &t["parse_host"], "ms"),
        ("    read the files again", &t["read_files_again"], "ms"),
        ("(b) upload factors (H2D)", &t["upload_factors_h2d"], "ms"),
        (
            "    from pinned memory, one copy",
            &t["upload_factors_h2d_pinned"],
            "ms",
        ),
        ("(c) merge, median", &t["merge_median"], "ms"),
        ("    merge, min", &t["merge_min"], "ms"),
        ("    merge, first", &t["merge_first"], "ms"),
        ("(d) total cold (a + b + c)", &t["total_cold"], "ms"),
        ("memory bandwidth", &r["bandwidth_gb_s"], "GB/s"),
        ("memory-bound floor", &r["floor_ms"], "ms"),
        ("merge / floor", &r["merge_over_floor"], "×"),
        ("merge arithmetic rate", &r["merge_tflop_s"], "TFLOP/s"),
        ("spot check rel. error", &r["spot_check_rel_err"], ""),
    ];
    for (name, v, unit) in rows {
        if !v.is_null() {
            println!("  {name:<32}{} {unit}", f(v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_files_are_checked() {
        let dir = std::env::temp_dir().join(format!("katz-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.json");
        std::fs::write(
            &good,
            r#"{"up_blocks.0.x.to_q.weight": [4, 6], "down_blocks.1.y.weight": [2, 3]}"#,
        )
        .unwrap();
        let m = read_shapes(&good).unwrap();
        assert_eq!(m["up_blocks.0.x.to_q.weight"].shape, vec![4, 6]);
        assert_eq!(m["up_blocks.0.x.to_q.weight"].graph, "unet_decoder");
        for (name, text) in [
            ("list.json", "[1, 2]"),
            ("rank3.json", r#"{"a.weight": [1, 2, 3]}"#),
            ("zero.json", r#"{"a.weight": [0, 2]}"#),
            ("empty.json", "{}"),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            assert!(read_shapes(&p).is_err(), "{name} was accepted");
        }
        assert!(read_shapes(&dir.join("missing.json")).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn stats_are_median_and_min() {
        let d = |x: u64| Duration::from_millis(x);
        assert_eq!(stats(&[d(5), d(1), d(3)]), (3.0, 1.0));
        assert_eq!(stats(&[d(4), d(2)]), (3.0, 2.0));
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
