//! LoRA adapters in safetensors files, mapped onto a bundle's weights. Two layouts are read:
//!
//! * diffusers/peft: `[unet.]<module>.lora_A.weight` (`[r, in]`) and `[unet.]<module>.lora_B.weight`
//!   (`[out, r]`); `<module>.alpha` scalars where present. Alpha otherwise comes from the
//!   `lora_adapter_metadata` JSON that diffusers' `save_lora_weights` writes into the file's
//!   metadata (`unet.lora_alpha`), and defaults to the rank (scale 1), as diffusers does.
//! * kohya (sd-scripts, A1111): `lora_unet_<module with '.' → '_'>.lora_down.weight` (`[r, in]`, = A),
//!   `.lora_up.weight` (`[out, r]`, = B) and `.alpha` (scalar). Module names are those of the bundle's
//!   weights (diffusers names), or the original Stability (SGM/LDM) UNet block names that sd-scripts
//!   writes for SDXL, for the attention (transformer) layers — as diffusers'
//!   `_maybe_map_sgm_blocks_to_diffusers` maps them, with L the down blocks' layers per block:
//!   `input_blocks.{1 + b·(L+1) + a}.1.X` = `down_blocks.{b}.attentions.{a}.X`,
//!   `middle_block.1.X` = `mid_block.attentions.0.X` and `output_blocks.{b·(L+1) + a}.1.X` =
//!   `up_blocks.{b}.attentions.{a}.X` (up blocks have L+1 layers). L is read from the weight map (every
//!   down block with attentions has L, every up block with attentions L+1); where it does not settle
//!   L, `input_blocks`/`output_blocks` keys are refused with an error that says so. Both namings are
//!   looked up in a table made from the weight map, never by splitting names at underscores.
//!   Text-encoder keys (`lora_te_…`, `lora_te1_…`, `lora_te2_…`) and convolution LoRAs (4-D factors)
//!   are refused with an error naming them, never skipped.
//!
//! A file is in one layout or the other; a file that mixes them is refused.

pub mod plan;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use safetensors::SafeTensors;

use crate::bundle::WeightEntry;
use crate::weights::to_f32;
use crate::{Error, Result};
use rayon::prelude::*;

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
        let layers_per_block = match layout {
            LoraLayout::Kohya => sgm_layers(weights),
            LoraLayout::Peft => Err(String::new()),
        };
        let kohya_lookup = match layout {
            LoraLayout::Kohya => kohya_lookup(weights, layers_per_block.as_ref().ok().copied()),
            LoraLayout::Peft => HashMap::new(),
        };

        let mut got = Collected::default();
        let mut unmatched = Vec::new();
        let mut text_encoder = Vec::new();
        let mut conv = Vec::new();
        let mut conv_modules = HashSet::new();
        let mut todo = Vec::new();
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
            todo.push((key, weight, slot, t));
        }
        // the conversions to f32 run in parallel: a rank-64 SDXL LoRA holds 167 M values
        let converted: Vec<_> = todo
            .into_par_iter()
            .map(|(key, weight, slot, t)| {
                let data = to_f32(t.dtype(), t.data())
                    .ok_or_else(|| err(path, format!("`{key}` has unsupported dtype {:?}", t.dtype())));
                (key, weight, slot, t.shape().to_vec(), data)
            })
            .collect();
        for (key, weight, slot, shape, data) in converted {
            got.put(path, key, weight, slot, shape, data?)?;
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
            let sgm = |blocks: &[&str]| {
                layout == LoraLayout::Kohya
                    && unmatched
                        .iter()
                        .any(|k| blocks.iter().any(|b| k.starts_with(&format!("{KOHYA_UNET}{b}_"))))
            };
            let hint = match &layers_per_block {
                Err(why) if sgm(&["input_blocks", "output_blocks"]) => format!(
                    " — kohya keys with the original (SGM) UNet block names input_blocks/output_blocks are \
                     numbered by the UNet's layers per block, which this bundle's weight map does not \
                     determine: {why}"
                ),
                _ if sgm(&["input_blocks", "middle_block", "output_blocks"]) => {
                    " — kohya keys with the original (SGM) UNet block names are mapped only onto the bundle's \
                     attention (transformer) layers (input_blocks_N_1_…, middle_block_1_…, output_blocks_N_1_…)"
                        .to_string()
                }
                _ if got.a.is_empty() && got.b.is_empty() => {
                    " — no key matches any weight of this bundle: is the LoRA for another architecture?".to_string()
                }
                _ => String::new(),
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

/// kohya module name → bundle weight name; `None` where two weights give the same kohya name. Each
/// weight is entered under `lora_unet_` + its module with `.` → `_`, and, for attention layers,
/// under its SGM block name made the same way (`input_blocks`/`output_blocks` only where `layers`,
/// the down blocks' layers per block, is known).
fn kohya_lookup(
    weights: &BTreeMap<String, WeightEntry>,
    layers: Option<usize>,
) -> HashMap<String, Option<&str>> {
    let mut lookup: HashMap<String, Option<&str>> = HashMap::new();
    for w in weights.keys() {
        let Some(module) = w.strip_suffix(".weight") else {
            continue;
        };
        let sgm = sgm_module(module, layers);
        for m in std::iter::once(module).chain(sgm.as_deref()) {
            lookup
                .entry(format!("{KOHYA_UNET}{}", m.replace('.', "_")))
                .and_modify(|v| *v = None)
                .or_insert(Some(w.as_str()));
        }
    }
    lookup
}

/// `<blocks>.<b>.attentions.<a>.<rest>` → (b, a, rest).
fn attention_of<'m>(module: &'m str, blocks: &str) -> Option<(usize, usize, &'m str)> {
    let mut parts = module.strip_prefix(blocks)?.strip_prefix('.')?.splitn(4, '.');
    let b = parts.next()?.parse().ok()?;
    if parts.next()? != "attentions" {
        return None;
    }
    let a = parts.next()?.parse().ok()?;
    let rest = parts.next().filter(|r| !r.is_empty())?;
    Some((b, a, rest))
}

/// The SGM (original Stability UNet) name of a diffusers attention-layer module, as diffusers'
/// `_maybe_map_sgm_blocks_to_diffusers` maps them back: `down_blocks.{b}.attentions.{a}.X` ↔
/// `input_blocks.{1 + b·(L+1) + a}.1.X`, `mid_block.attentions.0.X` ↔ `middle_block.1.X`,
/// `up_blocks.{b}.attentions.{a}.X` ↔ `output_blocks.{b·(L+1) + a}.1.X`, L = `layers`.
fn sgm_module(module: &str, layers: Option<usize>) -> Option<String> {
    if let Some(rest) = module.strip_prefix("mid_block.attentions.0.") {
        return Some(format!("middle_block.1.{rest}"));
    }
    let l = layers?;
    if let Some((b, a, rest)) = attention_of(module, "down_blocks") {
        return (a < l).then(|| format!("input_blocks.{}.1.{rest}", 1 + b * (l + 1) + a));
    }
    if let Some((b, a, rest)) = attention_of(module, "up_blocks") {
        return (a <= l).then(|| format!("output_blocks.{}.1.{rest}", b * (l + 1) + a));
    }
    None
}

/// The down blocks' layers per block (L) that number SGM `input_blocks`/`output_blocks`, read from
/// the attention weights of the map: every down block with attentions must have L of them and
/// every up block with attentions L+1. Otherwise why the map does not determine it.
fn sgm_layers(weights: &BTreeMap<String, WeightEntry>) -> std::result::Result<usize, String> {
    // block → attention count (max index + 1)
    let counts = |blocks: &str| {
        let mut c: BTreeMap<usize, usize> = BTreeMap::new();
        for w in weights.keys() {
            if let Some((b, a, _)) = w.strip_suffix(".weight").and_then(|m| attention_of(m, blocks)) {
                let n = c.entry(b).or_default();
                *n = (*n).max(a + 1);
            }
        }
        c
    };
    let show = |c: &BTreeMap<usize, usize>, blocks: &str| {
        c.iter()
            .map(|(b, n)| format!("{blocks}.{b}: {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let down = counts("down_blocks");
    let up = counts("up_blocks");
    let Some(&l) = down.values().max() else {
        return Err("it has no down-block attention weights".into());
    };
    if up.is_empty() {
        return Err("it has no up-block attention weights to check the down blocks' against".into());
    }
    if down.values().any(|&n| n != l) || up.values().any(|&n| n != l + 1) {
        return Err(format!(
            "its attentions per block ({}; {}) are not L in every down block and L+1 in every up block",
            show(&down, "down_blocks"),
            show(&up, "up_blocks")
        ));
    }
    Ok(l)
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
        // kohya keys with SGM block names, where the weight map (no up blocks) does not settle the
        // layers per block, are named, and the error says why.
        let mut e = kohya_entries(2);
        let key = "lora_unet_input_blocks_4_1_proj_in.lora_down.weight".to_string();
        e.push((key.clone(), vec![2, 6], vec![0.0; 12]));
        let m = load_err(&e);
        assert!(m.contains("1 keys match no weight") && m.contains(&key), "{m}");
        assert!(
            m.contains("SGM")
                && m.contains("weight map does not determine")
                && m.contains("no up-block attention weights"),
            "{m}"
        );
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

    /// The SGM name of a diffusers attention module for layers per block `l`, written here from
    /// the rule of diffusers' `_maybe_map_sgm_blocks_to_diffusers`, independently of `sgm_module`.
    fn sgm_name(module: &str, l: usize) -> String {
        let p: Vec<&str> = module.split('.').collect();
        match p[0] {
            "mid_block" => {
                assert_eq!(&p[1..3], ["attentions", "0"], "{module}");
                format!("middle_block.1.{}", p[3..].join("."))
            }
            "down_blocks" | "up_blocks" => {
                assert_eq!(p[2], "attentions", "{module}");
                let (b, a): (usize, usize) = (p[1].parse().unwrap(), p[3].parse().unwrap());
                let rest = p[4..].join(".");
                if p[0] == "down_blocks" {
                    format!("input_blocks.{}.1.{rest}", 1 + b * (l + 1) + a)
                } else {
                    format!("output_blocks.{}.1.{rest}", b * (l + 1) + a)
                }
            }
            _ => panic!("not an attention module: {module}"),
        }
    }

    /// SDXL-like attention blocks (layers per block 2): module prefix.
    const SDXL_ATTENTIONS: [&str; 11] = [
        "down_blocks.1.attentions.0",
        "down_blocks.1.attentions.1",
        "down_blocks.2.attentions.0",
        "down_blocks.2.attentions.1",
        "mid_block.attentions.0",
        "up_blocks.0.attentions.0",
        "up_blocks.0.attentions.1",
        "up_blocks.0.attentions.2",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
        "up_blocks.1.attentions.2",
    ];

    /// Modules of each attention block, with their (out, in).
    const SDXL_INNER: [(&str, usize, usize); 3] = [
        ("transformer_blocks.0.attn1.to_q", 4, 4),
        ("transformer_blocks.1.ff.net.0.proj", 8, 4),
        ("proj_in", 4, 4),
    ];

    fn sdxl_weight_map(blocks: &[&str]) -> BTreeMap<String, WeightEntry> {
        let mut w = BTreeMap::new();
        for b in blocks {
            for (m, o, i) in SDXL_INNER {
                w.insert(
                    format!("{b}.{m}.weight"),
                    WeightEntry {
                        graph: "unet_encoder".into(),
                        shape: vec![o, i],
                    },
                );
            }
        }
        w
    }

    /// Rank-1 factors for `lora_unet_<key>` onto a module of shape (out, in), A filled with `v`.
    fn sgm_entries(key: &str, out: usize, inp: usize, v: f32) -> Vec<Entry> {
        vec![
            (
                format!("lora_unet_{key}.lora_down.weight"),
                vec![1, inp],
                vec![v; inp],
            ),
            (
                format!("lora_unet_{key}.lora_up.weight"),
                vec![out, 1],
                vec![1.0; out],
            ),
        ]
    }

    #[test]
    fn sgm_block_names_map_onto_sdxl_weights() {
        let w = sdxl_weight_map(&SDXL_ATTENTIONS);
        assert_eq!(sgm_layers(&w), Ok(2));
        let cases = [
            (
                "input_blocks_4_1_transformer_blocks_0_attn1_to_q",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
                4,
            ),
            (
                "input_blocks_5_1_proj_in",
                "down_blocks.1.attentions.1.proj_in",
                4,
            ),
            (
                "input_blocks_7_1_transformer_blocks_1_ff_net_0_proj",
                "down_blocks.2.attentions.0.transformer_blocks.1.ff.net.0.proj",
                8,
            ),
            (
                "input_blocks_8_1_proj_in",
                "down_blocks.2.attentions.1.proj_in",
                4,
            ),
            (
                "middle_block_1_transformer_blocks_0_attn1_to_q",
                "mid_block.attentions.0.transformer_blocks.0.attn1.to_q",
                4,
            ),
            ("output_blocks_0_1_proj_in", "up_blocks.0.attentions.0.proj_in", 4),
            (
                "output_blocks_2_1_transformer_blocks_1_ff_net_0_proj",
                "up_blocks.0.attentions.2.transformer_blocks.1.ff.net.0.proj",
                8,
            ),
            ("output_blocks_3_1_proj_in", "up_blocks.1.attentions.0.proj_in", 4),
            (
                "output_blocks_5_1_transformer_blocks_0_attn1_to_q",
                "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q",
                4,
            ),
        ];
        let mut e = Vec::new();
        for (i, (key, module, out)) in cases.iter().enumerate() {
            e.extend(sgm_entries(key, *out, 4, i as f32));
            // The test's own rule gives the same SGM name.
            assert_eq!(kohya_name(&sgm_name(module, 2)), format!("lora_unet_{key}"));
        }
        let l = LoraAdapter::from_bytes(&serialize(&e, None), "sgm", &w).unwrap();
        assert_eq!(l.layout(), LoraLayout::Kohya);
        assert_eq!(l.layers.len(), cases.len());
        for (i, (key, module, _)) in cases.iter().enumerate() {
            let layer = &l.layers[&format!("{module}.weight")];
            assert_eq!(layer.a, vec![i as f32; 4], "{key} → {module}");
        }

        // Every weight of the map is reachable by its SGM name, and by its diffusers kohya name.
        let lookup = kohya_lookup(&w, Some(2));
        assert_eq!(lookup.len(), 2 * w.len());
        for name in w.keys() {
            let m = name.strip_suffix(".weight").unwrap();
            assert_eq!(lookup[&kohya_name(&sgm_name(m, 2))], Some(name.as_str()), "{m}");
            assert_eq!(lookup[&kohya_name(m)], Some(name.as_str()), "{m}");
        }
    }

    #[test]
    fn sgm_keys_that_map_to_nothing_are_named() {
        let w = sdxl_weight_map(&SDXL_ATTENTIONS);
        // input_blocks_6 is down_blocks.1's downsampler; input_blocks_1 is in down_blocks.0 (no
        // attentions here); output_blocks_6 is in up_blocks.2 (none either); `_0_` is a resnet.
        let bad = [
            "input_blocks_6_1_proj_in",
            "input_blocks_1_1_proj_in",
            "output_blocks_6_1_proj_in",
            "input_blocks_4_0_proj_in",
        ];
        let mut e = sgm_entries("input_blocks_4_1_proj_in", 4, 4, 1.0);
        for k in bad {
            e.extend(sgm_entries(k, 4, 4, 1.0));
        }
        let m = LoraAdapter::from_bytes(&serialize(&e, None), "sgm", &w)
            .unwrap_err()
            .to_string();
        assert!(m.contains("8 keys match no weight"), "{m}");
        for k in ["input_blocks_1_1_proj_in", "input_blocks_4_0_proj_in"] {
            assert!(m.contains(&format!("lora_unet_{k}.lora_down.weight")), "{m}");
        }
        assert!(
            m.contains("SGM") && m.contains("only onto the bundle's attention"),
            "{m}"
        );
        assert!(!m.contains("input_blocks_4_1_proj_in"), "{m}");
    }

    #[test]
    fn sgm_layers_must_be_settled_by_the_weight_map() {
        // Up blocks with 2 attentions where the down blocks have 2: not L+1.
        let w = sdxl_weight_map(&SDXL_ATTENTIONS[..7]);
        let why = sgm_layers(&w).unwrap_err();
        assert!(
            why.contains("down_blocks.1: 2") && why.contains("up_blocks.0: 2"),
            "{why}"
        );
        let e = sgm_entries("output_blocks_0_1_proj_in", 4, 4, 1.0);
        let m = LoraAdapter::from_bytes(&serialize(&e, None), "sgm", &w)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("lora_unet_output_blocks_0_1_proj_in")
                && m.contains("does not determine")
                && m.contains(&why),
            "{m}"
        );
        // Down blocks that disagree.
        let mut blocks = SDXL_ATTENTIONS.to_vec();
        blocks.retain(|b| *b != "down_blocks.2.attentions.1");
        assert!(sgm_layers(&sdxl_weight_map(&blocks)).is_err());
        // No down-block attentions at all.
        let w = sdxl_weight_map(&SDXL_ATTENTIONS[4..]);
        let why = sgm_layers(&w).unwrap_err();
        assert!(why.contains("no down-block attention"), "{why}");
        // middle_block needs no layers per block: it still maps.
        let e = sgm_entries("middle_block_1_proj_in", 4, 4, 3.0);
        let l = LoraAdapter::from_bytes(&serialize(&e, None), "sgm", &w).unwrap();
        assert_eq!(l.layers["mid_block.attentions.0.proj_in.weight"].a, vec![3.0; 4]);
    }

    #[test]
    fn sgm_and_diffusers_names_of_one_factor_are_refused() {
        let w = sdxl_weight_map(&SDXL_ATTENTIONS);
        let mut e = sgm_entries("input_blocks_4_1_proj_in", 4, 4, 1.0);
        e.extend(sgm_entries("down_blocks_1_attentions_0_proj_in", 4, 4, 2.0));
        let m = LoraAdapter::from_bytes(&serialize(&e, None), "sgm", &w)
            .unwrap_err()
            .to_string();
        assert!(
            m.contains("a second key for the same factor of `down_blocks.1.attentions.0.proj_in.weight`"),
            "{m}"
        );
    }

    /// The committed peft LoRA, rewritten with kohya keys in the SGM block naming (as sd-scripts
    /// writes SDXL LoRAs), maps onto the tiny bundle identically.
    #[test]
    fn tiny_lora_in_sgm_kohya_layout_matches_peft() {
        let bundle = crate::bundle::BaseBundle::open("../bundles/tiny-sdxl").unwrap();
        let weights = &bundle.manifest.weights.map;
        assert_eq!(sgm_layers(weights), Ok(2));
        let path = Path::new("../bundles/loras/tiny-lora-a.safetensors");
        let peft = LoraAdapter::load(path, weights).unwrap();
        assert_eq!(peft.layers.len(), weights.len());

        let bytes = std::fs::read(path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let mut e: Vec<Entry> = Vec::new();
        let mut blocks = HashSet::new();
        for (key, t) in st.tensors() {
            let k = key.strip_prefix("unet.").unwrap_or(&key);
            let (module, suffix) = if let Some(m) = k.strip_suffix(".lora_A.weight") {
                (m, "lora_down.weight")
            } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                (m, "lora_up.weight")
            } else {
                panic!("unexpected key {key}");
            };
            let sgm_module = sgm_name(module, 2);
            let p: Vec<&str> = sgm_module.split('.').collect();
            blocks.insert(if p[0] == "middle_block" {
                p[0].to_string()
            } else {
                format!("{}.{}", p[0], p[1])
            });
            let sgm = kohya_name(&sgm_module);
            e.push((
                format!("{sgm}.{suffix}"),
                t.shape().to_vec(),
                to_f32(t.dtype(), t.data()).unwrap(),
            ));
            if suffix == "lora_down.weight" {
                e.push((format!("{sgm}.alpha"), vec![], vec![8.0]));
            }
        }
        let mut blocks: Vec<String> = blocks.into_iter().collect();
        blocks.sort();
        assert_eq!(
            blocks,
            [
                "input_blocks.4",
                "input_blocks.5",
                "input_blocks.7",
                "input_blocks.8",
                "middle_block",
                "output_blocks.0",
                "output_blocks.1",
                "output_blocks.2",
                "output_blocks.3",
                "output_blocks.4",
                "output_blocks.5",
            ]
        );
        let sgm = LoraAdapter::from_bytes(&serialize(&e, None), "tiny-lora-a-sgm", weights).unwrap();
        assert_eq!(sgm.layout(), LoraLayout::Kohya);
        assert_eq!(
            sgm.layers.keys().collect::<Vec<_>>(),
            peft.layers.keys().collect::<Vec<_>>()
        );
        for (w, l) in &peft.layers {
            assert_eq!(&sgm.layers[w], l, "{w}");
        }
        assert_eq!(sgm.nbytes(), peft.nbytes());
    }
}
