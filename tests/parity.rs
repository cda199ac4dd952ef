//! Numerical parity of the Rust pipeline with diffusers.
//!
//! `tools/export_bundle.py` ran diffusers' `StableDiffusionXLPipeline` /
//! `StableDiffusionXLControlNetPipeline` on the committed tiny bundles' exact weights with
//! explicit noise (fresh random normals, recorded), for each scheduler, with and without
//! ControlNets and LoRAs, and recorded the latents after every step and the final image
//! (`tests/data/parity/`); `tools/shapes/parity_refs.py` did the same for the trained family
//! (`tests/data/parity-shapes/`), and `export_bundle.py --checkpoint FILE --references` for the
//! bundle exported from a single-file SDXL checkpoint (`tests/data/parity-checkpoint/`: diffusers'
//! `from_single_file` on `tests/data/checkpoints/tiny-sdxl.safetensors`). Each test feeds the same noise to the Rust pipeline and compares
//! by relative error (fp32: ≤ 1e-3 on the CPU and on CUDA, where the tests turn TF32 off).

mod common;
use common::*;

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use katz_kernels::rel_err;
use katz_onnx::image::read_conditioning;
use katz_onnx::pipeline::{Observer, Pipeline};
use katz_onnx::request::{ControlRequest, LoraRequest, Request};
use katz_onnx::scheduler::NoiseSource;
use katz_onnx::tensor::Tensor;
use safetensors::SafeTensors;
use serde::Deserialize;

/// Noise recorded by the exporter (the diffusers reference), handed out in order.
struct RecordedNoise(VecDeque<Vec<f32>>);

impl NoiseSource for RecordedNoise {
    fn fill(&mut self, out: &mut [f32]) {
        let next = self.0.pop_front().expect("recorded noise exhausted");
        assert_eq!(next.len(), out.len(), "recorded noise of another shape");
        out.copy_from_slice(&next);
    }
}

/// Relative error allowed, fp32, on the CPU and on CUDA: katz and diffusers agree to ~1e-6 on the
/// CPU. On CUDA the tests turn TF32 off (`SessionOptions::exact_fp32`): with TF32 the trained
/// family's 20-step kohya LoRA case drifted to 1.6e-3 by step 16 on an H200 and 1.03e-3 in
/// another sitting (cuDNN picks its algorithms by timing).
fn tol(_device: katz_onnx::runtime::Device) -> f64 {
    1e-3
}

#[derive(Deserialize)]
struct Cases {
    bundle: String,
    controlnet: String,
    cases: Vec<Case>,
}

#[derive(Deserialize, Clone)]
struct CnCase {
    image: String,
    scale: f32,
    start: f32,
    end: f32,
}

#[derive(Deserialize, Clone)]
struct LoraCase {
    file: String,
    scale: f32,
}

#[derive(Deserialize, Clone)]
struct Case {
    name: String,
    scheduler: String,
    prompt: String,
    negative_prompt: Option<String>,
    steps: usize,
    guidance: f32,
    width: usize,
    height: usize,
    controlnets: Vec<CnCase>,
    loras: Vec<LoraCase>,
    tensors: String,
}

/// The tiny random bundles' references (`tools/export_bundle.py`).
const TINY: &str = "tests/data/parity";
/// The trained family's (`bundles/shapes`, `tools/shapes/parity_refs.py`): 128², 20 steps, its LoRAs
/// (peft and kohya layouts) and ControlNet, at the demo's settings.
const SHAPES: &str = "tests/data/parity-shapes";
/// The bundle `tools/export.sh --checkpoint tests/data/checkpoints/tiny-sdxl.safetensors` wrote
/// (`bundles/tiny-ckpt`, its ControlNet from the single-file ControlNet), against diffusers
/// loading that same file with `StableDiffusionXLPipeline.from_single_file` (docs/bundles.md,
/// "Checkpoints").
const CHECKPOINT: &str = "tests/data/parity-checkpoint";
/// LoRA files made by peft and diffusers (`tools/make_lora_fixtures.py`: the peft layout with both
/// text encoders' parts, the kohya layout from diffusers' `convert_state_dict_to_kohya`, a
/// text-encoder-only file, a kohya LoCon, a peft-layout LoRA on the convolutions) on the checkpoint
/// bundle, against diffusers' `load_lora_weights` of the same files.
const LORA: &str = "tests/data/parity-lora";
/// LoHa and LoKr files made by peft and named by LyCORIS (`tools/make_lycoris_fixtures.py`) on
/// the checkpoint bundle, against peft's adapters applied to diffusers' UNet (diffusers'
/// `load_lora_weights` refuses these files for SDXL).
const LYCORIS: &str = "tests/data/parity-lycoris";

fn cases(dir: &str) -> Cases {
    let p = root().join(dir).join("cases.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("cases.json")).expect("cases.json parses")
}

struct Recorded {
    bytes: Vec<u8>,
}

impl Recorded {
    fn get(&self, name: &str) -> Option<Vec<f32>> {
        let st = SafeTensors::deserialize(&self.bytes).expect("reference tensors");
        let t = st.tensor(name).ok()?;
        Some(
            t.data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        )
    }
    fn ids(&self, name: &str) -> Vec<i64> {
        let st = SafeTensors::deserialize(&self.bytes).expect("reference tensors");
        let t = st.tensor(name).expect("ids");
        t.data()
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

struct Collect(Vec<Tensor>);
impl Observer for Collect {
    fn on_step(&mut self, _: usize, _: usize, latents: &Tensor) -> katz_onnx::Result<()> {
        self.0.push(latents.clone());
        Ok(())
    }
    fn wants_latents(&self, _: usize) -> bool {
        true
    }
}

fn run_case(dir: &str, name: &str) {
    let all = cases(dir);
    let case = all
        .cases
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case {name}"))
        .clone();
    let rec = Recorded {
        bytes: std::fs::read(root().join(dir).join(&case.tensors)).unwrap(),
    };
    let opts = test_options();
    let tol = tol(opts.device);
    // KATZ_PARITY_BUNDLE / KATZ_PARITY_CONTROLNET: the tiny bundles' weights exported another
    // way (e.g. `export_bundle.py --attention mha`) must give the same images
    let other = |var: &str| std::env::var_os(var).filter(|_| dir == TINY).map(PathBuf::from);
    let bundle = other("KATZ_PARITY_BUNDLE").unwrap_or_else(|| root().join(&all.bundle));
    let cn_bundle = other("KATZ_PARITY_CONTROLNET").unwrap_or_else(|| root().join(&all.controlnet));
    let mut pipe = Pipeline::load(bundle, opts).expect("bundle loads");

    // the tokenizer gives diffusers' ids
    let ids = pipe.text_encoders().tokenize(0, &case.prompt).unwrap();
    assert_eq!(
        ids,
        rec.ids("input_ids"),
        "{name}: token ids differ from the HF tokenizer's"
    );

    let (kind, karras) = match case.scheduler.strip_suffix("-karras") {
        Some(k) => (k.parse().unwrap(), true),
        None => (case.scheduler.parse().unwrap(), false),
    };
    let mut controlnets = Vec::new();
    for c in &case.controlnets {
        let model = pipe.controlnet(&cn_bundle).unwrap();
        let image = read_conditioning(&root().join(&c.image), (case.width, case.height)).unwrap();
        controlnets.push(ControlRequest {
            prep: Default::default(),
            model: model.into(),
            image,
            scale: c.scale,
            start: c.start,
            end: c.end,
        });
    }
    let loras = case
        .loras
        .iter()
        .map(|l| LoraRequest::loaded(pipe.lora(root().join(&l.file)).unwrap(), l.scale))
        .collect();
    let req = Request {
        prompt: case.prompt.clone(),
        negative_prompt: case.negative_prompt.clone(),
        width: case.width,
        height: case.height,
        steps: case.steps,
        guidance: case.guidance,
        scheduler: kind,
        karras,
        seed: 0,
        controlnets,
        loras,
    };
    let mut noise = VecDeque::from([rec.get("init_noise").unwrap()]);
    for i in 0.. {
        match rec.get(&format!("step_noise_{i}")) {
            Some(n) => noise.push_back(n),
            None => break,
        }
    }
    let mut seen = Collect(Vec::new());
    let out =
        generate_with_noise(&mut pipe, &req, &mut RecordedNoise(noise), &mut seen).expect("generation runs");
    assert_eq!(seen.0.len(), case.steps);
    for (i, got) in seen.0.iter().enumerate() {
        let want = rec.get(&format!("latents_{i}")).unwrap();
        let err = rel_err(&got.data, &want);
        eprintln!("{name}: step {i} relative error {err:.2e}");
        assert!(
            err <= tol,
            "{name}: latents after step {i}: relative error {err:.2e} > {tol:.0e}"
        );
    }
    let want = rec.get("image").unwrap();
    let err = rel_err(&out.image.data, &want);
    assert!(
        err <= tol,
        "{name}: final image: relative error {err:.2e} > {tol:.0e}"
    );
    // the reference is no trivial image
    let mean = want.iter().map(|v| *v as f64).sum::<f64>() / want.len() as f64;
    let var = want.iter().map(|v| (*v as f64 - mean).powi(2)).sum::<f64>() / want.len() as f64;
    assert!(var > 1e-4, "{name}: reference image is flat");
    eprintln!("{name}: final image relative error {err:.2e}");
}

macro_rules! parity {
    ($dir:expr; $($t:ident),*) => {$(
        #[test]
        fn $t() { run_case($dir, stringify!($t)); }
    )*};
}

parity!(TINY;
    euler,
    euler_karras_negative,
    euler_a,
    ddim,
    dpmpp_2m,
    dpmpp_2m_karras_wide,
    controlnet,
    lora,
    two_controlnets_two_loras
);

// the trained family: katz follows diffusers step by step from the same initial latents, with
// each LoRA layout and the ControlNet (the stripes LoRA's weak style in katz's pictures is the
// noise's, not a difference of pipelines: docs/quality/README.md)
parity!(SHAPES; shapes_stripes, shapes_stripes_kohya, shapes_controlnet_pastel);

// a single-file (SGM layout) checkpoint as model sites publish it, exported and loaded by diffusers
parity!(CHECKPOINT; ckpt_euler, ckpt_euler_a_negative, ckpt_controlnet);

// LoRAs with text-encoder parts, in both layouts, alone and two in one job
parity!(LORA; lora_peft_te, lora_kohya_te, lora_te_only, lora_mixed);

// LoCon: kohya LoCon and peft's LoRA on the convolutions (with time_emb_proj and a text-encoder
// part), merged into the convolution weights the CPU bundle takes as inputs; and both in one job
// with a peft LoRA of linear layers
parity!(LORA; lora_locon, lora_peft_locon, lora_locon_mixed);

// DoRA (peft `use_dora`: a magnitude per output row) on linear layers and convolutions, alone and
// between two LoRAs (peft applies it to what the adapters before it made)
parity!(LORA; lora_dora, lora_dora_mixed);

/// A bundle whose convolutions take no weights (a GPU bundle: its map has no 4-D weights and no
/// `time_emb_proj`) refuses a LoCon file with an error naming its convolution keys, before any
/// step; with `unet_only` the file's other layers load and those parts are recorded as skipped.
#[test]
fn locon_on_a_bundle_without_conv_inputs_is_refused_naming_its_convolution_keys() {
    use katz_onnx::lora::{LoraAdapter, LoraParts};
    let all = cases(LORA);
    let bundle = katz_onnx::bundle::BaseBundle::open(root().join(&all.bundle)).expect("bundle opens");
    let full = &bundle.manifest.weights.map;
    let gpu_like: std::collections::BTreeMap<_, _> = full
        .iter()
        .filter(|(k, e)| e.shape.len() != 4 && !k.contains("time_emb_proj"))
        .map(|(k, e)| (k.clone(), e.clone()))
        .collect();
    assert!(
        gpu_like.len() < full.len(),
        "the CPU bundle takes its convolutions"
    );
    for file in ["kohya-locon", "peft-locon"] {
        let path = root().join(format!("tests/data/lora/{file}.safetensors"));
        let err = LoraAdapter::load(&path, &gpu_like)
            .err()
            .unwrap_or_else(|| panic!("{file} was taken"))
            .to_string();
        assert!(
            err.contains("keys are convolution LoRA factors") && err.contains(&format!("{file}.safetensors")),
            "{err}"
        );
        assert!(err.contains("conv1") || err.contains("conv_in"), "{err}");
        assert!(err.contains("unet_only"), "{err}");
        let a = LoraAdapter::load_with(&path, &gpu_like, LoraParts::Takeable).expect("unet_only loads");
        assert!(!a.untaken.conv.is_empty() && a.untaken.text_encoder.is_empty());
        // peft-locon adapts the resnets' time_emb_proj too, which GPU bundles keep constant
        assert_eq!(!a.untaken.time_emb.is_empty(), file == "peft-locon", "{file}");
        assert!(a.layers.keys().all(|w| gpu_like.contains_key(w)));
        // the full bundle takes every layer
        let all_in = LoraAdapter::load(&path, full).expect("the CPU bundle takes it");
        assert!(all_in.untaken.is_empty());
        assert!(all_in.layers.len() > a.layers.len(), "{file}");
    }
}

// LoHa and LoKr (LyCORIS naming), alone and two in one job
parity!(LYCORIS; loha, lokr, loha_lokr);

/// The peft-layout twins of the LoHa and LoKr files (their alphas live in the peft config, which
/// is not read): refused with an error naming the kind and its keys, before any step.
#[test]
fn peft_layout_loha_and_lokr_files_are_refused_naming_the_kind() {
    let pipe = Pipeline::load(root().join("bundles/tiny-ckpt"), test_options()).expect("bundle loads");
    for (file, kind, key) in [
        ("loha-peft.safetensors", "LoHa", "hada_w1_a"),
        ("lokr-peft.safetensors", "LoKr", "lokr_w1"),
    ] {
        let err = pipe
            .lora(root().join("tests/data/lycoris").join(file))
            .err()
            .unwrap_or_else(|| panic!("{file} was taken"))
            .to_string();
        assert!(
            err.contains(&format!("are {kind} factors")) && err.contains(key),
            "{file}: {err}"
        );
        assert!(err.contains("LyCORIS naming"), "{file}: {err}");
    }
}

#[test]
fn every_recorded_case_has_a_test() {
    let shapes: Vec<String> = cases(SHAPES).cases.into_iter().map(|c| c.name).collect();
    assert_eq!(
        shapes,
        [
            "shapes_stripes",
            "shapes_stripes_kohya",
            "shapes_controlnet_pastel"
        ]
    );
    let ckpt: Vec<String> = cases(CHECKPOINT).cases.into_iter().map(|c| c.name).collect();
    assert_eq!(ckpt, ["ckpt_euler", "ckpt_euler_a_negative", "ckpt_controlnet"]);
    let ly: Vec<String> = cases(LYCORIS).cases.into_iter().map(|c| c.name).collect();
    assert_eq!(ly, ["loha", "lokr", "loha_lokr"]);
    let lora: Vec<String> = cases(LORA).cases.into_iter().map(|c| c.name).collect();
    assert_eq!(
        lora,
        [
            "lora_peft_te",
            "lora_kohya_te",
            "lora_te_only",
            "lora_mixed",
            "lora_locon",
            "lora_peft_locon",
            "lora_locon_mixed",
            "lora_dora",
            "lora_dora_mixed"
        ]
    );
    let names: Vec<String> = cases(TINY).cases.into_iter().map(|c| c.name).collect();
    let tested = [
        "euler",
        "euler_karras_negative",
        "euler_a",
        "ddim",
        "dpmpp_2m",
        "dpmpp_2m_karras_wide",
        "controlnet",
        "lora",
        "two_controlnets_two_loras",
    ];
    assert_eq!(names, tested);
    assert!(Path::new(&root().join("tests/data/parity")).is_dir());
}
