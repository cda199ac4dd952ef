//! `katz bench lora-merge`: how long merging a LoRA set into a model's LoRA-targetable weights
//! takes (`W' = W + Σᵢ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ`, the work a LoRA switch costs), against the
//! memory-bound floor. The GPU half is in `lora_merge_gpu.rs`; both end in one [`Measured`], from
//! which [`report`] makes the JSON.
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
use clap::{Args, ValueEnum};
use katz_kernels::cuda::MergeKernel;
use katz_onnx::bundle::{BaseBundle, WeightEntry};
use katz_onnx::lora::LoraAdapter;
use katz_onnx::runtime::Device;
use serde_json::{json, Value};

use super::lora_merge_gpu::gpu_bench;
use super::stats::{cpu_model, median_min, ms, round3};
use crate::cmd::generate::LoraSpec;
use crate::cmd::write_json;

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
    /// Merge kernel on the GPU: tiled (CUDA cores), mma (tensor cores, 3×TF32), mma-f16 (tensor
    /// cores, fp16 operands: exact for fp16 LoRA factors), mma-f16-packed (the same on factors
    /// packed into fp16 once, at upload), mma-f16-persistent (packed, persistent blocks that
    /// load the next tile's weights while a tile multiplies) or naive.
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
pub(super) struct Loaded {
    pub(super) adapter: Arc<LoraAdapter>,
    pub(super) scale: f32,
    pub(super) file_bytes: u64,
}

pub fn lora_merge(a: LoraMergeArgs) -> anyhow::Result<()> {
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
    let measured = match a.device {
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
    let report = report(&a, &measured, source);
    print_report(&report);
    if let Some(out) = &a.out {
        write_json(out, &report)?;
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
pub(super) fn load_loras(
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
pub(super) fn read_files(a: &LoraMergeArgs) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    for l in &a.loras {
        let bytes = std::fs::read(&l.file).with_context(|| format!("reading {}", l.file.display()))?;
        std::hint::black_box(bytes);
    }
    Ok(t0.elapsed())
}

/// What the LoRA set touches: layer name → shape, with the set's factor bytes and FLOPs.
pub(super) struct Touched {
    pub(super) layers: BTreeMap<String, (usize, usize)>,
    pub(super) params: u64,
    pub(super) factor_bytes: u64,
    pub(super) flops: u64,
}

pub(super) fn touched(loras: &[Loaded], map: &BTreeMap<String, WeightEntry>) -> anyhow::Result<Touched> {
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
            ensure!(
                matches!(shape.len(), 2 | 4),
                "`{name}` has shape {shape:?}, not [out, in] or [out, in, kh, kw]"
            );
            // a convolution merges as [out, in·kh·kw]
            let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>());
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

/// What one run measured, on the CPU or a GPU.
pub(super) struct Measured {
    pub(super) machine: String,
    pub(super) device: String,
    pub(super) dtype: &'static str,
    pub(super) kernel: String,
    pub(super) pristine_weights: &'static str,
    /// Layers merged.
    pub(super) layers: usize,
    pub(super) touched: Touched,
    pub(super) loras: Vec<Loaded>,
    /// Bytes of one weight element.
    pub(super) elem_bytes: u64,
    /// (a) read + parse, and the files read once more.
    pub(super) parse: Duration,
    pub(super) read: Duration,
    /// (c) the first merge, and the median and minimum (ms) of the timed ones.
    pub(super) first: Duration,
    pub(super) median: f64,
    pub(super) min: f64,
    /// Memory bandwidth (bytes read + written per second) and how it was measured.
    pub(super) bandwidth: f64,
    pub(super) bandwidth_method: String,
    pub(super) on: On,
}

/// What only one kind of device measures.
pub(super) enum On {
    Cpu {
        threads: usize,
    },
    Gpu {
        /// (b) factors to the device: from the parsed vectors, and from page-locked memory.
        upload: Duration,
        upload_pinned: Duration,
        /// The packed kernel's factors packed once (fp16, k-contiguous), as a worker keeps them.
        pack: Option<Duration>,
        spot_check_rel_err: f64,
    },
}

/// The JSON report of a run (`weights_from`: where the weight map came from).
fn report(a: &LoraMergeArgs, m: &Measured, weights_from: String) -> Value {
    let t = &m.touched;
    let bytes_w = t.params * m.elem_bytes;
    let bytes = 2 * bytes_w + t.factor_bytes;
    let floor = bytes as f64 / m.bandwidth * 1e3;
    let mut r = json!({
        "bench": "lora-merge",
        "katz": env!("CARGO_PKG_VERSION"),
        "machine": m.machine,
        "device": m.device,
        "dtype": m.dtype,
        "kernel": m.kernel,
        "pristine_weights": m.pristine_weights,
        "layers": m.layers,
        "parameters_merged": t.params,
        "ranks": all_ranks(&m.loras),
        "loras": lora_info(&m.loras),
        "repeat": a.repeat,
        "timings_ms": {
            "parse_host": round3(ms(m.parse)),
            "read_files_again": round3(ms(m.read)),
            "merge_median": round3(m.median),
            "merge_min": round3(m.min),
            "merge_first": round3(ms(m.first)),
        },
        "bytes": {
            "weights_read": bytes_w,
            "weights_written": bytes_w,
            "factors_read": t.factor_bytes,
            "total": bytes,
        },
        "bandwidth_gb_s": round3(m.bandwidth / 1e9),
        "bandwidth_method": m.bandwidth_method,
        "floor_ms": round3(floor),
        "merge_over_floor": round3(m.median / floor),
        "flop": t.flops,
        "weights_from": weights_from,
    });
    match m.on {
        On::Cpu { threads } => {
            r["threads"] = json!(threads);
            r["kernel_note"] = json!("katz_kernels::lora::merge_into through Weights::merge (rayon), making the ONNX Runtime tensors included");
            r["timings_ms"]["total_cold"] = json!(round3(ms(m.parse) + m.median));
        }
        On::Gpu {
            upload,
            upload_pinned,
            pack,
            spot_check_rel_err,
        } => {
            r["factors"] = json!(match pack {
                Some(_) => "f32 on the device, packed once into fp16 (pack_factors_f16, not in the merge time), f32 accumulation",
                None => "f32 on the device, f32 accumulation",
            });
            r["timings_ms"]["upload_factors_h2d"] = json!(round3(ms(upload)));
            if let Some(p) = pack {
                r["timings_ms"]["pack_factors_f16"] = json!(round3(ms(p)));
            }
            r["timings_ms"]["upload_factors_h2d_pinned"] = json!(round3(ms(upload_pinned)));
            r["timings_ms"]["total_cold"] = json!(round3(ms(m.parse) + ms(upload) + m.median));
            r["timing_method"] = json!("host clock around each step with a stream synchronize; a merge is one launch plus its small \
            metadata copies; upload_factors_h2d: as a worker uploads a cold LoRA, one copy per factor from the parsed (pageable) \
            vectors; upload_factors_h2d_pinned: all factors in one copy from page-locked memory already allocated \
            (the PCIe rate); read_files_again: the LoRA files read once more (OS page cache as (a) left it)");
            r["merge_tflop_s"] = json!(round3(t.flops as f64 / (m.median / 1e3) / 1e12));
            r["spot_check_rel_err"] = json!(spot_check_rel_err);
        }
    }
    r
}

fn cpu_bench(a: &LoraMergeArgs) -> anyhow::Result<Measured> {
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
        let (median, _) = median_min(&times);
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
    let (median, min) = median_min(&times);
    Ok(Measured {
        machine: cpu_model().unwrap_or_else(|| "unknown CPU".into()),
        device: "cpu".into(),
        dtype: "f32",
        kernel: "cpu".into(),
        pristine_weights: "the bundle's own",
        layers: merged_layers,
        touched: t,
        loras,
        elem_bytes: 4,
        parse,
        read,
        first,
        median,
        min,
        bandwidth: bw,
        bandwidth_method: format!(
            "host copy of {} MiB, median of 5 after 2 warm-ups; (bytes read + written) / time",
            a.bandwidth_mib
        ),
        on: On::Cpu {
            threads: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        },
    })
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
}
