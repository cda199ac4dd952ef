//! The tiled VAE decode (katz_onnx::vae) against diffusers' own `tiled_decode`.
//!
//! `tools/vae_check.py --reference tests/data/vae` ran diffusers' `AutoencoderKL.decode` with
//! `enable_tiling()` and tiles of 64 px (latent 8, overlap 0.25) on the committed tiny bundle's
//! VAE weights: a 14×11 latent in 3×2 tiles, the last row and column partial. The test decodes
//! the same latent tile by tile through the bundle's `vae_decoder.onnx` and compares by relative
//! error (fp32, as the parity tests: ≤ 1e-3); the whole-image decode differs from it by ~0.6, so
//! the comparison sees the tiling.

mod common;
use common::*;

use katz_kernels::rel_err;
use katz_onnx::tensor::Tensor;
use katz_onnx::vae::{self, Tiling};
use safetensors::SafeTensors;

fn tensor(st: &SafeTensors, name: &str) -> Tensor {
    let t = st.tensor(name).expect(name);
    let data = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Tensor::new(t.shape().to_vec(), data)
}

#[test]
fn tiled_decode_matches_diffusers() {
    let bytes = std::fs::read(root().join("tests/data/vae/tiled.safetensors")).expect("reference");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (latent, want) = (tensor(&st, "latent"), tensor(&st, "image"));
    let opts = test_options();
    katz_onnx::runtime::init().unwrap();
    let mut session =
        katz_onnx::runtime::session(&root().join("bundles/tiny-sdxl/vae_decoder.onnx"), &opts).unwrap();
    let tiling = Tiling::new(64, 8);
    let mut tiles = 0;
    let got = vae::decode(&latent, Some(&tiling), |x| {
        tiles += 1;
        vae::run(&mut session, x)
    })
    .unwrap();
    assert_eq!(tiles, 6);
    assert_eq!(got.shape, want.shape);
    let err = rel_err(&got.data, &want.data);
    assert!(err < 1e-3, "tiled decode vs diffusers: relative error {err:.2e}");
    let whole = vae::run(&mut session, &latent).unwrap();
    assert!(
        rel_err(&whole.data, &want.data) > 0.1,
        "the reference is not tiled"
    );
}

#[test]
fn the_pipeline_decodes_its_default_size_whole() {
    // the tiny bundle's VAE tile is its default size (128 px): 128² whole, 256² tiled
    let b = katz_onnx::bundle::BaseBundle::open(root().join("bundles/tiny-sdxl")).unwrap();
    let t = b.manifest.vae_tiling();
    assert_eq!((t.tile_sample, t.tile_latent), (128, 16));
    assert!(!t.applies(16, 16) && t.applies(32, 32));
}
