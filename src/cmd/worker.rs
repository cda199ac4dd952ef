//! `katz worker`: consumes jobs for one base model and stores results in Redis.
//!
//! Options come from flags, then environment variables, then `--config FILE` (TOML with the
//! same names, `snake_case`), then defaults that serve the committed tiny bundles on localhost.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use katz_actors::controlnet::{LocalMode, RemoteConfig, RemoteModel};
use katz_actors::pipeline::Models;
use katz_actors::protocol::Limits;
use katz_actors::worker::{self, WorkerConfig};
use katz_onnx::runtime::Device;
use serde::Deserialize;

use super::lora_args::{self, LoraArgs, LoraFile, LoraStoreArgs};
use super::{bundles_dir, DeviceArgs};

#[derive(Args, Debug, Clone)]
pub struct WorkerArgs {
    /// TOML file with any of the options below (flags and environment win over it).
    #[arg(long, env = "KATZ_CONFIG")]
    pub config: Option<PathBuf>,
    /// AMQP URI [default: amqp://guest:guest@127.0.0.1:5672/%2f]
    #[arg(long, env = "KATZ_AMQP")]
    pub amqp: Option<String>,
    /// Redis URL [default: redis://127.0.0.1:6379/]
    #[arg(long, env = "KATZ_REDIS")]
    pub redis: Option<String>,
    /// Base-model bundle [default: bundles/tiny-sdxl]
    #[arg(long, env = "KATZ_BUNDLE")]
    pub bundle: Option<PathBuf>,
    /// ControlNet bundles this worker hosts (repeatable) [default: bundles/tiny-sdxl-controlnet]
    #[arg(long = "controlnet", env = "KATZ_CONTROLNETS", value_delimiter = ',')]
    pub controlnets: Vec<PathBuf>,
    /// ControlNet models served by `katz controlnet-worker`s (repeatable): MODEL, or MODEL@QUEUE;
    /// their sessions go over RabbitMQ (katz.controlnet.<model>) and Redis, overlapping the UNet.
    #[arg(
        long = "controlnet-service",
        env = "KATZ_CONTROLNET_SERVICES",
        value_delimiter = ','
    )]
    pub controlnet_services: Vec<String>,
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
    pub controlnet_devices: Vec<Device>,
    /// Latent parallelism: run the conditional guidance half on this second GPU (e.g. cuda:1)
    #[arg(long, env = "KATZ_SPLIT_GUIDANCE")]
    pub split_guidance: Option<Device>,
    /// Longest wait for one step of a remote ControlNet before its session moves to another worker [default: 30000]
    #[arg(long, env = "KATZ_CONTROLNET_STEP_TIMEOUT_MS")]
    pub controlnet_step_timeout_ms: Option<u64>,
    /// How remote ControlNet sessions move tensors: redis (any host), or cuda-ipc (a GPU worker and
    /// ControlNet workers on GPUs of this host; handles travel through Redis, tensors stay on the GPUs) [default: redis]
    #[arg(long, env = "KATZ_CONTROLNET_TRANSPORT")]
    pub controlnet_transport: Option<String>,
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
    /// Largest message accepted; larger ones are dead-lettered [default: 33554432]
    #[arg(long, env = "KATZ_MAX_MESSAGE_BYTES")]
    pub max_message_bytes: Option<usize>,
    /// Largest width or height accepted [default: 2048]
    #[arg(long, env = "KATZ_MAX_SIDE")]
    pub max_side: Option<u32>,
    #[command(flatten)]
    pub lora: LoraArgs,
    #[command(flatten)]
    pub lora_store: LoraStoreArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

/// The TOML form of the options.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerFile {
    pub amqp: Option<String>,
    pub redis: Option<String>,
    pub bundle: Option<PathBuf>,
    #[serde(default)]
    pub controlnets: Vec<PathBuf>,
    pub lora_dir: Option<PathBuf>,
    #[serde(default)]
    pub controlnet_services: Vec<String>,
    pub controlnet_mode: Option<String>,
    #[serde(default)]
    pub controlnet_devices: Vec<String>,
    pub split_guidance: Option<String>,
    pub controlnet_step_timeout_ms: Option<u64>,
    pub controlnet_retries: Option<u32>,
    pub controlnet_transport: Option<String>,
    pub queue: Option<String>,
    pub concurrency: Option<usize>,
    pub lookahead: Option<usize>,
    pub metrics_addr: Option<SocketAddr>,
    pub name: Option<String>,
    pub max_message_bytes: Option<usize>,
    pub max_side: Option<u32>,
    pub threads: Option<usize>,
    #[serde(flatten)]
    pub lora: LoraFile,
}

pub fn config(mut a: WorkerArgs) -> anyhow::Result<WorkerConfig> {
    let file: WorkerFile = match &a.config {
        Some(p) => {
            toml::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
                .with_context(|| format!("parsing {}", p.display()))?
        }
        None => WorkerFile::default(),
    };
    let need_bundles = a.bundle.is_none() && file.bundle.is_none()
        || a.controlnets.is_empty() && file.controlnets.is_empty()
        || a.lora_dir.is_none() && file.lora_dir.is_none();
    let bundles = if need_bundles { Some(bundles_dir()?) } else { None };
    let default = |sub: &str| bundles.as_ref().map(|b| b.join(sub)).unwrap_or_default();
    // an empty KATZ_CONTROLNET_SERVICES (compose's default) names no service
    a.controlnet_services.retain(|s| !s.trim().is_empty());
    let services_given = !a.controlnet_services.is_empty() || !file.controlnet_services.is_empty();
    let controlnets = if !a.controlnets.is_empty() {
        a.controlnets
    } else if !file.controlnets.is_empty() {
        file.controlnets
    } else if services_given {
        vec![] // the ControlNets are served elsewhere
    } else {
        vec![default("tiny-sdxl-controlnet")]
    };
    let mut limits = Limits::default();
    if let Some(m) = a.max_message_bytes.or(file.max_message_bytes) {
        limits.max_message_bytes = m;
    }
    if let Some(m) = a.max_side.or(file.max_side) {
        limits.max_side = m;
    }
    let threads = if a.device.threads > 0 {
        a.device.threads
    } else {
        file.threads.unwrap_or(0)
    };
    let amqp = a
        .amqp
        .or(file.amqp)
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let redis = a
        .redis
        .or(file.redis)
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".into());
    let mut remote = RemoteConfig::new(amqp.clone(), redis.clone());
    if let Some(ms) = a.controlnet_step_timeout_ms.or(file.controlnet_step_timeout_ms) {
        remote.step_timeout = Duration::from_millis(ms);
    }
    if let Some(r) = a.controlnet_retries.or(file.controlnet_retries) {
        remote.retries = r;
    }
    remote.ipc = match a
        .controlnet_transport
        .or(file.controlnet_transport)
        .as_deref()
        .unwrap_or("redis")
    {
        "redis" => false,
        "cuda-ipc" if a.device.device.is_gpu() => true,
        "cuda-ipc" => anyhow::bail!(
            "--controlnet-transport cuda-ipc needs the worker on a GPU (--device cuda:N), got --device {}",
            a.device.device
        ),
        t => anyhow::bail!("--controlnet-transport must be redis or cuda-ipc, got `{t}`"),
    };
    let controlnet_devices: Vec<Device> = if a.controlnet_devices.is_empty() {
        file.controlnet_devices
            .iter()
            .map(|d| d.parse())
            .collect::<Result<_, _>>()
            .map_err(anyhow::Error::msg)?
    } else {
        a.controlnet_devices
    };
    let split_guidance = match a.split_guidance {
        Some(d) => Some(d),
        None => file
            .split_guidance
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?,
    };
    if let Some(d) = split_guidance {
        if !a.device.device.is_gpu() || !d.is_gpu() || d == a.device.device {
            anyhow::bail!(
                "--split-guidance {d} needs the worker on one GPU (--device cuda:N) and this on another, got --device {}",
                a.device.device
            );
        }
    }
    if controlnet_devices
        .iter()
        .any(|d| d.is_gpu() != a.device.device.is_gpu())
    {
        anyhow::bail!(
            "--controlnet-device {:?}: ControlNets go to GPUs when the base runs on one (--device {}), and stay on the CPU otherwise",
            controlnet_devices.iter().map(|d| d.to_string()).collect::<Vec<_>>(),
            a.device.device
        );
    }
    // threads overlapping the UNet only pay where the ControlNets have processors of their own
    let shares_gpu = a.device.device.is_gpu()
        && (controlnet_devices.is_empty() || controlnet_devices.contains(&a.device.device));
    let controlnet_mode = match a.controlnet_mode {
        Some(m) => m,
        None => match file
            .controlnet_mode
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(anyhow::Error::msg)?
        {
            Some(m) => m,
            None if shares_gpu => LocalMode::Serial,
            None => LocalMode::default(),
        },
    };
    let controlnet_services = if a.controlnet_services.is_empty() {
        file.controlnet_services
    } else {
        a.controlnet_services
    }
    .iter()
    .map(|s| s.parse::<RemoteModel>())
    .collect::<Result<Vec<_>, _>>()
    .map_err(anyhow::Error::msg)?;
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "worker".into());
    Ok(WorkerConfig {
        amqp,
        redis,
        models: Models {
            base: a.bundle.or(file.bundle).unwrap_or_else(|| default("tiny-sdxl")),
            controlnets,
            lora: lora_args::config(
                a.lora_dir.or(file.lora_dir).unwrap_or_else(|| default("loras")),
                &a.lora,
                &a.lora_store,
                &file.lora,
            )?,
            session: katz_onnx::runtime::SessionOptions {
                intra_threads: threads,
                device: a.device.device,
                fixed: None,
                cuda_graph: false,
                exact_fp32: false,
            },
            controlnet_mode,
            controlnet_services,
            controlnet_devices,
            split_guidance,
            remote: Some(remote),
        },
        queue: a.queue.or(file.queue),
        concurrency: a.concurrency.or(file.concurrency).unwrap_or(1),
        lookahead: a.lookahead.or(file.lookahead).unwrap_or(1),
        limits,
        worker_name: a
            .name
            .or(file.name)
            .unwrap_or_else(|| format!("{host}-{}", std::process::id())),
        metrics_addr: a.metrics_addr.or(file.metrics_addr),
        store_retry: Duration::from_secs(120),
    })
}

pub fn run(a: WorkerArgs) -> anyhow::Result<()> {
    let cfg = config(a)?;
    worker::run(cfg)?;
    Ok(())
}
