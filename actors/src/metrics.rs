//! Prometheus metrics of a worker, kept in a `prometheus-client` registry and served in the
//! Prometheus text format (0.0.4) on `GET /metrics` (`--metrics-addr`) by a hyper HTTP/1 server,
//! beside the worker's probes (crate::health): `GET /readyz` (200 once it takes jobs, else 503
//! with its state) and `GET /healthz` (200 while the process serves). A ControlNet worker serves
//! its own registry the same way (crate::controlnet::metrics).
//!
//! ```text
//! job / consumer / LoRA manager ─observe / inc─▶ metrics() (one registry per process)
//! queue_depth::poll ─set─▶ katz_queue_messages{queue}      (passive declares, every few seconds)
//! scraper ─GET /metrics─▶ serve(listener, health, render) ─▶ text; /readyz, /healthz; else 404
//! ```
//!
//! `katz_queue_wait_seconds`, `katz_job_latency_seconds` (delivery → result stored),
//! `katz_pipeline_seconds`, `katz_step_seconds`, `katz_lora_wait_seconds` (histograms),
//! `katz_jobs_total{model,outcome}`, `katz_job_errors_total{model,error_kind}`,
//! `katz_lora_cache_hits_total`, `katz_lora_loads_total`,
//! `katz_controlnet_session_retries_total` (counters), `katz_jobs_in_flight`,
//! `katz_lora_pending_loads`, `katz_queue_messages{queue}`, `katz_queue_consumers{queue}`,
//! `katz_build_info{version,git_sha}` (gauges). Every outcome and error kind of the worker's
//! model is there from the start, at 0 ([`Metrics::start`]). docs/operations.md lists them.

use std::convert::Infallible;
use std::sync::OnceLock;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::prometheus_text::{encode, CONTENT_TYPE};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::health::{Health, State};

const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
pub(crate) const STEP_SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// What became of a job (the `outcome` label of `katz_jobs_total`).
pub const OUTCOMES: &[&str] = &["done", "failed", "requeued", "rejected", "duplicate", "cancelled"];

/// The labels of `katz_jobs_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    model: String,
    outcome: &'static str,
}

/// The labels of `katz_job_errors_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorKind {
    model: String,
    error_kind: &'static str,
}

/// The label of the queue gauges.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabel {
    pub queue: String,
}

/// The labels of `katz_build_info`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildInfo {
    version: &'static str,
    git_sha: &'static str,
}

/// The gauges of the queues a process consumes or serves (crate::queue_depth sets them).
#[derive(Clone, Default)]
pub struct QueueGauges {
    pub messages: Family<QueueLabel, Gauge>,
    pub consumers: Family<QueueLabel, Gauge>,
}

impl QueueGauges {
    /// Registers the queue gauges and `katz_build_info` (= 1) in `r`.
    pub fn register(r: &mut Registry) -> QueueGauges {
        let q = QueueGauges::default();
        r.register(
            "katz_queue_messages",
            "Messages ready in a queue this process consumes or serves (passive declare)",
            q.messages.clone(),
        );
        r.register(
            "katz_queue_consumers",
            "Consumers of a queue this process consumes or serves (passive declare)",
            q.consumers.clone(),
        );
        let info = Family::<BuildInfo, Gauge>::default();
        r.register(
            "katz_build_info",
            "The running build: version, and git_sha where the build was given KATZ_GIT_SHA",
            info.clone(),
        );
        info.get_or_create(&BuildInfo {
            version: env!("CARGO_PKG_VERSION"),
            git_sha: option_env!("KATZ_GIT_SHA").unwrap_or(""),
        })
        .set(1);
        q
    }
}

pub struct Metrics {
    registry: Registry,
    pub queue_wait: Histogram,
    pub job_latency: Histogram,
    pub pipeline: Histogram,
    pub step: Histogram,
    pub in_flight: Gauge,
    outcomes: Family<Outcome, Counter>,
    errors: Family<ErrorKind, Counter>,
    /// Depth of the job queue and of the ControlNet queues the worker's sessions go to.
    pub queues: QueueGauges,
    /// LoRA adapters found in the host cache at admission / fetched from the store.
    pub lora_hits: Counter,
    pub lora_loads: Counter,
    /// LoRA fetches pending now (bounded by --lora-max-pending).
    pub lora_pending: Gauge,
    /// Time the denoising loop waited at the bound step for a LoRA merge.
    pub lora_wait: Histogram,
    /// ControlNet sessions opened again on another worker after a timeout.
    pub controlnet_retries: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::default();
        let histogram = |r: &mut Registry, name: &str, help: &str, bounds: &[f64]| {
            let h = Histogram::new(bounds.iter().copied());
            r.register(name, help, h.clone());
            h
        };
        let queue_wait = histogram(
            &mut r,
            "katz_queue_wait_seconds",
            "Time from submission to a worker taking the job",
            SECONDS,
        );
        let job_latency = histogram(
            &mut r,
            "katz_job_latency_seconds",
            "Time from delivery to the result stored",
            SECONDS,
        );
        let pipeline = histogram(
            &mut r,
            "katz_pipeline_seconds",
            "Time in the model pipeline per job",
            SECONDS,
        );
        let step = histogram(
            &mut r,
            "katz_step_seconds",
            "Time of one denoising step",
            STEP_SECONDS,
        );
        let outcomes = Family::<Outcome, Counter>::default();
        // counters are named without `_total`: the encoder appends it
        r.register("katz_jobs", "Jobs by outcome", outcomes.clone());
        let errors = Family::<ErrorKind, Counter>::default();
        r.register(
            "katz_job_errors",
            "Jobs that did not complete, by error kind (a requeued job counts at each try)",
            errors.clone(),
        );
        let queues = QueueGauges::register(&mut r);
        let in_flight = Gauge::default();
        r.register("katz_jobs_in_flight", "Jobs being worked on", in_flight.clone());
        let lora_wait = histogram(
            &mut r,
            "katz_lora_wait_seconds",
            "Time a job's denoising loop waited at its bound step for its LoRA merge",
            STEP_SECONDS,
        );
        let counter = |r: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            r.register(name, help, c.clone());
            c
        };
        let lora_hits = counter(
            &mut r,
            "katz_lora_cache_hits",
            "LoRA adapters found in the host cache at admission",
        );
        let lora_loads = counter(
            &mut r,
            "katz_lora_loads",
            "LoRA adapters that had to come from the store",
        );
        let lora_pending = Gauge::default();
        r.register(
            "katz_lora_pending_loads",
            "LoRA fetches pending now",
            lora_pending.clone(),
        );
        let controlnet_retries = counter(
            &mut r,
            "katz_controlnet_session_retries",
            "ControlNet sessions opened again on another worker after a timeout",
        );
        Metrics {
            registry: r,
            queue_wait,
            job_latency,
            pipeline,
            step,
            in_flight,
            outcomes,
            errors,
            queues,
            lora_hits,
            lora_loads,
            lora_pending,
            lora_wait,
            controlnet_retries,
        }
    }

    /// Every outcome and error kind of `model` at 0, so that dashboards see zeros rather than
    /// absent series before the first job.
    pub fn start(&self, model: &str) {
        for &outcome in OUTCOMES {
            let _ = self.outcomes.get_or_create(&Outcome {
                model: model.into(),
                outcome,
            });
        }
        for &error_kind in crate::error::ERROR_KINDS {
            let _ = self.errors.get_or_create(&ErrorKind {
                model: model.into(),
                error_kind,
            });
        }
    }

    /// Counts a job of `model` that ended with `outcome` (one of [`OUTCOMES`]).
    pub fn outcome(&self, model: &str, outcome: &'static str) {
        self.outcomes
            .get_or_create(&Outcome {
                model: model.into(),
                outcome,
            })
            .inc();
    }

    /// Counts a job of `model` that did not complete, by its error's kind (`JobError::kind`).
    pub fn error(&self, model: &str, error_kind: &'static str) {
        self.errors
            .get_or_create(&ErrorKind {
                model: model.into(),
                error_kind,
            })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        encode_registry(&self.registry)
    }
}

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(Metrics::new)
}

/// The worker's exposition (what `serve` answers on `/metrics` in `katz worker`).
pub fn render() -> String {
    metrics().render()
}

/// Encodes `registry` in the Prometheus text format.
pub fn encode_registry(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = encode(&mut out, registry) {
        tracing::warn!(error = %e, "encoding the metrics");
    }
    out
}

/// The answer to one request: the metrics on `GET /metrics`, the probes on `/readyz` and
/// `/healthz`, a 404 elsewhere.
fn respond(req: &Request<Incoming>, health: &Health, render: fn() -> String) -> Response<Full<Bytes>> {
    let get = req.method() == Method::GET;
    let (status, kind, body) = match req.uri().path() {
        "/metrics" if get => (StatusCode::OK, CONTENT_TYPE, render()),
        "/readyz" if get => match health.get() {
            State::Ready => (StatusCode::OK, "text/plain", "ready\n".to_string()),
            s => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("{}\n", s.as_str()),
            ),
        },
        "/healthz" if get => (StatusCode::OK, "text/plain", "ok\n".to_string()),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics, /readyz or /healthz\n".to_string(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

/// Serves `GET /metrics` (what `render` gives), `/readyz` and `/healthz` until the runtime
/// stops. Each connection answers one request and closes (scrapers reconnect; a plain `read to
/// end` client sees the end of the answer).
pub async fn serve(listener: TcpListener, health: Health, render: fn() -> String) {
    loop {
        let sock = match listener.accept().await {
            Ok((sock, _)) => sock,
            Err(e) => {
                // out of file descriptors, a reset before accept …: try again shortly
                tracing::debug!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let health = health.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let health = health.clone();
                async move { Ok::<_, Infallible>(respond(&req, &health, render)) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(false)
                .serve_connection(TokioIo::new(sock), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics: a connection failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new([0.1, 1.0]);
        let mut r = Registry::default();
        r.register("x", "help", h.clone());
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut s = String::new();
        encode(&mut s, &r).unwrap();
        assert!(s.contains("x_bucket{le=\"0.1\"} 1"), "{s}");
        assert!(s.contains("x_bucket{le=\"1\"} 2"), "{s}");
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3"), "{s}");
    }

    #[test]
    fn the_exposition_keeps_the_metric_names_and_types() {
        let m = Metrics::new();
        m.start("tiny-sdxl");
        m.outcome("tiny-sdxl", "done");
        m.outcome("tiny-sdxl", "done");
        m.error("tiny-sdxl", "controlnet");
        m.queues
            .messages
            .get_or_create(&QueueLabel {
                queue: "katz.jobs.tiny-sdxl".into(),
            })
            .set(7);
        m.lora_hits.inc_by(3);
        m.step.observe(0.01);
        let s = m.render();
        for want in [
            "# TYPE katz_jobs_total counter",
            "katz_jobs_total{model=\"tiny-sdxl\",outcome=\"done\"} 2",
            // every outcome and error kind from the start, at 0
            "katz_jobs_total{model=\"tiny-sdxl\",outcome=\"failed\"} 0",
            "katz_jobs_total{model=\"tiny-sdxl\",outcome=\"requeued\"} 0",
            "katz_job_errors_total{model=\"tiny-sdxl\",error_kind=\"controlnet\"} 1",
            "katz_job_errors_total{model=\"tiny-sdxl\",error_kind=\"controlnet_transport\"} 0",
            "katz_job_errors_total{model=\"tiny-sdxl\",error_kind=\"decode\"} 0",
            "katz_queue_messages{queue=\"katz.jobs.tiny-sdxl\"} 7",
            "# TYPE katz_build_info gauge",
            "# TYPE katz_jobs_in_flight gauge",
            "katz_jobs_in_flight 0",
            "katz_step_seconds_count 1",
            "katz_queue_wait_seconds_count 0",
            "# TYPE katz_lora_cache_hits_total counter",
            "katz_lora_cache_hits_total 3",
            "katz_lora_loads_total 0",
            "katz_lora_pending_loads 0",
            "# TYPE katz_lora_wait_seconds histogram",
            "# TYPE katz_controlnet_session_retries_total counter",
        ] {
            assert!(s.contains(want), "no `{want}` in\n{s}");
        }
    }

    /// What a plain HTTP/1.1 client sees: the metrics, then the end of the connection.
    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut body = String::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut body))
            .await
            .expect("the server closes the connection after its answer")
            .unwrap();
        body
    }

    #[tokio::test]
    async fn the_server_answers_metrics_and_404_elsewhere() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Health::new();
        tokio::spawn(serve(listener, health.clone(), render));
        let ok = get(addr, "/metrics").await;
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
        assert!(ok.contains("# TYPE katz_jobs_in_flight gauge"), "{ok}");
        let other = get(addr, "/").await;
        assert!(other.starts_with("HTTP/1.1 404"), "{other}");
        assert!(other.contains("try /metrics"), "{other}");
        let loading = get(addr, "/readyz").await;
        assert!(
            loading.starts_with("HTTP/1.1 503") && loading.contains("loading"),
            "{loading}"
        );
        health.set(State::Ready);
        let ready = get(addr, "/readyz").await;
        assert!(
            ready.starts_with("HTTP/1.1 200") && ready.contains("ready"),
            "{ready}"
        );
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
    }
}
