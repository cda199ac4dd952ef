//! `katz demo`: the one-command workflow on the committed trained tiny family (bundles/shapes:
//! the tiny family's base model, ControlNet and LoRAs, trained on the synthetic shapes dataset) — a
//! prompt, one ControlNet with its conditioning edges, one LoRA — on the CPU, with no broker: the
//! job goes through the service's own actors in embedded mode (in-process source, in-memory store).
//!
//! The picture shows what was asked: tools/test_demo.py reads it back with the shapes judge
//! (objects, colours, relation, background), the ControlNet's edges (IoU) and the LoRA's style.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Args;
use katz_actors::embedded;
use katz_actors::pipeline::Models;
use katz_actors::protocol::{ControlNetJob, ImageRef, Job, LoraJob};

use super::lora_args::{self, LoraArgs};
use super::{bundles_dir, DeviceArgs, Progress};

/// The conditioning edges of the default prompt's layout (tools/test_demo.py renders the same).
pub const DEMO_EDGES: &str = "red-circle-above-blue-square-edges.png";

#[derive(Args, Debug, Clone)]
pub struct DemoArgs {
    #[arg(long, short, default_value = "demo.png")]
    pub output: PathBuf,
    #[arg(
        long,
        default_value = "a red circle above a blue square on a white background"
    )]
    pub prompt: String,
    #[arg(long, default_value_t = 20)]
    pub steps: u32,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let bundles = bundles_dir()?;
    println!(
        "katz demo: the trained tiny SDXL-structured family in {}",
        bundles.join("shapes").display()
    );
    let shapes = bundles.join("shapes");
    let image = shapes.join("examples").join(DEMO_EDGES);
    let mut job = Job::new("demo", "shapes-sdxl", &a.prompt);
    job.width = 128;
    job.height = 128;
    job.steps = a.steps;
    job.guidance = 5.0;
    job.seed = a.seed.into();
    job.controlnets.push(ControlNetJob {
        resize: Default::default(),
        canny: None,
        model: "shapes-sdxl-controlnet".into(),
        image: ImageRef::Inline(
            std::fs::read(&image).with_context(|| format!("reading {}", image.display()))?,
        ),
        scale: 1.0,
        start: 0.0,
        end: 1.0,
    });
    job.loras.push(LoraJob {
        name: "pastel".into(),
        scale: 1.0,
    });
    println!("  prompt     {:?}", a.prompt);
    println!("  ControlNet shapes-sdxl-controlnet  image examples/{DEMO_EDGES}  scale 1.0");
    println!("  LoRA       pastel (a pastel palette)  scale 1.0");
    println!(
        "  128×128, {} Euler steps, guidance 5.0, seed {}  (embedded mode: the worker's actors, no broker)",
        a.steps, a.seed
    );

    let models = Models::local(
        shapes.join("shapes-sdxl"),
        vec![shapes.join("shapes-sdxl-controlnet")],
        lora_args::config(
            shapes.join("loras"),
            &a.lora,
            &Default::default(),
            &Default::default(),
        )?,
        a.device.session_options(),
    );
    let started = Instant::now();
    let progress = Progress::new(a.steps as usize);
    let results = embedded::run_jobs(&models, vec![job], |e| progress.set(e.step as usize));
    progress.finish();
    let r = results?.pop().context("the embedded run returned no result")?;
    let f = |k: &str| r.record.get(k).cloned().unwrap_or_default();
    if f("status") != "done" {
        bail!("demo job {}: {}", f("status"), f("error"));
    }
    let png = r.png.context("the demo job stored no image")?;
    std::fs::write(&a.output, &png).with_context(|| format!("writing {}", a.output.display()))?;
    println!("timings ({} steps):", a.steps);
    for (stage, key) in [
        ("text encoders", "text_encode_ms"),
        ("LoRA merge", "lora_merge_ms"),
        ("LoRA wait", "lora_wait_ms"),
        ("ControlNets", "controlnet_ms"),
        ("UNet encoder", "unet_encoder_ms"),
        ("UNet decoder", "unet_decoder_ms"),
        ("guidance + scheduler", "scheduler_ms"),
        ("VAE decode", "vae_decode_ms"),
        ("per step (mean)", "step_ms"),
        ("pipeline total", "pipeline_ms"),
        ("job total (actors)", "service_ms"),
    ] {
        let ms: f64 = f(key).parse().unwrap_or(f64::NAN);
        println!("  {stage:<22}{ms:>10.1} ms");
    }
    println!(
        "  {:<22}{:>10.1} ms",
        "wall (models loaded)",
        started.elapsed().as_secs_f64() * 1e3
    );
    println!("wrote {} (128×128 PNG, {} bytes)", a.output.display(), png.len());
    Ok(())
}
