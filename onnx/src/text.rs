//! Prompt conditioning of SDXL: two tokenizers and text encoders, concatenated hidden states,
//! pooled projection, time ids — diffusers' `StableDiffusionXLPipeline.encode_prompt`.
//!
//! The encoders take their LoRA-targetable weights (attention projections, MLP) as inputs named
//! `text_encoder.<module>.weight` / `text_encoder_2.<module>.weight` in the bundle's weight map,
//! bound per run from [`TextWeights`]: the pristine set, or a job's merge where its LoRAs touched
//! them (on a GPU, in place from device memory). A bundle exported before the encoders took their
//! weights as inputs has none in its map; its encoders run as they are (no text-encoder LoRAs).
//!
//! Prompts are truncated to the encoders' `max_length` (77 tokens, BOS and EOS included), as
//! diffusers does; a longer prompt is not refused but reported ([`TextEncoders::truncation`],
//! in the pipeline's `Generated`): the worker records it in the job's status, `katz generate` warns. (Chunking
//! into several 77-token windows, as A1111 and ComfyUI do, needs UNet and ControlNet graphs whose
//! `encoder_hidden_states` sequence axis is free; the exported graphs fix it at 77.)

use std::path::Path;

use ort::memory::{AllocationDevice, AllocatorType, MemoryInfo, MemoryType};
use ort::session::Session;
use ort::value::TensorRef;
use tokenizers::Tokenizer;

use crate::bundle::{check_io, BaseBundle, TextEncoderSpec};
use crate::runtime::{self, SessionOptions};
use crate::tensor::Tensor;
use crate::weights::{MergedWeights, Weights};
use crate::{Error, Result};

/// The weights the text encoders bind: the pristine set, and a job's merged set (its LoRAs'
/// text-encoder layers; the rest is bound from the pristine set). `None`: the encoders take no
/// weights (a bundle whose map has none of theirs).
#[derive(Clone, Copy, Default)]
pub struct TextWeights<'a> {
    pub pristine: Option<&'a Weights>,
    pub merged: Option<&'a MergedWeights>,
}

impl<'a> TextWeights<'a> {
    /// The pristine weights with a job's merge.
    pub fn new(pristine: &'a Weights, merged: &'a MergedWeights) -> Self {
        TextWeights {
            pristine: Some(pristine),
            merged: Some(merged),
        }
    }
}

struct Encoder {
    spec: TextEncoderSpec,
    /// The graph's name in the weight map (`text_encoder`, `text_encoder_2`).
    graph: String,
    tokenizer: Tokenizer,
    /// The same tokenizer without truncation or padding: counts a prompt's tokens.
    counter: Tokenizer,
    session: Session,
}

/// A prompt longer than the text encoders take: its tokens (BOS and EOS included) and how many
/// were kept (the encoders' `max_length`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated {
    pub tokens: usize,
    pub kept: usize,
}

impl Truncated {
    /// `{"tokens": N, "kept": 77}`, as the job's status records it.
    pub fn to_json(&self) -> String {
        format!("{{\"tokens\":{},\"kept\":{}}}", self.tokens, self.kept)
    }
}

/// The conditioning of one request: `[uncond; cond]` when guidance is on, `[cond]` otherwise.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// `[B, 77, C]`
    pub prompt_embeds: Tensor,
    /// `[B, P]`
    pub pooled: Tensor,
    /// `[B, 6]`
    pub time_ids: Tensor,
}

pub struct TextEncoders {
    encoders: Vec<Encoder>,
    force_zeros_for_empty_prompt: bool,
}

fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_file(path).map_err(|e| Error::Tokenizer {
        path: path.into(),
        message: e.to_string(),
    })
}

impl TextEncoders {
    /// Loads both encoders, side by side (each session is mostly one core's work).
    pub fn load(bundle: &BaseBundle, opts: &SessionOptions) -> Result<Self> {
        let load = |spec: &crate::bundle::TextEncoderSpec| -> Result<Encoder> {
            let path = bundle.path(&spec.graph);
            let graph = Path::new(&spec.graph)
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let session = runtime::session(&path, opts)?;
            // input_ids, then the weights the map gives this graph (none in older bundles)
            let mut inputs = vec!["input_ids".to_string()];
            inputs.extend(
                bundle
                    .manifest
                    .weights
                    .map
                    .iter()
                    .filter(|(_, e)| e.graph == graph)
                    .map(|(n, _)| n.clone()),
            );
            check_io(
                &path,
                &session,
                &inputs,
                &["hidden_states".into(), "pooled".into()],
            )?;
            let tokenizer = load_tokenizer(&bundle.path(&spec.tokenizer))?;
            let mut counter = tokenizer.clone();
            counter.with_padding(None);
            counter.with_truncation(None).map_err(|e| Error::Tokenizer {
                path: bundle.path(&spec.tokenizer),
                message: e.to_string(),
            })?;
            Ok(Encoder {
                spec: spec.clone(),
                graph,
                tokenizer,
                counter,
                session,
            })
        };
        let encoders = std::thread::scope(|s| {
            let handles: Vec<_> = bundle
                .manifest
                .text_encoders
                .iter()
                .map(|spec| s.spawn(move || load(spec)))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Gpu("a thread loading a text encoder panicked".into()))
                    })
                })
                .collect::<Result<Vec<_>>>()
        })?;
        Ok(TextEncoders {
            encoders,
            force_zeros_for_empty_prompt: bundle.manifest.force_zeros_for_empty_prompt,
        })
    }

    /// Token ids of `text` for encoder `index`, padded/truncated to its max length.
    pub fn tokenize(&self, index: usize, text: &str) -> Result<Vec<i64>> {
        let enc = &self.encoders[index];
        let e = enc.tokenizer.encode(text, true).map_err(|e| Error::Tokenizer {
            path: enc.spec.tokenizer.clone().into(),
            message: e.to_string(),
        })?;
        let mut ids: Vec<i64> = e.get_ids().iter().map(|&i| i as i64).collect();
        let n = enc.spec.max_length;
        if ids.len() != n {
            // tokenizer.json normally pads and truncates itself; enforce the graph's fixed length
            let pad = enc.tokenizer.get_padding().map(|p| p.pad_id as i64).unwrap_or(0);
            ids.resize(n, pad);
        }
        Ok(ids)
    }

    /// Whether `text` is longer than every encoder takes: its most tokens over the encoders
    /// (BOS and EOS included) against their length.
    pub fn truncation(&self, text: &str) -> Result<Option<Truncated>> {
        let mut worst: Option<Truncated> = None;
        for enc in &self.encoders {
            let e = enc.counter.encode(text, true).map_err(|e| Error::Tokenizer {
                path: enc.spec.tokenizer.clone().into(),
                message: e.to_string(),
            })?;
            let (tokens, kept) = (e.get_ids().len(), enc.spec.max_length);
            if tokens > kept && worst.is_none_or(|w| tokens > w.tokens) {
                worst = Some(Truncated { tokens, kept });
            }
        }
        Ok(worst)
    }

    /// Hidden states `[B,77,C]` (concatenated over encoders) and pooled `[B,P]` of the last encoder.
    fn encode(&mut self, texts: &[&str], w: TextWeights<'_>) -> Result<(Tensor, Tensor)> {
        let b = texts.len();
        let mut hidden: Vec<Tensor> = Vec::new();
        let mut pooled = None;
        for idx in 0..self.encoders.len() {
            let n = self.encoders[idx].spec.max_length;
            let mut ids = Vec::with_capacity(b * n);
            for t in texts {
                ids.extend(self.tokenize(idx, t)?);
            }
            let enc = &mut self.encoders[idx];
            let input = TensorRef::from_array_view(([b, n], ids.as_slice()))?;
            let bound = w.pristine.filter(|p| !p.inputs_of(&enc.graph).is_empty());
            let (h, p) = match bound {
                None => {
                    let out = enc.session.run(ort::inputs!["input_ids" => input])?;
                    (
                        Tensor::from_output(&out, "hidden_states")?,
                        Tensor::from_output(&out, "pooled")?,
                    )
                }
                Some(pristine) => {
                    // weights bound (pristine or merged; in place on a GPU), outputs to the host
                    let none = MergedWeights::default();
                    let merged = w.merged.unwrap_or(&none);
                    let mut binding = enc.session.create_binding()?;
                    binding.bind_input("input_ids", &*input)?;
                    for name in pristine.inputs_of(&enc.graph) {
                        pristine.bind_input(&mut binding, name, merged)?;
                    }
                    let host = MemoryInfo::new(
                        AllocationDevice::CPU,
                        0,
                        AllocatorType::Device,
                        MemoryType::Default,
                    )?;
                    for o in ["hidden_states", "pooled"] {
                        binding.bind_output_to_device(o, &host)?;
                    }
                    let out = enc.session.run_binding(&binding)?;
                    (
                        Tensor::from_output(&out, "hidden_states")?,
                        Tensor::from_output(&out, "pooled")?,
                    )
                }
            };
            hidden.push(h);
            pooled = Some(p);
        }
        // concat on the channel axis
        let n = hidden[0].shape[1];
        let widths: Vec<usize> = hidden.iter().map(|h| h.shape[2]).collect();
        let c: usize = widths.iter().sum();
        let mut data = Vec::with_capacity(b * n * c);
        for row in 0..b * n {
            for (h, &w) in hidden.iter().zip(&widths) {
                data.extend_from_slice(&h.data[row * w..(row + 1) * w]);
            }
        }
        let pooled = pooled.ok_or_else(|| Error::InvalidRequest("bundle has no text encoder".into()))?;
        Ok((Tensor::new(vec![b, n, c], data), pooled))
    }

    /// diffusers' SDXL conditioning for a request; `cfg` adds the unconditional half in front.
    pub fn condition(
        &mut self,
        w: TextWeights<'_>,
        prompt: &str,
        negative_prompt: Option<&str>,
        cfg: bool,
        (height, width): (usize, usize),
    ) -> Result<Conditioning> {
        let (embeds, pooled) = if !cfg {
            self.encode(&[prompt], w)?
        } else if negative_prompt.is_none() && self.force_zeros_for_empty_prompt {
            let (e, p) = self.encode(&[prompt], w)?;
            let ze = Tensor::zeros(e.shape.clone());
            let zp = Tensor::zeros(p.shape.clone());
            (Tensor::concat0(&[&ze, &e]), Tensor::concat0(&[&zp, &p]))
        } else {
            self.encode(&[negative_prompt.unwrap_or(""), prompt], w)?
        };
        let b = embeds.shape[0];
        let ids = [height as f32, width as f32, 0.0, 0.0, height as f32, width as f32];
        let time_ids = Tensor::new(vec![b, 6], ids.iter().copied().cycle().take(6 * b).collect());
        Ok(Conditioning {
            prompt_embeds: embeds,
            pooled,
            time_ids,
        })
    }
}
