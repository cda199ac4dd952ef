//! One module per subcommand, plus the flags and helpers they share.

pub mod bench;
pub mod cancel;
pub mod controlnet_worker;
pub mod demo;
pub mod gateway;
pub mod generate;
pub mod lora_args;
pub mod report;
pub mod status;
pub mod submit;
pub mod trace;
pub mod trace_jobs;
pub mod worker;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use katz_actors::config::{GraphCache, SessionConfig, ShapeList, DEFAULT_AMQP_URL, DEFAULT_REDIS_URL};
use katz_actors::redact;
use katz_onnx::pipeline::{Generated, Observer};
use katz_onnx::runtime::{ConvSearch, Device, Precision, SessionOptions};
use katz_onnx::tensor::Tensor;

/// RabbitMQ.
#[derive(Args, Debug, Clone)]
pub struct AmqpArgs {
    /// AMQP URI of RabbitMQ.
    #[arg(long, env = "KATZ_AMQP", default_value = DEFAULT_AMQP_URL)]
    pub amqp: String,
}

/// Redis.
#[derive(Args, Debug, Clone)]
pub struct RedisArgs {
    /// Redis URL.
    #[arg(long, env = "KATZ_REDIS", default_value = DEFAULT_REDIS_URL)]
    pub redis: String,
}

impl RedisArgs {
    pub async fn connect(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.redis.as_str())
            .with_context(|| format!("redis URL {}", redact::url(&self.redis)))?;
        client
            .get_multiplexed_async_connection()
            .await
            .with_context(|| format!("connecting to Redis at {}", redact::url(&self.redis)))
    }
}

/// A small tokio runtime for the client commands.
pub fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?
        .block_on(f)
}

/// Where models run.
#[derive(Args, Debug, Clone)]
pub struct DeviceArgs {
    /// Threads per ONNX Runtime operator (0: all cores).
    #[arg(long, env = "KATZ_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// cpu, cuda:N or tensorrt:N; a GPU that cannot be used is an error, never a CPU fall-back.
    #[arg(long, env = "KATZ_DEVICE", default_value = "cpu")]
    pub device: Device,
    #[command(flatten)]
    pub runtime: RuntimeArgs,
}

/// How ONNX Runtime's sessions compute and where their optimized graphs are kept (every command
/// that runs a pipeline; the defaults are `katz_actors::config::SessionConfig`'s).
#[derive(Args, Debug, Clone, Default)]
pub struct RuntimeArgs {
    /// cuDNN's convolution algorithms: heuristic (the same every run) or exhaustive (timed on a
    /// shape's first run) [default: heuristic]
    #[arg(long, env = "KATZ_CONV_SEARCH")]
    pub conv_search: Option<ConvSearch>,
    /// Byte-identical output for the same job: ONNX Runtime's deterministic compute and, in an
    /// fp16 GPU bundle, its graphs without the fused GroupNorm (slower) [default: true, except
    /// for fp16 GPU bundles]
    #[arg(long, env = "KATZ_DETERMINISTIC", num_args = 0..=1, default_missing_value = "true")]
    pub deterministic: Option<bool>,
    /// The UNet's precision: bundle (its own graphs) or fp8 (its GEMMs in fp8 on cuda:N of
    /// compute capability 8.9+: a GPU bundle with fp8 graphs) [default: bundle]
    #[arg(long, env = "KATZ_PRECISION")]
    pub precision: Option<Precision>,
    /// Where optimized graphs are kept between runs: a directory, `none` or `auto` [default:
    /// auto: on a GPU, $KATZ_CACHE_DIR, else $XDG_CACHE_HOME/katz/graphs or ~/.cache/katz/graphs]
    #[arg(long, env = "KATZ_GRAPH_CACHE")]
    pub graph_cache: Option<GraphCache>,
}

impl RuntimeArgs {
    /// Overlays the flags given onto `s`.
    pub fn apply(&self, s: &mut SessionConfig) {
        if let Some(c) = self.conv_search {
            s.conv_search = c;
        }
        if self.deterministic.is_some() {
            s.deterministic = self.deterministic;
        }
        if let Some(p) = self.precision {
            s.precision = p;
        }
        if let Some(g) = &self.graph_cache {
            s.graph_cache = g.clone();
        }
    }
}

impl DeviceArgs {
    /// The worker's session defaults (one place: `katz_actors::config::SessionConfig`) for this
    /// device, without shape buckets or CUDA graphs (the command sets those).
    pub fn session_options(&self) -> SessionOptions {
        self.session_options_for(None)
    }

    /// [`DeviceArgs::session_options`] for a pipeline of `bundle` (whose kind sets the defaults
    /// that depend on it: deterministic graphs).
    pub fn session_options_for(&self, bundle: Option<&std::path::Path>) -> SessionOptions {
        let mut cfg = SessionConfig {
            device: self.device,
            threads: self.threads,
            shapes: ShapeList::Sizes(Vec::new()),
            cuda_graph: Some(false),
            ..SessionConfig::default()
        };
        self.runtime.apply(&mut cfg);
        cfg.options(&katz_onnx::placement::Placement::on(self.device), bundle)
    }
}

/// What stops `katz worker` and `katz controlnet-worker`: resolves on the first SIGTERM or SIGINT
/// (handlers installed when first polled, inside the worker's runtime). Where the handlers cannot
/// be installed it resolves at once: the worker stops rather than run unstoppable by signals.
pub async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut term), Ok(mut int)) => tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        },
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "cannot install the SIGTERM/SIGINT handlers; stopping")
        }
    }
}

/// The repository's `bundles/` directory: `$KATZ_BUNDLES`, else the first `bundles/` with the
/// tiny base bundle above the executable or the working directory.
pub fn bundles_dir() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("KATZ_BUNDLES") {
        return Ok(PathBuf::from(p));
    }
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    for r in roots {
        let b = r.join("bundles");
        if b.join("tiny-sdxl").join("bundle.json").is_file() {
            return Ok(b);
        }
    }
    bail!("cannot find the bundled tiny models (bundles/tiny-sdxl); run from the repository or set KATZ_BUNDLES")
}

/// A progress bar on the terminal (hidden when stderr is not one).
pub struct Progress(ProgressBar);

impl Progress {
    pub fn new(steps: usize) -> Self {
        let bar = ProgressBar::new(steps as u64);
        // a template that does not parse keeps the default style
        if let Ok(style) = ProgressStyle::with_template(
            "{msg:>10} [{bar:32}] {pos}/{len} steps  {elapsed_precise}  {per_sec}",
        ) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message("denoising");
        Progress(bar)
    }

    pub fn finish(&self) {
        self.0.finish_and_clear();
    }

    pub fn set(&self, steps_done: usize) {
        self.0.set_position(steps_done as u64);
    }
}

impl Observer for Progress {
    fn on_step(&mut self, step: usize, _total: usize, _latents: &Tensor) -> katz_onnx::Result<()> {
        self.0.set_position(step as u64 + 1);
        Ok(())
    }
}

fn ms(d: Duration) -> String {
    format!("{:>10.1} ms", d.as_secs_f64() * 1e3)
}

/// Writes the PNG and prints the per-stage timings.
pub fn finish(out: &Generated, path: &Path) -> anyhow::Result<()> {
    let png = katz_onnx::image::encode_png(&out.image)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, &png).with_context(|| format!("writing {}", path.display()))?;
    println!("timings ({} steps):", out.timings.steps);
    for (stage, d) in out.timings.rows() {
        println!("  {stage:<22}{}", ms(d));
    }
    if let Some(k) = out.timings.lora_switch_step {
        println!("  LoRA weights from step {k}");
    }
    let (h, w) = (out.image.shape[2], out.image.shape[3]);
    println!("wrote {} ({w}×{h} PNG, {} bytes)", path.display(), png.len());
    Ok(())
}

/// The GPUs nvidia-smi lists, as `N× NAME` (or their names joined), None where there is none.
pub fn gpu_names() -> Option<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()?;
    let s = String::from_utf8(out.stdout).ok()?;
    let names: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    match names.first() {
        None => None,
        Some(first) if names.iter().all(|n| n == first) => Some(format!("{}× {first}", names.len())),
        Some(_) => Some(names.join(", ")),
    }
}

/// Writes `v` as pretty JSON (creating the directory) and says so.
pub fn write_json(path: &Path, v: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    std::fs::write(path, serde_json::to_string_pretty(v)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {}", path.display());
    Ok(())
}

/// `--id-prefix`: job ids are PREFIX-<index>, so the prefix must keep them valid job ids
/// (docs/protocol.md: 1-128 characters of `[A-Za-z0-9_.-]`).
pub fn id_prefix(s: &str) -> Result<String, String> {
    if katz_actors::protocol::valid_id(&format!("{s}-1000000")) {
        Ok(s.to_string())
    } else {
        Err(format!(
            "job ids are PREFIX-<index>: the prefix must be at most 120 characters of [A-Za-z0-9_.-], got {s:?}"
        ))
    }
}

#[cfg(test)]
mod id_prefix_tests {
    #[test]
    fn an_id_prefix_must_keep_job_ids_valid() {
        assert_eq!(super::id_prefix("bench-1").unwrap(), "bench-1");
        assert!(super::id_prefix("a:b").unwrap_err().contains("[A-Za-z0-9_.-]"));
        assert!(super::id_prefix(&"x".repeat(121)).is_err());
    }
}
