//! Prometheus metrics of a worker, served as text on `GET /metrics` (`--metrics-addr`).
//!
//! `katz_queue_wait_seconds`, `katz_job_latency_seconds` (delivery → result stored),
//! `katz_pipeline_seconds`, `katz_step_seconds` (histograms), `katz_jobs_total{outcome}`,
//! `katz_jobs_in_flight`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

pub struct Histogram {
    bounds: &'static [f64],
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            if seconds <= *b {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add((seconds.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {}", c.load(Ordering::Relaxed));
        }
        let n = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {n}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {n}");
    }
}

const SECONDS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
const STEP_SECONDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

pub struct Metrics {
    pub queue_wait: Histogram,
    pub job_latency: Histogram,
    pub pipeline: Histogram,
    pub step: Histogram,
    pub in_flight: AtomicI64,
    outcomes: Mutex<BTreeMap<&'static str, u64>>,
    /// LoRA adapters found in the host cache at admission / fetched from the store.
    pub lora_hits: AtomicI64,
    pub lora_loads: AtomicI64,
    /// LoRA fetches pending now (bounded by --lora-max-pending).
    pub lora_pending: AtomicI64,
    /// Time the denoising loop waited at the bound step for a LoRA merge.
    pub lora_wait: Histogram,
    /// ControlNet sessions opened again on another worker after a timeout.
    pub controlnet_retries: AtomicI64,
}

impl Metrics {
    pub fn outcome(&self, outcome: &'static str) {
        if let Ok(mut m) = self.outcomes.lock() {
            *m.entry(outcome).or_default() += 1;
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        self.queue_wait.render(
            "katz_queue_wait_seconds",
            "Time from submission to a worker taking the job.",
            &mut out,
        );
        self.job_latency.render(
            "katz_job_latency_seconds",
            "Time from delivery to the result stored.",
            &mut out,
        );
        self.pipeline.render(
            "katz_pipeline_seconds",
            "Time in the model pipeline per job.",
            &mut out,
        );
        self.step
            .render("katz_step_seconds", "Time of one denoising step.", &mut out);
        let _ = writeln!(
            out,
            "# HELP katz_jobs_total Jobs by outcome.\n# TYPE katz_jobs_total counter"
        );
        if let Ok(m) = self.outcomes.lock() {
            for (k, v) in m.iter() {
                let _ = writeln!(out, "katz_jobs_total{{outcome=\"{k}\"}} {v}");
            }
        }
        let _ = writeln!(
            out,
            "# HELP katz_jobs_in_flight Jobs being worked on.\n# TYPE katz_jobs_in_flight gauge"
        );
        let _ = writeln!(
            out,
            "katz_jobs_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
        self.lora_wait.render(
            "katz_lora_wait_seconds",
            "Time a job's denoising loop waited at its bound step for its LoRA merge.",
            &mut out,
        );
        for (name, help, kind, v) in [
            (
                "katz_lora_cache_hits_total",
                "LoRA adapters found in the host cache at admission.",
                "counter",
                &self.lora_hits,
            ),
            (
                "katz_lora_loads_total",
                "LoRA adapters that had to come from the store.",
                "counter",
                &self.lora_loads,
            ),
            (
                "katz_lora_pending_loads",
                "LoRA fetches pending now.",
                "gauge",
                &self.lora_pending,
            ),
            (
                "katz_controlnet_session_retries_total",
                "ControlNet sessions opened again on another worker after a timeout.",
                "counter",
                &self.controlnet_retries,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {}",
                v.load(Ordering::Relaxed)
            );
        }
        out
    }
}

pub fn metrics() -> &'static Metrics {
    static M: OnceLock<Metrics> = OnceLock::new();
    M.get_or_init(|| Metrics {
        queue_wait: Histogram::new(SECONDS),
        job_latency: Histogram::new(SECONDS),
        pipeline: Histogram::new(SECONDS),
        step: Histogram::new(STEP_SECONDS),
        in_flight: AtomicI64::new(0),
        outcomes: Mutex::new(BTreeMap::new()),
        lora_hits: AtomicI64::new(0),
        lora_loads: AtomicI64::new(0),
        lora_pending: AtomicI64::new(0),
        lora_wait: Histogram::new(STEP_SECONDS),
        controlnet_retries: AtomicI64::new(0),
    })
}

/// Serves `GET /metrics` until the runtime stops.
pub async fn serve(listener: TcpListener) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                ("200 OK", metrics().render())
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::new(&[0.1, 1.0]);
        h.observe(0.05);
        h.observe(0.5);
        h.observe(5.0);
        let mut s = String::new();
        h.render("x", "help", &mut s);
        assert!(s.contains("x_bucket{le=\"0.1\"} 1"));
        assert!(s.contains("x_bucket{le=\"1\"} 2"));
        assert!(s.contains("x_bucket{le=\"+Inf\"} 3"));
    }
}
