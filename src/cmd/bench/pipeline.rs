//! `katz bench pipeline`: end-to-end and per-stage times of whole generations on one bundle, for
//! configurations of ControlNets and LoRAs (`0C/0L`, `1C/1L`, `3C/2L`), against a diffusers
//! baseline measured in the same sitting (`tools/bench_diffusers.py --out F`, passed as
//! `--baseline F`).
//!
//! ```text
//! for each config:  warm-up run ─▶ R timed runs, each:
//!     read + parse the LoRA files (cold) ─▶ generate (text encoders, LoRA merge sync or async,
//!     50 steps of ControlNets + UNet, VAE) ─▶ end-to-end = parse + generate
//! table + JSON: medians per stage, UNet step, model FLOPs utilisation, ratio to diffusers
//! ```
//!
//! ControlNet `j` runs on `--controlnet-devices[j % len]` (default: the pipeline's device),
//! inline after the UNet encoder (`--controlnet-mode serial`) or on threads overlapping it
//! (`parallel`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use katz_onnx::lora::{LoraAdapter, LoraParts, PendingMerge};
use katz_onnx::pipeline::{Generated, LoraBound, LoraMode, LoraPlan, Pipeline, RunOptions};
use katz_onnx::placement::{ControlNetPlace, Placement};
use katz_onnx::request::{ControlRequest, LoraRequest, Request};
use katz_onnx::runtime::Device;
use katz_onnx::scheduler::SchedulerKind;
use katz_onnx::tensor::Tensor;
use serde_json::{json, Value};

use super::stats::median;
use crate::cmd::{write_json, DeviceArgs};

#[derive(Args, Debug, Clone)]
pub struct PipelineBenchArgs {
    /// Base bundle (e.g. the full-size SDXL bundle from `export_bundle.py --config sdxl --gpu`).
    #[arg(long)]
    pub bundle: PathBuf,
    /// ControlNet bundle, used for every ControlNet of a configuration.
    #[arg(long)]
    pub controlnet: Option<PathBuf>,
    /// LoRA files (diffusers/peft or kohya), the first N used by an N-LoRA configuration.
    #[arg(long, value_delimiter = ',')]
    pub loras: Vec<PathBuf>,
    /// Configurations as `<C>C/<L>L`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0C/0L,1C/1L,3C/2L")]
    pub configs: Vec<String>,
    #[arg(long, default_value_t = 1024)]
    pub size: usize,
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f32,
    /// Timed runs per configuration (after one warm-up).
    #[arg(long, default_value_t = 2)]
    pub repeat: usize,
    /// GPUs for the ControlNets (`cuda:1,cuda:2`); ControlNet j goes to entry j mod len. An
    /// entry `cuda:2/cuda:3` places it per guidance half (with --split-guidance: the
    /// unconditional half's ControlNet on cuda:2, the conditional half's on cuda:3; the paper's
    /// placement, one GPU per ControlNet per half).
    #[arg(long, value_delimiter = ',')]
    pub controlnet_devices: Vec<ControlNetPlace>,
    /// Latent parallelism: the conditional guidance half on this second GPU (e.g. `cuda:1`).
    #[arg(long)]
    pub split_guidance: Option<Device>,
    /// `serial`: after the UNet encoder, in the pipeline's thread; `parallel`: one thread per
    /// ControlNet session, overlapping the encoder.
    #[arg(long, default_value = "serial")]
    pub controlnet_mode: String,
    /// Fix the UNet and ControlNet graphs' shapes to this run's size and batch when the sessions
    /// are made (ONNX Runtime folds the shape arithmetic: no CPU shape ops between kernels).
    #[arg(long)]
    pub static_shapes: bool,
    /// CUDA graphs for the UNet encoder and decoder (needs --static-shapes and cuda:N): captured
    /// when the pipeline loads, replayed every step.
    #[arg(long)]
    pub cuda_graph: bool,
    #[arg(long, default_value = "async")]
    pub lora_mode: LoraMode,
    /// Bound step of an asynchronous merge (Katz: 10 of 50).
    #[arg(long, default_value = "10")]
    pub lora_bound: LoraBound,
    /// diffusers' JSON from `tools/bench_diffusers.py` in the same sitting.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// The UNet's arithmetic per image per step at 1024², TFLOP (full-size SDXL: 6.76, the design measurements);
    /// scaled by the latent area. Without it no FLOP rate is reported.
    #[arg(long)]
    pub unet_tflop: Option<f64>,
    /// The GPU's dense fp16/bf16 matrix rate, TFLOP/s, measured on the machine (for MFU).
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

fn parse_config(s: &str) -> anyhow::Result<(usize, usize)> {
    let bad = || anyhow::anyhow!("configuration `{s}` is not of the form 3C/2L");
    let (c, l) = s.split_once('/').ok_or_else(bad)?;
    let c = c.trim().trim_end_matches(['C', 'c']).parse().map_err(|_| bad())?;
    let l = l.trim().trim_end_matches(['L', 'l']).parse().map_err(|_| bad())?;
    Ok((c, l))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// A seeded conditioning image in [0, 1] (edges-like: sparse ones on zeros).
fn cond_image(size: usize, seed: u64) -> Tensor {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let data = (0..3 * size * size)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            if s.is_multiple_of(16) {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Tensor::new(vec![1, 3, size, size], data)
}

struct Run {
    parse: Duration,
    out: Generated,
    e2e: Duration,
}

pub fn run(a: PipelineBenchArgs) -> anyhow::Result<()> {
    let configs = a
        .configs
        .iter()
        .map(|c| parse_config(c))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let max_c = configs.iter().map(|c| c.0).max().unwrap_or(0);
    let max_l = configs.iter().map(|c| c.1).max().unwrap_or(0);
    if max_l > a.loras.len() {
        bail!(
            "a configuration takes {max_l} LoRAs, --loras gives {}",
            a.loras.len()
        );
    }
    if max_c > 0 && a.controlnet.is_none() {
        bail!("a configuration takes ControlNets: pass --controlnet");
    }
    let parallel = match a.controlnet_mode.as_str() {
        "serial" => false,
        "parallel" => true,
        m => bail!("--controlnet-mode must be serial or parallel, got {m}"),
    };
    let t0 = Instant::now();
    let placement = Placement {
        base: a.device.device,
        cond_half: a.split_guidance,
        controlnets: a.controlnet_devices.clone(),
    };
    let mut opts = a.device.session_options_for(Some(&a.bundle));
    if a.static_shapes {
        opts.buckets = vec![katz_onnx::runtime::FixedShape {
            width: a.size,
            height: a.size,
            unet_batch: placement.unet_batch(a.guidance > 1.0),
        }];
        opts.other_sizes = katz_onnx::runtime::OtherSizes::Refuse;
    }
    opts.cuda_graph = a.cuda_graph;
    let precision = opts.precision.to_string();
    let mut pipe =
        Pipeline::load(&a.bundle, opts).with_context(|| format!("loading {}", a.bundle.display()))?;
    // ControlNet j runs where entry j mod len says (none: on the pipeline's device)
    let dirs: Vec<&PathBuf> = a
        .controlnet
        .iter()
        .flat_map(|d| std::iter::repeat_n(d, max_c))
        .collect();
    let models = pipe.place(&placement, &dirs)?;
    let load_s = t0.elapsed().as_secs_f64();
    let places: Vec<String> = (0..max_c).map(|j| placement.controlnet(j).to_string()).collect();
    let machine = gpu_name();
    println!(
        "katz bench pipeline: {} on {}{} ({machine}), {}², {} Euler steps, guidance {}, ControlNets {} on [{}], LoRAs {} (bound {}){}; loaded in {load_s:.1} s",
        a.bundle.display(),
        a.device.device,
        a.split_guidance.map(|d| format!(" + {d} (split guidance)")).unwrap_or_default(),
        a.size,
        a.steps,
        a.guidance,
        a.controlnet_mode,
        places.join(", "),
        a.lora_mode,
        a.lora_bound,
        match (a.static_shapes, a.cuda_graph) {
            (_, true) => ", static shapes, CUDA graphs",
            (true, false) => ", static shapes",
            _ => "",
        },
    );
    let baseline: Option<Value> = match &a.baseline {
        Some(p) => Some(serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )?),
        None => None,
    };
    let images: Vec<Tensor> = (0..max_c).map(|j| cond_image(a.size, 7 + j as u64)).collect();
    let lat = (a.size / pipe.bundle.manifest.vae_scale_factor) as f64;
    let unet_tflop = a
        .unet_tflop
        .map(|t| t * (lat / 128.0).powi(2) * if a.guidance > 1.0 { 2.0 } else { 1.0 });

    let mut rows = Vec::new();
    for &(nc, nl) in &configs {
        let name = format!("{nc}C/{nl}L");
        let req = Request {
            prompt: "a red circle above a blue square on a white background".into(),
            negative_prompt: None,
            width: a.size,
            height: a.size,
            steps: a.steps,
            guidance: a.guidance,
            scheduler: SchedulerKind::Euler,
            karras: false,
            seed: 1234,
            controlnets: (0..nc)
                .map(|j| ControlRequest {
                    prep: Default::default(),
                    model: models[j].into(),
                    image: images[j].clone(),
                    scale: 0.8,
                    start: 0.0,
                    end: 1.0,
                })
                .collect(),
            loras: vec![],
        };
        let one = |pipe: &mut Pipeline| -> anyhow::Result<Run> {
            let started = Instant::now();
            let mut r = req.clone();
            let mut pending = None;
            let mut parse = Duration::ZERO;
            let plan = match a.lora_mode {
                _ if nl == 0 => LoraPlan::Sync,
                LoraMode::Sync => {
                    r.loras = a.loras[..nl]
                        .iter()
                        .map(|p| {
                            let l = Arc::new(LoraAdapter::load(p, pipe.weights().map())?);
                            Ok(LoraRequest::loaded(l, 0.7))
                        })
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    parse = started.elapsed();
                    LoraPlan::Sync
                }
                LoraMode::Async => {
                    // read, parse and merge all overlap the first steps (no cache: cold every run)
                    let files = a.loras[..nl].iter().map(|p| (p.clone(), 0.7f32)).collect();
                    let p = pending.insert(PendingMerge::spawn_loading(
                        pipe.shared_weights(),
                        files,
                        LoraParts::All,
                    ));
                    LoraPlan::Async {
                        pending: p,
                        bound: a.lora_bound.step_for(a.steps),
                        timeout: Duration::from_secs(600),
                        early: false,
                    }
                }
            };
            let r = pipe.validate(r)?;
            let mut threaded = pipe.threaded_controlnets();
            let mut opts = RunOptions::default().lora(plan);
            if parallel && nc > 0 {
                opts = opts.control(&mut threaded);
            }
            let out = pipe.run(&r, opts)?;
            Ok(Run {
                parse,
                e2e: started.elapsed(),
                out,
            })
        };
        let warm = one(&mut pipe)?;
        let runs = (0..a.repeat.max(1))
            .map(|_| one(&mut pipe))
            .collect::<anyhow::Result<Vec<_>>>()?;
        // split guidance must give the one-GPU image (fp16: relative error ≤ 1e-2)
        let split_err = if a.split_guidance.is_some() && a.static_shapes {
            println!("{name}: split guidance not checked against one GPU (static shapes fix a batch of 1)");
            None
        } else if a.split_guidance.is_some() {
            pipe.set_split(false);
            let single = one(&mut pipe);
            pipe.set_split(true);
            let e = katz_kernels::rel_err(&runs[0].out.image.data, &single?.out.image.data);
            println!("{name}: split guidance vs one GPU, relative error of the image {e:.2e}");
            Some(e)
        } else {
            None
        };
        let m = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let steps = a.steps as f64;
        let unet_step = m(&|r| ms(r.out.timings.unet_encoder + r.out.timings.unet_decoder) / steps);
        let unet_gpus: u32 = if a.split_guidance.is_some() { 2 } else { 1 };
        let row = json!({
            "config": name, "controlnets": nc, "loras": nl,
            "text_encoders_ms": m(&|r| ms(r.out.timings.text_encode)),
            "lora_parse_ms": m(&|r| ms(r.parse)),
            "lora_merge_ms": m(&|r| ms(r.out.timings.lora_merge)),
            "lora_wait_ms": m(&|r| ms(r.out.timings.lora_wait)),
            "controlnets_per_step_ms": m(&|r| ms(r.out.timings.controlnet) / steps),
            "unet_encoder_per_step_ms": m(&|r| ms(r.out.timings.unet_encoder) / steps),
            "unet_decoder_per_step_ms": m(&|r| ms(r.out.timings.unet_decoder) / steps),
            "unet_step_ms": unet_step,
            "kernels_per_step_ms": m(&|r| ms(r.out.timings.scheduler) / steps),
            // the step's critical path with ControlNets (in-process sessions): the slowest
            // ControlNet's run and its start delay, how long after the encoder its residuals
            // were ready, and the residual transport (copies between GPUs, adds) after that
            "controlnet_slowest_run_ms": m(&|r| ms(r.out.timings.cn_slowest_run) / steps),
            "controlnet_start_delay_ms": m(&|r| ms(r.out.timings.cn_start_delay) / steps),
            "controlnet_after_encoder_ms": m(&|r| ms(r.out.timings.cn_after_encoder) / steps),
            "residual_transport_ms": m(&|r| ms(r.out.timings.residual_transport) / steps),
            "controlnet_run_ms": (0..nc)
                .map(|j| m(&|r| r.out.timings.cn_runs.get(j).map_or(f64::NAN, |d| ms(*d) / steps)))
                .collect::<Vec<_>>(),
            "per_step_ms": m(&|r| ms(r.out.timings.per_step())),
            "vae_decode_ms": m(&|r| ms(r.out.timings.vae_decode)),
            "pipeline_s": m(&|r| r.out.timings.total.as_secs_f64()),
            "end_to_end_s": m(&|r| r.e2e.as_secs_f64()),
            "first_run_end_to_end_s": warm.e2e.as_secs_f64(),
            "unet_tflops": unet_tflop.map(|f| f / (unet_step / 1e3)),
            // per GPU: with split guidance two GPUs share the step
            "unet_gpus": unet_gpus,
            "unet_mfu": unet_tflop
                .zip(a.peak_tflops)
                .map(|(f, p)| f / (unet_step / 1e3) / (p * unet_gpus as f64)),
            "image_mean": mean(&runs[0].out.image.data),
            "split_vs_one_gpu_rel_err": split_err,
        });
        rows.push(row);
    }
    let diff = |name: &str, key: &str| -> Option<f64> {
        let key_d = name.to_lowercase().replace('/', "");
        baseline.as_ref()?.get("configs")?.get(&key_d)?.get(key)?.as_f64()
    };
    println!(
        "{:<7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>8} {:>9} {:>10} {:>10} {:>7}",
        "config",
        "text enc",
        "LoRA in",
        "CN/step",
        "UNet/st",
        "step",
        "VAE",
        "TFLOP/s",
        "e2e",
        "diffusers",
        "ratio",
        "MFU"
    );
    for r in &mut rows {
        let name = r["config"].as_str().unwrap_or_default().to_string();
        let e2e = r["end_to_end_s"].as_f64().unwrap_or(f64::NAN);
        let d = diff(&name, "end_to_end_s");
        if let Some(d) = d {
            r["diffusers_end_to_end_s"] = json!(d);
            r["ratio_to_diffusers"] = json!(e2e / d);
        }
        if let Some(ds) = diff(&name, "per_step_ms_estimate") {
            r["diffusers_per_step_ms"] = json!(ds);
        }
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "{:<7} {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>8} {:>8.2} s {:>8} {:>10} {:>7}",
            name,
            f("text_encoders_ms"),
            f("lora_parse_ms") + f("lora_wait_ms"),
            f("controlnets_per_step_ms"),
            f("unet_step_ms"),
            f("per_step_ms"),
            f("vae_decode_ms"),
            r["unet_tflops"].as_f64().map(|v| format!("{v:.0}")).unwrap_or_else(|| "—".into()),
            e2e,
            d.map(|d| format!("{d:.2} s")).unwrap_or_else(|| "—".into()),
            d.map(|d| format!("{:.3}×", e2e / d)).unwrap_or_else(|| "—".into()),
            r["unet_mfu"].as_f64().map(|m| format!("{:.1}%", m * 100.0)).unwrap_or_else(|| "—".into()),
        );
    }
    for r in rows.iter().filter(|r| r["controlnets"].as_u64().unwrap_or(0) > 0) {
        let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
        let runs: Vec<String> = r["controlnet_run_ms"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| format!("{:.1}", v.as_f64().unwrap_or(f64::NAN)))
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "{} critical path per step: UNet encoder {:.1} ms; slowest ControlNet run {:.1} ms (started {:.1} ms after \
             hand-over; each: {} ms); residuals ready {:.1} ms after the encoder; transport {:.1} ms; decoder {:.1} ms",
            r["config"].as_str().unwrap_or_default(),
            f("unet_encoder_per_step_ms"),
            f("controlnet_slowest_run_ms"),
            f("controlnet_start_delay_ms"),
            runs.join(" / "),
            f("controlnet_after_encoder_ms"),
            f("residual_transport_ms"),
            f("unet_decoder_per_step_ms"),
        );
    }
    if let Some(b) = &baseline {
        println!(
            "diffusers in the same sitting: UNet step (batch 2) {} ms, ControlNet step {} ms, VAE {} ms",
            b["unet_step_ms_batch2"], b["controlnet_step_ms_batch2"], b["vae_decode_ms"]
        );
        // the compiled peer (torch.compile), where the baseline timed it
        let katz_step = rows
            .iter()
            .filter_map(|r| r["unet_step_ms"].as_f64())
            .fold(f64::NAN, f64::min);
        if let Some(modes) = b["compiled"].as_object() {
            for (mode, r) in modes {
                if let Some(peer) = r["unet_step_ms_batch2"].as_f64() {
                    println!(
                        "diffusers under torch.compile({mode}) in the same sitting: UNet step {peer:.2} ms \
                         (compiled in {} s); katz's UNet step {katz_step:.2} ms = {:.3}× of it",
                        r["compile_s"],
                        katz_step / peer
                    );
                }
            }
        }
    }
    let report = json!({
        "bench": "pipeline", "machine": machine, "device": a.device.device.to_string(),
        "bundle": a.bundle.display().to_string(), "size": a.size, "steps": a.steps, "guidance": a.guidance,
        "controlnet_mode": a.controlnet_mode, "controlnet_devices": places,
        "split_guidance": a.split_guidance.map(|d| d.to_string()),
        "static_shapes": a.static_shapes,
        "cuda_graph": a.cuda_graph, "precision": precision,
        "lora_mode": a.lora_mode.to_string(), "lora_bound": a.lora_bound.to_string(),
        "unet_tflop_per_step": unet_tflop, "peak_tflops": a.peak_tflops, "load_s": load_s,
        "configs": rows, "diffusers": baseline,
    });
    if let Some(p) = &a.out {
        write_json(p, &report)?;
    }
    Ok(())
}

fn mean(v: &[f32]) -> f64 {
    v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64
}

/// The GPU's name (nvidia-smi), or the CPU's.
fn gpu_name() -> String {
    std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "no GPU".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse() {
        assert_eq!(parse_config("3C/2L").unwrap(), (3, 2));
        assert_eq!(parse_config("0c/0l").unwrap(), (0, 0));
        assert!(parse_config("3C2L").is_err());
    }
}
