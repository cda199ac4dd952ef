//! LoRA adapters in the service: store, caches, and the LoraManager actor (issue #5).
//!
//! ```text
//! job delivered ─Prefetch{names}─▶ LoraManager ─fetch (store: dir | Redis, maybe slow)─▶ host cache
//! job running   ─Merge{names, scales}─▶ LoraManager ─load (cache hit | fetch)─▶ merge off the model
//!               thread ─▶ MergedWeights ─▶ ticket ─▶ pipeline rebinds at a step boundary (≤ step K)
//! ```

pub mod cache;
pub mod sim;
