//! Loading ONNX Runtime and making sessions.
//!
//! ONNX Runtime is a shared library loaded at run time (`ort`'s `load-dynamic`): the pinned
//! version comes from the `onnxruntime` wheel on PyPI, unpacked by `tools/fetch-onnxruntime.sh`
//! into `.katz/ort/` of the repository. [`init`] finds it (`ORT_DYLIB_PATH` first, then
//! `.katz/ort/` above the executable or the working directory) and fails with the fix when it
//! is missing.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::{builder::GraphOptimizationLevel, Session};

use crate::error::ParseError;

mod cache;
use crate::{Error, Result};

/// The ONNX Runtime release katz is built and tested against.
pub const ORT_VERSION: &str = "1.31.1";

/// Why ONNX Runtime could not be loaded (kept, so every later call reports the same cause).
#[derive(Debug, Clone)]
enum InitError {
    Missing { searched: String },
    Load { path: PathBuf, message: String },
}

impl From<&InitError> for Error {
    fn from(e: &InitError) -> Self {
        match e {
            InitError::Missing { searched } => Error::RuntimeMissing {
                version: ORT_VERSION,
                searched: searched.clone(),
            },
            InitError::Load { path, message } => Error::RuntimeLoad {
                path: path.clone(),
                message: message.clone(),
            },
        }
    }
}

static ENV: OnceLock<std::result::Result<(Environment, PathBuf), InitError>> = OnceLock::new();

fn candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH") {
        out.push(PathBuf::from(p));
        return out;
    }
    let lib = format!("libonnxruntime.so.{ORT_VERSION}");
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    for r in roots {
        let p = r.join(".katz").join("ort").join(&lib);
        if !out.contains(&p) {
            out.push(p);
        }
    }
    out
}

/// Loads ONNX Runtime once per process; returns the library's path.
pub fn init() -> Result<PathBuf> {
    let state = ENV.get_or_init(|| {
        let cands = candidates();
        let Some(path) = cands.iter().find(|p| p.is_file()).cloned() else {
            let searched = cands
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ");
            return Err(InitError::Missing { searched });
        };
        let load_err = |e: &dyn std::fmt::Display| InitError::Load {
            path: path.clone(),
            message: e.to_string(),
        };
        let env = ort::init_from(&path)
            .map_err(|e| load_err(&e))?
            .with_name("katz")
            .build()
            .map_err(|e| load_err(&e))?;
        tracing::debug!(path = %path.display(), "loaded ONNX Runtime");
        Ok((env, path))
    });
    match state {
        Ok((_, p)) => Ok(p.clone()),
        Err(e) => Err(e.into()),
    }
}

fn environment() -> Result<&'static Environment> {
    init()?;
    match ENV.get() {
        Some(Ok((env, _))) => Ok(env),
        _ => unreachable!("init succeeded"),
    }
}

/// The execution provider sessions run on. A GPU request that cannot be honoured is an error at
/// start-up, never a silent fall-back to the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    /// ONNX Runtime's CUDA execution provider on GPU N.
    Cuda(i32),
    /// TensorRT on GPU N (CUDA for what TensorRT does not take).
    TensorRt(i32),
}

impl std::str::FromStr for Device {
    type Err = ParseError;
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        let (kind, id) = s.split_once(':').unwrap_or((s, "0"));
        let id: i32 = id
            .parse()
            .map_err(|_| ParseError(format!("`{s}`: device index `{id}` is not a number")))?;
        match kind {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(id)),
            "tensorrt" | "trt" => Ok(Device::TensorRt(id)),
            _ => Err(ParseError(format!("`{s}`: expected cpu, cuda:N or tensorrt:N"))),
        }
    }
}

impl Device {
    /// The GPU ordinal, or `None` for the CPU.
    pub fn gpu(&self) -> Option<i32> {
        match self {
            Device::Cpu => None,
            Device::Cuda(id) | Device::TensorRt(id) => Some(*id),
        }
    }

    pub fn is_gpu(&self) -> bool {
        self.gpu().is_some()
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::TensorRt(i) => write!(f, "tensorrt:{i}"),
        }
    }
}

/// Where sessions run and with how many threads.
#[derive(Debug, Clone, Default)]
pub struct SessionOptions {
    /// Threads per operator (0: ONNX Runtime's default, all cores).
    pub intra_threads: usize,
    pub device: Device,
    /// Shape buckets: the sizes (and UNet batch) the UNet graphs are fixed to, each with sessions
    /// of its own (and CUDA graphs); empty: one set of sessions for any size.
    pub buckets: Vec<FixedShape>,
    /// What a request of a size no bucket has gets, when there are buckets.
    pub other_sizes: OtherSizes,
    /// CUDA graphs for the UNet encoder and decoder of every bucket (needs buckets and `cuda:N`):
    /// captured when the pipeline loads, replayed every step (crate::unet::graphed).
    pub cuda_graph: bool,
    /// Which buckets open (and capture) as the pipeline loads.
    pub bucket_load: BucketLoad,
    /// CUDA: matrix products and convolutions in full fp32, not TF32 (ONNX Runtime's
    /// `use_tf32 = 0`). Parity checks against an fp32 reference set it: TF32 leaves ~1e-3 of
    /// relative error per step.
    pub exact_fp32: bool,
    /// How cuDNN picks convolution algorithms.
    pub conv_search: ConvSearch,
    /// ONNX Runtime's deterministic compute (kernels without atomics where it has a choice).
    pub deterministic: bool,
    /// The UNet's precision: the bundle's own graphs, or its fp8 graphs (crate::fp8).
    pub precision: Precision,
    /// A directory for optimized graphs: a session made once is saved there after ONNX Runtime's
    /// graph optimisations and later sessions of the same graph, shapes and provider load the
    /// saved one with the optimisations off (crate::runtime::cache). None: no cache.
    pub cache: Option<PathBuf>,
}

/// `KATZ_CUDA_OPTIONS`: more options of ONNX Runtime's CUDA provider for every CUDA session, as
/// `key=value[,key=value…]` with ONNX Runtime's own names (`prefer_nhwc=1,fuse_conv_bias=1`); they
/// override katz's. ONNX Runtime refuses a key it does not know, so a typo fails the load. Read
/// once; part of the optimized-graph cache's key.
pub const CUDA_OPTIONS_ENV: &str = "KATZ_CUDA_OPTIONS";

/// The parsed `KATZ_CUDA_OPTIONS` (empty when unset), or what is wrong with it.
pub fn cuda_options() -> std::result::Result<&'static [(String, String)], String> {
    static PARSED: std::sync::OnceLock<std::result::Result<Vec<(String, String)>, String>> =
        std::sync::OnceLock::new();
    PARSED
        .get_or_init(|| parse_cuda_options(&std::env::var(CUDA_OPTIONS_ENV).unwrap_or_default()))
        .as_deref()
        .map_err(|m| format!("{CUDA_OPTIONS_ENV}: {m}"))
}

fn parse_cuda_options(s: &str) -> std::result::Result<Vec<(String, String)>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => {
                Ok((k.trim().to_string(), v.trim().to_string()))
            }
            _ => Err(format!("`{p}` is not key=value")),
        })
        .collect()
}

/// How cuDNN picks a convolution's algorithm (the CUDA provider's `cudnn_conv_algo_search`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvSearch {
    /// cuDNN's heuristic: no timing, the same choice every run (deterministic output across
    /// processes, nothing to search on the first run).
    #[default]
    Heuristic,
    /// Every algorithm timed on a shape's first run, the fastest kept (ONNX Runtime's default):
    /// a slow first run, and the choice can differ between processes.
    Exhaustive,
}

impl std::str::FromStr for ConvSearch {
    type Err = ParseError;
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        match s {
            "heuristic" => Ok(ConvSearch::Heuristic),
            "exhaustive" => Ok(ConvSearch::Exhaustive),
            _ => Err(ParseError(format!("`{s}`: expected heuristic or exhaustive"))),
        }
    }
}

impl std::fmt::Display for ConvSearch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ConvSearch::Heuristic => "heuristic",
            ConvSearch::Exhaustive => "exhaustive",
        })
    }
}

/// The precision the UNet computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// The bundle's own graphs: fp32 (CPU bundles) or fp16 (GPU bundles).
    #[default]
    Bundle,
    /// The GEMMs against the LoRA-targetable weights in fp8 (e4m3, per-tensor scales), the
    /// rest fp16: a GPU bundle's fp8 graphs, on `cuda:N` of compute capability 8.9+ (crate::fp8).
    Fp8,
}

impl std::str::FromStr for Precision {
    type Err = ParseError;
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        match s {
            "bundle" => Ok(Precision::Bundle),
            "fp8" => Ok(Precision::Fp8),
            _ => Err(ParseError(format!("`{s}`: expected bundle or fp8"))),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Bundle => "bundle",
            Precision::Fp8 => "fp8",
        })
    }
}

/// When a pipeline's shape buckets get their sessions (and, on a GPU, their CUDA graphs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BucketLoad {
    /// Every bucket opens and is captured before the pipeline is ready: no job pays for it.
    #[default]
    All,
    /// The first bucket opens and is captured at load; the others open on a background thread
    /// and each is captured on the model thread at the start of its first job (which pays the
    /// capture, about half a second at 1 MP; no job waits for another bucket's). A ready
    /// pipeline in a fraction of the time.
    FirstUse,
}

impl std::str::FromStr for BucketLoad {
    type Err = ParseError;
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        match s {
            "all" | "load" => Ok(BucketLoad::All),
            "first-use" => Ok(BucketLoad::FirstUse),
            _ => Err(ParseError(format!("`{s}`: expected all or first-use"))),
        }
    }
}

impl std::fmt::Display for BucketLoad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BucketLoad::All => "all",
            BucketLoad::FirstUse => "first-use",
        })
    }
}

/// What a request of a size that no shape bucket has gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OtherSizes {
    /// One more set of sessions with free shapes (no CUDA graphs) runs it: slower steps.
    #[default]
    Dynamic,
    /// The request is refused (a clear error naming the buckets); no dynamic sessions are made.
    Refuse,
}

impl std::str::FromStr for OtherSizes {
    type Err = ParseError;
    fn from_str(s: &str) -> std::result::Result<Self, ParseError> {
        match s {
            "dynamic" => Ok(OtherSizes::Dynamic),
            "refuse" => Ok(OtherSizes::Refuse),
            _ => Err(ParseError(format!("`{s}`: expected dynamic or refuse"))),
        }
    }
}

impl std::fmt::Display for OtherSizes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            OtherSizes::Dynamic => "dynamic",
            OtherSizes::Refuse => "refuse",
        })
    }
}

impl SessionOptions {
    /// The bucket of a request of `width`×`height` with a UNet batch of `unet_batch`, if any.
    pub fn bucket(&self, width: usize, height: usize, unet_batch: usize) -> Option<usize> {
        self.buckets
            .iter()
            .position(|b| (b.width, b.height, b.unet_batch) == (width, height, unet_batch))
    }

    /// Whether sessions with free shapes are made (no buckets, or other sizes run dynamically).
    pub fn dynamic(&self) -> bool {
        self.buckets.is_empty() || self.other_sizes == OtherSizes::Dynamic
    }

    /// The one fixed shape every session of a ControlNet can take: the only bucket when other
    /// sizes are refused (ControlNet weights live in their sessions: a session per bucket would
    /// copy them per bucket).
    pub fn only_shape(&self) -> Option<FixedShape> {
        match (&self.buckets[..], self.other_sizes) {
            ([b], OtherSizes::Refuse) => Some(*b),
            _ => None,
        }
    }
}

/// One image size and UNet batch for the denoising graphs. Their free dimensions (`batch`,
/// `height`, `mid_h`, `skip_3_w` …) are then fixed when the session is made, so ONNX Runtime
/// knows every shape at load time and folds the shape arithmetic into constants: no CPU-placed
/// `Shape`/`Gather`/`Concat` nodes and no host copies between the GPU kernels of a step. A
/// request of another size (or another guidance batch) is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedShape {
    pub width: usize,
    pub height: usize,
    /// 2 with classifier-free guidance on one GPU, 1 per GPU with split guidance (or without guidance).
    pub unet_batch: usize,
}

impl FixedShape {
    /// `WxH` (or one number for a square), as `--shapes` takes it.
    pub fn parse(s: &str, unet_batch: usize) -> std::result::Result<Self, ParseError> {
        let (w, h) = match s.split_once(['x', 'X']) {
            Some((w, h)) => (w, h),
            None => (s, s),
        };
        let num = |v: &str| {
            v.trim()
                .parse::<usize>()
                .map_err(|_| ParseError(format!("`{s}` is not a size: WIDTHxHEIGHT, e.g. 1024x1024")))
        };
        Ok(FixedShape {
            width: num(w)?,
            height: num(h)?,
            unet_batch,
        })
    }
}

/// Opens one graph of a bundle on the requested device.
pub fn session(path: &Path, opts: &SessionOptions) -> Result<Session> {
    session_with_dims(path, opts, &[])
}

/// [`session`] with named free dimensions fixed to sizes (ONNX Runtime's free-dimension
/// overrides; names the graph does not have are ignored by ONNX Runtime).
pub fn session_with_dims(path: &Path, opts: &SessionOptions, dims: &[(String, i64)]) -> Result<Session> {
    session_inner(path, opts, dims, false)
}

/// A UNet graph's session: [`session_with_dims`], with CUDA-graph capture enabled in the CUDA
/// provider when `graph` (ONNX Runtime then refuses a graph with nodes off the GPU).
pub fn unet_session(
    path: &Path,
    opts: &SessionOptions,
    dims: &[(String, i64)],
    graph: bool,
) -> Result<Session> {
    session_inner(path, opts, dims, graph)
}

fn session_inner(
    path: &Path,
    opts: &SessionOptions,
    dims: &[(String, i64)],
    cuda_graph: bool,
) -> Result<Session> {
    if !path.is_file() {
        return Err(Error::bundle(path, "graph file is missing"));
    }
    let t0 = std::time::Instant::now();
    let entry = opts
        .cache
        .as_deref()
        .and_then(|dir| cache::Entry::new(dir, path, opts, dims, cuda_graph));
    if let Some(e) = entry.as_ref().filter(|e| e.is_ready()) {
        match build(&e.graph(), opts, dims, cuda_graph, Optimise::Saved) {
            Ok(s) => {
                tracing::info!(graph = %path.display(), ms = t0.elapsed().as_millis() as u64, "session (optimized graph from the cache)");
                return Ok(s);
            }
            Err(err) => {
                // a saved graph this runtime cannot load again is dropped, the source graph used
                tracing::warn!(graph = %path.display(), error = %err, "the cached optimized graph did not load; this graph is not cached from now on");
                e.refuse();
                let s = build(path, opts, dims, cuda_graph, Optimise::Online)?;
                tracing::info!(graph = %path.display(), ms = t0.elapsed().as_millis() as u64, "session");
                return Ok(s);
            }
        }
    }
    let s = match entry.as_ref() {
        Some(e) => match build(path, opts, dims, cuda_graph, Optimise::SaveTo(e)) {
            Ok(s) => {
                e.commit();
                s
            }
            Err(err) => {
                e.remove();
                tracing::warn!(graph = %path.display(), error = %err, "saving the optimized graph failed; loading without the cache");
                build(path, opts, dims, cuda_graph, Optimise::Online)?
            }
        },
        None => build(path, opts, dims, cuda_graph, Optimise::Online)?,
    };
    tracing::info!(graph = %path.display(), ms = t0.elapsed().as_millis() as u64, "session");
    Ok(s)
}

/// Where a session's graph optimisations happen.
enum Optimise<'a> {
    /// ONNX Runtime optimises the graph as it loads (level 3).
    Online,
    /// As `Online`, and the optimized graph is written into a cache entry.
    SaveTo(&'a cache::Entry),
    /// The graph was optimized before (a cache entry): no optimisation now.
    Saved,
}

fn build(
    path: &Path,
    opts: &SessionOptions,
    dims: &[(String, i64)],
    cuda_graph: bool,
    optimise: Optimise<'_>,
) -> Result<Session> {
    let env = environment()?;
    let level = match optimise {
        Optimise::Saved => GraphOptimizationLevel::Disable,
        _ => GraphOptimizationLevel::Level3,
    };
    let mut b = Session::builder(env)?
        .with_optimization_level(level)
        .map_err(ort::Error::from)?;
    if let Optimise::SaveTo(e) = optimise {
        b = b
            .with_optimized_model_path(e.staging_graph())
            .map_err(ort::Error::from)?
            .with_config_entry(
                "session.optimized_model_external_initializers_file_name",
                e.staging_data_name(),
            )
            .map_err(ort::Error::from)?
            .with_config_entry(
                "session.optimized_model_external_initializers_min_size_in_bytes",
                "1024",
            )
            .map_err(ort::Error::from)?;
    }
    if opts.deterministic {
        b = b.with_deterministic_compute(true).map_err(ort::Error::from)?;
    }
    if opts.intra_threads > 0 {
        b = b
            .with_intra_threads(opts.intra_threads)
            .map_err(ort::Error::from)?;
    }
    // KATZ_ORT_PROFILE=PREFIX: ONNX Runtime writes a per-node profile PREFIX-<graph>_<time>.json
    if let Some(prefix) = std::env::var_os("KATZ_ORT_PROFILE") {
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let file = format!("{}-{stem}", prefix.to_string_lossy());
        b = b.with_profiling(file).map_err(ort::Error::from)?;
    }
    for (name, size) in dims {
        b = b.with_dimension_override(name, *size).map_err(ort::Error::from)?;
    }
    let search = match opts.conv_search {
        ConvSearch::Heuristic => ort::ep::cuda::ConvAlgorithmSearch::Heuristic,
        ConvSearch::Exhaustive => ort::ep::cuda::ConvAlgorithmSearch::Exhaustive,
    };
    let extra = if opts.device.is_gpu() {
        cuda_options().map_err(|message| Error::DeviceUnavailable {
            device: opts.device.to_string(),
            message,
        })?
    } else {
        &[]
    };
    let cuda = |id: i32, graph: bool| {
        use ort::ep::ArbitrarilyConfigurableExecutionProvider;
        let mut ep = ort::ep::CUDA::default()
            .with_device_id(id)
            .with_cuda_graph(graph)
            .with_tf32(!opts.exact_fp32)
            .with_conv_algorithm_search(search);
        for (k, v) in extra {
            ep = ep.with_arbitrary_config(k, v);
        }
        ep.build().error_on_failure()
    };
    let providers = match opts.device {
        Device::Cpu => vec![],
        Device::Cuda(id) => vec![cuda(id, cuda_graph)],
        Device::TensorRt(id) => vec![
            ort::ep::TensorRT::default()
                .with_device_id(id)
                .build()
                .error_on_failure(),
            cuda(id, false),
        ],
    };
    if opts.device.is_gpu() {
        // katz's own operators (crate::ops): GPU bundles' step graphs and fp8 graphs name them
        b = b
            .with_operators(crate::ops::domain()?)
            .map_err(ort::Error::from)?;
    }
    if !providers.is_empty() {
        b = b
            .with_execution_providers(providers)
            .map_err(|e| Error::DeviceUnavailable {
                device: opts.device.to_string(),
                message: e.to_string(),
            })?;
    }
    b.commit_from_file(path)
        .map_err(|e| Error::bundle(path, format!("ONNX Runtime cannot load it: {e}")))
}

#[cfg(test)]
mod tests {
    use super::parse_cuda_options;

    #[test]
    fn cuda_options_are_key_value_pairs() {
        assert_eq!(parse_cuda_options(""), Ok(vec![]));
        assert_eq!(
            parse_cuda_options(" prefer_nhwc=1, fuse_conv_bias = 1 ,"),
            Ok(vec![
                ("prefer_nhwc".into(), "1".into()),
                ("fuse_conv_bias".into(), "1".into())
            ])
        );
        let e = parse_cuda_options("prefer_nhwc").unwrap_err();
        assert!(e.contains("`prefer_nhwc` is not key=value"), "{e}");
        assert!(parse_cuda_options("=1").is_err());
    }
}
