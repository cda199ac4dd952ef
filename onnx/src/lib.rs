//! The model side of katz: bundles, ONNX Runtime sessions, schedulers and the diffusion pipeline.
//!
//! ```text
//!  Request ─ValidRequest::new(&Accepts)─▶ ValidRequest ─▶ Pipeline::run(&req, RunOptions)
//!                                                          │ text::TextEncoders ─▶ (prompt_embeds, pooled, time_ids)
//!                                                          ▼
//!  (embeds, pooled, time_ids), weights ─▶ unet prelude (once per job and LoRA switch, where the
//!                                          bundle has one) ─▶ job.* inputs of the UNet pair
//!  noise ─▶ latents ─▶ for each step i (scheduler::Scheduler), one loop (host | device | split):
//!             latent_in = [latents; latents] · input_scale(i)
//!             unet_encoder(latent_in, t, embeds, weights) ─▶ emb, mid, skips
//!             ControlSession (controlnet seam) ─▶ residuals   ─┐ Σ scaleⱼ·resⱼ
//!             unet_decoder(emb, mid + res, skips + res, weights) ◀┘ (kernels::residual)
//!             kernels::guidance::combine ─▶ scheduler.step ─▶ latents ─▶ Observer (progress, cancel)
//!  latents / scaling_factor ─▶ vae_decoder ─▶ image ∈ [0,1] ─▶ PNG (image.rs)
//!
//!  LoRA files (lora/) ─▶ lora::LoraAdapter ─▶ Weights::merge ─▶ weights::MergedWeights
//!                        (W + Σ sᵢ·(αᵢ/rᵢ)·Bᵢ·Aᵢ, kernels::lora; lora::PendingMerge while in flight),
//!                        switched in as lora::plan says (before step 0, or by a bound step)
//! ```
//!
//! ## Layout
//! Policy (what to compute) and ONNX Runtime contact (how) are apart:
//!
//! | module | owns |
//! |---|---|
//! | `request` | `Request`, `ControlRequest { model: ControlModel, prep }`, `Limits`, `Accepts`, `ValidRequest::new` — every check of a request, once |
//! | `placement` | `Placement`: where the base, the second guidance half and each ControlNet run; peer access |
//! | `pipeline/` | `Pipeline::load` / `place` / `run`; the host, device and split loops; `Timings` |
//! | `unet/` | the UNet pair bound to a job on a GPU (`bound`), and bound once for CUDA graphs (`graphed`); the prelude of job constants (`prelude`) |
//! | `controlnet/` | the ControlNet seam (`ControlService`, `ControlSession`), the model, inline and threaded sessions |
//! | `lora/` | LoRA files → adapters, merges, pending (asynchronous) merges, the switching plan |
//! | `weights` | the pristine weights (host and device) and merged sets |
//! | `shapes` | the UNet's output strides, fixed free dimensions (static shapes) |
//! | `scheduler/` | Euler, Euler ancestral, DDIM, DPM++ 2M (one file each behind one trait) |
//! | `text` | tokenizers and the two text encoders → conditioning |
//! | `runtime` | loading ONNX Runtime, `Device`, `SessionOptions`, sessions with execution providers |
//! | `ops` | katz's own ONNX Runtime operators (domain `katz`, CUDA only), registered in every GPU session: the fp16 GEGLU of GPU bundles' step graphs, and the fp8 operators of `fp8` |
//! | `fp8` | `--precision fp8`: the `katz` operators of fp8 graphs (quantize, fp8 GEMM via cuBLASLt), their weight copies and when they are made again |
//! | `device` | tensors in GPU memory (`DevTensor`, `DevRef`) and how they meet ONNX Runtime |
//! | `bundle` | bundle manifests and their checks |
//! | `vae` | the VAE decode: whole, or diffusers' tiled decode for large images |
//! | `preview` | step previews: latents → RGB at latent resolution by a linear projection (the bundle's `preview_rgb`, or SDXL's factors) → PNG |
//! | `conditioning` | conditioning images of any size: resize / crop / pad to the request's size, the canny preprocessor |
//! | `image`, `noise`, `tensor`, `threads`, `quality`, `error` | PNG in/out, seeded noise, host tensors, lasting threads, image metrics, the error type |
//!
//! [`runtime::init`] loads ONNX Runtime (dynamically, from the pinned PyPI wheel that
//! `tools/fetch-onnxruntime.sh` unpacks) before any session is made.

pub mod bundle;
pub mod conditioning;
pub mod controlnet;
pub mod device;
pub(crate) mod dtype;
pub mod error;
pub mod fp8;
pub mod image;
pub mod lora;
pub mod noise;
pub mod ops;
pub mod pipeline;
pub mod placement;
pub mod preview;
pub mod quality;
pub mod request;
pub mod runtime;
pub mod scheduler;
pub mod shapes;
pub mod tensor;
pub mod text;
pub mod threads;
pub(crate) mod unet;
pub mod vae;
pub mod weights;

pub use error::{Disposition, Error, Result};
