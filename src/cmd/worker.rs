//! `katz worker`: consumes jobs for one base model and stores results in Redis.
//!
//! ```text
//! --config FILE.toml ─▶ WorkerConfig (katz_actors::config; defaults there)
//!   ◀─ flags / KATZ_* environment given (each overrides one option)
//!   ◀─ unset bundle paths: the committed tiny bundles (bundles_dir)
//!   ─▶ katz_actors::worker::run(cfg, SIGTERM/SIGINT)
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use katz_actors::config::{ShapeList, Transport, WorkerConfig};
use katz_actors::controlnet::wire::Residuals;
use katz_actors::controlnet::{LocalMode, RemoteModel};
use katz_actors::worker;
use katz_onnx::runtime::{BucketLoad, Device, OtherSizes};

use super::bundles_dir;
use super::lora_args::{set, LoraArgs, LoraStoreArgs};

/// The worker's flags: each one given overrides its option in `--config` (or the default);
/// the TOML keys are the flag names in `snake_case` (docs in `katz_actors::config`).
#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// TOML file with any of the options below (flags and environment win over it).
    #[arg(long, env = "KATZ_CONFIG")]
    pub config: Option<PathBuf>,
    /// AMQP URI [default: RabbitMQ on 127.0.0.1:5672 as guest]
    #[arg(long, env = "KATZ_AMQP")]
    pub amqp: Option<String>,
    /// Redis URL [default: Redis on 127.0.0.1:6379]
    #[arg(long, env = "KATZ_REDIS")]
    pub redis: Option<String>,
    /// Base-model bundle [default: bundles/tiny-sdxl]
    #[arg(long, env = "KATZ_BUNDLE")]
    pub bundle: Option<PathBuf>,
    /// ControlNet bundles this worker hosts (repeatable; `none`: no hosted ControlNet)
    /// [default: bundles/tiny-sdxl-controlnet; none with --controlnet-service]
    #[arg(long = "controlnet", env = "KATZ_CONTROLNETS", value_delimiter = ',')]
    pub controlnets: Option<Vec<PathBuf>>,
    /// ControlNet models served by `katz controlnet-worker`s (repeatable): MODEL, or MODEL@QUEUE;
    /// their sessions go over RabbitMQ (katz.controlnet.<model>) and Redis, overlapping the UNet.
    #[arg(
        long = "controlnet-service",
        env = "KATZ_CONTROLNET_SERVICES",
        value_delimiter = ','
    )]
    pub controlnet_services: Option<Vec<String>>,
    /// How hosted ControlNets run: serial, or parallel (a thread each, overlapping the UNet)
    /// [default: parallel; serial when they share the base's GPU, where threads only contend]
    #[arg(long, env = "KATZ_CONTROLNET_MODE")]
    pub controlnet_mode: Option<LocalMode>,
    /// GPUs for the hosted ControlNets (cuda:1,cuda:2): ControlNet j on entry j mod len [default: the base's device]
    #[arg(
        long = "controlnet-device",
        env = "KATZ_CONTROLNET_DEVICES",
        value_delimiter = ','
    )]
    pub controlnet_devices: Option<Vec<Device>>,
    /// Latent parallelism: run the conditional guidance half on this second GPU (e.g. cuda:1)
    #[arg(long, env = "KATZ_SPLIT_GUIDANCE")]
    pub split_guidance: Option<Device>,
    /// Longest wait for one step of a remote ControlNet before its session moves to another worker [default: 30000]
    #[arg(long, env = "KATZ_CONTROLNET_STEP_TIMEOUT_MS")]
    pub controlnet_step_timeout_ms: Option<u64>,
    /// How remote ControlNet sessions move tensors: redis (any host), or cuda-ipc (a GPU worker and
    /// ControlNet workers on GPUs of this host; handles travel through Redis, tensors stay on the GPUs) [default: redis]
    #[arg(long, env = "KATZ_CONTROLNET_TRANSPORT")]
    pub controlnet_transport: Option<Transport>,
    /// The precision remote ControlNets send residuals in: auto (fp16 where the ControlNet computes
    /// in fp16, which is exact; f32 otherwise), f16 (always: half the transport, rounds an f32
    /// ControlNet's residuals) or f32 [default: auto]
    #[arg(long, env = "KATZ_CONTROLNET_RESIDUALS")]
    pub controlnet_residuals: Option<Residuals>,
    /// Remote ControlNet sessions opened again after a timeout before the job fails [default: 2]
    #[arg(long, env = "KATZ_CONTROLNET_RETRIES")]
    pub controlnet_retries: Option<u32>,
    /// LoRA store: a job's LoRA NAME is NAME.safetensors here [default: bundles/loras]
    #[arg(long, env = "KATZ_LORA_DIR")]
    pub lora_dir: Option<PathBuf>,
    /// Queue to consume [default: katz.jobs.<base model name>]
    #[arg(long, env = "KATZ_QUEUE")]
    pub queue: Option<String>,
    /// Jobs run at once (pipeline threads sharing one copy of the weights) [default: 1]
    #[arg(long, env = "KATZ_CONCURRENCY")]
    pub concurrency: Option<usize>,
    /// Jobs taken beyond those running (AMQP prefetch = concurrency + lookahead); they wait with
    /// their LoRAs prefetching and go back to the queue on shutdown [default: 1]
    #[arg(long, env = "KATZ_LOOKAHEAD")]
    pub lookahead: Option<usize>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9187).
    #[arg(long, env = "KATZ_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Name written into each job's status [default: <hostname>-<pid>]
    #[arg(long, env = "KATZ_WORKER_NAME")]
    pub name: Option<String>,
    /// Times a job may be started (requeued after Redis trouble or a worker that died) before it
    /// fails with `attempts` [default: 5]
    #[arg(long, env = "KATZ_MAX_ATTEMPTS", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_attempts: Option<u64>,
    /// Largest message accepted; larger ones are dead-lettered [default: 33554432]
    #[arg(long, env = "KATZ_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Largest width or height accepted [default: 2048]
    #[arg(long, env = "KATZ_MAX_SIDE")]
    pub max_side: Option<u32>,
    /// Publish a preview of the running job after every N steps: a PNG at latent resolution in
    /// katz:job:<id>:preview, `preview_step` in its record and events; 0: none [default: 0]
    #[arg(long, env = "KATZ_PREVIEW_EVERY", value_name = "N")]
    pub preview_every: Option<u32>,
    #[command(flatten)]
    pub session: SessionArgs,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub lora_store: LoraStoreArgs,
}

/// Where and how the worker's sessions run.
#[derive(Args, Debug, Clone)]
pub struct SessionArgs {
    /// Threads per ONNX Runtime operator (0: all cores) [default: 0]
    #[arg(long, env = "KATZ_THREADS")]
    pub threads: Option<usize>,
    /// cpu, cuda:N or tensorrt:N; a GPU that cannot be used is an error, never a CPU fall-back [default: cpu]
    #[arg(long, env = "KATZ_DEVICE")]
    pub device: Option<Device>,
    /// Shape buckets: sizes served with UNet graphs fixed to them (CUDA graphs on a GPU):
    /// WxH,WxH,…, `sdxl` (SDXL's nine usual sizes), `none` or `auto` [default: auto: on a GPU,
    /// SDXL's sizes for a 1024x1024 bundle, else its default size; none on the CPU]
    #[arg(long, env = "KATZ_SHAPES")]
    pub shapes: Option<ShapeList>,
    /// A size no bucket has: `dynamic` (free-shape sessions run it, slower) or `refuse` [default: dynamic]
    #[arg(long, env = "KATZ_OTHER_SIZES")]
    pub other_sizes: Option<OtherSizes>,
    /// CUDA graphs for every bucket's UNet (needs buckets and cuda:N) [default: on with cuda:N and buckets]
    #[arg(long, env = "KATZ_CUDA_GRAPH", num_args = 0..=1, default_missing_value = "true")]
    pub cuda_graph: Option<bool>,
    /// CUDA: matrix products and convolutions in full fp32, not TF32
    #[arg(long, env = "KATZ_EXACT_FP32", num_args = 0..=1, default_missing_value = "true")]
    pub exact_fp32: Option<bool>,
    /// When the shape buckets open and are captured: `all` (before the worker takes jobs) or
    /// `first-use` (the first bucket at load, each other one at the start of its first job;
    /// a ready worker in a fraction of the time) [default: first-use with one model thread, else all]
    #[arg(long, env = "KATZ_BUCKET_LOAD")]
    pub bucket_load: Option<BucketLoad>,
    #[command(flatten)]
    pub runtime: super::RuntimeArgs,
    /// Run every shape bucket once before taking jobs [default: on a GPU]
    #[arg(long, env = "KATZ_WARM_UP", num_args = 0..=1, default_missing_value = "true")]
    pub warm_up: Option<bool>,
}

/// A list flag's values without empty entries (an empty `KATZ_…` variable, compose's default,
/// names nothing); `None` where nothing is left, so the file or the default applies.
fn given<T>(v: Option<Vec<T>>, empty: impl Fn(&T) -> bool) -> Option<Vec<T>> {
    v.map(|mut v| {
        v.retain(|x| !empty(x));
        v
    })
    .filter(|v| !v.is_empty())
}

impl WorkerArgs {
    /// Overlays the flags given onto `c`.
    pub fn apply(self, c: &mut WorkerConfig) -> anyhow::Result<()> {
        set(&mut c.amqp, self.amqp);
        set(&mut c.redis, self.redis);
        if self.bundle.is_some() {
            c.bundle = self.bundle;
        }
        if self.lora_dir.is_some() {
            c.lora_dir = self.lora_dir;
        }
        if self.queue.is_some() {
            c.queue = self.queue;
        }
        set(&mut c.concurrency, self.concurrency);
        set(&mut c.lookahead, self.lookahead);
        if self.metrics_addr.is_some() {
            c.metrics_addr = self.metrics_addr;
        }
        if self.name.is_some() {
            c.name = self.name;
        }
        set(&mut c.max_message_bytes, self.max_message_bytes);
        set(&mut c.max_attempts, self.max_attempts);
        set(&mut c.max_side, self.max_side);
        set(&mut c.preview_every, self.preview_every);

        let s = &mut c.session;
        set(&mut s.threads, self.session.threads);
        set(&mut s.device, self.session.device);
        set(&mut s.shapes, self.session.shapes);
        set(&mut s.other_sizes, self.session.other_sizes);
        if self.session.cuda_graph.is_some() {
            s.cuda_graph = self.session.cuda_graph;
        }
        set(&mut s.exact_fp32, self.session.exact_fp32);
        if self.session.bucket_load.is_some() {
            s.bucket_load = self.session.bucket_load;
        }
        self.session.runtime.apply(s);
        if self.session.warm_up.is_some() {
            s.warm_up = self.session.warm_up;
        }

        let cn = &mut c.controlnet;
        if let Some(paths) = given(self.controlnets, |p| p.as_os_str().is_empty()) {
            // `--controlnet none`: no hosted ControlNet
            let none = paths.len() == 1 && paths[0].as_os_str() == "none";
            cn.controlnets = Some(if none { Vec::new() } else { paths });
        }
        if let Some(services) = given(self.controlnet_services, |s| s.trim().is_empty()) {
            cn.controlnet_services = services
                .iter()
                .map(|s| s.parse::<RemoteModel>())
                .collect::<Result<_, _>>()
                .map_err(anyhow::Error::msg)?;
        }
        if self.controlnet_mode.is_some() {
            cn.controlnet_mode = self.controlnet_mode;
        }
        set(&mut cn.controlnet_devices, self.controlnet_devices);
        if self.split_guidance.is_some() {
            cn.split_guidance = self.split_guidance;
        }
        set(
            &mut cn.controlnet_step_timeout_ms,
            self.controlnet_step_timeout_ms,
        );
        set(&mut cn.controlnet_retries, self.controlnet_retries);
        set(&mut cn.controlnet_transport, self.controlnet_transport);
        set(&mut cn.controlnet_residuals, self.controlnet_residuals);

        self.lora.apply(&mut c.lora);
        self.lora_store.apply(&mut c.lora);
        Ok(())
    }
}

/// The configuration: `--config` (or the defaults), the flags given over it, and the committed
/// tiny bundles for the bundle paths still unset.
pub fn config(a: WorkerArgs) -> anyhow::Result<WorkerConfig> {
    let mut c = match &a.config {
        Some(p) => WorkerConfig::from_file(p)?,
        None => WorkerConfig::default(),
    };
    a.apply(&mut c)?;
    if c.needs_bundles() {
        c.locate_bundles(&bundles_dir()?);
    }
    Ok(c)
}

pub fn run(a: WorkerArgs) -> anyhow::Result<()> {
    worker::run(config(a)?, super::terminated())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use katz_onnx::pipeline::LoraMode;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        worker: WorkerArgs,
    }

    /// `file` (TOML) with `flags` over it.
    fn overlay(file: &str, flags: &[&str]) -> WorkerConfig {
        let mut c: WorkerConfig = toml::from_str(file).unwrap();
        let cli = Cli::try_parse_from(std::iter::once("worker").chain(flags.iter().copied())).unwrap();
        cli.worker.apply(&mut c).unwrap();
        c
    }

    #[test]
    fn flags_given_override_the_file_and_the_rest_of_the_file_stays() {
        let file =
            "concurrency = 3\nthreads = 2\ncontrolnets = [\"a\"]\nlora_mode = \"sync\"\nqueue = \"q\"\n";
        let c = overlay(file, &[]);
        assert_eq!((c.concurrency, c.session.threads), (3, 2));
        assert_eq!(c.controlnet.controlnets, Some(vec![PathBuf::from("a")]));
        let c = overlay(
            file,
            &[
                "--threads",
                "1",
                "--controlnet",
                "none",
                "--shapes",
                "64,96x64",
                "--cuda-graph",
                "--lora-switch",
                "ready",
                "--max-attempts",
                "3",
                "--preview-every",
                "5",
            ],
        );
        assert_eq!(c.max_attempts, 3);
        assert_eq!(c.preview_every, 5);
        assert_eq!((c.concurrency, c.session.threads), (3, 1));
        assert_eq!(c.queue.as_deref(), Some("q"));
        assert_eq!(
            c.controlnet.controlnets,
            Some(vec![]),
            "--controlnet none hosts none"
        );
        assert_eq!(c.session.shapes.to_string(), "64x64,96x64");
        assert!(c.session.cuda_graph == Some(true) && !c.session.exact_fp32);
        assert_eq!(c.lora.lora_mode, LoraMode::Sync);
        assert_eq!(c.lora.lora_switch, katz_actors::config::LoraSwitch::Ready);
        let c = overlay(
            "cuda_graph = true",
            &["--cuda-graph", "false", "--controlnet", "x,y"],
        );
        assert_eq!(c.session.cuda_graph, Some(false));
        assert_eq!(
            c.controlnet.controlnets,
            Some(vec![PathBuf::from("x"), PathBuf::from("y")])
        );
    }

    #[test]
    fn empty_list_values_name_nothing() {
        let c = overlay("controlnet_services = [\"m\"]", &["--controlnet-service", ""]);
        assert_eq!(
            c.controlnet.controlnet_services.len(),
            1,
            "an empty value keeps the file's"
        );
        let c = overlay("", &["--controlnet-service", "m@q,"]);
        assert_eq!(c.controlnet.controlnet_services[0].queue, "q");
    }
}
