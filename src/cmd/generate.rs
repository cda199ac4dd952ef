//! `katz generate`: one image from a bundle, with any number of ControlNets and LoRAs.

use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context};
use clap::Args;
use katz_actors::protocol::Seed;
use katz_onnx::bundle::BaseBundle;
use katz_onnx::conditioning::{Canny, Preprocess, ResizeMode};
use katz_onnx::image::read_image;
use katz_onnx::lora::{LoraParts, PendingMerge};
use katz_onnx::pipeline::{LoraMode, LoraPlan, Pipeline, RunOptions};
use katz_onnx::placement::Placement;
use katz_onnx::request::{ControlRequest, LoraRequest, Request, ValidRequest};
use katz_onnx::runtime::{FixedShape, OtherSizes, SessionOptions};
use katz_onnx::scheduler::SchedulerKind;

use super::lora_args::{self, LoraArgs};
use super::{finish, DeviceArgs, Progress};

/// `BUNDLE=IMAGE[:SCALE[:START:END]]`
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetSpec {
    pub bundle: PathBuf,
    pub image: PathBuf,
    pub scale: f32,
    pub start: f32,
    pub end: f32,
}

impl FromStr for ControlNetSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (bundle, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("`{s}`: expected BUNDLE=IMAGE[:SCALE[:START:END]]"))?;
        let mut parts: Vec<&str> = rest.split(':').collect();
        // trailing numbers are options; whatever is left is the image path (which may hold ':')
        let mut nums = Vec::new();
        while parts.len() > 1 && nums.len() < 3 {
            match parts.last().and_then(|p| p.parse::<f32>().ok()) {
                Some(v) => {
                    nums.insert(0, v);
                    parts.pop();
                }
                None => break,
            }
        }
        let (scale, start, end) = match nums[..] {
            [] => (1.0, 0.0, 1.0),
            [s] => (s, 0.0, 1.0),
            [s, a, b] => (s, a, b),
            _ => return Err(format!("`{s}`: give SCALE, or SCALE:START:END")),
        };
        Ok(ControlNetSpec {
            bundle: bundle.into(),
            image: parts.join(":").into(),
            scale,
            start,
            end,
        })
    }
}

/// `[I=]VALUE`: a setting for the `--controlnet` at position I (from 0), or for every one.
#[derive(Debug, Clone, PartialEq)]
pub struct PerControl<T> {
    pub index: Option<usize>,
    pub value: T,
}

impl<T: FromStr<Err = String>> FromStr for PerControl<T> {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('=') {
            Some((i, v)) => Ok(PerControl {
                index: Some(
                    i.trim()
                        .parse()
                        .map_err(|_| format!("`{s}`: `{i}` is not a ControlNet position (0, 1, …)"))?,
                ),
                value: v.parse()?,
            }),
            None => Ok(PerControl {
                index: None,
                value: s.parse()?,
            }),
        }
    }
}

/// The setting of ControlNet `i`: the last naming it, else the last naming none.
pub fn for_control<T: Clone>(settings: &[PerControl<T>], i: usize) -> Option<T> {
    let last = |want: Option<usize>| settings.iter().rev().find(|s| s.index == want);
    last(Some(i)).or_else(|| last(None)).map(|s| s.value.clone())
}

/// `LOW,HIGH`: canny thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CannyArg(pub Canny);

impl FromStr for CannyArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (l, h) = s
            .split_once(',')
            .ok_or_else(|| format!("`{s}`: expected LOW,HIGH (e.g. 100,200)"))?;
        let p = |v: &str| {
            v.trim()
                .parse::<f32>()
                .map_err(|_| format!("`{s}`: `{v}` is not a number"))
        };
        Ok(CannyArg(Canny {
            low: p(l)?,
            high: p(h)?,
        }))
    }
}

/// The flags that say how each ControlNet's image is prepared (`katz generate`, `katz submit`).
#[derive(Args, Debug, Clone, Default)]
pub struct ControlPrepArgs {
    /// How a conditioning image of another size is brought to the request's: resize (aspect
    /// ignored; default), crop (cover, center-crop) or pad (fit, border pixels around);
    /// `I=MODE` for the I-th --controlnet only (repeatable).
    #[arg(long = "control-resize")]
    pub resize: Vec<PerControl<ResizeMode>>,
    /// The canny preprocessor: LOW,HIGH thresholds (0 ≤ LOW ≤ HIGH ≤ 1140), the image is a photo
    /// whose edges condition the ControlNet; `I=LOW,HIGH` for the I-th --controlnet only
    /// (repeatable).
    #[arg(long = "canny")]
    pub canny: Vec<PerControl<CannyArg>>,
}

impl ControlPrepArgs {
    /// What the flags ask for ControlNet `i`.
    pub fn get(&self, i: usize) -> Preprocess {
        Preprocess {
            resize: for_control(&self.resize, i).unwrap_or_default(),
            canny: for_control(&self.canny, i).map(|c| c.0),
        }
    }
}

/// `FILE[:SCALE]`
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub file: PathBuf,
    pub scale: f32,
}

impl FromStr for LoraSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s
            .rsplit_once(':')
            .and_then(|(f, v)| v.parse::<f32>().ok().map(|v| (f, v)))
        {
            Some((f, v)) => Ok(LoraSpec {
                file: f.into(),
                scale: v,
            }),
            None => Ok(LoraSpec {
                file: s.into(),
                scale: 1.0,
            }),
        }
    }
}

/// `WIDTHxHEIGHT`
pub fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once(['x', 'X', '×'])
        .ok_or_else(|| format!("`{s}`: expected WIDTHxHEIGHT"))?;
    let p = |v: &str| {
        v.trim()
            .parse::<usize>()
            .map_err(|_| format!("`{s}`: `{v}` is not a number"))
    };
    Ok((p(w)?, p(h)?))
}

#[derive(Args, Debug, Clone)]
pub struct GenerateArgs {
    /// Base-model bundle directory.
    #[arg(long, env = "KATZ_BUNDLE")]
    pub bundle: PathBuf,
    #[arg(long)]
    pub prompt: String,
    /// Without one, the unconditional half uses zero embeddings (SDXL's default).
    #[arg(long)]
    pub negative_prompt: Option<String>,
    /// Denoising steps (default: the bundle's).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale; ≤ 1 turns guidance off (default: the bundle's).
    #[arg(long)]
    pub guidance: Option<f32>,
    /// The noise seed; -1 draws one at random (printed, so the image can be made again).
    #[arg(long, default_value = "0", allow_hyphen_values = true)]
    pub seed: Seed,
    /// Image size WIDTHxHEIGHT, multiples of 8 (default: the bundle's).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<(usize, usize)>,
    /// euler, euler-a, ddim or dpm++2m.
    #[arg(long, default_value = "euler")]
    pub scheduler: SchedulerKind,
    /// Karras sigmas (euler, dpm++2m).
    #[arg(long)]
    pub karras: bool,
    /// A ControlNet: BUNDLE=IMAGE[:SCALE[:START:END]] (repeatable; IMAGE a PNG, JPEG or WebP of
    /// any size, brought to the request's as --control-resize says).
    #[arg(long = "controlnet")]
    pub controlnets: Vec<ControlNetSpec>,
    #[command(flatten)]
    pub control_prep: ControlPrepArgs,
    /// GPUs for the ControlNets (cuda:1,cuda:2): ControlNet j on entry j mod len [default: --device]
    #[arg(long = "controlnet-device", value_delimiter = ',')]
    pub controlnet_devices: Vec<katz_onnx::runtime::Device>,
    /// Latent parallelism: the conditional guidance half on this second GPU (e.g. cuda:1).
    #[arg(long)]
    pub split_guidance: Option<katz_onnx::runtime::Device>,
    /// A LoRA safetensors file (diffusers/peft or kohya layout; LoRA, LoCon, LoHa, LoKr):
    /// FILE[:SCALE] (repeatable).
    #[arg(long = "lora")]
    pub loras: Vec<LoraSpec>,
    /// Skip the parts of the LoRA files the bundle cannot take (text-encoder parts on a bundle
    /// whose text encoders take no weights, convolution parts on one whose convolutions take
    /// none) instead of failing; a warning names them.
    #[arg(long)]
    pub unet_only: bool,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[arg(long, short)]
    pub output: PathBuf,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// The UNet graphs' shapes fixed to this request's size and batch when the sessions are made
    /// (no shape work between a step's GPU kernels) [default: on a GPU; `--static-shapes false`:
    /// free shapes].
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub static_shapes: Option<bool>,
    /// CUDA graphs for the UNet (needs static shapes and cuda:N): captured at load, replayed
    /// every step [default: with static shapes on cuda:N].
    #[arg(long, env = "KATZ_CUDA_GRAPH", num_args = 0..=1, default_missing_value = "true")]
    pub cuda_graph: Option<bool>,
    /// CUDA: matrix products and convolutions in full fp32, not TF32.
    #[arg(long, env = "KATZ_EXACT_FP32")]
    pub exact_fp32: bool,
}

/// Where the options put the pipeline's parts.
pub fn placement(a: &GenerateArgs) -> Placement {
    Placement::with_devices(a.device.device, a.split_guidance, &a.controlnet_devices)
}

/// Places the pipeline's parts and loads the ControlNets the options name, then builds the
/// request and checks it.
pub fn build_request(pipe: &mut Pipeline, a: &GenerateArgs) -> anyhow::Result<ValidRequest> {
    let m = &pipe.bundle.manifest;
    let (width, height) = a.size.unwrap_or((m.default_size[0], m.default_size[1]));
    let steps = a.steps.unwrap_or(m.default_steps);
    let guidance = a.guidance.unwrap_or(m.default_guidance);
    let dirs: Vec<&PathBuf> = a.controlnets.iter().map(|c| &c.bundle).collect();
    let ids = pipe.place(&placement(a), &dirs)?;
    let mut controlnets = Vec::new();
    for (i, (c, model)) in a.controlnets.iter().zip(ids).enumerate() {
        let image = read_image(&c.image)?;
        controlnets.push(ControlRequest {
            model: model.into(),
            image,
            prep: a.control_prep.get(i),
            scale: c.scale,
            start: c.start,
            end: c.end,
        });
    }
    // async mode reads and merges the LoRA files while the job denoises (see `run`)
    let mut loras = Vec::new();
    for l in &a.loras {
        loras.push(match lora_mode(a)? {
            LoraMode::Sync => {
                let adapter = pipe.lora_with(&l.file, LoraParts::unet_only(a.unet_only))?;
                if !adapter.untaken.is_empty() {
                    eprintln!(
                        "warning: LoRA {}: skipped what the bundle cannot take: {}",
                        l.file.display(),
                        adapter.untaken
                    );
                }
                LoraRequest::loaded(adapter, l.scale)
            }
            LoraMode::Async => LoraRequest::named(file_name(&l.file), l.scale),
        });
    }
    let req = Request {
        prompt: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        width,
        height,
        steps,
        guidance,
        scheduler: a.scheduler,
        karras: a.karras,
        seed: a.seed.resolve(),
        controlnets,
        loras,
    };
    Ok(pipe.validate(req)?)
}

/// A LoRA file's name as a request names it (its file stem).
fn file_name(p: &std::path::Path) -> String {
    p.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The session options the flags ask for: on a GPU (unless `--static-shapes false`) one shape
/// bucket, the request's size and the UNet batch its placement runs, with CUDA graphs on cuda:N;
/// free shapes on the CPU.
pub fn session_options(a: &GenerateArgs) -> anyhow::Result<SessionOptions> {
    let mut opts = a.device.session_options_for(Some(&a.bundle));
    opts.exact_fp32 = a.exact_fp32;
    let fixed = a.static_shapes.unwrap_or(a.device.device.is_gpu());
    if fixed {
        let m = BaseBundle::open(&a.bundle)?.manifest;
        let (width, height) = a.size.unwrap_or((m.default_size[0], m.default_size[1]));
        let guided = a.guidance.unwrap_or(m.default_guidance) > 1.0;
        opts.buckets = vec![FixedShape {
            width,
            height,
            unet_batch: placement(a).unet_batch(guided),
        }];
        opts.other_sizes = OtherSizes::Refuse;
    }
    let cuda = matches!(a.device.device, katz_onnx::runtime::Device::Cuda(_));
    opts.cuda_graph = a.cuda_graph.unwrap_or(fixed && cuda);
    Ok(opts)
}

pub fn run(a: GenerateArgs) -> anyhow::Result<()> {
    let mut pipe = Pipeline::load(&a.bundle, session_options(&a)?)
        .map_err(|e| anyhow!(e))
        .with_context(|| format!("loading bundle {}", a.bundle.display()))?;
    let req = build_request(&mut pipe, &a)?;
    if a.seed == Seed::Random {
        println!(
            "seed {} (drawn at random; --seed {} makes this image again)",
            req.seed, req.seed
        );
    }
    let cfg = lora_args::config(PathBuf::new(), &a.lora, &Default::default(), &Default::default())?;
    let mut progress = Progress::new(req.steps);
    let out = if cfg.mode == LoraMode::Async && !a.loras.is_empty() {
        for l in &a.loras {
            if !l.file.is_file() {
                bail!("LoRA {}: no such file", l.file.display());
            }
        }
        // read and merge on a thread of its own; the pipeline switches the result in by the bound
        let files = a.loras.iter().map(|l| (l.file.clone(), l.scale)).collect();
        let parts = LoraParts::unet_only(a.unet_only);
        let mut pending = PendingMerge::spawn_loading(pipe.shared_weights(), files, parts);
        let plan = LoraPlan::Async {
            pending: &mut pending,
            bound: cfg.bound_step(req.steps),
            timeout: cfg.timeout,
            early: cfg.switch_early,
        };
        pipe.run(&req, RunOptions::default().observer(&mut progress).lora(plan))
    } else {
        pipe.run(&req, RunOptions::default().observer(&mut progress))
    };
    progress.finish();
    let out = out?;
    for (what, t) in [
        ("prompt", out.prompt_truncated),
        ("negative prompt", out.negative_truncated),
    ] {
        if let Some(t) = t {
            eprintln!(
                "warning: the {what} has {} tokens, the text encoders take {} (start and end tokens included): the rest was cut off",
                t.tokens, t.kept
            );
        }
    }
    finish(&out, &a.output)
}

fn lora_mode(a: &GenerateArgs) -> anyhow::Result<LoraMode> {
    Ok(lora_args::config(PathBuf::new(), &a.lora, &Default::default(), &Default::default())?.mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controlnet_spec_forms() {
        let c: ControlNetSpec = "cn=img.png".parse().unwrap();
        assert_eq!((c.scale, c.start, c.end), (1.0, 0.0, 1.0));
        let c: ControlNetSpec = "cn=a:b.png:0.5".parse().unwrap();
        assert_eq!((c.image.to_str().unwrap(), c.scale), ("a:b.png", 0.5));
        let c: ControlNetSpec = "cn=img.png:0.7:0.1:0.9".parse().unwrap();
        assert_eq!((c.scale, c.start, c.end), (0.7, 0.1, 0.9));
        assert!("no-equals".parse::<ControlNetSpec>().is_err());
    }

    #[test]
    fn control_prep_forms_apply_to_all_or_one() {
        let p: ControlPrepArgs = ControlPrepArgs {
            resize: vec!["crop".parse().unwrap(), "1=pad".parse().unwrap()],
            canny: vec!["0=100,200".parse().unwrap()],
        };
        assert_eq!(p.get(0).resize, ResizeMode::Crop);
        assert_eq!(p.get(1).resize, ResizeMode::Pad);
        assert_eq!(
            p.get(0).canny,
            Some(Canny {
                low: 100.0,
                high: 200.0
            })
        );
        assert_eq!(p.get(1).canny, None);
        assert_eq!(ControlPrepArgs::default().get(3), Preprocess::default());
        assert!("stretch".parse::<PerControl<ResizeMode>>().is_err());
        assert!("x=crop".parse::<PerControl<ResizeMode>>().is_err());
        assert!("100".parse::<PerControl<CannyArg>>().is_err());
    }

    #[test]
    fn lora_and_size_forms() {
        assert_eq!("x.safetensors:0.5".parse::<LoraSpec>().unwrap().scale, 0.5);
        assert_eq!("x.safetensors".parse::<LoraSpec>().unwrap().scale, 1.0);
        assert_eq!(parse_size("128x96").unwrap(), (128, 96));
        assert!(parse_size("128").is_err());
    }
}
