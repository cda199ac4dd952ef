//! The worker's configuration: one struct, written as TOML (`katz worker --config FILE`, see
//! `compose/worker.toml`), overlaid by flags and `KATZ_*` environment (`src/cmd/worker.rs`), and
//! taken by [`crate::worker::run`]. Every default is written once, in the `Default` impls here
//! (or, where another module owns the value, read from that module's constructor).
//!
//! ```text
//! TOML ─serde─▶ WorkerConfig ◀─overlay─ flags / KATZ_* env
//!                  │ locate_bundles(dir): unset bundle paths → the committed tiny bundles
//!                  ▼ models(): the checks (placement, transport), then
//!               pipeline::Models { base, controlnets, lora, session, placement, remote }
//! ```
//!
//! The TOML keys are flat (`lora_mode = "sync"`, `controlnet_devices = […]`); the sections below
//! are flattened into the top level and unknown keys are refused. The session section (device,
//! shape buckets, CUDA graphs, determinism, graph cache) is `session.rs`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use katz_onnx::error::ParseError;
use katz_onnx::pipeline::{LoraBound, LoraMode};
use katz_onnx::placement::Placement;
use katz_onnx::runtime::{BucketLoad, Device, SessionOptions};
use serde::Deserialize;
use serde_with::{serde_as, DisplayFromStr};

use crate::controlnet::wire::Residuals;
use crate::controlnet::{LocalMode, RemoteConfig, RemoteModel};
use crate::lora::{LoraConfig, Policy};
use crate::pipeline::Models;

/// How many times a job may be started by default (see [`WorkerConfig::max_attempts`]).
pub const DEFAULT_MAX_ATTEMPTS: u64 = 5;
use crate::protocol::Limits;

mod session;
pub use session::*;

/// RabbitMQ on this host, as the `guest` user (which RabbitMQ admits from localhost only).
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
/// Redis on this host.
pub const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379/";

/// A configuration that cannot be served (the message names the option and what it needs).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("parsing {path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{0}")]
    Invalid(String),
}

/// One `katz worker`: what it serves, where it connects, how it runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// AMQP URI of RabbitMQ (jobs, and remote ControlNet sessions).
    pub amqp: String,
    /// Redis URL (job records and images, remote ControlNet sessions).
    pub redis: String,
    /// Base-model bundle [default: `tiny-sdxl` in the bundles directory].
    pub bundle: Option<PathBuf>,
    /// LoRA store: a job's LoRA NAME is `NAME.safetensors` here [default: `loras` in the bundles
    /// directory].
    pub lora_dir: Option<PathBuf>,
    /// Queue to consume [default: `katz.jobs.<base model name>`].
    pub queue: Option<String>,
    /// Jobs run at once (pipeline threads sharing one copy of the weights).
    pub concurrency: usize,
    /// Jobs taken beyond those running (AMQP prefetch = concurrency + lookahead); they wait with
    /// their LoRAs prefetching and go back to the queue on shutdown.
    pub lookahead: usize,
    /// Serve Prometheus metrics on this address (e.g. `127.0.0.1:9187`) [default: none].
    pub metrics_addr: Option<SocketAddr>,
    /// Name written into each job's status [default: `<hostname>-<pid>`].
    pub name: Option<String>,
    /// Largest message accepted; larger ones are dead-lettered.
    pub max_message_bytes: usize,
    /// Largest width or height accepted.
    pub max_side: u32,
    /// Times a job may be started (each start after the first is a requeue: Redis away, a worker
    /// that died mid-job) before it is failed with `attempts`, so a job that keeps failing cannot
    /// hold a worker's slot for ever.
    pub max_attempts: u64,
    /// How long a finished job's result store is retried while Redis is away before the job goes
    /// back to the queue (not a TOML key).
    #[serde(skip)]
    pub store_retry: Duration,
    /// Publish a preview of the running job after every this many steps (a PNG at latent
    /// resolution in `katz:job:<id>:preview`, `preview_step` in its record and event; not after
    /// the last step); 0: no previews.
    pub preview_every: u32,
    /// Where and how the ONNX Runtime sessions run.
    #[serde(flatten)]
    pub session: SessionConfig,
    /// The ControlNets: hosted here, or served by `katz controlnet-worker`s.
    #[serde(flatten)]
    pub controlnet: ControlNetConfig,
    /// The LoRA switching policy and caches.
    #[serde(flatten)]
    pub lora: LoraSection,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        let limits = Limits::default();
        WorkerConfig {
            amqp: DEFAULT_AMQP_URL.into(),
            redis: DEFAULT_REDIS_URL.into(),
            bundle: None,
            lora_dir: None,
            queue: None,
            concurrency: 1,
            lookahead: 1,
            metrics_addr: None,
            name: None,
            max_message_bytes: limits.max_message_bytes,
            max_side: limits.max_side,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            store_retry: Duration::from_secs(120),
            preview_every: 0,
            session: SessionConfig::default(),
            controlnet: ControlNetConfig::default(),
            lora: LoraSection::default(),
        }
    }
}

/// How remote ControlNet sessions move their tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Through Redis (any host).
    #[default]
    Redis,
    /// CUDA IPC: a GPU worker and ControlNet workers on GPUs of this host; handles travel through
    /// Redis, tensors stay on the GPUs.
    CudaIpc,
}

impl std::str::FromStr for Transport {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "redis" => Ok(Transport::Redis),
            "cuda-ipc" => Ok(Transport::CudaIpc),
            t => Err(ParseError(format!(
                "--controlnet-transport must be redis or cuda-ipc, got `{t}`"
            ))),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Redis => "redis",
            Transport::CudaIpc => "cuda-ipc",
        })
    }
}

/// The ControlNets a worker serves: bundles hosted in this process, and models served by
/// `katz controlnet-worker`s (sessions over RabbitMQ `katz.controlnet.<model>` and Redis).
#[serde_as]
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ControlNetConfig {
    /// ControlNet bundles hosted in this process; an empty list (`--controlnet none`) hosts none
    /// [default: `tiny-sdxl-controlnet` in the bundles directory; none when
    /// `controlnet_services` are given].
    pub controlnets: Option<Vec<PathBuf>>,
    /// ControlNet models served by `katz controlnet-worker`s: `MODEL`, or `MODEL@QUEUE`; their
    /// sessions overlap the UNet.
    #[serde_as(as = "Vec<DisplayFromStr>")]
    pub controlnet_services: Vec<RemoteModel>,
    /// How hosted ControlNets run: `serial`, or `parallel` (a thread each, overlapping the UNet)
    /// [default: parallel; serial when they share the base's GPU, where threads only contend].
    #[serde_as(as = "Option<DisplayFromStr>")]
    pub controlnet_mode: Option<LocalMode>,
    /// GPUs for the hosted ControlNets (`cuda:1`, `cuda:2`): ControlNet j on entry j mod len
    /// [default: the base's device].
    #[serde_as(as = "Vec<DisplayFromStr>")]
    pub controlnet_devices: Vec<Device>,
    /// Latent parallelism: the conditional guidance half on this second GPU (e.g. `cuda:1`).
    #[serde_as(as = "Option<DisplayFromStr>")]
    pub split_guidance: Option<Device>,
    /// Longest wait for one step of a remote ControlNet before its session moves to another
    /// worker, in ms.
    pub controlnet_step_timeout_ms: u64,
    /// Remote ControlNet sessions opened again after a timeout before the job fails.
    pub controlnet_retries: u32,
    /// How remote ControlNet sessions move tensors: `redis` (any host), or `cuda-ipc` (a GPU
    /// worker and ControlNet workers on GPUs of this host; tensors stay on the GPUs).
    #[serde_as(as = "DisplayFromStr")]
    pub controlnet_transport: Transport,
    /// The precision remote ControlNets send residuals in: `auto` (fp16 where the ControlNet
    /// computes in fp16, which is exact; f32 otherwise), `f16` (always: half the transport), `f32`.
    #[serde_as(as = "DisplayFromStr")]
    pub controlnet_residuals: Residuals,
}

impl Default for ControlNetConfig {
    fn default() -> Self {
        // the remote session defaults are RemoteConfig's
        let remote = RemoteConfig::new(String::new(), String::new());
        ControlNetConfig {
            controlnets: None,
            controlnet_services: Vec::new(),
            controlnet_mode: None,
            controlnet_devices: Vec::new(),
            split_guidance: None,
            controlnet_step_timeout_ms: remote.step_timeout.as_millis() as u64,
            controlnet_retries: remote.retries,
            controlnet_transport: Transport::default(),
            controlnet_residuals: remote.residuals,
        }
    }
}

/// When an asynchronous LoRA merge's weights come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraSwitch {
    /// Exactly at the bound step (same job, same image, whatever the load).
    #[default]
    Bound,
    /// At the first step boundary where the merge is done.
    Ready,
}

impl std::str::FromStr for LoraSwitch {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        match s {
            "bound" => Ok(LoraSwitch::Bound),
            "ready" => Ok(LoraSwitch::Ready),
            o => Err(ParseError(format!(
                "lora_switch must be `bound` or `ready`, got `{o}`"
            ))),
        }
    }
}

/// The LoRA policy and caches (docs/lora.md); the store directory is `WorkerConfig::lora_dir`.
#[serde_as]
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraSection {
    /// `sync`: merge a job's LoRAs before its first step; `async`: start denoising at once and
    /// switch the merged weights in by the bound step.
    #[serde_as(as = "DisplayFromStr")]
    pub lora_mode: LoraMode,
    /// Async: the step by which the LoRAs must be in: steps (`10`), a fraction (`0.2`) or a
    /// percentage (`20%`) of the job's steps; a job waits there if its merge is late.
    #[serde_as(as = "DisplayFromStr")]
    pub lora_bound: LoraBound,
    /// Async: `bound` switches exactly at the bound step; `ready` at the first step boundary
    /// where the merge is done.
    pub lora_switch: LoraSwitch,
    /// Byte budget of the host-memory LoRA cache, in MiB.
    pub lora_cache_mb: u64,
    /// A host LoRA cache of this many adapters instead of a byte budget (as the Katz paper's
    /// cache figures count, and `katz trace cache` replays).
    pub lora_cache_entries: Option<usize>,
    /// Byte budget of the device (GPU) cache of LoRA factors, in MiB.
    pub lora_device_cache_mb: u64,
    /// Eviction policy of the LoRA caches: `lru` or `lfu`.
    pub lora_cache_policy: Policy,
    /// LoRA fetches pending at once; when full, the worker admits no new job.
    pub lora_max_pending: usize,
    /// A Redis that holds adapters as `katz:lora:<name>` (tried after the store directory).
    pub lora_redis: Option<String>,
    /// Added to every LoRA fetch, in ms: simulates a slow store.
    pub lora_fetch_delay_ms: u64,
    /// Longest a job waits at its bound step for its LoRAs, in seconds.
    pub lora_timeout_s: u64,
}

impl Default for LoraSection {
    fn default() -> Self {
        // the LoRA defaults are LoraConfig's
        let c = LoraConfig::new(PathBuf::new());
        LoraSection {
            lora_mode: c.mode,
            lora_bound: c.bound,
            lora_switch: if c.switch_early {
                LoraSwitch::Ready
            } else {
                LoraSwitch::Bound
            },
            lora_cache_mb: c.host_cache_bytes >> 20,
            lora_cache_entries: c.host_cache_entries,
            lora_device_cache_mb: c.device_cache_bytes >> 20,
            lora_cache_policy: c.policy,
            lora_max_pending: c.max_pending_loads,
            lora_redis: c.redis,
            lora_fetch_delay_ms: c.fetch_delay.as_millis() as u64,
            lora_timeout_s: c.timeout.as_secs(),
        }
    }
}

impl LoraSection {
    /// The LoRA manager's configuration for a store directory.
    pub fn config(&self, dir: PathBuf) -> Result<LoraConfig, ConfigError> {
        if self.lora_cache_entries == Some(0) {
            return Err(ConfigError::Invalid(
                "lora_cache_entries must be at least 1".into(),
            ));
        }
        if self.lora_max_pending == 0 {
            return Err(ConfigError::Invalid("lora_max_pending must be at least 1".into()));
        }
        Ok(LoraConfig {
            mode: self.lora_mode,
            bound: self.lora_bound,
            switch_early: self.lora_switch == LoraSwitch::Ready,
            host_cache_bytes: self.lora_cache_mb << 20,
            host_cache_entries: self.lora_cache_entries,
            device_cache_bytes: self.lora_device_cache_mb << 20,
            policy: self.lora_cache_policy,
            max_pending_loads: self.lora_max_pending,
            redis: self.lora_redis.clone(),
            fetch_delay: Duration::from_millis(self.lora_fetch_delay_ms),
            timeout: Duration::from_secs(self.lora_timeout_s),
            ..LoraConfig::new(dir)
        })
    }
}

impl WorkerConfig {
    /// A TOML file of these options (unknown keys are refused).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            source: Box::new(e),
        })
    }

    /// Whether a bundle path is unset (and [`Self::locate_bundles`] would fill it).
    pub fn needs_bundles(&self) -> bool {
        self.bundle.is_none() || self.lora_dir.is_none() || self.controlnet.controlnets.is_none()
    }

    /// Unset bundle paths from a bundles directory (the repository's `bundles/`): the tiny base,
    /// its ControlNet (none when ControlNets are served elsewhere) and the LoRA store.
    pub fn locate_bundles(&mut self, dir: &Path) {
        self.bundle.get_or_insert_with(|| dir.join("tiny-sdxl"));
        self.lora_dir.get_or_insert_with(|| dir.join("loras"));
        let remote = !self.controlnet.controlnet_services.is_empty();
        self.controlnet.controlnets.get_or_insert_with(|| match remote {
            true => Vec::new(),
            false => vec![dir.join("tiny-sdxl-controlnet")],
        });
    }

    /// The request limits (the other limits keep their defaults).
    pub fn limits(&self) -> Limits {
        Limits {
            max_message_bytes: self.max_message_bytes,
            max_side: self.max_side,
            ..Limits::default()
        }
    }

    /// The name written into job records: `name`, else `<hostname>-<pid>`.
    pub fn worker_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "worker".into());
            format!("{host}-{}", std::process::id())
        })
    }

    /// The models this worker serves, after the checks that need the whole configuration.
    pub fn models(&self) -> Result<Models, ConfigError> {
        let device = self.session.device;
        let cn = &self.controlnet;
        let mut remote = RemoteConfig::new(self.amqp.clone(), self.redis.clone());
        remote.step_timeout = Duration::from_millis(cn.controlnet_step_timeout_ms);
        remote.retries = cn.controlnet_retries;
        remote.residuals = cn.controlnet_residuals;
        remote.ipc = match cn.controlnet_transport {
            Transport::Redis => false,
            Transport::CudaIpc if device.is_gpu() => true,
            Transport::CudaIpc => {
                return Err(ConfigError::Invalid(format!(
                    "--controlnet-transport cuda-ipc needs the worker on a GPU (--device cuda:N), got --device {device}"
                )))
            }
        };
        let placement = self.placement()?;
        let controlnet_devices = &self.controlnet.controlnet_devices;
        // threads overlapping the UNet only pay where the ControlNets have processors of their own
        let shares_gpu =
            device.is_gpu() && (controlnet_devices.is_empty() || controlnet_devices.contains(&device));
        let controlnet_mode = match cn.controlnet_mode {
            Some(m) => m,
            None if shares_gpu => LocalMode::Serial,
            None => LocalMode::default(),
        };
        let unset = |what: &str| ConfigError::Invalid(format!("no {what} configured"));
        let lora_dir = self
            .lora_dir
            .clone()
            .ok_or_else(|| unset("LoRA store (lora_dir)"))?;
        Ok(Models {
            base: self.bundle.clone().ok_or_else(|| unset("base bundle (bundle)"))?,
            controlnets: cn.controlnets.clone().unwrap_or_default(),
            lora: self.lora.config(lora_dir)?,
            session: SessionOptions {
                bucket_load: self.bucket_load()?,
                ..self.session.options(&placement, self.bundle.as_deref())
            },
            warm_up: self.session.warm_up(),
            preview_every: self.preview_every,
            controlnet_mode,
            controlnet_services: cn.controlnet_services.clone(),
            remote: Some(remote),
            placement,
        })
    }

    /// When the buckets open: `first-use` needs one model thread when CUDA graphs are captured
    /// (a capture after load stops every other GPU user of the process, and the other model
    /// threads' jobs do not wait for it).
    fn bucket_load(&self) -> Result<BucketLoad, ConfigError> {
        match self.session.bucket_load {
            None if self.concurrency <= 1 => Ok(BucketLoad::FirstUse),
            None => Ok(BucketLoad::All),
            Some(BucketLoad::FirstUse) if self.concurrency > 1 && self.session.device.is_gpu() => {
                Err(ConfigError::Invalid(format!(
                    "bucket_load = \"first-use\" needs concurrency = 1 on a GPU (got {}): use \"all\"",
                    self.concurrency
                )))
            }
            Some(b) => Ok(b),
        }
    }

    /// Where the base, the guidance halves and the hosted ControlNets run, checked against the
    /// base's device.
    fn placement(&self) -> Result<Placement, ConfigError> {
        let device = self.session.device;
        let cn = &self.controlnet;
        if let Some(d) = cn.split_guidance {
            if !device.is_gpu() || !d.is_gpu() || d == device {
                return Err(ConfigError::Invalid(format!(
                    "--split-guidance {d} needs the worker on one GPU (--device cuda:N) and this on another, got --device {device}"
                )));
            }
        }
        if cn
            .controlnet_devices
            .iter()
            .any(|d| d.is_gpu() != device.is_gpu())
        {
            return Err(ConfigError::Invalid(format!(
                "--controlnet-device {:?}: ControlNets go to GPUs when the base runs on one (--device {device}), and stay on the CPU otherwise",
                cn.controlnet_devices.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            )));
        }
        let p = Placement::with_devices(device, cn.split_guidance, &cn.controlnet_devices);
        p.check().map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use katz_onnx::placement::ControlNetPlace;
    use katz_onnx::runtime::{ConvSearch, OtherSizes};

    fn parse(s: &str) -> Result<WorkerConfig, toml::de::Error> {
        toml::from_str(s)
    }

    #[test]
    fn the_example_file_parses() {
        let c = parse(include_str!("../../compose/worker.toml")).unwrap();
        assert_eq!(c.amqp, DEFAULT_AMQP_URL);
        assert_eq!(c.bundle.as_deref(), Some(Path::new("bundles/tiny-sdxl")));
        assert_eq!(
            c.controlnet.controlnets,
            Some(vec![PathBuf::from("bundles/tiny-sdxl-controlnet")])
        );
        assert_eq!(c.metrics_addr, Some("127.0.0.1:9187".parse().unwrap()));
        assert_eq!(c.max_side, 2048);
    }

    #[test]
    fn every_key_of_every_section_is_read() {
        let c = parse(
            r#"
            amqp = "amqp://a"
            redis = "redis://r"
            queue = "q"
            concurrency = 3
            lookahead = 0
            name = "n"
            max_message_bytes = 100
            max_side = 64
            max_attempts = 2
            device = "cuda:1"
            threads = 2
            shapes = "64x32, 96x64"
            other_sizes = "refuse"
            cuda_graph = true
            exact_fp32 = true
            conv_search = "exhaustive"
            deterministic = false
            graph_cache = "/tmp/graphs"
            warm_up = false
            controlnets = []
            controlnet_services = ["m", "n@q"]
            controlnet_mode = "serial"
            controlnet_devices = ["cuda:2"]
            split_guidance = "cuda:3"
            controlnet_step_timeout_ms = 5
            controlnet_retries = 7
            controlnet_transport = "cuda-ipc"
            controlnet_residuals = "f16"
            lora_mode = "sync"
            lora_bound = "4"
            lora_switch = "ready"
            lora_cache_mb = 8
            lora_cache_entries = 3
            lora_device_cache_mb = 16
            lora_cache_policy = "lfu"
            lora_max_pending = 2
            lora_redis = "redis://l"
            lora_fetch_delay_ms = 9
            lora_timeout_s = 11
            "#,
        )
        .unwrap();
        assert_eq!((c.concurrency, c.lookahead, c.max_side), (3, 0, 64));
        assert_eq!(c.max_attempts, 2);
        assert_eq!(c.session.device, Device::Cuda(1));
        assert_eq!(c.session.shapes.to_string(), "64x32,96x64");
        assert_eq!(c.controlnet.controlnets, Some(vec![]));
        assert_eq!(c.controlnet.controlnet_services[1].queue, "q");
        assert_eq!(c.controlnet.controlnet_transport, Transport::CudaIpc);
        assert_eq!(c.controlnet.controlnet_residuals, Residuals::F16);
        assert_eq!(c.lora.lora_switch, LoraSwitch::Ready);
        let mut c = c;
        c.locate_bundles(Path::new("/b"));
        // an explicit empty list stays empty: no hosted ControlNets
        assert_eq!(c.controlnet.controlnets, Some(vec![]));
        let m = c.models().unwrap();
        assert_eq!(m.base, Path::new("/b/tiny-sdxl"));
        assert!(m.controlnets.is_empty());
        assert_eq!(m.controlnet_mode, LocalMode::Serial);
        assert_eq!(
            m.placement.controlnets,
            vec![ControlNetPlace::One(Device::Cuda(2))]
        );
        assert_eq!(m.placement.cond_half, Some(Device::Cuda(3)));
        let b = &m.session.buckets;
        assert_eq!((b[1].width, b[1].height, b[1].unet_batch), (96, 64, 1));
        assert!(m.session.cuda_graph && m.session.exact_fp32 && !m.session.deterministic);
        assert_eq!(m.session.other_sizes, OtherSizes::Refuse);
        assert_eq!(m.session.conv_search, ConvSearch::Exhaustive);
        assert_eq!(m.session.cache.as_deref(), Some(Path::new("/tmp/graphs")));
        assert!(!m.warm_up);
        let r = m.remote.unwrap();
        assert_eq!(
            (r.step_timeout, r.retries, r.ipc),
            (Duration::from_millis(5), 7, true)
        );
        assert_eq!(m.lora.max_pending_loads, 2);
        assert_eq!(m.lora.host_cache_entries, Some(3));
        assert_eq!(m.lora.fetch_delay, Duration::from_millis(9));
        assert!(m.lora.switch_early);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let e = parse("amqpp = \"x\"").unwrap_err().to_string();
        assert!(e.contains("amqpp"), "{e}");
        assert!(parse("controlnet_mode = \"sideways\"").is_err());
        assert!(parse("device = \"gpu\"").is_err());
        assert!(parse("shapes = \"wide\"").is_err());
        assert!(parse("other_sizes = \"maybe\"").is_err());
        let e = parse("controlnet_transport = \"carrier-pigeon\"")
            .unwrap_err()
            .to_string();
        assert!(e.contains("must be redis or cuda-ipc"), "{e}");
    }

    #[test]
    fn defaults_serve_the_tiny_bundles_on_the_cpu() {
        let mut c = WorkerConfig::default();
        assert!(c.needs_bundles());
        c.locate_bundles(Path::new("/b"));
        assert!(!c.needs_bundles());
        let m = c.models().unwrap();
        assert_eq!(m.controlnets, vec![PathBuf::from("/b/tiny-sdxl-controlnet")]);
        assert_eq!(m.lora.dir, Path::new("/b/loras"));
        assert_eq!(m.controlnet_mode, LocalMode::Parallel);
        assert!(m.session.buckets.is_empty() && !m.session.cuda_graph && m.session.cache.is_none());
        assert!(!m.warm_up && m.session.deterministic);
        let want = LoraConfig::new(PathBuf::from("/b/loras"));
        assert_eq!(
            (m.lora.host_cache_bytes, m.lora.device_cache_bytes, m.lora.timeout),
            (want.host_cache_bytes, want.device_cache_bytes, want.timeout)
        );
        assert_eq!(c.limits().max_message_bytes, Limits::default().max_message_bytes);
        // ControlNets served elsewhere: none hosted by default
        let mut c = WorkerConfig::default();
        c.controlnet.controlnet_services = vec!["m".parse().unwrap()];
        c.locate_bundles(Path::new("/b"));
        assert!(c.models().unwrap().controlnets.is_empty());
    }

    #[test]
    fn placement_and_transport_are_checked_against_the_device() {
        let mut c = WorkerConfig::default();
        c.locate_bundles(Path::new("/b"));
        let err = |c: &WorkerConfig| c.models().unwrap_err().to_string();
        let mut s = c.clone();
        s.controlnet.split_guidance = Some(Device::Cuda(1));
        assert!(err(&s).contains("needs the worker on one GPU"));
        let mut s = c.clone();
        s.controlnet.controlnet_devices = vec![Device::Cuda(1)];
        assert!(err(&s).contains("ControlNets go to GPUs when the base runs on one"));
        let mut s = c.clone();
        s.controlnet.controlnet_transport = Transport::CudaIpc;
        assert!(err(&s).contains("cuda-ipc needs the worker on a GPU"));
        // hosted ControlNets on the base's GPU run serially by default
        let mut s = c;
        s.session.device = Device::Cuda(0);
        assert_eq!(s.models().unwrap().controlnet_mode, LocalMode::Serial);
    }

    #[test]
    fn shape_buckets_default_by_device_and_bundle() {
        let bundles = Path::new(env!("CARGO_MANIFEST_DIR")).join("../bundles");
        let mut c = WorkerConfig::default();
        c.locate_bundles(&bundles);
        c.session.device = Device::Cuda(0);
        let m = c.models().unwrap();
        // the tiny bundle's default size is its one bucket, captured, warmed up, cached
        let tiny = katz_onnx::bundle::BaseBundle::open(bundles.join("tiny-sdxl")).unwrap();
        let [w, h] = tiny.manifest.default_size;
        let b = &m.session.buckets;
        assert_eq!((b.len(), b[0].width, b[0].height, b[0].unet_batch), (1, w, h, 2));
        assert!(m.session.cuda_graph && m.warm_up);
        assert_eq!(m.session.cache, default_graph_cache());
        // one model thread: buckets after the first open on their first use; several: all at
        // load, and first-use is refused on a GPU
        assert_eq!(m.session.bucket_load, BucketLoad::FirstUse);
        let mut several = c.clone();
        several.concurrency = 2;
        assert_eq!(several.models().unwrap().session.bucket_load, BucketLoad::All);
        several.session.bucket_load = Some(BucketLoad::FirstUse);
        let e = several.models().unwrap_err().to_string();
        assert!(e.contains("needs concurrency = 1"), "{e}");
        assert_eq!(
            parse("bucket_load = \"all\"").unwrap().session.bucket_load,
            Some(BucketLoad::All)
        );
        assert!(parse("bucket_load = \"later\"").is_err());
        assert_eq!(m.session.other_sizes, OtherSizes::Dynamic);
        // `sdxl` names the nine usual sizes; lists drop repeats
        assert_eq!(
            "sdxl"
                .parse::<ShapeList>()
                .unwrap()
                .to_string()
                .split(',')
                .count(),
            9
        );
        assert_eq!(
            "1024x1024,1024, 768x1344"
                .parse::<ShapeList>()
                .unwrap()
                .to_string(),
            "1024x1024,768x1344"
        );
        assert_eq!("none".parse::<ShapeList>().unwrap(), ShapeList::Sizes(vec![]));
        // explicit: no buckets, no graphs
        c.session.shapes = ShapeList::Sizes(vec![]);
        let m = c.models().unwrap();
        assert!(m.session.buckets.is_empty() && !m.session.cuda_graph);
    }
}
