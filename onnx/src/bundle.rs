//! Model bundles on disk (docs/bundles.md): the manifest, and its check against the graphs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::scheduler::SchedulerConfig;
use crate::{Error, Result};

pub const FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextEncoderSpec {
    pub graph: String,
    pub tokenizer: String,
    pub max_length: usize,
    pub hidden_size: usize,
    pub pooled_size: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnetSpec {
    pub encoder: String,
    pub decoder: String,
    pub cross_attention_dim: usize,
    pub pooled_dim: usize,
    /// Number of skip tensors between encoder and decoder (= ControlNet down residuals).
    pub skips: usize,
    pub emb_dim: usize,
    /// What the step graphs compute from the conditioning and weights alone, as a graph run once
    /// per job (crate::unet::prelude; `tools/job_prelude.py`): the step graphs then take its
    /// outputs as inputs named `job.<graph>.<tensor>`. Absent in bundles exported before it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prelude: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightEntry {
    /// The graph taking it: `unet_encoder`, `unet_decoder`, `text_encoder[_2]` (base bundles) or
    /// `controlnet` (ControlNet bundles).
    pub graph: String,
    pub shape: Vec<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsSpec {
    pub file: String,
    /// diffusers parameter name (= graph input name) → graph and shape.
    pub map: BTreeMap<String, WeightEntry>,
    /// The graphs whose convolutions (LoCon targets: resnets' conv1/conv2/conv_shortcut, the
    /// down/upsamplers' conv, conv_in, conv_out) take their weights as inputs: both UNet graphs in
    /// CPU bundles, none in GPU bundles (their convolutions stay initializers, which ONNX Runtime's
    /// NhwcConv fusion needs) or in bundles exported before; those refuse LoCon parts.
    #[serde(default)]
    pub conv_graphs: Vec<String>,
}

/// The graphs that give deterministic output (`exact` in `bundle.json`, GPU bundles): a fused
/// graph's twin without ONNX Runtime's fused GroupNorm (which sums with atomics on the GPU), or
/// the graph itself where nothing nondeterministic was fused. Used with
/// [`crate::runtime::SessionOptions::deterministic`]; absent in CPU bundles (deterministic as
/// they are) and in GPU bundles exported before the key.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExactGraphs {
    #[serde(default)]
    pub unet_encoder: Option<String>,
    #[serde(default)]
    pub unet_decoder: Option<String>,
    #[serde(default)]
    pub vae_decoder: Option<String>,
}

/// The fp8 graphs of a GPU bundle (`fp8` in `bundle.json`, written by `tools/fp8_rewrite.py`):
/// the fused fp16 UNet graphs with their GEMMs against the LoRA-targetable weights in fp8
/// (crate::fp8), and what the rewrite did.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Fp8Graphs {
    pub unet_encoder: String,
    pub unet_decoder: String,
    /// The calibrated activation ranges the scales came from.
    #[serde(default)]
    pub amax: Option<String>,
    /// GEMMs made fp8, and GEMMs left fp16 (shapes cuBLASLt's fp8 kernels do not take).
    #[serde(default)]
    pub rewritten: Option<usize>,
    #[serde(default)]
    pub skipped: Option<usize>,
}

fn fp32() -> String {
    "fp32".into()
}

/// `bundle.json` of a base-model bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseManifest {
    pub format: u32,
    pub kind: String,
    pub name: String,
    pub architecture: String,
    pub signature: String,
    pub dtype: String,
    /// `fp32`, or `fp16-cuda`: fused fp16 graphs that only ONNX Runtime's CUDA provider runs.
    #[serde(default = "fp32")]
    pub compute: String,
    pub latent_channels: usize,
    pub vae_scale_factor: usize,
    pub scaling_factor: f32,
    pub prediction_type: String,
    pub default_size: [usize; 2],
    pub default_steps: usize,
    pub default_guidance: f32,
    pub force_zeros_for_empty_prompt: bool,
    pub scheduler: SchedulerConfig,
    pub text_encoders: Vec<TextEncoderSpec>,
    pub unet: UnetSpec,
    pub vae_decoder: String,
    /// How the VAE decoder computes: `fp32`, `fp16` (fused, fp16 throughout) or `fp16-upcast`
    /// (fused, fp16 up to the mid block, the up blocks in fp32); its I/O is f32 either way.
    #[serde(default = "fp32")]
    pub vae_precision: String,
    /// The VAE's `sample_size`: the image side of one tile of a tiled decode (crate::vae);
    /// absent in older bundles, where the larger side of `default_size` stands in.
    #[serde(default)]
    pub vae_sample_size: Option<usize>,
    pub weights: WeightsSpec,
    /// Deterministic twins of the fused graphs (GPU bundles whose GroupNorm is fused).
    #[serde(default)]
    pub exact: ExactGraphs,
    /// fp8 twins of the UNet graphs (`--precision fp8`), in GPU bundles exported with them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fp8: Option<Fp8Graphs>,
    /// The latent → RGB projection of step previews, fitted to this bundle's VAE
    /// (`tools/fit_preview_projection.py`); absent: SDXL's factors for 4 latent channels
    /// (crate::preview).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_rgb: Option<crate::preview::PreviewRgb>,
}

impl BaseManifest {
    /// The tiles of the VAE's tiled decode (diffusers' `enable_tiling()` sizes): latents of more
    /// than one tile's area decode tiled.
    pub fn vae_tiling(&self) -> crate::vae::Tiling {
        let sample = self
            .vae_sample_size
            .unwrap_or_else(|| self.default_size[0].max(self.default_size[1]));
        crate::vae::Tiling::new(sample, self.vae_scale_factor)
    }
}

/// `bundle.json` of a ControlNet bundle.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlNetManifest {
    pub format: u32,
    pub kind: String,
    pub name: String,
    pub architecture: String,
    pub signature: String,
    pub dtype: String,
    #[serde(default = "fp32")]
    pub compute: String,
    pub graph: String,
    pub conditioning_channels: usize,
    pub residuals: usize,
    /// The LoRA-targetable Linear weights the graph takes as inputs (graph `controlnet`), in a
    /// file of the bundle: the sessions of every shape bucket bind one copy of them. Absent in
    /// bundles exported before the key, whose graph holds every weight (one session of free
    /// shapes, or of the only bucket).
    #[serde(default)]
    pub weights: Option<WeightsSpec>,
    /// What the graph computes from the job's constants alone (conditioning, image, weights), as
    /// a graph run once per job (`tools/job_prelude.py`; crate::unet::prelude): the graph then
    /// takes its outputs as inputs named `job.controlnet.<tensor>`. Absent in older bundles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prelude: Option<String>,
}

fn read_manifest<T: serde::de::DeserializeOwned>(dir: &Path, kind: &str) -> Result<T> {
    if !dir.is_dir() {
        return Err(Error::bundle(dir, "no such bundle directory"));
    }
    let path = dir.join("bundle.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::bundle(&path, format!("not valid JSON: {e}")))?;
    let found = v.get("kind").and_then(|k| k.as_str()).unwrap_or("<none>");
    if found != kind {
        return Err(Error::bundle(
            dir,
            format!("is a `{found}` bundle where a `{kind}` bundle was expected"),
        ));
    }
    let format = v.get("format").and_then(|k| k.as_u64()).unwrap_or(0);
    if format != FORMAT as u64 {
        return Err(Error::bundle(
            &path,
            format!("format {format} is not supported (this katz reads {FORMAT})"),
        ));
    }
    serde_json::from_value(v).map_err(|e| Error::bundle(&path, format!("manifest does not parse: {e}")))
}

/// A base-model bundle: its directory and manifest.
#[derive(Debug, Clone)]
pub struct BaseBundle {
    pub dir: PathBuf,
    pub manifest: BaseManifest,
}

impl BaseBundle {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let manifest: BaseManifest = read_manifest(&dir, "base")?;
        if manifest.architecture != "sdxl" {
            return Err(Error::bundle(
                &dir,
                format!("architecture `{}` is not supported", manifest.architecture),
            ));
        }
        // the weights file's type: f32, or f16 in fp16 GPU bundles (their graphs take f16)
        let fp16_gpu = manifest.dtype == "float16" && manifest.compute != "fp32";
        if manifest.dtype != "float32" && !fp16_gpu {
            return Err(Error::bundle(
                &dir,
                format!(
                    "weights of dtype `{}` with `{}` compute are not supported",
                    manifest.dtype, manifest.compute
                ),
            ));
        }
        if manifest.text_encoders.len() != 2 {
            return Err(Error::bundle(&dir, "an SDXL bundle has two text encoders"));
        }
        // convolution weights only in the graphs the manifest says take them
        let w = &manifest.weights;
        if let Some((name, e)) = w
            .map
            .iter()
            .find(|(_, e)| e.shape.len() == 4 && !w.conv_graphs.contains(&e.graph))
        {
            return Err(Error::bundle(
                &dir,
                format!(
                    "weight `{name}` {:?} is a convolution of graph `{}`, which `weights.conv_graphs` ({:?}) \
                     does not list",
                    e.shape, e.graph, w.conv_graphs
                ),
            ));
        }
        if let Some(p) = &manifest.preview_rgb {
            crate::preview::Projection::new(p, manifest.latent_channels)
                .map_err(|m| Error::bundle(&dir, m))?;
        }
        let b = BaseBundle { dir, manifest };
        for f in b.files() {
            if !b.dir.join(&f).is_file() {
                return Err(Error::bundle(
                    &b.dir,
                    format!("manifest names `{f}`, which is missing"),
                ));
            }
        }
        Ok(b)
    }

    fn files(&self) -> Vec<String> {
        let m = &self.manifest;
        let mut f = vec![
            m.unet.encoder.clone(),
            m.unet.decoder.clone(),
            m.vae_decoder.clone(),
            m.weights.file.clone(),
        ];
        for t in &m.text_encoders {
            f.push(t.graph.clone());
            f.push(t.tokenizer.clone());
        }
        let x = &m.exact;
        f.extend(
            [&x.unet_encoder, &x.unet_decoder, &x.vae_decoder]
                .into_iter()
                .flatten()
                .cloned(),
        );
        if let Some(g) = &m.fp8 {
            f.extend([g.unet_encoder.clone(), g.unet_decoder.clone()]);
        }
        f.extend(m.unet.prelude.clone());
        f
    }

    /// The UNet prelude graph, where the bundle has one.
    pub fn unet_prelude(&self) -> Option<PathBuf> {
        self.manifest.unet.prelude.as_ref().map(|p| self.path(p))
    }

    /// The UNet encoder and decoder graphs a pipeline runs: the fp8 ones with `fp8` (where the
    /// bundle has them: checked at load), else with `deterministic` their twins without fused
    /// GroupNorm where the bundle has them.
    pub fn unet_graphs(&self, deterministic: bool, fp8: bool) -> [PathBuf; 2] {
        if let Some(g) = self.manifest.fp8.as_ref().filter(|_| fp8) {
            return [self.path(&g.unet_encoder), self.path(&g.unet_decoder)];
        }
        let (u, x) = (&self.manifest.unet, &self.manifest.exact);
        let pick = |graph: &String, twin: &Option<String>| match twin {
            Some(t) if deterministic => self.path(t),
            _ => self.path(graph),
        };
        [
            pick(&u.encoder, &x.unet_encoder),
            pick(&u.decoder, &x.unet_decoder),
        ]
    }

    /// The VAE decoder graph a pipeline runs (its twin with `deterministic`, if there is one).
    pub fn vae_graph(&self, deterministic: bool) -> PathBuf {
        match &self.manifest.exact.vae_decoder {
            Some(t) if deterministic => self.path(t),
            _ => self.path(&self.manifest.vae_decoder),
        }
    }

    /// Whether the bundle names its deterministic graphs (every GPU bundle exported with the key).
    pub fn has_exact_twins(&self) -> bool {
        let x = &self.manifest.exact;
        x.unet_encoder.is_some() && x.unet_decoder.is_some() && x.vae_decoder.is_some()
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }
}

/// A ControlNet bundle.
#[derive(Debug, Clone)]
pub struct ControlNetBundle {
    pub dir: PathBuf,
    pub manifest: ControlNetManifest,
}

impl ControlNetBundle {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        let manifest: ControlNetManifest = read_manifest(&dir, "controlnet")?;
        let files = [
            Some(&manifest.graph),
            manifest.weights.as_ref().map(|w| &w.file),
            manifest.prelude.as_ref(),
        ];
        for f in files.into_iter().flatten() {
            if !dir.join(f).is_file() {
                return Err(Error::bundle(
                    &dir,
                    format!("manifest names `{f}`, which is missing"),
                ));
            }
        }
        Ok(ControlNetBundle { dir, manifest })
    }

    /// Refuses a ControlNet made for another base model.
    pub fn check_fits(&self, base: &BaseBundle) -> Result<()> {
        let (mine, theirs) = (&self.manifest.signature, &base.manifest.signature);
        if mine != theirs || self.manifest.residuals != base.manifest.unet.skips {
            return Err(Error::InvalidRequest(format!(
                "ControlNet `{}` (signature {mine}, {} residuals) does not fit base model `{}` (signature {theirs}, {} skips)",
                self.manifest.name, self.manifest.residuals, base.manifest.name, base.manifest.unet.skips
            )));
        }
        Ok(())
    }
}

/// Refuses graphs the device cannot run: `fp16-cuda` bundles need ONNX Runtime's CUDA provider.
pub(crate) fn check_compute(dir: &Path, compute: &str, device: crate::runtime::Device) -> Result<()> {
    if compute != "fp32" && !device.is_gpu() {
        return Err(Error::bundle(
            dir,
            format!("its graphs are `{compute}`: they run on --device cuda:N only"),
        ));
    }
    Ok(())
}

/// Checks that a session's inputs and outputs are the ones the manifest promises.
pub(crate) fn check_io(
    path: &Path,
    session: &ort::session::Session,
    inputs: &[String],
    outputs: &[String],
) -> Result<()> {
    let have_in: Vec<&str> = session.inputs().iter().map(|o| o.name()).collect();
    let have_out: Vec<&str> = session.outputs().iter().map(|o| o.name()).collect();
    let missing_in: Vec<&String> = inputs.iter().filter(|n| !have_in.contains(&n.as_str())).collect();
    let extra_in: Vec<&&str> = have_in
        .iter()
        .filter(|n| !inputs.iter().any(|i| i == **n))
        .collect();
    let missing_out: Vec<&String> = outputs
        .iter()
        .filter(|n| !have_out.contains(&n.as_str()))
        .collect();
    if !missing_in.is_empty() || !extra_in.is_empty() || !missing_out.is_empty() {
        let show = |v: Vec<String>| {
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        return Err(Error::bundle(
            path,
            format!(
                "graph does not match the manifest: inputs missing from the graph: {}; graph inputs the manifest \
                 does not know: {}; outputs missing: {}",
                show(missing_in.iter().take(5).map(|s| s.to_string()).collect()),
                show(extra_in.iter().take(5).map(|s| s.to_string()).collect()),
                show(missing_out.iter().take(5).map(|s| s.to_string()).collect()),
            ),
        ));
    }
    Ok(())
}
