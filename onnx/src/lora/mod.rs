//! LoRA adapters: safetensors files mapped onto a bundle's weights, and merged into them.
//!
//! Two layouts are read, each with UNet and text-encoder parts:
//!
//! * diffusers/peft: `[unet.]<module>.lora_A.weight` (`[r, in]`) and `[unet.]<module>.lora_B.weight`
//!   (`[out, r]`); `text_encoder.<module>…` and `text_encoder_2.<module>…` for the two text
//!   encoders; `<module>.alpha` scalars where present. Alpha otherwise comes from the
//!   `lora_adapter_metadata` JSON that diffusers' `save_lora_weights` writes into the file's
//!   metadata, per part (`unet.lora_alpha`, `text_encoder.lora_alpha`, `text_encoder_2.lora_alpha`),
//!   and defaults to the rank (scale 1), as diffusers does.
//! * kohya (sd-scripts, A1111): `lora_unet_<module with '.' → '_'>.lora_down.weight` (`[r, in]`, = A),
//!   `.lora_up.weight` (`[out, r]`, = B) and `.alpha` (scalar); `lora_te1_…` (or `lora_te_…`) and
//!   `lora_te2_…` for the text encoders. Module names are those of the bundle's
//!   weights (diffusers names), or the original Stability (SGM/LDM) UNet block names that sd-scripts
//!   writes for SDXL, for the attention (transformer) layers — as diffusers'
//!   `_maybe_map_sgm_blocks_to_diffusers` maps them, with L the down blocks' layers per block:
//!   `input_blocks.{1 + b·(L+1) + a}.1.X` = `down_blocks.{b}.attentions.{a}.X`,
//!   `middle_block.1.X` = `mid_block.attentions.0.X` and `output_blocks.{b·(L+1) + a}.1.X` =
//!   `up_blocks.{b}.attentions.{a}.X` (up blocks have L+1 layers). L is read from the weight map (every
//!   down block with attentions has L, every up block with attentions L+1); where it does not settle
//!   L, `input_blocks`/`output_blocks` keys are refused with an error that says so. Both namings are
//!   looked up in a table made from the weight map, never by splitting names at underscores.
//!   Text-encoder module names are taken with or without their `text_model.` level (transformers 5
//!   drops it for `CLIPTextModel`, published files write it).
//!
//! LyCORIS LoHa (`<module>.hada_w1_a` … `.hada_w2_b`) and LoKr (`<module>.lokr_w1[_a|_b]`,
//! `.lokr_w2[_a|_b]`) factors in the kohya (LyCORIS) naming, with their `.alpha`, become exact
//! low-rank layers (`lycoris.rs`), merged like any LoRA; in the peft layout (alphas in the peft
//! config) they are refused, naming the kind.
//!
//! peft's DoRA (`<module>.lora_magnitude_vector`) gives a layer a magnitude per output row; such a
//! layer is merged from the pristine weight on the host (`merge.rs`), as peft's forward applies it
//! (GPU merges refuse it). kohya's `dora_scale` is refused, naming the kind (diffusers drops it).
//!
//! The text encoders' targetable weights (attention q/k/v/out projections, MLP fc1/fc2) are the
//! bundle's weights `text_encoder[_2].<module>.weight`; a bundle exported before its text encoders
//! took them as inputs refuses a file's text-encoder keys with an error naming them.
//!
//! Convolution LoRAs (kohya LoCon, peft's LoRA on `Conv2d`: down `[r, in, kh, kw]`, up
//! `[out, r, 1, 1]`) land on the UNet's convolution weights `[out, in, kh, kw]` where the bundle
//! takes them as inputs (CPU bundles: `weights.conv_graphs`), merged as the matrices
//! `[out, in·kh·kw]` they are in memory. A bundle without them (GPU bundles keep convolutions
//! constant for ONNX Runtime's NhwcConv fusion) refuses a file's convolution keys, naming them.
//!
//! Parts a bundle cannot take (those text-encoder and convolution parts) are kept in the
//! adapter's [`Untaken`]: a job with `unet_only` ([`LoraParts::Takeable`]) skips them and records
//! them; otherwise ([`LoraParts::All`]) they are an error naming every key, before any step.
//!
//! A file is in one layout or the other; a file that mixes them is refused.
//!
//! # Layout
//!
//! * `adapter.rs` — [`LoraAdapter`] and its [`LoraLayer`]s: reading a file (`load`, `from_bytes`)
//!   step by step — keys placed by the layout's `KeyMap`, factors converted to f32, every refused
//!   key gathered into one error, factors paired and their shapes checked.
//! * `parts.rs` — what a job uses of a file ([`LoraParts`]), the parts a bundle cannot take
//!   ([`Untaken`]) and the refused keys (`Refused`: other adapter kinds, unmatched), one error.
//! * `layout.rs` — [`LoraLayout`]: which layout a file is in, the grammar of its keys, and where
//!   a peft key goes.
//! * `kohya.rs` — kohya / SGM module names onto the bundle's weight names (`KohyaMap`).
//! * `lycoris.rs` — LoHa and LoKr factors as exact low-rank layers.
//! * `merge.rs` — `W + Σ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ` on the host ([`Weights::merge`]; DoRA layers there
//!   only) and on the GPU ([`Weights::upload_factors`] → [`DeviceFactors`],
//!   [`Weights::merge_on_device`]).
//! * `pending.rs` — [`PendingMerge`] / [`MergeSender`]: a merge in flight while a job denoises.
//! * `fixtures.rs` (tests only) — safetensors files made in memory.
//!
//! # From a LoRA file to merged weights
//!
//! ```text
//! file ─read─▶ safetensors tensors ─detect─▶ Peft | Kohya ─map keys─▶ bundle weight names
//!      ─convert─▶ f32 factors ─refused keys: one error naming them all─▶ pair A·B, check shapes
//!      ─▶ LoraAdapter { layers: weight → (A, B, rank, alpha) }
//! [(LoraAdapter, scale)] ─Weights::merge (host) / merge_on_device (GPU)─▶ weights::MergedWeights
//!      ─MergeSender ══▶ PendingMerge ─▶ the pipeline binds it at its LoRA step
//! ```
//!
//! [`Weights::merge`]: crate::weights::Weights::merge
//! [`Weights::upload_factors`]: crate::weights::Weights::upload_factors
//! [`Weights::merge_on_device`]: crate::weights::Weights::merge_on_device

use std::path::Path;

use crate::Error;

mod adapter;
#[cfg(test)]
mod fixtures;
mod kohya;
mod layout;
mod lycoris;
mod merge;
mod parts;
mod pending;
pub mod plan;

pub use adapter::{LoraAdapter, LoraLayer, LoraParts, Untaken};
pub use layout::LoraLayout;
pub use merge::DeviceFactors;
pub use pending::{MergeSender, PendingMerge};
pub use plan::{LoraBound, LoraMode, LoraPlan};

/// Whether a LoRA file's key adapts a text encoder, in either layout (`text_encoder[_2].…`,
/// `lora_te…_`): what a store can tell from a file's header before reading it.
pub fn is_text_encoder_key(key: &str) -> bool {
    layout::text_part(key).is_some() || layout::KOHYA_TE.iter().any(|p| key.starts_with(p))
}

/// Whether a bundle's weight map holds convolution weights (its UNet's convolutions take LoCon
/// parts); a bundle without them refuses a file's convolution parts, or skips them (`unet_only`).
pub fn takes_conv(weights: &std::collections::BTreeMap<String, crate::bundle::WeightEntry>) -> bool {
    layout::takes_conv(weights)
}

/// Whether a bundle's weight map holds the resnets' `time_emb_proj` weights (which LoCon adapts);
/// a bundle without them refuses such parts, or skips them (`unet_only`).
pub fn takes_time_emb(weights: &std::collections::BTreeMap<String, crate::bundle::WeightEntry>) -> bool {
    layout::takes_time_emb(weights)
}

/// Whether a bundle weight belongs to a text encoder (`text_encoder[_2].…`).
pub(crate) fn is_text_weight(name: &str) -> bool {
    layout::text_part(name).is_some()
}

/// An error about the LoRA file at `path`.
fn err(path: &Path, message: impl Into<String>) -> Error {
    Error::Lora {
        path: path.into(),
        message: message.into(),
    }
}

/// Up to 4 names, then `, …`.
fn some(names: &[String]) -> String {
    let mut s = names.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
    if names.len() > 4 {
        s.push_str(", …");
    }
    s
}
