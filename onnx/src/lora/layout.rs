//! Which key layout a LoRA file is in, and the grammar of its keys: prefixes, factor suffixes,
//! and where a key can go ([`Place`]). Peft keys are placed here; kohya keys in `kohya.rs`.
//!
//! ```text
//! keys ─ LoraLayout::detect ─▶ Peft (`[unet.]<module>.lora_A/lora_B.weight`, `<module>.alpha`)
//!                           └▶ Kohya (`lora_unet_…`/`lora_te…_…`, `.lora_down/.lora_up.weight`, `.alpha`)
//!                           (a file with both: refused)
//! key ─ split_key ─▶ module + Slot (A | B | alpha)
//! peft key ─ peft_place ─▶ Place (kohya keys: kohya.rs)
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
}

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

/// Where one key of a LoRA file goes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Place {
    /// A factor (or the alpha) of this bundle weight.
    Weight(String, Slot),
    /// A key of a text encoder (kohya `lora_te…_`): refused.
    TextEncoder,
    /// A factor that is not 2-D (a convolution LoRA) of this module: refused.
    Conv(String),
    /// No weight of the bundle.
    Unmatched,
}

/// Where a peft key goes: `[unet.]<module>.lora_A.weight`, `.lora_B.weight` or `.alpha` onto the
/// bundle weight `<module>.weight`.
pub(super) fn peft_place(weights: &BTreeMap<String, WeightEntry>, key: &str) -> Place {
    let k = key.strip_prefix("unet.").unwrap_or(key);
    split_key(k, ".lora_A.weight", ".lora_B.weight")
        .map(|(m, slot)| (format!("{m}.weight"), slot))
        .filter(|(w, _)| weights.contains_key(w))
        .map_or(Place::Unmatched, |(w, slot)| Place::Weight(w, slot))
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
        let place = |k| peft_place(&w, k);
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
    }
}
