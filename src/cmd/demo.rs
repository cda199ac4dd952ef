//! `katz demo`: the one-command workflow on the committed tiny bundles — a prompt, one
//! ControlNet with its conditioning image, one LoRA — on the CPU, no broker needed.

use std::path::PathBuf;

use clap::Args;

use super::generate::{self, ControlNetSpec, GenerateArgs, LoraSpec};
use super::DeviceArgs;
use katz_onnx::scheduler::SchedulerKind;

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
    pub steps: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    let bundles = super::bundles_dir()?;
    println!(
        "katz demo: tiny SDXL-structured bundles in {} (seeded random weights)",
        bundles.display()
    );
    let args = GenerateArgs {
        bundle: bundles.join("tiny-sdxl"),
        prompt: a.prompt.clone(),
        negative_prompt: None,
        steps: Some(a.steps),
        guidance: Some(5.0),
        seed: a.seed,
        size: Some((128, 128)),
        scheduler: SchedulerKind::Euler,
        karras: false,
        controlnets: vec![ControlNetSpec {
            bundle: bundles.join("tiny-sdxl-controlnet"),
            image: bundles.join("examples").join("edges-128.png"),
            scale: 0.8,
            start: 0.0,
            end: 1.0,
        }],
        loras: vec![LoraSpec {
            file: bundles.join("loras").join("tiny-lora-a.safetensors"),
            scale: 0.8,
        }],
        output: a.output,
        device: a.device,
    };
    println!("  prompt     {:?}", args.prompt);
    println!("  ControlNet tiny-sdxl-controlnet  image examples/edges-128.png  scale 0.8");
    println!("  LoRA       tiny-lora-a  scale 0.8");
    println!(
        "  128×128, {} Euler steps, guidance 5.0, seed {}",
        a.steps, a.seed
    );
    generate::run(args)
}
