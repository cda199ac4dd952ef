//! The model side of katz: bundles, ONNX Runtime sessions, schedulers and the diffusion pipeline.
//!
//! ```text
//!  Request ─▶ text::TextEncoders ─▶ (prompt_embeds, pooled, time_ids)   [uncond; cond]
//!               │ tokenizers → text_encoder, text_encoder_2
//!               ▼
//!  noise ─▶ latents ─▶ for each step i (scheduler::Scheduler):
//!             latent_in = [latents; latents] · input_scale(i)
//!             unet_encoder(latent_in, t, embeds, weights) ─▶ emb, mid, skips
//!             controlnet::ControlNet(latent_in, t, image) ─▶ residuals   ─┐ Σ scaleⱼ·resⱼ
//!             unet_decoder(emb, mid + res, skips + res, weights) ◀────────┘ (kernels::residual)
//!             kernels::guidance::combine ─▶ scheduler.step ─▶ latents ─▶ Observer (progress, cancel)
//!  latents / scaling_factor ─▶ vae_decoder ─▶ image ∈ [0,1] ─▶ PNG (image.rs)
//!
//!  LoRA files (lora/) ─▶ lora::LoraAdapter ─▶ Weights::merge ─▶ weights::MergedWeights
//!                        (W + Σ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ, kernels::lora; lora::PendingMerge while in flight)
//!                        bound as graph inputs of unet_encoder / unet_decoder
//! ```
//!
//! [`runtime::init`] loads ONNX Runtime (dynamically, from the pinned PyPI wheel that
//! `tools/fetch-onnxruntime.sh` unpacks) before any session is made.

pub mod bundle;
pub mod controlnet;
pub mod device;
pub(crate) mod dtype;
pub mod error;
pub(crate) mod graphs;
pub mod image;
pub mod lora;
pub mod noise;
pub mod pipeline;
pub mod quality;
pub mod runtime;
pub mod scheduler;
pub mod tensor;
pub mod text;
pub mod threads;
pub mod weights;

pub use error::{Disposition, Error, Result};
