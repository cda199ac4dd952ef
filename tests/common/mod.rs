//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

mod bus;
mod worker;
#[allow(unused_imports)] // not every test uses the bus
pub use bus::*;
#[allow(unused_imports)]
pub use worker::Worker;

use katz_onnx::runtime::SessionOptions;

/// The repository: `KATZ_REPO` where the test binary runs elsewhere (the GPU host).
pub fn root() -> PathBuf {
    std::env::var_os("KATZ_REPO")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The `katz` binary the tests run: `KATZ_BIN` where the test binary runs on another machine
/// than the one that built it (the GPU host), else cargo's.
pub fn katz_bin() -> PathBuf {
    std::env::var_os("KATZ_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_katz")))
}

/// One test body for every device: KATZ_TEST_DEVICE=cuda:0 runs it on the GPU.
pub fn test_options() -> SessionOptions {
    let device = std::env::var("KATZ_TEST_DEVICE")
        .ok()
        .map(|d| d.parse().expect("KATZ_TEST_DEVICE"))
        .unwrap_or_default();
    SessionOptions {
        intra_threads: 1,
        device,
        // correctness against fp32 references: no TF32 on CUDA
        exact_fp32: true,
        deterministic: true,
        ..SessionOptions::default()
    }
}

/// Writes a LoRA in the kohya layout (`lora_unet_<module>.lora_down/lora_up/alpha`) with seeded
/// random factors of rank `rank` for every UNet weight of the tiny base bundle (LoCon factors for
/// its convolutions); returns its path.
pub fn write_kohya_lora(path: &std::path::Path, rank: usize, seed: u64) -> PathBuf {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root().join("bundles/tiny-sdxl/bundle.json")).unwrap())
            .unwrap();
    let map = manifest["weights"]["map"].as_object().unwrap();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut rand = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
    };
    let bytes = |v: Vec<f32>| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, e) in map {
        let shape: Vec<usize> = e["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        // the UNet's weights only (text-encoder LoRAs: tests/parity.rs, made by peft)
        if !e["graph"].as_str().unwrap().starts_with("unet_") {
            continue;
        }
        let module = name.strip_suffix(".weight").unwrap().replace('.', "_");
        let key = format!("lora_unet_{module}");
        // a convolution [out, in, kh, kw] (LoCon): down [r, in, kh, kw], up [out, r, 1, 1]
        let (down_shape, up_shape) = match shape.as_slice() {
            [o, i, kh, kw] => (vec![rank, *i, *kh, *kw], vec![*o, rank, 1, 1]),
            _ => (vec![rank, shape[1]], vec![shape[0], rank]),
        };
        let down: Vec<f32> = (0..down_shape.iter().product()).map(|_| rand()).collect();
        let up: Vec<f32> = (0..shape[0] * rank).map(|_| rand()).collect();
        tensors.push((format!("{key}.lora_down.weight"), down_shape, bytes(down)));
        tensors.push((format!("{key}.lora_up.weight"), up_shape, bytes(up)));
        tensors.push((format!("{key}.alpha"), vec![], bytes(vec![rank as f32 / 2.0])));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(k, s, b)| {
            (
                k.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    path.to_path_buf()
}

/// A LoRA store for tests: the committed tiny LoRAs a and b, and a kohya-layout `tiny-lora-c`.
pub fn test_lora_store(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("katz-loras-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for n in ["tiny-lora-a", "tiny-lora-b"] {
        std::fs::copy(
            root().join(format!("bundles/loras/{n}.safetensors")),
            dir.join(format!("{n}.safetensors")),
        )
        .unwrap();
    }
    write_kohya_lora(&dir.join("tiny-lora-c.safetensors"), 4, 7);
    dir
}

/// Checks `r` against `p` and runs it with its seeded noise (what most tests do).
pub fn generate(
    p: &mut katz_onnx::pipeline::Pipeline,
    r: &katz_onnx::request::Request,
    obs: &mut dyn katz_onnx::pipeline::Observer,
) -> katz_onnx::Result<katz_onnx::pipeline::Generated> {
    let v = p.validate(r.clone())?;
    p.run(&v, katz_onnx::pipeline::RunOptions::default().observer(obs))
}

/// [`generate`] with the noise, LoRA plan and ControlNet service given.
pub fn generate_with(
    p: &mut katz_onnx::pipeline::Pipeline,
    r: &katz_onnx::request::Request,
    noise: &mut dyn katz_onnx::scheduler::NoiseSource,
    obs: &mut dyn katz_onnx::pipeline::Observer,
    plan: katz_onnx::pipeline::LoraPlan<'_>,
    control: Option<&mut dyn katz_onnx::controlnet::ControlService>,
) -> katz_onnx::Result<katz_onnx::pipeline::Generated> {
    let mut accepts = p.accepts();
    accepts.served = r.controlnets.len();
    let v = katz_onnx::request::ValidRequest::new(r.clone(), &accepts)?;
    let mut opts = katz_onnx::pipeline::RunOptions::default()
        .noise(noise)
        .observer(obs)
        .lora(plan);
    if let Some(c) = control {
        opts = opts.control(c);
    }
    p.run(&v, opts)
}

/// [`generate_with`] with the pipeline's own ControlNets.
pub fn generate_planned(
    p: &mut katz_onnx::pipeline::Pipeline,
    r: &katz_onnx::request::Request,
    noise: &mut dyn katz_onnx::scheduler::NoiseSource,
    obs: &mut dyn katz_onnx::pipeline::Observer,
    plan: katz_onnx::pipeline::LoraPlan<'_>,
) -> katz_onnx::Result<katz_onnx::pipeline::Generated> {
    generate_with(p, r, noise, obs, plan, None)
}

/// [`generate_with`] with the LoRAs merged before step 0 and the pipeline's own ControlNets.
pub fn generate_with_noise(
    p: &mut katz_onnx::pipeline::Pipeline,
    r: &katz_onnx::request::Request,
    noise: &mut dyn katz_onnx::scheduler::NoiseSource,
    obs: &mut dyn katz_onnx::pipeline::Observer,
) -> katz_onnx::Result<katz_onnx::pipeline::Generated> {
    generate_with(p, r, noise, obs, katz_onnx::pipeline::LoraPlan::Sync, None)
}

/// A conditioning image of any size (`[1, 3, h, w]` in [0, 1]): a checkerboard of 8-pixel cells.
#[allow(dead_code)]
pub fn checkerboard(w: usize, h: usize) -> katz_onnx::tensor::Tensor {
    let mut data = Vec::with_capacity(3 * w * h);
    for _ in 0..3 {
        for y in 0..h {
            for x in 0..w {
                data.push(((x / 8 + y / 8) % 2) as f32);
            }
        }
    }
    katz_onnx::tensor::Tensor::new(vec![1, 3, h, w], data)
}
