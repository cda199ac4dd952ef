//! `katz bench controlnet`: per-step time of the pipeline with 0…3 ControlNets, run in-process
//! serially, in-process in parallel (threads overlapping the UNet encoder), and as a service over
//! RabbitMQ + Redis or CUDA IPC (`katz controlnet-worker` processes it starts); plus the Redis transport's own
//! cost per step (a loopback of the real payload sizes, no model).
//!
//! ```text
//! for mode in serial | parallel | redis:  for n in 0..=3:  warm-up + R runs ─▶ loop ms / step
//! transport: RPUSH input (latent, t) ─▶ echo thread BLPOP + RPUSH residual-sized payload ─▶ BLPOP
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use katz_actors::controlnet::wire::Residuals;
use katz_actors::controlnet::{RemoteConfig, RemoteControlNets};
use katz_onnx::controlnet::ControlService;
use katz_onnx::image::read_conditioning;
use katz_onnx::noise::SeededNoise;
use katz_onnx::pipeline::{Pipeline, RunOptions};
use katz_onnx::request::{ControlModel, ControlRequest, Request, ServiceId, ValidRequest};
use katz_onnx::scheduler::SchedulerKind;
use katz_onnx::tensor::Tensor;
use serde_json::json;

use super::stats::{cpu_model, upper_median};
use crate::cmd::{bundles_dir, gpu_names, write_json, DeviceArgs};

#[derive(Args, Debug, Clone)]
pub struct ControlNetBenchArgs {
    /// Base bundle [default: bundles/tiny-sdxl]; e.g. the full-size SDXL `--gpu` bundle.
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// ControlNet bundle used for every ControlNet [default: bundles/tiny-sdxl-controlnet].
    #[arg(long)]
    pub controlnet: Option<PathBuf>,
    #[arg(long, default_value_t = 5.0)]
    pub guidance: f32,
    /// diffusers' JSON from tools/bench_diffusers.py in the same sitting (configs `<n>c0l`): its
    /// per-step time with n serial MultiControlNets is printed beside katz's.
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Image side (the tiny bundles take 64 or 128).
    #[arg(long, default_value_t = 128)]
    pub size: usize,
    #[arg(long, value_delimiter = ',', default_value = "0,1,2,3")]
    pub counts: Vec<usize>,
    /// serial, parallel, inline, redis (service over Redis), ipc (service over CUDA IPC: a GPU
    /// pipeline and the ControlNet worker on `--worker-device`).
    #[arg(long, value_delimiter = ',', default_value = "serial,parallel,redis")]
    pub modes: Vec<String>,
    /// Device of the `katz controlnet-worker` the service modes start [default: --device].
    #[arg(long)]
    pub worker_device: Option<katz_onnx::runtime::Device>,
    /// Timed runs per configuration (after one warm-up).
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// The precision the service modes ask residuals in: auto (fp16 where the ControlNet computes
    /// in fp16), f16 or f32.
    #[arg(long, default_value_t = Residuals::Auto)]
    pub residuals: Residuals,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub amqp: String,
    #[arg(long, default_value = "redis://127.0.0.1:6379/")]
    pub redis: String,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub device: DeviceArgs,
}

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The bundles a run uses: the base, the ControlNet, and the ControlNet's model name (its queue).
struct Setup {
    base: PathBuf,
    controlnet: PathBuf,
    model: String,
}

fn request(
    pipe: &mut Pipeline,
    bundles: &std::path::Path,
    setup: &Setup,
    n: usize,
    a: &ControlNetBenchArgs,
    served: bool,
) -> anyhow::Result<ValidRequest> {
    // a ControlNet service serves model 0 of its list; the pipeline's own is the one it loaded
    let model: ControlModel = if served {
        ControlModel::Served(ServiceId(0))
    } else {
        pipe.controlnet(&setup.controlnet)?.into()
    };
    let image = read_conditioning(&bundles.join("examples/edges-128.png"), (128, 128))?;
    let image = match a.size {
        128 => image,
        64 => read_conditioning(&bundles.join("examples/cond_a.png"), (a.size, a.size))?,
        s => rings(s),
    };
    let req = Request {
        prompt: "a red circle above a blue square on a white background".into(),
        negative_prompt: None,
        width: a.size,
        height: a.size,
        steps: a.steps,
        guidance: a.guidance,
        scheduler: SchedulerKind::Euler,
        karras: false,
        seed: 1,
        controlnets: (0..n)
            .map(|j| ControlRequest {
                prep: Default::default(),
                model,
                image: image.clone(),
                scale: [0.8, 0.5, 0.3][j % 3],
                start: 0.0,
                end: 1.0,
            })
            .collect(),
        loras: vec![],
    };
    let mut accepts = pipe.accepts();
    accepts.served = 1;
    Ok(ValidRequest::new(req, &accepts)?)
}

/// A conditioning image of any size (no example file is that large): concentric rings, as an
/// edge map looks, in [0, 1], NCHW.
fn rings(size: usize) -> Tensor {
    let band = (size / 16).max(1);
    let mut data = vec![0.0f32; 3 * size * size];
    for y in 0..size {
        for x in 0..size {
            let (dx, dy) = (x as f32 - size as f32 / 2.0, y as f32 - size as f32 / 2.0);
            let r = (dx * dx + dy * dy).sqrt() as usize;
            let v = if r % band < 2 { 1.0 } else { 0.0 };
            for c in 0..3 {
                data[c * size * size + y * size + x] = v;
            }
        }
    }
    Tensor::new(vec![1, 3, size, size], data)
}

/// Times between consecutive steps: the steady per-step cost, without what the first step pays
/// once per job (session open, buffer allocation, IPC mappings).
#[derive(Default)]
struct StepClock {
    last: Option<Instant>,
    gaps: Vec<f64>,
}

impl katz_onnx::pipeline::Observer for StepClock {
    fn on_step(&mut self, _step: usize, _total: usize, _latents: &Tensor) -> katz_onnx::Result<()> {
        let now = Instant::now();
        if let Some(t) = self.last.replace(now) {
            self.gaps.push(now.duration_since(t).as_secs_f64() * 1e3);
        }
        Ok(())
    }
}

impl StepClock {
    /// Median gap between steps (ms); 0 with fewer than two steps.
    fn steady_ms(&mut self) -> f64 {
        if self.gaps.is_empty() {
            return 0.0;
        }
        self.gaps.sort_by(|x, y| x.total_cmp(y));
        self.gaps[self.gaps.len() / 2]
    }
}

/// Mean wall time of the denoising loop per step (text encoders and VAE excluded).
fn loop_ms(out: &katz_onnx::pipeline::Generated) -> f64 {
    let t = &out.timings;
    (t.total - t.text_encode - t.vae_decode - t.lora_merge).as_secs_f64() * 1e3 / t.steps as f64
}

pub fn run(a: ControlNetBenchArgs) -> anyhow::Result<()> {
    let bundles = bundles_dir()?;
    let setup = {
        let base = a.bundle.clone().unwrap_or_else(|| bundles.join("tiny-sdxl"));
        let controlnet = a
            .controlnet
            .clone()
            .unwrap_or_else(|| bundles.join("tiny-sdxl-controlnet"));
        let model = katz_onnx::bundle::ControlNetBundle::open(&controlnet)
            .with_context(|| format!("opening {}", controlnet.display()))?
            .manifest
            .name;
        Setup {
            base,
            controlnet,
            model,
        }
    };
    let baseline: Option<serde_json::Value> = match &a.baseline {
        Some(p) => Some(serde_json::from_slice(
            &std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
        )?),
        None => None,
    };
    let mut pipe = Pipeline::load(&setup.base, a.device.session_options())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let cpu = cpu_model().unwrap_or_default();
    println!(
        "katz bench controlnet: {} + {}, {}², {} steps, guidance {}, {}; {} cores ({cpu}){}",
        setup.base.display(),
        setup.model,
        a.size,
        a.steps,
        a.guidance,
        a.device.device,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        gpu_names().map(|g| format!(", GPUs: {g}")).unwrap_or_default()
    );
    let mut workers: Vec<Kill> = Vec::new();
    let mut remote: Option<RemoteControlNets> = None;
    let mut remote_ipc: Option<RemoteControlNets> = None;
    let mut rows = Vec::new();
    // each count's image in the first mode, which the other modes' images are compared with
    let mut reference: Vec<(usize, Tensor)> = Vec::new();
    if a.modes.iter().any(|m| m == "ipc") && !a.device.device.is_gpu() {
        bail!(
            "mode ipc needs the pipeline on a GPU (--device cuda:N) and the worker on one (--worker-device)"
        );
    }
    for mode in &a.modes {
        if mode == "ipc" && remote_ipc.is_none() {
            let mut cfg = RemoteConfig::new(a.amqp.clone(), a.redis.clone());
            cfg.step_timeout = Duration::from_secs(30);
            cfg.ipc = true;
            cfg.residuals = a.residuals;
            remote_ipc = Some(RemoteControlNets::new(
                cfg,
                vec![setup.model.parse().map_err(anyhow::Error::msg)?],
                rt.handle().clone(),
            )?);
        }
        if (mode == "redis" || mode == "ipc") && workers.is_empty() {
            let exe = std::env::current_exe()?;
            let max = *a.counts.iter().max().unwrap_or(&1);
            workers.push(Kill(
                Command::new(exe)
                    .args(["controlnet-worker", "--bundle"])
                    .arg(&setup.controlnet)
                    .arg("--base")
                    .arg(&setup.base)
                    .args([
                        "--concurrency",
                        &max.max(1).to_string(),
                        "--amqp",
                        &a.amqp,
                        "--redis",
                        &a.redis,
                    ])
                    .args([
                        "--threads",
                        &a.device.threads.to_string(),
                        "--device",
                        &a.worker_device.unwrap_or(a.device.device).to_string(),
                    ])
                    // KATZ_WORKER_LOG=katz_actors=debug: the worker's per-step timings
                    .env(
                        "KATZ_LOG",
                        std::env::var("KATZ_WORKER_LOG").unwrap_or_else(|_| "warn".into()),
                    )
                    .stdout(Stdio::null())
                    .spawn()
                    .context("starting a controlnet-worker")?,
            ));
        }
        if mode == "redis" && remote.is_none() {
            let mut cfg = RemoteConfig::new(a.amqp.clone(), a.redis.clone());
            cfg.step_timeout = Duration::from_secs(30);
            cfg.residuals = a.residuals;
            remote = Some(RemoteControlNets::new(
                cfg,
                vec![setup.model.parse().map_err(anyhow::Error::msg)?],
                rt.handle().clone(),
            )?);
        }
        for &n in &a.counts {
            let served = mode == "redis" || mode == "ipc";
            let req = request(&mut pipe, &bundles, &setup, n, &a, served)?;
            let mut times = Vec::new();
            let mut steady = Vec::new();
            let mut image: Option<Tensor> = None;
            for r in 0..=a.repeat {
                let mut inline;
                let mut threaded;
                let control: Option<&mut dyn ControlService> = match (mode.as_str(), n) {
                    (_, 0) | ("serial", _) => None,
                    ("parallel", _) => {
                        threaded = pipe.threaded_controlnets();
                        Some(&mut threaded)
                    }
                    ("inline", _) => {
                        inline = pipe.inline_controlnets();
                        Some(&mut inline)
                    }
                    ("redis", _) => {
                        let rc = remote.as_mut().context("the Redis service was not set up")?;
                        rc.for_job(&format!("bench-{n}-{r}"));
                        Some(rc as &mut dyn ControlService)
                    }
                    ("ipc", _) => {
                        let rc = remote_ipc
                            .as_mut()
                            .context("the CUDA IPC service was not set up")?;
                        rc.for_job(&format!("bench-ipc-{n}-{r}"));
                        Some(rc as &mut dyn ControlService)
                    }
                    (m, _) => bail!("unknown mode `{m}` (serial, parallel, inline, redis, ipc)"),
                };
                let mut clock = StepClock::default();
                let mut noise = SeededNoise::new(1);
                let mut opts = RunOptions::default().noise(&mut noise).observer(&mut clock);
                if let Some(c) = control {
                    opts = opts.control(c);
                }
                let out = pipe.run(&req, opts)?;
                if image.is_none() {
                    image = Some(out.image.clone());
                }
                if r > 0 {
                    times.push(loop_ms(&out));
                    steady.push(clock.steady_ms());
                }
            }
            let med = upper_median(&mut times);
            let st = upper_median(&mut steady);
            // the image against the first mode's for this count (fp16 residuals, other kernels)
            let vs_first = match (&image, reference.iter().find(|(k, _)| *k == n)) {
                (Some(img), Some((_, want))) => Some(katz_kernels::rel_err(&img.data, &want.data)),
                (Some(img), None) => {
                    reference.push((n, img.clone()));
                    None
                }
                _ => None,
            };
            // what a job pays once (session open, buffers, mappings), spread over its steps
            let setup_ms = (med - st) * a.steps as f64;
            let theirs = baseline
                .as_ref()
                .and_then(|b| b["configs"][format!("{n}c0l")]["per_step_ms_estimate"].as_f64());
            let vs = theirs
                .map(|d| format!("  diffusers {d:.2} ms/step → {:.2}×", st / d))
                .unwrap_or_default();
            let err = vs_first
                .map(|e| format!("  image vs {}: rel. error {e:.1e}", a.modes[0]))
                .unwrap_or_default();
            println!(
                "  {mode:<9} {n} ControlNet(s)  {st:>8.2} ms/step steady, {med:>8.2} with the job's setup \
                 (+{setup_ms:.0} ms per job; runs {times:.2?}){vs}{err}"
            );
            rows.push(json!({"mode": mode, "controlnets": n, "ms_per_step_steady": st,
                             "ms_per_step_median": med, "setup_ms_per_job": setup_ms, "runs": times,
                             "steady_runs": steady, "diffusers_ms_per_step": theirs,
                             "image_rel_err_vs_first_mode": vs_first}));
        }
    }
    // the Redis transport alone: this run's payloads and SDXL 1024² batch 2's
    let transport = match transport_cost(&a.redis, &mut pipe, &bundles, &setup, &a) {
        Ok(t) => t,
        Err(e) => {
            println!("  Redis transport not measured: {e:#}");
            json!(null)
        }
    };
    drop(workers);
    if let Some(out) = &a.out {
        let doc = json!({
            "bench": "controlnet", "machine": cpu, "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            "gpus": gpu_names(),
            "bundle": format!("{} + {}", setup.base.display(), setup.controlnet.display()),
            "size": a.size, "steps": a.steps, "guidance": a.guidance,
            "device": a.device.device.to_string(),
            "worker_device": a.worker_device.map(|d| d.to_string()),
            "residuals": a.residuals.to_string(),
            "rows": rows, "redis_transport": transport, "diffusers": baseline,
        });
        write_json(out, &doc)?;
    }
    Ok(())
}

/// Round trips of a step's real payload sizes through Redis lists, an echo thread in the middle.
fn transport_cost(
    url: &str,
    pipe: &mut Pipeline,
    bundles: &std::path::Path,
    setup: &Setup,
    a: &ControlNetBenchArgs,
) -> anyhow::Result<serde_json::Value> {
    use katz_actors::controlnet::wire;
    // this run's bundle: one real step's residuals, measured
    let req = request(pipe, bundles, setup, 1, a, false)?;
    let cond = pipe.condition(&req.prompt, None, true, (a.size, a.size))?;
    let image = Tensor::concat0(&[&req.controlnets[0].image, &req.controlnets[0].image]);
    let mut session = pipe.inline_controlnets().open(
        0,
        &req.controlnets[0],
        katz_onnx::controlnet::SessionInit {
            cond: &cond,
            image: &image,
        },
    )?;
    let latent = Tensor::zeros(vec![2, 4, a.size / 8, a.size / 8]);
    session.send(0, &latent, &Tensor::new(vec![2], vec![500.0; 2]))?;
    let tiny_out: usize = session.recv(0)?.iter().map(|t| t.data.len() * 4).sum();
    let tiny_in = 2 * 4 * (a.size / 8) * (a.size / 8) * 4 + 8;
    // SDXL 1024², batch 2: latent 2×4×128×128; residuals of 10 tensors at batch 2 (107 MB in fp16; fp32 here)
    let sdxl_in = 2 * 4 * 128 * 128 * 4 + 8;
    let sdxl_out = 107_000_000usize;
    let mut out = Vec::new();
    for (label, inb, outb, reps) in [
        ("this-run", tiny_in, tiny_out, 20),
        ("sdxl-1024-b2", sdxl_in, sdxl_out, 5),
    ] {
        let client = redis::Client::open(url)?;
        let key = format!("katz:bench:{}:{label}", std::process::id());
        let (kin, kout) = (format!("{key}:in"), format!("{key}:out"));
        let echo = {
            let (client, kin, kout) = (client.clone(), kin.clone(), kout.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let mut c = client.get_connection()?;
                let payload = vec![7u8; outb];
                for _ in 0..reps {
                    let _: Option<(String, Vec<u8>)> =
                        redis::cmd("BLPOP").arg(&kin).arg(30.0).query(&mut c)?;
                    let _: () = redis::cmd("RPUSH").arg(&kout).arg(&payload).query(&mut c)?;
                }
                Ok(())
            })
        };
        let mut c = client.get_connection()?;
        let input = vec![3u8; inb];
        let mut times = Vec::new();
        for _ in 0..reps {
            let t0 = Instant::now();
            let _: () = redis::cmd("RPUSH").arg(&kin).arg(&input).query(&mut c)?;
            let got: Option<(String, Vec<u8>)> = redis::cmd("BLPOP").arg(&kout).arg(30.0).query(&mut c)?;
            let bytes = got.context("the echo thread did not answer")?.1;
            // decoding is part of the cost: the base turns bytes into tensors
            let _ = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .sum::<f32>();
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        echo.join()
            .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
        let _: () = redis::cmd("DEL").arg(&kin).arg(&kout).query(&mut c)?;
        let med = upper_median(&mut times);
        let _ = wire::SESSION_VERSION;
        println!(
            "  Redis transport, {label}: in {inb} B, out {outb} B per step: {med:.3} ms (median of {reps})"
        );
        out.push(
            json!({"payload": label, "in_bytes": inb, "out_bytes": outb, "ms_median": med, "runs": times}),
        );
    }
    Ok(json!(out))
}
