//! Test fixtures shared by the LoRA tests: safetensors files made in memory.

use std::collections::HashMap;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

/// The kohya name of a diffusers module: `lora_unet_` + the module with `.` → `_`.
pub(super) fn kohya_name(module: &str) -> String {
    format!("lora_unet_{}", module.replace('.', "_"))
}

/// A tensor to serialize: key, shape, f32 values.
pub(super) type Entry = (String, Vec<usize>, Vec<f32>);

/// A safetensors file of these f32 tensors.
pub(super) fn serialize(entries: &[Entry], metadata: Option<HashMap<String, String>>) -> Vec<u8> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = entries
        .iter()
        .map(|(k, s, v)| {
            (
                k.clone(),
                s.clone(),
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
        .collect();
    let views: Vec<(String, TensorView<'_>)> = bytes
        .iter()
        .map(|(k, s, b)| (k.clone(), TensorView::new(Dtype::F32, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, metadata).unwrap()
}

/// Deterministic values in [-1, 1) (xorshift from `seed`).
pub(super) fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}
