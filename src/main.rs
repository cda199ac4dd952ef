//! `katz`: serves diffusion-model workflows with many adapters.
//!
//! ```text
//! katz demo        the embedded demo: tiny bundles, one ControlNet, one LoRA, on the CPU
//! katz generate    one image from any bundle, with ControlNets and LoRAs
//! katz worker      the service: RabbitMQ jobs → pipeline → Redis results
//! katz controlnet-worker   one ControlNet model's sessions for base workers (ControlNet-as-a-Service)
//! katz submit      publish a job; --wait follows it and writes the image
//! katz status ID   a job's record;   katz cancel ID   stop it
//! katz gateway     the HTTP API (katz-gateway): jobs, SSE progress, webhooks, models, operator page
//! katz bench …     measurements (lora-merge: LoRA merge time vs the memory-bound floor)
//! katz trace …     request traces in the Katz format: gen, stats, cache, replay
//! katz report      latency, throughput and LoRA cache figures of runs, from Redis
//! ```
//! This file only parses and dispatches.
//!
//! # Layout
//!
//! ```text
//! cmd/          one file per subcommand (demo, generate, worker, controlnet_worker, submit,
//!               status, cancel, trace, report); lora_args.rs the LoRA flags several share, and
//!               mod.rs the other shared flags and helpers (AmqpArgs, RedisArgs, DeviceArgs,
//!               bundles_dir, write_json)
//!   bench/      one file per bench (lora_merge + lora_merge_gpu, lora: lora-bound and
//!               lora-cache, controlnet, pipeline), stats.rs what they share; mod.rs dispatches
//! logging.rs    the log subscriber: text or JSON (KATZ_LOG_FORMAT), KATZ_LOG's filter, colours
//!               only on a terminal, broker passwords scrubbed from every line
//! otlp.rs       OpenTelemetry trace export of the job, session and step spans (OTEL_* variables)
//! workload/     offline research on the Katz trace: its published statistics, requests and
//!               traces drawn from them, the trace format, LoRA cache replay and calibration
//!               (used by `katz trace` and `katz bench lora-cache`; nothing in the service)
//! ```
//!
//! The service itself is the katz-actors crate, the models katz-onnx, the kernels katz-kernels.

mod cmd;
mod logging;
mod otlp;
mod workload;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "katz",
    version,
    about = "Serves diffusion-model workflows with many adapters",
    after_help = "Environment read by every command:\n  \
        KATZ_LOG                      log filter (tracing's EnvFilter syntax)\n  \
        KATZ_LOG_FORMAT               text (default) or json\n  \
        OTEL_EXPORTER_OTLP_ENDPOINT   an OpenTelemetry collector (http://host:4318): traces of jobs and steps\n  \
        KATZ_TRACE                    which spans are exported (default: jobs, sessions, steps, warnings)\n  \
        OTEL_SERVICE_NAME             the exported service (default katz-<command>)\n  \
        KATZ_CUDA_OPTIONS             more CUDA-provider options for every GPU session (prefer_nhwc=1,…)\n\
        docs/operations.md has the rest."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// parsed once per process: the size difference between subcommands' arguments does not matter
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the embedded demo: a full workflow (prompt, ControlNet, LoRA) on the bundled tiny models.
    Demo(cmd::demo::DemoArgs),
    /// Generate one image from a bundle.
    Generate(cmd::generate::GenerateArgs),
    /// Serve jobs from RabbitMQ, results to Redis.
    Worker(cmd::worker::WorkerArgs),
    /// Serve one ControlNet model's sessions for base workers (queue katz.controlnet.<model>).
    ControlnetWorker(cmd::controlnet_worker::ControlNetWorkerArgs),
    /// Publish a job (and with --wait, follow it and write its image).
    Submit(cmd::submit::SubmitArgs),
    /// Print a job's status record.
    Status(cmd::status::StatusArgs),
    /// Ask a job to stop (before it starts, or at its next step).
    Cancel(cmd::cancel::CancelArgs),
    /// Serve the HTTP API: jobs, progress events, webhooks, models, an operator page.
    Gateway(cmd::gateway::GatewayArgs),
    /// Measure one building block (katz bench lora-merge …).
    Bench(cmd::bench::BenchArgs),
    /// Request traces in the Katz authors' format: draw one, read its statistics, replay caches.
    Trace(cmd::trace::TraceArgs),
    /// Latency percentiles, throughput, queue wait and LoRA cache figures of workload runs (from
    /// the jobs' Redis records), with plots.
    Report(cmd::report::ReportArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // the worker logs its jobs; the one-shot commands only warnings (KATZ_LOG overrides both)
    let default_filter = match cli.command {
        Command::Worker(_) | Command::ControlnetWorker(_) => "warn,katz_actors=info",
        Command::Gateway(_) => "warn,katz_gateway=info",
        _ => "warn",
    };
    let secrets = logging::secrets();
    let command = match &cli.command {
        Command::Worker(_) => "worker",
        Command::ControlnetWorker(_) => "controlnet-worker",
        Command::Gateway(_) => "gateway",
        Command::Demo(_) => "demo",
        Command::Generate(_) => "generate",
        Command::Bench(_) => "bench",
        _ => "cli",
    };
    // held to the end of main: dropping it flushes the trace export
    let _logging = match logging::init(default_filter, command, secrets.clone()) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {}", secrets.scrub(&e));
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Demo(a) => cmd::demo::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Worker(a) => cmd::worker::run(a),
        Command::ControlnetWorker(a) => cmd::controlnet_worker::run(a),
        Command::Submit(a) => cmd::submit::run(a),
        Command::Status(a) => cmd::status::run(a),
        Command::Cancel(a) => cmd::cancel::run(a),
        Command::Gateway(a) => cmd::gateway::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Trace(a) => cmd::trace::run(a),
        Command::Report(a) => cmd::report::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // no password of a URL the process was given reaches the terminal
            eprintln!("error: {}", secrets.scrub(&format!("{e:#}")));
            std::process::ExitCode::FAILURE
        }
    }
}
