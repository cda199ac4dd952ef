//! Prometheus metrics of a ControlNet worker (`katz controlnet-worker --metrics-addr`), in a
//! registry of their own, served by `crate::metrics::serve` beside `/readyz` and `/healthz`.
//!
//! ```text
//! consumer task ─open / end─▶ sessions_total{model,end}, sessions_active{model}, errors_total{model,error_kind}
//! SessionActor  ─each step──▶ steps_total{model}, step_seconds{model}
//! queue_depth::poll ────────▶ katz_queue_messages{queue}, katz_queue_consumers{queue}
//! ```
//!
//! `katz_controlnet_sessions_total{model,end}` (`closed`, `idle`, `abandoned`, `failed`),
//! `katz_controlnet_steps_total{model}`, `katz_controlnet_errors_total{model,error_kind}`
//! (counters), `katz_controlnet_step_seconds{model}` (histogram: one step's residuals, read to
//! answered), `katz_controlnet_sessions_active{model}`, the queue gauges and `katz_build_info`
//! (gauges). Every `end` and `error_kind` is there from [`ControlNetMetrics::start`], at 0.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::metrics::{encode_registry, QueueGauges, STEP_SECONDS};

/// How a session ended (the `end` label).
pub const ENDS: &[&str] = &["closed", "idle", "abandoned", "failed"];

/// Why a session or a session request failed (the `error_kind` label).
pub const ERROR_KINDS: &[&str] = &["no_model", "redis", "wire", "step", "mailbox", "bad_request"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Model {
    model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct End {
    model: String,
    end: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    model: String,
    error_kind: &'static str,
}

type Histograms = Family<Model, Histogram, fn() -> Histogram>;

pub struct ControlNetMetrics {
    registry: Registry,
    sessions: Family<End, Counter>,
    active: Family<Model, Gauge>,
    steps: Family<Model, Counter>,
    step_seconds: Histograms,
    errors: Family<Kind, Counter>,
    /// Depth of the queue the worker consumes.
    pub queues: QueueGauges,
}

fn step_histogram() -> Histogram {
    Histogram::new(STEP_SECONDS.iter().copied())
}

impl ControlNetMetrics {
    fn new() -> Self {
        let mut r = Registry::default();
        let sessions = Family::<End, Counter>::default();
        r.register(
            "katz_controlnet_sessions",
            "ControlNet sessions served, by how they ended",
            sessions.clone(),
        );
        let active = Family::<Model, Gauge>::default();
        r.register(
            "katz_controlnet_sessions_active",
            "ControlNet sessions being served now",
            active.clone(),
        );
        let steps = Family::<Model, Counter>::default();
        r.register(
            "katz_controlnet_steps",
            "ControlNet steps answered",
            steps.clone(),
        );
        let step_seconds: Histograms = Family::new_with_constructor(step_histogram);
        r.register(
            "katz_controlnet_step_seconds",
            "Time of one ControlNet step, its input read to its residuals answered",
            step_seconds.clone(),
        );
        let errors = Family::<Kind, Counter>::default();
        r.register(
            "katz_controlnet_errors",
            "ControlNet sessions or session requests that failed, by error kind",
            errors.clone(),
        );
        let queues = QueueGauges::register(&mut r);
        ControlNetMetrics {
            registry: r,
            sessions,
            active,
            steps,
            step_seconds,
            errors,
            queues,
        }
    }

    /// Every series of `model` at 0, before the first session.
    pub fn start(&self, model: &str) {
        let m = Model { model: model.into() };
        let _ = self.active.get_or_create(&m);
        let _ = self.steps.get_or_create(&m);
        let _ = self.step_seconds.get_or_create(&m);
        for &end in ENDS {
            let _ = self.sessions.get_or_create(&End {
                model: model.into(),
                end,
            });
        }
        for &error_kind in ERROR_KINDS {
            let _ = self.errors.get_or_create(&Kind {
                model: model.into(),
                error_kind,
            });
        }
    }

    pub fn session_started(&self, model: &str) {
        self.active.get_or_create(&Model { model: model.into() }).inc();
    }

    /// A session of `model` ended (`end` one of [`ENDS`]).
    pub fn session_ended(&self, model: &str, end: &'static str) {
        self.active.get_or_create(&Model { model: model.into() }).dec();
        self.sessions
            .get_or_create(&End {
                model: model.into(),
                end,
            })
            .inc();
    }

    /// One step answered in `seconds`.
    pub fn step(&self, model: &str, seconds: f64) {
        let m = Model { model: model.into() };
        self.steps.get_or_create(&m).inc();
        self.step_seconds.get_or_create(&m).observe(seconds);
    }

    /// A failure of kind `error_kind` (one of [`ERROR_KINDS`]).
    pub fn error(&self, model: &str, error_kind: &'static str) {
        self.errors
            .get_or_create(&Kind {
                model: model.into(),
                error_kind,
            })
            .inc();
    }

    pub fn render(&self) -> String {
        encode_registry(&self.registry)
    }
}

/// The ControlNet worker's registry (one per process).
pub fn controlnet_metrics() -> &'static ControlNetMetrics {
    static M: OnceLock<ControlNetMetrics> = OnceLock::new();
    M.get_or_init(ControlNetMetrics::new)
}

/// What `katz controlnet-worker` answers on `/metrics`.
pub fn render() -> String {
    controlnet_metrics().render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_is_there_from_the_start_and_counts() {
        let m = ControlNetMetrics::new();
        m.start("cn");
        let s = m.render();
        for want in [
            "katz_controlnet_sessions_total{model=\"cn\",end=\"closed\"} 0",
            "katz_controlnet_sessions_total{model=\"cn\",end=\"failed\"} 0",
            "katz_controlnet_errors_total{model=\"cn\",error_kind=\"redis\"} 0",
            "katz_controlnet_steps_total{model=\"cn\"} 0",
            "katz_controlnet_sessions_active{model=\"cn\"} 0",
            "katz_controlnet_step_seconds_count{model=\"cn\"} 0",
            "# TYPE katz_build_info gauge",
        ] {
            assert!(s.contains(want), "no `{want}` in\n{s}");
        }
        m.session_started("cn");
        m.step("cn", 0.004);
        m.step("cn", 0.006);
        let s = m.render();
        assert!(
            s.contains("katz_controlnet_sessions_active{model=\"cn\"} 1"),
            "{s}"
        );
        m.session_ended("cn", "closed");
        m.error("cn", "redis");
        let s = m.render();
        for want in [
            "katz_controlnet_sessions_total{model=\"cn\",end=\"closed\"} 1",
            "katz_controlnet_sessions_active{model=\"cn\"} 0",
            "katz_controlnet_steps_total{model=\"cn\"} 2",
            "katz_controlnet_step_seconds_count{model=\"cn\"} 2",
            "katz_controlnet_errors_total{model=\"cn\",error_kind=\"redis\"} 1",
        ] {
            assert!(s.contains(want), "no `{want}` in\n{s}");
        }
    }
}
