//! What of a LoRA file a job uses, and what the reading refuses: the parts a bundle cannot take
//! ([`Untaken`]: text encoders, convolutions, `time_emb_proj`), which a job's [`LoraParts`] skip
//! or refuse, and the keys no layer can use ([`Refused`]: other adapter kinds, unmatched keys),
//! named all together in one error (adapter.rs reads the file and fills them).

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use super::adapter::KeyMap;
use super::{err, some};
use crate::Result;

/// Which parts of a LoRA file a job uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoraParts {
    /// Every part: a part the bundle cannot take is an error naming its keys (the default).
    #[default]
    All,
    /// The parts the bundle can take; the others (text-encoder parts on a bundle whose text
    /// encoders take no weights, convolution parts on one whose convolutions take none) are
    /// skipped and recorded: a job's `unet_only`.
    Takeable,
}

impl LoraParts {
    /// `unet_only` (a job's option) as parts.
    pub fn unet_only(on: bool) -> Self {
        if on {
            LoraParts::Takeable
        } else {
            LoraParts::All
        }
    }
}

/// The parts of a LoRA file that a bundle cannot take: every key named, with why.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Untaken {
    /// Keys adapting a text encoder whose weights the bundle does not take as inputs.
    pub text_encoder: Vec<String>,
    /// Convolution factors (`key [shape]`) where the bundle's convolutions take no weights.
    pub conv: Vec<String>,
    /// Factors of the resnets' `time_emb_proj` (LoCon) where the bundle does not take them.
    pub time_emb: Vec<String>,
}

impl Untaken {
    pub fn is_empty(&self) -> bool {
        self.text_encoder.is_empty() && self.conv.is_empty() && self.time_emb.is_empty()
    }

    /// Why each part cannot be used (in errors).
    pub(super) fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if !self.text_encoder.is_empty() {
            problems.push(format!(
                "{} keys adapt a text encoder ({}): this bundle's text encoders take no LoRA weights \
                 (it was exported before they did: export it again with tools/export.sh)",
                self.text_encoder.len(),
                some(&self.text_encoder)
            ));
        }
        if !self.conv.is_empty() {
            problems.push(format!(
                "{} keys are convolution LoRA factors ({}): this bundle's convolutions take no LoRA \
                 weights (GPU bundles keep them constant; a CPU bundle exported before they took them: \
                 export it again with tools/export.sh)",
                self.conv.len(),
                some(&self.conv)
            ));
        }
        if !self.time_emb.is_empty() {
            problems.push(format!(
                "{} keys adapt the resnets' time_emb_proj ({}): this bundle does not take those weights \
                 (it was exported before they were inputs: export it again with tools/export.sh)",
                self.time_emb.len(),
                some(&self.time_emb)
            ));
        }
        problems
    }
}

impl std::fmt::Display for Untaken {
    /// What was skipped, in a job's record: `264 text-encoder keys (…); 4 convolution keys (…)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if !self.text_encoder.is_empty() {
            parts.push(format!(
                "{} text-encoder keys ({})",
                self.text_encoder.len(),
                some(&self.text_encoder)
            ));
        }
        if !self.conv.is_empty() {
            parts.push(format!(
                "{} convolution keys ({})",
                self.conv.len(),
                some(&self.conv)
            ));
        }
        if !self.time_emb.is_empty() {
            parts.push(format!(
                "{} time_emb_proj keys ({})",
                self.time_emb.len(),
                some(&self.time_emb)
            ));
        }
        f.write_str(&parts.join("; "))
    }
}

/// The adapter kinds other than LoRA, by the suffixes of their factors' keys (LyCORIS and peft
/// name them alike): LoHa, LoKr, DoRA.
pub(super) const OTHER_KINDS: [(&str, &[&str]); 3] = [
    (
        "LoHa",
        &[
            ".hada_w1_a",
            ".hada_w1_b",
            ".hada_w2_a",
            ".hada_w2_b",
            ".hada_t1",
            ".hada_t2",
        ],
    ),
    (
        "LoKr",
        &[
            ".lokr_w1",
            ".lokr_w1_a",
            ".lokr_w1_b",
            ".lokr_w2",
            ".lokr_w2_a",
            ".lokr_w2_b",
            ".lokr_t2",
        ],
    ),
    // kohya's DoRA; peft's (`lora_magnitude_vector`) is read
    ("DoRA", &[".dora_scale"]),
];

/// The kind (LoHa, LoKr, DoRA) of a factor key of another adapter kind than LoRA, and its module.
pub(super) fn other_kind(key: &str) -> Option<(&'static str, &str)> {
    // peft keys may carry an adapter name or `.weight` after the factor's name
    let k = key.strip_suffix(".weight").unwrap_or(key);
    OTHER_KINDS.iter().find_map(|(kind, suffixes)| {
        suffixes
            .iter()
            .find_map(|s| k.strip_suffix(s))
            .map(|m| (*kind, m))
    })
}

/// Keys that cannot be used; a file with any is refused, with every one of them named.
#[derive(Default)]
pub(super) struct Refused {
    /// Factors of other adapter kinds (LoHa, LoKr, DoRA), by kind, and their modules.
    pub(super) other: BTreeMap<&'static str, Vec<String>>,
    pub(super) other_modules: HashSet<String>,
    /// Parts the bundle cannot take (text encoders, convolutions): refused with the rest, or
    /// left to the job's parts when nothing else is refused.
    pub(super) untaken: Untaken,
    /// The modules of `untaken.conv` and `untaken.time_emb`.
    pub(super) untaken_modules: HashSet<String>,
    /// Keys that match no weight of the bundle.
    pub(super) unmatched: Vec<String>,
}

impl Refused {
    /// One error naming every refused key; `nothing_matched`: no key gave a factor. Where only
    /// parts the bundle cannot take are left, they are returned (the job's parts decide).
    pub(super) fn check(mut self, path: &Path, map: &KeyMap<'_>, nothing_matched: bool) -> Result<Untaken> {
        // The alphas of untaken (convolution, time_emb_proj) and other-kind layers are not reported again as
        // unmatched (nor are a DoRA file's plain LoRA factors placed: the file is refused).
        let (untaken_modules, other_modules) = (&self.untaken_modules, &self.other_modules);
        self.unmatched.retain(|k| {
            let module = k.strip_suffix(".alpha");
            let module = module.map(|m| m.strip_prefix("unet.").unwrap_or(m));
            !module.is_some_and(|m| untaken_modules.contains(m) || other_modules.contains(m))
        });
        let mut problems = Vec::new();
        for (kind, keys) in &self.other {
            let what = if *kind == "DoRA" {
                "DoRA in the kohya naming is not supported (diffusers drops these scales for SDXL; \
                 peft's `lora_magnitude_vector` is read)"
                    .to_string()
            } else {
                format!(
                    "{kind} files are read in the LyCORIS naming (`lora_unet_<module>.{}`, with `.alpha`), \
                     not in the peft layout",
                    if *kind == "LoHa" { "hada_w1_a" } else { "lokr_w1" }
                )
            };
            problems.push(format!(
                "{} keys are {kind} factors ({}): {what}",
                keys.len(),
                some(keys)
            ));
        }
        if !self.unmatched.is_empty() {
            let hint = map
                .unmatched_hint(&self.unmatched)
                .or_else(|| {
                    nothing_matched.then(|| {
                        " — no key matches any weight of this bundle: is the LoRA for another architecture?"
                            .to_string()
                    })
                })
                .unwrap_or_default();
            problems.push(format!(
                "{} keys match no weight of the bundle: {}{hint}",
                self.unmatched.len(),
                some(&self.unmatched)
            ));
        }
        if !problems.is_empty() {
            // the parts the bundle cannot take are named too: one error says everything
            problems.extend(self.untaken.problems());
            return Err(err(path, problems.join("; ")));
        }
        Ok(self.untaken)
    }
}
