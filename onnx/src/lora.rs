//! LoRA adapters in the diffusers/peft safetensors layout, mapped onto a bundle's weights.
//!
//! Keys: `[unet.]<module>.lora_A.weight` (`[r, in]`) and `[unet.]<module>.lora_B.weight`
//! (`[out, r]`); `<module>.alpha` scalars where present. Alpha otherwise comes from the
//! `lora_adapter_metadata` JSON that diffusers' `save_lora_weights` writes into the file's
//! metadata (`unet.lora_alpha`), and defaults to the rank (scale 1), as diffusers does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use crate::bundle::WeightEntry;
use crate::weights::to_f32;
use crate::{Error, Result};

/// One adapted weight: `ΔW = (alpha / rank) · B · A`.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub alpha: f32,
}

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub path: PathBuf,
    pub name: String,
    /// By weight name of the bundle (`…to_q.weight`).
    pub layers: BTreeMap<String, LoraLayer>,
}

fn err(path: &Path, message: impl Into<String>) -> Error {
    Error::Lora {
        path: path.into(),
        message: message.into(),
    }
}

fn metadata_alpha(st_meta: Option<&std::collections::HashMap<String, String>>) -> Option<f32> {
    let raw = st_meta?.get("lora_adapter_metadata")?;
    let v: serde_json::Value = serde_json::from_str(raw).ok()?;
    for key in ["unet.lora_alpha", "lora_alpha"] {
        if let Some(a) = v.get(key).and_then(|a| a.as_f64()) {
            return Some(a as f32);
        }
    }
    None
}

impl LoraAdapter {
    /// Reads a LoRA file and maps it onto `weights` (a bundle's weight map).
    pub fn load(path: &Path, weights: &BTreeMap<String, WeightEntry>) -> Result<Self> {
        if !path.is_file() {
            return Err(err(path, "no such file"));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
        let st = SafeTensors::deserialize(&bytes)
            .map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
        let file_alpha = metadata_alpha(meta.metadata().as_ref());

        let mut a_of: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
        let mut b_of: BTreeMap<String, (Vec<usize>, Vec<f32>)> = BTreeMap::new();
        let mut alpha_of: BTreeMap<String, f32> = BTreeMap::new();
        let mut unmatched = Vec::new();
        for (key, t) in st.tensors() {
            let k = key.strip_prefix("unet.").unwrap_or(&key);
            let data = || {
                to_f32(t.dtype(), t.data())
                    .ok_or_else(|| err(path, format!("`{key}` has unsupported dtype {:?}", t.dtype())))
            };
            let (module, slot) = if let Some(m) = k.strip_suffix(".lora_A.weight") {
                (m, 'A')
            } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                (m, 'B')
            } else if let Some(m) = k.strip_suffix(".alpha") {
                (m, 'a')
            } else {
                unmatched.push(key.clone());
                continue;
            };
            let weight = format!("{module}.weight");
            if !weights.contains_key(&weight) {
                unmatched.push(key.clone());
                continue;
            }
            match slot {
                'A' => {
                    a_of.insert(weight, (t.shape().to_vec(), data()?));
                }
                'B' => {
                    b_of.insert(weight, (t.shape().to_vec(), data()?));
                }
                _ => {
                    let v = data()?;
                    alpha_of.insert(
                        weight,
                        *v.first().ok_or_else(|| err(path, format!("`{key}` is empty")))?,
                    );
                }
            }
        }
        if !unmatched.is_empty() {
            unmatched.sort();
            let hint = if a_of.is_empty() && b_of.is_empty() {
                " — no key matches any weight of this bundle: is the LoRA for another architecture, or in the \
                 kohya layout (not read yet)?"
            } else {
                ""
            };
            return Err(err(
                path,
                format!(
                    "{} keys match no weight of the bundle: {}{}{hint}",
                    unmatched.len(),
                    unmatched.iter().take(4).cloned().collect::<Vec<_>>().join(", "),
                    if unmatched.len() > 4 { ", …" } else { "" }
                ),
            ));
        }
        if a_of.is_empty() {
            return Err(err(path, "holds no LoRA layers (no `lora_A`/`lora_B` keys)"));
        }
        let mut layers = BTreeMap::new();
        for (weight, (ashape, a)) in a_of {
            let (bshape, b) = b_of
                .remove(&weight)
                .ok_or_else(|| err(path, format!("`{weight}` has lora_A but no lora_B")))?;
            let target = &weights[&weight].shape;
            let ok = ashape.len() == 2
                && bshape.len() == 2
                && ashape[0] == bshape[1]
                && bshape[0] == target[0]
                && ashape[1] == target[1];
            if !ok {
                return Err(err(
                    path,
                    format!(
                        "`{weight}`: lora_B {bshape:?} · lora_A {ashape:?} does not make the weight's {target:?} \
                         (a LoRA for another architecture?)"
                    ),
                ));
            }
            let rank = ashape[0];
            let alpha = alpha_of
                .get(&weight)
                .copied()
                .or(file_alpha)
                .unwrap_or(rank as f32);
            layers.insert(weight, LoraLayer { a, b, rank, alpha });
        }
        if let Some(w) = b_of.keys().next() {
            return Err(err(path, format!("`{w}` has lora_B but no lora_A")));
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(LoraAdapter {
            path: path.to_path_buf(),
            name,
            layers,
        })
    }
}
