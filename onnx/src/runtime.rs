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
    /// Fixed shapes for the UNet and ControlNet graphs (`--static-shapes`); None: any size.
    pub fixed: Option<FixedShape>,
    /// CUDA graphs for the UNet encoder and decoder (`--cuda-graph`; needs `fixed` and `cuda:N`):
    /// captured when the pipeline loads, replayed every step (crate::unet::graphed).
    pub cuda_graph: bool,
    /// CUDA: matrix products and convolutions in full fp32, not TF32 (ONNX Runtime's
    /// `use_tf32 = 0`). Parity checks against an fp32 reference set it: TF32 leaves ~1e-3 of
    /// relative error per step, and which algorithms cuDNN picks (by timing) changes it run to run.
    pub exact_fp32: bool,
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
    /// `WxH` (or one number for a square), as `--static-shapes` takes it.
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
/// provider when `opts.cuda_graph` (ONNX Runtime then refuses a graph with nodes off the GPU).
pub fn unet_session(path: &Path, opts: &SessionOptions, dims: &[(String, i64)]) -> Result<Session> {
    session_inner(path, opts, dims, opts.cuda_graph)
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
    let env = environment()?;
    let mut b = Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::Level3)
        .map_err(ort::Error::from)?;
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
    let providers = match opts.device {
        Device::Cpu => vec![],
        Device::Cuda(id) => vec![ort::ep::CUDA::default()
            .with_device_id(id)
            .with_cuda_graph(cuda_graph)
            .with_tf32(!opts.exact_fp32)
            .build()
            .error_on_failure()],
        Device::TensorRt(id) => vec![
            ort::ep::TensorRT::default()
                .with_device_id(id)
                .build()
                .error_on_failure(),
            ort::ep::CUDA::default()
                .with_device_id(id)
                .with_tf32(!opts.exact_fp32)
                .build()
                .error_on_failure(),
        ],
    };
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
