//! The kohya (sd-scripts, A1111) key naming, mapped onto a bundle's weight names.
//!
//! A kohya key is `lora_unet_<module with '.' → '_'>` + `.lora_down.weight` (A), `.lora_up.weight`
//! (B) or `.alpha`. Since `_` is also part of module names, keys are never split at underscores:
//! every weight of the bundle is entered in a lookup table under its kohya name, and, for attention
//! layers, under the kohya name of its SGM (original Stability UNet) block name:
//!
//! ```text
//! weight map ─ sgm_layers ─▶ L (down blocks' layers per block), or why the map does not settle it
//!            ─ kohya_lookup(L) ─▶ { lora_unet_<diffusers module_>  ─▶ weight,
//!                                   lora_unet_<SGM module_>        ─▶ weight }   (ambiguous: None)
//! key ─ KohyaMap::place ─▶ weight + slot | text encoder | convolution | unmatched
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use super::err;
use super::layout::{
    split_key, takes_text, text_model_variants, text_part, Place, Slot, KOHYA_TE, KOHYA_UNET,
};
use crate::bundle::WeightEntry;
use crate::Result;

/// The kohya names of a bundle's weights.
pub(super) struct KohyaMap<'w> {
    /// The down blocks' layers per block that number SGM blocks, or why the map does not settle it.
    layers: std::result::Result<usize, Unsettled>,
    lookup: HashMap<String, Option<&'w str>>,
    /// Whether the bundle's text encoders (`text_encoder`, `text_encoder_2`) take weights.
    text: [bool; 2],
    /// Whether the bundle's convolutions take weights.
    conv: bool,
    /// Whether the bundle takes the resnets' `time_emb_proj` weights.
    time_emb: bool,
}

/// The text encoder a kohya prefix adapts: `lora_te1_`/`lora_te_` the first, `lora_te2_` the second.
fn kohya_text_graph(key: &str) -> Option<usize> {
    if key.starts_with("lora_te2_") {
        Some(1)
    } else if KOHYA_TE.iter().any(|p| key.starts_with(p)) {
        Some(0)
    } else {
        None
    }
}

impl<'w> KohyaMap<'w> {
    pub(super) fn new(weights: &'w BTreeMap<String, WeightEntry>) -> Self {
        let layers = sgm_layers(weights);
        let lookup = kohya_lookup(weights, layers.as_ref().ok().copied());
        let text = super::layout::TEXT_GRAPHS.map(|g| takes_text(weights, g));
        let conv = super::layout::takes_conv(weights);
        let time_emb = super::layout::takes_time_emb(weights);
        KohyaMap {
            layers,
            lookup,
            text,
            conv,
            time_emb,
        }
    }

    /// Where `key` (a tensor of shape `shape`) goes; a module name that fits two weights is an
    /// error.
    pub(super) fn place(&self, path: &Path, key: &str, shape: &[usize]) -> Result<Place> {
        if kohya_text_graph(key).is_some_and(|g| !self.text[g]) {
            return Ok(Place::TextEncoder);
        }
        let split = split_key(key, ".lora_down.weight", ".lora_up.weight")
            .or_else(|| super::layout::split_lycoris(key));
        let Some((m, slot)) = split else {
            return Ok(Place::Unmatched);
        };
        match self.lookup.get(m) {
            Some(Some(w)) => Ok(Place::Weight(w.to_string(), slot)),
            Some(None) => Err(err(
                path,
                format!("`{key}`: its module name fits more than one weight of the bundle"),
            )),
            // a convolution factor where the bundle's convolutions take no weights
            None if shape.len() == 4 && !self.conv && !matches!(slot, Slot::Alpha) => {
                Ok(Place::Conv(m.to_string()))
            }
            // a resnet's time_emb_proj (LoCon) where the bundle does not take those weights
            None if m.ends_with("_time_emb_proj") && !self.time_emb && !matches!(slot, Slot::Alpha) => {
                Ok(Place::TimeEmb(m.to_string()))
            }
            None => Ok(Place::Unmatched),
        }
    }

    /// Why `unmatched` keys with SGM block names match nothing, where they have them.
    pub(super) fn unmatched_hint(&self, unmatched: &[String]) -> Option<String> {
        let sgm = |blocks: &[&str]| {
            unmatched
                .iter()
                .any(|k| blocks.iter().any(|b| k.starts_with(&format!("{KOHYA_UNET}{b}_"))))
        };
        match &self.layers {
            Err(why) if sgm(&["input_blocks", "output_blocks"]) => Some(format!(
                " — kohya keys with the original (SGM) UNet block names input_blocks/output_blocks are \
                 numbered by the UNet's layers per block, which this bundle's weight map does not \
                 determine: {why}"
            )),
            _ if sgm(&["input_blocks", "middle_block", "output_blocks"]) => Some(
                " — kohya keys with the original (SGM) UNet block names are mapped only onto the bundle's \
                 attention (transformer) layers (input_blocks_N_1_…, middle_block_1_…, output_blocks_N_1_…)"
                    .to_string(),
            ),
            _ => None,
        }
    }
}

/// kohya module name → bundle weight name; `None` where two weights give the same kohya name. Each
/// UNet weight is entered under `lora_unet_` + its module with `.` → `_`, and, for attention layers,
/// under its SGM block name made the same way (`input_blocks`/`output_blocks` only where `layers`,
/// the down blocks' layers per block, is known). A text encoder's weight is entered under
/// `lora_te1_` and `lora_te_` (the first encoder) or `lora_te2_` (the second) + its module, with and
/// without the `text_model.` level.
pub(super) fn kohya_lookup(
    weights: &BTreeMap<String, WeightEntry>,
    layers: Option<usize>,
) -> HashMap<String, Option<&str>> {
    fn enter<'a>(lookup: &mut HashMap<String, Option<&'a str>>, name: String, w: &'a str) {
        lookup.entry(name).and_modify(|v| *v = None).or_insert(Some(w));
    }
    let mut lookup: HashMap<String, Option<&str>> = HashMap::new();
    for w in weights.keys() {
        let Some(module) = w.strip_suffix(".weight") else {
            continue;
        };
        if let Some((graph, m)) = text_part(module) {
            let prefixes: &[&str] = if graph == "text_encoder_2" {
                &["lora_te2_"]
            } else {
                &["lora_te1_", "lora_te_"]
            };
            for v in text_model_variants(m) {
                for p in prefixes {
                    enter(&mut lookup, format!("{p}{}", v.replace('.', "_")), w.as_str());
                }
            }
            continue;
        }
        let sgm = sgm_module(module, layers);
        for m in std::iter::once(module).chain(sgm.as_deref()) {
            enter(
                &mut lookup,
                format!("{KOHYA_UNET}{}", m.replace('.', "_")),
                w.as_str(),
            );
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

/// Why a weight map does not settle the down blocks' layers per block.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Unsettled(pub String);

impl std::fmt::Display for Unsettled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The down blocks' layers per block (L) that number SGM `input_blocks`/`output_blocks`, read from
/// the attention weights of the map: every down block with attentions must have L of them and
/// every up block with attentions L+1. Otherwise why the map does not determine it.
pub(super) fn sgm_layers(weights: &BTreeMap<String, WeightEntry>) -> std::result::Result<usize, Unsettled> {
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
        return Err(Unsettled("it has no down-block attention weights".into()));
    };
    if up.is_empty() {
        return Err(Unsettled(
            "it has no up-block attention weights to check the down blocks' against".into(),
        ));
    }
    if down.values().any(|&n| n != l) || up.values().any(|&n| n != l + 1) {
        return Err(Unsettled(format!(
            "its attentions per block ({}; {}) are not L in every down block and L+1 in every up block",
            show(&down, "down_blocks"),
            show(&up, "up_blocks")
        )));
    }
    Ok(l)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use safetensors::SafeTensors;

    use super::*;
    use crate::dtype::to_f32;
    use crate::lora::fixtures::{kohya_name, serialize, Entry};
    use crate::lora::{LoraAdapter, LoraLayout};

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
        let why = sgm_layers(&w).unwrap_err().0;
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
        let why = sgm_layers(&w).unwrap_err().0;
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
        // every linear UNet weight but the LoCon targets (the tiny LoRA has no text-encoder part)
        let unet = weights
            .iter()
            .filter(|(n, e)| {
                e.graph.starts_with("unet_") && e.shape.len() == 2 && !n.contains("time_emb_proj")
            })
            .count();
        assert_eq!(peft.layers.len(), unet);

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
