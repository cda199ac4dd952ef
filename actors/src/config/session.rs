//! The session section of the worker's configuration: where and how ONNX Runtime's sessions run
//! (device, shape buckets, CUDA graphs, determinism, the graph cache), and the defaults that
//! depend on the device or the bundle, resolved into `katz_onnx::runtime::SessionOptions`.

use std::path::{Path, PathBuf};

use katz_onnx::error::ParseError;
use katz_onnx::placement::Placement;
use katz_onnx::runtime::{BucketLoad, ConvSearch, Device, FixedShape, OtherSizes, Precision, SessionOptions};
use katz_onnx::shapes::SDXL_BUCKETS;
use serde::Deserialize;
use serde_with::{serde_as, DisplayFromStr};

/// Where and how the ONNX Runtime sessions run (base worker and ControlNet worker alike).
#[serde_as]
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// `cpu`, `cuda:N` or `tensorrt:N`; a GPU that cannot be used is an error, never a CPU
    /// fall-back.
    #[serde_as(as = "DisplayFromStr")]
    pub device: Device,
    /// Threads per ONNX Runtime operator (0: all cores).
    pub threads: usize,
    /// Shape buckets: the sizes served with UNet graphs fixed to them (and CUDA graphs on a
    /// GPU), `WxH,WxH,…`, `sdxl` (SDXL's nine usual sizes), `none`, or `auto` [default: `auto`:
    /// on a GPU, SDXL's sizes for a bundle whose default size is 1024x1024 and the bundle's
    /// default size otherwise; none on the CPU].
    #[serde_as(as = "DisplayFromStr")]
    pub shapes: ShapeList,
    /// A size no bucket has: `dynamic` (sessions with free shapes run it, slower) or `refuse`
    /// (a clear error; no free-shape sessions are made).
    #[serde_as(as = "DisplayFromStr")]
    pub other_sizes: OtherSizes,
    /// CUDA graphs for every bucket's UNet encoder and decoder (needs buckets and `cuda:N`):
    /// captured when the worker loads, replayed every step [default: on with `cuda:N` and buckets].
    pub cuda_graph: Option<bool>,
    /// When the shape buckets open (and are captured on a GPU): `all`, before the worker takes
    /// jobs, or `first-use`: the first bucket at load, each other one opened in the background
    /// and captured at the start of its first job (that job pays the capture; the worker is
    /// ready in a fraction of the time) [default: `first-use` with one model thread
    /// (`concurrency = 1`), else `all`: a capture stops every other GPU user of the process].
    #[serde_as(as = "Option<DisplayFromStr>")]
    pub bucket_load: Option<BucketLoad>,
    /// CUDA: matrix products and convolutions in full fp32, not TF32.
    pub exact_fp32: bool,
    /// cuDNN's convolution algorithms: `heuristic` (no timing; the same choice every run) or
    /// `exhaustive` (timed on a shape's first run; can differ between runs).
    #[serde_as(as = "DisplayFromStr")]
    pub conv_search: ConvSearch,
    /// Byte-identical output for the same job: ONNX Runtime's deterministic compute and, in an
    /// fp16 GPU bundle, its graphs without the fused GroupNorm (slower: +14% per UNet step, +54%
    /// per VAE decode on an H200) [default: on, except for fp16 GPU bundles, whose fused kernels
    /// leave about 8% of pixel values 1/255 apart between two runs].
    pub deterministic: Option<bool>,
    /// The UNet's precision: `bundle` (the bundle's own graphs: fp16 in a GPU bundle) or `fp8`
    /// (the GEMMs against the LoRA-targetable weights in fp8 e4m3: a GPU bundle exported with
    /// fp8 graphs, `cuda:N` of compute capability 8.9+; not with `deterministic`).
    #[serde_as(as = "DisplayFromStr")]
    pub precision: Precision,
    /// Where optimized graphs are kept between starts: a directory, `none`, or `auto` [default:
    /// `auto`: on a GPU, `$KATZ_CACHE_DIR`, else `$XDG_CACHE_HOME/katz/graphs`, else
    /// `~/.cache/katz/graphs`; none on the CPU].
    #[serde_as(as = "DisplayFromStr")]
    pub graph_cache: GraphCache,
    /// Run every shape bucket once before taking jobs, so the first job is as fast as the
    /// tenth [default: on a GPU].
    pub warm_up: Option<bool>,
}

impl SessionConfig {
    /// The session options for the base bundle `base`; buckets take the UNet batch `placement`
    /// runs (1 per GPU with split guidance, else 2: both guidance halves in one batch).
    pub fn options(&self, placement: &Placement, base: Option<&Path>) -> SessionOptions {
        let gpu = self.device.is_gpu();
        let sizes: Vec<(usize, usize)> = match &self.shapes {
            ShapeList::Sizes(v) => v.iter().map(|s| (s.width, s.height)).collect(),
            ShapeList::Auto if !gpu => Vec::new(),
            ShapeList::Auto => match base.and_then(|b| katz_onnx::bundle::BaseBundle::open(b).ok()) {
                Some(b) if b.manifest.default_size == [1024, 1024] => SDXL_BUCKETS.to_vec(),
                Some(b) => vec![(b.manifest.default_size[0], b.manifest.default_size[1])],
                // the load reports the bundle's own error
                None => Vec::new(),
            },
        };
        let buckets: Vec<FixedShape> = sizes
            .into_iter()
            .map(|(width, height)| FixedShape {
                width,
                height,
                unet_batch: placement.unet_batch(true),
            })
            .collect();
        let cuda = matches!(self.device, Device::Cuda(_));
        SessionOptions {
            intra_threads: self.threads,
            device: self.device,
            cuda_graph: self.cuda_graph.unwrap_or(cuda && !buckets.is_empty()),
            buckets,
            bucket_load: self.bucket_load.unwrap_or_default(),
            other_sizes: self.other_sizes,
            exact_fp32: self.exact_fp32,
            conv_search: self.conv_search,
            deterministic: self.deterministic.unwrap_or_else(|| default_deterministic(base)),
            precision: self.precision,
            cache: match &self.graph_cache {
                GraphCache::Off => None,
                GraphCache::Dir(d) => Some(d.clone()),
                GraphCache::Auto if gpu => default_graph_cache(),
                GraphCache::Auto => None,
            },
        }
    }

    /// Whether the worker runs its buckets once before taking jobs.
    pub fn warm_up(&self) -> bool {
        self.warm_up.unwrap_or(self.device.is_gpu())
    }
}

/// Whether a pipeline of bundle `base` computes deterministically unless told: yes, except for
/// fp16 GPU bundles (their deterministic graphs cost a seventh of the step; docs/protocol.md,
/// "Determinism"). Without a bundle (or one that does not open): yes.
pub fn default_deterministic(base: Option<&Path>) -> bool {
    match base.and_then(|b| katz_onnx::bundle::BaseBundle::open(b).ok()) {
        Some(b) => b.manifest.compute == "fp32",
        None => true,
    }
}

/// The optimized-graph cache's default directory: `$KATZ_CACHE_DIR`, `$XDG_CACHE_HOME/katz/graphs`
/// or `~/.cache/katz/graphs` (None without a home).
pub fn default_graph_cache() -> Option<PathBuf> {
    let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    env("KATZ_CACHE_DIR")
        .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("katz").join("graphs")))
        .or_else(|| env("HOME").map(|d| d.join(".cache").join("katz").join("graphs")))
}

/// Which sizes get shape buckets (`SessionConfig::shapes`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ShapeList {
    /// Decided by the device and the bundle (see `SessionConfig::shapes`).
    #[default]
    Auto,
    /// These sizes (none: one set of free-shape sessions).
    Sizes(Vec<ImageSize>),
}

impl std::str::FromStr for ShapeList {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s.trim() {
            "auto" => Ok(ShapeList::Auto),
            "none" | "" => Ok(ShapeList::Sizes(Vec::new())),
            "sdxl" => Ok(ShapeList::Sizes(
                SDXL_BUCKETS
                    .iter()
                    .map(|&(width, height)| ImageSize { width, height })
                    .collect(),
            )),
            list => {
                let mut v: Vec<ImageSize> = Vec::new();
                for part in list.split(',') {
                    let size: ImageSize = part.trim().parse()?;
                    if !v.contains(&size) {
                        v.push(size);
                    }
                }
                Ok(ShapeList::Sizes(v))
            }
        }
    }
}

impl std::fmt::Display for ShapeList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ShapeList::Auto => f.write_str("auto"),
            ShapeList::Sizes(v) if v.is_empty() => f.write_str("none"),
            ShapeList::Sizes(v) => {
                let parts: Vec<String> = v.iter().map(|s| s.to_string()).collect();
                f.write_str(&parts.join(","))
            }
        }
    }
}

/// Where optimized graphs are kept (`SessionConfig::graph_cache`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum GraphCache {
    #[default]
    Auto,
    Off,
    Dir(PathBuf),
}

impl std::str::FromStr for GraphCache {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        Ok(match s {
            "auto" => GraphCache::Auto,
            "none" | "off" => GraphCache::Off,
            "" => {
                return Err(ParseError(
                    "graph_cache: give a directory, `none` or `auto`".into(),
                ))
            }
            d => GraphCache::Dir(PathBuf::from(d)),
        })
    }
}

impl std::fmt::Display for GraphCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GraphCache::Auto => f.write_str("auto"),
            GraphCache::Off => f.write_str("none"),
            GraphCache::Dir(d) => write!(f, "{}", d.display()),
        }
    }
}

/// An image size, `WxH` or one number for a square (as `--shapes` takes it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageSize {
    pub width: usize,
    pub height: usize,
}

impl std::str::FromStr for ImageSize {
    type Err = katz_onnx::error::ParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let f = FixedShape::parse(s, 1)?;
        Ok(ImageSize {
            width: f.width,
            height: f.height,
        })
    }
}

impl std::fmt::Display for ImageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}
