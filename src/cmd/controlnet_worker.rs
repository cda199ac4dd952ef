//! `katz controlnet-worker`: serves one ControlNet model's sessions for base workers anywhere
//! (queue `katz.controlnet.<model>`; tensors through Redis). Start as many as the load needs.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use katz_actors::controlnet::worker::{self, ControlNetWorkerConfig};

use super::{AmqpArgs, DeviceArgs, RedisArgs};

#[derive(Args, Debug, Clone)]
pub struct ControlNetWorkerArgs {
    /// ControlNet bundle to serve.
    #[arg(long, env = "KATZ_CONTROLNET_BUNDLE")]
    pub bundle: PathBuf,
    /// The base bundle its residuals are for [default: bundles/tiny-sdxl]
    #[arg(long, env = "KATZ_BUNDLE")]
    pub base: Option<PathBuf>,
    /// Sessions served at once (a thread and a ControlNet session each).
    #[arg(long, env = "KATZ_CONCURRENCY", default_value_t = 1)]
    pub concurrency: usize,
    /// Name in logs [default: cn-<hostname>-<pid>]
    #[arg(long, env = "KATZ_WORKER_NAME")]
    pub name: Option<String>,
    /// Queue to consume [default: katz.controlnet.<model>]; base workers name it as MODEL@QUEUE.
    #[arg(long, env = "KATZ_QUEUE")]
    pub queue: Option<String>,
    /// A session with no step for this long ends, in seconds.
    #[arg(long, env = "KATZ_CONTROLNET_IDLE_S", default_value_t = 60)]
    pub idle_s: u64,
    /// Serve Prometheus metrics (/metrics) and the probes (/readyz, /healthz) on this address
    /// (e.g. 127.0.0.1:9188).
    #[arg(long, env = "KATZ_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub amqp: AmqpArgs,
    #[command(flatten)]
    pub redis: RedisArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(a: ControlNetWorkerArgs) -> anyhow::Result<()> {
    let base = match a.base {
        Some(b) => b,
        None => super::bundles_dir()?.join("tiny-sdxl"),
    };
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    worker::run(
        ControlNetWorkerConfig {
            amqp: a.amqp.amqp,
            redis: a.redis.redis,
            bundle: a.bundle,
            base,
            session: a.device.session_options(),
            concurrency: a.concurrency,
            name: a
                .name
                .unwrap_or_else(|| format!("cn-{host}-{}", std::process::id())),
            queue: a.queue,
            idle_timeout: Duration::from_secs(a.idle_s.max(1)),
            ttl: Duration::from_secs(300),
            metrics_addr: a.metrics_addr,
        },
        super::terminated(),
    )?;
    Ok(())
}
