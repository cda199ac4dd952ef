//! Which key layout a LoRA file is in, and the grammar of its keys: prefixes, factor suffixes,
//! and where a key can go ([`Place`]). Peft keys are placed here; kohya keys in `kohya.rs`.
//!
//! ```text
//! keys ─ LoraLayout::detect ─▶ Peft (`[unet.]<module>.lora_A/lora_B.weight`, `<module>.alpha`,
//!                           │        DoRA's `<module>.lora_magnitude_vector`)
//!                           └▶ Kohya (`lora_unet_…`/`lora_te…_…`, `.lora_down/.lora_up.weight`, `.alpha`)
//!                           (a file with both: refused)
//! key ─ split_key / split_magnitude / split_lycoris ─▶ module + Slot (A | B | alpha | magnitude | LyCORIS)
//! peft key ─ peft_place ─▶ Place: weight | text encoder | convolution (untaken) | unmatched
//!                          (kohya keys: kohya.rs)
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use super::{err, some};
use crate::bundle::WeightEntry;
use crate::Result;

/// The key layout a LoRA file was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraLayout {
    /// diffusers / peft: `<module>.lora_A.weight`, `<module>.lora_B.weight`.
    Peft,
    /// kohya sd-scripts: `lora_unet_<module_>.lora_down.weight`, `.lora_up.weight`, `.alpha`.
    Kohya,
}

impl LoraLayout {
    /// The layout of a file with these keys; a file that mixes the two is refused.
    pub(super) fn detect(path: &Path, keys: &[&str]) -> Result<Self> {
        let of = |want: fn(&str) -> bool| -> Vec<String> {
            keys.iter().filter(|k| want(k)).map(|k| k.to_string()).collect()
        };
        let kohya = of(is_kohya_key);
        let peft = of(is_peft_key);
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
        Ok(if kohya.is_empty() {
            LoraLayout::Peft
        } else {
            LoraLayout::Kohya
        })
    }

    /// What this layout calls the `A` and `B` factors (in errors).
    pub(super) fn factor_names(self) -> (&'static str, &'static str) {
        match self {
            LoraLayout::Peft => ("lora_A", "lora_B"),
            LoraLayout::Kohya => ("lora_down", "lora_up"),
        }
    }
}

/// The prefix of kohya UNet keys.
pub(super) const KOHYA_UNET: &str = "lora_unet_";
/// The prefixes of kohya text-encoder keys.
pub(super) const KOHYA_TE: [&str; 3] = ["lora_te1_", "lora_te2_", "lora_te_"];

/// Whether `key` is in the kohya layout (a UNet or text-encoder key).
fn is_kohya_key(key: &str) -> bool {
    key.starts_with(KOHYA_UNET) || KOHYA_TE.iter().any(|p| key.starts_with(p))
}

fn is_peft_key(key: &str) -> bool {
    !is_kohya_key(key) && (key.ends_with(".lora_A.weight") || key.ends_with(".lora_B.weight"))
}

/// Which factor of a layer a key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Slot {
    A,
    B,
    Alpha,
    /// A LyCORIS factor (LoHa, LoKr), kohya-named.
    Ly(LySlot),
    /// DoRA's magnitude vector (peft `lora_magnitude_vector`): one value per output row.
    Magnitude,
}

/// The LyCORIS factors katz reads: LoHa's `hada_w{1,2}_{a,b}` and LoKr's `lokr_w{1,2}` (full) or
/// `lokr_w{1,2}_{a,b}` (decomposed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum LySlot {
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
}

/// Key suffixes of the LyCORIS factors.
pub(super) const LY_SUFFIXES: [(&str, LySlot); 10] = [
    (".hada_w1_a", LySlot::HadaW1A),
    (".hada_w1_b", LySlot::HadaW1B),
    (".hada_w2_a", LySlot::HadaW2A),
    (".hada_w2_b", LySlot::HadaW2B),
    (".lokr_w1", LySlot::LokrW1),
    (".lokr_w1_a", LySlot::LokrW1A),
    (".lokr_w1_b", LySlot::LokrW1B),
    (".lokr_w2", LySlot::LokrW2),
    (".lokr_w2_a", LySlot::LokrW2A),
    (".lokr_w2_b", LySlot::LokrW2B),
];

/// `<module><a_suffix>`, `<module><b_suffix>` or `<module>.alpha` → module and slot.
pub(super) fn split_key<'k>(key: &'k str, a_suffix: &str, b_suffix: &str) -> Option<(&'k str, Slot)> {
    if let Some(m) = key.strip_suffix(a_suffix) {
        Some((m, Slot::A))
    } else if let Some(m) = key.strip_suffix(b_suffix) {
        Some((m, Slot::B))
    } else {
        key.strip_suffix(".alpha").map(|m| (m, Slot::Alpha))
    }
}

/// `<module>.lora_magnitude_vector[.weight]` (peft's DoRA) → module and [`Slot::Magnitude`].
pub(super) fn split_magnitude(key: &str) -> Option<(&str, Slot)> {
    let k = key.strip_suffix(".weight").unwrap_or(key);
    k.strip_suffix(".lora_magnitude_vector")
        .map(|m| (m, Slot::Magnitude))
}

/// `<module>.hada_w1_a` … `<module>.lokr_w2_b` → module and LyCORIS slot.
pub(super) fn split_lycoris(key: &str) -> Option<(&str, Slot)> {
    LY_SUFFIXES
        .iter()
        .find_map(|(s, slot)| key.strip_suffix(s).map(|m| (m, Slot::Ly(*slot))))
}

/// Where one key of a LoRA file goes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Place {
    /// A factor (or the alpha) of this bundle weight.
    Weight(String, Slot),
    /// A key of a text encoder whose weights this bundle does not take as inputs (a bundle
    /// exported before its text encoders did): refused.
    TextEncoder,
    /// A convolution factor (4-D) of this module, where the bundle's convolutions take no weights
    /// (a GPU bundle, or one exported before they did): refused, or skipped with `unet_only`.
    Conv(String),
    /// A factor of a resnet's `time_emb_proj` (adapted by LoCon), where the bundle does not take
    /// those weights (exported before it did): refused, or skipped with `unet_only`.
    TimeEmb(String),
    /// No weight of the bundle.
    Unmatched,
}

/// The text encoders' graphs, as the weight map names them (and their weights' prefixes).
pub(crate) const TEXT_GRAPHS: [&str; 2] = ["text_encoder", "text_encoder_2"];

/// The text encoder a weight-map name (or a peft key) belongs to: `text_encoder.…` or
/// `text_encoder_2.…`, and the module path after it.
pub(crate) fn text_part(name: &str) -> Option<(&'static str, &str)> {
    // the longer prefix first: `text_encoder_2.` also starts with `text_encoder`
    for g in [TEXT_GRAPHS[1], TEXT_GRAPHS[0]] {
        if let Some(rest) = name.strip_prefix(g).and_then(|r| r.strip_prefix('.')) {
            return Some((g, rest));
        }
    }
    None
}

/// Whether the map holds weights of text encoder `graph`.
pub(super) fn takes_text(weights: &BTreeMap<String, WeightEntry>, graph: &str) -> bool {
    weights.values().any(|e| e.graph == graph)
}

/// Whether the map holds convolution weights (`[out, in, kh, kw]`): the UNet's convolutions are
/// graph inputs (CPU bundles exported since they took them; never GPU bundles).
pub(crate) fn takes_conv(weights: &BTreeMap<String, WeightEntry>) -> bool {
    weights.values().any(|e| e.shape.len() == 4)
}

/// Whether the map holds the resnets' `time_emb_proj` weights (bundles exported since LoCon's
/// targets were inputs).
pub(super) fn takes_time_emb(weights: &BTreeMap<String, WeightEntry>) -> bool {
    weights.keys().any(|w| w.ends_with(".time_emb_proj.weight"))
}

/// A text-encoder module path with and without the `text_model.` level: transformers 5 names
/// `CLIPTextModel`'s modules without it, `CLIPTextModelWithProjection`'s with it, and published
/// LoRAs write it for both (diffusers drops it where the model has none).
pub(super) fn text_model_variants(module: &str) -> [String; 2] {
    match module.strip_prefix("text_model.") {
        Some(rest) => [module.to_string(), rest.to_string()],
        None => [module.to_string(), format!("text_model.{module}")],
    }
}

/// Where a peft key goes: `[unet.]<module>.lora_A.weight`, `.lora_B.weight` or `.alpha` onto the
/// bundle weight `<module>.weight`; `text_encoder[_2].<module>…` onto that text encoder's weight
/// (with or without the `text_model.` level), or [`Place::TextEncoder`] when the bundle's text
/// encoders take no weights; a 4-D factor (`shape`) of a module the bundle does not take, on a
/// bundle whose convolutions take no weights, is [`Place::Conv`]; a `time_emb_proj` factor on a
/// bundle without those weights [`Place::TimeEmb`].
pub(super) fn peft_place(weights: &BTreeMap<String, WeightEntry>, key: &str, shape: &[usize]) -> Place {
    let k = key.strip_prefix("unet.").unwrap_or(key);
    let Some((m, slot)) = split_key(k, ".lora_A.weight", ".lora_B.weight").or_else(|| split_magnitude(k))
    else {
        return Place::Unmatched;
    };
    if let Some((graph, module)) = text_part(m) {
        if !takes_text(weights, graph) {
            return Place::TextEncoder;
        }
        return text_model_variants(module)
            .into_iter()
            .map(|v| format!("{graph}.{v}.weight"))
            .find(|w| weights.contains_key(w))
            .map_or(Place::Unmatched, |w| Place::Weight(w, slot));
    }
    let w = format!("{m}.weight");
    if weights.contains_key(&w) {
        Place::Weight(w, slot)
    } else if shape.len() == 4 && !takes_conv(weights) {
        Place::Conv(m.to_string())
    } else if m.ends_with(".time_emb_proj") && slot != Slot::Alpha && !takes_time_emb(weights) {
        Place::TimeEmb(m.to_string())
    } else {
        Place::Unmatched
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_module_and_slot() {
        let s = |k| split_key(k, ".lora_down.weight", ".lora_up.weight");
        assert_eq!(s("m.lora_down.weight"), Some(("m", Slot::A)));
        assert_eq!(s("m.lora_up.weight"), Some(("m", Slot::B)));
        assert_eq!(s("m.alpha"), Some(("m", Slot::Alpha)));
        assert_eq!(s("m.lora_A.weight"), None);
    }

    #[test]
    fn peft_keys_place_with_or_without_the_unet_prefix() {
        let w = BTreeMap::from([(
            "a.b.weight".to_string(),
            WeightEntry {
                graph: "unet_encoder".into(),
                shape: vec![2, 2],
            },
        )]);
        let place = |k| peft_place(&w, k, &[2, 2]);
        assert_eq!(
            place("unet.a.b.lora_A.weight"),
            Place::Weight("a.b.weight".into(), Slot::A)
        );
        assert_eq!(
            place("a.b.lora_B.weight"),
            Place::Weight("a.b.weight".into(), Slot::B)
        );
        assert_eq!(
            place("unet.a.b.alpha"),
            Place::Weight("a.b.weight".into(), Slot::Alpha)
        );
        assert_eq!(place("a.c.lora_A.weight"), Place::Unmatched);
        // a convolution factor of a module this bundle (no conv weights) lacks
        assert_eq!(
            peft_place(&w, "unet.a.c.lora_A.weight", &[2, 2, 3, 3]),
            Place::Conv("a.c".into())
        );
    }

    fn entry(graph: &str) -> WeightEntry {
        WeightEntry {
            graph: graph.into(),
            shape: vec![2, 2],
        }
    }

    #[test]
    fn peft_text_encoder_keys_place_with_or_without_text_model() {
        let w = BTreeMap::from([
            (
                "text_encoder.encoder.layers.0.mlp.fc1.weight".to_string(),
                entry("text_encoder"),
            ),
            (
                "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight".to_string(),
                entry("text_encoder_2"),
            ),
        ]);
        let place = |k| peft_place(&w, k, &[2, 2]);
        let fc1 = "text_encoder.encoder.layers.0.mlp.fc1.weight";
        assert_eq!(
            place("text_encoder.encoder.layers.0.mlp.fc1.lora_A.weight"),
            Place::Weight(fc1.into(), Slot::A)
        );
        assert_eq!(
            place("text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight"),
            Place::Weight(fc1.into(), Slot::B)
        );
        let q = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight";
        assert_eq!(
            place("text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight"),
            Place::Weight(q.into(), Slot::A)
        );
        assert_eq!(
            place("text_encoder_2.encoder.layers.0.mlp.fc2.lora_A.weight"),
            Place::Unmatched
        );
    }

    #[test]
    fn text_encoder_keys_of_a_bundle_without_text_weights_are_text_encoder_places() {
        let w = BTreeMap::from([("a.b.weight".to_string(), entry("unet_encoder"))]);
        assert_eq!(
            peft_place(&w, "text_encoder.encoder.layers.0.mlp.fc1.lora_A.weight", &[2, 2]),
            Place::TextEncoder
        );
        assert_eq!(text_part("text_encoder_2.x.y"), Some(("text_encoder_2", "x.y")));
        assert_eq!(text_part("text_encoder.x"), Some(("text_encoder", "x")));
        assert_eq!(text_part("text_encoderx.y"), None);
    }
}
