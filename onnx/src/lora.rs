//! LoRA adapters in safetensors files, mapped onto a bundle's weights. Two layouts are read:
//!
//! * diffusers/peft: `[unet.]<module>.lora_A.weight` (`[r, in]`) and `[unet.]<module>.lora_B.weight`
//!   (`[out, r]`); `<module>.alpha` scalars where present. Alpha otherwise comes from the
//!   `lora_adapter_metadata` JSON that diffusers' `save_lora_weights` writes into the file's
//!   metadata (`unet.lora_alpha`), and defaults to the rank (scale 1), as diffusers does.
//! * kohya (sd-scripts, A1111): `lora_unet_<module with '.' → '_'>.lora_down.weight` (`[r, in]`, = A),
//!   `.lora_up.weight` (`[out, r]`, = B) and `.alpha` (scalar). Module names are those of the bundle's
//!   weights (diffusers names). Text-encoder keys (`lora_te_…`, `lora_te1_…`, `lora_te2_…`) and
//!   convolution LoRAs (4-D factors) are refused with an error naming them, never skipped.
//!
//! A file is in one layout or the other; a file that mixes them is refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use crate::bundle::WeightEntry;
use crate::weights::to_f32;
use crate::{Error, Result};

/// One adapted weight: `ΔW = (alpha / rank) · B · A`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraLayer {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub rank: usize,
    pub alpha: f32,
}

/// The key layout a LoRA file was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraLayout {
    /// diffusers / peft: `<module>.lora_A.weight`, `<module>.lora_B.weight`.
    Peft,
    /// kohya sd-scripts: `lora_unet_<module_>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
}

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub path: PathBuf,
    pub name: String,
    pub layout: LoraLayout,
    /// By weight name of the bundle (`…to_q.weight`).
    pub layers: BTreeMap<String, LoraLayer>,
}

fn err(path: &Path, message: impl Into<String>) -> Error {
    Error::Lora {
        path: path.into(),
        message: message.into(),
    }
}

fn metadata_alpha(st_meta: Option<&HashMap<String, String>>) -> Option<f32> {
    let raw = st_meta?.get("lora_adapter_metadata")?;
    let v: serde_json::Value = serde_json::from_str(raw).ok()?;
    for key in ["unet.lora_alpha", "lora_alpha"] {
        if let Some(a) = v.get(key).and_then(|a| a.as_f64()) {
            return Some(a as f32);
        }
    }
    None
}

/// Up to 4 names, then `, …`.
fn some(names: &[String]) -> String {
    let mut s = names.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 4 {
        s.push_str(", …");
    }
    s
}

const KOHYA_UNET: &str = "lora_unet_";
const KOHYA_TE: [&str; 3] = ["lora_te1_", "lora_te2_", "lora_te_"];

fn is_kohya_key(key: &str) -> bool {
    key.starts_with(KOHYA_UNET) || KOHYA_TE.iter().any(|p| key.starts_with(p))
}

fn is_peft_key(key: &str) -> bool {
    !is_kohya_key(key) && (key.ends_with(".lora_A.weight") || key.ends_with(".lora_B.weight"))
}

/// Which factor of a layer a key holds.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Slot {
    A,
    B,
    Alpha,
}

/// `<module><a_suffix>`, `<module><b_suffix>` or `<module>.alpha` → module and slot.
fn split_key<'k>(key: &'k str, a_suffix: &str, b_suffix: &str) -> Option<(&'k str, Slot)> {
    if let Some(m) = key.strip_suffix(a_suffix) {
        Some((m, Slot::A))
    } else if let Some(m) = key.strip_suffix(b_suffix) {
        Some((m, Slot::B))
    } else {
        key.strip_suffix(".alpha").map(|m| (m, Slot::Alpha))
    }
}

/// What the keys of a file say, by bundle weight name.
#[derive(Default)]
struct Collected {
    a: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    b: BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    alpha: BTreeMap<String, f32>,
}

impl Collected {
    fn put(
        &mut self,
        path: &Path,
        key: &str,
        weight: String,
        slot: Slot,
        shape: Vec<usize>,
        data: Vec<f32>,
    ) -> Result<()> {
        let dup = match slot {
            Slot::A => self.a.insert(weight.clone(), (shape, data)).is_some(),
            Slot::B => self.b.insert(weight.clone(), (shape, data)).is_some(),
            Slot::Alpha => {
                let v = *data
                    .first()
                    .ok_or_else(|| err(path, format!("`{key}` is empty")))?;
                self.alpha.insert(weight.clone(), v).is_some()
            }
        };
        if dup {
            return Err(err(
                path,
                format!("`{key}`: a second key for the same factor of `{weight}`"),
            ));
        }
        Ok(())
    }
}

impl LoraAdapter {
    /// Reads a LoRA file and maps it onto `weights` (a bundle's weight map).
    pub fn load(path: &Path, weights: &BTreeMap<String, WeightEntry>) -> Result<Self> {
        if !path.is_file() {
            return Err(err(path, "no such file"));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::parse(&bytes, path, weights)
    }

    /// Maps the safetensors file in `bytes` onto `weights` (a bundle's weight map); `origin` (a
    /// name or path) is the adapter's `path`, names it in errors and gives its `name` (the stem).
    pub fn from_bytes(bytes: &[u8], origin: &str, weights: &BTreeMap<String, WeightEntry>) -> Result<Self> {
        Self::parse(bytes, Path::new(origin), weights)
    }

    /// Bytes of the f32 factors held.
    pub fn nbytes(&self) -> usize {
        4 * self.layers.values().map(|l| l.a.len() + l.b.len()).sum::<usize>()
    }

    /// The key layout of the file it was read from.
    pub fn layout(&self) -> LoraLayout {
        self.layout
    }

    fn parse(bytes: &[u8], path: &Path, weights: &BTreeMap<String, WeightEntry>) -> Result<Self> {
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
        let st =
            SafeTensors::deserialize(bytes).map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
        let file_alpha = metadata_alpha(meta.metadata().as_ref());
        let mut tensors = st.tensors();
        tensors.sort_by(|x, y| x.0.cmp(&y.0));

        let kohya: Vec<String> = tensors
            .iter()
            .filter(|(k, _)| is_kohya_key(k))
            .map(|(k, _)| k.clone())
            .collect();
        let peft: Vec<String> = tensors
            .iter()
            .filter(|(k, _)| is_peft_key(k))
            .map(|(k, _)| k.clone())
            .collect();
        if !kohya.is_empty() && !peft.is_empty() {
            return Err(err(
                path,
                format!(
                    "mixes the diffusers/peft layout ({}) and the kohya layout ({}): a file must be in one layout",
                    some(&peft),
                    some(&kohya)
                ),
            ));
        }
        let layout = if kohya.is_empty() {
            LoraLayout::Peft
        } else {
            LoraLayout::Kohya
        };

        let (a_name, b_name) = match layout {
            LoraLayout::Peft => ("lora_A", "lora_B"),
            LoraLayout::Kohya => ("lora_down", "lora_up"),
        };
        let kohya_lookup = match layout {
            LoraLayout::Kohya => kohya_lookup(weights),
            LoraLayout::Peft => HashMap::new(),
        };

        let mut got = Collected::default();
        let mut unmatched = Vec::new();
        let mut text_encoder = Vec::new();
        let mut conv = Vec::new();
        let mut conv_modules = HashSet::new();
        for (key, t) in &tensors {
            let located = match layout {
                LoraLayout::Peft => {
                    let k = key.strip_prefix("unet.").unwrap_or(key);
                    split_key(k, ".lora_A.weight", ".lora_B.weight")
                        .map(|(m, slot)| (format!("{m}.weight"), slot))
                        .filter(|(w, _)| weights.contains_key(w))
                }
                LoraLayout::Kohya => {
                    if KOHYA_TE.iter().any(|p| key.starts_with(p)) {
                        text_encoder.push(key.clone());
                        continue;
                    }
                    let split = split_key(key, ".lora_down.weight", ".lora_up.weight");
                    if let Some((m, Slot::A | Slot::B)) = split {
                        if t.shape().len() != 2 {
                            conv.push(format!("{key} {:?}", t.shape()));
                            conv_modules.insert(m.to_string());
                            continue;
                        }
                    }
                    match split.and_then(|(m, slot)| Some((kohya_lookup.get(m)?, slot))) {
                        Some((Some(w), slot)) => Some((w.to_string(), slot)),
                        Some((None, _)) => {
                            return Err(err(
                                path,
                                format!("`{key}`: its module name fits more than one weight of the bundle"),
                            ))
                        }
                        None => None,
                    }
                }
            };
            let Some((weight, slot)) = located else {
                unmatched.push(key.clone());
                continue;
            };
            let data = to_f32(t.dtype(), t.data())
                .ok_or_else(|| err(path, format!("`{key}` has unsupported dtype {:?}", t.dtype())))?;
            got.put(path, key, weight, slot, t.shape().to_vec(), data)?;
        }

        // The alphas of refused convolution layers are not reported again as unmatched.
        unmatched.retain(|k| !k.strip_suffix(".alpha").is_some_and(|m| conv_modules.contains(m)));
        let mut problems = Vec::new();
        if !text_encoder.is_empty() {
            problems.push(format!(
                "{} keys adapt a text encoder ({}): the text-encoder part of a LoRA is not supported by this \
                 bundle (only UNet weights take LoRAs)",
                text_encoder.len(),
                some(&text_encoder)
            ));
        }
        if !conv.is_empty() {
            problems.push(format!(
                "{} keys are convolution LoRA factors ({}): only linear (2-D) LoRA layers are supported",
                conv.len(),
                some(&conv)
            ));
        }
        if !unmatched.is_empty() {
            let hint = if layout == LoraLayout::Kohya
                && unmatched.iter().any(|k| {
                    ["input_blocks_", "middle_block_", "output_blocks_"]
                        .iter()
                        .any(|b| k.starts_with(&format!("{KOHYA_UNET}{b}")))
                }) {
                " — kohya keys with the original (SGM) UNet block names (input_blocks, middle_block, \
                 output_blocks) are not mapped: only keys made from the diffusers module names are read"
            } else if got.a.is_empty() && got.b.is_empty() {
                " — no key matches any weight of this bundle: is the LoRA for another architecture?"
            } else {
                ""
            };
            problems.push(format!(
                "{} keys match no weight of the bundle: {}{hint}",
                unmatched.len(),
                some(&unmatched)
            ));
        }
        if !problems.is_empty() {
            return Err(err(path, problems.join("; ")));
        }
        if got.a.is_empty() {
            return Err(err(
                path,
                "holds no LoRA layers (no `lora_A`/`lora_B` or `lora_down`/`lora_up` keys)",
            ));
        }

        let mut layers = BTreeMap::new();
        for (weight, (ashape, a)) in std::mem::take(&mut got.a) {
            let (bshape, b) = got
                .b
                .remove(&weight)
                .ok_or_else(|| err(path, format!("`{weight}` has {a_name} but no {b_name}")))?;
            let target = &weights[&weight].shape;
            let ok = ashape.len() == 2
                && bshape.len() == 2
                && target.len() == 2
                && ashape[0] == bshape[1]
                && bshape[0] == target[0]
                && ashape[1] == target[1];
            if !ok {
                return Err(err(
                    path,
                    format!(
                        "`{weight}`: {b_name} {bshape:?} · {a_name} {ashape:?} does not make the weight's {target:?} \
                         (a LoRA for another architecture?)"
                    ),
                ));
            }
            let rank = ashape[0];
            let alpha = got
                .alpha
                .get(&weight)
                .copied()
                .or(file_alpha)
                .unwrap_or(rank as f32);
            layers.insert(weight, LoraLayer { a, b, rank, alpha });
        }
        if let Some(w) = got.b.keys().next() {
            return Err(err(path, format!("`{w}` has {b_name} but no {a_name}")));
        }
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Ok(LoraAdapter {
            path: path.to_path_buf(),
            name,
            layout,
            layers,
        })
    }
}

/// kohya module name (`lora_unet_` + module with `.` → `_`) → bundle weight name; `None` where two
/// weights give the same kohya name.
fn kohya_lookup(weights: &BTreeMap<String, WeightEntry>) -> HashMap<String, Option<&str>> {
    let mut lookup: HashMap<String, Option<&str>> = HashMap::new();
    for w in weights.keys() {
        let Some(module) = w.strip_suffix(".weight") else {
            continue;
        };
        let key = format!("{KOHYA_UNET}{}", module.replace('.', "_"));
        lookup
            .entry(key)
            .and_modify(|v| *v = None)
            .or_insert(Some(w.as_str()));
    }
    lookup
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;
    use safetensors::Dtype;

    const Q: &str = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
    const FF: &str = "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj";
    const OUT: &str = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0";
    const PROJ_IN: &str = "down_blocks.1.attentions.0.proj_in";

    /// module → (out, in)
    const MODULES: [(&str, usize, usize); 4] = [(Q, 8, 6), (FF, 12, 6), (OUT, 6, 8), (PROJ_IN, 6, 6)];

    fn weight_map() -> BTreeMap<String, WeightEntry> {
        MODULES
            .iter()
            .map(|&(m, o, i)| {
                (
                    format!("{m}.weight"),
                    WeightEntry {
                        graph: "unet_encoder".into(),
                        shape: vec![o, i],
                    },
                )
            })
            .collect()
    }

    fn kohya_name(module: &str) -> String {
        format!("lora_unet_{}", module.replace('.', "_"))
    }

    /// A tensor to serialize: key, shape, f32 values.
    type Entry = (String, Vec<usize>, Vec<f32>);

    fn serialize(entries: &[Entry], metadata: Option<HashMap<String, String>>) -> Vec<u8> {
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

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
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

    /// Rank-`r` factors for every module: (module, A [r,in], B [out,r], alpha).
    fn factors(r: usize) -> Vec<(&'static str, Vec<f32>, Vec<f32>, f32)> {
        MODULES
            .iter()
            .enumerate()
            .map(|(i, &(m, o, inp))| {
                (
                    m,
                    values(r * inp, 2 * i as u64),
                    values(o * r, 2 * i as u64 + 1),
                    1.5 + i as f32,
                )
            })
            .collect()
    }

    fn peft_entries(r: usize) -> Vec<Entry> {
        let mut e = Vec::new();
        for (i, (m, a, b, alpha)) in factors(r).into_iter().enumerate() {
            let inp = a.len() / r;
            let out = b.len() / r;
            // Half of the keys carry the `unet.` prefix, as diffusers writes them.
            let p = if i % 2 == 0 { "unet." } else { "" };
            e.push((format!("{p}{m}.lora_A.weight"), vec![r, inp], a));
            e.push((format!("{p}{m}.lora_B.weight"), vec![out, r], b));
            e.push((format!("{p}{m}.alpha"), vec![], vec![alpha]));
        }
        e
    }

    fn kohya_entries(r: usize) -> Vec<Entry> {
        let mut e = Vec::new();
        for (m, a, b, alpha) in factors(r) {
            let inp = a.len() / r;
            let out = b.len() / r;
            let k = kohya_name(m);
            e.push((format!("{k}.lora_down.weight"), vec![r, inp], a));
            e.push((format!("{k}.lora_up.weight"), vec![out, r], b));
            e.push((format!("{k}.alpha"), vec![], vec![alpha]));
        }
        e
    }

    fn load(entries: &[Entry]) -> Result<LoraAdapter> {
        LoraAdapter::from_bytes(
            &serialize(entries, None),
            "mem/test-lora.safetensors",
            &weight_map(),
        )
    }

    fn load_err(entries: &[Entry]) -> String {
        match load(entries) {
            Ok(_) => panic!("loaded where an error was expected"),
            Err(e) => {
                assert!(matches!(e, Error::Lora { .. }), "{e:?}");
                e.to_string()
            }
        }
    }

    #[test]
    fn peft_and_kohya_give_the_same_layers() {
        let peft = load(&peft_entries(3)).unwrap();
        let kohya = load(&kohya_entries(3)).unwrap();
        assert_eq!(peft.layout(), LoraLayout::Peft);
        assert_eq!(kohya.layout(), LoraLayout::Kohya);
        assert_eq!(peft.layers.len(), MODULES.len());
        assert_eq!(peft.layers, kohya.layers);
        for (m, a, b, alpha) in factors(3) {
            let l = &kohya.layers[&format!("{m}.weight")];
            assert_eq!((l.rank, l.alpha), (3, alpha));
            assert_eq!((&l.a, &l.b), (&a, &b));
        }
        assert_eq!(kohya.name, "test-lora");
        assert_eq!(kohya.path, PathBuf::from("mem/test-lora.safetensors"));
        let floats: usize = MODULES.iter().map(|&(_, o, i)| 3 * (o + i)).sum();
        assert_eq!(kohya.nbytes(), 4 * floats);
        assert_eq!(peft.nbytes(), kohya.nbytes());
    }

    #[test]
    fn kohya_alpha_comes_from_its_alpha_key() {
        let mut e = kohya_entries(2);
        let k = format!("{}.alpha", kohya_name(FF));
        e.iter_mut().find(|x| x.0 == k).unwrap().2 = vec![7.25];
        // Without an `.alpha`, alpha defaults to the rank.
        let q = format!("{}.alpha", kohya_name(Q));
        e.retain(|x| x.0 != q);
        let l = load(&e).unwrap();
        assert_eq!(l.layers[&format!("{FF}.weight")].alpha, 7.25);
        assert_eq!(l.layers[&format!("{Q}.weight")].alpha, 2.0);
        assert_eq!(l.layers[&format!("{OUT}.weight")].alpha, 3.5);
    }

    #[test]
    fn peft_alpha_falls_back_to_metadata_then_rank() {
        let e: Vec<Entry> = peft_entries(2)
            .into_iter()
            .filter(|x| !x.0.ends_with(".alpha"))
            .collect();
        let w = weight_map();
        let meta = HashMap::from([(
            "lora_adapter_metadata".to_string(),
            r#"{"unet.lora_alpha": 16.0, "unet.r": 2}"#.to_string(),
        )]);
        let l = LoraAdapter::from_bytes(&serialize(&e, Some(meta)), "m", &w).unwrap();
        assert!(l.layers.values().all(|l| l.alpha == 16.0));
        let l = LoraAdapter::from_bytes(&serialize(&e, None), "m", &w).unwrap();
        assert!(l.layers.values().all(|l| l.alpha == 2.0));
    }

    #[test]
    fn unmatched_keys_are_named() {
        for mut e in [peft_entries(2), kohya_entries(2)] {
            let kohya = e[0].0.starts_with("lora_unet_");
            let key = if kohya {
                "lora_unet_up_blocks_9_attentions_0_proj_in.lora_down.weight".to_string()
            } else {
                "up_blocks.9.attentions.0.proj_in.lora_A.weight".to_string()
            };
            e.push((key.clone(), vec![2, 6], vec![0.0; 12]));
            let m = load_err(&e);
            assert!(m.contains("1 keys match no weight") && m.contains(&key), "{m}");
        }
        // kohya keys with SGM block names get a hint.
        let mut e = kohya_entries(2);
        let key = "lora_unet_input_blocks_4_1_proj_in.lora_down.weight".to_string();
        e.push((key.clone(), vec![2, 6], vec![0.0; 12]));
        let m = load_err(&e);
        assert!(m.contains(&key) && m.contains("SGM"), "{m}");
    }

    #[test]
    fn kohya_text_encoder_keys_are_refused() {
        let mut e = kohya_entries(2);
        let keys = [
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
            "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight",
            "lora_te_text_model_encoder_layers_0_self_attn_k_proj.alpha",
        ];
        for k in keys {
            e.push((k.to_string(), vec![2, 6], vec![0.0; 12]));
        }
        let m = load_err(&e);
        assert!(m.contains("3 keys adapt a text encoder"), "{m}");
        assert!(
            m.contains("text-encoder part of a LoRA is not supported by this bundle"),
            "{m}"
        );
        for k in keys {
            assert!(m.contains(k), "{m}");
        }
        // A file of text-encoder keys only is refused too.
        let m = load_err(&[(keys[0].to_string(), vec![2, 6], vec![0.0; 12])]);
        assert!(m.contains("text-encoder part"), "{m}");
    }

    #[test]
    fn mixed_layouts_are_refused() {
        let mut e = kohya_entries(2);
        e.extend(peft_entries(2).into_iter().take(2));
        let m = load_err(&e);
        assert!(
            m.contains("mixes the diffusers/peft layout") && m.contains("kohya layout"),
            "{m}"
        );
        assert!(
            m.contains("lora_A.weight") && m.contains("lora_down.weight"),
            "{m}"
        );
    }

    #[test]
    fn kohya_conv_factors_are_refused() {
        let mut e = kohya_entries(2);
        let k = kohya_name("down_blocks.0.resnets.0.conv1");
        e.push((format!("{k}.lora_down.weight"), vec![2, 4, 3, 3], vec![0.0; 72]));
        e.push((format!("{k}.lora_up.weight"), vec![4, 2, 1, 1], vec![0.0; 8]));
        e.push((format!("{k}.alpha"), vec![], vec![1.0]));
        let m = load_err(&e);
        assert!(m.contains("2 keys are convolution LoRA factors"), "{m}");
        assert!(m.contains(&format!("{k}.lora_down.weight [2, 4, 3, 3]")), "{m}");
        assert!(!m.contains("match no weight"), "{m}");
        // 4-D factors of a module the bundle has are refused as well (1×1 included).
        let mut e = kohya_entries(2);
        let down = format!("{}.lora_down.weight", kohya_name(PROJ_IN));
        let x = e.iter_mut().find(|x| x.0 == down).unwrap();
        x.1 = vec![2, 6, 1, 1];
        let m = load_err(&e);
        assert!(m.contains("convolution") && m.contains(&down), "{m}");
    }

    #[test]
    fn shape_mismatch_names_another_architecture() {
        for mut e in [peft_entries(2), kohya_entries(2)] {
            // B of `to_q` with 9 rows where the weight has 8.
            let x = e
                .iter_mut()
                .find(|x| {
                    x.0.ends_with("attn1.to_q.lora_B.weight") || x.0.ends_with("attn1_to_q.lora_up.weight")
                })
                .unwrap();
            x.1 = vec![9, 2];
            x.2 = vec![0.0; 18];
            let m = load_err(&e);
            assert!(
                m.contains(&format!("`{Q}.weight`")) && m.contains("another architecture?"),
                "{m}"
            );
        }
    }

    #[test]
    fn kohya_name_of_two_weights_is_refused() {
        let mut w = weight_map();
        for m in ["mid.a_b.c", "mid.a.b_c"] {
            w.insert(
                format!("{m}.weight"),
                WeightEntry {
                    graph: "unet_encoder".into(),
                    shape: vec![4, 4],
                },
            );
        }
        let key = "lora_unet_mid_a_b_c.lora_down.weight".to_string();
        let bytes = serialize(&[(key.clone(), vec![1, 4], vec![0.0; 4])], None);
        let m = LoraAdapter::from_bytes(&bytes, "m", &w).unwrap_err().to_string();
        assert!(m.contains(&key) && m.contains("more than one weight"), "{m}");
    }

    #[test]
    fn missing_factor_is_named() {
        let mut e = kohya_entries(2);
        let up = format!("{}.lora_up.weight", kohya_name(OUT));
        e.retain(|x| x.0 != up);
        let m = load_err(&e);
        assert!(
            m.contains(&format!("`{OUT}.weight` has lora_down but no lora_up")),
            "{m}"
        );
    }

    #[test]
    fn not_safetensors_and_no_file() {
        let w = weight_map();
        let e = LoraAdapter::from_bytes(b"nope", "x.safetensors", &w).unwrap_err();
        assert!(e.to_string().contains("not a safetensors file"), "{e}");
        let e = LoraAdapter::load(Path::new("/nonexistent/x.safetensors"), &w).unwrap_err();
        assert!(e.to_string().contains("no such file"), "{e}");
    }

    /// The committed peft LoRA, rewritten with kohya keys, maps onto the tiny bundle identically.
    #[test]
    fn tiny_lora_in_kohya_layout_matches_peft() {
        let bundle = crate::bundle::BaseBundle::open("../bundles/tiny-sdxl").unwrap();
        let weights = &bundle.manifest.weights.map;
        let path = Path::new("../bundles/loras/tiny-lora-a.safetensors");
        let peft = LoraAdapter::load(path, weights).unwrap();
        assert_eq!(peft.layout(), LoraLayout::Peft);
        assert_eq!(peft.name, "tiny-lora-a");

        let bytes = std::fs::read(path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut e: Vec<Entry> = Vec::new();
        for (key, t) in st.tensors() {
            let k = key.strip_prefix("unet.").unwrap_or(&key);
            let (module, suffix) = if let Some(m) = k.strip_suffix(".lora_A.weight") {
                (m, "lora_down.weight")
            } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                (m, "lora_up.weight")
            } else {
                panic!("unexpected key {key}");
            };
            let data = to_f32(t.dtype(), t.data()).unwrap();
            e.push((
                format!("{}.{suffix}", kohya_name(module)),
                t.shape().to_vec(),
                data,
            ));
            if suffix == "lora_down.weight" {
                // The peft file's alpha is in its metadata; kohya has one per module.
                e.push((
                    format!("{}.alpha", kohya_name(module)),
                    vec![],
                    vec![peft.layers.values().next().unwrap().alpha],
                ));
            }
        }
        let kohya = LoraAdapter::from_bytes(&serialize(&e, None), "tiny-lora-a-kohya", weights).unwrap();
        assert_eq!(kohya.layout(), LoraLayout::Kohya);
        assert_eq!(kohya.name, "tiny-lora-a-kohya");
        assert_eq!(peft.layers.len(), weights.len());
        assert!(peft.layers.values().all(|l| l.alpha == 8.0 && l.rank == 4));
        assert_eq!(
            kohya.layers.keys().collect::<Vec<_>>(),
            peft.layers.keys().collect::<Vec<_>>()
        );
        for (w, l) in &peft.layers {
            assert_eq!(&kohya.layers[w], l, "{w}");
        }
        assert_eq!(kohya.nbytes(), peft.nbytes());
    }
}
